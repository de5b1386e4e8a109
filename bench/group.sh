#!/usr/bin/env bash
# Benchmark: the namenode group against a single namenode, in the same run (release builds).
#  1. Durable mkdirs per second from 8 concurrent clients (one request outstanding each, then 32
#     each), on a dev cluster with one namenode and on one with a group of three (a mkdir is
#     acknowledged once a majority holds it durably).
#  2. Failover: the group's leader is SIGKILLed 20 times (restarted, and caught up, between kills);
#     each time, the time from the kill to the first acknowledged mkdir of a `lode` command started
#     at the kill (it follows the new leader; the time includes the command's start and connect).
#     Prints the median and the maximum.
#
#   bench/group.sh [--kills N]
set -euo pipefail
KILLS=20
while [ $# -gt 0 ]; do
  case "$1" in
    --kills) KILLS=$2; shift 2 ;;
    *) echo "usage: $0 [--kills N]" >&2; exit 2 ;;
  esac
done
BENCH_OWN_ARGS=1 SIZE_MIB=0
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export LODE_DEV_BASE_PORT=${LODE_DEV_BASE_PORT:-7600}
DEV="$ROOT/deploy/dev-cluster.sh"

cluster() { # DIR NAMENODES
  "$DEV" down --dir "$1" >/dev/null 2>&1 || true
  rm -rf "$1"
  eval "$("$DEV" up --datanodes 1 --namenodes "$2" --dir "$1")"
  CLUSTER_DIR=$1
  trap '"$DEV" down --dir "$CLUSTER_DIR" >/dev/null 2>&1 || true' EXIT
}
mkdirs() { # prints: 8 clients x 1, 8 clients x 32 in flight
  local one many
  one=$("$BIN/lode-bench" mkdirs --config "$LODE_CONFIG" --clients 8 --ops-per-client 250)
  many=$("$BIN/lode-bench" mkdirs --config "$LODE_CONFIG" --clients 8 --ops-per-client 1000 --in-flight 32)
  echo "$one $many"
}

cluster "$OUT/group-1" 1
read -r SINGLE SINGLE_P < <(mkdirs)
"$DEV" down --dir "$OUT/group-1" >/dev/null 2>&1

cluster "$OUT/group-3" 3
read -r GROUP GROUP_P < <(mkdirs)

# The member that leads, as `admin report` says (nn-I -> I), and whether all three are up.
leader() { "$BIN/lode" admin report --json | python3 -c "
import json, sys
r = json.load(sys.stdin)
print(next((m['name'].split('-')[1] for m in r['namenodes'] if m['role'] == 'leader'), ''))"; }
all_up() { "$BIN/lode" admin report --json 2>/dev/null | python3 -c "
import json, sys
r = json.load(sys.stdin)
ms = r['namenodes']
lead = [m for m in ms if m['role'] == 'leader']
ok = len(ms) == 3 and len(lead) == 1 and all(m['role'] in ('leader', 'follower') and m['applied_index'] >= lead[0]['applied_index'] - 2 for m in ms)
sys.exit(0 if ok else 1)"; }
TIMES=()
for k in $(seq 1 "$KILLS"); do
  deadline=$((SECONDS + 60))
  until all_up; do
    [ $SECONDS -lt $deadline ] || { echo "bench: the group did not recover after kill $k" >&2; exit 1; }
    sleep 0.2
  done
  i=$(leader)
  t0=$(now)
  "$DEV" kill-namenode "$i" --dir "$CLUSTER_DIR" 2>/dev/null
  "$BIN/lode" mkdir "/failover-$k"
  t1=$(now)
  TIMES+=("$(python3 -c "print(f'{$t1-$t0:.3f}')")")
  "$DEV" start-namenode "$i" --dir "$CLUSTER_DIR" 2>/dev/null
done
read -r MEDIAN MAX < <(python3 -c "
import statistics, sys
t = [float(x) for x in sys.argv[1:]]
print(f'{statistics.median(t):.2f} {max(t):.2f}')" "${TIMES[@]}")

printf '%-44s %10s %10s %8s\n' "durable mkdirs/s, 8 clients" "1 namenode" "3 (group)" "ratio"
printf '%-44s %10s %10s %8s\n' "  1 request in flight each" "$SINGLE" "$GROUP" "$(ratio "$GROUP" "$SINGLE")"
printf '%-44s %10s %10s %8s\n' "  32 requests in flight each" "$SINGLE_P" "$GROUP_P" "$(ratio "$GROUP_P" "$SINGLE_P")"
printf 'failover (kill -9 of the leader to the first acknowledged mkdir), %s kills: median %s s, max %s s\n' "$KILLS" "$MEDIAN" "$MAX"
printf '  each (s): %s\n' "${TIMES[*]}"
