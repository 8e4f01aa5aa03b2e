/*
 * report.c - the text report of `moe-ep run`.
 *
 * Prints to the stream it is given and touches no other state.
 */
#include "moe_aux.h"
#include "moe_dump.h"
#include "moe_run.h"

#include <inttypes.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

static double ms(uint64_t ns)
{
    return (double)ns / 1e6;
}

static void print_layer(FILE *out, const struct moe_run_result *r)
{
    static const char *const scorings[] = {"softmax-topk", "topk-softmax", "sigmoid"};
    const struct moe_run_options *o = &r->options;
    const struct moe_router *router = &r->router;
    if (o->model_dir)
        fprintf(out, "  layer: %s %s %" PRId64 " of %s\n", r->family,
                !strcmp(r->family, "switch_transformers") ? "encoder block" : "layer",
                r->layer, o->model_dir);
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

/* Width of the longest bar in the tokens-per-expert chart. */
enum { BAR_WIDTH = 40 };

/* Prints one expert's bar: '#' for kept assignments, 'x' for dropped
 * ones, scaled so that the busiest expert fills BAR_WIDTH. */
static void print_bar(FILE *out, int64_t kept, int64_t dropped, int64_t max)
{
    int kept_chars = max ? (int)((kept * BAR_WIDTH + max - 1) / max) : 0;
    int total_chars = max ? (int)(((kept + dropped) * BAR_WIDTH + max - 1) / max) : 0;
    for (int i = 0; i < total_chars; i++)
        fputc(i < kept_chars ? '#' : 'x', out);
}

static void print_routing(FILE *out, const struct moe_run_result *r)
{
    const struct moe_shape *s = &r->options.shape;
    int R = r->options.ranks;
    int64_t E = s->experts, last = r->options.steps - 1;
    const int64_t *routed = r->stats + last * r->stats_len + 1;
    const int64_t *dropped = r->dropped + last * E;
    int64_t per_rank[MOE_MAX_RANKS] = {0};
    int64_t max = 0, total_dropped = 0;

    for (int64_t e = 0; e < E; e++) {
        per_rank[moe_expert_owner(E, R, e)] += routed[e] - dropped[e];
        total_dropped += dropped[e];
        if (routed[e] > max)
            max = routed[e];
    }

    if (r->capacity.limit >= 0)
        fprintf(out, "  capacity: %" PRId64 " assignments per expert, %s policy\n",
                r->capacity.limit,
                r->capacity.policy == MOE_DROP_PROBS ? "probs" : "position");
    fprintf(out, "\ntokens per expert%s ('#' computed, 'x' dropped):\n",
            r->options.steps > 1 ? " in the last forward" : "");
    fprintf(out, "  expert  rank   routed  dropped\n");
    /* Past 64 experts, show the busiest and the idlest few. */
    int64_t shown = 0;
    for (int64_t e = 0; e < E; e++) {
        if (E > 64 && e >= 16 && e < E - 8) {
            if (e == 16)
                fprintf(out, "  ... %" PRId64 " experts not shown; --stats has all\n",
                        E - 24);
            continue;
        }
        fprintf(out, "  %6" PRId64 "  %4d  %7" PRId64 "  %7" PRId64 "  ", e,
                moe_expert_owner(E, R, e), routed[e], dropped[e]);
        print_bar(out, routed[e] - dropped[e], dropped[e], max);
        fprintf(out, "\n");
        shown++;
    }
    fprintf(out, "  imbalance (max/mean over experts): %.3f", moe_run_imbalance(routed, E));
    if (r->capacity.limit >= 0)
        fprintf(out, "; dropped %" PRId64 " of %" PRId64 " assignments", total_dropped,
                s->tokens * s->top_k);
    fprintf(out, "\n");

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
            moe_run_imbalance(per_rank, R));
}

static void print_traffic(FILE *out, const struct moe_run_result *r)
{
    const struct moe_shape *s = &r->options.shape;
    int R = r->options.ranks;
    int64_t E = s->experts;
    uint64_t row_bytes = (uint64_t)s->hidden * sizeof(float);
    uint64_t crossing = 0, allreduce = 0, capacity = 0, saved = 0, layout = 0;

    fprintf(out, "\nall-to-all traffic, rows sent from rank i to rank j in dispatch "
            "(combine returns the same rows), and bytes:\n  %6s", "i \\ j");
    for (int j = 0; j < R; j++)
        fprintf(out, " %7d", j);
    fprintf(out, "  | bytes to each j\n");
    for (int i = 0; i < R; i++) {
        int64_t rows[MOE_MAX_RANKS] = {0};
        fprintf(out, "  %6d", i);
        for (int j = 0; j < R; j++) {
            int64_t first, count;
            moe_block_range(E, R, j, &first, &count);
            for (int64_t e = first; e < first + count; e++)
                rows[j] += r->kept_counts[i * E + e];
            if (i != j)
                crossing += (uint64_t)rows[j] * row_bytes;
            fprintf(out, " %7" PRId64, rows[j]);
        }
        fprintf(out, "  |");
        for (int j = 0; j < R; j++)
            fprintf(out, " %" PRIu64, (uint64_t)rows[j] * row_bytes);
        fprintf(out, "\n");
    }
    for (int rank = 0; rank < R; rank++) {
        allreduce += r->report[rank].allreduce_bytes;
        capacity += r->report[rank].capacity_bytes;
        saved += r->report[rank].saved_bytes;
        layout += r->report[rank].bytes_sent[MOE_STEP_LAYOUT];
    }
    layout -= allreduce + capacity;
    fprintf(out, "  bytes sent to other ranks (the diagonal is copied locally)%s:\n",
            r->options.steps > 1 ? ", last forward for the rows, all forwards for "
            "the rest" : "");
    fprintf(out, "    dispatch rows %" PRIu64 ", combine rows %" PRIu64 "\n", crossing,
            crossing);
    fprintf(out, "    layout all-gather %" PRIu64 ", router-stats all-reduce %" PRIu64,
            layout, allreduce);
    if (capacity)
        fprintf(out, ", capacity weights and flags %" PRIu64, capacity);
    fprintf(out, "\n");
    if (r->capacity.limit >= 0)
        fprintf(out, "    not sent because the rows were dropped first: %" PRIu64 "\n",
                saved);
}

static void print_losses(FILE *out, const struct moe_run_result *r)
{
    struct moe_aux_losses l;
    moe_run_aux_losses(r, r->options.steps - 1, &l);
    fprintf(out, "\naux losses%s: load balance %.6g, router z-loss %.6g",
            r->options.steps > 1 ? " of the last forward" : "", l.load_balance, l.z_loss);
    if (!isnan(l.aux_loss_coef) || !isnan(l.z_loss_coef)) {
        fprintf(out, "\n  scaled by the config:");
        if (!isnan(l.aux_loss_coef))
            fprintf(out, " load balance x %g = %.6g", l.aux_loss_coef, l.load_balance_scaled);
        if (!isnan(l.z_loss_coef))
            fprintf(out, "%s z-loss x %g = %.6g", isnan(l.aux_loss_coef) ? "" : ";",
                    l.z_loss_coef, l.z_loss_scaled);
    }
    fprintf(out, "\n");
}

/* With --steps: one line per forward with its imbalance and drops. */
static void print_forwards(FILE *out, const struct moe_run_result *r)
{
    int64_t E = r->options.shape.experts;
    fprintf(out, "\nimbalance per forward (max/mean tokens per expert)%s:\n",
            r->options.bias_update_rate > 0 ? ", with the selection bias updated "
            "after each" : "");
    for (int64_t step = 0; step < r->options.steps; step++) {
        const int64_t *routed = r->stats + step * r->stats_len + 1;
        int64_t dropped = 0;
        for (int64_t e = 0; e < E; e++)
            dropped += r->dropped[step * E + e];
        struct moe_aux_losses l;
        moe_run_aux_losses(r, step, &l);
        fprintf(out, "  forward %3" PRId64 ": imbalance %.3f, load-balance loss %.4f",
                step, moe_run_imbalance(routed, E), l.load_balance);
        if (r->capacity.limit >= 0)
            fprintf(out, ", dropped %" PRId64, dropped);
        fprintf(out, "\n");
    }
}

static void print_steps(FILE *out, const struct moe_run_result *r)
{
    static const int steps[] = {MOE_STEP_ROUTE, MOE_STEP_LAYOUT,
                                MOE_STEP_DISPATCH, MOE_STEP_COMPUTE,
                                MOE_STEP_COMBINE};
    fprintf(out, "\nstep times per rank in ms (waiting on peers in brackets)%s:\n",
            r->options.steps > 1 ? ", summed over all forwards" : "");
    fprintf(out, "  rank  %-17s %-17s %-17s %-17s %-17s %s\n", "route",
            "layout exchange", "dispatch", "compute", "combine", "total wait");
    for (int rank = 0; rank < r->options.ranks; rank++) {
        fprintf(out, "  %4d ", rank);
        for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
            char cell[32];
            snprintf(cell, sizeof cell, "%.3f (%.3f)", ms(r->step_ns[rank][steps[i]]),
                     ms(r->wait_ns[rank][steps[i]]));
            fprintf(out, " %-17s", cell);
        }
        uint64_t wait = 0;
        for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++)
            wait += r->wait_ns[rank][steps[i]];
        fprintf(out, " %.3f\n", ms(wait));
    }
    fprintf(out, "  forward on %d rank%s, start to end: %.3f ms; golden "
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
    if (o->transport == MOE_TRANSPORT_MPI)
        fprintf(out, "; transport mpi (one rank per MPI process); timeout %g s\n",
                o->timeout_seconds);
    else
        fprintf(out, "; transport shm, ring %" PRIu64 " bytes x %d; timeout %g s; "
                "%ld cores online\n", o->ring_bytes, o->ranks * o->ranks,
                o->timeout_seconds, sysconf(_SC_NPROCESSORS_ONLN));
    fprintf(out, "  OpenBLAS threads per rank: %d%s; exchange: %s\n", r->blas_threads,
            o->threads                            ? " (--threads)"
            : o->transport == MOE_TRANSPORT_MPI   ? " (1 under mpi unless --threads)"
                                                  : " (cores / ranks, at least 1)",
            o->transport == MOE_TRANSPORT_MPI ? "MPI messages"
            : o->exchange_rings                ? "rows in the rings"
            : o->overlap                       ? "direct, each expert starts when its rows are in"
                                               : "direct, compute waits for all rows");

    print_layer(out, r);
    print_routing(out, r);
    print_traffic(out, r);
    print_losses(out, r);
    if (o->steps > 1)
        print_forwards(out, r);
    print_steps(out, r);
    for (int rank = 0; o->trace_path && rank < o->ranks; rank++)
        if (r->report[rank].trace_dropped > 0)
            fprintf(out, "\ntrace: rank %d's buffer filled up in forward %" PRId64
                    ", so its %" PRId64 " later spans are missing from %s\n", rank,
                    r->report[rank].trace_full_forward, r->report[rank].trace_dropped,
                    o->trace_path);
    if (o->dump_dir)
        print_stage_checks(out, r);
    if (o->output_path || o->stats_path || o->trace_path || o->plot_dir)
        fprintf(out, "\n");
    if (o->output_path)
        fprintf(out, "output written to %s\n", o->output_path);
    if (o->stats_path)
        fprintf(out, "stats written to %s\n", o->stats_path);
    if (o->trace_path)
        fprintf(out, "trace written to %s\n", o->trace_path);
    if (o->plot_dir)
        fprintf(out, "pictures written to %s: traffic.svg, experts.svg, timeline.svg\n",
                o->plot_dir);

    if (r->routing_mismatch_step >= 0)
        fprintf(out, "\ngolden check: MISMATCH in the routing stats or drops of "
                "forward %" PRId64 "\n", r->routing_mismatch_step);
    if (!r->kept_equal)
        fprintf(out, "\ngolden check: MISMATCH in which assignments were dropped\n");
    const struct moe_compare *c = &r->check;
    if (!o->check) {
        fprintf(out, "\ngolden check: skipped (--check off)\n");
        return;
    }
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
