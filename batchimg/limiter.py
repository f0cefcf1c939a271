"""Admission control: send as fast as the account's limits allow, and no faster.

Three optional static budgets from the user (`rpm`, `ipm`, `tpm`) are token buckets refilled
continuously with a short burst. With no flags the limiter learns from the server:

- every answer's `x-ratelimit-limit-*` headers set a ceiling (requests, images and tokens per
  minute); `remaining` at zero pauses admission until the matching `reset`;
- a 429 pauses *all* admission until the server's retry time and cuts the admission rate by a
  fifth; each success raises it again by 5 %, never above a learned ceiling. Increases are
  proportional rather than additive because image limits span 5 images/min to many requests/s.

Concurrency stays a ceiling set elsewhere; this module only decides *when* the next request may
go. A request heavier than a bucket's size is admitted when the bucket is full and leaves it in
debt, so large weights never deadlock. The clock and the sleep are injectable for tests.
"""

from __future__ import annotations

import functools
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anyio

#: Longest a server-requested pause is honoured for (a bad header must not stall a run): a
#: `retry-after`, or an `x-ratelimit-reset-*` with nothing remaining. Per-minute budgets reset
#: within a minute; a longer wait is a broken header, and it is said once.
MAX_PAUSE_S = 60.0
#: The admission rate never drops below this (requests per second).
MIN_RATE_PER_S = 0.05
#: How much burst a bucket allows, in seconds of its rate.
BURST_S = 0.1
RECENT_S = 10.0  # the admitted rate is measured over this window
DECREASE = 0.8  # multiplicative decrease on a 429
#: Growth per success. Scale-free, so it suits 5 images/min and 50 requests/s alike; and above
#: ln(1/DECREASE)/(1/p - 1) for a 429 share p of 12 %, so random 429s do not collapse the rate.
INCREASE = 0.05

_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_go_duration(value: str | None) -> float | None:
    """Seconds in a Go-style duration (`1s`, `6m0s`, `12ms`, `1m30.5s`); None if not one."""
    if not value:
        return None
    return _go_duration(value) if len(value) <= 32 else _go_duration.__wrapped__(value)


@functools.lru_cache(maxsize=1024)  # every answer brings three; most repeat
def _go_duration(value: str) -> float | None:
    text = value.strip()
    if text in ("0", "0s"):
        return 0.0
    pos, total = 0, 0.0
    for match in _GO_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos > 0 else None


@dataclass(frozen=True)
class RateLimitHeaders:
    """The `x-ratelimit-*` headers of one answer, parsed; None where absent or garbled."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
    limit_images: int | None = None
    remaining_images: int | None = None
    reset_images_s: float | None = None

    @classmethod
    def parse(cls, headers: Mapping[str, str]) -> RateLimitHeaders | None:
        values: list[int | float | None] = []
        for limit, remaining, reset in _HEADER_NAMES:
            values.append(_count(headers.get(limit)))
            values.append(_count(headers.get(remaining)))
            values.append(parse_go_duration(headers.get(reset)))
        if values.count(None) == len(values):
            return None
        return cls(*values)  # type: ignore[arg-type]


#: Each kind's headers, in the order of `RateLimitHeaders`' fields.
_HEADER_NAMES = tuple(
    (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}")
    for kind in ("requests", "tokens", "images")
)


#: What `observe` reads of each kind: its name and its fields in `RateLimitHeaders`.
_OBSERVED = tuple(
    (kind, f"limit_{kind}", f"remaining_{kind}", f"reset_{kind}_s")
    for kind in ("requests", "images", "tokens")
)


def _count(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        return None
    return number if number >= 0 else None


class TokenBucket:
    """`rate_per_s` tokens a second up to `capacity`; weights above capacity go into debt."""

    def __init__(self, rate_per_s: float, clock: Callable[[], float], burst_s: float = BURST_S):
        self.clock = clock
        self.burst_s = burst_s
        self.rate_per_s = rate_per_s
        self.capacity = max(1.0, rate_per_s * burst_s)
        self.tokens = self.capacity
        self._updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._updated) * self.rate_per_s)
        self._updated = now

    def set_rate(self, rate_per_s: float) -> None:
        self._refill()
        self.rate_per_s = rate_per_s
        self.capacity = max(1.0, rate_per_s * self.burst_s)
        self.tokens = min(self.tokens, self.capacity)

    def wait_s(self, weight: float) -> float:
        """Seconds until `weight` may be taken (0: now)."""
        self._refill()
        need = min(weight, self.capacity)
        if self.tokens >= need:
            return 0.0
        return (need - self.tokens) / self.rate_per_s

    def take(self, weight: float) -> None:
        self._refill()
        self.tokens -= weight

    def give_back(self, weight: float) -> None:
        """Return over-estimated weight (e.g. tokens a request did not use)."""
        self._refill()
        self.tokens = min(self.capacity, self.tokens + weight)


@dataclass(frozen=True)
class LimiterStats:
    """What a progress view and the end summary show."""

    admitted_per_min: float  # admissions over the last 10 s, per minute
    rate_cap_per_min: float | None  # the adaptive admission rate now (None: not limiting)
    learned_rpm: int | None
    learned_ipm: int | None
    learned_tpm: int | None
    rate_limited: int  # 429 answers seen
    paused_s: float  # time all admission was paused by 429s and exhausted budgets


#: A limiter's stats before anything was admitted (a remote one's, until it is heard from).
IDLE_STATS = LimiterStats(0.0, None, None, None, None, 0, 0.0)


class Limiter:
    """Decides when each request may be sent; one per run, shared by all workers."""

    def __init__(
        self,
        *,
        rpm: float | None = None,
        ipm: float | None = None,
        tpm: float | None = None,
        adaptive: bool = True,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        note: Callable[[str, str], None] | None = None,
    ) -> None:
        """`note(key, message)` hears what the limiter chose not to believe (once per key)."""
        self.clock = clock
        self.sleep = sleep
        self.note = note
        self.adaptive = adaptive
        self._static = {
            kind: TokenBucket(per_min / 60, clock)
            for kind, per_min in (("requests", rpm), ("images", ipm), ("tokens", tpm))
            if per_min
        }
        self._learned: dict[str, TokenBucket] = {}
        self._learned_limits: dict[str, int] = {}
        self._rate: TokenBucket | None = None  # adaptive request rate; None until needed
        self._all: list[tuple[str, TokenBucket]] | None = None  # every bucket (`_buckets`)
        self._pause_until = 0.0
        self._last_cut = -math.inf
        self._admitted: deque[float] = deque()
        self.rate_limited = 0
        self.paused_s = 0.0
        self.admitted_at = 0.0  # when the last request was admitted

    # -- admission --

    async def acquire(self, *, images: int = 1, tokens: int = 0) -> float:
        """Wait until one request of `images` images and ~`tokens` tokens may go.

        Returns the admission time, to hand back to `on_rate_limited` if the request gets a 429.
        """
        while (wait := self.try_acquire(images=images, tokens=tokens)) > 0:
            await self.sleep(wait)
        return self.admitted_at

    def try_acquire(self, *, images: int = 1, tokens: int = 0) -> float:
        """Admit one request now if the limits let it go (0.0; its time is `admitted_at`), else
        the seconds until they may."""
        weights = {"requests": 1.0, "images": float(images), "tokens": float(tokens)}
        now = self.clock()
        wait = self._pause_until - now
        buckets = self._buckets()
        for kind, bucket in buckets:
            bucket_wait = bucket.wait_s(weights[kind])
            wait = max(wait, bucket_wait)
            if bucket_wait > MAX_PAUSE_S and self._learned.get(kind) is bucket:
                self._say_long_wait(kind, bucket_wait, weights[kind])
        if wait > 1e-6:  # float dust must not turn into an endless loop of tiny sleeps
            return wait
        for kind, bucket in buckets:
            bucket.take(weights[kind])
        admitted = self._admitted
        admitted.append(now)
        while admitted[0] < now - RECENT_S:  # only this (event-loop) side trims
            admitted.popleft()
        self.admitted_at = now
        return 0.0

    async def admit_now(self, *, images: int = 1, tokens: int = 0) -> float:
        """`try_acquire`, for a caller that may ask several limiters in turn (a remote one
        answers over the network)."""
        return self.try_acquire(images=images, tokens=tokens)

    def bind(
        self,
        sleep: Callable[[float], Awaitable[None]],
        note: Callable[[str, str], None] | None = None,
    ) -> None:
        """Wait with `sleep` and say notes to `note`, where the limiter was given none of its
        own: an engine given a limiter binds it, so its waits end when the run stops."""
        if self.sleep is anyio.sleep:
            self.sleep = sleep
        if self.note is None:
            self.note = note

    def paused_for_s(self) -> float:
        """How long all admission stays paused (a 429's retry time, a budget at zero)."""
        return max(0.0, self._pause_until - self.clock())

    def _say_long_wait(self, kind: str, wait_s: float, weight: float) -> None:
        if self.note is None:
            return
        limit = self._learned_limits.get(kind, 0)
        self.note(
            f"long-wait:{kind}",
            f"requests wait {wait_s:,.0f} s each for the server's limit of {limit:,} {kind} a "
            f"minute (x-ratelimit-limit-{kind}), a request weighing {weight:,.0f}: if that "
            "limit is wrong, run with --no-adaptive and --rpm/--ipm/--tpm",
        )

    def _buckets(self) -> list[tuple[str, TokenBucket]]:
        """Every bucket a request takes from (made again when one is added)."""
        found = self._all
        if found is None:
            found = list(self._static.items()) + list(self._learned.items())
            if self._rate is not None:
                found.append(("requests", self._rate))
            self._all = found
        return found

    def settle_tokens(self, estimated: int, actual: int) -> None:
        """Correct the token budgets once a request's real usage is known."""
        for buckets in (self._static, self._learned):
            bucket = buckets.get("tokens")
            if bucket is not None:
                if actual > estimated:
                    bucket.take(actual - estimated)
                else:
                    bucket.give_back(estimated - actual)

    # -- feedback --

    def observe(self, headers: RateLimitHeaders | None) -> None:
        """Learn ceilings from `x-ratelimit-*`; pause when a budget reports none remaining."""
        if headers is None or not self.adaptive:
            return
        for kind, limit_field, remaining_field, reset_field in _OBSERVED:
            limit = getattr(headers, limit_field)
            if limit:
                self._learn(kind, limit)
            if getattr(headers, remaining_field) == 0:
                reset_s = getattr(headers, reset_field)
                if reset_s:
                    self._pause(reset_s, f"x-ratelimit-reset-{kind}")

    def _learn(self, kind: str, per_min: int) -> None:
        if self._learned_limits.get(kind) == per_min:
            return
        self._learned_limits[kind] = per_min
        rate = per_min / 60
        if kind in self._learned:
            self._learned[kind].set_rate(rate)
        else:
            self._learned[kind] = TokenBucket(rate, self.clock)
            self._all = None
        if kind == "requests" and self._rate is not None and self._rate.rate_per_s > rate:
            self._rate.set_rate(rate)

    def on_success(self) -> None:
        """Raise the adaptive rate after a success, up to the learned ceiling."""
        if self._rate is None:
            return
        current = self._rate.rate_per_s
        used = self._recent_rate_per_s(self.clock())
        if current > 2 * used:
            return  # the rate is not what holds requests back: growing it would only overshoot
        rate = current * (1 + INCREASE)
        ceiling = self._learned_limits.get("requests")
        if ceiling is not None:
            rate = min(rate, ceiling / 60)
        self._rate.set_rate(rate)

    def on_rate_limited(
        self,
        retry_after_s: float | None,
        headers: RateLimitHeaders | None,
        sent_at: float | None = None,
    ) -> None:
        """A 429: pause everyone until the server's retry time and cut the admission rate.

        Only a request admitted after the last cut is evidence against the current rate: 429s
        for requests sent before it (one burst) do not cut again.
        """
        self.rate_limited += 1
        if not self.adaptive:
            return  # static budgets only: each item waits its own retry-after
        self.observe(headers)
        self._pause(retry_after_s if retry_after_s is not None else 1.0, "retry-after")
        now = self.clock()
        if (sent_at is not None and sent_at < self._last_cut) or now - self._last_cut < 0.25:
            return  # one burst of 429s is one congestion signal, not many
        self._last_cut = now
        base = self._rate.rate_per_s if self._rate is not None else self._recent_rate_per_s(now)
        rate = max(MIN_RATE_PER_S, base * DECREASE)
        if self._rate is None:
            self._rate = TokenBucket(rate, self.clock)
            self._all = None
            self._rate.tokens = 0.0  # no burst right after a 429
        else:
            self._rate.set_rate(rate)

    def _pause(self, seconds: float, source: str = "") -> None:
        now = self.clock()
        if seconds > MAX_PAUSE_S and self.note is not None:
            self.note(
                f"pause:{source}",
                f"the server asked to wait {seconds:,.0f} s ({source}); waiting "
                f"{MAX_PAUSE_S:.0f} s at most, as no per-minute limit needs longer",
            )
        until = now + min(seconds, MAX_PAUSE_S)
        if until > self._pause_until:
            self.paused_s += until - max(now, self._pause_until)
            self._pause_until = until

    def _recent_rate_per_s(self, now: float) -> float:
        """Admissions per second over the last RECENT_S (event-loop side: it may trim)."""
        admitted = self._admitted
        while admitted and admitted[0] < now - RECENT_S:
            admitted.popleft()
        if not admitted:
            return MIN_RATE_PER_S
        return len(admitted) / max(1.0, now - admitted[0])

    def _observed_per_min(self, now: float) -> float:
        """The admitted rate for `stats()`, which a view calls from its own thread: it reads a
        copy (list() of a deque is atomic under the GIL) and never trims."""
        recent = [t for t in list(self._admitted) if t >= now - RECENT_S]
        return len(recent) / max(1.0, now - recent[0]) * 60 if recent else 0.0

    def stats(self) -> LimiterStats:
        now = self.clock()
        return LimiterStats(
            admitted_per_min=self._observed_per_min(now),
            rate_cap_per_min=self._rate.rate_per_s * 60 if self._rate is not None else None,
            learned_rpm=self._learned_limits.get("requests"),
            learned_ipm=self._learned_limits.get("images"),
            learned_tpm=self._learned_limits.get("tokens"),
            rate_limited=self.rate_limited,
            paused_s=self.paused_s,
        )


def combined_stats(parts: list[LimiterStats]) -> LimiterStats:
    """Several limiters' stats as one (the endpoints of a run): rates and counts added."""

    def total(values: list[int | None]) -> int | None:
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    caps = [s.rate_cap_per_min for s in parts if s.rate_cap_per_min is not None]
    return LimiterStats(
        admitted_per_min=sum(s.admitted_per_min for s in parts),
        rate_cap_per_min=sum(caps) if caps else None,
        learned_rpm=total([s.learned_rpm for s in parts]),
        learned_ipm=total([s.learned_ipm for s in parts]),
        learned_tpm=total([s.learned_tpm for s in parts]),
        rate_limited=sum(s.rate_limited for s in parts),
        paused_s=max((s.paused_s for s in parts), default=0.0),
    )
