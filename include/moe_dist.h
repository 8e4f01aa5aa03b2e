/*
 * moe_dist.h - the expert-parallel forward of one rank, and the run area it
 * shares with the launcher.
 *
 * Each rank owns a contiguous block of tokens and a contiguous block of
 * experts (moe_block_range). One forward is five steps:
 *   route     gate logits, scores and top-k for the rank's own tokens
 *   layout    all-gather of the (E) count of rows each rank sends to each
 *             expert, which gives every rank the full (R, E) layout. Then
 *             the all-reduce of the router stats for the aux losses, and,
 *             with a capacity, the decision of which rows each expert
 *             keeps (see src/dist.c).
 *   dispatch  all-to-all of the token rows, then a local reorder so that
 *             each owned expert's rows are in global token order
 *   compute   one SwiGLU call per owned expert over all of its rows, and
 *             the shared expert, if any, over the rank's own tokens
 *   combine   the reverse all-to-all, then the weighted sum per token plus
 *             the shared expert's row
 * A rank that owns no expert, or has no token, still takes part in every
 * collective.
 */
#ifndef MOE_DIST_H
#define MOE_DIST_H

#include "moe_comm.h"
#include "moe_layer.h"
#include "moe_transport.h"

#define MOE_RUN_AREA_MAGIC 0x4e5552455045454dULL /* "MEEPERUN" read as bytes */

/* The contents of a run area besides the output. */
struct moe_run_area_spec {
    int dump;        /* the stage arrays of --dump */
    int64_t steps;   /* forwards the ranks run (--steps), at least 1 */
    int trace;       /* a trace buffer for every rank (--trace) */
    int windows;     /* a window pair for every rank, for the direct
                        exchange of the shm transport */
};

/* One span of a rank's trace: a step of one forward, or one wait on peers
 * inside it. Times are moe_now_ns(), the same clock in every rank. */
enum moe_trace_kind { MOE_TRACE_STEP = 0, MOE_TRACE_WAIT = 1, MOE_TRACE_EXPERT = 2 };
struct moe_trace_event {
    int64_t start_ns, end_ns;
    int32_t kind;    /* enum moe_trace_kind */
    int32_t step;    /* enum moe_step */
    int64_t forward; /* 0 .. steps - 1 */
    uint64_t bytes;  /* STEP: bytes this rank sent in the step;
                        EXPERT: the rows of the expert's call */
    int64_t expert;  /* EXPERT: which expert; the span is its call */
};

/* Waits closer together than this are merged into one trace span. */
#define MOE_TRACE_MERGE_NS 20000

/* Per-rank figures for the launcher's report, summed over all forwards
 * unless a field's comment gives another rule. */
struct moe_rank_report {
    int64_t received_rows;  /* rows received in the last forward */
    uint64_t saved_bytes;   /* dispatch and combine bytes this rank did not
                               send because the capacity dropped the rows */
    uint64_t bytes_sent[MOE_STEP_COUNT]; /* through the rings, per step */
    uint64_t allreduce_bytes;  /* of bytes_sent, for the all-reduce */
    uint64_t capacity_bytes;   /* of bytes_sent, for the probs policy's
                                  weight and keep-flag exchange */
    int64_t trace_events;      /* events written to this rank's buffer */
    int64_t trace_dropped;     /* spans not recorded because the buffer was
                                  full */
    int64_t trace_full_forward; /* the forward in which it filled up */
};

/* The app area of a `moe-ep run` segment: a small header, then the arrays
 * at the offsets it gives (bytes from the start of the area). Each rank
 * writes only its own rows. Arrays marked "last forward" hold the final
 * forward of a --steps run. */
struct moe_run_area {
    uint64_t magic;
    struct moe_shape shape;
    int64_t ranks;
    int64_t dump;           /* 1 when the stage arrays below are present */
    int64_t steps;          /* forwards, at least 1 */
    int64_t trace_capacity; /* events per rank, or 0 without a trace */
    uint64_t output_offset; /* float (T, H): the layer output, last forward */
    uint64_t counts_offset; /* int64 (R, E): rows rank r routed to expert e,
                               last forward, before any drop */
    uint64_t kept_offset;   /* uint8 (T, K): 1 when assignment (t, k)
                               survived the capacity, last forward */
    uint64_t kept_counts_offset; /* int64 (R, E): of counts, the rows expert
                                    e kept; written by e's owner */
    uint64_t stats_offset;  /* int64 (steps, moe_router_stats_len(E)): the
                               whole batch's router stats of each forward,
                               written by rank 0 */
    uint64_t dropped_offset; /* int64 (steps, E): assignments expert e
                                dropped in each forward; by e's owner */
    uint64_t rank_report_offset; /* struct moe_rank_report (R) */
    uint64_t trace_offset;  /* struct moe_trace_event (R, trace_capacity) */
    /* The stages of --dump, each 0 when absent: */
    uint64_t logits_offset;     /* float (T, E) */
    uint64_t scores_offset;     /* float (T, E) */
    uint64_t ids_offset;        /* int32 (T, K) */
    uint64_t weights_offset;    /* float (T, K) */
    uint64_t expert_out_offset; /* float (T, K, H): expert outputs back home,
                                   before weighting; zero for a dropped
                                   assignment */
    uint64_t shared_out_offset; /* float (T, H), when the layer has a shared
                                   expert */
    uint64_t recv_x_offset;     /* float (T * K, H): the rows each rank
                                   received, in receive order. Rank r's
                                   rows start after the rows the lower
                                   ranks were routed (before drops); its
                                   report says how many it received. */
    /* The windows of the direct exchange, when present: rank r's input
     * window (rows pushed to its experts, expert-major) at
     * window_offset + 2r x window_stride, and its output window (its
     * experts' output rows, in the same order) one stride later. Each
     * has room for window_rows rows of H floats, the most one rank can be
     * sent: T x min(K, ceil(E / R)), since an expert gets at most one row
     * per token. */
    uint64_t window_offset;
    uint64_t window_stride;
    int64_t window_rows;    /* 0 without windows */
    uint64_t area_bytes;
};

/* Bytes the run area needs for this shape, rank count and spec (NULL: no
 * dump, one forward, no trace), or 0 when that overflows. */
uint64_t moe_run_area_bytes(const struct moe_shape *shape, int ranks,
                            const struct moe_run_area_spec *spec);

/* Lays out the run area at `area`. */
void moe_run_area_init(void *area, const struct moe_shape *shape, int ranks,
                       const struct moe_run_area_spec *spec);

/* Returns the array at `offset` bytes into the run area, or NULL for an
 * absent stage (offset 0). */
static inline void *moe_run_area_at(void *area, uint64_t offset)
{
    return offset ? (char *)area + offset : NULL;
}

static inline float *moe_run_area_output(void *area)
{
    return moe_run_area_at(area, ((struct moe_run_area *)area)->output_offset);
}

static inline int64_t *moe_run_area_counts(void *area)
{
    return moe_run_area_at(area, ((struct moe_run_area *)area)->counts_offset);
}

static inline struct moe_rank_report *moe_run_area_report(void *area, int rank)
{
    return (struct moe_rank_report *)moe_run_area_at(
               area, ((struct moe_run_area *)area)->rank_report_offset) + rank;
}

/* Inputs every rank reads; they live in the launcher's memory and reach the
 * ranks through fork. */
struct moe_dist_input {
    const struct moe_weights *weights;
    const float *tokens; /* (T, H), the whole batch of the first forward */
    /* For --steps: forward i > 0 draws a fresh batch from `seed` (substream
     * i of the token stream) when draw_tokens is set, and reuses `tokens`
     * otherwise. After each forward, every rank moves the selection bias
     * by bias_update_rate * sign(mean load - load of e), the same on every
     * rank, when bias_update_rate > 0. */
    uint64_t seed;
    int draw_tokens;
    float bias_update_rate;
    /* Direct exchange only: wait for every expert's rows before the first
     * expert runs, instead of starting each expert when its rows are in.
     * The output is the same; this measures what the overlap gains. */
    int wait_all_rows;
    /* OpenBLAS threads of each rank's expert calls, 1 when 0. The golden
     * path must use the same count. */
    int blas_threads;
};

/* One rank's state: its blocks of tokens and experts and its buffers, which
 * are kept across forwards. */
struct moe_dist_rank;

/* The transport, run area and slot that one rank's forward uses. */
struct moe_dist_env {
    struct moe_transport *transport;
    void *area;             /* the run area (moe_run_area_init): in the
                               shared segment under shm, or this rank's
                               own copy under mpi */
    uint64_t area_capacity; /* bytes available at area */
    struct moe_rank_slot *slot; /* receives the step times; in the segment
                                   under shm, private under mpi */
};

/* Creates the state of the env's rank after checking that the run area
 * matches the input's shape. `env` and `input` must outlive the state.
 * With a trace, sets the transport's wait hook. Returns 0, -EPROTO or
 * -ENOMEM. */
int moe_dist_rank_new(const struct moe_dist_env *env, const struct moe_dist_input *input,
                      struct moe_dist_rank **rank);
void moe_dist_rank_free(struct moe_dist_rank *rank);

/* Runs one forward of the layer: the five steps, with their times added
 * to the rank's slot, and this rank's rows of the output, counts, drops and
 * stats written into the run area. Every rank must call it the same number
 * of times. Returns 0 or a negative error code. */
int moe_dist_forward(struct moe_dist_rank *rank);

/* Runs the run area's number of forwards (one unless --steps) on the
 * env's rank. Returns 0 or a negative error code. */
int moe_dist_run(const struct moe_dist_env *env, const struct moe_dist_input *input);

/* Rank entry point for moe_launch: opens the shm transport over `comm` and
 * runs moe_dist_run() in the segment's run area. `arg` is a struct
 * moe_dist_input. Returns 0 or a negative error code. */
int moe_dist_rank_main(struct moe_comm *comm, void *arg);

#endif
