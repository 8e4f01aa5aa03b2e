/*
 * router.c - gate logits, softmax and top-k selection (Mixtral semantics).
 *
 * Runs on every rank for its own tokens and in the golden path for all
 * tokens. Nothing here depends on how many tokens a call covers, so a
 * token's route is the same bits on any rank count.
 */
#include "moe_layer.h"

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

static void softmax_row(const float *logits, int64_t experts, float *probs)
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

void moe_route_topk(const float *logits, int64_t tokens, int64_t experts,
                    int64_t top_k, float *probs, int32_t *expert_ids,
                    float *weights)
{
    for (int64_t t = 0; t < tokens; t++) {
        const float *row_logits = logits + t * experts;
        float *row_probs = probs + t * experts;
        int32_t *ids = expert_ids + t * top_k;
        float *w = weights + t * top_k;

        softmax_row(row_logits, experts, row_probs);

        /* Selection by repeated scans: the strict comparison keeps the
         * lower index on ties, and `taken` rules out duplicates even when
         * every probability is NaN. */
        for (int64_t k = 0; k < top_k; k++) {
            int64_t best = -1;
            for (int64_t e = 0; e < experts; e++) {
                bool taken = false;
                for (int64_t j = 0; j < k; j++)
                    taken = taken || ids[j] == e;
                if (taken)
                    continue;
                if (best < 0 || ranks_above(row_probs[e], row_probs[best]))
                    best = e;
            }
            ids[k] = (int32_t)best;
            w[k] = row_probs[best];
        }

        float sum = 0.0f;
        for (int64_t k = 0; k < top_k; k++)
            sum += w[k];
        for (int64_t k = 0; k < top_k; k++)
            w[k] /= sum;
    }
}
