"""A long run: does batchimg's memory stay flat as items finish?

    python benchmarks/bench_soak.py [--items 120000] [--every 10000]

Runs the real CLI (`--quiet`, concurrency 32) on N tiny-image items against the mock in another
process, and every `--every` finished items (read from the ledger) prints the client's resident
memory. A leak shows as RSS that keeps rising with the item count; allocator warm-up shows as a
rise that levels off.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mockproc import mock_process

ROOT = Path(__file__).resolve().parent.parent


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=120_000)
    parser.add_argument("--every", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        manifest = tmp / "soak.jsonl"
        with open(manifest, "wb") as fh:
            for i in range(args.items):
                fh.write(orjson.dumps({"prompt": f"soak image {i}", "quality": "low"}) + b"\n")
        out = tmp / "out"
        ledger = out / "ledger.jsonl"
        with mock_process() as base_url:
            cmd = [sys.executable, "-m", "batchimg", "run", str(manifest), "--out", str(out),
                   "--base-url", base_url, "--concurrency", "32", "--quiet"]  # fmt: skip
            env = {**os.environ, "OPENAI_API_KEY": "sk-soak"}
            started = time.monotonic()
            proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
            print(f"{'items':>8} {'seconds':>8} {'RSS MiB':>8}")
            next_mark, lines, offset = args.every, 0, 0
            while proc.poll() is None:
                time.sleep(0.5)
                if ledger.exists():
                    with open(ledger, "rb") as fh:  # count only what was appended since
                        fh.seek(offset)
                        new = fh.read()
                    offset += len(new)
                    lines += new.count(b"\n")
                rss = rss_kib(proc.pid) / 1024
                if lines >= next_mark and rss:
                    print(f"{lines:>8} {time.monotonic() - started:>8.1f} {rss:>8.1f}", flush=True)
                    next_mark += args.every
            print(f"exit {proc.returncode}: {lines} items in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
