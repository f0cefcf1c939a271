"""The bare aiohttp loop: about the least a client can do and still produce the images.

    python benchmarks/peer_aiohttp.py MANIFEST OUT --base-url URL [--concurrency 32]

One `aiohttp.ClientSession`, an `asyncio.Semaphore(concurrency)`, every manifest line POSTed to
`{base}/images/generations` with its fields, the answer parsed with orjson, each image decoded
(pybase64 when it is installed) and written with `open()`. No ledger, no fsync, no hashing; a
429, a 5xx or a dropped connection is tried again a few times, nothing more. Prints one JSON line:
{"ok": N, "failed": N}.

`--durable` adds what batchimg promises of every image, and nothing else, the usual way: written
to a temp file, fsynced, renamed into place, and the directory fsynced, one image at a time (on
the event loop, as such a script would). Its distance from the plain loop is what per-file
durability costs on the filesystem at hand (batchimg syncs a batch with one syncfs where that is
as safe: see bench_sync.py).

`--ledgered` is the least a client that keeps batchimg's promises can do, the cheapest way: a
`sent` line in `ledger.jsonl` before each request, each image hashed (sha256) and written to a
temp file, the temps of one turn of the event loop made durable together (one syncfs where the
system has it, else an fsync each), renamed into `images/` (never over a file that exists) and
the directory fsynced, and only then the item's ledger line (usage, files, sizes, hashes) and
its `metadata.jsonl` line. All on the event loop, no thread. Its distance from batchimg is what
batchimg's other features cost (the limiter, the budget, pricing, retries with backoff, progress,
the answer's checks); its distance from the plain loop, what the promises themselves cost.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson

try:
    from pybase64 import b64decode
except ImportError:  # pragma: no cover - the standard library's is slower, not different
    from base64 import b64decode

FIELDS = ("model", "prompt", "n", "size", "quality", "output_format", "background")
ATTEMPTS = 5


def plain_write(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def durable_write(path: str, data: bytes) -> None:
    temp = f"{path}.part"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temp, path)
    directory = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class Ledgered:
    """`--ledgered`: the ledger, the metadata and the images of one output directory."""

    def __init__(self, out: str) -> None:
        self.images, self.temps = os.path.join(out, "images"), os.path.join(out, ".tmp")
        os.makedirs(self.images)
        os.makedirs(self.temps)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        self.ledger = os.open(os.path.join(out, "ledger.jsonl"), flags, 0o644)
        self.metadata = os.open(os.path.join(out, "metadata.jsonl"), flags, 0o644)
        self.root = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
        self.settle = self._syncfs() or self._fsync_each
        self.turn: list[tuple[str, str, asyncio.Future[None]]] = []

    def _syncfs(self) -> Callable[[list[str]], None] | None:
        syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
        if syncfs is None:
            return None

        def settle(_temps: list[str]) -> None:
            if syncfs(self.root) != 0:
                raise OSError(ctypes.get_errno(), "syncfs")

        return settle

    @staticmethod
    def _fsync_each(temps: list[str]) -> None:
        for temp in temps:
            fd = os.open(temp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def line(self, fd: int, record: dict[str, Any]) -> None:
        os.write(fd, orjson.dumps(record) + b"\n")

    async def store(self, name: str, data: bytes) -> dict[str, Any]:
        """Write one image, durable and in place once this returns."""
        temp = os.path.join(self.temps, name)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        done = asyncio.get_running_loop().create_future()
        if not self.turn:
            asyncio.get_running_loop().call_soon(self._put_turn)
        self.turn.append((temp, os.path.join(self.images, name), done))
        await done
        return {
            "path": f"images/{name}",
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }

    async def item(self, index: int, line: dict[str, Any], answer: dict[str, Any]) -> None:
        """Store an answer's images, then write its ledger and metadata lines."""
        files = [await self.store(f"{index}-{k}.png", b64decode(image["b64_json"], validate=True))
                 for k, image in enumerate(answer["data"])]  # fmt: skip
        self.line(self.ledger, {"id": str(index), "status": "ok", "usage": answer.get("usage"),
                                "files": files, "at": time.time()})  # fmt: skip
        for entry in files:
            self.line(self.metadata, {"file_name": entry["path"], "id": str(index),
                                      "prompt": line.get("prompt")})  # fmt: skip

    def _put_turn(self) -> None:
        turn, self.turn = self.turn, []
        try:
            self.settle([temp for temp, _, _ in turn])
            for temp, final, _ in turn:
                if os.path.lexists(final):
                    raise FileExistsError(final)
                os.rename(temp, final)
            fd = os.open(self.images, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # every image of the turn fails (none is waited for forever)
            for _, _, done in turn:
                done.set_exception(exc)
            return
        for _, _, done in turn:
            done.set_result(None)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("out")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--durable", action="store_true", help="fsync, rename, sync the dir")
    parser.add_argument("--ledgered", action="store_true", help="batchimg's promises, bare")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ledgered = Ledgered(args.out) if args.ledgered else None
    url = args.base_url.rstrip("/") + "/images/generations"
    headers = {
        "Authorization": f"Bearer {os.environ.get('OPENAI_API_KEY', 'sk-bare')}",
        "Content-Type": "application/json",
    }
    with open(args.manifest, "rb") as fh:
        lines = [orjson.loads(line) for line in fh if line.strip() and not line.startswith(b"#")]
    semaphore = asyncio.Semaphore(args.concurrency)
    write = durable_write if args.durable else plain_write

    async def one(session: aiohttp.ClientSession, index: int, line: dict[str, Any]) -> bool:
        params = {k: line[k] for k in FIELDS if k in line}
        params.setdefault("model", "gpt-image-1")
        body = orjson.dumps(params)
        async with semaphore:
            for attempt in range(ATTEMPTS):
                if ledgered is not None:  # said before it goes: a crash leaves it counted
                    ledgered.line(
                        ledgered.ledger,
                        {
                            "id": str(index),
                            "status": "sent",
                            "attempt": attempt + 1,
                            "at": time.time(),
                        },
                    )
                try:
                    async with session.post(url, data=body, headers=headers) as response:
                        status, raw = response.status, await response.read()
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    status, raw = 0, b""
                if status == 200:
                    break
                if status not in (0, 429) and status < 500:
                    return False
                await asyncio.sleep(0.1 * 2**attempt)
            else:
                return False
        try:
            answer = orjson.loads(raw)
            if ledgered is not None:
                await ledgered.item(index, line, answer)
                return True
            images = answer["data"]
            for k, image in enumerate(images):
                write(os.path.join(args.out, f"{index}-{k}.png"), b64decode(image["b64_json"]))
        except (ValueError, KeyError, TypeError, OSError):
            return False
        return True

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(one(session, i, line) for i, line in enumerate(lines)))
    ok = sum(results)
    print(orjson.dumps({"ok": ok, "failed": len(results) - ok}).decode())


if __name__ == "__main__":
    asyncio.run(main())
