"""The engine: the one place that wires manifest → client → writer → ledger.

A producer streams the manifest into a bounded queue; `concurrency` workers take items from it,
send each with retries, store its images and append its ledger line.

Stopping early, and what each way of stopping keeps:
- run-fatal answer (bad key, no quota), a disk that refuses writes, or a stall (nothing finished
  for `stall_timeout_s`): admission stops at once, in-flight requests finish (a stall cancels
  them), items waiting to retry are abandoned, the rest of the manifest is only counted; exit 3.
- first SIGINT/SIGTERM: the same, but in-flight requests get `grace_period_s` to finish; exit 130.
  A second signal aborts at once.
Whatever happens, each ledger line is written whole after its files are durable, so a re-run of
the same command picks up exactly what is missing.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import specs
from ._spool import SpooledImage, discard
from .budget import Budget
from .catalog import Catalog
from .client import ImagesClient, ImagesResult
from .config import RunConfig
from .dataset import METADATA_NAME, SVG_METADATA_NAME, MetadataWriter, rebuild_metadata
from .errors import (
    ErrorInfo,
    ItemFailed,
    RateLimited,
    RequestError,
    RunFatal,
    StorageError,
    UsageError,
    may_have_been_billed,
)
from .ledger import (
    FSYNC_INTERVAL_S,
    LEDGER_NAME,
    LedgerState,
    LedgerWriter,
    read_ledger,
    scan_ledger,
)
from .limiter import Limiter, LimiterStats
from .manifest import BadLine, Item, manifest_lines, read_manifest
from .outdir import exclusive
from .pricing import PRICE_TABLE, Bound, PriceTable
from .retry import retrying
from .tokens import GroupKey, TokenBook, request_group
from .usage import UsageProblem, read_usage
from .webdataset import SHARDS_DIR, ShardWriter
from .writer import BatchedStore, ImageStore, StoredFile, check_image, decode_b64_image

EventKind = Literal["started", "item_finished", "retry", "stopping", "warning"]
#: Failures before any answer, of one cause no item can fix, that stop the run (one message).
UNREACHABLE_AFTER = 4


@dataclass(frozen=True)
class ProgressEvent:
    """What the engine tells a progress view; it never waits on the view."""

    kind: EventKind
    item_id: str | None = None
    status: str | None = None
    images: int = 0
    cost_usd: float | None = None
    spent_usd: float = 0.0  # everything this ledger has cost so far, earlier runs included
    message: str | None = None
    error_code: str | None = None
    line: int | None = None
    engine: Engine | None = None  # on "started": where a view reads live counts
    repeat: bool = False  # an error of the cause the run stopped for, already said


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class Summary:
    """How a run went; `exit_code` follows the CLI contract (0 / 1 / 3 / 130)."""

    out_dir: Path
    ledger_path: Path
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    not_attempted: int = 0
    images: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0
    wall_s: float = 0.0
    stop_reason: str | None = None
    interrupted: bool = False
    limiter: LimiterStats | None = None  # rate limits learned, 429s seen, admitted rate
    spent_total_usd: float = 0.0  # this run and every earlier run in the same ledger
    images_at: Path | None = None  # where the images are: DIR/images, or DIR/shards (webdataset)
    failures: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # each said once (the manifest's, mostly)
    #: When the cap stopped the run: the money left under it, which the next item's bound
    #: did not fit in (what a tighter bound could have spent), and that bound.
    held_back_usd: float | None = None
    next_bound: Bound | None = None
    unpriced_extra: int = 0  # answers whose extra usage (svg_usage) no price covers
    #: Attempts that were (or may have been) billed at a cost nobody can tell (no usage, usage
    #: that cannot be read, an answer cut off): how many, and their bounds, which the cap counts.
    unknown_costs: int = 0
    cost_bound_usd: float = 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.stop_reason is not None:
            return 3
        return 1 if self.failed else 0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _record(
    item: Item | BadLine,
    *,
    status: str,
    started_at: str,
    attempts: int,
    result: ImagesResult | None = None,
    files: list[StoredFile] | None = None,
    cost_usd: float | None = None,
    error: ErrorInfo | None = None,
    rate_limited: int = 0,
    price_table: str = PRICE_TABLE,
    catalog: Catalog | None = None,
    charge: Charge | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """One ledger line, with every field of the ledger contract (DESIGN.md)."""
    params = item.params if isinstance(item, Item) else {}
    echo = result.echo if result else {}
    files = files or []
    # The format asked for, which check_image verified the bytes against (not what an answer says).
    fmt = specs.output_format(params, catalog) if params else None
    record: dict[str, Any] = {
        "id": item.id,
        "line": item.line,
        "status": status,
        "endpoint": item.endpoint,
        "model": params.get("model"),
        "prompt": item.prompt,
        "n": params.get("n", 1) if params else None,
        "size": echo.get("size") or params.get("size"),
        "quality": echo.get("quality") or params.get("quality"),
        "output_format": fmt,
        "complexity": echo.get("complexity")
        or (specs.resolved_complexity(params, catalog) if params else None),
        "frame_count": specs.resolved_frames(params, catalog) if params else None,
        "files": [f.path for f in files],
        "bytes": [f.bytes for f in files],
        "sha256": [f.sha256 for f in files],
        "usage": result.usage if result else None,
        "cost_usd": cost_usd,
        "price_table": price_table,
        "attempts": attempts,
        "rate_limited": rate_limited,
        "latency_s": round(result.latency_s, 4) if result else None,
        "request_id": (result.request_id if result else None) or (error and error.request_id),
        "started_at": started_at,
        "finished_at": _now(),
        "metadata": item.metadata,
    }
    if isinstance(item, Item) and item.endpoint == "edits":
        # So a dataset can trace every output back to the exact inputs it was made from.
        record["inputs"] = [f.as_record() for f in item.images]
        record["mask"] = item.mask.as_record() if item.mask else None
    record["run_id"] = run_id
    _charge_fields(record, charge)
    if result is not None and result.extra_usage:
        # Billed apart (the SVG author's tokens): kept verbatim, and said to be unpriced.
        record["extra_usage"] = result.extra_usage
        record["cost_note"] = (
            f"{', '.join(result.extra_usage)} not priced: the catalog has no prices for it"
        )
    if error is not None:
        record["error"] = error.as_record()
    return record


def _charge_fields(record: dict[str, Any], charge: Charge | None) -> None:
    """The cost of the attempt a line stands for: exact, or unknown with its bound and why."""
    if charge is None or charge.cost_usd is not None:
        return
    record["cost_bound_usd"] = charge.bound_usd
    record["cost_note"] = charge.note


def _charge_record(
    item: Item, charge: Charge, *, run_id: str, price_table: str, catalog: Catalog
) -> dict[str, Any]:
    """A line for an attempt that may have been billed and whose item line tells of another:
    it was retried, or the run stopped before its item could finish."""
    params = item.params
    record: dict[str, Any] = {
        "record": "charge",
        "id": item.id,
        "line": item.line,
        "run_id": run_id,
        "attempt": charge.attempt,
        "endpoint": item.endpoint,
        "model": params.get("model"),
        "n": params.get("n", 1),
        "size": params.get("size"),
        "quality": params.get("quality"),
        "output_format": specs.output_format(params, catalog),
        "usage": charge.usage,
        "cost_usd": charge.cost_usd,
        "price_table": price_table,
        "request_id": charge.request_id,
        "started_at": charge.started_at,
        "finished_at": _now(),
        "metadata": item.metadata,
    }
    _charge_fields(record, charge)
    if charge.error is not None:
        record["error"] = charge.error.as_record()
    return record


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

    @property
    def counted_usd(self) -> float:
        """What the budget counts: the cost, else its bound (None of either: nothing)."""
        if self.cost_usd is not None:
            return self.cost_usd
        return self.bound_usd or 0.0


@dataclass
class _Tally:
    """Per-item counts across attempts."""

    attempts: int = 0
    rate_limited: int = 0
    #: The latest attempt's charge, until it is written: as a charge record of its own when
    #: another attempt follows (or the run stops), else in the item's line.
    pending: Charge | None = None


class _Abandoned(Exception):
    """An item was waiting to retry when the run stopped: leave it for the next run."""


class Engine:
    """Runs one manifest to completion (or to a stop); see the module docstring."""

    def __init__(
        self,
        config: RunConfig,
        client: ImagesClient,
        *,
        progress: ProgressCallback | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        store: ImageStore | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.progress = progress
        self.sleep = sleep
        self.store = store or ImageStore(config.out_dir, clean=False)  # cleaned once locked
        self.catalog = config.catalog or Catalog.default()
        self.prices = PriceTable(self.catalog)
        self.book = TokenBook()  # output tokens learned: this directory's ledger, then answers
        self.budget = Budget(config.max_cost_usd)
        self._budget_short = False  # an item was left because its bound did not fit the cap
        self._cheapest_admitted_usd = float("inf")  # the least a reserved bound came to
        self._probes: dict[GroupKey, anyio.Lock] = {}  # one first request per unknown group
        self._stop_code: str | None = None  # the error code the run stopped for, if any
        self._answered = False  # an answer (2xx) has come: the API is reachable as configured
        self._unreachable: dict[str, int] = {}  # before that: failures no item can fix, by code
        self.limiter = limiter or Limiter(
            rpm=config.rpm,
            ipm=config.ipm,
            tpm=config.tpm,
            adaptive=config.adaptive_rate,
            sleep=self._admission_wait,
            note=self.warn_once,
        )
        ledger_path = config.out_dir / LEDGER_NAME
        self.summary = Summary(out_dir=config.out_dir, ledger_path=ledger_path)
        self.run_id = uuid.uuid4().hex[:12]  # tells this run's lines from other runs' ones
        self._warned: set[Any] = set()
        self._stop_event = anyio.Event()
        self._interrupt_now = False  # a stop that should not even count what is left
        self._in_flight = 0
        self.waiting_to_retry = 0  # items sleeping before their next try
        self._last_progress = time.monotonic()
        self._item_scopes: set[anyio.CancelScope] = set()  # one per item being processed

    @property
    def in_flight(self) -> int:
        """Requests on the wire right now."""
        return self._in_flight

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def _emit(self, event: ProgressEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    def warn(self, message: str) -> None:
        """A warning for the person running this (each cause says it once)."""
        self.summary.warnings.append(message)
        self._emit(ProgressEvent("warning", message=message))

    def warn_once(self, key: Any, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(message)

    def stop(self, reason: str, *, interrupted: bool = False) -> None:
        """Stop admitting new items; in-flight ones finish. The first reason given is kept."""
        if interrupted:
            self.summary.interrupted = True
            self._interrupt_now = True
        if self.summary.stop_reason is None:
            self.summary.stop_reason = reason
        if not self.stopping:
            self._stop_event.set()
            self._emit(ProgressEvent("stopping", message=reason))

    async def run(self, *, handle_signals: bool = False) -> Summary:
        with exclusive(self.config.out_dir):
            return await self._run_locked(handle_signals)

    async def _run_locked(self, handle_signals: bool) -> Summary:
        started = time.monotonic()
        self.store.remove_stale_temps()  # another run's would not be stale: hence the lock
        state = self._open_output()
        if state.garbled:
            shown = ", ".join(map(str, state.garbled[:5])) + (
                ", …" if len(state.garbled) > 5 else ""
            )
            self.warn(
                f"{self.summary.ledger_path}: {len(state.garbled)} lines that are not ledger "
                f"records were skipped (line {shown}); `batchimg verify` checks the rest"
            )
        own = self.summary.ledger_path.resolve()
        for path in {p.resolve(): None for p in self.config.learn_from}:  # each ledger once
            if path != own:  # other runs' answers: bounds known from the start
                for record in read_ledger(path):
                    self._learn(record)
        self._done = state.done
        self.budget.spent_usd = state.spent_usd  # earlier runs' spend counts against the cap
        self._writer = BatchedStore(self.store)
        self._emit(ProgressEvent("started", engine=self))
        try:
            await self._run_all(handle_signals)
        finally:
            self._writer.close()
        self.summary.wall_s = time.monotonic() - started
        self.summary.limiter = self.limiter.stats()
        self.summary.spent_total_usd = self.budget.spent_usd
        if self._budget_short and self.summary.stop_reason is None:
            self.summary.stop_reason = "budget"
        if self.summary.stop_reason == "budget":
            self.summary.stop_reason = self.budget.message(
                self.summary.not_attempted, self.summary.next_bound
            )
            cap = self.budget.cap_usd or 0.0
            self.summary.held_back_usd = max(0.0, cap - self.budget.spent_usd)
        return self.summary

    async def _run_all(self, handle_signals: bool) -> None:
        """Feed every item through the workers, with the ledger and the dataset output open."""
        with self._output, LedgerWriter(self.summary.ledger_path) as self._ledger:
            if isinstance(self._output, ShardWriter):
                self._output.start()
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._sync_ledger)
                outer.start_soon(self._watch_for_stalls)
                if handle_signals:
                    outer.start_soon(self._watch_signals, outer)
                send, receive = anyio.create_memory_object_stream[Item](
                    max_buffer_size=self.config.concurrency * 2
                )
                async with anyio.create_task_group() as work:
                    work.start_soon(self._produce, send)
                    async with receive:
                        for _ in range(self.config.concurrency):
                            work.start_soon(self._work, receive.clone())
                outer.cancel_scope.cancel()
            # The last shard (webdataset) is written here, off the event loop.
            await anyio.to_thread.run_sync(self._output.close)
            if isinstance(self._output, ShardWriter) and self._output.error is not None:
                self.stop(f"{self._output.error}; free space, then re-run to pack the rest")

    def _open_output(self) -> LedgerState:
        """Read the ledger (for resuming) while setting up the dataset layout from it."""
        out = self.config.out_dir
        shards = out / SHARDS_DIR
        if self.config.layout == "webdataset":
            for name in (METADATA_NAME, SVG_METADATA_NAME):  # rows would point at packed files
                (out / name).unlink(missing_ok=True)
            writer = ShardWriter(out, self.config.shard_size, sync_ledger=self._sync_now)
            self.summary.images_at = writer.dir
            self._output: MetadataWriter | ShardWriter = writer
            state = scan_ledger(self.summary.ledger_path, on_ok=writer.add, on_usage=self._learn)
            writer.keep_only(state.done)
            return state
        if shards.is_dir() and any(shards.glob("*.tar")):
            raise UsageError(
                f"{out} holds webdataset shards: re-run with --format webdataset (a directory "
                "keeps the layout it was started with)"
            )
        with rebuild_metadata(out) as add_rows:
            state = scan_ledger(self.summary.ledger_path, on_ok=add_rows, on_usage=self._learn)
        self._output = MetadataWriter(out)
        self.summary.images_at = self.store.images_dir
        return state

    def _learn(self, record: dict[str, Any]) -> None:
        """Count an answer's output tokens in the book (earlier runs' and this run's)."""
        self.book.learn_record(record, self.catalog)

    def _sync_now(self) -> None:
        """Make every ledger line written so far durable (called from the shard thread)."""
        self._ledger.sync(force=True)

    # -- the background watchers --

    async def _sync_ledger(self) -> None:
        while True:
            await anyio.sleep(FSYNC_INTERVAL_S)
            self._ledger.sync()
            self._output.sync()

    async def _watch_for_stalls(self) -> None:
        limit_s = self.config.stall_timeout_s
        while True:
            await anyio.sleep(min(1.0, limit_s / 4))
            idle_s = time.monotonic() - self._last_progress
            if self._in_flight and idle_s > limit_s:
                self.stop(
                    f"stalled: no request finished in {limit_s:g} s with {self._in_flight} in "
                    "flight; check the network and the provider's status, then re-run"
                )
                self._cancel_in_flight()  # the requests in flight are stuck: drop them
                return

    async def _watch_signals(self, outer: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self.summary.interrupted:
                    outer.cancel_scope.cancel()  # second signal: abort now
                    return
                name = signal.Signals(signum).name
                self.stop(f"{name}: finished in-flight requests", interrupted=True)
                outer.start_soon(self._abort_after_grace)

    async def _abort_after_grace(self) -> None:
        await anyio.sleep(self.config.grace_period_s)
        self._cancel_in_flight()

    def _cancel_in_flight(self) -> None:
        """Drop the items being processed (no ledger line: the next run sends them again)."""
        for scope in list(self._item_scopes):
            scope.cancel()

    # -- producer and workers --

    async def _produce(self, send: MemoryObjectSendStream[Item]) -> None:
        async with send:
            entries = read_manifest(
                self.config.manifest,
                self.config.defaults,
                catalog=self.catalog,
                warn=self.warn,
                inputs_dir=self.config.inputs_dir,
            )
            for count, entry in enumerate(entries):
                if count % 256 == 0:
                    await anyio.lowlevel.checkpoint()
                if self.stopping:
                    if self._interrupt_now:  # count what is left without reading it as items
                        total = await anyio.to_thread.run_sync(self._count_entries)
                        self.summary.not_attempted += max(0, total - count)
                        return
                    self._count_left(entry)  # say how much is left, send nothing
                elif isinstance(entry, BadLine):
                    self._finish_bad_line(entry)
                elif entry.id in self._done:
                    self.summary.skipped += 1
                else:
                    await send.send(entry)

    def _count_entries(self) -> int:
        return sum(1 for _ in manifest_lines(self.config.manifest))

    def _count_left(self, entry: Item | BadLine) -> None:
        if isinstance(entry, Item) and entry.id in self._done:
            self.summary.skipped += 1
        else:
            self.summary.not_attempted += 1

    async def _work(self, receive: MemoryObjectReceiveStream[Item]) -> None:
        async with receive:
            async for item in receive:
                if self.stopping:
                    self.summary.not_attempted += 1
                    continue
                with anyio.CancelScope() as scope:
                    self._item_scopes.add(scope)
                    try:
                        await self._process(item)
                    except _Abandoned:
                        self.summary.not_attempted += 1
                    except StorageError as exc:
                        self.stop(f"{exc}; free space (or fix the output directory), then re-run")
                    finally:
                        self._item_scopes.discard(scope)
                if scope.cancelled_caught:
                    self.summary.not_attempted += 1

    def _finish_bad_line(self, bad: BadLine) -> None:
        info = ErrorInfo(message=bad.reason, code="invalid_manifest_line", type="manifest_error")
        self._append(
            _record(
                bad,
                status="error",
                started_at=_now(),
                attempts=0,
                error=info,
                price_table=self.prices.name,
            )
        )

    def _append(self, record: dict[str, Any]) -> None:
        try:
            self._ledger.append(record)
        except StorageError as exc:
            self.stop(f"{exc}; free space, then re-run")
            self.summary.not_attempted += 1  # no line: the next run does it again
            return
        if record["status"] == "ok":
            try:
                self._output.add(record)
            except StorageError as exc:  # repaired from the ledger when the run restarts
                self.stop(f"{exc}; free space, then re-run")
        self._last_progress = time.monotonic()
        summary = self.summary
        if record["status"] == "ok":
            summary.ok += 1
            summary.images += len(record["files"])
        else:
            summary.failed += 1
            code = record["error"]["code"] or "error"
            summary.failures[code] = summary.failures.get(code, 0) + 1
        self._count_charge(record)
        if record["cost_usd"] is None and record["status"] == "ok":
            summary.unpriced += 1
        self._emit(
            ProgressEvent(
                "item_finished",
                item_id=record["id"],
                status=record["status"],
                images=len(record["files"]),
                cost_usd=record["cost_usd"],
                spent_usd=self.budget.spent_usd,
                message=record["error"]["message"] if "error" in record else None,
                error_code=record["error"]["code"] if "error" in record else None,
                line=record["line"],
                # The cause the run stopped for, said once: not again for every item it hits.
                repeat="error" in record and record["error"]["code"] == self._stop_code,
            )
        )

    def _count_charge(self, record: dict[str, Any]) -> None:
        """What a line (an item's, or a charge of its own) adds to the run's tokens and cost."""
        summary = self.summary
        if record["usage"] is not None:
            self._learn(record)
        if "extra_usage" in record:
            summary.unpriced_extra += 1
        counts = read_usage(record["usage"])
        if not isinstance(counts, UsageProblem):
            summary.input_tokens += counts.input
            summary.output_tokens += counts.output
        if record["cost_usd"] is not None:
            summary.cost_usd += record["cost_usd"]
        elif "cost_note" in record:  # billed, or maybe billed, at a cost nobody can tell
            summary.unknown_costs += 1
            summary.cost_bound_usd += record["cost_bound_usd"] or 0.0
            if counts is not None and isinstance(counts, UsageProblem) and record["usage"]:
                self.warn_once(
                    ("usage", str(counts)),
                    f"an answer's usage cannot be read "
                    f"({counts}): its cost is unknown, counted at its bound",
                )

    async def _retry_wait(self, delay_s: float) -> None:
        """Wait before a retry (on the injected clock, if any), unless the run stops meanwhile."""
        self.waiting_to_retry += 1
        try:
            if self.sleep is not None:
                await self.sleep(delay_s)
                if self.stopping:
                    raise _Abandoned
            else:
                await self._admission_wait(delay_s)
        finally:
            self.waiting_to_retry -= 1

    async def _admission_wait(self, delay_s: float) -> None:
        """Wait until the limiter lets the next request go, unless the run stops meanwhile."""
        with anyio.move_on_after(delay_s):
            await self._stop_event.wait()
        if self.stopping:
            raise _Abandoned

    async def _process(self, item: Item) -> None:
        started_at = _now()
        tally = _Tally()
        result: ImagesResult | None = None

        def finish(status: str, error: ErrorInfo | None = None, **fields: Any) -> None:
            # The line carries its attempt's charge: an answer that arrived but could not be
            # stored was still paid for, so its usage and cost are kept.
            charge, tally.pending = tally.pending, None
            self._append(
                _record(
                    item,
                    status=status,
                    started_at=started_at,
                    attempts=tally.attempts,
                    rate_limited=tally.rate_limited,
                    result=result,
                    cost_usd=charge.cost_usd if charge else None,
                    price_table=self.prices.name,
                    catalog=self.catalog,
                    error=error,
                    charge=charge,
                    run_id=self.run_id,
                    **fields,
                )
            )

        try:
            async for attempt in retrying(self.config.retry, sleep=self._retry_wait):
                with attempt:
                    tally.attempts = attempt.retry_state.attempt_number
                    if tally.attempts > 1:
                        self._emit(ProgressEvent("retry", item_id=item.id))
                    self._flush_charge(item, tally)  # the try before was billed, and retried
                    result = await self._attempt(item, tally)
            assert result is not None
            try:  # downloads (url answers) may take long: a stop can still cancel them
                images = await self._fetch_images(item, result)
            except anyio.get_cancelled_exc_class():
                discard([e["spooled"] for e in result.data if "spooled" in e])
                with anyio.CancelScope(shield=True):  # paid: the line keeps its cost
                    message = "stopped while downloading the images of an answer paid for"
                    finish("error", ErrorInfo(message, "download_interrupted", "local_error"))
                raise
            except BaseException:
                discard([e["spooled"] for e in result.data if "spooled" in e])
                raise
            # Paid for, and in hand: a stop or a grace-period cancel must not drop the images
            # between the answer and its ledger line, or the next run would buy them again.
            with anyio.CancelScope(shield=True):
                try:
                    stored = await self._writer.save(
                        item.file_stem, images, specs.output_format(item.params, self.catalog)
                    )
                except BaseException:  # whatever was spooled and not stored must not linger
                    discard(images)
                    raise
                if len(stored) < item.n:  # kept, but the item is not done: the next run is
                    message = (
                        f"the answer has {len(stored)} of the {item.n} images asked for: those "
                        "are kept (and paid for); the item is done again next run"
                    )
                    info = ErrorInfo(message, "missing_images", "invalid_response")
                    finish("error", info, files=stored)
                else:
                    if len(stored) > item.n:
                        self.warn_once(
                            "extra",
                            f"an answer brought {len(stored)} images for n={item.n} (item "
                            f"{item.id}): all are kept",
                        )
                    finish("ok", files=stored)
        except StorageError as exc:
            finish("error", ErrorInfo(message=str(exc), code="storage_error", type="local_error"))
            raise
        except RequestError as exc:
            if isinstance(exc, RunFatal) and not self.stopping:
                self._stop_code = exc.info.code
                self.stop(f"{exc} — fix the account or key, then re-run the same command")
            finish("error", exc.info)
        finally:
            # Stopped (or cancelled) with an attempt billed but no item line for it: its charge
            # is written on its own, so the next run's cap counts it.
            with anyio.CancelScope(shield=True):
                self._flush_charge(item, tally)

    def _flush_charge(self, item: Item, tally: _Tally) -> None:
        charge, tally.pending = tally.pending, None
        if charge is None:
            return
        record = _charge_record(
            item, charge, run_id=self.run_id, price_table=self.prices.name, catalog=self.catalog
        )
        try:
            self._ledger.append(record)
        except StorageError as exc:
            self.stop(f"{exc}; free space, then re-run")
            return
        self._count_charge(record)

    async def _attempt(self, item: Item, tally: _Tally) -> ImagesResult:
        """One try. Under a cap, a request whose bound is only the catalog's ceiling (no answer
        of its kind is known yet) goes alone: its group's others wait for its answer, which
        turns their bound into a learned one, so a ceiling that proves too low is exceeded by
        one request at most, not by every request sent before the first answer."""
        if self.budget.cap_usd is not None:
            bound = self.prices.worst_case(item.params, item.image_tokens, self.book)
            if bound is not None and bound.basis == "ceiling":
                group = request_group(item.params, self.catalog)
                async with self._probes.setdefault(group, anyio.Lock()):
                    return await self._attempt_once(item, tally)
        return await self._attempt_once(item, tally)

    async def _attempt_once(self, item: Item, tally: _Tally) -> ImagesResult:
        """Reserve its worst-case cost, wait for admission, send, report back (the attempt's
        charge is left in `tally.pending`)."""
        estimate = self.prices.estimate(item.params, item.image_tokens, self.book)
        tokens = estimate.input_tokens + estimate.output_tokens
        capped = self.budget.cap_usd is not None
        worst_usd = 0.0
        if capped:
            reserved = await self.budget.reserve(lambda: self._bound(item))
            if reserved is None:
                self._out_of_budget(item)
                raise _Abandoned
            worst_usd = reserved
            self._cheapest_admitted_usd = min(self._cheapest_admitted_usd, reserved)
        started_at, attempt = _now(), tally.attempts
        limiter, charge = self.limiter, None
        try:
            if self.stopping:  # stopped while this item waited for budget: send nothing
                raise _Abandoned
            sent_at = await limiter.acquire(images=item.n, tokens=tokens)
            try:
                result = await self._send(item)
            except RateLimited as exc:
                tally.rate_limited += 1
                limiter.on_rate_limited(exc.retry_after_s, exc.ratelimit, sent_at)
                raise
            except RequestError as exc:
                limiter.observe(exc.ratelimit)
                self._first_contact(exc)
                if may_have_been_billed(exc):
                    # No error status: the answer may have been generated (and billed) before
                    # it broke in transit. Its cost is unknown: count the worst, never $0.
                    why = f"no whole answer ({exc.info.code or 'error'}): may have been billed"
                    charge = self._unknown_charge(
                        item,
                        attempt,
                        started_at,
                        worst_usd,
                        why,
                        request_id=exc.info.request_id,
                        error=exc.info,
                    )
                raise
            except anyio.get_cancelled_exc_class():
                # Sent, then dropped by a stop: the API may have generated (and billed) it.
                charge = self._unknown_charge(
                    item,
                    attempt,
                    started_at,
                    worst_usd,
                    "cancelled in flight: may have been billed",
                )
                raise
            limiter.observe(result.ratelimit)
            limiter.on_success()
            self._answered = True
            counts = read_usage(result.usage)
            if not isinstance(counts, UsageProblem):
                limiter.settle_tokens(tokens, counts.total)
            cost, unknown = self.prices.answer_cost(item.params, result.usage)
            if cost is None:  # billed but not priceable: count the worst, never $0
                charge = self._unknown_charge(
                    item,
                    attempt,
                    started_at,
                    worst_usd,
                    unknown or "",
                    request_id=result.request_id,
                    usage=result.usage,
                )
            else:
                charge = Charge(
                    attempt,
                    started_at,
                    cost_usd=cost,
                    usage=result.usage,
                    request_id=result.request_id,
                )
            return result
        finally:
            tally.pending = charge
            actual_usd = charge.counted_usd if charge is not None else 0.0
            if capped:
                self.budget.settle(worst_usd, actual_usd)
            else:
                self.budget.charge(actual_usd)

    def _unknown_charge(
        self,
        item: Item,
        attempt: int,
        started_at: str,
        reserved_usd: float,
        note: str,
        **answer: Any,
    ) -> Charge:
        """A charge whose cost cannot be known: bounded by what was reserved for it (under a
        cap), else by the worst case now (None where nothing bounds it)."""
        bound: float | None = reserved_usd or None
        if bound is None:
            worst = self.prices.worst_case(item.params, item.image_tokens, self.book)
            bound = worst.cost_usd if worst is not None else None
        if bound is None:
            note += "; nothing bounds its cost (no price or token count known)"
        return Charge(attempt, started_at, bound_usd=bound, note=note, **answer)

    def _first_contact(self, exc: RequestError) -> None:
        """Until one answer has come, the first failures that no item can fix (the host cannot
        be reached; every request answered 404 or 405, as a wrong --base-url path is) stop the
        run with one message naming the URL, instead of failing every item one by one."""
        if self._answered or self.stopping:
            return
        info = exc.info
        route = info.http_status in (404, 405) and info.code != "model_not_found"
        if info.code != "connect_error" and not route:
            return
        key = info.code if info.code == "connect_error" else f"http_{info.http_status}"
        self._unreachable[key] = count = self._unreachable.get(key, 0) + 1
        if count >= UNREACHABLE_AFTER:
            self._stop_code = info.code
            where = self.client.base_url
            hint = (
                "check --base-url (for OpenAI it ends in /v1) and the endpoint it names"
                if route
                else "check --base-url, the network and the provider's status"
            )
            self.stop(
                f"cannot use the API at {where}: {count} tries, none answered as the API does "
                f"({exc}); {hint}, then re-run"
            )

    def _out_of_budget(self, item: Item) -> None:
        """The item's bound does not fit under the cap even with nothing in flight: leave it for
        a later run and go on with items that may cost less, until not even the cheapest
        bound this run admitted fits (then stop admitting: the rest is only counted)."""
        bound = self._bound(item)
        summary = self.summary
        if summary.next_bound is None or bound.cost_usd < summary.next_bound.cost_usd:
            summary.next_bound = bound
        self._budget_short = True
        budget = self.budget
        left = (budget.cap_usd or 0.0) - budget.spent_usd - budget.reserved_usd
        if left < self._cheapest_admitted_usd < float("inf"):
            self.stop("budget")  # the final message is written when the run ends

    def _bound(self, item: Item) -> Bound:
        """The most this item can cost now (tighter as its group's answers come in)."""
        bound = self.prices.worst_case(item.params, item.image_tokens, self.book)
        if bound is None:
            prices = self.prices.prices(item.model)
            why = (
                f"no price for model {item.model!r}: --max-cost cannot bound it "
                "(add it with --catalog or --prices)"
                if prices is None
                else f"nothing bounds model {item.model!r}'s output tokens: --max-cost cannot "
                "bound it (give tokens.ceiling_per_megapixel in --catalog)"
            )
            raise ItemFailed(ErrorInfo(message=why, code="unpriced_model", type="local_error"))
        return bound

    async def _send(self, item: Item) -> ImagesResult:
        self._in_flight += 1
        limit = self._answer_limit(item)
        try:
            if item.endpoint == "edits":
                return await self.client.edit(
                    item.params, item.images, item.mask, limit_bytes=limit
                )
            return await self.client.generate(item.params, limit_bytes=limit)
        finally:
            self._in_flight -= 1
            self._last_progress = time.monotonic()

    async def _fetch_images(self, item: Item, result: ImagesResult) -> list[bytes | SpooledImage]:
        """The answer's images, verified: spooled to disk, b64 decoded, or urls downloaded."""
        expected = specs.output_format(item.params, self.catalog)
        images: list[bytes | SpooledImage] = []
        try:
            for entry in result.data:
                spooled = entry.get("spooled")
                if isinstance(spooled, (bytes, SpooledImage)):
                    data: bytes | SpooledImage = spooled
                elif isinstance(entry.get("b64_json"), str):
                    data = decode_b64_image(entry["b64_json"])
                elif isinstance(entry.get("url"), str):
                    data = await self._download(item, entry["url"])
                else:
                    info = ErrorInfo(message="data entry has neither b64_json nor url",
                                     code="bad_response")  # fmt: skip
                    raise ItemFailed(info)
                images.append(data)
                check_image(data, expected)
        except BaseException:
            discard(images)  # a download that arrived before the failure
            raise
        return images

    def _answer_limit(self, item: Item) -> int:
        """The most an answer (and each downloaded image) may weigh for this request."""
        return self.config.max_answer_bytes or specs.max_answer_bytes(item.params, self.catalog)

    async def _download(self, item: Item, url: str) -> bytes | SpooledImage:
        """A `url` answer's image. Paid for already, so a first stop lets it finish (within the
        grace period); like a request, it is in flight for the stall watch, and a second
        signal, the end of the grace period or a stall cancels it."""
        limit = self.config.max_answer_bytes or specs.max_image_bytes(item.params, self.catalog)
        async for attempt in retrying(self.config.retry, sleep=self.sleep):
            with attempt:
                self._in_flight += 1
                try:
                    return await self.client.download(url, limit_bytes=limit)
                finally:
                    self._in_flight -= 1
                    self._last_progress = time.monotonic()
        raise AssertionError("unreachable: retrying re-raises the last error")
