"""Does CUDA IPC work here? One CUDA ring shared between two processes, each stage's exact error kept.

    python3 -m bench.gpu.ipc_probe --out summary-part.json

The runtime shares a split boundary's ring between two GPU worker processes
through CUDA IPC (runtime/cuda_ring.py). Some sandboxes (gVisor) may refuse
it. This probe runs the runtime's own calls in order and records which one
failed and how: allocate and export the ring (cudaIpcGetMemHandle, event
handles) here; open it in a spawned child (cudaIpcOpenMemHandle,
cudaIpcOpenEventHandle); write rows here, read and check them there. On a
machine without CUDA it records that and exits 0 (the dry run's case).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import traceback
from pathlib import Path

import torch

from e3.models.state import BatchState, FieldSpec, StateSpec
from e3.runtime.slots import RingSpec

SPEC = StateSpec((FieldSpec("hidden", (8, 16), torch.float32),))


def _error(stage: str, exc: BaseException) -> dict:
    return {"ok": False, "stage": stage, "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc()[-3000:]}


def child(conn, wire: dict) -> None:
    """Open the ring by handle, wait for the parent's write, check the rows."""
    from e3.runtime.cuda_ring import CudaSlotRing
    try:
        ring = CudaSlotRing.open(RingSpec.from_wire(wire), "cuda:0")
    except BaseException as exc:                  # the exact refusal is the point of the probe
        conn.send(_error("open in a second process (cudaIpcOpenMemHandle / event handles)", exc))
        return
    conn.send({"ok": True, "stage": "opened"})
    conn.recv()
    try:
        got = ring.read(0, 0, 4)["hidden"].sum().item()
        ring.close()
        conn.send({"ok": got == 4 * 8 * 16 * 3.0, "stage": "read", "sum": got})
    except BaseException as exc:
        conn.send(_error("read in the second process", exc))


def probe() -> dict:
    if not torch.cuda.is_available():
        return {"ok": None, "stage": "no CUDA device: not probed"}
    from e3.runtime.cuda_ring import CudaSlotRing
    try:
        ring = CudaSlotRing.allocate(RingSpec("ipc-probe", "", 2, 4, SPEC.fields), "cuda:0", owner=0, share=True)
    except BaseException as exc:
        return _error("allocate and export (cudaIpcGetMemHandle / interprocess events)", exc)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=child, args=(child_conn, ring.spec.to_wire()), daemon=True)
    proc.start()
    try:
        if not conn.poll(120):
            return {"ok": False, "stage": "open in a second process", "error": "no answer within 120 s"}
        opened = conn.recv()
        if not opened["ok"]:
            return opened
        ring.write(0, 0, BatchState({"hidden": torch.full((4, 8, 16), 3.0, device="cuda:0")}))
        torch.cuda.synchronize()
        conn.send("written")
        if not conn.poll(60):
            return {"ok": False, "stage": "read", "error": "no answer within 60 s"}
        return conn.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
        ring.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.gpu.ipc_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file for the outcome")
    a = p.parse_args(argv)
    result = probe()
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"ipc_probe: {'works' if result['ok'] else result['stage']}"
          f"{': ' + result['error'] if result.get('error') else ''}", flush=True)
    return 0 if result["ok"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
