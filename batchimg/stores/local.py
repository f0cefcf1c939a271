"""The local-directory store: objects are files, `put` is a rename of a durable temp file."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO, Literal

TEMP_DIR = ".tmp"  # the temp area, hidden from dataset loaders (same filesystem: put renames)
ORPHANS_DIR = ".orphans"  # where files found under a name being put are set aside
SYNCED_SUFFIX = ".synced"  # ends the name of a temp file fsynced as it was written
MAX_SETTLED = 4096  # marks of settled temps kept (those of failed items are never taken back)


class TempArea:
    """A store's local temp area: fresh names in one directory, emptied at each start."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self._tag = uuid.uuid4().hex[:8]  # temp names: unique per store, then a counter
        self._count = itertools.count()
        self._ready = False
        self._prefix = f"{directory}/"

    def clean(self) -> None:
        """Remove what an interrupted run left (only while no run writes)."""
        if self.dir.is_symlink():  # emptying it would empty whatever it points at
            raise OSError(f"{self.dir} is a symbolic link, not this store's temp area")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ready = True
        for stale in self.dir.iterdir():
            if stale.is_file() or stale.is_symlink():
                stale.unlink(missing_ok=True)

    def new(self, hint: str) -> Path:
        return Path(self.new_name(hint))

    def new_name(self, hint: str) -> str:
        """`new` as a string: a store's own per-image path builds no Path (~4 us each)."""
        if not self._ready:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._ready = True
        return f"{self._prefix}{hint}.{self._tag}{next(self._count)}"


def aside_name(name: str) -> str:
    """A fresh name in the orphans' directory for a file set aside (`cat-0.png` becomes
    `.orphans/cat-0.1a2b3c4d.png`)."""
    path = PurePosixPath(name)
    return f"{ORPHANS_DIR}/{path.stem}.{uuid.uuid4().hex[:8]}{path.suffix}"


class LocalStore:
    """A directory as a `Store` (see `base`)."""

    writer_threads = 1  # see writer.BatchedWriter

    def __init__(self, root: Path, *, temp_dir: Path | None = None, fs_sync: bool = True) -> None:
        """`temp_dir`: the temp area, if not `root/.tmp` (on the same filesystem: put renames).
        `fs_sync=False`: never sync a batch with syncfs, fsync each file (see `settle`)."""
        self.root = root
        self._temps = TempArea(temp_dir or root / TEMP_DIR)
        self._lock = threading.Lock()  # writer threads may put the same name at once
        #: Directories put into: `sync` fsyncs each (not only those changed since the last
        #: sync, which another thread's sync may be fsyncing right now, not yet done).
        self._dirs: set[str] = set()
        self._parents: dict[str, str] = {}  # a name's folder -> its directory, checked
        #: One syncfs for a batch of temps (`settle`), where as safe as an fsync each; looked
        #: up on first use (False: not yet), so a run that writes nothing never pays for it.
        #: It goes through a descriptor opened now, before this store writes anything: syncfs
        #: reports the filesystem's write errors since its descriptor was opened (not those
        #: another program's sync has already been told of, if opened after them).
        self._fs_sync: Callable[[], None] | Literal[False] | None = None
        self._fs_sync_fd = -1
        if fs_sync and (fd := open_nearest_directory(self._temps.dir)) >= 0:
            weakref.finalize(self, os.close, fd)
            self._fs_sync_fd = fd
            self._fs_sync = False
        self._settle_lock = threading.Lock()  # one syncfs at a time: each learns of errors
        self._settled: set[str] = set()  # temps made durable by `settle`, not yet put

    @property
    def location(self) -> str:
        return str(self.root)

    @property
    def temp_dir(self) -> Path:
        return self._temps.dir

    def clean_temps(self) -> None:
        self._temps.clean()

    def new_temp(self, hint: str) -> Path:
        return self._temps.new(hint)

    def write_temp(self, hint: str, data: bytes) -> str:
        """A new temp file holding `data`, durable once `settle` returns. Where a batch is
        synced with one syncfs it is only written; elsewhere it is fsynced through the
        descriptor that wrote it and its name says so (`SYNCED_SUFFIX`), so that `put` does not
        open it again to sync it. Raises OSError, leaving no file behind."""
        if self._filesystem_sync() is not None:
            temp = self._temps.new_name(hint)
            write_new(temp, data, sync=False)
        else:
            temp = f"{self._temps.new_name(hint)}{SYNCED_SUFFIX}"
            write_new(temp, data, sync=True)
        return temp

    def settle(self, temps: Sequence[str]) -> None:
        """Make the bytes of these temp files (written, closed, not yet put) durable, so that
        `put` need not sync them: one syncfs of the filesystem where that is as safe as an
        fsync of each (`fssync`); elsewhere nothing here, and `put` fsyncs each temp not
        fsynced as it was written. Raises OSError.

        A failed syncfs does not say which files it lost, and the next one will not say it
        again: from then on this store fsyncs every temp on its own (each file's fsync reports
        that file's own write error), those already written and not yet put included."""
        if not temps:
            return
        with self._settle_lock:  # the syncfs that learns of an error is the one that reports it
            sync = self._filesystem_sync()
            if sync is None:
                return
            try:
                sync()
            except OSError:
                self._fs_sync = None
                self._settled.clear()
                raise
            if len(self._settled) > MAX_SETTLED:  # marks of temps discarded, never put
                self._settled.clear()  # (a temp without one is fsynced by `put`: safe)
            self._settled.update(temps)

    def _filesystem_sync(self) -> Callable[[], None] | None:
        if self._fs_sync is False:
            with self._lock:
                if self._fs_sync is False:
                    from .fssync import filesystem_sync

                    self._temps.dir.mkdir(parents=True, exist_ok=True)
                    self._fs_sync = filesystem_sync(self._fs_sync_fd, self._temps.dir)
        return self._fs_sync

    def _path(self, name: str) -> Path:
        """The file of an object; ValueError for a name that would leave the directory."""
        parts = PurePosixPath(name).parts
        if not parts or name.startswith("/") or ".." in parts:
            raise ValueError(f"not an object name of this store: {name!r}")
        return self.root.joinpath(*parts)

    def put(self, name: str, temp: Path) -> None:
        final = self._file(name)
        temp_name = str(temp)
        if not temp_name.endswith(SYNCED_SUFFIX):  # not fsynced as it was written
            try:
                self._settled.remove(temp_name)  # made durable by `settle`
            except KeyError:  # nor that (a spooled answer, a shard): fsynced here
                fsync_path(temp_name, os.O_RDONLY)
        parent = final.rpartition("/")[0]
        with self._lock:  # look-then-rename: one thread at a time
            if parent not in self._dirs:
                os.makedirs(parent, exist_ok=True)
                self._dirs.add(parent)
            if os.path.lexists(final):
                self._set_aside(Path(final))
            os.replace(temp, final)

    def _file(self, name: str) -> str:
        """`_path(name)` as a string, its directory checked once per folder (a put per image)."""
        folder, _, file = name.rpartition("/")
        parent = None if name.startswith("/") else self._parents.get(folder)
        if parent is None or file in ("", ".", ".."):
            path = self._path(name)  # ValueError for a name that would leave the directory
            if file not in ("", ".", ".."):
                self._parents[folder] = str(path.parent)
            return str(path)
        return f"{parent}/{file}"

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
        (self.root / ORPHANS_DIR).mkdir(exist_ok=True)
        os.replace(final, self.root / aside_name(final.name))


def open_nearest_directory(path: Path) -> int:
    """A descriptor of `path`, or of its nearest ancestor that exists (on the filesystem where
    `path` will be made); -1 if none can be opened."""
    for directory in (path, *path.parents):
        try:
            return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        except OSError:
            return -1
    return -1


def write_new(path: str, data: bytes, *, sync: bool) -> None:
    """Create `path`, which must not exist, holding `data` (fsynced first if `sync`). Raises
    OSError, leaving no file behind."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


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
