"""The terminal progress bar shows each step's own loss (kohya's bar showed the previous step's)."""

from __future__ import annotations

import io
import re

from sd_scripts.training.callbacks import ConsoleCallbacks


def _frames(text: str) -> list[tuple[int, str]]:
    """(step, loss) of every drawn bar frame."""
    frames = []
    for chunk in re.split(r"[\r\n]", text):
        step = re.search(r"\b(\d+)/\d+\b", chunk)
        loss = re.search(r"loss=([0-9.]+)", chunk)
        if step and loss:
            frames.append((int(step.group(1)), loss.group(1)))
    return frames


def test_every_frame_shows_the_loss_of_its_own_step():
    stream = io.StringIO()
    bar = ConsoleCallbacks(stream=stream)
    bar.on_start({"max_train_steps": 5})
    bar._bar.mininterval, bar._bar.miniters, bar._bar.dynamic_miniters = 0, 1, False  # draw every update
    losses = {1: 0.5, 2: 0.25, 3: 0.125, 4: 0.0625, 5: 0.03125}
    for step, loss in losses.items():
        bar.on_progress(step, 5, loss, 1e-4, 1)
        if step == 3:
            bar.on_save("/tmp/x.safetensors")  # redraws the bar after the line
    bar.on_end(None)
    frames = _frames(stream.getvalue())
    assert {step for step, _ in frames} == set(losses)
    assert all(value == f"{losses[step]:.4f}" for step, value in frames), frames
