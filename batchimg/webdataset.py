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

from .dataset import metadata_rows
from .errors import StorageError, UsageError
from .writer import IMAGES_DIR, TEMP_SUFFIX, atomic_file

SHARDS_DIR = "shards"
SHARD_PREFIX = "shard-"
DEFAULT_SHARD_SIZE = 1000


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
        for stale in self.dir.glob(f".*{TEMP_SUFFIX}"):
            stale.unlink(missing_ok=True)
        shards = sorted(self.dir.glob(f"{SHARD_PREFIX}*.tar"))
        self._next_index = 0
        for path in shards:
            with contextlib.suppress(ValueError):
                index = int(path.stem.removeprefix(SHARD_PREFIX))
                self._next_index = max(self._next_index, index + 1)
        self._drop_packed_leftovers(shards)
        self._pending: dict[str, _Sample] = {}  # by key: a later record for a key replaces
        self._jobs: queue.SimpleQueue[list[_Sample] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.error: StorageError | None = None  # the first shard that could not be written
        self._abandoned = False

    def _drop_packed_leftovers(self, shards: list[Path]) -> None:
        """Delete loose images a crash left behind after their shard was written.

        Exact: only the keys of loose files are looked up in the shards, and a loose file goes
        only if the shard's sample has the same sha256 (a re-done item's newer image stays).
        """
        images = self.out_dir / IMAGES_DIR
        loose = {
            sample_key(p.name): p
            for p in (images.iterdir() if images.is_dir() else ())
            if not p.name.startswith(".") and p.is_file()
        }
        for path in shards:
            if not loose:
                return
            try:
                with tarfile.open(path) as tar:
                    for member in tar:
                        key, _, ext = member.name.partition(".")
                        if ext != "json" or key not in loose:
                            continue
                        data = tar.extractfile(member)
                        row = orjson.loads(data.read()) if data is not None else {}
                        if row.get("sha256") == _sha256_of(loose[key]):
                            loose.pop(key).unlink()
            except (tarfile.TarError, orjson.JSONDecodeError, EOFError) as exc:
                raise UsageError(
                    f"{path} is not a readable shard ({exc}): move it out of {self.dir}, then "
                    "re-run (its images are packed again only if they are still loose)"
                ) from None

    def add(self, record: dict[str, Any]) -> None:
        """Queue the loose images of one ok record (its ledger line is written); StorageError
        if an earlier shard could not be written."""
        if self.error is not None:
            raise self.error
        for row in metadata_rows(record):
            image = self.out_dir / row.pop("file_name")
            if not image.exists():  # packed by an earlier run (or removed by hand)
                continue
            key = sample_key(image.name)
            row["sha256"] = record["sha256"][row["image_index"]]
            self._pending[key] = _Sample(key, image, row)
        if self._thread is not None:
            self._submit_full()

    def keep_only(self, done: Container[str]) -> None:
        """After the resume scan: drop queued images of ids whose last state is not ok (they
        run again, and their new image is queued when it is stored)."""
        self._pending = {k: s for k, s in self._pending.items() if s.row["id"] in done}

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
        elif self._thread is not None:  # aborted: finish the shard being written, no more
            self._abandoned = True
            self._jobs.put(None)
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Pack what is left (a shorter last shard) and wait for every shard to be written."""
        if self._thread is None:
            return
        if self._pending:
            self._jobs.put(list(self._pending.values()))
            self._pending = {}
        self._jobs.put(None)
        self._thread.join()
        self._thread = None

    def _submit_full(self) -> None:
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
                self.error = StorageError(f"cannot write a shard in {self.dir}: {exc}")

    def _write_shard(self, batch: list[_Sample]) -> None:
        name = f"{SHARD_PREFIX}{self._next_index:06d}.tar"
        self._next_index += 1
        with (
            atomic_file(self.dir / name) as fh,
            tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            packed = [sample for sample in batch if _add_sample(tar, sample)]
        for sample in packed:  # durable in the shard: the loose copies can go
            with contextlib.suppress(OSError):
                sample.image.unlink()


def _sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _add_sample(tar: tarfile.TarFile, sample: _Sample) -> bool:
    """Add one sample; False (nothing added) if the loose file is not the image its ledger
    line names (gone, or replaced by a newer image of the same key, queued on its own)."""
    try:
        data = sample.image.read_bytes()
    except FileNotFoundError:
        return False
    if hashlib.sha256(data).hexdigest() != sample.row["sha256"]:
        return False
    mtime = int(time.time())
    tar.addfile(_member(f"{sample.key}{sample.image.suffix}", len(data), mtime), io.BytesIO(data))
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
