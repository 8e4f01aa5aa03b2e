/*
 * comm.c - all-to-all, all-gather and barrier over the rings.
 *
 * Runs in every rank process. Owns only process-local scratch; all shared
 * state is in the rings and doorbells of the segment.
 */
#include "moe_comm.h"
#include "moe_error.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* How often a waiting rank checks that the peers it waits on still run. */
static const int64_t LIVENESS_PERIOD_NS = 50LL * 1000 * 1000;

int moe_comm_attach(struct moe_comm *comm, struct moe_segment_header *segment,
                    int rank)
{
    /* Work from a validated copy of the layout from here on, so that a peer
     * that rewrites the header later cannot move the rings or the app area
     * under this rank. */
    struct moe_segment_header layout;
    int rc = moe_segment_snapshot(segment, &layout);
    if (rc) {
        *comm = (struct moe_comm){.rank = rank, .segment = segment};
        return moe_fail(rc, "rank %d: %s", rank, moe_error_message());
    }
    int R = (int)layout.ranks;
    *comm = (struct moe_comm){.rank = rank, .ranks = R, .segment = segment,
                              .app = (uint8_t *)segment + layout.app_offset,
                              .app_bytes = layout.app_bytes};
    if (rank < 0 || rank >= R)
        return moe_fail(-EINVAL, "invalid rank %d: the segment has ranks 0 "
                        "to %d", rank, R - 1);
    comm->to = calloc((size_t)R, sizeof *comm->to);
    comm->from = calloc((size_t)R, sizeof *comm->from);
    comm->sent = calloc((size_t)R, sizeof *comm->sent);
    comm->received = calloc((size_t)R, sizeof *comm->received);
    if (!comm->to || !comm->from || !comm->sent || !comm->received) {
        moe_comm_detach(comm);
        return moe_fail(-ENOMEM, "rank %d: out of memory for ring handles", rank);
    }

    /* A quarter of the ring per record lets the consumer drain one chunk
     * while the producer writes the next. */
    uint64_t capacity = layout.ring_capacity;
    comm->max_chunk = (uint32_t)(capacity / 4);
    if (comm->max_chunk < 256)
        comm->max_chunk = moe_ring_max_payload(capacity);

    uint8_t *rings = (uint8_t *)segment + layout.rings_offset;
    for (int peer = 0; peer < R; peer++) {
        uint64_t outgoing = (uint64_t)rank * (uint64_t)R + (uint64_t)peer;
        uint64_t incoming = (uint64_t)peer * (uint64_t)R + (uint64_t)rank;
        rc = moe_ring_producer_attach(&comm->to[peer],
                                      rings + outgoing * layout.ring_stride,
                                      capacity);
        if (rc == 0)
            rc = moe_ring_consumer_attach(&comm->from[peer],
                                          rings + incoming * layout.ring_stride,
                                          capacity);
        if (rc) {
            moe_fail(rc, "rank %d: ring with rank %d: %s", rank, peer,
                     moe_error_message());
            moe_comm_detach(comm);
            return rc;
        }
    }
    return 0;
}

void moe_comm_detach(struct moe_comm *comm)
{
    free(comm->to);
    free(comm->from);
    free(comm->sent);
    free(comm->received);
    comm->to = NULL;
    comm->from = NULL;
    comm->sent = NULL;
    comm->received = NULL;
}

void moe_comm_set_step(struct moe_comm *comm, int step)
{
    comm->step = step;
}

/* Drains every complete record from peer s into recv. Returns the number of
 * records consumed or a negative error. */
static int drain_peer(struct moe_comm *c, int s, uint32_t tag, uint8_t *dst,
                      uint64_t expected)
{
    int consumed = 0;
    while (c->received[s] < expected) {
        struct moe_ring_record record;
        int rc = moe_ring_peek(&c->from[s], &record);
        if (rc == -EAGAIN)
            break;
        if (rc)
            return moe_fail(rc, "rank %d: rank %d wrote an invalid record or "
                            "head index in %s: %s", c->rank, s,
                            moe_step_name(c->step), moe_error_message());
        if (record.tag != tag)
            return moe_fail(-EPROTO, "rank %d: record from rank %d in %s has "
                            "tag %" PRIu32 ", expected %" PRIu32
                            " (the ranks called different collectives)",
                            c->rank, s, moe_step_name(c->step), record.tag, tag);
        if (record.length > expected - c->received[s])
            return moe_fail(-EPROTO, "rank %d: record from rank %d in %s has "
                            "length %" PRIu32 ", but only %" PRIu64
                            " of the %" PRIu64 " bytes announced are left",
                            c->rank, s, moe_step_name(c->step), record.length,
                            expected - c->received[s], expected);
        moe_ring_copy_payload(&record, dst + c->received[s]);
        moe_ring_release(&c->from[s], &record);
        c->received[s] += record.length;
        consumed++;
    }
    return consumed;
}

/* Returns 1 when process `pid` has exited: /proc has no entry for it, or
 * it is a zombie that its parent has not reaped yet. kill(pid, 0) would
 * not do, because it succeeds on a zombie. */
static int process_exited(int32_t pid)
{
    char path[64], text[256];
    snprintf(path, sizeof path, "/proc/%ld/stat", (long)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT || errno == ESRCH;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return 1;
    text[n] = '\0';
    /* The state letter follows the command name in brackets, which may
     * itself contain brackets, so search from the end. */
    const char *after = strrchr(text, ')');
    return after && after[1] == ' ' && (after[2] == 'Z' || after[2] == 'X');
}

/* Returns 1 while this rank still has bytes to send to or receive from
 * peer p in the current call. */
static int peer_pending(const struct moe_comm *c, int p, const uint64_t *send_bytes,
                        const uint64_t *recv_bytes)
{
    return p != c->rank && (c->sent[p] < send_bytes[p] || c->received[p] < recv_bytes[p]);
}

/* Returns a peer this rank still waits on whose process has exited, or -1.
 * A slot without a pid belongs to a rank that has not attached yet. */
static int find_exited_peer(const struct moe_comm *c, const uint64_t *send_bytes,
                            const uint64_t *recv_bytes, int32_t *pid_out)
{
    for (int p = 0; p < c->ranks; p++) {
        if (!peer_pending(c, p, send_bytes, recv_bytes))
            continue;
        int32_t pid = MOE_READ_ONCE(moe_segment_slot(c->segment, p)->pid);
        if (pid > 0 && process_exited(pid)) {
            *pid_out = pid;
            return p;
        }
    }
    return -1;
}

/* Builds the timeout message: the first peer this rank still waits on. */
static int report_timeout(struct moe_comm *c, const uint64_t *send_bytes,
                          const uint64_t *recv_bytes, int64_t timeout_ns)
{
    double seconds = (double)timeout_ns / 1e9;
    for (int s = 0; s < c->ranks; s++)
        if (s != c->rank && c->received[s] < recv_bytes[s])
            return moe_fail(-ETIMEDOUT, "rank %d: timed out after %.3g s in %s "
                            "waiting for rank %d (received %" PRIu64 " of %"
                            PRIu64 " bytes)", c->rank, seconds,
                            moe_step_name(c->step), s, c->received[s],
                            recv_bytes[s]);
    for (int d = 0; d < c->ranks; d++)
        if (d != c->rank && c->sent[d] < send_bytes[d])
            return moe_fail(-ETIMEDOUT, "rank %d: timed out after %.3g s in %s "
                            "waiting for rank %d to make room (sent %" PRIu64
                            " of %" PRIu64 " bytes)", c->rank, seconds,
                            moe_step_name(c->step), d, c->sent[d], send_bytes[d]);
    return moe_fail(-ETIMEDOUT, "rank %d: timed out in %s", c->rank,
                    moe_step_name(c->step));
}

int moe_alltoallv(struct moe_comm *c, const void *send,
                  const uint64_t *send_bytes, const uint64_t *send_offsets,
                  void *recv, const uint64_t *recv_bytes,
                  const uint64_t *recv_offsets)
{
    const uint8_t *send_base = send;
    uint8_t *recv_base = recv;
    struct moe_segment_header *seg = c->segment;
    uint32_t tag = ++c->sequence;
    int me = c->rank, R = c->ranks;

    if (send_bytes[me] != recv_bytes[me])
        return moe_fail(-EINVAL, "rank %d: in %s, %" PRIu64 " bytes sent to "
                        "itself but %" PRIu64 " expected", me,
                        moe_step_name(c->step), send_bytes[me], recv_bytes[me]);
    if (send_bytes[me])
        memcpy(recv_base + recv_offsets[me], send_base + send_offsets[me],
               send_bytes[me]);
    for (int p = 0; p < R; p++) {
        c->sent[p] = p == me ? send_bytes[p] : 0;
        c->received[p] = p == me ? recv_bytes[p] : 0;
    }

    /* Read once per call, and bounded, because any rank can write the
     * header. */
    int64_t timeout_ns = MOE_READ_ONCE(seg->timeout_ns);
    if (timeout_ns <= 0 || timeout_ns > MOE_MAX_TIMEOUT_NS)
        return moe_fail(-EPROTO, "rank %d: the segment's timeout of %lld ns "
                        "in %s is invalid, expected 1 to %lld", me,
                        (long long)timeout_ns, moe_step_name(c->step),
                        (long long)MOE_MAX_TIMEOUT_NS);
    int64_t deadline = moe_now_ns() + timeout_ns;
    int64_t next_liveness = moe_now_ns() + LIVENESS_PERIOD_NS;
    /* A peer seen to have exited while this rank still waited on it. A
     * peer that finished its last collective exits at once, possibly before
     * this rank has drained its final records. So the verdict waits for one
     * more pass over the rings, which drains everything the peer wrote
     * before it exited. */
    int suspect = -1;
    int32_t suspect_pid = 0;
    for (;;) {
        uint32_t seen = atomic_load_explicit(&moe_segment_slot(seg, me)->doorbell,
                                             memory_order_acquire);
        int progress = 0, pending = 0;

        /* Start with the next rank up so that not every rank writes to rank
         * 0 first. */
        for (int i = 1; i < R; i++) {
            int d = (me + i) % R;
            if (c->sent[d] == send_bytes[d])
                continue;
            int64_t n = moe_ring_write_some(&c->to[d], tag,
                                            send_base + send_offsets[d] + c->sent[d],
                                            send_bytes[d] - c->sent[d],
                                            c->max_chunk);
            if (n < 0)
                return moe_fail((int)n, "rank %d: rank %d wrote an invalid "
                                "tail index in %s: %s", me, d,
                                moe_step_name(c->step), moe_error_message());
            if (n > 0) {
                c->sent[d] += (uint64_t)n;
                c->bytes_sent[c->step] += (uint64_t)n;
                moe_doorbell_ring(seg, d);
                progress = 1;
            }
            pending |= c->sent[d] < send_bytes[d];
        }

        for (int i = 1; i < R; i++) {
            int s = (me + R - i) % R;
            if (c->received[s] == recv_bytes[s])
                continue;
            int consumed = drain_peer(c, s, tag, recv_base + recv_offsets[s],
                                      recv_bytes[s]);
            if (consumed < 0)
                return consumed;
            if (consumed) {
                moe_doorbell_ring(seg, s); /* s may be waiting for room */
                progress = 1;
            }
            pending |= c->received[s] < recv_bytes[s];
        }

        if (!pending)
            return 0;
        if (suspect >= 0) {
            if (peer_pending(c, suspect, send_bytes, recv_bytes)) {
                /* Set the flag here, so that the launcher names the rank
                 * that died, not this one. */
                moe_segment_abort(seg);
                return moe_fail(-ECANCELED, "rank %d: rank %d (pid %ld) exited "
                                "while this rank waited for it in %s", me, suspect,
                                (long)suspect_pid, moe_step_name(c->step));
            }
            suspect = -1;
        }
        if (progress) {
            deadline = moe_now_ns() + timeout_ns;
            continue;
        }

        int64_t wait_start = moe_now_ns();
        int rc = moe_doorbell_wait(seg, me, seen, deadline);
        int64_t wait_end = moe_now_ns();
        c->wait_ns[c->step] += (uint64_t)(wait_end - wait_start);
        if (c->on_wait)
            c->on_wait(c->on_wait_arg, c->step, wait_start, wait_end);
        if (rc == -ETIMEDOUT)
            return report_timeout(c, send_bytes, recv_bytes, timeout_ns);
        if (rc)
            return moe_fail(rc, "rank %d: stopped in %s because the run was "
                            "aborted", me, moe_step_name(c->step));
        if (wait_end >= next_liveness) {
            next_liveness = wait_end + LIVENESS_PERIOD_NS;
            suspect = find_exited_peer(c, send_bytes, recv_bytes, &suspect_pid);
        }
    }
}

int moe_allgather(struct moe_comm *c, const void *send, uint64_t bytes,
                  void *recv)
{
    int R = c->ranks;
    uint64_t *table = malloc(4 * (size_t)R * sizeof(uint64_t));
    if (!table)
        return moe_fail(-ENOMEM, "rank %d: out of memory", c->rank);
    uint64_t *send_bytes = table, *send_offsets = table + R,
             *recv_bytes = table + 2 * R, *recv_offsets = table + 3 * R;
    for (int p = 0; p < R; p++) {
        send_bytes[p] = bytes;
        send_offsets[p] = 0;
        recv_bytes[p] = bytes;
        recv_offsets[p] = (uint64_t)p * bytes;
    }
    int rc = moe_alltoallv(c, send, send_bytes, send_offsets, recv, recv_bytes,
                           recv_offsets);
    free(table);
    return rc;
}

int moe_barrier(struct moe_comm *c)
{
    uint64_t token = c->sequence;
    uint64_t *all = malloc((size_t)c->ranks * sizeof(uint64_t));
    if (!all)
        return moe_fail(-ENOMEM, "rank %d: out of memory", c->rank);
    int rc = moe_allgather(c, &token, sizeof token, all);
    free(all);
    return rc;
}
