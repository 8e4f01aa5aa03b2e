/*
 * golden.c - the single-process golden path of the layer.
 *
 * No processes, no shared memory: route all T tokens, gather each expert's
 * rows in global token order into one expert-major buffer, run each expert
 * once over all of its rows, run the shared expert in its fixed tiles, and
 * combine. The distributed ranks build the
 * same per-expert matrices, which is what makes their output bitwise equal
 * to this one.
 *
 * Memory: the expert-major input and output buffers are (T*K, H) each.
 */
#include "moe_layer.h"
#include "moe_error.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int moe_golden_forward(const struct moe_weights *weights, const float *x,
                       float *out, struct moe_golden_info *info)
{
    const struct moe_shape *s = &weights->shape;
    int64_t T = s->tokens, H = s->hidden, F = s->ffn, E = s->experts,
            K = s->top_k;
    int rc = 0;

    float *logits = malloc((size_t)(T * E + 1) * sizeof(float));
    float *probs = malloc((size_t)(T * E + 1) * sizeof(float));
    int32_t *ids = malloc((size_t)(T * K + 1) * sizeof(int32_t));
    float *route_weights = malloc((size_t)(T * K + 1) * sizeof(float));
    int64_t *counts = calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *offsets = calloc((size_t)E + 1, sizeof(int64_t));
    float *expert_in = moe_alloc_large((size_t)(T * K * H + 1) * sizeof(float));
    float *expert_out = moe_alloc_large((size_t)(T * K * H + 1) * sizeof(float));
    const float **rows = malloc((size_t)(T * K + 1) * sizeof(*rows));
    float *scratch = NULL, *shared_scratch = NULL, *shared_out = NULL;
    if (info) {
        int want_stages = info->want_stages;
        memset(info, 0, sizeof *info);
        info->want_stages = want_stages;
    }
    if (!logits || !probs || !ids || !route_weights || !counts || !offsets ||
        !expert_in || !expert_out || !rows) {
        rc = moe_fail(-ENOMEM, "golden path: out of memory for %lld tokens",
                      (long long)T);
        goto out;
    }

    /* Route. */
    moe_gate_logits(x, weights->gate, T, H, E, logits);
    moe_route(&weights->router, weights->score_bias, logits, T, E, K, probs, ids,
              route_weights);

    /* Count rows per expert; an expert's block starts after all lower ones. */
    for (int64_t i = 0; i < T * K; i++)
        counts[ids[i]]++;
    int64_t max_rows = 0;
    for (int64_t e = 0; e < E; e++) {
        offsets[e] = e == 0 ? 0 : offsets[e - 1] + counts[e - 1];
        if (counts[e] > max_rows)
            max_rows = counts[e];
    }

    /* Gather in global token order: scanning t upwards fills each expert's
     * block in the order of its tokens. */
    int64_t *fill = calloc((size_t)E + 1, sizeof(int64_t));
    if (!fill) {
        rc = moe_fail(-ENOMEM, "golden path: out of memory");
        goto out;
    }
    for (int64_t t = 0; t < T; t++) {
        for (int64_t k = 0; k < K; k++) {
            int32_t e = ids[t * K + k];
            int64_t row = offsets[e] + fill[e]++;
            memcpy(expert_in + row * H, x + t * H, (size_t)H * sizeof(float));
            rows[t * K + k] = expert_out + row * H;
        }
    }
    free(fill);

    /* Compute: one call per expert over all of its rows. */
    scratch = moe_alloc_large((size_t)(moe_expert_scratch_floats(max_rows, F) + 1) *
                     sizeof(float));
    if (!scratch) {
        rc = moe_fail(-ENOMEM, "golden path: out of memory for expert scratch");
        goto out;
    }
    for (int64_t e = 0; e < E; e++)
        moe_expert_forward(expert_in + offsets[e] * H, counts[e], H, F,
                           weights->w1 + e * F * H, weights->w3 + e * F * H,
                           weights->w2 + e * H * F, scratch,
                           expert_out + offsets[e] * H);

    /* The shared expert, over all tokens in its fixed tiles. */
    if (s->shared_ffn > 0) {
        shared_scratch = moe_alloc_large(
            (size_t)moe_shared_scratch_floats(H, s->shared_ffn) * sizeof(float));
        shared_out = moe_alloc_large((size_t)(T * H + 1) * sizeof(float));
        if (!shared_scratch || !shared_out) {
            rc = moe_fail(-ENOMEM, "golden path: out of memory for the shared expert");
            goto out;
        }
        moe_shared_expert_forward(weights, x, 0, T, shared_scratch, shared_out);
    }

    /* Combine, then add the shared expert. */
    moe_combine(T, H, K, route_weights, rows, out);
    if (shared_out)
        moe_add_shared(out, shared_out, T, H);

    if (info && info->want_stages) {
        float *slot_out = moe_alloc_large((size_t)(T * K * H + 1) * sizeof(float));
        if (!slot_out) {
            rc = moe_fail(-ENOMEM, "golden path: out of memory for the stages");
            goto out;
        }
        for (int64_t i = 0; i < T * K; i++)
            memcpy(slot_out + i * H, rows[i], (size_t)H * sizeof(float));
        info->expert_out = slot_out;
        info->logits = logits;
        info->scores = probs;
        info->shared_out = shared_out;
        logits = probs = shared_out = NULL;
    }
    if (info) {
        info->tokens_per_expert = counts;
        info->expert_ids = ids;
        info->weights = route_weights;
        counts = NULL;
        ids = NULL;
        route_weights = NULL;
    }

out:
    free(logits);
    free(probs);
    free(ids);
    free(route_weights);
    free(counts);
    free(offsets);
    free(expert_in);
    free(expert_out);
    free(rows);
    free(scratch);
    free(shared_scratch);
    free(shared_out);
    return rc;
}

void moe_golden_info_free(struct moe_golden_info *info)
{
    free(info->tokens_per_expert);
    free(info->expert_ids);
    free(info->weights);
    free(info->logits);
    free(info->scores);
    free(info->expert_out);
    free(info->shared_out);
    int want_stages = info->want_stages;
    memset(info, 0, sizeof *info);
    info->want_stages = want_stages;
}
