#!/usr/bin/env bash
# Checkpoint throughput against a real MinIO on loopback: `Checkpointer::save` of a GPT-2
# small checkpoint next to plain multipart PUTs of the same files, and the training stall
# (the snapshot). Builds MinIO first if needed (e2e/scripts/build-tools.sh minio).
#
#   scripts/bench/checkpoint_bench.sh                 # 3 A/B rounds, gpt2-small
#   TAPER_BENCH_ROUNDS=5 TAPER_BENCH_PRESET=baby scripts/bench/checkpoint_bench.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -x e2e/.bin/minio ] || e2e/scripts/build-tools.sh minio
# The dev profile: the work is in dependencies (candle, sha2, the AWS SDK), which it
# optimises (opt-level 2), and it reuses the test build instead of a release build.
exec cargo bench --profile dev -p taper-trainer --bench checkpoint_upload
