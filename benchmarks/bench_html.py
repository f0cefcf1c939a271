"""The HTML report of a big run: time to build it and what it weighs.

    python benchmarks/bench_html.py [--images 20000] [--smoke]

Runs a manifest of tiny images through batchimg against `batchimg mock` (its own process),
then measures `batchimg report OUT --html OUT/report.html` twice: the first build makes every
thumbnail, the second reuses them. Wall and CPU time and peak RSS are the report process's own;
sizes are the page's and its folder's.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mockproc import mock_process
from run import measure


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    args = parser.parse_args()
    count = 50 if args.smoke else args.images
    with tempfile.TemporaryDirectory() as tmp:
        manifest, out = Path(tmp) / "m.jsonl", Path(tmp) / "out"
        with open(manifest, "wb") as fh:
            for i in range(count):
                # Sizes vary so the images (the mock's are flat colours) differ: one
                # thumbnail each to make, as for a real dataset.
                size = f"{1024 + 16 * (i % 64)}x{1024 + 16 * (i // 64 % 64)}"
                line = {"id": f"img{i}", "prompt": f"report bench {i}", "model": "gpt-image-2",
                        "quality": ["low", "medium"][i % 2], "size": size,
                        "metadata": {"split": ["train", "val"][i % 5 == 0]}}  # fmt: skip
                fh.write(orjson.dumps(line) + b"\n")
        with mock_process() as base_url:
            run = [sys.executable, "-m", "batchimg", "run", str(manifest), "--out", str(out),
                   "--base-url", base_url, "--quiet", "--concurrency", "32"]  # fmt: skip
            made = measure(run)
        page = out / "report.html"
        cmd = [sys.executable, "-m", "batchimg", "report", str(out), "--by", "quality",
               "--html", str(page)]  # fmt: skip
        first = measure(cmd)
        second = measure(cmd)
        page_kb = page.stat().st_size / 1024
        folder_mb = folder_bytes(out / "report_files") / 2**20
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")  # fmt: skip
    print(f"run of {count:,} images: {made[0]:.1f} s; first build: {first[3].strip()}")
    print("| build | wall | CPU | peak RSS |\n|---|---|---|---|")
    for name, m in (("first (thumbnails made)", first), ("again (thumbnails reused)", second)):
        print(f"| {name} | {m[0]:.1f} s | {m[1]:.1f} s | {m[2]:.0f} MiB |")
    print(f"page: {page_kb:,.0f} KB; folder: {folder_mb:,.1f} MB "
          f"({folder_mb * 1024 / count:,.1f} KB per image)")  # fmt: skip


if __name__ == "__main__":
    main()
