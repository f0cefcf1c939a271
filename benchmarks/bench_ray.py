"""Ray scale-out (issue 18): one process beside `--ray local --workers 2` and `--workers 3`.

    python benchmarks/bench_ray.py                 # 600 tiny items, 3 repetitions
    python benchmarks/bench_ray.py --smoke         # 60 items, 1 repetition, --workers 2 only (CI)
    python benchmarks/bench_ray.py --write         # and append the tables to RESULTS.md

Every configuration runs `batchimg run` with `--concurrency 8` on the same manifest of tiny
gpt-image-1 prompts, against a fresh `batchimg mock` process of its own with 0.5 s of latency
and a hard limit of 2,400 requests a minute (40 in each 1-second slice). One process is bound
by latency (8 in flight / 0.5 s = 16 requests/s); N workers can send 16 N a second, so two
approach the shared limit (32/s) and three would pass it (48/s) unless the limiter they share
holds them back. The configurations alternate (each repetition starts one further along) and
the tables show medians.

Per run: the command's wall time (interpreter start-up, and for Ray starting and stopping a
local instance), the run's own wall time (`wall_s` of the summary, `--log-format json`; on Ray
it starts once Ray is up, and includes starting the worker actors), throughput = items / the
run's wall time, and the client's CPU. Ray's processes (GCS, raylet, workers, agents) are not
all children of the command, so its CPU is counted in one of two ways:

- cgroup (where this process may make one, as root): the command starts in a cpuacct cgroup
  (v1) or cgroup (v2) of its own, which every process it starts, Ray's included, inherits;
  its usage counts them all and nothing else, whatever else runs on the machine;
- otherwise, the machine's busy time from /proc/stat (user + nice + system + irq + softirq;
  Ray's workers run niced) over the command, less the mock process's own (/proc/PID/stat utime
  + stime): whatever else runs on the machine is counted too.

Both are printed for every run, beside what the command and the descendants it reaped used
(os.wait4: a floor). The window lasts until the last process of the run's Ray instance has gone
(found by its RAY_TMPDIR). The idle machine's busy time is measured before and after.

The 429 share is the mock's own count (`/v1/_mock/stats`): 429 answers / all answers; the
ledger's `rate_limited` counts are shown beside it. Ray's start-up cost is the same command on
an empty manifest, reported on its own. A run that exits non-zero or leaves an item not ok in
its ledger stops the benchmark. batchimg's modules are byte-compiled first, as `pip install`
leaves them; the runs import the same batchimg this script finds (PYTHONPATH can point at
another copy).
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mockproc import mock_stats
from run import write_manifest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
HEADING = "## Ray scale-out (issue 18)"
TICK = os.sysconf("SC_CLK_TCK")
CONCURRENCY = 8


@dataclass
class Run:
    config: str
    items: int
    cmd_wall_s: float
    run_wall_s: float
    cpu_s: float  # the cgroup's if there is one, else machine_cpu_s
    machine_cpu_s: float  # the machine's busy CPU over the command, less the mock's
    reaped_cpu_s: float  # the command's and the descendants it reaped (os.wait4): a floor
    mock_cpu_s: float
    requests: int
    n429: int
    ledger_429: int
    linger_s: float  # how long Ray's processes outlived the command
    others: float | None  # cores others kept busy meanwhile (with a cgroup: the rest)
    deaths: int  # Ray workers that died (and were replaced) in the run


def busy_cpu_s() -> float:
    """The whole machine's busy CPU seconds so far (guest time is inside user already)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / TICK


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        after_name = fh.read().rsplit(")", 1)[1].split()
    return (int(after_name[11]) + int(after_name[12])) / TICK  # utime, stime


class Cgroup:
    """A cgroup of the command's own (None from `make` where none can be made)."""

    V1 = Path("/sys/fs/cgroup/cpuacct")
    V2 = Path("/sys/fs/cgroup")

    def __init__(self, path: Path, v1: bool) -> None:
        self.path, self.v1 = path, v1

    @classmethod
    def make(cls, name: str) -> Cgroup | None:
        for root, v1 in ((cls.V1, True), (cls.V2, False)):
            usage = "cpuacct.usage" if v1 else "cgroup.controllers"
            if not (root / usage).exists():
                continue
            try:
                (root / name).mkdir()
            except OSError:
                continue
            return cls(root / name, v1)
        return None

    def enter(self) -> None:
        """In the command's process, before it runs (preexec_fn)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def cpu_s(self) -> float:
        if self.v1:
            return int((self.path / "cpuacct.usage").read_text()) / 1e9
        fields = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return int(fields["usage_usec"]) / 1e6

    def remove(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:  # a process of the run not yet gone
                if time.monotonic() > deadline:
                    print(f"warning: {self.path} is left: a process is still in it",
                          file=sys.stderr)  # fmt: skip
                    return
                time.sleep(0.1)

    @classmethod
    def works(cls) -> bool:
        """Whether a command can be run in a cgroup of its own and its CPU read."""
        group = cls.make(f"batchimg-bench-{os.getpid()}-try")
        if group is None:
            return False
        try:
            subprocess.run(["true"], preexec_fn=group.enter, check=True)
            group.cpu_s()
        except (OSError, subprocess.SubprocessError, KeyError, ValueError):
            return False
        finally:
            group.remove()
        return True


def ray_processes(ray_tmp: Path) -> list[int]:
    """Processes that belong to the Ray instance started with RAY_TMPDIR=ray_tmp."""
    marker = f"RAY_TMPDIR={ray_tmp}\0".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker in Path(entry.path, "environ").read_bytes():
                found.append(int(entry.name))
    return found


def idle_load(seconds: float = 3.0) -> float:
    """Cores kept busy by whatever else runs on the machine (nothing of ours runs now)."""
    before = busy_cpu_s()
    time.sleep(seconds)
    return (busy_cpu_s() - before) / seconds


@contextlib.contextmanager
def mock_server(tmp: Path, latency: float, rpm_limit: int) -> Iterator[tuple[str, int]]:
    """A fresh `batchimg mock` process: its base URL and pid."""
    cmd = [sys.executable, "-m", "batchimg", "mock", "--port", "0",
           "--latency", str(latency), "--rpm-limit", str(rpm_limit)]  # fmt: skip
    with (
        open(tmp / "mock.log", "wb") as log,
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=tmp) as proc,
    ):
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            if not url.startswith("http"):
                raise RuntimeError(f"the mock did not start: {(tmp / 'mock.log').read_text()}")
            yield url, proc.pid
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def configurations(workers: list[int]) -> list[tuple[str, list[str]]]:
    return [("1 process", []),
            *((f"--ray local --workers {n}", ["--ray", "local", "--workers", str(n)])
              for n in workers)]  # fmt: skip


def ledger_counts(ledger: Path) -> tuple[int, int, int]:
    """Item lines: distinct ids ok, distinct ids not ok (at their last line), rate_limited."""
    last: dict[str, dict[str, Any]] = {}
    for raw in ledger.read_bytes().splitlines() if ledger.exists() else []:
        line = orjson.loads(raw)
        if "status" in line:
            last[str(line["id"])] = line
    ok = sum(1 for line in last.values() if line["status"] == "ok")
    limited = sum(int(line.get("rate_limited") or 0) for line in last.values())
    return ok, len(last) - ok, limited


def one_run(tmp: Path, name: str, config: str, flags: list[str], manifest: Path, items: int,
            args: argparse.Namespace) -> Run:  # fmt: skip
    out = tmp / f"out-{name}"
    ray_tmp = tmp / f"r-{name}"
    ray_tmp.mkdir()
    env = {**os.environ, "BATCHIMG_API_KEY": "sk-bench", "RAY_TMPDIR": str(ray_tmp)}
    group = Cgroup.make(f"batchimg-bench-{os.getpid()}-{name}") if args.cgroup else None
    try:
        with mock_server(tmp, args.latency, args.rpm_limit) as (url, mock_pid):
            cmd = [sys.executable, "-m", "batchimg", "run", str(manifest), "--out", str(out),
                   "--base-url", url, "--concurrency", str(CONCURRENCY), "--quiet",
                   "--log-format", "json", *flags]  # fmt: skip
            cpu0, mock0 = busy_cpu_s(), process_cpu_s(mock_pid)
            started = time.perf_counter()
            # cwd: not the repository, whose batchimg `-m` would put first on the path
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    env=env, cwd=tmp,
                                    preexec_fn=None if group is None else group.enter)  # fmt: skip
            assert proc.stderr is not None
            stderr = proc.stderr.read().decode(errors="replace")
            proc.stderr.close()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            cmd_wall = time.perf_counter() - started
            deadline = time.monotonic() + 30
            while ray_processes(ray_tmp) and time.monotonic() < deadline:
                time.sleep(0.05)
            linger = time.perf_counter() - started - cmd_wall
            cpu1, mock1 = busy_cpu_s(), process_cpu_s(mock_pid)
            group_cpu = None if group is None else group.cpu_s()
            stats = mock_stats(url)
    finally:
        if group is not None:
            group.remove()
    if proc.returncode != 0:
        raise SystemExit(f"{config} ({name}) exited {proc.returncode}:\n{stderr}")
    left = ray_processes(ray_tmp)
    if left:
        raise SystemExit(f"{config} ({name}): Ray processes {left} still there after 30 s")
    summary = next(orjson.loads(line) for line in reversed(stderr.splitlines())
                   if line.startswith('{"event":"summary"'))  # fmt: skip
    ok, not_ok, ledger_429 = ledger_counts(out / "ledger.jsonl")
    # A worker that dies is replaced by one that skips what it finished: "already done" then
    done = summary["ok"] + summary["already_done"]
    if done != items or ok != items or not_ok:
        raise SystemExit(f"{config} ({name}): {summary['ok']} ok in the summary, {ok} ok and "
                         f"{not_ok} not ok in the ledger, of {items}; the summary:\n{summary}"
                         f"\nstderr:\n{stderr}")  # fmt: skip
    shutil.rmtree(out)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    n429 = int(stats["by_status"].get("429", 0))
    mock_cpu = mock1 - mock0
    reaped = usage.ru_utime + usage.ru_stime
    machine_cpu = cpu1 - cpu0 - mock_cpu
    others = None if group_cpu is None else (machine_cpu - group_cpu) / (cmd_wall + linger)
    return Run(
        config, items, cmd_wall, float(summary["wall_s"]),
        machine_cpu if group_cpu is None else group_cpu, machine_cpu, reaped,
        mock_cpu, int(stats["requests"]), n429, ledger_429, linger, others,
        sum(1 for w in summary["warnings"] if " died (" in w),
    )  # fmt: skip


def raw_row(run: Run) -> str:
    rate = f"{run.items / run.run_wall_s:.1f}" if run.items else "-"
    others = "-" if run.others is None else f"{run.others:.2f}"
    return (
        f"{run.config} | {run.items} | {run.cmd_wall_s:.2f} | {run.run_wall_s:.2f} | {rate} | "
        f"{run.cpu_s:.2f} | {run.machine_cpu_s:.2f} | {run.reaped_cpu_s:.2f} | "
        f"{run.mock_cpu_s:.2f} | {run.requests} | {run.n429} ({run.ledger_429}) | "
        f"{run.linger_s:.2f} | {others} | {run.deaths}"
    )


def median(runs: list[Run], attr: str) -> float:
    return float(statistics.median(getattr(r, attr) for r in runs))


def machine() -> str:
    model = "?"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    ray = importlib.metadata.version("ray")
    return (
        f"{platform.machine()}, {os.cpu_count()} cores ({model}), {ram:.0f} GiB, "
        f"Python {platform.python_version()}, ray {ray}"
    )


def report(args: argparse.Namespace, items: int, repeat: int, workers: list[int],
           runs: list[Run], empty: list[Run], loads: tuple[float, float]) -> str:  # fmt: skip
    names = [c for c, _ in configurations(workers)]
    per_s = CONCURRENCY / args.latency
    cap = args.rpm_limit / 60
    cpu_note = (
        "Client CPU: the command's own cgroup, which Ray's processes (not all children of "
        "the command) inherit."
        if args.cgroup
        else "Client CPU: the machine's busy time over the command (Ray's processes are not "
        "all children of the command) less the mock's."
    )
    busy = [r.others for r in runs + empty if r.others is not None]
    during = f"; during the runs: median {statistics.median(busy):.2f}, most {max(busy):.2f}"
    during = during if busy else ""
    lines = [
        HEADING,
        "",
        f"`python benchmarks/bench_ray.py{' --smoke' if args.smoke else ''} --repeat {repeat}` "
        f"({time.strftime('%Y-%m-%d')}): {machine()}. The idle machine's other load: "
        f"{loads[0]:.2f} cores busy before, {loads[1]:.2f} after{during}.",
        "",
        f"{items:,} tiny gpt-image-1 items, `--concurrency {CONCURRENCY}` per process, against "
        f"`batchimg mock --latency {args.latency:g} --rpm-limit {args.rpm_limit}` ({cap:g} "
        f"requests/s) in a process of its own; configurations alternating, medians of "
        f"{repeat} (throughput: min-max). {cpu_note} In brackets: what the command and the "
        "descendants it reaped used (os.wait4), a floor. 429s are the mock's count.",
        "",
        "| configuration | command wall s | run wall s | items/s (ideal) | client CPU s "
        "(reaped) | CPU ms/item after start-up | mock CPU s | requests | 429 share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        mine = [r for r in runs if r.config == name]
        start = [r for r in empty if r.config == name]
        n = 1 if name == "1 process" else int(name.rsplit(" ", 1)[1])
        ideal = min(n * per_s, cap)
        rates = sorted(r.items / r.run_wall_s for r in mine)
        after = (median(mine, "cpu_s") - median(start, "cpu_s")) / items
        share = sum(r.n429 for r in mine) / max(1, sum(r.requests for r in mine))
        lines.append(
            f"| {name} | {median(mine, 'cmd_wall_s'):.2f} | {median(mine, 'run_wall_s'):.2f} | "
            f"{statistics.median(rates):.1f} ({rates[0]:.1f}-{rates[-1]:.1f}; {ideal:g}) | "
            f"{median(mine, 'cpu_s'):.2f} ({median(mine, 'reaped_cpu_s'):.2f}) | "
            f"{1000 * after:.2f} | {median(mine, 'mock_cpu_s'):.2f} | "
            f"{statistics.median(r.requests for r in mine):.0f} | {share:.1%} |"
        )
    died = [r for r in runs if r.deaths]
    if died:
        which = ", ".join(f"{r.config} ({r.deaths})" for r in died)
        lines += ["", f"Ray workers died (each replaced, every item done) in {len(died)} of "
                  f"{len(runs)} runs: {which}."]  # fmt: skip
    lines += [
        "",
        "Start-up: the same command on an empty manifest (medians):",
        "",
        "| configuration | command wall s | run wall s | client CPU s (reaped) |",
        "|---|---|---|---|",
    ]
    for name in names:
        start = [r for r in empty if r.config == name]
        lines.append(
            f"| {name} | {median(start, 'cmd_wall_s'):.2f} | {median(start, 'run_wall_s'):.2f} "
            f"| {median(start, 'cpu_s'):.2f} ({median(start, 'reaped_cpu_s'):.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", default=None, help="Ray worker counts (default: 2,3)")
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--rpm-limit", type=int, default=2400)
    parser.add_argument("--write", action="store_true", help=f"append to {RESULTS.name}")
    parser.add_argument(
        "--no-cgroup",
        dest="cgroup",
        action="store_false",
        help="count CPU from /proc/stat even where a cgroup can be made",
    )
    args = parser.parse_args()
    if importlib.util.find_spec("ray") is None:
        raise SystemExit("this benchmark needs Ray: pip install 'batchimg[ray]'")
    items, repeat = (60, 1) if args.smoke else (args.items, args.repeat)
    workers = [int(n) for n in (args.workers or ("2" if args.smoke else "2,3")).split(",")]
    configs = configurations(workers)
    spec = importlib.util.find_spec("batchimg")  # the package the runs import
    assert spec is not None and spec.submodule_search_locations
    compileall.compile_dir(spec.submodule_search_locations[0], quiet=1)  # as pip leaves it
    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d')}; batchimg from {spec.origin}")
    args.cgroup = args.cgroup and Cgroup.works()
    method = "cgroup" if args.cgroup else "/proc/stat less the mock"
    loads = [idle_load()]
    print(f"client CPU from: {method}; other load before: {loads[0]:.2f} cores busy\n")
    runs: list[Run] = []
    empty: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="bray") as tmpdir:
        tmp = Path(tmpdir)
        manifest = tmp / "items.jsonl"
        write_manifest(manifest, items, quality="low")
        nothing = tmp / "empty.jsonl"
        nothing.write_bytes(b"")
        print(
            "| rep | configuration | items | command wall s | run wall s | items/s | "
            "client CPU s | machine less mock | reaped | mock CPU s | requests | 429s (ledger) "
            "| Ray gone after s | others' cores | worker deaths |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in range(repeat):
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            for i, (config, flags) in enumerate(order):
                for size, path, into in ((items, manifest, runs), (0, nothing, empty)):
                    run = one_run(tmp, f"{r}-{i}-{size}", config, flags, path, size, args)
                    into.append(run)
                    print(f"| {r + 1} | {raw_row(run)} |", flush=True)
    loads.append(idle_load())
    print(f"\nother load after: {loads[1]:.2f} cores busy\n")
    table = report(args, items, repeat, workers, runs, empty, (loads[0], loads[1]))
    print(table)
    if args.write:
        with open(RESULTS, "a") as fh:
            fh.write("\n" + table + "\n")
        print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    main()
