"""A worker process: loads the model on its device, then runs a plain loop.

    python -m e3.runtime.worker_process --connect SOCK --worker 0 --model DIR ...

It connects to the node's Unix socket, says HELLO, and then answers one
message at a time until STOP or the node goes away. Compute never shares a
process with the node's event loop.

Signals: the node alone decides when a worker stops (it drains first), so a
worker ignores the terminal's SIGINT. It still dies with its node: on Linux
the kernel sends it SIGKILL when the node exits (PR_SET_PDEATHSIG), which
also reaches a worker that is stopped (SIGSTOP) or deep in a batch and would
not notice its socket closing; elsewhere the closed socket ends its loop.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import sys

from .wire import BlockingChannel, Kind

log = logging.getLogger("e3.worker")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="e3-worker", description=__doc__)
    p.add_argument("--connect", required=True, help="the node's Unix socket")
    p.add_argument("--worker", type=int, required=True, help="this worker's id")
    p.add_argument("--call", type=int, required=True, help="the call id to echo in HELLO (the node's start of us)")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU workers)")
    p.add_argument("--policy", required=True)
    p.add_argument("--threshold", type=float, required=True)
    p.add_argument("--node-pid", type=int, help="the node's pid: exit at once if it is already gone")
    return p.parse_args(argv)


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None) -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux; elsewhere a no-op).

    The parent may have died before the call: then our parent is already someone else."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    if parent_pid is not None and os.getppid() != parent_pid:
        sys.exit(0)


def serve(args: argparse.Namespace) -> int:
    import torch  # imported here so that --help is instant

    from e3.models.registry import load_model
    from .engine import WorkerEngine
    from .heap import freeze_heap

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    loaded = load_model(args.model, device=device, policy=args.policy, threshold=args.threshold)
    engine = WorkerEngine(loaded.model, loaded.policy, device)
    freeze_heap()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(args.connect)
    except OSError as exc:         # the node stopped while this worker loaded its model
        print(f"e3-worker {args.worker}: the node is gone ({exc.strerror}); exiting", file=sys.stderr)
        return 1
    chan = BlockingChannel(sock)
    try:
        chan.send(Kind.HELLO, call=args.call, worker=args.worker, pid=os.getpid(), device=device)
        while (msg := chan.recv()) is not None and msg["k"] != Kind.STOP:
            reply = engine.handle(msg)
            if reply is not None:
                chan.send(reply.pop("k"), **reply)
    except (BrokenPipeError, ConnectionResetError):
        pass                       # the node went away mid-batch: nothing left to answer
    finally:
        engine.close()
        sock.close()
    return 0


def resolve_device(name: str) -> str:
    """The worker's device with an index ("cuda" means the current GPU), made current for CUDA.

    The index matters: CUDA rings name the device their memory is on, and
    torch.cuda.set_device refuses a CUDA device without one.
    """
    import torch
    device = torch.device(name)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return str(device)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("E3_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s worker %(process)d %(levelname)s %(message)s")
    # The node owns shutdown: a Ctrl-C in the terminal (SIGINT) or a service manager's stop
    # (systemd's SIGTERM to the whole control group) reaches every process, and the node must be
    # the one to drain and stop us. We die with the node whatever happens (die_with_parent).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    args = parse_args(sys.argv[1:] if argv is None else argv)
    die_with_parent(args.node_pid)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
