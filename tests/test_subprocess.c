/*
 * test_subprocess.c - moe_subprocess_run: it returns the output and the
 * exit status, and the errno of a program that cannot start. The deadline
 * stops the program together with every process it started, and so does
 * the program's end.
 *
 * The programs are /bin/sh scripts given with -c.
 */
#include "test_util.h"

#include "moe_subprocess.h"
#include "moe_error.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static const int64_t MS = 1000 * 1000;

/* Runs `sh -c script` with env (or NULL) and the given limits. */
static void run_shell(const char *script, const char *const *env, int64_t timeout_ms,
                      size_t out_limit, struct moe_subprocess *result)
{
    const char *const argv[] = {"/bin/sh", "-c", script, NULL};
    int rc = moe_subprocess_run(argv, env, timeout_ms * MS, out_limit, result);
    cr_assert_eq(rc, 0, "moe_subprocess_run: %s", moe_error_message());
}

/* Returns whether process `pid` is gone or a zombie, waiting up to 2 s for
 * it to go, because its killing and reaping by init take a moment. */
static int process_gone(long pid)
{
    for (int i = 0; i < 200; i++) {
        char path[64], state = '?';
        snprintf(path, sizeof path, "/proc/%ld/stat", pid);
        FILE *f = fopen(path, "r");
        if (!f)
            return 1;
        int fields = fscanf(f, "%*d %*s %c", &state);
        fclose(f);
        if (fields == 1 && state == 'Z')
            return 1;
        usleep(10000);
    }
    return 0;
}

Test(subprocess, output_and_exit_status, .timeout = 30)
{
    struct moe_subprocess r;
    run_shell("echo out; echo err >&2; exit 3", NULL, 10000, 1 << 20, &r);
    cr_expect_eq(r.exec_errno, 0);
    cr_expect_eq(r.exited, 1);
    cr_expect_eq(r.status, 3);
    cr_expect_eq(r.timed_out, 0);
    cr_assert_not_null(r.out);
    cr_expect_str_eq(r.out, "out\n");
    cr_expect_eq(r.out_bytes, 4);
    cr_expect_str_eq(r.err, "err\n");
    char how[128];
    moe_subprocess_describe(&r, how, sizeof how);
    cr_expect_str_eq(how, "exit status 3");
    moe_subprocess_free(&r);
}

Test(subprocess, environment_added_and_replaced, .timeout = 30)
{
    cr_assert_eq(setenv("MOE_TEST_OLD", "old", 1), 0);
    cr_assert_eq(setenv("MOE_TEST_KEPT", "kept", 1), 0);
    static const char *const env[] = {"MOE_TEST_OLD=new", "MOE_TEST_ADDED=added", NULL};
    struct moe_subprocess r;
    run_shell("echo \"$MOE_TEST_OLD $MOE_TEST_ADDED $MOE_TEST_KEPT\"", env, 10000,
              1 << 20, &r);
    cr_expect_str_eq(r.out, "new added kept\n");
    moe_subprocess_free(&r);
}

Test(subprocess, missing_program_reports_errno, .timeout = 30)
{
    const char *const argv[] = {"/nonexistent/moe-ep-program", NULL};
    struct moe_subprocess r;
    cr_assert_eq(moe_subprocess_run(argv, NULL, 10000 * MS, 1 << 20, &r), 0);
    cr_expect_eq(r.exec_errno, ENOENT);
    cr_expect_eq(r.exited, 0);
    char how[128];
    moe_subprocess_describe(&r, how, sizeof how);
    cr_expect(strstr(how, "could not start") != NULL, "%s", how);
    moe_subprocess_free(&r);
}

Test(subprocess, killed_by_signal, .timeout = 30)
{
    struct moe_subprocess r;
    run_shell("kill -USR1 $$", NULL, 10000, 1 << 20, &r);
    cr_expect_eq(r.exited, 0);
    cr_expect_eq(r.status, SIGUSR1);
    cr_expect_eq(r.timed_out, 0);
    moe_subprocess_free(&r);
}

Test(subprocess, output_limit_truncates, .timeout = 30)
{
    struct moe_subprocess r;
    run_shell("echo 0123456789abcdef", NULL, 10000, 10, &r);
    cr_expect_eq(r.out_truncated, 1);
    cr_expect_eq(r.out_bytes, 10);
    cr_expect_str_eq(r.out, "0123456789");
    cr_expect_eq(r.status, 0, "the rest of the output must be read and dropped");
    moe_subprocess_free(&r);
}

Test(subprocess, stderr_keeps_the_last_bytes, .timeout = 30)
{
    /* 10000 lines of 5 bytes, far more than the err buffer. */
    struct moe_subprocess r;
    run_shell("i=0; while [ $i -lt 10000 ]; do echo line; i=$((i + 1)); done >&2; "
              "echo last >&2", NULL, 20000, 1 << 20, &r);
    size_t length = strlen(r.err);
    cr_expect_eq(length, sizeof r.err - 1);
    cr_expect(length >= 5 && strcmp(r.err + length - 5, "last\n") == 0,
              "the tail is '%s'", r.err + (length > 20 ? length - 20 : 0));
    moe_subprocess_free(&r);
}

/* The program and the process it started in the background both stop at
 * the deadline. */
Test(subprocess, deadline_stops_the_group, .timeout = 30)
{
    struct moe_subprocess r;
    run_shell("sleep 30 & echo $!; wait", NULL, 300, 1 << 20, &r);
    cr_expect_eq(r.timed_out, 1);
    cr_expect_eq(r.exited, 0);
    cr_expect_eq(r.status, SIGTERM, "sh should end on the SIGTERM, got signal %d",
                 r.status);
    cr_expect_lt(r.elapsed_ns, 5000 * MS, "took %.1f s", (double)r.elapsed_ns / 1e9);
    long child = r.out ? strtol(r.out, NULL, 10) : 0;
    cr_assert_gt(child, 0, "no pid in '%s'", r.out ? r.out : "");
    cr_expect(process_gone(child), "the background sleep %ld outlived the deadline",
              child);
    char how[128];
    moe_subprocess_describe(&r, how, sizeof how);
    cr_expect(strstr(how, "timed out after") != NULL, "%s", how);
    moe_subprocess_free(&r);
}

/* A program that ignores SIGTERM gets SIGKILL 2 s later. */
Test(subprocess, deadline_kills_after_grace, .timeout = 30)
{
    struct moe_subprocess r;
    run_shell("trap '' TERM; sleep 30", NULL, 200, 1 << 20, &r);
    cr_expect_eq(r.timed_out, 1);
    cr_expect_eq(r.exited, 0);
    cr_expect_eq(r.status, SIGKILL);
    cr_expect_lt(r.elapsed_ns, 8000 * MS, "took %.1f s", (double)r.elapsed_ns / 1e9);
    moe_subprocess_free(&r);
}

/* A process that the program left behind, holding its stdout open, is
 * killed when the program ends, well before the deadline. */
Test(subprocess, leftover_process_killed_at_end, .timeout = 30)
{
    struct moe_subprocess r;
    run_shell("sleep 30 & echo $!", NULL, 20000, 1 << 20, &r);
    cr_expect_eq(r.exited, 1);
    cr_expect_eq(r.status, 0);
    cr_expect_eq(r.timed_out, 0);
    cr_expect_lt(r.elapsed_ns, 5000 * MS, "took %.1f s", (double)r.elapsed_ns / 1e9);
    long child = r.out ? strtol(r.out, NULL, 10) : 0;
    cr_assert_gt(child, 0);
    cr_expect(process_gone(child), "the background sleep %ld was left running", child);
    moe_subprocess_free(&r);
}
