"""Output tokens per image, learned from answers: for models whose counts nobody publishes.

gpt-image-2 and later bill output tokens by size, quality, complexity and frames through a
formula OpenAI does not publish. Every answer's `usage` says what one request really used, so
the book keeps, per group of requests that should cost alike (model, size, quality, output
format, complexity, frames), how many answers it has seen and the least, most and mean output
tokens per image. `estimate --from-ledger` fills it from earlier ledgers; a run fills it from
its own directory's ledger and then from each answer, so the budget cap's bound for a group
tightens as answers arrive.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from . import specs
from .catalog import Catalog
from .usage import UsageProblem, read_usage


class GroupKey(NamedTuple):
    """What an image's output token count depends on, as far as anyone can tell."""

    model: str  # the catalog's name for it (a snapshot counts as its model)
    size: str
    quality: str
    output_format: str
    complexity: str | None
    frames: int | None


def request_group(params: Mapping[str, Any], catalog: Catalog) -> GroupKey:
    """The group a request falls in, `auto` taken as the catalog's estimate."""
    return specs.per_shape(_request_group, params, catalog)


def _request_group(params: Mapping[str, Any], catalog: Catalog) -> GroupKey:
    spec = catalog.spec(str(params.get("model") or ""))
    return GroupKey(
        spec.name,
        specs.resolved_size(params, catalog),
        specs.resolved_quality(params, catalog),
        specs.output_format(params, catalog),
        specs.resolved_complexity(params, catalog),
        specs.resolved_frames(params, catalog),
    )


def record_group(record: Mapping[str, Any], catalog: Catalog) -> GroupKey | None:
    """The group of a ledger record, from what the answer said it produced; None if unusable."""
    model = record.get("model")
    if not isinstance(model, str) or not model:
        return None
    params = {k: v for k in _RECORD_FIELDS if (v := record.get(k)) is not None}
    return request_group(params, catalog)


#: What a record says of its answer that decides its group (`request_group` reads them).
_RECORD_FIELDS = ("model", "size", "quality", "output_format", "complexity", "frame_count")


def per_image_output(usage: Any, images: int) -> float | None:
    """Output tokens per image in an answer's `usage`; None unless it is a sane count."""
    counts = read_usage(usage)
    if isinstance(counts, UsageProblem) or counts.output <= 0 or images < 1:
        return None
    return counts.output / images


@dataclass
class Learned:
    """What the answers of one group said, per image."""

    samples: int = 0
    total: float = 0.0
    low: float = 0.0
    high: float = 0.0

    @property
    def mean(self) -> float:
        return self.total / self.samples if self.samples else 0.0

    def add(self, per_image: float) -> None:
        if not self.samples:
            self.low = self.high = per_image
        self.low, self.high = min(self.low, per_image), max(self.high, per_image)
        self.samples += 1
        self.total += per_image


class TokenBook:
    """Learned output tokens per image, by group."""

    def __init__(self) -> None:
        self._groups: dict[GroupKey, Learned] = {}

    def __len__(self) -> int:
        return len(self._groups)

    def get(self, key: GroupKey) -> Learned | None:
        return self._groups.get(key)

    def groups(self) -> dict[GroupKey, Learned]:
        return dict(self._groups)

    def add(self, key: GroupKey, per_image: float) -> None:
        self._groups.setdefault(key, Learned()).add(per_image)

    def learn_answer(self, params: Mapping[str, Any], usage: Any, catalog: Catalog) -> None:
        """Count one answer to a request (its `n` images share the usage)."""
        per_image = per_image_output(usage, int(params.get("n") or 1))
        if per_image is not None:
            self.add(request_group(params, catalog), per_image)

    def learn_record(self, record: Mapping[str, Any], catalog: Catalog) -> None:
        """Count one ledger record that carries a usable `usage`: per image it brought (an ok
        record's files), else per image asked for."""
        files, n = record.get("files"), record.get("n")
        images = len(files) if isinstance(files, list) and files else n
        per_image = per_image_output(
            record.get("usage"), images if isinstance(images, int) and images > 0 else 1
        )
        if per_image is None:
            return
        key = record_group(record, catalog)
        if key is not None:
            self.add(key, per_image)

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], catalog: Catalog) -> TokenBook:
        book = cls()
        for record in records:
            book.learn_record(record, catalog)
        return book

    @classmethod
    def from_ledgers(cls, paths: Iterable[Path], catalog: Catalog) -> TokenBook:
        from .ledger import read_ledger  # the ledger module reads; this one only counts

        book = cls()
        for path in {p.resolve(): None for p in paths}:  # one ledger named twice counts once
            for record in read_ledger(path):
                book.learn_record(record, catalog)
        return book
