/*
 * 05_combine.c - the combine: each token's output is the weighted sum of
 * the outputs of its K experts.
 *
 *   out[t] = sum over k = 0..K-1 of weights[t][k] * expert_out[t][k]
 *
 * After the second all-to-all, each rank holds, for each of its tokens,
 * the K rows its experts returned. moe_combine() sums them in slot order
 * k = 0, 1, ..., K-1 in float32. The golden path calls the same function
 * in the same order, which is one reason why the two outputs are equal bit
 * for bit. This example takes the golden path's expert outputs and weights
 * and writes one output value out as a sum. It recombines all tokens and
 * checks the bits. Then it sums the same terms in reverse slot order, which
 * changes the last bits of many values, and drops one slot (a NULL row),
 * which removes that term from the sum.
 */
#include "moe_layer.h"

#include <stdio.h>
#include <string.h>

enum { TOKENS = 16, HIDDEN = 8, FFN = 16, EXPERTS = 6, TOP_K = 3 };
#define SEED 5

int main(int argc, char **argv)
{
    if (argc > 1) {
        fprintf(stderr, "%s: invalid argument '%s': this example takes none\n", argv[0],
                argv[1]);
        return 2;
    }
    moe_blas_init();
    struct moe_shape shape = {.tokens = TOKENS, .hidden = HIDDEN, .ffn = FFN,
                              .experts = EXPERTS, .top_k = TOP_K};
    struct moe_weights layer;
    struct moe_golden_info info = {.want_stages = 1};
    float x[TOKENS * HIDDEN], golden[TOKENS * HIDDEN], out[TOKENS * HIDDEN];
    moe_tokens_random(x, 0, TOKENS, HIDDEN, SEED);
    if (moe_weights_init_random(&layer, &shape, SEED) != 0) {
        fprintf(stderr, "05_combine: out of memory for the layer\n");
        return 3;
    }
    if (moe_golden_forward(&layer, x, golden, &info) != 0) {
        fprintf(stderr, "05_combine: out of memory for the golden path\n");
        moe_weights_free(&layer);
        return 3;
    }

    /* rows[t * K + k] points at expert ids[t][k]'s output for token t. */
    const float *rows[TOKENS * TOP_K];
    for (int i = 0; i < TOKENS * TOP_K; i++)
        rows[i] = info.expert_out + (int64_t)i * HIDDEN;

    printf("05_combine: tokens %d, hidden %d, ffn %d, experts %d, top-k %d, seed %d\n\n",
           TOKENS, HIDDEN, FFN, EXPERTS, TOP_K, SEED);
    printf("token 0, column 0, summed in slot order:\n  out[0][0] =");
    float sum = 0.0f, all_but_last = 0.0f;
    for (int k = 0; k < TOP_K; k++) {
        if (k == TOP_K - 1)
            all_but_last = sum;
        float w = info.weights[k], value = rows[k][0];
        printf("%s %.6f * %.6f (expert %d)", k ? "\n            +" : "", w, value,
               info.expert_ids[k]);
        sum += w * value;
    }
    printf("\n            = %.9g\n", sum);

    moe_combine(TOKENS, HIDDEN, TOP_K, info.weights, rows, out);
    int same = memcmp(out, golden, sizeof out) == 0;
    printf("moe_combine over all %d tokens: %s the golden output (%d values)\n", TOKENS,
           same ? "bitwise equal to" : "DIFFERENT from", TOKENS * HIDDEN);

    /* The same terms in reverse slot order. */
    int differ = 0;
    for (int t = 0; t < TOKENS; t++)
        for (int c = 0; c < HIDDEN; c++) {
            float reverse = 0.0f;
            for (int k = TOP_K - 1; k >= 0; k--)
                reverse += info.weights[t * TOP_K + k] * rows[t * TOP_K + k][c];
            differ += memcmp(&reverse, &out[t * HIDDEN + c], sizeof reverse) != 0;
        }
    printf("summed in reverse slot order: %d of %d values differ in their bits\n", differ,
           TOKENS * HIDDEN);

    /* A dropped slot is a NULL row: it contributes nothing. */
    float dropped[HIDDEN];
    rows[TOP_K - 1] = NULL;
    moe_combine(1, HIDDEN, TOP_K, info.weights, rows, dropped);
    printf("with slot %d of token 0 dropped: out[0][0] = %.9g, and the sum of the "
           "first %d terms above is %.9g\n", TOP_K - 1, dropped[0], TOP_K - 1, all_but_last);

    moe_golden_info_free(&info);
    moe_weights_free(&layer);
    return same ? 0 : 1;
}
