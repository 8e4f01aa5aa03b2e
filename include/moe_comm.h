/*
 * moe_comm.h - collectives between the ranks of one run, built on the
 * shared-memory rings.
 *
 * A struct moe_comm is one rank's process-local handle: its producer ends
 * of the R rings it writes (me -> d) and its consumer ends of the R rings it
 * reads (s -> me). Every rank must call the same collectives in the same
 * order; each call gets the next sequence number, which tags its records,
 * so a record from a mismatched call is detected instead of misread.
 *
 * Blocking: each call returns when this rank's part is complete, which
 * needs every peer to take part. It waits with the rule of
 * moe_doorbell_wait(); if no peer makes progress for the segment's timeout,
 * the call fails with -ETIMEDOUT and a message naming the peer and the step.
 */
#ifndef MOE_COMM_H
#define MOE_COMM_H

#include "moe_shm.h"

#include <stdint.h>

struct moe_comm {
    int rank;  /* this rank, 0 <= rank < ranks */
    int ranks; /* R */
    struct moe_segment_header *segment;
    void *app;                      /* the app area, from the validated copy
                                       of the header taken at attach */
    uint64_t app_bytes;             /* its size, from the same copy */
    struct moe_ring_producer *to;   /* (R): to[d] writes ring (rank, d) */
    struct moe_ring_consumer *from; /* (R): from[s] reads ring (s, rank) */
    uint32_t sequence;              /* collectives started so far */
    uint32_t max_chunk;             /* payload bytes per record */
    int step;                       /* enum moe_step, for messages and stats */
    uint64_t *sent;                 /* (R) scratch: bytes sent per peer */
    uint64_t *received;             /* (R) scratch: bytes received per peer */
    uint64_t wait_ns[MOE_STEP_COUNT]; /* time spent waiting, per step */
    uint64_t bytes_sent[MOE_STEP_COUNT]; /* bytes written to rings, per step */
    uint64_t allreduce_bytes;       /* of those, sent by moe_allreduce_i64 */
    /* Called after every wait on a peer with its start and end
     * (moe_now_ns), when set; the run's trace records them. */
    void (*on_wait)(void *arg, int step, int64_t start_ns, int64_t end_ns);
    void *on_wait_arg;
};

/* Attaches `rank` to the rings of a validated segment. Returns 0, -ENOMEM,
 * or -EPROTO if a ring's header is corrupt. */
int moe_comm_attach(struct moe_comm *comm, struct moe_segment_header *segment,
                    int rank);
void moe_comm_detach(struct moe_comm *comm);

/* Sets the step that following waits are attributed to. */
void moe_comm_set_step(struct moe_comm *comm, int step);

/* Variable-size all-to-all with MPI_Alltoallv semantics, in bytes: this rank
 * sends send_bytes[d] bytes from send + send_offsets[d] to rank d, and
 * receives recv_bytes[s] bytes from rank s into recv + recv_offsets[s].
 * All arrays are (R), and the send and receive buffers must not overlap.
 * The caller must already know recv_bytes (from a layout exchange). The
 * rank's own block is copied locally. Sends and receives progress with all
 * peers at once, so bounded rings cannot deadlock.
 * Returns 0, or:
 *   -EINVAL     send_bytes[rank] differs from recv_bytes[rank];
 *   -EPROTO     a peer sent more than announced, or a record with the
 *               wrong tag or an invalid header;
 *   -ETIMEDOUT  no progress for the segment's timeout;
 *   -ECANCELED  the run was aborted or the launcher died. */
int moe_alltoallv(struct moe_comm *comm, const void *send,
                  const uint64_t *send_bytes, const uint64_t *send_offsets,
                  void *recv, const uint64_t *recv_bytes,
                  const uint64_t *recv_offsets);

/* Gathers `bytes` bytes from every rank into recv (R * bytes), rank s's
 * block at s * bytes. */
int moe_allgather(struct moe_comm *comm, const void *send, uint64_t bytes,
                  void *recv);

/* Sums `count` int64 values over all ranks, in place: every rank ends with
 * values[i] = sum over ranks r = 0..R-1, in that order, of rank r's
 * values[i]. Integer sums are exact, so the result is the same bits on
 * every rank and for any rank count. moe_aux.h turns float sums into
 * integers for this. Built on the rings as an all-gather followed by a
 * local sum, which costs (R - 1) * count * 8 bytes sent per rank and suits
 * the small vectors it is used for. The bytes also count in
 * allreduce_bytes. */
int moe_allreduce_i64(struct moe_comm *comm, int64_t *values, int64_t count);

/* Returns when every rank has entered the barrier. */
int moe_barrier(struct moe_comm *comm);

#endif
