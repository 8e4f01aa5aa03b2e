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
#include "moe_aux.h"
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
    if (weights->expert_first != 0 || weights->expert_count != E)
        return moe_fail(-EINVAL, "golden path: the weights hold experts %lld to %lld "
                        "of %lld; the golden path needs all of them",
                        (long long)weights->expert_first,
                        (long long)(weights->expert_first + weights->expert_count - 1),
                        (long long)E);

    float *logits = malloc((size_t)(T * E + 1) * sizeof(float));
    float *probs = malloc((size_t)(T * E + 1) * sizeof(float));
    int32_t *ids = malloc((size_t)(T * K + 1) * sizeof(int32_t));
    float *route_weights = malloc((size_t)(T * K + 1) * sizeof(float));
    int64_t *counts = calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *dropped = calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *offsets = calloc((size_t)E + 1, sizeof(int64_t));
    int64_t *by_expert = malloc((size_t)(T * K + 1) * sizeof(int64_t));
    float *list_weights = malloc((size_t)(T * K + 1) * sizeof(float));
    uint8_t *kept = malloc((size_t)(T * K + 1));
    int64_t *stats = calloc((size_t)moe_router_stats_len(E), sizeof(int64_t));
    float *expert_in = moe_alloc_large((size_t)(T * K * H + 1) * sizeof(float));
    float *expert_out = moe_alloc_large((size_t)(T * K * H + 1) * sizeof(float));
    const float **rows = malloc((size_t)(T * K + 1) * sizeof(*rows));
    float *scratch = NULL, *shared_scratch = NULL, *shared_out = NULL;
    if (info) {
        int want_stages = info->want_stages;
        memset(info, 0, sizeof *info);
        info->want_stages = want_stages;
    }
    if (!logits || !probs || !ids || !route_weights || !counts || !dropped ||
        !offsets || !by_expert || !list_weights || !kept || !stats ||
        !expert_in || !expert_out || !rows) {
        rc = moe_fail(-ENOMEM, "golden path: out of memory for %lld tokens",
                      (long long)T);
        goto out;
    }

    /* Route. */
    moe_gate_logits(x, weights->gate, T, H, E, logits);
    moe_add_gate_bias(logits, weights->gate_bias, T, E);
    moe_route(&weights->router, weights->score_bias, logits, T, E, K, probs, ids,
              route_weights);
    moe_router_stats_add(stats, logits, ids, T, E, K);

    /* Each expert's assignments in global token order: a counting sort of
     * the slots t * K + k by expert, stable in t. */
    for (int64_t i = 0; i < T * K; i++)
        counts[ids[i]]++;
    for (int64_t e = 1; e < E; e++)
        offsets[e] = offsets[e - 1] + counts[e - 1];
    for (int64_t i = 0; i < T * K; i++)
        by_expert[offsets[ids[i]]++] = i;
    for (int64_t e = 0; e < E; e++)
        offsets[e] -= counts[e];

    /* Capacity: decide each expert's survivors, then gather the kept rows,
     * still in token order. A dropped slot gets no row. */
    int64_t row = 0, max_rows = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t *list = by_expert + offsets[e];
        for (int64_t j = 0; j < counts[e]; j++)
            list_weights[j] = route_weights[list[j]];
        int64_t keep_count = moe_capacity_keep(&weights->capacity, counts[e],
                                               list_weights, kept + offsets[e]);
        if (keep_count < 0) {
            rc = moe_fail(-ENOMEM, "golden path: out of memory for the capacity rule");
            goto out;
        }
        dropped[e] = counts[e] - keep_count;
        if (keep_count > max_rows)
            max_rows = keep_count;
        for (int64_t j = 0; j < counts[e]; j++) {
            int64_t slot = list[j];
            if (!kept[offsets[e] + j]) {
                rows[slot] = NULL;
                continue;
            }
            memcpy(expert_in + row * H, x + (slot / K) * H, (size_t)H * sizeof(float));
            rows[slot] = expert_out + row * H;
            row++;
        }
    }

    /* Compute: one call per expert over all of its kept rows. */
    scratch = moe_alloc_large((size_t)(moe_expert_scratch_floats(max_rows, F) + 1) *
                     sizeof(float));
    if (!scratch) {
        rc = moe_fail(-ENOMEM, "golden path: out of memory for expert scratch");
        goto out;
    }
    row = 0;
    for (int64_t e = 0; e < E; e++) {
        int64_t n = counts[e] - dropped[e];
        moe_expert_run(weights, e, expert_in + row * H, n, scratch,
                       expert_out + row * H);
        row += n;
    }

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
        for (int64_t i = 0; i < T * K; i++) {
            if (rows[i])
                memcpy(slot_out + i * H, rows[i], (size_t)H * sizeof(float));
            else
                memset(slot_out + i * H, 0, (size_t)H * sizeof(float));
        }
        info->expert_out = slot_out;
        info->logits = logits;
        info->scores = probs;
        info->shared_out = shared_out;
        logits = probs = shared_out = NULL;
    }
    if (info) {
        /* kept is expert-major; the caller wants it by (token, slot). */
        for (int64_t e = 0; e < E; e++)
            for (int64_t j = 0; j < counts[e]; j++)
                list_weights[by_expert[offsets[e] + j]] = kept[offsets[e] + j];
        for (int64_t i = 0; i < T * K; i++)
            kept[i] = list_weights[i] != 0.0f;
        info->tokens_per_expert = counts;
        info->dropped_per_expert = dropped;
        info->expert_ids = ids;
        info->weights = route_weights;
        info->kept = kept;
        info->router_stats = stats;
        counts = dropped = NULL;
        ids = NULL;
        route_weights = NULL;
        kept = NULL;
        stats = NULL;
    }

out:
    free(logits);
    free(probs);
    free(ids);
    free(route_weights);
    free(counts);
    free(dropped);
    free(offsets);
    free(by_expert);
    free(list_weights);
    free(kept);
    free(stats);
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
    free(info->dropped_per_expert);
    free(info->expert_ids);
    free(info->weights);
    free(info->kept);
    free(info->router_stats);
    free(info->logits);
    free(info->scores);
    free(info->expert_out);
    free(info->shared_out);
    int want_stages = info->want_stages;
    memset(info, 0, sizeof *info);
    info->want_stages = want_stages;
}
