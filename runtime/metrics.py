"""Prometheus metrics of one runtime (its own registry, so two runtimes in one
process, or tests, never share counters)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)


@dataclass
class Duration:
    """A count and a total time in nanoseconds (Triton's statistics keep every duration so)."""
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class InferenceStats:
    """Exact per-model totals for Triton's statistics extension (triton_extensions.py), which
    wants integer counts and nanoseconds rather than Prometheus's float sums.

    Counted per input, as the runtime admits and answers inputs, not requests. A batch's worker
    time counts once per execution and once per row in it (the time that row waited on compute),
    summed over the splits the row passed through."""
    inference_count: int = 0              # inputs answered with a result
    execution_count: int = 0              # batches run by workers, every split
    last_inference_ms: int = 0            # wall clock of the last answer, ms since the epoch
    success: Duration = field(default_factory=Duration)   # admission to answer
    fail: Duration = field(default_factory=Duration)      # count only: failures carry no duration
    queue: Duration = field(default_factory=Duration)     # waits at split entries, per row
    compute: Duration = field(default_factory=Duration)   # worker batch time, per row
    by_batch: dict[int, Duration] = field(default_factory=dict)   # rows -> worker time per batch

    def answered(self, latency_s: float) -> None:
        self.inference_count += 1
        self.last_inference_ms = int(time.time() * 1000)
        self.success.add(latency_s)
        self.queue.count += 1
        self.compute.count += 1

    def batch(self, rows: int, compute_s: float, waits_s: float) -> None:
        self.execution_count += 1
        self.by_batch.setdefault(rows, Duration()).add(compute_s)
        self.compute.ns += int(compute_s * rows * 1e9)
        self.queue.ns += int(waits_s * 1e9)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("e3_inputs_total", "Inputs by outcome", ["outcome"], registry=r)
        self.failures = Counter("e3_failures_total", "Inputs not answered with a result, by reason",
                                ["reason"], registry=r)
        self.latency = Histogram("e3_latency_seconds", "Admission to answer, per input",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.within_slo = Counter("e3_within_slo_total", "Inputs answered within the SLO", registry=r)
        self.exits = Counter("e3_exits_total", "Inputs answered per exit point", ["exit_point"], registry=r)
        self.batch_rows = Histogram("e3_batch_rows", "Rows per batch at each split's entry", ["split"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.compute = Histogram("e3_compute_seconds", "Worker time per batch", ["split"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("e3_queue_seconds", "Time an input waited at each split's entry "
                                    "before its batch was sent", ["split"], buckets=LATENCY_BUCKETS, registry=r)
        self.dropped = Counter("e3_answers_dropped_total", "Answers for an input that already had one: "
                               "late (after its deadline answer) or duplicate (a bug)", ["why"], registry=r)
        self.bad_requests = Counter("e3_bad_requests_total", "HTTP requests refused as malformed or "
                                    "not applicable, by status", ["status"], registry=r)
        self.http_refusals = Counter("e3_http_refused_total", "Infer requests refused (503) by the HTTP "
                                     "layer's admission gate before their body was read, by limit", ["reason"],
                                     registry=r)
        self.queue_rows = Gauge("e3_queue_rows", "Rows waiting at each split's entry (current epoch)",
                                ["split"], registry=r)
        self.epoch = Gauge("e3_plan_epoch", "Epoch of the plan taking new inputs", registry=r)
        self.plan_batch = Gauge("e3_plan_batch_size", "Batch size of the current plan", registry=r)
        self.plan_splits = Gauge("e3_plan_splits", "Splits in the current plan", registry=r)
        self.survival = Gauge("e3_forecast_survival", "Forecast fraction continuing past each exit point",
                              ["exit_point"], registry=r)
        self.workers = Counter("e3_worker_events_total", "Worker deaths, hangs (killed by the watchdog), restarts, "
                               "and batches hedged (sent again: their worker held them past the hedge time)",
                               ["event"], registry=r)
        self.members = Gauge("e3_cluster_members", "Members of this coordinator's cluster, by state",
                             ["state"], registry=r)
        self.cluster_events = Counter("e3_cluster_events_total", "Cluster joins, joins refused (by status) "
                                      "and members lost", ["event"], registry=r)
        self.stats = InferenceStats()

        self.answers = self.answers_within_slo = 0

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- hooks called by the runtime ----------------------------------------

    def admitted(self, n: int) -> None:
        self.requests.labels("admitted").inc(n)

    def rejected(self, reason: str, n: int) -> None:
        """`n` inputs refused at admission (counted per input, like the other outcomes)."""
        self.requests.labels("rejected").inc(n)
        self.failures.labels(reason).inc(n)
        self.stats.fail.count += n

    def answered(self, exit_point: int, latency_s: float, within_slo: bool) -> None:
        self.answers += 1                   # plain counts for the planner actor's watch (PlanWatch)
        self.answers_within_slo += within_slo
        self.requests.labels("answered").inc()
        self.latency.observe(latency_s)
        self.exits.labels(str(exit_point)).inc()
        if within_slo:
            self.within_slo.inc()
        self.stats.answered(latency_s)

    def failed(self, reason: str) -> None:
        self.requests.labels("failed").inc()
        self.failures.labels(reason).inc()
        self.stats.fail.count += 1

    def batch_done(self, split: int, batch, msg: dict) -> None:
        """A DONE reply for `batch`, the one Pipeline.on_done just finished at `split`."""
        label = str(split)
        rows = len(msg["exited"]) + len(msg["survivors"])
        self.batch_rows.labels(label).observe(rows)
        self.compute.labels(label).observe(msg["compute_s"])
        wait, waits_s = self.queue_wait.labels(label), 0.0
        for row in batch.rows:
            w = max(0.0, batch.sent_at - row.queued_at)
            wait.observe(w)
            waits_s += w
        self.stats.batch(rows, msg["compute_s"], waits_s)

    def dropped_answer(self, late: bool) -> None:
        self.dropped.labels("late" if late else "duplicate").inc()

    def http_refused(self, reason: str) -> None:
        self.http_refusals.labels(reason).inc()

    def bad_request(self, status: int) -> None:
        self.bad_requests.labels(str(status)).inc()

    def queues(self, pipeline, now: float) -> None:
        if pipeline is None:
            return
        for stage in pipeline.stages:
            self.queue_rows.labels(str(stage.index)).set(len(stage.queue))

    def plan_applied(self, epoch: int, placement) -> None:
        self.epoch.set(epoch)
        self.plan_batch.set(placement.batch)
        self.plan_splits.set(len(placement.splits))

    def forecast(self, survival) -> None:
        for k, s in enumerate(survival):
            self.survival.labels(str(k)).set(s)

    def worker_died(self) -> None:
        self.workers.labels("died").inc()

    def worker_hung(self) -> None:
        self.workers.labels("hung").inc()

    def worker_restarted(self) -> None:
        self.workers.labels("restarted").inc()

    def batch_hedged(self) -> None:
        self.workers.labels("hedged").inc()

    def cluster(self, states: dict[str, int]) -> None:
        for state in ("warming", "ready", "lost", "left"):
            self.members.labels(state).set(states.get(state, 0))

    def cluster_event(self, event: str) -> None:
        self.cluster_events.labels(event).inc()

TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)


class LLMMetrics:
    """Prometheus metrics of one served causal LM (its own registry), fed by runtime/llm_service.py
    on the event loop as each request's tokens reach it."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, kv_slots: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("e3_llm_requests_total", "Generation requests by outcome: admitted, or how "
                                "they ended (length, stop, deadline, abort, error), or refused (full, draining)",
                                ["outcome"], registry=r)
        self.tokens = Counter("e3_llm_tokens_total", "Generated tokens by the decoder layers they ran "
                              "(the model's depth: full depth)", ["exit_layer"], registry=r)
        self.ttft = Histogram("e3_llm_time_to_first_token_seconds", "Admission to the first token",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.token_gap = Histogram("e3_llm_inter_token_seconds", "Time between a sequence's tokens",
                                   buckets=TOKEN_BUCKETS, registry=r)
        self.held = Gauge("e3_llm_sequences_held", "Sequences holding a KV slot", registry=r)
        Gauge("e3_llm_kv_slots", "KV slots (the most sequences held at once)", registry=r).set(kv_slots)
        self.bad_requests = Counter("e3_bad_requests_total", "HTTP requests refused as malformed or "
                                    "not applicable, by status", ["status"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def outcome(self, what: str) -> None:
        self.requests.labels(what).inc()

    def token(self, exit_layer: int, since_s: float, first: bool) -> None:
        self.tokens.labels(str(exit_layer)).inc()
        (self.ttft if first else self.token_gap).observe(since_s)

    def bad_request(self, status: int) -> None:
        self.bad_requests.labels(str(status)).inc()
