"""The files of a finished output, for the commands that read them (`verify`, `report --html`):
a local directory, or a bucket's prefix (an `ObjectStore`), and the images packed in its
webdataset shards, read as a stream (a shard in a bucket is never downloaded whole)."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from .layouts.webdataset import SHARD_PREFIX, SHARDS_DIR
from .stores import ObjectStore


class OutputTree:
    """An output's files: `out` (a local directory) or `store` (a bucket's prefix)."""

    def __init__(self, out: Path, store: ObjectStore | None = None) -> None:
        self.out, self.store = out, store

    def shards(self) -> list[str]:
        """The shards: their names in the bucket, or their paths."""
        if self.store is not None:
            return [
                name
                for name in self.store.list(SHARDS_DIR)
                if PurePosixPath(name).name.startswith(SHARD_PREFIX) and name.endswith(".tar")
            ]
        return [str(p) for p in sorted((self.out / SHARDS_DIR).glob(f"{SHARD_PREFIX}*.tar"))]

    def open(self, shard: str) -> BinaryIO:
        return self.store.open(shard) if self.store is not None else open(shard, "rb")

    def shown(self, shard: str) -> str:
        return f"{self.store.location}/{shard}" if self.store is not None else shard

    def images(self, shard: str) -> Iterator[tuple[tarfile.TarInfo, IO[bytes]]]:
        """The image members of one shard (not its .json and .txt), each with its bytes to
        read before the next; tarfile.TarError or OSError for a shard that cannot be read."""
        with self.open(shard) as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            for member in tar:
                _, _, ext = member.name.partition(".")
                if ext in ("json", "txt") or not member.isfile():
                    continue
                data = tar.extractfile(member)
                if data is not None:
                    yield member, data
