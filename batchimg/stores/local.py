"""The local-directory store: objects are files, `put` is an fsynced rename."""

from __future__ import annotations

import itertools
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

TEMP_DIR = ".tmp"  # the temp area, hidden from dataset loaders (same filesystem: put renames)
ORPHANS_DIR = ".orphans"  # where files found under a name being put are set aside


class LocalStore:
    """A directory as a `Store` (see `base`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._temp_dir = root / TEMP_DIR
        self._temp_tag = uuid.uuid4().hex[:8]  # temp names: unique per store, then a counter
        self._temp_count = itertools.count()
        self._temp_ready = False
        self._lock = threading.Lock()  # writer threads may put the same name at once
        #: Directories put into: `sync` fsyncs each (not only those changed since the last
        #: sync, which another thread's sync may be fsyncing right now, not yet done).
        self._dirs: set[str] = set()

    @property
    def location(self) -> str:
        return str(self.root)

    @property
    def temp_dir(self) -> Path:
        return self._temp_dir

    def clean_temps(self) -> None:
        if self._temp_dir.is_symlink():  # emptying it would empty whatever it points at
            raise OSError(f"{self._temp_dir} is a symbolic link, not this store's temp area")
        self._temp_dir.mkdir(parents=True, exist_ok=True)
        self._temp_ready = True
        for stale in self._temp_dir.iterdir():
            if stale.is_file() or stale.is_symlink():
                stale.unlink(missing_ok=True)

    def new_temp(self, hint: str) -> Path:
        if not self._temp_ready:
            self._temp_dir.mkdir(parents=True, exist_ok=True)
            self._temp_ready = True
        return self._temp_dir / f"{hint}.{self._temp_tag}{next(self._temp_count)}"

    def _path(self, name: str) -> Path:
        """The file of an object; ValueError for a name that would leave the directory."""
        parts = PurePosixPath(name).parts
        if not parts or name.startswith("/") or ".." in parts:
            raise ValueError(f"not an object name of this store: {name!r}")
        return self.root.joinpath(*parts)

    def put(self, name: str, temp: Path) -> None:
        final = self._path(name)
        fsync_path(str(temp), os.O_RDONLY)
        parent = str(final.parent)
        with self._lock:  # look-then-rename: one thread at a time
            if parent not in self._dirs:
                final.parent.mkdir(parents=True, exist_ok=True)
                self._dirs.add(parent)
            if os.path.lexists(str(final)):
                self._set_aside(final)
            os.replace(temp, final)

    def sync(self) -> None:
        with self._lock:
            directories = sorted(self._dirs)
        for directory in directories:
            fsync_path(directory, os.O_RDONLY | os.O_DIRECTORY)

    def open(self, name: str) -> BinaryIO:
        return open(self._path(name), "rb")

    def exists(self, name: str) -> bool:
        try:
            return self._path(name).is_file()
        except ValueError:
            return False

    def list(self, prefix: str) -> Iterator[str]:
        directory = self._path(prefix)
        if not directory.is_dir():
            return
        with os.scandir(directory) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                    yield f"{prefix}/{entry.name}"

    def delete(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    def _set_aside(self, final: Path) -> None:
        """Move a file no ledger line claims out of the way instead of overwriting it."""
        orphans = self.root / ORPHANS_DIR
        orphans.mkdir(exist_ok=True)
        target = orphans / f"{final.stem}.{uuid.uuid4().hex[:8]}{final.suffix}"
        os.replace(final, target)


def fsync_file(fh: IO[bytes]) -> None:
    """Flush an open file and fsync it (it stays open)."""
    fh.flush()
    os.fsync(fh.fileno())


def fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    """fsync a file or (with O_DIRECTORY) a directory by path."""
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
