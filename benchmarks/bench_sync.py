"""What making a batch of small files durable costs: an fsync of each, or one syncfs.

    python benchmarks/bench_sync.py                 # 1,500 files of 300 bytes, batches of 32
    python benchmarks/bench_sync.py --smoke

Each way writes the same files (create, write, then the way's sync, then rename, then one
directory fsync per batch), as batchimg's writer thread does. CPU is reported twice: this
process's own (what `benchmarks/run.py` counts for every client) and the whole machine's busy
time from /proc/stat, so that work handed to the kernel's flusher or journal threads is counted
too. Ways alternate, repeated; medians. Linux only (syncfs); on a filesystem where batchimg would
not use syncfs (see `batchimg/stores/fssync.py`) it says so and measures anyway.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batchimg.stores.fssync import filesystem_sync, libc_syncfs, mount_kind
from batchimg.stores.local import fsync_path

DATA = os.urandom(300)


def machine_busy_s() -> float:
    """Seconds of CPU the whole machine spent busy (not idle, not waiting for I/O)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def each_fsync(directory: str, count: int, batch: int) -> None:
    for start in range(0, count, batch):
        for i in range(start, min(start + batch, count)):
            fd = os.open(f"{directory}/{i}.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            os.write(fd, DATA)
            os.fsync(fd)
            os.close(fd)
            os.rename(f"{directory}/{i}.tmp", f"{directory}/{i}.png")
        fsync_path(directory, os.O_RDONLY | os.O_DIRECTORY)


def one_syncfs(directory: str, count: int, batch: int) -> None:
    syncfs = libc_syncfs()
    assert syncfs is not None
    for start in range(0, count, batch):
        names = range(start, min(start + batch, count))
        for i in names:
            fd = os.open(f"{directory}/{i}.tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            os.write(fd, DATA)
            os.close(fd)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            syncfs(fd)
        finally:
            os.close(fd)
        for i in names:
            os.rename(f"{directory}/{i}.tmp", f"{directory}/{i}.png")
        fsync_path(directory, os.O_RDONLY | os.O_DIRECTORY)


WAYS: dict[str, Callable[[str, int, int], None]] = {
    "fsync each file": each_fsync,
    "one syncfs per batch": one_syncfs,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    count, batch, repeat = (60, 8, 1) if args.smoke else (1_500, 32, 5)
    kind = mount_kind(os.stat(args.dir).st_dev)
    fd = os.open(args.dir, os.O_RDONLY | os.O_DIRECTORY)
    used = filesystem_sync(fd, args.dir) is not None
    os.close(fd)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, kernel {platform.release()}")  # fmt: skip
    print(f"directory: {args.dir} ({kind}); batchimg uses syncfs here: {'yes' if used else 'no'}")
    print(f"{count} files of {len(DATA)} bytes, batches of {batch}, {repeat} repetitions\n")
    own: dict[str, list[float]] = {way: [] for way in WAYS}
    busy: dict[str, list[float]] = {way: [] for way in WAYS}
    wall: dict[str, list[float]] = {way: [] for way in WAYS}
    # Every repetition's files stay until the end: on a journal-less ext4 a file created within
    # a minute of removals scans past each inode they freed (see run.done_with).
    made: list[str] = []
    try:
        for r in range(repeat):
            order = list(WAYS) if r % 2 == 0 else list(reversed(WAYS))
            for way in order:
                made.append(directory := tempfile.mkdtemp(dir=args.dir, prefix="bench-sync-"))
                os.sync()
                b0, c0, w0 = machine_busy_s(), time.process_time(), time.perf_counter()
                WAYS[way](directory, count, batch)
                b1, c1, w1 = machine_busy_s(), time.process_time(), time.perf_counter()
                own[way].append(1000 * (c1 - c0) / count)
                busy[way].append(1000 * (b1 - b0) / count)
                wall[way].append(1000 * (w1 - w0) / count)
    finally:
        for directory in made:
            shutil.rmtree(directory, ignore_errors=True)
    print("| way | process CPU ms/file | whole machine busy ms/file | wall ms/file |")
    print("|---|---|---|---|")
    for way in WAYS:
        cells = [statistics.median(figures[way]) for figures in (own, busy, wall)]
        print(f"| {way} | " + " | ".join(f"{v:.3f}" for v in cells) + " |")
    first, second = (statistics.median(busy[w]) for w in WAYS)
    if first > 0:  # /proc/stat counts in clock ticks (10 ms): a smoke run may see none
        print(f"\nsyncfs per batch / fsync each, whole machine busy: {second / first:.2f}x")


if __name__ == "__main__":
    main()
