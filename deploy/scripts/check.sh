#!/usr/bin/env bash
# Formatting, lints, then the whole test suite (deploy/scripts/test.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
if cargo fmt --version >/dev/null 2>&1; then
  cargo fmt --all -- --check
else
  echo "check: rustfmt not installed; skipping the format check" >&2
fi
if cargo clippy --version >/dev/null 2>&1; then
  cargo clippy --workspace --all-targets --features lode-namenode/failpoints,lode-datanode/failpoints -- -D warnings
else
  echo "check: clippy not installed; skipping lints" >&2
fi
exec deploy/scripts/test.sh "$@"
