"""Run options: every knob of `batchimg run`, with its default, defined once.

`RunOptions` is what `batchimg.arun` takes, and the CLI is built from it: each field that has a
`Flag` becomes one `batchimg run` option (`cli.run_options`), with the field's default as the
flag's default. A renamed or retyped option is therefore caught by mypy at every call site, and
the CLI, the Python API and the engine cannot disagree on a default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import click

from .backends.profiles import PROFILES, ClientConfig
from .defaults import Defaults
from .errors import UsageError
from .layouts import DEFAULT_SHARD_SIZE, LAYOUT_NAMES, LAYOUTS, Layout
from .retry import RetryPolicy

if TYPE_CHECKING:
    from .catalog import Catalog
    from .pricing import PriceTable


#: When stderr is not a terminal: seconds between progress lines (`--log-every`).
LOG_EVERY_S = 30.0


@dataclass(frozen=True)
class Flag:
    """How a field appears on the command line: its declarations, help text and the rest of
    `click.option`'s arguments (type, metavar, is_flag...)."""

    decls: tuple[str, ...]
    help: str
    click: Mapping[str, Any]


def _flag(default: Any, *decls: str, help: str, **click_args: Any) -> Any:
    return field(default=default, metadata={"flag": Flag(decls, help, click_args)})


def flag_of(name: str) -> Flag:
    """The command-line form of one option (for commands other than `run` that share it)."""
    return RunOptions.__dataclass_fields__[name].metadata["flag"]  # type: ignore[no-any-return]


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How to run: where the API is, how hard to push it, what to spend, how to lay out output.

    Checked when made (UsageError, which the CLI turns into exit 2, for a bad combination).
    """

    # -- where the API is --
    provider: str = _flag(
        "openai",
        "--provider",
        help="API preset: default base URL and key variable.",
        type=click.Choice(list(PROFILES)),
    )
    base_url: str | None = _flag(
        None,
        "--base-url",
        help="API base URL, e.g. https://api.openai.com/v1 "
        "(for azure: https://RESOURCE.openai.azure.com).",
    )
    api_key: str | None = field(default=None, repr=False)  # Python only: never a flag
    api_key_env: str | None = _flag(
        None,
        "--api-key-env",
        help="Read the API key from this environment variable instead of "
        "BATCHIMG_API_KEY / the provider's usual one.",
        metavar="NAME",
    )
    endpoints: Path | None = _flag(
        None,
        "--endpoints",
        help="A JSON (Lines) file of several keys or deployments to share the work: base_url, "
        "key_env (the variable holding its key), optional name, provider, rpm, ipm, tpm. "
        "Each request goes to the first with headroom.",
        type=click.Path(path_type=Path, dir_okay=False),
        metavar="FILE",
    )
    mock: bool = _flag(
        False,
        "--mock",
        help="Run against the embedded mock server (no key, no network, real images).",
        is_flag=True,
    )
    azure_deployment: str | None = _flag(
        None, "--azure-deployment", help="Azure deployment name (default: the model name)."
    )
    azure_api_version: str = _flag(
        ClientConfig.api_version, "--azure-api-version", help="Azure api-version query parameter."
    )
    check_models: bool = _flag(
        False,
        "--check-models",
        help="Before sending, ask the server's GET /models whether it still serves the "
        "manifest's models; exit 2 if one is missing or past its shutdown date.",
        is_flag=True,
    )

    # -- how hard to push it --
    concurrency: int = _flag(
        8, "--concurrency", help="Requests in flight at most.", type=click.IntRange(min=1)
    )
    max_attempts: int = _flag(
        RetryPolicy.max_attempts,
        "--max-attempts",
        help="Tries per item for rate limits, 5xx and network errors.",
        type=click.IntRange(min=1),
    )
    backoff_base_s: float = RetryPolicy.backoff_base_s  # Python only, as the next
    max_backoff_s: float = RetryPolicy.max_backoff_s
    item_deadline_s: float | None = _flag(
        None,
        "--item-deadline",
        help="Seconds after an item's first try when no new try starts (default: no deadline).",
        type=click.FloatRange(min=1),
    )
    rpm: float | None = _flag(
        None,
        "--rpm",
        help="Requests per minute to send at most (default: learn from the server).",
        type=click.FloatRange(min=0.01),
    )
    ipm: float | None = _flag(
        None,
        "--ipm",
        help="Images per minute at most; a request counts its n (gpt-image tiers: 5-250).",
        type=click.FloatRange(min=0.01),
    )
    tpm: float | None = _flag(
        None,
        "--tpm",
        help="Tokens per minute at most, estimated from the published token table.",
        type=click.FloatRange(min=1),
    )
    adaptive_rate: bool = _flag(
        True,
        "--no-adaptive",
        help="Do not learn limits from x-ratelimit-* headers and 429s; use only --rpm/--ipm/--tpm.",
        is_flag=True,
        flag_value=False,
    )
    stall_timeout_s: float = _flag(
        900.0,
        "--stall-timeout",
        help="Stop the run (exit 3) if no request finishes for this many seconds.",
        type=click.FloatRange(min=0, min_open=True),
    )
    grace_period_s: float = _flag(
        30.0,
        "--grace-period",
        help="After the first Ctrl-C, seconds in-flight requests get to finish.",
        type=click.FloatRange(min=0),
    )
    timeout_s: float = _flag(
        ClientConfig.timeout_s,
        "--timeout",
        help="Seconds one request may take in all.",
        type=click.FloatRange(min=0, min_open=True),
    )
    connect_timeout_s: float = _flag(
        ClientConfig.connect_timeout_s,
        "--connect-timeout",
        help="Seconds to wait for a connection.",
        type=click.FloatRange(min=0.1),
    )

    # -- what to spend, and what to accept --
    max_cost_usd: float | None = _flag(
        None,
        "--max-cost",
        help="Budget cap in USD, never exceeded: each request's worst case is reserved before "
        "it is sent. Spend already in this --out ledger counts against it, so raising the cap "
        "and re-running continues where the money ran out.",
        type=click.FloatRange(min=0, min_open=True),
        metavar="USD",
    )
    prices: str | Path | PriceTable | None = _flag(
        None,
        "--prices",
        help="JSON price file that overrides or extends the built-in prices, per model.",
        type=click.Path(dir_okay=False, path_type=Path),
    )
    catalog: str | Path | Catalog | None = _flag(
        None,
        "--catalog",
        help="JSON catalog file that overlays or extends the built-in one per model (rules, "
        "token accounting, prices, lifecycle): same shape as batchimg/catalog.json.",
        type=click.Path(dir_okay=False, path_type=Path),
    )
    from_ledger: tuple[str | Path, ...] = _flag(
        (),
        "--from-ledger",
        help="Other runs' output directories (or ledgers) whose answers bound what requests "
        "like them cost, so --max-cost starts from learned token counts (repeat for several).",
        multiple=True,
        metavar="DIR_OR_LEDGER",
    )
    max_answer_mb: float | None = _flag(
        None,
        "--max-answer-mb",
        help="The most an answer (or a downloaded image) may weigh, decompressed; more fails "
        "its item. [default: derived per request from its size, format, frames and n]",
        type=click.FloatRange(min=0.01),
        metavar="MB",
    )

    # -- the Batch API --
    batch_api: bool = _flag(
        False,
        "--batch-api",
        help="Send the pending items through OpenAI's Batch API (half the price, answered "
        "within 24 h) instead of one request each; re-running collects, resumes and retries.",
        is_flag=True,
    )
    poll_interval_s: float = _flag(
        60.0,
        "--poll-interval",
        help="With --batch-api: seconds between looks at the batches (each wait drawn "
        "within 20 % of it).",
        type=click.FloatRange(min=0.01),
        metavar="S",
    )
    no_wait: bool = _flag(
        False,
        "--no-wait",
        help="With --batch-api: submit (or collect what is finished) and exit at once; exit "
        "status 75 while batches are pending (run the same command again later).",
        is_flag=True,
    )
    stragglers: str = _flag(
        "batch",
        "--stragglers",
        help="With --batch-api: where lines the Batch API could not run (5xx, expired, "
        "cancelled) go again: a new batch, or the online API at full price.",
        type=click.Choice(["batch", "online"]),
    )
    batch_max_lines: int = 50_000  # Python only: an input file's most lines (the API's limit)
    batch_max_bytes: int = 200 * 2**20  # and largest size

    # -- how the output is laid out --
    layout: Layout = _flag(
        "imagefolder",
        "--format",
        help="Output layout: imagefolder (images/ + metadata.jsonl, loads with `datasets`) or "
        "webdataset (tar shards under shards/, each image with its .json and .txt).",
        type=click.Choice(LAYOUT_NAMES),
    )
    shard_size: int | None = _flag(
        None,
        "--shard-size",
        help="Images per webdataset shard (the last may be shorter). "
        f"[default: {DEFAULT_SHARD_SIZE}]",
        type=click.IntRange(min=1),
    )

    # -- output in object storage (--out s3://bucket/prefix) --
    state_dir: Path | None = _flag(
        None,
        "--state",
        help="With --out URL: the local directory for the run's state (the ledger's working "
        "copy, files on their way up). [default: a directory in ~/.cache/batchimg keyed by "
        "the URL]",
        type=click.Path(path_type=Path, file_okay=False),
        metavar="DIR",
    )
    upload_every_s: float = _flag(
        10.0,
        "--upload-every",
        help="With --out URL: seconds between uploads of the ledger's new lines to the bucket "
        "(also at the end, and on every stop).",
        type=click.FloatRange(min=0.1),
        metavar="S",
    )

    # -- many workers (Ray) --
    ray: str | None = _flag(
        None,
        "--ray",
        help="Run on Ray workers: 'local' starts a Ray instance on this machine; an address "
        "(or 'auto', RAY_ADDRESS) joins a cluster. Needs batchimg[ray].",
        metavar="ADDRESS|local",
    )
    workers: int | None = _flag(
        None,
        "--workers",
        help="With --ray: how many workers (each runs --concurrency requests at most). "
        "[default: 2]",
        type=click.IntRange(min=1, max=256),
        metavar="N",
    )

    # -- what manifest lines leave out (their flags: `cli.default_options`) --
    defaults: Defaults = field(default_factory=Defaults)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # the flags' own ranges hold for Python callers too
            flag, value = f.metadata.get("flag"), getattr(self, f.name)
            kind = flag.click.get("type") if flag is not None else None
            if flag is not None and isinstance(kind, (click.IntRange, click.FloatRange)):
                try:
                    if value is not None:
                        kind.convert(value, None, None)
                except click.BadParameter as exc:
                    raise UsageError(f"{flag.decls[0]}: {exc.message}") from None
        if self.provider not in PROFILES:
            choices = ", ".join(PROFILES)
            raise UsageError(f"unknown provider {self.provider!r}: choose one of {choices}")
        if self.max_cost_usd is not None and not self.max_cost_usd > 0:  # NaN passes a range
            raise UsageError(
                f"--max-cost must be a positive amount in USD, got {self.max_cost_usd}"
            )
        if self.layout not in LAYOUTS:  # the registry, which a program may extend
            raise UsageError(f"unknown --format {self.layout!r}: choose {' or '.join(LAYOUTS)}")
        if not self.batch_api:
            if self.no_wait or self.stragglers != "batch":
                what = "--no-wait" if self.no_wait else "--stragglers"
                raise UsageError(f"{what} needs --batch-api")
        elif self.mock and self.no_wait:
            raise UsageError(
                "--no-wait needs a server that outlives the run: --mock runs one inside it "
                "(start `batchimg mock` and give --base-url instead)"
            )
        if self.stragglers not in ("batch", "online"):
            raise UsageError(f"--stragglers: choose batch or online, not {self.stragglers!r}")
        if self.batch_max_lines < 1 or self.batch_max_bytes < 1024:
            raise UsageError("batch_max_lines must be >= 1 and batch_max_bytes >= 1024")
        if self.base_url is not None and "@" in urlsplit(self.base_url).netloc:
            raise UsageError("--base-url must not hold credentials (user:password@): give the "
                             "key through the environment")  # fmt: skip
        if self.ray is not None:
            self._check_ray()
        elif self.workers is not None:
            raise UsageError("--workers is for --ray (local, or a cluster's address)")
        if self.endpoints is not None:
            given = [flag for flag, on in (("--base-url", self.base_url), ("--mock", self.mock),
                     ("--batch-api", self.batch_api), ("--api-key-env", self.api_key_env),
                     ("--azure-deployment", self.azure_deployment),
                     ("--check-models", self.check_models)) if on]  # fmt: skip
            if given or self.api_key is not None:
                what = ", ".join(given) or "api_key"
                raise UsageError(
                    f"--endpoints names each endpoint's URL and key variable: drop {what}"
                )
        if self.shard_size is not None and self.layout != "webdataset":
            raise UsageError("--shard-size needs --format webdataset")

    def _check_ray(self) -> None:
        if not self.ray or not self.ray.strip():
            raise UsageError("--ray needs 'local' or a cluster address (host:port, 'auto')")
        if self.batch_api:
            raise UsageError(
                "--ray runs online requests; --batch-api needs no workers (OpenAI runs the "
                "batch): drop one of them"
            )
        if self.layout != "imagefolder":
            raise UsageError(
                f"--ray writes the imagefolder layout; --format {self.layout} is for one "
                "process (its shards are packed by a single writer)"
            )
        if self.check_models:
            raise UsageError("--check-models is for one process: check once without --ray")
        if self.api_key is not None:
            raise UsageError(
                "with --ray the workers read the API key from their environment (a local Ray "
                "instance inherits yours): set it there instead of passing api_key"
            )

    @property
    def worker_count(self) -> int:
        """How many Ray workers (`--workers`, default 2)."""
        return self.workers or 2

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            backoff_base_s=self.backoff_base_s,
            max_backoff_s=self.max_backoff_s,
            deadline_s=self.item_deadline_s,
        )

    @property
    def images_per_shard(self) -> int:
        return self.shard_size or DEFAULT_SHARD_SIZE

    @property
    def max_answer_bytes(self) -> int | None:
        """The most an answer may weigh; None: derived per request (`specs.max_answer_bytes`)."""
        return None if self.max_answer_mb is None else int(self.max_answer_mb * 2**20)
