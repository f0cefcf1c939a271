"""What the engine tells the outside: progress events while it runs, a snapshot of its live
counts on request, and the summary at the end."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..limiter import LimiterStats
from ..pricing import Bound

EventKind = Literal["started", "item_finished", "retry", "stopping", "warning", "note"]


@dataclass(frozen=True)
class RunSnapshot:
    """The engine's live counts at one moment (`Engine.snapshot`), safe to take from any
    thread: a view draws from these, never from the engine itself."""

    ok: int
    failed: int
    skipped: int
    images: int
    in_flight: int  # requests (and downloads) on the wire
    retrying: int  # items waiting for their next try
    output_tokens: int
    cost_usd: float  # this run's
    spent_usd: float  # everything this output directory has cost, earlier runs included
    limiter: LimiterStats


@dataclass(frozen=True)
class ProgressEvent:
    """What the engine tells a progress view; it never waits on the view."""

    kind: EventKind
    item_id: str | None = None
    status: str | None = None
    images: int = 0
    cost_usd: float | None = None
    spent_usd: float = 0.0  # everything this ledger has cost so far, earlier runs included
    message: str | None = None
    error_code: str | None = None
    line: int | None = None
    #: On "started": where a view reads live counts (`Engine.snapshot`).
    snapshot: Callable[[], RunSnapshot] | None = None
    repeat: bool = False  # an error of the cause the run stopped for, already said


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class Summary:
    """How a run went; `exit_code` follows the CLI contract (0 / 1 / 3 / 75 / 130)."""

    out_dir: Path
    ledger_path: Path
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    not_attempted: int = 0
    pending: int = 0  # taken by a backend whose answers come to a later run (exit 75)
    parked: int = 0  # answered, images refused by the store: kept locally for the next run
    ledger_at: str | None = None  # where the ledger is, if not (only) at ledger_path
    images: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    unpriced: int = 0
    wall_s: float = 0.0
    stop_reason: str | None = None
    interrupted: bool = False
    limiter: LimiterStats | None = None  # rate limits learned, 429s seen, admitted rate
    spent_total_usd: float = 0.0  # this run and every earlier run in the same ledger
    images_at: str | None = None  # where the images are: DIR/images, or DIR/shards (webdataset)
    failures: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # each said once (the manifest's, mostly)
    #: When the cap stopped the run: the money left under it, which the next item's bound
    #: did not fit in (what a tighter bound could have spent), and that bound.
    held_back_usd: float | None = None
    next_bound: Bound | None = None
    unpriced_extra: int = 0  # answers whose extra usage (svg_usage) no price covers
    #: Attempts that were (or may have been) billed at a cost nobody can tell (no usage, usage
    #: that cannot be read, an answer cut off): how many, and their bounds, which the cap counts.
    unknown_costs: int = 0
    cost_bound_usd: float = 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.stop_reason is not None:
            return 3
        if self.pending:
            return 75
        return 1 if self.failed else 0
