#!/bin/busybox sh
# Runs in a FROM scratch image: only shell builtins (echo, test, ...) and
# explicit `/bin/busybox APPLET` calls work, as there are no applet symlinks.
echo "hello from a FROM scratch image"
echo "/bin holds: $(/bin/busybox ls /bin)"
if [ -e /bin/sh ]; then
    echo "/bin/sh: present"
else
    echo "/bin/sh: absent (only the busybox binary was copied)"
fi
echo "sha256 of 'scratch': $(echo scratch | /bin/busybox sha256sum | /bin/busybox cut -c1-16)"
