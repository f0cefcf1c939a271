from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from batchimg.mock import MockConfig, MockServer
from tests.helpers import ACCESS_KEY, SECRET, threaded_mock

TEST_KEY = "sk-test-0123456789abcdef"

StartMock = Callable[..., Awaitable[MockServer]]


@pytest.fixture
async def mock_server() -> AsyncIterator[MockServer]:
    """The project's own mock API on a free loopback port, accepting only TEST_KEY."""
    async with MockServer(MockConfig(api_key=TEST_KEY)) as server:
        yield server


@pytest.fixture
def write_manifest(tmp_path: Path) -> Callable[..., Path]:
    """Write JSONL lines (dicts are dumped, strings written as they are) to a manifest file."""

    def write(lines: Iterable[dict[str, Any] | str], name: str = "manifest.jsonl") -> Path:
        path = tmp_path / name
        with open(path, "wb") as fh:
            for line in lines:
                fh.write(line.encode() if isinstance(line, str) else orjson.dumps(line))
                fh.write(b"\n")
        return path

    return write


@pytest.fixture
def slow_server() -> Iterator[MockServer]:
    """A mock in its own thread that answers after 0.3 s: for tests that kill or signal a CLI
    process while requests are in flight."""
    with threaded_mock(MockConfig(api_key=TEST_KEY, latency_s=0.3)) as server:
        yield server


@pytest.fixture
async def start_mock() -> AsyncIterator[StartMock]:
    """Factory: start a MockServer with the given MockConfig fields; all stopped afterwards."""
    servers: list[MockServer] = []

    async def start(**config: Any) -> MockServer:
        server = MockServer(MockConfig(**config))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def mock(start_mock: StartMock) -> MockServer:
    return await start_mock()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server on a free loopback port, for this module."""
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        port = None
        while port is None:
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            found = re.search(r"Running on http://127\.0\.0\.1:(\d+)", log.read_text())
            port = int(found.group(1)) if found else None
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def fs(s3_endpoint: str) -> Any:
    """An S3 filesystem on the module's moto server, to look into buckets as a user would."""
    s3fs = pytest.importorskip("s3fs")
    return s3fs.S3FileSystem(
        key=ACCESS_KEY,
        secret=SECRET,
        endpoint_url=s3_endpoint,
        skip_instance_cache=True,
        use_listings_cache=False,
    )


@pytest.fixture
def bucket(fs: Any) -> str:
    """A fresh, empty bucket on the module's moto server."""
    name = f"bk-{uuid.uuid4().hex[:10]}"
    fs.mkdir(name)
    return name
