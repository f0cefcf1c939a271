"""The manifest: a JSONL file of prompts, streamed line by line and validated once.

Each non-blank line that does not start with `#` becomes either an `Item` (valid, ready to
send) or a `BadLine` (never sent; the engine records it as an `error` in the ledger with its line
number). Memory does not grow with the manifest's length beyond the compact id set.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from hashlib import blake2b
from pathlib import Path
from typing import Any

import orjson

from . import specs
from ._idset import IdSet, count_lines
from .inputs import MAX_EDIT_IMAGES, InputFile, check_edit_inputs, load_input

#: Keys a line may carry besides the API fields.
ITEM_KEYS = ("id", "metadata")
EDIT_KEYS = ("image", "mask", "endpoint")
KNOWN_KEYS = frozenset(specs.API_FIELDS + ITEM_KEYS + EDIT_KEYS)
GENERATIONS_ONLY_FIELDS = frozenset({"moderation"})

MAX_FILE_STEM = 80


@dataclass(frozen=True, kw_only=True)
class Defaults:
    """Values the CLI (or API caller) supplies for fields a manifest line leaves out."""

    model: str = "gpt-image-1"
    n: int | None = None
    size: str | None = None
    quality: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    background: str | None = None
    moderation: str | None = None

    @functools.cached_property
    def _given(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    def fill(self, params: dict[str, Any], endpoint: specs.Endpoint = "generations") -> None:
        """Set every default the line left out, where the line's model and endpoint take it
        (`--quality high` fills GPT lines; a dall-e-3 line keeps the API's default)."""
        model = str(params.setdefault("model", self.model))
        for name, value in self._given.items():
            if (
                name not in params
                and (endpoint == "generations" or name not in GENERATIONS_ONLY_FIELDS)
                and specs.takes_default(model, name, value)
            ):
                params[name] = value

    def check(self) -> None:
        """Raise specs.ParamError if a default is illegal for the default model."""
        params: dict[str, Any] = {"prompt": "check", "model": self.model}
        gpt = specs.family(self.model) == "gpt"
        for name, value in self._given.items():  # checked as given: fill() would skip bad ones
            if name not in params and (gpt or name not in specs.GPT_ONLY_FIELDS):
                params[name] = value
        specs.validate_params(params)


@dataclass(frozen=True, slots=True)
class Item:
    """One valid manifest line: what to send and where it came from."""

    id: str
    line: int
    params: dict[str, Any]
    metadata: Any = None
    endpoint: specs.Endpoint = "generations"
    images: tuple[InputFile, ...] = ()
    mask: InputFile | None = None

    @property
    def prompt(self) -> str:
        return str(self.params["prompt"])

    @property
    def model(self) -> str:
        return str(self.params["model"])

    @property
    def n(self) -> int:
        return int(self.params.get("n") or 1)

    @property
    def image_tokens(self) -> int:
        """Input tokens the edit's images will be billed as (0 for generations)."""
        return sum(f.input_tokens for f in self.images)

    @property
    def file_stem(self) -> str:
        return safe_file_stem(self.id)


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that cannot be sent, and why (the reason names the line number)."""

    id: str
    line: int
    reason: str
    prompt: str | None = None
    metadata: Any = None
    endpoint: specs.Endpoint = "generations"


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_file_stem(item_id: str) -> str:
    """A file-name stem for an id: no separators, `..`, control characters; length-capped.

    Where the id had to change, a short hash of the original keeps distinct ids distinct.
    """
    stem = _UNSAFE.sub("_", item_id).lstrip(".") or "_"
    stem = stem.replace("..", "_")
    if stem == item_id and len(stem) <= MAX_FILE_STEM:
        return stem
    digest = blake2b(item_id.encode("utf-8"), digest_size=5).hexdigest()
    return f"{stem[: MAX_FILE_STEM - 11]}-{digest}"


def _content_id(content: bytes, occurrence: int) -> str:
    h = blake2b(content, digest_size=8)
    h.update(b"\x00%d" % occurrence)
    return "i" + h.hexdigest()


class _Ids:
    """Hands out item ids and spots duplicate explicit ids."""

    def __init__(self, capacity: int = 1024) -> None:
        self._seen = IdSet(capacity)

    def explicit(self, value: Any) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"'id' must be a string or an integer, got {type(value).__name__}")
        item_id = str(value)
        if not item_id.strip():
            raise ValueError("'id' must not be empty")
        if not self._seen.add(item_id):
            raise ValueError(f"duplicate id {item_id!r}: an earlier line already uses it")
        return item_id

    def derived(self, content: bytes) -> str:
        """A stable id from the line's content and how many identical lines came before it."""
        occurrence = 0
        while not self._seen.add(item_id := _content_id(content, occurrence)):
            occurrence += 1
        return item_id


def _parse(
    raw: bytes, number: int, ids: _Ids, defaults: Defaults, base_dir: Path
) -> Item | BadLine:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return BadLine(ids.derived(raw), number, f"line {number}: not valid JSON ({exc})")
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        return BadLine(
            ids.derived(raw), number, f"line {number}: expected a JSON object, got {kind}"
        )
    prompt = obj.get("prompt") if isinstance(obj.get("prompt"), str) else None
    metadata = obj.get("metadata")
    try:
        if "id" in obj:
            item_id = ids.explicit(obj["id"])
        else:
            item_id = ids.derived(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS))
    except ValueError as exc:
        fallback = ids.derived(raw)
        return BadLine(fallback, number, f"line {number}: {exc}", prompt, metadata)

    def bad(reason: str) -> BadLine:
        endpoint: specs.Endpoint = "edits" if "image" in obj else "generations"
        return BadLine(item_id, number, f"line {number}: {reason}", prompt, metadata, endpoint)

    if not KNOWN_KEYS.issuperset(obj):
        unknown = sorted(k for k in obj if k not in KNOWN_KEYS)
        names = ", ".join(repr(k) for k in unknown)
        return bad(f"unknown field(s) {names}; put your own data under 'metadata'")
    try:
        endpoint = _endpoint(obj)
        params = {k: v for k, v in obj.items() if k in specs.API_FIELDS and v is not None}
        defaults.fill(params, endpoint)
        specs.validate_params(params, endpoint)
        if endpoint == "generations":
            return Item(item_id, number, params, metadata)
        images, mask = _edit_inputs(obj, params, base_dir)
    except specs.ParamError as exc:
        return bad(str(exc))
    return Item(item_id, number, params, metadata, endpoint, images, mask)


def _endpoint(obj: dict[str, Any]) -> specs.Endpoint:
    """`edits` when the line has `image` (or says so), else `generations`."""
    endpoint = obj.get("endpoint")
    if endpoint is None:
        if "mask" in obj and "image" not in obj:
            raise specs.ParamError("mask", "'mask' needs an 'image' to apply to")
        return "edits" if "image" in obj else "generations"
    if endpoint == "edits":
        if "image" not in obj:
            raise specs.ParamError("image", "'endpoint' is 'edits' but the line has no 'image'")
        return "edits"
    if endpoint == "generations":
        if "image" in obj or "mask" in obj:
            raise specs.ParamError("image", "'image' and 'mask' need 'endpoint': 'edits'")
        return "generations"
    raise specs.ParamError(
        "endpoint", f"'endpoint' must be 'generations' or 'edits', got {endpoint!r}"
    )


def _edit_inputs(
    obj: dict[str, Any], params: dict[str, Any], base_dir: Path
) -> tuple[tuple[InputFile, ...], InputFile | None]:
    """Resolve, probe and check an edit line's `image` and `mask` files (ParamError if bad)."""
    given = obj["image"]
    names = [given] if isinstance(given, str) else given
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise specs.ParamError("image", "'image' must be a path or a non-empty list of paths")
    if len(names) > MAX_EDIT_IMAGES:
        raise specs.ParamError("image", f"{len(names)} input images; at most {MAX_EDIT_IMAGES}")
    mask_name = obj.get("mask")
    if mask_name is not None and (not isinstance(mask_name, str) or not mask_name):
        raise specs.ParamError("mask", "'mask' must be a path")
    loaded = [load_input(name, base_dir) for name in names]
    mask = load_input(mask_name, base_dir) if mask_name else None
    check_edit_inputs([info for _, info in loaded], mask[1] if mask else None, str(params["model"]))
    return tuple(f for f, _ in loaded), (mask[0] if mask else None)


def read_manifest(path: str | Path, defaults: Defaults | None = None) -> Iterator[Item | BadLine]:
    """Stream a JSONL manifest: one Item or BadLine per non-blank, non-comment line.

    Raises OSError if the file cannot be opened; every problem inside the file is a BadLine.
    """
    defaults = defaults or Defaults()
    ids = _Ids(count_lines(path))  # sized up front: the id set never has to grow
    base_dir = Path(path).resolve().parent  # edit inputs are relative to the manifest
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            raw = line.strip()
            if not raw or raw.startswith(b"#"):
                continue
            yield _parse(raw, number, ids, defaults, base_dir)
