# A second source file, so the build has something to count.
handle() { echo "handled $1"; }
