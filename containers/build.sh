#!/usr/bin/env bash
# Build the mnnpipe step image with podman on a Docker-less Debian host, as root.
#
#   containers/build.sh [IMAGE]
#
# IMAGE defaults to $MNNPIPE_IMAGE, else localhost/mnnpipe-step:<version in pyproject.toml>.
# Environment (all optional):
#   MNNPIPE_PODMAN_DIR     podman config + image storage (default /var/tmp/mnnpipe-podman)
#   MNNPIPE_WHEELS         find-links folder holding the torch CPU wheel (default: $PIP_FIND_LINKS,
#                          else /opt/wheels); mounted read-only for the build only. When it is a
#                          folder, the PyTorch CPU index is not used (TORCH_INDEX_URL="").
#   MNNPIPE_HOST_CA        CA bundle that pip must trust (default /etc/ssl/certs/ca-certificates.crt);
#                          mounted read-only for the build only.
#   MNNPIPE_DEBIAN_MIRROR  mirror for debootstrap (default: the first URIs/deb line apt uses here)
#   MNNPIPE_BASE_STANDIN   1 (default): make docker.io/library/python:3.11-slim locally with
#                          debootstrap when it is not in storage yet (no registry here); 0: let
#                          podman pull the real one.
# See /work/shared/notes/building-images.md for why each setting is what it is.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
# shellcheck source=containers/podman-env.sh
. "$here/podman-env.sh"

image="${1:-${MNNPIPE_IMAGE:-$(mnnpipe_default_image "$repo")}}"
version="$(mnnpipe_version "$repo")"
base_ref="docker.io/library/python:3.11-slim"
wheels="${MNNPIPE_WHEELS:-${PIP_FIND_LINKS:-/opt/wheels}}"
host_ca="${MNNPIPE_HOST_CA:-/etc/ssl/certs/ca-certificates.crt}"

mnnpipe_podman_setup

debian_mirror() {
    if [ -n "${MNNPIPE_DEBIAN_MIRROR:-}" ]; then
        echo "$MNNPIPE_DEBIAN_MIRROR"
        return
    fi
    local m=""
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        m="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
    fi
    if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
        m="$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list)"
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

# A stand-in for python:3.11-slim made once from Debian bookworm (python 3.11 + pip + venv,
# `python` on PATH, no EXTERNALLY-MANAGED marker), tagged with the real name so the Dockerfile
# keeps its standard FROM. Cached in the podman storage under $MNNPIPE_PODMAN_DIR.
make_base_standin() {
    local rootfs="$MNNPIPE_PODMAN_DIR/rootfs-python311"
    local mirror
    mirror="$(debian_mirror)"
    echo "build.sh: making $base_ref locally (debootstrap bookworm from $mirror)" >&2
    rm -rf "$rootfs"
    debootstrap --variant=minbase \
        --include=python3,python3-pip,python3-venv,ca-certificates \
        bookworm "$rootfs" "$mirror" >"$MNNPIPE_PODMAN_DIR/debootstrap.log" 2>&1 \
        || { tail -n 20 "$MNNPIPE_PODMAN_DIR/debootstrap.log" >&2; return 1; }
    ln -sf python3 "$rootfs/usr/bin/python"
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" --numeric-owner -c . \
        | podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$base_ref" >/dev/null
    rm -rf "$rootfs"
}

if [ "${MNNPIPE_BASE_STANDIN:-1}" = "1" ] && ! podman image exists "$base_ref"; then
    make_base_standin
fi

build_args=(
    build --isolation chroot
    -f "$here/Dockerfile"
    -t "$image"
    --build-arg "VERSION=$version"
)
if [ -f "$host_ca" ]; then
    build_args+=(-v "$host_ca:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
fi
if [ -d "$wheels" ]; then
    build_args+=(-v "$wheels:/run/wheels:ro" --build-arg PIP_FIND_LINKS=/run/wheels
                 --build-arg TORCH_INDEX_URL=)
fi

echo "build.sh: podman ${build_args[*]} $repo" >&2
start=$(date +%s)
podman "${build_args[@]}" "$repo"
end=$(date +%s)

size="$(podman image inspect --format '{{.Size}}' "$image")"
echo "build.sh: built $image in $((end - start)) s, $((size / 1000000)) MB" >&2
