/*
 * test_ring_threads.c - the ring and the collectives with threads in place
 * of processes (ring_threads.h), in the normal suite. `make tsan` runs the
 * same code under ThreadSanitizer through tests/tsan/ring_threads.c.
 *
 * Checks:
 *   - 200,000 records of 0 to 1500 bytes arrive once, in order, with their
 *     lengths and payload checksums, while the indices pass 2^64;
 *   - a payload altered after its checksum is reported, so the comparison
 *     can fail;
 *   - four rank threads exchange six rounds of uneven moe_alltoallv()
 *     messages of up to five ring-fulls, then an allgather and barriers,
 *     and every byte arrives at the right place.
 */
#include "ring_threads.h"
#include "test_util.h"

/* Criterion timeout of every test in this file. NOTE: one value for all of
 * them because Criterion 2.4.1, run with --jobs 2, leaks 48 bytes in its
 * runner when tests with different timeouts run side by side. */
#define TEST_TIMEOUT_S 60

Test(ring_threads, stream_with_checksums, .timeout = TEST_TIMEOUT_S)
{
    /* 2^64 - 64 KiB: the indices pass 2^64 after about 90 records. */
    const uint64_t records = 200000;
    struct stream s;
    cr_assert_eq(run_stream(&s, records, UINT64_MAX - (64u << 10) + 1, UINT64_MAX),
                 0, "%s", s.error);

    cr_assert_str_empty(s.producer_error, "producer: %s", s.producer_error);
    cr_assert_str_empty(s.error, "consumer: %s", s.error);
    cr_expect_eq(s.received, records);
    cr_expect_eq(s.bad_checksums, 0, "%" PRIu64 " bad checksums, the first in "
                 "record %" PRIu64, s.bad_checksums, s.first_bad);
    cr_expect_eq(s.checksum_sum, s.sent_checksum_sum);
}

Test(ring_threads, corrupt_payload_detected, .timeout = TEST_TIMEOUT_S)
{
    uint64_t corrupt = 777;
    while (stream_length(corrupt) <= 8)
        corrupt++;
    struct stream s;
    cr_assert_eq(run_stream(&s, 5000, 0, corrupt), 0, "%s", s.error);

    cr_assert_str_empty(s.producer_error, "producer: %s", s.producer_error);
    cr_assert_str_empty(s.error, "consumer: %s", s.error);
    cr_expect_eq(s.received, 5000);
    cr_expect_eq(s.bad_checksums, 1);
    cr_expect_eq(s.first_bad, corrupt, "first bad record %" PRIu64, s.first_bad);
}

Test(ring_threads, alltoall_between_threads, .timeout = TEST_TIMEOUT_S)
{
    struct rank_thread threads[RING_THREADS_RANKS];
    int aborted = run_ranks(threads);

    cr_assert_geq(aborted, 0, "%s", threads[0].failure);
    for (int r = 0; r < RING_THREADS_RANKS; r++) {
        cr_expect_str_empty(threads[r].failure, "%s", threads[r].failure);
        cr_expect_eq(threads[r].bytes_received, expected_bytes_received(r),
                     "rank %d received %" PRIu64 " bytes, expected %" PRIu64, r,
                     threads[r].bytes_received, expected_bytes_received(r));
    }
    cr_expect_eq(aborted, 0, "a rank set the abort flag");
}
