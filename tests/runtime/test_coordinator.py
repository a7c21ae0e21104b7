"""A coordinator and a member in one process: joins refused or admitted, /e3/cluster, a split
run on the member's worker over a real link on 127.0.0.1, the member lost (stopped, or its lease
lapsed) and the plan moving off it. The workers are inline engines on the small MLP, so every
answer is compared exactly with the per-sample reference; tests/e2e/test_cluster.py runs real
node processes."""
import asyncio
import os
from pathlib import Path

import pytest
import torch
from aiohttp import ClientSession, web

from e3.models.policies import make_policy
from e3.models.registry import LoadedModel
from e3.runtime.cli import cluster_parts
from e3.runtime.cluster_auth import join_proof
from e3.runtime.config import E3Config
from e3.runtime.http import NodeRunner, make_app
from e3.runtime.member import JoinRefused, Member
from e3.runtime.planner_actor import planner_factory
from e3.runtime.runtime import Runtime
from tests.runtime.test_runtime_inline import INPUTS, reference
from tests.support.mlp import MLPModel

CUTS = (1, 3)
POLICY = ("patience", 2)


def token_file(tmp_path, name="token", text="0123456789abcdef" * 2):
    path = tmp_path / name
    path.write_text(text)
    os.chmod(path, 0o600)
    return str(path)


def loaded():
    return LoadedModel(MLPModel(), make_policy(*POLICY), Path("."))


class Coordinator:
    """A coordinator node (inline workers) behind a real HTTP server on 127.0.0.1."""

    def __init__(self, tmp_path, split_hosts=None, model=None):
        """`model`: a LoadedModel the planner plans for (re-planning on: no fixed cuts), else the MLP
        on a fixed plan."""
        c = E3Config()
        c.workers.mode, c.workers.cpu_workers = "inline", 1
        c.batching.slo_ms, c.batching.timeout_ms = 500, 30000
        c.batching.max_queue_delay_ms = c.batching.timeout_ms
        if model is None:
            c.batching.batch, c.batching.cuts = 8, list(CUTS)
            c.replan.enabled = False
        else:
            c.replan.interval_s = 3600            # ticks come from the cluster's changes
            # one batch size and a 100 ms SLO keep each solve (the queue model's chains) near a second
            c.replan.batch_sizes, c.batching.slo_ms = [8], 100
            c.replan.forecast_process = False
            c.replan.dispatch_ms, c.replan.measure_dispatch = 0.0, False     # compute alone: replicas pay
            c.replan.node_ms_per_request, c.replan.measure_node = 0.0, False
            c.replan.measure_compute = False
        c.cluster.token_file = token_file(tmp_path)
        c.cluster.split_hosts = split_hosts
        c.cluster.heartbeat_s, c.cluster.lease_s = 0.1, 5.0
        self.config = c.validate()
        pool, make = cluster_parts(self.config)
        self.rt = Runtime(self.config, model=model or loaded(), pool=pool,
                          planner_factory=None if model is None else planner_factory)
        self.coordinator = make(self.rt)

    async def __aenter__(self):
        await self.rt.start()
        await self.coordinator.start()
        app = make_app(self.rt)
        self.coordinator.add_routes(app)
        self.runner = NodeRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        self.http = ClientSession()
        return self

    async def __aexit__(self, *exc):
        await self.http.close()
        await self.rt.close()
        await self.coordinator.close()
        await self.runner.cleanup()

    async def cluster(self):
        async with self.http.get(f"{self.url}/e3/cluster") as resp:
            assert resp.status == 200
            return await resp.json()

    def member_workers(self) -> set:
        p = self.rt.placement
        return {i for ids in p.workers for i in ids if i >= 1000}


def member_config(url, tmp_path, token="token", **cluster):
    c = E3Config()
    c.workers.mode, c.workers.cpu_workers = "inline", 1
    c.server.host = "127.0.0.1"
    c.cluster.join, c.cluster.token_file = url, token_file(tmp_path, token, **({"text": cluster.pop("text")} if "text" in cluster else {}))
    c.cluster.heartbeat_s, c.cluster.lease_s = 0.1, 5.0     # margin for a loaded CI machine
    c.cluster.join_attempts, c.cluster.retry_delay_s = 2, 0.1
    for k, v in cluster.items():
        setattr(c.cluster, k, v)
    return c.validate()


async def until(predicate, timeout=20.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.02)


async def test_a_join_without_the_token_is_refused_and_allocates_nothing(tmp_path):
    async with Coordinator(tmp_path) as node:
        link = f"{node.url}/e3/cluster/link"
        async with node.http.get(link) as resp:
            assert resp.status == 401 and "X-E3-Proof" in (await resp.json())["error"]
        async with node.http.post(f"{node.url}/e3/cluster/challenge") as resp:
            challenge = (await resp.json())["challenge"]

        def headers(token=b"wrong-token-0123456789", host="127.0.0.1", ch=challenge):
            return {"X-E3-Challenge": ch, "X-E3-Proof": join_proof(token, ch, host), "X-E3-Host": host,
                    "X-E3-Nonce": "00"}
        async with node.http.get(link, headers=headers()) as resp:
            assert resp.status == 403 and (await resp.json())["error"] == "wrong cluster token"
        right = node.coordinator._token
        async with node.http.get(link, headers=headers(right, host="127.0.0.9")) as resp:
            assert resp.status == 403
            assert "says it is '127.0.0.9' but connects from '127.0.0.1'" in (await resp.json())["error"]
        async with node.http.get(link, headers=headers(right, ch="ab" * 40)) as resp:
            assert resp.status == 403 and "not issued by this coordinator" in (await resp.json())["error"]
        assert node.coordinator.sessions == {} and not node.coordinator.challenges._used
        assert (await node.cluster())["members"] == []
        metrics = node.rt.metrics.render().decode()
        assert 'e3_cluster_events_total{event="refused_401"} 1.0' in metrics
        assert 'e3_cluster_events_total{event="refused_403"} 3.0' in metrics


async def test_a_member_with_a_wrong_token_stops_at_once_with_the_reason(tmp_path):
    async with Coordinator(tmp_path) as node:
        member = Member(member_config(node.url, tmp_path, "other", text="another-token-0123456789"), model=loaded())
        stop = asyncio.get_running_loop().create_future()
        with pytest.raises(JoinRefused, match=r"refused the join \(403\): check --cluster-token-file"):
            await asyncio.wait_for(member.run(stop), 20)
        assert member.pool is None and node.coordinator.sessions == {}


async def test_a_member_given_another_model_stops_at_once_with_the_reason(tmp_path, e3_cache):
    from e3.models.registry import load_model, resolve
    async with Coordinator(tmp_path) as node:
        member = Member(member_config(node.url, tmp_path), model=load_model(resolve("digits")))
        stop = asyncio.get_running_loop().create_future()
        with pytest.raises(JoinRefused, match=r"serves model 'mlp' and this member 'digits-resnet': give every "
                                              r"node the same --model"):
            await asyncio.wait_for(member.run(stop), 60)
        assert member.pool is None
        await until(lambda: node.coordinator.sessions == {})


async def test_a_split_runs_on_the_member_and_answers_as_the_reference(tmp_path):
    async with Coordinator(tmp_path, split_hosts=[["local"], ["127.0.0.1"], ["local"]]) as node:
        member = Member(member_config(node.url, tmp_path), model=loaded())
        stop = asyncio.get_running_loop().create_future()
        running = asyncio.ensure_future(member.run(stop))
        try:
            await until(lambda: node.member_workers())
            placement = node.rt.placement
            assert placement.workers[0] == (0,) and placement.workers[2] == (0,)
            assert set(placement.workers[1]) == node.member_workers() == {1000}
            results = await node.rt.infer(INPUTS)
            assert [(r.label, r.exit_point) for r in results] == reference(POLICY, CUTS)
            view = await node.cluster()
            [m] = view["members"]
            assert m["address"] == "127.0.0.1" and m["state"] == "ready" and m["workers"] == [1000]
            assert m["devices"] == [{"kind": "cpu", "name": "cpu", "count": 1, "threads": 2}]
            assert 0 <= m["lease_age_s"] < 5 and m["free_memory_bytes"] > 0
            assert m["link"]["frames_sent"] > 0 and m["link"]["frames_received"] > 0
            await until(lambda: node.coordinator.sessions[m["member"]].latency_s is not None)
            view = await node.cluster()
            assert view["members"][0]["link"]["latency_ms"] > 0 and view["members"][0]["link"]["bandwidth_mb_s"] > 0
            # the member's mirror rings took this epoch's rows
            assert member._mirrors and all(os.path.exists(r.spec.path) for r in member._mirrors.values())
        finally:
            stop.set_result(None)
            await asyncio.wait_for(running, 20)
        assert member._mirrors == {}
        await until(lambda: not node.member_workers())
        view = await node.cluster()
        # it stopped cleanly: it left (said goodbye), which is no loss and logs no error
        assert view["members"] == [] and view["lost"][0]["state"] == "left"
        assert "it said goodbye (the member is stopping)" in view["lost"][0]["lost_reason"]
        metrics = node.rt.metrics.render().decode()
        assert 'e3_cluster_events_total{event="left"} 1.0' in metrics and 'event="lost"' not in metrics
        results = await node.rt.infer(INPUTS[:40])        # the plan moved back to this node
        assert [(r.label, r.exit_point) for r in results] == reference(POLICY, CUTS)[:40]


async def test_a_member_whose_lease_lapses_is_lost_and_its_batch_answered(tmp_path):
    async with Coordinator(tmp_path, split_hosts=[["local"], ["127.0.0.1"], ["local"]]) as node:
        member = Member(member_config(node.url, tmp_path, join_attempts=1), model=loaded())
        stop = asyncio.get_running_loop().create_future()
        running = asyncio.ensure_future(member.run(stop))
        try:
            await until(lambda: node.member_workers())
            await until(lambda: node.coordinator.sessions and all(
                s.latency_s is not None for s in node.coordinator.sessions.values()))
            node.coordinator.c.lease_s = 0.5      # short from now on (joining under load may take longer)
            # The member goes silent (a partition): its frames stop, its link stays open.
            worker = member.pool.workers[0]
            sent = worker.send
            worker.send = lambda kind, **f: None          # its worker swallows the batch, too
            member.link.send = lambda *a, **k: None
            answers = await asyncio.wait_for(asyncio.gather(
                node.rt.infer(INPUTS[:16]), return_exceptions=True), 20)
            worker.send = sent
            [outcome] = answers
            # rows that left at ramp 0 are answered; the batch that was on the member fails (no
            # other replica of split 1), and the safety net never had to answer it
            assert isinstance(outcome, Exception), outcome
            assert "lost with its member node" in str(outcome) or "died running split 1" in str(outcome), outcome
            await until(lambda: not node.member_workers())
            assert "lease lapsed" in (await node.cluster())["lost"][0]["lost_reason"]
        finally:
            if not stop.done():
                stop.set_result(None)
            await asyncio.gather(running, return_exceptions=True)


async def test_hot_swaps_between_the_member_and_this_node_lose_and_repeat_no_answer(tmp_path):
    async with Coordinator(tmp_path, split_hosts=[["local"], ["127.0.0.1"], ["local"]]) as node:
        member = Member(member_config(node.url, tmp_path), model=loaded())
        stop = asyncio.get_running_loop().create_future()
        running = asyncio.ensure_future(member.run(stop))
        try:
            await until(lambda: node.member_workers())
            on_member = node.rt.placement
            at_home = on_member.__class__(on_member.batch, on_member.splits, ((0,), (0,), (0,)))
            want = reference(POLICY, CUTS)

            async def load():
                return await asyncio.gather(*(node.rt.infer(INPUTS[i:i + 10]) for i in range(0, len(INPUTS), 10)))

            async def swaps():
                epochs = []
                for k in range(6):
                    epochs.append(await node.rt.apply(at_home if k % 2 == 0 else on_member))
                    await asyncio.sleep(0.01)
                return epochs
            batches, epochs = await asyncio.gather(load(), swaps())
            got = [(r.label, r.exit_point) for results in batches for r in results]
            assert got == want
            assert len({r.epoch for results in batches for r in results}) >= 2, "answers came from several epochs"
            assert epochs == sorted(epochs) and len(set(epochs)) == 6
            metrics = node.rt.metrics.render().decode()
            assert "e3_answers_dropped_total{" not in metrics      # none late, none twice
            await until(lambda: len(node.rt.pipelines) == 1)   # old epochs drained and retired on both nodes
            await until(lambda: len(member._mirrors) == len(node.rt.pipelines[node.rt.epoch].pools))
        finally:
            stop.set_result(None)
            await asyncio.wait_for(running, 20)


async def test_a_member_worker_that_dies_is_restarted_there_and_prepared_again_here(tmp_path):
    async with Coordinator(tmp_path, split_hosts=[["local"], ["127.0.0.1"], ["local"]]) as node:
        member = Member(member_config(node.url, tmp_path), model=loaded())
        stop = asyncio.get_running_loop().create_future()
        running = asyncio.ensure_future(member.run(stop))
        try:
            await until(lambda: node.member_workers())
            proxy = node.rt.workers[1000]
            dead = member.pool.workers[0]
            dead.alive = False
            member.pool._on_exit(dead)               # what the pool does when a worker process dies
            await until(lambda: node.rt.workers[1000] is not proxy and node.rt.workers[1000].alive)
            assert not proxy.alive and not proxy.gone           # lost for a while, not for good
            assert member.pool.workers[0] is not dead
            await until(lambda: node.rt.workers[1000] in node.rt.pipelines[node.rt.epoch].prepared)
            results = await node.rt.infer(INPUTS[:80])
            assert [(r.label, r.exit_point) for r in results] == reference(POLICY, CUTS)[:80]
            assert set(node.rt.placement.workers[1]) == {1000}
        finally:
            stop.set_result(None)
            await asyncio.wait_for(running, 20)


async def test_a_coordinator_that_stops_lets_its_member_go_and_the_member_stops_after_retries(tmp_path):
    from e3.runtime.member import CoordinatorLost
    node = Coordinator(tmp_path, split_hosts=[["local"], ["127.0.0.1"], ["local"]])
    await node.__aenter__()
    member = Member(member_config(node.url, tmp_path), model=loaded())
    running = asyncio.ensure_future(member.run(asyncio.get_running_loop().create_future()))
    try:
        await until(lambda: node.member_workers())
        results = await node.rt.infer(INPUTS[:40])
        assert [(r.label, r.exit_point) for r in results] == reference(POLICY, CUTS)[:40]
    finally:
        await asyncio.wait_for(node.__aexit__(None, None, None), 30)     # drains, says goodbye, stops
    with pytest.raises(CoordinatorLost, match=r"cannot be reached \(2 attempts"):
        await asyncio.wait_for(running, 30)
    assert member.pool is not None and not any(w.alive for w in member.pool.workers.values())
    assert member._mirrors == {} and member.link is None


async def test_the_planner_plans_over_a_members_workers_and_moves_off_it_when_it_is_lost(tmp_path, e3_cache):
    """Re-planning on: a ready member's worker is a device type of the coordinator's problem, on its
    host, behind the link measured to it, and profiled over that link. Its joining wakes the planner,
    which uses it (compute alone prices replicas, so more workers serve more); its loss wakes the
    planner again, which moves the plan back onto this node. Answers match the per-sample reference
    throughout."""
    from e3.models.executor import reference_forward
    from e3.models.registry import load_model, resolve
    from e3.planner.problem import Problem
    digits = load_model(resolve("digits"))
    inputs, _ = __import__("e3.runtime.examples", fromlist=["load_examples"]).load_examples(digits.path, 96)

    async def check(node):
        results = await node.rt.infer(inputs)
        plan = node.rt.planner.plan
        ref = reference_forward(digits.model, digits.policy, [torch.tensor(x) for x in inputs], plan.enabled_ramps)
        assert [(r.label, r.exit_point) for r in results] == [(a.label, a.exit_point) for a in ref]

    async with Coordinator(tmp_path, model=digits) as node:
        assert node.rt.planner.view()["devices"] == [
            {"name": "cpu-2t", "host": "local", "threads": 2, "workers": [0], "link": None}]
        await check(node)
        member = Member(member_config(node.url, tmp_path), model=load_model(resolve("digits")))
        stop = asyncio.get_running_loop().create_future()
        running = asyncio.ensure_future(member.run(stop))
        try:
            await until(lambda: node.member_workers(), timeout=60)
            view = node.rt.planner.view()
            remote = [d for d in view["devices"] if d["host"] != "local"]
            assert [(d["name"], d["workers"]) for d in remote] == [("cpu-2t@127.0.0.1", [1000])]
            assert remote[0]["link"]["transfer_fixed_s"] > 0 and remote[0]["link"]["transfer_s_per_byte"] > 0
            problem = Problem.from_json(view["problem"])
            assert [(d.name, d.host, d.count) for d in problem.devices] == [
                ("cpu-2t", "local", 1), ("cpu-2t@127.0.0.1", "127.0.0.1", 1)]
            assert problem.input_bytes > 0
            assert "devices changed" in view["last_solve"]["reason"]
            assert "cpu-2t@127.0.0.1" in {g.device for g in node.rt.planner.plan.groups}
            await check(node)
        finally:
            stop.set_result(None)
            await asyncio.wait_for(running, 20)
        await until(lambda: not node.member_workers(), timeout=30)       # covered at once ...
        await until(lambda: {g.device for g in node.rt.planner.plan.groups} == {"cpu-2t"}, timeout=30)  # re-planned
        view = node.rt.planner.view()
        assert [d["host"] for d in view["devices"]] == ["local"]
        assert [e["reason"].split(":")[0] for e in view["swaps"]][-2:] == ["cover", "devices changed"]
        await check(node)


async def test_a_member_whose_batches_straggle_is_planned_without_until_its_probation_ends(tmp_path, e3_cache):
    """The member's worker reports 20 times the compute its profile predicts (scripted: its splits'
    measured busy time is scaled) for the set intervals in a row: it is left out of the plan, which
    moves onto this node's worker; /e3/cluster and /metrics say so. When its probation ends it is
    profiled afresh and planned with again."""
    from e3.models.registry import load_model, resolve
    digits = load_model(resolve("digits"))
    inputs, _ = __import__("e3.runtime.examples", fromlist=["load_examples"]).load_examples(digits.path, 96)
    async with Coordinator(tmp_path, model=digits) as node:
        planner = node.rt.planner
        now = [0.0]
        planner.stragglers.clock = lambda: now[0]
        # Inline workers profile on the loop both nodes share here, for seconds: leases long enough
        node.coordinator.c.lease_s = 60.0
        member = Member(member_config(node.url, tmp_path, lease_s=60.0), model=load_model(resolve("digits")))
        stop = asyncio.get_running_loop().create_future()
        running = asyncio.ensure_future(member.run(stop))
        try:
            await until(lambda: node.member_workers(), timeout=60)
            await asyncio.sleep(0.2)
            planner._task.cancel()            # from here only this test ticks (no wake-driven tick between)
            planner.stragglers.intervals = 2
            planner.watch.intervals = 10 ** 6     # the plan watch's own fall back is another test's

            def slow_member(pipeline):
                real = pipeline.take_stats

                def scaled():
                    st = real()
                    st.busy_s = [b * (20.0 if all(w >= 1000 for w in ids) else 1.0)
                                 for b, ids in zip(st.busy_s, pipeline.placement.workers)]
                    return st
                pipeline.take_stats = scaled
            slow_member(node.rt.pipelines[node.rt.epoch])
            for _ in range(2):
                for x in inputs * 3:            # one at a time: a batch each, at every split it reaches
                    await node.rt.infer([x])    # (enough batches even where few inputs survive)
                await planner.tick()
            assert not node.member_workers(), "the plan left the straggler"
            view = await node.cluster()
            [(name, why)] = view["stragglers"].items()
            assert name == "cpu-2t@127.0.0.1" and "its profile for 2 intervals" in why["why"] and why["ratio"] > 3
            assert view["members"][0]["state"] == "ready", "excluded from plans, still a member"
            assert 'e3_cluster_events_total{event="straggler"} 1.0' in node.rt.metrics.render().decode()
            assert planner.view()["stragglers"] and [d["host"] for d in planner.view()["devices"]] == ["local"]
            results = await node.rt.infer(inputs)
            assert len(results) == len(inputs)

            now[0] += node.config.cluster.straggler_probation_s       # probation over
            await planner.tick()
            assert node.member_workers(), "profiled afresh and planned with again"
            assert (await node.cluster())["stragglers"] == {}
        finally:
            stop.set_result(None)
            await asyncio.wait_for(running, 20)


async def test_a_members_link_is_measured_again_and_priced_at_its_best(tmp_path):
    """The link is measured at join and every cluster.link_measure_s after; what the planner is given
    is the least latency and the most bandwidth of the last few measurements."""
    from e3.runtime.coordinator import LINK_SAMPLES
    async with Coordinator(tmp_path, split_hosts=[["local"], ["127.0.0.1"], ["local"]]) as node:
        node.coordinator.c.link_measure_s = 0.05
        member = Member(member_config(node.url, tmp_path), model=loaded())
        stop = asyncio.get_running_loop().create_future()
        running = asyncio.ensure_future(member.run(stop))
        try:
            await until(lambda: node.member_workers())
            [s] = node.coordinator.sessions.values()
            await until(lambda: len(s.link_samples) == LINK_SAMPLES)
            assert s.latency_s == min(lat for lat, _ in s.link_samples)
            assert s.bandwidth_bps == max(bw for _, bw in s.link_samples)
            assert s.pool.link_cost.fixed_s == s.latency_s and s.pool.link_cost.s_per_byte == 1 / s.bandwidth_bps
            assert (await node.cluster())["members"][0]["link"]["measurements"] == LINK_SAMPLES
        finally:
            stop.set_result(None)
            await asyncio.wait_for(running, 20)
