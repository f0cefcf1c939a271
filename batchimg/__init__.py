"""batchimg: an async batch generation engine for OpenAI-compatible image APIs.

import batchimg
summary = batchimg.run("jobs/example.jsonl", "out", batchimg.RunOptions(mock=True))
print(summary.ok, summary.images, summary.cost_usd)
print(batchimg.Catalog.default().spec("gpt-image-2-2026-04-21").name)  # gpt-image-2
"""

from .api import arun, run
from .backends import PROFILES, Answer, Backend, ClientConfig, OnlineBackend, Profile, Secret
from .catalog import Catalog, ModelSpec
from .config import RunConfig
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
from .manifest import BadLine, Defaults, Item, read_manifest
from .options import RunOptions
from .pricing import PriceTable
from .report import Report, build_report
from .retry import RetryPolicy
from .stores import LocalStore, Store
from .tokens import TokenBook
from .view import ProgressView

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
