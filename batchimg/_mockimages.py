"""Images for the mock server (`batchimg.mock`): the ones it makes and the ones it is sent.

Made: real, decodable images of the exact requested size and format, but cheap. Each is a flat
palette colour with a centred block, encoded once per `ImageSpec` and then served from a bounded
cache (bytes and base64 alike). Encoding runs in a worker thread so a cache miss does not stall
the server's event loop.

Sent (edits): every input image must declare and be PNG / JPEG / WebP and decode with Pillow;
the mask must be a PNG with an alpha channel, the size of the first image. Violations raise
`specs.ParamError`, which the server answers with a 400 like any other parameter error.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, UnidentifiedImageError

from batchimg import specs
from batchimg.specs import ParamError

#: Eight clearly different colours, so images for different prompts (and the n images of one
#: response) differ without costing more than a cache entry each.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (220, 60, 60),
    (60, 160, 80),
    (50, 100, 210),
    (230, 180, 40),
    (150, 70, 190),
    (40, 180, 190),
    (240, 130, 50),
    (120, 120, 120),
)
MAX_INPUT_IMAGES = 16
MAX_IMAGE_BYTES = 50 * 1024 * 1024
MAX_MASK_BYTES = 4 * 1024 * 1024
INPUT_MIMES = ("image/png", "image/jpeg", "image/webp")
_CACHE_MAX = 256


@dataclass(frozen=True)
class ImageSpec:
    """Everything that determines the encoded bytes of one synthetic image."""

    width: int
    height: int
    fmt: str  # png | jpeg | webp
    compression: int = 100  # the API's output_compression, used as the encoder's quality
    transparent: bool = False
    colour: int = 0  # index into PALETTE


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    b64: str
    mime: str


def _encoded(data: bytes, mime: str) -> EncodedImage:
    return EncodedImage(data=data, b64=base64.b64encode(data).decode("ascii"), mime=mime)


#: What `[[mock:corrupt]]` answers with: valid base64, but the bytes are no image.
CORRUPT = _encoded(b"\x00batchimg mock: deliberately not an image\x00", "image/png")


def colour_for(prompt: str, index: int = 0) -> int:
    """Palette index for the `index`-th image of a prompt: stable across runs and processes."""
    return (zlib.crc32(prompt.encode("utf-8")) + index) % len(PALETTE)


def encode(spec: ImageSpec) -> EncodedImage:
    """Draw and encode one image (CPU-bound: go through `render`)."""
    r, g, b = PALETTE[spec.colour]
    size = (spec.width, spec.height)
    block = (spec.width // 4, spec.height // 4, spec.width * 3 // 4, spec.height * 3 // 4)
    if spec.transparent:
        # A fully transparent canvas around an opaque block: the alpha channel is really used.
        image = Image.new("RGBA", size, (r, g, b, 0))
        ImageDraw.Draw(image).rectangle(block, fill=(r, g, b, 255))
    else:
        image = Image.new("RGB", size, (r, g, b))
        ImageDraw.Draw(image).rectangle(block, fill=(r // 2, g // 2, b // 2))
    out = io.BytesIO()
    if spec.fmt == "png":
        image.save(out, "PNG", compress_level=1)
    elif spec.fmt == "jpeg":
        image.save(out, "JPEG", quality=spec.compression)
    else:
        image.save(out, "WEBP", quality=spec.compression, method=0)
    return _encoded(out.getvalue(), specs.IMAGE_MIME[spec.fmt])


_cache: dict[ImageSpec, EncodedImage] = {}
_cache_lock = threading.Lock()  # servers in other threads (start_in_thread) share the cache


async def render(spec: ImageSpec) -> EncodedImage:
    """The encoded image for `spec`, from the cache or freshly encoded in a worker thread."""
    with _cache_lock:
        hit = _cache.get(spec)
    if hit is not None:
        return hit
    encoded = await asyncio.to_thread(encode, spec)
    with _cache_lock:
        if len(_cache) >= _CACHE_MAX:
            del _cache[next(iter(_cache))]  # oldest first: a FIFO is plenty for a mock
        _cache[spec] = encoded
    return encoded


async def render_response(params: Mapping[str, Any], n: int) -> list[EncodedImage]:
    """The n images a validated request asks for (size, format, compression, background)."""
    fmt = specs.output_format(params)
    width, height = specs.dimensions(specs.resolved_size(params))
    compression = params.get("output_compression")
    wanted = [
        ImageSpec(
            width=width,
            height=height,
            fmt=fmt,
            compression=100 if compression is None or fmt == "png" else compression,
            transparent=params.get("background") == "transparent" and fmt != "jpeg",
            colour=colour_for(params["prompt"], i),
        )
        for i in range(n)
    ]
    return list(await asyncio.gather(*(render(spec) for spec in wanted)))


# -- uploaded images (edits) --


@dataclass(frozen=True)
class UploadedFile:
    field: str  # image | image[] | mask
    content_type: str  # as declared by the multipart part
    data: bytes


@dataclass(frozen=True)
class InputImage:
    """What the mock learnt from decoding an uploaded image."""

    fmt: str | None  # png | jpeg | webp, or None for other formats Pillow can read
    width: int
    height: int
    has_alpha: bool


def probe(data: bytes) -> InputImage | None:
    """Decode an uploaded image fully; None when Pillow cannot read it."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            fmt = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}.get(image.format or "")
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            return InputImage(fmt=fmt, width=image.width, height=image.height, has_alpha=has_alpha)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
        return None


async def _check_file(upload: UploadedFile, allowed: tuple[str, ...], limit: int) -> InputImage:
    param = "mask" if upload.field == "mask" else "image"
    if upload.content_type not in allowed:
        # The real API judges the declared MIME type, not the file name or the bytes: the SDK
        # sends a nameless BytesIO as application/octet-stream, and that is rejected.
        supported = ", ".join(f"'{m}'" for m in allowed)
        raise ParamError(
            param,
            f"Invalid file '{param}': unsupported mimetype ('{upload.content_type}'). "
            f"Supported file formats are {supported}.",
            "unsupported_file_mimetype",
        )
    if len(upload.data) > limit:
        raise ParamError(param, f"Invalid file '{param}': larger than {limit // 2**20} MB.")
    info = await asyncio.to_thread(probe, upload.data)
    if info is None or info.fmt is None or specs.IMAGE_MIME[info.fmt] not in allowed:
        kinds = " / ".join(m.removeprefix("image/").upper() for m in allowed)
        raise ParamError(param, f"Invalid file '{param}': not a decodable {kinds} image.")
    return info


async def check_inputs(
    images: list[UploadedFile], mask: UploadedFile | None, model: str
) -> list[InputImage]:
    """Validate an edit's images and mask (raising ParamError); describe the images."""
    if not images:
        raise ParamError(
            "image", "Missing required parameter: 'image'.", "missing_required_parameter"
        )
    fam = specs.family(model)
    if fam == "dall-e-3":
        raise ParamError("model", "dall-e-3 does not support image edits.")
    most = 1 if fam == "dall-e-2" else MAX_INPUT_IMAGES
    if len(images) > most:
        raise ParamError("image", f"Too many images: {len(images)} (at most {most}).")
    allowed = ("image/png",) if fam == "dall-e-2" else INPUT_MIMES
    infos = [await _check_file(upload, allowed, MAX_IMAGE_BYTES) for upload in images]
    if mask is not None:
        info = await _check_file(mask, ("image/png",), MAX_MASK_BYTES)
        first = infos[0]
        if not info.has_alpha:
            raise ParamError("mask", "Invalid mask: it must be a PNG with an alpha channel.")
        if (info.width, info.height) != (first.width, first.height):
            raise ParamError(
                "mask",
                f"Invalid mask: {info.width}x{info.height} does not match the first image "
                f"({first.width}x{first.height}).",
            )
    return infos
