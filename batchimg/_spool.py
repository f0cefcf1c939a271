"""Decode an ImagesResponse while it streams in: each `b64_json` goes straight to a temp file.

A photo-sized answer is ~3.4 MB of base64. Reading it whole, parsing it into a string and
decoding that holds three copies per request in flight; this parser holds one network chunk
(and up to `SPILL_BYTES` of a small image, which never touches a temp file at all).
Everything outside the base64 values (usage, sizes, error envelopes) is kept and parsed with
orjson at the end, with each `b64_json` value left as an empty string and its image returned as
a `SpooledImage` in order. Temp files go in the directory the caller gives (the output store's
temp area), from where the store puts them in place atomically, or cleans them up on the next
start.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import pybase64

_KEY = re.compile(rb'"b64_json"\s*:\s*"')
_KEY_MAX = 64  # longest stretch a split key may hide in (key, blanks, colon, quote)
_ESCAPES = {b"\\/": b"/", b"\\n": b"", b"\\r": b""}
SPILL_BYTES = 256 * 1024  # decoded images larger than this stream to a temp file
HEAD_BYTES = 64  # kept in memory for the format check (an SVG may start with a BOM and blanks)


class SpoolError(ValueError):
    """The body is not the JSON it claims to be (cut off, or not JSON at all)."""


class BadBase64(SpoolError):
    """A b64_json value that does not decode: the answer arrived whole but is broken."""


@dataclass(frozen=True)
class SpooledImage:
    """One decoded image, on disk under a temp name."""

    path: Path
    nbytes: int
    sha256: str
    head: bytes  # the first bytes, for the format check


class ImageSink:
    """Bytes of one image as they arrive: in memory while small, then spilled to a temp file
    (in the spool directory: the store's temp area), hashed on the way."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path: Path | None = None
        self.file: BinaryIO | None = None
        self.buffer = bytearray()
        self.hash = hashlib.sha256()
        self.nbytes = 0
        self.head = b""  # the first bytes, for the format check

    def write(self, data: bytes | memoryview) -> None:
        self.hash.update(data)
        self.nbytes += len(data)
        if self.file is not None:
            self.file.write(data)
            return
        self.buffer += data
        if len(self.buffer) > SPILL_BYTES:  # big: stream the rest to disk, hold nothing
            self.head = bytes(self.buffer[:HEAD_BYTES])
            self.path = self.directory / f".spool-{uuid.uuid4().hex}.part"
            self.file = open(self.path, "wb")  # noqa: SIM115 - closed in finish/abort
            self.file.write(self.buffer)
            self.buffer = bytearray()

    def finish(self) -> bytes | SpooledImage:
        """Small images come back as bytes; big ones as a temp file (fsynced when stored)."""
        if self.file is None or self.path is None:
            return bytes(self.buffer)
        self.file.close()
        return SpooledImage(self.path, self.nbytes, self.hash.hexdigest(), self.head)

    def abort(self) -> None:
        if self.file is not None and self.path is not None:
            self.file.close()
            self.path.unlink(missing_ok=True)


class _Target(ImageSink):
    """One b64_json value being decoded into its sink."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.pending = b""  # base64 characters not yet a multiple of 4
        self.padded = False  # a quantum ending in `=` was decoded: the value must end there
        self.prefix: bytes | None = b""  # until known: the start of the value (data: URI?)

    def feed(self, raw: bytes) -> None:
        """Decode the next stretch of the value. Whole 4-character quanta are decoded straight
        from the chunk (no copy of it); the few characters left over wait for the next one."""
        data: bytes | memoryview = raw
        if self.pending:  # finish the quantum the last chunk cut in two
            need = 4 - len(self.pending)
            bridge = self.pending + raw[:need]
            if len(bridge) < 4:
                self.pending = bridge
                return
            self.pending = b""
            self._decode(bridge)
            data = memoryview(raw)[need:]
        cut = len(data) - len(data) % 4
        if cut < len(data):
            self.pending = bytes(data[cut:])
            data = memoryview(data)[:cut]
        if cut:
            self._decode(data)

    def _decode(self, data: bytes | memoryview) -> None:
        if self.padded:  # `=` ends a base64 value: nothing may follow it
            raise BadBase64("b64_json does not decode: data after the '=' padding")
        try:
            decoded = pybase64.b64decode(data, validate=True)
        except ValueError as exc:
            raise BadBase64(f"b64_json does not decode: {exc}") from None
        self.padded = data[-1:] == b"="
        self.write(decoded)

    def finish(self) -> bytes | SpooledImage:
        if self.pending:
            raise BadBase64("b64_json ends in the middle of a base64 quantum")
        return super().finish()


class ResponseSpool:
    """Feed it the body's chunks in order, then `finish()` for (parsed JSON, images)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._json = bytearray()  # everything but the base64 values
        self._scan_from = 0
        self._target: _Target | None = None
        self._escape = b""  # a backslash that ended the last chunk
        self._done: list[bytes | SpooledImage] = []

    def feed(self, chunk: bytes) -> None:
        while chunk:
            if self._target is None:
                chunk = self._outside(chunk)
            else:
                chunk = self._inside(chunk, self._target)

    def _outside(self, chunk: bytes) -> bytes:
        self._json += chunk
        match = _KEY.search(self._json, self._scan_from)
        if match is None:
            # a key may be split across chunks, but one already matched is never matched again
            self._scan_from = max(self._scan_from, len(self._json) - _KEY_MAX)
            return b""
        rest = bytes(self._json[match.end() :])
        del self._json[match.end() :]
        self._scan_from = len(self._json)
        self._target = _Target(self.directory)
        return rest

    def _inside(self, chunk: bytes, target: _Target) -> bytes:
        chunk = self._escape + chunk
        self._escape = b""
        end = _closing_quote(chunk)
        value, rest = (chunk, b"") if end < 0 else (chunk[:end], chunk[end:])
        if end < 0 and value.endswith(b"\\"):
            value, self._escape = value[:-1], b"\\"
        if b"\\" in value:
            for escaped, plain in _ESCAPES.items():
                value = value.replace(escaped, plain)
        if target.prefix is not None:  # strip a data:image/...;base64, prefix if there is one
            value = target.prefix + value
            target.prefix = None
            if value.startswith(b"data:") or b"data:".startswith(value):
                comma = value.find(b",")
                if comma >= 0:
                    value = value[comma + 1 :]
                elif end < 0:
                    target.prefix = value  # wait for the rest of the prefix
                    return rest
        target.feed(value)
        if end >= 0:
            self._done.append(target.finish())
            self._target = None
        return rest

    @property
    def json_bytes(self) -> int:
        """How much of the body is not image data (usage, sizes: a few hundred bytes)."""
        return len(self._json)

    def finish(self) -> tuple[Any, list[bytes | SpooledImage]]:
        """The parsed JSON (b64_json values empty) and the images; SpoolError if broken."""
        if self._target is not None:
            self.abort()
            raise SpoolError("the body ended inside a b64_json value")
        try:
            parsed = orjson.loads(self._json)
        except orjson.JSONDecodeError as exc:
            self.abort()
            raise SpoolError(f"not JSON ({len(self._json)} bytes outside images): {exc}") from None
        return parsed, self._done

    def abort(self) -> None:
        """Remove every temp file this spool made (the answer will not be kept)."""
        if self._target is not None:
            self._target.abort()
            self._target = None
        discard(self._done)
        self._done = []


def discard(images: Sequence[bytes | SpooledImage]) -> None:
    """Remove spooled images that will not be kept (in-memory ones need nothing)."""
    for image in images:
        if isinstance(image, SpooledImage):
            image.path.unlink(missing_ok=True)


def _closing_quote(chunk: bytes) -> int:
    """Index of the first unescaped `"` (base64 has no quotes, so escapes are rare)."""
    start = 0
    while True:
        index = chunk.find(b'"', start)
        if index <= 0 or chunk[index - 1 : index] != b"\\":
            return index
        start = index + 1
