"""Open-loop Poisson load of streaming /v1/completions requests, in its own process.

    python3 -m bench.llm_load --url http://127.0.0.1:8000 --model gemma3-270m \\
        --prompts prompts.json --rate 0.5 --duration 20 --max-tokens 16 \\
        --ttft-slo-ms 3000 --tpot-slo-ms 800

The prompts file is JSON {"prompts": [...texts], "picks": [...indices]} (the
mix: which prompt each request carries, in turn). Requests leave on a Poisson
schedule whatever the server does (bench/loadgen.py's `open_loop`). Each
request asks for `--max-tokens` greedy tokens with no stop, so every answer
has the same length; the client notes when each token's chunk arrives.

Token timing (`TokenTimes`): the first token's latency is its arrival after
the request left (time to first token, TTFT); every later token's is the gap
since the one before it (time per output token). A token is good when its
latency is within its SLO (TTFT SLO for the first, per-token SLO for the
rest). A request refused (503) or cut short has its missing tokens counted as
missed. The summary (JSON on stdout): tokens asked for, good tokens, TTFT and
gap percentiles, statuses, exit layers, the send lag, and (with --keep-tokens)
every request's tokens, to score agreement with full depth.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import aiohttp

from .loadgen import open_loop, percentile, schedule


@dataclass
class TokenTimes:
    """One request as the client saw it: HTTP status, token ids, exit layers, and arrival times
    (perf_counter seconds) of each token, from `sent` (when the request left)."""

    sent: float
    status: int = 0
    tokens: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)

    def latencies(self) -> list[float]:
        """Seconds each token took: the first from `sent` (TTFT), the others from the token before."""
        marks = [self.sent, *self.arrivals]
        return [b - a for a, b in zip(marks, marks[1:])]

    def good_tokens(self, ttft_slo_s: float, tpot_slo_s: float) -> int:
        """Tokens within their SLO (the first within TTFT, each later one within the per-token SLO)."""
        return sum(lat <= (ttft_slo_s if i == 0 else tpot_slo_s) for i, lat in enumerate(self.latencies()))


@dataclass
class LLMLoadResult:
    rate: float                    # requests per second offered
    duration_s: float
    max_tokens: int
    sent: int
    answered: int                  # status 200 with every token asked for
    tokens_asked: int              # sent x max_tokens
    tokens_good: int
    first_good: int                # requests whose first token came within the TTFT SLO
    statuses: dict[str, int]
    ttft_ms: dict[str, float]
    gap_ms: dict[str, float]
    send_lag_ms_p99: float
    exit_layers: dict[str, int] = field(default_factory=dict)
    token_lists: list[list[int]] | None = None      # per request, with --keep-tokens
    picks: list[int] | None = None

    @property
    def token_fraction(self) -> float:
        return self.tokens_good / self.tokens_asked if self.tokens_asked else 0.0

    @property
    def first_fraction(self) -> float:
        return self.first_good / self.sent if self.sent else 0.0


def summarise(records: list[TokenTimes], rate: float, duration_s: float, max_tokens: int,
              ttft_slo_s: float, tpot_slo_s: float, lags_ms: list[float], picks: list[int],
              keep_tokens: bool = False) -> LLMLoadResult:
    statuses: dict[str, int] = {}
    ttft, gaps, layers = [], [], {}
    good = first_good = answered = 0
    for r in records:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
        lat = r.latencies()
        good += r.good_tokens(ttft_slo_s, tpot_slo_s)
        answered += r.status == 200 and len(r.tokens) == max_tokens
        if lat:
            ttft.append(lat[0] * 1000)
            first_good += lat[0] <= ttft_slo_s
            gaps += [x * 1000 for x in lat[1:]]
        for layer in r.layers:
            layers[str(layer)] = layers.get(str(layer), 0) + 1
    pct = lambda xs: {f"p{q}": round(percentile(xs, q), 1) for q in (50, 90, 99)}
    return LLMLoadResult(rate, duration_s, max_tokens, len(records), answered, len(records) * max_tokens,
                         good, first_good, statuses, pct(ttft), pct(gaps), round(percentile(lags_ms, 99), 2),
                         dict(sorted(layers.items(), key=lambda kv: int(kv[0]))),
                         [r.tokens for r in records] if keep_tokens else None,
                         picks if keep_tokens else None)


async def stream_one(session: aiohttp.ClientSession, url: str, body: bytes) -> TokenTimes:
    """One streaming completion; each token's chunk time-stamped as it arrives."""
    rec = TokenTimes(time.perf_counter())
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
            rec.status = resp.status
            if resp.status != 200:
                await resp.read()
                return rec
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    continue
                choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                if choice.get("token") is not None:
                    rec.arrivals.append(time.perf_counter())
                    rec.tokens.append(choice["token"])
                    rec.layers.append(choice["exit_layer"])
    except (aiohttp.ClientError, asyncio.TimeoutError):
        rec.status = rec.status or 0
    return rec


async def run_load(url: str, model: str, prompts: list[str], picks: list[int], rate: float, duration_s: float,
                   max_tokens: int, ttft_slo_s: float, tpot_slo_s: float, seed: int = 0,
                   keep_tokens: bool = False, timeout_s: float = 120.0) -> LLMLoadResult:
    times = schedule(rate, duration_s, seed)
    chosen = [picks[(seed * 7919 + i) % len(picks)] for i in range(len(times))]
    bodies = [json.dumps({"model": model, "prompt": prompts[k], "max_tokens": max_tokens, "temperature": 0,
                          "stream": True}).encode() for k in chosen]
    records: list[TokenTimes] = [TokenTimes(0.0)] * len(times)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async def one(i: int, due: float) -> None:
            records[i] = await stream_one(session, f"{url}/v1/completions", bodies[i])
        lags = await open_loop(times, one)
    return summarise(records, rate, duration_s, max_tokens, ttft_slo_s, tpot_slo_s, lags, chosen, keep_tokens)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.llm_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help='JSON file {"prompts": [...], "picks": [...]}')
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--ttft-slo-ms", type=float, required=True)
    p.add_argument("--tpot-slo-ms", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-tokens", action="store_true")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.max_tokens < 1:
        print("bench.llm_load: error: --rate, --duration and --max-tokens must be positive", file=sys.stderr)
        return 2
    try:
        with open(args.prompts) as fh:
            data = json.load(fh)
        prompts, picks = data["prompts"], data["picks"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"bench.llm_load: error: cannot read prompts from {args.prompts}: {exc}", file=sys.stderr)
        return 2
    import uvloop
    result = uvloop.run(run_load(args.url, args.model, prompts, picks, args.rate, args.duration, args.max_tokens,
                                 args.ttft_slo_ms / 1000, args.tpot_slo_ms / 1000, args.seed, args.keep_tokens))
    print(json.dumps({**asdict(result), "token_fraction": result.token_fraction,
                      "first_fraction": result.first_fraction}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
