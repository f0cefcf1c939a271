"""Loader speed and memory: stream a generated manifest of N lines through `read_manifest`.

    python benchmarks/bench_manifest.py 1000 1000000

Each size runs in a fresh process so peak RSS is that size's own. Memory should not grow with the
manifest beyond the compact id set (5 bytes an id, at most 90 % full: about 5.3 MiB a million).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

CHILD = """
import resource, sys, time
from batchimg.manifest import read_manifest
started = time.perf_counter()
count = sum(1 for _ in read_manifest(sys.argv[1]))
elapsed = time.perf_counter() - started
print(count, elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def write(path: Path, lines: int) -> None:
    with open(path, "wb") as fh:
        for i in range(lines):
            line = {"prompt": f"a watercolor of lighthouse number {i} at dusk", "quality": "low"}
            if i % 3 == 0:
                line["metadata"] = {"batch": i // 1000, "tags": ["sea", "dusk"]}
            fh.write(orjson.dumps(line) + b"\n")


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [1_000, 1_000_000]
    print(f"{'lines':>10} {'seconds':>8} {'lines/s':>10} {'peak MiB':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            path = Path(tmp) / f"m{size}.jsonl"
            write(path, size)
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(path)], check=True, capture_output=True, text=True
            ).stdout.split()
            count, elapsed, rss = int(out[0]), float(out[1]), float(out[2])
            assert count == size
            print(f"{size:>10} {elapsed:>8.2f} {size / elapsed:>10.0f} {rss:>9.1f}")


if __name__ == "__main__":
    main()
