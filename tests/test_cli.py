"""The `batchimg` command as a user runs it: a real process, real exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from batchimg.mock import MockConfig, MockServer
from tests.helpers import check_ok_record, last_states, ledger, run_cli, threaded_mock

ROOT = Path(__file__).resolve().parent.parent
batchimg = run_cli


@pytest.fixture
def threaded_server() -> Iterator[MockServer]:
    with threaded_mock(MockConfig(api_key="sk-cli-secret-value-42")) as server:
        yield server


def test_readme_quickstart_runs_the_example_job_on_the_mock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = batchimg("run", "jobs/example.jsonl", "--out", str(out), "--mock")
    assert result.returncode == 0, result.stderr
    records = ledger(out)
    assert len(records) == 26
    for record in records:
        check_ok_record(out, record)
    assert "26 ok, 0 failed" in result.stderr
    assert "ledger" in result.stderr and "cost: $" in result.stderr
    again = batchimg("run", "jobs/example.jsonl", "--out", str(out), "--mock")
    assert again.returncode == 0
    assert "0 ok, 0 failed, 26 already done" in again.stderr
    assert len(ledger(out)) == 26


def test_missing_key_exits_2_naming_the_variables(tmp_path: Path) -> None:
    result = batchimg("run", "jobs/example.jsonl", "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "BATCHIMG_API_KEY" in result.stderr and "OPENAI_API_KEY" in result.stderr
    assert "--mock" in result.stderr
    modelverse = batchimg(
        "run", "jobs/example.jsonl", "--out", str(tmp_path / "o"), "--provider", "modelverse"
    )
    assert modelverse.returncode == 2 and "MODELVERSE_API_KEY" in modelverse.stderr
    named = batchimg(
        "run", "jobs/example.jsonl", "--out", str(tmp_path / "o"), "--api-key-env", "MY_KEY"
    )
    assert named.returncode == 2 and "MY_KEY" in named.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--concurrency", "0"], "--concurrency"),
        (["--size", "999x999"], "--size"),
        (["--n", "11"], "--n"),
        (["--provider", "nope"], "--provider"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_flag_exits_2_with_an_actionable_message(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    result = batchimg("run", "jobs/example.jsonl", "--out", str(tmp_path / "o"), "--mock", *args)
    assert result.returncode == 2
    assert expected in result.stderr


def test_default_illegal_for_the_default_model_exits_2(tmp_path: Path) -> None:
    result = batchimg(
        "run", "jobs/example.jsonl", "--out", str(tmp_path / "o"), "--mock", "--size", "256x256"
    )
    assert result.returncode == 2
    assert "--size" in result.stderr and "256x256" in result.stderr


def test_unreadable_manifest_exits_2(tmp_path: Path) -> None:
    result = batchimg(
        "run", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"), "--mock"
    )
    assert result.returncode == 2
    assert "missing.jsonl" in result.stderr


@pytest.mark.parametrize("command", ["run", "validate", "estimate"])
def test_a_directory_given_as_the_manifest_exits_2_with_a_message(
    tmp_path: Path, command: str
) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    out = ["--out", str(tmp_path / "o"), "--mock"] if command == "run" else []
    result = batchimg(command, str(folder), *out)
    assert result.returncode == 2
    assert f"cannot read manifest {str(folder)!r}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()  # nothing written before the error


def test_some_items_failing_exits_1(tmp_path: Path, write_manifest: Callable[..., Path]) -> None:
    manifest = write_manifest([{"prompt": "a fine boat"}, {"prompt": "bad", "n": 0}])
    result = batchimg("run", str(manifest), "--out", str(tmp_path / "o"), "--mock")
    assert result.returncode == 1
    assert "1 ok, 1 failed" in result.stderr


def test_real_provider_path_with_key_from_env_never_leaks_the_key(
    tmp_path: Path, threaded_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(
        [{"prompt": "a blue heron"}, {"prompt": "[[mock:moderation]] x"}, "{oops"]
    )
    out = tmp_path / "o"
    result = batchimg(
        "run",
        str(manifest),
        "--out",
        str(out),
        "--base-url",
        threaded_server.base_url,
        env={"OPENAI_API_KEY": "sk-cli-secret-value-42"},
    )
    assert result.returncode == 1, result.stderr
    assert len(threaded_server.requests) == 2
    secret = "sk-cli-secret-value-42"
    assert secret not in result.stdout + result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_wrong_key_exits_3_and_says_what_to_do(
    tmp_path: Path, threaded_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest([{"prompt": f"egret {i}"} for i in range(20)])
    result = batchimg(
        "run",
        str(manifest),
        "--out",
        str(tmp_path / "o"),
        "--base-url",
        threaded_server.base_url,
        "--concurrency",
        "2",
        env={"BATCHIMG_API_KEY": "sk-not-the-right-one"},
    )
    assert result.returncode == 3
    assert "stopped early" in result.stderr and "invalid_api_key" in result.stderr
    assert "sk-not-the-right-one" not in result.stderr
    assert len(threaded_server.requests) <= 2


def test_help_lists_commands_and_options() -> None:
    top = batchimg("--help")
    assert top.returncode == 0 and "run" in top.stdout and "mock" in top.stdout
    run_help = batchimg("run", "--help")
    for option in ("--out", "--mock", "--concurrency", "--api-key-env", "--provider", "--size"):
        assert option in run_help.stdout


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_sigint_drains_in_flight_exits_130_and_rerun_finishes(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    with threaded_mock(MockConfig(api_key="sk-sig", latency_s=0.3)) as server:
        manifest = write_manifest([{"id": f"s{i}", "prompt": f"stone {i}"} for i in range(12)])
        out = tmp_path / "o"
        args = [sys.executable, "-m", "batchimg", "run", str(manifest), "--out", str(out)]
        args += ["--base-url", server.base_url, "--concurrency", "2"]
        env = {**os.environ, "BATCHIMG_API_KEY": "sk-sig"}
        proc = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        ledger_path = out / "ledger.jsonl"
        _wait_for(lambda: ledger_path.exists() and ledger_path.stat().st_size > 0)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "re-run" in stderr
        first = ledger(out)
        assert 1 <= len(first) < 12
        assert all(r["status"] == "ok" for r in first)  # in-flight items finished, not failed
        sent_before = len(server.requests)
        assert sent_before == len(first)  # nothing was left half-done
        rerun = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert rerun.returncode == 0, rerun.stderr
        states = last_states(out)
        assert len(states) == 12 and all(r["status"] == "ok" for r in states.values())
        assert len(server.requests) == 12  # no ok item was requested twice


def test_mock_command_serves_on_a_free_port() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "batchimg", "mock", "--port", "0", "--api-key", "k1"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as proc:
        try:
            assert proc.stdout is not None
            base_url = proc.stdout.readline().strip()
            assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
            client = openai.OpenAI(base_url=base_url, api_key="k1", max_retries=0)
            result = client.images.generate(model="gpt-image-1", prompt="a moth", quality="low")
            client.close()
            assert result.data and result.data[0].b64_json
            assert result.usage is not None and result.usage.output_tokens == 272
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    assert proc.returncode == 0
