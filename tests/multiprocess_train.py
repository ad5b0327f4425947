"""Run by ``accelerate launch`` in tests/test_process_streams.py: trainings in every process.

``python multiprocess_train.py MODEL DATA OUT`` trains a reference run that saves a state at every
step, then resumes it from step ``RESUME_STEP`` into ``OUT/resumed``. Each process writes
``OUT/losses-<process index>.json``: its own per-step losses (not averaged over processes) for both
runs, so the test can see what every process drew.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers import tiny_config  # noqa: E402

# 4 identical images, batch 1, 2 processes: 2 batches per process and epoch, so both processes see the
# same picture and caption at every step and only their random draws can make their losses differ.
SETTINGS = dict(train_batch_size=1, max_train_steps=4, network_dropout=0.1, lr_scheduler="cosine")
RESUME_STEP = 3


class LossLog:
    def __init__(self):
        self.losses: list[float] = []

    def on_progress(self, step, total, loss, lr, epoch):
        self.losses.append(loss)


def main(model: str, data: str, out: str) -> None:
    from accelerate import PartialState

    from sd_scripts.training.loop import train

    out_dir = Path(out)
    reference, resumed = LossLog(), LossLog()
    train(tiny_config(Path(model), Path(data), out_dir / "reference", save_state=True, save_every_n_steps=1,
                      **SETTINGS), reference)
    state = PartialState()  # the one the trainer's Accelerator set up
    state.wait_for_everyone()
    resume = out_dir / "reference" / f"tiny-step{RESUME_STEP:08d}-state"
    train(tiny_config(Path(model), Path(data), out_dir / "resumed", resume=str(resume), **SETTINGS), resumed)
    log = {"num_processes": state.num_processes, "reference": reference.losses, "resumed": resumed.losses}
    (out_dir / f"losses-{state.process_index}.json").write_text(json.dumps(log), encoding="utf-8")


if __name__ == "__main__":
    main(*sys.argv[1:4])
