"""Image edits: inputs checked before any spend, the multipart body on the wire, retries, ledger."""

from __future__ import annotations

import hashlib
import io
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batchimg.catalog import Catalog
from batchimg.manifest import Item, read_manifest
from batchimg.mock import MockConfig, MockServer
from batchimg.pricing import usage_cost_usd
from tests.conftest import TEST_KEY
from tests.helpers import check_ok_record, last_states, ledger
from tests.helpers import run_on_mock as run

JOBS = Path(__file__).resolve().parent.parent / "jobs"


def make_image(
    path: Path, size: tuple[int, int] = (64, 64), fmt: str = "PNG", mode: str = "RGB"
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, (200, 120, 40, 255)[: len(mode)]).save(path, fmt)
    return path


def make_mask(path: Path, size: tuple[int, int] = (64, 64)) -> Path:
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1] // 2))
    mask.save(path, "PNG")
    return path


def sparse(path: Path, nbytes: int) -> Path:
    """A file that starts like a PNG and is nbytes long without using the disk."""
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.truncate(nbytes)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cases(d: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """Each invalid edit line (files made in d) and a fragment its error must contain."""
    make_image(d / "ok.png")
    (d / "text.png").write_bytes(b"hello, I am not a picture")
    (d / "folder.png").mkdir()
    make_image(d / "photo.jpg", fmt="JPEG")
    make_image(d / "wide.png", size=(96, 64))
    make_image(d / "rgb-mask.png")
    make_mask(d / "small-mask.png", size=(32, 32))
    make_image(d / "mask.webp", mode="RGBA", fmt="WEBP")
    sparse(d / "huge.png", 50 * 1024 * 1024 + 1)
    sparse(d / "big-mask.png", 4 * 1024 * 1024 + 1)
    sparse(d / "big-dalle.png", 4 * 1024 * 1024 + 1)
    return {
        "missing": ({"image": "nope.png"}, "'nope.png' not found"),
        "unreadable": ({"image": "folder.png"}, "'folder.png' cannot be read"),
        "not-an-image": ({"image": "text.png"}, "'text.png' is not a readable image"),
        "over-50mb": ({"image": "huge.png"}, "the limit is 50 MB"),
        "too-many": ({"image": ["ok.png"] * 17}, "17 input images"),
        "mask-not-png": ({"image": "ok.png", "mask": "mask.webp"}, "'mask.webp' is a WEBP"),
        "mask-no-alpha": ({"image": "ok.png", "mask": "rgb-mask.png"}, "no alpha channel"),
        "mask-size": ({"image": "ok.png", "mask": "small-mask.png"}, "must match"),
        "mask-over-4mb": ({"image": "ok.png", "mask": "big-mask.png"}, "the limit is 4 MB"),
        "dalle2-not-square": (
            {"image": "wide.png", "model": "dall-e-2", "size": "256x256"},
            "square PNG",
        ),
        "dalle2-jpeg": (
            {"image": "photo.jpg", "model": "dall-e-2", "size": "256x256"},
            "'photo.jpg' is a JPEG; expected PNG",
        ),
        "dalle2-over-4mb": (
            {"image": "big-dalle.png", "model": "dall-e-2", "size": "256x256"},
            "the limit is 4 MB",
        ),
        "dalle3": ({"image": "ok.png", "model": "dall-e-3"}, "does not support image edits"),
        "moderation-on-edits": ({"image": "ok.png", "moderation": "low"}, "'moderation'"),
        "fidelity-on-mini": (
            {"image": "ok.png", "model": "gpt-image-1-mini", "input_fidelity": "high"},
            "'input_fidelity'",
        ),
    }


CASES = [
    "missing", "unreadable", "not-an-image", "over-50mb", "too-many", "mask-not-png",
    "mask-no-alpha", "mask-size", "mask-over-4mb", "dalle2-not-square", "dalle2-jpeg",
    "dalle2-over-4mb", "dalle3", "moderation-on-edits", "fidelity-on-mini",
]  # fmt: skip


def test_every_case_is_listed(tmp_path: Path) -> None:
    assert sorted(_cases(tmp_path)) == sorted(CASES)


@pytest.mark.parametrize("case", CASES)
async def test_bad_input_fails_its_item_alone_and_is_never_sent(
    case: str, tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    fields, fragment = _cases(tmp_path)[case]
    manifest = write_manifest(
        [
            {"id": "good", "prompt": "a good edit", "image": "ok.png", "quality": "low"},
            {"id": "bad", "prompt": "a bad edit", **fields},
            {"id": "after", "prompt": "another good edit", "image": ["ok.png", "ok.png"]},
        ]
    )
    summary = await run(manifest, tmp_path / "out", mock_server)
    states = last_states(tmp_path / "out")
    assert (summary.ok, summary.failed) == (2, 1)
    assert states["good"]["status"] == states["after"]["status"] == "ok"
    error = states["bad"]["error"]
    assert error["code"] == "invalid_manifest_line"
    assert error["message"].startswith("line 2: "), error["message"]
    assert fragment in error["message"], error["message"]
    assert states["bad"]["endpoint"] == "edits" and states["bad"]["attempts"] == 0
    assert sorted(r.prompt or "" for r in mock_server.requests) == [
        "a good edit",
        "another good edit",
    ]


async def test_format_is_judged_by_bytes_not_by_extension(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    make_image(tmp_path / "really-a-jpeg.png", fmt="JPEG")
    manifest = write_manifest([{"prompt": "p", "image": "really-a-jpeg.png", "quality": "low"}])
    summary = await run(manifest, tmp_path / "out", mock_server)
    assert summary.ok == 1
    ((field, filename, content_type, digest),) = mock_server.requests[0].files
    assert (field, filename, content_type) == ("image", "really-a-jpeg.png", "image/jpeg")
    assert digest == sha(tmp_path / "really-a-jpeg.png")


async def test_one_image_several_images_and_a_mask_on_the_wire(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    a = make_image(tmp_path / "a.png")
    b = make_image(tmp_path / "b.webp", fmt="WEBP")
    m = make_mask(tmp_path / "m.png")
    manifest = write_manifest(
        [
            {"id": "one", "prompt": "one", "image": "a.png", "n": 2, "size": "1024x1536"},
            {"id": "two", "prompt": "two", "image": ["a.png", "b.webp"], "mask": "m.png"},
        ]
    )
    summary = await run(manifest, tmp_path / "out", mock_server, concurrency=1)
    assert summary.ok == 2
    one, two = sorted(mock_server.requests, key=lambda r: r.prompt or "")
    assert one.files == [("image", "a.png", "image/png", sha(a))]
    assert one.params["n"] == 2 and one.params["size"] == "1024x1536"
    assert one.params["model"] == Catalog.default().default_model and one.params["prompt"] == "one"
    assert two.files == [
        ("image[]", "a.png", "image/png", sha(a)),
        ("image[]", "b.webp", "image/webp", sha(b)),
        ("mask", "m.png", "image/png", sha(m)),
    ]


async def test_retried_edit_resends_a_complete_body(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    a = make_image(tmp_path / "a.png", size=(128, 128))
    b = make_image(tmp_path / "b.jpg", size=(128, 128), fmt="JPEG")
    m = make_mask(tmp_path / "m.png", size=(128, 128))
    prompt = "[[mock:fail=2]] a retried edit"
    manifest = write_manifest(
        [{"id": "r", "prompt": prompt, "image": ["a.png", "b.jpg"], "mask": "m.png"}]
    )
    summary = await run(manifest, tmp_path / "out", mock_server, max_attempts=3)
    assert summary.ok == 1
    attempts = [r for r in mock_server.requests if r.prompt == prompt]
    assert [r.status for r in attempts] == [500, 500, 200]
    expected = [
        ("image[]", "a.png", "image/png", sha(a)),
        ("image[]", "b.jpg", "image/jpeg", sha(b)),
        ("mask", "m.png", "image/png", sha(m)),
    ]
    for attempt in attempts:  # every attempt carried every byte, not a consumed body
        assert attempt.files == expected
    (record,) = ledger(tmp_path / "out")
    assert record["attempts"] == 3
    check_ok_record(tmp_path / "out", record)


async def test_paths_resolve_against_the_manifest_not_the_working_directory(
    tmp_path: Path, mock_server: MockServer
) -> None:
    job = tmp_path / "deep" / "job"
    make_image(job / "inputs" / "x.png")
    absolute = make_image(tmp_path / "elsewhere" / "y.png")
    manifest = job / "m.jsonl"
    manifest.write_text(
        '{"id": "rel", "prompt": "relative", "image": "inputs/x.png"}\n'
        f'{{"id": "abs", "prompt": "absolute", "image": "{absolute}"}}\n'
    )
    assert Path.cwd() != job
    summary = await run(manifest, tmp_path / "out", mock_server)
    assert summary.ok == 2
    states = last_states(tmp_path / "out")
    assert states["rel"]["inputs"] == [
        {"path": "inputs/x.png", "sha256": sha(job / "inputs/x.png")}
    ]
    assert states["abs"]["inputs"][0]["sha256"] == sha(absolute)


async def test_edit_example_job_outputs_and_ledger_match_the_contract(
    tmp_path: Path, mock_server: MockServer
) -> None:
    out = tmp_path / "out"
    summary = await run(JOBS / "edit-example.jsonl", out, mock_server)
    records = ledger(out)
    assert summary.exit_code == 0 and summary.ok == len(records) == 8
    for record in records:
        check_ok_record(out, record)
        assert record["endpoint"] == "edits"
        for entry in record["inputs"]:
            assert entry["sha256"] == sha(JOBS / entry["path"])
        usage = record["usage"]
        assert usage["input_tokens_details"]["image_tokens"] > 0
        assert record["cost_usd"] == pytest.approx(usage_cost_usd(record["model"], usage))
    by_id = {r["id"]: r for r in records}
    assert by_id["mug-beach-ball"]["mask"]["path"] == "edit-inputs/mug-mask.png"
    assert len(by_id["gift-basket"]["inputs"]) == 3
    assert by_id["mug-marble"]["mask"] is None
    assert len(by_id["plant-variations"]["files"]) == 2
    # three 512x512 inputs: 3 x (85 + 170 x 1 tile), priced at the image-input rate
    assert by_id["gift-basket"]["usage"]["input_tokens_details"]["image_tokens"] == 765


async def test_edits_survive_injected_faults_and_each_output_belongs_to_its_line(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    make_image(tmp_path / "a.png", size=(96, 96))
    make_image(tmp_path / "b.jpg", size=(96, 96), fmt="JPEG")
    make_mask(tmp_path / "m.png", size=(96, 96))
    lines = []
    for i in range(30):
        line: dict[str, Any] = {"id": f"e{i}", "prompt": f"edit number {i}", "quality": "low"}
        line["image"] = ["a.png", "b.jpg"] if i % 3 == 0 else "a.png"
        if i % 2:
            line["mask"] = "m.png"
        line["n"] = 1 + i % 2
        lines.append(line)
    manifest = write_manifest(lines)
    config = MockConfig(api_key=TEST_KEY, error_rate=0.2, rate_limit_rate=0.1, seed=11,
                        retry_after_s=0.01)  # fmt: skip
    async with MockServer(config) as server:
        summary = await run(manifest, tmp_path / "out", server, max_attempts=12, concurrency=6)
        assert summary.ok == 30 and summary.exit_code == 0
        failed = [r for r in server.requests if r.status != 200]
        assert len(failed) >= 5  # the faults really happened
        by_request_id = {r.request_id: r for r in server.requests}
    for record in ledger(tmp_path / "out"):
        check_ok_record(tmp_path / "out", record)
        served = by_request_id[record["request_id"]]
        assert served.status == 200 and served.prompt == record["prompt"]
        assert served.served_sha256 == record["sha256"]  # the files are that answer's images
        sent = [f[3] for f in served.files if f[0] != "mask"]
        assert sent == [i["sha256"] for i in record["inputs"]]


def test_reusing_one_input_thousands_of_times_reads_it_once(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    noise = Image.frombytes("RGB", (600, 600), os.urandom(600 * 600 * 3))
    noise.save(big, "PNG")
    assert big.stat().st_size > 1_000_000
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "".join(f'{{"prompt": "variation {i}", "image": "big.png"}}\n' for i in range(3000))
    )
    tracemalloc.start()
    items = [entry for entry in read_manifest(manifest) if isinstance(entry, Item)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(items) == 3000
    assert len({id(item.images[0]) for item in items}) == 1  # one shared description
    assert peak < 8 * 1024 * 1024  # not 3000 copies of a 1 MB file
    with Image.open(io.BytesIO(big.read_bytes())) as im:
        assert im.size == (600, 600)
