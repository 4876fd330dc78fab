#!/usr/bin/env python3
"""A tiny random GPT-2 saved by Hugging Face `transformers`, for the loader's test.

Writes ``trainer-image/tests/fixtures/hf-gpt2-tiny/``: what ``save_pretrained`` writes for
a ``GPT2LMHeadModel`` (vocab 96, 16 positions, 2 layers, 2 heads, 32 wide, exact GELU,
no dropout) in safetensors, split into shards with ``model.safetensors.index.json`` so
that the sharded layout is what the test reads; and ``expected.json``: a fixed batch of
token ids and the logits ``transformers`` computes for it (float32, CPU, one thread).

The weights are random but not GPT-2's initialisation alone: every tensor gets extra
noise, so that biases and LayerNorm parameters are not 0 and 1 and a loader that skipped
one would show.

Regenerate (from the repository root):

    .venv/bin/pip install torch transformers safetensors
    .venv/bin/python scripts/reference/hf_gpt2_fixture.py
"""

import json
import os
import shutil

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "trainer-image", "tests", "fixtures", "hf-gpt2-tiny")

torch.manual_seed(0)
torch.set_num_threads(1)
config = GPT2Config(
    vocab_size=96,
    n_positions=16,
    n_embd=32,
    n_layer=2,
    n_head=2,
    activation_function="gelu",
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    layer_norm_epsilon=1e-5,
    bos_token_id=95,
    eos_token_id=95,
)
model = GPT2LMHeadModel(config).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)

shutil.rmtree(OUT, ignore_errors=True)
model.save_pretrained(OUT, safe_serialization=True, max_shard_size="40KB")

ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits = model(ids).logits
with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump(
        {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "input_ids": ids.tolist(),
            "logits": logits.tolist(),
        },
        f,
    )
print("wrote", sorted(os.listdir(OUT)))
