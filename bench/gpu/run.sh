#!/usr/bin/env bash
# E3's GPU evidence in one command (issue 14): bench/gpu/README.md says how to run it on a lent device.
#
#   bash bench/gpu/run.sh             # on a GPU machine: every step, about 6-8 minutes
#   bash bench/gpu/run.sh --dry-run   # on a CPU: checks every step is wired, in under a minute
#
# Results land in $OUT if set, else bench/results/gpu/ (dry run: a temporary folder). Each step runs
# under its own time limit, so one that fails or hangs does not cost the rest; each step's exit status,
# seconds and limit go into summary.json. Exit status 1 when any step failed or a result is missing.
set -u
cd "$(dirname "$0")/../.." || exit 2
ROOT=$PWD
DRY=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY=1 ;;
  *) echo "usage: bash bench/gpu/run.sh [--dry-run]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}          # the device's python3 holds its CUDA torch; the tests pass their own
if [ -n "${OUT:-}" ]; then RESULTS=$OUT
elif [ $DRY = 1 ]; then RESULTS=$(mktemp -d -t e3-gpu-dry-run.XXXXXX)
else RESULTS=$ROOT/bench/results/gpu; fi
mkdir -p "$RESULTS" || exit 2
RESULTS=$(cd "$RESULTS" && pwd)
STEPS=$(mktemp -d -t e3-gpu-steps.XXXXXX)
LOG=$RESULTS/run.log
: >"$LOG"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 E3_LOG_LEVEL=WARNING
export E3_CACHE=${E3_CACHE:-$STEPS/e3-cache}     # a fresh cache: no stale model or profile from elsewhere
STARTED=$(date +%s)

say() { echo "$*" | tee -a "$LOG"; }

# record NAME RC MILLISECONDS LIMIT_S NOTE: one line of steps.tsv
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >>"$STEPS/steps.tsv"; }

# The limits fit one H200 run inside the device call's ~540 s. The dry run's steps do far less, but a
# shared 2-core CI machine can be slow to import torch: there they get three times as long.
SCALE=1; [ $DRY = 1 ] && SCALE=3

# step NAME LIMIT_S COMMAND: run COMMAND (a bash string) under `timeout`, its output to the log and stdout.
step() {
  local name=$1 limit=$(( $2 * SCALE )) cmd=$3 t0 rc
  t0=$(date +%s%N)
  say "=== step $name (limit ${limit}s): $cmd"
  timeout -k 5 "$limit" bash -c "$cmd" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && say "=== step $name: TIMED OUT after ${limit}s"
  say "=== step $name: exit $rc"
  record "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" "$limit" "${NOTE:-}"
  NOTE=
}
export PY STEPS RESULTS ROOT DRY

# 1. The machine and versions.
step versions 20 '
  if command -v nvidia-smi >/dev/null; then nvidia-smi >"$STEPS/nvidia-smi.txt" 2>&1; cat "$STEPS/nvidia-smi.txt"
  else echo "nvidia-smi: not on this machine" | tee "$STEPS/nvidia-smi.txt"; fi
  commit=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || cat "$ROOT/bench/gpu/COMMIT" 2>/dev/null || echo unknown)
  dirty=$(git -C "$ROOT" status --porcelain 2>/dev/null | wc -l)
  COMMIT=$commit DIRTY=$dirty "$PY" - <<EOF
import json, os, platform, sys
import torch
v = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
     "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
     "commit": os.environ["COMMIT"], "uncommitted_files": int(os.environ["DIRTY"] or 0),
     "cpus": os.cpu_count(), "kernel": platform.release()}
for name in ("transformers", "aiohttp", "msgpack", "uvloop", "numpy", "pytest", "pytest_asyncio", "setuptools", "wheel"):
    try:
        v[name] = __import__(name).__version__
    except Exception as exc:
        v[name] = f"absent ({type(exc).__name__})"
json.dump(v, open(os.environ["STEPS"] + "/versions.json", "w"), indent=1, default=str)
print(json.dumps(v, default=str))
EOF'

# 2. The project, installed without network, and pytest-asyncio from the wheel that travels with the tree.
#    The install's outcome decides PYTHONPATH for the later steps, so it runs in this shell.
install() {
  local t0 rc=0 note
  t0=$(date +%s%N)
  say "=== step install (limit 60s)"
  if "$PY" -c "import e3.runtime, e3.models, e3.planner" >/dev/null 2>&1; then
    note="e3 already importable"
  elif [ $DRY = 1 ]; then
    note="e3 not importable"; rc=1
  elif timeout -k 5 45 "$PY" -m pip install --no-index --no-deps --no-build-isolation -e "$ROOT" >>"$LOG" 2>&1 \
       && "$PY" -c "import e3.runtime" >/dev/null 2>&1; then
    note="pip install -e (offline)"
  else
    note="pip install -e failed; PYTHONPATH namespace fallback"
  fi
  # The fallback (also built in the dry run, to check it): e3.* as a namespace of links to the code folders,
  # which is what setup.cfg's package_dir makes; a bare PYTHONPATH=$ROOT would not give e3.runtime.
  local ns=$STEPS/e3-namespace
  mkdir -p "$ns/e3" && for pkg in models planner runtime; do ln -sfn "$ROOT/$pkg" "$ns/e3/$pkg"; done
  if ! PYTHONPATH="$ns:$ROOT" NS="$ns" "$PY" -c "import os, e3.runtime.cuda_ring, e3.models.bert, e3.planner.dp as m
assert m.__file__.startswith(os.environ['NS']), m.__file__" >>"$LOG" 2>&1; then
    note="$note; the namespace fallback does not import"; rc=1
  elif [ "${note#pip install -e failed}" != "$note" ]; then
    export PYTHONPATH="$ns:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ! "$PY" -c "import pytest_asyncio" >/dev/null 2>&1; then
    if [ $DRY = 1 ]; then note="$note; pytest-asyncio absent"; rc=1
    elif timeout -k 5 30 "$PY" -m pip install --no-index --no-deps bench/gpu/wheels/pytest_asyncio-*.whl >>"$LOG" 2>&1; then
      note="$note; pytest-asyncio from bench/gpu/wheels"
    else note="$note; pytest-asyncio did not install"; rc=1; fi
  fi
  [ -f bench/gpu/wheels/pytest_asyncio-1.5.0-py3-none-any.whl ] || { note="$note; the pytest-asyncio wheel is missing"; rc=1; }
  say "$note"
  say "=== step install: exit $rc"
  record install "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" 60 "$note"
}
install

# 3. The GPU tests (every test file with a `gpu` mark); they skip without a GPU, as in the dry run.
step pytest_gpu 100 '
  files=$(grep -rlE "mark\.gpu|pytest\.mark\.gpu" tests --include="test_*.py" | sort)
  echo "files: $files"
  "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider --junitxml="$STEPS/pytest.xml" $files'

# 4. CUDA IPC: does it work here (the exact error if not), then the hop benchmark with its CUDA column.
step ipc_probe 40 '"$PY" -m bench.gpu.ipc_probe --out "$STEPS/ipc_probe.json"'
if [ $DRY = 1 ]; then HOP="--repeats 5 --warmup 1 --batches 1,4"; else HOP="--batches 1,4,16,64"; fi
# Where the probe found CUDA IPC refused, the CUDA column cannot be measured: the shared-memory path on the
# GPU (a device-to-host and a host-to-device copy per hop) still is.
grep -q '"ok": false' "$STEPS/ipc_probe.json" 2>/dev/null && HOP="$HOP --no-cuda-ring"
step ipc_hop 50 "\"\$PY\" -m bench.ipc_hop $HOP --out \"\$RESULTS/ipc_hop\""

# 5. GPU goodput: stock vs ee-batch vs e3 at 80:20 and 20:80 (timing only: random weights, replayed exits).
if [ $DRY = 1 ]; then GOOD="--dry-run"; else GOOD="--budget-s 190"; fi
step goodput_gpu 240 "\"\$PY\" -m bench.gpu.goodput_gpu $GOOD --out \"\$RESULTS\""

# 6. The LLM benchmark.
NOTE="not yet: issue 13 has not landed"
step llm 5 'echo "llm: not yet: issue 13 (early-exit LLM generation) has not landed"'

timeout -k 5 15 "$PY" -m bench.gpu.summary --steps "$STEPS" --out "$RESULTS" --wall-s $(( $(date +%s) - STARTED )) \
  $([ $DRY = 1 ] && echo --dry-run) 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "results in $RESULTS"
rm -rf "$STEPS"
exit "$rc"
