/*
 * aux.c - exact sums and the router's auxiliary losses; see moe_aux.h.
 *
 * A finite float32 is m * 2^x with an integer |m| < 2^24 and x >= -149.
 * Shifted to the accumulator's unit 2^-149, it is m * 2^p with p = x + 149
 * from 0 to 253, which touches two adjacent 32-bit limbs. Adding it is two
 * integer additions, so the order of the terms cannot matter.
 */
#include "moe_aux.h"
#include "moe_layer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void moe_exact_add(struct moe_exact_sum *sum, float value)
{
    if (isnan(value)) {
        sum->nan++;
        return;
    }
    if (isinf(value)) {
        if (value > 0)
            sum->pos_inf++;
        else
            sum->neg_inf++;
        return;
    }
    if (value == 0.0f)
        return;
    int exponent;
    float fraction = frexpf(value, &exponent); /* value = fraction * 2^exponent */
    /* fraction * 2^24 is an integer for every float32, normal or not. */
    int64_t mantissa = (int64_t)ldexpf(fraction, 24);
    int p = exponent - 24 + 149;
    if (p < 0) { /* a subnormal: its low mantissa bits are zero */
        mantissa >>= -p;
        p = 0;
    }
    int64_t shifted = mantissa * ((int64_t)1 << (p % 32)); /* |.| < 2^55 */
    int limb = p / 32;
    int64_t low = (int64_t)((uint64_t)shifted & 0xffffffffu);
    if (shifted < 0)
        low = -(int64_t)((uint64_t)(-shifted) & 0xffffffffu);
    sum->limb[limb] += low;
    sum->limb[limb + 1] += (shifted - low) / ((int64_t)1 << 32);
}

void moe_exact_merge(int64_t *dst, const int64_t *src, int64_t words)
{
    for (int64_t i = 0; i < words; i++)
        dst[i] += src[i];
}

double moe_exact_value(const struct moe_exact_sum *sum)
{
    if (sum->nan || (sum->pos_inf && sum->neg_inf))
        return NAN;
    if (sum->pos_inf)
        return INFINITY;
    if (sum->neg_inf)
        return -INFINITY;
    /* Carry so that every limb but the top one is in [0, 2^32). The top
     * limb keeps the sign. */
    int64_t limb[MOE_EXACT_LIMBS];
    memcpy(limb, sum->limb, sizeof limb);
    for (int i = 0; i + 1 < MOE_EXACT_LIMBS; i++) {
        int64_t carry = limb[i] >> 32; /* floor division by 2^32 */
        limb[i] -= carry * ((int64_t)1 << 32);
        limb[i + 1] += carry;
    }
    int negative = limb[MOE_EXACT_LIMBS - 1] < 0;
    if (negative) { /* negate the two's-complement multi-limb number */
        int64_t borrow = 0;
        for (int i = 0; i < MOE_EXACT_LIMBS; i++) {
            int64_t v = -limb[i] - borrow;
            borrow = 0;
            if (i + 1 < MOE_EXACT_LIMBS && v < 0) {
                v += (int64_t)1 << 32;
                borrow = 1;
            }
            limb[i] = v;
        }
    }
    /* The magnitude as a 64-bit window of its top bits plus a sticky bit,
     * converted once, so the double is the exact sum rounded once. */
    int top = MOE_EXACT_LIMBS - 1;
    while (top > 0 && limb[top] == 0)
        top--;
    unsigned __int128 window = 0;
    int sticky = 0;
    for (int i = top; i >= 0; i--) {
        if (i >= top - 2)
            window = (window << 32) | (uint64_t)limb[i];
        else if (limb[i])
            sticky = 1;
    }
    int shift_base = 32 * (top >= 2 ? top - 2 : 0) - 149;
    /* Keep 63 significant bits of the window, folding the rest into the
     * sticky bit so that one rounding happens in the conversion. */
    int excess = 0;
    while ((window >> 63) > 0) {
        sticky |= (int)(window & 1);
        window >>= 1;
        excess++;
    }
    uint64_t bits = (uint64_t)window | (uint64_t)sticky;
    double value = ldexp((double)bits, shift_base + excess);
    return negative ? -value : value;
}

int64_t moe_router_stats_len(int64_t experts)
{
    return 1 + experts + (experts + 1) * MOE_EXACT_WORDS;
}

void moe_router_stats_add(int64_t *stats, const float *logits, const int32_t *ids,
                          int64_t tokens, int64_t experts, int64_t top_k)
{
    struct moe_exact_sum *prob_sum = (struct moe_exact_sum *)(stats + 1 + experts);
    struct moe_exact_sum *z_sum = prob_sum + experts;
    float probs[MOE_MAX_EXPERTS];
    stats[0] += tokens;
    for (int64_t t = 0; t < tokens; t++) {
        const float *row = logits + t * experts;
        for (int64_t k = 0; k < top_k; k++)
            stats[1 + ids[t * top_k + k]]++;
        moe_softmax_row(row, experts, probs);
        for (int64_t e = 0; e < experts; e++)
            moe_exact_add(&prob_sum[e], probs[e]);
        /* logsumexp with the row maximum taken out, in fp32 */
        float max = row[0];
        for (int64_t e = 1; e < experts; e++)
            if (row[e] > max)
                max = row[e];
        float total = 0.0f;
        for (int64_t e = 0; e < experts; e++)
            total += expf(row[e] - max);
        float lse = isinf(max) ? max : max + logf(total);
        moe_exact_add(z_sum, lse * lse);
    }
}

void moe_aux_losses_compute(const int64_t *stats, int64_t experts, int64_t top_k,
                            double aux_loss_coef, double z_loss_coef,
                            struct moe_aux_losses *l)
{
    const struct moe_exact_sum *prob_sum =
        (const struct moe_exact_sum *)(stats + 1 + experts);
    double tokens = (double)stats[0];
    double assignments = tokens * (double)top_k;
    double total = 0.0;
    for (int64_t e = 0; e < experts; e++) {
        double f = (double)stats[1 + e] / assignments;
        double p = moe_exact_value(&prob_sum[e]) / tokens;
        total += f * p;
    }
    *l = (struct moe_aux_losses){
        .load_balance = tokens > 0 ? (double)experts * total : 0.0,
        .z_loss = tokens > 0 ? moe_exact_value(&prob_sum[experts]) / tokens : 0.0,
        .aux_loss_coef = aux_loss_coef,
        .z_loss_coef = z_loss_coef,
    };
    l->load_balance_scaled = l->load_balance * aux_loss_coef;
    l->z_loss_scaled = l->z_loss * z_loss_coef;
}

void moe_selection_bias_update(float *bias, const int64_t *stats, int64_t experts,
                               int64_t top_k, float rate)
{
    double mean = (double)stats[0] * (double)top_k / (double)experts;
    for (int64_t e = 0; e < experts; e++) {
        double load = (double)stats[1 + e];
        if (load < mean)
            bias[e] += rate;
        else if (load > mean)
            bias[e] -= rate;
    }
}
