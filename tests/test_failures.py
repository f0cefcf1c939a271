"""Failure handling and crash safety: every fault the mock can inject, against the real engine."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchimg
from batchimg.backends import ClientConfig, OnlineBackend, Secret
from batchimg.config import RunConfig
from batchimg.engine import Engine
from batchimg.mock import MockConfig, MockServer
from batchimg.options import RunOptions
from batchimg.stores import LocalStore
from tests.conftest import TEST_KEY
from tests.helpers import check_ok_record, last_states, ledger, start_cli, threaded_mock, wait_for
from tests.helpers import run_on_mock as run

ROOT = Path(__file__).resolve().parent.parent


def items(count: int, prefix: str = "item") -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}{i}", "prompt": f"{prefix} {i}", "quality": "low"} for i in range(count)
    ]


def assert_no_partial_files(out: Path) -> None:
    """Nothing half-written: no temp file left in the temp area, no hidden file in images/."""
    leftovers = []
    if (out / "images").is_dir():
        leftovers += [p.name for p in (out / "images").iterdir() if p.name.startswith(".")]
    if (out / ".tmp").is_dir():
        leftovers += [p.name for p in (out / ".tmp").iterdir()]
    assert leftovers == []


@pytest.mark.parametrize(
    ("style", "expected_s"),
    [("ms", (2.5, 2.5)), ("seconds", (3.0, 3.0)), ("date", (1.0, 3.0)), ("both", (2.5, 2.5))],
)
async def test_each_retry_after_form_sets_the_wait(
    style: str, expected_s: tuple[float, float], tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    waits: list[float] = []

    async def fake_sleep(delay_s: float) -> None:  # time is controlled: nothing really waits
        waits.append(delay_s)

    config = MockConfig(api_key=TEST_KEY, rate_limit_rate=1.0, retry_after_s=2.5,
                        retry_after_style=style)  # fmt: skip
    async with MockServer(config) as server:
        manifest = write_manifest(items(1))
        summary = await run(
            manifest,
            tmp_path / "out",
            server,
            max_attempts=3,
            sleep=fake_sleep,
            adaptive_rate=False,
        )  # per-item waits only: no global pause
    assert summary.failed == 1
    (record,) = ledger(tmp_path / "out")
    assert record["attempts"] == 3 and record["error"]["code"] == "rate_limit_exceeded"
    assert len(waits) == 2
    low, high = expected_s
    assert all(low <= w <= high for w in waits), waits


async def test_without_retry_after_the_backoff_is_capped_jitter(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    waits: list[float] = []

    async def fake_sleep(delay_s: float) -> None:
        waits.append(delay_s)

    config = MockConfig(api_key=TEST_KEY, error_rate=1.0)
    async with MockServer(config) as server:
        await run(write_manifest(items(1)), tmp_path / "out", server, max_attempts=6,
                  backoff_base_s=1.0, max_backoff_s=4.0, sleep=fake_sleep)  # fmt: skip
    assert len(waits) == 5
    assert all(0 <= w <= 4.0 for w in waits)
    assert len(set(waits)) > 1  # jittered, not a fixed step


@pytest.mark.parametrize(
    "fault",
    ["rate_limit_rate", "error_rate", "html_error_rate", "truncate_rate", "drop_rate"],
)
async def test_transient_faults_are_retried_until_every_item_is_ok(
    fault: str, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    config = MockConfig(api_key=TEST_KEY, seed=3, retry_after_s=0.01, **{fault: 0.4})
    async with MockServer(config) as server:
        summary = await run(write_manifest(items(20)), tmp_path / "out", server, max_attempts=15)
        faulted = sum(1 for r in server.requests if r.fault)
    assert summary.ok == 20 and summary.exit_code == 0
    assert faulted >= 4  # the fault really happened
    records = ledger(tmp_path / "out")
    assert sum(r["attempts"] for r in records) == 20 + faulted  # every attempt counted
    for record in records:
        check_ok_record(tmp_path / "out", record)
    assert_no_partial_files(tmp_path / "out")


async def test_a_request_over_its_timeout_is_retried(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    config = MockConfig(api_key=TEST_KEY, slow_rate=0.5, slow_s=1.0, seed=5)
    async with MockServer(config) as server:
        summary = await run(write_manifest(items(6)), tmp_path / "out", server,
                            timeout_s=0.4, max_attempts=10)  # fmt: skip
        slow = sum(1 for r in server.requests if r.fault == "slow")
    assert summary.ok == 6 and slow >= 1
    assert max(r["attempts"] for r in ledger(tmp_path / "out")) >= 2


async def test_quota_running_out_mid_run_stops_soon_and_a_rerun_finishes(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(items(60))
    out = tmp_path / "out"
    async with MockServer(MockConfig(api_key=TEST_KEY, quota_after=10)) as server:
        summary = await run(manifest, out, server, concurrency=4)
        statuses = [r.status for r in server.requests]
    assert summary.exit_code == 3
    assert "insufficient_quota" in (summary.stop_reason or "")
    assert summary.ok == 10
    first_refusal = statuses.index(429)
    assert len(statuses) - first_refusal <= 4  # only what was already in flight
    assert summary.ok + summary.failed + summary.not_attempted == 60
    done = {r["id"] for r in ledger(out) if r["status"] == "ok"}
    async with MockServer(MockConfig(api_key=TEST_KEY)) as topped_up:
        again = await run(manifest, out, topped_up, concurrency=4)
        resent = {r.prompt for r in topped_up.requests}
    assert again.exit_code == 0 and again.skipped == 10 and again.ok == 50
    assert not any(f"item {i}" in resent for i in range(60) if f"item{i}" in done)


async def test_quota_error_on_a_400_also_stops_the_run(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    lines = items(30)
    lines[0]["prompt"] = "[[mock:quota]] the first"
    summary = await run(write_manifest(lines), tmp_path / "out", mock_server, concurrency=1)
    assert summary.exit_code == 3 and len(mock_server.requests) == 1


async def test_key_revoked_mid_run_stops_at_once(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    async with MockServer(MockConfig(api_key=TEST_KEY, auth_fail_after=5)) as server:
        summary = await run(write_manifest(items(40)), tmp_path / "out", server, concurrency=2)
        count = len(server.requests)
    assert summary.exit_code == 3 and "invalid_api_key" in (summary.stop_reason or "")
    assert count <= 5 + 2
    assert summary.ok == 5 and summary.not_attempted >= 40 - count


async def test_moderation_is_never_retried(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    config = MockConfig(api_key=TEST_KEY, error_rate=0.3, seed=2)
    async with MockServer(config) as server:
        lines = items(4)
        lines[2]["prompt"] = "[[mock:moderation]] blocked"
        await run(write_manifest(lines), tmp_path / "out", server)
        blocked = [r for r in server.requests if "blocked" in (r.prompt or "")]
    assert [r.status for r in blocked][-1] == 400
    assert sum(1 for r in blocked if r.status == 400) == 1
    assert last_states(tmp_path / "out")["item2"]["error"]["code"] == "moderation_blocked"


class FullDisk:
    """A Store whose disk fills up after `room` files, as a real full disk would refuse: the
    local store's behaviour, until a put fails with ENOSPC (leaving a partial file behind, as
    a real one does, which the writer must clean up)."""

    def __init__(self, out_dir: Path, room: int) -> None:
        self.disk = LocalStore(out_dir)
        self.room = room
        self.location, self.temp_dir = self.disk.location, self.disk.temp_dir
        self.clean_temps, self.new_temp, self.sync = (
            self.disk.clean_temps, self.disk.new_temp, self.disk.sync
        )  # fmt: skip
        self.open, self.exists, self.list, self.delete = (
            self.disk.open, self.disk.exists, self.disk.list, self.disk.delete
        )  # fmt: skip

    def put(self, name: str, temp: Path) -> None:
        if self.room <= 0:
            with open(temp, "r+b") as fh:
                fh.truncate(fh.seek(0, os.SEEK_END) // 2)  # a partial write, as ENOSPC leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= 1
        self.disk.put(name, temp)


async def test_full_disk_stops_cleanly_and_a_rerun_finishes(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(items(30))
    out = tmp_path / "out"
    config = RunConfig(manifest=manifest, out_dir=out, options=RunOptions(concurrency=2))
    client_config = ClientConfig(base_url=mock_server.base_url, api_key=Secret(TEST_KEY))
    store = FullDisk(out, room=8)
    async with OnlineBackend(client_config, spool_dir=store.temp_dir) as backend:
        summary = await Engine(config, backend, store).run()
    assert summary.exit_code == 3
    assert "No space left on device" in (summary.stop_reason or "")
    assert_no_partial_files(out)
    records = ledger(out)  # every line whole
    assert sum(1 for r in records if r["status"] == "ok") == 8
    assert any(r.get("error", {}).get("code") == "storage_error" for r in records)
    assert len(mock_server.requests) <= 8 + 2 + 1
    again = await run(manifest, out, mock_server, concurrency=2)
    assert again.exit_code == 0 and again.skipped == 8 and again.ok == 22


def test_ledger_that_cannot_grow_stops_the_run_without_a_torn_line(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    """A real file-size limit (ulimit -f): the ledger write fails as on a full disk."""
    with threaded_mock(MockConfig(api_key="sk-lim")) as server:
        manifest = write_manifest(items(80))
        out = tmp_path / "out"
        args = f"{sys.executable} -m batchimg run {manifest} --out {out} --base-url " \
            f"{server.base_url} --concurrency 2"  # fmt: skip
        env = {**os.environ, "BATCHIMG_API_KEY": "sk-lim"}
        limited = subprocess.run(
            ["sh", "-c", f"trap '' XFSZ; ulimit -f 100; exec {args}"],
            env=env, capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip
        assert limited.returncode == 3, limited.stderr
        assert "ledger" in limited.stderr and "re-run" in limited.stderr
        raw = (out / "ledger.jsonl").read_bytes()
        assert raw.endswith(b"\n") and len(raw) <= 100 * 512
        first = ledger(out)
        assert 10 < len(first) < 80
        rerun = subprocess.run(args.split(), env=env, capture_output=True, text=True, cwd=ROOT,
                               timeout=120)  # fmt: skip
        assert rerun.returncode == 0, rerun.stderr
        counts = Counter(r.prompt for r in server.requests)
        assert all(counts[r["prompt"]] == 1 for r in first)  # ok items never requested again
        assert sum(1 for c in counts.values() if c > 1) <= 2  # at most what was in flight
        states = last_states(out)
        assert len(states) == 80 and all(r["status"] == "ok" for r in states.values())


async def test_a_stalled_run_stops_with_a_clear_message(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    config = MockConfig(api_key=TEST_KEY, slow_rate=1.0, slow_s=30.0)
    async with MockServer(config) as server:
        started = time.monotonic()
        summary = await run(write_manifest(items(5)), tmp_path / "out", server,
                            stall_timeout_s=0.5, concurrency=2)  # fmt: skip
        elapsed = time.monotonic() - started
    assert summary.exit_code == 3 and "stalled" in (summary.stop_reason or "")
    assert elapsed < 10  # it stopped instead of hanging for the slow answers
    assert summary.ok == 0 and summary.not_attempted == 5


def test_kill_9_then_rerun_completes_and_only_in_flight_items_repeat(
    tmp_path: Path, slow_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(items(40))
    out = tmp_path / "out"
    ledger_path = out / "ledger.jsonl"
    with start_cli(manifest, out, slow_server) as proc:
        wait_for(lambda: ledger_path.exists() and ledger_path.read_bytes().count(b"\n") >= 8)
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    before = {r["id"]: r for r in ledger(out)}  # a torn last line would be skipped here
    with start_cli(manifest, out, slow_server) as proc:
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    counts = Counter(r.prompt for r in slow_server.requests)
    assert all(counts[r["prompt"]] == 1 for r in before.values() if r["status"] == "ok")
    repeated = [p for p, c in counts.items() if c > 1]
    assert all(c <= 2 for c in counts.values())
    assert len(repeated) <= 4  # at most the concurrency in flight at the kill
    states = last_states(out)
    assert len(states) == 40 and all(r["status"] == "ok" for r in states.values())
    for record in states.values():
        check_ok_record(out, record)
    assert_no_partial_files(out)


def test_grace_period_bounds_the_drain(tmp_path: Path, write_manifest: Callable[..., Path]) -> None:
    with threaded_mock(MockConfig(api_key="sk-sig", latency_s=20.0)) as server:
        out = tmp_path / "out"
        with start_cli(write_manifest(items(10)), out, server, "--grace-period", "0.5") as proc:
            wait_for(lambda: server.in_flight == 4)
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130, stderr
        assert time.monotonic() - started < 10  # not the 20 s the requests would take
        assert ledger(out) == []  # nothing finished, nothing half-written
        assert "re-run" in stderr


def test_a_second_signal_aborts_at_once(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    with threaded_mock(MockConfig(api_key="sk-sig", latency_s=20.0)) as server:
        with start_cli(write_manifest(items(10)), tmp_path / "out", server) as proc:
            wait_for(lambda: server.in_flight == 4)
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            time.sleep(0.2)  # let the first signal register before the second
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130
        assert time.monotonic() - started < 10  # the default 30 s grace was cut short
        # Nothing finished: the four in flight were dropped, the rest never sent.
        assert "0 ok, 0 failed, 0 already done, 10 not attempted" in stderr


def test_noisy_provider_done_when_scenario(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    """12 % 429s, 8 % 5xx, 3 % truncated bodies, data-URI answers; 150 mixed items."""
    key = "sk-done-when-0123456789"
    config = MockConfig(api_key=key, rate_limit_rate=0.12, error_rate=0.08, truncate_rate=0.03,
                        datauri_rate=0.3, retry_after_s=0.01, retry_after_style="mixed",
                        seed=1234)  # fmt: skip
    with threaded_mock(config) as server:
        lines: list[dict[str, Any]] = []
        for i in range(150):
            line: dict[str, Any] = {"id": f"m{i}", "prompt": f"mixed item {i}"}
            line["quality"] = ("low", "medium", "high")[i % 3]
            line["output_format"] = ("png", "jpeg", "webp")[i % 3]
            line["size"] = ("1024x1024", "1536x1024", "1024x1536")[i % 3]
            if i % 10 == 0:
                line["n"] = 2
            if i % 25 == 7:
                line["prompt"] = f"[[mock:moderation]] mixed item {i}"
            lines.append(line)
        manifest = write_manifest(lines)
        out = tmp_path / "out"
        result = subprocess.run(
            [sys.executable, "-m", "batchimg", "run", str(manifest), "--out", str(out),
             "--base-url", server.base_url, "--concurrency", "16", "--max-attempts", "10"],
            env={**os.environ, "OPENAI_API_KEY": key}, capture_output=True, text=True,
            cwd=ROOT, timeout=180,
        )  # fmt: skip
        requests = list(server.requests)
    assert result.returncode == 1, result.stderr  # the moderated ones failed
    records = ledger(out)
    assert len(records) == 150 and len({r["id"] for r in records}) == 150  # no duplicates
    moderated = {f"m{i}" for i in range(150) if i % 25 == 7}
    for record in records:
        if record["id"] in moderated:
            assert record["status"] == "error" and record["attempts"] == 1
            assert record["error"]["code"] == "moderation_blocked"
        else:
            check_ok_record(out, record)
    files = [f for r in records for f in r["files"]]
    assert len(files) == len(set(files)) == len(list((out / "images").iterdir()))
    faults = Counter(r.fault for r in requests if r.fault)
    assert faults["rate_limit"] and faults["server_error"] and faults["truncate"]
    for path in out.rglob("*"):
        assert key.encode() not in path.read_bytes() if path.is_file() else True
    assert key not in result.stdout + result.stderr


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,  # the same fault sequences on every run: CI stays deterministic
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 10_000),
    rates=st.tuples(*(st.sampled_from([0.0, 0.1, 0.2]) for _ in range(5))),
    concurrency=st.integers(1, 6),
)
def test_random_fault_sequences_never_lose_or_double_write_an_item(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    rates: tuple[float, ...],
    concurrency: int,
) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    manifest = tmp / "m.jsonl"
    manifest.write_text("".join(f'{{"id": "p{i}", "prompt": "prop {i}", "n": {1 + i % 2}}}\n'
                                for i in range(12)))  # fmt: skip
    keys = ("rate_limit_rate", "error_rate", "html_error_rate", "truncate_rate", "drop_rate")
    config = MockConfig(api_key=TEST_KEY, seed=seed, retry_after_s=0.0,
                        **dict(zip(keys, rates, strict=True)))  # fmt: skip

    async def scenario() -> batchimg.Summary:
        async with MockServer(config) as server:
            return await run(manifest, tmp / "out", server, max_attempts=4,
                             concurrency=concurrency, backoff_base_s=0.0,
                             adaptive_rate=False)  # fmt: skip

    summary = anyio.run(scenario)
    records = ledger(tmp / "out")
    assert len(records) == 12 == len({r["id"] for r in records})  # none lost, none twice
    assert summary.ok + summary.failed == 12
    for record in records:
        if record["status"] == "ok":
            check_ok_record(tmp / "out", record)
        else:
            assert record["files"] == [] and record["attempts"] == 4
    on_disk = sorted(p.name for p in (tmp / "out" / "images").iterdir())
    assert on_disk == sorted(Path(f).name for r in records for f in r["files"])


def test_disk_full_while_an_answer_streams_in_stops_cleanly(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    """Photo-sized answers spool to temp files; a real size limit makes that write fail."""
    with threaded_mock(MockConfig(api_key="sk-big", detailed_images=True)) as server:
        out = tmp_path / "out"
        args = f"{sys.executable} -m batchimg run {write_manifest(items(6))} --out {out} " \
            f"--base-url {server.base_url} --concurrency 2"  # fmt: skip
        result = subprocess.run(
            ["sh", "-c", f"trap '' XFSZ; ulimit -f 2000; exec {args}"],
            env={**os.environ, "BATCHIMG_API_KEY": "sk-big"}, capture_output=True, text=True,
            cwd=ROOT, timeout=120,
        )  # fmt: skip
        assert result.returncode == 3, result.stderr
        assert "Traceback" not in result.stderr and "cannot write images" in result.stderr
        assert_no_partial_files(out)
        for record in ledger(out):
            assert record["status"] == "error"
            assert record["error"]["code"] == "storage_error"


def test_a_second_run_on_the_same_directory_is_refused(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    import fcntl

    out = tmp_path / "out"
    (out / ".tmp").mkdir(parents=True)
    in_progress = out / ".tmp" / "x-0.png.1a2b3c4d0"  # the running one's temp file
    in_progress.write_bytes(b"half an image")
    with open(out / ".batchimg.lock", "w") as held:  # as a run in progress holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = subprocess.run(
            [sys.executable, "-m", "batchimg", "run", str(write_manifest(items(2))), "--out",
             str(out), "--mock"], capture_output=True, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
    assert result.returncode == 2
    assert "another batchimg run is using" in result.stderr
    assert not (out / "ledger.jsonl").exists()
    assert in_progress.exists()  # not taken for a stale leftover
    summary = batchimg.run(
        write_manifest(items(2)), out, batchimg.RunOptions(mock=True)
    )  # released: runs
    assert summary.ok == 2
