"""Measuring a model's latency profile on the device it will run on.

Works on any `EarlyExitModel`. Per batch size, each block, each ramp and the
head are timed separately: warm-up runs first, then the least of `repeats`
(CUDA work is synchronised before the clock is read). The least, not the
median: whatever else runs on the machine only adds time, and on a 2-core
CPU a start-up profile's medians carried spikes of 2x at single batch sizes
(MiniLM block 0: 4.8 ms at batch 4, 12.2 at 8, 10.9 at 16), which no one
scale can correct; what serving adds on top is measured live as the
compute scale (planner/calibration.py). Inputs are states
shaped like real ones (`BatchState.empty` of the model's input spec, an
attention mask set to ones so text models attend to something), or real
encoded inputs when `inputs` is given (tiled to each batch size). The thread
count is part of the device name on a CPU ("cpu-2t"): it changes the numbers.

Transfer of a boundary state between the devices of a plan:
- "same-device": nothing moves, 0;
- "same-host": what the runtime does per batch, a copy of the rows into a
  preallocated shared-memory tensor (pinned host memory from a GPU), plus a
  small message's round trip over a local socket. Measured at two sizes:
  the slope is the per-byte cost, the message (and intercept) the fixed one;
- "cross-host": not measured yet (the runtime has no cross-host path).

Profiles are cached on disk under e3.models.registry.cache_dir()/"profiles",
keyed by the model (manifest hash, or a given id), device name, dtype, input
shape (so the sequence length of a text model), batch sizes and the versions
of python, torch and numpy, so a node restart does not re-measure and an
upgrade does.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import ProfileError
from .profiles import DeviceProfile

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32, 64)
TRANSFER_KINDS = ("same-device", "same-host", "cross-host")
Clock = Callable[[], float]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


STATISTIC = "least"        # of the repeats (part of the cache key: a profile taken otherwise is re-taken)


def _least_time(fn, repeats: int, warmup: int, device: torch.device, clock: Clock) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        _sync(device)
        times.append(clock() - t)
    return min(times)


def _input_state(model, policy, batch: int, inputs: Sequence | None):
    from e3.models.executor import init_state, state_spec_entering
    from e3.models.state import BatchState
    if inputs:
        state = init_state(model, policy, inputs) if policy is not None else model.encode(inputs)
        reps = -(-batch // state.rows)
        state = BatchState.concat([state] * reps).select(torch.arange(batch))
        return state.to(model.device)
    spec = state_spec_entering(model.meta, policy, 0) if policy is not None else model.meta.input_spec
    state = BatchState.empty(spec, batch, model.device)
    if "mask" in state:  # an all-padding text batch would attend to nothing
        state = state.replace(mask=torch.ones_like(state["mask"]))
    return state


def profile_model(model, policy=None, batch_sizes: Sequence[int] = DEFAULT_BATCHES, repeats: int = 7,
                  warmup: int = 2, device_name: str | None = None, progress: bool = False,
                  inputs: Sequence | None = None, transfer: str = "same-host",
                  clock: Clock = time.perf_counter) -> DeviceProfile:
    """Measure `model` on its current device with the current torch thread count."""
    meta, device = model.meta, model.device
    batch_sizes = sorted(set(int(b) for b in batch_sizes))
    blocks = [[0.0] * len(batch_sizes) for _ in range(meta.num_blocks)]
    ramps = [[0.0] * len(batch_sizes) for _ in range(meta.num_ramps)]
    head = [0.0] * len(batch_sizes)
    name = device_name or describe_device(device)
    from tqdm import tqdm
    bar = tqdm(total=len(batch_sizes) * meta.num_blocks, desc=f"profiling {meta.name} on {name}", unit="block",
               disable=not progress, leave=False)
    with torch.inference_mode(), bar:
        for bi, b in enumerate(batch_sizes):
            state = _input_state(model, policy, b, inputs)
            for k in range(meta.num_blocks):
                blocks[k][bi] = _least_time(lambda: model.run(k, k, state), repeats, warmup, device, clock)
                state = model.run(k, k, state)
                r = meta.ramp_at(k)
                if r is not None:
                    ramps[r][bi] = _least_time(lambda: model.ramp(r, state), repeats, warmup, device, clock)
                bar.update(1)
            head[bi] = _least_time(lambda: model.head(state), repeats, warmup, device, clock)
    most = max(meta.boundary_bytes(k) for k in range(meta.num_blocks)) * batch_sizes[-1]
    fixed, per_byte = measure_transfer(most, transfer, device, clock=clock)
    return DeviceProfile(name, batch_sizes, blocks, ramps, head, fixed, per_byte, {
        "model": meta.name, "device": name, "dtype": str(meta.dtype).replace("torch.", ""),
        "input_shape": _input_signature(meta), "threads": torch.get_num_threads(), "transfer": transfer,
        "repeats": repeats, "statistic": STATISTIC, "warmup": warmup, "inputs": "real" if inputs else "zeros",
        **_versions(), "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def describe_device(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-").lower()
    return f"cpu-{torch.get_num_threads()}t"


def measure_transfer(nbytes: int, kind: str = "same-host", device: torch.device | str = "cpu", repeats: int = 20,
                     clock: Clock = time.perf_counter) -> tuple[float, float]:
    """(fixed seconds per hop, seconds per byte) of moving a boundary state of up to `nbytes`."""
    if kind not in TRANSFER_KINDS:
        raise ProfileError(f"transfer kind must be one of {TRANSFER_KINDS}, got {kind!r}")
    if kind == "same-device":
        return 0.0, 0.0
    if kind == "cross-host":
        raise ProfileError("cross-host transfer is not measured yet: the runtime has no cross-host path")
    device = torch.device(device)
    big, small = max(int(nbytes), 1 << 20), 1 << 12
    src = torch.empty(big, dtype=torch.uint8, device=device)
    slot = torch.empty(big, dtype=torch.uint8)
    slot = slot.pin_memory() if device.type == "cuda" else slot.share_memory_()

    def copy(n):
        return lambda: slot[:n].copy_(src[:n])
    t_big = _least_time(copy(big), repeats, 2, device, clock)
    t_small = _least_time(copy(small), repeats, 2, device, clock)
    per_byte = max(t_big - t_small, 0.0) / (big - small)
    intercept = max(t_small - per_byte * small, 0.0)
    a, b = socket.socketpair()
    msg = b"x" * 256

    def round_trip():
        a.sendall(msg)
        b.recv(4096)
        b.sendall(msg)
        a.recv(4096)
    with a, b:
        hop = _least_time(round_trip, repeats, 2, torch.device("cpu"), clock)
    return hop + intercept, per_byte


# --------------------------------------------------------------------------
# The disk cache
# --------------------------------------------------------------------------

def _versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}


def _input_signature(meta) -> str:
    return ";".join(f"{f.name}:{list(f.shape)}:{str(f.dtype).replace('torch.', '')}" for f in meta.input_spec.fields)


def _model_id(model: str | os.PathLike) -> str:
    """A model directory's manifest hash (the weights' identity), or the given id as is."""
    manifest = Path(model, "e3-model.json")
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    return str(model)


def cache_key(model: str | os.PathLike, device: str, batch_sizes: Sequence[int], extra: dict | None = None) -> str:
    """Key of a cached profile: model, device, batch sizes, library versions and `extra`
    (dtype, input shape, exit policy, ...)."""
    blob = json.dumps({"model": _model_id(model), "device": device, "batches": sorted(set(batch_sizes)),
                       "statistic": STATISTIC, **_versions(), **(extra or {})}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def profile_cache_dir() -> Path:
    from e3.models.registry import cache_dir
    return cache_dir() / "profiles"


def load_cached(path: Path) -> DeviceProfile | None:
    try:
        return DeviceProfile.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError):
        return None


def save_cached(path: Path, profile: DeviceProfile) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(profile.to_json()))
    os.replace(tmp, path)      # atomic: a concurrent reader sees the old file or the new one


def cached_profile(model, policy, model_id: str | os.PathLike, batch_sizes: Sequence[int] = DEFAULT_BATCHES,
                   cache: Path | None = None, device_name: str | None = None, **kwargs) -> DeviceProfile:
    """The profile of `model` from the disk cache, measured and stored on a miss."""
    meta = model.meta
    device = device_name or describe_device(model.device)
    extra = {"dtype": str(meta.dtype), "input": _input_signature(meta),
             "policy": getattr(policy, "name", None), "transfer": kwargs.get("transfer", "same-host")}
    path = Path(cache or profile_cache_dir()) / f"{cache_key(model_id, device, batch_sizes, extra)}.json"
    found = load_cached(path)
    if found is not None:
        return found
    profile = profile_model(model, policy, batch_sizes, device_name=device, **kwargs)
    save_cached(path, profile)
    return profile
