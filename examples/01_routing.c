/*
 * 01_routing.c - how the router chooses K experts for each token.
 *
 * The gate is one (E, H) matrix. A token's E logits are its dot products
 * with the gate rows, softmax turns them into probabilities, and the
 * router keeps the K most probable experts. Their probabilities, divided
 * by their sum, become the weights that the combine step uses later.
 * This is Mixtral's router, which random layers use.
 *
 * Prints the layer's shape and seed, then per token its logits, its
 * probabilities, the chosen experts and their weights, and last how many
 * assignments each expert received. Those counts decide how many rows
 * each expert has to compute, which later examples return to.
 */
#include "moe_layer.h"

#include <stdint.h>
#include <stdio.h>

enum { TOKENS = 6, HIDDEN = 8, FFN = 4, EXPERTS = 4, TOP_K = 2 };
#define SEED 7

static void print_row(const char *label, const float *values, int count)
{
    printf("  %-14s", label);
    for (int i = 0; i < count; i++)
        printf(" %8.4f", values[i]);
    printf("\n");
}

int main(int argc, char **argv)
{
    if (argc > 1) {
        fprintf(stderr, "%s: invalid argument '%s': this example takes none\n", argv[0],
                argv[1]);
        return 2;
    }
    struct moe_shape shape = {.tokens = TOKENS, .hidden = HIDDEN, .ffn = FFN,
                              .experts = EXPERTS, .top_k = TOP_K};
    struct moe_weights layer;
    if (moe_weights_init_random(&layer, &shape, SEED) != 0) {
        fprintf(stderr, "01_routing: out of memory for the layer weights\n");
        return 3;
    }

    /* x (T, H): the tokens. logits and probs (T, E), ids and weights (T, K). */
    float x[TOKENS * HIDDEN], logits[TOKENS * EXPERTS], probs[TOKENS * EXPERTS];
    float weights[TOKENS * TOP_K];
    int32_t ids[TOKENS * TOP_K];
    moe_tokens_random(x, 0, TOKENS, HIDDEN, SEED);

    /* Step 1: logits = x . gate^T, one dot product per (token, expert). */
    moe_gate_logits(x, layer.gate, TOKENS, HIDDEN, EXPERTS, logits);

    /* Step 2: softmax, top-k, renormalise. Ties go to the lower expert. */
    moe_route(&layer.router, NULL, logits, TOKENS, EXPERTS, TOP_K, probs, ids, weights);

    printf("01_routing: tokens %d, hidden %d, ffn %d, experts %d, top-k %d, seed %d\n",
           TOKENS, HIDDEN, FFN, EXPERTS, TOP_K, SEED);
    printf("Each token keeps its %d most probable experts; their weights are the\n"
           "kept probabilities divided by their sum.\n\n", TOP_K);

    int64_t per_expert[EXPERTS] = {0};
    for (int t = 0; t < TOKENS; t++) {
        printf("token %d\n", t);
        print_row("logits", &logits[t * EXPERTS], EXPERTS);
        print_row("probabilities", &probs[t * EXPERTS], EXPERTS);

        float kept_sum = 0.0f;
        printf("token %d: experts", t);
        for (int k = 0; k < TOP_K; k++) {
            int32_t e = ids[t * TOP_K + k];
            printf(" %d", e);
            kept_sum += probs[t * EXPERTS + e];
            per_expert[e]++;
        }
        printf(", weights");
        for (int k = 0; k < TOP_K; k++)
            printf(" %.4f", weights[t * TOP_K + k]);
        printf(" (kept probability %.4f)\n", kept_sum);
    }

    printf("\ntokens per expert:");
    for (int e = 0; e < EXPERTS; e++)
        printf(" %lld", (long long)per_expert[e]);
    printf("  (sum %d = tokens x top-k)\n", TOKENS * TOP_K);

    moe_weights_free(&layer);
    return 0;
}
