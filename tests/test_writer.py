"""The writer: decode b64 answers, check the format, store files atomically without overwriting."""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import io
import os
import threading
from pathlib import Path

import anyio
import pytest
from PIL import Image

from batchimg import writer as writer_module
from batchimg._spool import ResponseSpool, SpooledImage
from batchimg.errors import ItemFailed, StorageError
from batchimg.stores import LocalStore
from batchimg.stores import local as local_store
from batchimg.writer import (
    BatchedWriter,
    ImageWriter,
    StoredFile,
    check_image,
    decode_b64_image,
)
from tests.test_durability import local_batch_sync_applies


def image_bytes(fmt: str, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A real 8x8 image in `fmt` (png, jpeg or webp)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format=fmt.upper())
    return buf.getvalue()


PNG = image_bytes("png")
JPEG = image_bytes("jpeg")
WEBP = image_bytes("webp")


def leftovers(directory: Path) -> list[str]:
    """Temp files left behind: anything in the store's temp area, or hidden in a directory."""
    temps = directory / ".tmp"
    found = [p.name for p in temps.iterdir()] if temps.is_dir() else []
    found += [p.name for p in directory.rglob(".*") if p.is_file() and p.parent != temps]
    return sorted(found)


def image_writer(out: Path) -> ImageWriter:
    store = LocalStore(out)
    store.clean_temps()  # as the engine does once it holds the directory's lock
    return ImageWriter(store)


# --- decode_b64_image -------------------------------------------------------------------------


def test_plain_b64_json_decodes_to_the_image_bytes() -> None:
    assert decode_b64_image(base64.b64encode(PNG).decode()) == PNG


@pytest.mark.parametrize("mime", ["image/png", "image/jpeg", "image/webp"])
def test_data_uri_prefix_is_stripped(mime: str) -> None:
    # Some gateways prefix b64_json with a data URI (API_NOTES.md; the seed strips it too).
    value = f"data:{mime};base64," + base64.b64encode(PNG).decode()
    assert decode_b64_image(value) == PNG


@pytest.mark.parametrize(
    "value",
    ["not base64 at all!", "abc", "QUJD$$$", "data:image/png;base64,%%%", "data:image/png;base64"],
)
def test_corrupt_base64_fails_the_item(value: str) -> None:
    with pytest.raises(ItemFailed) as info:
        decode_b64_image(value)
    assert info.value.info.code == "bad_image"
    assert info.value.retry_after_s is None


# --- check_image -----------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "fmt"), [(PNG, "png"), (JPEG, "jpeg"), (WEBP, "webp")])
def test_image_of_the_requested_format_passes(data: bytes, fmt: str) -> None:
    check_image(data, fmt)  # raises if it does not pass


def test_wrong_format_fails_the_item_with_both_formats_named() -> None:
    with pytest.raises(ItemFailed) as info:
        check_image(JPEG, "png")
    message = str(info.value.info.message)
    assert "asked for png" in message
    assert "got jpeg" in message


@pytest.mark.parametrize(("data", "expected"), [(PNG, "webp"), (WEBP, "jpeg")])
def test_any_format_mismatch_fails_the_item(data: bytes, expected: str) -> None:
    with pytest.raises(ItemFailed, match=f"asked for {expected}"):
        check_image(data, expected)


@pytest.mark.parametrize(
    "data",
    [b"", b"<html>502 Bad Gateway</html>", b'{"error": "x"}', b"\x89PN", b"RIFF\0\0\0\0WAVE"],
)
def test_non_image_bytes_fail_the_item(data: bytes) -> None:
    with pytest.raises(ItemFailed) as info:
        check_image(data, "png")
    assert "not a PNG, JPEG, WebP, GIF or SVG image" in info.value.info.message
    assert info.value.info.code == "bad_image"


def gif_bytes(frames: int = 3) -> bytes:
    images = [Image.new("P", (32, 32), i) for i in range(frames)]
    out = io.BytesIO()
    images[0].save(out, "GIF", save_all=True, append_images=images[1:])
    return out.getvalue()


def entity_bomb(levels: int = 8) -> bytes:
    """A billion-laughs document: each entity is ten of the one before."""
    entities = [b'<!ENTITY e0 "ha">'] + [
        b'<!ENTITY e%d "%s">' % (i, b"&e%d;" % (i - 1) * 10) for i in range(1, levels)
    ]
    body = b"&e%d;" % (levels - 1) * 10
    return (
        b"<?xml version='1.0'?><!DOCTYPE svg [" + b"".join(entities) + b"]><svg>" + body + b"</svg>"
    )


SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8"><rect/></svg>'


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (gif_bytes(), "gif"),
        (SVG, "svg"),
        (b'\xef\xbb\xbf  <svg xmlns="http://www.w3.org/2000/svg"/>', "svg"),  # BOM, blanks
        (b"<!-- made by a model -->\n<svg><g/></svg>", "svg"),
    ],
)
def test_gif_and_svg_answers_pass(data: bytes, fmt: str) -> None:
    check_image(data, fmt)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"<?xml version='1.0'?><svg><rect></svg>", "not a well-formed SVG"),  # mismatched tag
        (b"<?xml version='1.0'?><html><body/></html>", "root is <html>, not <svg>"),
        (b"<svg><rect/>", "not a well-formed SVG"),  # cut off
        (entity_bomb(), "not a well-formed SVG"),  # expat refuses to amplify it
        (b"<html>502 Bad Gateway</html>", "not a PNG, JPEG, WebP, GIF or SVG"),
        (PNG, "asked for svg, got png"),
    ],
)
def test_broken_svg_answers_fail_the_item(data: bytes, fragment: str) -> None:
    with pytest.raises(ItemFailed, match=fragment):
        check_image(data, "svg")


def test_a_spooled_svg_is_parsed_from_its_file(tmp_path: Path) -> None:
    body = b"<svg>" + b"<g/>" * 200_000 + b"</svg"  # 800 kB, cut off at the very end
    encoded = base64.b64encode(body).decode()
    spool = ResponseSpool(tmp_path)
    spool.feed(f'{{"data": [{{"b64_json": "{encoded}"}}]}}'.encode())
    _, (image,) = spool.finish()
    assert isinstance(image, SpooledImage)
    with pytest.raises(ItemFailed, match="not a well-formed SVG"):
        check_image(image, "svg")
    with pytest.raises(ItemFailed, match="asked for gif, got svg"):
        check_image(image, "gif")
    check_image(gif_bytes(), "gif")


# --- ImageWriter over a LocalStore -----------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "ext", "data"), [("png", "png", PNG), ("jpeg", "jpg", JPEG), ("webp", "webp", WEBP)]
)
def test_save_writes_named_files_under_images(
    tmp_path: Path, fmt: str, ext: str, data: bytes
) -> None:
    store = image_writer(tmp_path)
    other = image_bytes(fmt, (0, 0, 255))
    stored = store.save("cat-01", [data, other], fmt)

    assert [s.path for s in stored] == [f"images/cat-01-0.{ext}", f"images/cat-01-1.{ext}"]
    for entry, expected in zip(stored, [data, other], strict=True):
        on_disk = (tmp_path / entry.path).read_bytes()
        assert on_disk == expected
        assert entry.bytes == len(expected)
        assert entry.sha256 == hashlib.sha256(expected).hexdigest()
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        f"cat-01-0.{ext}",
        f"cat-01-1.{ext}",
    ]
    assert leftovers(tmp_path) == []


def test_save_returns_stored_files_in_order(tmp_path: Path) -> None:
    images = [image_bytes("png", (i * 40, 0, 0)) for i in range(4)]
    stored = image_writer(tmp_path).save("x", images, "png")
    assert stored == [
        StoredFile(f"images/x-{i}.png", len(d), hashlib.sha256(d).hexdigest())
        for i, d in enumerate(images)
    ]


def test_saving_creates_the_images_directory(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    image_writer(out).save("x", [PNG], "png")
    assert (out / "images" / "x-0.png").read_bytes() == PNG


def test_stale_temp_files_are_removed_when_the_temp_area_is_cleaned(tmp_path: Path) -> None:
    temps, images = tmp_path / ".tmp", tmp_path / "images"
    temps.mkdir()
    images.mkdir()
    stale = [temps / "cat-0.png.1a2b3c4d0", temps / ".spool-deadbeef.part"]
    for path in stale:
        path.write_bytes(b"half an image")
    keep = images / "cat-0.png"
    keep.write_bytes(PNG)

    LocalStore(tmp_path).clean_temps()

    assert not any(p.exists() for p in stale)
    assert keep.read_bytes() == PNG


def test_existing_file_is_moved_to_orphans_not_overwritten(tmp_path: Path) -> None:
    store = image_writer(tmp_path)
    old = image_bytes("png", (1, 2, 3))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "cat-0.png").write_bytes(old)

    (stored,) = store.save("cat", [PNG], "png")

    assert (tmp_path / stored.path).read_bytes() == PNG
    orphans = list((tmp_path / ".orphans").iterdir())
    assert [p.read_bytes() for p in orphans] == [old]
    assert orphans[0].suffix == ".png"
    assert orphans[0].name.startswith("cat-0")


def test_saving_the_same_stem_twice_keeps_both_versions(tmp_path: Path) -> None:
    store = image_writer(tmp_path)
    first, second = image_bytes("png", (9, 9, 9)), image_bytes("png", (99, 99, 99))
    store.save("dup", [first], "png")
    store.save("dup", [second], "png")
    assert (tmp_path / "images" / "dup-0.png").read_bytes() == second
    assert [p.read_bytes() for p in (tmp_path / ".orphans").iterdir()] == [first]
    assert leftovers(tmp_path) == []


# --- BatchedWriter: the engine's writer threads ---------------------------------------------------


def spooled(directory: Path, data: bytes) -> SpooledImage:
    """An image the client streamed to a temp file, as `_spool` leaves it."""
    spool = ResponseSpool(directory)
    spool.feed(b'{"data":[{"b64_json":"' + base64.b64encode(data) + b'"}]}')
    _, (image,) = spool.finish()
    assert isinstance(image, SpooledImage)
    return image


async def test_batched_store_keeps_every_concurrent_item_intact(tmp_path: Path) -> None:
    store = image_writer(tmp_path)
    big = image_bytes("png", (1, 2, 3)) + bytes(300_000)  # spooled: over the in-memory limit
    items: dict[str, list[bytes | SpooledImage]] = {
        f"item{i}": [image_bytes("png", (i, i, i)), image_bytes("png", (i, 0, 255))]
        for i in range(120)
    }
    items["spooled"] = [spooled(store.store.temp_dir, big)]
    writer = BatchedWriter(store, threads=4)
    results: dict[str, list[StoredFile]] = {}

    async def save(stem: str) -> None:
        results[stem] = await writer.save(stem, items[stem], "png")

    async with anyio.create_task_group() as tg:
        for stem in items:
            tg.start_soon(save, stem)
    writer.close()

    contents = {stem: images for stem, images in items.items() if stem != "spooled"}
    contents["spooled"] = [big]
    for stem, images in contents.items():
        assert len(results[stem]) == len(images)
        for index, (entry, data) in enumerate(zip(results[stem], images, strict=True)):
            assert entry.path == f"images/{stem}-{index}.png"
            assert (tmp_path / entry.path).read_bytes() == data
            assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert len(list((tmp_path / "images").iterdir())) == 241
    assert leftovers(tmp_path) == []


class RefusesOne(LocalStore):
    """A store whose disk refuses the files of one stem (as ENOSPC would), and only those."""

    def write_temp(self, hint: str, data: bytes) -> str:  # how a local disk stages an image
        if hint.startswith("doomed-1"):  # the second image: the first is already staged
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write_temp(hint, data)


async def test_a_refused_item_fails_alone_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = RefusesOne(tmp_path)
    store.clean_temps()
    writer = BatchedWriter(ImageWriter(store), threads=2)
    outcome: dict[str, str] = {}

    async def save(stem: str) -> None:
        images = [PNG, image_bytes("png", (5, 5, 5))]
        try:
            await writer.save(stem, images, "png")
            outcome[stem] = "ok"
        except StorageError as exc:
            outcome[stem] = str(exc)

    async with anyio.create_task_group() as tg:
        for i in range(40):
            tg.start_soon(save, "doomed" if i == 17 else f"fine{i}")
    writer.close()

    assert "No space left on device" in outcome.pop("doomed")
    assert set(outcome.values()) == {"ok"} and len(outcome) == 39
    names = {p.name for p in (tmp_path / "images").iterdir()}
    assert not any(n.startswith("doomed") for n in names)
    assert len(names) == 78
    assert leftovers(tmp_path) == []


async def test_two_threads_publishing_one_name_keep_both_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two writer threads reach the look-then-rename step for the same name together (the
    # barrier holds each until the other arrives, or 0.5 s): neither file may be lost.
    barrier = threading.Barrier(2, timeout=0.5)
    real_lexists = os.path.lexists

    def lexists(path: str) -> bool:
        found = real_lexists(path)
        if path.endswith("dup-0.png"):  # both threads have looked before either renames
            with contextlib.suppress(threading.BrokenBarrierError):
                barrier.wait()
        return found

    monkeypatch.setattr(local_store.os.path, "lexists", lexists)
    monkeypatch.setattr(writer_module, "MAX_BATCH", 1)  # one job per thread
    writer = BatchedWriter(image_writer(tmp_path), threads=2)
    writer._start_thread()
    writer._start_thread()
    first, second = image_bytes("png", (1, 1, 1)), image_bytes("png", (2, 2, 2))
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.save, "dup", [first], "png")
        tg.start_soon(writer.save, "dup", [second], "png")
    writer.close()

    kept = [p.read_bytes() for p in (tmp_path / "images").iterdir()]
    kept += [p.read_bytes() for p in (tmp_path / ".orphans").glob("*")]
    assert sorted(kept) == sorted([first, second])


def test_put_places_each_name_where_its_path_says_and_refuses_the_rest(tmp_path: Path) -> None:
    # `put` finds a name's file through a per-folder cache: it must agree with `_path` (and
    # refuse what `_path` refuses) whatever names came before.
    store = LocalStore(tmp_path / "out")
    names = ["images/a-0.png", "a.png", "images/./b-0.png", "images//c-0.png", "x/y/z.png",
             "/abs.png", "/images/d.png", "../e.png", "images/../../f.png", "images/..", "",
             "images/a-1.png", "g.png"]  # fmt: skip
    for name in names:
        temp = store.new_temp("t")
        temp.write_bytes(name.encode())
        try:
            expected = store._path(name)
        except ValueError:
            with pytest.raises(ValueError):
                store.put(name, temp)
            temp.unlink()
            continue
        store.put(name, temp)
        assert expected.read_bytes() == name.encode()
    assert not (tmp_path / "abs.png").exists() and not (tmp_path / "e.png").exists()


@pytest.mark.parametrize("fs_sync", [True, False])
def test_a_temp_fsynced_as_written_is_named_so_and_put_like_any_other(
    tmp_path: Path, fs_sync: bool
) -> None:
    # Where one syncfs settles a batch (a local disk of a known kind), temps are only written;
    # elsewhere each is fsynced as it is written, and named so. tests/test_durability.py
    # traces both.
    calls: list[str] = []

    class Recording(LocalStore):
        def put(self, name: str, temp: Path) -> None:
            calls.append(temp.name)
            super().put(name, temp)

    store = Recording(tmp_path / "out", fs_sync=fs_sync)
    by_filesystem = fs_sync and local_batch_sync_applies(tmp_path / "out")
    ImageWriter(store).save("cat", [PNG], "png")
    assert len(calls) == 1 and calls[0].endswith(local_store.SYNCED_SUFFIX) != by_filesystem
    assert (tmp_path / "out" / "images" / "cat-0.png").read_bytes() == PNG
    assert list(store.temp_dir.iterdir()) == []


async def test_a_store_whose_sync_breaks_oddly_fails_the_batch_instead_of_hanging(
    tmp_path: Path,
) -> None:
    class OddSync(LocalStore):
        def sync(self) -> None:
            raise RuntimeError("the store's own bug")

    writer = BatchedWriter(ImageWriter(OddSync(tmp_path / "out")), threads=1)
    with anyio.fail_after(10), pytest.raises(StorageError, match="the store's own bug"):
        await writer.save("cat", [PNG], "png")
    writer.close()


async def test_a_writer_thread_the_system_refuses_fails_the_items_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name.startswith("image-writer"):
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    writer = BatchedWriter(image_writer(tmp_path), threads=1)
    outcomes: list[str] = []

    async def save(stem: str) -> None:
        try:
            await writer.save(stem, [PNG], "png")
            outcomes.append("ok")
        except StorageError as exc:
            outcomes.append(str(exc))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(save, f"cat{i}")
    assert outcomes == ["cannot start a writer thread: can't start new thread"] * 3
    writer.close()
