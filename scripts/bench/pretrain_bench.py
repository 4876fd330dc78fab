#!/usr/bin/env python3
"""Training-step throughput of Taper's candle GPT next to the PyTorch reference.

Runs `cargo bench -p taper-trainer --bench gpt_step` (release) and
`../shared/bench/torch_gpt_ref.py` on the same shape, alternating A B A B, and prints a
table of median ms/step, tokens/s, peak resident memory and the ratio. Only ratios from
one run count: these machines are shared and noisy.

    python3 scripts/bench/pretrain_bench.py [--model baby|quickstart] [--rounds 2] [--threads 2]
        [--python .venv/bin/python]

Shapes (f32): `baby`, the default, nanoGPT's baby config (6 layers, 6 heads, 384 wide,
block 256, vocab 65, batch 12); `quickstart`, the quickstart's PretrainJob (2 layers,
4 heads, 128 wide, block 64, vocab 1,024, batch 32). PyTorch comes from the virtual
environment in .venv (see scripts/reference/README.md). The table's title names the CPU:
the ratio depends on it (gemm's kernels beat MKL's, PyTorch's, on an AMD EPYC; MKL's won
on the CPU of earlier runs).
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SHAPES = {
    "baby": dict(layers=6, heads=6, embd=384, block=256, vocab=65, batch=12),
    "quickstart": dict(layers=2, heads=4, embd=128, block=64, vocab=1024, batch=32),
}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# Runs the reference script in-process and reports its own peak resident memory.
WRAP = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__'); "
        "print(f'RESULT_PEAK peak_rss_mib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}')")


def run(cmd, env):
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT")), None)
    if line is None:
        sys.exit(f"no RESULT line from {' '.join(cmd)}:\n{out.stdout}")
    fields = dict(re.findall(r"(\w+)=([\w.\-]+)", line))
    for extra in (l for l in out.stdout.splitlines() if l.startswith("RESULT_PEAK")):
        fields.update(re.findall(r"(\w+)=([\w.\-]+)", extra))
    return fields


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=sorted(SHAPES), default="baby")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--python", default=str(ROOT / ".venv/bin/python"))
    p.add_argument("--reference", default=str(ROOT.parent / "shared/bench/torch_gpt_ref.py"))
    a = p.parse_args()
    shape = SHAPES[a.model]
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads),
               TAPER_BENCH=",".join(str(v) for v in [*shape.values(), a.steps]))
    subprocess.run(["cargo", "build", "--release", "-p", "taper-trainer", "--bench", "gpt_step"],
                   cwd=ROOT, check=True, capture_output=True)
    bench_bin = sorted((ROOT / "target/release/deps").glob("gpt_step-*"), key=lambda f: f.stat().st_mtime)
    bench_bin = [b for b in bench_bin if os.access(b, os.X_OK) and b.suffix == ""][-1]
    torch_cmd = [a.python, "-c", WRAP, a.reference, "--threads", str(a.threads), "--steps", str(a.steps),
                 *[x for k, v in shape.items() for x in (f"--{k}", str(v))]]
    results = {"torch": [], "taper": []}
    for _ in range(a.rounds):
        results["torch"].append(run(torch_cmd, env))
        results["taper"].append(run([str(bench_bin)], env))
    rows = []
    for name, rs in results.items():
        ms = statistics.median(float(r["ms_per_step"]) for r in rs)
        tok = statistics.median(float(r["tokens_per_s"]) for r in rs)
        peak = max(float(r["peak_rss_mib"]) for r in rs)
        rows.append((name, ms, tok, peak))
    base = rows[0][2]
    print(f"{a.model} GPT ({', '.join(f'{k} {v}' for k, v in shape.items())}), f32, {a.threads} threads, "
          f"median of {a.rounds} runs x {a.steps} steps, {cpu_name()} ({os.cpu_count()} CPUs)")
    print(f"{'impl':<8}{'ms/step':>10}{'tokens/s':>11}{'peak MiB':>10}{'vs torch':>10}")
    for name, ms, tok, peak in rows:
        print(f"{name:<8}{ms:>10.1f}{tok:>11.0f}{peak:>10.0f}{tok / base:>9.2f}x")


if __name__ == "__main__":
    main()
