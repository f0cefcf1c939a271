"""Start `batchimg mock` in its own process (so it does not share the client's CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def mock_process(*options: str) -> Iterator[str]:
    """Yield the base URL of a fresh mock server started with `options`."""
    cmd = [sys.executable, "-m", "batchimg", "mock", "--port", "0", "--no-auth", *options]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            yield proc.stdout.readline().strip()
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def mock_stats(base_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base_url}/_mock/stats", timeout=10) as response:
        stats: dict[str, Any] = json.load(response)
    return stats
