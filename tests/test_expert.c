/*
 * test_expert.c - the OpenBLAS SwiGLU expert against the plain-loop one, and
 * the properties the golden check relies on.
 */
#include "moe_layer.h"
#include "test_util.h"

#include <stdlib.h>

struct expert_case {
    int64_t rows, hidden, ffn;
};

static void run_case(struct expert_case c)
{
    int64_t M = c.rows, H = c.hidden, F = c.ffn;
    float *x = malloc(sizeof(float) * (size_t)(M * H + 1));
    float *w1 = malloc(sizeof(float) * (size_t)(F * H));
    float *w3 = malloc(sizeof(float) * (size_t)(F * H));
    float *w2 = malloc(sizeof(float) * (size_t)(H * F));
    float *fast = malloc(sizeof(float) * (size_t)(M * H + 1));
    float *slow = malloc(sizeof(float) * (size_t)(M * H + 1));
    float *scratch = malloc(sizeof(float) * (size_t)(moe_expert_scratch_floats(M, F) + 1));
    moe_fill_uniform(x, M * H, 3, 200, 0, 0, 1.0f);
    moe_fill_uniform(w1, F * H, 3, 201, 0, 0, 1.0f / sqrtf((float)H));
    moe_fill_uniform(w3, F * H, 3, 202, 0, 0, 1.0f / sqrtf((float)H));
    moe_fill_uniform(w2, H * F, 3, 203, 0, 0, 1.0f / sqrtf((float)F));

    moe_blas_init();
    moe_expert_forward(x, M, H, F, w1, w3, w2, scratch, fast);
    moe_expert_forward_loop(x, M, H, F, w1, w3, w2, slow);

    /* The two sum in different orders. With inputs of order 1 and weights
     * scaled by 1/sqrt(fan-in), outputs are of order 0.1 to 1 and float
     * rounding over H + F terms stays below 1e-5; 1e-4 absolute leaves a
     * margin while any wrong index or transposed matrix gives errors of
     * order 0.1. */
    expect_close(fast, slow, M * H, 1e-4, 1e-4, "moe_expert_forward vs loop expert");

    free(x);
    free(w1);
    free(w3);
    free(w2);
    free(fast);
    free(slow);
    free(scratch);
}

Test(expert, sgemm_matches_loop_square)
{
    run_case((struct expert_case){.rows = 16, .hidden = 64, .ffn = 64});
}

Test(expert, sgemm_matches_loop_odd_shapes)
{
    run_case((struct expert_case){.rows = 1, .hidden = 7, .ffn = 13});
    run_case((struct expert_case){.rows = 33, .hidden = 129, .ffn = 67});
    run_case((struct expert_case){.rows = 5, .hidden = 256, .ffn = 704});
}

Test(expert, row_kernel_matches_loop)
{
    /* Calls of at most moe_expert_row_kernel_rows() rows take the row
     * kernel on CPUs with AVX2 and FMA, and sgemm elsewhere: either way the
     * loop expert checks them. H and F that are not multiples of 8 or 4
     * reach the kernel's scalar tails and its single-row blocks; 17 rows
     * is the first sgemm call after the kernel's limit. */
    static const struct expert_case cases[] = {
        {1, 1024, 1024}, {2, 64, 96}, {3, 37, 13}, {4, 8, 4}, {5, 100, 30},
        {8, 1, 3}, {15, 72, 40}, {16, 33, 65}, {17, 64, 64},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        run_case(cases[i]);
}

Test(expert, row_kernel_limit)
{
    int64_t rows = moe_expert_row_kernel_rows();
#if defined(__x86_64__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        cr_expect_eq(rows, 16, "this CPU has AVX2 and FMA, yet the row "
                     "kernel takes %lld rows", (long long)rows);
    else
        cr_expect_eq(rows, 0);
#else
    cr_expect_eq(rows, 0);
#endif
}

Test(expert, zero_rows_writes_nothing)
{
    float y[4] = {1.0f, 2.0f, 3.0f, 4.0f};
    float w[4] = {0};
    moe_expert_forward(NULL, 0, 2, 2, w, w, w, NULL, y);
    cr_assert_eq(y[0], 1.0f);
    cr_assert_eq(y[3], 4.0f);
}

Test(expert, same_rows_same_bits)
{
    /* Two calls with the same (M, H, F) and inputs give identical bits,
     * whatever buffers they use: the basis of the golden check. */
    enum { M = 24, H = 96, F = 160 };
    float *x = malloc(sizeof(float) * M * H), *x2 = malloc(sizeof(float) * M * H + 64);
    float *w1 = malloc(sizeof(float) * F * H), *w3 = malloc(sizeof(float) * F * H);
    float *w2 = malloc(sizeof(float) * H * F);
    float *a = malloc(sizeof(float) * M * H), *b = malloc(sizeof(float) * M * H);
    float *s1 = malloc(sizeof(float) * 2 * M * F), *s2 = malloc(sizeof(float) * 2 * M * F);
    moe_fill_uniform(x, M * H, 4, 1, 0, 0, 1.0f);
    moe_fill_uniform(w1, F * H, 4, 2, 0, 0, 0.1f);
    moe_fill_uniform(w3, F * H, 4, 3, 0, 0, 0.1f);
    moe_fill_uniform(w2, H * F, 4, 4, 0, 0, 0.1f);
    float *x_shifted = x2 + 3; /* a different alignment */
    memcpy(x_shifted, x, sizeof(float) * M * H);

    moe_blas_init();
    moe_expert_forward(x, M, H, F, w1, w3, w2, s1, a);
    moe_expert_forward(x_shifted, M, H, F, w1, w3, w2, s2, b);
    expect_bitwise_equal(a, b, M * H, "same expert call twice");
    free(x);
    free(x2);
    free(w1);
    free(w3);
    free(w2);
    free(a);
    free(b);
    free(s1);
    free(s2);
}

Test(expert, silu_values)
{
    cr_assert_eq(moe_silu(0.0f), 0.0f);
    cr_assert_float_eq(moe_silu(1.0f), 0.7310586f, 1e-6f);
    cr_assert_float_eq(moe_silu(-1.0f), -0.2689414f, 1e-6f);
    cr_assert(isnan(moe_silu(NAN)));
}
