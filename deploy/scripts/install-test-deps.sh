#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, from Debian's packages: iproute2
# (`ip netns`, for the tests that put namenodes on hosts of their own and partition them) and
# Chromium (headless, for the status page test). Needs root and apt-get; prints what it does.
# Exits non-zero if Chromium cannot be installed (the browser test then fails unless
# LODE_SKIP_BROWSER=1 is set); without iproute2 the partition tests fail with a message naming it.
set -uo pipefail
want=()
command -v ip >/dev/null 2>&1 || want+=(iproute2)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || want+=(chromium)
if [ ${#want[@]} = 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-test-deps: missing ${want[*]}, and no root apt-get to install them" >&2
  exit 1
fi
echo "install-test-deps: installing ${want[*]} (Debian packages) for the test suite" >&2
apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${want[@]}" >/dev/null
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1
