"""`report --html`: the page from the real engine's output, checked as data and in a browser.

The browser is headless Chromium (Debian's `chromium`, which `.ci/run` installs) driven by
Playwright: the page loads from disk with JavaScript on, the filters change what is shown,
nothing is logged as an error, and a screenshot is written.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from PIL import Image

from batchimg.mock import MockServer
from tests.helpers import ledger, run_cli
from tests.helpers import run_on_mock as run

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: A prompt (and an id, and metadata) that would run script if the page let it out of its text.
HOSTILE = (
    'a "quoted" prompt" onmouseover="window.__pwned=1" x=" '
    "<img src=x onerror=window.__pwned=1> it's"
)

LINES = [
    {"id": "fox", "prompt": "a fox", "model": "gpt-image-2", "quality": "low",
     "metadata": {"split": "train", "style": "ink", "flag": True, "tags": ["a", "b"]}},
    {"id": "owl", "prompt": "an owl", "model": "gpt-image-2", "quality": "medium", "n": 2,
     "metadata": {"split": "val", "style": "ink"}},
    {"id": "kite", "prompt": "a kite", "model": "gpt-image-2.6-flare", "quality": "low",
     "output_format": "webp", "metadata": {"split": "train", "style": "flat"}},
    {"id": "icon", "prompt": "an icon", "model": "gpt-image-2.6-sunburst", "quality": "low",
     "output_format": "svg", "metadata": {"split": "train", "style": "flat"}},
    {"id": "spin", "prompt": "a spinner", "model": "gpt-image-2.6-flare", "quality": "low",
     "output_format": "gif", "frame_count": 4, "size": "512x512",
     "metadata": {"split": "val", "style": "flat"}},
    {"id": "bad", "prompt": "[[mock:moderation]] no", "model": "gpt-image-2",
     "metadata": {"split": "train", "style": "ink"}},
    {"id": "x\"><b>", "prompt": HOSTILE, "model": "gpt-image-2", "quality": "low",
     "metadata": {"split": "</script><script>window.__pwned=1</script>", "style": "ink"}},
]  # fmt: skip


async def made(
    tmp_path: Path, server: MockServer, write: Callable[..., Path], **options: Any
) -> Path:
    out = tmp_path / "out"
    summary = await run(write(LINES), out, server, **options)
    assert (summary.ok, summary.failed) == (6, 1)
    return out


def tiles(page: str) -> dict[str, str]:
    return dict(re.findall(r'data-total="([^"]+)">([^<]*)<', page))


async def test_the_page_agrees_with_report_json_and_has_one_thumbnail_per_image(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    out = await made(tmp_path, mock_server, write_manifest)
    page_file = out / "report.html"
    built = run_cli("report", str(out), "--by", "model", "--html", str(page_file))
    assert built.returncode == 0, built.stderr
    page = page_file.read_text()
    data = orjson.loads(run_cli("report", str(out), "--by", "model", "--format", "json").stdout)
    total = data
    shown = tiles(page)
    assert shown["items"] == str(total["items"]) and shown["ok"] == str(total["ok"])
    assert shown["failed"] == "1" and shown["images"] == str(total["images"])
    assert shown["cost"] == f"${total['total_cost_usd']:,.4f}"
    for group in data["groups"]:  # the money table: one row per group, with its cost
        assert f"<td>{group['key']['model']}</td>" in page and f"${group['cost_usd']:,.4f}" in page
    # Failures grouped by code, with the API's words and the example's id.
    failure = re.search(r'data-code="moderation_blocked".*?</div>', page, re.S)
    assert failure is not None and "safety system" in failure.group(0) and "bad" in failure.group(0)
    # One thumbnail per image (by content): small WebP, or the SVG as a file, never inlined.
    folder = out / "report_files"
    digests = {d for r in ledger(out) if r["status"] == "ok" for d in r["sha256"]}
    thumbs = {p.name.split(".")[0]: p for p in (folder / "thumbs").iterdir()}
    assert set(thumbs) == digests
    for digest, path in thumbs.items():
        if path.suffix == ".webp":
            with Image.open(path) as im:
                assert im.format == "WEBP" and max(im.size) <= 256
        else:
            assert path.suffix == ".svg"
            svg = path.read_bytes()
            assert hashlib.sha256(svg).hexdigest() == digest and svg not in page.encode()
    assert "<svg xmlns" not in page  # the page's charts are inline, the outputs are not
    rows = [row for chunk in sorted(folder.glob("rows-*.js")) for row in
            orjson.loads(chunk.read_text()[len("batchimgRows(0,"):-3])]  # fmt: skip
    assert len(rows) == total["images"] + 1  # every image, and the failed item
    assert "onerror=window" not in page and "<script>window" not in page
    # Made once: a second build reuses every thumbnail.
    again = run_cli("report", str(out), "--html", str(page_file))
    assert "0 thumbnails made" in again.stdout


async def test_webdataset_shards_have_their_thumbnails_too(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    out = await made(tmp_path, mock_server, write_manifest, layout="webdataset", shard_size=2)
    assert not list((out / "images").glob("*"))  # all packed
    built = run_cli("report", str(out), "--html", str(tmp_path / "page.html"))
    assert built.returncode == 0, built.stderr
    digests = {d for r in ledger(out) if r["status"] == "ok" for d in r["sha256"]}
    assert {p.name.split(".")[0] for p in (tmp_path / "page_files" / "thumbs").iterdir()} == digests


def test_report_groups_only_what_items_or_bills_made(tmp_path: Path) -> None:
    """`sent` and `settled` lines make no group of their own (they used to, as empty rows)."""
    lines = [
        {"record": "sent", "id": "a", "run_id": "r", "attempt": 1, "model": "m",
         "cost_bound_usd": 0.1},
        {"id": "a", "status": "ok", "model": "m", "quality": "low", "files": [], "run_id": "r",
         "attempts": 1, "cost_usd": 0.05},
    ]  # fmt: skip
    (tmp_path / "ledger.jsonl").write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    data = orjson.loads(run_cli("report", str(tmp_path), "--by", "quality", "--format",
                                "json").stdout)  # fmt: skip
    assert [g["key"] for g in data["groups"]] == [{"quality": "low"}]


@pytest.mark.timeout(120)
async def test_the_page_in_a_real_browser(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    if CHROMIUM is None:
        if os.environ.get("BATCHIMG_REQUIRE_BROWSER"):
            pytest.fail("Chromium is required here (BATCHIMG_REQUIRE_BROWSER) but not found")
        pytest.skip("no Chromium on this machine (`apt-get install chromium`)")
    out = await made(tmp_path, mock_server, write_manifest)
    page_file = out / "report.html"
    assert run_cli("report", str(out), "--by", "model", "--html", str(page_file)).returncode == 0
    shot = Path(os.environ.get("BATCHIMG_SCREENSHOT") or tmp_path / "report.png")
    import anyio.to_thread

    seen = await anyio.to_thread.run_sync(browse, page_file, shot)
    assert seen["errors"] == []
    assert seen["all"] == 8  # 7 images of 6 items, and the failed item
    assert seen["pwned"] is None and seen["handlers"] == 0  # the hostile text stayed text
    assert seen["failed"] == 1 and seen["failed_status"] == ["error"]
    assert seen["flat"] == 3  # metadata.style = flat: kite, icon, spin
    assert seen["flagged"] == ["fox"]
    assert seen["images_loaded"] >= 6  # thumbnails (webp, svg via <img>) decoded
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width >= 1000


def browse(page_file: Path, shot: Path) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_file.as_uri())
            page.wait_for_selector(".card")
            page.wait_for_load_state("networkidle")
            seen: dict[str, Any] = {"all": page.locator(".card").count()}
            for card in page.locator(".card").all():
                card.hover()  # an injected onmouseover would run now
            seen["pwned"] = page.evaluate("window.__pwned === undefined ? null : window.__pwned")
            seen["handlers"] = page.evaluate(
                "document.querySelectorAll('[onmouseover],[onerror],script:not([src])').length - 1"
            )  # the page's own inline script is the one allowed
            seen["images_loaded"] = page.evaluate(
                "[...document.querySelectorAll('.card img')]"
                ".filter(i => i.complete && i.naturalWidth > 0).length"
            )
            page.screenshot(path=str(shot), full_page=True)
            page.select_option('select[data-filter="status"]', "error")
            page.wait_for_function("document.querySelectorAll('.card').length === 1")
            seen["failed"] = page.locator(".card").count()
            seen["failed_status"] = page.eval_on_selector_all(
                ".card", "cards => cards.map(c => c.dataset.status)"
            )
            page.select_option('select[data-filter="status"]', "")
            page.select_option('select[data-filter="metadata.style"]', "flat")
            page.wait_for_function("document.querySelectorAll('.card').length === 3")
            seen["flat"] = page.locator(".card").count()
            page.select_option('select[data-filter="metadata.style"]', "")
            page.select_option('select[data-filter="metadata.flag"]', "true")  # not a string
            page.wait_for_function("document.querySelectorAll('.card').length === 1")
            seen["flagged"] = page.locator(".card .id").all_inner_texts()
            seen["errors"] = errors
            return seen
        finally:
            browser.close()


def test_a_hostile_ledger_neither_scripts_nor_escapes_the_page(tmp_path: Path) -> None:
    """Ledger lines written by hand, as a hostile or broken tool could: a sha256 that is not
    one, a file outside the output directory, an image too large to decode, metadata of every
    type and a key with a value per item. The page is made, small, and nothing leaks into it."""
    from PIL import Image

    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(out / "images" / "a.png")
    Image.new("1", (20_000, 10_000)).save(out / "images" / "bomb.png")  # 200 MP, a few KB
    (tmp_path / "secret.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'>secret</svg>")

    def ok(id_: str, name: str, digest: str, **extra: Any) -> dict[str, Any]:
        return {"id": id_, "status": "ok", "prompt": "p", "model": "m", "files": [name],
                "sha256": [digest], "bytes": [1], "cost_usd": 0.01, **extra}  # fmt: skip

    real = hashlib.sha256((out / "images" / "a.png").read_bytes()).hexdigest()
    lines = [
        ok("quote", "images/a.png", 'x" onerror="window.__pwned=1" y="'),
        ok("escape", "../secret.svg", "f" * 64),
        ok("bomb", "images/bomb.png", "e" * 64),
        ok("odd", "images/a.png", real, model=["a", "list"], metadata={"flag": None, "d": {}}),
        {"id": "files-int", "status": "ok", "files": 5, "sha256": 5},
        *(ok(f"u{i}", "images/a.png", real, metadata={"caption": f"c{i}"}) for i in range(60)),
    ]
    (out / "ledger.jsonl").write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    page_file = out / "report.html"
    built = run_cli("report", str(out), "--html", str(page_file))
    assert built.returncode == 0, built.stderr
    folder = out / "report_files"
    thumbs = {p.name for p in (folder / "thumbs").iterdir()}
    assert thumbs == {f"{real}.webp"}  # not the quote, not the secret, not the bomb
    assert not list(tmp_path.glob("*.webp")) and "secret" not in page_file.read_text()
    page = page_file.read_text()
    assert 'type="search"' in page and 'data-filter="metadata.caption"' in page  # 60 values
    assert len(page) < 60_000
    rows = orjson.loads(next(folder.glob("rows-*.js")).read_text()[len("batchimgRows(0,") : -3])
    assert {r["id"]: r["thumb"] for r in rows}["quote"] is None
