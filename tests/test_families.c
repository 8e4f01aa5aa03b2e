/*
 * test_families.c - the family routers (sigmoid scores, score bias, group
 * limit, top-k softmax, scaling) and the shared expert's tile rule.
 *
 * Expected values are worked out by hand or in double precision here, not
 * taken from the code under test.
 */
#include "moe_layer.h"
#include "test_util.h"

#include <errno.h>
#include <stdlib.h>

static struct moe_router router_of(enum moe_scoring scoring, int renormalize,
                                   float scaling, int64_t groups, int64_t topk_groups)
{
    return (struct moe_router){scoring, renormalize, scaling, groups, topk_groups};
}

static double sigmoid_double(double v)
{
    return 1.0 / (1.0 + exp(-v));
}

Test(families, sigmoid_scores_and_weights)
{
    float logits[4] = {0.5f, -1.0f, 2.0f, 0.0f};
    float scores[4], w[2];
    int32_t ids[2];
    struct moe_router r = router_of(MOE_SCORING_SIGMOID, 0, 1.0f, 1, 1);
    moe_route(&r, NULL, logits, 1, 4, 2, scores, ids, w);

    /* sigmoid in float32 is within a few ulp of the double value */
    for (int e = 0; e < 4; e++)
        cr_assert(fabs(scores[e] - sigmoid_double(logits[e])) <= 4e-7,
                  "score %d is %.9g, expected %.9g", e, scores[e],
                  sigmoid_double(logits[e]));
    cr_assert_eq(ids[0], 2);
    cr_assert_eq(ids[1], 0);
    /* without renormalisation the weights are the scores themselves */
    cr_assert(memcmp(&w[0], &scores[2], sizeof(float)) == 0);
    cr_assert(memcmp(&w[1], &scores[0], sizeof(float)) == 0);
}

Test(families, bias_selects_weights_stay_unbiased)
{
    /* Expert 3 has the lowest score but a bias that lifts it to the top. */
    float logits[4] = {1.0f, 0.5f, 0.0f, -0.5f};
    float bias[4] = {0.0f, 0.0f, 0.0f, 0.5f};
    float scores[4], w[2];
    int32_t ids[2];
    struct moe_router r = router_of(MOE_SCORING_SIGMOID, 1, 2.5f, 1, 1);
    moe_route(&r, bias, logits, 1, 4, 2, scores, ids, w);

    /* biased keys: 0.731, 0.622, 0.5, 0.378 + 0.5 = 0.878 */
    cr_assert_eq(ids[0], 3);
    cr_assert_eq(ids[1], 0);
    double s3 = sigmoid_double(-0.5), s0 = sigmoid_double(1.0);
    /* renormalised unbiased scores times 2.5; float32 rounding of a few
     * operations stays below 1e-6 relative */
    cr_assert(fabs(w[0] - 2.5 * s3 / (s3 + s0)) <= 1e-6 * 2.5, "w0 %.9g", w[0]);
    cr_assert(fabs(w[1] - 2.5 * s0 / (s3 + s0)) <= 1e-6 * 2.5, "w1 %.9g", w[1]);
}

Test(families, group_limit_excludes_groups)
{
    /* 8 experts in 4 groups of 2; keep 2 groups. Group keys (sum of the
     * two best): g0 = 0.9 + 0.0, g1 = 0.5 + 0.5, g2 = 0.6 + 0.45,
     * g3 = 0.1 + 0.1. Groups 1 and 2 win although expert 0 is the best
     * single expert, so top-3 is {2, 4, 3} in order 4 (0.6), then 2 and 3
     * tie at 0.5 and the lower index comes first. */
    float scores_in[8] = {0.9f, 0.0f, 0.5f, 0.5f, 0.6f, 0.45f, 0.1f, 0.1f};
    float scores[8], w[3];
    int32_t ids[3];
    struct moe_router r = router_of(MOE_SCORING_TOPK_SOFTMAX, 0, 1.0f, 4, 2);
    moe_route(&r, NULL, scores_in, 1, 8, 3, scores, ids, w);
    cr_assert_eq(ids[0], 4);
    cr_assert_eq(ids[1], 2);
    cr_assert_eq(ids[2], 3);

    /* Without the group limit expert 0 wins. */
    struct moe_router flat = router_of(MOE_SCORING_TOPK_SOFTMAX, 0, 1.0f, 1, 1);
    moe_route(&flat, NULL, scores_in, 1, 8, 3, scores, ids, w);
    cr_assert_eq(ids[0], 0);
}

Test(families, group_ties_keep_lower_group)
{
    float keys[8] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
    float scores[8], w[2];
    int32_t ids[2];
    struct moe_router r = router_of(MOE_SCORING_TOPK_SOFTMAX, 0, 1.0f, 4, 1);
    moe_route(&r, NULL, keys, 1, 8, 2, scores, ids, w);
    cr_assert_eq(ids[0], 0);
    cr_assert_eq(ids[1], 1);
}

Test(families, topk_softmax_weights)
{
    float logits[5] = {1.0f, 3.0f, -2.0f, 2.0f, 0.0f};
    float scores[5], w[2];
    int32_t ids[2];
    struct moe_router r = router_of(MOE_SCORING_TOPK_SOFTMAX, 0, 1.0f, 1, 1);
    moe_route(&r, NULL, logits, 1, 5, 2, scores, ids, w);
    cr_assert_eq(ids[0], 1);
    cr_assert_eq(ids[1], 3);
    /* softmax over (3, 2): 1 / (1 + e^-1) and e^-1 / (1 + e^-1) */
    double w0 = 1.0 / (1.0 + exp(-1.0));
    cr_assert(fabs(w[0] - w0) <= 1e-6, "w0 %.9g expected %.9g", w[0], w0);
    cr_assert(fabs(w[1] - (1.0 - w0)) <= 1e-6, "w1 %.9g", w[1]);
}

Test(families, softmax_without_renormalize)
{
    float logits[4] = {0.0f, 1.0f, 2.0f, 3.0f};
    float probs[4], w[2];
    int32_t ids[2];
    struct moe_router r = router_of(MOE_SCORING_SOFTMAX_TOPK, 0, 1.0f, 1, 1);
    moe_route(&r, NULL, logits, 1, 4, 2, probs, ids, w);
    double z = 1 + exp(1) + exp(2) + exp(3);
    cr_assert(fabs(w[0] - exp(3) / z) <= 1e-6, "w0 %.9g", w[0]);
    cr_assert(fabs(w[1] - exp(2) / z) <= 1e-6, "w1 %.9g", w[1]);
    cr_assert(memcmp(&w[0], &probs[3], sizeof(float)) == 0);
}

Test(families, nan_never_selected_over_numbers)
{
    float logits[4] = {NAN, 0.1f, 0.3f, -0.2f};
    float bias[4] = {0, 0, 0, 0};
    float scores[4], w[2];
    int32_t ids[2];
    struct moe_router r = router_of(MOE_SCORING_SIGMOID, 1, 1.0f, 2, 1);
    moe_route(&r, bias, logits, 1, 4, 2, scores, ids, w);
    /* groups {0,1} and {2,3}: group 0's key contains a NaN, so group 1 wins */
    cr_assert_eq(ids[0], 2);
    cr_assert_eq(ids[1], 3);

    /* Without groups the NaN expert comes after every number. */
    struct moe_router flat = router_of(MOE_SCORING_SIGMOID, 1, 1.0f, 1, 1);
    float nan_first[4] = {NAN, 0.1f, -5.0f, -6.0f};
    int32_t all_ids[4];
    float all_w[4];
    moe_route(&flat, bias, nan_first, 1, 4, 4, scores, all_ids, all_w);
    cr_assert_eq(all_ids[0], 1);
    cr_assert_eq(all_ids[1], 2);
    cr_assert_eq(all_ids[2], 3);
    cr_assert_eq(all_ids[3], 0);
}

Test(families, router_check_rejects)
{
    struct moe_shape shape = {1, 8, 8, 8, 4, 0};
    struct moe_router ok = router_of(MOE_SCORING_SIGMOID, 1, 1.0f, 4, 2);
    cr_assert_eq(moe_router_check(&ok, &shape), 0);
    struct moe_router bad = ok;
    bad.groups = 3; /* does not divide 8 */
    cr_assert_eq(moe_router_check(&bad, &shape), -EINVAL);
    bad = ok;
    bad.topk_groups = 5;
    cr_assert_eq(moe_router_check(&bad, &shape), -EINVAL);
    bad = ok;
    bad.topk_groups = 1; /* 1 group of 2 experts cannot give top-4 */
    cr_assert_eq(moe_router_check(&bad, &shape), -EINVAL);
    bad = ok;
    bad.scaling_factor = INFINITY;
    cr_assert_eq(moe_router_check(&bad, &shape), -EINVAL);
}

/* The shared expert computed over any token range gives the bits of the
 * whole-batch call, because every call is one full tile at a fixed row. */
Test(families, shared_expert_tiles_are_exact)
{
    struct moe_shape shape = {150, 48, 32, 4, 2, 40};
    struct moe_weights w;
    cr_assert_eq(moe_weights_alloc(&w, &shape, 0, 1), 0);
    moe_weights_fill_random(&w, 7);
    moe_blas_init();

    int64_t T = shape.tokens, H = shape.hidden;
    float *x = malloc((size_t)(T * H) * sizeof(float));
    float *all = malloc((size_t)(T * H) * sizeof(float));
    float *part = malloc((size_t)(T * H) * sizeof(float));
    float *scratch = malloc((size_t)moe_shared_scratch_floats(H, shape.shared_ffn) *
                            sizeof(float));
    moe_tokens_random(x, 0, T, H, 3);
    moe_shared_expert_forward(&w, x, 0, T, scratch, all);

    static const int64_t ranges[][2] = {{0, 1}, {1, 63}, {63, 2}, {64, 64},
                                        {5, 140}, {149, 1}, {100, 50}};
    for (size_t i = 0; i < sizeof ranges / sizeof ranges[0]; i++) {
        int64_t first = ranges[i][0], count = ranges[i][1];
        moe_shared_expert_forward(&w, x + first * H, first, count, scratch, part);
        expect_bitwise_equal(part, all + first * H, count * H, "shared expert range");
    }

    /* Against plain loops with the gate applied by hand: the summation
     * order differs, so allow 1e-5 relative plus 1e-6 absolute, far above
     * float32 rounding over sums of 48 and 40 terms. */
    float *loop = malloc((size_t)(T * H) * sizeof(float));
    moe_expert_forward_loop(x, T, H, shape.shared_ffn, w.shared_w1, w.shared_w3,
                            w.shared_w2, loop);
    for (int64_t t = 0; t < T; t++) {
        double logit = 0;
        for (int64_t c = 0; c < H; c++)
            logit += (double)x[t * H + c] * w.shared_gate[c];
        for (int64_t c = 0; c < H; c++)
            loop[t * H + c] = (float)(loop[t * H + c] * sigmoid_double(logit));
    }
    expect_close(all, loop, T * H, 1e-5, 1e-6, "shared expert vs loops");

    free(x);
    free(all);
    free(part);
    free(loop);
    free(scratch);
    moe_weights_free(&w);
}
