"""Running one queue job's child process: its log (with timestamps, kept across resumes) and Ctrl+C.

The child's stdout and stderr go, line by line, to ``<queue folder>/<job stem>.log``, each line
prefixed with the local date and time; the log is appended to, so a job resumed after a crash keeps
everything it printed before. Progress-bar redraws (lines ended by a carriage return) are kept at
most once every :data:`BAR_EVERY` seconds, plus the bar's last state. The terminal still gets the
raw output.

The child runs in its own session (the terminal's Ctrl+C reaches only the queue) and, on Linux,
dies with the queue: if the queue process is killed, the kernel kills the child too
(``PR_SET_PDEATHSIG``), and ``frontend/job.py`` also watches its parent on every system, so a
re-run never finds an orphan still training.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Any, Callable

__all__ = ["JobLog", "Interrupts", "run_child", "BAR_EVERY"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAR_EVERY = 10.0


def _stamp() -> bytes:
    return time.strftime("%Y-%m-%d %H:%M:%S ").encode()


class JobLog:
    """A job's log file, appended to with a timestamp on every line; keeps the last lines for the status."""

    def __init__(self, path: str, tail: int = 40):
        self.path = path
        self.tail: deque[str] = deque(maxlen=tail)
        self._handle = open(path, "ab")
        self._partial = b""
        self._bar_written = -float("inf")
        self._lock = threading.Lock()

    def note(self, text: str) -> None:
        """A line of the queue's own (job started, resumed, retried, ended)."""
        with self._lock:
            for line in text.splitlines() or [""]:
                self._emit(line.encode("utf-8"), bar=False, force=True)
            self._handle.flush()

    def feed(self, chunk: bytes) -> None:
        with self._lock:
            data = self._partial + chunk
            start = 0
            for index, byte in enumerate(data):
                if byte in (10, 13):  # \n, \r
                    self._emit(data[start:index], bar=byte == 13)
                    start = index + 1
            self._partial = data[start:]
            self._handle.flush()

    def close(self) -> None:
        with self._lock:
            if self._partial:
                self._emit(self._partial, bar=False)
                self._partial = b""
            self._handle.close()

    def _emit(self, line: bytes, *, bar: bool, force: bool = False) -> None:
        if not line.strip():
            return
        text = line.decode("utf-8", "replace").rstrip()
        if bar:
            if self.tail and self.tail[-1].startswith("\r"):
                self.tail[-1] = "\r" + text  # the bar's newest state replaces its previous one in the tail
            else:
                self.tail.append("\r" + text)
            now = time.monotonic()
            if now - self._bar_written < BAR_EVERY and not force:
                return
            self._bar_written = now
        else:
            if self.tail and self.tail[-1].startswith("\r"):
                self.tail.pop()  # a bar's final state, or a line printed under it (the bar is redrawn next)
            self.tail.append(text)
        self._handle.write(_stamp() + line.rstrip() + b"\n")

    def tail_lines(self) -> list[str]:
        with self._lock:
            return [line.lstrip("\r") for line in self.tail]


class Interrupts:
    """Ctrl+C once: stop after this job. Twice: interrupt the running job too. Three times: kill it."""

    def __init__(self, say: Callable[[str], None]):
        self.count = 0
        self.second_at: float | None = None
        self.child: subprocess.Popen | None = None
        self._say = say
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no Ctrl+C handling
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            self._say("\nCtrl+C: the queue stops after the current job (press Ctrl+C again to stop it now)")
        elif self.count == 2:
            self._say("\nCtrl+C again: stopping the current job now (a third Ctrl+C kills it)")
            self.second_at = time.monotonic()
            self.stop_child()
        elif self.child is not None and self.child.poll() is None:
            self.child.kill()

    def stop_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        try:
            if os.name == "nt":
                child.send_signal(signal.CTRL_BREAK_EVENT)
            else:
                child.send_signal(signal.SIGINT)
        except OSError:
            pass


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """Linux: the child gets SIGKILL when the queue dies (``prctl(PR_SET_PDEATHSIG)``)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: between fork and exec nothing is imported
    except (OSError, AttributeError):
        return None

    def prepare() -> None:  # runs in the child between fork and exec
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the queue died before the line above
            os._exit(137)

    return prepare


def run_child(command: list[str], log: JobLog, interrupts: Interrupts, *, echo: bool, env: dict[str, str],
              poll: Callable[[], None], poll_every: float = 0.25) -> int:
    """Run ``command``, its output into ``log``; call ``poll()`` every ``poll_every`` s; return the exit code."""
    full_env = dict(os.environ)
    full_env.update(env)
    full_env["PYTHONPATH"] = ROOT + (os.pathsep + full_env["PYTHONPATH"] if full_env.get("PYTHONPATH") else "")
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env["LETS_QUEUE_PARENT"] = str(os.getpid())
    kwargs: dict[str, Any] = {}
    if os.name == "nt":
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
    else:
        kwargs["start_new_session"] = True  # the terminal's Ctrl+C reaches only the queue
        kwargs["preexec_fn"] = _die_with_parent(os.getpid())
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, **kwargs)
    interrupts.child = child

    def pump() -> None:
        fd = child.stdout.fileno()
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            log.feed(chunk)
            if echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        while child.poll() is None:
            poll()
            if interrupts.second_at is not None and time.monotonic() - interrupts.second_at > 120:
                child.kill()  # it did not stop within two minutes of the second Ctrl+C
            time.sleep(poll_every)
        reader.join()
        poll()
        return child.returncode
    finally:
        interrupts.child = None
        child.stdout.close()
