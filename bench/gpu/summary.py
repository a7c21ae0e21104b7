"""Fold run.sh's step records into one summary.json, and say whether every step is wired.

    python3 -m bench.gpu.summary --steps DIR --out OUTDIR [--dry-run]

DIR holds what run.sh's steps left: steps.tsv (name, exit status, milliseconds,
limit, note per line), versions.json, nvidia-smi.txt, ipc_probe.json and
pytest.xml (JUnit). OUTDIR holds the result files the steps wrote. The
summary carries each step's status, the versions, the GPU test outcome, the
CUDA IPC probe's outcome (with the exact error if refused), the IPC hop rows
and the GPU goodput ratios, and lists the expected files that are missing.
Exit status 1 when a step failed or an expected file is missing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

STEPS = ("versions", "install", "pytest_gpu", "ipc_probe", "ipc_hop", "goodput_gpu", "llm")


def read_steps(path: Path) -> list[dict]:
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            name, rc, ms, limit, *note = line.split("\t")
            out.append({"step": name, "rc": int(rc), "seconds": round(int(ms) / 1000, 1), "limit_s": int(limit),
                        "timed_out": int(rc) in (124, 137), "note": note[0] if note else ""})
    return out


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def pytest_outcome(path: Path) -> dict | None:
    """Counts and the names of failed or skipped tests, from pytest's JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    out = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skips": []}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            out["failed"] += 1
            out["failures"].append({"test": name, "message": (bad.get("message") or "")[:1500]})
        elif skip is not None:
            out["skipped"] += 1
            out["skips"].append({"test": name, "reason": (skip.get("message") or "")[:300]})
        else:
            out["passed"] += 1
    return out


def ipc_hop_rows(out: Path) -> dict | None:
    files = sorted(out.glob("ipc_hop_*.json"))
    data = _json(files[0]) if files else None
    if data is None:
        return None
    cell = lambda m: m if isinstance(m, str) else round(m["median_us"], 1)
    return {"file": files[0].name, "device": data["device"],
            "median_us": [{"batch": r["batch"], "shm": cell(r["shm"]), "cuda": cell(r["cuda"]),
                           "msg_only": cell(r["msg_only"])} for r in data["rows"]]}


def goodput(out: Path) -> dict | None:
    data = _json(out / "goodput_gpu.json")
    if data is None:
        return None
    return {"label": data["label"], "dry_run": data["dry_run"], "ratios": data["ratios"],
            "goodput": {mix: {name: {"measured": r.get("goodput"), "predicted": (r.get("predicted") or {}).get("goodput"),
                                     "batch": r.get("batch")} for name, r in systems.items()}
                        for mix, systems in data["runs"].items()},
            "skipped": data["skipped"], "errors": data["errors"], "replay_match": data["replay_match"]}


def expected_files(out: Path) -> list[str]:
    return ["run.log", "goodput_gpu.json", "goodput_gpu.md", "ipc_hop_*.json", "ipc_hop_*.md"]


def missing(out: Path, steps_dir: Path) -> list[str]:
    gone = [p for p in expected_files(out) if not list(out.glob(p))]
    gone += [f"(steps) {p}" for p in ("versions.json", "ipc_probe.json", "pytest.xml") if not (steps_dir / p).is_file()]
    return gone


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.gpu.summary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--wall-s", type=float)
    a = p.parse_args(argv)
    steps_dir, out = Path(a.steps), Path(a.out)
    steps = read_steps(steps_dir / "steps.tsv")
    smi = steps_dir / "nvidia-smi.txt"
    summary = {"dry_run": a.dry_run, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "wall_s": a.wall_s, "command": "bash bench/gpu/run.sh" + (" --dry-run" if a.dry_run else ""),
               "steps": steps, "versions": _json(steps_dir / "versions.json"),
               "nvidia_smi": smi.read_text().splitlines() if smi.is_file() else None,
               "pytest_gpu": pytest_outcome(steps_dir / "pytest.xml"),
               "cuda_ipc": _json(steps_dir / "ipc_probe.json"),
               "ipc_hop": ipc_hop_rows(out), "goodput_gpu": goodput(out)}
    names = [s["step"] for s in steps]
    summary["missing_steps"] = [s for s in STEPS if s not in names]
    summary["missing_files"] = missing(out, steps_dir)
    summary["failed_steps"] = [s["step"] for s in steps if s["rc"] != 0]
    summary["ok"] = not (summary["missing_steps"] or summary["missing_files"] or summary["failed_steps"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"summary: {'all steps ok' if summary['ok'] else 'PROBLEMS'}; failed steps {summary['failed_steps']}, "
          f"missing steps {summary['missing_steps']}, missing files {summary['missing_files']}; "
          f"wrote {out / 'summary.json'}", flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
