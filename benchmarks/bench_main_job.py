"""Wall time, CPU and peak memory of the README's main job (`batchimg run ... --mock`).

    python benchmarks/bench_main_job.py [--repeat 3] [--manifest jobs/example.jsonl]

Each repeat runs the real CLI in a fresh process into a fresh output directory; peak RSS is the
child's own (getrusage), so the mock server, which runs in the same process, is included.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def run_once(manifest: Path, extra: list[str]) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "batchimg", "run", str(manifest), "--out", tmp, "--mock"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run([*cmd, *extra], check=True, capture_output=True, cwd=ROOT)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, after.ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", type=Path, default=ROOT / "jobs" / "example.jsonl")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="extra `batchimg run` options")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"{'run':>4} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9}")
    for i in range(args.repeat):
        wall, cpu, rss = run_once(args.manifest, args.extra)
        print(f"{i + 1:>4} {wall:>8.2f} {cpu:>8.2f} {rss:>9.1f}")


if __name__ == "__main__":
    main()
