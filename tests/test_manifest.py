"""The manifest loader: line-numbered validation, defaults, stable ids, safe file stems.

Limits and allowed values come from shared/API_NOTES.md (request-field table).
"""

from __future__ import annotations

import os
import re
import threading
import tracemalloc
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest

from batchimg import specs
from batchimg.catalog import Catalog
from batchimg.manifest import (
    MAX_FILE_STEM,
    BadLine,
    Defaults,
    Item,
    read_manifest,
    safe_file_stem,
)


def write_lines(path: Path, lines: Iterable[dict[str, Any] | str]) -> Path:
    """Write JSONL: dicts are dumped, strings are written as they are."""
    with open(path, "wb") as fh:
        for line in lines:
            fh.write(line.encode() if isinstance(line, str) else orjson.dumps(line))
            fh.write(b"\n")
    return path


def read_all(
    path: Path, lines: Iterable[dict[str, Any] | str], defaults: Defaults | None = None
) -> list[Item | BadLine]:
    return list(read_manifest(write_lines(path, lines), defaults))


def only_item(results: list[Item | BadLine]) -> Item:
    assert len(results) == 1, results
    (result,) = results
    assert isinstance(result, Item), result
    return result


# --- skipping and line numbers -------------------------------------------------------------


def test_blank_and_comment_lines_are_skipped_but_counted_in_line_numbers(tmp_path: Path) -> None:
    results = read_all(
        tmp_path / "m.jsonl",
        [
            "# a comment",
            "",
            {"prompt": "first"},
            "   ",
            "  # indented comment",
            {"prompt": "second"},
            "\t",
        ],
    )
    assert [type(r) for r in results] == [Item, Item]
    assert [r.line for r in results] == [3, 6]
    assert [r.prompt for r in results if isinstance(r, Item)] == ["first", "second"]


def test_a_file_of_only_comments_and_blanks_yields_nothing(tmp_path: Path) -> None:
    assert read_all(tmp_path / "m.jsonl", ["# x", "", "#", "  "]) == []


def test_crlf_line_endings_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"prompt": "a"}\r\n\r\n{"prompt": "b"}\r\n')
    results = list(read_manifest(path))
    assert [(type(r), r.line) for r in results] == [(Item, 1), (Item, 3)]


def test_unreadable_manifest_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        list(read_manifest(tmp_path / "missing.jsonl"))


# --- validation: every rule is a BadLine naming its line, and the run goes on ---------------

GPT = "gpt-image-1"
DEFAULT_MODEL = Catalog.default().default_model

BAD_LINES: list[tuple[str, str, str]] = [
    # (test id, raw line, fragment the reason must contain)
    ("invalid-json", '{"prompt": "a",', "not valid JSON"),
    ("truncated-json", '{"prompt": "a"', "not valid JSON"),
    ("json-array", '["a", "b"]', "expected a JSON object, got list"),
    ("json-string", '"just a prompt"', "expected a JSON object, got str"),
    ("json-number", "42", "expected a JSON object, got int"),
    ("missing-prompt", '{"n": 1}', "Missing required parameter: 'prompt'"),
    ("null-prompt", '{"prompt": null}', "Missing required parameter: 'prompt'"),
    ("non-string-prompt", '{"prompt": 5}', "'prompt' must be a string"),
    ("list-prompt", '{"prompt": ["a"]}', "'prompt' must be a string"),
    ("empty-prompt", '{"prompt": ""}', "'prompt' must not be empty"),
    ("blank-prompt", '{"prompt": "   "}', "'prompt' must not be empty"),
    ("gpt-prompt-too-long", orjson.dumps({"prompt": "x" * 32001}).decode(), "32000"),
    (
        "dalle3-prompt-too-long",
        orjson.dumps({"prompt": "x" * 4001, "model": "dall-e-3"}).decode(),
        "4000",
    ),
    (
        "dalle2-prompt-too-long",
        orjson.dumps({"prompt": "x" * 1001, "model": "dall-e-2"}).decode(),
        "1000",
    ),
    ("n-zero", '{"prompt": "a", "n": 0}', "'n'"),
    ("n-eleven", '{"prompt": "a", "n": 11}', "'n'"),
    ("n-negative", '{"prompt": "a", "n": -1}', "'n'"),
    ("n-string", '{"prompt": "a", "n": "2"}', "'n'"),
    ("n-float", '{"prompt": "a", "n": 1.5}', "'n'"),
    ("n-bool", '{"prompt": "a", "n": true}', "'n'"),
    ("dalle3-n-2", '{"prompt": "a", "model": "dall-e-3", "n": 2}', "dall-e-3 only supports n=1"),
    ("gpt-bad-size", '{"prompt": "a", "size": "512x512"}', "'size'"),
    ("dalle3-bad-size", '{"prompt": "a", "model": "dall-e-3", "size": "256x256"}', "'size'"),
    ("dalle2-bad-size", '{"prompt": "a", "model": "dall-e-2", "size": "1792x1024"}', "'size'"),
    ("gpt-bad-quality", '{"prompt": "a", "quality": "hd"}', "'quality'"),
    ("dalle3-bad-quality", '{"prompt": "a", "model": "dall-e-3", "quality": "high"}', "'quality'"),
    ("bad-output-format", '{"prompt": "a", "output_format": "bmp"}', "'output_format'"),
    (
        "gif-on-gpt-image-2",
        '{"prompt": "a", "model": "gpt-image-2", "output_format": "gif"}',
        "'output_format'",
    ),
    ("bad-background", '{"prompt": "a", "background": "black"}', "'background'"),
    ("bad-moderation", '{"prompt": "a", "moderation": "high"}', "'moderation'"),
    ("compression-negative", '{"prompt": "a", "output_compression": -1}', "'output_compression'"),
    ("compression-101", '{"prompt": "a", "output_compression": 101}', "'output_compression'"),
    ("compression-bool", '{"prompt": "a", "output_compression": true}', "'output_compression'"),
    (
        "transparent-jpeg",
        '{"prompt": "a", "background": "transparent", "output_format": "jpeg"}',
        "Transparent background needs output_format png or webp",
    ),
    (
        "response-format-on-gpt",
        '{"prompt": "a", "response_format": "b64_json"}',
        "Unknown parameter: 'response_format'",
    ),
    ("style-on-gpt", '{"prompt": "a", "style": "vivid"}', "Unknown parameter: 'style'"),
    ("unknown-key", '{"prompt": "a", "colour": "red"}', "'colour'"),
    ("edit-image-missing", '{"prompt": "a", "image": "in.png"}', "'in.png' not found"),
    ("edit-mask-alone", '{"prompt": "a", "mask": "mask.png"}', "'mask' needs an 'image'"),
    ("edit-no-image", '{"prompt": "a", "endpoint": "edits"}', "has no 'image'"),
    ("edit-bad-endpoint", '{"prompt": "a", "endpoint": "variations"}', "'endpoint' must be"),
    ("edit-image-type", '{"prompt": "a", "image": 7}', "'image' must be a path"),
    ("edit-image-empty", '{"prompt": "a", "image": []}', "'image' must be a path"),
    ("id-float", '{"id": 1.5, "prompt": "a"}', "'id' must be a string or an integer"),
    ("id-bool", '{"id": true, "prompt": "a"}', "'id' must be a string or an integer"),
    ("id-list", '{"id": ["a"], "prompt": "a"}', "'id' must be a string or an integer"),
    ("id-object", '{"id": {"k": 1}, "prompt": "a"}', "'id' must be a string or an integer"),
    ("id-empty", '{"id": "", "prompt": "a"}', "'id' must not be empty"),
]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [(raw, frag) for _, raw, frag in BAD_LINES],
    ids=[i for i, _, _ in BAD_LINES],
)
def test_bad_line_reason_names_its_physical_line_and_the_problem(
    tmp_path: Path, raw: str, fragment: str
) -> None:
    results = read_all(tmp_path / "m.jsonl", ["# header", "", raw, {"prompt": "after"}])
    assert len(results) == 2, results
    bad, good = results
    assert isinstance(bad, BadLine), bad
    assert bad.line == 3
    assert bad.reason.startswith("line 3: "), bad.reason
    assert fragment in bad.reason, bad.reason
    assert bad.id  # a bad line still gets an id, so the ledger can record it
    # The run goes on: the good line after it is still an Item with its own line number.
    assert isinstance(good, Item)
    assert (good.line, good.prompt) == (4, "after")


def test_unknown_key_reason_points_to_metadata(tmp_path: Path) -> None:
    results = read_all(tmp_path / "m.jsonl", [{"prompt": "a", "tags": ["x"], "author": "me"}])
    (bad,) = results
    assert isinstance(bad, BadLine)
    assert "'author'" in bad.reason and "'tags'" in bad.reason
    assert "metadata" in bad.reason


def test_metadata_is_carried_untouched_and_not_sent(tmp_path: Path) -> None:
    meta = {"tags": ["a", "b"], "nested": {"x": 1}, "score": 0.5}
    item = only_item(read_all(tmp_path / "m.jsonl", [{"prompt": "a", "metadata": meta}]))
    assert item.metadata == meta
    assert "metadata" not in item.params


def test_bad_line_keeps_prompt_and_metadata_for_the_ledger(tmp_path: Path) -> None:
    (bad,) = read_all(
        tmp_path / "m.jsonl", [{"prompt": "a cat", "size": "9x9", "metadata": {"k": 1}}]
    )
    assert isinstance(bad, BadLine)
    assert bad.prompt == "a cat"
    assert bad.metadata == {"k": 1}


@pytest.mark.parametrize(
    ("model", "limit"),
    [("gpt-image-1", 32000), ("gpt-image-1-mini", 32000), ("dall-e-3", 4000), ("dall-e-2", 1000)],
)
def test_prompt_of_exactly_the_limit_is_accepted(tmp_path: Path, model: str, limit: int) -> None:
    item = only_item(read_all(tmp_path / "m.jsonl", [{"prompt": "x" * limit, "model": model}]))
    assert len(item.prompt) == limit


@pytest.mark.parametrize("n", [1, 10])
def test_n_at_the_bounds_is_accepted(tmp_path: Path, n: int) -> None:
    assert only_item(read_all(tmp_path / "m.jsonl", [{"prompt": "a", "n": n}])).n == n


@pytest.mark.parametrize("compression", [0, 100])
def test_output_compression_at_the_bounds_is_accepted(tmp_path: Path, compression: int) -> None:
    line = {"prompt": "a", "output_format": "jpeg", "output_compression": compression}
    item = only_item(read_all(tmp_path / "m.jsonl", [line]))
    assert item.params["output_compression"] == compression


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_transparent_background_with_png_or_webp_is_accepted(tmp_path: Path, fmt: str) -> None:
    line = {"prompt": "a", "background": "transparent", "output_format": fmt}
    assert only_item(read_all(tmp_path / "m.jsonl", [line])).params["output_format"] == fmt


def test_dalle_only_fields_are_accepted_on_dalle_lines(tmp_path: Path) -> None:
    results = read_all(
        tmp_path / "m.jsonl",
        [
            {"prompt": "a", "model": "dall-e-3", "style": "natural", "quality": "hd"},
            {"prompt": "a", "model": "dall-e-2", "response_format": "b64_json", "size": "256x256"},
        ],
    )
    assert [type(r) for r in results] == [Item, Item]


def test_duplicate_explicit_id_fails_the_later_line_and_keeps_the_first(tmp_path: Path) -> None:
    results = read_all(
        tmp_path / "m.jsonl",
        [
            {"id": "cat", "prompt": "first"},
            {"id": "dog", "prompt": "other"},
            {"id": "cat", "prompt": "second"},
            {"id": "bird", "prompt": "after"},
        ],
    )
    first, other, dup, after = results
    assert isinstance(first, Item) and (first.id, first.prompt) == ("cat", "first")
    assert isinstance(other, Item)
    assert isinstance(dup, BadLine)
    assert dup.reason.startswith("line 3: ")
    assert "duplicate id 'cat'" in dup.reason
    # The bad line does not take the first line's id, or the ledger would confuse the two.
    assert dup.id != "cat"
    assert isinstance(after, Item) and after.id == "bird"


def test_int_and_string_ids_that_print_alike_are_duplicates(tmp_path: Path) -> None:
    first, second = read_all(
        tmp_path / "m.jsonl", [{"id": 7, "prompt": "a"}, '{"id": "7", "prompt": "b"}']
    )
    assert isinstance(first, Item) and first.id == "7"
    assert isinstance(second, BadLine) and "duplicate id" in second.reason


# --- defaults ---------------------------------------------------------------------------------


def test_model_defaults_to_the_catalogs_default_model(tmp_path: Path) -> None:
    item = only_item(read_all(tmp_path / "m.jsonl", [{"prompt": "a"}]))
    assert item.model == Catalog.default().default_model == "gpt-image-2.6-sunburst"
    assert item.params["model"] == "gpt-image-2.6-sunburst"


def test_defaults_fill_missing_fields_and_line_values_win(tmp_path: Path) -> None:
    defaults = Defaults(size="1536x1024", quality="low", n=2, output_format="webp")
    missing, overriding = read_all(
        tmp_path / "m.jsonl",
        [
            {"prompt": "a"},
            {"prompt": "b", "size": "1024x1024", "quality": "high", "n": 1, "output_format": "png"},
        ],
        defaults,
    )
    assert isinstance(missing, Item) and isinstance(overriding, Item)
    assert missing.params == {
        "prompt": "a",
        "model": DEFAULT_MODEL,
        "size": "1536x1024",
        "quality": "low",
        "n": 2,
        "output_format": "webp",
    }
    assert overriding.params == {
        "prompt": "b",
        "model": DEFAULT_MODEL,
        "size": "1024x1024",
        "quality": "high",
        "n": 1,
        "output_format": "png",
    }


def test_line_model_wins_over_default_model(tmp_path: Path) -> None:
    defaults = Defaults(model="gpt-image-1-mini")
    a, b = read_all(
        tmp_path / "m.jsonl", [{"prompt": "a"}, {"prompt": "b", "model": "gpt-image-1.5"}], defaults
    )
    assert isinstance(a, Item) and isinstance(b, Item)
    assert (a.model, b.model) == ("gpt-image-1-mini", "gpt-image-1.5")


def test_gpt_only_defaults_do_not_apply_to_dalle3_lines(tmp_path: Path) -> None:
    defaults = Defaults(
        output_format="webp", output_compression=80, background="opaque", moderation="low"
    )
    gpt, dalle = read_all(
        tmp_path / "m.jsonl", [{"prompt": "a"}, {"prompt": "b", "model": "dall-e-3"}], defaults
    )
    assert isinstance(gpt, Item)
    assert isinstance(dalle, Item), dalle
    assert gpt.params["output_format"] == "webp"
    assert gpt.params["output_compression"] == 80
    assert gpt.params["background"] == "opaque"
    assert gpt.params["moderation"] == "low"
    for field in ("output_format", "output_compression", "background", "moderation"):
        assert field not in dalle.params


def test_size_quality_and_n_defaults_fill_only_lines_whose_model_takes_them(
    tmp_path: Path,
) -> None:
    lines = [
        {"prompt": "a"},
        {"prompt": "b", "model": "dall-e-3"},
        {"prompt": "c", "model": "dall-e-2"},
    ]
    gpt, dalle3, dalle2 = read_all(
        tmp_path / "m.jsonl", lines, Defaults(size="1536x1024", quality="high", n=2)
    )
    assert isinstance(gpt, Item) and isinstance(dalle3, Item) and isinstance(dalle2, Item)
    assert (gpt.params["size"], gpt.params["quality"], gpt.params["n"]) == ("1536x1024", "high", 2)
    assert not {"size", "quality", "n"} & set(dalle3.params)  # the API's defaults stand
    assert dalle2.params["n"] == 2 and not {"size", "quality"} & set(dalle2.params)

    square, hd = read_all(
        tmp_path / "m2.jsonl", lines[:2], Defaults(size="1024x1024", quality="hd")
    )
    assert isinstance(square, Item) and isinstance(hd, Item)
    assert square.params["size"] == hd.params["size"] == "1024x1024"  # every model takes it
    assert hd.params["quality"] == "hd" and "quality" not in square.params


def test_a_default_that_makes_a_line_invalid_gives_a_bad_line(tmp_path: Path) -> None:
    (bad,) = read_all(
        tmp_path / "m.jsonl",
        [{"prompt": "a", "output_format": "jpeg"}],
        Defaults(background="transparent"),
    )
    assert isinstance(bad, BadLine)
    assert "Transparent background" in bad.reason


def test_defaults_do_not_change_derived_ids(tmp_path: Path) -> None:
    (plain,) = read_all(tmp_path / "a.jsonl", [{"prompt": "a"}])
    (with_defaults,) = read_all(tmp_path / "b.jsonl", [{"prompt": "a"}], Defaults(quality="low"))
    assert plain.id == with_defaults.id


def test_defaults_check_accepts_legal_defaults() -> None:
    Defaults().check()
    Defaults(size="1024x1536", quality="high", n=4, output_format="jpeg").check()
    # GPT-only defaults are skipped for a DALL·E default model, so they cannot make it illegal.
    Defaults(model="dall-e-3", output_format="webp").check()


@pytest.mark.parametrize(
    ("defaults", "param"),
    [
        (Defaults(size="999x999"), "size"),
        (Defaults(quality="ultra"), "quality"),
        (Defaults(n=11), "n"),
        (Defaults(model="dall-e-3", n=2), "n"),
        (Defaults(output_format="bmp"), "output_format"),
        (Defaults(model="gpt-image-2", output_format="gif"), "output_format"),
        (Defaults(model="gpt-image-2", quality="xhigh"), "quality"),
        (Defaults(frame_count=17), "frame_count"),
        (Defaults(output_compression=101), "output_compression"),
        (Defaults(background="transparent", output_format="jpeg"), "background"),
        (Defaults(moderation="none"), "moderation"),
        (Defaults(model=""), "model"),
    ],
)
def test_defaults_check_raises_param_error_for_an_illegal_default(
    defaults: Defaults, param: str
) -> None:
    with pytest.raises(specs.ParamError) as info:
        defaults.check()
    assert info.value.param == param


# --- ids --------------------------------------------------------------------------------------


def test_explicit_id_is_used_as_is_and_int_ids_become_strings(tmp_path: Path) -> None:
    a, b, c = read_all(
        tmp_path / "m.jsonl",
        [
            {"id": "hero shot #1", "prompt": "a"},
            {"id": 42, "prompt": "b"},
            {"id": 0, "prompt": "c"},
        ],
    )
    assert [r.id for r in (a, b, c)] == ["hero shot #1", "42", "0"]
    assert all(isinstance(r, Item) for r in (a, b, c))


def test_derived_ids_are_stable_across_reads(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "m.jsonl",
        [{"prompt": "a"}, {"prompt": "b", "n": 2}, "not json", {"prompt": "a"}],
    )
    first = [r.id for r in read_manifest(path)]
    second = [r.id for r in read_manifest(path)]
    assert first == second
    assert len(set(first)) == 4


def test_derived_id_does_not_depend_on_key_order_or_whitespace(tmp_path: Path) -> None:
    (a,) = read_all(tmp_path / "a.jsonl", ['{"prompt":"a","n":2}'])
    (b,) = read_all(tmp_path / "b.jsonl", ['{"n":2,"prompt":"a"}'])
    (c,) = read_all(tmp_path / "c.jsonl", ['{ "n" : 2 ,  "prompt" : "a" }'])
    assert a.id == b.id == c.id


def test_derived_id_does_not_depend_on_nested_metadata_key_order(tmp_path: Path) -> None:
    (a,) = read_all(tmp_path / "a.jsonl", ['{"prompt":"a","metadata":{"x":1,"y":2}}'])
    (b,) = read_all(tmp_path / "b.jsonl", ['{"metadata":{"y":2,"x":1},"prompt":"a"}'])
    assert a.id == b.id


def test_derived_id_changes_with_content(tmp_path: Path) -> None:
    a, b, c = read_all(
        tmp_path / "m.jsonl",
        [{"prompt": "a"}, {"prompt": "a", "n": 2}, {"prompt": "a", "metadata": {"v": 2}}],
    )
    assert len({a.id, b.id, c.id}) == 3


def test_derived_id_is_not_changed_by_inserting_other_lines_before(tmp_path: Path) -> None:
    target = {"prompt": "the one", "size": "1024x1536"}
    (before,) = read_all(tmp_path / "a.jsonl", [target])
    results = read_all(
        tmp_path / "b.jsonl",
        [
            "# new comment",
            "",
            {"prompt": "inserted"},
            "{broken",
            {"id": "x", "prompt": "y"},
            target,
        ],
    )
    after = results[-1]
    assert isinstance(after, Item) and after.line == 6
    assert after.id == before.id


def test_identical_lines_get_different_ids_stable_by_occurrence(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "m.jsonl", [{"prompt": "same"}, {"prompt": "same"}, {"prompt": "same"}]
    )
    ids = [r.id for r in read_manifest(path)]
    assert len(set(ids)) == 3
    assert ids == [r.id for r in read_manifest(path)]
    # The first occurrence keeps the id it has when alone.
    (alone,) = read_all(tmp_path / "alone.jsonl", [{"prompt": "same"}])
    assert ids[0] == alone.id


def test_identical_bad_lines_get_different_ids(tmp_path: Path) -> None:
    ids = [r.id for r in read_all(tmp_path / "m.jsonl", ["{oops", "{oops", "[1]", "[1]"])]
    assert len(set(ids)) == 4


def test_item_file_stem_is_the_safe_stem_of_its_id(tmp_path: Path) -> None:
    item = only_item(read_all(tmp_path / "m.jsonl", [{"id": "a/b", "prompt": "x"}]))
    assert item.id == "a/b"
    assert item.file_stem == safe_file_stem("a/b")
    assert "/" not in item.file_stem


# --- safe_file_stem ---------------------------------------------------------------------------

_SAFE = re.compile(r"[A-Za-z0-9._-]+")


def assert_safe(stem: str) -> None:
    assert _SAFE.fullmatch(stem), stem
    assert not stem.startswith(".")
    assert ".." not in stem
    assert 0 < len(stem) <= MAX_FILE_STEM


@pytest.mark.parametrize(
    "item_id", ["cat-01", "a.b_c-d9", "i0123456789abcdef", "x" * MAX_FILE_STEM]
)
def test_safe_id_is_its_own_stem(item_id: str) -> None:
    assert safe_file_stem(item_id) == item_id


def test_distinct_ids_get_distinct_files_also_where_case_is_ignored() -> None:
    """`Cat` and `cat` share a file on a case-insensitive filesystem (macOS, Windows) unless
    their stems differ in more than case; an id shaped like a changed stem must not take the
    stem another id was changed to."""
    changed = safe_file_stem("a/b")
    ids = ["Cat", "cat", "CAT", "a/b", "a_b", changed, changed.upper(), "Mug-Studio"]
    stems = [safe_file_stem(i).lower() for i in ids]
    assert len(set(stems)) == len(ids), dict(zip(ids, stems, strict=True))
    for stem in stems:
        assert_safe(stem)


@pytest.mark.parametrize(
    "item_id",
    [
        "../../etc/passwd",
        "..",
        ".",
        ".hidden",
        "a/b",
        "a\\b",
        "/abs/path",
        "C:\\x",
        "nul\x00byte",
        "line\nbreak",
        "tab\there\x7f\x1b[31m",
        "a..b",
        "",
        "猫の写真",
        "space in id",
    ],
)
def test_unsafe_id_maps_to_a_safe_stem(item_id: str) -> None:
    stem = safe_file_stem(item_id)
    assert_safe(stem)
    assert stem != item_id


def test_path_traversal_id_cannot_leave_the_directory(tmp_path: Path) -> None:
    stem = safe_file_stem("../../etc/passwd")
    target = (tmp_path / f"{stem}-0.png").resolve()
    assert target.parent == tmp_path.resolve()
    assert os.sep not in stem


def test_very_long_id_is_capped_at_80_chars() -> None:
    stem = safe_file_stem("y" * 5000)
    assert_safe(stem)
    assert len(stem) == MAX_FILE_STEM == 80


def test_long_ids_sharing_a_prefix_get_different_stems() -> None:
    a = safe_file_stem("p" * 200 + "a")
    b = safe_file_stem("p" * 200 + "b")
    assert a != b
    assert len(a) <= 80 and len(b) <= 80


def test_ids_that_differ_only_in_unsafe_chars_get_different_stems() -> None:
    ids = ["a/b", "a:b", "a\\b", "a b", "a\x00b", "a_b", "a__b", "a/ b", "a?b"]
    stems = [safe_file_stem(i) for i in ids]
    assert len(set(stems)) == len(ids), dict(zip(ids, stems, strict=True))
    for stem in stems:
        assert_safe(stem)


def test_safe_file_stem_is_deterministic() -> None:
    assert safe_file_stem("../x/y") == safe_file_stem("../x/y")


# --- streaming --------------------------------------------------------------------------------


def test_manifest_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    # Few long lines rather than 200k short ones: the loader spends ~30 µs a line (several
    # times that under tracemalloc), so this keeps the test fast while the file (~33 MB) is
    # still eight times what a streaming reader may hold.
    lines = 3_000
    padding = b"p" * 11_000
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as fh:
        fh.writelines(
            b'{"prompt":"%d %s","metadata":{"row":%d}}\n' % (i, padding, i) for i in range(lines)
        )
    file_size = path.stat().st_size
    assert file_size > 30_000_000

    tracemalloc.start()
    try:
        count = 0
        for result in read_manifest(path):
            count += isinstance(result, Item)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == lines
    # Streaming holds one line at a time plus the id set (8 bytes a slot); holding the lines or
    # the items would take at least the file's size.
    assert peak < 4_000_000, f"peak {peak / 1e6:.1f} MB for a {file_size / 1e6:.0f} MB manifest"


def test_first_item_arrives_before_the_rest_of_the_manifest_is_written(tmp_path: Path) -> None:
    fifo = tmp_path / "manifest.fifo"
    os.mkfifo(fifo)
    first_consumed = threading.Event()
    rest_written = threading.Event()

    def writer() -> None:
        with open(fifo, "wb") as fh:
            fh.write(b'{"prompt": "first"}\n')
            fh.flush()
            # An eager reader never lets the test set this, so the wait times out and the rest
            # is written before next() returns, which the assertion below catches.
            first_consumed.wait(timeout=2)
            fh.write(b'{"prompt": "second"}\n')
            rest_written.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        results = read_manifest(fifo)
        first = next(results)
        streamed = not rest_written.is_set()
        first_consumed.set()
        rest = list(results)
    finally:
        first_consumed.set()
        thread.join(timeout=5)
    assert isinstance(first, Item) and first.prompt == "first"
    assert streamed, "read_manifest read past the first line before yielding it"
    assert [r.prompt for r in rest if isinstance(r, Item)] == ["second"]
