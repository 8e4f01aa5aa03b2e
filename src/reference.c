/*
 * reference.c - a plain-loop, double-precision model of the whole MoE layer.
 *
 * Tests run it in one process to check the golden path and the distributed
 * ranks. To be an independent check it shares no code with them: it calls no
 * library function except moe_fail(), no BLAS, and computes every step in
 * double from the float32 inputs. Its output therefore differs from the
 * float32 paths by rounding only, except where a routing decision is a near
 * tie, which topk_gap reports so that tests can skip or loosen those tokens.
 *
 * It is written for clarity, not speed: O(T * K * F * H) with no blocking,
 * meant for the small shapes used in tests.
 */
#include "moe_layer.h"
#include "moe_error.h"

#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>

/* Scratch for one token, allocated once per call. */
struct reference_scratch {
    double *logits;   /* (E) gate logits of the current token */
    double *probs;    /* (E) scores of the current token */
    double *keys;     /* (E) selection keys: scores plus the score bias, with
                         the experts of excluded groups set to -inf */
    bool *chosen;     /* (E) experts already taken by top-k */
    double *hidden;   /* (F) silu(w1 . x) * (w3 . x) of the current expert */
    double *expert_y; /* (H) output of the current expert */
};

/* Computes probs (n) = softmax(logits (n)) in double. A NaN or +Inf logit
 * makes every probability NaN, as in IEEE arithmetic. */
static void reference_softmax(const double *logits, int64_t experts, double *probs)
{
    for (int64_t e = 0; e < experts; e++)
        probs[e] = logits[e];

    double max_logit = -INFINITY;
    for (int64_t e = 0; e < experts; e++)
        if (probs[e] > max_logit)
            max_logit = probs[e];

    double sum = 0.0;
    for (int64_t e = 0; e < experts; e++) {
        probs[e] = exp(probs[e] - max_logit);
        sum += probs[e];
    }
    for (int64_t e = 0; e < experts; e++)
        probs[e] /= sum;
}

/* True when probability a ranks above b. NaN ranks below every number, and
 * equal values do not rank above each other, so a scan in index order keeps
 * the lower index on a tie. */
static bool ranks_above(double a, double b)
{
    if (isnan(a))
        return false;
    return isnan(b) || a > b;
}

/* Returns the best expert not yet chosen, or -1 when all are chosen. */
static int64_t reference_best_unchosen(const double *probs, const bool *chosen,
                                       int64_t experts)
{
    int64_t best = -1;
    for (int64_t e = 0; e < experts; e++) {
        if (chosen[e])
            continue;
        if (best < 0 || ranks_above(probs[e], probs[best]))
            best = e;
    }
    return best;
}

/* Selects the top K experts of one token by their keys into ids (K) and
 * their scores into weights (K). Returns the key gap between the K-th and
 * the (K+1)-th expert, or 1.0 when no expert is left. */
static double reference_topk(const double *keys, const double *scores, bool *chosen,
                             int64_t experts, int64_t top_k, int32_t *ids,
                             double *weights)
{
    for (int64_t e = 0; e < experts; e++)
        chosen[e] = false;
    for (int64_t k = 0; k < top_k; k++) {
        int64_t e = reference_best_unchosen(keys, chosen, experts);
        chosen[e] = true;
        ids[k] = (int32_t)e;
        weights[k] = scores[e];
    }
    int64_t next = reference_best_unchosen(keys, chosen, experts);
    if (next < 0 || keys[next] == -INFINITY)
        return 1.0;
    return keys[ids[top_k - 1]] - keys[next];
}

/* Routes one token by the router's rules, from the logits in scratch:
 * scores, keys with the bias and group limit, top-k, then the weights.
 * Returns how close the selection came to a tie: the smaller of the key
 * gap at the K-th expert and, with groups, the group-key gap at the last
 * kept group. */
static double reference_route(const struct moe_weights *weights,
                              struct reference_scratch *scratch, int32_t *ids,
                              double *slot_weights)
{
    const struct moe_router *r = &weights->router;
    int64_t experts = weights->shape.experts, top_k = weights->shape.top_k;
    double *logits = scratch->logits, *scores = scratch->probs, *keys = scratch->keys;

    for (int64_t e = 0; e < experts; e++) {
        if (r->scoring == MOE_SCORING_SIGMOID)
            scores[e] = 1.0 / (1.0 + exp(-logits[e]));
        else if (r->scoring == MOE_SCORING_TOPK_SOFTMAX)
            scores[e] = logits[e];
    }
    if (r->scoring == MOE_SCORING_SOFTMAX_TOPK)
        reference_softmax(logits, experts, scores);
    for (int64_t e = 0; e < experts; e++)
        keys[e] = scores[e] + (weights->score_bias ? (double)weights->score_bias[e] : 0.0);

    double gap = 1.0;
    if (r->groups > 1) {
        /* Group key: the sum of the two largest keys of the group. Keep the
         * topk_groups largest, lower group first on ties. */
        int64_t size = experts / r->groups;
        double group_key[MOE_MAX_EXPERTS];
        bool kept[MOE_MAX_EXPERTS] = {false};
        for (int64_t g = 0; g < r->groups; g++) {
            double first = -INFINITY, second = -INFINITY;
            for (int64_t e = g * size; e < (g + 1) * size; e++) {
                if (keys[e] > first) {
                    second = first;
                    first = keys[e];
                } else if (keys[e] > second) {
                    second = keys[e];
                }
            }
            group_key[g] = size == 1 ? first : first + second;
        }
        double last_kept = 0;
        for (int64_t k = 0; k < r->topk_groups; k++) {
            int64_t best = reference_best_unchosen(group_key, kept, r->groups);
            kept[best] = true;
            last_kept = group_key[best];
        }
        int64_t next = reference_best_unchosen(group_key, kept, r->groups);
        if (next >= 0)
            gap = last_kept - group_key[next];
        for (int64_t e = 0; e < experts; e++)
            if (!kept[e / size])
                keys[e] = -INFINITY;
    }

    double key_gap = reference_topk(keys, scores, scratch->chosen, experts, top_k, ids,
                                    slot_weights);
    if (key_gap < gap)
        gap = key_gap;

    if (r->scoring == MOE_SCORING_TOPK_SOFTMAX) {
        double selected[MOE_MAX_EXPERTS] = {0};
        for (int64_t k = 0; k < top_k; k++)
            selected[k] = slot_weights[k];
        reference_softmax(selected, top_k, slot_weights);
    }
    if (r->renormalize) {
        double sum = 0.0;
        for (int64_t k = 0; k < top_k; k++)
            sum += slot_weights[k];
        for (int64_t k = 0; k < top_k; k++)
            slot_weights[k] /= sum;
    }
    for (int64_t k = 0; k < top_k; k++)
        slot_weights[k] *= (double)r->scaling_factor;
    return gap;
}

static double reference_silu(double v)
{
    return v / (1.0 + exp(-v));
}

/* Applies a dense expert's activation in double precision. */
static double reference_activate(enum moe_activation act, double v)
{
    switch (act) {
    case MOE_ACT_RELU:
        return v > 0.0 ? v : 0.0;
    case MOE_ACT_GELU:
        return 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
    case MOE_ACT_GELU_TANH:
        return 0.5 * v * (1.0 + tanh(sqrt(2.0 / M_PI) * (v + 0.044715 * v * v * v)));
    case MOE_ACT_SILU:
    default:
        return reference_silu(v);
    }
}

/* Runs one FFN on one token: y (H) = w2 . (silu(w1 . x) * (w3 . x)), with
 * w1, w3 (F, H) and w2 (H, F), or y = w2 . act(w1 . x) when w3 is NULL
 * (a dense expert). */
static void reference_ffn(const float *w1, const float *w3, const float *w2,
                          enum moe_activation act, int64_t hidden, int64_t ffn,
                          const float *x, double *hidden_act, double *y)
{
    for (int64_t f = 0; f < ffn; f++) {
        double gate_proj = 0.0, up_proj = 0.0;
        for (int64_t h = 0; h < hidden; h++) {
            gate_proj += (double)w1[f * hidden + h] * (double)x[h];
            if (w3)
                up_proj += (double)w3[f * hidden + h] * (double)x[h];
        }
        if (w3)
            hidden_act[f] = reference_silu(gate_proj) * up_proj;
        else
            hidden_act[f] = reference_activate(act, gate_proj);
    }

    for (int64_t h = 0; h < hidden; h++) {
        double sum = 0.0;
        for (int64_t f = 0; f < ffn; f++)
            sum += (double)w2[h * ffn + f] * hidden_act[f];
        y[h] = sum;
    }
}

static int check_shape(const struct moe_shape *s)
{
    if (s->tokens < 0 || s->hidden < 1 || s->ffn < 1 || s->experts < 1 ||
        s->experts > MOE_MAX_EXPERTS || s->top_k < 1 || s->top_k > s->experts)
        return moe_fail(-EINVAL,
                        "moe_reference_forward: invalid shape T=%lld H=%lld "
                        "F=%lld E=%lld K=%lld; expected T >= 0, H, F >= 1, "
                        "1 <= E <= 4096 and 1 <= K <= E",
                        (long long)s->tokens, (long long)s->hidden,
                        (long long)s->ffn, (long long)s->experts,
                        (long long)s->top_k);
    return 0;
}

int moe_reference_forward(const struct moe_weights *weights, const float *x,
                          double *out, int32_t *ids, double *topk_gap)
{
    const struct moe_shape *s = &weights->shape;
    int rc = check_shape(s);
    if (rc < 0)
        return rc;
    /* The capacity rule ranks assignments across tokens, which this
     * token-by-token reference does not do; tools/torch_reference.py covers
     * layers with a capacity. */
    if (weights->capacity.limit >= 0)
        return moe_fail(-EINVAL, "moe_reference_forward: layers with an expert "
                        "capacity (%lld) are not covered", (long long)weights->capacity.limit);

    int64_t hidden = s->hidden, experts = s->experts, top_k = s->top_k;
    int64_t widest = s->ffn > s->shared_ffn ? s->ffn : s->shared_ffn;
    struct reference_scratch scratch = {
        .logits = malloc((size_t)experts * sizeof(double)),
        .probs = malloc((size_t)experts * sizeof(double)),
        .keys = malloc((size_t)experts * sizeof(double)),
        .chosen = malloc((size_t)experts * sizeof(bool)),
        .hidden = malloc((size_t)widest * sizeof(double)),
        .expert_y = malloc((size_t)hidden * sizeof(double)),
    };
    double *slot_weights = malloc((size_t)top_k * sizeof(double));
    if (scratch.logits == NULL || scratch.probs == NULL || scratch.keys == NULL ||
        scratch.chosen == NULL || scratch.hidden == NULL || scratch.expert_y == NULL ||
        slot_weights == NULL) {
        rc = moe_fail(-ENOMEM, "moe_reference_forward: out of memory for "
                      "scratch (E=%lld, F=%lld, H=%lld)", (long long)experts,
                      (long long)s->ffn, (long long)hidden);
        goto out;
    }

    for (int64_t t = 0; t < s->tokens; t++) {
        const float *x_t = x + t * hidden;
        int32_t *ids_t = ids + t * top_k;
        double *out_t = out + t * hidden;

        for (int64_t e = 0; e < experts; e++) {
            double logit = 0.0;
            for (int64_t h = 0; h < hidden; h++)
                logit += (double)x_t[h] * (double)weights->gate[e * hidden + h];
            if (weights->gate_bias)
                logit += (double)weights->gate_bias[e];
            scratch.logits[e] = logit;
        }
        topk_gap[t] = reference_route(weights, &scratch, ids_t, slot_weights);

        /* Combine in slot order k = 0..K-1, as moe_combine() does. */
        int64_t F = s->ffn;
        for (int64_t h = 0; h < hidden; h++)
            out_t[h] = 0.0;
        for (int64_t k = 0; k < top_k; k++) {
            int64_t e = ids_t[k];
            const float *w3 = weights->expert_kind == MOE_EXPERT_DENSE
                                  ? NULL : weights->w3 + e * F * hidden;
            reference_ffn(weights->w1 + e * F * hidden, w3, weights->w2 + e * hidden * F,
                          weights->activation, hidden, F, x_t, scratch.hidden,
                          scratch.expert_y);
            for (int64_t h = 0; h < hidden; h++)
                out_t[h] += slot_weights[k] * scratch.expert_y[h];
        }

        /* The shared expert, scaled by its sigmoid gate if it has one. */
        if (s->shared_ffn > 0) {
            reference_ffn(weights->shared_w1, weights->shared_w3, weights->shared_w2,
                          MOE_ACT_SILU,
                          hidden, s->shared_ffn, x_t, scratch.hidden, scratch.expert_y);
            double gate = 1.0;
            if (weights->shared_gate) {
                double logit = 0.0;
                for (int64_t h = 0; h < hidden; h++)
                    logit += (double)x_t[h] * (double)weights->shared_gate[h];
                gate = 1.0 / (1.0 + exp(-logit));
            }
            for (int64_t h = 0; h < hidden; h++)
                out_t[h] += gate * scratch.expert_y[h];
        }
    }

out:
    free(scratch.logits);
    free(scratch.keys);
    free(scratch.probs);
    free(scratch.chosen);
    free(scratch.hidden);
    free(scratch.expert_y);
    free(slot_weights);
    return rc;
}
