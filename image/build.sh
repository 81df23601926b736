#!/usr/bin/env bash
# Build the PAS appliance image: a minimal Debian 12 root file system with PAS in its own
# virtual environment under /opt/pas, booted directly by a kernel + initrd (see README.md).
#
#   image/build.sh [OUT_DIR]        (root; Debian packages from the configured mirror)
#
# Produces OUT_DIR/pas-appliance-<version>.raw (ext4), vmlinuz, initrd.img, and
# pas-appliance-<version>.release (what went in). No loop device or mount is needed:
# the file system is made from the folder by mkfs.ext4 -d.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
out="$(realpath -m "${1:-$here/out}")"
suite="${PAS_IMAGE_SUITE:-bookworm}"
mirror="${PAS_IMAGE_MIRROR:-http://deb.debian.org/debian}"
size="${PAS_IMAGE_SIZE:-3G}"
version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$repo/appliance/__init__.py")"
commit="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)"
# Reproducible: timestamps inside the image come from the last commit, not from the clock.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)}"

[ "$(id -u)" = 0 ] || { echo "image/build.sh: run as root (debootstrap and chroot)"; exit 1; }
for tool in debootstrap mkfs.ext4 python3; do
  command -v "$tool" >/dev/null || { echo "image/build.sh: missing $tool (make image installs it)"; exit 1; }
done

work="$out/work"
rootfs="$work/rootfs"
mkdir -p "$out" "$work"
rm -rf "$rootfs"

# tzdata: /usr/share/zoneinfo, the zones the first-boot seed's `timezone` names (PAS reads
# HL7 times, the WAN rate and prefetch windows and the worklist's day in local time).
packages=(
  systemd systemd-sysv systemd-timesyncd systemd-resolved udev dbus
  linux-image-amd64 initramfs-tools
  python3 python3-venv python3-systemd
  nftables unattended-upgrades apt-listchanges
  iproute2 netbase ca-certificates openssh-server less
  tzdata
)
# The Debian base is the slow part (minutes) and depends only on the suite and the package
# list: it is kept in a cache keyed by both and copied, so rebuilding PAS takes about a minute.
base_key="$(printf '%s\n' "$suite" "$mirror" "${packages[@]}" | sha256sum | cut -c1-16)"
base_cache="${PAS_IMAGE_BASE_CACHE:-/var/cache/pas-image/base}/$base_key"
if [ ! -f "$base_cache/.complete" ]; then
  echo "== debootstrap $suite ($mirror) into $base_cache"
  rm -rf "$base_cache" && mkdir -p "$base_cache"
  debootstrap --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" \
    "$suite" "$base_cache/rootfs" "$mirror"
  rm -rf "$base_cache/rootfs/var/cache/apt/archives/"*.deb
  touch "$base_cache/.complete"
else
  echo "== Debian base from $base_cache"
fi
cp -a "$base_cache/rootfs" "$rootfs"

echo "== PAS $version ($commit) into /opt/pas/$version"
wheels="$work/wheels"
rm -rf "$wheels" && mkdir -p "$wheels"
python3 -m pip wheel --quiet --wheel-dir "$wheels" "$repo"
dest="/opt/pas/$version"
mkdir -p "$rootfs$dest" "$rootfs/opt/pas/wheels"
cp "$wheels"/*.whl "$rootfs/opt/pas/wheels/"
rm -f "$rootfs/etc/resolv.conf" && cp /etc/resolv.conf "$rootfs/etc/resolv.conf"  # for pip in the chroot
# --system-site-packages: Debian's python3-systemd (built against the image's libsystemd) is
# what gives the journal PAS's structured fields (journalctl -u pas CALLING_AE=...); the
# wheels below still come first, from the venv.
chroot "$rootfs" python3 -m venv --system-site-packages "$dest/venv"
chroot "$rootfs" "$dest/venv/bin/pip" install --quiet --no-index --find-links /opt/pas/wheels \
  pas-appliance
rm -rf "$rootfs/opt/pas/wheels"
ln -sfn "$version" "$rootfs/opt/pas/current"
ln -sfn /opt/pas/current/venv/bin/pas "$rootfs/usr/bin/pas"

echo "== system configuration"
cp -a "$here/rootfs/." "$rootfs/"
install -m 0644 "$here/systemd/pas.service" "$here/systemd/pas-hub.service" \
  "$here/systemd/pas-backup.service" "$here/systemd/pas-backup.timer" \
  "$here/systemd/pas-hub-backup.service" "$here/systemd/pas-hub-backup.timer" \
  "$here/systemd/pas-hub-addresses.service" "$here/systemd/pas-hub-addresses.timer" \
  "$here/systemd/pas-ssh-hostkeys.service" "$rootfs/etc/systemd/system/"
install -d "$rootfs/etc/systemd/system/pas.service.d.available"
cp "$here/systemd/pas.service.d/"*.conf "$rootfs/etc/systemd/system/pas.service.d.available/"
install -m 0644 "$here/systemd/pas.sysusers.conf" "$rootfs/usr/lib/sysusers.d/pas.conf"
# The backup timers' default folders (/var/backups/pas, /var/backups/pas-hub), made at boot.
install -m 0644 "$here/systemd/pas.tmpfiles.conf" "$rootfs/usr/lib/tmpfiles.d/pas.conf"
install -d -m 0755 "$rootfs/etc/pas" "$rootfs/usr/share/doc/pas"
install -m 0640 "$repo/config/appliance.toml" "$rootfs/etc/pas/appliance.toml"
install -m 0644 "$repo/config/appliance.example.toml" "$rootfs/usr/share/doc/pas/"
cp "$repo"/docs/*.md "$rootfs/usr/share/doc/pas/" 2>/dev/null || true
install -d "$rootfs/etc/pas/monitoring"
cp "$here"/monitoring/* "$rootfs/etc/pas/monitoring/"
cat > "$rootfs/etc/pas-release" <<EOF
PAS_VERSION=$version
PAS_COMMIT=$commit
DEBIAN_SUITE=$suite
BUILT_FROM_EPOCH=$SOURCE_DATE_EPOCH
EOF
echo "pas" > "$rootfs/etc/hostname"
echo "127.0.1.1 pas" >> "$rootfs/etc/hosts"
: > "$rootfs/etc/machine-id"          # made anew on first boot: each appliance its own
# Nor the base's SSH host keys, nor its random seed: every appliance of the region boots this
# one image (pas-ssh-hostkeys.service makes each its own keys at first boot).
rm -f "$rootfs"/etc/ssh/ssh_host_* "$rootfs/var/lib/systemd/random-seed"
ln -sfn /run/systemd/resolve/stub-resolv.conf "$rootfs/etc/resolv.conf"

chroot "$rootfs" systemd-sysusers
# pas-backup.timer: the appliance's daily backup. pas-hub.service and pas-hub-backup.timer are
# shipped but enabled only on a hub host (docs/operations.md).
chroot "$rootfs" systemctl enable \
  pas.service pas-backup.timer pas-hub-addresses.timer pas-firstboot.service \
  pas-ssh-hostkeys.service \
  systemd-networkd.service \
  systemd-resolved.service systemd-timesyncd.service nftables.service ssh.service >/dev/null 2>&1
chroot "$rootfs" passwd -l root >/dev/null   # no password logins; SSH keys come with the seed

echo "== kernel, initrd and root file system"
cp "$rootfs"/boot/vmlinuz-* "$out/vmlinuz"
cp "$rootfs"/boot/initrd.img-* "$out/initrd.img"
rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
find "$rootfs" -newermt "@$SOURCE_DATE_EPOCH" -print0 2>/dev/null \
  | xargs -0r touch --no-dereference --date="@$SOURCE_DATE_EPOCH"
image="$out/pas-appliance-$version.raw"
rm -f "$image"
mkfs.ext4 -q -L pas-root -E root_owner=0:0 -U clear -d "$rootfs" "$image" "$size"
cp "$rootfs/etc/pas-release" "$out/pas-appliance-$version.release"
echo "== done: $image ($(du -h "$image" | cut -f1) used), $out/vmlinuz, $out/initrd.img"
