#!/usr/bin/env bash
# A local stand-in for Flower's official images (flwr/superlink, flwr/supernode, flwr/superexec) where no image
# registry can be reached: Debian bookworm from debootstrap, then the official images' layout (a venv at /python/venv
# on PATH with flwr, user "app" uid 49999, HOME and WORKDIR /app). One image serves every role: docker-compose.yml
# names each service's program as its entrypoint. It also carries torch and torchvision (the pins of .ci/run,
# installed from this machine's wheels when they are on disk), so that building deploy/Dockerfile on top of it
# downloads no multi-GB CUDA wheels.
#
#   deploy/local-flwr-image.sh [IMAGE]        # default feddistill-local/flwr:$FLWR_VERSION (1.42.0); root only
#   FEDDISTILL_SUPERLINK_IMAGE=feddistill-local/flwr FEDDISTILL_SUPERNODE_IMAGE=feddistill-local/flwr \
#   FEDDISTILL_SUPEREXEC_IMAGE=feddistill-local/flwr docker compose up --build -d
#
# Does nothing when IMAGE exists. HTTPS from inside the image (pip, when deploy/Dockerfile installs the project's
# dependencies) may pass a proxy that this host trusts through its locally added CA certificates
# (/usr/local/share/ca-certificates/*.crt): they are copied into the image, which therefore stays on this machine.
set -euo pipefail

FLWR_VERSION="${FLWR_VERSION:-1.42.0}"
IMAGE="${1:-feddistill-local/flwr:${FLWR_VERSION}}"
PYTHON_PACKAGES=("flwr==${FLWR_VERSION}" "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}")
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE: already present"
  exit 0
fi
for tool in debootstrap docker; do
  command -v "$tool" >/dev/null || { echo "local-flwr-image: $tool not found (apt-get install debootstrap docker.io)" >&2; exit 1; }
done

root="$(mktemp -d /var/tmp/flwr-rootfs.XXXXXX)"
cleanup() {
  umount "$root/opt" 2>/dev/null || true
  rm -rf --one-file-system "$root"
}
trap cleanup EXIT

start=$SECONDS
echo "local-flwr-image: debootstrap bookworm into $root"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libsqlite3-0 \
  bookworm "$root" "$MIRROR" >"$root.debootstrap.log" 2>&1 || { tail -20 "$root.debootstrap.log" >&2; exit 1; }
rm -f "$root.debootstrap.log"

shopt -s nullglob
local_cas=(/usr/local/share/ca-certificates/*.crt)
if ((${#local_cas[@]})); then
  cp "${local_cas[@]}" "$root/usr/local/share/ca-certificates/"
fi
chroot "$root" update-ca-certificates >/dev/null
cp /etc/resolv.conf "$root/etc/resolv.conf"

# This machine's wheels (/opt/wheels, local indexes under /opt), read-only, while pip runs in the chroot.
pip_sources=()
if [ -d /opt ]; then
  mkdir -p "$root/opt"
  mount --bind /opt "$root/opt"
  mount -o remount,bind,ro "$root/opt"
  [ -d /opt/wheels ] && pip_sources+=(--find-links /opt/wheels)
  for index in /opt/pypi/simple /opt/pypi-more/simple; do
    [ -d "$index" ] && pip_sources+=(--extra-index-url "file://$index")
  done
fi

echo "local-flwr-image: venv with ${PYTHON_PACKAGES[*]} ($((SECONDS - start)) s)"
chroot "$root" python3 -m venv /python/venv
chroot "$root" env -i PATH=/usr/bin:/bin /python/venv/bin/pip install --quiet --no-cache-dir --no-compile \
  --disable-pip-version-check --cert /etc/ssl/certs/ca-certificates.crt "${pip_sources[@]}" "${PYTHON_PACKAGES[@]}"
umount "$root/opt"
chroot "$root" useradd --no-create-home --home-dir /app --comment "" --uid 49999 app
mkdir -p "$root/app"
chroot "$root" chown -R app:app /app /python/venv
rm -f "$root/etc/resolv.conf"
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*

echo "local-flwr-image: docker import $IMAGE ($((SECONDS - start)) s)"
tar -C "$root" -c . | docker import \
  --change "ENV PATH=/python/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  --change "ENV HOME=/app" --change "ENV LANG=C.UTF-8" --change "ENV PYTHONUNBUFFERED=1" \
  --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
  --change "WORKDIR /app" --change "USER app" \
  - "$IMAGE" >/dev/null
echo "local-flwr-image: $IMAGE built in $((SECONDS - start)) s"
