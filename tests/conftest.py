from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchimg.mock import MockConfig, MockServer
from tests.helpers import threaded_mock

TEST_KEY = "sk-test-0123456789abcdef"


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
