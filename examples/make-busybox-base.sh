#!/usr/bin/env bash
# Import a busybox base image (busybox:latest) into the pybuild store, made from
# Debian's busybox-static: no registry needed. Idempotent.
set -euo pipefail
if pybuild inspect busybox:latest >/dev/null 2>&1; then
  exit 0
fi
BUSYBOX=$(command -v busybox || echo /bin/busybox)
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs"/{bin,etc,tmp,root,home/app,usr/bin,var,proc,sys,dev}
chmod 1777 "$rootfs/tmp"
cp "$BUSYBOX" "$rootfs/bin/busybox"
for applet in $("$BUSYBOX" --list); do
  [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
done
cat > "$rootfs/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
app:x:1000:1000:app:/home/app:/bin/sh
PASSWD
cat > "$rootfs/etc/group" <<'GROUP'
root:x:0:
nogroup:x:65534:
app:x:1000:
staff:x:50:app
GROUP
chown 1000:1000 "$rootfs/home/app"
tar -C "$rootfs" --numeric-owner -cf - . | pybuild import - busybox:latest >/dev/null
echo "imported busybox:latest"
