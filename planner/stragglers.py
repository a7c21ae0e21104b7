"""Which members' devices straggle: pure logic.

Each interval the planner actor reports, for every member's device type the
running plan uses, its workers' measured compute over what its profile (taken
when the member joined) predicts at the rows its splits ran, relative to the
same ratio of the best-behaved type measured then (so a machine busy as a
whole makes no straggler). A type `factor` times slower than that for
`intervals` intervals in a row is a straggler: it is left out of the next plans (the actor covers and re-plans as
for a lost member) and kept out for `probation_s`. Then it is planned with
again after a fresh profile, which says how slow it is now: a member still
slow is planned with for what it does, not for what it promised.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class StragglerWatch:
    factor: float = 3.0
    intervals: int = 3
    probation_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _slow: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, dict] = field(default_factory=dict)    # type name -> why and since when

    def observe(self, name: str, ratio: float) -> bool:
        """One interval of `name`'s measured compute over its profile's; whether it is now excluded."""
        if name in self.excluded:
            return False
        self._slow[name] = self._slow.get(name, 0) + 1 if ratio > self.factor else 0
        if self._slow[name] < self.intervals:
            return False
        del self._slow[name]
        self.excluded[name] = {"since": self.clock(), "ratio": round(ratio, 2),
                               "why": f"its batches took {ratio:.1f}x its profile for {self.intervals} intervals "
                                      f"(cluster.straggler_factor {self.factor:g})"}
        return True

    def released(self) -> list[str]:
        """The types whose probation is over: planned with again (after a fresh profile)."""
        now = self.clock()
        done = [n for n, e in self.excluded.items() if now - e["since"] >= self.probation_s]
        for name in done:
            del self.excluded[name]
        return done

    def forget(self, name: str) -> None:
        """`name` is gone (its member lost): nothing of it is kept."""
        self._slow.pop(name, None)
        self.excluded.pop(name, None)

    def view(self) -> dict:
        now = self.clock()
        return {name: {"why": e["why"], "ratio": e["ratio"], "excluded_for_s": round(now - e["since"], 1),
                       "back_in_s": round(max(0.0, self.probation_s - (now - e["since"])), 1)}
                for name, e in self.excluded.items()}
