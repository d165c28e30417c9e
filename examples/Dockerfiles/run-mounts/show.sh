#!/bin/sh
# What the three mounted RUNs left in the image, and what they did not.
echo "/opt/pkg/VERSION: $(cat /opt/pkg/VERSION)"
echo "/etc/generated.conf:"
cat /etc/generated.conf
cat /etc/word-count
[ -e /var/cache/demo/runs ] && echo "cache mount content leaked into the image" \
    || echo "cache mount content: not in the image"
[ -e /mnt/tools/gen-config.sh ] && echo "tools stage leaked into the image" \
    || echo "tools stage files: not in the image"
# -s (exists and is not empty): a builder may leave an empty mount point.
[ -s /tmp/words.txt ] && echo "bind-mounted context file leaked into the image" \
    || echo "bind-mounted context file: not in the image"
