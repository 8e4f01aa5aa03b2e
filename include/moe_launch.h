/*
 * moe_launch.h - the launcher: one shared segment, R forked rank processes,
 * and the supervision that makes sure none of them is left behind.
 *
 * Lifecycle, all in the calling (launcher) process:
 *   moe_launch_create()  shm_open(O_CREAT|O_EXCL, 0600) under an
 *                        unpredictable name, size and map the segment, and
 *                        unlink the name at once, keeping the descriptor.
 *                        SIGINT and SIGTERM are held off meanwhile, so that
 *                        no name is left in /dev/shm. Then lay out the
 *                        segment; the caller fills the app area.
 *   moe_launch_run()     fork R ranks and wait for all of them. Each rank
 *                        maps the segment from the inherited descriptor at
 *                        an address of its own, validates the header,
 *                        attaches its rings and calls rank_main.
 *   moe_launch_destroy() unmap and close.
 *
 * Ranks inherit the launcher's private memory through fork (read-only by
 * convention: weights and input tokens); everything they exchange goes
 * through the segment.
 *
 * Failure: when a rank exits non-zero or dies from a signal, the launcher
 * sets the abort flag, which wakes every waiting rank; ranks still alive
 * after a 1-second grace period are killed with SIGKILL, so every rank has
 * stopped within about 1.05 s. SIGINT, SIGTERM and SIGHUP to the launcher
 * do the same and are reported in the result. Ranks die with the launcher
 * (PR_SET_PDEATHSIG) if it is killed outright.
 *
 * Hung ranks: a rank that uses no CPU time for the timeout plus 2 seconds
 * is stopped or stuck outside a wait (a waiting rank gives up after the
 * timeout by itself), so the launcher treats it as failed.
 */
#ifndef MOE_LAUNCH_H
#define MOE_LAUNCH_H

#include "moe_comm.h"

#include <signal.h>
#include <stdio.h>
#include <sys/types.h>

/* Exit status of a rank that stopped because another rank failed. */
#define MOE_RANK_EXIT_ABORTED 4
/* Exit status of a rank that failed; its message is in its slot. */
#define MOE_RANK_EXIT_FAILED 3

struct moe_launch_config {
    int ranks;              /* R, 1 to MOE_MAX_RANKS */
    uint64_t ring_capacity; /* data bytes per ring, a power of two, or 0 for
                               moe_ring_default_capacity(ranks) */
    uint64_t app_bytes;     /* size of the app area */
    int64_t timeout_ns;     /* per-wait deadline with no progress */
    /* Runs in each rank process. Returns 0 or a negative error code with a
     * message recorded through moe_fail(). */
    int (*rank_main)(struct moe_comm *comm, void *arg);
    void *arg;
};

/* Outcome of one rank process. */
struct moe_rank_outcome {
    pid_t pid;
    int exit_status; /* valid when signal == 0 */
    int signal;      /* the signal that killed it, or 0 */
    int step;        /* enum moe_step the rank was in at the end */
    int killed_after_grace; /* still alive 1 s after the abort, so killed */
    int hung;        /* used no CPU time for timeout + 2 s */
    char hung_state; /* its /proc state letter then: 'T' stopped, 'S' ... */
};

struct moe_launch {
    struct moe_launch_config config;
    char name[64];                      /* shm name, "/moe-ep-PID-RANDOM" */
    int fd;                             /* the segment, for the ranks; or -1 */
    struct moe_segment_header *segment; /* launcher's mapping */
    uint64_t segment_bytes;             /* its size, kept here because any
                                           rank can write the header */
    struct moe_rank_outcome outcome[MOE_MAX_RANKS];
    int failed_rank;       /* first rank that failed, or -1 */
    int launcher_signal;   /* SIGINT, SIGTERM or SIGHUP received, or 0 */
    int64_t elapsed_ns;    /* from the first fork to the last exit */
};

/* Creates and lays out the segment. Returns 0, -EINVAL for a bad config,
 * or -errno. On failure nothing is left in /dev/shm. */
int moe_launch_create(struct moe_launch *launch,
                      const struct moe_launch_config *config);

/* Forks the ranks and waits for all of them. Returns 0 when every rank
 * exited with status 0; -ECANCELED when a rank failed or the launcher got
 * SIGINT/SIGTERM (details in launch->outcome, failed_rank and
 * launcher_signal); -errno when fork fails. */
int moe_launch_run(struct moe_launch *launch);

/* Unmaps the segment and closes its descriptor. */
void moe_launch_destroy(struct moe_launch *launch);

/* Fills `set` with the signals that stop a run: SIGINT, SIGTERM and
 * SIGHUP. */
void moe_stop_signals(sigset_t *set);

/* Consumes one pending signal of `set`, which the caller blocks, and returns
 * it, or 0 when none is pending. Never waits. */
int moe_take_pending_signal(const sigset_t *set);

/* Discards a pending SIGXFSZ. A caller that blocks SIGXFSZ sees a file size
 * limit as EFBIG from the failing call, and must discard the signal before
 * unblocking it, or the default action would end the process. */
void moe_discard_size_limit_signal(void);

/* Formats what happened to `rank` ("killed by signal 9 (Killed) in
 * dispatch", or its error message) into buf. */
void moe_launch_describe(const struct moe_launch *launch, int rank, char *buf,
                         size_t size);

/* ---- fault injection for tests ------------------------------------------ */

/* Debug fault injection. MOE_EP_FAULT="WHO:STEP:ACTION" makes the process
 * WHO, on entering STEP, do ACTION. WHO is a rank number, or "launcher"
 * for the launcher process. The rank steps are route, layout, dispatch,
 * compute and combine, and the launcher's step is golden, the golden
 * check that runs after the ranks have exited. ACTION is "stall" (sleep
 * forever, as a hung process would), "kill" (SIGKILL itself), "segv"
 * (raise SIGSEGV) or "exit" (exit with status 1 without a message).
 * Anything unparsable is ignored. */
void moe_fault_inject(const char *who, const char *step);

/* Returns the name a step has in MOE_EP_FAULT ("layout" for the layout
 * exchange), or NULL for a step that cannot be named there. */
const char *moe_step_fault_name(int step);

/* ---- leftover segments (moe-ep clean) ---------------------------------- */

/* Directory in which shm_open() creates its names on Linux with glibc. */
#define MOE_SHM_DIR "/dev/shm"
/* Every segment name in MOE_SHM_DIR is this prefix, the launcher's pid in
 * decimal, '-' and 16 lowercase hex digits of a random nonce. */
#define MOE_SEGMENT_PREFIX "moe-ep-"

/* Parses a name in MOE_SHM_DIR (without the directory). Returns 0 and sets
 * *pid when the name has exactly the form above, or -1. */
int moe_segment_name_pid(const char *name, pid_t *pid);

struct moe_clean_summary {
    int found;  /* segment names found */
    int stale;  /* removed, or that would be removed with dry_run */
    int kept;   /* the process with the launcher pid has the segment open or
                   mapped, or its open files cannot be read */
    int failed; /* stale but unlink() failed */
};

/* Removes the stale segment names in dir_path: those whose launcher pid
 * does not exist, or is a process that neither has the segment open nor
 * maps it. Prints one line per name to `out`: what was done and why. With
 * dry_run it removes nothing and prints "would remove". Returns 0, or
 * -errno when the directory cannot be read or a name cannot be removed. */
int moe_clean(const char *dir_path, int dry_run, FILE *out,
              struct moe_clean_summary *summary);

/* Runs `moe-ep clean` with the arguments after "clean" and returns its exit
 * status: 0, 2 for invalid usage, 3 when a name could not be removed. */
int moe_clean_main(int argc, char **argv);

#endif
