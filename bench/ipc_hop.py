"""Per-hop latency of a boundary batch between two processes: shared-memory ring vs CUDA IPC ring.

    python3 -m bench.ipc_hop                       # batches 1,4,16,64 of MiniLM-sized rows
    python3 -m bench.ipc_hop --repeats 500 --out bench/results/ipc_hop

A hop is what the runtime does between two splits on two workers, without the
node in between: the producer copies a batch's boundary state into a ring
slot, one small msgpack message names the slot, and the consumer gathers the
rows into a batch of its own on its device (the copy the engine makes) and
answers with a small ack. The figure is the producer's clock from the start
of the write to the ack, median and 90th percentile over `--repeats` hops
after a warm-up. `msg only` is the same ping-pong without data: the fixed
cost of two messages, included in every hop.

Rows are MiniLM-sized: hidden [32, 384] float32 plus mask [32] int64
(49,408 bytes). Paths:
- shm: slots.SlotRing; on a GPU the producer's state goes to host memory and
  the consumer's back to its GPU, as the runtime did before CUDA rings.
- cuda: cuda_ring.CudaSlotRing on cuda:0, allocated by the producer and
  opened by the consumer through IPC handles, ordered by the slot's event;
  measured only where CUDA is available.

Writes bench/results/ipc_hop_<device>.json and .md (command, machine,
versions, date).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import torch

from e3.models.state import BatchState, FieldSpec, StateSpec
from e3.runtime.slots import RingSpec, SlotRing, gather

SEQ, HIDDEN = 32, 384
SLOTS = 4
NO_GPU = "not measured: no GPU"
SKIPPED_GPU = "not measured: --cpu"
NO_RING = "not measured: --no-cuda-ring"


def state_spec(seq: int, hidden: int) -> StateSpec:
    return StateSpec((FieldSpec("hidden", (seq, hidden), torch.float32), FieldSpec("mask", (seq,), torch.int64)))


def _send(conn, obj) -> None:
    conn.send_bytes(msgpack.packb(obj, use_bin_type=True))


def _recv(conn):
    return msgpack.unpackb(conn.recv_bytes(), raw=False)


# -- the consumer process ------------------------------------------------------

def consumer(conn, device: str, threads: int) -> None:
    """Open rings when told, then gather each announced slot onto `device` and ack."""
    torch.set_num_threads(threads)
    rings = {}
    while (msg := _recv(conn))["op"] != "stop":
        if msg["op"] == "open":
            rings[msg["path"]] = _open(RingSpec.from_wire(msg["spec"]), device)
        elif msg["op"] == "hop":
            batch = gather([(rings[msg["path"]], msg["slot"], 0, msg["rows"])], device)
            if batch.device.type == "cuda":
                torch.cuda.synchronize(batch.device)     # the rows are really there before the ack
        _send(conn, "ok")
    for ring in rings.values():
        ring.close()
    _send(conn, "closed")


def _open(spec: RingSpec, device: str):
    if spec.cuda is None:
        return SlotRing.attach(spec)
    from e3.runtime.cuda_ring import CudaSlotRing
    return CudaSlotRing.open(spec, device)


# -- the producer (this process) -------------------------------------------------

class Hop:
    """The producer's side of one path: a ring, and the consumer that reads it."""

    def __init__(self, conn, path: str, ring):
        self.conn, self.path, self.ring = conn, path, ring
        _send(conn, {"op": "open", "path": path, "spec": ring.spec.to_wire()})
        assert _recv(conn) == "ok"

    def once(self, state: BatchState | None, slot: int) -> float:
        t0 = time.perf_counter()
        if state is None:                   # the message-only baseline
            _send(self.conn, {"op": "ping"})
        else:
            self.ring.write(slot, 0, state)
            _send(self.conn, {"op": "hop", "path": self.path, "slot": slot, "rows": state.rows})
        assert _recv(self.conn) == "ok"
        return time.perf_counter() - t0


def measure(hop: Hop, state: BatchState | None, repeats: int, warmup: int) -> dict:
    times = [hop.once(state, i % SLOTS) for i in range(warmup + repeats)][warmup:]
    us = np.array(times) * 1e6
    return {"median_us": float(np.median(us)), "p90_us": float(np.percentile(us, 90)),
            "min_us": float(us.min()), "repeats": repeats}


def batch_state(spec: StateSpec, rows: int, device: str) -> BatchState:
    g = torch.Generator().manual_seed(rows)
    return BatchState({"hidden": torch.randn(rows, *spec.fields[0].shape, generator=g).to(device),
                       "mask": torch.ones(rows, *spec.fields[1].shape, dtype=torch.int64).to(device)})


def run(args) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:                                # main() may run inside another program (the tests)
        torch.set_num_threads(threads)


def _run(args) -> dict:
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda:0" if cuda else "cpu"
    spec = state_spec(args.seq, args.hidden)
    batches = [int(b) for b in args.batches.split(",")]
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=consumer, args=(child_conn, device, args.threads), daemon=True)
    proc.start()
    shm = SlotRing.create(spec, SLOTS, max(batches), tag="ipc-hop")
    rings = [shm]
    try:
        hops = {"shm": Hop(conn, "shm", shm)}
        if cuda and not args.no_cuda_ring:
            from e3.runtime.cuda_ring import CudaSlotRing
            gpu = CudaSlotRing.allocate(RingSpec("ipc-hop-cuda", "", SLOTS, max(batches), spec.fields),
                                        device, owner=0, share=True)
            rings.append(gpu)
            hops["cuda"] = Hop(conn, "cuda", gpu)
        msg_only = measure(hops["shm"], None, args.repeats, args.warmup)
        rows = []
        for b in batches:
            state = batch_state(spec, b, device)
            row = {"batch": b, "bytes": b * spec.bytes_per_sample, "msg_only": msg_only}
            for name in ("shm", "cuda"):
                row[name] = measure(hops[name], state, args.repeats, args.warmup) if name in hops else \
                    (NO_RING if cuda else SKIPPED_GPU if torch.cuda.is_available() else NO_GPU)
            rows.append(row)
            _print_row(row)
        _send(conn, {"op": "stop"})
        assert _recv(conn) == "closed"
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        for ring in rings:
            ring.close()
    return {"device": device, "rows": rows, "row_bytes": spec.bytes_per_sample,
            "fields": [[f.name, list(f.shape), str(f.dtype)] for f in spec.fields]}


def _cell(m) -> str:
    return m if isinstance(m, str) else f"{m['median_us']:.0f} (p90 {m['p90_us']:.0f})"


def _print_row(row: dict) -> None:
    print(f"batch {row['batch']:3d}  {row['bytes'] / 1e6:6.2f} MB  shm {_cell(row['shm']):>20s}  "
          f"cuda {_cell(row['cuda']):>20s}  msg only {row['msg_only']['median_us']:.0f} us", flush=True)


# -- the record ----------------------------------------------------------------

def machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines()[:10]
    except (OSError, subprocess.SubprocessError):
        lscpu = [platform.processor()]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10, cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"lscpu": lscpu, "cpus": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "executable": sys.executable,
            "torch": torch.__version__, "cuda": torch.version.cuda, "numpy": np.__version__,
            "msgpack": ".".join(map(str, msgpack.version)), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average_1m": round(os.getloadavg()[0], 2)}


def write(out: Path, result: dict, info: dict, command: str) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    js, md = Path(f"{out}_{_device_tag(result['device'])}.json"), Path(f"{out}_{_device_tag(result['device'])}.md")
    js.write_text(json.dumps({"command": command, "machine": info, **result}, indent=1))
    gpu = info["gpu"] or "none"
    lines = ["# Boundary hop between two processes: shared memory vs CUDA IPC", "",
             f"Command: `{command}`  ", f"Date: {info['date']}  ", f"Commit: {info['commit']}  ",
             f"Python {info['python']}, torch {info['torch']} (CUDA {info['cuda']}), numpy {info['numpy']}, "
             f"msgpack {info['msgpack']}  ",
             f"GPU: {gpu}; {info['cpus']} CPUs; 1-minute load average before / after: "
             f"{info['load_average_1m_before']} / {info['load_average_1m']}", "",
             "```", *info["lscpu"], "```", "",
             f"Rows: {', '.join(f'{n} {s} {t}' for n, s, t in result['fields'])} "
             f"({result['row_bytes']:,} bytes). Device of both processes: {result['device']}. Microseconds per "
             "hop from the producer's write to the consumer's ack (median, 90th percentile), as described "
             "in `bench/ipc_hop.py`; `msg only` is the two-message ping-pong without data, part of every hop.", "",
             "| batch | MB | shm (us) | cuda IPC (us) | msg only (us) |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['bytes'] / 1e6:.2f} | {_cell(r['shm'])} | {_cell(r['cuda'])} | "
              f"{r['msg_only']['median_us']:.0f} |" for r in result["rows"]]
    if info["gpu"] is None:
        lines += ["", "No GPU on this machine: only the shared-memory path ran (CPU to CPU), and the CUDA "
                      "column is empty. On a GPU the shm path also pays a device-to-host and a host-to-device "
                      "copy per hop, which the CUDA ring avoids."]
    md.write_text("\n".join(lines) + "\n")
    return js, md


def _device_tag(device: str) -> str:
    return "cpu" if device == "cpu" else torch.cuda.get_device_name(0).replace(" ", "-").lower()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench.ipc_hop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,16,64")
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seq", type=int, default=SEQ)
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (the CPU worker default)")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even where CUDA is available")
    p.add_argument("--no-cuda-ring", action="store_true",
                   help="on a GPU, measure only the shared-memory path (where CUDA IPC is refused)")
    p.add_argument("--out", default="bench/results/ipc_hop", help="writes <out>_<device>.json and .md")
    args = p.parse_args(argv)
    command = "python3 -m bench.ipc_hop " + shlex.join(argv if argv is not None else sys.argv[1:])
    load_before = round(os.getloadavg()[0], 2)
    result = run(args)
    info = {**machine(), "load_average_1m_before": load_before}
    for path in write(Path(args.out), result, info, command.strip()):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
