"""The batch state of an output directory: which item went into which input file, and where
each file is on its way (uploaded, created, finished, collected). `DIR/batches/state.jsonl`.

Append-only, one JSON object per line, each synced before the step it announces is taken (or
right after a step whose result must not be lost), so a run killed at any moment is resumed by
the next one from here and the ledger:

    {"event": "closed",   "file": NAME, "run_id", "endpoint", "model", "lines", "bytes",
                          "at", "entries": [[custom_id, item id, attempt, bound_usd], ...]}
    {"event": "uploaded", "file": NAME, "file_id"}
    {"event": "created",  "file": NAME, "batch_id"}
    {"event": "status",   "file": NAME, "status", "request_counts", "output_file_id",
                          "error_file_id", "errors"}
    {"event": "collected", "file": NAME}          every line of it is in the ledger
    {"event": "dropped",  "file": NAME, "why"}    never made into a batch (its lines settled)
    {"event": "input",    "sha256", "file_id"}    an edit input uploaded (reused by later lines)

The input file itself is `DIR/batches/NAME.jsonl`, and beside it `NAME.items.jsonl` holds
each line's item as it was sent (id, manifest line, parameters, metadata, inputs), so its
answer is recorded as what was asked for whatever the manifest says by then; both are written
through `.part` files and synced before the `closed` event. Files the state does not name as
closed were never sent, and a re-run deletes them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import StorageError, UsageError
from ..ledger import LedgerRecord, cut_torn_tail
from ..manifest import Item
from ..outdir import batch_state_path

if TYPE_CHECKING:
    from ..inputs import InputFile

#: A batch in one of these states has finished: its files say what became of every line.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})


@dataclass(frozen=True)
class Entry:
    """One line of an input file: the item it asks for, and which attempt of it."""

    custom_id: str
    item_id: str
    attempt: int
    bound_usd: float | None


@dataclass
class BatchFile:
    """One input file and the batch made of it."""

    name: str
    run_id: str
    endpoint: str
    model: str
    lines: int
    bytes: int
    at: str
    entries: dict[str, Entry]
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None
    request_counts: dict[str, Any] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: Any = None
    collected: bool = False
    dropped: str | None = None

    @property
    def live(self) -> bool:
        """Sent (or about to be) and not yet in the ledger."""
        return not self.collected and self.dropped is None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def describe(self) -> str:
        counts = self.request_counts or {}
        done = counts.get("completed", 0)
        failed = counts.get("failed", 0)
        total = counts.get("total", self.lines) or self.lines
        state = self.status or ("created" if self.batch_id else "not created")
        return (
            f"{self.batch_id or self.name}: {state}, {done}/{total} done"
            + (f", {failed} failed" if failed else "")
            + f" ({self.model}, {self.lines} lines)"
        )


class BatchState:
    """The state file, read once and appended to."""

    def __init__(self, out_dir: Path) -> None:
        self.path = batch_state_path(out_dir)
        self.dir = self.path.parent
        self.files: dict[str, BatchFile] = {}
        self.inputs: dict[str, str] = {}  # sha256 -> file_id of edit inputs uploaded
        self.garbled = 0  # lines that are not events (skipped)
        self._fh: Any = None

    def load(self) -> BatchState:
        if self.path.exists():
            skipped: list[int] = []
            for record in _records(self.path, skipped):
                self._apply(record)
            self.garbled = len(skipped)
        return self

    def open(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                cut_torn_tail(self.path)  # a line a killed run wrote halfway
            self._fh = open(self.path, "ab")  # noqa: SIM115 (open for the run)
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def append(self, record: dict[str, Any]) -> None:
        """Write one event and make it durable, then apply it."""
        if self._fh is None:
            self.open()
        try:
            self._fh.write(orjson.dumps(record) + b"\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self._apply(record)

    def live(self) -> list[BatchFile]:
        return [f for f in self.files.values() if f.live]

    def held(self) -> dict[str, BatchFile]:
        """Item id -> the live file its latest line is in."""
        return {e.item_id: f for f in self.live() for e in f.entries.values()}

    def input_path(self, name: str) -> Path:
        return self.dir / f"{name}.jsonl"

    def items_path(self, name: str) -> Path:
        return self.dir / f"{name}.items.jsonl"

    def knows(self, run_id: str, item_id: str, attempt: int) -> bool:
        """Whether a batch line of that run, item and attempt is in the state."""
        return any(
            f.run_id == run_id and e.item_id == item_id and e.attempt == attempt
            for f in self.files.values()
            for e in f.entries.values()
        )

    def check_sends(self, unsettled: list[LedgerRecord]) -> None:
        """UsageError if the ledger has batch lines sent that the state does not know (it
        was damaged or deleted): sending their items again could pay for them twice."""
        known = {
            (f.run_id, e.item_id, e.attempt)
            for f in self.files.values()
            for e in f.entries.values()
        }
        lost = [
            r
            for r in unsettled
            if r.get("via") == "batch" and (r.get("run_id"), r["id"], r.get("attempt")) not in known
        ]
        if lost:
            shown = ", ".join(sorted({r["id"] for r in lost})[:5])
            raise UsageError(
                f"the ledger says {len(lost)} requests were sent in batches that {self.path} "
                f"does not know (items {shown}{', …' if len(lost) > 5 else ''}): the file was "
                "damaged or deleted. Restore it from a backup before running again; sending "
                "these items again could pay for them twice"
            )

    def result_path(self, name: str, kind: str) -> Path:
        return self.dir / f"{name}.{kind}.jsonl"

    def _apply(self, record: dict[str, Any]) -> None:
        event, name = record.get("event"), record.get("file")
        if event == "input":
            sha, file_id = record.get("sha256"), record.get("file_id")
            if isinstance(sha, str) and isinstance(file_id, str):
                self.inputs[sha] = file_id
            return
        if event == "closed" and isinstance(name, str):
            entries = {}
            for raw in record.get("entries") or []:
                if isinstance(raw, list) and len(raw) == 4:
                    custom_id, item_id, attempt, bound = raw
                    entries[str(custom_id)] = Entry(
                        str(custom_id), str(item_id), int(attempt), _money(bound)
                    )
            self.files[name] = BatchFile(
                name=name,
                run_id=str(record.get("run_id")),
                endpoint=str(record.get("endpoint")),
                model=str(record.get("model")),
                lines=int(record.get("lines") or len(entries)),
                bytes=int(record.get("bytes") or 0),
                at=str(record.get("at")),
                entries=entries,
            )
            return
        found = self.files.get(name) if isinstance(name, str) else None
        if found is None:
            return
        if event == "uploaded":
            found.file_id = _str(record.get("file_id"))
        elif event == "created":
            found.batch_id = _str(record.get("batch_id"))
        elif event == "status":
            found.status = _str(record.get("status"))
            counts = record.get("request_counts")
            found.request_counts = counts if isinstance(counts, dict) else {}
            found.output_file_id = _str(record.get("output_file_id"))
            found.error_file_id = _str(record.get("error_file_id"))
            found.errors = record.get("errors")
        elif event == "collected":
            found.collected = True
        elif event == "dropped":
            found.dropped = str(record.get("why") or "dropped")


def held_ids(out_dir: Path) -> frozenset[str]:
    """Items of the directory's live batches (an online run leaves them to be collected)."""
    state = BatchState(out_dir)
    if not state.path.exists():
        return frozenset()
    return frozenset(state.load().held())


def item_json(custom_id: str, item: Item) -> bytes:
    """One line of a `NAME.items.jsonl`: the item as sent."""
    return (
        orjson.dumps(
            {
                "custom_id": custom_id,
                "id": item.id,
                "line": item.line,
                "endpoint": item.endpoint,
                "params": item.params,
                "metadata": item.metadata,
                "images": [_input_json(f) for f in item.images],
                "mask": _input_json(item.mask) if item.mask is not None else None,
            }
        )
        + b"\n"
    )


def read_items(path: Path) -> dict[str, Item]:
    """custom_id -> the item as sent, from a `NAME.items.jsonl` (empty if it is gone)."""
    found: dict[str, Item] = {}
    if not path.exists():
        return found
    for raw in _records(path):
        try:
            mask = raw.get("mask")
            found[str(raw["custom_id"])] = Item(
                id=str(raw["id"]),
                line=int(raw["line"]),
                params=dict(raw["params"]),
                metadata=raw.get("metadata"),
                endpoint=raw.get("endpoint") or "generations",
                images=tuple(_input(f) for f in raw.get("images") or ()),
                mask=_input(mask) if mask is not None else None,
            )
        except (KeyError, TypeError, ValueError):
            continue
    return found


def _input_json(f: InputFile) -> dict[str, Any]:
    return {"path": str(f.path), "given": f.given, "fmt": f.fmt, "sha256": f.sha256,
            "width": f.width, "height": f.height}  # fmt: skip


def _input(raw: dict[str, Any]) -> InputFile:
    from ..inputs import InputFile  # a batch of edit lines only

    return InputFile(
        path=Path(raw["path"]),
        given=str(raw["given"]),
        fmt=str(raw["fmt"]),
        sha256=str(raw["sha256"]),
        width=int(raw.get("width") or 0),
        height=int(raw.get("height") or 0),
    )


def _records(path: Path, skipped: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """The file's JSON objects; a line that is not one goes into `skipped` (its number)."""
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):
                return  # written halfway when a run died: that step was never taken
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                yield record
            elif skipped is not None and line.strip():
                skipped.append(number)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _money(value: Any) -> float | None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if number and value >= 0 else None
