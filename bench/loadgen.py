"""Open-loop Poisson load over HTTP, in its own process, as a client would send it.

    python3 -m bench.loadgen --url http://127.0.0.1:8000 --model digits-resnet \\
        --inputs inputs.json --rate 200 --duration 10 --slo-ms 100

The inputs file is JSON: {"inputs": [...], "labels": [...], "reference": [...]}
(labels and the full model's predictions are optional, and score accuracy and
agreement), and optionally "phases": [{"start_s": 0, "picks": [indices]}, ...]
so that the mix of inputs changes over time (the switching workload).

Open loop: requests leave on a Poisson schedule whatever the server does
(a closed loop would slow down with the server and hide its queueing). The
summary (JSON on stdout) counts a request as good when it got a 200 within
the SLO, and reports how late the generator itself sent (if that grows, the
client, not the server, is the bottleneck, and the run says so).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import aiohttp


@dataclass
class LoadResult:
    rate: float
    duration_s: float
    sent: int
    ok: int
    good: int                      # 200 within the SLO
    statuses: dict[str, int]
    latency_ms: dict[str, float]
    send_lag_ms_p99: float         # how late requests left versus the schedule
    exits: dict[str, int] = field(default_factory=dict)
    correct: int = 0               # answers equal to the label, where labels are known
    labelled: int = 0
    agree: int = 0                 # answers equal to the full model's, where known
    timeline: list[list[int]] = field(default_factory=list)   # per second of arrival: [sent, good]

    @property
    def good_fraction(self) -> float:
        return self.good / self.sent if self.sent else 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def schedule(rate: float, duration_s: float, seed: int) -> list[float]:
    """Poisson arrival times in [0, duration)."""
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        out.append(t)


def body_for(x) -> dict:
    if isinstance(x, str):
        return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [x]}]}
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, len(x)], "data": x}]}


def pick_inputs(times: list[float], n_inputs: int, phases: list[dict] | None, seed: int) -> list[int]:
    """Which input each request carries: uniform over all, or over the phase's picks at its time."""
    rng = random.Random(seed + 1)
    if not phases:
        return [rng.randrange(n_inputs) for _ in times]
    out = []
    for t in times:
        phase = max((p for p in phases if p["start_s"] <= t), key=lambda p: p["start_s"], default=phases[0])
        out.append(rng.choice(phase["picks"]))
    return out


async def open_loop(times: list[float], send) -> list[float]:
    """Start `send(i, due)` (a coroutine function; `due`: the perf_counter time the request was
    scheduled for) at each scheduled time `times[i]`, whatever the answers do; wait for every one;
    how late each left versus the schedule (ms).

    Shared by the HTTP generator and the in-process sidecar probe (bench/sidecar.py), so both
    paths keep the same schedule and measure their send lag alike."""
    lags: list[float] = []
    tasks = []
    t0 = time.perf_counter()
    for i, at in enumerate(times):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lags.append(max(0.0, -delay) * 1000)
        tasks.append(asyncio.create_task(send(i, t0 + at)))
    await asyncio.gather(*tasks)
    return lags


def answer_of(payload: dict) -> tuple[int, int]:
    """(label, exit point) of a one-input v2 response."""
    out = {t["name"]: t["data"] for t in payload["outputs"]}
    return out["label"][0], out["exit_point"][0]


async def run_load(url: str, model: str, inputs: list, labels: list | None, rate: float,
                   duration_s: float, slo_ms: float, seed: int = 0, timeout_s: float = 5.0,
                   reference: list | None = None, phases: list[dict] | None = None) -> LoadResult:
    times = schedule(rate, duration_s, seed)
    picks = pick_inputs(times, len(inputs), phases, seed)
    bodies = [json.dumps(body_for(inputs[i])).encode() for i in picks]
    records: list[tuple[int, float, tuple[int, int] | None]] = [None] * len(times)
    endpoint = f"{url}/v2/models/{model}/infer"
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

        async def one(i: int, due: float) -> None:
            # From when the request leaves: this process's own lateness is the client's, judged by the lag rule.
            start = time.perf_counter()
            try:
                async with session.post(endpoint, data=bodies[i], headers={"Content-Type": "application/json"}) as r:
                    payload = await r.json()
                    records[i] = (r.status, (time.perf_counter() - start) * 1000,
                                  answer_of(payload) if r.status == 200 else None)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                records[i] = (0, (time.perf_counter() - start) * 1000, None)

        lags = await open_loop(times, one)
    return summarise(records, picks, labels, rate, duration_s, slo_ms, lags, times, reference)


def summarise(records, picks, labels, rate, duration_s, slo_ms, lags, times, reference=None) -> LoadResult:
    """records[i]: (status, latency ms, (label, exit point) when answered, else None); status 200 is
    an answer, whatever the transport (the sidecar path uses the HTTP status of the error raised)."""
    statuses: dict[str, int] = {}
    ok_lat, exits, good, correct, labelled, agree = [], {}, 0, 0, 0, 0
    timeline = [[0, 0] for _ in range(int(duration_s) + 1)]
    for (status, ms, answer), pick, t in zip(records, picks, times):
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        timeline[int(t)][0] += 1
        if status != 200:
            continue
        ok_lat.append(ms)
        good += ms <= slo_ms
        timeline[int(t)][1] += ms <= slo_ms
        label, exit_point = answer
        exits[str(exit_point)] = exits.get(str(exit_point), 0) + 1
        if labels is not None:
            labelled += 1
            correct += label == labels[pick]
        if reference is not None:
            agree += label == reference[pick]
    lat = {f"p{q}": percentile(ok_lat, q) for q in (50, 90, 99)}
    return LoadResult(rate, duration_s, len(records), len(ok_lat), good, statuses, lat,
                      percentile(lags, 99), exits, correct, labelled, agree, timeline)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--inputs", required=True, help='JSON file {"inputs": [...], "labels": [...]}')
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--slo-ms", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0:
        print("bench.loadgen: error: --rate and --duration must be positive", file=sys.stderr)
        return 2
    with open(args.inputs) as fh:
        data = json.load(fh)
    import uvloop
    result = uvloop.run(run_load(args.url, args.model, data["inputs"], data.get("labels"), args.rate,
                                 args.duration, args.slo_ms, args.seed, reference=data.get("reference"),
                                 phases=data.get("phases")))
    print(json.dumps({**asdict(result), "good_fraction": result.good_fraction}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
