"""The ledger: append-only JSONL whose last line per id is the item's state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from batchimg.ledger import LEDGER_NAME, LedgerWriter, completed_ids, read_ledger


def record(item_id: str, status: str = "ok", **extra: Any) -> dict[str, Any]:
    return {"id": item_id, "status": status, **extra}


def write_raw(path: Path, *chunks: bytes) -> Path:
    path.write_bytes(b"".join(chunks))
    return path


def line(rec: dict[str, Any]) -> bytes:
    return orjson.dumps(rec) + b"\n"


def test_ledger_file_name_is_ledger_jsonl() -> None:
    assert LEDGER_NAME == "ledger.jsonl"


def test_read_ledger_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert list(read_ledger(tmp_path / LEDGER_NAME)) == []


def test_read_ledger_returns_whole_records_in_order(tmp_path: Path) -> None:
    recs = [record("a", line=1), record("b", "error", line=2), record("a", line=1, attempts=2)]
    path = write_raw(tmp_path / LEDGER_NAME, *(line(r) for r in recs))
    assert list(read_ledger(path)) == recs


def test_read_ledger_skips_a_torn_last_line(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / LEDGER_NAME, line(record("a")), line(record("b")), b'{"id": "c", "status": "o'
    )
    assert [r["id"] for r in read_ledger(path)] == ["a", "b"]


def test_read_ledger_skips_a_last_line_without_newline_even_if_it_parses(tmp_path: Path) -> None:
    # A crash can stop the write right before the newline; such a line was never committed.
    path = write_raw(tmp_path / LEDGER_NAME, line(record("a")), orjson.dumps(record("b")))
    assert [r["id"] for r in read_ledger(path)] == ["a"]


def test_read_ledger_skips_garbled_lines_and_keeps_reading(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / LEDGER_NAME,
        line(record("a")),
        b"\x00\x00\x00garbage\n",
        b"{not json\n",
        b"\n",
        b"[1, 2]\n",
        b'{"status": "ok"}\n',  # no id
        b'{"id": 5, "status": "ok"}\n',  # id not a string
        line(record("b")),
    )
    assert [r["id"] for r in read_ledger(path)] == ["a", "b"]


def test_completed_ids_uses_the_last_state_of_each_id(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / LEDGER_NAME,
        line(record("ok-then-error", "ok")),
        line(record("error-then-ok", "error")),
        line(record("only-ok", "ok")),
        line(record("only-error", "error")),
        line(record("ok-then-error", "error")),
        line(record("error-then-ok", "ok")),
        line(record("ok-error-ok", "ok")),
        line(record("ok-error-ok", "error")),
        line(record("ok-error-ok", "ok")),
    )
    done = completed_ids(path)
    assert "error-then-ok" in done
    assert "only-ok" in done
    assert "ok-error-ok" in done
    assert "ok-then-error" not in done
    assert "only-error" not in done
    assert len(done) == 3


def test_completed_ids_ignores_a_torn_ok_line(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / LEDGER_NAME, line(record("a", "error")), orjson.dumps(record("a", "ok"))[:-3]
    )
    assert "a" not in completed_ids(path)


def test_completed_ids_of_a_missing_ledger_is_empty(tmp_path: Path) -> None:
    assert len(completed_ids(tmp_path / LEDGER_NAME)) == 0


def test_writer_creates_the_ledger_and_appends_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_NAME
    with LedgerWriter(path) as writer:
        writer.append(record("a", metadata={"k": [1, 2]}))
        writer.append(record("b", "error", error={"code": "x"}))
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    assert [orjson.loads(x) for x in raw.splitlines()] == [
        record("a", metadata={"k": [1, 2]}),
        record("b", "error", error={"code": "x"}),
    ]


def test_writer_appends_after_existing_records(tmp_path: Path) -> None:
    path = write_raw(tmp_path / LEDGER_NAME, line(record("old")))
    with LedgerWriter(path) as writer:
        writer.append(record("new"))
    assert [r["id"] for r in read_ledger(path)] == ["old", "new"]


def test_writer_cuts_a_torn_tail_before_appending(tmp_path: Path) -> None:
    path = write_raw(
        tmp_path / LEDGER_NAME, line(record("a")), line(record("b")), b'{"id": "torn", "sta'
    )
    with LedgerWriter(path) as writer:
        writer.append(record("c"))
    raw = path.read_bytes()
    assert b"torn" not in raw
    # Every line is whole and parseable: the new record did not glue onto the torn one.
    assert [orjson.loads(x)["id"] for x in raw.splitlines()] == ["a", "b", "c"]
    assert [r["id"] for r in read_ledger(path)] == ["a", "b", "c"]


def test_writer_cuts_a_ledger_that_is_only_a_torn_line(tmp_path: Path) -> None:
    path = write_raw(tmp_path / LEDGER_NAME, b'{"id": "torn", "status": "ok"')
    with LedgerWriter(path) as writer:
        writer.append(record("c"))
    assert path.read_bytes() == line(record("c"))


def test_writer_cuts_a_torn_tail_longer_than_its_read_chunk(tmp_path: Path) -> None:
    big = b'{"id": "torn", "prompt": "' + b"x" * 200_000
    path = write_raw(tmp_path / LEDGER_NAME, line(record("a", prompt="y" * 70_000)), big)
    with LedgerWriter(path) as writer:
        writer.append(record("c"))
    assert [r["id"] for r in read_ledger(path)] == ["a", "c"]
    assert len(path.read_bytes().splitlines()) == 2


def test_writer_leaves_an_empty_ledger_alone(tmp_path: Path) -> None:
    path = write_raw(tmp_path / LEDGER_NAME, b"")
    with LedgerWriter(path) as writer:
        writer.append(record("a"))
    assert path.read_bytes() == line(record("a"))


def test_each_append_is_readable_by_another_reader_before_close(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_NAME
    writer = LedgerWriter(path)
    try:
        writer.append(record("a"))
        assert [r["id"] for r in read_ledger(path)] == ["a"]
        writer.append(record("b"))
        with open(path, "rb") as other:
            assert other.read() == line(record("a")) + line(record("b"))
    finally:
        writer.close()


def test_close_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_NAME
    writer = LedgerWriter(path)
    writer.append(record("a"))
    writer.close()
    writer.close()
    assert path.read_bytes() == line(record("a"))
