/*
 * bench_floor.c - the floors of `moe-ep bench`: the sgemm rate on the
 * layer's expert GEMM shapes, the memcpy bandwidth and the streaming-read
 * bandwidth from memory, plus the timing helpers every bench figure uses
 * (moe_bench_internal.h states the rule).
 *
 * Runs in the launcher process. The all-core sgemm and read figures also
 * fork one process per core through moe_launch. OpenBLAS is left on one
 * thread when this file is done, as the layer requires.
 */
#include "moe_bench_internal.h"
#include "moe_error.h"
#include "moe_layer.h"

#include <cblas.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <emmintrin.h>
#endif

/* Cap on the calls of one loop, so that a mis-sized probe cannot run away. */
static const int64_t MAX_CALLS_PER_LOOP = 1 << 22;

/* Calls a probe needs at least. A single call can be far slower than the
 * typical one (a rank that sleeps on its doorbell can wait tens of us or
 * more to be woken), so one call alone would size a loop far too short. */
static const int64_t MIN_PROBE_CALLS = 8;

int moe_bench_probe_done(int64_t calls, int64_t elapsed_ns, int64_t loop_ns)
{
    return (calls >= MIN_PROBE_CALLS && elapsed_ns >= loop_ns / 8) ||
           calls >= MAX_CALLS_PER_LOOP;
}

int64_t moe_bench_loop_ns(const struct moe_bench_options *o)
{
    return o->quick ? 4 * 1000 * 1000 : 40 * 1000 * 1000;
}

int64_t moe_bench_calls_for(int64_t loop_ns, int64_t per_call_ns)
{
    if (per_call_ns < 1)
        per_call_ns = 1;
    int64_t calls = loop_ns / per_call_ns;
    if (calls < 1)
        return 1;
    return calls > MAX_CALLS_PER_LOOP ? MAX_CALLS_PER_LOOP : calls;
}

int64_t moe_bench_time_local(void (*run)(void *state), void *state,
                             int repeats, int64_t loop_ns, double *per_call_ns)
{
    run(state);
    int64_t probe_calls = 1, probe_ns;
    for (;;) {
        int64_t start = moe_now_ns();
        for (int64_t i = 0; i < probe_calls; i++)
            run(state);
        probe_ns = moe_now_ns() - start;
        if (moe_bench_probe_done(probe_calls, probe_ns, loop_ns))
            break;
        probe_calls *= 2;
    }
    int64_t calls = moe_bench_calls_for(loop_ns, probe_ns / probe_calls);

    for (int rep = 0; rep < repeats; rep++) {
        int64_t loop_start = moe_now_ns();
        for (int64_t i = 0; i < calls; i++)
            run(state);
        per_call_ns[rep] = (double)(moe_now_ns() - loop_start) / (double)calls;
    }
    return calls;
}

/* Runs `calls` calls on this rank and returns in *slowest_ns the longest
 * time any rank took for them. */
static int probe_ranks(struct moe_comm *comm, int64_t calls,
                       int (*run)(struct moe_comm *comm, void *state),
                       void *state, int64_t *slowest_ns)
{
    int rc = 0;
    int64_t start = moe_now_ns();
    for (int64_t i = 0; rc == 0 && i < calls; i++)
        rc = run(comm, state);
    if (rc)
        return rc;
    int64_t elapsed_ns = moe_now_ns() - start;
    int64_t all_ns[MOE_MAX_RANKS];
    if ((rc = moe_allgather(comm, &elapsed_ns, sizeof elapsed_ns, all_ns)))
        return rc;
    *slowest_ns = 0;
    for (int r = 0; r < comm->ranks; r++)
        if (all_ns[r] > *slowest_ns)
            *slowest_ns = all_ns[r];
    return 0;
}

int moe_bench_time_ranks(struct moe_comm *comm, struct moe_bench_area *area,
                         int index, int repeats, int64_t loop_ns,
                         int (*run)(struct moe_comm *comm, void *state),
                         void *state)
{
    int rc = run(comm, state);
    if (rc)
        return rc;

    /* Every rank sizes its loop from the slowest rank's probe, so that all
     * of them make the same number of calls. */
    int64_t probe_calls = 1, slowest_ns;
    for (;;) {
        if ((rc = probe_ranks(comm, probe_calls, run, state, &slowest_ns)))
            return rc;
        if (moe_bench_probe_done(probe_calls, slowest_ns, loop_ns))
            break;
        probe_calls *= 2;
    }
    int64_t calls = moe_bench_calls_for(loop_ns, slowest_ns / probe_calls);
    if (comm->rank == 0)
        area->calls[index] = calls;

    for (int rep = 0; rep < repeats; rep++) {
        if ((rc = moe_barrier(comm)))
            return rc;
        int64_t loop_start = moe_now_ns();
        for (int64_t i = 0; rc == 0 && i < calls; i++)
            rc = run(comm, state);
        if (rc)
            return rc;
        area->loop_ns[index][rep][comm->rank] = moe_now_ns() - loop_start;
    }
    return 0;
}

void moe_bench_area_per_call(const struct moe_bench_area *area, int index,
                             int ranks, int repeats, double *per_call_ns)
{
    for (int rep = 0; rep < repeats; rep++) {
        int64_t slowest_ns = 0;
        for (int r = 0; r < ranks; r++)
            if (area->loop_ns[index][rep][r] > slowest_ns)
                slowest_ns = area->loop_ns[index][rep][r];
        per_call_ns[rep] = (double)slowest_ns / (double)area->calls[index];
    }
}

static int compare_doubles(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double moe_bench_median(double *values, int count)
{
    qsort(values, (size_t)count, sizeof *values, compare_doubles);
    if (count % 2)
        return values[count / 2];
    return (values[count / 2 - 1] + values[count / 2]) / 2;
}

double moe_bench_min(const double *values, int count)
{
    double best = values[0];
    for (int i = 1; i < count; i++)
        if (values[i] < best)
            best = values[i];
    return best;
}

int moe_bench_launch(struct moe_launch *launch, const char *figure)
{
    int rc = moe_launch_run(launch);
    if (rc == 0)
        return 0;
    if (launch->launcher_signal)
        return moe_fail(-ECANCELED, "%s: stopped by signal %d (%s); all ranks "
                        "were stopped", figure, launch->launcher_signal,
                        strsignal(launch->launcher_signal));
    if (launch->failed_rank >= 0) {
        char description[MOE_ERROR_TEXT_BYTES + 64];
        moe_launch_describe(launch, launch->failed_rank, description,
                            sizeof description);
        return moe_fail(rc, "%s failed: %s", figure, description);
    }
    if (rc == -ECANCELED)
        return moe_fail(rc, "%s failed: every rank stopped as aborted, and none "
                        "reported why", figure);
    return moe_fail(rc, "%s failed: %s", figure, moe_error_message());
}

/* ---- sgemm ------------------------------------------------------------- */

/* Inputs and outputs of one expert call on M rows. */
struct gemm_state {
    int64_t rows, hidden, ffn; /* M, H, F */
    float *x;                  /* (M, H) */
    float *w1, *w3;            /* (F, H) */
    float *w2;                 /* (H, F) */
    float *scratch;            /* moe_expert_scratch_floats(M, F) */
    float *y;                  /* (M, H) */
};

static void gemm_state_free(struct gemm_state *g)
{
    free(g->x);
    free(g->w1);
    free(g->w3);
    free(g->w2);
    free(g->scratch);
    free(g->y);
}

/* Allocates and fills the buffers of one expert call with random values in
 * the same ranges as the layer's. Returns 0 or -ENOMEM. */
static int gemm_state_init(struct gemm_state *g, int64_t rows, int64_t hidden,
                           int64_t ffn)
{
    *g = (struct gemm_state){.rows = rows, .hidden = hidden, .ffn = ffn};
    g->x = malloc((size_t)(rows * hidden) * sizeof(float));
    g->w1 = malloc((size_t)(ffn * hidden) * sizeof(float));
    g->w3 = malloc((size_t)(ffn * hidden) * sizeof(float));
    g->w2 = malloc((size_t)(hidden * ffn) * sizeof(float));
    g->scratch = malloc((size_t)moe_expert_scratch_floats(rows, ffn) * sizeof(float));
    g->y = malloc((size_t)(rows * hidden) * sizeof(float));
    if (!g->x || !g->w1 || !g->w3 || !g->w2 || !g->scratch || !g->y) {
        gemm_state_free(g);
        return moe_fail(-ENOMEM, "out of memory for an expert call of %" PRId64
                        " rows", rows);
    }
    moe_tokens_random(g->x, 0, rows, hidden, MOE_BENCH_SEED);
    moe_fill_uniform(g->w1, ffn * hidden, MOE_BENCH_SEED, MOE_STREAM_W1, 0, 0,
                     1.0f / sqrtf((float)hidden));
    moe_fill_uniform(g->w3, ffn * hidden, MOE_BENCH_SEED, MOE_STREAM_W3, 0, 0,
                     1.0f / sqrtf((float)hidden));
    moe_fill_uniform(g->w2, hidden * ffn, MOE_BENCH_SEED, MOE_STREAM_W2, 0, 0,
                     1.0f / sqrtf((float)ffn));
    return 0;
}

static void run_gemm(void *state)
{
    struct gemm_state *g = state;
    moe_expert_forward(g->x, g->rows, g->hidden, g->ffn, g->w1, g->w3, g->w2,
                       g->scratch, g->y);
}

static int run_gemm_rank(struct moe_comm *comm, void *state)
{
    (void)comm;
    run_gemm(state);
    return 0;
}

/* Inputs of every rank of the all-core sgemm figure. */
struct gemm_plan {
    int64_t rows, hidden, ffn;
    int repeats;
    int64_t loop_ns;
};

/* Rank entry point: one thread of OpenBLAS on its own copy of the inputs,
 * timed by the timing rule. */
static int gemm_rank_main(struct moe_comm *comm, void *arg)
{
    const struct gemm_plan *plan = arg;
    struct moe_bench_area *area = comm->app;
    if (comm->segment->app_bytes < sizeof *area || area->magic != MOE_BENCH_AREA_MAGIC)
        return moe_fail(-EPROTO, "rank %d: the bench area is missing", comm->rank);
    moe_blas_init();

    struct gemm_state g;
    int rc = gemm_state_init(&g, plan->rows, plan->hidden, plan->ffn);
    if (rc == 0)
        rc = moe_bench_time_ranks(comm, area, 0, plan->repeats, plan->loop_ns,
                                  run_gemm_rank, &g);
    gemm_state_free(&g);
    return rc;
}

/* Runs `rank_main` in `cores` processes at once with a bench area, and
 * fills per_loop_ns with the slowest process's time of each of `repeats`
 * loops. `what` names the figure in errors. */
static int run_processes(int cores, int (*rank_main)(struct moe_comm *, void *),
                         void *arg, const char *what, int repeats, double *per_loop_ns)
{
    struct moe_launch launch;
    struct moe_launch_config config = {
        .ranks = cores,
        .ring_capacity = 4096,
        .app_bytes = sizeof(struct moe_bench_area),
        .timeout_ns = 60LL * 1000 * 1000 * 1000,
        .rank_main = rank_main,
        .arg = arg,
    };
    int rc = moe_launch_create(&launch, &config);
    if (rc)
        return rc;
    struct moe_bench_area *area = moe_segment_app(launch.segment);
    area->magic = MOE_BENCH_AREA_MAGIC;
    rc = moe_bench_launch(&launch, what);
    if (rc == 0)
        moe_bench_area_per_call(area, 0, cores, repeats, per_loop_ns);
    moe_launch_destroy(&launch);
    return rc;
}

/* Measures `cores` single-threaded processes running expert calls at once.
 * per_call_ns receives, per loop, the slowest process's time per call. */
static int sgemm_processes(const struct gemm_plan *plan, int cores,
                           double *per_call_ns)
{
    struct gemm_plan local = *plan;
    return run_processes(cores, gemm_rank_main, &local, "the all-core sgemm figure",
                         plan->repeats, per_call_ns);
}

/* Converts per-call times of `flops` each into the best and median rate. */
static void gflops_of(double flops, double *per_call_ns, int count, double *best,
                      double *median)
{
    *best = flops / moe_bench_min(per_call_ns, count);
    *median = flops / moe_bench_median(per_call_ns, count);
}

/* Sets the machine rate to the highest all-core rate measured so far, and
 * the floor from it. A shared host can slow one measurement down, so the
 * highest is the best estimate of what the cores can do. */
static void set_floor(const struct moe_bench_options *o, struct moe_bench_results *res)
{
    double best = res->sgemm_threads_gflops;
    if (res->sgemm_procs_gflops > best)
        best = res->sgemm_procs_gflops;
    if (res->sgemm_again_gflops > best)
        best = res->sgemm_again_gflops;
    res->machine_gflops = best;
    double layer_flops = 6.0 * (double)(o->tokens * o->top_k) * (double)o->hidden *
                         (double)o->ffn;
    res->floor_ms = layer_flops / best / 1e6;
}

static int measure_sgemm(const struct moe_bench_options *o,
                         struct moe_bench_results *res)
{
    int64_t E = o->experts, assignments = o->tokens * o->top_k;
    int64_t rows = (assignments + E / 2) / E;
    res->gemm_rows = rows < 1 ? 1 : rows;
    double flops = 6.0 * (double)res->gemm_rows * (double)o->hidden * (double)o->ffn;
    /* A loop of several calls, so that one call of tens of ms is not the
     * whole sample. */
    int64_t loop_ns = 5 * moe_bench_loop_ns(o);
    double per_call_ns[MOE_BENCH_MAX_REPEATS];

    struct gemm_state g;
    int rc = gemm_state_init(&g, res->gemm_rows, o->hidden, o->ffn);
    if (rc)
        return rc;
    moe_blas_init();
    moe_bench_time_local(run_gemm, &g, o->repeats, loop_ns, per_call_ns);
    gflops_of(flops, per_call_ns, o->repeats, &res->sgemm_one_gflops,
              &res->sgemm_one_median_gflops);

    struct gemm_plan plan = {.rows = res->gemm_rows, .hidden = o->hidden,
                             .ffn = o->ffn, .repeats = o->repeats,
                             .loop_ns = loop_ns};
    rc = sgemm_processes(&plan, res->cores, per_call_ns);
    if (rc == 0) {
        gflops_of(flops * res->cores, per_call_ns, o->repeats,
                  &res->sgemm_procs_gflops, &res->sgemm_procs_median_gflops);

        /* Threads last: after a call, OpenBLAS's idle threads can spin for
         * a while, and the all-core processes must not compete with them. */
        openblas_set_num_threads(res->cores);
        moe_bench_time_local(run_gemm, &g, o->repeats, loop_ns, per_call_ns);
        moe_blas_init();
        gflops_of(flops, per_call_ns, o->repeats, &res->sgemm_threads_gflops,
                  &res->sgemm_threads_median_gflops);
    }
    gemm_state_free(&g);
    set_floor(o, res);
    return rc;
}

int moe_bench_measure_sgemm_again(const struct moe_bench_options *o,
                                  struct moe_bench_results *res)
{
    double flops = 6.0 * (double)res->gemm_rows * (double)o->hidden * (double)o->ffn;
    double per_call_ns[MOE_BENCH_MAX_REPEATS];
    struct gemm_plan plan = {.rows = res->gemm_rows, .hidden = o->hidden,
                             .ffn = o->ffn, .repeats = o->repeats,
                             .loop_ns = 5 * moe_bench_loop_ns(o)};
    int rc = sgemm_processes(&plan, res->cores, per_call_ns);
    if (rc)
        return rc;
    gflops_of(flops * res->cores, per_call_ns, o->repeats,
              &res->sgemm_again_gflops, &res->sgemm_again_median_gflops);
    set_floor(o, res);
    return 0;
}

static void print_sgemm(FILE *out, const struct moe_bench_options *o,
                        const struct moe_bench_results *res)
{
    double call_gflop = 6.0 * (double)res->gemm_rows * (double)o->hidden *
                        (double)o->ffn / 1e9;
    double layer_gflop = 6.0 * (double)(o->tokens * o->top_k) * (double)o->hidden *
                         (double)o->ffn / 1e9;
    fprintf(out,
        "## Floors\n\n### sgemm on the expert GEMM shapes\n\n"
        "Each call is `moe_expert_forward` on random inputs with M = T x K / E "
        "= %" PRId64 " rows (T %" PRId64 ", K %" PRId64 ", E %" PRId64 "), "
        "H %" PRId64 " and F %" PRId64 ": two (M x H) . (H x F) GEMMs, the "
        "SwiGLU product and one (M x F) . (F x H) GEMM, counted as 2 x 3 x M x "
        "H x F = %.2f GFLOP. The all-core rate is measured in two ways: one "
        "process with %d OpenBLAS threads (`openblas_set_num_threads`, set "
        "back to 1 afterwards), and %d processes of one thread each, as the "
        "ranks run, each on its own copy of the inputs. Those processes start "
        "each loop after a barrier; a loop's time is the slowest process's, "
        "and the rate is the sum over the processes. The processes run once "
        "before and once after the layer figures, because a shared host can "
        "slow down any one measurement.\n\n",
        res->gemm_rows, o->tokens, o->top_k, o->experts, o->hidden, o->ffn,
        call_gflop, res->cores, res->cores);
    fprintf(out, "| setup | best GFLOP/s | median GFLOP/s |\n|---|---|---|\n");
    fprintf(out, "| 1 process, 1 thread | %.1f | %.1f |\n",
            res->sgemm_one_gflops, res->sgemm_one_median_gflops);
    fprintf(out, "| 1 process, %d threads | %.1f | %.1f |\n", res->cores,
            res->sgemm_threads_gflops, res->sgemm_threads_median_gflops);
    fprintf(out, "| %d processes, 1 thread each | %.1f | %.1f |\n", res->cores,
            res->sgemm_procs_gflops, res->sgemm_procs_median_gflops);
    fprintf(out, "| %d processes, 1 thread each, after the layer figures "
            "| %.1f | %.1f |\n", res->cores, res->sgemm_again_gflops,
            res->sgemm_again_median_gflops);
    fprintf(out,
        "\nThe machine rate is the highest best all-core rate, %.1f GFLOP/s. "
        "The layer's expert FLOPs, 2 x 3 x (T x K) x H x F = %.2f GFLOP, take "
        "**%.1f ms** at that rate: this is the expert-GEMM floor of the "
        "forward. Real experts get more or fewer rows than M, and smaller M "
        "runs slower, so the floor is optimistic.\n",
        res->machine_gflops, layer_gflop, res->floor_ms);
    if (res->cores > 1 && res->machine_gflops < 1.5 * res->sgemm_one_gflops)
        fprintf(out, "\n**Warning:** %d cores reached only %.2f times the "
                "1-thread rate. Something else probably used the cores (on a "
                "virtual machine, possibly another tenant of the host), so the "
                "floor is too high and every ratio to it too low.\n",
                res->cores, res->machine_gflops / res->sgemm_one_gflops);
    fprintf(out, "\n");
}

/* ---- memcpy ------------------------------------------------------------ */

struct copy_state {
    void *dst;
    const void *src;
    size_t bytes;
};

static void run_copy(void *state)
{
    struct copy_state *c = state;
    memcpy(c->dst, c->src, c->bytes);
    /* Keeps the compiler from dropping or merging the copies. */
    __asm__ __volatile__("" : : "r"(c->dst) : "memory");
}

static int measure_memcpy(const struct moe_bench_options *o,
                          struct moe_bench_results *res)
{
    static const uint64_t sizes[MOE_BENCH_MEMCPY_SIZES] = {
        4 << 10, 64 << 10, 1 << 20, 4 << 20, 64 << 20,
    };
    double per_call_ns[MOE_BENCH_MAX_REPEATS];
    for (int i = 0; i < MOE_BENCH_MEMCPY_SIZES; i++) {
        uint64_t bytes = sizes[i];
        void *src = aligned_alloc(4096, bytes), *dst = aligned_alloc(4096, bytes);
        if (!src || !dst) {
            free(src);
            free(dst);
            return moe_fail(-ENOMEM, "out of memory for two memcpy buffers of "
                            "%" PRIu64 " bytes", bytes);
        }
        memset(src, 1, bytes);
        memset(dst, 0, bytes);

        struct copy_state c = {.dst = dst, .src = src, .bytes = bytes};
        moe_bench_time_local(run_copy, &c, o->repeats, moe_bench_loop_ns(o),
                             per_call_ns);
        res->memcpy_bytes[i] = bytes;
        /* Bytes per ns are GB/s. */
        res->memcpy_gbps[i] = (double)bytes / moe_bench_min(per_call_ns, o->repeats);
        res->memcpy_median_gbps[i] = (double)bytes /
                                     moe_bench_median(per_call_ns, o->repeats);
        free(src);
        free(dst);
    }
    return 0;
}

double moe_bench_memcpy_gbps(const struct moe_bench_results *res, uint64_t bytes)
{
    for (int i = 0; i < MOE_BENCH_MEMCPY_SIZES; i++)
        if (res->memcpy_bytes[i] == bytes)
            return res->memcpy_gbps[i];
    return 0;
}

void moe_bench_format_bytes(uint64_t bytes, char *buf, size_t size)
{
    if (bytes >= (1 << 20) && bytes % (1 << 20) == 0)
        snprintf(buf, size, "%" PRIu64 " MiB", bytes >> 20);
    else if (bytes >= (1 << 10) && bytes % (1 << 10) == 0)
        snprintf(buf, size, "%" PRIu64 " KiB", bytes >> 10);
    else
        snprintf(buf, size, "%" PRIu64 " B", bytes);
}

static void print_memcpy(FILE *out, const struct moe_bench_results *res)
{
    fprintf(out,
        "### memcpy\n\n"
        "One process copies one buffer into another of the given size, over "
        "and over; the bandwidth counts the bytes copied per second (each "
        "byte is read once and written once). Small buffers stay in the CPU "
        "caches between copies, so their figures are cache bandwidth; the "
        "64 MiB figure is closer to memory bandwidth.\n\n"
        "| bytes | best GB/s | median GB/s |\n|---|---|---|\n");
    for (int i = 0; i < MOE_BENCH_MEMCPY_SIZES; i++) {
        char size[32];
        moe_bench_format_bytes(res->memcpy_bytes[i], size, sizeof size);
        fprintf(out, "| %s | %.1f | %.1f |\n", size, res->memcpy_gbps[i],
                res->memcpy_median_gbps[i]);
    }
    fprintf(out, "\n");
}

/* ---- streaming read ------------------------------------------------------ */

int moe_bench_evict(const void *p, uint64_t bytes)
{
#if defined(__x86_64__) || defined(__i386__)
    /* clflush writes a line back if dirty and invalidates it in every cache
     * of the coherence domain. CPUID leaf 1 gives the line size it flushes,
     * in 8-byte units, in bits 8 to 15 of EBX. */
    unsigned eax, ebx = 0, ecx, edx;
    uintptr_t line_bytes = 64;
    if (__get_cpuid(1, &eax, &ebx, &ecx, &edx) && ((ebx >> 8) & 0xff) != 0)
        line_bytes = ((ebx >> 8) & 0xff) * 8;
    const char *line = (const char *)p - (uintptr_t)p % line_bytes;
    const char *end = (const char *)p + bytes;
    for (; line < end; line += line_bytes)
        _mm_clflush(line);
    _mm_mfence(); /* the flushes complete before any later load */
    return 1;
#else
    (void)p;
    (void)bytes;
    return 0;
#endif
}

/* Returns the bytes that each pass reads in all, split over the
 * processes. The full figure exceeds the caches of most machines, and
 * every pass is evicted first where the build can. */
static uint64_t read_total_bytes(const struct moe_bench_options *o)
{
    return o->quick ? 64ULL << 20 : 256ULL << 20;
}

typedef uint64_t read_vector __attribute__((vector_size(16), may_alias));

/* Reads `bytes` (a multiple of 64) at `p` once and returns the XOR of its
 * 8-byte words, which the caller keeps so that the loads stay. Four
 * accumulators keep the loads independent of each other. */
static uint64_t read_pass(const void *p, uint64_t bytes)
{
    const read_vector *v = p;
    read_vector a = {0, 0}, b = {0, 0}, c = {0, 0}, d = {0, 0};
    for (uint64_t i = 0; i < bytes / sizeof *v; i += 4) {
        a ^= v[i];
        b ^= v[i + 1];
        c ^= v[i + 2];
        d ^= v[i + 3];
    }
    a ^= b ^ c ^ d;
    return a[0] ^ a[1];
}

/* One process's buffer of the read figure. */
struct read_state {
    uint8_t *buffer;
    uint64_t bytes;
    uint64_t checksum; /* read_pass of every pass, kept so it is not dropped */
    int evicted;       /* moe_bench_evict of the last pass */
};

static int read_state_init(struct read_state *r, uint64_t bytes)
{
    *r = (struct read_state){.bytes = bytes};
    r->buffer = moe_alloc_large((size_t)bytes);
    if (!r->buffer)
        return moe_fail(-ENOMEM, "out of memory for a read buffer of %" PRIu64
                        " bytes", bytes);
    /* Faults every page in, so that no pass pays for it. */
    memset(r->buffer, 0x5a, (size_t)bytes);
    return 0;
}

/* Evicts the buffer, waits at the barrier of `comm` (when not NULL), then
 * times one pass over the buffer into *pass_ns. Returns 0 or the
 * barrier's error. */
static int read_timed_pass(struct read_state *r, struct moe_comm *comm,
                           int64_t *pass_ns)
{
    r->evicted = moe_bench_evict(r->buffer, r->bytes);
    int rc = comm ? moe_barrier(comm) : 0;
    if (rc)
        return rc;
    int64_t start = moe_now_ns();
    r->checksum ^= read_pass(r->buffer, r->bytes);
    *pass_ns = moe_now_ns() - start;
    return 0;
}

static void read_state_free(struct read_state *r)
{
    /* Nothing else uses the checksum, so this keeps the reads. */
    __asm__ __volatile__("" : : "r"(r->checksum));
    free(r->buffer);
}

struct read_plan {
    uint64_t bytes_per_process;
    int repeats;
};

/* Rank entry point of the all-core read figure: `repeats` passes over its
 * own buffer, each after an eviction and a barrier. */
static int read_rank_main(struct moe_comm *comm, void *arg)
{
    const struct read_plan *plan = arg;
    struct moe_bench_area *area = comm->app;
    if (comm->segment->app_bytes < sizeof *area || area->magic != MOE_BENCH_AREA_MAGIC)
        return moe_fail(-EPROTO, "rank %d: the bench area is missing", comm->rank);

    struct read_state r;
    int rc = read_state_init(&r, plan->bytes_per_process);
    if (rc)
        return rc;
    if (comm->rank == 0)
        area->calls[0] = 1;
    for (int rep = 0; rep < plan->repeats && rc == 0; rep++)
        rc = read_timed_pass(&r, comm, &area->loop_ns[0][rep][comm->rank]);
    read_state_free(&r);
    return rc;
}

/* Measures `cores` processes reading at once. *best and *median receive
 * the rate of all of them, in GB/s. */
static int read_processes(const struct moe_bench_options *o, int cores,
                          double *best, double *median)
{
    struct read_plan plan = {
        .bytes_per_process = read_total_bytes(o) / (uint64_t)cores / 64 * 64,
        .repeats = o->repeats,
    };
    double per_pass_ns[MOE_BENCH_MAX_REPEATS];
    int rc = run_processes(cores, read_rank_main, &plan, "the all-core read figure",
                           o->repeats, per_pass_ns);
    if (rc == 0) {
        double bytes = (double)plan.bytes_per_process * cores;
        /* Bytes per ns are GB/s. */
        *best = bytes / moe_bench_min(per_pass_ns, o->repeats);
        *median = bytes / moe_bench_median(per_pass_ns, o->repeats);
    }
    return rc;
}

static void set_read_machine(struct moe_bench_results *res)
{
    for (int i = 0; i < MOE_BENCH_READ_POINTS; i++)
        if (res->read_procs_gbps[i] > res->read_machine_gbps)
            res->read_machine_gbps = res->read_procs_gbps[i];
}

int moe_bench_measure_read(const struct moe_bench_options *o,
                           struct moe_bench_results *res)
{
    res->read_bytes = read_total_bytes(o);
    struct read_state r;
    int rc = read_state_init(&r, res->read_bytes);
    if (rc)
        return rc;
    double per_pass_ns[MOE_BENCH_MAX_REPEATS];
    for (int rep = 0; rep < o->repeats; rep++) {
        int64_t pass_ns;
        read_timed_pass(&r, NULL, &pass_ns);
        per_pass_ns[rep] = (double)pass_ns;
    }
    res->cache_evicted = r.evicted;
    res->read_one_gbps = (double)r.bytes / moe_bench_min(per_pass_ns, o->repeats);
    res->read_one_median_gbps = (double)r.bytes /
                                moe_bench_median(per_pass_ns, o->repeats);
    read_state_free(&r);

    return moe_bench_measure_read_again(o, res, MOE_BENCH_READ_FLOORS);
}

int moe_bench_measure_read_again(const struct moe_bench_options *o,
                                 struct moe_bench_results *res,
                                 enum moe_bench_read_point point)
{
    int rc = read_processes(o, res->cores, &res->read_procs_gbps[point],
                            &res->read_procs_median_gbps[point]);
    set_read_machine(res);
    return rc;
}

/* Formats the L3 cache size that the C library reports, or "unknown". */
static void format_l3(char *buf, size_t size)
{
    long bytes = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    bytes = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    if (bytes > 0)
        moe_bench_format_bytes((uint64_t)bytes, buf, size);
    else
        snprintf(buf, size, "unknown");
}

static void print_read(FILE *out, const struct moe_bench_results *res)
{
    char total[32], each[32], l3[32];
    moe_bench_format_bytes(res->read_bytes, total, sizeof total);
    moe_bench_format_bytes(res->read_bytes / (uint64_t)res->cores / 64 * 64,
                           each, sizeof each);
    format_l3(l3, sizeof l3);
    fprintf(out,
        "### Streaming read\n\n"
        "A process reads its own buffer once per pass, 16 bytes per load, and "
        "the bandwidth counts the bytes read per second. The all-core figure "
        "runs %d processes at once, each on %s of the %s in all; they start "
        "each pass after a barrier, a pass's time is the slowest process's, "
        "and the rate is the bytes of all of them over that time. ",
        res->cores, each, total);
    if (res->cache_evicted)
        fprintf(out,
            "Before every pass each process evicts its buffer from every "
            "cache level with `clflush`, outside the timed part, so the pass "
            "reads from memory. Size alone would not ensure that here: the C "
            "library reports an L3 cache of %s.\n\n", l3);
    else
        fprintf(out,
            "This build cannot evict a buffer from the caches (it does so "
            "only on x86), so a pass reads from memory only as far as the "
            "buffer exceeds the caches; the C library reports an L3 cache of "
            "%s.\n\n", l3);
    fprintf(out, "| setup | bytes per pass | best GB/s | median GB/s |\n"
            "|---|---|---|---|\n");
    static const char *const when[MOE_BENCH_READ_POINTS] = {
        "", ", before the decode figures", ", after the layer figures",
    };
    fprintf(out, "| 1 process | %s | %.1f | %.1f |\n", total, res->read_one_gbps,
            res->read_one_median_gbps);
    for (int i = 0; i < MOE_BENCH_READ_POINTS; i++)
        fprintf(out, "| %d processes%s | %s | %.1f | %.1f |\n", res->cores, when[i],
                total, res->read_procs_gbps[i], res->read_procs_median_gbps[i]);
    fprintf(out,
        "\nThe machine read rate is the highest best all-core rate, **%.1f "
        "GB/s**. The weight-stream floor of a forward is the bytes of the "
        "expert weights it touches, plus the gate, at that rate.\n",
        res->read_machine_gbps);
    if (res->cores > 1 && res->read_machine_gbps < 1.2 * res->read_one_gbps)
        fprintf(out, "\n**Warning:** %d cores read only %.2f times as fast as "
                "one. Either one core already takes all the memory bandwidth "
                "of this machine, or something else used the cores during "
                "every all-core figure; in the second case the floor is too "
                "high and every ratio to it too low.\n", res->cores,
                res->read_machine_gbps / res->read_one_gbps);
    fprintf(out, "\n");
}

int moe_bench_measure_floors(const struct moe_bench_options *o,
                             struct moe_bench_results *res)
{
    int rc = measure_sgemm(o, res);
    if (rc == 0)
        rc = measure_memcpy(o, res);
    return rc;
}

void moe_bench_print_floors(FILE *out, const struct moe_bench_options *o,
                            const struct moe_bench_results *res)
{
    print_sgemm(out, o, res);
    print_memcpy(out, res);
    print_read(out, res);
}
