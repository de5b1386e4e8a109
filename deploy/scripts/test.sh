#!/usr/bin/env bash
# Runs the whole test suite: unit tests, protocol tests and the integration tests that start real
# namenode and datanode processes on loopback. The integration tests need the binaries, so they are
# built first. Uses cargo-nextest when installed (one process per test), else cargo test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --workspace --no-tests=fail "$@"
else
  exec cargo test --workspace "$@"
fi
