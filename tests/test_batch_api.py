"""`run --batch-api`: the real engine through the mock's Files and Batch APIs over loopback.

Every test checks the same contract as an online run (every item `ok` once, the ledger's
fields, images that decode) plus what batches add: half the price, `via` and `batch_id`, no
item submitted twice and no file uploaded twice across kills and re-runs, the cap at the mock.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

import batchimg
from batchimg.engine.batchstate import BatchState
from batchimg.estimate import estimate_manifest
from batchimg.mock import MockConfig, MockServer
from batchimg.pricing import PriceTable
from tests.conftest import TEST_KEY, StartMock
from tests.helpers import (
    MEASURED,
    ROOT,
    check_ok_record,
    last_states,
    ledger,
    ledger_lines,
    run_cli,
    spent,
    threaded_mock,
    unsettled,
    wait_for,
)
from tests.helpers import run_on_mock as run
from tests.test_edits import make_image, make_mask, sha
from tests.test_failures import FullDisk

#: A mock whose batches move on at once (the lines themselves take no time).
QUICK = {"batch_validate_s": 0.0, "batch_finalize_s": 0.0}
BATCH = {"batch_api": True, "poll_interval_s": 0.02}


def lines(count: int, prefix: str = "b", **fields: Any) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "prompt": f"a batch test {prefix}{i}", "model": "gpt-image-2",
             "quality": "low", "size": "1024x1024", **fields} for i in range(count)]  # fmt: skip


def billed(server: MockServer) -> float:
    """What the mock billed: each 200 answer at its price (batch lines at batch prices)."""
    table = PriceTable.default()
    total = 0.0
    for r in server.requests:
        if r.status == 200 and r.usage is not None:
            cost = table.via(r.via).request_cost({**r.params, "model": r.model}, r.usage)
            assert cost is not None
            total += cost
    return total


def answered(server: MockServer) -> Counter[str]:
    """Prompts answered 200 (billed), counted: each must be 1."""
    return Counter(r.prompt or "" for r in server.requests if r.status == 200)


def batch_uploads(server: MockServer) -> list[Any]:
    return [f for f in server.uploaded_files.values() if f.purpose == "batch"]


def check_batch_ledger(out: Path, server: MockServer, count: int) -> None:
    """Every item ok once, with the online ledger's fields plus via and batch_id, answered
    once by the mock, and the ledger's spend equal to the mock's bill at batch prices."""
    states = last_states(out)
    assert len(states) == count and all(r["status"] == "ok" for r in states.values()), [
        (r["id"], r.get("error")) for r in states.values() if r["status"] != "ok"
    ]
    oks = [r for r in ledger(out) if r["status"] == "ok"]
    assert len(oks) == count  # never collected twice
    batch_ids = {b.id for b in server._batches.batches.values()}
    for record in oks:
        assert record.pop("via") == "batch" and record.pop("batch_id") in batch_ids
        check_ok_record(out, record)
        assert record["latency_s"] is None
    assert set(answered(server).values()) == {1}, answered(server)
    assert not unsettled(out)
    assert spent(out) == pytest.approx(billed(server), abs=1e-9)


async def test_a_clean_batch_run_costs_half_of_the_same_run_online(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(
        lines(6) + lines(3, prefix="q", model="gpt-image-2.5-flare", quality="medium")
    )
    server = await start_mock(api_key=TEST_KEY, **QUICK)
    summary = await run(manifest, tmp_path / "batch", server, **BATCH)
    assert (summary.ok, summary.failed, summary.pending, summary.exit_code) == (9, 0, 0, 0)
    check_batch_ledger(tmp_path / "batch", server, 9)
    batches = [r for r in server.requests if r.via == "batch"]
    assert len(batches) == 9 and len({r.batch_id for r in batches}) == 2  # one per model
    assert len(batch_uploads(server)) == 2
    online_server = await start_mock(api_key=TEST_KEY)
    online = await run(manifest, tmp_path / "online", online_server)
    assert online.cost_usd > 0 and summary.cost_usd == pytest.approx(online.cost_usd / 2)
    # The state keeps nothing to collect; the input and result files are gone.
    state = BatchState(tmp_path / "batch").load()
    assert not state.live() and all(f.collected for f in state.files.values())
    assert sorted(p.name for p in (tmp_path / "batch" / "batches").iterdir()) == ["state.jsonl"]


async def test_5xx_lines_go_again_in_a_new_batch_and_complete(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(lines(12))
    server = await start_mock(api_key=TEST_KEY, batch_error_rate=0.4, seed=3, **QUICK)
    summary = await run(manifest, tmp_path / "out", server, max_attempts=8, **BATCH)
    assert (summary.ok, summary.failed) == (12, 0)
    check_batch_ledger(tmp_path / "out", server, 12)
    failed = [r for r in server.requests if r.status == 500]
    assert failed  # the draw did hit some lines
    assert len({r.batch_id for r in server.requests}) >= 2
    settled = [r for r in ledger_lines(tmp_path / "out") if r.get("record") == "settled"]
    assert len(settled) == len(failed)  # each 500 line settled as not billed


async def test_an_upload_whose_answer_is_lost_is_found_not_made_twice(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    """The upload times out after the API stored it: the next look finds it by its name."""
    manifest = write_manifest(lines(3))
    server = await start_mock(api_key=TEST_KEY, upload_delay_s=3.0, **QUICK)
    summary = await run(manifest, tmp_path / "out", server, timeout_s=0.5, **BATCH)
    assert summary.ok == 3 and any("Timeout" in w for w in summary.warnings), summary.warnings
    assert len(batch_uploads(server)) == 1
    check_batch_ledger(tmp_path / "out", server, 3)


async def test_the_manifests_warnings_are_said_as_online(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest([*lines(2), *lines(1, prefix="x", model="my-own-model")])
    server = await start_mock(api_key=TEST_KEY, **QUICK)
    summary = await run(manifest, tmp_path / "out", server, **BATCH)
    assert summary.ok == 2
    assert [w for w in summary.warnings if "'my-own-model' has no request rules" in w]


async def test_moderation_fails_its_item_after_one_line_with_the_apis_words(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(
        [*lines(3), {"id": "bad", "prompt": "[[mock:moderation]] no", "model": "gpt-image-2"}]
    )
    server = await start_mock(api_key=TEST_KEY, **QUICK)
    summary = await run(manifest, tmp_path / "out", server, **BATCH)
    assert (summary.ok, summary.failed, summary.exit_code) == (3, 1, 1)
    bad = last_states(tmp_path / "out")["bad"]
    assert bad["error"]["code"] == "moderation_blocked" and bad["error"]["http_status"] == 400
    assert "safety system" in bad["error"]["message"] and bad["cost_usd"] is None
    assert bad["via"] == "batch" and bad["attempts"] == 1
    assert sum(r.prompt == "[[mock:moderation]] no" for r in server.requests) == 1
    assert not unsettled(tmp_path / "out")


async def test_an_expired_batchs_remainder_is_sent_again(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(lines(8))
    server = await start_mock(api_key=TEST_KEY, batch_expire_after_lines=3, **QUICK)
    summary = await run(manifest, tmp_path / "out", server, **BATCH)
    assert (summary.ok, summary.failed) == (8, 0)
    check_batch_ledger(tmp_path / "out", server, 8)
    statuses = [b.status for b in server._batches.batches.values()]
    assert statuses.count("expired") == 2 and statuses.count("completed") == 1  # 3 + 3 + 2


async def test_lines_the_batches_cannot_run_go_online_with_stragglers_online(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(lines(5))
    server = await start_mock(api_key=TEST_KEY, batch_error_rate=1.0, **QUICK)
    summary = await run(manifest, tmp_path / "out", server, stragglers="online", **BATCH)
    assert (summary.ok, summary.failed) == (5, 0)
    oks = [r for r in ledger(tmp_path / "out") if r["status"] == "ok"]
    assert len(oks) == 5 and all("via" not in r for r in oks)  # answered online
    assert [r.via for r in server.requests].count("online") == 5
    assert set(answered(server).values()) == {1}
    assert spent(tmp_path / "out") == pytest.approx(billed(server))


async def test_a_batch_that_fails_validation_says_why_by_line_and_item(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(lines(3))
    server = await start_mock(api_key=TEST_KEY, batch_max_lines=2, **QUICK)  # the file holds 3
    summary = await run(manifest, tmp_path / "out", server, max_attempts=2, **BATCH)
    assert (summary.ok, summary.failed, summary.exit_code) == (0, 3, 1)
    assert any("failed validation" in w and "too_many_tasks" in w for w in summary.warnings)
    states = last_states(tmp_path / "out")
    assert {r["error"]["code"] for r in states.values()} == {"batch_failed"}
    assert not [r for r in server.requests if r.status == 200] and spent(tmp_path / "out") == 0


async def test_files_split_at_the_line_and_byte_limits(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    """The split rule at limits small enough to test; the mock refuses a file over them."""
    long = [{**line, "prompt": line["prompt"] + " with many words" * 8} for line in lines(9)]
    manifest = write_manifest(long + lines(2, prefix="w", model="gpt-image-2.5-flare"))
    server = await start_mock(api_key=TEST_KEY, batch_max_lines=4, batch_max_bytes=1200, **QUICK)
    summary = await run(
        manifest, tmp_path / "out", server, batch_max_lines=4, batch_max_bytes=1200, **BATCH
    )
    assert (summary.ok, summary.failed) == (11, 0)
    uploads = batch_uploads(server)
    assert all(len(f.data) <= 1200 and f.data.count(b"\n") <= 4 for f in uploads)
    assert sum(f.data.count(b"\n") for f in uploads) == 11 and len(uploads) >= 4
    check_batch_ledger(tmp_path / "out", server, 11)


def test_a_manifest_over_200_mb_is_split_at_the_apis_limit(tmp_path: Path) -> None:
    """At the real limits: 6,600 prompts of 32,000 characters (~210 MB of input) make one
    file just under 200 MB and one with the rest. The mock runs in a process of its own (it
    holds the uploads), so this one stays small for the tests that measure their children."""
    manifest = tmp_path / "big.jsonl"
    words = ("a long prompt about a lighthouse at dusk " * 800)[:31_990]
    with open(manifest, "wb") as fh:
        for i in range(6_600):
            line = {"id": f"big{i}", "prompt": f"{i:05d} {words}", "model": "gpt-image-2"}
            fh.write(orjson.dumps(line) + b"\n")
    mock = [
        sys.executable,
        "-m",
        "batchimg",
        "mock",
        "--port",
        "0",
        "--api-key",
        TEST_KEY,
        "--batch-validate",
        "3600",
    ]  # fmt: skip (it never runs a line)
    with subprocess.Popen(mock, stdout=subprocess.PIPE, text=True, cwd=ROOT) as server:
        try:
            assert server.stdout is not None
            base_url = server.stdout.readline().strip()
            env = {"BATCHIMG_API_KEY": TEST_KEY}
            result = run_cli("run", str(manifest), "--out", str(tmp_path / "out"), "--base-url",
                             base_url, "--batch-api", "--no-wait", "--quiet", env=env)  # fmt: skip
            assert result.returncode == 75, result.stderr
            auth = {"Authorization": f"Bearer {TEST_KEY}"}
            listed = get_json(f"{base_url}/files?purpose=batch", auth)["data"]
            sizes = sorted(f["bytes"] for f in listed)
            lines_in = [count_lines(f"{base_url}/files/{f['id']}/content", auth) for f in listed]
            batches = get_json(f"{base_url}/batches", auth)["data"]
        finally:
            server.terminate()
    assert len(sizes) == 2 and sizes[1] <= 200 * 2**20 < sizes[1] + 33_000
    assert sum(lines_in) == 6_600 and len(batches) == 2


def get_json(url: str, headers: dict[str, str]) -> Any:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as response:
        return orjson.loads(response.read())


def count_lines(url: str, headers: dict[str, str]) -> int:
    """Lines of a file served at `url`, read in chunks (never whole)."""
    count = 0
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as response:
        while chunk := response.read(1 << 20):
            count += chunk.count(b"\n")
    return count


async def test_the_cap_holds_at_the_mock_over_runs(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(lines(30, model="gpt-image-2.5-flare", quality="medium"))
    server = await start_mock(api_key=TEST_KEY, **QUICK)
    cap = 0.15  # one line at the catalog's ceiling; many once their cost is learned
    first = await run(manifest, tmp_path / "out", server, max_cost_usd=cap, **BATCH)
    assert first.exit_code == 3 and "budget" in (first.stop_reason or "")
    assert 2 < first.ok < 30 and billed(server) <= cap
    assert len(server._batches.batches) >= 2
    again = await run(manifest, tmp_path / "out", server, max_cost_usd=cap, **BATCH)
    assert billed(server) <= cap and spent(tmp_path / "out") <= cap + 1e-9
    assert again.ok + first.ok <= 30 and set(answered(server).values()) == {1}


async def test_edits_send_each_input_once_by_file_id_across_lines_and_runs(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    a, b, c = (make_image(tmp_path / f"{n}.png", size=(s, s)) for n, s in (("a", 64), ("b", 48),
                                                                          ("c", 32)))  # fmt: skip
    make_image(tmp_path / "c2.png", size=(32, 32))  # the same bytes as c.png: one upload
    mask = make_mask(tmp_path / "m.png")
    edit = {"model": "gpt-image-2", "image": ["a.png", "b.png", "c.png"], "mask": "m.png"}
    first = write_manifest([{"id": "e1", "prompt": "edit one", **edit},
                            {"id": "e2", "prompt": "edit two", **edit}])  # fmt: skip
    server = await start_mock(api_key=TEST_KEY, **QUICK)
    summary = await run(first, tmp_path / "out", server, **BATCH)
    assert (summary.ok, summary.failed) == (2, 0)
    inputs = [f for f in server.uploaded_files.values() if f.purpose != "batch"]
    digests = sorted(hashlib.sha256(f.data).hexdigest() for f in inputs)
    assert digests == sorted({sha(a), sha(b), sha(c), sha(mask)})
    lines_sent = [r for r in server.requests if r.via == "batch"]
    assert all(r.image_count == 3 and r.has_mask for r in lines_sent)
    second = write_manifest(
        [{"id": "e3", "prompt": "edit three", **edit, "image": ["a.png", "c2.png", "b.png"]}],
        name="more.jsonl",
    )
    await run(second, tmp_path / "out", server, **BATCH)
    inputs = [f for f in server.uploaded_files.values() if f.purpose != "batch"]
    assert len(inputs) == 4 and {f.content_type for f in inputs} == {"image/png"}
    records = ledger(tmp_path / "out")
    assert all(r["status"] == "ok" and r["endpoint"] == "edits" for r in records)
    assert records[0]["mask"]["sha256"] == sha(mask)


async def test_a_refused_key_stops_the_run_and_loses_nothing(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(lines(3))
    server = await start_mock(api_key=TEST_KEY, **QUICK)
    options = batchimg.RunOptions(base_url=server.base_url, api_key="sk-not-this-key", **BATCH)
    summary = await batchimg.arun(manifest, tmp_path / "out", options)
    assert summary.exit_code == 3 and "401" in (summary.stop_reason or "")
    assert not server.uploaded_files and not server.requests
    again = await run(manifest, tmp_path / "out", server, **BATCH)  # the right key
    assert again.ok == 3 and again.exit_code == 0
    check_batch_ledger(tmp_path / "out", server, 3)


async def test_estimate_puts_the_batch_cost_beside_the_online_one(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    """Learned from an online sample, the batch column predicts what batches then cost."""
    sample = write_manifest(lines(4, prefix="s"), name="sample.jsonl")
    await run(sample, tmp_path / "sample", await start_mock(api_key=TEST_KEY))
    manifest = write_manifest(lines(10))
    result = estimate_manifest(manifest, ledgers=[tmp_path / "sample"])
    assert result.batch_cost_usd == pytest.approx(result.total_cost_usd / 2)
    server = await start_mock(api_key=TEST_KEY, **QUICK)
    await run(manifest, tmp_path / "out", server, **BATCH)
    assert billed(server) == pytest.approx(result.batch_cost_usd, rel=0.02)
    shown = run_cli("estimate", str(manifest), "--from-ledger", str(tmp_path / "sample"))
    assert shown.returncode == 0 and "batch cost" in shown.stdout
    assert f"${result.batch_cost_usd:,.4f}" in shown.stdout.splitlines()[-3]


async def submitted(manifest: Path, out: Path, server: MockServer, **options: Any) -> None:
    """`--no-wait` against a mock that outlives it: the batches made, then finished."""
    summary = await run(manifest, out, server, no_wait=True, **BATCH, **options)
    assert summary.exit_code == 75, summary
    while not all(b.status in ("completed", "expired") for b in server._batches.batches.values()):
        await anyio.sleep(0.02)


async def test_answers_are_recorded_as_sent_whatever_the_manifest_says_by_then(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    """The manifest changes while its batch runs (a model, a prompt, an item gone, another
    manifest run on the directory): each answer is recorded and priced as what was sent, and
    nothing is paid for twice."""
    out = tmp_path / "out"
    server = await start_mock(api_key=TEST_KEY, **QUICK)
    sent = lines(4, model="gpt-image-2.5-flare", quality="medium")
    await submitted(write_manifest(sent), out, server, max_cost_usd=0.5)
    changed = [{**x, "model": "gpt-image-2", "quality": "low"} for x in sent[:2]]
    changed[1]["prompt"] = "a completely different prompt"
    other = write_manifest([*changed, *lines(2, prefix="new")], name="other.jsonl")
    summary = await run(other, out, server, max_cost_usd=0.5, **BATCH)
    assert summary.ok == 6 and summary.exit_code == 0  # b2, b3 (no longer listed) included
    states = last_states(out)
    for record in sent:
        got = states[record["id"]]
        assert (got["model"], got["quality"], got["prompt"]) == (
            record["model"], record["quality"], record["prompt"]
        )  # fmt: skip
    assert set(answered(server).values()) == {1}
    assert spent(out) == pytest.approx(billed(server)) and billed(server) <= 0.5
    assert not unsettled(out)


async def test_an_online_run_leaves_items_in_live_batches_alone(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    out = tmp_path / "out"
    server = await start_mock(api_key=TEST_KEY, batch_validate_s=30.0)  # still running
    manifest = write_manifest(lines(3))
    assert (await run(manifest, out, server, no_wait=True, **BATCH)).exit_code == 75
    online = await run(write_manifest([*lines(3), *lines(1, prefix="x")]), out, server)
    assert (online.ok, online.pending, online.exit_code) == (1, 3, 75)
    assert any("batches still running" in w for w in online.warnings)
    assert [r.prompt for r in server.requests] == ["a batch test x0"]


async def test_a_result_file_gone_at_the_api_ends_the_run_and_costs_its_bound(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path], http: Any
) -> None:
    out = tmp_path / "out"
    server = await start_mock(api_key=TEST_KEY, **QUICK)
    manifest = write_manifest(lines(3))
    await submitted(manifest, out, server)
    (batch,) = server._batches.batches.values()
    url = f"{server.base_url}/files/{batch.output_file_id}"
    async with http.delete(url, headers={"Authorization": f"Bearer {TEST_KEY}"}) as resp:
        assert resp.status == 200
    summary = await run(manifest, out, server, poll_interval_s=5.0, batch_api=True)
    assert (summary.ok, summary.failed, summary.exit_code) == (0, 3, 1)  # no wait: nothing live
    assert any("cannot be had" in w for w in summary.warnings)
    states = last_states(out)
    assert {r["error"]["code"] for r in states.values()} == {"missing_from_batch"}
    assert spent(out) >= billed(server)  # billed, lost: counted at the bound
    again = await run(manifest, out, server, **BATCH)
    assert again.ok == 3


async def test_a_damaged_batch_state_is_refused_before_anything_is_sent(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    out = tmp_path / "out"
    server = await start_mock(api_key=TEST_KEY, batch_validate_s=30.0)
    manifest = write_manifest(lines(3))
    await run(manifest, out, server, no_wait=True, **BATCH)
    (out / "batches" / "state.jsonl").unlink()
    before = len(server.requests), len(server.uploaded_files)
    for options in (BATCH, {}):  # a batch run, and an online one
        with pytest.raises(batchimg.UsageError, match="damaged or deleted"):
            await run(manifest, out, server, **options)
    assert (len(server.requests), len(server.uploaded_files)) == before


async def test_a_collection_cut_short_does_not_record_an_answer_twice(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    """Killed after some lines were written, before the batch was marked collected: the
    re-run reads the whole file again, and writes no second line for what it has."""
    out = tmp_path / "out"
    server = await start_mock(api_key=TEST_KEY, **QUICK)
    bad = {"id": "bad", "prompt": "[[mock:corrupt]] broken", "model": "gpt-image-2"}
    manifest = write_manifest([*lines(3), bad])
    await submitted(manifest, out, server)
    kept = {p.name: p.read_bytes() for p in (out / "batches").iterdir() if p.name != "state.jsonl"}
    await run(manifest, out, server, **BATCH)  # collects everything
    state = out / "batches" / "state.jsonl"
    events = state.read_bytes().splitlines(keepends=True)
    state.write_bytes(b"".join(e for e in events if b'"collected"' not in e))
    for name, data in kept.items():  # as the killed run left them
        (out / "batches" / name).write_bytes(data)
    (first,) = server._batches.batches
    summary = await run(manifest, out, server, **BATCH)
    assert summary.ok == 0 and summary.failed == 1  # only "bad", tried again in a new batch
    assert [(r["id"], r["batch_id"]) for r in ledger(out)].count(("bad", first)) == 1
    assert spent(out) == pytest.approx(billed(server))


async def test_a_full_disk_mid_collection_keeps_the_rest_for_the_next_run(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    """The disk fills up after 5 images of a 20-line batch: the run stops (exit 3), the
    result file is kept, and the next run collects the rest without sending anything again."""
    out = tmp_path / "out"
    server = await start_mock(api_key=TEST_KEY, **QUICK)
    manifest = write_manifest(lines(20))
    await submitted(manifest, out, server)
    options = batchimg.RunOptions(base_url=server.base_url, api_key=TEST_KEY, **BATCH)
    summary = await batchimg.arun(manifest, out, options, store=FullDisk(out, room=5))
    assert summary.exit_code == 3 and "No space left" in (summary.stop_reason or "")
    assert 5 <= summary.ok < 20 and summary.failed == 0, summary.failures
    assert list((out / "batches").glob("*.output.jsonl"))  # kept for the next run
    again = await run(manifest, out, server, **BATCH)
    assert again.exit_code == 0 and summary.ok + again.ok == 20
    check_batch_ledger(out, server, 20)
    assert len(server._batches.batches) == 1


async def test_stragglers_go_online_from_the_first_look_of_a_cron_run(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path]
) -> None:
    out = tmp_path / "out"
    server = await start_mock(api_key=TEST_KEY, batch_expire_after_lines=2, **QUICK)
    manifest = write_manifest(lines(6))
    await submitted(manifest, out, server)
    summary = await run(manifest, out, server, no_wait=True, stragglers="online", **BATCH)
    assert (summary.ok, summary.exit_code) == (6, 0)
    assert [r.via for r in server.requests].count("online") == 4  # the expired remainder
    assert len(server._batches.batches) == 1
    assert spent(out) == pytest.approx(billed(server)) and not unsettled(out)


async def test_an_edit_input_gone_at_the_api_is_uploaded_again(
    tmp_path: Path, start_mock: StartMock, write_manifest: Callable[..., Path], http: Any
) -> None:
    make_image(tmp_path / "a.png")
    out = tmp_path / "out"
    server = await start_mock(api_key=TEST_KEY, **QUICK)
    edit = {"model": "gpt-image-2", "image": "a.png"}
    await run(write_manifest([{"id": "e1", "prompt": "one", **edit}]), out, server, **BATCH)
    (uploaded,) = [f for f in server.uploaded_files.values() if f.purpose != "batch"]
    url = f"{server.base_url}/files/{uploaded.id}"
    async with http.delete(url, headers={"Authorization": f"Bearer {TEST_KEY}"}) as resp:
        assert resp.status == 200
    more = write_manifest([{"id": "e2", "prompt": "two", **edit}], name="more.jsonl")
    summary = await run(more, out, server, **BATCH)
    assert summary.ok == 1
    assert len([f for f in server.uploaded_files.values() if f.purpose != "batch"]) == 2


# -- the CLI, killed and re-run --


def cli(manifest: Path, out: Path, server: MockServer, *extra: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "batchimg", "run", str(manifest), "--out", str(out), "--base-url",
            server.base_url, "--batch-api", "--poll-interval", "0.05", *extra]  # fmt: skip
    env = {**os.environ, "BATCHIMG_API_KEY": TEST_KEY}
    return subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def rerun(manifest: Path, out: Path, server: MockServer, *extra: str) -> tuple[int, str]:
    proc = cli(manifest, out, server, *extra)
    try:
        _, err = proc.communicate(timeout=50)
    finally:
        proc.kill()
        proc.communicate()
    return proc.returncode, err


def state_events(out: Path) -> list[str]:
    path = out / "batches" / "state.jsonl"
    if not path.exists():
        return []
    return [
        orjson.loads(x).get("event") for x in path.read_bytes().splitlines() if x.endswith(b"}")
    ]


KILL_POINTS = {
    # an input file written and being uploaded: the mock has it, the run does not know
    "uploading": ({"upload_delay_s": 60.0}, lambda s, out: bool(batch_uploads(s))),
    # the batch made, its answer not yet read
    "creating": ({"batch_create_delay_s": 60.0}, lambda s, out: bool(s._batches.batches)),
    # the batch running, the run polling it
    "polling": (
        {"batch_line_s": 0.1},
        lambda s, out: "status" in state_events(out) and not s.requests,
    ),
    # the output file half downloaded
    "collecting": (
        {"content_stall_s": 60.0},
        lambda s, out: any((out / "batches").glob("*.output.jsonl.part")),
    ),
}


@pytest.mark.parametrize("stage", list(KILL_POINTS))
def test_kill_9_at_each_stage_then_rerun_pays_once_submits_once_uploads_once(
    tmp_path: Path, write_manifest: Callable[..., Path], stage: str
) -> None:
    config, reached = KILL_POINTS[stage]
    manifest = write_manifest(lines(6))
    out = tmp_path / "out"
    with threaded_mock(MockConfig(api_key=TEST_KEY, **QUICK, **config)) as server:
        proc = cli(manifest, out, server)
        try:
            wait_for(lambda: reached(server, out) or proc.poll() is not None)
        finally:
            proc.kill()
            proc.communicate()
        assert proc.returncode == -signal.SIGKILL, stage  # killed where meant, not done
        if stage == "creating":  # made at the API, never recorded: `batch status` finds it
            env = {"BATCHIMG_API_KEY": TEST_KEY}
            shown = run_cli("batch", "status", str(out), "--base-url", server.base_url, env=env)
            (made,) = server._batches.batches
            assert shown.returncode == 75 and made in shown.stdout, shown.stdout
        code, err = rerun(manifest, out, server)
        assert code == 0, err
        check_batch_ledger(out, server, 6)
        assert len(batch_uploads(server)) == 1  # found again, not uploaded twice
        assert len(server._batches.batches) == 1


def test_a_rerun_counts_a_killed_runs_lines_once_under_the_cap(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    """Killed while uploading its first file (its lines in the ledger): the re-run announces
    them again only if the ledger lacks them, so under a cap that fits every item once it
    sends the rest instead of stopping for money it has not spent."""
    both = [*lines(5), *lines(5, prefix="s", model="gpt-image-2.5-sunburst")]  # two files
    manifest = write_manifest(both)
    out = tmp_path / "out"
    config = MockConfig(api_key=TEST_KEY, upload_delay_s=60.0, **QUICK)
    with threaded_mock(config) as server:
        proc = cli(manifest, out, server, "--max-cost", "100")
        try:
            wait_for(lambda: bool(batch_uploads(server)) or proc.poll() is not None)
        finally:
            proc.kill()
            proc.communicate()
        assert len([r for r in ledger_lines(out) if r.get("record") == "sent"]) == 5
        table = PriceTable.default().batch()
        worst = sum(table.worst_case_usd({k: v for k, v in x.items() if k != "id"}) or 0
                    for x in both)  # fmt: skip
        cap = f"{worst * 1.05:.6f}"  # every item once, with a little room
        code, err = rerun(manifest, out, server, "--max-cost", cap, "--no-wait")
        assert code == 75, err  # all ten sent at once: none held back for the cap
        assert len(server._batches.batches) == 2
        code, err = rerun(manifest, out, server, "--max-cost", cap)
        assert code == 0, err
        check_batch_ledger(out, server, 10)


def test_no_wait_exits_75_while_pending_then_0_and_status_and_ctrl_c(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(lines(4))
    out = tmp_path / "out"
    # Lines slow enough (10 s for the batch) that the batch outlives every check below.
    with threaded_mock(MockConfig(api_key=TEST_KEY, batch_line_s=2.5, **QUICK)) as server:
        code, err = rerun(manifest, out, server, "--no-wait")
        assert code == 75, err
        assert "run the same command again" in err and "still running" in err
        env = {"BATCHIMG_API_KEY": TEST_KEY}
        status = run_cli("batch", "status", str(out), "--base-url", server.base_url, env=env)
        assert status.returncode == 75 and "now" in status.stdout, status.stderr
        offline = run_cli("batch", "status", str(out))
        assert offline.returncode == 75 and "last run" in offline.stdout
        # Two runs on one directory stay refused, even while the first only waits.
        waiting = cli(manifest, out, server)
        try:
            seen = len(state_events(out))  # the waiting run records what it sees
            wait_for(lambda: len(state_events(out)) > seen or waiting.poll() is not None)
            assert waiting.poll() is None  # waiting on the batch
            second = run_cli("run", str(manifest), "--out", str(out), "--batch-api",
                             "--base-url", server.base_url, env=env)  # fmt: skip
            assert second.returncode == 2 and "another batchimg run" in second.stderr
            waiting.send_signal(signal.SIGINT)  # the first Ctrl-C stops waiting
            _, err = waiting.communicate(timeout=60)
        finally:
            waiting.kill()
            waiting.communicate()
        assert waiting.returncode == 130 and "run the same command again" in err
        wait_for(lambda: all(b.status == "completed" for b in server._batches.batches.values()))
        code, err = rerun(manifest, out, server, "--no-wait")
        assert code == 0, err
        check_batch_ledger(out, server, 4)
        done = run_cli("batch", "status", str(out), "--base-url", server.base_url, env=env)
        assert done.returncode == 0 and "no live batches" in done.stdout


def test_cancel_stops_the_batches_and_a_rerun_sends_the_rest(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(lines(6))
    out = tmp_path / "out"
    env = {"BATCHIMG_API_KEY": TEST_KEY}
    with threaded_mock(MockConfig(api_key=TEST_KEY, batch_line_s=1.0, **QUICK)) as server:
        assert rerun(manifest, out, server, "--no-wait")[0] == 75
        cancelled = run_cli("batch", "cancel", str(out), "--base-url", server.base_url, env=env)
        assert cancelled.returncode == 0 and "cancelling" in cancelled.stdout, cancelled.stderr
        wait_for(lambda: all(b.status == "cancelled" for b in server._batches.batches.values()))
        code, err = rerun(manifest, out, server)
        assert code == 0, err
        check_batch_ledger(out, server, 6)
        assert len(server._batches.batches) == 2
        # A batch that finished since the last look: nothing to cancel, and no error.
        more = write_manifest(lines(2, prefix="z"), name="z.jsonl")
        assert rerun(more, out, server, "--no-wait")[0] == 75
        wait_for(lambda: [*server._batches.batches.values()][-1].status == "completed")
        finished = run_cli("batch", "cancel", str(out), "--base-url", server.base_url, env=env)
        assert finished.returncode == 0 and "completed" in finished.stdout, finished.stderr


def test_collecting_a_large_output_file_keeps_memory_flat(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    """The output file is streamed to disk and read a line at a time: the collecting run's
    peak memory does not grow from 30 photo-sized answers to 90 (~290 MB of output). The mock
    runs in a process of its own, and the run is measured through `MEASURED` (a child's peak
    counts its parent's memory at the fork)."""
    peak: dict[int, float] = {}
    auth = {"Authorization": f"Bearer {TEST_KEY}"}
    mock = [sys.executable, "-m", "batchimg", "mock", "--port", "0", "--api-key", TEST_KEY,
            "--batch-validate", "0", "--batch-finalize", "0", "--detailed-images"]  # fmt: skip
    with subprocess.Popen(mock, stdout=subprocess.PIPE, text=True, cwd=ROOT) as server:
        try:
            assert server.stdout is not None
            base_url = server.stdout.readline().strip()
            env = {**os.environ, "BATCHIMG_API_KEY": TEST_KEY}
            for count in (30, 90):
                manifest = write_manifest(lines(count, prefix=f"p{count}-"), name=f"{count}.jsonl")
                out = tmp_path / f"out{count}"
                args = [sys.executable, "-m", "batchimg", "run", str(manifest), "--out", str(out),
                        "--base-url", base_url, "--batch-api", "--no-wait", "--quiet"]  # fmt: skip
                assert subprocess.run(args, env=env, capture_output=True).returncode == 75
                wait_for(
                    lambda: all(b["status"] == "completed"
                                for b in get_json(f"{base_url}/batches", auth)["data"]),
                    timeout_s=300,
                )  # fmt: skip
                done = subprocess.run([sys.executable, "-c", MEASURED, *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      cwd=ROOT, text=True)  # fmt: skip
                assert done.returncode == 0
                peak[count] = int(done.stdout.split()[-1]) / 1024  # MiB
                assert len(last_states(out)) == count
            outputs = get_json(f"{base_url}/files?purpose=batch_output", auth)["data"]
            biggest = max(f["bytes"] for f in outputs) / 2**20
        finally:
            server.terminate()
    assert biggest > 250
    assert peak[90] - peak[30] < 20, peak  # not the ~190 MB more the file holds
    assert peak[90] < biggest, (peak, biggest)  # never the whole file


def test_usage_errors_before_anything_is_sent(write_manifest: Callable[..., Path]) -> None:
    manifest = write_manifest(lines(1))
    for args, words in [
        (["--mock", "--batch-api", "--no-wait"], "outlives the run"),
        (["--mock", "--no-wait"], "needs --batch-api"),
        (["--provider", "azure", "--base-url", "https://x.openai.azure.com", "--batch-api"],
         "Batch API"),
    ]:  # fmt: skip
        env = {"AZURE_OPENAI_API_KEY": "k" * 20}
        result = run_cli("run", str(manifest), "--out", str(manifest.parent / "o"), *args, env=env)
        assert result.returncode == 2 and words in result.stderr, result.stderr
