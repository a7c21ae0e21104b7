"""Measuring a model's latency profile on the device it will run on.

Per batch size: each block, each ramp and the head are timed separately
(warm-up runs first, then the median of `repeats`), on inputs shaped like
real ones. The cost of moving a boundary state between processes is timed
too: a copy into and out of a shared buffer per byte, plus a small message's
round trip over a socket pair (what the runtime sends per batch).

Profiles are cached on disk, keyed by model, device, threads, batch sizes and
library versions, so a node restart does not re-measure.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from .profiles import DeviceProfile

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def _median_time(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _input_state(model, policy, batch: int):
    from e3.models.executor import state_spec_entering
    from e3.models.state import BatchState
    state = BatchState.empty(state_spec_entering(model.meta, policy, 0), batch, model.device)
    if "mask" in state:
        state = state.replace(mask=torch.ones_like(state["mask"]))
    return state


def profile_model(model, policy, batch_sizes: Sequence[int] = DEFAULT_BATCHES, repeats: int = 7,
                  warmup: int = 2, device_name: str | None = None, progress: bool = False) -> DeviceProfile:
    """Measure `model` on its current device with the current torch thread count."""
    meta = model.meta
    blocks = [[0.0] * len(batch_sizes) for _ in range(meta.num_blocks)]
    ramps = [[0.0] * len(batch_sizes) for _ in range(meta.num_ramps)]
    head = [0.0] * len(batch_sizes)
    steps = batch_sizes
    if progress:
        from tqdm import tqdm
        steps = tqdm(batch_sizes, desc=f"profiling {meta.name}", unit="batch size")
    with torch.inference_mode():
        for bi, b in enumerate(steps):
            state = _input_state(model, policy, b)
            for k in range(meta.num_blocks):
                blocks[k][bi] = _median_time(lambda: model.run(k, k, state), repeats, warmup)
                state = model.run(k, k, state)
                r = meta.ramp_at(k)
                if r is not None:
                    ramps[r][bi] = _median_time(lambda: model.ramp(r, state), repeats, warmup)
            head[bi] = _median_time(lambda: model.head(state), repeats, warmup)
    fixed, per_byte = measure_transfer(max(meta.boundary_bytes(k) for k in range(meta.num_blocks)) * batch_sizes[-1])
    name = device_name or describe_device(model.device)
    return DeviceProfile(name, list(batch_sizes), blocks, ramps, head, fixed, per_byte,
                         {"model": meta.name, "device": name, "torch": torch.__version__,
                          "python": platform.python_version(), "repeats": repeats,
                          "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-").lower()
    return f"cpu-{torch.get_num_threads()}t"


def measure_transfer(nbytes: int, repeats: int = 20) -> tuple[float, float]:
    """(fixed seconds per hop, seconds per byte) of the same-host shared-memory path."""
    nbytes = max(nbytes, 1 << 16)
    src, slot = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8).share_memory_()
    copy = _median_time(lambda: (slot.copy_(src), src.copy_(slot)), repeats, 2)
    a, b = socket.socketpair()
    msg = b"x" * 256
    def round_trip():
        a.sendall(msg)
        b.recv(4096)
        b.sendall(msg)
        a.recv(4096)
    with a, b:
        hop = _median_time(round_trip, repeats, 2)
    return hop, copy / nbytes


def cache_key(model_dir: str | os.PathLike, device: str, batch_sizes: Sequence[int], extra: dict) -> str:
    manifest = Path(model_dir, "e3-model.json").read_bytes()
    blob = json.dumps({"manifest": hashlib.sha256(manifest).hexdigest(), "device": device,
                       "batches": list(batch_sizes), "torch": torch.__version__, **extra}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_cached(path: Path) -> DeviceProfile | None:
    try:
        return DeviceProfile.from_json(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def save_cached(path: Path, profile: DeviceProfile) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(profile.to_json()))
    os.replace(tmp, path)
