"""The HTTP client: exact request shape, provider URLs and auth, and error classification.

aioresponses 0.7.9 cannot build responses under aiohttp 3.14 (`ClientResponse.__init__()
missing ... 'stream_writer'`, pnuckowski/aioresponses#289), so these tests run the real client
against a small recording aiohttp server on loopback instead. That also checks the bytes that
actually go over the wire, headers included.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from batchimg.backends import PROFILES, ClientConfig, OnlineBackend, Secret
from batchimg.backends.online import parse_retry_after
from batchimg.errors import (
    ItemFailed,
    RateLimited,
    RequestError,
    Retryable,
    RunFatal,
    ServerError,
    TransportError,
    UsageError,
    may_have_been_billed,
)

KEY = "sk-test-client-0123456789"
PNG_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
OK_BODY = {
    "created": 1750667997,
    "data": [{"b64_json": PNG_B64}],
    "usage": {
        "total_tokens": 4169,
        "input_tokens": 9,
        "output_tokens": 4160,
        "input_tokens_details": {"text_tokens": 9, "image_tokens": 0},
    },
    "background": "opaque",
    "output_format": "png",
    "size": "1024x1024",
    "quality": "high",
}


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDictProxy[str]
    body: bytes


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    delay_s: float = 0.0


class FakeAPI:
    """Answers each request with the next queued Reply and records what it received."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.replies: deque[Reply] = deque()
        self.url = ""
        self.release = asyncio.Event()  # set at teardown so delayed replies end at once

    def reply(
        self,
        status: int = 200,
        json: Any = None,
        *,
        text: str | None = None,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        delay_s: float = 0.0,
    ) -> None:
        body = (
            text.encode() if text is not None else orjson.dumps(json) if json is not None else b""
        )
        self.replies.append(Reply(status, body, headers or {}, content_type, delay_s))

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            Recorded(
                request.method,
                request.path,
                dict(request.query),
                request.headers,
                await request.read(),
            )
        )
        reply = self.replies.popleft() if self.replies else Reply(200, orjson.dumps(OK_BODY))
        if reply.delay_s:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.release.wait(), reply.delay_s)
        headers = {"Content-Type": reply.content_type, **reply.headers}
        return web.Response(status=reply.status, body=reply.body, headers=headers)


@pytest.fixture
async def api() -> AsyncIterator[FakeAPI]:
    fake = FakeAPI()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.url = f"http://{host}:{port}"
    try:
        yield fake
    finally:
        fake.release.set()
        await runner.cleanup()


def openai_config(api: FakeAPI, **kwargs: Any) -> ClientConfig:
    return ClientConfig(base_url=f"{api.url}/v1", api_key=Secret(KEY), **kwargs)


async def generate(config: ClientConfig, params: dict[str, Any]) -> Any:
    async with OnlineBackend(config) as client:
        return await client.generate(params)


async def generate_error(
    config: ClientConfig, params: dict[str, Any] | None = None
) -> RequestError:
    with pytest.raises(RequestError) as info:
        await generate(config, params or {"model": "gpt-image-1", "prompt": "a"})
    return info.value


# --- request shape ----------------------------------------------------------------------------


async def test_generate_posts_the_exact_json_body_with_bearer_auth(api: FakeAPI) -> None:
    params = {
        "model": "gpt-image-1",
        "prompt": "a red fox, «watercolour»",
        "n": 2,
        "size": "1024x1536",
        "quality": "high",
        "output_format": "webp",
        "output_compression": 80,
    }
    api.reply(200, OK_BODY, headers={"x-request-id": "req_123"})

    result = await generate(openai_config(api), params)

    (sent,) = api.requests
    assert sent.method == "POST"
    assert sent.path == "/v1/images/generations"
    assert sent.query == {}
    assert orjson.loads(sent.body) == params
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    assert sent.headers["Content-Type"] == "application/json"
    assert "api-key" not in sent.headers
    assert sent.headers["User-Agent"].startswith("batchimg/")

    assert result.data == OK_BODY["data"]
    assert result.usage == OK_BODY["usage"]
    assert result.request_id == "req_123"
    assert result.echo == {
        "size": "1024x1024",
        "quality": "high",
        "output_format": "png",
        "background": "opaque",
    }
    assert result.latency_s >= 0


async def test_trailing_slash_in_base_url_is_not_doubled(api: FakeAPI) -> None:
    config = ClientConfig(base_url=f"{api.url}/v1/", api_key=Secret(KEY))
    await generate(config, {"model": "gpt-image-1", "prompt": "a"})
    assert api.requests[0].path == "/v1/images/generations"


async def test_answer_without_usage_gives_none_usage(api: FakeAPI) -> None:
    api.reply(200, {"created": 1, "data": [{"url": "https://x/1.png"}]})
    result = await generate(openai_config(api), {"model": "dall-e-3", "prompt": "a"})
    assert result.usage is None
    assert result.echo == {}
    assert result.request_id is None


async def test_azure_uses_deployment_url_api_version_and_api_key_header(api: FakeAPI) -> None:
    config = ClientConfig(
        base_url=api.url,
        api_key=Secret(KEY),
        profile=PROFILES["azure"],
        deployment="my-images",
        api_version="2025-04-01-preview",
    )
    params = {"model": "gpt-image-1", "prompt": "a"}
    await generate(config, params)

    (sent,) = api.requests
    assert sent.path == "/openai/deployments/my-images/images/generations"
    assert sent.query == {"api-version": "2025-04-01-preview"}
    assert sent.headers["api-key"] == KEY
    assert "Authorization" not in sent.headers
    assert orjson.loads(sent.body) == params


async def test_azure_without_a_deployment_uses_the_model_name(api: FakeAPI) -> None:
    config = ClientConfig(base_url=f"{api.url}/", api_key=Secret(KEY), profile=PROFILES["azure"])
    await generate(config, {"model": "gpt-image-1-mini", "prompt": "a"})
    (sent,) = api.requests
    assert sent.path == "/openai/deployments/gpt-image-1-mini/images/generations"
    assert sent.query["api-version"]  # the default version is always sent


def test_azure_endpoint_url_shape() -> None:
    config = ClientConfig(
        base_url="https://res.openai.azure.com",
        api_key=Secret(KEY),
        profile=PROFILES["azure"],
        deployment="dep",
        api_version="2024-10-21",
    )
    assert config.endpoint_url("generations", "gpt-image-1") == (
        "https://res.openai.azure.com/openai/deployments/dep/images/generations"
        "?api-version=2024-10-21"
    )
    assert config.auth_headers() == {"api-key": KEY}


def test_modelverse_preset_points_at_the_seed_providers_url() -> None:
    # seed/gpt-image-1-api.md: POST https://api.modelverse.cn/v1/images/generations,
    # Authorization: Bearer $MODELVERSE_API_KEY.
    preset = PROFILES["modelverse"]
    assert preset.default_base_url == "https://api.modelverse.cn/v1"
    assert preset.key_env == "MODELVERSE_API_KEY"
    assert preset.default_base_url is not None
    config = ClientConfig(
        base_url=preset.default_base_url, api_key=Secret(KEY), profile=PROFILES["modelverse"]
    )
    assert config.endpoint_url("generations", "gpt-image-1") == (
        "https://api.modelverse.cn/v1/images/generations"
    )
    assert config.auth_headers() == {"Authorization": f"Bearer {KEY}"}


def test_openai_and_azure_presets() -> None:
    assert PROFILES["openai"].default_base_url == "https://api.openai.com/v1"
    assert PROFILES["openai"].key_env == "OPENAI_API_KEY"
    assert PROFILES["azure"].default_base_url is None
    assert PROFILES["azure"].key_env == "AZURE_OPENAI_API_KEY"


async def test_download_sends_no_api_key(api: FakeAPI) -> None:
    api.reply(200, text="PNGDATA", content_type="image/png")
    async with OnlineBackend(openai_config(api)) as client:
        data = await client.fetch(f"{api.url}/files/img.png?sig=abc")
    assert data == b"PNGDATA"
    (sent,) = api.requests
    assert sent.method == "GET"
    assert "Authorization" not in sent.headers
    assert "api-key" not in sent.headers


async def test_expired_download_link_fails_the_item(api: FakeAPI) -> None:
    api.reply(404, text="gone", content_type="text/plain")
    async with OnlineBackend(openai_config(api)) as client:
        with pytest.raises(ItemFailed):
            await client.fetch(f"{api.url}/files/img.png")


@pytest.mark.parametrize("status", [401, 403])
async def test_forbidden_download_link_fails_the_item_not_the_run(
    api: FakeAPI, status: int
) -> None:
    # DALL·E `url` answers are signed blob links; once expired the storage host answers 403
    # (Azure Blob: AuthenticationFailed). That says nothing about the API key, so it must not
    # stop the run the way a 401/403 from the Images API does.
    api.reply(
        status,
        text="<Error><Code>AuthenticationFailed</Code></Error>",
        content_type="application/xml",
    )
    async with OnlineBackend(openai_config(api)) as client:
        with pytest.raises(RequestError) as info:
            await client.fetch(f"{api.url}/private/img.png?se=2020-01-01&sig=abc")
    assert type(info.value) is ItemFailed
    assert info.value.info.http_status == status


async def test_client_used_outside_async_with_raises() -> None:
    client = OnlineBackend(ClientConfig(base_url="http://127.0.0.1:9", api_key=Secret(KEY)))
    with pytest.raises(RuntimeError, match="async with"):
        await client.generate({"model": "gpt-image-1", "prompt": "a"})


# --- error mapping ----------------------------------------------------------------------------


def error_body(code: str | None, type_: str | None = None, message: str = "msg") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


async def test_429_rate_limit_carries_retry_after_ms_in_seconds(api: FakeAPI) -> None:
    api.reply(
        429, error_body("rate_limit_exceeded", "requests"), headers={"retry-after-ms": "1500"}
    )
    exc = await generate_error(openai_config(api))
    assert type(exc) is RateLimited
    assert exc.retry_after_s == 1.5
    assert exc.info.http_status == 429
    assert exc.info.code == "rate_limit_exceeded"


async def test_429_rate_limit_carries_retry_after_seconds(api: FakeAPI) -> None:
    api.reply(429, error_body("rate_limit_exceeded"), headers={"Retry-After": "7"})
    exc = await generate_error(openai_config(api))
    assert type(exc) is RateLimited
    assert exc.retry_after_s == 7.0


async def test_retry_after_ms_wins_over_retry_after(api: FakeAPI) -> None:
    api.reply(
        429,
        error_body("rate_limit_exceeded"),
        headers={"retry-after-ms": "250", "retry-after": "9"},
    )
    exc = await generate_error(openai_config(api))
    assert exc.retry_after_s == 0.25


async def test_429_without_retry_after_has_no_server_delay(api: FakeAPI) -> None:
    api.reply(429, error_body("rate_limit_exceeded"))
    exc = await generate_error(openai_config(api))
    assert type(exc) is RateLimited
    assert exc.retry_after_s is None


@pytest.mark.parametrize(
    "code",
    [
        "insufficient_quota",
        "billing_hard_limit_reached",
        "credit_balance_exhausted",
        "organization_spend_limit_exceeded",
    ],
)
async def test_429_quota_errors_stop_the_run(api: FakeAPI, code: str) -> None:
    api.reply(429, error_body(code, code), headers={"retry-after": "1"})
    exc = await generate_error(openai_config(api))
    assert type(exc) is RunFatal
    assert exc.info.code == code


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_failures_stop_the_run(api: FakeAPI, status: int) -> None:
    api.reply(status, error_body("invalid_api_key", "invalid_request_error", "Incorrect key"))
    exc = await generate_error(openai_config(api))
    assert type(exc) is RunFatal
    assert exc.info.http_status == status


async def test_moderation_block_fails_the_item_with_the_apis_details(api: FakeAPI) -> None:
    api.reply(
        400,
        error_body(
            "moderation_blocked",
            "image_generation_user_error",
            "Your request was rejected by the safety system.",
        ),
        headers={"x-request-id": "req_mod_1"},
    )
    exc = await generate_error(openai_config(api))
    assert type(exc) is ItemFailed
    assert exc.info.as_record() == {
        "code": "moderation_blocked",
        "type": "image_generation_user_error",
        "message": "Your request was rejected by the safety system.",
        "http_status": 400,
        "request_id": "req_mod_1",
    }
    assert "moderation_blocked" in str(exc)
    assert "400" in str(exc)


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_are_retryable(api: FakeAPI, status: int) -> None:
    api.reply(status, error_body("server_error", "server_error"))
    exc = await generate_error(openai_config(api))
    assert type(exc) is ServerError
    assert exc.info.http_status == status


async def test_503_retry_after_is_carried(api: FakeAPI) -> None:
    api.reply(503, error_body("overloaded"), headers={"retry-after": "3"})
    exc = await generate_error(openai_config(api))
    assert type(exc) is ServerError
    assert exc.retry_after_s == 3.0


async def test_html_502_from_a_proxy_is_a_server_error(api: FakeAPI) -> None:
    api.reply(
        502,
        text="<html><body><h1>502 Bad Gateway</h1></body></html>",
        content_type="text/html",
    )
    exc = await generate_error(openai_config(api))
    assert type(exc) is ServerError
    assert exc.info.http_status == 502
    assert exc.info.code is None
    assert "502" in exc.info.message


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        ("<html>maintenance</html>", "text/html"),
        ('{"data": [{"b64_json": "abc"', "application/json"),  # truncated
        ("", "application/json"),
    ],
    ids=["html", "truncated-json", "empty"],
)
async def test_200_that_is_not_json_is_a_transport_error(
    api: FakeAPI, body: str, content_type: str
) -> None:
    api.reply(200, text=body, content_type=content_type, headers={"x-request-id": "req_9"})
    exc = await generate_error(openai_config(api))
    assert type(exc) is TransportError
    assert isinstance(exc, Retryable)
    assert exc.info.http_status == 200
    assert exc.info.request_id == "req_9"
    assert "not JSON" in exc.info.message


@pytest.mark.parametrize(
    "body",
    [{"created": 1}, {"created": 1, "data": []}, {"data": "nope"}, {"data": ["x"]}, [1, 2]],
    ids=["no-data", "empty-data", "data-not-list", "data-not-objects", "not-an-object"],
)
async def test_200_without_a_data_list_is_a_transport_error(api: FakeAPI, body: Any) -> None:
    api.reply(200, body)
    exc = await generate_error(openai_config(api))
    assert type(exc) is TransportError
    assert exc.info.code == "bad_response"


async def test_should_retry_false_makes_a_500_fail_the_item(api: FakeAPI) -> None:
    api.reply(500, error_body("server_error"), headers={"x-should-retry": "false"})
    exc = await generate_error(openai_config(api))
    assert type(exc) is ItemFailed


async def test_should_retry_true_makes_a_400_retryable(api: FakeAPI) -> None:
    api.reply(400, error_body("invalid_value"), headers={"x-should-retry": "true"})
    exc = await generate_error(openai_config(api))
    assert isinstance(exc, Retryable)
    assert exc.info.http_status == 400


async def test_should_retry_true_does_not_override_a_quota_stop(api: FakeAPI) -> None:
    api.reply(429, error_body("insufficient_quota"), headers={"x-should-retry": "true"})
    exc = await generate_error(openai_config(api))
    assert type(exc) is RunFatal


async def test_connection_refused_is_a_transport_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = ClientConfig(base_url=f"http://127.0.0.1:{port}/v1", api_key=Secret(KEY))
    exc = await generate_error(config)
    assert type(exc) is TransportError
    assert exc.info.code == "connect_error"  # the request never went out: nothing billed
    assert not may_have_been_billed(exc)
    assert KEY not in str(exc)


async def test_timeout_is_a_transport_error(api: FakeAPI) -> None:
    api.reply(200, OK_BODY, delay_s=2.0)
    exc = await generate_error(openai_config(api, timeout_s=0.2))
    assert type(exc) is TransportError
    assert exc.info.code == "timeout"


# --- parse_retry_after ------------------------------------------------------------------------


def test_retry_after_http_date_is_honoured() -> None:
    # Wed, 21 Oct 2015 07:28:00 GMT is 1445412480 seconds after the epoch.
    now = 1445412480.0 - 42
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=now) == 42.0


def test_retry_after_http_date_in_the_past_means_no_wait() -> None:
    now = 1445412480.0 + 100
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, now=now) == 0.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": "-5"}, 0.0),
        ({"retry-after-ms": "20"}, 0.02),
        ({"retry-after-ms": "junk", "retry-after": "4"}, 4.0),
        ({"retry-after": "999999"}, 999999.0),  # as said: the limiter decides what to honour
        ({"retry-after-ms": "999999999"}, 999999.999),
        ({"retry-after": "1e300"}, 1e6),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert parse_retry_after(headers, now=0.0) == expected


# --- API key handling -------------------------------------------------------------------------


def test_batchimg_api_key_overrides_the_provider_variable() -> None:
    env = {"BATCHIMG_API_KEY": "sk-batch", "OPENAI_API_KEY": "sk-openai"}
    assert PROFILES["openai"].api_key_from_env(env).reveal() == "sk-batch"


@pytest.mark.parametrize(
    ("provider", "var"),
    [
        ("openai", "OPENAI_API_KEY"),
        ("modelverse", "MODELVERSE_API_KEY"),
        ("azure", "AZURE_OPENAI_API_KEY"),
    ],
)
def test_provider_variable_is_used_without_batchimg_api_key(provider: str, var: str) -> None:
    assert PROFILES[provider].api_key_from_env({var: "sk-p"}).reveal() == "sk-p"


def test_blank_batchimg_api_key_falls_through_to_the_provider_variable() -> None:
    env = {"BATCHIMG_API_KEY": "  ", "OPENAI_API_KEY": " sk-openai\n"}
    assert PROFILES["openai"].api_key_from_env(env).reveal() == "sk-openai"


def test_api_key_env_names_the_only_variable_read() -> None:
    env = {"MY_KEY": "sk-mine", "BATCHIMG_API_KEY": "sk-batch", "OPENAI_API_KEY": "sk-openai"}
    assert PROFILES["openai"].api_key_from_env(env, key_env="MY_KEY").reveal() == "sk-mine"
    with pytest.raises(UsageError) as info:
        PROFILES["openai"].api_key_from_env(
            {"BATCHIMG_API_KEY": "sk-batch", "OPENAI_API_KEY": "sk-o"}, key_env="MY_KEY"
        )
    message = str(info.value)
    assert "MY_KEY" in message
    assert "BATCHIMG_API_KEY" not in message
    assert "sk-batch" not in message


@pytest.mark.parametrize(
    ("provider", "var"),
    [
        ("openai", "OPENAI_API_KEY"),
        ("modelverse", "MODELVERSE_API_KEY"),
        ("azure", "AZURE_OPENAI_API_KEY"),
    ],
)
def test_missing_key_names_the_variables_looked_at(provider: str, var: str) -> None:
    with pytest.raises(UsageError) as info:
        PROFILES[provider].api_key_from_env({"UNRELATED": "x"})
    message = str(info.value)
    assert "BATCHIMG_API_KEY" in message
    assert var in message
    assert "--mock" in message


def test_secret_never_shows_the_key() -> None:
    secret = Secret(KEY)
    assert secret.reveal() == KEY
    for shown in (repr(secret), str(secret), f"{secret}", format(secret), f"{secret!r}"):
        assert KEY not in shown
        assert "0123456789" not in shown


def test_client_config_repr_does_not_contain_the_key() -> None:
    config = ClientConfig(base_url="https://api.openai.com/v1", api_key=Secret(KEY))
    assert KEY not in repr(config)
    assert KEY not in str(config)
    assert "***" in repr(config)


async def test_an_answers_echo_is_believed_only_in_the_shapes_the_api_uses(api: FakeAPI) -> None:
    body = {**OK_BODY, "size": "1x1", "quality": "high", "output_format": "../x",
            "background": "\u202eopaque", "svg_usage": {"model": "m", "output_tokens": 3},
            "other_usage": "not an object"}  # fmt: skip
    api.reply(200, body)
    result = await generate(openai_config(api), {"model": "gpt-image-2", "prompt": "a"})
    assert result.echo == {"size": "1x1", "quality": "high"}
    assert result.extra_usage == {"svg_usage": {"model": "m", "output_tokens": 3}}


async def test_list_models_keeps_each_shutdown_date_as_the_server_gave_it(api: FakeAPI) -> None:
    listing = {"data": [{"id": "a", "shutdown_date": "2026-01-01"}, {"id": "b"},
                        {"id": "c", "shutdown_date": 1767225600}, {"nope": 1}, "x"]}  # fmt: skip
    api.reply(200, listing)
    async with OnlineBackend(openai_config(api)) as client:
        assert await client.list_models() == {"a": "2026-01-01", "b": None, "c": 1767225600}
    api.reply(200, text="<html>", content_type="text/html")
    async with OnlineBackend(openai_config(api)) as client:
        with pytest.raises(RequestError):
            await client.list_models()
