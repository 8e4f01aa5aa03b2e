/*
 * test_faults.c - a rank that dies, a launcher that is signalled or killed,
 * and `moe-ep clean`, all through the moe-ep program.
 *
 * Fault matrix: MOE_EP_FAULT makes one rank of a 2- or 3-rank run die on
 * entering each step (route, layout exchange, dispatch, compute, combine)
 * by SIGKILL, SIGSEGV and exit(1), for every rank, repeated for
 * MOE_EP_FAULT_ROUNDS rounds (20 when unset). Each run must exit with
 * status 3 and name the rank, how it died and the step. It must end within
 * 2 s of its start, which bounds the time from the death to the launcher's
 * exit, and leave no process in its process group and no segment in
 * /dev/shm.
 *
 * Stop time: a rank stalled by MOE_EP_FAULT is killed from here at a known
 * moment, and the time from that kill to the launcher's exit is measured.
 * In one case every peer waits on the dead rank, and in the other the
 * stalled rank is outside any wait. A rank of a busy run of many forwards
 * is also killed at an arbitrary point. The launcher tests send SIGINT,
 * SIGTERM, SIGHUP and SIGKILL to the launcher of a stalled or a busy run.
 * The clean test plants names in /dev/shm next to a stalled run.
 *
 * Each moe-ep is started in a process group of its own, and this process
 * becomes a child subreaper, so ranks orphaned by a dead launcher become
 * this process's children: the tests find them by group and reap them.
 * The runs use --timeout 5, longer than the 2 s bound, so that a run that
 * stopped only through the timeout fails the time check.
 */
#include "test_program.h"

#include <errno.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>

#define TINY "--tokens", "12", "--hidden", "8", "--ffn", "8", "--experts", "6", \
             "--timeout", "5"

/* Every rank must have stopped this long after a death. */
static const double STOP_LIMIT_S = 2.0;

/* Above PID_MAX_LIMIT (2^22 on 64-bit Linux), so no process ever has it. */
static const long UNUSED_PID = 4194305;

/* A moe-ep process started by a test. */
struct moe_ep_process {
    pid_t pid;     /* the launcher, and the id of its process group */
    int pidfd;     /* becomes readable when the launcher exits */
    double start_s;
    double exit_s;
    char out_path[40], err_path[40];
};

/* Process groups of the moe-ep processes this test started, for
 * kill_started_groups(). */
static pid_t started_groups[64];
static int started_count;

/* Runs after every test, even one that failed an assertion: kills what is
 * left of every moe-ep it started, so that a failure leaves no process. */
static void kill_started_groups(void)
{
    for (int i = 0; i < started_count; i++) {
        if (kill(-started_groups[i], SIGKILL) != 0)
            continue;
        while (waitpid(-started_groups[i], NULL, 0) > 0)
            continue;
    }
    started_count = 0;
}

/* Drops a group that has been found empty from started_groups. */
static void forget_group(pid_t group)
{
    for (int i = 0; i < started_count; i++)
        if (started_groups[i] == group)
            started_groups[i--] = started_groups[--started_count];
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Makes orphaned ranks children of this test process, so that the tests
 * can see and reap them. */
static void become_subreaper(void)
{
    cr_assert_eq(prctl(PR_SET_CHILD_SUBREAPER, 1), 0, "PR_SET_CHILD_SUBREAPER: %s",
                 strerror(errno));
}

/* Starts moe-ep with args (NULL-terminated, without the program name) in a
 * new process group, with MOE_EP_FAULT set to `fault` or unset, and with
 * core dumps off so that SIGSEGV stays fast and leaves no file. */
static void start_moe_ep(struct moe_ep_process *p, const char *fault,
                         const char *const *args)
{
    char program[PATH_MAX + 16];
    program_path(program, sizeof program);
    snprintf(p->out_path, sizeof p->out_path, "/tmp/moe-ep-faults-outXXXXXX");
    snprintf(p->err_path, sizeof p->err_path, "/tmp/moe-ep-faults-errXXXXXX");
    int out_fd = mkstemp(p->out_path), err_fd = mkstemp(p->err_path);
    cr_assert(out_fd >= 0 && err_fd >= 0, "mkstemp: %s", strerror(errno));

    const char *argv[64] = {program};
    int argc = 1;
    for (; args[argc - 1]; argc++)
        argv[argc] = args[argc - 1];
    argv[argc] = NULL;

    p->start_s = now_s();
    p->pid = fork();
    cr_assert_geq(p->pid, 0);
    if (p->pid == 0) {
        setpgid(0, 0);
        struct rlimit no_core = {0, 0};
        setrlimit(RLIMIT_CORE, &no_core);
        if (fault)
            setenv("MOE_EP_FAULT", fault, 1);
        else
            unsetenv("MOE_EP_FAULT");
        /* Under AddressSanitizer a SIGSEGV would become exit status 1. */
        char asan[512];
        const char *options = getenv("ASAN_OPTIONS");
        snprintf(asan, sizeof asan, "%s%shandle_segv=0", options ? options : "",
                 options && *options ? ":" : "");
        setenv("ASAN_OPTIONS", asan, 1);
        dup2(out_fd, 1);
        dup2(err_fd, 2);
        execv(program, (char *const *)argv);
        _exit(127);
    }
    setpgid(p->pid, p->pid); /* also here, so the group exists on return */
    if (started_count < (int)(sizeof started_groups / sizeof started_groups[0]))
        started_groups[started_count++] = p->pid;
    close(out_fd);
    close(err_fd);
    p->pidfd = (int)syscall(SYS_pidfd_open, p->pid, 0);
    cr_assert_geq(p->pidfd, 0, "pidfd_open: %s", strerror(errno));
}

/* Waits for the launcher to exit, at most limit_s from its start, and
 * fills o with its status, output and run time. A launcher still running
 * then is killed with its group and fails the test. */
static void wait_moe_ep(struct moe_ep_process *p, double limit_s, struct outcome *o)
{
    struct pollfd ready = {.fd = p->pidfd, .events = POLLIN};
    double left_s = p->start_s + limit_s - now_s();
    int polled = left_s > 0 ? poll(&ready, 1, (int)(left_s * 1000) + 1) : 0;
    p->exit_s = now_s();
    int status;
    if (polled <= 0) {
        kill(-p->pid, SIGKILL);
        waitpid(p->pid, &status, 0);
        cr_assert_fail("moe-ep (pid %ld) did not exit within %.0f s", (long)p->pid,
                       limit_s);
    }
    cr_assert_eq(waitpid(p->pid, &status, 0), p->pid);
    close(p->pidfd);
    o->status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    o->seconds = p->exit_s - p->start_s;
    read_file(p->out_path, o->out, sizeof o->out);
    read_file(p->err_path, o->err, sizeof o->err);
    unlink(p->out_path);
    unlink(p->err_path);
}

/* Reads the state letter, parent and process group of pid from
 * /proc/PID/stat. Returns 0, or -1 when the process has gone. */
static int read_stat(pid_t pid, char *state, pid_t *parent, pid_t *group)
{
    char path[64], text[512];
    snprintf(path, sizeof path, "/proc/%ld/stat", (long)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = '\0';
    /* The command name is in brackets and may contain spaces. */
    const char *after = strrchr(text, ')');
    long ppid, pgrp;
    if (!after || sscanf(after + 1, " %c %ld %ld", state, &ppid, &pgrp) != 3)
        return -1;
    *parent = (pid_t)ppid;
    *group = (pid_t)pgrp;
    return 0;
}

/* Lists up to max processes whose parent (by_parent) or process group is
 * `id`. Returns how many there are. */
static int list_processes(pid_t id, int by_parent, pid_t *pids, int max)
{
    DIR *dir = opendir("/proc");
    cr_assert_not_null(dir);
    int count = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        char *end;
        long pid = strtol(entry->d_name, &end, 10);
        char state;
        pid_t parent, group;
        if (*end != '\0' || pid <= 0 || read_stat((pid_t)pid, &state, &parent, &group))
            continue;
        if ((by_parent ? parent : group) != id)
            continue;
        if (count < max)
            pids[count] = (pid_t)pid;
        count++;
    }
    closedir(dir);
    return count;
}

/* Returns the number of the system call pid is blocked in, from
 * /proc/PID/syscall, or -1 when it is running or has gone. */
static long current_syscall(pid_t pid)
{
    char path[64], text[64] = "";
    snprintf(path, sizeof path, "/proc/%ld/syscall", (long)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    char *got = fgets(text, sizeof text, f);
    fclose(f);
    char *end;
    long number = got ? strtol(text, &end, 10) : 0;
    return got && end != text ? number : -1;
}

/* Waits until the `ranks` ranks of a run with a stall fault are all
 * asleep: the stalled rank in pause() and every peer in a futex wait on
 * it. Stores the stalled rank's pid and the peers' pids. */
static void wait_for_stall(const struct moe_ep_process *p, int ranks, pid_t *stalled,
                           pid_t *peers)
{
    pid_t last = 0;
    for (double deadline = now_s() + 10; now_s() < deadline; usleep(5000)) {
        pid_t pids[8];
        if (list_processes(p->pid, 1, pids, 8) != ranks)
            continue;
        int asleep = 0, not_futex = 0, peer_count = 0;
        pid_t candidate = 0, others[8];
        for (int i = 0; i < ranks; i++) {
            char state;
            pid_t parent, group;
            if (read_stat(pids[i], &state, &parent, &group) == 0 && state == 'S')
                asleep++;
            if (current_syscall(pids[i]) == SYS_futex) {
                others[peer_count++] = pids[i];
            } else {
                candidate = pids[i];
                not_futex++;
            }
        }
        if (asleep == ranks && not_futex == 1 && candidate == last) {
            *stalled = candidate;
            memcpy(peers, others, (size_t)peer_count * sizeof *peers);
            return;
        }
        /* Two polls in a row must agree, so a peer between two futex
         * sleeps is not taken for the stalled rank. */
        last = asleep == ranks && not_futex == 1 ? candidate : 0;
    }
    cr_assert_fail("the %d ranks of moe-ep (pid %ld) did not all fall asleep "
                   "within 10 s", ranks, (long)p->pid);
}

/* Asserts that no process of the launcher's group is left, reaping any
 * orphaned rank that became this process's child first, and that no
 * segment name of this launcher is in /dev/shm. */
static void assert_nothing_left(const struct moe_ep_process *p, const char *label)
{
    int orphans = 0;
    while (waitpid(-p->pid, NULL, WNOHANG) > 0)
        orphans++;
    pid_t left[8];
    int count = list_processes(p->pid, 0, left, 8);
    cr_assert_eq(count, 0, "%s: %d process(es) of group %ld left, the first pid %ld",
                 label, count, (long)p->pid, count ? (long)left[0] : 0L);
    cr_assert_eq(orphans, 0, "%s: %d rank(s) outlived the launcher", label, orphans);
    errno = 0;
    cr_assert(kill(-p->pid, 0) != 0 && errno == ESRCH,
              "%s: process group %ld still exists", label, (long)p->pid);

    char prefix[64];
    snprintf(prefix, sizeof prefix, "moe-ep-%ld-", (long)p->pid);
    DIR *dir = opendir("/dev/shm");
    cr_assert_not_null(dir);
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL)
        cr_assert(strncmp(entry->d_name, prefix, strlen(prefix)) != 0,
                  "%s: /dev/shm/%s was left behind", label, entry->d_name);
    closedir(dir);
    forget_group(p->pid);
}

static int compare_doubles(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Logs the min, median, 99th percentile and max of count times. */
static void log_distribution(const char *label, double *seconds, int count)
{
    qsort(seconds, (size_t)count, sizeof *seconds, compare_doubles);
    cr_log_info("%s, %d runs: min %.1f ms, median %.1f ms, p99 %.1f ms, "
                "max %.1f ms", label, count, seconds[0] * 1e3,
                seconds[count / 2] * 1e3, seconds[(count * 99) / 100] * 1e3,
                seconds[count - 1] * 1e3);
}

/* ---- fault matrix ------------------------------------------------------ */

struct step_case {
    const char *fault_name; /* as MOE_EP_FAULT spells it */
    const char *message_name; /* as the launcher's message spells it */
};

static const struct step_case STEPS[] = {
    {"route", "route"},       {"layout", "layout exchange"},
    {"dispatch", "dispatch"}, {"compute", "compute"},
    {"combine", "combine"},
};
#define STEP_COUNT (int)(sizeof STEPS / sizeof STEPS[0])

static const char *const ACTIONS[] = {"kill", "segv", "exit"};
#define ACTION_COUNT 3

static int fault_rounds(void)
{
    const char *text = getenv("MOE_EP_FAULT_ROUNDS");
    int rounds = text ? atoi(text) : 20;
    return rounds > 0 ? rounds : 20;
}

/* Formats how the launcher describes the death of a rank by `action`. */
static void expected_death(const char *action, char *buf, size_t size)
{
    if (!strcmp(action, "kill"))
        snprintf(buf, size, "was killed by signal %d (%s)", SIGKILL, strsignal(SIGKILL));
    else if (!strcmp(action, "segv"))
        snprintf(buf, size, "was killed by signal %d (%s)", SIGSEGV, strsignal(SIGSEGV));
    else
        snprintf(buf, size, "exited with status 1");
}

/* Runs one fault and checks everything the matrix promises. Returns the
 * run time from start to exit. */
static double run_fault(int ranks, int rank, const struct step_case *step,
                        const char *action)
{
    char fault[64], ranks_text[8], label[96], death[96], first_line[64], line[192];
    snprintf(fault, sizeof fault, "%d:%s:%s", rank, step->fault_name, action);
    snprintf(ranks_text, sizeof ranks_text, "%d", ranks);
    snprintf(label, sizeof label, "%d ranks, MOE_EP_FAULT=%s", ranks, fault);

    struct moe_ep_process p;
    struct outcome o;
    start_moe_ep(&p, fault, (const char *[]){"run", TINY, "--ranks", ranks_text, NULL});
    wait_moe_ep(&p, 30, &o);

    cr_assert_eq(o.status, 3, "%s: status %d, stderr: %s", label, o.status, o.err);
    /* The dead rank's line comes first, with its pid, then the summary. */
    snprintf(first_line, sizeof first_line, "moe-ep run: rank %d (pid ", rank);
    cr_assert(strncmp(o.err, first_line, strlen(first_line)) == 0,
              "%s: stderr does not start with '%s': %s", label, first_line, o.err);
    expected_death(action, death, sizeof death);
    snprintf(line, sizeof line, ") %s in %s\n", death, step->message_name);
    cr_assert_not_null(strstr(o.err, line), "%s: stderr lacks '%s': %s", label,
                       line, o.err);
    cr_assert_null(strstr(o.err, "timed out"), "%s: a peer timed out: %s", label, o.err);
    /* A tiny layer's peers are in a wait or microseconds from one, so each
     * must stop by itself on the abort flag, before the launcher's grace
     * kill. */
    cr_assert_null(strstr(o.err, "after the run was aborted"),
                   "%s: a peer ignored the abort flag: %s", label, o.err);
    cr_assert_lt(o.seconds, STOP_LIMIT_S, "%s: took %.3f s", label, o.seconds);
    assert_nothing_left(&p, label);
    return o.seconds;
}

static void run_matrix(int ranks)
{
    become_subreaper();
    int rounds = fault_rounds();
    int per_round = ranks * STEP_COUNT * ACTION_COUNT;
    double *seconds = malloc((size_t)(rounds * per_round) * sizeof *seconds);
    cr_assert_not_null(seconds);
    int count = 0;
    for (int round = 0; round < rounds; round++)
        for (int rank = 0; rank < ranks; rank++)
            for (int s = 0; s < STEP_COUNT; s++)
                for (int a = 0; a < ACTION_COUNT; a++)
                    seconds[count++] = run_fault(ranks, rank, &STEPS[s], ACTIONS[a]);
    char label[96];
    snprintf(label, sizeof label, "fault matrix, %d ranks, %d rounds, start to exit",
             ranks, rounds);
    log_distribution(label, seconds, count);
    free(seconds);
}

Test(faults, matrix_two_ranks, .timeout = 300, .fini = kill_started_groups)
{
    run_matrix(2);
}

Test(faults, matrix_three_ranks, .timeout = 300, .fini = kill_started_groups)
{
    run_matrix(3);
}

/* ---- stop time after a death ------------------------------------------ */

/* Starts a run in which rank `rank` stalls on entering `step`, and waits
 * until every rank sleeps. */
static void start_stalled(struct moe_ep_process *p, int ranks, int rank,
                          const char *step, pid_t *stalled, pid_t *peers)
{
    char fault[64], ranks_text[8];
    snprintf(fault, sizeof fault, "%d:%s:stall", rank, step);
    snprintf(ranks_text, sizeof ranks_text, "%d", ranks);
    start_moe_ep(p, fault, (const char *[]){"run", TINY, "--ranks", ranks_text, NULL});
    wait_for_stall(p, ranks, stalled, peers);
}

Test(faults, peers_stop_fast_after_kill, .timeout = 120, .fini = kill_started_groups)
{
    /* The stalled rank is killed while its peers wait on it, so the abort
     * flag alone must stop them. */
    become_subreaper();
    static const int signals[] = {SIGKILL, SIGSEGV, SIGTERM};
    double seconds[2 * STEP_COUNT * 3];
    int count = 0;
    for (int ranks = 2; ranks <= 3; ranks++)
        for (int s = 0; s < STEP_COUNT; s++)
            for (int i = 0; i < 3; i++) {
                int rank = (s + i) % ranks, sig = signals[i];
                struct moe_ep_process p;
                struct outcome o;
                pid_t stalled, peers[8];
                start_stalled(&p, ranks, rank, STEPS[s].fault_name, &stalled, peers);
                double killed_s = now_s();
                cr_assert_eq(kill(stalled, sig), 0);
                wait_moe_ep(&p, 30, &o);

                char label[96], line[192];
                snprintf(label, sizeof label, "%d ranks, rank %d stalled in %s, "
                         "signal %d", ranks, rank, STEPS[s].fault_name, sig);
                cr_assert_eq(o.status, 3, "%s: status %d: %s", label, o.status, o.err);
                snprintf(line, sizeof line, "moe-ep run: rank %d (pid %ld) was "
                         "killed by signal %d (%s) in %s\n", rank, (long)stalled,
                         sig, strsignal(sig), STEPS[s].message_name);
                cr_assert(strncmp(o.err, line, strlen(line)) == 0,
                          "%s: stderr does not start with '%s': %s", label, line, o.err);
                seconds[count] = p.exit_s - killed_s;
                cr_assert_lt(seconds[count], STOP_LIMIT_S, "%s: stopped %.3f s "
                             "after the kill", label, seconds[count]);
                count++;
                assert_nothing_left(&p, label);
            }
    log_distribution("kill of a stalled rank with every peer waiting, kill to exit",
                     seconds, count);
}

Test(faults, busy_rank_killed_after_grace, .timeout = 60, .fini = kill_started_groups)
{
    /* A waiting peer dies while the stalled rank sits outside any wait
     * (as a rank inside a long GEMM would), so the stalled rank never checks
     * the abort flag and the launcher must kill it after its 1 s grace. */
    become_subreaper();
    double seconds[2];
    for (int ranks = 2; ranks <= 3; ranks++) {
        struct moe_ep_process p;
        struct outcome o;
        pid_t stalled, peers[8];
        start_stalled(&p, ranks, 0, "compute", &stalled, peers);
        double killed_s = now_s();
        cr_assert_eq(kill(peers[0], SIGKILL), 0);
        wait_moe_ep(&p, 30, &o);

        char label[64], line[192];
        snprintf(label, sizeof label, "%d ranks, rank 0 stalled in compute", ranks);
        cr_assert_eq(o.status, 3, "%s: status %d: %s", label, o.status, o.err);
        snprintf(line, sizeof line, "(pid %ld) was killed by signal %d (%s) in ",
                 (long)peers[0], SIGKILL, strsignal(SIGKILL));
        cr_assert_not_null(strstr(o.err, line), "%s: stderr lacks '%s': %s", label,
                           line, o.err);
        snprintf(line, sizeof line, "rank 0 (pid %ld) was still in compute 1 s "
                 "after the run was aborted, so the launcher killed it",
                 (long)stalled);
        cr_assert_not_null(strstr(o.err, line), "%s: stderr lacks '%s': %s", label,
                           line, o.err);
        seconds[ranks - 2] = p.exit_s - killed_s;
        cr_assert_lt(seconds[ranks - 2], STOP_LIMIT_S, "%s: stopped %.3f s after "
                     "the kill", label, seconds[ranks - 2]);
        assert_nothing_left(&p, label);
    }
    cr_log_info("kill of a peer with a rank outside any wait, kill to exit: "
                "%.1f ms (2 ranks), %.1f ms (3 ranks)", seconds[0] * 1e3,
                seconds[1] * 1e3);
}

/* Starts a run of many small forwards, so that the ranks are busy in every
 * step when the test strikes, and waits until its ranks exist. */
static void start_busy(struct moe_ep_process *p, int ranks, pid_t *rank_pids)
{
    char ranks_text[8];
    snprintf(ranks_text, sizeof ranks_text, "%d", ranks);
    start_moe_ep(p, NULL, (const char *[]){"run", "--steps", "100000", "--tokens", "64",
                                           "--hidden", "32", "--ffn", "32", "--timeout",
                                           "5", "--ranks", ranks_text, NULL});
    for (double deadline = now_s() + 10; now_s() < deadline; usleep(2000))
        if (list_processes(p->pid, 1, rank_pids, 8) == ranks)
            break;
    cr_assert_eq(list_processes(p->pid, 1, rank_pids, 8), ranks,
                 "the ranks of moe-ep (pid %ld) did not start", (long)p->pid);
    usleep(100 * 1000); /* into the forwards */
}

Test(faults, kill_during_busy_run, .timeout = 60, .fini = kill_started_groups)
{
    /* A rank dies at an arbitrary point of a busy run, where its peers may
     * be computing or exchanging. */
    become_subreaper();
    double seconds[10];
    for (int i = 0; i < 10; i++) {
        int ranks = 2 + i % 2;
        struct moe_ep_process p;
        struct outcome o;
        pid_t rank_pids[8];
        start_busy(&p, ranks, rank_pids);
        pid_t victim = rank_pids[i % ranks];
        double killed_s = now_s();
        cr_assert_eq(kill(victim, SIGKILL), 0);
        wait_moe_ep(&p, 30, &o);

        char label[64], line[96];
        snprintf(label, sizeof label, "%d ranks, kill %d of a busy run", ranks, i);
        cr_assert_eq(o.status, 3, "%s: status %d: %s", label, o.status, o.err);
        snprintf(line, sizeof line, "(pid %ld) was killed by signal %d (%s) in ",
                 (long)victim, SIGKILL, strsignal(SIGKILL));
        cr_assert_not_null(strstr(o.err, line), "%s: stderr lacks '%s': %s", label,
                           line, o.err);
        cr_assert_null(strstr(o.err, "after the run was aborted"),
                       "%s: a peer ignored the abort flag: %s", label, o.err);
        seconds[i] = p.exit_s - killed_s;
        cr_assert_lt(seconds[i], STOP_LIMIT_S, "%s: stopped %.3f s after the kill",
                     label, seconds[i]);
        assert_nothing_left(&p, label);
    }
    log_distribution("kill of a rank in a busy run, kill to exit", seconds, 10);
}

/* ---- signals to the launcher ------------------------------------------ */

/* Sends sig to the launcher of a stalled 3-rank run, or to its whole
 * process group as a terminal's Ctrl-C does, and checks that it exits
 * with 128 + sig within the stop limit and leaves nothing. */
static void check_launcher_signal(int sig, int to_group)
{
    become_subreaper();
    struct moe_ep_process p;
    struct outcome o;
    pid_t stalled, peers[8];
    start_stalled(&p, 3, 1, "dispatch", &stalled, peers);
    double sent_s = now_s();
    cr_assert_eq(kill(to_group ? -p.pid : p.pid, sig), 0);
    wait_moe_ep(&p, 30, &o);

    char label[64], line[96];
    snprintf(label, sizeof label, "signal %d to the launcher%s", sig,
             to_group ? "'s group" : "");
    cr_assert_eq(o.status, 128 + sig, "%s: status %d: %s", label, o.status, o.err);
    snprintf(line, sizeof line, "stopped by signal %d (%s)", sig, strsignal(sig));
    cr_assert_not_null(strstr(o.err, line), "%s: stderr lacks '%s': %s", label,
                       line, o.err);
    double stop_s = p.exit_s - sent_s;
    cr_assert_lt(stop_s, STOP_LIMIT_S, "%s: exited %.3f s after the signal", label,
                 stop_s);
    assert_nothing_left(&p, label);
    cr_log_info("%s: exit %.1f ms after the signal", label, stop_s * 1e3);
}

Test(launcher, sigint_exits_130, .timeout = 60, .fini = kill_started_groups)
{
    check_launcher_signal(SIGINT, 0);
}

Test(launcher, sigint_to_group_exits_130, .timeout = 60, .fini = kill_started_groups)
{
    check_launcher_signal(SIGINT, 1);
}

Test(launcher, sigterm_exits_143, .timeout = 60, .fini = kill_started_groups)
{
    check_launcher_signal(SIGTERM, 0);
}

Test(launcher, sigterm_to_group_exits_143, .timeout = 60, .fini = kill_started_groups)
{
    check_launcher_signal(SIGTERM, 1);
}

Test(launcher, sighup_exits_129, .timeout = 60, .fini = kill_started_groups)
{
    check_launcher_signal(SIGHUP, 0);
}

Test(launcher, sighup_to_group_exits_129, .timeout = 60, .fini = kill_started_groups)
{
    check_launcher_signal(SIGHUP, 1);
}

Test(launcher, sigint_during_busy_run, .timeout = 60, .fini = kill_started_groups)
{
    /* With no rank stalled, every rank stops on the abort flag at once. */
    become_subreaper();
    struct moe_ep_process p;
    struct outcome o;
    pid_t rank_pids[8];
    start_busy(&p, 3, rank_pids);
    double sent_s = now_s();
    cr_assert_eq(kill(p.pid, SIGINT), 0);
    wait_moe_ep(&p, 30, &o);
    cr_assert_eq(o.status, 128 + SIGINT, "status %d: %s", o.status, o.err);
    cr_assert_null(strstr(o.err, "after the run was aborted"),
                   "a rank ignored the abort flag: %s", o.err);
    double stop_s = p.exit_s - sent_s;
    cr_assert_lt(stop_s, STOP_LIMIT_S, "exited %.3f s after SIGINT", stop_s);
    assert_nothing_left(&p, "SIGINT during a busy run");
    cr_log_info("SIGINT to the launcher of a busy run: exit %.1f ms after the "
                "signal", stop_s * 1e3);
}

Test(launcher, sigkill_stops_every_rank, .timeout = 60, .fini = kill_started_groups)
{
    /* The ranks get SIGKILL through PR_SET_PDEATHSIG and, orphaned, become
     * children of this subreaper, which reaps them. */
    become_subreaper();
    for (int ranks = 2; ranks <= 3; ranks++) {
        struct moe_ep_process p;
        pid_t stalled, peers[8];
        start_stalled(&p, ranks, ranks - 1, "combine", &stalled, peers);
        double killed_s = now_s();
        cr_assert_eq(kill(p.pid, SIGKILL), 0);
        int status;
        cr_assert_eq(waitpid(p.pid, &status, 0), p.pid);
        close(p.pidfd);
        unlink(p.out_path);
        unlink(p.err_path);
        cr_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);

        double gone_s = 0;
        while (now_s() < killed_s + STOP_LIMIT_S) {
            while (waitpid(-p.pid, NULL, WNOHANG) > 0)
                continue;
            errno = 0;
            if (kill(-p.pid, 0) != 0 && errno == ESRCH) {
                gone_s = now_s();
                break;
            }
            usleep(1000);
        }
        cr_assert_gt(gone_s, 0, "%d ranks: ranks still alive %.0f s after the "
                     "launcher was killed", ranks, STOP_LIMIT_S);
        assert_nothing_left(&p, "SIGKILL to the launcher");
        cr_log_info("SIGKILL to the launcher of %d ranks: every rank gone after "
                    "%.1f ms", ranks, (gone_s - killed_s) * 1e3);
    }
}

/* ---- moe-ep clean ------------------------------------------------------ */

/* Names this test created in /dev/shm, for remove_planted(). */
static char planted[8][64];
static int planted_count;

static void remember_segment(const char *name)
{
    if (planted_count < (int)(sizeof planted / sizeof planted[0]))
        snprintf(planted[planted_count++], sizeof planted[0], "%s", name);
}

/* Removes every name this test created that clean left. */
static void unlink_planted(void)
{
    for (int i = 0; i < planted_count; i++) {
        char path[sizeof planted + 2];
        snprintf(path, sizeof path, "/%s", planted[i]);
        shm_unlink(path);
    }
    planted_count = 0;
}

/* Runs after the clean test, even one that failed: ends its processes and
 * removes its names. */
static void remove_planted(void)
{
    kill_started_groups();
    unlink_planted();
}

/* A child process that sleeps until killed, optionally holding the segment
 * `name` (its own pid is put in the name) open like a launcher between
 * shm_open() and shm_unlink(). */
struct sleeper {
    pid_t pid;
    char name[64]; /* without the leading '/' */
};

static void start_sleeper(struct sleeper *s, int hold_segment, const char *nonce)
{
    int ready[2];
    cr_assert_eq(pipe(ready), 0);
    s->pid = fork();
    cr_assert_geq(s->pid, 0);
    if (s->pid == 0) {
        setpgid(0, 0);
        if (hold_segment) {
            char name[64];
            snprintf(name, sizeof name, "/moe-ep-%ld-%s", (long)getpid(), nonce);
            if (shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600) < 0)
                _exit(1);
        }
        if (write(ready[1], "x", 1) != 1)
            _exit(1);
        for (;;)
            pause();
    }
    /* In a group of its own, so that kill_started_groups() ends it. */
    setpgid(s->pid, s->pid);
    started_groups[started_count++] = s->pid;
    snprintf(s->name, sizeof s->name, "moe-ep-%ld-%s", (long)s->pid, nonce);
    if (hold_segment)
        remember_segment(s->name);
    char byte;
    close(ready[1]);
    cr_assert_eq(read(ready[0], &byte, 1), 1, "the sleeper failed to start");
    close(ready[0]);
}

static void stop_sleeper(struct sleeper *s)
{
    kill(s->pid, SIGKILL);
    waitpid(s->pid, NULL, 0);
    forget_group(s->pid);
}

/* Creates /dev/shm/NAME as shm_open() would. */
static void plant_segment(const char *name)
{
    remember_segment(name);
    char path[96];
    snprintf(path, sizeof path, "/%s", name);
    int fd = shm_open(path, O_CREAT | O_EXCL | O_RDWR, 0600);
    cr_assert_geq(fd, 0, "shm_open %s: %s", path, strerror(errno));
    cr_assert_eq(ftruncate(fd, 8192), 0);
    close(fd);
}

static int segment_exists(const char *name)
{
    char path[96];
    snprintf(path, sizeof path, "/dev/shm/%s", name);
    return access(path, F_OK) == 0;
}


Test(clean, removes_stale_keeps_live, .timeout = 60, .fini = remove_planted)
{
    /* dead: no process can have its pid. reused: a process that does not
     * have the segment open has its pid, as after pid reuse. live: the
     * process with its pid has it open, as a launcher does until it unlinks
     * the name. The last two names are not of the launcher's form. A
     * stalled run goes on meanwhile, and clean must neither stop it nor
     * name it. All of this is one test because a second test running clean
     * in parallel would remove this test's names. */
    become_subreaper();
    struct moe_ep_process run;
    pid_t stalled, peers[8];
    start_stalled(&run, 2, 0, "dispatch", &stalled, peers);

    struct sleeper reused, live;
    start_sleeper(&reused, 0, "f2f2f2f2f2f2f201");
    start_sleeper(&live, 1, "f2f2f2f2f2f2f202");
    char dead[64], zero_pid[64], short_nonce[64], run_name[64], line[192];
    snprintf(dead, sizeof dead, "moe-ep-%ld-f2f2f2f2f2f2f203", UNUSED_PID);
    snprintf(zero_pid, sizeof zero_pid, "moe-ep-0%ld-f2f2f2f2f2f2f204", UNUSED_PID);
    snprintf(short_nonce, sizeof short_nonce, "moe-ep-%ld-f2f2", UNUSED_PID);
    snprintf(run_name, sizeof run_name, "moe-ep-%ld-", (long)run.pid);
    plant_segment(reused.name);
    plant_segment(dead);
    plant_segment(zero_pid);
    plant_segment(short_nonce);

    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"clean", "--dry-run", NULL});
    cr_expect_eq(o.status, 0, "stderr: %s", o.err);
    snprintf(line, sizeof line, "would remove /dev/shm/%s (0.0 MiB): no process "
             "has pid %ld\n", dead, UNUSED_PID);
    cr_expect_not_null(strstr(o.out, line), "stdout lacks '%s': %s", line, o.out);
    snprintf(line, sizeof line, "would remove /dev/shm/%s (0.0 MiB): pid %ld "
             "(test_faults) neither has the segment open nor maps it", reused.name,
             (long)reused.pid);
    cr_expect_not_null(strstr(o.out, line), "stdout lacks '%s': %s", line, o.out);
    snprintf(line, sizeof line, "kept /dev/shm/%s (0.0 MiB): pid %ld "
             "(test_faults) has the segment open or mapped", live.name,
             (long)live.pid);
    cr_expect_not_null(strstr(o.out, line), "stdout lacks '%s': %s", line, o.out);
    snprintf(line, sizeof line, "/dev/shm/%s ", zero_pid);
    cr_expect_null(strstr(o.out, line), "%s", o.out);
    snprintf(line, sizeof line, "/dev/shm/%s ", short_nonce);
    cr_expect_null(strstr(o.out, line), "%s", o.out);
    cr_expect(segment_exists(dead) && segment_exists(reused.name),
              "--dry-run removed a segment");

    run_program(&o, NULL, 0, 0, (const char *[]){"clean", NULL});
    cr_expect_eq(o.status, 0, "stderr: %s", o.err);
    snprintf(line, sizeof line, "removed /dev/shm/%s", dead);
    cr_expect_not_null(strstr(o.out, line), "stdout lacks '%s': %s", line, o.out);
    snprintf(line, sizeof line, "removed /dev/shm/%s", reused.name);
    cr_expect_not_null(strstr(o.out, line), "stdout lacks '%s': %s", line, o.out);
    cr_expect(!segment_exists(dead), "the dead launcher's segment is still there");
    cr_expect(!segment_exists(reused.name), "the reused pid's segment is still there");
    cr_expect(segment_exists(live.name), "the live run's segment was removed");
    cr_expect(segment_exists(zero_pid) && segment_exists(short_nonce),
              "a name not of the launcher's form was removed");
    cr_expect_null(strstr(o.out, run_name), "clean named the stalled run: %s", o.out);
    pid_t ranks[8];
    cr_expect_eq(list_processes(run.pid, 1, ranks, 8), 2, "clean stopped a rank");

    /* Once its process is gone, the live segment is stale too. */
    stop_sleeper(&live);
    run_program(&o, NULL, 0, 0, (const char *[]){"clean", NULL});
    cr_expect_eq(o.status, 0, "stderr: %s", o.err);
    cr_expect(!segment_exists(live.name), "the segment of a dead holder is still there");

    stop_sleeper(&reused);
    unlink_planted();

    cr_assert_eq(kill(run.pid, SIGTERM), 0);
    wait_moe_ep(&run, 30, &o);
    cr_assert_eq(o.status, 128 + SIGTERM, "stderr: %s", o.err);
    assert_nothing_left(&run, "clean during a run");
}

/* The golden check runs in the launcher after the ranks have exited, so a
 * death there is the launcher's own: its status is that of the signal or
 * exit, and nothing may be left behind. */
Test(faults, launcher_dies_in_golden_check, .timeout = 60, .fini = kill_started_groups)
{
    become_subreaper();
    static const struct {
        const char *action;
        int status;
    } cases[] = {{"kill", 128 + SIGKILL}, {"segv", 128 + SIGSEGV}, {"exit", 1}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char fault[64];
        snprintf(fault, sizeof fault, "launcher:golden:%s", cases[i].action);
        struct moe_ep_process p;
        start_moe_ep(&p, fault, (const char *[]){"run", "--ranks", "3", TINY, NULL});
        struct outcome o;
        wait_moe_ep(&p, STOP_LIMIT_S, &o);
        cr_assert_eq(o.status, cases[i].status, "%s: %s%s", fault, o.out, o.err);
        cr_assert_null(strstr(o.out, "golden check:"), "%s: %s", fault, o.out);
        assert_nothing_left(&p, fault);
    }
}

/* With the launcher stopped, no process sets the abort flag, so the peers
 * of a dead rank must detect by themselves that it no longer runs. */
Test(faults, peers_notice_death_without_launcher, .timeout = 60,
     .fini = kill_started_groups)
{
    become_subreaper();
    struct moe_ep_process p;
    pid_t stalled, peers[8];
    start_stalled(&p, 3, 1, "dispatch", &stalled, peers);
    cr_assert_eq(kill(p.pid, SIGSTOP), 0);
    double killed_s = now_s();
    cr_assert_eq(kill(stalled, SIGKILL), 0);

    /* Both peers exit, and stay zombies of the stopped launcher. */
    int exited = 0;
    double seconds = 0;
    while (!exited && (seconds = now_s() - killed_s) < STOP_LIMIT_S) {
        usleep(5000);
        exited = 1;
        for (int i = 0; i < 2; i++) {
            char state;
            pid_t parent, group;
            if (read_stat(peers[i], &state, &parent, &group) == 0 && state != 'Z')
                exited = 0;
        }
    }
    cr_assert(exited, "the peers still ran %.3f s after rank 1 died", seconds);
    cr_log_info("peers of a dead rank, launcher stopped: exited %.3f s after the kill",
                seconds);

    cr_assert_eq(kill(p.pid, SIGCONT), 0);
    struct outcome o;
    wait_moe_ep(&p, 30, &o);
    cr_assert_eq(o.status, 3, "%s", o.err);
    char line[192];
    snprintf(line, sizeof line, "moe-ep run: rank 1 (pid %ld) was killed by signal %d "
             "(%s) in dispatch\n", (long)stalled, SIGKILL, strsignal(SIGKILL));
    cr_assert(strncmp(o.err, line, strlen(line)) == 0, "stderr: %s", o.err);
    assert_nothing_left(&p, "launcher stopped while a rank died");
}
