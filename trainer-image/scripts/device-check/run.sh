#!/usr/bin/env bash
# The GPU device check. Run on the GPU machine from the repository root, with the .device/
# folder made by prepare.sh carried along:
#
#   bash trainer-image/scripts/device-check/run.sh
#
# (a) correctness: the same tiny GPT, seed and batches for 50 steps with `--device cpu` and
#     `--device cuda` of the same binary, in f32 and in bf16; per-step losses must agree
#     within ABS_TOL nats (default 0.02) and REL_TOL (default 1%) in f32, and within
#     BF16_REL_TOL (default 3%) in bf16, where the two devices round differently.
# (b) speed: GPT-2 small (12 layers, 768 wide, block 1024) for STEPS (default 30) + 3 steps at
#     batch BATCH (default 8), in bf16 mixed precision and in f32; tokens/s and MFU (median
#     of the steps after the first 5, against the GPU's bf16 dense peak: PEAK_TFLOPS,
#     989 for an H100 or H200 by default) and the peak GPU memory seen by nvidia-smi.
# (k) `taper check-kernels`: the fused softmax, cross-entropy and LayerNorm against their composed
#     references, values and gradients, and their times.
# (c) ../shared/bench/torch_gpt_ref.py, same shape, same tokens, on the same GPU:
#     --dtype bf16 --sdpa (the yardstick) and --dtype f32 --sdpa (like for like).
# It prints a table and writes it to $OUT/device-check.md (or .device/device-check.md).
# Device time is scarce: every command gets at most what is left of BUDGET seconds (default
# 400) and is skipped when under 10 s remain, and the most important rows run first, so
# a slow or hanging step costs its own row only.
set -uo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
dev=$root/.device
res=${OUT:-$dev}
mkdir -p "$res" "$dev/work"
log=$res/device-check.log
: >"$log"
STEPS=${STEPS:-30} BATCH=${BATCH:-8} ABS_TOL=${ABS_TOL:-0.02} REL_TOL=${REL_TOL:-0.01}
BF16_REL_TOL=${BF16_REL_TOL:-0.03} BUDGET=${BUDGET:-400}
t0=$SECONDS
# left CAP: the seconds this command may take (CAP or what is left of the budget, if less);
# fails, with a line in the log, when under 10 s remain.
left() {
  local l=$(( BUDGET - (SECONDS - t0) ))
  if (( l < 10 )); then echo "skipped: device-check budget of ${BUDGET}s spent" >>"$log"; return 1; fi
  echo $(( l < $1 ? l : $1 ))
}
# GPU=cpu rehearses the script on a machine without a GPU (everything "GPU" runs on the CPU).
GPU=${GPU:-cuda}
[ -x "$dev/taper" ] || { echo "run.sh: $dev/taper is missing: run prepare.sh on the build machine and carry .device" >&2; exit 1; }

. "$root/trainer-image/scripts/device-check/cuda-libs.sh"
{ echo "== taper $("$dev/taper" --version) (commit $(cat "$dev/commit" 2>/dev/null))"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } 2>&1 | tee -a "$log"
if ldd "$dev/taper" | grep -q 'not found'; then ldd "$dev/taper" | tee -a "$log"; echo "run.sh: unresolved libraries" >&2; fi
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
# Dense bf16 peak of the GPU, for MFU: H100 and H200 (SXM) 989 TFLOPS, A100 312.
case "$gpu_name" in
  *A100*) default_peak=312 ;;
  *) default_peak=989 ;;
esac
PEAK_TFLOPS=${PEAK_TFLOPS:-$default_peak}

job() { # name preset batch steps warmup precision
  local lr=6.0e-4 minlr=6.0e-5 wd=0.1 clip=1.0 betas="[0.9, 0.95]"
  if [ "$1" = speed ]; then
    # torch_gpt_ref.py's optimizer, so that the final losses compare: a constant 1e-3,
    # AdamW with weight decay 0.01 on matrices and embeddings, no clipping.
    lr=1.0e-3 minlr=1.0e-3 wd=0.01 clip=0.0
    [ "$6" = f32 ] && betas="[0.9, 0.999]"
  fi
  cat <<YAML
apiVersion: taper.dev/v1alpha1
kind: PretrainJob
metadata:
  name: $1
spec:
  datasetRef:
    name: shakespeare
  model:
    preset: $2
    dropout: 0.0
  training:
    batchSize: $3
    gradientAccumulationSteps: 1
    maxSteps: $4
    learningRate: $lr
    minLearningRate: $minlr
    warmupSteps: $5
    weightDecay: $wd
    betas: $betas
    gradClip: $clip
    precision: $6
    seed: 1337
  evaluation:
    interval: 100000
    iterations: 1
  checkpoints:
    interval: 100000
    keep: 1
YAML
}

peak_mem() { # runs "$@" while sampling nvidia-smi; prints the peak MiB used on stderr's last line
  local f; f=$(mktemp)
  ( while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >>"$f" 2>/dev/null; sleep 0.2; done ) &
  local sampler=$!
  "$@"; local rc=$?
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  echo "PEAK_MIB $(sort -n "$f" | tail -1)"; rm -f "$f"
  return $rc
}

taper_run() { # name preset batch steps warmup device precision timeout
  local dir=$dev/work/$1-$7-$6
  rm -rf "$dir"; mkdir -p "$dir"
  job "$1" "$2" "$3" "$4" "$5" "$7" >"$dir/job.yaml"
  local secs; secs=$(left "$8") || return 1
  timeout "$secs" "$dev/taper" pretrain --job "$dir/job.yaml" --data "file://$dev/data/shakespeare" \
    --checkpoints "file://$dir/checkpoints" --work-dir "$dir/work" --device "$6" --peak-tflops "$PEAK_TFLOPS" \
    >"$dir/events.jsonl" 2>"$dir/stderr.log"
  local rc=$?
  echo "taper $1 $7 on $6: exit $rc ($(( SECONDS - t0 )) s into the check)" | tee -a "$log"; tail -n $(( rc == 0 ? 3 : 40 )) "$dir/stderr.log" >>"$log"
  return $rc
}

check() { # precision, then the CPU run's cap in seconds
  echo "== (a) correctness: tiny GPT, 50 steps, cpu vs $GPU, $1" | tee -a "$log"
  taper_run check tiny 8 50 5 cpu "$1" "$2"
  taper_run check tiny 8 50 5 "$GPU" "$1" 60
}
speed() { # precision
  echo "== (b) speed: GPT-2 small, $1, batch $BATCH, $STEPS steps" | tee -a "$log"
  # As many steps as the reference takes (its 3 untimed ones, then STEPS).
  peak_mem taper_run speed gpt2-small "$BATCH" $(( STEPS + 3 )) 0 "$GPU" "$1" 120 >"$dev/work/speed-$1.peak" 2>&1
  cat "$dev/work/speed-$1.peak" >>"$log"
}
ref() { # name, then torch_gpt_ref.py's options
  local name=$1 secs; shift
  echo "== (c) PyTorch reference, same shape and tokens: $*" | tee -a "$log"
  secs=$(left 120) || return 1
  peak_mem timeout "$secs" python3 "$dev/torch_gpt_ref.py" --device "$GPU" --peak-tflops "$PEAK_TFLOPS" --layers 12 --heads 12 --embd 768 --block 1024 \
    --vocab 50304 --batch "$BATCH" --steps "$STEPS" --data "$dev/data/train.bin" "$@" >"$dev/work/$name.out" 2>&1
  cat "$dev/work/$name.out" >>"$log"
}
check f32 60
speed bf16
ref torch-bf16 --dtype bf16 --sdpa
# bf16 on a CPU is slow (no bf16 matmul units): after the bf16 speed row.
check bf16 120

echo "== (k) fused kernels against their composed references, on $GPU" | tee -a "$log"
if secs=$(left 90); then
  timeout "$secs" "$dev/taper" check-kernels --device "$GPU" >"$dev/work/kernels.md" 2>>"$log"
  echo "check-kernels: exit $? ($(( SECONDS - t0 )) s into the check)" | tee -a "$log"
fi

speed f32
ref torch-f32 --dtype f32 --sdpa

python3 - "$dev/work" "$ABS_TOL" "$REL_TOL" "$BF16_REL_TOL" "$STEPS" "$BATCH" "$GPU" "$PEAK_TFLOPS" "${gpu_name:-cpu}" <<'PY' | tee "$res/device-check.md"
import json, re, statistics, sys, datetime
work = sys.argv[1]
abs_tol, rel_tol, bf16_rel_tol = map(float, sys.argv[2:5])
steps, batch, device, peak, gpu_name = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7], float(sys.argv[8]), sys.argv[9]

def events(path):
    out = []
    try:
        for line in open(path):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") == "step":
                out.append(e)
    except OSError:
        pass
    return out

def peak_mib(path):
    try:
        m = re.findall(r"PEAK_MIB (\d+)", open(path).read())
        return f"{int(m[-1]):,} MiB" if m else "?"
    except OSError:
        return "?"

print(f"# Taper device check: {gpu_name}, {datetime.date.today().isoformat()}\n")
print("## (k) Fused kernels against their composed references (f64 on the CPU)\n")
try:
    print(open(f"{work}/kernels.md").read() or "**FAIL**: no output (see device-check.log)")
except OSError:
    print("**FAIL**: not run")
print()
for prec, atol, rtol in (("f32", abs_tol, rel_tol), ("bf16", float("inf"), bf16_rel_tol)):
    cpu, gpu = events(f"{work}/check-{prec}-cpu/events.jsonl"), events(f"{work}/check-{prec}-{device}/events.jsonl")
    print(f"## (a) CPU vs CUDA, tiny GPT, {prec}, same seed and batches, 50 steps\n")
    if len(cpu) == 50 and len(gpu) == 50:
        diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(cpu, gpu)]
        rels = [d / abs(a["loss"]) for d, a in zip(diffs, cpu)]
        ok = max(diffs) <= atol and max(rels) <= rtol
        print("| step | cpu loss | cuda loss | abs diff |\n|---:|---:|---:|---:|")
        for i in (0, 9, 19, 29, 39, 49):
            print(f"| {cpu[i]['step']} | {cpu[i]['loss']:.5f} | {gpu[i]['loss']:.5f} | {diffs[i]:.2e} |")
        tol = f"tolerance {atol}, " if atol != float("inf") else ""
        print(f"\nmax abs diff {max(diffs):.2e}, max rel diff {max(rels):.2e} ({tol}rel tolerance {rtol}): "
              f"**{'PASS' if ok else 'FAIL'}**\n")
    else:
        print(f"**FAIL**: {len(cpu)} cpu steps and {len(gpu)} cuda steps logged (see device-check.log)\n")

print(f"## (b, c) GPT-2 small (124M, block 1024, batch {batch}), {steps} steps, same GPU\n")
print(f"| trainer | precision | ms/step | tokens/s | MFU (vs {peak:g} TFLOPS) | peak GPU memory | final loss |")
print("|---|---|---:|---:|---:|---:|---:|")
taper_tok = {}
for prec in ("bf16", "f32"):
    sp = events(f"{work}/speed-{prec}-{device}/events.jsonl")
    mem = peak_mib(f"{work}/speed-{prec}.peak")
    if sp:
        rest = sp[5:] if len(sp) > 5 else sp
        tok = statistics.median(e["tokensPerSecond"] for e in rest)
        mfu = statistics.median(e["mfu"] or 0 for e in rest)
        taper_tok[prec] = tok
        print(f"| taper (candle, CUDA) | {prec} | {batch * 1024 / tok * 1e3:.1f} | {tok:,.0f} | {mfu:.1%} | {mem} | {sp[-1]['loss']:.4f} |")
    else:
        print(f"| taper (candle, CUDA) | {prec} | failed ({len(sp)} steps logged) | | | {mem} | |")
for name, prec, label in (("torch-bf16", "bf16", "bf16 autocast + SDPA"), ("torch-f32", "f32", "f32 + SDPA")):
    try:
        text = open(f"{work}/{name}.out").read()
    except OSError:
        text = ""
    m = re.search(r"ms_per_step=([\d.]+) tokens_per_s=(\d+) mfu=([\d.]+) final_loss=([\d.]+)", text)
    if m:
        print(f"| PyTorch eager | {label} | {float(m[1]):.1f} | {int(m[2]):,} | {float(m[3]):.1%} | {peak_mib(f'{work}/{name}.out')} | {float(m[4]):.4f} |")
        if prec in taper_tok:
            print(f"| ↳ taper / PyTorch, {prec} | | | **{taper_tok[prec] / int(m[2]):.2f}×** | | | |")
    else:
        print(f"| PyTorch eager | {label} | failed | | | | |")
PY
# The runs' events and logs (not their checkpoints) come back too, for a closer look.
tar czf "$res/work.tgz" -C "$dev" --exclude=checkpoints --exclude='work/*/work' work 2>>"$log"
echo "table written to $res/device-check.md; log in $log (device check took $(( SECONDS - t0 )) s)"
