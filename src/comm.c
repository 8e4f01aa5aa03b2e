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
    comm->notes_got = calloc((size_t)R, sizeof *comm->notes_got);
    comm->notes_sent = calloc((size_t)R, sizeof *comm->notes_sent);
    if (!comm->to || !comm->from || !comm->sent || !comm->received ||
        !comm->notes_got || !comm->notes_sent) {
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
    free(comm->notes_got);
    free(comm->notes_sent);
    comm->notes_got = NULL;
    comm->notes_sent = NULL;
    comm->to = NULL;
    comm->from = NULL;
    comm->sent = NULL;
    comm->received = NULL;
}

void moe_comm_set_step(struct moe_comm *comm, int step)
{
    comm->step = step;
}

/* Looks at the oldest record from peer s and checks that it belongs to
 * the call with `tag`. Returns 0, -EAGAIN when there is none, or an error
 * naming the peer. */
static int peek_tagged(struct moe_comm *c, int s, uint32_t tag,
                       struct moe_ring_record *record)
{
    int rc = moe_ring_peek(&c->from[s], record);
    if (rc == -EAGAIN)
        return rc;
    if (rc)
        return moe_fail(rc, "rank %d: rank %d wrote an invalid record or "
                        "head index in %s: %s", c->rank, s,
                        moe_step_name(c->step), moe_error_message());
    if (record->tag != tag)
        return moe_fail(-EPROTO, "rank %d: record from rank %d in %s has "
                        "tag %" PRIu32 ", expected %" PRIu32
                        " (the ranks called different collectives)",
                        c->rank, s, moe_step_name(c->step), record->tag, tag);
    return 0;
}

/* Drains every complete record from peer s into recv. Returns the number of
 * records consumed or a negative error. */
static int drain_peer(struct moe_comm *c, int s, uint32_t tag, uint8_t *dst,
                      uint64_t expected)
{
    int consumed = 0;
    while (c->received[s] < expected) {
        struct moe_ring_record record;
        int rc = peek_tagged(c, s, tag, &record);
        if (rc == -EAGAIN)
            break;
        if (rc)
            return rc;
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

/* The condition of a waiting call: whether peer p still owes this rank
 * something (or is owed), and the timeout message. */
struct wait_rule {
    int (*pending)(const struct moe_comm *c, int p, const void *ctx);
    int (*timed_out)(struct moe_comm *c, const void *ctx, double seconds);
    const void *ctx;
};

/* The state of one waiting call: its deadline, and a peer seen to have
 * exited while this rank still waited on it. */
struct waiter {
    int64_t timeout_ns;
    int64_t deadline;
    int64_t next_liveness;
    int suspect;
    int32_t suspect_pid;
};

static int waiter_start(struct moe_comm *c, struct waiter *w)
{
    /* Read once per call, and bounded, because any rank can write the
     * header. */
    int64_t timeout_ns = MOE_READ_ONCE(c->segment->timeout_ns);
    if (timeout_ns <= 0 || timeout_ns > MOE_MAX_TIMEOUT_NS)
        return moe_fail(-EPROTO, "rank %d: the segment's timeout of %lld ns "
                        "in %s is invalid, expected 1 to %lld", c->rank,
                        (long long)timeout_ns, moe_step_name(c->step),
                        (long long)MOE_MAX_TIMEOUT_NS);
    int64_t now = moe_now_ns();
    *w = (struct waiter){.timeout_ns = timeout_ns, .deadline = now + timeout_ns,
                         .next_liveness = now + LIVENESS_PERIOD_NS, .suspect = -1};
    return 0;
}

/* Returns a peer this rank still waits on whose process has exited, or -1.
 * A slot without a pid belongs to a rank that has not attached yet. */
static int find_exited_peer(const struct moe_comm *c, const struct wait_rule *rule,
                            int32_t *pid_out)
{
    for (int p = 0; p < c->ranks; p++) {
        if (p == c->rank || !rule->pending(c, p, rule->ctx))
            continue;
        int32_t pid = MOE_READ_ONCE(moe_segment_slot(c->segment, p)->pid);
        if (pid > 0 && process_exited(pid)) {
            *pid_out = pid;
            return p;
        }
    }
    return -1;
}

/* Called after a pass over the rings that left something pending. `seen`
 * is this rank's doorbell as read before the pass. Returns 0 when the
 * caller should make another pass, or an error.
 *
 * A peer that finished its last collective exits at once, possibly before
 * this rank has drained its final records. So the verdict on a peer seen
 * to have exited waits for one more pass over the rings, which drains
 * everything the peer wrote before it exited. */
static int waiter_next(struct moe_comm *c, struct waiter *w, const struct wait_rule *rule,
                       int progress, uint32_t seen)
{
    struct moe_segment_header *seg = c->segment;
    if (w->suspect >= 0) {
        if (rule->pending(c, w->suspect, rule->ctx)) {
            /* Set the flag here, so that the launcher names the rank that
             * died, not this one. */
            moe_segment_abort(seg);
            return moe_fail(-ECANCELED, "rank %d: rank %d (pid %ld) exited "
                            "while this rank waited for it in %s", c->rank,
                            w->suspect, (long)w->suspect_pid, moe_step_name(c->step));
        }
        w->suspect = -1;
    }
    if (progress) {
        /* Ranks that keep feeding each other never sleep, so check the
         * abort flag here too. */
        if (atomic_load_explicit(&seg->abort_flag, memory_order_acquire))
            return moe_fail(-ECANCELED, "rank %d: stopped in %s because the run "
                            "was aborted", c->rank, moe_step_name(c->step));
        w->deadline = moe_now_ns() + w->timeout_ns;
        return 0;
    }

    int64_t wait_start = moe_now_ns();
    int rc = moe_doorbell_wait(seg, c->rank, seen, w->deadline);
    int64_t wait_end = moe_now_ns();
    c->wait_ns[c->step] += (uint64_t)(wait_end - wait_start);
    if (c->on_wait)
        c->on_wait(c->on_wait_arg, c->step, wait_start, wait_end);
    if (rc == -ETIMEDOUT)
        return rule->timed_out(c, rule->ctx, (double)w->timeout_ns / 1e9);
    if (rc)
        return moe_fail(rc, "rank %d: stopped in %s because the run was "
                        "aborted", c->rank, moe_step_name(c->step));
    if (wait_end >= w->next_liveness) {
        w->next_liveness = wait_end + LIVENESS_PERIOD_NS;
        w->suspect = find_exited_peer(c, rule, &w->suspect_pid);
    }
    return 0;
}

/* The byte counts of one moe_alltoallv call, for its wait rule. */
struct transfer {
    const uint64_t *send_bytes;
    const uint64_t *recv_bytes;
};

/* Returns 1 while this rank still has bytes to send to or receive from
 * peer p in the current call. */
static int transfer_pending(const struct moe_comm *c, int p, const void *ctx)
{
    const struct transfer *t = ctx;
    return c->sent[p] < t->send_bytes[p] || c->received[p] < t->recv_bytes[p];
}

/* Builds the timeout message: the first peer this rank still waits on. */
static int transfer_timed_out(struct moe_comm *c, const void *ctx, double seconds)
{
    const struct transfer *t = ctx;
    for (int s = 0; s < c->ranks; s++)
        if (s != c->rank && c->received[s] < t->recv_bytes[s])
            return moe_fail(-ETIMEDOUT, "rank %d: timed out after %.3g s in %s "
                            "waiting for rank %d (received %" PRIu64 " of %"
                            PRIu64 " bytes)", c->rank, seconds,
                            moe_step_name(c->step), s, c->received[s],
                            t->recv_bytes[s]);
    for (int d = 0; d < c->ranks; d++)
        if (d != c->rank && c->sent[d] < t->send_bytes[d])
            return moe_fail(-ETIMEDOUT, "rank %d: timed out after %.3g s in %s "
                            "waiting for rank %d to make room (sent %" PRIu64
                            " of %" PRIu64 " bytes)", c->rank, seconds,
                            moe_step_name(c->step), d, c->sent[d], t->send_bytes[d]);
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

    struct transfer transfer = {send_bytes, recv_bytes};
    struct wait_rule rule = {transfer_pending, transfer_timed_out, &transfer};
    struct waiter w;
    int rc = waiter_start(c, &w);
    if (rc)
        return rc;
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
        rc = waiter_next(c, &w, &rule, progress, seen);
        if (rc)
            return rc;
    }
}

/* ---- notes --------------------------------------------------------------- */

int moe_notes_begin(struct moe_comm *c, uint64_t *store, uint64_t per_source)
{
    c->sequence++;
    c->notes = store;
    c->notes_per_source = per_source;
    for (int p = 0; p < c->ranks; p++) {
        c->notes_got[p] = 0;
        c->notes_sent[p] = 0;
    }
    return 0;
}

/* Takes every note that has come from peer s. Returns the number taken or
 * a negative error. */
static int drain_notes(struct moe_comm *c, int s)
{
    uint32_t tag = c->sequence;
    int taken = 0;
    /* Records past the last note of this exchange belong to the peer's
     * next call, which may already have started. */
    while (c->notes_got[s] < c->notes_per_source) {
        struct moe_ring_record record;
        int rc = peek_tagged(c, s, tag, &record);
        if (rc == -EAGAIN)
            break;
        if (rc)
            return rc;
        if (record.length != sizeof(uint64_t))
            return moe_fail(-EPROTO, "rank %d: note from rank %d in %s has "
                            "length %" PRIu32 ", expected %zu", c->rank, s,
                            moe_step_name(c->step), record.length, sizeof(uint64_t));
        uint64_t value;
        moe_ring_copy_payload(&record, &value);
        moe_ring_release(&c->from[s], &record);
        c->notes[(uint64_t)s * c->notes_per_source + c->notes_got[s]] = value;
        c->notes_got[s]++;
        taken++;
    }
    return taken;
}

/* Drains every peer once; sets *progress when a note came. */
static int drain_all_notes(struct moe_comm *c, int *progress)
{
    for (int i = 1; i < c->ranks; i++) {
        int s = (c->rank + c->ranks - i) % c->ranks;
        int taken = drain_notes(c, s);
        if (taken < 0)
            return taken;
        if (taken) {
            moe_doorbell_ring(c->segment, s); /* s may be waiting for room */
            *progress = 1;
        }
    }
    return 0;
}

/* One peer the note calls wait on: the receiver of a note that does not
 * fit yet, or (in moe_notes_wait) the senders of notes still owed. */
struct note_wait {
    int send_to;          /* peer whose ring is full, or -1 */
    const uint64_t *need; /* (R) notes owed, or NULL */
};

static int note_pending(const struct moe_comm *c, int p, const void *ctx)
{
    const struct note_wait *nw = ctx;
    return p == nw->send_to || (nw->need && c->notes_got[p] < nw->need[p]);
}

static int note_timed_out(struct moe_comm *c, const void *ctx, double seconds)
{
    const struct note_wait *nw = ctx;
    if (nw->send_to >= 0)
        return moe_fail(-ETIMEDOUT, "rank %d: timed out after %.3g s in %s "
                        "waiting for rank %d to make room for a note", c->rank,
                        seconds, moe_step_name(c->step), nw->send_to);
    for (int s = 0; s < c->ranks; s++)
        if (s != c->rank && c->notes_got[s] < nw->need[s])
            return moe_fail(-ETIMEDOUT, "rank %d: timed out after %.3g s in %s "
                            "waiting for rank %d (received %" PRIu64 " of %"
                            PRIu64 " notes)", c->rank, seconds,
                            moe_step_name(c->step), s, c->notes_got[s], nw->need[s]);
    return moe_fail(-ETIMEDOUT, "rank %d: timed out in %s", c->rank,
                    moe_step_name(c->step));
}

int moe_notes_send(struct moe_comm *c, int d, uint64_t value)
{
    struct note_wait nw = {.send_to = d};
    struct wait_rule rule = {note_pending, note_timed_out, &nw};
    struct waiter w;
    int started = 0;
    for (;;) {
        uint32_t seen = atomic_load_explicit(&moe_segment_slot(c->segment, c->rank)->doorbell,
                                             memory_order_acquire);
        int rc = moe_ring_try_send(&c->to[d], c->sequence, &value, sizeof value);
        if (rc == 0) {
            c->notes_sent[d]++;
            moe_doorbell_ring(c->segment, d);
            return 0;
        }
        if (rc != -EAGAIN)
            return moe_fail(rc, "rank %d: cannot send a note to rank %d in %s: %s",
                            c->rank, d, moe_step_name(c->step),
                            rc == -EPROTO ? "it wrote an invalid tail index"
                                          : "the ring is too small");
        if (!started) {
            rc = waiter_start(c, &w);
            if (rc)
                return rc;
            started = 1;
        }
        int progress = 0;
        rc = drain_all_notes(c, &progress);
        if (rc == 0)
            rc = waiter_next(c, &w, &rule, progress, seen);
        if (rc)
            return rc;
    }
}

static int notes_missing(const struct moe_comm *c, const uint64_t *need)
{
    for (int s = 0; s < c->ranks; s++)
        if (s != c->rank && c->notes_got[s] < need[s])
            return 1;
    return 0;
}

int moe_notes_wait(struct moe_comm *c, const uint64_t *need)
{
    for (int s = 0; s < c->ranks; s++)
        if (s != c->rank && need[s] > c->notes_per_source)
            return moe_fail(-EINVAL, "rank %d: in %s, waiting for %" PRIu64
                            " notes from rank %d, more than the %" PRIu64
                            " it may send", c->rank, moe_step_name(c->step),
                            need[s], s, c->notes_per_source);
    struct note_wait nw = {.send_to = -1, .need = need};
    struct wait_rule rule = {note_pending, note_timed_out, &nw};
    struct waiter w;
    int started = 0;
    for (;;) {
        uint32_t seen = atomic_load_explicit(&moe_segment_slot(c->segment, c->rank)->doorbell,
                                             memory_order_acquire);
        int progress = 0;
        int rc = drain_all_notes(c, &progress);
        if (rc)
            return rc;
        if (!notes_missing(c, need))
            return 0;
        if (!started) {
            rc = waiter_start(c, &w);
            if (rc)
                return rc;
            started = 1;
        }
        rc = waiter_next(c, &w, &rule, progress, seen);
        if (rc)
            return rc;
    }
}

int moe_alltoallv_direct(struct moe_comm *c, const void *send,
                         const uint64_t *send_bytes, const uint64_t *send_offsets,
                         void *const *dst, const uint64_t *recv_bytes)
{
    const uint8_t *base = send;
    int me = c->rank, R = c->ranks;
    if (send_bytes[me] != recv_bytes[me])
        return moe_fail(-EINVAL, "rank %d: in %s, %" PRIu64 " bytes sent to "
                        "itself but %" PRIu64 " expected", me,
                        moe_step_name(c->step), send_bytes[me], recv_bytes[me]);
    /* c->received stores one note per peer: the byte count it wrote. */
    moe_notes_begin(c, c->received, 1);
    if (send_bytes[me])
        memcpy(dst[me], base + send_offsets[me], send_bytes[me]);
    for (int i = 1; i < R; i++) {
        int d = (me + i) % R;
        if (send_bytes[d])
            memcpy(dst[d], base + send_offsets[d], send_bytes[d]);
        c->bytes_sent[c->step] += send_bytes[d];
        int rc = moe_notes_send(c, d, send_bytes[d]);
        if (rc)
            return rc;
    }
    for (int p = 0; p < R; p++)
        c->sent[p] = 1;
    int rc = moe_notes_wait(c, c->sent);
    if (rc)
        return rc;
    for (int s = 0; s < R; s++)
        if (s != me && c->received[s] != recv_bytes[s])
            return moe_fail(-EPROTO, "rank %d: in %s, rank %d wrote %" PRIu64
                            " bytes, but %" PRIu64 " were announced", me,
                            moe_step_name(c->step), s, c->received[s], recv_bytes[s]);
    return 0;
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
