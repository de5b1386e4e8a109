#!/usr/bin/env bash
# Builds Lode, starts a local cluster (1 namenode, 3 datanodes) in ./.lode-dev and runs a short demo:
# put, ls, cat, stat, get, checksum. The cluster keeps running; stop it with deploy/dev-cluster.sh down.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [ -f .lode-dev/pids/namenode.pid ] && kill -0 "$(cat .lode-dev/pids/namenode.pid)" 2>/dev/null; then
  deploy/dev-cluster.sh down >/dev/null 2>&1
fi
eval "$(deploy/dev-cluster.sh up)"
demo=$(mktemp -d)
trap 'rm -rf "$demo"' EXIT
seq 1 200000 | sed 's/^/line /' > "$demo/hello.txt"
set -x
lode mkdir -p /demo
lode put -f "$demo/hello.txt" /demo/hello.txt
lode ls -R /
lode cat /demo/hello.txt | tail -n 3
lode stat --blocks /demo/hello.txt
lode get -f /demo/hello.txt "$demo/back.txt"
cmp "$demo/hello.txt" "$demo/back.txt"
lode checksum /demo/hello.txt
{ set +x; } 2>/dev/null
echo
echo "The cluster is running. To use it from this shell:"
echo "  export LODE_CONFIG=$ROOT/.lode-dev/client.toml"
echo "  export PATH=$ROOT/target/release:\$PATH"
echo "Stop it with: deploy/dev-cluster.sh down"
