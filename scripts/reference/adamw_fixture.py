#!/usr/bin/env python3
"""PyTorch reference numbers for Taper's AdamW / LR-schedule / grad-clip unit tests.

Produces ``trainer-image/tests/fixtures/adamw_reference.json``: eight steps of
torch.optim.AdamW (float64, CPU) on two tiny parameters, with nanoGPT-style
weight-decay groups (decay only on the >=2-D tensor ``w``), the nanoGPT cosine
learning-rate schedule with linear warmup, and global L2-norm gradient
clipping (torch.nn.utils.clip_grad_norm_, max_norm=1.0) before every step. The
first four steps' gradients exceed the norm and are clipped; the last four are small
enough to pass through unclipped, and the last two fall after the decay (min lr).
The JSON records the inputs, the hyper-parameters, the schedule for it=0..8,
and per step: the pre-clip grads and global norm, the post-clip grads, the lr
used, and after the step the parameters and torch's optimizer state
(exp_avg, exp_avg_sq, step).

Regenerate (from the repository root):

    python3 -m venv .venv && .venv/bin/pip install torch numpy safetensors
    .venv/bin/python scripts/reference/adamw_fixture.py
"""

import json
import math
import os

import torch

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT_PATH = os.path.join(REPO_ROOT, "trainer-image", "tests", "fixtures", "adamw_reference.json")

W0 = [[0.5, -0.3, 0.8], [0.1, 0.2, -0.7]]
B0 = [0.05, -0.02, 0.3]
GW_BASE = [[1.0, -2.0, 0.5], [0.3, 0.0, -1.5]]
GB_BASE = [0.2, -0.4, 1.1]

LR = 1e-2
MIN_LR = 1e-3
WARMUP = 2
DECAY = 6  # max_steps / lr_decay_iters
BETAS = (0.9, 0.95)
EPS = 1e-8
WD_W = 0.1
WD_B = 0.0
MAX_NORM = 1.0
N_STEPS = 8
SCHEDULE_ITS = 9  # it = 0..8

SCHEDULE_DEF = (
    "if it < warmup: return lr * (it + 1) / warmup; "
    "if it > decay: return min_lr; "
    "ratio = (it - warmup) / (decay - warmup); "
    "coeff = 0.5 * (1 + cos(pi * ratio)); "
    "return min_lr + coeff * (lr - min_lr)"
)


def get_lr(it):
    if it < WARMUP:
        return LR * (it + 1) / WARMUP
    if it > DECAY:
        return MIN_LR
    ratio = (it - WARMUP) / (DECAY - WARMUP)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return MIN_LR + coeff * (LR - MIN_LR)


def grads_at(it):
    if it < 4:
        # Global norm 1.9 to 7.5: clipped.
        gw = torch.tensor(GW_BASE, dtype=torch.float64) * (it + 1) * 0.7
        gb = torch.tensor(GB_BASE, dtype=torch.float64) * (1 - 0.3 * it)
    else:
        # Global norm 0.07 to 0.28: not clipped.
        gw = torch.tensor(GW_BASE, dtype=torch.float64) * (it - 3) * 0.025
        gb = torch.tensor(GB_BASE, dtype=torch.float64) * (0.05 - 0.01 * it)
    return gw, gb


def tl(t):
    """Tensor -> nested list of python floats (full precision via json repr)."""
    return t.detach().cpu().tolist()


def main():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)

    w = torch.tensor(W0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(B0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW(
        [
            {"params": [w], "weight_decay": WD_W},
            {"params": [b], "weight_decay": WD_B},
        ],
        lr=LR,
        betas=BETAS,
        eps=EPS,
        foreach=False,
        fused=False,
    )

    schedule = [get_lr(it) for it in range(SCHEDULE_ITS)]
    steps = []
    pre_clip = []
    for it in range(N_STEPS):
        gw, gb = grads_at(it)
        pre_clip.append({"it": it, "grad_w": tl(gw), "grad_b": tl(gb)})
        w.grad = gw.clone()
        b.grad = gb.clone()

        lr = get_lr(it)
        for g in opt.param_groups:
            g["lr"] = lr

        total_norm = torch.nn.utils.clip_grad_norm_([w, b], max_norm=MAX_NORM)
        post_w, post_b = w.grad.clone(), b.grad.clone()
        opt.step()

        sw, sb = opt.state[w], opt.state[b]
        steps.append(
            {
                "it": it,
                "lr": lr,
                "grad_norm_pre_clip": float(total_norm),
                "clip_coef": min(1.0, MAX_NORM / (float(total_norm) + 1e-6)),
                "clipped": float(total_norm) > MAX_NORM,
                "grad_w_pre_clip": tl(gw),
                "grad_b_pre_clip": tl(gb),
                "grad_w_post_clip": tl(post_w),
                "grad_b_post_clip": tl(post_b),
                "w": tl(w),
                "b": tl(b),
                "state": {
                    "w": {
                        "step": float(sw["step"]),
                        "exp_avg": tl(sw["exp_avg"]),
                        "exp_avg_sq": tl(sw["exp_avg_sq"]),
                    },
                    "b": {
                        "step": float(sb["step"]),
                        "exp_avg": tl(sb["exp_avg"]),
                        "exp_avg_sq": tl(sb["exp_avg_sq"]),
                    },
                },
            }
        )
        opt.zero_grad(set_to_none=True)

    out = {
        "generator": "scripts/reference/adamw_fixture.py",
        "torch_version": torch.__version__,
        "dtype": "float64",
        "optimizer": "torch.optim.AdamW (foreach=False, fused=False, amsgrad=False, maximize=False)",
        "notes": (
            "Per step: grads set to pre-clip values, group lr set to schedule(it), "
            "torch.nn.utils.clip_grad_norm_([w, b], max_norm) (global L2 norm; "
            "clip_coef = max_norm / (norm + 1e-6), clamped to <= 1), then opt.step(). "
            "AdamW decoupled decay: p -= lr * weight_decay * p before the Adam update; "
            "bias correction uses step count after increment."
        ),
        "inputs": {
            "w": W0,
            "b": B0,
            "grad_formula": {
                "grad_w": "[[1.0,-2.0,0.5],[0.3,0.0,-1.5]] * (it+1) * 0.7 for it < 4, "
                "else * (it-3) * 0.025",
                "grad_b": "[0.2,-0.4,1.1] * (1 - 0.3*it) for it < 4, else * (0.05 - 0.01*it)",
            },
            "grads_pre_clip": pre_clip,
        },
        "hyper": {
            "lr": LR,
            "min_lr": MIN_LR,
            "warmup_steps": WARMUP,
            "max_steps": DECAY,
            "betas": list(BETAS),
            "eps": EPS,
            "weight_decay": {"w": WD_W, "b": WD_B},
            "max_grad_norm": MAX_NORM,
            "n_steps": N_STEPS,
        },
        "schedule_definition": SCHEDULE_DEF,
        "schedule": [{"it": it, "lr": v} for it, v in enumerate(schedule)],
        "steps": steps,
    }

    os.makedirs(os.path.dirname(OUT_PATH), exist_ok=True)
    with open(OUT_PATH, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(f"torch {torch.__version__}")
    for s in steps:
        print(
            f"it={s['it']} lr={s['lr']!r} norm={s['grad_norm_pre_clip']!r} "
            f"clipped={s['clipped']} w[0][0]={s['w'][0][0]!r}"
        )
    print(f"wrote {OUT_PATH} ({os.path.getsize(OUT_PATH)} bytes)")


if __name__ == "__main__":
    main()
