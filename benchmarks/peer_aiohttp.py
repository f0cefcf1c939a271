"""The bare aiohttp loop: about the least a client can do and still produce the images.

    python benchmarks/peer_aiohttp.py MANIFEST OUT --base-url URL [--concurrency 32]

One `aiohttp.ClientSession`, an `asyncio.Semaphore(concurrency)`, every manifest line POSTed to
`{base}/images/generations` with its fields, the answer parsed with orjson, each image decoded
(pybase64 with `validate=True` when it is installed: its fast path, several times quicker than
without on a photo-sized image) and written with `open()`. No ledger, no fsync, no hashing; a
429, a 5xx or a dropped connection is tried again a few times, nothing more. Prints one JSON line:
{"ok": N, "failed": N}.

`--durable` adds what batchimg promises of every image, and nothing else, the usual way: written
to a temp file, fsynced, renamed into place, and the directory fsynced, one image at a time (on
the event loop, as such a script would). Its distance from the plain loop is what per-file
durability costs on the filesystem at hand (batchimg syncs a batch with one syncfs where that is
as safe: see bench_sync.py).

`--ledgered` keeps batchimg's promises for each image's bytes and its ledger lines, the cheap
way, all on the event loop: a `sent` line in `ledger.jsonl` before each request; each image
decoded with validation, written to a temp file (in 1 MiB pieces) and hashed (sha256); the temps
of one turn of the loop made durable together with one syncfs, renamed into `images/` (never over
a file that exists: that image fails) and the directory fsynced; then the item's ledger line
(usage, files, sizes, hashes) and its `metadata.jsonl` lines, both files fsynced once a second
and at the end. Where libc has no syncfs each temp is fsynced through the descriptor that wrote
it. (batchimg also checks that the kernel and the filesystem make syncfs as safe as an fsync:
this peer does not, so run it where batchimg uses syncfs, as the runner does on ext4 and tmpfs.)
Not kept: the cost bound and run id of a `sent` line, the image's format check, the ledger's
torn-tail repair and the temp area's clean-up at start. Its distance from the plain loop is what
the promises cost; batchimg's distance from it, what batchimg's other per-item work costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import hashlib
import os
import time
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
    fsync_directory(os.path.dirname(path))


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PIECE = 1 << 20  # one write of 2 MB or more costs several times as much on ext4 here (run.py)


def write_all(fd: int, data: bytes) -> None:
    """All of `data`, in pieces of `PIECE` (OSError if the disk takes none of a piece)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:PIECE])
        if not written:
            raise OSError(errno.ENOSPC, "nothing written")
        view = view[written:]


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
        self.syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
        self.turn: list[tuple[str, str, asyncio.Future[None]]] = []
        self._lines_synced: asyncio.TimerHandle | None = None

    def line(self, fd: int, record: dict[str, Any]) -> None:
        data = orjson.dumps(record) + b"\n"
        if os.write(fd, data) != len(data):
            raise OSError(errno.ENOSPC, "short write of a line")
        if self._lines_synced is None:  # the lines are fsynced once a second, as batchimg does
            self._lines_synced = asyncio.get_running_loop().call_later(1.0, self.sync_lines)

    def sync_lines(self) -> None:
        self._lines_synced = None
        os.fsync(self.ledger)
        os.fsync(self.metadata)

    def sent(self, index: int, attempt: int) -> None:
        """Said before a request goes: if the process dies with it in flight, it is counted."""
        self.line(self.ledger, {"record": "sent", "id": str(index), "attempt": attempt,
                                "at": time.time()})  # fmt: skip

    async def item(self, index: int, prompt: Any, usage: Any, values: list[Any]) -> None:
        """Store an answer's images (its `b64_json` values, dropped as they are decoded), then
        write the item's ledger line and its metadata lines."""
        files: list[dict[str, Any]] = []
        temps: list[tuple[str, str]] = []  # (temp, final)
        for k, value in enumerate(values):  # all decoded first: a bad one stores none
            values[k] = b64decode(value, validate=True)
            del value
        try:
            for k, data in enumerate(values):
                values[k] = None
                name = f"{index}-{k}.png"
                temp = os.path.join(self.temps, name)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                temps.append((temp, os.path.join(self.images, name)))
                try:
                    write_all(fd, data)
                    if self.syncfs is None:  # no syncfs: each through the descriptor that wrote it
                        os.fsync(fd)
                finally:
                    os.close(fd)
                files.append({"path": f"images/{name}", "bytes": len(data),
                              "sha256": hashlib.sha256(data).hexdigest()})  # fmt: skip
                del data  # not held while the turn's sync is awaited
        except OSError:
            for temp, _ in temps:
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            raise
        await asyncio.gather(*(self._put(temp, final) for temp, final in temps))
        self.line(self.ledger, {"id": str(index), "status": "ok", "usage": usage,
                                "files": files, "at": time.time()})  # fmt: skip
        for entry in files:
            self.line(self.metadata, {"file_name": entry["path"], "id": str(index),
                                      "prompt": prompt})  # fmt: skip

    def _put(self, temp: str, final: str) -> asyncio.Future[None]:
        """Durable and in place at the end of this turn of the event loop, with the others."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if not self.turn:
            loop.call_soon(self._put_turn)
        self.turn.append((temp, final, done))
        return done

    def _put_turn(self) -> None:
        """One syncfs for the turn's temps, their renames (never over a file: that one fails),
        one directory fsync; every image waiting gets its answer, whatever happens."""
        turn, self.turn = self.turn, []
        put: list[asyncio.Future[None]] = []
        try:
            if self.syncfs is not None and self.syncfs(self.root) != 0:
                raise OSError(ctypes.get_errno(), "syncfs")
            for temp, final, done in turn:
                try:
                    if os.path.lexists(final):
                        raise FileExistsError(errno.EEXIST, "exists: not overwritten", final)
                    os.rename(temp, final)
                    put.append(done)
                except OSError as exc:
                    with contextlib.suppress(OSError):
                        os.unlink(temp)
                    _answer(done, exc)
            fsync_directory(self.images)
        except BaseException as exc:
            for _, _, done in turn:
                _answer(done, exc if isinstance(exc, Exception) else OSError("interrupted"))
            if not isinstance(exc, Exception):
                raise
            return
        for done in put:
            _answer(done, None)

    def close(self) -> None:
        if self._lines_synced is not None:
            self._lines_synced.cancel()
        self.sync_lines()


def _answer(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():  # cancelled: nobody waits
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("out")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--durable", action="store_true", help="fsync, rename, sync the dir")
    mode.add_argument("--ledgered", action="store_true", help="batchimg's promises, bare")
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
                if ledgered is not None:
                    ledgered.sent(index, attempt + 1)
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
            images = answer["data"]
            if ledgered is not None:  # nothing but the images' values held while they are stored
                values, usage = [image["b64_json"] for image in images], answer.get("usage")
                del raw, answer, images, response  # the response keeps its body
                await ledgered.item(index, line.get("prompt"), usage, values)
                return True
            for k, image in enumerate(images):
                data = b64decode(image["b64_json"], validate=True)
                write(os.path.join(args.out, f"{index}-{k}.png"), data)
        except (ValueError, KeyError, TypeError, OSError):
            return False
        return True

    try:
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(one(session, i, line) for i, line in enumerate(lines)))
    finally:
        if ledgered is not None:  # its lines fsynced, however the run ends
            ledgered.close()
    ok = sum(results)
    print(orjson.dumps({"ok": ok, "failed": len(results) - ok}).decode())


if __name__ == "__main__":
    asyncio.run(main())
