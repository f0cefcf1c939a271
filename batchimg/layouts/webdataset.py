"""WebDataset output (`--format webdataset`): finished samples packed into tar shards.

Each image is a sample `{key}.{png|jpg|webp}` + `{key}.json` (the same row `metadata.jsonl`
would hold: prompt, request parameters, id, image index, the line's metadata) + `{key}.txt`
(the prompt), with `key` the image's file name without its extension and with no dots
(WebDataset splits a member's name into key and extension at the first dot).

Images are stored loose under `images/` first, exactly as in the default layout, and their
ledger line is written. Once `shard_size` samples have gathered, a writer thread packs them into
`shards/shard-NNNNNN.tar` (written in the store's temp area, then put in place: a shard is
either whole or absent) and only then removes the loose files. The last, shorter shard is
written when the run ends, however it ends. A crash at any point loses nothing: at the next
start, loose images of `ok` ledger records whose key is not in a finished shard are packed
again, a half-written shard is deleted (with the rest of the temp area), and a loose file whose
key a shard already holds is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import queue
import tarfile
import threading
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path, PurePosixPath
from typing import Any

import orjson

from ..errors import StorageError, UsageError
from ..ledger import LedgerRecord
from ..stores import Store
from ..writer import IMAGES_DIR
from .base import DEFAULT_SHARD_SIZE
from .imagefolder import METADATA_NAME, SHARDS_DIR, SVG_METADATA_NAME, metadata_rows

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "SHARDS_DIR",
    "SHARD_PREFIX",
    "WebDatasetLayout",
    "sample_key",
]

SHARD_PREFIX = "shard-"


def sample_key(file_name: str) -> str:
    """The WebDataset key of an image file (`images/cat-0.png` → `cat-0`); never has a dot."""
    stem = PurePosixPath(file_name).stem
    if "." not in stem:
        return stem
    digest = blake2b(stem.encode("utf-8"), digest_size=5).hexdigest()
    return f"{stem.replace('.', '_')}-{digest}"  # the digest keeps `a.b` and `a_b` apart


@dataclass(frozen=True)
class _Sample:
    key: str
    image: str  # the loose image's name in the store (images/...)
    row: dict[str, Any]


class WebDatasetLayout:
    """Gathers ok records and packs their images into shards on a writer thread (an
    `OutputLayout`, see `base`).

    `sync_ledger` is called before each shard is written, so no shard ever holds a sample whose
    ledger line could still be lost.
    """

    def __init__(
        self,
        out_dir: Path,
        store: Store,
        shard_size: int,
        sync_ledger: Callable[[], None] | None = None,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard size must be at least 1, got {shard_size}")
        self.out_dir = out_dir
        self.store = store
        self.shard_size = shard_size
        self._sync_ledger = sync_ledger
        self._next_index = 0
        self._pending: dict[str, _Sample] = {}  # by key: a later record for a key replaces
        self._jobs: queue.SimpleQueue[list[_Sample] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.error: StorageError | None = None  # the first shard that could not be written
        self._abandoned = False
        self._loose: set[str] = set()  # loose images found by `prepare` (listed once)

    @property
    def images_at(self) -> str:
        return f"{self.store.location}/{SHARDS_DIR}"

    def prepare(self) -> None:
        """Drop the other layout's metadata (its rows would point at packed files), find the
        next shard number, and delete loose images a crash left after packing them."""
        for name in (METADATA_NAME, SVG_METADATA_NAME):
            (self.out_dir / name).unlink(missing_ok=True)
        shards = sorted(
            name
            for name in self.store.list(SHARDS_DIR)
            if PurePosixPath(name).name.startswith(SHARD_PREFIX) and name.endswith(".tar")
        )
        for name in shards:
            with contextlib.suppress(ValueError):
                index = int(PurePosixPath(name).stem.removeprefix(SHARD_PREFIX))
                self._next_index = max(self._next_index, index + 1)
        self._drop_packed_leftovers(shards)

    def _drop_packed_leftovers(self, shards: list[str]) -> None:
        """Delete loose images a crash left behind after their shard was written.

        Exact: only the keys of loose files are looked up in the shards, and a loose file goes
        only if the shard's sample has the same sha256 (a re-done item's newer image stays).
        """
        loose = {sample_key(name): name for name in self.store.list(IMAGES_DIR)}
        self._loose = set(loose.values())
        for name in shards:
            if not loose:
                return
            try:
                with self.store.open(name) as fh, tarfile.open(fileobj=fh) as tar:
                    for member in tar:
                        key, _, ext = member.name.partition(".")
                        if ext != "json" or key not in loose:
                            continue
                        data = tar.extractfile(member)
                        row = orjson.loads(data.read()) if data is not None else {}
                        if row.get("sha256") == _sha256_of(self.store, loose[key]):
                            self.store.delete(loose[key])
                            self._loose.discard(loose.pop(key))
            except (tarfile.TarError, orjson.JSONDecodeError, EOFError) as exc:
                raise UsageError(
                    f"{self.store.location}/{name} is not a readable shard ({exc}): move it "
                    f"out of {SHARDS_DIR}/, then re-run (its images are packed again only if "
                    "they are still loose)"
                ) from None

    def restore(self, record: LedgerRecord) -> None:
        self._queue(record, loose=self._loose)

    def add(self, record: LedgerRecord) -> None:
        """Queue the loose images of one ok record (its ledger line is written); StorageError
        if an earlier shard could not be written."""
        if self.error is not None:
            raise self.error
        self._queue(record)
        self._submit_full()

    def _queue(self, record: LedgerRecord, loose: set[str] | None = None) -> None:
        """Queue a record's images; `loose`: the loose images there are (a record read back
        from the ledger: one whose image is not among them was packed by an earlier run, or
        removed by hand); None: all of them (a record just written, its images just stored)."""
        for row in metadata_rows(record):
            image = str(row.pop("file_name"))
            if loose is not None and image not in loose:
                continue
            digests = record.get("sha256")
            if not isinstance(digests, list) or len(digests) <= row["image_index"]:
                continue  # a line that does not say what its image is: `verify` reports it
            key = sample_key(image)
            row["sha256"] = digests[row["image_index"]]
            self._pending[key] = _Sample(key, image, row)

    def resumed(self, done: Container[str]) -> None:
        """Drop queued images of ids whose last state is not ok (they run again, and their new
        image is queued when it is stored), then start packing what earlier runs left loose."""
        self._pending = {k: s for k, s in self._pending.items() if s.row["id"] in done}
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()
        self._submit_full()

    def sync(self) -> None:
        """Nothing to do: each shard is made durable as it is written."""

    def abort(self) -> None:
        """Finish the shard being written, no more: the rest stays loose for the next run."""
        if self._thread is not None:
            self._abandoned = True
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Pack what is left (a shorter last shard) and wait for every shard to be written;
        StorageError if one could not be."""
        if self._thread is not None:
            if self._pending:
                self._jobs.put(list(self._pending.values()))
                self._pending = {}
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        if self.error is not None:
            raise self.error

    def _submit_full(self) -> None:
        if self._thread is None:
            return
        while len(self._pending) >= self.shard_size:
            keys = list(itertools.islice(self._pending, self.shard_size))
            self._jobs.put([self._pending.pop(key) for key in keys])

    def _run(self) -> None:
        while (batch := self._jobs.get()) is not None:
            if self.error is not None or self._abandoned:
                continue  # the images stay loose for the next run
            try:
                if self._sync_ledger is not None:
                    self._sync_ledger()
                self._write_shard(batch)
            except Exception as exc:
                where = f"{self.store.location}/{SHARDS_DIR}"
                self.error = StorageError(f"cannot write a shard in {where}: {exc}")

    def _write_shard(self, batch: list[_Sample]) -> None:
        name = f"{SHARD_PREFIX}{self._next_index:06d}.tar"
        self._next_index += 1
        temp = self.store.new_temp(name)
        try:
            with (
                open(temp, "wb") as fh,
                tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                packed = [sample for sample in batch if _add_sample(self.store, tar, sample)]
            self.store.put(f"{SHARDS_DIR}/{name}", temp)
            self.store.sync()
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        for sample in packed:  # durable in the shard: the loose copies can go
            with contextlib.suppress(OSError):
                self.store.delete(sample.image)


def _sha256_of(store: Store, name: str) -> str:
    digest = hashlib.sha256()
    with store.open(name) as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _add_sample(store: Store, tar: tarfile.TarFile, sample: _Sample) -> bool:
    """Add one sample; False (nothing added) if the loose file is not the image its ledger
    line names (gone, or replaced by a newer image of the same key, queued on its own)."""
    try:
        with store.open(sample.image) as fh:
            data = fh.read()
    except FileNotFoundError:
        return False
    if hashlib.sha256(data).hexdigest() != sample.row["sha256"]:
        return False
    mtime = int(time.time())
    suffix = PurePosixPath(sample.image).suffix
    tar.addfile(_member(f"{sample.key}{suffix}", len(data), mtime), io.BytesIO(data))
    for ext, meta in (
        ("json", orjson.dumps(sample.row)),
        ("txt", str(sample.row.get("prompt") or "").encode("utf-8")),
    ):
        tar.addfile(_member(f"{sample.key}.{ext}", len(meta), mtime), io.BytesIO(meta))
    return True


def _member(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    """A plain file entry owned by nobody in particular (no local user names in shards)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info
