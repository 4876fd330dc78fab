#!/usr/bin/env python3
"""A tiny random Llama saved by Hugging Face `transformers`, for the Llama loader's test.

Writes ``trainer-image/tests/fixtures/hf-llama-tiny/``: what ``save_pretrained`` writes for
a ``LlamaForCausalLM`` (vocab 96, 32 positions, 2 layers, 4 query heads sharing 2
key/value heads — grouped-query attention —, hidden 32, SwiGLU MLP 64 wide, RMSNorm,
rotary embeddings with base 10000, an LM head not tied to the embedding) in one
safetensors file; and ``expected.json``: a fixed batch of token ids and the logits
``transformers`` computes for it (float32, CPU, eager attention, one thread).

Every tensor gets extra noise, so that the RMSNorm weights are not all 1 and a loader
that skipped or mistransposed one would show.

Regenerate (from the repository root):

    .venv/bin/pip install torch transformers safetensors
    .venv/bin/python scripts/reference/hf_llama_fixture.py
"""

import json
import os
import shutil

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "trainer-image", "tests", "fixtures", "hf-llama-tiny")

torch.manual_seed(0)
torch.set_num_threads(1)
config = LlamaConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    attn_implementation="eager",
)
model = LlamaForCausalLM(config).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)

shutil.rmtree(OUT, ignore_errors=True)
model.save_pretrained(OUT, safe_serialization=True)

ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
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
