/*
 * dist.c - one rank's expert-parallel forward; see moe_dist.h for the steps.
 *
 * Runs in each rank process. Reads the weights and its token block from
 * memory inherited from the launcher, exchanges rows only through the rings,
 * and writes its output rows, routing counts, drops and stats into the run
 * area.
 *
 * Row orders, which are what make the output bitwise equal to the golden
 * path:
 *   send buffer   this rank's kept assignments sorted by (expert, token).
 *                 Experts of one destination are contiguous, so this is
 *                 also destination-major, and the block for rank d is one
 *                 range.
 *   receive buf   source-major, and within one source expert-major in token
 *                 order (the sender's order).
 *   expert input  expert-major; within an expert, sources in rank order.
 *                 Sources own increasing token blocks, so the rows are in
 *                 global token order, exactly as moe_golden_forward builds
 *                 them.
 * Combine runs the same exchange backwards with the same counts, so the
 * returned rows land in send-buffer order and map back to (token, slot).
 *
 * Capacity. The golden path keeps, for each expert, the survivors of
 * moe_capacity_keep() over the expert's assignments in global token order.
 * The ranks reach the same set without sending a dropped row.
 *   position  Assignment j of rank s to expert e has the global position
 *             (rows of the ranks below s for e) + j. The layout gives
 *             every rank these counts, so each rank drops its own rows.
 *   probs     Each rank sends the owner its routing weights (4 bytes per
 *             assignment). The owner applies the rule to each expert's
 *             list in global token order and returns one keep flag per
 *             assignment. Rows move only after that.
 */
#include "moe_dist.h"
#include "moe_aux.h"
#include "moe_error.h"
#include "moe_launch.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t align64(uint64_t v)
{
    return (v + 63) & ~(uint64_t)63;
}

/* Computes the offsets of the run area into *a and returns its size, or 0
 * on overflow. Every size is checked against a bound far below 2^64 first,
 * so the sums cannot wrap. */
static uint64_t layout_run_area(struct moe_run_area *a, const struct moe_shape *s,
                                int ranks, const struct moe_run_area_spec *spec)
{
    const uint64_t limit = (uint64_t)1 << 56;
    struct moe_run_area_spec none = {.steps = 1};
    if (!spec)
        spec = &none;
    uint64_t T = (uint64_t)s->tokens, H = (uint64_t)s->hidden,
             E = (uint64_t)s->experts, K = (uint64_t)s->top_k,
             steps = spec->steps < 1 ? 1 : (uint64_t)spec->steps;
    if (T >= (1u << 30) || H >= (1u << 30) || E >= (1u << 30) || K > E ||
        steps > (1u << 24) || T * H >= limit / (K + 1) / sizeof(float))
        return 0;
    uint64_t stats_len = (uint64_t)moe_router_stats_len((int64_t)E);
    uint64_t trace_capacity = 0;
    if (spec->trace) {
        /* The steps and waits of a forward, and one span per expert call. */
        trace_capacity = (256 + E) * steps;
        if (trace_capacity > (1u << 16))
            trace_capacity = 1u << 16;
    }

    uint64_t at = align64(sizeof *a);
    memset(a, 0, sizeof *a);
    a->steps = (int64_t)steps;
    a->trace_capacity = (int64_t)trace_capacity;
    a->output_offset = at;
    at += align64(T * H * sizeof(float));
    a->counts_offset = at;
    at += align64((uint64_t)ranks * E * sizeof(int64_t));
    a->kept_offset = at;
    at += align64(T * K);
    a->kept_counts_offset = at;
    at += align64((uint64_t)ranks * E * sizeof(int64_t));
    a->stats_offset = at;
    at += align64(steps * stats_len * sizeof(int64_t));
    a->dropped_offset = at;
    at += align64(steps * E * sizeof(int64_t));
    a->rank_report_offset = at;
    at += align64((uint64_t)ranks * sizeof(struct moe_rank_report));
    if (trace_capacity) {
        a->trace_offset = at;
        at += align64((uint64_t)ranks * trace_capacity * sizeof(struct moe_trace_event));
    }
    if (spec->windows) {
        /* A rank receives at most one row per token for each expert it
         * owns, and T x K rows in all. That many floats fit below the
         * limit checked above. */
        uint64_t owned_max = (E + (uint64_t)ranks - 1) / (uint64_t)ranks;
        uint64_t rows = T * (owned_max < K ? owned_max : K);
        a->window_rows = (int64_t)rows;
        a->window_stride = align64(rows * H * sizeof(float));
        a->window_offset = at;
        if (a->window_stride > limit / 2 / (uint64_t)ranks)
            return 0;
        at += 2 * (uint64_t)ranks * a->window_stride;
    }
    if (spec->dump) {
        a->logits_offset = at;
        at += align64(T * E * sizeof(float));
        a->scores_offset = at;
        at += align64(T * E * sizeof(float));
        a->ids_offset = at;
        at += align64(T * K * sizeof(int32_t));
        a->weights_offset = at;
        at += align64(T * K * sizeof(float));
        a->expert_out_offset = at;
        at += align64(T * K * H * sizeof(float));
        if (s->shared_ffn > 0) {
            a->shared_out_offset = at;
            at += align64(T * H * sizeof(float));
        }
        a->recv_x_offset = at;
        at += align64(T * K * H * sizeof(float));
    }
    return at;
}

uint64_t moe_run_area_bytes(const struct moe_shape *shape, int ranks,
                            const struct moe_run_area_spec *spec)
{
    struct moe_run_area a;
    return layout_run_area(&a, shape, ranks, spec);
}

void moe_run_area_init(void *area, const struct moe_shape *shape, int ranks,
                       const struct moe_run_area_spec *spec)
{
    struct moe_run_area *a = area;
    a->area_bytes = layout_run_area(a, shape, ranks, spec);
    a->magic = MOE_RUN_AREA_MAGIC;
    a->shape = *shape;
    a->ranks = ranks;
    a->dump = spec && spec->dump;
}

/* Per-rank state, kept across forwards so that buffers are reused. */
struct moe_dist_rank {
    struct moe_transport *t;
    void *area;          /* the run area: the segment's, or this rank's own */
    const struct moe_dist_input *input;
    struct moe_rank_slot *slot;
    struct moe_rank_report *report; /* this rank's, in the run area */
    int64_t step_start_ns;
    uint64_t step_wait_start_ns; /* t->wait_ns of the step at its start */
    uint64_t step_bytes_start;   /* t->bytes_sent of the step at its start */
    int64_t forward;             /* forwards run so far */

    int64_t token_first, tokens;   /* this rank's token block */
    int64_t expert_first, experts; /* this rank's expert block */

    float *step_tokens;  /* (tokens, H) drawn batch of forwards after the
                            first, or NULL */
    float *bias;         /* (E) selection bias, or NULL */
    float *logits;       /* (tokens, E) */
    float *probs;        /* (tokens, E) */
    int32_t *ids;        /* (tokens, K) */
    float *weights;      /* (tokens, K) */
    int64_t *counts;     /* (E): rows this rank routes to each expert */
    int64_t *all_counts; /* (R, E): every rank's counts */
    int64_t *kept_counts; /* (R, E): rows expert e keeps of rank s; valid for
                             this rank's row and its experts' columns */
    int64_t *stats;      /* moe_router_stats_len(E) */
    int64_t *order;      /* (tokens * K): send row i is slot order[i] */
    uint8_t *keep;       /* (tokens * K): send row i survives */
    float *send_rows;    /* (tokens * K, H) */
    float *recv_rows;    /* (received, H), source-major */
    float *expert_in;    /* (received, H), expert-major */
    float *expert_out;   /* (received, H), expert-major */
    float *scratch;      /* for scratch_capacity rows of one expert */
    float *shared_scratch; /* moe_shared_scratch_floats(), or NULL */
    float *shared_out;   /* (tokens, H) shared expert rows, or NULL */
    const float **slot_rows; /* (tokens * K) */
    uint64_t *table;     /* 5 x (R): byte counts and offsets */
    int64_t received_capacity; /* rows recv_rows, expert_in, expert_out hold */
    int64_t scratch_capacity;

    struct moe_trace_event *trace; /* this rank's buffer, or NULL */
    int64_t trace_capacity;

    /* The direct exchange, when the run area has windows and the
     * transport has notes; see moe_dist_forward(). */
    int windows;
    uint8_t *window_base;    /* rank 0's input window, in this mapping */
    uint64_t window_stride;
    int64_t window_rows;
    uint64_t *notes;         /* (R, experts_max): notes received */
    uint64_t *need;          /* (R): notes to wait for */
    int64_t *expert_base;    /* (E): first row of expert e in its owner's
                                windows */
    int64_t *kept_columns;   /* (R x experts_max x R) scratch of the gather
                                of kept counts, probs policy only */
    int corrupt_note;        /* MOE_EP_CORRUPT_NOTE names this rank: its
                                first note claims one row too many */
};

/* Appends a span to the trace and returns it, or NULL when the trace is
 * off or full. A wait that starts soon after the last wait span extends
 * that span instead. */
static struct moe_trace_event *trace_add(struct moe_dist_rank *f, int kind, int step,
                                         int64_t start, int64_t end, uint64_t bytes)
{
    if (!f->trace)
        return NULL;
    int64_t n = f->report->trace_events;
    struct moe_trace_event *last = n > 0 ? &f->trace[n - 1] : NULL;
    if (kind == MOE_TRACE_WAIT && last && last->kind == MOE_TRACE_WAIT &&
        last->step == step && last->forward == f->forward &&
        start - last->end_ns < MOE_TRACE_MERGE_NS) {
        last->end_ns = end;
        return last;
    }
    if (n >= f->trace_capacity) {
        /* Full: later spans are counted, not drawn, and the report names
         * the forward where the trace stops. */
        if (f->report->trace_dropped++ == 0)
            f->report->trace_full_forward = f->forward;
        return NULL;
    }
    f->trace[n] = (struct moe_trace_event){.start_ns = start, .end_ns = end,
                                           .kind = kind, .step = step,
                                           .forward = f->forward, .bytes = bytes};
    f->report->trace_events = n + 1;
    return &f->trace[n];
}

static void record_wait(void *arg, int step, int64_t start, int64_t end)
{
    trace_add(arg, MOE_TRACE_WAIT, step, start, end, 0);
}

static void begin_step(struct moe_dist_rank *f, int step)
{
    moe_transport_set_step(f->t, step);
    atomic_store_explicit(&f->slot->step, step, memory_order_release);
    char who[16];
    snprintf(who, sizeof who, "%d", f->t->rank);
    moe_fault_inject(who, moe_step_fault_name(step));
    f->step_start_ns = moe_now_ns();
    f->step_wait_start_ns = f->t->wait_ns[step];
    f->step_bytes_start = f->t->bytes_sent[step];
}

static void end_step(struct moe_dist_rank *f, int step)
{
    int64_t end = moe_now_ns();
    uint64_t bytes = f->t->bytes_sent[step] - f->step_bytes_start;
    f->slot->step_ns[step] += (uint64_t)(end - f->step_start_ns);
    f->slot->wait_ns[step] += f->t->wait_ns[step] - f->step_wait_start_ns;
    f->report->bytes_sent[step] += bytes;
    trace_add(f, MOE_TRACE_STEP, step, f->step_start_ns, end, bytes);
}

/* Checks the counts rank s announced: each expert gets at most one row per
 * token of s, and the rows add up to tokens(s) * K. */
static int validate_layout(const struct moe_dist_rank *f, const struct moe_shape *s)
{
    int R = f->t->ranks;
    for (int src = 0; src < R; src++) {
        int64_t first, tokens, sum = 0;
        moe_block_range(s->tokens, R, src, &first, &tokens);
        for (int64_t e = 0; e < s->experts; e++) {
            int64_t c = f->all_counts[src * s->experts + e];
            if (c < 0 || c > tokens)
                return moe_fail(-EPROTO, "rank %d: rank %d announced %" PRId64
                                " rows for expert %" PRId64 ", but it has only %"
                                PRId64 " tokens", f->t->rank, src, c, e, tokens);
            sum += c;
        }
        if (sum != tokens * s->top_k)
            return moe_fail(-EPROTO, "rank %d: rank %d announced %" PRId64
                            " rows in all, expected %" PRId64 " tokens x top-k %"
                            PRId64, f->t->rank, src, sum, tokens, s->top_k);
    }
    return 0;
}

/* The batch of the current forward: the launcher's tokens for the first,
 * then a fresh draw for each later one when asked for. */
static const float *forward_tokens(struct moe_dist_rank *f)
{
    const struct moe_dist_input *in = f->input;
    int64_t H = in->weights->shape.hidden;
    if (f->forward == 0 || !in->draw_tokens || !f->step_tokens)
        return in->tokens + f->token_first * H;
    moe_fill_uniform(f->step_tokens, f->tokens * H, in->seed, MOE_STREAM_TOKENS,
                     (uint32_t)f->forward, f->token_first * H, 1.0f);
    return f->step_tokens;
}

static int route(struct moe_dist_rank *f, const float *x)
{
    const struct moe_dist_input *in = f->input;
    const struct moe_shape *s = &in->weights->shape;
    int64_t H = s->hidden, E = s->experts, K = s->top_k, n = f->tokens;

    moe_gate_logits(x, in->weights->gate, n, H, E, f->logits);
    moe_add_gate_bias(f->logits, in->weights->gate_bias, n, E);
    moe_route(&in->weights->router, f->bias, f->logits, n, E, K, f->probs, f->ids,
              f->weights);
    memset(f->stats, 0, (size_t)moe_router_stats_len(E) * sizeof(int64_t));
    moe_router_stats_add(f->stats, f->logits, f->ids, n, E, K);

    /* Counting sort of the assignments by expert, stable in token order. */
    int64_t *next = calloc((size_t)E + 1, sizeof *next);
    if (!next)
        return moe_fail(-ENOMEM, "rank %d: out of memory", f->t->rank);
    memset(f->counts, 0, (size_t)E * sizeof *f->counts);
    for (int64_t i = 0; i < n * K; i++)
        f->counts[f->ids[i]]++;
    for (int64_t e = 1; e < E; e++)
        next[e] = next[e - 1] + f->counts[e - 1];
    for (int64_t i = 0; i < n * K; i++)
        f->order[next[f->ids[i]]++] = i;
    free(next);
    return 0;
}

/* Rows source `src` sends to this rank's experts, by kept_counts. */
static int64_t rows_from(const struct moe_dist_rank *f, int64_t E, int src)
{
    int64_t rows = 0;
    for (int64_t e = f->expert_first; e < f->expert_first + f->experts; e++)
        rows += f->kept_counts[src * E + e];
    return rows;
}

/* Rows expert e keeps from all sources. */
static int64_t rows_of_expert(const struct moe_dist_rank *f, int64_t E, int64_t e)
{
    int64_t rows = 0;
    for (int src = 0; src < f->t->ranks; src++)
        rows += f->kept_counts[src * E + e];
    return rows;
}

/* Position policy: the layout gives every rank the place of its rows in
 * each expert's global token order, so it keeps the first `limit` by
 * itself. Fills
 * kept_counts for every (source, expert) and keep[] for this rank's send
 * rows. */
static void keep_by_position(struct moe_dist_rank *f, int64_t E, int64_t limit)
{
    int R = f->t->ranks, me = f->t->rank;
    for (int64_t e = 0; e < E; e++) {
        int64_t before = 0;
        for (int src = 0; src < R; src++) {
            int64_t c = f->all_counts[src * E + e];
            int64_t room = limit < 0 ? c : limit - before;
            int64_t kept = room < c ? room : c;
            if (kept < 0)
                kept = 0;
            f->kept_counts[src * E + e] = kept;
            before += c;
        }
    }
    int64_t row = 0;
    for (int64_t e = 0; e < E; e++)
        for (int64_t j = 0; j < f->counts[e]; j++)
            f->keep[row++] = j < f->kept_counts[me * E + e];
}

/* Probs policy: the owner of each expert receives the routing weights of
 * all its assignments and decides, as the comment at the top describes. */
static int keep_by_probs(struct moe_dist_rank *f, int64_t E)
{
    struct moe_transport *t = f->t;
    const struct moe_capacity *cap = &f->input->weights->capacity;
    int R = t->ranks, me = t->rank;
    int64_t K = f->input->weights->shape.top_k, n = f->tokens * K;
    uint64_t *send_bytes = f->table, *send_offsets = f->table + R,
             *recv_bytes = f->table + 2 * R, *recv_offsets = f->table + 3 * R;

    /* Byte tables for one 4-byte weight per routed assignment. */
    int64_t sent = 0, received = 0;
    for (int d = 0; d < R; d++) {
        int64_t first, count, rows = 0;
        moe_block_range(E, R, d, &first, &count);
        for (int64_t e = first; e < first + count; e++)
            rows += f->counts[e];
        send_offsets[d] = (uint64_t)sent * sizeof(float);
        send_bytes[d] = (uint64_t)rows * sizeof(float);
        sent += rows;
        int64_t incoming = 0;
        for (int64_t e = f->expert_first; e < f->expert_first + f->experts; e++)
            incoming += f->all_counts[d * E + e];
        recv_offsets[d] = (uint64_t)received * sizeof(float);
        recv_bytes[d] = (uint64_t)incoming * sizeof(float);
        received += incoming;
    }
    float *send_weights = malloc((size_t)(n + 1) * sizeof(float));
    float *recv_weights = malloc((size_t)(received + 1) * sizeof(float));
    float *list = malloc((size_t)(received + 1) * sizeof(float));
    uint8_t *list_keep = malloc((size_t)received + 1);
    uint8_t *recv_keep = malloc((size_t)received + 1);
    int64_t *start = malloc((size_t)(R + 1) * sizeof(int64_t));
    int rc = 0;
    if (!send_weights || !recv_weights || !list || !list_keep || !recv_keep || !start) {
        rc = moe_fail(-ENOMEM, "rank %d: out of memory for the capacity rule", me);
        goto out;
    }
    for (int64_t i = 0; i < n; i++)
        send_weights[i] = f->weights[f->order[i]];
    uint64_t before = t->bytes_sent[t->step];
    rc = moe_transport_alltoallv(t, send_weights, send_bytes, send_offsets, recv_weights,
                       recv_bytes, recv_offsets);
    if (rc)
        goto out;

    /* For each owned expert, its list in global token order: sources in
     * rank order, each source's rows for the expert in token order. */
    for (int src = 0; src < R; src++)
        start[src] = (int64_t)(recv_offsets[src] / sizeof(float));
    for (int64_t e = f->expert_first; e < f->expert_first + f->experts; e++) {
        int64_t m = 0;
        for (int src = 0; src < R; src++) {
            memcpy(list + m, recv_weights + start[src],
                   (size_t)f->all_counts[src * E + e] * sizeof(float));
            m += f->all_counts[src * E + e];
        }
        if (moe_capacity_keep(cap, m, list, list_keep) < 0) {
            rc = moe_fail(-ENOMEM, "rank %d: out of memory for the capacity rule", me);
            goto out;
        }
        m = 0;
        for (int src = 0; src < R; src++) {
            int64_t c = f->all_counts[src * E + e], kept = 0;
            memcpy(recv_keep + start[src], list_keep + m, (size_t)c);
            for (int64_t j = 0; j < c; j++)
                kept += list_keep[m + j];
            f->kept_counts[src * E + e] = kept;
            start[src] += c;
            m += c;
        }
    }

    /* Return the flags: the same tables at one byte per assignment. */
    for (int d = 0; d < R; d++) {
        send_offsets[d] /= sizeof(float);
        send_bytes[d] /= sizeof(float);
        recv_offsets[d] /= sizeof(float);
        recv_bytes[d] /= sizeof(float);
    }
    rc = moe_transport_alltoallv(t, recv_keep, recv_bytes, recv_offsets, f->keep,
                       send_bytes, send_offsets);
    f->report->capacity_bytes += t->bytes_sent[t->step] - before;
    if (rc)
        goto out;
    int64_t row = 0;
    for (int64_t e = 0; e < E; e++) {
        int64_t kept = 0;
        for (int64_t j = 0; j < f->counts[e]; j++)
            kept += f->keep[row++] != 0;
        f->kept_counts[me * E + e] = kept;
    }
out:
    free(send_weights);
    free(recv_weights);
    free(list);
    free(list_keep);
    free(recv_keep);
    free(start);
    return rc;
}

/* Completes kept_counts for every (source, expert), which the probs
 * policy leaves to each expert's owner, because the direct exchange needs
 * every expert's rows per source to place rows in the owner's window. Each
 * rank contributes the columns of the experts it owns. */
static int gather_kept_counts(struct moe_dist_rank *f, int64_t E)
{
    struct moe_transport *t = f->t;
    int R = t->ranks, me = t->rank;
    int64_t experts_max = (E + R - 1) / R, per_rank = experts_max * R;
    int64_t *mine = f->kept_columns, *all = f->kept_columns + per_rank;
    memset(mine, 0, (size_t)per_rank * sizeof *mine);
    for (int64_t j = 0; j < f->experts; j++)
        for (int src = 0; src < R; src++)
            mine[j * R + src] = f->kept_counts[src * E + f->expert_first + j];
    uint64_t before = t->bytes_sent[t->step];
    int rc = moe_transport_allgather(t, mine, (uint64_t)per_rank * sizeof *mine, all);
    f->report->capacity_bytes += t->bytes_sent[t->step] - before;
    if (rc)
        return rc;
    for (int owner = 0; owner < R; owner++) {
        int64_t first, count;
        moe_block_range(E, R, owner, &first, &count);
        for (int64_t j = 0; owner != me && j < count; j++)
            for (int src = 0; src < R; src++) {
                int64_t e = first + j, kept = all[owner * per_rank + j * R + src];
                if (kept < 0 || kept > f->all_counts[src * E + e] ||
                    (src == me && kept != f->kept_counts[me * E + e]))
                    return moe_fail(-EPROTO, "rank %d: rank %d says expert %" PRId64
                                    " keeps %" PRId64 " rows of rank %d, which "
                                    "differs from the layout or the keep flags",
                                    me, owner, e, kept, src);
                f->kept_counts[src * E + e] = kept;
            }
    }
    return 0;
}

/* Decides the survivors, then writes this rank's share of the drops into
 * the run area. */
static int apply_capacity(struct moe_dist_rank *f, void *area)
{
    const struct moe_weights *w = f->input->weights;
    struct moe_run_area *a = area;
    int64_t E = w->shape.experts, K = w->shape.top_k, n = f->tokens * K;
    int R = f->t->ranks, me = f->t->rank;
    int rc = 0;
    if (w->capacity.limit >= 0 && w->capacity.policy == MOE_DROP_PROBS) {
        rc = keep_by_probs(f, E);
        if (rc == 0 && f->windows)
            rc = gather_kept_counts(f, E);
    } else
        keep_by_position(f, E, w->capacity.limit);
    if (rc)
        return rc;

    int64_t slot_of_step = f->forward < a->steps ? f->forward : a->steps - 1;
    int64_t *dropped = (int64_t *)moe_run_area_at(area, a->dropped_offset) +
                       slot_of_step * E;
    int64_t *kept_counts = moe_run_area_at(area, a->kept_counts_offset);
    for (int64_t e = f->expert_first; e < f->expert_first + f->experts; e++) {
        int64_t routed = 0, kept = 0;
        for (int src = 0; src < R; src++) {
            routed += f->all_counts[src * E + e];
            kept += f->kept_counts[src * E + e];
            kept_counts[src * E + e] = f->kept_counts[src * E + e];
        }
        dropped[e] = routed - kept;
    }
    uint8_t *kept_flags = (uint8_t *)moe_run_area_at(area, a->kept_offset) +
                          f->token_first * K;
    for (int64_t i = 0; i < n; i++)
        kept_flags[f->order[i]] = f->keep[i];
    /* Each dropped row would have gone out in dispatch and come back in
     * combine; count only rows that would have crossed to a peer. */
    uint64_t row_bytes = (uint64_t)w->shape.hidden * sizeof(float);
    int64_t row = 0;
    for (int64_t e = 0; e < E; e++)
        for (int64_t j = 0; j < f->counts[e]; j++, row++)
            if (!f->keep[row] && moe_expert_owner(E, R, e) != me)
                f->report->saved_bytes += 2 * row_bytes;
    return 0;
}

/* Moves the slots of the kept rows to the front of order[], keeping their
 * (expert, token) order. Returns their count. */
static int64_t compact_kept_order(struct moe_dist_rank *f)
{
    int64_t n = f->tokens * f->input->weights->shape.top_k, out = 0;
    for (int64_t i = 0; i < n; i++)
        if (f->keep[i])
            f->order[out++] = f->order[i];
    return out;
}

/* Packs the kept rows into the send buffer in (expert, token) order, and
 * the slot of each into order[]. Returns the row count. */
static int64_t pack_kept_rows(struct moe_dist_rank *f, const float *x)
{
    int64_t H = f->input->weights->shape.hidden, K = f->input->weights->shape.top_k;
    int64_t n = f->tokens * K, out = 0;
    for (int64_t i = 0; i < n; i++) {
        if (!f->keep[i])
            continue;
        int64_t slot = f->order[i];
        f->order[out] = slot;
        memcpy(f->send_rows + out * H, x + (slot / K) * H, (size_t)H * sizeof(float));
        out++;
    }
    return out;
}

/* Moves rows between the source-major receive buffer and the expert-major
 * expert buffer, in either direction, using the kept counts. For each
 * owned expert e and each source s, C[s][e] rows sit in the receive buffer
 * after s's rows for lower experts, and in the expert buffer after the rows
 * of lower sources for e. */
static void reorder_rows(const struct moe_dist_rank *f, int64_t E, int64_t H,
                         const uint64_t *recv_first_row, float *source_major,
                         float *expert_major, int to_expert_major)
{
    int R = f->t->ranks;
    size_t row_bytes = (size_t)H * sizeof(float);
    int64_t row = 0;
    for (int64_t e = f->expert_first; e < f->expert_first + f->experts; e++) {
        for (int src = 0; src < R; src++) {
            int64_t within = 0;
            for (int64_t lower = f->expert_first; lower < e; lower++)
                within += f->kept_counts[src * E + lower];
            int64_t count = f->kept_counts[src * E + e];
            float *by_source = source_major + ((int64_t)recv_first_row[src] + within) * H;
            float *by_expert = expert_major + row * H;
            if (to_expert_major)
                memcpy(by_expert, by_source, (size_t)count * row_bytes);
            else
                memcpy(by_source, by_expert, (size_t)count * row_bytes);
            row += count;
        }
    }
}

/* Makes sure the buffers sized by the rows received hold `rows` rows,
 * growing them when a forward receives more than any before it. */
static int reserve_received(struct moe_dist_rank *f, int64_t rows, int64_t max_rows)
{
    const struct moe_shape *s = &f->input->weights->shape;
    if (!f->windows && (rows > f->received_capacity || !f->recv_rows)) {
        free(f->recv_rows);
        free(f->expert_in);
        free(f->expert_out);
        size_t bytes = (size_t)(rows * s->hidden + 1) * sizeof(float);
        f->recv_rows = moe_alloc_large(bytes);
        f->expert_in = moe_alloc_large(bytes);
        f->expert_out = moe_alloc_large(bytes);
        f->received_capacity = rows;
        if (!f->recv_rows || !f->expert_in || !f->expert_out) {
            f->received_capacity = 0;
            return moe_fail(-ENOMEM, "rank %d: out of memory for %" PRId64
                            " received rows", f->t->rank, rows);
        }
    }
    if (max_rows > f->scratch_capacity || !f->scratch) {
        free(f->scratch);
        f->scratch = moe_alloc_large((size_t)(moe_expert_scratch_floats(max_rows, s->ffn) + 1) *
                                     sizeof(float));
        f->scratch_capacity = f->scratch ? max_rows : 0;
        if (!f->scratch)
            return moe_fail(-ENOMEM, "rank %d: out of memory for expert scratch",
                            f->t->rank);
    }
    return 0;
}

int moe_dist_rank_new(const struct moe_dist_env *env, const struct moe_dist_input *in,
                      struct moe_dist_rank **out)
{
    const struct moe_shape *s = &in->weights->shape;
    int64_t E = s->experts, K = s->top_k;
    struct moe_transport *t = env->transport;
    int R = t->ranks, me = t->rank;
    struct moe_run_area *run = env->area;

    *out = NULL;
    if (env->area_capacity < sizeof *run || run->magic != MOE_RUN_AREA_MAGIC)
        return moe_fail(-EPROTO, "rank %d: the run area is missing", me);
    struct moe_run_area_spec spec = {.dump = (int)run->dump, .steps = run->steps,
                                     .trace = run->trace_capacity > 0,
                                     .windows = run->window_rows > 0};
    if (run->ranks != R || memcmp(&run->shape, s, sizeof *s) != 0 ||
        (run->dump != 0 && run->dump != 1) || run->steps < 1 ||
        run->area_bytes != moe_run_area_bytes(s, R, &spec) ||
        run->area_bytes > env->area_capacity)
        return moe_fail(-EPROTO, "rank %d: the run area does not match this "
                        "layer's shape", me);
    moe_blas_set_threads(in->blas_threads);

    struct moe_dist_rank *f = calloc(1, sizeof *f);
    if (!f)
        return moe_fail(-ENOMEM, "rank %d: out of memory", me);
    f->t = t;
    f->area = run;
    f->input = in;
    f->slot = env->slot;
    f->report = moe_run_area_report(run, me);
    if (run->trace_capacity > 0) {
        f->trace = (struct moe_trace_event *)moe_run_area_at(run, run->trace_offset) +
                   (int64_t)me * run->trace_capacity;
        f->trace_capacity = run->trace_capacity;
        t->on_wait = record_wait;
        t->on_wait_arg = f;
    }
    moe_block_range(s->tokens, R, me, &f->token_first, &f->tokens);
    moe_block_range(E, R, me, &f->expert_first, &f->experts);
    int64_t n = f->tokens;
    /* The window positions come from a layout computed here, not from the
     * shared area, which any rank can rewrite. */
    struct moe_run_area layout;
    layout_run_area(&layout, s, R, &spec);
    int64_t experts_max = (E + R - 1) / R;
    if (layout.window_rows > 0 && moe_transport_has_notes(t)) {
        f->windows = 1;
        f->window_base = (uint8_t *)run + layout.window_offset;
        f->window_stride = layout.window_stride;
        f->window_rows = layout.window_rows;
        f->notes = calloc((size_t)(R * (experts_max + 1)), sizeof *f->notes);
        f->need = calloc((size_t)R, sizeof *f->need);
        f->expert_base = calloc((size_t)E, sizeof *f->expert_base);
        f->kept_columns = calloc((size_t)(experts_max * R * (R + 1) + 1),
                                 sizeof *f->kept_columns);
        /* For tests of the owner's check of the notes. */
        const char *corrupt = getenv("MOE_EP_CORRUPT_NOTE");
        char *end = NULL;
        long target = corrupt && *corrupt ? strtol(corrupt, &end, 10) : -1;
        f->corrupt_note = end && *end == '\0' && target == me;
    }
    const struct moe_weights *w = in->weights;
    if (f->experts > 0 && (w->expert_first > f->expert_first ||
                           w->expert_first + w->expert_count < f->expert_first + f->experts)) {
        moe_dist_rank_free(f);
        return moe_fail(-EINVAL, "rank %d: the weights hold experts from %lld, %lld of "
                        "them, but this rank owns %lld from %lld", me,
                        (long long)w->expert_first, (long long)w->expert_count,
                        (long long)f->experts, (long long)f->expert_first);
    }

    f->logits = malloc((size_t)(n * E + 1) * sizeof(float));
    f->probs = malloc((size_t)(n * E + 1) * sizeof(float));
    f->ids = malloc((size_t)(n * K + 1) * sizeof(int32_t));
    f->weights = malloc((size_t)(n * K + 1) * sizeof(float));
    f->counts = calloc((size_t)E, sizeof(int64_t));
    f->all_counts = calloc((size_t)(R * E), sizeof(int64_t));
    f->kept_counts = calloc((size_t)(R * E), sizeof(int64_t));
    f->stats = calloc((size_t)moe_router_stats_len(E), sizeof(int64_t));
    f->order = malloc((size_t)(n * K + 1) * sizeof(int64_t));
    f->keep = malloc((size_t)(n * K + 1));
    if (!f->windows)
        f->send_rows = moe_alloc_large((size_t)(n * K * s->hidden + 1) * sizeof(float));
    f->slot_rows = malloc((size_t)(n * K + 1) * sizeof(*f->slot_rows));
    f->table = calloc(5 * (size_t)R, sizeof(uint64_t));
    int failed = !f->logits || !f->probs || !f->ids || !f->weights || !f->counts ||
                 !f->all_counts || !f->kept_counts || !f->stats || !f->order ||
                 !f->keep || !f->slot_rows || !f->table ||
                 (!f->windows && !f->send_rows) ||
                 (f->windows && (!f->notes || !f->need || !f->expert_base ||
                                 !f->kept_columns));
    if (run->steps > 1 && in->draw_tokens) {
        f->step_tokens = moe_alloc_large((size_t)(n * s->hidden + 1) * sizeof(float));
        failed = failed || !f->step_tokens;
    }
    if (in->weights->score_bias || in->bias_update_rate > 0.0f) {
        f->bias = calloc((size_t)E, sizeof(float));
        failed = failed || !f->bias;
        if (f->bias && in->weights->score_bias)
            memcpy(f->bias, in->weights->score_bias, (size_t)E * sizeof(float));
    }
    if (s->shared_ffn > 0) {
        f->shared_scratch = moe_alloc_large(
            (size_t)moe_shared_scratch_floats(s->hidden, s->shared_ffn) * sizeof(float));
        f->shared_out = moe_alloc_large((size_t)(n * s->hidden + 1) * sizeof(float));
        failed = failed || !f->shared_scratch || !f->shared_out;
    }
    if (failed) {
        moe_dist_rank_free(f);
        return moe_fail(-ENOMEM, "rank %d: out of memory for %" PRId64 " tokens",
                        me, n);
    }
    *out = f;
    return 0;
}

void moe_dist_rank_free(struct moe_dist_rank *f)
{
    if (!f)
        return;
    if (f->t->on_wait_arg == f) {
        f->t->on_wait = NULL;
        f->t->on_wait_arg = NULL;
    }
    free(f->step_tokens);
    free(f->bias);
    free(f->logits);
    free(f->probs);
    free(f->ids);
    free(f->weights);
    free(f->counts);
    free(f->all_counts);
    free(f->kept_counts);
    free(f->stats);
    free(f->order);
    free(f->keep);
    free(f->send_rows);
    free(f->recv_rows);
    free(f->expert_in);
    free(f->expert_out);
    free(f->scratch);
    free(f->shared_scratch);
    free(f->shared_out);
    free(f->slot_rows);
    free(f->table);
    free(f->notes);
    free(f->need);
    free(f->expert_base);
    free(f->kept_columns);
    free(f);
}

/* Copies this rank's routing results into the dump stages of the run
 * area. */
static void dump_route(const struct moe_dist_rank *f, void *area)
{
    const struct moe_run_area *a = area;
    const struct moe_shape *s = &a->shape;
    int64_t n = f->tokens, first = f->token_first, E = s->experts, K = s->top_k;
    memcpy((float *)moe_run_area_at(area, a->logits_offset) + first * E, f->logits,
           (size_t)(n * E) * sizeof(float));
    memcpy((float *)moe_run_area_at(area, a->scores_offset) + first * E, f->probs,
           (size_t)(n * E) * sizeof(float));
    memcpy((int32_t *)moe_run_area_at(area, a->ids_offset) + first * K, f->ids,
           (size_t)(n * K) * sizeof(int32_t));
    memcpy((float *)moe_run_area_at(area, a->weights_offset) + first * K, f->weights,
           (size_t)(n * K) * sizeof(float));
}

/* Copies the rows this rank received, in receive order, into the dump.
 * This rank's rows start after the rows routed to the lower ranks'
 * experts, which the layout gives every rank. */
static void dump_received(const struct moe_dist_rank *f, void *area,
                          int64_t received_rows)
{
    const struct moe_run_area *a = area;
    int64_t E = a->shape.experts, H = a->shape.hidden, before = 0;
    int64_t first, count;
    moe_block_range(E, f->t->ranks, f->t->rank, &first, &count);
    for (int src = 0; src < f->t->ranks; src++)
        for (int64_t e = 0; e < first; e++)
            before += f->all_counts[src * E + e];
    memcpy((float *)moe_run_area_at(area, a->recv_x_offset) + before * H, f->recv_rows,
           (size_t)(received_rows * H) * sizeof(float));
}

/* Copies the expert outputs that came home, by (token, slot), zero for a
 * dropped slot, and the shared expert rows into the dump. */
static void dump_combine(const struct moe_dist_rank *f, void *area, int64_t kept_rows)
{
    const struct moe_run_area *a = area;
    int64_t H = a->shape.hidden, K = a->shape.top_k, n = f->tokens;
    float *expert_out = (float *)moe_run_area_at(area, a->expert_out_offset) +
                        f->token_first * K * H;
    memset(expert_out, 0, (size_t)(n * K * H) * sizeof(float));
    for (int64_t i = 0; i < kept_rows; i++)
        memcpy(expert_out + f->order[i] * H, f->slot_rows[f->order[i]],
               (size_t)H * sizeof(float));
    if (f->shared_out)
        memcpy((float *)moe_run_area_at(area, a->shared_out_offset) + f->token_first * H,
               f->shared_out, (size_t)(n * H) * sizeof(float));
}

/* The end of the combine: each token's weighted sum of the rows in
 * slot_rows, plus the shared expert's row, into the run area's output. */
static void sum_slots(struct moe_dist_rank *f, int64_t kept_rows)
{
    const struct moe_shape *s = &f->input->weights->shape;
    int64_t H = s->hidden, n = f->tokens;
    struct moe_run_area *run = f->area;
    float *out = moe_run_area_output(f->area) + f->token_first * H;
    moe_combine(n, H, s->top_k, f->weights, f->slot_rows, out);
    if (f->shared_out)
        moe_add_shared(out, f->shared_out, n, H);
    if (run->dump)
        dump_combine(f, f->area, kept_rows);
}

/* Dispatch, compute and combine through the rings: the rows travel in
 * ring records, twice, and are reordered between source-major and
 * expert-major on the owner. */
static int exchange_rings(struct moe_dist_rank *f, const float *x)
{
    struct moe_transport *t = f->t;
    const struct moe_dist_input *in = f->input;
    const struct moe_shape *s = &in->weights->shape;
    int64_t H = s->hidden, E = s->experts, K = s->top_k, n = f->tokens;
    int R = t->ranks, me = t->rank;
    uint64_t row_bytes = (uint64_t)H * sizeof(float);
    void *area = f->area;
    struct moe_run_area *run = area;
    uint64_t *send_bytes = f->table, *send_offsets = f->table + R,
             *recv_bytes = f->table + 2 * R, *recv_offsets = f->table + 3 * R,
             *recv_first_row = f->table + 4 * R;
    int rc;

    /* Dispatch: the send block for rank d covers the experts d owns. */
    begin_step(f, MOE_STEP_DISPATCH);
    int64_t kept_rows = pack_kept_rows(f, x);
    int64_t sent_rows = 0, received_rows = 0, max_rows = 0;
    for (int d = 0; d < R; d++) {
        int64_t first, count, rows = 0;
        moe_block_range(E, R, d, &first, &count);
        for (int64_t e = first; e < first + count; e++)
            rows += f->kept_counts[me * E + e];
        send_offsets[d] = (uint64_t)sent_rows * row_bytes;
        send_bytes[d] = (uint64_t)rows * row_bytes;
        sent_rows += rows;

        int64_t incoming = rows_from(f, E, d);
        recv_first_row[d] = (uint64_t)received_rows;
        recv_offsets[d] = (uint64_t)received_rows * row_bytes;
        recv_bytes[d] = (uint64_t)incoming * row_bytes;
        received_rows += incoming;
    }
    for (int64_t e = f->expert_first; e < f->expert_first + f->experts; e++)
        if (rows_of_expert(f, E, e) > max_rows)
            max_rows = rows_of_expert(f, E, e);
    f->report->received_rows = received_rows;
    rc = reserve_received(f, received_rows, max_rows);
    if (rc == 0)
        rc = moe_transport_alltoallv(t, f->send_rows, send_bytes, send_offsets, f->recv_rows,
                           recv_bytes, recv_offsets);
    if (rc == 0 && run->dump)
        dump_received(f, area, received_rows);
    if (rc == 0) /* source-major to expert-major, token-ordered rows */
        reorder_rows(f, E, H, recv_first_row, f->recv_rows, f->expert_in, 1);
    end_step(f, MOE_STEP_DISPATCH);
    if (rc)
        return rc;

    /* Compute: one call per owned expert over all of its kept rows. */
    begin_step(f, MOE_STEP_COMPUTE);
    int64_t expert_row = 0;
    for (int64_t e = f->expert_first; e < f->expert_first + f->experts; e++) {
        int64_t rows = rows_of_expert(f, E, e);
        moe_expert_run(in->weights, e, f->expert_in + expert_row * H, rows,
                       f->scratch, f->expert_out + expert_row * H);
        expert_row += rows;
    }
    moe_shared_expert_forward(in->weights, x, f->token_first, n, f->shared_scratch,
                              f->shared_out);
    end_step(f, MOE_STEP_COMPUTE);

    /* Combine: put the outputs back in source-major order, send them home
     * with the dispatch counts reversed, and sum per token. */
    begin_step(f, MOE_STEP_COMBINE);
    reorder_rows(f, E, H, recv_first_row, f->recv_rows, f->expert_out, 0);
    rc = moe_transport_alltoallv(t, f->recv_rows, recv_bytes, recv_offsets, f->send_rows,
                       send_bytes, send_offsets);
    if (rc == 0) {
        for (int64_t i = 0; i < n * K; i++)
            f->slot_rows[i] = NULL; /* a dropped slot adds nothing */
        for (int64_t i = 0; i < kept_rows; i++)
            f->slot_rows[f->order[i]] = f->send_rows + i * H;
        sum_slots(f, kept_rows);
    }
    end_step(f, MOE_STEP_COMBINE);
    return rc;
}

/* The input (which 0) or output (which 1) window of `rank`, as mapped in
 * this process. */
static float *window_of(const struct moe_dist_rank *f, int rank, int which)
{
    return (float *)(f->window_base + (2 * (uint64_t)rank + (uint64_t)which) *
                                          f->window_stride);
}

/* Rows that ranks below `src` keep for expert e: where src's rows start
 * among e's rows. */
static int64_t rows_before_source(const struct moe_dist_rank *f, int64_t E, int64_t e,
                                  int src)
{
    int64_t rows = 0;
    for (int s = 0; s < src; s++)
        rows += f->kept_counts[s * E + e];
    return rows;
}

/* Sets expert_base[e], the first row of expert e in its owner's windows:
 * the rows of the owner's lower experts come first. */
static void set_expert_base(struct moe_dist_rank *f, int64_t E)
{
    int R = f->t->ranks;
    for (int owner = 0; owner < R; owner++) {
        int64_t first, count, row = 0;
        moe_block_range(E, R, owner, &first, &count);
        for (int64_t e = first; e < first + count; e++) {
            f->expert_base[e] = row;
            row += rows_of_expert(f, E, e);
        }
    }
}

/* Dispatch of the direct exchange: writes each kept row straight into the
 * input window of its expert's owner, at the row the owner's golden order
 * gives it, and sends the owner a note with the row count after each
 * expert. It goes round the owners once per expert index: the first
 * expert of every owner, then the second, and so on, starting with the next
 * rank up and ending with itself. So every owner gets the rows of its first
 * expert from all sources early, and can start computing while the rest is
 * written. */
static int push_rows(struct moe_dist_rank *f, const float *x)
{
    struct moe_transport *t = f->t;
    const struct moe_shape *s = &f->input->weights->shape;
    int64_t H = s->hidden, E = s->experts, K = s->top_k;
    int R = t->ranks, me = t->rank;
    size_t row_bytes = (size_t)H * sizeof(float);

    /* first_row[e]: this rank's first kept row of expert e in order[]. The
     * scratch of the kept-count gather is free again and has room for E. */
    int64_t *first_row = f->kept_columns;
    int64_t row = 0;
    for (int64_t e = 0; e < E; e++) {
        first_row[e] = row;
        row += f->kept_counts[me * E + e];
    }
    int64_t experts_max = (E + R - 1) / R;
    for (int64_t j = 0; j < experts_max; j++)
        for (int i = 1; i <= R; i++) {
            int d = (me + i) % R;
            int64_t first, count;
            moe_block_range(E, R, d, &first, &count);
            if (j >= count)
                continue;
            int64_t e = first + j, rows = f->kept_counts[me * E + e];
            float *dst = window_of(f, d, 0) +
                         (f->expert_base[e] + rows_before_source(f, E, e, me)) * H;
            const int64_t *slots = f->order + first_row[e];
            for (int64_t k = 0; k < rows; k++)
                memcpy(dst + k * H, x + (slots[k] / K) * H, row_bytes);
            if (d == me)
                continue;
            t->bytes_sent[t->step] += (uint64_t)rows * row_bytes;
            int rc = moe_transport_notes_send(t, d, (uint64_t)rows + (uint64_t)f->corrupt_note);
            f->corrupt_note = 0;
            if (rc)
                return rc;
        }
    return 0;
}

/* Compute of the direct exchange: each owned expert runs as soon as every
 * source's note for it has come, while later experts' rows may still be
 * on their way. The expert's rows are the same matrix, in the same order,
 * as the golden path's. The outputs go to this rank's output window. */
static int compute_when_ready(struct moe_dist_rank *f)
{
    struct moe_transport *t = f->t;
    const struct moe_dist_input *in = f->input;
    int64_t H = in->weights->shape.hidden, E = in->weights->shape.experts;
    int R = t->ranks, me = t->rank;
    float *input = window_of(f, me, 0), *output = window_of(f, me, 1);
    for (int64_t j = 0; j < f->experts; j++) {
        int64_t e = f->expert_first + j;
        for (int src = 0; src < R; src++)
            f->need[src] = in->wait_all_rows ? (uint64_t)f->experts : (uint64_t)j + 1;
        int rc = moe_transport_notes_wait(t, f->need);
        if (rc)
            return rc;
        for (int src = 0; src < R; src++) {
            uint64_t told = f->notes[(uint64_t)src * (uint64_t)f->experts + (uint64_t)j];
            if (src != me && told != (uint64_t)f->kept_counts[src * E + e])
                return moe_fail(-EPROTO, "rank %d: rank %d wrote %" PRIu64 " row%s "
                                "for expert %" PRId64 ", but the layout says %" PRId64,
                                me, src, told, told == 1 ? "" : "s", e,
                                f->kept_counts[src * E + e]);
        }
        int64_t rows = rows_of_expert(f, E, e), start = moe_now_ns();
        moe_expert_run(in->weights, e, input + f->expert_base[e] * H, rows, f->scratch,
                       output + f->expert_base[e] * H);
        struct moe_trace_event *span = trace_add(f, MOE_TRACE_EXPERT, MOE_STEP_COMPUTE,
                                                 start, moe_now_ns(), (uint64_t)rows);
        if (span)
            span->expert = e;
    }
    return 0;
}

/* Dispatch, compute and combine with the direct exchange: every row is
 * copied once, by its sender, into the owner's input window, and the
 * combine reads the outputs where the owner wrote them. The rings carry
 * the notes. A window is written again only in the next forward, after
 * its layout exchange, which no rank enters before it is done with the
 * windows of this one. */
static int exchange_direct(struct moe_dist_rank *f, const float *x)
{
    struct moe_transport *t = f->t;
    const struct moe_dist_input *in = f->input;
    const struct moe_shape *s = &in->weights->shape;
    int64_t H = s->hidden, E = s->experts, K = s->top_k, n = f->tokens;
    int R = t->ranks, me = t->rank;
    uint64_t row_bytes = (uint64_t)H * sizeof(float);
    void *area = f->area;
    struct moe_run_area *run = area;
    uint64_t *recv_first_row = f->table + 4 * R;

    begin_step(f, MOE_STEP_DISPATCH);
    int64_t kept_rows = compact_kept_order(f);
    int64_t received_rows = 0, max_rows = 0;
    set_expert_base(f, E);
    for (int src = 0; src < R; src++) {
        recv_first_row[src] = (uint64_t)received_rows;
        received_rows += rows_from(f, E, src);
    }
    for (int64_t e = f->expert_first; e < f->expert_first + f->experts; e++)
        if (rows_of_expert(f, E, e) > max_rows)
            max_rows = rows_of_expert(f, E, e);
    f->report->received_rows = received_rows;
    int rc = reserve_received(f, received_rows, max_rows);
    if (rc == 0)
        rc = moe_transport_notes_begin(t, f->notes, (uint64_t)f->experts);
    if (rc == 0)
        rc = push_rows(f, x);
    end_step(f, MOE_STEP_DISPATCH);
    if (rc)
        return rc;

    begin_step(f, MOE_STEP_COMPUTE);
    rc = compute_when_ready(f);
    if (rc == 0)
        moe_shared_expert_forward(in->weights, x, f->token_first, n, f->shared_scratch,
                                  f->shared_out);
    end_step(f, MOE_STEP_COMPUTE);
    if (rc)
        return rc;
    if (run->dump) {
        /* The rows received, source-major as the rings would deliver them. */
        const struct moe_run_area *a = area;
        int64_t before = 0;
        for (int src = 0; src < R; src++)
            for (int64_t e = 0; e < f->expert_first; e++)
                before += f->all_counts[src * E + e];
        float *dump = (float *)moe_run_area_at(area, a->recv_x_offset) + before * H;
        reorder_rows(f, E, H, recv_first_row, dump, window_of(f, me, 0), 0);
    }

    /* Combine: send each source a note that its rows are done, wait for
     * the note of every owner, and sum each token's rows from the owners'
     * output windows. */
    begin_step(f, MOE_STEP_COMBINE);
    rc = moe_transport_notes_begin(t, f->notes, 1);
    for (int i = 1; rc == 0 && i < R; i++) {
        int d = (me + i) % R;
        t->bytes_sent[t->step] += (uint64_t)rows_from(f, E, d) * row_bytes;
        rc = moe_transport_notes_send(t, d, (uint64_t)rows_from(f, E, d));
    }
    for (int src = 0; src < R; src++)
        f->need[src] = 1;
    if (rc == 0)
        rc = moe_transport_notes_wait(t, f->need);
    for (int owner = 0; rc == 0 && owner < R; owner++) {
        int64_t first, count, rows = 0;
        moe_block_range(E, R, owner, &first, &count);
        for (int64_t e = first; e < first + count; e++)
            rows += f->kept_counts[me * E + e];
        if (owner != me && f->notes[owner] != (uint64_t)rows)
            rc = moe_fail(-EPROTO, "rank %d: rank %d computed %" PRIu64 " row%s for "
                          "this rank, but the layout says %" PRId64, me, owner,
                          f->notes[owner], f->notes[owner] == 1 ? "" : "s", rows);
    }
    if (rc == 0) {
        for (int64_t i = 0; i < n * K; i++)
            f->slot_rows[i] = NULL; /* a dropped slot adds nothing */
        int64_t i = 0;
        for (int64_t e = 0; e < E; e++) {
            const float *rows = window_of(f, moe_expert_owner(E, R, e), 1) +
                                (f->expert_base[e] + rows_before_source(f, E, e, me)) * H;
            for (int64_t j = 0; j < f->kept_counts[me * E + e]; j++, i++)
                f->slot_rows[f->order[i]] = rows + j * H;
        }
        sum_slots(f, kept_rows);
    }
    end_step(f, MOE_STEP_COMBINE);
    return rc;
}

int moe_dist_forward(struct moe_dist_rank *f)
{
    struct moe_transport *t = f->t;
    const struct moe_dist_input *in = f->input;
    const struct moe_shape *s = &in->weights->shape;
    int64_t E = s->experts, K = s->top_k;
    int me = t->rank;
    void *area = f->area;
    struct moe_run_area *run = area;
    int64_t stats_len = moe_router_stats_len(E);
    int rc;

    /* Route. */
    begin_step(f, MOE_STEP_ROUTE);
    const float *x = forward_tokens(f);
    rc = route(f, x);
    end_step(f, MOE_STEP_ROUTE);
    if (rc)
        return rc;
    if (run->dump)
        dump_route(f, area);

    /* Layout exchange, the router stats, and the capacity decision. */
    begin_step(f, MOE_STEP_LAYOUT);
    rc = moe_transport_allgather(t, f->counts, (uint64_t)E * sizeof(int64_t), f->all_counts);
    if (rc == 0)
        rc = validate_layout(f, s);
    if (rc == 0)
        rc = moe_transport_allreduce_i64(t, f->stats, stats_len);
    if (rc == 0)
        rc = apply_capacity(f, area);
    end_step(f, MOE_STEP_LAYOUT);
    if (rc)
        return rc;
    int64_t slot_of_step = f->forward < run->steps ? f->forward : run->steps - 1;
    if (me == 0)
        memcpy((int64_t *)moe_run_area_at(area, run->stats_offset) + slot_of_step * stats_len,
               f->stats, (size_t)stats_len * sizeof(int64_t));
    memcpy(moe_run_area_counts(area) + me * E, f->counts, (size_t)E * sizeof(int64_t));

    rc = f->windows ? exchange_direct(f, x) : exchange_rings(f, x);
    f->report->allreduce_bytes = t->allreduce_bytes;
    if (rc == 0 && f->bias && in->bias_update_rate > 0.0f)
        moe_selection_bias_update(f->bias, f->stats, E, K, in->bias_update_rate);
    f->forward++;
    return rc;
}

int moe_dist_run(const struct moe_dist_env *env, const struct moe_dist_input *input)
{
    struct moe_dist_rank *rank;
    int rc = moe_dist_rank_new(env, input, &rank);
    if (rc)
        return rc;
    const struct moe_run_area *run = env->area;
    for (int64_t i = 0; i < run->steps && rc == 0; i++)
        rc = moe_dist_forward(rank);
    moe_dist_rank_free(rank);
    return rc;
}

int moe_dist_rank_main(struct moe_comm *comm, void *arg)
{
    struct moe_transport t;
    int rc = moe_transport_shm_open(&t, comm);
    if (rc)
        return rc;
    struct moe_dist_env env = {
        .transport = &t,
        .area = comm->app,
        .area_capacity = comm->app_bytes,
        .slot = moe_segment_slot(comm->segment, comm->rank),
    };
    rc = moe_dist_run(&env, arg);
    moe_transport_close(&t);
    return rc;
}
