#!/bin/sh
# Run by the ONBUILD RUN trigger; its output becomes /app/build-info.txt.
files=$(ls /app/src)
count=$(echo "$files" | wc -l)
# $files unquoted: word splitting turns the newline-separated list into words.
echo "built by an ONBUILD trigger from $count source file(s):" $files
