"""Hostile or broken answers: no answer can exhaust memory, hang a stop or crash the run.

Each case runs the real CLI in a child process against `tests.hostile.HostileServer` and reads
the child's own peak RSS (os.wait4). The bar: under 400 MB against every bomb.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.helpers import MEASURED, ROOT, ledger, wait_for
from tests.hostile import HostileServer

MAX_RSS_MB = 400


def write_manifest(path: Path, count: int) -> Path:
    lines = [{"id": f"h{i}", "model": "gpt-image-1", "prompt": f"hostile {i}",
              "quality": "medium", "size": "1024x1024"} for i in range(count)]  # fmt: skip
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


def start(
    manifest: Path, out: Path, server: HostileServer, *extra: str, measured: bool = False
) -> subprocess.Popen[str]:
    """`batchimg run` in a child process; `measured`: through `MEASURED` (no signals then)."""
    args = [
        *(sys.executable, "-m", "batchimg", "run", str(manifest), "--out", str(out)),
        *("--base-url", server.base_url, "--concurrency", "4", "--max-attempts", "1", *extra),
    ]
    if measured:
        args = [sys.executable, "-c", MEASURED, *args]
    env = {**os.environ, "BATCHIMG_API_KEY": "sk-hostile"}
    stdout = subprocess.PIPE if measured else subprocess.DEVNULL
    return subprocess.Popen(args, env=env, stderr=subprocess.PIPE, stdout=stdout, text=True,
                            cwd=ROOT)  # fmt: skip


def finish(process: subprocess.Popen[str], timeout_s: float = 60.0) -> tuple[int, float, str]:
    """Exit status, peak RSS in MB and stderr of a child (the run's own peak if started
    `measured`; else os.wait4's, which counts the memory of the test process too)."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    rss_kib = float(usage.ru_maxrss)
    if process.stdout is not None:
        with process.stdout:
            rss_kib = float(process.stdout.read().split()[-1])
    assert process.stderr is not None
    with process.stderr:
        return process.returncode, rss_kib / 1024, process.stderr.read()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["endless_url", "gzip_url", "gzip_json", "endless_b64"])
def test_no_answer_can_exhaust_memory_and_its_cost_is_kept(tmp_path: Path, mode: str) -> None:
    with HostileServer(mode) as server:
        out = tmp_path / "out"
        manifest = write_manifest(tmp_path / "m.jsonl", 4)
        code, rss_mb, stderr = finish(start(manifest, out, server, measured=True))
    assert code == 1, stderr  # the items failed; the run did not
    assert rss_mb < MAX_RSS_MB, rss_mb
    records = ledger(out)
    assert len(records) == 4
    for record in records:
        assert record["status"] == "error" and record["error"]["code"] == "answer_too_large"
        assert "--max-answer-mb" in record["error"]["message"]
        if mode.endswith("_url"):  # the answer arrived whole: its usage prices it
            assert record["cost_usd"] == pytest.approx((10 * 5 + 1056 * 40) / 1e6)
        else:  # cut off by the limit: billed, at a cost nobody can read
            assert record["cost_usd"] is None and record["cost_bound_usd"] > 0
    assert not list((out / "images").glob("*"))  # nothing half-written is left
    print(f"{mode}: peak RSS {rss_mb:.0f} MB")


@pytest.mark.timeout(60)
def test_a_second_ctrl_c_ends_the_run_mid_download(tmp_path: Path) -> None:
    with HostileServer("trickle_url") as server:
        out = tmp_path / "out"
        process = start(write_manifest(tmp_path / "m.jsonl", 2), out, server)
        assert server.downloads_started.wait(30)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        code, _, stderr = finish(process, timeout_s=10)
        took = time.monotonic() - sent
    assert code == 130, stderr
    assert took < 5, took
    for record in ledger(out):  # a paid answer whose download was cut keeps its cost
        assert record["error"]["code"] == "download_interrupted"
        assert record["cost_usd"] == pytest.approx((10 * 5 + 1056 * 40) / 1e6)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("extra", "signal_to_send", "expected"),
    [
        (["--grace-period", "1"], signal.SIGTERM, 130),  # the grace period ends the download
        (["--stall-timeout", "2"], None, 3),  # a download that never finishes is a stall
    ],
    ids=["sigterm-grace", "stall"],
)
def test_downloads_obey_the_stop_rules_of_requests(
    tmp_path: Path, extra: list[str], signal_to_send: signal.Signals | None, expected: int
) -> None:
    with HostileServer("trickle_url") as server:
        process = start(write_manifest(tmp_path / "m.jsonl", 2), tmp_path / "out", server, *extra)
        assert server.downloads_started.wait(30)
        if signal_to_send is not None:
            process.send_signal(signal_to_send)
        started = time.monotonic()
        code, _, stderr = finish(process, timeout_s=20)
    assert code == expected, stderr
    assert time.monotonic() - started < 8
    wait_for(lambda: (tmp_path / "out" / "ledger.jsonl").exists(), 1)


async def test_fewer_images_than_asked_keep_what_arrived_and_leave_the_item_to_redo(
    tmp_path: Path,
) -> None:
    import batchimg
    from batchimg.mock import MockConfig, MockServer
    from tests.conftest import TEST_KEY

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "pair", "model": "gpt-image-1", "prompt": "two cats", "n": 2}\n')
    out = tmp_path / "out"
    async with MockServer(MockConfig(api_key=TEST_KEY, image_count=1)) as server:
        short = await batchimg.arun(
            manifest, out, batchimg.RunOptions(base_url=server.base_url, api_key=TEST_KEY)
        )
    (record,) = ledger(out)
    assert short.exit_code == 1 and record["status"] == "error"
    assert record["error"]["code"] == "missing_images" and len(record["files"]) == 1
    assert record["cost_usd"] > 0  # paid for, and said so
    kept = (out / record["files"][0]).read_bytes()
    async with MockServer(MockConfig(api_key=TEST_KEY)) as server:
        again = await batchimg.arun(
            manifest, out, batchimg.RunOptions(base_url=server.base_url, api_key=TEST_KEY)
        )
    assert again.exit_code == 0 and again.images == 2
    (orphan,) = (out / ".orphans").iterdir()  # the first answer's image is set aside, not lost
    assert orphan.read_bytes() == kept
    async with MockServer(MockConfig(api_key=TEST_KEY, image_count=3)) as server:
        many = await batchimg.arun(
            manifest,
            tmp_path / "out3",
            batchimg.RunOptions(base_url=server.base_url, api_key=TEST_KEY),
        )
    (record,) = ledger(tmp_path / "out3")
    assert many.exit_code == 0 and len(record["files"]) == 3
    assert any("brought 3 images for n=2" in w for w in many.warnings)
