/*
 * test_capacity.c - expert capacity, the exact sums behind the aux losses,
 * and the selection bias update, on the library alone.
 */
#include "moe_aux.h"
#include "moe_layer.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

Test(capacity, factor_zero_means_dropless)
{
    cr_assert_eq(moe_capacity_from_factor(0.0, 0, 100, 2, 8), -1);
    cr_assert_eq(moe_capacity_from_factor(0.0, 50, 100, 2, 8), -1);
    /* ceil(1.0 * 100 * 2 / 8) = 25, ceil(1.1 * 25) = 28 */
    cr_assert_eq(moe_capacity_from_factor(1.0, 0, 100, 2, 8), 25);
    cr_assert_eq(moe_capacity_from_factor(1.1, 0, 100, 2, 8), 28);
    /* the floor wins when larger */
    cr_assert_eq(moe_capacity_from_factor(0.01, 7, 100, 2, 8), 7);
    cr_assert_eq(moe_capacity_from_factor(1e300, 0, 100, 2, 8), -1);
}

Test(capacity, position_keeps_the_first)
{
    float w[6] = {0.1f, 0.9f, 0.5f, 0.5f, 0.7f, 0.2f};
    uint8_t keep[6];
    struct moe_capacity c = {.limit = 3, .policy = MOE_DROP_POSITION};
    cr_assert_eq(moe_capacity_keep(&c, 6, w, keep), 3);
    uint8_t expected[6] = {1, 1, 1, 0, 0, 0};
    cr_assert_arr_eq(keep, expected, 6);
}

Test(capacity, probs_keeps_highest_with_lower_token_on_ties)
{
    /* 0.5 at positions 2 and 3 tie for the third place: position 2 wins. */
    float w[6] = {0.1f, 0.9f, 0.5f, 0.5f, 0.7f, 0.2f};
    uint8_t keep[6];
    struct moe_capacity c = {.limit = 3, .policy = MOE_DROP_PROBS};
    cr_assert_eq(moe_capacity_keep(&c, 6, w, keep), 3);
    uint8_t expected[6] = {0, 1, 1, 0, 1, 0};
    cr_assert_arr_eq(keep, expected, 6);
}

Test(capacity, probs_ranks_nan_last)
{
    float w[4] = {NAN, 0.1f, NAN, 0.2f};
    uint8_t keep[4];
    struct moe_capacity c = {.limit = 3, .policy = MOE_DROP_PROBS};
    moe_capacity_keep(&c, 4, w, keep);
    uint8_t expected[4] = {1, 1, 0, 1}; /* the first NaN beats the second */
    cr_assert_arr_eq(keep, expected, 4);
}

Test(capacity, probs_matches_a_quadratic_count)
{
    /* Many ties: weights from a small set. An assignment survives when
     * fewer than `limit` others rank above it. */
    enum { N = 301 };
    float w[N];
    uint8_t keep[N];
    for (int i = 0; i < N; i++)
        w[i] = (float)((i * 7919) % 13) / 13.0f;
    for (int limit = 0; limit <= N; limit += 37) {
        struct moe_capacity c = {.limit = limit, .policy = MOE_DROP_PROBS};
        moe_capacity_keep(&c, N, w, keep);
        for (int i = 0; i < N; i++) {
            int above = 0;
            for (int j = 0; j < N; j++)
                above += w[j] > w[i] || (w[j] == w[i] && j < i);
            cr_assert_eq(keep[i], above < limit, "limit %d, position %d", limit, i);
        }
    }
}

Test(capacity, zero_and_unlimited)
{
    float w[3] = {1, 2, 3};
    uint8_t keep[3];
    struct moe_capacity zero = {.limit = 0}, dropless = {.limit = -1};
    cr_assert_eq(moe_capacity_keep(&zero, 3, w, keep), 0);
    cr_assert_eq(keep[0] + keep[1] + keep[2], 0);
    cr_assert_eq(moe_capacity_keep(&dropless, 3, w, keep), 3);
    cr_assert_eq(keep[0] + keep[1] + keep[2], 3);
}

/* ---- exact sums ------------------------------------------------------- */

static double exact_of(const float *v, int n)
{
    struct moe_exact_sum s = {0};
    for (int i = 0; i < n; i++)
        moe_exact_add(&s, v[i]);
    return moe_exact_value(&s);
}

Test(exact_sum, order_does_not_matter)
{
    enum { N = 4096 };
    float v[N];
    unsigned seed = 7;
    for (int i = 0; i < N; i++) {
        seed = seed * 1103515245u + 12345u;
        /* magnitudes from 1e-30 to 1e30, both signs */
        float m = ldexpf((float)(seed >> 8) / 16777216.0f, (int)(seed % 200) - 100);
        v[i] = (seed & 1) ? m : -m;
    }
    double forward = exact_of(v, N);
    for (int i = 0; i < N / 2; i++) { /* reverse */
        float t = v[i];
        v[i] = v[N - 1 - i];
        v[N - 1 - i] = t;
    }
    double backward = exact_of(v, N);
    cr_assert(memcmp(&forward, &backward, sizeof forward) == 0, "%a != %a", forward,
              backward);

    /* Two halves merged word by word give the same bits. */
    struct moe_exact_sum a = {0}, b = {0};
    for (int i = 0; i < N; i++)
        moe_exact_add(i < 1000 ? &a : &b, v[i]);
    moe_exact_merge((int64_t *)&a, (const int64_t *)&b, MOE_EXACT_WORDS);
    double merged = moe_exact_value(&a);
    cr_assert(memcmp(&forward, &merged, sizeof forward) == 0);
}

Test(exact_sum, exact_where_doubles_round)
{
    /* 2^100 + 1 - 2^100 is 1 exactly; a double sum in this order gives 0. */
    float v[3] = {ldexpf(1, 100), 1.0f, -ldexpf(1, 100)};
    cr_assert_eq(exact_of(v, 3), 1.0);
    /* The smallest subnormal, many times. */
    float tiny[1000];
    for (int i = 0; i < 1000; i++)
        tiny[i] = ldexpf(1, -149);
    cr_assert_eq(exact_of(tiny, 1000), ldexp(1000.0, -149));
    /* Cancellation to exactly zero, and a negative total. */
    float c[4] = {3.5f, -1.25f, -3.5f, 1.0f};
    cr_assert_eq(exact_of(c, 4), -0.25);
    float largest[2] = {FLT_MAX, FLT_MAX};
    cr_assert_eq(exact_of(largest, 2), 2.0 * (double)FLT_MAX);
}

Test(exact_sum, rounds_once_to_nearest)
{
    /* 1 + 2^-60 + 2^-60: the exact sum is 1 + 2^-59, which rounds to 1 in
     * double. Adding 2^-53 + 2^-60 lands above the halfway point and must
     * round up, which a sum that rounds every step would not. */
    float v[3] = {1.0f, ldexpf(1, -53), ldexpf(1, -60)};
    cr_assert_eq(exact_of(v, 3), 1.0 + ldexp(1, -52));
    float w[2] = {1.0f, ldexpf(1, -53)}; /* a tie: rounds to even, 1 */
    cr_assert_eq(exact_of(w, 2), 1.0);
}

Test(exact_sum, non_finite)
{
    float a[3] = {1.0f, INFINITY, 2.0f};
    cr_assert(isinf(exact_of(a, 3)) && exact_of(a, 3) > 0);
    float b[2] = {-INFINITY, 1.0f};
    cr_assert(isinf(exact_of(b, 2)) && exact_of(b, 2) < 0);
    float c[2] = {INFINITY, -INFINITY};
    cr_assert(isnan(exact_of(c, 2)));
    float d[2] = {NAN, 1.0f};
    cr_assert(isnan(exact_of(d, 2)));
}

/* ---- aux losses and bias ------------------------------------------------ */

Test(aux_losses, uniform_router_gives_one)
{
    /* All-zero logits: P_e = 1/E for every expert, and a perfectly even
     * routing gives f_e = 1/E, so the loss is E * E * (1/E)(1/E) = 1. The
     * z-loss is ln(E)^2. */
    enum { T = 8, E = 4, K = 2 };
    float logits[T * E] = {0};
    int32_t ids[T * K];
    for (int t = 0; t < T; t++) {
        ids[t * K] = (2 * t) % E;
        ids[t * K + 1] = (2 * t + 1) % E;
    }
    int64_t stats[256] = {0};
    cr_assert_lt(moe_router_stats_len(E), 256);
    moe_router_stats_add(stats, logits, ids, T, E, K);
    struct moe_aux_losses l;
    moe_aux_losses_compute(stats, E, K, 0.01, NAN, &l);
    /* Tolerance: softmax(0) in fp32 is 0.25 exactly, ln 4 in fp32 is off
     * by up to half an ulp, about 6e-8 relative. */
    cr_assert_float_eq(l.load_balance, 1.0, 1e-12);
    cr_assert_float_eq(l.z_loss, log(4.0) * log(4.0), 1e-6);
    cr_assert_float_eq(l.load_balance_scaled, 0.01, 1e-12);
    cr_assert(isnan(l.z_loss_scaled));
}

Test(aux_losses, all_to_one_expert_gives_e)
{
    /* One expert takes every assignment and nearly all probability:
     * the loss approaches E. */
    enum { T = 4, E = 8, K = 1 };
    float logits[T * E];
    int32_t ids[T * K];
    for (int t = 0; t < T; t++) {
        for (int e = 0; e < E; e++)
            logits[t * E + e] = e == 3 ? 100.0f : 0.0f;
        ids[t] = 3;
    }
    int64_t stats[256] = {0};
    moe_router_stats_add(stats, logits, ids, T, E, K);
    struct moe_aux_losses l;
    moe_aux_losses_compute(stats, E, K, NAN, NAN, &l);
    cr_assert_float_eq(l.load_balance, (double)E, 1e-6);
    cr_assert_float_eq(l.z_loss, 100.0 * 100.0, 1e-2);
}

Test(bias_update, moves_against_the_load)
{
    /* T 4, K 1, E 4: mean load 1. Loads 3, 1, 0, 0. */
    int64_t stats[256] = {4, 3, 1, 0, 0};
    float bias[4] = {0.5f, 0.5f, 0.5f, 0.5f};
    moe_selection_bias_update(bias, stats, 4, 1, 0.25f);
    cr_assert_eq(bias[0], 0.25f);
    cr_assert_eq(bias[1], 0.5f);
    cr_assert_eq(bias[2], 0.75f);
    cr_assert_eq(bias[3], 0.75f);
}

/* ---- golden path under a capacity -------------------------------------- */

/* A layer whose gate bias sends every token to expert 2 (K 1). */
static void one_hot_layer(struct moe_weights *w, int64_t T)
{
    struct moe_shape shape = {.tokens = T, .hidden = 16, .ffn = 24, .experts = 4,
                              .top_k = 1};
    cr_assert_eq(moe_weights_init_random(w, &shape, 3), 0);
    w->gate_bias = calloc(4, sizeof(float));
    w->gate_bias[2] = 1000.0f;
    w->router.renormalize = 0; /* weights are the probabilities */
}

static void golden(struct moe_weights *w, const float *x, float *out,
                   struct moe_golden_info *g)
{
    memset(g, 0, sizeof *g);
    cr_assert_eq(moe_golden_forward(w, x, out, g), 0);
}

Test(golden_capacity, all_to_one_expert_both_policies)
{
    enum { T = 40, H = 16 };
    struct moe_weights w;
    one_hot_layer(&w, T);
    float x[T * H], out[T * H], full[T * H];
    moe_tokens_random(x, 0, T, H, 5);
    struct moe_golden_info g;
    golden(&w, x, full, &g);
    cr_assert_eq(g.tokens_per_expert[2], T);
    cr_assert_eq(g.dropped_per_expert[2], 0);
    moe_golden_info_free(&g);

    /* Position: the first 10 tokens keep their expert. */
    w.capacity = (struct moe_capacity){.limit = 10, .policy = MOE_DROP_POSITION};
    golden(&w, x, out, &g);
    cr_assert_eq(g.dropped_per_expert[2], T - 10);
    for (int t = 0; t < T; t++) {
        cr_assert_eq(g.kept[t], t < 10, "token %d", t);
        int nonzero = 0;
        for (int c = 0; c < H; c++)
            nonzero += out[t * H + c] != 0.0f;
        if (t < 10) /* a kept token carries its expert's output */
            cr_assert_gt(nonzero, 0, "kept token %d is zero", t);
        else
            cr_assert_eq(nonzero, 0, "dropped token %d is not zero", t);
    }
    moe_golden_info_free(&g);

    /* Probs: the 10 tokens with the highest weight keep it. */
    w.capacity.policy = MOE_DROP_PROBS;
    struct moe_golden_info route_info;
    golden(&w, x, out, &route_info);
    int kept = 0;
    for (int t = 0; t < T; t++) {
        int above = 0;
        for (int u = 0; u < T; u++)
            above += route_info.weights[u] > route_info.weights[t] ||
                     (route_info.weights[u] == route_info.weights[t] && u < t);
        cr_assert_eq(route_info.kept[t], above < 10, "token %d", t);
        kept += route_info.kept[t];
    }
    cr_assert_eq(kept, 10);
    moe_golden_info_free(&route_info);
    moe_weights_free(&w);
}

Test(golden_capacity, zero_capacity_outputs_zeros)
{
    enum { T = 12, H = 16 };
    struct moe_weights w;
    one_hot_layer(&w, T);
    w.capacity.limit = 0;
    float x[T * H], out[T * H];
    moe_tokens_random(x, 0, T, H, 5);
    struct moe_golden_info g;
    golden(&w, x, out, &g);
    float zeros[T * H] = {0};
    cr_assert(memcmp(out, zeros, sizeof out) == 0);
    cr_assert_eq(g.dropped_per_expert[2], T);
    moe_golden_info_free(&g);
    moe_weights_free(&w);
}

Test(golden_capacity, min_capacity_above_tokens_drops_nothing)
{
    enum { T = 12, H = 16 };
    struct moe_weights w;
    one_hot_layer(&w, T);
    float x[T * H], out[T * H], full[T * H];
    moe_tokens_random(x, 0, T, H, 5);
    struct moe_golden_info g;
    golden(&w, x, full, &g);
    moe_golden_info_free(&g);
    w.capacity.limit = moe_capacity_from_factor(0.01, 1000, T, 1, 4);
    cr_assert_eq(w.capacity.limit, 1000);
    golden(&w, x, out, &g);
    cr_assert_eq(g.dropped_per_expert[2], 0);
    cr_assert(memcmp(out, full, sizeof out) == 0);
    moe_golden_info_free(&g);
    moe_weights_free(&w);
}

/* ---- the fp64 reference on dense experts and a gate bias ---------------- */

Test(reference, dense_experts_with_gate_bias)
{
    const enum moe_activation acts[] = {MOE_ACT_RELU, MOE_ACT_GELU, MOE_ACT_GELU_TANH,
                                        MOE_ACT_SILU};
    enum { T = 64, H = 32, F = 48, E = 6, K = 1 };
    struct moe_shape shape = {.tokens = T, .hidden = H, .ffn = F, .experts = E, .top_k = K};
    for (int a = 0; a < 4; a++) {
        struct moe_weights w;
        cr_assert_eq(moe_weights_init_random(&w, &shape, 11), 0);
        w.expert_kind = MOE_EXPERT_DENSE;
        w.activation = acts[a];
        free(w.w3);
        w.w3 = NULL;
        w.router.renormalize = 0;
        w.gate_bias = malloc(E * sizeof(float));
        for (int e = 0; e < E; e++)
            w.gate_bias[e] = -0.7f * (float)e;
        float x[T * H], out[T * H];
        double ref[T * H], gap[T];
        int32_t ids[T * K];
        moe_tokens_random(x, 0, T, H, 11);
        moe_blas_init();
        struct moe_golden_info g = {0};
        cr_assert_eq(moe_golden_forward(&w, x, out, &g), 0);
        cr_assert_eq(moe_reference_forward(&w, x, ref, ids, gap), 0);
        /* The same tolerance as the SwiGLU reference check: fp32 GEMMs
         * against fp64 loops over H + F products of order 1 differ by about
         * 1e-6, and a wrong expert or weight by 1e-2 or more. */
        for (int t = 0; t < T; t++) {
            if (gap[t] < 1e-5)
                continue;
            cr_assert_eq(g.expert_ids[t], ids[t], "activation %d token %d", a, t);
            for (int h = 0; h < H; h++)
                cr_assert_leq(fabs(out[t * H + h] - ref[t * H + h]),
                              2e-5 + 1e-4 * fabs(ref[t * H + h]), "activation %d", a);
        }
        moe_golden_info_free(&g);
        /* A capacity is outside what the per-token reference covers. */
        w.capacity.limit = 3;
        cr_assert_eq(moe_reference_forward(&w, x, ref, ids, gap), -EINVAL);
        moe_weights_free(&w);
    }
}
