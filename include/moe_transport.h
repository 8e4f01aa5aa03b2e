/*
 * moe_transport.h - the collectives one rank of the layer calls, behind one
 * interface with two implementations:
 *
 *   "shm"  the shared-memory rings of moe_comm.h, between the rank
 *          processes that moe_launch forked on one machine
 *          (transport_shm.c);
 *   "mpi"  MPI collectives on a duplicate of MPI_COMM_WORLD, between the
 *          processes that mpirun started, on one machine or several
 *          (transport_mpi.c). Built against Open MPI 4.1; `make MPI=0`
 *          builds a stub whose entry points fail with "built without MPI".
 *
 * Contract of every collective, on both transports: every rank calls the
 * same collectives in the same order, with sizes that match between
 * sender and receiver, as MPI requires. A call returns when this rank's
 * part is complete, which needs every peer to take part. Sizes and offsets
 * are in bytes, as uint64_t, and have no 2 GiB limit. The same inputs give
 * the same output bytes on both transports: the all-to-all, all-gather and
 * gather only move bytes, and the all-reduce sums integers, which is exact
 * in any order.
 *
 * Errors: a call returns 0 or a negative errno with a message recorded by
 * moe_fail() (moe_error.h):
 *   -EINVAL     invalid arguments, such as a root out of range or a block
 *               to itself whose send and receive sizes differ;
 *   -EPROTO     a peer announced a size that differs from the size this
 *               rank expects (shm also: a record that fails its checks);
 *   -ETIMEDOUT  (shm) no progress for the segment's timeout;
 *   -ECANCELED  (shm) the run was aborted or the launcher died;
 *   -EIO        (mpi) an MPI call failed; the message has MPI's text;
 *   -ENOMEM     out of memory for scratch space.
 * A rank that fails must call moe_transport_abort(), so that no peer waits
 * for it. Under MPI a collective that has not returned after the timeout
 * given to moe_transport_mpi_open() ends its process, because MPI offers
 * no way to leave a blocking call. It writes a message to stderr and exits
 * with status 3, and mpirun then ends the other ranks.
 */
#ifndef MOE_TRANSPORT_H
#define MOE_TRANSPORT_H

#include "moe_comm.h"

#include <stdint.h>

enum moe_transport_kind {
    MOE_TRANSPORT_SHM,
    MOE_TRANSPORT_MPI,
};

struct moe_transport;

/* One implementation's collectives. The moe_transport_* wrappers below
 * give their semantics. */
struct moe_transport_ops {
    int (*allgather)(struct moe_transport *t, const void *send, uint64_t bytes,
                     void *recv);
    int (*alltoallv)(struct moe_transport *t, const void *send,
                     const uint64_t *send_bytes, const uint64_t *send_offsets,
                     void *recv, const uint64_t *recv_bytes,
                     const uint64_t *recv_offsets);
    int (*allreduce_i64)(struct moe_transport *t, int64_t *values, int64_t count);
    int (*barrier)(struct moe_transport *t);
    int (*gatherv)(struct moe_transport *t, const void *send, uint64_t send_bytes,
                   void *recv, const uint64_t *recv_bytes,
                   const uint64_t *recv_offsets, int root);
    void (*abort)(struct moe_transport *t, int status);
    void (*close)(struct moe_transport *t);
    /* Notes (moe_comm.h), for exchanges that write into the peers' windows
     * in the shared segment. Only shm has them; NULL under mpi. */
    int (*notes_begin)(struct moe_transport *t, uint64_t *store, uint64_t per_source);
    int (*notes_send)(struct moe_transport *t, int d, uint64_t value);
    int (*notes_wait)(struct moe_transport *t, const uint64_t *need);
};

/*
 * One rank's handle on a transport.
 *
 * Counters, per enum moe_step (the step set by moe_transport_set_step()):
 *   wait_ns     shm: time spent asleep waiting on peers inside the rings'
 *               collectives. mpi: all the time spent inside MPI calls,
 *               which also counts the copies MPI makes, so it is an upper
 *               bound on the waiting.
 *   bytes_sent  payload bytes that the calls' arguments send to other
 *               ranks, the same figure on both transports: an all-to-all
 *               counts send_bytes[d] for d != rank, an all-gather
 *               (R - 1) x bytes, a gather send_bytes on ranks other than
 *               the root, an all-reduce (R - 1) x count x 8, a barrier 0.
 *               Headers, size announcements and the bytes MPI's own
 *               algorithms forward are not counted.
 *   allreduce_bytes  of bytes_sent, the part sent by all-reduces.
 */
struct moe_transport {
    const struct moe_transport_ops *ops;
    const char *name; /* "shm" or "mpi", for output and the stats file */
    enum moe_transport_kind kind;
    int rank;         /* this rank, 0 <= rank < ranks */
    int ranks;        /* R */
    int step;         /* enum moe_step that the counters are charged to */
    uint64_t wait_ns[MOE_STEP_COUNT];
    uint64_t bytes_sent[MOE_STEP_COUNT];
    uint64_t allreduce_bytes;
    /* Called with the start and end (moe_now_ns) of each wait on peers,
     * when set: shm reports each sleep in the rings, mpi each whole MPI
     * call. The run's trace records them. */
    void (*on_wait)(void *arg, int step, int64_t start_ns, int64_t end_ns);
    void *on_wait_arg;
    void *state;      /* the implementation's own data */
};

/* Parses a --transport value, "shm" or "mpi", into *kind. Returns 0 or
 * -EINVAL with a message naming `flag` and the value. */
int moe_transport_parse_kind(const char *flag, const char *text,
                             enum moe_transport_kind *kind);

/* ---- shm --------------------------------------------------------------- */

/* Wraps a rank's attached struct moe_comm, which must outlive the
 * transport and is not detached by moe_transport_close(). Step and
 * timeout come from the comm and its segment. Returns 0 or -ENOMEM. */
int moe_transport_shm_open(struct moe_transport *t, struct moe_comm *comm);

/* ---- mpi --------------------------------------------------------------- */

/* Returns 1 when this build contains the MPI transport, 0 for MPI=0. */
int moe_transport_mpi_built(void);

/* Initialises MPI in a process that mpirun started (a process started
 * without mpirun becomes a job of one rank). Requests
 * MPI_THREAD_FUNNELED, because the timeout watchdog is a thread that
 * makes no MPI calls, and makes MPI calls on MPI_COMM_WORLD return errors
 * instead of ending the job. argc and argv may be NULL. Returns 0, -EINVAL
 * in a build without MPI, or -EIO. */
int moe_transport_mpi_init(int *argc, char ***argv);

/* Calls MPI_Finalize after every transport is closed. Returns 0 or -EIO. */
int moe_transport_mpi_finalize(void);

/* Opens the transport on a duplicate of MPI_COMM_WORLD: rank and ranks are
 * MPI's. `timeout_ns` (> 0) bounds every collective, measured from its
 * start, as the file header describes. Returns 0, -EINVAL in a build
 * without MPI or for a timeout <= 0, -ENOMEM, or -EIO. */
int moe_transport_mpi_open(struct moe_transport *t, int64_t timeout_ns);

/* For tests: messages whose sizes or offsets exceed `int_limit` bytes take
 * the large-message path (the mpi transport's file header describes it),
 * which sends them in chunks of `chunk_bytes`. An all-reduce of more than
 * `int_limit` values is split into calls of at most that many. The
 * defaults are INT_MAX and 1 GiB. Lower values let a test run these paths
 * with small messages. Every rank must set the same values. Returns 0, or -EINVAL unless
 * 1 <= chunk_bytes <= int_limit <= INT_MAX and `t` is an mpi transport. */
int moe_transport_mpi_set_large_path(struct moe_transport *t, uint64_t int_limit,
                                     uint64_t chunk_bytes);

/* ---- the collectives --------------------------------------------------- */

/* Sets the step that following calls charge their counters to. */
static inline void moe_transport_set_step(struct moe_transport *t, int step)
{
    t->step = step;
}

/* Variable-size all-to-all with the semantics of moe_alltoallv(): this rank
 * sends send_bytes[d] bytes from send + send_offsets[d] to rank d and
 * receives recv_bytes[s] bytes from rank s into recv + recv_offsets[s]. All
 * arrays are (R), and the buffers must not overlap. recv_bytes must already
 * be known (from a layout exchange). A peer that announces another size
 * makes the call fail with -EPROTO. */
static inline int moe_transport_alltoallv(struct moe_transport *t,
                                          const void *send,
                                          const uint64_t *send_bytes,
                                          const uint64_t *send_offsets,
                                          void *recv, const uint64_t *recv_bytes,
                                          const uint64_t *recv_offsets)
{
    return t->ops->alltoallv(t, send, send_bytes, send_offsets, recv, recv_bytes,
                             recv_offsets);
}

/* Returns 1 when the transport has notes, so that the ranks can write
 * into each other's windows in one shared segment (shm), 0 otherwise. */
static inline int moe_transport_has_notes(const struct moe_transport *t)
{
    return t->ops->notes_send != NULL;
}

/* The notes of moe_comm.h, with the transport's counters: waits count in
 * wait_ns of the current step. A note's payload is not counted in
 * bytes_sent; the caller adds the bytes it wrote into a peer's window. */
static inline int moe_transport_notes_begin(struct moe_transport *t, uint64_t *store,
                                            uint64_t per_source)
{
    return t->ops->notes_begin(t, store, per_source);
}

static inline int moe_transport_notes_send(struct moe_transport *t, int d, uint64_t value)
{
    return t->ops->notes_send(t, d, value);
}

static inline int moe_transport_notes_wait(struct moe_transport *t, const uint64_t *need)
{
    return t->ops->notes_wait(t, need);
}

/* Gathers `bytes` bytes from every rank into recv (R x bytes), rank s's
 * block at s x bytes. Every rank must pass the same `bytes`. This is the
 * layout exchange. */
static inline int moe_transport_allgather(struct moe_transport *t,
                                          const void *send, uint64_t bytes,
                                          void *recv)
{
    return t->ops->allgather(t, send, bytes, recv);
}

/* Sums `count` int64 values over all ranks, in place, with the semantics of
 * moe_allreduce_i64(): every rank ends with the same exact sums, for any
 * rank count, as long as no partial sum overflows int64. */
static inline int moe_transport_allreduce_i64(struct moe_transport *t,
                                              int64_t *values, int64_t count)
{
    return t->ops->allreduce_i64(t, values, count);
}

/* Returns when every rank has entered the barrier. */
static inline int moe_transport_barrier(struct moe_transport *t)
{
    return t->ops->barrier(t);
}

/* Gathers variable-size blocks to `root`: every rank sends send_bytes bytes
 * from send, and the root receives rank s's block into
 * recv + recv_offsets[s], where recv_bytes[s] must equal rank s's
 * send_bytes. recv, recv_bytes and recv_offsets ((R) each) are read only
 * on the root and may be NULL elsewhere. */
static inline int moe_transport_gatherv(struct moe_transport *t, const void *send,
                                        uint64_t send_bytes, void *recv,
                                        const uint64_t *recv_bytes,
                                        const uint64_t *recv_offsets, int root)
{
    return t->ops->gatherv(t, send, send_bytes, recv, recv_bytes, recv_offsets,
                           root);
}

/* Ends the run on every rank after this rank failed. mpi: calls MPI_Abort
 * with `status` as the job's exit status and does not return. shm: sets
 * the segment's abort flag, which wakes every peer with -ECANCELED, and
 * returns, so that the rank can return its error to the launcher. */
static inline void moe_transport_abort(struct moe_transport *t, int status)
{
    t->ops->abort(t, status);
}

/* Frees the transport's own data. The mpi transport also stops its
 * watchdog and frees its communicator. */
static inline void moe_transport_close(struct moe_transport *t)
{
    if (t->ops)
        t->ops->close(t);
    t->ops = NULL;
}

#endif
