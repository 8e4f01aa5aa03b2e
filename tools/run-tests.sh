#!/bin/sh
# Runs every Criterion test binary in BUILD_DIR/tests (default build), then
# prints the totals as "N passed, N failed" and fails if any test failed.
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
