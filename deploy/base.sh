#!/usr/bin/env bash
# A Debian bookworm base image made without any container registry: debootstrap from a Debian mirror,
# then `podman import`. For machines that reach only package mirrors; a site with a registry uses
# its own base instead (podman/docker build --build-arg BASE_IMAGE=debian:bookworm-slim ...).
#   bash deploy/base.sh [IMAGE_NAME]        (default localhost/bookworm-base; kept if it exists)
#   DEBIAN_MIRROR=http://... REBUILD=1 bash deploy/base.sh
set -euo pipefail
NAME="${1:-localhost/bookworm-base}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
if [ "${REBUILD:-0}" != 1 ] && podman image exists "$NAME"; then
  echo "$NAME exists (REBUILD=1 makes it anew)"
  exit 0
fi
ROOT="$(mktemp -d /var/tmp/bookworm-rootfs.XXXXXX)"
trap 'rm -rf "$ROOT"' EXIT
debootstrap --variant=minbase bookworm "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 || { tail -20 "$ROOT.log"; exit 1; }
rm -f "$ROOT.log"
cat >"$ROOT/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY bookworm-security main
SOURCES
# mirrors that serve a dated snapshot have expired Valid-Until stamps
echo 'Acquire::Check-Valid-Until "false";' >"$ROOT/etc/apt/apt.conf.d/99no-check-valid-until"
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/cache/apt/archives/*.deb
tar -C "$ROOT" -c . | podman import --change 'CMD ["/bin/bash"]' - "$NAME" >/dev/null
echo "$NAME built"
