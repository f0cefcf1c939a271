"""The Store interface: where the output's bytes live.

A store holds named objects (`images/cat-0.png`, `shards/shard-000000.tar`) under one root and
offers what the engine needs to keep a promise: nothing appears half-written, nothing is
overwritten, and once `sync` returns what was put survives a crash. Bytes arrive through a
local temp area the store owns (`temp_dir`): backends spool answers into it and writers stage
files in it, then `put` moves each finished temp file in under its final name.

Implementations:
- `local.LocalStore`: a directory; `put` is a rename of a durable temp (fsynced there unless
  `settle` or `write_temp` made it so), `sync` fsyncs the directories.
- `objects.ObjectStore`: a bucket's prefix through fsspec (`s3://`, `gs://`): its `temp_dir`
  is in the run's local state directory, `put` uploads the file whole (one PUT) and removes
  it, and `sync` has nothing left to do.

Optional tuning a store may declare (the engine reads them if present): `write_temp(hint, data)`
(the path, a str, of a new temp file holding `data`, durable once `settle` returns) and
`settle(temps)` (make a batch of temp files durable at once, so that `put` need not sync each: a
local directory, with one syncfs where that is as safe as an fsync of each), `writer_threads` and
`writer_batch` (the writer threads, and the most items each takes at a time), `upload_queue` (items
that may wait on the store beyond the requests in flight, in units of --concurrency), and
`park(name, temp)` / `hold(record)` (keep a refused, paid-for file and its item's line for the next
run, instead of failing the item).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol


class Store(Protocol):
    """Named objects under one root; see the module docstring."""

    @property
    def location(self) -> str:
        """Where the store is, for messages (a path or a URL, never a credential)."""
        ...

    @property
    def temp_dir(self) -> Path:
        """A local directory for files on their way in (spooled answers, staged images)."""
        ...

    def clean_temps(self) -> None:
        """Remove what an interrupted run left in the temp area (only while no run writes)."""
        ...

    def new_temp(self, hint: str) -> Path:
        """A fresh, unused path in the temp area (`hint`: part of its name, for people)."""
        ...

    def put(self, name: str, temp: Path) -> None:
        """Move a finished temp file in under `name`, whole or not at all. An object already
        under that name is set aside (kept, under another name), never overwritten. Raises
        OSError."""
        ...

    def sync(self) -> None:
        """Make everything put so far durable. Raises OSError."""
        ...

    def open(self, name: str) -> BinaryIO:
        """Read an object. Raises FileNotFoundError if there is none."""
        ...

    def exists(self, name: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[str]:
        """The names of the objects directly under `prefix/` (temp and hidden ones left out)."""
        ...

    def delete(self, name: str) -> None:
        """Remove an object (nothing if it is gone already)."""
        ...
