"""The official `openai` SDK, unchanged, against the mock: proof that the mock speaks the API.

The SDK sends generations as JSON and edits as multipart with a list of images as repeated
`image[]` parts (verified against openai-python's `images.edit`, which extracts files at paths
`image` and `image.<array>` with the bracket array format). With `stream=True` it reads
server-sent events into `ImageGen...Event` / `ImageEdit...Event` models chosen by the `type`
field of each event's data. It has no method for the JSON edit body (`images: [{image_url} |
{file_id}]`), so those go through its generic `client.post`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import openai
import pytest
from openai.types import (
    ImageEditCompletedEvent,
    ImageEditPartialImageEvent,
    ImageGenCompletedEvent,
    ImageGenPartialImageEvent,
    ImagesResponse,
)
from PIL import Image

from batchimg.mock import MockConfig, MockServer
from tests.helpers import threaded_mock

KEY = "sk-mock-compat"


@pytest.fixture
def server() -> Iterator[MockServer]:
    with threaded_mock(MockConfig(api_key=KEY, retry_after_s=0.01)) as server:
        yield server


@pytest.fixture
def client(server: MockServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as client:
        yield client


def write_png(path: Path, size: tuple[int, int], mode: str = "RGB") -> Path:
    Image.new(mode, size, (0, 0, 0, 0) if mode == "RGBA" else (200, 100, 50)).save(path, "PNG")
    return path


def test_generate_decodes_to_jpegs_with_usage(client: openai.OpenAI) -> None:
    res = client.images.generate(
        model="gpt-image-1",
        prompt="a lighthouse at dusk",
        n=2,
        size="1024x1536",
        quality="low",
        output_format="jpeg",
    )

    assert res.data is not None
    assert len(res.data) == 2
    for item in res.data:
        assert item.b64_json is not None
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert (image.format, image.size) == ("JPEG", (1024, 1536))
    assert res.usage is not None
    assert res.usage.output_tokens == 816  # 2 x 408, low 1024x1536
    assert res.size == "1024x1536"
    assert res.output_format == "jpeg"


def test_edit_with_two_files_and_a_mask(
    client: openai.OpenAI, server: MockServer, tmp_path: Path
) -> None:
    first = write_png(tmp_path / "first.png", (96, 64))
    second = write_png(tmp_path / "second.png", (32, 32))
    mask = write_png(tmp_path / "mask.png", (96, 64), mode="RGBA")
    with first.open("rb") as f1, second.open("rb") as f2, mask.open("rb") as m:
        res = client.images.edit(
            model="gpt-image-1", image=[f1, f2], mask=m, prompt="add a red balloon", n=1
        )

    assert res.data is not None
    assert res.data[0].b64_json is not None
    assert Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))).format == "PNG"
    record = server.requests[-1]
    assert (record.endpoint, record.image_count, record.has_mask) == ("edits", 2, True)
    assert record.n == 1  # sent as the form text "1", converted back by the mock


def test_edit_with_a_nameless_buffer_is_rejected_like_the_real_api(
    client: openai.OpenAI,
) -> None:
    # The SDK labels a BytesIO without a name application/octet-stream; OpenAI answers 400.
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, "PNG")
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(model="gpt-image-1", image=buffer.getvalue(), prompt="p")
    assert caught.value.code == "unsupported_file_mimetype"


def test_wrong_key_raises_authentication_error(server: MockServer) -> None:
    with (
        openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0) as client,
        pytest.raises(openai.AuthenticationError) as caught,
    ):
        client.images.generate(model="gpt-image-1", prompt="p")
    assert caught.value.code == "invalid_api_key"
    assert caught.value.request_id == server.requests[-1].request_id


def test_moderation_directive_raises_bad_request_with_its_code(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="gpt-image-1", prompt="[[mock:moderation]]")
    assert caught.value.code == "moderation_blocked"
    assert caught.value.type == "image_generation_user_error"


def test_sdk_retries_429s_using_the_retry_after_headers() -> None:
    with threaded_mock(MockConfig(rate_limit_rate=1.0, retry_after_s=0.01)) as server:
        with (
            openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=2) as client,
            pytest.raises(openai.RateLimitError),
        ):
            client.images.generate(model="gpt-image-1", prompt="p")
        assert [r.status for r in server.requests] == [429, 429, 429]


def test_azure_client_reaches_the_deployment_path(server: MockServer) -> None:
    with openai.AzureOpenAI(
        azure_endpoint=server.base_url.removesuffix("/v1"),
        azure_deployment="my-image-deployment",
        api_version="2025-04-01-preview",
        api_key=KEY,
        max_retries=0,
    ) as client:
        res = client.images.generate(model="gpt-image-1", prompt="p", size="1536x1024")
    assert res.data is not None
    assert res.size == "1536x1024"
    assert server.requests[-1].params["model"] == "gpt-image-1"


async def test_async_client_generates() -> None:
    async with (
        MockServer(MockConfig(api_key=KEY)) as server,
        openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as client,
    ):
        res = await client.images.generate(
            model="gpt-image-1", prompt="an owl", output_format="webp", background="transparent"
        )
    assert res.data is not None
    assert res.data[0].b64_json is not None
    image = Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json)))
    assert (image.format, image.mode) == ("WEBP", "RGBA")
    assert res.background == "transparent"


# -- today's models (API_NOTES "Late 2026"; the SDK's own parameter docs) -------------------------


def test_custom_size_max_quality_and_complexity(client: openai.OpenAI) -> None:
    res = client.images.generate(
        model="gpt-image-2.6-flare", prompt="a harbour", size="1536x864", quality="max",
        complexity="low",
    )  # fmt: skip
    assert res.data is not None and res.data[0].b64_json is not None
    image = Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json)))
    assert (image.format, image.size) == ("PNG", (1536, 864))
    assert (res.size, res.quality, res.output_format) == ("1536x864", "max", "png")
    assert res.usage is not None and res.usage.output_tokens_details is not None
    assert res.usage.output_tokens_details.image_tokens == res.usage.output_tokens > 0


def test_animated_gif_has_the_frames_asked_for(client: openai.OpenAI) -> None:
    res = client.images.generate(
        model="gpt-image-2.6-sunburst", prompt="a spinner", output_format="gif", frame_count=5,
        frame_duration_ms=100, size="512x512", quality="low",
    )  # fmt: skip
    assert res.data is not None and res.data[0].b64_json is not None
    with Image.open(io.BytesIO(base64.b64decode(res.data[0].b64_json))) as gif:
        assert (gif.format, gif.size, gif.n_frames) == ("GIF", (512, 512), 5)
    assert res.output_format == "gif"


def test_svg_output_and_its_authoring_usage(client: openai.OpenAI) -> None:
    res = client.images.generate(
        model="gpt-image-2.6-sunburst", prompt="an icon", output_format="svg",
        svg={"model": "author-7", "reasoning": {"effort": "low"}},
    )  # fmt: skip
    assert res.data is not None and res.data[0].b64_json is not None
    root = ElementTree.fromstring(base64.b64decode(res.data[0].b64_json))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert res.svg_usage is not None and res.svg_usage.model == "author-7"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="gpt-image-2.6-sunburst", prompt="x", output_format="svg", n=2)
    assert caught.value.param == "n"


def test_rules_of_each_model_are_the_apis(client: openai.OpenAI) -> None:
    refused = [
        {"model": "gpt-image-2", "quality": "xhigh"},
        {"model": "gpt-image-2.5-flare", "output_format": "gif"},
        {"model": "gpt-image-2", "size": "1500x864"},
        {"model": "gpt-image-2.6-flare", "frame_count": 4},
    ]
    for params in refused:
        with pytest.raises(openai.BadRequestError):
            client.images.generate(prompt="p", **params)
    res = client.images.generate(model="gpt-image-2-2026-04-21", prompt="p", size="960x720")
    assert res.size == "960x720"


def test_models_list_carries_shutdown_dates(client: openai.OpenAI) -> None:
    listed = {m.id: m for m in client.models.list()}
    assert listed["gpt-image-1"].shutdown_date == "2026-10-23"
    assert listed["gpt-image-1.5"].shutdown_date == "2026-12-01"
    assert listed["gpt-image-2.6-flare"].shutdown_date is None
    assert "gpt-image-2-2026-04-21" in listed
    assert client.models.retrieve("dall-e-3").shutdown_date == "2026-05-12"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-image-9")


def test_as_openai_itself_a_retired_model_is_not_found() -> None:
    with (
        threaded_mock(MockConfig(api_key=KEY, enforce_shutdown=True)) as server,
        openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as client,
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            client.images.generate(model="gpt-image-1", prompt="p")
        assert caught.value.code == "model_not_found"
        assert client.images.generate(model="gpt-image-2", prompt="p").data


# -- streaming, JSON edits and headers: the SDK's own methods where it has them -----


def decode_image(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_streamed_generation_sends_each_partial_image_then_the_completed_one(
    client: openai.OpenAI, server: MockServer
) -> None:
    stream = client.images.generate(
        model="gpt-image-1", prompt="a lighthouse, streamed", size="1536x1024", quality="low",
        output_format="jpeg", stream=True, partial_images=3,
    )  # fmt: skip
    events = list(stream)

    partials, completed = events[:-1], events[-1]
    assert [type(e) for e in partials] == [ImageGenPartialImageEvent] * 3
    assert [e.partial_image_index for e in partials] == [0, 1, 2]
    assert isinstance(completed, ImageGenCompletedEvent)
    for event in events:
        image = decode_image(event.b64_json)
        assert (image.format, image.size) == ("JPEG", (1536, 1024))
        assert (event.size, event.quality, event.output_format) == ("1536x1024", "low", "jpeg")
        assert event.background == "opaque"
    # Drafts are real images, but not the final one: each is blurrier than the next.
    assert len({e.b64_json for e in events}) == 4
    # API_NOTES: low 1536x1024 = 400 output tokens, and each partial image 100 more.
    usage = completed.usage.to_dict()
    assert usage["output_tokens"] == 400 + 3 * 100
    assert usage["output_tokens_details"] == {"image_tokens": 700, "text_tokens": 0}
    assert usage["total_tokens"] == usage["input_tokens"] + 700
    record = server.requests[-1]
    assert record.stream and record.usage == usage
    assert record.events == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]


async def test_async_client_streams_an_edit(tmp_path: Path) -> None:
    source = write_png(tmp_path / "in.png", (96, 64))
    async with (
        MockServer(MockConfig(api_key=KEY)) as server,
        openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as client,
    ):
        with source.open("rb") as fh:
            stream = await client.images.edit(
                model="gpt-image-2.5-flare", image=fh, prompt="add a moon", stream=True,
                partial_images=1, output_format="webp", background="transparent",
            )  # fmt: skip
            events = [event async for event in stream]

    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    partial, completed = events
    assert isinstance(partial, ImageEditPartialImageEvent)
    assert isinstance(completed, ImageEditCompletedEvent)
    for event in events:
        image = decode_image(event.b64_json)
        assert (image.format, image.mode) == ("WEBP", "RGBA")
    assert completed.usage.input_tokens_details.image_tokens > 0
    assert completed.usage.to_dict()["output_tokens_details"]["text_tokens"] == 0
    assert server.requests[-1].files[0][:3] == ("image", "in.png", "image/png")


def test_streaming_is_refused_where_the_api_refuses_it(client: openai.OpenAI) -> None:
    refused = [
        {"model": "dall-e-3", "prompt": "p"},  # GPT image models only
        {"model": "gpt-image-2", "prompt": "p", "n": 2},
        {"model": "gpt-image-2.6-flare", "prompt": "p", "output_format": "gif"},
        {"model": "gpt-image-2", "prompt": "p", "partial_images": 4},
    ]
    params = []
    for body in refused:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(**body, stream=True)
        params.append(caught.value.param)
    assert params == ["stream", "n", "stream", "partial_images"]


def test_a_truncated_stream_ends_before_the_completed_event() -> None:
    with (
        threaded_mock(MockConfig(api_key=KEY, truncate_rate=1.0)) as server,
        openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0) as client,
    ):
        seen: list[str] = []
        with pytest.raises(openai.APIConnectionError):
            for event in client.images.generate(
                model="gpt-image-2", prompt="p", stream=True, partial_images=2
            ):
                seen.append(event.type)
        assert seen == ["image_generation.partial_image"] * 2
        assert server.requests[-1].events == seen  # the completed event was cut in half
        assert server.requests[-1].fault == "truncate"


def test_json_edit_by_data_url_and_by_uploaded_file_id(
    client: openai.OpenAI, server: MockServer, tmp_path: Path
) -> None:
    # The SDK's images.edit() is multipart only; the JSON body goes through its generic post().
    first = write_png(tmp_path / "first.png", (96, 64))
    mask = write_png(tmp_path / "mask.png", (96, 64), mode="RGBA")
    with (tmp_path / "second.png").open("wb") as fh:
        Image.new("RGB", (32, 32), (9, 9, 9)).save(fh, "JPEG")
    with (tmp_path / "second.png").open("rb") as fh:
        uploaded = client.files.create(file=fh, purpose="vision")
    assert uploaded.id.startswith("file-") and uploaded.purpose == "vision"
    assert client.files.retrieve(uploaded.id).bytes == (tmp_path / "second.png").stat().st_size

    def data_url(path: Path) -> str:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()

    body = {
        "model": "gpt-image-2",
        "prompt": "join them",
        "size": "1024x1024",
        "images": [{"image_url": data_url(first)}, {"file_id": uploaded.id}],
        "mask": {"image_url": data_url(mask)},
    }
    res = client.post("/images/edits", body=body, cast_to=ImagesResponse)

    assert res.data is not None and res.data[0].b64_json is not None
    assert decode_image(res.data[0].b64_json).size == (1024, 1024)
    assert res.usage is not None and res.usage.input_tokens_details.image_tokens > 0
    record = server.requests[-1]
    assert (record.endpoint, record.content_type, record.status) == (
        "edits",
        "application/json",
        200,
    )
    assert (record.image_count, record.has_mask) == (2, True)
    assert record.params["images"][1] == {"file_id": uploaded.id}
    # The file id's bytes are sniffed (a JPEG, whatever its name says); the data URLs declared.
    assert [(f[0], f[2]) for f in record.files] == [
        ("images", "image/png"),
        ("images", "image/jpeg"),
        ("mask", "image/png"),
    ]
    with pytest.raises(openai.NotFoundError):
        client.post(
            "/images/edits",
            body={"model": "gpt-image-2", "prompt": "p", "images": [{"file_id": "file-gone"}]},
            cast_to=ImagesResponse,
        )


def test_plain_answer_carries_openais_usual_headers(client: openai.OpenAI) -> None:
    raw = client.images.with_raw_response.generate(model="gpt-image-2", prompt="p")
    raw.parse()
    again = client.images.with_raw_response.generate(model="gpt-image-2", prompt="p")
    headers = again.headers

    assert headers["openai-version"] == "2020-10-01"
    assert int(headers["openai-processing-ms"]) >= 0
    assert again.request_id == headers["x-request-id"]
    # No limit configured: generous advertised limits, with real counts of what was used.
    limit = int(headers["x-ratelimit-limit-requests"])
    assert limit >= 100_000
    assert int(headers["x-ratelimit-remaining-requests"]) == limit - 2
    billed = raw.parse().usage
    assert billed is not None
    tokens = int(headers["x-ratelimit-limit-tokens"])
    assert int(headers["x-ratelimit-remaining-tokens"]) == tokens - 2 * billed.total_tokens
    assert headers["x-ratelimit-reset-requests"].endswith("s")
