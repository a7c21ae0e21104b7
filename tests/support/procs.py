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
