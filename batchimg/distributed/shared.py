"""One account's limits and one budget for many workers: the hubs (held by Ray actors) and the
proxies each worker's engine uses in place of its own `Limiter` and `Budget`.

The hubs are plain classes (the driver wraps them with `ray.remote`), so they read and test
like the rest of the code:

- `LimiterHub` holds the run's one `Limiter` (static budgets, learned ceilings, 429 pauses,
  the adaptive rate). A worker asks it for permits in batches: every request of the worker
  waiting at that moment is admitted in one call if the limits let them all go now, so the hub
  is one round trip per batch, not per request. What the worker learned since its last call
  (successes, the latest `x-ratelimit-*` headers, tokens over or under the estimate) rides
  along with the next call; a 429, or headers saying nothing remains, go at once.
- `BudgetHub` holds the cap: committed spend and every worker's reservations. A reservation
  that does not fit waits for any worker's settlement; a worker that dies has its reservations
  counted as spent (they may have been sent), so the cap holds over the whole cluster.
- `ChunkQueue` hands out the manifest's chunks, one at a time, to whichever worker asks first
  (work stealing), and remembers which worker took which.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from ..budget import Budget
from ..limiter import IDLE_STATS, Limiter, LimiterStats, RateLimitHeaders
from ..manifest import Chunk
from ..pricing import Bound

#: A batch of permits is used within this long, or dropped (the limits have moved on).
PERMIT_TTL_S = 1.0
#: The longest a worker waits for another's settlement before asking again.
SETTLE_WAIT_S = 1.0


@dataclass(frozen=True)
class Feedback:
    """What a worker learned from its answers since its last call to the hub."""

    successes: int = 0
    headers: RateLimitHeaders | None = None  # the latest answer's
    tokens_over: int = 0  # tokens used beyond the estimates (negative: under)


@dataclass(frozen=True)
class Grant:
    """The hub's answer: `count` requests may go now (admitted at `admitted_at`, the hub's
    clock), or, when 0, none before `wait_s`; the limits as they stand; what to tell the
    person (`notes`: key, message)."""

    count: int
    wait_s: float
    admitted_at: float
    stats: LimiterStats
    notes: tuple[tuple[str, str], ...] = ()


class LimiterHub:
    """The run's `Limiter`, consulted by every worker."""

    def __init__(
        self, *, rpm: float | None, ipm: float | None, tpm: float | None, adaptive: bool
    ) -> None:
        self._notes: list[tuple[str, str]] = []
        self.limiter = Limiter(rpm=rpm, ipm=ipm, tpm=tpm, adaptive=adaptive, note=self._note)
        self._noted: set[str] = set()

    def _note(self, key: str, message: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            self._notes.append((key, message))

    def grant(self, want: int, images: int, tokens: int, feedback: Feedback) -> Grant:
        """Up to `want` permits for requests of this weight, as many as may go now."""
        self.learn(feedback)
        limiter = self.limiter
        count, wait_s = 0, 0.0
        while count < want:
            wait_s = limiter.try_acquire(images=images, tokens=tokens)
            if wait_s > 0:
                break
            count += 1
        notes, self._notes = tuple(self._notes), []
        return Grant(count, 0.0 if count else wait_s, limiter.admitted_at, limiter.stats(), notes)

    def learn(self, feedback: Feedback) -> None:
        limiter = self.limiter
        limiter.observe(feedback.headers)
        for _ in range(min(feedback.successes, 64)):  # past a few, more change nothing
            limiter.on_success()
        if feedback.tokens_over:  # over (taken) or under (given back) the estimates
            limiter.settle_tokens(0, feedback.tokens_over)

    def rate_limited(
        self, retry_after_s: float | None, headers: RateLimitHeaders | None, sent_at: float
    ) -> None:
        self.limiter.on_rate_limited(retry_after_s, headers, sent_at)

    def stats(self) -> LimiterStats:
        return self.limiter.stats()


class SharedLimiter(Limiter):
    """A worker's limiter: permits from the `LimiterHub` (`hub`: its actor handle)."""

    def __init__(self, hub: Any) -> None:
        super().__init__(adaptive=False)
        self.hub = hub
        self._stock = 0  # permits granted and not used yet
        self._stock_at = 0.0  # when they were admitted (the hub's clock)
        self._stock_until = 0.0  # used by then, or dropped (this process's clock)
        self._asking = anyio.Lock()  # one call to the hub at a time; the others wait for it
        self._waiting = 0
        self._successes = 0
        self._headers: RateLimitHeaders | None = None
        self._tokens_over = 0
        self._stats = IDLE_STATS

    async def acquire(self, *, images: int = 1, tokens: int = 0) -> float:
        self._waiting += 1
        try:
            while not self._take():
                async with self._asking:  # the others wait here, then find permits in hand
                    if self._take():
                        break
                    wait = await self._ask(images, tokens)
                    if wait > 0:
                        await self.sleep(wait)  # the run's wait: it ends if the run stops
            return self.admitted_at
        finally:
            self._waiting -= 1

    async def admit_now(self, *, images: int = 1, tokens: int = 0) -> float:
        self._waiting += 1
        try:
            if self._take():
                return 0.0
            async with self._asking:
                if self._take():
                    return 0.0
                wait = await self._ask(images, tokens)
                if wait > 0:
                    return wait
                self._take()  # one of the permits just granted
                return 0.0
        finally:
            self._waiting -= 1

    async def _ask(self, images: int, tokens: int) -> float:
        """One batch of permits from the hub (put in hand): 0.0, else the wait it says."""
        grant: Grant = await self.hub.grant.remote(self._waiting, images, tokens, self._feedback())
        self._stats = grant.stats
        for key, message in grant.notes:
            if self.note is not None:
                self.note(key, message)
        if not grant.count:
            return grant.wait_s
        self._stock, self._stock_at = grant.count, grant.admitted_at
        self._stock_until = time.monotonic() + PERMIT_TTL_S
        return 0.0

    def _take(self) -> bool:
        if self._stock and time.monotonic() < self._stock_until:
            self._stock -= 1
            self.admitted_at = self._stock_at
            return True
        self._stock = 0
        return False

    def _feedback(self) -> Feedback:
        feedback = Feedback(self._successes, self._headers, self._tokens_over)
        self._successes, self._headers, self._tokens_over = 0, None, 0
        return feedback

    def _send_feedback(self) -> None:
        self.hub.learn.remote(self._feedback())  # not waited for: it is news, not a question

    def observe(self, headers: RateLimitHeaders | None) -> None:
        if headers is None:
            return
        self._headers = headers
        if 0 in (headers.remaining_requests, headers.remaining_images, headers.remaining_tokens):
            self._stock = 0
            self._send_feedback()  # a budget at zero pauses everyone now, not at the next ask

    def on_success(self) -> None:
        self._successes += 1

    def settle_tokens(self, estimated: int, actual: int) -> None:
        self._tokens_over += actual - estimated

    def on_rate_limited(
        self,
        retry_after_s: float | None,
        headers: RateLimitHeaders | None,
        sent_at: float | None = None,
    ) -> None:
        self.rate_limited += 1
        self._stock = 0  # the permits in hand were granted before the hub heard of this
        self.hub.rate_limited.remote(retry_after_s, headers, sent_at or 0.0)

    def stats(self) -> LimiterStats:
        return self._stats


@dataclass(frozen=True)
class Reservation:
    """The hub's answer to a reservation: whether it fits, and the budget as it stands."""

    ok: bool
    in_flight: int  # reservations outstanding, all workers'
    version: int  # settlements so far (what to wait past)
    spent_usd: float
    reserved_usd: float


class BudgetHub:
    """The cap over every worker: committed spend and each worker's reservations."""

    def __init__(self, cap_usd: float | None, spent_usd: float) -> None:
        self.cap_usd = cap_usd
        self.spent_usd = spent_usd  # the output's spend so far (the ledger), then this run's
        self._held: dict[int, list[float]] = {}  # per worker: reserved amounts outstanding
        self._version = 0
        self._settled: asyncio.Event | None = None

    @property
    def reserved_usd(self) -> float:
        return sum(sum(amounts) for amounts in self._held.values())

    def _answer(self, ok: bool) -> Reservation:
        in_flight = sum(len(amounts) for amounts in self._held.values())
        return Reservation(ok, in_flight, self._version, self.spent_usd, self.reserved_usd)

    def reserve(self, worker: int, worst_usd: float) -> Reservation:
        fits = (
            self.cap_usd is None
            or self.spent_usd + self.reserved_usd + worst_usd <= self.cap_usd + 1e-12
        )
        if fits:
            self._held.setdefault(worker, []).append(worst_usd)
        return self._answer(fits)

    async def wait_settled(self, version: int) -> None:
        """Return once a settlement after `version` happened (or SETTLE_WAIT_S passed)."""
        if self._version > version:
            return
        if self._settled is None:
            self._settled = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), SETTLE_WAIT_S)

    def _wake(self) -> None:
        self._version += 1
        if self._settled is not None:
            self._settled.set()
            self._settled = None

    def settle(self, worker: int, reserved_usd: float, actual_usd: float) -> None:
        amounts = self._held.get(worker, [])
        with contextlib.suppress(ValueError):
            amounts.remove(reserved_usd)
        self.spent_usd += actual_usd
        self._wake()

    def charge(self, actual_usd: float) -> None:
        self.spent_usd += actual_usd

    def worker_gone(self, worker: int) -> float:
        """A worker died: what it had reserved counts as spent (each request may have gone
        out and been billed); returns that amount."""
        amounts = self._held.pop(worker, [])
        lost = sum(amounts)
        self.spent_usd += lost
        self._wake()
        return lost

    def totals(self) -> tuple[float, float]:
        return self.spent_usd, self.reserved_usd


class SharedBudget(Budget):
    """A worker's budget: reservations and settlements go through the `BudgetHub` (`hub`)."""

    def __init__(self, hub: Any, worker: int, cap_usd: float | None) -> None:
        super().__init__(cap_usd)
        self.hub = hub
        self.worker = worker

    def _mirror(self, answer: Reservation) -> None:
        self.spent_usd, self.reserved_usd = answer.spent_usd, answer.reserved_usd

    async def reserve(self, bound: Callable[[], Bound]) -> float | None:
        while True:
            worst_usd = bound().cost_usd
            answer: Reservation = await self.hub.reserve.remote(self.worker, worst_usd)
            self._mirror(answer)
            if answer.ok:
                return worst_usd
            if not answer.in_flight:
                return None
            await self.hub.wait_settled.remote(answer.version)

    def charge(self, actual_usd: float) -> None:
        self.spent_usd += actual_usd
        self.hub.charge.remote(actual_usd)  # not waited for: no cap waits on it

    def settle(self, reserved_usd: float, actual_usd: float) -> None:
        self.reserved_usd = max(0.0, self.reserved_usd - reserved_usd)
        self.spent_usd += actual_usd
        # Not waited for: calls from one worker run in order, so its next reservation is
        # judged after this settlement; until the hub runs it, the cap only errs on the safe
        # side (the reservation is still counted).
        self.hub.settle.remote(self.worker, reserved_usd, actual_usd)


class ChunkQueue:
    """The manifest's chunks, handed out in order to whichever worker asks (work stealing)."""

    def __init__(self, manifest: str, chunks: list[Chunk]) -> None:
        self.manifest = Path(manifest)
        self._left = deque(chunks)
        self._taken: dict[int, list[Chunk]] = {}
        self._closed = False

    def take(self, worker: int) -> tuple[Chunk, bytes] | None:
        """The next chunk and its bytes; None when there is none (or the run stops)."""
        if self._closed or not self._left:
            return None
        chunk = self._left.popleft()
        self._taken.setdefault(worker, []).append(chunk)
        return chunk, self.read(chunk)

    def read(self, chunk: Chunk) -> bytes:
        with open(self.manifest, "rb") as fh:
            fh.seek(chunk.start)
            return fh.read(chunk.end - chunk.start)

    def give(self, worker: int, chunks: list[Chunk]) -> None:
        """`chunks` belong to `worker` from now on (a dead worker's, to its replacement)."""
        self._taken.setdefault(worker, []).extend(chunks)

    def forget(self, worker: int) -> list[Chunk]:
        """The chunks a (dead) worker took."""
        return self._taken.pop(worker, [])

    def close(self) -> list[Chunk]:
        """Hand out nothing more; the chunks nobody took (every time it is asked)."""
        self._closed = True
        return list(self._left)
