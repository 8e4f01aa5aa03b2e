/*
 * moe_subprocess.h - runs another program to its end or to a deadline, and
 * captures what it writes.
 *
 * `moe-ep bench --peers` uses it for the peers it times: a Python script and
 * mpirun. The program runs in a process group of its own, so that the
 * processes it starts can be stopped with it.
 */
#ifndef MOE_SUBPROCESS_H
#define MOE_SUBPROCESS_H

#include <stddef.h>
#include <stdint.h>

/* The outcome of moe_subprocess_run(). */
struct moe_subprocess {
    char *out;           /* what the program wrote to stdout, NUL-terminated;
                            the caller frees it */
    size_t out_bytes;
    int out_truncated;   /* stdout was longer than the limit; the rest was
                            read and dropped */
    char err[2048];      /* the last bytes written to stderr, NUL-terminated */
    int exec_errno;      /* errno of the failed exec, else 0; the fields
                            below are then 0 */
    int exited;          /* 1 when the program called exit */
    int status;          /* exit status when `exited`, else the signal number,
                            or 0 when another waiter reaped the program */
    int timed_out;       /* the deadline passed and the group was killed */
    int64_t elapsed_ns;  /* from fork to the end of the program */
};

/* Runs the program at path argv[0] with arguments argv (NULL-terminated),
 * with stdin from /dev/null, in a new process group, and with `env` added
 * to this process's environment (NAME=value strings, NULL-terminated, or
 * NULL for none). The program gets PR_SET_PDEATHSIG SIGKILL, so it dies if
 * this process does.
 *
 * Waits at most timeout_ns. At the deadline the whole group gets SIGTERM,
 * and SIGKILL 2 s later. When the program ends, any process still in its
 * group gets SIGKILL before the program is reaped, because the group's id
 * is then still the program's own. A process that left the group (setsid,
 * setpgid) is not stopped.
 *
 * Returns 0 once the program has ended and been reaped, or failed to
 * start (result->exec_errno), or -errno with a message when a pipe or
 * the fork fails. *result is then filled in; free it with
 * moe_subprocess_free(). */
int moe_subprocess_run(const char *const *argv, const char *const *env,
                       int64_t timeout_ns, size_t out_limit,
                       struct moe_subprocess *result);

void moe_subprocess_free(struct moe_subprocess *result);

/* Describes how the program ended, for a message: "exit status 3",
 * "killed by signal 9 (Killed)", "timed out after 30 s and was killed",
 * or "could not start: No such file or directory". */
void moe_subprocess_describe(const struct moe_subprocess *result, char *buf,
                             size_t size);

#endif
