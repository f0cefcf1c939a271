"""A compact set of ids: 7 bytes a slot instead of a Python `set`'s ~100 bytes an entry.

The loader must remember every id it has seen (duplicates are errors) and resume must remember
every id already done; for a manifest of millions of lines a plain set would grow memory by
hundreds of megabytes. Ids are stored as 56-bit blake2b fingerprints in an open-addressing table
(linear probing) packed into one bytearray. Two distinct ids share a fingerprint with probability
about n²/2⁵⁷: 7e-6 for a million ids. Sized from a hint (the caller counts lines first), the
table never grows; without one it doubles as it fills.
"""

from __future__ import annotations

import os
import stat
from hashlib import blake2b

_WIDTH = 7  # bytes per slot
_EMPTY = 0
_DELETED = 1
_MAX_LOAD = 0.85


def _fingerprint(key: str) -> int:
    fp = int.from_bytes(blake2b(key.encode("utf-8"), digest_size=_WIDTH).digest(), "little")
    return fp if fp > _DELETED else fp + 2


class IdSet:
    """A set of strings supporting add, discard and membership; iteration is not offered."""

    def __init__(self, capacity: int = 1024) -> None:
        self._allocate(max(16, int(capacity / _MAX_LOAD) + 1))
        self._len = 0

    def _allocate(self, slots: int) -> None:
        self._slots = slots
        self._table = bytearray(_WIDTH * slots)
        self._filled = 0  # live entries plus tombstones: what the load factor counts

    def __len__(self) -> int:
        return self._len

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._find(_fingerprint(key))[0]

    def _get(self, slot: int) -> int:
        offset = slot * _WIDTH
        return int.from_bytes(self._table[offset : offset + _WIDTH], "little")

    def _put(self, slot: int, value: int) -> None:
        offset = slot * _WIDTH
        self._table[offset : offset + _WIDTH] = value.to_bytes(_WIDTH, "little")

    def _find(self, fp: int) -> tuple[bool, int]:
        """(found, slot): the slot holding fp, else the first reusable slot on its probe path."""
        slots = self._slots
        i = fp % slots
        reusable = -1
        while True:
            value = self._get(i)
            if value == fp:
                return True, i
            if value == _EMPTY:
                return False, i if reusable < 0 else reusable
            if value == _DELETED and reusable < 0:
                reusable = i
            i = i + 1 if i + 1 < slots else 0

    def add(self, key: str) -> bool:
        """Add key; True if it was not there before."""
        fp = _fingerprint(key)
        found, i = self._find(fp)
        if found:
            return False
        if self._get(i) == _EMPTY:
            self._filled += 1
        self._put(i, fp)
        self._len += 1
        if self._filled > _MAX_LOAD * self._slots:
            self._rehash()
        return True

    def discard(self, key: str) -> None:
        found, i = self._find(_fingerprint(key))
        if found:
            self._put(i, _DELETED)
            self._len -= 1

    def _rehash(self) -> None:
        old, old_slots = self._table, self._slots
        grow = self._len > _MAX_LOAD * old_slots / 2  # mostly tombstones: same size will do
        self._allocate(old_slots * 2 if grow else old_slots)
        for slot in range(old_slots):
            offset = slot * _WIDTH
            fp = int.from_bytes(old[offset : offset + _WIDTH], "little")
            if fp > _DELETED:
                self._put(self._find(fp)[1], fp)
                self._filled += 1


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
