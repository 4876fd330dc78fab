#!/usr/bin/env python3
"""Print the datatrove MinHash figures that Taper's dedup unit tests pin
(`trainer-image/src/prepare/dedup/tests.rs`): datatrove's default `MinhashConfig`
(5-grams, 14 buckets x 8 hashes, seed 1), its hash-function coefficients, the text
normalisation `simplify_text`, the shingles of a sentence and their signature.

With `--check`, also look each printed figure up in the tests file and exit 1 when one
is missing, so a drift between datatrove and the pinned values is caught.

Needs datatrove 0.10.1 with its MinHash dependencies, in a virtual environment of its own
(git-ignored under `.cache/`):

    python3 -m venv .cache/datatrove-venv
    .cache/datatrove-venv/bin/pip install "datatrove==0.10.1" "xxhash<3.6" spacy regex tokenizers orjson
    .cache/datatrove-venv/bin/python scripts/reference/datatrove_minhash.py --check

(xxhash 3.6+ refuses the str shingles datatrove 0.x hashes.)
"""

import argparse
import importlib.metadata as md
import re
import sys
from pathlib import Path

import numpy as np
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.utils.text import simplify_text

TESTS = Path(__file__).resolve().parents[2] / "trainer-image/src/prepare/dedup/tests.rs"

# The texts the tests use (`text_is_simplified_as_datatrove_does`,
# `shingles_and_signatures_are_datatroves`).
SIMPLIFY_TEXT = "Héllo, WORLD! It's 3.14 — naïve café 1,000,000 monday\tMay  ¿Qué? 10km"
SHINGLE_TEXT = "The quick brown fox jumps over the lazy dog, again and again."
SHORT_TEXT = "only four words here"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help=f"look each figure up in {TESTS.name}")
    args = ap.parse_args()

    versions = {p: md.version(p) for p in ("datatrove", "numpy", "xxhash", "spacy")}
    print("versions:", ", ".join(f"{k} {v}" for k, v in versions.items()))

    cfg = MinhashConfig()
    print(f"config: {cfg.n_grams}-grams, {cfg.num_buckets} bands x {cfg.hashes_per_bucket} rows, seed {cfg.seed}")
    sig = MinhashDedupSignature(output_folder="/tmp/taper-datatrove-minhash-unused", config=cfg)
    a, b = (x.ravel().tolist() for x in sig.parameters)
    n = len(a)
    print(f"coefficients a[..3] = {a[:3]}, a[{n - 1}] = {a[-1]}")
    print(f"coefficients b[..3] = {b[:3]}, b[{n - 1}] = {b[-1]}")

    simple = simplify_text(SIMPLIFY_TEXT, cfg.norm_config)
    print(f"simplify_text({SIMPLIFY_TEXT!r}) = {simple!r}")

    sh = sig.get_shingles(SHINGLE_TEXT)
    distinct = np.unique(sh.ravel()).tolist()
    # The tests check three of them: the first three in text order.
    first = list(dict.fromkeys(sh.ravel().tolist()))[:3]
    print(f"shingles({SHINGLE_TEXT!r}): {len(distinct)} distinct, the first three {first}")
    signature = [h for band in sig.get_signature(sh) for h in band]
    print(f"signature[..4] = {signature[:4]}, signature[{len(signature) - 1}] = {signature[-1]}")
    short = sig.get_shingles(SHORT_TEXT)
    print(f"shingles({SHORT_TEXT!r}): {short.size}")

    if not args.check:
        return 0
    tests = TESTS.read_text()
    pinned = re.sub(r"\s", "", tests)
    digits = pinned.replace("_", "")
    figures = [*a[:3], a[-1], *b[:3], b[-1], *first, *signature[:4], signature[-1]]
    missing = [f for f in figures if str(f) not in digits]
    if f'"{simple}"' not in tests:
        missing.append(repr(simple))
    if f"assert_eq!(sh.len(),{len(distinct)});" not in pinned:
        missing.append(f"{len(distinct)} shingles")
    if short.size != 0:
        missing.append("no shingles for a four-word text")
    if missing:
        print(f"NOT pinned in {TESTS}: {missing}")
        return 1
    print(f"all {len(figures) + 3} figures are pinned in {TESTS.relative_to(TESTS.parents[4])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
