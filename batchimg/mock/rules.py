"""The mock's own copy of the Images API's rules: which models exist and what each refuses.

Written from the API reference and the official SDK's parameter docs (openai-python 3.57),
independently of batchimg's catalog and rules engine, which this package never imports: when
the engine's rules are wrong, a request it lets through is refused here, and a test fails
instead of both sides agreeing on the same mistake. Messages follow the wording the real API
uses where it is known (`Invalid size '1792x936'. Width and height must both be divisible by
16.`).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["gpt", "dall-e-2", "dall-e-3"]

STANDARD_SIZES = ("1024x1024", "1536x1024", "1024x1536")
BASE_QUALITIES = ("low", "medium", "high", "auto")
BIG_QUALITIES = ("low", "medium", "high", "xhigh", "max", "auto")
STILL_FORMATS = ("png", "jpeg", "webp")
ALL_FORMATS = ("png", "jpeg", "webp", "gif", "svg")
_SIZE = re.compile(r"(\d+)x(\d+)", re.ASCII)  # used with fullmatch
MAX_PIXELS = 8_294_400
MIN_PIXELS = 655_360
MAX_EDGE = 3840
#: How a gif's frames are laid out on one sheet: (fewest, most frames) -> (columns, rows).
GIF_GRIDS = (((2, 8), (4, 2)), ((9, 9), (3, 3)), ((10, 12), (4, 3)), ((13, 16), (4, 4)))


@dataclass(frozen=True)
class Model:
    """What one model of the mock takes."""

    name: str
    kind: Kind = "gpt"
    shutdown: str | None = None  # YYYY-MM-DD
    created: int = 1_745_000_000
    custom_sizes: bool = False
    qualities: tuple[str, ...] = BASE_QUALITIES
    formats: tuple[str, ...] = STILL_FORMATS
    complexity: bool = False
    input_fidelity: tuple[str, ...] = ()  # () = the parameter is refused
    max_prompt: int = 32000


def _gpt2(name: str, **extra: Any) -> Model:
    return Model(name, custom_sizes=True, created=1_776_700_000, **extra)


MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        Model("gpt-image-1", shutdown="2026-10-23", input_fidelity=("high", "low")),
        Model("gpt-image-1-mini", shutdown="2026-12-01", input_fidelity=("low",)),
        Model("gpt-image-1.5", shutdown="2026-12-01", input_fidelity=("high", "low")),
        Model("chatgpt-image-latest", shutdown="2026-12-01", input_fidelity=("high", "low")),
        _gpt2("gpt-image-2"),
        _gpt2("gpt-image-2.5-sunburst", qualities=BIG_QUALITIES),
        _gpt2("gpt-image-2.5-flare", qualities=BIG_QUALITIES),
        _gpt2("gpt-image-2.6-sunburst", qualities=BIG_QUALITIES, formats=ALL_FORMATS,
              complexity=True),
        _gpt2("gpt-image-2.6-flare", qualities=BIG_QUALITIES, formats=ALL_FORMATS,
              complexity=True),
        # A model newer than any catalog: it proves a run works on the day a model ships.
        _gpt2("gpt-image-3-preview", qualities=BIG_QUALITIES, complexity=True),
        Model("dall-e-2", kind="dall-e-2", shutdown="2026-05-12", max_prompt=1000),
        Model("dall-e-3", kind="dall-e-3", shutdown="2026-05-12", max_prompt=4000),
    )
}  # fmt: skip
SNAPSHOTS = {
    "gpt-image-1.5-2025-12-16": "gpt-image-1.5",
    "gpt-image-2-2026-04-21": "gpt-image-2",
    "gpt-image-2.5-sunburst-2026-09-08": "gpt-image-2.5-sunburst",
    "gpt-image-2.5-flare-2026-09-08": "gpt-image-2.5-flare",
}
#: Fields any request may carry (the rules below decide per model).
FIELDS = frozenset(
    {"model", "prompt", "n", "size", "quality", "output_format", "output_compression",
     "background", "moderation", "input_fidelity", "user", "style", "response_format",
     "complexity", "frame_count", "frame_duration_ms", "svg", "safety_identifier", "stream",
     "partial_images"}
)  # fmt: skip


class RuleError(ValueError):
    """A request the API refuses: answered 400 (or `status`) in the official envelope."""

    def __init__(
        self,
        param: str | None,
        message: str,
        code: str | None = "invalid_value",
        status: int = 400,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
        self.status = status
        self.type_ = type_


def find(name: str) -> Model | None:
    return MODELS.get(SNAPSHOTS.get(name, name))


def is_retired(model: Model, today: dt.date) -> bool:
    return model.shutdown is not None and today >= dt.date.fromisoformat(model.shutdown)


def _one_of(value: Any, allowed: tuple[str, ...], param: str) -> None:
    if value is not None and value not in allowed:
        quoted = ", ".join(f"'{a}'" for a in allowed[:-1]) + f", and '{allowed[-1]}'"
        raise RuleError(param, f"Invalid value: '{value}'. Supported values are: {quoted}.")


def _int(value: Any, param: str, low: int, high: int) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RuleError(
            param, f"Invalid '{param}': {value!r}. Expected an integer from {low} to {high}."
        )


def _unknown(param: str, why: str = "") -> RuleError:
    return RuleError(param, f"Unknown parameter: '{param}'.{why}", "unknown_parameter")


def output_format(params: Mapping[str, Any], model: Model) -> str:
    return "png" if model.kind != "gpt" else str(params.get("output_format") or "png")


def resolve_size(params: Mapping[str, Any], model: Model) -> tuple[int, int]:
    """The size the mock draws: `auto` is 1024x1024 (1024x768 per frame for gifs)."""
    size = params.get("size")
    if not size or size == "auto":
        if model.kind == "dall-e-2" or model.kind == "dall-e-3":
            return 1024, 1024
        return (1024, 768) if output_format(params, model) == "gif" else (1024, 1024)
    match = _SIZE.fullmatch(str(size))
    assert match is not None
    return int(match.group(1)), int(match.group(2))


def resolve_quality(params: Mapping[str, Any], model: Model) -> str:
    quality = params.get("quality")
    if not quality or quality == "auto":
        return "medium" if model.kind == "gpt" else "standard"
    return str(quality)


def frames(params: Mapping[str, Any], model: Model) -> int:
    """Frames in the answer: 1 for still images, 9 by default for a gif."""
    if output_format(params, model) != "gif":
        return 1
    count = params.get("frame_count")
    return count if isinstance(count, int) else 9


def gif_sheet(frame_count: int) -> tuple[int, int]:
    for (low, high), grid in GIF_GRIDS:
        if low <= frame_count <= high:
            return grid
    raise RuleError("frame_count", f"Invalid 'frame_count': {frame_count}.")


def check(
    params: Mapping[str, Any], endpoint: str, model: Model, *, multipart: bool = False
) -> None:
    """Raise RuleError for the first thing the API would refuse in this request (`multipart`:
    an edit sent as a form, whose fields differ a little from the JSON body's)."""
    for name in params:
        if name not in FIELDS:
            raise _unknown(name)
    prompt = params.get("prompt")
    if not isinstance(prompt, str):
        if prompt is None:
            raise RuleError(
                "prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter"
            )
        raise RuleError("prompt", "Invalid type for 'prompt': expected a string.")
    if not prompt.strip():
        raise RuleError("prompt", "Invalid 'prompt': empty string.")
    if len(prompt) > model.max_prompt:
        raise RuleError(
            "prompt",
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{model.max_prompt}, but got a string with length {len(prompt)} instead.",
            "string_above_max_length",
        )
    if params.get("stream") is not None and not isinstance(params["stream"], bool):
        raise RuleError("stream", "Invalid type for 'stream': expected a boolean.")
    for name in ("user", "safety_identifier"):
        if params.get(name) is not None and not isinstance(params[name], str):
            raise RuleError(name, f"Invalid type for '{name}': expected a string.")
    if model.kind == "gpt":
        _check_gpt(params, endpoint, model, multipart)
    else:
        _check_dalle(params, endpoint, model)


def _check_gpt(params: Mapping[str, Any], endpoint: str, model: Model, multipart: bool) -> None:
    n = params.get("n")
    _int(n, "n", 1, 10)
    for name in ("response_format", "style"):
        if params.get(name) is not None:
            raise _unknown(name, f" {model.name} always returns base64-encoded images.")
    _one_of(params.get("quality"), model.qualities, "quality")
    fmt = output_format(params, model)
    _one_of(params.get("output_format"), model.formats, "output_format")
    _one_of(params.get("background"), ("transparent", "opaque", "auto"), "background")
    _one_of(params.get("moderation"), ("low", "auto"), "moderation")
    if multipart and params.get("moderation") is not None:
        # The JSON edit body (EditImageBodyJsonParam) has `moderation`; the form does not.
        raise _unknown("moderation", " It is only supported for image generation.")
    if params.get("background") == "transparent" and fmt not in ("png", "webp"):
        if fmt == "jpeg":
            raise RuleError(
                "background", "Transparent background is not supported for JPEG output format."
            )
        raise RuleError("background", f"Transparent background is not supported for {fmt} output.")
    compression = params.get("output_compression")
    _int(compression, "output_compression", 0, 100)
    if compression is not None and fmt in ("gif", "svg"):
        raise RuleError(
            "output_compression", f"{fmt.upper()} output does not support output_compression."
        )
    fidelity = params.get("input_fidelity")
    if fidelity is not None:
        if endpoint != "edits":
            raise _unknown("input_fidelity", " It is only supported for image edits.")
        if not model.input_fidelity:
            raise RuleError(
                "input_fidelity",
                f"The model '{model.name}' does not support the 'input_fidelity' parameter.",
                "invalid_input_fidelity_model",
            )
        _one_of(fidelity, model.input_fidelity, "input_fidelity")
    if params.get("complexity") is not None:
        if not model.complexity:
            raise _unknown("complexity", f" {model.name} uses a fixed planning depth.")
        _one_of(params["complexity"], ("low", "medium", "high"), "complexity")
    for name, needs in (("frame_count", "gif"), ("frame_duration_ms", "gif"), ("svg", "svg")):
        if params.get(name) is not None and fmt != needs:
            raise RuleError(name, f"'{name}' is only supported with output_format={needs}.")
    _int(params.get("frame_count"), "frame_count", 2, 16)
    _int(params.get("frame_duration_ms"), "frame_duration_ms", 0, 655_350)
    if params.get("svg") is not None and not isinstance(params["svg"], dict):
        raise RuleError("svg", "Invalid type for 'svg': expected an object.")
    if fmt == "svg" and (n or 1) > 1:
        raise RuleError("n", "SVG generation requires n=1.")
    _check_stream(params, fmt, n)
    _check_size(params, model, fmt)


def _check_stream(params: Mapping[str, Any], fmt: str, n: Any) -> None:
    partial = params.get("partial_images")
    _int(partial, "partial_images", 0, 3)
    if fmt in ("gif", "svg") and (params.get("stream") or partial):
        raise RuleError(
            "stream" if params.get("stream") else "partial_images",
            f"{fmt.upper()} output does not support streaming or partial images.",
        )
    # The stream's events carry no image index (ImageGenCompletedEvent has none), so one stream
    # holds one image; the docs are silent and the mock refuses rather than guess an order.
    if params.get("stream") and (n or 1) > 1:
        raise RuleError("n", "Streaming supports n=1 only: send one request per image.")


def _check_size(params: Mapping[str, Any], model: Model, fmt: str) -> None:
    size = params.get("size")
    if size is None or size == "auto":
        return
    if not isinstance(size, str) or not _SIZE.fullmatch(size):
        raise RuleError(
            "size", f"Invalid size '{size}'. Expected WIDTHxHEIGHT, for example '1824x1024'."
        )
    if not model.custom_sizes:
        _one_of(size, ("auto", *STANDARD_SIZES), "size")
        return
    width, height = resolve_size(params, model)
    if width % 16 or height % 16:
        raise RuleError(
            "size", f"Invalid size '{size}'. Width and height must both be divisible by 16."
        )
    if max(width, height) > 3 * min(width, height):
        raise RuleError(
            "size", f"Invalid size '{size}'. The aspect ratio must be between 1:3 and 3:1."
        )
    if fmt == "gif":  # the frames are drawn on one sheet: the sheet must fit the budget
        cols, rows = gif_sheet(frames(params, model))
        sheet_w, sheet_h = width * cols, height * rows
        if not _fits(sheet_w, sheet_h):
            raise RuleError(
                "size",
                f"Invalid size '{size}' for {frames(params, model)} frames: the frame sheet "
                f"would be {sheet_w}x{sheet_h}, over the model's pixel and edge limits.",
            )
        return
    if not _fits(width, height):
        raise RuleError(
            "size",
            f"Invalid size '{size}'. The requested size must be between {MIN_PIXELS:,} and "
            f"{MAX_PIXELS:,} pixels with no edge over {MAX_EDGE}.",
        )


def _fits(width: int, height: int) -> bool:
    return MIN_PIXELS <= width * height <= MAX_PIXELS and max(width, height) <= MAX_EDGE


def _check_dalle(params: Mapping[str, Any], endpoint: str, model: Model) -> None:
    if endpoint == "edits" and model.kind == "dall-e-3":
        raise RuleError("model", "dall-e-3 does not support image edits.")
    n = params.get("n")
    if model.kind == "dall-e-3":
        if n is not None and (n != 1 or isinstance(n, bool)):
            raise RuleError("n", "Invalid 'n': dall-e-3 only supports n=1.")
        _one_of(params.get("size"), ("1024x1024", "1792x1024", "1024x1792"), "size")
        _one_of(params.get("quality"), ("standard", "hd"), "quality")
        _one_of(params.get("style"), ("vivid", "natural"), "style")
    else:
        _int(n, "n", 1, 10)
        _one_of(params.get("size"), ("256x256", "512x512", "1024x1024"), "size")
        _one_of(params.get("quality"), ("standard",), "quality")
        if params.get("style") is not None:
            raise _unknown("style", " It is only supported by dall-e-3.")
    _one_of(params.get("response_format"), ("url", "b64_json"), "response_format")
    if params.get("stream"):
        raise RuleError(
            "stream", f"Streaming is only supported for GPT image models, not {model.name}."
        )
    for name in (
        "output_format", "output_compression", "background", "moderation", "input_fidelity",
        "complexity", "frame_count", "frame_duration_ms", "svg", "partial_images",
    ):  # fmt: skip
        if params.get(name) is not None:
            raise _unknown(name, f" {model.name} does not support it.")
