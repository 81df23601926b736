#!/usr/bin/env bash
# Package the built image as a Vagrant box for the libvirt provider (qcow2 + metadata).
set -euo pipefail
out="$(realpath "${1:-image/out}")"
raw="$(ls "$out"/pas-appliance-*.raw | head -1)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
qemu-img convert -O qcow2 "$raw" "$work/box.img"
size_gb=$(( ($(stat -c %s "$raw") + 1073741823) / 1073741824 ))
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$size_gb" > "$work/metadata.json"
cat > "$work/Vagrantfile" <<'VF'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.driver = "kvm"
  end
end
VF
tar -C "$work" -czf "$out/pas-appliance.box" metadata.json Vagrantfile box.img
echo "box: $out/pas-appliance.box"
