/*
 * test_router.c - top-k routing: ties, renormalisation, NaN and Inf logits,
 * and the gate logits' independence from the batch size.
 */
#include "moe_layer.h"
#include "test_util.h"

#include <stdlib.h>

/* Routes one token with the given logits. */
static void route_one(const float *logits, int64_t E, int64_t K, int32_t *ids,
                      float *weights)
{
    float probs[64];
    moe_route_topk(logits, 1, E, K, probs, ids, weights);
}

/* Asserts that ids contains K distinct experts in [0, E). */
static void expect_valid_ids(const int32_t *ids, int64_t E, int64_t K)
{
    for (int64_t k = 0; k < K; k++) {
        cr_assert(ids[k] >= 0 && ids[k] < E, "slot %lld has expert %d", (long long)k,
                  ids[k]);
        for (int64_t j = 0; j < k; j++)
            cr_assert_neq(ids[j], ids[k], "expert %d chosen twice", ids[k]);
    }
}

Test(router, picks_largest_in_order)
{
    float logits[6] = {0.1f, 2.0f, -1.0f, 3.0f, 0.5f, 2.5f};
    int32_t ids[3];
    float w[3];
    route_one(logits, 6, 3, ids, w);
    cr_assert_eq(ids[0], 3);
    cr_assert_eq(ids[1], 5);
    cr_assert_eq(ids[2], 1);
    cr_assert(w[0] > w[1] && w[1] > w[2]);
}

Test(router, ties_go_to_lower_index)
{
    float logits[5] = {1.0f, 2.0f, 2.0f, 2.0f, 0.0f};
    int32_t ids[2];
    float w[2];
    route_one(logits, 5, 2, ids, w);
    cr_assert_eq(ids[0], 1);
    cr_assert_eq(ids[1], 2);
    cr_assert_eq(w[0], w[1], "tied experts get equal weight");
}

Test(router, weights_renormalised)
{
    /* The k weights are the selected probabilities divided by their sum, so
     * they add up to 1 within a few float roundings. */
    float logits[8] = {0.3f, -0.2f, 1.7f, 0.9f, -2.0f, 0.0f, 1.1f, 0.4f};
    float probs[8];
    int32_t ids[2];
    float w[2];
    moe_route_topk(logits, 1, 8, 2, probs, ids, w);
    cr_assert_float_eq(w[0] + w[1], 1.0f, 1e-6f);
    float expected0 = probs[ids[0]] / (probs[ids[0]] + probs[ids[1]]);
    cr_assert_eq(w[0], expected0, "weight is prob / sum of selected probs");

    double total = 0;
    for (int e = 0; e < 8; e++)
        total += probs[e];
    cr_assert_float_eq(total, 1.0, 1e-6, "softmax sums to 1");
}

Test(router, top_k_equals_experts)
{
    float logits[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    int32_t ids[4];
    float w[4];
    route_one(logits, 4, 4, ids, w);
    for (int k = 0; k < 4; k++) {
        cr_assert_eq(ids[k], k);
        cr_assert_eq(w[k], 0.25f);
    }
}

Test(router, nan_logit_gives_valid_ids)
{
    /* One NaN logit makes the token's probabilities NaN; the selection still
     * returns distinct, in-range experts, lowest indices first. */
    float logits[5] = {1.0f, NAN, 3.0f, 2.0f, 0.0f};
    int32_t ids[3];
    float w[3];
    route_one(logits, 5, 3, ids, w);
    expect_valid_ids(ids, 5, 3);
    cr_assert_eq(ids[0], 0);
    cr_assert_eq(ids[1], 1);
    cr_assert_eq(ids[2], 2);
    for (int k = 0; k < 3; k++)
        cr_assert(isnan(w[k]), "weight %d is NaN", k);
}

Test(router, all_nan_logits)
{
    float logits[6];
    for (int e = 0; e < 6; e++)
        logits[e] = NAN;
    int32_t ids[6];
    float w[6];
    route_one(logits, 6, 6, ids, w);
    expect_valid_ids(ids, 6, 6);
}

Test(router, infinite_logits)
{
    /* +Inf gives Inf - Inf = NaN in the softmax; -Inf on its own is fine. */
    float pos[4] = {0.0f, INFINITY, 1.0f, 2.0f};
    int32_t ids[2];
    float w[2];
    route_one(pos, 4, 2, ids, w);
    expect_valid_ids(ids, 4, 2);

    float neg[4] = {-INFINITY, 1.0f, -INFINITY, 2.0f};
    route_one(neg, 4, 2, ids, w);
    cr_assert_eq(ids[0], 3);
    cr_assert_eq(ids[1], 1);
    cr_assert(!isnan(w[0]) && !isnan(w[1]));

    float all_neg[3] = {-INFINITY, -INFINITY, -INFINITY};
    route_one(all_neg, 3, 2, ids, w);
    expect_valid_ids(ids, 3, 2);
}

Test(router, logits_independent_of_batch)
{
    /* A token's logits are the same bits whether it is routed alone or in a
     * batch; the distributed path relies on this. */
    enum { T = 37, H = 203, E = 11 };
    float *x = malloc(sizeof(float) * T * H);
    float *gate = malloc(sizeof(float) * E * H);
    float *batch = malloc(sizeof(float) * T * E);
    float single[E];
    moe_fill_uniform(x, T * H, 7, 100, 0, 0, 1.0f);
    moe_fill_uniform(gate, E * H, 7, 101, 0, 0, 0.2f);
    moe_gate_logits(x, gate, T, H, E, batch);
    for (int t = 0; t < T; t++) {
        moe_gate_logits(x + t * H, gate, 1, H, E, single);
        expect_bitwise_equal(single, batch + t * E, E, "logits of one token");
    }

    /* And they agree with a double-precision dot product. */
    for (int t = 0; t < T; t++)
        for (int e = 0; e < E; e++) {
            double ref = 0;
            for (int h = 0; h < H; h++)
                ref += (double)x[t * H + h] * (double)gate[e * H + h];
            cr_assert_float_eq(batch[t * E + e], ref, 1e-4,
                               "logit (%d, %d)", t, e);
        }
    free(x);
    free(gate);
    free(batch);
}
