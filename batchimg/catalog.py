"""The catalog: every image model batchimg knows, as data (`catalog.json`, named and dated).

Per model: its names (aliases and dated snapshots), lifecycle (status, shutdown date, the
replacement OpenAI names), endpoints, request rules per parameter, edit input limits, token
accounting (a published table, per-image prices, or "learned" from answers) and prices. The
rules engine (`specs`) and the prices (`pricing`) only read it.

A model entry may `extend` another: it starts from that entry's rules and prices (not its names,
lifecycle or token accounting, which are each model's own facts) and replaces what it lists;
`params` are replaced one parameter at a time, and a parameter set to null is removed.
`--catalog FILE` overlays a file of the same shape the same way (a model it names is merged into
the built-in entry, `tokens` one key at a time; a new one is added);
`--prices FILE` replaces whole `prices` objects.

A model the catalog does not know is not an error: `spec()` gives it structural rules only
(field types, `n`, the `WxH` shape of a size), no token counts and no prices, so the next model
OpenAI ships runs on the day it ships. A dated name (`MODEL-YYYY-MM-DD`) of a known model uses
that model's entry.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import UsageError

CATALOG_FILE = "catalog.json"
TOKEN_KINDS = ("text_in", "text_in_cached", "image_in", "image_in_cached", "image_out")
FIELD_TYPES = ("string", "integer", "size", "object")
TokenBasis = Literal["table", "per_image_price", "learned", "none", "unknown"]
Status = Literal["active", "deprecated", "shutdown", "unknown"]
#: Keys an entry does not pass on to the entries that extend it.
#: Token accounting is a fact of each model, not of the one it extends: a model that inherited
#: another's ceiling could exceed it, and the cap would not hold.
_OWN_KEYS = (
    "aliases", "snapshots", "status", "released", "shutdown_date", "replacement", "notes",
    "tokens",
)  # fmt: skip
_MODEL_KEYS = frozenset(
    {*_OWN_KEYS, "extends", "endpoints", "params", "formats", "edits", "tokens", "prices"}
)
_PARAM_KEYS = frozenset(
    {"values", "min", "max", "default", "endpoints", "formats", "other_formats", "max_chars",
     "custom", "auto", "transparent_formats"}
)  # fmt: skip
_SNAPSHOT = re.compile(r"(?P<model>.+)-(?P<date>\d{4}-\d{2}-\d{2})")  # used with fullmatch
ENDPOINTS = ("generations", "edits", "batch")


@dataclass(frozen=True)
class SizeRule:
    """Custom `WIDTHxHEIGHT` sizes a model takes besides its listed ones."""

    multiple_of: int = 1
    min_ratio: float | None = None  # width / height
    max_ratio: float | None = None
    max_edge: int | None = None
    min_edge: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    experimental_above_pixels: int | None = None


@dataclass(frozen=True)
class ParamRule:
    """What a model accepts for one request parameter (absent keys: no constraint)."""

    values: tuple[str, ...] | None = None
    min: int | None = None
    max: int | None = None
    default: Any = None  # what the API uses when the field is left out
    endpoints: tuple[str, ...] | None = None  # only on these endpoints
    formats: tuple[str, ...] | None = None  # only with these output formats ...
    drop_other_formats: bool = False  # ... else dropped from the request, not refused
    max_chars: int | None = None  # prompt length
    custom: SizeRule | None = None  # sizes beyond `values`
    auto_estimate: str | None = None  # what `auto` is taken to be for an estimate
    auto_range: tuple[str, ...] = ()  # what `auto` may turn out to be (the cap takes the dearest)
    transparent_formats: tuple[str, ...] | None = None  # background


@dataclass(frozen=True)
class SheetRule:
    """An animated format's frames are drawn as one sprite sheet, which must fit the bounds.

    `grids` rows are (fewest frames, most frames, columns, rows) of the sheet's cells.
    """

    grids: tuple[tuple[int, int, int, int], ...]
    max_pixels: int | None = None
    max_edge: int | None = None
    min_pixels: int | None = None

    def cells(self, frames: int) -> tuple[int, int] | None:
        for low, high, cols, rows in self.grids:
            if low <= frames <= high:
                return cols, rows
        return None


@dataclass(frozen=True)
class FormatRule:
    """Constraints that come with one output format."""

    max_n: int | None = None
    mask: bool = True  # False: edits with a mask cannot ask for this format
    sheet: SheetRule | None = None  # animated: the frames' sheet replaces the pixel bounds


@dataclass(frozen=True)
class EditLimits:
    """What the edits endpoint takes as input images and mask."""

    max_images: int = 16
    image_formats: tuple[str, ...] = ("png", "jpeg", "webp")
    max_image_bytes: int = 50 * 1024 * 1024
    mask_max_bytes: int = 4 * 1024 * 1024
    square: bool = False


@dataclass(frozen=True)
class TokenRule:
    """How a model's output tokens are known before an answer arrives."""

    output: TokenBasis = "unknown"
    per_image: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (quality, size)
    #: A bound on one image's output tokens, per megapixel and per frame, by quality.
    ceiling_per_megapixel: Mapping[str, float] = field(default_factory=dict)
    partial_image: int = 0

    def ceiling_for(self, quality: str) -> float | None:
        """The bound for a quality (None: the table does not name it, or there is none)."""
        table = self.ceiling_per_megapixel
        return table.get(quality, table.get("*"))


@dataclass(frozen=True)
class ModelPrices:
    """One model's prices: per 1M tokens of each kind, and/or per image by (quality, size)."""

    per_1m_tokens: Mapping[str, float] | None = None
    per_image: Mapping[tuple[str, str], float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    """One model's entry, with `extends` resolved. `params` is None when its rules are unknown."""

    name: str
    known: bool = True  # False: made up for a name the catalog does not know
    status: Status = "unknown"
    released: str | None = None
    shutdown_date: dt.date | None = None
    replacement: tuple[str, ...] = ()
    names: tuple[str, ...] = ()  # aliases and snapshots
    endpoints: tuple[str, ...] = ENDPOINTS
    params: Mapping[str, ParamRule] | None = None
    formats: Mapping[str, FormatRule] = field(default_factory=dict)
    edits: EditLimits | None = None
    tokens: TokenRule = field(default_factory=TokenRule)
    prices: ModelPrices | None = None
    notes: str = ""

    def rule(self, name: str) -> ParamRule | None:
        return None if self.params is None else self.params.get(name)

    @functools.cached_property
    def droppable(self) -> frozenset[str]:
        """Fields left out of requests whose output format does not take them."""
        rules = self.params or {}
        return frozenset(n for n, r in rules.items() if r.drop_other_formats and r.formats)

    def default(self, name: str) -> Any:
        rule = self.rule(name)
        return None if rule is None else rule.default

    def status_on(self, today: dt.date) -> Status:
        """`shutdown` once the shutdown date has come, `deprecated` while it is announced."""
        if self.shutdown_date is not None:
            return "shutdown" if today >= self.shutdown_date else "deprecated"
        return self.status

    def lifecycle_note(self, today: dt.date, name: str | None = None) -> str | None:
        """A sentence for a model that is shut down or has a date announced (`name`: as the
        manifest wrote it, a snapshot say); None otherwise."""
        status = self.status_on(today)
        if status not in ("shutdown", "deprecated") or self.shutdown_date is None:
            return None
        when = self.shutdown_date.isoformat()
        said = f"was shut down on {when}" if status == "shutdown" else f"shuts down on {when}"
        use = (
            f"use {' or '.join(self.replacement)} instead"
            if self.replacement
            else "use a current GPT image model instead (`batchimg models` lists them)"
        )
        return f"model {name or self.name} {said} at OpenAI; {use}"


def _fail(source: str, where: str, what: str) -> UsageError:
    return UsageError(f"{source}: {where}: {what}")


def _strings(value: Any, source: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(source, where, "must be a list of strings")
    return tuple(value)


def _int(value: Any, source: str, where: str, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _fail(source, where, "must be a whole number >= 0")
    return value


def _is_amount(value: Any) -> bool:
    """A finite number >= 0 (not a bool, not NaN or Infinity, which JSON parsers accept)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _number(value: Any, source: str, where: str, *, positive: bool = False) -> float | None:
    if value is None:
        return None
    if not _is_amount(value) or (positive and value == 0):
        raise _fail(source, where, f"must be a finite number {'> 0' if positive else '>= 0'}")
    return float(value)


def _parse_size_rule(raw: Any, source: str, where: str) -> SizeRule:
    if not isinstance(raw, dict):
        raise _fail(source, where, "must be an object")
    known = {f for f in SizeRule.__dataclass_fields__}
    unknown = set(raw) - known
    if unknown:
        raise _fail(source, where, f"unknown key(s) {', '.join(sorted(unknown))}")
    ints = {k: _int(raw.get(k), source, f"{where}.{k}") for k in known if "ratio" not in k}
    return SizeRule(
        multiple_of=ints["multiple_of"] or 1,
        min_ratio=_number(raw.get("min_ratio"), source, f"{where}.min_ratio"),
        max_ratio=_number(raw.get("max_ratio"), source, f"{where}.max_ratio"),
        max_edge=ints["max_edge"],
        min_edge=ints["min_edge"],
        min_pixels=ints["min_pixels"],
        max_pixels=ints["max_pixels"],
        experimental_above_pixels=ints["experimental_above_pixels"],
    )


def _parse_edits(raw: Any, source: str, where: str) -> EditLimits:
    if not isinstance(raw, dict) or set(raw) - set(EditLimits.__dataclass_fields__):
        raise _fail(source, where, "takes " + ", ".join(EditLimits.__dataclass_fields__))
    default = EditLimits()
    square = raw.get("square", False)
    if not isinstance(square, bool):
        raise _fail(source, f"{where}.square", "must be true or false")

    def count(key: str, fallback: int) -> int:
        value = _int(raw.get(key), source, f"{where}.{key}")
        return fallback if value is None else value

    return EditLimits(
        max_images=count("max_images", default.max_images),
        image_formats=_strings(
            raw.get("image_formats", list(default.image_formats)), source, f"{where}.image_formats"
        ),
        max_image_bytes=count("max_image_bytes", default.max_image_bytes),
        mask_max_bytes=count("mask_max_bytes", default.mask_max_bytes),
        square=square,
    )


def _parse_sheet(raw: Any, source: str, where: str) -> SheetRule:
    if not isinstance(raw, dict) or set(raw) - {"grids", "max_pixels", "max_edge", "min_pixels"}:
        raise _fail(source, where, "takes grids, max_pixels, max_edge and min_pixels")
    grids = raw.get("grids")
    if not isinstance(grids, list) or not all(
        isinstance(g, list)
        and len(g) == 4
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in g)
        for g in grids
    ):
        raise _fail(
            source, f"{where}.grids", "must be a list of [min frames, max frames, cols, rows]"
        )
    if any(g[0] > g[1] for g in grids):
        raise _fail(source, f"{where}.grids", "a row's fewest frames must not exceed its most")
    return SheetRule(
        grids=tuple((g[0], g[1], g[2], g[3]) for g in grids),
        max_pixels=_int(raw.get("max_pixels"), source, f"{where}.max_pixels"),
        max_edge=_int(raw.get("max_edge"), source, f"{where}.max_edge"),
        min_pixels=_int(raw.get("min_pixels"), source, f"{where}.min_pixels"),
    )


_WXH = re.compile(r"[1-9][0-9]{0,5}x[1-9][0-9]{0,5}")


def _check_size_auto(rule: ParamRule, source: str, where: str) -> ParamRule:
    """A size rule's `auto` must name real sizes: estimates and bounds are computed from them."""
    for size in (*([rule.auto_estimate] if rule.auto_estimate else []), *rule.auto_range):
        if not _WXH.fullmatch(size):
            raise _fail(source, f"{where}.auto", f"{size!r} is not a WIDTHxHEIGHT size")
    return rule


def _parse_param(raw: Any, source: str, where: str) -> ParamRule:
    if not isinstance(raw, dict):
        raise _fail(source, where, "must be an object ({} for 'any value of its type')")
    unknown = set(raw) - _PARAM_KEYS
    if unknown:
        raise _fail(source, where, f"unknown key(s) {', '.join(sorted(unknown))}")
    auto = raw.get("auto") or {}
    if (
        not isinstance(auto, dict)
        or set(auto) - {"estimate", "range"}
        or not isinstance(auto.get("estimate", ""), str)
    ):
        raise _fail(source, f"{where}.auto", "must be an object with 'estimate' (a value) and "
                    "'range' (a list of values)")  # fmt: skip
    other = raw.get("other_formats", "refuse")
    if other not in ("refuse", "drop"):
        raise _fail(source, f"{where}.other_formats", "must be 'refuse' or 'drop'")

    def opt_strings(key: str, value: Any) -> tuple[str, ...] | None:
        return None if value is None else _strings(value, source, f"{where}.{key}")

    return ParamRule(
        values=opt_strings("values", raw.get("values")),
        min=_int(raw.get("min"), source, f"{where}.min"),
        max=_int(raw.get("max"), source, f"{where}.max"),
        default=raw.get("default"),
        endpoints=opt_strings("endpoints", raw.get("endpoints")),
        formats=opt_strings("formats", raw.get("formats")),
        drop_other_formats=other == "drop",
        max_chars=_int(raw.get("max_chars"), source, f"{where}.max_chars"),
        custom=_parse_size_rule(raw["custom"], source, f"{where}.custom")
        if raw.get("custom") is not None
        else None,
        auto_estimate=auto.get("estimate"),
        auto_range=_strings(auto.get("range") or [], source, f"{where}.auto.range"),
        transparent_formats=opt_strings("transparent_formats", raw.get("transparent_formats")),
    )


def _by_quality_and_size(
    raw: Any, source: str, where: str, what: str
) -> dict[tuple[str, str], float]:
    """A `{quality: {size: number >= 0}}` table, keyed by (quality, size)."""
    table: dict[tuple[str, str], float] = {}
    if raw is None:
        return table
    if not isinstance(raw, dict):
        raise _fail(source, where, f"must map qualities to {{size: {what}}}")
    for quality, sizes in raw.items():
        if not isinstance(sizes, dict):
            raise _fail(source, f"{where}.{quality}", f"must map sizes to a {what} each")
        for size, value in sizes.items():
            if not _is_amount(value):
                raise _fail(source, f"{where}.{quality}.{size}", f"must be a finite {what} >= 0")
            table[(quality, size)] = float(value)
    return table


def parse_prices(raw: Any, source: str, where: str) -> ModelPrices:
    """A `prices` object: `per_1m_tokens` (text_in and image_out required) and/or `per_image`."""
    if not isinstance(raw, dict):
        raise _fail(source, where, "must be an object")
    tokens = raw.get("per_1m_tokens")
    if tokens is not None:
        if not isinstance(tokens, dict) or not all(
            k in TOKEN_KINDS and _is_amount(v) for k, v in tokens.items()
        ):
            kinds = ", ".join(TOKEN_KINDS)
            raise _fail(source, f"{where}.per_1m_tokens", f"takes numbers >= 0 for: {kinds}")
        missing = [k for k in ("text_in", "image_out") if k not in tokens]
        if missing:
            raise _fail(source, f"{where}.per_1m_tokens", f"needs {', '.join(missing)}")
        tokens = {k: float(v) for k, v in tokens.items()}
    per_image = _by_quality_and_size(raw.get("per_image"), source, f"{where}.per_image", "price")
    if tokens is None and not per_image:
        raise _fail(source, where, "has neither per_1m_tokens nor per_image")
    return ModelPrices(per_1m_tokens=tokens, per_image=per_image)


def _parse_tokens(raw: Any, source: str, where: str) -> TokenRule:
    if not isinstance(raw, dict):
        raise _fail(source, where, "must be an object")
    output = raw.get("output", "unknown")
    if output not in ("table", "per_image_price", "learned", "none", "unknown"):
        raise _fail(
            source, f"{where}.output", "must be table, per_image_price, learned, none or unknown"
        )
    counts = _by_quality_and_size(raw.get("per_image"), source, f"{where}.per_image", "count")
    if any(not v.is_integer() for v in counts.values()):
        raise _fail(source, f"{where}.per_image", "token counts must be whole numbers")
    per_image = {key: int(value) for key, value in counts.items()}
    if output == "table" and not per_image:
        raise _fail(source, where, "output 'table' needs a per_image table")
    return TokenRule(
        output=output,
        per_image=per_image,
        ceiling_per_megapixel=_ceilings(raw.get("ceiling_per_megapixel"), source, where),
        partial_image=_int(raw.get("partial_image"), source, f"{where}.partial_image") or 0,
    )


def _ceilings(raw: Any, source: str, where: str) -> dict[str, float]:
    """`ceiling_per_megapixel`: one number for every quality, or `{quality: number}` (a quality
    it does not name has no ceiling: the cap cannot bound it before an answer is known)."""
    where = f"{where}.ceiling_per_megapixel"
    if raw is None:
        return {}
    if isinstance(raw, dict):
        ceilings = {}
        for quality, value in raw.items():
            number = _number(value, source, f"{where}.{quality}", positive=True)
            if number is None:
                raise _fail(source, f"{where}.{quality}", "must be a finite number > 0")
            ceilings[str(quality)] = number
        return ceilings
    number = _number(raw, source, where, positive=True)
    return {"*": number} if number is not None else {}


def _text(raw: Any, source: str, where: str) -> str:
    if raw is not None and not isinstance(raw, str):
        raise _fail(source, where, "must be a string")
    return raw or ""


def _endpoints(raw: Any, source: str, where: str) -> tuple[str, ...]:
    if raw is None:
        return ENDPOINTS
    names = _strings(raw, source, where)
    unknown = set(names) - set(ENDPOINTS)
    if unknown:
        raise _fail(source, where, f"unknown endpoint(s) {', '.join(sorted(unknown))}")
    return names


def _date_text(value: Any, source: str, where: str) -> str | None:
    date = _date(value, source, where)
    return None if date is None else date.isoformat()


def _date(value: Any, source: str, where: str) -> dt.date | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(source, where, f"{value!r} is not a YYYY-MM-DD date")
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise _fail(source, where, f"{value!r} is not a YYYY-MM-DD date") from None


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: keys replaced, except `params`, `formats` and `tokens`, which
    are merged one entry at a time (an entry set to null is removed)."""
    merged = dict(base)
    for key, value in over.items():
        if key in ("params", "formats", "tokens") and isinstance(value, dict):
            inner = dict(merged.get(key) or {})
            for name, rule in value.items():
                if rule is None:
                    inner.pop(name, None)
                else:
                    inner[name] = rule
            merged[key] = inner
        else:
            merged[key] = value
    return merged


class Catalog:
    """The models, their rules and prices; look names up with `spec()` (never fails)."""

    def __init__(self, data: Mapping[str, Any], source: str) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise UsageError(f"{source}: a catalog is an object with a 'models' object")
        self._data: dict[str, Any] = copy.deepcopy(dict(data))
        self.source = source
        for key in ("name", "date", "default_model", "source", "currency"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise _fail(source, key, "must be a string")
        self.name = str(data.get("name") or Path(source).stem)
        self.date = str(data.get("date") or "")
        self.default_model = str(data.get("default_model") or "")
        multiplier = _number(data.get("batch_multiplier", 0.5), source, "batch_multiplier")
        self.batch_multiplier = 0.5 if multiplier is None else multiplier
        self.fields = self._parse_fields(data.get("fields") or {})
        raw_models: dict[str, Any] = data["models"]
        self.models: dict[str, ModelSpec] = {}
        self._names: dict[str, str] = {}
        for name in raw_models:
            spec = self._build(name, raw_models, ())
            self.models[name] = spec
            for alias in (name, *spec.names):
                other = self._names.setdefault(alias, name)
                if other != name:
                    raise _fail(source, f"models.{name}", f"name {alias!r} is also {other}'s")
        self._unknown: dict[str, ModelSpec] = {}
        self._specs: dict[str, ModelSpec] = {}  # `spec` by name, as found once
        self._memos: dict[object, dict[Any, Any]] = {}
        self.rule_cache: dict[Any, Any] = {}  # the rules engine's memo (see specs)

    def _parse_fields(self, raw: Any) -> dict[str, tuple[str, ParamRule]]:
        if not isinstance(raw, dict):
            raise _fail(self.source, "fields", "must be an object")
        fields: dict[str, tuple[str, ParamRule]] = {}
        for name, entry in raw.items():
            if not isinstance(entry, dict) or entry.get("type") not in FIELD_TYPES:
                raise _fail(self.source, f"fields.{name}", f"needs a type: {FIELD_TYPES}")
            rest = {k: v for k, v in entry.items() if k != "type"}
            fields[name] = (entry["type"], _parse_param(rest, self.source, f"fields.{name}"))
        return fields

    def _effective(
        self, name: str, raw_models: Mapping[str, Any], chain: tuple[str, ...]
    ) -> dict[str, Any]:
        raw = raw_models[name]
        where = f"models.{name}"
        if not isinstance(raw, dict):
            raise _fail(self.source, where, "must be an object")
        unknown = set(raw) - _MODEL_KEYS
        if unknown:
            raise _fail(self.source, where, f"unknown key(s) {', '.join(sorted(unknown))}")
        parent = raw.get("extends")
        if parent is None:
            return dict(raw)
        if not isinstance(parent, str):
            raise _fail(self.source, f"{where}.extends", "must be the name of another model")
        if parent not in raw_models:
            raise _fail(self.source, f"{where}.extends", f"no model {parent!r} to extend")
        if parent in chain:
            raise _fail(self.source, f"{where}.extends", "entries extend each other in a loop")
        inherited = {
            k: v
            for k, v in self._effective(parent, raw_models, (*chain, name)).items()
            if k not in _OWN_KEYS
        }
        return _merge(inherited, {k: v for k, v in raw.items() if k != "extends"})

    def _parse_params(self, raw: dict[str, Any], where: str) -> dict[str, ParamRule]:
        rules = {
            name: _parse_param(rule, self.source, f"{where}.{name}") for name, rule in raw.items()
        }
        if "size" in rules:
            _check_size_auto(rules["size"], self.source, f"{where}.size")
        return rules

    def _build(self, name: str, raw_models: Mapping[str, Any], chain: tuple[str, ...]) -> ModelSpec:
        raw = self._effective(name, raw_models, chain)
        src, where = self.source, f"models.{name}"
        params = raw.get("params")
        if params is not None and not isinstance(params, dict):
            raise _fail(src, f"{where}.params", "must be an object")
        formats_raw = raw.get("formats") or {}
        if not isinstance(formats_raw, dict):
            raise _fail(src, f"{where}.formats", "must map output formats to constraints")
        formats: dict[str, FormatRule] = {}
        for fmt, rule in formats_raw.items():
            at = f"{where}.formats.{fmt}"
            if not isinstance(rule, dict) or set(rule) - {"max_n", "mask", "sheet"}:
                raise _fail(src, at, "takes max_n, mask and sheet")
            if not isinstance(rule.get("mask", True), bool):
                raise _fail(src, f"{at}.mask", "must be true or false")
            formats[fmt] = FormatRule(
                max_n=_int(rule.get("max_n"), src, f"{at}.max_n"),
                mask=rule.get("mask", True),
                sheet=_parse_sheet(rule["sheet"], src, f"{at}.sheet") if "sheet" in rule else None,
            )
        edits_raw = raw.get("edits")
        edits = None if edits_raw is None else _parse_edits(edits_raw, src, f"{where}.edits")
        status = raw.get("status", "active")
        if status not in ("active", "deprecated", "shutdown"):
            raise _fail(src, f"{where}.status", "must be active, deprecated or shutdown")
        prices_raw = raw.get("prices")
        return ModelSpec(
            name=name,
            status=status,
            released=_date_text(raw.get("released"), src, f"{where}.released"),
            shutdown_date=_date(raw.get("shutdown_date"), src, f"{where}.shutdown_date"),
            replacement=_strings(raw.get("replacement") or [], src, f"{where}.replacement"),
            names=_strings(raw.get("aliases") or [], src, f"{where}.aliases")
            + _strings(raw.get("snapshots") or [], src, f"{where}.snapshots"),
            endpoints=_endpoints(raw.get("endpoints"), src, f"{where}.endpoints"),
            params=None if params is None else self._parse_params(params, f"{where}.params"),
            formats=formats,
            edits=edits,
            tokens=_parse_tokens(raw.get("tokens") or {}, src, f"{where}.tokens"),
            prices=None if prices_raw is None else parse_prices(prices_raw, src, f"{where}.prices"),
            notes=_text(raw.get("notes"), src, f"{where}.notes"),
        )

    # -- lookups --

    def lookup(self, name: str) -> ModelSpec | None:
        """The entry for a model name, alias or snapshot (also an unlisted dated snapshot)."""
        canonical = self._names.get(name)
        if canonical is None and (match := _SNAPSHOT.fullmatch(name)) is not None:
            try:
                dt.date.fromisoformat(match.group("date"))
            except ValueError:
                return None  # not a date: not a snapshot
            canonical = self._names.get(match.group("model"))
        return None if canonical is None else self.models[canonical]

    def is_listed(self, name: str) -> bool:
        """Whether `name` is a model, alias or snapshot the catalog names itself."""
        return name in self._names

    def memo(self, kind: object) -> dict[Any, Any]:
        """A dict of this catalog's own for facts derived from it, which are asked for every
        item and change only with the catalog (see `specs.per_shape`, which fills them)."""
        memo = self._memos.get(kind)
        if memo is None:
            memo = self._memos[kind] = {}
        return memo

    def spec(self, name: str) -> ModelSpec:
        """The entry for `name`, or one with structural rules only for a name it does not know."""
        found = self._specs.get(name)  # asked for many times an item: found once per name
        if found is None:
            found = self.lookup(name)
            if found is None:
                found = self._unknown.get(name)
                if found is None:
                    found = self._unknown[name] = ModelSpec(name=name, known=False)
            if len(self._specs) < 4096:  # names come from manifests: keep the memo bounded
                self._specs[name] = found
        return found

    def api_fields(self) -> frozenset[str]:
        """Every request field any model (or the structural table) knows."""
        names = set(self.fields)
        for spec in self.models.values():
            names.update(spec.params or ())
        return frozenset(names)

    # -- building new catalogs --

    def overlaid(self, data: Any, source: str) -> Catalog:
        """This catalog with `data` (same shape) merged in per model; named after both."""
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise UsageError(f"{source}: a catalog is an object with a 'models' object")
        if data.get("name") is not None and not isinstance(data["name"], str):
            raise _fail(source, "name", "must be a string")
        merged = copy.deepcopy(self._data)
        for key in ("default_model", "batch_multiplier"):
            if key in data:
                merged[key] = data[key]
        fields = data.get("fields") or {}
        if not isinstance(fields, dict):
            raise _fail(source, "fields", "must be an object")
        merged["fields"] = {**merged.get("fields", {}), **fields}
        models = merged["models"]
        for name, entry in data["models"].items():
            if name in models and isinstance(entry, dict) and isinstance(models[name], dict):
                models[name] = _merge(models[name], entry)
            else:
                models[name] = entry
        merged["name"] = f"{self.name}+{data.get('name') or Path(source).stem}"
        return Catalog(merged, f"{self.source} + {source}")

    def with_prices(self, data: Any, source: str) -> Catalog:
        """This catalog with a price file's models (`{"models": {m: {per_1m_tokens, per_image}}}`)
        replacing their whole `prices` (models it does not know are added, unchecked)."""
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise UsageError(f"{source}: a price table is an object with a 'models' object")
        overlay: dict[str, Any] = {"name": data.get("name") or Path(source).stem, "models": {}}
        for name, prices in data["models"].items():
            if not isinstance(prices, dict):
                raise UsageError(f"{source}: model {name!r} must be an object")
            parse_prices(prices, source, name)  # fail here, naming the price file
            canonical = self.lookup(name)
            overlay["models"][canonical.name if canonical else name] = {"prices": prices}
        return self.overlaid(overlay, source)

    @classmethod
    def load(cls, path: str | Path, base: Catalog | None = None) -> Catalog:
        """Read a catalog file; overlaid on `base` if given. UsageError if unusable."""
        data = read_json(path, "catalog")
        return cls(data, str(path)) if base is None else base.overlaid(data, str(path))

    @classmethod
    def default(cls) -> Catalog:
        """The catalog shipped in the package."""
        return _default_catalog()

    def describe(self, today: dt.date) -> list[dict[str, Any]]:
        """Every model as data (for `batchimg models`)."""
        out = []
        for spec in self.models.values():
            params = spec.params or {}
            size = params.get("size")
            quality = params.get("quality")
            fmt = params.get("output_format")
            out.append(
                {
                    "model": spec.name,
                    "names": list(spec.names),
                    "status": spec.status_on(today),
                    "released": spec.released,
                    "shutdown_date": spec.shutdown_date.isoformat() if spec.shutdown_date else None,
                    "replacement": list(spec.replacement),
                    "endpoints": list(spec.endpoints),
                    "sizes": list(size.values or ()) if size else [],
                    "custom_sizes": size is not None and size.custom is not None,
                    "qualities": list(quality.values or ()) if quality else [],
                    "output_formats": list(fmt.values or ()) if fmt else ["png"],
                    "params": sorted(params),
                    "tokens": spec.tokens.output,
                    "prices_per_1m_tokens": dict(spec.prices.per_1m_tokens)
                    if spec.prices and spec.prices.per_1m_tokens
                    else None,
                    "per_image_prices": bool(spec.prices and spec.prices.per_image),
                    "notes": spec.notes,
                }
            )
        return out


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file's content; UsageError naming the file if it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} {str(path)!r} is not valid JSON: {exc}") from None


@functools.lru_cache(maxsize=1)
def _default_catalog() -> Catalog:
    try:  # installed as files (the usual case): read beside this module
        text = Path(__file__).with_name(CATALOG_FILE).read_text(encoding="utf-8")
    except (OSError, NameError, TypeError):  # a zip or a loader without files (no __file__):
        # importlib.resources (5 ms to import) knows where it is
        from importlib import resources

        text = resources.files("batchimg").joinpath(CATALOG_FILE).read_text(encoding="utf-8")
    return Catalog(json.loads(text), f"batchimg/{CATALOG_FILE}")


def today_utc() -> dt.date:
    """The date lifecycle checks compare shutdown dates with."""
    return dt.datetime.now(dt.timezone.utc).date()


def load_catalog(
    catalog: str | Path | Catalog | None = None,
    prices: str | Path | Sequence[str | Path] | None = None,
) -> Catalog:
    """The built-in catalog, overlaid by a `--catalog` file, then by `--prices` files."""
    result = (
        catalog
        if isinstance(catalog, Catalog)
        else Catalog.load(catalog, Catalog.default())
        if catalog is not None
        else Catalog.default()
    )
    paths = [prices] if isinstance(prices, (str, Path)) else list(prices or ())
    for path in paths:
        result = result.with_prices(read_json(path, "prices"), str(path))
    return result
