"""What the mock bills: the `usage` of each answer.

gpt-image-1, 1.5 and chatgpt-image-latest bill the published output-token table, and
gpt-image-1-mini the counts its published per-image prices imply. For gpt-image-2 and later
OpenAI publishes no table, only a calculator; the mock bills by a formula of its own that lives
here and nowhere else (batchimg never imports it), so tests prove the engine learns what it
cannot know: gpt-image-2 by the formula reverse-engineered from OpenAI's calculator, the later
models scaled from it by quality, complexity and model, a gif by its frame sheet, plus a small
per-prompt variation, as real answers vary. A stream's partial images add 100 output tokens
each, and `output_tokens_details` splits the output (all image tokens). SVG answers also carry
`svg_usage` for the model that writes the SVG, which the mock does not count in its bill.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from .rules import Model, frames, gif_sheet, output_format, resolve_quality, resolve_size

#: Output tokens per image, gpt-image-1 and gpt-image-1.5 (the image generation guide).
GPT_IMAGE_1_TABLE = {
    ("low", "1024x1024"): 272, ("low", "1024x1536"): 408, ("low", "1536x1024"): 400,
    ("medium", "1024x1024"): 1056, ("medium", "1024x1536"): 1584, ("medium", "1536x1024"): 1568,
    ("high", "1024x1024"): 4160, ("high", "1024x1536"): 6240, ("high", "1536x1024"): 6208,
}  # fmt: skip
#: gpt-image-1-mini: its per-image prices divided by its $8 / 1M output rate.
GPT_IMAGE_1_MINI_TABLE = {
    ("low", "1024x1024"): 625, ("low", "1024x1536"): 750, ("low", "1536x1024"): 750,
    ("medium", "1024x1024"): 1375, ("medium", "1024x1536"): 1875, ("medium", "1536x1024"): 1875,
    ("high", "1024x1024"): 4500, ("high", "1024x1536"): 6500, ("high", "1536x1024"): 6500,
}  # fmt: skip
#: The calculator formula's quality factor; xhigh and max extrapolated.
_QUALITY_FACTOR = {"low": 16, "medium": 48, "high": 96, "xhigh": 136, "max": 200}
#: Later models against gpt-image-2 at the same quality (2.6 spends 3-4x on low and medium).
_MODEL_SCALE = {
    "gpt-image-2": 1.0,
    "gpt-image-2.5-sunburst": 0.30,
    "gpt-image-2.5-flare": 0.27,
    "gpt-image-2.6-sunburst": 0.30,
    "gpt-image-2.6-flare": 0.27,
    "gpt-image-3-preview": 0.5,
}
_LOW_QUALITY_BOOST = {"gpt-image-2.6-sunburst": 3.5, "gpt-image-2.6-flare": 3.2}
_COMPLEXITY = {"low": 0.7, "medium": 0.85, "high": 1.0}
#: Output tokens each streamed partial image adds (OpenAI's image generation guide).
PARTIAL_IMAGE_TOKENS = 100
#: Answers for one prompt vary by up to this much either way.
_VARIATION = 0.015
SVG_AUTHOR = "mock-svg-author"


def text_tokens(prompt: str) -> int:
    """The mock's tokenizer: about four bytes a token."""
    return max(1, math.ceil(len(prompt.encode("utf-8")) / 4))


def image_tokens(width: int, height: int) -> int:
    """Input tokens for an edit's input image: 512-pixel tiles after scaling to fit 2048 and
    a short side of 768, 170 a tile plus 85."""
    scale = min(1.0, 2048 / max(width, height))
    w, h = width * scale, height * scale
    short = min(w, h)
    if short > 768:
        w, h = w * 768 / short, h * 768 / short
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def _calculator(factor: int, width: int, height: int) -> int:
    long, short = max(width, height), min(width, height)
    steps = (2 * factor * short + long) // (2 * long)
    return math.ceil(factor * steps * (2_000_000 + width * height) / 4_000_000)


def output_tokens_per_image(params: Mapping[str, Any], model: Model) -> int:
    """What one image of this request costs in output tokens."""
    width, height = resolve_size(params, model)
    quality = resolve_quality(params, model)
    if model.name in ("gpt-image-1-mini",):
        return GPT_IMAGE_1_MINI_TABLE.get((quality, f"{width}x{height}"), 1375)
    if not model.custom_sizes:
        return GPT_IMAGE_1_TABLE.get((quality, f"{width}x{height}"), 1056)
    fmt = output_format(params, model)
    if fmt == "gif":  # billed as one sheet holding every frame
        cols, rows = gif_sheet(frames(params, model))
        width, height = width * cols, height * rows
    tokens = _calculator(_QUALITY_FACTOR[quality], width, height) * _MODEL_SCALE[model.name]
    if quality in ("low", "medium"):
        tokens *= _LOW_QUALITY_BOOST.get(model.name, 1.0)
    if model.complexity:
        tokens *= _COMPLEXITY[str(params.get("complexity") or "high")]
    spread = (zlib.crc32(str(params.get("prompt")).encode("utf-8")) % 2001 - 1000) / 1000
    return max(1, round(tokens * (1 + _VARIATION * spread)))


def usage(
    params: Mapping[str, Any],
    model: Model,
    n: int,
    inputs: Sequence[tuple[int, int]],
    partial_images: int = 0,
) -> dict[str, Any]:
    """The `usage` of a 200 answer or a stream's completed event (inputs: the edit's image
    sizes; partial_images: the drafts a stream sent, PARTIAL_IMAGE_TOKENS each)."""
    output = output_tokens_per_image(params, model) * n + PARTIAL_IMAGE_TOKENS * partial_images
    text = text_tokens(str(params["prompt"]))
    image = sum(image_tokens(w, h) for w, h in inputs)
    return {
        "total_tokens": text + image + output,
        "input_tokens": text + image,
        "output_tokens": output,
        "input_tokens_details": {"text_tokens": text, "image_tokens": image},
        # Every output token is an image token: the image models write no text.
        "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
    }


def svg_usage(params: Mapping[str, Any]) -> dict[str, Any]:
    """What the model that writes the SVG used (billed apart by the real API)."""
    svg = params.get("svg")
    author: Mapping[str, Any] = svg if isinstance(svg, dict) else {}
    prompt = text_tokens(str(params["prompt"]))
    reasoning = 400
    output = 900 + reasoning
    return {
        "model": str(author.get("model") or SVG_AUTHOR),
        "input_tokens": prompt + 600,
        "output_tokens": output,
        "reasoning_tokens": reasoning,
        "total_tokens": prompt + 600 + output,
    }
