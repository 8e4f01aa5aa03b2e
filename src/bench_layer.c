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

/* Largest ratio between the highest and the lowest time per token above
 * the decode regime that the scaling section still calls linear. */
static const double LINEAR_TOLERANCE = 1.2;

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
/* The indexes of MOE_STEP_DISPATCH, MOE_STEP_COMPUTE and MOE_STEP_COMBINE
 * in FORWARD_STEPS. */
enum { DISPATCH_COLUMN = 2, COMPUTE_COLUMN = 3, COMBINE_COLUMN = 4 };

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
 * then each step's time, then each step's wait, then the step sum of the
 * forwards run without eviction after them. */
enum {
    CASE_STEP_SUM = 0,
    CASE_STEP_FIRST = 1,
    CASE_WAIT_FIRST = CASE_STEP_FIRST + FORWARD_STEP_COUNT,
    CASE_WARM_SUM = CASE_WAIT_FIRST + FORWARD_STEP_COUNT,
};
static_assert(CASE_WARM_SUM < MOE_BENCH_MAX_CASES,
              "the bench area has a case for every step and wait");

/* Options of the timed forwards of a steady-state launch. */
struct forward_mode {
    int evict; /* evict the rank's expert weights and the gate from the
                  caches before each timed forward */
    int warm;  /* then time `repeats` forwards more without eviction */
    int rings; /* send the rows through the rings, not the direct exchange */
};

/* Inputs of every rank of a steady-state forward launch. */
struct forward_plan {
    const struct moe_dist_input *input;
    int repeats;
    struct forward_mode mode;
    uint64_t bench_offset; /* of the struct moe_bench_area in the app area */
};

/* Copies the step sum of the forward just run into case `index`, repeat
 * `rep`. */
static void record_forward_sum(struct moe_bench_area *area,
                               const struct moe_rank_slot *slot, int rep,
                               int rank, int index)
{
    int64_t sum = 0;
    for (int k = 0; k < FORWARD_STEP_COUNT; k++)
        sum += (int64_t)slot->step_ns[FORWARD_STEPS[k]];
    area->loop_ns[index][rep][rank] = sum;
}

/* Copies the step times of the forward just run into repeat `rep`. */
static void record_forward(struct moe_bench_area *area,
                           const struct moe_rank_slot *slot, int rep, int rank)
{
    for (int k = 0; k < FORWARD_STEP_COUNT; k++) {
        int step = FORWARD_STEPS[k];
        area->loop_ns[CASE_STEP_FIRST + k][rep][rank] = (int64_t)slot->step_ns[step];
        area->loop_ns[CASE_WAIT_FIRST + k][rep][rank] = (int64_t)slot->wait_ns[step];
    }
    record_forward_sum(area, slot, rep, rank, CASE_STEP_SUM);
}

/* Evicts from the caches the weights that `rank` reads in a forward: the
 * experts it owns and the gate. The weights live in the launcher's memory,
 * which every rank maps through fork, so the eviction reaches the same
 * physical lines that the forward reads. */
static void evict_rank_weights(const struct moe_weights *w, int ranks, int rank)
{
    int64_t H = w->shape.hidden, F = w->shape.ffn, first, count;
    moe_block_range(w->shape.experts, ranks, rank, &first, &count);
    int64_t at = first - w->expert_first;
    uint64_t matrix_bytes = (uint64_t)(F * H) * sizeof(float);
    moe_bench_evict(w->w1 + at * F * H, (uint64_t)count * matrix_bytes);
    if (w->w3)
        moe_bench_evict(w->w3 + at * F * H, (uint64_t)count * matrix_bytes);
    moe_bench_evict(w->w2 + at * H * F, (uint64_t)count * matrix_bytes);
    moe_bench_evict(w->gate, (uint64_t)(w->shape.experts * H) * sizeof(float));
}

/* Runs one forward after a barrier, with the slot's step times zeroed
 * first: the forward adds its times to the slot, and only this forward's
 * are wanted. */
static int timed_forward(struct moe_comm *comm, struct moe_dist_rank *rank,
                         struct moe_rank_slot *slot)
{
    int rc = moe_barrier(comm);
    memset(slot->step_ns, 0, sizeof slot->step_ns);
    memset(slot->wait_ns, 0, sizeof slot->wait_ns);
    if (rc == 0)
        rc = moe_dist_forward(rank);
    return rc;
}

/* Rank entry point of a steady-state launch: one warm-up forward, which
 * faults in the rank's buffers, then `repeats` forwards, each after a
 * barrier, with the same buffers. With mode.evict each of them starts with
 * the rank's weights out of the caches; with mode.warm, `repeats` forwards
 * without eviction follow. */
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
        if (plan->mode.evict)
            evict_rank_weights(plan->input->weights, comm->ranks, comm->rank);
        rc = timed_forward(comm, rank, slot);
        if (rc == 0)
            record_forward(area, slot, rep, comm->rank);
    }
    for (int rep = 0; rc == 0 && plan->mode.warm && rep < plan->repeats; rep++) {
        rc = timed_forward(comm, rank, slot);
        if (rc == 0)
            record_forward_sum(area, slot, rep, comm->rank, CASE_WARM_SUM);
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

/* Fills scaling->touched_* and busiest_bytes from the (R, E) counts of
 * rows that each rank routed to each expert. */
static void count_touched(const int64_t *counts, int ranks,
                          const struct moe_weights *w,
                          struct moe_bench_scaling *scaling)
{
    int64_t H = w->shape.hidden, F = w->shape.ffn, E = w->shape.experts;
    uint64_t expert_bytes = (uint64_t)((w->w3 ? 3 : 2) * F * H) * sizeof(float);
    uint64_t gate_bytes = (uint64_t)(E * H) * sizeof(float);
    int64_t owned_touched[MOE_MAX_RANKS] = {0};
    scaling->touched_experts = 0;
    for (int64_t e = 0; e < E; e++) {
        int64_t rows = 0;
        for (int r = 0; r < ranks; r++)
            rows += counts[r * E + e];
        if (rows == 0)
            continue;
        scaling->touched_experts++;
        owned_touched[moe_expert_owner(E, ranks, e)]++;
    }
    int64_t busiest = 0;
    for (int r = 0; r < ranks; r++)
        if (owned_touched[r] > busiest)
            busiest = owned_touched[r];
    scaling->touched_bytes = (uint64_t)scaling->touched_experts * expert_bytes +
                             gate_bytes;
    scaling->busiest_bytes = (uint64_t)busiest * expert_bytes + gate_bytes;
}

/* Fills the steady-state columns of `row` from one launch of `ranks` ranks
 * that run 1 + repeats forwards (1 + 2 x repeats with mode->warm). When
 * `scaling` is not NULL, also fills its times and touched weights. */
static int forward_steady(const struct moe_bench_options *o,
                          const struct moe_dist_input *input, int ranks,
                          const struct forward_mode *mode,
                          struct moe_bench_forward *row,
                          struct moe_bench_scaling *scaling)
{
    const struct moe_shape *s = &input->weights->shape;
    /* As moe-ep run: the direct exchange, and cores / ranks threads. */
    struct moe_run_area_spec spec = {.steps = 1, .windows = !mode->rings};
    struct moe_dist_input threaded = *input;
    threaded.blas_threads = moe_blas_threads_auto(ranks);
    uint64_t run_bytes = moe_run_area_bytes(s, ranks, &spec);
    if (run_bytes == 0)
        return moe_fail(-EINVAL, "the output of %" PRId64 " x %" PRId64
                        " floats is too large", s->tokens, s->hidden);
    struct forward_plan plan = {.input = &threaded, .repeats = o->repeats,
                                .mode = *mode,
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
    moe_run_area_init(app, s, ranks, &spec);
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
    if (scaling) {
        *scaling = (struct moe_bench_scaling){
            .ranks = ranks,
            .tokens = s->tokens,
            .best_ms = row->steps_best_ms,
            .median_ms = row->steps_median_ms,
            .compute_ms = row->step_ms[COMPUTE_COLUMN],
            .compute_wait_ms = row->wait_ms[COMPUTE_COLUMN],
        };
        if (mode->warm) {
            double warm_ns[MOE_BENCH_MAX_REPEATS];
            for (int rep = 0; rep < o->repeats; rep++)
                warm_ns[rep] = max_over_ranks(area, CASE_WARM_SUM, rep, ranks);
            scaling->warm_best_ms = ms(moe_bench_min(warm_ns, o->repeats));
        }
        count_touched(moe_run_area_counts(app), ranks, input->weights, scaling);
    }
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
    struct moe_run_area_spec spec = {.steps = 1, .windows = 1};
    struct moe_dist_input threaded = *input;
    threaded.blas_threads = moe_blas_threads_auto(ranks);
    struct moe_launch launch;
    struct moe_launch_config config = {
        .ranks = ranks,
        .ring_capacity = o->ring_bytes,
        .app_bytes = moe_run_area_bytes(s, ranks, &spec),
        .timeout_ns = RANK_TIMEOUT_NS,
        .rank_main = moe_dist_rank_main,
        .arg = &threaded,
    };
    int rc = moe_launch_create(&launch, &config);
    if (rc)
        return rc;
    moe_run_area_init(moe_segment_app(launch.segment), s, ranks, &spec);
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
    static const struct forward_mode cached = {0};
    int rc = forward_steady(o, input, ranks, &cached, row, NULL);
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
        "As `moe-ep run` does by default, the ranks use the direct exchange "
        "(rows written once into the owner's window, notes in the rings) and "
        "cores / ranks OpenBLAS threads each, at least 1. "
        "Ratios divide by the expert-GEMM floor, %.1f ms. This machine has %d "
        "cores, so more ranks than that share cores.\n\n",
        o->tokens, o->hidden, o->ffn, o->experts, o->top_k, MOE_BENCH_SEED,
        o->ring_bytes, o->repeats, o->repeats, res->floor_ms, res->cores);
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

    /* The default forward at --ranks, against its two alternatives. */
    const struct moe_bench_forward *main_row = NULL;
    for (int i = 0; i < res->forward_count; i++)
        if (res->forward[i].ranks == o->ranks)
            main_row = &res->forward[i];
    if (main_row && res->overlap_off.steps_best_ms > 0 && res->rings.steps_best_ms > 0) {
        fprintf(out,
            "\nThe steady forward at %d ranks with each exchange, best and median "
            "in ms, and the best against the default's. *Overlap off* makes every "
            "expert wait for all of its rank's rows, where the default starts each "
            "expert once its own rows are in; the difference is what the overlap "
            "gains.\n\n"
            "| exchange | best, ms | median, ms | best / default | dispatch | compute "
            "| combine |\n|---|---|---|---|---|---|---|\n", o->ranks);
        const struct moe_bench_forward *rows[] = {main_row, &res->overlap_off, &res->rings};
        static const char *const names[] = {"direct (default)", "direct, overlap off",
                                            "rings"};
        for (int i = 0; i < 3; i++)
            fprintf(out, "| %s | %.1f | %.1f | %.3f | %.1f (%.1f) | %.1f (%.1f) "
                    "| %.1f (%.1f) |\n", names[i], rows[i]->steps_best_ms,
                    rows[i]->steps_median_ms, rows[i]->steps_best_ms / main_row->steps_best_ms,
                    rows[i]->step_ms[DISPATCH_COLUMN], rows[i]->wait_ms[DISPATCH_COLUMN],
                    rows[i]->step_ms[COMPUTE_COLUMN], rows[i]->wait_ms[COMPUTE_COLUMN],
                    rows[i]->step_ms[COMBINE_COLUMN], rows[i]->wait_ms[COMBINE_COLUMN]);
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
    struct moe_dist_input wait_all = input;
    wait_all.wait_all_rows = 1;
    static const struct forward_mode cached = {0}, rings = {.rings = 1};
    res->overlap_off = (struct moe_bench_forward){.ranks = o->ranks};
    res->rings = (struct moe_bench_forward){.ranks = o->ranks};
    if (rc == 0)
        rc = forward_steady(o, &wait_all, o->ranks, &cached, &res->overlap_off, NULL);
    if (rc == 0)
        rc = forward_steady(o, &input, o->ranks, &rings, &res->rings, NULL);
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
    static const struct forward_mode cached = {0};
    rc = forward_steady(o, &input, ranks, &cached, row, NULL);
    free(tokens);
    moe_weights_free(&weights);
    return rc;
}

/* ---- decode and scaling ------------------------------------------------- */

const int64_t MOE_BENCH_DECODE_TOKENS[MOE_BENCH_DECODE_COUNTS] = {1, 4, 8};

/* Batch sizes of the scaling table over tokens, at MOE_BENCH_DECODE_RANKS
 * ranks. The sizes above twice --tokens are left out. */
static const int64_t SWEEP_TOKENS[] = {1, 4, 16, 64, 256, 1024, 4096, 8192};
/* Rank counts of the scaling table over ranks, at --tokens. */
static const int SWEEP_RANKS[] = {1, 2, 4, 8};

/* Returns the timed forwards of a decode row: 4 x --repeats, at most
 * MOE_BENCH_MAX_REPEATS. A decode forward takes milliseconds, so more of
 * them cost little, and they make the best one less likely to be one that
 * another process slowed down. */
static int decode_repeats(const struct moe_bench_options *o)
{
    return 4 * o->repeats < MOE_BENCH_MAX_REPEATS ? 4 * o->repeats
                                                   : MOE_BENCH_MAX_REPEATS;
}

/* One forward launch of the decode and scaling tables. */
struct scaling_config {
    int ranks;
    int64_t tokens;
    int warm; /* also time forwards without eviction */
};

/* Adds (ranks, tokens) to the list unless it is there already, so that a
 * pair that both tables use is measured once. */
static void add_config(struct scaling_config *list, int *count, int ranks,
                       int64_t tokens, int warm)
{
    for (int i = 0; i < *count; i++) {
        if (list[i].ranks == ranks && list[i].tokens == tokens) {
            list[i].warm |= warm;
            return;
        }
    }
    list[(*count)++] = (struct scaling_config){ranks, tokens, warm};
}

/* Fills list[] with the forwards of the decode table, then those of the
 * scaling tables. Returns how many. */
static int scaling_configs(const struct moe_bench_options *o,
                           struct scaling_config *list)
{
    int count = 0;
    for (int i = 0; i < MOE_BENCH_DECODE_COUNTS; i++)
        add_config(list, &count, MOE_BENCH_DECODE_RANKS,
                   MOE_BENCH_DECODE_RANKS * MOE_BENCH_DECODE_TOKENS[i], 1);
    for (size_t i = 0; i < sizeof SWEEP_TOKENS / sizeof SWEEP_TOKENS[0]; i++)
        if (SWEEP_TOKENS[i] <= 2 * o->tokens)
            add_config(list, &count, MOE_BENCH_DECODE_RANKS, SWEEP_TOKENS[i], 0);
    for (size_t i = 0; i < sizeof SWEEP_RANKS / sizeof SWEEP_RANKS[0]; i++)
        add_config(list, &count, SWEEP_RANKS[i], o->tokens, 0);
    return count;
}
static_assert(MOE_BENCH_DECODE_COUNTS + sizeof SWEEP_TOKENS / sizeof SWEEP_TOKENS[0] +
              sizeof SWEEP_RANKS / sizeof SWEEP_RANKS[0] <= MOE_BENCH_MAX_SCALING,
              "the scaling rows fit in the results");

int moe_bench_measure_scaling(const struct moe_bench_options *o,
                              struct moe_bench_results *res)
{
    struct scaling_config list[MOE_BENCH_MAX_SCALING];
    int count = scaling_configs(o, list);

    /* One layer with the largest batch. A smaller batch is its first
     * tokens, which moe_tokens_random draws the same for any batch size. */
    struct moe_bench_options largest = *o;
    for (int i = 0; i < count; i++)
        if (list[i].tokens > largest.tokens)
            largest.tokens = list[i].tokens;
    struct moe_weights weights = {0};
    float *tokens = NULL;
    int rc = make_layer(&largest, &weights, &tokens);
    if (rc == 0)
        rc = moe_bench_measure_read_again(o, res, MOE_BENCH_READ_DECODE);
    if (rc) {
        free(tokens);
        moe_weights_free(&weights);
        return rc;
    }

    res->scaling_count = 0;
    for (int i = 0; i < count && rc == 0; i++) {
        struct moe_weights batch = weights;
        batch.shape.tokens = list[i].tokens;
        struct moe_dist_input input = {.weights = &batch, .tokens = tokens};
        struct forward_mode mode = {.evict = 1, .warm = list[i].warm};
        struct moe_bench_forward row = {.ranks = list[i].ranks};
        struct moe_bench_options timing = *o;
        if (list[i].warm)
            timing.repeats = decode_repeats(o);
        rc = forward_steady(&timing, &input, list[i].ranks, &mode, &row,
                            &res->scaling[res->scaling_count]);
        if (rc == 0)
            res->scaling_count++;
    }
    free(tokens);
    moe_weights_free(&weights);
    return rc;
}

const struct moe_bench_scaling *
moe_bench_find_scaling(const struct moe_bench_results *res, int ranks,
                       int64_t tokens)
{
    for (int i = 0; i < res->scaling_count; i++)
        if (res->scaling[i].ranks == ranks && res->scaling[i].tokens == tokens)
            return &res->scaling[i];
    return NULL;
}

double moe_bench_stream_floor_ms(const struct moe_bench_results *res,
                                 const struct moe_bench_scaling *row)
{
    /* Bytes per GB/s are ns. */
    return ms((double)row->touched_bytes / res->read_machine_gbps);
}

double moe_bench_gemm_floor_ms(const struct moe_bench_options *o,
                               const struct moe_bench_results *res,
                               int64_t tokens)
{
    double flops = 6.0 * (double)(tokens * o->top_k) * (double)o->hidden *
                   (double)o->ffn;
    return flops / res->machine_gflops / 1e6;
}

static double mib(uint64_t bytes)
{
    return (double)bytes / (1024.0 * 1024.0);
}

void moe_bench_print_decode(FILE *out, const struct moe_bench_options *o,
                            const struct moe_bench_results *res)
{
    double layer_mib = mib((uint64_t)(3 * o->experts * o->hidden * o->ffn) *
                           sizeof(float));
    fprintf(out,
        "## Decode\n\n"
        "%d ranks with %" PRId64 ", %" PRId64 " and %" PRId64 " tokens each, "
        "on the layer of the forward table (H %" PRId64 ", F %" PRId64 ", "
        "E %" PRId64 ", K %" PRId64 ", seed %d). One launch per row: one "
        "warm-up forward, then %d timed forwards (4 x --repeats, since each "
        "takes only milliseconds). Before each of them every rank evicts "
        "from the caches the weights it reads (the experts it owns and the "
        "gate) and waits at a barrier. %d forwards without eviction follow, "
        "the *cached* column. A forward's time is as in the forward "
        "table. *Compute of the best* is the compute step of the best "
        "forward, the max over the ranks, with its time waiting on peers in "
        "brackets.\n\n"
        "The layer's %" PRId64 " experts take %.0f MiB. On a machine whose "
        "caches are smaller than that, the weights of one forward are gone "
        "by the next. This one reports an L3 cache of its own (see the "
        "streaming read), so the eviction is what makes each timed forward "
        "read its weights from memory%s.\n\n"
        "An expert is *touched* when it gets at least one row. The "
        "weight-stream floor is the bytes of the touched experts, 3 x H x F "
        "x 4 each, plus the gate, E x H x 4, at the machine read rate, "
        "%.1f GB/s. It assumes that the touched weights are split evenly "
        "over the cores. The last columns give the most that one rank "
        "reads (its touched experts and the gate), that at the 1-process "
        "read rate, %.1f GB/s, and its ratio to the floor. Under expert "
        "parallelism only the owner of an expert reads its weights, and a "
        "rank that streams alone reads no faster, so with this routing no "
        "forward can go below that ratio.\n\n",
        MOE_BENCH_DECODE_RANKS, MOE_BENCH_DECODE_TOKENS[0],
        MOE_BENCH_DECODE_TOKENS[1], MOE_BENCH_DECODE_TOKENS[2], o->hidden,
        o->ffn, o->experts, o->top_k, MOE_BENCH_SEED, decode_repeats(o),
        decode_repeats(o), o->experts, layer_mib,
        res->cache_evicted ? "" : ", but this build cannot evict (only x86 "
        "can), so part of them may come from a cache",
        res->read_machine_gbps, res->read_one_gbps);
    fprintf(out,
        "| tokens per rank | touched experts | touched MiB | floor, ms "
        "| best, ms | median, ms | best / floor | median / floor "
        "| compute of the best, ms | cached best, ms | busiest rank MiB "
        "| its time alone, ms | alone / floor |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (int i = 0; i < MOE_BENCH_DECODE_COUNTS; i++) {
        int64_t per_rank = MOE_BENCH_DECODE_TOKENS[i];
        const struct moe_bench_scaling *r = moe_bench_find_scaling(
            res, MOE_BENCH_DECODE_RANKS, MOE_BENCH_DECODE_RANKS * per_rank);
        if (!r)
            continue;
        double floor_ms = moe_bench_stream_floor_ms(res, r);
        double alone_ms = ms((double)r->busiest_bytes / res->read_one_gbps);
        fprintf(out, "| %" PRId64 " | %" PRId64 " | %.1f | %.2f | %.2f | %.2f "
                "| %.2f | %.2f | %.2f (%.2f) | %.2f | %.1f | %.2f | %.2f |\n",
                per_rank, r->touched_experts, mib(r->touched_bytes), floor_ms,
                r->best_ms, r->median_ms, r->best_ms / floor_ms,
                r->median_ms / floor_ms, r->compute_ms, r->compute_wait_ms,
                r->warm_best_ms, mib(r->busiest_bytes), alone_ms,
                alone_ms / floor_ms);
    }
    fprintf(out, "\n");
}

/* Prints one row of a scaling table; `first` is its first cell. */
static void print_scaling_row(FILE *out, const struct moe_bench_options *o,
                              const struct moe_bench_results *res,
                              const struct moe_bench_scaling *r, const char *first)
{
    double gemm_ms = moe_bench_gemm_floor_ms(o, res, r->tokens);
    double stream_ms = moe_bench_stream_floor_ms(res, r);
    double floor_ms = gemm_ms > stream_ms ? gemm_ms : stream_ms;
    fprintf(out, "| %s | %" PRId64 " | %.2f | %.2f | %.2f | %.2f | %.2f "
            "| %.2f | %.2f |\n", first, r->touched_experts, gemm_ms, stream_ms,
            r->best_ms, r->median_ms, r->best_ms / floor_ms,
            r->median_ms / floor_ms, 1e3 * r->best_ms / (double)r->tokens);
}

static const char SCALING_COLUMNS[] =
    "| touched experts | GEMM floor, ms | stream floor, ms | best, ms "
    "| median, ms | best / floor | median / floor | best per token, us |\n"
    "|---|---|---|---|---|---|---|---|---|\n";

/* Returns the best time per token of a row, in us. */
static double us_per_token(const struct moe_bench_scaling *r)
{
    return 1e3 * r->best_ms / (double)r->tokens;
}

/* Prints whether the time per token stays flat over the rows of the
 * tokens table whose GEMM floor exceeds their stream floor, and from which
 * batch size on it stays within LINEAR_TOLERANCE of its lowest value. */
static void print_linearity(FILE *out, const struct moe_bench_options *o,
                            const struct moe_bench_results *res)
{
    const struct moe_bench_scaling *rows[MOE_BENCH_MAX_SCALING];
    int count = 0;
    for (size_t i = 0; i < sizeof SWEEP_TOKENS / sizeof SWEEP_TOKENS[0]; i++) {
        const struct moe_bench_scaling *r =
            moe_bench_find_scaling(res, MOE_BENCH_DECODE_RANKS, SWEEP_TOKENS[i]);
        if (r && moe_bench_gemm_floor_ms(o, res, r->tokens) >=
                 moe_bench_stream_floor_ms(res, r))
            rows[count++] = r;
    }
    if (count < 2) {
        fprintf(out, "Fewer than two rows of the tokens table lie above the "
                "decode regime, so this run cannot tell whether the growth "
                "there is linear.\n\n");
        return;
    }

    const struct moe_bench_scaling *low = rows[0], *high = rows[0];
    for (int i = 1; i < count; i++) {
        if (us_per_token(rows[i]) < us_per_token(low))
            low = rows[i];
        if (us_per_token(rows[i]) > us_per_token(high))
            high = rows[i];
    }
    fprintf(out,
        "Above the decode regime, from %" PRId64 " tokens on, where the GEMM "
        "floor exceeds the weight-stream floor, the best time per token runs "
        "from %.1f us (%" PRId64 " tokens) to %.1f us (%" PRId64 " tokens), "
        "%.2f times as much. ", rows[0]->tokens, us_per_token(low), low->tokens,
        us_per_token(high), high->tokens, us_per_token(high) / us_per_token(low));
    if (us_per_token(high) <= LINEAR_TOLERANCE * us_per_token(low)) {
        fprintf(out, "The growth is linear in tokens there, within %.0f%%.\n\n",
                100 * (LINEAR_TOLERANCE - 1));
        return;
    }

    /* The rows are in ascending tokens: find the first one from which every
     * row stays within the tolerance of the lowest time per token. */
    int linear_from = count;
    while (linear_from > 0 &&
           us_per_token(rows[linear_from - 1]) <= LINEAR_TOLERANCE * us_per_token(low))
        linear_from--;
    fprintf(out, "The growth is not linear there within %.0f%%. Each expert "
            "gets T x K / E rows on average, and an expert call on fewer rows "
            "runs further below the sgemm rate of the floor, which was "
            "measured at M = %" PRId64 ". ", 100 * (LINEAR_TOLERANCE - 1),
            res->gemm_rows);
    if (linear_from < count - 1)
        fprintf(out, "From %" PRId64 " tokens on it is linear within %.0f%%.\n\n",
                rows[linear_from]->tokens, 100 * (LINEAR_TOLERANCE - 1));
    else if (linear_from == count - 1)
        fprintf(out, "Only the largest batch is within %.0f%% of the lowest "
                "time per token.\n\n", 100 * (LINEAR_TOLERANCE - 1));
    else
        fprintf(out, "Even the largest batch takes more than %.0f%% above the "
                "lowest time per token.\n\n", 100 * (LINEAR_TOLERANCE - 1));
}

void moe_bench_print_scaling(FILE *out, const struct moe_bench_options *o,
                             const struct moe_bench_results *res)
{
    fprintf(out,
        "## Scaling\n\n"
        "The forward against the tokens of the batch at %d ranks, and "
        "against the ranks at %" PRId64 " tokens, measured as the decode "
        "table is: the weights are evicted before every timed forward. The "
        "floor of a row is the larger of the expert-GEMM floor (its expert "
        "FLOPs, 2 x 3 x (T x K) x H x F, at the machine sgemm rate, %.1f "
        "GFLOP/s) and the weight-stream floor (its touched weights at %.1f "
        "GB/s); the ratios divide by that floor.\n\n",
        MOE_BENCH_DECODE_RANKS, o->tokens, res->machine_gflops,
        res->read_machine_gbps);
    fprintf(out, "| tokens %s", SCALING_COLUMNS);
    for (size_t i = 0; i < sizeof SWEEP_TOKENS / sizeof SWEEP_TOKENS[0]; i++) {
        const struct moe_bench_scaling *r =
            moe_bench_find_scaling(res, MOE_BENCH_DECODE_RANKS, SWEEP_TOKENS[i]);
        char first[32];
        snprintf(first, sizeof first, "%" PRId64, SWEEP_TOKENS[i]);
        if (r)
            print_scaling_row(out, o, res, r, first);
    }
    fprintf(out, "\n");
    print_linearity(out, o, res);

    fprintf(out,
        "At %" PRId64 " tokens. This machine has %d cores: 1 rank uses one "
        "of them, and more ranks than cores share them.\n\n"
        "| ranks %s", o->tokens, res->cores, SCALING_COLUMNS);
    for (size_t i = 0; i < sizeof SWEEP_RANKS / sizeof SWEEP_RANKS[0]; i++) {
        const struct moe_bench_scaling *r =
            moe_bench_find_scaling(res, SWEEP_RANKS[i], o->tokens);
        char first[32];
        snprintf(first, sizeof first, "%d", SWEEP_RANKS[i]);
        if (r)
            print_scaling_row(out, o, res, r, first);
    }
    fprintf(out, "\n");
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
    int direct;         /* time moe_alltoallv_direct instead of moe_alltoallv */
};

/* With plan->direct, the app area contains the receive windows after the
 * struct moe_bench_area: two per rank, which calls alternate between, so
 * that a sender never writes into the window its receiver may still read.
 * Window w of rank r is (R, max_bytes), block s for source s, and starts
 * at (2 r + w) x R x max_bytes. */
#define WINDOWS_OFFSET ((sizeof(struct moe_bench_area) + 4095) & ~(size_t)4095)

/* One rank's buffers: block p of send and recv starts at p * max_bytes. */
struct alltoall_state {
    const struct alltoall_plan *plan;
    uint8_t *send, *recv; /* (R, max_bytes) each */
    uint64_t *send_bytes, *send_offsets, *recv_bytes, *recv_offsets; /* (R) */
    uint8_t *windows;     /* the app area's windows, with plan->direct */
    void **dst;           /* (R): where the next direct call writes */
    int window;           /* 0 or 1: the window of the next direct call */
};

/* The byte that rank src sends to rank dst in case `index`, so that a
 * misdelivered block, or one left from an earlier case, shows. */
static uint8_t pattern_byte(int src, int dst, int index)
{
    return (uint8_t)(src * 31 + dst * 7 + index * 73 + 1);
}

static uint8_t *window_block(const struct alltoall_state *a, int ranks,
                             int rank, int window, int src)
{
    uint64_t index = ((uint64_t)rank * 2 + (uint64_t)window) * (uint64_t)ranks +
                     (uint64_t)src;
    return a->windows + index * a->plan->max_bytes;
}

static int run_alltoall(struct moe_comm *comm, void *state)
{
    struct alltoall_state *a = state;
    return moe_alltoallv(comm, a->send, a->send_bytes, a->send_offsets, a->recv,
                         a->recv_bytes, a->recv_offsets);
}

static int run_alltoall_direct(struct moe_comm *comm, void *state)
{
    struct alltoall_state *a = state;
    for (int d = 0; d < comm->ranks; d++)
        a->dst[d] = window_block(a, comm->ranks, d, a->window, comm->rank);
    a->window ^= 1;
    return moe_alltoallv_direct(comm, a->send, a->send_bytes, a->send_offsets,
                                a->dst, a->recv_bytes);
}

/* Checks that every block received in the last call of case `index` holds
 * its sender's pattern. Returns 0 or -EPROTO. */
static int check_received(const struct moe_comm *comm,
                          const struct alltoall_state *a, int index)
{
    uint64_t bytes = a->plan->bytes[index];
    for (int src = 0; src < comm->ranks; src++) {
        if (src == comm->rank)
            continue;
        const uint8_t *block =
            a->plan->direct ? window_block(a, comm->ranks, comm->rank, a->window ^ 1, src)
                            : a->recv + (uint64_t)src * a->plan->max_bytes;
        uint8_t expected = pattern_byte(src, comm->rank, index);
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
        memset(a->send + (uint64_t)p * plan->max_bytes,
               pattern_byte(comm->rank, p, index), plan->max_bytes);
    }
    /* The direct windows are not cleared: a peer may already write into
     * one of them, and the pattern of each case differs anyway. */
    memset(a->recv, 0, (size_t)R * plan->max_bytes);
    int rc = moe_bench_time_ranks(comm, area, index, plan->repeats, plan->loop_ns,
                                  plan->direct ? run_alltoall_direct : run_alltoall, a);
    if (rc == 0)
        rc = check_received(comm, a, index);
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

    uint64_t windows_bytes = 2 * (uint64_t)R * (uint64_t)R * plan->max_bytes;
    if (plan->direct && comm->app_bytes < WINDOWS_OFFSET + windows_bytes)
        return moe_fail(-EPROTO, "rank %d: the app area of %" PRIu64 " bytes "
                        "has no room for the receive windows", comm->rank,
                        comm->app_bytes);
    struct alltoall_state a = {
        .plan = plan,
        .send = malloc((size_t)R * plan->max_bytes),
        .recv = malloc((size_t)R * plan->max_bytes),
        .send_bytes = calloc(4 * (size_t)R, sizeof(uint64_t)),
        .windows = (uint8_t *)comm->app + WINDOWS_OFFSET,
        .dst = calloc((size_t)R, sizeof(void *)),
    };
    int rc = 0;
    if (!a.send || !a.recv || !a.send_bytes || !a.dst) {
        rc = moe_fail(-ENOMEM, "rank %d: out of memory for all-to-all buffers "
                      "of %" PRIu64 " bytes", comm->rank, R * plan->max_bytes);
        goto out;
    }
    a.send_offsets = a.send_bytes + R;
    a.recv_bytes = a.send_bytes + 2 * R;
    a.recv_offsets = a.send_bytes + 3 * R;

    for (int i = 0; i < plan->cases && rc == 0; i++)
        rc = alltoall_case(comm, area, plan, i, &a);
out:
    free(a.send);
    free(a.recv);
    free(a.send_bytes);
    free(a.dst);
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
    uint64_t windows_bytes = 2 * (uint64_t)ranks * (uint64_t)ranks * plan->max_bytes;
    struct moe_launch_config config = {
        .ranks = ranks,
        .ring_capacity = ring_bytes,
        .app_bytes = plan->direct ? WINDOWS_OFFSET + windows_bytes
                                  : sizeof(struct moe_bench_area),
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
/* The same with the column of the call. */
static const char ALLTOALL_CALL_COLUMNS[] =
    "| us per call, best | median | GB/s, best | median | memcpy GB/s "
    "| best / memcpy |\n|---|---|---|---|---|---|---|---|---|---|\n";

/* Returns the moe_alltoallv_direct row of the same ranks and case as the
 * ring row `a`, or NULL. */
static const struct moe_bench_alltoall *
find_direct(const struct moe_bench_results *res, const struct moe_bench_alltoall *a)
{
    for (int i = 0; i < res->direct_count; i++)
        if (res->direct[i].ranks == a->ranks &&
            res->direct[i].one_token == a->one_token &&
            res->direct[i].bytes_per_pair == a->bytes_per_pair)
            return &res->direct[i];
    return NULL;
}

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
        "against its sender's byte pattern after the loops.\n\n"
        "`moe_alltoallv_direct` rows make the same calls with the zero-copy "
        "exchange: a rank copies each block once, straight into a window of "
        "its receiver in the shared segment, and sends the receiver a note "
        "through the ring. Each rank has two windows in the bench's app "
        "area, and successive calls alternate between them, so a sender "
        "never writes into the window that its receiver may still read.\n\n",
        o->ring_bytes, o->repeats, res->cores, o->hidden);
    fprintf(out, "| ranks | call | bytes per pair | calls per loop %s",
            ALLTOALL_CALL_COLUMNS);
    for (int i = 0; i < res->alltoall_count; i++) {
        const struct moe_bench_alltoall *a = &res->alltoall[i];
        char first[64];
        snprintf(first, sizeof first, "%d | `moe_alltoallv`", a->ranks);
        print_alltoall_row(out, res, a, first);
        const struct moe_bench_alltoall *direct = find_direct(res, a);
        if (direct) {
            snprintf(first, sizeof first, "%d | `moe_alltoallv_direct`", a->ranks);
            print_alltoall_row(out, res, direct, first);
        }
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
    struct alltoall_plan direct = alltoall_table_plan(o);
    direct.direct = 1;
    static_assert(2 * 5 <= MOE_BENCH_MAX_ALLTOALLS, "the direct rows fit");
    for (size_t i = 0; i < sizeof rank_counts / sizeof rank_counts[0]; i++) {
        int rc = alltoall_at(o, &direct, rank_counts[i], o->ring_bytes,
                             res->direct, &res->direct_count);
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
