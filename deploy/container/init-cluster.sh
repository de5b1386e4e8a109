#!/usr/bin/env bash
# Writes what the compose cluster (compose.yaml) mounts: one directory per service, each holding
# that service's config, its own key and certificate and the CA certificate, nothing else:
#
#   DIR/namenode/   namenode.toml  ca.pem namenode.pem namenode-key.pem
#   DIR/dn-N/       datanode.toml  ca.pem dn-N.pem dn-N-key.pem           (N = 1..3)
#   DIR/tools/      client.toml (admin) user.toml (user)  ca.pem admin*.pem user*.pem
#   DIR/ca/         ca.pem ca-key.pem   never mounted: the CA key stays with the operator
#
# The certificates are made by `lode certs init` inside the image, so no local build is needed.
# Each service directory belongs to the image's service user `lode` (10001), mode 0700, keys 0600:
# run this as root (or with sudo at hand), since it gives the files to that user.
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
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$DIR" ] || die "one DIR only"; DIR=$1; shift ;;
  esac
done
DIR=${DIR:-$HERE/cluster}
[ -e "$DIR/ca/ca.pem" ] && die "$DIR already holds a cluster (remove it to start afresh)"
# The service user of the image (rootfs-tar.py) and the plugin user, which must differ.
LODE_UID=10001
PLUGIN_UID=10002
if [ "$(id -u)" = 0 ]; then
  as_root() { "$@"; }
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  as_root() { sudo -n "$@"; }
else
  die "run as root (or with sudo): each service's key must be given to the image's user $LODE_UID"
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
docker image inspect "$IMAGE" >/dev/null 2>&1 || die "no image $IMAGE (run deploy/container/build-image.sh)"
STAGE=$(mktemp -d "$DIR/.certs.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
docker run --rm --user "$(id -u):$(id -g)" -v "$STAGE:/certs" "$IMAGE" \
  lode certs init --dir /certs --datanodes 3 >/dev/null || die "certs init failed"

# Moves NAME's key and certificate (and a copy of the CA certificate) into the directory SERVICE.
give() {
  local service=$1; shift
  mkdir -p "$DIR/$service"
  cp "$STAGE/ca.pem" "$DIR/$service/ca.pem"
  for name in "$@"; do
    mv "$STAGE/$name.pem" "$STAGE/$name-key.pem" "$DIR/$service/"
  done
}
tls() {
  printf '[tls]\nca = "ca.pem"\ncert = "%s.pem"\nkey = "%s-key.pem"\n' "$1" "$1"
}
give namenode namenode
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
audit_log = "/var/lib/lode/audit/audit.log"
TOML
  tls namenode
} > "$DIR/namenode/namenode.toml"
for i in 1 2 3; do
  give "dn-$i" "dn-$i"
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
# Plugins run as the image's lode-plugin user, never as the datanode's own.
plugin_uid = $PLUGIN_UID
plugin_gid = $PLUGIN_UID
TOML
    tls "dn-$i"
  } > "$DIR/dn-$i/datanode.toml"
done
give tools admin user
for who in admin user; do
  {
    cat <<TOML
# The CLI in the tools container, as $who:
#   docker compose -f deploy/container/compose.yaml run --rm tools admin report
namenode = "namenode:7400"
TOML
    tls "$who"
  } > "$DIR/tools/$([ "$who" = admin ] && echo client || echo user).toml"
done
mkdir -p "$DIR/ca"
mv "$STAGE/ca.pem" "$STAGE/ca-key.pem" "$DIR/ca/"
chmod 0700 "$DIR/ca"
leftover=$(ls -A "$STAGE")
[ -z "$leftover" ] || die "certs init wrote files this script does not place: $leftover"
for service in namenode dn-1 dn-2 dn-3 tools; do
  chmod 0700 "$DIR/$service"
  chmod 0644 "$DIR/$service"/*.pem "$DIR/$service"/*.toml
  chmod 0600 "$DIR/$service"/*-key.pem
  as_root chown -R "$LODE_UID:$LODE_UID" "$DIR/$service"
done
echo "init-cluster: wrote certificates and configs to $DIR (the CA key is in $DIR/ca only)" >&2
