"""Images for the mock server: the ones it makes and the ones it is sent.

Made: real, decodable images of the exact requested size and format, but cheap. Each is a flat
palette colour with a centred block (an animated gif moves the block across its frames; an svg
is a small vector drawing of the same), encoded once per `ImageSpec` and then served from a
bounded cache (bytes and base64 alike). A stream's partial images are the same picture drawn
blurrier (at 1/16, 1/8, 1/4 of the size, scaled back up), in the requested format. Encoding
runs in a worker thread so a cache miss does not stall the server's event loop.

Sent (edits): every input (a multipart part, or a JSON edit's data URL, mock URL or file id once
resolved by `files`) must declare an image type the API takes, then pass the API's input rules
on fully decoded bytes (the mock's own copy; batchimg's checks are not consulted).
Violations raise `rules.RuleError`, answered with a 400 like any other parameter error.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import io
import random
import threading
import zlib
from dataclasses import dataclass

from PIL import Image, ImageDraw, UnidentifiedImageError

from .rules import Model, RuleError

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
MIME = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "svg": "image/svg+xml",
}
MAX_INPUT_BYTES = 50 * 1024 * 1024
MAX_MASK_BYTES = 4 * 1024 * 1024
_CACHE_MAX = 256


@dataclass(frozen=True)
class ImageSpec:
    """Everything that determines the encoded bytes of one synthetic image."""

    width: int
    height: int
    fmt: str  # png | jpeg | webp | gif | svg
    compression: int = 100  # the API's output_compression, used as the encoder's quality
    transparent: bool = False
    colour: int = 0  # index into PALETTE
    detailed: bool = False  # noise over ~80 % of the image: photo-sized files (~2.5 MB PNG)
    frames: int = 1  # gif: frames of the animation
    #: A stream's partial image: drawn at 1/blur of the size and scaled back up (0: final)
    blur: int = 0


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


def _svg(spec: ImageSpec) -> bytes:
    r, g, b = PALETTE[spec.colour]
    w, h = spec.width, spec.height
    fill = "none" if spec.transparent else f"rgb({r},{g},{b})"
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}">\n'
        f'  <rect width="{w}" height="{h}" fill="{fill}"/>\n'
        f'  <rect x="{w // 4}" y="{h // 4}" width="{w // 2}" height="{h // 2}" '
        f'fill="rgb({r // 2},{g // 2},{b // 2})"/>\n'
        f"</svg>\n"
    ).encode()


def _gif(spec: ImageSpec) -> bytes:
    r, g, b = PALETTE[spec.colour]
    size = (spec.width, spec.height)
    frames = []
    step = spec.width // (2 * max(1, spec.frames))
    for index in range(spec.frames):  # the block slides right, one step a frame
        frame = Image.new("P", size, 0)
        frame.putpalette([r, g, b, r // 2, g // 2, b // 2])
        left = spec.width // 8 + index * step
        block = (left, spec.height // 4, left + spec.width // 4, spec.height * 3 // 4)
        ImageDraw.Draw(frame).rectangle(block, fill=1)
        frames.append(frame)
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=200, loop=0)
    return out.getvalue()


def encode(spec: ImageSpec) -> EncodedImage:
    """Draw and encode one image (CPU-bound: go through `render`)."""
    if spec.fmt == "svg":
        return _encoded(_svg(spec), MIME["svg"])
    if spec.fmt == "gif":
        return _encoded(_gif(spec), MIME["gif"])
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
    if spec.blur > 1:  # a draft: the same picture, blurrier, at the full size
        small = (max(1, spec.width // spec.blur), max(1, spec.height // spec.blur))
        image = image.resize(small, Image.Resampling.BILINEAR).resize(
            size, Image.Resampling.BILINEAR
        )
    out = io.BytesIO()
    if spec.fmt == "png":
        image.save(out, "PNG", compress_level=1)
    elif spec.fmt == "jpeg":
        image.save(out, "JPEG", quality=spec.compression)
    else:
        image.save(out, "WEBP", quality=spec.compression, method=0)
    return _encoded(out.getvalue(), MIME[spec.fmt])


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
    fmt: str,
    width: int,
    height: int,
    prompt: str,
    n: int,
    *,
    compression: int | None = None,
    transparent: bool = False,
    frames: int = 1,
    detailed: bool = False,
    drafts: int = 0,
) -> tuple[list[EncodedImage], list[EncodedImage]]:
    """The n images a validated request asks for, and `drafts` partial images of the first
    (blurrier first, sharper later), as a stream sends them before it."""
    final = ImageSpec(
        width=width,
        height=height,
        fmt=fmt,
        compression=100 if compression is None or fmt not in ("jpeg", "webp") else compression,
        transparent=transparent and fmt != "jpeg",
        colour=colour_for(prompt),
        detailed=detailed and fmt in ("png", "jpeg", "webp"),
        frames=frames,
    )
    wanted = [dataclasses.replace(final, colour=colour_for(prompt, i)) for i in range(n)]
    partial = [dataclasses.replace(final, blur=2 ** (drafts - i + 1)) for i in range(drafts)]
    rendered = await asyncio.gather(*(render(spec) for spec in (*wanted, *partial)))
    return list(rendered[:n]), list(rendered[n:])


# -- uploaded images (edits) --


@dataclass(frozen=True)
class UploadedFile:
    """An input image: a multipart part, or a JSON edit's reference once resolved."""

    field: str  # image | image[] | mask (multipart); images | mask (JSON)
    filename: str  # JSON: the reference's own name (images[0], or the file's name)
    content_type: str  # as declared by the part (or the data URL); sniffed for file ids
    data: bytes
    param: str | None = None  # what errors name it; None: image or mask, from the field

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def error_param(self) -> str:
        if self.param is not None:
            return self.param
        return "mask" if self.field == "mask" else "image"


def _check_declared_type(upload: UploadedFile, allowed: tuple[str, ...]) -> None:
    # The real API judges the declared MIME type, not the file name: the SDK sends a nameless
    # BytesIO as application/octet-stream, and that is rejected.
    if upload.content_type not in allowed:
        param = upload.error_param
        supported = ", ".join(f"'{m}'" for m in allowed)
        raise RuleError(
            param,
            f"Invalid file '{param}': unsupported mimetype ('{upload.content_type}'). "
            f"Supported file formats are {supported}.",
            "unsupported_file_mimetype",
        )


@dataclass(frozen=True)
class Decoded:
    """An uploaded image as Pillow decoded it."""

    fmt: str | None  # PNG | JPEG | WEBP, or None if it does not decode
    width: int = 0
    height: int = 0
    has_alpha: bool = False


def _decode(upload: UploadedFile) -> Decoded:
    try:
        with Image.open(io.BytesIO(upload.data)) as image:
            image.load()
            alpha = "A" in image.getbands() or "transparency" in image.info
            return Decoded(image.format, image.width, image.height, alpha)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
        return Decoded(None)


def _refuse(upload: UploadedFile, role: str, why: str) -> RuleError:
    return RuleError(upload.error_param, f"Invalid {role} '{upload.filename}': {why}.")


async def check_inputs(
    images: list[UploadedFile], mask: UploadedFile | None, model: Model, fmt: str
) -> list[tuple[int, int]]:
    """Validate an edit's images and mask (RuleError); return the images' sizes."""
    if not images:
        raise RuleError(
            "image", "Missing required parameter: 'image'.", "missing_required_parameter"
        )
    dalle2 = model.kind == "dall-e-2"
    most = 1 if dalle2 else 16
    if len(images) > most:
        raise RuleError("image", f"{len(images)} images given; {model.name} takes at most {most}.")
    for upload in images:
        _check_declared_type(upload, ("image/png",) if dalle2 else INPUT_MIMES)
    if mask is not None:
        if fmt == "gif":
            raise RuleError("mask", "GIF output does not support masks.")
        _check_declared_type(mask, ("image/png",))
    decoded = [await asyncio.to_thread(_decode, upload) for upload in images]
    for upload, info in zip(images, decoded, strict=True):
        limit = MAX_MASK_BYTES if dalle2 else MAX_INPUT_BYTES
        if len(upload.data) > limit:
            raise _refuse(upload, "image", f"over {limit // 2**20} MB")
        allowed = ("PNG",) if dalle2 else ("PNG", "JPEG", "WEBP")
        if info.fmt not in allowed:
            raise _refuse(upload, "image", f"not a valid {' / '.join(allowed)} image")
        if dalle2 and info.width != info.height:
            raise _refuse(upload, "image", "dall-e-2 edits take a square PNG")
    if mask is not None:
        info = await asyncio.to_thread(_decode, mask)
        if len(mask.data) > MAX_MASK_BYTES:
            raise _refuse(mask, "mask", "over 4 MB")
        if info.fmt != "PNG" or not info.has_alpha:
            raise _refuse(mask, "mask", "masks are PNG images with an alpha channel")
        first = decoded[0]
        if (info.width, info.height) != (first.width, first.height):
            raise _refuse(mask, "mask", "the mask must be the same size as the first image")
    return [(info.width, info.height) for info in decoded]
