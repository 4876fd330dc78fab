#!/usr/bin/env python3
"""PyTorch reference fixture for Taper's GPT-2 forward/backward unit tests.

Produces ``trainer-image/tests/fixtures/gpt2_tiny.safetensors``: a tiny GPT-2
(vocab_size=96, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True,
dropout=0, tied LM head) with random, non-trivial float32 parameters, plus a
fixed batch and the reference results, all in one safetensors file:

  * every parameter under its Hugging Face GPT-2 name (``wte.weight``,
    ``wpe.weight``, ``h.{i}.ln_1.weight``, ``h.{i}.attn.c_attn.weight`` ...,
    ``ln_f.bias``); linear weights use the HF Conv1D layout [in, out];
  * ``fixture.input_ids`` int64 [2,16], ``fixture.targets`` int64 [2,16];
  * ``fixture.logits`` float32 [2,16,96];
  * ``fixture.loss`` float32 [1]: mean cross-entropy of logits vs targets;
  * ``grad.<name>`` float32: d loss / d <name> for every parameter.

Everything is float32 on CPU, deterministic (torch.manual_seed(0),
torch.use_deterministic_algorithms(True), torch.set_num_threads(1)).

Regenerate (from the repository root):

    python3 -m venv .venv && .venv/bin/pip install torch numpy safetensors
    .venv/bin/python scripts/reference/gpt2_fixture.py
"""

import math
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

VOCAB_SIZE = 96
BLOCK_SIZE = 16
N_LAYER = 2
N_HEAD = 2
N_EMBD = 32
LN_EPS = 1e-5
BATCH = 2

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT_PATH = os.path.join(REPO_ROOT, "trainer-image", "tests", "fixtures", "gpt2_tiny.safetensors")


def param_shapes():
    """Ordered (name, shape, kind) for every parameter; kind picks the init."""
    c = N_EMBD
    out = [
        ("wte.weight", (VOCAB_SIZE, c), "matrix"),
        ("wpe.weight", (BLOCK_SIZE, c), "matrix"),
    ]
    for i in range(N_LAYER):
        p = f"h.{i}."
        out += [
            (p + "ln_1.weight", (c,), "ln_weight"),
            (p + "ln_1.bias", (c,), "ln_bias"),
            (p + "attn.c_attn.weight", (c, 3 * c), "matrix"),
            (p + "attn.c_attn.bias", (3 * c,), "bias"),
            (p + "attn.c_proj.weight", (c, c), "matrix"),
            (p + "attn.c_proj.bias", (c,), "bias"),
            (p + "ln_2.weight", (c,), "ln_weight"),
            (p + "ln_2.bias", (c,), "ln_bias"),
            (p + "mlp.c_fc.weight", (c, 4 * c), "matrix"),
            (p + "mlp.c_fc.bias", (4 * c,), "bias"),
            (p + "mlp.c_proj.weight", (4 * c, c), "matrix"),
            (p + "mlp.c_proj.bias", (c,), "bias"),
        ]
    out += [
        ("ln_f.weight", (c,), "ln_weight"),
        ("ln_f.bias", (c,), "ln_bias"),
    ]
    return out


def init_params():
    params = {}
    for name, shape, kind in param_shapes():
        if kind == "matrix":
            t = torch.randn(shape, dtype=torch.float32) * 0.2
        elif kind == "bias":
            t = torch.randn(shape, dtype=torch.float32) * 0.1
        elif kind == "ln_weight":
            t = 1.0 + torch.randn(shape, dtype=torch.float32) * 0.1
        elif kind == "ln_bias":
            t = torch.randn(shape, dtype=torch.float32) * 0.1
        else:
            raise ValueError(kind)
        params[name] = t.contiguous().requires_grad_(True)
    return params


def layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps=LN_EPS)


def attention(x, p, prefix):
    bsz, t, c = x.shape
    hd = c // N_HEAD
    qkv = x @ p[prefix + "c_attn.weight"] + p[prefix + "c_attn.bias"]  # [B,T,3C]
    q, k, v = qkv.split(c, dim=-1)
    q = q.view(bsz, t, N_HEAD, hd).transpose(1, 2)  # [B,H,T,hd]
    k = k.view(bsz, t, N_HEAD, hd).transpose(1, 2)
    v = v.view(bsz, t, N_HEAD, hd).transpose(1, 2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)  # [B,H,T,T]
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    att = att.masked_fill(mask, float("-inf"))
    att = torch.softmax(att, dim=-1)
    y = att @ v  # [B,H,T,hd]
    y = y.transpose(1, 2).contiguous().view(bsz, t, c)
    return y @ p[prefix + "c_proj.weight"] + p[prefix + "c_proj.bias"]


def mlp(x, p, prefix):
    h = x @ p[prefix + "c_fc.weight"] + p[prefix + "c_fc.bias"]
    h = F.gelu(h)  # exact erf form (approximate='none')
    return h @ p[prefix + "c_proj.weight"] + p[prefix + "c_proj.bias"]


def forward(p, idx):
    _, t = idx.shape
    pos = torch.arange(t, dtype=torch.long)
    x = p["wte.weight"][idx] + p["wpe.weight"][pos]
    for i in range(N_LAYER):
        h = f"h.{i}."
        x = x + attention(layer_norm(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"]), p, h + "attn.")
        x = x + mlp(layer_norm(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"]), p, h + "mlp.")
    x = layer_norm(x, p["ln_f.weight"], p["ln_f.bias"])
    return x @ p["wte.weight"].t()  # tied head


def main():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # bit-reproducible CPU reductions
    torch.set_default_dtype(torch.float32)

    params = init_params()

    gen = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, VOCAB_SIZE, (BATCH, BLOCK_SIZE), generator=gen, dtype=torch.int64)
    targets = torch.randint(0, VOCAB_SIZE, (BATCH, BLOCK_SIZE), generator=gen, dtype=torch.int64)

    logits = forward(params, input_ids)
    loss = F.cross_entropy(logits.view(-1, VOCAB_SIZE), targets.view(-1))
    loss.backward()

    tensors = {}
    for name, _, _ in param_shapes():
        tensors[name] = params[name].detach().contiguous()
    tensors["fixture.input_ids"] = input_ids.contiguous()
    tensors["fixture.targets"] = targets.contiguous()
    tensors["fixture.logits"] = logits.detach().contiguous()
    tensors["fixture.loss"] = loss.detach().reshape(1).contiguous()
    for name, _, _ in param_shapes():
        g = params[name].grad
        assert g is not None and g.shape == params[name].shape, name
        tensors["grad." + name] = g.detach().contiguous()

    for k, v in tensors.items():
        if k.startswith("fixture.input_ids") or k.startswith("fixture.targets"):
            assert v.dtype == torch.int64, k
        else:
            assert v.dtype == torch.float32, k

    os.makedirs(os.path.dirname(OUT_PATH), exist_ok=True)
    save_file(tensors, OUT_PATH, metadata={"generator": f"scripts/reference/gpt2_fixture.py (torch {torch.__version__})"})
    print(f"torch {torch.__version__}")
    print(f"loss = {loss.item()!r}")
    print(f"logits std = {logits.detach().std().item():.4f}")
    print(f"wrote {OUT_PATH} ({os.path.getsize(OUT_PATH)} bytes, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
