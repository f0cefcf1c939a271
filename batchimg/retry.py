"""Retry policy: which failures to retry (by error class) and how long to wait between tries.

The wait is the server's when it asked for one (`RequestError.retry_after_s`, parsed from
`retry-after-ms` / `retry-after`), else exponential backoff with full jitter, capped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
)
from tenacity.wait import wait_base, wait_random_exponential

from .errors import RequestError, Retryable


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How many tries an item gets and how long to wait between them."""

    max_attempts: int = 6
    backoff_base_s: float = 0.5
    max_backoff_s: float = 30.0
    deadline_s: float | None = None  # no new try would start later than this after the first


#: The most one item waits because a server said so (a broken `retry-after` must not park it).
MAX_SERVER_WAIT_S = 60.0


class wait_server_or_backoff(wait_base):
    """Wait what the server asked for; without a request, fall back to `backoff`."""

    def __init__(self, backoff: wait_base) -> None:
        self.backoff = backoff

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        if isinstance(exc, RequestError) and exc.retry_after_s is not None:
            return min(exc.retry_after_s, MAX_SERVER_WAIT_S)
        return float(self.backoff(retry_state))


def retrying(
    policy: RetryPolicy, *, sleep: Callable[[float], Awaitable[None]] | None = None
) -> AsyncRetrying:
    """A tenacity controller applying `policy`; re-raises the last error when it gives up."""
    extra = {} if sleep is None else {"sleep": sleep}
    return AsyncRetrying(
        stop=(
            stop_after_attempt(policy.max_attempts)
            if policy.deadline_s is None
            else stop_after_attempt(policy.max_attempts) | stop_before_delay(policy.deadline_s)
        ),
        wait=wait_server_or_backoff(
            wait_random_exponential(multiplier=policy.backoff_base_s, max=policy.max_backoff_s)
        ),
        retry=retry_if_exception_type(Retryable),
        reraise=True,
        **extra,  # type: ignore[arg-type]
    )
