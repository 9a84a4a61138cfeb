"""Interoperability with DINOv2 / DINOv3 checkpoints (Hugging Face safetensors)."""
