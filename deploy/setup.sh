#!/usr/bin/env bash
# Installs what building, testing (--for-tests) and running Tessera needs, when missing:
# Debian packages (libclang for RocksDB's bindgen, a C/C++ toolchain, OpenSSL and zlib
# headers for librdkafka, Java 17 and Maven for the Kafka broker) and the Apache Kafka
# jars (deploy/kafka.sh install). Safe to run again: it does nothing when all is there.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

missing=()
pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed" || missing+=("$1"); }
for p in libclang-dev pkg-config libssl-dev zlib1g-dev build-essential curl; do pkg "$p"; done
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-venv)
# The tests also check the services' metrics with promtool (Debian's prometheus package)
# and drive the console in Debian's Chromium (playwright-core from npm; no browser download).
if [ "${1:-}" = "--for-tests" ]; then
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo (Rust 1.95 or newer) is required and was not found on PATH" >&2
  exit 1
fi

bash "$here/kafka.sh" install >/dev/null
