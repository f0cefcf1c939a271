"""The request rules, read from the catalog: what the API would refuse, before it is sent.

`validate_params` judges one request (its fields, for one model and endpoint) the way the API
does: for a model the catalog knows, every rule of its entry; for one it does not, structural
checks only (field types, `n`, the `WxH` shape of a size) and the rest is left to the API. The
`resolved_*` helpers say what a request will produce (`auto` and omitted fields made concrete
from the model's defaults), for file names, estimates and the budget. Nothing here knows a
model by name: that is the catalog's job.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

from .catalog import Catalog, ModelSpec, ParamRule

Endpoint = Literal["generations", "edits"]

#: Formats batchimg can verify and store, with their MIME types and file extensions.
IMAGE_MIME = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "svg": "image/svg+xml",
}
FILE_EXTENSION = {"png": "png", "jpeg": "jpg", "webp": "webp", "gif": "gif", "svg": "svg"}
#: Fields every request may carry, whatever the model.
_ALWAYS = ("prompt", "model")
_SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")  # used with fullmatch
_RULE_CACHE_MAX = 4096
#: Structural fallbacks when the catalog's `fields` table says nothing.
_MAX_PROMPT_CHARS = 32000


class ParamError(ValueError):
    """A request parameter the API would reject; `param` names the field."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def _catalog(catalog: Catalog | None) -> Catalog:
    return catalog if catalog is not None else Catalog.default()


def model_spec(params: Mapping[str, Any], catalog: Catalog | None = None) -> ModelSpec:
    return _catalog(catalog).spec(str(params.get("model") or ""))


def is_size(value: str) -> bool:
    """Whether `value` is a concrete `WIDTHxHEIGHT` (not `auto`)."""
    return _SIZE.fullmatch(value) is not None


def dimensions(size: str) -> tuple[int, int]:
    width, _, height = size.partition("x")
    return int(width), int(height)


# -- what a request will produce -----------------------------------------------------------


def output_format(params: Mapping[str, Any], catalog: Catalog | None = None) -> str:
    """The format the answer's images will be in (models without the field answer PNG)."""
    value = params.get("output_format")
    if isinstance(value, str):
        return value
    spec = model_spec(params, catalog)
    return str(spec.default("output_format") or "png")


def _resolved(params: Mapping[str, Any], name: str, catalog: Catalog | None) -> str | None:
    value = params.get(name)
    spec = model_spec(params, catalog)
    rule = spec.rule(name)
    if value is None:
        value = rule.default if rule is not None else None
    if value == "auto" or value is None:
        return rule.auto_estimate if rule is not None and rule.auto_estimate else value
    return str(value)


def resolved_size(params: Mapping[str, Any], catalog: Catalog | None = None) -> str:
    """The size the answer will most likely have (`auto` as the catalog's estimate)."""
    return _resolved(params, "size", catalog) or "1024x1024"


def resolved_quality(params: Mapping[str, Any], catalog: Catalog | None = None) -> str:
    return _resolved(params, "quality", catalog) or "auto"


def resolved_complexity(params: Mapping[str, Any], catalog: Catalog | None = None) -> str | None:
    """The complexity a request runs at, for models that take one; else None."""
    value = params.get("complexity")
    if isinstance(value, str):
        return value
    default = model_spec(params, catalog).default("complexity")
    return str(default) if default is not None else None


def resolved_frames(params: Mapping[str, Any], catalog: Catalog | None = None) -> int | None:
    """Frames of an animated (gif) answer; None for still images."""
    if output_format(params, catalog) != "gif":
        return None
    value = params.get("frame_count")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    default = model_spec(params, catalog).default("frame_count")
    return int(default) if isinstance(default, int) else None


def size_choices(params: Mapping[str, Any], catalog: Catalog | None = None) -> tuple[str, ...]:
    """Every size the answer may have: the one asked for, or all `auto` may become."""
    return _choices(params, "size", catalog) or (resolved_size(params, catalog),)


def quality_choices(params: Mapping[str, Any], catalog: Catalog | None = None) -> tuple[str, ...]:
    return _choices(params, "quality", catalog) or (resolved_quality(params, catalog),)


def _choices(params: Mapping[str, Any], name: str, catalog: Catalog | None) -> tuple[str, ...]:
    value = params.get(name)
    rule = model_spec(params, catalog).rule(name)
    if rule is None:
        return ()
    if value is None:
        value = rule.default
    return rule.auto_range if value in (None, "auto") else ()


def megapixels(size: str) -> float:
    """Pixels in units of 1024x1024 (how token ceilings are stated)."""
    width, height = dimensions(size)
    return width * height / (1024 * 1024)


# -- how big an answer can be -----------------------------------------------------------------

#: Bytes a raster image can take per pixel (uncompressed 16-bit RGBA: no encoder produces
#: more), and per pixel of each gif frame (a palette byte, with room for LZW's worst case).
_RASTER_BYTES_PER_PIXEL = 8
_GIF_BYTES_PER_PIXEL = 2
_IMAGE_SLACK = 1 << 20  # headers, metadata, an ICC profile
SVG_MAX_BYTES = 32 << 20  # a vector image has no pixel count to bound it
#: Everything of an answer that is not image data (usage, sizes, the envelope).
ANSWER_SLACK = 1 << 20
_LARGEST_PIXELS = 8_294_400  # when nothing says what `auto` will be: the largest size any takes


#: The request fields what it produces depends on (its size, format, frames; its output bound).
_SHAPE_FIELDS = ("model", "size", "quality", "n", "output_format", "frame_count", "complexity")


def request_shape(params: Mapping[str, Any]) -> tuple[Any, ...]:
    """A hashable key of the fields that decide what a request produces (not its prompt), for
    memos of what follows from them: items of one manifest share a handful of shapes."""
    shape = tuple(map(params.get, _SHAPE_FIELDS))
    kinds = tuple(map(type, shape))  # 1, 1.0 and True are one key otherwise
    if _PLAIN.issuperset(kinds):
        return shape + kinds
    return tuple(repr(v) if type(v) not in _PLAIN else v for v in shape) + kinds


_PLAIN = frozenset({str, int, float, bool, type(None)})


_T = TypeVar("_T")


def per_shape(compute: Callable[[Mapping[str, Any], Catalog], _T], params: Mapping[str, Any],
              catalog: Catalog) -> _T:  # fmt: skip
    """`compute(params, catalog)`, worked out once per request shape (`request_shape`) and
    catalog: what every item asks again and only its shape decides. At most `MEMO_SHAPES`
    shapes are kept for each `compute`; beyond them it is worked out each time."""
    memo = catalog.memo(compute)
    shape = request_shape(params)
    found = memo.get(shape, _MISSING)
    if found is _MISSING:
        found = compute(params, catalog)
        if len(memo) < MEMO_SHAPES:
            memo[shape] = found
    return cast(_T, found)


MEMO_SHAPES = 4096
_MISSING = object()


def produced(params: Mapping[str, Any], catalog: Catalog) -> tuple[str, str | None, int | None]:
    """What a request's answer will be (its format, complexity and frames), as the ledger
    records it: asked for every item, worked out once per request shape."""
    return per_shape(_produced, params, catalog)


def _produced(params: Mapping[str, Any], catalog: Catalog) -> tuple[str, str | None, int | None]:
    return (
        output_format(params, catalog),
        resolved_complexity(params, catalog),
        resolved_frames(params, catalog),
    )


def max_image_bytes(params: Mapping[str, Any], catalog: Catalog | None = None) -> int:
    """The most one image of this request can weigh, from its size, format and frames: what is
    read of it (a download, a decoded b64_json) stops there, so no answer can exhaust memory
    or disk."""
    fmt = output_format(params, catalog)
    if fmt == "svg":
        return SVG_MAX_BYTES
    spec = model_spec(params, catalog)
    size = params.get("size")
    rule = spec.rule("size")
    if isinstance(size, str) and is_size(size):
        choices: tuple[str, ...] = (size,)
    elif rule is not None and rule.custom is None:
        choices = tuple(s for s in (*(rule.values or ()), *rule.auto_range) if is_size(s))
    else:
        choices = ()  # a custom size, or a model without rules: `auto` may be anything
    pixels = max((w * h for w, h in map(dimensions, choices)), default=_LARGEST_PIXELS)
    if rule is not None and rule.custom is not None and rule.custom.max_pixels and not choices:
        pixels = rule.custom.max_pixels
    frames = resolved_frames(params, catalog) or 1
    per_pixel = _GIF_BYTES_PER_PIXEL if fmt == "gif" else _RASTER_BYTES_PER_PIXEL
    return pixels * per_pixel * frames + _IMAGE_SLACK


def max_answer_bytes(params: Mapping[str, Any], catalog: Catalog | None = None) -> int:
    """The most a whole answer can weigh: its n images, base64-encoded, and the rest."""
    n = params.get("n")
    count = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    return count * (max_image_bytes(params, catalog) * 4 // 3 + 4) + ANSWER_SLACK


# -- what is refused ---------------------------------------------------------------------------


def validate_params(
    params: Mapping[str, Any],
    endpoint: Endpoint = "generations",
    catalog: Catalog | None = None,
) -> None:
    """Raise ParamError for the first field the API would refuse for this model and endpoint."""
    judge_options(params, endpoint, catalog).check(params.get("prompt"))


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the API would say of a request's fields but its prompt; `check(prompt)` says the
    rest. Manifests repeat a few option sets over many prompts: judged once, checked per line."""

    model: str
    limit: int | None  # the prompt's length limit; None when unchecked (or the model is bad)
    error: tuple[str, str, str] | None  # the first refusal: (param, message, code)

    def allows(self, prompt: Any) -> bool:
        """Whether a request with this prompt passes (`check` says why not)."""
        return (
            self.error is None
            and isinstance(prompt, str)
            and 0 < len(prompt) <= (self.limit or sys.maxsize)
            and not prompt.isspace()  # as `not prompt.strip()`, without a copy
        )

    def check(self, prompt: Any) -> None:
        """Raise ParamError for the first thing the API would refuse, the prompt first."""
        if prompt is None:
            raise ParamError(
                "prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter"
            )
        if not isinstance(prompt, str):
            raise ParamError("prompt", f"'prompt' must be a string, got {type(prompt).__name__}.")
        if not prompt.strip():
            raise ParamError("prompt", "'prompt' must not be empty.")
        if self.limit is not None and len(prompt) > self.limit:
            raise ParamError(
                "prompt",
                f"'prompt' has {len(prompt)} characters; {self.model} takes {self.limit} at most",
            )
        if self.error is not None:
            raise ParamError(*self.error)


def judge_options(
    params: Mapping[str, Any],
    endpoint: Endpoint = "generations",
    catalog: Catalog | None = None,
) -> Verdict:
    """Everything `validate_params` judges but the prompt, once per catalog for each distinct
    set of fields (the prompt's own length limit travels with the verdict)."""
    catalog = _catalog(catalog)
    model = params.get("model")
    if not isinstance(model, str) or not model:
        error = ("model", f"'model' must be a non-empty string, got {model!r}.", "invalid_value")
        return Verdict(str(model), None, error)
    try:
        key = (endpoint, tuple(sorted(  # a float by its text: -0.0 is not 0.0 in a message
            (k, type(v), repr(v) if type(v) is float else v)
            for k, v in params.items() if k != "prompt"
        )))  # fmt: skip
        verdict = catalog.rule_cache.get(key)
    except TypeError:  # an unhashable value (a list, a dict): judge it uncached
        key, verdict = None, None
    if verdict is None:
        verdict = _verdict(params, endpoint, catalog.spec(model), catalog)
        if key is not None:
            cache = catalog.rule_cache
            cache[key] = verdict
            if len(cache) > _RULE_CACHE_MAX:
                cache.pop(next(iter(cache)))
    return verdict


def _verdict(
    params: Mapping[str, Any], endpoint: Endpoint, spec: ModelSpec, catalog: Catalog
) -> Verdict:
    model = str(params["model"])
    limit = None
    if spec.params is not None:
        rule = spec.params.get("prompt")
        limit = rule.max_chars if rule is not None and rule.max_chars else _MAX_PROMPT_CHARS
    try:
        _check_options(params, endpoint, spec, catalog)
    except ParamError as exc:
        return Verdict(model, limit, (exc.param, str(exc), exc.code))
    return Verdict(model, limit, None)


def _check_options(
    params: Mapping[str, Any], endpoint: Endpoint, spec: ModelSpec, catalog: Catalog
) -> None:
    """Every rule on the fields other than `prompt` (the model is known to be a string)."""
    if endpoint not in spec.endpoints and spec.known:
        raise ParamError("model", f"{spec.name} does not support image {endpoint}.")
    fmt = output_format(params, catalog)
    constraint = spec.formats.get(fmt)
    animated = constraint is not None and constraint.sheet is not None
    for name, value in params.items():
        if name in _ALWAYS:
            continue
        _check_type(name, value, catalog, values=spec.params is None)
        if spec.params is None:
            continue  # a model the catalog does not know: the API judges the rest
        rule = spec.params.get(name)
        if rule is None:
            raise ParamError(
                name,
                f"Unknown parameter: '{name}' ({spec.name} does not take it).",
                "unknown_parameter",
            )
        check_value(name, value, rule, spec.name, endpoint, fmt, sheet=animated)
        if name == "output_format" and value not in IMAGE_MIME:
            raise ParamError(name, f"batchimg cannot verify or store {value!r} images.")
    if spec.params is not None:
        _check_combination(params, spec, fmt, catalog)


def _check_type(name: str, value: Any, catalog: Catalog, *, values: bool = True) -> None:
    """The field's JSON type (and, with `values`, the structural table's allowed values)."""
    known = catalog.fields.get(name)
    if known is None:
        raise ParamError(name, f"Unknown parameter: '{name}'.", "unknown_parameter")
    kind, rule = known
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ParamError(name, f"Invalid value for '{name}': {value!r} (an integer).")
        _check_bounds(name, value, rule, None)
    elif kind == "object":
        if not isinstance(value, dict):
            raise ParamError(name, f"Invalid value for '{name}': {value!r} (a JSON object).")
    elif not isinstance(value, str):
        raise ParamError(name, f"'{name}' must be a string, got {type(value).__name__}.")
    elif kind == "size" and value != "auto" and not _SIZE.fullmatch(value):
        raise ParamError(name, f"Invalid value for '{name}': {value!r} (WIDTHxHEIGHT or auto).")
    if values and rule.values is not None and value not in rule.values:
        raise ParamError(
            name,
            f"Invalid value for '{name}': {value!r} (batchimg stores {', '.join(rule.values)}).",
        )


def _check_bounds(name: str, value: int, rule: ParamRule, model: str | None) -> None:
    low, high = rule.min, rule.max
    if (low is None or value >= low) and (high is None or value <= high):
        return
    if model is not None and low == high:
        raise ParamError(name, f"Invalid value for '{name}': {model} only supports {name}={low}.")
    span = (
        f"an integer from {low} to {high}"
        if low is not None and high is not None
        else f"at least {low}"
        if low is not None
        else f"at most {high}"
    )
    raise ParamError(name, f"Invalid value for '{name}': {value!r} ({span}).")


def check_value(
    name: str,
    value: Any,
    rule: ParamRule,
    model: str,
    endpoint: str,
    fmt: str,
    *,
    sheet: bool = False,
) -> None:
    """One field against its rule for one model (ParamError); cross-field rules are apart.
    `sheet`: the output is animated, so a size's pixel bounds are its sheet's (checked apart)."""
    if rule.endpoints is not None and endpoint not in rule.endpoints:
        raise ParamError(
            name,
            f"Unknown parameter: '{name}' ({' and '.join(rule.endpoints)} only).",
            "unknown_parameter",
        )
    if isinstance(value, int) and not isinstance(value, bool):
        _check_bounds(name, value, rule, model)
    if rule.values is not None and value not in rule.values:
        if rule.custom is None or not isinstance(value, str):
            raise ParamError(
                name,
                f"Invalid value for '{name}': {value!r} (model {model} accepts: "
                f"{', '.join(rule.values)})",
            )
        _check_custom_size(name, value, rule, model, sheet=sheet)
    if rule.formats is not None and fmt not in rule.formats:
        raise ParamError(
            name,
            f"'{name}' is only supported with output_format {' or '.join(rule.formats)} "
            f"(this request asks for {fmt}).",
            "unsupported_parameter",
        )


def _check_custom_size(
    name: str, value: str, rule: ParamRule, model: str, *, sheet: bool = False
) -> None:
    """A size outside the model's list, against its custom-size rule. With `sheet` (animated
    output) the pixel and edge bounds are the sprite sheet's, checked apart."""
    custom = rule.custom
    assert custom is not None
    match = _SIZE.fullmatch(value)
    listed = ", ".join(rule.values or ())
    if match is None:
        raise ParamError(
            name, f"Invalid value for '{name}': {value!r} (WIDTHxHEIGHT, or one of {listed})"
        )
    width, height = int(match.group(1)), int(match.group(2))
    problems = []
    if width % custom.multiple_of or height % custom.multiple_of:
        problems.append(f"both sides must be divisible by {custom.multiple_of}")
    ratio = width / height
    if custom.min_ratio is not None and ratio < custom.min_ratio - 1e-9:
        problems.append(f"the aspect ratio must be at most 1:{round(1 / custom.min_ratio, 3):g}")
    if custom.max_ratio is not None and ratio > custom.max_ratio + 1e-9:
        problems.append(f"the aspect ratio must be at most {custom.max_ratio:g}:1")
    if not sheet:
        problems += _bounds_problems(
            width, height, custom.max_edge, custom.min_pixels, custom.max_pixels
        )
        if custom.min_edge is not None and min(width, height) < custom.min_edge:
            problems.append(f"no side may be under {custom.min_edge}")
    if problems:
        raise ParamError(
            name, f"Invalid value for '{name}': {value!r} for {model}: {'; '.join(problems)}"
        )


def _bounds_problems(
    width: int, height: int, max_edge: int | None, min_pixels: int | None, max_pixels: int | None
) -> list[str]:
    problems = []
    if max_edge is not None and max(width, height) > max_edge:
        problems.append(f"no side may exceed {max_edge}")
    pixels = width * height
    if min_pixels is not None and pixels < min_pixels:
        problems.append(f"at least {min_pixels:,} pixels")
    if max_pixels is not None and pixels > max_pixels:
        problems.append(f"at most {max_pixels:,} pixels")
    return problems


def _check_combination(
    params: Mapping[str, Any], spec: ModelSpec, fmt: str, catalog: Catalog
) -> None:
    background = spec.rule("background")
    if (
        params.get("background") == "transparent"
        and background is not None
        and background.transparent_formats is not None
        and fmt not in background.transparent_formats
    ):
        allowed = " or ".join(background.transparent_formats)
        raise ParamError("background", f"Transparent background needs output_format {allowed}.")
    constraint = spec.formats.get(fmt)
    if constraint is None:
        return
    n = params.get("n") or 1
    if constraint.max_n is not None and n > constraint.max_n:
        raise ParamError(
            "n", f"Invalid value for 'n': {fmt} output takes n={constraint.max_n} at most."
        )
    frames = resolved_frames(params, catalog)
    sheet = constraint.sheet
    if sheet is None or not frames or params.get("size") in (None, "auto"):
        return  # with `auto` the model picks a frame size that fits
    cells = sheet.cells(frames)
    if cells is None:
        raise ParamError("frame_count", f"{fmt} output takes no sheet of {frames} frames.")
    width, height = dimensions(resolved_size(params, catalog))
    sheet_w, sheet_h = width * cells[0], height * cells[1]
    problems = _bounds_problems(
        sheet_w, sheet_h, sheet.max_edge, sheet.min_pixels, sheet.max_pixels
    )
    if problems:
        raise ParamError(
            "size",
            f"Size {width}x{height} does not fit {frames} {fmt} frames: they are drawn as one "
            f"{cells[0]}x{cells[1]} sheet of {sheet_w}x{sheet_h}, which needs "
            f"{'; '.join(problems)}.",
        )


def takes_default(
    params: Mapping[str, Any],
    field: str,
    value: Any,
    endpoint: Endpoint = "generations",
    catalog: Catalog | None = None,
) -> bool:
    """Whether a run-wide default for `field` suits this line (its model, endpoint and output
    format); where it does not, the line goes without it and the API's own default stands."""
    catalog = _catalog(catalog)
    spec = catalog.spec(str(params.get("model") or ""))
    if spec.params is None:
        try:
            _check_type(field, value, catalog)
        except ParamError:
            return False
        return True
    rule = spec.params.get(field)
    if rule is None:
        return False
    try:
        check_value(field, value, rule, spec.name, endpoint, output_format(params, catalog))
    except ParamError:
        return False
    return True


def dropped_fields(params: Mapping[str, Any], catalog: Catalog | None = None) -> list[str]:
    """Fields the API takes only with other output formats, which are left out of the request
    rather than refused (e.g. `output_compression` on a png line). A value that is wrong in
    itself (out of range) is not dropped: validation refuses it."""
    catalog = _catalog(catalog)
    spec = model_spec(params, catalog)
    if spec.params is None or spec.droppable.isdisjoint(params):
        return []
    fmt = output_format(params, catalog)
    dropped = []
    for name in spec.droppable.intersection(params):
        rule = spec.params[name]
        if rule.formats is None or fmt in rule.formats:
            continue
        try:
            _check_type(name, params[name], catalog, values=False)
            check_value(name, params[name], rule, spec.name, "generations", rule.formats[0])
        except ParamError:
            continue
        dropped.append(name)
    return dropped


# -- tokens and formats ------------------------------------------------------------------------


def estimate_text_tokens(prompt: str) -> int:
    """A tokenizer-free estimate of a prompt's text tokens (about 4 characters per token)."""
    return max(1, math.ceil(len(prompt.encode("utf-8")) / 4))


def sniff_format(head: bytes) -> str | None:
    """The image format named by a file's first bytes: png, jpeg, webp, gif, svg, or None.

    `svg` here only means "starts like an XML or SVG document" (not an HTML error page);
    `writer.check_image` parses it to be sure.
    """
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith((b"<?xml", b"<svg", b"<!doctype svg", b"<!--")):
        return "svg"
    return None


def image_input_tokens(width: int, height: int) -> int:
    """Approximate input tokens for one input image (GPT-4o-style 512-pixel tiles).

    The image is scaled to fit 2048x2048, then its short side to 768; each 512x512 tile costs
    170 tokens plus a base of 85.
    """
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    short = min(w, h)
    if short > 768:
        w, h = w * 768 / short, h * 768 / short
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return 85 + 170 * tiles
