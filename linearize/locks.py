"""Lock files: one process at a time does something to a folder (builds the embedded cache, trains into a run folder).

The lock is `fcntl.flock` on a file, which the system releases when its holder exits however it exits (a kill
included), so a crashed run leaves no stale lock to delete by hand. The holder writes its process id and host into
the file, for the message of a process that finds it held. Without fcntl (Windows) nothing is locked. `taken` asks
whether a lock file's holder is still there, on any machine that shares the file system (a process id cannot tell).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no lock, as before there was one
    fcntl = None

# file systems that cannot lock (some network mounts): run unlocked, as without fcntl, rather than not at all
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL)


class LockHeld(Exception):
    """Another process holds the lock; `holder` says which ("process 1234 on host-a"), as far as it is known."""

    def __init__(self, lock_file: Path, holder: str):
        super().__init__(f"{lock_file} is held by {holder}")
        self.lock_file, self.holder = lock_file, holder


@contextmanager
def locked(lock_file: Path, wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock on `lock_file` (created, with its folder, if missing) for the block. When another process holds
    it: with `wait`, call `wait(holder)` and wait until it is released; without, raise `LockHeld`. The file stays
    after the block (deleting it would let a third process lock a new file while a second holds the old one).
    OSErrors creating it are the caller's to explain."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as handle:  # a new open file description each time: threads exclude each other too
        if fcntl is not None and _lock(handle, lock_file, wait):
            with suppress(OSError):  # who holds it is for messages only: a full disk must not stop the holder
                handle.seek(0)
                handle.truncate()
                handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
                handle.flush()
        yield


@contextmanager
def taken(lock_file: Path) -> Iterator[bool | None]:
    """Take the lock on an existing `lock_file` for the block if it is free, without waiting: yield True when taken
    (its holder, if it had one, has exited), False when another process holds it, None when that cannot be told (no
    such file, one this process may not open, no fcntl, a file system that cannot lock). Never creates the file."""
    with ExitStack() as held:
        try:  # "r+", not "a+": a lock file gone is no lock to take, and must not come back
            handle = held.enter_context(open(lock_file, "r+"))
        except OSError:
            handle = None
        yield None if handle is None else _try_lock(handle, lock_file)


def _try_lock(handle, lock_file: Path) -> bool | None:
    if fcntl is None:
        return None
    try:
        return _lock(handle, lock_file, None) or None
    except LockHeld:
        return False
    except OSError:  # whatever else the file system says: it cannot tell
        return None


def _lock(handle, lock_file: Path, wait: Callable[[str], None] | None) -> bool:
    """Take the lock on `handle`'s file; False where the file system cannot lock."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        holder = _holder(lock_file)
        if wait is None:
            raise LockHeld(lock_file, holder) from None
        wait(holder)
        fcntl.flock(handle, fcntl.LOCK_EX)
        return True
    except OSError as error:
        if error.errno in _NO_LOCKS:
            return False
        raise


def _holder(lock_file: Path) -> str:
    try:
        return lock_file.read_text().strip() or "another process"
    except OSError:
        return "another process"
