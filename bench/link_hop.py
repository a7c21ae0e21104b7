"""Per-hop latency and throughput of a boundary batch over the cluster link, beside the shared-memory hop.

    python3 -m bench.link_hop                  # 1,4,16,64 rows of MiniLM's and BERT-base's boundary
    python3 -m bench.link_hop --quick          # fewer hops and rounds (under 30 s)

Two real processes on 127.0.0.1 talk over E3's link (runtime/link.py): the
sender plays the coordinator (an aiohttp server with the challenge and link
routes, checking the cluster token's HMAC proof with cluster_auth), the
receiver a member (it connects out from 127.0.0.1, proves the token, sends
JOIN with its credits and checks the sender's proof in JOINED). A hop is what
a batch's rows cost to reach a member's worker:

  sender:   write the rows into its ring slot (as the previous split's worker
            does), read them back as views and send one TO_WORKER data frame
            (msgpack header + raw tensor bytes; one credit)
  receiver: write the frame's tensors into its mirror ring at that slot (as
            member.py does), give the credit back, answer with a small
            FROM_WORKER frame (as a member returns a DONE)

Figures per size, each round's median and 99th percentile over `--hops` hops
after a warm-up, then the median over `--rounds` rounds with [min-max]:
- `link rtt`: the sender's clock from its ring write to the reply;
- `link one-way`: from the sender's ring write to the receiver's clock once
  the rows are in its ring (both processes read the host's one monotonic
  clock, so this holds on one host only), and its parts: `sender` (ring
  write, encoding, queueing), `wire` (the link's writer task, the socket,
  aiohttp's reader, decoding), `receiver` (its ring write);
- `shm rtt`: bench/ipc_hop.py's hop (write into a shared-memory slot, a
  small message, the consumer gathers the rows, a small ack), run in the same
  round beside it; `link/shm` is the ratio of the two round trips' medians;
- MB/s: `w1` one hop at a time (bytes over the summed round trips), and for
  the link `window`: `--window` frames in flight (the link's credits, by
  default cluster.link_credits), bytes of `--stream` frames over the time
  from the first send to the last reply;
- encode / decode alone: the link's encode_frame and decode_frame of the same
  batch timed in one process.

Sizes: the boundary state of a BERT-family model (models/bert.py, what the
planner's `boundary_bytes` counts): hidden [seq, H] float32 and mask [seq]
int64 per row, seq 32 (the default model's max_seq_len), H 384 for MiniLM-L6
and 768 for BERT-base. A last, untimed hop per size has the receiver send the
rows back out of its ring; `intact` says they equal what was sent.

Writes <out>_cpu.json and .md (command, machine, versions, date, GLIBC_TUNABLES)
and the link's fixed and per-byte cost fitted to the one-way medians
(planner.transfer_fit). Exits 1 if any size's rows arrived changed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import torch
import uvloop
from aiohttp import web

from bench import ipc_hop
from e3.models.state import BatchState, StateSpec
from e3.planner.transfer_fit import fit_transfer
from e3.runtime.cluster_auth import (Challenges, ClusterAuthError, coordinator_proof, join_proof, new_nonce,
                                    proof_matches)
from e3.runtime.config import ClusterConfig
from e3.runtime.link import Link, LinkKind, decode_frame, encode_frame
from e3.runtime.slots import RingSpec, SlotRing

HOST = "127.0.0.1"
MODELS = {"minilm": 384, "bert-base": 768}      # hidden size of MiniLM-L6 and of BERT-base
JOIN_TIMEOUT_S = 60.0
HOP_TIMEOUT_S = 300.0        # generous: a benchmark on a shared machine may be paused (SIGSTOP) a while


@dataclass
class Settings:
    rows: list[int]
    models: dict[str, int]
    seq: int
    hops: int
    warmup: int
    rounds: int
    stream: int
    window: int
    threads: int


# -- the receiver process (a member's side) ---------------------------------------

def receiver(url: str, token: bytes, credits: int, max_frame: int, threads: int) -> None:
    """Join the sender's link and answer its frames until it closes the link."""
    torch.set_num_threads(threads)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(Receiver(url, token, credits, max_frame).run())


class Receiver:
    """Mirrors of the sender's rings; each data frame's rows written into one, then a small reply."""

    def __init__(self, url: str, token: bytes, credits: int, max_frame: int):
        self.url, self.token, self.credits, self.max_frame = url, token, credits, max_frame
        self.rings: dict[str, SlotRing] = {}
        self.link: Link | None = None

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(local_addr=(HOST, 0))
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.post(f"{self.url}/e3/cluster/challenge") as resp:
                challenge = (await resp.json())["challenge"]
            nonce = new_nonce()
            headers = {"X-E3-Challenge": challenge, "X-E3-Proof": join_proof(self.token, challenge, HOST),
                       "X-E3-Host": HOST, "X-E3-Nonce": nonce}
            ws = await http.ws_connect(f"{self.url}/e3/cluster/link", headers=headers, max_msg_size=self.max_frame)
            self.link = Link(ws, name="receiver", max_frame_bytes=self.max_frame, recv_credits=self.credits)
            joined = asyncio.get_running_loop().create_future()
            self.link.start(lambda header, tensors: self._on_frame(header, tensors, joined, nonce))
            self.link.send(LinkKind.JOIN, host=HOST, devices=[], credits=self.credits)
            try:
                await self.link.closed         # the sender closes it when done (or gives up on the join)
            finally:
                await self.link.close("the receiver is done")
                for ring in self.rings.values():
                    ring.close()

    def _on_frame(self, header: dict, tensors: list, joined: asyncio.Future, nonce: str) -> None:
        kind = header["k"]
        if kind == LinkKind.JOINED:
            if not proof_matches(coordinator_proof(self.token, nonce), header.get("proof")):
                raise RuntimeError("the sender does not hold the cluster token")
            self.link.set_send_credits(int(header["credits"]))
            joined.set_result(None)
        elif kind == LinkKind.TO_WORKER and header["m"]["op"] == "open":
            self._open(header["m"]["ring"])
        elif kind == LinkKind.TO_WORKER:
            self._take_rows(header["m"], tensors)

    def _open(self, wire: dict) -> None:
        spec = RingSpec.from_wire(wire)
        self.rings[spec.ring_id] = SlotRing.create(StateSpec(spec.fields), spec.slots, spec.capacity, tag="link-hop")
        self.link.send(LinkKind.FROM_WORKER, m={"op": "opened", "ring": spec.ring_id})

    def _take_rows(self, m: dict, tensors: list) -> None:
        got = time.perf_counter()
        ring = self.rings[m["ring"]]
        ring.write(m["slot"], 0, BatchState(dict(zip([f.name for f in ring.spec.fields], tensors))))
        arrived = time.perf_counter()
        self.link.grant(1)                 # the rows are in the ring: the frame's credit goes back
        back = [t for _, t in ring.read(m["slot"], 0, m["rows"]).items()] if m.get("echo") else []
        self.link.send(LinkKind.FROM_WORKER, back, data=True, m={"seq": m["seq"], "got": got, "arrived": arrived})


# -- the sender (this process; a coordinator's side) -------------------------------

class Sender:
    """The link's server side: accepts the receiver's authenticated join, sends rows, takes replies.

    Lifecycle: `start()` (serve, spawn the receiver, wait for its JOIN), hops, `close()`."""

    def __init__(self, credits: int, threads: int, max_frame: int = ClusterConfig().max_frame_bytes):
        self.credits, self.threads, self.max_frame = credits, threads, max_frame
        self.token = secrets.token_hex(32).encode()
        self.challenges = Challenges(ClusterConfig().challenge_ttl_s)
        self.link: Link | None = None
        self._runner: web.AppRunner | None = None
        self._proc = None
        self._joined: asyncio.Future | None = None
        self._waiting: dict = {}           # seq or ring id -> what a reply to it resolves
        self._seq = 0

    async def start(self) -> None:
        self._joined = asyncio.get_running_loop().create_future()
        app = web.Application()
        app.router.add_post("/e3/cluster/challenge", self._challenge)
        app.router.add_get("/e3/cluster/link", self._accept)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, 0).start()
        port = self._runner.addresses[0][1]
        ctx = mp.get_context("spawn")
        self._proc = ctx.Process(target=receiver, args=(f"http://{HOST}:{port}", self.token, self.credits,
                                                        self.max_frame, self.threads), daemon=True)
        self._proc.start()
        done, _ = await asyncio.wait([self._joined], timeout=JOIN_TIMEOUT_S)
        if not done:
            raise RuntimeError(f"the receiver process did not join within {JOIN_TIMEOUT_S:.0f} s "
                               f"(exit code {self._proc.exitcode})")

    async def _challenge(self, request: web.Request) -> web.Response:
        return web.json_response({"challenge": self.challenges.issue()})

    async def _accept(self, request: web.Request) -> web.StreamResponse:
        """The coordinator's checks (coordinator.py): a fresh challenge, the token's proof, the address."""
        h = request.headers
        challenge, host = h.get("X-E3-Challenge"), h.get("X-E3-Host", "")
        try:
            self.challenges.check(challenge)
        except ClusterAuthError as exc:
            return web.json_response({"error": str(exc)}, status=exc.status)
        if not proof_matches(join_proof(self.token, challenge, host), h.get("X-E3-Proof")) or host != request.remote:
            return web.json_response({"error": "wrong cluster token or address"}, status=403)
        self.challenges.consume(challenge)
        ws = web.WebSocketResponse(max_msg_size=self.max_frame)
        await ws.prepare(request)
        self.link = Link(ws, name="sender", max_frame_bytes=self.max_frame, recv_credits=2 * self.credits)
        nonce = h.get("X-E3-Nonce", "")
        await self.link.run_until_closed(lambda header, tensors: self._on_frame(header, tensors, nonce))
        return ws

    def _on_frame(self, header: dict, tensors: list, nonce: str) -> None:
        kind = header["k"]
        if kind == LinkKind.JOIN:
            self.link.set_send_credits(int(header["credits"]))
            self.link.send(LinkKind.JOINED, proof=coordinator_proof(self.token, nonce), credits=self.link.recv_credits)
            self._joined.set_result(None)
        elif kind == LinkKind.FROM_WORKER:
            if header.get("data"):
                self.link.grant(1)
            m = header["m"]
            self._waiting.pop(m.get("seq", m.get("ring")))(m, tensors)

    async def open(self, ring: SlotRing) -> None:
        """Have the receiver make its mirror of `ring`."""
        fut = asyncio.get_running_loop().create_future()
        self._waiting[ring.spec.ring_id] = lambda m, tensors: fut.set_result(None)
        self.link.send(LinkKind.TO_WORKER, m={"op": "open", "ring": ring.spec.to_wire()})
        await _within(fut, "opening a ring on the receiver")

    def send_rows(self, ring: SlotRing, slot: int, state: BatchState, on_reply, echo: bool = False) -> None:
        """One hop's sending half; `on_reply(m, tensors, t0, queued)` gets the reply, with the
        clock at the start and once the frame was encoded and queued on the link."""
        t0 = time.perf_counter()
        ring.write(slot, 0, state)
        rows = [t for _, t in ring.read(slot, 0, state.rows).items()]
        self._seq += 1
        self.link.send(LinkKind.TO_WORKER, rows, data=True,
                       m={"op": "run", "ring": ring.spec.ring_id, "slot": slot, "rows": state.rows, "seq": self._seq,
                          "echo": echo})
        queued = time.perf_counter()
        self._waiting[self._seq] = lambda m, tensors: on_reply(m, tensors, t0, queued)

    async def hop(self, ring: SlotRing, slot: int, state: BatchState, echo: bool = False) -> dict:
        """One hop's seconds: `rtt`, `oneway`, and the one-way's parts: `sender` (ring write, encode,
        queue), `wire` (the writer task, the socket, aiohttp's reader, decode), `receiver` (its ring
        write); `tensors`: what the reply carried."""
        fut = asyncio.get_running_loop().create_future()

        def done(m, tensors, t0, queued):
            fut.set_result({"rtt": time.perf_counter() - t0, "oneway": m["arrived"] - t0, "sender": queued - t0,
                            "wire": m["got"] - queued, "receiver": m["arrived"] - m["got"], "tensors": tensors})
        self.send_rows(ring, slot, state, done, echo)
        return await _within(fut, f"a hop of {state.rows} rows")

    async def stream(self, ring: SlotRing, state: BatchState, frames: int, window: int) -> float:
        """Seconds to move `frames` batches with up to `window` in flight (the link holds any beyond
        its credits in its queue)."""
        finished = asyncio.get_running_loop().create_future()
        counts = {"sent": 0, "back": 0}

        def send_next():
            slot = counts["sent"] % ring.spec.slots
            counts["sent"] += 1
            self.send_rows(ring, slot, state, on_reply)

        def on_reply(m, tensors, t0, queued):
            counts["back"] += 1
            if counts["sent"] < frames:
                send_next()
            elif counts["back"] == frames:
                finished.set_result(None)
        start = time.perf_counter()
        for _ in range(min(window, frames)):
            send_next()
        await _within(finished, f"a stream of {frames} frames of {state.rows} rows")
        return time.perf_counter() - start

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close("the benchmark is done")
        if self._runner is not None:
            await self._runner.cleanup()
        if self._proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._proc.join, 30)
            if self._proc.is_alive():
                self._proc.kill()


async def _within(fut: asyncio.Future, what: str):
    """`fut`'s result, or RuntimeError naming `what` after HOP_TIMEOUT_S (a lost reply, a dead receiver)."""
    try:
        return await asyncio.wait_for(fut, HOP_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RuntimeError(f"{what} got no reply within {HOP_TIMEOUT_S:.0f} s") from None


# -- one run: both paths, side by side ------------------------------------------------

class Paths:
    """Per model: a sender ring for the link and a shared-memory ring for ipc_hop's consumer."""

    def __init__(self, s: Settings, runner: asyncio.Runner, sender: Sender, conn):
        cap = max(s.rows)
        self.specs = {m: ipc_hop.state_spec(s.seq, h) for m, h in s.models.items()}
        self.link_rings = {m: SlotRing.create(spec, s.window, cap, tag="link-hop") for m, spec in self.specs.items()}
        self.shm_rings = {m: SlotRing.create(spec, ipc_hop.SLOTS, cap, tag="link-hop-shm")
                          for m, spec in self.specs.items()}
        self.shm_hops = {m: ipc_hop.Hop(conn, m, ring) for m, ring in self.shm_rings.items()}
        for ring in self.link_rings.values():
            runner.run(sender.open(ring))

    def close(self) -> None:
        for ring in (*self.link_rings.values(), *self.shm_rings.values()):
            ring.close()


def run(s: Settings) -> dict:
    """Every size's figures over `s.rounds` rounds, and whether each size's rows arrived intact."""
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    consumer = ctx.Process(target=ipc_hop.consumer, args=(child_conn, "cpu", s.threads), daemon=True)
    consumer.start()
    sender = Sender(s.window, s.threads)
    paths = None
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            try:
                runner.run(sender.start())
                paths = Paths(s, runner, sender, conn)
                return _measure(s, runner, sender, paths)
            finally:
                runner.run(sender.close())
    finally:
        _stop_consumer(conn, consumer)
        if paths is not None:
            paths.close()
        torch.set_num_threads(threads)      # run() may run inside another program (the tests)


def _stop_consumer(conn, proc) -> None:
    try:
        ipc_hop._send(conn, {"op": "stop"})
        ipc_hop._recv(conn)
    except (OSError, EOFError):
        pass
    proc.join(30)
    if proc.is_alive():
        proc.kill()


def _measure(s: Settings, runner: asyncio.Runner, sender: Sender, paths: Paths) -> dict:
    sizes = [(m, r) for m in s.models for r in s.rows]
    states = {(m, r): ipc_hop.batch_state(paths.specs[m], r, "cpu") for m, r in sizes}
    rounds = {size: [] for size in sizes}
    for _ in range(s.rounds):
        for size in sizes:
            rounds[size].append(_round(s, runner, sender, paths, size, states[size]))
    rows = []
    for m, r in sizes:
        intact = runner.run(_intact(sender, paths.link_rings[m], states[m, r]))
        row = _summary(m, r, r * paths.specs[m].bytes_per_sample, rounds[m, r], intact)
        row["codec_us"] = codec_us(states[m, r], s.hops)
        rows.append(row)
        _print_row(row)
    fit = fit_transfer([(r["bytes"], r["link_oneway_us"]["median"] / 1e6) for r in rows])
    return {"rows": rows, "fit_oneway": fit.to_json(), "window": s.window, "seq": s.seq, "models": s.models,
            "hops": s.hops, "warmup": s.warmup, "rounds": s.rounds, "stream": s.stream, "threads": s.threads}


def _round(s: Settings, runner, sender: Sender, paths: Paths, size, state: BatchState) -> dict:
    """One round at one size: shm hops, link hops, then the link's windowed stream."""
    m, _ = size
    hop = paths.shm_hops[m]
    shm = [hop.once(state, i % ipc_hop.SLOTS) for i in range(s.warmup + s.hops)][s.warmup:]
    link = runner.run(_hops(sender, paths.link_rings[m], state, s.warmup, s.hops))
    stream_s = runner.run(sender.stream(paths.link_rings[m], state, s.stream, s.window))
    return {"shm": shm, **link, "stream_s": stream_s, "frames": s.stream}


PARTS = ("rtt", "oneway", "sender", "wire", "receiver")


async def _hops(sender: Sender, ring: SlotRing, state: BatchState, warmup: int, hops: int) -> dict:
    """Per PARTS key, the seconds of each timed hop."""
    out = {k: [] for k in PARTS}
    for i in range(warmup + hops):
        hop = await sender.hop(ring, i % ring.spec.slots, state)
        if i >= warmup:
            for k in PARTS:
                out[k].append(hop[k])
    return out


async def _intact(sender: Sender, ring: SlotRing, state: BatchState) -> bool:
    """Whether the rows the receiver holds in its ring, sent back, equal what was sent."""
    hop = await sender.hop(ring, 0, state, echo=True)
    return same_rows(state, hop["tensors"])


def same_rows(sent: BatchState, back: list) -> bool:
    """Whether `back` holds every field of `sent`, in order, with the same dtype, shape and bytes."""
    fields = [t for _, t in sent.items()]
    return len(back) == len(fields) and all(
        b.dtype == a.dtype and b.shape == a.shape and torch.equal(b, a) for a, b in zip(fields, back))


def codec_us(state: BatchState, repeats: int) -> dict:
    """Median microseconds of the link's encode_frame and decode_frame of this batch, in this process:
    the part of a one-way hop that is the frame's codec (each frame freed before the next, as in a hop)."""
    tensors = [t for _, t in state.items()]
    enc, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        frame = encode_frame(LinkKind.TO_WORKER, tensors, cr=0, data=True, m={"op": "run"})
        t1 = time.perf_counter()
        decode_frame(frame)
        dec.append(time.perf_counter() - t1)
        enc.append(t1 - t0)
        del frame
    return {"encode": float(np.median(enc) * 1e6), "decode": float(np.median(dec) * 1e6)}


def _spread(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


def _summary(model: str, rows: int, nbytes: int, rounds: list[dict], intact: bool) -> dict:
    """Median [min-max] over rounds of each round's statistic."""
    def per_round(key, f):
        return _spread([f(np.asarray(r[key]) * 1e6) for r in rounds])
    med, p99 = np.median, (lambda v: np.percentile(v, 99))
    return {"model": model, "rows": rows, "bytes": nbytes, "intact": intact,
            "shm_rtt_us": per_round("shm", med), "shm_rtt_p99_us": per_round("shm", p99),
            "link_rtt_us": per_round("rtt", med), "link_rtt_p99_us": per_round("rtt", p99),
            "link_oneway_us": per_round("oneway", med), "link_oneway_p99_us": per_round("oneway", p99),
            "oneway_parts_us": {k: per_round(k, med) for k in ("sender", "wire", "receiver")},
            "link_over_shm": _spread([np.median(r["rtt"]) / np.median(r["shm"]) for r in rounds]),
            "shm_mbps_w1": _spread([nbytes * len(r["shm"]) / sum(r["shm"]) / 1e6 for r in rounds]),
            "link_mbps_w1": _spread([nbytes * len(r["rtt"]) / sum(r["rtt"]) / 1e6 for r in rounds]),
            "link_mbps_window": _spread([nbytes * r["frames"] / r["stream_s"] / 1e6 for r in rounds])}


# -- the record ----------------------------------------------------------------

def _us(d: dict) -> str:
    return f"{d['median']:.0f} [{d['min']:.0f}-{d['max']:.0f}]"


def _mbps(d: dict) -> str:
    return f"{d['median']:.0f} [{d['min']:.0f}-{d['max']:.0f}]"


def _ratio(d: dict) -> str:
    return f"{d['median']:.2f} [{d['min']:.2f}-{d['max']:.2f}]"


def _print_row(row: dict) -> None:
    print(f"{row['model']:9s} {row['rows']:3d} rows {row['bytes'] / 1e6:6.2f} MB  "
          f"shm rtt {_us(row['shm_rtt_us']):>16s} us  link rtt {_us(row['link_rtt_us']):>18s} us  "
          f"one-way {_us(row['link_oneway_us']):>18s} us  link/shm {_ratio(row['link_over_shm'])}  "
          f"link MB/s windowed {_mbps(row['link_mbps_window'])}  intact {row['intact']}", flush=True)


def goal(result: dict) -> dict | None:
    """The issue's goal: a 64-row MiniLM boundary one way over the loopback link in under 2 ms (median)."""
    row = next((r for r in result["rows"] if r["model"] == "minilm" and r["rows"] == 64), None)
    if row is None:
        return None
    ms = row["link_oneway_us"]["median"] / 1000
    return {"oneway_ms": ms, "goal_ms": 2.0, "met": ms < 2.0}


def versions() -> dict:
    import importlib.metadata as md
    return {name: md.version(name) for name in ("aiohttp", "uvloop")}


def write(out: Path, result: dict, info: dict, command: str) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    js, md = Path(f"{out}_cpu.json"), Path(f"{out}_cpu.md")
    js.write_text(json.dumps({"command": command, "machine": info, "goal": goal(result), **result}, indent=1))
    md.write_text("\n".join(_markdown(result, info, command)) + "\n")
    return js, md


def _markdown(result: dict, info: dict, command: str) -> list[str]:
    w, fit, g = result["window"], result["fit_oneway"], goal(result)
    lines = ["# Boundary hop between two processes: the cluster link (loopback) vs shared memory", "",
             f"Command: `{command}`  ", f"Date: {info['date']}  ", f"Commit: {info['commit']}  ",
             f"Python {info['python']}, torch {info['torch']}, numpy {info['numpy']}, msgpack {info['msgpack']}, "
             f"aiohttp {info['aiohttp']}, uvloop {info['uvloop']}  ",
             f"{info['cpus']} CPUs; 1-minute load average before / after: "
             f"{info['load_average_1m_before']} / {info['load_average_1m']}  ",
             f"GLIBC_TUNABLES (every process of the run): {info['glibc_tunables'] or 'unset (glibc defaults)'}", "",
             "```", *info["lscpu"], "```", "",
             f"Rows: hidden [{result['seq']}, H] float32 + mask [{result['seq']}] int64 "
             f"({', '.join(f'{m} H={h}' for m, h in result['models'].items())}). Per round and size "
             f"{result['hops']} hops after {result['warmup']} warm-up, {result['rounds']} rounds: each figure is "
             "the median over rounds of that round's median (or 99th percentile), [min-max] over rounds. "
             "Round trips (rtt) are the sender's clock from its ring write to the small reply; one-way is the "
             "receiver's clock once the rows are in its ring minus the sender's at its write (one host, one "
             "clock). shm is bench/ipc_hop.py's hop, measured in the same rounds. MB/s w1: one hop at a time; "
             f"window: {result['stream']} frames with up to {w} in flight (the link's credits).", "",
             "| model | rows | MB | shm rtt (us) | shm p99 | link rtt (us) | link p99 | link one-way (us) "
             "| one-way p99 "
             "| link/shm (rtt) | shm MB/s w1 | link MB/s w1 | link MB/s window | intact |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['rows']} | {r['bytes'] / 1e6:.2f} | {_us(r['shm_rtt_us'])} | "
              f"{_us(r['shm_rtt_p99_us'])} | {_us(r['link_rtt_us'])} | {_us(r['link_rtt_p99_us'])} | "
              f"{_us(r['link_oneway_us'])} | {_us(r['link_oneway_p99_us'])} | {_ratio(r['link_over_shm'])} | "
              f"{_mbps(r['shm_mbps_w1'])} | {_mbps(r['link_mbps_w1'])} | {_mbps(r['link_mbps_window'])} | "
              f"{'yes' if r['intact'] else 'NO'} |" for r in result["rows"]]
    lines += ["", "Where a one-way hop's time goes (medians, us): sender = its ring write, the frame's encoding "
                  "and queueing; wire = the link's writer task, the loopback socket, aiohttp's reader and the "
                  "frame's decoding, up to the receiver's handler; receiver = its ring write. encode / decode: "
                  "the link's encode_frame and decode_frame of the same batch timed alone in one process.", "",
              "| model | rows | one-way | sender | wire | receiver | encode alone | decode alone |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['rows']} | {r['link_oneway_us']['median']:.0f} | "
              + " | ".join(f"{r['oneway_parts_us'][k]['median']:.0f}" for k in ("sender", "wire", "receiver"))
              + f" | {r['codec_us']['encode']:.0f} | {r['codec_us']['decode']:.0f} |" for r in result["rows"]]
    lines += ["", "Link cost fitted to the one-way medians (planner.transfer_fit, relative least squares over "
                  f"every size): {fit['transfer_fixed_s'] * 1e6:.0f} us + "
                  f"{fit['transfer_s_per_byte'] * 1e12:.0f} us/MB "
                  f"(the largest error {fit['max_relative_error'] * 100:.0f}% of a size's time)."]
    if g is not None:
        lines += ["", f"Goal: a 64-row MiniLM boundary one way over the loopback link in under {g['goal_ms']:.0f} ms "
                      f"at the median: {g['oneway_ms']:.2f} ms, {'met' if g['met'] else 'MISSED'}."]
    return lines


# -- the command line --------------------------------------------------------------

QUICK = {"hops": 30, "warmup": 5, "rounds": 3, "stream": 24}


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"row counts must be 1 or more, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return v


def _models(text: str) -> dict[str, int]:
    """"minilm,bert-base" or "name=H,..." (a hidden size of one's own)."""
    out = {}
    for item in text.split(","):
        name, _, hidden = item.partition("=")
        if hidden:
            out[name] = _positive(hidden)
        elif name in MODELS:
            out[name] = MODELS[name]
        else:
            raise argparse.ArgumentTypeError(f"unknown model {name!r}: one of {', '.join(MODELS)}, or NAME=HIDDEN")
    return out


def parse(argv) -> tuple[Settings, Path]:
    p = argparse.ArgumentParser(prog="bench.link_hop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=_positive_ints, default=[1, 4, 16, 64], help="batch rows (default 1,4,16,64)")
    p.add_argument("--models", type=_models, default=dict(MODELS), help="minilm,bert-base (default) or NAME=HIDDEN")
    p.add_argument("--seq", type=_positive, default=ipc_hop.SEQ, help="sequence length (the default model's 32)")
    p.add_argument("--hops", type=_positive, default=300, help="timed hops per round and size")
    p.add_argument("--warmup", type=int, default=20, help="untimed hops first")
    p.add_argument("--rounds", type=_positive, default=3)
    p.add_argument("--stream", type=_positive, default=200, help="frames of the windowed throughput run")
    p.add_argument("--window", type=_positive, default=ClusterConfig().link_credits,
                   help="frames in flight: the link's credits (default cluster.link_credits)")
    p.add_argument("--threads", type=_positive, default=1, help="torch threads per process (the CPU worker default)")
    p.add_argument("--quick", action="store_true",
                   help=f"fewer hops and frames ({', '.join(f'{k} {v}' for k, v in QUICK.items())}); under 30 s")
    p.add_argument("--out", default=None, help="writes <out>_cpu.json and .md (default bench/results/link_hop; "
                   "with --quick bench/results/link_hop_quick, so that it never replaces the full record)")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error(f"--warmup must be 0 or more, got {args.warmup}")
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    out = args.out or ("bench/results/link_hop_quick" if args.quick else "bench/results/link_hop")
    return Settings(args.rows, args.models, args.seq, args.hops, args.warmup, args.rounds, args.stream,
                    args.window, args.threads), Path(out)


def main(argv=None) -> int:
    settings, out = parse(argv)
    command = "python3 -m bench.link_hop " + shlex.join(argv if argv is not None else sys.argv[1:])
    load_before = round(os.getloadavg()[0], 2)
    try:
        result = run(settings)
    except (RuntimeError, OSError, asyncio.TimeoutError, aiohttp.ClientError) as exc:
        print(f"bench.link_hop: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    info = {**ipc_hop.machine(), **versions(), "load_average_1m_before": load_before,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    for path in write(out, result, info, command.strip()):
        print(f"wrote {path}")
    g = goal(result)
    if g is not None:
        print(f"goal: 64-row MiniLM one way {g['oneway_ms']:.2f} ms (under {g['goal_ms']:.0f} ms: "
              f"{'met' if g['met'] else 'MISSED'})")
    broken = [f"{r['model']} {r['rows']} rows" for r in result["rows"] if not r["intact"]]
    if broken:
        print(f"bench.link_hop: rows arrived changed at: {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
