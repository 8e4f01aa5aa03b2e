/*
 * 02_ring_two_processes.c - one lock-free ring between two processes.
 *
 * Ranks exchange every byte through single-producer, single-consumer rings
 * in one POSIX shared-memory segment. This example builds a segment by
 * hand, forks a producer and a consumer, and sends RECORDS text records
 * through a ring of only 128 bytes, so the producer often finds it full.
 * Each process maps the segment at an address of its own, which is why the
 * segment stores offsets and never pointers. The ring indices start 64
 * bytes below 2^64 and wrap past it. A side that cannot proceed sleeps on
 * its doorbell, a futex word, until the peer rings it or a deadline passes.
 */
#include "moe_launch.h"
#include "moe_ring.h"
#include "moe_shm.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/wait.h>
#include <unistd.h>

enum { RECORDS = 40, RING_BYTES = 128, SHOWN = 4, PRODUCER = 0, CONSUMER = 1 };
static const int64_t TIMEOUT_NS = 2000000000; /* a wait fails after 2 s without progress */

/* One child's report, written into the segment's app area. */
struct side_report {
    uint64_t mapped_at, records, checksum, full_waits, final_index;
    char shown[SHOWN][48]; /* the consumer's first records, as received */
};

/* Writes record i's payload, a text whose length varies with i. */
static int make_record(int i, char *text)
{
    return snprintf(text, 48, "record %02d %.*s", i, i % 23, "abcdefghijklmnopqrstuvw");
}

/* Runs one side in a forked child and returns its exit status. */
static int run_side(int side, int fd, uint64_t segment_bytes)
{
    prctl(PR_SET_PDEATHSIG, SIGKILL); /* die with the parent */
    struct moe_segment_header *h = mmap(NULL, segment_bytes, PROT_READ | PROT_WRITE,
                                        MAP_SHARED, fd, 0);
    if (h == MAP_FAILED)
        return 1;
    struct side_report *me = (struct side_report *)moe_segment_app(h) + side;
    me->mapped_at = (uint64_t)(uintptr_t)h;
    void *ring = moe_segment_ring(h, PRODUCER, CONSUMER);
    _Atomic uint32_t *doorbell = &moe_segment_slot(h, side)->doorbell;
    struct moe_ring_producer out = {0};
    struct moe_ring_consumer in = {0};
    int rc = side == PRODUCER ? moe_ring_producer_attach(&out, ring, RING_BYTES)
                              : moe_ring_consumer_attach(&in, ring, RING_BYTES);
    int64_t deadline = moe_now_ns() + TIMEOUT_NS;

    for (int i = 0; rc == 0 && i < RECORDS;) {
        /* Read the doorbell before looking at the ring. A ring by the peer
         * after the look then changes it, so the wait cannot miss it. */
        uint32_t seen = atomic_load_explicit(doorbell, memory_order_acquire);
        char text[48], got[48] = {0};
        int length = make_record(i, text);
        struct moe_ring_record record;
        rc = side == PRODUCER ? moe_ring_try_send(&out, (uint32_t)i, text, (uint32_t)length)
                              : moe_ring_peek(&in, &record);
        if (rc == -EAGAIN) { /* full for the producer, empty for the consumer */
            me->full_waits += side == PRODUCER;
            rc = moe_doorbell_wait(h, side, seen, deadline);
            continue;
        }
        if (rc == 0 && side == CONSUMER) {
            int bad = record.tag != (uint32_t)i || record.length != (uint32_t)length;
            if (!bad)
                moe_ring_copy_payload(&record, got);
            moe_ring_release(&in, &record);
            rc = bad || memcmp(got, text, (size_t)length) != 0 ? -EPROTO : 0;
        }
        if (rc == 0) {
            const char *bytes = side == PRODUCER ? text : got;
            for (int b = 0; b < length; b++) /* FNV-1a over every byte */
                me->checksum = (me->checksum ^ (uint8_t)bytes[b]) * 0x100000001b3ULL;
            if (side == CONSUMER && i < SHOWN)
                memcpy(me->shown[i], got, (size_t)length);
            me->records = (uint64_t)++i;
            moe_doorbell_ring(h, 1 - side); /* wake the peer if it sleeps */
            deadline = moe_now_ns() + TIMEOUT_NS;
        }
    }
    me->final_index = side == PRODUCER ? out.head : in.tail;
    if (rc == 0)
        return 0;
    const char *reason = strerror(-rc);
    if (rc == -ETIMEDOUT)
        reason = "timed out, the peer made no progress for 2 s";
    else if (rc == -ECANCELED)
        reason = "the peer failed";
    fprintf(stderr, "02_ring_two_processes: the %s failed after %llu records: %s\n",
            side == PRODUCER ? "producer" : "consumer", (unsigned long long)me->records,
            reason);
    moe_segment_abort(h); /* the peer's wait returns -ECANCELED */
    return 1;
}

int main(int argc, char **argv)
{
    if (argc > 1) {
        fprintf(stderr, "%s: invalid argument '%s': this example takes none\n", argv[0],
                argv[1]);
        return 2;
    }
    struct moe_segment_header layout;
    moe_segment_layout(&layout, 2, RING_BYTES, 2 * sizeof(struct side_report));
    uint64_t nonce = 0;
    char name[64];
    getrandom(&nonce, sizeof nonce, 0);
    snprintf(name, sizeof name, "/" MOE_SEGMENT_PREFIX "%d-%016llx", (int)getpid(),
             (unsigned long long)nonce);

    /* Ctrl-C waits until the name is unlinked, so that no name stays. */
    sigset_t stop, old;
    moe_stop_signals(&stop);
    sigprocmask(SIG_BLOCK, &stop, &old);
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    void *mapped = MAP_FAILED;
    if (fd >= 0 && ftruncate(fd, (off_t)layout.segment_bytes) == 0)
        mapped = mmap(NULL, layout.segment_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mapped == MAP_FAILED)
        perror("02_ring_two_processes: creating the shared segment failed");
    if (fd >= 0)
        shm_unlink(name);
    sigprocmask(SIG_SETMASK, &old, NULL);
    if (mapped == MAP_FAILED)
        return 3;

    struct moe_segment_header *h = mapped;
    *h = layout;
    h->launcher_pid = getpid(); /* a waiter gives up when its parent changes */
    h->timeout_ns = TIMEOUT_NS;
    moe_ring_init(moe_segment_ring(h, PRODUCER, CONSUMER), RING_BYTES, (uint64_t)-64);
    fflush(stdout);
    pid_t pids[2];
    for (int side = 0; side < 2; side++)
        if ((pids[side] = fork()) == 0)
            _exit(run_side(side, fd, layout.segment_bytes));

    /* Reap both children, and kill one that outlives every deadline. */
    int64_t give_up_ns = moe_now_ns() + 2 * TIMEOUT_NS;
    int status[2] = {-1, -1};
    for (int side = 0; side < 2; side++)
        while (pids[side] > 0 && waitpid(pids[side], &status[side], WNOHANG) == 0) {
            if (moe_now_ns() > give_up_ns)
                kill(pids[side], SIGKILL); /* a later waitpid reaps it */
            usleep(1000);
        }

    struct side_report *p = moe_segment_app(h), *c = p + CONSUMER;
    printf("02_ring_two_processes: %d records through one ring of %d bytes\n"
           "segment mapped at %#llx by the parent, at %#llx by the consumer\n"
           "first records in arrival order:\n", RECORDS, RING_BYTES,
           (unsigned long long)(uintptr_t)h, (unsigned long long)c->mapped_at);
    for (int i = 0; i < SHOWN; i++)
        printf("  tag %d: \"%s\"\n", i, c->shown[i]);
    printf("producer found the ring full %llu times and waited for the consumer\n"
           "indices started at 2^64 - 64 and ended at head %llu, tail %llu\n",
           (unsigned long long)p->full_waits, (unsigned long long)p->final_index,
           (unsigned long long)c->final_index);
    printf("records sent %llu, received %llu\nchecksum sent %016llx, received %016llx\n",
           (unsigned long long)p->records, (unsigned long long)c->records,
           (unsigned long long)p->checksum, (unsigned long long)c->checksum);
    int ok = status[0] == 0 && status[1] == 0 && c->records == RECORDS &&
             c->checksum == p->checksum;
    printf("%s\n", ok ? "every record arrived once, in order, intact"
                      : "FAILED: a side failed, or records were lost or damaged");
    munmap(h, layout.segment_bytes);
    close(fd);
    return ok ? 0 : 1;
}
