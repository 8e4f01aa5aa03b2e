/*
 * moe_ring.h - a single-producer, single-consumer byte ring of
 * variable-length records, placed in shared memory.
 *
 * One ring carries the messages of one ordered rank pair (src -> dst). The
 * producer is the only writer of `head` and of the data bytes between tail
 * and head + capacity; the consumer is the only writer of `tail`. There are
 * no locks: each side publishes its index with a release store that the
 * other side reads with an acquire load.
 *
 * Indices run freely as 64-bit byte counts and are never reset. The byte at
 * index i sits at data[i mod capacity]; the ring holds head - tail bytes,
 * computed with unsigned wrap-around, so the indices may pass 2^64.
 *
 * Record layout: an 8-byte header {uint32 length, uint32 tag} followed by
 * `length` payload bytes, padded to a multiple of 8. Capacity is a power of
 * two and at least 64, so a header never straddles the end of the data area
 * while a payload may (it is then copied in two parts).
 *
 * The ring never blocks. Waiting belongs to the caller (see moe_shm.h),
 * which keeps the rule "spin briefly, then sleep, with a deadline" in one
 * place.
 */
#ifndef MOE_RING_H
#define MOE_RING_H

#include <assert.h>
#include <stdalign.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define MOE_CACHE_LINE 64
#define MOE_RING_RECORD_HEADER_BYTES 8
#define MOE_RING_MIN_CAPACITY 64

/* The shared part of a ring. The data area follows the struct directly. */
struct moe_ring {
    /* Producer's line: bytes ever written. Release-stored by the producer
     * after the record bytes; pairs with the consumer's acquire load. */
    alignas(MOE_CACHE_LINE) _Atomic uint64_t head;
    /* Consumer's line: bytes ever consumed. Release-stored by the consumer
     * after it has copied a record out; pairs with the producer's acquire
     * load, so the producer never overwrites bytes still being read. */
    alignas(MOE_CACHE_LINE) _Atomic uint64_t tail;
    /* Read-only after init. */
    alignas(MOE_CACHE_LINE) uint64_t capacity;
    uint64_t magic;
};

static_assert(offsetof(struct moe_ring, tail) - offsetof(struct moe_ring, head)
                  >= MOE_CACHE_LINE,
              "head and tail must sit on separate cache lines");
static_assert(offsetof(struct moe_ring, capacity) - offsetof(struct moe_ring, tail)
                  >= MOE_CACHE_LINE,
              "tail and the read-only fields must sit on separate cache lines");
static_assert(sizeof(struct moe_ring) % MOE_CACHE_LINE == 0,
              "the data area must start on a cache line");

/* Process-local view of the producer side. `tail_cache` is the last tail the
 * producer saw, so it reads the consumer's line only when it looks full. */
struct moe_ring_producer {
    struct moe_ring *ring;
    uint8_t *data;
    uint64_t capacity;
    uint64_t head;
    uint64_t tail_cache;
};

/* Process-local view of the consumer side, with the last head it saw. */
struct moe_ring_consumer {
    struct moe_ring *ring;
    uint8_t *data;
    uint64_t capacity;
    uint64_t tail;
    uint64_t head_cache;
};

/* One record as seen by the consumer, valid until moe_ring_release(). The
 * payload is in one or two parts: the second is non-empty only when the
 * payload wraps past the end of the data area. */
struct moe_ring_record {
    uint32_t length;
    uint32_t tag;
    const uint8_t *part1;
    uint32_t part1_bytes;
    const uint8_t *part2;
    uint32_t part2_bytes;
};

/* Default ring capacity for R ranks: 1 MiB, halved until the R * R rings
 * take at most 256 MiB together, and never below 64 KiB (the size at
 * R = 64). Large rings let a big message stream without the producer
 * waiting on the consumer after every chunk. */
uint64_t moe_ring_default_capacity(int ranks);

/* Bytes one ring with `capacity` data bytes takes in the segment. */
uint64_t moe_ring_footprint(uint64_t capacity);

/* Returns whether `capacity` is a valid ring capacity: a power of two, at
 * least MOE_RING_MIN_CAPACITY and at most 2^31. */
int moe_ring_capacity_valid(uint64_t capacity);

/* Initialises a ring at `memory` (moe_ring_footprint bytes, 64-byte
 * aligned) with both indices at `start_index`. Tests start near 2^64 to
 * check the wrap rule. Returns 0 or -EINVAL. */
int moe_ring_init(void *memory, uint64_t capacity, uint64_t start_index);

/* Attach the two sides. Each checks the ring's magic, that its capacity
 * equals `capacity`, and that head and tail are multiples of 8 with head at
 * most a capacity ahead of tail. Returns 0 or -EPROTO. */
int moe_ring_producer_attach(struct moe_ring_producer *producer, void *memory,
                             uint64_t capacity);
int moe_ring_consumer_attach(struct moe_ring_consumer *consumer, void *memory,
                             uint64_t capacity);

/* Largest payload one record can carry in this ring. */
uint32_t moe_ring_max_payload(uint64_t capacity);

/* Writes one record with the first n bytes of src, where n is the most that
 * fits now, capped at `length` and at `max_chunk` (0 means no cap). Returns
 * n, or 0 when the ring has no room, when length is 0, or when fewer than
 * 256 bytes fit while more is left to send. The last rule keeps a nearly
 * full ring from filling with tiny records. Returns -EPROTO when the tail
 * index the consumer published is invalid (see the attach checks). Never
 * blocks. */
int64_t moe_ring_write_some(struct moe_ring_producer *producer, uint32_t tag,
                            const void *src, uint64_t length,
                            uint32_t max_chunk);

/* Writes the whole record or nothing. Returns 0, -EAGAIN when it does not
 * fit now, -EINVAL when it can never fit, or -EPROTO when the consumer's
 * tail index is invalid. */
int moe_ring_try_send(struct moe_ring_producer *producer, uint32_t tag,
                      const void *payload, uint32_t length);

/* Looks at the oldest record without consuming it. Returns 0, -EAGAIN when
 * the ring is empty, or -EPROTO when the producer's head index is invalid
 * or the header is: a length beyond the largest payload or beyond the bytes
 * the producer has published. Nothing the producer writes can make it read
 * outside the data area. */
int moe_ring_peek(struct moe_ring_consumer *consumer,
                  struct moe_ring_record *record);

/* Copies the payload of a peeked record to dst (record->length bytes). */
void moe_ring_copy_payload(const struct moe_ring_record *record, void *dst);

/* Consumes the record returned by the last moe_ring_peek(). */
void moe_ring_release(struct moe_ring_consumer *consumer,
                      const struct moe_ring_record *record);

/* Decodes and validates a record header, the pure part of moe_ring_peek():
 * `available` is head - tail. Returns 0 or -EPROTO. */
int moe_ring_decode_header(const uint8_t header[MOE_RING_RECORD_HEADER_BYTES],
                           uint64_t available, uint64_t capacity,
                           uint32_t *length, uint32_t *tag);

/* Bytes of the ring a record with `length` payload bytes occupies. */
static inline uint64_t moe_ring_record_bytes(uint64_t length)
{
    return (MOE_RING_RECORD_HEADER_BYTES + length + 7) & ~(uint64_t)7;
}

#endif
