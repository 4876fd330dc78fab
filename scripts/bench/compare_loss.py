#!/usr/bin/env python3
"""Loss parity of Taper's trainer and PyTorch on the very same run.

Taper's side (`trainer-image/examples/loss_parity.rs`, built in release) initialises a
GPT, trains it with the library's `Trainer` on byte-level Tiny Shakespeare, and writes
its initial weights, every batch in the order drawn, the recipe and its loss per step.
This script then trains the same weights in PyTorch (float32, CPU) on the same batches
with the same recipe, written here from the published definitions rather than from
Taper's code:

* GPT-2 architecture: pre-LayerNorm (eps 1e-5), exact (erf) GELU, causal softmax
  attention scaled by 1/sqrt(head size), biases, a head tied to the token embedding;
* `torch.optim.AdamW` (betas 0.9/0.95, eps 1e-8) with nanoGPT's groups: tensors of two
  or more dimensions decayed, biases and LayerNorm parameters not;
* nanoGPT's `get_lr`: linear warmup, cosine decay to the minimum at the last step;
* `torch.nn.utils.clip_grad_norm_` to 1.0 before every step.

Both curves are printed as means over 20-step windows with their relative difference.
With the same start and the same data, any gap beyond float rounding is a difference in
the recipe or a bug; the goal is within 1 % in every window after warmup.

    python3 scripts/bench/compare_loss.py [--steps 2000] [--threads 2] [--python .venv/bin/python]

PyTorch comes from `.venv` (`python3 -m venv .venv && .venv/bin/pip install torch numpy
safetensors`); the script re-runs itself under that interpreter for the PyTorch half.
"""
import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WINDOW = 20


def write_dataset(out: Path, text: bytes) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cut = len(text) * 9 // 10
    shards = {}
    for split, data in (("train", text[:cut]), ("test", text[cut:])):
        name = f"{split}-00000.bin"
        raw = b"".join(b.to_bytes(2, "little") for b in data)
        (out / name).write_bytes(raw)
        shards[split] = [{"file": name, "tokens": len(data), "sha256": hashlib.sha256(raw).hexdigest()}]
    digest = hashlib.sha256("".join(s[0]["sha256"] for s in shards.values()).encode()).hexdigest()
    manifest = {"version": 1, "tokenizer": "bytes", "vocabSize": 256, "eotToken": 10, "dtype": "uint16",
                "train": shards["train"], "test": shards["test"], "digest": digest}
    (out / "manifest.json").write_text(json.dumps(manifest))


def windows(losses, w=WINDOW):
    return [sum(losses[i:i + w]) / len(losses[i:i + w]) for i in range(0, len(losses), w)]


def torch_half(run_dir: Path, threads: int, limit: int = 0) -> None:
    """Train the PyTorch reference from `run_dir`'s weights, batches and recipe."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    run = json.loads((run_dir / "run.json").read_text())
    m, t = run["model"], run["training"]
    n_layer, n_head, c = m["nLayer"], m["nHead"], m["nEmbd"]
    batch, block, steps = t["batchSize"], m["blockSize"], t["maxSteps"]
    p = {k: v.float().clone().requires_grad_(True) for k, v in load_file(str(run_dir / "init.safetensors")).items()}
    raw = torch.frombuffer(bytearray((run_dir / "batches.bin").read_bytes()), dtype=torch.int16)
    ids = raw.to(torch.int64) & 0xFFFF
    ids = ids.view(steps, 2, batch, block)
    if limit:
        steps = min(steps, limit)

    def ln(x, name):
        return F.layer_norm(x, (c,), p[name + ".weight"], p[name + ".bias"], eps=1e-5)

    mask = torch.triu(torch.ones(block, block, dtype=torch.bool), diagonal=1)

    def forward(idx):
        b, tt = idx.shape
        x = p["wte.weight"][idx] + p["wpe.weight"][:tt]
        hd = c // n_head
        for i in range(n_layer):
            h = f"h.{i}."
            qkv = ln(x, h + "ln_1") @ p[h + "attn.c_attn.weight"] + p[h + "attn.c_attn.bias"]
            q, k, v = (z.view(b, tt, n_head, hd).transpose(1, 2) for z in qkv.split(c, dim=-1))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
            att = torch.softmax(att.masked_fill(mask[:tt, :tt], float("-inf")), dim=-1)
            y = (att @ v).transpose(1, 2).reshape(b, tt, c)
            x = x + y @ p[h + "attn.c_proj.weight"] + p[h + "attn.c_proj.bias"]
            hh = F.gelu(ln(x, h + "ln_2") @ p[h + "mlp.c_fc.weight"] + p[h + "mlp.c_fc.bias"])
            x = x + hh @ p[h + "mlp.c_proj.weight"] + p[h + "mlp.c_proj.bias"]
        return ln(x, "ln_f") @ p["wte.weight"].t()

    decay = [v for v in p.values() if v.dim() >= 2]
    no_decay = [v for v in p.values() if v.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t["weightDecay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t["learningRate"], betas=tuple(t["betas"]), eps=run["adamEps"],
                            foreach=False, fused=False)

    def get_lr(it):  # nanoGPT
        lr, min_lr, warmup, decay_iters = t["learningRate"], t["minLearningRate"], t["warmupSteps"], t["decaySteps"]
        if it < warmup:
            return lr * (it + 1) / warmup
        if it > decay_iters:
            return min_lr
        ratio = (it - warmup) / (decay_iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    out = ["step,loss,grad_norm,lr"]
    started = time.time()
    for it in range(steps):
        x, y = ids[it, 0], ids[it, 1]
        logits = forward(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(list(p.values()), t["gradClip"]) if t["gradClip"] > 0 else torch.tensor(0.0)
        lr = get_lr(it)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        out.append(f"{it + 1},{loss.item()!r},{float(norm)!r},{lr!r}")
        if (it + 1) % 100 == 0:
            print(f"torch step {it + 1} loss {loss.item():.4f} ({(time.time() - started) * 1e3 / (it + 1):.0f} ms/step)",
                  file=sys.stderr)
    (run_dir / "torch.csv").write_text("\n".join(out) + "\n")


def column(path: Path, name: str):
    lines = path.read_text().splitlines()
    i = lines[0].split(",").index(name)
    return [float(l.split(",")[i]) for l in lines[1:]]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--python", default=str(ROOT / ".venv/bin/python"))
    p.add_argument("--corpus", default=str(ROOT.parent / "shared/data/tinyshakespeare.txt"))
    p.add_argument("--torch-half", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.torch_half:
        torch_half(Path(a.torch_half), a.threads, a.limit)
        return
    shape = dict(layers=4, heads=4, embd=128, block=128, batch=12)
    work = ROOT / ".cache/compare"
    write_dataset(work / "data", Path(a.corpus).read_bytes())
    run_dir = work / "run"
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "taper-trainer", "--example", "loss_parity"],
                   cwd=ROOT, check=True)
    started = time.time()
    subprocess.run([str(ROOT / "target/release/examples/loss_parity"), "--data", str(work / "data"),
                    "--out", str(run_dir), "--steps", str(a.steps), "--warmup", str(a.warmup),
                    *[x for k, v in shape.items() for x in (f"--{k}", str(v))]],
                   cwd=ROOT, env=env, check=True)
    taper_s = time.time() - started
    started = time.time()
    subprocess.run([a.python, __file__, "--torch-half", str(run_dir), "--threads", str(a.threads)],
                   cwd=ROOT, env=env, check=True)
    torch_s = time.time() - started
    taper_loss, torch_loss = column(run_dir / "taper.csv", "loss"), column(run_dir / "torch.csv", "loss")
    taper_norm, torch_norm = column(run_dir / "taper.csv", "grad_norm"), column(run_dir / "torch.csv", "grad_norm")
    first = next((i for i, (x, y) in enumerate(zip(taper_loss, torch_loss)) if abs(x - y) > 1e-4 * abs(y)), None)
    print(f"byte-level Tiny Shakespeare, {shape}, {a.steps} steps, warmup {a.warmup}, the same initial weights "
          f"and batches; taper {taper_s:.0f} s, torch {torch_s:.0f} s")
    print(f"first 5 steps, loss taper / torch: "
          + ", ".join(f"{x:.6f}/{y:.6f}" for x, y in zip(taper_loss[:5], torch_loss[:5])))
    print(f"first 5 steps, grad norm taper / torch: "
          + ", ".join(f"{x:.6f}/{y:.6f}" for x, y in zip(taper_norm[:5], torch_norm[:5])))
    print(f"first step whose losses differ by more than 1e-4 relative: {first + 1 if first is not None else 'none'}")
    print(f"mean training loss per {WINDOW}-step window")
    print(f"{'steps':>11}{'taper':>9}{'torch':>9}{'diff':>8}")
    worst = 0.0
    for i, (x, y) in enumerate(zip(windows(taper_loss), windows(torch_loss))):
        diff = (x - y) / y
        if i * WINDOW >= a.warmup:
            worst = max(worst, abs(diff))
        print(f"{i * WINDOW + 1:>5}-{i * WINDOW + WINDOW:<5}{x:>9.4f}{y:>9.4f}{diff:>+8.2%}")
    verdict = "met" if worst <= 0.01 else "NOT met"
    print(f"largest window difference after warmup: {worst:.2%} (goal: within 1%: {verdict})")


if __name__ == "__main__":
    main()
