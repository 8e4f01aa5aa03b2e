/*
 * moe_bench.h - `moe-ep bench`: the layer's forward time and the
 * all-to-all bandwidth, each next to a floor measured in the same run.
 */
#ifndef MOE_BENCH_H
#define MOE_BENCH_H

#include <stdint.h>
#include <stdio.h>

/* Largest --repeats; it sizes the timing table in the shared segment. */
#define MOE_BENCH_MAX_REPEATS 50

struct moe_bench_options {
    int ranks;                  /* ranks for the prefill forward [2] */
    int64_t tokens;             /* prefill tokens [4096] */
    int64_t hidden, ffn, experts, top_k; /* [1024, 1024, 16, 2] */
    int repeats;                /* timed repetitions per figure [5], at most
                                   MOE_BENCH_MAX_REPEATS */
    uint64_t ring_bytes;        /* ring size [1M] */
    const char *markdown_path;  /* write the report here too, or NULL */
    int quick;                  /* smaller shapes, for tests */
    int transport;              /* enum moe_transport_kind [shm]; mpi
                                   measures the forward and the all-to-all
                                   over MPI, then the shm figures beside
                                   them */
    int peers;                  /* --peers: also time PyTorch and Open MPI */
    const char *torch_script;   /* --torch-script, or NULL to search */
    int alltoall_json;          /* --alltoall-json: under --transport mpi,
                                   time only MPI_Alltoallv and print JSON
                                   lines */
    const char *program_path;   /* the moe-ep that --peers starts with
                                   mpirun, or NULL for this executable; no
                                   flag sets it, tests do */
};

void moe_bench_options_default(struct moe_bench_options *options);

/* Parses the `bench` options. Returns 0, 1 for --help, or -EINVAL with a
 * message naming the flag and the value. */
int moe_bench_parse(struct moe_bench_options *options, int argc, char **argv);

void moe_bench_usage(FILE *out);

/* Runs every measurement, prints the report to `out` as Markdown, and writes
 * it to options->markdown_path when set. Returns 0 or a negative error. */
int moe_bench(const struct moe_bench_options *options, FILE *out);

#endif
