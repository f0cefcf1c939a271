"""Output to object storage against output to local disk: the same job, the same mock.

    python benchmarks/bench_s3.py                 # 2,000 payload-sized images, 3 repetitions
    python benchmarks/bench_s3.py --smoke         # 20 images, 1 repetition (CI)

Each repetition runs `batchimg run` twice on one manifest of photo-sized images (~2.5 MB PNG,
~3.4 MB of base64 each, the mock's `--detailed-images`), concurrency 32: once with `--out DIR`
on the local disk, once with `--out s3://bench/rN` against moto's S3 server on loopback, in
alternating order. The mock and the S3 server each run in a process of their own; wall, CPU
(user + system) and peak RSS are the batchimg process's own (os.wait4). Loopback S3 costs no
network time, so the difference is what the upload path itself costs the client: the extra
copy through the S3 client, the PUT requests, and the ledger's pieces.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mockproc import mock_process
from run import Measure, batchimg_cmd, ledger_ok, measure, write_manifest

KEY, SECRET = "AKIABENCHMARK0000001", "bench-secret-not-real"


def moto_server(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    deadline = time.monotonic() + 30
    while True:
        found = re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            return proc, f"http://127.0.0.1:{found.group(1)}"
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(log.read_text())
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    count, repeat = (20, 1) if args.smoke else (args.images, args.repeat)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
          f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}\n")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        manifest = tmp / "payload.jsonl"
        write_manifest(manifest, count, quality="low")
        server, endpoint = moto_server(tmp / "moto.log")
        aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
        os.environ.update(aws)
        try:
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir("bench")
            rows: list[Measure] = []
            for r in range(repeat):
                order = ["disk", "s3"] if r % 2 == 0 else ["s3", "disk"]
                for target in order:
                    state = tmp / f"state-{r}"
                    out = str(tmp / f"disk-{r}") if target == "disk" else f"s3://bench/r{r}"
                    with mock_process("--detailed-images") as base_url:
                        cmd = batchimg_cmd(manifest, Path(out), base_url, "--concurrency", "32")
                        if target == "s3":
                            cmd[cmd.index("--out") + 1] = out  # a URL, not a path
                            cmd += ["--state", str(state)]
                        wall, cpu, rss, _ = measure(cmd)
                    done = ledger_ok(state if target == "s3" else Path(out))
                    rows.append(Measure(f"--out {'DIR' if target == 'disk' else 's3://'}",
                                        wall, cpu, rss, done, count))  # fmt: skip
                    if target == "s3":
                        stored = len(fs.find(f"bench/r{r}/images"))
                        assert stored == done == count, (stored, done, count)
                        fs.rm(f"bench/r{r}", recursive=True)  # moto holds what it stores
                    else:
                        subprocess.run(["rm", "-rf", out], check=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"### {count:,} payload-sized images (~2.5 MB), concurrency 32, {repeat} repetitions\n")
    print("| output | done | wall s | CPU s | CPU ms/image | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for m in rows:
        print(f"| {m.name} | {m.done}/{m.total} | {m.wall_s:.2f} | {m.cpu_s:.2f} | "
              f"{1000 * m.cpu_s / max(1, m.done):.2f} | {m.rss_mib:.0f} |")  # fmt: skip

    def median(name: str, attr: str) -> float:
        values = sorted(getattr(m, attr) for m in rows if m.name == name)
        return values[len(values) // 2]

    measures = (("wall", "wall_s"), ("CPU", "cpu_s"), ("peak RSS", "rss_mib"))
    parts = [f"{label} {median('--out s3://', a) / median('--out DIR', a):.2f}x"
             for label, a in measures]  # fmt: skip
    print("\ns3 / disk (medians): " + ", ".join(parts))


if __name__ == "__main__":
    main()
