"""The driver of a Ray run: plans the chunks, starts the hubs and the workers, relays their
progress, passes stops on, replaces workers that die, and adds up the summary.

- **Chunks.** The manifest is read once, streamed, into chunks of whole lines (byte ranges,
  `manifest.plan_chunks`), about eight per worker and 10,000 lines at most, so a slow worker
  does not hold the end of the run; a chunk's items get the ids a single process gives them.
- **The directory.** The driver holds the output directory's lock for the whole run, cuts a
  torn ledger tail once, before any worker appends, and writes `metadata.jsonl` from the ledger
  at the end (a worker writes images and ledger lines only). With a bucket it holds the
  bucket's lock (with its heartbeat), pushes what each worker slot on this machine left
  unpushed before any worker pulls, and uploads `metadata.jsonl` at the end.
- **Faults.** A worker that dies (its process killed, its node lost) is replaced by a new one
  that takes every chunk the dead one had taken: the new worker reads the ledger when it
  starts, so it skips what the dead one finished and sends what it had in flight again (that
  is all a death can cost; those requests are counted at their bound). A driver that dies
  takes its workers with it (they are its actors); the same command resumes from the ledger.
- **Stops.** A worker that stops (a run-fatal answer, the budget, a disk that refuses writes)
  stops all of them; a signal at the driver drains every worker with the grace period, and a
  second one cuts what is in flight.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Iterable
from types import ModuleType
from typing import Any

import anyio
import anyio.to_thread

from ..budget import Budget
from ..config import RunConfig
from ..engine.events import ProgressCallback, ProgressEvent, RunSnapshot, Summary
from ..engine.run import METADATA_FILES
from ..errors import StorageError, UsageError
from ..layouts.imagefolder import write_metadata
from ..ledger import LEDGER_NAME, cut_torn_tail, scan_ledger
from ..limiter import IDLE_STATS, combined_stats
from ..manifest import Chunk, plan_chunks
from ..outdir import WORKERS_GONE_WAIT_S, exclusive
from ..routing import Endpoint
from ..stores import LocalStore
from ..stores.remote import BucketLock, RemoteLedger, RemoteOutput
from .shared import BudgetHub, ChunkQueue, LimiterHub
from .worker import Polled, Worker, WorkerSpec

CHUNKS_PER_WORKER = 8
MAX_CHUNK_LINES = 10_000
POLL_S = 0.2  # how often the driver hears from its workers
#: A run gives up replacing workers after this many deaths per worker (something kills
#: every worker that takes a chunk, and a new one would only die again).
DEATHS_PER_WORKER = 3
#: After a second signal, how long workers get to end before they are killed.
CUT_WAIT_S = 10.0
JOIN_TIMEOUT_S = 10.0  # to reach a cluster's address before Ray is asked to join it
_TOKEN_NOTICE = "ray._private.authentication.authentication_token_setup"


def import_ray() -> ModuleType:
    """Ray, or a UsageError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'batchimg[ray]'") from None
    return ray


def lines_per_chunk(lines: int, workers: int) -> int:
    return max(1, min(MAX_CHUNK_LINES, math.ceil(lines / (workers * CHUNKS_PER_WORKER))))


@contextlib.contextmanager
def connected(ray: ModuleType, address: str, workers: int) -> Any:
    """Ray, started here (`local`) or joined (an address, `auto`); left or shut down after.
    A process that already called `ray.init` keeps its own connection."""
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no reports home from a job
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address == "local":
            # Ray's default for a new local instance (a token) stays; its notice that it is
            # the default is not for the person running batchimg.
            logging.getLogger(_TOKEN_NOTICE).setLevel(logging.ERROR)
            cpus = max(os.cpu_count() or 1, workers)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, **quiet)
        else:
            _check_reachable(address)
            ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise UsageError(f"--ray {address}: cannot start or join Ray: {exc}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """UsageError if `address` is host:port and nothing listens there (Ray would wait for it
    forever)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # `auto`, `ray://…`: Ray says what is wrong itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=JOIN_TIMEOUT_S).close()
    except OSError as exc:
        raise UsageError(
            f"--ray {address}: nothing answers there ({exc.strerror or exc}): start the cluster "
            "(`ray start --head`), or give its address, or run with --ray local"
        ) from None


def check_reach(ray: ModuleType, config: RunConfig, *, local_out: bool, mock: bool) -> None:
    """UsageError unless every node can reach the output and the API: with a local output
    directory, or the mock server (on loopback), every node must be this machine."""
    if not (local_out or mock):
        return
    here = ray.util.get_node_ip_address()
    away = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} - {here})
    if away:
        what = f"--out {config.out_dir} is a directory" if local_out else "--mock listens"
        raise UsageError(
            f"{what} on this machine, and the Ray cluster has nodes on others "
            f"({', '.join(away)}): give an --out URL (s3://...) that every node reaches"
            + (" and a --base-url" if mock else "")
        )


async def run_on_ray(
    config: RunConfig,
    url: str | None,
    *,
    endpoints: tuple[Endpoint, ...] = (),
    remote: RemoteOutput | None = None,
    progress: ProgressCallback | None = None,
    handle_signals: bool = False,
) -> Summary:
    """Run `config` on Ray workers (`url`: the API's; None: start a mock server here, unless
    the work goes to `endpoints`). `remote`: the output is a bucket (`config.out_dir` is then
    the local state directory)."""
    ray = import_ray()
    options = config.options
    assert options.ray is not None
    out = config.out_dir
    with exclusive(out):
        async with contextlib.AsyncExitStack() as stack:
            took_over = None
            if remote is None:
                LocalStore(out).clean_temps()  # every worker's temp area: none is running yet
                ledger = out / LEDGER_NAME
                if ledger.exists():
                    cut_torn_tail(ledger)  # once, here: the workers append to it side by side
            else:
                took_over = await stack.enter_async_context(_holding(remote))
            state = await anyio.to_thread.run_sync(scan_ledger, out / LEDGER_NAME)
            chunks = await anyio.to_thread.run_sync(_plan, config, state.done)
            mock_key = None
            if url is None and not endpoints:
                from ..mock import MockConfig, MockServer

                mock_key = secrets.token_urlsafe(16)
                server = await stack.enter_async_context(MockServer(MockConfig(api_key=mock_key)))
                url = server.base_url
            # On this thread: Ray sets its signal handlers only from the main thread.
            stack.enter_context(connected(ray, options.ray, options.worker_count))
            check_reach(ray, config, local_out=remote is None, mock=mock_key is not None)
            driver = _Driver(
                ray,
                config,
                url or "",
                endpoints,
                mock_key,
                chunks,
                state.spent_usd,
                progress,
                remote,
            )
            if took_over:
                driver.warn(took_over)
            try:
                async with anyio.create_task_group() as beating:
                    if remote is not None and remote.lock is not None:
                        beating.start_soon(driver.keep_lock, remote.lock)
                    summary = await driver.run(handle_signals)
                    beating.cancel_scope.cancel()
            finally:
                driver.close()
            try:
                if remote is not None:
                    await anyio.to_thread.run_sync(remote.ledger.pull)  # every worker's segment
                await anyio.to_thread.run_sync(write_metadata, out)
                if remote is not None:
                    await anyio.to_thread.run_sync(remote.push_files, METADATA_FILES)
            except StorageError as exc:  # the ledger is whole: the next run writes them again
                summary.stop_reason = summary.stop_reason or (
                    f"{exc}; metadata.jsonl was not written: {exc.advice}, then re-run"
                )
    return summary


@contextlib.asynccontextmanager
async def _holding(remote: RemoteOutput) -> AsyncIterator[str | None]:
    """The bucket's lock, held by the driver for its workers, and its ledger pulled; what
    taking the lock over said, if it was."""
    lock = remote.lock
    assert lock is not None
    took_over = await anyio.to_thread.run_sync(lock.acquire)
    try:
        await anyio.to_thread.run_sync(_push_slots_left, remote)
        await anyio.to_thread.run_sync(remote.ledger.pull)
        yield took_over
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(lock.release)


def _push_slots_left(remote: RemoteOutput) -> None:
    """Before any worker pulls: the lines each worker's state directory (on this machine) has
    not pushed yet, pushed, once the worker that left them (a killed driver's, ending) is gone.
    Else a worker in another slot, not seeing them, would buy those items again."""
    for slot in sorted(remote.state_dir.glob("ray-*")):
        if slot.is_dir():
            with exclusive(slot, WORKERS_GONE_WAIT_S):
                RemoteLedger(remote.store, slot, shared=True).push_left()


def _plan(config: RunConfig, done: Any) -> list[Chunk]:
    from .._idset import count_lines

    per = lines_per_chunk(count_lines(config.manifest), config.options.worker_count)
    return list(plan_chunks(config.manifest, per, done))


class _Driver:
    def __init__(
        self,
        ray: ModuleType,
        config: RunConfig,
        url: str,
        endpoints: tuple[Endpoint, ...],
        mock_key: str | None,
        chunks: list[Chunk],
        spent_usd: float,
        progress: ProgressCallback | None,
        remote: RemoteOutput | None = None,
    ) -> None:
        self.ray = ray
        self.remote = remote
        self.config = config
        options = config.options
        self.progress = progress
        self.entries = sum(c.entries for c in chunks)
        hub = ray.remote(num_cpus=0)
        routes = endpoints or (Endpoint("", url, ""),)  # one limiter for all, without any
        self.limiters = {
            route.name: hub(LimiterHub).remote(**route.limits(options)) for route in routes
        }
        self.budget = hub(BudgetHub).remote(options.max_cost_usd, spent_usd)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = (  # it reads the manifest: on this machine
            hub(ChunkQueue).options(scheduling_strategy=here).remote(str(config.manifest), chunks)
        )
        self.spec = WorkerSpec(
            manifest=config.manifest,
            inputs_dir=config.inputs_dir or config.manifest.parent,
            out_dir=config.out_dir,
            options=options,
            routes=endpoints,
            url=url,
            mock_key=mock_key,
            limiters=self.limiters,
            budget=self.budget,
            queue=self.queue,
            learn_from=config.learn_from,
            out_url=None if remote is None else remote.store.url,
        )
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        self._worker_class = ray.remote(
            num_cpus=min(1.0, cpus / options.worker_count), max_restarts=0, max_task_retries=0
        )(Worker)
        self._numbers = iter(range(1, 1_000_000))
        self.workers: dict[int, Any] = {}
        self.slots: dict[int, int] = {}  # each worker's slot (its temp area, its state)
        self.runs: dict[Any, int] = {}  # each worker's `run` call, to its number
        self.snapshots: dict[int, RunSnapshot] = {}
        self.dead: list[RunSnapshot] = []  # the last counts of workers that died
        self.noted: set[int] = set()  # workers whose pid and host were said
        self.summaries: list[Summary] = []
        self.lost: list[Chunk] = []  # chunks of workers that died and were not replaced
        self.left: list[Chunk] = []  # chunks no worker took
        self.deaths = 0
        self.stop_reason: str | None = None
        self.interrupted = False
        self.said_stopping = False
        self.warned: set[str] = set()
        self.warnings: list[str] = []
        self.limiter_stats = IDLE_STATS
        self.spent_usd = spent_usd
        self.started = time.monotonic()

    # -- the workers --

    def _start(self, chunks: list[Chunk], slot: int) -> int:
        number = next(self._numbers)
        worker = self._worker_class.remote(self.spec, number, slot)
        self.workers[number] = worker
        self.slots[number] = slot
        self.runs[worker.run.remote(chunks)] = number
        if chunks:
            self.queue.give.remote(number, chunks)
        return number

    async def run(self, handle_signals: bool) -> Summary:
        self._emit(ProgressEvent("started", snapshot=self.snapshot))
        for slot in range(1, self.config.options.worker_count + 1):
            self._start([], slot)
        async with anyio.create_task_group() as tasks:
            if handle_signals:
                tasks.start_soon(self._watch_signals)
            while self.runs:
                await self._poll()
                ready, _ = self.ray.wait(list(self.runs), num_returns=len(self.runs), timeout=0)
                for ref in ready:
                    await self._finished(ref)
                if self.runs:
                    await anyio.sleep(POLL_S)
            tasks.cancel_scope.cancel()
        self.left += await self.queue.close.remote()
        return await self._summary()

    async def _finished(self, ref: Any) -> None:
        number = self.runs.pop(ref)
        worker = self.workers.pop(number)
        ray = self.ray
        try:
            summary, events = await ref
        except ray.exceptions.RayActorError as exc:
            await self._died(number, exc)
            return
        except ray.exceptions.RayTaskError as exc:  # the worker raised: a bug, or its setup
            cause = exc.cause if exc.cause is not None else exc
            self.lost += await self.queue.forget.remote(number)
            self._stop_all(f"worker {number} failed: {type(cause).__name__}: {cause}")
            return
        self._relay(events)
        self.summaries.append(summary)
        ray.kill(worker)

    async def _died(self, number: int, exc: BaseException) -> None:
        self.deaths += 1
        # What it finished (as last heard) stays this run's work: its replacement finds those
        # items done and counts them as such, so they come off its count of skipped ones.
        last = self.snapshots.pop(number, None)
        if last is not None:
            self.dead.append(last)
        chunks: list[Chunk] = await self.queue.forget.remote(number)
        await self.budget.worker_gone.remote(number)
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if (
            self.stop_reason is None
            and self.deaths > DEATHS_PER_WORKER * self.config.options.worker_count
        ):
            self._stop_all(f"workers keep dying ({self.deaths} so far; the last: {cause})")
        if self.stop_reason is not None:
            self.lost += chunks
            self.warn(f"worker {number} died ({cause}) while the run was stopping", once=False)
            return
        new = self._start(chunks, self.slots[number])  # its slot: what it left, it finds
        self.warn(
            f"worker {number} died ({cause}); worker {new} takes its {len(chunks)} chunks "
            "(it skips what was done; what was in flight is sent again)",
            once=False,
        )

    # -- hearing from them --

    async def _poll(self) -> None:
        numbers = list(self.workers)
        refs = [self.workers[n].poll.remote() for n in numbers]
        stats_refs = [hub.stats.remote() for hub in self.limiters.values()]
        totals_ref = self.budget.totals.remote()
        for number, ref in zip(numbers, refs, strict=True):
            try:
                polled: Polled = await ref
            except Exception:  # a worker dying: its `run` call says so
                continue
            self._relay(polled.events)
            if number not in self.noted:
                self.noted.add(number)
                self._emit(ProgressEvent("note", message=f"worker {number}: {polled.where}"))
            if polled.snapshot is not None:
                self.snapshots[number] = polled.snapshot
            if polled.stop_reason is not None and self.stop_reason is None:
                self._stop_all(polled.stop_reason)
        self.limiter_stats = combined_stats([await ref for ref in stats_refs])
        self.spent_usd, _ = await totals_ref

    def _relay(self, events: Iterable[ProgressEvent]) -> None:
        for event in events:
            if event.kind == "warning" and event.message is not None:
                self.warn(event.message)  # each worker says the manifest's: said once
            elif event.kind == "stopping":  # the run stops once, whichever worker says why
                if not self.said_stopping:
                    self.said_stopping = True
                    self._emit(event)
            else:
                self._emit(event)

    def warn(self, message: str, *, once: bool = True) -> None:
        if once and message in self.warned:
            return
        self.warned.add(message)
        self.warnings.append(message)
        self._emit(ProgressEvent("warning", message=message))

    def _emit(self, event: ProgressEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    def snapshot(self) -> RunSnapshot:
        """The workers' live counts added up (for a view, from any thread)."""
        shots = list(self.snapshots.values())
        return RunSnapshot(
            ok=sum(s.ok for s in shots),
            failed=sum(s.failed for s in shots),
            skipped=sum(s.skipped for s in shots),
            images=sum(s.images for s in shots),
            in_flight=sum(s.in_flight for s in shots),
            retrying=sum(s.retrying for s in shots),
            output_tokens=sum(s.output_tokens for s in shots),
            cost_usd=sum(s.cost_usd for s in shots),
            spent_usd=self.spent_usd,
            limiter=self.limiter_stats,
        )

    async def keep_lock(self, lock: BucketLock) -> None:
        """Renew the bucket's lock for the run; a lock lost (taken over) stops every worker."""
        while True:
            await anyio.sleep(lock.heartbeat_s)
            try:
                await anyio.to_thread.run_sync(lock.beat)
            except StorageError as exc:
                self._stop_all(f"{exc}; {exc.advice}, then re-run")
                return

    # -- stopping --

    def _stop_all(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.queue.close.remote()
        for worker in self.workers.values():
            worker.stop.remote(reason)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                again = self.interrupted
                self.interrupted = True
                if self.stop_reason is None:
                    self.stop_reason = f"{name}: finished in-flight requests"
                self.queue.close.remote()
                for worker in self.workers.values():
                    worker.interrupt.remote(name)
                if again:
                    await anyio.sleep(CUT_WAIT_S)
                    for worker in self.workers.values():  # still there: end them
                        self.ray.kill(worker)
                    return

    def close(self) -> None:
        for actor in (*self.workers.values(), *self.limiters.values(), self.budget, self.queue):
            with contextlib.suppress(Exception):
                self.ray.kill(actor)

    # -- the end --

    async def _summary(self) -> Summary:
        config = self.config
        out = config.out_dir
        total = Summary(out_dir=out, ledger_path=out / LEDGER_NAME)
        if self.remote is not None:
            total.ledger_at = f"{self.remote.store.location}/ledger/ (one segment a worker)"
        counted = (
            *("ok", "failed", "skipped", "not_attempted", "pending", "parked", "images"),
            *("input_tokens", "output_tokens", "cost_usd", "unpriced", "unpriced_extra"),
            *("unknown_costs", "cost_bound_usd"),
        )
        budget_stop = None
        for part in self.summaries:
            for name in counted:
                setattr(total, name, getattr(total, name) + getattr(part, name))
            for code, count in part.failures.items():
                total.failures[code] = total.failures.get(code, 0) + count
            total.interrupted |= part.interrupted
            total.images_at = total.images_at or part.images_at
            if part.held_back_usd is not None:
                budget_stop = budget_stop or part
            if part.stop_reason is not None and self.stop_reason is None:
                self.stop_reason = part.stop_reason
        for chunk in self.left:
            total.skipped += chunk.done
            total.not_attempted += chunk.entries - chunk.done
        lost = sum(chunk.entries - chunk.done for chunk in self.lost)
        for last in self.dead:  # finished by workers that died (taken up again, or lost)
            total.ok += last.ok
            total.images += last.images
            total.output_tokens += last.output_tokens
            total.cost_usd += last.cost_usd
            taken_up = min(total.skipped, last.ok)
            total.skipped -= taken_up
            lost -= (last.ok - taken_up) + last.failed
        total.not_attempted += max(0, lost)
        counted_all = total.ok + total.failed + total.skipped + total.not_attempted + total.pending
        total.not_attempted += max(0, self.entries - counted_all)  # a stop cut a count short
        total.warnings = self.warnings
        total.interrupted |= self.interrupted
        total.limiter = combined_stats([await h.stats.remote() for h in self.limiters.values()])
        total.spent_total_usd, _ = await self.budget.totals.remote()
        total.stop_reason = self.stop_reason
        if budget_stop is not None:
            budget = Budget(config.options.max_cost_usd)
            budget.spent_usd = total.spent_total_usd
            total.next_bound = budget_stop.next_bound
            total.stop_reason = budget.message(total.not_attempted, total.next_bound)
            total.held_back_usd = max(0.0, (budget.cap_usd or 0.0) - budget.spent_usd)
        total.images_at = total.images_at or f"{out}/images"
        total.wall_s = time.monotonic() - self.started
        return total
