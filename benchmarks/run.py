"""The benchmark runner: batchimg beside the peer baseline, same mock, same manifest, one run.

    python benchmarks/run.py                      # every scenario, full size
    python benchmarks/run.py --smoke              # tiny sizes: what CI runs so this never rots
    python benchmarks/run.py --only payload --repeat 3

Scenarios: overhead (1,500 tiny images, no latency, concurrency 32), payload (120
photo-sized images, ~3.4 MB of base64 each, concurrency 32, plus the floor: a loop that only
decodes and writes the same images), scale (peak RSS with a 1,000,000-line manifest against a
1,000-line one; the big run stops at a --max-cost cap after ~2,000 items, then counts the rest),
ratelimit (300 items against a mock limited to 20 requests/s; batchimg without flags, with
--rpm, and the baseline). Each client runs in its own process against a mock in another
process; CPU and peak RSS are that client process's own (os.wait4), wall time includes its
start-up. batchimg and the baseline alternate when --repeat > 1.

Start-up (interpreter, imports, client set-up: about 0.5 s for batchimg, most of it importing
aiohttp) is a fixed cost the floor loop does not pay, so each client is also run on an empty
manifest and the table shows CPU per image with and without it. batchimg's modules are
byte-compiled first, as `pip install` does, so no run pays for compiling them.
"""

from __future__ import annotations

import argparse
import base64
import compileall
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
    startup_cpu_s: float | None = None  # the same client's CPU on an empty manifest


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
    """gpt-image-1 lines (the mock serves it as a gateway does): the same requests, bills and
    caps as the figures of earlier sessions, and the same model for batchimg and the baseline."""
    with open(path, "wb") as fh:
        for i in range(count):
            line = {"model": "gpt-image-1", "prompt": f"bench image number {i}", **fields}
            fh.write(orjson.dumps(line) + b"\n")


def batchimg_cmd(manifest: Path, out: Path, base_url: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "batchimg", "run", str(manifest), "--out", str(out),
            "--base-url", base_url, "--quiet", *extra]  # fmt: skip


def ledger_ok(out: Path) -> int:
    path = out / "ledger.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_bytes().splitlines() if b'"status":"ok"' in line)


def client_cmd(client: str, manifest: Path, out: Path, base_url: str, concurrency: int
               ) -> list[str]:  # fmt: skip
    if client == "batchimg":
        return batchimg_cmd(manifest, out, base_url, "--concurrency", str(concurrency))
    return [sys.executable, str(BASELINE), str(manifest), str(out), "--base-url", base_url,
            "--concurrency", str(concurrency)]  # fmt: skip


def startup_cpu(tmp: Path, client: str, mock_options: list[str], runs: int = 3) -> float:
    """CPU of a run with nothing to do (start, set up, exit): the least of a few runs."""
    manifest = tmp / "empty.jsonl"
    manifest.write_bytes(b"")
    cpus = []
    for r in range(runs):
        with mock_process(*mock_options) as base_url:
            cmd = client_cmd(client, manifest, tmp / f"empty-{client}-{r}", base_url, 32)
            cpus.append(measure(cmd)[1])
    return min(cpus)


def compare(tmp: Path, name: str, count: int, concurrency: int, repeat: int,
            mock_options: list[str], **fields: object) -> list[Measure]:  # fmt: skip
    manifest = tmp / f"{name}.jsonl"
    write_manifest(manifest, count, **fields)
    startup = {c: startup_cpu(tmp, c, mock_options) for c in ("batchimg", "baseline")}
    results: list[Measure] = []
    for r in range(repeat):
        order = ["batchimg", "baseline"] if r % 2 == 0 else ["baseline", "batchimg"]
        for client in order:
            out = tmp / f"{name}-{client}-{r}"
            with mock_process(*mock_options) as base_url:
                cmd = client_cmd(client, manifest, out, base_url, concurrency)
                wall, cpu, rss, stdout = measure(cmd)
            done = ledger_ok(out) if client == "batchimg" else json.loads(stdout)["ok"]
            results.append(Measure(client, wall, cpu, rss, done, count,
                                   startup_cpu_s=startup[client]))  # fmt: skip
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
    return Measure("floor (decode+write only)", wall, cpu, 0.0, count, count, startup_cpu_s=0.0)


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


def per_image_ms(m: Measure, after_startup: bool = False) -> float | None:
    if after_startup and m.startup_cpu_s is None:
        return None
    cpu = m.cpu_s - (m.startup_cpu_s or 0.0) if after_startup else m.cpu_s
    return 1000 * cpu / max(1, m.done)


def table(title: str, rows: list[Measure]) -> str:
    lines = [f"### {title}", "",
             "| client | done | wall s | CPU s | CPU ms/image | same, after start-up | "
             "peak RSS MiB | notes |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in rows:
        after = per_image_ms(m, after_startup=True)
        after_text = "-" if after is None else f"{after:.2f} ({m.startup_cpu_s:.2f} s start-up)"
        rss = f"{m.rss_mib:.0f}" if m.rss_mib else "-"
        lines.append(f"| {m.name} | {m.done}/{m.total} | {m.wall_s:.2f} | {m.cpu_s:.2f} | "
                     f"{per_image_ms(m):.2f} | {after_text} | {rss} | {m.extra} |")  # fmt: skip
    return "\n".join(lines)


def versus_floor(rows: list[Measure], floor_row: Measure) -> str:
    """batchimg's CPU per image against the floor's, with and without start-up."""
    ours = [m for m in rows if m.name == "batchimg"]
    floor_ms = per_image_ms(floor_row) or 1.0
    total = sum(per_image_ms(m) or 0.0 for m in ours) / len(ours)
    after = sum(per_image_ms(m, after_startup=True) or 0.0 for m in ours) / len(ours)
    return (f"batchimg CPU per image / floor: {total / floor_ms:.2f}x with start-up, "
            f"{after / floor_ms:.2f}x after start-up (bar 2x)")  # fmt: skip


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
    compileall.compile_dir(ROOT / "batchimg", quiet=1)  # as an installed package would be
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
            floor_row = floor(tmp, sizes["payload"])
            print(table(f"payload: {sizes['payload']} images of 2.5 MB, concurrency 32",
                        [*rows, floor_row]))  # fmt: skip
            print(ratios(rows))
            print(versus_floor(rows, floor_row) + "\n")
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
