"""The Batch API's wire: Files (upload, list, download) and Batches (create, list, get, cancel).

A batch is not one attempt per request, so it does not go through `Backend.send`: the batch
driver (`engine/batch.py`) writes the input files, and this client moves them and their results
over the online backend's session (same base URL, key and timeouts). Every call answers parsed
JSON or raises the same `errors.RequestError` tree as an image request (`classify`), with the
key cut out of whatever the server said. Result files are streamed to disk, never held.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.to_thread
import orjson

from ..errors import ErrorInfo, StorageError, TransportError, classify
from ..stores.local import fsync_file
from .online import ERROR_BODY_BYTES, OnlineBackend, _read_capped, _transport_error
from .profiles import ClientConfig

#: The most of a JSON answer (a batch, a listing) that is read.
JSON_BYTES = 16 * ERROR_BODY_BYTES
#: Pages of a listing looked through when re-attaching to a file or batch a crash left unnamed.
LIST_PAGES = 20
#: The metadata key that names a batch's input file (so a re-run finds it by listing).
META_KEY = "batchimg_file"
CHUNK = 1 << 20


class BatchAPI:
    """Files and Batches, over an open `OnlineBackend`'s session."""

    def __init__(self, backend: OnlineBackend, config: ClientConfig) -> None:
        self._backend = backend
        self._config = config
        self._base = config.base_url.rstrip("/")

    @property
    def where(self) -> str:
        return self._base

    async def upload(
        self, path: Path, filename: str, purpose: str, content_type: str = "application/jsonl"
    ) -> str:
        """`POST /files`: the file at `path` (streamed), named `filename`; its id."""
        with open(path, "rb") as fh:
            form = aiohttp.FormData()
            form.add_field("purpose", purpose)
            form.add_field("file", fh, filename=filename, content_type=content_type)
            answer = await self._call("POST", "/files", data=form)
        return _id(answer, "file")

    async def find_file(self, filename: str, purpose: str) -> str | None:
        """The id of an uploaded file of that name and purpose (newest first), if any."""
        async for entry in self._list("/files", {"purpose": purpose, "order": "desc"}):
            if entry.get("filename") == filename and entry.get("purpose") == purpose:
                return _id(entry, "file")
        return None

    async def file(self, file_id: str) -> dict[str, Any]:
        """`GET /files/{id}`: the file object (ItemFailed 404 once it is deleted or expired)."""
        return await self._call("GET", f"/files/{file_id}")

    async def list_files(self, purpose: str) -> dict[str, str]:
        """Filename -> id of the uploaded files of a purpose (the newest of each name)."""
        found: dict[str, str] = {}
        async for entry in self._list("/files", {"purpose": purpose, "order": "desc"}):
            name, file_id = entry.get("filename"), entry.get("id")
            if isinstance(name, str) and isinstance(file_id, str):
                found.setdefault(name, file_id)
        return found

    async def create(self, input_file_id: str, endpoint: str, name: str) -> dict[str, Any]:
        """`POST /batches` over an uploaded input file; the Batch."""
        body = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": "24h",
            "metadata": {META_KEY: name},
        }
        return await self._call("POST", "/batches", json=body)

    async def find_batch(self, input_file_id: str) -> dict[str, Any] | None:
        """A batch already made from that input file (newest first), if any."""
        async for entry in self._list("/batches", {}):
            if entry.get("input_file_id") == input_file_id:
                return entry
        return None

    async def get(self, batch_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/batches/{batch_id}")

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/batches/{batch_id}/cancel")

    async def download(self, file_id: str, dest: Path) -> int:
        """`GET /files/{id}/content` streamed into `dest` (through `dest.part`, synced, then
        renamed: a crash never leaves a half file under the final name); bytes written."""
        part = dest.with_name(dest.name + ".part")
        url = f"{self._base}/files/{file_id}/content"
        size = 0
        try:
            async with self._backend.session.get(url, headers=self._config.auth_headers()) as resp:
                if resp.status >= 400:
                    body, _ = await _read_capped(resp, ERROR_BODY_BYTES)
                    raise classify(resp.status, _loads(body), request_id=_rid(resp))
                fh = await anyio.to_thread.run_sync(open, part, "wb")
                try:
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        size += len(chunk)
                        await anyio.to_thread.run_sync(fh.write, chunk)
                    await anyio.to_thread.run_sync(fsync_file, fh)
                finally:
                    fh.close()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            part.unlink(missing_ok=True)
            raise _transport_error(exc) from None
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise StorageError(f"cannot write {part}: {exc.strerror or exc}") from exc
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, dest)
        return size

    # -- the plumbing --

    async def _list(self, path: str, query: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        after: str | None = None
        for _ in range(LIST_PAGES):
            params = {**query, "limit": "100", **({"after": after} if after else {})}
            page = await self._call("GET", path, params=params)
            data = page.get("data")
            if not isinstance(data, list):
                return
            for entry in data:
                if isinstance(entry, dict):
                    yield entry
            last = data[-1].get("id") if data and isinstance(data[-1], dict) else None
            if not page.get("has_more") or not isinstance(last, str):
                return
            after = last

    async def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        url = self._base + path
        headers = self._config.auth_headers()
        try:
            async with self._backend.session.request(
                method, url, headers=headers, **kwargs
            ) as resp:
                body, size = await _read_capped(resp, JSON_BYTES)
                status, request_id = resp.status, _rid(resp)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _transport_error(exc) from None
        parsed = self._backend.scrub(_loads(body) if size <= JSON_BYTES else None)
        if status >= 400:
            raise classify(status, parsed, request_id=self._backend.scrub(request_id))
        if not isinstance(parsed, dict):
            info = ErrorInfo(
                message=f"{method} {path}: HTTP {status} answer was not a JSON object",
                code="bad_response",
                http_status=status,
            )
            raise TransportError(info)
        return parsed


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None


def _rid(resp: aiohttp.ClientResponse) -> str | None:
    return resp.headers.get("x-request-id")


def _id(answer: dict[str, Any], what: str) -> str:
    value = answer.get("id")
    if not isinstance(value, str) or not value:
        raise TransportError(ErrorInfo(message=f"the API answered a {what} without an id",
                                       code="bad_response"))  # fmt: skip
    return value
