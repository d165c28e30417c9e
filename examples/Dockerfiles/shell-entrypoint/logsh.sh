#!/bin/sh
# logsh -c COMMAND: print the command, then run it with /bin/sh. $0 inside the
# command is "logsh", so commands can tell which shell ran them.
if [ "$1" != "-c" ] || [ $# -lt 2 ]; then
    echo "usage: logsh -c COMMAND" >&2
    exit 2
fi
echo "logsh: $2"
exec /bin/sh -c "$2" logsh
