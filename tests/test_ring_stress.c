/*
 * test_ring_stress.c - two processes stream records through one shared ring.
 *
 * The test process (producer) sends 1,000,000 records of pseudo-random
 * sizes through a 4 KiB ring in a MAP_SHARED | MAP_ANONYMOUS mapping, so the
 * ring wraps constantly. A forked child (consumer) checks that every record
 * arrives once, in order, with the expected size and with a payload that
 * matches the checksum the producer stored in it. The child reports its
 * counts through a shared result struct and its exit status. One variant starts the indices
 * next to 2^64; another corrupts one payload on purpose to show that the
 * consumer's check can fail. The parent always reaps the child and kills it
 * if it runs past a deadline.
 */
#include "moe_error.h"
#include "moe_ring.h"
#include "moe_shm.h"
#include "test_util.h"

#include <errno.h>
#include <inttypes.h>
#include <sched.h>
#include <stdarg.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Criterion timeout of every test in this file. NOTE: one value for all of
 * them because Criterion 2.4.1, run with --jobs 2, leaks 48 bytes in its
 * runner (reported by LeakSanitizer, failing the sanitizer build) when
 * tests with different timeouts run side by side. */
#define TEST_TIMEOUT_S 90

enum {
    RING_CAPACITY = 4096,
    /* Every non-empty record starts with {uint64 id, uint64 checksum}. */
    RECORD_PREFIX_BYTES = 16,
    MAX_BODY_BYTES = 2048,
    /* Offset of the ring in the shared mapping, after the result struct. */
    RING_OFFSET = 4096,
};

/* The parent kills the child when this much time has passed since the
 * start, well within TEST_TIMEOUT_S. */
static const int64_t RUN_DEADLINE_NS = 60LL * 1000 * 1000 * 1000;
/* The consumer gives up when no record arrives for this long. */
static const int64_t CONSUMER_STALL_NS = 10LL * 1000 * 1000 * 1000;

/* Child exit statuses. */
enum {
    CONSUMER_OK = 0,         /* every record arrived and verified */
    CONSUMER_BAD_CHECKSUM = 1, /* every record arrived, some checksums differ */
    CONSUMER_STOPPED = 2,    /* stopped early, with the reason in result.error */
};

/* Written by the consumer, read by the parent after it has reaped the child
 * (waitpid orders the two). */
struct stress_result {
    uint64_t records;          /* records received in order */
    uint64_t body_bytes;       /* payload bytes after the prefixes */
    uint64_t checksum_sum;     /* sum of the checksums computed on receipt */
    uint64_t bad_checksums;    /* records whose checksum did not match */
    uint64_t first_bad_record; /* id of the first of those, or UINT64_MAX */
    int finished;              /* the consumer saw all records, then none */
    char error[256];           /* why the consumer stopped early */
};

struct stress_config {
    uint64_t records;
    uint64_t start_index;    /* initial head and tail of the ring */
    uint64_t corrupt_record; /* id whose body is altered after its checksum
                              * is computed, or UINT64_MAX for none */
};

/* What the parent observed; the test asserts on it. */
struct stress_outcome {
    struct stress_result result; /* copied out of the shared mapping */
    int wait_status;             /* of the child, from waitpid */
    bool child_killed;           /* the parent killed it at the deadline */
    char producer_error[256];    /* why the producer stopped early, or "" */
    uint64_t sent_records;
    uint64_t sent_body_bytes;
    uint64_t sent_checksum_sum;
    uint64_t ring_bytes;         /* bytes the sent records took in the ring */
    uint64_t head, tail;         /* ring indices after the child exited */
};

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* Payload length of record `id`. Every 97th record is empty. The others
 * carry the prefix and a body of 0..256 bytes, or 0..2048 bytes for one in
 * 16. Both sides compute it, so the consumer can check every length. */
static uint32_t record_length(uint64_t id)
{
    if (id % 97 == 0)
        return 0;
    uint64_t h = splitmix64(id);
    uint64_t body = (h & 15) == 0 ? (h >> 8) % (MAX_BODY_BYTES + 1)
                                  : (h >> 8) % 257;
    return RECORD_PREFIX_BYTES + (uint32_t)body;
}

/* Fills a record body with xorshift64 output seeded by its id. */
static void fill_body(uint8_t *dst, uint64_t id, uint32_t bytes)
{
    uint64_t state = splitmix64(id ^ 0x5bd1e9955bd1e995ULL) | 1;
    for (uint32_t k = 0; k < bytes; k += 8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        uint32_t n = bytes - k < 8 ? bytes - k : 8;
        memcpy(dst + k, &state, n);
    }
}

/* 64-bit checksum of a body, one word at a time. Each step is a bijection
 * of the running value for a fixed word, so changing any one word (or the
 * zero-padded tail) always changes the result. */
static uint64_t body_checksum(const uint8_t *body, uint32_t bytes)
{
    uint64_t h = 0xcbf29ce484222325ULL ^ bytes;
    for (uint32_t k = 0; k < bytes; k += 8) {
        uint64_t word = 0;
        memcpy(&word, body + k, bytes - k < 8 ? bytes - k : 8);
        h = (h ^ word) * 0x100000001b3ULL;
        h ^= h >> 29;
    }
    return h;
}

/* Backs off while the ring is full or empty: 64 pause spins, then 32
 * sched_yield() calls, then 50 us sleeps, so that two cores shared with
 * other tests are not burnt. Returns true once it sleeps, which is when the
 * caller checks its deadline. */
struct backoff {
    unsigned calls;
};

static bool backoff_wait(struct backoff *b)
{
    b->calls++;
    if (b->calls <= 64) {
        moe_cpu_relax();
        return false;
    }
    if (b->calls <= 64 + 32) {
        sched_yield();
        return false;
    }
    struct timespec pause = {0, 50 * 1000};
    nanosleep(&pause, NULL);
    return true;
}

/* Records why the consumer stopped and returns CONSUMER_STOPPED. */
__attribute__((format(printf, 2, 3)))
static int consumer_stop(struct stress_result *result, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vsnprintf(result->error, sizeof result->error, format, args);
    va_end(args);
    return CONSUMER_STOPPED;
}

/* The child's work: receives and checks config->records records. Returns
 * the exit status. */
static int consume(void *ring_memory, const struct stress_config *config,
                   struct stress_result *result)
{
    static uint8_t payload[RECORD_PREFIX_BYTES + MAX_BODY_BYTES];
    struct moe_ring_consumer consumer;
    if (moe_ring_consumer_attach(&consumer, ring_memory, RING_CAPACITY) != 0)
        return consumer_stop(result, "consumer attach failed: %s",
                             moe_error_message());

    for (uint64_t id = 0; id < config->records; id++) {
        struct moe_ring_record record;
        struct backoff backoff = {0};
        int64_t wait_start = moe_now_ns();
        int rc;
        while ((rc = moe_ring_peek(&consumer, &record)) == -EAGAIN)
            if (backoff_wait(&backoff) &&
                moe_now_ns() - wait_start > CONSUMER_STALL_NS)
                return consumer_stop(result, "timed out waiting for record "
                                     "%" PRIu64, id);
        if (rc != 0)
            return consumer_stop(result, "peek of record %" PRIu64 " failed "
                                 "with %d: %s", id, rc, moe_error_message());

        uint32_t expected_length = record_length(id);
        if (record.tag != (uint32_t)id)
            return consumer_stop(result, "record %" PRIu64 " arrived with "
                                 "tag %u", id, record.tag);
        if (record.length != expected_length)
            return consumer_stop(result, "record %" PRIu64 " has %u bytes, "
                                 "expected %u", id, record.length,
                                 expected_length);
        moe_ring_copy_payload(&record, payload);
        moe_ring_release(&consumer, &record);

        if (record.length > 0) {
            uint64_t prefix_id, stored_checksum;
            memcpy(&prefix_id, payload, 8);
            memcpy(&stored_checksum, payload + 8, 8);
            if (prefix_id != id)
                return consumer_stop(result, "record %" PRIu64 " carries id "
                                     "%" PRIu64, id, prefix_id);
            uint32_t body_bytes = record.length - RECORD_PREFIX_BYTES;
            uint64_t checksum = body_checksum(payload + RECORD_PREFIX_BYTES,
                                              body_bytes);
            if (checksum != stored_checksum && result->bad_checksums++ == 0)
                result->first_bad_record = id;
            result->checksum_sum += checksum;
            result->body_bytes += body_bytes;
        }
        result->records++;
    }

    struct moe_ring_record extra;
    if (moe_ring_peek(&consumer, &extra) != -EAGAIN)
        return consumer_stop(result, "a record follows the last one");
    result->finished = 1;
    return result->bad_checksums ? CONSUMER_BAD_CHECKSUM : CONSUMER_OK;
}

/* Waits for the child until `deadline_ns`, then kills it. Always reaps it. */
static int reap_child(pid_t child, int64_t deadline_ns, bool *killed)
{
    int status = 0;
    for (;;) {
        pid_t r = waitpid(child, &status, WNOHANG);
        if (r == child)
            return status;
        if (moe_now_ns() > deadline_ns)
            break;
        struct timespec pause = {0, 1000 * 1000};
        nanosleep(&pause, NULL);
    }
    kill(child, SIGKILL);
    *killed = true;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR)
        ;
    return status;
}

/* The parent's work: sends the records, stopping early at the deadline or
 * when the child has exited. Sets *reaped and *status if it reaped it. */
static void produce(void *ring_memory, const struct stress_config *config,
                    pid_t child, int64_t deadline_ns,
                    struct stress_outcome *out, bool *reaped, int *status)
{
    static uint8_t payload[RECORD_PREFIX_BYTES + MAX_BODY_BYTES];
    struct moe_ring_producer producer;
    if (moe_ring_producer_attach(&producer, ring_memory, RING_CAPACITY) != 0) {
        snprintf(out->producer_error, sizeof out->producer_error,
                 "producer attach failed: %s", moe_error_message());
        return;
    }

    for (uint64_t id = 0; id < config->records; id++) {
        uint32_t length = record_length(id);
        if (length > 0) {
            uint32_t body_bytes = length - RECORD_PREFIX_BYTES;
            fill_body(payload + RECORD_PREFIX_BYTES, id, body_bytes);
            uint64_t checksum = body_checksum(payload + RECORD_PREFIX_BYTES,
                                              body_bytes);
            memcpy(payload, &id, 8);
            memcpy(payload + 8, &checksum, 8);
            out->sent_checksum_sum += checksum;
            out->sent_body_bytes += body_bytes;
            if (id == config->corrupt_record && body_bytes > 0)
                payload[RECORD_PREFIX_BYTES + body_bytes / 2] ^= 0x40;
        }

        struct backoff backoff = {0};
        int rc;
        while ((rc = moe_ring_try_send(&producer, (uint32_t)id, payload,
                                       length)) == -EAGAIN) {
            if (!backoff_wait(&backoff))
                continue;
            if (moe_now_ns() > deadline_ns) {
                snprintf(out->producer_error, sizeof out->producer_error,
                         "deadline passed before record %" PRIu64, id);
                return;
            }
            if (waitpid(child, status, WNOHANG) == child) {
                *reaped = true;
                snprintf(out->producer_error, sizeof out->producer_error,
                         "the consumer exited before record %" PRIu64, id);
                return;
            }
        }
        if (rc != 0) {
            snprintf(out->producer_error, sizeof out->producer_error,
                     "try_send of record %" PRIu64 " failed with %d: %s", id,
                     rc, moe_error_message());
            return;
        }
        out->sent_records++;
        out->ring_bytes += moe_ring_record_bytes(length);
    }
}

/* Runs one producer/consumer pair and fills *out. Asserts nothing until
 * the child is reaped, so a failure never leaves it behind. */
static void run_stress(const struct stress_config *config,
                       struct stress_outcome *out)
{
    *out = (struct stress_outcome){0};
    size_t mapping_bytes = RING_OFFSET + moe_ring_footprint(RING_CAPACITY);
    uint8_t *mapping = mmap(NULL, mapping_bytes, PROT_READ | PROT_WRITE,
                            MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    cr_assert_neq(mapping, MAP_FAILED, "mmap failed: %s", strerror(errno));
    struct stress_result *result = (struct stress_result *)mapping;
    void *ring_memory = mapping + RING_OFFSET;
    result->first_bad_record = UINT64_MAX;
    cr_assert_eq(moe_ring_init(ring_memory, RING_CAPACITY, config->start_index),
                 0, "%s", moe_error_message());

    int64_t deadline_ns = moe_now_ns() + RUN_DEADLINE_NS;
    pid_t parent = getpid();
    fflush(NULL);
    pid_t child = fork();
    cr_assert_geq(child, 0, "fork failed: %s", strerror(errno));
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(CONSUMER_STOPPED);
        _exit(consume(ring_memory, config, result));
    }

    bool reaped = false;
    int status = 0;
    produce(ring_memory, config, child, deadline_ns, out, &reaped, &status);
    if (!reaped)
        status = reap_child(child, deadline_ns, &out->child_killed);

    out->wait_status = status;
    out->result = *result;
    struct moe_ring *ring = ring_memory;
    out->head = atomic_load(&ring->head);
    out->tail = atomic_load(&ring->tail);
    munmap(mapping, mapping_bytes);
}

/* Asserts that the child exited by itself with `expected_status`. */
static void expect_child_exit(const struct stress_outcome *out,
                              int expected_status)
{
    cr_assert_not(out->child_killed, "the consumer ran past the deadline");
    cr_assert(WIFEXITED(out->wait_status), "the consumer died from signal %d",
              WTERMSIG(out->wait_status));
    cr_assert_eq(WEXITSTATUS(out->wait_status), expected_status,
                 "the consumer exited with %d: %s",
                 WEXITSTATUS(out->wait_status), out->result.error);
}

/* Asserts that every record arrived once with its checksum intact. */
static void expect_conservation(const struct stress_config *config,
                                const struct stress_outcome *out)
{
    cr_assert_str_empty(out->producer_error, "producer: %s", out->producer_error);
    expect_child_exit(out, CONSUMER_OK);
    cr_expect(out->result.finished);
    cr_expect_eq(out->sent_records, config->records);
    cr_expect_eq(out->result.records, config->records,
                 "the consumer verified %" PRIu64 " of %" PRIu64 " records",
                 out->result.records, config->records);
    cr_expect_eq(out->result.bad_checksums, 0,
                 "%" PRIu64 " bad checksums, the first in record %" PRIu64,
                 out->result.bad_checksums, out->result.first_bad_record);
    cr_expect_eq(out->result.body_bytes, out->sent_body_bytes);
    cr_expect_eq(out->result.checksum_sum, out->sent_checksum_sum,
                 "the checksums received do not add up to those sent");
    cr_expect_eq(out->head, config->start_index + out->ring_bytes,
                 "head is %" PRIu64 ", expected %" PRIu64, out->head,
                 config->start_index + out->ring_bytes);
    cr_expect_eq(out->tail, out->head, "the consumer left bytes in the ring");
}

Test(ring_stress, million_records, .timeout = TEST_TIMEOUT_S)
{
    struct stress_config config = {
        .records = 1000000, .start_index = 0, .corrupt_record = UINT64_MAX};
    struct stress_outcome out;

    run_stress(&config, &out);

    expect_conservation(&config, &out);
    /* The data area wrapped more than 1000 times. */
    cr_expect_gt(out.ring_bytes, 1000 * RING_CAPACITY);
}

Test(ring_stress, index_wrap, .timeout = TEST_TIMEOUT_S)
{
    /* 2^64 - 1 MiB: the indices pass 2^64 after about 5,000 records. */
    struct stress_config config = {.records = 1000000,
                                   .start_index = UINT64_MAX - (1ULL << 20) + 1,
                                   .corrupt_record = UINT64_MAX};
    struct stress_outcome out;

    run_stress(&config, &out);

    expect_conservation(&config, &out);
    cr_expect_lt(out.head, config.start_index,
                 "head %" PRIu64 " never passed 2^64", out.head);
    cr_expect_gt(out.head, 0);
}

Test(ring_stress, corrupt_payload_detected, .timeout = TEST_TIMEOUT_S)
{
    /* The consumer's checksum comparison must report the one record whose
     * body the producer altered after computing its checksum. */
    uint64_t corrupt = 5000;
    while (record_length(corrupt) <= RECORD_PREFIX_BYTES)
        corrupt++;
    struct stress_config config = {
        .records = 20000, .start_index = 0, .corrupt_record = corrupt};
    struct stress_outcome out;

    run_stress(&config, &out);

    cr_assert_str_empty(out.producer_error, "producer: %s", out.producer_error);
    expect_child_exit(&out, CONSUMER_BAD_CHECKSUM);
    cr_expect_eq(out.result.records, config.records);
    cr_expect_eq(out.result.bad_checksums, 1);
    cr_expect_eq(out.result.first_bad_record, corrupt,
                 "first bad record %" PRIu64 ", expected %" PRIu64,
                 out.result.first_bad_record, corrupt);
    cr_expect_neq(out.result.checksum_sum, out.sent_checksum_sum);
}
