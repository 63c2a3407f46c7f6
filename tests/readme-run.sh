#!/usr/bin/env bash
# The README's first command as a new user runs it, on a machine that has nothing cached:
# deploy/run.sh with an empty TESSERA_CACHE (a folder that does not exist yet; only the
# cargo target directory is reused, so nothing is built twice), its own broker and a
# fresh work folder. Waits until it prints where to look, sends one event with the demo
# write key, reads the person back through the profile API, then stops it with Ctrl-C
# (SIGINT) and checks that everything it started has stopped.
#
# Run by deploy/test.sh; needs ports 8080-8084 free (stop a local run first).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
: "${CARGO_TARGET_DIR:?the cargo target directory to reuse}"
say() { echo "readme-run: $*" >&2; }

for port in 8080 8081 8082 8083 8084; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    say "port $port is in use (a local run?): stop it first"
    exit 1
  fi
done

tmp="$(mktemp -d "${TMPDIR:-/tmp}/tessera-readme-run.XXXXXX")"
log="$tmp/run.log"
pid=""
finish() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM -- "-$pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap finish EXIT

# setsid: run.sh leads its own process group, as in a terminal, so Ctrl-C is a signal to it.
env -u KAFKA_BOOTSTRAP TESSERA_CACHE="$tmp/cache" TESSERA_WORK="$tmp/work" \
  CARGO_TARGET_DIR="$CARGO_TARGET_DIR" TESSERA_DEMO=1 \
  setsid bash "$root/deploy/run.sh" >"$log" 2>&1 </dev/null &
pid=$!

fail() {
  say "$*; its output:"
  tail -n 40 "$log" | sed 's/^/  | /' >&2
  for f in "$tmp"/work/logs/*.log; do
    [ -f "$f" ] && { echo "  -- $f" >&2; tail -n 5 "$f" | cut -c1-300 | sed 's/^/  | /' >&2; }
  done
  exit 1
}

# Building is a no-op here; assembling Kafka from Maven Central into the empty cache is not.
for _ in $(seq 1 600); do
  grep -q "Tessera is running" "$log" && break
  kill -0 "$pid" 2>/dev/null || fail "deploy/run.sh exited before it was ready"
  sleep 1
done
grep -q "Tessera is running" "$log" || fail "deploy/run.sh was not ready within 10 minutes"
[ -d "$tmp/cache" ] || fail "the cache folder was not created"
say "ready"

user="readme-$(date +%s)-$$"
code="$(curl -sS -o "$tmp/answer" -w '%{http_code}' -u demo-write-key: -H 'Content-Type: application/json' \
  http://127.0.0.1:8080/v1/identify \
  -d "{\"userId\":\"$user\",\"traits\":{\"first_name\":\"Readme\",\"plan\":\"trial\"}}")"
[ "$code" = 200 ] || fail "the event was refused ($code: $(cat "$tmp/answer"))"
found=""
for _ in $(seq 1 120); do
  if curl -fsS -H 'Authorization: Bearer demo-admin-token' \
      "http://127.0.0.1:8082/v1/profiles/lookup?type=user_id&value=$user" 2>/dev/null | grep -q '"plan"'; then
    found=1
    break
  fi
  sleep 0.5
done
[ -n "$found" ] || fail "the event's person did not reach the profile API within 60 s"
say "one event went through to its profile"

kill -INT -- "-$pid"
for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
kill -0 "$pid" 2>/dev/null && fail "deploy/run.sh did not stop within 60 s of Ctrl-C"
wait "$pid" || true
grep -q "run: stopped" "$log" || fail "deploy/run.sh did not stop cleanly"
if pgrep -f "$tmp/" >/dev/null; then fail "processes it started are still running: $(pgrep -af "$tmp/" | cut -c1-200)"; fi
for port in 8080 8081 8082 8083 8084; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then fail "port $port still answers after the stop"; fi
done
say "stopped"
echo "readme-run: 1 passed, 0 failed"
