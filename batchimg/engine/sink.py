"""The result sink: every outcome becomes a ledger line, then the layout's, then the summary's.

A line is appended only after its images are durably in the store (the item runner stores them
first); an ok line is then handed to the output layout (metadata rows, shards). Lines that cannot
be written stop the run: nothing more could be kept.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..budget import Budget
from ..catalog import Catalog
from ..errors import ErrorInfo, StorageError
from ..layouts import OutputLayout
from ..ledger import LedgerRecord, LedgerState, LedgerWriter, scan_ledger
from ..manifest import BadLine, Item
from ..tokens import TokenBook
from ..usage import UsageProblem, read_usage
from .control import RunControl
from .events import ProgressEvent
from .records import Charge, charge_record, item_record, now, sent_record, settled_record


class ResultSink:
    """Writes the run's ledger lines and keeps the layout and the summary in step with them."""

    def __init__(
        self,
        control: RunControl,
        *,
        ledger_path: Path,
        layout: OutputLayout,
        catalog: Catalog,
        price_table: str,
        book: TokenBook,
        budget: Budget,
        run_id: str,
        shared: bool = False,
    ) -> None:
        """`shared`: the ledger file is appended to by other processes too (Ray workers)."""
        self.control = control
        self.summary = control.summary
        self.ledger_path = ledger_path
        self.layout = layout
        self.catalog = catalog
        self.price_table = price_table
        self.book = book
        self.budget = budget
        self.run_id = run_id
        self.shared = shared
        self._ledger: LedgerWriter | None = None

    def resume(self) -> LedgerState:
        """Read the ledger once: what is done, what was spent, the token counts it teaches; the
        layout is rebuilt from its ok lines as they go by."""
        self.layout.prepare()
        try:
            state = scan_ledger(self.ledger_path, on_ok=self.layout.restore, on_usage=self.learn)
        except BaseException:
            self.layout.abort()
            raise
        self.layout.resumed(state.done)
        self.summary.images_at = self.layout.images_at
        if state.garbled:
            shown = ", ".join(map(str, state.garbled[:5])) + (
                ", …" if len(state.garbled) > 5 else ""
            )
            self.control.warn(
                f"{self.ledger_path}: {len(state.garbled)} lines that are not ledger "
                f"records were skipped (line {shown}); `batchimg verify` checks the rest"
            )
        self.budget.spent_usd = state.spent_usd  # earlier runs' spend counts against the cap
        return state

    def learn(self, record: LedgerRecord) -> None:
        """Count an answer's output tokens in the book (earlier runs' and this run's)."""
        self.book.learn_record(record, self.catalog)

    # -- the ledger file --

    def open(self) -> None:
        self._ledger = LedgerWriter(self.ledger_path, shared=self.shared)

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def sync(self) -> None:
        """Make recent lines durable (the supervisor calls this every second)."""
        if self._ledger is not None:
            self._ledger.sync()
        self.layout.sync()

    def sync_now(self) -> None:
        """Make every line written so far durable (called from a layout's thread)."""
        if self._ledger is not None:
            self._ledger.sync(force=True)

    def _write(self, record: LedgerRecord) -> bool:
        """Append one line; False (and the run stops) if it cannot be written."""
        assert self._ledger is not None, "open() first"
        try:
            self._ledger.append(record)
        except StorageError as exc:
            self.control.stop(f"{exc}; free space, then re-run")
            return False
        return True

    # -- outcomes --

    def bad_line(self, bad: BadLine) -> None:
        info = ErrorInfo(message=bad.reason, code="invalid_manifest_line", type="manifest_error")
        self.item_line(
            item_record(
                bad,
                status="error",
                started_at=now(),
                attempts=0,
                error=info,
                price_table=self.price_table,
                catalog=self.catalog,
                run_id=self.run_id,
            )
        )

    def charge_line(self, item: Item, charge: Charge) -> None:
        """A billed attempt that no item line tells of (retried, or the run stopped first)."""
        record = charge_record(
            item, charge, run_id=self.run_id, price_table=self.price_table, catalog=self.catalog
        )
        if self._write(record):
            self._count_charge(record)

    def sent_line(
        self,
        item: Item,
        attempt: int,
        started_at: str,
        bound_usd: float | None,
        *,
        run_id: str | None = None,
        via: str | None = None,
    ) -> None:
        """A request is about to go out: say so first, with the most it can cost. `run_id`:
        the run that sends it, if not this one (a batch another run made); `via`: "batch"
        for a line of a batch."""
        record = sent_record(
            item,
            attempt=attempt,
            run_id=run_id or self.run_id,
            started_at=started_at,
            bound_usd=bound_usd,
            via=via,
        )
        if not self._write(record):
            raise StorageError(f"cannot append to {self.ledger_path}")

    def settled_line(self, item: Item, attempt: int, *, run_id: str | None = None) -> None:
        """An attempt known not billed, whose item ends with no line telling of it."""
        self._write(settled_record(item, attempt=attempt, run_id=run_id or self.run_id))

    def item_line(self, record: LedgerRecord) -> None:
        """An item's line: written, handed to the layout (if ok), counted and announced."""
        if not self._write(record):
            self.summary.not_attempted += 1  # no line: the next run does it again
            return
        ok = record["status"] == "ok"
        if ok:
            try:
                self.layout.add(record)
            except StorageError as exc:  # repaired from the ledger when the run restarts
                self.control.stop(f"{exc}; free space, then re-run")
        self.control.last_progress = time.monotonic()
        summary = self.summary
        error = record.get("error")
        if ok:
            summary.ok += 1
            summary.images += len(record["files"])
        else:
            summary.failed += 1
            code = (error["code"] if error else None) or "error"
            summary.failures[code] = summary.failures.get(code, 0) + 1
        self._count_charge(record)
        if record["cost_usd"] is None and ok:
            summary.unpriced += 1
        self.control.emit(
            ProgressEvent(
                "item_finished",
                item_id=record["id"],
                status=record["status"],
                images=len(record["files"]),
                cost_usd=record["cost_usd"],
                spent_usd=self.budget.spent_usd,
                message=error["message"] if error else None,
                error_code=error["code"] if error else None,
                line=record["line"],
                # The cause the run stopped for, said once: not again for every item it hits.
                repeat=error is not None and error["code"] == self.control.stop_code,
            )
        )

    def _count_charge(self, record: LedgerRecord) -> None:
        """What a line (an item's, or a charge of its own) adds to the run's tokens and cost."""
        summary = self.summary
        if record["usage"] is not None:
            self.learn(record)
        if "extra_usage" in record:
            summary.unpriced_extra += 1
        counts = read_usage(record["usage"])
        if not isinstance(counts, UsageProblem):
            summary.input_tokens += counts.input
            summary.output_tokens += counts.output
        cost = record["cost_usd"]
        if cost is not None:
            summary.cost_usd += cost
        elif "cost_note" in record:  # billed, or maybe billed, at a cost nobody can tell
            summary.unknown_costs += 1
            summary.cost_bound_usd += record.get("cost_bound_usd") or 0.0
            if isinstance(counts, UsageProblem) and record["usage"]:
                self.control.warn_once(
                    ("usage", str(counts)),
                    f"an answer's usage cannot be read "
                    f"({counts}): its cost is unknown, counted at its bound",
                )
