"""Images for the mock server (`batchimg.mock`): the ones it makes and the ones it is sent.

Made: real, decodable images of the exact requested size and format, but cheap. Each is a flat
palette colour with a centred block, encoded once per `ImageSpec` and then served from a bounded
cache (bytes and base64 alike). Encoding runs in a worker thread so a cache miss does not stall
the server's event loop.

Sent (edits): every input part must declare an image type the API takes, then pass the same
rules the client applies before sending (`batchimg.inputs.check_edit_inputs`), on fully decoded
bytes. Violations raise `specs.ParamError`, answered with a 400 like any other parameter error.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import random
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from batchimg import specs
from batchimg.inputs import ImageInfo, check_edit_inputs, probe
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
    detailed: bool = False  # noise over ~80 % of the image: photo-sized files (~2.5 MB PNG)


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    b64: str
    mime: str
    sha256: str


def _encoded(data: bytes, mime: str) -> EncodedImage:
    return EncodedImage(
        data=data,
        b64=base64.b64encode(data).decode("ascii"),
        mime=mime,
        sha256=hashlib.sha256(data).hexdigest(),
    )


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
    if spec.detailed:
        # Incompressible noise, seeded by the colour, over ~80 % of the area: real photos
        # compress about this badly, so bodies weigh what real answers weigh.
        w, h = int(spec.width * 0.9), int(spec.height * 0.9)
        noise = random.Random(spec.colour).randbytes(w * h * 3)
        image.paste(Image.frombytes("RGB", (w, h), noise), (spec.width // 20, spec.height // 20))
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


async def render_response(
    params: Mapping[str, Any], n: int, *, detailed: bool = False
) -> list[EncodedImage]:
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
            detailed=detailed,
        )
        for i in range(n)
    ]
    return list(await asyncio.gather(*(render(spec) for spec in wanted)))


# -- uploaded images (edits) --


@dataclass(frozen=True)
class UploadedFile:
    field: str  # image | image[] | mask
    filename: str
    content_type: str  # as declared by the multipart part
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _check_declared_type(upload: UploadedFile, allowed: tuple[str, ...]) -> None:
    # The real API judges the declared MIME type, not the file name: the SDK sends a nameless
    # BytesIO as application/octet-stream, and that is rejected.
    if upload.content_type not in allowed:
        param = "mask" if upload.field == "mask" else "image"
        supported = ", ".join(f"'{m}'" for m in allowed)
        raise ParamError(
            param,
            f"Invalid file '{param}': unsupported mimetype ('{upload.content_type}'). "
            f"Supported file formats are {supported}.",
            "unsupported_file_mimetype",
        )


def _probe(upload: UploadedFile) -> ImageInfo:
    return probe(upload.data, upload.filename, len(upload.data), decode=True)


async def check_inputs(
    images: list[UploadedFile], mask: UploadedFile | None, model: str
) -> list[ImageInfo]:
    """Validate an edit's images and mask with the shared rules (ParamError); describe them."""
    for upload in images:
        _check_declared_type(upload, INPUT_MIMES)
    if mask is not None:
        _check_declared_type(mask, ("image/png",))
    infos = [await asyncio.to_thread(_probe, upload) for upload in images]
    mask_info = await asyncio.to_thread(_probe, mask) if mask is not None else None
    check_edit_inputs(infos, mask_info, model)
    return infos
