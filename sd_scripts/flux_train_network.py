"""kohya's ``flux_train_network.py``: ``python -m sd_scripts.flux_train_network --flag value ...``.

The engine's command line (:mod:`sd_scripts.train_network`: every TrainConfig setting under kohya's name, the FLUX.1
ones included: ``--clip_l``, ``--t5xxl``, ``--ae``, ``--timestep_sampling``, ``--model_prediction_type``,
``--guidance_scale`` ...) with the model family fixed to FLUX.1, so a kohya FLUX command line runs unchanged
(``--network_module networks.lora_flux`` is our LoRA) and an SD model is refused before anything is loaded.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sd_scripts import train_network  # noqa: E402

PROG = "flux_train_network.py"
FIXED = {"model_family": "flux"}


def main(argv: list[str] | None = None) -> int:
    return train_network.main(argv, prog=PROG, fixed=FIXED)


if __name__ == "__main__":
    sys.exit(main())
