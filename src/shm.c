/*
 * shm.c - segment layout and validation, doorbells, and the one wait loop
 * every rank uses.
 *
 * Runs in the launcher (layout, abort) and in every rank (validate, ring,
 * wait). Creating, mapping and unlinking the segment is moe_launch's job.
 */
#include "moe_shm.h"
#include "moe_error.h"

#include <errno.h>
#include <sched.h>
#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Polls of the doorbell between clock reads, and the whole spin when ranks
 * outnumber cores: a few microseconds of pause instructions, short enough
 * not to matter when the peer needs this core. */
enum { SPIN_POLLS = 64 };
/* Number of yields before a sleep when ranks outnumber cores. */
enum { YIELD_ROUNDS = 8 };
/* Longest single sleep, so that the abort flag, the deadline and the
 * launcher's liveness are rechecked even if a wake-up is missed. */
static const int64_t SLEEP_SLICE_NS = 50 * 1000 * 1000;

const char *moe_step_name(int step)
{
    static const char *const names[MOE_STEP_COUNT] = {
        [MOE_STEP_START] = "start",       [MOE_STEP_ROUTE] = "route",
        [MOE_STEP_LAYOUT] = "layout exchange",
        [MOE_STEP_DISPATCH] = "dispatch", [MOE_STEP_COMPUTE] = "compute",
        [MOE_STEP_COMBINE] = "combine",   [MOE_STEP_DONE] = "done",
    };
    if (step < 0 || step >= MOE_STEP_COUNT)
        return "unknown step";
    return names[step];
}

static uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) / a * a;
}

int moe_segment_layout(struct moe_segment_header *h, int ranks,
                       uint64_t ring_capacity, uint64_t app_bytes)
{
    if (ranks < 1 || ranks > MOE_MAX_RANKS)
        return moe_fail(-EINVAL, "invalid rank count %d: expected 1 to %d",
                        ranks, MOE_MAX_RANKS);
    if (!moe_ring_capacity_valid(ring_capacity))
        return moe_fail(-EINVAL, "invalid ring size %llu bytes: expected a "
                        "power of two from %d bytes to 2 GiB",
                        (unsigned long long)ring_capacity, MOE_RING_MIN_CAPACITY);

    *h = (struct moe_segment_header){0};
    h->magic = MOE_SEGMENT_MAGIC;
    h->version = MOE_SEGMENT_VERSION;
    h->header_bytes = sizeof *h;
    h->ranks = (uint32_t)ranks;
    h->slot_bytes = sizeof(struct moe_rank_slot);
    h->ring_capacity = ring_capacity;
    h->ring_stride = align_up(moe_ring_footprint(ring_capacity), MOE_CACHE_LINE);
    h->slots_offset = MOE_SEGMENT_SLOTS_OFFSET;
    h->rings_offset = align_up(h->slots_offset +
                                   MOE_MAX_RANKS * sizeof(struct moe_rank_slot),
                               4096);
    uint64_t rings_bytes = (uint64_t)ranks * (uint64_t)ranks * h->ring_stride;
    h->app_offset = align_up(h->rings_offset + rings_bytes, 4096);
    if (app_bytes > (1ULL << 46) - h->app_offset)
        return moe_fail(-EINVAL, "shared segment of %llu bytes is too large",
                        (unsigned long long)app_bytes);
    h->app_bytes = app_bytes;
    h->segment_bytes = align_up(h->app_offset + app_bytes, 4096);
    return 0;
}

int moe_segment_validate(const struct moe_segment_header *h,
                         uint64_t mapped_bytes, int expected_ranks)
{
    if (mapped_bytes < sizeof *h)
        return moe_fail(-EPROTO, "segment of %llu bytes is smaller than its "
                        "header", (unsigned long long)mapped_bytes);
    if (h->magic != MOE_SEGMENT_MAGIC)
        return moe_fail(-EPROTO, "segment magic is %#llx, expected %#llx",
                        (unsigned long long)h->magic, MOE_SEGMENT_MAGIC);
    if (h->version != MOE_SEGMENT_VERSION)
        return moe_fail(-EPROTO, "segment layout version is %u, expected %u",
                        h->version, MOE_SEGMENT_VERSION);
    if (h->header_bytes != sizeof *h || h->slot_bytes != sizeof(struct moe_rank_slot))
        return moe_fail(-EPROTO, "segment header or slot size differs from "
                        "this build (%u/%u bytes, expected %zu/%zu)",
                        h->header_bytes, h->slot_bytes, sizeof *h,
                        sizeof(struct moe_rank_slot));
    if (h->segment_bytes != mapped_bytes)
        return moe_fail(-EPROTO, "segment header says %llu bytes but %llu are "
                        "mapped", (unsigned long long)h->segment_bytes,
                        (unsigned long long)mapped_bytes);
    if ((int)h->ranks != expected_ranks)
        return moe_fail(-EPROTO, "segment is laid out for %u ranks, expected %d",
                        h->ranks, expected_ranks);

    /* Recompute the layout and require every offset to match, so that no
     * offset read from the header can point outside the mapping. */
    struct moe_segment_header expected;
    if (moe_segment_layout(&expected, (int)h->ranks, h->ring_capacity,
                           h->app_bytes) != 0)
        return moe_fail(-EPROTO, "segment header has an invalid ring size or "
                        "app area size");
    if (expected.ring_stride != h->ring_stride ||
        expected.slots_offset != h->slots_offset ||
        expected.rings_offset != h->rings_offset ||
        expected.app_offset != h->app_offset ||
        expected.segment_bytes != h->segment_bytes)
        return moe_fail(-EPROTO, "segment header offsets do not match the "
                        "layout for %u ranks", h->ranks);
    if (h->timeout_ns <= 0 || h->timeout_ns > MOE_MAX_TIMEOUT_NS)
        return moe_fail(-EPROTO, "segment timeout is %lld ns, expected 1 to "
                        "%lld", (long long)h->timeout_ns,
                        (long long)MOE_MAX_TIMEOUT_NS);
    if (h->spin_ns < 0 || h->spin_ns > MOE_MAX_SPIN_NS)
        return moe_fail(-EPROTO, "segment spin time is %lld ns, expected 0 to "
                        "%d", (long long)h->spin_ns, MOE_MAX_SPIN_NS);
    return 0;
}

int moe_segment_snapshot(const struct moe_segment_header *h,
                         struct moe_segment_header *copy)
{
    *copy = (struct moe_segment_header){
        .magic = MOE_READ_ONCE(h->magic),
        .version = MOE_READ_ONCE(h->version),
        .header_bytes = MOE_READ_ONCE(h->header_bytes),
        .segment_bytes = MOE_READ_ONCE(h->segment_bytes),
        .ranks = MOE_READ_ONCE(h->ranks),
        .slot_bytes = MOE_READ_ONCE(h->slot_bytes),
        .ring_capacity = MOE_READ_ONCE(h->ring_capacity),
        .ring_stride = MOE_READ_ONCE(h->ring_stride),
        .slots_offset = MOE_READ_ONCE(h->slots_offset),
        .rings_offset = MOE_READ_ONCE(h->rings_offset),
        .app_offset = MOE_READ_ONCE(h->app_offset),
        .app_bytes = MOE_READ_ONCE(h->app_bytes),
        .launcher_pid = MOE_READ_ONCE(h->launcher_pid),
        .timeout_ns = MOE_READ_ONCE(h->timeout_ns),
        .spin_ns = MOE_READ_ONCE(h->spin_ns),
    };
    if (copy->ranks < 1 || copy->ranks > MOE_MAX_RANKS)
        return moe_fail(-EPROTO, "segment is laid out for %u ranks, expected "
                        "1 to %d", copy->ranks, MOE_MAX_RANKS);
    return moe_segment_validate(copy, copy->segment_bytes, (int)copy->ranks);
}

int64_t moe_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static long futex(_Atomic uint32_t *word, int op, uint32_t value,
                  const struct timespec *timeout)
{
    /* Not FUTEX_PRIVATE_FLAG: the word is shared between processes. */
    return syscall(SYS_futex, (uint32_t *)word, op, value, timeout, NULL, 0);
}

void moe_doorbell_ring(struct moe_segment_header *h, int rank)
{
    struct moe_rank_slot *slot = moe_segment_slot(h, rank);
    /* seq_cst on both sides: either the waiter sees the new doorbell value
     * before it sleeps (futex_wait then returns at once), or this load sees
     * its sleepers count and wakes it. Pairs with moe_doorbell_wait(). */
    atomic_fetch_add_explicit(&slot->doorbell, 1, memory_order_seq_cst);
    if (atomic_load_explicit(&slot->sleepers, memory_order_seq_cst) != 0)
        futex(&slot->doorbell, FUTEX_WAKE, INT_MAX, NULL);
}

void moe_segment_abort(struct moe_segment_header *h)
{
    atomic_store_explicit(&h->abort_flag, 1, memory_order_seq_cst);
    /* Read once and bounded, because a peer may have overwritten it. */
    uint32_t ranks = MOE_READ_ONCE(h->ranks);
    if (ranks > MOE_MAX_RANKS)
        ranks = MOE_MAX_RANKS;
    for (uint32_t r = 0; r < ranks; r++)
        moe_doorbell_ring(h, (int)r);
}

int moe_doorbell_wait(struct moe_segment_header *h, int rank, uint32_t seen,
                      int64_t deadline_ns)
{
    struct moe_rank_slot *slot = moe_segment_slot(h, rank);

    /* Read once and clamped, because a peer may have overwritten it since
     * moe_segment_validate(). */
    int64_t spin_ns = MOE_READ_ONCE(h->spin_ns);
    if (spin_ns > MOE_MAX_SPIN_NS)
        spin_ns = MOE_MAX_SPIN_NS;
    int64_t spin_until = spin_ns > 0 ? moe_now_ns() + spin_ns : 0;
    do {
        for (int i = 0; i < SPIN_POLLS; i++) {
            if (atomic_load_explicit(&slot->doorbell, memory_order_acquire) != seen)
                return 0;
            moe_cpu_relax();
        }
    } while (spin_until && moe_now_ns() < spin_until);

    /* More ranks than cores: give the core to another rank a few times
     * before sleeping, since the peer this rank waits for may be the one
     * waiting for this core, and a yield costs less than a futex wake. */
    for (int i = 0; spin_ns == 0 && i < YIELD_ROUNDS; i++) {
        sched_yield();
        /* A yield can last a time slice, in which peers that have not seen
         * the abort yet may ring the doorbell, so check the flag first. */
        if (atomic_load_explicit(&h->abort_flag, memory_order_acquire))
            return -ECANCELED;
        if (atomic_load_explicit(&slot->doorbell, memory_order_acquire) != seen)
            return 0;
    }

    if (atomic_load_explicit(&h->abort_flag, memory_order_acquire))
        return -ECANCELED;
    if (getppid() != (pid_t)h->launcher_pid)
        return -ECANCELED; /* the launcher died; this rank was re-parented */
    int64_t now = moe_now_ns();
    if (now >= deadline_ns)
        return -ETIMEDOUT;

    int64_t sleep_ns = deadline_ns - now;
    if (sleep_ns > SLEEP_SLICE_NS)
        sleep_ns = SLEEP_SLICE_NS;
    struct timespec timeout = {sleep_ns / 1000000000, sleep_ns % 1000000000};

    atomic_fetch_add_explicit(&slot->sleepers, 1, memory_order_seq_cst);
    /* Re-check after announcing the sleep; pairs with moe_doorbell_ring(). */
    if (atomic_load_explicit(&slot->doorbell, memory_order_seq_cst) == seen)
        futex(&slot->doorbell, FUTEX_WAIT, seen, &timeout);
    atomic_fetch_sub_explicit(&slot->sleepers, 1, memory_order_seq_cst);
    return 0;
}
