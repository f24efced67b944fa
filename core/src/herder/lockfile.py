"""One owner at a time: an flock on a small file that names its holder's pid.

Used where two herder processes on the same thing would do harm: a data directory
(``serve.lock``) and a queue file (``<file>.lock``).  An flock goes away with its process
however that ends (SIGKILL included), so a crashed herder never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os


class LockHeld(Exception):
    """Another process holds the lock; ``holder`` is the pid it wrote, or "unknown"."""

    def __init__(self, path: str, holder: str) -> None:
        super().__init__(f"{path} is held by pid {holder}")
        self.holder = holder


def hold(path: str | os.PathLike[str]) -> int:
    """Take the lock on ``path`` (created 0600) for this process and write our pid in it.

    Returns the open descriptor: the lock lasts until it is closed.  Raises :class:`LockHeld`
    at once, without waiting, when another process has it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LockHeld(os.fspath(path), holder) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
