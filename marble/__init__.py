"""marble: multi-reward RL fine-tuning of text-to-image diffusion models (DiffusionNFT + MARBLE)."""

__version__ = "0.1.0"
