"""The embedded mock Images API, driven over real loopback HTTP with aiohttp.

Expected shapes and numbers come from shared/API_NOTES.md (OpenAI's OpenAPI spec, image
generation guide) unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import time
import urllib.request
from collections.abc import Mapping
from typing import Any

import aiohttp
import pytest
from PIL import Image

from batchimg import specs
from batchimg.mock import MockConfig, MockServer, decide_fault
from tests.conftest import StartMock
from tests.helpers import served_mock, stop_served

KEY = "sk-mock-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


async def generate(
    http: aiohttp.ClientSession,
    server: MockServer,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], Mapping[str, str]]:
    url = f"{server.base_url}/images/generations"
    async with http.post(url, json=body, headers=AUTH if headers is None else headers) as resp:
        return resp.status, await resp.json(), resp.headers


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def png_bytes(size: tuple[int, int] = (64, 48), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (10, 20, 30, 0) if mode == "RGBA" else (10, 20, 30)).save(out, fmt)
    return out.getvalue()


def edit_form(
    images: list[tuple[str, bytes, str]],
    mask: tuple[bytes, str] | None = None,
    **fields: str,
) -> aiohttp.FormData:
    """images: (field name, bytes, content type); every other field as text, like the SDK."""
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in {"model": "gpt-image-1", "prompt": "edit it", **fields}.items():
        form.add_field(name, value)
    for i, (name, data, mime) in enumerate(images):
        form.add_field(name, data, filename=f"in{i}.png", content_type=mime)
    if mask is not None:
        form.add_field("mask", mask[0], filename="mask.png", content_type=mask[1])
    return form


async def edit(
    http: aiohttp.ClientSession, server: MockServer, form: aiohttp.FormData
) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{server.base_url}/images/edits", data=form, headers=AUTH) as resp:
        return resp.status, await resp.json()


# -- generations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
)
async def test_generations_returns_n_images_of_requested_size_format_and_usage(
    mock: MockServer, http: aiohttp.ClientSession, fmt: str, pil_format: str
) -> None:
    body = {
        "model": "gpt-image-1",
        "prompt": "a red fox",
        "n": 3,
        "size": "1536x1024",
        "quality": "low",
        "output_format": fmt,
    }
    status, payload, _ = await generate(http, mock, body)

    assert status == 200
    images = [decode(item["b64_json"]) for item in payload["data"]]
    assert [(i.format, i.size) for i in images] == [(pil_format, (1536, 1024))] * 3
    text = specs.estimate_text_tokens("a red fox")
    # API_NOTES output-token table: low 1536x1024 = 400 per image; the output split as
    # openai-python's `Usage.output_tokens_details` has it (image models write no text).
    assert payload["usage"] == {
        "total_tokens": text + 1200,
        "input_tokens": text,
        "output_tokens": 1200,
        "input_tokens_details": {"text_tokens": text, "image_tokens": 0},
        "output_tokens_details": {"image_tokens": 1200, "text_tokens": 0},
    }
    assert (payload["output_format"], payload["size"], payload["quality"]) == (
        fmt,
        "1536x1024",
        "low",
    )
    assert payload["background"] == "opaque"
    assert isinstance(payload["created"], int)


async def test_defaults_resolve_to_gpt_image_1_auto_size_and_quality(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    status, payload, _ = await generate(http, mock, {"prompt": "no model given"})

    assert status == 200
    assert len(payload["data"]) == 1
    assert decode(payload["data"][0]["b64_json"]).size == (1024, 1024)
    assert (payload["size"], payload["quality"], payload["output_format"]) == (
        "1024x1024",
        "medium",
        "png",
    )
    assert payload["usage"]["output_tokens"] == 1056
    assert mock.requests[-1].model == "gpt-image-1"
    assert mock.requests[-1].params == {"prompt": "no model given"}


async def test_gpt_image_1_mini_bills_its_own_table(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "gpt-image-1-mini", "prompt": "p", "quality": "high", "size": "1024x1024"}
    _, payload, _ = await generate(http, mock, body)
    # API_NOTES: mini's published $0.036 per high 1024x1024 image / $8 per 1M output tokens.
    assert payload["usage"]["output_tokens"] == 4500


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("webp", "WEBP")])
async def test_transparent_background_has_a_real_alpha_channel(
    mock: MockServer, http: aiohttp.ClientSession, fmt: str, pil_format: str
) -> None:
    body = {"prompt": "a sticker", "background": "transparent", "output_format": fmt}
    status, payload, _ = await generate(http, mock, body)

    assert status == 200
    image = decode(payload["data"][0]["b64_json"])
    assert (image.format, image.mode) == (pil_format, "RGBA")
    alpha_min, alpha_max = image.getchannel("A").getextrema()
    assert (alpha_min, alpha_max) == (0, 255)
    assert payload["background"] == "transparent"


async def test_output_compression_shrinks_jpeg(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    sizes = []
    for compression in (100, 5):
        body = {"prompt": "p", "output_format": "jpeg", "output_compression": compression}
        _, payload, _ = await generate(http, mock, body)
        sizes.append(len(base64.b64decode(payload["data"][0]["b64_json"])))
    assert sizes[1] < sizes[0]


async def test_images_vary_with_the_prompt(mock: MockServer, http: aiohttp.ClientSession) -> None:
    _, payload, _ = await generate(http, mock, {"prompt": "p", "n": 2, "size": "1024x1024"})
    first, second = (decode(item["b64_json"]).getpixel((0, 0)) for item in payload["data"])
    assert first != second


# -- validation and auth --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"prompt": "p", "size": "800x600"}, "size", "invalid_value"),
        ({"prompt": "p", "response_format": "url"}, "response_format", "unknown_parameter"),
        ({"prompt": "p", "output_dir": "x"}, "output_dir", "unknown_parameter"),
        ({"model": "gpt-image-1"}, "prompt", "missing_required_parameter"),
        ({"prompt": "p", "n": 11}, "n", "invalid_value"),
        ({"model": "dall-e-3", "prompt": "p", "n": 2}, "n", "invalid_value"),
        ({"prompt": "p [[mock:explode]]"}, "prompt", "invalid_value"),
    ],
)
async def test_invalid_parameters_get_400_in_the_official_envelope(
    mock: MockServer,
    http: aiohttp.ClientSession,
    body: dict[str, Any],
    param: str,
    code: str,
) -> None:
    status, payload, _ = await generate(http, mock, body)

    assert status == 400
    assert payload["error"]["type"] == "invalid_request_error"
    assert (payload["error"]["param"], payload["error"]["code"]) == (param, code)
    assert payload["error"]["message"]
    assert mock.requests[-1].status == 400


async def test_body_that_is_not_json_gets_400(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    url = f"{mock.base_url}/images/generations"
    async with http.post(url, data=b"prompt=hi", headers=AUTH) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Basic abc"}]
)
async def test_missing_or_wrong_key_gets_401(
    start_mock: StartMock, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    server = await start_mock(api_key=KEY)
    status, payload, resp_headers = await generate(http, server, {"prompt": "p"}, headers)

    assert status == 401
    assert payload["error"]["code"] == "invalid_api_key"
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["error"]["param"] is None
    assert server.requests[-1].status == 401
    assert resp_headers["x-request-id"] == server.requests[-1].request_id


async def test_any_key_is_accepted_without_api_key_and_none_without_require_auth(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    open_server = await start_mock()
    assert (await generate(http, open_server, {"prompt": "p"}, {"Authorization": "Bearer x"}))[
        0
    ] == 200
    assert (await generate(http, open_server, {"prompt": "p"}, {}))[0] == 401
    no_auth = await start_mock(require_auth=False)
    assert (await generate(http, no_auth, {"prompt": "p"}, {}))[0] == 200


async def test_every_response_carries_a_request_id(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    _, _, ok_headers = await generate(http, mock, {"prompt": "p"})
    async with http.get(f"{mock.base_url}/nothing-here") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["message"] == "Invalid URL (GET /v1/nothing-here)"
        missing_route_id = resp.headers["x-request-id"]
    assert ok_headers["x-request-id"] == mock.requests[0].request_id
    assert ok_headers["x-request-id"].startswith("req_")
    assert missing_route_id.startswith("req_")
    assert missing_route_id != ok_headers["x-request-id"]


# -- directives -----------------------------------------------------------------------------


async def test_moderation_directive_is_blocked(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    status, payload, _ = await generate(http, mock, {"prompt": "x [[mock:moderation]]"})
    assert status == 400
    assert payload["error"]["code"] == "moderation_blocked"
    assert payload["error"]["type"] == "image_generation_user_error"


async def test_corrupt_directive_returns_bytes_that_are_not_an_image(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    status, payload, _ = await generate(http, mock, {"prompt": "x [[mock:corrupt]]", "n": 2})
    assert status == 200
    assert len(payload["data"]) == 2
    raw = base64.b64decode(payload["data"][0]["b64_json"])
    assert raw
    assert specs.sniff_format(raw[:12]) is None
    with pytest.raises(OSError):
        Image.open(io.BytesIO(raw))


async def test_datauri_directive_prefixes_b64_json(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {"prompt": "x [[mock:datauri]]", "output_format": "webp"}
    _, payload, _ = await generate(http, mock, body)
    prefix, _, b64 = payload["data"][0]["b64_json"].partition(",")
    assert prefix == "data:image/webp;base64"
    assert decode(b64).format == "WEBP"


async def test_fail_directive_fails_the_first_n_requests_per_prompt(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    prompt = "flaky [[mock:fail=2]]"
    statuses = [(await generate(http, mock, {"prompt": prompt}))[0] for _ in range(3)]
    other = (await generate(http, mock, {"prompt": "other [[mock:fail=1]]"}))[0]

    assert statuses == [500, 500, 200]
    assert other == 500
    assert mock.count(prompt) == 3
    _, payload, _ = await generate(http, mock, {"prompt": prompt})
    assert "data" in payload


async def test_fail_directive_error_is_a_server_error(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    _, payload, _ = await generate(http, mock, {"prompt": "[[mock:fail=1]]"})
    assert payload["error"]["type"] == "server_error"


async def test_url_directive_serves_downloadable_gpt_images(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {"prompt": "x [[mock:url]]", "output_format": "jpeg", "size": "1024x1536"}
    _, payload, _ = await generate(http, mock, body)
    url = payload["data"][0]["url"]
    assert url.startswith(f"{mock.base_url}/_mock/files/")
    async with http.get(url) as resp:
        assert resp.status == 200
        assert resp.content_type == "image/jpeg"
        image = Image.open(io.BytesIO(await resp.read()))
    assert (image.format, image.size) == ("JPEG", (1024, 1536))


# -- faults ---------------------------------------------------------------------------------


def test_decide_fault_splits_the_unit_interval_by_rate() -> None:
    config = MockConfig(rate_limit_rate=0.2, error_rate=0.3)
    assert [decide_fault(d, config) for d in (0.0, 0.19, 0.2, 0.49, 0.5, 0.99)] == [
        "rate_limit",
        "rate_limit",
        "server_error",
        "server_error",
        None,
        None,
    ]
    with pytest.raises(ValueError):
        MockConfig(rate_limit_rate=0.7, error_rate=0.5)


async def test_fault_rates_are_deterministic_for_a_seed(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    config = {"rate_limit_rate": 0.3, "error_rate": 0.2, "retry_after_s": 0.25}
    runs: list[list[int]] = []
    for seed in (7, 7, 8):
        server = await start_mock(seed=seed, **config)
        runs.append([(await generate(http, server, {"prompt": "p"}))[0] for _ in range(30)])

    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert {429, 500, 200} <= set(runs[0])
    assert runs[0].count(200) < 30


async def test_rate_limited_response_says_when_to_retry(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    server = await start_mock(rate_limit_rate=1.0, retry_after_s=1.5)
    status, payload, headers = await generate(http, server, {"prompt": "p"})

    assert status == 429
    assert payload["error"]["code"] == "rate_limit_exceeded"
    assert payload["error"]["type"] == "requests"
    assert headers["retry-after-ms"] == "1500"
    assert headers["retry-after"] == "2"


async def test_latency_is_added_before_answering(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    server = await start_mock(latency_s=0.2)
    started = time.perf_counter()
    statuses = await asyncio.gather(*(generate(http, server, {"prompt": "p"}) for _ in range(4)))
    elapsed = time.perf_counter() - started

    assert [s[0] for s in statuses] == [200] * 4
    assert 0.2 <= elapsed < 0.7  # concurrent requests sleep side by side (serially: 0.8)
    assert (server.max_in_flight, server.in_flight) == (4, 0)


# -- Azure and DALL·E -----------------------------------------------------------------------


async def test_azure_deployment_path_takes_the_api_key_header(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    server = await start_mock(api_key=KEY)
    origin = server.base_url.removesuffix("/v1")
    url = f"{origin}/openai/deployments/gpt-image-1-mini/images/generations?api-version=2025-04-01"
    async with http.post(url, json={"prompt": "p"}, headers={"api-key": KEY}) as resp:
        payload = await resp.json()
        assert resp.status == 200
    async with http.post(url, json={"prompt": "p"}, headers={"api-key": "nope"}) as resp:
        assert resp.status == 401

    assert server.requests[0].model == "gpt-image-1-mini"
    assert payload["usage"]["output_tokens"] == 1375  # $0.011 / $8 per 1M (API_NOTES)
    # The api-key header is an Azure convention only.
    assert (await generate(http, server, {"prompt": "p"}, {"api-key": KEY}))[0] == 401


async def test_dalle_answers_with_downloadable_urls_and_no_usage(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "dall-e-2", "prompt": "a cat", "n": 2, "size": "256x256"}
    status, payload, _ = await generate(http, mock, body)

    assert status == 200
    assert "usage" not in payload
    for item in payload["data"]:
        async with http.get(item["url"]) as resp:
            assert resp.status == 200
            assert resp.content_type == "image/png"
            image = Image.open(io.BytesIO(await resp.read()))
            assert (image.format, image.size) == ("PNG", (256, 256))
    async with http.get(f"{mock.base_url}/_mock/files/unknown") as resp:
        assert resp.status == 404


async def test_dalle_3_b64_json_when_asked_with_revised_prompt(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {
        "model": "dall-e-3",
        "prompt": "a cat",
        "size": "1792x1024",
        "response_format": "b64_json",
    }
    status, payload, _ = await generate(http, mock, body)

    assert status == 200
    assert decode(payload["data"][0]["b64_json"]).size == (1792, 1024)
    assert payload["data"][0]["revised_prompt"] == "a cat"


# -- edits ----------------------------------------------------------------------------------


async def test_edit_with_a_single_image_field(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    form = edit_form([("image", png_bytes((64, 48)), "image/png")], n="2", size="1024x1536")
    status, payload = await edit(http, mock, form)

    assert status == 200
    assert [decode(i["b64_json"]).size for i in payload["data"]] == [(1024, 1536)] * 2
    record = mock.requests[-1]
    assert (record.endpoint, record.n, record.image_count, record.has_mask) == (
        "edits",
        2,
        1,
        False,
    )
    image_tokens = specs.image_input_tokens(64, 48)
    assert payload["usage"]["input_tokens_details"]["image_tokens"] == image_tokens


async def test_edit_with_repeated_image_brackets_and_mask(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    images = [
        ("image[]", png_bytes((64, 48)), "image/png"),
        ("image[]", png_bytes((32, 32), fmt="JPEG"), "image/jpeg"),
        ("image[]", png_bytes((40, 40), fmt="WEBP"), "image/webp"),
    ]
    mask = (png_bytes((64, 48), mode="RGBA"), "image/png")
    form = edit_form(
        images, mask, output_format="webp", output_compression="50", input_fidelity="high"
    )
    status, payload = await edit(http, mock, form)

    assert status == 200, payload
    assert decode(payload["data"][0]["b64_json"]).format == "WEBP"
    record = mock.requests[-1]
    assert (record.image_count, record.has_mask) == (3, True)
    assert record.params["output_compression"] == 50
    expected = sum(specs.image_input_tokens(w, h) for w, h in [(64, 48), (32, 32), (40, 40)])
    assert payload["usage"]["input_tokens_details"]["image_tokens"] == expected


@pytest.mark.parametrize(
    ("images", "mask", "param", "code"),
    [
        ([], None, "image", "missing_required_parameter"),
        ([("image", b"not an image", "image/png")], None, "image", "invalid_value"),
        ([("image", png_bytes(fmt="GIF"), "image/png")], None, "image", "invalid_value"),
        (
            [("image", png_bytes(), "application/octet-stream")],
            None,
            "image",
            "unsupported_file_mimetype",
        ),
        ([("image[]", png_bytes(), "image/png")] * 17, None, "image", "invalid_value"),
        (
            [("image", png_bytes((64, 48)), "image/png")],
            (png_bytes((64, 48), mode="RGB"), "image/png"),
            "mask",
            "invalid_value",
        ),
        (
            [("image", png_bytes((64, 48)), "image/png")],
            (png_bytes((48, 64), mode="RGBA"), "image/png"),
            "mask",
            "invalid_value",
        ),
        (
            [("image", png_bytes((64, 48)), "image/png")],
            (png_bytes((64, 48), mode="RGBA", fmt="WEBP"), "image/png"),
            "mask",
            "invalid_value",
        ),
        (
            [("image", png_bytes((64, 48)), "image/png")],
            (png_bytes((64, 48), mode="RGBA"), "image/webp"),
            "mask",
            "unsupported_file_mimetype",
        ),
    ],
    ids=[
        "missing-image",
        "undecodable",
        "gif",
        "octet-stream",
        "seventeen-images",
        "mask-without-alpha",
        "mask-wrong-size",
        "mask-not-png",
        "mask-declared-webp",
    ],
)
async def test_edit_input_violations_get_400(
    mock: MockServer,
    http: aiohttp.ClientSession,
    images: list[tuple[str, bytes, str]],
    mask: tuple[bytes, str] | None,
    param: str,
    code: str,
) -> None:
    status, payload = await edit(http, mock, edit_form(images, mask))

    assert status == 400
    assert (payload["error"]["param"], payload["error"]["code"]) == (param, code)


async def test_edit_form_fields_are_validated_like_json(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    form = edit_form([("image", png_bytes(), "image/png")], n="many")
    status, payload = await edit(http, mock, form)
    assert (status, payload["error"]["param"]) == (400, "n")


async def test_edit_needs_a_multipart_or_json_body(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    url = f"{mock.base_url}/images/edits"
    async with http.post(url, data=b"prompt=p", headers=AUTH) as resp:
        assert resp.status == 400
        assert (
            "multipart/form-data or an application/json" in (await resp.json())["error"]["message"]
        )
    async with http.post(url, json={"prompt": "p"}, headers=AUTH) as resp:  # JSON, no images
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert (error["param"], error["code"]) == ("images", "missing_required_parameter")


# -- serve() --------------------------------------------------------------------------------


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_serve_prints_its_base_url_and_stops_on_ctrl_c(inherited: str) -> None:
    # "ignored": started as a shell's background job, which gets SIGINT ignored.
    ignore = (
        (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if inherited == "ignored" else None
    )
    with served_mock("MockConfig(require_auth=False)", preexec_fn=ignore) as (proc, base_url):
        assert base_url.startswith("http://127.0.0.1:")
        assert base_url.endswith("/v1")
        request = urllib.request.Request(
            f"{base_url}/images/generations",
            data=json.dumps({"prompt": "p", "size": "1024x1024"}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
            assert json.load(resp)["size"] == "1024x1024"
        stop_served(proc, signal.SIGINT, timeout_s=10)


# -- the API's twin, not the engine's echo ------------------------------------------------------


def _imports(path: Any) -> set[str]:
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = "." * node.level + (f"{node.module}." if node.module else "")
            found.update(base + alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_mock_keeps_its_own_rules_and_the_engine_never_sees_its_billing() -> None:
    from pathlib import Path

    package = Path(specs.__file__).parent
    engine_side = [p for p in package.glob("*.py")]
    mock_side = list((package / "mock").glob("*.py"))
    for path in mock_side:  # no rule, price or input check borrowed from the engine
        borrowed = {i for i in _imports(path) if i.startswith(("batchimg", ".."))}
        assert not borrowed, (path.name, borrowed)
    # Only `--mock` and `batchimg mock` start it; nothing reads its rules or its formula.
    allowed = {".mock.MockConfig", ".mock.MockServer", ".mock.serve"}
    for path in engine_side:
        uses = {i for i in _imports(path) if ".mock" in i or i.startswith("batchimg.mock")}
        assert uses <= (allowed if path.name in ("api.py", "cli.py") else set()), path.name


async def test_models_endpoint_lists_shutdown_dates(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{mock.base_url}/models", headers=AUTH) as resp:
        listing = await resp.json()
    dates = {m["id"]: m["shutdown_date"] for m in listing["data"]}
    assert dates["gpt-image-1"] == "2026-10-23" and dates["gpt-image-2"] is None
    async with http.get(f"{mock.base_url}/models/gpt-image-2.6-flare", headers=AUTH) as resp:
        assert (await resp.json())["object"] == "model"
    async with http.get(f"{mock.base_url}/models", headers={}) as resp:
        assert resp.status == 401


async def test_gpt_image_2_bills_by_its_calculator_formula(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    # Published calculator points (OpenAI's guide): 1024x1024 high = 7024 output tokens,
    # 1536x1024 high = 5488, 1024x1024 low = 196.
    expected = {("1024x1024", "high"): 7024, ("1536x1024", "high"): 5488,
                ("1024x1024", "low"): 196}  # fmt: skip
    for (size, quality), tokens in expected.items():
        body = {"model": "gpt-image-2", "prompt": "p", "size": size, "quality": quality}
        _, payload, _ = await generate(http, mock, body)
        assert payload["usage"]["output_tokens"] == pytest.approx(tokens, rel=0.016)
