#!/usr/bin/env bash
# Runs the whole test suite: unit tests, protocol tests and the integration tests that start real
# namenode and datanode processes on loopback. Those need the binaries and the example plugins (cdylibs),
# so the whole workspace is built first. Uses cargo-nextest when installed, else cargo test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cargo build --workspace
if cargo nextest --version >/dev/null 2>&1; then
  exec cargo nextest run --workspace --no-tests=fail "$@"
else
  exec cargo test --workspace "$@"
fi
