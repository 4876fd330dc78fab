#!/usr/bin/env bash
# Builds `taper` with `--features cuda` on a machine without a CUDA installation, using
# NVIDIA's CUDA 13 compiler and libraries from PyPI (the cu12 wheels ship no nvcc).
#
#   trainer-image/scripts/build-cuda.sh            # release build: target/release/taper
#   trainer-image/scripts/build-cuda.sh check      # cargo check --features cuda only
#   trainer-image/scripts/build-cuda.sh bench      # the gpt_step bench (phase timings on a GPU)
#
# Environment: CUDA_COMPUTE_CAP (default 90, H100), TAPER_CUDA_DIR (default .cuda).
# Everything lands in the git-ignored .cuda/: a virtual environment with the wheels and a
# toolkit-shaped folder of links. The wheels ship versioned library names only, so the
# unversioned names the linker looks for are added as links, and libcuda.so (which comes
# with the driver, not the toolkit) as a stub built from the driver API's symbol list.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=${TAPER_CUDA_DIR:-$root/.cuda}
mode=${1:-build}
# The oldest CUDA 13 release: candle loads its kernels as PTX, which the driver compiles at
# run time and refuses when the PTX is newer than the driver, so the binary built with
# 13.0 runs on every CUDA 13 driver (libcublas/libcurand are taken from the machine).
wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.88
        nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35)

if [ ! -x "$dir/venv/bin/python" ] || [ "$(cat "$dir/.wheels" 2>/dev/null)" != "${wheels[*]}" ]; then
  python3 -m venv "$dir/venv"
  "$dir/venv/bin/pip" install -q "${wheels[@]}"
  echo "${wheels[*]}" >"$dir/.wheels"
fi
cu=$("$dir/venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')

# A toolkit-shaped folder: bin/, include/, nvvm/, lib64/ with unversioned names.
tk=$dir/toolkit
mkdir -p "$tk/lib64"
for d in bin include nvvm; do ln -sfn "$cu/$d" "$tk/$d"; done
for lib in "$cu"/lib/*.so.*; do
  base=$(basename "$lib"); ln -sf "$lib" "$tk/lib64/$base"; ln -sf "$lib" "$tk/lib64/${base%%.so.*}.so"
done
ln -sfn "$cu/lib" "$tk/lib"
# Stub of the driver library: every cu* function the CUDA headers declare, doing nothing,
# under both its plain name and the versioned name cuda.h maps it to (`#define cuMemAlloc
# cuMemAlloc_v2`), which is the symbol callers actually reference. Only the link uses it;
# at run time the real driver's libcuda.so.1 is loaded.
{ grep -ohE '^(extern )?CUresult CUDAAPI cu[A-Za-z0-9_]+' "$cu/include/cuda.h" | awk '{print $NF}'
  grep -ohE '^#define[[:space:]]+cu[A-Za-z0-9_]+[[:space:]]+cu[A-Za-z0-9_]+[[:space:]]*$' "$cu/include/cuda.h" | awk '{print $3}'
  # …and those behind the per-thread-stream macro: __CUDA_API_PTSZ(cuMemcpyDtoHAsync_v2).
  grep -ohE '__CUDA_API_PT[SD]Z?\(cu[A-Za-z0-9_]+\)' "$cu/include/cuda.h" | sed -E 's/.*\((cu[A-Za-z0-9_]+)\)/\1/'
} | sort -u | sed 's/.*/void &(void) {}/' >"$tk/libcuda-stub.c.new"
if ! cmp -s "$tk/libcuda-stub.c.new" "$tk/libcuda-stub.c" || ! readelf -d "$tk/lib64/libcuda.so" 2>/dev/null | grep -q "SONAME.*libcuda.so.1"; then
  mv "$tk/libcuda-stub.c.new" "$tk/libcuda-stub.c"
  # The soname makes binaries ask for libcuda.so.1, the name every driver install provides.
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$tk/lib64/libcuda.so" "$tk/libcuda-stub.c"
else
  rm -f "$tk/libcuda-stub.c.new"
fi

export CUDA_HOME=$tk CUDA_PATH=$tk CUDA_ROOT=$tk
export PATH=$tk/bin:$PATH
export LIBRARY_PATH=$tk/lib64${LIBRARY_PATH:+:$LIBRARY_PATH}
export LD_LIBRARY_PATH=$tk/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# cudarc must be told the CUDA version it binds to: the toolkit's, so that the binary asks
# the driver for nothing newer than 13.0.
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
nvcc --version | tail -n 2

cd "$root"
# candle-kernels' build script does not rerun when the compiler changes: clean it when the
# wheels differ from those its PTX was made with.
for profile_dir in target/cuda/release target/debug; do
  if [ -d "$profile_dir" ] && [ "$(cat "$profile_dir/.taper-cuda-wheels" 2>/dev/null)" != "${wheels[*]}" ]; then
    case "$profile_dir" in
      target/cuda/release) cargo clean -q -p candle-kernels --release --target-dir target/cuda ;;
      *) cargo clean -q -p candle-kernels ;;
    esac
    echo "${wheels[*]}" >"$profile_dir/.taper-cuda-wheels"
  fi
done
case "$mode" in
  check) cargo check -p taper-trainer --features cuda
         profile_dir=target/debug ;;
  build) cargo build --release -p taper-trainer --features cuda --target-dir target/cuda
         profile_dir=target/cuda/release
         echo "built $root/target/cuda/release/taper (compute capability $CUDA_COMPUTE_CAP)" ;;
  bench) cargo build --release -p taper-trainer --features cuda --target-dir target/cuda --bench gpt_step
         profile_dir=target/cuda/release
         echo "built $(ls -t target/cuda/release/deps/gpt_step-* | grep -v '\.d$' | head -1)" ;;
  *) echo "usage: $0 [build|check|bench]" >&2; exit 2 ;;
esac
# Record the wheels the kernels were just built with: without this, a first build into an
# empty folder left no record, and the next run cleaned and rebuilt the kernels (17 min).
echo "${wheels[*]}" >"$profile_dir/.taper-cuda-wheels"
