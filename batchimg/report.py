"""`batchimg report`: what a run (or many) produced and cost, from its ledgers alone.

Ledgers are read backwards, newest file first, in blocks: the first record met for an id is its
last state, which counts its item (ok or failed, images, latency); every billed answer counts its
tokens and cost once (deduplicated by request id, so a ledger given twice is not billed twice).
Memory holds the groups and two compact id sets, not the records. `--prices` reprices every
record from its verbatim `usage`.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from ._idset import IdSet, count_lines
from .errors import UsageError
from .estimate import render_rows
from .ledger import LEDGER_NAME, LedgerRecord, amount, is_state, parse_record, unsettled_sends
from .pricing import PriceTable, input_bound
from .stores import is_url, local_path
from .stores.remote import fetched_ledger
from .usage import UsageProblem, read_usage

GROUP_FIELDS = (
    "model", "size", "quality", "output_format", "complexity", "frame_count", "status",
    "endpoint", "day", "via", "route",
)  # fmt: skip
_BUCKET = math.log(1.02)  # latency histogram: 2 % wide buckets, so p95 is within 2 %


def ledger_paths(targets: Sequence[str | Path]) -> list[Path]:
    """Each target is a run's output directory or a ledger file, or an output URL (its ledger
    is read from the bucket into a local file, once per process); UsageError if neither."""
    paths = []
    for given in targets:
        if is_url(given):
            paths.append(fetched_ledger(str(given)))
            continue
        target = local_path(given)
        path = target / LEDGER_NAME if target.is_dir() else target
        if not path.is_file():
            raise UsageError(f"no ledger at {str(path)!r} (give an output directory or a file)")
        paths.append(path)
    return paths


def read_backwards(path: Path, block_size: int = 1 << 16) -> Iterator[LedgerRecord]:
    """The whole records of a ledger, last line first; torn or garbled lines are skipped.

    Only what ends in a newline is a line: a torn tail (however long) is skipped first, read
    backwards block by block, never held whole.
    """
    with open(path, "rb") as fh:
        position = _last_newline(fh, fh.seek(0, os.SEEK_END), block_size)
        pending = b""  # the end of a line that starts in an earlier block
        while position > 0:
            start = max(0, position - block_size)
            fh.seek(start)
            lines = (fh.read(position - start) + pending).split(b"\n")
            position = start
            pending = lines.pop(0)
            yield from _parse_lines(reversed(lines))
        yield from _parse_lines([pending])


def _last_newline(fh: BinaryIO, end: int, block_size: int) -> int:
    """Where the last whole line ends (just before its newline); 0 if there is none."""
    position = end
    while position > 0:
        start = max(0, position - block_size)
        fh.seek(start)
        index = fh.read(position - start).rfind(b"\n")
        if index >= 0:
            return start + index
        position = start
    return 0


def _parse_lines(lines: Any) -> Iterator[LedgerRecord]:
    for line in lines:
        record = parse_record(line) if line.strip() else None
        if record is not None:
            yield record


@dataclass
class Group:
    """Totals for one group of records (or for all of them)."""

    key: dict[str, Any]
    items: int = 0
    ok: int = 0
    failed: int = 0
    images: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0
    unpriced_extra: int = 0  # answers whose extra usage (svg_usage) no price covers
    unknown_costs: int = 0  # lines billed (or maybe billed) at a cost nobody can tell ...
    cost_bound_usd: float = 0.0  # ... and the bounds they were counted at
    unreadable_usage: int = 0  # lines whose usage is not a set of token counts
    failures: Counter[str] = field(default_factory=Counter)
    latency_sum_s: float = 0.0
    latency_count: int = 0
    latency_buckets: Counter[int] = field(default_factory=Counter)
    first_started: datetime | None = None
    last_finished: datetime | None = None

    def add_item(self, record: LedgerRecord) -> None:
        """The record is its id's last state."""
        self.items += 1
        if record.get("status") == "ok":
            self.ok += 1
            files = record.get("files")
            if isinstance(files, list):
                self.images += len(files)
            latency = record.get("latency_s")
            if isinstance(latency, (int, float)) and 0 < latency < math.inf:
                self.latency_sum_s += latency
                self.latency_count += 1
                self.latency_buckets[math.floor(math.log(latency) / _BUCKET)] += 1
        else:
            self.failed += 1
            error: Any = record.get("error")
            code = error.get("code") if isinstance(error, dict) else None
            self.failures[str(code or "error")] += 1
        started, finished = _time(record.get("started_at")), _time(record.get("finished_at"))
        if started is not None and (self.first_started is None or started < self.first_started):
            self.first_started = started
        if finished is not None and (self.last_finished is None or finished > self.last_finished):
            self.last_finished = finished

    def add_billing(self, record: LedgerRecord, cost: float | None) -> None:
        """A line's money (an item's, or a charge of its own): its tokens where its usage can be
        read, its cost where known, else its bound where it was (or may have been) billed."""
        usage = record.get("usage")
        self.unpriced_extra += isinstance(record.get("extra_usage"), dict)
        counts = read_usage(usage)
        if not isinstance(counts, UsageProblem):
            self.input_tokens += counts.input
            self.output_tokens += counts.output
        elif usage is not None:
            self.unreadable_usage += 1
        if cost is not None:
            self.cost_usd += cost
        elif record.get("cost_note") is not None or (
            usage is not None and isinstance(counts, UsageProblem)
        ):
            self.unknown_costs += 1  # billed at a cost nobody can tell: its bound, if any
            self.cost_bound_usd += amount(record.get("cost_bound_usd")) or 0.0
        elif usage is not None or record.get("files"):
            self.unpriced += 1

    def latency_p95_s(self) -> float | None:
        if not self.latency_count:
            return None
        rank = math.ceil(0.95 * self.latency_count)
        seen = 0
        for bucket in sorted(self.latency_buckets):
            seen += self.latency_buckets[bucket]
            if seen >= rank:
                return math.exp((bucket + 0.5) * _BUCKET)  # the bucket's middle
        return None

    def images_per_minute(self) -> float | None:
        if not (self.first_started and self.last_finished and self.images):
            return None
        span_s = (self.last_finished - self.first_started).total_seconds()
        return self.images / (span_s / 60) if span_s > 0 else None

    def as_json(self) -> dict[str, Any]:
        p95 = self.latency_p95_s()
        per_min = self.images_per_minute()
        return {
            **({"key": self.key} if self.key else {}),
            "items": self.items,
            "ok": self.ok,
            "failed": self.failed,
            "images": self.images,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "unpriced_answers": self.unpriced,
            "unpriced_extra_usage": self.unpriced_extra,
            "unknown_cost_answers": self.unknown_costs,
            "unknown_cost_bound_usd": round(self.cost_bound_usd, 6),
            "unreadable_usage": self.unreadable_usage,
            "failures": dict(self.failures),
            "latency_avg_s": round(self.latency_sum_s / self.latency_count, 4)
            if self.latency_count
            else None,
            "latency_p95_s": round(p95, 4) if p95 is not None else None,
            "images_per_minute": round(per_min, 2) if per_min is not None else None,
        }


def _time(stamp: object) -> datetime | None:
    """A line's timestamp (ISO 8601, UTC where it names no zone); None if it is not one."""
    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def group_value(record: LedgerRecord, name: str) -> Any:
    """The value a record has for a `--by` field (`day`, `metadata.KEY`, or a ledger field)."""
    if name == "day":
        finished = record.get("finished_at")
        return finished[:10] if isinstance(finished, str) else None
    if name.startswith("metadata."):
        metadata = record.get("metadata")
        value = metadata.get(name.split(".", 1)[1]) if isinstance(metadata, dict) else None
        return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
    if name == "via":  # lines from before the Batch API were all sent online
        return record.get("via") or "online"
    if name == "route":  # one endpoint (no `--endpoints`): the run's own
        return record.get("route") or "-"
    return record.get(name)


def check_group_fields(by: Sequence[str]) -> None:
    for name in by:
        if name not in GROUP_FIELDS and not (name.startswith("metadata.") and len(name) > 9):
            allowed = ", ".join((*GROUP_FIELDS, "metadata.KEY"))
            raise UsageError(f"cannot group by {name!r}: choose from {allowed}")


@dataclass
class Report:
    price_table: str | None
    total: Group
    groups: dict[tuple[Any, ...], Group]
    by: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        total = self.total.as_json()
        total["total_cost_usd"] = total.pop("cost_usd")
        return {
            "price_table": self.price_table,
            **total,
            "groups": [g.as_json() for g in self.groups.values()],
        }


def build_report(
    targets: Sequence[str | Path], by: Sequence[str] = (), prices: PriceTable | None = None
) -> Report:
    """Read ledgers (a later target wins for the same id) into totals and groups."""
    check_group_fields(by)
    paths = ledger_paths(targets)
    records = sum(count_lines(path) for path in paths)
    seen_ids, seen_answers = IdSet(records), IdSet(records)
    # Requests a dead run left in flight: the only `sent` lines that count (a forward pass).
    open_sends = {_identity(r) for path in paths for r in unsettled_sends(path)}
    total = Group(key={})
    groups: dict[tuple[Any, ...], Group] = {}
    tables: set[str] = set()
    for path in reversed(paths):
        for record in read_backwards(path):
            state = is_state(record) and seen_ids.add(record["id"])  # the first met: its state
            kind, identity = record.get("record"), _identity(record)
            # An attempt another line tells of, or one known not billed, counts nothing.
            told = kind == "settled" or (kind == "sent" and identity not in open_sends)
            if told and not state:
                continue
            key = tuple(_hashable(group_value(record, name)) for name in by)
            group = groups.get(key)
            if group is None:
                group = groups[key] = Group(key=dict(zip(by, key, strict=True)))
            if state:
                total.add_item(record)
                group.add_item(record)
            if told:
                continue
            if not seen_answers.add(identity):
                continue  # the same line in two ledgers (a ledger given twice): bill it once
            cost = _cost(record, prices)
            if prices is None and isinstance(record.get("price_table"), str) and cost is not None:
                tables.add(record["price_table"])
            for target in (total, group):
                target.add_billing(record, cost)
    name = prices.name if prices is not None else (", ".join(sorted(tables)) or None)
    ordered = dict(sorted(groups.items(), key=lambda kv: tuple(str(v) for v in kv[0])))
    return Report(price_table=name, total=total, groups=ordered, by=tuple(by))


def _identity(record: LedgerRecord) -> str:
    """What tells one line from another, in the ledger's own terms: the run that wrote it, the
    item and the attempt (older lines, without a run id: when it started and finished). Never a
    provider's request id alone, which a gateway may repeat."""
    parts = (
        str(record.get("record", "item")),
        record.get("run_id") or f"{record.get('started_at')}/{record.get('finished_at')}",
        record["id"],
        record.get("attempt", record.get("attempts")),
        record.get("request_id"),
    )
    return "\x00".join(map(str, parts))


def _hashable(value: Any) -> Any:
    """A group key value as a dict key (a list or object from an odd line becomes text)."""
    try:
        hash(value)
    except TypeError:
        return str(value)
    return value


def _cost(record: LedgerRecord, prices: PriceTable | None) -> float | None:
    """A line's known cost: as recorded (a finite amount >= 0), or repriced from its usage."""
    if prices is None:
        return amount(record.get("cost_usd"))
    if record.get("usage") is None and not record.get("files"):
        return None  # never answered: nothing to reprice
    params = {
        k: record.get(k)
        for k in ("model", "n", "size", "quality", "prompt", "output_format", "complexity")
        if isinstance(record.get(k), (str, int)) and not isinstance(record.get(k), bool)
    }
    prompt = record.get("prompt")
    generation = record.get("endpoint") == "generations" and isinstance(prompt, str)
    # As when the line was written: no more input tokens than a generation's prompt can have.
    bound = input_bound(prompt) if generation and isinstance(prompt, str) else None
    table = prices.via(record.get("via"))  # a batch line at batch prices
    return table.request_cost(params, record.get("usage"), input_bound=bound)


_COLUMNS = ("items", "ok", "failed", "images", "in tokens", "out tokens", "cost", "avg s",
            "p95 s", "img/min")  # fmt: skip


def _cells(group: Group) -> tuple[str, ...]:
    data = group.as_json()

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    return (
        f"{group.items:,}", f"{group.ok:,}", f"{group.failed:,}", f"{group.images:,}",
        f"{group.input_tokens:,}", f"{group.output_tokens:,}", f"${group.cost_usd:,.4f}",
        num(data["latency_avg_s"], ".2f"), num(data["latency_p95_s"], ".2f"),
        num(data["images_per_minute"], ",.1f"),
    )  # fmt: skip


def format_table(report: Report) -> str:
    by = report.by
    rows = (
        [
            tuple("-" if v is None else str(v) for v in key) + _cells(g)
            for key, g in report.groups.items()
        ]
        if by
        else []
    )
    total = ("total",) + ("",) * max(0, len(by) - 1) + _cells(report.total)
    header = (*(by or ("",)), *_COLUMNS)
    lines = render_rows(header, [*rows, total], numeric_from=max(1, len(by)))
    if report.total.failures:
        counts = ", ".join(f"{c} x{n}" for c, n in report.total.failures.most_common())
        lines.append(f"failures: {counts}")
    if report.total.unpriced:
        lines.append(f"{report.total.unpriced} answers have no known price (not in the cost)")
    if report.total.unknown_costs:
        lines.append(
            f"{report.total.unknown_costs} answers were (or may have been) billed at a cost "
            f"nobody can tell (no usage, unreadable usage, cut off): not in the cost; the cap "
            f"counted them at ${report.total.cost_bound_usd:,.4f}"
        )
    if report.total.unreadable_usage:
        lines.append(f"{report.total.unreadable_usage} lines have a usage that is not token "
                     "counts (skipped)")  # fmt: skip
    if report.total.unpriced_extra:
        lines.append(
            f"{report.total.unpriced_extra} answers carry extra usage no price covers (svg_usage:"
            " the SVG author's tokens; see extra_usage in the ledger), not in the cost"
        )
    lines.append(f"prices: {report.price_table or 'none recorded'}")
    return "\n".join(lines)


def format_csv(report: Report) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    fields = ["items", "ok", "failed", "images", "input_tokens", "output_tokens", "cost_usd",
              "latency_avg_s", "latency_p95_s", "images_per_minute"]  # fmt: skip
    writer.writerow([*report.by, *fields])
    rows = [(list(key), g) for key, g in report.groups.items()] if report.by else []
    label = ["(total)"] + [""] * max(0, len(report.by) - 1) if report.by else []
    for key, group in [*rows, (label, report.total)]:
        data = group.as_json()
        writer.writerow([*key, *("" if data[f] is None else data[f] for f in fields)])
    return out.getvalue()
