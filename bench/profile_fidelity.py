"""Does the profile's per-block sum predict a whole split's time? The profile against the executor.

    python3 -m bench.profile_fidelity                    # MiniLM, 1 thread, rows 1,2,4 (~1 min)
    python3 -m bench.profile_fidelity --model digits --threads 2 --rows 1,8,32

The planner prices a split as the sum of its blocks' profiled times plus its exit
(planner/profiler.py times every block, ramp and head alone, the least of its
repeats). A worker runs a split as one call (models/executor.py's SplitExecutor:
the blocks in one `model.run`, then the exit and the policy's decision). Per
number of rows and per split (the whole model, the first block, the rest), this
times the executor the same way (the least of `--repeats`, after warm-up, on real
held-out inputs) beside the profile taken in the same process, and prints their
ratio. A ratio near 1 says the live compute scale (what serving measures over
the profile, planner/calibration.py) is the machine's contention, not the way the
profile is taken. Writes bench/results/profile_fidelity_<model>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from .goodput import environment
from .workloads import load_pools

RESULTS = Path(__file__).parent / "results"


def least_s(fn, repeats: int, warmup: int = 3) -> float:
    """The least wall time of `repeats` calls of fn, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def profile_s(prof, first: int, last: int, rows: int, head_exit: bool) -> float:
    """The profile's price of blocks first..last at `rows` rows, with the exit at its end."""
    bi = prof.batch_sizes.index(rows)
    blocks = sum(prof.block_s[k][bi] for k in range(first, last + 1))
    return blocks + (prof.head_s[bi] if head_exit else prof.ramp_s[last][bi])


def measure(which: str, rows: list[int], repeats: int) -> list[dict]:
    from e3.models.executor import Split, SplitExecutor, init_state
    from e3.models.registry import load_model
    from e3.planner.profiler import profile_model

    pools = load_pools(which)
    loaded = load_model(pools.model_dir, "cpu")
    model, policy = loaded.model, loaded.policy
    inputs = pools.inputs[:max(rows)]
    prof = profile_model(model, policy, batch_sizes=rows, repeats=repeats, inputs=inputs)
    last = model.meta.num_blocks - 1
    first_ramp = model.meta.ramp_blocks[0]
    splits = [(0, last), (0, first_ramp), (first_ramp + 1, last)]
    out = []
    with torch.inference_mode():
        for n in rows:
            entering = init_state(model, policy, inputs[:n])
            for first, end in splits:
                run = SplitExecutor(model, policy, Split(first, end))
                state = entering if first == 0 else model.run(0, first - 1, entering)
                real = least_s(lambda: run(state), repeats)
                priced = profile_s(prof, first, end, n, end == last)
                out.append({"rows": n, "first": first, "last": end, "executor_ms": real * 1000,
                            "profile_ms": priced * 1000, "ratio": real / priced})
    return out


def markdown(result: dict) -> str:
    lines = [f"# The profile's per-block sum against a whole split's time ({result['model']})", "",
             f"Command: `{result['command']}`  ",
             f"Date: {result['date']}; {result['machine']}; Python {result['python']}, torch {result['torch']}, "
             f"{result['threads']} torch thread(s)", "",
             "Each figure is the least of the repeats, after warm-up, on real held-out inputs; the profile "
             "was taken in the same process just before (planner/profiler.py).", "",
             "| rows | split (blocks) | executor (ms) | profile (ms) | executor / profile |",
             "|---|---|---|---|---|"]
    for r in result["splits"]:
        lines.append(f"| {r['rows']} | {r['first']}-{r['last']} | {r['executor_ms']:.2f} | {r['profile_ms']:.2f} | "
                     f"{r['ratio']:.3f} |")
    ratios = [r["ratio"] for r in result["splits"]]
    lines += ["", f"Ratios {min(ratios):.3f}-{max(ratios):.3f}."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python3 -m bench.profile_fidelity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("minilm", "digits"), default="minilm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,2,4", help="comma-separated rows per batch")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    try:
        args.rows = sorted({int(x) for x in args.rows.split(",")})
    except ValueError:
        ap.error(f"--rows: expected comma-separated whole numbers, got {args.rows!r}")
    if args.rows[0] < 1 or args.threads < 1 or args.repeats < 1:
        ap.error(f"--rows, --threads and --repeats must be >= 1, got {args.rows}, {args.threads}, {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment()
    result = {"model": args.model, "threads": args.threads, "date": env["date"], "machine": env["machine"],
              "python": env["python"], "torch": env["torch"],
              "command": "python3 -m bench.profile_fidelity " + shlex.join(sys.argv[1:] if argv is None else argv),
              "splits": measure(args.model, args.rows, args.repeats)}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"profile_fidelity_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
