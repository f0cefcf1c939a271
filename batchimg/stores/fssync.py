"""One sync for a batch of files: syncfs(2), where it is as safe as an fsync of each file.

A batch of small images costs a local disk one journal commit per fsync, and this machine's
ext4 about 0.3-0.9 ms of kernel CPU per file in all. syncfs writes back everything dirty on
one filesystem and commits the journal once, so a batch of files written without fsync is made
durable for the price of about one. It is used only where it guarantees what fsync does:

- Linux 5.8 or later: before, syncfs did not report a failed writeback (EIO), and a lost image
  would count as saved;
- a local filesystem of a known kind (ext4, ext3, ext2, XFS, tmpfs), found in
  /proc/self/mountinfo by the directory's device: a FUSE mount, NFS or anything unknown may
  accept syncfs and keep nothing, so there every file keeps its own fsync (btrfs too: its
  subvolumes' devices are not the mount table's, so it is never recognised);
- through a descriptor opened before any of the files it syncs was written, kept open, one
  syncfs at a time: syncfs reports a write error once, to each descriptor opened before it was
  reported to anyone. After an error the caller fsyncs each file instead (`LocalStore.settle`).

Elsewhere (another system, an older kernel, such a filesystem, libc without syncfs)
`filesystem_sync` returns None and the caller fsyncs each file.

syncfs also writes back other programs' dirty files on the same filesystem; a batch may then
wait for them (wall time, not CPU: the kernel's flusher threads write them).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

#: Filesystems whose syncfs writes back and commits all, reporting errors (Linux >= 5.8).
SAFE_KINDS = frozenset({"ext2", "ext3", "ext4", "xfs", "tmpfs"})
MIN_KERNEL = (5, 8)


def filesystem_sync(fd: int, directory: Path) -> Callable[[], None] | None:
    """A function that makes everything written on the filesystem of `fd` (an open directory)
    durable, raising OSError if any write since `fd` was opened failed; None where syncfs is not
    known to be as safe as fsync, or where `directory` (the files to sync) is on another
    filesystem. The caller keeps `fd` open as long as it uses the function: syncfs reports the
    errors since its descriptor was opened, once each."""
    if not sys.platform.startswith("linux") or kernel() < MIN_KERNEL:
        return None
    try:
        device = os.fstat(fd).st_dev
        if os.stat(directory).st_dev != device:
            return None
    except OSError:
        return None
    if mount_kind(device) not in SAFE_KINDS:
        return None
    syncfs = libc_syncfs()
    if syncfs is None:
        return None
    return lambda: syncfs(fd)


def kernel(release: str | None = None) -> tuple[int, int]:
    """The (major, minor) of a kernel release string (the running kernel's by default); (0, 0)
    if it has none."""
    found = re.match(r"(\d+)\.(\d+)", os.uname().release if release is None else release)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def mount_kind(device: int, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The filesystem type of the mount whose device is `device` (st_dev), from mountinfo
    (`ID PARENT MAJOR:MINOR ROOT POINT OPTIONS [TAGS...] - TYPE SOURCE SUPER`); None if no
    mount, or several of different types, have it."""
    wanted = f"{os.major(device)}:{os.minor(device)}"
    kinds = set()
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 2 and fields[2] == wanted and " - " in line:
                    kinds.add(line.split(" - ", 1)[1].split(" ", 1)[0])
    except OSError:
        return None
    return kinds.pop() if len(kinds) == 1 else None


def libc_syncfs() -> Callable[[int], None] | None:
    """libc's syncfs as a function raising OSError, or None if libc has none."""
    import ctypes  # only where syncfs may be used: a local run's first batch

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.syncfs
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int]
    call.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        if call(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"syncfs: {os.strerror(errno)}")

    return syncfs
