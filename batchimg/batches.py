"""`batchimg batch status DIR` and `batchimg batch cancel DIR`: an output directory's batches.

Both read the directory's batch state (`engine/batchstate.py`). `status` asks the API for each
live batch's current state when a key is at hand (else it shows what the last run saw);
`cancel` asks the API to cancel every live batch, under the directory's lock (a run waiting on
them would otherwise go on waiting). A re-run collects what a cancelled batch finished and
sends the rest again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import PROFILES, ClientConfig, OnlineBackend, Secret
from .backends.batch import BatchAPI
from .engine.batchstate import STATE_DIR, STATE_NAME, BatchFile, BatchState
from .errors import RequestError, UsageError
from .outdir import exclusive


@dataclass(frozen=True)
class Connection:
    """Where the batches are and the key to see them (None: show the saved state only)."""

    base_url: str
    key: Secret | None


def connection(provider: str, base_url: str | None, api_key_env: str | None) -> Connection:
    profile = PROFILES[provider]
    url = base_url or profile.default_base_url
    if not url:
        raise UsageError(f"--base-url is required for provider {provider}")
    try:
        key: Secret | None = profile.api_key_from_env(key_env=api_key_env)
    except UsageError:
        key = None
    return Connection(url, key)


def load_state(out: Path) -> BatchState:
    state = BatchState(out)
    if not state.path.exists():
        raise UsageError(
            f"{out} has no batches ({STATE_DIR}/{STATE_NAME} is missing): "
            "`batchimg run ... --batch-api` makes them"
        )
    return state.load()


def row(f: BatchFile, live: dict[str, Any] | None = None) -> dict[str, Any]:
    """One batch as data: the saved state, with the API's current answer where given."""
    batch = live or {}
    counts = batch.get("request_counts") or f.request_counts or {}
    return {
        "batch_id": f.batch_id,
        "file": f.name,
        "model": f.model,
        "endpoint": f.endpoint,
        "requests": len(f.entries),
        "status": batch.get("status") or f.status or ("not created" if f.batch_id is None else "?"),
        "completed": counts.get("completed", 0),
        "failed": counts.get("failed", 0),
        "collected": f.collected,
        "dropped": f.dropped,
        "seen": "now" if live and "error" not in live else "last run",
        "error": batch.get("error"),
    }


async def status(out: Path, conn: Connection, *, everything: bool = False) -> list[dict[str, Any]]:
    """Every batch the directory knows (live ones only unless `everything`), looked up anew
    when a key is at hand."""
    state = load_state(out)
    chosen = list(state.files.values()) if everything else state.live()
    if conn.key is None:
        return [row(f) for f in chosen]
    async with _api(conn) as api:
        asked = [f for f in chosen if f.batch_id is not None and f.live]
        answers = await _ask(api.get, asked, "unknown")
        return [row(f, answers.get(f.name)) for f in chosen]


async def cancel(out: Path, conn: Connection) -> list[dict[str, Any]]:
    """Ask the API to cancel every live batch of the directory; each one's answer."""
    if conn.key is None:
        raise UsageError("no API key: `batch cancel` needs one (as `run` does)")
    with exclusive(out):
        state = load_state(out)
        async with _api(conn) as api:
            asked = [f for f in state.live() if f.batch_id is not None and not f.finished]
            answers = await _ask(api.cancel, asked, "not cancelled")
            return [row(f, answers[f.name]) for f in asked]


async def _ask(
    call: Callable[[str], Awaitable[dict[str, Any]]], files: list[BatchFile], failed: str
) -> dict[str, dict[str, Any]]:
    """`call(batch_id)` for each file's batch: its answer, or a status saying what failed."""
    answers = {}
    for f in files:
        assert f.batch_id is not None
        try:
            answers[f.name] = await call(f.batch_id)
        except RequestError as exc:
            answers[f.name] = {"status": failed, "error": str(exc)}
    return answers


class _api:
    """A `BatchAPI` over a session of its own."""

    def __init__(self, conn: Connection) -> None:
        assert conn.key is not None
        self._config = ClientConfig(base_url=conn.base_url, api_key=conn.key)
        self._backend = OnlineBackend(self._config, pool_size=4)

    async def __aenter__(self) -> BatchAPI:
        await self._backend.__aenter__()
        return BatchAPI(self._backend, self._config)

    async def __aexit__(self, *exc: object) -> None:
        await self._backend.__aexit__(*exc)
