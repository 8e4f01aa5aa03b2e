/*
 * moe_bench_peers.h - `moe-ep bench --peers`: the bench layer in PyTorch
 * and the bench all-to-all in Open MPI, timed in the same run as moe-ep's
 * figures, with moe-ep's figure divided by theirs (bench_peers.c).
 */
#ifndef MOE_BENCH_PEERS_H
#define MOE_BENCH_PEERS_H

#include "moe_bench_internal.h"

#include <stdint.h>
#include <stdio.h>

/* The decode cases: tokens per rank. */
#define MOE_BENCH_PEER_DECODE_COUNT 3
/* Rank counts of the MPI jobs. */
#define MOE_BENCH_PEER_MPI_JOBS 2
/* Rows of one MPI job: 4 KiB, 64 KiB, 1 MiB, 4 MiB and the 1-token
 * dispatch, as in the all-to-all table. */
#define MOE_BENCH_PEER_MPI_SIZES 5

/* The outcome of one peer. */
enum moe_bench_peer_state {
    MOE_BENCH_PEER_SKIPPED = 0, /* not present on this machine */
    MOE_BENCH_PEER_FAILED,      /* present, but a run of it failed */
    MOE_BENCH_PEER_MEASURED,
};

/* One row of the PyTorch table. Times are in ms, and a forward's time is the
 * max over the ranks. */
struct moe_bench_peer_forward {
    int64_t tokens;          /* T of the whole batch */
    int64_t tokens_per_rank; /* the decode case, or 0 for prefill */
    double torch_best_ms, torch_median_ms;
    double moe_best_ms, moe_median_ms; /* moe-ep's steady forward */
};

struct moe_bench_peers {
    enum moe_bench_peer_state torch_state;
    char torch_reason[768];        /* why skipped or failed */
    char torch_version[64];        /* as torch.__version__ prints it */
    char torch_commands[2][1024];  /* the prefill and the decode command */
    int torch_threads;             /* threads of each torch rank */
    int ranks;                     /* of every torch and moe-ep forward */
    int decode_repeats;            /* timed forwards of a decode case */
    struct moe_bench_peer_forward forward[1 + MOE_BENCH_PEER_DECODE_COUNT];
    int forward_count;

    enum moe_bench_peer_state mpi_state;
    char mpi_reason[768];
    char mpi_library[256];         /* MPI_Get_library_version, first line */
    char mpi_commands[MOE_BENCH_PEER_MPI_JOBS][1024];
    /* MPI_Alltoallv alone: rows of the 2-rank job, then of the 4-rank job. */
    struct moe_bench_alltoall mpi[MOE_BENCH_PEER_MPI_JOBS * MOE_BENCH_PEER_MPI_SIZES];
    int mpi_count;
    /* moe-ep's all-to-all at the same sizes, measured right before the
     * jobs: on the rings, and with moe_alltoallv_direct. */
    struct moe_bench_alltoall moe_rings[MOE_BENCH_MAX_ALLTOALLS];
    int moe_rings_count;
    struct moe_bench_alltoall moe_direct[MOE_BENCH_MAX_ALLTOALLS];
    int moe_direct_count;
};

/* Parses the peer flag at argv[*i], if it is one: --peers, --torch-script
 * FILE or --alltoall-json, advancing *i past a value. Returns 1 when it
 * took the flag, 0 when argv[*i] is another flag, or -EINVAL with a
 * message naming the flag and the value. */
int moe_bench_parse_peer_flag(struct moe_bench_options *options, int argc,
                              char **argv, int *i);

/* Rejects, with -EINVAL, peer flags that do not go with the other flags. */
int moe_bench_check_peer_flags(const struct moe_bench_options *options);

/* Prints the option lines of the peer flags, for `moe-ep bench --help`. */
void moe_bench_peers_usage(FILE *out);

/* Runs the peers, each right after moe-ep's figures of the same shapes,
 * into a new results->peers, which the caller frees. A peer that is
 * missing or fails is recorded as such, with the reason. Returns 0, or a
 * negative error when one of moe-ep's own figures or an allocation
 * fails. */
int moe_bench_measure_peers(const struct moe_bench_options *options,
                            struct moe_bench_results *results);

/* Prints the Peers section of the report. */
void moe_bench_print_peers(FILE *out, const struct moe_bench_options *options,
                           const struct moe_bench_results *results);

/* Prints one row of the MPI_Alltoallv figures as one JSON line, which
 * moe_bench_measure_peers reads back: the output of `mpirun -np R moe-ep
 * bench --transport mpi --alltoall-json`. `library` is the MPI library
 * version. */
void moe_bench_print_mpi_json(FILE *out, const struct moe_bench_alltoall *row,
                              const char *library);

#endif
