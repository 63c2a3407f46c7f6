#!/usr/bin/env bash
# README command 1: runs Tessera locally.
# Installs what is missing, builds, starts Apache Kafka (data kept in .tessera/kafka)
# unless KAFKA_BOOTSTRAP names an existing cluster, starts ingest, identity, profiles,
# activation and the console on the embedded default configuration with the example
# definitions in deploy/definitions, sends the demo people (deploy/demo/people.json)
# and a trickle of demo events, waits until all is ready and prints where to look.
# Ctrl-C stops everything it started.
#
# Options through the environment: KAFKA_BOOTSTRAP=host:port (use that Kafka),
# TESSERA_CONFIG=file.toml (layered over the defaults), TESSERA_PROFILE=release,
# TESSERA_DEMO=0 (no demo people, no demo traffic), TESSERA_WORK=dir (state, logs and
# the broker's data; default .tessera).
#
# It runs the services in demo mode (TESSERA__DEMO=true): the built-in demo credentials
# below work. Outside demo mode the services refuse to start with them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

export TESSERA_CACHE="${TESSERA_CACHE:-$HOME/.cache/tessera}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$TESSERA_CACHE/target}"
mkdir -p "$TESSERA_CACHE"
profile="${TESSERA_PROFILE:-dev}"
bindir="$CARGO_TARGET_DIR/$([ "$profile" = dev ] && echo debug || echo "$profile")"
work="${TESSERA_WORK:-$root/.tessera}"
# The services refuse state written in an older format (common/src/service.rs,
# state_format). Local state is disposable: when the formats changed, start afresh.
state_formats="identity=6 profiles=5 activation=2"
if [ -d "$work/state" ] && [ "$(cat "$work/state/FORMATS" 2>/dev/null)" != "$state_formats" ] \
    && [ -n "$(ls -A "$work/state" 2>/dev/null)" ]; then
  echo "run: local state from an older Tessera (formats: $(cat "$work/state/FORMATS" 2>/dev/null || echo unstamped)) is reset" >&2
  [ -f "$work/kafka/kafka.pid" ] && bash deploy/kafka.sh stop --data "$work/kafka" >/dev/null 2>&1 || true
  rm -rf "$work/state" "$work/kafka"
fi
mkdir -p "$work/logs" "$work/state"
echo "$state_formats" >"$work/state/FORMATS"

bash deploy/setup.sh
echo "run: building the services ($profile profile; the first build takes ~25 min on 2 cores)" >&2
cargo build --locked --profile "$profile" --workspace --bins

pids=()
kafka_started=""
demo_pid=""
stop_all() {
  trap - INT TERM EXIT
  echo >&2
  echo "run: stopping" >&2
  [ -n "$demo_pid" ] && kill -TERM "$demo_pid" 2>/dev/null
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "$kafka_started" ]; then bash deploy/kafka.sh stop --data "$work/kafka"; fi
  echo "run: stopped" >&2
}
trap 'stop_all; exit 0' INT TERM
trap stop_all EXIT

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [ -z "${KAFKA_BOOTSTRAP:-}" ]; then
  kafka_ports=()
  # The usual ports when free on the first start; kafka.sh keeps them with the data.
  if [ ! -f "$work/kafka/ports" ] && port_free 9092 && port_free 9093; then
    kafka_ports=(--port 9092 --controller-port 9093)
  fi
  KAFKA_BOOTSTRAP="$(bash deploy/kafka.sh start --data "$work/kafka" "${kafka_ports[@]}")"
  kafka_started=1
fi
export KAFKA_BOOTSTRAP
export TESSERA__DEMO=true
export TESSERA__PROFILES__DEFINITIONS_DIR="${TESSERA__PROFILES__DEFINITIONS_DIR:-$root/deploy/definitions}"
export TESSERA__INGEST__STATE_DIR="${TESSERA__INGEST__STATE_DIR:-$work/state/ingest}"
export TESSERA__IDENTITY__STATE_DIR="${TESSERA__IDENTITY__STATE_DIR:-$work/state/identity}"
export TESSERA__PROFILES__STATE_DIR="${TESSERA__PROFILES__STATE_DIR:-$work/state/profiles}"
export TESSERA__ACTIVATION__STATE_DIR="${TESSERA__ACTIVATION__STATE_DIR:-$work/state/activation}"

services=(ingest identity profiles activation console)
for svc in "${services[@]}"; do
  "$bindir/tessera-$svc" >>"$work/logs/$svc.log" 2>&1 &
  pids+=($!)
done

declare -A ports=([ingest]=8080 [identity]=8081 [profiles]=8082 [activation]=8083 [console]=8084)
for svc in "${services[@]}"; do
  url="http://127.0.0.1:${ports[$svc]}/readyz"
  for _ in $(seq 1 120); do
    curl -fsS "$url" >/dev/null 2>&1 && break
    sleep 0.5
  done
  curl -fsS "$url" >/dev/null 2>&1 || { echo "run: $svc did not become ready; see $work/logs/$svc.log" >&2; exit 1; }
done

if [ "${TESSERA_DEMO:-1}" != 0 ]; then
  # The demo people (the same message ids each time: a second run changes nothing),
  # then a trickle of their events.
  curl -fsS -o /dev/null -u demo-write-key: -H 'Content-Type: application/json' \
    http://127.0.0.1:8080/v1/batch --data-binary @deploy/demo/people.json \
    || echo "run: the demo people were not accepted; see $work/logs/ingest.log" >&2
  bash deploy/demo/traffic.sh http://127.0.0.1:8080 demo-write-key >>"$work/logs/demo-traffic.log" 2>&1 &
  demo_pid=$!
fi

cat <<INFO

Tessera is running on Apache Kafka at $KAFKA_BOOTSTRAP.

  console     http://127.0.0.1:8084   log in as admin / tessera-demo; search ada@example.com,
                                      build a segment, watch the pipeline (demo events flow:
                                      TESSERA_DEMO=0 turns them off)
  ingest      http://127.0.0.1:8080   Segment HTTP API (write key: demo-write-key)
  identity    http://127.0.0.1:8081   /v1/identity/lookup  /v1/identity/profiles/{id}  (merges, un-merge)
                                      /v1/privacy/requests  (delete, suppress, export: token demo-privacy-token)
  profiles    http://127.0.0.1:8082   /v1/profiles/{id}  /v1/profiles/lookup  /v1/segments  /v1/computed-traits  /v1/households/{id}
  activation  http://127.0.0.1:8083   /metrics; records (JSON) on topics tessera.activation.email-demo,
                                      tessera.activation.cart-email, tessera.activation.google-audience
  logs        $work/logs/
  definitions $TESSERA__PROFILES__DEFINITIONS_DIR (segments, computed traits and triggers; change them at run time with the API)

Try it (the services' own APIs take the demo token, [admin] tokens in the configuration):

  curl -u demo-write-key: -H 'Content-Type: application/json' http://127.0.0.1:8080/v1/batch -d '{"batch":[
    {"type":"identify","userId":"ada","anonymousId":"a-1","traits":{"email":"ada@example.com","first_name":"Ada"}},
    {"type":"track","userId":"ada","event":"Order Completed","properties":{"total":42}}]}'
  alias tcurl='curl -H "Authorization: Bearer demo-admin-token"'
  tcurl 'http://127.0.0.1:8082/v1/profiles/lookup?type=email&value=ada@example.com'
  tcurl 'http://127.0.0.1:8081/v1/identity/lookup?type=email&value=Ada@Example.com'
  tcurl http://127.0.0.1:8082/v1/segments
  tcurl http://127.0.0.1:8082/v1/segments/buyers/members
  tcurl http://127.0.0.1:8082/v1/triggers      # abandoned-cart: a Cart Viewed with no order within 1 h
  # Export, then erase Ada everywhere (the privacy API takes only its own token):
  pcurl() { curl -H "Authorization: Bearer demo-privacy-token" -H 'Content-Type: application/json' "\$@"; }
  pcurl http://127.0.0.1:8081/v1/privacy/requests -d '{"action":"export","identifier":{"type":"email","value":"ada@example.com"}}'
  pcurl http://127.0.0.1:8081/v1/privacy/requests -d '{"action":"delete","identifier":{"type":"user_id","value":"ada"}}'
  pcurl http://127.0.0.1:8081/v1/privacy/requests/<request_id>

Press Ctrl-C to stop.
INFO
wait -n "${pids[@]}" || true
# Ctrl-C reaches the services too; give the INT trap the chance to run first.
sleep 1
echo "run: a service exited unexpectedly; see $work/logs/" >&2
exit 1
