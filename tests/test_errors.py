"""Error classification (API_NOTES.md's error table) and the retry policy built on it."""

from __future__ import annotations

from typing import Any

import pytest

from batchimg.errors import (
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
    classify,
)
from batchimg.retry import MAX_SERVER_WAIT_S, RetryPolicy, retrying


def body(code: str | None, type_: str | None = None, message: str = "msg") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


# --- classify: one row per line of API_NOTES.md's error table ---------------------------------


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        # 400: never retried.
        (400, "moderation_blocked", ItemFailed),
        (400, "content_policy_violation", ItemFailed),
        (400, "invalid_value", ItemFailed),
        (400, "unknown_parameter", ItemFailed),
        (400, None, ItemFailed),
        # 401 / 403: every request will fail; stop the run.
        (401, "invalid_api_key", RunFatal),
        (403, "unsupported_country_region_territory", RunFatal),
        (403, None, RunFatal),
        # 404, 413: this item fails as asked.
        (404, "model_not_found", ItemFailed),
        (413, None, ItemFailed),
        (422, None, ItemFailed),
        # 408, 409: retried.
        (408, None, ServerError),
        (409, None, ServerError),
        # 429 rate limit: retried after retry-after.
        (429, "rate_limit_exceeded", RateLimited),
        (429, None, RateLimited),
        # 429 quota: every later request fails too; stop the run.
        (429, "insufficient_quota", RunFatal),
        (429, "billing_hard_limit_reached", RunFatal),
        (429, "credit_balance_exhausted", RunFatal),
        (429, "organization_spend_limit_exceeded", RunFatal),
        (429, "project_spend_limit_exceeded", RunFatal),
        (429, "user_spend_limit_exceeded", RunFatal),
        # 5xx: retried.
        (500, "server_error", ServerError),
        (502, None, ServerError),
        (503, "overloaded", ServerError),
        (504, None, ServerError),
    ],
)
def test_classify_follows_the_api_error_table(
    status: int, code: str | None, expected: type[RequestError]
) -> None:
    exc = classify(status, body(code, "some_type"), request_id="req_1")
    assert type(exc) is expected
    assert exc.info.http_status == status
    assert exc.info.code == code
    assert exc.info.request_id == "req_1"


def test_billing_hard_limit_on_a_400_stops_the_run() -> None:
    # The live Images API answers an exhausted account with HTTP 400, not 429:
    # `400 {"error": {"code": "billing_hard_limit_reached", "type": "invalid_request_error",
    # "message": "Billing hard limit has been reached"}}` (all-in-aigc/aiwallpaper#2,
    # dfinke/PowerShellAI#127, adrianhajdin/project_threejs_ai#59). Every later request fails
    # the same way, so failing item by item would burn through the whole manifest.
    exc = classify(
        400,
        body(
            "billing_hard_limit_reached",
            "invalid_request_error",
            "Billing hard limit has been reached",
        ),
    )
    assert type(exc) is RunFatal


@pytest.mark.parametrize("cls", [RateLimited, ServerError, TransportError])
def test_retryable_classes(cls: type[RequestError]) -> None:
    assert issubclass(cls, Retryable)


@pytest.mark.parametrize("cls", [ItemFailed, RunFatal])
def test_final_classes_are_not_retryable(cls: type[RequestError]) -> None:
    assert not issubclass(cls, Retryable)
    assert issubclass(cls, RequestError)


def test_error_tree_roots() -> None:
    assert issubclass(RequestError, BatchimgError)
    assert issubclass(UsageError, BatchimgError)
    assert not issubclass(UsageError, RequestError)


def test_classify_keeps_the_apis_words() -> None:
    exc = classify(
        400,
        body("moderation_blocked", "image_generation_user_error", "Rejected by safety system."),
        request_id="req_abc",
    )
    assert exc.info == ErrorInfo(
        message="Rejected by safety system.",
        code="moderation_blocked",
        type="image_generation_user_error",
        http_status=400,
        request_id="req_abc",
    )
    assert str(exc) == "HTTP 400 moderation_blocked: Rejected by safety system."


@pytest.mark.parametrize("payload", [None, "<html>502</html>", [1], {"error": "oops"}, {}])
def test_classify_without_an_error_object_still_names_the_status(payload: Any) -> None:
    exc = classify(502, payload)
    assert type(exc) is ServerError
    assert exc.info.code is None
    assert exc.info.type is None
    assert "502" in exc.info.message


def test_classify_stringifies_a_numeric_code() -> None:
    exc = classify(400, {"error": {"message": "m", "code": 1234}})
    assert exc.info.code == "1234"


@pytest.mark.parametrize("status", [429, 503, 500])
def test_classify_carries_the_server_delay_on_retryable_errors(status: int) -> None:
    exc = classify(status, body(None), retry_after_s=4.5)
    assert isinstance(exc, Retryable)
    assert exc.retry_after_s == 4.5


def test_should_retry_false_overrides_a_retryable_status() -> None:
    assert type(classify(500, body("server_error"), should_retry=False)) is ItemFailed
    assert type(classify(429, body("rate_limit_exceeded"), should_retry=False)) is ItemFailed


def test_should_retry_true_overrides_a_final_status() -> None:
    exc = classify(400, body("invalid_value"), should_retry=True, retry_after_s=1.0)
    assert isinstance(exc, Retryable)
    assert exc.retry_after_s == 1.0
    assert type(classify(429, body(None), should_retry=True)) is RateLimited


@pytest.mark.parametrize(
    ("status", "code"), [(401, "invalid_api_key"), (429, "insufficient_quota")]
)
def test_should_retry_never_revives_a_run_fatal_error(status: int, code: str) -> None:
    assert type(classify(status, body(code), should_retry=True)) is RunFatal


def test_error_info_record_has_the_ledger_fields() -> None:
    info = ErrorInfo(message="m", code="c", type="t", http_status=400, request_id="r")
    assert info.as_record() == {
        "code": "c",
        "type": "t",
        "message": "m",
        "http_status": 400,
        "request_id": "r",
    }


# --- retrying ---------------------------------------------------------------------------------


def info(message: str = "x") -> ErrorInfo:
    return ErrorInfo(message=message)


async def drive(policy: RetryPolicy, outcomes: list[Any]) -> tuple[Any, int, list[float]]:
    """Run `retrying` over a call that raises or returns `outcomes` in turn.

    Returns (result, attempts, delays slept); the fake sleep records delays instead of waiting.
    """
    delays: list[float] = []
    attempts = 0

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)

    async def call() -> Any:
        nonlocal attempts
        outcome = outcomes[attempts]
        attempts += 1
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    result = None
    try:
        async for attempt in retrying(policy, sleep=fake_sleep):
            with attempt:
                result = await call()
    except Exception as exc:
        return exc, attempts, delays
    return result, attempts, delays


async def test_server_requested_delay_is_waited_exactly() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_base_s=0.01, max_backoff_s=0.05)
    result, attempts, delays = await drive(policy, [RateLimited(info(), retry_after_s=2.5), "ok"])
    assert result == "ok"
    assert attempts == 2
    assert delays == [2.5]


async def test_zero_server_delay_is_honoured_not_replaced_by_backoff() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_base_s=5.0, max_backoff_s=5.0)
    _, _, delays = await drive(policy, [ServerError(info(), retry_after_s=0.0), "ok"])
    assert delays == [0.0]


async def test_without_server_delay_backoff_stays_within_the_cap() -> None:
    policy = RetryPolicy(max_attempts=6, backoff_base_s=0.5, max_backoff_s=2.0)
    errors = [ServerError(info(str(i))) for i in range(5)]
    for _ in range(20):  # the wait is random: check many draws
        _, attempts, delays = await drive(policy, [*errors, "ok"])
        assert attempts == 6
        assert len(delays) == 5
        for k, delay in enumerate(delays):
            assert 0 <= delay <= min(policy.max_backoff_s, policy.backoff_base_s * 2**k)


@pytest.mark.parametrize(
    "error",
    [RateLimited(info()), ServerError(info()), TransportError(info())],
    ids=["rate-limited", "server-error", "transport-error"],
)
async def test_retryable_errors_are_retried(error: RequestError) -> None:
    policy = RetryPolicy(max_attempts=3, backoff_base_s=0.01, max_backoff_s=0.01)
    result, attempts, delays = await drive(policy, [error, "ok"])
    assert result == "ok"
    assert attempts == 2
    assert len(delays) == 1


@pytest.mark.parametrize(
    "error",
    [ItemFailed(info()), RunFatal(info()), ValueError("bug")],
    ids=["item-failed", "run-fatal", "not-a-request-error"],
)
async def test_final_errors_are_not_retried(error: Exception) -> None:
    policy = RetryPolicy(max_attempts=3, backoff_base_s=0.01)
    raised, attempts, delays = await drive(policy, [error, "ok"])
    assert raised is error
    assert attempts == 1
    assert delays == []


async def test_gives_up_after_max_attempts_and_reraises_the_last_error() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_base_s=0.01, max_backoff_s=0.05)
    errors = [ServerError(info("first")), RateLimited(info("second")), ServerError(info("third"))]
    raised, attempts, delays = await drive(policy, [*errors, "never reached"])
    assert raised is errors[2]
    assert attempts == 3
    assert len(delays) == 2


async def test_one_attempt_means_no_retry() -> None:
    error = ServerError(info())
    raised, attempts, delays = await drive(RetryPolicy(max_attempts=1), [error, "ok"])
    assert raised is error
    assert attempts == 1
    assert delays == []


async def test_a_final_error_after_retries_stops_at_once() -> None:
    policy = RetryPolicy(max_attempts=5, backoff_base_s=0.01)
    fatal = RunFatal(info("no quota"))
    raised, attempts, delays = await drive(policy, [RateLimited(info(), retry_after_s=1.0), fatal])
    assert raised is fatal
    assert attempts == 2
    assert delays == [1.0]


async def test_no_try_starts_once_the_deadline_would_pass() -> None:
    # The server asks for 5 s, the deadline is 3 s after the first try: the error stands.
    policy = RetryPolicy(max_attempts=6, deadline_s=3.0)
    wait = ServerError(info(), retry_after_s=5.0)
    raised, attempts, delays = await drive(policy, [wait, "ok"])
    assert raised is wait
    assert (attempts, delays) == (1, [])
    # A wait that ends before the deadline is waited.
    raised, attempts, delays = await drive(policy, [ServerError(info(), retry_after_s=1.0), "ok"])
    assert (raised, attempts, delays) == ("ok", 2, [1.0])


async def test_attempts_are_numbered_from_one_and_a_success_ends_the_loop() -> None:
    numbers: list[int] = []
    errors = [ServerError(info()), TransportError(info())]

    async def no_wait(_: float) -> None:
        return None

    async for attempt in retrying(RetryPolicy(max_attempts=5), sleep=no_wait):
        with attempt:
            numbers.append(attempt.number)
            if errors:
                raise errors.pop(0)
    assert numbers == [1, 2, 3]


async def test_a_server_wait_is_capped_and_backoff_grows_within_its_ceiling() -> None:
    policy = RetryPolicy(backoff_base_s=0.5, max_backoff_s=4.0)
    assert policy.delay_s(1, RateLimited(info(), retry_after_s=1e6)) == MAX_SERVER_WAIT_S
    for attempt, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (40, 4.0), (10_000, 4.0)):
        delays = [policy.delay_s(attempt, ServerError(info())) for _ in range(50)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling / 4  # random within the ceiling, not stuck at zero
