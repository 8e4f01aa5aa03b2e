/*
 * ring_threads.c - the thread-mode ring and collective tests of
 * ring_threads.h as a plain program, for `make tsan`.
 *
 * Criterion 2.4.1 crashes at start-up under ThreadSanitizer, so this front
 * end checks the same facts as tests/test_ring_threads.c without it. It
 * prints one line per check and exits with 1 if any failed; with
 * TSAN_OPTIONS=halt_on_error=1 a reported race ends it with status 66.
 *
 * Usage: ring_threads [RECORDS]   (default 200000 records in the stream)
 */
#include "ring_threads.h"

#include <stdbool.h>

static int failures;

__attribute__((format(printf, 2, 3)))
static void check(bool ok, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    printf("%s: ", ok ? "ok" : "FAILED");
    vprintf(format, args);
    printf("\n");
    va_end(args);
    failures += !ok;
}

static void check_stream(uint64_t records)
{
    struct stream s;
    int64_t start = moe_now_ns();
    int rc = run_stream(&s, records, UINT64_MAX - (64u << 10) + 1, UINT64_MAX);
    double seconds = (double)(moe_now_ns() - start) / 1e9;
    check(rc == 0 && !s.producer_error[0] && !s.error[0],
          "stream of %" PRIu64 " records ran without errors%s%s%s", records,
          s.producer_error[0] || s.error[0] ? ": " : "", s.producer_error,
          s.error);
    check(s.received == records, "%" PRIu64 " of %" PRIu64 " records received "
          "in %.2f s", s.received, records, seconds);
    check(s.bad_checksums == 0 && s.checksum_sum == s.sent_checksum_sum,
          "%" PRIu64 " bad checksums", s.bad_checksums);
}

static void check_corrupt_payload(void)
{
    uint64_t corrupt = 777;
    while (stream_length(corrupt) <= 8)
        corrupt++;
    struct stream s;
    int rc = run_stream(&s, 5000, 0, corrupt);
    check(rc == 0 && s.bad_checksums == 1 && s.first_bad == corrupt,
          "the one altered payload (record %" PRIu64 ") was detected: %" PRIu64
          " bad checksums, the first in record %" PRIu64, corrupt,
          s.bad_checksums, s.first_bad);
}

static void check_ranks(void)
{
    struct rank_thread threads[RING_THREADS_RANKS];
    int aborted = run_ranks(threads);
    check(aborted == 0, "%d rank threads ran without an abort%s%s",
          RING_THREADS_RANKS, threads[0].failure[0] ? ": " : "",
          threads[0].failure);
    for (int r = 0; r < RING_THREADS_RANKS; r++)
        check(!threads[r].failure[0] &&
                  threads[r].bytes_received == expected_bytes_received(r),
              "rank %d received %" PRIu64 " of %" PRIu64 " bytes intact%s%s", r,
              threads[r].bytes_received, expected_bytes_received(r),
              threads[r].failure[0] ? ": " : "", threads[r].failure);
}

int main(int argc, char **argv)
{
    uint64_t records = 200000;
    if (argc > 2 || (argc == 2 && sscanf(argv[1], "%" SCNu64, &records) != 1)) {
        fprintf(stderr, "usage: %s [RECORDS]\n", argv[0]);
        return 2;
    }
    check_stream(records);
    check_corrupt_payload();
    check_ranks();
    printf("%d checks failed\n", failures);
    return failures ? 1 : 0;
}
