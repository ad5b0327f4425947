"""What a training run gives back and how it stops: :class:`TrainResult`, the stop exceptions, the output file names.

Shared by the loop's parts (:mod:`.loop`, :mod:`.epoch`, :mod:`.saving`, ...); :mod:`.loop` re-exports the public
names, so callers import them from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sd_scripts.core.errors import UserError

__all__ = ["TrainResult", "TrainingStopped", "TrainingInterrupted", "StopAtOnce", "lora_file_name", "loss_plot_name",
           "state_name"]


class TrainingStopped(UserError):
    """Training stopped on purpose (a non-finite loss or weights); the last good LoRA is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl+C: what could be saved was saved (``saved_files``); command lines exit with 130."""

    def __init__(self, message: str, saved_files: list[str], state_path: str | None = None):
        super().__init__(message)
        self.saved_files = saved_files
        self.state_path = state_path


class StopAtOnce(KeyboardInterrupt):
    """The second Ctrl+C: leave without saving."""


@dataclass
class TrainResult:
    output_path: str | None
    saved_files: list[str] = field(default_factory=list)
    sample_files: list[str] = field(default_factory=list)
    state_paths: list[str] = field(default_factory=list)
    plot_path: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    global_step: int = 0
    epochs: int = 0
    losses: list[float] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    resumed_from: str | None = None
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)


def lora_file_name(output_name: str | None, ext: str, *, epoch: int | None = None, step: int | None = None) -> str:
    """kohya's names: ``name.ext``, ``name-000001.ext`` per epoch, ``name-step00000500.ext`` per step."""
    if epoch is not None:
        return f"{output_name or 'epoch'}-{epoch:06d}.{ext}"
    if step is not None:
        return f"{output_name or 'at'}-step{step:08d}.{ext}"
    return f"{output_name or 'last'}.{ext}"


def loss_plot_name(output_name: str | None) -> str:
    """The loss-and-learning-rate chart written beside the LoRA at the end of a run."""
    return f"{output_name or 'last'}-loss.png"


def state_name(output_name, *, step=None, epoch=None) -> str:
    """kohya's state folder names (:func:`sd_scripts.training.state.state_dir_name`)."""
    from sd_scripts.training.state import state_dir_name

    return state_dir_name(output_name, step=step, epoch=epoch)
