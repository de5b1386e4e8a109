#!/usr/bin/env bash
# Benchmark: on one dev cluster (3 datanodes, replication 3), put and get a random file and compare,
# in the same run, with this machine's cp of the file, a one-core BLAKE3 of it, and a raw transfer
# of the same number of bytes between two processes over the project's QUIC + mTLS settings (the
# transport's ceiling). Also durable mkdirs per second from 8 concurrent clients (one request
# outstanding each, then 32 each) and empty files created per second.
#
#   bench/run.sh [--size-mib N]     (default 1024)
#
# Release builds; the work dir is bench/out (ignored by git). Prints a table of MB/s and ratios.
DEFAULT_SIZE_MIB=1024
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"


echo "bench: making a ${SIZE_MIB} MiB random file" >&2
head -c "$BYTES" /dev/urandom > "$OUT/input.bin"
sync

# cp (page cache warm, as for the cluster runs)
t0=$(now); cp "$OUT/input.bin" "$OUT/copy.bin"; sync "$OUT/copy.bin"; t1=$(now)
CP=$(mbps $BYTES $t0 $t1); rm -f "$OUT/copy.bin"

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
fresh_cluster cluster 3

t0=$(now); "$BIN/lode" put "$OUT/input.bin" /bench.bin; t1=$(now)
PUT=$(mbps $BYTES $t0 $t1)
rm -f "$OUT/output.bin"; sync
t0=$(now); "$BIN/lode" get -f /bench.bin "$OUT/output.bin"; t1=$(now)
GET=$(mbps $BYTES $t0 $t1)
cmp -s "$OUT/input.bin" "$OUT/output.bin" || { echo "bench: get returned different bytes" >&2; exit 1; }
SUM=$("$BIN/lode" checksum /bench.bin | cut -d' ' -f1)
[ "$SUM" = "$HASH" ] || { echo "bench: lode checksum $SUM != blake3 $HASH" >&2; exit 1; }
rm -f "$OUT/output.bin"
sync
t0=$(now); "$BIN/lode" get /bench.bin - > /dev/null; t1=$(now)
GET_NULL=$(mbps $BYTES $t0 $t1)
MKDIRS=$("$BIN/lode-bench" mkdirs --config "$LODE_CONFIG" --clients 8 --ops-per-client 250)
MKDIRS1=$("$BIN/lode-bench" mkdirs --config "$LODE_CONFIG" --clients 1 --ops-per-client 500)
# The same 8 clients, each with 32 requests outstanding on its connection (as `put -r -t` and any
# async caller of the library have them): the namenode's own rate, not the round trip's.
MKDIRS_P=$("$BIN/lode-bench" mkdirs --config "$LODE_CONFIG" --clients 8 --ops-per-client 2000 --in-flight 32)
CREATES_P=$("$BIN/lode-bench" mkdirs --config "$LODE_CONFIG" --clients 8 --ops-per-client 1000 --in-flight 32 --files)

printf '\n%-44s %10s %12s\n' "what (${SIZE_MIB} MiB, $(nproc) cores)" "MB/s" "x transport"
printf '%-44s %10s %12s\n' "raw QUIC+mTLS stream, 2 processes (ceiling)" "$TRANSPORT" "1.00"
printf '%-44s %10s %12s\n' "cp" "$CP" "$(ratio $CP $TRANSPORT)"
printf '%-44s %10s %12s\n' "blake3, one core" "$HASH_RATE" "$(ratio $HASH_RATE $TRANSPORT)"
printf '%-44s %10s %12s\n' "lode put, replication 3" "$PUT" "$(ratio $PUT $TRANSPORT)"
printf '%-44s %10s %12s\n' "lode get to a local file" "$GET" "$(ratio $GET $TRANSPORT)"
printf '%-44s %10s %12s\n' "lode get to /dev/null" "$GET_NULL" "$(ratio $GET_NULL $TRANSPORT)"
printf '%-44s %10s\n' "durable mkdir ops/s, 1 client" "$MKDIRS1"
printf '%-44s %10s %12s\n' "durable mkdir ops/s, 8 concurrent clients" "$MKDIRS" "$(ratio $MKDIRS $MKDIRS1) x 1 client"
printf '%-44s %10s %12s\n' "durable mkdir ops/s, 8 clients x 32 in flight" "$MKDIRS_P" "$(ratio $MKDIRS_P $MKDIRS1) x 1 client"
printf '%-44s %10s %12s\n' "empty files/s (create+complete), 8 x 32" "$CREATES_P" "$(python3 -c "print($CREATES_P*2)") edits/s"
