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
    double *probs;    /* (E) softmax probabilities of the current token */
    bool *chosen;     /* (E) experts already taken by top-k */
    double *hidden;   /* (F) silu(w1 . x) * (w3 . x) of the current expert */
    double *expert_y; /* (H) output of the current expert */
};

/* Computes probs (E) = softmax(x (H) . gate (E, H)^T) in double. A NaN or
 * +Inf logit makes every probability NaN, as in IEEE arithmetic. */
static void reference_softmax(const float *x, const float *gate,
                              int64_t hidden, int64_t experts, double *probs)
{
    for (int64_t e = 0; e < experts; e++) {
        double logit = 0.0;
        for (int64_t h = 0; h < hidden; h++)
            logit += (double)x[h] * (double)gate[e * hidden + h];
        probs[e] = logit;
    }

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

/* Selects the top K experts of one token into ids (K) and their weights,
 * renormalised to sum to 1, into weights (K). Returns the probability gap
 * between the K-th and the (K+1)-th expert, or 1.0 when K == E. */
static double reference_topk(const double *probs, bool *chosen,
                             int64_t experts, int64_t top_k, int32_t *ids,
                             double *weights)
{
    for (int64_t e = 0; e < experts; e++)
        chosen[e] = false;

    double selected_sum = 0.0;
    for (int64_t k = 0; k < top_k; k++) {
        int64_t e = reference_best_unchosen(probs, chosen, experts);
        chosen[e] = true;
        ids[k] = (int32_t)e;
        weights[k] = probs[e];
        selected_sum += probs[e];
    }
    for (int64_t k = 0; k < top_k; k++)
        weights[k] /= selected_sum;

    if (top_k == experts)
        return 1.0;
    int64_t next = reference_best_unchosen(probs, chosen, experts);
    return probs[ids[top_k - 1]] - probs[next];
}

static double reference_silu(double v)
{
    return v / (1.0 + exp(-v));
}

/* Runs expert e on one token: y (H) = w2 . (silu(w1 . x) * (w3 . x)), with
 * w1, w3 (E, F, H) and w2 (E, H, F). */
static void reference_expert(const struct moe_weights *weights, int64_t e,
                             const float *x, double *hidden_act, double *y)
{
    int64_t hidden = weights->shape.hidden;
    int64_t ffn = weights->shape.ffn;
    const float *w1 = weights->w1 + e * ffn * hidden;
    const float *w3 = weights->w3 + e * ffn * hidden;
    const float *w2 = weights->w2 + e * hidden * ffn;

    for (int64_t f = 0; f < ffn; f++) {
        double gate_proj = 0.0, up_proj = 0.0;
        for (int64_t h = 0; h < hidden; h++) {
            gate_proj += (double)w1[f * hidden + h] * (double)x[h];
            up_proj += (double)w3[f * hidden + h] * (double)x[h];
        }
        hidden_act[f] = reference_silu(gate_proj) * up_proj;
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
        s->experts > INT32_MAX || s->top_k < 1 || s->top_k > s->experts)
        return moe_fail(-EINVAL,
                        "moe_reference_forward: invalid shape T=%lld H=%lld "
                        "F=%lld E=%lld K=%lld; expected T >= 0, H, F, E >= 1 "
                        "and 1 <= K <= E",
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

    int64_t hidden = s->hidden, experts = s->experts, top_k = s->top_k;
    struct reference_scratch scratch = {
        .probs = malloc((size_t)experts * sizeof(double)),
        .chosen = malloc((size_t)experts * sizeof(bool)),
        .hidden = malloc((size_t)s->ffn * sizeof(double)),
        .expert_y = malloc((size_t)hidden * sizeof(double)),
    };
    double *slot_weights = malloc((size_t)top_k * sizeof(double));
    if (scratch.probs == NULL || scratch.chosen == NULL ||
        scratch.hidden == NULL || scratch.expert_y == NULL ||
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

        reference_softmax(x_t, weights->gate, hidden, experts, scratch.probs);
        topk_gap[t] = reference_topk(scratch.probs, scratch.chosen, experts,
                                     top_k, ids_t, slot_weights);

        /* Combine in slot order k = 0..K-1, as moe_combine() does. */
        for (int64_t h = 0; h < hidden; h++)
            out_t[h] = 0.0;
        for (int64_t k = 0; k < top_k; k++) {
            reference_expert(weights, ids_t[k], x_t, scratch.hidden,
                             scratch.expert_y);
            for (int64_t h = 0; h < hidden; h++)
                out_t[h] += slot_weights[k] * scratch.expert_y[h];
        }
    }

out:
    free(scratch.probs);
    free(scratch.chosen);
    free(scratch.hidden);
    free(scratch.expert_y);
    free(slot_weights);
    return rc;
}
