/*
 * moe_shm.h - the shared-memory segment every rank of one run maps, and the
 * doorbells ranks sleep on.
 *
 * Segment layout (all positions are byte offsets from the segment start,
 * never pointers, because each process maps the segment at its own address):
 *
 *   header        struct moe_segment_header, validated by every rank
 *   rank slots    MOE_MAX_RANKS x struct moe_rank_slot at the fixed offset
 *                 MOE_SEGMENT_SLOTS_OFFSET; the first R are used: doorbell,
 *                 current step, stats
 *   rings         R x R rings; ring (src, dst) is at
 *                 rings_offset + (src * R + dst) * ring_stride
 *   app area      app_bytes owned by the program that launched the run
 *
 * Every rank can write anywhere in the segment, so a rank treats what it
 * reads there as untrusted. moe_comm_attach() validates a copy of the
 * header and takes the ring positions from that copy. Ring indices and
 * record headers are validated on every read (moe_ring.h). The slot region
 * has room for MOE_MAX_RANKS slots, so no rank count read from the header
 * can index past it.
 *
 * The segment is created by the launcher (moe_launch.h) and is sized once;
 * nothing in it is resized or freed while ranks run. Of a ring that carries
 * nothing, only the page with its header is touched, so a large R costs
 * address space more than memory.
 */
#ifndef MOE_SHM_H
#define MOE_SHM_H

#include "moe_ring.h"

#include <stdatomic.h>
#include <stdint.h>

#define MOE_SEGMENT_MAGIC 0x4d48535045454f4dULL /* "MOEEPSHM" read as bytes */
#define MOE_SEGMENT_VERSION 2
#define MOE_MAX_RANKS 64
#define MOE_ERROR_TEXT_BYTES 320
/* Offset of the rank slots: the page after the header. */
#define MOE_SEGMENT_SLOTS_OFFSET 4096
/* Maximum time a segment may set for polling before a sleep (spin_ns). */
#define MOE_MAX_SPIN_NS 1000000
/* Maximum timeout a segment may set (timeout_ns): one week. The bound
 * keeps now + timeout far from overflowing int64. */
#define MOE_MAX_TIMEOUT_NS (7LL * 24 * 3600 * 1000000000)

/* The steps of one forward, recorded in each rank's slot so that a timeout
 * or a death can be reported with the step it happened in. */
enum moe_step {
    MOE_STEP_START,
    MOE_STEP_ROUTE,
    MOE_STEP_LAYOUT,
    MOE_STEP_DISPATCH,
    MOE_STEP_COMPUTE,
    MOE_STEP_COMBINE,
    MOE_STEP_DONE,
    MOE_STEP_COUNT
};

/* Reads x with exactly one load, for a value that a peer may rewrite at
 * any time, so the compiler cannot load it again after the check. It
 * orders nothing, so it does not replace an atomic. */
#define MOE_READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))

/* Returns the step's name as used in messages ("dispatch"). */
const char *moe_step_name(int step);

struct moe_segment_header {
    uint64_t magic;
    uint32_t version;
    uint32_t header_bytes;   /* sizeof(struct moe_segment_header) */
    uint64_t segment_bytes;  /* total size, checked against fstat */
    uint32_t ranks;          /* R */
    uint32_t slot_bytes;     /* sizeof(struct moe_rank_slot) */
    uint64_t ring_capacity;  /* data bytes of each ring */
    uint64_t ring_stride;    /* bytes between consecutive rings */
    uint64_t slots_offset;
    uint64_t rings_offset;
    uint64_t app_offset;
    uint64_t app_bytes;
    int64_t launcher_pid;
    int64_t timeout_ns;      /* a wait with no progress for this long fails */
    int64_t spin_ns;         /* how long a waiter polls before it sleeps */

    /* Set to 1 by the launcher or by a failing rank, then every doorbell is
     * rung. Waiters check it after every wake-up. */
    alignas(MOE_CACHE_LINE) _Atomic uint32_t abort_flag;
    /* Ranks that have attached and validated the header. */
    _Atomic uint32_t attached;
};

struct moe_rank_slot {
    /* Futex word, incremented (seq_cst) by every peer that gives this rank
     * something to do: a record in one of its incoming rings, room in one
     * of its outgoing rings, or an abort. */
    alignas(MOE_CACHE_LINE) _Atomic uint32_t doorbell;
    /* Number of waiters about to sleep on the doorbell; a peer calls
     * futex_wake only when it is non-zero. */
    _Atomic uint32_t sleepers;

    /* Written by the owning rank only, read by the launcher. */
    alignas(MOE_CACHE_LINE) _Atomic int32_t step; /* enum moe_step */
    int32_t pid;
    uint64_t step_ns[MOE_STEP_COUNT]; /* time spent in each step */
    uint64_t wait_ns[MOE_STEP_COUNT]; /* of which waiting on peers */
    char error[MOE_ERROR_TEXT_BYTES]; /* why the rank failed, if it did */
};

static_assert(sizeof(struct moe_rank_slot) % MOE_CACHE_LINE == 0,
              "rank slots must not share cache lines");
static_assert(sizeof(struct moe_segment_header) <= MOE_SEGMENT_SLOTS_OFFSET,
              "the header must end before the rank slots");

/* Computes the segment layout for R ranks. Returns 0 or -EINVAL when a size
 * overflows. */
int moe_segment_layout(struct moe_segment_header *header, int ranks,
                       uint64_t ring_capacity, uint64_t app_bytes);

/* Copies the plain fields of a mapped header (not the atomics) into *copy
 * with one read each and validates the copy with moe_segment_validate()
 * against its own size and rank count. A rank keeps the copy, because a
 * peer can rewrite the mapped header at any time. Returns 0 or -EPROTO. */
int moe_segment_snapshot(const struct moe_segment_header *h,
                         struct moe_segment_header *copy);

/* Validates a mapped header against the size of the mapping and the rank
 * count the caller expects: magic, version, struct sizes, every offset
 * recomputed from R, the ring capacity and the app size, a timeout of 1 ns
 * to MOE_MAX_TIMEOUT_NS and a spin time of 0 to MOE_MAX_SPIN_NS. Returns 0 or -EPROTO
 * naming the field. */
int moe_segment_validate(const struct moe_segment_header *header,
                         uint64_t mapped_bytes, int expected_ranks);

/* The slot of `rank`, 0 <= rank < MOE_MAX_RANKS. The offset is a constant,
 * not read from the header, so a peer cannot redirect it. */
static inline struct moe_rank_slot *moe_segment_slot(struct moe_segment_header *h,
                                                     int rank)
{
    return (struct moe_rank_slot *)((uint8_t *)h + MOE_SEGMENT_SLOTS_OFFSET) + rank;
}

static inline void *moe_segment_ring(struct moe_segment_header *h, int src,
                                     int dst)
{
    return (uint8_t *)h + h->rings_offset +
           ((uint64_t)src * h->ranks + (uint64_t)dst) * h->ring_stride;
}

static inline void *moe_segment_app(struct moe_segment_header *h)
{
    return (uint8_t *)h + h->app_offset;
}

/* Tells the CPU that this thread is polling, which saves power and lets a
 * sibling hardware thread run. */
static inline void moe_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Wakes `rank`: bumps its doorbell and, if it may be asleep, wakes it. */
void moe_doorbell_ring(struct moe_segment_header *h, int rank);

/* Sets the abort flag and rings the doorbell of every rank. It rings at
 * most MOE_MAX_RANKS doorbells, even when the header's rank count is
 * larger. */
void moe_segment_abort(struct moe_segment_header *h);

/* Monotonic clock in nanoseconds; every rank reads the same clock. */
int64_t moe_now_ns(void);

/* Waits until `rank`'s doorbell differs from `seen`: it polls for the
 * segment's spin_ns, capped at MOE_MAX_SPIN_NS (at least 64 polls), then
 * sleeps on the futex in slices
 * of at most 50 ms. Returns 0 when the doorbell moved
 * (or a slice ended, so the caller re-checks its condition), -ECANCELED when
 * the abort flag is set or the launcher has died, and -ETIMEDOUT once
 * `deadline_ns` has passed. It never burns a whole time slice spinning, so a
 * peer sharing the core can run. */
int moe_doorbell_wait(struct moe_segment_header *h, int rank, uint32_t seen,
                      int64_t deadline_ns);

#endif
