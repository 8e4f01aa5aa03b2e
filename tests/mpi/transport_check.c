/*
 * transport_check.c - runs the same collectives through either transport
 * and writes everything every rank received to one file, so that the
 * shm and mpi outputs can be compared byte for byte (tests/mpi/run.sh).
 *
 *   transport_check --transport shm --ranks R [options]   forks R ranks
 *   mpirun -np R transport_check --transport mpi [options]
 *   transport_check --build-info      prints mpi=1 or mpi=0
 *
 * The cases run in this order:
 *   - all-to-alls with zero, uneven, large (150 KiB and more per pair) and
 *     one-silent-rank sizes;
 *   - all-gathers of 0, 1, 128 and 70000 bytes;
 *   - all-reduces of 0, 1 and 3000 int64 values, and three barriers;
 *   - gathers to rank 0 and to rank R - 1, with uneven sizes and a rank
 *     that sends nothing. Every payload byte is a function of (case,
 * source, destination, offset), and every receiving rank checks each byte,
 * and the guard bytes between its receive blocks, as soon as a case ends.
 * Receive blocks are laid out in reverse rank order with gaps, to catch
 * offsets mixed up between ranks. A wrong byte fails the rank with a
 * message naming the case, the peer and the offset. Last, each rank checks
 * the transport's bytes_sent counters against the sizes of the cases.
 *
 * Output (--out, written by rank 0): each rank's receive buffers of every
 * case, guards included, and its counters, rank by rank, gathered through
 * the transport.
 *
 * --huge BYTES runs two other cases instead, to check messages above 2 GiB
 * by hand, because they are too slow and too large for `make test`. In the
 * first, an all-to-all, rank 0 sends BYTES to rank 1. In the second, rank
 * R - 1 sends BYTES to a gather's root, rank 0. It writes no output file.
 *
 * --fault RANK:ACTION makes rank RANK, at the start of the second case,
 * fail with an error (exit), kill itself with SIGKILL (kill), stop calling
 * collectives forever (stall), or send its next peer one byte more than it
 * announced (mismatch). A rank that fails calls moe_transport_abort().
 *
 * Exit status: 0 when every byte is as expected; 2 for invalid usage,
 * including --transport mpi in a build without MPI; 3 when a rank failed.
 */
#include "moe_args.h"
#include "moe_error.h"
#include "moe_file.h"
#include "moe_launch.h"
#include "moe_transport.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum {
    EXIT_USAGE = 2,
    EXIT_RUNTIME = 3,
    MAX_SHM_RANKS = 8,
    GUARD_BYTES = 16,
    GUARD_VALUE = 0xa5,
};

enum fault {
    FAULT_NONE,
    FAULT_EXIT,
    FAULT_KILL,
    FAULT_STALL,
    FAULT_MISMATCH,
};

/* The command line, read by every rank (inherited through fork for shm). */
struct config {
    enum moe_transport_kind transport;
    int ranks;                  /* shm only */
    const char *out_path;       /* or NULL */
    double timeout_seconds;
    uint64_t int_limit, chunk_bytes; /* mpi large path, or 0 for defaults */
    int fault_rank;
    enum fault fault;
    uint64_t huge_bytes;        /* --huge, or 0 */
};

/* Sizes of the all-to-all cases. */
enum sizes {
    SIZES_ZERO,
    SIZES_UNEVEN, /* 0 to 4006 bytes, zero for a quarter of the pairs */
    SIZES_LARGE,  /* 150 KiB and more per pair */
    SIZES_SILENT, /* uneven, but rank R - 1 sends and receives nothing */
};

/* One rank's output so far: everything it received, in case order. */
struct record {
    uint8_t *bytes;
    uint64_t length, capacity;
};

static int record_append(struct record *r, const void *data, uint64_t bytes)
{
    if (r->length + bytes > r->capacity) {
        uint64_t capacity = r->capacity ? r->capacity : 1 << 16;
        while (capacity < r->length + bytes)
            capacity *= 2;
        uint8_t *grown = realloc(r->bytes, (size_t)capacity);
        if (!grown)
            return moe_fail(-ENOMEM, "out of memory for the record of %" PRIu64
                            " bytes", capacity);
        r->bytes = grown;
        r->capacity = capacity;
    }
    if (bytes)
        memcpy(r->bytes + r->length, data, (size_t)bytes);
    r->length += bytes;
    return 0;
}

/* The byte at `offset` of what rank src sends rank dst in case `c`. */
static uint8_t payload_byte(int c, int src, int dst, uint64_t offset)
{
    uint64_t x = (uint64_t)c * 0x9e3779b97f4a7c15ULL ^
                 (uint64_t)src * 0xbf58476d1ce4e5b9ULL ^
                 (uint64_t)dst * 0x94d049bb133111ebULL ^ offset;
    x ^= x >> 29;
    x *= 0xbf58476d1ce4e5b9ULL;
    return (uint8_t)(x >> 32);
}

static void fill_payload(uint8_t *dst_buf, int c, int src, int dst, uint64_t bytes)
{
    for (uint64_t i = 0; i < bytes; i++)
        dst_buf[i] = payload_byte(c, src, dst, i);
}

/* Checks, on rank `me`, a received block of payload_byte(c, src, dst, ...)
 * and the guard bytes after it. */
static int check_block(int me, const uint8_t *block, uint64_t bytes, int c,
                       int src, int dst, const char *what)
{
    for (uint64_t i = 0; i < bytes; i++) {
        uint8_t expected = payload_byte(c, src, dst, i);
        if (block[i] != expected)
            return moe_fail(-EPROTO, "rank %d: case %d (%s): byte %" PRIu64
                            " of the %" PRIu64 "-byte block from rank %d is "
                            "0x%02x, expected 0x%02x", me, c, what, i, bytes,
                            src, block[i], expected);
    }
    for (int i = 0; i < GUARD_BYTES; i++)
        if (block[bytes + i] != GUARD_VALUE)
            return moe_fail(-EPROTO, "rank %d: case %d (%s): guard byte %d "
                            "after the block from rank %d was overwritten "
                            "with 0x%02x", me, c, what, i, src, block[bytes + i]);
    return 0;
}

static uint64_t pair_bytes(enum sizes sizes, int R, int src, int dst)
{
    switch (sizes) {
    case SIZES_ZERO:
        return 0;
    case SIZES_UNEVEN:
        if ((src * 3 + dst) % 4 == 1)
            return 0;
        return (uint64_t)((src + 1) * 977 + (dst + 1) * 613) % 4007;
    case SIZES_LARGE:
        return (150 << 10) + (uint64_t)src * 1000 + (uint64_t)dst * 37;
    case SIZES_SILENT:
        if (src == R - 1 || dst == R - 1)
            return 0;
        return pair_bytes(SIZES_UNEVEN, R, src, dst);
    }
    return 0;
}

static const char *sizes_name(enum sizes sizes)
{
    static const char *const names[] = {"zero", "uneven", "large", "silent rank"};
    return names[sizes];
}

/* Lays out R blocks of sizes[p] in reverse rank order with GUARD_BYTES
 * after each, fills offsets[p] and returns the total size. */
static uint64_t reverse_layout(const uint64_t *sizes, int R, uint64_t *offsets)
{
    uint64_t total = 0;
    for (int p = R - 1; p >= 0; p--) {
        offsets[p] = total;
        total += sizes[p] + GUARD_BYTES;
    }
    return total;
}

/* Scratch shared by the cases of one rank: (R) arrays. */
struct tables {
    uint64_t *send_bytes, *send_offsets, *recv_bytes, *recv_offsets;
};

/* Returns whether rank `me` must send peer d one byte more than d
 * expects, as --fault RANK:mismatch requests for the faulty rank's next
 * peer. */
static int is_mismatch_target(const struct config *cfg, int me, int d, int R)
{
    return cfg->fault == FAULT_MISMATCH && me == cfg->fault_rank &&
           d == (cfg->fault_rank + 1) % R;
}

static int case_alltoallv(struct moe_transport *t, const struct config *cfg,
                          struct tables *tb, struct record *out, int c,
                          enum sizes sizes)
{
    int R = t->ranks, me = t->rank;
    uint64_t send_total = 0;
    for (int d = 0; d < R; d++) {
        tb->send_bytes[d] = pair_bytes(sizes, R, me, d);
        if (is_mismatch_target(cfg, me, d, R))
            tb->send_bytes[d] += 1;
        tb->send_offsets[d] = send_total;
        send_total += tb->send_bytes[d] + 8; /* gaps on the send side too */
        tb->recv_bytes[d] = pair_bytes(sizes, R, d, me);
    }
    uint64_t recv_total = reverse_layout(tb->recv_bytes, R, tb->recv_offsets);

    uint8_t *send = malloc((size_t)send_total + 1);
    uint8_t *recv = malloc((size_t)recv_total + 1);
    int rc = 0;
    if (!send || !recv) {
        rc = moe_fail(-ENOMEM, "rank %d: out of memory for case %d", me, c);
        goto out;
    }
    for (int d = 0; d < R; d++)
        fill_payload(send + tb->send_offsets[d], c, me, d, tb->send_bytes[d]);
    memset(recv, GUARD_VALUE, (size_t)recv_total);

    rc = moe_transport_alltoallv(t, send, tb->send_bytes, tb->send_offsets, recv,
                                 tb->recv_bytes, tb->recv_offsets);
    for (int s = 0; rc == 0 && s < R; s++)
        rc = check_block(me, recv + tb->recv_offsets[s], tb->recv_bytes[s], c,
                         s, me, sizes_name(sizes));
    if (rc == 0)
        rc = record_append(out, recv, recv_total);
out:
    free(send);
    free(recv);
    return rc;
}

static int case_allgather(struct moe_transport *t, struct record *out, int c,
                          uint64_t bytes)
{
    int R = t->ranks, me = t->rank;
    uint64_t stride = bytes + GUARD_BYTES;
    uint8_t *send = malloc((size_t)bytes + 1);
    uint8_t *recv = malloc((size_t)(R * stride));
    uint8_t *packed = malloc((size_t)(R * bytes) + 1);
    int rc = 0;
    if (!send || !recv || !packed) {
        rc = moe_fail(-ENOMEM, "rank %d: out of memory for case %d", me, c);
        goto out;
    }
    /* Every peer gets the same block, so the pattern's destination is -1. */
    fill_payload(send, c, me, -1, bytes);
    memset(packed, GUARD_VALUE, (size_t)(R * bytes) + 1);
    rc = moe_transport_allgather(t, send, bytes, packed);
    if (packed[R * bytes] != GUARD_VALUE && rc == 0)
        rc = moe_fail(-EPROTO, "rank %d: case %d (all-gather): the byte after "
                      "the %" PRIu64 "-byte buffer was overwritten", me, c,
                      (uint64_t)R * bytes);
    /* Spread the blocks out with guards so that check_block() applies. */
    memset(recv, GUARD_VALUE, (size_t)(R * stride));
    for (int s = 0; s < R; s++)
        memcpy(recv + s * stride, packed + s * bytes, (size_t)bytes);
    for (int s = 0; rc == 0 && s < R; s++)
        rc = check_block(me, recv + s * stride, bytes, c, s, -1, "all-gather");
    if (rc == 0)
        rc = record_append(out, packed, (uint64_t)R * bytes);
out:
    free(send);
    free(recv);
    free(packed);
    return rc;
}

/* Rank r's value i of the all-reduce: positive and negative values of up
 * to about 2^52, so that the sum over 8 ranks cannot overflow. */
static int64_t reduce_value(int c, int r, int64_t i)
{
    uint64_t x = (uint64_t)payload_byte(c, r, 0, (uint64_t)i) << 44 |
                 (uint64_t)payload_byte(c, r, 1, (uint64_t)i) << 36 |
                 (uint64_t)(i * 2654435761u % 1000003);
    return (i + r) % 3 == 0 ? -(int64_t)x : (int64_t)x;
}

static int case_allreduce(struct moe_transport *t, struct record *out, int c,
                          int64_t count)
{
    int R = t->ranks, me = t->rank;
    int64_t *values = malloc((size_t)count * sizeof *values + 1);
    if (!values)
        return moe_fail(-ENOMEM, "rank %d: out of memory for case %d", me, c);
    for (int64_t i = 0; i < count; i++)
        values[i] = reduce_value(c, me, i);
    int rc = moe_transport_allreduce_i64(t, values, count);
    for (int64_t i = 0; rc == 0 && i < count; i++) {
        int64_t expected = 0;
        for (int r = 0; r < R; r++)
            expected += reduce_value(c, r, i);
        if (values[i] != expected)
            rc = moe_fail(-EPROTO, "rank %d: case %d (all-reduce of %" PRId64
                          "): value %" PRId64 " is %" PRId64 ", expected %"
                          PRId64, me, c, count, i, values[i], expected);
    }
    if (rc == 0)
        rc = record_append(out, values, (uint64_t)count * sizeof *values);
    free(values);
    return rc;
}

static uint64_t gather_bytes(int R, int r, int c)
{
    if (R > 1 && r == 1)
        return 0;
    return (uint64_t)((r + 1) * 1237 + c * 11) % 5000;
}

static int case_gatherv(struct moe_transport *t, struct tables *tb,
                        struct record *out, int c, int root)
{
    int R = t->ranks, me = t->rank;
    uint64_t bytes = gather_bytes(R, me, c);
    for (int s = 0; s < R; s++)
        tb->recv_bytes[s] = gather_bytes(R, s, c);
    uint64_t recv_total = reverse_layout(tb->recv_bytes, R, tb->recv_offsets);

    uint8_t *send = malloc((size_t)bytes + 1);
    uint8_t *recv = me == root ? malloc((size_t)recv_total) : NULL;
    int rc = 0;
    if (!send || (me == root && !recv)) {
        rc = moe_fail(-ENOMEM, "rank %d: out of memory for case %d", me, c);
        goto out;
    }
    fill_payload(send, c, me, root, bytes);
    if (recv)
        memset(recv, GUARD_VALUE, (size_t)recv_total);

    rc = moe_transport_gatherv(t, send, bytes, recv,
                               me == root ? tb->recv_bytes : NULL,
                               me == root ? tb->recv_offsets : NULL, root);
    if (me == root) {
        for (int s = 0; rc == 0 && s < R; s++)
            rc = check_block(me, recv + tb->recv_offsets[s], tb->recv_bytes[s],
                             c, s, root, "gather");
        if (rc == 0)
            rc = record_append(out, recv, recv_total);
    }
out:
    free(send);
    free(recv);
    return rc;
}

/* Carries out --fault on the faulty rank. Returns 0 to go on. */
static int apply_fault(const struct config *cfg, int me)
{
    if (me != cfg->fault_rank)
        return 0;
    switch (cfg->fault) {
    case FAULT_EXIT:
        return moe_fail(-ECANCELED, "rank %d: failing on purpose (--fault)", me);
    case FAULT_KILL:
        raise(SIGKILL);
        return 0;
    case FAULT_STALL:
        for (;;)
            pause();
    case FAULT_NONE:
    case FAULT_MISMATCH:
        break;
    }
    return 0;
}

/* The cases, in order; case numbers count through all of them. The
 * all-to-alls charge the dispatch step, the all-gathers the layout step,
 * the all-reduces the route step and the gathers the combine step, so
 * that the per-step counters can be checked. */
static const enum sizes ALLTOALL_SIZES[] = {SIZES_ZERO, SIZES_UNEVEN, SIZES_LARGE,
                                           SIZES_SILENT};
static const uint64_t ALLGATHER_BYTES[] = {0, 1, 128, 70000};
static const int64_t ALLREDUCE_COUNTS[] = {0, 1, 3000};
enum {
    ALLTOALL_CASES = sizeof ALLTOALL_SIZES / sizeof *ALLTOALL_SIZES,
    ALLGATHER_CASES = sizeof ALLGATHER_BYTES / sizeof *ALLGATHER_BYTES,
    ALLREDUCE_CASES = sizeof ALLREDUCE_COUNTS / sizeof *ALLREDUCE_COUNTS,
    FIRST_GATHER_CASE = ALLTOALL_CASES + ALLGATHER_CASES + ALLREDUCE_CASES,
};

static int run_cases(struct moe_transport *t, const struct config *cfg,
                     struct tables *tb, struct record *out)
{
    int c = 0, rc = 0;

    moe_transport_set_step(t, MOE_STEP_DISPATCH);
    for (int i = 0; rc == 0 && i < ALLTOALL_CASES; i++) {
        if (c == 1 && (rc = apply_fault(cfg, t->rank)))
            return rc;
        rc = case_alltoallv(t, cfg, tb, out, c++, ALLTOALL_SIZES[i]);
    }
    moe_transport_set_step(t, MOE_STEP_LAYOUT);
    for (int i = 0; rc == 0 && i < ALLGATHER_CASES; i++)
        rc = case_allgather(t, out, c++, ALLGATHER_BYTES[i]);
    moe_transport_set_step(t, MOE_STEP_ROUTE);
    for (int i = 0; rc == 0 && i < ALLREDUCE_CASES; i++)
        rc = case_allreduce(t, out, c++, ALLREDUCE_COUNTS[i]);
    moe_transport_set_step(t, MOE_STEP_DONE);
    for (int i = 0; rc == 0 && i < 3; i++)
        rc = moe_transport_barrier(t);
    moe_transport_set_step(t, MOE_STEP_COMBINE);
    if (rc == 0)
        rc = case_gatherv(t, tb, out, c++, 0);
    if (rc == 0)
        rc = case_gatherv(t, tb, out, c++, t->ranks - 1);
    return rc;
}

/* Checks the transport's bytes_sent and allreduce_bytes against the sizes
 * of the cases, and appends them to the output, so that the two
 * transports must also count alike. */
static int check_counters(struct moe_transport *t, struct record *out)
{
    int R = t->ranks, me = t->rank;
    uint64_t expected[MOE_STEP_COUNT] = {0};
    for (int i = 0; i < ALLTOALL_CASES; i++)
        for (int d = 0; d < R; d++)
            if (d != me)
                expected[MOE_STEP_DISPATCH] += pair_bytes(ALLTOALL_SIZES[i], R, me, d);
    for (int i = 0; i < ALLGATHER_CASES; i++)
        expected[MOE_STEP_LAYOUT] += (uint64_t)(R - 1) * ALLGATHER_BYTES[i];
    for (int i = 0; i < ALLREDUCE_CASES; i++)
        expected[MOE_STEP_ROUTE] += (uint64_t)(R - 1) *
                                    (uint64_t)ALLREDUCE_COUNTS[i] * sizeof(int64_t);
    if (me != 0)
        expected[MOE_STEP_COMBINE] += gather_bytes(R, me, FIRST_GATHER_CASE);
    if (me != R - 1)
        expected[MOE_STEP_COMBINE] += gather_bytes(R, me, FIRST_GATHER_CASE + 1);

    for (int step = 0; step < MOE_STEP_COUNT; step++)
        if (t->bytes_sent[step] != expected[step])
            return moe_fail(-EPROTO, "rank %d: the %s transport counted %" PRIu64
                            " bytes sent in %s, expected %" PRIu64, me, t->name,
                            t->bytes_sent[step], moe_step_name(step),
                            expected[step]);
    if (t->allreduce_bytes != expected[MOE_STEP_ROUTE])
        return moe_fail(-EPROTO, "rank %d: the %s transport counted %" PRIu64
                        " all-reduce bytes, expected %" PRIu64, me, t->name,
                        t->allreduce_bytes, expected[MOE_STEP_ROUTE]);
    int rc = record_append(out, t->bytes_sent, sizeof t->bytes_sent);
    if (rc == 0)
        rc = record_append(out, &t->allreduce_bytes, sizeof t->allreduce_bytes);
    return rc;
}

/* The two cases of --huge; each receiver checks every byte. */
static int run_huge(struct moe_transport *t, const struct config *cfg,
                    struct tables *tb)
{
    int R = t->ranks, me = t->rank;
    uint64_t bytes = cfg->huge_bytes;
    if (R < 2)
        return moe_fail(-EINVAL, "--huge needs at least 2 ranks");
    int sender = me == 0 || (me == R - 1), receiver = me == 1 || me == 0;
    uint8_t *send = sender ? malloc((size_t)bytes) : NULL;
    uint8_t *recv = receiver ? malloc((size_t)bytes + GUARD_BYTES) : NULL;
    int rc = 0;
    if ((sender && !send) || (receiver && !recv)) {
        rc = moe_fail(-ENOMEM, "rank %d: out of memory for %" PRIu64 " bytes",
                      me, bytes);
        goto out;
    }

    /* Case 0: rank 0 sends `bytes` to rank 1. */
    for (int p = 0; p < R; p++) {
        tb->send_bytes[p] = me == 0 && p == 1 ? bytes : 0;
        tb->recv_bytes[p] = me == 1 && p == 0 ? bytes : 0;
        tb->send_offsets[p] = tb->recv_offsets[p] = 0;
    }
    if (me == 0)
        fill_payload(send, 0, 0, 1, bytes);
    if (me == 1)
        memset(recv, GUARD_VALUE, (size_t)bytes + GUARD_BYTES);
    rc = moe_transport_alltoallv(t, send, tb->send_bytes, tb->send_offsets, recv,
                                 tb->recv_bytes, tb->recv_offsets);
    if (rc == 0 && me == 1)
        rc = check_block(me, recv, bytes, 0, 0, 1, "huge all-to-all");

    /* Case 1: rank R - 1 sends `bytes` to the gather's root, rank 0. */
    for (int p = 0; p < R; p++) {
        tb->recv_bytes[p] = p == R - 1 ? bytes : 0;
        tb->recv_offsets[p] = 0;
    }
    if (rc == 0 && me == R - 1)
        fill_payload(send, 1, R - 1, 0, bytes);
    if (rc == 0 && me == 0)
        memset(recv, GUARD_VALUE, (size_t)bytes + GUARD_BYTES);
    if (rc == 0)
        rc = moe_transport_gatherv(t, send, me == R - 1 ? bytes : 0, recv,
                                   tb->recv_bytes, tb->recv_offsets, 0);
    if (rc == 0 && me == 0)
        rc = check_block(me, recv, bytes, 1, R - 1, 0, "huge gather");
    if (rc == 0 && me == 0) {
        printf("transport_check: %s transport, R = %d: %" PRIu64 "-byte "
               "all-to-all and gather, every byte as expected\n", t->name, R,
               bytes);
        fflush(stdout);
    }
out:
    free(send);
    free(recv);
    return rc;
}

/* Gathers every rank's record to rank 0, which writes them to the output
 * file in rank order. */
static int write_records(struct moe_transport *t, const struct config *cfg,
                         struct tables *tb, const struct record *out)
{
    int R = t->ranks, me = t->rank;
    uint64_t length = out->length;
    int rc = moe_transport_allgather(t, &length, sizeof length, tb->recv_bytes);
    if (rc)
        return rc;
    uint64_t total = 0;
    for (int s = 0; s < R; s++) {
        tb->recv_offsets[s] = total;
        total += tb->recv_bytes[s];
    }
    uint8_t *all = me == 0 ? malloc((size_t)total + 1) : NULL;
    if (me == 0 && !all)
        return moe_fail(-ENOMEM, "rank 0: out of memory for %" PRIu64 " bytes "
                        "of records", total);
    rc = moe_transport_gatherv(t, out->bytes, out->length, all, tb->recv_bytes,
                               tb->recv_offsets, 0);
    if (rc == 0 && me == 0 && cfg->out_path) {
        struct moe_file_part part = {all, (size_t)total};
        rc = moe_write_file(cfg->out_path, &part, 1);
    }
    if (rc == 0 && me == 0) {
        /* A forked shm rank ends with _exit(), which does not flush. */
        printf("transport_check: %s transport, R = %d: every byte as expected, "
               "%" PRIu64 " bytes of output\n", t->name, R, total);
        fflush(stdout);
    }
    free(all);
    return rc;
}

/* Runs the cases on one rank and writes the output. */
static int run_rank(struct moe_transport *t, const struct config *cfg)
{
    int R = t->ranks;
    struct record out = {0};
    uint64_t *table = calloc(4 * (size_t)R, sizeof *table);
    if (!table)
        return moe_fail(-ENOMEM, "rank %d: out of memory", t->rank);
    struct tables tb = {table, table + R, table + 2 * R, table + 3 * R};
    if (cfg->huge_bytes) {
        int rc = run_huge(t, cfg, &tb);
        free(table);
        return rc;
    }
    int rc = run_cases(t, cfg, &tb, &out);
    if (rc == 0)
        rc = check_counters(t, &out);
    if (rc == 0)
        rc = write_records(t, cfg, &tb, &out);
    free(table);
    free(out.bytes);
    return rc;
}

/* ---- shm: ranks forked by moe_launch ----------------------------------- */

static int shm_rank_main(struct moe_comm *comm, void *arg)
{
    struct moe_transport t;
    int rc = moe_transport_shm_open(&t, comm);
    if (rc)
        return rc;
    rc = run_rank(&t, arg);
    moe_transport_close(&t);
    return rc;
}

static int run_shm(const struct config *cfg)
{
    struct config local = *cfg;
    struct moe_launch launch;
    struct moe_launch_config config = {
        .ranks = cfg->ranks,
        .ring_capacity = 4096, /* small, so the large case wraps many times */
        .timeout_ns = (int64_t)(cfg->timeout_seconds * 1e9),
        .rank_main = shm_rank_main,
        .arg = &local,
    };
    int rc = moe_launch_create(&launch, &config);
    if (rc) {
        fprintf(stderr, "transport_check: %s\n", moe_error_message());
        return EXIT_RUNTIME;
    }
    fflush(stdout);
    rc = moe_launch_run(&launch);
    if (rc) {
        char description[MOE_ERROR_TEXT_BYTES + 64];
        if (launch.failed_rank >= 0) {
            moe_launch_describe(&launch, launch.failed_rank, description,
                                sizeof description);
            fprintf(stderr, "transport_check: rank %d: %s\n", launch.failed_rank,
                    description);
        } else {
            fprintf(stderr, "transport_check: %s\n", moe_error_message());
        }
    }
    moe_launch_destroy(&launch);
    return rc ? EXIT_RUNTIME : 0;
}

/* ---- mpi: ranks started by mpirun -------------------------------------- */

static int run_mpi(const struct config *cfg, int *argc, char ***argv)
{
    int rc = moe_transport_mpi_init(argc, argv);
    if (rc) {
        fprintf(stderr, "transport_check: %s\n", moe_error_message());
        return rc == -EINVAL ? EXIT_USAGE : EXIT_RUNTIME;
    }
    struct moe_transport t;
    rc = moe_transport_mpi_open(&t, (int64_t)(cfg->timeout_seconds * 1e9));
    if (rc == 0 && cfg->int_limit)
        rc = moe_transport_mpi_set_large_path(&t, cfg->int_limit, cfg->chunk_bytes);
    if (rc == 0)
        rc = run_rank(&t, cfg);
    if (rc) {
        fprintf(stderr, "transport_check: %s\n", moe_error_message());
        if (t.ops)
            moe_transport_abort(&t, EXIT_RUNTIME);
        moe_transport_mpi_finalize();
        return EXIT_RUNTIME;
    }
    moe_transport_close(&t);
    if (moe_transport_mpi_finalize()) {
        fprintf(stderr, "transport_check: %s\n", moe_error_message());
        return EXIT_RUNTIME;
    }
    return 0;
}

/* ---- command line ------------------------------------------------------ */

static int parse_fault(const char *text, struct config *cfg)
{
    static const char *const actions[] = {"exit", "kill", "stall", "mismatch"};
    static const enum fault faults[] = {FAULT_EXIT, FAULT_KILL, FAULT_STALL,
                                        FAULT_MISMATCH};
    const char *colon = strchr(text, ':');
    char rank_text[32];
    if (!colon || (size_t)(colon - text) >= sizeof rank_text)
        return moe_fail(-EINVAL, "invalid --fault value '%s': expected "
                        "RANK:ACTION", text);
    memcpy(rank_text, text, (size_t)(colon - text));
    rank_text[colon - text] = '\0';
    int64_t rank;
    int rc = moe_parse_int64("--fault", rank_text, 0, 1 << 20, &rank);
    if (rc)
        return rc;
    for (size_t i = 0; i < sizeof actions / sizeof *actions; i++)
        if (!strcmp(colon + 1, actions[i])) {
            cfg->fault_rank = (int)rank;
            cfg->fault = faults[i];
            return 0;
        }
    return moe_fail(-EINVAL, "invalid --fault action '%s': expected exit, "
                    "kill, stall or mismatch", colon + 1);
}

static int parse_large_path(const char *text, struct config *cfg)
{
    unsigned long long limit, chunk;
    char tail;
    if (sscanf(text, "%llu:%llu%c", &limit, &chunk, &tail) != 2 || chunk < 1 ||
        chunk > limit || limit > INT32_MAX)
        return moe_fail(-EINVAL, "invalid --large-path value '%s': expected "
                        "LIMIT:CHUNK in bytes, 1 <= CHUNK <= LIMIT <= %d",
                        text, INT32_MAX);
    cfg->int_limit = limit;
    cfg->chunk_bytes = chunk;
    return 0;
}

static int parse(int argc, char **argv, struct config *cfg)
{
    static const char *const known[] = {"--transport", "--ranks", "--out",
                                        "--timeout", "--large-path", "--fault",
                                        "--huge", NULL};
    int have_transport = 0, rc;
    for (int i = 1; i < argc; i++) {
        const char *flag = argv[i], *text;
        if ((rc = moe_next_option("transport_check", known, argc, argv, &i, &text)))
            return rc;
        if (!strcmp(flag, "--transport")) {
            if ((rc = moe_transport_parse_kind(flag, text, &cfg->transport)))
                return rc;
            have_transport = 1;
        } else if (!strcmp(flag, "--ranks")) {
            int64_t v;
            if ((rc = moe_parse_int64(flag, text, 1, MAX_SHM_RANKS, &v)))
                return rc;
            cfg->ranks = (int)v;
        } else if (!strcmp(flag, "--out")) {
            cfg->out_path = text;
        } else if (!strcmp(flag, "--timeout")) {
            if ((rc = moe_parse_double(flag, text, 0.01, 3600, &cfg->timeout_seconds)))
                return rc;
        } else if (!strcmp(flag, "--large-path")) {
            if ((rc = parse_large_path(text, cfg)))
                return rc;
        } else if (!strcmp(flag, "--huge")) {
            if ((rc = moe_parse_bytes(flag, text, 1, 1ULL << 40, &cfg->huge_bytes)))
                return rc;
        } else if (!strcmp(flag, "--fault")) {
            if ((rc = parse_fault(text, cfg)))
                return rc;
        }
    }
    if (!have_transport)
        return moe_fail(-EINVAL, "missing --transport shm or --transport mpi");
    if (cfg->transport == MOE_TRANSPORT_SHM && cfg->ranks == 0)
        return moe_fail(-EINVAL, "missing --ranks: --transport shm forks its "
                        "own ranks");
    if (cfg->transport == MOE_TRANSPORT_MPI && cfg->ranks)
        return moe_fail(-EINVAL, "invalid --ranks with --transport mpi: mpirun "
                        "-np sets the rank count");
    if (cfg->transport == MOE_TRANSPORT_SHM && cfg->int_limit)
        return moe_fail(-EINVAL, "invalid --large-path with --transport shm: "
                        "only the mpi transport has a large-message path");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 2 && !strcmp(argv[1], "--build-info")) {
        printf("mpi=%d\n", moe_transport_mpi_built());
        return 0;
    }
    struct config cfg = {.timeout_seconds = 10.0, .fault_rank = -1};
    if (parse(argc, argv, &cfg)) {
        fprintf(stderr, "transport_check: %s\n", moe_error_message());
        return EXIT_USAGE;
    }
    if (cfg.transport == MOE_TRANSPORT_SHM)
        return run_shm(&cfg);
    return run_mpi(&cfg, &argc, &argv);
}
