"""`--out s3://bucket/prefix`: the real CLI against a real S3-compatible server on loopback.

The server is moto's standalone one (`python -m moto.server`), in a process of its own; the
CLI runs in child processes, with the AWS variables as a user sets them (`AWS_ENDPOINT_URL`
included), against the project's mock API on a thread. The tests read the bucket back through
s3fs, and check the ledger there against the mock's own bill.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

import batchimg
from batchimg.errors import ObjectRejected
from batchimg.mock import MockConfig, MockServer
from batchimg.stores import LocalStore, ObjectStore, open_store
from batchimg.stores.remote import RemoteLedger
from tests.conftest import TEST_KEY
from tests.helpers import (
    ACCESS_KEY,
    KEY_VARS,
    ROOT,
    SECRET,
    aws_env,
    check_ok_record,
    threaded_mock,
    wait_for,
)
from tests.test_batch_api import billed

s3fs = pytest.importorskip("s3fs")
EXAMPLE = ROOT / "jobs" / "example.jsonl"


def use_aws(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's environment, as a user's: the AWS variables point at the server."""
    for name, value in aws_env(endpoint).items():
        monkeypatch.setenv(name, value)


def bucket_store(url: str, state: Path) -> ObjectStore:
    store = open_store(url, state)
    assert isinstance(store, ObjectStore)
    return store


def pulled(url: str, state: Path) -> tuple[ObjectStore, RemoteLedger]:
    """A bucket's store and its ledger, pulled into `state` (as a run starts)."""
    store = bucket_store(url, state)
    ledger = RemoteLedger(store, state)
    ledger.pull()
    return store, ledger


def set_auth(endpoint: str, allowed: bool) -> None:
    """moto: refuse every request (403) from now on, or allow them again."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=b"inf" if allowed else b"0",
        headers={"Content-Type": "text/plain"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).read()


def cli_args(manifest: Path, out: str, state: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "batchimg", "run", str(manifest), "--out", out,
            "--state", str(state), *extra]  # fmt: skip


def child_env(endpoint: str, server: MockServer | None = None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in KEY_VARS and not k.startswith("AWS_")}
    env = {**base, **aws_env(endpoint)}
    if server is not None:
        env["BATCHIMG_API_KEY"] = TEST_KEY
    return env


def run(
    endpoint: str,
    manifest: Path,
    out: str,
    state: Path,
    *extra: str,
    server: MockServer | None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    args = cli_args(manifest, out, state, *extra)
    if server is not None:
        args += ["--base-url", server.base_url]
    return subprocess.run(
        args, env={**child_env(endpoint, server), **(env or {})}, capture_output=True,
        text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip


def cli(endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchimg", *args], env=child_env(endpoint), capture_output=True,
        text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip


def kill_when(args: list[str], env: dict[str, str], *ready: Callable[[], bool]) -> None:
    """Run the CLI in a child, and kill -9 it once each condition has held, in turn."""
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        for condition in ready:
            wait_for(condition)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def answered_at_least(server: MockServer, count: int) -> Callable[[], bool]:
    return lambda: sum(r.status == 200 for r in server.requests) >= count


def local_oks(state: Path, field: str = "id") -> set[Any]:
    """`field` of the ok item lines in a state directory's working copy (a torn last line
    left out)."""
    lines = (state / "ledger.jsonl").read_bytes().splitlines()
    records = [orjson.loads(x) for x in lines if x.endswith(b"}")]
    return {r[field] for r in records if "record" not in r and r["status"] == "ok"}


def bucket_ledger(fs: Any, prefix: str) -> list[dict[str, Any]]:
    """The ledger as the bucket holds it: its pieces, in key order."""
    keys = sorted(fs.find(f"{prefix}/ledger"))
    data = b"".join(fs.cat_file(k) for k in keys)
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


def last_states(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in records if "record" not in r}


def lines(count: int, prefix: str = "s") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i:04d}", "prompt": f"object store {prefix}{i}", "size": "1024x1024",
             "quality": "low", "model": "gpt-image-2"} for i in range(count)]  # fmt: skip


def write_lines(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def answered(server: MockServer) -> Counter[str]:
    return Counter(r.prompt or "" for r in server.requests if r.status == 200)


def spent_in(report: dict[str, Any]) -> float:
    return float(report["total_cost_usd"])


# -- the tests --


def test_example_to_bucket_then_another_state_dir_finds_it_done(
    s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path
) -> None:
    """The issue's "done when": the example job to s3://bucket/run1 (mock API), every image
    and the ledger in the bucket; from another state directory, everything is done; report
    and verify read the bucket."""
    url = f"s3://{bucket}/run1"
    with threaded_mock(MockConfig(api_key=TEST_KEY)) as server:
        first = run(s3_endpoint, EXAMPLE, url, tmp_path / "state-a", server=server)
        assert first.returncode == 0, first.stderr
        requests_first = len(server.requests)
        second = run(s3_endpoint, EXAMPLE, url, tmp_path / "state-b", server=server)
        assert second.returncode == 0, second.stderr
        assert "0 ok, 0 failed, 26 already done" in second.stderr
        assert len(server.requests) == requests_first  # nothing asked again
        bill = billed(server)
    records = bucket_ledger(fs, f"{bucket}/run1")
    states = last_states(records)
    assert len(states) == 26 and all(r["status"] == "ok" for r in states.values())
    for record in states.values():
        for name, size in zip(record["files"], record["bytes"], strict=True):
            assert fs.info(f"{bucket}/run1/{name}")["size"] == size
    # Every image in the bucket is one of the ledger's, and metadata.jsonl lists them all.
    images = {k.split("/run1/", 1)[1] for k in fs.find(f"{bucket}/run1/images")}
    assert images == {n for r in states.values() for n in r["files"]}
    rows = [orjson.loads(x) for x in fs.cat_file(f"{bucket}/run1/metadata.jsonl").splitlines()]
    svg_rows = fs.cat_file(f"{bucket}/run1/metadata-svg.jsonl").splitlines()
    assert len(rows) + len(svg_rows) == len(images)
    # The second run's state directory was made from the bucket alone.
    assert len((tmp_path / "state-b" / "ledger.jsonl").read_bytes().splitlines()) >= len(records)

    report = cli(s3_endpoint, "report", url, "--format", "json")
    assert report.returncode == 0, report.stderr
    assert spent_in(orjson.loads(report.stdout)) == pytest.approx(bill, abs=1e-9)
    verify = cli(s3_endpoint, "verify", url)
    assert verify.returncode == 0 and "26 ok items, 30 files checked, all intact" in verify.stdout


def test_resume_from_bucket_in_fresh_state_dir_asks_nothing_twice(
    s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path
) -> None:
    """Half the job done on one machine, then all of it from a fresh state directory (another
    machine): the ok items of the first are not requested again, the rest are."""
    manifest = write_lines(tmp_path / "m.jsonl", lines(24))
    half = write_lines(tmp_path / "half.jsonl", lines(24)[::2])
    url = f"s3://{bucket}/half"
    with threaded_mock(MockConfig(api_key=TEST_KEY)) as server:
        first = run(s3_endpoint, half, url, tmp_path / "a", server=server)
        assert first.returncode == 0, first.stderr
        done_first = {k for k, r in last_states(bucket_ledger(fs, f"{bucket}/half")).items()
                      if r["status"] == "ok"}  # fmt: skip
        assert len(done_first) == 12
        second = run(s3_endpoint, manifest, url, tmp_path / "b", server=server)
        assert second.returncode == 0, second.stderr
        counts = answered(server)
        assert set(counts.values()) == {1} and len(counts) == 24  # nobody paid twice
        bill = billed(server)
    states = last_states(bucket_ledger(fs, f"{bucket}/half"))
    assert len(states) == 24 and all(r["status"] == "ok" for r in states.values())
    report = orjson.loads(cli(s3_endpoint, "report", url, "--format", "json").stdout)
    assert spent_in(report) == pytest.approx(bill, abs=1e-9)


def test_kill_9_mid_run_then_rerun(s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path) -> None:
    """kill -9 with requests in flight; the same command again: every item ok once in the
    bucket's ledger, every image there, and no item that was ok asked for again."""
    manifest = write_lines(tmp_path / "m.jsonl", lines(40, "k"))
    url = f"s3://{bucket}/killed"
    state = tmp_path / "state"
    with threaded_mock(MockConfig(api_key=TEST_KEY, latency_s=0.2)) as server:
        args = cli_args(manifest, url, state, "--base-url", server.base_url, "--concurrency", "4",
                        "--upload-every", "0.2")  # fmt: skip

        def piece_up() -> bool:  # a piece of the ledger is in the bucket
            return len(fs.find(f"{bucket}/killed/ledger")) >= 2

        kill_when(args, child_env(s3_endpoint, server), answered_at_least(server, 10), piece_up)
        ok_before = {k for k, r in last_states(bucket_ledger(fs, f"{bucket}/killed")).items()
                     if r["status"] == "ok"}  # fmt: skip
        ok_local = local_oks(state)
        assert ok_before <= ok_local and ok_before
        # The dead run's lock is fresh: from another state directory a run is refused; from
        # its own (whose local lock is free: that run is gone) it is taken over at once.
        again = run(s3_endpoint, manifest, url, tmp_path / "elsewhere", server=server)
        assert again.returncode == 2 and "is using" in again.stderr
        asked_before = answered(server)
        rerun = run(s3_endpoint, manifest, url, state, server=server)
        assert rerun.returncode == 0, rerun.stderr
        assert "took over the lock of the last run from this state directory" in rerun.stderr
        asked_after = answered(server) - asked_before
    assert not set(asked_after) & {f"object store k{int(i[1:])}" for i in ok_local}
    states = last_states(bucket_ledger(fs, f"{bucket}/killed"))
    assert len(states) == 40 and all(r["status"] == "ok" for r in states.values())
    oks = [r for r in bucket_ledger(fs, f"{bucket}/killed") if "record" not in r]
    assert len(oks) == len({r["id"] for r in oks})  # each item's ok line once
    for record in states.values():
        for name in record["files"]:
            assert fs.exists(f"{bucket}/killed/{name}")
    assert not fs.exists(f"{bucket}/killed/.batchimg.lock")  # released at the end


def test_store_refusing_writes_stops_run_and_loses_nothing(
    s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path
) -> None:
    """The store starts answering 403 mid-run: exit 3, the images already paid for are kept
    in the state directory and uploaded by the next run, which buys none of them again; the
    bucket's ledger then matches the mock's bill."""
    manifest = write_lines(tmp_path / "m.jsonl", lines(30, "r"))
    url = f"s3://{bucket}/refused"
    state = tmp_path / "state"
    with threaded_mock(MockConfig(api_key=TEST_KEY, latency_s=0.1)) as server:
        args = cli_args(manifest, url, state, "--base-url", server.base_url, "--concurrency", "4")
        proc = subprocess.Popen(args, env=child_env(s3_endpoint, server), cwd=ROOT,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            wait_for(answered_at_least(server, 8))
            set_auth(s3_endpoint, allowed=False)
            _, err = proc.communicate(timeout=60)
        finally:
            set_auth(s3_endpoint, allowed=True)
            proc.kill()
        assert proc.returncode == 3, err
        assert "PermissionError" in err and "fix the store's access" in err
        assert re.search(r"\d+ parked", err)
        parked = state / "parked.jsonl"
        assert parked.exists()  # answers paid for, images refused: kept here
        first_answers = answered(server)
        rerun = run(s3_endpoint, manifest, url, state, server=server)
        assert rerun.returncode == 0, rerun.stderr
        assert "parked" in rerun.stderr
        counts = answered(server)
        assert set(counts.values()) == {1} and len(counts) == 30  # none bought twice
        assert first_answers  # and the first run did buy some
        bill = billed(server)
    assert not parked.exists()
    states = last_states(bucket_ledger(fs, f"{bucket}/refused"))
    assert len(states) == 30 and all(r["status"] == "ok" for r in states.values())
    for record in states.values():
        for name, digest in zip(record["files"], record["sha256"], strict=True):
            import hashlib

            assert hashlib.sha256(fs.cat_file(f"{bucket}/refused/{name}")).hexdigest() == digest
    report = orjson.loads(cli(s3_endpoint, "report", url, "--format", "json").stdout)
    assert spent_in(report) == pytest.approx(bill, abs=1e-9)


def test_webdataset_shards_in_bucket_load_with_datasets(
    s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path
) -> None:
    """--format webdataset to a bucket: shards whole under shards/, loaded by `datasets` from
    s3:// with the storage options a user gives it."""
    datasets = pytest.importorskip("datasets")
    manifest = write_lines(tmp_path / "m.jsonl", lines(12, "w"))
    url = f"s3://{bucket}/wds"
    with threaded_mock(MockConfig(api_key=TEST_KEY)) as server:
        done = run(s3_endpoint, manifest, url, tmp_path / "state", "--format", "webdataset",
                   "--shard-size", "5", server=server)  # fmt: skip
        assert done.returncode == 0, done.stderr
    shards = sorted(fs.find(f"{bucket}/wds/shards"))
    assert [k.rsplit("/", 1)[1] for k in shards] == [f"shard-00000{i}.tar" for i in range(3)]
    assert not fs.find(f"{bucket}/wds/images")  # packed: no loose copies left
    options = {"key": ACCESS_KEY, "secret": SECRET, "endpoint_url": s3_endpoint}
    loaded = datasets.load_dataset(
        "webdataset",
        data_files={"train": f"s3://{bucket}/wds/shards/*.tar"},
        storage_options=options,
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert len(loaded) == 12
    assert {row["json"]["id"] for row in loaded} == {f"w{i:04d}" for i in range(12)}
    verify = cli(s3_endpoint, "verify", url)
    assert verify.returncode == 0 and "all intact" in verify.stdout


def test_no_secret_in_bucket_state_or_output(
    s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path
) -> None:
    """Neither the API key nor the AWS secret is in any object, state file or output line."""
    url = f"s3://{bucket}/secret"
    state = tmp_path / "state"
    with threaded_mock(MockConfig(api_key=TEST_KEY)) as server:
        done = run(s3_endpoint, EXAMPLE, url, state, "--log-format", "json", server=server)
        assert done.returncode == 0, done.stderr
    report = cli(s3_endpoint, "report", url, "--html", str(tmp_path / "r.html"))
    assert report.returncode == 0, report.stderr
    texts = [done.stdout, done.stderr, report.stdout, report.stderr]
    texts += [fs.cat_file(k).decode("latin-1") for k in fs.find(f"{bucket}/secret")]
    texts += [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
    for text in texts:
        assert TEST_KEY not in text and SECRET not in text


def test_lock_refuses_a_second_run_and_takes_over_a_stale_one(
    s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path
) -> None:
    """A live lock refuses a run with exit 2, before anything is sent, and so does a lock whose
    own heartbeat looks old (a holder with a slow clock) or that is garbled, while the store
    says it was written within the TTL; past that, it is taken over, and the run says so."""
    url = f"s3://{bucket}/locked"
    lock = f"{bucket}/locked/.batchimg.lock"
    body = {"host": "elsewhere", "pid": 4242, "token": "t", "started_at": "2026-12-01T00:00:00",
            "heartbeat_at": time.time(), "ttl_s": 60}  # fmt: skip
    fs.pipe_file(lock, orjson.dumps(body))
    with threaded_mock(MockConfig(api_key=TEST_KEY)) as server:
        refused = run(s3_endpoint, EXAMPLE, url, tmp_path / "s", server=server)
        assert refused.returncode == 2
        assert "a run on elsewhere (pid 4242" in refused.stderr and "is using" in refused.stderr
        fs.pipe_file(lock, orjson.dumps({**body, "heartbeat_at": time.time() - 3600}))
        slow_clock = run(s3_endpoint, EXAMPLE, url, tmp_path / "s", server=server)
        assert slow_clock.returncode == 2 and "is using" in slow_clock.stderr
        fs.pipe_file(lock, b"garbage")
        written = time.time()
        garbled = run(s3_endpoint, EXAMPLE, url, tmp_path / "s", server=server)
        assert garbled.returncode == 2 and "is using" in garbled.stderr
        assert not server.requests  # nothing sent
        time.sleep(max(0.0, written + 2.2 - time.time()))  # over 1 s old by the store's clock
        short_ttl = {"BATCHIMG_LOCK_TTL_S": "1"}
        # The holder said its own TTL is 600 s: a taker with a shorter one waits for that.
        fs.pipe_file(lock, orjson.dumps({**body, "heartbeat_at": time.time() - 5, "ttl_s": 600}))
        honoured = run(s3_endpoint, EXAMPLE, url, tmp_path / "s", server=server, env=short_ttl)
        assert honoured.returncode == 2 and "600 s old" in honoured.stderr
        for bad in ("0.5", "nan", "abc"):
            refused_ttl = run(s3_endpoint, EXAMPLE, url, tmp_path / "s", server=server,
                              env={"BATCHIMG_LOCK_TTL_S": bad})  # fmt: skip
            assert refused_ttl.returncode == 2 and "BATCHIMG_LOCK_TTL_S" in refused_ttl.stderr
        fs.pipe_file(lock, b"garbage")
        time.sleep(2.2)  # over 1 s old by the store's clock
        taken = run(s3_endpoint, EXAMPLE, url, tmp_path / "s", server=server, env=short_ttl)
        assert taken.returncode == 0, taken.stderr
        assert "took over the lock of a run on ?" in taken.stderr
    assert not fs.exists(lock)


def test_usage_errors_exit_2_before_anything_is_sent(
    s3_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    with threaded_mock(MockConfig(api_key=TEST_KEY)) as server:
        no_bucket = run(s3_endpoint, EXAMPLE, "s3://no-such-bucket-here/x", tmp_path / "a",
                        server=server)  # fmt: skip
        assert no_bucket.returncode == 2 and "no such bucket" in no_bucket.stderr
        env = child_env(s3_endpoint, server)
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(var)
        env["AWS_SHARED_CREDENTIALS_FILE"] = env["AWS_CONFIG_FILE"] = str(tmp_path / "none")
        args = cli_args(EXAMPLE, f"s3://{bucket}/x", tmp_path / "b", "--base-url", server.base_url)
        no_creds = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
        assert no_creds.returncode == 2 and "no credentials" in no_creds.stderr
        batch = run(s3_endpoint, EXAMPLE, f"s3://{bucket}/x", tmp_path / "c", "--batch-api",
                    server=server)  # fmt: skip
        assert batch.returncode == 2 and "local --out" in batch.stderr
        assert not server.requests
    gcs = run(s3_endpoint, EXAMPLE, "gs://bucket/x", tmp_path / "d", "--mock", server=None)
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        assert gcs.returncode == 2 and "pip install 'batchimg[gcs]'" in gcs.stderr
    local_state = run(s3_endpoint, EXAMPLE, str(tmp_path / "out"), tmp_path / "e", "--mock",
                      server=None)  # fmt: skip
    assert local_state.returncode == 2 and "--state is for an --out URL" in local_state.stderr


def test_ledger_pieces_never_repeat_a_line_after_a_lost_note(
    s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push whose note (remote.json) was lost to a crash is done again: the piece is found
    there and skipped, so the bucket holds each line once; and a copy on another machine whose
    pieces sort among this one's is rebuilt whole, in the bucket's order."""
    use_aws(s3_endpoint, monkeypatch)

    state = tmp_path / "state"
    store, ledger = pulled(f"s3://{bucket}/pieces", state)
    with open(ledger.path, "ab") as fh:
        fh.write(b'{"id":"a","status":"ok"}\n{"id":"b","status":"ok"}\n{"id":"c","sta')
    note = (state / "remote.json").read_bytes()
    assert ledger.push() == 50
    (state / "remote.json").write_bytes(note)  # the crash: the push happened, its note did not
    with open(ledger.path, "ab") as fh:
        fh.write(b'tus":"ok"}\n')
    again = RemoteLedger(store, state)
    again.pull()  # pushes what is left first, skipping the piece already there
    assert [r["id"] for r in bucket_ledger(fs, f"{bucket}/pieces")] == ["a", "b", "c"]

    other = RemoteLedger(store, tmp_path / "other")
    other.pull()
    assert [orjson.loads(x)["id"] for x in other.path.read_bytes().splitlines()] == ["a", "b", "c"]
    with open(other.path, "ab") as fh:
        fh.write(b'{"id":"d","status":"ok"}\n')
    other.push()
    again.pull()  # brings d in after a, b, c
    assert [orjson.loads(x)["id"] for x in again.path.read_bytes().splitlines()] == list("abcd")


def test_report_html_reads_images_from_bucket(
    s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{bucket}/html"
    with threaded_mock(MockConfig(api_key=TEST_KEY)) as server:
        done = run(s3_endpoint, EXAMPLE, url, tmp_path / "state", server=server)
        assert done.returncode == 0, done.stderr
    page = tmp_path / "r.html"
    made = cli(s3_endpoint, "report", url, "--html", str(page))
    assert made.returncode == 0, made.stderr
    thumbs = list((tmp_path / "r_files" / "thumbs").iterdir())
    assert len(thumbs) >= 20  # from the bucket's images (a few are alike: one thumbnail)
    estimate = cli(s3_endpoint, "estimate", str(EXAMPLE), "--from-ledger", url)
    assert estimate.returncode == 0, estimate.stderr
    assert url in estimate.stderr + estimate.stdout


def test_check_ok_records_in_bucket(s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path) -> None:
    """The ledger lines a bucket run writes carry the contract's fields, as a local run's do,
    and its images are what they say (copied down, checked as local files are)."""
    url = f"s3://{bucket}/fields"
    with threaded_mock(MockConfig(api_key=TEST_KEY)) as server:
        done = run(s3_endpoint, EXAMPLE, url, tmp_path / "state", server=server)
        assert done.returncode == 0, done.stderr
    local = tmp_path / "copy"
    fs.get(f"{bucket}/fields/images", str(local / "images"), recursive=True)
    for record in last_states(bucket_ledger(fs, f"{bucket}/fields")).values():
        check_ok_record(local, record)


# -- the engine's side, with stores of the tests' own (in-process, against the mock) --


class GatedStore(LocalStore):
    """A local store whose puts wait for a gate, counting those waiting; tuned as a bucket's
    (many writer threads, one item each, an upload queue as deep as --concurrency)."""

    writer_threads = 16
    writer_batch = 1
    upload_queue = 1

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.waiting = 0
        self._count = threading.Lock()

    def put(self, name: str, temp: Path) -> None:
        with self._count:
            self.waiting += 1
        self.gate.wait(timeout=30)
        super().put(name, temp)


async def test_slow_store_holds_up_requests_only_past_the_upload_queue(
    tmp_path: Path, mock_server: MockServer
) -> None:
    """With the store stalled, requests go on until the queue of items waiting on it is full
    (--concurrency in flight + as many again waiting), then stop: back-pressure, bounded."""
    manifest = write_lines(tmp_path / "m.jsonl", lines(12, "q"))
    store = GatedStore(tmp_path / "out")
    options = batchimg.RunOptions(base_url=mock_server.base_url, api_key=TEST_KEY, concurrency=2)
    async with anyio.create_task_group() as tasks:
        done: list[batchimg.Summary] = []

        async def go() -> None:
            done.append(await batchimg.arun(manifest, tmp_path / "out", options, store=store))

        tasks.start_soon(go)
        with anyio.fail_after(30):
            while store.waiting < 4:
                await anyio.sleep(0.01)
        # Four items wait on the store: two past their requests, two more that took their
        # slots; every worker is in the store now, so no fifth request can be out.
        assert len(mock_server.requests) == 4
        store.gate.set()
    assert done[0].ok == 12 and len(mock_server.requests) == 12


class RejectingStore(LocalStore):
    """A store that will not take one object (as a bucket refuses a key too long)."""

    def put(self, name: str, temp: Path) -> None:
        if "q0003" in name:
            raise ObjectRejected(f"cannot write {name}: OSError: [Errno 36] KeyTooLongError")
        super().put(name, temp)


async def test_object_rejected_fails_its_item_with_its_cost_and_run_goes_on(
    tmp_path: Path, mock_server: MockServer
) -> None:
    manifest = write_lines(tmp_path / "m.jsonl", lines(6, "q"))
    out = tmp_path / "out"
    options = batchimg.RunOptions(base_url=mock_server.base_url, api_key=TEST_KEY)
    summary = await batchimg.arun(manifest, out, options, store=RejectingStore(out))
    assert (summary.ok, summary.failed, summary.stop_reason) == (5, 1, None)
    states = last_states(
        [orjson.loads(x) for x in (out / "ledger.jsonl").read_bytes().splitlines()]
    )
    rejected = states["q0003"]
    assert rejected["status"] == "error" and rejected["error"]["code"] == "store_rejected"
    assert rejected["cost_usd"] > 0  # paid for: its cost is kept, and counts
    assert billed(mock_server) == pytest.approx(summary.cost_usd)


def test_heartbeat_renews_until_the_lock_is_taken_over(
    s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat replaces the lock only as this run last wrote it: once another run has
    taken the lock over, the next beat fails (and the run stops) instead of stealing it back."""
    use_aws(s3_endpoint, monkeypatch)
    from batchimg.errors import StorageError
    from batchimg.stores.remote import BucketLock

    store = bucket_store(f"s3://{bucket}/beat", tmp_path / "a")
    mine = BucketLock(store, tmp_path / "a", ttl_s=1.0)
    assert mine.acquire() is None
    first = orjson.loads(fs.cat_file(f"{bucket}/beat/.batchimg.lock"))
    mine.beat()
    renewed = orjson.loads(fs.cat_file(f"{bucket}/beat/.batchimg.lock"))
    assert renewed["token"] == first["token"] and renewed["heartbeat_at"] >= first["heartbeat_at"]
    time.sleep(2.2)  # its heartbeat, over its 1 s TTL by both clocks: taken for dead
    theirs = BucketLock(store, tmp_path / "b", ttl_s=1.0)
    assert "took over the lock" in (theirs.acquire() or "")
    with pytest.raises(StorageError, match="lost the lock"):
        mine.beat()
    assert orjson.loads(fs.cat_file(f"{bucket}/beat/.batchimg.lock"))["token"] == theirs.token
    mine.release()  # not its lock any more: left alone
    assert fs.exists(f"{bucket}/beat/.batchimg.lock")
    theirs.release()
    assert not fs.exists(f"{bucket}/beat/.batchimg.lock")


def test_a_stray_high_segment_number_does_not_hide_later_runs(
    s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path
) -> None:
    """A segment numbered 999999 (by hand, or a very long history): the next run takes
    1000000, and every later run still reads it (numbers are compared as numbers)."""
    manifest = write_lines(tmp_path / "m.jsonl", lines(6, "n"))
    url = f"s3://{bucket}/numbers"
    fs.pipe_file(f"{bucket}/numbers/ledger/999999.jsonl", b"")
    with threaded_mock(MockConfig(api_key=TEST_KEY)) as server:
        first = run(s3_endpoint, manifest, url, tmp_path / "a", server=server)
        assert first.returncode == 0, first.stderr
        second = run(s3_endpoint, manifest, url, tmp_path / "b", server=server)
        assert second.returncode == 0 and "6 already done" in second.stderr
        assert set(answered(server).values()) == {1}
    assert fs.exists(f"{bucket}/numbers/ledger/1000000.jsonl")
    assert fs.exists(f"{bucket}/numbers/ledger/1000001.jsonl")


def test_lost_bookkeeping_keeps_lines_the_bucket_lacks(
    s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path
) -> None:
    """Killed before its lines went up, and its remote.json lost: the next run from the same
    state directory pushes the lines only it has (nothing dropped, nothing bought again)."""
    manifest = write_lines(tmp_path / "m.jsonl", lines(30, "l"))
    url = f"s3://{bucket}/lost"
    state = tmp_path / "state"
    with threaded_mock(MockConfig(api_key=TEST_KEY, latency_s=0.1)) as server:
        args = cli_args(manifest, url, state, "--base-url", server.base_url, "--concurrency", "4",
                        "--upload-every", "600")  # fmt: skip
        kill_when(args, child_env(s3_endpoint, server), answered_at_least(server, 10))
        assert not any(r for r in bucket_ledger(fs, f"{bucket}/lost") if "record" not in r)
        ok_local = local_oks(state, "prompt")
        assert len(ok_local) >= 8
        (state / "remote.json").unlink()
        before = answered(server)
        rerun = run(s3_endpoint, manifest, url, state, server=server)
        assert rerun.returncode == 0, rerun.stderr
        again = answered(server) - before
        assert not set(again) & ok_local  # what the killed run kept was not bought again
    states = last_states(bucket_ledger(fs, f"{bucket}/lost"))
    assert len(states) == 30 and all(r["status"] == "ok" for r in states.values())


def test_pieces_fold_into_spans_read_once(
    s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every SPAN_EVERY pushes become one span and the pieces go; a span whose pieces were
    not deleted (a crash between) is read once all the same."""
    use_aws(s3_endpoint, monkeypatch)
    from batchimg.stores.remote import SPAN_EVERY, download_ledger

    state = tmp_path / "state"
    store, ledger = pulled(f"s3://{bucket}/spans", state)
    ids = [f"i{n}" for n in range(SPAN_EVERY + 5)]
    for item in ids:
        with open(ledger.path, "ab") as fh:
            fh.write(orjson.dumps({"id": item, "status": "ok"}) + b"\n")
        ledger.push()
    names = [k.rsplit("/", 1)[1] for k in fs.find(f"{bucket}/spans/ledger")]
    spans = [n for n in names if n.count("-") == 3]
    assert len(spans) == 1 and len(names) == 1 + 1 + 5  # the mark, one span, 5 pieces
    # A crash after a span was written but before its pieces went: both there, read once.
    pieces = [n for n in names if n.count("-") == 2]
    start = int(pieces[0].rsplit("-", 1)[1].split(".")[0])
    ledger.fold()
    for piece in pieces:  # put the folded pieces back, as if never deleted
        fs.pipe_file(f"{bucket}/spans/ledger/{piece}", b'{"id":"stale"}\n')
    assert fs.exists(f"{bucket}/spans/ledger/{spans[0]}") and start > 0
    read = download_ledger(store, tmp_path / "read")
    assert [orjson.loads(x)["id"] for x in read.read_bytes().splitlines()] == ids


def test_cap_holds_when_a_killed_run_is_continued_elsewhere(
    s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path
) -> None:
    """Under --max-cost each request's `sent` line is in the bucket before it goes: a run
    killed with its ledger's last pushes far off (--upload-every 600), continued from another
    machine, still keeps the total under the cap."""
    manifest = write_lines(tmp_path / "m.jsonl", lines(60, "c"))
    url = f"s3://{bucket}/capped"
    cap = "0.25"
    with threaded_mock(MockConfig(api_key=TEST_KEY, latency_s=0.2)) as server:
        flags = ("--concurrency", "4", "--upload-every", "600", "--max-cost", cap)
        args = cli_args(manifest, url, tmp_path / "a", "--base-url", server.base_url, *flags)
        env = {**child_env(s3_endpoint, server), "BATCHIMG_LOCK_TTL_S": "1"}
        kill_when(args, env, answered_at_least(server, 8))
        killed_at = time.time()
        time.sleep(max(0.0, killed_at + 2.2 - time.time()))  # its lock: over 1 s old
        elsewhere = run(s3_endpoint, manifest, url, tmp_path / "b", "--max-cost", cap,
                        server=server, env={"BATCHIMG_LOCK_TTL_S": "1"})  # fmt: skip
        assert elsewhere.returncode == 3, elsewhere.stderr  # stopped by the cap
        assert billed(server) <= float(cap) + 1e-9
        assert billed(server) > float(cap) / 2  # and it did spend toward it


def test_bad_urls_exit_2_and_say_no_secret(s3_endpoint: str, tmp_path: Path) -> None:
    for url, says in (
        ("s3://AKIAXX:PASSWORD123@bucket/p", "never in the URL"),
        ("s3://bucket/../x", "plain bucket and prefix"),
        ("s3://bucket//x", "plain bucket and prefix"),
        ("s3://bucket/p?x=1", "plain bucket and prefix"),
        ("memory://bucket/p", "in-memory"),
    ):
        done = run(s3_endpoint, EXAMPLE, url, tmp_path / "s", "--mock", server=None)
        assert done.returncode == 2 and says in done.stderr, (url, done.stderr)
        assert "PASSWORD123" not in done.stderr + done.stdout
        report = cli(s3_endpoint, "report", url)
        assert report.returncode == 2 and "PASSWORD123" not in report.stderr + report.stdout


def test_unparking_after_another_machine_redid_the_items_keeps_its_files(
    s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path
) -> None:
    """Machine A's store access is cut mid-run (its images parked); machine B does the whole
    job; then A comes back. A's parked images go to .orphans/ and its lines become charges:
    B's images, which the ledger's last lines name, are neither moved nor replaced."""
    import hashlib

    manifest = write_lines(tmp_path / "m.jsonl", lines(20, "p"))
    url = f"s3://{bucket}/twice"
    state_a = tmp_path / "a"
    with threaded_mock(MockConfig(api_key=TEST_KEY, latency_s=0.1)) as server:
        args = cli_args(manifest, url, state_a, "--base-url", server.base_url, "--concurrency", "4")
        env = {**child_env(s3_endpoint, server), "BATCHIMG_LOCK_TTL_S": "1"}
        proc = subprocess.Popen(args, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
        try:
            wait_for(answered_at_least(server, 6))
            set_auth(s3_endpoint, allowed=False)
            proc.wait(timeout=60)
        finally:
            set_auth(s3_endpoint, allowed=True)
            proc.kill()
        assert proc.returncode == 3 and (state_a / "parked.jsonl").exists()
        short_ttl = {"BATCHIMG_LOCK_TTL_S": "1"}
        time.sleep(2.2)  # A's lock (never released: the store refused) is over 1 s old
        b = run(s3_endpoint, manifest, url, tmp_path / "b", server=server, env=short_ttl)
        assert b.returncode == 0, b.stderr
        a = run(s3_endpoint, manifest, url, state_a, server=server)
        assert a.returncode == 0 and "parked" in a.stderr, a.stderr
    records = bucket_ledger(fs, f"{bucket}/twice")
    states = last_states(records)
    assert len(states) == 20 and all(r["status"] == "ok" for r in states.values())
    for record in states.values():
        for name, digest in zip(record["files"], record["sha256"], strict=True):
            assert hashlib.sha256(fs.cat_file(f"{bucket}/twice/{name}")).hexdigest() == digest
    charges = [r for r in records if r.get("record") == "charge"]
    assert charges and all(f.startswith(".orphans/") for r in charges for f in r["files"])
    for record in charges:  # A's paid-for images, kept aside
        assert all(fs.exists(f"{bucket}/twice/{f}") for f in record["files"])


def test_pushes_from_many_threads_never_leave_a_gap(
    s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upload timer, the cap's gate and the end push from threads of their own while lines
    are appended: the bucket's ledger is the local one, line for line, with no hole."""
    use_aws(s3_endpoint, monkeypatch)
    from batchimg.stores.remote import download_ledger

    state = tmp_path / "state"
    store, ledger = pulled(f"s3://{bucket}/threads", state)
    done = threading.Event()

    def pusher() -> None:
        while not done.is_set():
            ledger.push()

    threads = [threading.Thread(target=pusher) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for n in range(150):
            with open(ledger.path, "ab") as fh:
                fh.write(orjson.dumps({"id": f"t{n}", "status": "ok"}) + b"\n")
    finally:
        done.set()
        for thread in threads:
            thread.join()
    ledger.finish()
    read = download_ledger(store, tmp_path / "read")
    assert read.read_bytes() == ledger.path.read_bytes()


def test_a_run_with_nothing_to_do_leaves_the_copy_accounted_for(
    s3_endpoint: str, fs: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that writes no line (all done) leaves an empty segment: the next pull still finds
    its copy whole and fetches nothing, instead of rebuilding it from the bucket."""
    use_aws(s3_endpoint, monkeypatch)
    state = tmp_path / "state"
    store, first = pulled(f"s3://{bucket}/idle", state)
    with open(first.path, "ab") as fh:
        fh.write(b'{"id":"a","status":"ok"}\n')
    first.finish()
    idle = RemoteLedger(store, state)
    idle.pull()  # an empty segment: nothing pushed
    marker = first.path.stat().st_mtime_ns
    again = RemoteLedger(store, state)
    again.pull()
    assert first.path.stat().st_mtime_ns == marker  # not rewritten
    assert not (state / ".ledger.jsonl.pulling").exists()
    assert [orjson.loads(x)["id"] for x in again.path.read_bytes().splitlines()] == ["a"]
