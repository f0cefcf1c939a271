"""Facts about the Images API that the loader, the client, the writer and the mock all share.

Sources: OpenAI's OpenAPI spec (`CreateImageRequest`, `CreateImageEditRequest`), the image
generation guide and model pages, as collected in `shared/API_NOTES.md`. Keeping them in one
place means the manifest loader rejects exactly what the mock server (and the real API) reject.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Literal

Family = Literal["gpt", "dall-e-2", "dall-e-3"]
Endpoint = Literal["generations", "edits"]

GPT_SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")
DALLE2_SIZES = ("256x256", "512x512", "1024x1024")
DALLE3_SIZES = ("1024x1024", "1792x1024", "1024x1792")
GPT_QUALITIES = ("low", "medium", "high", "auto")
#: Fields only GPT image models take.
GPT_ONLY_FIELDS = frozenset({"output_format", "output_compression", "background", "moderation"})
DALLE3_QUALITIES = ("standard", "hd")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
BACKGROUNDS = ("transparent", "opaque", "auto")
MODERATIONS = ("low", "auto")
INPUT_FIDELITIES = ("high", "low")
RESPONSE_FORMATS = ("url", "b64_json")
STYLES = ("vivid", "natural")

#: Fields a request body may carry (besides `image` / `mask` for edits).
API_FIELDS = (
    "model",
    "prompt",
    "n",
    "size",
    "quality",
    "output_format",
    "output_compression",
    "background",
    "moderation",
    "input_fidelity",
    "user",
    "style",
    "response_format",
)

#: Output tokens per image for gpt-image-1 and gpt-image-1.5 (image generation guide).
GPT_IMAGE_1_OUTPUT_TOKENS: dict[tuple[str, str], int] = {
    ("low", "1024x1024"): 272,
    ("low", "1024x1536"): 408,
    ("low", "1536x1024"): 400,
    ("medium", "1024x1024"): 1056,
    ("medium", "1024x1536"): 1584,
    ("medium", "1536x1024"): 1568,
    ("high", "1024x1024"): 4160,
    ("high", "1024x1536"): 6240,
    ("high", "1536x1024"): 6208,
}

#: gpt-image-1-mini does not follow the table above: these counts are its published per-image
#: prices divided by its image-output price ($8 / 1M tokens), e.g. $0.005 / $8e-6 = 625.
GPT_IMAGE_1_MINI_OUTPUT_TOKENS: dict[tuple[str, str], int] = {
    ("low", "1024x1024"): 625,
    ("low", "1024x1536"): 750,
    ("low", "1536x1024"): 750,
    ("medium", "1024x1024"): 1375,
    ("medium", "1024x1536"): 1875,
    ("medium", "1536x1024"): 1875,
    ("high", "1024x1024"): 4500,
    ("high", "1024x1536"): 6500,
    ("high", "1536x1024"): 6500,
}

#: What `auto` resolves to when a count must be known in advance (the mock bills this too).
AUTO_SIZE = "1024x1024"
AUTO_QUALITY = "medium"

MAX_PROMPT_CHARS: dict[Family, int] = {"gpt": 32000, "dall-e-2": 1000, "dall-e-3": 4000}
MAX_N = 10


class ParamError(ValueError):
    """A request parameter the API would reject; `param` names the field."""

    def __init__(self, param: str, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def family(model: str) -> Family:
    """Which rule set a model follows; unknown names are treated as GPT image models."""
    if model == "dall-e-2":
        return "dall-e-2"
    if model == "dall-e-3":
        return "dall-e-3"
    return "gpt"


def _choice(params: Mapping[str, Any], field: str, allowed: tuple[str, ...], model: str) -> None:
    value = params.get(field)
    if value is None:
        return
    if not isinstance(value, str) or value not in allowed:
        raise ParamError(
            field,
            f"Invalid value for '{field}': {value!r} (model {model} accepts: {', '.join(allowed)})",
        )


def _only_for(params: Mapping[str, Any], field: str, who: str) -> None:
    if params.get(field) is not None:
        raise ParamError(field, f"Unknown parameter: '{field}' ({who} only).", "unknown_parameter")


def takes_default(model: str, field: str, value: Any) -> bool:
    """Whether a run-wide default for `field` suits a line of `model`; where it does not (a
    GPT-only field, or a size, quality or n the model refuses), the API's own default stands."""
    fam = family(model)
    if field in GPT_ONLY_FIELDS:
        return fam == "gpt"
    if field == "size":
        return value in (GPT_SIZES if fam == "gpt" else DALLE2_SIZES if fam == "dall-e-2"
                         else DALLE3_SIZES)  # fmt: skip
    if field == "quality":
        return value in (GPT_QUALITIES if fam == "gpt" else DALLE3_QUALITIES if fam == "dall-e-3"
                         else ("standard",))  # fmt: skip
    if field == "n":
        return fam != "dall-e-3" or value == 1
    return True


def validate_params(params: Mapping[str, Any], endpoint: Endpoint = "generations") -> None:
    """Raise ParamError for the first field the API would reject for this model and endpoint."""
    prompt = params.get("prompt")
    if prompt is None:
        raise ParamError(
            "prompt", "Missing required parameter: 'prompt'.", "missing_required_parameter"
        )
    if not isinstance(prompt, str):
        raise ParamError("prompt", f"'prompt' must be a string, got {type(prompt).__name__}.")
    if not prompt.strip():
        raise ParamError("prompt", "'prompt' must not be empty.")
    model = params.get("model")
    if not isinstance(model, str) or not model:
        raise ParamError("model", f"'model' must be a non-empty string, got {model!r}.")
    fam = family(model)
    if len(prompt) > MAX_PROMPT_CHARS[fam]:
        raise ParamError(
            "prompt",
            f"'prompt' has {len(prompt)} characters; {model} takes {MAX_PROMPT_CHARS[fam]} at most",
        )
    # Manifests repeat a few option sets over many prompts: check each set once.
    try:
        key = tuple(sorted((k, type(v), v) for k, v in params.items() if k != "prompt"))
        error = _options_error(endpoint, key)
    except TypeError:  # an unhashable value (a list, a dict): check it uncached
        _check_options(params, endpoint)
        return
    if error is not None:
        raise ParamError(*error)


@functools.lru_cache(maxsize=4096)
def _options_error(endpoint: Endpoint, key: tuple[Any, ...]) -> tuple[str, str, str] | None:
    try:
        _check_options({k: v for k, _, v in key}, endpoint)
    except ParamError as exc:
        return exc.param, str(exc), exc.code
    return None


def _check_options(params: Mapping[str, Any], endpoint: Endpoint) -> None:
    """Every rule on the fields other than `prompt` (the model is known to be a string)."""
    model = str(params["model"])
    fam = family(model)
    n = params.get("n")
    if n is not None:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
            raise ParamError("n", f"Invalid value for 'n': {n!r} (an integer from 1 to {MAX_N}).")
        if fam == "dall-e-3" and n != 1:
            raise ParamError("n", "Invalid value for 'n': dall-e-3 only supports n=1.")
    for field in ("user",):
        if params.get(field) is not None and not isinstance(params[field], str):
            raise ParamError(field, f"'{field}' must be a string.")
    if fam == "gpt":
        _choice(params, "size", GPT_SIZES, model)
        _choice(params, "quality", GPT_QUALITIES, model)
        _choice(params, "output_format", OUTPUT_FORMATS, model)
        _choice(params, "background", BACKGROUNDS, model)
        _choice(params, "moderation", MODERATIONS, model)
        _choice(params, "input_fidelity", INPUT_FIDELITIES, model)
        compression = params.get("output_compression")
        if compression is not None and (
            not isinstance(compression, int)
            or isinstance(compression, bool)
            or not 0 <= compression <= 100
        ):
            raise ParamError(
                "output_compression",
                f"Invalid value for 'output_compression': {compression!r} (0 to 100).",
            )
        fmt = params.get("output_format") or "png"
        if params.get("background") == "transparent" and fmt not in ("png", "webp"):
            raise ParamError(
                "background", "Transparent background needs output_format png or webp."
            )
        _only_for(params, "response_format", "dall-e-2 and dall-e-3")
        _only_for(params, "style", "dall-e-3")
        if endpoint == "generations":
            _only_for(params, "input_fidelity", "edits")
        else:
            _only_for(params, "moderation", "generations")
            if model == "gpt-image-1-mini":
                _only_for(params, "input_fidelity", "edits with models other than gpt-image-1-mini")
    else:
        sizes = DALLE2_SIZES if fam == "dall-e-2" else DALLE3_SIZES
        _choice(params, "size", sizes, model)
        _choice(params, "response_format", RESPONSE_FORMATS, model)
        if fam == "dall-e-3":
            _choice(params, "quality", DALLE3_QUALITIES, model)
            _choice(params, "style", STYLES, model)
        else:
            _choice(params, "quality", ("standard",), model)
            _only_for(params, "style", "dall-e-3")
        for field in (
            "output_format",
            "output_compression",
            "background",
            "moderation",
            "input_fidelity",
        ):
            _only_for(params, field, "GPT image models")


def resolved_size(params: Mapping[str, Any]) -> str:
    """The size the API will produce: `auto` and a missing size become a concrete one."""
    size = params.get("size")
    if not size or size == "auto":
        return AUTO_SIZE
    return str(size)


def resolved_quality(params: Mapping[str, Any]) -> str:
    quality = params.get("quality")
    if not quality or quality == "auto":
        return AUTO_QUALITY if family(str(params.get("model", ""))) == "gpt" else "standard"
    return str(quality)


def output_format(params: Mapping[str, Any]) -> str:
    """The image format the response will carry (DALL·E always answers PNG)."""
    if family(str(params.get("model", ""))) != "gpt":
        return "png"
    return str(params.get("output_format") or "png")


def output_tokens_per_image(params: Mapping[str, Any]) -> int | None:
    """Published output-token count for one image, or None where the model has no table."""
    model = str(params.get("model", ""))
    if family(model) != "gpt":
        return None
    table = (
        GPT_IMAGE_1_MINI_OUTPUT_TOKENS if model == "gpt-image-1-mini" else GPT_IMAGE_1_OUTPUT_TOKENS
    )
    return table.get((resolved_quality(params), resolved_size(params)))


def estimate_request_tokens(params: Mapping[str, Any], image_tokens: int = 0) -> int:
    """Tokens one request will use, before it is sent: output from the table, text estimated."""
    n = int(params.get("n") or 1)
    prompt = params.get("prompt")
    text = estimate_text_tokens(prompt) if isinstance(prompt, str) else 0
    return (output_tokens_per_image(params) or 0) * n + text + image_tokens


def estimate_text_tokens(prompt: str) -> int:
    """A tokenizer-free estimate of a prompt's text tokens (about 4 characters per token)."""
    return max(1, math.ceil(len(prompt.encode("utf-8")) / 4))


def dimensions(size: str) -> tuple[int, int]:
    width, _, height = size.partition("x")
    return int(width), int(height)


IMAGE_MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
FILE_EXTENSION = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def sniff_format(head: bytes) -> str | None:
    """The image format named by a file's magic number: png, jpeg, webp, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def image_input_tokens(width: int, height: int) -> int:
    """Approximate input tokens for one input image (GPT-4o-style 512-pixel tiles).

    The image is scaled to fit 2048x2048, then its short side to 768; each 512x512 tile costs
    170 tokens plus a base of 85. The mock bills this and estimates use it.
    """
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    short = min(w, h)
    if short > 768:
        w, h = w * 768 / short, h * 768 / short
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return 85 + 170 * tiles
