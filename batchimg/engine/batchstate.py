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

The input file itself is `DIR/batches/NAME.jsonl`, written through `NAME.jsonl.part`; a file
the state does not name as closed was never sent, and a re-run deletes it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..errors import StorageError
from ..ledger import cut_torn_tail

STATE_DIR = "batches"
STATE_NAME = "state.jsonl"
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
        self.dir = out_dir / STATE_DIR
        self.path = self.dir / STATE_NAME
        self.files: dict[str, BatchFile] = {}
        self.inputs: dict[str, str] = {}  # sha256 -> file_id of edit inputs uploaded
        self._fh: Any = None

    def load(self) -> BatchState:
        if self.path.exists():
            for record in _records(self.path):
                self._apply(record)
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


def _records(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                return  # written halfway when a run died: that step was never taken
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(record, dict):
                yield record


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _money(value: Any) -> float | None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if number and value >= 0 else None
