"""The `batchimg` command: a thin shell over the Python API (`batchimg.api`)."""

from __future__ import annotations

import dataclasses
import functools
import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import click

from .config import check_defaults, check_manifest, load_run_catalog
from .defaults import Defaults
from .errors import UsageError
from .options import LOG_EVERY_S, Flag, RunOptions, flag_of

if TYPE_CHECKING:
    from .catalog import Catalog
    from .engine import Summary
    from .view import Mode

FC = TypeVar("FC", bound=Callable[..., Any])

#: The image formats batchimg can verify and store: `specs.IMAGE_MIME`'s keys, written out so
#: that --help does not import the rules engine and the catalog (a test keeps the two in step).
OUTPUT_FORMATS = ("png", "jpeg", "webp", "gif", "svg")


#: The flags that fill what manifest lines leave out (`Defaults`), shared by every command that
#: reads a manifest. Values are checked against the catalog (with any --catalog overlay), so a
#: model the next catalog adds takes its new values without a new batchimg.
_DEFAULT_OPTIONS: list[Callable[[Any], Any]] = [
    click.option(
        "--model",
        help="Model for lines that name none. [default: the catalog's default model, "
        "gpt-image-2.6-sunburst; gpt-image-1 with --provider modelverse]",
    ),
    click.option(
        "--n", "n", type=click.IntRange(1, 10), help="Images per prompt for lines that set none."
    ),
    click.option(
        "--size",
        metavar="WxH|auto",
        help="Size for lines that set none and whose model takes it (others keep the API's); "
        "gpt-image-2 and later take custom sizes such as 1536x864.",
    ),
    click.option(
        "--quality",
        metavar="Q",
        help="Quality for lines that set none and whose model takes it: low, medium, high, "
        "auto; xhigh and max on gpt-image-2.5 and later (`batchimg models` lists them).",
    ),
    click.option(
        "--output-format",
        type=click.Choice(list(OUTPUT_FORMATS)),
        help="Image format for lines that set none and whose model takes it (gif and svg: "
        "gpt-image-2.6).",
    ),
    click.option(
        "--output-compression",
        type=click.IntRange(0, 100),
        help="0-100, for jpeg/webp lines (sent with no other format).",
    ),
    click.option(
        "--background",
        type=click.Choice(["transparent", "opaque", "auto"]),
        help="transparent needs png or webp output.",
    ),
    click.option(
        "--moderation",
        type=click.Choice(["low", "auto"]),
        help="Moderation level for generation lines that set none.",
    ),
    click.option(
        "--complexity",
        type=click.Choice(["low", "medium", "high"]),
        help="Planning effort for lines whose model takes it (gpt-image-2.6).",
    ),
    click.option(
        "--frame-count",
        type=click.IntRange(2, 16),
        help="Frames for gif lines that set none (default 9).",
    ),
    click.option(
        "--safety-identifier",
        metavar="ID",
        help="A hashed id of your end user, sent with every line that sets none.",
    ),
]


def default_options(command: FC) -> FC:
    """Add the manifest-default flags; the command receives them as `defaults: Defaults`
    (checked against the catalog by the command, once it knows the catalog)."""

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        fields = dataclasses.fields(Defaults)
        defaults = Defaults(**{f.name: kwargs.pop(f.name) for f in fields})
        return command(defaults=defaults, **kwargs)

    for option in reversed(_DEFAULT_OPTIONS):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


def _json(data: Any, *, indent: bool = True) -> str:
    """`data` as JSON, for a command's json output (orjson, and json with it, 2 ms, are
    imported here: `--help` does not need them)."""
    import orjson

    return orjson.dumps(data, option=orjson.OPT_INDENT_2 if indent else 0).decode()


def _usage_error(exc: UsageError) -> click.UsageError:
    return click.UsageError(str(exc))


def _checked(defaults: Defaults, catalog: Catalog) -> Defaults:
    """The defaults, checked against the catalog (click.UsageError, exit 2, if one is bad)."""
    try:
        check_defaults(defaults, catalog)
    except UsageError as exc:
        raise _usage_error(exc) from None
    return defaults


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="batchimg")
def cli() -> None:
    """Generate images in bulk from a JSONL manifest, fast, resumably, with a cost ledger."""


def run_options(command: FC) -> FC:
    """Add one flag per `RunOptions` field that has one (its default is the field's), plus the
    manifest-default flags; the command receives them as `options: RunOptions`."""

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        values = {f.name: kwargs.pop(f.name) for f in _flagged()}
        values["from_ledger"] = tuple(values["from_ledger"])
        try:
            options = RunOptions(defaults=kwargs.pop("defaults"), **values)
        except UsageError as exc:
            raise _usage_error(exc) from None
        return command(options=options, **kwargs)

    wrapped: Any = default_options(wrapper)
    for f in reversed(_flagged()):
        flag: Flag = f.metadata["flag"]
        shown = f.default is not None and not isinstance(f.default, bool) and f.default != ()
        wrapped = click.option(
            *flag.decls, f.name, default=f.default, show_default=shown, help=flag.help,
            **flag.click,
        )(wrapped)  # fmt: skip
    return wrapped  # type: ignore[no-any-return]


def _flagged() -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(RunOptions) if "flag" in f.metadata]


def _shared_option(name: str, help_text: str | None = None) -> Callable[[FC], FC]:
    """A run flag that another command takes too (`--catalog`, `--prices`)."""
    flag = flag_of(name)
    default = RunOptions.__dataclass_fields__[name].default
    return click.option(
        *flag.decls, name, default=default, help=help_text or flag.help, **flag.click
    )


@cli.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option(
    "--out",
    "out",
    required=True,
    metavar="DIR_OR_URL",
    help="Output directory (images/ and ledger.jsonl go here), or a bucket's URL "
    "(s3://bucket/prefix, gs://...; pip install 'batchimg[s3]'). Re-use it to resume.",
)
@run_options
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    help="Print only the end summary (no progress, no per-item errors).",
)
@click.option(
    "--log-every",
    "log_every_s",
    type=click.FloatRange(min=0.01),
    default=LOG_EVERY_S,
    show_default=True,
    help="When stderr is not a terminal (cron, CI, nohup): seconds between progress lines.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Progress and error lines as key=value text or JSON.",
)
def run(
    manifest: Path,
    out: str,
    options: RunOptions,
    quiet: bool,
    log_every_s: float,
    log_format: Literal["text", "json"],
) -> None:
    """Generate every image in MANIFEST into --out; re-running the same command resumes.

    Exit status: 0 all ok, 1 some items failed, 2 bad invocation (or, against OpenAI, a
    model past its shutdown date), 3 stopped early (bad key, quota, budget), 75 batches still
    running (--batch-api: run it again later), 130 interrupted.
    """
    try:
        from .manifest import materialized  # within the try: a Ctrl-C here is said as below

        with materialized(manifest) as (path, inputs_dir):
            check_manifest(path)
            from .view import ProgressView, count_items  # the engine's events: for a run

            mode: Mode = "quiet" if quiet else "live" if sys.stderr.isatty() else "lines"
            view = ProgressView(mode=mode, total=count_items(path), log_every_s=log_every_s,
                                log_format=log_format)  # fmt: skip
            collecting = gc.isenabled()
            gc.disable()  # the engine's modules load with no collector pass over them
            try:
                from .api import arun  # the engine: only for a run
            finally:
                # What start-up made (modules, classes) lives for the whole run: keep it out of
                # every collection, which otherwise walks it again and again on a long run.
                gc.freeze()
                if collecting:
                    gc.enable()
            try:
                import anyio

                summary = anyio.run(
                    functools.partial(
                        arun,
                        path,
                        out,
                        options,
                        inputs_dir=inputs_dir,
                        progress=view,
                        handle_signals=True,
                    )
                )
            finally:
                view.close()
    except UsageError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:  # before the engine took over the signal: nothing was sent
        click.echo("interrupted before the run started", err=True)
        sys.exit(130)
    if log_format == "json":
        click.echo(_json({"event": "summary", **summary_json(summary)}, indent=False), err=True)
    else:
        click.echo(format_summary(summary, warnings_shown=not quiet), err=True)
    sys.exit(summary.exit_code)


def summary_json(summary: Summary) -> dict[str, Any]:
    """The end summary as data (for --log-format json)."""
    s = summary
    return {
        "ok": s.ok, "failed": s.failed, "already_done": s.skipped,
        "not_attempted": s.not_attempted, "pending": s.pending, "images": s.images,
        "input_tokens": s.input_tokens,
        "output_tokens": s.output_tokens, "cost_usd": round(s.cost_usd, 6),
        "spent_total_usd": round(s.spent_total_usd, 6), "wall_s": round(s.wall_s, 3),
        "failures": s.failures, "stop_reason": s.stop_reason, "interrupted": s.interrupted,
        "rate_limited": s.limiter.rate_limited if s.limiter else 0,
        "held_back_usd": None if s.held_back_usd is None else round(s.held_back_usd, 6),
        "unpriced_extra_usage": s.unpriced_extra, "warnings": s.warnings,
        "unknown_cost_answers": s.unknown_costs,
        "unknown_cost_bound_usd": round(s.cost_bound_usd, 6),
        "ledger": s.ledger_at or str(s.ledger_path), "parked": s.parked,
        "images_at": str(s.images_at or s.out_dir / "images"),
        "exit_code": s.exit_code,
    }  # fmt: skip


def format_summary(summary: Summary, *, warnings_shown: bool = True) -> str:
    """The end-of-run summary a person reads (`warnings_shown`: the log already has them)."""
    s = summary
    lines = [
        f"batchimg: {s.ok} ok, {s.failed} failed, {s.skipped} already done"
        + (f", {s.not_attempted} not attempted" if s.not_attempted else "")
        + (f", {s.pending} pending" if s.pending else "")
        + (f", {s.parked} parked (uploaded by the next run)" if s.parked else ""),
        f"  images: {s.images}   tokens: {s.input_tokens:,} in / {s.output_tokens:,} out"
        f"   cost: ${s.cost_usd:.4f}" + (f" (+{s.unpriced} unpriced)" if s.unpriced else ""),
        f"  wall time: {s.wall_s:.1f} s   images: {s.images_at or s.out_dir / 'images'}"
        f"   ledger: {s.ledger_at or s.ledger_path}",
    ]
    # Limits learned from headers are said only when they bit (every answer carries them).
    if s.limiter is not None and (s.limiter.rate_limited or s.limiter.paused_s > 0):
        lim = s.limiter
        learned = ", ".join(
            f"{value:,} {unit}"
            for value, unit in (
                (lim.learned_rpm, "rpm"),
                (lim.learned_ipm, "ipm"),
                (lim.learned_tpm, "tpm"),
            )
            if value
        )
        lines.append(
            f"  rate limits: {lim.rate_limited} x 429, paused {lim.paused_s:.1f} s"
            + (f", learned {learned}" if learned else "")
        )
    if s.failures:
        counts = ", ".join(f"{code} x{count}" for code, count in sorted(s.failures.items()))
        lines.append(f"  failures: {counts} (details in the ledger)")
    if s.unknown_costs:
        lines.append(
            f"  {s.unknown_costs} answers were (or may have been) billed at a cost nobody can "
            f"tell (no usage, unreadable usage, cut off): counted at their bound, "
            f"${s.cost_bound_usd:.4f}, in the ledger and against the cap"
        )
    if s.unpriced_extra:
        lines.append(
            f"  {s.unpriced_extra} answers carry extra usage no price covers (svg_usage: the SVG "
            "author's tokens), not in the cost; see extra_usage in the ledger"
        )
    if s.spent_total_usd > s.cost_usd + 1e-9 and not (s.stop_reason or "").startswith("budget"):
        lines.append(f"  spent in this ledger over all runs: ${s.spent_total_usd:.4f}")
    if s.held_back_usd is not None:
        lines.append(f"  held back under the cap: ${s.held_back_usd:.4f}")
    if s.warnings:
        if warnings_shown:
            lines.append(f"  {len(s.warnings)} warning(s), printed above")
        else:
            lines.extend(f"  warning: {w}" for w in s.warnings)
    if s.pending and not (s.interrupted or s.stop_reason):
        lines.append(
            f"  {s.pending} items are taken but not answered yet: run the same command again "
            "later to collect them"
        )
    if s.interrupted:
        lines.append("  interrupted: re-run the same command to resume")
    elif s.stop_reason:
        lines.append(f"  stopped early: {s.stop_reason}")
    return "\n".join(lines)


@cli.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@default_options
@_shared_option("catalog")
def validate(manifest: Path, defaults: Defaults, catalog: Path | None) -> None:
    """Check every line of MANIFEST (edit inputs included) without sending anything.

    Prints each problem as MANIFEST:LINE: reason and each warning (a model the catalog does not
    know, a retired one) once, then a summary; exit 1 if any line is bad.
    """
    from .manifest import Refusal, materialized, survey_manifest

    try:
        the_catalog = load_run_catalog(catalog)
    except UsageError as exc:
        raise _usage_error(exc) from None
    defaults = _checked(defaults, the_catalog)
    good = bad = 0

    def warn(message: str) -> None:
        click.echo(f"{manifest}: warning: {message}")

    with materialized(manifest) as (path, inputs_dir):
        try:
            check_manifest(path)
        except UsageError as exc:
            raise _usage_error(exc) from None
        lines = survey_manifest(
            path, defaults, catalog=the_catalog, warn=warn, inputs_dir=inputs_dir
        )
        for entry in lines:
            if isinstance(entry, Refusal):
                bad += 1
                reason = entry.reason.removeprefix(f"line {entry.line}: ")
                click.echo(f"{manifest}:{entry.line}: {reason}")
            else:
                good += 1
    verdict = "all valid" if not bad else f"{bad} bad"
    click.echo(f"{manifest}: {good + bad} lines checked, {good} valid, {verdict}")
    sys.exit(1 if bad else 0)


@cli.command()
@click.argument("manifest", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table for people, json for scripts.",
)
@click.option(
    "--from-ledger",
    "from_ledger",
    multiple=True,
    metavar="DIR_OR_LEDGER",
    help="Learn output tokens from earlier runs' ledgers (repeat for several), for models "
    "whose counts nobody publishes (gpt-image-2 and later).",
)
@_shared_option("prices")
@_shared_option("catalog")
@default_options
def estimate(
    manifest: Path,
    fmt: str,
    from_ledger: tuple[str, ...],
    prices: Path | None,
    catalog: Path | None,
    defaults: Defaults,
) -> None:
    """Price MANIFEST before running it: items, images, tokens and cost, nothing sent.

    Takes the same default flags as `run`, so it prices exactly what `run` would send. Each
    group says where its output tokens come from: published (a table or per-image prices),
    learned (--from-ledger: the mean, with the least and most seen) or unknown.
    """
    from .estimate import estimate_manifest
    from .estimate import format_table as estimate_table
    from .manifest import materialized

    try:
        the_catalog = load_run_catalog(catalog, prices)
        defaults = _checked(defaults, the_catalog)
        with materialized(manifest) as (path, inputs_dir):
            check_manifest(path)
            result = estimate_manifest(
                path,
                defaults,
                catalog=the_catalog,
                ledgers=list(from_ledger),
                inputs_dir=inputs_dir,
            )
    except UsageError as exc:
        raise _usage_error(exc) from None
    if fmt == "json":
        click.echo(_json(result.as_json()))
    else:
        click.echo(estimate_table(result))


@cli.command()
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table for people, json for scripts.",
)
@_shared_option("catalog")
def models(fmt: str, catalog: Path | None) -> None:
    """List the catalog's models: status and shutdown date, replacement, sizes, qualities,
    formats, how their tokens are known, prices."""
    from .catalog import today_utc
    from .lifecycle import models_json, models_table

    try:
        the_catalog = load_run_catalog(catalog)
    except UsageError as exc:
        raise _usage_error(exc) from None
    today = today_utc()
    if fmt == "json":
        click.echo(_json(models_json(the_catalog, today)))
    else:
        click.echo(models_table(the_catalog, today))


@cli.command()
@click.argument("targets", nargs=-1, required=True, metavar="DIR_OR_LEDGER...")
@click.option(
    "--by",
    default="",
    metavar="FIELD,...",
    help="Group by any of: model, size, quality, output_format, complexity, frame_count, "
    "status, endpoint, via, route (--endpoints), day, metadata.KEY.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="table for people; json or csv for scripts and sheets.",
)
@click.option(
    "--html",
    "html_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write a page to open in a browser, offline: totals, cost by group, timeline, "
    "failures and a gallery (thumbnails in FILE_files/ beside it).",
)
@_shared_option(
    "prices", "Reprice every record from its usage with this price file (plus built-ins)."
)
@_shared_option("catalog")
def report(
    targets: tuple[str, ...],
    by: str,
    fmt: str,
    html_file: Path | None,
    prices: Path | None,
    catalog: Path | None,
) -> None:
    """Totals and groups from one or many ledgers: items, failures, images, tokens, cost.

    Give output directories or ledger files; shards of several runs merge (a later one wins
    for the same item, and each billed answer counts once).
    """
    from .pricing import PriceTable
    from .report import build_report, format_csv
    from .report import format_table as report_table

    fields = [name.strip() for name in by.split(",") if name.strip()]
    try:
        repriced = PriceTable(load_run_catalog(catalog, prices)) if prices or catalog else None
        result = build_report(targets, fields, repriced)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    if html_file is not None:
        _write_html_report(targets, html_file, fields, repriced)
        return
    if fmt == "json":
        click.echo(_json(result.as_json()))
    elif fmt == "csv":
        click.echo(format_csv(result), nl=False)
    else:
        click.echo(report_table(result))


def _write_html_report(
    targets: tuple[str, ...], html_file: Path, fields: list[str], prices: Any
) -> None:
    from .htmlreport import write_html

    if not html_file.name or (html_file.exists() and not html_file.is_file()):
        click.echo(f"error: --html needs a file to write, not {str(html_file)!r}", err=True)
        sys.exit(2)
    bar: Any = None
    if sys.stderr.isatty():
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("thumbnails", total=None)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.update(task, completed=done, total=total)

    try:
        made = write_html(targets, html_file, fields, prices, progress=progress)
    except OSError as exc:
        click.echo(f"error: cannot write {html_file}: {exc.strerror or exc}", err=True)
        sys.exit(2)
    finally:
        if bar is not None:
            bar.stop()
    click.echo(
        f"wrote {html_file} ({made['page_bytes']:,} bytes; {made['images']:,} images, "
        f"{made['thumbnails_made']:,} thumbnails made, in {made['folder']})"
    )


@cli.command()
@click.argument("out", metavar="DIR_OR_URL")
@click.option(
    "--repair",
    is_flag=True,
    help="Mark each broken item failed in the ledger, so the next run makes it again.",
)
def verify(out: str, repair: bool) -> None:
    """Check that every ok item in DIR still has its images, byte for byte (sha256).

    Prints each problem as DIR: ID (line N): what is wrong, then a summary. Exit status: 0 all
    intact (or repaired), 1 broken items left as they are, 2 bad invocation.
    """
    from .verify import format_report
    from .verify import verify as check

    try:
        result = check(out, repair=repair)
    except UsageError as exc:
        raise _usage_error(exc) from None
    click.echo(format_report(out, result))
    sys.exit(1 if result.broken and not result.repaired else 0)


@cli.group()
def batch() -> None:
    """The Batch API batches of an output directory (made by `run --batch-api`)."""


def _connection_options(command: FC) -> FC:
    for option in reversed(
        (
            _shared_option("provider"),
            _shared_option("base_url"),
            _shared_option("api_key_env"),
            click.argument("out", type=click.Path(path_type=Path, file_okay=False), metavar="DIR"),
        )
    ):
        command = option(command)
    return command


@batch.command("status")
@_connection_options
@click.option("--all", "everything", is_flag=True, help="Also batches already collected.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True)  # fmt: skip
def batch_status(
    out: Path,
    provider: str,
    base_url: str | None,
    api_key_env: str | None,
    everything: bool,
    fmt: str,
) -> None:
    """Each live batch of DIR: its status and request counts, asked of the API now (with a
    key), else as the last run saw them. Exit status 75 while any is not yet collected
    (running, or finished and waiting for the next run), 3 if the API refused to say."""
    from . import batches

    try:
        conn = batches.connection(provider, base_url, api_key_env)
        import anyio

        rows = anyio.run(functools.partial(batches.status, out, conn, everything=everything))
    except UsageError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    _show_batches(rows, fmt, "no live batches: everything sent is collected")
    if conn.key is None and rows:
        click.echo("(no API key: shown as the last run saw them)", err=True)
    if _api_errors(rows):
        sys.exit(3)
    running = [r for r in rows if not r["collected"] and r["dropped"] is None]
    sys.exit(75 if running else 0)


@batch.command("cancel")
@_connection_options
def batch_cancel(out: Path, provider: str, base_url: str | None, api_key_env: str | None) -> None:
    """Cancel every live batch of DIR (what finished is still collected by the next run,
    which sends the rest again)."""
    from . import batches

    try:
        conn = batches.connection(provider, base_url, api_key_env)
        import anyio

        rows = anyio.run(batches.cancel, out, conn)
    except UsageError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    _show_batches(rows, "table", "nothing to cancel: no batch is running")
    if _api_errors(rows):
        sys.exit(3)


def _api_errors(rows: list[dict[str, Any]]) -> bool:
    """Say what the API refused (a wrong key, an unknown batch): True if it refused any."""
    errors = {r["error"] for r in rows if r.get("error")}
    for error in sorted(errors):
        click.echo(f"error: the API answered: {error}", err=True)
    return bool(errors)


def _show_batches(rows: list[dict[str, Any]], fmt: str, empty: str) -> None:
    if fmt == "json":
        click.echo(_json(rows))
        return
    if not rows:
        click.echo(empty)
        return
    from .estimate import render_rows

    header = ("batch", "status", "model", "seen", "done", "failed", "requests")
    cells = [
        (r["batch_id"] or r["file"], r["status"], r["model"], r["seen"], str(r["completed"]),
         str(r["failed"]), str(r["requests"]))
        for r in rows
    ]  # fmt: skip
    total = ("total", "", "", "", *(str(sum(r[k] for r in rows)) for k in
             ("completed", "failed", "requests")))  # fmt: skip
    click.echo("\n".join(render_rows(header, [*cells, total], numeric_from=4)))


def _rate(flag: str, what: str, of: str = "requests") -> Callable[[FC], FC]:
    return click.option(
        flag, type=click.FloatRange(0, 1), default=0.0, show_default=True,
        help=f"Fraction of {of} {what}.",
    )  # fmt: skip


def _seconds(flag: str, dest: str, default: float, what: str) -> Callable[[FC], FC]:
    """A mock option that is a duration (the MockConfig field `dest`)."""
    return click.option(
        flag, dest, type=click.FloatRange(min=0), default=default, show_default=True, help=what
    )


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port to listen on (0 picks a free one).",
)
@click.option("--api-key", help="Accept only this bearer key (default: any non-empty key).")
@click.option("--no-auth", is_flag=True, help="Accept requests without any key.")
@_seconds("--latency", "latency_s", 0.0, "Seconds added to every image request.")
@_rate("--rate-limit-rate", "answered 429 rate_limit_exceeded")
@_rate("--error-rate", "answered 500 server_error")
@_rate("--html-error-rate", "answered 502 with an HTML page, as proxies do")
@_rate("--truncate-rate", "answered 200 with the body cut off mid-stream")
@_rate("--drop-rate", "whose connection is closed with no answer")
@_rate("--slow-rate", "answered only after --slow seconds")
@_rate("--datauri-rate", "whose b64_json carries a data: URI prefix")
@_seconds("--slow", "slow_s", 5.0, "Seconds a --slow-rate answer is held back.")
@_seconds("--retry-after", "retry_after_s", 0.05, "Seconds a 429 asks the client to wait.")
@click.option(
    "--retry-after-style",
    type=click.Choice(["both", "ms", "seconds", "date", "mixed", "none"]),
    default="both",
    show_default=True,
    help="How 429s say when to retry: retry-after-ms, retry-after seconds, an HTTP-date.",
)
@click.option(
    "--rpm-limit",
    type=click.IntRange(min=1),
    help="Hard requests-per-minute limit, enforced per second as providers do (429s).",
)
@click.option(
    "--ipm-limit",
    type=click.IntRange(min=1),
    help="Hard images-per-minute limit (a request weighs its n).",
)
@click.option(
    "--quota-after",
    type=click.IntRange(min=0),
    help="After this many requests, answer 429 insufficient_quota (credit ran out).",
)
@click.option(
    "--auth-fail-after",
    type=click.IntRange(min=0),
    help="After this many requests, answer 401 (key revoked); 0: always.",
)
@click.option(
    "--enforce-shutdown",
    is_flag=True,
    help="Answer as OpenAI itself: retired models (past their shutdown date) get 404 "
    "model_not_found. Default: serve them, as a gateway does.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for injected faults.")
@click.option(
    "--detailed-images",
    is_flag=True,
    help="Serve photo-sized images (~2.5 MB PNG at 1024x1024) instead of tiny flat "
    "ones, for payload benchmarks.",
)
@_seconds("--batch-validate", "batch_validate_s", 0.05, "Seconds a batch spends validating.")
@_seconds("--batch-line", "batch_line_s", 0.0, "Seconds each line of a batch takes (one by one).")
@_seconds("--batch-finalize", "batch_finalize_s", 0.05, "Seconds a batch spends finalizing.")
@_rate("--batch-error-rate", "answered 500 server_error", of="batch lines")
@click.option(
    "--batch-expire-after-lines",
    type=click.IntRange(min=0),
    help="Expire every batch once this many of its lines have run (the rest never run).",
)
def mock(host: str, port: int, api_key: str | None, no_auth: bool, **faults: Any) -> None:
    """Serve an OpenAI-compatible mock Images API (real images, usage, errors) on loopback."""
    from .mock import MockConfig, serve

    try:
        config = MockConfig(api_key=api_key, require_auth=not no_auth, **faults)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    serve(config, host, port)


def main() -> None:
    cli()
