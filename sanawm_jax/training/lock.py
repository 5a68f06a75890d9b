"""One training run per workdir: `WORKDIR/train.lock` names the run that holds it (pid, host, start time).

    with WorkdirLock(workdir):      # WorkdirLocked (a FileExistsError) if another live run holds it
        ...

The run holds an exclusive `flock` on the file for its lifetime, and the kernel drops it when the process dies, so a
lock file left by a killed run is stale: the next run takes it over with a warning naming the run that left it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import logging
import os
import socket
from pathlib import Path

LOCK_FILE = "train.lock"

logger = logging.getLogger(__name__)


class WorkdirLocked(FileExistsError):
    """Another live run holds the workdir."""


def describe(owner: dict) -> str:
    """'pid 123 on host started 2026-12-03T20:00:00+00:00' (or what the lock file holds of it)."""
    if not owner:
        return "an unknown run"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} started {owner.get('started', '?')}"


def read_owner(fd: int) -> dict:
    """The JSON owner record in the lock file open as `fd` ({} if empty or unreadable)."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = b""
    while chunk := os.read(fd, 4096):
        text += chunk
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


class WorkdirLock:
    """Exclusive ownership of a training workdir by this process; `release` (or leaving the `with`) removes the
    lock file."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = read_owner(fd)
                os.close(fd)
                raise WorkdirLocked(
                    f"{self.path.parent} is in use by the training run of {describe(owner)} (lock file {self.path})"
                ) from None
            # A releasing run unlinks the file while holding the lock: retry if we locked an unlinked file.
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)
        previous = read_owner(fd)
        if previous:
            logger.warning("%s: taking over the lock of the run of %s, which is no longer running",
                           self.path.parent, describe(previous))
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(owner) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
