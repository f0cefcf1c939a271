"""batchimg: an async batch generation engine for OpenAI-compatible image APIs.

import batchimg
summary = batchimg.run("jobs/example.jsonl", "out", mock=True)
print(summary.ok, summary.images, summary.cost_usd)
"""

from .api import arun, run
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
    TransportError,
    UsageError,
)
from .ledger import read_ledger
from .manifest import BadLine, Defaults, Item, read_manifest
from .retry import RetryPolicy

__version__ = "0.1.0"

__all__ = [
    "BadLine",
    "BatchimgError",
    "ClientConfig",
    "Defaults",
    "Engine",
    "ErrorInfo",
    "ImagesClient",
    "ImagesResult",
    "Item",
    "ItemFailed",
    "ProgressEvent",
    "Provider",
    "RateLimited",
    "RequestError",
    "RetryPolicy",
    "Retryable",
    "RunConfig",
    "RunFatal",
    "Secret",
    "ServerError",
    "Summary",
    "TransportError",
    "UsageError",
    "__version__",
    "arun",
    "read_ledger",
    "read_manifest",
    "run",
]
