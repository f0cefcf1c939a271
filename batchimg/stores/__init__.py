"""Stores: where the output's bytes live (see `base.Store`).

base.py   the Store protocol
local.py  LocalStore: a directory (fsync + rename)
"""

from pathlib import Path

from .base import Store
from .local import LocalStore

__all__ = ["LocalStore", "Store", "open_store"]


def open_store(location: str | Path) -> Store:
    """The store for an output location (today: a local directory)."""
    return LocalStore(Path(location))
