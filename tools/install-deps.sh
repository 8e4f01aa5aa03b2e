#!/bin/sh
# Installs the Debian packages moe-ep needs to build and test, if missing,
# plus any packages named as arguments (make golden adds python3-torch,
# make fuzz and make fuzz-ci add clang and libclang-rt-dev for libFuzzer).
# The default list includes Open MPI (openmpi-bin, libopenmpi-dev), so that
# the MPI transport is built and tested. `make MPI=0` builds without it.
# Uses sudo when not run as root. On a system without apt-get it names the
# packages and stops with status 1.
set -eu

packages="build-essential pkg-config libopenblas-dev libcriterion-dev libcjson-dev openmpi-bin libopenmpi-dev $*"

missing=""
for p in $packages; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
[ -z "$missing" ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "moe-ep needs these Debian packages, and apt-get was not found:$missing" >&2
    echo "Install them (or your system's equivalents) and run make again." >&2
    exit 1
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
echo "installing missing packages:$missing"
$sudo apt-get update -qq
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing
