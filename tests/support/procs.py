"""Live processes read from /proc, for tests that check nothing outlives a node."""
from pathlib import Path


def live_processes() -> list[tuple[int, int, int, bytes]]:
    """(pid, ppid, process group, command line) of every process not dead; a zombie is dead,
    only not yet reaped."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # after "(comm)": state, ppid, pgrp
            state, ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if state != "Z":
            out.append((int(stat.parent.name), int(ppid), int(pgrp), cmd))
    return out


def stop_node(proc, sig: int, timeout_s: float) -> tuple:
    """Send `sig` and wait for the node to end: (stdout, stderr) as communicate() gives them.

    A node still running after `timeout_s` is killed with its process group and the test fails
    saying so: left running, it outlived its test and failed the next one as a stray process."""
    import os
    import signal
    import subprocess
    proc.send_signal(sig)
    try:
        return proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the node did not stop within {timeout_s:.0f} s of {signal.Signals(sig).name}:\n"
                             f"{out}\n{err}") from None
