"""Stores: where the output's bytes live (see `base.Store`).

base.py     the Store protocol
local.py    LocalStore: a directory (fsync + rename)
objects.py  ObjectStore: a prefix of a bucket, through fsspec (s3://, gs://...)
remote.py   what a run on a bucket adds: the lock object, the ledger as pushed pieces
"""

from pathlib import Path

from .base import Store
from .local import LocalStore
from .objects import ObjectStore, default_state_dir, is_url, local_path, open_filesystem

__all__ = ["LocalStore", "ObjectStore", "Store", "is_url", "local_path", "open_store"]


def open_store(location: str | Path, state_dir: Path | None = None) -> Store:
    """The store for an output location: a local directory (a path or a `file://` URL), or
    a bucket's prefix (any other URL fsspec knows; `state_dir`: its local state directory)."""
    if not is_url(location):
        return LocalStore(local_path(location))
    url = str(location)
    fs, root = open_filesystem(url)
    return ObjectStore(url, fs, root, state_dir or default_state_dir(url))
