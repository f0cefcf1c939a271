"""Money across runs and against broken answers: every attempt that may have been billed is on
the ledger with its known or worst-case cost, the cap is over the whole output directory, and
usage that is not token counts is an unknown cost, never a negative or absurd one.

What "billed" means here is what the mock charged: its own usage for every 200 it sent (also
those it then cut off), priced at the catalog's prices (`billed_usd`).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchimg.mock import MockConfig, MockServer
from batchimg.pricing import PriceTable
from batchimg.report import build_report, read_backwards
from tests.conftest import TEST_KEY
from tests.helpers import (
    ROOT,
    charges,
    ledger,
    ledger_lines,
    spent,
    start_cli,
    threaded_mock,
    unsettled,
    wait_for,
)
from tests.helpers import (
    run_on_mock as run,
)


def billed_usd(server: MockServer) -> float:
    table = PriceTable.default()
    total = 0.0
    for request in server.requests:
        if request.status == 200 and request.usage is not None:
            cost = table.request_cost({**request.params, "model": request.model}, request.usage)
            assert cost is not None
            total += cost
    return total


def lines(count: int, **fields: Any) -> list[dict[str, Any]]:
    return [{"id": f"m{i}", "prompt": f"a money test {i}", "model": "gpt-image-1",
             "quality": "medium", **fields} for i in range(count)]  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        {"truncate_rate": 0.5},  # answers billed, then cut off half way
        {"omit_usage": True},  # a gateway that sends no usage
        {"drop_rate": 0.3, "truncate_rate": 0.3},
    ],
    ids=["truncated", "no-usage", "dropped-and-truncated"],
)
async def test_three_reruns_with_one_cap_stay_within_it(
    tmp_path: Path, write_manifest: Callable[..., Path], config: dict[str, Any]
) -> None:
    manifest = write_manifest(lines(40))
    out, cap, billed = tmp_path / "out", 0.5, 0.0
    for seed in range(3):
        async with MockServer(MockConfig(api_key=TEST_KEY, seed=seed, **config)) as server:
            summary = await run(manifest, out, server, concurrency=6, max_cost_usd=cap)
            billed += billed_usd(server)
        assert summary.exit_code == 3
    assert billed <= cap  # over all three runs, what the mock charged
    assert spent(out) <= cap + 1e-9  # and the ledger counts at least as much as that ...
    assert spent(out) >= billed - 1e-9  # ... never less: every billed answer is on it
    report = build_report([out]).as_json()
    assert report["total_cost_usd"] + report["unknown_cost_bound_usd"] == pytest.approx(spent(out))


async def test_each_billed_attempt_is_recorded_not_only_each_item(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(lines(20))
    async with MockServer(MockConfig(api_key=TEST_KEY, truncate_rate=0.5, seed=3)) as server:
        summary = await run(manifest, tmp_path / "out", server, concurrency=4)
        cut_off = [r for r in server.requests if r.fault == "truncate"]
    assert summary.exit_code == 0 and cut_off
    records = charges(tmp_path / "out")
    assert len(records) == len(cut_off)  # one charge record per answer cut off and retried
    for record in records:
        assert record["cost_usd"] is None and record["cost_bound_usd"] > 0
        assert "may have been billed" in record["cost_note"]
        assert record["error"]["code"] in ("connection_error", "bad_response", "timeout")
    assert {r["id"] for r in ledger(tmp_path / "out")} == {f"m{i}" for i in range(20)}
    # Each line says who wrote it and which attempt it is: a charge and its item never clash.
    keys = [(r["run_id"], r["id"], r.get("attempt", r.get("attempts"))) for r in
            ledger_lines(tmp_path / "out") if r.get("record") in (None, "charge")]  # fmt: skip
    assert len(keys) == len(set(keys))
    assert summary.unknown_costs == len(records)


@pytest.mark.parametrize(
    "usage",
    ["lots", [1, 2], {"output_tokens": -100_000_000}, {"output_tokens": 10**18},
     {"output_tokens": "5", "input_tokens": 3}, {"output_tokens": 1.5}, {"output_tokens": True},
     {"output_tokens": 10, "input_tokens_details": "x"}],
    ids=["string", "list", "negative", "huge", "string-count", "float", "bool", "bad-details"],
)  # fmt: skip
async def test_usage_that_is_not_token_counts_is_an_unknown_cost_never_a_made_up_one(
    tmp_path: Path, write_manifest: Callable[..., Path], usage: Any
) -> None:
    manifest = write_manifest(lines(12))
    cap = 0.2
    async with MockServer(MockConfig(api_key=TEST_KEY, fake_usage=usage)) as server:
        summary = await run(manifest, tmp_path / "out", server, concurrency=4, max_cost_usd=cap)
        billed = billed_usd(server)
    assert billed <= cap  # the bound was counted for every answer, so the cap held
    records = ledger(tmp_path / "out")
    assert records and all(r["status"] == "ok" for r in records)  # the images are kept
    for record in records:
        assert record["usage"] == usage  # verbatim, as the API sent it
        assert record["cost_usd"] is None and record["cost_bound_usd"] > 0
        assert "usage" in record["cost_note"]
    assert summary.cost_usd == 0 and summary.output_tokens == 0  # nothing made up
    assert summary.unknown_costs == len(records)
    assert any("usage cannot be read" in w for w in summary.warnings)
    report = build_report([tmp_path / "out"]).as_json()  # does not crash, skips and counts
    assert report["total_cost_usd"] == 0 and report["output_tokens"] == 0
    assert report["unknown_cost_answers"] == len(records)
    assert report["unknown_cost_bound_usd"] == pytest.approx(spent(tmp_path / "out"))
    table = subprocess.run(
        [sys.executable, "-m", "batchimg", "report", str(tmp_path / "out"), "--prices",
         str(write_prices(tmp_path))], capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "at a cost nobody can tell" in table.stdout


def write_prices(tmp_path: Path) -> Path:
    path = tmp_path / "p.json"
    rates = {"per_1m_tokens": {"text_in": 1, "image_out": 2}}
    path.write_text(json.dumps({"models": {"gpt-image-1": rates}}))
    return path


async def test_report_bills_by_the_ledgers_identity_not_a_gateways_request_id(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(lines(8))
    async with MockServer(MockConfig(api_key=TEST_KEY, fixed_request_id="req_same")) as server:
        await run(manifest, tmp_path / "out", server)
        billed = billed_usd(server)
    assert {r["request_id"] for r in ledger(tmp_path / "out")} == {"req_same"}
    once = build_report([tmp_path / "out"]).as_json()
    assert once["total_cost_usd"] == pytest.approx(billed)  # not an eighth of it
    twice = build_report([tmp_path / "out", tmp_path / "out" / "ledger.jsonl"]).as_json()
    assert twice["total_cost_usd"] == pytest.approx(billed)  # a ledger given twice: once


@pytest.mark.parametrize(
    "content",
    [b'{"id": "torn", "status": "o', b"x" * 200_000, b'{"id": "a"}\n' + b"y" * 200_000, b""],
    ids=["only-a-torn-line", "huge-torn-line", "huge-torn-tail", "empty"],
)
def test_report_reads_ledgers_that_end_torn(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(content)
    expected = [{"id": "a"}] if content.startswith(b'{"id": "a"}\n') else []
    assert list(read_backwards(path, block_size=1000)) == expected
    assert build_report([path]).as_json()["items"] == len(expected)


def test_report_survives_odd_lines(tmp_path: Path) -> None:
    odd = [
        {"id": "a", "status": "ok", "files": "notalist", "frame_count": [9], "n": "two",
         "model": "dall-e-3", "usage": [1, 2], "cost_usd": -5, "latency_s": "slow"},
        {"id": "b", "status": "ok", "files": ["x.png"], "cost_usd": "0.5",
         "usage": {"output_tokens": 10}, "model": "gpt-image-1"},
    ]  # fmt: skip
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in odd))
    prices = write_prices(tmp_path)
    for extra in ([], ["--prices", str(prices)]):
        result = subprocess.run(
            [sys.executable, "-m", "batchimg", "report", str(path), "--by",
             "complexity,frame_count,model", "--format", "json", *extra],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert data["items"] == 2 and data["images"] == 1  # a string is not a list of files
        assert data["unreadable_usage"] == 1
        # repriced: dall-e-3 per image ($0.04 standard 1024x1024), "b" from its usage
        assert data["total_cost_usd"] == (pytest.approx(0.04 + 10 * 2 / 1e6) if extra else 0)


async def test_the_cap_counts_what_earlier_runs_only_bounded(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    """A run without a cap records its unknown costs' bounds; a later capped run counts them."""
    manifest = write_manifest(lines(10))
    out = tmp_path / "out"
    async with MockServer(MockConfig(api_key=TEST_KEY, omit_usage=True)) as server:
        first = await run(manifest, out, server)
    assert first.exit_code == 0 and first.cost_bound_usd > 0
    more = write_manifest(lines(30), name="more.jsonl")
    async with MockServer(MockConfig(api_key=TEST_KEY)) as server:
        cap = first.cost_bound_usd + 0.1
        second = await run(more, out, server, max_cost_usd=cap)
        billed_second = billed_usd(server)
    assert second.spent_total_usd <= cap + 1e-9
    assert billed_second <= 0.1 + 1e-9  # only the money the earlier bounds left


def test_the_cap_holds_across_kill_9_with_requests_in_flight(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    """A request is on the ledger (a `sent` line, with its bound) before it goes: a run killed
    with requests in flight leaves them counted, so the next runs cannot spend the cap again."""
    manifest = write_manifest(lines(40, quality="low"))
    out, cap = tmp_path / "out", 0.25
    flags = ("--max-cost", str(cap), "--concurrency", "8", "--quiet")
    with threaded_mock(MockConfig(api_key=TEST_KEY, latency_s=0.5)) as server:
        kills = 0
        for _ in range(3):
            before = len(server.requests)
            with start_cli(manifest, out, server, *flags) as proc:
                # Killed with requests in flight, unless the cap already stops it from sending.
                sending = lambda: server.in_flight >= 1 and len(server.requests) > before  # noqa: B023, E731
                wait_for(lambda: sending() or proc.poll() is not None)  # noqa: B023
                proc.kill()
                proc.communicate()
            kills += proc.returncode == -signal.SIGKILL
        assert kills >= 2
        with start_cli(manifest, out, server, *flags) as proc:
            _, stderr = proc.communicate(timeout=120)
        assert proc.returncode in (0, 3), stderr
        wait_for(lambda: server.in_flight == 0)  # the killed runs' requests, answered and billed
        assert billed_usd(server) <= cap + 1e-9
        assert unsettled(out)  # the killed runs' requests in flight, counted at their bounds
        assert spent(out) >= billed_usd(server) - 1e-9


async def test_a_learned_bound_that_proves_too_low_is_exceeded_by_one_answer_at_most(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    """Counts learned from another run (`--from-ledger`) that are far too low: this run's first
    request of the kind goes alone, and its answer corrects the bound for the rest."""
    sample, out = tmp_path / "sample", tmp_path / "out"
    item = {"model": "gpt-image-2", "size": "1024x1024", "quality": "medium"}
    small = {"input_tokens": 10, "output_tokens": 500, "total_tokens": 510,
             "input_tokens_details": {"text_tokens": 10, "image_tokens": 0}}  # fmt: skip
    async with MockServer(MockConfig(api_key=TEST_KEY, fake_usage=small)) as server:
        await run(write_manifest([{"id": "s", "prompt": "a sample", **item}], "s.jsonl"), sample,
                  server)  # fmt: skip
    manifest = write_manifest(
        [{"id": f"i{i}", "prompt": f"the job {i}", **item} for i in range(30)]
    )
    cap = 0.3
    async with MockServer(MockConfig(api_key=TEST_KEY)) as server:
        summary = await run(manifest, out, server, concurrency=8, max_cost_usd=cap,
                            from_ledger=(sample,))  # fmt: skip
        answers = [r for r in server.requests if r.status == 200]
        billed = billed_usd(server)
    one_answer = billed / len(answers)
    assert summary.exit_code == 3 and len(answers) > 1
    assert answers[0].usage["output_tokens"] > 2 * 500  # the sample was far too low
    assert billed <= cap + one_answer  # not eight requests' excess: one answer's at most


@pytest.mark.parametrize(
    "usage",
    [
        {"input_tokens": 10, "output_tokens": 9_999_999},  # under any fixed limit, absurd here
        {
            "input_tokens": 9_999_999,
            "output_tokens": 272,
            "input_tokens_details": {"text_tokens": 10, "image_tokens": 9_999_989},
        },
    ],
    ids=["output", "input"],
)
async def test_usage_beyond_what_the_request_can_use_is_not_believed(
    tmp_path: Path, write_manifest: Callable[..., Path], usage: dict[str, Any]
) -> None:
    manifest = write_manifest(lines(3, quality="low", size="1024x1024"))
    out = tmp_path / "out"
    async with MockServer(MockConfig(api_key=TEST_KEY, fake_usage=usage)) as server:
        summary = await run(manifest, out, server)
    assert summary.ok == 3 and summary.unknown_costs == 3
    for record in ledger(out):
        assert record["cost_usd"] is None and "not believed" in record["cost_note"]
        assert 0 < record["cost_bound_usd"] < 0.1  # the request's worst case, not $300
    async with MockServer(MockConfig(api_key=TEST_KEY)) as server:  # an honest server
        again = await run(write_manifest(lines(6, quality="low"), "more.jsonl"), out, server,
                          max_cost_usd=1.0)  # fmt: skip
    # The directory is not blocked by a claim nobody could be billed: the rest is made.
    assert (again.ok, again.skipped, again.exit_code) == (3, 3, 0)
