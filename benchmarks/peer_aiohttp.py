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
"""

from __future__ import annotations

import argparse
import asyncio
import os
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


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("manifest")
    parser.add_argument("out")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--durable", action="store_true", help="fsync, rename, sync the dir")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
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
            images = orjson.loads(raw)["data"]
            for k, image in enumerate(images):
                write(os.path.join(args.out, f"{index}-{k}.png"), b64decode(image["b64_json"]))
        except (ValueError, KeyError, TypeError):
            return False
        return True

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(one(session, i, line) for i, line in enumerate(lines)))
    ok = sum(results)
    print(orjson.dumps({"ok": ok, "failed": len(results) - ok}).decode())


if __name__ == "__main__":
    asyncio.run(main())
