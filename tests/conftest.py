from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchimg.mock import MockConfig, MockServer

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
