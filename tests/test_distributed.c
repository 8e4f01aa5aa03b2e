/*
 * test_distributed.c - the distributed forward equals the golden path bit
 * for bit, for R = 1, 2, 3, 4 and 8 and several shapes, including ranks
 * with zero or one token, experts with no tokens, E not a multiple of R and
 * R > E; outputs are identical across rank counts; nothing is left in
 * /dev/shm.
 */
#include "moe_run.h"
#include "test_util.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* Counts /dev/shm entries created by this process (the launcher puts its
 * pid in every segment name). */
static int segments_of_this_process(void)
{
    char prefix[64];
    snprintf(prefix, sizeof prefix, "moe-ep-%ld-", (long)getpid());
    DIR *dir = opendir("/dev/shm");
    cr_assert_not_null(dir);
    int count = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL)
        count += strncmp(entry->d_name, prefix, strlen(prefix)) == 0;
    closedir(dir);
    return count;
}

/* Runs the layer on `ranks` ranks, asserts bitwise equality with the golden
 * path, and returns the output (caller frees). */
static float *run_layer(int ranks, int64_t T, int64_t H, int64_t F, int64_t E,
                        int64_t K, uint64_t seed)
{
    struct moe_run_options o;
    moe_run_options_default(&o);
    o.ranks = ranks;
    o.shape = (struct moe_shape){T, H, F, E, K, 0};
    o.seed = seed;
    o.timeout_seconds = 20;
    o.ring_bytes = 4096; /* small, so that rows go through in many chunks */

    struct moe_run_result r;
    int rc = moe_run(&o, &r);
    cr_assert_eq(rc, 0, "R=%d T=%lld E=%lld K=%lld: moe_run returned %d", ranks,
                 (long long)T, (long long)E, (long long)K, rc);
    cr_assert(r.check.equal,
              "R=%d T=%lld H=%lld E=%lld K=%lld: first difference at %lld "
              "(%.9g vs %.9g), %lld values differ", ranks, (long long)T,
              (long long)H, (long long)E, (long long)K, (long long)r.check.first,
              r.check.actual, r.check.expected, (long long)r.check.mismatches);
    expect_bitwise_equal(r.output, r.golden, T * H, "distributed vs golden");

    /* Conservation: every assignment was counted once. */
    int64_t rows = 0;
    for (int64_t i = 0; i < ranks * E; i++)
        rows += r.counts[i];
    cr_assert_eq(rows, T * K);

    float *output = r.output;
    r.output = NULL;
    moe_run_result_free(&r);
    cr_assert_eq(segments_of_this_process(), 0, "a segment was left in /dev/shm");
    return output;
}

/* Runs one shape on every rank count and requires identical outputs. */
static void check_all_rank_counts(int64_t T, int64_t H, int64_t F, int64_t E,
                                  int64_t K, uint64_t seed)
{
    static const int rank_counts[] = {1, 2, 3, 4, 8};
    float *first = NULL;
    for (size_t i = 0; i < sizeof rank_counts / sizeof rank_counts[0]; i++) {
        float *out = run_layer(rank_counts[i], T, H, F, E, K, seed);
        if (first == NULL) {
            first = out;
            continue;
        }
        expect_bitwise_equal(out, first, T * H, "output across rank counts");
        free(out);
    }
    free(first);
}

Test(distributed, mixtral_like_shape, .timeout = 120)
{
    check_all_rank_counts(96, 64, 160, 8, 2, 1);
}

Test(distributed, experts_not_multiple_of_ranks, .timeout = 120)
{
    check_all_rank_counts(50, 24, 40, 5, 2, 2);
}

Test(distributed, more_ranks_than_experts, .timeout = 120)
{
    /* With E = 3, ranks 3 to 7 of an 8-rank run own no expert. */
    check_all_rank_counts(40, 16, 24, 3, 2, 3);
}

Test(distributed, ranks_with_zero_or_one_token, .timeout = 120)
{
    /* T = 5 on 8 ranks: ranks 0-4 get one token, ranks 5-7 none. */
    check_all_rank_counts(5, 16, 32, 4, 2, 4);
    check_all_rank_counts(1, 8, 8, 2, 1, 5);
}

Test(distributed, experts_without_tokens, .timeout = 120)
{
    /* 3 tokens with top-1 over 16 experts leave at least 13 experts idle. */
    check_all_rank_counts(3, 32, 48, 16, 1, 6);
}

Test(distributed, top_k_equals_experts, .timeout = 120)
{
    check_all_rank_counts(24, 12, 20, 4, 4, 7);
}

Test(distributed, rows_larger_than_ring, .timeout = 120)
{
    /* H = 1500 floats is 6000 bytes per row, more than the 4 KiB ring, so
     * every row is split over several records. */
    check_all_rank_counts(12, 1500, 16, 4, 2, 8);
}

Test(distributed, corrupted_output_is_reported, .timeout = 60)
{
    /* The debug variable flips one bit of the gathered output before the
     * check; the check must name exactly that element. */
    setenv("MOE_EP_CORRUPT_OUTPUT", "123", 1);
    struct moe_run_options o;
    moe_run_options_default(&o);
    o.ranks = 3;
    o.shape = (struct moe_shape){20, 16, 24, 4, 2, 0};
    struct moe_run_result r;
    int rc = moe_run(&o, &r);
    unsetenv("MOE_EP_CORRUPT_OUTPUT");
    cr_assert_eq(rc, 0);
    cr_assert_not(r.check.equal);
    cr_assert_eq(r.check.first, 123);
    cr_assert_eq(r.check.mismatches, 1);
    moe_run_result_free(&r);
}
