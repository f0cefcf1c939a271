"""The real engine over loopback against the project's mock server."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

import batchimg
from batchimg.mock import MockConfig, MockServer
from batchimg.pricing import PriceTable
from tests.conftest import TEST_KEY
from tests.helpers import LEDGER_FIELDS, check_ok_record, last_states, ledger
from tests.helpers import run_on_mock as run

JOBS = Path(__file__).resolve().parent.parent / "jobs"


async def test_example_job_produces_every_image_and_a_contract_ledger(
    mock_server: MockServer, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    summary = await run(JOBS / "example.jsonl", out, mock_server, concurrency=8)
    records = ledger(out)
    lines = [line for line in (JOBS / "example.jsonl").read_text().splitlines() if line.strip()]
    items = [line for line in lines if not line.startswith("#")]
    assert summary.exit_code == 0
    assert summary.ok == len(items) == len(records)
    assert summary.images == sum(r["n"] for r in records)
    assert {r["id"] for r in records} >= {"owl-variations", "latte-art", "mug-studio"}
    for record in records:
        check_ok_record(out, record)
        assert record["attempts"] == 1
        assert record["usage"]["output_tokens"] > 0
        assert record["cost_usd"] > 0
        assert record["metadata"]["category"]
    by_id = {r["id"]: r for r in records}
    assert len(by_id["owl-variations"]["files"]) == 4
    assert by_id["watch-jpeg"]["files"][0].endswith(".jpg")
    assert by_id["backpack-webp"]["size"] == "1024x1536"
    # The ledger cost is the answer's usage priced from the catalog: gpt-image-2.5 bills
    # $5 per 1M text tokens in and $30 per 1M image tokens out (API_NOTES).
    sneaker = by_id["sneaker-side"]
    usage = sneaker["usage"]
    text = usage["input_tokens_details"]["text_tokens"]
    assert sneaker["cost_usd"] == pytest.approx((text * 5 + usage["output_tokens"] * 30) / 1e6)
    assert summary.cost_usd == pytest.approx(sum(r["cost_usd"] for r in records))
    # ... and the ledger's total is what the mock billed (its usage at the catalog's prices).
    table = PriceTable.default()
    billed = sum(
        table.request_cost({**r.params, "model": r.model}, r.usage) or 0.0
        for r in mock_server.requests
        if r.status == 200
    )
    assert billed > 0 and sum(r["cost_usd"] for r in records) == pytest.approx(billed, rel=1e-9)
    # Today's parameters made it through: a custom size, a gif's frames, an svg, complexity.
    assert by_id["harbor-dawn"]["size"] == "1536x864"
    assert by_id["loader-spinner"]["files"][0].endswith(".gif")
    assert by_id["loader-spinner"]["frame_count"] == 6
    assert by_id["city-lineart"]["files"][0].endswith(".svg")
    assert by_id["market-stall"]["complexity"] == "low"
    assert by_id["watch-jpeg"]["quality"] == "xhigh"
    assert len(mock_server.requests) == len(items)


async def test_n_4_gives_four_distinct_files(
    mock_server: MockServer, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(
        [{"id": "four", "model": "gpt-image-1", "prompt": "four owls", "n": 4, "quality": "low"}]
    )
    out = tmp_path / "out"
    summary = await run(manifest, out, mock_server)
    (record,) = ledger(out)
    check_ok_record(out, record)
    assert summary.images == 4
    assert sorted(record["files"]) == [f"images/four-{i}.png" for i in range(4)]
    assert record["usage"]["output_tokens"] == 4 * 272


async def test_bad_lines_fail_alone_with_line_numbers_and_are_never_sent(
    mock_server: MockServer, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(
        [
            {"id": "good-1", "prompt": "a red apple"},
            "# a comment",
            "{not json",
            {"id": "bad-size", "prompt": "a pear", "size": "999x999"},
            "",
            {"id": "bad-key", "prompt": "a plum", "colour": "blue"},
            {"id": "good-2", "prompt": "a green apple"},
            {"id": "good-1", "prompt": "a duplicate id"},
        ]
    )
    out = tmp_path / "out"
    summary = await run(manifest, out, mock_server)
    states = last_states(out)
    assert summary.ok == 2 and summary.failed == 4 and summary.exit_code == 1
    assert states["good-1"]["status"] == states["good-2"]["status"] == "ok"
    errors = {r["line"]: r for r in ledger(out) if r["status"] == "error"}
    assert sorted(errors) == [3, 4, 6, 8]
    assert "line 3" in errors[3]["error"]["message"]
    assert "999x999" in errors[4]["error"]["message"]
    assert "colour" in errors[6]["error"]["message"]
    assert "duplicate id" in errors[8]["error"]["message"]
    for record in errors.values():
        assert set(record) == LEDGER_FIELDS | {"error"}
        assert record["attempts"] == 0 and record["files"] == []
        assert record["error"]["code"] == "invalid_manifest_line"
    sent = [r.prompt for r in mock_server.requests]
    assert sorted(sent) == ["a green apple", "a red apple"]


async def test_metadata_nested_deeper_than_the_ledger_writes_fails_its_line_not_the_run(
    mock_server: MockServer, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    deep = '{"prompt": "too deep", "metadata": ' + "[" * 300 + "]" * 300 + "}"
    manifest = write_manifest([{"id": "fine", "prompt": "a red apple"}, deep])
    out = tmp_path / "out"
    summary = await run(manifest, out, mock_server)
    assert (summary.ok, summary.failed, summary.exit_code) == (1, 1, 1)
    (bad,) = [r for r in ledger(out) if r["status"] == "error"]
    assert bad["line"] == 2 and "nested too deeply" in bad["error"]["message"]
    assert bad["metadata"] is None
    assert [r.prompt for r in mock_server.requests] == ["a red apple"]


async def test_resume_requests_only_what_is_not_done(
    mock_server: MockServer, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    lines = [{"prompt": f"tulip number {i}", "quality": "low"} for i in range(10)]
    lines[3]["prompt"] = "[[mock:fail=1]] tulip that fails once"
    lines[7]["prompt"] = "[[mock:fail=1]] another tulip that fails once"
    manifest = write_manifest(lines)
    out = tmp_path / "out"
    first = await run(manifest, out, mock_server, max_attempts=1)
    assert (first.ok, first.failed, first.exit_code) == (8, 2, 1)
    second = await run(manifest, out, mock_server, max_attempts=1)
    assert (second.ok, second.failed, second.skipped) == (2, 0, 8)
    assert second.exit_code == 0
    counts = Counter(r.prompt for r in mock_server.requests)
    assert counts[lines[3]["prompt"]] == counts[lines[7]["prompt"]] == 2
    assert all(counts[line["prompt"]] == 1 for i, line in enumerate(lines) if i not in (3, 7))
    states = last_states(out)
    assert len(states) == 10 and all(r["status"] == "ok" for r in states.values())
    for record in states.values():
        check_ok_record(out, record)
    third = await run(manifest, out, mock_server)
    assert (third.ok, third.skipped) == (0, 10)
    assert len(mock_server.requests) == 12


async def test_torn_last_ledger_line_is_ignored_and_resumed(
    mock_server: MockServer, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest([{"id": f"p{i}", "prompt": f"pebble {i}"} for i in range(6)])
    out = tmp_path / "out"
    await run(manifest, out, mock_server)
    path = out / "ledger.jsonl"
    kept = path.read_bytes().splitlines(keepends=True)
    done_ids = {r["id"] for r in ledger(out)[:4]}
    items = [i for i, line in enumerate(kept) if b'"record"' not in line]  # item lines
    cut = items[4]  # the 5th item line, torn by a crash mid-write; what follows never written
    path.write_bytes(b"".join(kept[:cut]) + kept[cut][: len(kept[cut]) // 2])
    summary = await run(manifest, out, mock_server)
    assert (summary.ok, summary.skipped) == (2, 4)
    counts = Counter(r.prompt for r in mock_server.requests)
    for i in range(6):
        assert counts[f"pebble {i}"] == (1 if f"p{i}" in done_ids else 2)
    records = ledger(out)  # every line whole again
    assert len(records) == 6 and {r["id"] for r in records} == {f"p{i}" for i in range(6)}
    # the re-generated items' earlier files were set aside, not overwritten
    assert len(list((out / ".orphans").iterdir())) == 2


async def test_server_errors_are_retried_and_attempts_counted(
    mock_server: MockServer, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(
        [
            {"id": "flaky", "prompt": "[[mock:fail=2]] a flaky heron"},
            {"id": "doomed", "prompt": "[[mock:fail=9]] a doomed heron"},
        ]
    )
    out = tmp_path / "out"
    summary = await run(manifest, out, mock_server, max_attempts=3)
    states = last_states(out)
    assert states["flaky"]["status"] == "ok" and states["flaky"]["attempts"] == 3
    assert states["doomed"]["status"] == "error" and states["doomed"]["attempts"] == 3
    assert states["doomed"]["error"]["http_status"] == 500
    assert states["doomed"]["error"]["request_id"].startswith("req_")
    assert summary.exit_code == 1


async def test_moderation_block_fails_the_item_after_one_attempt(
    mock_server: MockServer, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest([{"id": "m", "prompt": "[[mock:moderation]] something"}])
    out = tmp_path / "out"
    await run(manifest, out, mock_server)
    (record,) = ledger(out)
    assert record["status"] == "error" and record["attempts"] == 1
    assert record["error"]["code"] == "moderation_blocked"
    assert record["error"]["type"] == "image_generation_user_error"
    assert len(mock_server.requests) == 1


async def test_data_uri_and_url_answers_are_stored(
    mock_server: MockServer, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(
        [
            {"id": "datauri", "prompt": "[[mock:datauri]] a kite", "output_format": "webp"},
            {"id": "url", "prompt": "[[mock:url]] a kite"},
            {"id": "dalle", "prompt": "a kite", "model": "dall-e-2", "size": "256x256"},
        ]
    )
    out = tmp_path / "out"
    summary = await run(manifest, out, mock_server)
    assert summary.exit_code == 0
    states = last_states(out)
    for record in states.values():
        check_ok_record(out, record)
    assert states["dalle"]["cost_usd"] == pytest.approx(0.016)


async def test_corrupt_image_bytes_fail_the_item_without_a_file(
    mock_server: MockServer, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(
        [{"id": "bad", "prompt": "[[mock:corrupt]] x"}, {"id": "fine", "prompt": "y"}]
    )
    out = tmp_path / "out"
    summary = await run(manifest, out, mock_server)
    states = last_states(out)
    assert (summary.ok, summary.failed) == (1, 1)
    assert states["bad"]["error"]["code"] == "bad_image"
    assert states["bad"]["usage"] is not None  # it was paid for: the ledger says so
    assert states["bad"]["files"] == []
    assert [p.name for p in (out / "images").iterdir()] == ["fine-0.png"]


async def test_bad_key_stops_the_run_at_once_with_exit_3(
    mock_server: MockServer, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest([{"prompt": f"gull {i}"} for i in range(50)])
    out = tmp_path / "out"
    summary = await batchimg.arun(
        manifest,
        out,
        batchimg.RunOptions(base_url=mock_server.base_url, api_key="sk-wrong", concurrency=4),
    )
    assert summary.exit_code == 3
    assert "invalid_api_key" in (summary.stop_reason or "")
    assert len(mock_server.requests) <= 4  # only what was already in flight
    assert summary.ok == 0 and summary.failed == len(ledger(out)) <= 4


async def test_mock_option_runs_without_any_key(
    tmp_path: Path, write_manifest: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("BATCHIMG_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    manifest = write_manifest([{"id": "a", "prompt": "a lighthouse", "quality": "low"}])
    summary = await batchimg.arun(manifest, tmp_path / "out", batchimg.RunOptions(mock=True))
    assert summary.exit_code == 0 and summary.images == 1


async def test_concurrency_bounds_requests_in_flight(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest([{"prompt": f"cloud {i}", "quality": "low"} for i in range(24)])
    async with MockServer(MockConfig(api_key=TEST_KEY, latency_s=0.05)) as server:
        summary = await run(manifest, tmp_path / "out", server, concurrency=3)
        assert summary.ok == 24
        assert server.max_in_flight == 3
