#!/bin/sh
# Launcher shipped by onbuild-base. Reads what the ONBUILD triggers put in /app.
if [ ! -f /app/app.conf ]; then
    echo "onbuild-base: no app in this image; build one FROM onbuild-base:latest"
    exit 0
fi
. /app/app.conf
echo "$APP_NAME $APP_VERSION"
cat /app/build-info.txt
