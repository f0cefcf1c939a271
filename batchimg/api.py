"""The Python API: `batchimg.run(...)` and `await batchimg.arun(...)`; the CLI calls these."""

from __future__ import annotations

import dataclasses
import functools
import secrets
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio

from . import lifecycle, specs
from .catalog import Catalog, load_catalog, today_utc
from .client import ImagesClient
from .config import PROVIDERS, ClientConfig, Layout, RunConfig, Secret
from .engine import Engine, ProgressCallback, Summary
from .errors import RequestError, UsageError
from .manifest import Defaults, materialized
from .outdir import check_output
from .pricing import PriceTable
from .report import ledger_paths
from .retry import RetryPolicy
from .webdataset import DEFAULT_SHARD_SIZE
from .writer import IMAGES_DIR


def check_manifest(path: Path) -> None:
    """UsageError unless the manifest can be opened."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot read manifest {str(path)!r}: {exc.strerror or exc}") from None


async def arun(
    manifest: str | Path,
    out: str | Path,
    *,
    provider: str = "openai",
    base_url: str | None = None,
    api_key: str | None = None,
    api_key_env: str | None = None,
    mock: bool = False,
    concurrency: int = 8,
    max_attempts: int = 6,
    backoff_base_s: float = 0.5,
    max_backoff_s: float = 30.0,
    connect_timeout_s: float = 30.0,
    timeout_s: float = 600.0,
    item_deadline_s: float | None = None,
    rpm: float | None = None,
    ipm: float | None = None,
    tpm: float | None = None,
    adaptive_rate: bool = True,
    max_cost_usd: float | None = None,
    prices: str | Path | PriceTable | None = None,
    catalog: str | Path | Catalog | None = None,
    check_models: bool = False,
    from_ledger: Sequence[str | Path] = (),
    max_answer_mb: float | None = None,
    stall_timeout_s: float = 900.0,
    grace_period_s: float = 30.0,
    layout: Layout = "imagefolder",
    shard_size: int = DEFAULT_SHARD_SIZE,
    azure_deployment: str | None = None,
    azure_api_version: str | None = None,
    defaults: Defaults | None = None,
    inputs_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    handle_signals: bool = False,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> Summary:
    """Generate every image a manifest asks for into `out`; re-running resumes.

    Raises UsageError (before sending anything) for a bad option, a missing key, an
    unreadable manifest, or (against OpenAI itself) a model past its shutdown date.
    `api_key` wins over the environment; `mock=True` runs against an embedded mock server
    and needs no key. `catalog` overlays the built-in catalog and `prices` its prices (files,
    or objects); `check_models` asks the server's `GET /models` first; `from_ledger`: other
    runs' output directories or ledgers whose answers bound the cost of this run's requests.
    `manifest` may be `-` (standard input) or a pipe; `inputs_dir` is where edit inputs are
    (default: the manifest's directory; for standard input, the current one).
    """
    with materialized(manifest) as (manifest, found_dir):
        out = Path(out)
        check_manifest(manifest)
        if max_cost_usd is not None and max_cost_usd <= 0:
            raise UsageError(f"--max-cost must be a positive amount in USD, got {max_cost_usd}")
        if provider not in PROVIDERS:
            raise UsageError(f"unknown provider {provider!r}: choose one of {', '.join(PROVIDERS)}")
        preset = PROVIDERS[provider]
        the_catalog = load_run_catalog(catalog, prices)
        defaults = defaults or Defaults()
        if defaults.model is None:
            default_model = (None if mock else preset.default_model) or the_catalog.default_model
            defaults = dataclasses.replace(defaults, model=default_model)
        check_defaults(defaults, the_catalog)
        run_config = RunConfig(
            manifest=manifest,
            inputs_dir=inputs_dir or found_dir,
            out_dir=out,
            defaults=defaults,
            concurrency=concurrency,
            retry=RetryPolicy(
                max_attempts=max_attempts,
                backoff_base_s=backoff_base_s,
                max_backoff_s=max_backoff_s,
                deadline_s=item_deadline_s,
            ),
            stall_timeout_s=stall_timeout_s,
            grace_period_s=grace_period_s,
            layout=layout,
            shard_size=shard_size,
            rpm=rpm,
            ipm=ipm,
            tpm=tpm,
            adaptive_rate=adaptive_rate,
            max_cost_usd=max_cost_usd,
            catalog=the_catalog,
            learn_from=tuple(ledger_paths(from_ledger)),
            max_answer_bytes=None if max_answer_mb is None else int(max_answer_mb * 2**20),
        )
        client_options: dict[str, Any] = {
            "connect_timeout_s": connect_timeout_s,
            "timeout_s": timeout_s,
            "azure_deployment": azure_deployment,
        }
        if azure_api_version:
            client_options["azure_api_version"] = azure_api_version

        default_model = defaults.model_for(the_catalog)

        async def go(client_config: ClientConfig) -> Summary:
            check_output(out)  # before anything is sent: exit 2 if it cannot keep what it buys
            spool_dir = out / IMAGES_DIR  # answers stream into temp files beside their final names
            async with ImagesClient(
                client_config, pool_size=concurrency, spool_dir=spool_dir
            ) as client:
                checked = (
                    await _check_models(client, client_config, manifest, default_model)
                    if check_models
                    else []
                )
                spool_dir.mkdir(parents=True, exist_ok=True)
                engine = Engine(run_config, client, progress=progress, sleep=sleep)
                for line in checked:
                    engine.warn(line)
                return await engine.run(handle_signals=handle_signals)

        if mock:
            from .mock import MockConfig, MockServer  # Pillow is only needed when mocking

            key = secrets.token_urlsafe(16)
            async with MockServer(MockConfig(api_key=key)) as server:
                return await go(
                    ClientConfig(base_url=server.base_url, api_key=Secret(key), **client_options)
                )
        url = base_url or preset.default_base_url
        if not url:
            raise UsageError(f"--base-url is required for provider {provider} (your resource URL)")
        if lifecycle.is_openai(provider, url):
            lifecycle.refuse_retired(manifest, the_catalog, default_model, today_utc(), "OpenAI")
        secret = Secret(api_key) if api_key else preset.api_key_from_env(key_env=api_key_env)
        return await go(
            ClientConfig(
                base_url=url,
                api_key=secret,
                provider=preset.name,
                **client_options,
            )
        )


async def _check_models(
    client: ImagesClient, config: ClientConfig, manifest: Path, default_model: str
) -> list[str]:
    """`--check-models`: the manifest's models against the server's `GET /models`."""
    where = f"GET {config.models_url()}"
    if config.models_url() is None:
        raise UsageError("--check-models needs a server with a model list (not azure)")
    try:
        listed = await client.list_models()
    except RequestError as exc:
        raise UsageError(f"--check-models: {where} failed: {exc} (nothing was sent)") from None
    return lifecycle.check_served(manifest, default_model, listed, today_utc(), where)


def check_defaults(defaults: Defaults, catalog: Catalog | None = None) -> None:
    """UsageError naming the flag if a manifest default is illegal for the default model."""
    try:
        defaults.check(catalog)
    except specs.ParamError as exc:
        hint = "" if defaults.model else " (or name a model that takes it with --model)"
        raise UsageError(f"bad default --{exc.param.replace('_', '-')}: {exc}{hint}") from None


def load_run_catalog(
    catalog: str | Path | Catalog | None = None,
    prices: str | Path | PriceTable | None = None,
) -> Catalog:
    """The built-in catalog, overlaid by a `--catalog` file and then by a `--prices` file."""
    if isinstance(prices, PriceTable):
        if catalog is not None:
            raise UsageError("give either a PriceTable or a catalog, not both")
        return prices.catalog
    return load_catalog(catalog, prices)


def load_prices(
    prices: str | Path | PriceTable | None, catalog: str | Path | Catalog | None = None
) -> PriceTable:
    """The prices of the built-in catalog, overlaid by a catalog and a price file if given."""
    return PriceTable(load_run_catalog(catalog, prices))


def run(manifest: str | Path, out: str | Path, **options: Any) -> Summary:
    """Blocking form of `arun` (same options); for scripts and notebooks without a loop."""
    return anyio.run(functools.partial(arun, manifest, out, **options))
