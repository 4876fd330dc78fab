#!/usr/bin/env bash
# Where a GPT-2-small training step's time goes on the GPU. Run on the GPU machine from
# the repository root with .device/phases/ carried:
#
#   trainer-image/scripts/build-cuda.sh bench     # here: the gpt_step bench with CUDA
#   mkdir -p .device/phases && cp "$(ls -t target/cuda/release/deps/gpt_step-* | grep -v '\.d$' | head -1)" .device/phases/gpt_step
#   strip .device/phases/gpt_step
#   bash trainer-image/scripts/device-check/phases.sh   # there, carrying .device/phases
#
# Each run is the bench's step (forward, loss, backward, gradient gathering, clipping,
# AdamW) on random tokens, GPT-2 small at block 1024: bf16 and f32 with the device
# synchronised between phases (a PHASES line of median milliseconds), then bf16 without
# synchronisation at batch 8 and 16 (how the step scales with the work). Output in
# $OUT/phases.log (or .device/phases/phases.log).
set -uo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
dir=$root/.device/phases
res=${OUT:-$dir}
bin=$dir/gpt_step
[ -x "$bin" ] || { echo "phases.sh: $bin is missing (see the header)" >&2; exit 1; }
. "$root/trainer-image/scripts/device-check/cuda-libs.sh"
log=$res/phases.log
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | tee "$log"
run() { # dtype batch phases
  echo "== GPT-2 small, $1, batch $2, phases $3" | tee -a "$log"
  TAPER_BENCH="12,12,768,1024,50304,$2,10" TAPER_BENCH_DEVICE=cuda TAPER_BENCH_DTYPE=$1 \
    TAPER_BENCH_PHASES=$3 timeout 60 "$bin" 2>&1 | tail -n 4 | tee -a "$log"
}
run bf16 8 1
run f32 8 1
run bf16 8 0
run bf16 16 0
