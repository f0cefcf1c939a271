"""The Batch API path: the same run, with the requests sent as batches at half the price.

`BatchEngine` is the `Engine` (lock, resume from the ledger, sink, layout, writer, budget,
signals, summary) with its producer and workers replaced by rounds:

1. **Advance** every live batch of the directory (`batchstate`): a closed input file is
   uploaded, an uploaded one made into a batch, a running one looked at; a finished one is
   **collected**: its output and error files are streamed to disk, then read line by line,
   matched to their items by `custom_id`, and each answer's images stored and its ledger line
   written, exactly as an online answer's (plus `via: "batch"` and `batch_id`).
2. **Submit** what is pending (not `ok`, not in a live batch, or sent again after a line the
   API could not run): one input file per endpoint and model, split at the API's 50,000 lines
   and 200 MB, each line's worst case counted against `--max-cost` as it is written.
3. **Wait** `--poll-interval` (with jitter) and go again, until nothing is live; with
   `--no-wait`, return at once: the run ends pending (exit 75) while batches are running.

Money, as online: before a file is uploaded, a `sent` line per request (its worst case, at
batch prices) goes into the ledger and is synced, under the run that wrote the file; the item
line that collection writes carries that run's id and attempt, so it settles the `sent` line in
one append, whichever run collects it. A line the API never ran (5xx, expired, cancelled, a
file that failed validation) is settled as not billed and sent again (within
`--max-attempts` per run, by batch or, with `--stragglers online`, online). A file is found
again after a crash by name (uploads) and by input file id (batches), so nothing is uploaded
or submitted twice.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import orjson

from .. import specs
from ..backends.batch import BatchAPI
from ..backends.online import DEFAULT_LIMIT_BYTES, OnlineBackend
from ..config import RunConfig
from ..errors import (
    ErrorInfo,
    ItemFailed,
    RequestError,
    Retryable,
    RunFatal,
    StorageError,
    classify,
)
from ..inputs import InputFile
from ..ledger import LedgerRecord, LedgerState, attempt_of, read_ledger
from ..manifest import BadLine, Item
from ..pricing import input_bound
from ..stores import Store
from ..stores.local import fsync_file, fsync_path
from ..writer import check_image, decode_b64_image
from .batchstate import BatchFile, BatchState, Entry, item_json, read_items
from .events import ProgressCallback, ProgressEvent
from .records import Charge, item_record, now
from .run import Engine

_T = TypeVar("_T")
#: Output lines decoded and stored at once while collecting: at most this many, and (but for
#: one) no more than this many bytes of them, so tiny answers share an fsync while memory
#: stays a few photo-sized ones, however large the file.
COLLECTORS = 32
COLLECT_BYTES = 16 << 20
#: Tries of one Files or Batches call before the round leaves it for the next.
CALL_TRIES = 3
JITTER = 0.2
#: A result line longer than this is not read (the most any answer may weigh online); in
#: practice the cap is the largest answer a file's requests may have, plus the envelope.
MAX_LINE_BYTES = DEFAULT_LIMIT_BYTES
LINE_ENVELOPE = 64 << 10  # custom_id, ids, status, usage around the answer's body
INPUT_PURPOSE = "vision"  # what edit inputs are uploaded as (referenced by file_id)
URLS = {"generations": "/v1/images/generations", "edits": "/v1/images/edits"}


@dataclass
class _Open:
    """An input file being written."""

    name: str
    endpoint: str
    model: str
    fh: IO[bytes]
    items_fh: IO[bytes]  # NAME.items.jsonl: each line's item as sent
    entries: list[Entry] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    bytes: int = 0


class BatchEngine(Engine):
    """An `Engine` whose requests go as batches (see the module docstring)."""

    def __init__(
        self,
        config: RunConfig,
        backend: OnlineBackend,
        store: Store,
        *,
        progress: ProgressCallback | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(config, backend, store, progress=progress, sleep=sleep)
        self.online_backend = backend
        self.api = BatchAPI(backend, backend.config)
        self.batch_prices = self.prices.batch()
        self.state = BatchState(config.out_dir)
        self._finished: set[str] = set()  # items whose line this run wrote
        self._again: dict[str, int] = {}  # items to send again (this run): their next attempt
        self._tries: dict[str, int] = {}  # lines sent per item, this run
        self._short: set[str] = set()  # items whose bound did not fit under the cap (yet)
        self._learned = False  # answers collected since the last submission
        self._seq = 0  # lines written by this run (custom ids)
        self._file_seq = 0  # input files opened by this run
        self._first_pass = True
        self._fresh: set[str] = set()  # files this process closed (no crash since)
        self._resent: set[str] = set()  # files whose `sent` lines this process wrote again
        self._told: set[tuple[str, str, int]] = set()  # (run, item, attempt) with an item line
        #: (run, item, attempt) of the batch `sent` lines the ledger counts, unsettled
        self._announced: set[tuple[Any, str, Any]] = set()
        self._inputs_seen: set[str] = set()  # edit input file ids checked at the API this run
        self._inputs_listed: dict[str, str] | None = None  # uploaded inputs by name, if listed
        self._rng = random.Random()

    # -- the rounds --

    def _check_batches(self, ledger: LedgerState) -> frozenset[str]:
        """The batch state, read, checked against the ledger's batch lines; and which of them
        the ledger already has an item line for (a collection cut short by a crash)."""
        state = self.state.load()
        state.check_sends(ledger.unsettled)
        self._announced = {
            (r.get("run_id"), r["id"], r.get("attempt"))
            for r in ledger.unsettled
            if r.get("via") == "batch"
        }
        if state.garbled:
            self.control.warn(
                f"{state.path}: {state.garbled} lines that are not batch events were skipped"
            )
        if state.live():
            self._told = _told(self.summary.ledger_path)
        return frozenset()

    async def _work_all(self) -> None:
        state = self.state
        try:
            self._forget_orphans()
            await self._rounds()
        finally:
            state.close()
        live = state.live()
        self.summary.pending = sum(len(f.entries) for f in live)
        self.summary.not_attempted += len(self._short)
        self.runner.budget_short = bool(self._short)
        if live:  # stopped waiting (Ctrl-C, --no-wait): they go on at the API
            self.control.note(
                f"{len(live)} batches ({self.summary.pending} requests) still running at "
                f"{self.api.where}: run the same command again to collect them "
                f"(`batchimg batch status {self.config.out_dir}` shows them)"
            )

    async def _rounds(self) -> None:
        control, options = self.control, self.config.options
        while True:
            await self._advance_all()
            if control.stopping:
                return
            await self._submit()
            if control.stopping or not self.state.live():
                return
            if options.no_wait:
                return
            delay = options.poll_interval_s * self._rng.uniform(1 - JITTER, 1 + JITTER)
            if await self._wait(delay):
                return

    async def _wait(self, delay_s: float) -> bool:
        """Wait for the next look; True if the run was stopped meanwhile (Ctrl-C: the batches
        keep running at the API)."""
        if self.sleep is not None:
            await self.sleep(delay_s)
            return self.control.stopping
        return await self.control.wait_or_stop(delay_s)

    def _forget_orphans(self) -> None:
        """Input files a killed run left half written, or never announced: never sent."""
        named = {self.state.input_path(name).name for name in self.state.files}
        named |= {self.state.items_path(name).name for name in self.state.files}
        for path in self.state.dir.glob("*.jsonl*"):
            if path.name.endswith(".part") or (
                path.name not in named
                and path.name != self.state.path.name
                and not path.name.endswith((".output.jsonl", ".errors.jsonl"))
            ):
                path.unlink(missing_ok=True)

    # -- 1. advance and collect --

    async def _advance_all(self) -> None:
        finished: list[BatchFile] = []
        for batch in self.state.live():
            if self.control.stopping:
                return
            try:
                await self._advance(batch)
            except RequestError as exc:
                self._api_trouble(exc, f"batch {batch.batch_id or batch.name}")
                continue
            if batch.finished:
                finished.append(batch)
        if finished:
            await self._collect(finished)

    async def _advance(self, f: BatchFile) -> None:
        """One step (or more) along: uploaded, created, looked at. A call that failed may
        still have been done at the API (its answer lost): the next try looks for it first."""
        try:
            await self._advance_once(f)
        except BaseException:
            self._fresh.discard(f.name)
            raise

    async def _advance_once(self, f: BatchFile) -> None:
        api, state = self.api, self.state
        fresh = f.name in self._fresh
        if f.file_id is None:
            if not fresh:
                await self._sent_lines_again(f)
            filename = state.input_path(f.name).name
            file_id = None if fresh else await self._call(api.find_file, filename, "batch")
            if file_id is None:
                try:  # tried once: an upload whose answer is lost is looked for, not redone
                    file_id = await api.upload(state.input_path(f.name), filename, "batch")
                except ItemFailed as exc:
                    await self._drop(f, exc.info)
                    return
            state.append({"event": "uploaded", "file": f.name, "file_id": file_id})
        assert f.file_id is not None
        if f.batch_id is None:
            found = None if fresh else await self._call(api.find_batch, f.file_id)
            if found is None:
                try:  # tried once, as the upload
                    found = await api.create(f.file_id, URLS[f.endpoint], f.name)
                except ItemFailed as exc:
                    await self._drop(f, exc.info)
                    return
            batch_id = found.get("id")
            if not isinstance(batch_id, str):
                raise RequestError(
                    ErrorInfo("the API answered a batch without an id", "bad_response")
                )
            state.append({"event": "created", "file": f.name, "batch_id": batch_id})
            self.control.note(f"batch {batch_id} created: {f.lines} requests ({f.model})")
            self._status(f, found)
        elif not f.finished:
            self._status(f, await self._call(api.get, f.batch_id))

    def _status(self, f: BatchFile, batch: dict[str, Any]) -> None:
        """Record a batch's status when it changed, and say so."""
        status = batch.get("status")
        counts = batch.get("request_counts")
        if status == f.status and counts == f.request_counts:
            return
        self.state.append(
            {
                "event": "status",
                "file": f.name,
                "status": status,
                "request_counts": counts if isinstance(counts, dict) else {},
                "output_file_id": batch.get("output_file_id"),
                "error_file_id": batch.get("error_file_id"),
                "errors": batch.get("errors"),
            }
        )
        self.control.note(f"batch {f.describe()}")

    async def _collect(self, files: list[BatchFile]) -> None:
        """Every line of finished batches into the ledger, each recorded as the item was
        sent (`NAME.items.jsonl`), their result files streamed."""
        self._learned = True
        for f in files:
            if self.control.stopping and self.summary.interrupted:
                return
            items = await self._items(f)
            try:
                await self._collect_one(f, items)
            except RequestError as exc:
                self._api_trouble(exc, f"collecting batch {f.batch_id}")

    def _stopped(self) -> bool:
        """Whether the run stops (asked again after steps that may stop it)."""
        return self.control.stopping

    async def _items(self, f: BatchFile) -> dict[str, Item]:
        """custom_id -> the item as sent in that file."""
        items = await anyio.to_thread.run_sync(read_items, self.state.items_path(f.name))
        if len(items) < len(f.entries):
            self.control.warn(
                f"{self.state.items_path(f.name)} lacks {len(f.entries) - len(items)} of its "
                "items: their answers cannot be recorded, and their cost stays counted at its "
                "bound"
            )
        return items

    async def _collect_one(self, f: BatchFile, items: dict[str, Item]) -> None:
        seen: set[str] = set()
        for kind, file_id in (("output", f.output_file_id), ("errors", f.error_file_id)):
            if file_id is None:
                continue
            path = self.state.result_path(f.name, kind)
            if not path.exists():
                try:
                    await self._call(self.api.download, file_id, path)
                except ItemFailed as exc:  # gone at the API (expired, deleted): it stays gone
                    self.control.warn(
                        f"batch {f.batch_id}'s {kind} file {file_id} cannot be had ({exc}): "
                        "its requests are recorded as answered but lost"
                    )
                    continue
            await self._collect_file(f, path, items, seen)
        if self.control.stopping:
            # Perhaps cut short (a disk, a signal): what was not read is not missing; the next
            # run reads the files again.
            return
        if f.status == "failed":
            self._say_validation_errors(f, items)
        for entry in f.entries.values():
            if entry.custom_id in seen:
                continue
            item = items.get(entry.custom_id)
            if item is None or self._told_already(f, entry):
                continue
            if f.status == "completed":  # the API says done, yet names no answer: maybe billed
                message = f"batch {f.batch_id} finished without a line for this request"
                info = ErrorInfo(message, "missing_from_batch", "invalid_response")
                charge = Charge(
                    entry.attempt,
                    f.at,
                    bound_usd=entry.bound_usd,
                    note="no answer in the batch's files: may have been billed",
                )
                self._line(f, entry, item, "error", error=info, charge=charge)
            else:
                why = f"batch {f.batch_id} {f.status} before this request ran"
                self._not_run(f, entry, item, ErrorInfo(why, f"batch_{f.status}"))
        if self._stopped():  # a line that could not be written: the next run reads them again
            return
        self.state.append({"event": "collected", "file": f.name})
        for path in (
            self.state.input_path(f.name),
            self.state.items_path(f.name),
            self.state.result_path(f.name, "output"),
            self.state.result_path(f.name, "errors"),
        ):
            path.unlink(missing_ok=True)

    async def _collect_file(
        self, f: BatchFile, path: Path, items: dict[str, Item], seen: set[str]
    ) -> None:
        send, receive = anyio.create_memory_object_stream[bytes](max_buffer_size=0)
        held = _Held(COLLECT_BYTES)
        # No line is longer than the largest answer one of the file's requests may have (as
        # online), plus the line's own envelope: a longer one is skipped unread.
        most = self.config.options.max_answer_bytes or max(
            (specs.max_answer_bytes(i.params, self.sink.catalog) for i in items.values()),
            default=0,
        )
        longest = most + LINE_ENVELOPE

        async def read() -> None:
            async with send:
                async for raw in _lines(path, longest):
                    if self.control.stopping:  # the rest waits in the file for the next run
                        return
                    await held.take(len(raw))  # many small lines at once, few large ones
                    await send.send(raw)

        async def work(lines: anyio.abc.ObjectReceiveStream[bytes]) -> None:
            async with lines:
                async for raw in lines:
                    size = len(raw)
                    line = _parse(raw)
                    del raw  # only the parsed line is held while its images are stored
                    try:
                        await self._collect_line(f, line, items, seen)
                    except StorageError as exc:  # its answer stays in the file (kept)
                        self.control.stop(
                            f"{exc}; free space, then re-run: the rest of batch "
                            f"{f.batch_id} is collected then, without paying again"
                        )
                    finally:
                        del line
                        held.give(size)

        async with anyio.create_task_group() as group:
            group.start_soon(read)
            async with receive:
                for _ in range(COLLECTORS):
                    group.start_soon(work, receive.clone())

    async def _collect_line(
        self, f: BatchFile, line: Any, items: dict[str, Item], seen: set[str]
    ) -> None:
        if line is _GARBLED:
            self.control.warn_once(
                ("garbled", f.name),
                f"batch {f.batch_id}: a result line that is not JSON was skipped",
            )
            return
        custom_id = line.get("custom_id") if isinstance(line, dict) else None
        entry = f.entries.get(custom_id) if isinstance(custom_id, str) else None
        if entry is None or custom_id in seen:
            what = "a second result line for one request" if entry else "a result line for no "
            self.control.warn_once(
                ("stranger", f.name, entry is None),
                f"batch {f.batch_id}: {what}{'' if entry else 'request of ours'} was skipped",
            )
            return
        seen.add(entry.custom_id)
        item = items.get(entry.custom_id)
        if item is None or self._told_already(f, entry):
            return  # no record of what was sent (warned), or collected before a crash
        response = line.get("response")
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            status = response["status_code"]
            body = self.online_backend.scrub(response.get("body"))
            request_id = self.online_backend.scrub(response.get("request_id"))
            request_id = request_id if isinstance(request_id, str) else None
            if status < 400:
                await self._answered(f, entry, item, body, request_id)
                return
            error = classify(status, body, request_id=request_id)
        else:
            got = line.get("error")
            got = self.online_backend.scrub(got) if isinstance(got, dict) else {}
            code = str(got.get("code") or "batch_error")
            error = Retryable(ErrorInfo(str(got.get("message") or "not run"), code))
        if isinstance(error, Retryable):
            self._not_run(f, entry, item, error.info)
        elif isinstance(error, RunFatal):
            self._not_run(f, entry, item, error.info, again=False)
            if not self.control.stopping:
                self.control.stop_code = error.info.code
                self.control.stop(f"{error} — fix the account or key, then re-run the same command")
        else:
            self._line(f, entry, item, "error", error=error.info)

    async def _answered(
        self, f: BatchFile, entry: Entry, item: Item, body: Any, request_id: str | None
    ) -> None:
        """A 2xx line: billed. Its images stored, then its line, with its cost (or bound)."""
        data = body.get("data") if isinstance(body, dict) else None
        usage = body.get("usage") if isinstance(body, dict) else None
        cost, why = self.batch_prices.answer_cost(
            item.params, usage, input_bound=input_bound(item.prompt, item.image_tokens)
        )
        charge = (
            Charge(entry.attempt, f.at, cost_usd=cost, usage=usage, request_id=request_id)
            if cost is not None
            else Charge(
                entry.attempt,
                f.at,
                bound_usd=entry.bound_usd,
                note=why,
                usage=usage,
                request_id=request_id,
            )
        )
        if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
            info = ErrorInfo(
                "answer without a 'data' list", "bad_response", "invalid_response", 200, request_id
            )
            self._line(f, entry, item, "error", error=info, charge=charge)
            return
        assert isinstance(body, dict)
        answer = self.online_backend.answer(data, body, request_id, 0.0)
        expected = specs.output_format(item.params, self.sink.catalog)
        try:
            images = _decode(data, expected)  # a few ms a photo: on the loop, no thread's arena
            for part in data:  # decoded: the base64 text need not wait for the disk
                part.pop("b64_json", None)
        except ItemFailed as exc:
            self._line(f, entry, item, "error", error=exc.info, charge=charge, answer=answer)
            return
        with anyio.CancelScope(shield=True):  # paid for: stored and written, whatever comes
            # A StorageError goes up and stops the run: the answer stays in the result file,
            # which is kept, and its `sent` line counted at its bound, so the next run
            # collects it (and the rest of the file) without paying again.
            stored = await self.runner.writer.save(item.file_stem, images, expected)
            if len(stored) < item.n:
                message = (
                    f"the answer has {len(stored)} of the {item.n} images asked for: "
                    "those are kept (and paid for); the item is done again next run"
                )
                info = ErrorInfo(message, "missing_images", "invalid_response")
                self._line(
                    f, entry, item, "error", error=info, charge=charge, answer=answer, files=stored
                )
            else:
                self._line(f, entry, item, "ok", charge=charge, answer=answer, files=stored)

    def _line(
        self,
        f: BatchFile,
        entry: Entry,
        item: Item,
        status: str,
        *,
        error: ErrorInfo | None = None,
        charge: Charge | None = None,
        answer: Any = None,
        files: Any = None,
    ) -> None:
        """The item's line, under the run that sent it (which settles its `sent` line)."""
        record: LedgerRecord = item_record(
            item,
            status=status,
            started_at=f.at,
            attempts=entry.attempt,
            price_table=self.batch_prices.name,
            catalog=self.sink.catalog,
            run_id=f.run_id,
            answer=answer,
            error=error,
            charge=charge,
            files=files,
        )
        record["latency_s"] = None  # a batch answers within its window, not per request
        record["via"] = "batch"
        record["batch_id"] = f.batch_id
        self._finished.add(item.id)
        self._again.pop(item.id, None)
        counted = charge.counted_usd if charge is not None else 0.0
        self._recount(entry, counted)
        self.sink.item_line(record)

    def _not_run(
        self, f: BatchFile, entry: Entry, item: Item, info: ErrorInfo, *, again: bool = True
    ) -> None:
        """A line the API did not run (not billed): settled, and sent again if it may be."""
        if again and self._tries.get(item.id, 0) >= self.config.options.max_attempts:
            self._line(f, entry, item, "error", error=info)
            return
        self.sink.settled_line(item, entry.attempt, run_id=f.run_id)
        self._recount(entry, 0.0)
        if again:
            self._again[item.id] = entry.attempt + 1
            self.control.emit(ProgressEvent("retry", item_id=item.id))

    def _recount(self, entry: Entry, actual_usd: float) -> None:
        """The budget counted the line at its bound since it was sent: now at what it cost."""
        budget = self.budget
        budget.spent_usd = max(0.0, budget.spent_usd - (entry.bound_usd or 0.0) + actual_usd)

    def _told_already(self, f: BatchFile, entry: Entry) -> bool:
        """Whether the entry's item has its line already: ok in the ledger, written by this
        run, or this very line's, written before a crash cut its collection short."""
        item_id = entry.item_id
        return (
            item_id in self._finished
            or item_id in self._done
            or (f.run_id, item_id, entry.attempt) in self._told
        )

    def _say_validation_errors(self, f: BatchFile, items: dict[str, Item]) -> None:
        errors = f.errors.get("data") if isinstance(f.errors, dict) else None
        shown = []
        by_line = list(f.entries.values())
        for error in errors if isinstance(errors, list) else []:
            if not isinstance(error, dict):
                continue
            where = error.get("line")
            what = f"{error.get('code')}: {error.get('message')}"
            if isinstance(where, int) and 0 < where <= len(by_line):
                entry = by_line[where - 1]
                item = items.get(entry.custom_id)
                manifest_line = f", manifest line {item.line}" if item else ""
                what = f"input line {where} (item {entry.item_id}{manifest_line}): {what}"
            shown.append(what)
        more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        self.control.warn(
            f"batch {f.batch_id} failed validation: "
            + ("; ".join(shown[:5]) or "no reason given")
            + more
            + f" (input file {self.state.input_path(f.name)})"
        )

    # -- 2. submit --

    async def _submit(self) -> None:
        """Pending items into new input files (the first round: the whole manifest; later
        ones: the lines to send again), each shipped as soon as it is full."""
        first, self._first_pass = self._first_pass, False
        learned, self._learned = self._learned, False
        if not first and not self._again and not (self._short and learned):
            return  # nothing to send again, and no answer since that could tighten a bound
        self.summary.next_bound = None
        if self._again and self.config.options.stragglers == "online":
            await self._online(set(self._again))
        held = self.state.held()
        control, summary = self.control, self.summary
        files: dict[tuple[str, str], _Open] = {}
        try:
            for count, entry in enumerate(self._entries(warn=first)):
                if count % 256 == 0:
                    await anyio.lowlevel.checkpoint()
                if isinstance(entry, BadLine):
                    if first and not control.stopping:
                        self.sink.bad_line(entry)
                    continue
                item_id = entry.id
                if item_id in self._done or item_id in self._finished:
                    if first and item_id in self._done:
                        summary.skipped += 1
                    continue
                if item_id in held or (
                    not first and item_id not in self._again and item_id not in self._short
                ):
                    continue
                if control.stopping:
                    summary.not_attempted += 1
                    continue
                await self._add(entry, files)
        finally:
            for open_file in list(files.values()):
                if control.interrupt_now:  # Ctrl-C: what is not yet shipped is not sent
                    _abandon(open_file, self.state)
                    summary.not_attempted += len(open_file.entries)
                    for line in open_file.entries:  # counted at their bounds when written
                        self._recount(line, 0.0)
                else:
                    await self._ship(open_file)

    async def _online(self, ids: set[str]) -> None:
        """`--stragglers online`: what the batches could not run goes one request at a time."""
        self._again.clear()
        concurrency = self.config.options.concurrency
        send, receive = anyio.create_memory_object_stream[Item](max_buffer_size=concurrency)
        self.control.note(f"{len(ids)} requests the batches did not run go online")

        async def produce() -> None:
            async with send:
                for entry in self._entries(warn=False):
                    if isinstance(entry, Item) and entry.id in ids:
                        self._finished.add(entry.id)
                        await send.send(entry)

        async with anyio.create_task_group() as work:
            work.start_soon(produce)
            async with receive:
                for _ in range(concurrency):
                    work.start_soon(self._work, receive.clone())

    async def _add(self, item: Item, files: dict[tuple[str, str], _Open]) -> None:
        """One item's line into its endpoint and model's input file (a new one when full)."""
        refused = self.online_backend.check(item) or self._batchable(item)
        if refused is not None:
            self._finished.add(item.id)
            self.sink.item_line(self._refusal(item, refused))
            return
        bound = self.batch_prices.worst_case(item.params, item.image_tokens, self.book)
        bound_usd = bound.cost_usd if bound is not None else None
        budget = self.budget
        if budget.cap_usd is not None:
            if bound is None:
                self._finished.add(item.id)
                why = (
                    f"no price (or token bound) for model {item.model!r}: --max-cost cannot "
                    "bound it (add it with --catalog or --prices)"
                )
                info = ErrorInfo(why, "unpriced_model", "local_error")
                self.sink.item_line(self._refusal(item, info))
                return
            if budget.spent_usd + bound.cost_usd > budget.cap_usd + 1e-12:
                # Left for now: answers collected may tighten its bound (the next round
                # tries again), else for a run with a higher cap.
                summary = self.summary
                if summary.next_bound is None or bound.cost_usd < summary.next_bound.cost_usd:
                    summary.next_bound = bound
                self._short.add(item.id)
                return
            self._short.discard(item.id)
        try:
            body = await self._body(item)
        except RequestError as exc:
            self._finished.add(item.id)
            self.sink.item_line(self._refusal(item, exc.info))
            if isinstance(exc, RunFatal):
                self.control.stop(f"{exc} — fix the account or key, then re-run")
            return
        attempt = self._again.pop(item.id, 1)
        self._seq += 1
        custom_id = f"{self.sink.run_id}-{self._seq}"
        line = (
            orjson.dumps(
                {"custom_id": custom_id, "method": "POST", "url": URLS[item.endpoint], "body": body}
            )
            + b"\n"
        )
        options = self.config.options
        if len(line) > options.batch_max_bytes:
            self._finished.add(item.id)
            info = ErrorInfo(
                f"its request line is {len(line):,} bytes, over the "
                f"{options.batch_max_bytes:,} a batch file may hold",
                "line_too_large",
                "local_error",
            )
            self.sink.item_line(self._refusal(item, info))
            return
        key = (item.endpoint, item.model)
        current = files.get(key)
        if current is not None and (
            len(current.entries) >= options.batch_max_lines
            or current.bytes + len(line) > options.batch_max_bytes
        ):
            del files[key]
            await self._ship(current)
            current = None
        if current is None:
            current = files[key] = self._new_file(item)
        await anyio.to_thread.run_sync(current.fh.write, line)
        await anyio.to_thread.run_sync(current.items_fh.write, item_json(custom_id, item))
        current.bytes += len(line)
        current.entries.append(Entry(custom_id, item.id, attempt, bound_usd))
        current.items.append(item)
        self._tries[item.id] = self._tries.get(item.id, 0) + 1
        if bound_usd is not None:
            budget.charge(bound_usd)  # counted at its worst from now until collected

    def _new_file(self, item: Item) -> _Open:
        self._file_seq += 1
        name = f"{self.sink.run_id}-{self._file_seq:04d}"
        path, items = self.state.input_path(name), self.state.items_path(name)
        try:
            self.state.dir.mkdir(parents=True, exist_ok=True)
            fh = open(_part(path), "wb")  # noqa: SIM115 (closed in _ship)
            items_fh = open(_part(items), "wb")  # noqa: SIM115
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
        return _Open(name, item.endpoint, item.model, fh, items_fh)

    async def _ship(self, f: _Open) -> None:
        """Close an input file, announce it (state, then a `sent` line per request), and
        upload it and make it a batch."""
        path, items = self.state.input_path(f.name), self.state.items_path(f.name)
        for fh in (f.fh, f.items_fh):
            with fh:
                await anyio.to_thread.run_sync(fsync_file, fh)
        if not f.entries:
            _part(path).unlink(missing_ok=True)
            _part(items).unlink(missing_ok=True)
            return
        _part(path).replace(path)
        _part(items).replace(items)
        fsync_path(str(path.parent), os.O_DIRECTORY)
        at = now()
        self.state.append(
            {
                "event": "closed",
                "file": f.name,
                "run_id": self.sink.run_id,
                "endpoint": f.endpoint,
                "model": f.model,
                "lines": len(f.entries),
                "bytes": f.bytes,
                "at": at,
                "entries": [[e.custom_id, e.item_id, e.attempt, e.bound_usd] for e in f.entries],
            }
        )
        for entry, item in zip(f.entries, f.items, strict=True):
            self.sink.sent_line(item, entry.attempt, at, entry.bound_usd, via="batch")
        self.sink.sync_now()
        self._fresh.add(f.name)
        batch = self.state.files[f.name]
        try:
            await self._advance(batch)
        except RequestError as exc:
            self._api_trouble(exc, f"batch file {f.name}")

    async def _sent_lines_again(self, f: BatchFile) -> None:
        """A file a killed run closed but may not have announced in the ledger: its `sent`
        lines (again: one more changes nothing), once, before it is uploaded. The budget
        counts them from now (twice, if they were there: never less than was sent)."""
        if f.name in self._resent:
            return
        self._resent.add(f.name)
        items = await self._items(f)
        for entry in f.entries.values():
            item = items.get(entry.custom_id)
            if item is not None and (f.run_id, item.id, entry.attempt) not in self._announced:
                self.sink.sent_line(
                    item, entry.attempt, f.at, entry.bound_usd, run_id=f.run_id, via="batch"
                )
                self.budget.charge(entry.bound_usd or 0.0)  # the ledger did not count it
        self.sink.sync_now()

    async def _drop(self, f: BatchFile, info: ErrorInfo) -> None:
        """The API refused the file or the batch: nothing of it ran. Its lines fail with the
        API's words (sending the same file again would be refused again)."""
        self.state.append({"event": "dropped", "file": f.name, "why": info.message})
        items = await self._items(f)
        for entry in f.entries.values():
            item = items.get(entry.custom_id)
            if item is not None and not self._told_already(f, entry):
                self._line(f, entry, item, "error", error=info)
        self.control.warn(f"the API refused batch file {f.name}: {info.message}")

    async def _body(self, item: Item) -> dict[str, Any]:
        """The request's JSON body; edit inputs by `file_id`, each uploaded once."""
        body = dict(item.params)
        if item.endpoint != "edits":
            return body
        body["images"] = [{"file_id": await self._input_id(f)} for f in item.images]
        if item.mask is not None:
            body["mask"] = {"file_id": await self._input_id(item.mask)}
        return body

    async def _input_id(self, source: InputFile) -> str:
        """An edit input's file id: uploaded once per content, across lines and runs. One
        known from an earlier run is checked at the API once per run (uploads expire or get
        deleted); one a killed run uploaded without recording it is found by its name."""
        known = self.state.inputs.get(source.sha256)
        if known is not None:
            if known in self._inputs_seen:
                return known
            try:
                await self._call(self.api.file, known)
                self._inputs_seen.add(known)
                return known
            except ItemFailed:
                pass  # gone at the API: upload it again
        name = f"{source.sha256[:32]}{source.path.suffix}"
        if self._inputs_listed is None:
            self._inputs_listed = await self._call(self.api.list_files, INPUT_PURPOSE)
        file_id = self._inputs_listed.get(name) if known is None else None
        if file_id is None:
            try:
                file_id = await self._call(
                    self.api.upload, source.path, name, INPUT_PURPOSE, source.content_type
                )
            except OSError as exc:
                info = ErrorInfo(f"cannot read input file: {exc}", "input_error")
                raise ItemFailed(info) from None
        self.state.append({"event": "input", "sha256": source.sha256, "file_id": file_id})
        self._inputs_seen.add(file_id)
        return file_id

    def _batchable(self, item: Item) -> ErrorInfo | None:
        spec = self.sink.catalog.spec(item.model)
        if "batch" in spec.endpoints:
            return None
        return ErrorInfo(
            f"the catalog says {item.model} cannot be sent through the Batch API: run it "
            "without --batch-api",
            "not_batchable",
            "local_error",
        )

    def _refusal(self, item: Item, info: ErrorInfo) -> LedgerRecord:
        return item_record(
            item,
            status="error",
            started_at=now(),
            attempts=0,
            price_table=self.batch_prices.name,
            catalog=self.sink.catalog,
            run_id=self.sink.run_id,
            error=info,
        )

    # -- the API's calls --

    async def _call(self, call: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """A Files or Batches call, tried again a few times on a transient failure."""
        for attempt in range(1, CALL_TRIES + 1):
            try:
                return await call(*args)
            except Retryable as exc:
                if attempt == CALL_TRIES or self.control.stopping:
                    raise
                delay = exc.retry_after_s if exc.retry_after_s is not None else 2.0**attempt
                if await self._wait(min(delay, 60.0)):
                    raise
        raise AssertionError("unreachable")

    def _api_trouble(self, exc: RequestError, what: str) -> None:
        if isinstance(exc, RunFatal):
            if not self.control.stopping:
                self.control.stop_code = exc.info.code
                self.control.stop(f"{exc} — fix the account or key, then re-run the same command")
            return
        self.control.warn(f"{what}: {exc}; left for the next look (or run)")


class _Held:
    """Bytes of lines being collected, bounded (one line is always let through)."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.bytes = 0
        self._freed = anyio.Event()

    async def take(self, size: int) -> None:
        while self.bytes and self.bytes + size > self.most:
            await self._freed.wait()
        self.bytes += size

    def give(self, size: int) -> None:
        self.bytes -= size
        self._freed.set()
        self._freed = anyio.Event()


_GARBLED = object()


def _parse(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _GARBLED


def _decode(data: list[dict[str, Any]], expected: str) -> list[bytes]:
    images = []
    for entry in data:
        value = entry.get("b64_json")
        if not isinstance(value, str):
            raise ItemFailed(
                ErrorInfo(
                    "a batch answer's image is not b64_json", "bad_response", "invalid_response"
                )
            )
        image = decode_b64_image(value)
        check_image(image, expected)
        images.append(image)
    return images


def _abandon(f: _Open, state: BatchState) -> None:
    f.fh.close()
    f.items_fh.close()
    _part(state.input_path(f.name)).unlink(missing_ok=True)
    _part(state.items_path(f.name)).unlink(missing_ok=True)


def _part(path: Path) -> Path:
    return path.with_name(path.name + ".part")


def _told(ledger: Path) -> set[tuple[str, str, int]]:
    """(run, item, attempt) of every batch item line in the ledger."""
    told = set()
    for record in read_ledger(ledger):
        if record.get("via") == "batch" and "record" not in record:
            run, attempt = record.get("run_id"), attempt_of(record)
            if isinstance(run, str) and attempt is not None:
                told.add((run, record["id"], attempt))
    return told


async def _lines(path: Path, longest: int = MAX_LINE_BYTES) -> AsyncIterator[bytes]:
    """A file's lines, read off the event loop, one at a time (never the whole file)."""
    fh = await anyio.to_thread.run_sync(open, path, "rb")
    try:
        while True:
            lines = await anyio.to_thread.run_sync(_some_lines, fh, 1 << 20, longest)
            if not lines:
                return
            for line in lines:
                yield line
    finally:
        fh.close()


def _some_lines(
    fh: IO[bytes], most_bytes: int = 1 << 20, longest: int = MAX_LINE_BYTES
) -> list[bytes]:
    """The next lines, up to about `most_bytes` of them; a line over `longest` bytes (no
    answer is that big) is skipped unread and stands as one that is not JSON."""
    lines: list[bytes] = []
    size = 0
    while size < most_bytes:
        line = fh.readline(longest)
        if not line:
            break
        if len(line) >= longest and not line.endswith(b"\n"):
            while (rest := fh.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            line = b"\x00 too long"
        if line.strip():
            lines.append(line)
            size += len(line)
    return lines
