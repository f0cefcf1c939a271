"""Prices: what a request cost (from its verbatim `usage`) and what it will cost (before sending).

Prices are the catalog's (`catalog.json`; `--catalog` and `--prices` overlay it). Token-billed
models price text input, cached text input, image input, cached image input and image output
per 1M tokens; DALL·E bills per image. What an answer cost is always its `usage` times the
prices: exact. What a request *will* cost needs its output tokens in advance, which come from
a published table (gpt-image-1, 1.5), published per-image prices (gpt-image-1-mini, DALL·E), or,
for models whose counts nobody publishes (gpt-image-2 and later), from earlier answers
(`tokens.TokenBook`); without those the estimate is unknown, never a made-up number. A model
without prices is priced as unknown (None), never as zero.

The budget cap needs a bound instead (`worst_case`): the published count where there is one,
else the most the group's answers used plus a margin, never above the catalog's ceiling of
tokens per megapixel (and the ceiling alone before any answer is known). An answer above the
ceiling wins: its group's bound follows what was seen.

One `PriceTable` prices ledgers, estimates and the budget cap, so the three always agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar, cast

from . import specs
from .catalog import Catalog, ModelPrices, ModelSpec, load_catalog
from .tokens import Learned, TokenBook, request_group
from .usage import UsageProblem, read_usage

#: Headroom on input-token estimates when reserving a worst case against a budget.
WORST_CASE_INPUT_MARGIN = 1.25
#: Headroom over the most a group's answers used, when that is the bound.
LEARNED_MARGIN = 0.25
#: An answer whose usage says more output tokens than this many times the most the catalog
#: allows the request (its ceiling, or a published count) is not believed: a broken or hostile
#: server, not a bill. Its cost is unknown, and counts at its bound.
IMPLAUSIBLE_FACTOR = 4


def input_bound(prompt: str, image_tokens: int = 0) -> int:
    """The most input tokens a request can be billed: a token per byte of its prompt, its
    images' estimated tokens four times over, and slack. More is not believed."""
    return len(prompt.encode("utf-8")) + IMPLAUSIBLE_FACTOR * image_tokens + 1000


Basis = Literal["published", "learned", "unknown"]


@dataclass(frozen=True)
class Estimate:
    """What a request should use and cost, known before it is sent.

    `basis` says where the output tokens come from: `published` (a table or per-image prices),
    `learned` (earlier answers: `output_tokens` is their mean, the range their least and most)
    or `unknown` (`output_tokens` 0, `cost_usd` None). `cost_usd` is None also when the model
    has no prices.
    """

    images: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    basis: Basis = "published"
    output_range: tuple[int, int] | None = None
    cost_range_usd: tuple[float, float] | None = None
    samples: int = 0


@dataclass(frozen=True)
class Bound:
    """The most a request can cost, and what the bound rests on."""

    cost_usd: float
    basis: Literal["published", "learned", "ceiling"]


_Fixed = TypeVar("_Fixed", Estimate, Bound | None)
_UNKNOWN = object()


class PriceTable:
    """The catalog's prices, with the arithmetic on them."""

    def __init__(self, catalog: Catalog, *, multiplier: float = 1.0) -> None:
        self.catalog = catalog
        self.name = catalog.name
        #: What these prices are of the catalog's (online) ones: the Batch API's are
        #: `catalog.batch_multiplier` of them (`batch()`).
        self.multiplier = multiplier
        #: What the catalog alone bounds, by the request's shape (asked for every answer).
        self._ceilings: dict[tuple[Any, ...], int | None] = {}
        #: Estimates and worst cases that no learned count enters (published counts, or no
        #: prices), by shape and input sizes: asked for every attempt, the same for most.
        self._fixed: dict[tuple[Any, ...], Estimate | Bound | None] = {}

    @classmethod
    def default(cls) -> PriceTable:
        return cls(Catalog.default())

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        """The built-in prices with a price file's models replacing or adding theirs."""
        return cls(load_catalog(prices=path))

    def batch(self) -> PriceTable:
        """The same prices for requests sent through the Batch API (half, by the catalog)."""
        return PriceTable(self.catalog, multiplier=self.catalog.batch_multiplier)

    def via(self, via: object) -> PriceTable:
        """The prices a ledger line's `via` (`batch`, else online) was billed at."""
        return self.batch() if via == "batch" and self.multiplier == 1.0 else self

    def prices(self, model: str) -> ModelPrices | None:
        return self.catalog.spec(model).prices

    # -- what it cost --

    def usage_cost(self, model: str, usage: Any) -> float | None:
        """Cost of one answer from its `usage`; None if the model or the counts are unknown."""
        return self.answer_cost({"model": model}, usage)[0]

    def answer_cost(
        self, params: Mapping[str, Any], usage: Any, *, input_bound: int | None = None
    ) -> tuple[float | None, str | None]:
        """What one answer cost, from its `usage` (per image for DALL·E), and, when that is
        unknown, why: (cost, None) or (None, the reason). Usage beyond what the request can
        use (`IMPLAUSIBLE_FACTOR`, and `input_bound` input tokens, where given) is not
        believed."""
        model = str(params.get("model") or "")
        prices = self.prices(model)
        if prices is None:
            return None, f"the catalog has no prices for model {model!r}"
        if prices.per_1m_tokens is None:  # billed per image: usage does not matter
            quality = specs.resolved_quality(params, self.catalog)
            per_image = prices.per_image.get((quality, specs.resolved_size(params, self.catalog)))
            if per_image is None:
                return None, f"the catalog has no per-image price for {model} at that size"
            return round(per_image * _n(params) * self.multiplier, 8), None
        counts = read_usage(usage)
        if isinstance(counts, UsageProblem):
            return None, str(counts)  # a missing or broken count is unknown, never $0
        if input_bound is not None and counts.input > input_bound:
            return None, (
                f"usage says {counts.input:,} input tokens, more than the request can have "
                f"({input_bound:,} at most): not believed"
            )
        most = self.output_ceiling(params)
        if most is not None and counts.output > IMPLAUSIBLE_FACTOR * most + 1000:
            return None, (
                f"usage says {counts.output:,} output tokens, over {IMPLAUSIBLE_FACTOR}x the "
                f"most such a request can use ({most:,}): not believed"
            )
        rates = _rates(prices.per_1m_tokens)
        usd = (
            (counts.text_in - counts.cached_text_in) * rates.text_in
            + counts.cached_text_in * rates.text_in_cached
            + counts.image_in * rates.image_in
            + counts.output * rates.image_out
        )
        return round(usd * self.multiplier / 1_000_000, 8), None

    def request_cost(
        self, params: Mapping[str, Any], usage: Any, *, input_bound: int | None = None
    ) -> float | None:
        """Cost of one answered request: from `usage`, or per image for models billed so."""
        return self.answer_cost(params, usage, input_bound=input_bound)[0]

    # -- what it will cost --

    def estimate(
        self, params: Mapping[str, Any], image_tokens: int = 0, book: TokenBook | None = None
    ) -> Estimate:
        """Usage and cost of one request before sending it (see `Estimate` for the basis)."""
        n = _n(params)
        prompt = params.get("prompt")
        text = specs.estimate_text_tokens(prompt) if isinstance(prompt, str) else 0
        key = ("estimate", specs.request_shape(params), text, image_tokens)
        fixed = self._fixed.get(key)
        if isinstance(fixed, Estimate):
            return fixed
        spec = self.catalog.spec(str(params.get("model") or ""))
        quality, size = self._resolved(params)
        inputs = text + image_tokens
        published = self._published_output(spec, quality, size)
        if published is not None:
            output = published * n
            cost = self._cost(spec, text, image_tokens, output, quality, size, n)
            return self._keep(key, Estimate(n, inputs, output, cost))
        learned = book.get(request_group(params, self.catalog)) if book is not None else None
        if learned is None or not learned.samples:
            return Estimate(n, inputs, 0, None, basis="unknown")
        low, mean, high = (round(v * n) for v in (learned.low, learned.mean, learned.high))
        cost_low = self._cost(spec, text, image_tokens, low, quality, size, n)
        cost_high = self._cost(spec, text, image_tokens, high, quality, size, n)
        return Estimate(
            n,
            inputs,
            mean,
            self._cost(spec, text, image_tokens, mean, quality, size, n),
            basis="learned",
            output_range=(low, high),
            cost_range_usd=None if cost_low is None or cost_high is None else (cost_low, cost_high),
            samples=learned.samples,
        )

    def worst_case(
        self, params: Mapping[str, Any], image_tokens: int = 0, book: TokenBook | None = None
    ) -> Bound | None:
        """The most a request can cost (`auto` as its dearest choice, inputs with headroom);
        None when nothing bounds it (no prices, or no published count, answers or ceiling)."""
        prompt = params.get("prompt")
        text = len(prompt.encode("utf-8")) if isinstance(prompt, str) else 0  # <= 1 token a byte
        image = int(image_tokens * WORST_CASE_INPUT_MARGIN)
        key = ("worst", specs.request_shape(params), text, image)
        fixed = self._fixed.get(key, _UNKNOWN)
        if fixed is not _UNKNOWN:
            return cast("Bound | None", fixed)
        spec = self.catalog.spec(str(params.get("model") or ""))
        if spec.prices is None:
            return self._keep(key, None)
        n = _n(params)
        worst: Bound | None = None
        published = True  # every choice's bound is a published count: no answer changes it
        for quality, size in self._choices(params):
            per_image = self._output_bound(spec, params, quality, size, book)
            if per_image is None:
                return None
            tokens, basis = per_image
            published = published and basis == "published"
            cost = self._cost(spec, text, image, tokens * n, quality, size, n)
            if cost is None:
                return None
            if worst is None or cost > worst.cost_usd:
                worst = Bound(cost, basis)
        return self._keep(key, worst) if published else worst

    def _keep(self, key: tuple[Any, ...], value: _Fixed) -> _Fixed:
        """Remember an estimate or bound no answer can change (see `_fixed`)."""
        if len(self._fixed) > 4096:
            self._fixed.clear()
        self._fixed[key] = value
        return value

    def _resolved(self, params: Mapping[str, Any]) -> tuple[str, str]:
        """The quality and size a request will most likely be answered at (once per shape)."""
        return specs.per_shape(_likely, params, self.catalog)

    def _choices(self, params: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
        """Every (quality, size) a request may be answered at (`auto` as each it may become)."""
        return specs.per_shape(_choices, params, self.catalog)

    def worst_case_usd(
        self, params: Mapping[str, Any], image_tokens: int = 0, book: TokenBook | None = None
    ) -> float | None:
        bound = self.worst_case(params, image_tokens, book)
        return None if bound is None else bound.cost_usd

    def _output_bound(
        self,
        spec: ModelSpec,
        params: Mapping[str, Any],
        quality: str,
        size: str,
        book: TokenBook | None,
    ) -> tuple[int, Literal["published", "learned", "ceiling"]] | None:
        """Output tokens one image can use at most, and what says so (`params` as asked:
        `quality` and `size` are the choice weighed)."""
        published = self._published_output(spec, quality, size)
        if published is not None:
            return published, "published"
        choice = {**params, "quality": quality, "size": size}
        learned: Learned | None = None
        if book is not None:
            learned = book.get(request_group(choice, self.catalog))
        ceiling = self.ceiling(spec, choice, quality, size)
        if learned is not None and learned.samples:
            bound = int(learned.high * (1 + LEARNED_MARGIN)) + 1
            if ceiling is not None and learned.high <= ceiling and ceiling < bound:
                return ceiling, "ceiling"
            return bound, "learned"
        return (ceiling, "ceiling") if ceiling is not None else None

    def output_ceiling(self, params: Mapping[str, Any]) -> int | None:
        """The most output tokens the catalog allows the whole request (every image, the
        dearest of its `auto` choices), from published counts or ceilings; None if unknown."""
        key = specs.request_shape(params)
        if key not in self._ceilings:
            if len(self._ceilings) > 4096:
                self._ceilings.clear()
            self._ceilings[key] = self._output_ceiling(params)
        return self._ceilings[key]

    def _output_ceiling(self, params: Mapping[str, Any]) -> int | None:
        spec = self.catalog.spec(str(params.get("model") or ""))
        most = 0
        for quality in specs.quality_choices(params, self.catalog):
            for size in specs.size_choices(params, self.catalog):
                choice = {**params, "quality": quality, "size": size}
                per_image = self._published_output(spec, quality, size)
                if per_image is None:
                    per_image = self.ceiling(spec, choice, quality, size)
                if per_image is None:
                    return None
                most = max(most, per_image)
        return most * _n(params)

    def ceiling(
        self, spec: ModelSpec, params: Mapping[str, Any], quality: str, size: str
    ) -> int | None:
        """The catalog's bound on one image's output tokens: its tokens per megapixel for the
        quality, times the pixels drawn (a gif's whole frame sheet), never less than one
        megapixel (counts do not shrink in proportion with small images)."""
        per_mp = spec.tokens.ceiling_for(quality)
        if per_mp is None or not specs.is_size(size):
            return None
        megapixels = specs.megapixels(size)
        frames = specs.resolved_frames(params, self.catalog)
        if frames:
            constraint = spec.formats.get(specs.output_format(params, self.catalog))
            cells = constraint.sheet.cells(frames) if constraint and constraint.sheet else None
            megapixels *= cells[0] * cells[1] if cells else frames
        return int(per_mp * max(1.0, megapixels)) + 1

    def _published_output(self, spec: ModelSpec, quality: str, size: str) -> int | None:
        """Output tokens per image known in advance (table, or per-image price), else None."""
        rule = spec.tokens
        if rule.output == "table":
            return rule.per_image.get((quality, size))
        if rule.output in ("per_image_price", "none") and spec.prices is not None:
            per_image = spec.prices.per_image.get((quality, size))
            if per_image is None:
                return None
            rates = spec.prices.per_1m_tokens
            # The price covers the output: express it in output tokens where there is a rate.
            rate = rates["image_out"] if rates else 0.0
            return round(per_image / (rate / 1e6)) if rate > 0 else 0
        return None

    def _cost(
        self,
        spec: ModelSpec,
        text: int,
        image: int,
        output: int,
        quality: str,
        size: str,
        n: int,
    ) -> float | None:
        prices = spec.prices
        if prices is None:
            return None
        per_image = prices.per_image.get((quality, size))
        rates = _rates(prices.per_1m_tokens) if prices.per_1m_tokens is not None else None
        if per_image is not None:  # per-image price known: it covers the output
            usd = per_image * n
            if rates is not None:
                usd += (text * rates.text_in + image * rates.image_in) / 1e6
            return round(usd * self.multiplier, 8)
        if rates is None:
            return None
        usd = text * rates.text_in + image * rates.image_in + output * rates.image_out
        return round(usd * self.multiplier / 1_000_000, 8)


class _Rates(NamedTuple):
    """Per-1M-token rates, with one rule for the ones a table leaves out: cached text at the
    text rate, input images at the text rate (the ledger and the cap price alike)."""

    text_in: float
    text_in_cached: float
    image_in: float
    image_out: float

    @classmethod
    def of(cls, table: Mapping[str, float]) -> _Rates:
        text = table["text_in"]
        return cls(text, table.get("text_in_cached", text), table.get("image_in", text),
                   table["image_out"])  # fmt: skip


#: Each price table's rates, as read once: tables live as long as their catalog, which is kept
#: in the value so its id cannot be reused while the entry stands.
_RATES: dict[int, tuple[Mapping[str, float], _Rates]] = {}


def _rates(table: Mapping[str, float]) -> _Rates:
    found = _RATES.get(id(table))
    if found is not None and found[0] is table:
        return found[1]
    rates = _Rates.of(table)
    if len(_RATES) > 1024:
        _RATES.clear()
    _RATES[id(table)] = (table, rates)
    return rates


def _likely(params: Mapping[str, Any], catalog: Catalog) -> tuple[str, str]:
    return specs.resolved_quality(params, catalog), specs.resolved_size(params, catalog)


def _choices(params: Mapping[str, Any], catalog: Catalog) -> tuple[tuple[str, str], ...]:
    return tuple(
        (quality, size)
        for quality in specs.quality_choices(params, catalog)
        for size in specs.size_choices(params, catalog)
    )


def _n(params: Mapping[str, Any]) -> int:
    n = params.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def __getattr__(name: str) -> Any:
    if name == "PRICE_TABLE":  # the built-in catalog's name: read when asked for, not at import
        return Catalog.default().name
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def usage_cost_usd(model: str, usage: Any) -> float | None:
    """Cost of one answer from its `usage`, with the built-in catalog."""
    return PriceTable.default().usage_cost(model, usage)


def request_cost_usd(params: Mapping[str, Any], usage: Any) -> float | None:
    """Cost of one answered request with the built-in catalog."""
    return PriceTable.default().request_cost(params, usage)
