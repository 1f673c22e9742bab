"""The spool's directory: private to its owner (0700, files 0600: they hold message bodies) and locked, so
that one daemon at a time uses it (two would deliver every message twice)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path

from senderd.errors import ConfigError
from senderd.logs import get_logger

log = get_logger("spool")
LOCK_NAME = "spool.lock"


class SpoolDir:
    """`directory`, made private and locked by `acquire`; `release` gives the lock back."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock_fd: int | None = None

    def acquire(self) -> None:
        """Create the directory (0700) if needed, tighten what is too open, and take the lock.

        Raises ConfigError: the directory cannot be created, or another process holds the lock."""
        directory = self.directory
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            _tighten(directory, 0o700)
            fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"relay.spool_dir: cannot use {directory} ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"relay.spool_dir: {directory} is in use by another senderd (pid {holder}): stop it, or give "
                "this one its own spool_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd
        for path in directory.glob("spool.db*"):
            _tighten(path, 0o600)

    def create_private(self, path: Path) -> None:
        """Create `path` empty with mode 0600 if it does not exist (SQLite gives its -wal the same mode)."""
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))

    def release(self) -> None:
        """Give the lock back (closing its file releases it)."""
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)


def _tighten(path: Path, mode: int) -> None:
    """Take group and other permissions off `path` if it has any (and is ours)."""
    info = path.lstat()
    if stat.S_IMODE(info.st_mode) & 0o077 and info.st_uid == os.getuid():
        path.chmod(mode)
        log.warning("spool_permissions_tightened", path=str(path), was=oct(stat.S_IMODE(info.st_mode)), now=oct(mode))
