#!/usr/bin/env bash
# Runs the fuzz targets in fuzz/ (cargo fuzz, libFuzzer) for a while each, growing their corpora in
# fuzz/corpus/<target>/ (the suite replays those files: fuzz/tests/corpus.rs).
#   deploy/scripts/fuzz.sh [--seconds N] [TARGET...]     (default: every target, 600 s each)
# Installs cargo-fuzz when it is missing. Works on a stable toolchain (RUSTC_BOOTSTRAP=1, no
# sanitizer); with a nightly toolchain installed, set LODE_FUZZ_NIGHTLY=1 for AddressSanitizer.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
seconds=600 targets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    -*) echo "usage: $0 [--seconds N] [TARGET...]" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
if [[ ${#targets[@]} -eq 0 ]]; then
  mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi
if [[ "${LODE_FUZZ_NIGHTLY:-}" == 1 ]]; then
  fuzz=(cargo +nightly fuzz) flags=(--fuzz-dir fuzz --features libfuzzer)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz) flags=(--fuzz-dir fuzz --features libfuzzer -s none)
fi
"${fuzz[@]}" build "${flags[@]}"
for t in "${targets[@]}"; do
  echo "fuzz: $t for ${seconds}s"
  mkdir -p "fuzz/corpus/$t"
  "${fuzz[@]}" run "${flags[@]}" "$t" "fuzz/corpus/$t" -- -max_total_time="$seconds" \
    -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1
done
