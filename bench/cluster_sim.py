"""SIMULATION of the E3 paper's equal-cost heterogeneity experiment, with the planner's cross-host model.

    python3 -m bench.cluster_sim --out bench/results/cluster_sim

Nothing here runs a model or touches a device or a network: every number is
the planner's cost model (planner/cost_model.py, what planner/dp.py
optimises) or the discrete-event simulator (planner/simulator.py) fed with
synthetic profiles. Every output says SIMULATION.

The paper compared E3 on 16 V100s with E3 on a mixed cluster of about the
same hourly cost and reported up to 34% more goodput from heterogeneity.
Here, with bench/planner_solve.py's synthetic BERT-like profiles (`profile`,
`problem`, its GCP prices in CLUSTERS; --blocks blocks, a ramp after every
block but the last, survival falling linearly from 1 to 0.1, 100 ms SLO,
10 ms slack, u = 0.8, batch sizes 1..32, deadline batching):

- Cluster A: 16 V100-like devices, 4 per host on 4 hosts (A0..A3).
- Cluster B1: 6 V100 + 8 P100 + 15 K80, one type per host (B0: the V100s,
  B1: the P100s, B2: the K80s).
- Cluster B2: the same devices, 4 per host as in A (8 hosts: V100 4 + 2,
  P100 4 + 4, K80 4 + 4 + 4 + 3).

The first host of each cluster is the admitting node's ("local"); the
others sit behind a link (planner.problem.Link), which every batch a remote
device runs pays twice (its input rows out, its survivors' rows and answers
back). Each device type of a problem is the devices of one type on one host,
so a pool never spans hosts. Links, each stated in the output:

- loopback: the E3 link measured on this VM (bench/results/link_hop_cpu.json),
  fitted here with planner.transfer_fit to its one-way medians (the README
  quotes 142 us + 1071 us/MB);
- datacenter: an ASSUMPTION, not a measurement: 50 us per message and
  25 Gb/s (0.32 ns per byte).

Also the same devices with no links: "host pools, no links" (the same
per-host device types, every host local: what the per-host pools cost
alone) and "one host" (every device of a type in one pool on the admitting
host: bench/planner_solve.py's CLUSTERS problems). An input entering block 0
is --input-bytes (default 128 int64 token ids); a boundary state is [128,
768] float32 per row (planner_solve's).

Per case: the DP's plan (solve), the planner's baselines (dp.candidates:
"stock", the whole model on the devices of ONE device type, here one host's;
"ee-batch", a split after every ramp on one type's pool), a derived "stock
on every host" (each host type's best stock plan, summed: every host serving
its share of the traffic behind a load balancer; not a planner candidate),
and the simulator's goodput (find_goodput: the highest Poisson rate with 99%
of answers within the SLO, median over --seeds seeds) for the DP's and the
stock plan. The simulator does NOT model cross-host links (its docstring:
"Not modelled: ... cross-host links"): for a problem with remote hosts its
figures are those of the same plan with every link free, and the output
says so on every such row. The link loads are this bench's own arithmetic,
a check on the planner's (which caps a plan's goodput at the links' capacity,
all of their bytes through the admitting node's end: cost_model.link_capacity):
busy seconds per second of each host's link, each way, and of the admitting
node's end of all of them, at the plan's predicted goodput.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

from bench.planner_solve import CLUSTERS, machine, problem
from e3.planner.cost_model import goodput_within_slo
from e3.planner.baselines import best_stock_plan, candidates
from e3.planner.solve import solve
from e3.planner.plan import Plan
from e3.planner.problem import LOCAL, Link, Problem
from e3.planner.simulator import LABEL, find_goodput
from e3.planner.transfer_fit import fit_transfer

ROOT = Path(__file__).resolve().parent
LINK_HOP = ROOT / "results" / "link_hop_cpu.json"
README_FIT = (142e-6, 1071e-6 / 1e6)        # the README's quoted fit of the same points

PRICES = {name: price for name, _, _, price in CLUSTERS["6+8+15 x 3 types"]}
SPEEDS = {name: speed for name, _, speed, _ in CLUSTERS["6+8+15 x 3 types"]}

# name, hosts: (host, type, count); the first host is the admitting node's
LAYOUTS = {
    "A": [("A0", "v100", 4), ("A1", "v100", 4), ("A2", "v100", 4), ("A3", "v100", 4)],
    "B1": [("B0", "v100", 6), ("B1", "p100", 8), ("B2", "k80", 15)],
    "B2": [("B0", "v100", 4), ("B1", "v100", 2), ("B2", "p100", 4), ("B3", "p100", 4),
           ("B4", "k80", 4), ("B5", "k80", 4), ("B6", "k80", 4), ("B7", "k80", 3)],
}
ONE_HOST = {"A": "16 x 1 type", "B1": "6+8+15 x 3 types", "B2": "6+8+15 x 3 types"}   # planner_solve's CLUSTERS


def loopback_link() -> tuple[Link, dict]:
    """The link measured here, fitted to link_hop_cpu.json's one-way medians (the README's fit if unreadable)."""
    try:
        rows = json.loads(LINK_HOP.read_text())["rows"]
        points = [(r["bytes"], r["link_oneway_us"]["median"] / 1e6) for r in rows]
        fit = fit_transfer(points)
    except (OSError, ValueError, KeyError) as exc:
        fixed, per_byte = README_FIT
        return Link(fixed, per_byte), {"source": f"the README's quoted fit (could not fit {LINK_HOP.name}: {exc})",
                                       "fixed_us": fixed * 1e6, "us_per_mb": per_byte * 1e12}
    return Link(fit.fixed_s, fit.s_per_byte), {
        "source": f"planner.transfer_fit.fit_transfer on the {len(points)} one-way medians of "
                  f"bench/results/{LINK_HOP.name} (measured on this VM over 127.0.0.1)",
        "fixed_us": fit.fixed_s * 1e6, "us_per_mb": fit.s_per_byte * 1e12,
        "max_relative_error": fit.max_relative_error,
        "points": [{"bytes": b, "oneway_us": s * 1e6, "fit_us": fit.transfer(b) * 1e6} for b, s in points]}


def datacenter_link() -> tuple[Link, dict]:
    gbps, fixed = 25.0, 50e-6
    return Link(fixed, 8 / (gbps * 1e9)), {
        "source": "ASSUMPTION (not measured): a datacenter link of 25 Gb/s at 50 us per message",
        "fixed_us": fixed * 1e6, "us_per_mb": 8 / (gbps * 1e9) * 1e12}


def build(blocks: int, layout: str, link: Link | None, input_bytes: int, one_host: bool = False) -> Problem:
    """The cluster's problem: per-host device types behind `link` (None: every host local), or with
    `one_host` planner_solve's problem (one device type per kind, all local)."""
    if one_host:
        base = problem(blocks, CLUSTERS[ONE_HOST[layout]])
        return dataclasses.replace(base, input_bytes=input_bytes).validate()
    hosts = LAYOUTS[layout]
    base = problem(blocks, [(f"{kind}@{host}", n, SPEEDS[kind], PRICES[kind]) for host, kind, n in hosts])
    devices = [dataclasses.replace(d, host=LOCAL if (i == 0 or link is None) else host,
                                   link=None if (i == 0 or link is None) else link)
               for i, (d, (host, _, _)) in enumerate(zip(base.devices, hosts))]
    return dataclasses.replace(base, devices=devices, input_bytes=input_bytes).validate()


def hourly(prob: Problem) -> float:
    return sum(d.count * d.price_per_hour for d in prob.devices)


def describe_plan(prob: Problem, plan: Plan | None, solve_s: float | None = None) -> dict | None:
    if plan is None:
        return None
    by_name = {d.name: d for d in prob.devices}
    pools = [{"device": g.device, "host": by_name[g.device].host, "replicas": g.replicas,
              "blocks": [list(plan.splits[i]) for i in g.splits]} for g in plan.groups]
    out = {"goodput": plan.goodput, "goodput_within_slo": goodput_within_slo(prob, plan),
           "latency_ms": plan.latency_s * 1000, "batch": plan.batch, "splits": [list(s) for s in plan.splits],
           "pools": pools, "cost_per_hour": plan.cost_per_hour, "binding": plan.binding}
    if solve_s is not None:
        out["solve_s"] = solve_s
    return out


def link_load(prob: Problem, plan: Plan, rate: float) -> dict:
    """Busy seconds per second of each remote host's link at `rate`, each way (out: from the
    admitting node; back: to it), as cost_model.link_cost prices one batch's two messages, and of the
    admitting node's end of all links together. Not in the planner: it gives a link no capacity."""
    by_name = {d.name: d for d in prob.devices}
    group_of = {i: g for g in plan.groups for i in g.splits}
    hosts: dict[str, dict] = {}
    for i, (first, last) in enumerate(plan.splits):
        d = by_name[group_of[i].device]
        if d.link is None:
            continue
        s_in = prob.survival_before(first)
        rows = float(plan.batch)                           # deadline batching: full batches
        batches = rate * s_in / rows
        sent = (prob.boundary_bytes[first - 1] if first > 0 else prob.input_bytes) * rows
        back = 0.0
        if last < prob.num_blocks - 1:
            back = prob.boundary_bytes[last] * rows * prob.survival_before(last + 1) / s_in
        h = hosts.setdefault(d.host, {"out_busy": 0.0, "back_busy": 0.0, "out_mb_s": 0.0, "back_mb_s": 0.0,
                                      "largest_message_mb": 0.0})
        h["out_busy"] += batches * d.link.transfer(sent)
        h["back_busy"] += batches * d.link.transfer(back)
        h["out_mb_s"] += batches * sent / 1e6
        h["back_mb_s"] += batches * back / 1e6
        h["largest_message_mb"] = max(h["largest_message_mb"], sent / 1e6, back / 1e6)
        h["out_bytes_share"] = h["out_mb_s"] * 1e6 * d.link.s_per_byte      # bytes alone, no per-message cost
        h["back_bytes_share"] = h["back_mb_s"] * 1e6 * d.link.s_per_byte
    keys = ("out_busy", "back_busy", "out_bytes_share", "back_bytes_share", "out_mb_s", "back_mb_s")
    hub = {k: sum(h[k] for h in hosts.values()) for k in keys}
    worst = lambda a, b: max([v for h in hosts.values() for v in (h[a], h[b])], default=0.0)
    return {"rate": rate, "hosts": hosts, "admitting_node": hub,
            "worst_host_busy": worst("out_busy", "back_busy"),
            "admitting_node_busy": max(hub["out_busy"], hub["back_busy"]),
            "worst_host_bytes_share": worst("out_bytes_share", "back_bytes_share"),
            "admitting_node_bytes_share": max(hub["out_bytes_share"], hub["back_bytes_share"])}


def simulate_goodput(prob: Problem, plan: Plan | None, s) -> dict | None:
    """SIMULATION: find_goodput over --seeds seeds (median, min, max), deadline batching as the cost model."""
    if plan is None:
        return None
    runs = [find_goodput(prob, plan, duration_s=s.sim_duration, steps=s.sim_steps, seed=seed,
                         min_requests=s.sim_min_requests, work_conserving=prob.overheads.work_conserving).goodput
            for seed in range(s.seeds)]
    by_name = {d.name: d for d in prob.devices}
    remote = sorted({by_name[g.device].host for g in plan.groups if by_name[g.device].link is not None})
    return {"label": LABEL, "goodput": statistics.median(runs), "min": min(runs), "max": max(runs),
            "seeds": s.seeds, "links_modelled": not remote, "remote_hosts_used": remote,
            "note": ("links NOT modelled: the simulator has no cross-host links, so this is the plan "
                     "with every link free") if remote else "the plan uses no remote host"}


def stock_every_host(prob: Problem) -> dict:
    """Derived (not a planner candidate): every device type's best stock plan, summed."""
    per = {}
    for d in prob.devices:
        plan = best_stock_plan(dataclasses.replace(prob, devices=[d]))
        per[d.name] = None if plan is None else {"goodput": plan.goodput, "batch": plan.batch, "host": d.host}
    return {"goodput": sum(v["goodput"] for v in per.values() if v), "per_type": per}


def run_case(layout: str, link_name: str, prob: Problem, s) -> dict:
    t = time.perf_counter()
    result = solve(prob)
    solve_s = time.perf_counter() - t
    cand = candidates(prob)
    dp = describe_plan(prob, result.plan, solve_s)
    if dp is not None:
        dp["exact"] = result.considered.get("exact")
    case = {"cluster": layout, "link": link_name, "hosts": sorted({d.host for d in prob.devices}),
            "devices": [{"name": d.name, "count": d.count, "host": d.host, "price_per_hour": d.price_per_hour}
                        for d in prob.devices],
            "hourly_cost": hourly(prob), "dp": dp,
            "stock": describe_plan(prob, cand["stock"]), "ee_batch": describe_plan(prob, cand["ee-batch"]),
            "stock_every_host": stock_every_host(prob),
            "sim": {"dp": simulate_goodput(prob, result.plan, s), "stock": simulate_goodput(prob, cand["stock"], s)},
            "why_none": None if result.plan else result.binding}
    if result.plan is not None and any(d.link is not None for d in prob.devices):
        case["link_load"] = link_load(prob, result.plan, result.plan.goodput)
    return case


def _g(plan: dict | None) -> float:
    return plan["goodput"] if plan else 0.0


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else None


def ratios(cases: list[dict]) -> dict:
    by = {(c["cluster"], c["link"]): c for c in cases}
    links = list(dict.fromkeys(c["link"] for c in cases))
    out = {"b_over_a": {}, "b_over_a_per_dollar": {}, "e3_over_stock": {}, "e3_over_stock_every_host": {},
           "remote_over_one_host": {}}
    for b in ("B1", "B2"):
        for ln in links:
            a_case, b_case = by.get(("A", ln)), by.get((b, ln))
            if a_case and b_case:
                key = f"{b}/A, {ln}"
                out["b_over_a"][key] = ratio(_g(b_case["dp"]), _g(a_case["dp"]))
                out["b_over_a_per_dollar"][key] = ratio(_g(b_case["dp"]) / b_case["hourly_cost"],
                                                        _g(a_case["dp"]) / a_case["hourly_cost"])
    for c in cases:
        key = f"{c['cluster']}, {c['link']}"
        out["e3_over_stock"][key] = ratio(_g(c["dp"]), _g(c["stock"]))
        out["e3_over_stock_every_host"][key] = ratio(_g(c["dp"]), c["stock_every_host"]["goodput"])
        if c["link"] in ("loopback", "datacenter"):
            for base in ("host pools, no links", "one host"):
                ref = by.get((c["cluster"], base))
                if ref:
                    out["remote_over_one_host"][f"{key} / {base}"] = ratio(_g(c["dp"]), _g(ref["dp"]))
    return out


def _pools(plan: dict | None) -> str:
    if not plan:
        return "none"
    return "; ".join(f"{p['replicas']} x {p['device']} on {p['host']}: blocks "
                     f"{','.join(f'{a}-{b}' for a, b in p['blocks'])}" for p in plan["pools"])


def _busy(ld: dict | None) -> str:
    if not ld:
        return "- | -"
    return (f"{ld['worst_host_busy']:.2f} / {ld['admitting_node_busy']:.2f} | "
            f"{ld['worst_host_bytes_share']:.2f} / {ld['admitting_node_bytes_share']:.2f}")


def _sim(sim: dict | None) -> str:
    if not sim:
        return "n/a"
    tail = "" if sim["links_modelled"] else " (links NOT modelled)"
    return f"{sim['goodput']:.0f} [{sim['min']:.0f}-{sim['max']:.0f}]{tail}"


def case_lines(c: dict) -> list[str]:
    dp = c["dp"]
    head = (f"{LABEL} {c['cluster']:2s} {c['link']:21s} ${c['hourly_cost']:.2f}/h: ")
    if dp is None:
        return [head + f"no plan ({c['why_none']})"]
    lines = [head + f"E3 (DP) {dp['goodput']:.0f} req/s predicted, B={dp['batch']}, {len(dp['splits'])} splits, "
             f"latency {dp['latency_ms']:.1f} ms; stock {_g(c['stock']):.0f}, ee-batch {_g(c['ee_batch']):.0f}, "
             f"stock on every host (derived) {c['stock_every_host']['goodput']:.0f}",
             f"{LABEL}      pools: {_pools(dp)}",
             f"{LABEL}      simulated goodput: E3 {_sim(c['sim']['dp'])}, stock {_sim(c['sim']['stock'])}"]
    if "link_load" in c:
        ld = c["link_load"]
        lines.append(f"{LABEL}      link load at {ld['rate']:.0f} req/s (not in the planner; busy s/s, "
                     f"messages priced whole / bytes alone): worst host {ld['worst_host_busy']:.2f} / "
                     f"{ld['worst_host_bytes_share']:.2f}, admitting node's end {ld['admitting_node_busy']:.2f} / "
                     f"{ld['admitting_node_bytes_share']:.2f} (above 1: the link cannot carry the plan)")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.cluster_sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--input-bytes", type=int, default=128 * 8, help="bytes of one input entering block 0")
    p.add_argument("--seeds", type=int, default=3, help="simulator seeds per plan (median reported)")
    p.add_argument("--sim-duration", type=float, default=3.0, help="seconds of arrivals per simulated rate")
    p.add_argument("--sim-steps", type=int, default=12, help="bisection steps of find_goodput")
    p.add_argument("--sim-min-requests", type=int, default=2000)
    p.add_argument("--out", help="write <out>.json and <out>.md")
    s = p.parse_args(argv)
    start, load_before = time.perf_counter(), round(os.getloadavg()[0], 2)
    loop, loop_info = loopback_link()
    dc, dc_info = datacenter_link()
    links = {"loopback": loop_info, "datacenter": dc_info}
    print(f"{LABEL} (not measured): the E3 paper's equal-cost heterogeneity experiment under the planner's "
          f"cost model and discrete-event simulator, {s.blocks} blocks")
    print(f"{LABEL} link 'loopback': {loop_info['fixed_us']:.1f} us + {loop_info['us_per_mb']:.0f} us/MB "
          f"({loop_info['source']})")
    print(f"{LABEL} link 'datacenter': {dc_info['fixed_us']:.1f} us + {dc_info['us_per_mb']:.0f} us/MB "
          f"({dc_info['source']})")
    for name, hosts in LAYOUTS.items():
        print(f"{LABEL} cluster {name}: " + ", ".join(f"{h}{' (admitting node)' if i == 0 else ''}: {n} x {k}"
                                                    for i, (h, k, n) in enumerate(hosts)))
    cases = []
    for layout in LAYOUTS:
        variants = [("loopback", build(s.blocks, layout, loop, s.input_bytes)),
                    ("datacenter", build(s.blocks, layout, dc, s.input_bytes))]
        if layout != "B1":          # B1's host pools are its one-host problem's (one type per host)
            variants.append(("host pools, no links", build(s.blocks, layout, None, s.input_bytes)))
        variants.append(("one host", build(s.blocks, layout, None, s.input_bytes, one_host=True)))
        for link_name, prob in variants:
            case = run_case(layout, link_name, prob, s)
            cases.append(case)
            print("\n".join(case_lines(case)), flush=True)
    r = ratios(cases)
    for name, table in r.items():
        print(f"{LABEL} {name}: " + ", ".join(f"{k} {'n/a' if v is None else f'{v:.3f}'}"
                                             for k, v in table.items()))
    elapsed = time.perf_counter() - start
    print(f"{LABEL} done in {elapsed:.1f} s")
    if s.out:
        info = {**machine(), "load_average_1m_before": load_before, "elapsed_s": elapsed}
        write(Path(s.out), cases, r, links, info, s, argv)
    return 0


def command(s, argv) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return "python3 -m bench.cluster_sim " + " ".join(shlex.quote(a) for a in args)


def write(out: Path, cases: list[dict], r: dict, links: dict, info: dict, s, argv) -> None:
    cmd = command(s, argv)
    settings = {k: v for k, v in vars(s).items() if k != "out"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"label": LABEL, "what": "SIMULATION (cost model and discrete-event simulator; nothing measured but the "
                                 "loopback link's hop times it is fitted to)",
         "command": cmd, "machine": info, "settings": settings, "links": links,
         "layouts": {k: [{"host": h, "type": t, "count": n, "admitting_node": i == 0}
                         for i, (h, t, n) in enumerate(v)] for k, v in LAYOUTS.items()},
         "cases": cases, "ratios": r}, indent=1))
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
    lines = [f"# {LABEL}: E3's equal-cost heterogeneity experiment across hosts", "",
             "Not measured: the planner's cost model and discrete-event simulator (planner/simulator.py) on "
             "bench/planner_solve.py's synthetic BERT-like profiles; see bench/cluster_sim.py's docstring.", "",
             f"Command: `{cmd}`  ", f"Date: {info['date']}  ",
             f"Python {info['python']}, numpy {info['numpy']}, torch {info['torch']}  ",
             f"1-minute load average before / after: {info['load_average_1m_before']} / {info['load_average_1m']}; "
             f"run took {info['elapsed_s']:.1f} s", "",
             "```", *info["lscpu"], "```", "",
             f"Settings: {s.blocks} blocks, input {s.input_bytes} B per request, boundary [128, 768] float32 "
             f"per row; simulator: {s.seeds} seeds, {s.sim_duration:g} s of arrivals per rate, {s.sim_steps} "
             f"bisection steps, at least {s.sim_min_requests} requests, deadline batching (the cost model's).", "",
             "Links:", ""]
    for name, li in links.items():
        lines.append(f"- **{name}**: {li['fixed_us']:.1f} us + {li['us_per_mb']:.0f} us/MB per message; "
                     f"{li['source']}" + (f"; the line is off by up to {li['max_relative_error']:.0%} at the "
                                          f"measured points" if "max_relative_error" in li else ""))
    pts = links["loopback"].get("points")
    sent = [h["largest_message_mb"] for c in cases if c["link"] == "loopback" and "link_load" in c
            for h in c["link_load"]["hosts"].values()]
    if pts and sent:
        near = min(pts, key=lambda q: abs(q["bytes"] / 1e6 - max(sent)))
        lines.append(f"- The loopback plans' largest message is {max(sent):.2f} MB; the measured point nearest it "
                     f"({near['bytes'] / 1e6:.2f} MB, {near['oneway_us']:.0f} us one way) is "
                     f"{(near['fit_us'] - near['oneway_us']) / near['oneway_us']:+.0%} off the line.")
    cost_a = sum(n * PRICES[k] for _, k, n in LAYOUTS["A"])
    lines += ["", "Layouts (the first host is the admitting node's, the others remote behind the link; "
              "'one host' puts every device of a type in one pool on the admitting node; B1 has one type per "
              "host, so its host pools without links are its one-host problem):", ""]
    for name, hosts in LAYOUTS.items():
        cost = sum(n * PRICES[k] for _, k, n in hosts)
        lines.append(f"- {name} (${cost:.2f}/h, {cost / cost_a:.0%} of A's at bench/planner_solve.py's GCP "
                     f"prices): " + ", ".join(f"{h} {n} x {k}" for h, k, n in hosts))
    lines += ["", "Goodput in req/s. 'E3 (DP)', 'stock' and 'ee-batch' are the cost model's predictions at "
              "u = 0.8; 'stock' is the planner's candidate (the whole model on ONE device type: on the per-host "
              "rows, one host's devices); 'stock every host' is derived here (each host type's best stock plan, "
              "summed). 'sim' is "
              "the simulator's highest Poisson rate with 99% within the SLO, median [min-max] over seeds, at full "
              "load (no u = 0.8 headroom). **The simulator does not model cross-host links**: on the loopback and "
              "datacenter rows its figures are the same plans with every link free, not the remote case.", "",
              "| cluster | links | $/h | E3 (DP) | B | splits | latency (ms) | stock | ee-batch | stock every host "
              "| sim E3 | sim stock | link busy, whole messages: worst host / admitting node | link busy, bytes "
              "alone: worst host / admitting node |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        dp = c["dp"]
        ld = c.get("link_load")
        lines.append(
            f"| {c['cluster']} | {c['link']} | {c['hourly_cost']:.2f} | {_g(dp):.0f} | {dp['batch'] if dp else '-'} | "
            f"{len(dp['splits']) if dp else '-'} | {dp['latency_ms'] if dp else 0:.1f} | {_g(c['stock']):.0f} | "
            f"{_g(c['ee_batch']):.0f} | {c['stock_every_host']['goodput']:.0f} | {_sim(c['sim']['dp'])} | "
            f"{_sim(c['sim']['stock'])} | "
            f"{_busy(ld)} |")
    lines += ["", "DP plans' pools (device type@host, replicas, blocks):", ""]
    lines += [f"- {c['cluster']}, {c['link']}: {_pools(c['dp'])}" for c in cases]
    lines += ["", "Ratios (DP plans' predicted goodput):", ""]
    titles = {"b_over_a": "B / A (the paper: heterogeneity gained up to 34%)",
              "b_over_a_per_dollar": "B / A per dollar of the whole cluster",
              "e3_over_stock": "E3 (DP) / stock (the planner's candidate: one host's devices)",
              "e3_over_stock_every_host": "E3 (DP) / stock on every host (derived)",
              "remote_over_one_host": "with links / without (what the links cost)"}
    for name, table in r.items():
        lines.append(f"- {titles[name]}: " + ", ".join(f"{k} **{fmt(v)}**" for k, v in table.items()))
    lines += ["", "Link busy: seconds per second each remote host's link spends on the plan's messages, in the "
              "busier direction, at the plan's predicted goodput, and the sum over all remote hosts at the "
              "admitting node's end (the links are hub and spoke: a boundary between two remote hosts passes "
              "through it). 'Whole messages' prices each message as the planner does (fixed + bytes x per byte); "
              "'bytes alone' counts only the per-byte part (the fixed part may overlap between messages in "
              "flight). Above 1 the link cannot carry the plan. This is this bench's arithmetic, a check on the "
              "planner's: it caps a plan's goodput at u over the links' bytes per request, both ways, "
              "all through the admitting node's end (cost_model.link_capacity)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
