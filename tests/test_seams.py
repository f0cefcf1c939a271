"""The interfaces, each driven by an implementation of the test's own through the real engine:
a Backend that answers from a script, a Store whose temp area is elsewhere (and one that records
what it is given), an OutputLayout registered by name, and a Profile for a provider that
serves only generations."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import batchimg
from batchimg.backends import Answer, ClientConfig, OnlineBackend, Profile, Secret
from batchimg.config import RunConfig
from batchimg.engine import Engine
from batchimg.errors import Deferred, ErrorInfo, ItemFailed, ServerError
from batchimg.layouts import LAYOUTS, LayoutContext
from batchimg.limiter import Limiter
from batchimg.manifest import Item
from batchimg.mock import MockServer
from batchimg.options import RunOptions
from batchimg.pricing import PriceTable
from batchimg.stores import LocalStore
from tests.conftest import TEST_KEY
from tests.helpers import charges, last_states, ledger, unsettled


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


USAGE = {
    "input_tokens": 12,
    "output_tokens": 272,
    "total_tokens": 284,
    "input_tokens_details": {"text_tokens": 12, "image_tokens": 0},
}


@dataclass
class ScriptedBackend:
    """A Backend whose answers are written in each prompt's script: a list of steps per prompt,
    one per attempt ("500" raises a server error, "moderated" a refusal, "ok" answers with a
    b64 image and `USAGE`, "url" answers with a link that `fetch` serves)."""

    scripts: dict[str, list[str]]
    refuse: set[str] = field(default_factory=set)  # prompts `check` turns away
    answers_now: bool = True  # `online`: each attempt is answered while it waits
    sent: list[str] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return "scripted://"

    @property
    def online(self) -> bool:
        return self.answers_now

    def check(self, item: Item) -> ErrorInfo | None:
        if item.prompt in self.refuse:
            return ErrorInfo("this backend cannot send it", "unsupported", "local_error")
        return None

    async def send(self, item: Item, *, limit_bytes: int) -> Answer:
        assert limit_bytes > 0
        self.sent.append(item.prompt)
        step = self.scripts[item.prompt].pop(0)
        if step == "500":
            raise ServerError(ErrorInfo("boom", "server_error", http_status=500))
        if step == "moderated":
            raise ItemFailed(ErrorInfo("no", "moderation_blocked", http_status=400))
        if step == "later":
            raise Deferred(f"{item.id} is in a batch still running")
        entry = (
            {"url": f"scripted://{item.id}"}
            if step == "url"
            else {"b64_json": base64.b64encode(png((len(self.sent), 0, 0))).decode()}
        )
        return Answer(data=[entry], usage=USAGE, request_id=f"req-{len(self.sent)}",
                      latency_s=0.01, echo={})  # fmt: skip

    async def fetch(self, url: str, *, limit_bytes: int) -> bytes:
        self.fetched.append(url)
        return png((0, 0, 255))

    async def __aenter__(self) -> ScriptedBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def config_for(manifest: Path, out: Path, **options: Any) -> RunConfig:
    options.setdefault("backoff_base_s", 0.001)
    return RunConfig(manifest=manifest, out_dir=out, options=RunOptions(**options))


async def test_a_scripted_backend_drives_the_engine_through_retries_urls_and_refusals(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    lines = [
        {"id": "a", "prompt": "flaky", "model": "gpt-image-1"},
        {"id": "b", "prompt": "linked", "model": "gpt-image-1"},
        {"id": "c", "prompt": "blocked", "model": "gpt-image-1"},
        {"id": "d", "prompt": "not here", "model": "gpt-image-1"},
    ]
    backend = ScriptedBackend(
        {"flaky": ["500", "ok"], "linked": ["url"], "blocked": ["moderated"]},
        refuse={"not here"},
    )
    out = tmp_path / "out"
    store = LocalStore(out)
    summary = await Engine(config_for(write_manifest(lines), out), backend, store).run()

    states = last_states(out)
    assert (summary.ok, summary.failed) == (2, 2)
    assert states["a"]["status"] == "ok" and states["a"]["attempts"] == 2
    assert states["b"]["status"] == "ok" and backend.fetched == ["scripted://b"]
    assert (out / states["b"]["files"][0]).read_bytes() == png((0, 0, 255))
    assert states["c"]["error"]["code"] == "moderation_blocked"
    assert states["d"]["error"]["code"] == "unsupported"
    assert "not here" not in backend.sent  # refused by its rules: never sent
    expected, _ = PriceTable(batchimg.Catalog.default()).answer_cost(lines[0], USAGE)
    assert expected is not None and expected > 0
    assert states["a"]["cost_usd"] == pytest.approx(expected)
    assert summary.cost_usd == pytest.approx(2 * expected)
    assert charges(out) == []  # a 500 is not billed: no charge line for the first try


@pytest.mark.parametrize("online", [True, False])
async def test_only_an_online_backend_waits_for_the_per_minute_limiter(
    online: bool, tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    waits: list[float] = []
    now = [100.0]

    async def sleep(seconds: float) -> None:  # time moves only when the limiter waits
        waits.append(seconds)
        now[0] += seconds

    lines = [{"id": f"i{i}", "prompt": f"p{i}", "model": "gpt-image-1"} for i in range(4)]
    backend = ScriptedBackend({f"p{i}": ["ok"] for i in range(4)}, answers_now=online)
    limiter = Limiter(rpm=6, adaptive=False, clock=lambda: now[0], sleep=sleep)
    out = tmp_path / "out"
    config = config_for(write_manifest(lines), out, concurrency=1)
    summary = await Engine(config, backend, LocalStore(out), limiter=limiter).run()
    assert summary.ok == 4
    # 6 a minute admits one request every 10 s: online, the 2nd to 4th waited; else none did.
    assert (sum(waits) >= 29.0) if online else waits == []


async def test_an_item_a_backend_defers_is_pending_with_exit_75_and_done_next_run(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    lines = [{"id": "now", "prompt": "now"}, {"id": "later", "prompt": "later"}]
    backend = ScriptedBackend({"now": ["ok"], "later": ["later", "ok"]}, answers_now=False)
    out = tmp_path / "out"
    config = config_for(write_manifest(lines), out, max_cost_usd=5.0)
    summary = await Engine(config, backend, LocalStore(out)).run()
    assert (summary.ok, summary.pending, summary.exit_code) == (1, 1, 75)
    assert set(last_states(out)) == {"now"}  # no line for an item still pending
    (sent,) = [r for r in unsettled(out) if r["id"] == "later"]  # counted until answered
    assert sent["cost_bound_usd"] > 0

    again = await Engine(config, backend, LocalStore(out)).run()
    assert (again.ok, again.skipped, again.pending, again.exit_code) == (1, 1, 0, 0)


class RecordingStore(LocalStore):
    """A directory store whose temp area is outside the output directory, and which records
    every object put into it."""

    def __init__(self, root: Path, temps: Path) -> None:
        super().__init__(root, temp_dir=temps)
        self.put_names: list[str] = []

    def put(self, name: str, temp: Path) -> None:
        assert temp.parent == self.temp_dir  # everything arrives through the temp area
        self.put_names.append(name)
        super().put(name, temp)


def test_the_backend_writes_only_into_the_temp_area_the_store_hands_it(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    # Big enough that each answer streams to a temp file rather than staying in memory.
    lines = [{"id": f"i{i}", "prompt": f"p {i}", "size": "1024x1536"} for i in range(5)]
    out, temps = tmp_path / "out", tmp_path / "elsewhere"
    store = RecordingStore(out, temps)
    summary = batchimg.run(write_manifest(lines), out, RunOptions(mock=True), store=store)

    assert summary.ok == 5
    images = sorted(str(p.relative_to(out)) for p in (out / "images").iterdir())
    assert images == sorted(store.put_names)  # every image went through Store.put
    assert not (out / ".tmp").exists()
    assert {p.name for p in out.iterdir()} == {
        "images",
        "ledger.jsonl",
        "metadata.jsonl",
        ".batchimg.lock",
    }
    assert list(temps.iterdir()) == []  # nothing left behind in the temp area


@dataclass
class RecordingLayout:
    """An OutputLayout that only records what it is told, in order."""

    calls: list[str]

    @property
    def images_at(self) -> str:
        return "nowhere"

    def prepare(self) -> None:
        self.calls.append("prepare")

    def restore(self, record: Any) -> None:
        self.calls.append(f"restore {record['id']}")

    def resumed(self, done: Container[str]) -> None:
        self.calls.append(f"resumed {sorted(i for i in ('a', 'b', 'c') if i in done)}")

    def add(self, record: Any) -> None:
        self.calls.append(f"add {record['id']}")

    def sync(self) -> None:
        pass

    def close(self) -> None:
        self.calls.append("close")

    def abort(self) -> None:
        self.calls.append("abort")


async def test_a_layout_registered_by_name_is_told_each_step_in_order(
    tmp_path: Path, write_manifest: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def recording(context: LayoutContext) -> RecordingLayout:
        assert context.out_dir == tmp_path / "out"
        return RecordingLayout(calls)

    monkeypatch.setitem(LAYOUTS, "recording", recording)  # type: ignore[arg-type]
    out = tmp_path / "out"
    first = [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two"}]
    backend = ScriptedBackend({"one": ["ok"], "two": ["ok"], "three": ["ok"]})
    config = config_for(write_manifest(first), out, layout="recording")
    await Engine(config, backend, LocalStore(out)).run()
    assert calls[:2] == ["prepare", "resumed []"]
    assert sorted(calls[2:4]) == ["add a", "add b"] and calls[4:] == ["close"]

    calls.clear()
    config = config_for(write_manifest([*first, {"id": "c", "prompt": "three"}]), out,
                        layout="recording")  # fmt: skip
    summary = await Engine(config, backend, LocalStore(out)).run()
    assert summary.skipped == 2
    assert calls[0] == "prepare" and sorted(calls[1:3]) == ["restore a", "restore b"]
    assert calls[3:] == ["resumed ['a', 'b']", "add c", "close"]
    assert sorted(r["id"] for r in ledger(out)) == ["a", "b", "c"]


async def test_a_profile_that_serves_no_edits_fails_edit_items_without_sending(
    tmp_path: Path, mock_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "in.png")
    lines = [
        {"id": "gen", "prompt": "a", "model": "gpt-image-1", "quality": "low"},
        {"id": "edit", "prompt": "b", "model": "gpt-image-1", "image": "in.png"},
    ]
    profile = Profile(
        name="generations-only",
        default_base_url=None,
        key_env="GEN_ONLY_KEY",
        endpoints=frozenset({"generations"}),
    )
    out = tmp_path / "out"
    store = LocalStore(out)
    client = ClientConfig(base_url=mock_server.base_url, api_key=Secret(TEST_KEY), profile=profile)
    async with OnlineBackend(client, spool_dir=store.temp_dir) as backend:
        summary = await Engine(config_for(write_manifest(lines), out), backend, store).run()

    states = last_states(out)
    assert (summary.ok, summary.failed) == (1, 1)
    assert states["edit"]["error"]["code"] == "unsupported_endpoint"
    assert "generations-only does not serve images/edits" in states["edit"]["error"]["message"]
    assert [r.endpoint for r in mock_server.requests] == ["generations"]
