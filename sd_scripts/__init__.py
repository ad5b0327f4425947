"""The training engine: kohya-compatible LoRA training on diffusers, importable as a library."""

from .library.quiet_logs import install as _quiet_third_party_noise

_quiet_third_party_noise()
