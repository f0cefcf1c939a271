"""How the mock behaves: one frozen value object, checked when made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

#: How 429s say when to retry (see `MockConfig.retry_after_style`).
RetryAfterStyle = Literal["both", "ms", "seconds", "date", "mixed", "none"]


@dataclass(frozen=True, kw_only=True)
class MockConfig:
    """How the mock behaves; the fault rates draw from an RNG seeded with `seed`."""

    api_key: str | None = None  # if set, only this key is accepted; else any non-empty key
    require_auth: bool = True  # False: no auth check at all
    latency_s: float = 0.0  # added before answering every authenticated image request
    # Fault rates: fractions of requests, one seeded draw per request (they must sum to <= 1).
    rate_limit_rate: float = 0.0  # 429 rate_limit_exceeded, with `retry_after_style` headers
    error_rate: float = 0.0  # 500 server_error (JSON envelope)
    html_error_rate: float = 0.0  # 502 with an HTML page, as proxies answer
    truncate_rate: float = 0.0  # 200 whose body is cut off mid-stream
    drop_rate: float = 0.0  # connection closed with no answer at all
    slow_rate: float = 0.0  # answered normally, but `slow_s` later
    slow_s: float = 5.0
    datauri_rate: float = 0.0  # successes whose b64_json carry a data: URI prefix (own draw)
    retry_after_s: float = 0.05  # what the 429s ask for
    #: both: retry-after-ms + retry-after seconds; ms / seconds / date: only that form;
    #: mixed: one of ms / seconds / date per 429 (seeded); none: no header at all
    retry_after_style: RetryAfterStyle = "both"
    #: Hard limits, as providers enforce them: per minute, in slices of max(1 s, 60/limit) s
    #: (so 1200 rpm is 20 requests in each second). Every image answer carries x-ratelimit-*
    #: headers: for requests and images these limits where set; else, and for tokens, generous
    #: advertised ones (`faults.ADVERTISED_RPM`, `ADVERTISED_TPM`) that are never enforced.
    rpm_limit: int | None = None
    ipm_limit: int | None = None  # images per minute (a request weighs its n)
    ratelimit_headers: bool = True  # False: enforce the limits but send no x-ratelimit-* headers
    detailed_images: bool = False  # photo-sized images (~2.5 MB PNG at 1024x1024), for benchmarks
    omit_usage: bool = False  # bill as usual but leave `usage` out of answers, as some gateways do
    #: Bill as usual but answer this as `usage` (a broken or hostile server: a string, a
    #: negative count...). The bill, in `MockRequest.usage`, stays the real one.
    fake_usage: Any = None
    #: Answer every request with this `x-request-id` (a gateway that repeats one).
    fixed_request_id: str | None = None
    #: Answer this many images, whatever `n` asked for (a broken server), billing the same.
    image_count: int | None = None
    quota_after: int | None = None  # after this many requests, every one: 429 insufficient_quota
    auth_fail_after: int | None = None  # after this many requests, every one: 401 (0: always)
    #: As OpenAI itself: models past their shutdown date answer 404 model_not_found, and so do
    #: names it does not know. False (the default): as a gateway that still serves old models.
    enforce_shutdown: bool = False
    today: str | None = None  # YYYY-MM-DD for shutdown checks (default: the real date, UTC)
    # The Batch API (`batches`): how long each phase takes, faults, and its input limits.
    batch_validate_s: float = 0.05  # time in `validating` before the file is checked
    batch_line_s: float = 0.0  # time each line takes in `in_progress` (lines run one by one)
    batch_finalize_s: float = 0.05  # time in `finalizing`
    batch_cancel_s: float = 0.05  # time in `cancelling` (after the line being run, if any)
    #: The completion window: a batch still running this long after its creation expires
    #: (the real one is 24 h; `expires_at` says when).
    batch_expire_after_s: float = 86_400.0
    #: Expire every batch once this many of its lines have run (a deterministic expiry).
    batch_expire_after_lines: int | None = None
    batch_error_rate: float = 0.0  # lines answered 500 server_error (per-batch seeded draws)
    batch_max_lines: int = 50_000  # an input file's most requests (the API's limit)
    batch_max_bytes: int = 200 * 1024 * 1024  # an input file's largest size (the API's limit)
    #: Answer the first upload (`POST /v1/files`), or every new batch (`POST /v1/batches`),
    #: this long after it is made: a client killed meanwhile made something it does not know of.
    upload_delay_s: float = 0.0
    batch_create_delay_s: float = 0.0
    #: Send a batch's result file half, wait this long, then the rest (a download cut short);
    #: only the first download of each file.
    content_stall_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        rates = (
            self.rate_limit_rate,
            self.error_rate,
            self.html_error_rate,
            self.truncate_rate,
            self.drop_rate,
            self.slow_rate,
        )
        if any(not 0.0 <= r <= 1.0 for r in (*rates, self.datauri_rate)) or sum(rates) > 1.0:
            raise ValueError("fault rates must be in [0, 1] and sum to <= 1")
        if self.latency_s < 0 or self.retry_after_s < 0 or self.slow_s < 0:
            raise ValueError("latency_s, slow_s and retry_after_s must be >= 0")
        phases = (
            self.batch_validate_s,
            self.batch_line_s,
            self.batch_finalize_s,
            self.batch_cancel_s,
            self.batch_expire_after_s,
            self.upload_delay_s,
            self.batch_create_delay_s,
            self.content_stall_s,
        )
        if any(s < 0 for s in phases):
            raise ValueError(
                "the batch_*_s, upload_delay_s and content_stall_s durations must be >= 0"
            )
        if not 0.0 <= self.batch_error_rate <= 1.0:
            raise ValueError("batch_error_rate must be in [0, 1]")
        if self.batch_expire_after_lines is not None and self.batch_expire_after_lines < 0:
            raise ValueError("batch_expire_after_lines must be >= 0")
        if self.batch_max_lines < 1 or self.batch_max_bytes < 1:
            raise ValueError("batch_max_lines and batch_max_bytes must be >= 1")
