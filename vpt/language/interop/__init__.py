"""Interoperability with Hugging Face checkpoints (Qwen2 / Llama safetensors, tokenizers)."""
