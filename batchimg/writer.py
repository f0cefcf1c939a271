"""Turns API answers into image files: decode, verify, write atomically.

A file appears under `DIR/images/` only whole (temp file in the same directory, fsync, rename),
and an existing file is never overwritten: a leftover from an interrupted earlier attempt is moved
to `DIR/.orphans/` first.
"""

from __future__ import annotations

import binascii
import contextlib
import hashlib
import itertools
import os
import queue
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from xml.parsers import expat

import anyio
import anyio.from_thread
import anyio.lowlevel
import pybase64

from . import specs
from ._spool import SpooledImage
from .errors import ErrorInfo, ItemFailed, StorageError

IMAGES_DIR = "images"
ORPHANS_DIR = ".orphans"  # hidden: dataset loaders skip it
TEMP_SUFFIX = ".part"
WRITER_THREADS = 4  # fsyncs kept in flight at once
MAX_BATCH = 64  # items one writer thread takes at a time


@dataclass(frozen=True)
class StoredFile:
    """One image on disk: its path relative to the output directory, size and sha256."""

    path: str
    bytes: int
    sha256: str


def _bad_image(message: str) -> ItemFailed:
    return ItemFailed(ErrorInfo(message=message, code="bad_image", type="invalid_response"))


def decode_b64_image(value: str) -> bytes:
    """Decode a `b64_json` value, with or without a `data:image/...;base64,` prefix."""
    if value.startswith("data:"):
        _, sep, value = value.partition(",")
        if not sep:
            raise _bad_image("data URI without a ',' before its payload")
    if "\n" in value or "\r" in value:  # some gateways wrap base64 at 76 columns
        value = "".join(value.split())
    try:
        return pybase64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad_image(f"b64_json does not decode: {exc}") from None


def check_image(image: bytes | SpooledImage, expected: str) -> None:
    """Raise ItemFailed unless the image is what was asked for: the format's magic number
    (PNG, JPEG, WebP, GIF), or for SVG a whole XML document whose root is `<svg>`."""
    head = image.head if isinstance(image, SpooledImage) else image[:64]
    size = image.nbytes if isinstance(image, SpooledImage) else len(image)
    found = specs.sniff_format(head)
    if found is None:
        raise _bad_image(f"answer is not a PNG, JPEG, WebP, GIF or SVG image ({size} bytes)")
    if found != expected:
        raise _bad_image(f"asked for {expected}, got {found}")
    if expected == "svg":
        _check_svg(image)


def _check_svg(image: bytes | SpooledImage) -> None:
    """The whole document must parse as XML with an `svg` root. Parsed by expat as a stream (no
    tree is built; expat refuses entity bombs, and external entities are never fetched)."""
    parser = expat.ParserCreate(namespace_separator=" ")
    tags: list[str] = []

    def start(name: str, _attrs: object) -> None:
        if not tags:
            tags.append(name.rsplit(" ", 1)[-1])

    parser.StartElementHandler = start
    try:
        if isinstance(image, SpooledImage):
            with open(image.path, "rb") as fh:
                while chunk := fh.read(1 << 16):
                    parser.Parse(chunk, False)
        else:
            parser.Parse(image, False)
        parser.Parse(b"", True)
    except expat.ExpatError as exc:
        raise _bad_image(f"answer is not a well-formed SVG document: {exc}") from None
    except OSError as exc:
        raise StorageError(f"cannot read back a spooled image: {exc}") from exc
    if tags != ["svg"]:
        raise _bad_image(f"answer is XML but its root is <{tags[0] if tags else ''}>, not <svg>")


class ImageStore:
    """Writes an item's images under `out_dir/images`, one atomic file each.

    Storing is two steps, so that a batch of items can share the slow part: `stage` writes each
    image to a temp file beside its final name; `publish` fsyncs the temp files and renames
    them into place. `save` does both for one item, plus the directory fsync.
    """

    def __init__(self, out_dir: Path, *, clean: bool = True) -> None:
        self.out_dir = out_dir
        self.images_dir = out_dir / IMAGES_DIR
        self.images_dir.mkdir(parents=True, exist_ok=True)
        if clean:
            self.remove_stale_temps()
        self._dir = str(self.images_dir)
        # Temp names: unique per store (a random tag) and per file (a counter).
        self._temp_tag = uuid.uuid4().hex[:8]
        self._temp_count = itertools.count()
        self._renaming = threading.Lock()  # writer threads may publish the same name at once

    def remove_stale_temps(self) -> None:
        """Delete temp files an interrupted run left (call only while no run writes here)."""
        for stale in self.images_dir.glob(f".*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)

    def file_name(self, stem: str, index: int, fmt: str) -> str:
        return f"{stem}-{index}.{specs.FILE_EXTENSION[fmt]}"

    def save(self, stem: str, images: Sequence[bytes | SpooledImage], fmt: str) -> list[StoredFile]:
        """Store every image of one item durably; return what was stored, in order.

        Raises StorageError (no partial file left behind).
        """
        stored = self.publish(self.stage(stem, images, fmt))
        self.sync_dir()
        return stored

    def stage(self, stem: str, images: Sequence[bytes | SpooledImage], fmt: str) -> list[Staged]:
        """Put each image in a temp file beside its final name: whole, but not yet durable.

        Images the client already spooled to a temp file are taken as they are.
        """
        staged: list[Staged] = []
        try:
            for index, data in enumerate(images):
                staged.append(self._stage_one(self.file_name(stem, index, fmt), data))
        except BaseException as exc:
            self.discard(staged)
            if isinstance(exc, OSError):
                raise StorageError(f"cannot write images to {self.images_dir}: {exc}") from exc
            raise
        return staged

    def _stage_one(self, name: str, data: bytes | SpooledImage) -> Staged:
        if isinstance(data, SpooledImage):
            return Staged(name, str(data.path), data.nbytes, data.sha256)
        temp = f"{self._dir}/.{name}.{self._temp_tag}{next(self._temp_count)}{TEMP_SUFFIX}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return Staged(name, temp, len(data), hashlib.sha256(data).hexdigest())

    def publish(self, staged: Sequence[Staged]) -> list[StoredFile]:
        """fsync the staged files, then rename each into place (an existing file is set
        aside, never overwritten); the directory is not synced. StorageError on failure."""
        stored: list[StoredFile] = []
        try:
            for entry in staged:
                fsync_path(entry.temp, os.O_RDONLY)
            for entry in staged:
                final = f"{self._dir}/{entry.name}"
                with self._renaming:  # look-then-rename: one thread at a time
                    if os.path.lexists(final):
                        self._set_aside(final)
                    os.replace(entry.temp, final)
                stored.append(StoredFile(f"{IMAGES_DIR}/{entry.name}", entry.nbytes, entry.sha256))
        except OSError as exc:
            self.discard(staged)
            raise StorageError(f"cannot write images to {self.images_dir}: {exc}") from exc
        return stored

    def sync_dir(self) -> None:
        """Make the renames durable (one fsync covers every file published before it)."""
        try:
            fsync_path(self._dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise StorageError(f"cannot sync {self.images_dir}: {exc}") from exc

    @staticmethod
    def discard(staged: Sequence[Staged]) -> None:
        """Remove temp files that will not be published (those already renamed are kept)."""
        for entry in staged:
            with contextlib.suppress(OSError):
                os.unlink(entry.temp)

    def _set_aside(self, path: str) -> None:
        """Move a file no ledger line claims out of the way instead of overwriting it."""
        orphans = self.out_dir / ORPHANS_DIR
        orphans.mkdir(exist_ok=True)
        stem, suffix = os.path.splitext(os.path.basename(path))
        os.replace(path, orphans / f"{stem}.{uuid.uuid4().hex[:8]}{suffix}")


@dataclass(frozen=True)
class Staged:
    """An image in its temp file, waiting for `ImageStore.publish`."""

    name: str  # the final file name, inside images/
    temp: str
    nbytes: int
    sha256: str


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[BinaryIO]:
    """Write `final` whole or not at all: into a dot-named temp beside it, fsynced, renamed, the
    directory fsynced; the temp is removed if the block raises."""
    temp = final.with_name(f".{final.name}{TEMP_SUFFIX}")
    try:
        with open(temp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, final)
        fsync_path(str(final.parent), os.O_RDONLY | os.O_DIRECTORY)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    """fsync a file or (with O_DIRECTORY) a directory by path."""
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BatchedStore:
    """Runs `ImageStore` on a few writer threads that take items in batches.

    With many small images the cost is not the writing but the waiting: every file is fsynced,
    and on a busy disk a create or an fsync can take a millisecond. Items queue up while the
    threads are busy; each thread takes what is queued as one batch, writes it, fsyncs it,
    renames it into place, makes it durable with one directory fsync, and hands it back with
    one wake-up of the event loop. Several threads keep several fsyncs in flight, which the
    filesystem can commit together.
    """

    def __init__(self, store: ImageStore, threads: int = WRITER_THREADS) -> None:
        self.store = store
        self.threads = threads
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._started = 0

    async def save(
        self, stem: str, images: Sequence[bytes | SpooledImage], fmt: str
    ) -> list[StoredFile]:
        if self._started == 0 or (self._started < self.threads and not self._jobs.empty()):
            self._start_thread()  # the first, or one more while work queues up
        job = _Job(stem, images, fmt, anyio.Event(), anyio.lowlevel.current_token())
        self._jobs.put(job)
        await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.stored

    def _start_thread(self) -> None:
        name = f"image-writer-{self._started + 1}"
        threading.Thread(target=self._run, name=name, daemon=True).start()
        self._started += 1  # only once it runs: a job is never queued for no thread

    def close(self) -> None:
        """Let the threads end after what is queued. Not joined: a job abandoned by an abort
        would wait for an event loop that is no longer running; its temp file is cleaned up
        on the next start."""
        for _ in range(self._started):
            self._jobs.put(None)
        self._started = 0

    def _take_batch(self) -> list[_Job] | None:
        job = self._jobs.get()
        if job is None:
            return None
        batch = [job]
        while len(batch) < MAX_BATCH:
            try:
                more = self._jobs.get_nowait()
            except queue.Empty:
                break
            if more is None:
                self._jobs.put(None)  # finish this batch, then stop
                break
            batch.append(more)
        return batch

    def _run(self) -> None:
        store = self.store
        while (batch := self._take_batch()) is not None:
            staged: list[tuple[_Job, list[Staged]]] = []
            for job in batch:
                try:
                    staged.append((job, store.stage(job.stem, job.images, job.fmt)))
                except Exception as exc:  # never leave an awaiting item without an answer
                    job.error = _storage_error(exc)
            for job, files in staged:
                try:
                    job.stored = store.publish(files)
                except Exception as exc:
                    job.error = _storage_error(exc)
            try:
                store.sync_dir()  # one fsync makes the whole batch durable
            except StorageError as exc:
                for job in batch:
                    job.error = job.error or exc
            by_loop: dict[Any, list[_Job]] = {}  # tokens of one event loop compare equal
            for job in batch:
                by_loop.setdefault(job.token, []).append(job)
            for token, jobs in by_loop.items():
                try:
                    anyio.from_thread.run_sync(_wake, jobs, token=token)
                except RuntimeError:  # the run's event loop is gone (aborted): nobody waits
                    return


def _storage_error(exc: Exception) -> StorageError:
    return exc if isinstance(exc, StorageError) else StorageError(f"cannot write images: {exc!r}")


@dataclass
class _Job:
    stem: str
    images: Sequence[bytes | SpooledImage]
    fmt: str
    done: anyio.Event
    token: Any
    stored: list[StoredFile] = field(default_factory=list)
    error: StorageError | None = None


def _wake(batch: list[_Job]) -> None:
    for job in batch:
        job.done.set()
