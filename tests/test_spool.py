"""The streaming decoder: images go to disk as the body arrives, whatever the chunking."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import orjson
import pytest

from batchimg._spool import (
    HEAD_BYTES,
    SPILL_BYTES,
    BadBase64,
    ResponseSpool,
    SpooledImage,
    SpoolError,
)

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(SPILL_BYTES + 5000)  # big: streamed to a temp file
JPEG = b"\xff\xd8\xff" + os.urandom(2000)  # small: kept in memory, never a temp file


def content(image: bytes | SpooledImage) -> bytes:
    return image.path.read_bytes() if isinstance(image, SpooledImage) else image


def body(*images: bytes, prefix: str = "", escape_slashes: bool = False) -> bytes:
    data = [{"b64_json": prefix + base64.b64encode(i).decode()} for i in images]
    raw = orjson.dumps({"created": 1, "data": data, "usage": {"output_tokens": 272}})
    return raw.replace(b"/", b"\\/") if escape_slashes else raw


def spool_in_chunks(tmp_path: Path, raw: bytes, size: int) -> tuple[dict, list]:
    spool = ResponseSpool(tmp_path)
    for start in range(0, len(raw), size):
        spool.feed(raw[start : start + size])
    parsed, images = spool.finish()
    assert isinstance(parsed, dict)
    return parsed, images


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000, 65536, 10**7])
def test_every_chunking_gives_the_same_images_and_json(tmp_path: Path, size: int) -> None:
    parsed, images = spool_in_chunks(tmp_path, body(PNG, JPEG), size)
    assert [content(i) for i in images] == [PNG, JPEG]
    big, small = images
    assert isinstance(big, SpooledImage) and isinstance(small, bytes)
    assert big.sha256 == hashlib.sha256(PNG).hexdigest() and big.nbytes == len(PNG)
    assert big.head == PNG[:HEAD_BYTES]
    assert [p.name for p in tmp_path.iterdir()] == [big.path.name]  # only the big one on disk
    assert parsed["usage"] == {"output_tokens": 272}
    assert [d["b64_json"] for d in parsed["data"]] == ["", ""]  # left for the caller to map


@pytest.mark.parametrize("size", [5, 4096])
def test_data_uri_prefix_and_escaped_slashes(tmp_path: Path, size: int) -> None:
    raw = body(PNG, prefix="data:image/png;base64,", escape_slashes=True)
    assert b"\\/" in raw
    _, images = spool_in_chunks(tmp_path, raw, size)
    assert content(images[0]) == PNG


def test_url_answers_and_errors_pass_through(tmp_path: Path) -> None:
    parsed, images = spool_in_chunks(tmp_path, b'{"data": [{"url": "http://x/y.png"}]}', 3)
    assert images == [] and parsed["data"][0]["url"] == "http://x/y.png"


def test_corrupt_base64_is_bad_base64_and_leaves_no_file(tmp_path: Path) -> None:
    spool = ResponseSpool(tmp_path)
    with pytest.raises(BadBase64):
        spool.feed(b'{"data": [{"b64_json": "iVBO!!!!xxxx"}]}')
    spool.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cut", [10, 40, 200])
def test_a_body_cut_short_is_an_error_and_leaves_no_file(tmp_path: Path, cut: int) -> None:
    spool = ResponseSpool(tmp_path)
    spool.feed(body(PNG)[:cut])
    with pytest.raises(SpoolError):
        spool.finish()
    assert list(tmp_path.iterdir()) == []


def test_html_error_page_is_not_json(tmp_path: Path) -> None:
    spool = ResponseSpool(tmp_path)
    spool.feed(b"<html><body>502 Bad Gateway</body></html>")
    with pytest.raises(SpoolError) as raised:
        spool.finish()
    assert not isinstance(raised.value, BadBase64)


@pytest.mark.parametrize("split", [1, 2, 3, 4, 5])
def test_data_after_padding_is_bad_base64_however_it_is_split(tmp_path: Path, split: int) -> None:
    # "QQ==" is a whole value; anything after its padding is a broken answer, not more image.
    raw = b'{"data": [{"b64_json": "QQ==QUJD"}]}'
    start = raw.index(b"QQ==")
    spool = ResponseSpool(tmp_path)
    with pytest.raises(BadBase64):
        spool.feed(raw[: start + split])
        spool.feed(raw[start + split :])
        spool.finish()
    spool.abort()
    assert list(tmp_path.iterdir()) == []
