"""Prometheus metrics of one runtime (its own registry, so two runtimes in one
process, or tests, never share counters)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)


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
        self.workers = Counter("e3_worker_events_total", "Worker deaths, hangs (killed by the watchdog) and restarts", ["event"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- hooks called by the runtime ----------------------------------------

    def admitted(self, n: int) -> None:
        self.requests.labels("admitted").inc(n)

    def rejected(self, reason: str, n: int) -> None:
        """`n` inputs refused at admission (counted per input, like the other outcomes)."""
        self.requests.labels("rejected").inc(n)
        self.failures.labels(reason).inc(n)

    def answered(self, exit_point: int, latency_s: float, within_slo: bool) -> None:
        self.requests.labels("answered").inc()
        self.latency.observe(latency_s)
        self.exits.labels(str(exit_point)).inc()
        if within_slo:
            self.within_slo.inc()

    def failed(self, reason: str) -> None:
        self.requests.labels("failed").inc()
        self.failures.labels(reason).inc()

    def batch_done(self, split: int, batch, msg: dict) -> None:
        """A DONE reply for `batch`, the one Pipeline.on_done just finished at `split`."""
        label = str(split)
        self.batch_rows.labels(label).observe(len(msg["exited"]) + len(msg["survivors"]))
        self.compute.labels(label).observe(msg["compute_s"])
        wait = self.queue_wait.labels(label)
        for row in batch.rows:
            wait.observe(max(0.0, batch.sent_at - row.queued_at))

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
