#!/usr/bin/env bash
# Scan benchmark: on a dev cluster (3 datanodes, replication 3) holding a text file (default 2 GiB),
# compare in one run `lode scan` with the grep and wc plugins against (a) `lode get | grep -c` and
# (b) grep -c / wc on a local copy, and report the bytes that crossed the network.
#
#   bench/scan.sh [--size-mib N]
DEFAULT_SIZE_MIB=2048
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

echo "bench: writing ${SIZE_MIB} MiB of text" >&2
"$BIN/lode-bench" text --bytes "$BYTES" --out "$OUT/text.log"

export LODE_DEV_BASE_PORT=${LODE_DEV_BASE_PORT:-7650}
fresh_cluster scan-cluster 3
"$BIN/lode" put "$OUT/text.log" /text.log
"$BIN/lode" plugin add "$BIN/liblode_plugin_grep.so" >/dev/null
"$BIN/lode" plugin add "$BIN/liblode_plugin_wc.so" >/dev/null
# Warm the datanodes' plugin caches and page caches as the local tools get a warm page cache.
"$BIN/lode" scan --plugin wc /text.log >/dev/null
"$BIN/lode" scan --plugin grep --arg pattern=warmup /text.log >/dev/null
cat "$OUT/text.log" > /dev/null

t0=$(now); LOCAL_GREP=$(grep -c ERROR "$OUT/text.log"); t1=$(now)
GREP_LOCAL_RATE=$(mbps $BYTES $t0 $t1)
t0=$(now); LOCAL_WC=$(wc < "$OUT/text.log" | awk '{print $1, $2, $3}'); t1=$(now)
WC_LOCAL_RATE=$(mbps $BYTES $t0 $t1)

t0=$(now); SCAN_GREP=$("$BIN/lode" scan --json --plugin grep --arg pattern=ERROR --arg fixed=true --arg max_matches=0 /text.log); t1=$(now)
SCAN_GREP_RATE=$(mbps $BYTES $t0 $t1)
t0=$(now); SCAN_WC=$("$BIN/lode" scan --json --plugin wc /text.log); t1=$(now)
SCAN_WC_RATE=$(mbps $BYTES $t0 $t1)
t0=$(now); GET_GREP=$("$BIN/lode" get /text.log - | grep -c ERROR); t1=$(now)
GET_GREP_RATE=$(mbps $BYTES $t0 $t1)

GREP_COUNT=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['result'].split()[0])" "$SCAN_GREP")
WC_RESULT=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['result'].strip())" "$SCAN_WC")
NET=$(python3 -c "import json,sys; print(json.loads(sys.argv[1])['stats']['bytes_over_network'])" "$SCAN_GREP")
TASKS=$(python3 -c "import json,sys; s=json.loads(sys.argv[1])['stats']; print(s['local_tasks'], '/', s['tasks'])" "$SCAN_GREP")
[ "$GREP_COUNT" = "$LOCAL_GREP" ] && [ "$GET_GREP" = "$LOCAL_GREP" ] || { echo "bench: grep counts differ: scan $GREP_COUNT, get|grep $GET_GREP, local $LOCAL_GREP" >&2; exit 1; }
[ "$WC_RESULT" = "$LOCAL_WC" ] || { echo "bench: wc differs: scan '$WC_RESULT', local '$LOCAL_WC'" >&2; exit 1; }

printf '\n%-40s %10s\n' "what (${SIZE_MIB} MiB text, $(nproc) cores)" "MB/s"
printf '%-40s %10s\n' "grep -c on a local copy" "$GREP_LOCAL_RATE"
printf '%-40s %10s\n' "wc on a local copy" "$WC_LOCAL_RATE"
printf '%-40s %10s   %s x local grep, %s x get|grep\n' "lode scan --plugin grep" "$SCAN_GREP_RATE" "$(ratio $SCAN_GREP_RATE $GREP_LOCAL_RATE)" "$(ratio $SCAN_GREP_RATE $GET_GREP_RATE)"
printf '%-40s %10s   %s x local wc\n' "lode scan --plugin wc" "$SCAN_WC_RATE" "$(ratio $SCAN_WC_RATE $WC_LOCAL_RATE)"
printf '%-40s %10s\n' "lode get | grep -c" "$GET_GREP_RATE"
printf '%-40s %10s bytes (%s%% of the input), tasks local: %s\n' "scan network traffic" "$NET" "$(python3 -c "print(f'{100*$NET/$BYTES:.4f}')")" "$TASKS"
