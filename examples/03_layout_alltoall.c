/*
 * 03_layout_alltoall.c - the dispatch layout, and the all-to-all that
 * moves each token row to the rank that owns its expert.
 *
 * RANKS processes each own a block of tokens and a block of experts. Each
 * rank routes its own tokens and counts the rows it has for every expert.
 * One all-gather of those counts gives every rank the whole (R, E)
 * layout. From it each rank computes, before any row moves, how many bytes
 * it will receive from each peer, which an all-to-all with MPI_Alltoallv
 * semantics needs in advance. Then the all-to-all moves the rows.
 *
 * Prints each rank's blocks, the layout, the send-count matrix (rows rank
 * i sends to rank j) and every row each rank received, and checks that
 * each received row holds its token's values and belongs to an owned
 * expert.
 */
#include "moe_error.h"
#include "moe_launch.h"
#include "moe_layer.h"

#include <stdio.h>
#include <string.h>

enum { RANKS = 3, TOKENS = 9, HIDDEN = 4, FFN = 4, EXPERTS = 6, TOP_K = 2 };
#define SEED 11
#define ROWS (TOKENS * TOP_K)

/* One dispatched row: the token and expert it is for, then its values. */
struct row { int32_t token, expert; float x[HIDDEN]; };

/* One rank's report to the launcher, written into the segment's app area. */
struct rank_report {
    int64_t layout[RANKS][EXPERTS]; /* rows rank s routes to expert e */
    int64_t sent[RANKS];            /* rows this rank sends to rank d */
    int64_t received;               /* rows this rank received */
    struct row rows[ROWS];          /* them, in receive order */
    int32_t rows_ok;                /* 1 when every received row passed the checks */
};

/* Set by main before fork. The ranks inherit them and only read them. */
static struct moe_weights layer;
static float tokens[TOKENS * HIDDEN];

static int rank_main(struct moe_comm *comm, void *arg)
{
    (void)arg;
    struct rank_report *me = (struct rank_report *)comm->app + comm->rank;
    int64_t first, count;
    moe_block_range(TOKENS, RANKS, comm->rank, &first, &count);

    /* Route this rank's tokens: ids (count, K). */
    float logits[TOKENS * EXPERTS], probs[TOKENS * EXPERTS], weights[ROWS];
    int32_t ids[ROWS];
    moe_gate_logits(tokens + first * HIDDEN, layer.gate, count, HIDDEN, EXPERTS, logits);
    moe_route(&layer.router, NULL, logits, count, EXPERTS, TOP_K, probs, ids, weights);
    int64_t mine[EXPERTS] = {0};
    for (int64_t i = 0; i < count * TOP_K; i++)
        mine[ids[i]]++;

    /* The layout exchange: every rank learns every rank's counts. */
    int rc = moe_allgather(comm, mine, sizeof mine, me->layout);
    if (rc)
        return rc;

    /* Pack the rows by expert. Each rank owns a contiguous block of experts,
     * so the rows for rank d form one contiguous range of the send buffer. */
    struct row send[ROWS];
    int64_t next[EXPERTS], at = 0;
    for (int e = 0; e < EXPERTS; e++) {
        next[e] = at;
        at += mine[e];
    }
    for (int64_t i = 0; i < count * TOP_K; i++) {
        struct row *r = &send[next[ids[i]]++];
        r->token = (int32_t)(first + i / TOP_K);
        r->expert = ids[i];
        memcpy(r->x, tokens + r->token * HIDDEN, sizeof r->x);
    }

    /* Bytes per peer: this rank's rows for d's experts go to d, and from
     * the layout it computes what each source s has for its experts. */
    uint64_t send_bytes[RANKS] = {0}, recv_bytes[RANKS] = {0};
    uint64_t send_offsets[RANKS], recv_offsets[RANKS], sent = 0, received = 0;
    for (int e = 0; e < EXPERTS; e++) {
        int owner = moe_expert_owner(EXPERTS, RANKS, e);
        send_bytes[owner] += (uint64_t)mine[e] * sizeof(struct row);
        for (int s = 0; owner == comm->rank && s < RANKS; s++)
            recv_bytes[s] += (uint64_t)me->layout[s][e] * sizeof(struct row);
    }
    for (int peer = 0; peer < RANKS; peer++) {
        send_offsets[peer] = sent;
        sent += send_bytes[peer];
        recv_offsets[peer] = received;
        received += recv_bytes[peer];
        me->sent[peer] = (int64_t)(send_bytes[peer] / sizeof(struct row));
    }
    if ((rc = moe_alltoallv(comm, send, send_bytes, send_offsets, me->rows, recv_bytes,
                            recv_offsets)))
        return rc;

    me->received = (int64_t)(received / sizeof(struct row));
    me->rows_ok = 1;
    for (int64_t i = 0; i < me->received; i++) {
        const struct row *r = &me->rows[i];
        if (r->token < 0 || r->token >= TOKENS ||
            moe_expert_owner(EXPERTS, RANKS, r->expert) != comm->rank ||
            memcmp(r->x, tokens + r->token * HIDDEN, sizeof r->x) != 0)
            me->rows_ok = 0;
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc > 1) {
        fprintf(stderr, "%s: invalid argument '%s': this example takes none\n", argv[0],
                argv[1]);
        return 2;
    }
    struct moe_shape shape = {.tokens = TOKENS, .hidden = HIDDEN, .ffn = FFN,
                              .experts = EXPERTS, .top_k = TOP_K};
    if (moe_weights_init_random(&layer, &shape, SEED)) {
        fprintf(stderr, "03_layout_alltoall: out of memory for the layer weights\n");
        return 3;
    }
    moe_tokens_random(tokens, 0, TOKENS, HIDDEN, SEED);

    struct moe_launch_config config = {
        .ranks = RANKS, .ring_capacity = 4096,
        .app_bytes = RANKS * sizeof(struct rank_report),
        .timeout_ns = 5000000000LL, .rank_main = rank_main};
    struct moe_launch launch;
    int rc = moe_launch_create(&launch, &config), created = rc == 0;
    if (created && (rc = moe_launch_run(&launch)) != 0)
        for (int r = 0; r < RANKS; r++) {
            char why[512];
            moe_launch_describe(&launch, r, why, sizeof why);
            if (launch.outcome[r].signal || launch.outcome[r].exit_status)
                fprintf(stderr, "03_layout_alltoall: %s\n", why);
        }
    else if (rc)
        fprintf(stderr, "03_layout_alltoall: %s\n", moe_error_message());

    const struct rank_report *report = rc ? NULL : moe_segment_app(launch.segment);
    int ok = rc == 0;
    printf("03_layout_alltoall: ranks %d, tokens %d, hidden %d, ffn %d, experts %d, "
           "top-k %d, seed %d\n\nlayout (rows rank s routes to expert e) and send counts "
           "(rows rank s sends to rank d):\n", RANKS, TOKENS, HIDDEN, FFN, EXPERTS, TOP_K,
           SEED);
    for (int s = 0; ok && s < RANKS; s++) {
        int64_t t0, tn, e0, en;
        moe_block_range(TOKENS, RANKS, s, &t0, &tn);
        moe_block_range(EXPERTS, RANKS, s, &e0, &en);
        printf("  rank %d:", s);
        for (int e = 0; e < EXPERTS; e++)
            printf(" %2lld", (long long)report[0].layout[s][e]);
        printf("  | send");
        for (int d = 0; d < RANKS; d++)
            printf(" %2lld", (long long)report[s].sent[d]);
        printf("  | owns tokens %lld..%lld, experts %lld..%lld\n", (long long)t0,
               (long long)(t0 + tn - 1), (long long)e0, (long long)(e0 + en - 1));
        /* Every rank must hold the same layout after the all-gather. */
        ok &= memcmp(report[s].layout, report[0].layout, sizeof report[0].layout) == 0;
    }
    int64_t total = 0;
    for (int r = 0; ok && r < RANKS; r++) {
        printf("rank %d received %lld rows (token->expert):", r, (long long)report[r].received);
        for (int64_t i = 0; i < report[r].received; i++)
            printf(" %d->%d", report[r].rows[i].token, report[r].rows[i].expert);
        printf("\n");
        total += report[r].received;
        ok &= report[r].rows_ok;
    }
    ok &= total == ROWS;
    printf("rows arrived: %lld, %s\n", (long long)total,
           ok ? "each with its token's values, at the owner of its expert"
              : "FAILED: a rank failed, or a row is missing, wrong or at the wrong rank");
    if (created)
        moe_launch_destroy(&launch);
    moe_weights_free(&layer);
    if (rc)
        return 3;
    return ok ? 0 : 1;
}
