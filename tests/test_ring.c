/*
 * test_ring.c - single-process tests of the SPSC record ring.
 *
 * Checks that records of varying sizes come out in FIFO order with intact
 * payloads, also when a payload straddles the end of the data area and when
 * the free-running indices pass 2^64; that a full ring rejects a record with
 * -EAGAIN (write_some returns 0) and an empty ring peeks -EAGAIN; that a
 * record larger than the max payload is rejected with -EINVAL; and that a
 * corrupt header, head index, capacity or magic is rejected with -EPROTO
 * instead of being read. Ring memory comes from aligned_alloc.
 */
#include "moe_error.h"
#include "moe_ring.h"
#include "test_util.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>

/* Criterion timeout of every test in this file. NOTE: one value for all of
 * them because Criterion 2.4.1, run with --jobs 2, leaks 48 bytes in its
 * runner (reported by LeakSanitizer, failing the sanitizer build) when
 * tests with different timeouts run side by side. */
#define TEST_TIMEOUT_S 30

/* One ring in private memory with both ends attached. */
struct test_ring {
    void *memory;
    uint64_t capacity;
    struct moe_ring_producer producer;
    struct moe_ring_consumer consumer;
};

static void ring_open(struct test_ring *t, uint64_t capacity,
                      uint64_t start_index)
{
    uint64_t footprint = moe_ring_footprint(capacity);
    t->capacity = capacity;
    t->memory = aligned_alloc(MOE_CACHE_LINE, footprint);
    cr_assert_not_null(t->memory, "aligned_alloc of %llu bytes failed",
                       (unsigned long long)footprint);
    /* Garbage, so that reading a byte the producer did not write shows up as
     * a mismatch. */
    memset(t->memory, 0xee, footprint);

    cr_assert_eq(moe_ring_init(t->memory, capacity, start_index), 0,
                 "init: %s", moe_error_message());
    cr_assert_eq(moe_ring_producer_attach(&t->producer, t->memory, capacity), 0,
                 "producer attach: %s", moe_error_message());
    cr_assert_eq(moe_ring_consumer_attach(&t->consumer, t->memory, capacity), 0,
                 "consumer attach: %s", moe_error_message());
}

static void ring_close(struct test_ring *t)
{
    free(t->memory);
    t->memory = NULL;
}

static struct moe_ring *ring_shared(struct test_ring *t)
{
    return t->memory;
}

/* Byte `offset` of the payload of record `id`: a hash of both, so that a
 * byte from another record or another position does not match. */
static uint8_t payload_byte(uint64_t id, uint64_t offset)
{
    uint64_t x = (id + 1) * 0x9e3779b97f4a7c15ULL ^ offset * 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 31;
    x *= 0x94d049bb133111ebULL;
    return (uint8_t)(x >> 56);
}

static void fill_payload(uint8_t *dst, uint64_t id, uint64_t length)
{
    for (uint64_t k = 0; k < length; k++)
        dst[k] = payload_byte(id, k);
}

/* Asserts that got contains the payload of record `id`, naming the first
 * differing byte. */
static void expect_payload(const uint8_t *got, uint64_t id, uint64_t length)
{
    for (uint64_t k = 0; k < length; k++)
        if (got[k] != payload_byte(id, k))
            cr_assert_fail("record %llu: payload byte %llu of %llu is %#x, "
                           "expected %#x", (unsigned long long)id,
                           (unsigned long long)k, (unsigned long long)length,
                           got[k], payload_byte(id, k));
}

/* Peeks the oldest record, asserts that it is record `id` (the tag) with
 * `length` payload bytes, checks the payload and releases the record.
 * Returns whether the payload straddled the end of the data area. */
static bool expect_record(struct test_ring *t, uint64_t id, uint32_t length)
{
    struct moe_ring_record record;
    int rc = moe_ring_peek(&t->consumer, &record);
    cr_assert_eq(rc, 0, "record %llu: peek returned %d (%s)",
                 (unsigned long long)id, rc, moe_error_message());
    cr_assert_eq(record.tag, (uint32_t)id, "record %llu: tag is %u",
                 (unsigned long long)id, record.tag);
    cr_assert_eq(record.length, length, "record %llu: length is %u, expected %u",
                 (unsigned long long)id, record.length, length);
    cr_assert_eq(record.part1_bytes + record.part2_bytes, length,
                 "record %llu: parts of %u + %u bytes for a length of %u",
                 (unsigned long long)id, record.part1_bytes,
                 record.part2_bytes, length);

    uint8_t *got = malloc(length + 1);
    cr_assert_not_null(got);
    moe_ring_copy_payload(&record, got);
    expect_payload(got, id, length);
    free(got);

    moe_ring_release(&t->consumer, &record);
    return record.part2_bytes > 0;
}

/* Payload length of record `id` in a ring whose max payload is
 * `max_payload`: mostly a hash below 1500 bytes, every 7th record empty and
 * every 101st as large as the ring allows. */
static uint32_t record_length(uint64_t id, uint32_t max_payload)
{
    if (id % 7 == 0)
        return 0;
    if (id % 101 == 0)
        return max_payload;
    uint32_t length = (uint32_t)((id * 2654435761ULL >> 7) % 1500);
    return length < max_payload ? length : max_payload;
}

/* Pushes `records` records through the ring, sending until it is full and
 * then receiving a burst of 1 to 5, so that the fill level keeps changing.
 * Returns the number of records whose payload straddled the end of the data
 * area. Sets *wrapped when the head index passed 2^64, and *ring_bytes to
 * the bytes all records took in the ring. */
static uint64_t stream_records(struct test_ring *t, uint64_t records,
                               bool *wrapped, uint64_t *ring_bytes)
{
    uint32_t max_payload = moe_ring_max_payload(t->capacity);
    uint8_t *buf = malloc(max_payload);
    cr_assert_not_null(buf);
    uint64_t sent = 0, received = 0, straddled = 0;
    *wrapped = false;
    *ring_bytes = 0;

    while (received < records) {
        while (sent < records) {
            uint32_t length = record_length(sent, max_payload);
            fill_payload(buf, sent, length);
            uint64_t head_before = atomic_load(&ring_shared(t)->head);
            int rc = moe_ring_try_send(&t->producer, (uint32_t)sent, buf, length);
            if (rc == -EAGAIN)
                break;
            cr_assert_eq(rc, 0, "record %llu of %u bytes: try_send returned "
                         "%d (%s)", (unsigned long long)sent, length, rc,
                         moe_error_message());
            uint64_t head_after = atomic_load(&ring_shared(t)->head);
            cr_assert_eq(head_after - head_before, moe_ring_record_bytes(length),
                         "record %llu: head moved by %llu bytes",
                         (unsigned long long)sent,
                         (unsigned long long)(head_after - head_before));
            if (head_after < head_before)
                *wrapped = true;
            *ring_bytes += moe_ring_record_bytes(length);
            sent++;
        }
        cr_assert_gt(sent, received, "the empty ring rejected record %llu of "
                     "%u bytes", (unsigned long long)sent,
                     record_length(sent, max_payload));

        uint64_t burst = 1 + received % 5;
        for (; burst > 0 && received < sent; burst--, received++)
            straddled += expect_record(t, received,
                                       record_length(received, max_payload));
    }

    struct moe_ring_record record;
    cr_assert_eq(moe_ring_peek(&t->consumer, &record), -EAGAIN,
                 "the ring is not empty after the last record");
    free(buf);
    return straddled;
}

Test(ring, fifo_order, .timeout = TEST_TIMEOUT_S)
{
    struct test_ring t;
    ring_open(&t, 4096, 0);
    bool wrapped;
    uint64_t ring_bytes;

    uint64_t straddled = stream_records(&t, 20000, &wrapped, &ring_bytes);

    cr_expect_gt(straddled, 0, "no payload straddled the end of the data area");
    cr_expect_eq(atomic_load(&ring_shared(&t)->head), ring_bytes);
    cr_expect_eq(atomic_load(&ring_shared(&t)->tail), ring_bytes);
    ring_close(&t);
}

Test(ring, index_wrap, .timeout = TEST_TIMEOUT_S)
{
    /* 2^64 - 8192: the indices pass 2^64 after 8 KiB, early in the run. */
    const uint64_t start = UINT64_MAX - 8 * 1024 + 1;
    struct test_ring t;
    ring_open(&t, 1024, start);
    bool wrapped;
    uint64_t ring_bytes;

    uint64_t straddled = stream_records(&t, 5000, &wrapped, &ring_bytes);

    cr_expect(wrapped, "the head index never passed 2^64");
    uint64_t head = atomic_load(&ring_shared(&t)->head);
    cr_expect_lt(head, start, "head %llu did not wrap", (unsigned long long)head);
    cr_expect_eq(head, start + ring_bytes, "head %llu, expected %llu",
                 (unsigned long long)head,
                 (unsigned long long)(start + ring_bytes));
    cr_expect_eq(atomic_load(&ring_shared(&t)->tail), head);
    cr_expect_gt(straddled, 0, "no payload straddled the end of the data area");
    ring_close(&t);
}

Test(ring, payload_straddles_end, .timeout = TEST_TIMEOUT_S)
{
    /* Capacity 256, max payload 248. Offsets below are data-area offsets. */
    struct test_ring t;
    ring_open(&t, 256, 0);
    uint8_t buf[256];
    struct moe_ring_record record;

    /* Record 0 takes bytes 0..207, so the next header starts at 208. */
    fill_payload(buf, 0, 200);
    cr_assert_eq(moe_ring_try_send(&t.producer, 0, buf, 200), 0);
    cr_assert_not(expect_record(&t, 0, 200));

    /* Record 1: header at 208, payload 216..255 then 0..59. */
    fill_payload(buf, 1, 100);
    cr_assert_eq(moe_ring_try_send(&t.producer, 1, buf, 100), 0);
    cr_assert_eq(moe_ring_peek(&t.consumer, &record), 0, "%s", moe_error_message());
    cr_expect_eq(record.part1, t.consumer.data + 216);
    cr_expect_eq(record.part1_bytes, 40);
    cr_expect_eq(record.part2, t.consumer.data);
    cr_expect_eq(record.part2_bytes, 60);
    cr_assert(expect_record(&t, 1, 100));

    /* Record 2 (176 bytes, 184 in the ring) moves the next header to 248. */
    fill_payload(buf, 2, 176);
    cr_assert_eq(moe_ring_try_send(&t.producer, 2, buf, 176), 0);
    cr_assert_not(expect_record(&t, 2, 176));

    /* Record 3: header at 248..255, payload starts at offset 0 in one part. */
    fill_payload(buf, 3, 50);
    cr_assert_eq(moe_ring_try_send(&t.producer, 3, buf, 50), 0);
    cr_assert_eq(moe_ring_peek(&t.consumer, &record), 0, "%s", moe_error_message());
    cr_expect_eq(record.part1, t.consumer.data);
    cr_expect_eq(record.part1_bytes, 50);
    cr_expect_eq(record.part2_bytes, 0);
    cr_assert_not(expect_record(&t, 3, 50));

    /* Record 4 starts at 56 and its payload ends exactly at 256. */
    fill_payload(buf, 4, 192);
    cr_assert_eq(moe_ring_try_send(&t.producer, 4, buf, 192), 0);
    cr_assert_eq(moe_ring_peek(&t.consumer, &record), 0, "%s", moe_error_message());
    cr_expect_eq(record.part1, t.consumer.data + 64);
    cr_expect_eq(record.part1_bytes, 192);
    cr_expect_eq(record.part2_bytes, 0);
    cr_assert_not(expect_record(&t, 4, 192));
    ring_close(&t);
}

Test(ring, full_and_empty, .timeout = TEST_TIMEOUT_S)
{
    struct test_ring t;
    ring_open(&t, 256, 0);
    uint8_t buf[256];
    struct moe_ring_record record;

    cr_assert_eq(moe_ring_peek(&t.consumer, &record), -EAGAIN,
                 "a new ring is not empty");

    /* 24-byte payloads take 32 bytes each: exactly 8 fit in 256. */
    for (uint64_t id = 0; id < 8; id++) {
        fill_payload(buf, id, 24);
        cr_assert_eq(moe_ring_try_send(&t.producer, (uint32_t)id, buf, 24), 0,
                     "record %llu did not fit", (unsigned long long)id);
    }
    fill_payload(buf, 8, 24);
    cr_expect_eq(moe_ring_try_send(&t.producer, 8, buf, 24), -EAGAIN);
    cr_expect_eq(moe_ring_try_send(&t.producer, 8, buf, 0), -EAGAIN,
                 "an empty record still needs room for its header");
    cr_expect_eq(moe_ring_write_some(&t.producer, 8, buf, 100, 0), 0);
    cr_expect_eq(moe_ring_write_some(&t.producer, 8, buf, 1, 0), 0);

    /* Releasing one record makes room for exactly one more. */
    cr_assert_not(expect_record(&t, 0, 24));
    cr_assert_eq(moe_ring_try_send(&t.producer, 8, buf, 24), 0);
    cr_expect_eq(moe_ring_try_send(&t.producer, 9, buf, 0), -EAGAIN);
    for (uint64_t id = 1; id <= 8; id++)
        expect_record(&t, id, 24);
    cr_expect_eq(moe_ring_peek(&t.consumer, &record), -EAGAIN);

    /* A max-payload record fills the whole ring on its own. */
    uint32_t max_payload = moe_ring_max_payload(256);
    cr_assert_eq(max_payload, 248);
    fill_payload(buf, 10, max_payload);
    cr_assert_eq(moe_ring_try_send(&t.producer, 10, buf, max_payload), 0,
                 "%s", moe_error_message());
    cr_expect_eq(moe_ring_try_send(&t.producer, 11, buf, 0), -EAGAIN);
    cr_expect_eq(moe_ring_write_some(&t.producer, 11, buf, 8, 0), 0);
    expect_record(&t, 10, max_payload);
    cr_expect_eq(moe_ring_peek(&t.consumer, &record), -EAGAIN);
    ring_close(&t);
}

Test(ring, write_some_chunks, .timeout = TEST_TIMEOUT_S)
{
    /* A 100 KiB message goes through a 4 KiB ring in chunks of at most
     * 1000 bytes, as moe_alltoallv sends it, and is reassembled intact. */
    enum { MESSAGE_BYTES = 100 * 1024 + 13, MAX_CHUNK = 1000 };
    struct test_ring t;
    ring_open(&t, 4096, 0);
    uint8_t *message = malloc(MESSAGE_BYTES);
    uint8_t *reassembled = malloc(MESSAGE_BYTES);
    cr_assert(message && reassembled);
    fill_payload(message, 42, MESSAGE_BYTES);

    cr_expect_eq(moe_ring_write_some(&t.producer, 1, message, 0, 0), 0,
                 "an empty message wrote a record");
    uint64_t sent = 0, received = 0, records = 0;
    while (received < MESSAGE_BYTES) {
        int64_t n = moe_ring_write_some(&t.producer, 1, message + sent,
                                        MESSAGE_BYTES - sent, MAX_CHUNK);
        cr_assert_geq(n, 0, "write_some failed: %s", moe_error_message());
        cr_assert_leq(n, MAX_CHUNK, "a chunk of %lld bytes exceeds the cap",
                      (long long)n);
        sent += (uint64_t)n;

        /* Drain one record in two of three rounds, so the ring fills up. */
        struct moe_ring_record record;
        if (records % 3 == 2 || moe_ring_peek(&t.consumer, &record) != 0) {
            records++;
            continue;
        }
        cr_assert_eq(record.tag, 1);
        cr_assert_leq(received + record.length, sent);
        moe_ring_copy_payload(&record, reassembled + received);
        moe_ring_release(&t.consumer, &record);
        received += record.length;
        records++;
    }
    cr_expect_eq(sent, MESSAGE_BYTES);
    expect_payload(reassembled, 42, MESSAGE_BYTES);

    /* Without a cap, one record carries as much as the empty ring holds. */
    int64_t n = moe_ring_write_some(&t.producer, 2, message, MESSAGE_BYTES, 0);
    cr_expect_eq(n, moe_ring_max_payload(4096));
    cr_expect_eq(moe_ring_write_some(&t.producer, 2, message, MESSAGE_BYTES, 0), 0,
                 "a full ring accepted more bytes");
    free(message);
    free(reassembled);
    ring_close(&t);
}

Test(ring, oversize_record, .timeout = TEST_TIMEOUT_S)
{
    struct test_ring t;
    ring_open(&t, 256, 0);
    uint8_t buf[512] = {0};
    struct moe_ring_record record;

    moe_error_clear();
    cr_expect_eq(moe_ring_try_send(&t.producer, 0, buf, 249), -EINVAL);
    cr_expect(strstr(moe_error_message(), "249") != NULL,
              "the message does not name the length: \"%s\"",
              moe_error_message());
    cr_expect_eq(moe_ring_try_send(&t.producer, 0, buf, UINT32_MAX), -EINVAL);
    cr_expect_eq(moe_ring_peek(&t.consumer, &record), -EAGAIN,
                 "a rejected record reached the ring");

    /* A record that can never fit is -EINVAL even while the ring has data. */
    cr_assert_eq(moe_ring_try_send(&t.producer, 0, buf, 8), 0);
    cr_expect_eq(moe_ring_try_send(&t.producer, 1, buf, 300), -EINVAL);
    ring_close(&t);
}

/* Encodes a record header as the producer writes it. */
static void make_header(uint8_t header[MOE_RING_RECORD_HEADER_BYTES],
                        uint32_t length, uint32_t tag)
{
    memcpy(header, &length, 4);
    memcpy(header + 4, &tag, 4);
}

Test(ring, decode_header, .timeout = TEST_TIMEOUT_S)
{
    uint8_t header[MOE_RING_RECORD_HEADER_BYTES];
    uint32_t length = 0, tag = 0;

    make_header(header, 100, 77);
    cr_expect_eq(moe_ring_decode_header(header, 112, 256, &length, &tag), 0,
                 "%s", moe_error_message());
    cr_expect_eq(length, 100);
    cr_expect_eq(tag, 77);

    /* Longer than the ring can ever hold: max payload is 248 for 256. */
    make_header(header, 249, 1);
    cr_expect_eq(moe_ring_decode_header(header, 256, 256, &length, &tag), -EPROTO);
    make_header(header, 300, 1);
    cr_expect_eq(moe_ring_decode_header(header, 256, 256, &length, &tag), -EPROTO);
    make_header(header, UINT32_MAX, 1);
    cr_expect_eq(moe_ring_decode_header(header, 256, 256, &length, &tag), -EPROTO);

    /* Within the ring but past what the producer has published. */
    make_header(header, 100, 1);
    cr_expect_eq(moe_ring_decode_header(header, 104, 256, &length, &tag), -EPROTO);
    cr_expect(strstr(moe_error_message(), "published") != NULL,
              "the message does not mention the published bytes: \"%s\"",
              moe_error_message());
    make_header(header, 248, 1);
    cr_expect_eq(moe_ring_decode_header(header, 256, 256, &length, &tag), 0);
    cr_expect_eq(moe_ring_decode_header(header, 248, 256, &length, &tag), -EPROTO);

    /* A published byte count the producer cannot have written. */
    make_header(header, 0, 1);
    cr_expect_eq(moe_ring_decode_header(header, 8, 256, &length, &tag), 0);
    cr_expect_eq(moe_ring_decode_header(header, 100, 256, &length, &tag), -EPROTO);
    cr_expect_eq(moe_ring_decode_header(header, 264, 256, &length, &tag), -EPROTO);
}

Test(ring, corrupt_header, .timeout = TEST_TIMEOUT_S)
{
    struct test_ring t;
    ring_open(&t, 256, 0);
    uint8_t buf[64];
    struct moe_ring_record record;

    /* Move the records away from offset 0 first. */
    fill_payload(buf, 0, 40);
    cr_assert_eq(moe_ring_try_send(&t.producer, 0, buf, 40), 0);
    expect_record(&t, 0, 40);

    /* Record 1 (16 bytes, 24 in the ring) has its header at offset 48. */
    fill_payload(buf, 1, 16);
    cr_assert_eq(moe_ring_try_send(&t.producer, 1, buf, 16), 0);
    uint8_t *header = t.consumer.data + 48;
    uint64_t tail = t.consumer.tail;

    make_header(header, 0xfffffff0u, 1);
    cr_expect_eq(moe_ring_peek(&t.consumer, &record), -EPROTO,
                 "peek accepted a length beyond the ring");
    make_header(header, 40, 1);
    cr_expect_eq(moe_ring_peek(&t.consumer, &record), -EPROTO,
                 "peek accepted a length beyond the published bytes");
    cr_expect_eq(t.consumer.tail, tail, "a failed peek moved the tail");

    /* With the header restored, the record reads back intact. */
    make_header(header, 16, 1);
    expect_record(&t, 1, 16);

    /* A head index more than a capacity ahead of the tail. */
    fill_payload(buf, 2, 8);
    cr_assert_eq(moe_ring_try_send(&t.producer, 2, buf, 8), 0);
    atomic_store(&ring_shared(&t)->head, t.consumer.tail + 256 + 8);
    t.consumer.head_cache = t.consumer.tail;
    cr_expect_eq(moe_ring_peek(&t.consumer, &record), -EPROTO,
                 "peek accepted a head beyond the capacity");
    cr_expect(strstr(moe_error_message(), "head index") != NULL,
              "the message does not name the head index: \"%s\"",
              moe_error_message());

    /* A head behind the tail, and a head that is not a multiple of 8. */
    atomic_store(&ring_shared(&t)->head, t.consumer.tail - 8);
    cr_expect_eq(moe_ring_peek(&t.consumer, &record), -EPROTO,
                 "peek accepted a head behind the tail");
    atomic_store(&ring_shared(&t)->head, t.consumer.tail + 12);
    cr_expect_eq(moe_ring_peek(&t.consumer, &record), -EPROTO,
                 "peek accepted a head that is not a multiple of 8");
    cr_expect_eq(t.consumer.head_cache, t.consumer.tail,
                 "a rejected head was cached");
    ring_close(&t);
}

Test(ring, corrupt_tail_index, .timeout = TEST_TIMEOUT_S)
{
    /* The consumer publishes tail, so the producer validates every tail it
     * loads: at most a capacity behind head, never ahead, a multiple of 8. */
    const uint64_t head = 1000 + 256; /* after the record that fills it */
    const uint64_t bad_tails[] = {
        head + 8,       /* ahead of head */
        head - 256 - 8, /* more than a capacity behind */
        head - 4,       /* not a multiple of 8 */
        UINT64_MAX - 7, /* 1264 bytes behind head across the 2^64 wrap */
    };
    uint8_t buf[256] = {0};
    for (size_t i = 0; i < sizeof bad_tails / sizeof bad_tails[0]; i++) {
        struct test_ring t;
        ring_open(&t, 256, 1000);
        /* Fill the ring, so that the next write must reload tail. */
        cr_assert_eq(moe_ring_try_send(&t.producer, 0, buf, 248), 0);
        atomic_store(&ring_shared(&t)->tail, bad_tails[i]);

        moe_error_clear();
        cr_expect_eq(moe_ring_try_send(&t.producer, 1, buf, 8), -EPROTO,
                     "try_send accepted tail %llu", (unsigned long long)bad_tails[i]);
        cr_expect(strstr(moe_error_message(), "tail index") != NULL,
                  "the message does not name the tail index: \"%s\"",
                  moe_error_message());
        cr_expect_eq(moe_ring_write_some(&t.producer, 1, buf, 100, 0), -EPROTO,
                     "write_some accepted tail %llu",
                     (unsigned long long)bad_tails[i]);
        cr_expect_eq(atomic_load(&ring_shared(&t)->head), head,
                     "a write went ahead with tail %llu",
                     (unsigned long long)bad_tails[i]);

        struct moe_ring_producer producer;
        cr_expect_eq(moe_ring_producer_attach(&producer, t.memory, 256), -EPROTO,
                     "attach accepted tail %llu", (unsigned long long)bad_tails[i]);
        ring_close(&t);
    }
}

Test(ring, init_and_attach_checks, .timeout = TEST_TIMEOUT_S)
{
    struct test_ring t;
    ring_open(&t, 256, 0);
    struct moe_ring_producer producer;
    struct moe_ring_consumer consumer;

    cr_expect_eq(moe_ring_init(t.memory, 100, 0), -EINVAL, "not a power of two");
    cr_expect_eq(moe_ring_init(t.memory, 32, 0), -EINVAL, "below the minimum");
    cr_expect_eq(moe_ring_init(t.memory, 1ULL << 32, 0), -EINVAL, "above 2^31");
    cr_expect_eq(moe_ring_init(t.memory, 256, 4), -EINVAL,
                 "start index not a multiple of 8");

    cr_expect_eq(moe_ring_producer_attach(&producer, t.memory, 512), -EPROTO);
    cr_expect(strstr(moe_error_message(), "capacity") != NULL,
              "the message does not name the capacity: \"%s\"",
              moe_error_message());
    cr_expect_eq(moe_ring_consumer_attach(&consumer, t.memory, 128), -EPROTO);

    ring_shared(&t)->magic ^= 1;
    cr_expect_eq(moe_ring_producer_attach(&producer, t.memory, 256), -EPROTO);
    cr_expect(strstr(moe_error_message(), "magic") != NULL,
              "the message does not name the magic: \"%s\"",
              moe_error_message());
    cr_expect_eq(moe_ring_consumer_attach(&consumer, t.memory, 256), -EPROTO);

    ring_shared(&t)->magic ^= 1;
    cr_expect_eq(moe_ring_producer_attach(&producer, t.memory, 256), 0);
    cr_expect_eq(moe_ring_consumer_attach(&consumer, t.memory, 256), 0);
    ring_close(&t);
}

/* The default ring size keeps the R * R rings within 256 MiB and never goes
 * below 64 KiB. */
Test(ring, default_capacity_by_ranks)
{
    cr_assert_eq(moe_ring_default_capacity(1), 1u << 20);
    cr_assert_eq(moe_ring_default_capacity(16), 1u << 20);
    cr_assert_eq(moe_ring_default_capacity(17), 512u << 10);
    cr_assert_eq(moe_ring_default_capacity(64), 64u << 10);
    for (int ranks = 1; ranks <= 64; ranks++) {
        uint64_t capacity = moe_ring_default_capacity(ranks);
        cr_assert(moe_ring_capacity_valid(capacity));
        cr_assert_leq((uint64_t)ranks * ranks * capacity, 256ULL << 20);
    }
}
