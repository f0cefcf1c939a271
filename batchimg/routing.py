"""Several keys or deployments in one run (`--endpoints FILE`): each item goes to the first
endpoint whose limits let it go now.

Each endpoint has its own limiter (learned ceilings, 429 pauses, the adaptive rate, and its
`rpm`/`ipm`/`tpm` if the file gives them; on Ray, a hub of its own). `RoutingLimiter` asks them
in the file's order and admits a request through the first with headroom, else waits for the
first to have some; the endpoint it chose is the attempt's route (a context variable of the
item's task), which `RoutedBackend` sends through and to whose limiter the answer's feedback
(a 429, headers, usage) goes. The file, JSON (a list) or JSON Lines:

    {"name": "east", "base_url": "https://east.example/v1", "key_env": "EAST_KEY", "rpm": 300}
    {"name": "west", "base_url": "https://west.example/v1", "key_env": "WEST_KEY"}

`key_env` names the variable that holds the endpoint's key (keys never go in the file);
`provider` (default: the run's `--provider`), `rpm`, `ipm`, `tpm` are optional.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import orjson

from ._spool import SpooledImage
from .backends import PROFILES, Backend, Secret
from .backends.base import Answer
from .errors import ErrorInfo, RequestError, Retryable, RunFatal, ServerError, UsageError
from .limiter import Limiter, LimiterStats, RateLimitHeaders, combined_stats
from .manifest import Item
from .options import RunOptions

#: The endpoint the current attempt was admitted through (set by `RoutingLimiter.acquire`).
ROUTE: contextvars.ContextVar[str | None] = contextvars.ContextVar("batchimg_route", default=None)

COOLDOWN_S = 2.0  # an endpoint that failed is passed over this long (doubling, see Health)
MAX_COOLDOWN_S = 60.0
MIN_PER_MIN = 0.01  # the least rpm, ipm or tpm an endpoint may have (as the flags)
_FIELDS = {"name", "base_url", "key_env", "provider", "rpm", "ipm", "tpm"}
_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Endpoint:
    """One key or deployment: where requests go, the variable its key is in, its limits."""

    name: str
    base_url: str
    key_env: str
    provider: str = "openai"
    rpm: float | None = None
    ipm: float | None = None
    tpm: float | None = None

    def limits(self, options: RunOptions) -> dict[str, Any]:
        """Its limiter's settings: its own limits, else the run's flags."""
        return {
            "rpm": self.rpm or options.rpm,
            "ipm": self.ipm or options.ipm,
            "tpm": self.tpm or options.tpm,
            "adaptive": options.adaptive_rate,
        }

    def key(self) -> Secret:
        """The key, from this process's environment (UsageError naming the variable)."""
        try:
            return PROFILES[self.provider].api_key_from_env(key_env=self.key_env)
        except UsageError:
            raise UsageError(
                f"--endpoints: endpoint {self.name}: no key in ${self.key_env}: set it (the "
                "variable the file names for it)"
            ) from None


def load_endpoints(path: Path, provider: str = "openai") -> tuple[Endpoint, ...]:
    """The endpoints a file lists; UsageError naming the entry for anything wrong in it."""
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read --endpoints {path}: {exc.strerror or exc}") from None
    try:
        whole = orjson.loads(text)
        entries = whole if isinstance(whole, list) else [whole]
    except orjson.JSONDecodeError:
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            try:
                entries.append(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                raise UsageError(f"--endpoints {path}: line {number}: not JSON ({exc})") from None
    found = tuple(_endpoint(path, n, e, provider) for n, e in enumerate(entries, start=1))
    if not found:
        raise UsageError(f"--endpoints {path} lists no endpoint")
    names = [e.name for e in found]
    if len(set(names)) != len(names):
        raise UsageError(f"--endpoints {path}: two endpoints have the same name")
    return found


def _endpoint(path: Path, number: int, entry: Any, provider: str) -> Endpoint:
    where = f"--endpoints {path}: endpoint {number}"
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: expected an object with base_url and key_env")
    unknown = sorted(set(entry) - _FIELDS)
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(unknown)}")
    url, key_env = entry.get("base_url"), entry.get("key_env")
    if not isinstance(url, str) or not re.match(r"https?://[^/\s]+", url):
        raise UsageError(f"{where}: base_url must be an http(s) URL")
    if "@" in urlsplit(url).netloc:
        raise UsageError(f"{where}: base_url must not hold credentials (user:password@)")
    if not isinstance(key_env, str) or not _VARIABLE.fullmatch(key_env):
        raise UsageError(
            f"{where}: key_env must name the environment variable that holds its key (the key "
            "itself never goes in the file)"
        )
    chosen = entry.get("provider", provider)
    if chosen not in PROFILES:
        raise UsageError(f"{where}: unknown provider {chosen!r}: choose {', '.join(PROFILES)}")
    limits: dict[str, float | None] = {}
    for kind in ("rpm", "ipm", "tpm"):
        value = entry.get(kind)
        ok = value is None or (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= MIN_PER_MIN
        )
        if not ok:
            raise UsageError(f"{where}: {kind} must be a number of at least {MIN_PER_MIN}")
        limits[kind] = value
    name = entry.get("name", f"endpoint-{number}")
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"{where}: name must be a non-empty string")
    return Endpoint(name, url.rstrip("/"), key_env, chosen, **limits)


class Health:
    """Which endpoints to pass over for now: one that could not be reached, answered 5xx, or
    answered 404/405 (a wrong URL) is left alone for COOLDOWN_S, doubling while it keeps
    failing (up to MAX_COOLDOWN_S), while the others take its share."""

    def __init__(self, names: list[str], clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._until = dict.fromkeys(names, 0.0)
        self._cooldown = dict.fromkeys(names, COOLDOWN_S)

    def usable(self, name: str) -> bool:
        return self.clock() >= self._until[name]

    def others_usable(self, name: str) -> bool:
        return any(self.usable(n) for n in self._until if n != name)

    def down(self, name: str) -> None:
        self._until[name] = self.clock() + self._cooldown[name]
        self._cooldown[name] = min(MAX_COOLDOWN_S, 2 * self._cooldown[name])

    def up(self, name: str) -> None:
        self._cooldown[name] = COOLDOWN_S


class RoutingLimiter(Limiter):
    """Admits each request through the first endpoint whose limiter lets it go now (passing
    over those `health` says are failing, while any other is not)."""

    def __init__(self, routes: Mapping[str, Limiter], health: Health) -> None:
        super().__init__(adaptive=False)
        self.routes = dict(routes)
        self.health = health
        self._first = next(iter(self.routes))

    def bind(self, sleep: Any, note: Any = None) -> None:
        super().bind(sleep, note)
        for limiter in self.routes.values():
            limiter.bind(sleep, note)

    async def acquire(self, *, images: int = 1, tokens: int = 0) -> float:
        while True:
            shortest = math.inf
            usable = [n for n in self.routes if self.health.usable(n)] or list(self.routes)
            for name in usable:
                limiter = self.routes[name]
                wait = await limiter.admit_now(images=images, tokens=tokens)
                if wait <= 0:
                    ROUTE.set(name)
                    return limiter.admitted_at
                shortest = min(shortest, wait)
            await self.sleep(shortest)

    def _route(self) -> Limiter:
        return self.routes[ROUTE.get() or self._first]

    def observe(self, headers: RateLimitHeaders | None) -> None:
        self._route().observe(headers)

    def on_success(self) -> None:
        self._route().on_success()

    def settle_tokens(self, estimated: int, actual: int) -> None:
        self._route().settle_tokens(estimated, actual)

    def on_rate_limited(
        self,
        retry_after_s: float | None,
        headers: RateLimitHeaders | None,
        sent_at: float | None = None,
    ) -> None:
        self.rate_limited += 1
        self._route().on_rate_limited(retry_after_s, headers, sent_at)

    def stats(self) -> LimiterStats:
        return combined_stats([limiter.stats() for limiter in self.routes.values()])


class RoutedBackend:
    """Sends each attempt through the backend of its route (a `Backend`; the backends are
    opened, and closed, by whoever made them), and tells `health` how each endpoint does."""

    def __init__(self, backends: Mapping[str, Backend], health: Health) -> None:
        self.backends = dict(backends)
        self.health = health
        self._first = next(iter(self.backends))

    def _current(self) -> Backend:
        return self.backends[ROUTE.get() or self._first]

    @property
    def where(self) -> str:
        return ", ".join(b.where for b in self.backends.values())

    @property
    def online(self) -> bool:
        return all(b.online for b in self.backends.values())

    def check(self, item: Item) -> ErrorInfo | None:
        return self.backends[self._first].check(item)

    async def send(self, item: Item, *, limit_bytes: int) -> Answer:
        name = ROUTE.get() or self._first
        try:
            answer = await self.backends[name].send(item, limit_bytes=limit_bytes)
        except RunFatal as exc:  # a key refused, a quota gone: say whose
            info = dataclasses.replace(exc.info, message=f"endpoint {name}: {exc.info.message}")
            raise RunFatal(info, retry_after_s=exc.retry_after_s, ratelimit=exc.ratelimit) from exc
        except RequestError as exc:
            info = exc.info
            unreachable = info.code == "connect_error"
            wrong_url = info.http_status in (404, 405) and info.code != "model_not_found"
            if not (unreachable or wrong_url or isinstance(exc, ServerError)):
                raise
            self.health.down(name)
            if isinstance(exc, ServerError) or not self.health.others_usable(name):
                raise  # retried as it is (the others down too: as with one endpoint)
            # Never sent or refused outright here: retried, on another endpoint.
            moved = ErrorInfo(
                f"endpoint {name}: {info.message}", "endpoint_down", info.type, None,
                info.request_id,
            )  # fmt: skip
            raise Retryable(
                moved, retry_after_s=exc.retry_after_s, ratelimit=exc.ratelimit
            ) from exc
        self.health.up(name)
        return answer

    async def fetch(self, url: str, *, limit_bytes: int) -> bytes | SpooledImage:
        return await self._current().fetch(url, limit_bytes=limit_bytes)

    async def __aenter__(self) -> RoutedBackend:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None
