/*
 * test_golden.c - the oracle itself: the golden path against the
 * independent double-precision reference, and the bitwise check catching a
 * single corrupted value.
 */
#include "moe_layer.h"
#include "moe_run.h"
#include "test_util.h"

#include <stdlib.h>

struct layer_case {
    int64_t tokens, hidden, ffn, experts, top_k;
    uint64_t seed;
    /* Family options; all zero is the Mixtral router. */
    enum moe_scoring scoring;
    int no_renormalize;
    float scaling_factor; /* 0 means 1 */
    int64_t groups, topk_groups;
    int64_t shared_ffn;
    int score_bias, shared_gate;
};

/* Runs the golden path and the fp64 reference on one random layer and
 * compares them token by token. */
static void compare_with_reference(struct layer_case c)
{
    struct moe_shape shape = {c.tokens, c.hidden, c.ffn, c.experts, c.top_k, c.shared_ffn};
    struct moe_weights w;
    cr_assert_eq(moe_weights_alloc(&w, &shape, c.score_bias, c.shared_gate), 0);
    moe_weights_fill_random(&w, c.seed);
    w.router.scoring = c.scoring;
    w.router.renormalize = !c.no_renormalize;
    w.router.scaling_factor = c.scaling_factor ? c.scaling_factor : 1.0f;
    w.router.groups = c.groups ? c.groups : 1;
    w.router.topk_groups = c.topk_groups ? c.topk_groups : 1;
    cr_assert_eq(moe_router_check(&w.router, &shape), 0);
    int64_t T = c.tokens, H = c.hidden, K = c.top_k;
    float *x = malloc(sizeof(float) * (size_t)(T * H));
    float *out = malloc(sizeof(float) * (size_t)(T * H));
    double *ref = malloc(sizeof(double) * (size_t)(T * H));
    int32_t *ref_ids = malloc(sizeof(int32_t) * (size_t)(T * K));
    double *gap = malloc(sizeof(double) * (size_t)T);
    moe_tokens_random(x, 0, T, H, c.seed);

    moe_blas_init();
    struct moe_golden_info info = {0};
    cr_assert_eq(moe_golden_forward(&w, x, out, &info), 0);
    cr_assert_eq(moe_reference_forward(&w, x, ref, ref_ids, gap), 0);

    /* Tolerance: fp32 routing and GEMMs against fp64 loops. The outputs are
     * of order 0.01 to 1; rounding over H + F products of order 1 leaves
     * differences near 1e-6, so 2e-5 absolute plus 1e-4 relative is a
     * margin of about 10 while a wrong expert, weight or row gives errors
     * of order 0.01 and more. Tokens whose K-th and (K+1)-th probabilities
     * are within 1e-5 could legitimately select different experts in fp32
     * and fp64; they are counted and skipped, and must be rare. */
    int64_t near_ties = 0, compared = 0;
    for (int64_t t = 0; t < T; t++) {
        if (gap[t] < 1e-5) {
            near_ties++;
            continue;
        }
        for (int64_t k = 0; k < K; k++)
            cr_assert_eq(info.expert_ids[t * K + k], ref_ids[t * K + k],
                         "token %lld slot %lld: golden picked expert %d, "
                         "reference %d", (long long)t, (long long)k,
                         info.expert_ids[t * K + k], ref_ids[t * K + k]);
        expect_close(out + t * H, ref + t * H, H, 1e-4, 2e-5, "golden vs fp64 row");
        compared++;
    }
    cr_assert_leq(near_ties, T / 100 + 1, "%lld near-tie tokens of %lld",
                  (long long)near_ties, (long long)T);
    cr_assert_gt(compared, 0);

    moe_golden_info_free(&info);
    moe_weights_free(&w);
    free(x);
    free(out);
    free(ref);
    free(ref_ids);
    free(gap);
}

Test(golden, matches_fp64_reference)
{
    compare_with_reference((struct layer_case){.tokens = 64, .hidden = 48, .ffn = 80, .experts = 8, .top_k = 2, .seed = 11});
}

/* The family routers and shared experts against the same fp64 reference,
 * with the same tolerance: the scaling factor 2.5 makes outputs larger but
 * leaves the relative rounding unchanged. */
Test(golden, matches_fp64_deepseek_router)
{
    compare_with_reference((struct layer_case){
        .tokens = 96, .hidden = 40, .ffn = 24, .experts = 16, .top_k = 4, .seed = 21,
        .scoring = MOE_SCORING_SIGMOID, .scaling_factor = 2.5f, .groups = 4,
        .topk_groups = 2, .shared_ffn = 24, .score_bias = 1});
}

Test(golden, matches_fp64_qwen2_shared_gate)
{
    compare_with_reference((struct layer_case){
        .tokens = 80, .hidden = 32, .ffn = 16, .experts = 6, .top_k = 3, .seed = 22,
        .no_renormalize = 1, .shared_ffn = 40, .shared_gate = 1});
}

Test(golden, matches_fp64_topk_softmax)
{
    compare_with_reference((struct layer_case){
        .tokens = 50, .hidden = 24, .ffn = 20, .experts = 7, .top_k = 2, .seed = 23,
        .scoring = MOE_SCORING_TOPK_SOFTMAX});
    compare_with_reference((struct layer_case){
        .tokens = 50, .hidden = 24, .ffn = 20, .experts = 8, .top_k = 3, .seed = 24,
        .scoring = MOE_SCORING_SIGMOID, .no_renormalize = 1, .groups = 8,
        .topk_groups = 3});
}

Test(golden, matches_fp64_odd_shapes)
{
    compare_with_reference((struct layer_case){.tokens = 1, .hidden = 5, .ffn = 3, .experts = 1, .top_k = 1, .seed = 12});
    compare_with_reference((struct layer_case){.tokens = 33, .hidden = 17, .ffn = 29, .experts = 5, .top_k = 3, .seed = 13});
    compare_with_reference((struct layer_case){.tokens = 40, .hidden = 32, .ffn = 24, .experts = 4, .top_k = 4, .seed = 14});
}

Test(golden, reference_differs_from_wrong_layer)
{
    /* The comparison above can fail: a layer with one expert's weights
     * changed must be flagged. */
    struct moe_shape shape = {16, 24, 40, 4, 2, 0};
    struct moe_weights w;
    cr_assert_eq(moe_weights_init_random(&w, &shape, 21), 0);
    float *x = malloc(sizeof(float) * 16 * 24);
    float *out = malloc(sizeof(float) * 16 * 24);
    double *ref = malloc(sizeof(double) * 16 * 24);
    int32_t ids[32];
    double gap[16];
    moe_tokens_random(x, 0, 16, 24, 21);
    moe_blas_init();
    cr_assert_eq(moe_reference_forward(&w, x, ref, ids, gap), 0);
    w.w2[5] += 0.5f; /* one weight of expert 0 */
    cr_assert_eq(moe_golden_forward(&w, x, out, NULL), 0);
    double max_diff = 0;
    for (int i = 0; i < 16 * 24; i++)
        max_diff = fmax(max_diff, fabs(out[i] - ref[i]));
    cr_assert_gt(max_diff, 1e-3, "a changed weight must move the output");
    moe_weights_free(&w);
    free(x);
    free(out);
    free(ref);
}

Test(golden, check_reports_corrupted_value)
{
    enum { N = 1000 };
    float a[N], b[N];
    moe_fill_uniform(a, N, 5, 9, 0, 0, 1.0f);
    memcpy(b, a, sizeof a);

    struct moe_compare same;
    moe_compare_bits(a, b, N, &same);
    cr_assert(same.equal);
    cr_assert_eq(same.first, -1);

    /* Flip the lowest bit of one value: a difference of one ulp. */
    uint32_t bits;
    memcpy(&bits, &b[617], 4);
    bits ^= 1;
    memcpy(&b[617], &bits, 4);
    struct moe_compare diff;
    moe_compare_bits(a, b, N, &diff);
    cr_assert_not(diff.equal);
    cr_assert_eq(diff.first, 617);
    cr_assert_eq(diff.mismatches, 1);
    cr_assert_eq(diff.actual, a[617]);
    cr_assert_eq(diff.expected, b[617]);
    cr_assert_gt(diff.max_abs_diff, 0.0);
}

Test(golden, check_distinguishes_zero_signs_and_nan)
{
    /* Bitwise means bitwise: -0 differs from +0, and two NaNs with the same
     * bits are equal. */
    float a[3] = {0.0f, NAN, 1.0f}, b[3] = {-0.0f, NAN, 1.0f};
    struct moe_compare r;
    moe_compare_bits(a, b, 3, &r);
    cr_assert_not(r.equal);
    cr_assert_eq(r.first, 0);
    cr_assert_eq(r.mismatches, 1);
}
