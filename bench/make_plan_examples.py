"""Write planner/examples/*.json from a profile measured on this machine.

    python3 -m bench.make_plan_examples

digits-cpu.json: the default model, profiled here on one CPU thread.
capacity-hetero.json: the same measured profile scaled to three device types
that stand in for hardware we do not have here (the scale factors are written
into the file's _comment); a capacity-planning question at 60,000 requests/s.

    python3 -m bench.make_plan_examples --cluster

minilm-cluster.json only: minilm-cpu.json's measured profile on the admitting
node's 2 workers and on 4 workers of a member host, reached over the link
whose one-way cost bench/link_hop.py measured and fitted (link_hop_cpu.json).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from e3.models.registry import load_model
from e3.planner.profiler import profile_model

OUT = Path(__file__).resolve().parents[1] / "planner" / "examples"
LINK_HOP = Path(__file__).resolve().parent / "results" / "link_hop_cpu.json"
MINILM_INPUT_BYTES = 16 * 8 * 2     # 16 token ids and 16 mask values, int64, per input
BATCHES = [1, 2, 4, 8, 16, 32, 64]


def scaled(profile: dict, name: str, factor: float) -> dict:
    p = json.loads(json.dumps(profile))
    p["device"] = name
    p["block_s"] = [[v / factor for v in row] for row in p["block_s"]]
    p["ramp_s"] = [[v / factor for v in row] for row in p["ramp_s"]]
    p["head_s"] = [v / factor for v in p["head_s"]]
    p["meta"] = {**p["meta"], "scaled_from": profile["device"], "speed_factor": factor}
    return p


def cluster_example() -> dict:
    base = json.loads((OUT / "minilm-cpu.json").read_text())
    fit = json.loads(LINK_HOP.read_text())["fit_oneway"]
    local = base["devices"][0]
    member = {"name": "member-" + local["name"], "count": 4, "price_per_hour": local.get("price_per_hour", 0.0),
              "profile": local["profile"], "host": "10.0.0.2",
              "link": {k: fit[k] for k in ("transfer_fixed_s", "transfer_s_per_byte")}}
    return {**base, "_comment": (
        "Planning across hosts: minilm-cpu.json's measured profile on the admitting node's "
        f"{local['count']} workers and on 4 like them on a member host. The member's link is the one-way "
        f"cost bench/link_hop.py measured between two processes over the authenticated link on this 2-core "
        f"VM and fitted ({fit['transfer_fixed_s'] * 1e6:.0f} us + {fit['transfer_s_per_byte'] * 1e12:.0f} us "
        "per MB; bench/results/link_hop_cpu.json). The member's devices are assumed to match the node's: "
        "derived, not measured on a second machine."),
        "model": {**base["model"], "input_bytes": MINILM_INPUT_BYTES}, "devices": [local, member]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python3 -m bench.make_plan_examples", description=__doc__.splitlines()[0])
    p.add_argument("--cluster", action="store_true", help="write minilm-cluster.json only (no profiling)")
    if p.parse_args(sys.argv[1:] if argv is None else argv).cluster:
        (OUT / "minilm-cluster.json").write_text(json.dumps(cluster_example(), indent=1))
        print(f"wrote {OUT}/minilm-cluster.json")
        return
    torch.set_num_threads(1)
    lm = load_model("default")
    meta = lm.model.meta
    prof = profile_model(lm.model, lm.policy, BATCHES, repeats=9, warmup=3, device_name="cpu-1t").to_json()
    fractions = json.loads((lm.path / "e3-model.json").read_text())["trained"]["test"]["exit_fraction"]
    survival, left = [], 0.0
    for f in fractions[:-1]:
        left += f
        survival.append(round(max(0.0, 1 - left), 4))
    model = {"num_blocks": meta.num_blocks, "ramp_blocks": list(meta.ramp_blocks),
             "boundary_bytes": [meta.boundary_bytes(b) for b in range(meta.num_blocks)]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "digits-cpu.json").write_text(json.dumps({
        "_comment": "Default digits model; profile measured by bench/make_plan_examples.py on this 2-core "
                    "machine, one torch thread per worker; survival from the model's held-out test set.",
        "model": model, "survival": survival, "slo_ms": 100, "slack_ms": 20, "utilisation": 0.8,
        "batch_sizes": BATCHES, "objective": "goodput",
        "devices": [{"name": "cpu-1t", "count": 2, "price_per_hour": 0.05, "profile": prof}]}, indent=1))
    (OUT / "capacity-hetero.json").write_text(json.dumps({
        "_comment": "Capacity planning: cheapest mix for 60000 req/s at 100 ms. The three device types stand "
                    "in for hardware not available here: the measured cpu-1t profile divided by speed factors "
                    "2 (fast), 1 (mid) and 0.4 (slow), priced 2.5, 1.2 and 0.45 per hour. Derived, not measured.",
        "model": model, "survival": survival, "slo_ms": 100, "slack_ms": 20, "utilisation": 0.8,
        "batch_sizes": BATCHES, "objective": "cost", "rate": 60000,
        "devices": [{"name": "fast", "count": 6, "price_per_hour": 2.5, "profile": scaled(prof, "fast", 2)},
                    {"name": "mid", "count": 8, "price_per_hour": 1.2, "profile": scaled(prof, "mid", 1)},
                    {"name": "slow", "count": 15, "price_per_hour": 0.45, "profile": scaled(prof, "slow", 0.4)}]},
        indent=1))
    print(f"wrote {OUT}/digits-cpu.json and capacity-hetero.json")


if __name__ == "__main__":
    main()
