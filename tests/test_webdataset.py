"""`--format webdataset`: tar shards that are whole or absent, and complete after any crash."""

from __future__ import annotations

import errno
import hashlib
import io
import signal
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from PIL import Image

import batchimg
from batchimg.cli import cli
from batchimg.layouts.webdataset import WebDatasetLayout, sample_key
from batchimg.mock import MockServer
from batchimg.stores import LocalStore
from tests.helpers import start_cli, wait_for


def items(count: int) -> list[dict[str, Any]]:
    return [
        {"prompt": f"a heron at dawn, study {i}", "quality": "low", "metadata": {"n": i}}
        for i in range(count)
    ]


def ledger_ok(out: Path) -> dict[str, dict[str, Any]]:
    records = [orjson.loads(line) for line in (out / "ledger.jsonl").read_bytes().splitlines()]
    return {r["id"]: r for r in records if r.get("status") == "ok"}


def shard_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample in every finished shard: key -> {extension: bytes}; a key seen twice fails."""
    samples: dict[str, dict[str, bytes]] = {}
    seen: Counter[str] = Counter()
    for path in sorted((out / "shards").glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                extracted = tar.extractfile(member)
                assert extracted is not None
                members.setdefault(key, {})[ext] = extracted.read()
        for key, parts in members.items():
            seen[key] += 1
            samples[key] = parts
    assert [k for k, n in seen.items() if n > 1] == []  # no sample packed twice
    return samples


def check_complete(out: Path) -> dict[str, dict[str, bytes]]:
    """Each ok ledger record's images are samples whose bytes match the ledger's sha256."""
    samples = shard_samples(out)
    expected = 0
    for record in ledger_ok(out).values():
        for index, (file_name, digest) in enumerate(
            zip(record["files"], record["sha256"], strict=True)
        ):
            sample = samples[sample_key(file_name)]
            expected += 1
            assert set(sample) == {"png", "json", "txt"}
            assert hashlib.sha256(sample["png"]).hexdigest() == digest
            row = orjson.loads(sample["json"])
            assert (row["id"], row["image_index"], row["prompt"]) == (
                record["id"],
                index,
                record["prompt"],
            )
            assert row["metadata"] == record["metadata"]
            assert sample["txt"].decode() == record["prompt"]
    assert len(samples) == expected
    assert list((out / "images").glob("*.png")) == []  # packed: no loose copies left
    assert [p.name for p in (out / "shards").iterdir() if p.name.startswith(".")] == []
    assert not (out / "metadata.jsonl").exists()
    return samples


def test_cli_packs_every_image_into_shards_of_the_given_size(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(items(25))
    out = tmp_path / "out"
    args = ["run", str(manifest), "--out", str(out), "--mock", "--format", "webdataset",
            "--shard-size", "10", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"images: {out / 'shards'}" in result.output

    samples = check_complete(out)
    assert len(samples) == 25
    sizes = []
    for path in sorted((out / "shards").glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            sizes.append(len(tar.getnames()) // 3)
    assert sizes == [10, 10, 5]
    png = next(iter(samples.values()))["png"]
    assert Image.open(io.BytesIO(png)).size == (1024, 1024)


def test_the_datasets_webdataset_loader_reads_the_shards(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"".join(orjson.dumps(i) + b"\n" for i in items(12)))
    out = tmp_path / "out"
    summary = batchimg.run(
        manifest, out, batchimg.RunOptions(mock=True, layout="webdataset", shard_size=5)
    )
    assert summary.ok == 12

    ds = datasets.load_dataset(
        "webdataset", data_files={"train": str(out / "shards" / "*.tar")}, split="train"
    )
    assert ds.num_rows == 12
    assert {row["json"]["metadata"]["n"] for row in ds} == set(range(12))
    assert all(row["txt"] == row["json"]["prompt"] for row in ds)
    assert ds[0]["png"].size == (1024, 1024)


def test_a_rerun_adds_new_samples_in_new_shards_and_never_repacks(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    out = tmp_path / "out"
    batchimg.run(
        write_manifest(items(7)),
        out,
        batchimg.RunOptions(mock=True, layout="webdataset", shard_size=4),
    )
    first = {p.name: p.read_bytes() for p in (out / "shards").glob("*.tar")}
    assert sorted(first) == ["shard-000000.tar", "shard-000001.tar"]

    summary = batchimg.run(
        write_manifest(items(12)),
        out,
        batchimg.RunOptions(mock=True, layout="webdataset", shard_size=4),
    )
    assert (summary.ok, summary.skipped) == (5, 7)
    assert {n: (out / "shards" / n).read_bytes() for n in first} == first  # untouched
    assert len(list((out / "shards").glob("*.tar"))) == 4
    assert len(check_complete(out)) == 12


def test_crash_leftovers_are_packed_once_at_the_next_start(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(items(9))
    out = tmp_path / "out"
    batchimg.run(manifest, out, batchimg.RunOptions(mock=True, layout="webdataset", shard_size=4))
    samples = check_complete(out)
    # The states a crash can leave: a half-written shard, a loose file whose shard was renamed
    # into place before the clean-up ran, and a loose image of an ok item never packed.
    (out / ".tmp" / "shard-000007.tar.1a2b3c4d0").write_bytes(b"half a tar")
    ok = ledger_ok(out)
    packed_name = next(iter(ok.values()))["files"][0]
    (out / packed_name).write_bytes(samples[sample_key(packed_name)]["png"])
    last = max((out / "shards").glob("shard-*.tar"))
    with tarfile.open(last) as tar:
        names = tar.getnames()
        unpacked = {n.split(".", 1)[0] for n in names}
        loose = {}
        for record in ok.values():
            name = record["files"][0]
            if sample_key(name) in unpacked:
                member = tar.extractfile(f"{sample_key(name)}.png")
                assert member is not None
                loose[name] = member.read()
    last.unlink()  # as if the last shard had never been written: its images still loose
    for name, data in loose.items():
        (out / name).write_bytes(data)

    summary = batchimg.run(
        manifest, out, batchimg.RunOptions(mock=True, layout="webdataset", shard_size=4)
    )
    assert (summary.ok, summary.skipped) == (0, 9)
    assert len(check_complete(out)) == 9


def test_kill_9_mid_run_then_rerun_leaves_every_sample_in_exactly_one_shard(
    tmp_path: Path, slow_server: MockServer, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(items(30))
    out = tmp_path / "out"
    ledger_path = out / "ledger.jsonl"
    layout = ("--format", "webdataset", "--shard-size", "6", "--quiet")
    with start_cli(manifest, out, slow_server, *layout) as proc:
        wait_for(lambda: ledger_path.exists() and ledger_path.read_bytes().count(b"\n") >= 9)
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    with start_cli(manifest, out, slow_server, *layout) as proc:
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert len(check_complete(out)) == 30


def test_a_shard_the_disk_refuses_stops_the_run_and_keeps_the_images_loose(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    class NoRoomForShards(LocalStore):
        """The disk takes images, then refuses the (bigger) shards."""

        def put(self, name: str, temp: Path) -> None:
            if name.startswith("shards/"):
                raise OSError(errno.ENOSPC, "No space left on device")
            super().put(name, temp)

    manifest = write_manifest(items(8))
    out = tmp_path / "out"
    summary = batchimg.run(
        manifest,
        out,
        batchimg.RunOptions(mock=True, layout="webdataset", shard_size=3),
        store=NoRoomForShards(out),
    )
    assert summary.exit_code == 3
    assert "No space left on device" in (summary.stop_reason or "")
    assert list((out / "shards").glob("*.tar")) == []
    loose = list((out / "images").glob("*.png"))
    assert len(loose) == sum(len(r["files"]) for r in ledger_ok(out).values()) > 0

    summary = batchimg.run(
        manifest, out, batchimg.RunOptions(mock=True, layout="webdataset", shard_size=3)
    )
    assert summary.exit_code == 0
    assert len(check_complete(out)) == 8


def test_shard_size_without_webdataset_is_a_usage_error(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(items(2))
    result = CliRunner().invoke(
        cli, ["run", str(manifest), "--out", str(tmp_path / "o"), "--mock", "--shard-size", "5"]
    )
    assert result.exit_code == 2
    assert "--shard-size needs --format webdataset" in result.output
    assert not (tmp_path / "o").exists()


def test_a_webdataset_directory_refuses_the_imagefolder_layout(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest(items(3))
    out = tmp_path / "out"
    batchimg.run(manifest, out, batchimg.RunOptions(mock=True, layout="webdataset", shard_size=2))
    result = CliRunner().invoke(cli, ["run", str(manifest), "--out", str(out), "--mock"])
    assert result.exit_code == 2
    assert "re-run with --format webdataset" in result.output
    assert len(check_complete(out)) == 3


@pytest.mark.parametrize(
    ("file_name", "key"),
    [("images/cat-0.png", "cat-0"), ("images/i0123abc-2.webp", "i0123abc-2")],
)
def test_sample_keys_are_file_stems(file_name: str, key: str) -> None:
    assert sample_key(file_name) == key


def test_sample_keys_never_hold_a_dot_and_stay_distinct() -> None:
    dotted, underscored = sample_key("images/v1.2-0.png"), sample_key("images/v1_2-0.png")
    assert "." not in dotted and dotted.startswith("v1_2-0-")
    assert dotted != underscored == "v1_2-0"


def test_an_abort_writes_no_last_shard_and_keeps_its_images_loose(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    picture = b"\x89PNG\r\n\x1a\n a picture"
    (images / "a-0.png").write_bytes(picture)
    digest = hashlib.sha256(picture).hexdigest()
    record = {"id": "a", "files": ["images/a-0.png"], "sha256": [digest], "prompt": "p",
              "metadata": None}  # fmt: skip
    layout = WebDatasetLayout(tmp_path, LocalStore(tmp_path), 10)
    layout.prepare()
    layout.resumed(set())
    layout.add(record)
    layout.abort()  # as the engine does when the run is torn down
    assert not (tmp_path / "shards").exists()
    assert (images / "a-0.png").exists()

    layout = WebDatasetLayout(tmp_path, LocalStore(tmp_path), 10)  # the next run packs it
    layout.prepare()
    layout.restore(record)
    layout.resumed({"a"})
    layout.close()
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["shard-000000.tar"]
    assert not (images / "a-0.png").exists()


def newest_sample(out: Path, key: str) -> dict[str, bytes]:
    """The sample for `key` in the newest shard that holds it (each shard holds it once)."""
    found: dict[str, bytes] = {}
    for path in sorted((out / "shards").glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            names = tar.getnames()
            assert len(names) == len(set(names))  # never a key twice in one shard
            for name in names:
                if name.split(".", 1)[0] == key:
                    member = tar.extractfile(name)
                    assert member is not None
                    found[name.split(".", 1)[1]] = member.read()
    return found


def test_an_item_done_again_gets_its_new_image_packed_not_deleted(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    # ok, then the line breaks (an error record: no longer done), then it is fixed and re-run.
    out = tmp_path / "out"
    for line in ({"id": "x", "prompt": "first"}, {"id": "x", "prompt": "first", "bogus": 1},
                 {"id": "x", "prompt": "second"}):  # fmt: skip
        batchimg.run(
            write_manifest([line]),
            out,
            batchimg.RunOptions(mock=True, layout="webdataset", shard_size=1),
        )
    last_ok = ledger_ok(out)["x"]
    sample = newest_sample(out, "x-0")
    assert orjson.loads(sample["json"])["prompt"] == last_ok["prompt"] == "second"
    assert hashlib.sha256(sample["png"]).hexdigest() == last_ok["sha256"][0]
    assert list((out / "images").glob("*.png")) == []


def test_a_loose_image_newer_than_its_packed_sample_is_packed_not_deleted(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    out = tmp_path / "out"
    manifest = write_manifest([{"id": "x", "prompt": "a heron"}])
    batchimg.run(manifest, out, batchimg.RunOptions(mock=True, layout="webdataset", shard_size=5))
    # A crash left a re-done item's newer image loose, its ok line written, its shard not.
    newer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(newer, "PNG")
    (out / "images" / "x-0.png").write_bytes(newer.getvalue())
    record = {**ledger_ok(out)["x"], "sha256": [hashlib.sha256(newer.getvalue()).hexdigest()]}
    with open(out / "ledger.jsonl", "ab") as fh:
        fh.write(orjson.dumps(record) + b"\n")

    summary = batchimg.run(
        manifest, out, batchimg.RunOptions(mock=True, layout="webdataset", shard_size=5)
    )
    assert (summary.ok, summary.skipped) == (0, 1)
    assert newest_sample(out, "x-0")["png"] == newer.getvalue()
    assert list((out / "images").glob("*.png")) == []
