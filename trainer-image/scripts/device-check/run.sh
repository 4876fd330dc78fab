#!/usr/bin/env bash
# The GPU device check. Run on the GPU machine from the repository root, with the .device/
# folder made by prepare.sh carried along:
#
#   bash trainer-image/scripts/device-check/run.sh
#
# (a) correctness: the same tiny GPT, seed and batches for 50 steps with `--device cpu` and
#     `--device cuda` of the same binary; per-step losses must agree within
#     ABS_TOL nats (default 0.02) and REL_TOL (default 1%).
# (b) speed: GPT-2 small (12 layers, 768 wide, block 1024) for STEPS steps (default 30) at
#     batch BATCH (default 8); tokens/s and MFU (median of the steps after the first 5,
#     against the H100's 989 bf16 dense TFLOPS) and the peak GPU memory seen by nvidia-smi.
#     The trainer runs in f32 (bf16 mixed precision is not implemented yet).
# (c) ../shared/bench/torch_gpt_ref.py, same shape, same tokens, on the same GPU:
#     --dtype bf16 --sdpa (the yardstick) and --dtype f32 (like for like).
# It prints a table and writes it to $OUT/device-check.md (or .device/device-check.md).
set -uo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
dev=$root/.device
res=${OUT:-$dev}
mkdir -p "$res" "$dev/work"
log=$res/device-check.log
: >"$log"
STEPS=${STEPS:-30} BATCH=${BATCH:-8} ABS_TOL=${ABS_TOL:-0.02} REL_TOL=${REL_TOL:-0.01}
# GPU=cpu rehearses the script on a machine without a GPU (everything "GPU" runs on the CPU).
GPU=${GPU:-cuda}
[ -x "$dev/taper" ] || { echo "run.sh: $dev/taper is missing: run prepare.sh on the build machine and carry .device" >&2; exit 1; }

# The binary links libcublas/libcurand/libnvrtc of CUDA 13: take them from PyTorch's wheels.
libs=$(python3 - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
dirs = set()
for r in roots:
    for f in glob.glob(os.path.join(r, "**", "lib", "*.so*"), recursive=True):
        dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
{ echo "== taper $("$dev/taper" --version) (commit $(cat "$dev/commit" 2>/dev/null))"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } 2>&1 | tee -a "$log"
if ldd "$dev/taper" | grep -q 'not found'; then ldd "$dev/taper" | tee -a "$log"; echo "run.sh: unresolved libraries" >&2; fi

job() { # name preset batch steps warmup
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
    learningRate: 6.0e-4
    minLearningRate: 6.0e-5
    warmupSteps: $5
    gradClip: 1.0
    precision: f32
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

taper_run() { # name preset batch steps warmup device
  local dir=$dev/work/$1-$6
  rm -rf "$dir"; mkdir -p "$dir"
  job "$1" "$2" "$3" "$4" "$5" >"$dir/job.yaml"
  "$dev/taper" pretrain --job "$dir/job.yaml" --data "file://$dev/data/shakespeare" \
    --checkpoints "file://$dir/checkpoints" --work-dir "$dir/work" --device "$6" --peak-tflops 989 \
    >"$dir/events.jsonl" 2>"$dir/stderr.log"
  local rc=$?
  echo "taper $1 on $6: exit $rc" | tee -a "$log"; tail -3 "$dir/stderr.log" >>"$log"
  return $rc
}

echo "== (a) correctness: tiny GPT, 50 steps, cpu vs cuda" | tee -a "$log"
taper_run check tiny 8 50 5 cpu
taper_run check tiny 8 50 5 "$GPU"

echo "== (b) speed: GPT-2 small, f32, batch $BATCH, $STEPS steps" | tee -a "$log"
peak_mem taper_run speed gpt2-small "$BATCH" "$STEPS" $(( STEPS < 3 ? STEPS : 3 )) "$GPU" >"$dev/work/speed.peak" 2>&1
cat "$dev/work/speed.peak" >>"$log"

echo "== (c) PyTorch reference, same shape and tokens" | tee -a "$log"
ref() { python3 "$dev/torch_gpt_ref.py" --device "$GPU" --layers 12 --heads 12 --embd 768 --block 1024 \
          --vocab 50304 --batch "$BATCH" --steps "$STEPS" --data "$dev/data/train.bin" "$@"; }
peak_mem ref --dtype bf16 --sdpa >"$dev/work/torch-bf16.out" 2>&1; cat "$dev/work/torch-bf16.out" >>"$log"
peak_mem ref --dtype f32 --sdpa >"$dev/work/torch-f32.out" 2>&1; cat "$dev/work/torch-f32.out" >>"$log"

python3 - "$dev/work" "$ABS_TOL" "$REL_TOL" "$STEPS" "$BATCH" "$GPU" <<'PY' | tee "$res/device-check.md"
import json, re, statistics, sys
work, abs_tol, rel_tol, steps, batch, device = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]

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

def peak(path):
    try:
        m = re.findall(r"PEAK_MIB (\d+)", open(path).read())
        return f"{int(m[-1]):,} MiB" if m else "?"
    except OSError:
        return "?"

cpu, gpu = events(f"{work}/check-cpu/events.jsonl"), events(f"{work}/check-{device}/events.jsonl")
print("# Taper device check\n")
print("## (a) CPU vs CUDA, tiny GPT, same seed, 50 steps\n")
if len(cpu) == 50 and len(gpu) == 50:
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(cpu, gpu)]
    rels = [d / abs(a["loss"]) for d, a in zip(diffs, cpu)]
    ok = max(diffs) <= abs_tol and max(rels) <= rel_tol
    print("| step | cpu loss | cuda loss | abs diff |\n|---:|---:|---:|---:|")
    for i in (0, 9, 19, 29, 39, 49):
        print(f"| {cpu[i]['step']} | {cpu[i]['loss']:.5f} | {gpu[i]['loss']:.5f} | {diffs[i]:.2e} |")
    print(f"\nmax abs diff {max(diffs):.2e} (tolerance {abs_tol}), max rel diff {max(rels):.2e} "
          f"(tolerance {rel_tol}): **{'PASS' if ok else 'FAIL'}**\n")
else:
    print(f"**FAIL**: {len(cpu)} cpu steps and {len(gpu)} cuda steps logged (see device-check.log)\n")

print(f"## (b, c) GPT-2 small (124M, block 1024, batch {batch}), {steps} steps, same H100\n")
print("| trainer | precision | ms/step | tokens/s | MFU (vs 989 TFLOPS) | peak GPU memory | final loss |")
print("|---|---|---:|---:|---:|---:|---:|")
sp = events(f"{work}/speed-{device}/events.jsonl")
if sp:
    rest = sp[5:] if len(sp) > 5 else sp
    tok = statistics.median(e["tokensPerSecond"] for e in rest)
    mfu = statistics.median(e["mfu"] or 0 for e in rest)
    ms = batch * 1024 / tok * 1e3
    print(f"| taper (candle, CUDA) | f32 | {ms:.1f} | {tok:,.0f} | {mfu:.1%} | {peak(work + '/speed.peak')} | {sp[-1]['loss']:.4f} |")
else:
    print(f"| taper (candle, CUDA) | f32 | failed ({len(sp)} steps logged) | | | {peak(work + '/speed.peak')} | |")
    tok = None
for name, label in (("torch-bf16", "bf16 autocast + SDPA"), ("torch-f32", "f32 + SDPA")):
    try:
        text = open(f"{work}/{name}.out").read()
    except OSError:
        text = ""
    m = re.search(r"ms_per_step=([\d.]+) tokens_per_s=(\d+) mfu=([\d.]+) final_loss=([\d.]+)", text)
    if m:
        print(f"| PyTorch eager ({name}) | {label} | {float(m[1]):.1f} | {int(m[2]):,} | {float(m[3]):.1%} | {peak(f'{work}/{name}.out')} | {float(m[4]):.4f} |")
        if tok:
            print(f"|  ↳ taper / PyTorch {label} | | | {tok / int(m[2]):.2f}× | | | |")
    else:
        print(f"| PyTorch eager ({name}) | {label} | failed | | | | |")
PY
echo "table written to $res/device-check.md; log in $log"
