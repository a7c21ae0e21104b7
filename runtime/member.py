"""A member node: its own worker processes, lent to a coordinator over one link.

    bin/e3-node --join http://HOST:PORT --cluster-token-file F --host ADDR [--model M --workers N]

The member opens no port: it connects out from ADDR (its own address, which
the coordinator checks against the connection's) and keeps one link
(link.py). Joining: POST /e3/cluster/challenge, then the link's WebSocket
with an HMAC of the challenge (cluster_auth.py); JOIN registers the
member's devices (kind, count, threads, free memory); JOINED carries the
coordinator's own proof (checked: a member serves only a coordinator that
holds the token) and the exit policy; the member starts its workers (a
LocalWorkerPool, as a node's) and says READY with them. A heartbeat keeps
its lease; the coordinator's answers keep the member's lease on it.

Serving: the coordinator's worker messages arrive as TO_WORKER frames. A
RUN brings its input rows: they are written into the member's mirror of the
coordinator's ring, at the same slots (a PREPARE made the mirror: same
fields, slots and capacity, a file of this host), and the RUN goes to the
worker unchanged; its DONE goes back with the survivors' rows read from the
mirror's output slot. Calls (PREPARE, PROFILE) run as the member pool's own
calls and their replies go back with the coordinator's call id. A worker
that dies is restarted by the member's pool and reported (WORKER_LOST, then
WORKER_BACK: the coordinator prepares the replacement).

The coordinator lost (its link closed, or silent for `cluster.lease_s`):
the member retires its mirrors and tries to join again, `cluster.join_attempts`
times with doubling waits; then it stops its workers and exits with an
error. A wrong token ends it at once. It never spins.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from typing import NamedTuple

import aiohttp

from e3.models.state import BatchState

from .cluster_auth import coordinator_proof, join_proof, new_nonce, proof_matches
from .config import E3Config
from .errors import ConfigError, RuntimeError_, WireError
from .link import Link, LinkKind
from .metrics import Metrics
from .slots import RingSpec, SlotRing, _shm_root, sweep_stale_rings
from .wire import Kind
from .worker_client import WorkerClient
from .worker_pool import Background, HeldBatch, LocalWorkerPool

log = logging.getLogger(__name__)


class JoinRefused(RuntimeError_):
    """Raised when the coordinator refuses this member's token, or cannot prove it holds it."""


class CoordinatorLost(RuntimeError_):
    """Raised when the coordinator cannot be reached within cluster.join_attempts."""


class _Model(NamedTuple):
    path: str                 # what LocalWorkerPool reads of a loaded model in process mode


class _Run(NamedTuple):
    worker: WorkerClient
    dst: tuple[str, int] | None
    sent_at: float


def free_memory_bytes() -> int | None:
    """MemAvailable of this host (Linux), else None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Member:
    """Joins a coordinator and serves its worker messages (see the module docstring)."""

    def __init__(self, config: E3Config, *, model=None):
        """`model`: a LoadedModel to serve on inline workers (tests); else worker processes load
        config.model."""
        from .cluster_auth import read_token
        self.config = config
        c = config.cluster
        if c.join is None:
            raise ConfigError("a member needs cluster.join (--join http://HOST:PORT)")
        self.url = c.join.rstrip("/")
        self.host = config.server.host
        if self.host in ("0.0.0.0", "::", ""):
            raise ConfigError(f"--host {self.host!r}: a member gives the address the coordinator sees it at "
                              "(e.g. --host 10.0.0.5), which it connects from")
        if (config.workers.mode == "inline") != (model is not None):
            raise ConfigError("a member serves on worker processes (drop --inline)")
        self._model = model
        self.token = read_token(c.token_file)
        self.metrics = Metrics()
        self.pool: LocalWorkerPool | None = None
        self.link: Link | None = None
        self.member_id: int | None = None
        self._mirrors: dict[str, SlotRing] = {}
        self._runs: dict[tuple[int, int, int], _Run] = {}     # (worker, epoch, batch id)
        self._calls = Background()
        self._last_heard = 0.0

    # -- the member's life ---------------------------------------------------

    async def run(self, stop: asyncio.Future) -> None:
        """Join and serve until `stop` (returns) or the coordinator is lost for good (raises)."""
        from e3.models.registry import resolve
        loop = asyncio.get_running_loop()
        if self._model is None:
            self._model = _Model(str(await loop.run_in_executor(None, resolve, self.config.model.path)))
        c = self.config.cluster
        failures, delay, last = 0, c.retry_delay_s, None
        try:
            while not stop.done():
                try:
                    if await self._session(stop):
                        failures, delay = 0, c.retry_delay_s      # it was a member: a fresh count
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError, WireError) as exc:
                    last = exc
                    log.warning("joining %s failed: %s", self.url, _why(exc))
                if stop.done():
                    return
                failures += 1
                if failures >= c.join_attempts:
                    raise CoordinatorLost(f"the coordinator at {self.url} cannot be reached "
                                          f"({failures} attempts; last: {_why(last) if last else 'the link ended'}); stopping")
                await asyncio.wait([stop], timeout=delay)
                delay = min(delay * 2, 8.0)
        finally:
            await self._calls.cancel()
            if self.pool is not None:
                await self.pool.drain()
                await self.pool.stop()
            self._retire_all()

    async def _session(self, stop: asyncio.Future) -> bool:
        """One link's life: join, serve until it ends or `stop`; whether it got as far as JOINED."""
        c = self.config.cluster
        connector = aiohttp.TCPConnector(local_addr=(self.host, 0))
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            async with http.post(f"{self.url}/e3/cluster/challenge") as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status,
                                                      message=f"challenge refused: {await resp.text()}")
                challenge = (await resp.json())["challenge"]
            nonce = new_nonce()
            headers = {"X-E3-Challenge": challenge, "X-E3-Proof": join_proof(self.token, challenge, self.host),
                       "X-E3-Host": self.host, "X-E3-Nonce": nonce}
            try:
                ws = await http.ws_connect(f"{self.url}/e3/cluster/link", headers=headers,
                                           max_msg_size=c.max_frame_bytes, autoping=True)
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status in (401, 403):
                    raise JoinRefused(f"the coordinator at {self.url} refused the join ({exc.status}): "
                                      "check --cluster-token-file (the same token on every node) and --host") from None
                raise
            link = Link(ws, name=f"coordinator@{self.url}", max_frame_bytes=c.max_frame_bytes,
                        recv_credits=c.link_credits)
            self.link = link
            joined = asyncio.get_running_loop().create_future()
            link.start(lambda header, tensors: self._on_frame(header, tensors, joined))
            link.send(LinkKind.JOIN, host=self.host, devices=self._devices(), free_memory=free_memory_bytes(),
                      credits=c.link_credits)
            heartbeat = None
            try:
                done, _ = await asyncio.wait([joined, link.closed, stop], timeout=30.0,
                                             return_when=asyncio.FIRST_COMPLETED)
                if joined not in done:
                    return False
                header = joined.result()
                if not proof_matches(coordinator_proof(self.token, nonce), header.get("proof")):
                    raise JoinRefused(f"the server at {self.url} does not hold the cluster token; not serving it")
                if header.get("model") != self._model_name():
                    raise JoinRefused(f"the coordinator at {self.url} serves model {header.get('model')!r} and this "
                                      f"member {self._model_name()!r}: give every node the same --model")
                self.member_id = header["member"]
                link.set_send_credits(int(header["credits"]))
                heartbeat = asyncio.create_task(self._heartbeat(link), name="e3-member-heartbeat")
                await self._start_workers(tuple(header["policy"]))
                link.send(LinkKind.READY, workers=[{"id": i, "device": w.device, "threads": self.config.workers.threads_per_worker}
                                                   for i, w in self.pool.workers.items()])
                print(f"e3-node: member {self.member_id} of {self.url} from {self.host} "
                      f"({len(self.pool.workers)} workers)", flush=True)
                await asyncio.wait([link.closed, stop], return_when=asyncio.FIRST_COMPLETED)
                if not link.closed.done():
                    await link.close("the member is stopping")
                else:
                    log.error("lost the coordinator at %s: %s", self.url, link.closed.result())
                    print(f"e3-node: lost the coordinator ({link.closed.result()}); joining again", flush=True)
                return True
            finally:
                if heartbeat is not None:
                    heartbeat.cancel()
                    await asyncio.gather(heartbeat, return_exceptions=True)
                await link.close("the member is stopping")
                self.link = None
                await self._calls.cancel()
                self._calls = Background()
                self._retire_all()

    def _model_name(self) -> str:
        """The served model's name, as the coordinator's JOINED gives its own (checked before serving)."""
        if isinstance(self._model, _Model):
            from e3.models.registry import read_manifest
            return str(read_manifest(self._model.path).get("name"))
        return self._model.model.meta.name

    async def _start_workers(self, policy: tuple) -> None:
        if self.pool is None:
            self.pool = LocalWorkerPool(self.config.workers, self.metrics, model=self._model,
                                        policy=(str(policy[0]), float(policy[1])))
            try:
                await self.pool.start(self)
            except BaseException:
                self.pool = None
                raise
        else:
            self.pool.set_policy(str(policy[0]), float(policy[1]))

    async def _heartbeat(self, link: Link) -> None:
        """Keep our lease, and give up a coordinator that no longer answers."""
        c = self.config.cluster
        loop = asyncio.get_running_loop()
        self._last_heard = loop.time()
        while not link.closed.done():
            await asyncio.sleep(c.heartbeat_s)
            if loop.time() - self._last_heard > c.lease_s:
                await link.close(f"the coordinator is silent ({loop.time() - self._last_heard:.1f} s)")
                return
            link.send(LinkKind.HEARTBEAT, free_memory=free_memory_bytes())

    def _devices(self) -> list[dict]:
        wc = self.config.workers
        counts = Counter(wc.resolved_devices())
        return [{"kind": d.split(":")[0], "name": d, "count": n, "threads": wc.threads_per_worker if d == "cpu" else None}
                for d, n in counts.items()]

    # -- frames from the coordinator -----------------------------------------

    def _on_frame(self, header: dict, tensors: list, joined: asyncio.Future) -> None:
        self._last_heard = asyncio.get_running_loop().time()
        kind = header["k"]
        if kind == LinkKind.JOINED:
            if not joined.done():
                joined.set_result(header)
        elif kind == LinkKind.PING:
            self.link.send(LinkKind.PONG, tensors, seq=header.get("seq"))
        elif kind == LinkKind.TO_WORKER:
            self._to_worker(header, tensors)
        elif kind == LinkKind.POLICY and self.pool is not None:
            self.pool.set_policy(header["name"], float(header["threshold"]))

    def _to_worker(self, header: dict, tensors: list) -> None:
        w, m = header["w"], dict(header["m"])
        kind = Kind(m.pop("k"))
        call = m.pop("call", None)
        if call is not None:
            self._calls.run(self._call(w, kind, call, m))
            return
        worker = self.pool.workers.get(w) if self.pool is not None else None
        if kind == Kind.RUN:
            if worker is None or not worker.alive:
                self.link.grant(1)       # its loss was reported: the coordinator retries the batch
                return
            try:
                self._write_rows(m["src"], tensors)
            except (KeyError, ValueError, RuntimeError) as exc:
                self.link.grant(1)
                self._send_reply(w, {"k": Kind.FAILED, "id": m.get("id"), "epoch": m.get("epoch"),
                                     "error": f"the member could not take the batch's rows: {exc}"})
                return
            dst = tuple(m["dst"]) if m.get("dst") is not None else None
            self._runs[w, m["epoch"], m["id"]] = _Run(worker, dst, asyncio.get_running_loop().time())
            worker.send(Kind.RUN, **m)
        elif kind == Kind.RETIRE:
            if worker is not None and worker.alive:
                worker.send(Kind.RETIRE, **m)
            for ring_id in m.get("rings", ()):
                ring = self._mirrors.pop(ring_id, None)
                if ring is not None:
                    ring.close()          # its file goes; a worker's mapping stays valid until it detaches
        elif worker is not None and worker.alive:
            worker.send(kind, **m)

    async def _call(self, w: int, kind: Kind, call: int, fields: dict) -> None:
        timeout = 300.0 if kind == Kind.PROFILE else self.config.workers.start_timeout_s
        try:
            if self.pool is None:
                raise RuntimeError_("the member's workers are not started")
            if kind == Kind.PREPARE:
                fields["rings"] = [self._mirror(d) for d in fields.get("rings", ())]
            reply = dict(await self.pool.call(w, kind, timeout, **fields))
        except Exception as exc:
            reply = {"k": Kind.FAILED, "epoch": fields.get("epoch"), "error": f"{type(exc).__name__}: {exc}"}
        reply["call"] = call
        self._send_reply(w, reply)

    def _send_reply(self, w: int, msg: dict, tensors=(), data: bool = False) -> None:
        if self.link is None or self.link.closed.done():
            return                      # the link is gone: the coordinator retries or fails the batch
        self.link.send(LinkKind.FROM_WORKER, tensors, data=data, w=w, m={**msg, "k": int(msg["k"])})

    # -- mirrors of the coordinator's rings ----------------------------------

    def _mirror(self, d: dict) -> dict:
        """This host's ring for the coordinator's ring `d` (same id, fields, slots, capacity)."""
        if d.get("cuda") is not None:
            raise RuntimeError_(f"ring {d['id']} is a GPU ring; no GPU ring spans hosts")
        ring = self._mirrors.get(d["id"])
        if ring is None:
            if not self._mirrors:
                sweep_stale_rings()
            spec = RingSpec.from_wire(d)
            path = str(_shm_root() / f"e3-{os.getpid()}-member-{spec.ring_id}")
            local = RingSpec(spec.ring_id, path, spec.slots, spec.capacity, spec.fields)
            with open(path, "wb") as fh:
                fh.truncate(local.nbytes)
            ring = self._mirrors[spec.ring_id] = SlotRing(local, owner=True)
        return ring.spec.to_wire()

    def _write_rows(self, segments: list, tensors: list) -> None:
        at = 0
        for ring_id, slot, start, count in segments:
            ring = self._mirrors[ring_id]
            names = [f.name for f in ring.spec.fields]
            part = tensors[at:at + len(names)]
            if len(part) != len(names) or any(t.shape[0] != count for t in part):
                raise ValueError(f"{len(part)} tensors for {count} rows of ring {ring_id} ({len(names)} fields)")
            ring.write(slot, start, BatchState(dict(zip(names, part))))
            at += len(names)
        if at != len(tensors):
            raise ValueError(f"{len(tensors) - at} tensors more than the batch's segments need")

    def _retire_all(self) -> None:
        """The coordinator is gone: its epochs are, too."""
        for key, run in list(self._runs.items()):
            del self._runs[key]
        if self._mirrors and self.pool is not None:
            self.pool.broadcast(Kind.RETIRE, rings=list(self._mirrors))
        for ring in self._mirrors.values():
            ring.close()
        self._mirrors.clear()

    # -- the member pool's events (worker_pool.PoolEvents) --------------------

    def on_reply(self, worker: WorkerClient, msg: dict) -> None:
        run = self._runs.pop((worker.worker_id, msg.get("epoch"), msg.get("id")), None)
        if run is None:
            return                         # a batch of a link that ended
        tensors = []
        survivors = msg.get("survivors") or []
        if msg["k"] == Kind.DONE and run.dst is not None and survivors:
            ring = self._mirrors.get(run.dst[0])
            if ring is not None:
                tensors = [t for _, t in ring.read(run.dst[1], 0, len(survivors)).items()]
        if self.link is not None and not self.link.closed.done():
            self.link.grant(1)             # its RUN's credit
        self._send_reply(worker.worker_id, msg, tensors, data=True)

    def on_lost(self, worker: WorkerClient) -> None:
        for key in [k for k, r in self._runs.items() if r.worker is worker]:
            del self._runs[key]
            if self.link is not None and not self.link.closed.done():
                self.link.grant(1)
        if self.link is not None and not self.link.closed.done():
            self.link.send(LinkKind.WORKER_LOST, w=worker.worker_id)

    async def on_joined(self, worker: WorkerClient) -> None:
        """Nothing here: the coordinator prepares the replacement once it hears WORKER_BACK."""

    async def on_restarted(self, worker: WorkerClient) -> None:
        if self.link is not None and not self.link.closed.done():
            self.link.send(LinkKind.WORKER_BACK, w=worker.worker_id)

    def held_batches(self):
        return [HeldBatch(r.worker, key[2], 0, r.sent_at) for key, r in self._runs.items()]


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def serve_member(config: E3Config) -> int:
    """`bin/e3-node --join`: run a member until SIGINT/SIGTERM (0) or its coordinator is lost (raises)."""
    from .cli import stop_signals
    member = Member(config)
    stop = stop_signals()
    print(f"e3-node: joining {member.url} from {member.host} (model {config.model.path!r}) ...", flush=True)
    await member.run(stop)
    print("e3-node: stopped", flush=True)
    return 0

