"""`batchimg report ... --html FILE`: one page a person opens in a browser, offline.

The page holds the totals, where the money went (a table and a bar chart by the `--by`
groups), when (images per minute, 429s and cumulative cost over the run's time, a latency
histogram with p50/p95), the failures grouped by error code with examples, and a gallery with
filters. Everything is in the page or in the folder beside it (`FILE_files/`): thumbnails
(WebP, at most 256 px, made once per image sha256 by threads and kept for the next build),
SVG outputs copied as files and shown through `<img>` (never inlined: an SVG can carry script),
and the gallery's rows as script chunks loaded as the reader pages through them, so a 100,000-
image run opens at once. No network, no CDN: the charts are inline SVG drawn here.

Totals are `report`'s own (`build_report`), so the page and `report --format json` agree.
"""

from __future__ import annotations

import hashlib
import html
import io
import math
import re
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from .ledger import LedgerRecord, amount, is_state, read_ledger
from .outputs import OutputTree
from .pricing import PriceTable
from .report import Report, _time, build_report, ledger_paths
from .stores import ObjectStore
from .stores.remote import origin_of
from .writer import IMAGES_DIR

THUMB_PX = 256
MOST_PIXELS = 50_000_000  # larger images get no thumbnail (decoding one would take GBs)
MOST_SVG_BYTES = 256 << 10  # an SVG larger than this is not copied (no picture)
MOST_OPTIONS = 50  # a filter with more values than this is a text box, not a list
MOST_KEYS = 30  # metadata keys offered as filters
_DIGEST = re.compile(r"[0-9a-f]{64}")
THUMB_QUALITY = 70
CHUNK = 500  # gallery rows per script chunk (one page of the gallery)
EXAMPLES = 3  # examples shown per failure code

Progress = Callable[[int, int], None]


@dataclass
class _Image:
    """One image to show: where its bytes are, and its row in the gallery."""

    sha256: str
    fmt: str
    source: Source | None  # None: gone
    row: dict[str, Any]


@dataclass
class _Timeline:
    """Counts per time bucket over the run's time (a minute, or less for a short run: about
    60 buckets in all)."""

    images: Counter[int] = field(default_factory=Counter)
    limited: Counter[int] = field(default_factory=Counter)
    cost: Counter[int] = field(default_factory=Counter)
    bucket_s: float = 60.0


def write_html(
    targets: Sequence[str | Path],
    out_file: Path,
    by: Sequence[str] = (),
    prices: PriceTable | None = None,
    *,
    progress: Progress | None = None,
    threads: int = 4,
) -> dict[str, Any]:
    """Write the page (and its folder); what it holds, for the caller's message."""
    report = build_report(targets, by, prices)
    via = build_report(targets, ["via"], prices)  # spend by online / batch, billed lines all
    paths = ledger_paths(targets)
    last: dict[str, tuple[Path, LedgerRecord]] = {}
    timeline = _Timeline()
    for path in paths:
        for record in read_ledger(path):
            if is_state(record):
                last[record["id"]] = (path, record)
    _fill_timeline(timeline, (r for _, r in last.values()))
    folder = out_file.with_name(out_file.name.rsplit(".", 1)[0] + "_files")
    (folder / "thumbs").mkdir(parents=True, exist_ok=True)
    images = list(_images(last.values()))
    made = _thumbnails(images, folder, progress, threads)
    for image in images:  # gone, or not a picture Pillow reads: its card shows none
        if image.source is None or not (folder / image.row["thumb"]).exists():
            image.row["thumb"] = None
    rows = [image.row for image in images]
    rows += [_failed_row(r) for _, r in last.values() if r.get("status") != "ok"]
    chunks = _write_chunks(rows, folder)
    page = _page(report, via, last, timeline, rows, chunks, folder.name, by)
    tmp = out_file.with_name(out_file.name + ".part")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out_file)
    return {"images": len(images), "thumbnails_made": made, "rows": len(rows),
            "page_bytes": len(page.encode()), "folder": str(folder)}  # fmt: skip


# -- the data --


def _fill_timeline(timeline: _Timeline, records: Iterator[LedgerRecord]) -> None:
    stamped = []
    for record in records:
        finished = _time(record.get("finished_at"))
        if finished is not None:
            stamped.append((finished, record))
    if not stamped:
        return
    start = min(t for t, _ in stamped)
    span_s = (max(t for t, _ in stamped) - start).total_seconds()
    # About 60 buckets however long the run: a minute each at most, a millisecond at least.
    timeline.bucket_s = bucket = min(60.0, max(0.001, float(f"{span_s / 60:.2g}")))
    for finished, record in stamped:
        at = int((finished - start).total_seconds() // bucket)
        files = record.get("files")
        if record.get("status") == "ok" and isinstance(files, list):
            timeline.images[at] += len(files)
        limited = record.get("rate_limited")
        if isinstance(limited, int) and limited > 0:
            timeline.limited[at] += limited
        cost = amount(record.get("cost_usd"))
        timeline.cost[at] += cost or 0.0  # type: ignore[assignment]


def _images(records: Any) -> Iterator[_Image]:
    """Every image of every ok item, with where its bytes are (loose, or in a shard; None if
    gone). Only files inside the output (its directory, or its bucket's prefix), under a real
    sha256, are read."""
    packed: dict[Path, dict[str, Source]] = {}  # by ledger: its output's shard members
    loose: dict[Path, set[str]] = {}  # by ledger, in a bucket: its output's loose images
    for ledger, record in records:
        files, digests = record.get("files"), record.get("sha256")
        if record.get("status") != "ok" or not isinstance(files, list):
            continue
        store = origin_of(ledger)
        out = ledger.parent.resolve()
        if store is not None and ledger not in loose:  # one listing, not a look per image
            loose[ledger] = set(store.list(IMAGES_DIR))
        listed = loose.get(ledger, set())
        digests = digests if isinstance(digests, list) else []
        for index, name in enumerate(files):
            digest = digests[index] if index < len(digests) else None
            if not isinstance(name, str) or not isinstance(digest, str):
                continue
            source: Source | None = None
            if not _DIGEST.fullmatch(digest):
                digest = hashlib.sha256(f"{record['id']}/{index}".encode()).hexdigest()
            else:  # not one: nothing to show
                inside, source = _loose(out, store, name, listed)
                if source is None and inside:
                    if ledger not in packed:
                        packed[ledger] = _shard_members(out, store)
                    source = packed[ledger].get(digest)
            fmt = name.rsplit(".", 1)[-1].lower()[:8]
            yield _Image(digest, fmt, source, _row(record, index, digest, fmt))


def _loose(
    out: Path, store: ObjectStore | None, name: str, listed: set[str]
) -> tuple[bool, Source | None]:
    """Whether a file name is inside the output, and its loose copy (None: none); `listed`:
    the loose images of a bucket's output."""
    if store is not None:
        try:
            store.key(name)
        except ValueError:
            return False, None
        return True, (_InBucket(store, name) if name in listed else None)
    loose = (out / name).resolve()
    inside = loose.is_relative_to(out)
    return inside, (loose if inside and loose.is_file() else None)


@dataclass(frozen=True)
class _InBucket:
    """An image in a bucket: an object, or (start, end) a member's bytes inside a shard."""

    store: ObjectStore
    name: str
    start: int | None = None
    end: int | None = None

    def read(self) -> bytes:
        if self.start is None or self.end is None:
            return self.store.read(self.name)
        return self.store.read_range(self.name, self.start, self.end)


Source = Path | tuple[Path, str] | _InBucket  # a loose file, (shard, member), or in a bucket


def _shard_members(out: Path, store: ObjectStore | None) -> dict[str, Source]:
    """sha256 -> where it is, of every image packed in the output's shards."""
    found: dict[str, Source] = {}
    tree = OutputTree(out, store)
    for shard in tree.shards():
        try:
            for member, data in tree.images(shard):
                digest = hashlib.sha256(data.read()).hexdigest()
                if store is None:
                    found[digest] = (Path(shard), member.name)
                else:
                    end = member.offset_data + member.size
                    found[digest] = _InBucket(store, shard, member.offset_data, end)
        except (tarfile.TarError, OSError):
            continue  # an unreadable shard: its images are only not shown
    return found


def _scalar(value: Any) -> Any:
    """A ledger value as the page shows it: a string, number, true/false or null as it is,
    anything else (a list, an object) as its JSON text."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS, default=str).decode()


def _base_row(record: LedgerRecord) -> dict[str, Any]:
    metadata = record.get("metadata")
    return {
        "id": record["id"],
        "prompt": _scalar(record.get("prompt")),
        "model": _scalar(record.get("model")),
        "size": _scalar(record.get("size")),
        "quality": _scalar(record.get("quality")),
        "cost": amount(record.get("cost_usd")),
        "via": _scalar(record.get("via") or "online"),
        "line": _scalar(record.get("line")),
        "metadata": {str(k): _scalar(v) for k, v in metadata.items()}
        if isinstance(metadata, dict)
        else {},
    }


def _row(record: LedgerRecord, index: int, digest: str, fmt: str) -> dict[str, Any]:
    return {
        **_base_row(record),
        "i": index,
        "status": "ok",
        "format": fmt,
        "thumb": f"thumbs/{digest}.{'svg' if fmt == 'svg' else 'webp'}",
    }


def _failed_row(record: LedgerRecord) -> dict[str, Any]:
    error: Any = record.get("error")
    return {
        **_base_row(record),
        "i": 0,
        "status": "error",
        "format": _scalar(record.get("output_format")),
        "error": f"{error.get('code')}: {error.get('message')}" if isinstance(error, dict) else "",
        "thumb": None,
    }


def _thumbnails(images: list[_Image], folder: Path, progress: Progress | None, threads: int) -> int:
    """Make the thumbnails not already in the folder (by sha256), in threads; how many."""
    todo = {}
    for image in images:
        target = folder / image.row["thumb"]
        if image.source is not None and not target.exists():
            todo[target] = image
    done = made = 0
    if progress is not None:
        progress(0, len(todo))
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for ok in pool.map(lambda kv: _thumbnail(kv[1], kv[0]), todo.items()):
            done += 1
            made += ok
            if progress is not None:
                progress(done, len(todo))
    return made


def _thumbnail(image: _Image, target: Path) -> bool:
    """Write one thumbnail; False (the card shows no picture) for what cannot be one."""
    assert image.source is not None
    part = target.with_name(target.name + ".part")
    try:
        data = _read(image.source)
        if image.fmt == "svg":  # copied, never inlined: shown through <img>, script inert
            if len(data) > MOST_SVG_BYTES:
                return False
            part.write_bytes(data)
            part.replace(target)
            return True
        from PIL import Image  # Pillow: only for pages with images

        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MOST_PIXELS:
                return False  # a bomb, or a poster: decoding it would take gigabytes
            im.draft("RGB", (THUMB_PX, THUMB_PX))  # JPEG: decoded small to begin with
            im.seek(0)  # an animated gif: its first frame
            frame = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")
            frame.thumbnail((THUMB_PX, THUMB_PX))
            frame.save(part, "WEBP", quality=THUMB_QUALITY, method=4)
    except Exception:  # any image that cannot be read is only not shown
        part.unlink(missing_ok=True)
        return False
    part.replace(target)
    return True


def _read(source: Source) -> bytes:
    if isinstance(source, _InBucket):
        return source.read()
    if isinstance(source, Path):
        return source.read_bytes()
    shard, member = source
    with tarfile.open(shard) as tar:
        data = tar.extractfile(member)
        return data.read() if data is not None else b""


def _write_chunks(rows: list[dict[str, Any]], folder: Path) -> int:
    """The gallery's rows as `rows-N.js` scripts (loaded by the page when shown)."""
    for old in folder.glob("rows-*.js"):
        old.unlink()
    count = max(1, math.ceil(len(rows) / CHUNK))
    for n in range(count):
        part = rows[n * CHUNK : (n + 1) * CHUNK]
        payload = orjson.dumps(part).decode().replace("</", "<\\/")
        (folder / f"rows-{n}.js").write_text(f"batchimgRows({n},{payload});\n", encoding="utf-8")
    return count


# -- the page --


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:,.4f}"


def _page(
    report: Report,
    via: Report,
    last: dict[str, tuple[Path, LedgerRecord]],
    timeline: _Timeline,
    rows: list[dict[str, Any]],
    chunks: int,
    folder: str,
    by: Sequence[str],
) -> str:
    total = report.total.as_json()
    records = [r for _, r in last.values()]
    via_cost = {str(g.key.get("via")): g.cost_usd for g in via.groups.values()}
    first, finish = report.total.first_started, report.total.last_finished
    wall = (finish - first).total_seconds() if first and finish else None
    tiles = [
        ("items", f"{total['items']:,}"), ("ok", f"{total['ok']:,}"),
        ("failed", f"{total['failed']:,}"), ("images", f"{total['images']:,}"),
        ("tokens in / out", f"{total['input_tokens']:,} / {total['output_tokens']:,}"),
        ("cost", _usd(total["cost_usd"])),
        *((f"spent {via}", _usd(usd)) for via, usd in sorted(via_cost.items())),
        ("billed, cost unknown (bound)", _usd(total["unknown_cost_bound_usd"])),
        ("wall time", f"{wall:,.1f} s" if wall is not None else "-"),
        ("prices", report.price_table or "-"),
    ]  # fmt: skip
    tile_html = "".join(
        f'<div class="tile"><div class="k">{_e(k)}</div><div class="v" data-total="{_e(k)}">'
        f"{_e(v)}</div></div>"
        for k, v in tiles
    )
    groups = [(g.key, g.as_json()) for g in report.groups.values()] if by else []
    money = _money_table(groups, by) + _bars(
        [(" / ".join(str(v) for v in key.values()), g["cost_usd"]) for key, g in groups]
    )
    step = timeline.bucket_s
    n = 1 + max((*timeline.images, *timeline.limited, *timeline.cost), default=0)
    when = (  # one time axis for the three
        _line_chart(f"images (per {step:g} s)", timeline.images, step, n)
        + _line_chart(f"429s (per {step:g} s)", timeline.limited, step, n)
        + _line_chart("cumulative cost (USD)", _cumulative(timeline.cost), step, n)
        + _histogram([r.get("latency_s") for r in records])
    )
    failures = _failures(records)
    filters = _filters(rows)
    filled = {
        "__FOLDER__": orjson.dumps(folder).decode().replace("<", "\\u003c"),
        "__CHUNKS__": str(chunks),
        "__CHUNK__": str(CHUNK),
    }
    script = re.sub(r"__FOLDER__|__CHUNKS__|__CHUNK__", lambda m: filled[m[0]], _asset("report.js"))
    return _asset("report.html").format(
        tiles=tile_html,
        money=money or "<p>Give <code>--by FIELD</code> to see the cost by group.</p>",
        when=when,
        failures=failures,
        filters=filters,
        folder=_e(folder),
        chunks=chunks,
        rows=len(rows),
        css=_asset("report.css"),
        js=script,
    )


def _money_table(groups: list[tuple[dict[str, Any], dict[str, Any]]], by: Sequence[str]) -> str:
    if not groups:
        return ""
    head = "".join(f"<th>{_e(b)}</th>" for b in by)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{_e(v)}</td>" for v in key.values())
        + f"<td>{g['items']:,}</td><td>{g['images']:,}</td><td>{_usd(g['cost_usd'])}</td></tr>"
        for key, g in groups
    )
    return (
        f'<table class="groups"><tr>{head}<th>items</th><th>images</th><th>cost</th></tr>'
        f"{body}</table>"
    )


def _bars(values: list[tuple[str, float]]) -> str:
    if not values:
        return ""
    most = max((v for _, v in values), default=0.0) or 1.0
    height = 22 * len(values) + 10
    bars = "".join(
        f'<text x="0" y="{22 * i + 16}" class="lbl">{_e(label[:40])}</text>'
        f'<rect x="260" y="{22 * i + 4}" width="{max(1.0, 400 * v / most):.1f}" height="16" '
        f'class="bar"><title>{_e(label)}: {_usd(v)}</title></rect>'
        f'<text x="{266 + 400 * v / most:.1f}" y="{22 * i + 16}" class="lbl">{_usd(v)}</text>'
        for i, (label, v) in enumerate(values)
    )
    return f'<svg class="chart" viewBox="0 0 760 {height}" role="img">{bars}</svg>'


def _cumulative(per_minute: Counter[int]) -> Counter[int]:
    out: Counter[int] = Counter()
    running = 0.0
    for minute in range(max(per_minute, default=-1) + 1):
        running += per_minute.get(minute, 0.0)
        out[minute] = running  # type: ignore[assignment]
    return out


def _line_chart(title: str, series: Counter[int], step_s: float = 60.0, n: int = 0) -> str:
    minutes = max(n, max(series, default=0) + 1)
    points = [(m, float(series.get(m, 0))) for m in range(minutes)]
    peak = max((v for _, v in points), default=0.0)
    most = peak or 1.0
    width, height = 360, 120
    xs = [20 + (width - 30) * (m / max(1, minutes - 1)) for m, _ in points]
    ys = [height - 20 - (height - 35) * v / most for _, v in points]
    path = " ".join(
        f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}"
        for i, (x, y) in enumerate(zip(xs, ys, strict=True))
    )
    dots = "".join(
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" class="dot"><title>{m * step_s:g} s: '
        f"{v:,.4g}</title></circle>"
        for (m, v), x, y in zip(points, xs, ys, strict=True)
    )
    return (
        f'<figure class="small"><figcaption>{_e(title)} '
        f"({'max ' + _num(peak) if peak else 'none'})</figcaption>"
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img">'
        f'<line x1="20" y1="{height - 20}" x2="{width - 10}" y2="{height - 20}" class="axis"/>'
        f'<path d="{path}" class="line"/>{dots}'
        f'<text x="20" y="{height - 5}" class="lbl">0</text>'
        f'<text x="{width - 60}" y="{height - 5}" class="lbl">{(minutes - 1) * step_s:g} s</text>'
        "</svg></figure>"
    )


def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.4g}"


def _histogram(latencies: list[Any]) -> str:
    values = sorted(v for v in latencies if isinstance(v, (int, float)) and v > 0)
    if not values:
        return '<figure class="small"><figcaption>latency: none recorded</figcaption></figure>'
    p50 = values[len(values) // 2]
    p95 = values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]
    lo, hi = values[0], values[-1]
    bins = 20
    span = (hi - lo) or 1.0
    counts = Counter(min(bins - 1, int((v - lo) / span * bins)) for v in values)
    most = max(counts.values())
    width, height = 360, 120
    bars = "".join(
        f'<rect x="{20 + i * 16}" y="{height - 20 - 80 * counts[i] / most:.1f}" width="14" '
        f'height="{80 * counts[i] / most:.1f}" class="bar"><title>{counts[i]}</title></rect>'
        for i in range(bins)
    )
    marks = "".join(
        f'<line x1="{20 + 320 * (v - lo) / span:.1f}" y1="15" x2="{20 + 320 * (v - lo) / span:.1f}"'
        f' y2="{height - 20}" class="mark"/><text x="{22 + 320 * (v - lo) / span:.1f}" '
        f'y="{y}" class="lbl">{name} {v:.2f} s</text>'
        for name, v, y in (("p50", p50, 12), ("p95", p95, 26))
    )
    return (
        f'<figure class="small"><figcaption>latency (p50 {p50:.2f} s, p95 {p95:.2f} s)'
        f'</figcaption><svg class="chart" viewBox="0 0 {width} {height}" role="img">{bars}'
        f"{marks}</svg></figure>"
    )


def _failures(records: list[LedgerRecord]) -> str:
    groups: dict[str, list[LedgerRecord]] = defaultdict(list)
    for record in records:
        if record.get("status") != "ok":
            error: Any = record.get("error")
            groups[str(error.get("code") if isinstance(error, dict) else "error")].append(record)
    if not groups:
        return "<p>No failures.</p>"
    parts = []
    for code, failed in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        first: Any = failed[0].get("error")
        message = first.get("message") if isinstance(first, dict) else ""
        examples = "".join(
            f"<li><code>{_e(r['id'])}</code> (line {_e(r.get('line'))}): {_e(r.get('prompt'))}</li>"
            for r in failed[:EXAMPLES]
        )
        parts.append(
            f'<div class="failure" data-code="{_e(code)}"><h3><code>{_e(code)}</code> '
            f'<span class="count">{len(failed):,}</span></h3><p>{_e(message)}</p>'
            f"<ul>{examples}</ul></div>"
        )
    return "".join(parts)


def _js_text(value: Any) -> str:
    """A value as the page's script writes it (`String(v)`, JSON for objects)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _filters(rows: list[dict[str, Any]]) -> str:
    """A list for each field of few values, a text box (contains) for one of many."""

    def control(name: str, values: set[str]) -> str:
        label = _e(name if len(name) <= 40 else name[:39] + "…")
        if len(values) > MOST_OPTIONS:
            return (f'<label>{label} <input type="search" placeholder="contains" '
                    f'data-filter="{_e(name)}"></label>')  # fmt: skip
        opts = "".join(f'<option value="{_e(v)}">{_e(v[:60])}</option>' for v in sorted(values))
        return (
            f'<label>{label} <select data-filter="{_e(name)}"><option value="">all</option>'
            f"{opts}</select></label>"
        )

    def values(name: str) -> set[str]:
        return {_js_text(r.get(name)) for r in rows if r.get(name) is not None}

    keys = sorted({k for r in rows for k in r["metadata"]})[:MOST_KEYS]
    meta = "".join(
        control(f"metadata.{k}", {_js_text(r["metadata"][k]) for r in rows if k in r["metadata"]})
        for k in keys
    )
    return "".join(control(name, values(name)) for name in ("status", "model", "quality")) + meta


def _asset(name: str) -> str:
    """A file of the page's own (`report_assets/`): its template, style and script."""
    return resources.files("batchimg").joinpath(f"report_assets/{name}").read_text(encoding="utf-8")
