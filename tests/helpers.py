"""Shared checks for integration tests."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
from PIL import Image

#: Every field of the ledger contract in shared/DESIGN.md.
LEDGER_FIELDS = {
    "id", "line", "status", "endpoint", "model", "prompt", "n", "size", "quality",
    "output_format", "files", "bytes", "sha256", "usage", "cost_usd", "price_table",
    "attempts", "rate_limited", "latency_s", "request_id", "started_at", "finished_at", "metadata",
}  # fmt: skip


def ledger(out: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in (out / "ledger.jsonl").read_bytes().splitlines()]


def last_states(out: Path) -> dict[str, dict[str, Any]]:
    return {record["id"]: record for record in ledger(out)}


def check_ok_record(out: Path, record: dict[str, Any]) -> None:
    """An ok record names real, decodable files of the size and format it claims."""
    expected = LEDGER_FIELDS | ({"inputs", "mask"} if record["endpoint"] == "edits" else set())
    assert set(record) == expected, set(record) ^ expected
    assert record["status"] == "ok"
    assert len(record["files"]) == record["n"] == len(record["bytes"]) == len(record["sha256"])
    expected_format = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[record["output_format"]]
    for rel, size, digest in zip(record["files"], record["bytes"], record["sha256"], strict=True):
        data = (out / rel).read_bytes()
        assert len(data) == size
        assert hashlib.sha256(data).hexdigest() == digest
        with Image.open(out / rel) as im:
            im.load()
            assert im.format == expected_format
            if record["size"] not in (None, "auto"):
                assert f"{im.width}x{im.height}" == record["size"]
