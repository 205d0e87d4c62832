#!/usr/bin/env bash
# Shared podman setup for containers/build.sh and containers/smoke.sh (source it; do not run it).
#
# Works on a Docker-less Debian host as root (see /work/shared/notes/building-images.md):
#   - installs buildah/podman/runc/... with apt when podman is missing;
#   - writes containers.conf / storage.conf into MNNPIPE_PODMAN_DIR (outside the repo) and
#     exports CONTAINERS_CONF / CONTAINERS_STORAGE_CONF, so images never land in the repo;
#   - runc (crun refuses this host's hybrid cgroups) and explicit ulimits (the defaults are refused).
# Elsewhere (a machine with a normal container engine) you do not need this file: the Dockerfile is
# standard and builds with `docker build -f containers/Dockerfile .`.

MNNPIPE_PODMAN_DIR="${MNNPIPE_PODMAN_DIR:-/var/tmp/mnnpipe-podman}"

mnnpipe_podman_setup() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "podman-env: must run as root (rootful podman with kernel overlay)" >&2
        return 1
    fi
    if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1 \
        || ! command -v debootstrap >/dev/null 2>&1; then
        echo "podman-env: installing buildah podman runc fuse-overlayfs slirp4netns uidmap debootstrap" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            buildah podman runc fuse-overlayfs slirp4netns uidmap debootstrap >/dev/null
    fi
    mkdir -p "$MNNPIPE_PODMAN_DIR"
    cat >"$MNNPIPE_PODMAN_DIR/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
CONF
    cat >"$MNNPIPE_PODMAN_DIR/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$MNNPIPE_PODMAN_DIR/storage"
runroot = "$MNNPIPE_PODMAN_DIR/runroot"
CONF
    export CONTAINERS_CONF="$MNNPIPE_PODMAN_DIR/containers.conf"
    export CONTAINERS_STORAGE_CONF="$MNNPIPE_PODMAN_DIR/storage.conf"
}

# The package version in pyproject.toml (image label and default tag).
mnnpipe_version() {
    local version
    version="$(sed -n 's/^version[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$1/pyproject.toml" | head -n 1)"
    echo "${version:-dev}"
}

# Default image tag: localhost/mnnpipe-step:<version from pyproject.toml>.
mnnpipe_default_image() {
    echo "localhost/mnnpipe-step:$(mnnpipe_version "$1")"
}
