"""The mock's Files and Batch APIs, refereed by the official `openai` client (sync, against a
mock on its own thread).

Shapes come from openai-python 3.57's `Batch`, `BatchError`, `BatchRequestCounts`,
`FileObject`, `FileDeleted` and its `batches` / `files` resources, and from the OpenAPI spec's
`BatchRequestOutput` (openai/openai-openapi: `error` is for requests that failed with a
non-HTTP error; a request answered 4xx/5xx keeps its `response`). Behaviour the spec does not
state, and where it came from:

- failed requests (non-2xx) go to the error file and `output_file_id` is null when no line
  succeeded: a real completed batch shown in kaapi-backend issue #723 (`output_file_id=None`,
  an `error_file_id`, `request_counts` failed 9 of 9, errors read from `response.body.error`);
- validation errors: codes `invalid_json_line` ("This line is not parseable as valid JSON.",
  with `line`), `duplicate_custom_id`, `url_mismatch`, `model_mismatch`, `empty_file`,
  `too_many_tasks`, as quoted in stdapi.ai issue #240; one model per input file: OpenAI's
  batch guide;
- never-run lines of an expired batch: `response: null`, `error.code` `batch_expired` (the
  spec's later `BatchRequestOutput.error.code` values `batch_expired`, `batch_cancelled`);
- a `batch` upload must be named `.jsonl`: the API's 400 as relayed in litellm PR #37527.

The mock's own choices (not confirmed against the real API) are marked where a test relies on
them: per-line error codes for missing fields, the 400 for cancelling a finished batch, the
create-time 404/400 for an unknown or non-batch input file, `failed` counting never-run lines.
"""

from __future__ import annotations

import base64
import concurrent.futures
import fcntl
import hashlib
import io
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from openai.types import Batch
from PIL import Image

from batchimg.mock import MockConfig, MockServer
from tests.helpers import served_mock, stop_served, threaded_mock

KEY = "sk-mock-batches"
GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"
FINISHED = ("completed", "failed", "expired", "cancelled")
#: A mock whose batches move on at once: only the lines take time.
QUICK = {"batch_validate_s": 0.0, "batch_finalize_s": 0.0, "batch_cancel_s": 0.0}

Start = Callable[..., tuple[MockServer, openai.OpenAI]]


@pytest.fixture
def start() -> Iterator[Start]:
    """Factory: a threaded mock with these MockConfig fields, and an official client for it."""
    with ExitStack() as stack:

        def start(**config: Any) -> tuple[MockServer, openai.OpenAI]:
            server = stack.enter_context(threaded_mock(MockConfig(api_key=KEY, **config)))
            client = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
            stack.enter_context(client)
            return server, client

        yield start


def line(custom_id: str, prompt: str = "a red kite", url: str = GENERATIONS, **body: Any) -> Any:
    body = {"model": "gpt-image-1", "prompt": prompt, "quality": "low", "size": "1024x1024", **body}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((x if isinstance(x, bytes) else orjson.dumps(x)) + b"\n" for x in lines)


def submit(client: openai.OpenAI, lines: list[Any], endpoint: str = GENERATIONS) -> Batch:
    uploaded = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(
        input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h"
    )


def wait(
    client: openai.OpenAI, batch_id: str, until: tuple[str, ...] = FINISHED, timeout_s: float = 10
) -> tuple[Batch, list[str]]:
    """Poll until the batch reaches one of `until`: the batch, and every status seen."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if not seen or seen[-1] != batch.status:
            seen.append(batch.status)
        if batch.status in until:
            return batch, seen
        assert time.monotonic() < deadline, f"still {batch.status} after {timeout_s} s: {seen}"
        time.sleep(0.01)


def results(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [orjson.loads(x) for x in client.files.content(file_id).content.splitlines()]


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (0, 0, 0, 0) if mode == "RGBA" else (30, 90, 150)).save(out, "PNG")
    return out.getvalue()


def is_subsequence(seen: list[str], path: list[str]) -> bool:
    remaining = iter(path)
    return all(status in remaining for status in seen)


# -- a batch that completes ---------------------------------------------------------------------


def test_generation_batch_completes_with_every_line_in_the_output(start: Start) -> None:
    server, client = start(seed=3)
    lines = [line(f"item-{i}", f"a kite number {i}") for i in range(3)]
    created = submit(client, lines)
    assert created.status == "validating"
    assert created.request_counts is not None and created.request_counts.total == 0

    batch, seen = wait(client, created.id)

    assert batch.status == "completed", batch
    assert is_subsequence(seen, ["validating", "in_progress", "finalizing", "completed"]), seen
    assert (batch.endpoint, batch.completion_window, batch.model) == (
        GENERATIONS,
        "24h",
        "gpt-image-1",
    )
    assert batch.request_counts is not None
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 3, "failed": 0}
    assert batch.error_file_id is None and batch.errors is None
    stamps = [batch.created_at, batch.in_progress_at, batch.finalizing_at, batch.completed_at]
    assert None not in stamps and stamps == sorted(stamps)
    assert batch.expires_at == batch.created_at + 24 * 3600
    assert batch.output_file_id is not None
    output_file = client.files.retrieve(batch.output_file_id)
    assert (output_file.purpose, output_file.filename) == (
        "batch_output",
        f"{batch.id}_output.jsonl",
    )

    output = results(client, batch.output_file_id)
    assert sorted(r["custom_id"] for r in output) == ["item-0", "item-1", "item-2"]
    # No particular order: with seed 3 the mock's shuffle shows (the same order every run).
    assert [r["custom_id"] for r in output] != ["item-0", "item-1", "item-2"]
    for result in output:
        assert result["id"].startswith("batch_req_") and result["error"] is None
        response = result["response"]
        assert response["status_code"] == 200
        body = response["body"]
        assert (decode(body["data"][0]["b64_json"]).format, body["size"]) == ("PNG", "1024x1024")
        assert body["usage"]["output_tokens"] == 272  # low 1024x1024, as online
    # Each line was a request of the mock's own pipeline, billed and recorded as a batch line.
    records = {r.custom_id: r for r in server.requests}
    assert {r.via for r in server.requests} == {"batch"}
    for result in output:
        record = records[result["custom_id"]]
        assert (record.batch_id, record.status) == (batch.id, 200)
        assert record.request_id == result["response"]["request_id"]
        assert record.usage == result["response"]["body"]["usage"]
    assert batch.usage is not None
    assert batch.usage.output_tokens == 3 * 272


def test_edit_batch_reads_uploaded_images_by_file_id(start: Start) -> None:
    server, client = start(**QUICK)
    first, mask = png((96, 64)), png((96, 64), "RGBA")
    image = client.files.create(file=("door.png", first, "image/png"), purpose="vision")
    mask_file = client.files.create(file=("mask.png", mask, "image/png"), purpose="user_data")
    data_url = f"data:image/png;base64,{base64.b64encode(png((32, 32))).decode()}"
    edit = {"url": EDITS, "model": "gpt-image-2", "output_format": "jpeg"}
    lines = [
        line("one", "paint the door", images=[{"file_id": image.id}], **edit),
        line(
            "two",
            "paint the door blue",
            images=[{"file_id": image.id}, {"image_url": data_url}],
            mask={"file_id": mask_file.id},
            **edit,
        ),
        line("gone", "no such file", images=[{"file_id": "file-nope"}], **edit),
    ]

    batch, _ = wait(client, submit(client, lines, EDITS).id)

    assert batch.status == "completed" and batch.model == "gpt-image-2"
    output = {r["custom_id"]: r for r in results(client, batch.output_file_id)}
    assert set(output) == {"one", "two"}
    for result in output.values():
        body = result["response"]["body"]
        assert decode(body["data"][0]["b64_json"]).format == "JPEG"
        assert body["usage"]["input_tokens_details"]["image_tokens"] > 0
    [gone] = results(client, batch.error_file_id)
    assert gone["custom_id"] == "gone" and gone["error"] is None
    assert gone["response"]["status_code"] == 404
    assert gone["response"]["body"]["error"]["param"] == "images[0].file_id"
    records = {r.custom_id: r for r in server.requests}
    digest = hashlib.sha256(first).hexdigest()
    assert [f[3] for f in records["one"].files] == [digest]
    assert records["two"].files[0][3] == digest
    assert records["two"].has_mask and records["two"].image_count == 2
    assert records["two"].params["images"][1]["image_url"].startswith("data:image/png;base64,<")
    assert set(server.uploaded_files) >= {image.id, mask_file.id}


# -- lines that fail ------------------------------------------------------------------------------


def test_error_rate_and_directives_put_lines_in_the_error_file(start: Start) -> None:
    server, client = start(batch_error_rate=0.5, seed=7, **QUICK)
    lines = [line(f"plain-{i}", f"a plain kite {i}") for i in range(10)]
    lines += [line("blocked", "a kite [[mock:moderation]]"), line("flaky", "kite [[mock:fail=1]]")]
    lines += [line("invalid", "a kite", size="999x999")]

    batch, _ = wait(client, submit(client, lines).id)

    assert batch.status == "completed"
    output = results(client, batch.output_file_id)
    errors = {r["custom_id"]: r for r in results(client, batch.error_file_id)}
    assert batch.request_counts is not None
    assert batch.request_counts.model_dump() == {
        "total": 13,
        "completed": len(output),
        "failed": len(errors),
    }
    assert len(output) + len(errors) == 13
    assert all(r["response"]["status_code"] == 200 for r in output)
    server_errors = [cid for cid, r in errors.items() if r["response"]["status_code"] == 500]
    assert "flaky" in server_errors
    assert 0 < len([cid for cid in server_errors if cid.startswith("plain-")]) < 10
    for cid in server_errors:
        assert errors[cid]["response"]["body"]["error"]["code"] == "server_error"
        assert errors[cid]["error"] is None
    blocked = errors["blocked"]["response"]
    assert blocked["status_code"] == 400
    assert blocked["body"]["error"]["code"] == "moderation_blocked"
    assert errors["invalid"]["response"]["status_code"] == 400
    assert errors["invalid"]["response"]["body"]["error"]["param"] == "size"
    # Only successful lines are billed.
    billed = [r for r in server.requests if r.usage is not None]
    assert sorted(r.custom_id or "" for r in billed) == sorted(r["custom_id"] for r in output)


def test_a_file_with_bad_lines_fails_validation_with_line_numbers(start: Start) -> None:
    server, client = start(**QUICK)
    good = line("good")
    missing_id = {k: v for k, v in line("x").items() if k != "custom_id"}
    lines = [
        good,  # 1
        missing_id,  # 2
        line("wrong-url", url=EDITS),  # 3
        line("good"),  # 4: a duplicate custom_id
        b'{"custom_id": "cut", "method": "POST",',  # 5
        {**line("get"), "method": "GET"},  # 6
        {**line("text"), "body": "a kite"},  # 7
        line("other-model", model="gpt-image-2"),  # 8
        b"   ",  # 9: blank lines are skipped
        line("fine"),  # 10
    ]

    batch, _ = wait(client, submit(client, lines).id)

    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.in_progress_at is None
    assert batch.output_file_id is None and batch.error_file_id is None
    assert batch.request_counts is not None and batch.request_counts.total == 0
    assert batch.errors is not None and batch.errors.object == "list"
    found = [(e.line, e.code, e.param) for e in batch.errors.data or []]
    assert found == [
        (2, "missing_required_parameter", "custom_id"),  # the mock's code
        (3, "url_mismatch", "url"),
        (4, "duplicate_custom_id", "custom_id"),
        (5, "invalid_json_line", None),
        (6, "invalid_value", "method"),  # the mock's code
        (7, "invalid_type", "body"),  # the mock's code
        (8, "model_mismatch", "body.model"),
    ]
    errors = batch.errors.data or []
    assert errors[3].message == "This line is not parseable as valid JSON."
    assert server.requests == []  # nothing of a failed batch runs


@pytest.mark.parametrize(
    ("config", "content", "code"),
    [
        ({"batch_max_lines": 2}, jsonl([line("a"), line("b"), line("c")]), "too_many_tasks"),
        ({"batch_max_bytes": 100}, jsonl([line("a")]), "file_too_large"),
        ({}, b"\n  \n", "empty_file"),
    ],
)
def test_files_over_the_limits_fail_validation(
    start: Start, config: dict[str, Any], content: bytes, code: str
) -> None:
    _, client = start(**QUICK, **config)
    uploaded = client.files.create(file=("input.jsonl", content), purpose="batch")
    created = client.batches.create(
        input_file_id=uploaded.id, endpoint=GENERATIONS, completion_window="24h"
    )

    batch, _ = wait(client, created.id)

    assert batch.status == "failed"
    assert batch.errors is not None
    assert [(e.code, e.line) for e in batch.errors.data or []] == [(code, None)]


def test_create_refuses_what_the_request_gets_wrong(start: Start) -> None:
    _, client = start()
    batch_file = client.files.create(file=("in.jsonl", jsonl([line("a")])), purpose="batch")
    other = client.files.create(file=("in.jsonl", jsonl([line("a")])), purpose="user_data")
    good = {"input_file_id": batch_file.id, "endpoint": GENERATIONS, "completion_window": "24h"}

    refused: list[tuple[type[Exception], str | None]] = []
    for change in (
        {"completion_window": "48h"},
        {"endpoint": "/v1/chat/completions"},  # the spec's, but the mock serves images only
        {"endpoint": "/v1/nowhere"},
        {"input_file_id": "file-nope"},  # the mock's choice: 404 at create
        {"input_file_id": other.id},  # the mock's choice: 400 at create
        {"metadata": {f"k{i}": "v" for i in range(17)}},
        {"output_expires_after": {"anchor": "created_at", "seconds": 60}},
    ):
        with pytest.raises(openai.APIStatusError) as caught:
            client.batches.create(**{**good, **change})
        refused.append((type(caught.value), caught.value.body["param"]))
    assert refused == [
        (openai.BadRequestError, "completion_window"),
        (openai.BadRequestError, "endpoint"),
        (openai.BadRequestError, "endpoint"),
        (openai.NotFoundError, "input_file_id"),
        (openai.BadRequestError, "input_file_id"),
        (openai.BadRequestError, "metadata"),
        (openai.BadRequestError, "output_expires_after.seconds"),
    ]
    with pytest.raises(openai.BadRequestError) as missing:
        client.post("/batches", body={"endpoint": GENERATIONS}, cast_to=Batch)
    assert missing.value.code == "missing_required_parameter"
    with pytest.raises(openai.BadRequestError, match=r"Must be \.jsonl"):
        client.files.create(file=("in.txt", jsonl([line("a")])), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")

    kept = client.batches.create(
        **good,
        metadata={"run": "nightly"},
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    assert kept.metadata == {"run": "nightly"}
    done, _ = wait(client, kept.id)
    assert done.output_file_id is not None
    output_file = client.files.retrieve(done.output_file_id)
    assert output_file.expires_at == output_file.created_at + 7200


# -- expiry and cancelling ------------------------------------------------------------------------


def test_expired_batch_keeps_what_ran_and_expires_the_rest(start: Start) -> None:
    server, client = start(batch_expire_after_lines=2, **QUICK)
    lines = [line(f"item-{i}", f"kite {i}") for i in range(5)]

    batch, seen = wait(client, submit(client, lines).id)

    assert batch.status == "expired" and batch.expired_at is not None
    assert "finalizing" not in seen and batch.completed_at is None
    assert batch.request_counts is not None
    assert batch.request_counts.model_dump() == {"total": 5, "completed": 2, "failed": 3}
    output = results(client, batch.output_file_id)
    expired = results(client, batch.error_file_id)
    assert len(output) == 2 and len(expired) == 3
    assert {r["custom_id"] for r in output} | {r["custom_id"] for r in expired} == {
        f"item-{i}" for i in range(5)
    }
    for result in expired:
        assert result["response"] is None
        assert result["error"]["code"] == "batch_expired"
    # The rest was never run, so never billed.
    assert sorted(r.custom_id or "" for r in server.requests) == sorted(
        r["custom_id"] for r in output
    )


def test_the_window_closing_in_time_expires_a_slow_batch(start: Start) -> None:
    _, client = start(batch_expire_after_s=0.3, batch_line_s=0.05, **QUICK)

    batch, _ = wait(client, submit(client, [line(f"i{n}", f"k{n}") for n in range(40)]).id)

    assert batch.status == "expired"
    assert batch.request_counts is not None
    counts = batch.request_counts
    assert counts.total == 40 and counts.completed < 40
    assert counts.completed + counts.failed == 40
    assert len(results(client, batch.output_file_id)) == counts.completed


def test_cancel_while_in_progress_keeps_finished_lines(start: Start) -> None:
    server, client = start(batch_line_s=0.1, batch_validate_s=0.0, batch_cancel_s=0.2)
    created = submit(client, [line(f"item-{i}", f"kite {i}") for i in range(20)])
    wait(client, created.id, until=("in_progress",))

    cancelling = client.batches.cancel(created.id)

    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    batch, seen = wait(client, created.id)
    assert set(seen) <= {"cancelling", "cancelled"} and batch.status == "cancelled"
    assert batch.cancelled_at is not None
    assert batch.request_counts is not None
    counts = batch.request_counts
    assert counts.total == 20 and counts.completed + counts.failed == 20
    output = results(client, batch.output_file_id)
    cancelled = results(client, batch.error_file_id)
    assert len(output) == counts.completed == len(server.requests) < 20
    assert {r["error"]["code"] for r in cancelled} == {"batch_cancelled"}
    assert client.batches.cancel(created.id).status == "cancelled"  # again: as it is


def test_a_finished_batch_cannot_be_cancelled(start: Start) -> None:
    _, client = start(**QUICK)
    batch, _ = wait(client, submit(client, [line("a")]).id)
    assert batch.status == "completed"
    with pytest.raises(openai.BadRequestError):  # the mock's choice of status
        client.batches.cancel(batch.id)


# -- files and lists ------------------------------------------------------------------------------


def test_batches_list_newest_first_a_page_at_a_time(start: Start) -> None:
    _, client = start(**QUICK)
    ids = [submit(client, [line("a")]).id for _ in range(3)]

    first = client.batches.list(limit=2)

    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # pages on by `after`
    assert [b.id for b in client.batches.list(after=ids[1]).data] == [ids[0]]


def test_files_list_and_delete(start: Start) -> None:
    server, client = start(**QUICK)
    batch, _ = wait(client, submit(client, [line("a")]).id)
    assert batch.output_file_id is not None
    input_id, output_id = batch.input_file_id, batch.output_file_id

    listed = client.files.list()
    assert {f.id for f in listed} == {input_id, output_id}
    assert [f.id for f in client.files.list(purpose="batch_output")] == [output_id]

    path = server.batch_files[output_id].path
    deleted = client.files.delete(output_id)
    assert (deleted.id, deleted.deleted) == (output_id, True)
    assert not path.exists()
    with pytest.raises(openai.NotFoundError):
        client.files.content(output_id)
    client.files.delete(input_id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(input_id)
    assert [f.id for f in client.files.list()] == []
    # Uploads stay counted: a deleted one is still an upload that happened.
    assert set(server.uploaded_files) == {input_id}
    assert server.deleted_files == {input_id, output_id}


def test_a_large_output_file_is_streamed_from_disk(start: Start) -> None:
    server, client = start(**QUICK)
    lines = [
        line(f"item-{i}", f"kite {i}", output_format="jpeg", output_compression=10)
        for i in range(2000)
    ]
    started = time.monotonic()
    batch, _ = wait(client, submit(client, lines).id)
    assert batch.status == "completed" and batch.output_file_id is not None
    on_disk = server.batch_files[batch.output_file_id]
    assert on_disk.path.stat().st_size == on_disk.size > 5_000_000

    tracemalloc.start()
    try:
        with client.files.with_streaming_response.content(batch.output_file_id) as response:
            assert int(response.headers["content-length"]) == on_disk.size
            ids = [orjson.loads(x)["custom_id"] for x in response.iter_lines()]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert sorted(ids) == sorted(f"item-{i}" for i in range(2000))
    # Neither side held the file: the server sends it from disk, the client reads it in chunks.
    assert peak < on_disk.size / 4
    assert time.monotonic() - started < 10


# -- the mock's own files -----------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stopped_mock_leaves_no_batch_files_and_sweeps_those_of_killed_ones(
    tmp_path: Path, signum: int
) -> None:
    """A batch's output can be hundreds of MB in the temp directory: `kill`, a script's
    `terminate()` or a closed terminal must remove it as Ctrl-C does, and files left by a mock
    that was killed outright (its process gone) are removed by the next one."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f"batchimg-mock-{gone.pid}-left"
    alive = tmp_path / f"batchimg-mock-{os.getpid()}-running"
    # A live mock whose pid means nothing here (another pid namespace): it holds its lock.
    locked = tmp_path / f"batchimg-mock-{gone.pid}-locked"
    for directory in (stale, alive, locked):
        directory.mkdir()
        (directory / "batch_x_output.jsonl").write_bytes(b"{}\n" * 1000)
    # What a sweep must neither follow, remove nor trip over.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    (tmp_path / f"batchimg-mock-{gone.pid}-link").symlink_to(precious)
    (tmp_path / f"batchimg-mock-{gone.pid}-file").write_text("not a directory")
    (tmp_path / "batchimg-mock-\u00b2-odd").mkdir()  # isdigit(), but int() refuses it
    (tmp_path / f"batchimg-mock-{'9' * 30}-huge").mkdir()  # no such pid can be
    kept = sorted(p.name for p in tmp_path.iterdir() if p != stale)
    lock = os.open(locked, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    config = f"MockConfig(api_key={KEY!r}, **{QUICK!r})"
    try:
        # Started as from a terminal: under `nohup` the suite passes SIGHUP on to its children
        # ignored, and a mock that inherits an ignored SIGHUP keeps ignoring it (the next test).
        terminal = lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL)  # noqa: E731
        env = {**os.environ, "TMPDIR": str(tmp_path)}
        with served_mock(config, env=env, preexec_fn=terminal) as (proc, base_url):
            with openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0) as client:
                batch, _ = wait(client, submit(client, [line("a"), line("b")]).id)
                assert batch.status == "completed"
                assert len(results(client, batch.output_file_id)) == 2
            own = list(tmp_path.glob(f"batchimg-mock-{proc.pid}-*"))
            assert len(own) == 1 and any(own[0].iterdir())
            assert not stale.exists()  # its process is gone: swept
            assert (alive / "batch_x_output.jsonl").exists()  # a live process's: kept
            assert (locked / "batch_x_output.jsonl").exists()  # locked by a live mock: kept
            assert (precious / "keep.txt").read_text() == "mine"
            stop_served(proc, signum)
            assert not own[0].exists()
            assert sorted(p.name for p in tmp_path.iterdir()) == kept
    finally:
        os.close(lock)


def test_a_mock_started_under_nohup_outlives_its_terminal() -> None:
    """A hang-up while a request is being answered (1.5 s of latency): a mock that stopped on
    it would cut the request off (it stops within 0.5 s), whenever the signal lands."""
    nohup = lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)  # noqa: E731 (as nohup does)
    config = "MockConfig(require_auth=False, latency_s=1.5)"
    with served_mock(config, preexec_fn=nohup) as (proc, base_url):
        with (
            openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0) as client,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            answer = pool.submit(client.images.generate, model="gpt-image-1", prompt="p",
                                 quality="low", size="1024x1024")  # fmt: skip
            proc.send_signal(signal.SIGHUP)
            assert answer.result(timeout=20).data  # answered in full
        assert proc.poll() is None
        stop_served(proc, signal.SIGTERM)
