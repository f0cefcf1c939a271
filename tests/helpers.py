"""Shared checks for integration tests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import orjson
from PIL import Image

import batchimg
from batchimg.mock import MockConfig, MockServer

ROOT = Path(__file__).resolve().parent.parent
#: Environment variables batchimg reads keys from: cleared for CLI runs unless a test sets them.
KEY_VARS = ("BATCHIMG_API_KEY", "OPENAI_API_KEY", "MODELVERSE_API_KEY", "AZURE_OPENAI_API_KEY")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m batchimg ARGS` from the repository root, with no API key unless given."""
    base = {k: v for k, v in os.environ.items() if k not in KEY_VARS}
    return subprocess.run(
        [sys.executable, "-m", "batchimg", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=ROOT,
        timeout=120,
    )


#: Every field of the ledger contract (README, "What you get"; `ledger.LedgerRecord`).
LEDGER_FIELDS = {
    "id", "line", "status", "endpoint", "model", "prompt", "n", "size", "quality",
    "output_format", "files", "bytes", "sha256", "usage", "cost_usd", "price_table",
    "attempts", "rate_limited", "latency_s", "request_id", "started_at", "finished_at", "metadata",
    "complexity", "frame_count", "run_id",
}  # fmt: skip
#: Present only when the answer carried usage billed apart (svg_usage).
EXTRA_USAGE_FIELDS = {"extra_usage", "cost_note", "cost_bound_usd"}


def ledger_lines(out: Path) -> list[dict[str, Any]]:
    """Every line of the ledger: item lines, charge records, and sent/settled lines."""
    return [orjson.loads(line) for line in (out / "ledger.jsonl").read_bytes().splitlines()]


def ledger(out: Path) -> list[dict[str, Any]]:
    """The item lines (what each item became), without the lines about attempts."""
    return [record for record in ledger_lines(out) if "record" not in record]


def charges(out: Path) -> list[dict[str, Any]]:
    """The charge records: billed (or maybe billed) attempts no item line tells of."""
    return [record for record in ledger_lines(out) if record.get("record") == "charge"]


def unsettled(out: Path) -> list[dict[str, Any]]:
    """`sent` lines that no later line of the same run and item tells of (an attempt at or
    after theirs): requests in flight when their run died."""
    lines = ledger_lines(out)
    found = []
    for index, sent in enumerate(lines):
        if sent.get("record") != "sent":
            continue
        same = [
            r
            for r in lines[index + 1 :]
            if (r.get("run_id"), r["id"]) == (sent["run_id"], sent["id"])
        ]
        told = [r for r in same if r.get("attempt", r.get("attempts", 0)) >= sent["attempt"]]
        if not told:  # a later send of the item means this attempt had ended
            found.append(sent)
    return found


def spent(out: Path) -> float:
    """What the ledger says the directory spent: every item and charge line's cost, else its
    bound, plus the bounds of requests a dead run left in flight."""
    counted = [r for r in ledger_lines(out) if r.get("record") in (None, "charge")]
    counted += unsettled(out)
    return sum(r["cost_usd"] if r["cost_usd"] is not None else r.get("cost_bound_usd") or 0.0
               for r in counted)  # fmt: skip


def last_states(out: Path) -> dict[str, dict[str, Any]]:
    return {record["id"]: record for record in ledger(out)}


def check_ok_record(out: Path, record: dict[str, Any]) -> None:
    """An ok record names real, decodable files of the size and format it claims."""
    expected = LEDGER_FIELDS | ({"inputs", "mask"} if record["endpoint"] == "edits" else set())
    expected |= EXTRA_USAGE_FIELDS & set(record)
    assert set(record) == expected, set(record) ^ expected
    assert record["status"] == "ok"
    assert len(record["files"]) == record["n"] == len(record["bytes"]) == len(record["sha256"])
    for rel, size, digest in zip(record["files"], record["bytes"], record["sha256"], strict=True):
        data = (out / rel).read_bytes()
        assert len(data) == size
        assert hashlib.sha256(data).hexdigest() == digest
        if record["output_format"] == "svg":
            root = ElementTree.fromstring(data)
            assert root.tag == "{http://www.w3.org/2000/svg}svg"
            continue
        expected_format = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF"}[
            record["output_format"]
        ]
        with Image.open(out / rel) as im:
            im.load()
            assert im.format == expected_format
            if record["size"] not in (None, "auto"):
                assert f"{im.width}x{im.height}" == record["size"]
            if expected_format == "GIF":
                assert im.n_frames == record["frame_count"]


#: `python -c MEASURED ARGS...` runs ARGS as a child (its stdout to /dev/null) and prints the
#: child's peak RSS in KiB when it ends, exiting with its status. A child's ru_maxrss counts the
#: memory of the process it was forked from (Linux keeps the high-water mark across exec), and a
#: test process grows over a whole suite: forked from this small launcher, the figure is the
#: child's own.
MEASURED = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss, flush=True)
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll until predicate() holds (a condition another process brings about)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def start_cli(manifest: Path, out: Path, server: MockServer, *extra: str) -> subprocess.Popen[str]:
    """`batchimg run` in a child process against `server`, concurrency 4 (a real process to
    kill or signal)."""
    args = [sys.executable, "-m", "batchimg", "run", str(manifest), "--out", str(out),
            "--base-url", server.base_url, "--concurrency", "4", *extra]  # fmt: skip
    env = {**os.environ, "BATCHIMG_API_KEY": server.config.api_key or ""}
    return subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT)


@contextlib.contextmanager
def threaded_mock(config: MockConfig) -> Iterator[MockServer]:
    """The mock on a thread of its own: for sync callers (the openai client, child processes)."""
    server = MockServer(config)
    server.start_in_thread()
    try:
        yield server
    finally:
        server.stop_in_thread()


@contextlib.contextmanager
def served_mock(
    config: str, *, env: dict[str, str] | None = None, preexec_fn: Callable[[], Any] | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`serve(<config>)` (a MockConfig expression) in a process of its own, as `batchimg mock`
    runs: the process and the base URL it printed; killed on the way out if still running."""
    code = f"from batchimg.mock import MockConfig, serve; serve({config}, '127.0.0.1', 0)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, preexec_fn=preexec_fn,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        yield proc, proc.stdout.readline().strip()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def stop_served(proc: subprocess.Popen[str], signum: int, timeout_s: float = 20) -> None:
    """Send `signum` to a `served_mock` process: it must exit 0 within `timeout_s`."""
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, stderr


async def run_on_mock(
    manifest: Path, out: Path, server: MockServer, *, sleep: Any = None, **options: Any
) -> batchimg.Summary:
    """`batchimg.arun` against a mock server with its key, quick retries, and `options`."""
    options.setdefault("backoff_base_s", 0.01)
    return await batchimg.arun(
        manifest,
        out,
        batchimg.RunOptions(
            base_url=server.base_url, api_key=server.config.api_key or "sk-any-key", **options
        ),
        sleep=sleep,
    )


ACCESS_KEY = "AKIATESTBATCHIMG0001"  # moto's S3 server (the `s3_endpoint` fixture) takes any
SECRET = "s3cr3t-batchimg-" + "x" * 24  # must appear nowhere: not in objects, lines or output


def aws_env(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
