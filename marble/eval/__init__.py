"""Evaluation: base vs. adapter scores, statistics, hacking monitors, the promotion gate, the report."""
