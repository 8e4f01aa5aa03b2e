/*
 * moe_explain.h - `moe-ep explain`: a tiny layer run on two rank processes
 * and narrated step by step with the numbers of that run.
 *
 * The layer: T = 6 tokens, H = 4, F = 8, E = 4 experts, top-2, R = 2 ranks,
 * with seeded random weights and tokens. Every figure the narration prints
 * comes from a real run of the library. The ranks run their forward
 * (dist.c) over the shm transport and fill the --dump stage arrays of the
 * run area. The launcher then reads back the records left in the rings and
 * runs the golden path.
 *
 * Files:
 *   explain.c           options, the order of the sections, --pause
 *   explain_run.c       the launch, the transport tap that logs each
 *                       collective call, the ring replay and the golden path
 *   explain_steps.c     the ten steps of one forward
 *   explain_sections.c  skewed router, capacity, all-to-all against
 *                       all-reduce, and the aux loss
 */
#ifndef MOE_EXPLAIN_H
#define MOE_EXPLAIN_H

#include "moe_dist.h"
#include "moe_layer.h"
#include "moe_run.h"

#include <stdint.h>
#include <stdio.h>

/* Runs `moe-ep explain` with the arguments after "explain" and prints to
 * stdout. Returns the exit status: 0, 1 when a run differs from the golden
 * path, 2 for invalid usage, 3 for a runtime failure, or 128 + the signal
 * that stopped a run. */
int moe_explain_main(int argc, char **argv);

/* ---- shared by the explain files --------------------------------------- */

#define MOE_EXPLAIN_RANKS 2
#define MOE_EXPLAIN_EXPERTS 4
#define MOE_EXPLAIN_STEPS 10
/* Room in each rank's call log. A forward makes 4 collective calls, and up
 * to 7 with the probs policy of a capacity. */
#define MOE_EXPLAIN_MAX_CALLS 16

/* The tiny layer's shape: T = 6, H = 4, F = 8, E = MOE_EXPLAIN_EXPERTS,
 * K = 2. */
void moe_explain_shape(struct moe_shape *shape);

/* The further sections, which --section picks. */
enum moe_explain_section {
    MOE_EXPLAIN_ALL,
    MOE_EXPLAIN_SECTION_STEPS,
    MOE_EXPLAIN_SECTION_SKEW,
    MOE_EXPLAIN_SECTION_CAPACITY,
    MOE_EXPLAIN_SECTION_TRAFFIC,
    MOE_EXPLAIN_SECTION_AUX,
};

struct moe_explain_options {
    uint64_t seed;          /* draws the weights and the tokens [1] */
    double skew;            /* Zipf exponent of the skewed router [2] */
    double capacity_factor; /* of the capacity section [1] */
    int direct;             /* 1: the direct exchange of moe-ep run; 0: the
                               rows travel in the rings [0] */
    int step;               /* 1 to 10: print only this step; 0: all */
    int section;            /* enum moe_explain_section */
    int pause;              /* wait for Enter between steps and sections */
};

/* One layer to run. */
struct moe_explain_layer {
    uint64_t seed;                /* draws the weights and the tokens */
    double skew;                  /* the skewed router's S, or 0 */
    struct moe_capacity capacity; /* limit -1 for dropless */
    int64_t forwards;             /* forwards on the same batch, at least 1 */
    int direct;                   /* the direct exchange: each sender writes
                                     its rows into the owner's window and
                                     the rings carry notes; 0: rows travel
                                     in the rings */
};

/* Kinds of collective call, as the tap logs them. */
enum moe_explain_call_kind {
    MOE_EXPLAIN_ALLGATHER,
    MOE_EXPLAIN_ALLTOALLV,
    MOE_EXPLAIN_ALLREDUCE,
    MOE_EXPLAIN_BARRIER,
    MOE_EXPLAIN_GATHERV,
    MOE_EXPLAIN_NOTES, /* one note exchange: its begin, sends and waits */
};

/* One collective call of one rank. The ring records it wrote carry the
 * tags first_tag to last_tag (the comm's sequence numbers); last_tag <
 * first_tag when it used none. Times are moe_now_ns(); a note exchange
 * ends with its last send or wait. */
struct moe_explain_call {
    uint32_t first_tag, last_tag;
    int32_t step; /* enum moe_step */
    int32_t kind; /* enum moe_explain_call_kind */
    int64_t start_ns, end_ns;
    int64_t wait_ns; /* asleep waiting on peers inside the call */
};

/* One record found in a ring after the run, in ring order, which is the
 * order its consumer read it. */
struct moe_explain_record {
    int src, dst;         /* ring src -> dst */
    uint32_t length, tag; /* the record header */
    uint8_t *payload;     /* a copy of its `length` bytes */
};

/* One layer run on R ranks, with everything the narration prints. Arrays
 * cover the whole batch, (T, ...), unless their comment gives another
 * shape. */
struct moe_explain_run {
    struct moe_explain_layer layer;
    struct moe_weights weights;
    const float *tokens;   /* (T, H), owned by the caller */
    /* From the ranks, through the run area: */
    float *output;         /* (T, H) */
    float *logits;         /* (T, E), gate bias included */
    float *scores;         /* (T, E), the router's probabilities */
    int32_t *ids;          /* (T, K) */
    float *topk_weights;   /* (T, K) */
    float *expert_out;     /* (T, K, H): expert ids[t][k]'s output row for
                              token t; zero when dropped */
    float *recv_rows;      /* (T * K, H): each rank's received rows in
                              receive order, rank after rank */
    int64_t received[MOE_EXPLAIN_RANKS]; /* rows each rank received */
    int64_t *counts;       /* (R, E): rows rank r routed to expert e */
    int64_t *kept_counts;  /* (R, E): of those, rows expert e kept */
    uint8_t *kept;         /* (T, K) */
    int64_t *stats;        /* moe_router_stats_len(E), whole batch */
    int64_t *dropped;      /* (E) */
    struct moe_rank_report report[MOE_EXPLAIN_RANKS];
    uint64_t step_ns[MOE_EXPLAIN_RANKS][MOE_STEP_COUNT]; /* summed over forwards */
    uint64_t wait_ns[MOE_EXPLAIN_RANKS][MOE_STEP_COUNT]; /* of which waiting */
    /* With forwards > 1, from the ranks' trace: the median over the forwards
     * of each step's time and of the waits on peers inside it. */
    int64_t median_step_ns[MOE_EXPLAIN_RANKS][MOE_STEP_COUNT];
    int64_t median_wait_ns[MOE_EXPLAIN_RANKS][MOE_STEP_COUNT];
    /* The tap's log and the ring contents: */
    struct moe_explain_call calls[MOE_EXPLAIN_RANKS][MOE_EXPLAIN_MAX_CALLS];
    int64_t call_count[MOE_EXPLAIN_RANKS];
    struct moe_explain_record *records; /* ring by ring, (0, 0) first */
    int64_t record_count;
    uint64_t ring_bytes[MOE_EXPLAIN_RANKS][MOE_EXPLAIN_RANKS]; /* written */
    uint64_t ring_capacity;
    /* The golden path in the launcher, on the same weights and tokens: */
    float *golden;         /* (T, H) */
    struct moe_golden_info golden_info; /* with the stages */
    struct moe_compare check;           /* output against golden */
    struct moe_compare stage_check[MOE_STAGE_COUNT];
    int kept_equal;        /* the drop flags match the golden path's */
};

/* Runs the tiny layer on MOE_EXPLAIN_RANKS rank processes, then the golden
 * path. `tokens` (T, H), drawn from layer->seed, must outlive the run.
 * With one forward the run keeps the call log and the ring records. With
 * more, the ranks run them on the same batch with a trace, for the
 * medians, and the rings are not read, as they wrap.
 * Returns 0, -ECANCELED when a rank failed or a stop signal arrived
 * (*stop_signal is then the signal, or 0), or another negative error with
 * a message. Release the run with moe_explain_run_free() whatever it
 * returns. */
int moe_explain_run_layer(const struct moe_explain_layer *layer, const float *tokens,
                          struct moe_explain_run *run, int *stop_signal);
void moe_explain_run_free(struct moe_explain_run *run);

/* Returns the name of a collective kind ("all-to-all"). */
const char *moe_explain_call_name(int kind);

/* Finds the call of rank `rank` whose tags include `tag`, or NULL. */
const struct moe_explain_call *moe_explain_call_of_tag(const struct moe_explain_run *run,
                                                       int rank, uint32_t tag);

/* Returns the token whose row of `tokens` has the bits of `row`, or -1. */
int64_t moe_explain_find_token(const struct moe_explain_run *run, const float *row);

/* Prints step `step` (1 to MOE_EXPLAIN_STEPS) of the plain run. */
void moe_explain_print_step(FILE *out, int step, const struct moe_explain_run *run);

/* The further sections. `plain` is the run without skew or capacity,
 * `skewed` the skewed router without capacity, `position` and `probs` the
 * skewed router with the capacity under each drop policy. The skew
 * section takes the timed runs of both routers (forwards > 1). */
void moe_explain_print_skew(FILE *out, const struct moe_explain_run *plain,
                            const struct moe_explain_run *skewed);
void moe_explain_print_capacity(FILE *out, double capacity_factor,
                                const struct moe_explain_run *position,
                                const struct moe_explain_run *probs);
void moe_explain_print_traffic(FILE *out, const struct moe_explain_run *plain);
void moe_explain_print_aux(FILE *out, const struct moe_explain_run *plain,
                           const struct moe_explain_run *skewed);

#endif
