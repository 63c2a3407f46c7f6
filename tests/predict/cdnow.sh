#!/usr/bin/env bash
# Predictive traits on public data (issue 23), measured like a user: a fresh platform
# started by the README's run command (release build, no demo traffic), the CDNOW
# sample's calibration orders sent over HTTP, a fit asked for through the API, every
# customer's values read back from the profile API, and `lifetimes` run on the same data
# beside it. The sample ships with `lifetimes` on PyPI (MIT), downloaded on first use.
#
#   bash tests/predict/cdnow.sh
#
# Prints the tables BENCHMARKS.md records.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
cache="${TESSERA_CACHE:-$HOME/.cache/tessera}"
venv="$cache/venv-predict"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import lifetimes' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q lifetimes==0.11.3
fi
py="$venv/bin/python"
sample="$("$py" -c 'import lifetimes.datasets, os; print(os.path.join(os.path.dirname(lifetimes.datasets.__file__), "CDNOW_sample.txt"))')"
work="$(mktemp -d /tmp/tessera-cdnow-XXXX)"
TESSERA_PROFILE=release TESSERA_DEMO=0 TESSERA_WORK="$work" bash deploy/run.sh >"$work/run.out" 2>&1 &
run=$!
trap 'kill -TERM "$run" 2>/dev/null; wait "$run" 2>/dev/null || true' EXIT
for _ in $(seq 1 2400); do
  grep -q "Tessera is running" "$work/run.out" 2>/dev/null && break
  kill -0 "$run" 2>/dev/null || { cat "$work/run.out"; exit 1; }
  sleep 0.5
done
"$py" tests/predict/cdnow.py send "$sample" "$work/values.json"
"$py" tests/predict/cdnow.py score "$sample" "$work/values.json"
