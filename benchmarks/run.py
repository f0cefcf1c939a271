"""The benchmark runner: batchimg beside the peer baseline, same mock, same manifest, one run.

    python benchmarks/run.py                      # every scenario, full size
    python benchmarks/run.py --smoke              # tiny sizes: what CI runs so this never rots
    python benchmarks/run.py --only payload --repeat 3

Scenarios (issue 8): overhead (1,500 tiny images, no latency, concurrency 32), payload (120
photo-sized images, ~3.4 MB of base64 each, concurrency 32, plus the floor: a loop that only
decodes and writes the same images), scale (peak RSS with a 1,000,000-line manifest against a
1,000-line one; the big run stops at a --max-cost cap after ~2,000 items, then counts the rest),
ratelimit (300 items against a mock limited to 20 requests/s; batchimg without flags, with
--rpm, and the baseline). Each client runs in its own process against a mock in another
process; CPU and peak RSS are that client process's own (os.wait4), wall time includes its
start-up. batchimg and the baseline alternate when --repeat > 1.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mockproc import mock_process, mock_stats

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "benchmarks" / "peer_baseline.py"


@dataclass
class Measure:
    name: str
    wall_s: float
    cpu_s: float
    rss_mib: float
    done: int
    total: int
    extra: str = ""


def measure(cmd: list[str]) -> tuple[float, float, float, str]:
    """Run a process to the end: wall s, CPU s (user+sys), peak RSS MiB, stdout."""
    env = {**os.environ, "OPENAI_API_KEY": "sk-bench"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                            cwd=ROOT)  # fmt: skip
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = 0
    wall = time.perf_counter() - started
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out


def write_manifest(path: Path, count: int, **fields: object) -> None:
    with open(path, "wb") as fh:
        for i in range(count):
            fh.write(orjson.dumps({"prompt": f"bench image number {i}", **fields}) + b"\n")


def batchimg_cmd(manifest: Path, out: Path, base_url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "batchimg", "run", str(manifest), "--out", str(out),
            "--base-url", base_url, "--quiet", *extra]  # fmt: skip


def ledger_ok(out: Path) -> int:
    path = out / "ledger.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_bytes().splitlines() if b'"status":"ok"' in line)


def compare(tmp: Path, name: str, count: int, concurrency: int, repeat: int,
            mock_options: list[str], **fields: object) -> list[Measure]:  # fmt: skip
    manifest = tmp / f"{name}.jsonl"
    write_manifest(manifest, count, **fields)
    results: list[Measure] = []
    for r in range(repeat):
        order = ["batchimg", "baseline"] if r % 2 == 0 else ["baseline", "batchimg"]
        for client in order:
            out = tmp / f"{name}-{client}-{r}"
            with mock_process(*mock_options) as base_url:
                if client == "batchimg":
                    cmd = batchimg_cmd(manifest, out, base_url, "--concurrency", str(concurrency))
                else:
                    cmd = [sys.executable, str(BASELINE), str(manifest), str(out),
                           "--base-url", base_url, "--concurrency", str(concurrency)]  # fmt: skip
                wall, cpu, rss, stdout = measure(cmd)
            done = ledger_ok(out) if client == "batchimg" else json.loads(stdout)["ok"]
            results.append(Measure(client, wall, cpu, rss, done, count))
    return results


def floor(tmp: Path, count: int) -> Measure:
    """CPU to only decode and write `count` copies of the payload image: the floor."""
    with mock_process("--detailed-images") as base_url:
        request = urllib.request.Request(
            f"{base_url}/images/generations",
            data=orjson.dumps({"model": "gpt-image-1", "prompt": "floor", "quality": "low"}),
            headers={"Content-Type": "application/json", "Authorization": "Bearer x"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            b64 = orjson.loads(response.read())["data"][0]["b64_json"]
    try:
        import pybase64

        decode = pybase64.b64decode
    except ImportError:  # pragma: no cover - the floor uses the fastest decoder available
        decode = base64.b64decode
    out = tmp / "floor"
    out.mkdir()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for i in range(count):
        with open(out / f"{i}.png", "wb") as fh:
            fh.write(decode(b64))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measure("floor (decode+write only)", wall, cpu, 0.0, count, count)


def scale(tmp: Path, big: int, small: int) -> list[Measure]:
    results = []
    for lines in (small, big):
        manifest = tmp / f"scale-{lines}.jsonl"
        write_manifest(manifest, lines, quality="low")
        out = tmp / f"scale-out-{lines}"
        with mock_process() as base_url:
            # ~$0.011 an item: the cap stops the big run after ~2,000 items; the small one ends
            cmd = batchimg_cmd(manifest, out, base_url, "--concurrency", "32",
                               "--max-cost", "22")  # fmt: skip
            wall, cpu, rss, _ = measure(cmd)
        results.append(Measure(f"batchimg, {lines:,} lines", wall, cpu, rss, ledger_ok(out),
                               lines))  # fmt: skip
    return results


def ratelimit(tmp: Path, count: int, limit: int) -> list[Measure]:
    manifest = tmp / "ratelimit.jsonl"
    write_manifest(manifest, count, quality="low")
    ideal = count / (limit / 60)
    results = []
    scenarios: dict[str, list[str] | None] = {
        "batchimg (no flags)": [],
        f"batchimg --rpm {limit}": ["--rpm", str(limit)],
        "baseline": None,
    }
    for n, (name, flags) in enumerate(scenarios.items()):
        out = tmp / f"ratelimit-{n}"
        with mock_process("--rpm-limit", str(limit)) as base_url:
            if flags is None:
                cmd = [sys.executable, str(BASELINE), str(manifest), str(out), "--base-url",
                       base_url, "--concurrency", "32"]  # fmt: skip
            else:
                cmd = batchimg_cmd(manifest, out, base_url, "--concurrency", "32", *flags)
            wall, cpu, rss, stdout = measure(cmd)
            stats = mock_stats(base_url)
        done = json.loads(stdout)["ok"] if flags is None else ledger_ok(out)
        n429 = stats["by_status"].get("429", 0)
        extra = f"{wall / ideal:.2f}x ideal, {n429} x 429 ({n429 / max(1, stats['requests']):.1%})"
        results.append(Measure(name, wall, cpu, rss, done, count, extra))
    return results


def table(title: str, rows: list[Measure], images_per_item: int = 1) -> str:
    lines = [f"### {title}", "",
             "| client | done | wall s | CPU s | CPU ms/image | peak RSS MiB | notes |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in rows:
        per_image = 1000 * m.cpu_s / max(1, m.done * images_per_item)
        rss = f"{m.rss_mib:.0f}" if m.rss_mib else "-"
        lines.append(f"| {m.name} | {m.done}/{m.total} | {m.wall_s:.2f} | {m.cpu_s:.2f} | "
                     f"{per_image:.2f} | {rss} | {m.extra} |")  # fmt: skip
    return "\n".join(lines)


def ratios(rows: list[Measure]) -> str:
    """batchimg / baseline, from the means of each."""

    def mean(name: str, attr: str) -> float:
        values = [getattr(m, attr) for m in rows if m.name == name]
        return sum(values) / len(values)

    pairs = (("wall", "wall_s"), ("CPU", "cpu_s"), ("peak RSS", "rss_mib"))
    parts = [f"{label} {mean('batchimg', attr) / mean('baseline', attr):.2f}x"
             for label, attr in pairs]  # fmt: skip
    return "batchimg / baseline: " + ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--only", default="overhead,payload,scale,ratelimit")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    only = set(args.only.split(","))
    sizes = (
        {"overhead": 60, "payload": 4, "scale": (3_000, 300), "ratelimit": 40}
        if args.smoke
        else {"overhead": 1_500, "payload": 120, "scale": (1_000_000, 1_000), "ratelimit": 300}
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
          f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}\n")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        if "overhead" in only:
            rows = compare(tmp, "overhead", sizes["overhead"], 32, args.repeat, [],
                           quality="low")  # fmt: skip
            print(table(f"overhead: {sizes['overhead']} tiny images, concurrency 32", rows))
            print(ratios(rows) + "\n")
        if "payload" in only:
            rows = compare(tmp, "payload", sizes["payload"], 32, args.repeat,
                           ["--detailed-images"], quality="low")  # fmt: skip
            rows.append(floor(tmp, sizes["payload"]))
            print(table(f"payload: {sizes['payload']} images of 2.5 MB, concurrency 32", rows))
            print(ratios(rows[:-1]) + "\n")
        if "scale" in only:
            big, small = sizes["scale"]
            rows = scale(tmp, big, small)
            print(table("scale: peak RSS by manifest length", rows))
            print(f"peak RSS {big:,} lines / {small:,} lines: "
                  f"{rows[1].rss_mib / rows[0].rss_mib:.2f}x\n")  # fmt: skip
        if "ratelimit" in only:
            rows = ratelimit(tmp, sizes["ratelimit"], 1200)
            print(table(f"rate limit: {sizes['ratelimit']} items, mock limited to 20 requests/s",
                        rows))  # fmt: skip


if __name__ == "__main__":
    main()
