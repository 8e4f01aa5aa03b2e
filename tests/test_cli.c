/*
 * test_cli.c - the moe-ep program end to end: exit statuses 0, 1, 2 and 3,
 * error messages that name the flag and the value, outputs that are
 * byte-identical across rank counts, and no segment left behind after a
 * failure or a signal.
 */
#include "test_program.h"

#define SMALL "--tokens", "64", "--hidden", "32", "--ffn", "48", "--experts", "6"

Test(cli, default_shape_is_bitwise_equal, .timeout = 60)
{
    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"run", NULL});
    cr_assert_eq(o.status, 0, "stderr: %s", o.err);
    cr_assert_not_null(strstr(o.out, "4 ranks"));
    cr_assert_not_null(strstr(o.out, "tokens per expert"));
    cr_assert_not_null(strstr(o.out, "imbalance"));
    cr_assert_not_null(strstr(o.out, "all-to-all traffic"));
    cr_assert_not_null(strstr(o.out, "step times per rank"));
    /* The golden check is the last line. */
    const char *last = strstr(o.out, "golden check: bitwise equal");
    cr_assert_not_null(last, "stdout: %s", o.out);
    cr_assert_null(strchr(strchr(last, '\n') + 1, '\n'), "the check is not last");
}

Test(cli, output_identical_across_ranks, .timeout = 120)
{
    char first[4096] = {0};
    size_t first_size = 0;
    for (int ranks = 1; ranks <= 8; ranks++) {
        char ranks_text[8], path[64];
        snprintf(ranks_text, sizeof ranks_text, "%d", ranks);
        snprintf(path, sizeof path, "/tmp/moe-ep-cli-%ld-%d.npy", (long)getpid(), ranks);
        struct outcome o;
        run_program(&o, NULL, 0, 0,
                    (const char *[]){"run", "--ranks", ranks_text, "--tokens", "13",
                                     "--hidden", "24", "--ffn", "16", "--experts",
                                     "5", "--top-k", "2", "--output", path, NULL});
        cr_assert_eq(o.status, 0, "ranks %d: %s", ranks, o.err);
        char data[4096];
        FILE *f = fopen(path, "rb");
        cr_assert_not_null(f);
        size_t n = fread(data, 1, sizeof data, f);
        fclose(f);
        unlink(path);
        cr_assert_gt(n, 128 + 13 * 24 * 4 - 1, "the .npy file holds the (13, 24) output");
        if (ranks == 1) {
            memcpy(first, data, n);
            first_size = n;
            continue;
        }
        cr_assert_eq(n, first_size);
        cr_assert(memcmp(first, data, n) == 0, "ranks %d output differs from ranks 1", ranks);
    }
}

Test(cli, mismatch_exits_1, .timeout = 60)
{
    struct outcome o;
    run_program(&o, "MOE_EP_CORRUPT_OUTPUT=5", 0, 0,
                (const char *[]){"run", SMALL, NULL});
    cr_assert_eq(o.status, 1, "stderr: %s", o.err);
    cr_assert_not_null(strstr(o.out, "MISMATCH at token 0, column 5"), "%s", o.out);
}

struct bad_flag {
    const char *flag, *value, *expected; /* expected text in the message */
};

Test(cli, invalid_flags_exit_2, .timeout = 60)
{
    static const struct bad_flag cases[] = {
        {"--ranks", "0", "invalid --ranks value '0'"},
        {"--ranks", "65", "invalid --ranks value '65'"},
        {"--ranks", "two", "invalid --ranks value 'two'"},
        {"--tokens", "-3", "invalid --tokens value '-3'"},
        {"--tokens", "99999999999999999999", "invalid --tokens value"},
        {"--hidden", "0", "invalid --hidden value '0'"},
        {"--ffn", "1.5", "invalid --ffn value '1.5'"},
        {"--experts", "0", "invalid --experts value '0'"},
        {"--top-k", "7", "invalid --top-k value 7: it exceeds --experts 6"},
        {"--seed", "-1", "invalid --seed value '-1'"},
        {"--timeout", "0", "invalid --timeout value '0'"},
        {"--timeout", "nan", "invalid --timeout value 'nan'"},
        {"--ring-size", "1000", "expected a power of two"},
        {"--ring-size", "32", "invalid --ring-size value '32'"},
        {"--ring-size", "2G", "invalid --ring-size value '2G'"},
        {"--bogus", "1", "unknown option '--bogus'"},
        {"--input", "/nonexistent/tokens.npy", "/nonexistent/tokens.npy"},
        {"--output", "/nonexistent/out.npy", "invalid --output file '/nonexistent/out.npy'"},
        {"--output", "", "invalid --output value ''"},
        {"--output", "/tmp", "invalid --output file '/tmp': it is a directory"},
        {"--output", "/dev/null/x.npy", "'/dev/null' is not a directory"},
        {"--timeout", "0x1p-3", "invalid --timeout value '0x1p-3'"},
        {"--tokens", "16777216", "needs about"},
        {"--hidden", "65536", "needs about"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct outcome o;
        const struct bad_flag *c = &cases[i];
        if (!strcmp(c->flag, "--hidden") && !strcmp(c->value, "65536"))
            run_program(&o, NULL, 0, 0,
                        (const char *[]){"run", "--hidden", "65536", "--ffn", "262144",
                                         "--experts", "64", NULL});
        else
            run_program(&o, NULL, 0, 0,
                        (const char *[]){"run", SMALL, c->flag, c->value, NULL});
        cr_expect_eq(o.status, 2, "%s %s: status %d", c->flag, c->value, o.status);
        cr_expect_not_null(strstr(o.err, c->expected), "%s %s: stderr is '%s'",
                           c->flag, c->value, o.err);
    }

    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"run", "--ranks", NULL});
    cr_assert_eq(o.status, 2);
    cr_assert_not_null(strstr(o.err, "missing value for --ranks"));
    run_program(&o, NULL, 0, 0, (const char *[]){"launch", NULL});
    cr_assert_eq(o.status, 2);
    cr_assert_not_null(strstr(o.err, "unknown command 'launch'"));
    cr_assert_eq(segment_count(), 0);
}

Test(cli, input_file_sets_shape, .timeout = 60)
{
    /* data/tokens-16x32.npy is found relative to the repository root, which
     * is two levels above the test binary (BUILD/tests/test_cli). */
    char program[PATH_MAX + 16], input[PATH_MAX + 64];
    program_path(program, sizeof program);
    snprintf(input, sizeof input, "%s/../data/tokens-16x32.npy", dirname(program));
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", "--input", input, "--ranks", "3", "--experts",
                                 "4", "--ffn", "48", NULL});
    cr_assert_eq(o.status, 0, "stderr: %s", o.err);
    cr_assert_not_null(strstr(o.out, "tokens 16, hidden 32"), "stdout: %s", o.out);
    cr_assert_not_null(strstr(o.out, "golden check: bitwise equal (512 values)"));

    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", "--input", input, "--hidden", "64", NULL});
    cr_assert_eq(o.status, 2);
    cr_assert_not_null(strstr(o.err, "its shape is (16, 32)"), "stderr: %s", o.err);
}

Test(cli, bad_input_file_exits_2, .timeout = 60)
{
    char path[64];
    snprintf(path, sizeof path, "/tmp/moe-ep-cli-bad-%ld.npy", (long)getpid());
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    fputs("this is not a numpy file", f);
    fclose(f);
    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"run", "--input", path, NULL});
    unlink(path);
    cr_assert_eq(o.status, 2);
    cr_assert_not_null(strstr(o.err, path), "stderr: %s", o.err);
}

/* Runs 4 ranks whose rank 1 stalls in dispatch, with the given exchange,
 * and checks the timeout message. The rings wait for the rows in
 * dispatch; the direct exchange waits for them in compute, where each
 * expert waits for its rows. */
static void expect_stall_timeout(const char *exchange, const char *message)
{
    struct outcome o;
    run_program(&o, "MOE_EP_FAULT=1:dispatch:stall", 0, 0,
                (const char *[]){"run", SMALL, "--ranks", "4", "--timeout", "0.5",
                                 "--exchange", exchange, NULL});
    cr_assert_eq(o.status, 3, "stderr: %s", o.err);
    cr_assert_not_null(strstr(o.err, message), "stderr: %s", o.err);
    /* 0.5 s timeout plus the 2 s grace for the stalled rank, with margin. */
    cr_assert_lt(o.seconds, 10.0);
    cr_assert_eq(segment_count(), 0);
}

Test(cli, stalled_rank_times_out_rings, .timeout = 60)
{
    expect_stall_timeout("rings", "timed out after 0.5 s in dispatch waiting for rank 1");
}

/* A peer whose note claims more rows than the layout gives is rejected by
 * the owner, which names it, and the run fails with status 3. */
Test(cli, wrong_note_is_rejected, .timeout = 60)
{
    struct outcome o;
    run_program(&o, "MOE_EP_CORRUPT_NOTE=1", 0, 0,
                (const char *[]){"run", SMALL, "--ranks", "3", NULL});
    cr_assert_eq(o.status, 3, "stderr: %s", o.err);
    cr_assert_not_null(strstr(o.err, "rank 2: rank 1 wrote "), "stderr: %s", o.err);
    cr_assert_not_null(strstr(o.err, "but the layout says"), "stderr: %s", o.err);
    cr_assert_eq(segment_count(), 0);
}

Test(cli, stalled_rank_times_out_direct, .timeout = 60)
{
    expect_stall_timeout("direct", "timed out after 0.5 s in compute waiting for rank 1 "
                                   "(received 0 of 1 notes)");
}

Test(cli, killed_rank_exits_3, .timeout = 60)
{
    static const char *const faults[] = {
        "MOE_EP_FAULT=0:route:kill",   "MOE_EP_FAULT=2:layout:segv",
        "MOE_EP_FAULT=3:compute:exit", "MOE_EP_FAULT=1:combine:kill",
    };
    for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++) {
        struct outcome o;
        run_program(&o, faults[i], 0, 0,
                    (const char *[]){"run", SMALL, "--ranks", "4", NULL});
        cr_assert_eq(o.status, 3, "%s: stderr: %s", faults[i], o.err);
        cr_assert_not_null(strstr(o.err, "moe-ep run: rank "), "%s", o.err);
        cr_assert_lt(o.seconds, 10.0, "%s took %.1f s", faults[i], o.seconds);
    }
    cr_assert_eq(segment_count(), 0);
}

Test(cli, lone_stalled_rank_is_killed, .timeout = 60)
{
    /* With one rank no peer waits, so the launcher's CPU-time watchdog must
     * find the stall: timeout 0.5 s plus 2 s. */
    struct outcome o;
    run_program(&o, "MOE_EP_FAULT=0:compute:stall", 0, 0,
                (const char *[]){"run", SMALL, "--ranks", "1", "--timeout", "0.5", NULL});
    cr_assert_eq(o.status, 3, "stderr: %s", o.err);
    cr_assert_not_null(strstr(o.err, "used no CPU time for 2.5 s in compute"),
                       "stderr: %s", o.err);
    cr_assert_lt(o.seconds, 15.0);
    cr_assert_eq(segment_count(), 0);
}

Test(cli, full_stdout_is_a_failure, .timeout = 60)
{
    /* A report that cannot be written must not end in success. */
    char program[PATH_MAX + 16];
    program_path(program, sizeof program);
    char command[PATH_MAX + 128];
    snprintf(command, sizeof command, "%s run --tokens 8 --hidden 8 --ffn 8 "
             ">/dev/full 2>/dev/null", program);
    int status = system(command);
    cr_assert(WIFEXITED(status));
    cr_assert_eq(WEXITSTATUS(status), 3);
}

Test(cli, device_output_written_in_place, .timeout = 60)
{
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", SMALL, "--output", "/dev/null", NULL});
    cr_assert_eq(o.status, 0, "stderr: %s", o.err);
    struct stat st;
    cr_assert_eq(stat("/dev/null", &st), 0);
    cr_assert(S_ISCHR(st.st_mode), "/dev/null was replaced");
}

Test(cli, sigterm_cleans_up, .timeout = 60)
{
    /* A stalled rank keeps the run alive until SIGTERM arrives. */
    struct outcome o;
    run_program(&o, "MOE_EP_FAULT=0:route:stall", SIGTERM, 300,
                (const char *[]){"run", SMALL, "--ranks", "3", NULL});
    cr_assert_eq(o.status, 128 + SIGTERM, "stderr: %s", o.err);
    cr_assert_not_null(strstr(o.err, "stopped by signal"), "stderr: %s", o.err);
    cr_assert_eq(segment_count(), 0);
}
