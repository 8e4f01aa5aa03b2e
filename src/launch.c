/*
 * launch.c - create the segment, fork the ranks, supervise them, clean up.
 *
 * The launcher process owns the segment's descriptor and its mapping. Each
 * rank owns its own mapping, made from the inherited descriptor and checked
 * as an unrelated process would check it, and its slot. The launcher never
 * exits the program. It returns the outcome, and main decides what to print
 * and which status to use.
 */
#include "moe_launch.h"
#include "moe_error.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

/* Time a rank gets to stop by itself after the abort flag is set. A rank
 * in a wait stops within microseconds, but one inside an expert GEMM checks
 * the flag only at its next wait, so the launcher kills it after this
 * long. With the 20 ms polling slice below, every rank is gone within
 * about 1.05 s of the failure, well inside the 2 s limit for stopping. */
static const int64_t ABORT_GRACE_NS = 1000LL * 1000 * 1000;

/* Idle time beyond the timeout after which the CPU-time watchdog calls a
 * rank hung. A waiting rank gives up by itself at the timeout, so this is
 * margin for a rank that is slow to exit, not a grace after an abort. */
static const int64_t HUNG_MARGIN_NS = 2000LL * 1000 * 1000;

/* Creates the shared-memory object, sizes and maps it, and unlinks its
 * name. SIGINT, SIGTERM, SIGHUP and SIGXFSZ are blocked meanwhile, so no
 * signal can end the launcher while the name exists, and a file size limit
 * makes ftruncate fail with EFBIG. Returns the mapping or NULL. */
static void *create_segment(struct moe_launch *launch, uint64_t bytes)
{
    sigset_t held, original;
    moe_stop_signals(&held);
    sigaddset(&held, SIGXFSZ);
    sigprocmask(SIG_BLOCK, &held, &original);

    void *base = NULL;
    int fd = shm_open(launch->name, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) {
        moe_fail(-errno, "shm_open %s failed: %s", launch->name, strerror(errno));
        goto out;
    }
    /* A segment larger than the free room in /dev/shm maps fine, but a rank
     * then dies of SIGBUS when it touches a page, so reject it here. */
    struct statvfs room;
    if (fstatvfs(fd, &room) == 0 &&
        (uint64_t)room.f_bavail * room.f_frsize < bytes) {
        moe_fail(-ENOSPC, "shared memory has %llu MiB free but the segment needs "
                 "%llu MiB; use fewer --ranks, a smaller --ring-size, fewer "
                 "tokens or --exchange rings (no windows), or enlarge /dev/shm",
                 (unsigned long long)room.f_bavail * room.f_frsize >> 20,
                 (unsigned long long)bytes >> 20);
    } else if (ftruncate(fd, (off_t)bytes) != 0) {
        moe_fail(-errno, "sizing shared segment %s to %llu bytes failed: %s",
                 launch->name, (unsigned long long)bytes, strerror(errno));
    } else {
        base = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (base == MAP_FAILED) {
            moe_fail(-errno, "mapping shared segment %s of %llu bytes failed: "
                     "%s", launch->name, (unsigned long long)bytes,
                     strerror(errno));
            base = NULL;
        }
    }
    /* The ranks inherit the descriptor, so the name is not needed. */
    shm_unlink(launch->name);
    if (base)
        launch->fd = fd;
    else
        close(fd);

out:
    moe_discard_size_limit_signal(); /* ftruncate's EFBIG is reported above */
    sigprocmask(SIG_SETMASK, &original, NULL);
    return base;
}

int moe_launch_create(struct moe_launch *launch,
                      const struct moe_launch_config *config)
{
    *launch = (struct moe_launch){.config = *config, .failed_rank = -1, .fd = -1};
    if (config->timeout_ns <= 0 || config->timeout_ns > MOE_MAX_TIMEOUT_NS)
        return moe_fail(-EINVAL, "invalid timeout of %lld ns: expected 1 ns to one "
                        "week", (long long)config->timeout_ns);
    if (launch->config.ring_capacity == 0 && config->ranks >= 1 &&
        config->ranks <= MOE_MAX_RANKS)
        launch->config.ring_capacity = moe_ring_default_capacity(config->ranks);

    struct moe_segment_header layout;
    int rc = moe_segment_layout(&layout, config->ranks,
                                launch->config.ring_capacity, config->app_bytes);
    if (rc)
        return rc;

    uint64_t nonce;
    if (getrandom(&nonce, sizeof nonce, 0) != (ssize_t)sizeof nonce)
        return moe_fail(-errno, "getrandom failed: %s", strerror(errno));
    snprintf(launch->name, sizeof launch->name, "/" MOE_SEGMENT_PREFIX "%ld-%016llx",
             (long)getpid(), (unsigned long long)nonce);

    struct moe_segment_header *h = create_segment(launch, layout.segment_bytes);
    if (!h)
        return -errno ? -errno : -EIO;
    *h = layout;
    h->launcher_pid = getpid();
    h->timeout_ns = config->timeout_ns;
    /* With a core for every rank, the peer being waited on is running, and
     * polling for 20 us avoids a futex round trip for short waits. With more
     * ranks than cores the peer may need this core, so sleep at once. */
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    h->spin_ns = cores > 0 && config->ranks <= cores ? 20 * 1000 : 0;
    for (int src = 0; src < config->ranks; src++)
        for (int dst = 0; dst < config->ranks; dst++)
            moe_ring_init(moe_segment_ring(h, src, dst), h->ring_capacity, 0);
    launch->segment = h;
    launch->segment_bytes = layout.segment_bytes;
    return 0;
}

void moe_launch_destroy(struct moe_launch *launch)
{
    if (launch->segment) {
        munmap(launch->segment, launch->segment_bytes);
        launch->segment = NULL;
    }
    if (launch->fd >= 0) {
        close(launch->fd);
        launch->fd = -1;
    }
}

/* Maps the segment from the descriptor inherited from the launcher, at an
 * address of this process's choosing, and validates the header as any
 * process attaching to it must. Returns the mapping or NULL with a
 * message. */
static struct moe_segment_header *attach_segment(int fd, int ranks)
{
    struct stat st;
    if (fstat(fd, &st) != 0) {
        moe_fail(-errno, "fstat of the shared segment failed: %s", strerror(errno));
        return NULL;
    }
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE,
                      MAP_SHARED, fd, 0);
    if (base == MAP_FAILED) {
        moe_fail(-errno, "mapping the shared segment failed: %s", strerror(errno));
        return NULL;
    }
    if (moe_segment_validate(base, (uint64_t)st.st_size, ranks) != 0) {
        munmap(base, (size_t)st.st_size);
        return NULL;
    }
    return base;
}

/* Body of a forked rank process; never returns. */
static void run_rank(struct moe_launch *launch, int rank, pid_t launcher,
                     const sigset_t *original_mask)
{
    /* Ctrl-C and a terminal hangup reach the whole process group. Only the
     * launcher acts on them, and it stops the ranks through the abort flag.
     * SIGTERM is unblocked, since the caller of the launcher may block it,
     * so that a rank can still be terminated on its own. */
    signal(SIGINT, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    signal(SIGTERM, SIG_DFL);
    sigset_t mask = *original_mask;
    sigdelset(&mask, SIGTERM);
    sigprocmask(SIG_SETMASK, &mask, NULL);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != launcher)
        _exit(MOE_RANK_EXIT_ABORTED); /* the launcher died before prctl */

    struct moe_segment_header *inherited = launch->segment;
    struct moe_segment_header *h = attach_segment(launch->fd, launch->config.ranks);
    close(launch->fd);
    if (!h) {
        /* No slot to write to: report through the inherited mapping. */
        struct moe_rank_slot *slot = moe_segment_slot(inherited, rank);
        snprintf(slot->error, sizeof slot->error, "rank %d: %s", rank,
                 moe_error_message());
        moe_segment_abort(inherited);
        _exit(MOE_RANK_EXIT_FAILED);
    }
    munmap(inherited, inherited->segment_bytes);

    struct moe_rank_slot *slot = moe_segment_slot(h, rank);
    slot->pid = (int32_t)getpid();
    atomic_store_explicit(&slot->step, MOE_STEP_START, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->attached, 1, memory_order_acq_rel);

    struct moe_comm comm;
    int rc = moe_comm_attach(&comm, h, rank);
    if (rc == 0) {
        rc = launch->config.rank_main(&comm, launch->config.arg);
        moe_comm_detach(&comm);
    }
    if (rc == 0) {
        atomic_store_explicit(&slot->step, MOE_STEP_DONE, memory_order_release);
        _exit(0);
    }
    if (rc == -ECANCELED &&
        atomic_load_explicit(&h->abort_flag, memory_order_acquire))
        _exit(MOE_RANK_EXIT_ABORTED);

    snprintf(slot->error, sizeof slot->error, "%s", moe_error_message());
    /* Tell the peers at once instead of letting them run into the timeout. */
    moe_segment_abort(h);
    _exit(MOE_RANK_EXIT_FAILED);
}

/* Reads a process's CPU time (user plus system, in clock ticks) and its
 * state letter from /proc/PID/stat. Returns 0, or -1 if it cannot. */
static int read_cpu_time(pid_t pid, unsigned long long *ticks, char *state)
{
    char path[64], text[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", (long)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = '\0';
    /* The command name, in brackets, may contain spaces; fields after it
     * are: state ppid pgrp session tty tpgid flags minflt cminflt majflt
     * cmajflt utime stime. */
    const char *after = strrchr(text, ')');
    unsigned long long utime, stime;
    if (!after || sscanf(after + 1, " %c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u "
                         "%llu %llu", state, &utime, &stime) != 3)
        return -1;
    *ticks = utime + stime;
    return 0;
}

/* Watches the ranks' CPU time and marks as hung a rank that has used none
 * for the timeout plus HUNG_MARGIN_NS. Returns the hung rank or -1. */
static int find_hung_rank(struct moe_launch *launch, const int *alive,
                          unsigned long long *last_ticks, int64_t *last_change,
                          int64_t now)
{
    int64_t limit = launch->config.timeout_ns + HUNG_MARGIN_NS;
    for (int r = 0; r < launch->config.ranks; r++) {
        struct moe_rank_outcome *o = &launch->outcome[r];
        unsigned long long ticks;
        char state;
        if (!alive[r] || o->hung || read_cpu_time(o->pid, &ticks, &state) != 0)
            continue;
        /* A runnable rank that gets no CPU is starved, not hung. */
        if (ticks != last_ticks[r] || last_change[r] == 0 || state == 'R') {
            last_ticks[r] = ticks;
            last_change[r] = now;
        } else if (now - last_change[r] > limit) {
            o->hung = 1;
            o->hung_state = state;
            return r;
        }
    }
    return -1;
}

static int rank_failed(const struct moe_rank_outcome *o)
{
    if (o->hung)
        return 1;
    if (o->killed_after_grace)
        return 0; /* a consequence of the abort, not its cause */
    return o->signal != 0 || (o->exit_status != 0 &&
                              o->exit_status != MOE_RANK_EXIT_ABORTED);
}

int moe_launch_run(struct moe_launch *launch)
{
    struct moe_segment_header *h = launch->segment;
    int R = launch->config.ranks;
    pid_t launcher = getpid();
    int alive[MOE_MAX_RANKS] = {0};
    unsigned long long last_ticks[MOE_MAX_RANKS] = {0};
    int64_t last_change[MOE_MAX_RANKS] = {0}, last_watch = 0;
    int live = 0, rc = 0;

    sigset_t watched, original;
    moe_stop_signals(&watched);
    sigaddset(&watched, SIGCHLD);
    sigprocmask(SIG_BLOCK, &watched, &original);
    fflush(NULL); /* or the children would flush the launcher's buffers too */

    int64_t start = moe_now_ns(), grace_deadline = 0;
    for (int r = 0; r < R; r++) {
        pid_t pid = fork();
        if (pid < 0) {
            rc = moe_fail(-errno, "fork of rank %d failed: %s", r, strerror(errno));
            moe_segment_abort(h);
            grace_deadline = moe_now_ns() + ABORT_GRACE_NS;
            break;
        }
        if (pid == 0)
            run_rank(launch, r, launcher, &original);
        launch->outcome[r] = (struct moe_rank_outcome){.pid = pid};
        alive[r] = 1;
        live++;
    }
    /* Every rank has mapped the segment or will from its own copy. */
    close(launch->fd);
    launch->fd = -1;

    while (live > 0) {
        for (int r = 0; r < R; r++) {
            int status;
            if (!alive[r] || waitpid(launch->outcome[r].pid, &status, WNOHANG) <= 0)
                continue;
            alive[r] = 0;
            live--;
            struct moe_rank_outcome *o = &launch->outcome[r];
            o->step = atomic_load_explicit(&moe_segment_slot(h, r)->step,
                                           memory_order_acquire);
            if (WIFSIGNALED(status))
                o->signal = WTERMSIG(status);
            else
                o->exit_status = WEXITSTATUS(status);
            if (rank_failed(o) && launch->failed_rank < 0) {
                launch->failed_rank = r;
                moe_segment_abort(h);
                grace_deadline = moe_now_ns() + ABORT_GRACE_NS;
            }
        }

        if (live == 0)
            break;

        int64_t now = moe_now_ns();
        if (now - last_watch > 250 * 1000 * 1000) {
            /* If the launcher itself did not run for a while, because the
             * whole job was stopped, the ranks' idle times are meaningless
             * and start over. */
            if (last_watch && now - last_watch > 2 * HUNG_MARGIN_NS)
                memset(last_change, 0, sizeof last_change);
            last_watch = now;
            int hung = find_hung_rank(launch, alive, last_ticks, last_change, now);
            if (hung >= 0) {
                kill(launch->outcome[hung].pid, SIGKILL);
                if (launch->failed_rank < 0) {
                    launch->failed_rank = hung;
                    moe_segment_abort(h);
                    grace_deadline = now + ABORT_GRACE_NS;
                }
            }
        }

        if (grace_deadline && moe_now_ns() > grace_deadline)
            for (int r = 0; r < R; r++)
                if (alive[r] && !launch->outcome[r].killed_after_grace) {
                    kill(launch->outcome[r].pid, SIGKILL);
                    launch->outcome[r].killed_after_grace = 1;
                }

        struct timespec slice = {0, 20 * 1000 * 1000};
        int sig = sigtimedwait(&watched, NULL, &slice);
        if ((sig == SIGINT || sig == SIGTERM || sig == SIGHUP) &&
            !launch->launcher_signal) {
            launch->launcher_signal = sig;
            moe_segment_abort(h);
            grace_deadline = moe_now_ns() + ABORT_GRACE_NS;
        }
    }

    /* Collect a SIGINT, SIGTERM or SIGHUP that arrived after the last wait,
     * so that unblocking does not kill the launcher before it cleans up. */
    int sig;
    while ((sig = moe_take_pending_signal(&watched)) != 0)
        if ((sig == SIGINT || sig == SIGTERM || sig == SIGHUP) &&
            !launch->launcher_signal)
            launch->launcher_signal = sig;
    sigprocmask(SIG_SETMASK, &original, NULL);

    launch->elapsed_ns = moe_now_ns() - start;
    if (rc)
        return rc;
    if (launch->failed_rank >= 0 || launch->launcher_signal)
        return -ECANCELED;
    for (int r = 0; r < R; r++)
        if (launch->outcome[r].exit_status != 0)
            return -ECANCELED;
    return 0;
}

void moe_stop_signals(sigset_t *set)
{
    sigemptyset(set);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGHUP);
}

int moe_take_pending_signal(const sigset_t *set)
{
    struct timespec zero = {0, 0};
    int sig = sigtimedwait(set, NULL, &zero);
    return sig > 0 ? sig : 0;
}

void moe_discard_size_limit_signal(void)
{
    sigset_t size_limit;
    sigemptyset(&size_limit);
    sigaddset(&size_limit, SIGXFSZ);
    while (moe_take_pending_signal(&size_limit) != 0)
        continue;
}

void moe_launch_describe(const struct moe_launch *launch, int rank, char *buf,
                         size_t size)
{
    const struct moe_rank_outcome *o = &launch->outcome[rank];
    const char *step = moe_step_name(o->step);
    const char *message = moe_segment_slot(launch->segment, rank)->error;
    if (o->hung)
        snprintf(buf, size, "rank %d (pid %ld) used no CPU time for %.3g s in "
                 "%s (process state %c%s), so the launcher killed it", rank,
                 (long)o->pid,
                 (double)(launch->config.timeout_ns + HUNG_MARGIN_NS) / 1e9,
                 step, o->hung_state,
                 o->hung_state == 'T' || o->hung_state == 't' ? ", stopped" : "");
    else if (o->killed_after_grace)
        snprintf(buf, size, "rank %d (pid %ld) was still in %s %.3g s after "
                 "the run was aborted, so the launcher killed it", rank,
                 (long)o->pid, step, (double)ABORT_GRACE_NS / 1e9);
    else if (o->signal)
        snprintf(buf, size, "rank %d (pid %ld) was killed by signal %d (%s) "
                 "in %s", rank, (long)o->pid, o->signal, strsignal(o->signal),
                 step);
    else if (message[0])
        /* A rank wrote it, and may have left it unterminated. */
        snprintf(buf, size, "%.*s", MOE_ERROR_TEXT_BYTES, message);
    else
        snprintf(buf, size, "rank %d (pid %ld) exited with status %d in %s",
                 rank, (long)o->pid, o->exit_status, step);
}

const char *moe_step_fault_name(int step)
{
    static const char *const names[MOE_STEP_COUNT] = {
        [MOE_STEP_ROUTE] = "route",       [MOE_STEP_LAYOUT] = "layout",
        [MOE_STEP_DISPATCH] = "dispatch", [MOE_STEP_COMPUTE] = "compute",
        [MOE_STEP_COMBINE] = "combine",
    };
    return step >= 0 && step < MOE_STEP_COUNT ? names[step] : NULL;
}

void moe_fault_inject(const char *who, const char *step)
{
    const char *spec = getenv("MOE_EP_FAULT");
    char fault_who[16], fault_step[16], action[16];
    if (!spec || !step || sscanf(spec, "%15[a-z0-9]:%15[a-z]:%15[a-z]", fault_who,
                                 fault_step, action) != 3)
        return;
    if (strcmp(fault_who, who) || strcmp(fault_step, step))
        return;
    if (!strcmp(action, "stall")) {
        /* The launcher holds off its stop signals and handles them between
         * steps, which a stalled launcher never reaches. Let them end it as
         * they would end any process. */
        if (!strcmp(who, "launcher")) {
            sigset_t stops;
            sigemptyset(&stops);
            sigaddset(&stops, SIGINT);
            sigaddset(&stops, SIGTERM);
            sigaddset(&stops, SIGHUP);
            signal(SIGINT, SIG_DFL);
            signal(SIGTERM, SIG_DFL);
            signal(SIGHUP, SIG_DFL);
            sigprocmask(SIG_UNBLOCK, &stops, NULL);
        }
        for (;;)
            pause();
    }
    if (!strcmp(action, "kill"))
        raise(SIGKILL);
    if (!strcmp(action, "segv"))
        raise(SIGSEGV);
    if (!strcmp(action, "exit"))
        _exit(1);
}
