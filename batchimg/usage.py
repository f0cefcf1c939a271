"""An answer's `usage`, read once and checked: the counts every price, total and bound uses.

The ledger keeps `usage` verbatim, whatever a server sent. Everything that adds it up reads it
through `read_usage`, which believes only whole, non-negative, plausible token counts: a string,
a list, a negative number or a count no image request could reach is not a count, and an answer
whose usage cannot be read has an unknown cost (priced at its worst case under a cap), never a
made-up or negative one. Shapes vary between providers and gateways (some omit the input
details, some say `prompt_tokens`); what is missing is zero only where the API's own shape
allows it to be left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

#: More tokens than any one image request can use (OpenAI's largest counts are tens of
#: thousands): a bigger number is a broken or hostile answer, not a bill.
MAX_TOKENS = 10_000_000


@dataclass(frozen=True)
class Usage:
    """The counts of one answer."""

    text_in: int
    cached_text_in: int
    image_in: int
    output: int

    @property
    def input(self) -> int:
        return self.text_in + self.image_in

    @property
    def total(self) -> int:
        return self.input + self.output


class UsageProblem(str):
    """Why a `usage` cannot be read (a sentence for the ledger's `cost_note`)."""


def _count(value: Any, where: str) -> int | UsageProblem:
    if isinstance(value, bool) or not isinstance(value, int):
        return UsageProblem(f"{where} is {value!r}, not a token count")
    if not 0 <= value <= MAX_TOKENS:
        return UsageProblem(f"{where} is {value:,}, outside 0 to {MAX_TOKENS:,}")
    return value


def read_usage(raw: Any) -> Usage | UsageProblem:
    """The counts in an answer's `usage`, or why they cannot be believed."""
    if type(raw) is dict:  # the usual shapes, every count plain and in range: read at once
        output = raw.get("output_tokens")
        details = raw.get("input_tokens_details")
        if details is None:
            details = {}
        if type(details) is dict:
            if "text_tokens" in details or "image_tokens" in details:
                text, image = details.get("text_tokens", 0), details.get("image_tokens", 0)
            else:
                text, image = raw.get("input_tokens", raw.get("prompt_tokens", 0)), 0
            cached = details.get("cached_tokens", 0)
            if _plain(output) and _plain(text) and _plain(image) and _plain(cached):
                return Usage(text, min(cached, text), image, output)
    return _read_usage(raw)  # anything else: its problem named


def _plain(value: Any) -> TypeGuard[int]:
    return type(value) is int and 0 <= value <= MAX_TOKENS


def _read_usage(raw: Any) -> Usage | UsageProblem:
    if raw is None:
        return UsageProblem("the answer has no usage")
    if not isinstance(raw, Mapping):
        return UsageProblem(f"usage is {type(raw).__name__}, not an object")
    if "output_tokens" not in raw:
        return UsageProblem("usage has no output_tokens")
    output = _count(raw["output_tokens"], "usage.output_tokens")
    if isinstance(output, UsageProblem):
        return output
    details = raw.get("input_tokens_details")
    if details is not None and not isinstance(details, Mapping):
        return UsageProblem("usage.input_tokens_details is not an object")
    details = details or {}
    counts: dict[str, int] = {}
    if "text_tokens" in details or "image_tokens" in details:
        sources = {
            "text": ("input_tokens_details.text_tokens", details.get("text_tokens", 0)),
            "image": ("input_tokens_details.image_tokens", details.get("image_tokens", 0)),
        }
    else:  # no split: every input token is text
        plain = raw.get("input_tokens", raw.get("prompt_tokens", 0))
        sources = {"text": ("input_tokens", plain), "image": ("", 0)}
    sources["cached"] = ("input_tokens_details.cached_tokens", details.get("cached_tokens", 0))
    for name, (where, value) in sources.items():
        count = _count(value, f"usage.{where}")
        if isinstance(count, UsageProblem):
            return count
        counts[name] = count
    return Usage(
        text_in=counts["text"],
        cached_text_in=min(counts["cached"], counts["text"]),
        image_in=counts["image"],
        output=output,
    )
