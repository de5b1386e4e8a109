#!/usr/bin/env bash
# Writes what the compose cluster (compose.yaml) mounts at /etc/lode: certificates for a namenode
# and dn-1..dn-3 (made by `lode certs init` inside the image, so no local build is needed), their
# configs, and client.toml (admin certificate) for running the CLI inside the namenode container.
#
#   deploy/container/init-cluster.sh [--image TAG] [DIR]
#
# DIR defaults to deploy/container/cluster (what compose.yaml mounts unless LODE_CLUSTER_DIR says
# otherwise); it must not hold a cluster already. Timings are short, as in the dev cluster (heartbeat
# 1 s, stale after 3 s, dead after 10 s), so faults show quickly; for production values see
# deploy/config/*.toml.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
IMAGE=lode:latest
DIR=
die() { echo "init-cluster: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --image) IMAGE=${2:?--image needs a value}; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$DIR" ] || die "one DIR only"; DIR=$1; shift ;;
  esac
done
DIR=${DIR:-$HERE/cluster}
[ -e "$DIR/certs/ca.pem" ] && die "$DIR already holds a cluster (remove it to start afresh)"
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
docker image inspect "$IMAGE" >/dev/null 2>&1 || die "no image $IMAGE (run deploy/container/build-image.sh)"
docker run --rm --user "$(id -u):$(id -g)" -v "$DIR:/cluster" "$IMAGE" \
  lode certs init --dir /cluster/certs --datanodes 3 >/dev/null || die "certs init failed"

tls() {
  printf '[tls]\nca = "certs/ca.pem"\ncert = "certs/%s.pem"\nkey = "certs/%s-key.pem"\n' "$1" "$1"
}
{
  cat <<TOML
# Namenode of the compose cluster (see deploy/config/namenode.toml for every option).
listen = "0.0.0.0:7400"
meta_dir = "/var/lib/lode/meta"
heartbeat_interval_ms = 1000
stale_after_ms = 3000
dead_after_ms = 10000
lease_expiry_ms = 10000
replication_default = 3
http_listen = "0.0.0.0:7500"
TOML
  tls namenode
} > "$DIR/namenode.toml"
for i in 1 2 3; do
  {
    cat <<TOML
# Datanode dn-$i of the compose cluster (see deploy/config/datanode.toml for every option).
name = "dn-$i"
listen = "0.0.0.0:7401"
advertise = "dn-$i:7401"
namenode = "namenode:7400"
data_dirs = ["/var/lib/lode/data"]
heartbeat_interval_ms = 1000
http_listen = "0.0.0.0:7501"
TOML
    tls "dn-$i"
  } > "$DIR/dn-$i.toml"
done
{
  cat <<TOML
# The CLI inside the containers: docker compose exec namenode lode admin report
namenode = "namenode:7400"
TOML
  tls admin
} > "$DIR/client.toml"
echo "init-cluster: wrote certificates and configs to $DIR" >&2
