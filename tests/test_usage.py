"""Reading an answer's `usage`: the counts every price and total uses, or why not."""

from __future__ import annotations

from typing import Any

import pytest

from batchimg.usage import Usage, UsageProblem, read_usage


@pytest.mark.parametrize(
    ("raw", "counts"),
    [
        ({"input_tokens": 9, "output_tokens": 4160,
          "input_tokens_details": {"text_tokens": 6, "image_tokens": 3, "cached_tokens": 2}},
         Usage(text_in=6, cached_text_in=2, image_in=3, output=4160)),
        ({"prompt_tokens": 7, "output_tokens": 10}, Usage(7, 0, 0, 10)),
        ({"input_tokens": 7, "output_tokens": 10, "input_tokens_details": {"cached_tokens": 9}},
         Usage(7, 7, 0, 10)),
    ],
)  # fmt: skip
def test_usage_in_the_shapes_servers_send_is_read(raw: dict[str, Any], counts: Usage) -> None:
    assert read_usage(raw) == counts


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (None, "the answer has no usage"),
        ({"input_tokens": 7}, "usage has no output_tokens"),
        ({"output_tokens": True}, "usage.output_tokens is True, not a token count"),
        ({"output_tokens": 1, "input_tokens": -1}, "usage.input_tokens is -1, outside 0 to "
         "10,000,000"),
        ({"output_tokens": 1, "input_tokens_details": []},
         "usage.input_tokens_details is not an object"),
        ({"output_tokens": 1, "input_tokens_details": {"text_tokens": 2.0}},
         "usage.input_tokens_details.text_tokens is 2.0, not a token count"),
        ({"output_tokens": 1, "input_tokens_details": {"cached_tokens": "3"}},
         "usage.input_tokens_details.cached_tokens is '3', not a token count"),
    ],
)  # fmt: skip
def test_usage_that_cannot_be_believed_says_why(raw: Any, problem: str) -> None:
    read = read_usage(raw)
    assert isinstance(read, UsageProblem) and read == problem
