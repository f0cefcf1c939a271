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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalog import Catalog
from .defaults import Defaults
from .manifest import Refusal, Shape, Surveyed, survey_manifest
from .pricing import Estimate, PriceTable
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
    entries = survey_manifest(
        path, defaults, catalog=catalog, warn=result.warnings.append, inputs_dir=inputs_dir
    )
    _Tally(result, table, book).count(entries)
    return result


_UNPRICED, _UNKNOWN, _NO_COST, _PRICED = range(4)  # what a line adds to (see `_Tally`)


class _Sums:
    """A group's sums of money, added up line by line (see `_Tally`)."""

    __slots__ = ("cost", "high", "low", "max_usd", "no_cost", "ranged")

    def __init__(self) -> None:
        self.cost = 0.0  # every priced line's cost, also once cost_usd is None (`no_cost`)
        self.low = self.high = 0.0  # kept apart from `cost` once `ranged`
        self.ranged = False
        self.no_cost = False  # a line without a cost came: the group's cost_usd is None
        self.max_usd: float | None = 0.0


class _Line:
    """What one line adds: lines of one shape whose prompts have as many bytes (and, for
    edits, inputs as many tokens) add the same, so they are priced once and counted."""

    __slots__ = ("batch_cost", "bound", "cost", "count", "estimate", "group", "kind", "range",
                 "spread", "sums")  # fmt: skip

    def __init__(self, group: EstimateGroup, sums: _Sums, estimate: Estimate, kind: int) -> None:
        self.group = group
        self.sums = sums
        self.estimate = estimate
        self.kind = kind
        self.count = 0  # lines not yet folded into the counts
        self.bound: float | None = None  # _UNKNOWN: the most the line can cost
        self.cost = estimate.cost_usd or 0.0
        self.range = estimate.cost_range_usd or (self.cost, self.cost)
        self.spread = self.range != (self.cost, self.cost)  # a learned figure's low and high
        self.batch_cost = self.cost * group.batch_multiplier if group.batchable else self.cost


class _Tally:
    """Adds priced lines up to exactly what pricing them one by one gives: each distinct line
    is priced once and its counts multiplied out (`_fold`), while sums of money are added per
    line, in order, as floating point needs to come out the same to the last bit. A cost's low
    and high sums are the cost's own until a line with a range (a learned figure) comes."""

    _MAX_LINES = 65536  # distinct lines held before their counts are folded in

    def __init__(self, result: ManifestEstimate, table: PriceTable, book: TokenBook) -> None:
        self.result = result
        self.table = table
        self.book = book
        self.lines: dict[tuple[Shape, int, int], _Line] = {}
        self.sums: dict[GroupKey, _Sums] = {}
        self.low = self.high = 0.0  # the result's, kept apart from its cost once `ranged`
        self.ranged = False

    def count(self, entries: Iterable[Refusal | Surveyed]) -> None:
        """Add up a manifest's lines (bad ones are only counted)."""
        lines, result = self.lines, self.result
        total = batch = 0.0  # the result's sums, kept here while they grow
        most: float | None = 0.0  # the most the unknown lines can cost (None: no bound)
        for entry in entries:
            if isinstance(entry, Refusal):
                result.bad_lines += 1
                continue
            shape, prompt, image_tokens = entry
            # A prompt's cost depends only on its UTF-8 length (an ASCII one's: its length).
            size = len(prompt) if prompt.isascii() else len(prompt.encode("utf-8"))
            line = lines.get((shape, size, image_tokens))
            if line is None:
                line = lines[shape, size, image_tokens] = self._price(shape, prompt, image_tokens)
            line.count += 1
            if line.kind == _PRICED:
                if line.spread or self.ranged:
                    self._add_range(line, total)
                line.sums.cost += line.cost
                total += line.cost
                batch += line.batch_cost
            elif line.kind == _UNKNOWN:
                bound, sums = line.bound, line.sums
                sums.max_usd = (
                    None if bound is None or sums.max_usd is None else sums.max_usd + bound
                )
                most = None if bound is None or most is None else most + bound
        self._fold()
        result.total_cost_usd = total
        result.batch_cost_usd = batch
        result.cost_low_usd = self.low if self.ranged else total
        result.cost_high_usd = self.high if self.ranged else total
        result.unknown_max_usd = most
        for key, sums in self.sums.items():
            group = result.groups[key]
            group.cost_usd = None if sums.no_cost else sums.cost
            group.cost_low_usd = sums.low if sums.ranged else sums.cost
            group.cost_high_usd = sums.high if sums.ranged else sums.cost
            group.max_usd = sums.max_usd

    def _add_range(self, line: _Line, total: float) -> None:
        """Low and high sums apart from the cost's, from the first line with a range on
        (`total`: the cost's sum before this line)."""
        low, high = line.range
        sums = line.sums
        if not sums.ranged:
            sums.low = sums.high = sums.cost
            sums.ranged = True
        if not self.ranged:
            self.low = self.high = total
            self.ranged = True
        sums.low += low
        sums.high += high
        self.low += low
        self.high += high

    def _price(self, shape: Shape, prompt: str, image_tokens: int) -> _Line:
        if len(self.lines) >= self._MAX_LINES:
            self._fold()
            self.lines.clear()
        table, catalog, result = self.table, self.table.catalog, self.result
        params = shape.request(prompt)
        model = str(params["model"])
        key = request_group(params, catalog)._replace(model=model)  # as the line names it
        estimate = table.estimate(params, image_tokens, self.book)
        group = result.groups.get(key)
        if group is None:
            group = result.groups[key] = EstimateGroup(
                *key,
                basis=estimate.basis,
                batchable="batch" in catalog.spec(model).endpoints,
                batch_multiplier=catalog.batch_multiplier,
            )
            self.sums[key] = _Sums()
        sums = self.sums[key]
        if table.prices(model) is None:
            group.unpriced = True
            sums.no_cost = True
            return _Line(group, sums, estimate, _UNPRICED)
        if estimate.basis == "unknown":
            sums.no_cost = True
            line = _Line(group, sums, estimate, _UNKNOWN)
            line.bound = table.worst_case_usd(params, image_tokens)
            return line
        if estimate.cost_usd is None:
            sums.no_cost = True  # a size or quality with no published price
            return _Line(group, sums, estimate, _NO_COST)
        return _Line(group, sums, estimate, _PRICED)

    def _fold(self) -> None:
        """Multiply out the counts of the lines priced so far."""
        result = self.result
        for line in self.lines.values():
            count, estimate, group = line.count, line.estimate, line.group
            line.count = 0
            group.samples = max(group.samples, estimate.samples)
            group.items += count
            group.images += count * estimate.images
            group.input_tokens += count * estimate.input_tokens
            result.items += count
            result.images += count * estimate.images
            result.input_tokens += count * estimate.input_tokens
            if line.kind == _UNPRICED:
                result.unpriced_items += count
                continue
            if line.kind == _UNKNOWN:
                result.unknown_items += count
                continue
            low, high = estimate.output_range or (estimate.output_tokens, estimate.output_tokens)
            group.output_tokens += count * estimate.output_tokens
            group.output_low += count * low
            group.output_high += count * high
            result.output_tokens += count * estimate.output_tokens
            if line.kind == _NO_COST:
                result.unpriced_items += count
            elif not group.batchable:  # counted at the online price: it cannot go by batch
                result.not_batchable_items += count


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
