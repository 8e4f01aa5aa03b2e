/*
 * bench_layer.c - the layer figures of `moe-ep bench`: the distributed
 * forward at several rank counts, and the all-to-all bandwidth and latency.
 *
 * Runs in the launcher process, which builds the weights and tokens once
 * and forks the ranks through moe_launch for every figure. The forward runs
 * the layer's own code: moe_dist_forward several times in one launch, and
 * moe_dist_rank_main once per launch as `moe-ep run` does. The all-to-all
 * ranks run a loop of their own (alltoall_rank_main). Ranks record their
 * times in a struct moe_bench_area in the app area.
 */
#include "moe_bench_internal.h"
#include "moe_run.h"
#include "moe_dist.h"
#include "moe_error.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const int64_t RANK_TIMEOUT_NS = 60LL * 1000 * 1000 * 1000;

static double ms(double ns)
{
    return ns / 1e6;
}

/* ---- forward ----------------------------------------------------------- */

/* Steps whose times add up to the forward. START and DONE take no time. */
static const int FORWARD_STEPS[] = {MOE_STEP_ROUTE, MOE_STEP_LAYOUT,
                                    MOE_STEP_DISPATCH, MOE_STEP_COMPUTE,
                                    MOE_STEP_COMBINE};
enum { FORWARD_STEP_COUNT = sizeof FORWARD_STEPS / sizeof FORWARD_STEPS[0] };
static_assert(FORWARD_STEP_COUNT == MOE_BENCH_FORWARD_STEPS,
              "the forward table has a column per step");

/* Returns the rows that the busiest rank computed, from the (R, E) counts. */
static int64_t busiest_rows(const int64_t *counts, int ranks, int64_t experts)
{
    int64_t per_rank[MOE_MAX_RANKS] = {0}, max_rows = 0;
    for (int src = 0; src < ranks; src++)
        for (int64_t e = 0; e < experts; e++)
            per_rank[moe_expert_owner(experts, ranks, e)] += counts[src * experts + e];
    for (int r = 0; r < ranks; r++)
        if (per_rank[r] > max_rows)
            max_rows = per_rank[r];
    return max_rows;
}

/* Cases of the bench area in a steady-state forward launch: the step sum,
 * then each step's time, then each step's wait. */
enum {
    CASE_STEP_SUM = 0,
    CASE_STEP_FIRST = 1,
    CASE_WAIT_FIRST = CASE_STEP_FIRST + FORWARD_STEP_COUNT,
};
static_assert(CASE_WAIT_FIRST + FORWARD_STEP_COUNT <= MOE_BENCH_MAX_CASES,
              "the bench area has a case for every step and wait");

/* Inputs of every rank of a steady-state forward launch. */
struct forward_plan {
    const struct moe_dist_input *input;
    int repeats;
    uint64_t bench_offset; /* of the struct moe_bench_area in the app area */
};

/* Copies the step times of the forward just run into repeat `rep`. */
static void record_forward(struct moe_bench_area *area,
                           const struct moe_rank_slot *slot, int rep, int rank)
{
    int64_t sum = 0;
    for (int k = 0; k < FORWARD_STEP_COUNT; k++) {
        int step = FORWARD_STEPS[k];
        sum += (int64_t)slot->step_ns[step];
        area->loop_ns[CASE_STEP_FIRST + k][rep][rank] = (int64_t)slot->step_ns[step];
        area->loop_ns[CASE_WAIT_FIRST + k][rep][rank] = (int64_t)slot->wait_ns[step];
    }
    area->loop_ns[CASE_STEP_SUM][rep][rank] = sum;
}

/* Rank entry point of a steady-state launch: one warm-up forward, which
 * faults in the rank's buffers, then `repeats` forwards, each after a
 * barrier, with the same buffers. */
static int forward_rank_main(struct moe_comm *comm, void *arg)
{
    const struct forward_plan *plan = arg;
    struct moe_bench_area *area =
        (struct moe_bench_area *)((char *)comm->app +
                                  plan->bench_offset);
    if (area->magic != MOE_BENCH_AREA_MAGIC)
        return moe_fail(-EPROTO, "rank %d: the bench area is missing", comm->rank);

    struct moe_transport t;
    int rc = moe_transport_shm_open(&t, comm);
    if (rc)
        return rc;
    struct moe_rank_slot *slot = moe_segment_slot(comm->segment, comm->rank);
    struct moe_dist_env env = {.transport = &t, .area = comm->app,
                               .area_capacity = comm->app_bytes, .slot = slot};
    struct moe_dist_rank *rank;
    if ((rc = moe_dist_rank_new(&env, plan->input, &rank))) {
        moe_transport_close(&t);
        return rc;
    }
    rc = moe_dist_forward(rank);
    for (int rep = 0; rc == 0 && rep < plan->repeats; rep++) {
        rc = moe_barrier(comm);
        /* The forward adds its step times to the slot, so start from zero
         * to keep this forward's times alone. */
        memset(slot->step_ns, 0, sizeof slot->step_ns);
        memset(slot->wait_ns, 0, sizeof slot->wait_ns);
        if (rc == 0)
            rc = moe_dist_forward(rank);
        if (rc == 0)
            record_forward(area, slot, rep, comm->rank);
    }
    moe_dist_rank_free(rank);
    moe_transport_close(&t);
    return rc;
}

/* Returns the max over `ranks` of case `index`, repeat `rep`, in ns. */
static double max_over_ranks(const struct moe_bench_area *area, int index,
                             int rep, int ranks)
{
    int64_t max_ns = 0;
    for (int r = 0; r < ranks; r++)
        if (area->loop_ns[index][rep][r] > max_ns)
            max_ns = area->loop_ns[index][rep][r];
    return (double)max_ns;
}

/* Fills the steady-state columns of `row` from one launch of `ranks` ranks
 * that run 1 + repeats forwards. */
static int forward_steady(const struct moe_bench_options *o,
                          const struct moe_dist_input *input, int ranks,
                          struct moe_bench_forward *row)
{
    const struct moe_shape *s = &input->weights->shape;
    uint64_t run_bytes = moe_run_area_bytes(s, ranks, 0);
    if (run_bytes == 0)
        return moe_fail(-EINVAL, "the output of %" PRId64 " x %" PRId64
                        " floats is too large", s->tokens, s->hidden);
    struct forward_plan plan = {.input = input, .repeats = o->repeats,
                                .bench_offset = (run_bytes + 63) & ~(uint64_t)63};
    struct moe_launch launch;
    struct moe_launch_config config = {
        .ranks = ranks,
        .ring_capacity = o->ring_bytes,
        .app_bytes = plan.bench_offset + sizeof(struct moe_bench_area),
        .timeout_ns = RANK_TIMEOUT_NS,
        .rank_main = forward_rank_main,
        .arg = &plan,
    };
    int rc = moe_launch_create(&launch, &config);
    if (rc)
        return rc;
    void *app = moe_segment_app(launch.segment);
    moe_run_area_init(app, s, ranks, 0);
    struct moe_bench_area *area =
        (struct moe_bench_area *)((char *)app + plan.bench_offset);
    area->magic = MOE_BENCH_AREA_MAGIC;
    if ((rc = moe_bench_launch(&launch, "the forward"))) {
        moe_launch_destroy(&launch);
        return rc;
    }

    double steps_ns[MOE_BENCH_MAX_REPEATS];
    int best = 0;
    for (int rep = 0; rep < o->repeats; rep++) {
        steps_ns[rep] = max_over_ranks(area, CASE_STEP_SUM, rep, ranks);
        if (steps_ns[rep] < steps_ns[best])
            best = rep;
    }
    for (int k = 0; k < FORWARD_STEP_COUNT; k++) {
        row->step_ms[k] = ms(max_over_ranks(area, CASE_STEP_FIRST + k, best, ranks));
        row->wait_ms[k] = ms(max_over_ranks(area, CASE_WAIT_FIRST + k, best, ranks));
    }
    row->steps_best_ms = ms(steps_ns[best]);
    row->steps_median_ms = ms(moe_bench_median(steps_ns, o->repeats));
    row->busiest_rows = busiest_rows(moe_run_area_counts(app), ranks, s->experts);
    moe_launch_destroy(&launch);
    return 0;
}

/* Runs one forward in a fresh launch, as `moe-ep run` does. Returns 0 with
 * the max over ranks of the step sum and the launch time, in ns. */
static int forward_cold(const struct moe_bench_options *o,
                        struct moe_dist_input *input, int ranks,
                        double *steps_ns, double *launch_ns)
{
    const struct moe_shape *s = &input->weights->shape;
    struct moe_launch launch;
    struct moe_launch_config config = {
        .ranks = ranks,
        .ring_capacity = o->ring_bytes,
        .app_bytes = moe_run_area_bytes(s, ranks, 0),
        .timeout_ns = RANK_TIMEOUT_NS,
        .rank_main = moe_dist_rank_main,
        .arg = input,
    };
    int rc = moe_launch_create(&launch, &config);
    if (rc)
        return rc;
    moe_run_area_init(moe_segment_app(launch.segment), s, ranks, 0);
    if ((rc = moe_bench_launch(&launch, "the forward"))) {
        moe_launch_destroy(&launch);
        return rc;
    }

    uint64_t slowest = 0;
    for (int r = 0; r < ranks; r++) {
        const struct moe_rank_slot *slot = moe_segment_slot(launch.segment, r);
        uint64_t sum = 0;
        for (int k = 0; k < FORWARD_STEP_COUNT; k++)
            sum += slot->step_ns[FORWARD_STEPS[k]];
        if (sum > slowest)
            slowest = sum;
    }
    *steps_ns = (double)slowest;
    *launch_ns = (double)launch.elapsed_ns;
    moe_launch_destroy(&launch);
    return 0;
}

static int forward_at(const struct moe_bench_options *o,
                      struct moe_dist_input *input, int ranks,
                      struct moe_bench_forward *row)
{
    *row = (struct moe_bench_forward){.ranks = ranks};
    int rc = forward_steady(o, input, ranks, row);
    if (rc)
        return rc;

    double steps_ns[MOE_BENCH_MAX_REPEATS], launch_ns[MOE_BENCH_MAX_REPEATS];
    for (int rep = 0; rep < o->repeats; rep++)
        if ((rc = forward_cold(o, input, ranks, &steps_ns[rep], &launch_ns[rep])))
            return rc;
    row->cold_steps_best_ms = ms(moe_bench_min(steps_ns, o->repeats));
    row->launch_best_ms = ms(moe_bench_min(launch_ns, o->repeats));
    row->launch_median_ms = ms(moe_bench_median(launch_ns, o->repeats));
    return 0;
}

/* Fills counts[] with 1, 2, 4, 8 and --ranks, ascending and without
 * repeats. Returns how many. */
static int forward_rank_counts(int main_ranks, int *counts)
{
    int n = 0;
    for (int ranks = 1; ranks <= 8; ranks *= 2) {
        if (main_ranks > ranks / 2 && main_ranks < ranks)
            counts[n++] = main_ranks;
        counts[n++] = ranks;
    }
    if (main_ranks > 8)
        counts[n++] = main_ranks;
    return n;
}

void moe_bench_print_forward(FILE *out, const struct moe_bench_options *o,
                             const struct moe_bench_results *res)
{
    fprintf(out,
        "## Forward\n\n"
        "The layer: T %" PRId64 ", H %" PRId64 ", F %" PRId64 ", E %" PRId64
        ", K %" PRId64 ", seed %d, rings of %" PRIu64 " bytes. A forward's "
        "time is the max over the ranks of the sum of a rank's step times, "
        "route to combine, which leaves out fork, attach and exit. "
        "*Steady* forwards run in one launch: one warm-up forward, then %d "
        "forwards with the same buffers, each after a barrier. *Cold* "
        "forwards run one per launch, as `moe-ep run` does, %d launches; "
        "*launch to exit* runs from the first fork to the last rank's exit. "
        "Ratios divide by the expert-GEMM floor, %.1f ms. This machine has %d "
        "cores, so more ranks than that share cores, and 1 rank uses one "
        "core, whose ratio cannot go below the all-core rate over the 1-thread "
        "rate (%.2f here).\n\n",
        o->tokens, o->hidden, o->ffn, o->experts, o->top_k, MOE_BENCH_SEED,
        o->ring_bytes, o->repeats, o->repeats, res->floor_ms, res->cores,
        res->machine_gflops / res->sgemm_one_gflops);
    fprintf(out, "| ranks | steady best, ms | median, ms | best / floor "
            "| median / floor | cold best, ms | launch to exit best, ms "
            "| median, ms | best / floor |\n"
            "|---|---|---|---|---|---|---|---|---|\n");
    for (int i = 0; i < res->forward_count; i++) {
        const struct moe_bench_forward *f = &res->forward[i];
        fprintf(out, "| %d%s | %.1f | %.1f | %.2f | %.2f | %.1f | %.1f | %.1f "
                "| %.2f |\n", f->ranks, f->ranks == o->ranks ? " (main)" : "",
                f->steps_best_ms, f->steps_median_ms,
                f->steps_best_ms / res->floor_ms,
                f->steps_median_ms / res->floor_ms, f->cold_steps_best_ms,
                f->launch_best_ms, f->launch_median_ms,
                f->launch_best_ms / res->floor_ms);
    }

    fprintf(out,
        "\nSteps of the best steady forward at each rank count, in ms: the "
        "max over the ranks of each step's time, with the max time spent "
        "waiting on peers in brackets. *Busiest rows* is the number of rows "
        "the busiest rank gave its experts; at the 1-thread sgemm rate they "
        "take the time in the last column (an estimate, because real experts "
        "get unequal rows and ranks beyond %d share cores).\n\n"
        "| ranks | route | layout exchange | dispatch | compute | combine "
        "| busiest rows | their GEMM time at 1 thread |\n"
        "|---|---|---|---|---|---|---|---|\n", res->cores);
    for (int i = 0; i < res->forward_count; i++) {
        const struct moe_bench_forward *f = &res->forward[i];
        fprintf(out, "| %d |", f->ranks);
        for (int k = 0; k < FORWARD_STEP_COUNT; k++)
            fprintf(out, " %.1f (%.1f) |", f->step_ms[k], f->wait_ms[k]);
        double gemm_ms = 6.0 * (double)f->busiest_rows * (double)o->hidden *
                         (double)o->ffn / res->sgemm_one_gflops / 1e6;
        fprintf(out, " %" PRId64 " | %.1f |\n", f->busiest_rows, gemm_ms);
    }
    fprintf(out, "\n");
}

/* Draws the bench layer's weights and tokens from MOE_BENCH_SEED. The
 * caller frees both. Returns 0, -EINVAL for a layer too large for this
 * machine, or -ENOMEM. */
static int make_layer(const struct moe_bench_options *o, struct moe_weights *weights,
                      float **tokens)
{
    struct moe_shape shape = {.tokens = o->tokens, .hidden = o->hidden,
                              .ffn = o->ffn, .experts = o->experts,
                              .top_k = o->top_k};
    int rc = moe_run_check_memory(&shape, 0);
    if (rc)
        return rc;
    if ((rc = moe_weights_init_random(weights, &shape, MOE_BENCH_SEED)))
        return rc;
    *tokens = malloc((size_t)(shape.tokens * shape.hidden) * sizeof(float));
    if (!*tokens) {
        moe_weights_free(weights);
        return moe_fail(-ENOMEM, "out of memory for %" PRId64 " tokens", shape.tokens);
    }
    moe_tokens_random(*tokens, 0, shape.tokens, shape.hidden, MOE_BENCH_SEED);
    return 0;
}

int moe_bench_measure_forward(const struct moe_bench_options *o,
                              struct moe_bench_results *res)
{
    struct moe_weights weights = {0};
    float *tokens = NULL;
    int rc = make_layer(o, &weights, &tokens);
    if (rc)
        return rc;

    struct moe_dist_input input = {.weights = &weights, .tokens = tokens};
    int counts[MOE_BENCH_MAX_FORWARDS];
    res->forward_count = forward_rank_counts(o->ranks, counts);
    for (int i = 0; i < res->forward_count && rc == 0; i++)
        rc = forward_at(o, &input, counts[i], &res->forward[i]);
    free(tokens);
    moe_weights_free(&weights);
    return rc;
}

int moe_bench_measure_forward_steady(const struct moe_bench_options *o, int ranks,
                                     struct moe_bench_forward *row)
{
    struct moe_weights weights = {0};
    float *tokens = NULL;
    int rc = make_layer(o, &weights, &tokens);
    if (rc)
        return rc;

    struct moe_dist_input input = {.weights = &weights, .tokens = tokens};
    *row = (struct moe_bench_forward){.ranks = ranks};
    rc = forward_steady(o, &input, ranks, row);
    free(tokens);
    moe_weights_free(&weights);
    return rc;
}

/* ---- all-to-all -------------------------------------------------------- */

/* The cases of an all-to-all launch. Case i sends bytes[i] to each other
 * rank and nothing to itself. */
struct alltoall_plan {
    int cases;
    uint64_t bytes[MOE_BENCH_MAX_CASES];
    int one_token_case; /* index of the 1-token dispatch, or -1 */
    uint64_t max_bytes; /* the largest of bytes[] */
    int repeats;
    int64_t loop_ns;
};

/* One rank's buffers: block p of send and recv starts at p * max_bytes. */
struct alltoall_state {
    uint8_t *send, *recv; /* (R, max_bytes) each */
    uint64_t *send_bytes, *send_offsets, *recv_bytes, *recv_offsets; /* (R) */
};

/* The byte that rank src sends to rank dst, so that a misdelivered block
 * shows. */
static uint8_t pattern_byte(int src, int dst)
{
    return (uint8_t)(src * 31 + dst * 7 + 1);
}

static int run_alltoall(struct moe_comm *comm, void *state)
{
    struct alltoall_state *a = state;
    return moe_alltoallv(comm, a->send, a->send_bytes, a->send_offsets, a->recv,
                         a->recv_bytes, a->recv_offsets);
}

/* Checks that every block received in the last call holds its sender's
 * pattern. Returns 0 or -EPROTO. */
static int check_received(const struct moe_comm *comm,
                          const struct alltoall_state *a, uint64_t bytes,
                          uint64_t stride)
{
    for (int src = 0; src < comm->ranks; src++) {
        if (src == comm->rank)
            continue;
        const uint8_t *block = a->recv + (uint64_t)src * stride;
        uint8_t expected = pattern_byte(src, comm->rank);
        for (uint64_t i = 0; i < bytes; i++)
            if (block[i] != expected)
                return moe_fail(-EPROTO, "rank %d: byte %" PRIu64 " of the "
                                "%" PRIu64 "-byte block from rank %d is %u, "
                                "expected %u", comm->rank, i, bytes, src,
                                block[i], expected);
    }
    return 0;
}

static int alltoall_case(struct moe_comm *comm, struct moe_bench_area *area,
                         const struct alltoall_plan *plan, int index,
                         struct alltoall_state *a)
{
    int R = comm->ranks;
    uint64_t bytes = plan->bytes[index];
    for (int p = 0; p < R; p++) {
        a->send_bytes[p] = a->recv_bytes[p] = p == comm->rank ? 0 : bytes;
        a->send_offsets[p] = a->recv_offsets[p] = (uint64_t)p * plan->max_bytes;
    }
    memset(a->recv, 0, (size_t)R * plan->max_bytes);
    int rc = moe_bench_time_ranks(comm, area, index, plan->repeats, plan->loop_ns,
                                  run_alltoall, a);
    if (rc == 0)
        rc = check_received(comm, a, bytes, plan->max_bytes);
    return rc;
}

/* Rank entry point of an all-to-all launch: times every case of the plan
 * in order. */
static int alltoall_rank_main(struct moe_comm *comm, void *arg)
{
    const struct alltoall_plan *plan = arg;
    struct moe_bench_area *area = comm->app;
    int R = comm->ranks;
    if (comm->segment->app_bytes < sizeof *area || area->magic != MOE_BENCH_AREA_MAGIC)
        return moe_fail(-EPROTO, "rank %d: the bench area is missing", comm->rank);

    struct alltoall_state a = {
        .send = malloc((size_t)R * plan->max_bytes),
        .recv = malloc((size_t)R * plan->max_bytes),
        .send_bytes = calloc(4 * (size_t)R, sizeof(uint64_t)),
    };
    int rc = 0;
    if (!a.send || !a.recv || !a.send_bytes) {
        rc = moe_fail(-ENOMEM, "rank %d: out of memory for all-to-all buffers "
                      "of %" PRIu64 " bytes", comm->rank, R * plan->max_bytes);
        goto out;
    }
    a.send_offsets = a.send_bytes + R;
    a.recv_bytes = a.send_bytes + 2 * R;
    a.recv_offsets = a.send_bytes + 3 * R;
    for (int dst = 0; dst < R; dst++)
        memset(a.send + (uint64_t)dst * plan->max_bytes,
               pattern_byte(comm->rank, dst), plan->max_bytes);

    for (int i = 0; i < plan->cases && rc == 0; i++)
        rc = alltoall_case(comm, area, plan, i, &a);
out:
    free(a.send);
    free(a.recv);
    free(a.send_bytes);
    return rc;
}

/* Launches `ranks` ranks with rings of `ring_bytes` that time every case of
 * `plan`, and appends one row per case to rows[*count]. */
static int alltoall_at(const struct moe_bench_options *o,
                       const struct alltoall_plan *plan, int ranks,
                       uint64_t ring_bytes, struct moe_bench_alltoall *rows,
                       int *count)
{
    struct alltoall_plan local = *plan;
    struct moe_launch launch;
    struct moe_launch_config config = {
        .ranks = ranks,
        .ring_capacity = ring_bytes,
        .app_bytes = sizeof(struct moe_bench_area),
        .timeout_ns = RANK_TIMEOUT_NS,
        .rank_main = alltoall_rank_main,
        .arg = &local,
    };
    int rc = moe_launch_create(&launch, &config);
    if (rc)
        return rc;
    struct moe_bench_area *area = moe_segment_app(launch.segment);
    area->magic = MOE_BENCH_AREA_MAGIC;
    if ((rc = moe_bench_launch(&launch, "the all-to-all figure"))) {
        moe_launch_destroy(&launch);
        return rc;
    }

    double per_call_ns[MOE_BENCH_MAX_REPEATS];
    for (int i = 0; i < plan->cases; i++) {
        moe_bench_area_per_call(area, i, ranks, o->repeats, per_call_ns);
        double crossing = (double)ranks * (ranks - 1) * (double)plan->bytes[i];
        double best_ns = moe_bench_min(per_call_ns, o->repeats);
        double median_ns = moe_bench_median(per_call_ns, o->repeats);
        rows[(*count)++] = (struct moe_bench_alltoall){
            .ranks = ranks,
            .ring_bytes = ring_bytes,
            .bytes_per_pair = plan->bytes[i],
            .one_token = i == plan->one_token_case,
            .calls = area->calls[i],
            .best_us = best_ns / 1e3,
            .median_us = median_ns / 1e3,
            .best_gbps = crossing / best_ns,
            .median_gbps = crossing / median_ns,
        };
    }
    moe_launch_destroy(&launch);
    return 0;
}

const struct moe_bench_alltoall *
moe_bench_find_alltoall(const struct moe_bench_results *res, int ranks,
                        uint64_t bytes_per_pair)
{
    for (int i = 0; i < res->alltoall_count; i++)
        if (res->alltoall[i].ranks == ranks && !res->alltoall[i].one_token &&
            res->alltoall[i].bytes_per_pair == bytes_per_pair)
            return &res->alltoall[i];
    return NULL;
}

/* Prints one table row. The ratio column compares with memcpy at the same
 * size, when that size was measured. */
static void print_alltoall_row(FILE *out, const struct moe_bench_results *res,
                               const struct moe_bench_alltoall *a,
                               const char *first_column)
{
    char size[32];
    moe_bench_format_bytes(a->bytes_per_pair, size, sizeof size);
    fprintf(out, "| %s | %s%s | %" PRId64 " | %.2f | %.2f | %.2f | %.2f |",
            first_column, a->one_token ? "1 token, " : "", size, a->calls,
            a->best_us, a->median_us, a->best_gbps, a->median_gbps);
    double memcpy_gbps = moe_bench_memcpy_gbps(res, a->bytes_per_pair);
    if (a->one_token || memcpy_gbps == 0)
        fprintf(out, " - | - |\n");
    else
        fprintf(out, " %.1f | %.0f%% |\n", memcpy_gbps,
                100 * a->best_gbps / memcpy_gbps);
}

static const char ALLTOALL_COLUMNS[] =
    "| us per call, best | median | GB/s, best | median | memcpy GB/s "
    "| best / memcpy |\n|---|---|---|---|---|---|---|---|---|\n";

void moe_bench_print_alltoall(FILE *out, const struct moe_bench_options *o,
                              const struct moe_bench_results *res)
{
    fprintf(out,
        "## All-to-all\n\n"
        "Each rank calls `moe_alltoallv` with the given bytes for every other "
        "rank and none for itself, through rings of %" PRIu64 " bytes. A rank "
        "makes one warm-up call and probe calls that size the loop, then %d loops, "
        "each after a barrier; a loop's time is the slowest rank's, and the "
        "time per call is that divided by the calls. *Throughput* counts the "
        "bytes that cross between distinct ranks, R x (R - 1) x bytes per "
        "pair, per second. The ratio divides it by the one-process memcpy "
        "bandwidth at the same size: each byte that crosses is copied twice "
        "(into the ring and out of it), by two processes that run at once "
        "when R is at most the %d cores. The *1 token* row sends one row of "
        "H = %" PRId64 " floats to each peer, the dispatch of a single token; "
        "its time per call is its latency. Every received block is checked "
        "against its sender's byte pattern after the loops.\n\n",
        o->ring_bytes, o->repeats, res->cores, o->hidden);
    fprintf(out, "| ranks | bytes per pair | calls per loop %s", ALLTOALL_COLUMNS);
    for (int i = 0; i < res->alltoall_count; i++) {
        char ranks[16];
        snprintf(ranks, sizeof ranks, "%d", res->alltoall[i].ranks);
        print_alltoall_row(out, res, &res->alltoall[i], ranks);
    }

    fprintf(out,
        "\nThe same at 2 ranks and 1 MiB per pair with other ring sizes "
        "(`--ring-size`); each ring carries records of at most a quarter of "
        "its size.\n\n");
    fprintf(out, "| ring | bytes per pair | calls per loop %s", ALLTOALL_COLUMNS);
    for (int i = 0; i < res->ring_sweep_count; i++) {
        char ring[48];
        moe_bench_format_bytes(res->ring_sweep[i].ring_bytes, ring, sizeof ring);
        if (res->ring_sweep[i].ring_bytes == o->ring_bytes)
            strcat(ring, " (as above)");
        print_alltoall_row(out, res, &res->ring_sweep[i], ring);
    }
    fprintf(out, "\n");
}

/* Returns the plan of the all-to-all table: 4 KiB, 64 KiB, 1 MiB and
 * 4 MiB per pair, then the 1-token dispatch of H floats. */
static struct alltoall_plan alltoall_table_plan(const struct moe_bench_options *o)
{
    struct alltoall_plan plan = {
        .cases = 5,
        .bytes = {4 << 10, 64 << 10, 1 << 20, 4 << 20,
                  (uint64_t)o->hidden * sizeof(float)},
        .one_token_case = 4,
        .repeats = o->repeats,
        .loop_ns = moe_bench_loop_ns(o),
    };
    for (int i = 0; i < plan.cases; i++)
        if (plan.bytes[i] > plan.max_bytes)
            plan.max_bytes = plan.bytes[i];
    return plan;
}

int moe_bench_measure_alltoall_at(const struct moe_bench_options *o, int ranks,
                                  struct moe_bench_results *res)
{
    struct alltoall_plan plan = alltoall_table_plan(o);
    if (res->alltoall_count + plan.cases > MOE_BENCH_MAX_ALLTOALLS)
        return moe_fail(-ENOSPC, "the all-to-all table is full at %d rows",
                        MOE_BENCH_MAX_ALLTOALLS);
    return alltoall_at(o, &plan, ranks, o->ring_bytes, res->alltoall,
                       &res->alltoall_count);
}

int moe_bench_measure_alltoall(const struct moe_bench_options *o,
                               struct moe_bench_results *res)
{
    static const int rank_counts[] = {2, 4};
    for (size_t i = 0; i < sizeof rank_counts / sizeof rank_counts[0]; i++) {
        int rc = moe_bench_measure_alltoall_at(o, rank_counts[i], res);
        if (rc)
            return rc;
    }

    struct alltoall_plan sweep = {
        .cases = 1,
        .bytes = {1 << 20},
        .max_bytes = 1 << 20,
        .one_token_case = -1,
        .repeats = o->repeats,
        .loop_ns = moe_bench_loop_ns(o),
    };
    static const uint64_t rings[] = {64 << 10, 256 << 10, 1 << 20, 4 << 20};
    for (size_t i = 0; i < sizeof rings / sizeof rings[0]; i++) {
        int rc = alltoall_at(o, &sweep, 2, rings[i], res->ring_sweep,
                             &res->ring_sweep_count);
        if (rc)
            return rc;
    }
    return 0;
}
