#!/usr/bin/env bash
# The prepared GPU check: build nanops against the machine's torch, run the CUDA cases of the
# test suite, the kernel smoke script (alone, and its kernel cases under compute-sanitizer's four
# tools with the caching allocator off), `nanops bench` on CUDA, and the seed-failure training
# (plain yolov5 train vs nanops train, AMP); one-screen summary at the end.
#
#   benchmarks/gpu/check.sh [all|part1|part2|recheck|profile] [--cpu]
#
# all (one device call of under 10 minutes): build; then, side by side on the GPU since none of
# them is timed, the CUDA tests, the smoke script, the four sanitizers and the seed training;
# then the benchmarks alone (timing, with NANOPS_BENCH_TIME_SCALE shortening the measuring
# windows). part1 (build, tests, smoke, sanitizers) and part2 (bench, seed) run the same steps
# one after another, for a second call on a warm machine. recheck: the guard tests, the four
# sanitizers and the seed training side by side, no benchmarks (a short call after fixes).
# profile: Nsight Compute over benchmarks/gpu/profile_cases.py (the missed targets), ncu.txt.
# Output: $OUT (default ./gpu-check-out): summary.txt and the files the summary names, at most
# 8, no deeper than two folders. The machine needs no network: wheels for yolov5/ultralytics and
# what its image lacks are prepared here by benchmarks/gpu/prepare.sh into .whl/ (ignored by git)
# and carried with the call. --cpu runs every step's plumbing on the CPU
# at small sizes (no build, no sanitizer): the test suite runs it so the check cannot rot.
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
PART=all
MODE=gpu
for arg in "$@"; do
  case $arg in
    part1|part2|all|recheck|profile) PART=$arg ;;
    --cpu) MODE=cpu ;;
    *) echo "check.sh: unknown argument $arg (all|part1|part2|recheck|profile, --cpu)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$ROOT/gpu-check-out}
WORK=$OUT/work
rm -rf "$WORK" "$OUT"/summary.txt "$OUT"/logs.tgz "$OUT"/bench-*.json "$OUT"/seed_training.json
mkdir -p "$WORK"
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
export PYTHONUNBUFFERED=1 YOLO_OFFLINE=1 NANOPS_CACHE=${NANOPS_CACHE:-/tmp/nanops-cache}
SITE=/tmp/nanops-site
STEPS=$WORK/steps.tsv

step() {  # step NAME TIMEOUT_S COMMAND...: runs it, logs it, records its status and time
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name ($(date +%T))"
  if declare -F "$1" > /dev/null; then  # a function of this script: `timeout` cannot run those
    "$@" > "$WORK/$name.log" 2>&1
  else
    timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  fi
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$STEPS"
  tail -n 3 "$WORK/$name.log"
  return $rc
}

environment() {
  { date -u; uname -a; nproc; nvidia-smi 2>&1 | head -15
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
  } > "$WORK/environment.log" 2>&1
}

install_wheels() {  # pure-Python wheels of yolov5 & co., setuptools apart (the build uses the image's)
  [ "$MODE" = cpu ] && { echo "CPU mode: .whl holds wheels for the GPU machine's Python; none installed"; return 0; }
  [ -d .whl ] || { echo "no .whl folder: yolov5 steps will be skipped where it is missing"; return 0; }
  local wheels
  wheels=$(ls .whl/*.whl 2>/dev/null | grep -v '/setuptools-')
  [ -n "$wheels" ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" $wheels
}

build() {
  if [ "$MODE" = cpu ]; then
    "$PY" -c "import nanops; print('nanops importable; CPU mode builds nothing')"
    return
  fi
  # A nanops/_C built elsewhere for this machine's Python and torch (benchmarks/gpu/prebuild.sh,
  # carried in .prebuilt/, which git ignores) saves the build's two minutes of device time when
  # it was built from these very sources and loads; else build here.
  if ls .prebuilt/_C.*.so >/dev/null 2>&1 && [ "$(cat .prebuilt/SOURCES.sha256 2>/dev/null)" = "$(bash benchmarks/gpu/source_hash.sh)" ]; then
    cp .prebuilt/_C.*.so nanops/ && "$PY" -c "import nanops; assert nanops.cuda_built(); print('prebuilt nanops._C loads, with CUDA kernels')" && return
    rm -f nanops/_C.*.so
  fi
  MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} NANOPS_CUDA=1 \
    timeout 400 "$PY" setup.py -q build_ext --inplace && "$PY" -c "import nanops; assert nanops.cuda_built(); print('built with CUDA kernels')"
}

use_site() {  # after the build: the wheels on the path, and pkg_resources if the image lacks it
  export PYTHONPATH=$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}
  if ! "$PY" -c "import pkg_resources" 2>/dev/null && ls .whl/setuptools-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/setuptools-*.whl
  fi
}

sanitizer() {  # sanitizer TOOL: compute-sanitizer over the quick smoke, the CUDA-graph case apart
  local tool=$1
  if [ "$MODE" = cpu ]; then
    echo "compute-sanitizer $tool: skipped on the CPU" > "$WORK/sanitizer-$tool.log"
    printf '%s\t%s\t%s\n' "sanitizer-$tool" skipped 0 >> "$STEPS"
    return
  fi
  # initcheck must see torch's kernels too: their writes are what makes nanops' inputs initialised
  # (summary.py counts the reports in nanops' kernels apart). The others watch nanops' alone.
  local filter="--kernel-name kns=nanops"
  [ "$tool" = initcheck ] && filter=""
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "sanitizer-$tool" "${SANITIZER_LIMIT:-200}" compute-sanitizer --tool "$tool" \
    $filter --print-limit 200 "$PY" benchmarks/gpu/smoke.py --quick --no-graph
}

sanitizers() {
  local tool
  for tool in memcheck racecheck synccheck initcheck; do sanitizer "$tool"; done
}

concurrently() {  # runs each quoted command line in the background; waits for all
  local pids=() line
  for line in "$@"; do
    eval "$line" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
}

prepare_machine() {  # what every one-call part starts with; fails when the build does
  environment
  step wheels 60 install_wheels
  step build 150 build || return 1
  use_site
}

all_at_once() {
  if [ "$MODE" = cpu ]; then part1; part2; return; fi  # the plumbing, one step after another
  prepare_machine || return
  local xdist=""
  "$PY" -c "import xdist" 2>/dev/null && xdist="-n 4"
  concurrently \
    "step tests 200 $PY -m pytest -q -p no:cacheprovider -o addopts='' $xdist -k cuda --junitxml $WORK/tests.xml tests" \
    "step smoke 200 $PY benchmarks/gpu/smoke.py --json $WORK/smoke.json" \
    "sanitizer memcheck" "sanitizer racecheck" "sanitizer synccheck" "sanitizer initcheck" \
    "step seed 200 $PY benchmarks/gpu/seed_training.py --out $WORK/seed"
  NANOPS_BENCH_TIME_SCALE=${NANOPS_BENCH_TIME_SCALE:-0.3} step bench 140 "$PY" benchmarks/run.py --out "$WORK/bench"
}

recheck() {  # after fixes, on a warm or fresh machine: the failed tests, sanitizers and seed run again
  prepare_machine || return
  local left=$(( ${RECHECK_SECONDS:-230} - SECONDS ))  # what the call has left, the build included
  SANITIZER_LIMIT=$left concurrently \
    "step tests $(( left < 120 ? left : 120 )) $PY -m pytest -q -p no:cacheprovider -o addopts='' -k cuda --junitxml $WORK/tests.xml tests/test_guard.py tests/test_guarded_step.py" \
    "sanitizer memcheck" "sanitizer racecheck" "sanitizer synccheck" "sanitizer initcheck" \
    "step seed $left $PY benchmarks/gpu/seed_training.py --out $WORK/seed --attention-input-scale probe"
}

profile() {  # Nsight Compute on the cases whose targets were missed (profile_cases.py)
  prepare_machine || return
  step ncu 300 ncu --clock-control none \
    --kernel-name "regex:softmax|SoftMax|non_finite|nonfinite|all_finite|multi_tensor" \
    --launch-skip 4 --launch-count 24 --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section LaunchStats "$PY" benchmarks/gpu/profile_cases.py
  cp "$WORK/ncu.log" "$OUT/ncu.txt" 2>/dev/null
}

part1() {
  environment
  step wheels 120 install_wheels
  step build 420 build
  use_site
  if [ "$MODE" = gpu ]; then
    step tests 300 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -k cuda --junitxml "$WORK/tests.xml" tests
  else
    step tests 120 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -k cuda --collect-only \
      tests/test_stable_softmax.py
  fi
  if [ "$MODE" = gpu ]; then
    step smoke 240 "$PY" benchmarks/gpu/smoke.py --json "$WORK/smoke.json"
  else
    step smoke 120 "$PY" benchmarks/gpu/smoke.py --device cpu --quick --json "$WORK/smoke.json"
  fi
  sanitizers
}

part2() {
  [ -f "$WORK/environment.log" ] || environment
  if [ "$PART" = part2 ]; then
    step wheels 120 install_wheels
    step build 420 build
    use_site
  fi
  if [ "$MODE" = gpu ]; then
    step bench 420 "$PY" benchmarks/run.py --out "$WORK/bench"
    step seed 420 "$PY" benchmarks/gpu/seed_training.py --out "$WORK/seed"
  else
    NANOPS_BENCH_DEVICE=cpu step bench 240 "$PY" benchmarks/run.py --only host --out "$WORK/bench"
    step seed 300 "$PY" benchmarks/gpu/seed_training.py --out "$WORK/seed" --device cpu --epochs 1 --img 64 \
      --images 8 --batch 4 --attention-input-scale 1
  fi
}

: > "$STEPS"
case $PART in
  part1) part1 ;;
  part2) part2 ;;
  all) all_at_once ;;
  recheck) recheck ;;
  profile) profile ;;
esac
"$PY" benchmarks/gpu/summary.py "$WORK" | tee "$OUT/summary.txt"
# What comes back from a device call: a few files, two folders deep at most.
for f in "$WORK"/bench/*/report.json "$WORK"/bench/*/host.json; do [ -f "$f" ] && cp "$f" "$OUT/bench-$(basename "$f")"; done
[ -f "$WORK/seed/seed_training.json" ] && cp "$WORK/seed/seed_training.json" "$OUT/"
tar czf "$OUT/logs.tgz" -C "$WORK" --exclude='data' --exclude='runs' --exclude='*.pt' . 2>/dev/null
rm -rf "$WORK"
ls "$OUT"
grep -q "^RESULT: PASS" "$OUT/summary.txt"
