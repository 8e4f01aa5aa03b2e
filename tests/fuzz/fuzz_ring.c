/*
 * fuzz_ring.c - libFuzzer target for the ring record decoder: the consumer
 * side of the ring and of moe_alltoallv() fed arbitrary ring memory, and
 * the producer side fed an arbitrary tail index.
 *
 * Input layout, little-endian, with zeros for bytes past the end:
 *   byte  0       capacity = 64 << (value % 7), so 64 to 4096 bytes
 *   bytes 1-8     tail index of the incoming ring (rounded down to a
 *                 multiple of 8 unless bit 0 of the flags byte is set)
 *   bytes 9-16    head index of the incoming ring, minus its tail
 *   bytes 17-20   bytes expected from the peer, modulo 64 KiB + 1
 *   bytes 21-24   bytes sent to the peer, modulo 64 KiB + 1
 *   bytes 25-32   head of the outgoing ring minus the tail the peer
 *                 published there
 *   byte  33      flags
 *   bytes 34-     the incoming ring's data area, from its start
 *
 * Two runs per input:
 *   1. The ring alone, in an allocation of exactly its footprint. The
 *      consumer peeks, copies into a buffer of exactly the record's length
 *      and releases until the ring is empty or reports an error. Then the
 *      producer writes records against the given tail.
 *   2. Rank 0 of a two-rank segment in this process runs moe_alltoallv()
 *      with rank 1's rings in that state. The abort flag is set, so a wait
 *      returns at once instead of sleeping. The receive buffer is exactly
 *      as large as the bytes expected.
 * AddressSanitizer catches a read or write outside those buffers. The
 * target also aborts when a failure has no message, when an error from
 * moe_alltoallv() does not name rank 1, or when rank 0 wrote to segment
 * bytes that it does not own.
 */
#include "moe_comm.h"
#include "moe_error.h"
#include "moe_ring.h"
#include "moe_shm.h"

#include <errno.h>
#include <stdalign.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum {
    MAX_MESSAGE_BYTES = 64 << 10,
    /* Two ranks' segment with 4 KiB rings takes 56 KiB. */
    SEGMENT_MEMORY_BYTES = 64 << 10,
    DATA_START = 34,
    FLAG_MISALIGNED_TAIL = 1,
};

struct ring_case {
    uint64_t capacity;
    uint64_t tail;
    uint64_t head;
    uint64_t expected_bytes;
    uint64_t send_bytes;
    uint64_t peer_tail_behind; /* outgoing head - published tail */
    const uint8_t *data;       /* the incoming data area's first bytes */
    size_t data_bytes;
};

static void contract_failed(const char *what)
{
    fprintf(stderr, "fuzz_ring: %s (message: \"%s\")\n", what,
            moe_error_message());
    abort();
}

/* Reads `bytes` little-endian bytes at `at`, with zeros past the end. */
static uint64_t read_le(const uint8_t *data, size_t size, size_t at, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        if (at + (size_t)i < size)
            v |= (uint64_t)data[at + (size_t)i] << (8 * i);
    return v;
}

static void parse_case(const uint8_t *data, size_t size, struct ring_case *c)
{
    c->capacity = 64u << (read_le(data, size, 0, 1) % 7);
    uint8_t flags = (uint8_t)read_le(data, size, 33, 1);
    c->tail = read_le(data, size, 1, 8);
    if (!(flags & FLAG_MISALIGNED_TAIL))
        c->tail &= ~(uint64_t)7;
    c->head = c->tail + read_le(data, size, 9, 8);
    c->expected_bytes = read_le(data, size, 17, 4) % (MAX_MESSAGE_BYTES + 1);
    c->send_bytes = read_le(data, size, 21, 4) % (MAX_MESSAGE_BYTES + 1);
    c->peer_tail_behind = read_le(data, size, 25, 8);
    c->data = size > DATA_START ? data + DATA_START : NULL;
    c->data_bytes = size > DATA_START ? size - DATA_START : 0;
    if (c->data_bytes > c->capacity)
        c->data_bytes = c->capacity;
}

/* Puts a ring at `memory` into the state of the incoming ring. The indices
 * are stored after moe_ring_init(), which accepts only valid ones. */
static void set_incoming(void *memory, const struct ring_case *c)
{
    struct moe_ring *ring = memory;
    if (moe_ring_init(memory, c->capacity, 0) != 0)
        contract_failed("moe_ring_init rejected a valid capacity");
    atomic_store(&ring->tail, c->tail);
    atomic_store(&ring->head, c->head);
    uint8_t *area = (uint8_t *)memory + sizeof(struct moe_ring);
    if (c->data_bytes)
        memcpy(area, c->data, c->data_bytes);
}

/* Puts a ring at `memory` into the state of the outgoing ring: empty by the
 * producer's own head, with the peer's tail peer_tail_behind bytes behind
 * head. The head starts near 2^64 so that the indices wrap. */
static void set_outgoing(void *memory, const struct ring_case *c)
{
    const uint64_t head = UINT64_MAX - 4095;
    struct moe_ring *ring = memory;
    if (moe_ring_init(memory, c->capacity, head) != 0)
        contract_failed("moe_ring_init rejected a valid start index");
    atomic_store(&ring->tail, head - c->peer_tail_behind);
}

static void expect_message(int rc)
{
    if (rc >= 0)
        contract_failed("a failure returned a positive value");
    if (moe_error_message()[0] == '\0')
        contract_failed("a failure has no message");
}

/* Run 1: the ring functions alone. */
static void fuzz_ring_alone(const struct ring_case *c)
{
    uint64_t footprint = moe_ring_footprint(c->capacity);
    void *memory = aligned_alloc(MOE_CACHE_LINE, footprint);
    if (!memory)
        contract_failed("out of memory");
    memset(memory, 0, footprint);
    set_incoming(memory, c);

    struct moe_ring_consumer consumer;
    moe_error_clear();
    int rc = moe_ring_consumer_attach(&consumer, memory, c->capacity);
    if (rc)
        expect_message(rc);
    /* Each record takes at least 8 bytes, so capacity / 8 bounds a drain. */
    for (uint64_t i = 0; rc == 0 && i <= c->capacity / 8; i++) {
        struct moe_ring_record record;
        moe_error_clear();
        rc = moe_ring_peek(&consumer, &record);
        if (rc == -EAGAIN)
            break;
        if (rc) {
            expect_message(rc);
            break;
        }
        if (record.part1_bytes + record.part2_bytes != record.length)
            contract_failed("record parts do not add up to its length");
        uint8_t *payload = malloc(record.length + (record.length == 0));
        if (!payload)
            contract_failed("out of memory");
        moe_ring_copy_payload(&record, payload);
        free(payload);
        moe_ring_release(&consumer, &record);
    }

    set_outgoing(memory, c);
    struct moe_ring_producer producer;
    moe_error_clear();
    rc = moe_ring_producer_attach(&producer, memory, c->capacity);
    if (rc) {
        expect_message(rc);
        free(memory);
        return;
    }
    static uint8_t source[MAX_MESSAGE_BYTES];
    for (int i = 0; i < 4; i++) {
        moe_error_clear();
        int64_t n = moe_ring_write_some(&producer, 1, source, c->send_bytes,
                                        (uint32_t)c->capacity / 4);
        if (n < 0) {
            expect_message((int)n);
            break;
        }
        if ((uint64_t)n > c->send_bytes || n > moe_ring_max_payload(c->capacity))
            contract_failed("moe_ring_write_some wrote more than it was given");
    }
    free(memory);
}

/* A copy of the segment bytes rank 0 must leave alone, taken before the
 * call: everything except rank 0's and rank 1's slots, the head and data
 * of ring (0, 1), and the tail of ring (1, 0). */
struct guard {
    const uint8_t *before;
    uint64_t bytes;
    /* The writable ranges in address order, as (offset, bytes). */
    uint64_t writable[4][2];
};

static void guard_take(struct guard *g, struct moe_segment_header *h)
{
    static uint8_t copy[SEGMENT_MEMORY_BYTES];
    g->bytes = h->segment_bytes;
    memcpy(copy, h, g->bytes);
    g->before = copy;

    const uint8_t *base = (const uint8_t *)h;
    struct moe_ring *out = moe_segment_ring(h, 0, 1);
    struct moe_ring *in = moe_segment_ring(h, 1, 0);
    const uint64_t ranges[4][2] = {
        {(uint64_t)((uint8_t *)moe_segment_slot(h, 0) - base),
         2 * sizeof(struct moe_rank_slot)},
        {(uint64_t)((uint8_t *)&out->head - base), sizeof out->head},
        {(uint64_t)((uint8_t *)(out + 1) - base), h->ring_capacity},
        {(uint64_t)((uint8_t *)&in->tail - base), sizeof in->tail},
    };
    memcpy(g->writable, ranges, sizeof ranges);
}

/* Compares the bytes between the writable ranges with memcmp, which is
 * fast even with the fuzzer's comparison tracing. */
static void guard_check(struct guard *g, const struct moe_segment_header *h)
{
    const uint8_t *now = (const uint8_t *)h;
    uint64_t at = 0;
    for (int i = 0; i <= 4; i++) {
        uint64_t end = i < 4 ? g->writable[i][0] : g->bytes;
        if (end < at)
            contract_failed("guard ranges out of order");
        if (memcmp(now + at, g->before + at, end - at) != 0) {
            fprintf(stderr, "fuzz_ring: segment bytes %llu to %llu changed\n",
                    (unsigned long long)at, (unsigned long long)end);
            contract_failed("rank 0 wrote outside what it owns");
        }
        if (i < 4)
            at = g->writable[i][0] + g->writable[i][1];
    }
}

/* Builds a two-rank segment in private memory, as moe_launch_create() lays
 * it out. The memory is reused by every run: fresh pages for each input
 * would make page faults most of the fuzzer's time. */
static struct moe_segment_header *make_segment(const struct ring_case *c)
{
    alignas(4096) static uint8_t memory[SEGMENT_MEMORY_BYTES];
    struct moe_segment_header layout;
    if (moe_segment_layout(&layout, 2, c->capacity, 0) != 0)
        contract_failed("moe_segment_layout rejected a valid layout");
    if (layout.segment_bytes > sizeof memory)
        contract_failed("the segment is larger than SEGMENT_MEMORY_BYTES");
    struct moe_segment_header *h = (struct moe_segment_header *)memory;
    memset(h, 0, layout.segment_bytes);
    memcpy(h, &layout, sizeof layout);
    h->launcher_pid = getppid();
    h->timeout_ns = 1000000000;
    h->spin_ns = 0;
    /* Set, so that a wait returns -ECANCELED at once instead of sleeping. */
    atomic_store(&h->abort_flag, 1);
    for (int src = 0; src < 2; src++)
        for (int dst = 0; dst < 2; dst++)
            if (moe_ring_init(moe_segment_ring(h, src, dst), c->capacity, 0) != 0)
                contract_failed("moe_ring_init rejected a valid ring");
    set_incoming(moe_segment_ring(h, 1, 0), c);
    set_outgoing(moe_segment_ring(h, 0, 1), c);
    return h;
}

/* Run 2: rank 0's all-to-all against a corrupt rank 1. */
static void fuzz_alltoallv(const struct ring_case *c)
{
    struct moe_segment_header *h = make_segment(c);
    struct guard guard;
    guard_take(&guard, h);

    struct moe_comm comm;
    moe_error_clear();
    int rc = moe_comm_attach(&comm, h, 0);
    if (rc) {
        expect_message(rc);
        if (!strstr(moe_error_message(), "rank 1"))
            contract_failed("an attach error does not name rank 1");
        guard_check(&guard, h);
        return;
    }

    static uint8_t send[MAX_MESSAGE_BYTES];
    uint8_t *recv = malloc(c->expected_bytes + (c->expected_bytes == 0));
    if (!recv)
        contract_failed("out of memory");
    const uint64_t send_bytes[2] = {0, c->send_bytes};
    const uint64_t recv_bytes[2] = {0, c->expected_bytes};
    const uint64_t offsets[2] = {0, 0};
    moe_comm_set_step(&comm, MOE_STEP_DISPATCH);
    moe_error_clear();
    rc = moe_alltoallv(&comm, send, send_bytes, offsets, recv, recv_bytes,
                       offsets);
    if (rc) {
        expect_message(rc);
        if (rc != -ECANCELED && !strstr(moe_error_message(), "rank 1"))
            contract_failed("an all-to-all error does not name rank 1");
    }
    guard_check(&guard, h);
    moe_comm_detach(&comm);
    free(recv);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct ring_case c;
    parse_case(data, size, &c);
    fuzz_ring_alone(&c);
    fuzz_alltoallv(&c);
    return 0;
}
