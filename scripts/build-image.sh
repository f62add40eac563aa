#!/usr/bin/env bash
# build-image.sh - builds the harmonylite image from the Dockerfile with buildah
# (no Docker engine: --isolation=chroot), and checks it runs.
#
#   scripts/build-image.sh [TAG]      (default harmonylite:dev; needs root)
#
# The build stage starts from debian:bookworm. When no registry can be reached
# (our build machines), that base image is made locally with debootstrap from
# the machine's own Debian mirror and cached under
# ${XDG_CACHE_HOME:-~/.cache}/harmonylite/image. After the build the image is
# unpacked into a directory and `harmonylite -version` and
# `nats-server --version` run from it in a chroot; the image's size is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-harmonylite:dev}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/harmonylite/image
mkdir -p "$cache"
export BUILDAH_ISOLATION=chroot STORAGE_DRIVER=vfs

for tool in buildah debootstrap; do
    command -v "$tool" >/dev/null || { echo "build-image: $tool is missing (scripts/install-deps.sh installs it)" >&2; exit 1; }
done

if ! buildah inspect --type image debian:bookworm >/dev/null 2>&1 &&
    ! buildah pull -q docker.io/library/debian:bookworm >/dev/null 2>&1; then
    base=$cache/bookworm-rootfs.tar
    if [ ! -s "$base" ]; then
        mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
        [ -n "$mirror" ] || mirror=$(awk '/^deb / { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
        echo "build-image: making debian:bookworm with debootstrap from ${mirror:-deb.debian.org}"
        root=$(mktemp -d "$cache/root.XXXXXX")
        debootstrap --variant=minbase bookworm "$root" "${mirror:-http://deb.debian.org/debian}" >"$cache/debootstrap.log" 2>&1 ||
            { cat "$cache/debootstrap.log" >&2; rm -rf "$root"; exit 1; }
        # Debian's mirror and the module proxy reached the way this machine
        # reaches them: its apt sources and its extra CA certificates
        # (the final image gets Debian's own bundle only: see the Dockerfile).
        if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
            cp /etc/apt/sources.list.d/*.sources "$root/etc/apt/sources.list.d/"
            rm -f "$root/etc/apt/sources.list"
        fi
        if [ -d /usr/local/share/ca-certificates ]; then
            mkdir -p "$root/usr/local/share/ca-certificates"
            cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
        fi
        tar -C "$root" -cf "$base.tmp" . && mv "$base.tmp" "$base"
        rm -rf "$root"
    fi
    ctr=$(buildah from scratch)
    buildah add -q "$ctr" "$base" / >/dev/null
    buildah commit -q "$ctr" debian:bookworm >/dev/null
    buildah rm "$ctr" >/dev/null
fi

buildah bud --isolation=chroot --layers=false -q -t "$tag" -f Dockerfile . >/dev/null

# Run what the image holds, in a chroot of its unpacked root.
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
ctr=$(buildah from "$tag")
mnt=$(buildah mount "$ctr")
cp -a "$mnt/." "$out/"
buildah umount "$ctr" >/dev/null
buildah rm "$ctr" >/dev/null
chroot --userspec=65532:65532 "$out" /usr/local/bin/harmonylite -version
chroot --userspec=65532:65532 "$out" /usr/local/bin/nats-server --version
[ ! -e "$out/bin/sh" ] || { echo "build-image: the image has a shell" >&2; exit 1; }
size=$(buildah images --format '{{.Size}}' "$tag" 2>/dev/null | head -n1 || true)
echo "build-image: $tag built; unpacked root $(du -sh "$out" | cut -f1), harmonylite $(du -h "$out/usr/local/bin/harmonylite" | cut -f1)${size:+, image $size}"
