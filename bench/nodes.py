"""The systems under test, each a real `e3-node` process with its own config.

All run the same model on the same workers through the same runtime and
HTTP path; only the batching policy differs:

- `stock`: the model without ramps (one split, no ramp evaluated, no ramp
  sampling), dynamically batched at batch size B;
- `ee-batch`: the EE model batched as is: every ramp enabled, a batch of B
  enters, exited rows leave, the survivors go on at once as a shrunken batch
  (`batching.rebatch = false`);
- `ee-1`: the EE model at batch size 1, every ramp enabled;
- `e3`: the planner chooses splits, ramps and B from its profile and the
  live exit forecast, re-plans and hot-swaps as traffic changes.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import tempfile
from pathlib import Path

import aiohttp

SYSTEMS = ("stock", "ee-batch", "ee-1", "e3")


class NodeError(Exception):
    """Raised when a benchmark node does not come up or answers its control API wrongly."""


def node_config(system: str, model_dir: str, ramp_blocks: list[int], *, batch: int | None, slo_ms: float,
                workers: int, threads: int, port: int, observe: bool = False) -> dict:
    """The e3-node config of one system. `observe`: a baseline's node runs the planner in shadow mode
    (it measures and values its own plan, and switches nothing)."""
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")
    batching = {"slo_ms": slo_ms, "timeout_ms": max(1000.0, 10 * slo_ms), "max_queue": 4096}
    if system == "stock":
        batching |= {"batch": batch, "cuts": [], "sample_fraction": 0.0}
    elif system == "ee-batch":
        batching |= {"batch": batch, "cuts": list(ramp_blocks), "rebatch": False, "sample_fraction": 0.0}
    elif system == "ee-1":
        batching |= {"batch": 1, "cuts": list(ramp_blocks), "sample_fraction": 0.0}
    return {"model": {"path": str(model_dir)},
            "workers": {"mode": "process", "devices": ["cpu"] * workers, "threads_per_worker": threads},
            "batching": batching,
            # gRPC off: the load speaks HTTP, and nodes must not contend for port 8001.
            "server": {"host": "127.0.0.1", "port": port, "grpc_port": 0, "max_inputs": 256},
            "replan": {"enabled": system == "e3" or observe, "observe": system != "e3" and observe}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin_to(cpus: frozenset[int] | None):
    """A preexec_fn that keeps a child (and what it starts) on `cpus`; None when unpinned."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def parse_cpus(text: str) -> frozenset[int]:
    """'0', '0,2' or '0-3' as a set of core ids, each one this process may use."""
    ids: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            ids.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise ValueError(f"cannot read CPU list {text!r}: use e.g. 0, 0,2 or 0-3") from None
    usable = os.sched_getaffinity(0)
    if not ids or not ids <= usable:
        raise ValueError(f"CPU list {text!r} names cores this machine does not give us (usable: {sorted(usable)})")
    return frozenset(ids)


class Node:
    """One e3-node subprocess: started, queried over HTTP, stopped with SIGTERM (a graceful drain)."""

    def __init__(self, config: dict, log_path: Path, start_timeout_s: float = 300.0,
                 cpus: frozenset[int] | None = None):
        self.config, self.log_path, self.start_timeout_s = config, log_path, start_timeout_s
        self.cpus = cpus                # the cores the node and its workers may run on (None: all)
        self.url = f"http://127.0.0.1:{config['server']['port']}"
        self.proc: asyncio.subprocess.Process | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="e3-bench-")
        self.model_name: str | None = None

    async def __aenter__(self) -> "Node":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        cfg = Path(self._tmp.name) / "node.json"
        cfg.write_text(json.dumps(self.config))
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "E3_LOG_LEVEL": "WARNING"}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "e3.runtime.cli", "--config", str(cfg), "--no-demo-query",
            stdout=asyncio.subprocess.PIPE, stderr=self._log, env=env, preexec_fn=pin_to(self.cpus))
        try:
            await asyncio.wait_for(self._wait_serving(), self.start_timeout_s)
        except (asyncio.TimeoutError, NodeError):
            await self.stop()
            tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
            raise NodeError("the node did not start; its log ends:\n  " + "\n  ".join(tail)) from None
        self._drain_task = asyncio.create_task(self._copy_stdout())

    async def _wait_serving(self) -> None:
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                raise NodeError("node exited")
            self._log.write(line)
            m = re.search(rb"serving (?:model|causal LM) '([^']+)'", line)   # a classifier or an LM node
            if m:
                self.model_name = m.group(1).decode()
                return

    async def _copy_stdout(self) -> None:
        while line := await self.proc.stdout.readline():
            self._log.write(line)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if getattr(self, "_drain_task", None) is not None:
            await asyncio.gather(self._drain_task, return_exceptions=True)
        if getattr(self, "_log", None) is not None:
            self._log.close()
        self._tmp.cleanup()

    async def get_json(self, path: str) -> dict:
        async with aiohttp.ClientSession() as s, s.get(self.url + path) as r:
            if r.status != 200:
                raise NodeError(f"GET {path}: HTTP {r.status}")
            return await r.json()

    async def batch_rows(self) -> dict[str, tuple[float, float]]:
        """Per split: (sum, count) of the rows of the batches that entered it, from /metrics."""
        async with aiohttp.ClientSession() as s, s.get(self.url + "/metrics") as r:
            return batch_rows_of(await r.text())


def batch_rows_of(metrics_text: str) -> dict[str, tuple[float, float]]:
    """Per split: (sum, count) of batch rows in Prometheus text, from a node's /metrics or, on the
    sidecar path, from the runtime's own `metrics.render()`."""
    out: dict[str, list[float]] = {}
    for m in re.finditer(r'^e3_batch_rows_(sum|count)\{split="(\d+)"\} ([0-9.e+-]+)$', metrics_text, re.M):
        pair = out.setdefault(m.group(2), [0.0, 0.0])
        pair[0 if m.group(1) == "sum" else 1] = float(m.group(3))
    return {k: (v[0], v[1]) for k, v in out.items()}


def mean_rows(before: dict, after: dict) -> dict[str, float]:
    """Mean rows per batch at each split's entry between two /metrics readings."""
    out = {}
    for split, (s1, c1) in sorted(after.items(), key=lambda kv: int(kv[0])):
        s0, c0 = before.get(split, (0.0, 0.0))
        if c1 > c0:
            out[split] = round((s1 - s0) / (c1 - c0), 2)
    return out
