/*
 * explain_sections.c - the further sections of `moe-ep explain`: the
 * skewed router and the wait it causes, token dropping under a capacity,
 * the bytes of the all-to-all against a tensor-parallel all-reduce, and
 * the load-balancing loss.
 *
 * Prints only, from finished runs (struct moe_explain_run). Lines stay
 * under 100 columns.
 */
#include "moe_explain.h"
#include "moe_aux.h"

#include <inttypes.h>
#include <string.h>

#define R MOE_EXPLAIN_RANKS

static double us(int64_t ns)
{
    return (double)ns / 1e3;
}

/* Rows each rank computed: the kept rows of its experts. */
static void rows_per_rank(const struct moe_explain_run *run, int64_t rows[R])
{
    int64_t E = run->weights.shape.experts;
    for (int r = 0; r < R; r++)
        rows[r] = 0;
    for (int64_t e = 0; e < E; e++)
        for (int src = 0; src < R; src++)
            rows[moe_expert_owner(E, R, e)] += run->kept_counts[src * E + e];
}

static void tokens_per_expert(const struct moe_explain_run *run, int64_t *per_expert)
{
    int64_t E = run->weights.shape.experts;
    for (int64_t e = 0; e < E; e++) {
        per_expert[e] = 0;
        for (int src = 0; src < R; src++)
            per_expert[e] += run->counts[src * E + e];
    }
}

/* ---- skewed router ---------------------------------------------------- */

static void print_timing_row(FILE *out, const struct moe_explain_run *run, int r)
{
    fprintf(out, "  %7.1f  %6.1f  %8.1f  %7.1f", us(run->median_step_ns[r][MOE_STEP_COMPUTE]),
            us(run->median_wait_ns[r][MOE_STEP_LAYOUT]),
            us(run->median_wait_ns[r][MOE_STEP_DISPATCH]),
            us(run->median_wait_ns[r][MOE_STEP_COMBINE]));
}

void moe_explain_print_skew(FILE *out, const struct moe_explain_run *plain,
                            const struct moe_explain_run *skewed)
{
    int64_t E = plain->weights.shape.experts;
    int64_t plain_experts[MOE_EXPLAIN_EXPERTS], skewed_experts[MOE_EXPLAIN_EXPERTS];
    int64_t plain_rows[R], skewed_rows[R];
    tokens_per_expert(plain, plain_experts);
    tokens_per_expert(skewed, skewed_experts);
    rows_per_rank(plain, plain_rows);
    rows_per_rank(skewed, skewed_rows);

    fprintf(out, "\n== A skewed router, and the rank that waits ==\n");
    fprintf(out,
            "A trained router is rarely balanced. The skewed router adds -S ln(e + 1) to "
            "the logit\nof expert e, as moe-ep run --skew S does, so the low experts win "
            "more tokens, and the\nrank that owns them gets more rows to compute. Here "
            "S = %g%s.\n", skewed->layer.skew,
            skewed->layer.skew > 0 ? "" : ", so the two routers are the same");
    fprintf(out, "  gate bias:");
    for (int64_t e = 0; e < E; e++)
        /* + 0.0 prints the -0.0 of -S ln(1) as 0 */
        fprintf(out, "  e%" PRId64 " %.4f", e,
                skewed->weights.gate_bias ? (double)skewed->weights.gate_bias[e] + 0.0 : 0.0);
    fprintf(out, "\n\n                          plain router   skewed router\n");
    fprintf(out, "  tokens per expert      ");
    for (int64_t e = 0; e < E; e++)
        fprintf(out, " %2" PRId64, plain_experts[e]);
    fprintf(out, "   ");
    for (int64_t e = 0; e < E; e++)
        fprintf(out, " %2" PRId64, skewed_experts[e]);
    fprintf(out, "\n");
    for (int r = 0; r < R; r++)
        fprintf(out, "  rows computed, rank %d   %12" PRId64 "   %13" PRId64 "\n", r,
                plain_rows[r], skewed_rows[r]);
    double plain_imbalance = moe_run_imbalance(plain_rows, R);
    double skewed_imbalance = moe_run_imbalance(skewed_rows, R);
    fprintf(out, "  imbalance (max/mean)    %12.3f   %13.3f\n", plain_imbalance,
            skewed_imbalance);
    if (skewed_imbalance <= plain_imbalance)
        fprintf(out, "With only %" PRId64 " tokens the plain router is not balanced "
                "either, and here the skew\nmoves rows toward the rank that had "
                "fewer, so the skewed router is not the worse one.\nTry another "
                "--seed, or moe-ep run --skew 2 on the default layer.\n",
                plain->weights.shape.tokens);

    fprintf(out,
            "\nMeasured: each router ran %" PRId64 " forwards of this batch. The medians "
            "over them, in\nmicroseconds, of each rank's compute step and of the time it "
            "waited on its peer\ninside each exchange:\n", skewed->layer.forwards);
    fprintf(out, "        plain router                         skewed router\n");
    fprintf(out, "                  waits in:                            waits in:\n");
    fprintf(out, "  rank  compute  layout  dispatch  combine   compute  layout  dispatch  "
            "combine\n");
    for (int r = 0; r < R; r++) {
        fprintf(out, "  %4d", r);
        print_timing_row(out, plain, r);
        fprintf(out, " ");
        print_timing_row(out, skewed, r);
        fprintf(out, "\n");
    }
    fprintf(out,
            "The rank with fewer rows finishes its experts first and waits in the combine "
            "until\nthe busier rank's outputs come back, for about the difference of "
            "their compute\ntimes. At this size that difference is tiny, and on a busy machine "
            "the scheduler can\nhide it. On the default layer, moe-ep run --skew 2 --ranks 2 "
            "shows the same wait in\nmilliseconds.\n");
}

/* ---- capacity --------------------------------------------------------- */

/* Prints one expert's assignments in global token order, with their
 * weights and what each policy decided. */
static void print_expert_assignments(FILE *out, int64_t e,
                                     const struct moe_explain_run *position,
                                     const struct moe_explain_run *probs)
{
    const struct moe_shape *s = &position->weights.shape;
    int64_t T = s->tokens, K = s->top_k, n = 0, limit = position->weights.capacity.limit;
    for (int64_t i = 0; i < T * K; i++)
        n += position->ids[i] == e;
    int over = limit >= 0 && n > limit;
    fprintf(out, "  expert %" PRId64 " on rank %d, %" PRId64 " assignment%s", e,
            moe_expert_owner(s->experts, R, e), n, n == 1 ? "" : "s");
    if (limit >= 0)
        fprintf(out, ", capacity %" PRId64, limit);
    fprintf(out, "%s\n", over ? ":" : ": all kept");
    if (!over)
        return;
    const struct moe_explain_run *runs[2] = {position, probs};
    const char *labels[2] = {"position", "probs"};
    fprintf(out, "    token    ");
    for (int64_t i = 0; i < T * K; i++)
        if (position->ids[i] == e)
            fprintf(out, " %7" PRId64, i / K);
    fprintf(out, "\n    weight   ");
    for (int64_t i = 0; i < T * K; i++)
        if (position->ids[i] == e)
            fprintf(out, " %7.4f", (double)position->topk_weights[i]);
    for (int p = 0; p < 2; p++) {
        fprintf(out, "\n    %-9s", labels[p]);
        for (int64_t i = 0; i < T * K; i++)
            if (runs[p]->ids[i] == e)
                fprintf(out, " %7s", runs[p]->kept[i] ? "kept" : "DROPPED");
    }
    fprintf(out, "\n");
}

/* Prints "token t loses expert e" for every dropped assignment. */
static void print_drops(FILE *out, const char *label, const struct moe_explain_run *run)
{
    const struct moe_shape *s = &run->weights.shape;
    int64_t printed = 0;
    fprintf(out, "  %-10s", label);
    for (int64_t i = 0; i < s->tokens * s->top_k; i++) {
        if (run->kept[i])
            continue;
        if (printed > 0 && printed % 3 == 0)
            fprintf(out, ",\n            ");
        else if (printed > 0)
            fprintf(out, ", ");
        fprintf(out, "token %" PRId64 " loses expert %" PRId32, i / s->top_k, run->ids[i]);
        printed++;
    }
    fprintf(out, "%s\n", printed ? "" : "nothing dropped");
}

/* Writes out, for h = 0, the output of a token that lost an expert: the
 * sum of its remaining weighted rows. A token that kept some expert comes
 * first, as its sum has terms. */
static void print_dropped_token(FILE *out, const struct moe_explain_run *run)
{
    const struct moe_shape *s = &run->weights.shape;
    int64_t H = s->hidden, K = s->top_k, chosen = -1, chosen_kept = 0;
    for (int64_t t = 0; t < s->tokens; t++) {
        int64_t kept = 0;
        for (int64_t k = 0; k < K; k++)
            kept += run->kept[t * K + k];
        if (kept < K && (chosen < 0 || (chosen_kept == 0 && kept > 0))) {
            chosen = t;
            chosen_kept = kept;
        }
    }
    if (chosen < 0)
        return;

    int64_t t = chosen;
    fprintf(out, "For example token %" PRId64 " under the position policy, value h = 0:\n"
            "  out[%" PRId64 "][0] =", t, t);
    for (int64_t k = 0, terms = 0; k < K; k++) {
        if (!run->kept[t * K + k])
            continue;
        fprintf(out, "%s%.9g x %.9g", terms++ ? " + " : " ",
                (double)run->topk_weights[t * K + k],
                (double)run->expert_out[(t * K + k) * H]);
    }
    if (chosen_kept > 0)
        fprintf(out, " = %.9g\n", (double)run->output[t * H]);
    else
        fprintf(out, " %.9g, because every expert it chose dropped it\n",
                (double)run->output[t * H]);
}

static uint64_t saved_bytes(const struct moe_explain_run *run)
{
    uint64_t sum = 0;
    for (int r = 0; r < R; r++)
        sum += run->report[r].saved_bytes;
    return sum;
}

static uint64_t capacity_bytes(const struct moe_explain_run *run)
{
    uint64_t sum = 0;
    for (int r = 0; r < R; r++)
        sum += run->report[r].capacity_bytes;
    return sum;
}

void moe_explain_print_capacity(FILE *out, double capacity_factor,
                                const struct moe_explain_run *position,
                                const struct moe_explain_run *probs)
{
    const struct moe_shape *s = &position->weights.shape;
    int64_t limit = position->weights.capacity.limit;
    fprintf(out, "\n== Token dropping under a capacity ==\n");
    fprintf(out,
            "An expert can be limited to a capacity of C assignments per batch, so that "
            "no rank\nreceives more rows than its buffers hold. The capacity factor CF "
            "sets it:\n");
    if (limit >= 0)
        fprintf(out, "  C = ceil(CF x T x K / E) = ceil(%g x %" PRId64 " x %" PRId64 " / %"
                PRId64 ") = %" PRId64 "\n", capacity_factor, s->tokens, s->top_k,
                s->experts, limit);
    else
        fprintf(out, "  C = ceil(CF x T x K / E), and CF = %g means no capacity "
                "(dropless)\n", capacity_factor);
    fprintf(out,
            "The skewed router with S = %g routes here. Each expert decides over its "
            "assignments\nin global token order, whichever rank sent them, by one of two "
            "policies: position\nkeeps the first C, probs keeps the C with the highest "
            "routing weights.\n\n", position->layer.skew);
    for (int64_t e = 0; e < s->experts; e++)
        print_expert_assignments(out, e, position, probs);

    fprintf(out, "\nThe assignments dropped:\n");
    print_drops(out, "position:", position);
    print_drops(out, "probs:", probs);
    fprintf(out,
            "A dropped row is never sent. Its token's output is the weighted sum of the "
            "experts it\nkept, with the weights not renormalized.\n");
    print_dropped_token(out, position);
    fprintf(out,
            "Bytes the drops saved in dispatch and combine: position %" PRIu64 ", probs %"
            PRIu64 ".\nThe probs policy needs one more exchange before any row moves: each "
            "rank sends the\nowner of each expert the weights (4 bytes each) and gets a keep "
            "flag (1 byte) back,\n%" PRIu64 " bytes in all here. The position policy "
            "decides from the layout alone.\n",
            saved_bytes(position), saved_bytes(probs), capacity_bytes(probs));
    fprintf(out, "Golden check: position %s, probs %s. The golden path drops the same\n"
            "assignments, because the rule depends on the whole batch, not on the ranks.\n",
            position->check.equal && position->kept_equal ? "bitwise equal" : "MISMATCH",
            probs->check.equal && probs->kept_equal ? "bitwise equal" : "MISMATCH");
}

/* ---- all-to-all against all-reduce ------------------------------------ */

void moe_explain_print_traffic(FILE *out, const struct moe_explain_run *plain)
{
    const struct moe_shape *s = &plain->weights.shape;
    int64_t T = s->tokens, H = s->hidden, K = s->top_k;
    fprintf(out, "\n== All-to-all against all-reduce ==\n");
    fprintf(out,
            "Expert parallelism (EP) moves token rows to the experts and back: a rank sends "
            "its rows\nfor other ranks' experts in the dispatch and gets their outputs back in "
            "the combine.\nTensor parallelism (TP) splits each expert's F columns over the "
            "R ranks instead. Every\nrank then holds all T tokens and computes a partial "
            "sum of the whole (T x H) output,\nwhich a ring all-reduce adds up.\n\n");
    fprintf(out, "EP, measured in this run, bytes each rank sent to the other%s:\n",
            plain->layer.direct ? " (the rows written into\nits windows, the rest in the "
                                  "rings)" : " through the rings");
    fprintf(out, "  rank  dispatch  combine  rows total  layout  router stats\n");
    uint64_t ep_total = 0;
    for (int r = 0; r < R; r++) {
        const struct moe_rank_report *p = &plain->report[r];
        uint64_t rows = p->bytes_sent[MOE_STEP_DISPATCH] + p->bytes_sent[MOE_STEP_COMBINE];
        uint64_t layout = p->bytes_sent[MOE_STEP_LAYOUT] - p->allreduce_bytes -
                          p->capacity_bytes;
        fprintf(out, "  %4d  %8" PRIu64 "  %7" PRIu64 "  %10" PRIu64 "  %6" PRIu64 "  %12"
                PRIu64 "\n", r, p->bytes_sent[MOE_STEP_DISPATCH],
                p->bytes_sent[MOE_STEP_COMBINE], rows, layout, p->allreduce_bytes);
        ep_total += rows;
    }

    /* Per rank, with T / R tokens each and uniform routing, a fraction
     * (R - 1) / R of the K rows of a token goes to another rank. */
    double ep_uniform = 2.0 * ((double)T / R) * (double)K * (R - 1.0) / R * (double)H * 4.0;
    double tp = 2.0 * (R - 1.0) / R * (double)T * (double)H * 4.0;
    fprintf(out, "\nPer rank, in bytes (4 per float):\n");
    fprintf(out, "  EP, uniform routing:  2 x (T/R) x K x (R-1)/R x H x 4 = 2 x %g x %" PRId64
            " x %g x %" PRId64 " x 4 = %g\n", (double)T / R, K, (R - 1.0) / R, H, ep_uniform);
    fprintf(out, "  EP, this run:         mean rows total of the ranks            = %g\n",
            (double)ep_total / R);
    fprintf(out, "  TP, ring all-reduce:  2 x (R-1)/R x T x H x 4 = 2 x %g x %" PRId64 " x %"
            PRId64 " x 4 = %g\n", (double)(R - 1.0) / R, T, H, tp);
    double measured = (double)ep_total / R;
    fprintf(out,
            "With uniform routing the ratio EP / TP is K / R, here %g, so EP moves less once "
            "the\nranks outnumber the experts per token. This run's router sent %s to the "
            "other\nrank than the uniform share. EP also sends the layout, E counts of 8 "
            "bytes per rank,\nand moe-ep sums the router stats of the aux loss exactly, which "
            "outweighs the rows\nof a layer this small.\n",
            ep_uniform / tp, measured > ep_uniform ? "more rows" :
                             measured < ep_uniform ? "fewer rows" : "exactly as many rows");
}

/* ---- aux loss --------------------------------------------------------- */

static void print_aux_row(FILE *out, const char *label, const struct moe_explain_run *run)
{
    const struct moe_shape *s = &run->weights.shape;
    int64_t E = s->experts;
    const struct moe_exact_sum *prob_sum =
        (const struct moe_exact_sum *)(run->stats + 1 + E);
    double tokens = (double)run->stats[0];
    struct moe_aux_losses losses;
    moe_aux_losses_compute(run->stats, E, s->top_k, run->weights.aux_loss_coef,
                           run->weights.z_loss_coef, &losses);

    fprintf(out, "  %s router:\n    f:", label);
    for (int64_t e = 0; e < E; e++)
        fprintf(out, "  %.4f", (double)run->stats[1 + e] / (tokens * (double)s->top_k));
    fprintf(out, "\n    P:");
    for (int64_t e = 0; e < E; e++)
        fprintf(out, "  %.4f", moe_exact_value(&prob_sum[e]) / tokens);
    fprintf(out, "\n    %" PRId64 " x (", E);
    for (int64_t e = 0; e < E; e++)
        fprintf(out, "%s%.4f x %.4f", e ? " + " : "",
                (double)run->stats[1 + e] / (tokens * (double)s->top_k),
                moe_exact_value(&prob_sum[e]) / tokens);
    fprintf(out, ") = %.4f\n", losses.load_balance);
    fprintf(out, "    router z-loss, the mean of logsumexp(logits)^2: %.4f\n", losses.z_loss);
}

void moe_explain_print_aux(FILE *out, const struct moe_explain_run *plain,
                           const struct moe_explain_run *skewed)
{
    fprintf(out, "\n== The load-balancing loss ==\n");
    fprintf(out,
            "Training adds a loss that pushes the router towards balance: E x sum over e "
            "of\nf_e x P_e, where f_e is the fraction of the T x K assignments routed to "
            "expert e and\nP_e the mean probability the router gives e. It is exactly 1 "
            "when the assignments\nare spread evenly, and it grows as they pile onto the "
            "experts the router favours.\nEach rank adds up its terms as exact integers and "
            "an all-reduce sums them, so every\nrank count gives the same bits.\n\n");
    print_aux_row(out, "plain", plain);
    print_aux_row(out, "skewed", skewed);
}
