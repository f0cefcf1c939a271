"""An output in object storage: its lock object, and its ledger as segments in the bucket.

A bucket has no rename and no append, so the ledger is kept as immutable objects:

    PREFIX/ledger/NNNNNN.jsonl                  a segment's mark (empty): its number is taken
    PREFIX/ledger/NNNNNN-TAG-SSSSSSSSSSSS.jsonl
                        a piece: whole ledger lines of segment NNNNNN, from its byte S on
    PREFIX/ledger/NNNNNN-TAG-SSSSSSSSSSSS-EEEEEEEEEEEE.jsonl
                        a span: the same bytes as the pieces it folds, [S, E) of the segment
    PREFIX/.batchimg.lock                       the run holding the prefix: owner, heartbeat

Each run writes one segment, numbered one past every segment in the bucket when it starts
(under the lock; the mark is created only if absent, so two runs never share a number). The
ledger is the segments in number order; a segment's bytes are read from offset 0 on, taking at
each offset the object that starts there and reaches furthest (a span, once written, wins over
the pieces it folds; those are then deleted, and are harmless while they linger).

Locally, in the run's state directory (`--state`), `ledger.jsonl` is the working copy: every
segment of the bucket, in order, then this run's lines, written and fsynced exactly as a local
run's ledger (so resuming, the cap and the layouts read it unchanged). `remote.json` says which
segments (and how many of their bytes) the copy holds and how much of this run's segment is in
the bucket. `push` uploads the whole lines not yet there as a new piece; the run does so every
`--upload-every` seconds (and, under `--max-cost`, before each request: `PushGate`), at the end
and on every stop, and folds every `SPAN_EVERY` pieces into one span. A piece's key is fixed by
where it starts, so a push cut short by a crash and done again finds its piece there and moves
on: no line is ever in the bucket twice.

`pull`, at the start of every run, first pushes what an earlier run on this machine left
unpushed, then brings in the segments the copy lacks (another machine's runs): a run moved to
another machine continues without repeating an `ok` item. A copy it cannot account for (its
`remote.json` lost or damaged, or the bucket's order changed under it) is rebuilt from the
bucket, after any of its lines the bucket lacks have been pushed, so no line is ever dropped.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import anyio.to_thread
import orjson

from ..errors import StorageError, UsageError
from ..ledger import (
    LEDGER_NAME,
    LedgerRecord,
    LedgerWriter,
    cut_torn_tail,
    is_state,
    read_ledger,
)
from .local import aside_name, fsync_path
from .objects import PARKED_DIR, PARKED_LINES, ObjectStore, classify

LEDGER_DIR = "ledger"
LOCK_OBJECT = ".batchimg.lock"
MARK_TRIES = 1000  # segment numbers a worker of a run tries (the others' are taken at once)
STATE_FILE = "remote.json"
LOCK_TTL_S = 60.0  # a lock whose heartbeat is older than this may be taken over
HEARTBEAT_S = 15.0
SPAN_EVERY = 64  # pieces of a segment folded into one span
GATE_EVERY_S = 0.2  # under a cap: the most often the ledger is pushed before requests
_NAME = re.compile(r"^(\d{6,})(?:-([0-9a-f]{8})-(\d{12})(?:-(\d{12}))?)?\.jsonl$")
_FETCH_AT_ONCE = 64  # objects downloaded together


@dataclass(frozen=True)
class _Part:
    """A piece or a span of a segment: its object's name and the bytes [start, end) it holds."""

    name: str
    start: int
    end: int


@dataclass
class _Segment:
    number: int
    tag: str
    parts: list[_Part] = field(default_factory=list)  # the chain, in order

    @property
    def id(self) -> str:
        return f"{self.number:06d}-{self.tag}"

    @property
    def size(self) -> int:
        return sum(p.end - p.start for p in self.parts)


@dataclass
class _View:
    """The bucket's ledger: its segments in order, and the highest number taken."""

    segments: list[_Segment]
    top: int


def _view(names: list[tuple[str, int]]) -> _View:
    """Read a listing of ledger/ (see the module docstring)."""
    top = 0
    found: dict[tuple[int, str], list[_Part]] = {}
    for name, size in names:
        match = _NAME.match(name.rsplit("/", 1)[-1])
        if match is None:
            continue
        number = int(match.group(1))
        top = max(top, number)
        if match.group(2) is None:
            continue  # a mark
        start = int(match.group(3))
        end = int(match.group(4)) if match.group(4) else start + size
        if match.group(4) and end - start != size:
            continue  # a span that is not what its name says: not to be trusted
        found.setdefault((number, match.group(2)), []).append(_Part(name, start, end))
    segments = []
    for (number, tag), parts in sorted(found.items()):
        parts.sort(key=lambda p: (p.start, -p.end))
        segment, at = _Segment(number, tag), 0
        for part in parts:
            if part.start < at or part.end <= part.start:
                continue  # folded into one already taken, or empty
            segment.parts.append(part)  # (a gap before it: pieces deleted by hand)
            at = part.end
        segments.append(segment)
    return _View(segments, top)


@dataclass
class _Copy:
    """What the working copy holds (`remote.json`)."""

    url: str
    pulled: list[list[Any]] = field(default_factory=list)  # [segment id, bytes] before `base`
    segment: str | None = None  # this machine's latest segment (NNNNNN-TAG)
    base: int = 0  # where that segment starts in the working copy
    pushed: int = 0  # how many of its bytes are in the bucket
    spanned: int = 0  # how many of those are in spans (the rest: `pieces` pieces)
    pieces: int = 0


class RemoteLedger:
    """The ledger of an object-store output: pulled into the state directory, pushed back."""

    def __init__(self, store: ObjectStore, state_dir: Path, *, shared: bool = False) -> None:
        """`shared`: one of several workers of a run (whose driver holds the lock), each
        writing a segment of its own: a number another worker took is not another run's."""
        self.store = store
        self.state_dir = state_dir
        self.shared = shared
        self.path = state_dir / LEDGER_NAME
        self._state_path = state_dir / STATE_FILE
        self._copy = _Copy(store.location)
        #: Pushes come from the upload timer's thread, the gate's and the end's: one at a time
        #: (two at once would both count the same piece).
        self._pushing = threading.RLock()

    # -- the working copy's bookkeeping --

    def check(self) -> None:
        """UsageError if the state directory holds another output's state (before anything
        touches the bucket)."""
        self._load()

    def _load(self) -> _Copy | None:
        """The copy's bookkeeping; None if there is none (or it is damaged: the copy is then
        accounted for by content, see `pull`)."""
        try:
            raw = orjson.loads(self._state_path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        if not isinstance(raw, dict):
            return None
        if raw.get("url") != self.store.location:
            raise UsageError(
                f"--state {self.state_dir} holds the state of {raw.get('url')!r}, not of "
                f"{self.store.location}: give each output its own state directory"
            )
        try:
            return _Copy(
                url=str(raw["url"]),
                pulled=[[str(s), int(n)] for s, n in raw.get("pulled", [])],
                segment=raw.get("segment"),
                base=int(raw.get("base", 0)),
                pushed=int(raw.get("pushed", 0)),
                spanned=int(raw.get("spanned", 0)),
                pieces=int(raw.get("pieces", 0)),
            )
        except (TypeError, ValueError, KeyError):
            return None

    def _save(self) -> None:
        data = orjson.dumps(self._copy.__dict__)
        temp = self._state_path.with_name(f".{STATE_FILE}.part")
        with open(temp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, self._state_path)
        fsync_path(str(self.state_dir), os.O_RDONLY | os.O_DIRECTORY)

    # -- pull and push --

    def view(self) -> _View:
        return _view(self.store.sizes(LEDGER_DIR))

    def pull(self) -> None:
        """Make the working copy hold every segment of the bucket, then open a new segment
        (see the module docstring). StorageError if the bucket cannot be read or written."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        known = self.push_left()  # what an earlier run here left unpushed goes first
        view = self.view()
        # The mark first: a number taken elsewhere leaves this copy as it was.
        number = self._mark(view.top + 1)
        copy = self._copy
        # (A segment with nothing pushed has no part in the bucket: it is not there to hold.)
        held = copy.pulled + ([[copy.segment, copy.pushed]] if copy.segment and copy.pushed else [])
        have = [[s.id, s.size] for s in view.segments]
        size = self.path.stat().st_size if self.path.exists() else 0
        lost = b""
        if size == 0 and not held:  # nothing here yet: the whole bucket
            self._fetch(view.segments, self.path, append=False)
        elif known and size == copy.base + copy.pushed and have[: len(held)] == held:
            self._fetch(view.segments[len(held) :], self.path, append=True)
        else:  # not accounted for: rebuilt from the bucket, keeping what the bucket lacks
            fresh = self.path.with_name(f".{LEDGER_NAME}.pulling")
            seen = self._fetch(view.segments, fresh, append=False, digests=True)
            lost = _missing_lines(self.path, seen)
            os.replace(fresh, self.path)
            fsync_path(str(self.state_dir), os.O_RDONLY | os.O_DIRECTORY)
        self._copy = _Copy(
            self.store.location,
            pulled=have,
            segment=f"{number:06d}-{uuid.uuid4().hex[:8]}",
            base=self.path.stat().st_size,
        )
        self._save()
        if lost:  # lines only this copy had (its bookkeeping was lost): this run's first
            with open(self.path, "ab") as fh:
                fh.write(lost)
                fh.flush()
                os.fsync(fh.fileno())
            self.push()

    def push_left(self) -> _Copy | None:
        """Push what the last run in this state directory left unpushed, and nothing else
        (the start of `pull`; a Ray run's driver also does it for every worker's directory
        before any worker pulls, so that each of them sees those lines). The copy's
        bookkeeping as found: None if there was none (nothing can be pushed without it)."""
        known = self._load()
        self._copy = known or _Copy(self.store.location)
        if self.path.exists():
            cut_torn_tail(self.path)
            self.push()
        return known

    def _mark(self, number: int) -> int:
        """Take a segment number: its mark, created only if absent (a run elsewhere taking the
        same one fails here; a worker of the same run takes the next)."""
        for _ in range(MARK_TRIES if self.shared else 1):
            try:
                self.store.write(f"{LEDGER_DIR}/{number:06d}.jsonl", b"", create=True)
                return number
            except FileExistsError:
                number += 1
            except Exception as exc:
                where = f"cannot write to {self.store.location}/{LEDGER_DIR}"
                raise classify(exc, where) from exc
        raise StorageError(
            f"{self.store.location}/{LEDGER_DIR}/{number - 1:06d}.jsonl exists: another run "
            "is writing this output"
        )

    def _fetch(
        self, segments: list[_Segment], path: Path, *, append: bool, digests: bool = False
    ) -> set[bytes]:
        """Download segments, in order, onto the end of `path` (fsynced); with `digests`, the
        digests of the lines written."""
        seen: set[bytes] = set()
        names = [part.name for segment in segments for part in segment.parts]
        with open(path, "ab" if append else "wb") as fh:
            for at in range(0, len(names), _FETCH_AT_ONCE):
                for data in self.store.read_many(names[at : at + _FETCH_AT_ONCE]):
                    if data and not data.endswith(b"\n"):
                        data += b"\n"  # a damaged piece: its torn line stays its own
                    fh.write(data)
                    if digests:
                        seen.update(_digest(line) for line in data.splitlines())
            fh.flush()
            os.fsync(fh.fileno())
        return seen

    def push(self) -> int:
        """Upload the whole lines of this machine's segment not yet in the bucket, as one
        piece (folding pieces into a span every `SPAN_EVERY`); the bytes uploaded.
        StorageError if the store refuses."""
        with self._pushing:
            return self._push()

    def _push(self) -> int:
        copy = self._copy
        if copy.segment is None or not self.path.exists():
            return 0
        sent = 0
        while data := self._unpushed():
            name = f"{LEDGER_DIR}/{copy.segment}-{copy.pushed:012d}.jsonl"
            try:
                self.store.write(name, data, create=True)
                copy.pushed += len(data)
                copy.pieces += 1
                sent += len(data)
            except FileExistsError:  # pushed before a crash kept it from being noted
                size = int(self.store.info(name).get("size") or 0)
                if size <= 0:
                    raise StorageError(
                        f"{self.store.location}/{name} is empty, not a piece of the ledger"
                    ) from None
                copy.pushed += size
                copy.pieces += 1
            except StorageError:
                raise
            except Exception as exc:
                raise classify(exc, f"cannot write {self.store.location}/{name}") from exc
            self._save()
        if copy.pieces >= SPAN_EVERY:
            self._fold()
        return sent

    def _unpushed(self) -> bytes:
        copy = self._copy
        with open(self.path, "rb") as fh:
            fh.seek(copy.base + copy.pushed)
            data = fh.read()
        return data[: data.rfind(b"\n") + 1]  # whole lines only

    def fold(self) -> None:
        """Put the pieces pushed since the last span into one span, then delete them."""
        with self._pushing:
            self._fold()

    def _fold(self) -> None:
        copy = self._copy
        if copy.segment is None or copy.pieces < 2:
            return
        start, end = copy.spanned, copy.pushed
        with open(self.path, "rb") as fh:
            fh.seek(copy.base + start)
            data = fh.read(end - start)
        name = f"{LEDGER_DIR}/{copy.segment}-{start:012d}-{end:012d}.jsonl"
        try:
            self.store.write(name, data, create=True)
        except FileExistsError:
            pass  # written before a crash
        except Exception as exc:
            raise classify(exc, f"cannot write {self.store.location}/{name}") from exc
        copy.spanned, copy.pieces = end, 0
        self._save()
        prefix = f"{LEDGER_DIR}/{copy.segment}-"
        for other, _ in self.store.sizes(LEDGER_DIR):
            match = _NAME.match(other.rsplit("/", 1)[-1])
            if match is None or match.group(4) is not None or not other.startswith(prefix):
                continue
            if start <= int(match.group(3)) < end:
                with contextlib.suppress(Exception):  # lingering, it is only skipped
                    self.store.delete(other)

    def finish(self) -> None:
        """At the end of a run: push the rest, and fold what is not in a span yet."""
        with self._pushing:
            self._push()
            self._fold()

    def push_file(self, local: Path, name: str) -> None:
        """Upload a file the run keeps whole (metadata.jsonl), replacing the bucket's copy;
        an absent file removes it there."""
        try:
            if local.exists():
                self.store.write(name, local.read_bytes())
            else:
                self.store.delete(name)
        except Exception as exc:
            raise classify(exc, f"cannot write {self.store.location}/{name}") from exc


def _digest(line: bytes) -> bytes:
    return hashlib.blake2b(line.rstrip(b"\n"), digest_size=16).digest()


def _missing_lines(path: Path, seen: set[bytes]) -> bytes:
    """The whole lines of a local file whose digest is not in `seen`, in order."""
    if not path.exists():
        return b""
    kept = []
    with open(path, "rb") as fh:
        for line in fh:
            if line.endswith(b"\n") and line.strip() and _digest(line) not in seen:
                kept.append(line)
    return b"".join(kept)


class PushGate:
    """Under `--max-cost`: a request goes out only once its `sent` line is in the bucket, so
    the cap holds for a run continued on another machine after this one died. Pushes are
    shared (one covers every line written before it starts) and at most one a
    `GATE_EVERY_S`."""

    def __init__(self, ledger: RemoteLedger) -> None:
        self.ledger = ledger
        self._asked = 0  # requests that asked for a push
        self._done = 0  # the most asked that a finished push covers
        self._lock = anyio.Lock()
        self._last = 0.0
        self._error: StorageError | None = None

    async def wait(self) -> None:
        """Return once a push that started after this call has finished; StorageError if
        the store refuses."""
        self._asked += 1
        mine = self._asked
        async with self._lock:  # one push at a time; those waiting share the next
            if self._error is not None:  # the store refused: every waiter stops at once
                raise self._error
            if self._done >= mine:
                return
            await anyio.sleep(max(0.0, self._last + GATE_EVERY_S - time.monotonic()))
            covers = self._asked
            self._last = time.monotonic()
            try:
                await anyio.to_thread.run_sync(self.ledger.push)
            except StorageError as exc:
                self._error = exc
                raise
            self._done = covers


def download_ledger(store: ObjectStore, into: Path) -> Path:
    """The bucket's ledger, read into one local file (`into`, a directory): for `report`,
    `verify`, `estimate --from-ledger`. UsageError if the bucket has none."""
    ledger = RemoteLedger(store, into)
    segments = ledger.view().segments
    if not segments:
        raise UsageError(f"no ledger at {store.location}/{LEDGER_DIR}/ (give a run's output URL)")
    into.mkdir(parents=True, exist_ok=True)
    path = into / LEDGER_NAME
    ledger._fetch(segments, path, append=False)
    return path


class BucketLock:
    """One run per output URL: an object with its owner and a heartbeat (see `acquire`).

    On S3 every write of it is conditional (create only if absent; replace only the version
    read), so two runs racing for it cannot both win. A lock is stale, and may be taken over,
    when both its own heartbeat (the holder's clock) and its last write (the store's clock,
    against an object written just now) are older than `ttl_s`: a holder with a slow clock,
    or a garbled lock written a moment ago, is not taken for dead.
    """

    def __init__(self, store: ObjectStore, state_dir: Path, ttl_s: float | None = None) -> None:
        self.store = store
        self.ttl_s = ttl_s if ttl_s is not None else _lock_ttl_s()
        self.token = uuid.uuid4().hex
        #: The token of the last run from this state directory, which `Engine` opens only
        #: under its local lock: a lock object holding it is a dead run's, whatever its age.
        self._token_file = state_dir / "lock-token"
        self._etag: str | None = None
        self._started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def _body(self) -> bytes:
        return orjson.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "token": self.token,
                "started_at": self._started,
                "heartbeat_at": time.time(),
                "ttl_s": self.ttl_s,
            }
        )

    def acquire(self) -> str | None:
        """Take the lock; a message if it was taken over from a dead run. UsageError if a live
        run holds it (or another run takes it first)."""
        where = f"{self.store.location}/{LOCK_OBJECT}"
        try:
            earlier = self._token_file.read_text().strip()
        except OSError:
            earlier = ""
        try:
            self._etag = _etag(self.store.write(LOCK_OBJECT, self._body(), create=True))
            self._keep_token()
            return None
        except FileExistsError:
            pass
        except Exception as exc:
            raise classify(exc, f"cannot write {where}") from exc
        try:
            raw = self.store.read(LOCK_OBJECT)
            details = self.store.info(LOCK_OBJECT)
        except FileNotFoundError:  # released meanwhile
            return self.acquire()
        holder = _holder(raw)
        age = min(time.time() - holder["heartbeat_at"], self._written_ago(details))
        who = f"a run on {holder['host']} (pid {holder['pid']}, started {holder['started_at']})"
        ours = bool(earlier) and holder.get("token") == earlier
        if ours:
            who = f"the last run from this state directory ({holder['host']}, pid {holder['pid']})"
        elif age <= (ttl := max(self.ttl_s, holder["ttl_s"])):
            raise UsageError(
                f"{who} is using {self.store.location}: its last heartbeat was {max(age, 0):.0f} "
                f"s ago. Let it finish (or stop it) first; if it died, its lock can be taken "
                f"over once the heartbeat is {ttl:.0f} s old (in {ttl - age + 1:.0f} s)"
            )
        try:
            match = {"IfMatch": details["ETag"]} if self.store.conditional else {}
            self._etag = _etag(self.store.write(LOCK_OBJECT, self._body(), **match))
        except Exception:
            raise UsageError(
                f"{where}: another run took the lock of {who} first; let it finish"
            ) from None
        self._keep_token()
        why = (
            "it is not running (this state directory's local lock was free)"
            if ours
            else f"its last heartbeat was {age:.0f} s ago, so it is taken to be dead"
        )
        return (
            f"took over the lock of {who}: {why}; its requests in flight count at their worst case"
        )

    @property
    def heartbeat_s(self) -> float:
        """How often the heartbeat is renewed: every 15 s, and at least 4 times a TTL."""
        return min(HEARTBEAT_S, self.ttl_s / 4)

    def _keep_token(self) -> None:
        self._token_file.parent.mkdir(parents=True, exist_ok=True)
        self._token_file.write_text(self.token)

    def _written_ago(self, details: dict[str, Any]) -> float:
        """Seconds since the lock was last written, by the store's clock (inf if the store
        does not say)."""
        then = _modified(details)
        clock = f".batchimg-clock-{self.token[:12]}"
        try:
            self.store.write(clock, b"")
            now = _modified(self.store.info(clock))
            self.store.delete(clock)
        except Exception as exc:
            raise classify(exc, f"cannot write {self.store.location}/{clock}") from exc
        return now - then if now is not None and then is not None else float("inf")

    def beat(self) -> None:
        """Renew the heartbeat; StorageError if the lock is no longer this run's."""
        where = f"{self.store.location}/{LOCK_OBJECT}"
        try:
            if self.store.conditional and self._etag is not None:
                answer = self.store.write(LOCK_OBJECT, self._body(), IfMatch=self._etag)
            else:
                if _holder(self.store.read(LOCK_OBJECT)).get("token") != self.token:
                    raise OSError("held by another run")
                answer = self.store.write(LOCK_OBJECT, self._body())
        except Exception as exc:
            if isinstance(exc, OSError) and not isinstance(exc, PermissionError):
                raise LockLost(
                    f"lost the lock {where}: another run took it over (was this run stalled "
                    f"for over {self.ttl_s:.0f} s?); stopping"
                ) from exc
            raise classify(exc, f"cannot renew {where}") from exc
        self._etag = _etag(answer)

    def release(self) -> None:
        with contextlib.suppress(Exception):
            if _holder(self.store.read(LOCK_OBJECT)).get("token") == self.token:
                self.store.delete(LOCK_OBJECT)


class LockLost(StorageError):
    """Another run took this run's lock over: stop, so two runs do not write at once."""

    advice = "make sure one run at a time writes to the output"


def _lock_ttl_s() -> float:
    """The lock's time to live: 60 s, or `BATCHIMG_LOCK_TTL_S` (for tests and operators; the
    heartbeat then comes 4 times as often). UsageError for a value that is not a number of
    seconds of at least 1."""
    text = os.environ.get("BATCHIMG_LOCK_TTL_S")
    if text is None:
        return LOCK_TTL_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1.0):
        raise UsageError(f"BATCHIMG_LOCK_TTL_S={text!r}: give a number of seconds, at least 1")
    return value


def _modified(details: dict[str, Any]) -> float | None:
    """When an object was last written, as a POSIX time, if its details say."""
    value = details.get("LastModified", details.get("mtime", details.get("updated")))
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None


def _line_key(record: LedgerRecord) -> tuple[Any, ...]:
    return (record.get("run_id"), record["id"], record.get("attempts"), record.get("record"))


def _etag(answer: Any) -> str | None:
    return answer.get("ETag") if isinstance(answer, dict) else None


def _holder(raw: bytes) -> dict[str, Any]:
    """A lock object's body, with defaults for what is missing or garbled (a garbled lock
    has no heartbeat: it is stale)."""
    holder: dict[str, Any] = {
        "host": "?", "pid": "?", "started_at": "?", "heartbeat_at": 0.0, "ttl_s": 0.0
    }  # fmt: skip
    with contextlib.suppress(orjson.JSONDecodeError):
        body = orjson.loads(raw)
        if isinstance(body, dict):
            holder.update({k: v for k, v in body.items() if k in holder or k == "token"})
    for key in ("heartbeat_at", "ttl_s"):  # a number, or nothing said
        value = holder[key]
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        holder[key] = float(value) if finite and not isinstance(value, bool) else 0.0
    return holder


class RemoteOutput:
    """What a run on an object-store output adds to a local one: the lock object, the ledger
    pulled before and pushed during and after, and the files kept whole (`metadata.jsonl`)."""

    def __init__(
        self, store: ObjectStore, state_dir: Path, upload_every_s: float, *, locked: bool = True
    ) -> None:
        """`locked` False: another process holds the prefix's lock for this run (the driver of
        a Ray run, whose workers each push a segment of their own)."""
        self.store = store
        self.state_dir = state_dir
        self.ledger = RemoteLedger(store, state_dir, shared=not locked)
        self.lock = BucketLock(store, state_dir) if locked else None
        self.upload_every_s = upload_every_s

    def unpark(self) -> int:
        """Put the files an earlier run here parked (the store refused them) and append their
        items' lines to the ledger; how many items. An item made again meanwhile (by a run
        elsewhere) keeps that run's files: the parked ones go to `.orphans/`, and the line is
        kept as a charge (paid for, not the item's state). StorageError if the store still
        refuses."""
        lines_path = self.state_dir / PARKED_LINES
        if not lines_path.exists():
            return 0
        held = list(read_ledger(lines_path))
        keys = {_line_key(r) for r in held}
        ids = {r["id"] for r in held}
        already, redone = set(), set()
        for record in read_ledger(self.ledger.path):
            if record["id"] not in ids:
                continue
            if _line_key(record) in keys:
                already.add(_line_key(record))  # appended before a crash: once is enough
            elif is_state(record) and record.get("status") == "ok":
                redone.add(record["id"])
        with LedgerWriter(self.ledger.path) as ledger:
            for record in held:
                if _line_key(record) in already:
                    continue
                files = record.get("files")
                originals = [str(n) for n in files] if isinstance(files, list) else []
                targets = originals
                line: dict[str, Any] = dict(record)
                if record["id"] in redone:
                    targets = [aside_name(PurePosixPath(n).name) for n in originals]
                    line.update(record="charge", attempt=record.get("attempts"), files=targets)
                for original, target in zip(originals, targets, strict=True):
                    parked = self.state_dir / PARKED_DIR / original
                    if parked.is_file():
                        self.store.put(target, parked)
                ledger.append(line)
        lines_path.unlink()
        shutil.rmtree(self.state_dir / PARKED_DIR, ignore_errors=True)
        fsync_path(str(self.state_dir), os.O_RDONLY | os.O_DIRECTORY)
        return len(held)

    def push_files(self, names: tuple[str, ...]) -> None:
        """The files a layout keeps in the state directory, to the bucket, whole."""
        for name in names:
            self.ledger.push_file(self.state_dir / name, name)


_FETCHED: dict[str, tuple[Path, ObjectStore]] = {}  # URL -> its ledger, read once per process


def fetched_ledger(url: str) -> Path:
    """The ledger of an output URL as a local file (read once per process, removed at exit);
    UsageError for a missing extra, an unreadable bucket or one without a ledger."""
    key = url.rstrip("/")
    if key not in _FETCHED:
        from . import open_store

        temp = Path(tempfile.mkdtemp(prefix="batchimg-ledger-"))
        atexit.register(shutil.rmtree, temp, True)
        store = open_store(key, temp)
        assert isinstance(store, ObjectStore)
        try:
            path = download_ledger(store, temp)
        except StorageError as exc:
            raise UsageError(f"cannot read the ledger of {store.location}: {exc}") from None
        _FETCHED[key] = (path, store)
    return _FETCHED[key][0]


def shown_ledger(path: Path) -> str:
    """A ledger's place for people: a fetched one by its URL, a local one by its path."""
    store = origin_of(path)
    return f"{store.location}/{LEDGER_DIR}/" if store is not None else str(path)


def origin_of(ledger: Path) -> ObjectStore | None:
    """The store a ledger was fetched from by `fetched_ledger`, if it was."""
    for path, store in _FETCHED.values():
        if path == ledger:
            return store
    return None
