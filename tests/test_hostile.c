/*
 * test_hostile.c - ranks that write garbage into the shared segment.
 *
 * Any rank can write anywhere in the segment, so a rank validates every
 * count, length, index and offset it reads there. These tests corrupt one
 * thing at a time and check that the victim reports an error that names
 * the peer and the field, instead of crashing or overrunning a buffer:
 *
 *   - the segment header: moe_segment_validate() and moe_segment_snapshot()
 *     reject each corrupted field, a rank count beyond MOE_MAX_RANKS does
 *     not make moe_segment_abort() write past the slot region, and a huge
 *     spin time does not make a wait spin for long;
 *   - between forked ranks, through moe_launch, rank 1 writes one of: a
 *     record longer than the ring, a record longer than the bytes
 *     announced, a record with another collective's tag, a head index more
 *     than a capacity ahead, a tail index ahead of the head, or an invalid
 *     timeout in the header. Rank 0's moe_alltoallv() must return -EPROTO
 *     with a message naming rank 1 and the field, and exit normally;
 *   - rank 1 overwrites the header's layout fields after attaching, and
 *     the two ranks still exchange every byte, because each rank uses the
 *     copy it validated when it attached.
 */
#include "moe_error.h"
#include "moe_launch.h"
#include "test_util.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

/* Criterion timeout of every test in this file. NOTE: one value for all of
 * them because Criterion 2.4.1, run with --jobs 2, leaks 48 bytes in its
 * runner when tests with different timeouts run side by side. */
#define TEST_TIMEOUT_S 60
#define NS_PER_SECOND 1000000000LL

enum { RING_CAPACITY = 4096 };

/* ---- the segment header ----------------------------------------------- */

/* A valid header for 2 ranks with 4 KiB rings, as the launcher fills it. */
static void valid_header(struct moe_segment_header *h)
{
    cr_assert_eq(moe_segment_layout(h, 2, RING_CAPACITY, 1000), 0, "%s",
                 moe_error_message());
    h->timeout_ns = NS_PER_SECOND;
    h->spin_ns = 0;
}

struct header_case {
    const char *name;   /* what is corrupted */
    const char *field;  /* a word the message must contain */
    void (*corrupt)(struct moe_segment_header *h);
};

static void bad_magic(struct moe_segment_header *h) { h->magic ^= 1; }
static void bad_version(struct moe_segment_header *h) { h->version++; }
static void bad_slot_size(struct moe_segment_header *h) { h->slot_bytes += 64; }
static void bad_ranks(struct moe_segment_header *h) { h->ranks = 3; }
static void bad_capacity(struct moe_segment_header *h) { h->ring_capacity = 3000; }
static void bad_stride(struct moe_segment_header *h) { h->ring_stride += 64; }
static void bad_rings_offset(struct moe_segment_header *h) { h->rings_offset += 4096; }
static void bad_app_offset(struct moe_segment_header *h) { h->app_offset -= 4096; }
static void bad_app_bytes(struct moe_segment_header *h) { h->app_bytes = 1ULL << 50; }
static void bad_size(struct moe_segment_header *h) { h->segment_bytes += 4096; }
static void zero_timeout(struct moe_segment_header *h) { h->timeout_ns = 0; }
static void huge_timeout(struct moe_segment_header *h) { h->timeout_ns = INT64_MAX; }
static void negative_spin(struct moe_segment_header *h) { h->spin_ns = -1; }
static void huge_spin(struct moe_segment_header *h) { h->spin_ns = MOE_MAX_SPIN_NS + 1; }

static const struct header_case header_cases[] = {
    {"magic", "magic", bad_magic},
    {"version", "version", bad_version},
    {"slot size", "size", bad_slot_size},
    {"rank count", "ranks", bad_ranks},
    {"ring capacity", "ring size", bad_capacity},
    {"ring stride", "offsets", bad_stride},
    {"rings offset", "offsets", bad_rings_offset},
    {"app offset", "offsets", bad_app_offset},
    {"app bytes", "app area", bad_app_bytes},
    {"segment size", "bytes", bad_size},
    {"zero timeout", "timeout", zero_timeout},
    {"huge timeout", "timeout", huge_timeout},
    {"negative spin time", "spin", negative_spin},
    {"huge spin time", "spin", huge_spin},
};

Test(hostile, header_fields_validated, .timeout = TEST_TIMEOUT_S)
{
    struct moe_segment_header good;
    valid_header(&good);
    cr_assert_eq(moe_segment_validate(&good, good.segment_bytes, 2), 0, "%s",
                 moe_error_message());

    size_t count = sizeof header_cases / sizeof header_cases[0];
    for (size_t i = 0; i < count; i++) {
        const struct header_case *c = &header_cases[i];
        struct moe_segment_header h = good;
        c->corrupt(&h);

        moe_error_clear();
        int rc = moe_segment_validate(&h, good.segment_bytes, 2);
        cr_expect_eq(rc, -EPROTO, "%s: validate returned %d", c->name, rc);
        cr_expect(strstr(moe_error_message(), c->field) != NULL,
                  "%s: the message does not name the %s: \"%s\"", c->name,
                  c->field, moe_error_message());

        struct moe_segment_header copy;
        moe_error_clear();
        rc = moe_segment_snapshot(&h, &copy);
        cr_expect_eq(rc, -EPROTO, "%s: snapshot returned %d", c->name, rc);
        cr_expect_neq(moe_error_message()[0], '\0', "%s: no message", c->name);
    }
}

Test(hostile, snapshot_copies_layout, .timeout = TEST_TIMEOUT_S)
{
    struct moe_segment_header good, copy;
    valid_header(&good);
    cr_assert_eq(moe_segment_snapshot(&good, &copy), 0, "%s", moe_error_message());
    cr_expect_eq(copy.ranks, 2);
    cr_expect_eq(copy.ring_capacity, RING_CAPACITY);
    cr_expect_eq(copy.rings_offset, good.rings_offset);
    cr_expect_eq(copy.ring_stride, good.ring_stride);
    cr_expect_eq(copy.app_offset, good.app_offset);
    cr_expect_eq(copy.app_bytes, 1000);
    cr_expect_eq(copy.timeout_ns, NS_PER_SECOND);

    /* A rank count beyond MOE_MAX_RANKS is rejected before anything is
     * computed from it. */
    good.ranks = 1000;
    cr_expect_eq(moe_segment_snapshot(&good, &copy), -EPROTO);
    cr_expect(strstr(moe_error_message(), "1000 ranks") != NULL, "%s",
              moe_error_message());
}

Test(hostile, abort_bounded_by_slot_region, .timeout = TEST_TIMEOUT_S)
{
    /* One rank, so the rings start right after the MOE_MAX_RANKS slots.
     * A corrupt rank count must not make the abort ring a doorbell beyond
     * them. */
    struct moe_segment_header layout;
    cr_assert_eq(moe_segment_layout(&layout, 1, 64, 0), 0);
    uint8_t *memory = aligned_alloc(4096, layout.segment_bytes);
    cr_assert_not_null(memory);
    memset(memory, 0, layout.segment_bytes);
    memcpy(memory, &layout, sizeof layout);
    struct moe_segment_header *h = (struct moe_segment_header *)memory;
    uint64_t slots_end = MOE_SEGMENT_SLOTS_OFFSET +
                         MOE_MAX_RANKS * sizeof(struct moe_rank_slot);
    cr_assert_leq(slots_end, layout.rings_offset);

    h->ranks = UINT32_MAX;
    moe_segment_abort(h);

    cr_expect_eq(atomic_load(&h->abort_flag), 1);
    cr_expect_eq(atomic_load(&moe_segment_slot(h, MOE_MAX_RANKS - 1)->doorbell), 1,
                 "the last slot's doorbell was not rung");
    for (uint64_t i = slots_end; i < layout.segment_bytes; i++)
        if (memory[i] != 0)
            cr_assert_fail("byte %" PRIu64 " after the slot region was "
                           "written", i);
    free(memory);
}

Test(hostile, spin_time_clamped, .timeout = TEST_TIMEOUT_S)
{
    struct moe_segment_header layout;
    cr_assert_eq(moe_segment_layout(&layout, 1, 64, 0), 0);
    struct moe_segment_header *h = aligned_alloc(4096, layout.segment_bytes);
    cr_assert_not_null(h);
    memset(h, 0, layout.segment_bytes);
    memcpy(h, &layout, sizeof layout);
    h->launcher_pid = getppid();

    /* An hour of spinning, as a corrupt header might request. The wait must
     * poll for at most MOE_MAX_SPIN_NS and then notice the abort. */
    h->spin_ns = 3600LL * NS_PER_SECOND;
    atomic_store(&h->abort_flag, 1);
    int64_t start = moe_now_ns();
    int rc = moe_doorbell_wait(h, 0, 0, start + 10 * NS_PER_SECOND);
    int64_t took = moe_now_ns() - start;

    cr_expect_eq(rc, -ECANCELED);
    cr_expect_lt(took, NS_PER_SECOND / 10, "the wait took %.3f s",
                 (double)took / 1e9);
    free(h);
}

/* ---- corrupt peers between processes ----------------------------------- */

enum corruption {
    CORRUPT_NONE,
    LENGTH_BEYOND_RING,   /* a record header longer than the largest payload */
    LENGTH_BEYOND_PEER,   /* a valid record longer than the bytes announced */
    WRONG_TAG,            /* a record of another collective */
    HEAD_BEYOND_CAPACITY, /* head more than a capacity ahead of tail */
    TAIL_AHEAD_OF_HEAD,   /* on the ring rank 0 writes, rank 1's tail */
    LAYOUT_OVERWRITTEN,   /* header layout fields overwritten after attach */
    TIMEOUT_OVERWRITTEN,  /* the header's timeout set to -1 */
};

struct hostile_case {
    enum corruption corruption;
    const char *field; /* what rank 0's message must name */
};

/* One rank's report, in the app area. */
struct verdict {
    int32_t rc;
    int32_t ok;
    char message[MOE_ERROR_TEXT_BYTES];
};

struct app_area {
    struct verdict verdict[2];
    _Atomic uint32_t corrupted; /* set by rank 1 once it has corrupted */
};

/* Bytes rank 0 expects from rank 1, and sends to it: three ring-fulls, so
 * that rank 0 must reload rank 1's tail index. */
enum { FROM_PEER = 100, TO_PEER = 3 * RING_CAPACITY };

static uint8_t pattern(int src, uint64_t offset)
{
    return (uint8_t)(src * 131 + offset * 7 + (offset >> 8));
}

/* Writes a raw record header at the producer's head and publishes
 * `head_advance` bytes, whatever length the header gives. */
static void write_raw_record(struct moe_ring_producer *p, uint32_t length,
                             uint32_t tag, uint64_t head_advance)
{
    uint64_t offset = p->head & (p->capacity - 1);
    memcpy(p->data + offset, &length, 4);
    memcpy(p->data + offset + 4, &tag, 4);
    p->head += head_advance;
    atomic_store_explicit(&p->ring->head, p->head, memory_order_release);
}

/* Rank 1's part: applies the case's corruption, wakes rank 0, and then
 * waits for the abort that rank 0's failure causes. */
static int corrupt_and_wait(struct moe_comm *comm, const struct hostile_case *c,
                            struct app_area *app)
{
    struct moe_segment_header *h = comm->segment;
    uint32_t tag = comm->sequence + 1; /* the tag of rank 0's next call */
    struct moe_ring_producer *to0 = &comm->to[0];
    struct moe_ring_consumer *from0 = &comm->from[0];
    uint8_t payload[FROM_PEER * 2];
    for (size_t k = 0; k < sizeof payload; k++)
        payload[k] = pattern(1, k);

    switch (c->corruption) {
    case LENGTH_BEYOND_RING:
        write_raw_record(to0, 0xfffffff0u, tag, 16);
        break;
    case LENGTH_BEYOND_PEER:
        cr_assert_eq(moe_ring_try_send(to0, tag, payload, FROM_PEER + 8), 0);
        break;
    case WRONG_TAG:
        cr_assert_eq(moe_ring_try_send(to0, tag + 7, payload, FROM_PEER), 0);
        break;
    case HEAD_BEYOND_CAPACITY:
        write_raw_record(to0, 8, tag, RING_CAPACITY + 16);
        break;
    case TAIL_AHEAD_OF_HEAD:
        atomic_store(&from0->ring->tail, from0->tail + RING_CAPACITY + 8);
        break;
    case TIMEOUT_OVERWRITTEN:
        h->timeout_ns = -1;
        break;
    default:
        return moe_fail(-EINVAL, "rank 1: unexpected case %d", c->corruption);
    }
    atomic_store(&app->corrupted, 1);
    moe_doorbell_ring(h, 0);

    int64_t deadline = moe_now_ns() + 20 * NS_PER_SECOND;
    for (;;) {
        uint32_t seen = atomic_load(&moe_segment_slot(h, 1)->doorbell);
        int rc = moe_doorbell_wait(h, 1, seen, deadline);
        if (rc)
            return rc == -ETIMEDOUT
                       ? moe_fail(rc, "rank 1: the run was not aborted")
                       : rc;
    }
}

/* Exchanges FROM_PEER bytes from rank 1 and TO_PEER bytes from rank 0 and
 * checks them on arrival. */
static int exchange(struct moe_comm *comm, struct verdict *v)
{
    int me = comm->rank;
    static uint8_t send[TO_PEER], recv[TO_PEER];
    uint64_t out = me == 0 ? TO_PEER : FROM_PEER;
    uint64_t in = me == 0 ? FROM_PEER : TO_PEER;
    for (uint64_t k = 0; k < out; k++)
        send[k] = pattern(me, k);
    uint64_t send_bytes[2] = {0, 0}, recv_bytes[2] = {0, 0}, zero[2] = {0, 0};
    send_bytes[1 - me] = out;
    recv_bytes[1 - me] = in;
    moe_comm_set_step(comm, MOE_STEP_DISPATCH);
    int rc = moe_alltoallv(comm, send, send_bytes, zero, recv, recv_bytes, zero);
    for (uint64_t k = 0; rc == 0 && k < in; k++)
        if (recv[k] != pattern(1 - me, k)) {
            v->ok = 0;
            snprintf(v->message, sizeof v->message, "rank %d: byte %" PRIu64
                     " differs", me, k);
            break;
        }
    return rc;
}

static int hostile_rank_main(struct moe_comm *comm, void *arg)
{
    const struct hostile_case *c = arg;
    /* Taken before any corruption: the app offset is in the header. */
    struct app_area *app = moe_segment_app(comm->segment);
    struct verdict *v = &app->verdict[comm->rank];
    v->ok = 1;

    int rc = moe_barrier(comm);
    if (rc == 0 && c->corruption == LAYOUT_OVERWRITTEN) {
        struct moe_segment_header *h = comm->segment;
        struct moe_segment_header saved = {0};
        if (comm->rank == 1) {
            saved.ranks = h->ranks;
            saved.ring_stride = h->ring_stride;
            saved.rings_offset = h->rings_offset;
            saved.app_offset = h->app_offset;
            saved.ring_capacity = h->ring_capacity;
            h->ranks = 9999;
            h->ring_stride = 1;
            h->rings_offset = UINT64_MAX / 2;
            h->app_offset = 7;
            h->ring_capacity = 1ULL << 40;
        }
        /* Both ranks exchange after the overwrite: the barrier orders it. */
        rc = moe_barrier(comm);
        if (rc == 0)
            rc = exchange(comm, v);
        if (rc == 0)
            rc = moe_barrier(comm);
        if (comm->rank == 1) {
            /* Restored for the launcher, which reads the mapped header. */
            h->ranks = saved.ranks;
            h->ring_stride = saved.ring_stride;
            h->rings_offset = saved.rings_offset;
            h->app_offset = saved.app_offset;
            h->ring_capacity = saved.ring_capacity;
        }
    } else if (rc == 0 && comm->rank == 1) {
        rc = corrupt_and_wait(comm, c, app);
    } else if (rc == 0) {
        /* Start only after the corruption, so that the case does not
         * depend on timing. */
        int64_t deadline = moe_now_ns() + 10 * NS_PER_SECOND;
        while (!atomic_load(&app->corrupted) && moe_now_ns() < deadline) {
            struct timespec pause = {0, 1000 * 1000};
            nanosleep(&pause, NULL);
        }
        rc = exchange(comm, v);
    }
    v->rc = rc;
    snprintf(v->message, sizeof v->message, "%s", rc ? moe_error_message() : "");
    return rc;
}

struct hostile_report {
    int rc;
    struct moe_rank_outcome outcome[2];
    struct app_area app;
};

static void run_hostile(const struct hostile_case *c, struct hostile_report *r)
{
    struct moe_launch_config config = {
        .ranks = 2,
        .ring_capacity = RING_CAPACITY,
        .app_bytes = sizeof(struct app_area),
        .timeout_ns = 10 * NS_PER_SECOND,
        .rank_main = hostile_rank_main,
        .arg = (void *)c,
    };
    struct moe_launch launch;
    cr_assert_eq(moe_launch_create(&launch, &config), 0, "%s",
                 moe_error_message());
    r->rc = moe_launch_run(&launch);
    memcpy(r->outcome, launch.outcome, sizeof r->outcome);
    memcpy(&r->app, moe_segment_app(launch.segment), sizeof r->app);
    moe_launch_destroy(&launch);
}

static const struct hostile_case corrupt_cases[] = {
    {LENGTH_BEYOND_RING, "record length"},
    {LENGTH_BEYOND_PEER, "length"},
    {WRONG_TAG, "tag"},
    {HEAD_BEYOND_CAPACITY, "head index"},
    {TAIL_AHEAD_OF_HEAD, "tail index"},
    {TIMEOUT_OVERWRITTEN, "timeout"},
};

Test(hostile, corrupt_peer_reported, .timeout = TEST_TIMEOUT_S)
{
    size_t count = sizeof corrupt_cases / sizeof corrupt_cases[0];
    for (size_t i = 0; i < count; i++) {
        const struct hostile_case *c = &corrupt_cases[i];
        struct hostile_report r;
        run_hostile(c, &r);

        const struct verdict *v = &r.app.verdict[0];
        cr_expect_eq(r.rc, -ECANCELED, "%s: the launch returned %d", c->field,
                     r.rc);
        cr_expect_eq(r.outcome[0].signal, 0, "%s: rank 0 died from signal %d",
                     c->field, r.outcome[0].signal);
        cr_expect_eq(r.outcome[0].exit_status, MOE_RANK_EXIT_FAILED,
                     "%s: rank 0 exited with %d", c->field,
                     r.outcome[0].exit_status);
        cr_expect_eq(v->rc, -EPROTO, "%s: rank 0 returned %d: %s", c->field,
                     v->rc, v->message);
        cr_expect(strstr(v->message, c->field) != NULL,
                  "%s: the message does not name the field: \"%s\"", c->field,
                  v->message);
        if (c->corruption != TIMEOUT_OVERWRITTEN)
            cr_expect(strstr(v->message, "rank 1") != NULL,
                      "%s: the message does not name rank 1: \"%s\"", c->field,
                      v->message);
        cr_expect_eq(r.outcome[1].signal, 0, "%s: rank 1 died from signal %d",
                     c->field, r.outcome[1].signal);
    }
}

Test(hostile, layout_overwritten_after_attach, .timeout = TEST_TIMEOUT_S)
{
    const struct hostile_case c = {LAYOUT_OVERWRITTEN, ""};
    struct hostile_report r;
    run_hostile(&c, &r);

    cr_assert_eq(r.rc, 0, "the launch returned %d: rank 0: %s; rank 1: %s",
                 r.rc, r.app.verdict[0].message, r.app.verdict[1].message);
    for (int rank = 0; rank < 2; rank++) {
        cr_expect_eq(r.app.verdict[rank].rc, 0, "rank %d: %s", rank,
                     r.app.verdict[rank].message);
        cr_expect(r.app.verdict[rank].ok, "%s", r.app.verdict[rank].message);
    }
}
