"""Turn a goodput run into files: JSON, a markdown report, plots, and the README's table.

    python3 -m bench.report --readme README.md     # re-draw the README table from summary.json

Everything shown comes from `bench/results/summary.json` (written by the run
itself), never typed by hand: the README section between the goodput
markers is replaced by a table generated from the same file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BEGIN, END = "<!-- goodput:begin -->", "<!-- goodput:end -->"
SHOWN = ("stock", "ee-batch", "ee-1", "e3", "oracle")
# (mix or None for every mix, what, target). "low": e3's min over the baseline's max across repeats.
TARGETS = (("80:20", "e3/ee-batch low", 1.5), ("80:20", "e3/stock low", 1.3), (None, "never lose", 0.95),
           (None, "prediction", 0.2), (None, "e3/oracle", 0.85))


def write(result: dict, out: Path, tag: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"goodput_{tag}.json").write_text(json.dumps(result, indent=1))
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary[tag] = {k: v for k, v in result.items() if k != "switch"} | {
        "runs": [_brief(r) for r in result["runs"]],
        "switch": [{k: v for k, v in s.items() if k != "plan_samples"} for s in result["switch"]]}
    summary_path.write_text(json.dumps(summary, indent=1))
    plots = draw(result, out, tag)
    (out / f"goodput_{tag}.md").write_text(markdown(result, tag, plots))


def _brief(run: dict) -> dict:
    keep = ("model", "bench_model", "device", "workers", "mix", "slo_ms", "goodput", "goodput_range",
            "predicted_goodput", "observed_baselines", "accuracy", "agreement", "ratios", "ratio_ranges",
            "e3_simulated", "planner", "transfer")
    side = run.get("sidecar") or {}
    return {k: run.get(k) for k in keep} | {"batch": {k: v.get("batch") for k, v in run["systems"].items()},
                                         "client_limited": [k for k, v in run["systems"].items()
                                                            if v.get("client_limited")],
                                         "sidecar": {k: v["goodput"] for k, v in side.items()},
                                         "sidecar_fails_at": {k: v.get("fails_at") for k, v in side.items()},
                                         "sidecar_client_limited": [k for k, v in side.items()
                                                                    if v.get("client_limited")]}


def targets(runs: list[dict]) -> list[str]:
    """Each target of the issue, per run it applies to: met or missed, with the measured figures."""
    lines = []
    for mix, what, goal in TARGETS:
        for r in runs:
            if mix is None or r["mix"] == mix:
                line = _target(r, what, goal)
                if line:
                    lines.append(f"{r['model']} {r['mix']} ({r.get('workers', '?')}): {line}")
    for r in runs:
        acc = r["accuracy"]
        if acc.get("e3") is not None and acc.get("ee-batch") is not None:
            gap = abs(acc["e3"] - acc["ee-batch"]) * 100
            lines.append(f"{r['model']} {r['mix']}: accuracy e3 {acc['e3']:.1%} vs ee-batch {acc['ee-batch']:.1%} "
                         f"(target within 1 point): {'met' if gap <= 1 else 'MISSED'}")
    return lines


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def _target(r: dict, what: str, goal: float) -> str | None:
    g = r["goodput"]
    if what.endswith(" low"):
        ratio = what[:-4]
        rng = (r.get("ratio_ranges") or {}).get(ratio)
        if rng is None:
            got = r["ratios"].get(ratio)
            return f"{ratio} = {got} (one repeat; target >= {goal} at the low end): {_verdict(None)}"
        return (f"{ratio} = {rng['median']} [{rng['low']}, {rng['high']}] (target >= {goal} at the low end): "
                f"{_verdict(None if rng['low'] is None else rng['low'] >= goal)}")
    if what == "never lose":
        base = max((g.get(k) or 0) for k in ("stock", "ee-batch"))
        if not base or g.get("e3") is None:
            return None
        return (f"e3 {g['e3']:.0f} vs the better of stock and ee-batch {base:.0f} = {g['e3'] / base:.3f} "
                f"(target >= {goal}): {_verdict(g['e3'] / base >= goal)}")
    if what == "prediction":
        pred = (r.get("predicted_goodput") or {}).get("e3")
        if pred is None or not g.get("e3"):
            return None
        err = abs(pred - g["e3"]) / g["e3"]
        return (f"e3 predicted {pred:.0f} vs measured {g['e3']:.0f} req/s: off by {err:.0%} "
                f"(target within {goal:.0%}): {_verdict(err <= goal)}")
    got = r["ratios"].get(what)
    return f"{what} = {got} (target >= {goal}): {_verdict(None if got is None else got >= goal)}"


def _cell(r: dict, system: str) -> str:
    g = r["goodput"].get(system)
    if g is None:
        return "–"
    if system == "oracle":
        return f"{g:.0f} (bound)"
    rng = (r.get("goodput_range") or {}).get(system)
    spread = f" [{rng['min']:.0f}–{rng['max']:.0f}]" if rng and len(rng.get("each", [])) > 1 else ""
    pred = (r.get("predicted_goodput") or {}).get(system)
    return f"{g:.0f}{spread}" + (f" (pred. {pred:.0f})" if pred is not None else "")


def _ratio_cell(r: dict, ratio: str) -> str:
    rng = (r.get("ratio_ranges") or {}).get(ratio)
    got = r["ratios"].get(ratio)
    return f"{got} [{rng['low']}–{rng['high']}]" if rng and rng["low"] != rng["high"] else str(got)


def table(runs: list[dict]) -> str:
    head = ("| model | workers | mix | " + " | ".join(f"{s} (req/s)" for s in SHOWN) +
            " | e3/ee-batch | e3/stock | e3/oracle | accuracy e3 / ee-batch / stock |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        acc = r["accuracy"]
        pct = lambda v: "–" if v is None else f"{v:.1%}"
        rows.append(f"| {r['model']} | {r.get('workers', '–')} | {r['mix']} | " +
                    " | ".join(_cell(r, s) for s in SHOWN) +
                    f" | {_ratio_cell(r, 'e3/ee-batch')} | {_ratio_cell(r, 'e3/stock')} | {r['ratios']['e3/oracle']} | "
                    f"{pct(acc.get('e3'))} / {pct(acc.get('ee-batch'))} / {pct(acc.get('stock'))} |")
    return "\n".join(rows)


TABLE_NOTE = ("Each system's goodput is the median of its repeated searches (systems interleaved: e3, stock, "
              "ee-batch, ee-1, e3, ...), [min–max] over the repeats; a ratio is the ratio of medians, [e3's min "
              "over the baseline's max – e3's max over the baseline's min]. (pred. N): the cost model's goodput "
              "for that system's plan (e3: what its planner predicted for the plan it ran; the baselines: their "
              "plan valued with the overheads the e3 node measured and the mix's exits).")


SIDECAR_NOTE = ("Sidecar path: E3 embedded as a library, `await rt.infer([x])` on the service's own asyncio loop "
                "(no HTTP, no separate client process: the caller's work, input encoding and the runtime share one "
                "loop; latency counts from each request's scheduled arrival); one fresh process per system with the "
                "HTTP run's config, inputs, seeds, probe length and pass rule; its search starts at the system's "
                "HTTP goodput and brackets it (the next rate up failed: 'fails at').")


def sidecar_table(runs: list[dict]) -> str | None:
    """HTTP against in-process goodput per system, from runs in summary form (_brief); None if no sidecar."""
    rows = ["| model | mix | system | HTTP (req/s) | sidecar, in-process (req/s) | fails at (req/s) | sidecar/HTTP |",
            "|---|---|---|---|---|---|---|"]
    for r in runs:
        for name, got in (r.get("sidecar") or {}).items():
            http, top = r["goodput"].get(name), (r.get("sidecar_fails_at") or {}).get(name)
            limited = " (client-limited)" if name in r.get("sidecar_client_limited", []) else ""
            rows.append(f"| {r['model']} | {r['mix']} | {name} | {http:.0f} | {got:.0f}{limited} | "
                        f"{'–' if top is None else f'{top:.0f}'} | {round(got / http, 3) if http else '–'} |")
    return "\n".join(rows) if len(rows) > 2 else None


def cost_line(cost: dict | None) -> str:
    """What the sidecar searches cost this run, and what they are estimated to add to the full run."""
    if not cost:
        return "The sidecar path was not measured in this run."
    per = ", ".join(f"{k} {v} s ({cost['probes_per_search'][k]} probes)"
                    for k, v in cost["per_model_per_system_s"].items())
    line = (f"The sidecar searches took {cost['this_run_s']} s of this run. Estimated addition to the full run "
            f"(sidecar systems {', '.join(cost['full_run_systems']) or 'none'}): {cost['full_run_estimate_s']} s "
            f"({cost['full_run_estimate_s'] / 60:.1f} min); per model and system: {per}; each search: "
            f"{cost['fixed_s']} s to start and stop (the slowest seen), the warm-up, and its probes at "
            f"{cost['overhead_per_probe_s']} s overhead each.")
    last = cost.get("last_full_run_without_sidecar_s")
    if last:
        line += (f" The last full run took {last / 60:.1f} min without it: about "
                 f"{(last + cost['full_run_estimate_s']) / 60:.1f} min with it.")
    return line


def observed_lines(r: dict) -> list[str]:
    """With --observe-baselines: each baseline's own node's valuation of its plan, its overheads, and
    its watch's last interval (predicted capacity at the rows it ran against the measured one)."""
    out = []
    for name, o in (r.get("observed_baselines") or {}).items():
        w = o.get("watch") or {}
        out.append(f"- {name}'s own node (shadow mode): predicted {o.get('predicted_goodput')} req/s "
                   f"(measured {r['goodput'].get(name)}); last interval: capacity predicted "
                   f"{w.get('predicted_capacity')} vs measured {w.get('measured_capacity')} req/s at "
                   f"{w.get('rate')} req/s; overheads {o.get('overheads')}; {o.get('would')}")
    return out


def sidecar_lines(run: dict) -> list[str]:
    """Per sidecar system of one run: goodput, latency and send lag at it, rows per split, accuracy."""
    lines = []
    for name, sc in (run.get("sidecar") or {}).items():
        # the search's goodput is its highest passing rate (the summary rounds it)
        at = max((p for p in sc["probes"] if p["passed"]), key=lambda p: p["rate"], default={})
        lat = sc.get("latency_ms") or {}
        acc = "–" if sc.get("accuracy") is None else f"{sc['accuracy']:.1%}"
        lines.append(f"- SIDECAR {name}: goodput {sc['goodput']} req/s in-process (HTTP {sc['http_goodput']}) at "
                     f"batch {sc['batch']}{' (client-limited: the loop fell behind its schedule above this)' if sc['client_limited'] else ''}; "
                     f"p50/p99 {lat.get('p50', float('nan')):.0f}/{lat.get('p99', float('nan')):.0f} ms, "
                     f"send lag p99 {at.get('send_lag_ms_p99', float('nan')):.1f} ms; rows per split entry "
                     f"{sc.get('mean_batch_rows')}; accuracy {acc} (answers at that rate); {len(sc['probes'])} "
                     f"probes, Runtime start {sc['startup_s']} s, process {sc['process_s']} s")
    return lines


def markdown(result: dict, tag: str, plots: list[str]) -> str:
    runs = result["runs"]
    lines = [f"# Goodput benchmark ({tag})", "",
             f"Command: `{result['command']}`  ",
             f"Date: {result['date']}; machine: {result['machine']}; Python {result['python']}, "
             f"torch {result['torch']}, numpy {result['numpy']}, aiohttp {result['aiohttp']}; "
             f"wall time {result['wall_s'] / 60:.1f} min.  ",
             f"Settings: {json.dumps(result['settings'])}", "",
             "Goodput: the highest offered Poisson rate (HTTP, load generator in its own process) with at least "
             "99% of requests answered within the SLO. `oracle` is computed from the node's profile, a bound, "
             "not a measurement.", "", table(runs), "", TABLE_NOTE, ""]
    side = sidecar_table([_brief(r) for r in runs])
    if side:
        lines += [SIDECAR_NOTE, "", side, "", cost_line(result.get("sidecar_cost")), ""]
    lines += ["Targets:", ""]
    lines += [f"- {t}" for t in targets(runs)]
    lines += ["", "Per run (batch size per system, mean rows per batch at each split entry at the goodput rate, "
              "latency at the goodput rate, the e3 plan in force at the end, and the SIMULATION of that plan):", ""]
    for r in runs:
        lines.append(f"## {r['model']} {r['mix']}")
        lines.append("")
        for name, sysr in r["systems"].items():
            if name == "oracle":
                continue
            lat = sysr.get("latency_ms") or {}
            lines.append(f"- {name}: goodput {sysr['goodput']} req/s at batch {sysr['batch']}"
                         f"{' (client-limited: the generator fell behind above this)' if sysr['client_limited'] else ''}; "
                         f"p50/p99 {lat.get('p50', float('nan')):.0f}/{lat.get('p99', float('nan')):.0f} ms; "
                         f"rows per split entry {sysr.get('mean_batch_rows')}")
        plan = r["systems"]["e3"].get("plan") or {}
        lines.append(f"- e3 plan at the end: batch {plan.get('batch')}, splits {plan.get('splits')}, "
                     f"enabled ramps {plan.get('enabled_ramps')}, predicted goodput "
                     f"{plan.get('goodput', 0):.0f} req/s when chosen")
        pred = r.get("predicted_goodput") or {}
        if pred:
            lines.append("- the cost model's goodput per system's plan: " + ", ".join(
                f"{k} {v} (measured {r['goodput'].get(k)})" for k, v in pred.items()))
        lines += observed_lines(r)
        lines += sidecar_lines(r)
        sim = r.get("e3_simulated")
        if sim:
            lines.append(f"- SIMULATION of that plan with this mix's exits: goodput {sim['goodput']} req/s "
                         f"(measured {r['goodput']['e3']})")
        solve = r["planner"].get("solve_s")
        swaps = r["planner"].get("swaps") or []
        lines.append(f"- planner: last solve {solve * 1000:.1f} ms; hot swaps: "
                     + (", ".join(f"epoch {w['epoch']} in {w['swap_s'] * 1000:.0f} ms" for w in swaps) or "none")
                     if solve is not None else "- planner: no solve recorded")
        choice = r["planner"].get("choice")
        if choice:
            lines.append(f"- planner's choice: {choice['reason']} (overheads {r['planner'].get('overheads')}; "
                         f"last solve: {r['planner'].get('decision')}; falls back: "
                         f"{r['planner'].get('fallbacks') or 'none'})")
        hop = r.get("transfer")
        if hop:
            lines.append(f"- transfer per split boundary at batch {hop['batch']} ({hop['kind']}, measured by the "
                         f"profiler): " + (", ".join(f"{k} {v} ms" for k, v in hop["ms_per_hop"].items())
                                           or "none (one split)"))
        lines.append("")
    for sw in result["switch"]:
        lines += [f"## Switching workload, {sw['model']}", "",
                  f"{sw['rate']} req/s offered for {len(sw['phases'])} x {sw['phase_s']:.0f} s "
                  f"({' -> '.join(sw['phases'])}): {sw['good_fraction']:.2%} within the SLO overall; "
                  f"epochs seen: {sorted({p['epoch'] for p in sw['plan_samples']})}; batch sizes seen: "
                  f"{sorted({p['batch'] for p in sw['plan_samples']})}.", ""]
        lines += _decisions(sw["plan_samples"])
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def draw(result: dict, out: Path, tag: str) -> list[str]:
    """Bar chart of goodput per system per run, and the switching timeline; names of the PNGs."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench.report: matplotlib is not installed (pip install '.[plots]'); no plots drawn", file=sys.stderr)
        return []
    names = []
    runs = result["runs"]
    if runs:
        fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(runs)), 3.6))
        width = 0.16
        for i, sysname in enumerate(SHOWN):
            xs = [j + (i - 2) * width for j in range(len(runs))]
            ys = [r["goodput"].get(sysname) or 0 for r in runs]
            ax.bar(xs, ys, width, label=sysname + (" (bound)" if sysname == "oracle" else ""),
                   hatch="//" if sysname == "oracle" else None, alpha=0.6 if sysname == "oracle" else 1.0)
        ax.set_xticks(range(len(runs)), [f"{r['model']}\n{r['mix']}" for r in runs], fontsize=8)
        ax.set_ylabel("goodput (req/s, 99% within SLO)")
        ax.set_title(f"Goodput by system ({result['machine'][:60]})", fontsize=9)
        ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.18))
        fig.tight_layout()
        names.append(f"goodput_{tag}.png")
        fig.savefig(out / names[-1], dpi=110)
        plt.close(fig)
    for sw in result["switch"]:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        t = list(range(len(sw["timeline"])))
        ax.plot(t, [s for s, _ in sw["timeline"]], color="0.6", label="sent (req/s)")
        ax.plot(t, [g for _, g in sw["timeline"]], color="C0", label="within SLO (req/s)")
        for i, mix in enumerate(sw["phases"]):
            ax.axvspan(i * sw["phase_s"], (i + 1) * sw["phase_s"], color=f"C{i + 1}", alpha=0.08)
            ax.text(i * sw["phase_s"] + 1, 0, mix, fontsize=8, va="bottom")
        ax.set_xlabel("seconds")
        ax.set_ylabel("requests/s")
        ax2 = ax.twinx()
        ax2.step([p["t"] for p in sw["plan_samples"]], [p["batch"] for p in sw["plan_samples"]], where="post",
                 color="C3", label="plan batch size")
        ax2.step([p["t"] for p in sw["plan_samples"]], [p["epoch"] for p in sw["plan_samples"]], where="post",
                 color="C2", linestyle="--", label="plan epoch")
        ax2.set_ylabel("batch size / epoch")
        lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
        ax.legend(lines, labels, fontsize=7, loc="lower right")
        ax.set_title(f"Switching workload, {sw['model']}: {sw['rate']} req/s offered", fontsize=9)
        fig.tight_layout()
        names.append(f"switch_{tag}_{sw['model']}.png")
        fig.savefig(out / names[-1], dpi=110)
        plt.close(fig)
    return names


def readme_section(summary: dict) -> str:
    parts = [BEGIN, "<!-- generated by `python3 -m bench.report --readme README.md` from "
             "bench/results/summary.json; do not edit by hand -->", ""]
    for tag, res in summary.items():
        parts += [f"**{tag}** ({res['machine']}; {res['date']}; `{res['command']}`):", "", table(res["runs"]), ""]
        if any("goodput_range" in r for r in res["runs"]):
            parts += [TABLE_NOTE, ""]
        side = sidecar_table(res["runs"])
        if side:
            parts += [SIDECAR_NOTE, "", side, ""]
        parts += [f"- {t}" for t in targets(res["runs"])] + [""]
        if Path(RESULTS_DIR / f"goodput_{tag}.png").is_file():
            parts += [f"![goodput {tag}](bench/results/goodput_{tag}.png)", ""]
    return "\n".join(parts + [END])


RESULTS_DIR = Path(__file__).parent / "results"


def update_readme(readme: Path, summary: dict) -> None:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"bench.report: error: {readme} has no {BEGIN} ... {END} section")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + readme_section(summary) + tail)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", required=True, help="README to update in place")
    p.add_argument("--summary", default=str(RESULTS_DIR / "summary.json"))
    a = p.parse_args(argv)
    try:
        summary = json.loads(Path(a.summary).read_text())
    except (OSError, ValueError) as exc:
        print(f"bench.report: error: cannot read {a.summary}: {exc}", file=sys.stderr)
        return 2
    update_readme(Path(a.readme), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _decisions(samples: list[dict]) -> list[str]:
    """Each change of the planner's last decision during the switching run, with the forecast then."""
    out, last = [], None
    for p in samples:
        key = (p.get("solve"), p.get("decision"))
        if p.get("decision") is None or key == last:
            continue
        last = key
        out.append(f"- t = {p['t']:.0f} s: solve on {p['solve']}, {p['decision']}; splits {p['splits']}, "
                   f"forecast survival {p.get('forecast')}")
    return out + [""] if out else []
