"""Turns API answers into image files: decode, verify, write atomically.

A file appears under `DIR/images/` only whole (temp file in the same directory, fsync, rename),
and an existing file is never overwritten: a leftover from an interrupted earlier attempt is moved
to `DIR/.orphans/` first.
"""

from __future__ import annotations

import binascii
import hashlib
import os
import queue
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def check_format(data: bytes, expected: str) -> None:
    """Raise ItemFailed unless the bytes start with the magic number of `expected`."""
    found = specs.sniff_format(data[:16])
    if found is None:
        raise _bad_image(f"answer is not a PNG, JPEG or WebP image ({len(data)} bytes)")
    if found != expected:
        raise _bad_image(f"asked for {expected}, got {found}")


class ImageStore:
    """Writes an item's images under `out_dir/images`, one atomic file each."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.images_dir = out_dir / IMAGES_DIR
        self.images_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.images_dir.glob(f".*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)

    def file_name(self, stem: str, index: int, fmt: str) -> str:
        return f"{stem}-{index}.{specs.FILE_EXTENSION[fmt]}"

    def save(self, stem: str, images: Sequence[bytes | SpooledImage], fmt: str) -> list[StoredFile]:
        """Store every image of one item durably; return what was stored, in order.

        Bytes are written to a temp file first; images already spooled to a temp file by the
        client are fsynced and renamed. Raises StorageError (no partial file left behind).
        """
        stored = self.write_files(stem, images, fmt)
        try:
            _fsync_dir(self.images_dir)
        except OSError as exc:
            raise StorageError(f"cannot sync {self.images_dir}: {exc}") from exc
        return stored

    def write_files(
        self, stem: str, images: Sequence[bytes | SpooledImage], fmt: str
    ) -> list[StoredFile]:
        """Write (or rename into place) each image, fsynced; the directory is not synced."""
        try:
            return [
                self._write(self.file_name(stem, i, fmt), data) for i, data in enumerate(images)
            ]
        except OSError as exc:
            raise StorageError(f"cannot write images to {self.images_dir}: {exc}") from exc

    def _write(self, name: str, data: bytes | SpooledImage) -> StoredFile:
        final = self.images_dir / name
        if isinstance(data, SpooledImage):
            temp, nbytes, digest = data.path, data.nbytes, data.sha256
        else:
            temp = self.images_dir / f".{name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"
            nbytes, digest = len(data), hashlib.sha256(data).hexdigest()
        try:
            with open(temp, "rb" if isinstance(data, SpooledImage) else "xb") as fh:
                if not isinstance(data, SpooledImage):
                    fh.write(data)
                    fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        if final.exists():
            self._set_aside(final)
        os.replace(temp, final)
        return StoredFile(path=f"{IMAGES_DIR}/{name}", bytes=nbytes, sha256=digest)

    def _set_aside(self, path: Path) -> None:
        """Move a file no ledger line claims out of the way instead of overwriting it."""
        orphans = self.out_dir / ORPHANS_DIR
        orphans.mkdir(exist_ok=True)
        os.replace(path, orphans / f"{path.stem}.{uuid.uuid4().hex[:8]}{path.suffix}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BatchedStore:
    """Runs `ImageStore.save` on one writer thread that takes items in batches.

    With many small images the cost is not the writing but the hand-offs: a thread-pool call
    per item, and a directory fsync per item. Here items queue up while the thread is busy;
    each batch is written, made durable with one directory fsync, and handed back with one
    wake-up of the event loop.
    """

    def __init__(self, store: ImageStore) -> None:
        self.store = store
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def save(
        self, stem: str, images: Sequence[bytes | SpooledImage], fmt: str
    ) -> list[StoredFile]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="image-writer", daemon=True)
            self._thread.start()
        job = _Job(stem, images, fmt, anyio.Event(), anyio.lowlevel.current_token())
        self._jobs.put(job)
        await job.done.wait()
        if job.error is not None:
            raise job.error
        return job.stored

    def close(self) -> None:
        """Let the thread end after what is queued. Not joined: a job abandoned by an abort
        would wait for an event loop that is no longer running; its temp file is cleaned up
        on the next start."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            batch = [job]
            while True:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._jobs.put(None)  # finish this batch, then stop
                    break
                batch.append(more)
            for item in batch:
                try:
                    item.stored = self.store.write_files(item.stem, item.images, item.fmt)
                except StorageError as exc:
                    item.error = exc
                except Exception as exc:  # never leave an awaiting item without an answer
                    item.error = StorageError(f"cannot write images: {exc!r}")
            try:
                _fsync_dir(self.store.images_dir)  # one fsync makes the whole batch durable
            except OSError as exc:
                for item in batch:
                    item.error = item.error or StorageError(f"cannot sync images: {exc}")
            for token in {id(item.token): item.token for item in batch}.values():
                try:
                    anyio.from_thread.run_sync(_wake, batch, token=token)
                except RuntimeError:  # the run's event loop is gone (aborted): nobody waits
                    return


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
