/*
 * transport_mpi.c - the "mpi" transport: the moe_transport interface over
 * MPI collectives, for ranks that mpirun started on one machine or several.
 *
 * Runs in every MPI process. Owns a duplicate of MPI_COMM_WORLD, with
 * errors returned instead of ending the job, and a watchdog thread. Built
 * against Open MPI 4.1 (MPI 3.1); without MPI (make MPI=0) the stubs at the
 * end of this file take its place.
 *
 * The collectives:
 *   all-to-all  MPI_Alltoall of the sizes, so that every rank checks what
 *               its peers will send against recv_bytes, then MPI_Alltoallv
 *               of the bytes;
 *   all-gather  MPI_Allgather;
 *   all-reduce  MPI_Allreduce in place with MPI_INT64_T and MPI_SUM. The
 *               sums are exact, so the order in which MPI adds does not
 *               change the bits, and they equal the shm transport's;
 *   barrier     MPI_Barrier;
 *   gather      MPI_Allgather of the sizes, then MPI_Gatherv.
 *
 * Large messages: MPI 3.1 passes counts and displacements as int, so a
 * block or offset above INT_MAX bytes cannot be described in bytes. Such a
 * call becomes one MPI_Alltoallw on MPI_BOTTOM in which each peer's block
 * is a derived datatype at the block's absolute address (MPI_Get_address):
 * q chunks of 1 GiB (MPI_Type_contiguous) followed by the remaining bytes.
 * Every rank must take the same path. The size exchange of the all-to-all
 * and of the gather therefore carries each rank's "needs the large path"
 * flag, and all ranks OR them. The all-gather decides from `bytes`, which
 * is the same on every rank. An all-reduce of more than INT_MAX values is
 * split into several calls.
 *
 * Timeout: a blocking MPI call cannot be left, so a peer that stalls would
 * hang the job. A watchdog thread, which makes no MPI calls, checks every
 * timeout / 8 (between 1 and 100 ms) how long the current collective has
 * run. Past the timeout it writes a message to stderr and ends the process
 * with _exit(3). mpirun then ends the other ranks, because a rank exited
 * without MPI_Finalize.
 */
#include "moe_transport.h"
#include "moe_error.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if MOE_HAVE_MPI

#include "moe_launch.h"

#include <mpi.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

static const uint64_t DEFAULT_CHUNK_BYTES = 1ULL << 30;

/* The watchdog thread and what it watches. The rank's thread writes the
 * call fields around every MPI call; the watchdog only reads them. */
struct watchdog {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake; /* signalled by close; waits on CLOCK_MONOTONIC */
    int stop;            /* under lock */
    int started;
    int64_t timeout_ns;
    int64_t poll_ns;
    int rank, ranks;
    /* Start of the running call, in moe_now_ns() time, or 0 between calls.
     * Stored with release after call_name and call_step, and loaded with
     * acquire before them. */
    _Atomic int64_t call_start_ns;
    _Atomic(const char *) call_name;
    _Atomic int call_step;
};

struct mpi_state {
    MPI_Comm comm;
    uint64_t int_limit;   /* sizes and offsets above this take the large path */
    uint64_t chunk_bytes; /* bytes per chunk of the large path */
    MPI_Datatype chunk_type; /* chunk_bytes contiguous bytes */
    int chunk_type_valid;

    /* Scratch, (R) each unless stated. */
    uint64_t *announce_out; /* (2R) sizes and flag sent in a size exchange */
    uint64_t *announce_in;  /* (2R) sizes and flags received */
    int *send_counts, *send_displs, *recv_counts, *recv_displs;
    int *zero_displs;       /* all 0, for MPI_Alltoallw */
    MPI_Datatype *send_types, *recv_types;

    struct watchdog watchdog;
};

static struct mpi_state *state_of(struct moe_transport *t)
{
    return t->state;
}

/* ---- watchdog ---------------------------------------------------------- */

static void report_timeout_and_exit(const struct watchdog *w, const char *call,
                                    int step, int64_t elapsed_ns)
{
    char text[512];
    int n = snprintf(text, sizeof text,
                     "moe-ep: rank %d of %d: %s in %s did not complete within "
                     "%.3g s (it has run %.3g s): a peer failed, stalled or did "
                     "not call it. Ending this rank so that mpirun ends the job.\n",
                     w->rank, w->ranks, call, moe_step_name(step),
                     (double)w->timeout_ns / 1e9, (double)elapsed_ns / 1e9);
    if (n > (int)sizeof text - 1)
        n = (int)sizeof text - 1;
    if (write(STDERR_FILENO, text, (size_t)n) < 0) {
        /* Nothing else can report it; the exit status still does. */
    }
    _exit(MOE_RANK_EXIT_FAILED);
}

static void *watchdog_main(void *arg)
{
    struct watchdog *w = arg;
    pthread_mutex_lock(&w->lock);
    while (!w->stop) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        int64_t ns = until.tv_nsec + w->poll_ns;
        until.tv_sec += ns / 1000000000;
        until.tv_nsec = ns % 1000000000;
        pthread_cond_timedwait(&w->wake, &w->lock, &until);
        if (w->stop)
            break;

        int64_t start = atomic_load_explicit(&w->call_start_ns, memory_order_acquire);
        if (start == 0)
            continue;
        int64_t elapsed_ns = moe_now_ns() - start;
        if (elapsed_ns > w->timeout_ns)
            report_timeout_and_exit(
                w, atomic_load_explicit(&w->call_name, memory_order_relaxed),
                atomic_load_explicit(&w->call_step, memory_order_relaxed),
                elapsed_ns);
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

static int watchdog_start(struct watchdog *w, int rank, int ranks,
                          int64_t timeout_ns)
{
    w->rank = rank;
    w->ranks = ranks;
    w->timeout_ns = timeout_ns;
    w->poll_ns = timeout_ns / 8;
    if (w->poll_ns < 1000000)
        w->poll_ns = 1000000;
    if (w->poll_ns > 100000000)
        w->poll_ns = 100000000;
    atomic_init(&w->call_start_ns, 0);
    atomic_init(&w->call_name, "");
    atomic_init(&w->call_step, 0);

    pthread_condattr_t attr;
    int rc = pthread_condattr_init(&attr);
    if (rc == 0)
        rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    if (rc == 0)
        rc = pthread_cond_init(&w->wake, &attr);
    pthread_condattr_destroy(&attr);
    if (rc)
        return moe_fail(-rc, "rank %d: cannot create the watchdog's condition "
                        "variable: %s", rank, strerror(rc));
    pthread_mutex_init(&w->lock, NULL);
    w->stop = 0;
    if ((rc = pthread_create(&w->thread, NULL, watchdog_main, w))) {
        pthread_cond_destroy(&w->wake);
        pthread_mutex_destroy(&w->lock);
        return moe_fail(-rc, "rank %d: cannot start the watchdog thread: %s",
                        rank, strerror(rc));
    }
    w->started = 1;
    return 0;
}

static void watchdog_stop(struct watchdog *w)
{
    if (!w->started)
        return;
    pthread_mutex_lock(&w->lock);
    w->stop = 1;
    pthread_cond_signal(&w->wake);
    pthread_mutex_unlock(&w->lock);
    pthread_join(w->thread, NULL);
    pthread_cond_destroy(&w->wake);
    pthread_mutex_destroy(&w->lock);
    w->started = 0;
}

/* Marks the start of MPI call `name` for the watchdog and returns the start
 * time. */
static int64_t begin_call(struct moe_transport *t, const char *name)
{
    struct watchdog *w = &state_of(t)->watchdog;
    int64_t start = moe_now_ns();
    atomic_store_explicit(&w->call_name, name, memory_order_relaxed);
    atomic_store_explicit(&w->call_step, t->step, memory_order_relaxed);
    atomic_store_explicit(&w->call_start_ns, start, memory_order_release);
    return start;
}

/* Marks the end of the MPI call started at `start` and charges its time to
 * the step's wait counter. */
static void end_call(struct moe_transport *t, int64_t start)
{
    atomic_store_explicit(&state_of(t)->watchdog.call_start_ns, 0,
                          memory_order_relaxed);
    int64_t end = moe_now_ns();
    t->wait_ns[t->step] += (uint64_t)(end - start);
    if (t->on_wait)
        t->on_wait(t->on_wait_arg, t->step, start, end);
}

/* ---- helpers ----------------------------------------------------------- */

/* Records a failed MPI call with MPI's own text and returns -EIO. */
static int mpi_fail(struct moe_transport *t, int code, const char *call)
{
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    if (MPI_Error_string(code, text, &length) != MPI_SUCCESS)
        snprintf(text, sizeof text, "MPI error code %d", code);
    return moe_fail(-EIO, "rank %d: %s failed in %s: %s", t->rank, call,
                    moe_step_name(t->step), text);
}

/* Runs `expression`, an MPI call named `call`, under the watchdog and
 * returns -EIO from the enclosing function if it fails. */
#define CALL_MPI(t, call, expression)                                        \
    do {                                                                     \
        int64_t call_start_ = begin_call((t), (call));                       \
        int mpi_rc_ = (expression);                                          \
        end_call((t), call_start_);                                          \
        if (mpi_rc_ != MPI_SUCCESS)                                          \
            return mpi_fail((t), mpi_rc_, (call));                           \
    } while (0)

/* Describes `bytes` bytes at base + offset as one element of a derived
 * datatype at its absolute address, for MPI_Alltoallw on MPI_BOTTOM: q
 * chunks of chunk_bytes, then the rest as MPI_BYTE. An empty block is 0
 * elements of MPI_BYTE. The caller frees *type unless it is MPI_BYTE. */
static int block_type(struct moe_transport *t, const void *base, uint64_t offset,
                      uint64_t bytes, MPI_Datatype *type, int *count)
{
    struct mpi_state *s = state_of(t);
    *type = MPI_BYTE;
    *count = 0;
    if (bytes == 0)
        return 0;

    uint64_t chunks = bytes / s->chunk_bytes;
    uint64_t rest = bytes % s->chunk_bytes;
    if (chunks > INT_MAX)
        return moe_fail(-EINVAL, "rank %d: a block of %" PRIu64 " bytes in %s "
                        "exceeds the %" PRIu64 " bytes MPI can describe",
                        t->rank, bytes, moe_step_name(t->step),
                        (uint64_t)INT_MAX * s->chunk_bytes);

    MPI_Aint address;
    int rc = MPI_Get_address((const char *)base + offset, &address);
    if (rc != MPI_SUCCESS)
        return mpi_fail(t, rc, "MPI_Get_address");
    int lengths[2] = {(int)chunks, (int)rest};
    MPI_Aint displacements[2] = {
        address, MPI_Aint_add(address, (MPI_Aint)(chunks * s->chunk_bytes))};
    MPI_Datatype types[2] = {s->chunk_type, MPI_BYTE};
    MPI_Datatype block;
    if ((rc = MPI_Type_create_struct(2, lengths, displacements, types, &block)) !=
        MPI_SUCCESS)
        return mpi_fail(t, rc, "MPI_Type_create_struct");
    if ((rc = MPI_Type_commit(&block)) != MPI_SUCCESS) {
        MPI_Type_free(&block);
        return mpi_fail(t, rc, "MPI_Type_commit");
    }
    *type = block;
    *count = 1;
    return 0;
}

static void free_block_types(struct mpi_state *s, int ranks)
{
    for (int p = 0; p < ranks; p++) {
        if (s->send_types[p] != MPI_BYTE)
            MPI_Type_free(&s->send_types[p]);
        if (s->recv_types[p] != MPI_BYTE)
            MPI_Type_free(&s->recv_types[p]);
        s->send_types[p] = MPI_BYTE;
        s->recv_types[p] = MPI_BYTE;
    }
}

/* The large-message path of every collective: one MPI_Alltoallw in which
 * this rank sends send_bytes[d] bytes at send + send_offsets[d] to rank d
 * and receives recv_bytes[s] bytes at recv + recv_offsets[s] from rank s,
 * with 64-bit sizes and offsets. */
static int alltoallw_bytes(struct moe_transport *t, const void *send,
                           const uint64_t *send_bytes,
                           const uint64_t *send_offsets, void *recv,
                           const uint64_t *recv_bytes,
                           const uint64_t *recv_offsets)
{
    struct mpi_state *s = state_of(t);
    int R = t->ranks, rc = 0;
    for (int p = 0; rc == 0 && p < R; p++) {
        rc = block_type(t, send, send_offsets[p], send_bytes[p], &s->send_types[p],
                        &s->send_counts[p]);
        if (rc == 0)
            rc = block_type(t, recv, recv_offsets[p], recv_bytes[p],
                            &s->recv_types[p], &s->recv_counts[p]);
    }
    if (rc == 0) {
        int64_t start = begin_call(t, "MPI_Alltoallw");
        int mpi_rc = MPI_Alltoallw(MPI_BOTTOM, s->send_counts, s->zero_displs,
                                   s->send_types, MPI_BOTTOM, s->recv_counts,
                                   s->zero_displs, s->recv_types, s->comm);
        end_call(t, start);
        if (mpi_rc != MPI_SUCCESS)
            rc = mpi_fail(t, mpi_rc, "MPI_Alltoallw");
    }
    free_block_types(s, R);
    return rc;
}

/* ---- collectives ------------------------------------------------------- */

static int mpi_alltoallv(struct moe_transport *t, const void *send,
                         const uint64_t *send_bytes, const uint64_t *send_offsets,
                         void *recv, const uint64_t *recv_bytes,
                         const uint64_t *recv_offsets)
{
    struct mpi_state *s = state_of(t);
    int R = t->ranks, me = t->rank;
    if (send_bytes[me] != recv_bytes[me])
        return moe_fail(-EINVAL, "rank %d: in %s, %" PRIu64 " bytes sent to "
                        "itself but %" PRIu64 " expected", me,
                        moe_step_name(t->step), send_bytes[me], recv_bytes[me]);

    /* Size exchange: each peer's size for this rank, and whether any rank
     * needs the large path. */
    uint64_t large = 0;
    for (int p = 0; p < R; p++)
        large |= send_bytes[p] > s->int_limit || send_offsets[p] > s->int_limit ||
                 recv_bytes[p] > s->int_limit || recv_offsets[p] > s->int_limit;
    for (int p = 0; p < R; p++) {
        s->announce_out[2 * p] = send_bytes[p];
        s->announce_out[2 * p + 1] = large;
    }
    CALL_MPI(t, "MPI_Alltoall", MPI_Alltoall(s->announce_out, 2, MPI_UINT64_T,
                                             s->announce_in, 2, MPI_UINT64_T,
                                             s->comm));
    for (int p = 0; p < R; p++) {
        if (s->announce_in[2 * p] != recv_bytes[p])
            return moe_fail(-EPROTO, "rank %d: in %s, rank %d sends %" PRIu64
                            " bytes to this rank, but %" PRIu64 " are expected "
                            "(the ranks disagree on the layout)", me,
                            moe_step_name(t->step), p, s->announce_in[2 * p],
                            recv_bytes[p]);
        large |= s->announce_in[2 * p + 1];
    }

    int rc = 0;
    if (large) {
        rc = alltoallw_bytes(t, send, send_bytes, send_offsets, recv, recv_bytes,
                             recv_offsets);
    } else {
        for (int p = 0; p < R; p++) {
            s->send_counts[p] = (int)send_bytes[p];
            s->send_displs[p] = (int)send_offsets[p];
            s->recv_counts[p] = (int)recv_bytes[p];
            s->recv_displs[p] = (int)recv_offsets[p];
        }
        CALL_MPI(t, "MPI_Alltoallv",
                 MPI_Alltoallv(send, s->send_counts, s->send_displs, MPI_BYTE,
                               recv, s->recv_counts, s->recv_displs, MPI_BYTE,
                               s->comm));
    }
    if (rc == 0)
        for (int p = 0; p < R; p++)
            if (p != me)
                t->bytes_sent[t->step] += send_bytes[p];
    return rc;
}

static int mpi_allgather(struct moe_transport *t, const void *send,
                         uint64_t bytes, void *recv)
{
    struct mpi_state *s = state_of(t);
    int R = t->ranks;
    int rc = 0;
    /* The last block starts at (R - 1) x bytes, a displacement MPI computes
     * from the int count. */
    if (bytes > s->int_limit || (uint64_t)(R - 1) * bytes > s->int_limit) {
        uint64_t *table = malloc(4 * (size_t)R * sizeof *table);
        if (!table)
            return moe_fail(-ENOMEM, "rank %d: out of memory for an all-gather",
                            t->rank);
        for (int p = 0; p < R; p++) {
            table[p] = bytes;                       /* send_bytes */
            table[R + p] = 0;                       /* send_offsets */
            table[2 * R + p] = bytes;               /* recv_bytes */
            table[3 * R + p] = (uint64_t)p * bytes; /* recv_offsets */
        }
        rc = alltoallw_bytes(t, send, table, table + R, recv, table + 2 * R,
                             table + 3 * R);
        free(table);
    } else {
        CALL_MPI(t, "MPI_Allgather", MPI_Allgather(send, (int)bytes, MPI_BYTE,
                                                   recv, (int)bytes, MPI_BYTE,
                                                   s->comm));
    }
    if (rc == 0)
        t->bytes_sent[t->step] += (uint64_t)(R - 1) * bytes;
    return rc;
}

static int mpi_allreduce_i64(struct moe_transport *t, int64_t *values,
                             int64_t count)
{
    struct mpi_state *s = state_of(t);
    if (count < 0)
        return moe_fail(-EINVAL, "rank %d: all-reduce of %" PRId64 " values: "
                        "the count must not be negative", t->rank, count);
    for (int64_t done = 0; done < count;) {
        int64_t n = count - done;
        if ((uint64_t)n > s->int_limit)
            n = (int64_t)s->int_limit;
        CALL_MPI(t, "MPI_Allreduce", MPI_Allreduce(MPI_IN_PLACE, values + done,
                                                   (int)n, MPI_INT64_T, MPI_SUM,
                                                   s->comm));
        done += n;
    }
    uint64_t sent = (uint64_t)(t->ranks - 1) * (uint64_t)count * sizeof(int64_t);
    t->bytes_sent[t->step] += sent;
    t->allreduce_bytes += sent;
    return 0;
}

static int mpi_barrier(struct moe_transport *t)
{
    CALL_MPI(t, "MPI_Barrier", MPI_Barrier(state_of(t)->comm));
    return 0;
}

static int mpi_gatherv(struct moe_transport *t, const void *send,
                       uint64_t send_bytes, void *recv,
                       const uint64_t *recv_bytes, const uint64_t *recv_offsets,
                       int root)
{
    struct mpi_state *s = state_of(t);
    int R = t->ranks, me = t->rank;
    if (root < 0 || root >= R)
        return moe_fail(-EINVAL, "rank %d: gather to root %d: the root must be "
                        "a rank from 0 to %d", me, root, R - 1);
    if (me == root && (!recv_bytes || !recv_offsets || !recv))
        return moe_fail(-EINVAL, "rank %d: gather: the root needs the receive "
                        "buffer, sizes and offsets", me);

    /* Size exchange: every rank's size, for the root's check, and the
     * large-path flags. */
    uint64_t large = send_bytes > s->int_limit;
    if (me == root)
        for (int p = 0; p < R; p++)
            large |= recv_bytes[p] > s->int_limit || recv_offsets[p] > s->int_limit;
    s->announce_out[0] = send_bytes;
    s->announce_out[1] = large;
    CALL_MPI(t, "MPI_Allgather", MPI_Allgather(s->announce_out, 2, MPI_UINT64_T,
                                               s->announce_in, 2, MPI_UINT64_T,
                                               s->comm));
    for (int p = 0; p < R; p++) {
        if (me == root && s->announce_in[2 * p] != recv_bytes[p])
            return moe_fail(-EPROTO, "rank %d: in %s, rank %d sends %" PRIu64
                            " bytes to the gather's root, but %" PRIu64 " are "
                            "expected", me, moe_step_name(t->step), p,
                            s->announce_in[2 * p], recv_bytes[p]);
        large |= s->announce_in[2 * p + 1];
    }

    int rc = 0;
    if (large) {
        uint64_t *table = calloc(4 * (size_t)R, sizeof *table);
        if (!table)
            return moe_fail(-ENOMEM, "rank %d: out of memory for a gather", me);
        table[root] = send_bytes; /* send_bytes; send_offsets stay 0 */
        if (me == root)
            for (int p = 0; p < R; p++) {
                table[2 * R + p] = recv_bytes[p];
                table[3 * R + p] = recv_offsets[p];
            }
        rc = alltoallw_bytes(t, send, table, table + R, recv, table + 2 * R,
                             table + 3 * R);
        free(table);
    } else {
        if (me == root)
            for (int p = 0; p < R; p++) {
                s->recv_counts[p] = (int)recv_bytes[p];
                s->recv_displs[p] = (int)recv_offsets[p];
            }
        CALL_MPI(t, "MPI_Gatherv",
                 MPI_Gatherv(send, (int)send_bytes, MPI_BYTE, recv, s->recv_counts,
                             s->recv_displs, MPI_BYTE, root, s->comm));
    }
    if (rc == 0 && me != root)
        t->bytes_sent[t->step] += send_bytes;
    return rc;
}

static void mpi_abort(struct moe_transport *t, int status)
{
    MPI_Abort(state_of(t)->comm, status);
    _exit(status); /* MPI_Abort does not return; this is only a fallback */
}

static void free_state(struct mpi_state *s)
{
    if (!s)
        return;
    watchdog_stop(&s->watchdog);
    if (s->chunk_type_valid)
        MPI_Type_free(&s->chunk_type);
    if (s->comm != MPI_COMM_NULL)
        MPI_Comm_free(&s->comm);
    free(s->announce_out);
    free(s->announce_in);
    free(s->send_counts);
    free(s->send_displs);
    free(s->recv_counts);
    free(s->recv_displs);
    free(s->zero_displs);
    free(s->send_types);
    free(s->recv_types);
    free(s);
}

static void mpi_close(struct moe_transport *t)
{
    free_state(t->state);
    t->state = NULL;
}

static const struct moe_transport_ops MPI_OPS = {
    .allgather = mpi_allgather,
    .alltoallv = mpi_alltoallv,
    .allreduce_i64 = mpi_allreduce_i64,
    .barrier = mpi_barrier,
    .gatherv = mpi_gatherv,
    .abort = mpi_abort,
    .close = mpi_close,
};

/* ---- set-up ------------------------------------------------------------ */

int moe_transport_mpi_built(void)
{
    return 1;
}

int moe_transport_mpi_init(int *argc, char ***argv)
{
    int initialized = 0, provided = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
        int rc = MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided);
        if (rc != MPI_SUCCESS)
            return moe_fail(-EIO, "MPI_Init_thread failed with MPI error code %d",
                            rc);
    } else {
        MPI_Query_thread(&provided);
    }
    if (provided < MPI_THREAD_FUNNELED)
        return moe_fail(-EIO, "the MPI library provides thread level %d, below "
                        "MPI_THREAD_FUNNELED, which the watchdog thread needs",
                        provided);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    return 0;
}

int moe_transport_mpi_finalize(void)
{
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    if (!initialized || finalized)
        return 0;
    int rc = MPI_Finalize();
    if (rc != MPI_SUCCESS)
        return moe_fail(-EIO, "MPI_Finalize failed with MPI error code %d", rc);
    return 0;
}

/* (Re)creates the chunk datatype of chunk_bytes bytes. */
static int set_chunk_type(struct moe_transport *t, uint64_t chunk_bytes)
{
    struct mpi_state *s = state_of(t);
    if (s->chunk_type_valid) {
        MPI_Type_free(&s->chunk_type);
        s->chunk_type_valid = 0;
    }
    int rc = MPI_Type_contiguous((int)chunk_bytes, MPI_BYTE, &s->chunk_type);
    if (rc == MPI_SUCCESS)
        rc = MPI_Type_commit(&s->chunk_type);
    if (rc != MPI_SUCCESS)
        return mpi_fail(t, rc, "MPI_Type_contiguous");
    s->chunk_type_valid = 1;
    s->chunk_bytes = chunk_bytes;
    return 0;
}

/* Allocates the (R) and (2R) scratch arrays. Returns 0 or -ENOMEM. */
static int alloc_scratch(struct mpi_state *s, int R)
{
    s->announce_out = calloc(2 * (size_t)R, sizeof(uint64_t));
    s->announce_in = calloc(2 * (size_t)R, sizeof(uint64_t));
    s->send_counts = calloc((size_t)R, sizeof(int));
    s->send_displs = calloc((size_t)R, sizeof(int));
    s->recv_counts = calloc((size_t)R, sizeof(int));
    s->recv_displs = calloc((size_t)R, sizeof(int));
    s->zero_displs = calloc((size_t)R, sizeof(int));
    s->send_types = calloc((size_t)R, sizeof(MPI_Datatype));
    s->recv_types = calloc((size_t)R, sizeof(MPI_Datatype));
    if (!s->announce_out || !s->announce_in || !s->send_counts ||
        !s->send_displs || !s->recv_counts || !s->recv_displs ||
        !s->zero_displs || !s->send_types || !s->recv_types)
        return -ENOMEM;
    for (int p = 0; p < R; p++) {
        s->send_types[p] = MPI_BYTE;
        s->recv_types[p] = MPI_BYTE;
    }
    return 0;
}

int moe_transport_mpi_open(struct moe_transport *t, int64_t timeout_ns)
{
    *t = (struct moe_transport){.name = "mpi", .kind = MOE_TRANSPORT_MPI};
    if (timeout_ns <= 0)
        return moe_fail(-EINVAL, "invalid MPI transport timeout %" PRId64
                        " ns: expected a positive time", timeout_ns);
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized)
        return moe_fail(-EINVAL, "MPI is not initialised: call "
                        "moe_transport_mpi_init() before opening the transport");

    struct mpi_state *s = calloc(1, sizeof *s);
    if (!s)
        return moe_fail(-ENOMEM, "out of memory for the MPI transport");
    s->comm = MPI_COMM_NULL;
    s->int_limit = INT_MAX;
    t->state = s;

    int err = 0, rc = MPI_Comm_dup(MPI_COMM_WORLD, &s->comm);
    if (rc != MPI_SUCCESS)
        err = mpi_fail(t, rc, "MPI_Comm_dup");
    if (err == 0 && (rc = MPI_Comm_set_errhandler(s->comm, MPI_ERRORS_RETURN)))
        err = mpi_fail(t, rc, "MPI_Comm_set_errhandler");
    if (err == 0 && (rc = MPI_Comm_rank(s->comm, &t->rank)))
        err = mpi_fail(t, rc, "MPI_Comm_rank");
    if (err == 0 && (rc = MPI_Comm_size(s->comm, &t->ranks)))
        err = mpi_fail(t, rc, "MPI_Comm_size");
    if (err == 0 && alloc_scratch(s, t->ranks))
        err = moe_fail(-ENOMEM, "rank %d: out of memory for the MPI transport's "
                       "scratch arrays", t->rank);
    if (err == 0)
        err = set_chunk_type(t, DEFAULT_CHUNK_BYTES);
    if (err == 0)
        err = watchdog_start(&s->watchdog, t->rank, t->ranks, timeout_ns);
    if (err) {
        free_state(s);
        t->state = NULL;
        return err;
    }
    t->ops = &MPI_OPS;
    return 0;
}

int moe_transport_mpi_set_large_path(struct moe_transport *t, uint64_t int_limit,
                                     uint64_t chunk_bytes)
{
    if (t->kind != MOE_TRANSPORT_MPI || !t->state)
        return moe_fail(-EINVAL, "the large-message path is a setting of an "
                        "open mpi transport");
    if (chunk_bytes < 1 || chunk_bytes > int_limit || int_limit > INT_MAX)
        return moe_fail(-EINVAL, "invalid large-message path setting: int limit "
                        "%" PRIu64 ", chunk %" PRIu64 " bytes; expected "
                        "1 <= chunk <= limit <= %d", int_limit, chunk_bytes,
                        INT_MAX);
    int rc = set_chunk_type(t, chunk_bytes);
    if (rc == 0)
        state_of(t)->int_limit = int_limit;
    return rc;
}

#else /* !MOE_HAVE_MPI: the stubs of a build without MPI */

static int built_without_mpi(void)
{
    return moe_fail(-EINVAL, "invalid --transport value 'mpi': this moe-ep was "
                    "built without MPI, because mpicc was not found or make "
                    "MPI=0 was given. Install Open MPI (tools/install-deps.sh "
                    "does) and rebuild without MPI=0");
}

int moe_transport_mpi_built(void)
{
    return 0;
}

int moe_transport_mpi_init(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    return built_without_mpi();
}

int moe_transport_mpi_finalize(void)
{
    return 0;
}

int moe_transport_mpi_open(struct moe_transport *t, int64_t timeout_ns)
{
    (void)timeout_ns;
    *t = (struct moe_transport){.name = "mpi", .kind = MOE_TRANSPORT_MPI};
    return built_without_mpi();
}

int moe_transport_mpi_set_large_path(struct moe_transport *t, uint64_t int_limit,
                                     uint64_t chunk_bytes)
{
    (void)t;
    (void)int_limit;
    (void)chunk_bytes;
    return built_without_mpi();
}

#endif
