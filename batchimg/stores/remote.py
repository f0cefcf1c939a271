"""An output in object storage: its lock object, and its ledger as segments in the bucket.

A bucket has no rename and no append, so the ledger is kept as immutable pieces:

    PREFIX/ledger/NNNNNN-TAG.jsonl               a segment's mark (empty): its number is taken
    PREFIX/ledger/NNNNNN-TAG-OOOOOOOOOOOO.jsonl  whole ledger lines of segment NNNNNN, from
                                                 byte OOOOOOOOOOOO of that segment on
    PREFIX/.batchimg.lock                        the run holding the prefix: owner, heartbeat

Read in key order, the pieces are the ledger. Each run writes one segment, numbered one past
every segment in the bucket when it starts (under the lock, so segments never interleave).

Locally, in the run's state directory (`--state`), `ledger.jsonl` is the working copy: every
piece of the bucket, in order, then this run's lines, written and fsynced exactly as a local
run's ledger (so resuming, the cap and the layouts read it unchanged). `remote.json` says which
pieces the copy holds and how much of this run's segment is in the bucket. `push` uploads the
whole lines not yet there as a new piece; the run does so every `--upload-every` seconds, at the
end and on every stop. A piece's key is fixed by where it starts, so a push cut short by a crash
and done again finds its piece there and moves on: no line is ever in the bucket twice.

`pull`, at the start of every run, first pushes what an earlier run on this machine left
unpushed, then brings in the pieces the copy lacks (another machine's runs): a run moved to
another machine continues without repeating an `ok` item.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

from ..errors import StorageError, UsageError
from ..ledger import LEDGER_NAME, LedgerRecord, LedgerWriter, cut_torn_tail, read_ledger
from .local import fsync_path
from .objects import PARKED_DIR, PARKED_LINES, ObjectStore, classify

LEDGER_DIR = "ledger"
LOCK_OBJECT = ".batchimg.lock"
STATE_FILE = "remote.json"
LOCK_TTL_S = 60.0  # a lock whose heartbeat is older than this may be taken over
HEARTBEAT_S = 15.0
UPLOAD_EVERY_S = 10.0
_PIECE = re.compile(r"^(\d{6})-([0-9a-f]{8})(?:-(\d{12}))?\.jsonl$")
_FETCH_AT_ONCE = 64  # pieces downloaded together


def piece_order(names: Iterator[str] | list[str]) -> list[str]:
    """The ledger's pieces among object names (`ledger/...`), in reading order."""
    return sorted(n for n in names if _PIECE.match(n.rsplit("/", 1)[-1]))


def _segment_number(name: str) -> int:
    match = _PIECE.match(name.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else 0


def _segment_of(name: str) -> str:
    match = _PIECE.match(name.rsplit("/", 1)[-1])
    return f"{match.group(1)}-{match.group(2)}" if match else ""


@dataclass
class _Copy:
    """What the working copy holds (`remote.json`)."""

    url: str
    pulled: list[str] = field(default_factory=list)  # pieces held before `base`, in order
    segment: str | None = None  # this machine's latest segment (NNNNNN-TAG)
    base: int = 0  # where that segment starts in the working copy
    pushed: int = 0  # how many of its bytes are in the bucket


class RemoteLedger:
    """The ledger of an object-store output: pulled into the state directory, pushed back."""

    def __init__(self, store: ObjectStore, state_dir: Path) -> None:
        self.store = store
        self.state_dir = state_dir
        self.path = state_dir / LEDGER_NAME
        self._state_path = state_dir / STATE_FILE
        self._copy = _Copy(store.location)

    # -- the working copy's bookkeeping --

    def _load(self) -> _Copy:
        try:
            raw = orjson.loads(self._state_path.read_bytes())
        except FileNotFoundError:
            return _Copy(self.store.location)
        except (OSError, orjson.JSONDecodeError) as exc:
            raise UsageError(
                f"{self._state_path} cannot be read ({exc}): delete it, and the state "
                "directory's ledger.jsonl is rebuilt from the bucket"
            ) from None
        if not isinstance(raw, dict) or raw.get("url") != self.store.location:
            raise UsageError(
                f"--state {self.state_dir} holds the state of {raw.get('url')!r}, not of "
                f"{self.store.location}: give each output its own state directory"
            )
        return _Copy(
            url=str(raw["url"]),
            pulled=[str(k) for k in raw.get("pulled", [])],
            segment=raw.get("segment"),
            base=int(raw.get("base", 0)),
            pushed=int(raw.get("pushed", 0)),
        )

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

    def pull(self) -> None:
        """Make the working copy hold every piece of the bucket, then open a new segment
        (see the module docstring). StorageError if the bucket cannot be read or written."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._copy = self._load()
        if self.path.exists():
            cut_torn_tail(self.path)
            self.push()  # what an earlier run here left unpushed goes first
        pieces = self._pieces()
        own = [p for p in pieces if self._copy.segment and _segment_of(p) == self._copy.segment]
        held = self._copy.pulled + own
        size = self.path.stat().st_size if self.path.exists() else 0
        whole = size == self._copy.base + self._copy.pushed and pieces[: len(held)] == held
        if whole:
            self._fetch(pieces[len(held) :], self.path, append=True)
        else:  # another machine's pieces sort among ours (or no copy yet): start afresh
            fresh = self.path.with_name(f".{LEDGER_NAME}.pulling")
            self._fetch(pieces, fresh, append=False)
            os.replace(fresh, self.path)
            fsync_path(str(self.state_dir), os.O_RDONLY | os.O_DIRECTORY)
        number = max((_segment_number(p) for p in pieces), default=0) + 1
        segment = f"{number:06d}-{uuid.uuid4().hex[:8]}"
        try:  # the mark takes the number (a run elsewhere meanwhile would fail here)
            self.store.write(f"{LEDGER_DIR}/{segment}.jsonl", b"", create=True)
        except Exception as exc:
            raise classify(exc, f"cannot write to {self.store.location}/{LEDGER_DIR}") from exc
        self._copy = _Copy(
            self.store.location,
            pulled=pieces,
            segment=segment,
            base=self.path.stat().st_size,
            pushed=0,
        )
        self._save()

    def _pieces(self) -> list[str]:
        return piece_order(list(self.store.list(LEDGER_DIR)))

    def _fetch(self, pieces: list[str], path: Path, *, append: bool) -> None:
        """Download pieces, in order, onto the end of `path` (fsynced)."""
        with open(path, "ab" if append else "wb") as fh:
            for at in range(0, len(pieces), _FETCH_AT_ONCE):
                for data in self.read_pieces(pieces[at : at + _FETCH_AT_ONCE]):
                    fh.write(data)
                    if data and not data.endswith(b"\n"):
                        fh.write(b"\n")  # a damaged piece: its torn line stays its own
            fh.flush()
            os.fsync(fh.fileno())

    def read_pieces(self, names: list[str]) -> list[bytes]:
        """Several pieces' bytes, fetched at once, in the order given."""
        keys = [self.store.key(n) for n in names]
        try:
            found: dict[str, Any] = self.store._call(self.store.fs.cat, keys, on_error="return")
        except Exception as exc:
            raise classify(exc, f"cannot read {self.store.location}/{LEDGER_DIR}") from exc
        out = []
        for key in keys:
            data = found.get(key)
            if isinstance(data, BaseException):
                raise classify(data, f"cannot read {self.store.location}/{LEDGER_DIR}")
            out.append(bytes(data or b""))
        return out

    def push(self) -> int:
        """Upload the whole lines of this machine's segment not yet in the bucket, as one
        piece; the number of bytes uploaded. StorageError if the store refuses."""
        copy = self._copy
        if copy.segment is None or not self.path.exists():
            return 0
        sent = 0
        while True:
            start = copy.base + copy.pushed
            with open(self.path, "rb") as fh:
                fh.seek(start)
                data = fh.read()
            data = data[: data.rfind(b"\n") + 1]  # whole lines only
            if not data:
                return sent
            name = f"{LEDGER_DIR}/{copy.segment}-{copy.pushed:012d}.jsonl"
            try:
                self.store.write(name, data, create=True)
                copy.pushed += len(data)
                sent += len(data)
            except FileExistsError:  # pushed before a crash kept it from being noted
                size = int(self.store.info(name).get("size") or 0)
                if size <= 0:
                    raise StorageError(
                        f"{self.store.location}/{name} is empty, not a piece of the ledger"
                    ) from None
                copy.pushed += size
            except StorageError:
                raise
            except Exception as exc:
                raise classify(exc, f"cannot write {self.store.location}/{name}") from exc
            self._save()

    @property
    def unpushed(self) -> int:
        """Bytes of this machine's segment not in the bucket yet."""
        if self._copy.segment is None or not self.path.exists():
            return 0
        return max(0, self.path.stat().st_size - self._copy.base - self._copy.pushed)

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


def download_ledger(store: ObjectStore, into: Path) -> Path:
    """The bucket's ledger, read into one local file (`into`, a directory): for `report`,
    `verify`, `estimate --from-ledger`. UsageError if the bucket has none."""
    ledger = RemoteLedger(store, into)
    pieces = ledger._pieces()
    if not pieces:
        raise UsageError(f"no ledger at {store.location}/{LEDGER_DIR}/ (give a run's output URL)")
    path = into / LEDGER_NAME
    ledger._fetch(pieces, path, append=False)
    return path


class BucketLock:
    """One run per output URL: an object with its owner and a heartbeat (see `acquire`).

    On S3 every write of it is conditional (create only if absent; replace only the version
    read), so two runs racing for it cannot both win. A run whose heartbeat is older than
    `ttl_s` (by this machine's clock) is taken to be dead, and its lock may be taken over.
    """

    def __init__(self, store: ObjectStore, state_dir: Path, ttl_s: float = LOCK_TTL_S) -> None:
        self.store = store
        self.ttl_s = ttl_s
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
        self._token_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            earlier = self._token_file.read_text().strip()
        except OSError:
            earlier = ""
        self._token_file.write_text(self.token)
        try:
            self._etag = _etag(self.store.write(LOCK_OBJECT, self._body(), create=True))
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
        age = time.time() - holder["heartbeat_at"]
        who = f"a run on {holder['host']} (pid {holder['pid']}, started {holder['started_at']})"
        ours = bool(earlier) and holder.get("token") == earlier
        if ours:
            who = f"the last run from this state directory ({holder['host']}, pid {holder['pid']})"
        elif age <= self.ttl_s:
            raise UsageError(
                f"{who} is using {self.store.location}: its last heartbeat was {max(age, 0):.0f} "
                f"s ago. Let it finish (or stop it) first; if it died, its lock can be taken "
                f"over once the heartbeat is {self.ttl_s:.0f} s old (in "
                f"{self.ttl_s - age + 1:.0f} s)"
            )
        try:
            match = {"IfMatch": details["ETag"]} if self.store._conditional else {}
            self._etag = _etag(self.store.write(LOCK_OBJECT, self._body(), **match))
        except Exception:
            raise UsageError(
                f"{where}: another run took the lock of {who} first; let it finish"
            ) from None
        why = (
            "it is not running (this state directory's local lock was free)"
            if ours
            else f"its last heartbeat was {age:.0f} s ago, so it is taken to be dead"
        )
        return (
            f"took over the lock of {who}: {why}; its requests in flight count at their worst case"
        )

    def beat(self) -> None:
        """Renew the heartbeat; StorageError if the lock is no longer this run's."""
        where = f"{self.store.location}/{LOCK_OBJECT}"
        try:
            if self.store._conditional and self._etag is not None:
                answer = self.store.write(LOCK_OBJECT, self._body(), IfMatch=self._etag)
            else:
                if _holder(self.store.read(LOCK_OBJECT)).get("token") != self.token:
                    raise OSError("held by another run")
                answer = self.store.write(LOCK_OBJECT, self._body())
        except Exception as exc:
            if isinstance(exc, OSError) and not isinstance(exc, PermissionError):
                raise StorageError(
                    f"lost the lock {where} (another run took it over: was this run stalled "
                    f"for over {self.ttl_s:.0f} s?); stopping so two runs do not write at once"
                ) from exc
            raise classify(exc, f"cannot renew {where}") from exc
        self._etag = _etag(answer)

    def release(self) -> None:
        with contextlib.suppress(Exception):
            if _holder(self.store.read(LOCK_OBJECT)).get("token") == self.token:
                self.store.delete(LOCK_OBJECT)


def _line_key(record: LedgerRecord) -> tuple[Any, ...]:
    return (record.get("run_id"), record["id"], record.get("attempts"), record.get("record"))


def _etag(answer: Any) -> str | None:
    return answer.get("ETag") if isinstance(answer, dict) else None


def _holder(raw: bytes) -> dict[str, Any]:
    """A lock object's body, with defaults for what is missing or garbled (a garbled lock
    has no heartbeat: it is stale)."""
    holder: dict[str, Any] = {"host": "?", "pid": "?", "started_at": "?", "heartbeat_at": 0.0}
    with contextlib.suppress(orjson.JSONDecodeError):
        body = orjson.loads(raw)
        if isinstance(body, dict):
            holder.update({k: v for k, v in body.items() if k in holder or k == "token"})
    if not isinstance(holder["heartbeat_at"], (int, float)):
        holder["heartbeat_at"] = 0.0
    return holder


class RemoteOutput:
    """What a run on an object-store output adds to a local one: the lock object, the ledger
    pulled before and pushed during and after, and the files kept whole (`metadata.jsonl`)."""

    def __init__(self, store: ObjectStore, state_dir: Path, upload_every_s: float) -> None:
        self.store = store
        self.state_dir = state_dir
        self.ledger = RemoteLedger(store, state_dir)
        self.lock = BucketLock(store, state_dir)
        self.upload_every_s = upload_every_s

    def unpark(self) -> int:
        """Put the files an earlier run here parked (the store refused them) and append their
        items' lines to the ledger; how many items. StorageError if the store still refuses."""
        lines_path = self.state_dir / PARKED_LINES
        if not lines_path.exists():
            return 0
        held = list(read_ledger(lines_path))
        keys = {_line_key(r) for r in held}
        already = {_line_key(r) for r in read_ledger(self.ledger.path) if _line_key(r) in keys}
        with LedgerWriter(self.ledger.path) as ledger:
            for record in held:
                if _line_key(record) in already:  # appended before a crash: once is enough
                    continue
                files = record.get("files")
                for name in files if isinstance(files, list) else []:
                    parked = self.state_dir / PARKED_DIR / str(name)
                    if parked.is_file():
                        self.store.put(str(name), parked)
                ledger.append(record)
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
