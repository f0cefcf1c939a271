"""The mock server: the Images API's HTTP surface on a loopback port.

Surface::

    POST /v1/images/generations                          JSON body
    POST /v1/images/edits                                multipart: image | image[] (1-16), mask
    POST /openai/deployments/{dep}/images/generations    Azure shape (api-version query ignored,
    POST /openai/deployments/{dep}/images/edits          model defaults to the deployment name)
    GET  /v1/models, /v1/models/{id}                     the mock's models, with shutdown_date
    GET  /v1/_mock/files/{token}                         what `url` data items point at

    auth       Authorization: Bearer KEY (Azure paths also take `api-key: KEY`)   -> 401
    every response carries `x-request-id: req_<hex>`; errors use the official envelope
    {"error": {"message", "type", "param", "code"}}

A request goes through: auth (401) -> body parsing (400) -> the model (404 model_not_found with
`enforce_shutdown`, for a retired or unknown one) -> `latency_s` -> the API's rules (`rules`,
400) -> input images and mask (400) -> prompt directives -> configured faults (one seeded draw
per request) -> quota -> success (200, `ImagesResponse`, usage from `billing`). Edit inputs are
judged by their declared part Content-Type, as OpenAI does: a part sent as
application/octet-stream is a 400 `unsupported_file_mimetype` even if its bytes are a PNG.

`MockServer.requests` records every image request (`MockRequest`), and `max_in_flight` the
most answered at once, so tests can check what a client sent and how concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import random
import re
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import BodyPartReader, web
from aiohttp.typedefs import Handler

from . import billing, rules
from .config import MockConfig
from .faults import Directives, SlicedLimit, decide_fault, retry_after_headers
from .images import CORRUPT, EncodedImage, UploadedFile, check_inputs, render_response

__all__ = ["MockRequest", "MockServer", "serve"]

#: OpenAI's own default model is dall-e-2; batchimg's users mean gpt-image, so the mock says so.
DEFAULT_MODEL = "gpt-image-1"
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

    def response(self) -> web.Response:
        error = {
            "message": self.message,
            "type": self.type_,
            "param": self.param,
            "code": self.code,
        }
        return _json(self.status, {"error": error}, self.headers)


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
    images: list[UploadedFile] = field(default_factory=list)
    mask: UploadedFile | None = None


async def _read_json(request: web.Request) -> _Body:
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
    return _Body(params=body)


def _form_value(name: str, text: str) -> Any:
    """Multipart fields arrive as text; give numbers and booleans their JSON types back."""
    if name in _INT_FORM_FIELDS and re.fullmatch(r"-?\d+", text.strip()):
        return int(text)
    if name == "stream" and text in ("true", "false"):
        return text == "true"
    return text


async def _read_form(request: web.Request) -> _Body:
    if request.content_type != "multipart/form-data":
        raise _ApiError(400, "Image edits take a multipart/form-data body.")
    body = _Body(params={}, edit=True)
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


@web.middleware
async def _envelope_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer routing errors in the official envelope and stamp every response's request id."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = _http_error(request, exc).response()
    except _ApiError as error:
        response = error.response()
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
        self._fail_counts: Counter[str] = Counter()
        self._files: dict[str, EncodedImage] = {}
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
        app = web.Application(middlewares=[_envelope_middleware])
        for prefix in ("/v1", "/openai/deployments/{deployment}"):
            app.router.add_post(f"{prefix}/images/generations", self._images)
            app.router.add_post(f"{prefix}/images/edits", self._images)
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

    async def _images(self, request: web.Request) -> web.StreamResponse:
        endpoint = "edits" if request.path.endswith("/edits") else "generations"
        record = MockRequest(
            endpoint=endpoint,
            prompt=None,
            model=None,
            n=None,
            status=0,
            request_id=self.config.fixed_request_id or _new_request_id(),
            params={},
            received_at=time.monotonic(),
        )
        self.requests.append(record)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = await self._answer(request, endpoint, record)
        except _ApiError as error:
            response = error.response()
        except web.HTTPException as exc:
            response = _http_error(request, exc).response()
        finally:
            self.in_flight -= 1
        record.status = response.status
        return await self._deliver(request, response, record)

    async def _deliver(
        self, request: web.Request, response: web.Response, record: MockRequest
    ) -> web.StreamResponse:
        """Send the answer, or break it the way `record.fault` says."""
        response.headers["x-request-id"] = record.request_id
        if self.config.ratelimit_headers:
            now = time.monotonic()
            for kind, limit in self._limits.items():
                response.headers.update(limit.headers(kind, now))
        transport = request.transport
        if record.fault == "drop" and transport is not None:
            transport.close()
            return response
        if record.fault == "truncate" and response.status == 200 and transport is not None:
            body = bytes(response.body) if isinstance(response.body, (bytes, bytearray)) else b""
            stream = web.StreamResponse(status=200, headers=response.headers)
            stream.content_length = len(body)
            await stream.prepare(request)
            await stream.write(body[: len(body) // 2])
            transport.close()
            return stream
        return response

    async def _answer(
        self, request: web.Request, endpoint: str, record: MockRequest
    ) -> web.Response:
        deployment = request.match_info.get("deployment")
        self._check_auth(request, azure=deployment is not None)
        body = await (_read_form(request) if endpoint == "edits" else _read_json(request))
        params = body.params
        record.params = dict(params)
        record.image_count, record.has_mask = len(body.images), body.mask is not None
        uploads = body.images + ([body.mask] if body.mask else [])
        record.files = [(u.field, u.filename, u.content_type, u.sha256) for u in uploads]
        record.prompt = params["prompt"] if isinstance(params.get("prompt"), str) else None
        record.n = params["n"] if isinstance(params.get("n"), int) else None
        params = {"model": deployment or DEFAULT_MODEL, **params}
        record.model = params["model"] if isinstance(params["model"], str) else None

        config = self.config
        if config.auth_fail_after is not None and len(self.requests) > config.auth_fail_after:
            raise _ApiError(401, "This API key has been revoked.", code="invalid_api_key")
        model = self._model(params["model"])
        self._enforce_limits(params, record)
        if config.latency_s:
            await asyncio.sleep(config.latency_s)
        try:
            rules.check(params, endpoint, model)
            fmt = rules.output_format(params, model)
            inputs = await check_inputs(body.images, body.mask, model, fmt) if body.edit else []
            directives = Directives.parse(params["prompt"])
        except rules.RuleError as e:
            raise _ApiError(e.status, str(e), type_=e.type_, param=e.param, code=e.code) from e

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
        return await self._succeed(request, params, model, directives, inputs, record)

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
        request: web.Request,
        params: dict[str, Any],
        model: rules.Model,
        directives: Directives,
        inputs: list[tuple[int, int]],
        record: MockRequest,
    ) -> web.Response:
        prompt = params["prompt"]
        gpt = model.kind == "gpt"
        n = params.get("n") or 1
        fmt = rules.output_format(params, model)
        width, height = rules.resolve_size(params, model)
        transparent = params.get("background") == "transparent"
        images = (
            [CORRUPT] * n
            if directives.corrupt
            else await render_response(
                fmt,
                width,
                height,
                prompt,
                n,
                compression=params.get("output_compression"),
                transparent=transparent,
                frames=rules.frames(params, model),
                detailed=self.config.detailed_images,
            )
        )
        if self.config.image_count is not None:  # too few or too many: a broken server
            images = (images * self.config.image_count)[: self.config.image_count]
        record.served_sha256 = [image.sha256 for image in images]
        as_url = directives.url or (not gpt and params.get("response_format") != "b64_json")
        data: list[dict[str, str]] = []
        for image in images:
            if as_url:
                token = secrets.token_urlsafe(16)
                self._files[token] = image
                data.append({"url": f"{request.scheme}://{request.host}/v1/_mock/files/{token}"})
            elif directives.datauri:
                data.append({"b64_json": f"data:{image.mime};base64,{image.b64}"})
            else:
                data.append({"b64_json": image.b64})
            if model.kind == "dall-e-3":
                data[-1]["revised_prompt"] = prompt
        payload: dict[str, Any] = {"created": int(time.time()), "data": data}
        if gpt:
            payload["background"] = "transparent" if transparent else "opaque"
            payload["output_format"] = fmt
            payload["size"] = f"{width}x{height}"
            payload["quality"] = rules.resolve_quality(params, model)
            record.usage = billing.usage(params, model, n, inputs)
            if self.config.fake_usage is not None:
                payload["usage"] = self.config.fake_usage
            elif not self.config.omit_usage:
                payload["usage"] = record.usage
            if fmt == "svg":
                payload["svg_usage"] = billing.svg_usage(params)
            identifier = params.get("safety_identifier") or params.get("user")
            if identifier:
                payload["safety_identifier"] = identifier
        return _json(200, payload)

    async def _stats(self, request: web.Request) -> web.Response:
        """Counts for benchmarks and scripts that run the mock in another process."""
        statuses = Counter(str(r.status) for r in self.requests)
        faults = Counter(r.fault for r in self.requests if r.fault)
        payload = {"requests": len(self.requests), "by_status": statuses, "faults": faults}
        return _json(200, payload)

    async def _file(self, request: web.Request) -> web.Response:
        image = self._files.get(request.match_info["token"])
        if image is None:
            return _ApiError(
                404, "No such file (mock file links live as long as the server)."
            ).response()
        return web.Response(body=image.data, content_type=image.mime)


def serve(config: MockConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the mock in the foreground; prints its base URL once listening; Ctrl-C stops it."""

    async def main() -> None:
        async with MockServer(config, host=host, port=port) as server:
            print(server.base_url, flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
