"""The official `openai` SDK, unchanged, against the mock: proof that the mock speaks the API.

The SDK sends generations as JSON and edits as multipart with a list of images as repeated
`image[]` parts (verified against openai-python's `images.edit`, which extracts files at paths
`image` and `image.<array>` with the bracket array format).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

import openai
import pytest
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
