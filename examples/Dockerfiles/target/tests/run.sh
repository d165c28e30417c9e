#!/bin/sh
# run.sh CALC: runs the test cases against CALC, prints a report, exits 1 on
# any failure.
calc=$1
passed=0
failed=0
check() {
    expected=$1
    shift
    actual=$("$calc" "$@" 2>&1)
    if [ "$actual" = "$expected" ]; then
        passed=$((passed + 1))
        echo "ok   calc $*"
    else
        failed=$((failed + 1))
        echo "FAIL calc $*: expected '$expected', got '$actual'"
    fi
}
check "1 + 2 = 3" 1 + 2
check "6 * 7 = 42" 6 '*' 7
check "7 / 2 = 3" 7 / 2
check "calc: unknown operator: ^" 2 ^ 3
echo "$passed of $((passed + failed)) tests passed"
[ "$failed" -eq 0 ]
