"""Record MiniLM-fortunes' per-input exit table on the CPU, for the GPU goodput step to replay.

    python3 -m bench.gpu.record_exits        # writes bench/gpu/minilm_exits.json

The GPU step (bench/gpu/goodput_gpu.py) times a BERT-base-sized model with
random weights: its own ramps would exit at random. Instead, each of its
inputs is given the exit point that one held-out fortunes text takes through
the real MiniLM-fortunes EE model (bench/workloads.py), mapped by depth onto
the bigger model's ramps, and its ramps are fitted to replay that table.
Only integers are recorded here (no texts).
"""
from __future__ import annotations

import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

OUT = Path(__file__).parent / "minilm_exits.json"


def main() -> int:
    import torch
    from bench.workloads import load_pools
    pools = load_pools("minilm")
    counts = Counter(pools.exit_point)
    record = {"source": "MiniLM-fortunes (bench/workloads.py), held-out texts, all ramps on, the manifest's policy",
              "model": pools.name, "num_blocks": pools.num_blocks, "ramp_blocks": pools.ramp_blocks,
              "exit_point": pools.exit_point,
              "exit_counts": {str(k): counts[k] for k in sorted(counts)},
              "recorded": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "python": platform.python_version(), "torch": torch.__version__,
                           "command": "python3 -m bench.gpu.record_exits"}}
    OUT.write_text(json.dumps(record) + "\n")
    print(f"wrote {OUT}: {len(pools.exit_point)} inputs, exits per point {record['exit_counts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
