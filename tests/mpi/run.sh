#!/bin/sh
# Tests the MPI transport against the shm transport with
# BUILD/tests/mpi/transport_check (see its header for the cases):
#   - R = 1 to 4: the mpi output, through MPI_Alltoallv and friends and
#     through the large-message path (forced with --large-path), must be
#     byte-identical to the shm output;
#   - R = 3 over Open MPI's TCP transport on loopback (--mca btl tcp,self),
#     as a stand-in for a second machine;
#   - R = 3 with a rank that fails, is killed, stalls or sends more than it
#     announced: mpirun must exit non-zero within FAULT_LIMIT_S seconds;
#   - invalid usage of transport_check and of `moe-ep bench --transport mpi`;
#   - `moe-ep bench --transport mpi --quick` under mpirun -np 2.
# In a build with MPI=0 it only checks that --transport mpi is rejected.
# Every command runs under `timeout`. The last line is "N passed, N failed",
# which tools/run-tests.sh adds to its totals; the exit status is 1 if any
# check failed.
set -u
build=${1:-build}
check=$build/tests/mpi/transport_check
moe_ep=$build/moe-ep
FAULT_LIMIT_S=10
passed=0
failed=0

pass() {
    passed=$((passed + 1))
    echo "PASS: $1"
}

fail() {
    failed=$((failed + 1))
    echo "FAIL: $1"
}

finish() {
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Runs "$@" and passes when it exits with status 2 and its stderr contains
# $expected.
expect_usage_error() {
    name=$1
    expected=$2
    shift 2
    timeout -k 5 60 "$@" >"$tmp/out" 2>"$tmp/err"
    rc=$?
    if [ "$rc" -eq 2 ] && grep -q -- "$expected" "$tmp/err"; then
        pass "$name"
    else
        fail "$name: exit status $rc, expected 2 with '$expected'; stderr:"
        cat "$tmp/err"
    fi
}

if [ "$($check --build-info)" = "mpi=0" ]; then
    echo "MPI tests skipped: built with MPI=0"
    expect_usage_error "--transport mpi rejected without MPI" \
        "built without MPI" "$check" --transport mpi
    expect_usage_error "bench --transport mpi rejected without MPI" \
        "built without MPI" "$moe_ep" bench --transport mpi --quick
    finish
fi

if ! command -v mpirun >/dev/null 2>&1; then
    fail "mpirun not found, but this build has the MPI transport"
    finish
fi
# mpirun rejects running as root unless two variables confirm it.
if [ "$(id -u)" -eq 0 ]; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# In a sanitizer build, LeakSanitizer matches Open MPI's own allocations
# to tools/lsan.supp by the libraries on their stacks. The default fast
# unwinder stops at Open MPI's code, which has no frame pointers, so the
# slow one is needed. Other builds ignore the variable.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}fast_unwind_on_malloc=0"
# Keeps mpirun's own connections on loopback, since every rank is local.
mpirun="mpirun --oversubscribe --mca oob_tcp_if_include lo"

# Runs one transport_check job; its output goes to $tmp/$1.
run_check() {
    out=$1
    shift
    timeout -k 5 120 "$@" --out "$tmp/$out" >"$tmp/log" 2>&1
}

for R in 1 2 3 4; do
    if ! run_check "shm-$R" "$check" --transport shm --ranks "$R"; then
        fail "shm transport, R = $R:"
        cat "$tmp/log"
        continue
    fi
    pass "shm transport, R = $R"

    for variant in plain large; do
        args=""
        [ "$variant" = large ] && args="--large-path 1000:256"
        name="mpi transport ($variant path), R = $R, equal to shm"
        # shellcheck disable=SC2086
        if ! run_check "mpi-$variant-$R" $mpirun -np "$R" "$check" --transport mpi $args; then
            fail "$name: the job failed:"
            cat "$tmp/log"
        elif ! cmp "$tmp/shm-$R" "$tmp/mpi-$variant-$R"; then
            fail "$name: the outputs differ"
        else
            pass "$name"
        fi
    done
done

name="mpi transport over TCP on loopback, R = 3, equal to shm"
# shellcheck disable=SC2086
if ! run_check tcp-3 $mpirun -np 3 --mca btl tcp,self --mca btl_tcp_if_include lo \
        "$check" --transport mpi; then
    fail "$name: the job failed:"
    cat "$tmp/log"
elif ! cmp "$tmp/shm-3" "$tmp/tcp-3"; then
    fail "$name: the outputs differ"
else
    pass "$name"
fi

# A failing rank: the job must end non-zero within FAULT_LIMIT_S seconds,
# and stderr must contain the expected text (empty for a killed rank,
# which only mpirun reports).
for fault in "exit:failing on purpose" "kill:" \
             "stall:did not complete within 1 s" "mismatch:disagree on the layout"; do
    action=${fault%%:*}
    expected=${fault#*:}
    name="rank 1 of 3 fails ($action), the job ends"
    start=$(date +%s%N)
    # A job that ends this way leaves MPI's memory unfreed by design, so a
    # sanitizer build checks no leaks here.
    # shellcheck disable=SC2086
    ASAN_OPTIONS="$ASAN_OPTIONS:detect_leaks=0" \
        timeout -k 5 60 $mpirun -np 3 "$check" --transport mpi --timeout 1 \
        --fault "1:$action" >"$tmp/log" 2>&1
    rc=$?
    elapsed_ms=$((($(date +%s%N) - start) / 1000000))
    if [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ]; then
        fail "$name: exit status $rc after $elapsed_ms ms:"
        cat "$tmp/log"
    elif [ "$elapsed_ms" -gt $((FAULT_LIMIT_S * 1000)) ]; then
        fail "$name: it took $elapsed_ms ms, more than $FAULT_LIMIT_S s"
    elif [ -n "$expected" ] && ! grep -q -- "$expected" "$tmp/log"; then
        fail "$name: no '$expected' in the output:"
        cat "$tmp/log"
    else
        pass "$name (exit status $rc after $elapsed_ms ms)"
    fi
done

expect_usage_error "transport_check rejects --ranks with mpi" \
    "mpirun -np sets the rank count" "$check" --transport mpi --ranks 2
expect_usage_error "bench rejects --ranks with --transport mpi" \
    "mpirun -np sets the rank count" "$moe_ep" bench --transport mpi --ranks 2
expect_usage_error "bench --transport mpi rejects 1 rank" \
    "needs at least 2 ranks" $mpirun -np 1 "$moe_ep" bench --transport mpi --quick
expect_usage_error "bench rejects an unknown transport" \
    "expected shm or mpi" "$moe_ep" bench --transport tcp

name="bench --transport mpi --quick, R = 2"
# shellcheck disable=SC2086
if ! timeout -k 5 120 $mpirun -np 2 "$moe_ep" bench --transport mpi --quick \
        >"$tmp/log" 2>&1; then
    fail "$name: the job failed:"
    cat "$tmp/log"
elif [ "$(grep -c '^| 2 | `MPI_Alltoallv` alone |' "$tmp/log")" -ne 5 ] ||
     [ "$(grep -c '^| 2 | `moe_transport_alltoallv` |' "$tmp/log")" -ne 5 ]; then
    fail "$name: the report lacks the 10 rows of 2 ranks:"
    cat "$tmp/log"
else
    pass "$name"
fi

finish
