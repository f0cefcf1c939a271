"""A compact set of ids: 8 bytes a slot instead of a Python `set`'s ~100 bytes an entry.

The loader must remember every id it has seen (duplicates are errors) and resume must remember
every id already done; for a manifest of millions of lines a plain set would grow memory by
hundreds of megabytes. Ids are stored as 64-bit blake2b fingerprints in an open-addressing table
(linear probing); two distinct ids share a fingerprint with probability ~n²/2⁶⁵, about 3e-8 for
a million ids.
"""

from __future__ import annotations

from array import array
from hashlib import blake2b

_EMPTY = 0
_DELETED = 1
_MAX_LOAD = 0.6


def _fingerprint(key: str) -> int:
    fp = int.from_bytes(blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")
    return fp if fp > _DELETED else fp + 2


class IdSet:
    """A set of strings supporting add, discard and membership; iteration is not offered."""

    def __init__(self, capacity: int = 1024) -> None:
        size = 1
        while size < capacity:
            size *= 2
        self._slots = array("Q", bytes(8 * size))
        self._mask = size - 1
        self._len = 0
        self._filled = 0  # live entries plus tombstones: what the load factor counts

    def __len__(self) -> int:
        return self._len

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._find(_fingerprint(key))[0]

    def _find(self, fp: int) -> tuple[bool, int]:
        """(found, slot): the slot holding fp, else the first reusable slot on its probe path."""
        slots, mask = self._slots, self._mask
        i = fp & mask
        reusable = -1
        while True:
            value = slots[i]
            if value == fp:
                return True, i
            if value == _EMPTY:
                return False, i if reusable < 0 else reusable
            if value == _DELETED and reusable < 0:
                reusable = i
            i = (i + 1) & mask

    def add(self, key: str) -> bool:
        """Add key; True if it was not there before."""
        fp = _fingerprint(key)
        found, i = self._find(fp)
        if found:
            return False
        if self._slots[i] == _EMPTY:
            self._filled += 1
        self._slots[i] = fp
        self._len += 1
        if self._filled > _MAX_LOAD * (self._mask + 1):
            self._rehash()
        return True

    def discard(self, key: str) -> None:
        found, i = self._find(_fingerprint(key))
        if found:
            self._slots[i] = _DELETED
            self._len -= 1

    def _rehash(self) -> None:
        old = self._slots
        size = self._mask + 1
        if self._len > _MAX_LOAD * size / 2:
            size *= 2
        self._slots = array("Q", bytes(8 * size))
        self._mask = size - 1
        self._filled = self._len
        for fp in old:
            if fp > _DELETED:
                self._slots[self._find(fp)[1]] = fp
