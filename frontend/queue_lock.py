"""One queue process per folder: the lock file ``<queue folder>/queue.lock``.

The lock is the operating system's own lock on that file (``fcntl.flock`` on Linux and macOS,
``msvcrt.locking`` on Windows), held for as long as the queue runs. The system releases it when the
process ends in any way -- normally, by a crash, by SIGKILL or by a power cut -- so a lock left
behind by a dead process is simply taken over by the next queue: there is no stale state to clean.
The file's text names the holder (``pid 1234 on host, since 2026-12-07 22:10:03``) for the
one-line message a second queue prints before it exits with code 2.

A queue removes the file when it ends, while still holding the lock; a queue that opened the file
just before checks, once it has the lock, that the file is still the one in the folder, and starts
over if not, so two processes never hold locks on two different files under the same name. After a
crash the file stays until the next queue takes it over (it is not a job: jobs are ``*.json``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from sd_scripts.core.errors import ConfigError

__all__ = ["LOCK_FILE", "QueueLock", "QueueLockedError"]

LOCK_FILE = "queue.lock"
_WINDOWS_LOCK_BYTE = 1 << 30  # Windows locks byte ranges: one far past the text, so others can still read it


class QueueLockedError(ConfigError):
    """Another process runs this queue folder."""


def _try_lock(fd: int) -> bool:
    if os.name == "nt":
        import msvcrt

        try:
            os.lseek(fd, _WINDOWS_LOCK_BYTE, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _unlock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        try:
            os.lseek(fd, _WINDOWS_LOCK_BYTE, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        except OSError:
            pass
        return
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_UN)


def _still_there(fd: int, path: str) -> bool:
    """The locked file is still the one at ``path`` (not one a queue removed as it ended)."""
    if os.name == "nt":
        return os.path.exists(path)
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _holder(path: str) -> str:
    """Who holds the lock, as the file says (it is written right after the lock is taken)."""
    for _ in range(20):
        try:
            with open(path, encoding="utf-8") as handle:
                info = json.loads(handle.read() or "{}")
        except (OSError, ValueError):
            info = {}
        if info.get("pid"):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
            return f"process {info['pid']} on {info.get('host') or 'this computer'}, running since {since}"
        time.sleep(0.05)
    return "another process"


class QueueLock:
    """``with QueueLock(folder):`` -- raises QueueLockedError while another process holds the folder."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if not _try_lock(fd):
                os.close(fd)
                raise QueueLockedError(
                    f"multi_run_folder: {self.folder} is already being run by another queue ({_holder(self.path)}); "
                    f"wait for it to finish or stop it first (it holds {self.path})", setting="multi_run_folder")
            if _still_there(fd, self.path):
                break
            _unlock(fd)  # the holder we waited for removed the file as it ended: lock the new one
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file (while still holding it: a queue that opened it meanwhile tries again) and unlock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if os.name != "nt":
            with contextlib.suppress(OSError):
                os.remove(self.path)
        try:
            _unlock(fd)
        finally:
            os.close(fd)
        if os.name == "nt":  # Windows removes no open file
            with contextlib.suppress(OSError):
                os.remove(self.path)

    def __enter__(self) -> QueueLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
