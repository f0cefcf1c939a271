"""Failure-handling figures: a noisy provider, and kill -9 followed by a re-run.

    python benchmarks/bench_faults.py [--items 150] [--kill-items 200]

noisy: the real CLI against the mock with 12 % 429s (every Retry-After form), 8 % 5xx, 3 %
truncated bodies and 30 % data-URI answers; every 25th prompt is moderated.
kill: the real CLI (concurrency 8, 0.1 s latency) is killed with SIGKILL after 50 ledger lines,
then the same command is re-run; the mock counts how often each item was requested.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson

from batchimg.mock import MockConfig, MockServer

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-bench-faults-0123456789"


def write_manifest(path: Path, count: int, moderate_every: int = 0) -> None:
    with open(path, "wb") as fh:
        for i in range(count):
            prompt = f"bench item {i}"
            if moderate_every and i % moderate_every == moderate_every - 1:
                prompt = "[[mock:moderation]] " + prompt
            line = {"id": f"b{i}", "prompt": prompt, "quality": ("low", "medium", "high")[i % 3]}
            fh.write(orjson.dumps(line) + b"\n")


def cli(manifest: Path, out: Path, server: MockServer, *extra: str) -> list[str]:
    return [sys.executable, "-m", "batchimg", "run", str(manifest), "--out", str(out),
            "--base-url", server.base_url, *extra]  # fmt: skip


def ledger(out: Path) -> list[dict[str, object]]:
    lines = (out / "ledger.jsonl").read_bytes().splitlines()
    return [orjson.loads(line) for line in lines if line.strip()]


def noisy(tmp: Path, count: int) -> None:
    config = MockConfig(api_key=KEY, rate_limit_rate=0.12, error_rate=0.08, truncate_rate=0.03,
                        datauri_rate=0.3, retry_after_s=0.05, retry_after_style="mixed",
                        seed=2026)  # fmt: skip
    server = MockServer(config)
    server.start_in_thread()
    try:
        manifest, out = tmp / "noisy.jsonl", tmp / "noisy-out"
        write_manifest(manifest, count, moderate_every=25)
        started = time.perf_counter()
        result = subprocess.run(
            cli(manifest, out, server, "--concurrency", "16", "--max-attempts", "10"),
            env={**os.environ, "OPENAI_API_KEY": KEY}, capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
        wall = time.perf_counter() - started
        requests = list(server.requests)
    finally:
        server.stop_in_thread()
    records = ledger(out)
    moderated = [r for r in records if "[[mock:moderation]]" in str(r["prompt"])]
    others = [r for r in records if r not in moderated]
    faults = Counter(r.fault for r in requests if r.fault)
    leaked = any(KEY.encode() in p.read_bytes() for p in out.rglob("*") if p.is_file())
    leaked = leaked or KEY in result.stdout + result.stderr
    ids = Counter(str(r["id"]) for r in records)
    print(f"noisy: {count} items in {wall:.1f} s, exit {result.returncode}")
    print(f"  non-moderated ok: {sum(r['status'] == 'ok' for r in others)}/{len(others)}")
    once = sum(r["status"] == "error" and r["attempts"] == 1 for r in moderated)
    print(f"  moderated failed after 1 attempt: {once}/{len(moderated)}")
    print(f"  requests sent: {len(requests)}  (429: {faults['rate_limit']}, 5xx: "
          f"{faults['server_error']}, truncated: {faults['truncate']})")  # fmt: skip
    print(f"  duplicate ledger ids: {sum(c > 1 for c in ids.values())}   key leaked: {leaked}")


def kill_and_resume(tmp: Path, count: int) -> None:
    server = MockServer(MockConfig(api_key=KEY, latency_s=0.1))
    server.start_in_thread()
    try:
        manifest, out = tmp / "kill.jsonl", tmp / "kill-out"
        write_manifest(manifest, count)
        env = {**os.environ, "OPENAI_API_KEY": KEY}
        args = cli(manifest, out, server, "--concurrency", "8")
        ledger_path = out / "ledger.jsonl"
        with subprocess.Popen(args, env=env, stderr=subprocess.DEVNULL, cwd=ROOT) as proc:
            while not (ledger_path.exists() and ledger_path.read_bytes().count(b"\n") >= 50):
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        before = {str(r["id"]) for r in ledger(out) if r["status"] == "ok"}
        started = time.perf_counter()
        rerun = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - started
        counts = Counter(r.prompt for r in server.requests)
    finally:
        server.stop_in_thread()
    states = {str(r["id"]): r for r in ledger(out)}
    twice = sum(1 for c in counts.values() if c > 1)
    print(f"kill -9: {len(before)} items ok at the kill; re-run exit {rerun.returncode} "
          f"in {wall:.1f} s")  # fmt: skip
    print(f"  items ok after re-run: {sum(r['status'] == 'ok' for r in states.values())}/{count}")
    print(f"  requests: {sum(counts.values())} for {count} items; requested twice: {twice} "
          f"(concurrency 8); ok items re-requested: "
          f"{sum(1 for i in before if counts[f'bench item {i[1:]}'] > 1)}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=150)
    parser.add_argument("--kill-items", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        noisy(Path(tmp), args.items)
        kill_and_resume(Path(tmp), args.kill_items)


if __name__ == "__main__":
    main()
