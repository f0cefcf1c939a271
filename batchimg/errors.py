"""Errors, as a small tree whose classes decide what happens next.

    BatchimgError
    ├── UsageError            bad invocation or unreadable manifest: exit 2, nothing sent
    ├── StorageError          the output directory cannot be written (disk full, read-only):
    │                         the run stops (exit 3) with the ledger still whole
    └── RequestError          one request to the API went wrong; carries what the API said
        ├── Retryable         try the same request again (after `retry_after_s` if the server said)
        │   ├── RateLimited       429 rate_limit_exceeded
        │   ├── ServerError       408, 409, 5xx
        │   └── TransportError    timeouts, dropped connections, bodies that are not the JSON
        │                         the API promises (HTML error pages, truncated or empty bodies)
        ├── ItemFailed        this item will never succeed as asked: 400 (moderation, invalid
        │                     value, unknown parameter), 404, 413, image bytes that do not decode
        └── RunFatal          every later request would fail too: 401, 403, quota exhausted.
                              The engine stops admitting work and exits 3.

`classify(...)` turns an HTTP answer into one of these; nothing else in the package inspects
status codes or error codes to decide on retries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .limiter import RateLimitHeaders

#: 429 codes that mean the account, not the moment, is the problem.
QUOTA_CODES = frozenset(
    {"insufficient_quota", "billing_hard_limit_reached", "credit_balance_exhausted"}
)


class BatchimgError(Exception):
    """Base class of every error batchimg raises on purpose."""


class UsageError(BatchimgError):
    """The run cannot start as invoked (bad option, missing key, unreadable manifest)."""


class Deferred(BatchimgError):
    """A backend took the item but its answer will not come while this run waits: the item
    is pending, no line is written, and the run exits 75 (run the same command again later)."""


class StorageError(BatchimgError):
    """Images or ledger lines cannot be written; nothing more can be kept, so stop."""

    advice = "free space (or fix the output directory)"  # what a person does about it


class ObjectRejected(StorageError):
    """A store will not take one object (its key, its size): that item fails, the run goes on."""


class StoreRefused(StorageError):
    """A store refuses writes (permissions, bucket gone, credentials expired): stop the run.
    `kept`: the files of the item being stored that were kept aside locally (parked) or are
    in the store already, so the item's answer, paid for, is not lost."""

    advice = "fix the store's access (credentials, permissions, the bucket)"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.kept: list[Any] = []


@dataclass(frozen=True)
class ErrorInfo:
    """What the ledger keeps of a failure: `{code, type, message, http_status, request_id}`."""

    message: str
    code: str | None = None
    type: str | None = None
    http_status: int | None = None
    request_id: str | None = None

    def as_record(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "type": self.type,
            "message": self.message,
            "http_status": self.http_status,
            "request_id": self.request_id,
        }


class RequestError(BatchimgError):
    """One request failed; `info` says how, in the API's own words where it gave any."""

    def __init__(
        self,
        info: ErrorInfo,
        *,
        retry_after_s: float | None = None,
        ratelimit: RateLimitHeaders | None = None,
    ) -> None:
        super().__init__(info.message)
        self.info = info
        self.retry_after_s = retry_after_s
        self.ratelimit = ratelimit  # the answer's x-ratelimit-* headers, for the limiter

    def __str__(self) -> str:
        parts = [f"HTTP {self.info.http_status}" if self.info.http_status else None, self.info.code]
        prefix = " ".join(p for p in parts if p)
        return f"{prefix}: {self.info.message}" if prefix else self.info.message


class Retryable(RequestError):
    """Worth sending again."""


class RateLimited(Retryable):
    """429 rate_limit_exceeded: the server asks us to slow down."""


class ServerError(Retryable):
    """408, 409 or 5xx."""


class TransportError(Retryable):
    """The answer never arrived whole: timeout, dropped connection, unparseable body."""


class ItemFailed(RequestError):
    """This item fails as asked; retrying would only pay again for the same answer."""


class RunFatal(RequestError):
    """No later request can succeed either (bad key, no quota): stop the run."""


#: Failures of requests that never went out (nothing can have been billed).
#: `endpoint_down`: one of several endpoints (`--endpoints`) could not be reached, and the
#: request goes to another (never sent, so never billed).
NOT_SENT_CODES = frozenset({"connect_error", "input_error", "endpoint_down"})


def may_have_been_billed(error: RequestError) -> bool:
    """Whether the API may have generated (and billed) the request: no error status came back
    (a timeout, a dropped or cut-off answer, bytes that do not decode) and it was sent."""
    status = error.info.http_status
    if status is not None and status >= 400:
        return False
    return error.info.code not in NOT_SENT_CODES


def classify(
    status: int,
    body: Any,
    *,
    request_id: str | None = None,
    retry_after_s: float | None = None,
    should_retry: bool | None = None,
) -> RequestError:
    """Map an HTTP error answer (status + parsed body, or None) to the right error class.

    `should_retry` is the server's `x-should-retry` header, which overrides the status.
    """
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {}
    code = error.get("code")
    code = str(code) if code is not None else None
    info = ErrorInfo(
        message=str(error.get("message") or f"HTTP {status} with no error message"),
        code=code,
        type=str(error["type"]) if error.get("type") is not None else None,
        http_status=status,
        request_id=request_id,
    )
    quota = code is not None and (code in QUOTA_CODES or code.endswith("_spend_limit_exceeded"))
    # Exhausted accounts answer 429 insufficient_quota, but also 400 billing_hard_limit_reached.
    if status in (401, 403) or quota:
        return RunFatal(info)
    if should_retry is True:
        cls: type[RequestError] = RateLimited if status == 429 else ServerError
        return cls(info, retry_after_s=retry_after_s)
    if should_retry is False:
        return ItemFailed(info)
    if status == 429:
        return RateLimited(info, retry_after_s=retry_after_s)
    if status in (408, 409) or status >= 500:
        return ServerError(info, retry_after_s=retry_after_s)
    return ItemFailed(info)
