"""The mock's newer surface over raw HTTP: event streams, JSON edits, files and headers.

Shapes come from shared/API_NOTES.md ("Late 2026") and openai-python's types
(`ImageGenPartialImageEvent`, `ImageGenCompletedEvent`, `ImageEdit...`, `ImagesResponse.Usage`,
`FileObject`); where the real API's exact answer is not known, the test says so.
"""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson
import pytest
from PIL import Image

from batchimg.limiter import Limiter, RateLimitHeaders
from batchimg.mock import MockServer
from tests.conftest import StartMock

KEY = "sk-mock-surface"
AUTH = {"Authorization": f"Bearer {KEY}"}


def image_bytes(size: tuple[int, int] = (64, 48), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (10, 20, 30, 0) if mode == "RGBA" else (10, 20, 30)).save(out, fmt)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def parse_sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of each server-sent event, insisting on the exact layout the SDKs read."""
    assert raw.endswith(b"\n\n")
    events = []
    for block in raw.decode().split("\n\n")[:-1]:
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        events.append((event_line.removeprefix("event: "), orjson.loads(data_line[6:])))
    return events


async def post(
    http: aiohttp.ClientSession, server: MockServer, path: str, body: dict[str, Any]
) -> tuple[int, Any, Mapping[str, str], bytes]:
    """POST a JSON body: status, parsed JSON (None for a stream), headers, raw bytes."""
    async with http.post(f"{server.base_url}{path}", json=body, headers=AUTH) as resp:
        raw = await resp.read()
        parsed = None if resp.content_type == "text/event-stream" else orjson.loads(raw)
        return resp.status, parsed, resp.headers, raw


# -- streams ----------------------------------------------------------------------------------


async def test_stream_is_server_sent_events_of_drafts_then_the_image(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "gpt-image-2", "prompt": "a fox", "size": "1024x768", "quality": "medium",
            "output_format": "png", "stream": True, "partial_images": 2}  # fmt: skip
    status, _, headers, raw = await post(http, mock, "/images/generations", body)

    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["x-request-id"] == mock.requests[-1].request_id
    events = parse_sse(raw)
    assert [name for name, _ in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    for name, data in events:
        assert data["type"] == name  # the SDKs pick the event's model by this field
        assert decode(data["b64_json"]).size == (1024, 768)
        assert (data["size"], data["quality"], data["background"]) == (
            "1024x768",
            "medium",
            "opaque",
        )
        assert isinstance(data["created_at"], int)
    assert [d["partial_image_index"] for _, d in events[:2]] == [0, 1]
    completed = events[-1][1]
    assert "partial_image_index" not in completed
    assert b"[DONE]" not in raw
    # The bill: what an answer without streaming costs, plus 100 output tokens a draft.
    status, plain, _, _ = await post(http, mock, "/images/generations", {**body, "stream": False})
    assert status == 200
    assert completed["usage"]["output_tokens"] == plain["usage"]["output_tokens"] + 200
    assert completed["usage"]["output_tokens_details"]["image_tokens"] == (
        plain["usage"]["output_tokens"] + 200
    )
    assert mock.requests[-2].usage == completed["usage"]


async def test_partial_images_zero_streams_the_completed_event_alone(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {"prompt": "p", "stream": True, "partial_images": 0, "safety_identifier": "u-1"}
    _, _, _, raw = await post(http, mock, "/images/generations", body)
    [(name, data)] = parse_sse(raw)
    assert name == "image_generation.completed"
    assert data["safety_identifier"] == "u-1"
    assert data["usage"]["output_tokens"] == 1056  # gpt-image-1 medium 1024x1024, no drafts


async def test_multipart_edit_streams_image_edit_events(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in {"model": "gpt-image-1", "prompt": "edit", "stream": "true",
                        "partial_images": "1"}.items():  # fmt: skip
        form.add_field(name, value)
    form.add_field("image", image_bytes(), filename="in.png", content_type="image/png")
    async with http.post(f"{mock.base_url}/images/edits", data=form, headers=AUTH) as resp:
        events = parse_sse(await resp.read())
    assert [name for name, _ in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert events[-1][1]["usage"]["input_tokens_details"]["image_tokens"] > 0
    assert mock.requests[-1].params["stream"] is True


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "dall-e-2", "stream": True}, "stream"),
        ({"model": "dall-e-3", "stream": True}, "stream"),
        ({"model": "dall-e-2", "partial_images": 1}, "partial_images"),
        ({"model": "gpt-image-2", "stream": True, "n": 2}, "n"),
        ({"model": "gpt-image-2.6-flare", "stream": True, "output_format": "svg"}, "stream"),
        ({"model": "gpt-image-2.6-flare", "partial_images": 2, "output_format": "gif"},
         "partial_images"),
        ({"model": "gpt-image-2", "stream": True, "partial_images": 4}, "partial_images"),
        ({"model": "gpt-image-2", "stream": "yes"}, "stream"),
    ],
    ids=["dall-e-2", "dall-e-3", "dall-e-partials", "n2", "svg", "gif", "four-partials",
         "not-bool"],
)  # fmt: skip
async def test_streams_are_refused_where_the_api_refuses_them(
    mock: MockServer, http: aiohttp.ClientSession, body: dict[str, Any], param: str
) -> None:
    status, payload, _, _ = await post(http, mock, "/images/generations", {"prompt": "p", **body})
    assert status == 400
    assert payload["error"]["param"] == param


async def test_dalle_still_takes_stream_false(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "dall-e-2", "prompt": "p", "stream": False, "size": "256x256"}
    assert (await post(http, mock, "/images/generations", body))[0] == 200


async def test_truncate_cuts_the_stream_inside_the_completed_event(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    server = await start_mock(truncate_rate=1.0)
    body = {"model": "gpt-image-2", "prompt": "p", "stream": True, "partial_images": 2}
    received = b""
    url = f"{server.base_url}/images/generations"
    async with http.post(url, json=body, headers=AUTH) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for chunk in resp.content.iter_any():
                received += chunk
    # Both drafts arrived whole; the completed event did not.
    assert received.count(b"event: image_generation.partial_image\n") == 2
    assert b"image_generation.completed" in received  # its first half was sent...
    assert not received.endswith(b"\n\n")  # ...and never finished
    assert server.requests[-1].events == ["image_generation.partial_image"] * 2


async def test_drop_sends_no_stream_at_all(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    server = await start_mock(drop_rate=1.0)
    body = {"prompt": "p", "stream": True, "partial_images": 1}
    with pytest.raises(aiohttp.ClientError):
        url = f"{server.base_url}/images/generations"
        async with http.post(url, json=body, headers=AUTH) as resp:
            await resp.read()
    assert server.requests[-1].events == []


async def test_directives_reach_streamed_images(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {"prompt": "x [[mock:datauri]]", "stream": True, "partial_images": 1,
            "output_format": "webp"}  # fmt: skip
    _, _, _, raw = await post(http, mock, "/images/generations", body)
    for _, data in parse_sse(raw):
        prefix, _, b64 = data["b64_json"].partition(",")
        assert prefix == "data:image/webp;base64" and decode(b64).format == "WEBP"
    body = {"prompt": "x [[mock:corrupt]]", "stream": True}
    _, _, _, raw = await post(http, mock, "/images/generations", body)
    [(_, completed)] = parse_sse(raw)
    with pytest.raises(OSError):
        decode(completed["b64_json"])


# -- JSON edits and files -------------------------------------------------------------------


async def test_json_edit_takes_data_urls_like_uploads(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {
        "model": "gpt-image-2", "prompt": "edit", "moderation": "low", "size": "1024x1024",
        "images": [{"image_url": data_url(image_bytes((64, 48)))},
                   {"image_url": data_url(image_bytes((32, 32), fmt="JPEG"), "image/jpeg")}],
        "mask": {"image_url": data_url(image_bytes((64, 48), mode="RGBA"))},
    }  # fmt: skip
    status, payload, _, _ = await post(http, mock, "/images/edits", body)

    assert status == 200, payload
    assert decode(payload["data"][0]["b64_json"]).size == (1024, 1024)
    record = mock.requests[-1]
    assert (record.image_count, record.has_mask, record.content_type) == (
        2,
        True,
        "application/json",
    )
    assert [(f[0], f[1], f[2]) for f in record.files] == [
        ("images", "images[0]", "image/png"),
        ("images", "images[1]", "image/jpeg"),
        ("mask", "mask", "image/png"),
    ]
    assert record.params["moderation"] == "low"  # the JSON body has it; the form does not
    assert record.params["images"][0]["image_url"].startswith("data:image/png;base64,<")
    assert payload["usage"]["input_tokens_details"]["image_tokens"] > 0


async def test_json_edit_streams_and_only_the_form_refuses_moderation(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "gpt-image-2", "prompt": "edit", "moderation": "auto", "stream": True,
            "partial_images": 1, "images": [{"image_url": data_url(image_bytes())}]}  # fmt: skip
    status, _, _, raw = await post(http, mock, "/images/edits", body)
    assert status == 200
    assert [name for name, _ in parse_sse(raw)] == [
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in {"model": "gpt-image-2", "prompt": "edit", "moderation": "auto"}.items():
        form.add_field(name, value)
    form.add_field("image", image_bytes(), filename="in.png", content_type="image/png")
    async with http.post(f"{mock.base_url}/images/edits", data=form, headers=AUTH) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "moderation"


@pytest.mark.parametrize(
    ("url", "param", "code"),
    [
        ("data:image/png;base64,@@not-base64@@", "images[0].image_url", "invalid_value"),
        ("data:image/png," + "iVBORw0KGgo=", "images[0].image_url", "invalid_value"),
        ("data:text/plain;base64,aGVsbG8=", "images[0].image_url", "invalid_value"),
        ("data:image/png;base64,", "images[0].image_url", "invalid_value"),
        (data_url(b"not an image at all"), "images[0]", "invalid_value"),
        (data_url(image_bytes(fmt="GIF"), "image/gif"), "images[0]", "unsupported_file_mimetype"),
        ("https://example.com/cat.png", "images[0].image_url", "invalid_image_url"),
        ("ftp://example.com/cat.png", "images[0].image_url", "invalid_value"),
    ],
    ids=["bad-base64", "not-base64", "not-image-mime", "empty", "undecodable", "gif",
         "outside-url", "ftp"],
)  # fmt: skip
async def test_json_edit_with_a_bad_image_url_gets_400(
    mock: MockServer, http: aiohttp.ClientSession, url: str, param: str, code: str
) -> None:
    body = {"model": "gpt-image-2", "prompt": "edit", "images": [{"image_url": url}]}
    status, payload, _, _ = await post(http, mock, "/images/edits", body)
    assert status == 400
    assert (payload["error"]["param"], payload["error"]["code"]) == (param, code)
    assert payload["error"]["type"] == "invalid_request_error"


async def test_outside_urls_are_not_fetched_but_the_mocks_own_links_are(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    # The API would download the URL; the mock has no network and says what the API says
    # of a URL it cannot download (the wording of chat's image inputs; not confirmed here).
    body = {"model": "gpt-image-2", "prompt": "e", "images": [{"image_url": "http://x.test/a.png"}]}
    _, payload, _, _ = await post(http, mock, "/images/edits", body)
    assert payload["error"]["message"] == "Error while downloading http://x.test/a.png."
    _, answer, _, _ = await post(http, mock, "/images/generations", {"prompt": "x [[mock:url]]"})
    link = answer["data"][0]["url"]
    body = {"model": "gpt-image-2", "prompt": "edit", "images": [{"image_url": link}]}
    status, _, _, _ = await post(http, mock, "/images/edits", body)
    assert status == 200
    assert mock.requests[-1].files[0][3] == mock.requests[-2].served_sha256[0]


@pytest.mark.parametrize(
    ("images", "param", "code"),
    [
        ([], "images", "empty_array"),
        ([{"image_url": data_url(image_bytes())}] * 17, "images", "array_above_max_length"),
        ("data:image/png;base64,xx", "images", "invalid_value"),
        (["https://x.test/a.png"], "images[0]", "invalid_value"),
        ([{"image_url": "https://x.test/a.png", "file_id": "file-1"}], "images[0]",
         "invalid_value"),
        ([{}], "images[0]", "invalid_value"),
        ([{"url": "https://x.test/a.png"}], "images[0].url", "unknown_parameter"),
        ([{"file_id": 7}], "images[0].file_id", "invalid_value"),
    ],
    ids=["empty", "seventeen", "not-a-list", "bare-string", "both", "neither", "unknown-key",
         "not-a-string"],
)  # fmt: skip
async def test_json_edit_references_must_have_the_apis_shape(
    mock: MockServer, http: aiohttp.ClientSession, images: Any, param: str, code: str
) -> None:
    body = {"model": "gpt-image-2", "prompt": "edit", "images": images}
    status, payload, _, _ = await post(http, mock, "/images/edits", body)
    assert status == 400
    assert (payload["error"]["param"], payload["error"]["code"]) == (param, code)


async def test_json_edit_checks_the_mask_and_the_model(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    base = {"prompt": "edit", "images": [{"image_url": data_url(image_bytes((64, 48)))}]}
    wrong_size = {"image_url": data_url(image_bytes((48, 64), mode="RGBA"))}
    status, payload, _, _ = await post(
        http, mock, "/images/edits", {**base, "model": "gpt-image-2", "mask": wrong_size}
    )
    assert (status, payload["error"]["param"]) == (400, "mask")
    # API_NOTES: JSON edits are for GPT image models only.
    status, payload, _, _ = await post(http, mock, "/images/edits", {**base, "model": "dall-e-2"})
    assert (status, payload["error"]["param"]) == (400, "model")


async def test_files_upload_and_an_unknown_file_id(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    png = image_bytes((40, 40))
    form = aiohttp.FormData()
    form.add_field("purpose", "user_data")
    form.add_field("file", png, filename="in.png", content_type="image/png")
    async with http.post(f"{mock.base_url}/files", data=form, headers=AUTH) as resp:
        assert resp.status == 200
        stored = await resp.json()
    assert stored["object"] == "file" and stored["bytes"] == len(png)
    assert (stored["filename"], stored["purpose"], stored["status"]) == (
        "in.png",
        "user_data",
        "processed",
    )
    async with http.get(f"{mock.base_url}/files/{stored['id']}/content", headers=AUTH) as resp:
        assert await resp.read() == png
    async with http.get(f"{mock.base_url}/files/file-missing", headers=AUTH) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["message"] == "No such File object: file-missing"

    by_id = {"model": "gpt-image-2", "prompt": "edit", "images": [{"file_id": stored["id"]}]}
    assert (await post(http, mock, "/images/edits", by_id))[0] == 200
    assert mock.requests[-1].files[0][1:3] == ("in.png", "image/png")
    # An id the server never gave: 404, as the Files API answers (exact wording for a JSON
    # edit not confirmed).
    unknown = {**by_id, "images": [{"file_id": "file-nope"}]}
    status, payload, _, _ = await post(http, mock, "/images/edits", unknown)
    assert status == 404
    assert payload["error"]["param"] == "images[0].file_id"
    # A content URL of an uploaded file is this server's own, so it resolves too.
    content = f"{mock.base_url}/files/{stored['id']}/content"
    by_url = {**by_id, "images": [{"image_url": content}]}
    assert (await post(http, mock, "/images/edits", by_url))[0] == 200


async def test_files_refuse_what_the_api_refuses(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    for fields, param in (({"purpose": "vision"}, "file"), ({"purpose": "photos"}, "purpose"),
                          ({}, "file")):  # fmt: skip
        form = aiohttp.FormData(default_to_multipart=True)
        for name, value in fields.items():
            form.add_field(name, value)
        if param != "file":
            form.add_field("file", b"x", filename="a.png", content_type="image/png")
        async with http.post(f"{mock.base_url}/files", data=form, headers=AUTH) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == param
    async with http.post(f"{mock.base_url}/files", data=aiohttp.FormData()) as resp:
        assert resp.status == 401


# -- headers ----------------------------------------------------------------------------------


async def test_every_answer_carries_openais_usual_headers(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    answers = [
        http.post(f"{mock.base_url}/images/generations", json={"prompt": "p"}, headers=AUTH),
        http.post(f"{mock.base_url}/images/generations", json={"n": 99}, headers=AUTH),
        http.post(f"{mock.base_url}/images/generations", json={"prompt": "p"}),
        http.get(f"{mock.base_url}/models", headers=AUTH),
        http.get(f"{mock.base_url}/nowhere"),
    ]
    statuses = []
    for answer in answers:
        async with answer as resp:
            statuses.append(resp.status)
            assert resp.headers["openai-version"] == "2020-10-01"
            assert int(resp.headers["openai-processing-ms"]) >= 0
            assert resp.headers["x-request-id"].startswith("req_")
    assert statuses == [200, 400, 401, 200, 404]


async def test_ratelimit_headers_are_always_there_and_count_for_real(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    billed = 0
    for _ in range(3):
        _, payload, headers, _ = await post(http, mock, "/images/generations", {"prompt": "p"})
        billed += payload["usage"]["total_tokens"]
    limit = int(headers["x-ratelimit-limit-requests"])
    tokens = int(headers["x-ratelimit-limit-tokens"])
    assert int(headers["x-ratelimit-remaining-requests"]) == limit - 3
    assert int(headers["x-ratelimit-remaining-tokens"]) == tokens - billed
    assert "x-ratelimit-limit-images" not in headers  # only with a configured ipm_limit
    # A streamed answer says the same before its first event.
    body = {"prompt": "p", "stream": True}
    _, _, headers, _ = await post(http, mock, "/images/generations", body)
    assert int(headers["x-ratelimit-remaining-requests"]) == limit - 4


async def test_the_advertised_limits_never_slow_batchimgs_limiter(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    """The engine learns ceilings from these headers: with no limit configured they must stay
    far above what a test or benchmark sends (the 1,500-item overhead benchmark runs at ~350
    requests a second, 32 at once)."""
    _, _, headers, _ = await post(http, mock, "/images/generations", {"prompt": "p"})
    parsed = RateLimitHeaders.parse(headers)
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    limiter = Limiter(clock=lambda: now[0], sleep=sleep)
    limiter.observe(parsed)
    stats = limiter.stats()
    assert stats.learned_rpm is not None and stats.learned_rpm >= 60 * 1000
    assert stats.learned_tpm is not None and stats.learned_tpm >= 60 * 1000 * 10_000
    for _ in range(1000):  # a thousand 7,000-token requests, as fast as they may go
        await limiter.acquire(tokens=7000)
    assert now[0] <= 1.0  # at least 1,000 requests a second


async def test_configured_limits_and_no_headers_at_all(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    limited = await start_mock(rpm_limit=600, ipm_limit=1200)
    _, _, headers, _ = await post(http, limited, "/images/generations", {"prompt": "p", "n": 2})
    assert headers["x-ratelimit-limit-requests"] == "600"
    assert headers["x-ratelimit-remaining-requests"] == "599"
    assert (headers["x-ratelimit-limit-images"], headers["x-ratelimit-remaining-images"]) == (
        "1200",
        "1198",
    )
    assert "x-ratelimit-limit-tokens" in headers  # the advertised token limit stays
    silent = await start_mock(ratelimit_headers=False, rpm_limit=600)
    _, _, headers, _ = await post(http, silent, "/images/generations", {"prompt": "p"})
    assert not [name for name in headers if name.lower().startswith("x-ratelimit")]
    assert headers["openai-version"] == "2020-10-01"


async def test_concurrent_streams_are_answered_side_by_side(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    server = await start_mock(latency_s=0.2)
    body = {"prompt": "p", "stream": True, "partial_images": 1}
    answers = await asyncio.gather(
        *(post(http, server, "/images/generations", body) for _ in range(4))
    )
    assert [len(parse_sse(raw)) for *_, raw in answers] == [2] * 4
    assert server.max_in_flight == 4
