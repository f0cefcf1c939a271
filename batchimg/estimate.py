"""`batchimg estimate`: what a manifest will cost, without sending anything.

gpt-image output tokens are fixed by quality and size, and the input is the prompt (and, for
edits, the input images), so the cost of a run can be known before it starts. Every line goes
through the same loader and the same price table as a real run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import specs
from .manifest import BadLine, Defaults, read_manifest
from .pricing import PriceTable


@dataclass
class EstimateGroup:
    """Totals for one (model, size, quality)."""

    model: str
    size: str
    quality: str
    items: int = 0
    images: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = 0.0  # None: the price table does not know this model


@dataclass
class ManifestEstimate:
    """The whole manifest: groups and totals (unpriced groups are left out of the cost)."""

    price_table: str
    items: int = 0
    images: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_cost_usd: float = 0.0
    unpriced_items: int = 0
    bad_lines: int = 0
    groups: dict[tuple[str, str, str], EstimateGroup] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "price_table": self.price_table,
            "items": self.items,
            "images": self.images,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_cost_usd": round(self.total_cost_usd, 6),
            "unpriced_items": self.unpriced_items,
            "bad_lines": self.bad_lines,
            "groups": [
                {**vars(g), "cost_usd": None if g.cost_usd is None else round(g.cost_usd, 6)}
                for g in self.groups.values()
            ],
        }


def estimate_manifest(
    path: str | Path, defaults: Defaults | None = None, prices: PriceTable | None = None
) -> ManifestEstimate:
    """Price every valid line of a manifest (streamed); bad lines are only counted."""
    prices = prices or PriceTable.default()
    result = ManifestEstimate(price_table=prices.name)
    for entry in read_manifest(path, defaults):
        if isinstance(entry, BadLine):
            result.bad_lines += 1
            continue
        params = entry.params
        key = (entry.model, specs.resolved_size(params), specs.resolved_quality(params))
        group = result.groups.get(key)
        if group is None:
            group = result.groups[key] = EstimateGroup(*key)
        estimate = prices.estimate(params, entry.image_tokens)
        group.items += 1
        group.images += estimate.images
        group.input_tokens += estimate.input_tokens
        group.output_tokens += estimate.output_tokens
        result.items += 1
        result.images += estimate.images
        result.input_tokens += estimate.input_tokens
        result.output_tokens += estimate.output_tokens
        if estimate.cost_usd is None:
            group.cost_usd = None
            result.unpriced_items += 1
        else:
            if group.cost_usd is not None:
                group.cost_usd += estimate.cost_usd
            result.total_cost_usd += estimate.cost_usd
    return result


def format_table(estimate: ManifestEstimate) -> str:
    """The estimate as a table a person reads."""
    header = ("model", "size", "quality", "items", "images", "in tokens", "out tokens", "cost")
    rows = [
        (g.model, g.size, g.quality, f"{g.items:,}", f"{g.images:,}", f"{g.input_tokens:,}",
         f"{g.output_tokens:,}", "unpriced" if g.cost_usd is None else f"${g.cost_usd:,.4f}")
        for g in sorted(estimate.groups.values(), key=lambda g: (g.model, g.size, g.quality))
    ]  # fmt: skip
    total = (
        "total", "", "", f"{estimate.items:,}", f"{estimate.images:,}",
        f"{estimate.input_tokens:,}", f"{estimate.output_tokens:,}",
        f"${estimate.total_cost_usd:,.4f}",
    )  # fmt: skip
    lines = render_rows(header, [*rows, total], numeric_from=3)
    notes = [f"prices: {estimate.price_table}"]
    if estimate.unpriced_items:
        notes.append(
            f"{estimate.unpriced_items} items use models the price table does not know "
            "(not in the total; add them with --prices)"
        )
    if estimate.bad_lines:
        notes.append(f"{estimate.bad_lines} bad lines skipped (batchimg validate lists them)")
    return "\n".join(lines + notes)


def render_rows(
    header: tuple[str, ...], rows: list[tuple[str, ...]], numeric_from: int
) -> list[str]:
    """Align columns (numbers to the right) with a rule under the header and above the last row."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        cells = [
            cell.rjust(width) if i >= numeric_from else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return [fmt(header), rule, *(fmt(r) for r in rows[:-1]), rule, fmt(rows[-1])]
