"""Operator experience: progress, logs, validate, dataset-ready output, the Python API, help."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import click
import orjson
import pytest
from PIL import Image

import batchimg
from batchimg import view as view_module
from batchimg.cli import cli
from batchimg.engine import ProgressEvent
from batchimg.mock import MockServer
from batchimg.view import ProgressView, count_items
from tests.conftest import TEST_KEY
from tests.helpers import ledger

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"


def cli_run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "API_KEY" not in k}
    return subprocess.run([sys.executable, "-m", "batchimg", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout)  # fmt: skip


async def test_progress_events_and_snapshot_follow_the_run(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    lines = [{"id": f"p{i}", "prompt": f"pear {i}", "quality": "low", "n": 1 + i % 2}
             for i in range(10)]  # fmt: skip
    lines.append({"id": "bad", "prompt": "[[mock:moderation]] x"})
    manifest = write_manifest(lines)
    events: list[ProgressEvent] = []
    view = ProgressView(mode="quiet", total=count_items(manifest), stream=io.StringIO())

    def record(event: ProgressEvent) -> None:
        events.append(event)
        view(event)

    summary = await batchimg.arun(
        manifest,
        tmp_path / "out",
        batchimg.RunOptions(base_url=mock_server.base_url, api_key=TEST_KEY),
        progress=record,
    )
    view.close()
    assert events[0].kind == "started" and events[0].snapshot is not None
    finished = [e for e in events if e.kind == "item_finished"]
    assert len(finished) == 11
    assert Counter(e.status for e in finished) == {"ok": 10, "error": 1}
    assert sum(e.images for e in finished) == summary.images == 15
    (failure,) = [e for e in finished if e.status == "error"]
    assert failure.error_code == "moderation_blocked" and failure.line == 11
    assert finished[-1].spent_usd == pytest.approx(summary.cost_usd)
    snap = view.snapshot()
    assert snap is not None
    assert (snap.done, snap.total, snap.ok, snap.failed) == (11, 11, 10, 1)
    assert snap.images == 15 and snap.images_per_min > 0 and snap.in_flight == 0
    assert snap.projected_usd == pytest.approx(summary.cost_usd)


def test_a_quiet_view_does_not_grow_with_the_number_of_items(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Nothing draws in quiet mode, so nothing reads the rate window: it must still stay bounded
    # (it once kept every finish of a run: ~100 bytes an item, 100 MB over a million).
    clock = [1000.0]
    monkeypatch.setattr(view_module.time, "monotonic", lambda: clock[0])
    view = ProgressView(mode="quiet", total=None, stream=io.StringIO())
    tracemalloc.start()
    try:
        for i in range(20_000):
            clock[0] += 0.05  # 20 finishes a second: 1,200 in any 60 s window
            view(ProgressEvent("item_finished", item_id=f"i{i}", status="ok", images=1))
        grown, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grown < 300_000  # the window's ~1,200 entries, not 20,000


def test_non_tty_progress_lines_are_plain_and_greppable(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(f'{{"prompt": "kite {i}", "quality": "low"}}\n' for i in range(40))
                        + '{"id": "blocked", "prompt": "[[mock:moderation]] no"}\n')  # fmt: skip
    result = cli_run("run", str(manifest), "--out", str(tmp_path / "o"), "--mock",
                     "--log-every", "0.05", "--concurrency", "2")  # fmt: skip
    assert result.returncode == 1, result.stderr
    progress = [line for line in result.stderr.splitlines() if " progress " in line]
    pattern = re.compile(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ progress done=\d+/41 ok=\d+ failed=\d+ inflight=\d+ "
        r"retrying=\d+ img_per_min=[\d.]+ 429s=\d+ rate_per_min=\d+ tokens_out=\d+ "
        r"spent_usd=[\d.]+( projected_usd=[\d.]+)?( eta=\w+)?$"
    )
    assert progress and all(pattern.match(line) for line in progress), progress[:3]
    errors = [line for line in result.stderr.splitlines() if " error " in line]
    assert len(errors) == 1 and "id=blocked" in errors[0] and "code=moderation_blocked" in errors[0]
    assert "\x1b[" not in result.stderr  # no terminal escapes in a log file
    assert "40 ok, 1 failed" in result.stderr  # the end summary always prints


def test_json_log_format_and_quiet(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "a"}\n{"prompt": "[[mock:moderation]] b"}\n')
    result = cli_run("run", str(manifest), "--out", str(tmp_path / "o"), "--mock",
                     "--log-format", "json", "--log-every", "0.05")  # fmt: skip
    records = [json.loads(line) for line in result.stderr.splitlines()]
    kinds = Counter(r["event"] for r in records)
    assert kinds["error"] == 1 and kinds["summary"] == 1
    summary = records[-1]
    assert summary["event"] == "summary" and summary["ok"] == 1 and summary["exit_code"] == 1
    quiet = cli_run("run", str(manifest), "--out", str(tmp_path / "q"), "--mock", "--quiet")
    assert quiet.stderr.splitlines()[0].startswith("batchimg: 1 ok, 1 failed")


def test_validate_lists_every_bad_line_and_exits_1(tmp_path: Path) -> None:
    (tmp_path / "not-image.png").write_text("hello")
    manifest = tmp_path / "broken.jsonl"
    manifest.write_text(
        '{"prompt": "fine"}\n'
        "# a comment\n"
        "{oops\n"
        '{"prompt": 7}\n'
        '{"prompt": "a", "size": "2x2"}\n'
        '{"prompt": "a", "colour": "red"}\n'
        '{"prompt": "a", "image": "missing.png"}\n'
        '{"prompt": "a", "image": "not-image.png"}\n'
        '{"id": "x", "prompt": "a"}\n'
        '{"id": "x", "prompt": "b"}\n'
        "[1, 2]\n"
    )
    result = cli_run("validate", str(manifest))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    problems = [line for line in lines if re.match(rf"{re.escape(str(manifest))}:\d+: ", line)]
    assert [int(p.split(":")[1]) for p in problems] == [3, 4, 5, 6, 7, 8, 10, 11]
    assert "2x2" in problems[2] and "colour" in problems[3] and "missing.png" in problems[4]
    assert "duplicate id" in problems[6]
    assert lines[-1] == f"{manifest}: 10 lines checked, 2 valid, 8 bad"
    good = cli_run("validate", "jobs/edit-example.jsonl")
    assert good.returncode == 0 and good.stdout.strip().endswith("8 valid, all valid")
    assert cli_run("validate", str(tmp_path / "nope.jsonl")).returncode == 2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("job", ["example.jsonl", "edit-example.jsonl"])
async def test_output_loads_with_hugging_face_imagefolder(
    job: str, tmp_path: Path, mock_server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    summary = await batchimg.arun(
        JOBS / job, out, batchimg.RunOptions(base_url=mock_server.base_url, api_key=TEST_KEY)
    )
    dataset = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    records = ledger(out)
    svg = {r["id"]: r["n"] for r in records if r["output_format"] == "svg"}
    assert dataset.num_rows == summary.images - sum(svg.values())
    assert {"image", "prompt", "id", "image_index", "metadata", "model", "complexity"} <= set(
        dataset.column_names
    )
    for row in dataset:  # every row decodes: no SVG (which Pillow cannot read) in this file
        image = row["image"]
        assert isinstance(image, Image.Image) and image.size[0] >= 512
        image.close()  # an animated GIF keeps its file open until closed
    by_id = Counter(dataset["id"])
    assert by_id == Counter({r["id"]: r["n"] for r in records if r["id"] not in svg})
    if svg:  # SVG rows have a file of their own, of the same shape
        vectors = datasets.load_dataset(
            "json", data_files=str(out / "metadata-svg.jsonl"), split="train"
        )
        assert Counter(vectors["id"]) == Counter(svg)
        assert all((out / name).read_bytes().startswith(b"<?xml") for name in vectors["file_name"])
    else:
        assert not (out / "metadata-svg.jsonl").exists()


async def test_metadata_stays_in_step_with_the_ledger_across_resumes(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    lines = [{"id": f"m{i}", "prompt": f"moth {i}", "n": 1 + i % 3} for i in range(9)]
    lines[4]["prompt"] = "[[mock:fail=1]] moth 4"
    lines[7]["prompt"] = "[[mock:moderation]] moth 7"
    manifest = write_manifest(lines)
    out = tmp_path / "out"

    def rows() -> list[dict[str, object]]:
        return [orjson.loads(x) for x in (out / "metadata.jsonl").read_bytes().splitlines()]

    first = await batchimg.arun(
        manifest,
        out,
        batchimg.RunOptions(base_url=mock_server.base_url, api_key=TEST_KEY, max_attempts=1),
    )
    assert first.failed == 2
    assert {r["id"] for r in rows()} == {f"m{i}" for i in range(9)} - {"m4", "m7"}
    with open(out / "metadata.jsonl", "ab") as fh:
        fh.write(b'{"file_name": "images/m0-0.png", "pro')  # a row torn by a crash
    await batchimg.arun(
        manifest, out, batchimg.RunOptions(base_url=mock_server.base_url, api_key=TEST_KEY)
    )
    final = rows()
    files = [r["file_name"] for r in final]
    assert len(files) == len(set(files))  # no duplicates
    ok_files = [f for r in ledger(out) if r["status"] == "ok" for f in r["files"]]
    assert sorted(files) == sorted(ok_files)
    assert not any(r["id"] == "m7" for r in final)  # failed items have no rows
    assert all((out / f).is_file() for f in files)


def test_python_api_runs_the_example_job(tmp_path: Path) -> None:
    summary = batchimg.run(
        JOBS / "example.jsonl", tmp_path / "out", batchimg.RunOptions(mock=True, concurrency=4)
    )
    assert isinstance(summary, batchimg.Summary)
    assert (summary.ok, summary.failed, summary.images, summary.exit_code) == (26, 0, 30, 0)
    report = batchimg.build_report([tmp_path / "out"])
    assert summary.cost_usd > 0
    assert summary.cost_usd == pytest.approx(report.total.cost_usd, rel=1e-9)
    with pytest.raises(batchimg.UsageError):
        batchimg.run(tmp_path / "missing.jsonl", tmp_path / "o", batchimg.RunOptions(mock=True))


def test_public_names_are_exported_and_importable() -> None:
    public = {name for name in dir(batchimg) if not name.startswith("_")}
    modules = {name for name in public if isinstance(getattr(batchimg, name), type(batchimg))}
    assert set(batchimg.__all__) - {"__version__"} == public - modules  # nothing left unlisted
    for name in batchimg.__all__:
        assert getattr(batchimg, name) is not None


def test_every_command_and_option_has_help() -> None:
    assert isinstance(cli, click.Group)
    for name, command in cli.commands.items():
        assert command.help, name
        assert command.get_short_help_str(), name
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help, f"{name} {param.opts}"


def test_the_live_view_fits_80_columns_with_the_bar_on_a_line_of_its_own() -> None:
    import io

    from rich.console import Console

    from batchimg.view import Snapshot, render_snapshot

    snap = Snapshot(
        done=123_456, total=1_000_000, ok=120_000, failed=3_456, skipped=0, in_flight=32,
        retrying=12, images=240_000, images_per_min=12_345.6, rate_limited=789,
        admitted_per_min=12_600, learned_rpm=12_000, output_tokens=1_234_567_890,
        spent_usd=12_345.6789, projected_usd=100_000.12, eta_s=360_000,
    )  # fmt: skip
    console = Console(file=io.StringIO(), width=80, force_terminal=False)
    console.print(render_snapshot(snap))
    lines = [line.rstrip() for line in console.file.getvalue().splitlines()]  # type: ignore[attr-defined]
    assert len(lines) == 5 and all(len(line) <= 80 for line in lines)
    assert set(lines[1]) <= set("━╸╺ ")  # the bar alone
    assert "in flight 32" in lines[2] and "12,345.6 images/min" in lines[3]
    assert "$12,345.6789 spent" in lines[4]
