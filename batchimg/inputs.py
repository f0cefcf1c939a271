"""Input images for edits: the API's rules, checked before anything is sent.

`check_edit_inputs` judges the files on disk before any spend, by the model's edit limits in
the catalog: for GPT image models PNG / JPEG / WebP only (by their bytes, not their names), at
most 16 images of at most 50 MB, a mask that is a PNG with an alpha channel, under 4 MB and the
size of the first image; dall-e-2's one square PNG under 4 MB.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from . import specs
from .catalog import Catalog, EditLimits
from .specs import ParamError

MAX_EDIT_IMAGES = 16  # the most any model takes (the manifest refuses more before probing)
MAX_IMAGE_BYTES = 50 * 1024 * 1024  # files larger than this are not hashed
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


@dataclass(frozen=True)
class ImageInfo:
    """What the rules need to know of one input image."""

    name: str  # how messages name it: the path as written, or the uploaded file name
    fmt: str | None  # png | jpeg | webp by the bytes; None for anything else
    width: int
    height: int
    has_alpha: bool
    nbytes: int


def probe(source: bytes | BinaryIO, name: str, nbytes: int, *, decode: bool) -> ImageInfo:
    """Describe an image from its bytes; `decode=False` reads only the header.

    Anything Pillow cannot read, or that is not PNG / JPEG / WebP, gets `fmt=None`.
    """
    from PIL import Image, UnidentifiedImageError  # only edits need Pillow: import it then

    fh = io.BytesIO(source) if isinstance(source, bytes) else source
    head = fh.read(16)
    fh.seek(0)
    unknown = ImageInfo(name, None, 0, 0, False, nbytes)
    if specs.sniff_format(head) is None:
        return unknown
    try:
        with Image.open(fh) as image:
            if decode:
                image.load()
            fmt = _PIL_FORMATS.get(image.format or "")
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            return ImageInfo(name, fmt, image.width, image.height, has_alpha, nbytes)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
        return unknown


def check_edit_inputs(
    images: Sequence[ImageInfo],
    mask: ImageInfo | None,
    model: str,
    catalog: Catalog | None = None,
) -> None:
    """Raise ParamError (naming the file) for the first input the API would reject, by the
    model's edit limits in the catalog (a model it does not know gets the GPT image limits)."""
    if not images:
        raise ParamError(
            "image", "Missing required parameter: 'image'.", "missing_required_parameter"
        )
    spec = (catalog or Catalog.default()).spec(model)
    if spec.known and "edits" not in spec.endpoints:
        raise ParamError("model", f"{model} does not support image edits.")
    limits = spec.edits or EditLimits()
    if len(images) > limits.max_images:
        raise ParamError(
            "image", f"{len(images)} input images; {model} takes at most {limits.max_images}."
        )
    for info in images:
        _check_one(info, "image", limits.image_formats, limits.max_image_bytes)
        if limits.square and info.width != info.height:
            raise ParamError(
                "image",
                f"image '{info.name}' is {info.width}x{info.height}; {model} edits take a "
                f"square {' / '.join(f.upper() for f in limits.image_formats)}.",
            )
    if mask is None:
        return
    _check_one(mask, "mask", ("png",), limits.mask_max_bytes)
    if not mask.has_alpha:
        raise ParamError("mask", f"mask '{mask.name}' has no alpha channel; masks are RGBA PNGs.")
    first = images[0]
    if (mask.width, mask.height) != (first.width, first.height):
        raise ParamError(
            "mask",
            f"mask '{mask.name}' is {mask.width}x{mask.height} but the first image "
            f"'{first.name}' is {first.width}x{first.height}; they must match.",
        )


def _check_one(info: ImageInfo, role: str, formats: tuple[str, ...], limit: int) -> None:
    if info.nbytes > limit:
        raise ParamError(
            role,
            f"{role} '{info.name}' is {info.nbytes / 2**20:.1f} MB; the limit is "
            f"{limit // 2**20} MB.",
        )
    if info.fmt not in formats:
        kinds = " / ".join(f.upper() for f in formats)
        found = f"a {info.fmt.upper()}" if info.fmt else "not a readable image"
        raise ParamError(role, f"{role} '{info.name}' is {found}; expected {kinds}.")


@dataclass(frozen=True)
class InputFile:
    """An input file an item sends: where it is, what it is, and its content hash."""

    path: Path  # resolved against the manifest's directory
    given: str  # as written in the manifest (what the ledger shows)
    fmt: str
    sha256: str
    width: int = 0
    height: int = 0

    @property
    def input_tokens(self) -> int:
        """What the API bills for this image as input (the mock bills exactly this)."""
        return specs.image_input_tokens(self.width, self.height) if self.width else 0

    @property
    def content_type(self) -> str:
        return specs.IMAGE_MIME[self.fmt]

    def as_record(self) -> dict[str, str]:
        """What the ledger keeps: the path as written and the bytes' sha256."""
        return {"path": self.given, "sha256": self.sha256}


def load_input(given: str, base_dir: Path) -> tuple[InputFile, ImageInfo]:
    """Probe an input file named in a manifest (header only; hashed once per file version).

    Raises ParamError for a file that is missing, unreadable or not a supported image.
    """
    path = Path(given) if os.path.isabs(given) else base_dir / given
    try:
        stat = path.stat()
        if not path.is_file():
            raise IsADirectoryError(21, "not a file")
        return _load(path, given, stat.st_mtime_ns, stat.st_size)
    except FileNotFoundError:
        raise ParamError("image", f"input file '{given}' not found (looked at {path})") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ParamError("image", f"input file '{given}' cannot be read: {reason}") from None


@functools.lru_cache(maxsize=4096)
def _load(path: Path, given: str, mtime_ns: int, size: int) -> tuple[InputFile, ImageInfo]:
    """Cached per file version, so a manifest reusing one image thousands of times reads it once."""
    from hashlib import sha256  # loads OpenSSL (2 ms): only for a manifest with edit inputs

    del mtime_ns  # part of the cache key only
    limit = MAX_IMAGE_BYTES
    with open(path, "rb") as fh:
        info = probe(fh, given, size, decode=False)
        digest = sha256()
        if size <= limit:  # an oversized file fails its check; hashing it would be wasted reading
            fh.seek(0)
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    file = InputFile(path, given, info.fmt or "png", digest.hexdigest(), info.width, info.height)
    return file, info
