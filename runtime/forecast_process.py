"""The node's side of the planning process (planner/forecast_server.py): forecasts and re-solves.

A plain child process (`python3 -m e3.planner.forecast_server`) fed JSON lines over
pipes: started once, restarted on the next call after it dies or stalls. Not a
multiprocessing pool: spawn re-imports the parent's main module in the child, which
for a script such as bin/e3-node meant starting a second node in every forecast
process; and the pool pickled the forecaster, where a JSON state says what crosses.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys

from e3.planner.forecast import Forecast, Forecaster
from e3.planner.options import Options
from e3.planner.plan import Plan
from e3.planner.problem import Problem

from .errors import ForecastProcessError

log = logging.getLogger(__name__)


def _one_thread_env() -> dict:
    """The child's environment with one BLAS / OpenMP thread: its fits are small, and threads that
    spin-wait beside the workers on the same cores slow both (a 200x200 solve: 0.5 ms on one
    thread, 130 ms on two beside a busy process, measured on the 2-core machine)."""
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class ForecastProcess:
    """Fits forecasts in a child process, one request at a time."""

    def __init__(self, start_timeout_s: float = 60.0, fit_timeout_s: float = 30.0):
        self.start_timeout_s, self.fit_timeout_s = start_timeout_s, fit_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Start the child and wait until it has imported statsmodels (about 1-2 s)."""
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "e3.planner.forecast_server",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=_one_thread_env())
        hello = await self._read(self.start_timeout_s, "start")
        if hello != {"ready": True}:
            await self.close()
            raise ForecastProcessError(f"the forecast process said {hello!r} instead of ready")

    async def forecast(self, forecaster: Forecaster) -> Forecast:
        out = await self._call({"op": "forecast", "state": forecaster.fit_state()}, self.fit_timeout_s, "a fit")
        return Forecast(**out)

    async def options(self, problem: Problem, running: Plan | None, with_solve: bool) -> Options:
        """The DP's plan (if `with_solve`), the baselines and the running plan's value under `problem`
        (planner/options.py), computed in the child."""
        out = await self._call({"op": "options", "problem": problem.to_json(), "solve": with_solve,
                                "running": None if running is None else running.to_json()},
                               self.fit_timeout_s, "a solve")
        return Options.from_json(out)

    async def value(self, problem: Problem, plan: Plan) -> dict:
        """The cost model's valuation of `plan` under `problem`, term by term, computed in the child."""
        return await self._call({"op": "value", "problem": problem.to_json(), "plan": plan.to_json()},
                                self.fit_timeout_s, "a valuation")

    async def _call(self, request: dict, timeout_s: float, what: str) -> dict:
        async with self._lock:
            if self._proc is None or self._proc.returncode is not None:
                await self.start()
            self._proc.stdin.write(json.dumps(request).encode() + b"\n")
            try:
                await self._proc.stdin.drain()
            except ConnectionError as exc:
                await self.close()
                raise ForecastProcessError(f"the forecast process is gone: {exc}") from None
            out = await self._read(timeout_s, what)
        if "error" in out:
            raise ForecastProcessError(f"the forecast process failed: {out['error']}")
        return out

    async def _read(self, timeout_s: float, what: str) -> dict:
        try:
            async with asyncio.timeout(timeout_s):
                line = await self._proc.stdout.readline()
        except asyncio.TimeoutError:
            await self.close()
            raise ForecastProcessError(f"the forecast process took over {timeout_s:.0f} s for {what}") from None
        if not line:
            code = await self._proc.wait()
            self._proc = None
            raise ForecastProcessError(f"the forecast process exited (code {code}) during {what}")
        try:
            return json.loads(line)
        except ValueError:
            await self.close()
            raise ForecastProcessError(f"the forecast process wrote {line[:80]!r}, not JSON") from None

    async def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.stdin.close()            # it exits at the end of its input
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
