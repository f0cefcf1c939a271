"""WebDataset output (`--format webdataset`): finished samples packed into tar shards.

Each image is a sample `{key}.{png|jpg|webp}` + `{key}.json` (the same row `metadata.jsonl`
would hold: prompt, request parameters, id, image index, the line's metadata) + `{key}.txt`
(the prompt), with `key` the image's file name without its extension and with no dots
(WebDataset splits a member's name into key and extension at the first dot).

Images are stored loose under `images/` first, exactly as in the default layout, and their
ledger line is written. Once `shard_size` samples have gathered, a writer thread packs them into
`shards/shard-NNNNNN.tar` (written under a temp name, fsynced, renamed: a shard is either whole
or absent) and only then removes the loose files. The last, shorter shard is written when the
run ends, however it ends. A crash at any point loses nothing: at the next start, loose images
of `ok` ledger records whose key is not in a finished shard are packed again, a half-written
shard is deleted, and a loose file whose key a shard already holds is removed.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path, PurePosixPath
from typing import Any

import orjson

from ._idset import IdSet
from .dataset import metadata_rows
from .errors import StorageError
from .writer import fsync_path

SHARDS_DIR = "shards"
SHARD_PREFIX = "shard-"
DEFAULT_SHARD_SIZE = 1000
_TEMP_SUFFIX = ".part"


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
    image: Path  # the loose file under images/
    row: dict[str, Any]


class ShardWriter:
    """Gathers the ok records of a run and packs their images into shards on a writer thread.

    `add` every ok record (the earlier runs' ones too, from the resume scan), `start()` once the
    run's ledger is open, `close()` at the end. `sync_ledger` is called before each shard is
    written, so no shard ever holds a sample whose ledger line could still be lost.
    """

    def __init__(
        self, out_dir: Path, shard_size: int, sync_ledger: Callable[[], None] | None = None
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard size must be at least 1, got {shard_size}")
        self.out_dir = out_dir
        self.dir = out_dir / SHARDS_DIR
        self.shard_size = shard_size
        self._sync_ledger = sync_ledger
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(f".*{_TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        shards = sorted(self.dir.glob(f"{SHARD_PREFIX}*.tar"))
        self._packed = IdSet(max(1024, len(shards) * shard_size))  # keys already in a shard
        self._next_index = 0
        for path in shards:
            with tarfile.open(path) as tar:
                for name in tar.getnames():
                    self._packed.add(name.split(".", 1)[0])
            with contextlib.suppress(ValueError):
                index = int(path.stem.removeprefix(SHARD_PREFIX))
                self._next_index = max(self._next_index, index + 1)
        self._pending: list[_Sample] = []
        self._jobs: queue.SimpleQueue[list[_Sample] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.error: StorageError | None = None  # the first shard that could not be written
        self.shards_written = 0

    def add(self, record: dict[str, Any]) -> None:
        """Queue the images of one ok record (their ledger line is written); StorageError if
        an earlier shard could not be written."""
        if self.error is not None:
            raise self.error
        for row in metadata_rows(record):
            key = sample_key(row["file_name"])
            image = self.out_dir / row["file_name"]
            if key in self._packed:  # packed before a crash cut the clean-up short
                image.unlink(missing_ok=True)
                continue
            if image.exists():
                del row["file_name"]  # the image is the sample's own member now
                self._pending.append(_Sample(key, image, row))
        if self._thread is not None:
            self._submit_full()

    def start(self) -> None:
        """Start the writer thread and pack what earlier runs left loose."""
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()
        self._submit_full()

    def sync(self) -> None:
        """Nothing to do: each shard is made durable as it is written."""

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif self._thread is not None:  # aborted: no last shard; its images stay loose
            self._jobs.put(None)
            self._thread = None

    def close(self) -> None:
        """Pack what is left (a shorter last shard) and wait for every shard to be written."""
        if self._thread is None:
            return
        if self._pending:
            self._jobs.put(self._pending)
            self._pending = []
        self._jobs.put(None)
        self._thread.join()
        self._thread = None

    def _submit_full(self) -> None:
        while len(self._pending) >= self.shard_size:
            batch, self._pending = (
                self._pending[: self.shard_size],
                self._pending[self.shard_size :],
            )
            self._jobs.put(batch)

    def _run(self) -> None:
        while (batch := self._jobs.get()) is not None:
            if self.error is not None:
                continue  # the disk refused a shard: the images stay loose for the next run
            try:
                if self._sync_ledger is not None:
                    self._sync_ledger()
                self._write_shard(batch)
            except OSError as exc:
                self.error = StorageError(f"cannot write a shard in {self.dir}: {exc}")

    def _write_shard(self, batch: list[_Sample]) -> None:
        name = f"{SHARD_PREFIX}{self._next_index:06d}.tar"
        self._next_index += 1
        final = self.dir / name
        temp = self.dir / f".{name}{_TEMP_SUFFIX}"
        try:
            with open(temp, "wb") as fh:
                with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for sample in batch:
                        _add_sample(tar, sample)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temp, final)
            fsync_path(str(self.dir), os.O_RDONLY | os.O_DIRECTORY)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        self.shards_written += 1
        for sample in batch:  # durable in the shard: the loose copies can go
            self._packed.add(sample.key)
            with contextlib.suppress(OSError):
                sample.image.unlink()


def _add_sample(tar: tarfile.TarFile, sample: _Sample) -> None:
    mtime = int(time.time())
    with open(sample.image, "rb") as image:
        size = os.fstat(image.fileno()).st_size
        tar.addfile(_member(f"{sample.key}{sample.image.suffix}", size, mtime), image)
    for ext, data in (
        ("json", orjson.dumps(sample.row)),
        ("txt", str(sample.row.get("prompt") or "").encode("utf-8")),
    ):
        tar.addfile(_member(f"{sample.key}.{ext}", len(data), mtime), io.BytesIO(data))


def _member(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    """A plain file entry owned by nobody in particular (no local user names in shards)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, mtime, 0o644
    return info
