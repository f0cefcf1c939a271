"""`batchimg verify DIR`: does every `ok` item still have its images, byte for byte?

A run trusts the ledger: an item whose last state is `ok` is never sent again. If an image was
deleted or changed since (by hand, a bad disk, a sync tool), the item stays skipped forever and
`metadata.jsonl` lists a file that is not there. `verify` reads every `ok` item's last line and
checks each of its files (loose under `images/`, or packed in a webdataset shard) against the
size and sha256 the ledger recorded. `--repair` appends a line that marks each broken item
failed (`verify_failed`), so the next run of the same command makes it again; the broken files
are left where they are (a later image of the same name sets them aside, never overwrites).
"""

from __future__ import annotations

import hashlib
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import IO

from ._idset import IdSet, count_lines
from .errors import UsageError
from .layouts.webdataset import sample_key
from .ledger import LEDGER_NAME, LedgerRecord, LedgerWriter, is_state
from .outdir import exclusive
from .outputs import OutputTree
from .report import read_backwards
from .stores import is_url, local_path
from .stores.remote import fetched_ledger, origin_of
from .writer import IMAGES_DIR

_CHUNK = 1 << 20


@dataclass
class Broken:
    """An ok item whose files are not what its line says."""

    record: LedgerRecord
    problems: list[str]


@dataclass
class VerifyReport:
    checked: int = 0  # ok items
    files: int = 0
    broken: list[Broken] = field(default_factory=list)
    repaired: bool = False


def _loose(tree: OutputTree, name: str) -> tuple[int, str] | None:
    """A loose file's size and sha256; None if there is none; ValueError for a name that is not
    a file of the output (outside it, or through a link out of it)."""
    if not name.startswith(f"{IMAGES_DIR}/"):
        raise ValueError(name)
    if tree.store is not None:
        tree.store.key(name)  # ValueError for `..`
        try:
            with tree.store.open(name) as fh:
                return _digest(fh)
        except FileNotFoundError:
            return None
    path = tree.out / name
    if not path.resolve().is_relative_to(tree.out.resolve()):
        raise ValueError(name)
    if not path.is_file():
        return None
    with open(path, "rb") as fh:
        return _digest(fh)


def _digest(fh: IO[bytes]) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    while chunk := fh.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _packed(tree: OutputTree) -> dict[str, tuple[int, str]]:
    """Every image packed in the output's shards: key -> (size, sha256 of its bytes)."""
    packed: dict[str, tuple[int, str]] = {}
    for shard in tree.shards():
        try:
            for member, data in tree.images(shard):
                packed[member.name.partition(".")[0]] = _digest(data)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise UsageError(f"{tree.shown(shard)} is not a readable shard ({exc})") from None
    return packed


def _last_ok_records(ledger: Path) -> Iterator[LedgerRecord]:
    """Each item's last line, where that line is ok (newest first, one pass, compact memory)."""
    seen = IdSet(count_lines(ledger))
    for record in read_backwards(ledger):
        if not is_state(record) or not seen.add(record["id"]):
            continue
        if record.get("status") == "ok":
            yield record


def _problems(
    tree: OutputTree, record: LedgerRecord, packed: dict[str, tuple[int, str]]
) -> list[str]:
    files, sizes, digests = record.get("files"), record.get("bytes"), record.get("sha256")
    if not (isinstance(files, list) and isinstance(sizes, list) and isinstance(digests, list)):
        return ["the line has no list of files, sizes and sha256"]
    if not files or not len(files) == len(sizes) == len(digests):
        return ["the line's files, sizes and sha256 do not match up"]
    problems = []
    for name, size, digest in zip(files, sizes, digests, strict=True):
        try:
            loose = _loose(tree, str(name))
        except ValueError:
            problems.append(f"{name}: not a file of the output directory")
            continue
        if loose is not None:
            if loose[0] != size:
                problems.append(f"{name}: {loose[0]:,} bytes, not {size:,}")
            elif loose[1] != digest:
                problems.append(f"{name}: its sha256 is not the one recorded")
        elif (found := packed.get(sample_key(PurePosixPath(str(name)).name))) is not None:
            if found != (size, digest):
                problems.append(f"{name}: the shard's copy is not the one recorded")
        else:
            problems.append(f"{name}: missing (neither loose nor in a shard)")
    return problems


def verify(out: str | Path, *, repair: bool = False) -> VerifyReport:
    """Check every ok item's files; with `repair`, mark the broken ones for the next run.

    `out` may be an output URL (s3://...): its ledger and files are read from the bucket
    (`repair` is refused there: the marks would have to go up as a ledger segment under the
    bucket's lock, which `verify` does not take)."""
    if is_url(out):
        if repair:
            raise UsageError(
                f"verify --repair works on a local output directory, not on {out}: re-run "
                "`batchimg verify` without --repair to see what is broken"
            )
        ledger = fetched_ledger(str(out))
        store = origin_of(ledger)
        assert store is not None
        return _verify(ledger, OutputTree(ledger.parent, store), repair=False)
    out = local_path(out)
    ledger = out / LEDGER_NAME
    if not ledger.is_file():
        raise UsageError(f"no ledger at {str(ledger)!r} (give a run's output directory)")
    with exclusive(out):  # a run writing here meanwhile would make the answer wrong
        return _verify(ledger, OutputTree(out), repair=repair)


def _verify(ledger: Path, tree: OutputTree, *, repair: bool) -> VerifyReport:
    report = VerifyReport()
    packed = _packed(tree)
    for record in _last_ok_records(ledger):
        report.checked += 1
        files = record.get("files")
        report.files += len(files) if isinstance(files, list) else 0
        problems = _problems(tree, record, packed)
        if problems:
            report.broken.append(Broken(record, problems))
    if repair and report.broken:
        _mark_failed(ledger, report.broken)
        report.repaired = True
    return report


def _mark_failed(ledger: Path, broken: list[Broken]) -> None:
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    run_id = f"verify-{uuid.uuid4().hex[:8]}"
    with LedgerWriter(ledger) as writer:
        for item in broken:
            message = "verify: " + "; ".join(item.problems) + " (made again by the next run)"
            line = {
                **item.record,
                "status": "error",
                "files": [],
                "bytes": [],
                "sha256": [],
                "usage": None,
                "cost_usd": None,  # nothing was bought: the ok line keeps what was paid
                "attempts": 0,
                "rate_limited": 0,
                "latency_s": None,
                "request_id": None,
                "run_id": run_id,
                "started_at": now,
                "finished_at": now,
                "error": {"code": "verify_failed", "type": "local_error", "message": message,
                          "http_status": None, "request_id": None},
            }  # fmt: skip
            for key in ("cost_bound_usd", "cost_note", "extra_usage"):
                line.pop(key, None)
            writer.append(line)


def format_report(out: str | Path, report: VerifyReport) -> str:
    lines = [
        f"{out}: {item.record['id']} (line {item.record.get('line')}): {problem}"
        for item in report.broken
        for problem in item.problems
    ]
    verdict = "all intact" if not report.broken else f"{len(report.broken)} broken"
    lines.append(f"{out}: {report.checked:,} ok items, {report.files:,} files checked, {verdict}")
    if report.repaired:
        lines.append(
            f"{out}: marked {len(report.broken)} items failed (verify_failed): re-run the same "
            "command to make them again"
        )
    elif report.broken:
        lines.append(f"{out}: `batchimg verify {out} --repair` marks them to be made again")
    return "\n".join(lines)
