#!/usr/bin/env bash
# Demo traffic for the local run (deploy/run.sh): the demo people of people.json keep
# browsing and now and then order, about two events a second, through the HTTP API, so
# the console's charts and profiles move. Runs until killed.
# Usage: traffic.sh INGEST_URL WRITE_KEY
set -uo pipefail
url="${1:?ingest url}"
key="${2:?write key}"
users=(ada grace alan katherine edsger barbara)
n=0
while true; do
  user="${users[RANDOM % ${#users[@]}]}"
  n=$((n + 1))
  case $((RANDOM % 10)) in
    0) body="{\"userId\":\"$user\",\"event\":\"Order Completed\",\"properties\":{\"order_id\":\"demo-$$-$n\",\"total\":$((20 + RANDOM % 180)),\"currency\":\"EUR\"}}"; path=track ;;
    1|2) body="{\"userId\":\"$user\",\"event\":\"Cart Viewed\",\"properties\":{\"items\":$((1 + RANDOM % 4))}}"; path=track ;;
    3|4|5) body="{\"userId\":\"$user\",\"event\":\"Product Viewed\",\"properties\":{\"sku\":\"sku-$((RANDOM % 40))\"}}"; path=track ;;
    *) body="{\"userId\":\"$user\",\"name\":\"Catalog\",\"properties\":{\"path\":\"/catalog/$((RANDOM % 12))\"}}"; path=page ;;
  esac
  curl -fsS -o /dev/null -u "$key:" -H 'Content-Type: application/json' "$url/v1/$path" -d "$body" || true
  sleep 0.5
done
