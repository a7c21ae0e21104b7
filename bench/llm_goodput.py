"""Generation goodput: e3 against the EE LM served as is and full-depth decoding (issue 13).

    bin/e3-bench --llm            # both mixes, 2 interleaved repeats (~15 min on 2 cores)
    bin/e3-bench --llm --quick    # the easy mix, 1 repeat, short probes (< 4 min)

The three systems are real `e3-node --model gemma3-270m` processes that differ
only in their `llm` config (`node_config`):

- `full`: exits off (`use_exits: false`): every token runs all 18 layers;
- `ee`: the EE model served as is: exits on, one batch per decode step whose
  rows drop out as their tokens exit (no `split_layers`);
- `e3`: exits on, the decode step split at the exits where tokens leave
  (`split_layers`, chosen from the offline exit counts: `choose_splits`), the
  survivors of several steps merged into one batch at each deeper split.

Load: bench/llm_load.py in its own process, open-loop Poisson streaming
/v1/completions of `max_tokens` greedy tokens (no stop: equal lengths), prompts
from the held-out fortunes texts. A probe passes when at least 99% of the tokens
asked for came within their SLO (the first within the TTFT SLO, each later one
within the per-token SLO of the one before), at least 99% of the requests had
their first token within the TTFT SLO, and the generator kept its schedule
(`passed`). Goodput, in generated tokens per second, is the highest offered
token rate that passes, found by bench/goodput.py's `search` (bracket, bisect);
systems and mixes interleave over the repeats, reported as median [min-max].

Mixes: each held-out prompt's easiness is measured once offline
(bench/llm_offline.py: the mean decoder layers its greedy tokens ran through
the EE model); the easy mix draws 80% of its requests from the prompts at or
below the median, the hard mix 80% from those above. Agreement: each served
token against the same prompt's full-depth greedy token at that position.

The bound (`bound`): each token pays only the layers it needs plus the LM head,
at the best per-token cost over batch sizes up to the KV slots, from the
offline profile, with no wait, prefill or HTTP cost. The cap: a token that ran
no layer at all still pays the head (262k x 640 of Gemma 3 270M's 268M
parameters), so no early exit can beat full depth by more than step / head.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .goodput import json_from, ratio_range, search, spread
from .nodes import Node, NodeError, free_port

SYSTEMS = ("e3", "ee", "full")       # one repeat: each system's searches, in this order
MIXES = {"easy": 0.8, "hard": 0.2}   # share of requests drawn from the easy prompts
MODEL = "gemma3-270m"
RESULTS = Path(__file__).parent / "results"


@dataclass
class Settings:
    mixes: list[str] = field(default_factory=lambda: list(MIXES))
    repeats: int = 2
    max_tokens: int = 16
    ttft_slo_ms: float = 2000.0
    tpot_slo_ms: float = 800.0
    probe_s: float = 10.0
    warm_s: float = 5.0
    bisect_steps: int = 1
    max_probes: int = 4
    kv_slots: int = 16
    threads: int = 2
    max_lag_ms: float = 50.0
    min_exit_share: float = 0.05     # an exit becomes a split boundary once this share of tokens leave there
    prompts: int = 200
    offline_batch: int = 8
    tag: str = "cpu"
    out: Path = RESULTS
    argv: list[str] = field(default_factory=list)

    @classmethod
    def quick(cls, **kw) -> "Settings":
        return cls(**{"mixes": ["easy"], "repeats": 1, "probe_s": 6.0, "warm_s": 3.0, "max_probes": 3,
                      "bisect_steps": 0, "prompts": 32, "offline_batch": 16, "tag": "cpu-quick", **kw})


# --------------------------------------------------------------------------
# The pass rule, mixes, splits, the bound, agreement (pure)
# --------------------------------------------------------------------------

def passed(r: dict, max_lag_ms: float) -> bool:
    """99% of tokens within their SLO, 99% of first tokens within the TTFT SLO, on schedule."""
    return r["token_fraction"] >= 0.99 and r["first_fraction"] >= 0.99 and r["send_lag_ms_p99"] <= max_lag_ms


def easiness(layers: list[list[int]]) -> list[float]:
    """Each prompt's mean decoder layers over its decode tokens (lower: its tokens leave earlier)."""
    return [sum(row) / len(row) for row in layers]


def split_easy_hard(layers: list[list[int]]) -> tuple[list[int], list[int]]:
    """Prompt indices at or below the median easiness (easy) and above it (hard); ties go to the
    easy side, so a model whose tokens never exit has every prompt easy and the hard side empty."""
    e = easiness(layers)
    median = statistics.median(e)
    return [i for i, x in enumerate(e) if x <= median], [i for i, x in enumerate(e) if x > median]


def mix_picks(easy: list[int], hard: list[int], share_easy: float, n: int, seed: int) -> list[int]:
    """n prompt indices, each from the easy side with probability share_easy (else the hard side)."""
    rng = random.Random(seed)
    sides = [easy, hard] if hard else [easy, easy]
    return [rng.choice(sides[0] if rng.random() < share_easy else sides[1]) for _ in range(n)]


def exit_shares(layers: list[list[int]], exits: list[int]) -> dict[int, float]:
    """Share of all decode tokens that left at each exit."""
    flat = [x for row in layers for x in row]
    return {e: sum(x == e for x in flat) / len(flat) for e in exits}


def choose_splits(layers: list[list[int]], exits: list[int], min_share: float) -> list[int]:
    """Split the decode step after the exits where at least `min_share` of tokens leave: only there
    does a batch shrink, so only there is merging survivors of several steps worth a wait. With no
    such exit, after the one most tokens leave at (the deepest on a tie: where leaving is likeliest),
    so e3 still runs split and merged and the run shows what that costs when exits do not pay."""
    shares = exit_shares(layers, exits)
    chosen = [e for e, s in shares.items() if s >= min_share]
    return chosen or [max(exits, key=lambda e: (shares[e], e))]


def bound(profile: list[dict], layers: list[list[int]], num_layers: int, max_batch: int) -> dict:
    """Tokens/s when each token pays only its layers plus the head, at the best per-token cost over
    the profiled batches up to `max_batch`; and at full depth, and the cap (no layer, head only)."""
    flat = [x for row in layers for x in row]
    mean_layers = sum(flat) / len(flat)
    usable = [p for p in profile if p["batch"] <= max_batch]
    layer = min((p["step_s"] - p["head_s"]) / num_layers / p["batch"] for p in usable)
    head = min(p["head_s"] / p["batch"] for p in usable)
    full = 1 / (num_layers * layer + head)
    mix = 1 / (mean_layers * layer + head)
    return {"tokens_per_s": round(mix, 2), "full_depth_tokens_per_s": round(full, 2),
            "cap_tokens_per_s": round(1 / head, 2), "mean_layers": round(mean_layers, 2),
            "over_full": round(mix / full, 3), "cap_over_full": round((1 / head) / full, 3),
            "layer_s_per_token": layer, "head_s_per_token": head}


def agreement(token_lists: list[list[int]], picks: list[int], reference: list[list[int]]) -> dict:
    """Served tokens equal to the full-depth greedy token of the same prompt at the same position."""
    same = total = identical = 0
    for toks, k in zip(token_lists, picks):
        ref = reference[k]
        same += sum(a == b for a, b in zip(toks, ref))
        total += len(toks)
        identical += bool(toks) and toks == ref[:len(toks)]
    return {"tokens": total, "agreeing": same, "agreement": round(same / total, 4) if total else None,
            "identical_sequences": identical, "sequences": len(token_lists)}


def node_config(system: str, s: Settings, splits: list[int], port: int) -> dict:
    """The e3-node config of one system: only the llm section differs between them."""
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")
    llm = {"kv_slots": s.kv_slots, "threads": s.threads, "use_exits": system != "full",
           "max_len": 512, "token_deadline_ms": 120_000}
    if system == "e3" and splits:
        llm["split_layers"] = list(splits)
    return {"model": {"path": MODEL}, "llm": llm, "server": {"host": "127.0.0.1", "port": port}}


# --------------------------------------------------------------------------
# Probes and searches against real nodes
# --------------------------------------------------------------------------

async def probe(node: Node, prompts_path: Path, token_rate: float, s: Settings, seed: int,
                duration_s: float | None = None) -> dict:
    r = await json_from("bench.llm_load", "--url", node.url, "--model", MODEL, "--prompts", str(prompts_path),
                        "--rate", f"{token_rate / s.max_tokens:.4f}", "--duration", str(duration_s or s.probe_s),
                        "--max-tokens", str(s.max_tokens), "--ttft-slo-ms", str(s.ttft_slo_ms),
                        "--tpot-slo-ms", str(s.tpot_slo_ms), "--seed", str(seed), "--keep-tokens")
    r["token_rate"] = round(token_rate, 2)
    r["rate"] = token_rate                   # the search's unit: offered tokens per second
    r["client_limited"] = r["send_lag_ms_p99"] > s.max_lag_ms
    r["passed"] = passed(r, s.max_lag_ms)
    errors = {k: v for k, v in r["statuses"].items() if k != "200"}
    print(f"    {token_rate:6.1f} tok/s offered: {r['token_fraction']:.1%} of tokens and "
          f"{r['first_fraction']:.1%} of first tokens in SLO, TTFT p99 {r['ttft_ms']['p99']:.0f} ms, "
          f"gap p99 {r['gap_ms']['p99']:.0f} ms, lag p99 {r['send_lag_ms_p99']:.0f} ms"
          f"{''.join(f', {n} x {k}' for k, n in sorted(errors.items()))}{'  PASS' if r['passed'] else ''}",
          flush=True)
    return r


async def search_node(node: Node, prompts_path: Path, start: float, s: Settings, reference) -> dict:
    result = await search(lambda rate, seed: probe(node, prompts_path, rate, s, seed), start, s.bisect_steps,
                          max_probes=s.max_probes)
    # Agreement of every token served in the search's probes (all greedy), with full depth.
    lists = [(t, k) for p in result["probes"] for t, k in zip(p.pop("token_lists"), p.pop("picks"))]
    result["agreement"] = agreement([t for t, _ in lists], [k for _, k in lists], reference)
    result["exit_layers"] = _sum_counts(p["exit_layers"] for p in result["probes"])
    return result


def _sum_counts(counts) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


class LLMBench:
    """Every system on every mix, `repeats` times interleaved (e3, ee, full, e3, ...)."""

    def __init__(self, s: Settings, tmp: Path):
        self.s, self.tmp = s, tmp
        self.logs = tmp / "llm-nodes.log"

    async def offline(self) -> dict:
        print(f"== offline: {self.s.prompts} held-out prompts, full depth and with exits, and the profile",
              flush=True)
        return await json_from("bench.llm_offline", "--tokens", str(self.s.max_tokens),
                               "--batch", str(self.s.offline_batch), "--prompts", str(self.s.prompts))

    def write_mixes(self, off: dict) -> dict[str, Path]:
        easy, hard = split_easy_hard(off["ee_layers"])
        paths = {}
        for mix in self.s.mixes:
            picks = mix_picks(easy, hard, MIXES[mix], 400, seed=13)
            paths[mix] = self.tmp / f"llm-{mix}.json"
            paths[mix].write_text(json.dumps({"prompts": off["prompts"], "picks": picks}))
        return paths

    def start_rate(self, off: dict) -> float:
        """Half the full-depth decode rate at the largest profiled batch within the KV slots."""
        p = max((p for p in off["profile"] if p["batch"] <= self.s.kv_slots), key=lambda p: p["batch"])
        return 0.5 * p["batch"] / p["step_s"]

    async def run(self) -> dict:
        off = await self.offline()
        splits = choose_splits(off["ee_layers"], off["exits"], self.s.min_exit_share)
        paths = self.write_mixes(off)
        # Each search starts at the last goodput found on its mix (the first at half the profile's
        # full-depth rate): the systems lie close, so the bracket closes in two probes.
        start = {mix: self.start_rate(off) for mix in self.s.mixes}
        runs = {mix: {name: [] for name in SYSTEMS} for mix in self.s.mixes}
        for rep in range(self.s.repeats):
            for system in SYSTEMS:
                async with Node(node_config(system, self.s, splits, free_port()), self.logs,
                                start_timeout_s=600) as node:
                    first = paths[self.s.mixes[0]]
                    await probe(node, first, start[self.s.mixes[0]] / 2, self.s, 0, duration_s=self.s.warm_s)  # warm
                    for mix in self.s.mixes:
                        print(f"== {mix} mix: {system} (repeat {rep + 1} of {self.s.repeats})", flush=True)
                        r = await search_node(node, paths[mix], start[mix], self.s, off["reference"])
                        runs[mix][system].append(r)
                        start[mix] = r["goodput"] or start[mix]
        return self.summarise(off, splits, paths, runs)

    def summarise(self, off: dict, splits: list[int], paths: dict, runs: dict) -> dict:
        mixes = {}
        for mix, by_system in runs.items():
            picks = json.loads(paths[mix].read_text())["picks"]
            ee_layers = [off["ee_layers"][k] for k in picks]
            systems = {name: _system_summary(rs) for name, rs in by_system.items() if rs}
            g = {name: v["goodput"]["median"] for name, v in systems.items()}
            ratio = lambda a, b: round(g[a] / g[b], 3) if g.get(b) else None
            b = bound(off["profile"], ee_layers, off["num_layers"], self.s.kv_slots)
            mixes[mix] = {"systems": systems, "bound": b, "offline_exit_shares": exit_shares(ee_layers, off["exits"]),
                          "ratios": {"e3/ee": ratio("e3", "ee"), "e3/full": ratio("e3", "full"),
                                     "ee/full": ratio("ee", "full"),
                                     "e3/bound": round(g["e3"] / b["tokens_per_s"], 3) if "e3" in g else None},
                          "ratio_ranges": {f"e3/{o}": ratio_range(systems["e3"]["goodput"], systems[o]["goodput"])
                                           for o in ("ee", "full") if "e3" in systems and o in systems}}
        est = off["estimators"]
        return {"command": "bin/e3-bench " + " ".join(shlex.quote(a) for a in self.s.argv),
                "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                "machine": machine(), "settings": _settings_json(self.s), "splits": splits,
                "exits": off["exits"], "num_layers": off["num_layers"], "kv_mode": off["kv_mode"],
                "estimators": {"thresholds": [h["threshold"] for h in est["calibration"]],
                               "calibration": est["calibration"],
                               "target_agreement": est.get("target_agreement"), "version": est.get("version")},
                "offline": {"prompts": len(off["prompts"]), "seconds": off["seconds"], "profile": off["profile"],
                            "exit_shares_all": exit_shares(off["ee_layers"], off["exits"]),
                            "ee_agreement_offline": agreement(off["ee_tokens"], list(range(len(off["prompts"]))),
                                                              off["reference"])},
                "mixes": mixes}


def _system_summary(results: list[dict]) -> dict:
    med = sorted(results, key=lambda r: r["goodput"])[(len(results) - 1) // 2]
    at = med.get("at_goodput") or {}
    agree = [r["agreement"] for r in results]
    return {"goodput": spread(results), "client_limited": any(r["client_limited"] for r in results),
            "agreement": {"agreeing": sum(a["agreeing"] for a in agree), "tokens": sum(a["tokens"] for a in agree),
                          "agreement": round(sum(a["agreeing"] for a in agree) / max(1, sum(a["tokens"] for a in agree)), 4)},
            "exit_layers": _sum_counts(r["exit_layers"] for r in results),
            "at_goodput": {k: at.get(k) for k in ("token_rate", "token_fraction", "first_fraction", "ttft_ms",
                                                   "gap_ms", "statuses", "sent")},
            "probes": [[{k: p.get(k) for k in ("token_rate", "token_fraction", "first_fraction", "ttft_ms", "gap_ms",
                                               "statuses", "passed")} for p in r["probes"]] for r in results]}


def _settings_json(s: Settings) -> dict:
    return {k: v for k, v in vars(s).items() if k not in ("out", "argv")}


def machine() -> dict:
    import torch
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
                 platform.processor())
    return {"cpu": model, "cores": len(__import__("os").sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__}


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------

def markdown(r: dict) -> str:
    s = r["settings"]
    lines = ["# Generation goodput: Gemma 3 270M, e3 vs the EE model as is vs full depth", "",
             f"Command: `{r['command']}`  ", f"Date: {r['date_utc']}  ",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, Python {r['machine']['python']}, "
             f"torch {r['machine']['torch']}  ",
             f"Load: open-loop Poisson streaming /v1/completions, {s['max_tokens']} greedy tokens each (no stop), "
             f"held-out fortunes prompts; SLOs: first token within {s['ttft_slo_ms']:g} ms, each later token within "
             f"{s['tpot_slo_ms']:g} ms of the one before; a probe passes with >= 99% of tokens and >= 99% of first "
             f"tokens in SLO. {s['kv_slots']} KV slots, {s['threads']} torch threads per node, {s['repeats']} "
             f"interleaved repeats, {s['probe_s']:g} s probes.  ",
             f"e3's splits: {r['splits']} (exits after layers {r['exits']}; an exit is a split once >= "
             f"{s['min_exit_share']:.0%} of offline tokens leave there, else the exit most leave at).", "",
             "| mix | system | goodput tok/s, median [min-max] | agreement with full depth | exit layers served |",
             "|---|---|---|---|---|"]
    for mix, m in r["mixes"].items():
        for name, v in m["systems"].items():
            g = v["goodput"]
            a = v["agreement"]
            lines.append(f"| {mix} | {name} | {g['median']:.1f} [{g['min']:.1f}-{g['max']:.1f}] | "
                         f"{a['agreement']:.3f} ({a['agreeing']}/{a['tokens']}) | {v['exit_layers']} |")
        b = m["bound"]
        lines.append(f"| {mix} | bound (computed) | {b['tokens_per_s']:.1f} (full depth {b['full_depth_tokens_per_s']:.1f}, "
                     f"cap {b['cap_tokens_per_s']:.1f}) | - | mean {b['mean_layers']} layers |")
    lines += ["", "| mix | e3/ee | e3/full | ee/full | e3/bound | bound/full | cap/full |", "|---|---|---|---|---|---|---|"]
    for mix, m in r["mixes"].items():
        q, b = m["ratios"], m["bound"]
        lines.append(f"| {mix} | {q['e3/ee']} | {q['e3/full']} | {q['ee/full']} | {q['e3/bound']} | "
                     f"{b['over_full']} | {b['cap_over_full']} |")
    f3 = lambda x: "-" if x is None else f"{x:.3f}"
    lines += ["", f"Exit estimators {r['estimators']['version']}: thresholds set on the calibration texts' own "
              "greedy continuations (target agreement with full depth "
              f"{r['estimators']['target_agreement']}, at least 20 tokens leaving):", "",
              "| exit | base agreement (exit's token = full depth's) | best agreement reachable (share) | "
              "threshold | share leaving | their agreement |", "|---|---|---|---|---|---|"]
    for layer, c in zip(r["exits"], r["estimators"]["calibration"]):
        lines.append(f"| {layer} | {c['base_agreement']:.3f} | {f3(c['best_agreement'])} ({c['best_share']:.3f}) | "
                     f"{c['threshold']:.3g} | {c['share_leaving']:.3f} | {f3(c['agreement_of_leaving'])} |")
    off = r["offline"]
    lines += ["", f"Offline ({off['prompts']} prompts, {off['seconds']} s): share of EE tokens leaving at each exit "
              f"{off['exit_shares_all']}; their agreement with full depth {off['ee_agreement_offline']}.", "",
              "Profile (one full-depth decode step; final norm + LM head alone):", "",
              "| batch | step s | head s | step/head |", "|---|---|---|---|"]
    lines += [f"| {p['batch']} | {p['step_s']} | {p['head_s']} | {p['cap_speedup']} |" for p in off["profile"]]
    lines += ["", "Probes (offered tok/s: tokens in SLO, first tokens in SLO):", ""]
    for mix, m in r["mixes"].items():
        for name, v in m["systems"].items():
            for i, rep in enumerate(v["probes"]):
                seq = ", ".join(f"{p['token_rate']}: {p['token_fraction']:.2f}/{p['first_fraction']:.2f}"
                                f"{' PASS' if p['passed'] else ''}" for p in rep)
                lines.append(f"- {mix} {name} repeat {i + 1}: {seq}")
    return "\n".join(lines) + "\n"


def write(r: dict, s: Settings) -> Path:
    s.out.mkdir(parents=True, exist_ok=True)
    path = s.out / f"llm_goodput_{s.tag}.json"
    path.write_text(json.dumps(r, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(r))
    return path


def parse_args(argv: list[str]) -> Settings:
    p = argparse.ArgumentParser(prog="e3-bench --llm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm", action="store_true", help="this benchmark (bin/e3-bench --llm)")
    p.add_argument("--quick", action="store_true", help="the easy mix, 1 repeat, short probes (< 4 min)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--ttft-slo-ms", type=float)
    p.add_argument("--tpot-slo-ms", type=float)
    p.add_argument("--probe-s", type=float)
    p.add_argument("--out", type=Path)
    p.add_argument("--tag")
    args = p.parse_args(argv)
    kw = {k: v for k, v in vars(args).items() if k not in ("llm", "quick") and v is not None}
    for name in ("repeats", "max_tokens", "ttft_slo_ms", "tpot_slo_ms", "probe_s"):
        if name in kw and kw[name] <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {kw[name]}")
    s = Settings.quick(**kw) if args.quick else Settings(**kw)
    s.argv = list(argv)
    return s


def main(argv: list[str] | None = None) -> int:
    s = parse_args(sys.argv[1:] if argv is None else argv)
    import uvloop
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="e3-llm-bench-") as tmp:
            r = uvloop.run(LLMBench(s, Path(tmp)).run())
    except (NodeError, RuntimeError) as exc:
        print(f"e3-bench --llm: error: {exc}", file=sys.stderr)
        return 1
    r["wall_s"] = round(time.monotonic() - t0, 1)
    path = write(r, s)
    print(path.with_suffix(".md").read_text())
    print(f"e3-bench --llm: wrote {path} and {path.with_suffix('.md')} ({r['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
