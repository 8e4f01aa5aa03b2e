#!/bin/sh
# Runs every Criterion test binary in BUILD_DIR/tests (default build) and
# fails if any fails. Each test sets its own timeout; the whole binary also
# runs under `timeout` so that a hang can never stall CI.
set -u
build=${1:-build}
status=0
before=$(ls /dev/shm | grep '^moe-ep-' || true)
for t in "$build"/tests/test_*; do
    [ -x "$t" ] || continue
    echo "== $t"
    if ! timeout --kill-after=10 600 "$t" --jobs 2; then
        echo "FAILED: $t"
        status=1
    fi
done
after=$(ls /dev/shm | grep '^moe-ep-' || true)
if [ "$before" != "$after" ]; then
    echo "FAILED: the tests left shared-memory segments in /dev/shm:"
    echo "$after"
    status=1
fi
exit $status
