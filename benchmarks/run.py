"""The benchmark runner: batchimg beside its peers, same mock, same manifest, one run.

    python benchmarks/run.py                      # every scenario, full size
    python benchmarks/run.py --smoke              # tiny sizes: what CI runs so this never rots
    python benchmarks/run.py --only overhead,payload --repeat 3 --fs both

Scenarios:
  startup   CPU and wall of `python -c pass`, `batchimg --help` and `batchimg run` on an empty
            manifest (median of 7 runs; 5 with --smoke)
  overhead  1,500 tiny images, no latency, concurrency 32
  payload   120 photo-sized images (~3.4 MB of base64 each), concurrency 32, and the physical
            floor: pybase64 decode with validation + write + sha256 + sync of the same bytes
            (an fsync each, and one syncfs per 32 images), per image, 5 rounds, the median, on
            the default filesystem and on tmpfs
  manifest  `batchimg validate` and `batchimg estimate` on a 1,000,000-line manifest against a
            bare loop that reads the file and parses each line with orjson; peak RSS against
            the same commands on a 1,000-line manifest
  scale     peak RSS of a run with a 1,000,000-line manifest against a 1,000-line one (the big
            run stops at a --max-cost cap after ~2,000 items, then counts the rest)
  ratelimit 300 items against a mock limited to 20 requests/s: batchimg without flags, with
            --rpm, and the SDK baseline

overhead and payload run six clients in turn, the order reversed every other repetition: batchimg,
the SDK baseline (peer_baseline.py), the bare aiohttp loop (peer_aiohttp.py), the same loop with
per-image durability (--durable: fsync, rename, directory fsync), the same loop keeping batchimg's
promises for each image's bytes and its ledger lines (--ledgered: a `sent` line before each
request, hashed images made durable a loop turn at a time, then the ledger and metadata lines) and
the cookbook-style script (peer_cookbook.py). Each client runs in its own process against a mock in
another process; CPU and peak RSS are that client process's own (os.wait4, from a small launcher: a
child's peak RSS counts the memory of the process it was forked from), wall time includes its
start-up. Figures are medians over the repetitions, and ratios are of those medians. --fs puts the
clients' output directories on the default filesystem (the temporary directory, on disk), on tmpfs
(/dev/shm), or runs those two scenarios on both.

Start-up (interpreter, imports, client set-up, the first connection) is a fixed cost the floor
does not pay, so each client is also run on a one-image manifest of the scenario (the least CPU
of three runs), and the tables show CPU per image with and without it: after start-up is the
cost of each image beyond the first, (CPU - one-image CPU) / (images - 1), the same for every
client. (An empty manifest would not do: batchimg imports its HTTP client for the first
request only, the peers at start.) batchimg's modules are byte-compiled first, as `pip install`
does, so no run pays for compiling them. The bars of issue 19 are printed at the end with a
verdict; nothing fails on them (CI runs --smoke, whose sizes are too small for verdicts). A
client run of overhead or payload (or its one-image start-up) that did not do every item is
listed with the end of its stderr, its scenario's bars get no verdict, and the runner exits 1.
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mockproc import mock_process, mock_stats

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
BASELINE = BENCH / "peer_baseline.py"
PEERS = {"baseline": BASELINE, "aiohttp": BENCH / "peer_aiohttp.py",
         "durable": BENCH / "peer_aiohttp.py", "ledgered": BENCH / "peer_aiohttp.py",
         "cookbook": BENCH / "peer_cookbook.py"}  # fmt: skip
CLIENTS = ("batchimg", "baseline", "aiohttp", "durable", "ledgered", "cookbook")
LABELS = {"batchimg": "batchimg", "baseline": "SDK baseline", "aiohttp": "bare aiohttp loop",
          "durable": "bare loop + fsync", "ledgered": "bare loop + ledger",
          "cookbook": "cookbook script"}  # fmt: skip
#: The peers' own flags (each is peer_aiohttp.py in another mode).
PEER_FLAGS = {"durable": ["--durable"], "ledgered": ["--ledgered"]}
SCENARIOS = ("startup", "overhead", "payload", "manifest", "scale", "ratelimit")
# Reads a manifest a line at a time and parses each line: what validate and estimate must do.
BARE_PARSE = (
    "import sys, orjson\n"
    "with open(sys.argv[1], 'rb') as fh:\n"
    "    for line in fh:\n"
    "        if line.strip():\n"
    "            orjson.loads(line)\n"
)


@dataclass
class Measure:
    name: str
    wall_s: float
    cpu_s: float
    rss_mib: float
    done: int
    total: int
    extra: str = ""
    startup_cpu_s: float | None = None  # the same client's CPU on a one-image manifest


@dataclass
class Process:
    """One process run to its end, as os.wait4 saw it."""

    wall_s: float
    cpu_s: float
    rss_mib: float
    stdout: str
    exit_code: int
    stderr_tail: str = ""  # the end of what it wrote to stderr


@dataclass
class Bar:
    """One bar of issue 19: a measured figure and the most it may be."""

    scenario: str
    what: str
    where: str
    value: float
    limit: float
    unit: str = "x"
    doubt: str = ""  # why the figure is no verdict, if it is not

    @property
    def met(self) -> bool:
        return self.value <= self.limit


#: `python -c LAUNCHER CMD...` runs CMD as its child (stdout passed through, stderr into a temp
#: file, read after it ends) and prints, as the last line of its own stderr, JSON: the child's wall
#: time from its start to its end, its CPU (user + sys), peak RSS (KiB), exit status and the last
#: 2,000 bytes of its stderr. Linux counts in a child's ru_maxrss the memory of the process it was
#: forked from, and the runner can hold more than a small client: forked from this small launcher,
#: each client's peak is its own.
LAUNCHER = """
import json, os, subprocess, sys, tempfile, time
err = tempfile.TemporaryFile()  # a file, not a pipe: no wake-ups of this launcher while it runs
started = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stderr=err)
_, status, usage = os.wait4(child.pid, 0)
wall_s = time.perf_counter() - started
err.seek(max(0, err.seek(0, 2) - 2000))
tail = err.read()  # what it said of a failure: its last lines
print(json.dumps({"wall_s": wall_s, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "rss_kib": usage.ru_maxrss, "exit": os.waitstatus_to_exitcode(status),
                  "stderr": tail.decode(errors="replace")}), file=sys.stderr)
"""


def run_process(cmd: Sequence[str]) -> Process:
    """Run a process to the end (in the repository, so `-m batchimg` is this tree's), through
    `LAUNCHER`: its own wall time, CPU and peak RSS."""
    env = {**os.environ, "OPENAI_API_KEY": "sk-bench"}
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)  # fmt: skip
    out, err = proc.communicate()
    seen = json.loads(err.decode().strip().splitlines()[-1])
    return Process(seen["wall_s"], seen["cpu_s"], seen["rss_kib"] / 1024, out.decode(),
                   seen["exit"], seen["stderr"])  # fmt: skip


def measure(cmd: list[str]) -> tuple[float, float, float, str]:
    """Run a process to the end: wall s, CPU s (user+sys), peak RSS MiB, stdout."""
    p = run_process(cmd)
    return p.wall_s, p.cpu_s, p.rss_mib, p.stdout


def write_manifest(path: Path, count: int, **fields: object) -> None:
    """gpt-image-1 lines (the mock serves it as a gateway does): the same requests, bills and
    caps as the figures of earlier sessions, and the same model for every client."""
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
    return [sys.executable, str(PEERS[client]), str(manifest), str(out), "--base-url", base_url,
            "--concurrency", str(concurrency), *PEER_FLAGS.get(client, [])]  # fmt: skip


def peer_ok(stdout: str) -> int:
    """The `ok` of a peer's closing JSON line (0 if it printed none: it crashed)."""
    try:
        return int(json.loads(stdout.strip().splitlines()[-1])["ok"])
    except (IndexError, ValueError, KeyError, TypeError):
        return 0


def med(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def alternate(items: Sequence[str], r: int) -> list[str]:
    """The order for repetition r: as given, then reversed, and so on."""
    return list(items) if r % 2 == 0 else list(reversed(items))


# --- where outputs live ---------------------------------------------------------------------


def fs_type(path: Path) -> str:
    """The type of the filesystem holding `path` (the longest mount point above it)."""
    best, kind = "", "?"
    target = str(path.resolve())
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def done_with(path: Path) -> None:
    """Remove a measured run's output now if it is on tmpfs (memory); on a disk, keep it until
    the runner exits (with the runner's directories). A journal-less ext4 (this project's
    machine) will not give a new file an inode freed in the last minute (six while its table
    block is dirty), and every file created then scans past each such inode: after the last
    client's 1,500 files were removed, the next client spent 40 % of its CPU in
    `recently_deleted` and `find_inode_bit`, and its kernel time grew from 0.3 to 1.5 s as
    removals piled up. That is the runner's cost, not the client's."""
    if fs_type(path) == "tmpfs":
        shutil.rmtree(path, ignore_errors=True)


#: What the clients import as they start, read back into the page cache after it is dropped
#: (`same_memory`), so that no client pays for reading the interpreter's files from the disk.
WARM_IMPORTS = "import aiohttp, anyio, click, openai, orjson, pybase64, batchimg.api, batchimg.cli"


def same_memory() -> str | None:
    """Give the next measured run the memory state every other had: written back (`sync`), the
    page cache dropped, then what the clients import read back. On this machine (a Firecracker
    VM) a write costs what the pages it lands on cost: decoding, writing and hashing a
    photo-sized image took 6.6-7.1 ms with 7 GB of page cache from earlier runs and 2.44 ms
    right after a drop, so without this each run's figure depends on what ran before it.
    Returns why the cache could not be dropped (not root, no /proc), or None if it was; only
    the sync is done then, and a run goes on as it can."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
    except OSError as exc:
        return f"cannot write /proc/sys/vm/drop_caches ({exc.strerror}; it needs root)"
    warm = subprocess.run([sys.executable, "-c", WARM_IMPORTS], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    if warm.returncode != 0:  # a peer's library missing: its client run will say so itself
        return "dropped, but the clients' imports could not all be read back"
    return None


def disk_root() -> Path:
    """The runner's temporary directory, unless that is tmpfs: then /var/tmp (on disk)."""
    tmp = Path(tempfile.gettempdir())
    return tmp if fs_type(tmp) != "tmpfs" else Path("/var/tmp")


# --- start-up -------------------------------------------------------------------------------


def client_startups(tmp: Path, scenario: str, clients: Sequence[str],
                    mock_options: Sequence[str], runs: int = 3) -> dict[str, float]:  # fmt: skip
    """Each client's CPU on a one-image manifest (start, import, set up, connect, one image,
    exit): the least of a few runs. What a run pays once is in it, whatever the client loads
    lazily (an HTTP client imported for the first request is start-up too)."""
    manifest = tmp / "one.jsonl"
    write_manifest(manifest, 1, quality="low")
    cpus: dict[str, list[float]] = {c: [] for c in clients}
    with mock_process(*mock_options) as base_url:
        for r in range(runs):
            for client in alternate(clients, r):
                out = tmp / f"one-{client}-{r}"
                p = run_process(client_cmd(client, manifest, out, base_url, 32))
                check_done(scenario, None, f"{scenario}, one-image start-up, {LABELS[client]}, "
                           f"run {r + 1}", p, items_done(client, out, p), 1)  # fmt: skip
                cpus[client].append(p.cpu_s)
                shutil.rmtree(out, ignore_errors=True)
    return {c: min(v) for c, v in cpus.items()}


def startup(tmp: Path, runs: int, bars: list[Bar]) -> str:
    manifest = tmp / "startup-empty.jsonl"
    manifest.write_bytes(b"")
    names = ("python -c pass", "batchimg --help", "batchimg run EMPTY")
    rows: dict[str, list[Process]] = {n: [] for n in names}
    with mock_process() as base_url:
        for r in range(runs):
            for name in alternate(names, r):
                out = tmp / f"startup-out-{r}"
                cmd = {
                    "python -c pass": [sys.executable, "-c", "pass"],
                    "batchimg --help": [sys.executable, "-m", "batchimg", "--help"],
                    "batchimg run EMPTY": batchimg_cmd(manifest, out, base_url),
                }[name]
                rows[name].append(run_process(cmd))
                shutil.rmtree(out, ignore_errors=True)
    lines = [f"### startup: median of {runs} runs", "",
             "| command | wall s | CPU s (least-most) | peak RSS MiB | bar | notes |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    limits = {"batchimg --help": "CPU and wall ≤ 0.10 s", "batchimg run EMPTY": "CPU ≤ 0.12 s"}
    for name in names:
        ps = rows[name]
        cpus = [p.cpu_s for p in ps]
        failed = [p.exit_code for p in ps if p.exit_code != 0]
        note = f"exit codes {failed}" if failed else ""
        lines.append(f"| `{name}` | {med(p.wall_s for p in ps):.3f} | {med(cpus):.3f} "
                     f"({min(cpus):.3f}-{max(cpus):.3f}) | {med(p.rss_mib for p in ps):.0f} | "
                     f"{limits.get(name, '-')} | {note} |")  # fmt: skip
    helps, empties = rows["batchimg --help"], rows["batchimg run EMPTY"]
    bars += [
        Bar("startup", "`batchimg --help` CPU", "-", med(p.cpu_s for p in helps), 0.10, " s"),
        Bar("startup", "`batchimg --help` wall", "-", med(p.wall_s for p in helps), 0.10, " s"),
        Bar("startup", "`batchimg run` on an empty manifest, CPU", "-",
            med(p.cpu_s for p in empties), 0.12, " s"),
    ]  # fmt: skip
    return "\n".join(lines)


# --- overhead and payload: batchimg beside its peers ----------------------------------------


#: Client runs (overhead, payload and their one-image start-ups) that did not do every item, as
#: (scenario, filesystem or None for a start-up run, what happened): their figures measure a
#: failure, not the client. The bars of that scenario (there) get no verdict, and the runner exits
#: 1 after its tables (so CI's smoke run fails on a broken client).
INCOMPLETE: list[tuple[str, str | None, str]] = []


def items_done(client: str, out: Path, p: Process) -> int:
    return ledger_ok(out) if client == "batchimg" else peer_ok(p.stdout)


def check_done(scenario: str, where: str | None, what: str, p: Process, done: int,
               count: int) -> None:  # fmt: skip
    """Note a run that did not do all of its `count` items, with the end of its stderr."""
    if done != count or p.exit_code:
        said = p.stderr_tail.strip().splitlines()[-3:]
        text = f"{what}: {done} of {count} items done, exit code {p.exit_code}"
        INCOMPLETE.append((scenario, where, text + "".join(f"\n    {x}" for x in said)))


def incomplete(bar: Bar) -> bool:
    return any(scenario == bar.scenario and where in (None, bar.where)
               for scenario, where, _ in INCOMPLETE)  # fmt: skip


def compare(tmp: Path, outdir: Path, where: str, name: str, count: int, concurrency: int,
            repeat: int, mock_options: list[str], startups: dict[str, float]
            ) -> list[list[Measure]]:  # fmt: skip
    """Every client on the same manifest, once per repetition; rows[r] is repetition r."""
    manifest = tmp / f"{name}.jsonl"
    rows: list[list[Measure]] = []
    for r in range(repeat):
        rep = []
        for client in alternate(CLIENTS, r):
            out = outdir / f"{name}-{client}-{r}"
            same_memory()  # no earlier run's dirty pages or page cache weigh on this one
            with mock_process(*mock_options) as base_url:
                p = run_process(client_cmd(client, manifest, out, base_url, concurrency))
            done = items_done(client, out, p)
            check_done(name, where, f"{name} ({where} fs), {LABELS[client]}, repetition "
                       f"{r + 1}", p, done, count)  # fmt: skip
            done_with(out)
            extra = f"exit {p.exit_code}" if p.exit_code else ""
            rep.append(Measure(client, p.wall_s, p.cpu_s, p.rss_mib, done, count, extra,
                               startup_cpu_s=startups[client]))  # fmt: skip
        rows.append(sorted(rep, key=lambda m: CLIENTS.index(m.name)))
    return rows


def median_of(rows: list[list[Measure]], client: str) -> Measure:
    ms = [m for rep in rows for m in rep if m.name == client]
    return Measure(client, med(m.wall_s for m in ms), med(m.cpu_s for m in ms),
                   med(m.rss_mib for m in ms), min(m.done for m in ms), ms[0].total,
                   "; ".join(sorted({m.extra for m in ms if m.extra})),
                   startup_cpu_s=ms[0].startup_cpu_s)  # fmt: skip


def per_image_ms(m: Measure, after_startup: bool = False) -> float | None:
    """CPU per image; after start-up, the cost of each image beyond the first (the one-image
    run holds the start-up and one image)."""
    if not after_startup:
        return 1000 * m.cpu_s / max(1, m.done)
    if m.startup_cpu_s is None or m.done < 2:
        return None
    return 1000 * (m.cpu_s - m.startup_cpu_s) / (m.done - 1)


def table(title: str, rows: list[Measure], floor_ms: float | None = None) -> str:
    versus_head = " after start-up / floor |" if floor_ms else ""
    head = ("| client | done | wall s | CPU s | CPU ms/image | same, after start-up | "
            f"peak RSS MiB |{versus_head} notes |")  # fmt: skip
    lines = [f"### {title}", "", head, "|---" * head.count(" |") + "|"]
    for m in rows:
        after = per_image_ms(m, after_startup=True)
        after_text = "-" if after is None else f"{after:.2f} ({m.startup_cpu_s:.2f} s for one)"
        rss = f"{m.rss_mib:.0f}" if m.rss_mib else "-"
        versus = f" {after / floor_ms:.2f}x |" if floor_ms and after is not None else ""
        lines.append(f"| {LABELS.get(m.name, m.name)} | {m.done}/{m.total} | {m.wall_s:.2f} | "
                     f"{m.cpu_s:.2f} | {per_image_ms(m):.2f} | {after_text} | {rss} |{versus} "
                     f"{m.extra} |")  # fmt: skip
    return "\n".join(lines)


def ratio_lines(rows: list[list[Measure]], medians: dict[str, Measure]) -> list[str]:
    """batchimg against each peer: ratios of the medians, and the CPU ratio per repetition."""
    ours = medians["batchimg"]
    lines = []
    for peer in CLIENTS[1:]:
        theirs = medians[peer]
        by_rep = []
        for rep in rows:
            cpu = {m.name: m.cpu_s for m in rep}
            by_rep.append(f"{cpu['batchimg'] / cpu[peer]:.2f}x")
        per_rep = f" (CPU by repetition: {', '.join(by_rep)})" if len(rows) > 1 else ""
        lines.append(f"batchimg / {LABELS[peer]}: wall {ours.wall_s / theirs.wall_s:.2f}x, "
                     f"CPU {ours.cpu_s / theirs.cpu_s:.2f}x, "
                     f"peak RSS {ours.rss_mib / theirs.rss_mib:.2f}x{per_rep}")  # fmt: skip
    return lines


def report(title: str, rows: list[list[Measure]], floor_ms: float | None = None
           ) -> tuple[str, dict[str, Measure]]:  # fmt: skip
    """The scenario's tables (each run when repeated, then the medians) and ratio lines."""
    medians = {c: median_of(rows, c) for c in CLIENTS}
    parts = []
    if len(rows) > 1:
        each = [replace(m, extra=f"repetition {r + 1}" + (f"; {m.extra}" if m.extra else ""))
                for r, rep in enumerate(rows) for m in rep]  # fmt: skip
        parts.append(table(f"{title}: each run", each) + "\n")
    label = f"medians of {len(rows)} repetitions" if len(rows) > 1 else "one repetition"
    parts.append(table(f"{title}: {label}", list(medians.values()), floor_ms))
    parts += ratio_lines(rows, medians)
    return "\n".join(parts), medians


# --- the physical floor ---------------------------------------------------------------------


@dataclass
class Floor:
    where: str
    kind: str
    how: str  # "fsync each", or "one syncfs per N"
    images: int
    cpu_ms: list[float]  # per image
    wall_ms: list[float]
    round_cpu_ms: list[float]  # each round's median

    @property
    def median_cpu_ms(self) -> float:
        return med(self.cpu_ms)


def payload_b64() -> bytes:
    """The base64 of one photo-sized image, as the mock serves it to every client."""
    with mock_process("--detailed-images") as base_url:
        request = urllib.request.Request(
            f"{base_url}/images/generations",
            data=orjson.dumps({"model": "gpt-image-1", "prompt": "floor", "quality": "low"}),
            headers={"Content-Type": "application/json", "Authorization": "Bearer x"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            b64: str = orjson.loads(response.read())["data"][0]["b64_json"]
    return b64.encode()


FLOOR_BATCH = 32  # images a syncfs covers in the floor's batched form (the concurrency)
#: The floor writes an image in pieces of this size. On this machine's kernel (6.18) one write
#: of 2 MB or more to ext4 took 2.3-5.3 ms of CPU where 1 MiB pieces took 0.6 ms for the same
#: 2.56 MB (likely the page cache's large folios, which need memory compacted); tmpfs is the
#: same either way. batchimg writes each network chunk's bytes as they are decoded (~192 KiB).
FLOOR_PIECE = 1 << 20


def floor(where: str, directory: Path, b64: bytes, per_round: int, rounds: int,
          batched: bool = False) -> Floor | None:  # fmt: skip
    """What one image costs at the least: decode with validation, write, hash, and make it
    durable: an fsync each, or (`batched`) one syncfs for every `FLOOR_BATCH` images, as
    batchimg does where syncfs is as safe (None where it is not, as batchimg would not).

    The two differ in whose CPU the disk work is: fsync writes the file back in the process
    that calls it, syncfs hands the writeback to the kernel's flusher threads, which a
    process's CPU (user + sys) does not count. batchimg's CPU is compared with the floor that
    syncs as it does. Each image is timed on its own (a batch's syncfs shared among its
    images); on tmpfs the files of a round are removed, untimed, before the next (`done_with`)."""
    try:
        from pybase64 import b64decode
    except ImportError:  # pragma: no cover - the floor uses the fastest decoder available
        from base64 import b64decode
    from batchimg.stores.fssync import filesystem_sync

    out = directory / ("floor-syncfs" if batched else "floor")
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        syncfs = filesystem_sync(fd, out) if batched else None
        if batched and syncfs is None:
            return None
        cpu_ms: list[float] = []
        wall_ms: list[float] = []
        round_cpu_ms: list[float] = []
        for r in range(rounds):
            out.mkdir(parents=True, exist_ok=True)
            same_memory()
            this_round = []
            for i in range(per_round):
                path = out / f"{r}-{i}.png"
                c0, w0 = time.process_time(), time.perf_counter()
                data = b64decode(b64, validate=True)
                with open(path, "wb", buffering=0) as fh:
                    view = memoryview(data)
                    while view:  # in pieces: one write of 2 MB or more can cost 8x (see above)
                        written = fh.write(view[:FLOOR_PIECE])
                        if not written:
                            raise OSError(f"{path}: nothing written")
                        view = view[written:]
                    hashlib.sha256(data).hexdigest()
                    if syncfs is None:
                        os.fsync(fh.fileno())
                c1, w1 = time.process_time(), time.perf_counter()
                this_round.append(1000 * (c1 - c0))
                wall_ms.append(1000 * (w1 - w0))
                if syncfs is not None and (
                    i % FLOOR_BATCH == FLOOR_BATCH - 1 or i == per_round - 1
                ):
                    c0, w0 = time.process_time(), time.perf_counter()
                    syncfs()
                    c1, w1 = time.process_time(), time.perf_counter()
                    share = (i % FLOOR_BATCH) + 1  # the images this syncfs made durable
                    for j in range(len(this_round) - share, len(this_round)):
                        this_round[j] += 1000 * (c1 - c0) / share
                        wall_ms[len(wall_ms) - len(this_round) + j] += 1000 * (w1 - w0) / share
            cpu_ms += this_round
            round_cpu_ms.append(med(this_round))
            done_with(out)
    finally:
        os.close(fd)
    how = f"one syncfs per {FLOOR_BATCH}" if batched else "fsync each"
    return Floor(where, fs_type(directory), how, per_round * rounds, cpu_ms, wall_ms,
                 round_cpu_ms)  # fmt: skip


def floor_doubt(where: str, floors: list[Floor]) -> str:
    """Why the floor of `where` is not to be trusted, or "": its two forms do the same work
    but for how it is synced, so medians 1.5x apart say the disk or memory moved, not the sync
    (ext4 here: 2.77 against 7.17 ms in one run)."""
    medians = [f.median_cpu_ms for f in floors if f.where == where]
    if len(medians) == 2 and max(medians) > 1.5 * min(medians):
        return f"the floor's two forms are {min(medians):.2f} and {max(medians):.2f} ms"
    return ""


def floor_table(floors: list[Floor], size_mb: float) -> str:
    lines = [f"### the physical floor: pybase64 decode (validate=True) + write + sha256 + sync "
             f"of the same {size_mb:.2f} MB image", "",
             "| filesystem | sync | images | CPU ms/image, median | p10-p90 | round medians | "
             "wall ms/image, median |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for f in floors:
        deciles = statistics.quantiles(f.cpu_ms, n=10)
        lines.append(f"| {f.where} ({f.kind}) | {f.how} | {f.images} | {f.median_cpu_ms:.2f} | "
                     f"{deciles[0]:.2f}-{deciles[-1]:.2f} | "
                     f"{min(f.round_cpu_ms):.2f}-{max(f.round_cpu_ms):.2f} | "
                     f"{med(f.wall_ms):.2f} |")  # fmt: skip
    lines.append("")
    lines.append("batchimg is compared with the floor that syncs as it does: one syncfs per "
                 "batch where that is as safe as an fsync (the writeback then runs in the "
                 "kernel's flusher threads, for the floor and batchimg alike), an fsync each "
                 "elsewhere.")  # fmt: skip
    return "\n".join(lines)


# --- validate and estimate on a long manifest -----------------------------------------------


def manifest_scenario(tmp: Path, big: int, small: int, repeat: int, bars: list[Bar]) -> str:
    paths = {}
    for lines in (big, small):
        paths[lines] = tmp / f"manifest-{lines}.jsonl"
        write_manifest(paths[lines], lines, quality="low")
    names = ("bare parse loop", "batchimg validate", "batchimg estimate")

    def cmd(name: str, path: Path) -> list[str]:
        if name == "bare parse loop":
            return [sys.executable, "-c", BARE_PARSE, str(path)]
        return [sys.executable, "-m", "batchimg", name.split()[1], str(path)]

    runs: dict[tuple[str, int], list[Process]] = {(n, s): [] for n in names for s in paths}
    for r in range(repeat):
        for name in alternate(names, r):
            for lines, path in paths.items():
                runs[name, lines].append(run_process(cmd(name, path)))
    m = {key: Process(med(p.wall_s for p in ps), med(p.cpu_s for p in ps),
                      med(p.rss_mib for p in ps), "", max(abs(p.exit_code) for p in ps))
         for key, ps in runs.items()}  # fmt: skip
    label = f"medians of {repeat} runs" if repeat > 1 else "one run"
    out = [f"### manifest: validate and estimate, {big:,} lines against a bare parse loop "
           f"({label})", "",
           "| command | lines | wall s | CPU s | CPU µs/line | peak RSS MiB | CPU / bare | "
           f"wall / bare | RSS / same on {small:,} lines | notes |",
           "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in names:
        for lines in (big, small):
            p, bare = m[name, lines], m["bare parse loop", lines]
            # ratios on the big manifest only: on the small one they compare start-ups
            versus = (f"{p.cpu_s / bare.cpu_s:.2f}x | {p.wall_s / bare.wall_s:.2f}x | "
                      f"{p.rss_mib / m[name, small].rss_mib:.2f}x" if lines == big
                      else "- | - | -")  # fmt: skip
            note = f"exit {p.exit_code}" if p.exit_code else ""
            out.append(f"| `{name}` | {lines:,} | {p.wall_s:.2f} | {p.cpu_s:.2f} | "
                       f"{1e6 * p.cpu_s / lines:.2f} | {p.rss_mib:.0f} | {versus} | "
                       f"{note} |")  # fmt: skip
    bare = m["bare parse loop", big]
    for name in names[1:]:
        p = m[name, big]
        bars += [
            Bar("manifest", f"`{name}` CPU vs bare parse loop", f"{big:,} lines",
                p.cpu_s / bare.cpu_s, 5.0),
            Bar("manifest", f"`{name}` wall vs bare parse loop", f"{big:,} lines",
                p.wall_s / bare.wall_s, 5.0),
            Bar("manifest", f"`{name}` peak RSS vs {small:,} lines (flat)", f"{big:,} lines",
                p.rss_mib / m[name, small].rss_mib, 1.2),
        ]  # fmt: skip
    return "\n".join(out)


# --- scale and rate limits ------------------------------------------------------------------


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
                cmd = client_cmd("baseline", manifest, out, base_url, 32)
            else:
                cmd = batchimg_cmd(manifest, out, base_url, "--concurrency", "32", *flags)
            wall, cpu, rss, stdout = measure(cmd)
            stats = mock_stats(base_url)
        done = peer_ok(stdout) if flags is None else ledger_ok(out)
        n429 = stats["by_status"].get("429", 0)
        extra = f"{wall / ideal:.2f}x ideal, {n429} x 429 ({n429 / max(1, stats['requests']):.1%})"
        results.append(Measure(name, wall, cpu, rss, done, count, extra))
    return results


# --- the bars -------------------------------------------------------------------------------


def client_bars(scenario: str, where: str, medians: dict[str, Measure],
                floor_ms: float | None, floor_doubt: str = "") -> list[Bar]:  # fmt: skip
    ours, sdk, bare = medians["batchimg"], medians["baseline"], medians["aiohttp"]
    if scenario == "overhead":
        return [
            Bar(scenario, "CPU vs SDK baseline", where, ours.cpu_s / sdk.cpu_s, 0.3),
            Bar(scenario, "wall vs SDK baseline", where, ours.wall_s / sdk.wall_s, 0.5),
            Bar(scenario, "CPU vs bare aiohttp loop", where, ours.cpu_s / bare.cpu_s, 2.0),
        ]
    after = per_image_ms(ours, after_startup=True) or 0.0
    return [
        Bar(scenario, "CPU vs SDK baseline", where, ours.cpu_s / sdk.cpu_s, 0.3),
        Bar(scenario, "peak RSS vs SDK baseline", where, ours.rss_mib / sdk.rss_mib, 0.4),
        Bar(scenario, "CPU/image after start-up vs the floor", where,
            after / (floor_ms or float("nan")), 2.0, doubt=floor_doubt),
    ]  # fmt: skip


def bars_table(bars: list[Bar], repeat: int, smoke: bool) -> str:
    caveat = ""
    if smoke:
        caveat = " (smoke sizes: the verdicts mean nothing and fail nothing)"
    elif repeat < 3:
        caveat = f" ({repeat} repetition{'s' if repeat > 1 else ''}: indicative; the bars need 3)"
    lines = [f"### the bars of issue 19{caveat}", "",
             "| scenario | bar | where | measured | at most | verdict |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for b in bars:
        value = f"{b.value:.3f}{b.unit}"  # three places: 0.304x is not met, 0.30x would look so
        limit = f"{b.limit:.2f}{b.unit}"
        verdict = f"no verdict: {b.doubt}" if b.doubt else "met" if b.met else "NOT MET"
        lines.append(f"| {b.scenario} | {b.what} | {b.where} | {value} | {limit} | "
                     f"{verdict} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated scenarios (default: all): {', '.join(SCENARIOS)}"
                        )  # fmt: skip
    parser.add_argument("--repeat", type=int, default=1,
                        help="repetitions of overhead, payload and manifest (bars: 3 or more)"
                        )  # fmt: skip
    parser.add_argument("--fs", choices=("default", "tmpfs", "both"), default="default",
                        help="where the clients' outputs go in overhead and payload: the "
                             "temporary directory on disk, /dev/shm, or each in turn")  # fmt: skip
    args = parser.parse_args()
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown:
        known = ", ".join(SCENARIOS)
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {known}")
    sizes = (
        {"startup": 5, "overhead": 60, "payload": 4, "floor": 20, "manifest": (20_000, 1_000),
         "scale": (3_000, 300), "ratelimit": 40}
        if args.smoke
        else {"startup": 7, "overhead": 1_500, "payload": 120, "floor": 120,
              "manifest": (1_000_000, 1_000), "scale": (1_000_000, 1_000), "ratelimit": 300}
    )  # fmt: skip
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
          f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}")  # fmt: skip
    compileall.compile_dir(ROOT / "batchimg", quiet=1)  # as an installed package would be
    tmp = Path(tempfile.mkdtemp(prefix="batchimg-bench-", dir=disk_root()))
    wanted = ["default", "tmpfs"] if args.fs == "both" else [args.fs]
    dirs = {"default": tmp}
    if "tmpfs" in wanted or "payload" in only:  # the floor is measured on both
        dirs["tmpfs"] = Path(tempfile.mkdtemp(prefix="batchimg-bench-", dir="/dev/shm"))
    for where, path in dirs.items():
        print(f"{where} filesystem: {path} ({fs_type(path)})")
    bars: list[Bar] = []
    try:
        why = same_memory()
        print("page cache: dropped before each client run of overhead and payload and each "
              "round of the floor" if why is None else
              f"page cache: {why}: a run's figures may depend on the runs before it")  # fmt: skip
        print()
        if "startup" in only:
            print(startup(tmp, sizes["startup"], bars) + "\n")
        if "overhead" in only:
            startups = client_startups(tmp, "overhead", CLIENTS, [])
            write_manifest(tmp / "overhead.jsonl", sizes["overhead"], quality="low")
            for where in wanted:
                rows = compare(tmp, dirs[where], where, "overhead", sizes["overhead"], 32,
                               args.repeat, [], startups)  # fmt: skip
                text, medians = report(f"overhead ({where} fs): {sizes['overhead']} tiny "
                                       "images, concurrency 32", rows)  # fmt: skip
                print(text + "\n")
                bars += client_bars("overhead", where, medians, None)
        if "payload" in only:
            b64 = payload_b64()
            floors: dict[str, Floor] = {}  # the floor that syncs as batchimg does there
            each: list[Floor] = []
            for w in ("default", "tmpfs"):
                fsynced = floor(w, dirs[w], b64, sizes["floor"], 5)
                batched = floor(w, dirs[w], b64, sizes["floor"], 5, batched=True)
                assert fsynced is not None
                floors[w] = batched or fsynced
                each += [f for f in (fsynced, batched) if f is not None]
            doubts = {w: floor_doubt(w, each) for w in floors}
            write_manifest(tmp / "payload.jsonl", sizes["payload"], quality="low")
            startups = client_startups(tmp, "payload", CLIENTS, ["--detailed-images"])
            for where in wanted:
                rows = compare(tmp, dirs[where], where, "payload", sizes["payload"], 32,
                               args.repeat, ["--detailed-images"], startups)  # fmt: skip
                floor_ms = floors[where].median_cpu_ms
                text, medians = report(f"payload ({where} fs): {sizes['payload']} images of "
                                       "2.5 MB, concurrency 32", rows, floor_ms)  # fmt: skip
                print(text + "\n")
                bars += client_bars("payload", where, medians, floor_ms, doubts[where])
            print(floor_table(each, len(b64) * 3 / 4 / 1e6) + "\n")
        if "manifest" in only:
            big, small = sizes["manifest"]
            print(manifest_scenario(tmp, big, small, args.repeat, bars) + "\n")
        if "scale" in only:
            big, small = sizes["scale"]
            rows = scale(tmp, big, small)
            print(table("scale: peak RSS by manifest length", rows))
            print(f"peak RSS {big:,} lines / {small:,} lines: "
                  f"{rows[1].rss_mib / rows[0].rss_mib:.2f}x\n")  # fmt: skip
        if "ratelimit" in only:
            rows = ratelimit(tmp, sizes["ratelimit"], 1200)
            print(table(f"rate limit: {sizes['ratelimit']} items, mock limited to 20 requests/s",
                        rows) + "\n")  # fmt: skip
        if INCOMPLETE:
            print("### runs that did not do every item (their scenarios' bars: no verdict)\n\n"
                  + "\n".join(f"- {run}" for _, _, run in INCOMPLETE) + "\n")  # fmt: skip
            for bar in bars:
                if incomplete(bar):
                    why = "a client run did not do every item"
                    bar.doubt = f"{bar.doubt}; {why}" if bar.doubt else why
        if bars:
            print(bars_table(bars, args.repeat, args.smoke))
    finally:
        for path in dirs.values():
            shutil.rmtree(path, ignore_errors=True)
    if INCOMPLETE:
        sys.exit(1)


if __name__ == "__main__":
    main()
