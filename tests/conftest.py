from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from batchimg.mock import MockConfig, MockServer
from tests.helpers import threaded_mock

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
