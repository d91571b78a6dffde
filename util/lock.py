"""Exclusive advisory locks on a file, held by one process for as long as it lives or keeps the file open.

These are POSIX record locks (fcntl.lockf), which belong to the process that took them: the processes it
forks (data loader workers) do not hold them, and the kernel drops them when that process ends, however it
ends. (An flock lock belongs to the open file instead, which forked children share: after a SIGKILL of a
training process, its orphaned loader workers kept the save path locked for seconds.) The price of record
locks: a process drops its lock on a file when it closes any descriptor of that file, so nothing but lock()
opens a lock file.
"""

import errno
import fcntl
import os
import socket
import time
from typing import TextIO


class LockHeld(Exception):
    """Another process holds the lock; `holder` is what it wrote in the file (its host and PID)."""

    def __init__(self, path: str, holder: str):
        super().__init__(f"{path} is locked by {holder}")
        self.path, self.holder = path, holder


def lock(path: str, wait: bool = False) -> TextIO:
    """Take the exclusive lock on `path` (created if need be) and write this process's host and PID in it.

    The lock is held while the returned file stays open, or until the process ends. When another process
    holds it: LockHeld, or with `wait`, wait until it is free. An OSError where the filesystem has no locks.
    """
    f = open(path, "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        f.seek(0)
        name = written_name(f)
        f.close()
        if err.errno in (errno.EACCES, errno.EAGAIN):
            raise LockHeld(path, name) from None
        raise
    f.seek(0)
    f.truncate()
    f.write(f"host {socket.gethostname()}, PID {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def holder(path: str) -> str | None:
    """What the process holding the lock on `path` wrote in it (its host and PID), or None when no process
    holds it (or the file is gone, or the filesystem has no locks).

    It probes with a lock of its own, dropped at once: a lock this process holds itself never shows here,
    and probing it would drop it (see above), so call it only on other processes' locks.
    """
    try:
        f = open(path, "r+")
    except OSError:
        return None
    with f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EAGAIN):
                return written_name(f)
        return None


def written_name(f: TextIO) -> str:
    """What the holder of a lock file wrote in it (read from the current position)."""
    return f.read().strip() or "a process that has not written its name yet"
