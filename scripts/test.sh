#!/usr/bin/env bash
# The project's one test command (`make test`, which .ci/run calls): formatting, clippy with
# warnings as errors, then every test of the workspace. Ends with one summary line:
#   summary: N passed, M failed, K skipped (names...)
# where fmt and clippy count as one check each. A test that cannot run here (no
# ../shared/data) records itself through taper_e2e::skip in $TAPER_SKIP_LOG and is counted
# as skipped, not passed; so is an #[ignore]d test. Exits non-zero if anything failed, and
# under CI (CI=true) also if anything was skipped. A test target that does not build is a
# failure named by its target.
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
skip_log="$log_dir/skips.log"
: >"$skip_log"
TAPER_SKIP_LOG="$(cd "$log_dir" && pwd)/skips.log" \
  cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log_dir/test.log"
test_rc=${PIPESTATUS[0]}
# Sum the per-binary "test result:" lines.
read -r t_pass t_fail t_ign < <(awk '/^test result:/ {
    for (i = 1; i <= NF; i++) {
      if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1); if ($(i) ~ /^ignored;?$/) g += $(i-1)
    } } END { print p+0, f+0, g+0 }' "$log_dir/test.log")
# A test that recorded a skip returned early and reported "ok": count it as skipped instead.
skip_names=()
while IFS=$'\t' read -r name reason; do
  [ -n "$name" ] && skip_names+=("$name") && echo "SKIPPED: $name: $reason"
done <"$skip_log"
t_skip=${#skip_names[@]}
passed=$((passed + t_pass - t_skip)); failed=$((failed + t_fail)); skipped=$((skipped + t_ign + t_skip))
# Ignored tests by name.
while read -r name; do skip_names+=("$name (ignored)"); done < <(sed -n 's/^test \(.*\) \.\.\. ignored.*$/\1/p' "$log_dir/test.log")
# Targets that did not build, by name.
build_errors=$(grep -oE '^error: could not compile `[^`]+`( \([^)]*\))?' "$log_dir/test.log" | sed 's/^error: could not compile //' | sort -u)
if [ -n "$build_errors" ]; then
  while read -r target; do
    failed=$((failed + 1)); failures+=("does not build: $target")
  done <<<"$build_errors"
fi
if [ "$t_fail" -gt 0 ]; then
  failures+=("$t_fail test(s): grep -n FAILED $log_dir/test.log")
elif [ "$test_rc" -ne 0 ] && [ -z "$build_errors" ]; then
  # A crashed test binary: no test reported the failure, so name the targets here.
  crashed=$(sed -n 's/^ *`\(-p .*\)`$/\1/p' "$log_dir/test.log" | sort -u | paste -sd, -)
  failed=$((failed + 1)); failures+=("cargo test exited $test_rc without a failing test: ${crashed:-see $log_dir/test.log}")
fi

if [ "$skipped" -gt 0 ] && [ "${CI:-}" = true ]; then
  failures+=("$skipped test(s) skipped under CI, which must run everything")
fi

echo
for f in "${failures[@]}"; do echo "FAILED: $f"; done
if [ "$skipped" -gt 0 ]; then
  summary_skips="$skipped skipped ($(IFS=,; echo "${skip_names[*]}" | sed 's/,/, /g'))"
else
  summary_skips="0 skipped"
fi
echo "summary: $passed passed, $failed failed, $summary_skips"
[ "$failed" -eq 0 ] && { [ "$skipped" -eq 0 ] || [ "${CI:-}" != true ]; }
