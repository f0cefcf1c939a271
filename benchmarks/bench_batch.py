"""Collecting a batch: time and peak memory to take a finished batch's output into the store.

    python benchmarks/bench_batch.py [--lines 10000] [--photos 300] [--smoke]

For each size: submit the manifest with `run --batch-api --no-wait` (exit 75), wait until the
mock (its own process) has finished the batch, then measure the run that collects it (`run
--batch-api --no-wait` again: download the output file, read it line by line, decode, store,
write the ledger) beside the official client's way (`files.content(...).text`, split, decode,
write: `peer_batch_collect.py`). Two shapes: many tiny images (the per-line cost) and
photo-sized ones (~3.4 MB of base64 a line: whether memory stays flat as the file grows, at a
quarter of the lines and at all of them). Wall, CPU and peak RSS are each process's own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mockproc import mock_process
from run import measure

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT / "benchmarks" / "peer_batch_collect.py"


def get(base_url: str, path: str) -> Any:
    with urllib.request.urlopen(f"{base_url}{path}", timeout=30) as response:
        return json.load(response)


def one_size(tmp: Path, name: str, lines: int, detailed: bool) -> dict[str, Any]:
    manifest = tmp / f"{name}.jsonl"
    with open(manifest, "wb") as fh:
        for i in range(lines):
            line = {"id": f"{name}{i}", "prompt": f"batch bench {name} {i}",
                    "model": "gpt-image-2", "quality": "low", "size": "1024x1024"}  # fmt: skip
            fh.write(orjson.dumps(line) + b"\n")
    options = ["--batch-validate", "0", "--batch-finalize", "0"]
    options += ["--detailed-images"] if detailed else []
    out = tmp / f"{name}-batchimg"
    run = [sys.executable, "-m", "batchimg", "run", str(manifest), "--out", str(out),
           "--batch-api", "--no-wait", "--quiet"]  # fmt: skip
    with mock_process(*options) as base_url:
        submit = measure([*run, "--base-url", base_url])
        deadline = time.monotonic() + 3600
        while True:
            batches = get(base_url, "/batches")["data"]
            if batches and all(b["status"] == "completed" for b in batches):
                break
            assert time.monotonic() < deadline
            time.sleep(0.5)
        size = sum(get(base_url, f"/files/{b['output_file_id']}")["bytes"] for b in batches)
        collect = measure([*run, "--base-url", base_url])
        ok = sum(1 for x in (out / "ledger.jsonl").read_bytes().splitlines() if b'"ok"' in x)
        peer_out = tmp / f"{name}-peer"
        peer = measure([sys.executable, str(PEER), batches[0]["id"], str(peer_out),
                        "--base-url", base_url])  # fmt: skip
    return {
        "name": name, "lines": lines, "output_mb": size / 2**20, "ok": ok,
        "submit_wall_s": submit[0], "collect_wall_s": collect[0], "collect_cpu_s": collect[1],
        "collect_rss_mib": collect[2], "peer_wall_s": peer[0], "peer_cpu_s": peer[1],
        "peer_rss_mib": peer[2], "peer_ok": json.loads(peer[3])["ok"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=10_000, help="tiny-image lines")
    parser.add_argument("--photos", type=int, default=300, help="photo-sized lines")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    args = parser.parse_args()
    lines, photos = (40, 8) if args.smoke else (args.lines, args.photos)
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(one_size(Path(tmp), "tiny", lines, detailed=False))
        rows.append(one_size(Path(tmp), "photo-quarter", max(1, photos // 4), detailed=True))
        rows.append(one_size(Path(tmp), "photo", photos, detailed=True))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")  # fmt: skip
    print("| output | lines | file MB | batchimg collect: wall / CPU / peak RSS | "
          "official client: wall / CPU / peak RSS | ok |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['lines']:,} | {r['output_mb']:,.0f} | "
              f"{r['collect_wall_s']:.1f} s / {r['collect_cpu_s']:.1f} s / "
              f"{r['collect_rss_mib']:.0f} MiB | {r['peer_wall_s']:.1f} s / "
              f"{r['peer_cpu_s']:.1f} s / {r['peer_rss_mib']:.0f} MiB | "
              f"{r['ok']} / {r['peer_ok']} |")  # fmt: skip


if __name__ == "__main__":
    main()
