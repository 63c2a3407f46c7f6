#!/usr/bin/env bash
# Apache Kafka for Tessera, assembled from Maven Central and run in KRaft mode on loopback.
#
#   deploy/kafka.sh install                      fetch the broker's jars (cached, keyed by version)
#   deploy/kafka.sh start --data DIR [--port P] [--controller-port C] [--watch-pid PID] [--sasl]
#                                                format DIR once, start a single-node broker+controller,
#                                                wait until it answers; prints the bootstrap address.
#                                                --sasl: also a SASL_PLAINTEXT listener (PLAIN, user
#                                                tessera, password tessera-secret) whose address goes
#                                                to DIR/sasl_bootstrap
#   deploy/kafka.sh stop --data DIR              stop the broker started with that data folder
#   deploy/kafka.sh cluster --data DIR [--nodes N] [--watch-pid PID]
#                                                N nodes (default 3) as one KRaft quorum, each broker
#                                                and controller, in DIR/node-<id>; replication factor
#                                                N, min ISR N-1; prints the bootstrap list. Stop each
#                                                node with: stop --data DIR/node-<id>
#
# Cache: $TESSERA_CACHE (default ~/.cache/tessera)/kafka-<version>/libs, outside the clone.
# --watch-pid stops the broker when that process exits (the test harness uses it).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${TESSERA_CACHE:-$HOME/.cache/tessera}"
version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/kafka/pom.xml")"
libs="$cache/kafka-$version/libs"

log() { echo "kafka.sh: $*" >&2; }

ensure_java() {
  if command -v java >/dev/null 2>&1 && command -v mvn >/dev/null 2>&1; then return; fi
  log "installing Java 17 and Maven from Debian"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null
}

install() {
  ensure_java
  if [ -f "$libs/kafka_2.13-$version.jar" ]; then echo "$libs"; return; fi
  log "assembling Apache Kafka $version from Maven Central into $libs"
  local tmp
  mkdir -p "$cache"
  tmp="$(mktemp -d "$cache/kafka-tmp.XXXXXX")"
  (cd "$here/kafka" && mvn -q -B -Dstyle.color=never dependency:copy-dependencies -DincludeScope=runtime \
    -DoutputDirectory="$tmp/libs" >&2)
  mkdir -p "$cache/kafka-$version"
  rm -rf "$libs"
  mv "$tmp/libs" "$libs"
  rm -rf "$tmp"
  echo "$libs"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

start() {
  local data="" port="" cport="" watch="" sasl=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --data) data="$2"; shift 2 ;;
      --sasl) sasl="yes"; shift ;;
      --port) port="$2"; shift 2 ;;
      --controller-port) cport="$2"; shift 2 ;;
      --watch-pid) watch="$2"; shift 2 ;;
      *) log "unknown option $1"; exit 2 ;;
    esac
  done
  [ -n "$data" ] || { log "start needs --data DIR"; exit 2; }
  mkdir -p "$data"
  data="$(cd "$data" && pwd)"
  install >/dev/null
  if [ -f "$data/kafka.pid" ] && kill -0 "$(cat "$data/kafka.pid")" 2>/dev/null; then
    log "a broker already runs on $data (pid $(cat "$data/kafka.pid"))"
    cat "$data/bootstrap"
    return
  fi
  # Ports are kept with the data so a restarted broker keeps its address.
  local sport=""
  if [ -z "$port" ] && [ -f "$data/ports" ]; then read -r port cport sport < "$data/ports"; fi
  [ -n "$port" ] || port="$(free_port)"
  [ -n "$cport" ] || cport="$(free_port)"
  if [ -n "$sasl" ] && [ -z "$sport" ]; then sport="$(free_port)"; fi
  start_node 1 "$data" "$port" "$cport" "1@127.0.0.1:$cport" 1 "$watch" "$sport"
  wait_started "$data" 90
  local pid
  pid="$(cat "$data/kafka.pid")"
  log "Apache Kafka $version up on 127.0.0.1:$port (pid $pid, data $data)"
  echo "127.0.0.1:$port"
}

# Starts node $1 of a quorum: data dir $2, ports $3/$4, voters $5, replication $6.
# $8, if set: the port of a SASL_PLAINTEXT listener (PLAIN, one user: tessera).
start_node() {
  local id="$1" data="$2" port="$3" cport="$4" voters="$5" rf="$6" watch="$7" sport="${8:-}"
  local isr=$(( rf > 1 ? rf - 1 : 1 ))
  mkdir -p "$data"
  echo "$port $cport $sport" > "$data/ports"
  local listeners="PLAINTEXT://127.0.0.1:$port" sasl_props=""
  if [ -n "$sport" ]; then
    listeners="$listeners,SASL_PLAINTEXT://127.0.0.1:$sport"
    sasl_props="sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_tessera=\"tessera-secret\";"
    echo "127.0.0.1:$sport" > "$data/sasl_bootstrap"
  fi
  cat > "$data/server.properties" <<PROPS
process.roles=broker,controller
node.id=$id
listeners=$listeners,CONTROLLER://127.0.0.1:$cport
advertised.listeners=$listeners
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
$sasl_props
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
controller.quorum.voters=$voters
log.dirs=$data/logs
num.partitions=1
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.retention.hours=168
PROPS
  local cp="$libs/*"
  local java_opts=(-Xmx512m -Xms256m -XX:+UseG1GC -Dlog4j2.configurationFile="$here/kafka/log4j2.yaml")
  if [ ! -f "$data/logs/meta.properties" ]; then
    # Formatted once; a restarted node keeps its data. The nodes of a cluster share an id.
    local cluster_id="${CLUSTER_ID:-$(java -cp "$cp" kafka.tools.StorageTool random-uuid)}"
    java -cp "$cp" "${java_opts[@]}" kafka.tools.StorageTool format -t "$cluster_id" \
      -c "$data/server.properties" >/dev/null
  fi
  # A fresh log per start, so the readiness wait sees this start's line (the previous
  # run's log is kept beside it).
  [ -f "$data/kafka.log" ] && mv "$data/kafka.log" "$data/kafka.log.prev"
  nohup java -cp "$cp" "${java_opts[@]}" kafka.Kafka "$data/server.properties" \
    > "$data/kafka.log" 2>&1 &
  local pid=$!
  echo "$pid" > "$data/kafka.pid"
  echo "127.0.0.1:$port" > "$data/bootstrap"
  if [ -n "$watch" ]; then
    # Stop the broker when the process that asked for it goes away.
    ( while kill -0 "$watch" 2>/dev/null && kill -0 "$pid" 2>/dev/null; do sleep 1; done
      kill "$pid" 2>/dev/null || true ) >/dev/null 2>&1 &
  fi
}

# Waits until the node in $1 has started (at most $2 seconds), or fails with its log.
wait_started() {
  local data="$1" deadline=$((SECONDS + $2))
  until grep -q "Kafka Server started" "$data/kafka.log" 2>/dev/null; do
    if ! kill -0 "$(cat "$data/kafka.pid")" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
      log "the broker in $data did not start; its log:"; tail -30 "$data/kafka.log" >&2; exit 1
    fi
    sleep 0.3
  done
}

cluster() {
  local data="" nodes=3 watch=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --data) data="$2"; shift 2 ;;
      --nodes) nodes="$2"; shift 2 ;;
      --watch-pid) watch="$2"; shift 2 ;;
      *) log "unknown option $1"; exit 2 ;;
    esac
  done
  [ -n "$data" ] || { log "cluster needs --data DIR"; exit 2; }
  mkdir -p "$data"
  data="$(cd "$data" && pwd)"
  install >/dev/null
  local ports=() cports=() voters="" list=""
  for id in $(seq 1 "$nodes"); do
    ports+=("$(free_port)"); cports+=("$(free_port)")
    voters="${voters:+$voters,}$id@127.0.0.1:${cports[$((id - 1))]}"
    list="${list:+$list,}127.0.0.1:${ports[$((id - 1))]}"
  done
  CLUSTER_ID="$(java -cp "$libs/*" kafka.tools.StorageTool random-uuid)"
  export CLUSTER_ID
  for id in $(seq 1 "$nodes"); do
    start_node "$id" "$data/node-$id" "${ports[$((id - 1))]}" "${cports[$((id - 1))]}" "$voters" "$nodes" "$watch"
  done
  for id in $(seq 1 "$nodes"); do
    wait_started "$data/node-$id" 120
  done
  echo "$list" > "$data/bootstrap"
  log "Apache Kafka $version: $nodes nodes up on $list (data $data)"
  echo "$list"
}

stop() {
  local data=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --data) data="$2"; shift 2 ;;
      *) log "unknown option $1"; exit 2 ;;
    esac
  done
  [ -f "$data/kafka.pid" ] || return 0
  local pid
  pid="$(cat "$data/kafka.pid")"
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$data/kafka.pid"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  install) install ;;
  start) start "$@" ;;
  stop) stop "$@" ;;
  cluster) cluster "$@" ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
