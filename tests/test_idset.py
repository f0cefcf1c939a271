"""IdSet: the compact set the loader and resume use instead of a Python set."""

from __future__ import annotations

from batchimg._idset import IdSet


def test_add_reports_whether_the_id_is_new() -> None:
    ids = IdSet()
    assert ids.add("a") is True
    assert ids.add("b") is True
    assert ids.add("a") is False
    assert len(ids) == 2


def test_contains_sees_only_added_ids() -> None:
    ids = IdSet()
    ids.add("cat")
    assert "cat" in ids
    assert "dog" not in ids
    assert "" not in ids
    assert "Cat" not in ids


def test_non_string_keys_are_never_members() -> None:
    ids = IdSet()
    ids.add("1")
    assert 1 not in ids
    assert None not in ids
    assert b"1" not in ids


def test_empty_string_and_unicode_ids_are_distinct_members() -> None:
    ids = IdSet()
    for key in ("", " ", "猫", "猫 ", "a\x00b"):
        assert ids.add(key)
    assert len(ids) == 5
    assert all(key in ids for key in ("", " ", "猫", "猫 ", "a\x00b"))


def test_discard_removes_and_is_a_no_op_for_missing_ids() -> None:
    ids = IdSet()
    ids.add("a")
    ids.add("b")
    ids.discard("a")
    ids.discard("never-added")
    ids.discard("a")
    assert "a" not in ids
    assert "b" in ids
    assert len(ids) == 1


def test_discard_then_re_add() -> None:
    ids = IdSet()
    ids.add("a")
    ids.discard("a")
    assert ids.add("a") is True
    assert "a" in ids
    assert len(ids) == 1
    assert ids.add("a") is False


def test_growth_through_many_rehashes_keeps_every_member() -> None:
    ids = IdSet(capacity=8)
    keys = [f"item-{i}" for i in range(50_000)]
    assert all(ids.add(k) for k in keys)
    assert len(ids) == 50_000
    assert all(k in ids for k in keys)
    assert not any(f"other-{i}" in ids for i in range(5_000))
    assert not any(ids.add(k) for k in keys[::97])
    assert len(ids) == 50_000


def test_tombstones_do_not_hide_ids_further_along_the_probe_path() -> None:
    # A small table forces collisions: discarding every other id leaves tombstones in the
    # middle of probe chains, and the ids behind them must still be found.
    ids = IdSet(capacity=64)
    keys = [f"k{i}" for i in range(30)]
    for k in keys:
        ids.add(k)
    for k in keys[::2]:
        ids.discard(k)
    for k in keys[1::2]:
        assert k in ids, k
        assert ids.add(k) is False, k
    for k in keys[::2]:
        assert k not in ids, k
    assert len(ids) == 15


def test_churn_of_add_and_discard_keeps_membership_exact() -> None:
    # Many adds and discards through a small table: tombstones pile up and trigger rehashes
    # that must neither lose live ids nor revive discarded ones.
    ids = IdSet(capacity=16)
    live: set[str] = set()
    for round_ in range(200):
        for i in range(50):
            key = f"r{round_}-{i}"
            assert ids.add(key)
            live.add(key)
        for i in range(0, 50, 2):
            key = f"r{round_}-{i}"
            ids.discard(key)
            live.discard(key)
        if round_ % 3 == 0:
            # Re-add one discarded id from an earlier round.
            key = f"r{round_ // 2}-0"
            assert ids.add(key) == (key not in live)
            live.add(key)
    assert len(ids) == len(live)
    assert all(k in ids for k in live)
    assert not any(
        f"r{r}-{i}" in ids for r in range(200) for i in range(0, 50, 2) if f"r{r}-{i}" not in live
    )


def test_a_full_set_takes_about_six_bytes_an_id() -> None:
    # The scale bar: memory may grow by little more than 5 MiB per million lines.
    import tracemalloc

    count = 200_000
    keys = [f"id-{i}" for i in range(count)]
    tracemalloc.start()
    try:
        ids = IdSet(capacity=count)
        for key in keys:
            ids.add(key)
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 5 * count < size < 6.5 * count
    assert len(ids) == count and f"id-{count - 1}" in ids and f"id-{count}" not in ids


def test_a_fingerprint_found_across_two_slots_is_not_a_member() -> None:
    # Fingerprints sit end to end in a bucket: bytes that span two of them are no match.
    from batchimg._idset import _aligned_find

    bucket = bytes(range(1, 11))  # two 5-byte slots: 1..5 and 6..10
    assert _aligned_find(bucket, bytes(range(6, 11))) == 5
    assert _aligned_find(bucket, bytes(range(3, 8))) == -1
    assert _aligned_find(bucket + bytes(range(3, 8)), bytes(range(3, 8))) == 10
