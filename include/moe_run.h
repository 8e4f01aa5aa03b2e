/*
 * moe_run.h - the `moe-ep run` job: options, the distributed forward, the
 * golden check, and the printed report.
 */
#ifndef MOE_RUN_H
#define MOE_RUN_H

#include "moe_dist.h"
#include "moe_launch.h"
#include "moe_layer.h"

#include <stdint.h>
#include <stdio.h>

struct moe_run_options {
    struct moe_shape shape;
    int ranks;                /* R */
    uint64_t seed;            /* draws the weights and the tokens */
    const char *input_path;   /* .npy (T, H) float32 tokens, or NULL */
    const char *output_path;  /* .npy file for the output, or NULL */
    double timeout_seconds;   /* per-wait deadline with no progress */
    uint64_t ring_bytes;      /* data bytes per ring */
    int tokens_given;         /* --tokens was on the command line */
    int hidden_given;         /* --hidden was on the command line */
    int shape_flag_given;     /* --hidden, --ffn, --experts or --top-k */
    const char *model_dir;    /* Hugging Face checkpoint, or NULL */
    int64_t layer;            /* MoE layer of model_dir; -1 for the first */
    const char *dump_dir;     /* directory for the stage dumps, or NULL */
    /* Router overrides, applied to random and checkpoint layers: */
    int scoring;              /* enum moe_scoring, or -1 */
    int renormalize;          /* 0 or 1, or -1 */
    double scaling_factor;    /* or NAN */
    /* Capacity (see struct moe_capacity): */
    double capacity_factor;   /* 0: dropless */
    int capacity_factor_given;
    int64_t min_capacity;     /* floor under the factor's capacity */
    int64_t expert_capacity;  /* exact capacity, or -1 */
    int drop_policy;          /* enum moe_drop_policy, or -1 */
    /* Imbalance and balancing: */
    double skew;              /* Zipf exponent of the synthetic gate bias */
    int64_t steps;            /* forwards, each on a fresh batch */
    double bias_update_rate;  /* 0: no aux-loss-free balancing */
    /* Observability: */
    const char *stats_path;   /* --stats JSON, or NULL */
    const char *trace_path;   /* --trace JSON, or NULL */
    const char *plot_dir;     /* --plot directory for the SVGs, or NULL */
    /* Transport and check: */
    int transport;            /* enum moe_transport_kind */
    int check;                /* 1: run the golden check; 0: --check off */
    int exchange_rings;       /* --exchange rings: rows travel in the rings
                                 (always so under mpi); 0: direct */
    int overlap;              /* --overlap off: 0, so the direct exchange
                                 waits for all rows before computing */
    int threads;              /* --threads N, or 0 for moe_blas_threads_auto */
    int exchange_given;       /* --exchange or --overlap was on the command line */
    int ranks_given;          /* --ranks was on the command line */
    /* Set by the MPI driver: this process loads only the experts that rank
     * slice_rank of slice_ranks owns. slice_ranks 0 loads all. */
    int slice_rank, slice_ranks;
};

/* Fills the built-in defaults: 4 ranks and a Mixtral-like shape scaled down
 * to run in well under a second. */
void moe_run_options_default(struct moe_run_options *options);

/* Parses the `run` options in argv[0..argc) into `options`. Returns 0, 1
 * when --help was given, or -EINVAL with a message that names the flag, the
 * value and the reason. */
int moe_run_parse(struct moe_run_options *options, int argc, char **argv);

/* Rejects, with -EINVAL, a layer whose weights, tokens and rank and golden
 * buffers, and the stage copies when `dump` is set, would take more than
 * 80% of this machine's memory, before anything is allocated. The message
 * names the shape and both sizes. */
int moe_run_check_memory(const struct moe_shape *shape, int dump);

/* Prints the `run` help text. */
void moe_run_usage(FILE *out);

/* Outcome of a bitwise comparison. */
struct moe_compare {
    int equal;            /* every bit equal */
    int64_t mismatches;   /* elements whose bits differ */
    int64_t first;        /* index of the first differing element, or -1 */
    float actual, expected; /* values at `first` */
    double max_abs_diff;  /* over all elements; NaN if a differing pair
                             contains a NaN */
};

/* Compares `count` floats bit for bit (memcmp semantics per element). */
void moe_compare_bits(const float *actual, const float *expected, int64_t count,
                      struct moe_compare *result);

/* The stages of one forward, as `--dump` writes them (see docs/DUMPS.md). */
enum moe_stage {
    MOE_STAGE_LOGITS,     /* float (T, E) */
    MOE_STAGE_SCORES,     /* float (T, E) */
    MOE_STAGE_IDS,        /* int32 (T, K) */
    MOE_STAGE_WEIGHTS,    /* float (T, K) */
    MOE_STAGE_RECV_X,     /* float (T * K, H), rank-major receive order */
    MOE_STAGE_EXPERT_OUT, /* float (T, K, H) */
    MOE_STAGE_SHARED_OUT, /* float (T, H), with a shared expert only */
    MOE_STAGE_COUNT
};

/* Everything `moe-ep run` measured, for the report. */
struct moe_run_result {
    struct moe_run_options options;
    float *output;        /* (T, H), gathered from the ranks */
    float *golden;        /* (T, H) */
    int64_t *counts;      /* (R, E): rows rank r routed to expert e, last
                             forward, before drops */
    int64_t *kept_counts; /* (R, E): of those, the rows expert e kept */
    uint8_t *kept;        /* (T, K): 1 when the assignment survived */
    int64_t stats_len;    /* moe_router_stats_len(E) */
    int64_t *stats;       /* (steps, stats_len): router stats per forward */
    int64_t *dropped;     /* (steps, E): drops per expert per forward */
    struct moe_capacity capacity;
    double aux_loss_coef, z_loss_coef;
    struct moe_rank_report report[MOE_MAX_RANKS];
    struct moe_trace_event *trace; /* (R, trace_capacity), or NULL */
    int64_t trace_capacity;
    int64_t launch_start_ns; /* moe_now_ns() when the ranks were forked */
    /* The golden path's view, checked bit for bit against the ranks': */
    int64_t routing_mismatch_step; /* first forward whose counts, drops or
                                      stats differ, or -1 */
    int kept_equal;       /* the drop flags (T, K) of the last forward */
    float *last_tokens;   /* (T, H): the batch of the last forward, when
                             --steps drew a fresh one, else NULL */
    uint64_t step_ns[MOE_MAX_RANKS][MOE_STEP_COUNT];
    uint64_t wait_ns[MOE_MAX_RANKS][MOE_STEP_COUNT];
    int64_t forward_ns;   /* launch to last rank exit */
    int64_t golden_ns;
    int blas_threads;     /* OpenBLAS threads of each rank and of the
                             golden path */
    struct moe_compare check;
    const char *family;   /* model_type, or "random" */
    struct moe_router router;
    int64_t layer;        /* the checkpoint layer, or -1 */
    /* With --dump: the distributed run's stages, each checked bit for bit
     * against the golden path's (recv_x against the token rows it must
     * hold). */
    void *stage[MOE_STAGE_COUNT];
    struct moe_compare stage_check[MOE_STAGE_COUNT];
    int stage_mismatch;   /* the first stage that differs, or -1 */
    /* Set when the ranks failed: the launcher's view and one line per
     * failed rank. */
    int launcher_signal;
    char failure[MOE_MAX_RANKS][MOE_ERROR_TEXT_BYTES + 64];
    int failures;
};

/* Runs the layer under mpirun, one rank per MPI process, over the MPI
 * transport. Every process calls it; rank 0 gathers the results, runs the
 * golden check and fills `result`. *is_root is set on the process that
 * prints the report, or the error. A failure on one rank after the set-up ends
 * the job through MPI_Abort with status 3. Returns as moe_run(). */
int moe_run_mpi(const struct moe_run_options *options, struct moe_run_result *result,
                int *is_root);

/* Runs the layer on R ranks and checks it against the golden path.
 * Returns 0 when the check ran (see result->check), -EINVAL for bad input,
 * -ECANCELED when ranks failed or the launcher was interrupted, or another
 * negative error. */
int moe_run(const struct moe_run_options *options, struct moe_run_result *result);
void moe_run_result_free(struct moe_run_result *result);

/* Prints the report: configuration, tokens per expert and rank, traffic
 * matrix, step times per rank, and the golden check last. */
void moe_run_print_report(FILE *out, const struct moe_run_result *result);

/* Returns max/mean of values[0..count), the imbalance figure (0 when all
 * are 0). */
double moe_run_imbalance(const int64_t *values, int64_t count);

struct moe_aux_losses;
/* The aux losses of forward `step` (0-based) from the run's stats. */
void moe_run_aux_losses(const struct moe_run_result *result, int64_t step,
                        struct moe_aux_losses *losses);

/* Writes --stats: everything the report prints, as JSON. Returns 0 or a
 * negative error with a message naming the file. */
int moe_run_write_stats(const char *path, const struct moe_run_result *result);

/* Writes --trace: Chrome trace-event JSON with one track per rank, a span
 * for each step and each wait, and byte counters. */
int moe_run_write_trace(const char *path, const struct moe_run_result *result);

#endif
