"""Turns API answers into image files: decode, verify, write atomically.

A file appears under `DIR/images/` only whole (temp file in the same directory, fsync, rename),
and an existing file is never overwritten: a leftover from an interrupted earlier attempt is moved
to `DIR/.orphans/` first.
"""

from __future__ import annotations

import binascii
import hashlib
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
        try:
            stored = [
                self._write(self.file_name(stem, i, fmt), data) for i, data in enumerate(images)
            ]
            _fsync_dir(self.images_dir)
        except OSError as exc:
            raise StorageError(f"cannot write images to {self.images_dir}: {exc}") from exc
        return stored

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
