#!/usr/bin/env bash
# Everything a lent GPU machine should run, in two calls of at most 10 minutes each.
#
# The GPU machines (DESIGN.md) have Python 3.12, CuPy, NumPy, SciPy, tifffile, pytest and
# pytest-benchmark but no dask/zarr stack and no network. Once per checkout, here:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl dask==2026.7.1 distributed==2026.7.1 \
#     dask-cuda==26.10.0 partd locket zict tblib tornado zarr==3.1.6 numcodecs==0.16.6 \
#     donfig google-crc32c
#
# (about 13 MiB; everything else they need is on the machine already). Add
# cucim-cu13==26.10.0 (about 17 MiB) for the cuCIM phase-correlation comparison in
# bench_register.py. Then, with the device tool, carry [".whl"] and run
#
#   bash benchmarks/gpu_session.sh tests    # GPU test suite + kernel/bandwidth benchmarks
#   bash benchmarks/gpu_session.sh wsi      # 600-tile whole slide, CPU and GPU
#
# Logs and pytest-benchmark JSON land in $OUT; copy the figures into benchmarks/RESULTS.md
# with the date, device, command and the versions in $OUT/versions.txt.
set -uo pipefail
stage=${1:-tests}
OUT=${OUT:-/tmp/gpufusion-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)  # absolute: the runs below change folder
export PYTHONUNBUFFERED=1
REPO=$PWD

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$REPO"/.whl/*.whl || exit 1

# gpufusion itself is not installed: building it needs setuptools >= 77 (PEP 639 license),
# which the machine may lack, with no network to fetch it. Instead the sources are staged in
# the wheel's layout (kernels/ as gpufusion/kernels, what the code loads the .cu files from)
# and everything runs from there; `python3 -m gpufusion` stands in for the console script.
SRC=/tmp/gpufusion-src
rm -rf "$SRC" && mkdir -p "$SRC" || exit 1
cp -r "$REPO"/pyproject.toml "$REPO"/gpufusion "$REPO"/tests "$REPO"/benchmarks "$SRC"/ || exit 1
rm -rf "$SRC"/gpufusion/kernels && cp -r "$REPO"/kernels "$SRC"/gpufusion/kernels || exit 1
cd "$SRC" || exit 1
export PYTHONPATH=/tmp/site:$SRC
python3 -c "import gpufusion.backends.cuda_kernels as ck; assert ck.kernel_names()" || exit 1

{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 - <<'EOF'
import platform
import cupy, dask, distributed, numpy, scipy, tifffile, zarr
import gpufusion.bench as b
print("python", platform.python_version(), "| cpu", b.cpu_name())
for m in (cupy, numpy, scipy, dask, distributed, zarr, tifffile):
    print(m.__name__, m.__version__)
print("CUDA runtime", cupy.cuda.runtime.runtimeGetVersion(),
      "driver", cupy.cuda.runtime.driverGetVersion())
try:
    import dask_cuda
    print("dask_cuda", dask_cuda.__version__)
except Exception as exc:  # reported, not fatal: the 2-worker test says the rest
    print("dask_cuda import failed:", exc)
EOF
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

# pyproject.toml turns warnings into errors; a third-party warning on the GPU machine's
# stack (dask-cuda, CuPy) would then fail a test and waste the session: here they are shown
# in the log (-W default) instead.
PYTEST=(python3 -m pytest -q -p no:cacheprovider -W default)

case "$stage" in
  tests)
    timeout 300 "${PYTEST[@]}" -rs \
      tests/test_gpu.py tests/test_pyramid_inline.py tests/test_register.py \
      tests/test_kernels_host.py tests/test_kernels_nvrtc.py 2>&1 | tee "$OUT/tests.log"
    timeout 240 "${PYTEST[@]}" benchmarks/bench_gpu.py \
      benchmarks/bench_register.py --benchmark-json="$OUT/bench_gpu.json" 2>&1 \
      | tee "$OUT/bench_gpu.log"
    timeout 60 python3 -m gpufusion bench --tiles 8x8 --tile 2048 --profile 2>&1 | tee "$OUT/cli_bench.txt"
    ;;
  wsi)
    # two runs, GPU first: pytest-benchmark writes its JSON only at the end of a run, so a
    # timeout loses only that run's figures (the tiles, written once, are reused)
    export GPUFUSION_WSI_TILES=${GPUFUSION_WSI_TILES:-600} GPUFUSION_WSI_DIR=/tmp/wsi
    for backend in cupy numpy; do
      limit=$([ "$backend" = cupy ] && echo 330 || echo 230)
      timeout "$limit" "${PYTEST[@]}" -s benchmarks/bench_wsi.py -k "$backend" \
        --benchmark-json="$OUT/bench_wsi_$backend.json" 2>&1 | tee "$OUT/bench_wsi_$backend.log"
    done
    ;;
  *)
    echo "usage: $0 tests|wsi" >&2
    exit 2
    ;;
esac
