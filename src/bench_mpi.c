/*
 * bench_mpi.c - `moe-ep bench --transport mpi`: the forward and all-to-all
 * figures of `moe-ep bench` over MPI and, in the same run, on the
 * shared-memory rings, so that the two transports can be set side by side.
 *
 * Runs in every process of `mpirun -np R moe-ep bench --transport mpi`, at
 * the rank count mpirun gives. While MPI runs, every rank takes part in:
 *   - the layer's steady-state forward, measured as the forward table of
 *     `moe-ep bench` measures it (bench_layer.c). One warm-up forward runs
 *     first, then `repeats` forwards with the same buffers, each after a
 *     barrier. A forward's time is the max over the ranks of the sum of
 *     its step times. Each rank draws only the weights of its experts.
 *   - the all-to-all at the sizes and by the timing rule of the shm bench
 *     (moe_bench_internal.h), once through moe_transport_alltoallv(), the
 *     call the layer makes, and once through MPI_Alltoallv alone.
 * After MPI_Finalize the other ranks return, and rank 0 alone measures,
 * with the shm bench's own code, the expert-GEMM floor and the same
 * forward and all-to-all on the rings with R ranks that it forks. mpirun
 * binds each rank to one core for -np 2 or less, so rank 0 first lets all
 * of its threads run on every online core again, as the shm bench's
 * processes do. It skips these figures when the job spans several hosts
 * or when that fails. Rank 0 then prints the report and writes --markdown.
 *
 * With --alltoall-json the job times MPI_Alltoallv alone. After
 * MPI_Finalize, rank 0 prints one JSON line per size in place of the report
 * and the local figures, for `moe-ep bench --peers` (bench_peers.c).
 *
 * A failure while MPI runs is written to stderr by the rank that failed,
 * which then ends the job with MPI_Abort, because returning would leave
 * the other ranks waiting in a collective. The bare MPI_Alltoallv calls
 * are not covered by the transport's timeout watchdog.
 *
 * The file also finds the side-by-side sections in an existing report
 * (moe_bench_read_kept_sections), so that `moe-ep bench --markdown` keeps
 * what `make bench-mpi` added to docs/BENCHMARKS.md.
 */
#define _GNU_SOURCE /* sched_getaffinity, sched_setaffinity and CPU_COUNT */

#include "moe_bench_internal.h"
#include "moe_bench_peers.h"
#include "moe_error.h"
#include "moe_file.h"
#include "moe_transport.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* Largest report whose side-by-side sections are kept. */
#define MAX_KEPT_REPORT_BYTES (16u << 20)

int moe_bench_read_kept_sections(const char *path, char **text, size_t *bytes)
{
    *text = NULL;
    *bytes = 0;
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode))
        return 0; /* a new file, a device or a FIFO: nothing to keep */
    char *old = NULL;
    size_t length = 0;
    int rc = moe_read_small_file(path, MAX_KEPT_REPORT_BYTES, &old, &length);
    if (rc)
        return rc;

    const char *heading = MOE_BENCH_SIDE_BY_SIDE_HEADING;
    size_t heading_length = strlen(heading);
    char *start = NULL;
    if (!strncmp(old, heading, heading_length)) {
        start = old;
    } else {
        for (char *p = strstr(old, heading); p; p = strstr(p + 1, heading))
            if (p[-1] == '\n') {
                start = p;
                break;
            }
    }
    if (!start) {
        free(old);
        return 0;
    }
    *bytes = length - (size_t)(start - old);
    memmove(old, start, *bytes + 1);
    *text = old;
    return 0;
}

#if MOE_HAVE_MPI

#include "moe_dist.h"
#include "moe_launch.h"

#include <dirent.h>
#include <mpi.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

/* A collective that has not returned after this long ends the job. */
static const int64_t BENCH_TIMEOUT_NS = 60LL * 1000 * 1000 * 1000;

enum { SIZE_COUNT = 5, MAX_HOST_NAME = 256 };

/* ---- all-to-all over MPI ----------------------------------------------- */

/* The call that a row times. */
enum call {
    CALL_TRANSPORT, /* moe_transport_alltoallv */
    CALL_BARE,      /* MPI_Alltoallv on MPI_COMM_WORLD */
    CALL_COUNT
};

static const char *const CALL_NAMES[CALL_COUNT] = {
    "`moe_transport_alltoallv`", "`MPI_Alltoallv` alone"};

/* One rank's buffers: block p of send and recv starts at p x max_bytes. */
struct alltoall_state {
    struct moe_transport *t;
    enum call call;
    uint8_t *send, *recv;                 /* (R, max_bytes) each */
    uint64_t *send_bytes, *send_offsets, *recv_bytes, *recv_offsets; /* (R) */
    int *counts, *displs;                 /* (R) the same sizes as int */
};

static int run_call(struct alltoall_state *a)
{
    if (a->call == CALL_TRANSPORT)
        return moe_transport_alltoallv(a->t, a->send, a->send_bytes,
                                       a->send_offsets, a->recv, a->recv_bytes,
                                       a->recv_offsets);
    int rc = MPI_Alltoallv(a->send, a->counts, a->displs, MPI_BYTE, a->recv,
                           a->counts, a->displs, MPI_BYTE, MPI_COMM_WORLD);
    if (rc != MPI_SUCCESS)
        return moe_fail(-EIO, "rank %d: MPI_Alltoallv failed with MPI error "
                        "code %d", a->t->rank, rc);
    return 0;
}

/* Runs `calls` calls and stores in *slowest_ns the longest time any rank
 * took for them. */
static int probe(struct alltoall_state *a, int64_t calls, int64_t *slowest_ns)
{
    int R = a->t->ranks, rc = 0;
    int64_t start = moe_now_ns();
    for (int64_t i = 0; rc == 0 && i < calls; i++)
        rc = run_call(a);
    if (rc)
        return rc;
    int64_t elapsed_ns = moe_now_ns() - start;
    int64_t *all_ns = malloc((size_t)R * sizeof *all_ns);
    if (!all_ns)
        return moe_fail(-ENOMEM, "rank %d: out of memory", a->t->rank);
    rc = moe_transport_allgather(a->t, &elapsed_ns, sizeof elapsed_ns, all_ns);
    *slowest_ns = 0;
    for (int r = 0; rc == 0 && r < R; r++)
        if (all_ns[r] > *slowest_ns)
            *slowest_ns = all_ns[r];
    free(all_ns);
    return rc;
}

/* Times the call by the timing rule. On return, per_call_ns[rep] is the
 * slowest rank's time of loop rep divided by *calls, on every rank. */
static int time_call(struct alltoall_state *a, int repeats, int64_t loop_ns,
                     int64_t *calls, double *per_call_ns)
{
    int R = a->t->ranks;
    int rc = run_call(a);
    int64_t probe_calls = 1, slowest_ns = 0;
    while (rc == 0) {
        if ((rc = probe(a, probe_calls, &slowest_ns)))
            break;
        if (moe_bench_probe_done(probe_calls, slowest_ns, loop_ns))
            break;
        probe_calls *= 2;
    }
    if (rc)
        return rc;
    *calls = moe_bench_calls_for(loop_ns, slowest_ns / probe_calls);

    int64_t mine_ns[MOE_BENCH_MAX_REPEATS] = {0};
    for (int rep = 0; rc == 0 && rep < repeats; rep++) {
        if ((rc = moe_transport_barrier(a->t)))
            return rc;
        int64_t start = moe_now_ns();
        for (int64_t i = 0; rc == 0 && i < *calls; i++)
            rc = run_call(a);
        mine_ns[rep] = moe_now_ns() - start;
    }
    if (rc)
        return rc;

    int64_t *all_ns = malloc((size_t)R * sizeof mine_ns);
    if (!all_ns)
        return moe_fail(-ENOMEM, "rank %d: out of memory", a->t->rank);
    rc = moe_transport_allgather(a->t, mine_ns, sizeof mine_ns, all_ns);
    for (int rep = 0; rc == 0 && rep < repeats; rep++) {
        int64_t slowest = 0;
        for (int r = 0; r < R; r++)
            if (all_ns[r * MOE_BENCH_MAX_REPEATS + rep] > slowest)
                slowest = all_ns[r * MOE_BENCH_MAX_REPEATS + rep];
        per_call_ns[rep] = (double)slowest / (double)*calls;
    }
    free(all_ns);
    return rc;
}

/* The byte that rank src sends to rank dst, so that a misdelivered block
 * shows. */
static uint8_t pattern_byte(int src, int dst)
{
    return (uint8_t)(src * 31 + dst * 7 + 1);
}

static int check_received(const struct alltoall_state *a, uint64_t bytes,
                          uint64_t stride)
{
    int me = a->t->rank;
    for (int src = 0; src < a->t->ranks; src++) {
        if (src == me)
            continue;
        const uint8_t *block = a->recv + (uint64_t)src * stride;
        uint8_t expected = pattern_byte(src, me);
        for (uint64_t i = 0; i < bytes; i++)
            if (block[i] != expected)
                return moe_fail(-EPROTO, "rank %d: byte %" PRIu64 " of the "
                                "%" PRIu64 "-byte block from rank %d is %u, "
                                "expected %u", me, i, bytes, src, block[i],
                                expected);
    }
    return 0;
}

/* Measures one size with one call into *row (on every rank). */
static int measure_case(struct alltoall_state *a, const struct moe_bench_options *o,
                        uint64_t bytes, uint64_t max_bytes,
                        struct moe_bench_alltoall *row)
{
    int R = a->t->ranks, me = a->t->rank;
    for (int p = 0; p < R; p++) {
        a->send_bytes[p] = a->recv_bytes[p] = p == me ? 0 : bytes;
        a->send_offsets[p] = a->recv_offsets[p] = (uint64_t)p * max_bytes;
        a->counts[p] = (int)a->send_bytes[p];
        a->displs[p] = (int)a->send_offsets[p];
    }
    memset(a->recv, 0, (size_t)R * max_bytes);

    double per_call_ns[MOE_BENCH_MAX_REPEATS];
    int rc = time_call(a, o->repeats, moe_bench_loop_ns(o), &row->calls,
                       per_call_ns);
    if (rc == 0)
        rc = check_received(a, bytes, max_bytes);
    if (rc)
        return rc;

    double crossing = (double)R * (R - 1) * (double)bytes;
    double best_ns = moe_bench_min(per_call_ns, o->repeats);
    double median_ns = moe_bench_median(per_call_ns, o->repeats);
    row->ranks = R;
    row->bytes_per_pair = bytes;
    row->best_us = best_ns / 1e3;
    row->median_us = median_ns / 1e3;
    row->best_gbps = crossing / best_ns;
    row->median_gbps = crossing / median_ns;
    return 0;
}

/* Measures every size with the calls from `first` on. rows has SIZE_COUNT
 * x CALL_COUNT entries, row i x CALL_COUNT + c for size i and call c. */
static int measure_alltoall(struct moe_transport *t, const struct moe_bench_options *o,
                            enum call first, struct moe_bench_alltoall *rows)
{
    const uint64_t sizes[SIZE_COUNT] = {4 << 10, 64 << 10, 1 << 20, 4 << 20,
                                        (uint64_t)o->hidden * sizeof(float)};
    const int one_token_case = 4;
    uint64_t max_bytes = 0;
    for (int i = 0; i < SIZE_COUNT; i++)
        if (sizes[i] > max_bytes)
            max_bytes = sizes[i];
    int R = t->ranks;
    if ((uint64_t)R * max_bytes > INT32_MAX)
        return moe_fail(-EINVAL, "rank %d: %d ranks x %" PRIu64 " bytes do not "
                        "fit the int offsets of MPI_Alltoallv; use a smaller "
                        "--hidden or fewer ranks", t->rank, R, max_bytes);

    struct alltoall_state a = {
        .t = t,
        .send = malloc((size_t)R * max_bytes),
        .recv = malloc((size_t)R * max_bytes),
        .send_bytes = calloc(4 * (size_t)R, sizeof(uint64_t)),
        .counts = calloc(2 * (size_t)R, sizeof(int)),
    };
    int rc = 0;
    if (!a.send || !a.recv || !a.send_bytes || !a.counts) {
        rc = moe_fail(-ENOMEM, "rank %d: out of memory for all-to-all buffers "
                      "of %" PRIu64 " bytes", t->rank, R * max_bytes);
        goto out;
    }
    a.send_offsets = a.send_bytes + R;
    a.recv_bytes = a.send_bytes + 2 * R;
    a.recv_offsets = a.send_bytes + 3 * R;
    a.displs = a.counts + R;
    for (int dst = 0; dst < R; dst++)
        memset(a.send + (uint64_t)dst * max_bytes, pattern_byte(t->rank, dst),
               max_bytes);

    for (int i = 0; rc == 0 && i < SIZE_COUNT; i++)
        for (int c = first; rc == 0 && c < CALL_COUNT; c++) {
            a.call = (enum call)c;
            struct moe_bench_alltoall *row = &rows[i * CALL_COUNT + c];
            rc = measure_case(&a, o, sizes[i], max_bytes, row);
            row->one_token = i == one_token_case;
        }
out:
    free(a.send);
    free(a.recv);
    free(a.send_bytes);
    free(a.counts);
    return rc;
}

/* ---- forward over MPI -------------------------------------------------- */

/* Steps whose times add up to the forward, as in bench_layer.c. */
static const int FORWARD_STEPS[MOE_BENCH_FORWARD_STEPS] = {
    MOE_STEP_ROUTE, MOE_STEP_LAYOUT, MOE_STEP_DISPATCH, MOE_STEP_COMPUTE,
    MOE_STEP_COMBINE};

/* Index of each figure in one forward's times: the step sum, then each
 * step's time, then each step's wait. */
enum {
    TIME_SUM = 0,
    TIME_STEP_FIRST = 1,
    TIME_WAIT_FIRST = TIME_STEP_FIRST + MOE_BENCH_FORWARD_STEPS,
    TIMES_PER_FORWARD = TIME_WAIT_FIRST + MOE_BENCH_FORWARD_STEPS,
};

/* One rank's figures of the timed forwards, in ns, as the ranks gather
 * them. */
struct forward_times {
    int64_t received_rows; /* rows this rank gave its experts */
    int64_t ns[MOE_BENCH_MAX_REPEATS][TIMES_PER_FORWARD];
};

/* Copies the step times of the forward just run into repeat `rep`. */
static void record_forward(struct forward_times *mine,
                           const struct moe_rank_slot *slot, int rep)
{
    int64_t sum = 0;
    for (int k = 0; k < MOE_BENCH_FORWARD_STEPS; k++) {
        int step = FORWARD_STEPS[k];
        sum += (int64_t)slot->step_ns[step];
        mine->ns[rep][TIME_STEP_FIRST + k] = (int64_t)slot->step_ns[step];
        mine->ns[rep][TIME_WAIT_FIRST + k] = (int64_t)slot->wait_ns[step];
    }
    mine->ns[rep][TIME_SUM] = sum;
}

/* Returns the max over the R ranks of figure `index` of repeat `rep`. */
static int64_t max_over_ranks(const struct forward_times *all, int R, int rep,
                              int index)
{
    int64_t max_ns = 0;
    for (int r = 0; r < R; r++)
        if (all[r].ns[rep][index] > max_ns)
            max_ns = all[r].ns[rep][index];
    return max_ns;
}

/* Fills the steady-state columns of *row from every rank's times. */
static void reduce_forward(const struct forward_times *all, int R, int repeats,
                           struct moe_bench_forward *row)
{
    double steps_ns[MOE_BENCH_MAX_REPEATS];
    int best = 0;
    for (int rep = 0; rep < repeats; rep++) {
        steps_ns[rep] = (double)max_over_ranks(all, R, rep, TIME_SUM);
        if (steps_ns[rep] < steps_ns[best])
            best = rep;
    }
    *row = (struct moe_bench_forward){.ranks = R};
    for (int k = 0; k < MOE_BENCH_FORWARD_STEPS; k++) {
        row->step_ms[k] = (double)max_over_ranks(all, R, best, TIME_STEP_FIRST + k) / 1e6;
        row->wait_ms[k] = (double)max_over_ranks(all, R, best, TIME_WAIT_FIRST + k) / 1e6;
    }
    row->steps_best_ms = steps_ns[best] / 1e6;
    row->steps_median_ms = moe_bench_median(steps_ns, repeats) / 1e6;
    for (int r = 0; r < R; r++)
        if (all[r].received_rows > row->busiest_rows)
            row->busiest_rows = all[r].received_rows;
}

/* Runs the warm-up forward and the timed ones on this rank's state. */
static int run_forwards(struct moe_transport *t, const struct moe_dist_env *env,
                        const struct moe_dist_input *input, int repeats,
                        struct forward_times *mine)
{
    struct moe_dist_rank *rank;
    int rc = moe_dist_rank_new(env, input, &rank);
    if (rc)
        return rc;
    rc = moe_dist_forward(rank);
    for (int rep = 0; rc == 0 && rep < repeats; rep++) {
        rc = moe_transport_barrier(t);
        /* The forward adds its step times to the slot, so they start from
         * zero to leave this forward's times alone in the slot. */
        memset(env->slot->step_ns, 0, sizeof env->slot->step_ns);
        memset(env->slot->wait_ns, 0, sizeof env->slot->wait_ns);
        if (rc == 0)
            rc = moe_dist_forward(rank);
        if (rc == 0)
            record_forward(mine, env->slot, rep);
    }
    moe_dist_rank_free(rank);
    return rc;
}

/* Measures the steady-state forward over MPI. Every rank must call it;
 * *row is filled on every rank. */
static int measure_forward(struct moe_transport *t, const struct moe_bench_options *o,
                           struct moe_bench_forward *row)
{
    int R = t->ranks, me = t->rank;
    struct moe_shape shape = {.tokens = o->tokens, .hidden = o->hidden,
                              .ffn = o->ffn, .experts = o->experts,
                              .top_k = o->top_k};
    int64_t T = shape.tokens, H = shape.hidden;
    struct moe_weights weights = {0};
    float *tokens = NULL;
    void *area = NULL;
    struct forward_times *mine = calloc(1, sizeof *mine);
    struct forward_times *all = calloc((size_t)R, sizeof *all);
    if (!mine || !all) {
        free(mine);
        free(all);
        return moe_fail(-ENOMEM, "rank %d: out of memory", me);
    }

    /* The weights of this rank's experts and its block of tokens. */
    int64_t first, count;
    moe_block_range(shape.experts, R, me, &first, &count);
    int rc = moe_weights_alloc_experts(&weights, &shape, first, count, 0, 0);
    if (rc)
        goto out;
    moe_weights_fill_random(&weights, MOE_BENCH_SEED);
    tokens = moe_alloc_large((size_t)(T * H) * sizeof(float));
    uint64_t area_bytes = moe_run_area_bytes(&shape, R, NULL);
    area = area_bytes ? moe_alloc_large((size_t)area_bytes) : NULL;
    if (!tokens || !area) {
        rc = moe_fail(-ENOMEM, "rank %d: out of memory for %" PRId64 " tokens "
                      "of %" PRId64 " floats and their output", me, T, H);
        goto out;
    }
    moe_block_range(T, R, me, &first, &count);
    moe_tokens_random(tokens + first * H, first, count, H, MOE_BENCH_SEED);
    memset(area, 0, (size_t)area_bytes);
    moe_run_area_init(area, &shape, R, NULL);

    struct moe_rank_slot slot;
    memset(&slot, 0, sizeof slot);
    struct moe_dist_input input = {.weights = &weights, .tokens = tokens};
    struct moe_dist_env env = {.transport = t, .area = area,
                               .area_capacity = area_bytes, .slot = &slot};
    rc = run_forwards(t, &env, &input, o->repeats, mine);
    if (rc)
        goto out;
    mine->received_rows = moe_run_area_report(area, me)->received_rows;
    if ((rc = moe_transport_allgather(t, mine, sizeof *mine, all)) == 0)
        reduce_forward(all, R, o->repeats, row);
out:
    free(mine);
    free(all);
    free(area);
    free(tokens);
    moe_weights_free(&weights);
    return rc;
}

/* ---- the job ----------------------------------------------------------- */

/* Facts about the job that rank 0 prints besides the figures. */
struct job {
    int ranks;
    int hosts; /* distinct MPI_Get_processor_name values */
    char first_host[MAX_HOST_NAME];
    char library[MPI_MAX_LIBRARY_VERSION_STRING];
    char date[64];
    char load[64];
    char cpu[256];     /* model name on rank 0's host */
    long cores;        /* online on rank 0's host */
    int mpi_cores;     /* cores rank 0 may run on while MPI runs, or 0 when
                          unknown */
};

/* Returns how many CPUs this process may run on, or 0 when unknown. */
static int allowed_cpus(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0)
        return 0;
    return CPU_COUNT(&set);
}

/* Fills *job; every rank must call it, because it gathers the host names. */
static int read_job(struct moe_transport *t, struct job *job)
{
    int R = t->ranks;
    char name[MAX_HOST_NAME] = {0};
    int length = 0;
    if (MPI_Get_processor_name(name, &length) != MPI_SUCCESS)
        snprintf(name, sizeof name, "unknown");
    char *all = malloc((size_t)R * MAX_HOST_NAME);
    if (!all)
        return moe_fail(-ENOMEM, "rank %d: out of memory", t->rank);
    int rc = moe_transport_allgather(t, name, MAX_HOST_NAME, all);

    *job = (struct job){.ranks = R};
    for (int r = 0; rc == 0 && r < R; r++) {
        int seen = 0;
        for (int q = 0; q < r && !seen; q++)
            seen = !strncmp(all + q * MAX_HOST_NAME, all + r * MAX_HOST_NAME,
                            MAX_HOST_NAME);
        job->hosts += !seen;
    }
    snprintf(job->first_host, sizeof job->first_host, "%s", name);
    free(all);

    int library_length = 0;
    MPI_Get_library_version(job->library, &library_length);
    job->library[strcspn(job->library, "\n")] = '\0';
    time_t now = time(NULL);
    struct tm utc;
    gmtime_r(&now, &utc);
    strftime(job->date, sizeof job->date, "%Y-%m-%d %H:%M UTC", &utc);
    snprintf(job->load, sizeof job->load, "unknown");
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        double one, five, fifteen;
        if (fscanf(f, "%lf %lf %lf", &one, &five, &fifteen) == 3)
            snprintf(job->load, sizeof job->load, "%.2f, %.2f, %.2f", one, five,
                     fifteen);
        fclose(f);
    }
    moe_bench_cpuinfo_value("model name", job->cpu, sizeof job->cpu);
    job->cores = sysconf(_SC_NPROCESSORS_ONLN);
    job->mpi_cores = allowed_cpus();
    return rc;
}

/* ---- rank 0 after MPI_Finalize: the floor and the rings ---------------- */

/* Figures that rank 0 measures alone after MPI_Finalize. */
struct local_figures {
    int measured;      /* 0 when skipped, and `skipped` gives the reason */
    char skipped[512];
    /* The floors, the forward at R ranks in forward[0], and the all-to-all
     * at R ranks. */
    struct moe_bench_results res;
};

/* Lets every thread of this process run on every online core, undoing
 * the binding that mpirun applied. OpenBLAS started its threads before
 * main, so each thread is set, not only the calling one. Returns how many
 * cores the calling thread may run on afterwards, or 0 when that fails. */
static int unbind_threads(long cores)
{
    cpu_set_t all;
    CPU_ZERO(&all);
    for (long cpu = 0; cpu < cores && cpu < CPU_SETSIZE; cpu++)
        CPU_SET(cpu, &all);
    DIR *tasks = opendir("/proc/self/task");
    if (!tasks)
        return 0;
    int failed = 0;
    for (struct dirent *entry; (entry = readdir(tasks)) != NULL;) {
        char *end;
        long tid = strtol(entry->d_name, &end, 10);
        if (*end != '\0' || tid <= 0)
            continue; /* "." and ".." */
        failed |= sched_setaffinity((pid_t)tid, sizeof all, &all) != 0;
    }
    closedir(tasks);
    return failed ? 0 : allowed_cpus();
}

/* Sets local->skipped when the floor and the rings cannot be measured
 * like for like on this job, after unbinding rank 0's threads. Returns
 * whether they can. */
static int can_measure_locally(const struct job *job, struct local_figures *local)
{
    int allowed = 0;
    if (job->hosts > 1)
        snprintf(local->skipped, sizeof local->skipped,
                 "the job spans %d hosts, and the rings and the floor cover "
                 "one", job->hosts);
    else if ((allowed = unbind_threads(job->cores)) < job->cores)
        snprintf(local->skipped, sizeof local->skipped,
                 "rank 0 can run on %d of the %ld online cores after trying "
                 "to undo mpirun's binding, and the ranks that it forks would "
                 "inherit that; run mpirun with --bind-to none", allowed,
                 job->cores);
    else
        return 1;
    return 0;
}

/* Measures, in this process alone, the floors, the forward and the
 * all-to-all on the rings at job->ranks ranks, in the order of the shm
 * bench. */
static int measure_locally(const struct moe_bench_options *o, const struct job *job,
                           struct local_figures *local)
{
    struct moe_bench_results *res = &local->res;
    long cores = job->cores < 1 ? 1 : job->cores;
    res->cores = cores > MOE_MAX_RANKS ? MOE_MAX_RANKS : (int)cores;
    int rc = moe_bench_measure_floors(o, res);
    if (rc == 0) {
        res->forward_count = 1;
        rc = moe_bench_measure_forward_steady(o, job->ranks, &res->forward[0]);
    }
    if (rc == 0)
        rc = moe_bench_measure_alltoall_at(o, job->ranks, res);
    if (rc == 0)
        rc = moe_bench_measure_sgemm_again(o, res);
    local->measured = rc == 0;
    return rc;
}

/* ---- report ------------------------------------------------------------ */

static void print_job(FILE *out, const struct moe_bench_options *o,
                      const struct job *job, const struct local_figures *local)
{
    fprintf(out,
        "# Shared memory and MPI side by side, %d ranks\n\n"
        "Generated by `mpirun -np %d moe-ep bench --transport mpi%s`. It "
        "measures the figures of `moe-ep bench` that involve the ranks, the "
        "layer's forward and the all-to-all, over MPI at the job's rank "
        "count. After `MPI_Finalize`, rank 0 measures the same figures on "
        "the shared-memory rings, with %d ranks that it forks, and the "
        "expert-GEMM floor, with the code of `moe-ep bench`. Both transports "
        "are thus measured on the same machine in the same run. The MPI "
        "ranks run where mpirun placed them, which binds each rank to one "
        "core for -np 2 or less. Before its own figures, rank 0 lets its "
        "threads run on every core again, so the shm ranks are not bound, "
        "as under `moe-ep bench`. Figures are "
        "the best of %d repetitions, with the median beside it. GB/s means "
        "10^9 bytes per second and GFLOP/s 10^9 floating-point operations "
        "per second.\n\n",
        job->ranks, job->ranks, o->quick ? " --quick" : "", job->ranks,
        o->repeats);
    if (!local->measured)
        fprintf(out, "The shared-memory figures and the floor were not "
                "measured: %s.\n\n", local->skipped);

    fprintf(out, "| item | value |\n|---|---|\n");
    fprintf(out, "| date | %s |\n", job->date);
    fprintf(out, "| CPU (/proc/cpuinfo) | %s |\n", job->cpu);
    fprintf(out, "| cores online on rank 0's host | %ld |\n", job->cores);
    fprintf(out, "| cores rank 0 may run on while MPI runs (sched_getaffinity) "
            "| %d |\n", job->mpi_cores);
    fprintf(out, "| MPI library | %s |\n", job->library);
    fprintf(out, "| ranks (mpirun -np) | %d |\n", job->ranks);
    fprintf(out, "| hosts | %d (rank 0 on %s) |\n", job->hosts, job->first_host);
    fprintf(out, "| load average before the run (1, 5, 15 min) | %s |\n\n",
            job->load);
}

/* Prints a ratio to the floor, or "-" without a floor. */
static void print_ratio(FILE *out, double ms, const struct local_figures *local)
{
    if (local->measured && local->res.floor_ms > 0)
        fprintf(out, " %.2f |", ms / local->res.floor_ms);
    else
        fprintf(out, " - |");
}

static void print_floor(FILE *out, const struct moe_bench_options *o,
                        const struct local_figures *local)
{
    const struct moe_bench_results *res = &local->res;
    double layer_gflop = 6.0 * (double)(o->tokens * o->top_k) * (double)o->hidden *
                         (double)o->ffn / 1e9;
    fprintf(out,
        "Ratios divide by the expert-GEMM floor, **%.1f ms**: the layer's "
        "expert FLOPs, 2 x 3 x (T x K) x H x F = %.2f GFLOP, at the highest "
        "all-core sgemm rate that rank 0 measured on the layer's expert GEMM "
        "shapes (M = %" PRId64 " rows), as `moe-ep bench` measures it: "
        "%.1f GFLOP/s with %d OpenBLAS threads in one process, %.1f and %.1f "
        "GFLOP/s with %d processes of one thread before and after the "
        "shared-memory figures. One thread alone reached %.1f GFLOP/s.\n\n",
        res->floor_ms, layer_gflop, res->gemm_rows, res->sgemm_threads_gflops,
        res->cores, res->sgemm_procs_gflops, res->sgemm_again_gflops,
        res->cores, res->sgemm_one_gflops);
}

static void print_forward(FILE *out, const struct moe_bench_options *o,
                          const struct moe_bench_forward *mpi,
                          const struct local_figures *local)
{
    const struct moe_bench_forward *shm = local->measured ? &local->res.forward[0] : NULL;
    fprintf(out,
        "## Forward\n\n"
        "The layer: T %" PRId64 ", H %" PRId64 ", F %" PRId64 ", E %" PRId64
        ", K %" PRId64 ", seed %d. A forward's time is the max over the ranks "
        "of the sum of a rank's step times, route to combine. The forwards "
        "run in one job: one warm-up forward, then %d forwards with the same "
        "buffers, each after a barrier. Under MPI each rank draws only the "
        "weights of the experts it owns. The shm rows use rings of %" PRIu64
        " bytes.\n\n",
        o->tokens, o->hidden, o->ffn, o->experts, o->top_k, MOE_BENCH_SEED,
        o->repeats, o->ring_bytes);
    if (local->measured)
        print_floor(out, o, local);

    fprintf(out, "| ranks | transport | steady best, ms | median, ms "
            "| best / floor | median / floor |\n|---|---|---|---|---|---|\n");
    const struct moe_bench_forward *rows[2] = {mpi, shm};
    static const char *const names[2] = {"mpi", "shm"};
    for (int i = 0; i < 2; i++) {
        if (!rows[i])
            continue;
        fprintf(out, "| %d | %s | %.1f | %.1f |", rows[i]->ranks, names[i],
                rows[i]->steps_best_ms, rows[i]->steps_median_ms);
        print_ratio(out, rows[i]->steps_best_ms, local);
        print_ratio(out, rows[i]->steps_median_ms, local);
        fprintf(out, "\n");
    }

    fprintf(out,
        "\nSteps of the best forward, in ms: the max over the ranks of each "
        "step's time, with the max time spent waiting on peers in brackets. "
        "Under MPI that wait is all the time spent inside MPI calls, which "
        "includes MPI's own copies, so it is an upper bound. *Busiest rows* "
        "is the number of rows the busiest rank gave its experts.\n\n"
        "| ranks | transport | route | layout exchange | dispatch | compute "
        "| combine | busiest rows |\n|---|---|---|---|---|---|---|---|\n");
    for (int i = 0; i < 2; i++) {
        if (!rows[i])
            continue;
        fprintf(out, "| %d | %s |", rows[i]->ranks, names[i]);
        for (int k = 0; k < MOE_BENCH_FORWARD_STEPS; k++)
            fprintf(out, " %.1f (%.1f) |", rows[i]->step_ms[k], rows[i]->wait_ms[k]);
        fprintf(out, " %" PRId64 " |\n", rows[i]->busiest_rows);
    }
    fprintf(out, "\n");
}

/* Prints one all-to-all row. The last two columns compare with memcpy at
 * the same size, when rank 0 measured it. */
static void print_alltoall_row(FILE *out, const struct local_figures *local,
                               const char *call, const struct moe_bench_alltoall *a)
{
    char size[32];
    moe_bench_format_bytes(a->bytes_per_pair, size, sizeof size);
    fprintf(out, "| %d | %s | %s%s | %" PRId64 " | %.2f | %.2f | %.2f | %.2f |",
            a->ranks, call, a->one_token ? "1 token, " : "", size, a->calls,
            a->best_us, a->median_us, a->best_gbps, a->median_gbps);
    double memcpy_gbps = local->measured ?
        moe_bench_memcpy_gbps(&local->res, a->bytes_per_pair) : 0;
    if (a->one_token || memcpy_gbps == 0)
        fprintf(out, " - | - |\n");
    else
        fprintf(out, " %.1f | %.0f%% |\n", memcpy_gbps,
                100 * a->best_gbps / memcpy_gbps);
}

static void print_alltoall(FILE *out, const struct moe_bench_options *o,
                           const struct moe_bench_alltoall *rows,
                           const struct local_figures *local)
{
    fprintf(out,
        "## All-to-all\n\n"
        "The sizes and the timing rule of the *All-to-all* section of "
        "`moe-ep bench`. Each rank sends the given bytes to every other rank "
        "and none to itself. A rank makes one warm-up call and probe calls "
        "that size the loop, then %d loops, each after a barrier; a loop's "
        "time is the slowest rank's, and the time per call is that divided "
        "by the calls. *Throughput* counts the bytes that cross between "
        "distinct ranks, R x (R - 1) x bytes per pair, per second. "
        "`moe_transport_alltoallv` is the call the layer makes over MPI: an "
        "`MPI_Alltoall` of the sizes, which every rank checks against what "
        "it expects, then `MPI_Alltoallv`. `moe_alltoallv` is the same call "
        "on the shared-memory rings of %" PRIu64 " bytes. The *1 token* rows "
        "send one row of H = %" PRId64 " floats to each peer. Every received "
        "block is checked against its sender's byte pattern after the "
        "loops. The last columns divide the throughput by the one-process "
        "memcpy bandwidth at the same size, which rank 0 measured with the "
        "floor.\n\n",
        o->repeats, o->ring_bytes, o->hidden);
    fprintf(out, "| ranks | call | bytes per pair | calls per loop "
            "| us per call, best | median | GB/s, best | median | memcpy GB/s "
            "| best / memcpy |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for (int i = 0; i < SIZE_COUNT; i++) {
        for (int c = 0; c < CALL_COUNT; c++)
            print_alltoall_row(out, local, CALL_NAMES[c], &rows[i * CALL_COUNT + c]);
        if (local->measured && i < local->res.alltoall_count)
            print_alltoall_row(out, local, "`moe_alltoallv`, shared memory",
                               &local->res.alltoall[i]);
    }
    fprintf(out, "\n");
}

/* Prints the report on rank 0 to `out` and to --markdown. */
static int write_report(const struct moe_bench_options *o, const struct job *job,
                        const struct moe_bench_forward *forward,
                        const struct moe_bench_alltoall *rows,
                        const struct local_figures *local,
                        FILE *out)
{
    char *text = NULL;
    size_t bytes = 0;
    FILE *report = open_memstream(&text, &bytes);
    if (!report)
        return moe_fail(-errno, "cannot keep the report in memory: %s",
                        strerror(errno));
    print_job(report, o, job, local);
    print_forward(report, o, forward, local);
    print_alltoall(report, o, rows, local);
    fclose(report);
    fwrite(text, 1, bytes, out);
    fflush(out);
    int rc = 0;
    if (o->markdown_path) {
        struct moe_file_part part = {text, bytes};
        rc = moe_write_file(o->markdown_path, &part, 1);
    }
    free(text);
    return rc;
}

/* Runs the MPI figures on every rank. Returns 0 or the error of this
 * rank, after which the caller must abort the job. */
static int measure_over_mpi(struct moe_transport *t, const struct moe_bench_options *o,
                            struct job *job, struct moe_bench_forward *forward,
                            struct moe_bench_alltoall *rows)
{
    int rc = read_job(t, job);
    if (rc == 0 && !o->alltoall_json)
        rc = measure_forward(t, o, forward);
    /* --alltoall-json times MPI_Alltoallv alone, the last call. */
    if (rc == 0)
        rc = measure_alltoall(t, o, o->alltoall_json ? CALL_BARE : CALL_TRANSPORT,
                              rows);
    /* Rank 0 measures alone next, so the others must be done with MPI. */
    if (rc == 0)
        rc = moe_transport_barrier(t);
    return rc;
}

int moe_bench_mpi(const struct moe_bench_options *o, FILE *out)
{
    int rc = moe_transport_mpi_init(NULL, NULL);
    if (rc)
        return rc;
    struct moe_transport t;
    if ((rc = moe_transport_mpi_open(&t, BENCH_TIMEOUT_NS))) {
        /* No transport to abort with; MPI_Abort ends the job directly. */
        fprintf(stderr, "moe-ep bench: %s\n", moe_error_message());
        MPI_Abort(MPI_COMM_WORLD, 3);
        return rc;
    }

    /* Every rank has the same count, so all of them return here. */
    if (t.ranks < 2 || t.ranks > MOE_MAX_RANKS) {
        int ranks = t.ranks;
        moe_transport_close(&t);
        moe_transport_mpi_finalize();
        if (ranks < 2)
            return moe_fail(-EINVAL, "--transport mpi needs at least 2 ranks, "
                            "and this job has 1: run it as mpirun -np R moe-ep "
                            "bench --transport mpi with R >= 2");
        return moe_fail(-EINVAL, "mpirun started %d ranks; at most %d are "
                        "supported", ranks, MOE_MAX_RANKS);
    }

    struct moe_bench_alltoall rows[SIZE_COUNT * CALL_COUNT];
    struct moe_bench_forward forward;
    struct job job;
    int me = t.rank;
    rc = measure_over_mpi(&t, o, &job, &forward, rows);
    if (rc) {
        fprintf(stderr, "moe-ep bench: rank %d: %s\n", t.rank, moe_error_message());
        moe_transport_abort(&t, 3);
    }
    moe_transport_close(&t);
    if ((rc = moe_transport_mpi_finalize()) || me != 0)
        return rc;
    if (o->alltoall_json) {
        for (int i = 0; i < SIZE_COUNT; i++)
            moe_bench_print_mpi_json(out, &rows[i * CALL_COUNT + CALL_BARE],
                                     job.library);
        return 0;
    }

    struct local_figures *local = calloc(1, sizeof *local);
    if (!local)
        return moe_fail(-ENOMEM, "out of memory for the bench results");
    if (can_measure_locally(&job, local))
        rc = measure_locally(o, &job, local);
    if (rc == 0)
        rc = write_report(o, &job, &forward, rows, local, out);
    free(local);
    return rc;
}

#else /* !MOE_HAVE_MPI */

int moe_bench_mpi(const struct moe_bench_options *o, FILE *out)
{
    (void)o;
    (void)out;
    return moe_transport_mpi_init(NULL, NULL); /* fails: built without MPI */
}

#endif
