"""The survey `validate` and `estimate` read manifests with: it must judge every line as the
loader does (same verdicts, reasons, line numbers and warnings), and the estimate built on it
must add up to what pricing each line on its own gives, to the last bit."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchimg import specs
from batchimg.catalog import Catalog
from batchimg.estimate import EstimateGroup, ManifestEstimate, estimate_manifest
from batchimg.manifest import (
    BadLine,
    Defaults,
    Refusal,
    Shape,
    read_manifest,
    survey_manifest,
)
from batchimg.pricing import PriceTable
from batchimg.tokens import TokenBook, request_group
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
    # Deep metadata is refused too: the ledger line of its item could not be written (orjson
    # writes 254 levels at most), and a run stopped on it with a traceback.
    assert [type(r) for r in results] == [BadLine, BadLine, BadLine]
    assert all("nested too deeply" in r.reason and r.metadata is None for r in results[1:])
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


# --- the estimate ---------------------------------------------------------------------------


def per_line_estimate(
    path: Path, defaults: Defaults | None = None, book: TokenBook | None = None
) -> ManifestEstimate:
    """The estimate as it was computed before lines were priced once per kind: every line
    through the loader and the price table, and every sum added in line order."""
    catalog = Catalog.default()
    table = PriceTable(catalog)
    book = book or TokenBook()
    result = ManifestEstimate(price_table=table.name, learned_groups=len(book))
    for entry in read_manifest(path, defaults, catalog=catalog, warn=result.warnings.append):
        if isinstance(entry, BadLine):
            result.bad_lines += 1
            continue
        params = entry.params
        key = request_group(params, catalog)._replace(model=entry.model)
        estimate = table.estimate(params, entry.image_tokens, book)
        group = result.groups.get(key)
        if group is None:
            batchable = "batch" in catalog.spec(entry.model).endpoints
            group = result.groups[key] = EstimateGroup(
                *key,
                basis=estimate.basis,
                batchable=batchable,
                batch_multiplier=catalog.batch_multiplier,
            )
        group.samples = max(group.samples, estimate.samples)
        group.items += 1
        group.images += estimate.images
        group.input_tokens += estimate.input_tokens
        result.items += 1
        result.images += estimate.images
        result.input_tokens += estimate.input_tokens
        if table.prices(entry.model) is None:
            group.unpriced = True
            group.cost_usd = None
            result.unpriced_items += 1
            continue
        if estimate.basis == "unknown":
            bound = table.worst_case_usd(params, entry.image_tokens)
            group.cost_usd = None
            group.max_usd = (
                None if bound is None or group.max_usd is None else group.max_usd + bound
            )
            result.unknown_max_usd = (
                None
                if bound is None or result.unknown_max_usd is None
                else result.unknown_max_usd + bound
            )
            result.unknown_items += 1
            continue
        low, high = estimate.output_range or (estimate.output_tokens, estimate.output_tokens)
        cost_low, cost_high = estimate.cost_range_usd or (estimate.cost_usd, estimate.cost_usd)
        group.output_tokens += estimate.output_tokens
        group.output_low += low
        group.output_high += high
        result.output_tokens += estimate.output_tokens
        if estimate.cost_usd is None or cost_low is None or cost_high is None:
            group.cost_usd = None
            result.unpriced_items += 1
            continue
        if group.cost_usd is not None:
            group.cost_usd += estimate.cost_usd
        group.cost_low_usd += cost_low
        group.cost_high_usd += cost_high
        result.total_cost_usd += estimate.cost_usd
        if group.batchable:
            result.batch_cost_usd += estimate.cost_usd * catalog.batch_multiplier
        else:
            result.batch_cost_usd += estimate.cost_usd
            result.not_batchable_items += 1
        result.cost_low_usd += cost_low
        result.cost_high_usd += cost_high
    return result


def learned_book(tmp_path: Path) -> Path:
    """A ledger to learn gpt-image-2's counts from, for two of its groups."""
    ledger = tmp_path / "earlier" / "ledger.jsonl"
    ledger.parent.mkdir()
    records = [
        {"id": f"r{i}", "status": "ok", "model": "gpt-image-2", "n": 1, "size": size,
         "quality": quality, "output_format": "png", "files": [f"r{i}.png"],
         "usage": {"input_tokens": 10, "output_tokens": out, "total_tokens": 10 + out,
                   "input_tokens_details": {"text_tokens": 10, "image_tokens": 0}}}
        for i, (size, quality, out) in enumerate(
            [("1024x1024", "low", 300), ("1024x1024", "low", 350), ("1024x1536", "medium", 1511)]
        )
    ]  # fmt: skip
    ledger.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return ledger.parent


def varied_lines(count: int) -> list[dict[str, Any] | str]:
    """Many lines of many kinds: published, learned, unknown and unpriced groups, models the
    Batch API refuses, prompts of many lengths, bad lines among them."""
    models = ["gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "dall-e-3", "gpt-image-2",
              "my-model"]  # fmt: skip
    sizes = ["1024x1024", "1536x1024", "1024x1536", "auto"]
    qualities = ["low", "medium", "high", "auto"]
    lines: list[dict[str, Any] | str] = []
    for i in range(count):
        model = models[i % len(models)]
        line: dict[str, Any] = {
            "model": model,
            "prompt": "a lighthouse " + "at dusk " * (i % 23) + ("caf\u00e9" if i % 5 else ""),
            "size": sizes[i // 6 % 4],
            "quality": qualities[i // 24 % 4],
        }
        if model == "dall-e-3":
            line.update(size="1024x1024", quality="hd" if i % 2 else "standard")
        if i % 7 == 0 and model != "dall-e-3":
            line["n"] = 2
        if i % 101 == 0:
            line["quality"] = "bogus"
        lines.append(line)
    return lines


@pytest.mark.parametrize("learned", [False, True], ids=["no-ledger", "ledger"])
def test_the_estimate_adds_up_to_pricing_every_line_on_its_own(
    tmp_path: Path, learned: bool
) -> None:
    path = write_lines(tmp_path / "m.jsonl", varied_lines(3000))
    ledgers = [learned_book(tmp_path)] if learned else []
    book = TokenBook.from_ledgers([p / "ledger.jsonl" for p in ledgers], Catalog.default())
    expected = per_line_estimate(path, book=book)
    got = estimate_manifest(path, ledgers=ledgers)
    got_json, expected_json = got.as_json(), expected.as_json()
    got_json.pop("learned_from")
    expected_json.pop("learned_from")
    assert got_json == expected_json
    # Not just rounded alike: every sum the same to the last bit.
    assert got.groups == expected.groups
    for name in ("total_cost_usd", "batch_cost_usd", "cost_low_usd", "cost_high_usd",
                 "unknown_max_usd"):  # fmt: skip
        assert getattr(got, name) == getattr(expected, name), name
    kinds = {g.basis for g in got.groups.values()}
    assert kinds == ({"published", "unknown", "learned"} if learned else {"published", "unknown"})
    assert got.bad_lines and got.unpriced_items and got.not_batchable_items


def test_the_estimate_is_exact_past_the_lines_it_holds_at_once(tmp_path: Path) -> None:
    # Over 65,536 kinds of line (each with its own `user`): counts are folded in as it goes.
    lines: list[dict[str, Any] | str] = [
        {"model": "gpt-image-1", "prompt": "p" * (1 + i % 40), "quality": "low", "user": f"u{i}"}
        for i in range(66_000)
    ]
    path = write_lines(tmp_path / "m.jsonl", lines)
    assert estimate_manifest(path) == per_line_estimate(path)


def test_a_refusal_names_the_value_of_its_own_line(tmp_path: Path) -> None:
    # -0.0 and 0.0 are equal and hash alike; a cached verdict must still quote each line's own.
    path = write_lines(
        tmp_path / "m.jsonl",
        ['{"prompt": "a", "n": -0.0}', '{"prompt": "b", "n": 0.0}', '{"prompt": "c", "n": -0.0}'],
    )
    reasons = [r.reason for r in read_manifest(path)]
    assert ["-0.0" in reasons[0], "-0.0" in reasons[1], "-0.0" in reasons[2]] == [True, False, True]
    assert "0.0" in reasons[1]
