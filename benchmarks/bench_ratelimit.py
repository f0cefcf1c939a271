"""Rate limiting: batchimg against a mock limited to 20 requests/s, beside the peer baseline.

    python benchmarks/bench_ratelimit.py [--items 300] [--concurrency 32] [--rpm-limit 1200]

Scenarios, each against a fresh mock process (`batchimg mock --rpm-limit`, enforced per second):
batchimg with no limiter flags, batchimg with `--rpm` set to the limit, and the peer baseline
(official client, max_retries=8, Semaphore, everything gathered at once).
Bars (issue 5): no flags: every item, wall <= 1.25 x ideal, 429s <= 15 % of requests;
--rpm: wall <= 1.1 x ideal, 429s <= 2 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mockproc import mock_process, mock_stats

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rpm-limit", type=int, default=1200)
    args = parser.parse_args()
    ideal = args.items / (args.rpm_limit / 60)
    env = {**os.environ, "OPENAI_API_KEY": "sk-bench"}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {args.items} items, limit {args.rpm_limit} rpm, "
          f"ideal {ideal:.1f} s")  # fmt: skip
    print(f"{'client':<24} {'done':>9} {'wall s':>7} {'x ideal':>8} {'429s':>6} {'429 %':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "m.jsonl"
        manifest.write_bytes(b"".join(
            orjson.dumps({"prompt": f"a small bird number {i}", "quality": "low"}) + b"\n"
            for i in range(args.items)
        ))  # fmt: skip
        scenarios = {
            "batchimg (no flags)": [],
            f"batchimg --rpm {args.rpm_limit}": ["--rpm", str(args.rpm_limit)],
            "peer baseline": None,
        }
        for n, (name, flags) in enumerate(scenarios.items()):
            out = Path(tmp) / f"out{n}"
            with mock_process("--rpm-limit", str(args.rpm_limit)) as base_url:
                if flags is None:
                    cmd = [sys.executable, str(ROOT / "benchmarks" / "peer_baseline.py"),
                           str(manifest), str(out), "--base-url", base_url,
                           "--concurrency", str(args.concurrency)]  # fmt: skip
                else:
                    cmd = [sys.executable, "-m", "batchimg", "run", str(manifest), "--out",
                           str(out), "--base-url", base_url, "--concurrency",
                           str(args.concurrency), *flags]  # fmt: skip
                started = time.perf_counter()
                result = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
                wall = time.perf_counter() - started
                stats = mock_stats(base_url)
            if flags is None:
                done = json.loads(result.stdout.strip().splitlines()[-1])["ok"]
            else:
                lines = (out / "ledger.jsonl").read_bytes().splitlines()
                done = sum(1 for line in lines if orjson.loads(line)["status"] == "ok")
            n429 = stats["by_status"].get("429", 0)
            share = n429 / max(1, stats["requests"])
            print(f"{name:<24} {done:>4}/{args.items:<4} {wall:>7.2f} {wall / ideal:>8.2f} "
                  f"{n429:>6} {share:>6.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
