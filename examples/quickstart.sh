#!/usr/bin/env bash
# From a fresh Debian machine (as root): install pybuild and what it needs, make a
# busybox base image locally (no Docker Hub), build an example and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
bash examples/make-busybox-base.sh
pybuild build -t hello:1.0 examples/Dockerfiles/multistage
pybuild run --rm hello:1.0
