"""A bound on how long a node takes to stop once it is told to.

Every step of a node's shutdown has its own bound (the drain's 10 s, 5 s for each worker
and the planning process to exit, the listener's shutdown timeout), so a stop that outlives
all of them is a bug: something swallowed its cancel or waits on what never comes. A
service manager would SIGKILL the node without a word; this says what was still running,
then ends the process. Workers die with it (PR_SET_PDEATHSIG) and the next start sweeps
its shared-memory rings and socket directory.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Callable

log = logging.getLogger("e3.node")

STOP_TIMEOUT_S = 45.0       # above the sum of the shutdown's own bounds (about 30 s)
EXIT_CODE = 70              # EX_SOFTWARE: an internal fault, not the signal that asked for the stop


class StopWatchdog:
    """Armed when a stop begins; past `timeout_s`, logs every task's stack and calls `exit`."""

    def __init__(self, timeout_s: float = STOP_TIMEOUT_S, exit: Callable[[int], None] = os._exit):
        self.timeout_s, self._exit = timeout_s, exit
        self._timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        log.error("the node did not stop within %.0f s of being told to; still running:\n%s",
                  self.timeout_s, running_tasks())
        print(f"e3-node: error: stopping took over {self.timeout_s:.0f} s; exiting without finishing "
              "(the log names what was still running)", file=sys.stderr, flush=True)
        self._exit(EXIT_CODE)


def running_tasks(frames: int = 6) -> str:
    """Every unfinished task of the running loop, each with the innermost `frames` of the chain
    of coroutines it awaits (Task.get_stack shows only the outermost one)."""
    lines = []
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            chain = " <- ".join(reversed(_awaiting(task.get_coro())[-frames:]))
            lines.append(f"  task {task.get_name()}: {chain}")
    return "\n".join(sorted(lines))


def _awaiting(coro) -> list[str]:
    """`coro` and what it awaits, outermost first, as 'function (file:line)'."""
    out = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            out.append(f"{frame.f_code.co_name} ({frame.f_code.co_filename}:{frame.f_lineno})")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return out
