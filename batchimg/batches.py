"""`batchimg batch status DIR` and `batchimg batch cancel DIR`: an output directory's batches.

Both read the directory's batch state (`engine/batchstate.py`). `status` asks the API for each
live batch's current state when a key is at hand (else it shows what the last run saw);
`cancel` asks the API to cancel every live batch, under the directory's lock (a run waiting on
them would otherwise go on waiting). A re-run collects what a cancelled batch finished and
sends the rest again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import PROFILES, ClientConfig, OnlineBackend, Secret
from .backends.batch import BatchAPI
from .engine.batchstate import TERMINAL, BatchFile, BatchState
from .errors import ItemFailed, RequestError, UsageError
from .ledger import LEDGER_NAME, unsettled_sends
from .outdir import STATE_DIR, STATE_NAME, exclusive


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
    """The directory's batch state, checked against its ledger as a run checks it (UsageError
    if the ledger has batch lines the state does not know: the state was damaged)."""
    state = BatchState(out)
    if not state.path.exists():
        raise UsageError(
            f"{out} has no batches ({STATE_DIR}/{STATE_NAME} is missing): "
            "`batchimg run ... --batch-api` makes them"
        )
    state.load()
    ledger = out / LEDGER_NAME
    if ledger.exists():
        state.check_sends(unsettled_sends(ledger))
    return state


def row(f: BatchFile, live: dict[str, Any] | None = None) -> dict[str, Any]:
    """One batch as data: the saved state, with the API's current answer where given."""
    batch = live or {}
    counts = batch.get("request_counts") or f.request_counts or {}
    return {
        "batch_id": batch.get("id") if isinstance(batch.get("id"), str) else f.batch_id,
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
    when a key is at hand (one a killed run made but never recorded is found by its file)."""
    state = load_state(out)
    chosen = list(state.files.values()) if everything else state.live()
    if conn.key is None:
        return [row(f) for f in chosen]
    async with _api(conn) as api:
        rows = []
        for f in chosen:
            answer = await _look(api, state, f) if f.live else None
            rows.append(row(f, answer))
        return rows


async def cancel(out: Path, conn: Connection) -> list[dict[str, Any]]:
    """Ask the API to cancel every live batch of the directory; each one's answer (a batch
    that finished meanwhile is shown as it is: there is nothing to cancel)."""
    if conn.key is None:
        raise UsageError("no API key: `batch cancel` needs one (as `run` does)")
    with exclusive(out):
        state = load_state(out)
        rows = []
        async with _api(conn) as api:
            for f in state.live():
                answer = await _look(api, state, f)
                batch_id = answer.get("id") if answer else None
                if not isinstance(batch_id, str) or answer is None or "error" in answer:
                    rows.append(row(f, answer))
                    continue
                if answer.get("status") not in TERMINAL:
                    try:
                        answer = await api.cancel(batch_id)
                    except ItemFailed:  # finished since the look: nothing to cancel
                        answer = await _look(api, state, f)
                    except RequestError as exc:
                        answer = {"status": "not cancelled", "error": str(exc)}
                rows.append(row(f, answer))
        return rows


async def _look(api: BatchAPI, state: BatchState, f: BatchFile) -> dict[str, Any] | None:
    """The file's batch as the API has it now: by its id, else found by its input file (a
    killed run made it without recording it); None if it was never made (the next run sends
    it); a status saying what failed if the API would not answer."""
    try:
        if f.batch_id is not None:
            return await api.get(f.batch_id)
        file_id = f.file_id or await api.find_file(state.input_path(f.name).name, "batch")
        found = await api.find_batch(file_id) if file_id else None
        return found if found is not None else {"status": "not sent yet (the next run sends it)"}
    except RequestError as exc:
        return {"status": "unknown", "error": str(exc)}


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
