"""Answers a broken or hostile server sends, each failing its item (never the run) with its
cost kept: keys spelled with JSON escapes, image links no client can follow, our own key echoed
back; and a key that no HTTP header can carry."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from PIL import Image

import batchimg
from batchimg.backends.online import scrub_secret
from tests.helpers import charges, ledger, ledger_lines, run_cli

KEY = "sk-hostile-0123456789abcdefSECRET"
USAGE = {"total_tokens": 282, "input_tokens": 10, "output_tokens": 272,
         "input_tokens_details": {"text_tokens": 10, "image_tokens": 0}}  # fmt: skip
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """Start a server answering image requests with `handler`; gives its base URL."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/v1/images/generations", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/v1"

    yield start
    for runner in runners:
        await runner.cleanup()


async def run(base_url: str, manifest: Path, out: Path, **options: Any) -> batchimg.Summary:
    events: list[batchimg.ProgressEvent] = []
    options.setdefault("backoff_base_s", 0.001)
    summary = await batchimg.arun(
        manifest,
        out,
        batchimg.RunOptions(base_url=base_url, api_key=KEY, **options),
        progress=events.append,
    )
    summary.warnings.extend(e.message or "" for e in events if e.message)
    return summary


def manifest_of(tmp_path: Path, count: int, **fields: Any) -> Path:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b"".join(
        orjson.dumps({"id": f"h{i}", "prompt": f"hostile {i}", "model": "gpt-image-1",
                      "quality": "low", "size": "1024x1024", **fields}) + b"\n"
        for i in range(count)
    ))  # fmt: skip
    return path


async def test_an_escaped_b64_json_key_fails_its_item_and_keeps_the_cost(
    serve: Callable[[Handler], Awaitable[str]], tmp_path: Path
) -> None:
    # `b64\u005fjson` is the same key to a JSON parser, but not to a byte scanner.
    body = ('{"created": 1, "data": [{"b64_json": "' + png_b64() + '"}, {"b64\\u005fjson": ""}],'
            ' "usage": ' + orjson.dumps(USAGE).decode() + "}").encode()  # fmt: skip

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    out = tmp_path / "out"
    summary = await run(await serve(answer), manifest_of(tmp_path, 4, n=2), out, max_attempts=1)
    assert (summary.ok, summary.failed) == (0, 4)
    for record in ledger(out):
        assert record["error"]["code"] == "bad_image"
        assert record["cost_usd"] is not None and record["cost_usd"] > 0  # billed: kept
    assert list((out / ".tmp").iterdir()) == []  # nothing spooled is left behind


@pytest.mark.parametrize("link", ["//evil/x", "http://a..b/x", "http://$(x).com/x", "ftp://a/x"])
async def test_an_image_link_no_client_can_follow_fails_its_item_alone(
    serve: Callable[[Handler], Awaitable[str]], tmp_path: Path, link: str
) -> None:
    async def answer(request: web.Request) -> web.Response:
        prompt = (await request.json())["prompt"]
        entry = {"url": link} if prompt.endswith(" 3") else {"b64_json": png_b64()}
        return web.json_response({"created": 1, "data": [entry], "usage": USAGE})

    out = tmp_path / "out"
    summary = await run(await serve(answer), manifest_of(tmp_path, 8), out, concurrency=8)
    states = {r["id"]: r for r in ledger(out)}
    assert (summary.ok, summary.failed) == (7, 1)  # the others, in flight with it, all kept
    # Refused as a link, or (a host name that parses) not found: that item alone.
    assert states["h3"]["error"]["code"] in ("bad_url", "connect_error")
    assert states["h3"]["cost_usd"] is not None  # the answer was billed


async def test_our_key_echoed_by_a_server_never_reaches_the_ledger_or_the_messages(
    serve: Callable[[Handler], Awaitable[str]], tmp_path: Path
) -> None:
    async def answer(request: web.Request) -> web.Response:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        prompt = (await request.json())["prompt"]
        headers = {"x-request-id": f"req-{key}"}
        if prompt.endswith(" 0"):
            error = {"error": {"message": f"bad things for {key}", "type": "invalid_request_error",
                               "code": f"no_{key}"}}  # fmt: skip
            return web.json_response(error, status=400, headers=headers)
        body = {"created": 1, "data": [{"b64_json": png_b64()}], "usage": USAGE,
                "svg_usage": {"note": key, key: 1}}  # fmt: skip
        return web.json_response(body, headers=headers)

    out = tmp_path / "out"
    summary = await run(await serve(answer), manifest_of(tmp_path, 3), out)
    assert (summary.ok, summary.failed) == (2, 1)
    written = (out / "ledger.jsonl").read_text()
    assert KEY not in written and "***" in written
    assert all(KEY not in w for w in summary.warnings)
    for path in out.rglob("*"):
        assert not path.is_file() or KEY.encode() not in path.read_bytes()
    assert all(KEY not in str(r) for r in ledger_lines(out))
    assert charges(out) == []


def test_a_key_no_header_can_carry_is_exit_2_and_never_shown(tmp_path: Path) -> None:
    result = run_cli(
        "run", str(manifest_of(tmp_path, 1)), "--out", str(tmp_path / "out"),
        "--base-url", "http://127.0.0.1:9/v1", env={"BATCHIMG_API_KEY": "sk-abc\ndef-LEAK"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "line break" in result.stderr and "Traceback" not in result.stderr
    assert "LEAK" not in result.stderr


def test_the_key_is_cut_out_where_it_is_and_nowhere_else() -> None:
    key = "sk-0123456789abcdef"
    said = {"message": f"bad {key}!", key: [f"x{key}"], "usage": {"text_tokens": 3}}
    assert scrub_secret(said, key) == {"message": "bad ***!", "***": ["x***"],
                                       "usage": {"text_tokens": 3}}  # fmt: skip
    # A local gateway's "x" is no secret: cutting it out would garble every word with an x.
    assert scrub_secret({"text_tokens": 3}, "x") == {"text_tokens": 3}
