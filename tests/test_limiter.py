"""The rate limiter: bucket arithmetic on a fake clock, header parsing, pauses, AIMD."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import batchimg
from batchimg.limiter import (
    MAX_PAUSE_S,
    Limiter,
    RateLimitHeaders,
    TokenBucket,
    parse_go_duration,
)
from batchimg.mock import MockConfig, MockServer
from tests.conftest import TEST_KEY
from tests.helpers import ledger


class FakeClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


def limiter(clock: FakeClock, **options: float | bool | None) -> Limiter:
    return Limiter(clock=clock, sleep=clock.sleep, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("12ms", 0.012),
        ("1m30.5s", 90.5),
        ("0s", 0.0),
        ("0", 0.0),
        ("1h2m3s", 3723.0),
        ("250us", 0.00025),
        (" 2s ", 2.0),
    ],
)
def test_go_durations_parse(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [None, "", "abc", "1x", "-1s", "1.5", "s", "1s2", "1m 2s"])
def test_garbage_durations_are_ignored(text: str | None) -> None:
    assert parse_go_duration(text) is None


def test_headers_parse_and_garbage_is_dropped_safely() -> None:
    parsed = RateLimitHeaders.parse(
        {
            "x-ratelimit-limit-requests": "1200",
            "x-ratelimit-remaining-requests": "oops",
            "x-ratelimit-reset-requests": "6m0s",
            "x-ratelimit-limit-tokens": "-5",
            "x-ratelimit-reset-tokens": "12ms",
        }
    )
    assert parsed is not None
    assert parsed.limit_requests == 1200 and parsed.remaining_requests is None
    assert parsed.reset_requests_s == 360.0 and parsed.limit_tokens is None
    assert parsed.reset_tokens_s == pytest.approx(0.012)
    assert RateLimitHeaders.parse({"content-type": "application/json"}) is None


def test_bucket_arithmetic_on_a_fake_clock() -> None:
    clock = FakeClock()
    bucket = TokenBucket(2.0, clock, burst_s=1.0)  # 2 tokens/s, room for 2
    assert bucket.wait_s(1) == 0
    bucket.take(1)
    bucket.take(1)
    assert bucket.wait_s(1) == pytest.approx(0.5)
    clock.now += 0.25
    assert bucket.wait_s(1) == pytest.approx(0.25)
    clock.now += 10
    assert bucket.tokens <= bucket.capacity and bucket.wait_s(2) == 0  # refill is capped


def test_a_weight_larger_than_the_bucket_goes_into_debt_instead_of_deadlocking() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1.0, clock, burst_s=1.0)  # capacity 1
    assert bucket.wait_s(5) == 0  # admitted once the bucket is full
    bucket.take(5)
    assert bucket.tokens == -4
    assert bucket.wait_s(1) == pytest.approx(5.0)  # the debt is paid back in time


async def test_rpm_spaces_requests_evenly() -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=60, adaptive=False)
    times = [await lim.acquire() - 100.0 for _ in range(5)]
    assert times == pytest.approx([0, 1, 2, 3, 4])


async def test_ipm_weighs_a_request_by_its_images() -> None:
    clock = FakeClock()
    lim = limiter(clock, ipm=60, adaptive=False)
    times = [await lim.acquire(images=4) - 100.0 for _ in range(3)]
    assert times == pytest.approx([0, 4, 8])


async def test_tpm_is_corrected_by_actual_usage() -> None:
    clock = FakeClock()
    lim = limiter(clock, tpm=6000, adaptive=False)  # 100 tokens/s, burst 10
    await lim.acquire(tokens=1000)  # estimated 1000: 10 s of debt
    lim.settle_tokens(estimated=1000, actual=100)  # it used only 100
    assert await lim.acquire(tokens=10) - 100.0 == pytest.approx(1.0, abs=0.01)


async def test_a_429_pauses_every_worker_until_the_retry_time() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    await lim.acquire()
    lim.on_rate_limited(2.5, None)
    admitted = [await lim.acquire() for _ in range(3)]
    assert min(admitted) >= 102.5  # nobody went during the pause
    assert lim.stats().rate_limited == 1 and lim.stats().paused_s == pytest.approx(2.5)


async def test_remaining_zero_pauses_until_reset() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    lim.observe(RateLimitHeaders(remaining_requests=0, reset_requests_s=3.0))
    assert await lim.acquire() == pytest.approx(103.0)


async def test_aimd_cuts_on_429_and_recovers_to_the_learned_ceiling() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    lim.observe(RateLimitHeaders(limit_requests=600))  # 10 requests/s ceiling learned
    for _ in range(20):
        await lim.acquire()
    assert clock.now - 100 == pytest.approx(1.9, abs=0.11)  # admitted at the ceiling
    sent_at = await lim.acquire()
    lim.on_rate_limited(0.0, None, sent_at)
    cut = lim.stats().rate_cap_per_min
    assert cut is not None and cut == pytest.approx(600 * 0.8, rel=0.1)
    lim.on_rate_limited(0.0, None, sent_at)  # same burst: no second cut
    assert lim.stats().rate_cap_per_min == cut
    for _ in range(200):  # a long run of successes
        await lim.acquire()
        lim.on_success()
    assert lim.stats().rate_cap_per_min == pytest.approx(600)  # back up, never above


async def test_without_headers_the_first_429_sets_a_rate_below_what_was_sent() -> None:
    clock = FakeClock()
    lim = limiter(clock)
    for _ in range(30):  # 30 requests in 3 s: 10/s
        await lim.acquire()
        clock.now += 0.1
    sent_at = await lim.acquire()
    lim.on_rate_limited(1.0, None, sent_at)
    cap = lim.stats().rate_cap_per_min
    assert cap is not None and cap < 600


async def test_static_limits_ignore_server_feedback_when_not_adaptive() -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=120, adaptive=False)
    lim.on_rate_limited(30.0, RateLimitHeaders(limit_requests=6))
    assert await lim.acquire() == pytest.approx(100.0)  # no global pause, no learned limit
    assert lim.stats().learned_rpm is None and lim.stats().rate_limited == 1


async def test_run_against_a_limited_mock_finishes_every_item_with_few_429s(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest([{"prompt": f"bird {i}", "quality": "low"} for i in range(40)])
    async with MockServer(MockConfig(api_key=TEST_KEY, rpm_limit=1200)) as server:
        summary = await batchimg.arun(
            manifest,
            tmp_path / "out",
            batchimg.RunOptions(base_url=server.base_url, api_key=TEST_KEY, concurrency=16),
        )
        statuses = [r.status for r in server.requests]
    assert summary.ok == 40 and summary.exit_code == 0
    assert statuses.count(429) <= 0.15 * len(statuses)
    assert summary.limiter is not None and summary.limiter.learned_rpm == 1200
    assert sum(r["rate_limited"] for r in ledger(tmp_path / "out")) == statuses.count(429)


async def test_no_request_reaches_the_server_during_a_global_pause(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    # 60 rpm in 1-second slices: one request a second; 429s say when the next slice opens.
    config = MockConfig(api_key=TEST_KEY, rpm_limit=60, ratelimit_headers=False)
    manifest = write_manifest([{"prompt": f"owl {i}", "quality": "low"} for i in range(4)])
    async with MockServer(config) as server:
        summary = await batchimg.arun(
            manifest,
            tmp_path / "out",
            batchimg.RunOptions(base_url=server.base_url, api_key=TEST_KEY, concurrency=4),
        )
        requests = sorted(server.requests, key=lambda r: r.received_at)
    assert summary.ok == 4
    first_429 = next(r for r in requests if r.status == 429)
    burst_end = first_429.received_at + 0.05  # the opening burst was already on its way
    later = [r for r in requests if r.received_at > burst_end]
    assert later, "the limited items were sent again"
    slice_start = int(first_429.received_at) + 1  # the mock's next 1-second slice
    assert all(r.received_at >= slice_start - 0.02 for r in later)


async def test_a_wait_no_per_minute_limit_needs_is_capped_at_a_minute_and_said_once() -> None:
    """Retry-After: 999999999 or an x-ratelimit-reset of 99999h is a broken header: pausing all
    admission that long would stall the run."""
    clock = FakeClock()
    notes: list[tuple[str, str]] = []
    lim = Limiter(clock=clock, sleep=clock.sleep, note=lambda k, m: notes.append((k, m)))
    lim.on_rate_limited(999_999_999.0, None)
    start = clock.now
    await lim.acquire()
    assert clock.now - start == pytest.approx(MAX_PAUSE_S) and MAX_PAUSE_S == 60
    huge = RateLimitHeaders(limit_requests=100, remaining_requests=0, reset_requests_s=99999 * 3600)
    for _ in range(5):  # every answer says it again: the pause stays a minute from now at most
        lim.observe(huge)
    start = clock.now
    await lim.acquire()
    assert clock.now - start <= MAX_PAUSE_S + 1e-9
    assert [k for k, _ in notes] == ["pause:retry-after"] + ["pause:x-ratelimit-reset-requests"] * 5
    assert "999,999,999 s" in notes[0][1]


async def test_a_learned_limit_that_makes_requests_wait_long_is_said() -> None:
    """A server saying 100 tokens a minute while a request weighs 7,000: honoured (it is the
    server's word), but the person running it hears why nothing moves, and how to override."""
    clock = FakeClock()
    notes: list[tuple[str, str]] = []
    lim = Limiter(clock=clock, sleep=clock.sleep, note=lambda k, m: notes.append((k, m)))
    lim.observe(RateLimitHeaders(limit_tokens=100))
    await lim.acquire(tokens=7000)  # the first goes (a bucket starts full), into debt
    start = clock.now
    await lim.acquire(tokens=7000)
    assert clock.now - start > MAX_PAUSE_S  # honoured
    assert [k for k, _ in notes] == ["long-wait:tokens"]
    assert "100 tokens a minute" in notes[0][1] and "--no-adaptive" in notes[0][1]
