"""A hostile Images API for tests: answers that never end, bombs, trickles.

Every generation it answers is billed as far as the client can tell (a 200 with usage, then the
trouble), so the engine must keep the cost while failing the item. Modes (`HostileServer(mode)`):

    endless_url    `url` answers whose download never ends
    gzip_url       `url` answers whose download is a gzip bomb (GBs of zeros, a few MB sent)
    gzip_json      a gzip-encoded JSON answer padded with GBs outside the image
    endless_b64    a JSON answer whose b64_json never ends
    trickle_url    `url` answers whose download sends a byte every half second, forever
"""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

USAGE = {"total_tokens": 1066, "input_tokens": 10, "output_tokens": 1056,
         "input_tokens_details": {"text_tokens": 10, "image_tokens": 0}}  # fmt: skip
PNG_HEAD = b"\x89PNG\r\n\x1a\n"
CHUNK = 1 << 16


async def _zeros_gzipped(total: int) -> AsyncIterator[bytes]:
    """`total` bytes of zeros, gzip-compressed, made as they are sent (a bomb costs nothing)."""
    gzip = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b"\0" * (1 << 20)
    yield gzip.compress(PNG_HEAD)
    for _ in range(total // len(block)):
        out = gzip.compress(block)
        if out:
            yield out
            await asyncio.sleep(0)
    yield gzip.flush()


class HostileServer:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.generations = 0
        self.downloads_started = threading.Event()
        self.base_url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.generations += 1
        origin = f"{request.scheme}://{request.host}"
        if self.mode in ("endless_url", "gzip_url", "trickle_url"):
            body = {"created": 1, "data": [{"url": f"{origin}/files/{self.mode}"}], "usage": USAGE}
            return web.json_response(body)
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        if self.mode == "gzip_json":
            response.headers["Content-Encoding"] = "gzip"
            await response.prepare(request)
            gzip = zlib.compressobj(9, zlib.DEFLATED, 31)
            start = b'{"created": 1, "usage": ' + orjson.dumps(USAGE) + b', "data": [{"b64_json": "'
            await response.write(gzip.compress(start + b"iVBORw0KGgo=" + b'"}], "pad": "'))
            block = b"a" * (1 << 20)
            for _ in range(4096):  # 4 GB of padding outside the image
                out = gzip.compress(block)
                if out:
                    await response.write(out)
            await response.write(gzip.flush())
            return response
        await response.prepare(request)  # endless_b64
        await response.write(b'{"created": 1, "usage": ' + orjson.dumps(USAGE) +
                             b', "data": [{"b64_json": "iVBORw0KGgo')  # fmt: skip
        block = b"A" * CHUNK
        for _ in range(1 << 16):  # 4 GB of base64
            await response.write(block)
        return response

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.downloads_started.set()
        mode = request.match_info["mode"]
        response = web.StreamResponse(status=200, headers={"Content-Type": "image/png"})
        if mode == "gzip_url":
            response.headers["Content-Encoding"] = "gzip"
            await response.prepare(request)
            async for chunk in _zeros_gzipped(4 << 30):
                await response.write(chunk)
            return response
        await response.prepare(request)
        await response.write(PNG_HEAD)
        if mode == "trickle_url":
            while True:
                await asyncio.sleep(0.5)
                await response.write(b"\0")
        block = b"\1" * CHUNK
        while True:  # endless_url
            await response.write(block)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/images/generations", self._generate)
        app.router.add_get("/files/{mode}", self._file)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def __enter__(self) -> HostileServer:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._loop is not None and self._thread is not None and self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
