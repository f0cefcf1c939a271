"""The survey `validate` and `estimate` read manifests with: it must judge every line as the
loader does (same verdicts, reasons, line numbers and warnings)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchimg import specs
from batchimg.manifest import (
    BadLine,
    Defaults,
    Item,
    Refusal,
    Shape,
    read_manifest,
    survey_manifest,
)
from tests.test_manifest import write_lines

LAMP = Path(__file__).resolve().parent.parent / "jobs" / "edit-inputs" / "lamp.jpg"

#: Lines that exercise every way a line can pass or fail, with warnings along the way.
MIXED: list[dict[str, Any] | str] = [
    "# a comment",
    "",
    {"prompt": "a cat", "model": "gpt-image-1", "quality": "low"},
    {"prompt": "a cat", "model": "gpt-image-1", "quality": "low"},
    {"model": "gpt-image-1", "quality": "low", "prompt": "a cat", "metadata": {"k": [1]}},
    "{not json",
    "[1, 2]",
    {"id": "x1", "prompt": "p"},
    {"id": "x1", "prompt": "the same id"},
    {"id": 7, "prompt": "an int id"},
    {"id": "7", "prompt": "prints as the int id"},
    {"id": True, "prompt": "a bool id"},
    {"id": "  ", "prompt": "a blank id"},
    {"prompt": "an unknown field", "colour": "red"},
    {"prompt": "a mask alone", "mask": "m.png"},
    {"prompt": "a bad endpoint", "endpoint": "variations"},
    {"prompt": ""},
    {"prompt": " \t\u3000"},
    {"prompt": None},
    {"model": "gpt-image-1"},
    {"prompt": 5},
    {"prompt": "x" * 32_001, "model": "gpt-image-1"},
    {"prompt": "model null", "model": None},
    {"prompt": "model int", "model": 5},
    {"prompt": "", "model": 5},
    {"prompt": "n one", "model": "gpt-image-1", "n": 1},
    {"prompt": "n true", "model": "gpt-image-1", "n": True},
    {"prompt": "n one float", "model": "gpt-image-1", "n": 1.0},
    {"prompt": "n two", "model": "gpt-image-1", "n": 2},
    {"prompt": "compression on png", "model": "gpt-image-1", "output_compression": 50},
    {"prompt": "jpeg", "model": "gpt-image-1", "output_compression": 50, "output_format": "jpeg"},
    {"prompt": "transparent jpeg", "model": "gpt-image-1", "background": "transparent",
     "output_format": "jpeg"},
    {"prompt": "an unknown model", "model": "my-model", "size": "1000x1000"},
    {"prompt": "a snapshot", "model": "gpt-image-1-2025-04-15"},
    {"prompt": "custom size", "model": "gpt-image-2", "size": "1536x864"},
    {"prompt": "experimental size", "model": "gpt-image-2", "size": "3840x2160"},
    {"prompt": "bad custom size", "model": "gpt-image-2", "size": "1000x1001"},
    {"prompt": "auto", "model": "gpt-image-2", "size": "auto", "quality": "auto"},
    {"prompt": "the default model"},
    {"prompt": "dall-e", "model": "dall-e-3", "size": "1792x1024", "quality": "hd"},
    {"prompt": "dall-e, n=2", "model": "dall-e-3", "n": 2},
    {"prompt": "gif", "model": "gpt-image-2.6-sunburst", "output_format": "gif",
     "frame_count": 4},
    {"prompt": "an edit", "model": "gpt-image-1", "image": str(LAMP)},
    {"prompt": "two edit inputs", "model": "gpt-image-1", "image": [str(LAMP), str(LAMP)],
     "input_fidelity": "high"},
    {"prompt": "a missing input", "model": "gpt-image-1", "image": "nope.png"},
    {"prompt": "a jpeg mask", "model": "gpt-image-1", "image": str(LAMP), "mask": str(LAMP)},
    {"prompt": "caf\u00e9 \u6f22\u5b57 \U0001f600", "model": "gpt-image-1", "quality": "medium"},
    '{"prompt": "escaped caf\\u00e9", "model": "gpt-image-1", "quality": "medium"}',
    {"prompt": "a user object", "model": "gpt-image-1", "user": {"a": 1}},
    {"prompt": "nested " * 3, "user": "u", "metadata": {"deep": [[[["x"]]]]}},
]  # fmt: skip


def loaded(path: Path, defaults: Defaults | None = None) -> tuple[list[Any], list[str]]:
    """What the loader says of each line, and the warnings it gives."""
    warnings: list[str] = []
    said = []
    for entry in read_manifest(path, defaults, warn=warnings.append):
        if isinstance(entry, BadLine):
            said.append(("bad", entry.line, entry.reason))
        else:
            said.append(("ok", entry.prompt, entry.params, entry.endpoint, entry.image_tokens))
    return said, warnings


def surveyed(path: Path, defaults: Defaults | None = None) -> tuple[list[Any], list[str]]:
    """What the survey says of each line, in the loader's terms, and the warnings it gives."""
    warnings: list[str] = []
    said: list[Any] = []
    for entry in survey_manifest(path, defaults, warn=warnings.append):
        if isinstance(entry, Refusal):
            said.append(("bad", entry.line, entry.reason))
        else:
            shape, prompt, image_tokens = entry
            said.append(("ok", prompt, shape.request(prompt), shape.endpoint, image_tokens))
    return said, warnings


@pytest.mark.parametrize(
    "defaults",
    [None, Defaults(model="gpt-image-1", quality="high", output_compression=40)],
    ids=["no-defaults", "defaults"],
)
def test_survey_judges_every_line_as_the_loader_does(
    tmp_path: Path, defaults: Defaults | None
) -> None:
    path = write_lines(tmp_path / "m.jsonl", MIXED * 2)
    said, warnings = surveyed(path, defaults)
    assert said == loaded(path, defaults)[0]
    assert warnings == loaded(path, defaults)[1]
    assert any(s[0] == "ok" for s in said) and any(s[0] == "bad" for s in said)
    # Params keep the line's order too (requests are sent as the loader builds them).
    assert [list(s[2]) for s in said if s[0] == "ok"] == [
        list(s[2]) for s in loaded(path, defaults)[0] if s[0] == "ok"
    ]


def test_lines_that_differ_only_in_the_json_type_of_a_field_are_judged_apart(
    tmp_path: Path,
) -> None:
    # 1, 1.0 and true are equal in Python: a shape remembered by value would mix them up.
    path = write_lines(
        tmp_path / "m.jsonl",
        [{"prompt": f"p{i}", "model": "gpt-image-1", "n": n} for i, n in
         enumerate([1, True, 1.0, 1, True])],
    )  # fmt: skip
    said, _ = surveyed(path)
    assert [s[0] for s in said] == ["ok", "bad", "bad", "ok", "bad"]
    assert said == loaded(path)[0]


def test_more_shapes_than_are_remembered_are_still_judged_right(tmp_path: Path) -> None:
    lines: list[dict[str, Any] | str] = [
        {"prompt": "p", "model": "gpt-image-1", "user": f"u{i}", "n": 1 + i % 12}
        for i in range(5000)
    ]
    path = write_lines(tmp_path / "m.jsonl", lines + lines[:10])
    assert surveyed(path) == loaded(path)


def test_an_explicit_id_equal_to_an_earlier_derived_id_is_a_duplicate_in_the_survey_too(
    tmp_path: Path,
) -> None:
    # Derived ids are not handed out by a survey, until an explicit id might equal one.
    plain: list[dict[str, Any] | str] = [{"prompt": f"p{i}"} for i in range(3000)]
    first = write_lines(tmp_path / "first.jsonl", plain)
    ids = [e.id for e in read_manifest(first)]
    path = write_lines(
        tmp_path / "m.jsonl",
        [
            *plain,
            {"id": ids[17], "prompt": "the id of line 18"},
            "{broken",
            {"prompt": "p17"},  # a repeat: its derived id is the next occurrence's
            {"id": "i0000000000000000", "prompt": "shaped like a derived id, unused"},
            {"id": ids[17], "prompt": "again"},
        ],
    )
    said, _ = surveyed(path)
    assert said == loaded(path)[0]
    assert [s[1:] for s in said if s[0] == "bad"] == [
        (3001, f"line 3001: duplicate id {ids[17]!r}: an earlier line already uses it"),
        (3002, "line 3002: not valid JSON (unexpected character, expected a string key: "
               "line 1 column 2 (char 1))"),
        (3005, f"line 3005: duplicate id {ids[17]!r}: an earlier line already uses it"),
    ]  # fmt: skip


def test_an_escaped_explicit_id_equal_to_a_derived_one_is_caught(tmp_path: Path) -> None:
    first = write_lines(tmp_path / "first.jsonl", [{"prompt": "a"}])
    (item,) = read_manifest(first)
    escaped = "".join(f"\\u{ord(c):04x}" for c in item.id)
    path = write_lines(tmp_path / "m.jsonl", [{"prompt": "a"}, f'{{"id": "{escaped}", '
                                              '"prompt": "b"}'])  # fmt: skip
    said, _ = surveyed(path)
    assert said == loaded(path)[0]
    assert said[1][0] == "bad" and "duplicate id" in said[1][2]


def test_a_survey_of_a_pipe_keeps_every_id(tmp_path: Path) -> None:
    # A pipe cannot be read again, so the survey hands out every id from the start.
    first = write_lines(tmp_path / "first.jsonl", [{"prompt": "a"}])
    (item,) = read_manifest(first)
    content = orjson.dumps({"prompt": "a"}) + b"\n" + orjson.dumps({"id": item.id, "prompt": "b"})
    fifo = tmp_path / "manifest.fifo"
    os.mkfifo(fifo)

    def writer() -> None:
        with open(fifo, "wb") as fh:
            fh.write(content + b"\n")

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        said = list(survey_manifest(fifo))
    finally:
        thread.join(timeout=5)
    assert isinstance(said[0], tuple) and isinstance(said[0][0], Shape)
    assert isinstance(said[1], Refusal) and "duplicate id" in said[1].reason


def test_a_line_nested_deeper_than_orjson_writes_is_judged_not_a_crash(tmp_path: Path) -> None:
    deep = "[" * 300 + "]" * 300
    path = write_lines(
        tmp_path / "m.jsonl",
        [f'{{"prompt": "deep user", "user": {deep}}}',
         f'{{"prompt": "deep metadata", "metadata": {deep}}}',
         f'{{"prompt": "deep metadata", "metadata": {deep}}}'],
    )  # fmt: skip
    results = list(read_manifest(path))
    assert [type(r) for r in results] == [BadLine, Item, Item]
    assert len({r.id for r in results}) == 3
    assert surveyed(path) == loaded(path)


def test_derived_ids_are_the_ones_earlier_versions_handed_out(tmp_path: Path) -> None:
    # Ledgers of earlier runs are resumed by id: these values must never change.
    path = tmp_path / "m.jsonl"
    path.write_bytes(
        b'{"prompt": "a cat", "model": "gpt-image-1", "quality": "low"}\n'
        b'{"quality": "low", "model": "gpt-image-1", "prompt": "a cat"}\n'
        b'{"prompt": "caf\xc3\xa9", "metadata": {"b": [1, 2.5, null], "a": true}}\n'
        b"not json\n"
        b"not json\n"
        b"[1, 2]\n"
        b'{"id": "", "prompt": "blank id"}\n'
        b'{"prompt": "a cat", "model": "gpt-image-1", "quality": "low"}\n'
    )
    assert [(r.line, r.id) for r in read_manifest(path)] == [
        (1, "i4309a31bf105287f"),
        (2, "i3628aa31d58e425a"),
        (3, "i60bf5695846f9344"),
        (4, "i21f22e0a54d12c16"),
        (5, "i395f6f26c32ba037"),
        (6, "i50e88db0bf731ec6"),
        (7, "i6e941f7d1bb26257"),
        (8, "i3b4b86d8fab9cabf"),
    ]


@pytest.mark.parametrize(
    "prompt", ["a", " a ", "", " ", "\t\n", "\u3000", "\x1c", "\u200b", "x" * 32_000,
               "x" * 32_001, None, 5, ["a"]],
)  # fmt: skip
def test_a_verdict_allows_exactly_the_prompts_check_lets_through(prompt: Any) -> None:
    for params in ({"model": "gpt-image-1"}, {"model": "gpt-image-1", "n": 11}, {"model": 5},
                   {"model": "my-model"}):  # fmt: skip
        verdict = specs.judge_options(params)
        try:
            verdict.check(prompt)
        except specs.ParamError:
            passes = False
        else:
            passes = True
        assert verdict.allows(prompt) is passes
