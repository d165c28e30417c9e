#!/bin/sh
# Shows what the ADD instructions produced under /opt: every path (with the
# mode of files that came out of an archive), then the files' contents.
cd /opt
find . -mindepth 1 | sort | while read -r path; do
    if [ -L "$path" ]; then
        echo "$path -> $(readlink "$path")"
    elif [ -d "$path" ]; then
        echo "$path/"
    elif [ "${path#./notes/}" != "$path" ]; then
        echo "$path"    # from the context: its mode depends on the checkout's umask
    else
        echo "$path $(stat -c %a "$path")"    # from an archive: mode as stored
    fi
done
echo "---"
cat site/index.txt docs/latest data/numbers.txt notes/NOTES.txt
site/bin/run.sh
echo "notes.txt.gz unpacks to: $(zcat notes/notes.txt.gz)"
