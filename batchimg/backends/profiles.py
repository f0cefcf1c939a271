"""Provider profiles: how one OpenAI-compatible API is reached, as data.

A profile says where requests go (a default base URL and a path template), how the key is sent
(a header and an optional scheme), which environment variable holds the key, which endpoints the
provider serves and whether it lists its models. OpenAI, Azure OpenAI and the seed's gateway are
three profiles of the one online backend; a new provider is a new entry here, not a new branch.

Only `Profile.api_key_from_env` (and the CLI) read environment variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import UsageError

DEFAULT_AZURE_API_VERSION = "2025-04-01-preview"
ENDPOINTS = frozenset({"generations", "edits"})


class Secret:
    """Holds the API key; its repr and str never show it, so it cannot leak into logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    @classmethod
    def checked(cls, value: str, where: str) -> Secret:
        """A key that can go in an HTTP header; UsageError (which never shows it) if not."""
        value = value.strip()
        if not value or any(not 0x21 <= ord(c) <= 0x7E for c in value):
            raise UsageError(
                f"the API key from {where} is empty or holds a space, line break or other "
                "character no header can carry: check how it was set"
            )
        return cls(value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True, kw_only=True)
class Profile:
    """Where requests go and how they authenticate.

    `images_path` and `models_path` are appended to the base URL; `images_path` may name
    `{endpoint}` (generations or edits), `{deployment}` (the Azure deployment, by default the
    model) and `{api_version}`.
    """

    name: str
    default_base_url: str | None
    key_env: str
    default_model: str | None = None  # None: the catalog's default model
    images_path: str = "/images/{endpoint}"
    models_path: str | None = "/models"  # None: the provider has no model list
    auth_header: str = "Authorization"
    auth_scheme: str | None = "Bearer"  # the key follows it in the header; None: the key alone
    endpoints: frozenset[str] = ENDPOINTS  # what the provider serves
    batches: bool = True  # serves OpenAI's Files and Batches API (`--batch-api`)

    def endpoint_url(
        self,
        base_url: str,
        endpoint: str,
        model: str,
        *,
        deployment: str | None = None,
        api_version: str = DEFAULT_AZURE_API_VERSION,
    ) -> str:
        path = self.images_path.format(
            endpoint=endpoint, deployment=deployment or model, api_version=api_version
        )
        return base_url.rstrip("/") + path

    def models_url(self, base_url: str) -> str | None:
        """Where `GET /models` lists what the server serves (None: no such list)."""
        return None if self.models_path is None else base_url.rstrip("/") + self.models_path

    def auth_headers(self, key: Secret) -> dict[str, str]:
        value = key.reveal()
        return {self.auth_header: f"{self.auth_scheme} {value}" if self.auth_scheme else value}

    def api_key_from_env(
        self, environ: Mapping[str, str] | None = None, key_env: str | None = None
    ) -> Secret:
        """The key from `--api-key-env`, else BATCHIMG_API_KEY, else the provider's variable."""
        environ = os.environ if environ is None else environ
        names = [key_env] if key_env else ["BATCHIMG_API_KEY", self.key_env]
        for name in names:
            value = environ.get(name, "").strip()
            if value:
                return Secret.checked(value, f"${name}")
        raise UsageError(
            f"no API key: set {' or '.join(names)} (looked at {', '.join(names)}), "
            "or use --mock to run against the embedded mock server"
        )


PROFILES: dict[str, Profile] = {
    "openai": Profile(
        name="openai", default_base_url="https://api.openai.com/v1", key_env="OPENAI_API_KEY"
    ),
    # The seed's gateway, which still serves gpt-image-1 (OpenAI shut it down on 2026-10-23).
    "modelverse": Profile(
        name="modelverse",
        default_base_url="https://api.modelverse.cn/v1",
        key_env="MODELVERSE_API_KEY",
        default_model="gpt-image-1",
        batches=False,  # its documentation has no Batch API
    ),
    # Azure has no shared endpoint (the resource URL is the user's own), names deployments in
    # the path, sends the key as `api-key` and lists no models.
    "azure": Profile(
        name="azure",
        default_base_url=None,
        key_env="AZURE_OPENAI_API_KEY",
        images_path="/openai/deployments/{deployment}/images/{endpoint}?api-version={api_version}",
        models_path=None,
        auth_header="api-key",
        auth_scheme=None,
        batches=False,  # Azure's batch is a service of its own (global-batch deployments)
    ),
}


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    """How to reach the API: where, with which key, as which provider, how patiently."""

    base_url: str
    api_key: Secret  # its repr never shows the key
    profile: Profile = PROFILES["openai"]
    deployment: str | None = None  # Azure: the deployment (default: the model name)
    api_version: str = DEFAULT_AZURE_API_VERSION  # Azure: the api-version query parameter
    connect_timeout_s: float = 30.0
    timeout_s: float = 600.0

    def endpoint_url(self, endpoint: str, model: str) -> str:
        return self.profile.endpoint_url(
            self.base_url, endpoint, model, deployment=self.deployment, api_version=self.api_version
        )

    def models_url(self) -> str | None:
        return self.profile.models_url(self.base_url)

    def auth_headers(self) -> dict[str, str]:
        return self.profile.auth_headers(self.api_key)
