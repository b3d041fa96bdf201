"""OS file locks, and which filesystem a path is on (whether its locks can be trusted).

``flock`` locks belong to an open file and are released by the kernel when the process holding
it dies, however it dies: a lock left by a ``kill -9`` is never stale. They are only as good as
the filesystem, though: on NFS, SMB and FUSE mounts they are emulated, per host, or ignored, so
farm does not coordinate through them there (``NETWORK_FILESYSTEMS`` in config.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from farm.config import NETWORK_FILESYSTEMS


class FileLock:
    """An exclusive or shared ``flock`` on ``path`` (created if missing), held until ``release``
    or the process ends. The file is opened close-on-exec, so processes this one starts (Ray's)
    never hold it."""

    def __init__(self, path: str | Path, *, shared: bool = False) -> None:
        self.path = Path(path)
        self.shared = shared
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = False) -> bool:
        """Take the lock; False if another process holds it (only when not ``blocking``)."""
        if self._fd is not None:
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:  # another user's lock file: locking needs only a read handle
            fd = os.open(self.path, os.O_RDONLY)
        mode = (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def exclusive(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block, waiting for it if another process has it."""
    lock = FileLock(path)
    lock.acquire(blocking=True)
    try:
        yield
    finally:
        lock.release()


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of each line of ``/proc/self/mountinfo``."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mounts.append((_unescape(fields[4]), right.split()[0]))
    return mounts


def filesystem_type(path: str | Path, mountinfo: str | None = None) -> str:
    """The type of the filesystem ``path`` (or its nearest existing parent) is on, e.g. ``ext4`` or
    ``nfs4``; "" where it cannot be told (no /proc: not Linux)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return ""
    where = Path(path).expanduser().absolute()
    while not where.exists() and where.parent != where:
        where = where.parent
    return mounted_type(str(where.resolve()), mountinfo)


def mounted_type(resolved: str, mountinfo: str) -> str:
    """The filesystem type of the deepest mount holding ``resolved`` (an absolute, resolved path)."""
    best, kind = "", ""
    for mount_point, fstype in parse_mountinfo(mountinfo):
        inside = resolved == mount_point or resolved.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):  # the last of equal mounts is the one on top
            best, kind = mount_point, fstype
    return kind


def is_network_filesystem(fstype: str) -> bool:
    return fstype in NETWORK_FILESYSTEMS or fstype.startswith(("nfs", "smb", "cifs"))
