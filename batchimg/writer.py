"""Turns API answers into image files: decode, verify, write atomically through a Store.

A file appears under `images/` only whole (a temp file in the store's temp area, then
`Store.put`), and an existing file is never overwritten: the store sets a leftover from an
interrupted earlier attempt aside first (a local directory: under `DIR/.orphans/`).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from xml.parsers import expat

import pybase64

from . import specs
from ._spool import SpooledImage
from .errors import ErrorInfo, ItemFailed, StorageError, StoreRefused
from .stores import Store
from .stores.local import fsync_path, write_new

IMAGES_DIR = "images"
TEMP_SUFFIX = ".part"
WRITER_THREADS = 4  # for a store that says nothing (a local disk says 1: see BatchedWriter)
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


class ImageWriter:
    """Writes an item's images into a store as `images/{stem}-{index}.{ext}`, one atomic file
    each (see `stores.Store.put`).

    Storing is two steps, so that a batch of items can share the slow part: `stage` writes each
    image to a temp file in the store's temp area; `publish` puts the temp files in place.
    `save` does both for one item, plus the store's `sync`.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        #: A store that makes a temp durable as it writes it (a local disk; see `stores.base`).
        self._write_temp: Callable[[str, bytes], str] | None = getattr(store, "write_temp", None)
        #: A store that makes a batch of temps durable at once (a local disk: one syncfs).
        self._settle: Callable[[Sequence[str]], None] | None = getattr(store, "settle", None)

    def file_name(self, stem: str, index: int, fmt: str) -> str:
        return f"{stem}-{index}.{specs.FILE_EXTENSION[fmt]}"

    def save(self, stem: str, images: Sequence[bytes | SpooledImage], fmt: str) -> list[StoredFile]:
        """Store every image of one item durably; return what was stored, in order.

        Raises StorageError (no partial file left behind).
        """
        staged = self.stage(stem, images, fmt)
        self.settle([staged])
        stored = self.publish(staged)
        self.sync()
        return stored

    def stage(self, stem: str, images: Sequence[bytes | SpooledImage], fmt: str) -> list[Staged]:
        """Put each image in a temp file: whole, but not yet durable or in place.

        Images the backend already spooled into the temp area are taken as they are.
        """
        staged: list[Staged] = []
        try:
            for index, data in enumerate(images):
                staged.append(self._stage_one(self.file_name(stem, index, fmt), data))
        except BaseException as exc:
            self.discard(staged)
            if isinstance(exc, OSError):
                raise StorageError(f"cannot write images to {self.where}: {exc}") from exc
            raise
        return staged

    @property
    def where(self) -> str:
        return f"{self.store.location}/{IMAGES_DIR}"

    def _stage_one(self, name: str, data: bytes | SpooledImage) -> Staged:
        if isinstance(data, SpooledImage):
            return Staged(name, str(data.path), data.nbytes, data.sha256)
        if self._write_temp is not None:  # a local disk: durable once settled
            return Staged(name, self._write_temp(name, data), len(data), _sha256(data))
        temp = str(self.store.new_temp(name))
        write_new(temp, data, sync=False)  # fsynced, or uploaded, by `put`
        return Staged(name, temp, len(data), _sha256(data))

    def settle(self, staged: Sequence[Sequence[Staged]]) -> None:
        """Make the staged files of one or more items durable before they are put, where the
        store does that for many at once (`stores.base`: a local disk's one syncfs).
        StorageError if it cannot: the files are removed."""
        if self._settle is None:
            return
        try:
            self._settle([entry.temp for files in staged for entry in files])
        except BaseException as exc:
            for files in staged:
                self.discard(files)
            if isinstance(exc, OSError):
                raise StorageError(f"cannot sync images to {self.where}: {exc}") from exc
            raise

    def publish(self, staged: Sequence[Staged]) -> list[StoredFile]:
        """Put the staged files in place (an existing file is set aside, never overwritten);
        not yet synced. StorageError on failure."""
        stored: list[StoredFile] = []
        try:
            for entry in staged:
                name = f"{IMAGES_DIR}/{entry.name}"
                self.store.put(name, Path(entry.temp))
                stored.append(StoredFile(name, entry.nbytes, entry.sha256))
        except StoreRefused as exc:
            # Paid for: the files not put are parked locally (where the store can), for the
            # next run to put, and said in `exc.kept` with those put, so the item is not lost.
            park = getattr(self.store, "park", None)
            rest = staged[len(stored) :]
            if park is None:
                self.discard(rest)
                raise
            for entry in rest:
                name = f"{IMAGES_DIR}/{entry.name}"
                park(name, Path(entry.temp))
                stored.append(StoredFile(name, entry.nbytes, entry.sha256))
            exc.kept = stored
            raise
        except StorageError:
            self.discard(staged)
            raise
        except OSError as exc:
            self.discard(staged)
            raise StorageError(f"cannot write images to {self.where}: {exc}") from exc
        return stored

    def hold(self, record: Mapping[str, Any]) -> None:
        """Keep the line of an item whose files are parked (see `publish`) for the next run."""
        self.store.hold(record)  # type: ignore[attr-defined]  # only stores that park

    def sync(self) -> None:
        """Make what was published durable (one sync covers every file put before it)."""
        try:
            self.store.sync()
        except OSError as exc:
            raise StorageError(f"cannot sync {self.where}: {exc}") from exc

    @staticmethod
    def discard(staged: Sequence[Staged]) -> None:
        """Remove temp files that will not be published (those already put are kept)."""
        for entry in staged:
            with contextlib.suppress(OSError):
                os.unlink(entry.temp)


@dataclass(frozen=True)
class Staged:
    """An image in its temp file, waiting for `ImageWriter.publish`."""

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


class BatchedWriter:
    """Runs `ImageWriter` on writer threads that take items in batches.

    With many small images the cost is not the writing but the waiting: every file is made
    durable, and on a busy disk a create or an fsync can take a millisecond, which the event
    loop must not wait for. Items queue up while a thread is busy; a thread takes what is
    queued as one batch, writes each file to a temp, makes the batch's bytes durable (a local
    disk: one syncfs where that is as safe, else an fsync of each file through the descriptor
    that wrote it), renames each into place, makes the renames durable with one directory
    fsync, and hands the batch back with one wake-up of the event loop, without waiting for
    the loop to take it.

    A local disk asks for one thread (`LocalStore.writer_threads`): measured on 1,500 small
    images, more threads cost more CPU than they save in wall time, since each syscall a
    thread makes hands the interpreter's lock back and forth with the event loop. A store
    whose `put` waits on the network asks for more (a bucket: 16); one that says nothing gets
    `WRITER_THREADS`.
    """

    def __init__(
        self, writer: ImageWriter, threads: int = WRITER_THREADS, batch: int = MAX_BATCH
    ) -> None:
        self.writer = writer
        self.threads = threads
        self.batch = batch  # the most items one thread takes at a time
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._started = 0
        self._busy = 0  # threads writing a batch now
        self._busy_lock = threading.Lock()
        self._handing: list[_Job] = []  # saves of this turn of the loop, not yet queued

    async def save(
        self, stem: str, images: Sequence[bytes | SpooledImage], fmt: str
    ) -> list[StoredFile]:
        loop = asyncio.get_running_loop()
        job = _Job(stem, images, fmt, loop.create_future())
        if not self._handing:  # the first of this turn of the loop: hand them over after it
            loop.call_soon(self._hand_over)
        self._handing.append(job)
        await job.done
        if job.error is not None:
            raise job.error
        return job.stored

    def _hand_over(self) -> None:
        """Queue the items that came during one turn of the event loop together: a thread
        wakes once for them and takes them as one batch (one directory fsync, one wake-up
        back), where queueing each as it came would wake it for the first alone."""
        jobs, self._handing = self._handing, []
        for index, job in enumerate(jobs):
            if self._started < self.threads and self._busy + self._jobs.qsize() >= self._started:
                try:
                    self._start_thread()  # the first, or one more while every thread has work
                except RuntimeError as exc:  # the system refuses a thread
                    if not self._started:  # and none runs: these items cannot be written
                        error = StorageError(f"cannot start a writer thread: {exc}")
                        for waiting in jobs[index:]:
                            waiting.error = error
                        _wake(jobs[index:])
                        return
            self._jobs.put(job)

    def _start_thread(self) -> None:
        name = f"image-writer-{self._started + 1}"
        threading.Thread(target=self._run, name=name, daemon=True).start()
        self._started += 1  # only once it runs: a job is never queued for no thread

    def hold(self, record: Mapping[str, Any]) -> None:
        self.writer.hold(record)

    def close(self) -> None:
        """Let the threads end after what is queued. Not joined: a job abandoned by an abort
        would wait for an event loop that is no longer running; its temp file is cleaned up
        on the next start."""
        if self._handing:  # a turn's saves not handed over yet go before the threads stop
            self._hand_over()
        for _ in range(self._started):
            self._jobs.put(None)
        self._started = 0

    def _take_batch(self) -> list[_Job] | None:
        job = self._jobs.get()
        if job is None:
            return None
        batch = [job]
        while len(batch) < self.batch:
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
        while (batch := self._take_batch()) is not None:
            with self._busy_lock:
                self._busy += 1
            try:
                if not self._write(batch):
                    return
            finally:
                with self._busy_lock:
                    self._busy -= 1

    def _write(self, batch: list[_Job]) -> bool:
        """Stage, put and sync one batch, then wake its items; False if nobody waits."""
        store = self.writer
        staged: list[tuple[_Job, list[Staged]]] = []
        for job in batch:
            try:
                staged.append((job, store.stage(job.stem, job.images, job.fmt)))
            except Exception as exc:  # never leave an awaiting item without an answer
                job.error = _storage_error(exc)
        try:
            store.settle([files for _, files in staged])  # one sync for the batch's bytes
        except Exception as exc:  # every item of the batch fails (its files are removed)
            error = _storage_error(exc)
            for job, _ in staged:
                job.error = error
            staged = []
        for job, files in staged:
            try:
                job.stored = store.publish(files)
            except Exception as exc:
                job.error = _storage_error(exc)
        try:
            store.sync()  # one sync makes the whole batch durable
        except Exception as exc:  # whatever a store raises, every item here gets an answer
            error = _storage_error(exc)
            for job in batch:
                job.error = job.error or error
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        for job in batch:
            by_loop.setdefault(job.done.get_loop(), []).append(job)
        for loop, jobs in by_loop.items():
            try:  # one wake-up of the loop for the batch; the thread does not wait for it
                loop.call_soon_threadsafe(_wake, jobs)
            except RuntimeError:  # the run's event loop is gone (aborted): nobody waits
                return False
        return True


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _storage_error(exc: Exception) -> StorageError:
    return exc if isinstance(exc, StorageError) else StorageError(f"cannot write images: {exc!r}")


@dataclass
class _Job:  # documented: for a class without a docstring, dataclass runs inspect.signature
    """One item's images on their way to the store."""

    stem: str
    images: Sequence[bytes | SpooledImage]
    fmt: str
    done: asyncio.Future[None]  # set on its loop once the job is written (or failed)
    stored: list[StoredFile] = field(default_factory=list)
    error: StorageError | None = None


def _wake(batch: list[_Job]) -> None:
    for job in batch:
        if not job.done.done():  # cancelled: nobody waits
            job.done.set_result(None)
