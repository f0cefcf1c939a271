"""Files: a small twin of the Files API, and the image references of JSON edits.

    POST   /v1/files                 multipart `file` + `purpose` -> a FileObject, id `file-...`
    GET    /v1/files                 the list (`purpose`, `order`, `limit`, `after`)
    GET    /v1/files/{id}            the FileObject (404 for an id this server never gave)
    GET    /v1/files/{id}/content    the bytes (a batch's output and error files are streamed
                                     from disk, never held in memory)
    DELETE /v1/files/{id}            {id, object: "file", deleted: true}

Uploads (`StoredFile`) are kept in memory; what a batch writes (`OutputFile`, purpose
`batch_output`) lives in a temporary file. An upload with purpose `batch` must be named
`*.jsonl` (the API's 400 "Invalid file format for Batch API. Must be .jsonl", as reported by
a gateway that relays it) and expires after 30 days, the SDK's documented default.

A JSON edit (`EditImageBodyJsonParam`) names each image as `{"image_url": ...}` or
`{"file_id": ...}`, and its mask the same way. The mock has no outside network, so:

- a data URL (`data:image/png;base64,...`, at most 20,971,520 characters) is decoded here;
- an http(s) URL is read only when it points at this server (a `/v1/_mock/files/{token}` link
  it answered with, or `/v1/files/{id}/content`); any other URL is answered as the API answers
  one it cannot download: 400 `invalid_image_url`, "Error while downloading <url>.";
- a file id must be one this server issued: otherwise 404 "No such File object: <id>", as the
  Files API answers an unknown id.

What comes out is an `UploadedFile`, checked by `images.check_inputs` like a multipart part.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from .images import EncodedImage, UploadedFile
from .rules import RuleError

#: The purposes the Files API takes (the mock stores any of them; only images are ever read).
PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_DATA_URL_CHARS = 20_971_520
MAX_IMAGES = 16
#: Files with purpose batch (inputs and outputs) expire this long after their creation unless
#: told otherwise (openai-python's `FileCreateParams.expires_after`: 30 days).
BATCH_FILE_EXPIRY_S = 30 * 24 * 3600
LIST_LIMIT = 10_000
_MOCK_LINK = re.compile(r"/v1/_mock/files/([^/]+)")
_FILE_CONTENT = re.compile(r"/v1/files/([^/]+)/content")


class ListedFile(Protocol):
    """What the Files API lists: an upload or a file a batch wrote."""

    @property
    def id(self) -> str: ...
    @property
    def purpose(self) -> str: ...
    def as_object(self) -> dict[str, Any]: ...


def _file_object(
    file_id: str, size: int, created_at: int, expires_at: int | None, filename: str, purpose: str
) -> dict[str, Any]:
    """The API's FileObject."""
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": created_at,
        "expires_at": expires_at,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
    }


@dataclass(frozen=True)
class StoredFile:
    """One file uploaded to `POST /v1/files`."""

    id: str
    filename: str
    purpose: str
    data: bytes
    content_type: str  # as the upload's part declared it
    created_at: int
    expires_at: int | None = None

    def as_object(self) -> dict[str, Any]:
        return _file_object(
            self.id, len(self.data), self.created_at, self.expires_at, self.filename, self.purpose
        )


@dataclass(frozen=True)
class OutputFile:
    """A batch's output or error file (purpose `batch_output`), kept on disk."""

    id: str
    filename: str
    path: Path
    size: int
    created_at: int
    expires_at: int | None
    purpose: str = "batch_output"

    def as_object(self) -> dict[str, Any]:
        return _file_object(
            self.id, self.size, self.created_at, self.expires_at, self.filename, self.purpose
        )


def new_file_id() -> str:
    return f"file-{secrets.token_hex(11)}"


def new_file(filename: str, purpose: str, data: bytes, content_type: str) -> StoredFile:
    """A file as `POST /v1/files` stores it (RuleError for what the API refuses)."""
    if purpose not in PURPOSES:
        allowed = ", ".join(f"'{p}'" for p in PURPOSES)
        raise RuleError("purpose", f"Invalid value: '{purpose}'. Supported values are: {allowed}.")
    if not data:
        raise RuleError("file", "Invalid file 'file': the file is empty.")
    if len(data) > MAX_FILE_BYTES:
        raise RuleError("file", f"Invalid file 'file': over {MAX_FILE_BYTES // 2**20} MB.")
    if purpose == "batch" and not filename.lower().endswith(".jsonl"):
        raise RuleError(None, "Invalid file format for Batch API. Must be .jsonl", code=None)
    now = int(time.time())
    expires_at = now + BATCH_FILE_EXPIRY_S if purpose == "batch" else None
    return StoredFile(new_file_id(), filename, purpose, data, content_type, now, expires_at)


def listing(found: Iterable[ListedFile], query: Mapping[str, str]) -> dict[str, Any]:
    """`GET /v1/files`: the files (given oldest first) filtered, ordered and paged as asked."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        message = f"Invalid value: '{order}'. Supported values are: 'asc' and 'desc'."
        raise RuleError("order", message)
    limit = parse_limit(query.get("limit"), LIST_LIMIT, LIST_LIMIT)
    purpose = query.get("purpose")
    chosen = [f for f in found if purpose is None or f.purpose == purpose]
    if order == "desc":
        chosen.reverse()
    return page([f.as_object() for f in chosen], query.get("after"), limit)


def parse_limit(text: str | None, default: int, most: int) -> int:
    """A list's `limit` query parameter (RuleError outside 1..most)."""
    if text is None:
        return default
    if not text.strip().isdigit() or not 1 <= int(text) <= most:
        message = f"Invalid 'limit': {text!r}. Expected an integer from 1 to {most}."
        raise RuleError("limit", message)
    return int(text)


def page(objects: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """One page of a cursor list, as the API's list endpoints answer (`after`: an object id)."""
    if after is not None:
        ids = [o["id"] for o in objects]
        objects = objects[ids.index(after) + 1 :] if after in ids else []
    data = objects[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(objects) > limit,
    }


def no_such_file(file_id: str, param: str) -> RuleError:
    return RuleError(param, f"No such File object: {file_id}", code=None, status=404)


@dataclass(frozen=True)
class ImageRef:
    """One image of a JSON edit (`images[i]` or `mask`), its shape already checked."""

    param: str  # images[0] ... images[15] | mask
    image_url: str | None = None
    file_id: str | None = None

    def summary(self) -> dict[str, str]:
        """The reference as `MockRequest.params` keeps it: a data URL's payload is elided."""
        if self.file_id is not None:
            return {"file_id": self.file_id}
        url = self.image_url or ""
        if url.startswith("data:"):
            head, _, payload = url.partition(",")
            return {"image_url": f"{head},<{len(payload)} characters>"}
        return {"image_url": url}


def take_refs(body: dict[str, Any]) -> tuple[list[ImageRef], ImageRef | None]:
    """Remove `images` and `mask` from a JSON edit body and check their shape (RuleError)."""
    images = body.pop("images", None)
    mask = body.pop("mask", None)
    if images is None:
        raise RuleError(
            "images", "Missing required parameter: 'images'.", "missing_required_parameter"
        )
    if not isinstance(images, list):
        raise RuleError("images", "Invalid type for 'images': expected an array of objects.")
    if not images:
        raise RuleError(
            "images",
            "Invalid 'images': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            "empty_array",
        )
    if len(images) > MAX_IMAGES:
        raise RuleError(
            "images",
            f"Invalid 'images': array too long. Expected an array with maximum length "
            f"{MAX_IMAGES}, but got an array with length {len(images)} instead.",
            "array_above_max_length",
        )
    refs = [_ref(item, f"images[{i}]") for i, item in enumerate(images)]
    return refs, None if mask is None else _ref(mask, "mask")


def _ref(item: Any, param: str) -> ImageRef:
    if not isinstance(item, dict):
        raise RuleError(param, f"Invalid type for '{param}': expected an object.")
    for key in item:
        if key not in ("image_url", "file_id"):
            raise RuleError(
                f"{param}.{key}", f"Unknown parameter: '{param}.{key}'.", "unknown_parameter"
            )
    given = {k: v for k, v in item.items() if v is not None}
    if len(given) != 1:
        raise RuleError(param, f"Invalid '{param}': give exactly one of 'image_url' and 'file_id'.")
    [(key, value)] = given.items()
    if not isinstance(value, str):
        raise RuleError(f"{param}.{key}", f"Invalid type for '{param}.{key}': expected a string.")
    return (
        ImageRef(param, image_url=value) if key == "image_url" else ImageRef(param, file_id=value)
    )


def resolve(
    ref: ImageRef,
    *,
    own_hosts: Collection[str],
    links: Mapping[str, EncodedImage],
    files: Mapping[str, StoredFile],
) -> UploadedFile:
    """The bytes a reference names (RuleError when they cannot be had, as the API answers).

    own_hosts: the `host:port` forms this server answers on; links: the `/_mock/files` tokens
    it has answered with; files: what `POST /v1/files` stored.
    """
    field = "mask" if ref.param == "mask" else "images"
    if ref.file_id is not None:
        stored = files.get(ref.file_id)
        if stored is None:
            raise no_such_file(ref.file_id, f"{ref.param}.file_id")
        mime = sniff_mime(stored.data) or stored.content_type
        return UploadedFile(field, stored.filename, mime, stored.data, ref.param)
    url = ref.image_url or ""
    param = f"{ref.param}.image_url"
    if len(url) > MAX_DATA_URL_CHARS:
        raise RuleError(
            param,
            f"Invalid '{param}': string too long. Expected a string with maximum length "
            f"{MAX_DATA_URL_CHARS}, but got a string with length {len(url)} instead.",
            "string_above_max_length",
        )
    if url.startswith("data:"):
        mime, data = _data_url(url, param)
        return UploadedFile(field, ref.param, mime, data, ref.param)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RuleError(
            param, f"Invalid '{param}': expected an http(s) URL or a base64-encoded data URL."
        )
    if parts.netloc in own_hosts:
        if (match := _MOCK_LINK.fullmatch(parts.path)) and match.group(1) in links:
            image = links[match.group(1)]
            return UploadedFile(field, url, image.mime, image.data, ref.param)
        if (match := _FILE_CONTENT.fullmatch(parts.path)) and match.group(1) in files:
            stored = files[match.group(1)]
            mime = sniff_mime(stored.data) or stored.content_type
            return UploadedFile(field, url, mime, stored.data, ref.param)
    raise RuleError(param, f"Error while downloading {url}.", "invalid_image_url")


def _data_url(url: str, param: str) -> tuple[str, bytes]:
    head, comma, payload = url.removeprefix("data:").partition(",")
    mime, *flags = head.split(";")
    data = b""
    if comma and "base64" in flags and mime.lower().startswith("image/"):
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            data = b""
    if not data:
        raise RuleError(
            param,
            f"Invalid '{param}'. Expected a base64-encoded data URL with an image MIME type "
            "(e.g. 'data:image/png;base64,aW1nIGJ5dGVzIGhlcmU='), but got an invalid data URL.",
        )
    return mime.lower(), data


def sniff_mime(data: bytes) -> str | None:
    """The image type a file's first bytes show (a file id carries no declared type)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None
