"""The output directory and the manifest as a user may hand them over: unusable outputs are a
clear exit 2 before anything is sent, the ledger is not trusted blindly, and a manifest can
come from a pipe."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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
    ],
    ids=["out-is-a-file", "ledger-is-a-directory", "ledger-is-a-symlink", "lock-is-a-symlink"],
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
            await batchimg.arun(manifest_at(tmp_path / "m.jsonl"), tmp_path / layout,
                                base_url=mock_server.base_url, api_key=TEST_KEY,
                                layout=layout)  # type: ignore[arg-type]  # fmt: skip
    assert not mock_server.requests


async def test_garbled_ledger_lines_are_counted_and_said(
    tmp_path: Path, mock_server: MockServer
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "ledger.jsonl").write_bytes(b'{"id": "old", "status": "error"}\nnot json\n[1]\n')
    summary = await batchimg.arun(manifest_at(tmp_path / "m.jsonl"), out,
                                  base_url=mock_server.base_url, api_key=TEST_KEY)  # fmt: skip
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
