"""Progress for the people who run batchimg: a live view on a terminal, log lines elsewhere.

The engine calls the view with `ProgressEvent`s and never waits on it; the view takes a snapshot
of the engine's live counts (`Engine.snapshot`, handed over on the "started" event) when it
draws, a few times a second on a terminal (rich) or every `log_every_s` seconds as one plain,
greppable line (cron, CI, nohup), or as JSON lines for log shippers. Failed items are reported
as they happen, above the live view so it never garbles.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TextIO

import orjson

from .engine import ProgressEvent, RunSnapshot
from .manifest import manifest_lines
from .options import LOG_EVERY_S

Mode = Literal["live", "lines", "quiet"]
RECENT_S = 60.0  # images per minute is measured over this window, not the whole run


def count_items(manifest: Path) -> int:
    """Lines a manifest will produce items or errors for (blank and # lines excluded)."""
    return sum(1 for _ in manifest_lines(manifest))


@dataclass(frozen=True)
class Snapshot:
    """Everything one progress line or frame shows."""

    done: int
    total: int | None
    ok: int
    failed: int
    skipped: int
    in_flight: int
    retrying: int
    images: int
    images_per_min: float
    rate_limited: int
    admitted_per_min: float
    learned_rpm: int | None
    output_tokens: int
    spent_usd: float
    projected_usd: float | None
    eta_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in vars(self).items()}


class ProgressView:
    """The engine's progress callback; `close()` it when the run ends."""

    def __init__(
        self,
        *,
        mode: Mode,
        total: int | None = None,
        log_every_s: float = LOG_EVERY_S,
        log_format: Literal["text", "json"] = "text",
        stream: TextIO | None = None,
    ) -> None:
        self.mode = mode
        self.total = total
        self.log_every_s = log_every_s
        self.log_format = log_format
        self.stream = stream or sys.stderr
        self._counts: Callable[[], RunSnapshot] | None = None
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()  # the drawing thread reads what the event loop appends
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._live: Any = None

    # -- the engine callback --

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "started":
            self._counts = event.snapshot
            self._start()
        elif event.kind == "item_finished":
            if event.images:
                now = time.monotonic()
                with self._lock:
                    self._recent.append((now, event.images))
                    self._forget_before(now - RECENT_S)  # bounded even when nothing draws
            if event.status == "error" and self.mode != "quiet" and not event.repeat:
                self._log("error", id=event.item_id, line=event.line, code=event.error_code,
                          message=event.message)  # fmt: skip
        elif event.kind == "stopping" and self.mode != "quiet":
            self._log("warning", message=f"stopping: {event.message}")
        elif event.kind == "warning" and self.mode != "quiet":
            self._log("warning", message=event.message)
        elif event.kind == "note" and self.mode != "quiet":
            self._log("info", message=event.message)

    def _forget_before(self, cutoff: float) -> None:
        """Drop finishes older than the rate window (call with the lock held)."""
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()

    def _start(self) -> None:
        if self.mode == "live":
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self.stream, stderr=self.stream is sys.stderr)
            self._live = Live(get_renderable=self._render, console=console,
                              refresh_per_second=4, transient=False)  # fmt: skip
            self._live.start()
        elif self.mode == "lines":
            self._ticker = threading.Thread(target=self._tick, daemon=True, name="progress")
            self._ticker.start()

    def close(self) -> None:
        """Stop drawing (the CLI prints the end summary after this)."""
        self._stop.set()
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._ticker is not None:
            self._ticker.join(timeout=2)
            self._ticker = None

    # -- what is shown --

    def snapshot(self) -> Snapshot | None:
        if self._counts is None:
            return None
        counts, now = self._counts(), time.monotonic()
        with self._lock:
            self._forget_before(now - RECENT_S)
            recent_images = sum(n for _, n in self._recent)
        window = min(RECENT_S, max(now - self._started, 1e-9))
        per_min = recent_images * 60 / window
        done = counts.ok + counts.failed + counts.skipped
        finished_now = counts.ok + counts.failed
        elapsed = now - self._started
        projected = eta = None
        if self.total is not None and finished_now:
            left = max(0, self.total - done)
            projected = counts.spent_usd + counts.cost_usd / finished_now * left
            eta = left * elapsed / finished_now
        stats = counts.limiter
        return Snapshot(
            done=done, total=self.total, ok=counts.ok, failed=counts.failed,
            skipped=counts.skipped, in_flight=counts.in_flight,
            retrying=counts.retrying, images=counts.images, images_per_min=per_min,
            rate_limited=stats.rate_limited, admitted_per_min=stats.admitted_per_min,
            learned_rpm=stats.learned_rpm, output_tokens=counts.output_tokens,
            spent_usd=counts.spent_usd, projected_usd=projected, eta_s=eta,
        )  # fmt: skip

    def progress_line(self) -> str | None:
        """The periodic line for logs: `key=value` pairs, or one JSON object."""
        snap = self.snapshot()
        if snap is None:
            return None
        if self.log_format == "json":
            return orjson.dumps({"time": _now(), "event": "progress", **snap.as_dict()}).decode()
        total = f"/{snap.total}" if snap.total is not None else ""
        parts = [
            f"done={snap.done}{total}", f"ok={snap.ok}", f"failed={snap.failed}",
            f"inflight={snap.in_flight}", f"retrying={snap.retrying}",
            f"img_per_min={snap.images_per_min:.1f}", f"429s={snap.rate_limited}",
            f"rate_per_min={snap.admitted_per_min:.0f}", f"tokens_out={snap.output_tokens}",
            f"spent_usd={snap.spent_usd:.4f}",
        ]  # fmt: skip
        if snap.projected_usd is not None:
            parts.append(f"projected_usd={snap.projected_usd:.4f}")
        if snap.eta_s is not None:
            parts.append(f"eta={_duration(snap.eta_s)}")
        return f"{_now()} progress " + " ".join(parts)

    def _render(self) -> Any:
        snap = self.snapshot()
        if snap is None:
            from rich.text import Text

            return Text("starting…")
        return render_snapshot(snap)

    # -- output --

    def _tick(self) -> None:
        while not self._stop.wait(self.log_every_s):
            line = self.progress_line()
            if line is not None:
                self._write(line)

    def _log(self, level: str, **fields: Any) -> None:
        if self.log_format == "json":
            line = orjson.dumps({"time": _now(), "event": level, **fields}).decode()
        else:
            text = " ".join(f"{k}={_quote(v)}" for k, v in fields.items() if v is not None)
            line = f"{_now()} {level} {text}"
        if self._live is not None:
            self._live.console.print(line, markup=False, highlight=False)
        else:
            self._write(line)

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


def render_snapshot(snap: Snapshot) -> Any:
    """The live view of a snapshot: five short lines (each fits 80 columns): progress, the
    bar, counts, pace, money."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    total = snap.total or max(snap.done, 1)
    eta = f"  ETA {_duration(snap.eta_s)}" if snap.eta_s is not None else ""
    rate = f"{snap.admitted_per_min:,.0f}/min" + (
        f" (limit {snap.learned_rpm:,} rpm)" if snap.learned_rpm else ""
    )
    spend = f"${snap.spent_usd:,.4f} spent" + (
        f", ~${snap.projected_usd:,.2f} projected" if snap.projected_usd is not None else ""
    )
    grid = Table.grid()  # one renderable a row: the bar never shares a line with text
    grid.add_row(Text(f"{snap.done:,}/{total:,} items{eta}"))
    grid.add_row(ProgressBar(total=float(total), completed=float(snap.done), width=48))
    grid.add_row(Text(f"ok {snap.ok:,}  failed {snap.failed:,}  retrying {snap.retrying}  "
                      f"in flight {snap.in_flight}"))  # fmt: skip
    grid.add_row(Text(f"{snap.images_per_min:,.1f} images/min  ·  rate {rate}  ·  "
                      f"429s {snap.rate_limited}"))  # fmt: skip
    grid.add_row(Text(f"{snap.output_tokens:,} tokens out  ·  {spend}"))
    return grid


def _quote(value: Any) -> str:
    text = str(value)
    return orjson.dumps(text).decode() if (" " in text or '"' in text or not text) else text


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"
