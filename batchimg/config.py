"""Run configuration: small keyword-only value objects, and the provider presets.

Only `Provider.api_key_from_env` (and the CLI) read environment variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .catalog import Catalog
from .errors import UsageError
from .manifest import Defaults
from .retry import RetryPolicy

ProviderName = Literal["openai", "azure", "modelverse"]
#: How the output directory is laid out: loose images + metadata.jsonl, or WebDataset shards.
Layout = Literal["imagefolder", "webdataset"]
LAYOUTS: tuple[Layout, ...] = ("imagefolder", "webdataset")
DEFAULT_AZURE_API_VERSION = "2025-04-01-preview"


class Secret:
    """Holds the API key; its repr and str never show it, so it cannot leak into logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True, kw_only=True)
class Provider:
    """Where requests go and how they authenticate."""

    name: ProviderName
    default_base_url: str | None
    key_env: str
    default_model: str | None = None  # None: the catalog's default model

    def api_key_from_env(
        self, environ: Mapping[str, str] | None = None, key_env: str | None = None
    ) -> Secret:
        """The key from `--api-key-env`, else BATCHIMG_API_KEY, else the provider's variable."""
        environ = os.environ if environ is None else environ
        names = [key_env] if key_env else ["BATCHIMG_API_KEY", self.key_env]
        for name in names:
            value = environ.get(name, "").strip()
            if value:
                return Secret(value)
        raise UsageError(
            f"no API key: set {' or '.join(names)} (looked at {', '.join(names)}), "
            "or use --mock to run against the embedded mock server"
        )


PROVIDERS: dict[str, Provider] = {
    "openai": Provider(
        name="openai", default_base_url="https://api.openai.com/v1", key_env="OPENAI_API_KEY"
    ),
    # The seed's gateway, which still serves gpt-image-1 (OpenAI shut it down on 2026-10-23).
    "modelverse": Provider(
        name="modelverse",
        default_base_url="https://api.modelverse.cn/v1",
        key_env="MODELVERSE_API_KEY",
        default_model="gpt-image-1",
    ),
    # Azure has no shared endpoint: the resource URL is the user's own.
    "azure": Provider(name="azure", default_base_url=None, key_env="AZURE_OPENAI_API_KEY"),
}


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """How to reach the API."""

    base_url: str
    api_key: Secret
    provider: ProviderName = "openai"
    azure_deployment: str | None = None
    azure_api_version: str = DEFAULT_AZURE_API_VERSION
    connect_timeout_s: float = 30.0
    timeout_s: float = 600.0

    def endpoint_url(self, endpoint: str, model: str) -> str:
        base = self.base_url.rstrip("/")
        if self.provider == "azure":
            deployment = self.azure_deployment or model
            return (
                f"{base}/openai/deployments/{deployment}/images/{endpoint}"
                f"?api-version={self.azure_api_version}"
            )
        return f"{base}/images/{endpoint}"

    def models_url(self) -> str | None:
        """Where `GET /models` lists what the server serves (None: Azure has no such list)."""
        return None if self.provider == "azure" else f"{self.base_url.rstrip('/')}/models"

    def auth_headers(self) -> dict[str, str]:
        if self.provider == "azure":
            return {"api-key": self.api_key.reveal()}
        return {"Authorization": f"Bearer {self.api_key.reveal()}"}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything one run needs besides the client: where from, where to, how hard."""

    manifest: Path
    out_dir: Path
    inputs_dir: Path | None = None  # where edit inputs are; None: the manifest's directory
    defaults: Defaults = field(default_factory=Defaults)
    concurrency: int = 8
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    rpm: float | None = None  # requests per minute the client admits at most
    ipm: float | None = None  # images per minute (a request weighs its n)
    tpm: float | None = None  # tokens per minute (estimated, corrected by actual usage)
    adaptive_rate: bool = True  # learn limits from x-ratelimit-* headers and 429s
    max_cost_usd: float | None = None  # budget cap, earlier runs' spend in the ledger included
    catalog: Catalog | None = None  # models, rules and prices; None: the built-in catalog
    learn_from: tuple[Path, ...] = ()  # other runs' ledgers whose answers tighten cap bounds
    #: The most an answer (or a downloaded image) may weigh; None: derived per request from
    #: its size, format, frames and n (`specs.max_answer_bytes`).
    max_answer_bytes: int | None = None
    stall_timeout_s: float = 900.0  # stop if nothing finishes this long while requests are out
    grace_period_s: float = 30.0  # after the first Ctrl-C, how long in-flight requests may take
    layout: Layout = "imagefolder"  # or "webdataset": tar shards of shard_size images
    shard_size: int = 1000  # samples (images) per webdataset shard

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise UsageError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.stall_timeout_s <= 0 or self.grace_period_s < 0:
            raise UsageError("stall timeout must be > 0 and grace period >= 0")
        if self.layout not in LAYOUTS:
            raise UsageError(f"unknown --format {self.layout!r}: choose {' or '.join(LAYOUTS)}")
        if self.shard_size < 1:
            raise UsageError(f"shard size must be at least 1, got {self.shard_size}")
        if self.retry.max_attempts < 1:
            raise UsageError(f"max attempts must be at least 1, got {self.retry.max_attempts}")
