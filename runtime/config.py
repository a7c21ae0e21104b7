"""E3's configuration: one root dataclass made of per-area dataclasses.

Every field says what it does; `validate()` raises ConfigError quoting the
bad value. `E3Config.from_dict` / `from_file` read JSON (unknown keys are an
error, not silently ignored, so a typo cannot pass for a setting).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_number(value: Any, integer: bool = False) -> bool:
    # bool is an int to Python, but `"batch": true` in a config is a mistake, not 1; and
    # Infinity/NaN (Python's json reads them) would pass a lower bound and mean nothing.
    return isinstance(value, int if integer else (int, float)) and not isinstance(value, bool) \
        and (isinstance(value, int) or math.isfinite(value))


def _number(value: Any, name: str, integer: bool = False) -> None:
    """Type-check a numeric setting before its range: a JSON string such as "100" would
    otherwise reach the range comparisons and raise a TypeError, not a ConfigError."""
    _require(_is_number(value, integer), f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")


@dataclass
class ModelConfig:
    path: str = "default"             # a model directory, or a built-in: "default" (MiniLM on short texts), "digits"
    policy: str | None = None         # exit policy; None: the manifest's recommendation
    threshold: float | None = None    # policy threshold; None: the manifest's recommendation

    def validate(self) -> None:
        _require(isinstance(self.path, str) and self.path != "", f"model.path must be a non-empty string, got {self.path!r}")
        if self.threshold is not None:
            _number(self.threshold, "model.threshold")


@dataclass
class WorkersConfig:
    mode: str = "process"             # "process": one subprocess per device; "inline": in the node, on a thread
    devices: list[str] | None = None  # e.g. ["cuda:0", "cuda:1"]; None: every GPU, else `cpu_workers` CPU workers
    # CPU worker processes when no GPU is used (process mode), and torch threads each (inline: torch's
    # default). One worker on two threads by default: a layer runs about 1.8x faster on two threads than
    # on one, so the default model's batches fit the SLO (MiniLM at 32 tokens: 7 ms a layer at batch 1
    # on two threads here; on one thread no plan of it met the 100 ms SLO on this 2-core machine).
    cpu_workers: int = 1
    threads_per_worker: int = 2
    max_inflight: int = 2             # batches queued at a worker (one computing, one ready)
    max_attempts: int = 3             # sends of a batch (the first, a hedge, a retry after its worker died)
                                      # before it is failed: 3 lets a batch whose hedge's worker dies while
                                      # the first worker is stopped be sent once more
    start_timeout_s: float = 120.0    # a worker that is not up by then is an error
    restart: bool = True              # restart a worker that died
    batch_timeout_s: float = 10.0     # a worker process holding one batch longer is hung: it is killed
                                      # (then restarted, its batches retried); a dead one closes its socket
    hedge: bool = True                # a batch held past its hedge time is sent again to another live
                                      # worker of its split (first reply wins), long before the watchdog
    hedge_factor: float = 8.0         # hedge time: this many times the split's expected batch time (sooner
                                      # if a second run would otherwise miss the rows' deadline) ...
    hedge_floor_s: float = 0.25       # ... and never less than this (a busy 2-core machine stalls for ms)
    # OpenMP's wait policy in CPU worker processes with more than one thread. "active" spins at every
    # barrier: with every core given to workers, the node (or anything else) running on one of them
    # stalls the spinning threads for whole scheduler slices (MiniLM at batch 1 on two threads: 25 ms
    # idle, 528 ms while two other processes ran; 42 ms with "passive"). "passive" sleeps instead and
    # costs about 25% when nothing else runs. "auto": passive when the workers' threads fill the cores
    # the node runs on, else OpenMP's default. An OMP_WAIT_POLICY in the environment wins.
    omp_wait_policy: str = "auto"

    def validate(self) -> None:
        _require(self.mode in ("process", "inline"), f"workers.mode must be 'process' or 'inline', got {self.mode!r}")
        _require(self.omp_wait_policy in ("auto", "active", "passive"),
                 f"workers.omp_wait_policy must be 'auto', 'active' or 'passive', got {self.omp_wait_policy!r}")
        _require(self.devices is None or (isinstance(self.devices, list) and self.devices and all(
            isinstance(d, str) and (d == "cpu" or d.startswith("cuda")) for d in self.devices)),
            f"workers.devices must be a non-empty list of 'cpu' / 'cuda:N', got {self.devices!r}")
        for name in ("cpu_workers", "threads_per_worker", "max_inflight", "max_attempts"):
            value = getattr(self, name)
            _number(value, f"workers.{name}", integer=True)
            _require(1 <= value <= 1024, f"workers.{name} must be an integer in 1..1024, got {value!r}")
        _number(self.start_timeout_s, "workers.start_timeout_s")
        _require(self.start_timeout_s > 0, f"workers.start_timeout_s must be positive, got {self.start_timeout_s!r}")
        _number(self.batch_timeout_s, "workers.batch_timeout_s")
        _require(self.batch_timeout_s > 0, f"workers.batch_timeout_s must be positive, got {self.batch_timeout_s!r}")
        _require(isinstance(self.hedge, bool), f"workers.hedge must be true or false, got {self.hedge!r}")
        for name in ("hedge_factor", "hedge_floor_s"):
            _number(getattr(self, name), f"workers.{name}")
        _require(self.hedge_factor >= 1, f"workers.hedge_factor must be >= 1, got {self.hedge_factor!r}")
        _require(0 < self.hedge_floor_s < self.batch_timeout_s,
                 f"workers.hedge_floor_s must lie in (0, batch_timeout_s), got {self.hedge_floor_s!r}")

    def resolved_devices(self) -> list[str]:
        if self.devices:
            return list(self.devices)
        import torch
        if self.mode == "process" and torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["cpu"] * (1 if self.mode == "inline" else self.cpu_workers)


@dataclass
class BatchingConfig:
    slo_ms: float = 100.0             # latency target: partial batches flush to meet it
    timeout_ms: float = 1000.0        # hard deadline: an input not answered by then gets an error (504)
    slo_reserve: float = 0.25         # share of the SLO kept back from batch waits for what stage estimates
                                      # do not see (HTTP, the event loop, queueing); the planner's slack too
    max_queue: int = 1024             # inputs waiting for admission; beyond it requests get 503
    max_queue_delay_ms: float | None = None  # while the oldest waiting input has waited longer, new
                                      # requests get 503: they would queue behind it and miss the SLO too
                                      # (None: slo_ms). Overload is refused fast, not answered late
    slots_per_ring: int = 16          # preallocated batch slots per split boundary
    sample_fraction: float = 0.05     # batches that evaluate every ramp so disabled ramps stay measured
    batch: int | None = None          # fix the batch size (None: the planner chooses)
    cuts: list[int] | None = None     # fix the split ends (blocks; None: the planner chooses)
    rebatch: bool = True              # merge survivors into full batches; False: they go on at once as a
                                      # shrunken batch (the EE model batched as is: a benchmark baseline)
    work_conserving: bool = True      # a partial batch leaves at once when its worker is idle; False: it
                                      # waits for B rows or its deadline whatever the worker is doing

    @property
    def queue_delay_s(self) -> float:
        """The admission queue's delay limit in seconds (max_queue_delay_ms, else the SLO)."""
        return (self.slo_ms if self.max_queue_delay_ms is None else self.max_queue_delay_ms) / 1000

    def validate(self) -> None:
        for name in ("slo_ms", "timeout_ms", "slo_reserve", "sample_fraction"):
            _number(getattr(self, name), f"batching.{name}")
        for name in ("max_queue", "slots_per_ring"):
            _number(getattr(self, name), f"batching.{name}", integer=True)
        _require(0 < self.slo_ms <= 60_000, f"batching.slo_ms must lie in (0, 60000], got {self.slo_ms!r}")
        _require(self.slo_ms <= self.timeout_ms <= 600_000,
                 f"batching.timeout_ms must lie in [slo_ms, 600000], got {self.timeout_ms!r}")
        _require(0.0 <= self.slo_reserve <= 0.9, f"batching.slo_reserve must lie in [0, 0.9], got {self.slo_reserve!r}")
        _require(self.max_queue >= 1, f"batching.max_queue must be a positive integer, got {self.max_queue!r}")
        _require(self.max_queue_delay_ms is None or (_is_number(self.max_queue_delay_ms)
                                                     and 0 < self.max_queue_delay_ms <= self.timeout_ms),
                 f"batching.max_queue_delay_ms must lie in (0, timeout_ms] or be null, got {self.max_queue_delay_ms!r}")
        _require(self.slots_per_ring >= 2, f"batching.slots_per_ring must be an integer >= 2, got {self.slots_per_ring!r}")
        _require(0.0 <= self.sample_fraction <= 1.0, f"batching.sample_fraction must lie in [0, 1], got {self.sample_fraction!r}")
        _require(self.batch is None or (_is_number(self.batch, integer=True) and 1 <= self.batch <= 4096),
                 f"batching.batch must be an integer in 1..4096 or null, got {self.batch!r}")
        for name in ("rebatch", "work_conserving"):
            _require(isinstance(getattr(self, name), bool),
                     f"batching.{name} must be true or false, got {getattr(self, name)!r}")
        _require(self.cuts is None or (isinstance(self.cuts, list) and all(_is_number(c, integer=True) for c in self.cuts)),
                 f"batching.cuts must be a list of block indices or null, got {self.cuts!r}")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"           # bind address: loopback unless told otherwise
    port: int = 8000                  # 0 picks a free port (printed at start)
    grpc_port: int = 8001             # KServe v2 gRPC port on the same host, as Triton's; 0 turns gRPC off
    max_body_bytes: int = 8 * 1024 * 1024
    max_inputs: int = 256             # inputs per request
    max_inflight_requests: int = 1024 # infer requests in the HTTP layer at once, at most; below it an
                                      # adaptive limit follows what is answered within the admission delay
                                      # less the SLO's reserve (runtime/admission_gate.py). Beyond either:
                                      # 503, not queued
    adaptive_limit: bool = True       # False: no adaptive limit, only max_inflight_requests (tests that send
                                      # bursts to check answers, not overload, as with max_queue_delay_ms)
    max_reading_bytes: int = 64 * 1024 * 1024  # bytes of infer bodies being read or parsed at once, charged
                                      # from Content-Length (unknown length: max_body_bytes); beyond it 503
    max_backlog_ms: float | None = None  # refuse (503) before reading a body while the oldest input
                                      # waiting for admission has waited longer (None: half of
                                      # batching.max_queue_delay_ms): an arrival would queue behind it
    max_loop_lag_ms: float | None = None  # refuse (503) while the event loop runs timers this late and
                                      # at least 8 requests are in flight (None: slo_reserve times
                                      # batching.max_queue_delay_ms, itself by default the SLO)
    body_timeout_s: float = 30.0      # a request body not received within this time gets 408, connection closed
    idle_timeout_s: float = 30.0      # a connection without a complete request header this long after it
                                      # opened or after its last answer is closed (slow headers, idle keep-alive)
    max_connections: int = 4096       # open client connections; one beyond it gets a 503 and is closed at once
    backlog: int = 1024               # the listening socket's accept backlog (the kernel caps it at somaxconn)

    def validate(self) -> None:
        for name in ("port", "grpc_port", "max_body_bytes", "max_inputs", "max_inflight_requests",
                     "max_reading_bytes", "max_connections", "backlog"):
            _number(getattr(self, name), f"server.{name}", integer=True)
        _require(0 <= self.port <= 65535, f"server.port must be in 0..65535, got {self.port!r}")
        _require(0 <= self.grpc_port <= 65535, f"server.grpc_port must be in 0..65535 (0: off), got {self.grpc_port!r}")
        _require(self.grpc_port == 0 or self.grpc_port != self.port,
                 f"server.grpc_port must differ from server.port, got {self.grpc_port!r} for both")
        _require(self.max_body_bytes >= 1024, f"server.max_body_bytes must be an integer >= 1024, got {self.max_body_bytes!r}")
        _require(self.max_inputs >= 1, f"server.max_inputs must be a positive integer, got {self.max_inputs!r}")
        for name in ("max_inflight_requests", "max_connections", "backlog"):
            _require(1 <= getattr(self, name) <= 1_000_000,
                     f"server.{name} must be an integer in 1..1000000, got {getattr(self, name)!r}")
        _require(self.max_reading_bytes >= self.max_body_bytes,
                 f"server.max_reading_bytes must be >= server.max_body_bytes ({self.max_body_bytes}), "
                 f"got {self.max_reading_bytes!r}")
        for name in ("max_backlog_ms", "max_loop_lag_ms"):
            value = getattr(self, name)
            _require(value is None or (_is_number(value) and 0 < value <= 600_000),
                     f"server.{name} must lie in (0, 600000] or be null, got {value!r}")
        _require(isinstance(self.adaptive_limit, bool),
                 f"server.adaptive_limit must be true or false, got {self.adaptive_limit!r}")
        for name in ("body_timeout_s", "idle_timeout_s"):
            _number(getattr(self, name), f"server.{name}")
            _require(0 < getattr(self, name) <= 3600,
                     f"server.{name} must lie in (0, 3600], got {getattr(self, name)!r}")


@dataclass
class ReplanConfig:
    enabled: bool = True              # re-plan live from exit forecasts
    interval_s: float = 2.0           # exit counts are gathered per interval
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    min_gain: float = 0.10            # apply a new plan only if predicted goodput rises by this fraction
    utilisation: float = 0.8          # headroom the planner leaves on devices its queue model does not cover
    slack_ms: float = 5.0             # latency the planner keeps for what its model leaves out (the client's
                                      # HTTP and network); the queue, batching and the node's time are modelled
    dispatch_ms: float = 1.0          # per-batch cost (dispatch, messages, shared CPU) assumed until measured
    measure_dispatch: bool = True     # measure that cost live (batches sent to an idle worker); False: pin it
    node_ms_per_request: float = 0.5  # the node's own CPU per request (HTTP, decoding, answering) until measured
    measure_node: bool = True         # measure it live (the node's CPU time per admitted request); False: pin it
    profile_busy_share: float = 0.15  # a start-up profile taken while other processes used more of the
                                      # machine than this is used for the run but not cached
    measure_compute: bool = True      # scale the profile by the workers' measured compute over it, live
                                      # (the profile is taken on an idle machine); False: the profile as is
    fallback_margin: float = 0.2      # a plan measured this far under its prediction, fallback_intervals
    fallback_intervals: int = 2       # intervals in a row, gives way to the better baseline (stock, EE as is)
    forecast_process: bool = True     # fit forecasts in a child process: ARIMA holds the GIL ~25 ms per
                                      # ramp, which on a node thread stalls the event loop
    observe: bool = False             # shadow mode: serve the configured plan (batching.batch, cuts) and
                                      # only measure, value it and say what the planner would run instead

    def validate(self) -> None:
        for name in ("interval_s", "min_gain", "utilisation", "slack_ms", "dispatch_ms", "node_ms_per_request",
                     "fallback_margin"):
            _number(getattr(self, name), f"replan.{name}")
        _require(self.slack_ms >= 0, f"replan.slack_ms must be >= 0, got {self.slack_ms!r}")
        _require(self.interval_s > 0, f"replan.interval_s must be positive, got {self.interval_s!r}")
        _require(isinstance(self.batch_sizes, list) and self.batch_sizes and all(
            _is_number(b, integer=True) and 1 <= b <= 4096 for b in self.batch_sizes),
            f"replan.batch_sizes must be a non-empty list of integers in 1..4096, got {self.batch_sizes!r}")
        _require(self.min_gain >= 0, f"replan.min_gain must be >= 0, got {self.min_gain!r}")
        _require(0 < self.utilisation <= 1, f"replan.utilisation must lie in (0, 1], got {self.utilisation!r}")
        _number(self.profile_busy_share, "replan.profile_busy_share")
        _require(0 < self.profile_busy_share <= 1,
                 f"replan.profile_busy_share must lie in (0, 1], got {self.profile_busy_share!r}")
        for name in ("enabled", "measure_dispatch", "measure_node", "measure_compute", "forecast_process", "observe"):
            _require(isinstance(getattr(self, name), bool),
                     f"replan.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("dispatch_ms", "node_ms_per_request"):
            _require(0 <= getattr(self, name) <= 1000, f"replan.{name} must lie in [0, 1000], got {getattr(self, name)!r}")
        _require(self.enabled or not self.observe,
                 "replan.observe runs the planner beside a fixed plan, but replan.enabled is false: set one")
        _require(0 < self.fallback_margin < 1,
                 f"replan.fallback_margin must lie in (0, 1), got {self.fallback_margin!r}")
        _require(_is_number(self.fallback_intervals, integer=True) and self.fallback_intervals >= 1,
                 f"replan.fallback_intervals must be an integer >= 1, got {self.fallback_intervals!r}")


@dataclass
class ClusterConfig:
    """Many machines (runtime/coordinator.py, runtime/member.py; DESIGN.md section 7)."""

    token_file: str | None = None     # the shared cluster token (owner-only file); set: this node
                                      # takes part in a cluster (a coordinator, or a member with `join`)
    join: str | None = None           # a member: the coordinator's http://HOST:PORT; None: a coordinator
    heartbeat_s: float = 1.0          # a member's heartbeat interval
    lease_s: float = 5.0              # a member not heard from this long is lost (its batches retried
                                      # elsewhere or failed, the plan moved off it)
    join_attempts: int = 5            # a member tries to reach its coordinator this often, then exits 1
    retry_delay_s: float = 1.0        # the first wait between attempts (doubled each time, at most 8 s)
    max_frame_bytes: int = 64 * 1024 * 1024   # a link frame (header and tensors) larger is refused
    link_credits: int = 8             # data frames a member takes in flight per link (back-pressure)
    max_members: int = 16             # members at once; a join beyond it is refused (503)
    challenge_ttl_s: float = 30.0     # an auth challenge is good this long
    split_hosts: list[list[str]] | None = None  # the coordinator's static placement across hosts: per
                                      # split, the hosts whose workers run it ("local": the coordinator's
                                      # own); a split none of whose hosts is a live member runs locally
    link_measure_s: float = 30.0      # a member's link is measured again this often (latency, bandwidth)
    straggler_factor: float = 3.0     # a member's device type whose batches take this many times its profile
    straggler_intervals: int = 3      # (relative to the best-behaved type) for this many re-plan intervals
                                      # in a row is left out of the plans ...
    straggler_probation_s: float = 60.0   # ... for this long, then profiled afresh and planned with again

    @property
    def enabled(self) -> bool:
        return self.token_file is not None

    def validate(self) -> None:
        _require(self.token_file is None or (isinstance(self.token_file, str) and self.token_file != ""),
                 f"cluster.token_file must be a path or null, got {self.token_file!r}")
        _require(self.join is None or (isinstance(self.join, str) and self.join.startswith(("http://", "https://"))
                                       and len(self.join) > len("http://")),
                 f"cluster.join must be the coordinator's http://HOST:PORT or null, got {self.join!r}")
        _require(self.join is None or self.token_file is not None,
                 f"cluster.join ({self.join!r}) needs cluster.token_file: joins carry the shared token")
        for name in ("heartbeat_s", "lease_s", "retry_delay_s", "challenge_ttl_s", "link_measure_s"):
            _number(getattr(self, name), f"cluster.{name}")
            _require(0 < getattr(self, name) <= 3600, f"cluster.{name} must lie in (0, 3600], got {getattr(self, name)!r}")
        _require(self.lease_s >= 2 * self.heartbeat_s,
                 f"cluster.lease_s ({self.lease_s!r}) must be at least twice cluster.heartbeat_s ({self.heartbeat_s!r})")
        _number(self.straggler_factor, "cluster.straggler_factor")
        _require(1 < self.straggler_factor <= 1000,
                 f"cluster.straggler_factor must lie in (1, 1000], got {self.straggler_factor!r}")
        _number(self.straggler_probation_s, "cluster.straggler_probation_s")
        _require(0 < self.straggler_probation_s <= 86400,
                 f"cluster.straggler_probation_s must lie in (0, 86400], got {self.straggler_probation_s!r}")
        for name, low, high in (("join_attempts", 1, 1000), ("max_frame_bytes", 64 * 1024, 1 << 31),
                                ("link_credits", 1, 4096), ("max_members", 1, 1024), ("straggler_intervals", 1, 1000)):
            value = getattr(self, name)
            _number(value, f"cluster.{name}", integer=True)
            _require(low <= value <= high, f"cluster.{name} must be an integer in {low}..{high}, got {value!r}")
        _require(self.split_hosts is None or (isinstance(self.split_hosts, list) and self.split_hosts and all(
            isinstance(h, list) and h and all(isinstance(x, str) and x for x in h) for h in self.split_hosts)),
            f"cluster.split_hosts must be a list (per split) of non-empty lists of hosts, or null, got {self.split_hosts!r}")


@dataclass
class LLMConfig:
    """The generation engine of a served causal LM (`--model gemma3-270m`); classifiers ignore it."""
    kv_slots: int = 8          # sequences held at once: the KV pool's slots and the largest decode batch
    max_len: int = 512         # tokens per slot (the context limit): prompt plus max_tokens must fit
    use_exits: bool = True     # False: every token runs every layer (full-depth decoding)
    threads: int | None = None  # torch intra-op threads on the engine's thread; None: torch's default
    kv_mode: str = "copy"      # the KV of layers an exited token skipped: "copy" (projected from its exit
                               # state, CALM) or "exact" (those layers run for it later, EE-LLM catch-up)
    # Each token must come within this of the one before (the first: of its admission into the engine,
    # its prefill included). A sequence that misses it ends there with finish_reason "deadline" and its
    # KV slot is freed: a stalled or overloaded engine answers what it has instead of holding a client
    # for ever. On this 2-core CPU a decode step of 8 rows takes ~0.2 s, a 512-token prefill ~1-2 s.
    # None: no deadline.
    token_deadline_ms: float | None = 10_000.0
    drain_timeout_s: float = 30.0  # on Ctrl-C, sequences still running after this end with an error
    # Rebatching across decode steps: the layer counts where a decode step is split, e.g. [6, 12]. A
    # token that survives a split waits; the waiting tokens of several steps (and sequences) run the
    # next split together, while the sequences whose token exited go straight on to their next token.
    # None: every decode step runs as one batch whose rows drop out as their tokens exit.
    split_layers: list[int] | None = None
    merge_rows: int | None = None  # a deeper split runs once this many tokens wait for it (None: half the
                                   # KV slots, at least 1) ...
    max_wait_steps: int = 4        # ... or once its oldest has waited this many engine steps, or at once
                                   # when no sequence could start a token without it

    def validate(self) -> "LLMConfig":
        _number(self.kv_slots, "llm.kv_slots", integer=True)
        _require(self.kv_slots >= 1, f"llm.kv_slots must be at least 1, got {self.kv_slots!r}")
        _number(self.max_len, "llm.max_len", integer=True)
        _require(self.max_len >= 2, f"llm.max_len must be at least 2, got {self.max_len!r}")
        _require(isinstance(self.use_exits, bool), f"llm.use_exits must be true or false, got {self.use_exits!r}")
        if self.threads is not None:
            _number(self.threads, "llm.threads", integer=True)
            _require(self.threads >= 1, f"llm.threads must be at least 1, got {self.threads!r}")
        _require(self.kv_mode in ("copy", "exact"), f"llm.kv_mode must be 'copy' or 'exact', got {self.kv_mode!r}")
        _require(self.token_deadline_ms is None or (_is_number(self.token_deadline_ms)
                                                    and 0 < self.token_deadline_ms <= 600_000),
                 f"llm.token_deadline_ms must lie in (0, 600000] or be null, got {self.token_deadline_ms!r}")
        _require(self.split_layers is None or (isinstance(self.split_layers, list) and self.split_layers
                 and all(_is_number(b, integer=True) and b >= 1 for b in self.split_layers)
                 and self.split_layers == sorted(set(self.split_layers))),
                 f"llm.split_layers must be increasing layer counts (>= 1) or null, got {self.split_layers!r}")
        _require(self.merge_rows is None or (_is_number(self.merge_rows, integer=True) and 1 <= self.merge_rows),
                 f"llm.merge_rows must be a positive integer or null, got {self.merge_rows!r}")
        _require(_is_number(self.max_wait_steps, integer=True) and self.max_wait_steps >= 1,
                 f"llm.max_wait_steps must be an integer >= 1, got {self.max_wait_steps!r}")
        _number(self.drain_timeout_s, "llm.drain_timeout_s")
        _require(0 <= self.drain_timeout_s <= 3600,
                 f"llm.drain_timeout_s must lie in [0, 3600], got {self.drain_timeout_s!r}")
        return self

    @property
    def token_deadline_s(self) -> float | None:
        return None if self.token_deadline_ms is None else self.token_deadline_ms / 1000


@dataclass
class E3Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    replan: ReplanConfig = field(default_factory=ReplanConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)

    def validate(self) -> "E3Config":
        for area in dataclasses.fields(self):
            getattr(self, area.name).validate()
        # A request larger than the admission queue could never be admitted.
        _require(self.server.max_inputs <= self.batching.max_queue,
                 f"server.max_inputs ({self.server.max_inputs}) must not exceed batching.max_queue "
                 f"({self.batching.max_queue})")
        c = self.cluster
        if c.split_hosts is not None:
            _require(c.join is None, "cluster.split_hosts places splits on a coordinator; a member (cluster.join) takes no placement")
            _require(self.batching.cuts is not None and len(c.split_hosts) == len(self.batching.cuts) + 1,
                     f"cluster.split_hosts names hosts for {len(c.split_hosts)} splits; it needs batching.cuts "
                     f"with one cut fewer, got cuts {self.batching.cuts!r}")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any], validate: bool = True) -> "E3Config":
        """`validate=False`: the caller validates once it has applied its own overrides (the CLI's
        flags), so a file that is complete only with them (split_hosts here, --cuts there) is fine."""
        _require(isinstance(data, dict), f"config must be a JSON object, got {type(data).__name__}")
        areas = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for name, value in data.items():
            _require(name in areas, f"unknown config section {name!r}; known: {sorted(areas)}")
            kwargs[name] = _area(name, areas[name].default_factory, value)
        config = cls(**kwargs)
        return config.validate() if validate else config

    @classmethod
    def from_file(cls, path: str | os.PathLike, validate: bool = True) -> "E3Config":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid JSON: {exc}") from None
        return cls.from_dict(data, validate)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _area(name: str, factory, value: Any):
    _require(isinstance(value, dict), f"config section {name!r} must be an object, got {value!r}")
    known = {f.name for f in dataclasses.fields(factory)}
    for key in value:
        _require(key in known, f"unknown setting {name}.{key}; known: {sorted(known)}")
    return factory(**value)
