"""Backends: what turns an item into an answer (see `base.Backend`).

base.py      the Backend protocol and the Answer it returns
online.py    OnlineBackend: one HTTP request per attempt (and ClientConfig)
profiles.py  providers as data: OpenAI, Azure OpenAI, the seed's gateway
"""

from .base import Answer, Backend
from .online import ClientConfig, OnlineBackend
from .profiles import PROFILES, Profile, Secret

__all__ = ["PROFILES", "Answer", "Backend", "ClientConfig", "OnlineBackend", "Profile", "Secret"]
