"""The streaming decoder: images go to disk as the body arrives, whatever the chunking."""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
from pathlib import Path

import orjson
import pytest

from batchimg._spool import (
    HEAD_BYTES,
    SPILL_BYTES,
    STREAM_BYTES,
    BadBase64,
    ImageSink,
    ResponseSpool,
    SpooledImage,
    SpoolError,
    discard,
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


def in_chunks(raw: bytes, size: int) -> list[bytes]:
    return [raw[start : start + size] for start in range(0, len(raw), size)]


def cut_at(raw: bytes, *cuts: int) -> list[bytes]:
    bounds = [0, *cuts, len(raw)]
    return [raw[start:end] for start, end in itertools.pairwise(bounds)]


def outcome(tmp_path: Path, chunks: list[bytes]) -> object:
    """What the spool makes of a body arriving in these chunks: the JSON and each image
    (content, hash, head), or the name of the error; either way no temp file is left behind."""
    spool = ResponseSpool(tmp_path)
    try:
        for chunk in chunks:
            spool.feed(chunk)
        parsed, images = spool.finish()
    except SpoolError as exc:
        spool.abort()
        assert list(tmp_path.iterdir()) == []
        return type(exc).__name__
    kept = [
        (content(i), i.sha256, i.head, i.nbytes) if isinstance(i, SpooledImage) else i
        for i in images
    ]
    discard(images)
    return parsed, kept


def value(raw: bytes, index: int = 0) -> tuple[int, int]:
    """Where the `index`-th b64_json value of `raw` starts and ends."""
    start = 0
    for _ in range(index + 1):
        start = raw.index(b'"b64_json":"', start) + len(b'"b64_json":"')
    return start, raw.index(b'"', start)


def spoiled(raw: bytes, at: float, text: bytes) -> bytes:
    """`raw` with `text` put in place of the character at fraction `at` of its first value."""
    start, end = value(raw)
    cut = start + int((end - start) * at)
    return raw[:cut] + text + raw[cut + 1 :]


B64_PNG = base64.b64encode(PNG).decode()
WRAPPED = "\n".join(B64_PNG[i : i + 76] for i in range(0, len(B64_PNG), 76))
LATE_QUOTE = orjson.dumps({"data": [{"b64_json": B64_PNG, "revised_prompt": "p" * 70_000}]})
BODIES = {
    "two images": body(PNG, JPEG),
    "data URI and escaped slashes": body(
        PNG, JPEG, prefix="data:image/png;base64,", escape_slashes=True
    ),
    "wrapped at 76 columns": orjson.dumps({"data": [{"b64_json": WRAPPED}]}),
    "quotes inside a data URI prefix": body(PNG, prefix='data:image/png;name="a";base64,'),
    "closing quote far from the end": LATE_QUOTE,
    "empty value": b'{"data": [{"b64_json": ""}]}',
    "url only": b'{"data": [{"url": "http://x/y.png"}]}',
    "a bad character early": spoiled(body(PNG), 0.01, b"!"),
    "a bad character late": spoiled(body(PNG), 0.97, b"!"),
    "a blank inside": spoiled(body(PNG), 0.5, b" "),
    "padding inside": spoiled(body(PNG), 0.5, b"="),
    "an escape base64 never has": spoiled(body(PNG), 0.5, b"\\t"),
    "a data: prefix without a comma": body(PNG, prefix="data:"),
    "cut inside the value": body(PNG)[: value(body(PNG))[0] + 200_000],
    "cut after the value": body(PNG)[:-20],
    "an HTML page": b"<html><body>502 Bad Gateway</body></html>",
}
BROKEN = {"a bad character early": "BadBase64", "a bad character late": "BadBase64",
          "a blank inside": "BadBase64", "padding inside": "BadBase64",
          "an escape base64 never has": "BadBase64", "a data: prefix without a comma": "BadBase64",
          "cut inside the value": "SpoolError", "cut after the value": "SpoolError",
          "an HTML page": "SpoolError"}  # fmt: skip
#: Chunks shorter than STREAM_BYTES are taken apart character by character; longer ones are
#: first decoded whole (and each of these leaves a different remainder of a base64 quantum).
CHUNKINGS = [7, 4096, 65536, *(STREAM_BYTES + extra for extra in range(4))]


@pytest.mark.parametrize("name", list(BODIES))
def test_a_body_gives_the_same_answer_however_it_arrives(tmp_path: Path, name: str) -> None:
    raw = BODIES[name]
    whole = outcome(tmp_path, [raw])
    if name in BROKEN:
        assert whole == BROKEN[name]
    else:
        assert isinstance(whole, tuple)
    for size in CHUNKINGS if len(raw) > 1000 else [1, 2, 3, 5]:
        assert outcome(tmp_path, in_chunks(raw, size)) == whole, f"chunks of {size}"


def test_wrapped_and_prefixed_values_decode_to_the_image(tmp_path: Path) -> None:
    names = [
        "data URI and escaped slashes",
        "wrapped at 76 columns",
        "quotes inside a data URI prefix",
    ]
    for name in names:
        _, images = outcome(tmp_path, [BODIES[name]])  # type: ignore[misc]
        assert images[0][0] == PNG


def test_a_small_image_comes_back_as_bytes_and_never_touches_the_disk(tmp_path: Path) -> None:
    spool = ResponseSpool(tmp_path)
    spool.feed(body(JPEG))
    _, images = spool.finish()
    assert images == [JPEG] and list(tmp_path.iterdir()) == []


def test_an_image_of_many_small_pieces_spills_whole(tmp_path: Path) -> None:
    sink = ImageSink(tmp_path)
    for start in range(0, len(PNG), 100):  # thousands of pieces held before the spill
        sink.write(PNG[start : start + 100])
    image = sink.finish()
    assert isinstance(image, SpooledImage) and image.path.read_bytes() == PNG
    assert image.sha256 == hashlib.sha256(PNG).hexdigest() and image.head == PNG[:HEAD_BYTES]


@pytest.mark.parametrize("split", [1, 2, 3, 4])
def test_padding_before_a_long_stretch_is_bad_base64_wherever_it_is_cut(
    tmp_path: Path, split: int
) -> None:
    # "QQ==" ends a value: a chunk long enough to be decoded in one go must not hide that.
    raw = orjson.dumps({"data": [{"b64_json": "QQ==" + B64_PNG}]})
    start = value(raw)[0]
    assert outcome(tmp_path, cut_at(raw, start + split, start + 4 * STREAM_BYTES)) == "BadBase64"


def test_a_long_stretch_that_ends_in_padding_ends_the_value(tmp_path: Path) -> None:
    first = base64.b64encode(PNG[: 3 * STREAM_BYTES + 1]).decode()  # ends in "=="
    raw = orjson.dumps({"data": [{"b64_json": first + B64_PNG}]})
    start = value(raw)[0]
    assert (
        outcome(tmp_path, cut_at(raw, start + len(first), start + 8 * STREAM_BYTES)) == "BadBase64"
    )


def test_a_quote_in_the_last_characters_of_a_long_chunk_ends_the_value(tmp_path: Path) -> None:
    # Not JSON after the value; a chunk that ends in what looks like base64 must not hide that.
    raw = body(PNG)[: value(body(PNG))[1]] + b'"AAAA' + B64_PNG.encode() + b'"}]}'
    end = value(raw)[1]
    assert outcome(tmp_path, cut_at(raw, end + 3, end + 4 * STREAM_BYTES)) == "SpoolError"
    assert outcome(tmp_path, [raw]) == "SpoolError"
