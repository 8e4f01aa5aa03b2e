/*
 * test_alltoall.c - the collectives between forked ranks, run through
 * moe_launch.
 *
 * For R = 1..8 ranks, checks moe_alltoallv with zero counts, uneven counts
 * (zero for some pairs), messages of 100 KiB and more through 4 KiB rings,
 * and one rank that sends and receives nothing; then moe_allgather and
 * moe_barrier. Every payload byte is a function of (source, destination,
 * offset), so each receiver checks every byte, and each rank writes a
 * verdict into the app area. The test process compares the verdicts with
 * totals it computes itself: every byte sent arrives once. Failure tests
 * check that a rank that never joins makes its peers time out with a
 * message naming that rank and the step, and that a failing rank stops the
 * whole launch well within the 2 s grace period. After every launch no
 * /dev/shm/moe-ep-PID-* segment of this process may remain.
 */
#include "moe_error.h"
#include "moe_launch.h"
#include "test_program.h"
#include "test_util.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_SECOND 1000000000LL

/* Criterion timeout of every test in this file. NOTE: one value for all of
 * them because Criterion 2.4.1, run with --jobs 2, leaks 48 bytes in its
 * runner (reported by LeakSanitizer, failing the sanitizer build) when
 * tests with different timeouts run side by side. */
#define TEST_TIMEOUT_S 60

enum {
    RING_CAPACITY = 4096,
    /* Guard bytes after every receive block, which must stay untouched. */
    GUARD_BYTES = 8,
    GUARD_VALUE = 0xa5,
    /* Destination key of allgather payloads, which go to every rank. */
    ALL_RANKS = MOE_MAX_RANKS,
    BARRIER_ROUNDS = 8,
};

/* How many bytes each ordered rank pair exchanges. */
enum counts {
    COUNTS_ZERO,
    COUNTS_UNEVEN, /* 0 to 4006 bytes, zero for some pairs */
    COUNTS_LARGE,  /* 100 KiB and more per pair, 25 times the ring */
    COUNTS_SILENT, /* uneven, but special_rank sends and receives nothing */
    COUNTS_IDLE,   /* 100 bytes to and from special_rank, 0 between others */
};

/* What the ranks do, with the role of special_rank. */
enum scenario {
    RUN_ALLTOALLV,
    RUN_ALLGATHER,
    RUN_BARRIER,
    RUN_NEVER_JOINS, /* special_rank never calls the collective */
    RUN_RANK_FAILS,  /* special_rank returns an error after a barrier */
};

/* A test case, set in the test process and inherited by the ranks through
 * fork. The ranks only read it. */
struct case_config {
    enum scenario scenario;
    enum counts counts;
    int special_rank;
    uint64_t allgather_bytes; /* per rank */
};

/* One rank's report, written into the app area by that rank only. */
struct rank_verdict {
    int32_t rc;                 /* what the collective returned */
    int32_t ok;                 /* 1 when every check on this rank passed */
    uint64_t bytes_sent;        /* including the block to itself */
    uint64_t bytes_received;    /* including the block from itself */
    uint64_t checksum_received; /* sum of block_checksum() of each block */
    char failure[240];          /* first failed check, or "" */
};

struct app_area {
    _Atomic uint64_t barrier_arrivals; /* RUN_BARRIER: ranks entering */
    struct rank_verdict verdict[MOE_MAX_RANKS];
};

/* Everything the test asserts on, copied out before the segment is
 * destroyed, so that a failed assert cannot leave the segment behind. */
struct launch_report {
    int rc; /* of moe_launch_run */
    int failed_rank;
    int64_t elapsed_ns;
    int64_t wall_ns; /* measured around moe_launch_run by the test */
    struct moe_rank_outcome outcome[MOE_MAX_RANKS];
    char description[MOE_MAX_RANKS][MOE_ERROR_TEXT_BYTES + 64];
    struct app_area app;
    int segments_after_run;  /* before moe_launch_destroy */
    int leftover_segments;   /* after moe_launch_destroy */
};

/* Byte `offset` of the block that `src` sends to `dst`. */
static uint8_t pattern_byte(int src, int dst, uint64_t offset)
{
    uint64_t x = ((uint64_t)src << 56 | (uint64_t)dst << 48) ^ offset;
    x *= 0x9e3779b97f4a7c15ULL;
    x ^= x >> 32;
    x *= 0xd6e8feb86659fd93ULL;
    return (uint8_t)(x >> 56);
}

/* FNV-1a over a block, seeded with its source so that equal blocks from
 * different ranks give different checksums. */
static uint64_t checksum_step(uint64_t h, uint8_t byte)
{
    return (h ^ byte) * 0x100000001b3ULL;
}

static uint64_t checksum_seed(int src)
{
    return 0xcbf29ce484222325ULL ^ (uint64_t)(src + 1);
}

static uint64_t block_checksum(const uint8_t *block, uint64_t bytes, int src)
{
    uint64_t h = checksum_seed(src);
    for (uint64_t k = 0; k < bytes; k++)
        h = checksum_step(h, block[k]);
    return h;
}

/* block_checksum() of the block src -> dst as it was sent. */
static uint64_t expected_checksum(int src, int dst, uint64_t bytes)
{
    uint64_t h = checksum_seed(src);
    for (uint64_t k = 0; k < bytes; k++)
        h = checksum_step(h, pattern_byte(src, dst, k));
    return h;
}

static uint64_t uneven_bytes(int src, int dst)
{
    uint64_t k = (uint64_t)(src * 7 + dst * 13) % 5;
    return k == 0 ? 0 : k * 1000 + (uint64_t)(src + 3 * dst) % 7;
}

/* Bytes rank src sends to rank dst in this case. */
static uint64_t pair_bytes(const struct case_config *c, int src, int dst)
{
    switch (c->counts) {
    case COUNTS_ZERO:
        return 0;
    case COUNTS_UNEVEN:
        return uneven_bytes(src, dst);
    case COUNTS_LARGE:
        return 100 * 1024 + (uint64_t)(src * 37 + dst * 11) % 4096;
    case COUNTS_SILENT:
        if (src == c->special_rank || dst == c->special_rank)
            return 0;
        return uneven_bytes(src, dst);
    case COUNTS_IDLE:
        return (src == c->special_rank) != (dst == c->special_rank) ? 100 : 0;
    }
    return 0;
}

static struct app_area *app_of(struct moe_comm *comm)
{
    return moe_segment_app(comm->segment);
}

/* Records the first failed check of this rank. */
__attribute__((format(printf, 2, 3)))
static void verdict_fail(struct rank_verdict *v, const char *format, ...)
{
    if (!v->ok)
        return;
    v->ok = 0;
    va_list args;
    va_start(args, format);
    vsnprintf(v->failure, sizeof v->failure, format, args);
    va_end(args);
}

/* Checks one received block byte by byte against pattern_byte(src, key, k)
 * and the guard bytes after it, and adds it to the verdict's totals. */
static void check_block(struct rank_verdict *v, int me, const uint8_t *block,
                        uint64_t bytes, int src, int key)
{
    for (uint64_t k = 0; k < bytes; k++)
        if (block[k] != pattern_byte(src, key, k)) {
            verdict_fail(v, "rank %d: byte %" PRIu64 " of %" PRIu64 " from "
                         "rank %d is %#x, expected %#x", me, k, bytes, src,
                         block[k], pattern_byte(src, key, k));
            break;
        }
    for (int g = 0; g < GUARD_BYTES; g++)
        if (block[bytes + g] != GUARD_VALUE) {
            verdict_fail(v, "rank %d: guard byte %d after the block from rank "
                         "%d was overwritten with %#x", me, g, src,
                         block[bytes + g]);
            break;
        }
    v->bytes_received += bytes;
    v->checksum_received += block_checksum(block, bytes, src);
}

/* Exchanges the blocks of c->counts with moe_alltoallv and checks them. */
static int exchange_and_check(struct moe_comm *comm, const struct case_config *c)
{
    int me = comm->rank, R = comm->ranks;
    struct rank_verdict *v = &app_of(comm)->verdict[me];
    uint64_t send_bytes[MOE_MAX_RANKS], send_offsets[MOE_MAX_RANKS];
    uint64_t recv_bytes[MOE_MAX_RANKS], recv_offsets[MOE_MAX_RANKS];
    uint64_t send_total = 0, recv_total = 0;
    for (int p = 0; p < R; p++) {
        send_bytes[p] = pair_bytes(c, me, p);
        send_offsets[p] = send_total;
        send_total += send_bytes[p];
        recv_bytes[p] = pair_bytes(c, p, me);
        recv_offsets[p] = recv_total;
        recv_total += recv_bytes[p] + GUARD_BYTES;
    }

    uint8_t *send = malloc(send_total + 1);
    uint8_t *recv = malloc(recv_total);
    if (!send || !recv) {
        free(send);
        free(recv);
        return moe_fail(-ENOMEM, "rank %d: out of memory for buffers", me);
    }
    for (int d = 0; d < R; d++)
        for (uint64_t k = 0; k < send_bytes[d]; k++)
            send[send_offsets[d] + k] = pattern_byte(me, d, k);
    memset(recv, GUARD_VALUE, recv_total);

    moe_comm_set_step(comm, MOE_STEP_DISPATCH);
    int rc = moe_alltoallv(comm, send, send_bytes, send_offsets, recv,
                           recv_bytes, recv_offsets);
    v->rc = rc;
    if (rc == 0) {
        v->bytes_sent = send_total;
        for (int s = 0; s < R; s++)
            check_block(v, me, recv + recv_offsets[s], recv_bytes[s], s, me);
    }
    free(send);
    free(recv);
    return rc;
}

static int allgather_and_check(struct moe_comm *comm,
                               const struct case_config *c)
{
    int me = comm->rank, R = comm->ranks;
    struct rank_verdict *v = &app_of(comm)->verdict[me];
    uint64_t bytes = c->allgather_bytes;
    uint64_t stride = bytes + GUARD_BYTES;

    uint8_t *send = malloc(bytes + 1);
    uint8_t *gathered = malloc((size_t)R * stride);
    uint8_t *recv = malloc((size_t)R * bytes + GUARD_BYTES);
    if (!send || !gathered || !recv) {
        free(send);
        free(gathered);
        free(recv);
        return moe_fail(-ENOMEM, "rank %d: out of memory for buffers", me);
    }
    for (uint64_t k = 0; k < bytes; k++)
        send[k] = pattern_byte(me, ALL_RANKS, k);
    memset(recv, GUARD_VALUE, (size_t)R * bytes + GUARD_BYTES);

    int rc = moe_allgather(comm, send, bytes, recv);
    v->rc = rc;
    if (rc == 0) {
        /* The blocks are contiguous, so copy each out with a guard after it
         * for check_block(). The guard after the last block is checked here. */
        memset(gathered, GUARD_VALUE, (size_t)R * stride);
        for (int s = 0; s < R; s++)
            memcpy(gathered + (uint64_t)s * stride, recv + (uint64_t)s * bytes,
                   bytes);
        for (int g = 0; g < GUARD_BYTES; g++)
            if (recv[(uint64_t)R * bytes + g] != GUARD_VALUE)
                verdict_fail(v, "rank %d: allgather wrote past the end of the "
                             "receive buffer", me);
        v->bytes_sent = (uint64_t)R * bytes;
        for (int s = 0; s < R; s++)
            check_block(v, me, gathered + (uint64_t)s * stride, bytes, s,
                        ALL_RANKS);
    }
    free(send);
    free(gathered);
    free(recv);
    return rc;
}

/* Runs BARRIER_ROUNDS barriers, with ranks arriving staggered. Before each
 * barrier the rank counts itself in. After it, all R ranks must have counted
 * themselves in for this round, and none can have passed the next one. */
static int barriers_and_check(struct moe_comm *comm)
{
    int me = comm->rank, R = comm->ranks;
    struct app_area *app = app_of(comm);
    struct rank_verdict *v = &app->verdict[me];
    for (int round = 0; round < BARRIER_ROUNDS; round++) {
        struct timespec delay = {0, (long)((me + round) % R) * 300 * 1000};
        nanosleep(&delay, NULL);
        atomic_fetch_add(&app->barrier_arrivals, 1);

        int rc = moe_barrier(comm);
        v->rc = rc;
        if (rc)
            return rc;

        uint64_t arrivals = atomic_load(&app->barrier_arrivals);
        uint64_t low = (uint64_t)(round + 1) * (uint64_t)R;
        uint64_t high = (uint64_t)(round + 2) * (uint64_t)R;
        if (arrivals < low || arrivals > high)
            verdict_fail(v, "rank %d: after barrier %d, %" PRIu64 " arrivals, "
                         "expected %" PRIu64 " to %" PRIu64, me, round,
                         arrivals, low, high);
    }
    return 0;
}

/* Waits until every rank has attached, so that start-up skew does not count
 * against a short collective timeout. */
static int wait_for_all_ranks(struct moe_comm *comm)
{
    int64_t deadline = moe_now_ns() + 10 * NS_PER_SECOND;
    while (atomic_load(&comm->segment->attached) < (uint32_t)comm->ranks) {
        if (moe_now_ns() > deadline)
            return moe_fail(-ETIMEDOUT, "rank %d: the other ranks did not "
                            "attach within 10 s", comm->rank);
        struct timespec pause = {0, 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    return 0;
}

/* Sleeps on the rank's doorbell until the run is aborted, as a rank busy
 * elsewhere would. Returns -ECANCELED, or -ETIMEDOUT after 10 s. */
static int wait_for_abort(struct moe_comm *comm)
{
    struct moe_segment_header *h = comm->segment;
    int64_t deadline = moe_now_ns() + 10 * NS_PER_SECOND;
    for (;;) {
        uint32_t seen = atomic_load(&moe_segment_slot(h, comm->rank)->doorbell);
        int rc = moe_doorbell_wait(h, comm->rank, seen, deadline);
        if (rc == -ETIMEDOUT)
            return moe_fail(rc, "rank %d: the run was not aborted within 10 s",
                            comm->rank);
        if (rc)
            return rc;
    }
}

static int rank_main(struct moe_comm *comm, void *arg)
{
    const struct case_config *c = arg;
    int me = comm->rank;
    struct rank_verdict *v = &app_of(comm)->verdict[me];
    v->ok = 1;

    switch (c->scenario) {
    case RUN_ALLTOALLV:
        return exchange_and_check(comm, c);
    case RUN_ALLGATHER:
        return allgather_and_check(comm, c);
    case RUN_BARRIER:
        return barriers_and_check(comm);
    case RUN_NEVER_JOINS: {
        int rc = wait_for_all_ranks(comm);
        if (rc == 0 && me == c->special_rank)
            rc = wait_for_abort(comm);
        else if (rc == 0)
            return exchange_and_check(comm, c);
        v->rc = rc;
        return rc;
    }
    case RUN_RANK_FAILS: {
        int rc = moe_barrier(comm);
        if (rc == 0 && me == c->special_rank)
            rc = moe_fail(-EIO, "rank %d: injected failure before dispatch", me);
        else if (rc == 0)
            return exchange_and_check(comm, c);
        v->rc = rc;
        return rc;
    }
    }
    return moe_fail(-EINVAL, "rank %d: unknown scenario %d", me, c->scenario);
}

/* Creates a segment, runs rank_main on `ranks` ranks, copies out what the
 * test needs and destroys the segment. */
static void run_case(const struct case_config *c, int ranks, int64_t timeout_ns,
                     struct launch_report *report)
{
    memset(report, 0, sizeof *report);
    struct moe_launch_config config = {
        .ranks = ranks,
        .ring_capacity = RING_CAPACITY,
        .app_bytes = sizeof(struct app_area),
        .timeout_ns = timeout_ns,
        .rank_main = rank_main,
        .arg = (void *)c,
    };
    struct moe_launch launch;
    int rc = moe_launch_create(&launch, &config);
    cr_assert_eq(rc, 0, "moe_launch_create for %d ranks: %s", ranks,
                 moe_error_message());

    int64_t start = moe_now_ns();
    report->rc = moe_launch_run(&launch);
    report->wall_ns = moe_now_ns() - start;
    report->failed_rank = launch.failed_rank;
    report->elapsed_ns = launch.elapsed_ns;
    memcpy(report->outcome, launch.outcome, sizeof report->outcome);
    for (int r = 0; r < ranks; r++)
        moe_launch_describe(&launch, r, report->description[r],
                            sizeof report->description[r]);
    memcpy(&report->app, moe_segment_app(launch.segment), sizeof report->app);
    report->segments_after_run = own_segment_count();

    moe_launch_destroy(&launch);
    report->leftover_segments = own_segment_count();
}

/* Asserts that the launcher unlinked the segment's name once every rank had
 * attached, and that nothing was left after moe_launch_destroy(). */
static void expect_no_leftovers(const struct launch_report *report, int ranks)
{
    cr_expect_eq(report->segments_after_run, 0, "%d ranks: the segment name "
                 "still exists after every rank attached", ranks);
    cr_expect_eq(report->leftover_segments, 0, "%d ranks: %d /dev/shm/moe-ep-"
                 "%ld-* segments left behind", ranks,
                 report->leftover_segments, (long)getpid());
}

/* Asserts that the launch succeeded and that every rank received exactly
 * the blocks addressed to it, by comparing its verdict with totals computed
 * here from pair_bytes() and pattern_byte(). `allgather` selects the
 * allgather blocks instead of c->counts. */
static void expect_exchange(const struct case_config *c,
                            const struct launch_report *report, int R,
                            bool allgather)
{
    expect_no_leftovers(report, R);
    int failed = report->failed_rank;
    cr_assert_eq(report->rc, 0, "%d ranks: moe_launch_run returned %d; %s", R,
                 report->rc,
                 failed >= 0 ? report->description[failed] : "no rank failed");

    uint64_t sent = 0, received = 0, expected_total = 0;
    for (int me = 0; me < R; me++) {
        const struct rank_verdict *v = &report->app.verdict[me];
        cr_expect_eq(v->rc, 0, "%d ranks, rank %d: collective returned %d", R,
                     me, v->rc);
        cr_expect(v->ok, "%d ranks: %s", R, v->failure);

        uint64_t expected_bytes = 0, checksum = 0;
        for (int s = 0; s < R; s++) {
            uint64_t n = allgather ? c->allgather_bytes : pair_bytes(c, s, me);
            expected_bytes += n;
            checksum += expected_checksum(s, allgather ? ALL_RANKS : me, n);
        }
        cr_expect_eq(v->bytes_received, expected_bytes, "%d ranks, rank %d: "
                     "received %" PRIu64 " bytes, expected %" PRIu64, R, me,
                     v->bytes_received, expected_bytes);
        cr_expect_eq(v->checksum_received, checksum, "%d ranks, rank %d: "
                     "checksum of the received blocks differs", R, me);
        sent += v->bytes_sent;
        received += v->bytes_received;
        expected_total += expected_bytes;
    }
    cr_expect_eq(sent, received, "%d ranks: %" PRIu64 " bytes sent, %" PRIu64
                 " received", R, sent, received);
    cr_expect_eq(received, expected_total);
}

static void run_alltoallv_cases(enum counts counts)
{
    for (int R = 1; R <= 8; R++) {
        struct case_config c = {.scenario = RUN_ALLTOALLV, .counts = counts,
                                .special_rank = R / 2};
        struct launch_report report;
        run_case(&c, R, 10 * NS_PER_SECOND, &report);
        expect_exchange(&c, &report, R, false);
    }
}

Test(alltoall, zero_counts, .timeout = TEST_TIMEOUT_S)
{
    run_alltoallv_cases(COUNTS_ZERO);
}

Test(alltoall, uneven_counts, .timeout = TEST_TIMEOUT_S)
{
    /* The counts must include empty pairs, or the case tests less. */
    int empty_pairs = 0;
    for (int s = 0; s < 8; s++)
        for (int d = 0; d < 8; d++)
            empty_pairs += s != d && uneven_bytes(s, d) == 0;
    cr_assert_gt(empty_pairs, 0);

    run_alltoallv_cases(COUNTS_UNEVEN);
}

Test(alltoall, larger_than_ring, .timeout = TEST_TIMEOUT_S)
{
    run_alltoallv_cases(COUNTS_LARGE);
}

Test(alltoall, silent_rank, .timeout = TEST_TIMEOUT_S)
{
    run_alltoallv_cases(COUNTS_SILENT);
}

Test(alltoall, allgather, .timeout = TEST_TIMEOUT_S)
{
    /* Empty blocks, blocks that fit in one 4 KiB ring, and blocks of 13
     * ring-fulls. */
    const uint64_t sizes[] = {0, 3000, 50001};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        for (int R = 1; R <= 8; R++) {
            struct case_config c = {.scenario = RUN_ALLGATHER,
                                    .allgather_bytes = sizes[i]};
            struct launch_report report;
            run_case(&c, R, 10 * NS_PER_SECOND, &report);
            expect_exchange(&c, &report, R, true);
        }
}

Test(alltoall, barrier, .timeout = TEST_TIMEOUT_S)
{
    for (int R = 1; R <= 8; R++) {
        struct case_config c = {.scenario = RUN_BARRIER};
        struct launch_report report;
        run_case(&c, R, 10 * NS_PER_SECOND, &report);

        expect_no_leftovers(&report, R);
        cr_assert_eq(report.rc, 0, "%d ranks: moe_launch_run returned %d; %s",
                     R, report.rc,
                     report.failed_rank >= 0
                         ? report.description[report.failed_rank]
                         : "no rank failed");
        for (int me = 0; me < R; me++) {
            cr_expect_eq(report.app.verdict[me].rc, 0);
            cr_expect(report.app.verdict[me].ok, "%d ranks: %s", R,
                      report.app.verdict[me].failure);
        }
        cr_expect_eq(report.app.barrier_arrivals,
                     (uint64_t)BARRIER_ROUNDS * (uint64_t)R);
    }
}

Test(alltoall, rank_never_joins, .timeout = TEST_TIMEOUT_S)
{
    const int64_t timeout_ns = 300 * 1000 * 1000;
    const int ranks[] = {2, 3, 8};
    for (size_t i = 0; i < sizeof ranks / sizeof ranks[0]; i++) {
        int R = ranks[i], idle = R / 2;
        struct case_config c = {.scenario = RUN_NEVER_JOINS,
                                .counts = COUNTS_IDLE, .special_rank = idle};
        struct launch_report report;
        run_case(&c, R, timeout_ns, &report);

        expect_no_leftovers(&report, R);
        cr_assert_eq(report.rc, -ECANCELED, "%d ranks: moe_launch_run "
                     "returned %d", R, report.rc);
        int failed = report.failed_rank;
        cr_assert(failed >= 0 && failed < R && failed != idle,
                  "%d ranks: failed rank is %d, expected a peer of rank %d", R,
                  failed, idle);
        cr_expect_eq(report.outcome[failed].signal, 0);
        cr_expect_eq(report.outcome[failed].exit_status, MOE_RANK_EXIT_FAILED);
        cr_expect_eq(report.app.verdict[failed].rc, -ETIMEDOUT);

        const char *message = report.description[failed];
        char peer[32];
        snprintf(peer, sizeof peer, "waiting for rank %d", idle);
        cr_expect(strstr(message, "timed out") != NULL,
                  "the message does not say it timed out: %s", message);
        cr_expect(strstr(message, "dispatch") != NULL,
                  "the message does not name the step: %s", message);
        cr_expect(strstr(message, peer) != NULL,
                  "the message does not name rank %d: %s", idle, message);

        /* The idle rank and the other peers stop on the abort flag. */
        for (int r = 0; r < R; r++) {
            cr_expect_eq(report.outcome[r].signal, 0, "%d ranks: rank %d was "
                         "killed by signal %d", R, r, report.outcome[r].signal);
            if (r == failed)
                continue;
            int32_t rc = report.app.verdict[r].rc;
            cr_expect(rc == -ECANCELED || (r != idle && rc == -ETIMEDOUT),
                      "%d ranks, rank %d: returned %d", R, r, rc);
        }
        cr_expect_eq(report.outcome[idle].exit_status, MOE_RANK_EXIT_ABORTED);

        cr_expect_geq(report.elapsed_ns, timeout_ns, "%d ranks: failed after "
                      "%.3f s, before the timeout", R,
                      (double)report.elapsed_ns / 1e9);
        cr_expect_lt(report.wall_ns, 2 * NS_PER_SECOND, "%d ranks: took %.3f s",
                     R, (double)report.wall_ns / 1e9);
    }
}

Test(alltoall, rank_fails, .timeout = TEST_TIMEOUT_S)
{
    const int ranks[] = {2, 4, 8};
    const int failing[] = {0, 2, 7};
    for (size_t i = 0; i < sizeof ranks / sizeof ranks[0]; i++) {
        int R = ranks[i], bad = failing[i];
        struct case_config c = {.scenario = RUN_RANK_FAILS,
                                .counts = COUNTS_LARGE, .special_rank = bad};
        struct launch_report report;
        /* A long timeout: the peers must stop on the abort flag, not time
         * out. */
        run_case(&c, R, 30 * NS_PER_SECOND, &report);

        expect_no_leftovers(&report, R);
        cr_assert_eq(report.rc, -ECANCELED, "%d ranks: moe_launch_run "
                     "returned %d", R, report.rc);
        cr_expect_eq(report.failed_rank, bad);
        cr_expect_eq(report.outcome[bad].exit_status, MOE_RANK_EXIT_FAILED);
        char expected[64];
        snprintf(expected, sizeof expected,
                 "rank %d: injected failure before dispatch", bad);
        cr_expect_str_eq(report.description[bad], expected);

        for (int r = 0; r < R; r++) {
            if (r == bad)
                continue;
            cr_expect_eq(report.outcome[r].signal, 0, "%d ranks: rank %d was "
                         "killed by signal %d", R, r, report.outcome[r].signal);
            cr_expect_eq(report.outcome[r].exit_status, MOE_RANK_EXIT_ABORTED,
                         "%d ranks: rank %d exited with %d", R, r,
                         report.outcome[r].exit_status);
            cr_expect_eq(report.app.verdict[r].rc, -ECANCELED);
        }
        cr_expect_lt(report.wall_ns, 2 * NS_PER_SECOND, "%d ranks: took %.3f s",
                     R, (double)report.wall_ns / 1e9);
    }
}
