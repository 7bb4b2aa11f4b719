"""Weight files: safetensors (HF and consolidated names), GGUF, and model refs from the hub."""
