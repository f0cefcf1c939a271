"""The imagefolder layout: `DIR/metadata.jsonl`, one row per image, beside `DIR/images/`.

With it, `datasets.load_dataset("imagefolder", data_dir=DIR)` loads the output directory as it
is: `file_name` (relative to DIR) plus the prompt, the request parameters, the item id, the image
index and the line's `metadata`. Rows exist only for images of `ok` items.

SVG files are vector text that image loaders (Pillow, and so `imagefolder`) cannot decode: a row
for one in `metadata.jsonl` would break iterating the dataset. Their rows, of the same shape, go
to `DIR/metadata-svg.jsonl` instead (load it with the `json` builder), which exists only when a
run made SVGs.

The ledger is the source of truth: at the start of every run the file is rebuilt from it, in the
same pass that reads the ledger for resuming (so a crash between a ledger line and its rows, or a
torn row, is repaired), then rows are appended as items finish. Items are never re-run once
ok, so rows are never duplicated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Container, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from ..errors import UsageError
from ..ledger import LedgerRecord, LedgerWriter
from ..stores import Store
from ..writer import IMAGES_DIR, atomic_file

METADATA_NAME = "metadata.jsonl"
SHARDS_DIR = "shards"  # the other layout's: a directory keeps the layout it started with
SVG_METADATA_NAME = "metadata-svg.jsonl"
_PARAMS = (
    "model",
    "size",
    "quality",
    "output_format",
    "complexity",
    "frame_count",
    "n",
    "endpoint",
)


def metadata_rows(record: LedgerRecord) -> Iterator[dict[str, Any]]:
    """The rows for one ok ledger record, one per image file."""
    files = record.get("files")
    for index, file_name in enumerate(files if isinstance(files, list) else []):
        row: dict[str, Any] = {"file_name": file_name, "prompt": record.get("prompt")}
        row.update({key: record.get(key) for key in _PARAMS})
        row.update({"id": record["id"], "image_index": index, "line": record.get("line")})
        row["metadata"] = record.get("metadata")
        yield row


def _is_svg(row: dict[str, Any]) -> bool:
    return str(row["file_name"]).endswith(".svg")


@contextlib.contextmanager
def rebuild_metadata(out_dir: Path) -> Iterator[Callable[[LedgerRecord], None]]:
    """Write metadata.jsonl (and metadata-svg.jsonl, if any SVG is ok) afresh, atomically,
    from the ok records given to the yielded adder."""
    with contextlib.ExitStack() as stack:
        raster = stack.enter_context(atomic_file(out_dir / METADATA_NAME))
        vector: list[BinaryIO] = []

        def add(record: LedgerRecord) -> None:
            for row in metadata_rows(record):
                if _is_svg(row):
                    if not vector:
                        vector.append(stack.enter_context(atomic_file(out_dir / SVG_METADATA_NAME)))
                    vector[0].write(orjson.dumps(row) + b"\n")
                else:
                    raster.write(orjson.dumps(row) + b"\n")

        yield add
        if not vector:
            (out_dir / SVG_METADATA_NAME).unlink(missing_ok=True)


class MetadataWriter:
    """Keeps metadata.jsonl (and metadata-svg.jsonl) in step with the ledger during a run
    (after `rebuild_metadata`)."""

    def __init__(self, out_dir: Path) -> None:
        self._out_dir = out_dir
        self._writer = LedgerWriter(out_dir / METADATA_NAME)  # the same whole-line appends
        self._svg: LedgerWriter | None = None

    def add(self, record: LedgerRecord) -> None:
        for row in metadata_rows(record):
            if _is_svg(row):
                if self._svg is None:
                    self._svg = LedgerWriter(self._out_dir / SVG_METADATA_NAME)
                self._svg.append(row)
            else:
                self._writer.append(row)

    def sync(self) -> None:
        self._writer.sync()
        if self._svg is not None:
            self._svg.sync()

    def close(self) -> None:
        self._writer.close()
        if self._svg is not None:
            self._svg.close()

    def __enter__(self) -> MetadataWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ImageFolderLayout:
    """Images stay loose under `images/`; `metadata.jsonl` is rebuilt from the ledger as it is
    read for resuming, then kept in step (an `OutputLayout`, see `base`)."""

    def __init__(self, out_dir: Path, store: Store, *, metadata: bool = True) -> None:
        """`metadata` False: images only (a Ray worker's; its driver writes the files)."""
        self.out_dir = out_dir
        self.store = store
        self.metadata = metadata
        self._rebuild = contextlib.ExitStack()
        self._add_rows: Callable[[LedgerRecord], None] | None = None
        self._writer: MetadataWriter | None = None

    @property
    def images_at(self) -> str:
        return f"{self.store.location}/{IMAGES_DIR}"

    def prepare(self) -> None:
        if any(name.endswith(".tar") for name in self.store.list(SHARDS_DIR)):
            raise UsageError(
                f"{self.out_dir} holds webdataset shards: re-run with --format webdataset (a "
                "directory keeps the layout it was started with)"
            )
        if self.metadata:
            self._add_rows = self._rebuild.enter_context(rebuild_metadata(self.out_dir))

    def restore(self, record: LedgerRecord) -> None:
        if self._add_rows is not None:
            self._add_rows(record)

    def resumed(self, done: Container[str]) -> None:
        self._rebuild.close()  # the rebuilt files replace the old ones, whole
        if self.metadata:
            self._writer = MetadataWriter(self.out_dir)

    def add(self, record: LedgerRecord) -> None:
        if self._writer is not None:
            self._writer.add(record)

    def sync(self) -> None:
        if self._writer is not None:
            self._writer.sync()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def abort(self) -> None:
        # A rebuild cut short leaves the old files as they were (its temp files are removed).
        self._rebuild.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
        self.close()


def write_metadata(out_dir: Path) -> None:
    """Write `metadata.jsonl` (and `metadata-svg.jsonl`) afresh from the ledger, as a run's
    start does (a Ray run's driver, at its end: its workers write images only)."""
    from ..ledger import LEDGER_NAME, scan_ledger
    from ..stores import LocalStore

    layout = ImageFolderLayout(out_dir, LocalStore(out_dir))
    layout.prepare()
    try:
        state = scan_ledger(out_dir / LEDGER_NAME, on_ok=layout.restore)
    except BaseException:
        layout.abort()
        raise
    layout.resumed(state.done)
    layout.close()
