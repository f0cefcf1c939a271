"""Backends: what turns an item into an answer (see `base.Backend`).

base.py      the Backend protocol and the Answer it returns
online.py    OnlineBackend: one HTTP request per attempt
profiles.py  providers as data: OpenAI, Azure OpenAI, the seed's gateway (and ClientConfig)

`OnlineBackend` is imported on first use: it brings aiohttp (about 0.1 s), which commands that
send nothing (`--help`, `validate`, `estimate`, `report`) never need. So are `Answer` and
`Backend`, which only a run needs (the options need the profiles).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .profiles import PROFILES, ClientConfig, Profile, Secret

if TYPE_CHECKING:
    from .base import Answer, Backend
    from .online import OnlineBackend


def __getattr__(name: str) -> Any:
    if name == "OnlineBackend":
        from .online import OnlineBackend

        return OnlineBackend
    if name in ("Answer", "Backend"):
        from . import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PROFILES", "Answer", "Backend", "ClientConfig", "OnlineBackend", "Profile", "Secret"]
