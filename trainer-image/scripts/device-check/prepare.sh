#!/usr/bin/env bash
# Prepares everything the GPU device check needs in the git-ignored .device/ folder, which
# is then carried to the GPU machine (it has CUDA and PyTorch but no Rust and no network):
#
#   trainer-image/scripts/device-check/prepare.sh      # here, on the CPU machine
#   bash trainer-image/scripts/device-check/run.sh     # there, with .device/ carried
#
# .device/ gets: the CUDA build of `taper` (stripped), PyTorch's reference trainer
# (../shared/bench/torch_gpt_ref.py) and Tiny Shakespeare tokenized with GPT-2 BPE by
# `taper prepare` (train.bin is uint16, so the PyTorch reference reads the same tokens).
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
shared=${TAPER_SHARED_DATA:-$root/../shared/data}
out=$root/.device
cd "$root"
[ -f "$shared/tinyshakespeare.txt" ] || { echo "prepare.sh: $shared/tinyshakespeare.txt is missing (set TAPER_SHARED_DATA)" >&2; exit 1; }
[ -f "$shared/../bench/torch_gpt_ref.py" ] || { echo "prepare.sh: $shared/../bench/torch_gpt_ref.py is missing" >&2; exit 1; }

cuda_bin=target/cuda/release/taper
if [ ! -x "$cuda_bin" ] || [ -n "$(find trainer-image/src crds/src -newer "$cuda_bin" -name '*.rs' | head -1)" ]; then
  trainer-image/scripts/build-cuda.sh build
fi
# A CPU build, to tokenize here: built as the test suite builds it (a plain `cargo build`
# resolves other features and recompiles much of the dependency tree).
cargo test -p taper-trainer --no-run

rm -rf "$out" && mkdir -p "$out/data"
cp "$cuda_bin" "$out/taper" && strip "$out/taper"
cp "$shared/../bench/torch_gpt_ref.py" "$out/"
cat >"$out/dataset.yaml" <<YAML
apiVersion: taper.dev/v1alpha1
kind: Dataset
metadata:
  name: shakespeare
spec:
  format: pretraining
  sources:
    - name: tinyshakespeare
      uri: file://$shared/tinyshakespeare.txt
      format: text
  cleaning:
    # Verse: the web-text quality rules would drop most speeches.
    disable: [c4TerminalPunctuation, c4ShortLines, gopherWordCount, gopherStopWords, gopherMeanWordLength]
  split:
    testSize: 0.1
  output:
    uri: file://$out/data/shakespeare
YAML
target/debug/taper prepare --job "$out/dataset.yaml" >/dev/null
rm "$out/dataset.yaml"
# One file for the PyTorch reference (nanoGPT's train.bin layout: uint16 tokens).
cat "$out"/data/shakespeare/train-*.bin >"$out/data/train.bin"
git rev-parse --short HEAD >"$out/commit"
du -sh "$out"
ls -la "$out" "$out/data/shakespeare"
