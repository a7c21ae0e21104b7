"""The planning process: `python3 -m e3.planner.forecast_server`, started by a node's planner.

statsmodels' ARIMA fit holds the GIL for 60-86 ms per interval (5 ramps, 2 cores), and a
re-solve with the queue (the DP, the baselines, the chain solves) 0.15-0.9 s, so a node runs
both in this child process, scheduled only on CPU the node leaves (SCHED_IDLE), instead of on
a thread beside its event loop. The protocol is one JSON line per request on stdin, tagged by
"op": "forecast" with a `Forecaster.fit_state()` (answered with a `Forecast.to_json()`), or
"options" with a problem, the running plan and whether to solve (answered with
planner/options.py's `Options.to_json()`), or "value" with a problem and a plan (answered with
the cost model's valuation of it, term by term); an answer that failed is `{"error": ...}`. Nothing
is pickled, and the node's own main module is never imported here (multiprocessing's spawn
would re-run a script such as bin/e3-node in the child).

Lifetime: the node decides when this process stops, by closing its stdin (it drains its
own work first), so the terminal's SIGINT, which reaches the whole process group, is
ignored here. The end of stdin is also how it notices its node died, even by SIGKILL: the
node holds the only write end of that pipe. A node gone mid-fit leaves nobody to answer;
the process then exits quietly.
"""
from __future__ import annotations

import json
import os
import signal
import sys

from .cost_model import value
from .forecast import Forecaster
from .options import options_for
from .plan import Plan
from .problem import Problem


def answer(line: str) -> dict:
    try:
        request = json.loads(line)
        op = request.get("op")
        if op == "forecast":
            return Forecaster.from_fit_state(request["state"]).forecast().to_json()
        if op == "options":
            return _options(request)
        if op == "value":
            return value(Problem.from_json(request["problem"]), Plan.from_json(request["plan"])).to_json()
        return {"error": f"unknown op {op!r} (known: forecast, options, value)"}
    except Exception as exc:       # a bad request is answered, and the process goes on
        return {"error": f"{type(exc).__name__}: {exc}"}


def _options(request: dict) -> dict:
    running = None if request.get("running") is None else Plan.from_json(request["running"])
    return options_for(Problem.from_json(request["problem"]), running, bool(request["solve"])).to_json()


def _background() -> None:
    """Run only on CPU the node and its workers leave: SCHED_IDLE where Linux has it, else nice 19."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(19)


def main() -> int:
    # the node stops us (it closes our stdin) after a Ctrl-C or SIGTERM sent to its whole group
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # yield the CPU to the workers running batches beside it: a digits re-solve is 0.2-0.9 s of a core,
    # and at nice 19 a solve during a probe still cost answers at 600 req/s on 2 cores (see
    # bench/results/planner_cost_digits_2x1_stock*.md for the node before and after)
    _background()
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr        # whatever a library prints must not corrupt the protocol
    try:
        Forecaster.warm()
        out.write(json.dumps({"ready": True}) + "\n")
        out.flush()
        for line in sys.stdin:
            out.write(json.dumps(answer(line)) + "\n")
            out.flush()
    except BrokenPipeError:        # the node is gone: nobody reads the answer
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())   # so the exit flush cannot fail
    return 0


if __name__ == "__main__":
    sys.exit(main())
