#!/bin/sh
# The app's entry point: main.sh [--greeting WORD]
set -eu
. /app/src/myapp/__init__.sh

greeting=hi
while [ $# -gt 0 ]; do
    case $1 in
        --greeting) greeting=$2; shift 2 ;;
        *) echo "usage: main.sh [--greeting WORD]" >&2; exit 2 ;;
    esac
done

echo "$APP_NAME $APP_VERSION (APP_ENV=$APP_ENV, PORT=$PORT)"
echo "running as $(id -un) in $(pwd)"
installed=$(ls "$VENV/lib/site-packages" | sed 's/\.dist-info$//' | tr '\n' ' ')
echo "installed: ${installed% }"
echo "greeting: $greeting"
