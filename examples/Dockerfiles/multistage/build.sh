#!/bin/sh
# A tiny "compiler": build.sh SRC_DIR OUT_DIR
# Joins SRC_DIR/main.sh and SRC_DIR/modules/*.sh (in name order), replaces
# @VERSION@ with the content of SRC_DIR/VERSION and @MODULES@ with the module
# names, drops comment-only and blank lines, puts a #! line on top, then
# writes OUT_DIR/hello (mode 0755) and OUT_DIR/hello.sha256.
set -eu
src=$1
out=$2
version=$(cat "$src/VERSION")
modules=$(cd "$src/modules" && ls *.sh | sed 's/\.sh$//' | tr '\n' ' ' | sed 's/ $//')
mkdir -p "$out"
{
    echo '#!/bin/sh'
    for module in "$src"/main.sh "$src"/modules/*.sh; do
        sed -e '/^[[:space:]]*#/d' -e '/^[[:space:]]*$/d' "$module"
    done
} | sed -e "s/@VERSION@/$version/g" -e "s/@MODULES@/$modules/g" > "$out/hello"
chmod 0755 "$out/hello"
cd "$out" && sha256sum hello > hello.sha256
echo "build.sh: built $out/hello (version $version, $(wc -l < "$out/hello") lines)"
