"""batchimg: an async batch generation engine for OpenAI-compatible image APIs.

import batchimg
summary = batchimg.run("jobs/example.jsonl", "out", batchimg.RunOptions(mock=True))
print(summary.ok, summary.images, summary.cost_usd)
print(batchimg.Catalog.default().spec("gpt-image-2-2026-04-21").name)  # gpt-image-2

Every name below is imported on first use (PEP 562), so `import batchimg` and the command line's
`--help`, `validate` or `report` do not pay for the engine and aiohttp they never run.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import arun, run
    from .backends import PROFILES, Answer, Backend, ClientConfig, OnlineBackend, Profile, Secret
    from .catalog import Catalog, ModelSpec
    from .config import RunConfig
    from .defaults import Defaults
    from .engine import Engine, ProgressEvent, RunSnapshot, Summary
    from .errors import (
        BatchimgError,
        ErrorInfo,
        ItemFailed,
        RateLimited,
        RequestError,
        Retryable,
        RunFatal,
        ServerError,
        StorageError,
        TransportError,
        UsageError,
    )
    from .estimate import ManifestEstimate, estimate_manifest
    from .layouts import OutputLayout
    from .ledger import read_ledger
    from .limiter import Limiter, LimiterStats
    from .manifest import BadLine, Item, read_manifest
    from .options import RunOptions
    from .pricing import PriceTable
    from .report import Report, build_report
    from .retry import RetryPolicy
    from .stores import LocalStore, Store
    from .tokens import TokenBook
    from .view import ProgressView

_EXPORTS: dict[str, str] = {
    "Answer": "backends",
    "Backend": "backends",
    "BadLine": "manifest",
    "BatchimgError": "errors",
    "Catalog": "catalog",
    "ClientConfig": "backends",
    "Defaults": "defaults",
    "Engine": "engine",
    "ErrorInfo": "errors",
    "Item": "manifest",
    "ItemFailed": "errors",
    "Limiter": "limiter",
    "LimiterStats": "limiter",
    "LocalStore": "stores",
    "ManifestEstimate": "estimate",
    "ModelSpec": "catalog",
    "OnlineBackend": "backends",
    "OutputLayout": "layouts",
    "PROFILES": "backends",
    "PriceTable": "pricing",
    "Profile": "backends",
    "ProgressEvent": "engine",
    "ProgressView": "view",
    "RateLimited": "errors",
    "Report": "report",
    "RequestError": "errors",
    "RetryPolicy": "retry",
    "Retryable": "errors",
    "RunConfig": "config",
    "RunFatal": "errors",
    "RunOptions": "options",
    "RunSnapshot": "engine",
    "Secret": "backends",
    "ServerError": "errors",
    "StorageError": "errors",
    "Store": "stores",
    "Summary": "engine",
    "TokenBook": "tokens",
    "TransportError": "errors",
    "UsageError": "errors",
    "arun": "api",
    "build_report": "report",
    "estimate_manifest": "estimate",
    "read_ledger": "ledger",
    "read_manifest": "manifest",
    "run": "api",
}

__version__ = "0.1.0"

__all__ = [
    "PROFILES",
    "Answer",
    "Backend",
    "BadLine",
    "BatchimgError",
    "Catalog",
    "ClientConfig",
    "Defaults",
    "Engine",
    "ErrorInfo",
    "Item",
    "ItemFailed",
    "Limiter",
    "LimiterStats",
    "LocalStore",
    "ManifestEstimate",
    "ModelSpec",
    "OnlineBackend",
    "OutputLayout",
    "PriceTable",
    "Profile",
    "ProgressEvent",
    "ProgressView",
    "RateLimited",
    "Report",
    "RequestError",
    "RetryPolicy",
    "Retryable",
    "RunConfig",
    "RunFatal",
    "RunOptions",
    "RunSnapshot",
    "Secret",
    "ServerError",
    "StorageError",
    "Store",
    "Summary",
    "TokenBook",
    "TransportError",
    "UsageError",
    "__version__",
    "arun",
    "build_report",
    "estimate_manifest",
    "read_ledger",
    "read_manifest",
    "run",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # `batchimg.ledger` and the like
    else:
        raise AttributeError(f"module 'batchimg' has no attribute {name!r}")
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    loaded = (
        name
        for name, value in globals().items()
        if isinstance(value, ModuleType) and value.__name__.startswith(f"{__name__}.")
    )
    return sorted({*__all__, *loaded})  # the names, and the submodules imported so far
