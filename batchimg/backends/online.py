"""The online backend: the Images API over HTTP, one aiohttp session per run, one request per
attempt.

`OnlineBackend.send` sends exactly one request and either returns the parsed answer or raises an
`errors.RequestError` subclass saying whether to retry; retrying is the engine's job (see
`retry.py`). Providers differ only by their `profiles.Profile` (paths, auth header). Answers
stream into the temp area it is given (`spool_dir`, which the output store owns): the backend
never writes anywhere else. The API key only ever lives in request headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Sequence
from datetime import timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from .._spool import BadBase64, ImageSink, ResponseSpool, SpooledImage, SpoolError, discard
from ..errors import (
    ErrorInfo,
    ItemFailed,
    RequestError,
    RunFatal,
    StorageError,
    TransportError,
    classify,
)
from ..limiter import RateLimitHeaders
from ..manifest import Item
from ..specs import ANSWER_SLACK
from .base import Answer
from .profiles import ClientConfig

if TYPE_CHECKING:  # imported where used: a run that sends nothing never loads aiohttp
    import aiohttp
    import yarl

    from ..inputs import InputFile

_T = TypeVar("_T")
MIN_SECRET_CHARS = 8
USER_AGENT = "batchimg/0.1"
#: Read at most this much of an error answer or a model list (the API's are a few hundred bytes).
ERROR_BODY_BYTES = 1 << 20
#: When the caller gives no limit: more than any image answer needs (10 images of 8.3 MP).
DEFAULT_LIMIT_BYTES = 1 << 30
#: What an answer may say it produced, and the shape each value must have to be believed (a
#: server's echo goes into the ledger and the dataset's metadata).
_ECHO = {
    "size": re.compile(r"[0-9]{1,5}x[0-9]{1,5}"),
    "quality": re.compile(r"[a-z]{1,16}"),
    "output_format": re.compile(r"[a-z]{1,8}"),
    "background": re.compile(r"[a-z]{1,16}"),
    "complexity": re.compile(r"[a-z]{1,16}"),
}
MAX_RETRY_AFTER_S = 1e6  # beyond it a number is noise; the limiter honours at most a minute
#: What a connection may hold unread before it stops reading (aiohttp's flow control stops at
#: twice this). asyncio receives up to 256 KiB at a time: with aiohttp's 64 KiB default every
#: chunk of a photo-sized answer paused and resumed the socket.
READ_BUFFER_BYTES = 256 * 1024


def parse_retry_after(headers: Any, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, else `retry-after` (secs or date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, min(float(ms) / 1000, MAX_RETRY_AFTER_S))
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, min(float(value), MAX_RETRY_AFTER_S))
    except ValueError:
        pass
    try:
        import email.utils  # an HTTP date here is rare: not imported for every run

        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP-date is always GMT
        when = when.replace(tzinfo=timezone.utc)
    now = time.time() if now is None else now
    return max(0.0, min(when.timestamp() - now, MAX_RETRY_AFTER_S))


def _should_retry(headers: Any) -> bool | None:
    value = (headers.get("x-should-retry") or "").strip().lower()
    return {"true": True, "false": False}.get(value)


class OnlineBackend:
    """Sends image requests over one pooled session; use as an async context manager."""

    def __init__(
        self, config: ClientConfig, *, pool_size: int = 100, spool_dir: Path | None = None
    ) -> None:
        """`pool_size`: connections kept open at most (the run passes its concurrency);
        `spool_dir`: decode `b64_json` images into temp files there while answers stream
        in (entries then carry `"spooled": SpooledImage`), instead of holding whole bodies."""
        self._config = config
        self._pool_size = pool_size
        self._spool_dir = spool_dir
        self._session: aiohttp.ClientSession | None = None
        self._open = False

    async def __aenter__(self) -> OnlineBackend:
        self._open = True  # the session itself is made for the first request
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._open = False
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def where(self) -> str:
        """Where requests go (for messages: it never carries the key)."""
        return self._config.base_url

    @property
    def online(self) -> bool:
        return True  # one request per attempt, answered while it waits

    @property
    def models_url(self) -> str | None:
        """Where the provider lists its models (None: it has no such list)."""
        return self._config.models_url()

    def check(self, item: Item) -> ErrorInfo | None:
        """What this provider cannot be sent: an endpoint its profile does not serve."""
        if item.endpoint in self._config.profile.endpoints:
            return None
        message = f"{self._config.profile.name} does not serve images/{item.endpoint}"
        return ErrorInfo(message=message, code="unsupported_endpoint", type="local_error")

    async def send(self, item: Item, *, limit_bytes: int) -> Answer:
        """One request for the item: a JSON generation, or a multipart edit."""
        if item.endpoint == "edits":
            return await self.edit(item.params, item.images, item.mask, limit_bytes=limit_bytes)
        return await self.generate(item.params, limit_bytes=limit_bytes)

    @property
    def session(self) -> aiohttp.ClientSession:
        """The run's session, made on first use (inside `async with` only)."""
        if self._session is None:
            if not self._open:
                raise RuntimeError("OnlineBackend used outside 'async with'")
            import aiohttp

            timeout = aiohttp.ClientTimeout(
                total=self._config.timeout_s, sock_connect=self._config.connect_timeout_s
            )
            connector = aiohttp.TCPConnector(limit=self._pool_size, limit_per_host=self._pool_size)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=timeout,
                headers={"User-Agent": USER_AGENT},
                read_bufsize=READ_BUFFER_BYTES,
            )
        return self._session

    async def generate(self, params: dict[str, Any], *, limit_bytes: int | None = None) -> Answer:
        """POST one generations request; raise a RequestError subclass on any failure.

        `limit_bytes`: the most of a 2xx body that is read (decompressed); an answer beyond it
        fails its item (`answer_too_large`) instead of filling memory or disk."""
        url = self._config.endpoint_url("generations", str(params.get("model", "")))
        headers = {**self._config.auth_headers(), "Content-Type": "application/json"}
        return await self._post(url, orjson.dumps(params), headers, limit_bytes)

    async def edit(
        self,
        params: dict[str, Any],
        images: Sequence[InputFile],
        mask: InputFile | None = None,
        *,
        limit_bytes: int | None = None,
    ) -> Answer:
        """POST one edits request (multipart); the body is built afresh for every call."""
        import aiohttp

        url = self._config.endpoint_url("edits", str(params.get("model", "")))
        with contextlib.ExitStack() as files:
            form = aiohttp.FormData()
            for name, value in params.items():
                form.add_field(name, str(value))
            # One input goes as `image`; several as repeated `image[]`, as the official SDK does.
            field = "image" if len(images) == 1 else "image[]"
            parts = [(field, f) for f in images] + ([("mask", mask)] if mask else [])
            for name, source in parts:
                try:
                    fh = files.enter_context(open(source.path, "rb"))  # streamed, not held
                except OSError as exc:  # an input file vanished or became unreadable mid-run
                    info = ErrorInfo(message=f"cannot read input file: {exc}", code="input_error")
                    raise ItemFailed(info) from None
                form.add_field(
                    name, fh, filename=source.path.name, content_type=source.content_type
                )
            return await self._post(url, form, self._config.auth_headers(), limit_bytes)

    async def _post(
        self, url: str, body: Any, headers: dict[str, str], limit_bytes: int | None
    ) -> Answer:
        import aiohttp

        started = time.monotonic()
        spooled: list[bytes | SpooledImage] = []
        limit = limit_bytes or DEFAULT_LIMIT_BYTES
        try:
            async with self.session.post(url, data=body, headers=headers) as resp:
                status, resp_headers = resp.status, resp.headers
                request_id = resp_headers.get("x-request-id")
                if status < 400 and self._spool_dir is not None:
                    parsed, spooled, size = await self._spool(resp, self._spool_dir, limit)
                else:
                    cap = limit if status < 400 else ERROR_BODY_BYTES
                    body, size = await _read_capped(resp, cap)
                    if status < 400 and size > cap:
                        raise _too_large(size, cap, request_id)
                    try:
                        parsed = orjson.loads(body) if body and size <= cap else None
                    except orjson.JSONDecodeError:
                        parsed = None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _transport_error(exc) from None
        latency_s = time.monotonic() - started
        ratelimit = RateLimitHeaders.parse(resp_headers)
        if status >= 400:
            error = classify(
                status,
                self._scrub(parsed),
                request_id=self._scrub(request_id),
                retry_after_s=parse_retry_after(resp_headers),
                should_retry=_should_retry(resp_headers),
            )
            error.ratelimit = ratelimit
            raise error
        data = parsed.get("data") if isinstance(parsed, dict) else None
        if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
            discard(spooled)
            what = "not JSON" if parsed is None else "JSON without a 'data' list"
            raise TransportError(
                ErrorInfo(
                    message=f"HTTP {status} answer was {what} ({size} bytes)",
                    code="bad_response",
                    http_status=status,
                    request_id=self._scrub(request_id),
                )
            )
        if spooled:  # the spool left each b64_json empty; its image is on disk, in order
            images = iter(spooled)
            for entry in data:
                if entry.get("b64_json") == "":
                    image = next(images, None)
                    if image is None:  # an empty value the spool did not empty: not an image
                        break
                    entry["spooled"] = image
            discard(list(images))  # spooled from a key outside the data entries: not kept
        assert isinstance(parsed, dict)
        return self.answer(data, parsed, request_id, latency_s, ratelimit)

    def answer(
        self,
        data: list[dict[str, Any]],
        parsed: dict[str, Any],
        request_id: str | None,
        latency_s: float,
        ratelimit: RateLimitHeaders | None = None,
    ) -> Answer:
        """An `ImagesResponse` (parsed, its `data` checked) as an Answer: what the server said
        of the result (`echo`, only in the shapes believed), usage, extra usage, scrubbed."""
        scrub = self._scrub
        echo = {k: v for k, v in parsed.items() if k in _ECHO and _ECHO[k].fullmatch(str(v))}
        extra = {
            k: v for k, v in parsed.items() if k.endswith("_usage") and isinstance(v, dict) and v
        }
        return Answer(
            data=data,
            usage=scrub(parsed.get("usage")),
            request_id=scrub(request_id),
            latency_s=latency_s,
            echo=scrub(echo),
            ratelimit=ratelimit,
            extra_usage=scrub(extra) or None,
        )

    @property
    def config(self) -> ClientConfig:
        return self._config

    def scrub(self, value: _T) -> _T:
        """What a server said, with our own key cut out (see `_scrub`)."""
        return self._scrub(value)

    def _scrub(self, value: _T) -> _T:
        """What a server said, with our own key cut out wherever it echoes it (an answer's
        words end up in the ledger, the logs and error messages)."""
        return scrub_secret(value, self._config.api_key.reveal())

    async def _spool(
        self, resp: aiohttp.ClientResponse, directory: Path, limit: int
    ) -> tuple[Any, list[bytes | SpooledImage], int]:
        """Stream a 2xx body through a ResponseSpool: (parsed JSON or None, images, bytes).
        More than `limit` bytes (decompressed), or more than `ANSWER_SLACK` of it outside the
        images, fails the item."""
        import aiohttp

        spool = ResponseSpool(directory)
        size = 0
        try:
            async for chunk in resp.content.iter_any():
                size += len(chunk)
                if size > limit or spool.json_bytes > ANSWER_SLACK:
                    cap = limit if size > limit else ANSWER_SLACK
                    raise _too_large(size, cap, resp.headers.get("x-request-id"))
                spool.feed(chunk)
            parsed, spooled = spool.finish()
        except BadBase64 as exc:
            spool.abort()
            raise ItemFailed(ErrorInfo(message=str(exc), code="bad_image",
                                       type="invalid_response")) from None  # fmt: skip
        except SpoolError:
            return None, [], size  # reported as a body that is not the JSON promised
        except (aiohttp.ClientError, asyncio.TimeoutError):
            spool.abort()
            raise
        except OSError as exc:  # the temp file cannot be written: the disk, not the network
            spool.abort()
            raise StorageError(f"cannot write images to {directory}: {exc}") from exc
        except BaseException:
            spool.abort()
            raise
        return parsed, spooled, size

    async def list_models(self) -> dict[str, Any]:
        """`GET /models`: every model id the server lists, with its `shutdown_date` as given.

        Raises RequestError (an error answer, or one that is not a model list)."""
        import aiohttp

        url = self._config.models_url()
        if url is None:
            raise ItemFailed(ErrorInfo(message="this provider has no model list", code="no_list"))
        try:
            async with self.session.get(url, headers=self._config.auth_headers()) as resp:
                status = resp.status
                body, size = await _read_capped(resp, 16 * ERROR_BODY_BYTES)
                if size > 16 * ERROR_BODY_BYTES:
                    body = b""  # a listing this big is not one
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _transport_error(exc) from None
        try:
            parsed = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
        if status >= 400:
            raise classify(status, parsed)
        data = parsed.get("data") if isinstance(parsed, dict) else None
        if not isinstance(data, list):
            info = ErrorInfo(message=f"GET {url} did not answer a model list", code="bad_response")
            raise TransportError(info)
        return {
            entry["id"]: entry.get("shutdown_date")
            for entry in data
            if isinstance(entry, dict) and isinstance(entry.get("id"), str)
        }

    async def fetch(self, url: str, *, limit_bytes: int | None = None) -> bytes | SpooledImage:
        """Fetch an image `url` answer (they expire, so at once); no API key is sent with it.

        Streamed into the spool directory (memory holds one chunk, and small images); more than
        `limit_bytes` (decompressed) fails the item (`answer_too_large`)."""
        import aiohttp

        limit = limit_bytes or DEFAULT_LIMIT_BYTES
        target = _image_url(url)
        sink = ImageSink(self._spool_dir) if self._spool_dir is not None else None
        data = bytearray()
        try:
            async with self.session.get(target) as resp:
                status = resp.status
                if status >= 400:
                    await _read_capped(resp, ERROR_BODY_BYTES)
                else:
                    size = 0
                    async for chunk in resp.content.iter_any():
                        size += len(chunk)
                        if size > limit:
                            raise _too_large(size, limit, None, what="downloaded image")
                        if sink is not None:
                            sink.write(chunk)
                        else:
                            data += chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if sink is not None:
                sink.abort()
            raise _transport_error(exc) from None
        except OSError as exc:  # the temp file cannot be written: the disk, not the network
            if sink is not None:
                sink.abort()
            raise StorageError(f"cannot write images to {self._spool_dir}: {exc}") from exc
        except (ValueError, AssertionError) as exc:  # a link aiohttp cannot follow (bad host)
            if sink is not None:
                sink.abort()
            raise _bad_url(url, exc) from None
        except BaseException:
            if sink is not None:
                sink.abort()
            raise
        if status >= 400:
            if sink is not None:
                sink.abort()
            error = classify(status, None)
            # A signed link that expired answers 403: that item is lost, not the whole run.
            raise ItemFailed(error.info) if isinstance(error, RunFatal) else error
        return sink.finish() if sink is not None else bytes(data)


def scrub_secret(value: _T, secret: str) -> _T:
    """`value` (a string, or JSON-like data) with every occurrence of `secret` replaced by
    `***`, in strings and object keys alike. A "key" shorter than `MIN_SECRET_CHARS` (a local
    gateway's `x`) is no secret, and cutting it out would garble every word that holds it."""
    if len(secret) < MIN_SECRET_CHARS or value is None:
        return value
    if isinstance(value, (dict, list)):  # one C-speed look first: most answers never echo it
        try:
            if secret.encode() not in orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS):
                return value
        except orjson.JSONEncodeError:
            pass
    if isinstance(value, str):
        return value.replace(secret, "***") if secret in value else value  # type: ignore[return-value]
    if isinstance(value, dict):
        return {scrub_secret(k, secret): scrub_secret(v, secret) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, list):
        return [scrub_secret(v, secret) for v in value]  # type: ignore[return-value]
    return value


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> tuple[bytes, int]:
    """Up to `cap` bytes of a body (and how many it had, counting to `cap` + 1 at most): an
    error page or a listing is read only that far."""
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > cap:
            return bytes(body[: cap + 1]), cap + 1
    return bytes(body), len(body)


def _image_url(url: str) -> yarl.URL:
    """An answer's image link, if it is one that can be fetched: http(s) with a host."""
    import yarl

    try:
        target = yarl.URL(url)
        host = target.host
    except (ValueError, TypeError, UnicodeError) as exc:
        raise _bad_url(url, exc) from None
    if target.scheme not in ("http", "https") or not host:
        raise _bad_url(url, None)
    return target


def _bad_url(url: str, exc: BaseException | None) -> ItemFailed:
    shown = url if len(url) <= 200 else url[:200] + "…"
    why = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    info = ErrorInfo(message=f"the answer's image link cannot be fetched: {shown!r}{why}",
                     code="bad_url", type="invalid_response")  # fmt: skip
    return ItemFailed(info)


def _too_large(size: int, cap: int, request_id: str | None, what: str = "answer") -> ItemFailed:
    message = (
        f"{what} over {cap:,} bytes (read {size:,} and stopped): more than the request "
        "can need; raise --max-answer-mb if it is genuine"
    )
    return ItemFailed(
        ErrorInfo(message=message, code="answer_too_large", type="invalid_response",
                  request_id=request_id)
    )  # fmt: skip


def _transport_error(exc: BaseException) -> RequestError:
    # A connection that never opened sent nothing (see errors.NOT_SENT_CODES).
    import aiohttp

    never_sent = isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))
    kind = (
        "connect_error"
        if never_sent
        else "timeout"
        if isinstance(exc, asyncio.TimeoutError)
        else "connection_error"
    )
    message = str(exc) or type(exc).__name__
    return TransportError(ErrorInfo(message=f"{type(exc).__name__}: {message}", code=kind))
