"""The output directory and the manifest as a user may hand them over: unusable outputs are a
clear exit 2 before anything is sent, the ledger is not trusted blindly, and a manifest can
come from a pipe."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

import batchimg
from batchimg.mock import MockServer
from tests.conftest import TEST_KEY
from tests.helpers import ROOT, ledger, run_cli, threaded_mock


def manifest_at(path: Path, count: int = 3) -> Path:
    lines = [{"id": f"o{i}", "prompt": f"an output test {i}"} for i in range(count)]
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda out: out.write_text("x"), "is a file, not a directory"),
        (lambda out: (out / "ledger.jsonl").mkdir(parents=True), "is not a file"),
        (
            lambda out: out.mkdir() or (out / "ledger.jsonl").symlink_to(out.parent / "victim"),
            "is a symbolic link",
        ),
        (
            lambda out: out.mkdir() or (out / ".batchimg.lock").symlink_to(out.parent / "victim"),
            "is a symbolic link",
        ),
        # The temp area is emptied at every start: a link to elsewhere would empty elsewhere.
        (lambda out: out.mkdir() or (out / ".tmp").symlink_to(out.parent), "is a symbolic link"),
        (lambda out: out.mkdir() or (out / ".tmp").write_text("x"), "is not a directory"),
        (lambda out: out.mkdir() or (out / "images").write_text("x"), "is not a directory"),
        pytest.param(
            lambda out: out.mkdir() or (out / "images").symlink_to("/dev/shm"),
            "on another filesystem",
            marks=pytest.mark.skipif(
                not os.path.isdir("/dev/shm")
                or os.stat("/dev/shm").st_dev == os.stat(tempfile.gettempdir()).st_dev,
                reason="no second filesystem at /dev/shm",
            ),
        ),
    ],
    ids=[
        "out-is-a-file",
        "ledger-is-a-directory",
        "ledger-is-a-symlink",
        "lock-is-a-symlink",
        "temp-area-is-a-symlink",
        "temp-area-is-a-file",
        "images-is-a-file",
        "images-on-another-filesystem",
    ],
)
def test_an_unusable_output_is_exit_2_before_anything_is_sent(
    tmp_path: Path, make: Callable[[Path], object], fragment: str
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"someone else's file\n" * 3 + b"torn")
    out = tmp_path / "out"
    make(out)
    with threaded_mock(batchimg.mock.MockConfig(api_key=TEST_KEY)) as server:
        manifest = manifest_at(tmp_path / "m.jsonl")
        args = ["run", str(manifest), "--out", str(out), "--base-url", server.base_url]
        result = run_cli(*args, env={"BATCHIMG_API_KEY": TEST_KEY})
        assert not server.requests  # nothing sent
    assert result.returncode == 2, result.stderr
    assert fragment in result.stderr and "Traceback" not in result.stderr
    assert victim.read_bytes() == b"someone else's file\n" * 3 + b"torn"  # untouched, not cut


def test_an_output_that_cannot_be_written_is_exit_2(tmp_path: Path) -> None:
    # /proc refuses new files whoever asks (root ignores permission bits, so chmod cannot).
    result = run_cli("run", str(manifest_at(tmp_path / "m.jsonl")), "--out",
                     "/proc/batchimg-cannot-be-here", "--mock")  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "cannot create --out" in result.stderr and "Traceback" not in result.stderr


async def test_a_full_disk_at_the_start_is_exit_2_before_anything_is_sent(
    tmp_path: Path, mock_server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(10**9, 10**9 - 4096, 4096))
    for layout in ("imagefolder", "webdataset"):
        with pytest.raises(batchimg.UsageError, match="MiB free"):
            await batchimg.arun(
                manifest_at(tmp_path / "m.jsonl"),
                tmp_path / layout,
                batchimg.RunOptions(base_url=mock_server.base_url, api_key=TEST_KEY, layout=layout),
            )  # type: ignore[arg-type]
    assert not mock_server.requests


async def test_garbled_ledger_lines_are_counted_and_said(
    tmp_path: Path, mock_server: MockServer
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "ledger.jsonl").write_bytes(b'{"id": "old", "status": "error"}\nnot json\n[1]\n')
    summary = await batchimg.arun(
        manifest_at(tmp_path / "m.jsonl"),
        out,
        batchimg.RunOptions(base_url=mock_server.base_url, api_key=TEST_KEY),
    )
    assert summary.exit_code == 0
    (warning,) = [w for w in summary.warnings if "not ledger records" in w]
    assert "2 lines" in warning and "line 2, 3" in warning


def test_a_manifest_can_come_from_a_pipe(tmp_path: Path) -> None:
    data = manifest_at(tmp_path / "m.jsonl").read_bytes()
    with threaded_mock(batchimg.mock.MockConfig(api_key=TEST_KEY)) as server:
        env = {**os.environ, "BATCHIMG_API_KEY": TEST_KEY}
        for name, source in (("dash", "-"), ("devstdin", "/dev/stdin")):
            result = subprocess.run(
                [sys.executable, "-m", "batchimg", "run", source, "--out", str(tmp_path / name),
                 "--base-url", server.base_url], input=data, capture_output=True, env=env,
                cwd=ROOT, timeout=60,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert {r["id"] for r in ledger(tmp_path / name)} == {"o0", "o1", "o2"}
        for command in ("validate", "estimate"):
            result = subprocess.run([sys.executable, "-m", "batchimg", command, "-"], input=data,
                                    capture_output=True, env=env, cwd=ROOT, timeout=60)  # fmt: skip
            assert result.returncode == 0, result.stderr
        assert b"3 lines checked, 3 valid" in subprocess.run(
            [sys.executable, "-m", "batchimg", "validate", "-"], input=data,
            capture_output=True, env=env, cwd=ROOT, timeout=60,
        ).stdout  # fmt: skip


def test_a_byte_order_mark_does_not_fail_the_first_line(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + manifest_at(tmp_path / "m.jsonl").read_bytes())
    result = run_cli("validate", str(path))
    assert result.returncode == 0 and "3 valid, all valid" in result.stdout, result.stdout


@pytest.mark.parametrize("layout", ["imagefolder", "webdataset"])
def test_verify_finds_missing_and_changed_images_and_repair_has_them_made_again(
    tmp_path: Path, layout: str
) -> None:
    out = tmp_path / "out"
    manifest = manifest_at(tmp_path / "m.jsonl", 4)
    with threaded_mock(batchimg.mock.MockConfig(api_key=TEST_KEY)) as server:
        env = {"BATCHIMG_API_KEY": TEST_KEY}
        args = ["run", str(manifest), "--out", str(out), "--base-url", server.base_url,
                "--format", layout]  # fmt: skip
        assert run_cli(*args, env=env).returncode == 0
        intact = run_cli("verify", str(out))
        assert intact.returncode == 0 and "4 ok items, 4 files checked, all intact" in intact.stdout
        if layout == "imagefolder":
            (out / "images" / "o1-0.png").unlink()
            (out / "images" / "o2-0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot the same image")
        else:  # one sample is taken out of its shard: the shard is rewritten without it
            (shard,) = (out / "shards").glob("*.tar")
            with tarfile.open(shard) as tar:
                kept = [(m, tar.extractfile(m)) for m in tar if not m.name.startswith("o1-0.")]
                members = [(m, f.read()) for m, f in kept if f is not None]
            with tarfile.open(shard, "w") as tar:
                for member, data in members:
                    tar.addfile(member, io.BytesIO(data))
        broken = run_cli("verify", str(out))
        assert broken.returncode == 1, broken.stdout
        assert "o1 (line 2): images/o1-0.png: missing" in broken.stdout
        if layout == "imagefolder":
            assert "o2 (line 3): images/o2-0.png:" in broken.stdout
        assert "--repair" in broken.stdout
        requests_before = len(server.requests)
        repaired = run_cli("verify", str(out), "--repair")
        assert repaired.returncode == 0 and "marked" in repaired.stdout
        again = run_cli(*args, env=env)
        assert again.returncode == 0, again.stderr
        redone = len(server.requests) - requests_before
        assert redone == (2 if layout == "imagefolder" else 1)  # only the broken items
        assert run_cli("verify", str(out)).returncode == 0


def test_verify_refuses_a_directory_a_run_is_using(tmp_path: Path) -> None:
    from batchimg.outdir import exclusive

    out = tmp_path / "out"
    out.mkdir()
    (out / "ledger.jsonl").write_text("")
    with exclusive(out):
        result = run_cli("verify", str(out))
    assert result.returncode == 2 and "another batchimg run is using" in result.stderr
    assert run_cli("verify", str(tmp_path / "nowhere")).returncode == 2


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_wrong_base_url_stops_the_run_with_one_message_naming_it(tmp_path: Path) -> None:
    manifest = manifest_at(tmp_path / "m.jsonl", 12)
    env = {"BATCHIMG_API_KEY": TEST_KEY}
    refused = f"http://127.0.0.1:{_free_port()}/v1"
    with threaded_mock(batchimg.mock.MockConfig(api_key=TEST_KEY)) as server:
        no_v1 = server.base_url.removesuffix("/v1")  # every request: 404 Invalid URL
        for url, what in ((refused, "connect_error"), (no_v1, "HTTP 404")):
            result = run_cli("run", str(manifest), "--out", str(tmp_path / what), "--base-url",
                             url, "--concurrency", "4", env=env)  # fmt: skip
            assert result.returncode == 3, result.stderr
            stopped = [line for line in result.stderr.splitlines() if "cannot use the API" in line]
            assert len(stopped) == 2  # said when it stops, and in the summary
            assert url in stopped[-1] and what in stopped[-1] and "--base-url" in stopped[-1]
            assert result.stderr.count(" error id=") <= 4  # not one line per item


def test_a_key_that_is_refused_is_said_once(tmp_path: Path) -> None:
    manifest = manifest_at(tmp_path / "m.jsonl", 12)
    with threaded_mock(batchimg.mock.MockConfig(api_key=TEST_KEY, latency_s=0.2)) as server:
        result = run_cli("run", str(manifest), "--out", str(tmp_path / "o"), "--base-url",
                         server.base_url, "--concurrency", "6",
                         env={"BATCHIMG_API_KEY": "sk-wrong-key-1234"})  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert " error id=" not in result.stderr  # not one line per item in flight ...
    (said,) = [line for line in result.stderr.splitlines() if "warning message=" in line]
    assert "stopping: HTTP 401 invalid_api_key" in said  # ... one, when it stops
    assert "failures: invalid_api_key x" in result.stderr
    assert "sk-wrong-key-1234" not in result.stderr


def test_after_ctrl_c_the_summary_accounts_for_every_item(tmp_path: Path) -> None:
    import re
    import signal

    from tests.helpers import start_cli, wait_for

    manifest = manifest_at(tmp_path / "m.jsonl", 60)
    out = tmp_path / "out"
    with threaded_mock(batchimg.mock.MockConfig(api_key=TEST_KEY, latency_s=0.3)) as server:
        process = start_cli(manifest, out, server, "--grace-period", "5")
        wait_for(lambda: (out / "ledger.jsonl").exists() and (out / "ledger.jsonl").stat().st_size)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    found = re.search(r"(\d+) ok, (\d+) failed, (\d+) already done, (\d+) not attempted", stderr)
    assert found is not None, stderr
    assert sum(map(int, found.groups())) == 60  # the rest of the manifest is counted too


@pytest.mark.parametrize("layout", ["imagefolder", "webdataset"])
async def test_ledger_lines_of_odd_shapes_break_no_command(
    tmp_path: Path, mock_server: MockServer, layout: str
) -> None:
    """Lines that parse as JSON but not as the ledger's shapes (a hand edit, another tool):
    `run`, `verify` and `report` go on; the odd ok line's item is counted done but its files
    are reported broken by `verify`."""
    out = tmp_path / layout
    out.mkdir()
    odd = [
        {"id": "o0", "status": "ok", "files": 5, "sha256": "x", "started_at": "yesterday"},
        {"id": "o1", "status": "error", "error": "boom", "finished_at": 12},
        {"id": "o9", "status": "ok", "files": ["images/o9-0.png"], "sha256": None},
    ]
    (out / "ledger.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in odd))
    summary = await batchimg.arun(
        manifest_at(tmp_path / "m.jsonl"),
        out,
        batchimg.RunOptions(base_url=mock_server.base_url, api_key=TEST_KEY, layout=layout),  # type: ignore[arg-type]
    )
    assert (summary.ok, summary.skipped) == (2, 1)  # o1 and o2 made, o0 taken as done
    for args in (["verify", str(out)], ["report", str(out), "--format", "json"]):
        result = run_cli(*args)
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == (1 if args[0] == "verify" else 0), result.stderr
    assert "o0" in run_cli("verify", str(out)).stdout + run_cli("verify", str(out)).stderr
