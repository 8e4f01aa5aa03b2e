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
#   - `moe-ep bench --transport mpi --quick` under mpirun -np 2 must give
#     the all-to-all rows of both MPI calls and of the rings, and the
#     forward rows of both transports. `moe-ep bench --quick --markdown
#     FILE` must then keep that report's section at the end of FILE;
#   - `moe-ep run --transport mpi` on R = 1 to 4 for several shapes, equal
#     to the shm run and to the golden path, over TCP too, with failing
#     ranks and with --check off.
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

# ---- the whole layer: moe-ep run --transport mpi ------------------------
#
# For each shape and R = 1 to 4, the mpi run must pass its golden check
# (exit 0) and write the same output bytes as the shm run with --ranks R.
# The shapes cover drops under the probs policy, ranks with no token
# (T < R), experts that do not divide over the ranks, and checkpoint
# layers of two families.
shapes="random-drops:--tokens 100 --hidden 64 --ffn 96 --skew 1 --capacity-factor 0.8 --drop-policy probs
no-tokens:--tokens 2 --hidden 32 --ffn 48
uneven:--tokens 37 --hidden 32 --ffn 48 --experts 5 --top-k 2
qwen2_moe:--model data/layers/qwen2_moe --input data/layers/qwen2_moe/tokens.npy
switch:--model data/layers/switch_transformers --input data/layers/switch_transformers/tokens.npy"
old_ifs=$IFS
IFS='
'
for entry in $shapes; do
    IFS=$old_ifs
    label=${entry%%:*}
    args=${entry#*:}
    for R in 1 2 3 4; do
        name="run --transport mpi ($label), R = $R, equal to shm and golden"
        # shellcheck disable=SC2086
        if ! timeout -k 5 120 "$moe_ep" run --ranks "$R" $args \
                --output "$tmp/run-shm.npy" >"$tmp/log" 2>&1; then
            fail "$name: the shm run failed:"
            cat "$tmp/log"
            continue
        fi
        # shellcheck disable=SC2086
        if ! timeout -k 5 120 $mpirun -np "$R" "$moe_ep" run --transport mpi $args \
                --output "$tmp/run-mpi.npy" >"$tmp/log" 2>&1; then
            fail "$name: the job failed:"
            cat "$tmp/log"
        elif ! grep -q "golden check: bitwise equal" "$tmp/log"; then
            fail "$name: no bitwise golden check in the report:"
            cat "$tmp/log"
        elif ! cmp "$tmp/run-shm.npy" "$tmp/run-mpi.npy"; then
            fail "$name: the outputs differ"
        else
            pass "$name"
        fi
    done
    IFS='
'
done
IFS=$old_ifs

name="run --transport mpi over TCP on loopback, R = 3, equal to shm"
# shellcheck disable=SC2086
if ! timeout -k 5 120 "$moe_ep" run --ranks 3 --tokens 100 --hidden 64 --ffn 96 \
        --output "$tmp/run-shm.npy" >"$tmp/log" 2>&1 ||
   ! timeout -k 5 120 $mpirun -np 3 --mca btl tcp,self --mca btl_tcp_if_include lo \
        "$moe_ep" run --transport mpi --tokens 100 --hidden 64 --ffn 96 \
        --output "$tmp/run-mpi.npy" >"$tmp/log" 2>&1; then
    fail "$name: a run failed:"
    cat "$tmp/log"
elif ! cmp "$tmp/run-shm.npy" "$tmp/run-mpi.npy"; then
    fail "$name: the outputs differ"
else
    pass "$name"
fi

name="run --transport mpi writes the transport into the report and stats"
# shellcheck disable=SC2086
if ! timeout -k 5 120 $mpirun -np 2 "$moe_ep" run --transport mpi --tokens 64 \
        --stats "$tmp/stats.json" >"$tmp/log" 2>&1; then
    fail "$name: the job failed:"
    cat "$tmp/log"
elif ! grep -q "transport mpi" "$tmp/log" ||
     ! grep -q '"transport":[[:space:]]*"mpi"' "$tmp/stats.json"; then
    fail "$name: the transport is missing"
else
    pass "$name"
fi

name="run --transport mpi --check off skips the check and says so"
# shellcheck disable=SC2086
if ! timeout -k 5 120 $mpirun -np 2 "$moe_ep" run --transport mpi --tokens 64 \
        --check off >"$tmp/log" 2>&1; then
    fail "$name: the job failed:"
    cat "$tmp/log"
elif ! grep -q "golden check: skipped (--check off)" "$tmp/log"; then
    fail "$name: no 'skipped' line:"
    cat "$tmp/log"
else
    pass "$name"
fi

# A rank of the layer that dies or fails: the job must end non-zero within
# FAULT_LIMIT_S seconds.
for fault in "1:dispatch:kill" "2:combine:exit" "0:layout:segv"; do
    name="run --transport mpi, rank fault $fault, the job ends"
    start=$(date +%s%N)
    # shellcheck disable=SC2086
    ASAN_OPTIONS="$ASAN_OPTIONS:detect_leaks=0:handle_segv=0" MOE_EP_FAULT=$fault \
        timeout -k 5 60 $mpirun -np 3 -x MOE_EP_FAULT "$moe_ep" run --transport mpi \
        --tokens 64 --timeout 2 >"$tmp/log" 2>&1
    rc=$?
    elapsed_ms=$((($(date +%s%N) - start) / 1000000))
    if [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ]; then
        fail "$name: exit status $rc after $elapsed_ms ms:"
        cat "$tmp/log"
    elif [ "$elapsed_ms" -gt $((FAULT_LIMIT_S * 1000)) ]; then
        fail "$name: it took $elapsed_ms ms, more than $FAULT_LIMIT_S s"
    else
        pass "$name (exit status $rc after $elapsed_ms ms)"
    fi
done

expect_usage_error "run rejects --ranks with --transport mpi" \
    "mpirun -np sets the rank count" "$moe_ep" run --transport mpi --ranks 2
expect_usage_error "run rejects --ring-size with --transport mpi" \
    "MPI has no rings" "$moe_ep" run --transport mpi --ring-size 1M
expect_usage_error "run rejects --dump with --check off" \
    "--dump cannot be used with --check off" "$moe_ep" run --dump "$tmp/d" --check off
expect_usage_error "run under mpirun reports a bad flag once" \
    "invalid --tokens value 'abc'" $mpirun -np 2 "$moe_ep" run --transport mpi --tokens abc
if [ "$(grep -c "invalid --tokens value" "$tmp/err")" -ne 1 ]; then
    fail "run under mpirun printed the bad flag $(grep -c "invalid --tokens value" "$tmp/err") times"
else
    pass "run under mpirun printed the bad flag once"
fi

expect_usage_error "transport_check rejects --ranks with mpi" \
    "mpirun -np sets the rank count" "$check" --transport mpi --ranks 2
expect_usage_error "bench rejects --ranks with --transport mpi" \
    "mpirun -np sets the rank count" "$moe_ep" bench --transport mpi --ranks 2
expect_usage_error "bench --transport mpi rejects 1 rank" \
    "needs at least 2 ranks" $mpirun -np 1 "$moe_ep" bench --transport mpi --quick
expect_usage_error "bench rejects an unknown transport" \
    "expected shm or mpi" "$moe_ep" bench --transport tcp

# mpirun -np 2 binds each rank to a core. Rank 0 must undo that before it
# measures the rings and the floor, because it skips them otherwise.
name="bench --transport mpi --quick, R = 2"
number='[0-9][0-9.]*'
# shellcheck disable=SC2086
if ! timeout -k 5 120 $mpirun -np 2 "$moe_ep" bench --transport mpi --quick \
        --markdown "$tmp/bench-mpi.md" >"$tmp/log" 2>&1; then
    fail "$name: the job failed:"
    cat "$tmp/log"
elif [ "$(grep -c '^| 2 | `MPI_Alltoallv` alone |' "$tmp/log")" -ne 5 ] ||
     [ "$(grep -c '^| 2 | `moe_transport_alltoallv` |' "$tmp/log")" -ne 5 ] ||
     [ "$(grep -c '^| 2 | `moe_alltoallv`, shared memory |' "$tmp/log")" -ne 5 ]; then
    fail "$name: the report lacks the 15 all-to-all rows of 2 ranks:"
    cat "$tmp/log"
elif [ "$(grep -c "^| 2 | mpi | $number | $number | $number | $number |\$" "$tmp/log")" -ne 1 ] ||
     [ "$(grep -c "^| 2 | shm | $number | $number | $number | $number |\$" "$tmp/log")" -ne 1 ]; then
    fail "$name: the report lacks a forward row with its floor ratios for each transport:"
    cat "$tmp/log"
else
    pass "$name"
fi

# The report as `make bench-mpi` appends it to docs/BENCHMARKS.md, after a
# stale shm report that the bench must replace.
name="bench --markdown keeps the side-by-side section"
sed 's/^#/##/' "$tmp/bench-mpi.md" >"$tmp/section.md"
{ echo "# stale report"; echo; cat "$tmp/section.md"; } >"$tmp/benchmarks.md"
section_lines=$(wc -l <"$tmp/section.md")
if ! timeout -k 5 120 "$moe_ep" bench --quick --markdown "$tmp/benchmarks.md" \
        >"$tmp/log" 2>&1; then
    fail "$name: the bench failed:"
    cat "$tmp/log"
elif grep -q "stale report" "$tmp/benchmarks.md" ||
     [ "$(head -n 1 "$tmp/benchmarks.md")" != "# moe-ep benchmarks" ]; then
    fail "$name: the shm report was not rewritten"
elif ! tail -n "$section_lines" "$tmp/benchmarks.md" | cmp -s - "$tmp/section.md"; then
    fail "$name: the file does not end with the section, unchanged"
elif [ "$(grep -c '^## Shared memory and MPI side by side' "$tmp/benchmarks.md")" -ne 1 ]; then
    fail "$name: the section heading is not there exactly once"
else
    pass "$name"
fi

finish
