#!/usr/bin/env bash
# Benchmark: on one dev cluster (3 datanodes, replication 3), put and get a random file and compare,
# in the same run, with this machine's cp of the file, a one-core BLAKE3 of it, and a raw transfer
# of the same number of bytes between two processes over the project's QUIC + mTLS settings (the
# transport's ceiling). Also durable mkdirs per second from 8 concurrent clients.
#
#   bench/run.sh [--size-mib N]     (default 1024)
#
# Release builds; the work dir is bench/out (ignored by git). Prints a table of MB/s and ratios.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_MIB=1024
while [ $# -gt 0 ]; do
  case "$1" in
    --size-mib) SIZE_MIB=$2; shift 2 ;;
    *) echo "usage: bench/run.sh [--size-mib N]" >&2; exit 2 ;;
  esac
done
OUT="$ROOT/bench/out"
BIN="$ROOT/target/release"
mkdir -p "$OUT"
cd "$ROOT"
cargo build --release -q --bins
BYTES=$((SIZE_MIB * 1024 * 1024))

now() { date +%s.%N; }
rate() { python3 -c "import sys; print(f'{$1/($3-$2)/1e6:.1f}')"; }

echo "bench: making a ${SIZE_MIB} MiB random file" >&2
head -c "$BYTES" /dev/urandom > "$OUT/input.bin"
sync

# cp (page cache warm, as for the cluster runs)
t0=$(now); cp "$OUT/input.bin" "$OUT/copy.bin"; sync "$OUT/copy.bin"; t1=$(now)
CP=$(rate $BYTES $t0 $t1); rm -f "$OUT/copy.bin"

read -r HASH_RATE HASH < <("$BIN/lode-bench" hash "$OUT/input.bin")

# Transport ceiling: one stream between two processes, same certificates and settings.
rm -rf "$OUT/certs"; "$BIN/lode" certs init --dir "$OUT/certs" --datanodes 1 >/dev/null
PORT=$(python3 -c "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
"$BIN/lode-bench" transport-serve --certs "$OUT/certs" --listen "127.0.0.1:$PORT" & SERVER=$!
sleep 0.3
TRANSPORT=$("$BIN/lode-bench" transport-send --certs "$OUT/certs" --addr "127.0.0.1:$PORT" --bytes $BYTES)
wait $SERVER || true

# The cluster.
export LODE_DEV_BASE_PORT=${LODE_DEV_BASE_PORT:-7600}
"$ROOT/deploy/dev-cluster.sh" down --dir "$OUT/cluster" >/dev/null 2>&1 || true
rm -rf "$OUT/cluster"
eval "$("$ROOT/deploy/dev-cluster.sh" up --datanodes 3 --dir "$OUT/cluster")"
trap '"$ROOT/deploy/dev-cluster.sh" down --dir "$OUT/cluster" >/dev/null 2>&1 || true' EXIT

t0=$(now); "$BIN/lode" put "$OUT/input.bin" /bench.bin; t1=$(now)
PUT=$(rate $BYTES $t0 $t1)
rm -f "$OUT/output.bin"; sync
t0=$(now); "$BIN/lode" get -f /bench.bin "$OUT/output.bin"; t1=$(now)
GET=$(rate $BYTES $t0 $t1)
cmp -s "$OUT/input.bin" "$OUT/output.bin" || { echo "bench: get returned different bytes" >&2; exit 1; }
SUM=$("$BIN/lode" checksum /bench.bin | cut -d' ' -f1)
[ "$SUM" = "$HASH" ] || { echo "bench: lode checksum $SUM != blake3 $HASH" >&2; exit 1; }
rm -f "$OUT/output.bin"
sync
t0=$(now); "$BIN/lode" get /bench.bin - > /dev/null; t1=$(now)
GET_NULL=$(rate $BYTES $t0 $t1)
MKDIRS=$("$BIN/lode-bench" mkdirs --config "$LODE_CONFIG" --clients 8 --ops-per-client 250)
MKDIRS1=$("$BIN/lode-bench" mkdirs --config "$LODE_CONFIG" --clients 1 --ops-per-client 500)

ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
printf '\n%-44s %10s %12s\n' "what (${SIZE_MIB} MiB, $(nproc) cores)" "MB/s" "x transport"
printf '%-44s %10s %12s\n' "raw QUIC+mTLS stream, 2 processes (ceiling)" "$TRANSPORT" "1.00"
printf '%-44s %10s %12s\n' "cp" "$CP" "$(ratio $CP $TRANSPORT)"
printf '%-44s %10s %12s\n' "blake3, one core" "$HASH_RATE" "$(ratio $HASH_RATE $TRANSPORT)"
printf '%-44s %10s %12s\n' "lode put, replication 3" "$PUT" "$(ratio $PUT $TRANSPORT)"
printf '%-44s %10s %12s\n' "lode get to a local file" "$GET" "$(ratio $GET $TRANSPORT)"
printf '%-44s %10s %12s\n' "lode get to /dev/null" "$GET_NULL" "$(ratio $GET_NULL $TRANSPORT)"
printf '%-44s %10s\n' "durable mkdir ops/s, 1 client" "$MKDIRS1"
printf '%-44s %10s %12s\n' "durable mkdir ops/s, 8 concurrent clients" "$MKDIRS" "$(ratio $MKDIRS $MKDIRS1) x 1 client"
