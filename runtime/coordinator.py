"""The coordinator: the node that admits and answers requests and accepts members.

    bin/e3-node --cluster-token-file F ...

Routes it adds to the node's HTTP app:

    POST /e3/cluster/challenge   {"challenge": hex}: what a member's join must answer
    GET  /e3/cluster/link        a member's join: the WebSocket of its link (link.py), opened only
                                 for a proof of the token (401 without one, 403 for a wrong one;
                                 nothing is allocated before the proof matches)
    GET  /e3/cluster             members: address, devices, lease age, state, link latency/bandwidth

A member's life here: the link opens (authenticated), JOIN registers its
devices, JOINED answers (with the coordinator's own proof and the exit
policy), the link's latency and bandwidth are measured with pings (and again
every `cluster.link_measure_s`), and READY (its workers warm) adds its
workers to the ClusterPool
(remote_pool.py), after which the coordinator re-plans. Any frame renews its
lease; a member unheard for `cluster.lease_s`, or whose link closes, is lost:
its workers are reported lost (their batches retried elsewhere or failed)
and the coordinator re-plans without it.

Placement: with re-planning on, the planner actor plans over every live
worker, this node's and each member's (a device type per member, its
boundaries priced with the link measured to it), and a member ready or lost
wakes it to re-plan at once. With `--no-replan` placement is static:
`batching.cuts` fixes the splits and `cluster.split_hosts` the hosts whose
workers run each split; a split with no live worker on its hosts runs on the
coordinator's own workers.

The coordinator is the cluster's single point of entry: if it dies, requests
in flight die with it and members stop (member.py).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from aiohttp import web

from e3.planner.problem import Link as PlannerLink

from .cluster_auth import Challenges, ClusterAuthError, coordinator_proof, join_proof, proof_matches
from .config import E3Config
from .errors import WireError
from .link import Link, LinkClosedError, LinkKind
from .pipeline import Placement
from .remote_pool import ClusterPool, RemoteWorkerPool

log = logging.getLogger(__name__)

PING_BYTES = 1 << 20       # the bandwidth probe's payload
LINK_SAMPLES = 5           # link measurements kept per member (the best of them is priced)
MAX_LOST_SHOWN = 16


@dataclass(eq=False)
class MemberSession:
    """One member as the coordinator knows it."""

    member_id: int
    host: str
    link: Link
    joined_at: float                 # wall clock
    last_heard: float                # the loop's clock
    state: str = "joining"           # joining -> warming -> ready -> lost
    devices: list = field(default_factory=list)
    free_memory: int | None = None
    pool: RemoteWorkerPool | None = None
    latency_s: float | None = None
    bandwidth_bps: float | None = None
    lost_reason: str | None = None
    pings: dict = field(default_factory=dict)
    link_samples: list = field(default_factory=list)    # (latency s, bandwidth B/s), the latest last

    def link_cost(self) -> PlannerLink | None:
        """The link as the planner prices a message on it (planner/problem.py's Link): the measured
        one-way latency, plus its bytes at the measured bandwidth; None until measured."""
        if self.latency_s is None or self.bandwidth_bps is None:
            return None
        return PlannerLink(self.latency_s, 1.0 / self.bandwidth_bps)

    def view(self, now: float) -> dict:
        return {"member": self.member_id, "address": self.host, "state": self.state,
                "devices": self.devices, "free_memory_bytes": self.free_memory,
                "workers": sorted(self.pool.workers) if self.pool else [],
                "lease_age_s": round(now - self.last_heard, 3), "joined_at": self.joined_at,
                "link": {"latency_ms": None if self.latency_s is None else round(self.latency_s * 1e3, 3),
                         "bandwidth_mb_s": None if self.bandwidth_bps is None else round(self.bandwidth_bps / 1e6, 1),
                         "frames_sent": self.link.sent_frames, "frames_received": self.link.received_frames,
                         "measurements": len(self.link_samples)},
                **({"lost_reason": self.lost_reason} if self.lost_reason else {})}


class Coordinator:
    """Membership, leases and placement across members, beside a Runtime on a ClusterPool."""

    def __init__(self, config: E3Config, runtime, pool: ClusterPool, token: bytes,
                 clock: Callable[[], float] | None = None):
        self.config, self.runtime, self.pool, self._token = config, runtime, pool, token
        self.c = config.cluster
        self._clock = clock
        self.challenges = Challenges(self.c.challenge_ttl_s)
        self.sessions: dict[int, MemberSession] = {}
        self.lost: list[MemberSession] = []
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._replan_wanted = asyncio.Event()
        self._lease_task: asyncio.Task | None = None
        self._replan_task: asyncio.Task | None = None
        self._closing = False

    def now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    # -- lifecycle ---------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/e3/cluster/challenge", self.challenge)
        app.router.add_get("/e3/cluster/link", self.link)
        app.router.add_get("/e3/cluster", self.view)

    async def start(self) -> None:
        self._lease_task = asyncio.create_task(self._watch_leases(), name="e3-cluster-leases")
        self._replan_task = asyncio.create_task(self._replan_loop(), name="e3-cluster-replan")

    async def close(self) -> None:
        """Stop the lease watch and re-planning, and close links still open (the pool's stop
        closed those of members in service)."""
        self._closing = True
        for task in (self._lease_task, self._replan_task, *self._tasks):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._lease_task, self._replan_task, *self._tasks) if t),
                             return_exceptions=True)
        for s in list(self.sessions.values()):
            await s.link.close("the coordinator is stopping")

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- HTTP --------------------------------------------------------------

    async def challenge(self, request: web.Request) -> web.Response:
        return web.json_response({"challenge": self.challenges.issue()})

    def _refuse(self, status: int, message: str, remote) -> web.Response:
        log.warning("refused a join from %s (%d): %s", remote, status, message)
        self.runtime.metrics.cluster_event(f"refused_{status}")
        return web.json_response({"error": message}, status=status)

    async def link(self, request: web.Request) -> web.StreamResponse:
        h = request.headers
        challenge, proof, host, nonce = (h.get("X-E3-Challenge"), h.get("X-E3-Proof"), h.get("X-E3-Host"),
                                         h.get("X-E3-Nonce"))
        if not (challenge and proof and host and nonce):
            return self._refuse(401, "a join needs X-E3-Challenge, X-E3-Proof, X-E3-Host and X-E3-Nonce "
                                     "(the cluster token's proof)", request.remote)
        try:
            self.challenges.check(challenge)
        except ClusterAuthError as exc:
            return self._refuse(403, str(exc), request.remote)
        if not proof_matches(join_proof(self._token, challenge, host), proof):
            return self._refuse(403, "wrong cluster token", request.remote)
        if host != request.remote:
            return self._refuse(403, f"the member says it is {host!r} but connects from {request.remote!r}",
                                request.remote)
        if self._closing:
            return self._refuse(503, "the coordinator is stopping", request.remote)
        if len(self.sessions) >= self.c.max_members:
            return self._refuse(503, f"the cluster has {len(self.sessions)} members (cluster.max_members)",
                                request.remote)
        self.challenges.consume(challenge)
        ws = web.WebSocketResponse(max_msg_size=self.c.max_frame_bytes, autoping=True)
        await ws.prepare(request)
        member_id = next(self._ids)
        # The coordinator takes replies (DONE) in flight: at most what the member was sent.
        link = Link(ws, name=f"member-{member_id}@{host}", max_frame_bytes=self.c.max_frame_bytes,
                    recv_credits=2 * self.c.link_credits)
        session = MemberSession(member_id, host, link, time.time(), self.now())
        session.pings["nonce"] = nonce
        self.sessions[member_id] = session
        self.runtime.metrics.cluster_event("joined")
        log.info("member %d at %s connected", member_id, host)
        try:
            await link.run_until_closed(lambda hdr, t: self._on_frame(session, hdr, t))
        finally:     # the link ended, or the server stopped this handler
            if not link.closed.done():
                await link.close("the coordinator is stopping")
            self._lose(session, link.closed.result())
        return ws

    async def view(self, request: web.Request) -> web.Response:
        now = self.now()
        sc = self.config.server
        return web.json_response({
            "coordinator": {"address": sc.host, "workers": {str(i): w.device for i, w in self.pool.local.workers.items()}},
            "members": [s.view(now) for s in self.sessions.values()],
            "lost": [s.view(now) for s in self.lost],
            "epoch": self.runtime.epoch,
            "placement": self.runtime.placement.to_json() if self.runtime.placement else None,
            # members' device types left out of the plans for now, and why (planner/stragglers.py)
            "stragglers": self.runtime.planner.stragglers.view() if self.runtime.planner else {}})

    # -- frames --------------------------------------------------------------

    def _on_frame(self, s: MemberSession, header: dict, tensors: list) -> None:
        s.last_heard = self.now()
        kind = header["k"]
        if s.state == "joining":
            if kind != LinkKind.JOIN:
                raise WireError(f"a member's first frame must be JOIN, got {kind.name}")
            self._join(s, header)
        elif kind == LinkKind.READY and s.state == "warming":
            self._spawn(self._ready(s, header))
        elif kind == LinkKind.HEARTBEAT:
            s.free_memory = header.get("free_memory")
            s.link.send(LinkKind.HEARTBEAT)          # the member's lease on us
        elif kind == LinkKind.PONG:
            fut = s.pings.pop(header.get("seq"), None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif s.pool is not None:
            s.pool.on_frame(header, tensors)
        elif kind == LinkKind.FROM_WORKER and header.get("data"):
            s.link.grant(1)                          # a reply for a pool already given up

    def _join(self, s: MemberSession, header: dict) -> None:
        devices, credits = header.get("devices"), header.get("credits")
        if not isinstance(devices, list) or not isinstance(credits, int) or credits < 1:
            raise WireError(f"a JOIN needs devices (a list) and credits (a positive integer), got {header!r}")
        s.devices, s.free_memory = devices, header.get("free_memory")
        s.link.set_send_credits(credits)
        policy = self.runtime.policy
        s.link.send(LinkKind.JOINED, member=s.member_id, proof=coordinator_proof(self._token, s.pings.pop("nonce")),
                    lease_s=self.c.lease_s, heartbeat_s=self.c.heartbeat_s, credits=s.link.recv_credits,
                    policy=[policy.name, float(policy.threshold)], model=self.runtime.meta.name)
        s.state = "warming"
        self._spawn(self._measure(s))
        self._count()

    async def _measure(self, s: MemberSession) -> None:
        """The link's latency and bandwidth, for /e3/cluster and for pricing a cross-host boundary:
        measured at join, then every cluster.link_measure_s while the member stays. What is priced
        is the least latency and the most bandwidth of the last LINK_SAMPLES measurements: one
        taken while either end was busy (a member still starting its workers) reads slow."""
        seqs, first = itertools.count(), True
        while s.state not in ("lost", "left") and not s.link.closed.done():
            sample = await self._measure_once(s, seqs)
            if sample is not None:
                s.link_samples = (s.link_samples + [sample])[-LINK_SAMPLES:]
                s.latency_s = min(lat for lat, _ in s.link_samples)
                s.bandwidth_bps = max(bw for _, bw in s.link_samples)
                if first:
                    log.info("link to member %s: %.2f ms one way, %.0f MB/s", s.host, s.latency_s * 1e3,
                             s.bandwidth_bps / 1e6)
                if s.pool is not None:
                    s.pool.link_cost = s.link_cost()
                    if first:        # it was ready first: plan with the link now that it is measured
                        self._replan_wanted.set()
                first = False
            await asyncio.sleep(self.c.link_measure_s)

    async def _measure_once(self, s: MemberSession, seqs) -> tuple[float, float] | None:
        """(one-way latency: the least of 3 empty pings' half round trips; bandwidth: a 1 MiB ping's
        extra time, both ways), or None when the pings failed."""
        loop = asyncio.get_running_loop()

        async def ping(payload) -> float:
            seq, fut = next(seqs), loop.create_future()
            s.pings[seq] = fut
            start = time.perf_counter()
            s.link.send(LinkKind.PING, payload, seq=seq)
            async with asyncio.timeout(5.0):
                await fut
            return time.perf_counter() - start
        try:
            small = min([await ping(()) for _ in range(3)])
            big = await ping([torch.zeros(PING_BYTES, dtype=torch.uint8)])
        except (asyncio.TimeoutError, LinkClosedError) as exc:
            log.warning("measuring the link to member %s failed: %r", s.host, exc)
            return None
        return small / 2, 2 * PING_BYTES / max(big - small, 1e-6)

    async def _ready(self, s: MemberSession, header: dict) -> None:
        workers = header.get("workers")
        if not isinstance(workers, list) or not workers or not all(
                isinstance(w, dict) and isinstance(w.get("id"), int) and isinstance(w.get("device"), str) for w in workers):
            await s.link.close(f"a READY needs workers [{{id, device, threads}}], got {workers!r}")
            return
        pool = RemoteWorkerPool(s.host, s.link, workers, self.pool.ids, self.runtime.metrics,
                                self.config.workers.start_timeout_s)
        pool.link_cost = s.link_cost()
        s.pool = pool
        await self.pool.add(pool)
        if s.state in ("lost", "left"):          # the link closed while it was added
            pool.lose(s.lost_reason or "lost")
        else:
            s.state = "ready"
            log.info("member %d at %s is ready: workers %s", s.member_id, s.host, sorted(pool.workers))
        self._count()
        self._replan_wanted.set()

    # -- leases and losses -------------------------------------------------

    async def _watch_leases(self) -> None:
        while True:
            await asyncio.sleep(self.c.heartbeat_s)
            now = self.now()
            for s in list(self.sessions.values()):
                if now - s.last_heard > self.c.lease_s:
                    reason = f"its lease lapsed (unheard for {now - s.last_heard:.1f} s; cluster.lease_s {self.c.lease_s})"
                    self._lose(s, reason)
                    self._spawn(s.link.close(reason))

    def _lose(self, s: MemberSession, reason: str) -> None:
        """The member is gone: lost (its link broke, its lease lapsed), or left (it said goodbye,
        as a member stopping cleanly does). Either way its workers are gone for good."""
        if s.state in ("lost", "left"):
            return
        left = s.link.goodbye is not None
        if left:
            log.info("member %d at %s left: %s", s.member_id, s.host, reason)
        else:
            log.error("member %d at %s lost: %s", s.member_id, s.host, reason)
        s.state, s.lost_reason = ("left" if left else "lost"), reason
        self.sessions.pop(s.member_id, None)
        self.lost = (self.lost + [s])[-MAX_LOST_SHOWN:]
        if s.pool is not None:
            s.pool.lose(reason, quietly=left)
        self.runtime.metrics.cluster_event("left" if left else "lost")
        self._count()
        self._replan_wanted.set()

    def _count(self) -> None:
        states = {"lost": sum(s.state == "lost" for s in self.lost), "left": sum(s.state == "left" for s in self.lost)}
        for s in self.sessions.values():
            states[s.state] = states.get(s.state, 0) + 1
        self.runtime.metrics.cluster(states)

    # -- placement ---------------------------------------------------------

    def placement(self) -> Placement:
        """batching.cuts' splits on the hosts cluster.split_hosts names (all live workers
        without it); a split with no live worker there runs on this node's own workers."""
        from e3.models.executor import splits_from_cuts
        b = self.config.batching
        splits = splits_from_cuts(self.runtime.meta, b.cuts or [])
        live = [(i, getattr(w, "host", "local")) for i, w in self.pool.workers.items() if not getattr(w, "gone", False)]
        local = tuple(i for i, host in live if host == "local")
        per_split = []
        for k, _ in enumerate(splits):
            hosts = self.c.split_hosts[k] if self.c.split_hosts else None
            ids = tuple(i for i, host in live if hosts is None or host in hosts)
            per_split.append(ids or local)
        return Placement(b.batch or 8, tuple((s.first, s.last) for s in splits), tuple(per_split))

    async def _replan_loop(self) -> None:
        while True:
            await self._replan_wanted.wait()
            self._replan_wanted.clear()
            if self.runtime.planner is not None:       # it plans over every live member's workers
                self.runtime.planner.wake()
                continue
            placement = self.placement()
            current = self.runtime.placement
            if current is not None and (current.splits, current.workers) == (placement.splits, placement.workers):
                continue
            try:
                epoch = await self.runtime.apply(placement)
                log.info("cluster plan: epoch %d, workers per split %s", epoch, [list(w) for w in placement.workers])
            except Exception as exc:        # a member lost while its workers prepared: try again
                log.error("applying the cluster plan failed: %s; retrying in 1 s", exc)
                await asyncio.sleep(1.0)
                self._replan_wanted.set()
