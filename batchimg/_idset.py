"""A compact set of ids: about 6 bytes an id instead of a Python `set`'s ~100.

The loader must remember every id it has seen (duplicates are errors) and resume must remember
every id already done; for a manifest of millions of lines a plain set would grow memory by
hundreds of megabytes. Each id is hashed to 64 bits (Python's own string hash, SipHash with a
key drawn per process: the set lives only in memory): 40 bits are stored, and the other 24
pick the bucket (so they need not be stored). A bucket is one `bytes` object holding its ids'
5-byte fingerprints end to end, about 64 of them when the set holds as many ids as it was
sized for: a lookup is one `in` over a few hundred bytes, an add one concatenation, so the
Python-level work per id is a handful of operations. A false "already there" needs another
id with the same 64 bits but for the bucket's 24 among the ~64 in its bucket: odds of about
6e-11 a lookup, 6e-5 over a million-line manifest.

Because the bucket bits are not stored, a table cannot be rehashed into a bigger one. Sized
from a hint (the caller counts lines first), it never needs to be; when twice as many ids come
as the hint promised, a new table four times the size is chained after it and takes the new
ids.
"""

from __future__ import annotations

import math
import os
import stat
import sys

# hashlib's own blake2b (hashlib.blake2b is this one), without hashlib loading OpenSSL (2 ms);
# a build without the _blake2 module has it through hashlib.
try:
    from _blake2 import blake2b as blake2b
except ImportError:  # pragma: no cover - CPython builds _blake2 unless told not to
    from hashlib import blake2b as blake2b

_WIDTH = 5  # bytes stored per id
_PER_BUCKET = 64  # ids a bucket holds on average when its table is as full as it was sized
_OVERFILL = 2  # a table takes this many times its size in ids before a bigger one is chained
_STORED = (1 << 8 * _WIDTH) - 1
_NATIVE = sys.hash_info.width == 64  # else the string hash is too short: a slower digest


def _hash(key: str) -> int:
    """64 bits of the key: the low 40 stored, the high 24 pick the bucket."""
    if _NATIVE:
        return hash(key) & 0xFFFF_FFFF_FFFF_FFFF
    return int.from_bytes(blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def _aligned_find(bucket: bytes, stored: bytes) -> int:
    """Offset of `stored` at a slot boundary of `bucket`, or -1."""
    i = bucket.find(stored)
    while i > 0 and i % _WIDTH:
        i = bucket.find(stored, i + 1)
    return i


class IdSet:
    """A set of strings supporting add, discard and membership; iteration is not offered."""

    def __init__(self, capacity: int = 1024) -> None:
        self._older: list[list[bytes]] = []  # tables that took as many ids as they could
        self._new_table(capacity)
        self._len = 0

    def _new_table(self, capacity: int) -> None:
        """Start a table for about `capacity` ids, which takes the ids added from now on."""
        self._table = [b""] * math.ceil(max(1, capacity) / _PER_BUCKET)
        self._buckets = len(self._table)
        self._room = _OVERFILL * max(1, capacity)  # ids it takes before a bigger one follows

    def __len__(self) -> int:
        return self._len

    def _locate(self, key: str) -> tuple[list[bytes], int, int] | None:
        """(the table, the bucket, the offset in it) of a member; None if not one."""
        h = _hash(key)
        stored = (h & _STORED).to_bytes(_WIDTH, "little")
        for table in (*self._older, self._table):
            index = (h >> 40) % len(table)
            bucket = table[index]
            if stored in bucket and (offset := _aligned_find(bucket, stored)) >= 0:
                return table, index, offset
        return None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._locate(key) is not None

    def add(self, key: str) -> bool:
        """Add key; True if it was not there before."""
        if self._older and self._locate(key) is not None:
            return False
        # `_hash` and `_locate`, inline: this runs for every line of a manifest
        h = hash(key) & 0xFFFF_FFFF_FFFF_FFFF if _NATIVE else _hash(key)
        stored = (h & _STORED).to_bytes(_WIDTH, "little")
        table = self._table
        index = (h >> 40) % self._buckets
        bucket = table[index]
        if stored in bucket and _aligned_find(bucket, stored) >= 0:
            return False
        table[index] = bucket + stored
        self._len += 1
        self._room -= 1
        if not self._room:
            self._older.append(table)
            self._new_table(self._buckets * _PER_BUCKET * 4)
        return True

    def discard(self, key: str) -> None:
        located = self._locate(key)
        if located is not None:
            table, index, offset = located
            bucket = table[index]
            table[index] = bucket[:offset] + bucket[offset + _WIDTH :]
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
