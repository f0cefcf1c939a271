"""The Backend interface: how one attempt at an item becomes an answer.

The engine's item runner owns everything around an attempt (the budget, the rate limiter,
retries, turning answers into stored bytes); a backend owns only the wire. It takes one item,
returns an `Answer` (the images, or where to fetch them, with `usage` and the request id) or
raises a `RequestError` subclass that says whether trying again can help (or `Deferred`: taken,
but the answer will come to a later run), and fetches the `url` images an answer points at.
It also has its own rules (`check`): what it cannot send.

Implementations:
- `online.OnlineBackend`: one HTTP request per attempt (OpenAI, Azure, gateways: `profiles`).

OpenAI's Batch API is not one attempt per request: its wire is `batch.BatchAPI` (Files and
Batches, over the online backend's session), driven by `engine.batch.BatchEngine`, which
shares the engine's sink, writer, budget and records (see ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from types import TracebackType

    from .._spool import SpooledImage
    from ..errors import ErrorInfo
    from ..limiter import RateLimitHeaders
    from ..manifest import Item


@dataclass(frozen=True)
class Answer:
    """A successful answer: the `data` entries, `usage` verbatim (whatever its shape: read it
    with `usage.read_usage`), and how long it took.

    Each `data` entry is the API's (`b64_json`, `url`, ...); where the backend already decoded an
    image into its temp area, the entry carries it as `"spooled"` (bytes or a `SpooledImage`).
    """

    data: list[dict[str, Any]]
    usage: Any
    request_id: str | None
    latency_s: float
    echo: dict[str, Any]  # size / quality / output_format / background, where the API said
    ratelimit: RateLimitHeaders | None = None
    #: Usage billed apart from `usage` (e.g. `svg_usage`, the SVG author's tokens), verbatim.
    extra_usage: dict[str, Any] | None = None


class Backend(Protocol):
    """Items in, answers out; see the module docstring. Used as an async context manager."""

    @property
    def where(self) -> str:
        """Where requests go, for messages (never carries a key)."""
        ...

    @property
    def online(self) -> bool:
        """Whether each attempt is one request answered while it waits (seconds to minutes):
        then the account's per-minute limits apply (the engine's rate limiter admits it), it
        counts as in flight for the stall watch, and under a cap the first request of a kind
        whose cost is not published goes alone. False for a backend whose answers come much
        later (a batch), which keeps its own limits and liveness."""
        ...

    def check(self, item: Item) -> ErrorInfo | None:
        """Why this backend cannot send the item (its own rules), or None."""
        ...

    async def send(self, item: Item, *, limit_bytes: int) -> Answer:
        """One attempt. `limit_bytes`: the most of an answer that is read (decompressed); more
        fails the item. Raises a RequestError subclass (see `errors`)."""
        ...

    async def fetch(self, url: str, *, limit_bytes: int) -> bytes | SpooledImage:
        """An image an answer points at (`url` entries), at most `limit_bytes`."""
        ...

    async def __aenter__(self) -> Backend: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
