#!/bin/sh
# A stand-in for `pip install -r`: pip-install.sh REQUIREMENTS VENV
# For every NAME==VERSION line it "installs" the package by creating
# VENV/lib/site-packages/NAME-VERSION.dist-info/METADATA.
set -eu
req=$1
site=$2/lib/site-packages
mkdir -p "$site"
grep -v '^[[:space:]]*#' "$req" | grep '==' | while IFS='=' read -r name _ version; do
    mkdir -p "$site/$name-$version.dist-info"
    printf 'Name: %s\nVersion: %s\n' "$name" "$version" > "$site/$name-$version.dist-info/METADATA"
    echo "Installed $name-$version"
done
