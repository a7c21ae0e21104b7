"""A plan: where each split runs, at what batch size, and what it is predicted to do.

The runtime consumes plans as JSON (`Plan.to_json` / `Plan.from_json`); it
sets `epoch` when it applies one. `SolveResult` is what `solve.solve` returns:
a plan, or none with the binding constraint that rules every plan out.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class Group:
    """Splits sharing `replicas` devices of one type (a pool; one split: dedicated replicas)."""

    device: str
    replicas: int
    splits: list[int]          # indices into Plan.splits


@dataclass
class Plan:
    batch: int
    splits: list[list[int]]            # [first, last] blocks per split
    groups: list[Group]
    enabled_ramps: list[int]           # ramps at split ends
    goodput: float                     # requests/s the plan sustains (predicted, with headroom u)
    latency_s: float                   # predicted latency at that rate: the SLO quantile with the queue (cost_model.py)
    cost_per_hour: float
    stage_s: list[float]               # seconds per batch of each split on its device
    binding: str = ""                  # what limits the plan (its bottleneck pool, the SLO)
    epoch: int = 0                     # set by the runtime when it applies the plan

    @property
    def bottleneck(self) -> str:
        return self.binding

    def stages(self) -> list[dict]:
        """Per split: blocks, device type, replica count, and whether its devices run other splits too."""
        out = [dict() for _ in self.splits]
        for g in self.groups:
            for i in g.splits:
                out[i] = {"first": self.splits[i][0], "last": self.splits[i][1], "device": g.device,
                          "replicas": g.replicas, "shared": len(g.splits) > 1}
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d["stages"] = self.stages()          # derived, for readers; from_json ignores it
        return d

    @staticmethod
    def from_json(d: dict) -> "Plan":
        d = dict(d)
        if "bottleneck" in d and "binding" not in d:      # plans written before the rename
            d["binding"] = d.pop("bottleneck")
        names = {f.name for f in fields(Plan)}
        d = {k: v for k, v in d.items() if k in names}
        d["groups"] = [Group(**g) for g in d["groups"]]
        return Plan(**d)

    def describe(self) -> str:
        lines = [f"batch size {self.batch}; predicted goodput {self.goodput:.1f} req/s; latency "
                 f"{self.latency_s * 1000:.1f} ms; cost {self.cost_per_hour:.2f}/h"]
        for g in self.groups:
            parts = ", ".join(f"blocks {self.splits[i][0]}-{self.splits[i][1]} ({self.stage_s[i] * 1000:.2f} ms/batch)"
                              for i in g.splits)
            kind = "shared by" if len(g.splits) > 1 else "on"
            lines.append(f"  {parts}: {kind} {g.replicas} x {g.device}")
        lines.append(f"  ramps enabled: {self.enabled_ramps or 'none (stock model)'}")
        if self.binding:
            lines.append(f"  binding: {self.binding}")
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
                "considered": self.considered, "plan": self.plan.to_json() if self.plan else None}
