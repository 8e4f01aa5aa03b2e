/*
 * ring.c - the lock-free SPSC record ring; see moe_ring.h for the contract.
 *
 * Used by every rank process: as producer on its R outgoing rings and as
 * consumer on its R incoming rings. Owns nothing beyond the ring memory the
 * caller hands it; does not wait, sleep or allocate.
 */
#include "moe_ring.h"
#include "moe_error.h"

#include <errno.h>
#include <string.h>

#define RING_MAGIC 0x474e495245454f4dULL /* "MOEERING" read as bytes */

uint64_t moe_ring_default_capacity(int ranks)
{
    uint64_t capacity = 1ULL << 20;
    uint64_t pairs = (uint64_t)ranks * (uint64_t)ranks;
    while (capacity > (64u << 10) && pairs * capacity > (256ULL << 20))
        capacity >>= 1;
    return capacity;
}

uint64_t moe_ring_footprint(uint64_t capacity)
{
    return sizeof(struct moe_ring) + capacity;
}

int moe_ring_capacity_valid(uint64_t capacity)
{
    return capacity >= MOE_RING_MIN_CAPACITY && capacity <= (1ULL << 31) &&
           (capacity & (capacity - 1)) == 0;
}

uint32_t moe_ring_max_payload(uint64_t capacity)
{
    return (uint32_t)(capacity - MOE_RING_RECORD_HEADER_BYTES);
}

int moe_ring_init(void *memory, uint64_t capacity, uint64_t start_index)
{
    if (!moe_ring_capacity_valid(capacity))
        return moe_fail(-EINVAL, "invalid ring capacity %llu: expected a power "
                        "of two from %d to 2^31 bytes",
                        (unsigned long long)capacity, MOE_RING_MIN_CAPACITY);
    if (start_index % 8 != 0)
        return moe_fail(-EINVAL, "invalid ring start index %llu: expected a "
                        "multiple of 8", (unsigned long long)start_index);
    struct moe_ring *ring = memory;
    ring->capacity = capacity;
    ring->magic = RING_MAGIC;
    atomic_store_explicit(&ring->head, start_index, memory_order_relaxed);
    atomic_store_explicit(&ring->tail, start_index, memory_order_relaxed);
    return 0;
}

static int check_ring(const struct moe_ring *ring, uint64_t capacity)
{
    if (ring->magic != RING_MAGIC)
        return moe_fail(-EPROTO, "ring has magic %#llx, expected %#llx",
                        (unsigned long long)ring->magic, RING_MAGIC);
    if (ring->capacity != capacity)
        return moe_fail(-EPROTO, "ring has capacity %llu, expected %llu",
                        (unsigned long long)ring->capacity,
                        (unsigned long long)capacity);
    return 0;
}

/* Checks a pair of free-running indices read from the ring: both multiples
 * of 8, and head at most a capacity ahead of tail. Unsigned subtraction
 * makes a tail ahead of head look like more than a capacity, so one
 * comparison covers both. `which` names the index that was just read. */
static int check_indices(uint64_t head, uint64_t tail, uint64_t capacity,
                         const char *which)
{
    if (head % 8 != 0 || tail % 8 != 0)
        return moe_fail(-EPROTO, "ring %s index is invalid: head %llu and tail "
                        "%llu must be multiples of 8", which,
                        (unsigned long long)head, (unsigned long long)tail);
    if (head - tail > capacity)
        return moe_fail(-EPROTO, "ring %s index is invalid: head %llu is %s "
                        "tail %llu by more than the capacity of %llu bytes",
                        which, (unsigned long long)head,
                        tail - head < head - tail ? "behind" : "ahead of",
                        (unsigned long long)tail, (unsigned long long)capacity);
    return 0;
}

int moe_ring_producer_attach(struct moe_ring_producer *producer, void *memory,
                             uint64_t capacity)
{
    struct moe_ring *ring = memory;
    int rc = check_ring(ring, capacity);
    if (rc)
        return rc;
    producer->ring = ring;
    producer->data = (uint8_t *)memory + sizeof(struct moe_ring);
    producer->capacity = capacity;
    /* Only this process writes head, so a relaxed load sees its own value. */
    producer->head = atomic_load_explicit(&ring->head, memory_order_relaxed);
    producer->tail_cache = atomic_load_explicit(&ring->tail, memory_order_acquire);
    return check_indices(producer->head, producer->tail_cache, capacity, "tail");
}

int moe_ring_consumer_attach(struct moe_ring_consumer *consumer, void *memory,
                             uint64_t capacity)
{
    struct moe_ring *ring = memory;
    int rc = check_ring(ring, capacity);
    if (rc)
        return rc;
    consumer->ring = ring;
    consumer->data = (uint8_t *)memory + sizeof(struct moe_ring);
    consumer->capacity = capacity;
    consumer->tail = atomic_load_explicit(&ring->tail, memory_order_relaxed);
    consumer->head_cache = atomic_load_explicit(&ring->head, memory_order_acquire);
    return check_indices(consumer->head_cache, consumer->tail, capacity, "head");
}

/* Copies n bytes into the data area starting at free-running index `at`,
 * in two parts when they wrap past the end. */
static void copy_in(uint8_t *data, uint64_t capacity, uint64_t at,
                    const void *src, uint64_t n)
{
    uint64_t offset = at & (capacity - 1);
    uint64_t first = capacity - offset < n ? capacity - offset : n;
    memcpy(data + offset, src, first);
    if (first < n)
        memcpy(data, (const uint8_t *)src + first, n - first);
}

/* Sets *free_now to the free bytes by the producer's cached tail. It
 * reloads tail only when the cached value leaves fewer than `wanted` bytes
 * free, and validates every tail it loads, because the consumer writes it.
 * Returns 0 or -EPROTO. */
static int free_bytes(struct moe_ring_producer *p, uint64_t wanted,
                      uint64_t *free_now)
{
    *free_now = p->capacity - (p->head - p->tail_cache);
    if (*free_now >= wanted)
        return 0;
    /* Acquire pairs with the consumer's release store of tail in
     * moe_ring_release(): the bytes below tail are no longer read. */
    uint64_t tail = atomic_load_explicit(&p->ring->tail, memory_order_acquire);
    int rc = check_indices(p->head, tail, p->capacity, "tail");
    if (rc)
        return rc;
    p->tail_cache = tail;
    *free_now = p->capacity - (p->head - tail);
    return 0;
}

static void publish_record(struct moe_ring_producer *p, uint32_t tag,
                           const void *src, uint32_t length)
{
    uint8_t header[MOE_RING_RECORD_HEADER_BYTES];
    memcpy(header, &length, 4);
    memcpy(header + 4, &tag, 4);
    copy_in(p->data, p->capacity, p->head, header, sizeof header);
    copy_in(p->data, p->capacity, p->head + sizeof header, src, length);
    p->head += moe_ring_record_bytes(length);
    /* Release publishes the header and payload written above; pairs with the
     * consumer's acquire load of head in moe_ring_peek(). */
    atomic_store_explicit(&p->ring->head, p->head, memory_order_release);
}

int64_t moe_ring_write_some(struct moe_ring_producer *producer, uint32_t tag,
                            const void *src, uint64_t length,
                            uint32_t max_chunk)
{
    if (length == 0)
        return 0;
    uint64_t want = length;
    if (max_chunk != 0 && want > max_chunk)
        want = max_chunk;
    if (want > moe_ring_max_payload(producer->capacity))
        want = moe_ring_max_payload(producer->capacity);

    uint64_t room;
    int rc = free_bytes(producer, moe_ring_record_bytes(want), &room);
    if (rc)
        return rc;
    if (room <= MOE_RING_RECORD_HEADER_BYTES)
        return 0;
    /* room is a multiple of 8, so a payload of room - 8 bytes pads to at
     * most room. */
    uint64_t n = room - MOE_RING_RECORD_HEADER_BYTES;
    if (n > want)
        n = want;
    /* Avoid a trickle of tiny records when the ring is nearly full and more
     * than this is left to send; wait for the consumer instead. */
    if (n < want && n < 256)
        return 0;
    publish_record(producer, tag, src, (uint32_t)n);
    return (int64_t)n;
}

int moe_ring_try_send(struct moe_ring_producer *producer, uint32_t tag,
                      const void *payload, uint32_t length)
{
    if (length > moe_ring_max_payload(producer->capacity))
        return moe_fail(-EINVAL, "record of %u bytes exceeds the ring's "
                        "largest payload of %u bytes", length,
                        moe_ring_max_payload(producer->capacity));
    uint64_t room;
    int rc = free_bytes(producer, moe_ring_record_bytes(length), &room);
    if (rc)
        return rc;
    if (room < moe_ring_record_bytes(length))
        return -EAGAIN;
    publish_record(producer, tag, payload, length);
    return 0;
}

int moe_ring_decode_header(const uint8_t header[MOE_RING_RECORD_HEADER_BYTES],
                           uint64_t available, uint64_t capacity,
                           uint32_t *length, uint32_t *tag)
{
    memcpy(length, header, 4);
    memcpy(tag, header + 4, 4);
    if (available > capacity || available % 8 != 0)
        return moe_fail(-EPROTO, "ring holds %llu bytes, which is not a "
                        "multiple of 8 within the capacity of %llu",
                        (unsigned long long)available,
                        (unsigned long long)capacity);
    if (*length > moe_ring_max_payload(capacity))
        return moe_fail(-EPROTO, "record length %u exceeds the ring's largest "
                        "payload of %u bytes", *length,
                        moe_ring_max_payload(capacity));
    if (moe_ring_record_bytes(*length) > available)
        return moe_fail(-EPROTO, "record length %u runs past the %llu bytes "
                        "the producer has published", *length,
                        (unsigned long long)available);
    return 0;
}

int moe_ring_peek(struct moe_ring_consumer *consumer,
                  struct moe_ring_record *record)
{
    struct moe_ring_consumer *c = consumer;
    if (c->head_cache == c->tail) {
        /* Acquire pairs with the producer's release store of head in
         * publish_record(): the record bytes below head are visible. */
        uint64_t head = atomic_load_explicit(&c->ring->head, memory_order_acquire);
        if (head == c->tail)
            return -EAGAIN;
        int rc = check_indices(head, c->tail, c->capacity, "head");
        if (rc)
            return rc;
        c->head_cache = head;
    }

    uint64_t available = c->head_cache - c->tail;
    uint64_t offset = c->tail & (c->capacity - 1);
    /* Copy the header out with one load per byte, so that the length that
     * is checked is the length that is used, even if the producer rewrites
     * the header meanwhile. */
    uint8_t header[MOE_RING_RECORD_HEADER_BYTES];
    const volatile uint8_t *shared_header = c->data + offset;
    for (int i = 0; i < MOE_RING_RECORD_HEADER_BYTES; i++)
        header[i] = shared_header[i];
    uint32_t length, tag;
    int rc = moe_ring_decode_header(header, available, c->capacity, &length,
                                    &tag);
    if (rc)
        return rc;

    uint64_t payload_offset = (offset + MOE_RING_RECORD_HEADER_BYTES) & (c->capacity - 1);
    uint64_t until_end = c->capacity - payload_offset;
    record->length = length;
    record->tag = tag;
    record->part1 = c->data + payload_offset;
    record->part1_bytes = length < until_end ? length : (uint32_t)until_end;
    record->part2 = c->data;
    record->part2_bytes = length - record->part1_bytes;
    return 0;
}

void moe_ring_copy_payload(const struct moe_ring_record *record, void *dst)
{
    memcpy(dst, record->part1, record->part1_bytes);
    if (record->part2_bytes)
        memcpy((uint8_t *)dst + record->part1_bytes, record->part2,
               record->part2_bytes);
}

void moe_ring_release(struct moe_ring_consumer *consumer,
                      const struct moe_ring_record *record)
{
    consumer->tail += moe_ring_record_bytes(record->length);
    /* Release orders the payload reads above before the producer may reuse
     * the bytes; pairs with the acquire load of tail in free_bytes(). */
    atomic_store_explicit(&consumer->ring->tail, consumer->tail,
                          memory_order_release);
}
