/*
 * 06_golden_check.c - the golden check, and proof that it can fail.
 *
 * moe_run() runs the layer on RANKS forked rank processes, then recomputes
 * it in one process (the golden path) and compares the two outputs bit for
 * bit. They can be equal because both paths do the same float operations
 * in the same order: per-token routing, each expert's rows in global token
 * order, and the combine in slot order. A check is only worth something if
 * it can fail. So this example then flips the lowest bit of one output
 * value, a change of one unit in the last place that a loose tolerance
 * would accept, and shows that the check reports that value and its index.
 *
 * Usage: 06_golden_check [INDEX]   (the value to corrupt, default 100)
 */
#include "moe_error.h"
#include "moe_run.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { RANKS = 2, TOKENS = 32, HIDDEN = 16, FFN = 32, EXPERTS = 4, TOP_K = 2 };

static void print_check(const char *label, const struct moe_compare *check)
{
    printf("%s: ", label);
    if (check->equal) {
        printf("bitwise equal (%d values)\n", TOKENS * HIDDEN);
        return;
    }
    printf("%lld value(s) differ; first at index %lld (token %lld, column %lld): "
           "%.9g, expected %.9g\n", (long long)check->mismatches, (long long)check->first,
           (long long)(check->first / HIDDEN), (long long)(check->first % HIDDEN),
           check->actual, check->expected);
}

int main(int argc, char **argv)
{
    long index = 100;
    if (argc > 2) {
        fprintf(stderr, "usage: 06_golden_check [INDEX]\n");
        return 2;
    }
    if (argc == 2) {
        char *end;
        errno = 0;
        index = strtol(argv[1], &end, 10);
        if (errno || end == argv[1] || *end || index < 0 || index >= TOKENS * HIDDEN) {
            fprintf(stderr, "06_golden_check: invalid INDEX '%s': expected an integer "
                    "from 0 to %d, the output values of %d tokens of hidden size %d\n",
                    argv[1], TOKENS * HIDDEN - 1, TOKENS, HIDDEN);
            return 2;
        }
    }

    struct moe_run_options options;
    moe_run_options_default(&options);
    options.shape = (struct moe_shape){.tokens = TOKENS, .hidden = HIDDEN, .ffn = FFN,
                                       .experts = EXPERTS, .top_k = TOP_K};
    options.ranks = RANKS;
    options.timeout_seconds = 10.0; /* every wait on a peer gives up after this */
    struct moe_run_result result;
    int rc = moe_run(&options, &result);
    if (rc != 0) {
        fprintf(stderr, "06_golden_check: the run failed: %s\n", moe_error_message());
        for (int i = 0; i < result.failures; i++)
            fprintf(stderr, "  %s\n", result.failure[i]);
        moe_run_result_free(&result);
        return 3;
    }
    printf("06_golden_check: ranks %d, tokens %d, hidden %d, ffn %d, experts %d, "
           "top-k %d, seed %llu\n", RANKS, TOKENS, HIDDEN, FFN, EXPERTS, TOP_K,
           (unsigned long long)options.seed);
    print_check("ranks against the golden path", &result.check);
    int clean = result.check.equal;

    /* Flip the lowest mantissa bit: the value moves by one unit in the last
     * place, about 1e-7 of its size. */
    float *value = &result.output[index];
    float before = *value;
    uint32_t bits;
    memcpy(&bits, value, sizeof bits);
    bits ^= 1u;
    memcpy(value, &bits, sizeof bits);
    printf("\ncorrupted output[%ld]: %.9g -> %.9g (lowest bit flipped)\n", index,
           (double)before, (double)*value);

    struct moe_compare corrupted;
    moe_compare_bits(result.output, result.golden, TOKENS * HIDDEN, &corrupted);
    print_check("check after the corruption", &corrupted);
    int caught = !corrupted.equal && corrupted.mismatches == 1 && corrupted.first == index;
    printf("%s\n", caught ? "the check caught the corrupted value at its index"
                          : "FAILED: the check did not report the corrupted value");

    moe_run_result_free(&result);
    return clean && caught ? 0 : 1;
}
