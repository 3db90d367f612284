#!/usr/bin/env bash
# One prepared device check: every accelerator benchmark in one call, each JSON file written as
# soon as its benchmark ends, so whoever has a GPU (or TPU) for a few minutes measures everything.
#
#   bash benchmarks/device_check.sh             # writes docs/benchmarks/<benchmark>-<device>.json
#   bash benchmarks/device_check.sh /tmp/bench  # writes /tmp/bench/<benchmark>-<device>.json
#
# On an accelerator (under 8 minutes in all; each benchmark has its own time limit, and one that
# reaches it keeps the cases it finished in its JSON, marked "complete": false):
#   pretrain  the train step of resnet18, resnet50 and vit_s16 at 224, batch 256, bfloat16
#   nmtune    the NMTune step at D = 512 and 2048, and the K = 16 grid against 16 fits at D = 64
#   clip      the CLIP RN50 train step at 224, batch 256, bfloat16
#   features  frozen-encoder feature extraction, resnet50 and vit_s16 at 224, batch 512
#   text_features  text-encoder feature extraction, BERT-Large at 128 tokens, batch 256, bfloat16
#   input     the ImageNet input pipeline with one worker process per core
# With no accelerator it runs a short version of itself: the same scripts and sections at toy
# sizes (seconds of measuring; start-up and compilation are most of its time), written to $1 or
# to a fresh temporary folder, never docs/benchmarks/ (whose CPU files come from the commands their
# tables show in docs/performance.md). tests/test_benchmarks.py runs it.
#
# Environment: PYTHON, a Python with nmjax's dependencies (default: .venv/bin/python where it
# exists, else python3); a benchmark whose imports fail is reported and the others still run;
# NMJAX_BENCHMARK_COMMIT, the commit to record where the tree is not a git checkout;
# DEVICE_CHECK_SECONDS, the whole check's time limit on an accelerator (default 465).
# Exit status: 0 when every benchmark wrote its complete JSON, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
# The tree's nmjax, whether or not that Python has it installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
START=$(date +%s)
# "<backend> <device>": jax's default backend and its device kind as file names spell it.
read -r backend device < <("$PY" -c 'import sys; sys.path.insert(0, "benchmarks")
import jax, provenance
print(jax.default_backend(), provenance.slug(jax.devices()[0].device_kind))' 2>/dev/null)
if [ -z "${device:-}" ]; then
  echo "device_check: $PY cannot import jax" >&2
  exit 1
fi
cores=$(nproc)

if [ "$backend" = "cpu" ]; then
  out=${1:-$(mktemp -d -t nmjax-device-check.XXXXXX)}
  BUDGET=${DEVICE_CHECK_SECONDS:-600}
else
  out=${1:-docs/benchmarks}
  BUDGET=${DEVICE_CHECK_SECONDS:-465}
fi
mkdir -p "$out"
echo "device_check: $backend ($device), $cores cores, writing to $out" >&2

failed=()
# bench NAME LIMIT_SECONDS [ENV=VALUE ...] -- ARGS...: runs benchmarks/NAME.py under the smaller
# of LIMIT_SECONDS and what is left of BUDGET, then checks that it wrote $out/NAME-$device.json
# afresh and complete.
bench() {
  local name=$1 limit=$2 envs=()
  shift 2
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  local left=$((BUDGET - ($(date +%s) - START)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    echo "device_check: $name skipped, the time budget is spent" >&2
    failed+=("$name (skipped)")
    return
  fi
  local began=$(date +%s)
  echo "device_check: $name (at most ${limit}s)" >&2
  env ${envs[@]+"${envs[@]}"} timeout --kill-after=10 "$limit" "$PY" "benchmarks/$name.py" "$@" \
      --out "$out/" >"$out/$name.log" 2>&1
  local rc=$?
  local complete
  complete=$("$PY" -c 'import json, os, sys
path, began = sys.argv[1], int(sys.argv[2])
fresh = os.path.exists(path) and os.path.getmtime(path) >= began
print(json.load(open(path)).get("complete") is True if fresh else "not written")' \
      "$out/$name-$device.json" "$began")
  echo "device_check: $name rc $rc, $(($(date +%s) - began))s, complete: $complete" >&2
  if [ "$rc" -ne 0 ] || [ "$complete" != "True" ]; then
    failed+=("$name (rc $rc, complete: $complete; see $out/$name.log)")
    tail -n 5 "$out/$name.log" >&2
  fi
}

if [ "$backend" = "cpu" ]; then
  bench pretrain 120 -- --models resnet_small --batch 8 --steps 1
  bench nmtune 180 -- --sections step,grid --grid-dims 64 --grid-rows 256 --dims 64 \
      --steps 2 --repeats 1
  bench clip 120 -- --models clip_small --batch 8 --steps 1
  bench features 120 -- --models resnet_small --batch 16 --examples 64 --repeats 1 --steps 1
  bench text_features 120 -- --model bert_tiny --length 32 --batch 4 --examples 8 --repeats 1 \
      --steps 1
  bench input 120 -- --images 8 --large_images 2 --batch 4 --batches 2 --rounds 1 \
      --workers 1 --threads_in_process "" --headline_workers 1
else
  bench pretrain 140 -- --steps 10
  # The parent process measures the step; the grid runs in fresh child processes beside it on
  # the same device, so none may take most of its memory up front.
  bench nmtune 90 XLA_PYTHON_CLIENT_PREALLOCATE=false -- --sections step,grid --grid-dims 64 \
      --grid-rows 10000 --dims 512,2048 --steps 20 --repeats 3
  bench clip 65 -- --models clip_rn50 --steps 5
  bench features 45 -- --examples 8192 --repeats 1
  bench text_features 50 -- --model bert_large --batch 256 --examples 4096 --repeats 1
  bench input 60 -- --images 128 --batches 20 --rounds 1 --workers "$cores" \
      --threads_in_process "" --headline_workers "$cores"
fi

echo "device_check: $(($(date +%s) - START))s in all; JSON in $out" >&2
if [ "${#failed[@]}" -gt 0 ]; then
  printf 'device_check: incomplete: %s\n' "${failed[@]}" >&2
  exit 1
fi
