"""Worker set-ups under serving: one fixed stock plan, three CPU worker set-ups, two models.

    python3 -m bench.worker_threads

For each model (digits at batch 8, MiniLM at batch 4; no ramps, no replanning) and each set-up
(1 worker of 2 threads with OpenMP spinning at barriers, the same sleeping at them, 2 workers of 1
thread), a real `e3-node` serves open-loop Poisson load from `bench.loadgen` in its own process on
the same machine, 8 s per rate. Printed per rate: the share of requests within the 100 ms SLO, the
p99, and the workers' own compute per batch (from /metrics) with the rows per batch. One pass, no
repeats: read the large differences, not the small ones.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .goodput import write_inputs
from .workloads import load_pools

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"digits": (8, [150, 300, 450]), "minilm": (4, [20, 40])}
SETUPS = {"1x2-active": (1, 2, "active"), "1x2-passive": (1, 2, "passive"), "2x1": (2, 1, "auto")}
COUNTERS = ("e3_compute_seconds_sum", "e3_compute_seconds_count", "e3_batch_rows_sum")


def counters(port: int) -> dict[str, float]:
    """The node's compute and rows counters, summed over splits."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    out = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in out:
            out[name] += float(line.split()[-1])
    return out


def start_node(config: dict, path: Path) -> tuple[subprocess.Popen, str]:
    path.write_text(json.dumps(config))
    node = subprocess.Popen([sys.executable, str(ROOT / "bin" / "e3-node"), "--config", str(path), "--no-demo-query"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    name = None
    for line in node.stdout:
        if "serving model" in line:
            name = line.split("'")[1]
        if "Ctrl-C" in line:
            break
    time.sleep(2)
    return node, name


def probe(port: int, model: str, inputs: Path, rate: int) -> str:
    before = counters(port)
    out = subprocess.run([sys.executable, "-m", "bench.loadgen", "--url", f"http://127.0.0.1:{port}", "--model", model,
                          "--inputs", str(inputs), "--rate", str(rate), "--duration", "8"],
                         capture_output=True, text=True, cwd=str(ROOT), check=True).stdout
    load, after = json.loads(out), counters(port)
    n = max(after["e3_compute_seconds_count"] - before["e3_compute_seconds_count"], 1)
    compute = (after["e3_compute_seconds_sum"] - before["e3_compute_seconds_sum"]) / n
    rows = (after["e3_batch_rows_sum"] - before["e3_batch_rows_sum"]) / n
    return (f"good {load['good_fraction']:.3f} p99 {load['latency_ms']['p99']:.0f} ms, "
            f"compute/batch {compute * 1e3:.1f} ms at {rows:.2f} rows")


def main() -> int:
    tmp, port = Path(tempfile.mkdtemp(prefix="e3-worker-threads-")), 8930
    for which, (batch, rates) in MODELS.items():
        pools = load_pools(which)
        inputs = write_inputs(pools, pools.mix(0.8, 2000, seed=11), tmp / f"{which}.json")
        for setup, (workers, threads, wait) in SETUPS.items():
            port += 1
            config = {"model": {"path": str(pools.model_dir)},
                      "batching": {"batch": batch, "cuts": [], "sample_fraction": 0.0, "timeout_ms": 1000,
                                   "max_queue": 4096},
                      "workers": {"mode": "process", "devices": ["cpu"] * workers, "threads_per_worker": threads,
                                  "omp_wait_policy": wait},
                      "server": {"port": port, "grpc_port": 0, "max_inputs": 256}, "replan": {"enabled": False}}
            node, model = start_node(config, tmp / "node.json")
            try:
                for rate in rates:
                    print(f"{which:7s} {setup:12s} rate {rate:4d}: {probe(port, model, inputs, rate)}", flush=True)
            finally:
                node.terminate()
                node.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
