/*
 * ring_soak.c - a long run of one ring between two processes, for
 * `make soak`.
 *
 * The parent produces RECORDS records (default 10^8) into one ring in a
 * MAP_SHARED | MAP_ANONYMOUS mapping; a forked child consumes them. Each
 * record has a length that both sides derive from its id (0 to 2048 bytes,
 * mostly under 256), its id as the tag, and a payload of
 * {uint64 id, uint64 checksum, body}. The consumer checks the tag, the
 * length, the id and the checksum of every record, and the sums of all
 * checksums on both sides must agree at the end. The indices start 1 MiB
 * below 2^64, so they wrap early in the run, and with the default 4 KiB
 * ring the data area wraps millions of times.
 *
 * Usage: ring_soak [RECORDS [CAPACITY]]
 * Prints the count, the bytes and the time, and exits with 0 when every
 * record arrived intact, 1 when a check failed and 2 for bad arguments.
 * Either side gives up after 30 s without progress; the child dies with
 * the parent (PR_SET_PDEATHSIG).
 */
#include "moe_error.h"
#include "moe_ring.h"
#include "moe_shm.h"

#include <errno.h>
#include <inttypes.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum {
    PREFIX_BYTES = 16, /* {uint64 id, uint64 checksum} */
    MAX_BODY_BYTES = 2048,
    RESULT_BYTES = 4096, /* the child's result, before the ring */
};

static const int64_t STALL_NS = 30LL * 1000 * 1000 * 1000;

/* Written by the child, read by the parent after waitpid(). */
struct soak_result {
    uint64_t records;
    uint64_t body_bytes;
    uint64_t checksum_sum;
    uint64_t bad_records;
    uint64_t first_bad;
    char error[256];
};

static uint64_t mix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

/* Payload bytes of record `id`: 0 for one in 97, else the prefix and a
 * body of 0 to 256 bytes, or 0 to 2048 bytes for one in 16. */
static uint32_t record_length(uint64_t id)
{
    if (id % 97 == 0)
        return 0;
    uint64_t h = mix64(id);
    uint64_t body = (h & 15) == 0 ? (h >> 8) % (MAX_BODY_BYTES + 1) : (h >> 8) % 257;
    return PREFIX_BYTES + (uint32_t)body;
}

static void fill_body(uint8_t *dst, uint64_t id, uint32_t bytes)
{
    uint64_t state = mix64(id ^ 0x5bd1e9955bd1e995ULL) | 1;
    for (uint32_t k = 0; k < bytes; k += 8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        memcpy(dst + k, &state, bytes - k < 8 ? bytes - k : 8);
    }
}

/* Changing any one byte of the body changes the result: each step is a
 * bijection of the running value for a fixed word. */
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

/* Spins briefly, then yields, while the ring is full or empty. */
static void pause_once(unsigned *spins)
{
    if (++*spins < 256)
        moe_cpu_relax();
    else
        sched_yield();
}

static int consume(void *ring, uint64_t capacity, uint64_t records,
                   struct soak_result *r)
{
    static uint8_t payload[PREFIX_BYTES + MAX_BODY_BYTES];
    struct moe_ring_consumer consumer;
    if (moe_ring_consumer_attach(&consumer, ring, capacity) != 0) {
        snprintf(r->error, sizeof r->error, "attach: %s", moe_error_message());
        return 1;
    }
    r->first_bad = UINT64_MAX;
    for (uint64_t id = 0; id < records; id++) {
        struct moe_ring_record record;
        unsigned spins = 0;
        int64_t since = 0;
        int rc;
        while ((rc = moe_ring_peek(&consumer, &record)) == -EAGAIN) {
            pause_once(&spins);
            if (spins % 4096 == 0) {
                int64_t now = moe_now_ns();
                if (!since)
                    since = now;
                else if (now - since > STALL_NS) {
                    snprintf(r->error, sizeof r->error, "no record %" PRIu64
                             " after 30 s", id);
                    return 1;
                }
            }
        }
        if (rc) {
            snprintf(r->error, sizeof r->error, "record %" PRIu64 ": %s", id,
                     moe_error_message());
            return 1;
        }
        if (record.tag != (uint32_t)id || record.length != record_length(id)) {
            snprintf(r->error, sizeof r->error, "record %" PRIu64 " has tag %u "
                     "and %u bytes, expected %u bytes", id, record.tag,
                     record.length, record_length(id));
            return 1;
        }
        moe_ring_copy_payload(&record, payload);
        moe_ring_release(&consumer, &record);
        if (record.length) {
            uint64_t stored_id, stored_checksum;
            memcpy(&stored_id, payload, 8);
            memcpy(&stored_checksum, payload + 8, 8);
            uint32_t body = record.length - PREFIX_BYTES;
            uint64_t checksum = body_checksum(payload + PREFIX_BYTES, body);
            if ((stored_id != id || checksum != stored_checksum) &&
                r->bad_records++ == 0)
                r->first_bad = id;
            r->checksum_sum += checksum;
            r->body_bytes += body;
        }
        r->records++;
    }
    struct moe_ring_record extra;
    if (moe_ring_peek(&consumer, &extra) != -EAGAIN) {
        snprintf(r->error, sizeof r->error, "a record follows the last one");
        return 1;
    }
    return r->bad_records ? 1 : 0;
}

/* Sends the records; returns 0, or 1 with *error set. */
static int produce(void *ring, uint64_t capacity, uint64_t records,
                   pid_t child, uint64_t *checksum_sum, uint64_t *body_bytes,
                   char *error, size_t error_size)
{
    static uint8_t payload[PREFIX_BYTES + MAX_BODY_BYTES];
    struct moe_ring_producer producer;
    if (moe_ring_producer_attach(&producer, ring, capacity) != 0) {
        snprintf(error, error_size, "attach: %s", moe_error_message());
        return 1;
    }
    for (uint64_t id = 0; id < records; id++) {
        uint32_t length = record_length(id);
        if (length) {
            uint32_t body = length - PREFIX_BYTES;
            fill_body(payload + PREFIX_BYTES, id, body);
            uint64_t checksum = body_checksum(payload + PREFIX_BYTES, body);
            memcpy(payload, &id, 8);
            memcpy(payload + 8, &checksum, 8);
            *checksum_sum += checksum;
            *body_bytes += body;
        }
        unsigned spins = 0;
        int64_t since = 0;
        int rc;
        while ((rc = moe_ring_try_send(&producer, (uint32_t)id, payload,
                                       length)) == -EAGAIN) {
            pause_once(&spins);
            if (spins % 4096 == 0) {
                int status;
                if (waitpid(child, &status, WNOHANG) == child) {
                    snprintf(error, error_size, "the consumer exited before "
                             "record %" PRIu64, id);
                    return 1;
                }
                int64_t now = moe_now_ns();
                if (!since)
                    since = now;
                else if (now - since > STALL_NS) {
                    snprintf(error, error_size, "no room for record %" PRIu64
                             " after 30 s", id);
                    return 1;
                }
            }
        }
        if (rc) {
            snprintf(error, error_size, "record %" PRIu64 ": %s", id,
                     moe_error_message());
            return 1;
        }
        if ((id + 1) % 10000000 == 0)
            fprintf(stderr, "soak: %" PRIu64 " records sent\n", id + 1);
    }
    return 0;
}

static int parse_u64(const char *text, uint64_t *value)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno || end == text || *end || text[0] == '-')
        return -1;
    *value = v;
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t records = 100000000, capacity = 4096;
    if (argc > 3 || (argc > 1 && parse_u64(argv[1], &records)) ||
        (argc > 2 && (parse_u64(argv[2], &capacity) ||
                      !moe_ring_capacity_valid(capacity) ||
                      capacity < PREFIX_BYTES + MAX_BODY_BYTES + 8))) {
        fprintf(stderr, "usage: %s [RECORDS [CAPACITY]]: CAPACITY is a power "
                "of two from 4096 to 2^31 bytes [4096]\n", argv[0]);
        return 2;
    }

    size_t mapping_bytes = RESULT_BYTES + moe_ring_footprint(capacity);
    uint8_t *mapping = mmap(NULL, mapping_bytes, PROT_READ | PROT_WRITE,
                            MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mapping == MAP_FAILED) {
        perror("soak: mmap");
        return 1;
    }
    struct soak_result *result = (struct soak_result *)mapping;
    void *ring = mapping + RESULT_BYTES;
    const uint64_t start_index = UINT64_MAX - (1u << 20) + 1;
    if (moe_ring_init(ring, capacity, start_index) != 0) {
        fprintf(stderr, "soak: %s\n", moe_error_message());
        return 1;
    }

    int64_t start = moe_now_ns();
    pid_t parent = getpid();
    fflush(NULL);
    pid_t child = fork();
    if (child < 0) {
        perror("soak: fork");
        return 1;
    }
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(1);
        _exit(consume(ring, capacity, records, result));
    }

    uint64_t checksum_sum = 0, body_bytes = 0;
    char error[256] = "";
    int failed = produce(ring, capacity, records, child, &checksum_sum,
                         &body_bytes, error, sizeof error);
    if (failed)
        kill(child, SIGKILL);
    int status = 0;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR)
        continue;
    double seconds = (double)(moe_now_ns() - start) / 1e9;
    struct moe_ring *shared = ring;
    uint64_t head = atomic_load(&shared->head);

    if (failed)
        fprintf(stderr, "soak: producer: %s\n", error);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fprintf(stderr, "soak: consumer %s %d: %s\n",
                WIFEXITED(status) ? "exited with" : "was killed by signal",
                WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status),
                result->error[0] ? result->error : "no message");
    if (result->bad_records)
        fprintf(stderr, "soak: %" PRIu64 " records failed their checksum, the "
                "first is %" PRIu64 "\n", result->bad_records, result->first_bad);
    int ok = !failed && WIFEXITED(status) && WEXITSTATUS(status) == 0 &&
             result->records == records && result->checksum_sum == checksum_sum &&
             result->body_bytes == body_bytes;
    printf("soak: %" PRIu64 " of %" PRIu64 " records, %.2f GB of bodies, "
           "through a %" PRIu64 "-byte ring in %.1f s (%.2f M records/s); "
           "checksum sums %s; head index %s 2^64\n",
           result->records, records, (double)result->body_bytes / 1e9, capacity,
           seconds, (double)result->records / seconds / 1e6,
           result->checksum_sum == checksum_sum ? "agree" : "DIFFER",
           head < start_index ? "passed" : "did not pass");
    munmap(mapping, mapping_bytes);
    return ok ? 0 : 1;
}
