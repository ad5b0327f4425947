"""Third-party log lines that alarm users without telling them anything to do, filtered out.

Each is a warning about something this program never uses or has already decided, printed on every run:

* bitsandbytes on a CPU: its optional 4-bit CPU kernels are missing (``pip install kernels``); no 4-bit layer is
  used here, 8-bit optimizers work without them;
* diffusers' ``ModelMixin.to(dtype)``: "modules that should be kept in float32: []" with an empty list, i.e. none;
* transformers without torchvision (kept out on purpose): its image processors fall back to the PIL ones, which the
  sample pipeline's unused safety-checker slot is all that asks for.

Only these exact messages are dropped (a logging filter on the logger that writes each); every other line of those
loggers, and every error, still shows.
"""

from __future__ import annotations

import logging

__all__ = ["install", "NOISE"]

# logger name -> the markers of the messages dropped from it
NOISE: dict[str, tuple[str, ...]] = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "diffusers.models.modeling_utils": ("that should be kept in float32: [].",),
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",),
}


class _DropMessages(logging.Filter):
    def __init__(self, markers: tuple[str, ...]):
        super().__init__()
        self.markers = markers

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        return not any(marker in message for marker in self.markers)


def install() -> None:
    """Attach the filters (once); cheap, imports nothing heavy, safe to call before the libraries load."""
    for name, markers in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(markers))
