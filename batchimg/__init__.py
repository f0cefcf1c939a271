"""batchimg: an async batch generation engine for OpenAI-compatible image APIs.

import batchimg
summary = batchimg.run("jobs/example.jsonl", "out", mock=True)
print(summary.ok, summary.images, summary.cost_usd)
print(batchimg.Catalog.default().spec("gpt-image-2-2026-04-21").name)  # gpt-image-2
"""

from .api import arun, run
from .catalog import Catalog, ModelSpec
from .client import ImagesClient, ImagesResult
from .config import ClientConfig, Provider, RunConfig, Secret
from .engine import Engine, ProgressEvent, Summary
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
from .ledger import read_ledger
from .limiter import Limiter, LimiterStats
from .manifest import BadLine, Defaults, Item, read_manifest
from .pricing import PriceTable
from .report import Report, build_report
from .retry import RetryPolicy
from .tokens import TokenBook
from .view import ProgressView

__version__ = "0.1.0"

__all__ = [
    "BadLine",
    "BatchimgError",
    "Catalog",
    "ClientConfig",
    "Defaults",
    "Engine",
    "ErrorInfo",
    "ImagesClient",
    "ImagesResult",
    "Item",
    "ItemFailed",
    "Limiter",
    "LimiterStats",
    "ManifestEstimate",
    "ModelSpec",
    "PriceTable",
    "ProgressEvent",
    "ProgressView",
    "Provider",
    "RateLimited",
    "Report",
    "RequestError",
    "RetryPolicy",
    "Retryable",
    "RunConfig",
    "RunFatal",
    "Secret",
    "ServerError",
    "StorageError",
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
