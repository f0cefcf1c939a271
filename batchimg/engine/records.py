"""Ledger lines as the engine writes them: an item's line, and a charge line for a billed
attempt no item line tells of (see `ledger`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, cast

from .. import specs
from ..backends import Answer
from ..catalog import Catalog
from ..errors import ErrorInfo
from ..ledger import ErrorRecord, LedgerRecord
from ..manifest import BadLine, Item
from ..writer import StoredFile

_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def now() -> str:
    """The time in UTC as the ledger writes it: `2026-12-01T11:45:04.123Z`. A few lines are
    written each item, so the date and time of day are formatted once a second."""
    global _second
    ms = time.time_ns() // 1_000_000
    second, milli = divmod(ms, 1000)
    if second != _second[0]:
        when = datetime.fromtimestamp(second, timezone.utc)
        _second = (second, when.strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_second[1]}.{milli:03d}Z"


@dataclass(frozen=True)
class Charge:
    """What one attempt may have cost: known exactly (`cost_usd`), or, when an answer may have
    been billed but its cost cannot be known (no usage, usage that cannot be read, an answer
    cut off after the API began it), only bounded: `bound_usd`, with the reason in `note`."""

    attempt: int
    started_at: str
    cost_usd: float | None = None
    bound_usd: float | None = None
    note: str | None = None
    usage: Any = None
    request_id: str | None = None
    error: ErrorInfo | None = None
    route: str | None = None  # the endpoint it went to (`--endpoints`), by name

    @property
    def counted_usd(self) -> float:
        """What the budget counts: the cost, else its bound (None of either: nothing)."""
        if self.cost_usd is not None:
            return self.cost_usd
        return self.bound_usd or 0.0


def _error(info: ErrorInfo) -> ErrorRecord:
    return cast(ErrorRecord, info.as_record())


def item_record(
    item: Item | BadLine,
    *,
    status: str,
    started_at: str,
    attempts: int,
    price_table: str,
    catalog: Catalog,
    run_id: str,
    answer: Answer | None = None,
    files: list[StoredFile] | None = None,
    error: ErrorInfo | None = None,
    rate_limited: int = 0,
    charge: Charge | None = None,
) -> LedgerRecord:
    """One item's line, with every field of the ledger contract (`ledger.LedgerRecord`)."""
    params = item.params if isinstance(item, Item) else {}
    echo = answer.echo if answer else {}
    files = files or []
    # The format asked for, which check_image verified the bytes against (not what an answer says).
    fmt, complexity, frames = specs.produced(params, catalog) if params else (None, None, None)
    record = LedgerRecord(
        id=item.id,
        line=item.line,
        status="ok" if status == "ok" else "error",
        endpoint=item.endpoint,
        model=params.get("model"),
        prompt=item.prompt,
        n=params.get("n", 1) if params else None,
        size=echo.get("size") or params.get("size"),
        quality=echo.get("quality") or params.get("quality"),
        output_format=fmt,
        complexity=echo.get("complexity") or complexity,
        frame_count=frames,
        files=[f.path for f in files],
        bytes=[f.bytes for f in files],
        sha256=[f.sha256 for f in files],
        usage=answer.usage if answer else None,
        cost_usd=charge.cost_usd if charge else None,
        price_table=price_table,
        attempts=attempts,
        rate_limited=rate_limited,
        latency_s=round(answer.latency_s, 4) if answer else None,
        request_id=(answer.request_id if answer else None) or (error.request_id if error else None),
        started_at=started_at,
        finished_at=now(),
        metadata=item.metadata,
    )
    if isinstance(item, Item) and item.endpoint == "edits":
        # So a dataset can trace every output back to the exact inputs it was made from.
        record["inputs"] = [f.as_record() for f in item.images]
        record["mask"] = item.mask.as_record() if item.mask else None
    record["run_id"] = run_id
    _charge_fields(record, charge)
    if answer is not None and answer.extra_usage:
        # Billed apart (the SVG author's tokens): kept verbatim, and said to be unpriced.
        record["extra_usage"] = answer.extra_usage
        record["cost_note"] = (
            f"{', '.join(answer.extra_usage)} not priced: the catalog has no prices for it"
        )
    if error is not None:
        record["error"] = _error(error)
    return record


def charge_record(
    item: Item, charge: Charge, *, run_id: str, price_table: str, catalog: Catalog
) -> LedgerRecord:
    """A line for an attempt that may have been billed and whose item line tells of another:
    it was retried, or the run stopped before its item could finish."""
    params = item.params
    record = LedgerRecord(
        record="charge",
        id=item.id,
        line=item.line,
        run_id=run_id,
        attempt=charge.attempt,
        endpoint=item.endpoint,
        model=params.get("model"),
        n=params.get("n", 1),
        size=params.get("size"),
        quality=params.get("quality"),
        output_format=specs.output_format(params, catalog),
        usage=charge.usage,
        cost_usd=charge.cost_usd,
        price_table=price_table,
        request_id=charge.request_id,
        started_at=charge.started_at,
        finished_at=now(),
        metadata=item.metadata,
    )
    _charge_fields(record, charge)
    if charge.error is not None:
        record["error"] = _error(charge.error)
    return record


def _charge_fields(record: LedgerRecord, charge: Charge | None) -> None:
    """The cost of the attempt a line stands for: exact, or unknown with its bound and why;
    and the endpoint that billed it, with `--endpoints`."""
    if charge is not None and charge.route is not None:
        record["route"] = charge.route
    if charge is None or charge.cost_usd is not None:
        return
    record["cost_bound_usd"] = charge.bound_usd
    record["cost_note"] = charge.note or ""


def sent_record(
    item: Item,
    *,
    attempt: int,
    run_id: str,
    started_at: str,
    bound_usd: float | None,
    via: str | None = None,
) -> LedgerRecord:
    """A line written just before a request goes out: if the run dies before any line settles
    it, it counts at its bound (see `ledger.Unsettled`)."""
    record = LedgerRecord(
        record="sent",
        id=item.id,
        line=item.line,
        run_id=run_id,
        attempt=attempt,
        endpoint=item.endpoint,
        model=item.params.get("model"),
        cost_usd=None,
        started_at=started_at,
    )
    record["cost_bound_usd"] = bound_usd
    record["cost_note"] = "sent: unless a later line tells of this attempt, it may have been billed"
    if via == "batch":
        record["via"] = "batch"
    return record


def settled_record(item: Item, *, attempt: int, run_id: str) -> LedgerRecord:
    """A line for an attempt known not to have been billed that no other line tells of."""
    return LedgerRecord(
        record="settled", id=item.id, run_id=run_id, attempt=attempt, finished_at=now()
    )
