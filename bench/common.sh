# Shared by the bench/*.sh runners: options, paths, a release build, timing helpers.
# Set DEFAULT_SIZE_MIB before sourcing (or, for a runner that parses its own options, set
# SIZE_MIB and BENCH_OWN_ARGS=1). Provides ROOT, OUT, BIN, SIZE_MIB, BYTES, now, mbps, rate, ratio,
# and fresh_cluster DIR N (starts a dev cluster in bench/out/DIR, stopped on exit).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${BENCH_OWN_ARGS:-}" ]; then
  SIZE_MIB=${DEFAULT_SIZE_MIB:-1024}
  while [ $# -gt 0 ]; do
    case "$1" in
      --size-mib) SIZE_MIB=$2; shift 2 ;;
      *) echo "usage: $0 [--size-mib N]" >&2; exit 2 ;;
    esac
  done
fi
OUT="$ROOT/bench/out"
BIN="$ROOT/target/release"
mkdir -p "$OUT"
cd "$ROOT"
cargo build --release -q --workspace
BYTES=$((SIZE_MIB * 1024 * 1024))
now() { date +%s.%N; }
mbps() { python3 -c "print(f'{$1/($3-$2)/1e6:.1f}')"; }
rate() { python3 -c "print(f'{$1/($3-$2):.0f}')"; }
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
fresh_cluster() {
  local dir="$OUT/$1" n=$2
  "$ROOT/deploy/dev-cluster.sh" down --dir "$dir" >/dev/null 2>&1 || true
  rm -rf "$dir"
  eval "$("$ROOT/deploy/dev-cluster.sh" up --datanodes "$n" --dir "$dir")"
  CLUSTER_DIR=$dir
  trap '"$ROOT/deploy/dev-cluster.sh" down --dir "$CLUSTER_DIR" >/dev/null 2>&1 || true' EXIT
}
