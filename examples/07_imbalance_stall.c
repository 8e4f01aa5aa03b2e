/*
 * 07_imbalance_stall.c - a skewed router, and the rank that waits for it.
 *
 * Expert parallelism is only as fast as its busiest rank. The combine
 * returns a token's rows only after the ranks that own its experts have
 * computed them, so a rank whose experts received few rows finishes its
 * compute early and waits for the others. This
 * example runs the same layer twice on RANKS ranks: once with the random
 * gate, whose load is roughly even, and once with a gate bias of
 * -SKEW * ln(e + 1) on expert e (moe-ep run --skew), which sends most
 * tokens to the low experts, all owned by rank 0.
 *
 * Prints, for each run, the tokens per expert and their imbalance
 * (max / mean), then per rank the rows it computed, its compute time and
 * the time it spent waiting on its peers. The times are measured, so they
 * vary from run to run and grow when other programs share the cores.
 */
#include "moe_error.h"
#include "moe_run.h"

#include <stdio.h>

enum { RANKS = 2, TOKENS = 512, HIDDEN = 256, FFN = 1024, EXPERTS = 8, TOP_K = 2 };
#define SKEW 2.0

static int run_layer(double skew)
{
    struct moe_run_options options;
    moe_run_options_default(&options);
    options.shape = (struct moe_shape){.tokens = TOKENS, .hidden = HIDDEN, .ffn = FFN,
                                       .experts = EXPERTS, .top_k = TOP_K};
    options.ranks = RANKS;
    options.skew = skew;
    options.timeout_seconds = 10.0;
    struct moe_run_result result;
    int rc = moe_run(&options, &result);
    if (rc != 0) {
        fprintf(stderr, "07_imbalance_stall: the run with skew %g failed: %s\n", skew,
                moe_error_message());
        for (int i = 0; i < result.failures; i++)
            fprintf(stderr, "  %s\n", result.failure[i]);
        moe_run_result_free(&result);
        return 3;
    }

    printf("\nskew %g (seed %llu):\n  tokens per expert:", skew,
           (unsigned long long)options.seed);
    int64_t per_expert[EXPERTS] = {0};
    for (int e = 0; e < EXPERTS; e++) {
        for (int r = 0; r < RANKS; r++)
            per_expert[e] += result.counts[r * EXPERTS + e];
        printf(" %lld", (long long)per_expert[e]);
    }
    printf("\n  imbalance (max / mean): %.2f\n", moe_run_imbalance(per_expert, EXPERTS));

    for (int r = 0; r < RANKS; r++) {
        int64_t first, count, rows = 0;
        uint64_t waited_ns = 0;
        moe_block_range(EXPERTS, RANKS, r, &first, &count);
        for (int64_t e = first; e < first + count; e++)
            rows += per_expert[e];
        for (int step = 0; step < MOE_STEP_COUNT; step++)
            waited_ns += result.wait_ns[r][step];
        printf("  rank %d: experts %lld..%lld, rows computed %4lld, compute %6.2f ms, "
               "waited on peers %6.2f ms (%.2f ms of it in combine)\n", r, (long long)first,
               (long long)(first + count - 1), (long long)rows,
               (double)result.step_ns[r][MOE_STEP_COMPUTE] / 1e6, (double)waited_ns / 1e6,
               (double)result.wait_ns[r][MOE_STEP_COMBINE] / 1e6);
    }
    int equal = result.check.equal;
    printf("  golden check: %s\n", equal ? "bitwise equal" : "MISMATCH");
    moe_run_result_free(&result);
    return equal ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc > 1) {
        fprintf(stderr, "%s: invalid argument '%s': this example takes none\n", argv[0],
                argv[1]);
        return 2;
    }
    moe_blas_init();
    printf("07_imbalance_stall: ranks %d, tokens %d, hidden %d, ffn %d, experts %d, "
           "top-k %d\n", RANKS, TOKENS, HIDDEN, FFN, EXPERTS, TOP_K);
    int rc = run_layer(0.0);
    if (rc == 0)
        rc = run_layer(SKEW);
    if (rc == 0)
        printf("\nWith the skew, rank 0 owns the popular experts and computes most of the\n"
               "rows. Rank 1 finishes its few rows early, then waits in the combine until\n"
               "rank 0 returns its outputs: its wait is about the difference in compute.\n");
    return rc;
}
