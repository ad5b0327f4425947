"""The training engine: kohya-compatible LoRA training on diffusers, importable as a library."""
