"""The item runner: one item from its first attempt to its ledger line.

For each attempt it reserves the worst-case cost under the cap, waits for the rate limiter,
sends through the backend, and records what the attempt cost (a `Charge`); retries follow the
retry policy. A successful answer's images are fetched (downloads included), verified, stored
durably through the writer, and only then is the item's line handed to the sink.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio

from .. import specs
from .._spool import SpooledImage, discard
from ..backends import Answer, Backend
from ..budget import Budget
from ..catalog import Catalog
from ..errors import (
    Deferred,
    ErrorInfo,
    ItemFailed,
    ObjectRejected,
    RateLimited,
    RequestError,
    RunFatal,
    StorageError,
    StoreRefused,
    may_have_been_billed,
)
from ..limiter import Limiter
from ..manifest import Item
from ..pricing import Bound, PriceTable, input_bound
from ..retry import RetryPolicy, retrying
from ..routing import ROUTE
from ..tokens import GroupKey, TokenBook, request_group
from ..usage import UsageProblem, read_usage
from ..writer import BatchedWriter, check_image, decode_b64_image
from .control import RunControl
from .events import ProgressEvent
from .records import Charge, item_record, now
from .sink import ResultSink

#: Failures before any answer, of one cause no item can fix, that stop the run (one message).
UNREACHABLE_AFTER = 4


@dataclass
class _Tally:
    """Per-item counts across attempts."""

    attempts: int = 0
    rate_limited: int = 0
    #: The latest attempt's charge, until it is written: as a charge record of its own when
    #: another attempt follows (or the run stops), else in the item's line.
    pending: Charge | None = None
    sent: int = 0  # the last attempt a `sent` line announced
    told: int = 0  # the last attempt a charge line or the item's line tells of


class Held(StorageError):
    """The store refused an item's images: they and its line are kept for the next run."""

    advice = StoreRefused.advice


class Abandoned(Exception):
    """An item was waiting (to retry, or for budget) when the run stopped: leave it for the
    next run."""


class ItemRunner:
    """Runs items through the backend under the budget and the rate limiter."""

    def __init__(
        self,
        control: RunControl,
        sink: ResultSink,
        backend: Backend,
        writer: BatchedWriter,
        *,
        catalog: Catalog,
        prices: PriceTable,
        book: TokenBook,
        budget: Budget,
        limiter: Limiter,
        retry: RetryPolicy,
        max_answer_bytes: int | None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        requests: int | None = None,
    ) -> None:
        self.control = control
        #: Items past their request (answer in hand, images on their way into the store) free
        #: their request slot: with more workers than slots, a slow store holds up at most the
        #: extra workers (the bounded queue), never the requests. None: no slots (one each).
        self._slots = anyio.Semaphore(requests) if requests else None
        #: Awaited after a request's `sent` line is written and before it goes (a bucket
        #: output under a cap: until that line is in the bucket). StorageError stops the run.
        self.before_send: Callable[[], Awaitable[None]] | None = None
        self.sink = sink
        self.backend = backend
        self.writer = writer
        self.catalog = catalog
        self.prices = prices
        self.book = book
        self.budget = budget
        self.limiter = limiter
        self.retry = retry
        self.max_answer_bytes = max_answer_bytes
        self.sleep = sleep  # an injected clock for retry waits (tests); None: real time
        self.budget_short = False  # an item was left because its bound did not fit the cap
        self._cheapest_admitted_usd = float("inf")  # the least a reserved bound came to
        self._probes: dict[GroupKey, anyio.Lock] = {}  # one first request per unknown group
        self._probed: set[GroupKey] = set()  # groups this run has had an answer of
        self._answered = False  # an answer (2xx) has come: the API is reachable as configured
        self._unreachable: dict[str, int] = {}  # before that: failures no item can fix, by code

    async def run(self, item: Item) -> None:
        """Attempts until the item is done, failed, or left for the next run (`Abandoned`)."""
        control = self.control
        started_at = now()
        tally = _Tally()
        answer: Answer | None = None

        def finish(
            status: str, error: ErrorInfo | None = None, *, hold: bool = False, **fields: Any
        ) -> None:
            # The line carries its attempt's charge: an answer that arrived but could not be
            # stored was still paid for, so its usage and cost are kept.
            charge, tally.pending = tally.pending, None
            tally.told = tally.attempts
            (self.writer.hold if hold else self.sink.item_line)(
                item_record(
                    item,
                    status=status,
                    started_at=started_at,
                    attempts=tally.attempts,
                    rate_limited=tally.rate_limited,
                    answer=answer,
                    price_table=self.prices.name,
                    catalog=self.catalog,
                    run_id=self.sink.run_id,
                    error=error,
                    charge=charge,
                    **fields,
                )
            )

        refused = self.backend.check(item)
        if refused is not None:
            finish("error", refused)
            return
        try:
            async with self._requesting():
                async for attempt in retrying(self.retry, sleep=self._retry_wait):
                    with attempt:
                        tally.attempts = attempt.number
                        if tally.attempts > 1:
                            control.emit(ProgressEvent("retry", item_id=item.id))
                        self._flush_charge(item, tally)  # the try before was billed, and retried
                        answer = await self._attempt(item, tally)
                assert answer is not None
                try:  # downloads (url answers) may take long: a stop can still cancel them
                    images = await self._fetch_images(item, answer)
                except anyio.get_cancelled_exc_class():
                    discard([e["spooled"] for e in answer.data if "spooled" in e])
                    with anyio.CancelScope(shield=True):  # paid: the line keeps its cost
                        message = "stopped while downloading the images of an answer paid for"
                        finish("error", ErrorInfo(message, "download_interrupted", "local_error"))
                    raise
                except BaseException:
                    discard([e["spooled"] for e in answer.data if "spooled" in e])
                    raise
            # Paid for, and in hand: a stop or a grace-period cancel must not drop the images
            # between the answer and its ledger line, or the next run would buy them again.
            with anyio.CancelScope(shield=True):
                try:
                    stored = await self.writer.save(
                        item.file_stem, images, specs.output_format(item.params, self.catalog)
                    )
                except StoreRefused as exc:
                    discard(images)
                    if not exc.kept:
                        raise
                    # Its files are parked in the state directory: its line waits there too,
                    # and the next run puts both in place (nothing bought twice).
                    finish("ok", hold=True, files=exc.kept)
                    control.summary.parked += 1
                    control.warn_once(
                        "parked",
                        "the store refused images already paid for: they are kept in the "
                        "state directory (parked/), and the next run uploads them first",
                    )
                    raise Held(str(exc)) from exc
                except BaseException:  # whatever was spooled and not stored must not linger
                    discard(images)
                    raise
                if len(stored) < item.n:  # kept, but the item is not done: the next run is
                    message = (
                        f"the answer has {len(stored)} of the {item.n} images asked for: those "
                        "are kept (and paid for); the item is done again next run"
                    )
                    info = ErrorInfo(message, "missing_images", "invalid_response")
                    finish("error", info, files=stored)
                else:
                    if len(stored) > item.n:
                        control.warn_once(
                            "extra",
                            f"an answer brought {len(stored)} images for n={item.n} (item "
                            f"{item.id}): all are kept",
                        )
                    finish("ok", files=stored)
        except Held:
            raise  # its line is held for the next run; the run stops
        except ObjectRejected as exc:  # this object only: the item fails, its cost kept
            finish("error", ErrorInfo(message=str(exc), code="store_rejected", type="local_error"))
        except StorageError as exc:
            finish("error", ErrorInfo(message=str(exc), code="storage_error", type="local_error"))
            raise
        except RequestError as exc:
            if isinstance(exc, RunFatal) and not control.stopping:
                control.stop_code = exc.info.code
                control.stop(f"{exc} — fix the account or key, then re-run the same command")
            finish("error", exc.info)
        except Deferred:
            control.summary.pending += 1
            tally.told = tally.sent  # its `sent` line stays open until the answer comes
        except Abandoned:
            raise
        except Exception as exc:  # a bug, or a library's surprise: this item fails, not the run
            why = f"{type(exc).__name__}: {exc}"
            control.warn_once(
                ("internal", type(exc).__name__),
                f"item {item.id} failed on an unexpected error ({why}); it is in the ledger "
                "and runs again next time (please report this)",
            )
            finish("error", ErrorInfo(f"unexpected error: {why}", "internal_error", "local_error"))
        finally:
            # Stopped (or cancelled) with an attempt billed but no item line for it: its charge
            # is written on its own, so the next run's cap counts it. A sent attempt known not
            # billed that nothing tells of is settled, so no later run counts it.
            # (No await here, so no cancellation can cut it short.)
            self._flush_charge(item, tally)
            if tally.sent > tally.told:
                self.sink.settled_line(item, tally.sent)

    def _requesting(self) -> contextlib.AbstractAsyncContextManager[object]:
        """A request slot (see `__init__`), held from the first attempt to the images."""
        return self._slots if self._slots is not None else contextlib.nullcontext()

    def _flush_charge(self, item: Item, tally: _Tally) -> None:
        charge, tally.pending = tally.pending, None
        if charge is not None:
            tally.told = max(tally.told, charge.attempt)
            self.sink.charge_line(item, charge)

    async def _retry_wait(self, delay_s: float) -> None:
        """Wait before a retry (on the injected clock, if any), unless the run stops meanwhile."""
        control = self.control
        control.waiting_to_retry += 1
        try:
            if self.sleep is not None:
                await self.sleep(delay_s)
                if control.stopping:
                    raise Abandoned
            elif await control.wait_or_stop(delay_s):
                raise Abandoned
        finally:
            control.waiting_to_retry -= 1

    async def _attempt(self, item: Item, tally: _Tally) -> Answer:
        """One try. Under a cap, until this run has had an answer of its kind, a request whose
        bound is not a published count (the catalog's ceiling, or counts learned from other
        runs) goes alone: its group's others wait for its answer, which tightens (or corrects)
        their bound, so a bound that proves too low is exceeded by one request at most, not by
        every request sent before the first answer."""
        if self.budget.cap_usd is not None:
            bound = self.prices.worst_case(item.params, item.image_tokens, self.book)
            group = request_group(item.params, self.catalog)
            unknown = bound is not None and bound.basis != "published"
            if unknown and self.backend.online and group not in self._probed:
                async with self._probes.setdefault(group, anyio.Lock()):
                    return await self._attempt_once(item, tally)
        return await self._attempt_once(item, tally)

    async def _attempt_once(self, item: Item, tally: _Tally) -> Answer:
        """Reserve its worst-case cost, wait for admission, send, report back (the attempt's
        charge is left in `tally.pending`)."""
        estimate = self.prices.estimate(item.params, item.image_tokens, self.book)
        tokens = estimate.input_tokens + estimate.output_tokens
        capped = self.budget.cap_usd is not None
        worst_usd = 0.0
        if capped:
            reserved = await self.budget.reserve(lambda: self.bound(item))
            if reserved is None:
                self._out_of_budget(item)
                raise Abandoned
            worst_usd = reserved
            self._cheapest_admitted_usd = min(self._cheapest_admitted_usd, reserved)
        started_at, attempt = now(), tally.attempts
        limiter, charge, deferred = self.limiter, None, False
        try:
            if self.control.stopping:  # stopped while this item waited for budget: send nothing
                raise Abandoned
            online = self.backend.online  # else the backend keeps limits of its own
            sent_at = await limiter.acquire(images=item.n, tokens=tokens) if online else 0.0
            # Said before it goes: if the process dies with it in flight, the next run counts it.
            sent_bound = worst_usd if capped else self._worst_usd(item)
            self.sink.sent_line(item, attempt, started_at, sent_bound)
            tally.sent = attempt
            if self.before_send is not None:
                try:
                    await self.before_send()
                except StorageError as exc:  # not sent: left for the next run
                    self.control.stop(f"{exc}; {exc.advice}, then re-run")
                    raise Abandoned from exc
                if self.control.stopping:  # stopped while it waited: it never went out
                    raise Abandoned
            try:
                with self.control.on_the_wire() if online else contextlib.nullcontext():
                    answer = await self.backend.send(item, limit_bytes=self._answer_limit(item))
            except RateLimited as exc:
                tally.rate_limited += 1
                limiter.on_rate_limited(exc.retry_after_s, exc.ratelimit, sent_at)
                raise
            except RequestError as exc:
                limiter.observe(exc.ratelimit)
                self._first_contact(exc)
                if may_have_been_billed(exc):
                    # No error status: the answer may have been generated (and billed) before
                    # it broke in transit. Its cost is unknown: count the worst, never $0.
                    why = f"no whole answer ({exc.info.code or 'error'}): may have been billed"
                    charge = self._unknown_charge(
                        item,
                        attempt,
                        started_at,
                        worst_usd,
                        why,
                        request_id=exc.info.request_id,
                        error=exc.info,
                    )
                raise
            except Deferred:
                # Taken, to be answered to a later run: counted at its bound here, and by later
                # runs through its `sent` line until the answer settles it.
                charge = Charge(attempt, started_at, bound_usd=worst_usd or None)
                deferred = True
                raise
            except anyio.get_cancelled_exc_class():
                # Sent, then dropped by a stop: the API may have generated (and billed) it.
                why = "cancelled in flight: may have been billed"
                charge = self._unknown_charge(item, attempt, started_at, worst_usd, why)
                raise
            except StorageError:
                # Answered, but the answer could not be kept (the disk): it was billed.
                why = "answered, but the answer could not be stored: billed at a cost unknown"
                charge = self._unknown_charge(item, attempt, started_at, worst_usd, why)
                raise
            except Exception as exc:  # the backend broke on the answer: it may have been billed
                what = f"{type(exc).__name__}: {exc}"
                why = f"failed on the answer ({what}): may have been billed"
                charge = self._unknown_charge(item, attempt, started_at, worst_usd, why)
                info = ErrorInfo(f"unexpected error on the answer: {what}", "internal_error",
                                 "local_error")  # fmt: skip
                raise ItemFailed(info) from exc
            limiter.observe(answer.ratelimit)
            limiter.on_success()
            self._answered = True
            self._probed.add(request_group(item.params, self.catalog))
            counts = read_usage(answer.usage)
            if not isinstance(counts, UsageProblem):
                limiter.settle_tokens(tokens, counts.total)
            cost, unknown = self.prices.answer_cost(
                item.params, answer.usage, input_bound=input_bound(item.prompt, item.image_tokens)
            )
            if cost is None:  # billed but not priceable: count the worst, never $0
                charge = self._unknown_charge(
                    item,
                    attempt,
                    started_at,
                    worst_usd,
                    unknown or "",
                    request_id=answer.request_id,
                    usage=answer.usage,
                )
            else:
                charge = Charge(
                    attempt,
                    started_at,
                    cost_usd=cost,
                    usage=answer.usage,
                    request_id=answer.request_id,
                )
            return answer
        finally:
            route = ROUTE.get()  # `--endpoints`: the one this attempt went to
            if charge is not None and route is not None:
                charge = dataclasses.replace(charge, route=route)
            tally.pending = None if deferred else charge
            actual_usd = charge.counted_usd if charge is not None else 0.0
            if capped:
                self.budget.settle(worst_usd, actual_usd)
            else:
                self.budget.charge(actual_usd)

    def _unknown_charge(
        self,
        item: Item,
        attempt: int,
        started_at: str,
        reserved_usd: float,
        note: str,
        *,
        request_id: str | None = None,
        usage: object = None,
        error: ErrorInfo | None = None,
    ) -> Charge:
        """A charge whose cost cannot be known: bounded by what was reserved for it (under a
        cap), else by the worst case now (None where nothing bounds it)."""
        bound = reserved_usd or self._worst_usd(item)
        if bound is None:
            note += "; nothing bounds its cost (no price or token count known)"
        return Charge(
            attempt,
            started_at,
            bound_usd=bound,
            note=note,
            usage=usage,
            request_id=request_id,
            error=error,
        )

    def _worst_usd(self, item: Item) -> float | None:
        worst = self.prices.worst_case(item.params, item.image_tokens, self.book)
        return worst.cost_usd if worst is not None else None

    def _first_contact(self, exc: RequestError) -> None:
        """Until one answer has come, the first failures that no item can fix (the host cannot
        be reached; every request answered 404 or 405, as a wrong --base-url path is) stop the
        run with one message naming the URL, instead of failing every item one by one."""
        control = self.control
        if self._answered or control.stopping:
            return
        info = exc.info
        route = info.http_status in (404, 405) and info.code != "model_not_found"
        if info.code != "connect_error" and not route:
            return
        key = info.code if info.code == "connect_error" else f"http_{info.http_status}"
        self._unreachable[key] = count = self._unreachable.get(key, 0) + 1
        if count >= UNREACHABLE_AFTER:
            control.stop_code = info.code
            hint = (
                "check --base-url (for OpenAI it ends in /v1) and the endpoint it names"
                if route
                else "check --base-url, the network and the provider's status"
            )
            control.stop(
                f"cannot use the API at {self.backend.where}: {count} tries, none answered as "
                f"the API does ({exc}); {hint}, then re-run"
            )

    def _out_of_budget(self, item: Item) -> None:
        """The item's bound does not fit under the cap even with nothing in flight: leave it for
        a later run and go on with items that may cost less, until not even the cheapest
        bound this run admitted fits (then stop admitting: the rest is only counted)."""
        bound = self.bound(item)
        summary = self.control.summary
        if summary.next_bound is None or bound.cost_usd < summary.next_bound.cost_usd:
            summary.next_bound = bound
        self.budget_short = True
        budget = self.budget
        left = (budget.cap_usd or 0.0) - budget.spent_usd - budget.reserved_usd
        if left < self._cheapest_admitted_usd < float("inf"):
            self.control.stop("budget")  # the final message is written when the run ends

    def bound(self, item: Item) -> Bound:
        """The most this item can cost now (tighter as its group's answers come in)."""
        bound = self.prices.worst_case(item.params, item.image_tokens, self.book)
        if bound is None:
            prices = self.prices.prices(item.model)
            why = (
                f"no price for model {item.model!r}: --max-cost cannot bound it "
                "(add it with --catalog or --prices)"
                if prices is None
                else f"nothing bounds model {item.model!r}'s output tokens: --max-cost cannot "
                "bound it (give tokens.ceiling_per_megapixel in --catalog)"
            )
            raise ItemFailed(ErrorInfo(message=why, code="unpriced_model", type="local_error"))
        return bound

    async def _fetch_images(self, item: Item, answer: Answer) -> list[bytes | SpooledImage]:
        """The answer's images, verified: spooled already, b64 decoded, or urls downloaded."""
        expected = specs.output_format(item.params, self.catalog)
        images: list[bytes | SpooledImage] = []
        try:
            for entry in answer.data:
                spooled = entry.get("spooled")
                if isinstance(spooled, (bytes, SpooledImage)):
                    data: bytes | SpooledImage = spooled
                elif isinstance(entry.get("b64_json"), str):
                    data = decode_b64_image(entry["b64_json"])
                elif isinstance(entry.get("url"), str):
                    data = await self._download(item, entry["url"])
                else:
                    info = ErrorInfo(message="data entry has neither b64_json nor url",
                                     code="bad_response")  # fmt: skip
                    raise ItemFailed(info)
                images.append(data)
                check_image(data, expected)
        except BaseException:
            discard(images)  # a download that arrived before the failure
            raise
        return images

    def _answer_limit(self, item: Item) -> int:
        """The most an answer (and each downloaded image) may weigh for this request."""
        return self.max_answer_bytes or specs.per_shape(
            specs.max_answer_bytes, item.params, self.catalog
        )

    async def _download(self, item: Item, url: str) -> bytes | SpooledImage:
        """A `url` answer's image. Paid for already, so a first stop lets it finish (within the
        grace period); like a request, it is in flight for the stall watch, and a second
        signal, the end of the grace period or a stall cancels it."""
        limit = self.max_answer_bytes or specs.max_image_bytes(item.params, self.catalog)
        async for attempt in retrying(self.retry, sleep=self.sleep):
            with attempt, self.control.on_the_wire():
                return await self.backend.fetch(url, limit_bytes=limit)
        raise AssertionError("unreachable: retrying re-raises the last error")
