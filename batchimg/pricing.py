"""Prices: what a request cost (from its verbatim `usage`) and what it will cost (before sending).

The table is data (`prices.json`, shipped in the package; `--prices FILE` overrides or extends
it per model). Token-billed models price text input, cached text input, image input, cached image
input and image output per 1M tokens; DALL·E bills per image; gpt-image-1-mini is estimated from
its published per-image prices, since its token counts do not follow gpt-image-1's table. A
model the table does not know is priced as unknown (None), never as zero.

One `PriceTable` prices ledgers, estimates and the budget cap, so the three always agree.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from . import specs
from .errors import UsageError

TOKEN_KINDS = ("text_in", "text_in_cached", "image_in", "image_in_cached", "image_out")
#: Headroom on input-token estimates when reserving a worst case against a budget.
WORST_CASE_INPUT_MARGIN = 1.25


@dataclass(frozen=True)
class ModelPrices:
    """One model's prices: per 1M tokens of each kind, and/or per image by (quality, size)."""

    per_1m_tokens: Mapping[str, float] | None = None
    per_image: Mapping[tuple[str, str], float] = field(default_factory=dict)


@dataclass(frozen=True)
class Estimate:
    """What a request should use and cost, known before it is sent."""

    images: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None


def _int(mapping: Mapping[str, Any], key: str) -> int:
    value = mapping.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _parse_model(name: str, raw: Any, source: str) -> ModelPrices:
    if not isinstance(raw, dict):
        raise UsageError(f"{source}: model {name!r} must be an object")
    tokens = raw.get("per_1m_tokens")
    if tokens is not None:
        if not isinstance(tokens, dict) or not all(
            k in TOKEN_KINDS and isinstance(v, (int, float)) and v >= 0 for k, v in tokens.items()
        ):
            kinds = ", ".join(TOKEN_KINDS)
            raise UsageError(f"{source}: {name}.per_1m_tokens takes numbers for: {kinds}")
        missing = [k for k in ("text_in", "image_out") if k not in tokens]
        if missing:
            raise UsageError(f"{source}: {name}.per_1m_tokens needs {', '.join(missing)}")
    per_image: dict[tuple[str, str], float] = {}
    for quality, sizes in (raw.get("per_image") or {}).items():
        if not isinstance(sizes, dict):
            raise UsageError(f"{source}: {name}.per_image.{quality} must map sizes to prices")
        for size, usd in sizes.items():
            if not isinstance(usd, (int, float)) or usd < 0:
                raise UsageError(f"{source}: {name}.per_image.{quality}.{size} must be >= 0")
            per_image[(quality, size)] = float(usd)
    if tokens is None and not per_image:
        raise UsageError(f"{source}: model {name!r} has neither per_1m_tokens nor per_image")
    return ModelPrices(per_1m_tokens=tokens, per_image=per_image)


class PriceTable:
    """Named prices for a set of models."""

    def __init__(self, name: str, models: Mapping[str, ModelPrices]) -> None:
        self.name = name
        self.models = dict(models)

    @classmethod
    def from_json(cls, data: Any, source: str) -> PriceTable:
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise UsageError(f"{source}: a price table is an object with a 'models' object")
        name = data.get("name") or Path(source).stem
        models = {m: _parse_model(m, raw, source) for m, raw in data["models"].items()}
        return cls(str(name), models)

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        """Read a price file (same shape as the built-in prices.json); UsageError if bad."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"cannot read prices {str(path)!r}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise UsageError(f"prices {str(path)!r} is not valid JSON: {exc}") from None
        return cls.from_json(data, str(path))

    @classmethod
    def default(cls) -> PriceTable:
        return _default_table()

    def extended(self, other: PriceTable) -> PriceTable:
        """This table with `other`'s models added or replacing ours (named after both)."""
        return PriceTable(f"{self.name}+{other.name}", {**self.models, **other.models})

    # -- what it cost --

    def usage_cost(self, model: str, usage: Mapping[str, Any]) -> float | None:
        """Cost of one answer from its `usage`; None if the model or the counts are unknown."""
        prices = self.models.get(model)
        if prices is None or prices.per_1m_tokens is None:
            return None
        if not isinstance(usage.get("output_tokens"), int):
            return None  # a missing count is unknown, and unknown must never read as $0
        rates = prices.per_1m_tokens
        details = usage.get("input_tokens_details")
        details = details if isinstance(details, Mapping) else {}
        if "text_tokens" in details or "image_tokens" in details:
            text, image = _int(details, "text_tokens"), _int(details, "image_tokens")
        else:
            text, image = _int(usage, "input_tokens"), 0
        cached = min(_int(details, "cached_tokens"), text)
        usd = (
            (text - cached) * rates["text_in"]
            + cached * rates.get("text_in_cached", rates["text_in"])
            + image * rates.get("image_in", rates["text_in"])
            + _int(usage, "output_tokens") * rates["image_out"]
        )
        return round(usd / 1_000_000, 8)

    def request_cost(
        self, params: Mapping[str, Any], usage: Mapping[str, Any] | None
    ) -> float | None:
        """Cost of one answered request: from `usage` when it has one, else per image."""
        model = str(params.get("model", ""))
        if usage is not None:
            cost = self.usage_cost(model, usage)
            if cost is not None:
                return cost
        prices = self.models.get(model)
        if prices is None or prices.per_1m_tokens is not None:
            return None  # token-billed without usable usage: unknown
        per_image = prices.per_image.get(
            (specs.resolved_quality(params), specs.resolved_size(params))
        )
        return None if per_image is None else round(per_image * _n(params), 8)

    # -- what it will cost --

    def estimate(self, params: Mapping[str, Any], image_tokens: int = 0) -> Estimate:
        """Usage and cost of one request before sending it (the mock bills exactly this)."""
        n = _n(params)
        prompt = params.get("prompt")
        text = specs.estimate_text_tokens(prompt) if isinstance(prompt, str) else 0
        output = (specs.output_tokens_per_image(params) or 0) * n
        cost = self._predict(params, text, image_tokens, output, specs.resolved_quality(params),
                             specs.resolved_size(params))  # fmt: skip
        return Estimate(images=n, input_tokens=text + image_tokens, output_tokens=output,
                        cost_usd=cost)  # fmt: skip

    def worst_case_usd(self, params: Mapping[str, Any], image_tokens: int = 0) -> float | None:
        """The most a request can cost: `auto` as its dearest choice, inputs with headroom."""
        prompt = params.get("prompt")
        text = len(prompt.encode("utf-8")) if isinstance(prompt, str) else 0  # <= 1 token a byte
        image = int(image_tokens * WORST_CASE_INPUT_MARGIN)
        model = str(params.get("model", ""))
        gpt = specs.family(model) == "gpt"
        qualities = (
            ("low", "medium", "high") if params.get("quality") in (None, "auto") and gpt
            else (specs.resolved_quality(params),)
        )  # fmt: skip
        sizes = (
            specs.GPT_SIZES[:3] if params.get("size") in (None, "auto") and gpt
            else (specs.resolved_size(params),)
        )  # fmt: skip
        worst: float | None = None
        for quality in qualities:
            for size in sizes:
                choice = {**params, "quality": quality, "size": size}
                output = (specs.output_tokens_per_image(choice) or 0) * _n(params)
                cost = self._predict(choice, text, image, output, quality, size)
                if cost is None:
                    return None
                worst = cost if worst is None else max(worst, cost)
        return worst

    def _predict(
        self,
        params: Mapping[str, Any],
        text: int,
        image: int,
        output: int,
        quality: str,
        size: str,
    ) -> float | None:
        prices = self.models.get(str(params.get("model", "")))
        if prices is None:
            return None
        n = _n(params)
        per_image = prices.per_image.get((quality, size))
        rates = prices.per_1m_tokens
        if per_image is not None:  # per-image price known: it covers the output
            usd = per_image * n
            if rates is not None:
                usd += (text * rates["text_in"] + image * rates.get("image_in", 0.0)) / 1e6
            return round(usd, 8)
        if rates is None or not output:
            return None
        usd = text * rates["text_in"] + image * rates.get("image_in", 0.0)
        return round((usd + output * rates["image_out"]) / 1_000_000, 8)


def _n(params: Mapping[str, Any]) -> int:
    return int(params.get("n") or 1)


@functools.lru_cache(maxsize=1)
def _default_table() -> PriceTable:
    text = resources.files("batchimg").joinpath("prices.json").read_text(encoding="utf-8")
    return PriceTable.from_json(json.loads(text), "batchimg/prices.json")


PRICE_TABLE = _default_table().name


def usage_cost_usd(model: str, usage: Mapping[str, Any]) -> float | None:
    """Cost of one answer from its `usage`, with the built-in table."""
    return _default_table().usage_cost(model, usage)


def request_cost_usd(params: Mapping[str, Any], usage: Mapping[str, Any] | None) -> float | None:
    """Cost of one answered request with the built-in table."""
    return _default_table().request_cost(params, usage)
