"""The ledger: `DIR/ledger.jsonl`, one JSON object per finished item, append-only.

The last item line for an id is that item's state. Besides item lines (which have no `record`
field), three kinds of line tell of attempts, never of an item's state:

- `"record": "charge"`: an attempt that was (or may have been) billed and that no item line
  tells of (it was retried, or the run stopped first). It counts toward what the directory
  spent: `charged_usd(record)`, its cost, or, where that is unknown (`cost_usd: null` with a
  `cost_note`), its `cost_bound_usd`.
- `"record": "sent"`: written just before a request goes out, with the most it can cost. A
  later line of the same run, item and attempt (or a later attempt) settles it; one that nothing
  settles (the process was killed, or the machine died, with the request in flight) counts at
  its bound, so a cap holds across a `kill -9` too (`Unsettled`).
- `"record": "settled"`: an attempt that is known not to have been billed (a 429, a 5xx) whose
  item ended with no other line for it (the run stopped while it waited to retry).

Each line is written whole and flushed only after the item's image files are durable; the
engine fsyncs it at least once a second, and on close. A line torn by a crash mid-write is cut
off when the ledger is next opened, and skipped by readers.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict, cast

import orjson

from ._idset import IdSet, count_lines
from .errors import StorageError

LEDGER_NAME = "ledger.jsonl"
FSYNC_INTERVAL_S = 1.0  # the engine syncs the ledger at least this often


class ErrorRecord(TypedDict):
    """A failure, as the ledger keeps it (`errors.ErrorInfo.as_record`)."""

    code: str | None
    type: str | None
    message: str
    http_status: int | None
    request_id: str | None


LineKind = Literal["charge", "sent", "settled"]


class _Identified(TypedDict):
    id: str  # the item's id: every line has one


class LedgerRecord(_Identified, total=False):
    """One ledger line: an item's state, or (with `record`) a line about one of its attempts:
    a `charge`, a `sent` request or a `settled` one (see the module docstring).

    The engine's sink writes these; `report`, `verify`, the layouts and the token book read
    them. Lines read back are only known to have a string `id`: readers check the shape of what
    they use, as a hand-edited or older ledger may differ.
    """

    record: LineKind  # only on lines that are not an item's state
    line: int | None
    status: Literal["ok", "error"]
    endpoint: str
    model: str | None
    prompt: str | None
    n: int | None
    size: str | None
    quality: str | None
    output_format: str | None
    complexity: str | None
    frame_count: int | None
    files: list[str]
    bytes: list[int]
    sha256: list[str]
    usage: Any  # the API's usage object verbatim (whatever its shape), or None
    cost_usd: float | None
    cost_bound_usd: float | None  # with cost_note, where the cost is unknown
    cost_note: str
    price_table: str
    attempts: int
    attempt: int  # charge, sent and settled lines: which attempt of the item
    rate_limited: int
    latency_s: float | None
    request_id: str | None
    started_at: str
    finished_at: str
    metadata: Any
    inputs: list[dict[str, Any]]  # edits: each input's path, size and sha256
    mask: dict[str, Any] | None
    run_id: str | None
    route: str  # `--endpoints`: the endpoint the attempt went to, by name
    via: Literal["batch"]  # sent through the Batch API (absent: online), with its batch
    batch_id: str | None
    extra_usage: dict[str, Any]  # usage billed apart (svg_usage), unpriced
    error: ErrorRecord


def read_ledger(path: Path, skipped: list[int] | None = None) -> Iterator[LedgerRecord]:
    """Every whole record in the ledger, in order; torn or garbled lines are skipped (their
    line numbers go to `skipped`, if given)."""
    if not path.exists():
        return
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.endswith(b"\n"):
                return  # torn by a crash mid-write
            record = parse_record(line)
            if record is not None:
                yield record
            elif skipped is not None and line.strip():
                skipped.append(number)


def parse_record(line: bytes) -> LedgerRecord | None:
    """One ledger line as a record; None for a garbled line or one without an id."""
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if isinstance(record, dict) and isinstance(record.get("id"), str):
        return cast(LedgerRecord, record)
    return None


@dataclass
class LedgerState:
    """What a re-run needs from an existing ledger, read in one pass."""

    done: IdSet  # ids whose last state is ok: skipped
    spent_usd: float = 0.0  # every billed answer recorded, across all earlier runs
    garbled: list[int] = field(default_factory=list)  # lines that are not ledger records
    #: `sent` lines nothing settles: requests a dead run left in flight, and batch lines
    #: whose answers have not been collected yet
    unsettled: list[LedgerRecord] = field(default_factory=list)


def scan_ledger(
    path: Path,
    on_ok: Callable[[LedgerRecord], None] | None = None,
    on_usage: Callable[[LedgerRecord], None] | None = None,
) -> LedgerState:
    """Read the ledger once; `on_ok` also sees every ok record (e.g. to rebuild metadata), and
    `on_usage` every record that carries a `usage` (e.g. to learn token counts)."""
    state = LedgerState(IdSet(count_lines(path) if path.exists() else 16))
    unsettled = Unsettled()
    for record in read_ledger(path, state.garbled):
        if on_usage is not None and record.get("usage") is not None:
            on_usage(record)
        state.spent_usd += charged_usd(record)
        unsettled.see(record)
        if not is_state(record):
            continue
        if record.get("status") == "ok":
            state.done.add(record["id"])
            if on_ok is not None:
                on_ok(record)
        else:
            state.done.discard(record["id"])
    state.spent_usd += unsettled.bound_usd()  # requests in flight when a run died
    state.unsettled = unsettled.records()
    return state


def is_state(record: LedgerRecord) -> bool:
    """An item's line (its state), not a line about one of its attempts."""
    return "record" not in record


def attempt_of(record: LedgerRecord) -> int | None:
    """Which attempt a line tells of (an item line: its last), if it says so plausibly."""
    value = record.get("attempt", record.get("attempts"))
    plausible = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 10_000
    return value if plausible else None


class Unsettled:
    """Read forward, the `sent` lines that no later line settles: requests that were in flight
    when their run died, which may have been billed."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], LedgerRecord] = {}  # (run, item): its latest send

    def see(self, record: LedgerRecord) -> None:
        run, attempt = record.get("run_id"), attempt_of(record)
        if not isinstance(run, str) or attempt is None:
            return
        key = (run, record["id"])
        if record.get("record") == "sent":
            self._open[key] = record  # the item's earlier attempts ended before this one
            return
        sent = self._open.get(key)
        if sent is not None and (attempt_of(sent) or 0) <= attempt:
            del self._open[key]

    def records(self) -> list[LedgerRecord]:
        return list(self._open.values())

    def bound_usd(self) -> float:
        return sum(amount(r.get("cost_bound_usd")) or 0.0 for r in self._open.values())


def unsettled_sends(path: Path) -> list[LedgerRecord]:
    """The `sent` lines of a ledger that nothing settles (one forward pass)."""
    unsettled = Unsettled()
    for record in read_ledger(path):
        unsettled.see(record)
    return unsettled.records()


def amount(value: Any) -> float | None:
    """A money amount as a line gives it: a finite number >= 0, else None (not money)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if number and math.isfinite(value) and value >= 0 else None


def charged_usd(record: LedgerRecord) -> float:
    """What one line counts toward the money spent: its cost if known, else its bound
    (anything a line says that is not an amount counts nothing). A `sent` line counts only if
    nothing settles it (`Unsettled`), a `settled` line never."""
    if record.get("record") in ("sent", "settled"):
        return 0.0
    cost = amount(record.get("cost_usd"))
    if cost is not None:
        return cost
    return amount(record.get("cost_bound_usd")) or 0.0


def completed_ids(path: Path) -> IdSet:
    """Ids whose last ledger state is `ok`: a re-run skips them."""
    return scan_ledger(path).done


def cut_torn_tail(path: Path) -> None:
    """Drop a last line that has no newline (written halfway when the process died)."""
    with open(path, "rb+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return
        pos, chunk = size, 65536
        while pos > 0:
            start = max(0, pos - chunk)
            fh.seek(start)
            block = fh.read(pos - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                fh.truncate(start + newline + 1)
                return
            pos = start
        fh.truncate(0)


class LedgerWriter:
    """Appends records to the ledger; use as a context manager so the file is synced on exit.

    A write that fails (disk full, file too large) is rolled back to the last whole line and
    raised as StorageError, so the ledger never holds a torn line the process could have avoided.

    `shared`: other processes append to the same file (the workers of a Ray run; each line is
    one write to a file opened O_APPEND, which a local filesystem keeps whole). Then the torn
    tail is left to whoever opened the file first, and a failed write is ended with a newline
    instead of rolled back, since the file's end may be another process's line by then.
    """

    def __init__(self, path: Path, *, shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        if path.exists() and not shared:
            cut_torn_tail(path)
        try:  # never through a symbolic link: the ledger is the directory's own file
            self._fd = os.open(
                path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644
            )
        except OSError as exc:
            raise StorageError(f"cannot open {path}: {exc.strerror or exc}") from exc
        self._size = os.fstat(self._fd).st_size
        self._dirty = False

    def append(self, record: Mapping[str, Any]) -> None:
        """Write one whole line (one write call, no user-space buffer); raise StorageError."""
        line = orjson.dumps(record) + b"\n"
        try:
            written = os.write(self._fd, line)
            if written != len(line):  # a short write: the disk filled up mid-line
                raise OSError(errno.ENOSPC, "short write to the ledger")
        except OSError as exc:
            self._rollback()
            raise StorageError(f"cannot append to {self.path}: {exc.strerror or exc}") from exc
        self._size += written
        self._dirty = True

    def _rollback(self) -> None:
        with contextlib.suppress(OSError):
            if self.shared:
                os.write(self._fd, b"\n")  # the torn line stays a garbled line of its own
            else:
                os.ftruncate(self._fd, self._size)

    def sync(self, force: bool = False) -> None:
        """fsync what was appended since the last sync (the engine calls this every second);
        `force` even when another thread's sync may still be in progress."""
        if self._dirty or force:
            self._dirty = False
            with contextlib.suppress(OSError):
                os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            self._dirty = True
            self.sync()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
