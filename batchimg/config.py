"""What the engine runs: the run options, resolved against the files they name, and the checks
every command that reads a manifest makes before anything else (kept apart from `api`, so that
`validate`, `estimate` and `report` never import the engine). The command line imports this
module for `--help` too: the catalog and the rules engine are imported by the functions that
use them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError
from .options import RunOptions

if TYPE_CHECKING:
    from .catalog import Catalog
    from .defaults import Defaults
    from .pricing import PriceTable


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One run, ready to go: the manifest (a real file, even when read from a pipe), the output
    directory, the options (their `defaults` filled with the model to use), the catalog loaded
    and overlaid, and the other ledgers to learn token counts from."""

    manifest: Path
    out_dir: Path
    options: RunOptions = field(default_factory=RunOptions)
    inputs_dir: Path | None = None  # where edit inputs are; None: the manifest's directory
    catalog: Catalog | None = None  # models, rules and prices; None: the built-in catalog
    learn_from: tuple[Path, ...] = ()  # other runs' ledgers whose answers tighten cap bounds


def check_manifest(path: Path) -> None:
    """UsageError unless the manifest can be opened."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot read manifest {str(path)!r}: {exc.strerror or exc}") from None


def check_defaults(defaults: Defaults, catalog: Catalog | None = None) -> None:
    """UsageError naming the flag if a manifest default is illegal for the default model."""
    from .specs import ParamError  # the rules engine: imported by a command that checks

    try:
        defaults.check(catalog)
    except ParamError as exc:
        hint = "" if defaults.model else " (or name a model that takes it with --model)"
        raise UsageError(f"bad default --{exc.param.replace('_', '-')}: {exc}{hint}") from None


def load_run_catalog(
    catalog: str | Path | Catalog | None = None,
    prices: str | Path | PriceTable | None = None,
) -> Catalog:
    """The built-in catalog, overlaid by a `--catalog` file and then by a `--prices` file."""
    from .catalog import load_catalog  # neither module is needed for --help
    from .pricing import PriceTable

    if isinstance(prices, PriceTable):
        if catalog is not None:
            raise UsageError("give either a PriceTable or a catalog, not both")
        return prices.catalog
    return load_catalog(catalog, prices)


def load_prices(
    prices: str | Path | PriceTable | None, catalog: str | Path | Catalog | None = None
) -> PriceTable:
    """The prices of the built-in catalog, overlaid by a catalog and a price file if given."""
    from .pricing import PriceTable

    return PriceTable(load_run_catalog(catalog, prices))
