/*
 * ring_threads.h - the ring and the collectives run with threads in place
 * of processes, for ThreadSanitizer.
 *
 * ThreadSanitizer checks only the accesses within one process, so here a
 * producer thread and a consumer thread share one ring in private memory,
 * and RING_THREADS_RANKS rank threads share one segment in private memory,
 * laid out as moe_launch_create() lays out the shared one. The ring and comm
 * code under test is the same as between processes.
 *
 * Two front ends use these functions: tests/test_ring_threads.c in the
 * normal suite, and tests/tsan/ring_threads.c, which `make tsan` builds
 * with -fsanitize=thread. Criterion 2.4.1 itself crashes at start-up under
 * ThreadSanitizer, so that one is a plain program.
 *
 * Each function fills a result struct and never asserts, so that both
 * front ends can report the same facts.
 */
#ifndef RING_THREADS_H
#define RING_THREADS_H

#include "moe_comm.h"
#include "moe_error.h"
#include "moe_ring.h"
#include "moe_shm.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A thread gives up when its peer makes no progress for this long. */
#define RING_THREADS_STALL_NS (20LL * 1000 * 1000 * 1000)

enum {
    RING_THREADS_CAPACITY = 4096,
    RING_THREADS_MAX_RECORD_BYTES = 1500,
    RING_THREADS_RANKS = 4,
    RING_THREADS_ROUNDS = 6,
};

static uint64_t ring_threads_mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* Payload length of record `id`: 0 for one in 13, else 8 to 1500 bytes,
 * of which the first 8 carry the checksum of the rest. */
static uint32_t stream_length(uint64_t id)
{
    if (id % 13 == 0)
        return 0;
    return 8 + (uint32_t)(ring_threads_mix(id) % (RING_THREADS_MAX_RECORD_BYTES - 7));
}

static uint8_t stream_byte(uint64_t id, uint64_t offset)
{
    return (uint8_t)(ring_threads_mix(id * 0x100000001b3ULL + offset) >> 56);
}

/* FNV-1a with a final mix, over the bytes after the checksum field. */
static uint64_t body_checksum(const uint8_t *body, uint32_t bytes)
{
    uint64_t h = 0xcbf29ce484222325ULL ^ bytes;
    for (uint32_t k = 0; k < bytes; k++)
        h = (h ^ body[k]) * 0x100000001b3ULL;
    return ring_threads_mix(h);
}

struct stream {
    void *memory;        /* the ring */
    uint64_t records;
    uint64_t corrupt_id; /* record altered after its checksum, or UINT64_MAX */
    /* Written by the consumer thread, read after pthread_join. */
    uint64_t received;
    uint64_t bad_checksums;
    uint64_t first_bad;
    uint64_t checksum_sum;
    char error[256];
    /* Written by the producer thread, read after pthread_join. */
    uint64_t sent_checksum_sum;
    char producer_error[256];
};

/* Yields while the ring is full or empty, because both threads may share a
 * core. */
static void stream_pause(unsigned *spins)
{
    if (++*spins < 64)
        moe_cpu_relax();
    else
        sched_yield();
}

static void *stream_produce(void *arg)
{
    struct stream *s = arg;
    struct moe_ring_producer producer;
    if (moe_ring_producer_attach(&producer, s->memory, RING_THREADS_CAPACITY) != 0) {
        snprintf(s->producer_error, sizeof s->producer_error, "attach: %s",
                 moe_error_message());
        return NULL;
    }
    uint8_t payload[RING_THREADS_MAX_RECORD_BYTES];
    for (uint64_t id = 0; id < s->records; id++) {
        uint32_t length = stream_length(id);
        if (length) {
            for (uint32_t k = 8; k < length; k++)
                payload[k] = stream_byte(id, k);
            uint64_t checksum = body_checksum(payload + 8, length - 8);
            memcpy(payload, &checksum, 8);
            s->sent_checksum_sum += checksum;
            if (id == s->corrupt_id && length > 8)
                payload[8 + (length - 8) / 2] ^= 0x10;
        }
        unsigned spins = 0;
        int64_t since = moe_now_ns();
        int rc;
        while ((rc = moe_ring_try_send(&producer, (uint32_t)id, payload,
                                       length)) == -EAGAIN) {
            stream_pause(&spins);
            if (moe_now_ns() - since > RING_THREADS_STALL_NS) {
                snprintf(s->producer_error, sizeof s->producer_error,
                         "stalled before record %" PRIu64, id);
                return NULL;
            }
        }
        if (rc) {
            snprintf(s->producer_error, sizeof s->producer_error,
                     "record %" PRIu64 ": %s", id, moe_error_message());
            return NULL;
        }
    }
    return NULL;
}

static void *stream_consume(void *arg)
{
    struct stream *s = arg;
    struct moe_ring_consumer consumer;
    if (moe_ring_consumer_attach(&consumer, s->memory, RING_THREADS_CAPACITY) != 0) {
        snprintf(s->error, sizeof s->error, "attach: %s", moe_error_message());
        return NULL;
    }
    uint8_t payload[RING_THREADS_MAX_RECORD_BYTES];
    for (uint64_t id = 0; id < s->records; id++) {
        struct moe_ring_record record;
        unsigned spins = 0;
        int64_t since = moe_now_ns();
        int rc;
        while ((rc = moe_ring_peek(&consumer, &record)) == -EAGAIN) {
            stream_pause(&spins);
            if (moe_now_ns() - since > RING_THREADS_STALL_NS) {
                snprintf(s->error, sizeof s->error, "stalled before record "
                         "%" PRIu64, id);
                return NULL;
            }
        }
        if (rc) {
            snprintf(s->error, sizeof s->error, "record %" PRIu64 ": %s", id,
                     moe_error_message());
            return NULL;
        }
        if (record.tag != (uint32_t)id || record.length != stream_length(id)) {
            snprintf(s->error, sizeof s->error, "record %" PRIu64 " arrived "
                     "with tag %u and %u bytes, expected %u bytes", id,
                     record.tag, record.length, stream_length(id));
            return NULL;
        }
        moe_ring_copy_payload(&record, payload);
        moe_ring_release(&consumer, &record);
        if (record.length) {
            uint64_t stored;
            memcpy(&stored, payload, 8);
            uint64_t checksum = body_checksum(payload + 8, record.length - 8);
            if (checksum != stored && s->bad_checksums++ == 0)
                s->first_bad = id;
            s->checksum_sum += checksum;
        }
        s->received++;
    }
    return NULL;
}

/* Streams `records` records from a producer thread to a consumer thread
 * through a 4 KiB ring whose indices start at start_index. Returns 0, or
 * -1 with s->error set when the threads could not start. */
static int run_stream(struct stream *s, uint64_t records, uint64_t start_index,
                      uint64_t corrupt_id)
{
    memset(s, 0, sizeof *s);
    s->records = records;
    s->corrupt_id = corrupt_id;
    s->first_bad = UINT64_MAX;
    s->memory = aligned_alloc(MOE_CACHE_LINE, moe_ring_footprint(RING_THREADS_CAPACITY));
    if (!s->memory || moe_ring_init(s->memory, RING_THREADS_CAPACITY, start_index)) {
        snprintf(s->error, sizeof s->error, "ring setup failed: %s",
                 moe_error_message());
        free(s->memory);
        return -1;
    }

    pthread_t producer, consumer;
    if (pthread_create(&consumer, NULL, stream_consume, s) != 0) {
        snprintf(s->error, sizeof s->error, "pthread_create failed");
        free(s->memory);
        return -1;
    }
    if (pthread_create(&producer, NULL, stream_produce, s) != 0) {
        /* The consumer gives up after RING_THREADS_STALL_NS. */
        pthread_join(consumer, NULL);
        snprintf(s->error, sizeof s->error, "pthread_create failed");
        free(s->memory);
        return -1;
    }
    pthread_join(producer, NULL);
    pthread_join(consumer, NULL);
    free(s->memory);
    return 0;
}

/* ---- ranks as threads ------------------------------------------------ */

struct rank_thread {
    struct moe_segment_header *segment;
    int rank;
    uint64_t bytes_received; /* in the all-to-all rounds, checked */
    char failure[256];       /* first failed check, or "" */
};

/* Bytes rank src sends to rank dst in round `round`: 0 for about one pair
 * in five, otherwise up to 20 KiB, five times the 4 KiB ring. */
static uint64_t pair_bytes(int src, int dst, int round)
{
    uint64_t h = ring_threads_mix((uint64_t)(src * 131 + dst * 17 + round * 7919));
    return h % 5 == 0 ? 0 : h % (20u << 10);
}

static uint8_t pair_byte(int src, int dst, int round, uint64_t offset)
{
    return (uint8_t)(ring_threads_mix(((uint64_t)src << 48) ^ ((uint64_t)dst << 40) ^
                                      ((uint64_t)round << 32) ^ offset) >> 56);
}

__attribute__((format(printf, 2, 3)))
static void rank_fail(struct rank_thread *t, const char *format, ...)
{
    if (t->failure[0])
        return;
    va_list args;
    va_start(args, format);
    vsnprintf(t->failure, sizeof t->failure, format, args);
    va_end(args);
}

/* One round of moe_alltoallv(), checking every received byte. */
static int alltoall_round(struct moe_comm *comm, struct rank_thread *t, int round)
{
    enum { R = RING_THREADS_RANKS };
    int me = comm->rank;
    uint64_t send_bytes[R], send_offsets[R], recv_bytes[R], recv_offsets[R];
    uint64_t send_total = 0, recv_total = 0;
    for (int p = 0; p < R; p++) {
        send_bytes[p] = pair_bytes(me, p, round);
        send_offsets[p] = send_total;
        send_total += send_bytes[p];
        recv_bytes[p] = pair_bytes(p, me, round);
        recv_offsets[p] = recv_total;
        recv_total += recv_bytes[p];
    }
    uint8_t *send = malloc(send_total + 1), *recv = malloc(recv_total + 1);
    if (!send || !recv) {
        free(send);
        free(recv);
        return moe_fail(-ENOMEM, "rank %d: out of memory", me);
    }
    for (int d = 0; d < R; d++)
        for (uint64_t k = 0; k < send_bytes[d]; k++)
            send[send_offsets[d] + k] = pair_byte(me, d, round, k);

    int rc = moe_alltoallv(comm, send, send_bytes, send_offsets, recv,
                           recv_bytes, recv_offsets);
    for (int s = 0; rc == 0 && s < R; s++) {
        for (uint64_t k = 0; k < recv_bytes[s]; k++)
            if (recv[recv_offsets[s] + k] != pair_byte(s, me, round, k)) {
                rank_fail(t, "rank %d, round %d: byte %" PRIu64 " from rank "
                          "%d differs", me, round, k, s);
                break;
            }
        t->bytes_received += recv_bytes[s];
    }
    free(send);
    free(recv);
    return rc;
}

static void *rank_run(void *arg)
{
    struct rank_thread *t = arg;
    struct moe_comm comm;
    if (moe_comm_attach(&comm, t->segment, t->rank) != 0) {
        rank_fail(t, "rank %d: attach: %s", t->rank, moe_error_message());
        return NULL;
    }
    moe_comm_set_step(&comm, MOE_STEP_DISPATCH);
    int rc = 0;
    for (int round = 0; rc == 0 && round < RING_THREADS_ROUNDS; round++)
        rc = alltoall_round(&comm, t, round);

    uint64_t mine = 1000 + (uint64_t)t->rank, all[RING_THREADS_RANKS];
    if (rc == 0)
        rc = moe_allgather(&comm, &mine, sizeof mine, all);
    for (int r = 0; rc == 0 && r < RING_THREADS_RANKS; r++)
        if (all[r] != 1000 + (uint64_t)r)
            rank_fail(t, "rank %d: allgather block %d is %" PRIu64, t->rank, r,
                      all[r]);
    for (int i = 0; rc == 0 && i < 4; i++)
        rc = moe_barrier(&comm);
    if (rc)
        rank_fail(t, "rank %d: %s", t->rank, moe_error_message());
    moe_comm_detach(&comm);
    return NULL;
}

/* The bytes every rank should receive over all rounds. */
static uint64_t expected_bytes_received(int rank)
{
    uint64_t total = 0;
    for (int round = 0; round < RING_THREADS_ROUNDS; round++)
        for (int s = 0; s < RING_THREADS_RANKS; s++)
            total += pair_bytes(s, rank, round);
    return total;
}

/* Runs RING_THREADS_RANKS rank threads on one segment in private memory.
 * Returns the segment's abort flag at the end, or -1 when the segment or
 * a thread could not be created (threads[0].failure gives the reason). */
static int run_ranks(struct rank_thread threads[RING_THREADS_RANKS])
{
    memset(threads, 0, RING_THREADS_RANKS * sizeof *threads);
    struct moe_segment_header layout;
    if (moe_segment_layout(&layout, RING_THREADS_RANKS, RING_THREADS_CAPACITY, 0)) {
        rank_fail(&threads[0], "layout: %s", moe_error_message());
        return -1;
    }
    struct moe_segment_header *h = aligned_alloc(4096, layout.segment_bytes);
    if (!h) {
        rank_fail(&threads[0], "out of memory for the segment");
        return -1;
    }
    memset(h, 0, layout.segment_bytes);
    memcpy(h, &layout, sizeof layout);
    h->launcher_pid = getppid(); /* so that the parent check in a wait passes */
    h->timeout_ns = RING_THREADS_STALL_NS;
    h->spin_ns = 0;
    for (int src = 0; src < RING_THREADS_RANKS; src++)
        for (int dst = 0; dst < RING_THREADS_RANKS; dst++)
            moe_ring_init(moe_segment_ring(h, src, dst), RING_THREADS_CAPACITY, 0);

    pthread_t ids[RING_THREADS_RANKS];
    int started = 0;
    for (; started < RING_THREADS_RANKS; started++) {
        threads[started].segment = h;
        threads[started].rank = started;
        if (pthread_create(&ids[started], NULL, rank_run, &threads[started]) != 0)
            break;
    }
    if (started < RING_THREADS_RANKS) {
        /* The started ranks wait for the missing one; abort them. */
        moe_segment_abort(h);
        rank_fail(&threads[0], "pthread_create failed for rank %d", started);
    }
    for (int r = 0; r < started; r++)
        pthread_join(ids[r], NULL);
    int aborted = (int)atomic_load(&h->abort_flag);
    free(h);
    return started < RING_THREADS_RANKS ? -1 : aborted;
}

#endif
