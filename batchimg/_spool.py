"""Decode an ImagesResponse while it streams in: each `b64_json` goes straight to a temp file.

A photo-sized answer is ~3.4 MB of base64. Reading it whole, parsing it into a string and
decoding that holds three copies per request in flight; this parser holds one network chunk
(and up to `SPILL_BYTES` of a small image, which never touches a temp file at all).
Everything outside the base64 values (usage, sizes, error envelopes) is kept and parsed with
orjson at the end, with each `b64_json` value left as an empty string and its image returned as
a `SpooledImage` in order. Temp files go in the directory the caller gives (the output store's
temp area), from where the store puts them in place atomically, or cleans them up on the next
start.

The network chunks in the middle of a value are nothing but base64: each is decoded in one
call, straight from the chunk, and its bytes written with one system call. Only a chunk that
holds something else (the value's start, its closing quote, an escape, a cut-off prefix) is
looked at closely; a chunk that is not plain base64 always takes that careful path, so both
paths give the same answer.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pybase64

_KEY = re.compile(rb'"b64_json"\s*:\s*"')
_KEY_MAX = 64  # longest stretch a split key may hide in (key, blanks, colon, quote)
_ESCAPES = {b"\\/": b"/", b"\\n": b"", b"\\r": b""}
_DATA_URI = b"data:"
_PREFIX_MAX = 1024  # a data: URI prefix longer than this is not one (decoding it then fails)
SPILL_BYTES = 256 * 1024  # decoded images larger than this stream to a temp file
HEAD_BYTES = 64  # kept in memory for the format check (an SVG may start with a BOM and blanks)
#: Stretches of a value at least this long are first decoded in one go, as plain base64.
STREAM_BYTES = 16 * 1024
_BASE64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_PAD = ord("=")

Chunk = bytes | bytearray | memoryview


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
    (in the spool directory: the store's temp area), hashed on the way.

    An image small enough to stay in memory is not hashed here: it comes back as bytes, and the
    writer hashes it when it stores it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path: Path | None = None
        self.fd = -1  # the temp file once spilled: written with os.write, no buffer between
        self.held: list[Chunk] = []  # the image so far, while it is small
        self.hash: hashlib._Hash  # made when it spills (a small image is hashed by the writer)
        self.nbytes = 0
        self.head = b""  # the first bytes, for the format check

    def write(self, data: Chunk, before: Chunk = b"") -> None:
        """Take the next bytes of the image: `before`, then `data` (written with one call)."""
        self.nbytes += len(before) + len(data)
        if self.fd < 0:
            if self.nbytes <= SPILL_BYTES:
                if before:
                    self.held.append(before)
                self.held.append(data)
                return
            self._spill([b"".join(self.held), before, data])  # one piece: not copied
        else:
            if before:
                self.hash.update(before)
            self.hash.update(data)
            _write_all(self.fd, [before, data] if before else [data])

    def _spill(self, pieces: list[Chunk]) -> None:
        """Big: the temp file is opened, and what was held in memory goes first."""
        self.path = self.directory / f".spool-{uuid.uuid4().hex}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self.fd = os.open(self.path, flags, 0o644)  # closed in finish/abort
        self.held = []
        self.hash = hashlib.sha256()
        head = bytearray()
        for piece in pieces:
            head += piece[: HEAD_BYTES - len(head)]
            self.hash.update(piece)
        self.head = bytes(head)
        _write_all(self.fd, pieces)

    def finish(self) -> bytes | SpooledImage:
        """Small images come back as bytes; big ones as a temp file (fsynced when stored)."""
        if self.fd < 0 or self.path is None:
            return b"".join(self.held)  # one piece of bytes: that very object, no copy
        os.close(self.fd)
        self.fd = -1
        return SpooledImage(self.path, self.nbytes, self.hash.hexdigest(), self.head)

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _write_all(fd: int, pieces: list[Chunk]) -> None:
    written = os.writev(fd, pieces)
    if written < sum(map(len, pieces)):  # a short write (rare on a regular file): the rest
        rest = memoryview(b"".join(pieces))[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]


class _Target(ImageSink):
    """One b64_json value being decoded into its sink."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.pending = b""  # base64 characters not yet a multiple of 4
        self.padded = False  # a quantum ending in `=` was decoded: the value must end there
        self.prefix: bytes | None = b""  # until known: the start of the value (data: URI?)

    def stream(self, chunk: Chunk) -> bool:
        """Decode a stretch of the value that is nothing but base64 (no closing quote, no
        escape) in one call, straight from the chunk; False, having changed nothing, if it is
        short or holds anything else (`feed` then takes it apart)."""
        if self.padded or len(chunk) < STREAM_BYTES or chunk[-1] not in _BASE64:
            return False  # a chunk that does not end in base64 holds the value's end
        need = -len(self.pending) % 4  # characters that complete the quantum held back
        cut = len(chunk) - (len(chunk) - need) % 4
        left = bytes(chunk[cut:])
        bridge = self.pending + chunk[:need]
        if b'"' in left or b"\\" in left or bridge.endswith(b"="):
            return False
        try:  # base64 has no quotes, backslashes or inner padding: one of them fails this
            decoded = pybase64.b64decode(memoryview(chunk)[need:cut], validate=True)
            joined = pybase64.b64decode(bridge, validate=True) if bridge else b""
        except ValueError:
            return False
        self.pending = left
        self.padded = chunk[cut - 1] == _PAD
        self.write(decoded, before=joined)
        return True

    def feed(self, raw: Chunk) -> None:
        """Decode the next stretch of the value (no quote, escapes already undone). Whole
        4-character quanta are decoded straight from the chunk (no copy of it); the few
        characters left over wait for the next one."""
        data = memoryview(raw)
        joined = b""
        if self.pending:  # finish the quantum the last chunk cut in two
            need = 4 - len(self.pending)
            bridge = self.pending + data[:need]
            if len(bridge) < 4:
                self.pending = bridge
                return
            self.pending = b""
            joined = self._decode(bridge)
            data = data[need:]
        cut = len(data) - len(data) % 4
        if cut < len(data):
            self.pending = bytes(data[cut:])
            data = data[:cut]
        if cut:
            self.write(self._decode(data), before=joined)
        elif joined:
            self.write(joined)

    def _decode(self, data: Chunk) -> bytes:
        if self.padded:  # `=` ends a base64 value: nothing may follow it
            raise BadBase64("b64_json does not decode: data after the '=' padding")
        try:
            decoded = pybase64.b64decode(data, validate=True)
        except ValueError as exc:
            raise BadBase64(f"b64_json does not decode: {exc}") from None
        self.padded = data[-1] == _PAD
        return decoded

    def finish(self) -> bytes | SpooledImage:
        if self.pending:
            raise BadBase64("b64_json ends in the middle of a base64 quantum")
        return super().finish()


class ResponseSpool:
    """Feed it the body's chunks in order, then `finish()` for (parsed JSON, images)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._json = bytearray()  # everything but the base64 values
        self._tail = b""  # the end of the text outside, where a key cut by a chunk may start
        self._fresh = 0  # where the text after the last key matched starts (never rescanned)
        self._target: _Target | None = None
        self._escape = b""  # a backslash that ended the last chunk
        self._done: list[bytes | SpooledImage] = []

    def feed(self, chunk: Chunk) -> None:
        while chunk:
            if self._target is None:
                chunk = self._outside(chunk)
            else:
                chunk = self._inside(chunk, self._target)

    def _outside(self, chunk: Chunk) -> Chunk:
        """Keep the text up to the next b64_json value; the rest is that value's."""
        end = -1
        if self._tail:  # a key the last chunk cut in two (one matched before never is again)
            match = _KEY.search(self._tail + bytes(chunk[:_KEY_MAX]))
            if match is not None and match.start() < len(self._tail):
                end = match.end() - len(self._tail)
        if end < 0:
            match = _KEY.search(chunk)
            if match is None:
                self._json += chunk
                self._tail = bytes(self._json[max(self._fresh, len(self._json) - _KEY_MAX) :])
                return b""
            end = match.end()
        view = memoryview(chunk)
        self._json += view[:end]
        self._tail = b""
        self._fresh = len(self._json)
        self._target = _Target(self.directory)
        return view[end:]

    def _inside(self, chunk: Chunk, target: _Target) -> Chunk:
        if target.prefix is not None:
            chunk = _skip_prefix(chunk, target)
            if not chunk:
                return b""
        if not self._escape and target.stream(chunk):
            return b""
        return self._careful(chunk, target)

    def _careful(self, chunk: Chunk, target: _Target) -> Chunk:
        """A stretch that may end the value or hold escapes: cut at the closing quote, undo
        the escapes base64 may carry, and decode what is left."""
        data = self._escape + chunk if self._escape else bytes(chunk)  # bytes: not copied
        self._escape = b""
        end = _closing_quote(data)
        stop = len(data) if end < 0 else end
        if end < 0 and data.endswith(b"\\"):
            stop, self._escape = stop - 1, b"\\"
        value: Chunk = memoryview(data)[:stop]
        if data.find(b"\\", 0, stop) >= 0:
            escaped = data[:stop]
            for sequence, plain in _ESCAPES.items():
                escaped = escaped.replace(sequence, plain)
            value = escaped
        target.feed(value)
        if end < 0:
            return b""
        self._done.append(target.finish())
        self._target = None
        return memoryview(data)[end:]

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


def _skip_prefix(chunk: Chunk, target: _Target) -> Chunk:
    """At a value's start: drop a `data:image/...;base64,` prefix, if there is one. Returns
    the rest of the chunk; b"" while the chunk ends before it is known (kept in the target)."""
    if target.prefix:  # the last chunk ended inside what may be a prefix (rare: a copy)
        chunk = target.prefix + chunk
    target.prefix = None
    start = bytes(chunk[: len(_DATA_URI)])
    if not _DATA_URI.startswith(start):
        return chunk
    text = bytes(chunk[:_PREFIX_MAX])
    comma, quote = text.find(b","), _closing_quote(text)
    if comma >= 0 and (quote < 0 or comma < quote):
        return memoryview(chunk)[comma + 1 :]
    if quote >= 0 or len(text) >= _PREFIX_MAX:
        return chunk  # no prefix after all: the value is decoded as it is, and fails to
    target.prefix = bytes(chunk)
    return b""


def _closing_quote(chunk: bytes) -> int:
    """Index of the first unescaped `"` (base64 has no quotes, so escapes are rare)."""
    start = 0
    while True:
        index = chunk.find(b'"', start)
        if index <= 0 or chunk[index - 1 : index] != b"\\":
            return index
        start = index + 1
