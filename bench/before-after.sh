#!/usr/bin/env bash
# Before and after: the same workloads on a dev cluster of this checkout and of an earlier commit,
# in one run, alternating, so that a change's cost (such as permission and block token checks) is
# a ratio measured on the same machine at the same time.
#
#   bench/before-after.sh REF [--files N] [--size-mib N] [--rounds N] [--bulk] [--no-build]
#
# REF is built in a worktree (bench/out/before, sharing target/ for dependencies) and its binaries
# kept apart. Workloads: N small files (4 KiB) put with 8 commands in flight, then read back the
# same way (with --bulk: one `lode put -r -t 8` and one `lode get -r -t 8` of the whole tree, for
# REFs that have them); a file of SIZE MiB read to /dev/null. Prints each version's rates and
# after/before.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REF=${1:?usage: $0 REF [--files N] [--size-mib N] [--rounds N]}
shift
FILES=400
SIZE_MIB=512
ROUNDS=2
BUILD=1
BULK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0; shift ;;
    --bulk) BULK=1; shift ;;
    --files) FILES=$2; shift 2 ;;
    --size-mib) SIZE_MIB=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    *) echo "usage: $0 REF [--files N] [--size-mib N] [--rounds N] [--bulk] [--no-build]" >&2; exit 2 ;;
  esac
done
OUT="$ROOT/bench/out"
mkdir -p "$OUT"
cd "$ROOT"
BEFORE="$OUT/before"
if [ ! -d "$BEFORE" ]; then git worktree add --detach "$BEFORE" "$REF" >&2; fi
git -C "$BEFORE" checkout -q --detach "$REF"
# Both checkouts build in target/ (dependencies once), and cargo names their units alike: the
# workspace's own crates are cleaned before each build so that each build compiles its own sources.
clean_workspace() {
  local pkgs
  pkgs=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(" ".join("-p " + p["name"] for p in json.load(sys.stdin)["packages"]))')
  # shellcheck disable=SC2086
  cargo clean --release -q $pkgs
}
if [ "$BUILD" = 1 ]; then
  echo "bench: building $REF" >&2
  clean_workspace
  (cd "$BEFORE" && CARGO_TARGET_DIR="$ROOT/target" cargo build --release -q --workspace)
  mkdir -p "$BEFORE/target/release"
  for b in lode lode-namenode lode-datanode lode-plugin-host lode-bench; do
    cp "$ROOT/target/release/$b" "$BEFORE/target/release/$b"
  done
  echo "bench: building this checkout" >&2
  clean_workspace
  cargo build --release -q --workspace
fi

now() { date +%s.%N; }
rate() { python3 -c "print(f'{$1/($3-$2):.1f}')"; }

head -c $((SIZE_MIB << 20)) /dev/urandom > "$OUT/big.bin"
rm -rf "$OUT/small"; mkdir -p "$OUT/small"
for i in $(seq 1 "$FILES"); do head -c 4096 /dev/urandom > "$OUT/small/f$i"; done

# run TREE NAME: one round on a fresh cluster of the checkout at TREE; prints "puts/s gets/s MB/s".
run() {
  local tree=$1 dir="$OUT/cluster-$2" bin="$1/target/release"
  LODE_DEV_SKIP_BUILD=1 "$tree/deploy/dev-cluster.sh" down --dir "$dir" >/dev/null 2>&1 || true
  rm -rf "$dir"
  local env
  env=$(LODE_DEV_SKIP_BUILD=1 LODE_DEV_BASE_PORT=7700 "$tree/deploy/dev-cluster.sh" up --datanodes 3 --dir "$dir") \
    || { echo "bench: the $2 cluster did not come up" >&2; exit 1; }
  eval "$env"
  local t0 t1 t2 t3 t4
  if [ "$BULK" = 1 ]; then
    rm -rf "$OUT/small-back"
    t0=$(now)
    "$bin/lode" put -r -t 8 "$OUT/small" /small >/dev/null || exit 1
    t1=$(now)
    "$bin/lode" get -r -t 8 /small "$OUT/small-back" >/dev/null || exit 1
    t2=$(now)
    diff -r "$OUT/small" "$OUT/small-back" >/dev/null || { echo "bench: get -r returned other bytes" >&2; exit 1; }
  else
    "$bin/lode" mkdir /small || exit 1
    t0=$(now)
    seq 1 "$FILES" | xargs -P 8 -I{} "$bin/lode" put "$OUT/small/f{}" /small/f{} || exit 1
    t1=$(now)
    seq 1 "$FILES" | xargs -P 8 -I{} sh -c "\"$bin/lode\" get /small/f{} - > /dev/null" || exit 1
    t2=$(now)
  fi
  "$bin/lode" put "$OUT/big.bin" /big.bin || exit 1
  sync
  t3=$(now)
  "$bin/lode" get /big.bin - > /dev/null || exit 1
  t4=$(now)
  LODE_DEV_SKIP_BUILD=1 "$tree/deploy/dev-cluster.sh" down --dir "$dir" >/dev/null 2>&1 || true
  echo "$(rate "$FILES" "$t0" "$t1") $(rate "$FILES" "$t1" "$t2") $(rate $((SIZE_MIB << 20))/1e6 "$t3" "$t4")"
}

# Whatever happens, no cluster is left running.
trap 'for t in before after; do LODE_DEV_SKIP_BUILD=1 "$ROOT/deploy/dev-cluster.sh" down --dir "$OUT/cluster-$t" >/dev/null 2>&1 || true; done' EXIT
declare -a B A
for r in $(seq 1 "$ROUNDS"); do
  echo "bench: round $r" >&2
  # Alternate which goes first, so that neither always meets the other's leftovers.
  if [ $((r % 2)) = 1 ]; then
    b=$(run "$BEFORE" before) || exit 1
    a=$(run "$ROOT" after) || exit 1
  else
    a=$(run "$ROOT" after) || exit 1
    b=$(run "$BEFORE" before) || exit 1
  fi
  B+=("$b")
  A+=("$a")
done

python3 - "$REF" "${B[@]}" -- "${A[@]}" <<'PY'
import sys
ref = sys.argv[1]
args = sys.argv[2:]
cut = args.index("--")
before = [list(map(float, r.split())) for r in args[:cut]]
after = [list(map(float, r.split())) for r in args[cut + 1:]]
names = ["small put, files/s (8 in flight)", "small get, files/s (8 in flight)", "big get to /dev/null, MB/s"]
print(f"\n{'workload':40} {'before ' + ref[:10]:>20} {'after':>20} {'after/before':>13}")
for i, n in enumerate(names):
    b = [r[i] for r in before]
    a = [r[i] for r in after]
    mb, ma = sum(b) / len(b), sum(a) / len(a)
    rng = lambda v: f"{min(v):.0f}-{max(v):.0f}"
    print(f"{n:40} {rng(b):>20} {rng(a):>20} {ma / mb:>13.3f}")
PY
