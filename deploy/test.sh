#!/usr/bin/env bash
# README command 2: installs what is missing, starts one fresh Apache Kafka on free
# loopback ports for the whole run (unless KAFKA_BOOTSTRAP names one), builds the
# service binaries and runs every unit and end-to-end test, the chart and monitoring
# checks, the README's run command from an empty cache, and a short fuzzing run.
#
# Caches outside the clone, reused when present: $TESSERA_CACHE (default
# ~/.cache/tessera) holds the Kafka jars, the Python SDK's venv, the cargo target
# directory (CARGO_TARGET_DIR, if you set one, wins), cargo-fuzz and the fuzz build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

export TESSERA_CACHE="${TESSERA_CACHE:-$HOME/.cache/tessera}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TESSERA_CACHE/target}"
mkdir -p "$TESSERA_CACHE"

bash deploy/setup.sh --for-tests

if [ -z "${KAFKA_BOOTSTRAP:-}" ]; then
  data="$(mktemp -d "${TMPDIR:-/tmp}/tessera-test-kafka.XXXXXX")"
  cleanup() { bash deploy/kafka.sh stop --data "$data" || true; rm -rf "$data"; }
  trap cleanup EXIT
  KAFKA_BOOTSTRAP="$(bash deploy/kafka.sh start --data "$data" --watch-pid $$)"
  export KAFKA_BOOTSTRAP
fi
echo "test: Apache Kafka at $KAFKA_BOOTSTRAP" >&2

# The end-to-end tests run the real service binaries too.
cargo build --locked --workspace --bins
log="$(mktemp "${TMPDIR:-/tmp}/tessera-test-log.XXXXXX")"
status=0
cargo test --locked --workspace --all-targets "$@" 2>&1 | tee "$log" || status=$?

# The Helm chart and the monitoring files (tests/ops): lint and render the chart,
# validate it against the Kubernetes schemas, feed its configuration to the service
# binaries, check the alert rules with promtool. Helm comes as a library from PyPI.
venv="$TESSERA_CACHE/venv-ops-tests"
marker="$venv/.requirements-$(sha256sum tests/ops/requirements.txt | cut -c1-16)"
if [ ! -f "$marker" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q -r tests/ops/requirements.txt
  touch "$marker"
fi
TESSERA_BIN_DIR="$CARGO_TARGET_DIR/debug" "$venv/bin/python" -m pytest -q tests/ops 2>&1 | tee -a "$log" || status=$?

# The README's first command on a machine with nothing cached (tests/readme-run.sh):
# deploy/run.sh against an empty TESSERA_CACHE, one event through, Ctrl-C.
bash tests/readme-run.sh 2>&1 | tee -a "$log" || status=$?

# Fuzzing (tests/fuzz, cargo fuzz): every target runs briefly, after replaying every input
# that ever crashed it. The first run builds the targets instrumented (RocksDB and
# librdkafka again: ~20 min on 2 cores); later runs reuse $TESSERA_CACHE/fuzz-target.
bash deploy/fuzz.sh smoke "${TESSERA_FUZZ_SECONDS:-20}" 2>&1 | tee -a "$log" || status=$?

# No personal data in logs: the test people's emails are at these domains, and the whole
# run's output holds the in-process services' logs (the privacy test reads the logs of the
# services it runs as processes). A failed assertion may quote one: that run fails anyway.
pii='@(example\.(com|net|org)|mail\.test|guest\.example)'
if grep -qE "$pii" "$log"; then
  echo "test: the run's logs hold test people's emails:" >&2
  grep -m 5 -E "$pii" "$log" | cut -c1-300 >&2
  status=1
fi

# One closing line for the whole run (cargo prints one per test binary, pytest one).
awk '/^test result:/ || / (passed|failed)[ ,].*in [0-9.]+s/ || /^readme-run: [0-9]+ passed/ {
       for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\n%d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
exit "$status"
