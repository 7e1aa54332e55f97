#!/usr/bin/env bash
# Everything a lent GPU machine should run, as ONE command of about 6-7 minutes.
#
#   bash benchmarks/gpu_session.sh [--dry-run] [OUT]        (OUT defaults to $OUT)
#
# Steps, in priority order; each writes its results into OUT as soon as they exist, each
# runs under its own `timeout` (capped by what is left of the session's budget), so a
# timeout loses only the tail:
#
#   1 preflight   versions (Python, CuPy, cuda.core, cuda-bindings, dask, dask-cuda,
#                 tifffile, zarr...), device name, driver, CUDA; gpufusion's GPU check.
#                 Stops the session (exit 3) if something required is missing.
#   2 probe       copy bandwidth H2D/D2H (pinned) and D2D; one block's fusion kernel time
#   3 gpu tests   the `gpu`-marked tests only (-m gpu -v); CI runs the CPU kernel checks
#   4 bench_gpu   kernel effective bandwidth / copy bandwidth; resident fusion vs NumPy
#                 on all cores
#   5 slide       write the whole slide's tiles (GPUFUSION_WSI_TILES, default 600 x 2048^2)
#   6 wsi cupy    the whole slide on CuPy, every pyramid level checked against NumPy's
#   7 wsi numpy   the same on NumPy, same machine
#   8 register    GPU registration of the slide, then CPU, if time remains
#
# Results in OUT (8 files at most, what the device tool brings back):
#   summary.txt     one line per step as it ends (status, seconds, key figures); read first
#   preflight.txt   steps 1 and 2: versions, device, probe figures
#   gpu_tests.log   step 3
#   bench_gpu.json  step 4 (pytest-benchmark)
#   wsi_cupy.json, wsi_numpy.json, register.json   steps 6-8 (pytest-benchmark)
#   session.log     everything else: staging, the logs of steps 4-8
# pytest-benchmark writes its JSON when its run ends, so the whole-slide cases also print
# their end-to-end time and pyramid check into session.log the moment they are known.
#
# The GPU machines (DESIGN.md) have Python 3.12, CuPy, NumPy, SciPy, tifffile, pytest,
# pytest-benchmark, cuda.core and cuda-bindings but no dask/zarr stack and no network.
# Once per checkout, here:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl dask==2026.7.1 distributed==2026.7.1 \
#     dask-cuda==26.10.0 partd locket zict tblib tornado zarr==3.1.6 numcodecs==0.16.6 \
#     donfig google-crc32c
#
# (about 13 MiB; add cucim-cu13==26.10.0, about 17 MiB, for the cuCIM comparison in
# bench_register.py). Then, with the device tool: carry [".whl"], timeout_s 600, and
#
#   bash benchmarks/gpu_session.sh "$OUT"
#
# --dry-run: the same steps here, on the host-emulated device (tests/host_emulation,
# through benchmarks/emulated_gpu.py) with a scaled-down slide (GPUFUSION_WSI_TILES=4),
# small benchmark sizes, this checkout's .venv (or $PYTHON) and no wheels. It checks the
# script and every step's plumbing; none of its figures is a GPU's.
#
# Environment: GPUFUSION_SESSION_SECONDS (budget for all steps; default 420, dry run 1500),
# GPUFUSION_WSI_TILES, PYTHON.
set -uo pipefail

usage() {
  echo "usage: bash benchmarks/gpu_session.sh [--dry-run] [OUT]   (OUT defaults to \$OUT)" >&2
  exit 2
}
DRY=0
POSITIONAL=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) usage ;;
    -*) echo "gpu_session.sh: unknown option $arg" >&2; usage ;;
    *) POSITIONAL+=("$arg") ;;
  esac
done
[ "${#POSITIONAL[@]}" -le 1 ] || usage
OUT=${POSITIONAL[0]:-${OUT:-}}
[ -n "$OUT" ] || usage
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2  # absolute: the steps change folder
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONUNBUFFERED=1

SUMMARY=$OUT/summary.txt
LOG=$OUT/session.log
: > "$SUMMARY"
: > "$LOG"
say() { echo "$*" | tee -a "$SUMMARY"; }

if [ "$DRY" = 1 ]; then
  BUDGET=${GPUFUSION_SESSION_SECONDS:-1500}
  PY=${PYTHON:-$REPO/.venv/bin/python}
  WORK=$(mktemp -d /tmp/gpufusion-dry-run.XXXXXX)
  export GPUFUSION_WSI_TILES=${GPUFUSION_WSI_TILES:-4}
  export GPUFUSION_BENCH_GRID=${GPUFUSION_BENCH_GRID:-2x2} GPUFUSION_BENCH_TILE=${GPUFUSION_BENCH_TILE:-512}
  export GPUFUSION_BENCH_COPY_MIB=${GPUFUSION_BENCH_COPY_MIB:-16} GPUFUSION_PROBE_MIB=${GPUFUSION_PROBE_MIB:-16}
  export GPUFUSION_PROBE_TILE=${GPUFUSION_PROBE_TILE:-512}
else
  BUDGET=${GPUFUSION_SESSION_SECONDS:-420}
  PY=${PYTHON:-python3}
  WORK=/tmp/gpufusion-session
  export GPUFUSION_WSI_TILES=${GPUFUSION_WSI_TILES:-600}
fi
SRC=$WORK/src
SITE=$WORK/site
export GPUFUSION_WSI_DIR=$WORK/wsi
START=$SECONDS
left() { echo $(( BUDGET - (SECONDS - START) )); }

say "gpufusion GPU session $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ "$DRY" = 1 ] && echo ' DRY RUN on the host-emulated device: no figure here is a GPU'"'"'s') budget ${BUDGET}s, slide ${GPUFUSION_WSI_TILES} tiles"

# ---------------------------------------------------------------------- staging
# gpufusion itself is not installed: building it needs setuptools >= 77 (PEP 639 license),
# which the machine may lack, with no network to fetch it. The sources are staged in the
# wheel's layout (kernels/ as gpufusion/kernels, where the code loads the .cu files from)
# and everything runs from there; the wheels go to $SITE (pip --target, no index).
{
  rm -rf "$WORK/src" && mkdir -p "$SRC" "$SITE" || exit 1
  cp -r "$REPO"/pyproject.toml "$REPO"/gpufusion "$REPO"/tests "$REPO"/benchmarks "$SRC"/ || exit 1
  rm -rf "$SRC"/gpufusion/kernels && cp -r "$REPO"/kernels "$SRC"/gpufusion/kernels || exit 1
  if [ "$DRY" = 0 ]; then
    if compgen -G "$REPO/.whl/*.whl" > /dev/null; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$REPO"/.whl/*.whl || exit 1
    else
      echo "no wheels in $REPO/.whl (carry [\".whl\"]): the preflight will say what is missing"
    fi
  fi
} >> "$LOG" 2>&1
if [ $? -ne 0 ]; then
  say "FAILED staging (sources or wheels); see session.log"
  tail -20 "$LOG"
  exit 1
fi
cd "$SRC" || exit 1
export PYTHONPATH=$SITE:$SRC
if [ "$DRY" = 1 ]; then
  RUN=("$PY" "$SRC/benchmarks/emulated_gpu.py")  # every Python step on the emulated device
else
  RUN=("$PY")
fi
# pyproject.toml turns warnings into errors; a third-party warning on the GPU machine's
# stack (dask-cuda, CuPy) would then fail a test and waste the session: here they are
# shown in the logs (-W default) instead.
PYTEST=("${RUN[@]}" -m pytest -p no:cacheprovider -W default)

# step NAME CAP LOGFILE CMD...: run CMD under `timeout` (CAP, or what is left of the budget
# if less), appending its output to LOGFILE and to stdout; one summary line when it ends.
LAST_RC=0
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local limit
  limit=$(left)
  [ "$limit" -gt "$cap" ] && limit=$cap
  if [ "$limit" -lt 15 ]; then
    say "SKIPPED $name: the session's budget is spent"
    LAST_RC=125
    return 0
  fi
  local t0=$SECONDS
  echo "===== $name (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$log"
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
  LAST_RC=${PIPESTATUS[0]}
  local spent=$(( SECONDS - t0 )) status
  case "$LAST_RC" in
    0) status=ok ;;
    124|137) status="TIMEOUT after ${limit}s"; echo | tee -a "$log" ;;  # end the cut line
    *) status="FAILED (exit $LAST_RC)" ;;
  esac
  echo "===== $name: $status, ${spent}s" | tee -a "$log"
  say "$(printf '%-10s %-22s %4ss' "$name" "$status" "$spent")"
}

# the lines of LOGFILE (from its last "===== NAME" header on) that match PATTERN
figures() {
  awk -v h="===== $1 " 'index($0, h) == 1 {buf = ""} {buf = buf $0 "\n"} END {printf "%s", buf}' \
    "$2" | grep -E "$3" | sed 's/^/    /' | tee -a "$SUMMARY"
}

# ---------------------------------------------------------------------- 1, 2: the machine
step preflight 90 "$OUT/preflight.txt" "${RUN[@]}" benchmarks/gpu_probe.py preflight
figures preflight "$OUT/preflight.txt" '^(python|CuPy|dask-cuda|device|driver_CUDA|runtime_CUDA|nvrtc|gpufusion|nvidia-smi|PREFLIGHT)'
if [ "$LAST_RC" -ne 0 ]; then
  say "stopping: the preflight failed (see preflight.txt); nothing after it could run"
  exit 3
fi
step probe 90 "$OUT/preflight.txt" "${RUN[@]}" benchmarks/gpu_probe.py probe
figures probe "$OUT/preflight.txt" '^(probe|HOST)'

# ---------------------------------------------------------------------- 3: gpu tests
# Only the files with gpu-marked tests are collected, and a module that fails to import
# (an optional package the GPU machine lacks) does not stop the others; a test that hangs
# (a device deadlock) is failed after 90 s where pytest-timeout is installed (the GPU
# machine has it), so the rest still run.
mapfile -t GPU_TEST_FILES < <(grep -l -E 'mark\.gpu' tests/test_*.py)
[ "${#GPU_TEST_FILES[@]}" -gt 0 ] || GPU_TEST_FILES=(tests/)
PER_TEST=()
"$PY" -c "import pytest_timeout" 2> /dev/null && PER_TEST=(--timeout 90)
step gpu-tests 170 "$OUT/gpu_tests.log" "${PYTEST[@]}" -m gpu -v -rfEs --durations=10 \
  --continue-on-collection-errors "${PER_TEST[@]}" "${GPU_TEST_FILES[@]}"
figures gpu-tests "$OUT/gpu_tests.log" '[0-9]+ (passed|failed|errors?)|no tests ran|^(FAILED|ERROR) '

# ---------------------------------------------------------------------- 4: bench_gpu
step bench_gpu 120 "$LOG" "${PYTEST[@]}" -q -rfEs benchmarks/bench_gpu.py \
  --benchmark-json="$OUT/bench_gpu.json"
figures bench_gpu "$LOG" '[0-9]+ (passed|failed|errors?)|^(FAILED|ERROR) '
[ -s "$OUT/bench_gpu.json" ] && "$PY" benchmarks/gpu_probe.py summarize "$OUT/bench_gpu.json" \
  2>&1 | sed 's/^/    /' | tee -a "$SUMMARY"

# ---------------------------------------------------------------------- 5-7: whole slide
step slide 150 "$LOG" "${RUN[@]}" benchmarks/gpu_probe.py slide "$GPUFUSION_WSI_TILES" \
  "$GPUFUSION_WSI_DIR"
for backend in cupy numpy; do
  cap=$([ "$backend" = cupy ] && echo 200 || echo 150)
  step "wsi-$backend" "$cap" "$LOG" "${PYTEST[@]}" -q -s -rfEs benchmarks/bench_wsi.py \
    -k "test_whole_slide_fuse and $backend" --benchmark-json="$OUT/wsi_$backend.json"
  figures "wsi-$backend" "$LOG" '^(whole slide|pyramid check)|[0-9]+ (passed|failed|errors?)|^(FAILED|ERROR) '
  [ -s "$OUT/wsi_$backend.json" ] && "$PY" benchmarks/gpu_probe.py summarize \
    "$OUT/wsi_$backend.json" 2>&1 | sed 's/^/    /' | tee -a "$SUMMARY"
done

# ---------------------------------------------------------------------- 8: registration
step register 200 "$LOG" "${PYTEST[@]}" -q -s -rfEs \
  "benchmarks/bench_wsi.py::test_whole_slide_register[cupy]" \
  "benchmarks/bench_wsi.py::test_whole_slide_register[numpy]" \
  --benchmark-json="$OUT/register.json"
figures register "$LOG" '[0-9]+ (passed|failed|errors?)|^(FAILED|ERROR) '
[ -s "$OUT/register.json" ] && "$PY" benchmarks/gpu_probe.py summarize "$OUT/register.json" \
  2>&1 | sed 's/^/    /' | tee -a "$SUMMARY"

say "session done in $(( SECONDS - START ))s; results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo
echo "----- summary.txt"
cat "$SUMMARY"
