/*
 * test_direct.c - notes and the direct all-to-all between forked ranks.
 *
 * moe_alltoallv_direct() writes each block straight into its receiver's
 * window in the app area and sends a note with its byte count. For R = 1..6
 * ranks with uneven counts (zero for some pairs), every rank checks every
 * byte of every block in its own window, over 60 calls that alternate
 * between two halves of the window, with a pattern that changes per call.
 * The notes tests send many notes through 64-byte rings, where only a few
 * fit, between every pair at once, and check order and values. The failure
 * tests check that a wrong count, a note too many and a silent peer are
 * reported with the peer's rank, and that nothing is left behind.
 */
#include "moe_error.h"
#include "moe_launch.h"
#include "test_program.h"

#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define NS_PER_SECOND 1000000000LL
#define TEST_TIMEOUT_S 60

enum {
    MAX_PAIR_BYTES = 20000,
    CALLS = 60,
    NOTES_PER_PAIR = 200,
};

enum scenario {
    RUN_DIRECT,
    RUN_NOTES,
    RUN_WRONG_COUNT, /* special_rank announces one byte more to rank 0 */
    RUN_EXTRA_NOTE,  /* special_rank sends rank 0 one note too many */
    RUN_SILENT,      /* special_rank never sends its notes */
};

struct case_config {
    enum scenario scenario;
    int special_rank;
};

struct rank_verdict {
    int32_t rc;
    int32_t ok;
    uint64_t blocks_checked;
    char failure[MOE_ERROR_TEXT_BYTES];
};

/* The app area: the verdicts, then one window per rank. Rank d's window
 * holds two halves; a half has room for a block from every rank. */
struct app_area {
    struct rank_verdict verdict[MOE_MAX_RANKS];
};

static uint64_t window_half_bytes(int ranks)
{
    return (uint64_t)ranks * MAX_PAIR_BYTES;
}

static uint8_t *window_of(struct moe_comm *comm, int rank, int half)
{
    uint8_t *base = (uint8_t *)comm->app + sizeof(struct app_area);
    return base + (2 * (uint64_t)rank + (uint64_t)half) * window_half_bytes(comm->ranks);
}

/* Bytes from src to dst in call `call`: uneven, zero for some pairs. */
static uint64_t pair_bytes(int src, int dst, int call)
{
    uint64_t n = ((uint64_t)src * 7919 + (uint64_t)dst * 104729 + (uint64_t)call * 31) %
                 MAX_PAIR_BYTES;
    return (src + dst + call) % 5 == 0 ? 0 : n;
}

static uint8_t pattern_byte(int src, int dst, int call, uint64_t offset)
{
    return (uint8_t)(src * 37 + dst * 11 + call * 5 + offset * 13 + (offset >> 8));
}

static void fail_verdict(struct rank_verdict *v, const char *text)
{
    if (v->ok) {
        v->ok = 0;
        snprintf(v->failure, sizeof v->failure, "%s", text);
    }
}

static int run_direct(struct moe_comm *comm, struct rank_verdict *v)
{
    int me = comm->rank, R = comm->ranks;
    uint64_t send_bytes[MOE_MAX_RANKS], send_offsets[MOE_MAX_RANKS],
             recv_bytes[MOE_MAX_RANKS];
    void *dst[MOE_MAX_RANKS];
    uint8_t *send = malloc((size_t)R * MAX_PAIR_BYTES);
    if (!send)
        return moe_fail(-ENOMEM, "rank %d: out of memory", me);
    for (int call = 0; call < CALLS; call++) {
        int half = call % 2;
        for (int d = 0; d < R; d++) {
            send_bytes[d] = pair_bytes(me, d, call);
            send_offsets[d] = (uint64_t)d * MAX_PAIR_BYTES;
            for (uint64_t i = 0; i < send_bytes[d]; i++)
                send[send_offsets[d] + i] = pattern_byte(me, d, call, i);
            /* My block sits at my place in d's window. */
            dst[d] = window_of(comm, d, half) + (uint64_t)me * MAX_PAIR_BYTES;
            recv_bytes[d] = pair_bytes(d, me, call);
        }
        int rc = moe_alltoallv_direct(comm, send, send_bytes, send_offsets, dst,
                                      recv_bytes);
        if (rc) {
            free(send);
            return rc;
        }
        const uint8_t *mine = window_of(comm, me, half);
        for (int s = 0; s < R; s++) {
            const uint8_t *block = mine + (uint64_t)s * MAX_PAIR_BYTES;
            for (uint64_t i = 0; i < recv_bytes[s]; i++)
                if (block[i] != pattern_byte(s, me, call, i)) {
                    char text[200];
                    snprintf(text, sizeof text, "call %d: byte %" PRIu64 " of "
                             "the block from rank %d is %u, expected %u", call, i,
                             s, block[i], pattern_byte(s, me, call, i));
                    fail_verdict(v, text);
                    break;
                }
            v->blocks_checked++;
        }
    }
    free(send);
    return 0;
}

static uint64_t note_value(int src, int dst, uint64_t i)
{
    return ((uint64_t)src << 48) | ((uint64_t)dst << 32) | (i * 2654435761u % 100000);
}

/* Every rank sends NOTES_PER_PAIR notes to every peer, interleaved, through
 * rings that hold only a few, then waits for all of them. */
static int run_notes(struct moe_comm *comm, struct rank_verdict *v)
{
    int me = comm->rank, R = comm->ranks;
    uint64_t *store = calloc((size_t)R * NOTES_PER_PAIR, sizeof *store);
    uint64_t need[MOE_MAX_RANKS];
    if (!store)
        return moe_fail(-ENOMEM, "rank %d: out of memory", me);
    moe_notes_begin(comm, store, NOTES_PER_PAIR);
    for (uint64_t i = 0; i < NOTES_PER_PAIR; i++)
        for (int k = 1; k < R; k++) {
            int d = (me + k) % R;
            int rc = moe_notes_send(comm, d, note_value(me, d, i));
            if (rc) {
                free(store);
                return rc;
            }
        }
    for (int s = 0; s < R; s++)
        need[s] = NOTES_PER_PAIR;
    int rc = moe_notes_wait(comm, need);
    for (int s = 0; rc == 0 && s < R; s++) {
        if (s == me)
            continue;
        if (comm->notes_got[s] != NOTES_PER_PAIR)
            fail_verdict(v, "a peer's note count is not the number sent");
        for (uint64_t i = 0; i < NOTES_PER_PAIR; i++)
            if (store[(uint64_t)s * NOTES_PER_PAIR + i] != note_value(s, me, i)) {
                char text[160];
                snprintf(text, sizeof text, "note %" PRIu64 " from rank %d has "
                         "the wrong value", i, s);
                fail_verdict(v, text);
                break;
            }
        v->blocks_checked++;
    }
    free(store);
    return rc;
}

/* The failure scenarios: one direct all-to-all of 100 bytes per pair, in
 * which special_rank misbehaves toward rank 0. */
static int run_misbehaving(struct moe_comm *comm, const struct case_config *c)
{
    int me = comm->rank, R = comm->ranks;
    uint8_t send[MOE_MAX_RANKS * 100];
    uint64_t bytes[MOE_MAX_RANKS], offsets[MOE_MAX_RANKS], store[MOE_MAX_RANKS];
    void *dst[MOE_MAX_RANKS];
    memset(send, me, sizeof send);
    for (int d = 0; d < R; d++) {
        bytes[d] = 100;
        offsets[d] = (uint64_t)d * 100;
        dst[d] = window_of(comm, d, 0) + (uint64_t)me * 100;
    }
    if (me != c->special_rank) {
        /* The barrier after it finds a note that the direct call did not
         * take, if one came late. */
        int rc = moe_alltoallv_direct(comm, send, bytes, offsets, dst, bytes);
        return rc ? rc : moe_barrier(comm);
    }
    moe_notes_begin(comm, store, 1);
    for (int d = 0; d < R; d++) {
        if (d == me || c->scenario == RUN_SILENT)
            continue;
        int rc = moe_notes_send(comm, d, d == 0 && c->scenario == RUN_WRONG_COUNT ? 101 : 100);
        if (rc == 0 && d == 0 && c->scenario == RUN_EXTRA_NOTE)
            rc = moe_notes_send(comm, d, 100);
        if (rc)
            return rc;
    }
    /* Stay until the run is aborted, as a live but wrong peer would. */
    for (;;) {
        uint32_t seen = atomic_load(&moe_segment_slot(comm->segment, me)->doorbell);
        int rc = moe_doorbell_wait(comm->segment, me, seen,
                                   moe_now_ns() + 10 * NS_PER_SECOND);
        if (rc)
            return rc;
    }
}

static int rank_main(struct moe_comm *comm, void *arg)
{
    const struct case_config *c = arg;
    struct rank_verdict *v = &((struct app_area *)comm->app)->verdict[comm->rank];
    v->ok = 1;
    int rc;
    switch (c->scenario) {
    case RUN_DIRECT:
        rc = run_direct(comm, v);
        break;
    case RUN_NOTES:
        rc = run_notes(comm, v);
        break;
    default:
        rc = run_misbehaving(comm, c);
        break;
    }
    v->rc = rc;
    if (rc)
        snprintf(v->failure, sizeof v->failure, "%s", moe_error_message());
    return rc;
}

struct report {
    int rc;
    int failed_rank;
    int leftover_segments;
    struct app_area app;
};

static void run_case(const struct case_config *c, int ranks, uint64_t ring_capacity,
                     int64_t timeout_ns, struct report *out)
{
    memset(out, 0, sizeof *out);
    struct moe_launch_config config = {
        .ranks = ranks,
        .ring_capacity = ring_capacity,
        .app_bytes = sizeof(struct app_area) + 2 * (uint64_t)ranks * window_half_bytes(ranks),
        .timeout_ns = timeout_ns,
        .rank_main = rank_main,
        .arg = (void *)c,
    };
    struct moe_launch launch;
    cr_assert_eq(moe_launch_create(&launch, &config), 0, "moe_launch_create: %s",
                 moe_error_message());
    out->rc = moe_launch_run(&launch);
    out->failed_rank = launch.failed_rank;
    memcpy(&out->app, moe_segment_app(launch.segment), sizeof out->app);
    moe_launch_destroy(&launch);
    out->leftover_segments = own_segment_count();
}

static void expect_all_ok(const struct report *r, int ranks, uint64_t blocks_per_rank)
{
    cr_expect_eq(r->leftover_segments, 0, "segments left behind");
    cr_assert_eq(r->rc, 0, "%d ranks: the launch failed at rank %d: %s", ranks,
                 r->failed_rank,
                 r->failed_rank >= 0 ? r->app.verdict[r->failed_rank].failure : "");
    for (int i = 0; i < ranks; i++) {
        const struct rank_verdict *v = &r->app.verdict[i];
        cr_expect(v->ok, "%d ranks, rank %d: %s", ranks, i, v->failure);
        cr_expect_eq(v->blocks_checked, blocks_per_rank, "%d ranks, rank %d "
                     "checked %" PRIu64 " blocks, expected %" PRIu64, ranks, i,
                     v->blocks_checked, blocks_per_rank);
    }
}

Test(direct, every_byte_arrives, .timeout = TEST_TIMEOUT_S)
{
    struct case_config c = {.scenario = RUN_DIRECT};
    for (int R = 1; R <= 6; R++) {
        struct report r;
        run_case(&c, R, 4096, 10 * NS_PER_SECOND, &r);
        expect_all_ok(&r, R, (uint64_t)CALLS * (uint64_t)R);
    }
}

Test(direct, notes_pass_tiny_rings, .timeout = TEST_TIMEOUT_S)
{
    struct case_config c = {.scenario = RUN_NOTES};
    for (int R = 2; R <= 5; R++) {
        struct report r;
        run_case(&c, R, 64, 10 * NS_PER_SECOND, &r);
        expect_all_ok(&r, R, (uint64_t)R - 1);
    }
}

/* Runs a failure scenario on 3 ranks in which rank 2 misbehaves, and
 * returns the verdict of the first rank that failed. Rank 0 is the one
 * wronged, except in RUN_SILENT, where ranks 0 and 1 both wait on rank 2
 * and either may time out first. */
static const struct rank_verdict *run_failure(enum scenario scenario, struct report *r)
{
    struct case_config c = {.scenario = scenario, .special_rank = 2};
    run_case(&c, 3, 4096, NS_PER_SECOND / 2, r);
    cr_expect_eq(r->leftover_segments, 0, "segments left behind");
    cr_assert_neq(r->rc, 0, "the launch succeeded although rank 2 misbehaved");
    if (scenario == RUN_SILENT)
        cr_assert(r->failed_rank == 0 || r->failed_rank == 1, "the first failure "
                  "was rank %d, expected rank 0 or 1", r->failed_rank);
    else
        cr_assert_eq(r->failed_rank, 0, "the first failure was rank %d, expected "
                     "rank 0, which detects it", r->failed_rank);
    return &r->app.verdict[r->failed_rank];
}

Test(direct, wrong_count_reported, .timeout = TEST_TIMEOUT_S)
{
    struct report r;
    const struct rank_verdict *v = run_failure(RUN_WRONG_COUNT, &r);
    const char *text = v->failure;
    cr_expect_eq(v->rc, -EPROTO, "rc %d: %s", v->rc, text);
    cr_expect(strstr(text, "rank 2 wrote 101 bytes, but 100 were announced"), "%s", text);
}

Test(direct, extra_note_reported, .timeout = TEST_TIMEOUT_S)
{
    struct report r;
    const struct rank_verdict *v = run_failure(RUN_EXTRA_NOTE, &r);
    const char *text = v->failure;
    cr_expect_eq(v->rc, -EPROTO, "rc %d: %s", v->rc, text);
    /* The direct call takes one note per peer; the barrier after it finds
     * the extra one where its own record should be. */
    cr_expect(strstr(text, "record from rank 2 in start has tag 1, expected 2"),
              "%s", text);
}

Test(direct, silent_peer_times_out, .timeout = TEST_TIMEOUT_S)
{
    struct report r;
    const struct rank_verdict *v = run_failure(RUN_SILENT, &r);
    const char *text = v->failure;
    cr_expect_eq(v->rc, -ETIMEDOUT, "rc %d: %s", v->rc, text);
    cr_expect(strstr(text, "waiting for rank 2 (received 0 of 1 notes)"), "%s", text);
}
