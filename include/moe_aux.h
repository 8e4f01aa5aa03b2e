/*
 * moe_aux.h - the router's auxiliary losses, summed so that every rank count
 * gives the same bits.
 *
 * Both losses are means over the whole batch, and a float sum depends on
 * the order of its terms. A rank can only sum its own tokens, so the partial
 * sums, and any float sum of them, would change with the rank split.
 * Instead each term enters an exact fixed-point accumulator (struct
 * moe_exact_sum): integers, whose sums are the same in any order. The ranks
 * add their accumulators with an all-reduce of int64 in rank order, and
 * only the final conversion rounds. The golden path accumulates all tokens
 * the same way and gets the same bits.
 *
 * The losses, for T tokens, E experts and top-k K:
 *   load-balancing loss  E * sum_e f_e * P_e, where f_e is the fraction of
 *                        the T*K assignments routed to e (before any drop)
 *                        and P_e is the mean over tokens of softmax(logits)_e
 *   router z-loss        mean over tokens of logsumexp(logits)^2
 * Both use the logits after the gate bias, in fp32 per token.
 */
#ifndef MOE_AUX_H
#define MOE_AUX_H

#include <stdint.h>

/* Limbs of 32 bits each, from 2^-149 (the smallest float32 subnormal) up to
 * 2^235, enough for 2^31 terms of the largest finite float32. */
#define MOE_EXACT_LIMBS 12

/* An exact sum of float32 values, as int64 words so that an all-reduce can
 * add two of them word by word. Each limb is a signed count of units of
 * 2^(32 * i - 149); limbs are only carried when the value is read, so up to
 * 2^31 terms can be added before that. */
struct moe_exact_sum {
    int64_t limb[MOE_EXACT_LIMBS];
    int64_t nan, pos_inf, neg_inf; /* non-finite terms, counted */
};

#define MOE_EXACT_WORDS (MOE_EXACT_LIMBS + 3)

void moe_exact_add(struct moe_exact_sum *sum, float value);

/* Adds `words` int64 words of src to dst, word by word. */
void moe_exact_merge(int64_t *dst, const int64_t *src, int64_t words);

/* The sum rounded to double: NaN if a term was NaN or both infinities
 * occurred, an infinity if one did, else the exact sum rounded once. */
double moe_exact_value(const struct moe_exact_sum *sum);

/* Router statistics of a block of tokens, laid out as int64 words:
 *   [0]                     tokens
 *   [1 .. E]                assignments routed to each expert
 *   then E exact sums       of softmax(logits)_e over the tokens
 *   then one exact sum      of logsumexp(logits)^2 over the tokens */
int64_t moe_router_stats_len(int64_t experts);

/* Adds `tokens` tokens to stats (moe_router_stats_len(E) words, zeroed by
 * the caller before the first call). logits (tokens, E), ids (tokens, K). */
void moe_router_stats_add(int64_t *stats, const float *logits,
                          const int32_t *ids, int64_t tokens, int64_t experts,
                          int64_t top_k);

struct moe_aux_losses {
    double load_balance;        /* E * sum_e f_e * P_e */
    double z_loss;              /* mean logsumexp^2 */
    double aux_loss_coef;       /* router_aux_loss_coef, or NaN */
    double z_loss_coef;         /* router_z_loss_coef, or NaN */
    double load_balance_scaled; /* load_balance * aux_loss_coef, or NaN */
    double z_loss_scaled;       /* z_loss * z_loss_coef, or NaN */
};

/* Computes the losses from whole-batch stats. */
void moe_aux_losses_compute(const int64_t *stats, int64_t experts, int64_t top_k,
                            double aux_loss_coef, double z_loss_coef,
                            struct moe_aux_losses *losses);

/* Aux-loss-free balancing (DeepSeek-V3): after a forward with whole-batch
 * stats, moves each expert's selection bias by
 *   b_e += rate * sign(mean load - load_e),  mean load = T * K / E,
 * where load_e is the assignments routed to e. The ranks and the golden
 * path call this with the same stats, so their biases stay bit for bit
 * equal. */
void moe_selection_bias_update(float *bias, const int64_t *stats, int64_t experts,
                               int64_t top_k, float rate);

#endif
