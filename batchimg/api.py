"""The Python API: `batchimg.run(...)` and `await batchimg.arun(...)`; the CLI calls these."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from . import lifecycle
from .backends import PROFILES, Backend, ClientConfig, Profile, Secret
from .catalog import Catalog, today_utc
from .config import RunConfig, check_defaults, check_manifest, load_run_catalog
from .engine import Engine, ProgressCallback, Summary
from .errors import RequestError, UsageError
from .limiter import Limiter
from .manifest import materialized
from .options import RunOptions
from .outdir import check_output
from .routing import Endpoint, Health, RoutedBackend, RoutingLimiter, load_endpoints
from .stores import ObjectStore, Store, is_url, local_path, open_store
from .stores.objects import check_store

if TYPE_CHECKING:
    from .backends.online import OnlineBackend
    from .engine.batch import BatchEngine


async def arun(
    manifest: str | Path,
    out: str | Path,
    options: RunOptions | None = None,
    /,
    *,
    inputs_dir: Path | None = None,
    store: Store | None = None,
    progress: ProgressCallback | None = None,
    handle_signals: bool = False,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> Summary:
    """Generate every image a manifest asks for into `out`; re-running resumes.

    `options` (a `RunOptions`) are the CLI's flags; `RunOptions()` by default. Raises UsageError
    (before sending anything) for a bad option, a missing key, an unreadable manifest or output
    directory, or (against OpenAI itself) a model past its shutdown date. `options.api_key` wins
    over the environment; `options.mock` runs against an embedded mock server and needs no key.
    `out` may be a URL (`s3://bucket/prefix`, `gs://...`; `options.state_dir` is then where
    the run's local state goes). `manifest` may be `-` (standard input) or a pipe; `inputs_dir`
    is where edit inputs are
    (default: the manifest's directory; for standard input, the current one). `progress`
    receives `ProgressEvent`s; `handle_signals` lets Ctrl-C stop the run gracefully. `store`:
    where the images go, if not the directory `out` itself (a `Store` of your own).
    """
    options = options or RunOptions()
    with materialized(manifest) as (manifest, found_dir):
        remote = None
        if is_url(out):
            if store is not None:
                raise UsageError("give either an output URL or a store, not both")
            if options.batch_api:
                raise UsageError(
                    "--batch-api keeps its batches' state in the output directory: give a "
                    "local --out (object storage takes online runs only)"
                )
            store = open_store(out, options.state_dir)  # exit 2 for a missing extra
            assert isinstance(store, ObjectStore)
            from .stores.remote import RemoteLedger  # a bucket's: imported for one

            RemoteLedger(store, store.state_dir).check()  # another output's state: exit 2
            out = store.state_dir  # the local side: the ledger's working copy, the lock
        elif options.state_dir is not None:
            raise UsageError("--state is for an --out URL (s3://...): a local --out is its own")
        out = local_path(out)
        check_manifest(manifest)
        the_catalog = load_run_catalog(options.catalog, options.prices)
        defaults = options.defaults
        if defaults.model is None:
            profile = PROFILES[options.provider]
            default_model = (None if options.mock else profile.default_model) or (
                the_catalog.default_model
            )
            defaults = dataclasses.replace(defaults, model=default_model)
        check_defaults(defaults, the_catalog)
        config = RunConfig(
            manifest=manifest,
            inputs_dir=inputs_dir or found_dir,
            out_dir=out,
            options=dataclasses.replace(options, defaults=defaults),
            catalog=the_catalog,
            learn_from=_ledger_paths(options.from_ledger),
        )
        routes = check_routes(config)  # each endpoint's key found, or exit 2
        # Exit 2 before anything else for a missing key (none for the mock or the endpoints').
        target = None if options.mock or routes else api_target(config)
        if options.batch_api and target is not None and not target.profile.batches:
            raise UsageError(
                f"--batch-api needs OpenAI's Batch API: provider {target.profile.name} has none "
                "that batchimg speaks"
            )
        check_output(out)  # before anything is sent: exit 2 if it cannot keep what it buys
        if isinstance(store, ObjectStore):
            await anyio.to_thread.run_sync(check_store, store)
            from .stores.remote import RemoteOutput

            remote = RemoteOutput(store, out, options.upload_every_s)
        if options.ray is not None:
            from .distributed import run_on_ray

            if store is not None and remote is None:
                raise UsageError("a store of your own is for one process: drop --ray")

            return await run_on_ray(
                config,
                None if target is None else target.url,
                endpoints=routes,
                remote=remote,
                progress=progress,
                handle_signals=handle_signals,
            )
        store = store or open_store(out)
        if routes:  # no --batch-api, no --check-models (RunOptions says)
            store.temp_dir.mkdir(parents=True, exist_ok=True)
            health = Health([r.name for r in routes])
            limiter = RoutingLimiter({r.name: Limiter(**r.limits(options)) for r in routes}, health)
            async with open_routes(config, routes, store.temp_dir, health) as routed:
                routed_engine = Engine(
                    config,
                    routed,
                    store,
                    progress=progress,
                    sleep=sleep,
                    remote=remote,
                    limiter=limiter,
                )
                return await routed_engine.run(handle_signals=handle_signals)
        async with open_backend(config, target, store.temp_dir) as backend:
            checked = (
                await _check_models(backend, config.manifest, defaults.model_for(the_catalog))
                if options.check_models
                else []
            )
            store.temp_dir.mkdir(parents=True, exist_ok=True)
            if options.batch_api:
                from .engine.batch import BatchEngine

                engine: Engine | BatchEngine = BatchEngine(
                    config, backend, store, progress=progress, sleep=sleep
                )
            else:
                engine = Engine(
                    config, backend, store, progress=progress, sleep=sleep, remote=remote
                )
            for line in checked:
                engine.warn(line)
            return await engine.run(handle_signals=handle_signals)


def _ledger_paths(sources: tuple[str | Path, ...]) -> tuple[Path, ...]:
    """`--from-ledger`: the ledgers to learn from (none: the report module is not needed)."""
    if not sources:
        return ()
    from .report import ledger_paths

    return tuple(ledger_paths(sources))


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the run's requests go: the URL, the key, the provider's profile."""

    url: str
    key: Secret  # its repr never shows the key
    profile: Profile


def check_routes(config: RunConfig) -> tuple[Endpoint, ...]:
    """`--endpoints`: the endpoints, each key found (UsageError naming its variable) and, for
    OpenAI itself, no model past its shutdown date."""
    options = config.options
    if options.endpoints is None:
        return ()
    routes = load_endpoints(options.endpoints, options.provider)
    for route in routes:
        route.key()
        _refuse_retired(config, route.provider, route.base_url)
    return routes


@contextlib.asynccontextmanager
async def open_routes(
    config: RunConfig, routes: tuple[Endpoint, ...], spool_dir: Path, health: Health
) -> AsyncIterator[RoutedBackend]:
    """A backend per endpoint, open, behind one `RoutedBackend`."""
    async with contextlib.AsyncExitStack() as stack:
        backends: dict[str, Backend] = {}
        for route in routes:
            target = Target(route.base_url, route.key(), PROFILES[route.provider])
            opened = open_backend(config, target, spool_dir)
            backends[route.name] = await stack.enter_async_context(opened)
        yield RoutedBackend(backends, health)


def _refuse_retired(config: RunConfig, provider: str, url: str) -> None:
    if lifecycle.is_openai(provider, url):
        catalog = config.catalog or Catalog.default()
        model = config.options.defaults.model_for(catalog)
        lifecycle.refuse_retired(config.manifest, catalog, model, today_utc(), "OpenAI")


def api_target(config: RunConfig) -> Target:
    """The provider's URL and key, checked: UsageError for a missing URL or key, or (against
    OpenAI itself) a model past its shutdown date."""
    options = config.options
    profile = PROFILES[options.provider]
    url = options.base_url or profile.default_base_url or ""
    if not url:
        raise UsageError(f"--base-url is required for provider {profile.name} (your resource URL)")
    _refuse_retired(config, profile.name, url)
    key = (
        Secret.checked(options.api_key, "api_key")
        if options.api_key
        else profile.api_key_from_env(key_env=options.api_key_env)
    )
    return Target(url, key, profile)


@contextlib.asynccontextmanager
async def open_backend(
    config: RunConfig, target: Target | None, spool_dir: Path
) -> AsyncIterator[OnlineBackend]:
    """The run's backend, open: the online one, pointed at `target`, or (None) at an embedded
    mock server started for the run. Answers stream into `spool_dir`, the store's temp area."""
    options = config.options
    async with contextlib.AsyncExitStack() as stack:
        if target is None:
            import secrets

            from .mock import MockConfig, MockServer  # Pillow is only needed when mocking

            key = secrets.token_urlsafe(16)
            server = await stack.enter_async_context(MockServer(MockConfig(api_key=key)))
            target = Target(server.base_url, Secret(key), PROFILES["openai"])
        client = ClientConfig(
            base_url=target.url,
            api_key=target.key,
            profile=target.profile,
            deployment=options.azure_deployment,
            api_version=options.azure_api_version,
            connect_timeout_s=options.connect_timeout_s,
            timeout_s=options.timeout_s,
        )
        from .backends.online import OnlineBackend  # aiohttp: only once a run sends

        backend = OnlineBackend(client, pool_size=options.concurrency, spool_dir=spool_dir)
        yield await stack.enter_async_context(backend)


async def _check_models(backend: OnlineBackend, manifest: Path, default_model: str) -> list[str]:
    """`--check-models`: the manifest's models against the server's `GET /models`."""
    url = backend.models_url
    if url is None:
        raise UsageError("--check-models needs a server with a model list (not azure)")
    where = f"GET {url}"
    try:
        listed = await backend.list_models()
    except RequestError as exc:
        raise UsageError(f"--check-models: {where} failed: {exc} (nothing was sent)") from None
    return lifecycle.check_served(manifest, default_model, listed, today_utc(), where)


def run(
    manifest: str | Path,
    out: str | Path,
    options: RunOptions | None = None,
    /,
    *,
    inputs_dir: Path | None = None,
    store: Store | None = None,
    progress: ProgressCallback | None = None,
) -> Summary:
    """Blocking form of `arun`; for scripts and notebooks without an event loop."""
    call = functools.partial(
        arun, manifest, out, options, inputs_dir=inputs_dir, store=store, progress=progress
    )
    return anyio.run(call)
