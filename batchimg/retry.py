"""Retry policy: which failures to retry (by error class) and how long to wait between tries.

The wait is the server's when it asked for one (`RequestError.retry_after_s`, parsed from
`retry-after-ms` / `retry-after`), else exponential backoff with full jitter, capped.

`retrying` is the loop the engine runs each item's attempts in::

    async for attempt in retrying(policy):
        with attempt:
            answer = await send()

A retryable error (`errors.Retryable`) leaving the `with` block is swallowed and the next attempt
follows its wait; any other error, or a retryable one when no attempt is left (or the deadline
would pass), leaves the loop as it was raised. This is tenacity's `AsyncRetrying` reduced to
what the engine asks of it: a few attribute reads per attempt instead of a retry-state object,
an action chain and coroutine checks, which at thousands of items a second cost more than the
request itself.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

from .errors import RequestError, Retryable


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How many tries an item gets and how long to wait between them."""

    max_attempts: int = 6
    backoff_base_s: float = 0.5
    max_backoff_s: float = 30.0
    deadline_s: float | None = None  # no new try would start later than this after the first

    def delay_s(self, attempt: int, error: BaseException) -> float:
        """The wait after failed attempt number `attempt` (1-based): the server's, if it named
        one (at most `MAX_SERVER_WAIT_S`), else a random wait up to the capped exponential."""
        if isinstance(error, RequestError) and error.retry_after_s is not None:
            return min(error.retry_after_s, MAX_SERVER_WAIT_S)
        ceiling = min(self.max_backoff_s, self.backoff_base_s * 2.0 ** min(attempt - 1, 64))
        return random.uniform(0.0, ceiling)


#: The most one item waits because a server said so (a broken `retry-after` must not park it).
MAX_SERVER_WAIT_S = 60.0


class Attempt:
    """One try: a context manager that swallows an error worth another try (see the module)."""

    __slots__ = ("_retrying", "number")

    def __init__(self, number: int, retrying: Retrying) -> None:
        self.number = number  # 1 for the first try
        self._retrying = retrying

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        retrying = self._retrying
        if error is None:
            retrying.done = True
            return False
        if not isinstance(error, Retryable):
            return False
        policy = retrying.policy
        if self.number >= policy.max_attempts:
            return False  # the last error leaves the loop as it was raised
        delay = policy.delay_s(self.number, error)
        deadline = policy.deadline_s
        if deadline is not None and time.monotonic() - retrying.started + delay >= deadline:
            return False
        retrying.delay_s = delay
        return True


class Retrying:
    """The attempts of one call under a `RetryPolicy` (use through `retrying`)."""

    __slots__ = ("_number", "delay_s", "done", "policy", "sleep", "started")

    def __init__(
        self, policy: RetryPolicy, sleep: Callable[[float], Awaitable[None]] | None
    ) -> None:
        if sleep is None:
            import anyio  # not at import: --help and validate load this module too

            sleep = anyio.sleep
        self.policy = policy
        self.sleep = sleep
        self.started = time.monotonic()
        self.done = False
        self.delay_s: float | None = None  # set when an attempt failed and another follows
        self._number = 0

    def __aiter__(self) -> AsyncIterator[Attempt]:
        return self

    async def __anext__(self) -> Attempt:
        if self.done:
            raise StopAsyncIteration
        if self._number:
            delay, self.delay_s = self.delay_s, None
            if delay is None:  # the block was left without `with attempt` ending it
                raise StopAsyncIteration
            await self.sleep(delay)
        self._number += 1
        return Attempt(self._number, self)


def retrying(
    policy: RetryPolicy, *, sleep: Callable[[float], Awaitable[None]] | None = None
) -> Retrying:
    """The attempts of one call under `policy`; the last error is raised when it gives up.
    `sleep`: waits between attempts (default `anyio.sleep`; tests pass a clock of their own)."""
    return Retrying(policy, sleep)
