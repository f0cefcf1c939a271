"""The run supervisor: one manifest through the item runner, under a lock, with watchers.

A producer streams the manifest into a bounded queue; `concurrency` workers take items from it
and hand each to the item runner, which sends it through the backend, stores its images and
gives its line to the result sink. Around them: the output directory's lock, a task that syncs
the ledger every second, a stall watch and (from the CLI) the signal handlers.

Stopping early, and what each way of stopping keeps:
- run-fatal answer (bad key, no quota), a disk that refuses writes, or a stall (nothing finished
  for `stall_timeout_s`): admission stops at once, in-flight requests finish (a stall cancels
  them), items waiting to retry are abandoned, the rest of the manifest is only counted; exit 3.
- first SIGINT/SIGTERM: the same, but in-flight requests and downloads get `grace_period_s` to
  finish; exit 130. A second signal cancels whatever is still in flight (requests and
  downloads alike; each keeps what it cost as a ledger line) and ends the run.
Whatever happens, each ledger line is written whole after its files are durable, so a re-run of
the same command picks up exactly what is missing.
"""

from __future__ import annotations

import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import anyio
import anyio.lowlevel
import anyio.to_thread
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..backends import Backend
from ..budget import Budget
from ..catalog import Catalog
from ..config import RunConfig
from ..errors import StorageError
from ..layouts import LayoutContext, open_layout
from ..layouts.imagefolder import METADATA_NAME, SVG_METADATA_NAME
from ..ledger import FSYNC_INTERVAL_S, LEDGER_NAME, LedgerState, read_ledger
from ..limiter import Limiter
from ..manifest import BadLine, Item, manifest_lines, read_manifest
from ..outdir import WORKERS_GONE_WAIT_S, batch_state_path, exclusive
from ..pricing import PriceTable
from ..stores import Store
from ..tokens import TokenBook
from ..writer import MAX_BATCH, WRITER_THREADS, BatchedWriter, ImageWriter
from .control import RunControl
from .events import ProgressCallback, ProgressEvent, RunSnapshot, Summary
from .items import Abandoned, ItemRunner
from .sink import ResultSink

METADATA_FILES = (METADATA_NAME, SVG_METADATA_NAME)  # an imagefolder's, uploaded whole


if TYPE_CHECKING:
    from ..stores.remote import RemoteOutput


class Entries(Protocol):
    """Items from somewhere other than the manifest file (a Ray worker's chunks)."""

    def __aiter__(self) -> AsyncIterator[Item | BadLine]: ...

    def total(self) -> int:
        """Every entry this source has handed out or would have (counted after a hard stop)."""
        ...


@dataclass(frozen=True)
class Part:
    """The engine runs one part of a larger run (a Ray worker): the run's driver holds the
    output directory's lock and writes its metadata files; the items come from `entries`."""

    entries: Entries


class Engine:
    """Runs one manifest to completion (or to a stop); see the module docstring.

    `backend` sends the requests (and is already open); `store` is where images go (the
    backend spools into its temp area). `sleep` replaces real time in retry waits (tests);
    `limiter` and `budget`, given, are shared with other engines (workers of one job); `part`:
    this engine runs a part of a larger run (see `Part`).
    """

    def __init__(
        self,
        config: RunConfig,
        backend: Backend,
        store: Store,
        *,
        progress: ProgressCallback | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        limiter: Limiter | None = None,
        budget: Budget | None = None,
        remote: RemoteOutput | None = None,
        part: Part | None = None,
    ) -> None:
        self.config = config
        self.remote = remote  # the output is a bucket: its lock, its ledger's pieces
        self.part = part
        self.sleep = sleep  # an injected clock for waits (retries; a batch's looks), or None
        options = config.options
        self.store = store
        catalog = config.catalog or Catalog.default()
        self.summary = Summary(out_dir=config.out_dir, ledger_path=config.out_dir / LEDGER_NAME)
        self.control = RunControl(self.summary, progress)
        self.prices = PriceTable(catalog)
        self.book = TokenBook()  # output tokens learned: this directory's ledger, then answers
        self.budget = budget or Budget(options.max_cost_usd)
        if limiter is not None:
            limiter.bind(self._admission_wait, self.control.warn_once)
        self.limiter = limiter or Limiter(
            rpm=options.rpm,
            ipm=options.ipm,
            tpm=options.tpm,
            adaptive=options.adaptive_rate,
            sleep=self._admission_wait,
            note=self.control.warn_once,
        )
        self.sink = ResultSink(
            self.control,
            ledger_path=self.summary.ledger_path,
            layout=open_layout(
                options.layout,
                LayoutContext(
                    out_dir=config.out_dir,
                    store=store,
                    shard_size=options.images_per_shard,
                    sync_ledger=self._sync_ledger_now,
                    metadata=part is None,  # a part's: the driver writes it once, whole
                ),
            ),
            catalog=catalog,
            price_table=self.prices.name,
            book=self.book,
            budget=self.budget,
            run_id=uuid.uuid4().hex[:12],  # tells this run's lines from other runs' ones
            # The other workers of a local output write the same ledger (a bucket's worker
            # has a working copy of its own).
            shared=part is not None and remote is None,
        )
        #: Items whose images are on their way into the store may wait beyond the requests in
        #: flight, this many at most (a bucket: as many again; a local disk keeps up).
        self.upload_queue = int(getattr(store, "upload_queue", 0)) * options.concurrency
        self.runner = ItemRunner(
            self.control,
            self.sink,
            backend,
            BatchedWriter(
                ImageWriter(store),
                threads=getattr(store, "writer_threads", WRITER_THREADS),
                batch=getattr(store, "writer_batch", MAX_BATCH),
            ),
            catalog=catalog,
            prices=self.prices,
            book=self.book,
            budget=self.budget,
            limiter=self.limiter,
            retry=options.retry_policy(),
            max_answer_bytes=options.max_answer_bytes,
            sleep=sleep,
            requests=options.concurrency if self.upload_queue else None,
        )
        self._done: Container[str] = frozenset()
        self._held: Container[str] = frozenset()  # items in the directory's live batches
        self._outer: TaskGroup | None = None  # the run's task group, while it runs

    def snapshot(self) -> RunSnapshot:
        """The live counts, for a view (safe from another thread)."""
        s = self.summary
        return RunSnapshot(
            ok=s.ok,
            failed=s.failed,
            skipped=s.skipped,
            images=s.images,
            in_flight=self.control.in_flight,
            retrying=self.control.waiting_to_retry,
            output_tokens=s.output_tokens,
            cost_usd=s.cost_usd,
            spent_usd=self.budget.spent_usd,
            limiter=self.limiter.stats(),
        )

    def warn(self, message: str) -> None:
        """A warning for the person running this, in the progress stream and the summary."""
        self.control.warn(message)

    def stop(self, reason: str, *, interrupted: bool = False) -> None:
        """Stop admitting new items; in-flight ones finish. The first reason given is kept."""
        self.control.stop(reason, interrupted=interrupted)

    async def run(self, *, handle_signals: bool = False) -> Summary:
        if self.part is not None and self.remote is None:  # the driver holds the directory
            return await self._run_locked(handle_signals)
        # A bucket's Ray worker: its own state directory, which the same worker of a killed
        # driver may still hold for a moment.
        wait_s = WORKERS_GONE_WAIT_S if self.part is not None else 0.0
        with exclusive(self.config.out_dir, wait_s):
            if self.remote is None:
                return await self._run_locked(handle_signals)
            return await self._run_remote(self.remote, handle_signals)

    async def _run_remote(self, remote: RemoteOutput, handle_signals: bool) -> Summary:
        """The run, holding the bucket's lock (its heartbeat renewed from the first step to the
        last), its ledger pulled first and pushed as it grows, at the end and on every stop (a
        line not pushed stays in the state directory, and the next run here pushes it before
        anything else)."""
        summary = self.summary
        summary.ledger_at = f"{remote.store.location}/ledger/ (working copy: {summary.ledger_path})"
        lock = remote.lock  # None: a Ray worker's, whose driver holds the lock
        took_over = None if lock is None else await anyio.to_thread.run_sync(lock.acquire)
        if took_over:
            self.warn(took_over)
        try:
            async with anyio.create_task_group() as beating:
                if lock is not None:
                    beating.start_soon(self._every, lock.heartbeat_s, lock.beat)
                try:
                    await self._run_pulled(remote, handle_signals)
                finally:
                    beating.cancel_scope.cancel()
            return summary
        finally:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):  # on a crash: pushed at the next start
                    await anyio.to_thread.run_sync(remote.ledger.push)
                if lock is not None:
                    await anyio.to_thread.run_sync(lock.release)

    async def _run_pulled(self, remote: RemoteOutput, handle_signals: bool) -> None:
        summary = self.summary
        try:
            await anyio.to_thread.run_sync(remote.ledger.pull)
            unparked = await anyio.to_thread.run_sync(remote.unpark)
        except StorageError as exc:  # nothing sent yet: what is here stays for next time
            summary.stop_reason = f"{exc}; {exc.advice}, then re-run"
            return
        if unparked:
            self.warn(f"uploaded the images of {unparked} items an earlier run had parked")
        if self.config.options.max_cost_usd is not None:  # the cap holds on any machine
            from ..stores.remote import PushGate

            self.runner.before_send = PushGate(remote.ledger).wait
        async with anyio.create_task_group() as pushing:
            pushing.start_soon(self._every, remote.upload_every_s, remote.ledger.push)
            try:
                await self._run_locked(handle_signals)
            finally:
                pushing.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(remote.ledger.finish)
                if self.config.options.layout == "imagefolder" and self.part is None:
                    await anyio.to_thread.run_sync(remote.push_files, METADATA_FILES)
            except StorageError as exc:
                summary.stop_reason = summary.stop_reason or (
                    f"{exc}; the ledger's last lines are kept in {remote.state_dir} and "
                    "uploaded by the next run there"
                )

    async def _every(self, interval_s: float, step: Callable[[], object]) -> None:
        """Run `step` on a thread every `interval_s`; a store that refuses stops the run."""
        while True:
            await anyio.sleep(interval_s)
            try:
                await anyio.to_thread.run_sync(step)
            except StorageError as exc:
                self.control.stop(f"{exc}; {exc.advice}, then re-run")
                return

    async def _run_locked(self, handle_signals: bool) -> Summary:
        started = time.monotonic()
        summary = self.summary
        self.store.clean_temps()  # another run's would not be stale: hence the lock
        state = self.sink.resume()
        try:
            self._held = self._check_batches(state)
            own = summary.ledger_path.resolve()
            for path in {p.resolve(): None for p in self.config.learn_from}:  # each ledger once
                if path != own:  # other runs' answers: bounds known from the start
                    for record in read_ledger(path):
                        self.sink.learn(record)
        except BaseException:
            self.sink.layout.abort()
            raise
        self._done = state.done
        self.control.emit(ProgressEvent("started", snapshot=self.snapshot))
        try:
            await self._run_all(handle_signals)
        finally:
            self.runner.writer.close()
        if summary.interrupted:  # a second signal may have cut the count short: redo it
            total = await anyio.to_thread.run_sync(self._count_entries)
            done = summary.ok + summary.failed + summary.skipped + summary.pending
            summary.not_attempted = max(summary.not_attempted, total - done)
        summary.wall_s = time.monotonic() - started
        summary.limiter = self.limiter.stats()
        summary.spent_total_usd = self.budget.spent_usd
        if self.runner.budget_short and summary.stop_reason is None:
            summary.stop_reason = "budget"
        if summary.stop_reason == "budget":
            summary.stop_reason = self.budget.message(summary.not_attempted, summary.next_bound)
            cap = self.budget.cap_usd or 0.0
            summary.held_back_usd = max(0.0, cap - self.budget.spent_usd)
        return summary

    async def _run_all(self, handle_signals: bool) -> None:
        """Feed every item through the workers, with the ledger and the layout open."""
        sink, layout = self.sink, self.sink.layout
        try:
            sink.open()
            try:
                async with anyio.create_task_group() as outer:
                    self._outer = outer
                    outer.start_soon(self._sync_ledger)
                    outer.start_soon(self._watch_for_stalls)
                    if handle_signals:
                        outer.start_soon(self._watch_signals, outer)
                    await self._work_all()
                    outer.cancel_scope.cancel()
                # The last shard (webdataset) is written here, off the event loop.
                await anyio.to_thread.run_sync(layout.close)
            except StorageError as exc:
                self.control.stop(f"{exc}; free space, then re-run to pack the rest")
            finally:
                sink.close()
        except BaseException:
            layout.abort()
            raise

    def _check_batches(self, ledger: LedgerState) -> frozenset[str]:
        """Items in the directory's live batches (`--batch-api`), which this run leaves for
        a batch run to collect; UsageError if the ledger has batch lines the batch state does
        not know (it was damaged): sending those items again could pay twice."""
        sent_by_batch = any(r.get("via") == "batch" for r in ledger.unsettled)
        if not batch_state_path(self.config.out_dir).exists() and not sent_by_batch:
            return frozenset()
        from .batchstate import BatchState  # a directory `run --batch-api` wrote to only

        batches = BatchState(self.config.out_dir)
        batches.load()
        batches.check_sends(ledger.unsettled)
        return frozenset(batches.held())

    async def _work_all(self) -> None:
        """The producer and the workers, until the manifest is done (or the run stops)."""
        concurrency = self.config.options.concurrency
        send, receive = anyio.create_memory_object_stream[Item](max_buffer_size=concurrency * 2)
        async with anyio.create_task_group() as work:
            work.start_soon(self._produce, send)
            async with receive:
                for _ in range(concurrency + self.upload_queue):
                    work.start_soon(self._work, receive.clone())

    def _sync_ledger_now(self) -> None:
        """Make every ledger line written so far durable (called from the layout's thread)."""
        self.sink.sync_now()

    # -- the background watchers --

    async def _sync_ledger(self) -> None:
        while True:
            await anyio.sleep(FSYNC_INTERVAL_S)
            self.sink.sync()

    async def _watch_for_stalls(self) -> None:
        limit_s = self.config.options.stall_timeout_s
        control = self.control
        while True:
            await anyio.sleep(min(1.0, limit_s / 4))
            idle_s = time.monotonic() - control.last_progress
            if control.in_flight and idle_s > limit_s:
                control.stop(
                    f"stalled: no request finished in {limit_s:g} s with {control.in_flight} in "
                    "flight; check the network and the provider's status, then re-run"
                )
                control.cancel_items()  # the requests in flight are stuck: drop them
                return

    async def _watch_signals(self, outer: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.interrupt(signal.Signals(signum).name)

    def interrupt(self, name: str) -> None:
        """What a signal does: the first stops admission and gives in-flight requests
        `grace_period_s` to finish; the next cancels what is still in flight."""
        outer = self._outer
        if outer is None:  # not started: nothing in flight to wait for
            self.control.stop(f"{name}: stopped before starting", interrupted=True)
            return
        if self.summary.interrupted:
            outer.cancel_scope.cancel()  # second signal: drop what is in flight now
            return
        self.control.stop(f"{name}: finished in-flight requests", interrupted=True)
        outer.start_soon(self._abort_after_grace)

    async def _abort_after_grace(self) -> None:
        await anyio.sleep(self.config.options.grace_period_s)
        self.control.cancel_items()

    async def _admission_wait(self, delay_s: float) -> None:
        """Wait until the limiter lets the next request go, unless the run stops meanwhile."""
        if await self.control.wait_or_stop(delay_s):
            raise Abandoned

    # -- producer and workers --

    async def _produce(self, send: MemoryObjectSendStream[Item]) -> None:
        control, summary, done = self.control, self.summary, self._done
        async with send:
            count = 0
            async for entry in self._source():
                if control.stopping:
                    if control.interrupt_now:  # count what is left without reading it as items
                        total = await anyio.to_thread.run_sync(self._count_entries)
                        summary.not_attempted += max(0, total - count)
                        return
                    self._count_left(entry)  # say how much is left, send nothing
                elif isinstance(entry, BadLine):
                    self.sink.bad_line(entry)
                elif entry.id in done:
                    summary.skipped += 1
                elif entry.id in self._held:
                    summary.pending += 1  # its answer is in a batch still running
                    control.warn_once(
                        "held",
                        "some items are in batches still running (sent by `run --batch-api`): "
                        "they are left to be collected by that command, not sent again",
                    )
                else:
                    try:  # room in the buffer: no turn of the event loop for each item
                        send.send_nowait(entry)
                    except anyio.WouldBlock:
                        await send.send(entry)
                count += 1

    async def _source(self) -> AsyncIterator[Item | BadLine]:
        """The items: the manifest's, or the part's."""
        if self.part is not None:
            async for entry in self.part.entries:
                yield entry
            return
        for count, entry in enumerate(self._entries()):
            if count % 256 == 0:
                await anyio.lowlevel.checkpoint()
            yield entry

    def _entries(self, *, warn: bool = True) -> Iterator[Item | BadLine]:
        """The manifest, streamed (`warn`: say its warnings, each once, to the person)."""
        return read_manifest(
            self.config.manifest,
            self.config.options.defaults,
            catalog=self.sink.catalog,
            warn=self.control.warn if warn else None,
            inputs_dir=self.config.inputs_dir,
        )

    def _count_entries(self) -> int:
        if self.part is not None:
            return self.part.entries.total()
        return sum(1 for _ in manifest_lines(self.config.manifest))

    def _count_left(self, entry: Item | BadLine) -> None:
        if isinstance(entry, Item) and entry.id in self._done:
            self.summary.skipped += 1
        else:
            self.summary.not_attempted += 1

    async def _work(self, receive: MemoryObjectReceiveStream[Item]) -> None:
        control, summary = self.control, self.summary
        async with receive:
            while (item := await _next(receive)) is not None:
                if control.stopping:
                    summary.not_attempted += 1
                    continue
                with control.item_scope() as scope:
                    try:
                        await self.runner.run(item)
                    except Abandoned:
                        summary.not_attempted += 1
                    except StorageError as exc:
                        control.stop(f"{exc}; {exc.advice}, then re-run")
                if scope.cancelled_caught:
                    summary.not_attempted += 1


async def _next(receive: MemoryObjectReceiveStream[Item]) -> Item | None:
    """The next item (None: there are no more), as `receive.receive()` takes it, but without a
    turn of the event loop when one is waiting: only a cancelled worker stops first, so no
    item is taken that its cancellation would drop before it is counted."""
    await anyio.lowlevel.checkpoint_if_cancelled()
    try:
        return receive.receive_nowait()
    except anyio.WouldBlock:
        try:
            return await receive.receive()
        except anyio.EndOfStream:
            return None
    except anyio.EndOfStream:
        return None
