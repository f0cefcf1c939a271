"""The manifest: a JSONL file of prompts, streamed line by line and validated once.

Each non-blank line that does not start with `#` becomes either an `Item` (valid, ready to
send) or a `BadLine` (never sent; the engine records it as an `error` in the ledger with its line
number). Memory does not grow with the manifest's length beyond the compact id set.

Lines are judged by the catalog's rules for their model. What is worth knowing but refuses
nothing goes to the `warn` callback, once per cause: a model the catalog does not know (sent as
written, checked for structure only), a model shut down or about to be, a field dropped because
the API takes it only with other output formats, an experimental size.

Manifests repeat a few sets of options over many prompts, so a line is judged in two parts: its
`Shape` (every field but the prompt, id and metadata, with the defaults filled in), worked out
once for all the lines that share it, and its prompt. `survey_manifest` judges lines the same
way without handing out ids or building Items, for `validate` and `estimate`.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import stat
import sys
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from . import specs
from ._idset import IdSet, blake2b, count_lines
from .catalog import Catalog, today_utc
from .defaults import Defaults as Defaults  # re-exported: it lived here before `defaults`

if TYPE_CHECKING:
    from .inputs import InputFile

#: Keys a line may carry besides the API fields (which the catalog lists).
ITEM_KEYS = ("id", "metadata")
EDIT_KEYS = ("image", "mask", "endpoint")

MAX_FILE_STEM = 80
Warn = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Item:
    """One valid manifest line: what to send and where it came from."""

    id: str
    line: int
    params: dict[str, Any]
    metadata: Any = None
    endpoint: specs.Endpoint = "generations"
    images: tuple[InputFile, ...] = ()
    mask: InputFile | None = None

    @property
    def prompt(self) -> str:
        return str(self.params["prompt"])

    @property
    def model(self) -> str:
        return str(self.params["model"])

    @property
    def n(self) -> int:
        return int(self.params.get("n") or 1)

    @property
    def image_tokens(self) -> int:
        """Input tokens the edit's images will be billed as (0 for generations)."""
        return sum(f.input_tokens for f in self.images)

    @property
    def file_stem(self) -> str:
        return safe_file_stem(self.id)


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that cannot be sent, and why (the reason names the line number)."""

    id: str
    line: int
    reason: str
    prompt: str | None = None
    metadata: Any = None
    endpoint: specs.Endpoint = "generations"


_BOM = b"\xef\xbb\xbf"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_HASHED = re.compile(r"-[0-9a-f]{10}$")  # how a changed stem ends


def safe_file_stem(item_id: str) -> str:
    """A file-name stem for an id: no separators, `..`, control characters; length-capped.

    Distinct ids get distinct stems, also on filesystems that ignore case: an id is its own
    stem only when it is already safe, lower-case and not shaped like a changed stem (ending in
    `-` and ten hex digits); every other id keeps a readable part and gains a short hash of
    itself, which no id kept as it is can end in.
    """
    stem = _UNSAFE.sub("_", item_id).lstrip(".") or "_"
    stem = stem.replace("..", "_")
    if (
        stem == item_id
        and len(stem) <= MAX_FILE_STEM
        and item_id == item_id.lower()
        and not _HASHED.search(item_id)
    ):
        return stem
    digest = blake2b(item_id.encode("utf-8"), digest_size=5).hexdigest()
    return f"{stem[: MAX_FILE_STEM - 11]}-{digest}"


_BLAKE2B_8 = blake2b(digest_size=8)  # copied per id: cheaper than a new one's arguments


#: A line whose metadata nests deeper than orjson writes (254 levels): its ledger line could
#: not be written, so it is refused up front, by `validate` and `run` alike.
TOO_DEEP = "'metadata' is nested too deeply to be written to the ledger (at most 254 levels)"


def _writable(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


def _content_id(content: bytes, occurrence: int) -> str:
    h = _BLAKE2B_8.copy()
    h.update(content)
    h.update(b"\x00%d" % occurrence)
    return "i" + h.hexdigest()


#: What a derived id looks like (an explicit id of this shape may clash with one).
_DERIVED_ID = re.compile(r"i[0-9a-f]{16}")


class _Ids:
    """Hands out item ids and spots duplicate explicit ids."""

    derives = True  # whether lines without an explicit id get one (`derived`)

    def __init__(self, capacity: int = 1024, seeds: Iterable[str] = ()) -> None:
        self._seen = IdSet(capacity)
        for seed in seeds:  # ids an earlier part of the manifest holds (`Chunk.seeds`)
            self._seen.add(seed)
        #: Hears every id asked for that an earlier line holds (planning chunks).
        self.clash: Callable[[str], None] | None = None

    def _add(self, item_id: str) -> bool:
        if self._seen.add(item_id):
            return True
        if self.clash is not None:
            self.clash(item_id)
        return False

    def explicit(self, value: Any) -> str:
        if type(value) is str:  # the usual case first: no bool, no conversion
            item_id = value
        elif isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"'id' must be a string or an integer, got {type(value).__name__}")
        else:
            item_id = str(value)
        if not item_id or item_id.isspace():  # as `not item_id.strip()`, without a copy
            raise ValueError("'id' must not be empty")
        if not self.derives and len(item_id) == 17 and _DERIVED_ID.fullmatch(item_id):
            raise _LooksDerived(item_id)
        if not self._add(item_id):
            raise ValueError(f"duplicate id {item_id!r}: an earlier line already uses it")
        return item_id

    def derived(self, content: bytes) -> str:
        """A stable id from the line's content and how many identical lines came before it."""
        occurrence = 0
        while not self._add(item_id := _content_id(content, occurrence)):
            occurrence += 1
        return item_id

    def derived_of(self, obj: dict[str, Any], raw: bytes) -> str:
        """The derived id of a line that is a JSON object: from its content with sorted keys
        (from the line as written if it is nested deeper than orjson writes)."""
        try:
            content = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            content = raw
        return self.derived(content)


class _LooksDerived(Exception):
    """An explicit id shaped like a derived one: whether it is a duplicate depends on the
    derived ids of the lines before it."""


class _ExplicitIds(_Ids):
    """The ids of a survey, which hands none out: only explicit ids are kept, to catch one
    used twice. That holds while no explicit id can equal a derived one; at the first that
    might, `explicit` raises _LooksDerived and the survey replays the lines before it with
    every id (`_replayed`). The set is sized for the file's lines at the first explicit id:
    most manifests have none, and need not be read twice."""

    derives = False

    def __init__(self, path: str | Path) -> None:
        super().__init__(capacity=1)
        self._unsized: str | Path | None = path

    def _add(self, item_id: str) -> bool:
        if self._unsized is not None:
            self._seen, self._unsized = IdSet(count_lines(self._unsized)), None
        return self._seen.add(item_id)  # no `clash` to tell: that is for planning chunks

    def derived(self, content: bytes) -> str:
        return ""


def identify(ids: _Ids, raw: bytes) -> tuple[dict[str, Any] | None, str, str | None]:
    """A line's JSON object (None if it is not one), its id, and what is wrong with the line if
    that much already is: the one place ids are handed out, for reading and for planning."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return None, ids.derived(raw), f"not valid JSON ({exc})"
    return _identify_parsed(ids, raw, obj)


def _identify_parsed(
    ids: _Ids, raw: bytes, obj: Any
) -> tuple[dict[str, Any] | None, str, str | None]:
    """`identify` for a line that is valid JSON, parsed into `obj`."""
    if not isinstance(obj, dict):
        return None, ids.derived(raw), f"expected a JSON object, got {type(obj).__name__}"
    try:
        if "id" in obj:
            return obj, ids.explicit(obj["id"]), None
        return obj, ids.derived_of(obj, raw) if ids.derives else "", None
    except ValueError as exc:
        return obj, ids.derived(raw), str(exc)


class _Notices:
    """Sends each warning once (a million lines of one unknown model warn once)."""

    def __init__(self, catalog: Catalog, warn: Warn | None) -> None:
        self.catalog = catalog
        self.warn = warn
        self._seen: set[Any] = set()
        self._today = today_utc()

    def fresh(self, key: Any) -> bool:
        """True the first time `key` is seen (and only if anyone listens)."""
        if self.warn is None or key in self._seen:
            return False
        self._seen.add(key)
        return True

    def say(self, message: str) -> None:
        if self.warn is not None:
            self.warn(message)

    def model(self, model: str) -> None:
        if not self.fresh(("model", model)):
            return
        spec = self.catalog.spec(model)
        if not spec.known or spec.params is None:
            priced = "priced from the catalog" if spec.prices else "unpriced (cost null)"
            self.say(
                f"model {model!r} has no request rules in the catalog ({self.catalog.name}): "
                f"sent as written, with only field types, n and the WxH shape of sizes checked; "
                f"{priced}. Describe it with --catalog FILE."
            )
            return
        if not self.catalog.is_listed(model):
            self.say(
                f"model {model!r} is not a snapshot the catalog lists: checked with "
                f"{spec.name}'s rules and priced as {spec.name}"
            )
        note = spec.lifecycle_note(self._today, model)
        if note is not None:
            self.say(f"{note} (a gateway may still serve it)")


@dataclass(frozen=True)
class _ModelFacts:
    """What the loader needs to know of a model for every line, looked up once."""

    droppable: frozenset[str]  # fields dropped from requests of other output formats
    experimental_above: int | None  # sizes above this many pixels are experimental


@dataclass(eq=False)
class Shape:
    """The request a manifest line makes but for its prompt: what its other fields (id and
    metadata aside), the defaults and the catalog make of it. Lines that differ only in their
    prompts share one, judged once; each line's prompt is then checked against `verdict`."""

    endpoint: specs.Endpoint  # `edits` when the line has an `image`
    #: The request's fields, defaults filled, fields of other output formats dropped; the
    #: prompt's place held by "" (`request` fills it in).
    params: dict[str, Any]
    verdict: specs.Verdict | None  # None: refused whatever the prompt, for `refusal`
    refusal: str | None = None
    facts: _ModelFacts | None = None
    noticed: bool = False  # the model's warnings (if any) were given

    def request(self, prompt: str) -> dict[str, Any]:
        """The request of a line with this shape and `prompt`."""
        params = self.params.copy()
        params["prompt"] = prompt
        return params


@dataclass(frozen=True, slots=True)
class Refusal:
    """A bad line found by `survey_manifest` (which hands out no ids): as `BadLine` says it."""

    line: int
    reason: str


#: A good line found by `survey_manifest`: its shape, its prompt, and its edit inputs' tokens.
Surveyed = tuple[Shape, str, int]

_SHAPES_MAX = 4096  # distinct shapes remembered (a line with a field unique to it has its own)


class _Reader:
    """What parsing a line needs besides the line."""

    def __init__(
        self,
        ids: _Ids,
        defaults: Defaults | None,
        base_dir: Path,
        catalog: Catalog | None,
        warn: Warn | None,
    ) -> None:
        self.ids = ids
        self.defaults = defaults or Defaults()
        self.base_dir = base_dir
        self.catalog = catalog = catalog or Catalog.default()
        self.api_fields = catalog.api_fields()
        self.known_keys = frozenset(self.api_fields | set(ITEM_KEYS) | set(EDIT_KEYS))
        self.notices = _Notices(catalog, warn)
        self._facts: dict[str, _ModelFacts] = {}
        self._shapes: dict[bytes, Shape] = {}

    def parse(self, raw: bytes, number: int) -> Item | BadLine:
        obj, item_id, problem = identify(self.ids, raw)
        if obj is None:
            return BadLine(item_id, number, f"line {number}: {problem}")
        prompt: Any = obj.get("prompt")
        metadata = obj.get("metadata")
        shown = prompt if isinstance(prompt, str) else None
        if problem is not None:
            return BadLine(item_id, number, f"line {number}: {problem}", shown, metadata)
        judged = self.judge(obj, prompt)
        if isinstance(judged, Shape):
            params = judged.request(prompt)
            if judged.endpoint == "generations":
                return Item(item_id, number, params, metadata)
            try:
                images, mask = _edit_inputs(obj, params, self.base_dir, self.catalog)
            except specs.ParamError as exc:
                judged = str(exc)
            else:
                return Item(item_id, number, params, metadata, "edits", images, mask)
        endpoint: specs.Endpoint = "edits" if "image" in obj else "generations"
        if judged is TOO_DEEP:
            metadata = None  # kept out of the line that says so, which must be written
        return BadLine(item_id, number, f"line {number}: {judged}", shown, metadata, endpoint)

    def survey(self, path: str | Path) -> Iterator[Refusal | Surveyed]:
        """`parse` without ids or Items (see `survey_manifest`)."""
        with open(path, "rb") as fh:
            for number, raw in _entry_lines(fh, 1):
                try:
                    obj: Any = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    obj = None
                # The usual line (an object, with no id to keep) is judged at once.
                if type(obj) is not dict or "id" in obj or self.ids.derives:
                    obj, problem = self._identified(path, number, raw, obj)
                    if obj is None or problem is not None:
                        yield Refusal(number, f"line {number}: {problem}")
                        continue
                prompt: Any = obj.get("prompt")
                judged = self.judge(obj, prompt)
                if isinstance(judged, Shape):
                    if judged.endpoint == "generations":
                        yield judged, prompt, 0
                        continue
                    try:
                        images, _ = _edit_inputs(
                            obj, judged.request(prompt), self.base_dir, self.catalog
                        )
                    except specs.ParamError as exc:
                        judged = str(exc)
                    else:
                        yield judged, prompt, sum(f.input_tokens for f in images)
                        continue
                yield Refusal(number, f"line {number}: {judged}")

    def _identified(
        self, path: str | Path, number: int, raw: bytes, obj: Any
    ) -> tuple[dict[str, Any] | None, str | None]:
        """A surveyed line through `identify` (`obj`: the line parsed, None if not JSON): its
        object, and what is wrong with it. At an explicit id that may equal a derived one,
        the survey starts handing out every id, those of the lines before it first."""
        try:
            if obj is None:
                found, _, problem = identify(self.ids, raw)
            else:
                found, _, problem = _identify_parsed(self.ids, raw, obj)
        except _LooksDerived:
            self.ids = _replayed(path, number)  # which derives: no _LooksDerived again
            return self._identified(path, number, raw, obj)
        return found, problem

    def judge(self, obj: dict[str, Any], prompt: Any) -> Shape | str:
        """The line's shape if the line passes (edit inputs aside), else why it does not.
        `obj` is the line (its id handed out); its prompt, id and metadata are blanked, and
        what is left is the key its shape is remembered by."""
        if "prompt" in obj:
            obj["prompt"] = ""
        if "id" in obj:
            obj["id"] = ""
        if "metadata" in obj:
            if isinstance(obj["metadata"], (dict, list)) and not _writable(obj["metadata"]):
                return TOO_DEEP  # its ledger line could not be written
            obj["metadata"] = ""
        try:
            key = orjson.dumps(obj)  # the fields, in order, with their exact JSON types
        except orjson.JSONEncodeError:  # nested deeper than orjson writes
            shape = self._new_shape(obj)
        else:
            shape = self._shapes.get(key) or self._remember(key, self._new_shape(obj))
        verdict = shape.verdict
        if verdict is None:
            return str(shape.refusal)
        if not verdict.allows(prompt):
            try:
                verdict.check(prompt)
            except specs.ParamError as exc:
                return str(exc)
        if not shape.noticed:
            shape.noticed = True
            if shape.facts is not None:
                self._notice(shape.params, shape.facts)
        return shape

    def _remember(self, key: bytes, shape: Shape) -> Shape:
        if len(self._shapes) >= _SHAPES_MAX:
            del self._shapes[next(iter(self._shapes))]
        self._shapes[key] = shape
        return shape

    def _new_shape(self, obj: dict[str, Any]) -> Shape:
        endpoint: specs.Endpoint = "edits" if "image" in obj else "generations"
        if not self.known_keys.issuperset(obj):
            unknown = sorted(k for k in obj if k not in self.known_keys)
            names = ", ".join(repr(k) for k in unknown)
            refusal = f"unknown field(s) {names}; put your own data under 'metadata'"
            return Shape(endpoint, {}, None, refusal)
        try:
            _endpoint(obj)
        except specs.ParamError as exc:
            return Shape(endpoint, {}, None, str(exc))
        params = {k: v for k, v in obj.items() if k in self.api_fields and v is not None}
        self.defaults.fill(params, endpoint, self.catalog)
        model = params["model"]
        facts = self._model_facts(model) if isinstance(model, str) else None
        if facts is not None and not facts.droppable.isdisjoint(params):
            self._drop_format_bound_fields(params)
        verdict = specs.judge_options(params, endpoint, self.catalog)
        return Shape(endpoint, params, verdict, facts=facts)

    def _model_facts(self, model: str) -> _ModelFacts:
        facts = self._facts.get(model)
        if facts is None:
            spec = self.catalog.spec(model)
            size = spec.rule("size")
            custom = size.custom if size is not None else None
            facts = self._facts[model] = _ModelFacts(
                spec.droppable, custom.experimental_above_pixels if custom else None
            )
        return facts

    def _drop_format_bound_fields(self, params: dict[str, Any]) -> None:
        for name in specs.dropped_fields(params, self.catalog):
            value = params.pop(name)
            fmt = specs.output_format(params, self.catalog)
            if self.notices.fresh(("dropped", name, fmt)):
                self.notices.say(
                    f"'{name}' is sent only with the output formats that take it: left out of "
                    f"{fmt} requests (e.g. {name}={value!r})"
                )

    def _notice(self, params: dict[str, Any], facts: _ModelFacts) -> None:
        """The warnings a valid line's model and size call for (each given once)."""
        model = str(params["model"])
        self.notices.model(model)
        limit = facts.experimental_above
        size = params.get("size")
        if limit is None or not isinstance(size, str) or not specs.is_size(size):
            return
        width, height = specs.dimensions(size)
        if width * height > limit and self.notices.fresh(("experimental", model)):
            self.notices.say(
                f"{model}: sizes above {limit:,} pixels (e.g. {size}) are experimental at OpenAI"
            )


def _endpoint(obj: dict[str, Any]) -> specs.Endpoint:
    """`edits` when the line has `image` (or says so), else `generations`."""
    endpoint = obj.get("endpoint")
    if endpoint is None:
        if "mask" in obj and "image" not in obj:
            raise specs.ParamError("mask", "'mask' needs an 'image' to apply to")
        return "edits" if "image" in obj else "generations"
    if endpoint == "edits":
        if "image" not in obj:
            raise specs.ParamError("image", "'endpoint' is 'edits' but the line has no 'image'")
        return "edits"
    if endpoint == "generations":
        if "image" in obj or "mask" in obj:
            raise specs.ParamError("image", "'image' and 'mask' need 'endpoint': 'edits'")
        return "generations"
    raise specs.ParamError(
        "endpoint", f"'endpoint' must be 'generations' or 'edits', got {endpoint!r}"
    )


def _edit_inputs(
    obj: dict[str, Any], params: dict[str, Any], base_dir: Path, catalog: Catalog
) -> tuple[tuple[InputFile, ...], InputFile | None]:
    """Resolve, probe and check an edit line's `image` and `mask` files (ParamError if bad)."""
    from .inputs import MAX_EDIT_IMAGES, check_edit_inputs, load_input  # edit lines only

    given = obj["image"]
    names = [given] if isinstance(given, str) else given
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise specs.ParamError("image", "'image' must be a path or a non-empty list of paths")
    if len(names) > MAX_EDIT_IMAGES:
        raise specs.ParamError("image", f"{len(names)} input images; at most {MAX_EDIT_IMAGES}")
    mask_name = obj.get("mask")
    if mask_name is not None and (not isinstance(mask_name, str) or not mask_name):
        raise specs.ParamError("mask", "'mask' must be a path")
    fmt = specs.output_format(params, catalog)
    constraint = catalog.spec(str(params["model"])).formats.get(fmt)
    if mask_name is not None and constraint is not None and not constraint.mask:
        raise specs.ParamError("mask", f"{fmt} output does not take a mask")
    loaded = [load_input(name, base_dir) for name in names]
    mask = load_input(mask_name, base_dir) if mask_name else None
    check_edit_inputs(
        [info for _, info in loaded], mask[1] if mask else None, str(params["model"]), catalog
    )
    return tuple(f for f, _ in loaded), (mask[0] if mask else None)


def read_manifest(
    path: str | Path,
    defaults: Defaults | None = None,
    *,
    catalog: Catalog | None = None,
    warn: Warn | None = None,
    inputs_dir: Path | None = None,
) -> Iterator[Item | BadLine]:
    """Stream a JSONL manifest: one Item or BadLine per non-blank, non-comment line, judged by
    `catalog` (the built-in one by default); `warn` hears each warning once. Edit inputs are
    relative to `inputs_dir` (default: the manifest's directory).

    Raises OSError if the file cannot be opened; every problem inside the file is a BadLine.
    """
    ids = _Ids(count_lines(path))  # sized up front: the id set never has to grow
    reader = _Reader(ids, defaults, inputs_dir or Path(path).resolve().parent, catalog, warn)
    for number, raw in manifest_lines(path):
        yield reader.parse(raw, number)


def survey_manifest(
    path: str | Path,
    defaults: Defaults | None = None,
    *,
    catalog: Catalog | None = None,
    warn: Warn | None = None,
    inputs_dir: Path | None = None,
) -> Iterator[Refusal | Surveyed]:
    """Judge every line as `read_manifest` does, with the same warnings, for `validate` and
    `estimate`: a Refusal for each bad line, and for each good one its Shape, prompt and edit
    inputs' tokens. No ids are handed out and no Items built, so it keeps up with a bare parse
    of the file. Raises OSError if the file cannot be opened."""
    regular = stat.S_ISREG(os.stat(path).st_mode)
    # Only explicit ids are kept, unless one may clash with a derived id: then the lines
    # before it are read again, so a pipe (read once) keeps every id from the start.
    ids = _ExplicitIds(path) if regular else _Ids(count_lines(path))
    reader = _Reader(ids, defaults, inputs_dir or Path(path).resolve().parent, catalog, warn)
    return reader.survey(path)


def _replayed(path: str | Path, before: int) -> _Ids:
    """Every id the lines of a manifest before line `before` hand out."""
    ids = _Ids(count_lines(path))
    for number, raw in manifest_lines(path):
        if number >= before:
            break
        identify(ids, raw)
    return ids


def manifest_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(line number, stripped content) of every line that is not blank or a `#` comment; a
    UTF-8 byte-order mark before the first line is not part of it."""
    with open(path, "rb") as fh:
        yield from _entry_lines(fh, 1)


def _entry_lines(lines: Iterable[bytes], first: int) -> Iterator[tuple[int, bytes]]:
    for number, line in enumerate(lines, start=first):
        raw = line.strip()
        if number == 1:
            raw = raw.removeprefix(_BOM).strip()
        if raw and raw[0] != 0x23:  # `_entry`, inline: this runs for every line
            yield number, raw


def _entry(line: bytes, number: int) -> bytes:
    """A line's content, or b"" for a blank or comment line."""
    raw = line.strip()
    if number == 1:
        raw = raw.removeprefix(_BOM).strip()
    return b"" if raw.startswith(b"#") else raw


@dataclass(frozen=True)
class Chunk:
    """A run of whole manifest lines, read apart from the rest (by the workers of a Ray run):
    bytes `start` to `end`, the first of them line `first_line`."""

    index: int
    start: int
    end: int
    first_line: int
    entries: int  # lines that are items (not blank, not comments)
    done: int = 0  # of those, items already done when the chunk was planned
    #: Ids earlier chunks hold that this chunk's lines asked for (a repeated line's earlier
    #: copies, an id used twice): read with these, its lines get the ids a whole read gives.
    seeds: tuple[str, ...] = ()


def plan_chunks(
    path: str | Path, lines_per_chunk: int, done: Container[str] = frozenset()
) -> Iterator[Chunk]:
    """Split the manifest into chunks of `lines_per_chunk` items, streamed (one pass, memory
    for the id set only); `done` ids are counted in each chunk's `done`."""
    ids = _Ids(count_lines(path))
    here: set[str] = set()
    seeds: list[str] = []
    ids.clash = lambda item_id: None if item_id in here else seeds.append(item_id)
    index = start = entries = already = 0
    first = 1
    offset = 0
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            offset += len(line)
            raw = _entry(line, number)
            if raw:
                _, item_id, _ = identify(ids, raw)
                here.add(item_id)
                entries += 1
                already += item_id in done
            if entries == lines_per_chunk:
                yield Chunk(index, start, offset, first, entries, already, tuple(seeds))
                index, start, first, entries, already = index + 1, offset, number + 1, 0, 0
                here.clear()
                seeds.clear()
    if entries:
        yield Chunk(index, start, offset, first, entries, already, tuple(seeds))


def read_chunk(
    data: bytes,
    chunk: Chunk,
    defaults: Defaults | None = None,
    *,
    catalog: Catalog | None = None,
    warn: Warn | None = None,
    inputs_dir: Path,
) -> Iterator[Item | BadLine]:
    """A chunk's items (`data`: its bytes), with the ids and line numbers a whole read of the
    manifest gives them."""
    ids = _Ids(chunk.entries + len(chunk.seeds) + 16, chunk.seeds)
    reader = _Reader(ids, defaults, inputs_dir, catalog, warn)
    for number, raw in _entry_lines(io.BytesIO(data), chunk.first_line):
        yield reader.parse(raw, number)


@contextlib.contextmanager
def materialized(path: str | Path) -> Iterator[tuple[Path, Path]]:
    """The manifest as a regular file that can be read more than once (the loader, the line
    count, the model survey each read it), and the directory its edit inputs are relative to.

    `-` is standard input, and a pipe (`/dev/stdin`, a FIFO) is read once: either is copied to
    a temporary file first, its edit inputs taken relative to the current directory (stdin) or
    the pipe's. Anything else is used as it is: a regular file, and what is not a manifest at
    all (missing, unreadable, a directory), which the caller's check then names.
    """
    if str(path) != "-":
        given = Path(path)
        try:
            mode = given.stat().st_mode
            piped = stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)
        except OSError:
            piped = False  # missing or unreadable: opening it says why
        if not piped:
            yield given, given.resolve().parent
            return
    import shutil  # with tempfile: only a piped manifest needs them (`--help` does not)
    import tempfile

    source_dir = Path.cwd() if str(path) == "-" else Path(path).resolve().parent
    with tempfile.TemporaryDirectory(prefix="batchimg-manifest-") as tmp:
        copy = Path(tmp) / "manifest.jsonl"
        with open(copy, "wb") as out:
            if str(path) == "-":
                shutil.copyfileobj(sys.stdin.buffer, out, 1 << 20)
            else:
                with open(path, "rb") as source:
                    shutil.copyfileobj(source, out, 1 << 20)
        yield copy, source_dir


_MODEL_FIELD = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')


def manifest_models(path: str | Path, default_model: str) -> dict[str, int]:
    """Every model a manifest uses, with the first line that uses it (lines that name none use
    `default_model`). One pass; a line is parsed only when it may add a model, so this stays
    cheap on a million lines, and a `"model"` key inside `metadata` is not mistaken for one."""
    found: dict[str, int] = {}
    for number, raw in manifest_lines(path):
        candidates = _MODEL_FIELD.findall(raw)
        # A key written with escapes ("mod\u0065l") hides from the pattern: parse those.
        escaped = b"\\u" in raw
        if not candidates and not escaped:
            found.setdefault(default_model, number)
            continue
        if (
            not escaped
            and default_model in found
            and all(c.decode("utf-8", "replace") in found for c in candidates)
        ):
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue  # a bad line: it fails alone, and sends nothing
        if isinstance(obj, dict):
            model = obj.get("model")
            model = default_model if model is None else model
            if isinstance(model, str):
                found.setdefault(model, number)
    return found
