"""Prices: hand-computed costs from the published tables in shared/API_NOTES.md.

Token prices are USD per 1M tokens: gpt-image-1 text 5.00 / cached 1.25 / image in 10.00 /
image out 40.00; gpt-image-1-mini 2.00 / 0.20 / 2.50 / 8.00; gpt-image-1.5 5.00 / 1.25 / 8.00 /
32.00. DALL·E bills per image.
"""

from __future__ import annotations

from typing import Any

import pytest

from batchimg.pricing import PRICE_TABLE, PriceTable, request_cost_usd, usage_cost_usd
from batchimg.tokens import TokenBook, request_group


def usage(text: int, output: int, image: int = 0, cached: int | None = None) -> dict[str, Any]:
    details: dict[str, int] = {"text_tokens": text, "image_tokens": image}
    if cached is not None:
        details["cached_tokens"] = cached
    return {
        "total_tokens": text + image + output,
        "input_tokens": text + image,
        "output_tokens": output,
        "input_tokens_details": details,
    }


def test_gpt_image_1_text_and_output_tokens() -> None:
    cost = usage_cost_usd("gpt-image-1", usage(text=50, output=4160))
    assert cost == pytest.approx(50 * 5e-6 + 4160 * 40e-6, abs=1e-12)
    assert cost == pytest.approx(0.16665, abs=1e-12)


def test_input_image_tokens_are_priced_at_the_image_rate() -> None:
    cost = usage_cost_usd("gpt-image-1", usage(text=20, image=300, output=1056))
    assert cost == pytest.approx(20 * 5e-6 + 300 * 10e-6 + 1056 * 40e-6, abs=1e-12)
    assert cost == pytest.approx(0.04534, abs=1e-12)


def test_cached_text_tokens_are_priced_at_the_cached_rate() -> None:
    cost = usage_cost_usd("gpt-image-1", usage(text=100, cached=40, output=272))
    assert cost == pytest.approx(60 * 5e-6 + 40 * 1.25e-6 + 272 * 40e-6, abs=1e-12)
    assert cost == pytest.approx(0.01123, abs=1e-12)


def test_gpt_image_1_mini_prices() -> None:
    cost = usage_cost_usd("gpt-image-1-mini", usage(text=50, image=200, cached=10, output=625))
    assert cost == pytest.approx(40 * 2e-6 + 10 * 0.2e-6 + 200 * 2.5e-6 + 625 * 8e-6, abs=1e-12)
    assert cost == pytest.approx(0.005582, abs=1e-12)


def test_gpt_image_1_5_prices() -> None:
    cost = usage_cost_usd("gpt-image-1.5", usage(text=50, image=100, cached=20, output=4160))
    assert cost == pytest.approx(30 * 5e-6 + 20 * 1.25e-6 + 100 * 8e-6 + 4160 * 32e-6, abs=1e-12)
    assert cost == pytest.approx(0.134095, abs=1e-12)


def test_usage_without_details_prices_all_input_as_text() -> None:
    cost = usage_cost_usd("gpt-image-1", {"input_tokens": 50, "output_tokens": 4160})
    assert cost == pytest.approx(0.16665, abs=1e-12)


def test_usage_without_token_counts_is_priced_unknown_not_zero() -> None:
    # `usage` may lack any field (API_NOTES.md); a missing count is unknown, and pricing it as
    # zero would let a run blow through --max-cost unnoticed.
    assert usage_cost_usd("gpt-image-1", {}) is None
    assert usage_cost_usd("gpt-image-1", {"total_tokens": 4169}) is None


def test_request_cost_uses_usage_for_token_billed_models() -> None:
    params = {"model": "gpt-image-1", "prompt": "a", "n": 2, "quality": "high"}
    cost = request_cost_usd(params, usage(text=50, output=8320))
    assert cost == pytest.approx(50 * 5e-6 + 8320 * 40e-6, abs=1e-12)


def test_token_billed_request_without_usage_is_unknown() -> None:
    assert request_cost_usd({"model": "gpt-image-1", "prompt": "a"}, None) is None


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"model": "dall-e-3", "quality": "hd", "size": "1792x1024", "n": 1}, 0.12),
        ({"model": "dall-e-3", "quality": "hd", "size": "1024x1792"}, 0.12),
        ({"model": "dall-e-3", "quality": "hd", "size": "1024x1024"}, 0.08),
        ({"model": "dall-e-3", "quality": "standard", "size": "1792x1024"}, 0.08),
        ({"model": "dall-e-3"}, 0.04),  # standard 1024x1024 when left out
        ({"model": "dall-e-2", "size": "256x256", "n": 3}, 0.048),
        ({"model": "dall-e-2", "size": "512x512", "n": 2}, 0.036),
        ({"model": "dall-e-2", "n": 10}, 0.2),  # 1024x1024 when left out
    ],
)
def test_dalle_is_priced_per_image(params: dict[str, Any], expected: float) -> None:
    cost = request_cost_usd({"prompt": "a", **params}, None)
    assert cost == pytest.approx(expected, abs=1e-12)


def test_dalle_ignores_usage() -> None:
    params = {"model": "dall-e-3", "prompt": "a", "quality": "hd", "size": "1792x1024"}
    assert request_cost_usd(params, usage(text=1, output=1_000_000)) == pytest.approx(0.12)


@pytest.mark.parametrize("model", ["chatgpt-image-latest", "my-gateway-model", ""])
def test_unknown_model_is_priced_as_unknown_not_zero(model: str) -> None:
    assert usage_cost_usd(model, usage(text=50, output=4160)) is None
    assert request_cost_usd({"model": model, "prompt": "a"}, usage(text=50, output=4160)) is None


def test_unknown_dalle_size_is_priced_as_unknown() -> None:
    assert request_cost_usd({"model": "dall-e-2", "size": "1792x1024"}, None) is None


def test_price_table_is_named() -> None:
    assert isinstance(PRICE_TABLE, str) and PRICE_TABLE


def test_a_price_file_without_image_in_prices_input_images_alike_in_ledger_and_cap(
    tmp_path: Any,
) -> None:
    """One rule for both: input image tokens at the text rate when no image rate is given."""
    import json

    from batchimg.pricing import PriceTable

    path = tmp_path / "p.json"
    path.write_text(json.dumps({"models": {"gpt-image-1": {"per_1m_tokens": {
        "text_in": 4.0, "image_out": 40.0}}}}))  # fmt: skip
    table = PriceTable.load(path)
    answer = usage(text=10, image=1000, output=272)
    assert table.usage_cost("gpt-image-1", answer) == pytest.approx(
        (10 * 4 + 1000 * 4 + 272 * 40) / 1e6
    )
    params = {"model": "gpt-image-1", "prompt": "x" * 10, "quality": "low", "size": "1024x1024"}
    worst = table.worst_case_usd(params, image_tokens=1000)
    assert worst == pytest.approx((10 * 4 + 1250 * 4 + 272 * 40) / 1e6)  # inputs with headroom


def test_a_bound_or_estimate_that_answers_teach_follows_the_book_after_being_asked() -> None:
    """Bounds and estimates are remembered by request shape only where no answer can change
    them: one resting on learned counts follows the book each time it is asked."""
    table, book = PriceTable.default(), TokenBook()
    params = {"model": "gpt-image-2.6-sunburst", "prompt": "a cathedral", "size": "2560x1440",
              "quality": "max"}  # fmt: skip
    ceiling = table.worst_case(params, 0, book)
    assert ceiling is not None and ceiling.basis == "ceiling"
    assert table.estimate(params, 0, book).basis == "unknown"
    book.add(request_group(params, table.catalog), 1000.0)
    learned = table.worst_case(params, 0, book)
    assert learned is not None and learned.basis == "learned"
    assert learned.cost_usd < ceiling.cost_usd
    assert table.estimate(params, 0, book).basis == "learned"
    published = {"model": "gpt-image-1", "prompt": "a cathedral", "quality": "high"}
    assert table.worst_case(published, 0, book) == table.worst_case(published, 0, None)
