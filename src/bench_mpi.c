/*
 * bench_mpi.c - `moe-ep bench --transport mpi`: the all-to-all figures of
 * `moe-ep bench`, measured over MPI so that they can be set beside the
 * shm rings' figures.
 *
 * Runs in every process of `mpirun -np R moe-ep bench --transport mpi`, at
 * the rank count mpirun gives. The sizes per pair are those of the shm
 * all-to-all figure (4 KiB, 64 KiB, 1 MiB, 4 MiB, and one token of H
 * floats), and so is the timing rule (moe_bench_internal.h). Each size has
 * two rows: moe_transport_alltoallv(), the call the layer makes (an
 * MPI_Alltoall of the sizes, then MPI_Alltoallv), and MPI_Alltoallv alone.
 * Rank 0 prints the report and writes --markdown.
 *
 * A failure after MPI has started is written to stderr by the rank that
 * failed, which then ends the job with MPI_Abort, because returning would
 * leave the other ranks waiting in a collective. The forward figures need
 * the layer on the transport interface and are not measured here yet.
 */
#include "moe_bench_internal.h"
#include "moe_error.h"
#include "moe_file.h"
#include "moe_transport.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#if MOE_HAVE_MPI

#include <mpi.h>
#include <time.h>
#include <unistd.h>

/* A collective that has not returned after this long ends the job. */
static const int64_t BENCH_TIMEOUT_NS = 60LL * 1000 * 1000 * 1000;

enum { SIZE_COUNT = 5, MAX_HOST_NAME = 256 };

/* The call that a row times. */
enum call {
    CALL_TRANSPORT, /* moe_transport_alltoallv */
    CALL_BARE,      /* MPI_Alltoallv on MPI_COMM_WORLD */
    CALL_COUNT
};

static const char *const CALL_NAMES[CALL_COUNT] = {
    "`moe_transport_alltoallv`", "`MPI_Alltoallv` alone"};

/* One rank's buffers: block p of send and recv starts at p x max_bytes. */
struct alltoall_state {
    struct moe_transport *t;
    enum call call;
    uint8_t *send, *recv;                 /* (R, max_bytes) each */
    uint64_t *send_bytes, *send_offsets, *recv_bytes, *recv_offsets; /* (R) */
    int *counts, *displs;                 /* (R) the same sizes as int */
};

/* One row of the report, filled on rank 0. */
struct row {
    enum call call;
    uint64_t bytes_per_pair;
    int one_token;
    int64_t calls;
    double best_us, median_us, best_gbps, median_gbps;
};

static int run_call(struct alltoall_state *a)
{
    if (a->call == CALL_TRANSPORT)
        return moe_transport_alltoallv(a->t, a->send, a->send_bytes,
                                       a->send_offsets, a->recv, a->recv_bytes,
                                       a->recv_offsets);
    int rc = MPI_Alltoallv(a->send, a->counts, a->displs, MPI_BYTE, a->recv,
                           a->counts, a->displs, MPI_BYTE, MPI_COMM_WORLD);
    if (rc != MPI_SUCCESS)
        return moe_fail(-EIO, "rank %d: MPI_Alltoallv failed with MPI error "
                        "code %d", a->t->rank, rc);
    return 0;
}

/* Runs `calls` calls and stores in *slowest_ns the longest time any rank
 * took for them. */
static int probe(struct alltoall_state *a, int64_t calls, int64_t *slowest_ns)
{
    int R = a->t->ranks, rc = 0;
    int64_t start = moe_now_ns();
    for (int64_t i = 0; rc == 0 && i < calls; i++)
        rc = run_call(a);
    if (rc)
        return rc;
    int64_t elapsed_ns = moe_now_ns() - start;
    int64_t *all_ns = malloc((size_t)R * sizeof *all_ns);
    if (!all_ns)
        return moe_fail(-ENOMEM, "rank %d: out of memory", a->t->rank);
    rc = moe_transport_allgather(a->t, &elapsed_ns, sizeof elapsed_ns, all_ns);
    *slowest_ns = 0;
    for (int r = 0; rc == 0 && r < R; r++)
        if (all_ns[r] > *slowest_ns)
            *slowest_ns = all_ns[r];
    free(all_ns);
    return rc;
}

/* Times the call by the timing rule. On return, per_call_ns[rep] is the
 * slowest rank's time of loop rep divided by *calls, on every rank. */
static int time_call(struct alltoall_state *a, int repeats, int64_t loop_ns,
                     int64_t *calls, double *per_call_ns)
{
    int R = a->t->ranks;
    int rc = run_call(a);
    int64_t probe_calls = 1, slowest_ns = 0;
    while (rc == 0) {
        if ((rc = probe(a, probe_calls, &slowest_ns)))
            break;
        if (moe_bench_probe_done(probe_calls, slowest_ns, loop_ns))
            break;
        probe_calls *= 2;
    }
    if (rc)
        return rc;
    *calls = moe_bench_calls_for(loop_ns, slowest_ns / probe_calls);

    int64_t mine_ns[MOE_BENCH_MAX_REPEATS] = {0};
    for (int rep = 0; rc == 0 && rep < repeats; rep++) {
        if ((rc = moe_transport_barrier(a->t)))
            return rc;
        int64_t start = moe_now_ns();
        for (int64_t i = 0; rc == 0 && i < *calls; i++)
            rc = run_call(a);
        mine_ns[rep] = moe_now_ns() - start;
    }
    if (rc)
        return rc;

    int64_t *all_ns = malloc((size_t)R * sizeof mine_ns);
    if (!all_ns)
        return moe_fail(-ENOMEM, "rank %d: out of memory", a->t->rank);
    rc = moe_transport_allgather(a->t, mine_ns, sizeof mine_ns, all_ns);
    for (int rep = 0; rc == 0 && rep < repeats; rep++) {
        int64_t slowest = 0;
        for (int r = 0; r < R; r++)
            if (all_ns[r * MOE_BENCH_MAX_REPEATS + rep] > slowest)
                slowest = all_ns[r * MOE_BENCH_MAX_REPEATS + rep];
        per_call_ns[rep] = (double)slowest / (double)*calls;
    }
    free(all_ns);
    return rc;
}

/* The byte that rank src sends to rank dst, so that a misdelivered block
 * shows. */
static uint8_t pattern_byte(int src, int dst)
{
    return (uint8_t)(src * 31 + dst * 7 + 1);
}

static int check_received(const struct alltoall_state *a, uint64_t bytes,
                          uint64_t stride)
{
    int me = a->t->rank;
    for (int src = 0; src < a->t->ranks; src++) {
        if (src == me)
            continue;
        const uint8_t *block = a->recv + (uint64_t)src * stride;
        uint8_t expected = pattern_byte(src, me);
        for (uint64_t i = 0; i < bytes; i++)
            if (block[i] != expected)
                return moe_fail(-EPROTO, "rank %d: byte %" PRIu64 " of the "
                                "%" PRIu64 "-byte block from rank %d is %u, "
                                "expected %u", me, i, bytes, src, block[i],
                                expected);
    }
    return 0;
}

/* Measures one size with one call into *row (on every rank). */
static int measure_case(struct alltoall_state *a, const struct moe_bench_options *o,
                        uint64_t bytes, uint64_t max_bytes, struct row *row)
{
    int R = a->t->ranks, me = a->t->rank;
    for (int p = 0; p < R; p++) {
        a->send_bytes[p] = a->recv_bytes[p] = p == me ? 0 : bytes;
        a->send_offsets[p] = a->recv_offsets[p] = (uint64_t)p * max_bytes;
        a->counts[p] = (int)a->send_bytes[p];
        a->displs[p] = (int)a->send_offsets[p];
    }
    memset(a->recv, 0, (size_t)R * max_bytes);

    double per_call_ns[MOE_BENCH_MAX_REPEATS];
    int rc = time_call(a, o->repeats, moe_bench_loop_ns(o), &row->calls,
                       per_call_ns);
    if (rc == 0)
        rc = check_received(a, bytes, max_bytes);
    if (rc)
        return rc;

    double crossing = (double)R * (R - 1) * (double)bytes;
    double best_ns = moe_bench_min(per_call_ns, o->repeats);
    double median_ns = moe_bench_median(per_call_ns, o->repeats);
    row->call = a->call;
    row->bytes_per_pair = bytes;
    row->best_us = best_ns / 1e3;
    row->median_us = median_ns / 1e3;
    row->best_gbps = crossing / best_ns;
    row->median_gbps = crossing / median_ns;
    return 0;
}

/* Measures every size with both calls. rows has SIZE_COUNT x CALL_COUNT
 * entries. */
static int measure_all(struct moe_transport *t, const struct moe_bench_options *o,
                       struct row *rows)
{
    const uint64_t sizes[SIZE_COUNT] = {4 << 10, 64 << 10, 1 << 20, 4 << 20,
                                        (uint64_t)o->hidden * sizeof(float)};
    const int one_token_case = 4;
    uint64_t max_bytes = 0;
    for (int i = 0; i < SIZE_COUNT; i++)
        if (sizes[i] > max_bytes)
            max_bytes = sizes[i];
    int R = t->ranks;
    if ((uint64_t)R * max_bytes > INT32_MAX)
        return moe_fail(-EINVAL, "rank %d: %d ranks x %" PRIu64 " bytes do not "
                        "fit the int offsets of MPI_Alltoallv; use a smaller "
                        "--hidden or fewer ranks", t->rank, R, max_bytes);

    struct alltoall_state a = {
        .t = t,
        .send = malloc((size_t)R * max_bytes),
        .recv = malloc((size_t)R * max_bytes),
        .send_bytes = calloc(4 * (size_t)R, sizeof(uint64_t)),
        .counts = calloc(2 * (size_t)R, sizeof(int)),
    };
    int rc = 0;
    if (!a.send || !a.recv || !a.send_bytes || !a.counts) {
        rc = moe_fail(-ENOMEM, "rank %d: out of memory for all-to-all buffers "
                      "of %" PRIu64 " bytes", t->rank, R * max_bytes);
        goto out;
    }
    a.send_offsets = a.send_bytes + R;
    a.recv_bytes = a.send_bytes + 2 * R;
    a.recv_offsets = a.send_bytes + 3 * R;
    a.displs = a.counts + R;
    for (int dst = 0; dst < R; dst++)
        memset(a.send + (uint64_t)dst * max_bytes, pattern_byte(t->rank, dst),
               max_bytes);

    for (int i = 0; rc == 0 && i < SIZE_COUNT; i++)
        for (int c = 0; rc == 0 && c < CALL_COUNT; c++) {
            a.call = (enum call)c;
            struct row *row = &rows[i * CALL_COUNT + c];
            rc = measure_case(&a, o, sizes[i], max_bytes, row);
            row->one_token = i == one_token_case;
        }
out:
    free(a.send);
    free(a.recv);
    free(a.send_bytes);
    free(a.counts);
    return rc;
}

/* ---- report ------------------------------------------------------------ */

/* What rank 0 prints about the job besides the rows. */
struct job {
    int ranks;
    int hosts; /* distinct MPI_Get_processor_name values */
    char first_host[MAX_HOST_NAME];
    char library[MPI_MAX_LIBRARY_VERSION_STRING];
    char date[64];
    char load[64];
    long cores; /* online on rank 0's host */
};

/* Fills *job; every rank must call it, because it gathers the host names. */
static int read_job(struct moe_transport *t, struct job *job)
{
    int R = t->ranks;
    char name[MAX_HOST_NAME] = {0};
    int length = 0;
    if (MPI_Get_processor_name(name, &length) != MPI_SUCCESS)
        snprintf(name, sizeof name, "unknown");
    char *all = malloc((size_t)R * MAX_HOST_NAME);
    if (!all)
        return moe_fail(-ENOMEM, "rank %d: out of memory", t->rank);
    int rc = moe_transport_allgather(t, name, MAX_HOST_NAME, all);

    *job = (struct job){.ranks = R};
    for (int r = 0; rc == 0 && r < R; r++) {
        int seen = 0;
        for (int q = 0; q < r && !seen; q++)
            seen = !strncmp(all + q * MAX_HOST_NAME, all + r * MAX_HOST_NAME,
                            MAX_HOST_NAME);
        job->hosts += !seen;
    }
    snprintf(job->first_host, sizeof job->first_host, "%s", name);
    free(all);

    int library_length = 0;
    MPI_Get_library_version(job->library, &library_length);
    job->library[strcspn(job->library, "\n")] = '\0';
    time_t now = time(NULL);
    struct tm utc;
    gmtime_r(&now, &utc);
    strftime(job->date, sizeof job->date, "%Y-%m-%d %H:%M UTC", &utc);
    snprintf(job->load, sizeof job->load, "unknown");
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        double one, five, fifteen;
        if (fscanf(f, "%lf %lf %lf", &one, &five, &fifteen) == 3)
            snprintf(job->load, sizeof job->load, "%.2f, %.2f, %.2f", one, five,
                     fifteen);
        fclose(f);
    }
    job->cores = sysconf(_SC_NPROCESSORS_ONLN);
    return rc;
}

static void print_report(FILE *out, const struct moe_bench_options *o,
                         const struct job *job, const struct row *rows)
{
    fprintf(out,
        "# moe-ep all-to-all over MPI\n\n"
        "Generated by `mpirun -np %d moe-ep bench --transport mpi%s`. It "
        "measures what the *All-to-all* section of `moe-ep bench` measures on "
        "the shared-memory rings, with the same sizes and timing rule, over "
        "MPI instead. Each rank sends the given bytes to every other rank and "
        "none to itself. A rank makes one warm-up call and probe calls that "
        "size the loop, then %d loops, each after a barrier; a loop's time is "
        "the slowest rank's, and the time per call is that divided by the "
        "calls. *Throughput* counts the bytes that cross between distinct "
        "ranks, R x (R - 1) x bytes per pair, per second; GB/s means 10^9 "
        "bytes per second. `moe_transport_alltoallv` is the call the layer "
        "makes: an `MPI_Alltoall` of the sizes, which every rank checks "
        "against what it expects, then `MPI_Alltoallv`. The *1 token* rows "
        "send one row of H = %" PRId64 " floats to each peer. Every received "
        "block is checked against its sender's byte pattern after the "
        "loops.\n\n",
        job->ranks, o->quick ? " --quick" : "", o->repeats, o->hidden);

    fprintf(out, "| item | value |\n|---|---|\n");
    fprintf(out, "| date | %s |\n", job->date);
    fprintf(out, "| MPI library | %s |\n", job->library);
    fprintf(out, "| ranks (mpirun -np) | %d |\n", job->ranks);
    fprintf(out, "| hosts | %d (rank 0 on %s) |\n", job->hosts, job->first_host);
    fprintf(out, "| cores online on rank 0's host | %ld |\n", job->cores);
    fprintf(out, "| load average before the run (1, 5, 15 min) | %s |\n\n",
            job->load);

    fprintf(out, "| ranks | call | bytes per pair | calls per loop "
            "| us per call, best | median | GB/s, best | median |\n"
            "|---|---|---|---|---|---|---|---|\n");
    for (int i = 0; i < SIZE_COUNT * CALL_COUNT; i++) {
        const struct row *r = &rows[i];
        char size[32];
        moe_bench_format_bytes(r->bytes_per_pair, size, sizeof size);
        fprintf(out, "| %d | %s | %s%s | %" PRId64 " | %.2f | %.2f | %.2f "
                "| %.2f |\n", job->ranks, CALL_NAMES[r->call],
                r->one_token ? "1 token, " : "", size, r->calls, r->best_us,
                r->median_us, r->best_gbps, r->median_gbps);
    }
    fprintf(out, "\n");
}

/* Prints the report on rank 0 to `out` and to --markdown. */
static int write_report(const struct moe_bench_options *o, const struct job *job,
                        const struct row *rows, FILE *out)
{
    char *text = NULL;
    size_t bytes = 0;
    FILE *report = open_memstream(&text, &bytes);
    if (!report)
        return moe_fail(-errno, "cannot keep the report in memory: %s",
                        strerror(errno));
    print_report(report, o, job, rows);
    fclose(report);
    fwrite(text, 1, bytes, out);
    fflush(out);
    int rc = 0;
    if (o->markdown_path) {
        struct moe_file_part part = {text, bytes};
        rc = moe_write_file(o->markdown_path, &part, 1);
    }
    free(text);
    return rc;
}

int moe_bench_mpi(const struct moe_bench_options *o, FILE *out)
{
    int rc = moe_transport_mpi_init(NULL, NULL);
    if (rc)
        return rc;
    struct moe_transport t;
    if ((rc = moe_transport_mpi_open(&t, BENCH_TIMEOUT_NS))) {
        /* No transport to abort with; MPI_Abort ends the job directly. */
        fprintf(stderr, "moe-ep bench: %s\n", moe_error_message());
        MPI_Abort(MPI_COMM_WORLD, 3);
        return rc;
    }

    if (t.ranks < 2) {
        /* Every rank sees the same count, so all of them return here. */
        moe_transport_close(&t);
        moe_transport_mpi_finalize();
        return moe_fail(-EINVAL, "--transport mpi needs at least 2 ranks, and "
                        "this job has 1: run it as mpirun -np R moe-ep bench "
                        "--transport mpi with R >= 2");
    }

    struct row rows[SIZE_COUNT * CALL_COUNT];
    struct job job;
    rc = read_job(&t, &job);
    if (rc == 0)
        rc = measure_all(&t, o, rows);
    if (rc == 0 && t.rank == 0)
        rc = write_report(o, &job, rows, out);
    if (rc) {
        fprintf(stderr, "moe-ep bench: rank %d: %s\n", t.rank, moe_error_message());
        moe_transport_abort(&t, 3);
    }
    moe_transport_close(&t);
    if ((rc = moe_transport_mpi_finalize()))
        return rc;
    return 0;
}

#else /* !MOE_HAVE_MPI */

int moe_bench_mpi(const struct moe_bench_options *o, FILE *out)
{
    (void)o;
    (void)out;
    return moe_transport_mpi_init(NULL, NULL); /* fails: built without MPI */
}

#endif
