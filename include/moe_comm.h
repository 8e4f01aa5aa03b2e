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
    /* The current note exchange (moe_notes_begin). */
    uint64_t *notes;                /* (R x notes_per_source) values */
    uint64_t notes_per_source;
    uint64_t *notes_got;            /* (R) notes received per peer */
    uint64_t *notes_sent;           /* (R) notes sent per peer */
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

/* Notes: small ring records for exchanges whose data moves outside the
 * rings. A note is one uint64 value sent to one peer, tagged with the
 * current exchange's sequence number. The data itself is written straight
 * into the receiver's memory in the segment (its window), and the note
 * marks a part of it as complete. So each byte crosses once, while the
 * rings still carry every message between the ranks.
 *
 * moe_notes_begin() starts an exchange: it takes the next sequence number
 * and gives the storage for the values received, per_source values from
 * each rank s at store[s * per_source]. moe_notes_send() sends one value to
 * rank d; when the ring is full it waits for room, draining incoming notes
 * meanwhile so that two ranks sending to each other cannot deadlock.
 * moe_notes_wait() returns when at least need[s] notes have come from every
 * rank s (need[me] is ignored). c->notes_got[s] counts those that came.
 * Both return 0, -EPROTO (a record with the wrong tag or length),
 * -ETIMEDOUT or -ECANCELED. A peer may start its next exchange before this
 * rank has finished, so records after the per_source-th are left for the
 * next call, where a note too many shows as a record with the wrong tag.
 * The values are the peers' to choose: the caller checks them. */
int moe_notes_begin(struct moe_comm *comm, uint64_t *store, uint64_t per_source);
int moe_notes_send(struct moe_comm *comm, int d, uint64_t value);
int moe_notes_wait(struct moe_comm *comm, const uint64_t *need);

/* All-to-all that writes each block straight into its receiver's memory.
 * This rank copies send_bytes[d] bytes from send + send_offsets[d] to
 * dst[d], a pointer into rank d's part of the segment as mapped in this
 * process, then sends d a note with the byte count. It returns when every
 * peer s has sent a note whose count equals recv_bytes[s]. This rank's own
 * buffer then contains the data at the places its peers wrote to.
 * Each byte is copied once. The caller keeps a peer from overwriting a
 * block before its receiver is done with it: the next exchange into the
 * same place must follow a collective that the receiver enters only when
 * done (the forward's next layout exchange does this), or alternate
 * between two places. Returns as moe_alltoallv(), and -EPROTO when a
 * peer's count differs from recv_bytes. */
int moe_alltoallv_direct(struct moe_comm *comm, const void *send,
                         const uint64_t *send_bytes, const uint64_t *send_offsets,
                         void *const *dst, const uint64_t *recv_bytes);

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
