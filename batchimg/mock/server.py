"""The mock server: the Images API's HTTP surface on a loopback port.

Surface::

    POST /v1/images/generations                          JSON body
    POST /v1/images/edits                                multipart: image | image[] (1-16), mask;
                                                         or JSON: images [{image_url | file_id}]
                                                         (1-16), mask {image_url | file_id}
    POST /openai/deployments/{dep}/images/generations    Azure shape (api-version query ignored,
    POST /openai/deployments/{dep}/images/edits          model defaults to the deployment name)
    POST /v1/files, GET /v1/files                        upload, list (see `files`)
    GET, DELETE /v1/files/{id}                           a file, its deletion
    GET  /v1/files/{id}/content                          its bytes (a batch's: streamed from disk)
    POST /v1/batches, GET /v1/batches                    create, list (see `batches`)
    GET  /v1/batches/{id}, POST /v1/batches/{id}/cancel  a batch, its cancellation
    GET  /v1/models, /v1/models/{id}                     the mock's models, with shutdown_date
    GET  /v1/_mock/files/{token}                         what `url` data items point at

    auth       Authorization: Bearer KEY (Azure paths also take `api-key: KEY`)   -> 401
    errors     the official envelope {"error": {"message", "type", "param", "code"}}
    headers    every response: `x-request-id: req_<hex>`, `openai-version: 2020-10-01`,
               `openai-processing-ms`; every image answer also `x-ratelimit-limit-*`,
               `-remaining-*`, `-reset-*` for requests and tokens (and images with an
               `ipm_limit`): the configured limits, else generous advertised ones
               (`faults.ADVERTISED_RPM` / `ADVERTISED_TPM`) with real remaining counts;
               none at all with `ratelimit_headers=False`

`stream: true` (GPT image models, n=1, not gif or svg) answers with server-sent events instead
of an `ImagesResponse`: `partial_images` drafts, then the completed image with its usage (each
draft bills 100 more output tokens); see `stream`. Faults apply to streams too: `truncate` cuts
the connection inside the completed event (the drafts got through), `drop` sends nothing.

A request goes through: auth (401) -> body parsing (400) -> the model (404 model_not_found with
`enforce_shutdown`, for a retired or unknown one) -> `latency_s` -> the API's rules (`rules`,
400) -> input images and mask (JSON references resolved by `files`: 400, or 404 for an unknown
file id) -> prompt directives -> configured faults (one seeded draw per request) -> quota ->
success (200: an `ImagesResponse`, or an event stream; usage from `billing`). Edit inputs are
judged by their declared Content-Type (the part's, or the data URL's), as OpenAI does: a part
sent as application/octet-stream is a 400 `unsupported_file_mimetype` even if its bytes are a
PNG.

A batch line takes the same path from the body on, as a JSON request (`_batch_line`): no auth,
limits, latency or online faults, but its batch's fault draw (`batch_error_rate`); streaming
is refused (400); the answer becomes the line's `response` instead of an HTTP answer.

`MockServer.requests` records every image request (`MockRequest`; batch lines with
`via="batch"`, their `custom_id` and `batch_id`), `max_in_flight` the most online requests
answered at once, `uploaded_files` every upload (`deleted_files` those since deleted),
`batches` every batch and `batch_files` the files they wrote, so tests can check what a client
sent, what it was billed, and how concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import random
import re
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import orjson
from aiohttp import BodyPartReader, web
from aiohttp.typedefs import Handler

from . import batches, billing, files, rules
from .config import MockConfig
from .faults import (
    ADVERTISED_RPM,
    ADVERTISED_TPM,
    Directives,
    SlicedLimit,
    decide_fault,
    retry_after_headers,
)
from .images import CORRUPT, EncodedImage, UploadedFile, check_inputs, render_response
from .stream import EventStream, image_events

__all__ = ["MockRequest", "MockServer", "serve"]

_log = logging.getLogger(__name__)

#: OpenAI's own default model is dall-e-2; batchimg's users mean gpt-image, so the mock says so.
DEFAULT_MODEL = "gpt-image-1"
OPENAI_VERSION = "2020-10-01"
#: JSON edits carry up to 16 data URLs of 20,971,520 characters each.
MAX_BODY_BYTES = 16 * files.MAX_DATA_URL_CHARS + 2**20
#: What a handler answers: a whole response, or a stream of events (`stream: true`).
_Answer: TypeAlias = "web.Response | EventStream"
_INT_FORM_FIELDS = ("n", "output_compression", "partial_images", "frame_count", "frame_duration_ms")


@dataclass
class MockRequest:
    """One image request as the mock received it (errors included; 401s carry no body data)."""

    endpoint: str  # "generations" | "edits"
    prompt: str | None
    model: str | None  # the effective model, after defaulting
    n: int | None
    status: int
    request_id: str
    params: dict[str, Any]  # the form/JSON fields as received (no file bytes)
    fault: str | None = None  # the injected fault, if any (see MockConfig)
    received_at: float = 0.0  # time.monotonic() when the request arrived
    image_count: int = 0  # edits: number of input images
    has_mask: bool = False
    #: edits: (field, filename, content type, sha256) of every file part, in order
    files: list[tuple[str, str, str, str]] = field(default_factory=list)
    usage: dict[str, Any] | None = None  # what the mock billed, for 200 answers
    #: sha256 of every image served in a 200 answer, in order
    served_sha256: list[str] = field(default_factory=list)
    content_type: str = ""  # of the request body: application/json | multipart/form-data
    stream: bool = False  # answered (or to be answered) as server-sent events
    #: streams: the type of every event sent whole, in order (a cut one is not listed)
    events: list[str] = field(default_factory=list)
    via: str = "online"  # "online" (an HTTP request) | "batch" (a line of a batch)
    custom_id: str | None = None  # batch lines: the line's custom_id
    batch_id: str | None = None  # batch lines: the batch it belongs to


# -- errors ----------------------------------------------------------------------------------


@dataclass(eq=False)  # exceptions compare by identity
class _ApiError(Exception):
    """An error answer in the official envelope; raised anywhere in a handler."""

    status: int
    message: str
    type_: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def envelope(self) -> dict[str, Any]:
        error = {
            "message": self.message,
            "type": self.type_,
            "param": self.param,
            "code": self.code,
        }
        return {"error": error}

    def response(self) -> web.Response:
        return _json(self.status, self.envelope(), self.headers)


def _from_rule(error: rules.RuleError) -> _ApiError:
    return _ApiError(
        error.status, str(error), type_=error.type_, param=error.param, code=error.code
    )


def _json(
    status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers
    )


def _server_error() -> _ApiError:
    message = "The server had an error while processing your request. Sorry about that!"
    return _ApiError(500, message, type_="server_error", code="server_error")


def _rate_limited(retry_after_s: float, style: str = "both") -> _ApiError:
    headers = retry_after_headers(retry_after_s, style)
    message = f"Rate limit reached for images per min. Please try again in {retry_after_s:g}s."
    return _ApiError(429, message, type_="requests", code="rate_limit_exceeded", headers=headers)


def _model_not_found(model: str) -> _ApiError:
    message = f"The model `{model}` does not exist or you do not have access to it."
    return _ApiError(404, message, param="model", code="model_not_found")


def _quota_exhausted() -> _ApiError:
    message = "You exceeded your current quota, please check your plan and billing details."
    return _ApiError(429, message, type_="insufficient_quota", code="insufficient_quota")


_HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


# -- request parsing -------------------------------------------------------------------------


@dataclass
class _Body:
    params: dict[str, Any]
    edit: bool = False
    multipart: bool = False
    images: list[UploadedFile] = field(default_factory=list)
    mask: UploadedFile | None = None
    #: JSON edits: the images and mask by reference, resolved into `images` / `mask` later
    refs: list[files.ImageRef] = field(default_factory=list)
    mask_ref: files.ImageRef | None = None


@dataclass(frozen=True)
class _Origin:
    """Where a request came in: what its answer's links start with, and the `host:port`
    forms of this server (a JSON edit's URLs that point here are read, not downloaded)."""

    base: str  # scheme://host[:port]
    own_hosts: set[str]


async def _read_object(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        raise _ApiError(
            400,
            "We could not parse the JSON body of your request. "
            "The OpenAI API expects a JSON object as payload.",
        )
    return body


async def _read_json(request: web.Request, *, edit: bool = False) -> _Body:
    return _json_body(await _read_object(request), edit=edit)


def _json_body(body: dict[str, Any], *, edit: bool) -> _Body:
    """A JSON request body as the pipeline takes it (a JSON edit's references taken out)."""
    if not edit:
        return _Body(params=body)
    try:
        refs, mask_ref = files.take_refs(body)
    except rules.RuleError as e:
        raise _from_rule(e) from e
    return _Body(params=body, edit=True, refs=refs, mask_ref=mask_ref)


def _form_value(name: str, text: str) -> Any:
    """Multipart fields arrive as text; give numbers and booleans their JSON types back."""
    if name in _INT_FORM_FIELDS and re.fullmatch(r"-?\d+", text.strip()):
        return int(text)
    if name == "stream" and text in ("true", "false"):
        return text == "true"
    return text


async def _read_form(request: web.Request) -> _Body:
    if request.content_type != "multipart/form-data":
        raise _ApiError(400, "Image edits take a multipart/form-data or an application/json body.")
    body = _Body(params={}, edit=True, multipart=True)
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise _ApiError(400, "Nested multipart bodies are not supported.")
        name = part.name or ""
        data = bytes(await part.read())
        if name in ("image", "image[]", "mask"):
            # RFC 7578: a part without Content-Type is text/plain.
            mime = part.headers.get("Content-Type", "text/plain").split(";")[0].strip().lower()
            file_part = UploadedFile(name, part.filename or "", mime, data)
            if name == "mask":
                body.mask = file_part
            else:
                body.images.append(file_part)
        else:
            body.params[name] = _form_value(name, data.decode("utf-8", errors="replace"))
    return body


# -- the server ------------------------------------------------------------------------------


def _new_request_id() -> str:
    return f"req_{secrets.token_hex(16)}"


def _http_error(request: web.Request, exc: web.HTTPException) -> _ApiError:
    """aiohttp's own errors (no route, body too large) in the official envelope."""
    message = f"Invalid URL ({request.method} {request.path})" if exc.status == 404 else exc.reason
    return _ApiError(exc.status, message)


def _stamp(headers: MutableMapping[str, str], started: float) -> None:
    """The headers OpenAI puts on every answer (besides the request id)."""
    headers.setdefault("openai-version", OPENAI_VERSION)
    elapsed_ms = max(0, round((time.monotonic() - started) * 1000))
    headers.setdefault("openai-processing-ms", str(elapsed_ms))


@web.middleware
async def _envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer routing errors in the official envelope and stamp every response's request id,
    API version and processing time (streams are stamped before their first byte)."""
    started = time.monotonic()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = _http_error(request, exc).response()
    except _ApiError as error:
        response = error.response()
    if not response.prepared:
        _stamp(response.headers, started)
        if "x-request-id" not in response.headers:
            response.headers["x-request-id"] = _new_request_id()
    return response


class MockServer:
    """The mock Images API on a loopback port; `async with` it, or `start_in_thread()` it."""

    def __init__(
        self, config: MockConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config = config or MockConfig()
        self.host = host
        self.requests: list[MockRequest] = []
        self.in_flight = 0  # image requests being answered right now
        self.max_in_flight = 0  # the most seen at once: what a concurrency limit should bound
        self._requested_port = port
        self._port: int | None = None
        self._rng = random.Random(self.config.seed)
        self._admitted = 0  # requests let through the quota gate
        self._limits = {
            kind: SlicedLimit(per_min)
            for kind, per_min in (("requests", config.rpm_limit), ("images", config.ipm_limit))
            if per_min
        }
        # Reported, never enforced: what the headers say when no limit is configured.
        self._advertised = {
            "requests": SlicedLimit(ADVERTISED_RPM),
            "tokens": SlicedLimit(ADVERTISED_TPM),
        }
        self._fail_counts: Counter[str] = Counter()
        self._links: dict[str, EncodedImage] = {}  # /_mock/files tokens of `url` answers
        self._online_requests = 0  # image requests over HTTP (batch lines are not counted)
        #: Every upload to POST /v1/files, by id, deleted ones included (see `deleted_files`)
        self.uploaded_files: dict[str, files.StoredFile] = {}
        self._stalled: set[str] = set()  # result files whose download stalled once
        self.deleted_files: set[str] = set()  # DELETE /v1/files/{id}: uploads and batch files
        self._live_uploads: dict[str, files.StoredFile] = {}  # uploads not deleted
        self.batch_files: dict[str, files.OutputFile] = {}  # what batches wrote, by id
        self._batches = batches.Batches(
            config,
            self._batch_line,
            find_upload=self._live_uploads.get,
            outputs=self.batch_files,
            default_model=DEFAULT_MODEL,
        )
        #: POST /v1/batches, by id (`batches.Batch`: status, counts, file ids, timestamps)
        self.batches = self._batches.batches
        self._runner: web.AppRunner | None = None
        self._thread: tuple[asyncio.AbstractEventLoop, threading.Thread] | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the mock server is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """The URL to give an OpenAI client as `base_url`, e.g. http://127.0.0.1:PORT/v1."""
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/v1"

    def count(self, prompt: str) -> int:
        """How many requests carried this prompt."""
        return sum(1 for r in self.requests if r.prompt == prompt)

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("the mock server is already started")
        app = web.Application(middlewares=[_envelope_middleware], client_max_size=MAX_BODY_BYTES)
        for prefix in ("/v1", "/openai/deployments/{deployment}"):
            app.router.add_post(f"{prefix}/images/generations", self._images)
            app.router.add_post(f"{prefix}/images/edits", self._images)
        app.router.add_post("/v1/files", self._upload)
        app.router.add_get("/v1/files", self._list_files)
        app.router.add_get("/v1/files/{file_id}", self._file_object)
        app.router.add_delete("/v1/files/{file_id}", self._delete_file)
        app.router.add_get("/v1/files/{file_id}/content", self._file_content)
        app.router.add_post("/v1/batches", self._create_batch)
        app.router.add_get("/v1/batches", self._list_batches)
        app.router.add_get("/v1/batches/{batch_id}", self._batch)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self._cancel_batch)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._models)
        app.router.add_get("/v1/_mock/files/{token}", self._file)
        app.router.add_get("/v1/_mock/stats", self._stats)
        # On stop, answers still being held back (latency, slow faults) are cut short.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self._requested_port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await self._batches.close()
            await runner.cleanup()

    async def __aenter__(self) -> MockServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def start_in_thread(self) -> None:
        """Serve from a daemon thread with its own event loop (for sync clients)."""
        if self._thread is not None:
            raise RuntimeError("the mock server is already running in a thread")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="batchimg-mock", daemon=True)
        thread.start()
        self._thread = (loop, thread)
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result()
        except BaseException:
            self.stop_in_thread()
            raise

    def stop_in_thread(self) -> None:
        if self._thread is None:
            return
        loop, thread = self._thread
        self._thread = None
        asyncio.run_coroutine_threadsafe(self.stop(), loop).result()
        asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    # -- handlers --

    def _new_record(self, endpoint: str, content_type: str, **batch: Any) -> MockRequest:
        """A request as it arrives (filled in as it goes through), recorded in `requests`."""
        record = MockRequest(
            endpoint=endpoint,
            prompt=None,
            model=None,
            n=None,
            status=0,
            request_id=self.config.fixed_request_id or _new_request_id(),
            params={},
            received_at=time.monotonic(),
            content_type=content_type,
            **batch,
        )
        self.requests.append(record)
        return record

    async def _images(self, request: web.Request) -> web.StreamResponse:
        endpoint = "edits" if request.path.endswith("/edits") else "generations"
        record = self._new_record(endpoint, request.content_type)
        self._online_requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        answer: _Answer
        try:
            answer = await self._answer(request, endpoint, record)
        except _ApiError as error:
            answer = error.response()
        except web.HTTPException as exc:
            answer = _http_error(request, exc).response()
        finally:
            self.in_flight -= 1
        record.status = answer.status if isinstance(answer, web.Response) else 200
        return await self._deliver(request, answer, record)

    def _headers(self, record: MockRequest) -> dict[str, str]:
        """The headers of an image answer: request id, version, timing and rate limits."""
        headers = {"x-request-id": record.request_id}
        _stamp(headers, record.received_at)
        if self.config.ratelimit_headers:
            now = time.monotonic()
            for kind, limit in {**self._advertised, **self._limits}.items():
                headers.update(limit.headers(kind, now))
        return headers

    async def _deliver(
        self, request: web.Request, answer: _Answer, record: MockRequest
    ) -> web.StreamResponse:
        """Send the answer, or break it the way `record.fault` says."""
        headers = self._headers(record)
        transport = request.transport
        if record.fault == "drop" and transport is not None:
            transport.close()
            return answer if isinstance(answer, web.Response) else web.Response(headers=headers)
        if isinstance(answer, EventStream):
            return await self._send_events(request, answer, headers, record)
        answer.headers.update(headers)
        if record.fault == "truncate" and answer.status == 200 and transport is not None:
            body = bytes(answer.body) if isinstance(answer.body, (bytes, bytearray)) else b""
            stream = web.StreamResponse(status=200, headers=answer.headers)
            stream.content_length = len(body)
            await stream.prepare(request)
            await stream.write(body[: len(body) // 2])
            transport.close()
            return stream
        return answer

    async def _send_events(
        self,
        request: web.Request,
        answer: EventStream,
        headers: dict[str, str],
        record: MockRequest,
    ) -> web.StreamResponse:
        """Stream the events one write each; `truncate` cuts the connection halfway through
        the last one (the completed event), so a client never sees the image complete."""
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = "text/event-stream"
        response.charset = "utf-8"
        response.headers["Cache-Control"] = "no-cache"
        await response.prepare(request)
        transport = request.transport
        cut_at = len(answer.events) - 1 if record.fault == "truncate" else None
        for index, (kind, event) in enumerate(answer.events):
            if index == cut_at and transport is not None:
                await response.write(event[: len(event) // 2])
                transport.close()
                return response
            await response.write(event)
            record.events.append(kind)
        if cut_at == -1 and transport is not None:  # nothing to cut into: end it unfinished
            transport.close()
            return response
        await response.write_eof()
        return response

    async def _answer(self, request: web.Request, endpoint: str, record: MockRequest) -> _Answer:
        deployment = request.match_info.get("deployment")
        self._check_auth(request, azure=deployment is not None)
        if endpoint == "generations":
            body = await _read_json(request)
        elif request.content_type == "application/json":
            body = await _read_json(request, edit=True)
        else:
            body = await _read_form(request)
        origin = _Origin(f"{request.scheme}://{request.host}", self._own_hosts(request.host))
        outcome = await self._pipeline(body, endpoint, record, origin, deployment=deployment)
        return _json(200, outcome) if isinstance(outcome, dict) else outcome

    async def _pipeline(
        self,
        body: _Body,
        endpoint: str,
        record: MockRequest,
        origin: _Origin,
        *,
        deployment: str | None = None,
        server_error: bool = False,
    ) -> dict[str, Any] | EventStream | web.Response:
        """One image request, from its parsed body to its answer: an `ImagesResponse`, an
        event stream, or a broken answer; `_ApiError` for an error answer.

        Online requests (`record.via`) meet the configured limits, latency and faults; a batch
        line meets none of them, only its batch's draw (`server_error`: answer it 500).
        """
        online = record.via == "online"
        params = body.params
        record.params = dict(params)
        if body.refs:
            record.params["images"] = [ref.summary() for ref in body.refs]
        if body.mask_ref is not None:
            record.params["mask"] = body.mask_ref.summary()
        record.image_count = len(body.images) or len(body.refs)
        record.has_mask = body.mask is not None or body.mask_ref is not None
        self._record_files(record, body)
        record.prompt = params["prompt"] if isinstance(params.get("prompt"), str) else None
        record.n = params["n"] if isinstance(params.get("n"), int) else None
        record.stream = params.get("stream") is True
        params = {"model": deployment or DEFAULT_MODEL, **params}
        record.model = params["model"] if isinstance(params["model"], str) else None

        config = self.config
        revoke_after = config.auth_fail_after
        if online and revoke_after is not None and self._online_requests > revoke_after:
            raise _ApiError(401, "This API key has been revoked.", code="invalid_api_key")
        model = self._model(params["model"])
        if online:
            self._enforce_limits(params, record)
            if config.latency_s:
                await asyncio.sleep(config.latency_s)
        try:
            if body.refs and model.kind != "gpt":
                raise rules.RuleError(
                    "model",
                    f"JSON edits support GPT image models only; {model.name} edits take a "
                    "multipart/form-data body.",
                )
            rules.check(params, endpoint, model, multipart=body.multipart)
            if not online and record.stream:
                raise rules.RuleError("stream", "The Batch API does not support streaming.")
            fmt = rules.output_format(params, model)
            if body.refs:
                self._resolve_refs(origin, body)
                self._record_files(record, body)
            inputs = await check_inputs(body.images, body.mask, model, fmt) if body.edit else []
            directives = Directives.parse(params["prompt"])
        except rules.RuleError as e:
            raise _from_rule(e) from e

        # A test's explicit directives decide before the random faults do.
        prompt: str = params["prompt"]
        if directives.fail:
            self._fail_counts[prompt] += 1
            if self._fail_counts[prompt] <= directives.fail:
                raise _server_error()
        if directives.quota:
            raise _quota_exhausted()
        if directives.moderation:
            raise _ApiError(
                400,
                "Your request was rejected as a result of our safety system.",
                type_="image_generation_user_error",
                code="moderation_blocked",
            )

        if server_error:
            record.fault = "server_error"
            raise _server_error()
        if online:
            fault = record.fault = decide_fault(self._rng.random(), config)
            if self._rng.random() < config.datauri_rate:
                directives = dataclasses.replace(directives, datauri=True)
            if fault == "slow":
                await asyncio.sleep(config.slow_s)
            elif fault == "rate_limit":
                style = config.retry_after_style
                if style == "mixed":
                    style = self._rng.choice(("ms", "seconds", "date"))
                raise _rate_limited(config.retry_after_s, style)
            elif fault == "server_error":
                raise _server_error()
            elif fault == "html_error":
                return web.Response(status=502, body=_HTML_502, content_type="text/html")
        if config.quota_after is not None:
            # Counted when admitted, so concurrent requests cannot overdraw the credit.
            if self._admitted >= config.quota_after:
                raise _quota_exhausted()
            self._admitted += 1
        return await self._succeed(origin, params, model, directives, inputs, record)

    async def _batch_line(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        custom_id: str,
        batch_id: str,
        server_error: bool,
    ) -> batches.LineAnswer:
        """One line of a batch through the pipeline, as a JSON request to `endpoint` would go
        (recorded in `requests` with `via="batch"`)."""
        kind = "edits" if endpoint.endswith("/edits") else "generations"
        record = self._new_record(
            kind, "application/json", via="batch", custom_id=custom_id, batch_id=batch_id
        )
        origin = _Origin(self.base_url.removesuffix("/v1"), self._own_hosts())
        try:
            parsed = _json_body(dict(body), edit=kind == "edits")
            outcome = await self._pipeline(parsed, kind, record, origin, server_error=server_error)
        except _ApiError as error:
            record.status = error.status
            return batches.LineAnswer(error.status, record.request_id, error.envelope())
        except Exception:  # a bug of the mock's: a 500 for the line, as aiohttp answers online
            _log.exception("batch %s, line %r: the pipeline failed", batch_id, custom_id)
            record.status = 500
            return batches.LineAnswer(500, record.request_id, _server_error().envelope())
        assert isinstance(outcome, dict)  # no stream, no broken answer: batch lines are JSON
        record.status = 200
        return batches.LineAnswer(200, record.request_id, outcome)

    def _own_hosts(self, *also: str) -> set[str]:
        """The `host:port` forms under which links to this server point at it."""
        port = self.port
        hosts = (self.host, "127.0.0.1", "localhost", "[::1]")
        return {*also, *(f"{host}:{port}" for host in hosts)}

    @staticmethod
    def _record_files(record: MockRequest, body: _Body) -> None:
        uploads = body.images + ([body.mask] if body.mask else [])
        record.files = [(u.field, u.filename, u.content_type, u.sha256) for u in uploads]

    def _resolve_refs(self, origin: _Origin, body: _Body) -> None:
        """A JSON edit's references, made into the inputs a multipart edit would have sent."""

        def resolve(ref: files.ImageRef) -> UploadedFile:
            return files.resolve(
                ref, own_hosts=origin.own_hosts, links=self._links, files=self._live_uploads
            )

        body.images = [resolve(ref) for ref in body.refs]
        if body.mask_ref is not None:
            body.mask = resolve(body.mask_ref)

    def _today(self) -> dt.date:
        if self.config.today:
            return dt.date.fromisoformat(self.config.today)
        return dt.datetime.now(dt.timezone.utc).date()

    def _model(self, name: Any) -> rules.Model:
        """The model a request names: 404 for one the mock does not serve (a name it does not
        know, or with `enforce_shutdown` one past its shutdown date)."""
        model = rules.find(name) if isinstance(name, str) else None
        if model is None or (
            self.config.enforce_shutdown and rules.is_retired(model, self._today())
        ):
            raise _model_not_found(str(name))
        return model

    async def _models(self, request: web.Request) -> web.Response:
        """`GET /v1/models[/{id}]`: the mock's models, each with its `shutdown_date`."""
        self._check_auth(request, azure=False)
        wanted = request.match_info.get("model")
        names = [*rules.MODELS, *rules.SNAPSHOTS]
        if wanted is not None:
            if wanted not in names:
                return _model_not_found(wanted).response()
            names = [wanted]
        listing = [self._model_object(name) for name in names]
        if wanted is not None:
            return _json(200, listing[0])
        return _json(200, {"object": "list", "data": listing})

    def _model_object(self, name: str) -> dict[str, Any]:
        model = rules.find(name)
        assert model is not None
        return {
            "id": name,
            "object": "model",
            "created": model.created,
            "owned_by": "system",
            "shutdown_date": model.shutdown,
        }

    def _enforce_limits(self, params: dict[str, Any], record: MockRequest) -> None:
        """The hard per-slice limits: a 429 saying when the next slice opens."""
        now = time.monotonic()
        n = params.get("n")
        weights = {"requests": 1, "images": n if isinstance(n, int) else 1}
        waits = [limit.wait_s(weights[kind], now) for kind, limit in self._limits.items()]
        wait = max(waits, default=0.0)
        if wait > 0:
            record.fault = "rate_limit"
            style = self.config.retry_after_style
            if style == "mixed":
                style = self._rng.choice(("ms", "seconds", "date"))
            raise _rate_limited(wait, style)
        for kind, limit in self._limits.items():
            limit.take(weights[kind], now)
        self._advertised["requests"].take(1, now)

    def _check_auth(self, request: web.Request, *, azure: bool) -> None:
        if not self.config.require_auth:
            return
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        key = key.strip() if scheme.lower() == "bearer" else ""
        if azure and not key:
            key = request.headers.get("api-key", "").strip()
        if not key:
            message = "You didn't provide an API key (Authorization: Bearer KEY)."
        elif self.config.api_key is not None and key != self.config.api_key:
            message = f"Incorrect API key provided: {key[:3]}***{key[-4:] if len(key) > 8 else ''}."
        else:
            return
        raise _ApiError(401, message, code="invalid_api_key")

    async def _succeed(
        self,
        origin: _Origin,
        params: dict[str, Any],
        model: rules.Model,
        directives: Directives,
        inputs: list[tuple[int, int]],
        record: MockRequest,
    ) -> dict[str, Any] | EventStream:
        prompt = params["prompt"]
        gpt = model.kind == "gpt"
        n = params.get("n") or 1
        fmt = rules.output_format(params, model)
        width, height = rules.resolve_size(params, model)
        transparent = params.get("background") == "transparent"
        drafts = int(params.get("partial_images") or 0) if record.stream else 0
        if directives.corrupt:
            images, partials = [CORRUPT] * n, [CORRUPT] * drafts
        else:
            images, partials = await render_response(
                fmt,
                width,
                height,
                prompt,
                n,
                compression=params.get("output_compression"),
                transparent=transparent,
                frames=rules.frames(params, model),
                detailed=self.config.detailed_images,
                drafts=drafts,
            )
        if self.config.image_count is not None:  # too few or too many: a broken server
            images = (images * self.config.image_count)[: self.config.image_count]
        record.served_sha256 = [image.sha256 for image in images]
        fields: dict[str, Any] = {}  # what a GPT answer (and every stream event) says of itself
        extra: dict[str, Any] = {}  # what only a whole answer or a completed event carries
        if gpt:
            fields["background"] = "transparent" if transparent else "opaque"
            fields["output_format"] = fmt
            fields["size"] = f"{width}x{height}"
            fields["quality"] = rules.resolve_quality(params, model)
            record.usage = usage = billing.usage(params, model, n, inputs, drafts)
            if record.via == "online":  # the Batch API has limits of its own
                self._advertised["tokens"].take(usage["total_tokens"], time.monotonic())
            if self.config.fake_usage is not None:
                extra["usage"] = self.config.fake_usage
            elif not self.config.omit_usage:
                extra["usage"] = usage
            if fmt == "svg":
                extra["svg_usage"] = billing.svg_usage(params)
            identifier = params.get("safety_identifier") or params.get("user")
            if identifier:
                extra["safety_identifier"] = identifier
        if record.stream:  # the rules let only GPT image models stream
            return image_events(
                record.endpoint,
                {"created_at": int(time.time()), **fields},
                [self._b64(image, directives) for image in partials],
                [self._b64(image, directives) for image in images],
                extra,
            )
        as_url = directives.url or (not gpt and params.get("response_format") != "b64_json")
        data: list[dict[str, str]] = []
        for image in images:
            if as_url:
                token = secrets.token_urlsafe(16)
                self._links[token] = image
                data.append({"url": f"{origin.base}/v1/_mock/files/{token}"})
            else:
                data.append({"b64_json": self._b64(image, directives)})
            if model.kind == "dall-e-3":
                data[-1]["revised_prompt"] = prompt
        return {"created": int(time.time()), "data": data, **fields, **extra}

    @staticmethod
    def _b64(image: EncodedImage, directives: Directives) -> str:
        if directives.datauri:
            return f"data:{image.mime};base64,{image.b64}"
        return image.b64

    async def _stats(self, request: web.Request) -> web.Response:
        """Counts for benchmarks and scripts that run the mock in another process."""
        statuses = Counter(str(r.status) for r in self.requests)
        faults = Counter(r.fault for r in self.requests if r.fault)
        batch_states = Counter(batch.status for batch in self.batches.values())
        payload = {
            "requests": len(self.requests),
            "by_status": statuses,
            "faults": faults,
            "batches": batch_states,
        }
        return _json(200, payload)

    async def _file(self, request: web.Request) -> web.Response:
        image = self._links.get(request.match_info["token"])
        if image is None:
            return _ApiError(
                404, "No such file (mock file links live as long as the server)."
            ).response()
        return web.Response(body=image.data, content_type=image.mime)

    # -- the Files API (see `files`) --

    async def _upload(self, request: web.Request) -> web.Response:
        """`POST /v1/files` (multipart `file` and `purpose`): the FileObject."""
        self._check_auth(request, azure=False)
        if request.content_type != "multipart/form-data":
            raise _ApiError(400, "File uploads take a multipart/form-data body.")
        fields: dict[str, str] = {}
        upload: tuple[str, str, bytes] | None = None  # filename, declared type, bytes
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise _ApiError(400, "Nested multipart bodies are not supported.")
            data = bytes(await part.read())
            if part.name == "file":
                mime = part.headers.get("Content-Type", "application/octet-stream")
                upload = (part.filename or "upload", mime.split(";")[0].strip().lower(), data)
            else:
                fields[part.name or ""] = data.decode("utf-8", errors="replace")
        for name, given in (("file", upload is not None), ("purpose", "purpose" in fields)):
            if not given:
                message = f"Missing required parameter: '{name}'."
                raise _ApiError(400, message, param=name, code="missing_required_parameter")
        assert upload is not None
        filename, mime, data = upload
        try:
            stored = files.new_file(filename, fields["purpose"], data, mime)
        except rules.RuleError as e:
            raise _from_rule(e) from e
        self.uploaded_files[stored.id] = self._live_uploads[stored.id] = stored
        if len(self.uploaded_files) == 1:  # the first upload only
            await asyncio.sleep(self.config.upload_delay_s)
        return _json(200, stored.as_object())

    def _stored(self, request: web.Request) -> files.StoredFile | files.OutputFile:
        self._check_auth(request, azure=False)
        file_id = request.match_info["file_id"]
        stored = self._live_uploads.get(file_id) or self.batch_files.get(file_id)
        if stored is None:
            raise _from_rule(files.no_such_file(file_id, "id"))
        return stored

    async def _list_files(self, request: web.Request) -> web.Response:
        """`GET /v1/files`: uploads and batch files, newest first unless `order=asc`."""
        self._check_auth(request, azure=False)
        found: list[files.StoredFile | files.OutputFile] = [
            *self._live_uploads.values(),
            *self.batch_files.values(),
        ]
        found.sort(key=lambda f: f.created_at)
        try:
            return _json(200, files.listing(found, request.query))
        except rules.RuleError as e:
            raise _from_rule(e) from e

    async def _file_object(self, request: web.Request) -> web.Response:
        return _json(200, self._stored(request).as_object())

    async def _delete_file(self, request: web.Request) -> web.Response:
        stored = self._stored(request)
        self.deleted_files.add(stored.id)
        self._live_uploads.pop(stored.id, None)
        output = self.batch_files.pop(stored.id, None)
        if output is not None:
            output.path.unlink(missing_ok=True)
        return _json(200, {"id": stored.id, "object": "file", "deleted": True})

    async def _file_content(self, request: web.Request) -> web.StreamResponse:
        """The bytes; a batch's file streamed from disk (sendfile), never read whole."""
        stored = self._stored(request)
        if isinstance(stored, files.OutputFile):
            headers = {"Content-Type": "application/octet-stream"}
            if self.config.content_stall_s and stored.id not in self._stalled:
                self._stalled.add(stored.id)  # the first download of each file only
                return await self._stalled_content(request, stored.path)
            return web.FileResponse(stored.path, headers=headers)
        return web.Response(body=stored.data, content_type=stored.content_type)

    async def _stalled_content(self, request: web.Request, path: Path) -> web.StreamResponse:
        """A result file's first half, a stall of `content_stall_s`, then the rest."""
        data = path.read_bytes()
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        await asyncio.sleep(self.config.content_stall_s)
        await resp.write(data[len(data) // 2 :])
        await resp.write_eof()
        return resp

    # -- the Batch API (see `batches`) --

    async def _create_batch(self, request: web.Request) -> web.Response:
        """`POST /v1/batches`: the new Batch, validating."""
        self._check_auth(request, azure=False)
        params = await _read_object(request)
        try:
            batch = self._batches.create(params)
        except rules.RuleError as e:
            raise _from_rule(e) from e
        await asyncio.sleep(self.config.batch_create_delay_s)
        return _json(200, batch.as_object())

    async def _list_batches(self, request: web.Request) -> web.Response:
        self._check_auth(request, azure=False)
        try:
            return _json(200, self._batches.listing(request.query))
        except rules.RuleError as e:
            raise _from_rule(e) from e

    async def _batch(self, request: web.Request) -> web.Response:
        self._check_auth(request, azure=False)
        try:
            return _json(200, self._batches.get(request.match_info["batch_id"]).as_object())
        except rules.RuleError as e:
            raise _from_rule(e) from e

    async def _cancel_batch(self, request: web.Request) -> web.Response:
        self._check_auth(request, azure=False)
        try:
            return _json(200, self._batches.cancel(request.match_info["batch_id"]).as_object())
        except rules.RuleError as e:
            raise _from_rule(e) from e


def serve(config: MockConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the mock in the foreground; prints its base URL once listening. Ctrl-C, SIGTERM
    (`kill`, a service manager, a script's `terminate()`) and SIGHUP (its terminal closed,
    unless started under `nohup`) stop it the same way: the server closes and removes the
    files its batches wrote."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            # One inherited as ignored stays so (`nohup batchimg mock` outlives its terminal).
            if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
                with contextlib.suppress(NotImplementedError):  # no such handlers on Windows
                    loop.add_signal_handler(signum, stop.set)
        async with MockServer(config, host=host, port=port) as server:
            print(server.base_url, flush=True)
            await stop.wait()

    # Started from a shell's background job, SIGINT comes in ignored (no job control): a
    # server in the foreground of its own process still stops on Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
