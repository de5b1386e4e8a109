#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain: Chromium (headless) from Debian's
# packages, for the status page test. Needs root and apt-get; prints what it does. If Chromium cannot
# be installed, says so (the browser test then fails unless LODE_SKIP_BROWSER=1 is set).
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-test-deps: no chromium, and no root apt-get to install it" >&2
  exit 1
fi
echo "install-test-deps: installing chromium (Debian package) for the status page test" >&2
apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null
