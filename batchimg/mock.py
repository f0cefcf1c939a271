"""An OpenAI-compatible mock of the Images API, embedded so tests and `batchimg run --mock` can
exercise the whole engine over real HTTP, and so the official `openai` client works against it.

Surface::

    POST /v1/images/generations                          JSON body
    POST /v1/images/edits                                multipart: image | image[] (1-16), mask
    POST /openai/deployments/{dep}/images/generations    Azure shape (api-version query ignored,
    POST /openai/deployments/{dep}/images/edits          model defaults to the deployment name)
    GET  /v1/_mock/files/{token}                         what `url` data items point at

    auth       Authorization: Bearer KEY (Azure paths also take `api-key: KEY`)   -> 401
    every response carries `x-request-id: req_<hex>`; errors use the official envelope
    {"error": {"message", "type", "param", "code"}}

A request goes through: auth (401) -> body parsing (400) -> `latency_s` -> parameter
validation with `batchimg.specs` (400) -> input images and mask (400) -> prompt directives ->
configured faults (one seeded draw per request) -> quota -> success (200, `ImagesResponse`).
Edit inputs are judged by their declared part Content-Type, as OpenAI does: a part sent as
application/octet-stream is a 400 `unsupported_file_mimetype` even if its bytes are a PNG.

`MockServer.requests` records every image request (`MockRequest`), and `max_in_flight` the
most answered at once, so tests can check what a client sent and how concurrently.

Prompt directives, for deterministic tests (several may appear in one prompt):

    [[mock:moderation]]   400 moderation_blocked (type image_generation_user_error)
    [[mock:quota]]        429 insufficient_quota (the account is out of credit)
    [[mock:corrupt]]      200, but each b64_json decodes to bytes that are not an image
    [[mock:datauri]]      b64_json carries a `data:image/<fmt>;base64,` prefix
    [[mock:fail=N]]       the first N valid requests with this exact prompt get 500
                          server_error (counted per prompt, per server); later ones succeed
    [[mock:url]]          answer with `url` items even for GPT image models

Faults on demand (`MockConfig`, seeded so a test sees the same sequence every run): rates of
429s (retry-after-ms, retry-after seconds or HTTP-date, or none), 500s, HTML 502 pages, bodies
cut off mid-stream, dropped connections and slow answers; data-URI answers; quota that runs out
after N successes (429 insufficient_quota); a key revoked after N requests (401).

Images are real (decodable, exact size and format) but cheap: see `batchimg._mockimages`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import math
import random
import re
import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import BodyPartReader, web
from aiohttp.typedefs import Handler

from batchimg import specs
from batchimg._mockimages import (
    CORRUPT,
    EncodedImage,
    UploadedFile,
    check_inputs,
    render_response,
)
from batchimg.inputs import ImageInfo
from batchimg.specs import ParamError

__all__ = [
    "Directives",
    "Fault",
    "MockConfig",
    "MockRequest",
    "MockServer",
    "decide_fault",
    "serve",
]

#: OpenAI's own default model is dall-e-2; batchimg's users mean gpt-image, so the mock says so.
DEFAULT_MODEL = "gpt-image-1"
#: Besides `specs.API_FIELDS`, what the SDK may send that the mock accepts (and ignores).
EXTRA_FIELDS = ("stream", "partial_images", "safety_identifier")
_INT_FORM_FIELDS = ("n", "output_compression", "partial_images")


@dataclass(frozen=True, kw_only=True)
class MockConfig:
    """How the mock behaves; the fault rates draw from an RNG seeded with `seed`."""

    api_key: str | None = None  # if set, only this key is accepted; else any non-empty key
    require_auth: bool = True  # False: no auth check at all
    latency_s: float = 0.0  # added before answering every authenticated image request
    # Fault rates: fractions of requests, one seeded draw per request (they must sum to <= 1).
    rate_limit_rate: float = 0.0  # 429 rate_limit_exceeded, with `retry_after_style` headers
    error_rate: float = 0.0  # 500 server_error (JSON envelope)
    html_error_rate: float = 0.0  # 502 with an HTML page, as proxies answer
    truncate_rate: float = 0.0  # 200 whose body is cut off mid-stream
    drop_rate: float = 0.0  # connection closed with no answer at all
    slow_rate: float = 0.0  # answered normally, but `slow_s` later
    slow_s: float = 5.0
    datauri_rate: float = 0.0  # successes whose b64_json carry a data: URI prefix (own draw)
    retry_after_s: float = 0.05  # what the 429s ask for
    #: both: retry-after-ms + retry-after seconds; ms / seconds / date: only that form;
    #: mixed: one of ms / seconds / date per 429 (seeded); none: no header at all
    retry_after_style: RetryAfterStyle = "both"
    #: Hard limits, as providers enforce them: per minute, in slices of max(1 s, 60/limit) s
    #: (so 1200 rpm is 20 requests in each second); every answer carries x-ratelimit-* headers.
    rpm_limit: int | None = None
    ipm_limit: int | None = None  # images per minute (a request weighs its n)
    ratelimit_headers: bool = True  # False: enforce the limits but send no x-ratelimit-* headers
    detailed_images: bool = False  # photo-sized images (~2.5 MB PNG at 1024x1024), for benchmarks
    omit_usage: bool = False  # bill as usual but leave `usage` out of answers, as some gateways do
    quota_after: int | None = None  # after this many requests, every one: 429 insufficient_quota
    auth_fail_after: int | None = None  # after this many requests, every one: 401 (0: always)
    seed: int = 0

    def __post_init__(self) -> None:
        rates = (
            self.rate_limit_rate,
            self.error_rate,
            self.html_error_rate,
            self.truncate_rate,
            self.drop_rate,
            self.slow_rate,
        )
        if any(not 0.0 <= r <= 1.0 for r in (*rates, self.datauri_rate)) or sum(rates) > 1.0:
            raise ValueError("fault rates must be in [0, 1] and sum to <= 1")
        if self.latency_s < 0 or self.retry_after_s < 0 or self.slow_s < 0:
            raise ValueError("latency_s, slow_s and retry_after_s must be >= 0")


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


def _retry_after_headers(retry_after_s: float, style: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    if style in ("both", "ms"):
        headers["retry-after-ms"] = str(round(retry_after_s * 1000))
    if style in ("both", "seconds"):
        # HTTP wants whole seconds here; clients should prefer the precise retry-after-ms.
        headers["retry-after"] = str(math.ceil(retry_after_s))
    if style == "date":
        headers["retry-after"] = email.utils.formatdate(time.time() + retry_after_s, usegmt=True)
    return headers


def _rate_limited(retry_after_s: float, style: str = "both") -> _ApiError:
    headers = _retry_after_headers(retry_after_s, style)
    message = f"Rate limit reached for images per min. Please try again in {retry_after_s:g}s."
    return _ApiError(429, message, type_="requests", code="rate_limit_exceeded", headers=headers)


def _quota_exhausted() -> _ApiError:
    message = "You exceeded your current quota, please check your plan and billing details."
    return _ApiError(429, message, type_="insufficient_quota", code="insufficient_quota")


_HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


# -- hard rate limits ------------------------------------------------------------------------


def format_go_duration(seconds: float) -> str:
    """A duration the way OpenAI's reset headers write it: `12ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s"


class _SlicedLimit:
    """A per-minute limit enforced in slices, plus the per-minute view the headers report."""

    def __init__(self, per_min: int) -> None:
        self.per_min = per_min
        self.slice_s = max(1.0, 60 / per_min)
        self.per_slice = per_min * self.slice_s / 60
        self._slice = -1
        self._used = 0.0
        self._minute: deque[tuple[float, float]] = deque()  # (when, weight) in the last 60 s
        self._minute_used = 0.0

    def _roll(self, now: float) -> None:
        current = int(now // self.slice_s)
        if current != self._slice:
            self._slice, self._used = current, 0.0
        while self._minute and self._minute[0][0] <= now - 60:
            self._minute_used -= self._minute.popleft()[1]

    def wait_s(self, weight: float, now: float) -> float:
        """0 if `weight` fits in this slice, else the seconds until the next slice opens."""
        self._roll(now)
        if self._used + weight <= self.per_slice or self._used == 0:
            return 0.0
        return (self._slice + 1) * self.slice_s - now

    def take(self, weight: float, now: float) -> None:
        self._roll(now)
        self._used += weight
        self._minute.append((now, weight))
        self._minute_used += weight

    def headers(self, kind: str, now: float) -> dict[str, str]:
        self._roll(now)
        used = self._minute_used
        reset = (self._minute[0][0] + 60 - now) if self._minute else 0.0
        return {
            f"x-ratelimit-limit-{kind}": str(self.per_min),
            f"x-ratelimit-remaining-{kind}": str(max(0, int(self.per_min - used))),
            f"x-ratelimit-reset-{kind}": format_go_duration(reset),
        }


# -- faults and directives -------------------------------------------------------------------

Fault = Literal["rate_limit", "server_error", "html_error", "truncate", "drop", "slow"]
RetryAfterStyle = Literal["both", "ms", "seconds", "date", "mixed", "none"]


def decide_fault(draw: float, config: MockConfig) -> Fault | None:
    """The configured fault for one request, given a uniform draw in [0, 1); None: no fault."""
    rates: tuple[tuple[Fault, float], ...] = (
        ("rate_limit", config.rate_limit_rate),
        ("server_error", config.error_rate),
        ("html_error", config.html_error_rate),
        ("truncate", config.truncate_rate),
        ("drop", config.drop_rate),
        ("slow", config.slow_rate),
    )
    threshold = 0.0
    for fault, rate in rates:
        threshold += rate
        if draw < threshold:
            return fault
    return None


_DIRECTIVE = re.compile(r"\[\[mock:([a-z_]+)(?:=(\d+))?\]\]")


@dataclass(frozen=True)
class Directives:
    """The `[[mock:...]]` directives found in a prompt (see the module docstring)."""

    moderation: bool = False
    quota: bool = False
    corrupt: bool = False
    datauri: bool = False
    url: bool = False
    fail: int = 0

    @classmethod
    def parse(cls, prompt: str) -> Directives:
        found = dict(_DIRECTIVE.findall(prompt))
        unknown = set(found) - {"moderation", "quota", "corrupt", "datauri", "url", "fail"}
        if unknown:
            raise ParamError("prompt", f"Unknown mock directive(s): {', '.join(sorted(unknown))}.")
        return cls(
            moderation="moderation" in found,
            quota="quota" in found,
            corrupt="corrupt" in found,
            datauri="datauri" in found,
            url="url" in found,
            fail=int(found.get("fail") or 0),
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


def _check_fields(params: dict[str, Any]) -> None:
    for name in params:
        if name not in specs.API_FIELDS and name not in EXTRA_FIELDS:
            raise ParamError(name, f"Unknown parameter: '{name}'.", "unknown_parameter")
    if params.get("stream"):
        raise ParamError(
            "stream", "The mock does not stream; send stream=false.", "unsupported_value"
        )


def _usage(params: dict[str, Any], n: int, inputs: list[ImageInfo]) -> dict[str, Any]:
    # Unknown GPT models fall back to gpt-image-1's table inside specs.
    output = (specs.output_tokens_per_image(params) or 0) * n
    text = specs.estimate_text_tokens(params["prompt"])
    image = sum(specs.image_input_tokens(i.width, i.height) for i in inputs)
    return {
        "total_tokens": text + image + output,
        "input_tokens": text + image,
        "output_tokens": output,
        "input_tokens_details": {"text_tokens": text, "image_tokens": image},
    }


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
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = _new_request_id()
    return response


class MockServer:
    """The mock Images API on a loopback port; `async with` it, or `start_in_thread()` it."""

    def __init__(
        self, config: MockConfig = MockConfig(), *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config
        self.host = host
        self.requests: list[MockRequest] = []
        self.in_flight = 0  # image requests being answered right now
        self.max_in_flight = 0  # the most seen at once: what a concurrency limit should bound
        self._requested_port = port
        self._port: int | None = None
        self._rng = random.Random(self.config.seed)
        self._admitted = 0  # requests let through the quota gate
        self._limits = {
            kind: _SlicedLimit(per_min)
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
        endpoint: specs.Endpoint = "edits" if request.path.endswith("/edits") else "generations"
        record = MockRequest(
            endpoint=endpoint,
            prompt=None,
            model=None,
            n=None,
            status=0,
            request_id=_new_request_id(),
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
        self, request: web.Request, endpoint: specs.Endpoint, record: MockRequest
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
        self._enforce_limits(params, record)
        if config.latency_s:
            await asyncio.sleep(config.latency_s)
        try:
            _check_fields(params)
            specs.validate_params(params, endpoint)
            inputs = (
                await check_inputs(body.images, body.mask, params["model"]) if body.edit else []
            )
            directives = Directives.parse(params["prompt"])
        except specs.ParamError as e:
            raise _ApiError(400, str(e), param=e.param, code=e.code) from e

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
        return await self._succeed(request, params, directives, inputs, record)

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
        directives: Directives,
        inputs: list[ImageInfo],
        record: MockRequest,
    ) -> web.Response:
        model, prompt = params["model"], params["prompt"]
        fam = specs.family(model)
        n = params.get("n") or 1
        fmt = specs.output_format(params)
        images = (
            [CORRUPT] * n
            if directives.corrupt
            else await render_response(params, n, detailed=self.config.detailed_images)
        )
        record.served_sha256 = [image.sha256 for image in images]
        as_url = directives.url or (fam != "gpt" and params.get("response_format") != "b64_json")
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
            if fam == "dall-e-3":
                data[-1]["revised_prompt"] = prompt
        payload: dict[str, Any] = {"created": int(time.time()), "data": data}
        if fam == "gpt":
            transparent = params.get("background") == "transparent"
            payload["background"] = "transparent" if transparent else "opaque"
            payload["output_format"] = fmt
            payload["size"] = specs.resolved_size(params)
            payload["quality"] = specs.resolved_quality(params)
            record.usage = _usage(params, n, inputs)
            if not self.config.omit_usage:
                payload["usage"] = record.usage
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
