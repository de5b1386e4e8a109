#!/usr/bin/env bash
# Re-replication benchmark: 4 datanodes, a random file (default 1 GiB) with replication 3; SIGKILL a
# datanode holding a third of it, and time (a) from the kill until fsck is healthy again and (b) the
# copy phase alone (from the namenode counting the node dead). The copy rate is compared with this
# disk's write bandwidth measured in the same run (dd with fdatasync).
#
#   bench/rereplicate.sh [--size-mib N]
DEFAULT_SIZE_MIB=1024
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

echo "bench: disk write bandwidth" >&2
t0=$(now); dd if=/dev/zero of="$OUT/dd.bin" bs=8M count=$((SIZE_MIB / 8)) conv=fdatasync status=none; t1=$(now)
DISK=$(python3 -c "print(f'{$BYTES/($t1-$t0)/1e6:.1f}')")
rm -f "$OUT/dd.bin"

head -c "$BYTES" /dev/urandom > "$OUT/rr.bin"
export LODE_DEV_BASE_PORT=${LODE_DEV_BASE_PORT:-7680}
fresh_cluster rr-cluster 4
"$BIN/lode" put --replication 3 "$OUT/rr.bin" /rr.bin
until "$BIN/lode" fsck / >/dev/null 2>&1 && "$BIN/lode" fsck --json / | grep -q '"status":"healthy"'; do sleep 0.2; done
VICTIM=$("$BIN/lode" stat --json --blocks /rr.bin | python3 -c "
import json,sys,collections
s=json.load(sys.stdin); c=collections.Counter(l for b in s['blocks'] for l in b['locations'])
print(c.most_common(1)[0][0])")
LOST=$("$BIN/lode" stat --json --blocks /rr.bin | python3 -c "
import json,sys
s=json.load(sys.stdin); print(sum(b['len'] for b in s['blocks'] if '$VICTIM' in b['locations']))")
t_kill=$(now)
"$ROOT/deploy/dev-cluster.sh" kill-datanode "${VICTIM#dn-}" --dir "$OUT/rr-cluster"
# The node is counted dead after dead_after_ms (10 s in the dev cluster); then copies start.
until "$BIN/lode" admin report --json | grep -q "\"name\":\"$VICTIM\",\"state\":\"dead\"" \
   || "$BIN/lode" admin report --json | python3 -c "
import json,sys
r=json.load(sys.stdin); sys.exit(0 if any(d['name']=='$VICTIM' and d['state']=='dead' for d in r['datanodes']) else 1)"; do sleep 0.1; done
t_dead=$(now)
until "$BIN/lode" fsck --json / 2>/dev/null | grep -q '"status":"healthy"'; do sleep 0.1; done
t_done=$(now)
cmp <("$BIN/lode" cat /rr.bin) "$OUT/rr.bin" || { echo "bench: data differs after healing" >&2; exit 1; }
python3 - "$t_kill" "$t_dead" "$t_done" "$LOST" "$DISK" "$SIZE_MIB" "$VICTIM" <<'PY'
import sys
kill, dead, done, lost, disk, size, victim = sys.argv[1:]
kill, dead, done, lost, disk = float(kill), float(dead), float(done), int(lost), float(disk)
rate = lost / (done - dead) / 1e6
print()
print(f"re-replication of {lost/2**20:.0f} MiB lost with {victim} ({size} MiB file, replication 3, 4 datanodes)")
print(f"  kill -> healthy:            {done-kill:7.1f} s")
print(f"  dead detection (10 s set):  {dead-kill:7.1f} s")
print(f"  copy phase:                 {done-dead:7.1f} s  ({rate:.1f} MB/s)")
print(f"  disk write bandwidth (dd):  {disk:7.1f} MB/s  -> copy phase at {rate/disk:.2f} x disk")
PY
