#!/usr/bin/env bash
# A measured-boot guest in which the launch measurement covers every byte that runs:
# the server, Python, its dependencies, the config and the token keys live in an
# initramfs. SEV-SNP (default): its hash, with the kernel's and the command line's, is
# in the measured OVMF page (QEMU kernel-hashes=on). TDX (--platform tdx): the kernel
# goes into RTMR1 and the command line and initramfs into RTMR2 as OVMF and the kernel's
# EFI stub measure them. See docs/deploy.md.
#
#   deploy/measured-image/build.sh --rootfs DIR --kernel VMLINUZ --ovmf OVMF.fd \
#       --config sealserve.toml --jwks jwks.json --out DIR [--vcpus N] [--vcpu-type T]
#       [--guest-features 0x1] [--min-tcb bl=..,snp=..] [--append "extra cmdline"]
#       [--platform sev-snp|tdx] [--memory MIB] [--acpi-tables FILE]
#
# tdx: --ovmf is the TDVF/OVMF build, --memory the TD's memory in MiB (default 4096) and
#      --acpi-tables QEMU's etc/acpi/tables blob for this machine shape (dumped once from
#      a reference guest, docs/tdx.md); they give MRTD and RTMR0..RTMR2.
#
# --rootfs  an unpacked root filesystem that already holds Python and /opt/sealserve
#           (the container image of this repository: `docker create IMAGE` then
#           `docker export` and untar; or deploy/build.sh --prefix ROOT/opt/sealserve
#           on a root of the same distribution). It is copied, never modified.
# --kernel  the guest kernel (with the drivers of your VM: virtio, the SEV guest and
#           configfs-tsm support); --ovmf the AmdSev OVMF build (kernel hashes).
#
# Writes to --out: initrd.img, vmlinuz, cmdline.txt, launch.json (the parts and the
# expected MEASUREMENT), policy.toml (platform, launch measurement, manifest digest,
# minimum TCB: the form `sealserve broker set-policy` accepts) and qemu.sh (the launch
# command line, which this script does not run). Needs: bash, cpio, gzip, and
# `sealserve` (for `measure`) on PATH or in --rootfs.
set -euo pipefail

die() { echo "measured-image: $*" >&2; exit 2; }

ROOTFS="" KERNEL="" OVMF="" CONFIG="" JWKS="" OUT=""
VCPUS=1 VCPU_TYPE="EPYC-v4" FEATURES="0x1" MIN_TCB="bl=3,snp=8" APPEND_EXTRA=""
PLATFORM="sev-snp" MEMORY=4096 ACPI=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rootfs) ROOTFS="$2"; shift 2 ;;
    --kernel) KERNEL="$2"; shift 2 ;;
    --ovmf) OVMF="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --jwks) JWKS="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --vcpus) VCPUS="$2"; shift 2 ;;
    --vcpu-type) VCPU_TYPE="$2"; shift 2 ;;
    --guest-features) FEATURES="$2"; shift 2 ;;
    --min-tcb) MIN_TCB="$2"; shift 2 ;;
    --append) APPEND_EXTRA="$2"; shift 2 ;;
    --platform) PLATFORM="$2"; shift 2 ;;
    --memory) MEMORY="$2"; shift 2 ;;
    --acpi-tables) ACPI="$2"; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) die "unknown argument ${1:0:40}" ;;
  esac
done
for pair in "rootfs:$ROOTFS" "kernel:$KERNEL" "ovmf:$OVMF" "config:$CONFIG" "jwks:$JWKS" "out:$OUT"; do
  [ -n "${pair#*:}" ] || die "--${pair%%:*} is required"
done
[ -d "$ROOTFS" ] || die "--rootfs $ROOTFS is not a directory"
[ -x "$ROOTFS/opt/sealserve/bin/sealserve" ] || die "--rootfs has no /opt/sealserve/bin/sealserve"
for f in "$KERNEL" "$OVMF" "$CONFIG" "$JWKS"; do [ -f "$f" ] || die "$f does not exist"; done
command -v cpio >/dev/null || die "cpio is required (apt-get install cpio)"
[[ "$VCPUS" =~ ^[0-9]+$ ]] || die "--vcpus must be a number"
case "$PLATFORM" in
  sev-snp) ;;
  tdx)
    [[ "$MEMORY" =~ ^[0-9]+$ ]] || die "--memory must be a number of MiB"
    [ -n "$ACPI" ] || die "--platform tdx needs --acpi-tables (QEMU's etc/acpi/tables, docs/tdx.md)"
    [ -f "$ACPI" ] || die "$ACPI does not exist" ;;
  *) die "--platform must be sev-snp or tdx" ;;
esac
SEALSERVE="$(command -v sealserve || true)"
[ -n "$SEALSERVE" ] || SEALSERVE="$ROOTFS/opt/sealserve/bin/sealserve"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT

echo "==> staging the root (copy of $ROOTFS)"
cp -a "$ROOTFS/." "$STAGE/"
mkdir -p "$STAGE/etc/sealserve" "$STAGE/proc" "$STAGE/sys" "$STAGE/dev" "$STAGE/tmp" \
  "$STAGE/var/lib/sealserve" "$STAGE/models"
# The config and the token keys are part of the measured root: the config digest and the
# token-key thumbprints in the manifest then follow from the launch measurement.
install -m 0444 "$CONFIG" "$STAGE/etc/sealserve/sealserve.toml"
install -m 0444 "$JWKS" "$STAGE/etc/sealserve/jwks.json"
# Nothing may run Python code the image did not name: no .pth hooks, no customize
# modules (the server refuses to start on a real platform when it finds one).
find "$STAGE" -name '*.pth' -path '*site-packages*' -print -delete
find "$STAGE" \( -name sitecustomize.py -o -name usercustomize.py \) -path '*python3*' -print -delete

# /init: mount what the server needs and exec it with an empty environment (no
# PYTHONPATH, LD_PRELOAD, ...); models come encrypted from the virtio disk "models".
cat > "$STAGE/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t configfs configfs /sys/kernel/config
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -o ro /dev/vdb /models 2>/dev/null || echo "init: no models disk"
exec env -i PATH=/opt/sealserve/bin:/usr/bin:/bin HOME=/nonexistent \
  /opt/sealserve/bin/sealserve serve --config /etc/sealserve/sealserve.toml
INIT
chmod 0755 "$STAGE/init"

echo "==> initrd.img (newc cpio, gzip; fixed times and owners: two builds give one file)"
find "$STAGE" -exec touch -h -d @315532800 {} +
(cd "$STAGE" && find . -print0 | LC_ALL=C sort -z \
  | cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) \
  | gzip -9 -n > "$OUT/initrd.img"
install -m 0444 "$KERNEL" "$OUT/vmlinuz"
CMDLINE="console=ttyS0 rdinit=/init ro panic=-1${APPEND_EXTRA:+ $APPEND_EXTRA}"
printf '%s' "$CMDLINE" > "$OUT/cmdline.txt"

echo "==> expected launch measurement and policy"
PARTS=(--ovmf "$OVMF" --kernel "$OUT/vmlinuz" --initrd "$OUT/initrd.img" --append "$CMDLINE")
SUMS="\"initrd_sha256\": \"$(sha256sum "$OUT/initrd.img" | cut -d' ' -f1)\",
 \"kernel_sha256\": \"$(sha256sum "$OUT/vmlinuz" | cut -d' ' -f1)\",
 \"ovmf_sha256\": \"$(sha256sum "$OVMF" | cut -d' ' -f1)\""
if [ "$PLATFORM" = tdx ]; then
  "$SEALSERVE" measure --launch tdx "${PARTS[@]}" --memory "$MEMORY" --acpi-tables "$ACPI" \
    --policy-out "$OUT/policy.toml" | tee "$OUT/measure.txt"
  reg() { sed -n "s/^tdx $1 *computed *//p" "$OUT/measure.txt"; }
  for r in mrtd rtmr0 rtmr1 rtmr2; do
    [ "$(reg "$r" | wc -c)" -eq 97 ] || die "sealserve measure computed no $r"
  done
  cat > "$OUT/launch.json" <<JSON
{"platform": "tdx", "mrtd": "$(reg mrtd)", "rtmr0": "$(reg rtmr0)",
 "rtmr1": "$(reg rtmr1)", "rtmr2": "$(reg rtmr2)", "vcpus": $VCPUS, "memory_mib": $MEMORY,
 "cmdline": "$CMDLINE", "acpi_tables_sha256": "$(sha256sum "$ACPI" | cut -d' ' -f1)",
 $SUMS}
JSON
  cat > "$OUT/qemu.sh" <<QEMU
#!/bin/sh
# Launch on a TDX host (not run by build.sh). The measured parts must be these exact
# files, this memory size and the machine shape the ACPI tables came from; any change
# moves a register in launch.json and the broker refuses.
exec qemu-system-x86_64 -accel kvm -nographic -cpu host -smp $VCPUS -m ${MEMORY}M \\
  -object '{"qom-type":"tdx-guest","id":"tdx0"}' \\
  -machine q35,kernel-irqchip=split,confidential-guest-support=tdx0,hpet=off \\
  -bios "$OVMF" -kernel "$OUT/vmlinuz" -initrd "$OUT/initrd.img" \\
  -append "$CMDLINE" \\
  -drive if=virtio,format=raw,readonly=on,file=models.img
QEMU
  chmod 0755 "$OUT/qemu.sh"
  echo "==> done: $OUT (MRTD $(reg mrtd))"
  exit 0
fi
"$SEALSERVE" measure --launch sev-snp "${PARTS[@]}" --vcpus "$VCPUS" --vcpu-type "$VCPU_TYPE" \
  --guest-features "$FEATURES" --min-tcb "$MIN_TCB" --policy-out "$OUT/policy.toml" \
  | tee "$OUT/measure.txt"
MEASUREMENT="$(sed -n 's/^launch measurement (sev-snp) *//p' "$OUT/measure.txt")"
[ ${#MEASUREMENT} -eq 96 ] || die "sealserve measure printed no 48-byte measurement"
cat > "$OUT/launch.json" <<JSON
{"platform": "sev-snp", "measurement": "$MEASUREMENT", "vcpus": $VCPUS,
 "vcpu_type": "$VCPU_TYPE", "guest_features": "$FEATURES", "cmdline": "$CMDLINE",
 $SUMS}
JSON

cat > "$OUT/qemu.sh" <<QEMU
#!/bin/sh
# Launch on an SEV-SNP host (not run by build.sh). The measured parts must be these
# exact files; any change moves the MEASUREMENT in launch.json and the broker refuses.
exec qemu-system-x86_64 -enable-kvm -nographic -cpu $VCPU_TYPE -smp $VCPUS -m 4G \\
  -machine q35,confidential-guest-support=sev0,memory-backend=ram1 \\
  -object memory-backend-memfd,id=ram1,size=4G,share=true,prealloc=false \\
  -object sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on \\
  -bios "$OVMF" -kernel "$OUT/vmlinuz" -initrd "$OUT/initrd.img" \\
  -append "$CMDLINE" \\
  -drive if=virtio,format=raw,readonly=on,file=models.img
QEMU
chmod 0755 "$OUT/qemu.sh"
echo "==> done: $OUT (MEASUREMENT $MEASUREMENT)"
