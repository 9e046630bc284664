"""Checkpoints: Hugging Face safetensors interop (hf) and Orbax training state (state)."""
