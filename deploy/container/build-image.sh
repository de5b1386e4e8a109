#!/usr/bin/env bash
# Builds the Lode container image from the project's own binaries alone: lode, lode-namenode,
# lode-datanode and lode-plugin-host, the shared libraries `ldd` says they need (libc, libm,
# libgcc_s, the dynamic loader), an empty /tmp, and the users the services run as (see
# rootfs-tar.py). No shell, no package manager, no base image pulled.
#
# The staged tree is packed by rootfs-tar.py and loaded with `docker import`, which keeps the
# file capabilities of lode-datanode (a Dockerfile COPY drops them). One image serves every role;
# the compose file picks the command:
#   lode-namenode --config /etc/lode/namenode.toml
#   lode-datanode --config /etc/lode/datanode.toml
#   lode ...       (the CLI; LODE_CONFIG names its config)
# Every process runs as the user `lode` (10001) unless told otherwise; plugins run as
# `lode-plugin` (10002).
#
#   deploy/container/build-image.sh [--tag TAG] [--bin-dir DIR]
#
# --tag      image tag (default lode:latest)
# --bin-dir  take the binaries from DIR instead of building them with `cargo build --release`
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TAG=lode:latest
BIN_DIR=
die() { echo "build-image: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) TAG=${2:?--tag needs a value}; shift 2 ;;
    --bin-dir) BIN_DIR=${2:?--bin-dir needs a value}; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
command -v docker >/dev/null || die "docker is not installed"
command -v ldd >/dev/null || die "ldd is not installed (Debian package libc-bin)"
command -v python3 >/dev/null || die "python3 is not installed (Debian package python3)"
BINS="lode lode-namenode lode-datanode lode-plugin-host"
if [ -z "$BIN_DIR" ]; then
  (cd "$ROOT" && cargo build --release --bin lode --bin lode-namenode --bin lode-datanode --bin lode-plugin-host) \
    || die "cargo build failed"
  BIN_DIR="$ROOT/target/release"
fi
CTX=$(mktemp -d "${TMPDIR:-/tmp}/lode-image.XXXXXX")
trap 'rm -rf "$CTX"' EXIT
ROOTFS="$CTX/rootfs"
mkdir -p "$ROOTFS/usr/local/bin" "$ROOTFS/tmp" "$ROOTFS/etc" "$ROOTFS/var/lib/lode" "$ROOTFS/etc/lode"
chmod 1777 "$ROOTFS/tmp"
for b in $BINS; do
  [ -x "$BIN_DIR/$b" ] || die "no $b in $BIN_DIR"
  # Debug info is not needed at run time; strip it when binutils is there.
  if command -v strip >/dev/null; then
    strip --strip-debug -o "$ROOTFS/usr/local/bin/$b" "$BIN_DIR/$b"
  else
    cp "$BIN_DIR/$b" "$ROOTFS/usr/local/bin/$b"
  fi
  # Every library ldd resolves ("name => /path (addr)") and the loader ("/lib64/ld-... (addr)").
  for lib in $(ldd "$BIN_DIR/$b" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    mkdir -p "$ROOTFS$(dirname "$lib")"
    cp -L "$lib" "$ROOTFS$lib"
  done
done
# Host names (datanodes and the namenode find each other by service name) come from /etc/hosts and
# DNS; both files are provided by the container engine.
printf 'hosts: files dns\n' > "$ROOTFS/etc/nsswitch.conf"
python3 "$(dirname "$0")/rootfs-tar.py" "$ROOTFS" "$CTX/rootfs.tar" || die "packing the root file system failed"
# QUIC (UDP): namenode 7400, datanodes 7401. HTTP (TCP): status page 7500, datanode metrics 7501.
docker import \
  --change 'ENV PATH=/usr/local/bin' \
  --change 'ENV LODE_LOG=info' \
  --change 'USER 10001:10001' \
  --change 'WORKDIR /var/lib/lode' \
  --change 'EXPOSE 7400/udp 7401/udp 7500/tcp 7501/tcp' \
  "$CTX/rootfs.tar" "$TAG" >"$CTX/build.log" 2>&1 || { cat "$CTX/build.log" >&2; die "docker import failed"; }
echo "build-image: built $TAG ($(du -sh "$ROOTFS" | cut -f1) of binaries and libraries)" >&2
