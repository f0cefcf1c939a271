"""A compact set of ids: about 6 bytes an id instead of a Python `set`'s ~100.

The loader must remember every id it has seen (duplicates are errors) and resume must remember
every id already done; for a manifest of millions of lines a plain set would grow memory by
hundreds of megabytes. Each id is hashed to 64 bits (Python's own string hash, SipHash with a
key drawn per process: the set lives only in memory): 40 bits are stored, in slots of 5 bytes
grouped into buckets of 32, and the other 24 pick the bucket (so they need not be stored). A
full bucket spills into the next one. A lookup compares its 40 bits against the ~30 entries of
the bucket it reads, so a false "already there" has odds of a few times 1e-11 a lookup: about
1e-4 over a million-line manifest.

Because the bucket bits are not stored, a table cannot be rehashed into a bigger one. Sized
from a hint (the caller counts lines first), it never needs to be; when more ids come than the
hint promised, a new table four times the size is chained after it and takes the new ids.
Buckets of 32 keep probes short at 90 % load: a lookup reads about one bucket (160 bytes) and
searches it with `bytes.find`, so the Python-level work per id is a handful of calls.
"""

from __future__ import annotations

import math
import os
import stat
import sys
from hashlib import blake2b

_WIDTH = 5  # bytes stored per id
_PER_BUCKET = 32
_BUCKET = _WIDTH * _PER_BUCKET
_EMPTY = bytes(_WIDTH)  # never stored: an all-zero hash is remapped, like a tombstone's
_DELETED = b"\xff" * _WIDTH
_MAX_LOAD = 0.9
_HASH_BITS = sys.hash_info.width


def _hash(key: str) -> tuple[bytes, int]:
    """(the 5 bytes stored, the number that picks the bucket)."""
    if _HASH_BITS == 64:
        h = hash(key) & 0xFFFF_FFFF_FFFF_FFFF
    else:  # a 32-bit build: its string hash is too short, so a slower 64-bit digest
        h = int.from_bytes(blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    stored = (h & 0xFF_FFFF_FFFF).to_bytes(_WIDTH, "little")
    if stored in (_EMPTY, _DELETED):  # reserved markers
        stored = b"\x01" + stored[1:]
    return stored, h >> 40


def _aligned_find(chunk: bytes | bytearray, pattern: bytes) -> int:
    """Offset of pattern at a slot boundary in chunk, or -1."""
    i = chunk.find(pattern)
    while i > 0 and i % _WIDTH:
        i = chunk.find(pattern, i + 1)
    return i


class _Table:
    """A fixed-size table of 5-byte slots in buckets; never resized.

    A bucket's slots fill from the left and never empty again (a discarded id leaves a
    tombstone), so one byte a bucket, `used`, says where its first empty slot is: a lookup
    searches only the used part, and stops at the first bucket that is not full.
    """

    __slots__ = ("buckets", "capacity", "data", "filled", "limit", "tombstones", "used")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.buckets = math.ceil(self.capacity / _MAX_LOAD / _PER_BUCKET)
        self.data = bytearray(self.buckets * _BUCKET)
        self.used = bytearray(self.buckets)
        # Used slots stay below the slot count: every probe meets a bucket that is not full.
        slots = self.buckets * _PER_BUCKET
        self.limit = min(int(slots * _MAX_LOAD), slots - 1)
        self.filled = 0
        self.tombstones = 0

    def find(self, stored: bytes, h: int) -> int:
        """Offset of the id's slot, or -1."""
        data, used, buckets = self.data, self.used, self.buckets
        bucket = h % buckets
        while True:
            count = used[bucket]
            start = bucket * _BUCKET
            if count:
                chunk = data[start : start + count * _WIDTH]
                if (i := _aligned_find(chunk, stored)) >= 0:
                    return start + i
            if count < _PER_BUCKET:
                return -1
            bucket = bucket + 1 if bucket + 1 < buckets else 0

    def insert(self, stored: bytes, h: int) -> bool:
        """Store an id known to be absent; False when the table is full."""
        data, used, buckets = self.data, self.used, self.buckets
        bucket = h % buckets
        if self.tombstones:  # reuse the first tombstone on the id's probe path, if any
            probe = bucket
            while True:
                count, start = used[probe], probe * _BUCKET
                if (i := _aligned_find(data[start : start + count * _WIDTH], _DELETED)) >= 0:
                    data[start + i : start + i + _WIDTH] = stored
                    self.tombstones -= 1
                    return True
                if count < _PER_BUCKET:
                    break
                probe = probe + 1 if probe + 1 < buckets else 0
        if self.filled >= self.limit:
            return False
        while used[bucket] >= _PER_BUCKET:
            bucket = bucket + 1 if bucket + 1 < buckets else 0
        offset = bucket * _BUCKET + used[bucket] * _WIDTH
        data[offset : offset + _WIDTH] = stored
        used[bucket] += 1
        self.filled += 1
        return True


class IdSet:
    """A set of strings supporting add, discard and membership; iteration is not offered."""

    def __init__(self, capacity: int = 1024) -> None:
        self._tables = [_Table(capacity)]
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def _locate(self, stored: bytes, h: int) -> tuple[_Table, int] | None:
        for table in self._tables:
            if (offset := table.find(stored, h)) >= 0:
                return table, offset
        return None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._locate(*_hash(key)) is not None

    def add(self, key: str) -> bool:
        """Add key; True if it was not there before."""
        stored, h = _hash(key)
        tables = self._tables
        for table in tables:
            if table.find(stored, h) >= 0:
                return False
        if not tables[-1].insert(stored, h):
            table = _Table(tables[-1].capacity * 4)
            tables.append(table)
            table.insert(stored, h)
        self._len += 1
        return True

    def discard(self, key: str) -> None:
        located = self._locate(*_hash(key))
        if located is not None:
            table, offset = located
            table.data[offset : offset + _WIDTH] = _DELETED
            table.tombstones += 1
            self._len -= 1


def count_lines(path: str | os.PathLike[str]) -> int:
    """Newlines in a regular file (fast: no parsing), to size an IdSet before reading it.

    A pipe or other stream cannot be read twice: for those, a small default.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        return 1024
    count = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            count += chunk.count(b"\n")
    return count + 1
