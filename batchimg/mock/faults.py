"""Faults on demand: seeded fault draws, prompt directives and hard per-minute limits."""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal

from .config import MockConfig
from .rules import RuleError


def retry_after_headers(retry_after_s: float, style: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    if style in ("both", "ms"):
        headers["retry-after-ms"] = str(round(retry_after_s * 1000))
    if style in ("both", "seconds"):
        # HTTP wants whole seconds here; clients should prefer the precise retry-after-ms.
        headers["retry-after"] = str(math.ceil(retry_after_s))
    if style == "date":
        headers["retry-after"] = email.utils.formatdate(time.time() + retry_after_s, usegmt=True)
    return headers


def format_go_duration(seconds: float) -> str:
    """A duration the way OpenAI's reset headers write it: `12ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{rest:.0f}s"


class SlicedLimit:
    """A per-minute limit enforced in slices, plus the per-minute view the headers report."""

    def __init__(self, per_min: int) -> None:
        self.per_min = per_min
        self.slice_s = max(1.0, 60 / per_min)
        self.per_slice = per_min * self.slice_s / 60
        self._slice = -1
        self._used = 0.0
        self._minute: deque[tuple[float, float]] = deque()  # (when, weight) in the last 60 s
        self._minute_used = 0.0

    def _roll(self, now: float) -> None:
        current = int(now // self.slice_s)
        if current != self._slice:
            self._slice, self._used = current, 0.0
        while self._minute and self._minute[0][0] <= now - 60:
            self._minute_used -= self._minute.popleft()[1]

    def wait_s(self, weight: float, now: float) -> float:
        """0 if `weight` fits in this slice, else the seconds until the next slice opens."""
        self._roll(now)
        if self._used + weight <= self.per_slice or self._used == 0:
            return 0.0
        return (self._slice + 1) * self.slice_s - now

    def take(self, weight: float, now: float) -> None:
        self._roll(now)
        self._used += weight
        self._minute.append((now, weight))
        self._minute_used += weight

    def headers(self, kind: str, now: float) -> dict[str, str]:
        self._roll(now)
        used = self._minute_used
        reset = (self._minute[0][0] + 60 - now) if self._minute else 0.0
        return {
            f"x-ratelimit-limit-{kind}": str(self.per_min),
            f"x-ratelimit-remaining-{kind}": str(max(0, int(self.per_min - used))),
            f"x-ratelimit-reset-{kind}": format_go_duration(reset),
        }


#: What the x-ratelimit-* headers advertise when no limit is configured: a generous account
#: (far above OpenAI's published image tiers, as a gateway may be), so that a client which
#: learns its ceilings from the headers is never slowed by them in tests or benchmarks.
#: batchimg's limiter admits at most limit/60 a second in bursts of limit/600: 1,666 requests a
#: second in bursts of 166, and tokens enough for that many requests of 10,000 tokens each.
#: What remains is counted, as for configured limits: requests and billed tokens of the last
#: minute.
ADVERTISED_RPM = 100_000
ADVERTISED_TPM = 1_000_000_000


Fault = Literal["rate_limit", "server_error", "html_error", "truncate", "drop", "slow"]


def decide_fault(draw: float, config: MockConfig) -> Fault | None:
    """The configured fault for one request, given a uniform draw in [0, 1); None: no fault."""
    rates: tuple[tuple[Fault, float], ...] = (
        ("rate_limit", config.rate_limit_rate),
        ("server_error", config.error_rate),
        ("html_error", config.html_error_rate),
        ("truncate", config.truncate_rate),
        ("drop", config.drop_rate),
        ("slow", config.slow_rate),
    )
    threshold = 0.0
    for fault, rate in rates:
        threshold += rate
        if draw < threshold:
            return fault
    return None


_DIRECTIVE = re.compile(r"\[\[mock:([a-z_]+)(?:=(\d+))?\]\]")


@dataclass(frozen=True)
class Directives:
    """The `[[mock:...]]` directives found in a prompt (see the module docstring)."""

    moderation: bool = False
    quota: bool = False
    corrupt: bool = False
    datauri: bool = False
    url: bool = False
    fail: int = 0

    @classmethod
    def parse(cls, prompt: str) -> Directives:
        found = dict(_DIRECTIVE.findall(prompt))
        unknown = set(found) - {"moderation", "quota", "corrupt", "datauri", "url", "fail"}
        if unknown:
            raise RuleError("prompt", f"Unknown mock directive(s): {', '.join(sorted(unknown))}.")
        return cls(
            moderation="moderation" in found,
            quota="quota" in found,
            corrupt="corrupt" in found,
            datauri="datauri" in found,
            url="url" in found,
            fail=int(found.get("fail") or 0),
        )
