/*
 * report.c - the text report of `moe-ep run`.
 *
 * Prints to the stream it is given and touches no other state.
 */
#include "moe_dump.h"
#include "moe_run.h"

#include <inttypes.h>
#include <string.h>
#include <unistd.h>

static double ms(uint64_t ns)
{
    return (double)ns / 1e6;
}

/* Returns max/mean of values[0..count), the imbalance figure. */
static double imbalance(const int64_t *values, int64_t count)
{
    int64_t max = 0, sum = 0;
    for (int64_t i = 0; i < count; i++) {
        sum += values[i];
        if (values[i] > max)
            max = values[i];
    }
    return sum == 0 ? 0.0 : (double)max * (double)count / (double)sum;
}

static void print_layer(FILE *out, const struct moe_run_result *r)
{
    static const char *const scorings[] = {"softmax-topk", "topk-softmax", "sigmoid"};
    const struct moe_run_options *o = &r->options;
    const struct moe_router *router = &r->router;
    if (o->model_dir)
        fprintf(out, "  layer: %s layer %" PRId64 " of %s\n", r->family, r->layer,
                o->model_dir);
    else
        fprintf(out, "  layer: random weights, seed %" PRIu64 "\n", o->seed);
    fprintf(out, "  router: %s, renormalize %s, scaling factor %g",
            scorings[router->scoring], router->renormalize ? "on" : "off",
            (double)router->scaling_factor);
    if (router->groups > 1)
        fprintf(out, ", %" PRId64 " of %" PRId64 " groups", router->topk_groups,
                router->groups);
    if (o->shape.shared_ffn > 0)
        fprintf(out, "; shared expert of width %" PRId64, o->shape.shared_ffn);
    fprintf(out, "\n");
}

/* Prints the bitwise check of each dumped stage against the golden path. */
static void print_stage_checks(FILE *out, const struct moe_run_result *r)
{
    fprintf(out, "\nstages dumped to %s, each checked against the golden path:\n",
            r->options.dump_dir);
    for (int i = 0; i < MOE_STAGE_COUNT; i++) {
        const struct moe_compare *c = &r->stage_check[i];
        if (!r->stage[i])
            continue;
        if (c->equal)
            fprintf(out, "  %-14s bitwise equal\n", moe_stage_name(i));
        else
            fprintf(out, "  %-14s MISMATCH: %" PRId64 " elements differ, the first "
                    "at index %" PRId64 "\n", moe_stage_name(i), c->mismatches,
                    c->first);
    }
    if (r->stage_mismatch >= 0)
        fprintf(out, "  first stage that differs: %s\n", moe_stage_name(r->stage_mismatch));
}

static void print_routing(FILE *out, const struct moe_run_result *r)
{
    const struct moe_shape *s = &r->options.shape;
    int R = r->options.ranks;
    int64_t E = s->experts;
    int64_t per_expert[4096] = {0};
    int64_t per_rank[MOE_MAX_RANKS] = {0};

    for (int src = 0; src < R; src++)
        for (int64_t e = 0; e < E; e++)
            per_expert[e] += r->counts[src * E + e];
    for (int64_t e = 0; e < E; e++)
        per_rank[moe_expert_owner(E, R, e)] += per_expert[e];

    fprintf(out, "\ntokens per expert (rows each expert computes):\n");
    fprintf(out, "  expert  rank     rows\n");
    for (int64_t e = 0; e < E; e++)
        fprintf(out, "  %6" PRId64 "  %4d  %7" PRId64 "\n", e,
                moe_expert_owner(E, R, e), per_expert[e]);
    fprintf(out, "  imbalance (max/mean over experts): %.3f\n",
            imbalance(per_expert, E));

    fprintf(out, "\ntokens per rank:\n");
    fprintf(out, "  rank   tokens  experts  rows computed\n");
    for (int rank = 0; rank < R; rank++) {
        int64_t first, tokens, efirst, experts;
        moe_block_range(s->tokens, R, rank, &first, &tokens);
        moe_block_range(E, R, rank, &efirst, &experts);
        fprintf(out, "  %4d  %7" PRId64 "  %7" PRId64 "  %13" PRId64 "\n", rank,
                tokens, experts, per_rank[rank]);
    }
    fprintf(out, "  imbalance (max/mean rows computed over ranks): %.3f\n",
            imbalance(per_rank, R));
}

static void print_traffic(FILE *out, const struct moe_run_result *r)
{
    const struct moe_shape *s = &r->options.shape;
    int R = r->options.ranks;
    int64_t E = s->experts;
    uint64_t row_bytes = (uint64_t)s->hidden * sizeof(float);
    uint64_t crossing = 0;

    fprintf(out, "\nall-to-all traffic (rows sent from rank i to rank j in "
            "dispatch; combine returns the same rows):\n  %6s", "i \\ j");
    for (int j = 0; j < R; j++)
        fprintf(out, " %7d", j);
    fprintf(out, "\n");
    for (int i = 0; i < R; i++) {
        fprintf(out, "  %6d", i);
        for (int j = 0; j < R; j++) {
            int64_t first, count, rows = 0;
            moe_block_range(E, R, j, &first, &count);
            for (int64_t e = first; e < first + count; e++)
                rows += r->counts[i * E + e];
            if (i != j)
                crossing += (uint64_t)rows * row_bytes;
            fprintf(out, " %7" PRId64, rows);
        }
        fprintf(out, "\n");
    }
    fprintf(out, "  row payload bytes through the rings per direction: %" PRIu64
            " (the diagonal is copied locally)\n", crossing);
}

static void print_steps(FILE *out, const struct moe_run_result *r)
{
    static const int steps[] = {MOE_STEP_ROUTE, MOE_STEP_LAYOUT,
                                MOE_STEP_DISPATCH, MOE_STEP_COMPUTE,
                                MOE_STEP_COMBINE};
    fprintf(out, "\nstep times per rank in ms (waiting on peers in brackets):\n");
    fprintf(out, "  rank  %-17s %-17s %-17s %-17s %s\n", "route",
            "layout exchange", "dispatch", "compute", "combine");
    for (int rank = 0; rank < r->options.ranks; rank++) {
        fprintf(out, "  %4d ", rank);
        for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
            char cell[32];
            snprintf(cell, sizeof cell, "%.3f (%.3f)", ms(r->step_ns[rank][steps[i]]),
                     ms(r->wait_ns[rank][steps[i]]));
            int last = i + 1 == sizeof steps / sizeof steps[0];
            fprintf(out, last ? " %s" : " %-17s", cell);
        }
        fprintf(out, "\n");
    }
    fprintf(out, "  forward on %d rank%s, launch to last exit: %.3f ms; golden "
            "path in one process: %.3f ms\n", r->options.ranks,
            r->options.ranks == 1 ? "" : "s", ms((uint64_t)r->forward_ns),
            ms((uint64_t)r->golden_ns));
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (cores > 0 && r->options.ranks > cores)
        fprintf(out, "  note: %d ranks share %ld cores, so a step's time also "
                "counts time slices given to other ranks\n", r->options.ranks,
                cores);
}

void moe_run_print_report(FILE *out, const struct moe_run_result *r)
{
    const struct moe_run_options *o = &r->options;
    const struct moe_shape *s = &o->shape;

    fprintf(out, "moe-ep run: %d rank%s, tokens %" PRId64 ", hidden %" PRId64
            ", ffn %" PRId64 ", experts %" PRId64 ", top-k %" PRId64 "\n",
            o->ranks, o->ranks == 1 ? "" : "s", s->tokens, s->hidden, s->ffn,
            s->experts, s->top_k);
    if (o->input_path)
        fprintf(out, "  tokens: %s", o->input_path);
    else
        fprintf(out, "  tokens: random, seed %" PRIu64, o->seed);
    fprintf(out, "; ring %" PRIu64 " bytes x %d; timeout %g s; %ld cores online\n",
            o->ring_bytes, o->ranks * o->ranks, o->timeout_seconds,
            sysconf(_SC_NPROCESSORS_ONLN));

    print_layer(out, r);
    print_routing(out, r);
    print_traffic(out, r);
    print_steps(out, r);
    if (o->dump_dir)
        print_stage_checks(out, r);

    const struct moe_compare *c = &r->check;
    if (c->equal) {
        fprintf(out, "\ngolden check: bitwise equal (%" PRId64 " values)\n",
                s->tokens * s->hidden);
        return;
    }
    uint32_t a, b;
    memcpy(&a, &c->actual, 4);
    memcpy(&b, &c->expected, 4);
    fprintf(out, "\ngolden check: MISMATCH at token %" PRId64 ", column %" PRId64
            ": distributed %.9g (0x%08x), golden %.9g (0x%08x); %" PRId64
            " of %" PRId64 " values differ, max abs difference %.3g\n",
            c->first / s->hidden, c->first % s->hidden, (double)c->actual, a,
            (double)c->expected, b, c->mismatches, s->tokens * s->hidden,
            c->max_abs_diff);
}
