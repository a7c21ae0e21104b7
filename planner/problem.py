"""A planning problem: model shape, survival, device types with profiles, SLO, objective.

`Problem.from_json` reads the JSON schema documented in planner/SCHEMA.md.
Every check raises ProblemError with one line that names the field and
quotes the bad value (`survival: expected non-increasing ..., got [...]`),
so `bin/e3-plan` can print it as is.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .cost_model import Overheads
from .errors import ProblemError, ProfileError
from .profiles import DeviceProfile

OBJECTIVES = ("goodput", "cost")


LOCAL = "local"    # the host of the node that admits requests and answers them


@dataclass(frozen=True)
class Link:
    """The link from the node that admits requests to another host: `fixed + bytes * per_byte`
    seconds per message (planner/transfer_fit.py fits it to measured hops)."""

    fixed_s: float
    s_per_byte: float

    def transfer(self, nbytes: float) -> float:
        return self.fixed_s + nbytes * self.s_per_byte

    def to_json(self) -> dict:
        return {"transfer_fixed_s": self.fixed_s, "transfer_s_per_byte": self.s_per_byte}


@dataclass
class DeviceType:
    """Devices of one kind on one host. Devices on another host than the admitting node's
    (`host` not "local") are reached over `link`: every batch they run crosses it twice (its
    input rows out, its survivors' rows and answers back), as the cluster's hub-and-spoke
    links carry them (runtime/link.py)."""

    name: str
    count: int
    price_per_hour: float
    profile: DeviceProfile
    host: str = LOCAL
    link: Link | None = None


@dataclass
class Problem:
    num_blocks: int
    ramp_blocks: list[int]
    survival: list[float]            # per ramp k: fraction of inputs continuing past it, all ramps on (s_k)
    boundary_bytes: list[int]        # per block: bytes of one sample's state after it
    devices: list[DeviceType]
    input_bytes: int = 0             # bytes of one input as it enters block 0 (crosses a link to another host)
    slo_s: float = 0.1
    slack_s: float = 0.01            # latency kept in reserve (the network, the client)
    slo_quantile: float = 0.99       # the share of answers that must meet the SLO (the queue model's target)
    utilisation: float = 0.8         # each device planned to at most this busy (u)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    objective: str = "goodput"       # "goodput": most requests/s; "cost": cheapest for `rate`
    rate: float | None = None        # requests/s to serve (objective "cost")
    budget_per_hour: float | None = None   # optional price cap (objective "goodput")
    sample_fraction: float = 0.0     # batches that run every inner ramp (ramp sampling); costs work
    overheads: Overheads = field(default_factory=Overheads)   # what serving costs beyond compute (cost_model.py)

    def fits(self, plan) -> bool:
        """Whether `plan` can run on these devices: each type it uses is here, with as many devices
        as its groups of that type take (a member lost since it was made: not)."""
        counts = {d.name: d.count for d in self.devices}
        needed: dict[str, int] = {}
        for g in plan.groups:
            needed[g.device] = needed.get(g.device, 0) + g.replicas
        return all(counts.get(name, 0) >= n for name, n in needed.items())

    def validate(self) -> "Problem":
        L, R = self.num_blocks, self.ramp_blocks
        _need(_is_int(L) and L >= 1, "model.num_blocks", L, "an integer >= 1")
        _need(isinstance(R, list) and all(_is_int(r) for r in R) and R == sorted(set(R))
              and all(0 <= r < L - 1 for r in R), "model.ramp_blocks", R, f"increasing block indices in 0..{L - 2}")
        _need(isinstance(self.survival, list) and len(self.survival) == len(R) and all(
            _is_num(s) and 0 <= s <= 1 for s in self.survival), "survival", self.survival,
            f"{len(R)} fractions in [0, 1], one per ramp")
        _need(all(a >= b - 1e-9 for a, b in zip(self.survival, self.survival[1:])), "survival", self.survival,
              "non-increasing values (an input that left cannot come back)")
        _need(isinstance(self.boundary_bytes, list) and len(self.boundary_bytes) == L and all(
            _is_int(b) and b >= 0 for b in self.boundary_bytes), "model.boundary_bytes", self.boundary_bytes,
            f"{L} non-negative integers")
        _need(_is_int(self.input_bytes) and self.input_bytes >= 0, "model.input_bytes", self.input_bytes,
              "an integer >= 0")
        _need(isinstance(self.devices, list) and self.devices, "devices", self.devices, "a non-empty list")
        names = [d.name for d in self.devices]
        _need(len(set(names)) == len(names), "devices", names, "distinct device names")
        for i, d in enumerate(self.devices):
            _need(_is_int(d.count) and d.count >= 0, f"devices[{i}].count", d.count, "an integer >= 0")
            _need(_is_num(d.price_per_hour) and d.price_per_hour >= 0, f"devices[{i}].price_per_hour",
                  d.price_per_hour, "a number >= 0")
            _need(isinstance(d.host, str) and d.host.strip() != "", f"devices[{i}].host", d.host,
                  "a non-empty host name")
            _need((d.link is None) == (d.host == LOCAL), f"devices[{i}].link", d.link,
                  "a link (transfer_fixed_s, transfer_s_per_byte) exactly when the host is not 'local'")
            if d.link is not None:
                for name in ("fixed_s", "s_per_byte"):
                    v = getattr(d.link, name)
                    _need(_is_num(v) and v >= 0, f"devices[{i}].link.transfer_{name}", v, "a finite number >= 0")
            prof = d.profile
            _need(len(prof.block_s) == L and len(prof.ramp_s) == len(R), f"devices[{i}].profile",
                  f"{len(prof.block_s)} blocks and {len(prof.ramp_s)} ramps", f"{L} blocks and {len(R)} ramps")
            _need(all(sum(row[bi] for row in prof.block_s) + prof.head_s[bi] > 0
                      for bi in range(len(prof.batch_sizes))), f"devices[{i}].profile.block_s",
                  "all zero", "some positive time at every batch size")
        _need(_is_num(self.slo_s) and 0 < self.slo_s <= 600, "slo_ms", _ms(self.slo_s), "in (0, 600000]")
        _need(_is_num(self.slack_s) and 0 <= self.slack_s < self.slo_s, "slack_ms", _ms(self.slack_s),
              "in [0, slo_ms)")
        _need(_is_num(self.utilisation) and 0 < self.utilisation <= 1, "utilisation", self.utilisation,
              "a number in (0, 1]")
        _need(_is_num(self.slo_quantile) and 0.5 <= self.slo_quantile < 1, "slo_quantile", self.slo_quantile,
              "a fraction in [0.5, 1)")
        _need(isinstance(self.batch_sizes, list) and self.batch_sizes and all(
            _is_int(b) and 1 <= b <= 65536 for b in self.batch_sizes), "batch_sizes", self.batch_sizes,
            "a non-empty list of integers in 1..65536")
        _need(self.objective in OBJECTIVES, "objective", self.objective, "'goodput' or 'cost'")
        if self.objective == "cost":
            _need(_is_num(self.rate) and self.rate > 0 and math.isfinite(self.rate), "rate", self.rate,
                  "a positive request rate (objective 'cost')")
        _need(self.budget_per_hour is None or (_is_num(self.budget_per_hour) and self.budget_per_hour >= 0),
              "budget_per_hour", self.budget_per_hour, "a number >= 0 or null")
        _need(_is_num(self.sample_fraction) and 0 <= self.sample_fraction <= 1, "sample_fraction",
              self.sample_fraction, "a fraction in [0, 1]")
        ov = self.overheads
        for name, v in (("per_batch_ms", ov.per_batch_s), ("node_ms_per_request", ov.node_s_per_request),
                        ("worker_ms_per_batch", ov.worker_s_per_batch)):
            _need(_is_num(v) and 0 <= v <= 60, f"overheads.{name}", _ms(v), "milliseconds in [0, 60000]")
        for name in ("node_shares_cores", "work_conserving", "link_capacity"):
            _need(isinstance(getattr(ov, name), bool), f"overheads.{name}", getattr(ov, name), "true or false")
        _need(_is_num(ov.compute_scale) and 0.1 <= ov.compute_scale <= 100, "overheads.compute_scale",
              ov.compute_scale, "a number in [0.1, 100]")
        _need(_is_num(ov.node_core_share) and 0.05 <= ov.node_core_share <= 1, "overheads.node_core_share",
              ov.node_core_share, "a fraction in [0.05, 1]")
        _need(_is_num(ov.node_s_per_batch) and 0 <= ov.node_s_per_batch <= 60, "overheads.node_ms_per_batch",
              _ms(ov.node_s_per_batch), "milliseconds in [0, 60000]")
        _need(_is_num(ov.node_entry_rows) and 0 <= ov.node_entry_rows <= 1e6, "overheads.node_entry_rows",
              ov.node_entry_rows, "rows in [0, 1000000] (0: full batches)")
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
        for key in d:
            _need(key in _KNOWN, key, d[key], f"a known field ({', '.join(sorted(_KNOWN))})")
        model = _get(d, "model", dict)
        for key in model:
            _need(key in _MODEL_KNOWN, f"model.{key}", model[key], f"a known field ({', '.join(sorted(_MODEL_KNOWN))})")
        devices = [_device(i, dev) for i, dev in enumerate(_get(d, "devices", list))]
        rate = d.get("rate")
        return Problem(
            num_blocks=_get(model, "num_blocks", int, "model."),
            ramp_blocks=_get(model, "ramp_blocks", list, "model."),
            survival=_get(d, "survival", list),
            boundary_bytes=_get(model, "boundary_bytes", list, "model."),
            devices=devices,
            input_bytes=model.get("input_bytes", 0),
            slo_s=_number(d, "slo_ms", 100.0) / 1000,
            slack_s=_number(d, "slack_ms", 10.0) / 1000,
            slo_quantile=_number(d, "slo_quantile", 0.99),
            utilisation=_number(d, "utilisation", 0.8),
            batch_sizes=d.get("batch_sizes", [1, 2, 4, 8, 16, 32]),
            objective=d.get("objective", "goodput"),
            rate=None if rate is None else _number(d, "rate", None),
            budget_per_hour=None if d.get("budget_per_hour") is None else _number(d, "budget_per_hour", None),
            sample_fraction=_number(d, "sample_fraction", 0.0),
            overheads=_overheads(d.get("overheads", {})),
        ).validate()

    def to_json(self) -> dict:
        """The JSON form `from_json` reads (for writing example problems)."""
        out = {"model": {"num_blocks": self.num_blocks, "ramp_blocks": list(self.ramp_blocks),
                         "boundary_bytes": list(self.boundary_bytes), "input_bytes": self.input_bytes},
               "survival": list(self.survival), "slo_ms": self.slo_s * 1000, "slack_ms": self.slack_s * 1000,
               "slo_quantile": self.slo_quantile, "utilisation": self.utilisation, "batch_sizes": list(self.batch_sizes), "objective": self.objective,
               "sample_fraction": self.sample_fraction, "overheads": self.overheads.to_json(),
               "devices": [_device_json(d) for d in self.devices]}
        if self.rate is not None:
            out["rate"] = self.rate
        if self.budget_per_hour is not None:
            out["budget_per_hour"] = self.budget_per_hour
        return out


_KNOWN = {"model", "survival", "devices", "slo_ms", "slack_ms", "slo_quantile", "utilisation", "batch_sizes", "objective",
          "rate", "budget_per_hour", "sample_fraction", "overheads", "_comment"}
_MODEL_KNOWN = {"num_blocks", "ramp_blocks", "boundary_bytes", "input_bytes", "name", "_comment"}
_DEVICE_KNOWN = {"name", "count", "price_per_hour", "profile", "host", "link", "_comment"}
_LINK_KNOWN = {"transfer_fixed_s", "transfer_s_per_byte", "max_relative_error", "_comment"}
_OVERHEADS_KNOWN = {"per_batch_ms", "node_ms_per_request", "node_shares_cores", "work_conserving", "compute_scale",
                    "node_core_share", "node_ms_per_batch", "node_entry_rows", "link_capacity", "worker_ms_per_batch",
                    "_comment"}


def _overheads(d) -> Overheads:
    _need(isinstance(d, dict), "overheads", d, "an object")
    for key in d:
        _need(key in _OVERHEADS_KNOWN, f"overheads.{key}", d[key], f"a known field ({', '.join(sorted(_OVERHEADS_KNOWN))})")
    for key, default in (("node_shares_cores", False), ("work_conserving", False), ("link_capacity", True)):
        _need(isinstance(d.get(key, default), bool), f"overheads.{key}", d.get(key), "true or false")
    return Overheads(per_batch_s=_number(d, "per_batch_ms", 0.0, "overheads.") / 1000,
                     node_s_per_request=_number(d, "node_ms_per_request", 0.0, "overheads.") / 1000,
                     node_shares_cores=d.get("node_shares_cores", False), work_conserving=d.get("work_conserving", False),
                     compute_scale=_number(d, "compute_scale", 1.0, "overheads."),
                     node_s_per_batch=_number(d, "node_ms_per_batch", 0.0, "overheads.") / 1000,
                     node_entry_rows=_number(d, "node_entry_rows", 0.0, "overheads."),
                     node_core_share=_number(d, "node_core_share", 1.0, "overheads."),
                     link_capacity=d.get("link_capacity", True),
                     worker_s_per_batch=_number(d, "worker_ms_per_batch", 0.0, "overheads.") / 1000)


def _device(i: int, dev) -> DeviceType:
    where = f"devices[{i}]"
    _need(isinstance(dev, dict), where, dev, "an object")
    for key in dev:
        _need(key in _DEVICE_KNOWN, f"{where}.{key}", dev[key], f"a known field ({', '.join(sorted(_DEVICE_KNOWN))})")
    try:
        profile = DeviceProfile.from_json(_get(dev, "profile", dict, f"{where}."))
    except ProfileError as exc:
        raise ProblemError(f"{where}.profile: {exc}") from None
    return DeviceType(_get(dev, "name", str, f"{where}."), _get(dev, "count", int, f"{where}."),
                      _number(dev, "price_per_hour", 0.0, f"{where}."), profile,
                      dev.get("host", LOCAL), _link(where, dev.get("link")))


def _link(where: str, d) -> Link | None:
    """A device's link: null, or the fixed and per-byte seconds (TransferFit.to_json's fields)."""
    if d is None:
        return None
    _need(isinstance(d, dict), f"{where}.link", d, "an object or null")
    for key in d:
        _need(key in _LINK_KNOWN, f"{where}.link.{key}", d[key], f"a known field ({', '.join(sorted(_LINK_KNOWN))})")
    return Link(_number(d, "transfer_fixed_s", None, f"{where}.link."),
                _number(d, "transfer_s_per_byte", None, f"{where}.link."))


def _device_json(d: DeviceType) -> dict:
    out = {"name": d.name, "count": d.count, "price_per_hour": d.price_per_hour, "profile": d.profile.to_json()}
    if d.host != LOCAL:
        out["host"], out["link"] = d.host, d.link.to_json()
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _ms(seconds):
    return seconds * 1000 if _is_num(seconds) else seconds


def _need(ok: bool, name: str, value, what: str) -> None:
    if not ok:
        raise ProblemError(f"{name}: expected {what}, got {value!r}")


def _get(d: dict, key: str, kind: type, prefix: str = ""):
    _need(key in d, prefix + key, "nothing", "a value (the field is missing)")
    value = d[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    name = _KIND_NAMES.get(kind, kind.__name__)
    _need(ok, prefix + key, value, f"{'an' if name[0] in 'aeiou' else 'a'} {name}")
    return value


_KIND_NAMES = {int: "integer", str: "string", list: "list", dict: "object"}


def _number(d: dict, key: str, default, prefix: str = "") -> float:
    value = d.get(key, default)
    _need(_is_num(value), prefix + key, value, "a number")
    return float(value)
