"""The third-party warnings that only alarm users are dropped, and nothing else from the same loggers."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_only_the_listed_messages_are_dropped():
    import sd_scripts  # noqa: F401 - installs the filters
    from sd_scripts.core.quiet_logs import NOISE

    kept: list[str] = []

    class Collect(logging.Handler):  # on each logger itself: diffusers/transformers loggers need not propagate
        def emit(self, record):
            kept.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    for name, markers in NOISE.items():
        logger = logging.getLogger(name)
        level = logger.level
        logger.setLevel(logging.WARNING)  # whatever verbosity another test left the library at
        logger.addHandler(handler)
        try:
            logger.warning(f"something {markers[0]} something")
            logger.warning("another warning from %s", name)
            logger.error(f"an error that mentions {markers[0]}")
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
    assert sorted(kept) == sorted([f"another warning from {n}" for n in NOISE] +
                                  [f"an error that mentions {m[0]}" for m in NOISE.values()])


def test_a_real_run_of_the_libraries_prints_none_of_them():
    code = (
        "import sd_scripts, torch, bitsandbytes\n"
        "from diffusers import AutoencoderKL, StableDiffusionPipeline\n"
        "vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, layers_per_block=1, latent_channels=4)\n"
        "vae.to(dtype=torch.float32)\n"
        "from transformers import CLIPImageProcessor\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    for marker in ("gemm_4bit_forward", "should be kept in float32: []", "requires torchvision"):
        assert marker not in proc.stderr, proc.stderr
