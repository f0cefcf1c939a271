"""Manifest speed and memory: `batchimg validate`, `batchimg estimate` and the loader against a
bare parse loop, on generated manifests of N lines.

    python benchmarks/bench_manifest.py 1000 1000000 [--kinds plain,ids,mixed] [--repeat 3]

The bare loop is a Python process that reads the file line by line and `orjson.loads` each
line: the floor any loader in Python pays. Each command runs in a fresh process (its own CPU
and peak RSS, from `wait4`), the commands alternating, `--repeat` times; medians are shown. The
bar (issue 19): validate and estimate on 1,000,000 lines within 5x the bare loop's CPU, and
their peak RSS flat (a 1,000,000-line manifest's close to a 1,000-line one's).

Kinds of manifest: `plain` (one model, size and quality, as most generated manifests are),
`ids` (the same with an explicit id a line) and `mixed` (five models, four sizes and
qualities, n, metadata, repeated prompts, a bad line in a thousand). batchimg's bytecode is
cached in the temporary directory first, as an installed package's is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import LAUNCHER

BARE = """
import sys, orjson
with open(sys.argv[1], "rb") as fh:
    for line in fh:
        orjson.loads(line)
"""
LOAD = """
import sys
from batchimg.manifest import read_manifest
for _ in read_manifest(sys.argv[1]):
    pass
"""
COMMANDS = {
    "bare loop": ["-c", BARE],
    "validate": ["-m", "batchimg", "validate"],
    "estimate": ["-m", "batchimg", "estimate"],
    "read_manifest": ["-c", LOAD],
}
MODELS = ("gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "dall-e-3", "gpt-image-2")
SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")
QUALITIES = ("low", "medium", "high", "auto")


def line(kind: str, i: int) -> dict[str, object]:
    if kind == "plain":
        return {"model": "gpt-image-1", "prompt": f"bench image number {i}", "quality": "low"}
    if kind == "ids":
        return {"id": f"img-{i:07d}", "model": "gpt-image-1",
                "prompt": f"bench image number {i}", "quality": "low"}  # fmt: skip
    model = MODELS[i % len(MODELS)]
    fields: dict[str, object] = {
        "model": model,
        "prompt": f"bench image number {i} of a lighthouse",
        "size": SIZES[i // 5 % 4],
        "quality": QUALITIES[i // 20 % 4],
    }
    if model == "dall-e-3":
        fields.update(size="1024x1024", quality="standard" if i % 2 else "hd")
    if i % 7 == 0:
        fields["n"] = 2
    if i % 11 == 0:
        fields["metadata"] = {"k": i, "tags": ["a", "b"]}
    if i % 97 == 0:
        fields["prompt"] = "a repeated prompt"
    if i % 1013 == 0:
        fields["quality"] = "bogus"
    return fields


def write(path: Path, kind: str, lines: int) -> None:
    with open(path, "wb") as fh:
        for i in range(lines):
            fh.write(orjson.dumps(line(kind, i)) + b"\n")


def measure(args: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(CPU s, wall s, peak RSS MiB) of one fresh process, started by run.py's LAUNCHER (so
    that its peak RSS is its own, not this process's)."""
    done = subprocess.run([sys.executable, "-c", LAUNCHER, *args], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    seen = json.loads(done.stderr.strip().splitlines()[-1])
    if seen["exit"] not in (0, 1):  # validate says 1 when some lines are bad
        raise SystemExit(f"{args} exited {seen['exit']}")
    return seen["cpu_s"], seen["wall_s"], seen["rss_kib"] / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[1_000, 1_000_000])
    parser.add_argument("--kinds", default="plain,ids,mixed")
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pycache")
        subprocess.run([sys.executable, "-m", "batchimg", "--help"], env=env,
                       stdout=subprocess.DEVNULL, check=True)  # fmt: skip
        print(f"{'kind':<6} {'lines':>9}  {'command':<13} {'CPU s':>6} {'wall s':>6} "
              f"{'peak MiB':>8} {'x bare':>6}")  # fmt: skip
        for kind in options.kinds.split(","):
            for size in options.sizes:
                path = Path(tmp) / f"{kind}-{size}.jsonl"
                write(path, kind, size)
                runs: dict[str, list[tuple[float, float, float]]] = {c: [] for c in COMMANDS}
                for _ in range(options.repeat):
                    for name, command in COMMANDS.items():
                        runs[name].append(measure([sys.executable, *command, str(path)], env))
                bare = statistics.median(cpu for cpu, _, _ in runs["bare loop"])
                for name, results in runs.items():
                    cpu, wall, rss = (statistics.median(r[i] for r in results) for i in range(3))
                    print(f"{kind:<6} {size:>9,}  {name:<13} {cpu:>6.2f} {wall:>6.2f} "
                          f"{rss:>8.1f} {cpu / bare:>6.1f}", flush=True)  # fmt: skip
                path.unlink()


if __name__ == "__main__":
    main()
