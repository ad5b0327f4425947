"""How the engine reports to its caller.

The engine never prints. It calls optional methods on a callbacks object; any method the
object lacks is skipped. :class:`ConsoleCallbacks` is the terminal front end: a tqdm bar
with loss, it/s and ETA, plus one line per message and saved file.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["TrainCallbacks", "ConsoleCallbacks", "CallbackDispatcher"]


class TrainCallbacks:
    """Base class listing every callback; all are optional no-ops."""

    def on_message(self, text: str) -> None: ...

    def on_start(self, info: dict[str, Any]) -> None: ...

    def on_progress(self, step: int, total: int, loss: float, lr: float, epoch: int) -> None:
        """After each optimizer step; ``loss`` is NaN for a step skipped because of NaN/inf (skip_nonfinite_steps)."""

    def on_step_info(self, step: int, info: dict[str, Any]) -> None:
        """Extra figures of the step about to be reported by ``on_progress`` (``keys_scaled`` and
        ``average_key_norm`` with scale_weight_norms), for a progress display."""

    def on_save(self, path: str) -> None:
        """A LoRA file or a training-state folder was written."""

    def on_sample(self, paths: list[str]) -> None: ...

    def state_due(self, step: int) -> str | None:
        """Asked after each optimizer step (its saves and samples done): a folder path to save a
        training state into now, or None. The state is written as ``save_state`` writes one (a
        temporary folder renamed over the previous one), whether or not ``save_state`` is on; the
        queue uses it for its timed crash-recovery states. With several processes, process 0's
        answer counts. A full disk only warns: the previous state stays and training goes on."""

    def on_end(self, result: Any) -> None: ...


class CallbackDispatcher:
    """Calls a method on the user's callbacks object only if it defines it."""

    def __init__(self, target: Any | None):
        self._target = target

    def __getattr__(self, name: str):
        method = getattr(self._target, name, None) if self._target is not None else None
        if method is None:
            return lambda *args, **kwargs: None
        return method


class ConsoleCallbacks(TrainCallbacks):
    """tqdm progress bar on stderr; messages and saved files as plain lines."""

    def __init__(self, stream=None, disable_bar: bool = False):
        self._stream = stream or sys.stderr
        self._bar = None
        self._disable = disable_bar
        self._step_info: dict[str, Any] = {}

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)

    def on_message(self, text: str) -> None:
        self._write(text)

    def on_start(self, info: dict[str, Any]) -> None:
        from tqdm import tqdm

        lines = [f"  {k}: {v}" for k, v in info.items()]
        self._write("training:\n" + "\n".join(lines))
        self._bar = tqdm(total=info.get("max_train_steps"), initial=int(info.get("start_step") or 0), desc="steps",
                         unit="step", file=self._stream, dynamic_ncols=True, disable=self._disable, smoothing=0.1)

    def on_progress(self, step: int, total: int, loss: float, lr: float, epoch: int) -> None:
        if self._bar is not None:
            # the postfix first: update() redraws the bar, and it must show this step's loss, not the previous one's
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", epoch=epoch, **self._step_info, refresh=False)
            self._bar.update(step - self._bar.n)

    def on_step_info(self, step: int, info: dict[str, Any]) -> None:
        self._step_info = {k: f"{v:.3g}" if isinstance(v, float) else v for k, v in info.items()}

    def on_save(self, path: str) -> None:
        self._write(f"saved {path}")

    def on_sample(self, paths: list[str]) -> None:
        for p in paths:
            self._write(f"sample {p}")

    def on_end(self, result: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
