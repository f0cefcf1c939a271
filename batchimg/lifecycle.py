"""Model lifecycle: what is retired, what OpenAI still serves, and the `batchimg models` listing.

Against OpenAI itself (the `openai` provider at its own base URL) a manifest that uses a model
past its shutdown date is refused before anything is sent: every such request would fail, and
the catalog names what to use instead. Through any other base URL (a gateway such as the seed's,
which still serves gpt-image-1; Azure, whose deployments retire on their own dates) the loader
only warns. `--check-models` asks the server itself (`GET /models`) and refuses a run whose
models it does not list or says are past their `shutdown_date`.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .catalog import Catalog
from .errors import UsageError
from .manifest import manifest_models

OPENAI_HOSTS = frozenset({"api.openai.com"})


def is_openai(provider: str, base_url: str) -> bool:
    """Whether requests go to OpenAI's own API (where shutdown dates are OpenAI's)."""
    host = (urlparse(base_url).hostname or "").rstrip(".")  # "api.openai.com." is the same host
    return provider == "openai" and host in OPENAI_HOSTS


def refuse_retired(
    manifest: Path, catalog: Catalog, default_model: str, today: dt.date, where: str
) -> None:
    """UsageError naming every model of the manifest that is shut down, with the first line
    that uses it and the replacement; nothing has been sent."""
    problems = []
    for model, line in manifest_models(manifest, default_model).items():
        spec = catalog.spec(model)
        if spec.status_on(today) == "shutdown":
            note = spec.lifecycle_note(today, model)
            problems.append(f"line {line}: {note}")
    if problems:
        raise UsageError(
            f"{where} no longer serves models this manifest uses (nothing was sent):\n  "
            + "\n  ".join(problems)
            + "\nChange the lines' model (or --model for lines that name none), then re-run."
        )


def check_served(
    manifest: Path,
    default_model: str,
    listed: dict[str, Any],
    today: dt.date,
    where: str,
) -> list[str]:
    """Compare the manifest's models with what `GET /models` listed (id -> shutdown_date).

    Returns a line per model that is fine, has a date announced or a date that cannot be read;
    raises UsageError if a model is not listed or its shutdown date has passed.
    """
    report, problems = [], []
    for model, line in manifest_models(manifest, default_model).items():
        if model not in listed:
            problems.append(f"line {line}: model {model} is not listed by {where}")
            continue
        raw = listed[model]
        if raw is None:
            report.append(f"model {model}: served, no shutdown date announced")
            continue
        date = _shutdown_date(raw)
        if date is None:
            report.append(f"model {model}: served, but its shutdown_date {raw!r} is not a date")
        elif date <= today:
            problems.append(f"line {line}: model {model} was shut down on {date} ({where})")
        else:
            report.append(f"model {model}: served until {date}")
    if problems:
        raise UsageError(
            "--check-models: nothing was sent:\n  " + "\n  ".join(problems) + "\n"
            "Change the lines' model (or --model for lines that name none), then re-run."
        )
    return report


def _shutdown_date(raw: Any) -> dt.date | None:
    """A `shutdown_date` as the server wrote it: `YYYY-MM-DD`, an ISO date-time, or seconds
    since the epoch; None if it is none of these."""
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        try:
            return dt.datetime.fromtimestamp(raw, dt.timezone.utc).date()
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(raw, str):
        try:
            return dt.date.fromisoformat(raw[:10])
        except ValueError:
            return None
    return None


def models_table(catalog: Catalog, today: dt.date) -> str:
    """`batchimg models` for people."""
    from .estimate import render_rows

    rows = []
    for entry in catalog.describe(today):
        listed = [v for v in entry["sizes"] if v != "auto"]
        sizes = "any WxH" if entry["custom_sizes"] else ", ".join(listed) or "-"
        prices = entry["prices_per_1m_tokens"]
        price = f"${prices['text_in']:g} / ${prices['image_out']:g}" if prices else (
            "per image" if entry["per_image_prices"] else "unpriced"
        )  # fmt: skip
        status = entry["status"] + (f" {entry['shutdown_date']}" if entry["shutdown_date"] else "")
        qualities = [q for q in entry["qualities"] if q != "auto"]
        rows.append(
            (
                entry["model"],
                status,
                ", ".join(entry["replacement"]) or "-",
                sizes,
                ", ".join(qualities) or "-",
                ", ".join(entry["output_formats"]),
                entry["tokens"],
                price,
            )
        )
    header = ("model", "status", "use instead", "sizes", "qualities", "formats", "tokens",
              "in/out per 1M")  # fmt: skip
    lines = render_rows(header, [*rows, ("",) * len(header)], numeric_from=len(header))[:-2]
    lines.append(
        f"catalog: {catalog.name} ({catalog.source}); default model {catalog.default_model}"
    )
    return "\n".join(lines)


def models_json(catalog: Catalog, today: dt.date) -> dict[str, Any]:
    return {
        "catalog": catalog.name,
        "date": catalog.date,
        "default_model": catalog.default_model,
        "today": today.isoformat(),
        "models": catalog.describe(today),
    }
