/*
 * moe_bench_internal.h - what the three bench files share: the measured
 * figures, the timing rule, and the printers of the report sections.
 *
 * Timing rule of the floors and the all-to-all: one warm-up call, then
 * probes of 1, 2, 4, ... calls until one has at least 8 calls and lasts an
 * eighth of `loop_ns`, which sizes a loop to last about `loop_ns`, then
 * `repeats` such loops. Each loop gives one time per call, and the report
 * shows the best and the median loop. In a multi-process figure every rank
 * times its own loop after a barrier, and a loop's time is the max over the
 * ranks.
 */
#ifndef MOE_BENCH_INTERNAL_H
#define MOE_BENCH_INTERNAL_H

#include "moe_bench.h"
#include "moe_launch.h"

#include <stdint.h>
#include <stdio.h>

/* Seed of the bench's weights and tokens; fixed so that runs compare. */
#define MOE_BENCH_SEED 1
/* Sizes of the memcpy floor: the four all-to-all message sizes and a 64 MiB
 * copy meant to exceed the caches. */
#define MOE_BENCH_MEMCPY_SIZES 5
/* Largest number of rank counts in the forward table and of rows in the
 * all-to-all table. */
#define MOE_BENCH_MAX_FORWARDS 8
#define MOE_BENCH_MAX_ALLTOALLS 16

/* When the all-core read rate is measured: with the other floors, just
 * before the decode forwards, and after the layer figures. A shared host
 * can slow down any one of them. */
enum moe_bench_read_point {
    MOE_BENCH_READ_FLOORS = 0,
    MOE_BENCH_READ_DECODE = 1,
    MOE_BENCH_READ_AFTER = 2,
    MOE_BENCH_READ_POINTS = 3,
};

/* Largest number of (ranks, tokens) pairs in the decode and scaling
 * tables. */
#define MOE_BENCH_MAX_SCALING 24

/* Steps of a forward: route, layout exchange, dispatch, compute, combine. */
#define MOE_BENCH_FORWARD_STEPS 5

/* One row of the forward table. Times are in ms. */
struct moe_bench_forward {
    int ranks;
    /* Steady state: forwards 2 to 1 + repeats of one launch. A forward's
     * time is the max over the ranks of the sum of its step times. */
    double steps_best_ms, steps_median_ms;
    double step_ms[MOE_BENCH_FORWARD_STEPS]; /* best forward, per step from
                                                route to combine, max over
                                                ranks */
    double wait_ms[MOE_BENCH_FORWARD_STEPS]; /* of which waiting on peers */
    int64_t busiest_rows; /* rows computed by the busiest rank */
    /* Cold: one forward per launch, as `moe-ep run` does. */
    double cold_steps_best_ms;               /* step sum, as above */
    double launch_best_ms, launch_median_ms; /* first fork to last exit */
};

/* One row of the all-to-all table. */
struct moe_bench_alltoall {
    int ranks;
    uint64_t ring_bytes;     /* data bytes of each ring */
    uint64_t bytes_per_pair; /* bytes each rank sends to each other rank */
    int one_token;           /* the 1-token dispatch: one row of H floats */
    int64_t calls;           /* calls per timed loop */
    double best_us, median_us;     /* time per call */
    double best_gbps, median_gbps; /* R x (R - 1) x bytes_per_pair per call */
};

/* One row of the decode and scaling tables: a steady forward whose expert
 * weights were evicted from the caches before every timed repeat. Times
 * are in ms. */
struct moe_bench_scaling {
    int ranks;
    int64_t tokens;                 /* T of the whole batch */
    double best_ms, median_ms;      /* max over the ranks of the step sum */
    double warm_best_ms;            /* the same without the eviction, or 0
                                       when not measured */
    double compute_ms, compute_wait_ms; /* the compute step of the best
                                           forward and its wait on peers,
                                           max over the ranks */
    int64_t touched_experts;        /* experts given at least one row */
    uint64_t touched_bytes;         /* their weights plus the gate */
    uint64_t busiest_bytes;         /* of those, the most that one rank
                                       reads: its touched experts and the
                                       gate */
};

struct moe_bench_results {
    int cores; /* online cores, capped at MOE_MAX_RANKS */

    int64_t gemm_rows; /* M = T x K / E, rounded, at least 1 */
    double sgemm_one_gflops, sgemm_one_median_gflops;     /* 1 thread */
    double sgemm_threads_gflops, sgemm_threads_median_gflops; /* 1 process,
                                                                 `cores` threads */
    double sgemm_procs_gflops, sgemm_procs_median_gflops; /* `cores` processes
                                                             of 1 thread */
    double sgemm_again_gflops, sgemm_again_median_gflops; /* the same, after
                                                             the layer figures */
    double machine_gflops; /* the highest of the three all-core rates */
    double floor_ms;       /* expert FLOPs / machine_gflops */

    uint64_t memcpy_bytes[MOE_BENCH_MEMCPY_SIZES];
    double memcpy_gbps[MOE_BENCH_MEMCPY_SIZES], memcpy_median_gbps[MOE_BENCH_MEMCPY_SIZES];

    /* Streaming read from memory (bench_floor.c). */
    uint64_t read_bytes;                              /* per pass, in all */
    double read_one_gbps, read_one_median_gbps;       /* 1 process */
    /* `cores` processes, at each enum moe_bench_read_point */
    double read_procs_gbps[MOE_BENCH_READ_POINTS];
    double read_procs_median_gbps[MOE_BENCH_READ_POINTS];
    double read_machine_gbps; /* the highest of the all-core rates */
    int cache_evicted;        /* 1 when this build can evict a buffer from
                                 the caches (moe_bench_evict) */

    struct moe_bench_forward forward[MOE_BENCH_MAX_FORWARDS];
    int forward_count;
    /* The steady forward at --ranks with --overlap off, and with
     * --exchange rings, for comparison with the default. */
    struct moe_bench_forward overlap_off;
    struct moe_bench_forward rings;
    struct moe_bench_alltoall alltoall[MOE_BENCH_MAX_ALLTOALLS];
    int alltoall_count;
    struct moe_bench_alltoall ring_sweep[MOE_BENCH_MAX_ALLTOALLS];
    int ring_sweep_count;
    /* moe_alltoallv_direct at the sizes of the all-to-all table. */
    struct moe_bench_alltoall direct[MOE_BENCH_MAX_ALLTOALLS];
    int direct_count;

    /* Decode and scaling forwards, each (ranks, tokens) once. */
    struct moe_bench_scaling scaling[MOE_BENCH_MAX_SCALING];
    int scaling_count;

    /* The --peers figures (moe_bench_peers.h), or NULL. */
    struct moe_bench_peers *peers;
};

/* ---- timing helpers (bench_floor.c) ------------------------------------ */

/* Returns the length of one timed loop: 40 ms, or 4 ms with --quick. */
int64_t moe_bench_loop_ns(const struct moe_bench_options *options);

/* Returns whether a probe of `calls` calls that took `elapsed_ns` is long
 * enough to size a loop: at least 8 calls and an eighth of the loop, or
 * the cap of 2^22 calls per loop. */
int moe_bench_probe_done(int64_t calls, int64_t elapsed_ns, int64_t loop_ns);

/* Returns the calls that fill a loop of `loop_ns` at `per_call_ns` each,
 * from 1 to the cap of 2^22. */
int64_t moe_bench_calls_for(int64_t loop_ns, int64_t per_call_ns);

/* Times `run(state)` in this process by the timing rule. per_call_ns
 * receives one value per repeat. Returns the calls per loop. */
int64_t moe_bench_time_local(void (*run)(void *state), void *state,
                             int repeats, int64_t loop_ns, double *per_call_ns);

/* The app area of a multi-process figure: per case, the calls per loop and
 * each rank's time of each loop. Each rank writes only its own entries. */
#define MOE_BENCH_AREA_MAGIC 0x48434e4542454f4dULL /* "MOEBENCH" read as bytes */
#define MOE_BENCH_MAX_CASES 12
struct moe_bench_area {
    uint64_t magic;
    int64_t calls[MOE_BENCH_MAX_CASES];
    int64_t loop_ns[MOE_BENCH_MAX_CASES][MOE_BENCH_MAX_REPEATS][MOE_MAX_RANKS];
};

/* Times `run(comm, state)` on every rank by the timing rule and records the
 * loops as case `index` of `area`. Every rank must call it with the same
 * arguments except `state`. Returns 0 or the first error of `run` or of a
 * collective. */
int moe_bench_time_ranks(struct moe_comm *comm, struct moe_bench_area *area,
                         int index, int repeats, int64_t loop_ns,
                         int (*run)(struct moe_comm *comm, void *state),
                         void *state);

/* Reduces case `index` of `area`: per loop the max over `ranks`, divided by
 * the calls. per_call_ns receives one value per repeat. */
void moe_bench_area_per_call(const struct moe_bench_area *area, int index,
                             int ranks, int repeats, double *per_call_ns);

/* Formats a byte count as "4 KiB" or "1 MiB" when it is a whole number of
 * either, else as bytes. */
void moe_bench_format_bytes(uint64_t bytes, char *buf, size_t size);

/* Sorts values[0..count) and returns the median. */
double moe_bench_median(double *values, int count);
/* Returns the smallest of values[0..count). */
double moe_bench_min(const double *values, int count);

/* Runs one moe_launch and turns a failure into a message that names the
 * figure and the failed rank. Returns 0 or a negative error. */
int moe_bench_launch(struct moe_launch *launch, const char *figure);

/* ---- measurements ------------------------------------------------------ */

/* Measures the sgemm and memcpy floors (bench_floor.c). */
int moe_bench_measure_floors(const struct moe_bench_options *options,
                             struct moe_bench_results *results);

/* Measures the all-core sgemm rate once more, after the layer figures, and
 * sets the machine rate and the floor from all of them (bench_floor.c). */
int moe_bench_measure_sgemm_again(const struct moe_bench_options *options,
                                  struct moe_bench_results *results);

/* Measures the streaming-read floor: one process, then `cores` processes
 * at once, each reading its own buffer from memory, as the
 * MOE_BENCH_READ_FLOORS figure (bench_floor.c). */
int moe_bench_measure_read(const struct moe_bench_options *options,
                           struct moe_bench_results *results);

/* Measures the all-core read rate once more as the figure of `point`, and
 * sets the machine read rate to the highest all-core figure so far
 * (bench_floor.c). */
int moe_bench_measure_read_again(const struct moe_bench_options *options,
                                 struct moe_bench_results *results,
                                 enum moe_bench_read_point point);

/* Evicts the cache lines of [p, p + bytes) from every cache level, so that
 * the next read of them comes from memory (bench_floor.c). Returns 1, or 0
 * when this build has no way to evict (x86's clflush is the only one it
 * uses) and did nothing. */
int moe_bench_evict(const void *p, uint64_t bytes);

/* The decode figures: MOE_BENCH_DECODE_RANKS ranks, each with every count
 * of tokens in MOE_BENCH_DECODE_TOKENS. */
#define MOE_BENCH_DECODE_RANKS 2
#define MOE_BENCH_DECODE_COUNTS 3
extern const int64_t MOE_BENCH_DECODE_TOKENS[MOE_BENCH_DECODE_COUNTS];

/* Measures the decode forwards and the scaling tables over tokens and over
 * ranks, with the expert weights evicted before every timed forward
 * (bench_layer.c). */
int moe_bench_measure_scaling(const struct moe_bench_options *options,
                              struct moe_bench_results *results);

/* Finds the scaling row of `ranks` and `tokens`, or NULL. */
const struct moe_bench_scaling *
moe_bench_find_scaling(const struct moe_bench_results *results, int ranks,
                       int64_t tokens);

/* Returns the weight-stream floor of a row in ms: its touched bytes at the
 * machine read rate. */
double moe_bench_stream_floor_ms(const struct moe_bench_results *results,
                                 const struct moe_bench_scaling *row);

/* Returns the expert-GEMM floor of `tokens` tokens in ms: their expert
 * FLOPs at the machine sgemm rate. */
double moe_bench_gemm_floor_ms(const struct moe_bench_options *options,
                               const struct moe_bench_results *results,
                               int64_t tokens);

/* Measures the forward at 1, 2, 4, 8 and --ranks ranks (bench_layer.c). */
int moe_bench_measure_forward(const struct moe_bench_options *options,
                              struct moe_bench_results *results);

/* Measures the all-to-all at 2 and 4 ranks, on the rings and with
 * moe_alltoallv_direct, and at 2 ranks over several ring sizes
 * (bench_layer.c). */
int moe_bench_measure_alltoall(const struct moe_bench_options *options,
                               struct moe_bench_results *results);

/* Measures the steady-state forward at `ranks` ranks: the steady columns,
 * step times and busiest rows of *row, without the cold columns
 * (bench_layer.c). */
int moe_bench_measure_forward_steady(const struct moe_bench_options *options,
                                     int ranks, struct moe_bench_forward *row);

/* Measures the sizes of the all-to-all table at `ranks` ranks, through
 * rings of options->ring_bytes, and appends one row per size to
 * results->alltoall (bench_layer.c). */
int moe_bench_measure_alltoall_at(const struct moe_bench_options *options,
                                  int ranks, struct moe_bench_results *results);

/* Print the report sections as Markdown. */
void moe_bench_print_floors(FILE *out, const struct moe_bench_options *options,
                            const struct moe_bench_results *results);
void moe_bench_print_forward(FILE *out, const struct moe_bench_options *options,
                             const struct moe_bench_results *results);
void moe_bench_print_alltoall(FILE *out, const struct moe_bench_options *options,
                              const struct moe_bench_results *results);
void moe_bench_print_decode(FILE *out, const struct moe_bench_options *options,
                            const struct moe_bench_results *results);
void moe_bench_print_scaling(FILE *out, const struct moe_bench_options *options,
                             const struct moe_bench_results *results);

/* Runs `moe-ep bench --transport mpi` in a process that mpirun started
 * (bench_mpi.c): the forward and all-to-all figures over MPI at mpirun's
 * rank count, then, on rank 0 after MPI_Finalize, the same figures on the
 * rings and the expert-GEMM floor. Rank 0 prints the report. Returns 0,
 * -EINVAL in a build without MPI or in a job of 1 or more than
 * MOE_MAX_RANKS ranks, or rank 0's error after MPI_Finalize. Any failure
 * while MPI runs ends the MPI job. */
int moe_bench_mpi(const struct moe_bench_options *options, FILE *out);

/* Start of the report sections of `moe-ep bench --transport mpi` that
 * `make bench-mpi` appends to docs/BENCHMARKS.md, one per rank count. */
#define MOE_BENCH_SIDE_BY_SIDE_HEADING "## Shared memory and MPI side by side"

/* Reads the existing report at `path` from its first line that starts with
 * MOE_BENCH_SIDE_BY_SIDE_HEADING to its end into a new NUL-terminated
 * *text of *bytes bytes, which the caller frees (bench_mpi.c). *text is
 * NULL when the file is missing, is not a regular file or has no such
 * line. Returns 0 or the error of reading the file. */
int moe_bench_read_kept_sections(const char *path, char **text, size_t *bytes);

/* Copies the first value of `key` in /proc/cpuinfo into buf, or "unknown"
 * (bench.c). */
void moe_bench_cpuinfo_value(const char *key, char *buf, size_t size);

/* Finds the all-to-all row for `ranks` and `bytes_per_pair`, or NULL. */
const struct moe_bench_alltoall *
moe_bench_find_alltoall(const struct moe_bench_results *results, int ranks,
                        uint64_t bytes_per_pair);

/* Returns the best memcpy bandwidth measured at `bytes`, or 0. */
double moe_bench_memcpy_gbps(const struct moe_bench_results *results,
                             uint64_t bytes);

#endif
