#!/bin/sh
# Checks that docs/walkthrough.md is what `make walkthrough` generates from
# docs/walkthrough.md.in with the moe-ep of BUILD (default build), so that
# the outputs pasted in the walkthrough cannot drift from the program.
#
#   sh tests/walkthrough.sh [BUILD]
#
# Both files are normalised by `tools/walkthrough.sh normalise` first, which
# masks the measured times and waits and leaves out the lines that depend
# on the number of cores. Three more checks show that the comparison can
# fail and masks only what it should: one edited output number must make
# it fail, and one edited measured time or core count must not.
#
# Prints one line per check, then "N passed, N failed" last, which
# tools/run-tests.sh reads. Exits with 1 when a check failed.
#
# The expert outputs in the walkthrough come from GEMM kernels that are
# chosen by the CPU, so their last bits can depend on it. The template
# masks the lines that show them (kernel: rules), which was checked by
# building with sgemm in place of the row kernel for a few rows.
# NOTE: a new line of expert values in the template needs such a rule, or
# the check fails on a CPU of another family.
set -u
build=${1:-build}
top=$(cd "$(dirname "$0")/.." && pwd)
tool="$top/tools/walkthrough.sh"
committed="$top/docs/walkthrough.md"
passed=0
failed=0
tmp=$(mktemp -d "${TMPDIR:-/tmp}/moe-ep-walkthrough-test.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

pass() {
    echo "PASS: $1"
    passed=$((passed + 1))
}

fail() {
    echo "FAIL: $1"
    failed=$((failed + 1))
}

finish() {
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit $?
}

# Compares the normalised forms of files $1 and $2, returns 0 when they are
# equal, and leaves their unified diff in $tmp/diff.
same_after_normalising() {
    sh "$tool" normalise "$1" >"$tmp/a.norm" &&
        sh "$tool" normalise "$2" >"$tmp/b.norm" &&
        diff -u "$tmp/a.norm" "$tmp/b.norm" >"$tmp/diff"
}

name="walkthrough generates"
if ! sh "$tool" generate "$build" "$top/docs/walkthrough.md.in" "$tmp/fresh.md" \
        2>"$tmp/generate.log"; then
    fail "$name: tools/walkthrough.sh generate failed:"
    cat "$tmp/generate.log"
    finish
fi
pass "$name"

name="committed walkthrough is up to date"
if same_after_normalising "$committed" "$tmp/fresh.md"; then
    pass "$name"
else
    fail "$name: docs/walkthrough.md differs from a fresh generation (- committed, + fresh, times masked as '#'):"
    head -n 200 "$tmp/diff"
    echo "Run make walkthrough and commit docs/walkthrough.md with the change that caused this."
fi

# Edits the first digit of the first output line (after the "$ command"
# line) of the first block whose directive has no rules, so no
# normalisation can hide the edit.
name="check catches an edited output number"
awk '
    done { print; next }
    /^<!-- output: .*-->[ ]*$/ { plain = 1; print; next }
    /^<!-- output: / { plain = 0; print; next }
    plain && /^```text$/ { in_block = 1; print; next }
    in_block && /^```$/ { in_block = 0; plain = 0; print; next }
    in_block && !/^\$ / && match($0, /[0-9]/) {
        d = substr($0, RSTART, 1)
        $0 = substr($0, 1, RSTART - 1) ((d + 1) % 10) substr($0, RSTART + 1)
        done = 1
    }
    { print }
' "$tmp/fresh.md" >"$tmp/edited.md"
if cmp -s "$tmp/fresh.md" "$tmp/edited.md"; then
    fail "$name: found no output line with a digit to edit"
elif same_after_normalising "$tmp/edited.md" "$tmp/fresh.md"; then
    fail "$name: the comparison ignored an edited number"
else
    pass "$name"
fi

# Edits the first digit inside the first bracketed time, such as "(0.614)",
# the wait that the step tables print.
name="check ignores an edited measured time"
awk '
    !done && match($0, /\( *[0-9]+\.[0-9]+\)/) {
        s = substr($0, RSTART, RLENGTH)
        if (match(s, /[0-9]/)) {
            d = substr(s, RSTART, 1)
            s = substr(s, 1, RSTART - 1) ((d + 1) % 10) substr(s, RSTART + 1)
            sub(/\( *[0-9]+\.[0-9]+\)/, s)
            done = 1
        }
    }
    { print }
' "$tmp/fresh.md" >"$tmp/edited.md"
if cmp -s "$tmp/fresh.md" "$tmp/edited.md"; then
    fail "$name: found no bracketed time to edit"
elif same_after_normalising "$tmp/edited.md" "$tmp/fresh.md"; then
    pass "$name"
else
    fail "$name: the comparison did not ignore the time:"
    cat "$tmp/diff"
fi

# Rewrites the lines that depend on the core count as a 64-core machine
# would print them: another count, other OpenBLAS threads, and no note
# about ranks sharing cores.
name="check ignores the core-count lines"
sed -e 's/[0-9][0-9]* cores online/64 cores online/' \
    -e 's/OpenBLAS threads per rank: [0-9][0-9]*/OpenBLAS threads per rank: 16/' \
    -e '/ranks share [0-9][0-9]* cores/d' "$tmp/fresh.md" >"$tmp/edited.md"
if cmp -s "$tmp/fresh.md" "$tmp/edited.md"; then
    fail "$name: found no core count to edit"
elif same_after_normalising "$tmp/edited.md" "$tmp/fresh.md"; then
    pass "$name"
else
    fail "$name: the comparison did not ignore them:"
    cat "$tmp/diff"
fi

finish
