"""Start-up: what each command imports, and the small fast paths of the per-item work.

A command pays at start for every module it imports. `--help`, `validate`, `estimate` and
`report` never send a request, so they must not import aiohttp (about 0.1 s) or the engine; a
run imports aiohttp only once it has a request to send. The import lists are read from
`python -X importtime`, in a fresh interpreter each.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest

import batchimg
from batchimg import cli
from batchimg.backends import ClientConfig, Secret
from batchimg.backends.online import OnlineBackend
from batchimg.engine.records import now
from batchimg.limiter import RateLimitHeaders, parse_go_duration
from batchimg.specs import IMAGE_MIME, request_shape
from batchimg.usage import Usage, UsageProblem, read_usage

from .helpers import KEY_VARS, ROOT

#: Modules a command that sends nothing must not load.
HEAVY = ("aiohttp", "batchimg.api", "batchimg.engine.run", "batchimg.backends.online", "PIL")
#: Nor these, but for `estimate` (whose ledger reader takes buckets too): OpenSSL (hashlib; the
#: ids' blake2b is hashlib's own without it), a piped manifest's temporary copy, the package
#: resource readers (the catalog is read as the file beside its module), the stores and the
#: backend protocol (a run's), the edit inputs' reader (a manifest without edit lines').
UNUSED = (
    "hashlib",
    "tempfile",
    "importlib.resources",
    "batchimg.stores",
    "batchimg.backends.base",
    "batchimg.inputs",
)


#: Nor, for `--help`, these: the catalog, the rules engine and the manifest reader (the command
#: line is built from the run options, which hold a `Defaults` but check it only when asked).
RULES = ("batchimg.catalog", "batchimg.specs", "batchimg.manifest")


def imported(*args: str, env: dict[str, str] | None = None) -> tuple[int, set[str]]:
    """Exit status and every module `python -m batchimg ARGS` imported."""
    base = {k: v for k, v in os.environ.items() if k not in KEY_VARS}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "batchimg", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        cwd=ROOT,
        timeout=120,
    )
    names = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", done.stderr, re.M))
    assert "batchimg.cli" in names, done.stderr[-2000:]  # the listing was read
    return done.returncode, names


def manifest(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "m.jsonl"
    lines = [{"model": "gpt-image-1", "prompt": f"p{i}", "quality": "low"} for i in range(count)]
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


@pytest.mark.parametrize(
    "args",
    [("--help",), ("run", "--help"), ("validate", "MANIFEST"), ("estimate", "MANIFEST")],
    ids=["help", "run-help", "validate", "estimate"],
)
def test_commands_that_send_nothing_import_neither_aiohttp_nor_the_engine(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    path = str(manifest(tmp_path, 3))
    status, names = imported(*(path if a == "MANIFEST" else a for a in args))
    assert status == 0
    assert not [name for name in HEAVY if name in names]
    if args[0] != "estimate":
        assert not [name for name in UNUSED if name in names]


@pytest.mark.parametrize("command", [(), ("run",)], ids=["help", "run-help"])
def test_help_imports_neither_the_catalog_nor_the_rules_engine(command: tuple[str, ...]) -> None:
    status, names = imported(*command, "--help")
    assert status == 0
    assert not [name for name in RULES if name in names]


def test_the_output_format_flag_offers_every_format_batchimg_stores() -> None:
    # Written out in the CLI, so that --help need not import the rules engine for it.
    assert tuple(IMAGE_MIME) == cli.OUTPUT_FORMATS


def test_a_run_with_nothing_to_send_never_loads_aiohttp(tmp_path: Path) -> None:
    out = tmp_path / "out"
    status, names = imported(
        "run", str(manifest(tmp_path, 0)), "--out", str(out), "--quiet",
        "--base-url", "http://127.0.0.1:9/v1",  # closed: nothing may be sent
        env={"OPENAI_API_KEY": "sk-startup-test"},
    )  # fmt: skip
    assert status == 0
    assert "batchimg.engine.run" in names  # it did run
    assert "aiohttp" not in names
    # Nor the batch state (a directory without batches) or the edit inputs (no edit lines).
    assert "batchimg.engine.batchstate" not in names and "batchimg.inputs" not in names
    assert (out / "ledger.jsonl").exists()


def test_the_package_names_resolve_on_first_use() -> None:
    code = (
        "import sys, batchimg\n"
        "assert 'batchimg.api' not in sys.modules\n"
        "from batchimg import RunOptions, run\n"
        "assert 'batchimg.api' in sys.modules and run is batchimg.run\n"
        "assert set(batchimg.__all__) <= set(dir(batchimg))\n"
        "assert batchimg.ledger.read_ledger is batchimg.read_ledger\n"  # submodules resolve
        "assert batchimg.specs.request_shape and '__version__' in dir(batchimg)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "ok", done.stderr
    for name in batchimg.__all__:
        assert getattr(batchimg, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        batchimg.nope  # noqa: B018


async def test_the_session_is_made_for_the_first_request_and_only_inside_async_with() -> None:
    backend = OnlineBackend(ClientConfig(base_url="http://127.0.0.1:9/v1", api_key=Secret("sk-x")))
    with pytest.raises(RuntimeError, match="outside 'async with'"):
        backend.session  # noqa: B018
    async with backend:
        session = backend.session
        assert backend.session is session and not session.closed
    assert session.closed
    with pytest.raises(RuntimeError, match="outside 'async with'"):
        backend.session  # noqa: B018


def test_now_is_the_ledger_time_format_in_utc() -> None:
    before = datetime.now(timezone.utc)
    stamps = [now() for _ in range(2000)]  # across a second's edge, more often than not
    after = datetime.now(timezone.utc)
    for stamp in stamps:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp)
        when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert before - timedelta(milliseconds=1) <= when <= after
    assert stamps == sorted(stamps)


def test_request_shape_keys_requests_by_what_they_produce() -> None:
    one = {"model": "m", "prompt": "a cat", "size": "1024x1024", "n": 2}
    assert request_shape(one) == request_shape({**one, "prompt": "a dog", "user": "x"})
    assert request_shape(one) != request_shape({**one, "n": 1})
    odd = request_shape({"model": "m", "size": [1024, 1024], "quality": {"q": 1}})
    hash(odd)  # lists and objects (which validation refuses later) still make a key
    assert odd[1] == "[1024, 1024]"
    # A value's type is part of the key: n=True is not n=1 (validation decides what is legal).
    assert len({request_shape({"n": v}) for v in (1, 1.0, True)}) == 3


def test_usage_is_read_from_what_the_dict_holds_now() -> None:
    first = {"input_tokens": 10, "output_tokens": 100}
    second = {"input_tokens": 20, "output_tokens": 200}
    a, b, a_again = read_usage(first), read_usage(second), read_usage(first)
    assert isinstance(a, Usage) and isinstance(b, Usage)
    assert (a.output, b.output) == (100, 200) and a_again == a
    assert isinstance(read_usage({"input_tokens": 1}), UsageProblem)
    first["output_tokens"] = 300  # a caller's dict, changed: read again, not remembered
    again = read_usage(first)
    assert isinstance(again, Usage) and again.output == 300
    for n in range(300):  # past the memo's size: still right
        counts = read_usage({"output_tokens": n})
        assert isinstance(counts, Usage) and counts.output == n


def test_rate_limit_headers_keep_their_fields_apart() -> None:
    parsed = RateLimitHeaders.parse(
        {
            "x-ratelimit-limit-requests": "500",
            "x-ratelimit-remaining-requests": "499",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-limit-images": "50",
            "x-ratelimit-remaining-images": "0",
            "x-ratelimit-reset-images": "1m30s",
        }
    )
    assert parsed == RateLimitHeaders(
        limit_requests=500, remaining_requests=499, reset_requests_s=0.12,
        limit_images=50, remaining_images=0, reset_images_s=90.0,
    )  # fmt: skip
    assert RateLimitHeaders.parse({}) is None
    assert parse_go_duration("1m30s") == 90.0 and parse_go_duration("1m30") is None
