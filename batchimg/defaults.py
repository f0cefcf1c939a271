"""What the default flags (`--model`, `--size`, `--quality`...) fill in where a manifest line
leaves a field out: `Defaults`, and its checks against the catalog.

Kept apart from the manifest reader because the run options hold a `Defaults` and the command
line is built from the run options: whatever this module imports at the top, `batchimg --help`
imports too. The catalog and the rules engine (their modules and records, about 10 ms) are
therefore imported by the methods that use them, which a command calls once it has a catalog.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .catalog import Catalog
    from .specs import Endpoint


@dataclass(frozen=True, kw_only=True)
class Defaults:
    """Values the CLI (or API caller) supplies for fields a manifest line leaves out.

    `model` None means the provider's default (the catalog's `default_model` for OpenAI). The
    other fields are filled in this order, so a default `output_format` is known before the
    fields that depend on it (`output_compression`, `frame_count`).
    """

    model: str | None = None
    n: int | None = None
    size: str | None = None
    quality: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    background: str | None = None
    moderation: str | None = None
    complexity: str | None = None
    frame_count: int | None = None
    safety_identifier: str | None = None

    @functools.cached_property
    def _given(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "model" and getattr(self, f.name) is not None
        }

    def model_for(self, catalog: Catalog | None = None) -> str:
        if self.model is not None:
            return self.model
        return (catalog or _default_catalog()).default_model

    def fill(
        self,
        params: dict[str, Any],
        endpoint: Endpoint = "generations",
        catalog: Catalog | None = None,
    ) -> None:
        """Set every default the line left out, where its model, endpoint and output format
        take it (`--quality xhigh` fills gpt-image-2.5 lines; a gpt-image-2 line keeps the
        API's default)."""
        from .specs import takes_default

        params.setdefault("model", self.model_for(catalog))
        for name, value in self._given.items():
            if name not in params and takes_default(params, name, value, endpoint, catalog):
                params[name] = value

    def check(self, catalog: Catalog | None = None) -> None:
        """Raise specs.ParamError if a default is illegal for the default model (defaults for
        fields it does not take at all are left to the lines whose models take them)."""
        from .specs import check_value, validate_params

        model = self.model_for(catalog)
        spec = (catalog or _default_catalog()).spec(model)
        params: dict[str, Any] = {"prompt": "check", "model": model}
        for name, value in self._given.items():  # checked as given: fill() would skip bad ones
            rule = spec.rule(name)
            if spec.params is None or (rule is not None and rule.formats is None):
                params[name] = value
        validate_params(params, catalog=catalog)
        for name in ("output_compression", "frame_count"):  # those that depend on the format
            value = self._given.get(name)
            rule = spec.rule(name)
            if value is not None and rule is not None:
                check_value(name, value, rule, model, "generations", rule.formats[0]
                            if rule.formats else "png")  # fmt: skip


def _default_catalog() -> Catalog:
    from .catalog import Catalog

    return Catalog.default()
