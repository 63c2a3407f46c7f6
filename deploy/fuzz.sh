#!/usr/bin/env bash
# Fuzzing with cargo fuzz (libFuzzer) of everything that decodes outside input: the
# targets are in tests/fuzz/fuzz_targets (one file each, saying what it checks).
#
#   bash deploy/fuzz.sh smoke [SECONDS]        every target SECONDS (default 20) each; CI
#   bash deploy/fuzz.sh run TARGET SECONDS     a longer run of one target (run several at
#                                              once for several cores)
#   bash deploy/fuzz.sh list
#
# cargo fuzz needs nightly compiler flags; the stable toolchain is told to accept them
# (RUSTC_BOOTSTRAP=1), so no second toolchain is needed. No sanitizer: the code forbids
# `unsafe`, and what is looked for is panics, overflows, runaway memory and broken
# invariants (the targets assert round trips and idempotence). Debug assertions are on.
#
# Corpora: tests/fuzz/seeds/TARGET (committed starting inputs) and
# tests/fuzz/regressions/TARGET (every input that ever crashed, replayed on each run),
# plus a working corpus in $TESSERA_CACHE/fuzz-corpus. A crash leaves its input in
# $TESSERA_CACHE/fuzz-artifacts/TARGET and fails the run.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cache="${TESSERA_CACHE:-$HOME/.cache/tessera}"
fuzz_dir=tests/fuzz
export CARGO_TARGET_DIR="$cache/fuzz-target"
export RUSTC_BOOTSTRAP=1
export PATH="$cache/cargo-fuzz/bin:$PATH"
cargo_fuzz_version=0.13.2

targets() { sed -n 's/^name = "\(.*\)"$/\1/p' "$fuzz_dir/Cargo.toml" | grep -v '^tessera-fuzz$'; }

install() {
  if ! cargo fuzz --version 2>/dev/null | grep -q "$cargo_fuzz_version"; then
    echo "fuzz: installing cargo-fuzz $cargo_fuzz_version" >&2
    cargo install --locked --quiet cargo-fuzz --version "$cargo_fuzz_version" --root "$cache/cargo-fuzz"
  fi
}

build() {
  echo "fuzz: building the targets (the first build compiles RocksDB and librdkafka again, instrumented)" >&2
  cargo fuzz build --fuzz-dir "$fuzz_dir" --sanitizer none --debug-assertions
}

# run TARGET SECONDS
run() {
  local t="$1" secs="$2"
  local work="$cache/fuzz-corpus/$t" artifacts="$cache/fuzz-artifacts/$t"
  mkdir -p "$work" "$artifacts" "$fuzz_dir/seeds/$t" "$fuzz_dir/regressions/$t"
  local started=$SECONDS
  # The first crash ends the run.
  if ! cargo fuzz run --fuzz-dir "$fuzz_dir" --sanitizer none --debug-assertions "$t" \
      "$work" "$fuzz_dir/seeds/$t" "$fuzz_dir/regressions/$t" -- \
      -max_total_time="$secs" -max_len=16384 -rss_limit_mb=2048 \
      -timeout=10 -artifact_prefix="$artifacts/" -print_final_stats=1 > "$cache/fuzz-$t.log" 2>&1; then
    echo "fuzz: $t FAILED after $((SECONDS - started)) s; input in $artifacts, log in $cache/fuzz-$t.log:" >&2
    grep -E "panicked|ERROR|SUMMARY|Test unit written" "$cache/fuzz-$t.log" | head -20 >&2
    return 1
  fi
  local execs
  execs="$(awk '/stat::number_of_executed_units/ {print $2}' "$cache/fuzz-$t.log")"
  echo "fuzz: $t ok: ${execs:-?} inputs in $((SECONDS - started)) s, corpus $(ls "$work" | wc -l)" >&2
}

case "${1:-smoke}" in
  list) targets ;;
  smoke)
    secs="${2:-20}"
    install
    build
    passed=0 failed=0
    for t in $(targets); do
      if run "$t" "$secs"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
    done
    # The test command's closing count reads this line (cargo's format).
    echo "test result: $([ "$failed" = 0 ] && echo ok || echo FAILED). $passed passed; $failed failed; fuzz smoke, ${secs} s per target"
    [ "$failed" = 0 ]
    ;;
  run)
    [ $# -ge 3 ] || { echo "usage: deploy/fuzz.sh run TARGET SECONDS" >&2; exit 2; }
    install
    build
    run "$2" "$3"
    ;;
  *) echo "usage: deploy/fuzz.sh smoke [SECONDS] | run TARGET SECONDS | list" >&2; exit 2 ;;
esac
