"""The reliability suite, processes part: worker faults under load, Ctrl-C, a killed node.

Real nodes only: worker processes behind real HTTP (tests/e2e/test_node_processes.py's Node),
and `bin/e3-node` processes in sessions of their own, so that the test can signal a node's
whole process group as a terminal does. `pytest -m reliability` runs the suite alone.
"""
import asyncio
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest
from aiohttp import ClientError, ClientSession, TCPConnector

from e3.runtime.cli import request_body
from e3.runtime.examples import load_examples
from e3.runtime.slots import _shm_root
from tests.e2e.test_node_processes import Node, process_config, wait_for_restart
from tests.support.procs import live_processes

pytestmark = [pytest.mark.e2e, pytest.mark.reliability, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


async def paced_load(send, n: int, every_s: float) -> list:
    """`n` calls of `send(i)`, one every `every_s` seconds, each run to its end; their outcomes."""
    async def one(i):
        await asyncio.sleep(i * every_s)
        try:
            return await send(i)
        except (ClientError, OSError) as exc:
            return exc
    return await asyncio.gather(*(one(i) for i in range(n)))


async def test_a_killed_and_a_stopped_worker_under_load_cost_no_request(default_dir):
    """Worker 1 is SIGKILLed, then worker 0 SIGSTOPped, under 200 requests/s. Every request
    gets exactly one answer and it is a result: the killed worker's batches are retried, and
    the stopped one's are sent again to a live replica after the hedge time (0.25 s), well
    before their 2 s deadline (the watchdog's 10 s would cost them a 504; 2 s, not the default
    1 s, so that a 2-core machine shared with other work does not make it a test of speed).
    When the stopped worker wakes, its stale replies are dropped and what it held is given back."""
    inputs, _ = load_examples(default_dir, 64)
    async with Node(process_config(default_dir, [], batch=4, workers=3, timeout_ms=2000)) as node:
        rt = node.rt
        killed, stopped = rt.workers[1], rt.workers[0]

        async def faults():
            await asyncio.sleep(0.1)
            os.kill(killed.pid, signal.SIGKILL)
            await asyncio.sleep(0.4)
            os.kill(stopped.pid, signal.SIGSTOP)

        replies, _ = await asyncio.gather(
            paced_load(lambda i: node.infer(inputs[i % 64:i % 64 + 1]), 300, 0.005), faults())
        hedges = sum(p.hedges for p in rt.pipelines.values())
        estimates = [s.est_s for p in rt.pipelines.values() for s in p.stages]
        os.kill(stopped.pid, signal.SIGCONT)
        await wait_for_restart(node, killed)
        for _ in range(200):                  # the woken worker's stale replies come back
            if not any(p.holds_stale() for p in rt.pipelines.values()):
                break
            await asyncio.sleep(0.02)
        pools_in_use = [pool.in_use for p in rt.pipelines.values() for pool in p.pools]
        get = rt.metrics.registry.get_sample_value
        outcomes = {o: get("e3_inputs_total", {"outcome": o}) for o in ("admitted", "answered", "failed")}
        duplicates = get("e3_answers_dropped_total", {"why": "duplicate"})
        hedged = get("e3_worker_events_total", {"event": "hedged"})
        assert rt.workers[0] is stopped and stopped.alive, "woken in time, it is not killed"
    statuses = [r[0] if isinstance(r, tuple) else repr(r) for r in replies]
    assert statuses.count(200) == len(replies), (sorted(set(statuses)), statuses.count(200), hedges, estimates)
    assert hedges >= 1 and hedged == hedges        # and /metrics counts each
    assert not duplicates and outcomes["answered"] == outcomes["admitted"] == len(replies), outcomes
    assert pools_in_use == [0] * len(pools_in_use)


# -- bin/e3-node processes ------------------------------------------------------------------

def leftovers(pid: int) -> tuple[list[str], list[str], list[int]]:
    """What node `pid` left: ring files, socket directories, live processes of its group."""
    rings = sorted(p.name for p in _shm_root().glob(f"e3-{pid}-*"))
    sockets = sorted(p.name for p in Path(tempfile.gettempdir()).glob(f"e3-node-{pid}-*"))
    return rings, sockets, [p for p, _, group, _ in live_processes() if group == pid]


def wait_gone(pid: int, seconds: float = 15.0) -> list[int]:
    """The live processes of group `pid`, once none is left or `seconds` have passed."""
    deadline = time.monotonic() + seconds
    while (live := leftovers(pid)[2]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return live


class NodeProcess:
    """`bin/e3-node` in a session of its own (it leads a process group its children join),
    re-planning with its forecast process, as the README's first command runs it."""

    def __init__(self, env: dict):
        self.env = env

    async def start(self) -> "NodeProcess":
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "bin" / "e3-node"), "--model", "digits", "--port", "0", "--grpc-port", "0",
            "--workers", "2", "--no-demo-query", "--log-level", "WARNING", "--config", self.env["E3_TEST_CONFIG"],
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=self.env, start_new_session=True)
        self.seen = []
        while line := (await asyncio.wait_for(self.proc.stdout.readline(), 120)).decode():
            self.seen.append(line)
            if m := re.search(r"serving model '([^']+)' on (http://127\.0\.0\.1:\d+)", line):
                self.name, self.url = m.groups()
            if "Ctrl-C stops it" in line:
                return self
        await self.proc.wait()
        err = (await self.proc.stderr.read()).decode()
        raise AssertionError("the node did not start:\n" + "".join(self.seen) + err)

    def workers(self) -> list[int]:
        return [p for p, _, group, cmd in live_processes()
                if group == self.proc.pid and b"e3.runtime.worker_process" in cmd]

    async def kill(self) -> None:
        """SIGKILL it if it still runs: a test that fails midway must not leave a node that the
        event loop's close would wait on for ever."""
        if getattr(self, "proc", None) is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def finish(self) -> tuple[str, str]:
        """Its exit; everything it wrote."""
        out, err = await asyncio.wait_for(self.proc.communicate(), 60)
        return "".join(self.seen) + out.decode(), err.decode()


@pytest.fixture
def node_env(default_dir, tmp_path):
    config = tmp_path / "node.json"
    config.write_text('{"replan": {"interval_s": 0.5}}')
    return {**os.environ, "E3_CACHE": str(Path(default_dir).parents[1]), "E3_TEST_CONFIG": str(config)}


async def test_a_killed_node_orphans_nothing_and_the_next_one_sweeps_and_stops_cleanly_on_ctrl_c(
        default_dir, node_env):
    """A node SIGKILLed with one worker stopped (SIGSTOP: it would never see its socket close):
    no process outlives it; its rings and socket directory stay until the next node starts
    and sweeps them. That next node then gets SIGINT on its whole process group under load,
    as a terminal's Ctrl-C: every request it admitted is answered, nothing prints a
    traceback, and no process, ring or socket directory of it is left."""
    first, second = NodeProcess(node_env), NodeProcess(node_env)
    try:
        await _killed_then_ctrl_c(first, second, default_dir)
    finally:
        await first.kill()
        await second.kill()


async def _killed_then_ctrl_c(first: "NodeProcess", second: "NodeProcess", default_dir) -> None:
    await first.start()
    workers = first.workers()
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGSTOP)
    first.proc.kill()
    await first.proc.wait()
    assert wait_gone(first.proc.pid) == []
    rings, sockets, _ = leftovers(first.proc.pid)
    assert rings and sockets                        # a SIGKILLed node cannot clean up; the next one does

    await second.start()
    deadline = time.monotonic() + 10          # swept as the new node makes its first ring and socket
    while leftovers(first.proc.pid) != ([], [], []) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert leftovers(first.proc.pid) == ([], [], []), leftovers(first.proc.pid)
    inputs, _ = load_examples(default_dir, 64)
    # Closed-loop clients on kept-alive connections, which the node accepted before the signal:
    # a request written on one is read by the node, so it must be answered (200), or refused
    # (503) once the node stops admitting. (A connection still in the listen backlog when the
    # listener closes is reset without ever reaching the node: not an admitted request.)
    signalled, outcomes = asyncio.Event(), []
    async with ClientSession(connector=TCPConnector(limit=16)) as session:
        async def client(c):
            i = c
            while not signalled.is_set():
                try:
                    async with session.post(f"{second.url}/v2/models/{second.name}/infer",
                                            json=request_body(inputs[i % 64:i % 64 + 1])) as resp:
                        await resp.read()
                        outcomes.append(resp.status)
                except (ClientError, OSError) as exc:
                    outcomes.append(repr(exc))
                i += 16

        async def ctrl_c():
            await asyncio.sleep(1.0)
            os.killpg(second.proc.pid, signal.SIGINT)
            signalled.set()

        await asyncio.gather(*(client(c) for c in range(16)), ctrl_c())
    out, err = await second.finish()
    # every request gets an answer: a result, a refusal once the node stops admitting, or (on a slow
    # machine, an input whose deadline passed while the node drained) an explicit 504
    assert len(outcomes) >= 50 and set(outcomes) <= {200, 503, 504}, sorted(map(str, set(outcomes)))
    assert outcomes.count(200) >= 0.9 * len(outcomes)
    assert second.proc.returncode == 0, out + err
    assert "Traceback" not in out + err, out + err
    assert wait_gone(second.proc.pid) == [] and leftovers(second.proc.pid) == ([], [], [])


async def test_sigterm_to_the_whole_process_group_stops_the_node_cleanly(node_env):
    """A service manager's stop (systemd sends SIGTERM to every process of the unit): the workers
    and the forecast child leave shutdown to the node, so it drains and stops them itself: exit 0,
    no worker reported dead, no traceback, nothing left behind."""
    node = NodeProcess(node_env)
    try:
        await node.start()
        assert len(node.workers()) == 2
        os.killpg(node.proc.pid, signal.SIGTERM)
        out, err = await node.finish()
    finally:
        await node.kill()
    assert node.proc.returncode == 0, out + err
    assert "Traceback" not in out + err and " ERROR " not in out + err, out + err
    assert wait_gone(node.proc.pid) == [] and leftovers(node.proc.pid) == ([], [], [])
