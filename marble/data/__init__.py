"""Prompt sources, validation, mixing, splitting and the prepare stage."""
