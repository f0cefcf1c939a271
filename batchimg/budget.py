"""The budget cap: never admit a request that could take spend over `--max-cost`.

Before a request goes out its worst-case cost is reserved; when it returns the reservation is
settled with what it actually cost (a failed request costs nothing). Spend already in the
ledger from earlier runs counts against the cap, so raising the cap and re-running continues
where the money ran out.

The worst case is asked for afresh each time a request gets a chance to fit: for models whose
token counts nobody publishes it starts at the catalog's ceiling and tightens as answers of the
same kind arrive (`pricing.PriceTable.worst_case`), so a waiting request may fit on its next try.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

from .pricing import Bound


class Budget:
    """Committed spend, in-flight reservations and the cap (None: no cap)."""

    def __init__(self, cap_usd: float | None) -> None:
        self.cap_usd = cap_usd
        self.spent_usd = 0.0  # committed: what answers already cost, earlier runs included
        self.reserved_usd = 0.0  # worst cases of the requests in flight
        self._in_flight = 0
        self._settled = anyio.Event()

    def _fits(self, worst_usd: float) -> bool:
        if self.cap_usd is None:
            return True
        return self.spent_usd + self.reserved_usd + worst_usd <= self.cap_usd + 1e-12

    async def reserve(self, bound: Callable[[], Bound]) -> float | None:
        """Reserve a request's worst case (`bound()`, asked again after every settlement);
        the amount reserved, or None once it cannot fit even with nothing in flight.

        While other requests are in flight their reservations (worst cases) usually exceed what
        they will cost, so a request that does not fit yet waits for them to settle first.
        """
        worst_usd = bound().cost_usd
        while not self._fits(worst_usd):
            if not self._in_flight:
                return None
            await self._settled.wait()
            worst_usd = bound().cost_usd
        self.reserved_usd += worst_usd
        self._in_flight += 1
        return worst_usd

    def charge(self, actual_usd: float) -> None:
        """Count what an answer cost (every answer, capped or not)."""
        self.spent_usd += actual_usd

    def settle(self, reserved_usd: float, actual_usd: float) -> None:
        """A reserved request came back: it cost `actual_usd` (0 if it failed)."""
        self.reserved_usd = max(0.0, self.reserved_usd - reserved_usd)
        self.charge(actual_usd)
        self._in_flight -= 1
        self._settled.set()
        self._settled = anyio.Event()

    def message(self, items_left: int, next_bound: Bound | None = None) -> str:
        held = (
            f" (the next item's bound, ${next_bound.cost_usd:.2f} from its {next_bound.basis} "
            f"token count, did not fit in the ${max(0.0, (self.cap_usd or 0) - self.spent_usd):.2f}"
            " left)"
            if next_bound is not None
            else ""
        )
        return (
            f"budget reached: ${self.spent_usd:.2f} of ${self.cap_usd or 0:.2f} spent, "
            f"{items_left} items left{held}; raise --max-cost and re-run to continue"
        )
