#!/usr/bin/env bash
# A local Lode cluster on loopback: one namenode (or a group of them) and N datanodes, with fresh
# certificates.
#
#   deploy/dev-cluster.sh up [--datanodes N] [--namenodes M] [--dir DIR]
#                                                          build what is missing, start, wait for registration
#   deploy/dev-cluster.sh down [--dir DIR]                 stop everything (SIGTERM, then SIGKILL)
#   deploy/dev-cluster.sh status [--dir DIR]               processes and the namenode's report
#   deploy/dev-cluster.sh kill-datanode I [--dir DIR]      SIGKILL dn-I
#   deploy/dev-cluster.sh start-datanode I [--dir DIR]     start dn-I again
#   deploy/dev-cluster.sh kill-namenode [I] [--dir DIR]    SIGKILL nn-I (without I: the namenode, or the leader)
#   deploy/dev-cluster.sh start-namenode [I] [--dir DIR]   start nn-I again (without I: every stopped one)
#   deploy/dev-cluster.sh freeze-namenode [I] [--dir DIR]  SIGSTOP nn-I (without I: the leader)
#   deploy/dev-cluster.sh thaw-namenode [I] [--dir DIR]    SIGCONT nn-I (without I: every frozen one)
#
# DIR defaults to ./.lode-dev. `up` prints `export LODE_CONFIG=DIR/client.toml` (and a PATH line for
# the lode binary) on stdout, so `eval "$(deploy/dev-cluster.sh up)"` sets up the shell; progress goes
# to stderr.
#
# Short timings so faults show quickly: heartbeat every 1 s, a datanode is stale after 3 s of silence
# and dead after 10 s, and a writer's lease expires after 10 s without renewal.
# Ports: the namenode listens on UDP 127.0.0.1:$LODE_DEV_BASE_PORT (default 7400), dn-I on base+I;
# the namenode's status page and metrics on TCP base+100 (http://127.0.0.1:7500/), dn-I's metrics on
# TCP base+100+I. With --namenodes M (a Raft group; default 1, a namenode alone), nn-1 has the
# namenode's ports and nn-I (I >= 2) listens on base+60+I with its status page on base+160+I; the
# client and datanode configs list every member. Group timings: heartbeat 100 ms, elections after
# 0.5-1 s of silence.
# Binaries: release builds by default; LODE_DEV_PROFILE=debug uses debug builds; LODE_DEV_SKIP_BUILD=1
# uses the binaries already built without running cargo.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROFILE=${LODE_DEV_PROFILE:-release}
BASE_PORT=${LODE_DEV_BASE_PORT:-7400}
DIR=./.lode-dev
DATANODES=3
NAMENODES=1
CMD=${1:-}
[ $# -gt 0 ] && shift
ARG=""

die() { echo "dev-cluster: $*" >&2; exit 1; }
usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --datanodes) [ $# -ge 2 ] || usage; DATANODES=$2; shift 2 ;;
    --namenodes) [ $# -ge 2 ] || usage; NAMENODES=$2; shift 2 ;;
    --dir) [ $# -ge 2 ] || usage; DIR=$2; shift 2 ;;
    -h|--help) usage ;;
    -*) echo "dev-cluster: unknown option $1" >&2; usage ;;
    *) [ -z "$ARG" ] || usage; ARG=$1; shift ;;
  esac
done
case "$DATANODES" in ''|*[!0-9]*) die "--datanodes must be a positive number, got '$DATANODES'" ;; esac
[ "$DATANODES" -ge 1 ] || die "--datanodes must be at least 1"
case "$NAMENODES" in ''|*[!0-9]*) die "--namenodes must be a positive number, got '$NAMENODES'" ;; esac
[ "$NAMENODES" -ge 1 ] && [ "$NAMENODES" -le 9 ] || die "--namenodes must be 1 to 9"

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

saved_namenodes() {
  if [ -f "$DIR/cluster.env" ]; then . "$DIR/cluster.env"; echo "${CLUSTER_NAMENODES:-1}"; else echo "$NAMENODES"; fi
}

# Member I of a group: its UDP port, status page port, and the name of its config, pid and log.
nn_port() { if [ "$1" -eq 1 ]; then echo "$BASE_PORT"; else echo $((BASE_PORT + 60 + $1)); fi; }
nn_http() { if [ "$1" -eq 1 ]; then echo $((BASE_PORT + 100)); else echo $((BASE_PORT + 160 + $1)); fi; }
nn_name() { if [ "$(saved_namenodes)" -eq 1 ]; then echo namenode; else echo "nn-$1"; fi; }

# Reads one metric of member I's status page (bash's /dev/tcp: no curl needed).
nn_metric() {
  local port body
  port=$(nn_http "$1")
  # A frozen member accepts the connection but never answers: give it a second.
  body=$(timeout 1 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n" >&3 && cat <&3' _ "$port" 2>/dev/null) || return 1
  printf '%s\n' "$body" | awk -v m="lode_namenode_$2" '$1 == m { print $2 }'
}

# The member that leads now (the namenode, when it runs alone); empty if none is known.
leader() {
  local m i
  m=$(saved_namenodes)
  [ "$m" -eq 1 ] && { echo 1; return; }
  for i in $(seq 1 "$m"); do
    pid_alive "$DIR/pids/nn-$i.pid" || continue
    [ "$(nn_metric "$i" group_leader 2>/dev/null)" = 1 ] && { echo "$i"; return; }
  done
  # None known (yet): an empty answer, not a failure that `set -e` would stop the script on.
  return 0
}

write_configs() {
  local n=$1 m=$2
  local repl=$(( n < 3 ? n : 3 ))
  mkdir -p "$DIR/logs" "$DIR/pids"
  local addrs="" members="" i
  for i in $(seq 1 "$m"); do
    addrs="$addrs${addrs:+, }\"127.0.0.1:$(nn_port "$i")\""
    members="$members${members:+, }{ id = $i, name = \"nn-$i\", addr = \"127.0.0.1:$(nn_port "$i")\" }"
  done
  # How clients and datanodes name the namenode: one address, or every member of the group.
  local nn_line="namenode = \"127.0.0.1:$BASE_PORT\""
  [ "$m" -gt 1 ] && nn_line="namenodes = [$addrs]"
  for i in $(seq 1 "$m"); do
    local name=namenode meta=meta group=""
    if [ "$m" -gt 1 ]; then
      name="nn-$i"; meta="meta-nn-$i"
      group=$(printf '\n[group]\nid = %s\nheartbeat_ms = 100\nelection_min_ms = 500\nelection_max_ms = 1000\nmembers = [%s]\n' "$i" "$members")
    fi
    mkdir -p "$DIR/$meta"
    cat > "$DIR/$name.toml" <<TOML
# Dev cluster namenode (short timings so faults show quickly).
listen = "127.0.0.1:$(nn_port "$i")"
meta_dir = "$meta"
heartbeat_interval_ms = 1000
stale_after_ms = 3000
dead_after_ms = 10000
lease_expiry_ms = 10000
replication_default = $repl
http_listen = "127.0.0.1:$(nn_http "$i")"
audit_log = "logs/audit${group:+-$name}.log"

[tls]
ca = "certs/ca.pem"
cert = "certs/$name.pem"
key = "certs/$name-key.pem"
$group
TOML
  done
  # Plugins run as another user (nobody) only where the datanode may switch to one, as root; run as
  # an ordinary user, the dev cluster waives that protection (and says so in the datanodes' logs).
  waiver=""
  if [[ $(id -u) -ne 0 ]]; then waiver='plugin_sandbox_optional = ["identity"]'; fi
  for i in $(seq 1 "$n"); do
    mkdir -p "$DIR/dn-$i/data"
    cat > "$DIR/dn-$i.toml" <<TOML
name = "dn-$i"
listen = "127.0.0.1:$((BASE_PORT + i))"
$nn_line
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
$nn_line

[tls]
ca = "certs/ca.pem"
cert = "certs/admin.pem"
key = "certs/admin-key.pem"
TOML
  sed 's/certs\/admin/certs\/user/g' "$DIR/client.toml" > "$DIR/client-user.toml"
  printf 'CLUSTER_DATANODES=%s\nCLUSTER_NAMENODES=%s\n' "$n" "$m" > "$DIR/cluster.env"
}

start_namenode() {
  local name
  name=$(nn_name "$1")
  [ -f "$DIR/$name.toml" ] || die "no namenode $1 in $DIR"
  pid_alive "$DIR/pids/$name.pid" && { echo "dev-cluster: $name already running" >&2; return; }
  setsid "$BIN/lode-namenode" --config "$DIR/$name.toml" >>"$DIR/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$DIR/pids/$name.pid"
}

# Some namenode process is alive.
any_namenode() {
  local i
  for i in $(seq 1 "$(saved_namenodes)"); do pid_alive "$DIR/pids/$(nn_name "$i").pid" && return 0; done
  return 1
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
    if any_namenode; then
      live=$("$BIN/lode" --config "$DIR/client.toml" admin report --json 2>/dev/null | grep -o '"state":"live"' | wc -l || true)
      [ "$live" -ge "$n" ] && return 0
    else
      die "the namenode exited; see $DIR/logs/"
    fi
    sleep 0.2
  done
  die "only $live of $n datanodes registered within 60 s; see $DIR/logs/"
}

case "$CMD" in
  up)
    build
    if any_namenode; then die "a cluster is already running in $DIR (run down first)"; fi
    rm -rf "$DIR/certs"
    "$BIN/lode" certs init --dir "$DIR/certs" --datanodes "$DATANODES" >&2
    if [ "$NAMENODES" -gt 1 ]; then
      for i in $(seq 1 "$NAMENODES"); do
        "$BIN/lode" certs issue --dir "$DIR/certs" --name "nn-$i" --role namenode >&2
      done
    fi
    write_configs "$DATANODES" "$NAMENODES"
    for i in $(seq 1 "$NAMENODES"); do start_namenode "$i"; done
    for i in $(seq 1 "$DATANODES"); do start_datanode "$i"; done
    wait_registered "$DATANODES"
    # Homes for both client configs and a sticky /tmp that every user may write to.
    "$BIN/lode" --config "$DIR/client.toml" mkdir -p /user/admin /user/user /tmp
    "$BIN/lode" --config "$DIR/client.toml" chown user /user/user
    "$BIN/lode" --config "$DIR/client.toml" chmod 1777 /tmp
    if [ "$NAMENODES" -gt 1 ]; then
      echo "dev-cluster: $NAMENODES namenodes (nn-$(leader) leads) and $DATANODES datanodes up in $DIR (logs in $DIR/logs)" >&2
    else
      echo "dev-cluster: namenode and $DATANODES datanodes up in $DIR (logs in $DIR/logs)" >&2
    fi
    echo "export LODE_CONFIG=$DIR/client.toml"
    echo "export PATH=$BIN:\$PATH"
    ;;
  down)
    n=$(saved_datanodes)
    for f in "$DIR"/pids/*.pid; do [ -e "$f" ] && kill -CONT "$(cat "$f")" 2>/dev/null; [ -e "$f" ] && kill_pid "$f" TERM; done
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
    m=$(saved_namenodes)
    for p in $(for i in $(seq 1 "$m"); do nn_name "$i"; done) $(seq -f 'dn-%g' 1 "$n"); do
      if pid_alive "$DIR/pids/$p.pid"; then echo "$p: running (pid $(cat "$DIR/pids/$p.pid"))"; else echo "$p: stopped"; fi
    done
    if [ "$m" -gt 1 ]; then
      l=$(leader)
      if [ -n "$l" ]; then echo "leader: nn-$l"; else echo "leader: none known"; fi
    fi
    if any_namenode; then "$BIN/lode" --config "$DIR/client.toml" admin report || true; fi
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
  kill-namenode|freeze-namenode)
    i=$ARG
    # Without a member: the leader, waiting up to 10 s for one (an election may be under way).
    deadline=$((SECONDS + 10))
    while [ -z "$i" ] && [ $SECONDS -lt $deadline ]; do i=$(leader); [ -n "$i" ] || sleep 0.1; done
    [ -n "$i" ] || die "no leader is known; name the member (1..$(saved_namenodes))"
    name=$(nn_name "$i")
    if [ "$CMD" = kill-namenode ]; then
      kill_pid "$DIR/pids/$name.pid" KILL
      echo "dev-cluster: $name killed" >&2
    else
      pid_alive "$DIR/pids/$name.pid" || die "$name is not running"
      kill -STOP "$(cat "$DIR/pids/$name.pid")"
      echo "dev-cluster: $name frozen (thaw-namenode $i resumes it)" >&2
    fi
    ;;
  start-namenode|thaw-namenode)
    if [ -n "$ARG" ]; then members=$ARG; else members=$(seq 1 "$(saved_namenodes)"); fi
    for i in $members; do
      name=$(nn_name "$i")
      if [ "$CMD" = start-namenode ]; then
        if [ -n "$ARG" ] || ! pid_alive "$DIR/pids/$name.pid"; then start_namenode "$i"; fi
      elif pid_alive "$DIR/pids/$name.pid"; then
        kill -CONT "$(cat "$DIR/pids/$name.pid")"
        echo "dev-cluster: $name thawed" >&2
      fi
    done
    ;;
  *) usage ;;
esac
