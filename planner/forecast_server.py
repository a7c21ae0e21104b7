"""The forecast process: `python3 -m e3.planner.forecast_server`, started by a node's planner.

statsmodels' ARIMA fit holds the GIL for 60-86 ms per interval (5 ramps, 2 cores), so a node
fits in this child process at nice 10 instead of on a thread beside its event loop. The
protocol is one JSON line per request on stdin (a `Forecaster.fit_state()`) and one JSON
line per answer on stdout (a `Forecast.to_json()`, or `{"error": ...}`); nothing is pickled,
and the node's own main module is never imported here (multiprocessing's spawn would re-run
a script such as bin/e3-node in the child).

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

from .forecast import Forecaster


def answer(line: str) -> dict:
    try:
        return Forecaster.from_fit_state(json.loads(line)).forecast().to_json()
    except Exception as exc:       # a bad request is answered, and the process goes on
        return {"error": f"{type(exc).__name__}: {exc}"}


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(10)                    # yield the CPU to the workers running batches beside it
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
