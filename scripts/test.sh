#!/usr/bin/env bash
# The project's one test command (`make test`, which .ci/run calls): formatting, clippy with
# warnings as errors, then every test of the workspace. Ends with one summary line:
#   summary: N passed, M failed, K skipped
# where fmt and clippy count as one check each. Exits non-zero if anything failed.
set -uo pipefail
cd "$(dirname "$0")/.."

log_dir=${TAPER_TEST_LOG_DIR:-target/test-logs}
mkdir -p "$log_dir"
passed=0 failed=0 skipped=0
failures=()

step() { printf '\n==> %s\n' "$*"; }

step "e2e/scripts/build-tools.sh (real servers for the tests; cached in e2e/.bin)"
if e2e/scripts/build-tools.sh >"$log_dir/tools.log" 2>&1; then
  tail -n 5 "$log_dir/tools.log"
else
  cat "$log_dir/tools.log"; failed=$((failed + 1)); failures+=("building the e2e tools (see $log_dir/tools.log)")
fi

step "cargo fmt --all --check"
if cargo fmt --all --check >"$log_dir/fmt.log" 2>&1; then
  passed=$((passed + 1))
else
  cat "$log_dir/fmt.log"; failed=$((failed + 1)); failures+=("cargo fmt (run: cargo fmt --all)")
fi

step "cargo clippy --workspace --all-targets -- -D warnings"
if cargo clippy --workspace --all-targets --locked -- -D warnings >"$log_dir/clippy.log" 2>&1; then
  passed=$((passed + 1))
else
  grep -E '^(warning|error)' -A12 "$log_dir/clippy.log" | head -200
  failed=$((failed + 1)); failures+=("cargo clippy (see $log_dir/clippy.log)")
fi

if [ "${TAPER_CUDA_CHECK:-0}" = 1 ]; then
  # Opt-in: the CUDA kernels take about 11 minutes to compile on 2 cores.
  step "trainer-image/scripts/build-cuda.sh check (TAPER_CUDA_CHECK=1)"
  if trainer-image/scripts/build-cuda.sh check >"$log_dir/cuda.log" 2>&1; then
    passed=$((passed + 1))
  else
    tail -n 40 "$log_dir/cuda.log"; failed=$((failed + 1)); failures+=("cargo check --features cuda (see $log_dir/cuda.log)")
  fi
fi

step "cargo test --workspace"
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log_dir/test.log"
test_rc=${PIPESTATUS[0]}
# Sum the per-binary "test result:" lines.
read -r t_pass t_fail t_ign < <(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1); if ($(i) ~ /^ignored;?$/) g += $(i-1)
    } } END { print p+0, f+0, g+0 }' "$log_dir/test.log")
passed=$((passed + t_pass)); failed=$((failed + t_fail)); skipped=$((skipped + t_ign))
if [ "$test_rc" -ne 0 ] && [ "$t_fail" -eq 0 ]; then
  # A build error or a crashed test binary: no test reported the failure, so count it here.
  failed=$((failed + 1)); failures+=("cargo test exited $test_rc without a failing test (build error?)")
elif [ "$t_fail" -gt 0 ]; then
  failures+=("$t_fail test(s): grep -n FAILED $log_dir/test.log")
fi

echo
for f in "${failures[@]}"; do echo "FAILED: $f"; done
echo "summary: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
