#!/bin/sh
# The image's ENTRYPOINT: reports its arguments, shows what the build wrote,
# then runs its arguments as a command (if any).
echo "entry.sh got $# arg(s):$(for a in "$@"; do printf ' [%s]' "$a"; done)"
cat /built.txt
if [ $# -gt 0 ]; then
    exec "$@"
fi
