"""The training engine: kohya-compatible LoRA training on diffusers, importable as a library."""

from sd_scripts.core.quiet_logs import install as _quiet_third_party_noise

_quiet_third_party_noise()
