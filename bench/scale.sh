#!/usr/bin/env bash
# The namenode at scale: one real namenode (release build) on a synthetic namespace, against
# simulated datanodes (lode-bench datanodes: real QUIC + mTLS connections, a certificate each) that
# register with full block reports, heartbeat every 3 s with incremental reports and send full
# reports again at an hourly rate, while one client makes directories. Prints the namenode's start
# time and resident memory (before the datanodes and after their reports), heartbeat, report and
# mkdir latencies, and the namenode's own report-processing histogram.
#
#   bench/scale.sh [--files N] [--blocks-per-file B] [--datanodes M] [--seconds S]
#                  [--full-report-secs T] [--keep]
# Defaults: 1,000,000 files of 1 block, 100 datanodes, 60 s. The figures of the issue are
# --files 10000000 (memory per file, start time) and --datanodes 1000 with 100k replicas each
# (--files 33333334 --blocks-per-file 1 gives 100k per node at replication 3).
set -euo pipefail
FILES=1000000 BPF=1 DNS=100 SECS=60 FULL=3600 KEEP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --files) FILES=$2; shift 2 ;;
    --blocks-per-file) BPF=$2; shift 2 ;;
    --datanodes) DNS=$2; shift 2 ;;
    --seconds) SECS=$2; shift 2 ;;
    --full-report-secs) FULL=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    *) echo "usage: $0 [--files N] [--blocks-per-file B] [--datanodes M] [--seconds S] [--full-report-secs T] [--keep]" >&2; exit 2 ;;
  esac
done
SIZE_MIB=0 BENCH_OWN_ARGS=1 . "$(dirname "$0")/common.sh"
DIR="$OUT/scale"
PORT=${LODE_SCALE_PORT:-7950}
NN_PID=""
stop() { [ -n "$NN_PID" ] && kill "$NN_PID" 2>/dev/null && wait "$NN_PID" 2>/dev/null; true; }
trap stop EXIT
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# The namespace is made once per layout and kept (it takes minutes at 10M files); each run starts
# from a copy of it.
LAYOUT="files-$FILES-bpf-$BPF"
SYNTH="$OUT/scale-synth/$LAYOUT"
if [ ! -d "$SYNTH/meta" ]; then
  rm -rf "$SYNTH" && mkdir -p "$SYNTH"
  "$BIN/lode-bench" synth --meta-dir "$SYNTH/meta" --files "$FILES" --blocks-per-file "$BPF" --datanodes 3
fi
rm -rf "$DIR" && mkdir -p "$DIR/logs"
"$BIN/lode" certs init --dir "$DIR/certs" --datanodes "$DNS" >/dev/null
cp -r "$SYNTH/meta" "$DIR/meta"
cat > "$DIR/namenode.toml" <<TOML
listen = "127.0.0.1:$PORT"
meta_dir = "meta"
heartbeat_interval_ms = 3000
stale_after_ms = 30000
dead_after_ms = 630000
meta_cache_bytes = ${LODE_SCALE_META_CACHE:-268435456}
http_listen = "127.0.0.1:$((PORT + 1))"
audit_log = "logs/audit.log"

[tls]
ca = "certs/ca.pem"
cert = "certs/namenode.pem"
key = "certs/namenode-key.pem"
TOML
cat > "$DIR/client.toml" <<TOML
namenode = "127.0.0.1:$PORT"

[tls]
ca = "certs/ca.pem"
cert = "certs/admin.pem"
key = "certs/admin-key.pem"
TOML

echo "namespace: $FILES files x $BPF blocks, $(du -sh "$DIR/meta" | cut -f1) on disk; $DNS datanodes"
t0=$(now)
"$BIN/lode-namenode" --config "$DIR/namenode.toml" >"$DIR/logs/namenode.log" 2>&1 &
NN_PID=$!
until "$BIN/lode" --config "$DIR/client.toml" ls / >/dev/null 2>&1; do
  kill -0 "$NN_PID" 2>/dev/null || { tail -5 "$DIR/logs/namenode.log"; exit 1; }
  sleep 0.05
done
t1=$(now)
rss0=$(rss_kib "$NN_PID")
echo "start: $(python3 -c "print(f'{$t1-$t0:.1f}')") s to serve; resident $((rss0 / 1024)) MiB ($(python3 -c "print(f'{$rss0*1024/$FILES:.0f}')") B per file) before any datanode"
# LODE_SCALE_PROFILE=FILE records a perf profile of the namenode while the datanodes run.
PERF_PID=""
if [ -n "${LODE_SCALE_PROFILE:-}" ]; then
  perf record -g -o "$LODE_SCALE_PROFILE" -p "$NN_PID" >/dev/null 2>&1 &
  PERF_PID=$!
fi
"$BIN/lode-bench" datanodes --namenode "127.0.0.1:$PORT" --certs "$DIR/certs" \
  --files "$FILES" --blocks-per-file "$BPF" --datanodes "$DNS" --seconds "$SECS" \
  --full-report-secs "$FULL" --client-config "$DIR/client.toml"
[ -z "$PERF_PID" ] || { kill -INT "$PERF_PID"; wait "$PERF_PID" || true; }
rss1=$(rss_kib "$NN_PID")
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$NN_PID/status")
echo "namenode resident after the reports: $((rss1 / 1024)) MiB ($(python3 -c "print(f'{$rss1*1024/$FILES:.0f}')") B per file), peak $((hwm / 1024)) MiB"
curl -s "http://127.0.0.1:$((PORT + 1))/metrics" | python3 -c '
import sys, re
# Mean time in the namenode of each datanode request kind, from its request histogram.
sums, counts = {}, {}
for line in sys.stdin:
    m = re.match(r"lode_namenode_request_seconds_(sum|count)\{kind=\"(\w+)\"\} ([0-9.e+-]+)", line)
    if m:
        (sums if m[1] == "sum" else counts)[m[2]] = float(m[3])
for k in ("Register", "ReportMore", "Heartbeat", "Mkdir"):
    if counts.get(k):
        print(f"namenode time per {k}: {sums[k] / counts[k] * 1e3:.2f} ms mean over {counts[k]:.0f}")
'
[ -n "$KEEP" ] || rm -rf "$DIR"
