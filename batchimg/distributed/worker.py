"""A Ray worker: one `Engine` over the chunks it takes from the run's queue.

The worker's engine is the single-process engine with three parts swapped (`engine.Part`):
its items come from chunks (`ChunkSource`), its limiter and budget are proxies of the run's
hubs (`shared`), and the output belongs to the driver, which holds its lock and writes its
metadata files. With a local output each ledger line is one append to the directory's one
ledger, as in a single process, so `report`, `verify` and a later run read it as they always
do; with a bucket the worker is an ordinary bucket run without the lock, in a state directory
of its slot's (`ray-SLOT`), pushing a segment of its own. The driver polls the worker for its
progress events and live counts (`poll`), and passes stops and signals on (`stop`,
`interrupt`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from ..api import Target, api_target, open_backend, open_routes
from ..backends import PROFILES, Secret
from ..config import RunConfig, load_run_catalog
from ..engine import Engine, Summary
from ..engine.events import ProgressEvent, RunSnapshot
from ..engine.run import Part
from ..limiter import Limiter
from ..manifest import BadLine, Chunk, Item, read_chunk
from ..options import RunOptions
from ..outdir import check_output, worker_hold
from ..routing import Endpoint, Health, RoutingLimiter
from ..stores import LocalStore, ObjectStore, Store, open_store
from ..stores.local import TEMP_DIR
from ..stores.objects import check_store
from ..stores.remote import RemoteLedger, RemoteOutput
from .shared import SharedBudget, SharedLimiter


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker of a run is given (never the API key: see `key`)."""

    manifest: Path
    inputs_dir: Path
    out_dir: Path
    options: RunOptions
    url: str
    #: The key of the driver's own mock server (a throwaway); None: each worker reads the key
    #: from its own environment, so it never travels through Ray.
    mock_key: str | None
    limiters: dict[str, Any]  # the hubs' actor handles: a limiter an endpoint
    budget: Any
    queue: Any
    learn_from: tuple[Path, ...] = ()
    #: The output is a bucket (`out_dir` is then the driver's state directory): each worker
    #: keeps its state in `out_dir/ray-SLOT` on its node, and pushes a ledger segment of its own.
    out_url: str | None = None
    #: `--endpoints`: where the requests go instead of `url` (each key from its variable).
    routes: tuple[Endpoint, ...] = ()


@dataclass(frozen=True)
class Polled:
    """What the driver hears from a worker at each poll."""

    events: list[ProgressEvent]
    snapshot: RunSnapshot | None
    stop_reason: str | None
    where: str  # the worker's process and node, for the person running this


class ChunkSource:
    """A worker's items: the chunks it was given, then one chunk at a time from the queue
    until the queue is empty or the run stops (an `engine.Entries`)."""

    def __init__(
        self,
        queue: Any,
        worker: int,
        first: list[Chunk],
        read: Callable[[bytes, Chunk], Any],
    ) -> None:
        self.queue = queue
        self.worker = worker
        self.first = first
        self.read = read
        self.stopping: Callable[[], bool] = lambda: False
        self._total = sum(chunk.entries for chunk in first)  # counted if never read

    def __aiter__(self) -> AsyncIterator[Item | BadLine]:
        return self._entries()

    async def _entries(self) -> AsyncIterator[Item | BadLine]:
        for chunk in self.first:
            data = await self.queue.read.remote(chunk)
            async for entry in self._read(data, chunk):
                yield entry
        while not self.stopping():
            got = await self.queue.take.remote(self.worker)
            if got is None:
                return
            chunk, data = got
            self._total += chunk.entries
            async for entry in self._read(data, chunk):
                yield entry

    async def _read(self, data: bytes, chunk: Chunk) -> AsyncIterator[Item | BadLine]:
        for count, entry in enumerate(self.read(data, chunk)):
            if count % 256 == 0:
                await anyio.lowlevel.checkpoint()
            yield entry

    def total(self) -> int:
        return self._total


class Worker:
    """One worker of a Ray run (the driver makes it an actor)."""

    def __init__(self, spec: WorkerSpec, number: int, slot: int) -> None:
        """`number`: this worker's, unique in the run; `slot`: the place it fills (a worker
        that replaces a dead one fills its slot: its temp area, its state directory)."""
        self.spec = spec
        self.number = number
        self.slot = slot
        self._events: list[ProgressEvent] = []
        self._engine: Engine | None = None
        self._interrupted: str | None = None  # said before the engine started
        self._stopped: str | None = None

    async def run(self, chunks: list[Chunk]) -> tuple[Summary, list[ProgressEvent]]:
        """Run the engine over `chunks`, then the queue's; the summary and the last events."""
        summary = await self._run(chunks)
        events, self._events = self._events, []
        return summary, events

    async def _run(self, chunks: list[Chunk]) -> Summary:
        spec = self.spec
        options = spec.options
        catalog = load_run_catalog(options.catalog, options.prices)
        config = RunConfig(
            manifest=spec.manifest,
            inputs_dir=spec.inputs_dir,
            out_dir=spec.out_dir,
            options=options,
            catalog=catalog,
            learn_from=spec.learn_from,
        )
        target = None
        if not spec.routes:
            profile = PROFILES[options.provider]
            key = Secret(spec.mock_key) if spec.mock_key else api_target(config).key
            target = Target(spec.url, key, profile)

        def read(data: bytes, chunk: Chunk) -> Any:
            return read_chunk(
                data,
                chunk,
                options.defaults,
                catalog=catalog,
                warn=self._warn,
                inputs_dir=spec.inputs_dir,
            )

        source = ChunkSource(spec.queue, self.number, chunks, read)
        if spec.out_url is not None:
            state = spec.out_dir / f"ray-{self.slot}"
            store = open_store(spec.out_url, state)
            assert isinstance(store, ObjectStore)
            RemoteLedger(store, state).check()
            check_output(state)
            await anyio.to_thread.run_sync(check_store, store)  # this node's credentials
            remote = RemoteOutput(store, state, options.upload_every_s, locked=False)
            config = dataclasses.replace(config, out_dir=state)
            return await self._engine_run(config, target, store, source, remote)
        # Its own temp area: the engine empties it at the start, and the others' are busy.
        local = LocalStore(spec.out_dir, temp_dir=spec.out_dir / TEMP_DIR / f"ray-{self.slot}")
        with worker_hold(spec.out_dir):
            return await self._engine_run(config, target, local, source, None)

    async def _engine_run(
        self,
        config: RunConfig,
        target: Target | None,
        store: Store,
        source: ChunkSource,
        remote: RemoteOutput | None,
    ) -> Summary:
        spec, options = self.spec, config.options
        store.temp_dir.mkdir(parents=True, exist_ok=True)
        limiter: Limiter
        if target is None:  # --endpoints: a limiter hub and a backend each
            health = Health(list(spec.limiters))
            hubs = {name: SharedLimiter(hub) for name, hub in spec.limiters.items()}
            limiter = RoutingLimiter(hubs, health)
            opened: Any = open_routes(config, spec.routes, store.temp_dir, health)
        else:
            (hub,) = spec.limiters.values()
            limiter = SharedLimiter(hub)
            opened = open_backend(config, target, store.temp_dir)
        async with opened as backend:
            engine = Engine(
                config,
                backend,
                store,
                progress=self._event,
                limiter=limiter,
                budget=SharedBudget(spec.budget, self.number, options.max_cost_usd),
                remote=remote,
                part=Part(source),
            )
            source.stopping = lambda: engine.control.stopping
            self._engine = engine
            if self._stopped is not None:
                engine.stop(self._stopped)
            if self._interrupted is not None:
                engine.interrupt(self._interrupted)
            return await engine.run()

    def _warn(self, message: str) -> None:
        if self._engine is not None:
            self._engine.warn(message)

    def _event(self, event: ProgressEvent) -> None:
        if event.kind != "started":  # the driver says that, with its own live counts
            self._events.append(dataclasses.replace(event, snapshot=None))

    def poll(self) -> Polled:
        events, self._events = self._events, []
        engine = self._engine
        where = f"pid {os.getpid()} on {socket.gethostname()}"
        if engine is None:
            return Polled(events, None, None, where)
        return Polled(events, engine.snapshot(), engine.summary.stop_reason, where)

    def stop(self, reason: str) -> None:
        """Stop admitting items (another worker met a run-fatal answer, or the budget)."""
        if self._engine is None:
            self._stopped = reason
        else:
            self._engine.stop(reason)

    def interrupt(self, name: str) -> None:
        """A signal at the driver: the first drains (with the grace period), the next cuts."""
        if self._engine is None:
            self._interrupted = name
        else:
            self._engine.interrupt(name)
