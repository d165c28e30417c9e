#!/bin/sh
# calc A OP B: integer arithmetic, e.g. `calc 6 '*' 7` prints "6 * 7 = 42".
if [ $# -ne 3 ]; then
    echo "usage: calc A OP B" >&2
    exit 2
fi
case $2 in
    +|-|'*'|/|%) ;;
    *) echo "calc: unknown operator: $2" >&2; exit 2 ;;
esac
echo "$1 $2 $3 = $(($1 $2 $3))"
