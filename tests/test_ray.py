"""Scale-out on Ray (`run --ray`): the real engine on real Ray workers (a local Ray instance
with 2 CPUs, started once for this module) against the project's mock on loopback.

The driver runs in this process (`batchimg.arun`), or as a `batchimg run` child process that
joins this module's Ray instance (`--ray ADDRESS`) where a test kills or signals it.
"""

from __future__ import annotations

import collections
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import batchimg
from batchimg.engine import ProgressCallback
from batchimg.engine.events import ProgressEvent
from batchimg.manifest import plan_chunks, read_chunk, read_manifest
from batchimg.mock import MockConfig, MockServer
from tests.conftest import TEST_KEY
from tests.helpers import (
    ROOT,
    SECRET,
    aws_env,
    last_states,
    ledger,
    run_cli,
    spent,
    threaded_mock,
    unsettled,
    wait_for,
)
from tests.test_object_store import pulled

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.timeout(240)


#: Two accounts' keys, in the variables an --endpoints file names.
ROUTE_KEYS = {"KEY_EAST": "sk-east-0123456789", "KEY_WEST": "sk-west-0123456789"}


@pytest.fixture(scope="module")
def ray_address(s3_endpoint: str) -> Iterator[str]:
    """A local Ray instance for the module. Its workers inherit the environment it starts
    with, so the API key and the S3 server's variables are set just then (the way a user's
    shell hands them to `--ray local`)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    given = {"BATCHIMG_API_KEY": TEST_KEY, **ROUTE_KEYS, **aws_env(s3_endpoint)}
    saved = {name: os.environ.get(name) for name in given}
    os.environ.update(given)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's own environment has the key too (it checks it before anything is sent)."""
    monkeypatch.setenv("BATCHIMG_API_KEY", TEST_KEY)


def prompts(count: int, **fields: Any) -> list[dict[str, Any]]:
    return [{"prompt": f"a lighthouse, study {i}", **fields} for i in range(count)]


def answered(server: MockServer) -> collections.Counter[str]:
    """How many times the mock answered (and billed) each prompt."""
    return collections.Counter(r.prompt or "" for r in server.requests if r.status == 200)


def finished(out: Path) -> int:
    """Items with a line in a ledger other processes are writing (a torn last line, being
    written, is not counted yet)."""
    return sum(1 for r in batchimg.ledger.read_ledger(out / "ledger.jsonl") if "record" not in r)


def worker_pids() -> list[int]:
    """The processes of this project's Ray workers (Ray titles them `ray::Worker...`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::Worker"):
                found.append(int(entry.name))
    return found


def kill_after(finished: int, killed: list[int]) -> ProgressCallback:
    """A progress callback that kills one worker (by its pid, as the driver's notes give it)
    once `finished` items have finished."""
    pids: list[int] = []
    count = [0]

    def progress(event: ProgressEvent) -> None:
        if event.kind == "note" and event.message and event.message.startswith("worker "):
            pids.append(int(event.message.split("pid ")[1].split()[0]))
        if event.kind == "item_finished":
            count[0] += 1
            if count[0] == finished:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

    return progress


def options(server: MockServer, **more: Any) -> batchimg.RunOptions:
    more.setdefault("backoff_base_s", 0.01)
    return batchimg.RunOptions(base_url=server.base_url, ray="local", **more)


def cli(
    manifest: Path,
    out: Path | str,
    server: MockServer,
    address: str,
    *extra: str,
    env: dict[str, str] | None = None,
) -> Any:
    args = [sys.executable, "-m", "batchimg", "run", str(manifest), "--out", str(out),
            "--base-url", server.base_url, "--ray", address, *extra]  # fmt: skip
    env = {**os.environ, "BATCHIMG_API_KEY": TEST_KEY, **(env or {})}
    return subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT)


# -- chunks: a worker reads its lines as a whole read of the manifest would --------------------


def test_chunks_give_every_line_the_id_and_number_a_whole_read_gives(
    write_manifest: Callable[..., Path],
) -> None:
    lines: list[dict[str, Any] | str] = []
    for i in range(40):
        lines.append({"prompt": f"p{i % 7}"})  # repeated lines: ids by occurrence
        if i % 9 == 0:
            lines += ["", "# a comment", "not json", '{"id": "x1", "prompt": "explicit"}']
    manifest = write_manifest(lines)
    manifest.write_bytes(b"\xef\xbb\xbf" + manifest.read_bytes())  # a BOM before line 1
    whole = [(e.id, e.line, type(e).__name__) for e in read_manifest(manifest)]
    assert sum(kind == "BadLine" for _, _, kind in whole) > 4  # bad JSON, the id used again
    data = manifest.read_bytes()
    for per in (1, 3, 8, 1000):
        chunks = list(plan_chunks(manifest, per))
        assert chunks[0].start == 0 and chunks[-1].end == len(data)
        assert all(a.end == b.start for a, b in itertools.pairwise(chunks))
        read = [
            (e.id, e.line, type(e).__name__)
            for c in chunks
            for e in read_chunk(data[c.start : c.end], c, inputs_dir=manifest.parent)
        ]
        assert read == whole, per
        assert sum(c.entries for c in chunks) == len(whole)


def test_chunks_count_what_is_done(write_manifest: Callable[..., Path]) -> None:
    manifest = write_manifest(prompts(10))
    items = list(read_manifest(manifest))
    done = {items[1].id, items[2].id, items[9].id}
    chunks = list(plan_chunks(manifest, 4, done))
    assert [(c.entries, c.done) for c in chunks] == [(4, 2), (4, 0), (2, 1)]


# -- the bars --------------------------------------------------------------------------


async def test_three_workers_share_one_rate_limit(
    ray_address: str, key_env: None, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    """300 items over 3 workers against a hard limit of 20 requests/s: every item ok once,
    few 429s (the workers share one limiter), close to the ideal 15 s."""
    manifest = write_manifest(prompts(300))
    with threaded_mock(MockConfig(api_key=TEST_KEY, rpm_limit=1200, latency_s=0.2)) as server:
        summary = await batchimg.arun(
            manifest, tmp_path / "out", options(server, workers=3, concurrency=8)
        )
        bill = answered(server)
        statuses = collections.Counter(r.status for r in server.requests)
        arrivals = [r.received_at for r in server.requests]
    assert summary.exit_code == 0 and summary.ok == 300
    assert len(bill) == 300 and set(bill.values()) == {1}  # every item answered once
    share = statuses[429] / sum(statuses.values())
    # The limiter's part of the wall time: from the first request the mock saw to its last
    # answer (the workers' own start, ~3 s of Ray's, is before it).
    span = max(arrivals) - min(arrivals) + 0.2
    print(f"3 workers: {summary.wall_s:.1f} s in all, {span:.1f} s from the first request, "
          f"{dict(statuses)}, 429 share {share:.1%}")  # fmt: skip
    assert share <= 0.15
    assert span <= 1.5 * 300 / 20
    states = last_states(tmp_path / "out")
    assert len(states) == 300 and all(r["status"] == "ok" for r in states.values())
    assert summary.limiter is not None and summary.limiter.learned_rpm == 1200
    rows = (tmp_path / "out" / "metadata.jsonl").read_bytes().splitlines()
    assert len(rows) == 300  # the driver wrote the dataset's metadata from the ledger


async def test_the_cap_holds_over_three_workers(
    ray_address: str, key_env: None, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    from tests.test_cost import billed_usd

    manifest = write_manifest(prompts(120, model="gpt-image-1", quality="low"))
    cap = 0.4
    with threaded_mock(MockConfig(api_key=TEST_KEY, latency_s=0.1)) as server:
        summary = await batchimg.arun(
            manifest,
            tmp_path / "out",
            options(server, workers=3, concurrency=8, max_cost_usd=cap),
        )
        billed = billed_usd(server)
    assert billed <= cap
    assert summary.exit_code == 3 and 0 < summary.ok < 120
    assert summary.stop_reason is not None and summary.stop_reason.startswith("budget reached")
    assert summary.ok + summary.not_attempted == 120
    assert summary.spent_total_usd == pytest.approx(billed, abs=1e-9)
    assert spent(tmp_path / "out") == pytest.approx(billed, abs=1e-9)  # the ledger: the bill


# -- faults ------------------------------------------------------------------------------------


async def test_a_killed_worker_loses_only_what_it_had_in_flight(
    ray_address: str, key_env: None, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(prompts(150))
    out = tmp_path / "out"
    killed: list[int] = []
    with threaded_mock(MockConfig(api_key=TEST_KEY, latency_s=0.3)) as server:
        progress = kill_after(30, killed)
        run = options(server, workers=3, concurrency=4)
        summary = await batchimg.arun(manifest, out, run, progress=progress)
        bill = answered(server)
    assert killed
    assert summary.exit_code == 0, summary.stop_reason
    assert any("died" in w for w in summary.warnings), (killed, summary.warnings)
    # The dead worker's work counts as this run's, not as found done by its replacement.
    assert summary.ok + summary.skipped == 150 and summary.skipped <= 4
    states = last_states(out)
    assert len(states) == 150 and all(r["status"] == "ok" for r in states.values())
    # Only a request in flight when the worker died may have been answered twice: its `sent`
    # line stays unsettled (counted at its bound), and no item that was ok is asked again.
    id_of = {r["prompt"]: r["id"] for r in ledger(out)}
    twice = {id_of[p] for p, n in bill.items() if n > 1}
    open_sends = {r["id"] for r in unsettled(out)}
    assert twice <= open_sends
    assert len(open_sends) <= 4  # the dead worker's concurrency
    ok_lines = collections.Counter(r["id"] for r in ledger(out) if r["status"] == "ok")
    assert set(ok_lines.values()) == {1}


async def test_a_killed_driver_is_resumed_by_the_same_command(
    ray_address: str, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(prompts(120))
    out = tmp_path / "out"
    with threaded_mock(MockConfig(api_key=TEST_KEY, latency_s=0.3)) as server:
        first = cli(manifest, out, server, ray_address, "--workers", "2", "--concurrency", "4")
        wait_for(lambda: finished(out) >= 20, 60)
        first.kill()
        first.communicate()  # its pipe closed too
        ok_before = {r["id"] for r in ledger(out) if r["status"] == "ok"}
        again = cli(manifest, out, server, ray_address, "--workers", "2", "--concurrency", "4")
        _, err = again.communicate(timeout=120)
        bill = answered(server)
    assert again.returncode == 0, err
    states = last_states(out)
    assert len(states) == 120 and all(r["status"] == "ok" for r in states.values())
    prompt_of = {r["id"]: r["prompt"] for r in ledger(out)}
    assert all(bill[prompt_of[i]] == 1 for i in ok_before)  # nothing done was bought again
    wait_for(lambda: not worker_pids(), 30)  # the runs took their workers along


def test_ctrl_c_at_the_driver_drains_every_worker(
    ray_address: str, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(prompts(200))
    out = tmp_path / "out"
    with threaded_mock(MockConfig(api_key=TEST_KEY, latency_s=0.5)) as server:
        driver = cli(manifest, out, server, ray_address, "--workers", "2", "--concurrency", "4")
        wait_for(lambda: finished(out) >= 10, 60)
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=60)
        bill = answered(server)
    assert driver.returncode == 130, err
    assert not unsettled(out)  # what was in flight finished
    done = [r for r in ledger(out) if r["status"] == "ok"]
    assert len(done) == sum(bill.values()) < 200  # every answer kept, the rest left
    assert "SIGINT" in err
    wait_for(lambda: not worker_pids(), 30)


async def test_a_run_fatal_answer_on_one_worker_stops_them_all(
    ray_address: str, key_env: None, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(prompts(200))
    config = MockConfig(api_key=TEST_KEY, latency_s=0.1, auth_fail_after=20)
    with threaded_mock(config) as server:
        summary = await batchimg.arun(
            manifest, tmp_path / "out", options(server, workers=3, concurrency=4)
        )
        failed_auth = sum(1 for r in server.requests if r.status == 401)
    assert summary.exit_code == 3
    assert summary.stop_reason is not None
    assert failed_auth <= 3 * 4  # what was in flight when the first 401 came back
    assert summary.ok + summary.failed + summary.not_attempted == 200


# -- a bucket ------------------------------------------------------------------------------------


async def test_workers_write_to_a_bucket_one_segment_each(
    ray_address: str,
    key_env: None,
    bucket: str,
    fs: Any,
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    write_manifest: Callable[..., Path],
) -> None:
    for name, value in aws_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    manifest = write_manifest(prompts(60))
    url = f"s3://{bucket}/ray"
    with threaded_mock(MockConfig(api_key=TEST_KEY, latency_s=0.1)) as server:
        run = options(server, workers=2, concurrency=4, state_dir=tmp_path / "state")
        summary = await batchimg.arun(manifest, url, run)
        bill = answered(server)
        again = await batchimg.arun(
            manifest,
            url,
            batchimg.RunOptions(base_url=server.base_url, state_dir=tmp_path / "elsewhere"),
        )
        assert answered(server) == bill  # another machine, one process: nothing to buy
    assert summary.exit_code == 0 and summary.ok == 60
    assert again.exit_code == 0 and again.skipped == 60
    assert len(bill) == 60 and set(bill.values()) == {1}
    _, ledger_copy = pulled(url, tmp_path / "check")
    items = [r for r in batchimg.ledger.read_ledger(ledger_copy.path) if "record" not in r]
    assert sorted(r["prompt"] for r in items) == sorted(bill)
    marks = [n for n in fs.ls(f"{bucket}/ray/ledger") if n.rsplit("/", 1)[1].count("-") == 0]
    assert len(marks) >= 2  # a segment a worker (the driver writes none)
    rows = fs.cat(f"{bucket}/ray/metadata.jsonl").splitlines()
    assert len(rows) == 60
    assert len(fs.ls(f"{bucket}/ray/images")) == 60
    for name in fs.find(f"{bucket}/ray"):
        body = fs.cat(name)
        assert SECRET.encode() not in body and TEST_KEY.encode() not in body
    assert not fs.exists(f"{bucket}/ray/.batchimg.lock")  # released


async def test_a_killed_workers_unpushed_lines_reach_the_bucket_through_its_slot(
    ray_address: str,
    key_env: None,
    bucket: str,
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    write_manifest: Callable[..., Path],
) -> None:
    """The replacement fills the dead worker's slot: its state directory, with the lines the
    dead one had not pushed yet (every 600 s here: none had been), which it pushes first."""
    for name, value in aws_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    manifest = write_manifest(prompts(100))
    url = f"s3://{bucket}/killed"
    state = tmp_path / "state"
    killed: list[int] = []
    with threaded_mock(MockConfig(api_key=TEST_KEY, latency_s=0.3)) as server:
        progress = kill_after(20, killed)
        run = options(server, workers=2, concurrency=4, state_dir=state, upload_every_s=600)
        summary = await batchimg.arun(manifest, url, run, progress=progress)
        bill = answered(server)
    assert killed
    assert summary.exit_code == 0, summary.stop_reason
    assert any("died" in w for w in summary.warnings)
    _, ledger_copy = pulled(url, tmp_path / "check")
    lines = list(batchimg.ledger.read_ledger(ledger_copy.path))
    ok = collections.Counter(r["id"] for r in lines if "record" not in r and r["status"] == "ok")
    assert len(ok) == 100 and set(ok.values()) == {1}
    twice = [p for p, n in bill.items() if n > 1]
    assert len(twice) <= 2 * 4  # what it had in flight, and its answers waiting on uploads


def test_a_killed_driver_on_a_bucket_is_resumed_without_buying_again(
    ray_address: str,
    bucket: str,
    s3_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    write_manifest: Callable[..., Path],
) -> None:
    """The driver is killed (its workers with it) while lines wait in the workers' state
    directories; the same command then pushes them all before any worker pulls."""
    manifest = write_manifest(prompts(160))
    url, state = f"s3://{bucket}/driver", tmp_path / "state"
    env = aws_env(s3_endpoint)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    extra = ("--workers", "3", "--concurrency", "4", "--state", str(state), "--upload-every", "1")
    with threaded_mock(MockConfig(api_key=TEST_KEY, latency_s=0.3)) as server:
        first = cli(manifest, url, server, ray_address, *extra, env=env)
        wait_for(lambda: len(answered(server)) >= 60, 60)
        first.kill()
        first.communicate()
        wait_for(lambda: not worker_pids(), 30)  # Ray ends them a moment later
        ok_before = {  # what each worker had made, pushed or not
            r["prompt"]
            for copy in state.glob("ray-*/ledger.jsonl")
            for r in batchimg.ledger.read_ledger(copy)
            if "record" not in r and r["status"] == "ok"
        }
        again = cli(manifest, url, server, ray_address, *extra, env=env)
        _, err = again.communicate(timeout=180)
        bill = answered(server)
    assert again.returncode == 0, err
    _, copy = pulled(url, tmp_path / "check")
    lines = list(batchimg.ledger.read_ledger(copy.path))
    ok = collections.Counter(
        r["prompt"] for r in lines if "record" not in r and r["status"] == "ok"
    )
    assert len(ok) == 160 and set(ok.values()) == {1}  # one ok line an item
    assert ok_before and all(bill[p] == 1 for p in ok_before)  # nothing made is bought again
    twice = {p for p, n in bill.items() if n > 1}
    assert len(twice) <= 3 * 4 * 2  # only what the workers had in hand
    wait_for(lambda: not worker_pids(), 30)


# -- several keys or deployments -----------------------------------------------------------------


def endpoints_file(tmp_path: Path, east: MockServer, west: MockServer) -> Path:
    path = tmp_path / "endpoints.jsonl"
    path.write_bytes(
        orjson.dumps({"name": "east", "base_url": east.base_url, "key_env": "KEY_EAST"})
        + b"\n# a comment\n"
        + orjson.dumps({"name": "west", "base_url": west.base_url, "key_env": "KEY_WEST"})
        + b"\n"
    )
    return path


@pytest.mark.parametrize("workers", [None, 2])
async def test_endpoints_share_the_work_each_within_its_own_limit(
    workers: int | None,
    ray_address: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    write_manifest: Callable[..., Path],
) -> None:
    """Two accounts limited to 10 requests/s each: every item goes once to one of them, with
    its own key; both carry a share, and 429s stay few (each has its own limiter)."""
    for name, value in ROUTE_KEYS.items():
        monkeypatch.setenv(name, value)
    count = 160
    manifest = write_manifest(prompts(count))
    limits = {"rpm_limit": 600, "latency_s": 0.2}
    with (
        threaded_mock(MockConfig(api_key=ROUTE_KEYS["KEY_EAST"], **limits)) as east,
        threaded_mock(MockConfig(api_key=ROUTE_KEYS["KEY_WEST"], **limits)) as west,
    ):
        ray_options = {} if workers is None else {"ray": "local", "workers": workers}
        run = batchimg.RunOptions(
            endpoints=endpoints_file(tmp_path, east, west),
            concurrency=8,
            backoff_base_s=0.01,
            **ray_options,  # type: ignore[arg-type]
        )
        summary = await batchimg.arun(manifest, tmp_path / "out", run)
        bills = answered(east), answered(west)
        statuses = collections.Counter(r.status for s in (east, west) for r in s.requests)
        arrivals = [r.received_at for s in (east, west) for r in s.requests]
    assert summary.exit_code == 0 and summary.ok == count
    together = bills[0] + bills[1]
    assert len(together) == count and set(together.values()) == {1}  # once, on one of them
    assert statuses[401] == 0  # each got its own key
    assert min(sum(bill.values()) for bill in bills) >= count // 4
    share = statuses[429] / sum(statuses.values())
    print(f"workers={workers}: {summary.wall_s:.1f} s, {dict(statuses)}, east/west "
          f"{sum(bills[0].values())}/{sum(bills[1].values())}")  # fmt: skip
    assert share <= 0.15
    span = max(arrivals) - min(arrivals) + 0.2  # from the first request to the last answer
    assert span <= 1.5 * count / 20
    assert summary.limiter is not None and summary.limiter.learned_rpm == 1200  # both learned
    # Who billed what: each line names its endpoint, and the report adds them up per endpoint.
    routes = collections.Counter(r["route"] for r in ledger(tmp_path / "out"))
    assert routes == {"east": sum(bills[0].values()), "west": sum(bills[1].values())}
    shown = run_cli("report", str(tmp_path / "out"), "--by", "route", "--format", "csv")
    assert shown.returncode == 0 and "east" in shown.stdout and "west" in shown.stdout


@pytest.mark.parametrize("trouble", ["refused", "500", "404"])
async def test_an_endpoint_in_trouble_is_passed_over_for_the_others(
    trouble: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    write_manifest: Callable[..., Path],
) -> None:
    """The first endpoint cannot be reached, answers 500s, or has a wrong path: the items go
    to the second, every one ok, and none is failed for the first's trouble."""
    for name, value in ROUTE_KEYS.items():
        monkeypatch.setenv(name, value)
    manifest = write_manifest(prompts(40))
    faults = {"500": {"error_rate": 1.0}}.get(trouble, {})
    with (
        threaded_mock(MockConfig(api_key=ROUTE_KEYS["KEY_EAST"], **faults)) as east,
        threaded_mock(MockConfig(api_key=ROUTE_KEYS["KEY_WEST"], latency_s=0.05)) as west,
    ):
        path = endpoints_file(tmp_path, east, west)
        if trouble == "refused":  # a port nothing listens on
            path.write_text(path.read_text().replace(east.base_url, "http://127.0.0.1:9/v1"))
        elif trouble == "404":
            path.write_text(path.read_text().replace(east.base_url, east.base_url + "/wrong"))
        run = batchimg.RunOptions(endpoints=path, concurrency=8, backoff_base_s=0.01)
        summary = await batchimg.arun(manifest, tmp_path / "out", run)
        to_west = answered(west)
    assert summary.exit_code == 0, summary.stop_reason
    assert len(to_west) == 40 and set(to_west.values()) == {1}
    assert spent(tmp_path / "out") == pytest.approx(summary.cost_usd)  # nothing counted twice


@pytest.mark.parametrize(
    "content, says",
    [
        ('{"base_url": "http://x/v1"}', "key_env must name"),
        ('{"base_url": "ftp://x", "key_env": "K"}', "base_url must be"),
        ('{"base_url": "http://x/v1", "key_env": "KEY_NOT_SET_ANYWHERE"}', "KEY_NOT_SET_ANYWHERE"),
        ('{"base_url": "http://x/v1", "key_env": "K", "api_key": "sk-1"}', "unknown field"),
        ("[]", "lists no endpoint"),
        ("{not json", "line 1: not JSON"),
        ('{"base_url": "http://u:sk-pw@x/v1", "key_env": "K"}', "credentials"),
        ('{"base_url": "http://x/v1", "key_env": "K", "rpm": 1e-300}', "at least"),
    ],
)
def test_a_bad_endpoints_file_exits_2_before_anything_is_sent(
    content: str, says: str, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(prompts(3))
    path = tmp_path / "endpoints.json"
    path.write_text(content)
    done = run_cli("run", str(manifest), "--out", str(tmp_path / "o"), "--endpoints", str(path),
                   env={"K": "sk-k-123"})  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert says in done.stderr
    assert "sk-1" not in done.stderr and "sk-k-123" not in done.stderr
    assert "sk-pw" not in done.stderr
    assert not (tmp_path / "o" / "ledger.jsonl").exists()


# -- usage ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--ray", "local", "--format", "webdataset"], "imagefolder"),
        (["--ray", "local", "--batch-api"], "--batch-api"),
        (["--ray", "local", "--check-models"], "--check-models"),
        (["--ray", " "], "--ray needs"),
        (["--workers", "3"], "--workers is for --ray"),
        (["--ray", "127.0.0.1:9"], "nothing answers there"),  # no cluster: no wait forever
    ],
)
def test_what_ray_runs_cannot_do_exits_2(
    extra: list[str], says: str, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(prompts(3))
    args = [sys.executable, "-m", "batchimg", "run", str(manifest), "--out", str(tmp_path / "o"),
            "--mock", *extra]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr


def test_the_readme_command_runs_on_a_local_ray(tmp_path: Path) -> None:
    """`batchimg run jobs/example.jsonl --out out --mock --ray local --workers 2`, as the
    README says, in a process of its own (it starts and stops its own Ray)."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "batchimg", "run", "jobs/example.jsonl", "--out", str(out),
            "--mock", "--ray", "local", "--workers", "2"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    single = tmp_path / "single"
    args = [sys.executable, "-m", "batchimg", "run", "jobs/example.jsonl", "--out", str(single),
            "--mock"]  # fmt: skip
    assert subprocess.run(args, capture_output=True, cwd=ROOT, timeout=60).returncode == 0
    ids = {r["id"]: (r["line"], r["status"]) for r in ledger(out)}
    assert ids == {r["id"]: (r["line"], r["status"]) for r in ledger(single)}
    assert rows(out) == rows(single)


def rows(out: Path) -> list[str]:
    lines = (out / "metadata.jsonl").read_bytes().splitlines()
    return sorted(orjson.loads(line)["file_name"] for line in lines)
