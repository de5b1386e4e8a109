#!/usr/bin/env bash
# A local Lode cluster on loopback: one namenode and N datanodes, with fresh certificates.
#
#   deploy/dev-cluster.sh up [--datanodes N] [--dir DIR]   build what is missing, start, wait for registration
#   deploy/dev-cluster.sh down [--dir DIR]                 stop everything (SIGTERM, then SIGKILL)
#   deploy/dev-cluster.sh status [--dir DIR]               processes and the namenode's report
#   deploy/dev-cluster.sh kill-datanode I [--dir DIR]      SIGKILL dn-I
#   deploy/dev-cluster.sh start-datanode I [--dir DIR]     start dn-I again
#   deploy/dev-cluster.sh kill-namenode [--dir DIR]        SIGKILL the namenode
#   deploy/dev-cluster.sh start-namenode [--dir DIR]       start the namenode again
#
# DIR defaults to ./.lode-dev. `up` prints `export LODE_CONFIG=DIR/client.toml` (and a PATH line for
# the lode binary) on stdout, so `eval "$(deploy/dev-cluster.sh up)"` sets up the shell; progress goes
# to stderr.
#
# Short timings so faults show quickly: heartbeat every 1 s, a datanode is stale after 3 s of silence
# and dead after 10 s, and a writer's lease expires after 10 s without renewal.
# Ports: the namenode listens on UDP 127.0.0.1:$LODE_DEV_BASE_PORT (default 7400), dn-I on base+I;
# the namenode's status page and metrics on TCP base+100 (http://127.0.0.1:7500/), dn-I's metrics on
# TCP base+100+I.
# Binaries: release builds by default; LODE_DEV_PROFILE=debug uses debug builds; LODE_DEV_SKIP_BUILD=1
# uses the binaries already built without running cargo.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROFILE=${LODE_DEV_PROFILE:-release}
BASE_PORT=${LODE_DEV_BASE_PORT:-7400}
DIR=./.lode-dev
DATANODES=3
CMD=${1:-}
[ $# -gt 0 ] && shift
ARG=""

die() { echo "dev-cluster: $*" >&2; exit 1; }
usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --datanodes) [ $# -ge 2 ] || usage; DATANODES=$2; shift 2 ;;
    --dir) [ $# -ge 2 ] || usage; DIR=$2; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "dev-cluster: unknown option $1" >&2; usage ;;
    *) [ -z "$ARG" ] || usage; ARG=$1; shift ;;
  esac
done
case "$DATANODES" in ''|*[!0-9]*) die "--datanodes must be a positive number, got '$DATANODES'" ;; esac
[ "$DATANODES" -ge 1 ] || die "--datanodes must be at least 1"

mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
BIN="$ROOT/target/$PROFILE"
[ "$PROFILE" = debug ] || [ "$PROFILE" = release ] || die "LODE_DEV_PROFILE must be debug or release"

build() {
  if [ "${LODE_DEV_SKIP_BUILD:-0}" != 1 ] && command -v cargo >/dev/null 2>&1; then
    echo "dev-cluster: building ($PROFILE) ..." >&2
    local flag=""
    [ "$PROFILE" = release ] && flag="--release"
    (cd "$ROOT" && cargo build $flag -q -p lode-namenode -p lode-datanode -p lode-client -p lode-plugin-host -p lode-plugin-wc -p lode-plugin-grep -p lode-plugin-csvsum) >&2
  fi
  for b in lode lode-namenode lode-datanode lode-plugin-host; do
    [ -x "$BIN/$b" ] || die "missing $BIN/$b and no cargo to build it"
  done
}

# A pid file's process is alive if it exists and is not a zombie (a killed daemon whose parent has
# not reaped it yet counts as dead).
pid_alive() {
  [ -f "$1" ] || return 1
  local pid state
  pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null || return 1
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo "?")
  [ "$state" != Z ]
}

saved_datanodes() {
  if [ -f "$DIR/cluster.env" ]; then . "$DIR/cluster.env"; echo "$CLUSTER_DATANODES"; else echo "$DATANODES"; fi
}

write_configs() {
  local n=$1
  local repl=$(( n < 3 ? n : 3 ))
  mkdir -p "$DIR/logs" "$DIR/pids" "$DIR/meta"
  cat > "$DIR/namenode.toml" <<TOML
# Dev cluster namenode (short timings so faults show quickly).
listen = "127.0.0.1:$BASE_PORT"
meta_dir = "meta"
heartbeat_interval_ms = 1000
stale_after_ms = 3000
dead_after_ms = 10000
lease_expiry_ms = 10000
replication_default = $repl
http_listen = "127.0.0.1:$((BASE_PORT + 100))"
audit_log = "logs/audit.log"

[tls]
ca = "certs/ca.pem"
cert = "certs/namenode.pem"
key = "certs/namenode-key.pem"
TOML
  # Plugins run as another user (nobody) only where the datanode may switch to one, as root; run as
  # an ordinary user, the dev cluster waives that protection (and says so in the datanodes' logs).
  waiver=""
  if [[ $(id -u) -ne 0 ]]; then waiver='plugin_sandbox_optional = ["identity"]'; fi
  for i in $(seq 1 "$n"); do
    mkdir -p "$DIR/dn-$i/data"
    cat > "$DIR/dn-$i.toml" <<TOML
name = "dn-$i"
listen = "127.0.0.1:$((BASE_PORT + i))"
namenode = "127.0.0.1:$BASE_PORT"
data_dirs = ["dn-$i/data"]
heartbeat_interval_ms = 1000
# The block scanner, like the other timings, is quick here: a pass every 5 s at 64 MiB/s.
scan_bytes_per_sec = 67108864
scan_pause_secs = 5
disk_check_secs = 30
http_listen = "127.0.0.1:$((BASE_PORT + 100 + i))"
$waiver

[tls]
ca = "certs/ca.pem"
cert = "certs/dn-$i.pem"
key = "certs/dn-$i-key.pem"
TOML
  done
  cat > "$DIR/client.toml" <<TOML
namenode = "127.0.0.1:$BASE_PORT"

[tls]
ca = "certs/ca.pem"
cert = "certs/admin.pem"
key = "certs/admin-key.pem"
TOML
  sed 's/certs\/admin/certs\/user/g' "$DIR/client.toml" > "$DIR/client-user.toml"
  echo "CLUSTER_DATANODES=$n" > "$DIR/cluster.env"
}

start_namenode() {
  pid_alive "$DIR/pids/namenode.pid" && { echo "dev-cluster: namenode already running" >&2; return; }
  setsid "$BIN/lode-namenode" --config "$DIR/namenode.toml" >>"$DIR/logs/namenode.log" 2>&1 < /dev/null &
  echo $! > "$DIR/pids/namenode.pid"
}

start_datanode() {
  local i=$1
  [ -f "$DIR/dn-$i.toml" ] || die "no datanode dn-$i in $DIR"
  pid_alive "$DIR/pids/dn-$i.pid" && { echo "dev-cluster: dn-$i already running" >&2; return; }
  setsid "$BIN/lode-datanode" --config "$DIR/dn-$i.toml" >>"$DIR/logs/dn-$i.log" 2>&1 < /dev/null &
  echo $! > "$DIR/pids/dn-$i.pid"
}

kill_pid() {
  local f=$1 sig=$2
  if pid_alive "$f"; then kill "-$sig" "$(cat "$f")" 2>/dev/null || true; fi
  if [ "$sig" = KILL ]; then
    local deadline=$((SECONDS + 5))
    while pid_alive "$f" && [ $SECONDS -lt $deadline ]; do sleep 0.05; done
  fi
}

wait_registered() {
  local n=$1 deadline=$((SECONDS + 60)) live=0
  while [ $SECONDS -lt $deadline ]; do
    if pid_alive "$DIR/pids/namenode.pid"; then
      live=$("$BIN/lode" --config "$DIR/client.toml" admin report --json 2>/dev/null | grep -o '"state":"live"' | wc -l || true)
      [ "$live" -ge "$n" ] && return 0
    else
      die "namenode exited; see $DIR/logs/namenode.log"
    fi
    sleep 0.2
  done
  die "only $live of $n datanodes registered within 60 s; see $DIR/logs/"
}

case "$CMD" in
  up)
    build
    if pid_alive "$DIR/pids/namenode.pid"; then die "a cluster is already running in $DIR (run down first)"; fi
    rm -rf "$DIR/certs"
    "$BIN/lode" certs init --dir "$DIR/certs" --datanodes "$DATANODES" >&2
    write_configs "$DATANODES"
    start_namenode
    for i in $(seq 1 "$DATANODES"); do start_datanode "$i"; done
    wait_registered "$DATANODES"
    # Homes for both client configs and a sticky /tmp that every user may write to.
    "$BIN/lode" --config "$DIR/client.toml" mkdir -p /user/admin /user/user /tmp
    "$BIN/lode" --config "$DIR/client.toml" chown user /user/user
    "$BIN/lode" --config "$DIR/client.toml" chmod 1777 /tmp
    echo "dev-cluster: namenode and $DATANODES datanodes up in $DIR (logs in $DIR/logs)" >&2
    echo "export LODE_CONFIG=$DIR/client.toml"
    echo "export PATH=$BIN:\$PATH"
    ;;
  down)
    n=$(saved_datanodes)
    for f in "$DIR"/pids/*.pid; do [ -e "$f" ] && kill_pid "$f" TERM; done
    deadline=$((SECONDS + 10))
    for f in "$DIR"/pids/*.pid; do
      [ -e "$f" ] || continue
      while pid_alive "$f" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
      kill_pid "$f" KILL
      rm -f "$f"
    done
    echo "dev-cluster: stopped ($DIR)" >&2
    ;;
  status)
    n=$(saved_datanodes)
    for p in namenode $(seq -f 'dn-%g' 1 "$n"); do
      if pid_alive "$DIR/pids/$p.pid"; then echo "$p: running (pid $(cat "$DIR/pids/$p.pid"))"; else echo "$p: stopped"; fi
    done
    if pid_alive "$DIR/pids/namenode.pid"; then "$BIN/lode" --config "$DIR/client.toml" admin report || true; fi
    ;;
  kill-datanode)
    [ -n "$ARG" ] || usage
    kill_pid "$DIR/pids/dn-$ARG.pid" KILL
    echo "dev-cluster: dn-$ARG killed" >&2
    ;;
  start-datanode)
    [ -n "$ARG" ] || usage
    start_datanode "$ARG"
    ;;
  kill-namenode)
    kill_pid "$DIR/pids/namenode.pid" KILL
    echo "dev-cluster: namenode killed" >&2
    ;;
  start-namenode)
    start_namenode
    ;;
  *) usage ;;
esac
