"""The budget cap: never admit a request that could take spend over `--max-cost`.

Before a request goes out its worst-case cost is reserved; when it returns the reservation is
settled with what it actually cost (a failed request costs nothing). Spend already in the
ledger from earlier runs counts against the cap, so raising the cap and re-running continues
where the money ran out.
"""

from __future__ import annotations


class Budget:
    """Committed spend, in-flight reservations and the cap (None: no cap)."""

    def __init__(self, cap_usd: float | None, spent_usd: float = 0.0) -> None:
        self.cap_usd = cap_usd
        self.spent_usd = spent_usd  # committed: what answers already cost, earlier runs included
        self.reserved_usd = 0.0  # worst cases of the requests in flight
        self.exhausted = False  # a request did not fit: the run stops admitting

    def try_reserve(self, worst_usd: float) -> bool:
        """Reserve a request's worst case if it fits under the cap; False (and stop) if not."""
        if self.cap_usd is not None and self.spent_usd + self.reserved_usd + worst_usd > (
            self.cap_usd + 1e-12
        ):
            self.exhausted = True
            return False
        self.reserved_usd += worst_usd
        return True

    def settle(self, reserved_usd: float, actual_usd: float) -> None:
        """A reserved request came back: it cost `actual_usd` (0 if it failed)."""
        self.reserved_usd = max(0.0, self.reserved_usd - reserved_usd)
        self.spent_usd += actual_usd

    def message(self, items_left: int) -> str:
        return (
            f"budget reached: ${self.spent_usd:.2f} of ${self.cap_usd or 0:.2f} spent, "
            f"{items_left} items left; raise --max-cost and re-run to continue"
        )
