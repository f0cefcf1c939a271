"""The catalog as data: rules per model (refereed by the mock's own copy), snapshots, unknown
models, lifecycle, overlays, `batchimg models` and `--check-models`.

Facts come from shared/API_NOTES.md ("Late 2026") and the official SDK's parameter docs
(openai-python 3.57: custom sizes divisible by 16 with a 1:3-3:1 ratio up to 3840x2160;
xhigh/max on 2.5; complexity, gif frame_count 2-16 and svg n=1 on 2.6; input_fidelity omitted
for gpt-image-2).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

import batchimg
from batchimg import specs
from batchimg.catalog import Catalog
from batchimg.errors import UsageError
from batchimg.manifest import BadLine, Item, read_manifest
from batchimg.mock import MockConfig, MockServer
from tests.conftest import TEST_KEY
from tests.helpers import ledger, run_cli, threaded_mock

ROOT = Path(__file__).resolve().parent.parent
cli = run_cli


def check(params: dict[str, Any], endpoint: specs.Endpoint = "generations") -> str | None:
    """The param the rules engine refuses, or None when it accepts."""
    try:
        specs.validate_params({"prompt": "p", **params}, endpoint)
    except specs.ParamError as exc:
        return exc.param
    return None


# -- every rule, accepted and refused ----------------------------------------------------------

RULES: list[tuple[dict[str, Any], str | None]] = [
    # sizes: custom WxH on gpt-image-2 and later, fixed lists before
    ({"model": "gpt-image-2", "size": "1536x864"}, None),
    ({"model": "gpt-image-2.6-flare", "size": "2048x1152"}, None),
    ({"model": "gpt-image-2.5-sunburst", "size": "2880x2880"}, None),  # 8,294,400 px: the most
    ({"model": "gpt-image-2", "size": "3840x2160"}, None),
    ({"model": "gpt-image-2", "size": "960x720"}, None),  # 691,200 px
    ({"model": "gpt-image-2", "size": "auto"}, None),
    ({"model": "gpt-image-2", "size": "1500x864"}, "size"),  # not divisible by 16
    ({"model": "gpt-image-2", "size": "4096x1024"}, "size"),  # ratio 4:1
    ({"model": "gpt-image-2", "size": "3856x1920"}, "size"),  # an edge over 3840
    ({"model": "gpt-image-2", "size": "2896x2896"}, "size"),  # over 8,294,400 px
    ({"model": "gpt-image-2", "size": "800x800"}, "size"),  # under 655,360 px
    ({"model": "gpt-image-2", "size": "16:9"}, "size"),
    ({"model": "gpt-image-2", "size": "1024x1024\n"}, "size"),
    ({"model": "gpt-image-2", "size": "01024x1024"}, "size"),
    ({"model": "gpt-image-1", "size": "1536x864"}, "size"),
    ({"model": "gpt-image-1.5", "size": "1024x1536"}, None),
    ({"model": "dall-e-3", "size": "1792x1024"}, None),
    ({"model": "dall-e-3", "size": "auto"}, "size"),
    ({"model": "dall-e-2", "size": "512x512"}, None),
    # qualities
    ({"model": "gpt-image-2.5-flare", "quality": "xhigh"}, None),
    ({"model": "gpt-image-2.6-sunburst", "quality": "max"}, None),
    ({"model": "gpt-image-2", "quality": "xhigh"}, "quality"),
    ({"model": "gpt-image-1", "quality": "max"}, "quality"),
    ({"model": "gpt-image-1", "quality": "standard"}, "quality"),
    ({"model": "dall-e-3", "quality": "hd"}, None),
    ({"model": "dall-e-3", "quality": "high"}, "quality"),
    # output formats
    ({"model": "gpt-image-2.6-flare", "output_format": "gif"}, None),
    ({"model": "gpt-image-2.6-flare", "output_format": "svg"}, None),
    ({"model": "gpt-image-2.5-flare", "output_format": "gif"}, "output_format"),
    ({"model": "gpt-image-2", "output_format": "svg"}, "output_format"),
    ({"model": "gpt-image-2", "output_format": "webp"}, None),
    ({"model": "dall-e-3", "output_format": "png"}, "output_format"),
    # complexity: 2.6 only
    ({"model": "gpt-image-2.6-flare", "complexity": "low"}, None),
    ({"model": "gpt-image-2.6-sunburst", "complexity": "extreme"}, "complexity"),
    ({"model": "gpt-image-2.5-sunburst", "complexity": "low"}, "complexity"),
    ({"model": "gpt-image-2", "complexity": "low"}, "complexity"),
    # gif frames: only with gif, 2-16, and the frames' sheet within the pixel and edge bounds
    ({"model": "gpt-image-2.6-flare", "output_format": "gif", "frame_count": 16}, None),
    ({"model": "gpt-image-2.6-flare", "output_format": "gif", "frame_count": 17}, "frame_count"),
    ({"model": "gpt-image-2.6-flare", "output_format": "gif", "frame_count": 1}, "frame_count"),
    ({"model": "gpt-image-2.6-flare", "frame_count": 4}, "frame_count"),
    ({"model": "gpt-image-2.6-flare", "output_format": "gif", "size": "960x960"}, None),  # 3x3
    ({"model": "gpt-image-2.6-flare", "output_format": "gif", "size": "1024x1024"}, "size"),
    (
        {
            "model": "gpt-image-2.6-flare",
            "output_format": "gif",
            "size": "960x960",
            "frame_count": 2,
        },
        None,
    ),
    (
        {
            "model": "gpt-image-2.6-flare",
            "output_format": "gif",
            "size": "1024x1024",
            "frame_count": 2,
        },
        "size",
    ),
    (
        {
            "model": "gpt-image-2.6-flare",
            "output_format": "gif",
            "size": "816x816",
            "frame_count": 12,
        },
        None,
    ),
    (
        {
            "model": "gpt-image-2.6-flare",
            "output_format": "gif",
            "size": "832x832",
            "frame_count": 12,
        },
        "size",
    ),
    ({"model": "gpt-image-2.6-flare", "output_format": "gif", "size": "512x512"}, None),
    ({"model": "gpt-image-2.6-flare", "output_format": "gif", "frame_duration_ms": 120}, None),
    ({"model": "gpt-image-2.6-flare", "frame_duration_ms": 120}, "frame_duration_ms"),
    # svg: one image, and the svg object only with svg output
    ({"model": "gpt-image-2.6-sunburst", "output_format": "svg", "n": 2}, "n"),
    ({"model": "gpt-image-2.6-sunburst", "output_format": "svg", "svg": {"model": "x"}}, None),
    ({"model": "gpt-image-2.6-sunburst", "svg": {"model": "x"}}, "svg"),
    # background x format
    ({"model": "gpt-image-2.6-flare", "background": "transparent", "output_format": "webp"}, None),
    ({"model": "gpt-image-2", "background": "transparent", "output_format": "jpeg"}, "background"),
    (
        {"model": "gpt-image-2.6-flare", "background": "transparent", "output_format": "gif"},
        "background",
    ),
    # n, input_fidelity, moderation, prompt
    ({"model": "gpt-image-2", "n": 10}, None),
    ({"model": "gpt-image-2", "n": 11}, "n"),
    ({"model": "dall-e-3", "n": 2}, "n"),
    ({"model": "gpt-image-2", "input_fidelity": "high"}, "input_fidelity"),
    ({"model": "gpt-image-1", "input_fidelity": "high"}, "input_fidelity"),  # edits only
    ({"model": "gpt-image-2", "moderation": "low"}, None),
    ({"model": "dall-e-3", "moderation": "low"}, "moderation"),
    ({"model": "gpt-image-2", "style": "vivid"}, "style"),
    ({"model": "gpt-image-2", "safety_identifier": "u-1f3a"}, None),
    ({"model": "gpt-image-2", "safety_identifier": 7}, "safety_identifier"),
]


@pytest.mark.parametrize(("params", "refused"), RULES, ids=[str(p) for p, _ in RULES])
def test_each_catalog_rule_accepts_and_refuses(params: dict[str, Any], refused: str | None) -> None:
    assert check(params) == refused


@pytest.mark.parametrize(
    ("params", "refused"),
    [
        ({"model": "gpt-image-1.5", "input_fidelity": "high"}, None),
        ({"model": "gpt-image-1-mini", "input_fidelity": "high"}, "input_fidelity"),
        ({"model": "gpt-image-1-mini", "input_fidelity": "low"}, None),
        ({"model": "gpt-image-2.6-flare", "input_fidelity": "low"}, "input_fidelity"),
        ({"model": "gpt-image-2", "moderation": "low"}, "moderation"),
    ],
)
def test_edit_only_and_generation_only_fields(params: dict[str, Any], refused: str | None) -> None:
    assert check(params, "edits") == refused


def test_messages_say_what_the_rule_is() -> None:
    cases = {
        ("gpt-image-2", "size", "1500x864"): "divisible by 16",
        ("gpt-image-2", "size", "4096x1024"): "aspect ratio",
        ("gpt-image-2", "size", "2896x2896"): "8,294,400 pixels",
        ("gpt-image-2", "quality", "xhigh"): "accepts: low, medium, high, auto",
        ("gpt-image-2.6-flare", "frame_count", 4): "output_format gif",
    }
    for (model, field, value), fragment in cases.items():
        with pytest.raises(specs.ParamError, match=fragment):
            specs.validate_params({"prompt": "p", "model": model, field: value})
    params = {"prompt": "p", "model": "gpt-image-2.6-flare", "output_format": "gif",
              "size": "1024x1024"}  # fmt: skip
    with pytest.raises(specs.ParamError, match=r"3x3 sheet of 3072x3072"):
        specs.validate_params(params)


# -- the mock referees the rules ---------------------------------------------------------------

REFEREE_MODELS = [
    "gpt-image-1", "gpt-image-1.5", "gpt-image-1-mini", "chatgpt-image-latest", "gpt-image-2",
    "gpt-image-2-2026-04-21", "gpt-image-2.5-flare", "gpt-image-2.5-sunburst-2026-09-08",
    "gpt-image-2.6-flare", "gpt-image-2.6-sunburst", "dall-e-2", "dall-e-3",
]  # fmt: skip
REFEREE_VARIANTS: list[dict[str, Any]] = [
    {}, {"size": "1536x864"}, {"size": "1500x864"}, {"size": "4096x1024"}, {"size": "800x800"},
    {"size": "960x720"}, {"size": "2880x2880"}, {"size": "2896x2896"}, {"size": "1x1"},
    {"size": "1024x1536"}, {"size": "512x512"}, {"size": "1792x1024"}, {"size": "auto"},
    {"quality": "low"}, {"quality": "xhigh"}, {"quality": "max"}, {"quality": "hd"},
    {"quality": "standard"}, {"quality": "auto"}, {"output_format": "gif"},
    {"output_format": "svg"}, {"output_format": "svg", "n": 2}, {"output_format": "jpeg"},
    {"complexity": "low"}, {"frame_count": 4}, {"output_format": "gif", "frame_count": 16},
    {"output_format": "gif", "size": "1024x1024"}, {"output_format": "gif", "size": "960x960"},
    {"output_format": "gif", "size": "1024x1024", "frame_count": 2},
    {"output_format": "gif", "size": "256x256", "frame_count": 2},
    {"background": "transparent", "output_format": "jpeg"},
    {"background": "transparent", "output_format": "webp"},
    {"background": "transparent", "output_format": "gif"},
    {"n": 2}, {"n": 11}, {"input_fidelity": "high"}, {"moderation": "low"}, {"style": "natural"},
    {"response_format": "b64_json"}, {"output_compression": 50, "output_format": "webp"},
    {"svg": {"model": "author"}, "output_format": "svg"}, {"svg": {"model": "author"}},
    {"safety_identifier": "u-1"},
]  # fmt: skip


async def test_validate_flags_exactly_the_lines_the_mock_refuses(
    tmp_path: Path, mock_server: MockServer
) -> None:
    """Every model x variant is judged twice: by `validate` (the catalog) and by the mock, which
    keeps its own copy of the API's rules; the two must agree line for line."""
    lines = [
        {"model": model, "prompt": "a lighthouse on a cliff", **variant}
        for model in REFEREE_MODELS
        for variant in REFEREE_VARIANTS
    ]
    manifest = tmp_path / "referee.jsonl"
    manifest.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    flagged = {e.line for e in read_manifest(manifest) if isinstance(e, BadLine)}
    refused = set()
    headers = {"Authorization": f"Bearer {TEST_KEY}"}
    async with aiohttp.ClientSession() as http:
        for number, line in enumerate(lines, start=1):
            url = f"{mock_server.base_url}/images/generations"
            async with http.post(url, json=line, headers=headers) as resp:
                await resp.read()
                assert resp.status in (200, 400), (line, resp.status)
                if resp.status == 400:
                    refused.add(number)
    disagree = sorted(flagged ^ refused)
    details = [(n, lines[n - 1], "validate" if n in flagged else "mock") for n in disagree]
    assert not details, details
    assert 100 < len(refused) < len(lines) - 100  # both kinds are well represented


def test_validate_passes_an_unknown_model_with_one_warning(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"model": "gpt-image-9", "prompt": "a", "size": "1234x5678", "quality": "ultra"}\n'
        '{"model": "gpt-image-9", "prompt": "b", "n": 3}\n'
        '{"model": "gpt-image-9", "prompt": "c", "size": "big"}\n'
        '{"model": "gpt-image-9", "prompt": "d", "n": 0}\n'
    )
    result = cli("validate", str(manifest))
    assert result.returncode == 1
    warnings = [line for line in result.stdout.splitlines() if ": warning: " in line]
    assert len(warnings) == 1 and "gpt-image-9" in warnings[0]
    assert "only field types, n and the WxH shape" in warnings[0]
    bad = [line for line in result.stdout.splitlines() if line.startswith(f"{manifest}:")]
    assert [b.split(":")[1] for b in bad if b.split(":")[1].isdigit()] == ["3", "4"]
    assert result.stdout.strip().endswith("4 lines checked, 2 valid, 2 bad")


def test_snapshot_names_use_their_models_rules() -> None:
    catalog = Catalog.default()
    assert catalog.spec("gpt-image-2-2026-04-21").name == "gpt-image-2"
    assert catalog.spec("gpt-image-2.5-flare-2026-09-08").name == "gpt-image-2.5-flare"
    assert catalog.spec("gpt-image-1.5-2025-12-16").name == "gpt-image-1.5"
    # A dated snapshot the catalog does not list yet is still its model.
    later = catalog.spec("gpt-image-2.6-flare-2027-01-15")
    assert later.known and later.name == "gpt-image-2.6-flare"
    assert check({"model": "gpt-image-2.5-flare-2026-09-08", "quality": "xhigh"}) is None
    assert check({"model": "gpt-image-2-2026-04-21", "quality": "xhigh"}) == "quality"
    assert check({"model": "gpt-image-2.6-flare-2027-01-15", "output_format": "gif"}) is None
    assert not catalog.spec("gpt-image-9").known
    assert not catalog.spec("gpt-image-2-2099-99-99").known  # not a date: not a snapshot


def test_output_compression_is_sent_only_with_jpeg_or_webp(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    lines = [
        {"prompt": "a", "output_format": "png", "output_compression": 80},
        {"prompt": "b", "output_format": "webp", "output_compression": 80},
        {"prompt": "c", "output_compression": 80},  # png by default
        {"prompt": "d", "output_format": "png", "output_compression": 101},  # wrong in itself
    ]
    manifest.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    warnings: list[str] = []
    a, b, c, d = read_manifest(manifest, warn=warnings.append)
    assert isinstance(a, Item) and "output_compression" not in a.params
    assert isinstance(b, Item) and b.params["output_compression"] == 80
    assert isinstance(c, Item) and "output_compression" not in c.params
    assert isinstance(d, BadLine) and "output_compression" in d.reason
    assert len([w for w in warnings if "output_compression" in w]) == 1  # said once


async def test_new_parameters_reach_the_api_and_the_ledger(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(
        [
            {"id": "gif", "model": "gpt-image-2.6-flare", "prompt": "a spinner",
             "output_format": "gif", "frame_count": 4, "frame_duration_ms": 120,
             "size": "512x512", "quality": "low"},
            {"id": "svg", "model": "gpt-image-2.6-sunburst", "prompt": "an icon",
             "output_format": "svg", "svg": {"model": "author-1"}, "complexity": "low"},
            {"id": "png", "model": "gpt-image-2.6-sunburst", "prompt": "a photo",
             "output_compression": 70, "safety_identifier": "u-9c2e"},
        ]
    )  # fmt: skip
    summary = await batchimg.arun(
        manifest,
        tmp_path / "out",
        batchimg.RunOptions(base_url=mock_server.base_url, api_key=TEST_KEY),
    )
    assert summary.exit_code == 0
    sent = {r.prompt: r.params for r in mock_server.requests}
    assert sent["a spinner"]["frame_count"] == 4 and sent["a spinner"]["frame_duration_ms"] == 120
    assert sent["an icon"]["svg"] == {"model": "author-1"}
    assert sent["an icon"]["complexity"] == "low"
    assert "output_compression" not in sent["a photo"]
    assert sent["a photo"]["safety_identifier"] == "u-9c2e"
    records = {r["id"]: r for r in ledger(tmp_path / "out")}
    assert records["gif"]["frame_count"] == 4 and records["gif"]["complexity"] == "high"
    assert records["svg"]["complexity"] == "low" and records["svg"]["frame_count"] is None
    assert records["svg"]["extra_usage"]["svg_usage"]["model"] == "author-1"
    assert "svg_usage not priced" in records["svg"]["cost_note"]
    assert records["png"]["output_format"] == "png"
    assert summary.unpriced_extra == 1
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").read_text().splitlines()
    ]
    assert {r["id"]: r["frame_count"] for r in rows} == {"gif": 4, "png": None}
    (svg_row,) = [
        json.loads(x) for x in (tmp_path / "out" / "metadata-svg.jsonl").read_text().splitlines()
    ]
    assert svg_row["file_name"] == "images/svg-0.svg" and svg_row["complexity"] == "low"
    table = cli("report", str(tmp_path / "out"), "--by", "complexity,output_format")
    assert table.returncode == 0, table.stderr
    assert "output_format" in table.stdout.splitlines()[0]
    assert any(line.split()[:2] == ["low", "svg"] for line in table.stdout.splitlines())
    assert "extra usage no price covers" in table.stdout


# -- lifecycle ---------------------------------------------------------------------------------


def test_a_retired_model_is_refused_against_openai_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"prompt": "fine", "model": "gpt-image-2"}\n'
        '{"prompt": "old", "model": "gpt-image-1", "metadata": {"model": "x"}}\n'
        '{"prompt": "meta only", "metadata": {"model": "dall-e-3"}}\n'
        '{"prompt": "older", "model": "dall-e-3"}\n'
        '{"prompt": "escaped", "mod\\u0065l": "gpt-image-1.5"}\n'
    )
    out = tmp_path / "out"
    env = {"OPENAI_API_KEY": "sk-never-sent"}
    result = cli("run", str(manifest), "--out", str(out), env=env)
    assert result.returncode == 2
    assert "line 2: model gpt-image-1 was shut down on 2026-10-23" in result.stderr
    assert "use gpt-image-2.5-sunburst or gpt-image-2.5-flare instead" in result.stderr
    assert "line 4: model dall-e-3 was shut down on 2026-05-12" in result.stderr
    assert "line 3" not in result.stderr  # a "model" key inside metadata is not the model
    assert "line 5: model gpt-image-1.5 was shut down" in result.stderr  # an escaped key too
    assert "nothing was sent" in result.stderr and "sk-never-sent" not in result.stderr
    assert not out.exists()
    # A retired default model, for the lines that name none, is refused the same way.
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "a"}\n')
    result = cli("run", str(plain), "--out", str(out), "--model", "gpt-image-1.5", env=env)
    assert result.returncode == 2 and "gpt-image-1.5 was shut down on 2026-12-01" in result.stderr
    assert "gpt-image-2.6-sunburst or gpt-image-2.6-flare" in result.stderr


async def test_a_retired_model_is_only_a_warning_through_a_gateway(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest([{"prompt": "a", "model": "gpt-image-1"}] * 3)
    summary = await batchimg.arun(
        manifest,
        tmp_path / "out",
        batchimg.RunOptions(base_url=mock_server.base_url, api_key=TEST_KEY),
    )
    assert summary.exit_code == 0 and summary.ok == 3
    (warning,) = summary.warnings
    assert "gpt-image-1 was shut down on 2026-10-23" in warning


async def test_the_mock_as_openai_refuses_retired_models_with_404(tmp_path: Path) -> None:
    async with MockServer(MockConfig(api_key=TEST_KEY, enforce_shutdown=True)) as server:
        manifest = tmp_path / "m.jsonl"
        manifest.write_text('{"prompt": "a", "model": "gpt-image-1"}\n')
        summary = await batchimg.arun(
            manifest,
            tmp_path / "out",
            batchimg.RunOptions(base_url=server.base_url, api_key=TEST_KEY),
        )
    (record,) = ledger(tmp_path / "out")
    assert record["error"]["code"] == "model_not_found" and record["error"]["http_status"] == 404
    assert summary.exit_code == 1


def test_check_models_asks_the_server_and_refuses_what_it_retired(tmp_path: Path) -> None:
    with threaded_mock(MockConfig(api_key=TEST_KEY)) as server:
        env = {"BATCHIMG_API_KEY": TEST_KEY}
        args = ["--base-url", server.base_url, "--check-models", "--out"]
        retired = tmp_path / "retired.jsonl"
        retired.write_text('{"prompt": "a", "model": "gpt-image-1"}\n')
        result = cli("run", str(retired), *args, str(tmp_path / "o1"), env=env)
        assert result.returncode == 2, result.stderr
        assert "line 1: model gpt-image-1 was shut down on 2026-10-23" in result.stderr
        missing = tmp_path / "missing.jsonl"
        missing.write_text('{"prompt": "a", "model": "gpt-image-2.6-flare"}\n'
                           '{"prompt": "b", "model": "gpt-image-9"}\n')  # fmt: skip
        result = cli("run", str(missing), *args, str(tmp_path / "o2"), env=env)
        assert result.returncode == 2 and "line 2: model gpt-image-9 is not listed" in result.stderr
        assert not any(r.endpoint == "generations" for r in server.requests)  # nothing sent
        current = tmp_path / "current.jsonl"
        current.write_text('{"prompt": "a", "model": "gpt-image-2.6-flare"}\n{"prompt": "b"}\n')
        result = cli("run", str(current), *args, str(tmp_path / "o3"), env=env)
        assert result.returncode == 0, result.stderr
        assert "model gpt-image-2.6-flare: served, no shutdown date announced" in result.stderr
        assert "model gpt-image-2.6-sunburst: served" in result.stderr  # the default model


def test_models_lists_the_catalog_with_lifecycle(tmp_path: Path) -> None:
    table = cli("models")
    assert table.returncode == 0
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[2:] if line.strip()}
    assert "shutdown 2026-10-23" in rows["gpt-image-1"]
    assert "gpt-image-2.5-sunburst" in rows["gpt-image-1"]
    assert "active" in rows["gpt-image-2.6-flare"] and "gif" in rows["gpt-image-2.6-flare"]
    data = json.loads(cli("models", "--format", "json").stdout)
    by_name = {m["model"]: m for m in data["models"]}
    assert data["default_model"] == "gpt-image-2.6-sunburst"
    assert by_name["gpt-image-2"]["custom_sizes"] is True
    assert by_name["gpt-image-2"]["names"] == ["gpt-image-2-2026-04-21"]
    assert by_name["gpt-image-2.5-flare"]["qualities"][-2:] == ["max", "auto"]
    assert by_name["gpt-image-1-mini"]["status"] == "shutdown"
    assert by_name["gpt-image-2.6-sunburst"]["tokens"] == "learned"


# -- overlays ----------------------------------------------------------------------------------


def test_a_catalog_file_adds_a_model_and_changes_a_rule(tmp_path: Path) -> None:
    overlay = tmp_path / "catalog.json"
    overlay.write_text(json.dumps({
        "name": "acme",
        "models": {
            "acme-image-1": {
                "extends": "gpt-image-2",
                "params": {"quality": {"values": ["draft", "final"], "default": "draft"},
                           "moderation": None},
                "tokens": {"output": "table", "per_image": {"draft": {"1024x1024": 100},
                                                            "final": {"1024x1024": 1000}}},
                "prices": {"per_1m_tokens": {"text_in": 1.0, "image_out": 10.0}},
            },
            "gpt-image-2": {"params": {"quality": {"values": ["low", "medium", "high", "xhigh",
                                                              "auto"]}}},
        },
    }))  # fmt: skip
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '{"model": "acme-image-1", "prompt": "abcd", "quality": "final", "size": "1024x1024"}\n'
        '{"model": "acme-image-1", "prompt": "abcd", "quality": "low"}\n'
        '{"model": "acme-image-1", "prompt": "abcd", "moderation": "low"}\n'
        '{"model": "gpt-image-2", "prompt": "abcd", "quality": "xhigh"}\n'
    )
    plain = cli("validate", str(manifest))
    assert plain.returncode == 1 and "warning: model 'acme-image-1'" in plain.stdout
    result = cli("validate", str(manifest), "--catalog", str(overlay))
    bad = [line.split(":")[1] for line in result.stdout.splitlines() if line.count(":") >= 2]
    assert bad == ["2", "3"], result.stdout  # draft/final only; moderation removed
    assert "warning" not in result.stdout  # now a known model
    estimate = cli("estimate", str(manifest), "--catalog", str(overlay), "--format", "json")
    groups = {g["quality"]: g for g in json.loads(estimate.stdout)["groups"]}
    assert groups["final"]["basis"] == "published"
    assert groups["final"]["cost_usd"] == pytest.approx((1 * 1.0 + 1000 * 10.0) / 1e6)
    assert json.loads(estimate.stdout)["price_table"] == "openai-2026-12-01+acme"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"models": {"x": {"extends": "nope"}}}', "no model 'nope' to extend"),
        ('{"models": {"gpt-image-2": {"colour": 1}}}', "unknown key(s) colour"),
        ('{"models": {"x": {"params": {"size": {"minimum": 1}}}}}', "unknown key(s) minimum"),
        ('{"models": {"x": {"prices": {"per_1m_tokens": {"text_in": -1}}}}}', "per_1m_tokens"),
        ('{"models": {"x": {"shutdown_date": "soon"}}}', "not a YYYY-MM-DD date"),
        ('{"models": {"a": {"extends": "b"}, "b": {"extends": "a"}}}', "in a loop"),
        ("{not json", "not valid JSON"),
        ('{"models": {"gpt-image-2": {"tokens": {"ceiling_per_megapixel": NaN}}}}', "finite"),
        ('{"models": {"gpt-image-2": {"tokens": {"ceiling_per_megapixel": 0}}}}', "> 0"),
        (
            '{"models": {"gpt-image-2": {"tokens": {"ceiling_per_megapixel": {"max": null}}}}}',
            "ceiling_per_megapixel.max",
        ),
        (
            '{"models": {"gpt-image-2": {"prices": {"per_1m_tokens": {"text_in": 1, '
            '"image_out": 1e400}}}}}',
            "per_1m_tokens",
        ),
        ('{"fields": [1, 2], "models": {}}', "fields: must be an object"),
        ('{"models": {"x": {"extends": ["gpt-image-2"]}}}', "must be the name of another model"),
        ('{"models": {"x": {"edits": {"max_images": "16"}}}}', "edits.max_images"),
        ('{"models": {"x": {"endpoints": ["variations"]}}}', "unknown endpoint(s) variations"),
        ('{"models": {"x": {"released": 5}}}', "not a YYYY-MM-DD date"),
        ('{"default_model": 5, "models": {}}', "default_model: must be a string"),
        (
            '{"models": {"gpt-image-2": {"params": {"quality": {"values": ["low"], '
            '"auto": {"estimate": 5}}}}}}',
            "params.quality.auto",
        ),
        (
            '{"models": {"gpt-image-2": {"params": {"size": {"values": ["auto"], '
            '"auto": {"estimate": "big"}}}}}}',
            "'big' is not a WIDTHxHEIGHT size",
        ),
        (
            '{"models": {"gpt-image-2.6-flare": {"formats": {"gif": {"sheet": {"grids": '
            "[[9, 2, 4, 2]]}}}}}}",
            "fewest frames must not exceed",
        ),
    ],
)
def test_a_bad_catalog_file_exits_2_naming_the_problem(
    tmp_path: Path, content: str, fragment: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    for command in (["validate", "jobs/example.jsonl"], ["models"]):
        result = cli(*command, "--catalog", str(bad))
        assert result.returncode == 2 and fragment in result.stderr, result.stderr
        assert str(bad) in result.stderr
    with pytest.raises(UsageError, match=r"bad\.json"):
        batchimg.run(
            "jobs/example.jsonl", tmp_path / "o", batchimg.RunOptions(mock=True, catalog=bad)
        )


async def test_default_model_is_current_and_the_modelverse_preset_keeps_gpt_image_1(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest([{"prompt": "a"}])
    for provider, model in (("openai", "gpt-image-2.6-sunburst"), ("modelverse", "gpt-image-1")):
        summary = await batchimg.arun(
            manifest,
            tmp_path / provider,
            batchimg.RunOptions(provider=provider, base_url=mock_server.base_url, api_key=TEST_KEY),
        )
        assert summary.exit_code == 0
        assert mock_server.requests[-1].params["model"] == model
    spec = Catalog.default().spec(Catalog.default().default_model)
    assert spec.status == "active" and spec.shutdown_date is None


def test_only_openais_own_host_is_openai() -> None:
    from batchimg.lifecycle import is_openai

    assert is_openai("openai", "https://api.openai.com/v1")
    assert is_openai("openai", "https://API.openai.com.:443/v1")
    assert not is_openai("openai", "https://api.openai.com.evil.example/v1")
    assert not is_openai("azure", "https://api.openai.com/v1")
    assert not is_openai("openai", "http://127.0.0.1:8000/v1")


def test_check_models_reads_dates_in_every_form_servers_give(tmp_path: Path) -> None:
    import datetime as dt

    from batchimg.lifecycle import check_served

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"prompt": "a", "model": "m"}\n')
    today = dt.date(2026, 12, 1)
    for retired in ("2026-12-01", "2020-01-01T00:00:00Z", 1577836800):
        with pytest.raises(UsageError, match="was shut down on 20"):
            check_served(manifest, "m", {"m": retired}, today, "GET /models")
    (line,) = check_served(manifest, "m", {"m": "2027-03-01T00:00:00Z"}, today, "GET /models")
    assert line == "model m: served until 2027-03-01"
    (line,) = check_served(manifest, "m", {"m": "yesterday"}, today, "GET /models")
    assert "'yesterday' is not a date" in line


async def test_a_model_added_by_extends_gets_no_ceiling_so_a_cap_cannot_be_overrun(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    """Token accounting is each model's own: a newer model described only by `extends` and
    prices has no ceiling, so under a cap it is refused until answers of it are known."""
    overlay = tmp_path / "c.json"
    prices = {"per_1m_tokens": {"text_in": 5, "image_in": 8, "image_out": 30}}
    newer = {"extends": "gpt-image-2.6-sunburst", "prices": prices}
    overlay.write_text(json.dumps({"models": {"gpt-image-3-preview": newer}}))
    manifest = write_manifest(
        [{"prompt": f"p{i}", "model": "gpt-image-3-preview", "quality": "max"} for i in range(4)]
    )
    capped = await batchimg.arun(
        manifest,
        tmp_path / "capped",
        batchimg.RunOptions(
            base_url=mock_server.base_url, api_key=TEST_KEY, catalog=overlay, max_cost_usd=3.0
        ),
    )
    assert capped.ok == 0 and capped.failures == {"unpriced_model": 4}
    assert not mock_server.requests  # nothing sent
    (record, *_) = ledger(tmp_path / "capped")
    assert "tokens.ceiling_per_megapixel" in record["error"]["message"]
    free = await batchimg.arun(
        manifest,
        tmp_path / "free",
        batchimg.RunOptions(base_url=mock_server.base_url, api_key=TEST_KEY, catalog=overlay),
    )
    assert free.ok == 4 and free.cost_usd > 0  # without a cap it runs, priced
