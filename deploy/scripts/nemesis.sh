#!/usr/bin/env bash
# Long fault campaigns against a real cluster on loopback (tests/src/nemesis.rs): random seeds,
# each printed and replayable with LODE_NEMESIS_SEED=<seed>, until --seeds are done or --minutes
# have passed.
#   deploy/scripts/nemesis.sh [--seeds N] [--minutes M] [--steps S] [--seed SEED]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
seeds=10 minutes=30 steps=400 seed=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seeds) seeds=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    *) echo "usage: $0 [--seeds N] [--minutes M] [--steps S] [--seed SEED]" >&2; exit 2 ;;
  esac
done
FEATURES=(--features lode-namenode/failpoints,lode-datanode/failpoints)
cargo build --workspace "${FEATURES[@]}"
export LODE_NEMESIS_SEEDS=$seeds LODE_NEMESIS_MINUTES=$minutes LODE_NEMESIS_STEPS=$steps
if [[ -n "$seed" ]]; then export LODE_NEMESIS_SEED=$seed; fi
exec cargo nextest run -p lode-tests "${FEATURES[@]}" --test nemesis --run-ignored ignored-only \
  long_campaign --no-capture
