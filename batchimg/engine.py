"""The engine: the one place that wires manifest → client → writer → ledger.

A producer streams the manifest into a bounded queue; `concurrency` workers take items from it,
send each with retries, store its images and append its ledger line. A run-fatal error (bad key,
no quota) or a first SIGINT/SIGTERM stops admission: in-flight items finish, queued ones are left
for the next run. A second signal aborts at once; the ledger stays consistent because each line is
written whole after its files are durable.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.lowlevel
from anyio import CancelScope
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import specs
from .client import ImagesClient, ImagesResult
from .config import RunConfig
from .errors import ErrorInfo, ItemFailed, RequestError, RunFatal
from .ledger import LEDGER_NAME, LedgerWriter, completed_ids
from .manifest import BadLine, Item, read_manifest
from .pricing import PRICE_TABLE, request_cost_usd
from .retry import retrying
from .writer import ImageStore, StoredFile, check_format, decode_b64_image

EventKind = Literal["item_finished", "retry", "stopping"]


@dataclass(frozen=True)
class ProgressEvent:
    """What the engine tells a progress view; it never waits on the view."""

    kind: EventKind
    item_id: str | None = None
    status: str | None = None
    images: int = 0
    cost_usd: float | None = None
    message: str | None = None


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class Summary:
    """How a run went; `exit_code` follows the CLI contract (0 / 1 / 3 / 130)."""

    out_dir: Path
    ledger_path: Path
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    not_attempted: int = 0
    images: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0
    wall_s: float = 0.0
    stop_reason: str | None = None
    interrupted: bool = False
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.stop_reason is not None:
            return 3
        return 1 if self.failed else 0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _record(
    item: Item | BadLine,
    *,
    status: str,
    started_at: str,
    attempts: int,
    result: ImagesResult | None = None,
    files: list[StoredFile] | None = None,
    cost_usd: float | None = None,
    error: ErrorInfo | None = None,
) -> dict[str, Any]:
    """One ledger line, with every field of the ledger contract (DESIGN.md)."""
    params = item.params if isinstance(item, Item) else {}
    echo = result.echo if result else {}
    files = files or []
    record: dict[str, Any] = {
        "id": item.id,
        "line": item.line,
        "status": status,
        "endpoint": item.endpoint,
        "model": params.get("model"),
        "prompt": item.prompt,
        "n": params.get("n", 1) if params else None,
        "size": echo.get("size") or params.get("size"),
        "quality": echo.get("quality") or params.get("quality"),
        "output_format": echo.get("output_format")
        or (specs.output_format(params) if params else None),
        "files": [f.path for f in files],
        "bytes": [f.bytes for f in files],
        "sha256": [f.sha256 for f in files],
        "usage": result.usage if result else None,
        "cost_usd": cost_usd,
        "price_table": PRICE_TABLE,
        "attempts": attempts,
        "latency_s": round(result.latency_s, 4) if result else None,
        "request_id": (result.request_id if result else None) or (error and error.request_id),
        "started_at": started_at,
        "finished_at": _now(),
        "metadata": item.metadata,
    }
    if isinstance(item, Item) and item.endpoint == "edits":
        # So a dataset can trace every output back to the exact inputs it was made from.
        record["inputs"] = [f.as_record() for f in item.images]
        record["mask"] = item.mask.as_record() if item.mask else None
    if error is not None:
        record["error"] = error.as_record()
    return record


class Engine:
    """Runs one manifest to completion (or to a stop); see the module docstring."""

    def __init__(
        self,
        config: RunConfig,
        client: ImagesClient,
        *,
        progress: ProgressCallback | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.client = client
        self.progress = progress
        self.sleep = sleep
        ledger_path = config.out_dir / LEDGER_NAME
        self.summary = Summary(out_dir=config.out_dir, ledger_path=ledger_path)
        self._stopping = False

    def _emit(self, event: ProgressEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    def stop(self, reason: str | None, *, interrupted: bool = False) -> None:
        """Stop admitting new items; in-flight ones finish."""
        if interrupted:
            self.summary.interrupted = True
        if reason and self.summary.stop_reason is None:
            self.summary.stop_reason = reason
        if not self._stopping:
            self._stopping = True
            self._emit(ProgressEvent("stopping", message=reason))

    async def run(self, *, handle_signals: bool = False) -> Summary:
        started = time.monotonic()
        self.config.out_dir.mkdir(parents=True, exist_ok=True)
        self._done = completed_ids(self.summary.ledger_path)
        self._store = ImageStore(self.config.out_dir)
        with LedgerWriter(self.summary.ledger_path) as self._ledger:
            async with anyio.create_task_group() as outer:
                if handle_signals:
                    outer.start_soon(self._watch_signals, outer.cancel_scope)
                send, receive = anyio.create_memory_object_stream[Item](
                    max_buffer_size=self.config.concurrency * 2
                )
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._produce, send)
                    async with receive:
                        for _ in range(self.config.concurrency):
                            tg.start_soon(self._work, receive.clone())
                outer.cancel_scope.cancel()
        self.summary.wall_s = time.monotonic() - started
        return self.summary

    async def _watch_signals(self, scope: CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self.summary.interrupted:
                    scope.cancel()
                    return
                name = signal.Signals(signum).name
                self.stop(f"{name}: finishing in-flight requests", interrupted=True)

    async def _produce(self, send: MemoryObjectSendStream[Item]) -> None:
        async with send:
            for count, entry in enumerate(
                read_manifest(self.config.manifest, self.config.defaults)
            ):
                if self._stopping:
                    return
                if count % 256 == 0:
                    await anyio.lowlevel.checkpoint()
                if isinstance(entry, BadLine):
                    self._finish_bad_line(entry)
                elif entry.id in self._done:
                    self.summary.skipped += 1
                else:
                    await send.send(entry)

    async def _work(self, receive: MemoryObjectReceiveStream[Item]) -> None:
        async with receive:
            async for item in receive:
                if self._stopping:
                    self.summary.not_attempted += 1
                    continue
                await self._process(item)

    def _finish_bad_line(self, bad: BadLine) -> None:
        info = ErrorInfo(message=bad.reason, code="invalid_manifest_line", type="manifest_error")
        self._append(_record(bad, status="error", started_at=_now(), attempts=0, error=info))

    def _append(self, record: dict[str, Any]) -> None:
        self._ledger.append(record)
        summary = self.summary
        if record["status"] == "ok":
            summary.ok += 1
            summary.images += len(record["files"])
        else:
            summary.failed += 1
            code = record["error"]["code"] or "error"
            summary.failures[code] = summary.failures.get(code, 0) + 1
        usage = record["usage"]
        if isinstance(usage, dict):
            summary.input_tokens += int(usage.get("input_tokens") or 0)
            summary.output_tokens += int(usage.get("output_tokens") or 0)
        if record["cost_usd"] is not None:
            summary.cost_usd += record["cost_usd"]
        elif record["status"] == "ok":
            summary.unpriced += 1
        self._emit(
            ProgressEvent(
                "item_finished",
                item_id=record["id"],
                status=record["status"],
                images=len(record["files"]),
                cost_usd=record["cost_usd"],
            )
        )

    async def _process(self, item: Item) -> None:
        started_at = _now()
        attempts = 0
        result: ImagesResult | None = None
        try:
            async for attempt in retrying(self.config.retry, sleep=self.sleep):
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    if attempts > 1:
                        self._emit(ProgressEvent("retry", item_id=item.id))
                    result = await self._send(item)
            assert result is not None
            cost = request_cost_usd(item.params, result.usage)
            images = await self._fetch_images(item, result)
            stored = await anyio.to_thread.run_sync(
                self._store.save, item.file_stem, images, specs.output_format(item.params)
            )
        except RequestError as exc:
            # An answer that arrived but could not be stored was still paid for: keep its usage.
            self._append(
                _record(
                    item,
                    status="error",
                    started_at=started_at,
                    attempts=attempts,
                    result=result,
                    cost_usd=request_cost_usd(item.params, result.usage) if result else None,
                    error=exc.info,
                )
            )
            if isinstance(exc, RunFatal):
                self.stop(f"{exc} — fix the account or key, then re-run the same command")
            return
        self._append(
            _record(
                item,
                status="ok",
                started_at=started_at,
                attempts=attempts,
                result=result,
                files=stored,
                cost_usd=cost,
            )
        )

    async def _send(self, item: Item) -> ImagesResult:
        if item.endpoint == "edits":
            return await self.client.edit(item.params, item.images, item.mask)
        return await self.client.generate(item.params)

    async def _fetch_images(self, item: Item, result: ImagesResult) -> list[bytes]:
        """The answer's images as verified bytes: b64 decoded, urls downloaded at once."""
        expected = specs.output_format(item.params)
        images = []
        for entry in result.data:
            if isinstance(entry.get("b64_json"), str):
                data = decode_b64_image(entry["b64_json"])
            elif isinstance(entry.get("url"), str):
                data = await self._download(entry["url"])
            else:
                raise ItemFailed(
                    ErrorInfo(
                        message="data entry has neither b64_json nor url", code="bad_response"
                    )
                )
            check_format(data, expected)
            images.append(data)
        return images

    async def _download(self, url: str) -> bytes:
        async for attempt in retrying(self.config.retry, sleep=self.sleep):
            with attempt:
                return await self.client.download(url)
        raise AssertionError("unreachable: retrying re-raises the last error")
