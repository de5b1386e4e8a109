#!/usr/bin/env bash
# Runs the whole test suite: unit tests, protocol tests, the simulation, the fuzz corpora and the
# integration tests that start real namenode and datanode processes on loopback. Those need the
# binaries and the example plugins (cdylibs), so the whole workspace is built first, with the
# `failpoints` feature of the namenode and datanode (the crash tests arm them; release builds never
# have them). Uses cargo-nextest when installed, else cargo test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
FEATURES=(--features lode-namenode/failpoints,lode-datanode/failpoints)
cargo build --workspace "${FEATURES[@]}"
if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --workspace "${FEATURES[@]}" --no-tests=fail "$@"
else
  exec cargo test --workspace "${FEATURES[@]}" "$@"
fi
