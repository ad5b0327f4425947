"""One queue job in its own process: ``python -m frontend.job SETTINGS.json RESULT.json``.

SETTINGS.json holds the job's fully resolved ArgStore (every key), written by the queue; it is
loaded as it is, without ArgsList defaults or a skip list. RESULT.json receives the output file.

Exit codes: 0 trained, 2 a user mistake (one line printed), 3 out of GPU memory
(``torch.OutOfMemoryError``; the queue may retry, see queue_retry.py), 130 stopped by Ctrl+C,
other: a crash.

The queue passes the rest in environment variables:

``LETS_QUEUE_EVENTS``
    the progress-events file to append to (one JSON object a line: queue_status.py says which).
``LETS_QUEUE_STATE``
    the folder of the job's crash-recovery state: a training state is saved there every
    ``queue_state_every`` minutes (the job's setting), replacing the previous one atomically.
``LETS_QUEUE_PARENT``
    the queue's process id: the job ends itself if the queue is gone (killed), so a re-run of the
    queue never meets an orphan still writing the same files.
``LETS_QUEUE_ATTEMPT``
    1, or 2 for the out-of-memory retry.

Test hook: ``LETS_TEST_OOM_AT_STEP=N`` raises ``torch.OutOfMemoryError`` right after optimizer step
N of the first attempt (``N,always``: of every attempt), so the queue's out-of-memory retry can be
tested on a CPU. It is read here only, never by the engine or the queue.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class QueueJobCallbacks:
    """Forwards every callback to the console, and reports to the queue: progress events, timed states."""

    def __init__(self, inner: Any, events_path: str | None, state_path: str | None, every_minutes: float | None,
                 oom_at_step: int | None = None):
        from frontend.queue_status import EventWriter

        self._inner = inner
        self._events = EventWriter(events_path) if events_path else None
        self._state_path = state_path
        self._every = every_minutes * 60 if every_minutes else None
        self._last_state = time.monotonic()
        self._total: int | None = None
        self._oom_at_step = oom_at_step

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def _event(self, kind: str, **values: Any) -> None:
        if self._events is not None:
            self._events.write(kind, **values)

    def on_start(self, info: dict) -> None:
        self._inner.on_start(info)
        self._total = info.get("max_train_steps")
        self._last_state = time.monotonic()
        self._event("start", total_steps=self._total, start_step=int(info.get("start_step") or 0))

    def on_progress(self, step: int, total: int, loss: float, lr: float, epoch: int) -> None:
        self._inner.on_progress(step, total, loss, lr, epoch)
        self._event("step", step=step, total_steps=total, loss=loss, lr=lr, epoch=epoch)
        if self._oom_at_step is not None and step == self._oom_at_step:
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (test hook LETS_TEST_OOM_AT_STEP={step})")

    def on_save(self, path: str) -> None:
        self._inner.on_save(path)
        self._event("saved", path=os.path.abspath(path))

    def on_sample(self, paths: list[str]) -> None:
        self._inner.on_sample(paths)
        self._event("samples", paths=[os.path.abspath(p) for p in paths])

    def on_end(self, result: Any) -> None:
        self._inner.on_end(result)
        self._event("end", output=getattr(result, "output_path", None))

    def state_due(self, step: int) -> str | None:
        if not self._state_path or self._every is None or (self._total is not None and step >= self._total):
            return None
        if time.monotonic() - self._last_state < self._every:
            return None
        self._last_state = time.monotonic()
        return self._state_path


def _oom_hook() -> int | None:
    """The test hook's step, for this attempt (None: no injected out-of-memory)."""
    value = os.environ.get("LETS_TEST_OOM_AT_STEP", "").strip()
    if not value:
        return None
    step, _, when = value.partition(",")
    if when.strip() != "always" and os.environ.get("LETS_QUEUE_ATTEMPT", "1") != "1":
        return None
    return int(step)


def _watch_parent() -> None:
    """End this process when the queue that started it is gone (it was killed)."""
    parent = int(os.environ.get("LETS_QUEUE_PARENT") or 0)
    if not parent:
        return

    def alive() -> bool:
        if os.name != "nt":
            return os.getppid() == parent
        import ctypes  # (os.kill on Windows would end the queue, not test it)

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x00100000 | 0x1000, False, parent)  # SYNCHRONIZE | QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:
            return kernel32.WaitForSingleObject(handle, 0) == 0x102  # WAIT_TIMEOUT: still running
        finally:
            kernel32.CloseHandle(handle)

    def watch() -> None:
        while alive():
            time.sleep(0.5)
        os._exit(137)

    threading.Thread(target=watch, name="queue-watch", daemon=True).start()


def _is_out_of_memory(err: BaseException) -> bool:
    torch = sys.modules.get("torch")
    kind = getattr(torch, "OutOfMemoryError", None) or getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return kind is not None and isinstance(err, kind)


def main(argv: list[str] | None = None) -> int:
    from sd_scripts.core.errors import EXIT_USER_ERROR, UserError, UserErrors

    from ArgsList import ArgStore
    from frontend.json_io import load_settings_file, write_json_atomic
    from frontend.queue_retry import EXIT_OUT_OF_MEMORY
    from frontend.training import run_training

    settings_path, result_path = (sys.argv[1:] if argv is None else argv)[:2]
    _watch_parent()
    try:
        loaded = load_settings_file(settings_path, ArgStore)
        store = ArgStore().replace(**loaded.values)
        from sd_scripts.training.callbacks import ConsoleCallbacks

        callbacks = QueueJobCallbacks(ConsoleCallbacks(stream=sys.stderr), os.environ.get("LETS_QUEUE_EVENTS"),
                                      os.environ.get("LETS_QUEUE_STATE"), store.queue_state_every, _oom_hook())
        result = run_training(store, callbacks=callbacks)
    except UserErrors as err:
        for item in err.errors:
            print(f"error: {item}", file=sys.stderr)
        return EXIT_USER_ERROR
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("stopped by Ctrl+C", file=sys.stderr)
        return 130
    except Exception as err:
        if not _is_out_of_memory(err):
            raise
        print(f"error: out of GPU memory: {' '.join(str(err).split())[:300]}", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    write_json_atomic(result_path, {"output_path": result.output_path})
    return 0


if __name__ == "__main__":
    sys.exit(main())
