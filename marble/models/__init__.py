"""SD3 loading (hub id, local dir, or the tiny world), text embeddings, LoRA adapters, sampling."""
