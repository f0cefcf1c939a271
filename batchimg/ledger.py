"""The ledger: `DIR/ledger.jsonl`, one JSON object per finished item, append-only.

The last line for an id is that item's state. Each line is written whole and flushed only after
the item's image files are durable; the file is fsynced at least once a second and on close. A
line torn by a crash mid-write is cut off when the ledger is next opened, and skipped by readers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from ._idset import IdSet

LEDGER_NAME = "ledger.jsonl"
FSYNC_INTERVAL_S = 1.0


def read_ledger(path: Path) -> Iterator[dict[str, Any]]:
    """Every whole record in the ledger, in order; torn or garbled lines are skipped."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                return  # torn by a crash mid-write
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("id"), str):
                yield record


def completed_ids(path: Path) -> IdSet:
    """Ids whose last ledger state is `ok`: a re-run skips them."""
    done = IdSet()
    for record in read_ledger(path):
        if record.get("status") == "ok":
            done.add(record["id"])
        else:
            done.discard(record["id"])
    return done


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line that has no newline (written halfway when the process died)."""
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        pos, chunk = size, 65536
        while pos > 0:
            start = max(0, pos - chunk)
            fh.seek(start)
            block = fh.read(pos - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                fh.truncate(start + newline + 1)
                return
            pos = start
        fh.truncate(0)


class LedgerWriter:
    """Appends records to the ledger; use as a context manager so the file is synced on exit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists():
            _cut_torn_tail(path)
        self._fh = open(path, "ab")  # noqa: SIM115 - closed in close()
        self._last_sync = time.monotonic()

    def append(self, record: dict[str, Any]) -> None:
        self._fh.write(orjson.dumps(record) + b"\n")
        self._fh.flush()
        now = time.monotonic()
        if now - self._last_sync >= FSYNC_INTERVAL_S:
            os.fsync(self._fh.fileno())
            self._last_sync = now

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
