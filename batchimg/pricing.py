"""Prices: what a request cost, from its verbatim `usage`.

A small built-in table for now (USD, as published; see shared/API_NOTES.md). Unknown models are
priced as unknown (None), never as zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import specs

PRICE_TABLE = "openai-2025-10"


@dataclass(frozen=True, kw_only=True)
class TokenPrices:
    """USD per 1M tokens."""

    text_in: float
    text_in_cached: float
    image_in: float
    image_in_cached: float
    image_out: float


TOKEN_PRICES: dict[str, TokenPrices] = {
    "gpt-image-1": TokenPrices(
        text_in=5.00, text_in_cached=1.25, image_in=10.00, image_in_cached=2.50, image_out=40.00
    ),
    "gpt-image-1-mini": TokenPrices(
        text_in=2.00, text_in_cached=0.20, image_in=2.50, image_in_cached=0.25, image_out=8.00
    ),
    "gpt-image-1.5": TokenPrices(
        text_in=5.00, text_in_cached=1.25, image_in=8.00, image_in_cached=2.00, image_out=32.00
    ),
}

#: DALL·E models bill per image: (model, quality, size) -> USD.
IMAGE_PRICES: dict[tuple[str, str, str], float] = {
    ("dall-e-3", "standard", "1024x1024"): 0.04,
    ("dall-e-3", "standard", "1792x1024"): 0.08,
    ("dall-e-3", "standard", "1024x1792"): 0.08,
    ("dall-e-3", "hd", "1024x1024"): 0.08,
    ("dall-e-3", "hd", "1792x1024"): 0.12,
    ("dall-e-3", "hd", "1024x1792"): 0.12,
    ("dall-e-2", "standard", "256x256"): 0.016,
    ("dall-e-2", "standard", "512x512"): 0.018,
    ("dall-e-2", "standard", "1024x1024"): 0.02,
}


def _int(mapping: Mapping[str, Any], key: str) -> int:
    value = mapping.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_cost_usd(model: str, usage: Mapping[str, Any]) -> float | None:
    """Cost of one answer from its `usage`, or None if the model's prices are unknown."""
    prices = TOKEN_PRICES.get(model)
    if prices is None or not isinstance(usage.get("output_tokens"), int):
        return None  # a missing count is unknown, and unknown must never read as $0
    details = usage.get("input_tokens_details")
    details = details if isinstance(details, Mapping) else {}
    if "text_tokens" in details or "image_tokens" in details:
        text, image = _int(details, "text_tokens"), _int(details, "image_tokens")
    else:
        text, image = _int(usage, "input_tokens"), 0
    cached = min(_int(details, "cached_tokens"), text)
    usd = (
        (text - cached) * prices.text_in
        + cached * prices.text_in_cached
        + image * prices.image_in
        + _int(usage, "output_tokens") * prices.image_out
    )
    return round(usd / 1_000_000, 8)


def request_cost_usd(params: Mapping[str, Any], usage: Mapping[str, Any] | None) -> float | None:
    """Cost of one answered request: from `usage` for token-billed models, per image otherwise."""
    model = str(params.get("model", ""))
    if specs.family(model) != "gpt":
        key = (model, specs.resolved_quality(params), specs.resolved_size(params))
        per_image = IMAGE_PRICES.get(key)
        return None if per_image is None else round(per_image * int(params.get("n") or 1), 8)
    if usage is None:
        return None
    return usage_cost_usd(model, usage)
