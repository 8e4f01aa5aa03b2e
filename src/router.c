/*
 * router.c - gate logits, scoring (softmax or sigmoid) and top-k selection,
 * with the group limit and score bias of DeepSeek-V3.
 *
 * Runs on every rank for its own tokens and in the golden path for all
 * tokens. Nothing here depends on how many tokens a call covers, so a
 * token's route is the same bits on any rank count.
 */
#include "moe_layer.h"
#include "moe_error.h"

#include <errno.h>

#include <math.h>
#include <stdbool.h>
#include <string.h>

/* Lanes of independent partial sums in the gate dot product. The order of
 * additions is fixed by this constant, not by the compiler: -ffp-contract=off
 * and no fast-math keep gcc from reassociating. */
enum { DOT_LANES = 8 };

static float dot_fixed_order(const float *a, const float *b, int64_t n)
{
    float lane[DOT_LANES] = {0};
    int64_t i = 0;
    for (; i + DOT_LANES <= n; i += DOT_LANES)
        for (int j = 0; j < DOT_LANES; j++)
            lane[j] += a[i + j] * b[i + j];
    for (int j = 0; i < n; i++, j++)
        lane[j] += a[i] * b[i];

    /* Pairwise tree over the lanes: (0+4)+(2+6) + (1+5)+(3+7). */
    for (int width = DOT_LANES / 2; width > 0; width /= 2)
        for (int j = 0; j < width; j++)
            lane[j] += lane[j + width];
    return lane[0];
}

void moe_gate_logits(const float *x, const float *gate, int64_t tokens,
                     int64_t hidden, int64_t experts, float *logits)
{
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t e = 0; e < experts; e++)
            logits[t * experts + e] =
                dot_fixed_order(x + t * hidden, gate + e * hidden, hidden);
}

/* Returns true when probability a ranks above b in top-k selection. NaN
 * ranks below every number so that selection stays well defined. */
static bool ranks_above(float a, float b)
{
    if (isnan(a))
        return false;
    if (isnan(b))
        return true;
    return a > b;
}

void moe_softmax_row(const float *logits, int64_t experts, float *probs)
{
    /* Any NaN logit, a +Inf logit (Inf - Inf) or an all -Inf row makes the
     * sum NaN and so every probability of the row NaN. */
    float max = logits[0];
    for (int64_t e = 1; e < experts; e++)
        if (logits[e] > max)
            max = logits[e];

    float sum = 0.0f;
    for (int64_t e = 0; e < experts; e++) {
        probs[e] = expf(logits[e] - max);
        sum += probs[e];
    }
    for (int64_t e = 0; e < experts; e++)
        probs[e] /= sum;
}

void moe_add_gate_bias(float *logits, const float *bias, int64_t tokens,
                       int64_t experts)
{
    if (!bias)
        return;
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t e = 0; e < experts; e++)
            logits[t * experts + e] += bias[e];
}

void moe_router_default(struct moe_router *router)
{
    router->scoring = MOE_SCORING_SOFTMAX_TOPK;
    router->renormalize = 1;
    router->scaling_factor = 1.0f;
    router->groups = 1;
    router->topk_groups = 1;
}

int moe_router_check(const struct moe_router *r, const struct moe_shape *s)
{
    if (s->experts < 1 || s->experts > MOE_MAX_EXPERTS)
        return moe_fail(-EINVAL, "invalid expert count %lld: expected 1 to %d",
                        (long long)s->experts, MOE_MAX_EXPERTS);
    if (s->top_k < 1 || s->top_k > s->experts)
        return moe_fail(-EINVAL, "invalid top-k %lld: expected 1 to the expert "
                        "count %lld", (long long)s->top_k, (long long)s->experts);
    if (r->scoring != MOE_SCORING_SOFTMAX_TOPK && r->scoring != MOE_SCORING_TOPK_SOFTMAX &&
        r->scoring != MOE_SCORING_SIGMOID)
        return moe_fail(-EINVAL, "invalid router scoring %d", (int)r->scoring);
    if (!isfinite(r->scaling_factor))
        return moe_fail(-EINVAL, "invalid scaling factor %g: expected a finite "
                        "number", (double)r->scaling_factor);
    if (r->groups < 1 || s->experts % r->groups != 0)
        return moe_fail(-EINVAL, "invalid group count %lld: it must divide the "
                        "expert count %lld", (long long)r->groups,
                        (long long)s->experts);
    if (r->topk_groups < 1 || r->topk_groups > r->groups)
        return moe_fail(-EINVAL, "invalid top-k group count %lld: expected 1 to "
                        "the group count %lld", (long long)r->topk_groups,
                        (long long)r->groups);
    if (r->topk_groups * (s->experts / r->groups) < s->top_k)
        return moe_fail(-EINVAL, "top-k %lld is more than the %lld experts in the "
                        "%lld kept groups", (long long)s->top_k,
                        (long long)(r->topk_groups * (s->experts / r->groups)),
                        (long long)r->topk_groups);
    return 0;
}

static float sigmoid(float v)
{
    return 1.0f / (1.0f + expf(-v));
}

/* The key an expert is selected by: its score, plus its bias if any. */
static float selection_key(const float *scores, const float *bias, int64_t e)
{
    return bias ? scores[e] + bias[e] : scores[e];
}

/* Marks in `kept` the topk_groups groups with the best group keys. A
 * group's key is the sum of its two best selection keys. */
static void select_groups(const struct moe_router *r, const float *scores,
                          const float *bias, int64_t experts, unsigned char *kept)
{
    int64_t size = experts / r->groups;
    float group_key[MOE_MAX_EXPERTS];

    for (int64_t g = 0; g < r->groups; g++) {
        int64_t best = -1, second = -1;
        for (int64_t e = g * size; e < (g + 1) * size; e++) {
            float key = selection_key(scores, bias, e);
            if (best < 0 || ranks_above(key, selection_key(scores, bias, best))) {
                second = best;
                best = e;
            } else if (second < 0 ||
                       ranks_above(key, selection_key(scores, bias, second))) {
                second = e;
            }
        }
        group_key[g] = selection_key(scores, bias, best);
        if (second >= 0)
            group_key[g] += selection_key(scores, bias, second);
        kept[g] = 0;
    }
    for (int64_t k = 0; k < r->topk_groups; k++) {
        int64_t best = -1;
        for (int64_t g = 0; g < r->groups; g++)
            if (!kept[g] && (best < 0 || ranks_above(group_key[g], group_key[best])))
                best = g;
        kept[best] = 1;
    }
}

void moe_route(const struct moe_router *r, const float *score_bias,
               const float *logits, int64_t tokens, int64_t experts,
               int64_t top_k, float *scores, int32_t *expert_ids, float *weights)
{
    unsigned char kept[MOE_MAX_EXPERTS], taken[MOE_MAX_EXPERTS];
    int64_t group_size = experts / r->groups;

    for (int64_t t = 0; t < tokens; t++) {
        const float *row_logits = logits + t * experts;
        float *row_scores = scores + t * experts;
        int32_t *ids = expert_ids + t * top_k;
        float *w = weights + t * top_k;

        if (r->scoring == MOE_SCORING_SOFTMAX_TOPK) {
            moe_softmax_row(row_logits, experts, row_scores);
        } else if (r->scoring == MOE_SCORING_SIGMOID) {
            for (int64_t e = 0; e < experts; e++)
                row_scores[e] = sigmoid(row_logits[e]);
        } else {
            memcpy(row_scores, row_logits, (size_t)experts * sizeof(float));
        }

        if (r->groups > 1)
            select_groups(r, row_scores, score_bias, experts, kept);

        /* Selection by repeated scans: the strict comparison keeps the
         * lower index on ties, and `taken` rules out duplicates even when
         * every key is NaN. O(K * E) per token. */
        memset(taken, 0, (size_t)experts);
        for (int64_t k = 0; k < top_k; k++) {
            int64_t best = -1;
            for (int64_t e = 0; e < experts; e++) {
                if (taken[e] || (r->groups > 1 && !kept[e / group_size]))
                    continue;
                if (best < 0 || ranks_above(selection_key(row_scores, score_bias, e),
                                            selection_key(row_scores, score_bias, best)))
                    best = e;
            }
            ids[k] = (int32_t)best;
            taken[best] = 1;
            w[k] = row_scores[best];
        }

        if (r->scoring == MOE_SCORING_TOPK_SOFTMAX)
            moe_softmax_row(w, top_k, w);
        if (r->renormalize) {
            float sum = 0.0f;
            for (int64_t k = 0; k < top_k; k++)
                sum += w[k];
            for (int64_t k = 0; k < top_k; k++)
                w[k] /= sum;
        }
        if (r->scaling_factor != 1.0f)
            for (int64_t k = 0; k < top_k; k++)
                w[k] *= r->scaling_factor;
    }
}

void moe_route_topk(const float *logits, int64_t tokens, int64_t experts,
                    int64_t top_k, float *probs, int32_t *expert_ids,
                    float *weights)
{
    struct moe_router router;
    moe_router_default(&router);
    moe_route(&router, NULL, logits, tokens, experts, top_k, probs, expert_ids,
              weights);
}
