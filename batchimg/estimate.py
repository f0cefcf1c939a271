"""`batchimg estimate`: what a manifest will cost, without sending anything.

Every line goes through the same loader and the same prices as a real run. A request's cost
is its input (the prompt, and for edits the input images) plus its output tokens, which are
known in advance only where they are published (gpt-image-1 and 1.5's table, per-image prices
of gpt-image-1-mini and DALL·E). For gpt-image-2 and later nobody publishes them: with
`--from-ledger DIR...` they are learned from earlier runs' answers per group of requests that
should cost alike (model, size, quality, output format, complexity, frames), and the estimate
says so (the mean, with the least and most seen); a group with no answers to learn from is
unknown, shown with the cap's upper bound (the catalog's ceiling) rather than a made-up number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalog import Catalog
from .manifest import BadLine, Defaults, read_manifest
from .pricing import PriceTable
from .stores.remote import shown_ledger
from .tokens import GroupKey, TokenBook, request_group


@dataclass
class EstimateGroup:
    """Totals for one (model, size, quality, output format, complexity, frames)."""

    model: str
    size: str
    quality: str
    output_format: str
    complexity: str | None
    frames: int | None
    basis: str = "published"  # published | learned | unknown
    samples: int = 0  # learned: answers the figure comes from
    items: int = 0
    images: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    output_low: int = 0
    output_high: int = 0
    cost_usd: float | None = 0.0  # None: unknown (no token count) or unpriced (no prices)
    cost_low_usd: float = 0.0
    cost_high_usd: float = 0.0
    max_usd: float | None = 0.0  # unknown groups: the most they can cost (None: no bound)
    unpriced: bool = False
    batchable: bool = True  # the catalog says the model takes the Batch API
    batch_multiplier: float = 0.5  # what the Batch API charges of the price (the catalog's)

    @property
    def batch_cost_usd(self) -> float | None:
        """The same requests through the Batch API (None: not batchable, or no figure)."""
        if not self.batchable or self.cost_usd is None or self.basis == "unknown":
            return None
        return self.cost_usd * self.batch_multiplier

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "model": self.model,
            "size": self.size,
            "quality": self.quality,
            "output_format": self.output_format,
            "complexity": self.complexity,
            "frames": self.frames,
            "basis": self.basis,
            "samples": self.samples,
            "items": self.items,
            "images": self.images,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens if self.basis != "unknown" else None,
            "cost_usd": None if self.cost_usd is None else round(self.cost_usd, 6),
            "batch_cost_usd": None
            if self.batch_cost_usd is None
            else round(self.batch_cost_usd, 6),
            "batchable": self.batchable,
            "unpriced": self.unpriced,
        }
        if self.basis == "learned":
            data["output_tokens_range"] = [self.output_low, self.output_high]
            data["cost_range_usd"] = (
                None
                if self.cost_usd is None
                else [round(self.cost_low_usd, 6), round(self.cost_high_usd, 6)]
            )
        if self.basis == "unknown":
            data["max_usd"] = None if self.max_usd is None else round(self.max_usd, 6)
        return data


@dataclass
class ManifestEstimate:
    """The whole manifest: groups and totals (unknown and unpriced groups are left out of the
    cost, and counted)."""

    price_table: str
    items: int = 0
    images: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    total_cost_usd: float = 0.0
    cost_low_usd: float = 0.0
    cost_high_usd: float = 0.0
    unpriced_items: int = 0
    unknown_items: int = 0
    unknown_max_usd: float | None = 0.0  # the most the unknown groups can cost (None: no bound)
    bad_lines: int = 0
    learned_from: list[str] = field(default_factory=list)
    learned_groups: int = 0
    warnings: list[str] = field(default_factory=list)
    groups: dict[GroupKey, EstimateGroup] = field(default_factory=dict)
    batch_cost_usd: float = 0.0  # the priced total, through the Batch API where it can go
    not_batchable_items: int = 0  # of the priced total: items whose model the Batch API refuses

    def as_json(self) -> dict[str, Any]:
        return {
            "price_table": self.price_table,
            "items": self.items,
            "images": self.images,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "total_cost_usd": round(self.total_cost_usd, 6),
            "batch_total_cost_usd": round(self.batch_cost_usd, 6),
            "not_batchable_items": self.not_batchable_items,
            "cost_range_usd": [round(self.cost_low_usd, 6), round(self.cost_high_usd, 6)],
            "unpriced_items": self.unpriced_items,
            "unknown_items": self.unknown_items,
            "unknown_max_usd": None
            if self.unknown_max_usd is None
            else round(self.unknown_max_usd, 6),
            "bad_lines": self.bad_lines,
            "learned_from": self.learned_from,
            "learned_groups": self.learned_groups,
            "warnings": self.warnings,
            "groups": [g.as_json() for g in self.groups.values()],
        }


def ledger_files(targets: Sequence[str | Path]) -> list[Path]:
    """Each target is a run's output directory or a ledger file (UsageError if neither)."""
    from .report import ledger_paths

    return ledger_paths(targets)


def estimate_manifest(
    path: str | Path,
    defaults: Defaults | None = None,
    prices: PriceTable | None = None,
    *,
    catalog: Catalog | None = None,
    ledgers: Sequence[str | Path] = (),
    inputs_dir: Path | None = None,
) -> ManifestEstimate:
    """Price every valid line of a manifest (streamed); bad lines are only counted. `ledgers`:
    earlier runs to learn output tokens from."""
    catalog = catalog or (prices.catalog if prices is not None else Catalog.default())
    table = PriceTable(catalog)
    paths = ledger_files(ledgers)
    book = TokenBook.from_ledgers(paths, catalog)
    result = ManifestEstimate(
        price_table=table.name,
        learned_from=[shown_ledger(p) for p in paths],
        learned_groups=len(book),
    )
    entries = read_manifest(
        path, defaults, catalog=catalog, warn=result.warnings.append, inputs_dir=inputs_dir
    )
    for entry in entries:
        if isinstance(entry, BadLine):
            result.bad_lines += 1
            continue
        params = entry.params
        key = request_group(params, catalog)._replace(model=entry.model)  # as the line names it
        estimate = table.estimate(params, entry.image_tokens, book)
        group = result.groups.get(key)
        if group is None:
            batchable = "batch" in catalog.spec(entry.model).endpoints
            group = result.groups[key] = EstimateGroup(
                *key,
                basis=estimate.basis,
                batchable=batchable,
                batch_multiplier=catalog.batch_multiplier,
            )
        group.samples = max(group.samples, estimate.samples)
        group.items += 1
        group.images += estimate.images
        group.input_tokens += estimate.input_tokens
        result.items += 1
        result.images += estimate.images
        result.input_tokens += estimate.input_tokens
        if table.prices(entry.model) is None:
            group.unpriced = True
            group.cost_usd = None
            result.unpriced_items += 1
            continue
        if estimate.basis == "unknown":
            bound = table.worst_case_usd(params, entry.image_tokens)
            group.cost_usd = None
            group.max_usd = (
                None if bound is None or group.max_usd is None else group.max_usd + bound
            )
            result.unknown_max_usd = (
                None
                if bound is None or result.unknown_max_usd is None
                else result.unknown_max_usd + bound
            )
            result.unknown_items += 1
            continue
        low, high = estimate.output_range or (estimate.output_tokens, estimate.output_tokens)
        cost_low, cost_high = estimate.cost_range_usd or (estimate.cost_usd, estimate.cost_usd)
        group.output_tokens += estimate.output_tokens
        group.output_low += low
        group.output_high += high
        result.output_tokens += estimate.output_tokens
        if estimate.cost_usd is None or cost_low is None or cost_high is None:
            group.cost_usd = None  # a size or quality with no published price
            result.unpriced_items += 1
            continue
        if group.cost_usd is not None:
            group.cost_usd += estimate.cost_usd
        group.cost_low_usd += cost_low
        group.cost_high_usd += cost_high
        result.total_cost_usd += estimate.cost_usd
        if group.batchable:
            result.batch_cost_usd += estimate.cost_usd * catalog.batch_multiplier
        else:  # counted at the online price: it cannot go by batch
            result.batch_cost_usd += estimate.cost_usd
            result.not_batchable_items += 1
        result.cost_low_usd += cost_low
        result.cost_high_usd += cost_high
    return result


def _cost_cell(group: EstimateGroup, times: float = 1.0) -> str:
    """A group's cost for the table (`times`: the Batch API's share of the price)."""
    if group.unpriced:
        return "unpriced"
    if group.basis == "unknown":
        return "unknown" if group.max_usd is None else f"<= ${group.max_usd * times:,.4f}"
    if group.cost_usd is None:
        return "unpriced"
    low, high = group.cost_low_usd * times, group.cost_high_usd * times
    if group.basis == "learned":
        spread = f"{low:,.4f}" != f"{high:,.4f}"
        span = f" (${low:,.4f}-{high:,.4f})" if spread else ""
        return f"~${group.cost_usd * times:,.4f}{span}"
    return f"${group.cost_usd * times:,.4f}"


def _batch_cell(group: EstimateGroup) -> str:
    return _cost_cell(group, group.batch_multiplier) if group.batchable else "no batch"


def format_table(estimate: ManifestEstimate) -> str:
    """The estimate as a table a person reads."""
    groups = sorted(
        estimate.groups.values(),
        key=lambda g: (
            g.model,
            g.size,
            g.quality,
            g.output_format,
            str(g.complexity),
            g.frames or 0,
        ),
    )
    extra = any(g.complexity for g in groups) or any(g.frames for g in groups)
    head: tuple[str, ...] = ("model", "size", "quality", "format")
    if extra:
        head += ("complexity", "frames")
    header = (*head, "items", "images", "in tokens", "out tokens", "cost", "batch cost",
              "tokens from")  # fmt: skip
    rows = []
    for g in groups:
        key: tuple[str, ...] = (g.model, g.size, g.quality, g.output_format)
        if extra:
            key += (g.complexity or "-", str(g.frames or "-"))
        out = "?" if g.basis == "unknown" else f"{g.output_tokens:,}"
        basis = f"learned ({g.samples})" if g.basis == "learned" else g.basis
        rows.append(
            (
                *key,
                f"{g.items:,}",
                f"{g.images:,}",
                f"{g.input_tokens:,}",
                out,
                _cost_cell(g),
                _batch_cell(g),
                basis,
            )
        )
    total_cost = f"${estimate.total_cost_usd:,.4f}"
    if estimate.cost_high_usd - estimate.cost_low_usd > 1e-9:
        total_cost += f" (${estimate.cost_low_usd:,.4f}-{estimate.cost_high_usd:,.4f})"
    total = (
        "total", *("",) * (len(head) - 1), f"{estimate.items:,}", f"{estimate.images:,}",
        f"{estimate.input_tokens:,}", f"{estimate.output_tokens:,}", total_cost,
        f"${estimate.batch_cost_usd:,.4f}", "",
    )  # fmt: skip
    lines = render_rows(header, [*rows, total], numeric_from=len(head))
    notes = [f"prices: {estimate.price_table}; batch cost: the same through the Batch API "
             "(`run --batch-api`, answered within 24 h)"]  # fmt: skip
    if estimate.not_batchable_items:
        notes.append(f"{estimate.not_batchable_items} items use models the Batch API does not "
                     "take: the batch total counts them at the online price")  # fmt: skip
    if estimate.learned_from:
        notes.append(
            f"learned {estimate.learned_groups} groups from {', '.join(estimate.learned_from)}"
        )
    if estimate.unknown_items:
        bound = (
            f"up to ${estimate.unknown_max_usd:,.4f} more"
            if estimate.unknown_max_usd is not None
            else "no upper bound known"
        )
        notes.append(
            f"{estimate.unknown_items} items have output tokens nobody publishes and no earlier "
            f"answers to learn from (not in the total: {bound}); run a sample and pass its "
            "output directory with --from-ledger"
        )
    if estimate.unpriced_items:
        notes.append(
            f"{estimate.unpriced_items} items use models or sizes the catalog has no price for "
            "(not in the total; add them with --catalog or --prices)"
        )
    if estimate.bad_lines:
        notes.append(f"{estimate.bad_lines} bad lines skipped (batchimg validate lists them)")
    notes.extend(f"warning: {w}" for w in estimate.warnings)
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
