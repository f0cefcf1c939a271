"""The OutputLayout interface: how the images of ok items are arranged for people and loaders.

Every image is first stored loose under `images/` (see `writer`) and its ledger line written;
the layout then makes the output ready to use. It is told, in order:

    prepare()         before the ledger is read (refuse a directory of another layout, drop
                      files this layout does not keep)
    restore(record)   each ok record earlier runs left, as the ledger is read for resuming
    resumed(done)     the ledger is read; `done` holds the ids whose last state is ok
    add(record)       each new ok record, once its ledger line is written
    sync()            now and then (make what was added durable)
    close()           the run ended: finish (the last shard); StorageError if it cannot
    abort()           the run is being torn down: stop at once, leave the rest for next time

Implementations (`layouts.LAYOUTS`, chosen once by name):
- `imagefolder.ImageFolderLayout`: `metadata.jsonl` (and `metadata-svg.jsonl`) beside images/.
- `webdataset.WebDatasetLayout`: tar shards under `shards/`, packed on a writer thread.
"""

from __future__ import annotations

from collections.abc import Container
from typing import TYPE_CHECKING, Protocol

DEFAULT_SHARD_SIZE = 1000  # images per WebDataset shard

if TYPE_CHECKING:
    from ..ledger import LedgerRecord


class OutputLayout(Protocol):
    """See the module docstring."""

    @property
    def images_at(self) -> str:
        """Where a person finds the images (for the summary)."""
        ...

    def prepare(self) -> None: ...

    def restore(self, record: LedgerRecord) -> None: ...

    def resumed(self, done: Container[str]) -> None: ...

    def add(self, record: LedgerRecord) -> None: ...

    def sync(self) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...
