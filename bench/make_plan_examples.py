"""Write planner/examples/*.json from a profile measured on this machine.

    python3 -m bench.make_plan_examples

digits-cpu.json: the default model, profiled here on one CPU thread.
capacity-hetero.json: the same measured profile scaled to three device types
that stand in for hardware we do not have here (the scale factors are written
into the file's _comment); a capacity-planning question at 60,000 requests/s.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from e3.models.registry import load_model
from e3.planner.profiler import profile_model

OUT = Path(__file__).resolve().parents[1] / "planner" / "examples"
BATCHES = [1, 2, 4, 8, 16, 32, 64]


def scaled(profile: dict, name: str, factor: float) -> dict:
    p = json.loads(json.dumps(profile))
    p["device"] = name
    p["block_s"] = [[v / factor for v in row] for row in p["block_s"]]
    p["ramp_s"] = [[v / factor for v in row] for row in p["ramp_s"]]
    p["head_s"] = [v / factor for v in p["head_s"]]
    p["meta"] = {**p["meta"], "scaled_from": profile["device"], "speed_factor": factor}
    return p


def main() -> None:
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
