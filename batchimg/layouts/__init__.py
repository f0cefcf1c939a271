"""Output layouts: how the images of ok items are arranged (see `base.OutputLayout`).

    base.py         the OutputLayout protocol
    imagefolder.py  images/ + metadata.jsonl (Hugging Face `imagefolder`)
    webdataset.py   tar shards under shards/ (WebDataset)

A layout is chosen once, by name, with `open_layout`; the engine never asks which it has. A new
layout is a module with a class that follows `OutputLayout`, and an entry in `LAYOUTS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .base import DEFAULT_SHARD_SIZE, OutputLayout

if TYPE_CHECKING:
    from ..stores import Store  # the stores are imported by a run, not for `--help`

Layout = Literal["imagefolder", "webdataset"]


@dataclass(frozen=True)
class LayoutContext:
    """What a layout may need: where the output is, its store, and the run's settings."""

    out_dir: Path
    store: Store
    shard_size: int = DEFAULT_SHARD_SIZE
    sync_ledger: Callable[[], None] | None = None  # make every ledger line written durable
    metadata: bool = True  # False: images only; the metadata files are written elsewhere


def _imagefolder(c: LayoutContext) -> OutputLayout:
    from .imagefolder import ImageFolderLayout  # imported when used, not for `--help`

    return ImageFolderLayout(c.out_dir, c.store, metadata=c.metadata)


def _webdataset(c: LayoutContext) -> OutputLayout:
    from .webdataset import WebDatasetLayout

    return WebDatasetLayout(c.out_dir, c.store, c.shard_size, c.sync_ledger)


LAYOUTS: dict[Layout, Callable[[LayoutContext], OutputLayout]] = {
    "imagefolder": _imagefolder,
    "webdataset": _webdataset,
}
LAYOUT_NAMES: tuple[Layout, ...] = tuple(LAYOUTS)


def open_layout(name: Layout, context: LayoutContext) -> OutputLayout:
    return LAYOUTS[name](context)


__all__ = [
    "DEFAULT_SHARD_SIZE",
    "LAYOUTS",
    "LAYOUT_NAMES",
    "Layout",
    "LayoutContext",
    "OutputLayout",
    "open_layout",
]
