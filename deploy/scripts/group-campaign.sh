#!/usr/bin/env bash
# Long fault campaigns against a group of three namenodes, each on a host of its own (network
# namespaces; needs root and iproute2): 8 clients' namespace operations under leader kills,
# freezes and partitions, their history checked for linearizability (tests/tests/ha.rs,
# namespace_operations_under_kills_freezes_and_partitions_are_linearizable). Each run prints its
# seed; --seed replays the choices (the timing is the machine's).
#   deploy/scripts/group-campaign.sh [--runs N] [--secs S] [--seed SEED]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
runs=5 secs=300 seed=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --secs) secs=$2; shift 2 ;;
    --seed) seed=$2; runs=1; shift 2 ;;
    *) echo "usage: $0 [--runs N] [--secs S] [--seed SEED]" >&2; exit 2 ;;
  esac
done
FEATURES=(--features lode-namenode/failpoints,lode-datanode/failpoints)
cargo build --workspace "${FEATURES[@]}"
export LODE_GROUP_CAMPAIGN_SECS=$secs
for ((run = 1; run <= runs; run++)); do
  export LODE_GROUP_CAMPAIGN_SEED=${seed:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}
  echo "group-campaign: run $run of $runs, $secs s of faults, seed $LODE_GROUP_CAMPAIGN_SEED"
  cargo nextest run -p lode-tests "${FEATURES[@]}" --test ha --no-capture \
    namespace_operations_under_kills_freezes_and_partitions_are_linearizable
done
