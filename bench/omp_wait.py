"""How OpenMP's wait policy changes a worker's batch time when the node shares its cores.

    python3 -m bench.omp_wait [--threads 2] [--repeats 5]

A worker runs the default model's full forward pass with `threads` intra-op
threads, in a fresh process per (policy, load) pair so the policy takes effect
(libgomp reads OMP_WAIT_POLICY once, at load). `load` is a competing process
that keeps one core busy in bursts, as the node's event loop does while it
parses, tokenizes and answers. Rows are interleaved per repeat, and the ratio
ACTIVE/PASSIVE is reported with its range over the repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

BATCHES = (1, 4, 16)

CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from e3.models.registry import load_model
m = load_model("default").model
texts = [json.loads(l)["text"] for l in open(sys.argv[2])][:64]
out = {}
with torch.inference_mode():
    for b in json.loads(sys.argv[3]):
        st = m.encode(texts[:b])
        ts = []
        for _ in range(9):
            t = time.perf_counter(); m.head(m.run(0, m.meta.num_blocks - 1, st)); ts.append(time.perf_counter() - t)
        out[b] = sorted(ts)[4]
print(json.dumps(out))
"""

BUSY = r"""
import time
while True:   # 5 ms of work, 5 ms asleep: a node's event loop under moderate load
    t = time.perf_counter()
    while time.perf_counter() - t < 0.005:
        pass
    time.sleep(0.005)
"""


def one(policy: str, threads: int, load: bool, texts: str) -> dict[int, float]:
    env = {**os.environ, "OMP_WAIT_POLICY": policy}
    busy = subprocess.Popen([sys.executable, "-c", BUSY]) if load else None
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, str(threads), texts, json.dumps(BATCHES)],
                             env=env, capture_output=True, text=True, check=True).stdout
    finally:
        if busy:
            busy.kill()
            busy.wait()
    return {int(k): v for k, v in json.loads(out.splitlines()[-1]).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.omp_wait", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    texts = os.path.join(os.path.dirname(__file__), "..", "models", "data", "fortunes.jsonl")
    runs: dict[tuple, list[dict]] = {}
    for r in range(a.repeats):
        for load in (False, True):
            for policy in ("ACTIVE", "PASSIVE"):
                runs.setdefault((load, policy), []).append(one(policy, a.threads, load, texts))
        print(f"repeat {r + 1} of {a.repeats} done", file=sys.stderr)
    print(f"| load | batch | ACTIVE ms (median, range) | PASSIVE ms (median, range) | ACTIVE/PASSIVE (median, range) |")
    print("|---|---:|---:|---:|---:|")
    for load in (False, True):
        for b in BATCHES:
            act = [x[b] * 1e3 for x in runs[(load, "ACTIVE")]]
            pas = [x[b] * 1e3 for x in runs[(load, "PASSIVE")]]
            ratios = [x / y for x, y in zip(act, pas)]
            print(f"| {'one core busy' if load else 'none'} | {b} | {statistics.median(act):.1f} "
                  f"({min(act):.1f}-{max(act):.1f}) | {statistics.median(pas):.1f} ({min(pas):.1f}-{max(pas):.1f}) "
                  f"| {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
