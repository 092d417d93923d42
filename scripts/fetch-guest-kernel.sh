#!/usr/bin/env bash
# Fetches the guest kernel and busybox for `examples/linux_guests.rs`:
# Debian's cloud kernel (linux-image-cloud-amd64, followed to the real
# linux-image-<version>-cloud-amd64 package) and busybox-static, with
# `apt-get download`, unpacked with `dpkg-deb -x` into a cache:
#
#   ${CARGO_TARGET_DIR:-<repo>/target}/guest-kernel/
#       vmlinuz      the bzImage (a symlink into the unpacked package)
#       busybox      the static busybox binary (a symlink)
#       debs/        the downloaded .deb files
#       root/        the unpacked packages
#
# Idempotent: a second run with both files present does nothing. Prints the
# cache directory on its last line. Needs apt-get/dpkg-deb (Debian/Ubuntu);
# runs `apt-get update` once when the package lists do not know the
# packages yet (root only).
#
#   bash scripts/fetch-guest-kernel.sh
#   GUEST_KERNEL_DIR=/some/dir bash scripts/fetch-guest-kernel.sh   # elsewhere
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$repo/target}
dir=${GUEST_KERNEL_DIR:-$target/guest-kernel}
mkdir -p "$dir/debs" "$dir/root"

if [ -e "$dir/vmlinuz" ] && [ -e "$dir/busybox" ]; then
  echo "guest kernel already fetched"
  echo "$dir"
  exit 0
fi

# The metapackage only depends on the versioned image package.
real_image() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
image=$(real_image || true)
if [ -z "$image" ] || ! apt-cache show busybox-static >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    image=$(real_image || true)
  fi
fi
if [ -z "$image" ]; then
  echo "fetch-guest-kernel: apt does not know linux-image-cloud-amd64 (run apt-get update as root; needs Debian's main archive)" >&2
  exit 1
fi

cd "$dir/debs"
for p in "$image" busybox-static; do
  if ! ls "${p}"_*.deb >/dev/null 2>&1; then
    # apt-get download runs as the _apt user when it can; a directory that
    # user cannot write only gives a warning, so check the result.
    apt-get download -q "$p"
  fi
  ls "${p}"_*.deb >/dev/null
done
for d in ./*.deb; do
  dpkg-deb -x "$d" "$dir/root"
done

vmlinuz=$(ls "$dir"/root/boot/vmlinuz-*-cloud-amd64 | head -n 1)
ln -sfn "$vmlinuz" "$dir/vmlinuz"
ln -sfn "$dir/root/bin/busybox" "$dir/busybox"
test -x "$dir/busybox"
echo "guest kernel: $(basename "$vmlinuz"), busybox: $(ls "$dir"/debs/busybox-static_*.deb | xargs -n1 basename)"
echo "$dir"
