/*
 * 08_capacity_dropping.c - expert capacity: which assignments are dropped.
 *
 * With a capacity, each expert computes at most C rows per batch, so that
 * no rank can be swamped by a popular expert. moe-ep sets
 *   C = ceil(capacity_factor * T * K / E),
 * the mean load times the factor, and an expert that receives more than C
 * assignments drops the rest. A dropped assignment adds nothing to its
 * token's output (its other experts still count). Which ones are dropped
 * depends on the drop policy:
 *   position  keep the first C assignments in token order, as Switch
 *             Transformers does;
 *   probs     keep the C assignments with the highest routing weight.
 * The rule depends on the whole batch's routing, never on the rank split,
 * so the ranks drop exactly what the golden path drops. This example
 * checks that too, on RANKS ranks.
 */
#include "moe_error.h"
#include "moe_run.h"

#include <stdio.h>
#include <string.h>

enum { RANKS = 2, TOKENS = 8, HIDDEN = 8, FFN = 8, EXPERTS = 4, TOP_K = 2 };
#define SEED 4
#define CAPACITY_FACTOR 0.75

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
    int64_t capacity = moe_capacity_from_factor(CAPACITY_FACTOR, 0, TOKENS, TOP_K, EXPERTS);
    struct moe_weights layer;
    float x[TOKENS * HIDDEN], out[TOKENS * HIDDEN];
    if (moe_weights_init_random(&layer, &shape, SEED) != 0) {
        fprintf(stderr, "08_capacity_dropping: out of memory for the layer\n");
        return 3;
    }
    moe_tokens_random(x, 0, TOKENS, HIDDEN, SEED);
    printf("08_capacity_dropping: tokens %d, hidden %d, ffn %d, experts %d, top-k %d, "
           "seed %d\ncapacity = ceil(%.2f x %d x %d / %d) = %lld assignments per expert\n",
           TOKENS, HIDDEN, FFN, EXPERTS, TOP_K, SEED, CAPACITY_FACTOR, TOKENS, TOP_K,
           EXPERTS, (long long)capacity);

    const char *names[] = {"position", "probs"};
    int status = 0; /* 0, 1 when a check fails, 3 when a run fails */
    for (int policy = MOE_DROP_POSITION; policy <= MOE_DROP_PROBS && status == 0; policy++) {
        layer.capacity = (struct moe_capacity){.limit = capacity,
                                               .policy = (enum moe_drop_policy)policy};
        struct moe_golden_info info = {0};
        if (moe_golden_forward(&layer, x, out, &info) != 0) {
            fprintf(stderr, "08_capacity_dropping: out of memory for the golden path\n");
            moe_weights_free(&layer);
            return 3;
        }
        if (policy == MOE_DROP_POSITION) {
            printf("\nassignments per expert, in token order (token:weight):\n");
            for (int e = 0; e < EXPERTS; e++) {
                printf("  expert %d:", e);
                for (int i = 0; i < TOKENS * TOP_K; i++)
                    if (info.expert_ids[i] == e)
                        printf(" %d:%.3f", i / TOP_K, info.weights[i]);
                printf("\n");
            }
        }

        printf("\ndrop policy %s:\n", names[policy]);
        for (int e = 0; e < EXPERTS; e++)
            printf("  expert %d: routed %lld, kept %lld, dropped %lld\n", e,
                   (long long)info.tokens_per_expert[e],
                   (long long)(info.tokens_per_expert[e] - info.dropped_per_expert[e]),
                   (long long)info.dropped_per_expert[e]);
        printf("  dropped (token:weight->expert):");
        for (int i = 0; i < TOKENS * TOP_K; i++)
            if (!info.kept[i])
                printf(" %d:%.3f->%d", i / TOP_K, info.weights[i], info.expert_ids[i]);
        printf("\n  tokens that lost every expert, so their output is zero:");
        int lost = 0;
        for (int t = 0; t < TOKENS; t++) {
            int kept_slots = 0;
            for (int k = 0; k < TOP_K; k++)
                kept_slots += info.kept[t * TOP_K + k];
            if (kept_slots == 0) {
                printf(" %d", t);
                lost++;
            }
        }
        printf("%s\n", lost ? "" : " none");

        /* The same layer on RANKS ranks must drop the same assignments. */
        struct moe_run_options options;
        struct moe_run_result result;
        moe_run_options_default(&options);
        options.shape = shape;
        options.ranks = RANKS;
        options.seed = SEED;
        options.expert_capacity = capacity;
        options.drop_policy = policy;
        options.timeout_seconds = 10.0;
        if (moe_run(&options, &result) != 0) {
            fprintf(stderr, "08_capacity_dropping: the run failed: %s\n", moe_error_message());
            status = 3;
        } else {
            int same = memcmp(result.kept, info.kept, TOKENS * TOP_K) == 0 &&
                       memcmp(result.output, out, sizeof out) == 0;
            printf("  on %d ranks: %s\n", RANKS,
                   same ? "the same assignments dropped, output bitwise equal"
                        : "FAILED: the ranks dropped other assignments or the output differs");
            status = same ? 0 : 1;
        }
        moe_run_result_free(&result);
        moe_golden_info_free(&info);
    }
    moe_weights_free(&layer);
    return status;
}
