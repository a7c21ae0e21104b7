"""A plan: where each split runs, at what batch size, and what it is predicted to do."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Group:
    """Consecutive splits sharing `replicas` devices of one type (one split: dedicated replicas)."""

    device: str
    replicas: int
    splits: list[int]          # indices into Plan.splits


@dataclass
class Plan:
    batch: int
    splits: list[list[int]]            # [first, last] blocks per split
    groups: list[Group]
    enabled_ramps: list[int]           # ramps at split ends
    goodput: float                     # requests/s the plan sustains (predicted)
    latency_s: float                   # worst-case latency at that rate (predicted)
    cost_per_hour: float
    stage_s: list[float]               # seconds per batch of each split on its device
    bottleneck: str = ""
    epoch: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(d: dict) -> "Plan":
        d = dict(d)
        d["groups"] = [Group(**g) for g in d["groups"]]
        return Plan(**d)

    def describe(self) -> str:
        lines = [f"batch size {self.batch}; predicted goodput {self.goodput:.1f} req/s; worst-case latency "
                 f"{self.latency_s * 1000:.1f} ms; cost {self.cost_per_hour:.2f}/h"]
        for g in self.groups:
            parts = ", ".join(f"blocks {self.splits[i][0]}-{self.splits[i][1]} ({self.stage_s[i] * 1000:.2f} ms/batch)"
                              for i in g.splits)
            kind = "shared by" if len(g.splits) > 1 else "on"
            lines.append(f"  {parts}: {kind} {g.replicas} x {g.device}")
        lines.append(f"  ramps enabled: {self.enabled_ramps or 'none (stock model)'}")
        if self.bottleneck:
            lines.append(f"  binding: {self.bottleneck}")
        return "\n".join(lines)


@dataclass
class SolveResult:
    plan: Plan | None
    binding: str                       # what limits the plan, or why there is none
    solve_s: float = 0.0
    considered: dict = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return self.plan is not None

    def to_json(self) -> dict:
        return {"feasible": self.feasible, "binding": self.binding, "solve_s": self.solve_s,
                "plan": self.plan.to_json() if self.plan else None}
