/*
 * transport_shm.c - the "shm" transport: the moe_transport interface over a
 * rank's struct moe_comm and the shared-memory rings, and the parsing of
 * --transport.
 *
 * Runs in every rank process that moe_launch forked. Each call sets the
 * comm's step, calls the ring collective of moe_comm.h and adds the comm's
 * new wait time to the transport's counters. The gather to a root is an
 * all-to-all in which only the root receives.
 */
#include "moe_transport.h"
#include "moe_error.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

/* The implementation's data: the wrapped comm, and (4R) scratch sizes for
 * the gather. */
struct shm_state {
    struct moe_comm *comm;
    uint64_t *table;
};

static struct moe_comm *comm_of(struct moe_transport *t)
{
    return ((struct shm_state *)t->state)->comm;
}

/* Points the comm's messages and wait counters at the transport's step and
 * returns the comm's wait time so far in that step. */
static uint64_t begin_call(struct moe_transport *t)
{
    struct moe_comm *comm = comm_of(t);
    moe_comm_set_step(comm, t->step);
    return comm->wait_ns[t->step];
}

/* Adds the comm's wait time since begin_call() and the payload bytes sent
 * to other ranks to the transport's counters. */
static void end_call(struct moe_transport *t, uint64_t wait_before_ns,
                     uint64_t bytes_sent)
{
    t->wait_ns[t->step] += comm_of(t)->wait_ns[t->step] - wait_before_ns;
    t->bytes_sent[t->step] += bytes_sent;
}

static int shm_alltoallv(struct moe_transport *t, const void *send,
                         const uint64_t *send_bytes, const uint64_t *send_offsets,
                         void *recv, const uint64_t *recv_bytes,
                         const uint64_t *recv_offsets)
{
    uint64_t wait_before_ns = begin_call(t);
    int rc = moe_alltoallv(comm_of(t), send, send_bytes, send_offsets, recv,
                           recv_bytes, recv_offsets);
    uint64_t sent = 0;
    for (int d = 0; rc == 0 && d < t->ranks; d++)
        if (d != t->rank)
            sent += send_bytes[d];
    end_call(t, wait_before_ns, sent);
    return rc;
}

static int shm_allgather(struct moe_transport *t, const void *send,
                         uint64_t bytes, void *recv)
{
    uint64_t wait_before_ns = begin_call(t);
    int rc = moe_allgather(comm_of(t), send, bytes, recv);
    end_call(t, wait_before_ns, rc ? 0 : (uint64_t)(t->ranks - 1) * bytes);
    return rc;
}

static int shm_allreduce_i64(struct moe_transport *t, int64_t *values,
                             int64_t count)
{
    if (count < 0)
        return moe_fail(-EINVAL, "rank %d: all-reduce of %" PRId64 " values: "
                        "the count must not be negative", t->rank, count);
    uint64_t wait_before_ns = begin_call(t);
    int rc = moe_allreduce_i64(comm_of(t), values, count);
    uint64_t sent = rc ? 0 : (uint64_t)(t->ranks - 1) * (uint64_t)count *
                             sizeof(int64_t);
    end_call(t, wait_before_ns, sent);
    t->allreduce_bytes += sent;
    return rc;
}

static int shm_barrier(struct moe_transport *t)
{
    uint64_t wait_before_ns = begin_call(t);
    int rc = moe_barrier(comm_of(t));
    end_call(t, wait_before_ns, 0);
    return rc;
}

/* An all-to-all in which every rank sends its block to the root only and
 * only the root receives. A peer that sends more than recv_bytes announces
 * fails the root's call with -EPROTO. A peer that sends less makes it time
 * out. */
static int shm_gatherv(struct moe_transport *t, const void *send,
                       uint64_t send_bytes, void *recv,
                       const uint64_t *recv_bytes, const uint64_t *recv_offsets,
                       int root)
{
    int R = t->ranks, me = t->rank;
    if (root < 0 || root >= R)
        return moe_fail(-EINVAL, "rank %d: gather to root %d: the root must be "
                        "a rank from 0 to %d", me, root, R - 1);
    if (me == root && (!recv_bytes || !recv_offsets || !recv))
        return moe_fail(-EINVAL, "rank %d: gather: the root needs the receive "
                        "buffer, sizes and offsets", me);

    uint64_t *table = ((struct shm_state *)t->state)->table;
    uint64_t *to_bytes = table, *to_offsets = table + R;
    uint64_t *from_bytes = table + 2 * R, *from_offsets = table + 3 * R;
    for (int p = 0; p < R; p++) {
        to_bytes[p] = p == root ? send_bytes : 0;
        to_offsets[p] = 0;
        from_bytes[p] = me == root ? recv_bytes[p] : 0;
        from_offsets[p] = me == root ? recv_offsets[p] : 0;
    }

    uint64_t wait_before_ns = begin_call(t);
    int rc = moe_alltoallv(comm_of(t), send, to_bytes, to_offsets, recv,
                           from_bytes, from_offsets);
    end_call(t, wait_before_ns, rc == 0 && me != root ? send_bytes : 0);
    return rc;
}

static void shm_abort(struct moe_transport *t, int status)
{
    (void)status;
    moe_segment_abort(comm_of(t)->segment);
}

static void shm_close(struct moe_transport *t)
{
    struct shm_state *s = t->state;
    if (s) {
        if (s->comm->on_wait_arg == t) {
            s->comm->on_wait = NULL;
            s->comm->on_wait_arg = NULL;
        }
        free(s->table);
    }
    free(s);
    t->state = NULL;
}

static int shm_notes_begin(struct moe_transport *t, uint64_t *store, uint64_t per_source)
{
    moe_comm_set_step(comm_of(t), t->step);
    return moe_notes_begin(comm_of(t), store, per_source);
}

static int shm_notes_send(struct moe_transport *t, int d, uint64_t value)
{
    uint64_t wait_before_ns = begin_call(t);
    int rc = moe_notes_send(comm_of(t), d, value);
    end_call(t, wait_before_ns, 0);
    return rc;
}

static int shm_notes_wait(struct moe_transport *t, const uint64_t *need)
{
    uint64_t wait_before_ns = begin_call(t);
    int rc = moe_notes_wait(comm_of(t), need);
    end_call(t, wait_before_ns, 0);
    return rc;
}

static const struct moe_transport_ops SHM_OPS = {
    .allgather = shm_allgather,
    .alltoallv = shm_alltoallv,
    .allreduce_i64 = shm_allreduce_i64,
    .barrier = shm_barrier,
    .gatherv = shm_gatherv,
    .abort = shm_abort,
    .close = shm_close,
    .notes_begin = shm_notes_begin,
    .notes_send = shm_notes_send,
    .notes_wait = shm_notes_wait,
};

/* Passes a wait in the rings on to the transport's hook. */
static void forward_wait(void *arg, int step, int64_t start_ns, int64_t end_ns)
{
    struct moe_transport *t = arg;
    if (t->on_wait)
        t->on_wait(t->on_wait_arg, step, start_ns, end_ns);
}

int moe_transport_shm_open(struct moe_transport *t, struct moe_comm *comm)
{
    *t = (struct moe_transport){
        .ops = &SHM_OPS,
        .name = "shm",
        .kind = MOE_TRANSPORT_SHM,
        .rank = comm->rank,
        .ranks = comm->ranks,
        .step = comm->step,
    };
    struct shm_state *s = calloc(1, sizeof *s);
    uint64_t *table = calloc(4 * (size_t)comm->ranks, sizeof *table);
    if (!s || !table) {
        free(s);
        free(table);
        t->ops = NULL;
        return moe_fail(-ENOMEM, "rank %d: out of memory for the shm transport",
                        comm->rank);
    }
    s->comm = comm;
    s->table = table;
    t->state = s;
    comm->on_wait = forward_wait;
    comm->on_wait_arg = t;
    return 0;
}

int moe_transport_parse_kind(const char *flag, const char *text,
                             enum moe_transport_kind *kind)
{
    if (!strcmp(text, "shm")) {
        *kind = MOE_TRANSPORT_SHM;
        return 0;
    }
    if (!strcmp(text, "mpi")) {
        *kind = MOE_TRANSPORT_MPI;
        return 0;
    }
    return moe_fail(-EINVAL, "invalid %s value '%s': expected shm or mpi", flag,
                    text);
}
