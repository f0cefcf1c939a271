"""The state every part of a run shares: whether it is stopping (and why), what is in flight,
and the channel to the person running it (warnings and progress events)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import anyio

from .events import ProgressCallback, ProgressEvent, Summary


class RunControl:
    """Stop flag, in-flight count and progress channel of one run."""

    def __init__(self, summary: Summary, progress: ProgressCallback | None) -> None:
        self.summary = summary
        self._progress = progress
        self._stop_event = anyio.Event()
        self.interrupt_now = False  # a stop that should not even count what is left
        self.stop_code: str | None = None  # the error code the run stopped for, if any
        self.in_flight = 0  # requests and downloads on the wire
        self.waiting_to_retry = 0  # items sleeping before their next try
        self.last_progress = time.monotonic()  # when something last finished (stall watch)
        self._item_scopes: set[anyio.CancelScope] = set()  # one per item being processed
        self._warned: set[Any] = set()

    @property
    def stopping(self) -> bool:
        return self._stop_event.is_set()

    def emit(self, event: ProgressEvent) -> None:
        if self._progress is not None:
            self._progress(event)

    def warn(self, message: str) -> None:
        """A warning for the person running this (each cause says it once)."""
        self.summary.warnings.append(message)
        self.emit(ProgressEvent("warning", message=message))

    def note(self, message: str) -> None:
        """News for the person running this that is not a problem (a batch's progress)."""
        self.emit(ProgressEvent("note", message=message))

    def warn_once(self, key: Any, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.warn(message)

    def stop(self, reason: str, *, interrupted: bool = False) -> None:
        """Stop admitting new items; in-flight ones finish. The first reason given is kept."""
        if interrupted:
            self.summary.interrupted = True
            self.interrupt_now = True
        if self.summary.stop_reason is None:
            self.summary.stop_reason = reason
        if not self.stopping:
            self._stop_event.set()
            self.emit(ProgressEvent("stopping", message=reason))

    async def wait_or_stop(self, delay_s: float) -> bool:
        """Wait `delay_s`, or less if the run stops meanwhile; True if it is stopping."""
        with anyio.move_on_after(delay_s):
            await self._stop_event.wait()
        return self.stopping

    def on_the_wire(self) -> contextlib.AbstractContextManager[None]:
        """Count a request or download as in flight while the block runs."""
        return _OnTheWire(self)

    def item_scope(self) -> contextlib.AbstractContextManager[anyio.CancelScope]:
        """A cancel scope for one item's processing, cancelled by `cancel_items`."""
        return _ItemScope(self._item_scopes)

    def cancel_items(self) -> None:
        """Drop the items being processed (no ledger line: the next run sends them again)."""
        for scope in list(self._item_scopes):
            scope.cancel()


# The two context managers every item enters, as classes: a generator's would cost more than
# what they do.


class _OnTheWire:
    __slots__ = ("_control",)

    def __init__(self, control: RunControl) -> None:
        self._control = control

    def __enter__(self) -> None:
        self._control.in_flight += 1

    def __exit__(self, *exc_info: object) -> None:
        control = self._control
        control.in_flight -= 1
        control.last_progress = time.monotonic()


class _ItemScope:
    __slots__ = ("_scope", "_scopes")

    def __init__(self, scopes: set[anyio.CancelScope]) -> None:
        self._scopes = scopes
        self._scope = anyio.CancelScope()

    def __enter__(self) -> anyio.CancelScope:
        scope = self._scope.__enter__()
        self._scopes.add(scope)
        return scope

    def __exit__(self, *exc_info: Any) -> bool:
        self._scopes.discard(self._scope)
        return self._scope.__exit__(*exc_info)
