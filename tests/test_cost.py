"""Cost: estimates against what the mock bills, the budget cap, price overrides, reports."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

import batchimg
from batchimg.cli import format_summary
from batchimg.estimate import estimate_manifest
from batchimg.mock import MockConfig, MockServer
from batchimg.pricing import LEARNED_MARGIN, PRICE_TABLE, PriceTable
from batchimg.report import build_report, format_csv, read_backwards
from tests.conftest import TEST_KEY
from tests.helpers import ledger
from tests.helpers import run_on_mock as run

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"


def billed_usd(server: MockServer) -> float:
    """What the mock charged, priced with the built-in table (the mock's own bill)."""
    table = PriceTable.default()
    total = 0.0
    for request in server.requests:
        if request.status == 200:
            params = {**request.params, "model": request.model, "n": request.n or 1}
            cost = table.request_cost(params, request.usage)
            assert cost is not None
            total += cost
    return total


#: Lines of the models whose output tokens are published (a table, or per-image prices).
PUBLISHED_LINES = [
    {"id": f"p{i}", "model": model, "prompt": f"a published-count lamp number {i}",
     "quality": quality, "size": size, "n": 1 + i % 2}
    for i, (model, quality, size) in enumerate(
        (m, q, s)
        for m in ("gpt-image-1", "gpt-image-1.5", "gpt-image-1-mini")
        for q in ("low", "medium", "high")
        for s in ("1024x1024", "1536x1024", "1024x1536")
    )
]  # fmt: skip


async def test_estimate_of_published_counts_matches_what_the_mock_bills_within_2_percent(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(PUBLISHED_LINES)
    estimate = estimate_manifest(manifest)
    assert {g.basis for g in estimate.groups.values()} == {"published"}
    summary = await run(manifest, tmp_path / "out", mock_server)
    billed = billed_usd(mock_server)
    assert summary.ok == estimate.items and summary.images == estimate.images
    assert estimate.total_cost_usd == pytest.approx(billed, rel=0.02)
    assert summary.cost_usd == pytest.approx(billed, rel=1e-6)
    assert estimate.output_tokens == summary.output_tokens


def _variants(lines: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    """The same requests (model, size, quality, format, complexity, frames) with new prompts."""
    return [{**line, "id": f"{line['id']}-{tag}", "prompt": f"{line['prompt']} ({tag})"}
            for line in lines]  # fmt: skip


async def test_learned_estimate_is_within_2_percent_of_the_bill_for_a_second_manifest(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    """gpt-image-2.x token counts live only in the mock: the engine learns them from a first
    run's ledger, then estimates a second manifest of the same groups."""
    job = [orjson.loads(line) for line in (JOBS / "example.jsonl").read_bytes().splitlines()
           if line.strip() and not line.startswith(b"#")]  # fmt: skip
    first = write_manifest(_variants(job, "a") + _variants(job, "b"), name="first.jsonl")
    second = write_manifest(_variants(job, "c"), name="second.jsonl")
    before = estimate_manifest(second)
    assert before.unknown_items == len(job) and before.total_cost_usd == 0  # nothing to go on
    assert before.unknown_max_usd is not None and before.unknown_max_usd > 0
    await run(first, tmp_path / "first", mock_server)
    estimate = estimate_manifest(second, ledgers=[tmp_path / "first"])
    assert estimate.unknown_items == 0
    assert {g.basis for g in estimate.groups.values()} == {"learned"}
    assert all(g.samples >= 2 for g in estimate.groups.values())
    billed_before = billed_usd(mock_server)
    await run(second, tmp_path / "second", mock_server)
    billed = billed_usd(mock_server) - billed_before
    error = abs(estimate.total_cost_usd - billed) / billed
    assert error < 0.02, (estimate.total_cost_usd, billed)
    low, high = estimate.cost_low_usd, estimate.cost_high_usd
    assert low <= estimate.total_cost_usd <= high
    print(f"learned estimate ${estimate.total_cost_usd:.4f} vs billed ${billed:.4f}: "
          f"{error:.3%} off; range ${low:.4f}-{high:.4f}")  # fmt: skip


def test_estimate_json_shape_and_groups(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(
        [
            {"prompt": "a", "model": "gpt-image-1", "quality": "high", "size": "1536x1024", "n": 2},
            {"prompt": "b", "model": "gpt-image-1", "quality": "high", "size": "1536x1024"},
            {"prompt": "c", "model": "dall-e-3", "quality": "hd", "size": "1792x1024"},
            {"prompt": "d", "model": "gpt-image-2"},
            {"prompt": "e", "model": "gpt-image-1", "size": "999x1"},
            {"prompt": "f", "model": "gpt-image-3-preview"},
        ]
    )
    result = subprocess.run(
        [sys.executable, "-m", "batchimg", "estimate", str(manifest), "--format", "json"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"items", "images", "output_tokens", "total_cost_usd", "groups"} <= set(data)
    counts = (data["items"], data["images"], data["bad_lines"], data["unpriced_items"],
              data["unknown_items"])  # fmt: skip
    assert counts == (5, 6, 1, 1, 1)
    groups = {(g["model"], g["size"], g["quality"]): g for g in data["groups"]}
    high = groups[("gpt-image-1", "1536x1024", "high")]
    assert high["basis"] == "published"
    assert high["images"] == 3 and high["output_tokens"] == 3 * 6208
    assert high["cost_usd"] == pytest.approx(3 * 6208 * 40e-6 + 2 * 1 * 5e-6, abs=1e-6)
    assert groups[("dall-e-3", "1792x1024", "hd")]["cost_usd"] == pytest.approx(0.12)
    unknown = groups[("gpt-image-2", "1024x1024", "medium")]
    assert unknown["basis"] == "unknown" and unknown["cost_usd"] is None  # unknown, not 0
    assert unknown["output_tokens"] is None and unknown["max_usd"] > 0  # a bound, not a guess
    assert groups[("gpt-image-3-preview", "1024x1024", "auto")]["unpriced"] is True
    assert data["total_cost_usd"] == pytest.approx(high["cost_usd"] + 0.12)
    assert any("gpt-image-3-preview" in w for w in data["warnings"])
    table = subprocess.run(
        [sys.executable, "-m", "batchimg", "estimate", str(manifest)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert "unpriced" in table.stdout and "total" in table.stdout and "1 bad lines" in table.stdout
    assert "unknown" in table.stdout and "--from-ledger" in table.stdout


def test_mini_is_estimated_from_its_per_image_prices() -> None:
    table = PriceTable.default()
    estimate = table.estimate(
        {"model": "gpt-image-1-mini", "prompt": "abcd", "quality": "high", "size": "1024x1536"}
    )
    assert estimate.cost_usd == pytest.approx(0.052 + 1 * 2e-6)


def test_worst_case_takes_the_dearest_auto_choice() -> None:
    table = PriceTable.default()
    worst = table.worst_case_usd({"model": "gpt-image-1", "prompt": "x" * 40, "n": 2})
    assert worst == pytest.approx(2 * 6240 * 40e-6 + 40 * 5e-6)  # high, 1024x1536, 1 token a byte
    assert table.worst_case_usd({"model": "mystery", "prompt": "x"}) is None


async def test_prices_file_overrides_and_extends(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({
        "name": "negotiated-2026",
        "models": {
            "gpt-image-1": {"per_1m_tokens": {"text_in": 1.0, "image_out": 10.0}},
            "gpt-image-2": {"per_1m_tokens": {"text_in": 2.0, "image_out": 20.0}},
        },
    }))  # fmt: skip
    manifest = write_manifest(
        [
            {"id": "a", "prompt": "abcd", "quality": "low", "model": "gpt-image-1"},
            {"id": "b", "prompt": "abcd", "quality": "low", "model": "gpt-image-2"},
            {"id": "c", "prompt": "abcd", "quality": "low", "model": "gpt-image-1.5"},
            {"id": "d", "prompt": "abcd", "quality": "low", "model": "gpt-image-2-2026-04-21"},
        ]
    )
    await run(manifest, tmp_path / "out", mock_server, prices=prices)
    records = {r["id"]: r for r in ledger(tmp_path / "out")}
    assert records["a"]["cost_usd"] == pytest.approx((1 * 1.0 + 272 * 10.0) / 1e6)
    for item in ("b", "d"):  # a snapshot is priced as its model
        out = records[item]["usage"]["output_tokens"]
        assert records[item]["cost_usd"] == pytest.approx((1 * 2.0 + out * 20.0) / 1e6)
    assert records["c"]["cost_usd"] == pytest.approx((1 * 5.0 + 272 * 32.0) / 1e6)  # built-in
    assert records["a"]["price_table"] == f"{PRICE_TABLE}+negotiated-2026"


async def test_unknown_model_is_priced_unknown_not_zero(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    # A model newer than the catalog: the mock serves it, batchimg sends it as written.
    manifest = write_manifest(
        [{"id": "x", "prompt": "p", "model": "gpt-image-3-preview", "size": "1536x864"}]
    )
    summary = await run(manifest, tmp_path / "out", mock_server)
    (record,) = ledger(tmp_path / "out")
    assert record["status"] == "ok" and record["cost_usd"] is None
    assert record["usage"]["output_tokens"] > 0
    assert summary.unpriced == 1 and summary.cost_usd == 0
    (warning,) = summary.warnings
    assert "gpt-image-3-preview" in warning and "unpriced" in warning


def test_bad_price_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text('{"models": {"gpt-image-1": {"per_1m_tokens": {"text_in": -1}}}}')
    for command in (
        ["estimate", "jobs/example.jsonl"],
        ["run", "jobs/example.jsonl", "--mock", "--out", str(tmp_path / "o")],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "batchimg", *command, "--prices", str(bad)],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2 and "per_1m_tokens" in result.stderr


async def test_budget_cap_is_never_exceeded_and_a_higher_cap_resumes(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    lines = [{"id": f"b{i}", "prompt": f"budget item {i}", "model": "gpt-image-1",
              "quality": ("low", "medium", "high")[i % 3]} for i in range(40)]  # fmt: skip
    manifest = write_manifest(lines)
    out = tmp_path / "out"
    cap = 0.5
    async with MockServer(MockConfig(api_key=TEST_KEY, latency_s=0.2)) as server:
        first = await run(manifest, out, server, concurrency=16, max_cost_usd=cap)
        billed = billed_usd(server)
    assert billed <= cap  # what the mock billed, not what the client believes
    assert first.exit_code == 3 and first.stop_reason is not None
    assert first.stop_reason.startswith("budget reached: $")
    assert f"of ${cap:.2f} spent, {first.not_attempted} items left" in first.stop_reason
    assert "raise --max-cost and re-run to continue" in first.stop_reason
    assert 0 < first.ok < 40 and first.ok + first.not_attempted == 40
    spent_before = sum(r["cost_usd"] for r in ledger(out))
    assert spent_before == pytest.approx(billed)
    async with MockServer(MockConfig(api_key=TEST_KEY, latency_s=0.2)) as server:
        second = await run(manifest, out, server, concurrency=16, max_cost_usd=1.0)
        billed_again = billed_usd(server)
    assert spent_before + billed_again <= 1.0  # earlier spend counted against the new cap
    assert second.skipped == first.ok and second.ok > 0
    async with MockServer(MockConfig(api_key=TEST_KEY)) as server:
        third = await run(manifest, out, server, concurrency=16, max_cost_usd=100.0)
    assert third.exit_code == 0
    assert first.ok + second.ok + third.ok == 40


async def test_unpriced_model_under_a_cap_fails_without_being_sent(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(
        [
            {"id": "u", "prompt": "p", "model": "gpt-image-3-preview"},
            {"id": "k", "prompt": "q", "model": "gpt-image-1"},
        ]
    )
    summary = await run(manifest, tmp_path / "out", mock_server, max_cost_usd=5.0)
    records = {r["id"]: r for r in ledger(tmp_path / "out")}
    assert records["u"]["error"]["code"] == "unpriced_model"
    assert records["k"]["status"] == "ok" and summary.ok == 1
    assert [r.model for r in mock_server.requests] == ["gpt-image-1"]


def _record(item_id: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": item_id, "line": 1, "status": "ok", "endpoint": "generations",
        "model": "gpt-image-1", "prompt": "p", "n": 1, "size": "1024x1024", "quality": "low",
        "output_format": "png", "files": [f"images/{item_id}-0.png"], "bytes": [1],
        "sha256": ["x"], "usage": {"input_tokens": 10, "output_tokens": 272,
                                    "input_tokens_details": {"text_tokens": 10}},
        "cost_usd": 0.01093, "price_table": "openai-2025-10", "attempts": 1,
        "rate_limited": 0, "latency_s": 1.0, "request_id": f"req_{item_id}",
        "started_at": "2026-11-24T10:00:00.000Z", "finished_at": "2026-11-24T10:01:00.000Z",
        "metadata": {"shard": "a"},
    }  # fmt: skip
    base.update(fields)
    return base


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "ledger.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def test_report_merges_shards_last_state_wins_and_bills_each_answer_once(tmp_path: Path) -> None:
    failed = _record(
        "b", status="error", files=[], usage=None, cost_usd=None, request_id="req_b1",
        error={"code": "server_error", "type": None, "message": "x", "http_status": 500,
               "request_id": "req_b1"},
    )  # fmt: skip
    paid_but_lost = _record("c", status="error", files=[], request_id="req_c1",
                            error={"code": "bad_image"})  # fmt: skip
    shard1 = _write(tmp_path / "run1", [_record("a"), failed, paid_but_lost])
    shard2 = _write(tmp_path / "run2", [_record("b", request_id="req_b2"), _record("c")])
    # run1 is given twice (as a directory and as a file): its answers must be billed once
    result = build_report([shard1, shard1 / "ledger.jsonl", shard2], by=["status"])
    data = result.as_json()
    assert (data["items"], data["ok"], data["failed"]) == (3, 3, 0)  # b and c recovered later
    # billed answers: a, c1 (paid, image lost), b2, c: four, each once although run1 came twice
    assert data["total_cost_usd"] == pytest.approx(4 * 0.01093)
    assert data["output_tokens"] == 4 * 272
    assert {tuple(g["key"].values()) for g in data["groups"]} == {("ok",), ("error",)}


def test_report_groups_csv_json_and_latency(tmp_path: Path) -> None:
    records = [
        _record(f"i{i}", quality=("low", "high")[i % 2], latency_s=float(i + 1),
                metadata={"shard": "ab"[i % 2]}, finished_at=f"2026-11-2{4 + i % 2}T10:00:00Z")
        for i in range(20)
    ]  # fmt: skip
    records.append(_record("bad", status="error", files=[], usage=None, cost_usd=None,
                           request_id=None, error={"code": "moderation_blocked"}))  # fmt: skip
    out = _write(tmp_path / "run", records)
    result = build_report([out], by=["quality", "metadata.shard"])
    data = result.as_json()
    assert data["failures"] == {"moderation_blocked": 1}
    assert data["latency_avg_s"] == pytest.approx(10.5)
    assert data["latency_p95_s"] == pytest.approx(19.0, rel=0.03)
    keys = {(g["key"]["quality"], g["key"]["metadata.shard"]) for g in data["groups"]}
    assert keys == {("low", "a"), ("high", "b")}
    rows = list(csv.DictReader(io.StringIO(format_csv(result))))
    assert rows[-1]["quality"] == "(total)" and rows[-1]["items"] == "21"
    assert sum(int(r["images"]) for r in rows[:-1]) == 20
    by_day = build_report([out], by=["day"]).as_json()
    assert {g["key"]["day"] for g in by_day["groups"]} == {"2026-11-24", "2026-11-25"}


def test_report_reprices_from_usage(tmp_path: Path) -> None:
    out = _write(tmp_path / "run", [_record("a"), _record("b")])
    prices = tmp_path / "p.json"
    prices.write_text('{"name": "half", "models": {"gpt-image-1": '
                      '{"per_1m_tokens": {"text_in": 2.5, "image_out": 20.0}}}}')  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "batchimg", "report", str(out), "--prices", str(prices),
         "--format", "json"], capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["total_cost_usd"] == pytest.approx(2 * (10 * 2.5 + 272 * 20.0) / 1e6)
    assert data["price_table"] == f"{PRICE_TABLE}+half"


def test_report_bad_field_and_missing_ledger_exit_2(tmp_path: Path) -> None:
    out = _write(tmp_path / "run", [_record("a")])
    for args in ([str(out), "--by", "colour"], [str(tmp_path / "nope")]):
        result = subprocess.run([sys.executable, "-m", "batchimg", "report", *args],
                                capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
        assert result.returncode == 2


def test_ledger_is_read_backwards_whole_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    records = [_record(f"r{i}", prompt="x" * (i * 37 % 500)) for i in range(300)]
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records) + b'{"id": "torn", "st')
    seen = [r["id"] for r in read_backwards(path, block_size=1000)]
    assert seen == [f"r{i}" for i in reversed(range(300))]


def test_report_memory_does_not_hold_the_records(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    with open(path, "wb") as fh:
        for i in range(30_000):
            fh.write(orjson.dumps(_record(f"m{i}", prompt="p" * 200)) + b"\n")
    assert path.stat().st_size > 20_000_000
    tracemalloc.start()
    data = build_report([path], by=["quality"]).as_json()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert data["items"] == 30_000
    assert peak < 3_000_000  # a 22 MB ledger, well under 3 MB of Python objects


async def test_cap_holds_when_a_gateway_omits_usage(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    """Paid answers without `usage` cannot be priced: under a cap they count as their worst."""
    manifest = write_manifest(
        [
            {"prompt": f"usage-less {i}", "model": "gpt-image-1", "quality": "medium"}
            for i in range(20)
        ]
    )
    config = MockConfig(api_key=TEST_KEY, omit_usage=True, latency_s=0.05)
    async with MockServer(config) as server:
        summary = await run(manifest, tmp_path / "out", server, concurrency=8, max_cost_usd=0.3)
        billed = billed_usd(server)
    assert billed <= 0.3  # what the mock charged, although the client never saw a price
    assert summary.exit_code == 3 and 0 < summary.ok < 20


async def test_cap_holds_for_output_tokens_nobody_publishes_and_tightens_as_answers_arrive(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    """gpt-image-2.6 at 2560x1440 `max`: no count is known in advance, so the first requests
    reserve the catalog's ceiling; each answer tightens the bound for the rest of its group."""
    manifest = write_manifest(
        [{"id": f"m{i}", "model": "gpt-image-2.6-sunburst", "prompt": f"a cathedral, view {i}",
          "size": "2560x1440", "quality": "max"} for i in range(30)]
    )  # fmt: skip
    out, cap = tmp_path / "out", 3.0
    ceiling = PriceTable.default().worst_case(
        {"model": "gpt-image-2.6-sunburst", "prompt": "x" * 20, "size": "2560x1440",
         "quality": "max"}
    )  # fmt: skip
    assert ceiling is not None and ceiling.basis == "ceiling"
    async with MockServer(MockConfig(api_key=TEST_KEY, latency_s=0.05)) as server:
        first = await run(manifest, out, server, concurrency=8, max_cost_usd=cap)
        billed = billed_usd(server)
    assert billed <= cap  # what the mock billed, by a formula the engine never saw
    assert first.exit_code == 3 and first.stop_reason is not None
    assert first.next_bound is not None and first.next_bound.basis == "learned"
    assert first.next_bound.cost_usd < ceiling.cost_usd / 2  # tightened by the answers
    assert first.held_back_usd == pytest.approx(cap - billed, abs=1e-6)
    assert first.held_back_usd < first.next_bound.cost_usd  # only what the next item needed
    assert "held back" in format_summary(first)
    per_item = billed / first.ok
    assert first.ok >= int(cap / (per_item * (1 + LEARNED_MARGIN))) - 1
    print(f"cap ${cap}: {first.ok} items, billed ${billed:.4f}, held back "
          f"${first.held_back_usd:.4f}; bound ${ceiling.cost_usd:.4f} (ceiling) -> "
          f"${first.next_bound.cost_usd:.4f} (learned), ${per_item:.4f} an item")  # fmt: skip
    async with MockServer(MockConfig(api_key=TEST_KEY)) as server:
        again = await run(manifest, out, server, concurrency=8, max_cost_usd=cap)
        assert billed + billed_usd(server) <= cap  # the cap is over the whole directory
    assert again.exit_code == 3 and again.ok == 0
    async with MockServer(MockConfig(api_key=TEST_KEY)) as server:
        more = await run(manifest, out, server, concurrency=8, max_cost_usd=cap + 1.0)
        assert billed + billed_usd(server) <= cap + 1.0
    # The next run starts from what this directory's ledger taught it, not from the ceiling.
    assert more.ok >= 2 and more.next_bound is not None and more.next_bound.basis == "learned"


async def test_an_item_whose_bound_does_not_fit_is_left_and_cheaper_ones_go_on(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    big = {"model": "gpt-image-2.6-sunburst", "size": "3840x2160", "quality": "max"}
    lines = [{"id": "big-0", "prompt": "a vast mural", **big}] + [
        {"id": f"small-{i}", "model": "gpt-image-1", "prompt": f"a pebble {i}", "quality": "low"}
        for i in range(10)
    ] + [{"id": "big-1", "prompt": "another vast mural", **big}]  # fmt: skip
    summary = await run(write_manifest(lines), tmp_path / "out", mock_server, max_cost_usd=1.0)
    billed = billed_usd(mock_server)
    assert billed <= 1.0
    done = {r["id"] for r in ledger(tmp_path / "out")}
    assert done == {f"small-{i}" for i in range(10)}  # the big ones cannot be bounded under $1
    assert summary.exit_code == 3 and summary.not_attempted == 2
    assert summary.next_bound is not None and summary.next_bound.cost_usd > 1.0
    assert summary.stop_reason is not None and "did not fit" in summary.stop_reason


async def test_answers_from_another_run_bound_a_new_run_from_its_start(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    line = {"model": "gpt-image-2.6-sunburst", "size": "2560x1440", "quality": "max"}
    sample = write_manifest([{"prompt": f"sample {i}", **line} for i in range(3)], name="s.jsonl")
    job = write_manifest([{"prompt": f"job {i}", **line} for i in range(10)], name="j.jsonl")
    await run(sample, tmp_path / "sample", mock_server)
    # Under $1 the ceiling alone ($1.27 a request) fits nothing ...
    alone = await run(job, tmp_path / "alone", mock_server, max_cost_usd=1.0)
    assert alone.ok == 0 and alone.next_bound is not None and alone.next_bound.basis == "ceiling"
    # ... but the sample's answers bound the same requests from the first one.
    before = len(mock_server.requests)
    taught = await run(job, tmp_path / "taught", mock_server, max_cost_usd=1.0,
                       from_ledger=[tmp_path / "sample"])  # fmt: skip
    assert taught.ok >= 2 and taught.next_bound is not None
    assert taught.next_bound.basis == "learned"
    spent = sum(r["cost_usd"] for r in ledger(tmp_path / "taught"))
    assert spent <= 1.0 and len(mock_server.requests) - before == taught.ok
    with pytest.raises(batchimg.UsageError, match="no ledger"):
        await run(job, tmp_path / "x", mock_server, from_ledger=[tmp_path / "nowhere"])


async def test_a_ceiling_that_proves_too_low_is_exceeded_by_one_request_only(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    """Until the first answer of a kind is back, its requests go one at a time: a ceiling that
    is wrong (here, a --catalog one far below what the mock bills) costs one request's
    difference, and the answer then bounds the rest."""
    low = tmp_path / "low.json"
    low.write_text(json.dumps({"models": {"gpt-image-2.6-sunburst": {
        "tokens": {"ceiling_per_megapixel": {"max": 1000}}}}}))  # fmt: skip
    manifest = write_manifest(
        [{"prompt": f"a dome {i}", "model": "gpt-image-2.6-sunburst", "quality": "max",
          "size": "1024x1024"} for i in range(10)]
    )  # fmt: skip
    async with MockServer(MockConfig(api_key=TEST_KEY, latency_s=0.2)) as server:
        summary = await run(manifest, tmp_path / "out", server, concurrency=8,
                            max_cost_usd=1.0, catalog=low)  # fmt: skip
        billed = billed_usd(server)
        first, second, *_ = sorted(server.requests, key=lambda r: r.received_at)
    assert second.received_at >= first.received_at + 0.2  # sent after the first answer
    probe = PriceTable.default().request_cost({**first.params, "model": first.model}, first.usage)
    reserved = (1000 * 30 + 10 * 5) / 1e6  # the wrong ceiling: 1,000 tokens, and the prompt
    assert probe is not None and probe > reserved
    assert billed <= 1.0 + (probe - reserved)  # over by the one probe's difference at most
    assert summary.ok >= 3 and summary.next_bound is not None
    assert summary.next_bound.basis == "learned"
