"""The engine: the one place that wires manifest → backend → store → ledger.

run.py      Engine, the run supervisor: lock, task groups, watchers, signals, workers
items.py    ItemRunner: attempts, budget, rate limiter, answers to stored bytes
sink.py     ResultSink: ledger lines, the output layout, the summary
records.py  the ledger lines the engine writes, and Charge (what an attempt cost)
control.py  RunControl: the stop flag, what is in flight, warnings and events
events.py   ProgressEvent, RunSnapshot and Summary: what the outside sees
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .events import EventKind, ProgressCallback, ProgressEvent, RunSnapshot, Summary

if TYPE_CHECKING:
    from .items import UNREACHABLE_AFTER
    from .run import Engine


def __getattr__(name: str) -> Any:
    """`Engine` is imported on first use: a progress view needs only the events."""
    if name == "Engine":
        from .run import Engine

        return Engine
    if name == "UNREACHABLE_AFTER":
        from .items import UNREACHABLE_AFTER

        return UNREACHABLE_AFTER
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "UNREACHABLE_AFTER",
    "Engine",
    "EventKind",
    "ProgressCallback",
    "ProgressEvent",
    "RunSnapshot",
    "Summary",
]
