/*
 * moe_dist.h - the expert-parallel forward of one rank, and the run area it
 * shares with the launcher.
 *
 * Each rank owns a contiguous block of tokens and a contiguous block of
 * experts (moe_block_range). One forward is five steps:
 *   route     gate logits, scores and top-k for the rank's own tokens
 *   layout    all-gather of the (E) count of rows each rank sends to each
 *             expert, so every rank knows the full (R, E) layout
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

#define MOE_RUN_AREA_MAGIC 0x4e5552455045454dULL /* "MEEPERUN" read as bytes */

/* The app area of a `moe-ep run` segment: a small header, then the arrays
 * at the offsets it gives (bytes from the start of the area). Each rank
 * writes only its own rows. */
struct moe_run_area {
    uint64_t magic;
    struct moe_shape shape;
    int64_t ranks;
    int64_t dump;           /* 1 when the stage arrays below are present */
    uint64_t output_offset; /* float (T, H): the layer output */
    uint64_t counts_offset; /* int64 (R, E): rows rank r routed to expert e */
    /* The stages of --dump, each 0 when absent: */
    uint64_t logits_offset;     /* float (T, E) */
    uint64_t scores_offset;     /* float (T, E) */
    uint64_t ids_offset;        /* int32 (T, K) */
    uint64_t weights_offset;    /* float (T, K) */
    uint64_t expert_out_offset; /* float (T, K, H): expert outputs back home,
                                   before weighting */
    uint64_t shared_out_offset; /* float (T, H), when the layer has a shared
                                   expert */
    uint64_t recv_x_offset;     /* float (T * K, H): the rows each rank
                                   received, rank-major, in receive order */
    uint64_t area_bytes;
};

/* Bytes the run area needs for this shape and rank count, with or without
 * the stage arrays of --dump, or 0 when that overflows. */
uint64_t moe_run_area_bytes(const struct moe_shape *shape, int ranks, int dump);

/* Lays out the run area at `area`. */
void moe_run_area_init(void *area, const struct moe_shape *shape, int ranks,
                       int dump);

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

/* Inputs every rank reads; they live in the launcher's memory and reach the
 * ranks through fork. */
struct moe_dist_input {
    const struct moe_weights *weights;
    const float *tokens; /* (T, H), the whole batch */
};

/* One rank's state: its blocks of tokens and experts and its buffers, which
 * are kept across forwards. */
struct moe_dist_rank;

/* Creates the state of `comm`'s rank after checking that the run area
 * matches the input's shape. `input` must outlive the state. Returns 0,
 * -EPROTO or -ENOMEM. */
int moe_dist_rank_new(struct moe_comm *comm, const struct moe_dist_input *input,
                      struct moe_dist_rank **rank);
void moe_dist_rank_free(struct moe_dist_rank *rank);

/* Runs one forward of the layer: the five steps, with their times in the
 * rank's slot, and this rank's rows of the output and of the counts written
 * into the run area. Every rank must call it the same number of times.
 * Returns 0 or a negative error code. */
int moe_dist_forward(struct moe_dist_rank *rank);

/* Rank entry point for moe_launch: runs one forward of the layer and writes
 * this rank's rows of the output and of the counts into the run area. `arg`
 * is a struct moe_dist_input. Returns 0 or a negative error code. */
int moe_dist_rank_main(struct moe_comm *comm, void *arg);

#endif
