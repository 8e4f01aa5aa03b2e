/*
 * launch.c - create the segment, fork the ranks, supervise them, clean up.
 *
 * The launcher process owns the segment's name and mapping; each rank owns
 * its own mapping (made by name, to check the header as an unrelated process
 * would) and its slot. The launcher never exits the program: it returns
 * what happened, and main decides what to print and which status to use.
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
#include <sys/wait.h>
#include <unistd.h>

/* Time a rank gets to stop by itself after the abort flag is set. */
static const int64_t ABORT_GRACE_NS = 2000LL * 1000 * 1000;

int moe_launch_create(struct moe_launch *launch,
                      const struct moe_launch_config *config)
{
    *launch = (struct moe_launch){.config = *config, .failed_rank = -1};
    if (config->timeout_ns <= 0)
        return moe_fail(-EINVAL, "invalid timeout: expected a positive time");

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
    snprintf(launch->name, sizeof launch->name, "/moe-ep-%ld-%016llx",
             (long)getpid(), (unsigned long long)nonce);

    int fd = shm_open(launch->name, O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0)
        return moe_fail(-errno, "shm_open %s failed: %s", launch->name,
                        strerror(errno));
    launch->name_linked = 1;

    if (ftruncate(fd, (off_t)layout.segment_bytes) != 0) {
        rc = moe_fail(-errno, "sizing shared segment %s to %llu bytes failed: "
                      "%s", launch->name,
                      (unsigned long long)layout.segment_bytes, strerror(errno));
        close(fd);
        moe_launch_destroy(launch);
        return rc;
    }
    void *base = mmap(NULL, layout.segment_bytes, PROT_READ | PROT_WRITE,
                      MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) {
        rc = moe_fail(-errno, "mapping shared segment %s of %llu bytes failed: "
                      "%s", launch->name,
                      (unsigned long long)layout.segment_bytes, strerror(errno));
        moe_launch_destroy(launch);
        return rc;
    }

    struct moe_segment_header *h = base;
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
    return 0;
}

void moe_launch_destroy(struct moe_launch *launch)
{
    if (launch->segment) {
        munmap(launch->segment, launch->segment->segment_bytes);
        launch->segment = NULL;
    }
    if (launch->name_linked) {
        shm_unlink(launch->name);
        launch->name_linked = 0;
    }
}

/* Maps the segment by name and validates it, as a rank started by some other
 * means would. Returns the mapping or NULL with a message. */
static struct moe_segment_header *attach_by_name(const char *name, int ranks)
{
    int fd = shm_open(name, O_RDWR, 0);
    if (fd < 0) {
        moe_fail(-errno, "shm_open %s failed: %s", name, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        moe_fail(-errno, "fstat of %s failed: %s", name, strerror(errno));
        close(fd);
        return NULL;
    }
    void *base = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE,
                      MAP_SHARED, fd, 0);
    close(fd);
    if (base == MAP_FAILED) {
        moe_fail(-errno, "mapping %s failed: %s", name, strerror(errno));
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
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    sigprocmask(SIG_SETMASK, original_mask, NULL);
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != launcher)
        _exit(MOE_RANK_EXIT_ABORTED); /* the launcher died before prctl */

    struct moe_segment_header *inherited = launch->segment;
    struct moe_segment_header *h = attach_by_name(launch->name,
                                                  launch->config.ranks);
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

static int rank_failed(const struct moe_rank_outcome *o)
{
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
    int live = 0, rc = 0;

    sigset_t watched, original;
    sigemptyset(&watched);
    sigaddset(&watched, SIGCHLD);
    sigaddset(&watched, SIGINT);
    sigaddset(&watched, SIGTERM);
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

        /* Every rank has its own mapping now; the name is no longer needed,
         * and without it nothing can leak even if the launcher is killed. */
        if (launch->name_linked &&
            atomic_load_explicit(&h->attached, memory_order_acquire) == (uint32_t)R) {
            shm_unlink(launch->name);
            launch->name_linked = 0;
        }
        if (live == 0)
            break;

        if (grace_deadline && moe_now_ns() > grace_deadline)
            for (int r = 0; r < R; r++)
                if (alive[r] && !launch->outcome[r].killed_after_grace) {
                    kill(launch->outcome[r].pid, SIGKILL);
                    launch->outcome[r].killed_after_grace = 1;
                }

        struct timespec slice = {0, 20 * 1000 * 1000};
        int sig = sigtimedwait(&watched, NULL, &slice);
        if ((sig == SIGINT || sig == SIGTERM) && !launch->launcher_signal) {
            launch->launcher_signal = sig;
            moe_segment_abort(h);
            grace_deadline = moe_now_ns() + ABORT_GRACE_NS;
        }
    }

    /* Collect a SIGINT or SIGTERM that arrived after the last wait, so that
     * unblocking does not kill the launcher before it cleans up. */
    struct timespec zero = {0, 0};
    int sig;
    while ((sig = sigtimedwait(&watched, NULL, &zero)) > 0)
        if ((sig == SIGINT || sig == SIGTERM) && !launch->launcher_signal)
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

void moe_launch_describe(const struct moe_launch *launch, int rank, char *buf,
                         size_t size)
{
    const struct moe_rank_outcome *o = &launch->outcome[rank];
    const char *step = moe_step_name(o->step);
    const char *message = moe_segment_slot(launch->segment, rank)->error;
    if (o->killed_after_grace)
        snprintf(buf, size, "rank %d (pid %ld) was still in %s 2 s after the "
                 "run was aborted, so the launcher killed it", rank,
                 (long)o->pid, step);
    else if (o->signal)
        snprintf(buf, size, "rank %d (pid %ld) was killed by signal %d (%s) "
                 "in %s", rank, (long)o->pid, o->signal, strsignal(o->signal),
                 step);
    else if (message[0])
        snprintf(buf, size, "%s", message);
    else
        snprintf(buf, size, "rank %d (pid %ld) exited with status %d in %s",
                 rank, (long)o->pid, o->exit_status, step);
}
