/*
 * subprocess.c - runs another program with a deadline and captures its
 * output; see moe_subprocess.h.
 *
 * Runs in the calling process, which forks once. The parent reads the
 * program's stdout and stderr through pipes with poll(), and watches for
 * the program's end with waitid(WNOWAIT). It reaps the program only after
 * killing whatever is left in the program's process group, because until
 * then the group id cannot have been reused.
 */
#define _GNU_SOURCE /* pipe2 */

#include "moe_subprocess.h"
#include "moe_error.h"
#include "moe_shm.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

/* From SIGTERM to SIGKILL at the deadline. */
static const int64_t KILL_GRACE_NS = 2LL * 1000 * 1000 * 1000;
/* How long the pipes may stay open after the program has ended, held by a
 * process it started. */
static const int64_t DRAIN_GRACE_NS = 1LL * 1000 * 1000 * 1000;
/* Maximum poll() timeout, so that the deadline and the program's end are
 * noticed in time. */
static const int POLL_MS = 50;

/* The child's side after fork, up to the exec. It makes only
 * async-signal-safe calls, because the parent may run other threads
 * (OpenBLAS). Reports a failed exec by writing errno to error_fd. */
static void start_program(const char *const *argv, char *const *envp,
                          pid_t parent, int out_fd, int err_fd, int error_fd)
{
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) /* the parent died before prctl */
        _exit(127);

    /* The signal mask and ignored signals survive exec, so they are reset
     * to the defaults. */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    static const int reset[] = {SIGINT, SIGTERM, SIGHUP, SIGPIPE, SIGCHLD};
    for (size_t i = 0; i < sizeof reset / sizeof reset[0]; i++)
        signal(reset[i], SIG_DFL);

    int null_fd = open("/dev/null", O_RDONLY);
    if (null_fd < 0 || dup2(null_fd, 0) < 0 || dup2(out_fd, 1) < 0 ||
        dup2(err_fd, 2) < 0) {
        int e = errno;
        (void)!write(error_fd, &e, sizeof e);
        _exit(127);
    }
    execve(argv[0], (char *const *)argv, envp);
    int e = errno;
    (void)!write(error_fd, &e, sizeof e);
    _exit(127);
}

/* Buffers of the parent. */
struct capture {
    char *out;
    size_t out_bytes, out_capacity, out_limit;
    int out_truncated;
    char err[2 * sizeof ((struct moe_subprocess *)0)->err];
    size_t err_bytes;
};

/* Appends to stdout up to the limit. Returns 0 or -ENOMEM. */
static int keep_out(struct capture *c, const char *data, size_t n)
{
    if (c->out_bytes + n > c->out_limit) {
        c->out_truncated = 1;
        n = c->out_limit - c->out_bytes;
    }
    if (c->out_bytes + n + 1 > c->out_capacity) {
        size_t capacity = c->out_capacity ? c->out_capacity : 4096;
        while (capacity < c->out_bytes + n + 1)
            capacity *= 2;
        char *grown = realloc(c->out, capacity);
        if (!grown)
            return -ENOMEM;
        c->out = grown;
        c->out_capacity = capacity;
    }
    memcpy(c->out + c->out_bytes, data, n);
    c->out_bytes += n;
    c->out[c->out_bytes] = '\0';
    return 0;
}

/* Appends to the stderr buffer, dropping its older half when full, so that
 * the last bytes stay. */
static void keep_err(struct capture *c, const char *data, size_t n)
{
    size_t half = sizeof c->err / 2;
    if (n > half) {
        data += n - half;
        n = half;
    }
    if (c->err_bytes + n > sizeof c->err) {
        memmove(c->err, c->err + c->err_bytes - half, half);
        c->err_bytes = half;
    }
    memcpy(c->err + c->err_bytes, data, n);
    c->err_bytes += n;
}

/* Reads what is ready on `fd` and closes it at end of file. Returns 0 or
 * -ENOMEM. */
static int read_ready(struct pollfd *fd, int is_out, struct capture *c)
{
    char chunk[65536];
    ssize_t n = read(fd->fd, chunk, sizeof chunk);
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
        return 0;
    if (n <= 0) {
        close(fd->fd);
        fd->fd = -1;
        return 0;
    }
    if (is_out)
        return keep_out(c, chunk, (size_t)n);
    keep_err(c, chunk, (size_t)n);
    return 0;
}

/* Returns whether the program has ended, leaving it unreaped. ECHILD, a
 * program that something else reaped, counts as ended. */
static int has_ended(pid_t pid)
{
    siginfo_t info;
    memset(&info, 0, sizeof info);
    if (waitid(P_PID, (id_t)pid, &info, WEXITED | WNOHANG | WNOWAIT) != 0)
        return errno == ECHILD;
    return info.si_pid == pid;
}

/* Reads both pipes until the program has ended and they are closed, or
 * they outlive the program by DRAIN_GRACE_NS, and stops the group at the
 * deadline. Returns 0 or a negative error. */
static int watch(const char *program, pid_t pid, struct pollfd fds[2],
                 int64_t timeout_ns, struct capture *c,
                 struct moe_subprocess *result)
{
    int64_t start = moe_now_ns(), ended_at = 0, term_at = 0;
    int killed = 0;
    for (;;) {
        int64_t now = moe_now_ns();
        if (!term_at && now - start >= timeout_ns) {
            kill(-pid, SIGTERM);
            term_at = now;
            result->timed_out = 1;
        }
        if (term_at && !killed && now - term_at >= KILL_GRACE_NS) {
            kill(-pid, SIGKILL);
            killed = 1;
        }
        if (!ended_at && has_ended(pid))
            ended_at = now;
        int open_fds = (fds[0].fd >= 0) + (fds[1].fd >= 0);
        if (ended_at && (open_fds == 0 || now - ended_at >= DRAIN_GRACE_NS))
            return 0;

        int ready = poll(fds, 2, POLL_MS);
        if (ready < 0 && errno != EINTR)
            return moe_fail(-errno, "poll on the output of %s failed: %s",
                            program, strerror(errno));
        for (int i = 0; ready > 0 && i < 2; i++)
            if (fds[i].fd >= 0 && (fds[i].revents & (POLLIN | POLLHUP | POLLERR))) {
                int rc = read_ready(&fds[i], i == 0, c);
                if (rc)
                    return moe_fail(rc, "out of memory for the output of %s",
                                    program);
            }
    }
}

/* Kills what is left of the program's group, reaps the program and fills
 * the exit fields of *result. */
static void reap(pid_t pid, struct moe_subprocess *result)
{
    kill(-pid, SIGKILL);
    int status = 0;
    pid_t reaped;
    while ((reaped = waitpid(pid, &status, 0)) < 0 && errno == EINTR)
        ;
    if (reaped != pid)
        return; /* reaped by another waiter: the status is lost */
    if (WIFEXITED(status)) {
        result->exited = 1;
        result->status = WEXITSTATUS(status);
    } else if (WIFSIGNALED(status)) {
        result->status = WTERMSIG(status);
    }
}

/* Returns a new array of this process's environment with the `env`
 * assignments in place of any of the same name, NULL-terminated, or NULL
 * when out of memory. The strings are not copied. */
static char **build_environment(const char *const *env)
{
    extern char **environ;
    size_t added = 0, inherited = 0;
    while (env && env[added])
        added++;
    while (environ && environ[inherited])
        inherited++;
    char **envp = calloc(added + inherited + 1, sizeof *envp);
    if (!envp)
        return NULL;
    size_t n = 0;
    for (size_t i = 0; i < added; i++)
        envp[n++] = (char *)env[i];
    for (size_t i = 0; i < inherited; i++) {
        size_t name_length = strcspn(environ[i], "=");
        int replaced = 0;
        for (size_t k = 0; k < added && !replaced; k++)
            replaced = !strncmp(env[k], environ[i], name_length) &&
                       env[k][name_length] == '=';
        if (!replaced)
            envp[n++] = environ[i];
    }
    return envp;
}

static void close_pair(int fds[2])
{
    close(fds[0]);
    close(fds[1]);
}

/* Copies the captured output into *result and frees the capture. */
static void take_capture(struct capture *c, struct moe_subprocess *result)
{
    result->out = c->out;
    result->out_bytes = c->out_bytes;
    result->out_truncated = c->out_truncated;
    size_t keep = c->err_bytes < sizeof result->err - 1 ? c->err_bytes
                                                         : sizeof result->err - 1;
    memcpy(result->err, c->err + c->err_bytes - keep, keep);
    result->err[keep] = '\0';
    free(c);
}

int moe_subprocess_run(const char *const *argv, const char *const *env,
                       int64_t timeout_ns, size_t out_limit,
                       struct moe_subprocess *result)
{
    memset(result, 0, sizeof *result);
    struct capture *c = calloc(1, sizeof *c);
    char **envp = build_environment(env);
    if (!c || !envp) {
        free(c);
        free(envp);
        return moe_fail(-ENOMEM, "out of memory to run %s", argv[0]);
    }
    c->out_limit = out_limit;

    /* stdout, stderr, and the pipe that reports a failed exec. */
    int pipes[3][2];
    int created = 0;
    while (created < 3 && pipe2(pipes[created], O_CLOEXEC) == 0)
        created++;
    if (created < 3) {
        int e = errno;
        while (created > 0)
            close_pair(pipes[--created]);
        free(c);
        free(envp);
        return moe_fail(-e, "cannot create a pipe to run %s: %s", argv[0],
                        strerror(e));
    }

    fflush(NULL); /* else the child could write this process's buffers too */
    pid_t parent = getpid();
    int64_t start = moe_now_ns();
    pid_t pid = fork();
    if (pid == 0)
        start_program(argv, envp, parent, pipes[0][1], pipes[1][1], pipes[2][1]);
    int fork_errno = errno;
    free(envp);
    for (int i = 0; i < 3; i++)
        close(pipes[i][1]);
    if (pid < 0) {
        for (int i = 0; i < 3; i++)
            close(pipes[i][0]);
        free(c);
        return moe_fail(-fork_errno, "cannot fork to run %s: %s", argv[0],
                        strerror(fork_errno));
    }
    setpgid(pid, pid); /* also here, so that kill(-pid) reaches it at once */

    /* A successful exec closes the pipe; a failed one writes its errno. */
    int exec_errno = 0;
    ssize_t n;
    while ((n = read(pipes[2][0], &exec_errno, sizeof exec_errno)) < 0 &&
           errno == EINTR)
        ;
    close(pipes[2][0]);

    struct pollfd fds[2] = {{.fd = pipes[0][0], .events = POLLIN},
                            {.fd = pipes[1][0], .events = POLLIN}};
    int rc = 0;
    if (n == (ssize_t)sizeof exec_errno)
        result->exec_errno = exec_errno;
    else
        rc = watch(argv[0], pid, fds, timeout_ns, c, result);
    reap(pid, result);
    result->elapsed_ns = moe_now_ns() - start;
    for (int i = 0; i < 2; i++)
        if (fds[i].fd >= 0)
            close(fds[i].fd);
    if (result->exec_errno)
        result->exited = result->status = 0;
    take_capture(c, result);
    if (rc)
        moe_subprocess_free(result);
    return rc;
}

void moe_subprocess_free(struct moe_subprocess *result)
{
    free(result->out);
    result->out = NULL;
    result->out_bytes = 0;
}

void moe_subprocess_describe(const struct moe_subprocess *r, char *buf, size_t size)
{
    if (r->exec_errno)
        snprintf(buf, size, "could not start: %s", strerror(r->exec_errno));
    else if (r->timed_out)
        snprintf(buf, size, "timed out after %.0f s and was killed",
                 (double)r->elapsed_ns / 1e9);
    else if (r->exited)
        snprintf(buf, size, "exit status %d", r->status);
    else if (r->status == 0)
        snprintf(buf, size, "ended with a status that another waiter took");
    else
        snprintf(buf, size, "killed by signal %d (%s)", r->status,
                 strsignal(r->status));
}
