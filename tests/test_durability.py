"""The writer's promise, checked on the system calls a real run makes (strace): every image's
bytes are durable before its name points at them, the rename is durable before its item
counts, and its item counts (the ledger's ok line) only after both. Whether a batch is synced
with one syncfs or each file with an fsync, the order is the same; both ways are traced.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from batchimg.mock import MockConfig, MockServer
from batchimg.stores.fssync import SAFE_KINDS, filesystem_sync, kernel, mount_kind
from batchimg.stores.local import LocalStore
from tests.conftest import TEST_KEY
from tests.helpers import ROOT, ledger, threaded_mock

STRACE = shutil.which("strace")
TRACED = "write,writev,pwrite64,fsync,fdatasync,syncfs,rename,renameat,renameat2"


@pytest.fixture(scope="module")
def strace() -> str:
    if STRACE is None:
        if os.environ.get("BATCHIMG_REQUIRE_STRACE"):
            pytest.fail("strace is required here (BATCHIMG_REQUIRE_STRACE) but not found")
        pytest.skip("strace is not installed")
    probe = subprocess.run([STRACE, "-o", os.devnull, "true"], capture_output=True, text=True)
    if probe.returncode != 0:  # a container that forbids ptrace: nothing to trace with
        pytest.skip(f"strace cannot trace here: {probe.stderr.strip()}")
    return STRACE


@dataclass
class Call:
    start: int  # the trace line where the call began
    end: int  # ... and where it returned (the same line unless another thread came between)
    name: str
    text: str  # its arguments and result, as strace prints them

    def fd_path(self) -> str | None:
        """The path of the call's first argument, a descriptor (strace -y: `7</a/b>`)."""
        found = re.match(r"\d+<([^>]*)>", self.text)
        return found[1] if found else None

    def paths(self) -> list[str]:
        return [orjson.loads(f'"{s}"') for s in re.findall(r'"((?:[^"\\]|\\.)*)"', self.text)]


def calls(trace: Path) -> list[Call]:
    """The traced calls, each from where it began to where it returned (strace -f splits a call
    another thread interrupts into `<unfinished ...>` and `<... NAME resumed>` lines)."""
    done: list[Call] = []
    open_calls: dict[str, Call] = {}
    for index, line in enumerate(trace.read_text(errors="replace").splitlines()):
        pid, _, rest = line.partition(" ")
        rest = rest.lstrip()
        if resumed := re.match(r"<\.\.\. (\w+) resumed>(.*)", rest):
            call = open_calls.pop(pid)
            call.end, call.text = index, call.text + resumed[2]
            done.append(call)
        elif started := re.match(r"(\w+)\((.*)", rest):
            call = Call(index, index, started[1], started[2])
            if rest.endswith("<unfinished ...>"):
                call.text = call.text.removesuffix("<unfinished ...>")
                open_calls[pid] = call
            else:
                done.append(call)
    return sorted(done, key=lambda c: c.start)


def check_order(trace: Path, out: Path, ok_ids: list[str]) -> dict[str, int]:
    """Assert the promise for every image of `ok_ids`; return how its bytes were synced."""
    traced = calls(trace)
    images = str(out.resolve() / "images")
    ledger_path = str(out.resolve() / "ledger.jsonl")
    how = {"syncfs": 0, "fsync": 0}
    for item in ok_ids:
        final = f"{images}/{item}-0.png"
        renames = [c for c in traced if c.name.startswith("rename") and final in c.paths()]
        assert len(renames) == 1, f"{final}: {len(renames)} renames"
        rename = renames[0]
        temp = rename.paths()[0]
        writes = [c for c in traced if c.name in ("write", "writev") and c.fd_path() == temp]
        assert writes and writes[-1].end < rename.start, f"{temp}: not written before its rename"
        written = writes[-1].end
        syncs = [
            c for c in traced
            if written < c.start and c.end < rename.start
            and ((c.name == "syncfs" and temp.startswith(f"{c.fd_path()}/"))
                 or (c.name == "fsync" and c.fd_path() == temp))
        ]  # fmt: skip
        assert syncs, f"{temp}: its bytes were not synced between its last write and its rename"
        how["syncfs" if syncs[0].name == "syncfs" else "fsync"] += 1
        oks = [
            c for c in traced
            if c.name == "write" and c.fd_path() == ledger_path
            and f'\\"id\\":\\"{item}\\"' in c.text and '\\"status\\":\\"ok\\"' in c.text
        ]  # fmt: skip
        assert len(oks) == 1, f"{item}: {len(oks)} ok lines in the trace"
        dir_syncs = [
            c for c in traced
            if c.name == "fsync" and c.fd_path() == images
            and rename.end < c.start and c.end < oks[0].start
        ]  # fmt: skip
        assert dir_syncs, f"{item}: counted before the rename of {final} was made durable"
    return how


@pytest.fixture(scope="module")
def tiny_mock() -> Iterator[MockServer]:
    with threaded_mock(MockConfig(api_key=TEST_KEY)) as server:
        yield server


@pytest.fixture(scope="module")
def photo_mock() -> Iterator[MockServer]:
    with threaded_mock(MockConfig(api_key=TEST_KEY, detailed_images=True)) as server:
        yield server


def traced_run(strace: str, server: MockServer, tmp_path: Path, count: int) -> tuple[Path, Path]:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_bytes(
        b"".join(
            orjson.dumps({"model": "gpt-image-1", "prompt": f"durable {i}", "quality": "low"})
            + b"\n"
            for i in range(count)
        )
    )
    out, trace = tmp_path / "out", tmp_path / "trace.txt"
    cmd = [strace, "-f", "-y", "-s", "4096", "-e", f"trace={TRACED}", "-o", str(trace),
           sys.executable, "-m", "batchimg", "run", str(manifest), "--out", str(out),
           "--base-url", server.base_url, "--concurrency", "8", "--quiet"]  # fmt: skip
    env = {**os.environ, "BATCHIMG_API_KEY": TEST_KEY}
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out, trace


def local_batch_sync_applies(directory: Path) -> bool:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        return filesystem_sync(fd, directory) is not None
    finally:
        os.close(fd)


@pytest.mark.parametrize("answers", ["tiny", "photo"])
def test_every_image_is_durable_before_its_name_and_its_name_before_its_item_counts(
    strace: str, answers: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    server = request.getfixturevalue(f"{answers}_mock")
    out, trace = traced_run(strace, server, tmp_path, 24 if answers == "tiny" else 4)
    ok_ids = [r["id"] for r in ledger(out) if r["status"] == "ok"]
    assert len(ok_ids) == (24 if answers == "tiny" else 4)
    how = check_order(trace, out, ok_ids)
    if local_batch_sync_applies(out):  # one syncfs per batch, not an fsync per file
        assert how == {"syncfs": len(ok_ids), "fsync": 0}
        temps = str(out.resolve() / ".tmp")
        assert not [c for c in calls(trace) if c.name == "fsync" and c.text.startswith(temps, 2)]
    else:
        assert how == {"syncfs": 0, "fsync": len(ok_ids)}


WRITER_SCRIPT = """
import asyncio, sys
from pathlib import Path
from batchimg.stores.local import LocalStore
from batchimg.writer import BatchedWriter, ImageWriter
from tests.test_writer import PNG

async def main() -> None:
    writer = BatchedWriter(ImageWriter(LocalStore(Path(sys.argv[1]), fs_sync=False)), threads=1)
    await asyncio.gather(*(writer.save(f"img{i}", [PNG], "png") for i in range(12)))
    writer.close()
    print("saved")

asyncio.run(main())
"""


def test_without_a_filesystem_sync_each_file_is_fsynced_before_its_rename(
    strace: str, tmp_path: Path
) -> None:
    out, trace = tmp_path / "out", tmp_path / "trace.txt"
    cmd = [strace, "-f", "-y", "-e", f"trace={TRACED}", "-o", str(trace), sys.executable, "-c",
           WRITER_SCRIPT, str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "saved", done.stderr
    traced = calls(trace)
    assert not [c for c in traced if c.name == "syncfs"]
    images = str(out.resolve() / "images")
    for i in range(12):
        final = f"{images}/img{i}-0.png"
        (rename,) = [c for c in traced if c.name.startswith("rename") and final in c.paths()]
        temp = rename.paths()[0]
        fsyncs = [c for c in traced if c.name == "fsync"]
        assert [c for c in fsyncs if c.fd_path() == temp and c.end < rename.start]
        assert [c for c in fsyncs if c.fd_path() == images and c.start > rename.end]


def test_the_filesystem_kind_is_read_from_the_mount_table_as_df_reads_it(tmp_path: Path) -> None:
    df = shutil.which("df")
    if df is None:
        pytest.skip("no df to compare with")
    told = subprocess.run([df, "--output=fstype", str(tmp_path)], capture_output=True, text=True)
    if told.returncode != 0:
        pytest.skip(f"df cannot say: {told.stderr.strip()}")
    assert mount_kind(os.stat(tmp_path).st_dev) == told.stdout.split()[-1]


def test_a_mount_table_line_names_its_kind_and_an_unknown_device_has_none(tmp_path: Path) -> None:
    table = tmp_path / "mountinfo"
    table.write_text(
        "22 27 0:21 / /proc rw,relatime - proc proc rw\n"
        "27 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "30 27 0:45 / /mnt/bucket rw,nosuid - fuse.s3fs s3fs rw,user_id=0\n"
        "31 27 0:46 / /a rw - xfs /dev/x rw\n"
        "32 27 0:46 / /b rw - btrfs /dev/x rw\n"
    )
    assert mount_kind(os.makedev(252, 1), str(table)) == "ext4"
    assert mount_kind(os.makedev(0, 45), str(table)) == "fuse.s3fs"
    assert mount_kind(os.makedev(0, 46), str(table)) is None  # two kinds: not sure, so none
    assert mount_kind(os.makedev(9, 9), str(table)) is None
    assert mount_kind(os.makedev(252, 1), str(tmp_path / "missing")) is None
    assert "fuse.s3fs" not in SAFE_KINDS and "nfs" not in SAFE_KINDS and "ext4" in SAFE_KINDS


@pytest.mark.parametrize(
    ("release", "expected"),
    [("6.18.44-fc-v669", (6, 18)), ("5.8.0-63-generic", (5, 8)), ("5.4.0", (5, 4)),
     ("4.19.112+", (4, 19)), ("weird", (0, 0)), ("7", (0, 0))],
)  # fmt: skip
def test_the_kernel_release_gives_its_major_and_minor(
    release: str, expected: tuple[int, int]
) -> None:
    assert kernel(release) == expected


@pytest.fixture
def failing_disk(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """An ext4 filesystem whose writes fail (EIO) once its loop device's backing file outgrows
    a 24 MiB tmpfs, and that tmpfs (remount it larger and writes succeed again). Needs root,
    loop devices and mkfs.ext4: skipped where the machine has none of them."""
    tools = [shutil.which(t) for t in ("mount", "umount", "losetup", "mkfs.ext4", "truncate")]
    if os.geteuid() != 0 or None in tools:
        pytest.skip("needs root, mount, losetup and mkfs.ext4")
    backing, mountpoint = tmp_path / "backing", tmp_path / "disk"
    backing.mkdir()
    mountpoint.mkdir()
    cleanup: list[list[str]] = []

    def run(*cmd: str) -> str:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot make a failing disk here: {' '.join(cmd)}: {done.stderr}")
        return done.stdout.strip()

    try:
        run("mount", "-t", "tmpfs", "-o", "size=24M", "tmpfs", str(backing))
        cleanup.insert(0, ["umount", "-l", str(backing)])
        image = backing / "disk.img"
        run("truncate", "-s", "256M", str(image))
        run("mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "nodiscard", str(image))
        loop = run("losetup", "-f", "--show", str(image))
        cleanup.insert(0, ["losetup", "-d", loop])
        run("mount", "-o", "errors=continue", loop, str(mountpoint))
        cleanup.insert(0, ["umount", "-l", str(mountpoint)])
        yield mountpoint, backing
    finally:
        for cmd in cleanup:
            subprocess.run(cmd, capture_output=True)


def test_after_a_failed_syncfs_each_file_is_checked_on_its_own(
    failing_disk: tuple[Path, Path],
) -> None:
    # Batch 1's syncfs also writes back (and loses) batch 2's file, written meanwhile, and
    # reports the error once, to batch 1. Batch 2's file must not then count as saved: the
    # store fsyncs it on its own, and that fsync reports its own lost write.
    mountpoint, backing = failing_disk
    store = LocalStore(mountpoint / "out")
    if not local_batch_sync_applies(mountpoint / "out"):
        pytest.skip("syncfs is not used on this kernel")
    small = store.write_temp("batch1-0.png", b"\x89PNG\r\n\x1a\n" + b"x" * 100)
    big = store.write_temp("batch2-0.png", b"\x89PNG\r\n\x1a\n" + os.urandom(40 << 20))
    with pytest.raises(OSError):
        store.settle([str(small)])
    subprocess.run(["mount", "-o", "remount,size=400M", str(backing)], check=True)
    store.settle([str(big)])
    with pytest.raises(OSError):
        store.put("images/batch2-0.png", Path(big))
    assert not (mountpoint / "out" / "images" / "batch2-0.png").exists()
