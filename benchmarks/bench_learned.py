"""Costs nobody publishes: how close a learned estimate comes, and how much the cap holds back.

    python benchmarks/bench_learned.py [--items 40]

gpt-image-2 and later bill output tokens by a formula OpenAI does not publish; the mock bills
by one of its own that batchimg never sees. Two figures, both against the mock in this process:

- **learned estimate**: run a manifest (every group of the example job, `--items` prompts
  spread over them), then `estimate --from-ledger` a second manifest of the same groups with
  new prompts, and compare with what the mock bills for it;
- **held back**: runs under `--max-cost` at several caps; the cap must never be exceeded, and
  the money it leaves unspent (held back because the next item's bound did not fit) should be
  a small share of the cap once answers have tightened the bounds.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path
from typing import Any

import anyio
import orjson

import batchimg
from batchimg.estimate import estimate_manifest
from batchimg.mock import MockConfig, MockServer
from batchimg.pricing import PriceTable

KEY = "sk-bench-learned"
EXAMPLE = Path(__file__).resolve().parent.parent / "jobs" / "example.jsonl"


def billed(server: MockServer, since: int = 0) -> float:
    table = PriceTable.default()
    total = 0.0
    for request in server.requests[since:]:
        if request.status == 200 and request.usage is not None:
            params = {**request.params, "model": request.model}
            total += table.request_cost(params, request.usage) or 0.0
    return total


def write(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


def variants(count: int, tag: str) -> list[dict[str, Any]]:
    job = [orjson.loads(line) for line in EXAMPLE.read_bytes().splitlines()
           if line.strip() and not line.startswith(b"#")]  # fmt: skip
    return [{**job[i % len(job)], "id": f"{tag}{i}", "prompt": f"{job[i % len(job)]['prompt']} "
             f"({tag}{i})"} for i in range(count)]  # fmt: skip


async def learned(tmp: Path, items: int) -> None:
    async with MockServer(MockConfig(api_key=KEY)) as server:
        first = write(tmp / "first.jsonl", variants(items, "a"))
        second = write(tmp / "second.jsonl", variants(items, "b"))
        await batchimg.arun(
            first, tmp / "first", batchimg.RunOptions(base_url=server.base_url, api_key=KEY)
        )
        estimate = estimate_manifest(second, ledgers=[tmp / "first"])
        before = len(server.requests)
        await batchimg.arun(
            second, tmp / "second", batchimg.RunOptions(base_url=server.base_url, api_key=KEY)
        )
        bill = billed(server, before)
    error = (estimate.total_cost_usd - bill) / bill
    print(f"| {items} | {len(estimate.groups)} | ${estimate.total_cost_usd:.4f} | "
          f"${estimate.cost_low_usd:.4f}-{estimate.cost_high_usd:.4f} | ${bill:.4f} | "
          f"{error:+.2%} |")  # fmt: skip


async def capped(tmp: Path, name: str, line: dict[str, Any], count: int, cap: float) -> None:
    lines = [{**line, "id": f"c{i}", "prompt": f"{line['prompt']} {i}"} for i in range(count)]
    manifest = write(tmp / f"{name}-{cap}.jsonl", lines)
    async with MockServer(MockConfig(api_key=KEY, latency_s=0.05)) as server:
        summary = await batchimg.arun(
            manifest,
            tmp / f"{name}-{cap}",
            batchimg.RunOptions(
                base_url=server.base_url, api_key=KEY, max_cost_usd=cap, concurrency=8
            ),
        )
        bill = billed(server)
    assert bill <= cap + 1e-9, (name, cap, bill)
    held = summary.held_back_usd
    bound = summary.next_bound
    last = f"${bound.cost_usd:.4f} ({bound.basis})" if bound else "- (all done)"
    share = "-" if held is None else f"{held / cap:.1%}"
    print(f"| {name} | ${cap:.2f} | {summary.ok}/{count} | ${bill:.4f} | "
          f"{'-' if held is None else f'${held:.4f}'} | {share} | {last} |")  # fmt: skip


async def main(items: int) -> None:
    print(f"machine: {platform.machine()}, Python {platform.python_version()}\n")
    print("### learned estimate (a second manifest of the same groups)\n")
    print("| prompts | groups | estimate | range | mock billed | error |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        await learned(Path(tmp), items)
    print("\n### --max-cost: what the cap held back\n")
    print("| requests | cap | done | billed | held back | of the cap | next item's bound |")
    print("|---|---|---|---|---|---|---|")
    scenarios = [
        ("gpt-image-2.6-sunburst 2560x1440 max", {"model": "gpt-image-2.6-sunburst",
         "prompt": "a cathedral", "size": "2560x1440", "quality": "max"}, 40, (1.0, 3.0, 10.0)),
        ("gpt-image-2 1536x864 medium", {"model": "gpt-image-2", "prompt": "a harbour",
         "size": "1536x864", "quality": "medium"}, 60, (0.5, 1.5)),
        ("gpt-image-2.6-flare gif 9 x 512x512 low", {"model": "gpt-image-2.6-flare",
         "prompt": "a spinner", "output_format": "gif", "size": "512x512", "quality": "low"},
         60, (0.2, 0.5)),
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, line, count, caps in scenarios:
            for cap in caps:
                await capped(Path(tmp), name.split()[0], line | {"prompt": name}, count, cap)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=78)
    anyio.run(main, parser.parse_args().items)
