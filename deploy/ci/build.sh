#!/usr/bin/env bash
# Build the base, the Orthanc image and the server image on this project's own machines, where no
# container registry can be reached, outbound TLS is intercepted and torch lies in local package indexes:
#   bash deploy/ci/build.sh [IMAGE]        (default localhost/ssl-medsam2:latest)
# ORTHANC_IMAGE names the Orthanc image (default localhost/ssl-medsam2-orthanc:latest).
# A normal site needs none of this: docs/deploy.md. Prints each build's wall time.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/ci/containers.conf}"
IMAGE="${1:-localhost/ssl-medsam2:latest}"
BASE="${BASE_IMAGE:-localhost/bookworm-base}"
bash deploy/base.sh "$BASE"
ORTHANC="${ORTHANC_IMAGE:-localhost/ssl-medsam2-orthanc:latest}"
start=$(date +%s)
podman build --format docker -f deploy/orthanc/Containerfile -t "$ORTHANC" --build-arg "BASE_IMAGE=$BASE" .
echo "built $ORTHANC in $(( $(date +%s) - start )) s"
args=(--format docker -f deploy/Containerfile -t "$IMAGE" --build-arg "BASE_IMAGE=$BASE"
      # the pinned torch here is PyPI's (CUDA) build, served from local disk: PyTorch's CPU index is
      # out of reach of these machines (docs/deploy.md says what a CPU site gets instead)
      --build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}")
# this machine's local package indexes (the host pip's own configuration), read-only in RUN steps
extra=()
for d in /opt/pypi /opt/pypi-more; do
  if [ -d "$d/simple" ]; then args+=(--volume "$d:$d:ro"); extra+=("file://$d/simple"); fi
done
[ ${#extra[@]} -eq 0 ] || args+=(--build-arg "PIP_EXTRA_INDEX_URL=${extra[*]}")
if [ -d /opt/wheels ]; then args+=(--volume /opt/wheels:/opt/wheels:ro --build-arg PIP_FIND_LINKS=/opt/wheels); fi
# outbound TLS is intercepted here: the host's CA bundle (with the extra CAs) as a build secret,
# mounted for pip's RUN steps only, never into a layer
if [ -n "$(ls /usr/local/share/ca-certificates 2>/dev/null)" ]; then
  args+=(--secret "id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt")
fi
start=$(date +%s)
podman build "${args[@]}" .
echo "built $IMAGE in $(( $(date +%s) - start )) s"
