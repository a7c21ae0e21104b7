"""A planning problem: model shape, survival, device types with profiles, SLO, objective.

`Problem.from_json` reads the JSON schema documented in planner/SCHEMA.md and
raises ProblemError naming the field and quoting the bad value.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import ProblemError, ProfileError
from .profiles import DeviceProfile


@dataclass
class DeviceType:
    name: str
    count: int
    price_per_hour: float
    profile: DeviceProfile


@dataclass
class Problem:
    num_blocks: int
    ramp_blocks: list[int]
    survival: list[float]            # per ramp: fraction of inputs continuing past it (all ramps on)
    boundary_bytes: list[int]        # per block: bytes of one sample's state after it
    devices: list[DeviceType]
    slo_s: float = 0.1
    slack_s: float = 0.01            # latency kept in reserve (queueing, the network)
    utilisation: float = 0.8         # each device planned to at most this busy
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    objective: str = "goodput"       # "goodput": most requests/s; "cost": cheapest for `rate`
    rate: float | None = None        # requests/s to serve (objective "cost")
    budget_per_hour: float | None = None   # optional price cap (objective "goodput")
    allow_sharing: bool = True       # consecutive splits may share devices

    def validate(self) -> "Problem":
        L, R = self.num_blocks, self.ramp_blocks
        _need(isinstance(L, int) and L >= 1, "num_blocks", L, "an integer >= 1")
        _need(isinstance(R, list) and R == sorted(set(R)) and all(isinstance(r, int) and 0 <= r < L - 1 for r in R),
              "ramp_blocks", R, f"increasing block indices in 0..{L - 2}")
        _need(isinstance(self.survival, list) and len(self.survival) == len(R) and all(
            isinstance(s, (int, float)) and 0 <= s <= 1 for s in self.survival), "survival", self.survival,
            f"{len(R)} fractions in [0, 1], one per ramp")
        _need(all(a >= b - 1e-9 for a, b in zip(self.survival, self.survival[1:])), "survival", self.survival,
              "non-increasing (an input that left cannot come back)")
        _need(isinstance(self.boundary_bytes, list) and len(self.boundary_bytes) == L and all(
            isinstance(b, int) and b >= 0 for b in self.boundary_bytes), "boundary_bytes", self.boundary_bytes,
            f"{L} non-negative integers")
        _need(isinstance(self.devices, list) and self.devices, "devices", self.devices, "a non-empty list")
        for i, d in enumerate(self.devices):
            _need(isinstance(d.count, int) and d.count >= 0, f"devices[{i}].count", d.count, "an integer >= 0")
            _need(d.price_per_hour >= 0, f"devices[{i}].price_per_hour", d.price_per_hour, ">= 0")
            _need(len(d.profile.block_s) == L and len(d.profile.ramp_s) == len(R), f"devices[{i}].profile",
                  f"{len(d.profile.block_s)} blocks, {len(d.profile.ramp_s)} ramps", f"{L} blocks and {len(R)} ramps")
        _need(0 < self.slo_s <= 600, "slo_ms", self.slo_s * 1000, "in (0, 600000]")
        _need(0 <= self.slack_s < self.slo_s, "slack_ms", self.slack_s * 1000, "in [0, slo_ms)")
        _need(0 < self.utilisation <= 1, "utilisation", self.utilisation, "in (0, 1]")
        _need(isinstance(self.batch_sizes, list) and self.batch_sizes and all(
            isinstance(b, int) and b >= 1 for b in self.batch_sizes), "batch_sizes", self.batch_sizes,
            "a non-empty list of integers >= 1")
        _need(self.objective in ("goodput", "cost"), "objective", self.objective, "'goodput' or 'cost'")
        if self.objective == "cost":
            _need(isinstance(self.rate, (int, float)) and self.rate > 0, "rate", self.rate,
                  "a positive request rate (objective 'cost')")
        return self

    def survival_before(self, block: int) -> float:
        """Fraction of inputs that enter `block` (all ramps before it enabled)."""
        s = 1.0
        for k, r in enumerate(self.ramp_blocks):
            if r < block:
                s = self.survival[k]
        return s

    @staticmethod
    def from_json(d: dict) -> "Problem":
        _need(isinstance(d, dict), "problem", type(d).__name__, "a JSON object")
        model = _get(d, "model", dict)
        devices = []
        for i, dev in enumerate(_get(d, "devices", list)):
            _need(isinstance(dev, dict), f"devices[{i}]", dev, "an object")
            try:
                profile = DeviceProfile.from_json(_get(dev, "profile", dict, f"devices[{i}]."))
            except ProfileError as exc:
                raise ProblemError(f"devices[{i}].profile: {exc}") from None
            devices.append(DeviceType(_get(dev, "name", str, f"devices[{i}]."), _get(dev, "count", int, f"devices[{i}]."),
                                      float(dev.get("price_per_hour", 0.0)), profile))
        known = {"model", "survival", "devices", "slo_ms", "slack_ms", "utilisation", "batch_sizes", "objective",
                 "rate", "budget_per_hour", "allow_sharing", "_comment"}
        for key in d:
            _need(key in known, key, d[key], f"a known field ({', '.join(sorted(known))})")
        return Problem(
            num_blocks=_get(model, "num_blocks", int, "model."), ramp_blocks=_get(model, "ramp_blocks", list, "model."),
            survival=_get(d, "survival", list), boundary_bytes=_get(model, "boundary_bytes", list, "model."),
            devices=devices, slo_s=float(d.get("slo_ms", 100)) / 1000, slack_s=float(d.get("slack_ms", 10)) / 1000,
            utilisation=float(d.get("utilisation", 0.8)), batch_sizes=d.get("batch_sizes", [1, 2, 4, 8, 16, 32]),
            objective=d.get("objective", "goodput"), rate=d.get("rate"), budget_per_hour=d.get("budget_per_hour"),
            allow_sharing=bool(d.get("allow_sharing", True))).validate()


def _need(ok: bool, name: str, value, what: str) -> None:
    if not ok:
        raise ProblemError(f"{name}: expected {what}, got {value!r}")


def _get(d: dict, key: str, kind: type, prefix: str = ""):
    _need(key in d, prefix + key, "nothing", "a value (the field is missing)")
    value = d[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    _need(ok, prefix + key, value, f"a {kind.__name__}")
    return value
