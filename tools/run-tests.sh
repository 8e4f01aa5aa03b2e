#!/bin/sh
# Runs every Criterion test binary in BUILD_DIR/tests (default build), the
# MPI transport's tests (tests/mpi/run.sh, which skips the mpirun jobs in a
# build with MPI=0) and the walkthrough check (tests/walkthrough.sh). Each
# script prints its own "N passed, N failed" last. Then this prints the
# totals in the same form and fails if any test failed.
# Each multi-process test sets its own timeout; the whole binary also runs
# under `timeout` so that a hang can never stall CI.
set -u
build=${1:-build}
status=0
passed=0
failed=0
log=$(mktemp)
before=$(ls /dev/shm | grep '^moe-ep-' || true)
for t in "$build"/tests/test_*; do
    [ -x "$t" ] || continue
    echo "== $t"
    if ! timeout --kill-after=10 600 "$t" --jobs 2 >"$log" 2>&1; then
        status=1
        echo "FAILED: $t"
    fi
    cat "$log"
    # Criterion's closing line: "Synthesis: Tested: N | Passing: P | Failing: F | Crashing: C"
    line=$(grep 'Synthesis:' "$log" | tail -n 1)
    p=$(echo "$line" | sed -n 's/.*Passing: \([0-9]*\).*/\1/p')
    f=$(echo "$line" | sed -n 's/.*Failing: \([0-9]*\).*Crashing: \([0-9]*\).*/\1 \2/p')
    if [ -z "$p" ]; then
        echo "FAILED: $t printed no Criterion summary"
        status=1
        failed=$((failed + 1))
        continue
    fi
    passed=$((passed + p))
    for n in $f; do failed=$((failed + n)); done
done

for script in tests/mpi/run.sh tests/walkthrough.sh; do
    echo "== $script"
    if ! timeout --kill-after=10 600 sh "$(dirname "$0")/../$script" "$build" \
            >"$log" 2>&1; then
        status=1
        echo "FAILED: $script"
    fi
    cat "$log"
    line=$(tail -n 1 "$log")
    p=$(echo "$line" | sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\1/p')
    f=$(echo "$line" | sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed$/\2/p')
    if [ -z "$p" ]; then
        echo "FAILED: $script printed no summary"
        status=1
        failed=$((failed + 1))
    else
        passed=$((passed + p))
        failed=$((failed + f))
    fi
done
rm -f "$log"
after=$(ls /dev/shm | grep '^moe-ep-' || true)
if [ "$before" != "$after" ]; then
    echo "FAILED: the tests left shared-memory segments in /dev/shm:"
    echo "$after"
    status=1
fi
[ "$failed" -eq 0 ] || status=1
echo "$passed passed, $failed failed"
exit $status
