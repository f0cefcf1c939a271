"""What the engine runs: the run options, resolved against the files they name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .catalog import Catalog
from .options import RunOptions


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
