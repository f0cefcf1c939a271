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
