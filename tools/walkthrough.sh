#!/bin/sh
# Generates docs/walkthrough.md from its template by running the commands
# that the template names and pasting their output, and normalises a
# generated file so that two generations can be compared.
#
#   sh tools/walkthrough.sh generate BUILD TEMPLATE OUT
#   sh tools/walkthrough.sh normalise FILE      (prints to standard output)
#
# `make walkthrough` runs the first, and tests/walkthrough.sh compares the
# committed file with a fresh generation, both normalised.
#
# The template is Markdown with directives of this form, each rule on its
# own line and every rule optional:
#
#   <!-- output: COMMAND
#        measured: ERE
#        kernel: ERE
#        machine: ERE
#        status: N -->
#
# A directive without rules fits on one line. generate copies the directive
# to OUT and follows it with a ```text block that contains "$ COMMAND" and
# the command's standard output. COMMAND runs under sh in a scratch
# directory, in which build/ links to BUILD and data/ to the repository's
# data/. So the template writes each command as a reader types it at the
# top of the repository, and the files a command writes are deleted with
# the scratch directory. A command must exit with status N (default 0)
# within COMMAND_TIMEOUT_S seconds and write nothing to standard error.
#
# normalise masks, in the block after a directive, what legitimately
# changes between runs and machines:
#   measured: on each line that matches ERE, every decimal number
#             (digits.digits) becomes '#' and each run of spaces becomes one
#             space. These are the measured times and waits.
#   kernel:   on each line that matches ERE, every number becomes '#'.
#             These lines show values computed by the expert GEMMs, or
#             counts taken from them. OpenBLAS picks its kernels by CPU,
#             and so does moe-ep for a few rows, so their last bits can
#             differ between two machines of one kind.
#   machine:  each line that matches ERE is left out. These lines depend on
#             the number of cores: the core count, the OpenBLAS threads per
#             rank, and the note printed when ranks outnumber cores.
# Every other line must stay the same.
#
# Only POSIX sh, sed, awk and grep are used, because a fresh Debian machine
# with the build packages may have no python3.
set -eu

COMMAND_TIMEOUT_S=120

usage() {
    echo "usage: sh tools/walkthrough.sh generate BUILD TEMPLATE OUT" >&2
    echo "       sh tools/walkthrough.sh normalise FILE" >&2
    exit 2
}

die() {
    echo "tools/walkthrough.sh: $*" >&2
    exit 1
}

normalise() {
    awk '
    function strip_rule(s) {
        sub(/^[ ]+/, "", s)
        sub(/[ ]*-->[ ]*$/, "", s)
        return s
    }
    /^<!-- output: / && !in_block {
        n_measured = 0
        n_kernel = 0
        n_machine = 0
        pending = 1
        in_directive = ($0 !~ /-->[ ]*$/)
        print
        next
    }
    in_directive {
        rule = strip_rule($0)
        if (rule ~ /^measured: /)
            measured[++n_measured] = substr(rule, 11)
        else if (rule ~ /^kernel: /)
            kernel[++n_kernel] = substr(rule, 9)
        else if (rule ~ /^machine: /)
            machine[++n_machine] = substr(rule, 10)
        if ($0 ~ /-->[ ]*$/)
            in_directive = 0
        print
        next
    }
    pending && /^```/ {
        pending = 0
        in_block = 1
        print
        next
    }
    in_block && /^```[ ]*$/ {
        in_block = 0
        print
        next
    }
    in_block {
        for (i = 1; i <= n_machine; i++)
            if ($0 ~ machine[i])
                next
        for (i = 1; i <= n_kernel; i++) {
            if ($0 ~ kernel[i]) {
                gsub(/[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?/, "#")
                gsub(/ +/, " ")
                break
            }
        }
        for (i = 1; i <= n_measured; i++) {
            if ($0 ~ measured[i]) {
                gsub(/[0-9]+\.[0-9]+/, "#")
                gsub(/ +/, " ")
                break
            }
        }
        print
        next
    }
    { print }
    ' "$1"
}

# Runs the directive whose lines are in $directive_file and appends its
# block to $out_tmp.
run_directive() {
    first=$(sed -n 1p "$directive_file")
    command=${first#<!-- output: }
    command=$(printf '%s\n' "$command" | sed 's/[ ]*-->[ ]*$//')
    [ -n "$command" ] || die "$template: a directive has no command"

    status_expected=0
    measured_list="$scratch/measured"
    : >"$measured_list"
    sed 1d "$directive_file" >"$scratch/rules"
    while IFS= read -r line; do
        rule=$(printf '%s\n' "$line" | sed 's/^[ ]*//; s/[ ]*-->[ ]*$//')
        case $rule in
            "measured: "*) printf '%s\n' "${rule#measured: }" >>"$measured_list" ;;
            "kernel: "*) printf '%s\n' "${rule#kernel: }" >>"$measured_list" ;;
            "machine: "* | "status: "*) ;;
            *) die "$template: invalid rule '$rule' for '$command'. Expected measured:, kernel:, machine: or status:" ;;
        esac
    done <"$scratch/rules"
    status_line=$(sed -n 's/^[ ]*status: \([0-9][0-9]*\).*$/\1/p' "$directive_file")
    [ -z "$status_line" ] || status_expected=$status_line

    echo "walkthrough: $command" >&2
    status=0
    (cd "$work" && timeout -k 5 "$COMMAND_TIMEOUT_S" sh -c "$command") \
        >"$scratch/stdout" 2>"$scratch/stderr" || status=$?
    if [ "$status" -ne "$status_expected" ]; then
        cat "$scratch/stderr" >&2
        die "'$command' exited with status $status, expected $status_expected"
    fi
    if [ -s "$scratch/stderr" ]; then
        cat "$scratch/stderr" >&2
        die "'$command' wrote to standard error, which the walkthrough does not show. Fix the command or its template line."
    fi
    if grep -q '^```' "$scratch/stdout"; then
        die "'$command' printed a line that starts with \`\`\`, which would end the Markdown block"
    fi
    while IFS= read -r ere; do
        grep -E -q -e "$ere" "$scratch/stdout" ||
            die "the measured rule '$ere' of '$command' matches no line of its output"
    done <"$measured_list"

    {
        cat "$directive_file"
        echo '```text'
        printf '$ %s\n' "$command"
        cat "$scratch/stdout"
        echo '```'
    } >>"$out_tmp"
}

generate() {
    build=$1
    template=$2
    out=$3
    top=$(cd "$(dirname "$0")/.." && pwd)
    [ -x "$build/moe-ep" ] || die "$build/moe-ep not found. Build it first with make BUILD=$build"
    [ -r "$template" ] || die "template $template not found"
    build_abs=$(cd "$build" && pwd)

    out_tmp="$out.tmp.$$"
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/moe-ep-walkthrough.XXXXXX")
    trap 'rm -rf "$scratch" "$out_tmp"' EXIT
    work="$scratch/work"
    mkdir "$work"
    ln -s "$build_abs" "$work/build"
    ln -s "$top/data" "$work/data"
    directive_file="$scratch/directive"

    {
        echo "<!-- Generated by tools/walkthrough.sh from docs/walkthrough.md.in."
        echo "     Edit the template and run make walkthrough; do not edit this file. -->"
    } >"$out_tmp"
    in_directive=0
    while IFS= read -r line || [ -n "$line" ]; do
        if [ "$in_directive" -eq 0 ]; then
            case $line in
                "<!-- output: "*)
                    printf '%s\n' "$line" >"$directive_file"
                    case $line in
                        *"-->") run_directive ;;
                        *) in_directive=1 ;;
                    esac
                    ;;
                *) printf '%s\n' "$line" >>"$out_tmp" ;;
            esac
        else
            printf '%s\n' "$line" >>"$directive_file"
            case $line in
                *"-->")
                    in_directive=0
                    run_directive
                    ;;
            esac
        fi
    done <"$template"
    [ "$in_directive" -eq 0 ] || die "$template: the last directive has no closing -->"
    mv "$out_tmp" "$out"
}

[ $# -ge 1 ] || usage
case $1 in
    generate)
        [ $# -eq 4 ] || usage
        generate "$2" "$3" "$4"
        ;;
    normalise)
        [ $# -eq 2 ] || usage
        [ -r "$2" ] || die "$2 not found"
        normalise "$2"
        ;;
    *) usage ;;
esac
