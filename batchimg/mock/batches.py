"""The Batch API's twin: files of image requests run by the mock's own pipeline, over time.

    POST /v1/batches               {input_file_id, endpoint, completion_window: "24h",
                                    metadata?, output_expires_after?}  -> the Batch, validating
    GET  /v1/batches               newest first; `limit` (1-100, default 20), `after`
    GET  /v1/batches/{id}          the Batch
    POST /v1/batches/{id}/cancel   the Batch, cancelling

A batch moves on by itself (one task per batch, on the server's loop), each phase taking the
time `MockConfig` gives it::

    validating ──► in_progress ──► finalizing ──► completed
        │   │            │ │
        │   ▼            │ └──► expired      the window passed (`batch_expire_after_s`, or
        │ failed         │                   `batch_expire_after_lines` lines have run): the
        │ (the file's    │                   lines not run are not run
        │  errors)       ▼
        └───────────► cancelling ──► cancelled

Create refuses at once (400, or 404 for an unknown file) what the request itself gets wrong:
missing or unknown parameters, an endpoint other than the two image ones, a window other than
`24h`, bad `metadata` or `output_expires_after`, an input file that is not this server's or
not of purpose `batch`. What is wrong inside the file is found while `validating` and makes the
batch `failed`, with `errors: {object: "list", data: [{code, message, param, line}]}` (lines
1-based, the first error of each bad line, at most `MAX_ERRORS`): `empty_file`,
`file_too_large` (over `batch_max_bytes`), `too_many_tasks` (over `batch_max_lines`),
`invalid_json_line`, `missing_required_parameter` / `invalid_type` for `custom_id`, `method`,
`url` and `body`, `duplicate_custom_id`, `invalid_value` for a method other than POST,
`url_mismatch`, and `model_mismatch` (OpenAI's batch guide: each input file holds requests to
a single model; a body without `model` counts as the server's default).

Lines run one by one, in an order drawn from an RNG seeded with the config's seed and the
batch's number, so the output and error files are in no particular order (but the same order
on every run of a test). Each line goes through the server's request pipeline (`LineRunner`)
as a JSON body, as the online endpoints would take it, with the batch's own faults
(`batch_error_rate`: answered 500) instead of the online ones. A 2xx answer goes to the output
file, any other to the error file, both as `{"id": "batch_req_...", "custom_id", "response":
{"status_code", "request_id", "body"}, "error": null}`; lines never run (expired, cancelled)
go to the error file as `{"response": null, "error": {"code": "batch_expired" |
"batch_cancelled", "message"}}`. `request_counts.failed` counts every line of the error file,
so a finished batch has `completed + failed == total`. The files are written to disk as lines
finish; an empty one is not created (its id stays null).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import orjson

from . import files
from .config import MockConfig
from .rules import RuleError

_log = logging.getLogger(__name__)

#: What `POST /v1/batches` takes as `endpoint` (openai-python 3.57's `BatchCreateParams`) and
#: the two of them the mock serves.
SPEC_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)
ENDPOINTS = ("/v1/images/generations", "/v1/images/edits")
COMPLETION_WINDOWS = ("24h",)
CREATE_PARAMS = frozenset(
    {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
)
#: The most `errors.data` entries a failed batch reports (the mock's choice; the API's cap,
#: if any, is not known).
MAX_ERRORS = 1000
LIST_DEFAULT, LIST_MOST = 20, 100
EXPIRES_AFTER_S = (3600, 2_592_000)  # output_expires_after.seconds: 1 hour to 30 days

Status = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
#: Why a line was never run, as its error file line says.
NOT_RUN = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
}


@dataclass(frozen=True)
class LineAnswer:
    """What the request pipeline answered one line."""

    status_code: int
    request_id: str
    body: dict[str, Any]


class LineRunner(Protocol):
    """Runs one line's body through the server's request pipeline, as a JSON request to
    `endpoint` would be; `server_error`: answer it 500 (the batch's fault draw)."""

    async def __call__(
        self,
        endpoint: str,
        body: dict[str, Any],
        *,
        custom_id: str,
        batch_id: str,
        server_error: bool,
    ) -> LineAnswer: ...


@dataclass(frozen=True)
class InputLine:
    """One valid line of an input file: where it is, and its id."""

    number: int  # 1-based, counting every line of the file
    custom_id: str
    start: int  # its bytes are data[start:end]
    end: int


@dataclass
class Batch:
    """One batch: the object the API answers with, and what the mock needs to run it."""

    id: str
    number: int  # the how-manieth batch of this server (seeds its RNG)
    endpoint: str
    input_file_id: str
    completion_window: str
    created: float  # time.time() at creation
    expires_at: int
    metadata: dict[str, str] | None = None
    output_expires_s: int = files.BATCH_FILE_EXPIRY_S
    status: Status = "validating"
    model: str | None = None
    errors: list[dict[str, Any]] | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    lines_run: int = 0  # lines sent through the pipeline (not those never run)
    input_tokens: int = 0
    output_tokens: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    cancel_requested: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    cancel_requested_s: float = 0.0  # time.time() of the cancel

    @property
    def created_at(self) -> int:
        return int(self.created)

    def as_object(self) -> dict[str, Any]:
        """The API's Batch object."""
        errors = None if self.errors is None else {"object": "list", "data": self.errors}
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "usage": {
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens,
            },
            "metadata": self.metadata,
        }


# -- reading an input file ---------------------------------------------------------------------


def _line_error(
    number: int | None, code: str, message: str, param: str | None = None
) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": number}


def _missing(number: int, param: str) -> dict[str, Any]:
    message = f"Missing required parameter: '{param}'."
    return _line_error(number, "missing_required_parameter", message, param)


def _check_line(
    number: int, raw: bytes, endpoint: str, seen: set[str]
) -> tuple[str, Any] | dict[str, Any]:
    """(custom_id, the body's model) of a good line, else its first error."""
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        line = None
    if not isinstance(line, dict):
        return _line_error(number, "invalid_json_line", "This line is not parseable as valid JSON.")
    for param, kind in (("custom_id", str), ("method", str), ("url", str), ("body", dict)):
        if param not in line:
            return _missing(number, param)
        if not isinstance(line[param], kind):
            expected = "an object" if kind is dict else "a string"
            message = f"Invalid type for '{param}': expected {expected}."
            return _line_error(number, "invalid_type", message, param)
    if line["method"] != "POST":
        message = f"Invalid value: '{line['method']}'. Supported values are: 'POST'."
        return _line_error(number, "invalid_value", message, "method")
    if line["url"] != endpoint:
        message = "The URL provided for this request does not match the batch endpoint."
        return _line_error(number, "url_mismatch", message, "url")
    custom_id: str = line["custom_id"]
    if custom_id in seen:
        message = (
            "The custom_id for this request is a duplicate of another request. "
            "The custom_id parameter must be unique for each request in a batch."
        )
        return _line_error(number, "duplicate_custom_id", message, "custom_id")
    seen.add(custom_id)
    return custom_id, line["body"].get("model")


def read_input(
    data: bytes, endpoint: str, *, max_lines: int, max_bytes: int, default_model: str
) -> tuple[list[InputLine], str | None, list[dict[str, Any]]]:
    """The lines of an input file, the one model they use, and what is wrong with it
    (blank lines are skipped; each line is decoded on its own, never the file at once)."""
    if len(data) > max_bytes:
        message = f"The input file is larger than the maximum of {max_bytes} bytes."
        return [], None, [_line_error(None, "file_too_large", message)]
    lines: list[InputLine] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    model: str | None = None
    start = number = count = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        number += 1
        raw = data[start:end]
        if raw.strip():
            count += 1
            checked = _check_line(number, raw, endpoint, seen)
            if isinstance(checked, tuple):
                custom_id, line_model = checked
                line_model = line_model if isinstance(line_model, str) else default_model
                if model is None:
                    model = line_model
                if line_model != model:
                    message = (
                        "The model of this request does not match the model of the other "
                        f"requests in the batch ('{model}'): a batch takes a single model."
                    )
                    checked = _line_error(number, "model_mismatch", message, "body.model")
                else:
                    lines.append(InputLine(number, custom_id, start, end))
            if isinstance(checked, dict) and len(errors) < MAX_ERRORS:
                errors.append(checked)
        start = end + 1
    if count == 0:
        errors.append(_line_error(None, "empty_file", "The input file is empty."))
    elif count > max_lines:
        message = f"The input file has {count} requests; a batch takes at most {max_lines}."
        errors.insert(0, _line_error(None, "too_many_tasks", message))
    return lines, model, errors


# -- the batches ---------------------------------------------------------------------------------


#: A server's result files go in `<temp>/batchimg-mock-<pid>-<random>`, removed when it stops.
#: While it runs it holds an flock on that directory, so no other mock removes it.
SPOOL_PREFIX = "batchimg-mock-"


def claim_spool_dir(temp: Path) -> tuple[Path, int]:
    """A new directory for a server's result files, and a descriptor of it holding its lock
    (-1 where there is no flock; close it once the directory is removed)."""
    directory = Path(tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-", dir=temp))
    if os.name != "posix":
        return directory, -1
    import fcntl  # POSIX only

    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh directory: nobody else has it
    return directory, fd


def sweep_spools(temp: Path) -> list[Path]:
    """Remove the result files of mocks that died without stopping (killed: a batch's output
    can be hundreds of MB). Only a directory of this user, not a symlink, named for a process
    that is gone and whose lock nobody holds (a live mock in another pid namespace still holds
    its own) is removed. Never raises; returns the directories removed."""
    if os.name != "posix":  # os.kill(pid, 0) and flock: POSIX only
        return []
    try:
        entries = list(temp.glob(f"{SPOOL_PREFIX}*-*"))
    except OSError:
        return []
    removed = []
    for entry in entries:
        pid = entry.name[len(SPOOL_PREFIX) :].partition("-")[0]
        if pid.isascii() and pid.isdigit() and _gone(int(pid)) and _remove_unlocked(entry):
            removed.append(entry)
    return removed


def _gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # alive and not ours to signal, or no such pid can be
        return False
    return False


def _remove_unlocked(directory: Path) -> bool:
    import fcntl  # POSIX only (the caller checked)

    try:  # O_NOFOLLOW: a symlink under that name is not followed, nor removed
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_uid != os.getuid():
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live mock holds it
            return False
        shutil.rmtree(directory, ignore_errors=True)
        return True
    finally:
        os.close(fd)


class _Spool:
    """One result file, written line by line to disk as lines finish."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        self._handle: IO[bytes] | None = None

    def write(self, line: dict[str, Any]) -> None:
        if self._handle is None:
            self._handle = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        data = orjson.dumps(line) + b"\n"
        self._handle.write(data)
        self.size += len(data)

    def close(self) -> bool:
        """Close it; False when nothing was written (no file exists)."""
        if self._handle is None:
            return False
        self._handle.close()
        self._handle = None
        return True

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _now() -> int:
    return int(time.time())


class Batches:
    """Every batch of one server, and the tasks that move them on."""

    def __init__(
        self,
        config: MockConfig,
        run_line: LineRunner,
        *,
        find_upload: Callable[[str], files.StoredFile | None],
        outputs: dict[str, files.OutputFile],
        default_model: str,
    ) -> None:
        self.config = config
        self.batches: dict[str, Batch] = {}
        self._run_line = run_line
        self._find_upload = find_upload
        self._outputs = outputs
        self._default_model = default_model
        self._tasks: set[asyncio.Task[None]] = set()
        self._dir: Path | None = None
        self._dir_fd = -1  # holds the directory's lock while this server runs
        self._claiming = asyncio.Lock()

    # -- the requests --

    def create(self, params: Mapping[str, Any]) -> Batch:
        """`POST /v1/batches`: a new batch, validating (RuleError for what create refuses)."""
        for name in ("input_file_id", "endpoint", "completion_window"):
            if params.get(name) is None:
                message = f"Missing required parameter: '{name}'."
                raise RuleError(name, message, "missing_required_parameter")
            if not isinstance(params[name], str):
                raise RuleError(
                    name, f"Invalid type for '{name}': expected a string.", "invalid_type"
                )
        for name in params:
            if name not in CREATE_PARAMS:
                raise RuleError(name, f"Unknown parameter: '{name}'.", "unknown_parameter")
        endpoint = params["endpoint"]
        if endpoint not in SPEC_ENDPOINTS:
            allowed = ", ".join(f"'{e}'" for e in SPEC_ENDPOINTS)
            message = f"Invalid value: '{endpoint}'. Supported values are: {allowed}."
            raise RuleError("endpoint", message)
        if endpoint not in ENDPOINTS:
            message = f"The mock serves batches for {' and '.join(ENDPOINTS)} only."
            raise RuleError("endpoint", message)
        window = params["completion_window"]
        if window not in COMPLETION_WINDOWS:
            message = f"Invalid value: '{window}'. Supported values are: '24h'."
            raise RuleError("completion_window", message)
        metadata = _metadata(params.get("metadata"))
        expires_s = _output_expiry(params.get("output_expires_after"))
        upload = self._find_upload(params["input_file_id"])
        if upload is None:
            raise files.no_such_file(params["input_file_id"], "input_file_id")
        if upload.purpose != "batch":
            message = (
                f"The input file must be uploaded with purpose 'batch', not '{upload.purpose}'."
            )
            raise RuleError("input_file_id", message)
        created = time.time()
        batch = Batch(
            id=f"batch_{secrets.token_hex(16)}",
            number=len(self.batches),
            endpoint=endpoint,
            input_file_id=upload.id,
            completion_window=window,
            created=created,
            expires_at=int(created + self.config.batch_expire_after_s),
            metadata=metadata,
            output_expires_s=expires_s,
        )
        self.batches[batch.id] = batch
        task = asyncio.get_running_loop().create_task(self._drive(batch, upload.data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return batch

    def get(self, batch_id: str) -> Batch:
        """`GET /v1/batches/{id}` (404 for an id this server never gave)."""
        batch = self.batches.get(batch_id)
        if batch is None:
            raise RuleError("batch_id", f"No batch found with id '{batch_id}'.", None, status=404)
        return batch

    def cancel(self, batch_id: str) -> Batch:
        """`POST /v1/batches/{id}/cancel`: cancelling (again: as it is); a batch that has
        finished running its lines cannot be cancelled (400)."""
        batch = self.get(batch_id)
        if batch.status in ("cancelling", "cancelled"):
            return batch
        if batch.status not in ("validating", "in_progress"):
            message = f"Cannot cancel a batch with status '{batch.status}'."
            raise RuleError(None, message, None)
        batch.status = "cancelling"
        batch.cancel_requested_s = time.time()
        batch.cancelling_at = int(batch.cancel_requested_s)
        batch.cancel_requested.set()
        return batch

    def listing(self, query: Mapping[str, str]) -> dict[str, Any]:
        """`GET /v1/batches`: newest first, a page at a time."""
        limit = files.parse_limit(query.get("limit"), LIST_DEFAULT, LIST_MOST)
        newest_first = [batch.as_object() for batch in reversed(self.batches.values())]
        return files.page(newest_first, query.get("after"), limit)

    async def close(self) -> None:
        """Stop every batch where it is and remove the files they wrote."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    # -- moving a batch on --

    async def _pause(self, batch: Batch, seconds: float) -> bool:
        """Wait `seconds` (at least one turn of the loop); True as soon as a cancel comes."""
        if batch.cancel_requested.is_set():
            return True
        if seconds <= 0:
            await asyncio.sleep(0)
            return batch.cancel_requested.is_set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(batch.cancel_requested.wait(), seconds)
        return batch.cancel_requested.is_set()

    def _window_closed(self, batch: Batch) -> bool:
        most = self.config.batch_expire_after_lines
        if most is not None and batch.lines_run >= most:
            return True
        return time.time() >= batch.created + self.config.batch_expire_after_s

    async def _spool_dir(self) -> Path:
        """The directory for result files, made on first use, after removing what killed mocks
        left (in a thread: that may be gigabytes). Made on the loop itself, so that a stop
        cannot come between making it and `close` knowing of it."""
        async with self._claiming:
            if self._dir is None:
                temp = Path(tempfile.gettempdir())
                await asyncio.to_thread(sweep_spools, temp)
                self._dir, self._dir_fd = claim_spool_dir(temp)
            return self._dir

    async def _drive(self, batch: Batch, data: bytes) -> None:
        try:
            await self._advance(batch, data)
        except Exception as exc:  # a bug of the mock's: say so where a test will look
            _log.exception("batch %s stopped by an error", batch.id)
            message = f"The mock failed while running this batch: {exc!r}"
            batch.status, batch.failed_at = "failed", _now()
            batch.errors = [_line_error(None, "server_error", message)]

    async def _advance(self, batch: Batch, data: bytes) -> None:
        config = self.config
        if await self._pause(batch, config.batch_validate_s):
            await self._cancelled(batch)
            return
        lines, model, errors = await asyncio.to_thread(
            read_input,
            data,
            batch.endpoint,
            max_lines=config.batch_max_lines,
            max_bytes=config.batch_max_bytes,
            default_model=self._default_model,
        )
        if errors:
            batch.status, batch.failed_at, batch.errors = "failed", _now(), errors
            return
        batch.model, batch.total = model, len(lines)
        batch.status, batch.in_progress_at = "in_progress", _now()
        rng = random.Random(f"{config.seed}:{batch.number}")
        order = [lines[i] for i in rng.sample(range(len(lines)), len(lines))]
        directory = await self._spool_dir()
        output = _Spool(directory / f"{batch.id}_output.jsonl")
        error = _Spool(directory / f"{batch.id}_error.jsonl")
        try:
            done = 0
            for line in order:
                if await self._pause(batch, config.batch_line_s) or self._window_closed(batch):
                    break
                server_error = rng.random() < config.batch_error_rate
                await self._run(batch, line, data, output, error, server_error=server_error)
                done += 1
            not_run = order[done:]
            if batch.cancel_requested.is_set():
                await self._finish_cancelling(batch)
                self._not_run(batch, not_run, error, "batch_cancelled")
                batch.status, batch.cancelled_at = "cancelled", _now()
            elif not_run:
                self._not_run(batch, not_run, error, "batch_expired")
                batch.status, batch.expired_at = "expired", _now()
            else:
                batch.status, batch.finalizing_at = "finalizing", _now()
                await asyncio.sleep(config.batch_finalize_s)
                batch.status, batch.completed_at = "completed", _now()
            # The files appear with the status that tells of them.
            batch.output_file_id = self._publish(batch, output, "output")
            batch.error_file_id = self._publish(batch, error, "error")
        finally:  # stopped half-way (the server stopping): nothing is left behind
            for spool, published in ((output, batch.output_file_id), (error, batch.error_file_id)):
                if published is None:
                    spool.discard()

    async def _finish_cancelling(self, batch: Batch) -> None:
        ends = batch.cancel_requested_s + self.config.batch_cancel_s
        await asyncio.sleep(max(0.0, ends - time.time()))

    async def _cancelled(self, batch: Batch) -> None:
        """Cancelled while validating: no line was read, none is counted."""
        await self._finish_cancelling(batch)
        batch.status, batch.cancelled_at = "cancelled", _now()

    async def _run(
        self,
        batch: Batch,
        line: InputLine,
        data: bytes,
        output: _Spool,
        error: _Spool,
        *,
        server_error: bool,
    ) -> None:
        body = orjson.loads(data[line.start : line.end])["body"]
        batch.lines_run += 1
        answer = await self._run_line(
            batch.endpoint,
            body,
            custom_id=line.custom_id,
            batch_id=batch.id,
            server_error=server_error,
        )
        response = {
            "status_code": answer.status_code,
            "request_id": answer.request_id,
            "body": answer.body,
        }
        record = {
            "id": f"batch_req_{secrets.token_hex(16)}",
            "custom_id": line.custom_id,
            "response": response,
            "error": None,
        }
        if 200 <= answer.status_code < 300:
            output.write(record)
            batch.completed += 1
            usage = answer.body.get("usage")
            if isinstance(usage, dict):
                batch.input_tokens += _count(usage.get("input_tokens"))
                batch.output_tokens += _count(usage.get("output_tokens"))
        else:
            error.write(record)
            batch.failed += 1

    @staticmethod
    def _not_run(batch: Batch, lines: list[InputLine], error: _Spool, code: str) -> None:
        for line in lines:
            error.write(
                {
                    "id": f"batch_req_{secrets.token_hex(16)}",
                    "custom_id": line.custom_id,
                    "response": None,
                    "error": {"code": code, "message": NOT_RUN[code]},
                }
            )
        batch.failed += len(lines)

    def _publish(self, batch: Batch, spool: _Spool, kind: str) -> str | None:
        """Close a result file and list it in the Files API (None when it is empty)."""
        if not spool.close():
            return None
        now = _now()
        stored = files.OutputFile(
            id=files.new_file_id(),
            filename=f"{batch.id}_{kind}.jsonl",
            path=spool.path,
            size=spool.size,
            created_at=now,
            expires_at=now + batch.output_expires_s,
        )
        self._outputs[stored.id] = stored
        return stored.id


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _metadata(value: Any) -> dict[str, str] | None:
    """`metadata`: at most 16 pairs, keys up to 64 characters, string values up to 512."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RuleError(
            "metadata", "Invalid type for 'metadata': expected an object.", "invalid_type"
        )
    if len(value) > 16:
        message = f"Invalid 'metadata': too many properties. Expected at most 16, got {len(value)}."
        raise RuleError("metadata", message)
    for key, item in value.items():
        if len(key) > 64:
            message = f"Invalid 'metadata': key '{key[:20]}...' is longer than 64 characters."
            raise RuleError("metadata", message)
        if not isinstance(item, str):
            message = f"Invalid type for 'metadata.{key}': expected a string."
            raise RuleError(f"metadata.{key}", message, "invalid_type")
        if len(item) > 512:
            message = f"Invalid 'metadata.{key}': string longer than 512 characters."
            raise RuleError(f"metadata.{key}", message)
    return dict(value)


def _output_expiry(value: Any) -> int:
    """`output_expires_after` {anchor: created_at, seconds: 3600..2592000} -> seconds."""
    if value is None:
        return files.BATCH_FILE_EXPIRY_S
    param = "output_expires_after"
    if not isinstance(value, dict):
        raise RuleError(param, f"Invalid type for '{param}': expected an object.", "invalid_type")
    if value.get("anchor") != "created_at":
        message = f"Invalid value: '{value.get('anchor')}'. Supported values are: 'created_at'."
        raise RuleError(f"{param}.anchor", message)
    seconds = value.get("seconds")
    low, high = EXPIRES_AFTER_S
    if not isinstance(seconds, int) or isinstance(seconds, bool) or not low <= seconds <= high:
        message = (
            f"Invalid '{param}.seconds': {seconds!r}. Expected an integer from {low} to {high}."
        )
        raise RuleError(f"{param}.seconds", message)
    return seconds
