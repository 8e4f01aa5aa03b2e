/*
 * explain_run.c - runs the tiny layer of `moe-ep explain` on two rank
 * processes and keeps everything the narration prints.
 *
 * The ranks run the library's own forward (moe_dist_run) over the shm
 * transport, as `moe-ep run` does, with the --dump stage arrays in the run
 * area. Between the forward and the transport sits a tap: a transport
 * whose calls log the collective, its step, its wait time and the ring
 * tags it used, then call the shm transport. Each rank writes its log into
 * a log area after the run area in the segment.
 *
 * After the ranks exit, the launcher copies the run area and the logs and
 * reads back every record left in the rings. A ring keeps its bytes after
 * they are consumed, and the launcher starts every ring at index 0. So
 * while a ring has carried at most its capacity, bytes [0, head) are every
 * record it carried, in the order its consumer read them. Then the
 * launcher runs the golden path on the same weights and tokens.
 */
#include "moe_explain.h"
#include "moe_aux.h"
#include "moe_dump.h"
#include "moe_error.h"
#include "moe_launch.h"
#include "moe_transport.h"

#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* Data bytes per ring: room for every record of one forward of the tiny
 * layer many times over. */
#define RING_CAPACITY (64u << 10)
/* Deadline of every wait on a peer. */
#define TIMEOUT_NS (10LL * 1000 * 1000 * 1000)

void moe_explain_shape(struct moe_shape *shape)
{
    *shape = (struct moe_shape){.tokens = 6, .hidden = 4, .ffn = 8,
                                .experts = MOE_EXPLAIN_EXPERTS, .top_k = 2};
}

/* One rank's log in the segment, written only by that rank. */
struct call_log {
    int64_t count;
    struct moe_explain_call call[MOE_EXPLAIN_MAX_CALLS];
};

/* The input of every rank, inherited through fork. */
struct rank_arg {
    struct moe_dist_input input;
    uint64_t run_area_bytes; /* the log area starts at this offset */
};

/* ---- the tap, in each rank --------------------------------------------- */

/* A transport that logs each call and passes it on to the shm transport.
 * `transport` comes first, so the ops can cast their argument back. */
struct tap {
    struct moe_transport transport;
    const struct moe_transport_ops *inner;
    struct moe_comm *comm;
    struct call_log *log;
    struct moe_explain_call *current; /* the call in progress, or NULL */
    struct moe_explain_call *notes_call; /* the last note exchange, or NULL */
};

static void tap_begin(struct tap *tap, int kind)
{
    struct call_log *log = tap->log;
    tap->current = NULL;
    if (log->count >= MOE_EXPLAIN_MAX_CALLS)
        return; /* NOTE: calls past the log's room run but are not logged */
    tap->current = &log->call[log->count++];
    *tap->current = (struct moe_explain_call){
        .first_tag = tap->comm->sequence + 1,
        .step = tap->transport.step,
        .kind = kind,
        .start_ns = moe_now_ns(),
    };
}

static void tap_end(struct tap *tap)
{
    if (!tap->current)
        return;
    tap->current->last_tag = tap->comm->sequence;
    tap->current->end_ns = moe_now_ns();
    tap->current = NULL;
}

static void tap_wait(void *arg, int step, int64_t start_ns, int64_t end_ns)
{
    (void)step;
    struct tap *tap = arg;
    if (tap->current)
        tap->current->wait_ns += end_ns - start_ns;
}

static int tap_allgather(struct moe_transport *t, const void *send, uint64_t bytes,
                         void *recv)
{
    struct tap *tap = (struct tap *)t;
    tap_begin(tap, MOE_EXPLAIN_ALLGATHER);
    int rc = tap->inner->allgather(t, send, bytes, recv);
    tap_end(tap);
    return rc;
}

static int tap_alltoallv(struct moe_transport *t, const void *send,
                         const uint64_t *send_bytes, const uint64_t *send_offsets,
                         void *recv, const uint64_t *recv_bytes,
                         const uint64_t *recv_offsets)
{
    struct tap *tap = (struct tap *)t;
    tap_begin(tap, MOE_EXPLAIN_ALLTOALLV);
    int rc = tap->inner->alltoallv(t, send, send_bytes, send_offsets, recv, recv_bytes,
                                   recv_offsets);
    tap_end(tap);
    return rc;
}

static int tap_allreduce_i64(struct moe_transport *t, int64_t *values, int64_t count)
{
    struct tap *tap = (struct tap *)t;
    tap_begin(tap, MOE_EXPLAIN_ALLREDUCE);
    int rc = tap->inner->allreduce_i64(t, values, count);
    tap_end(tap);
    return rc;
}

static int tap_barrier(struct moe_transport *t)
{
    struct tap *tap = (struct tap *)t;
    tap_begin(tap, MOE_EXPLAIN_BARRIER);
    int rc = tap->inner->barrier(t);
    tap_end(tap);
    return rc;
}

static int tap_gatherv(struct moe_transport *t, const void *send, uint64_t send_bytes,
                       void *recv, const uint64_t *recv_bytes,
                       const uint64_t *recv_offsets, int root)
{
    struct tap *tap = (struct tap *)t;
    tap_begin(tap, MOE_EXPLAIN_GATHERV);
    int rc = tap->inner->gatherv(t, send, send_bytes, recv, recv_bytes, recv_offsets,
                                 root);
    tap_end(tap);
    return rc;
}

static void tap_abort(struct moe_transport *t, int status)
{
    ((struct tap *)t)->inner->abort(t, status);
}

static void tap_close(struct moe_transport *t)
{
    ((struct tap *)t)->inner->close(t);
}

/* A note exchange is one logged call from its begin to its last send or
 * wait; the sends and waits in between add to it. */
static int tap_notes_begin(struct moe_transport *t, uint64_t *store, uint64_t per_source)
{
    struct tap *tap = (struct tap *)t;
    tap_begin(tap, MOE_EXPLAIN_NOTES);
    int rc = tap->inner->notes_begin(t, store, per_source);
    tap->notes_call = tap->current;
    tap_end(tap);
    return rc;
}

/* Makes the current note exchange the call in progress again. */
static void tap_resume(struct tap *tap)
{
    tap->current = tap->notes_call;
}

static void tap_pause(struct tap *tap)
{
    if (tap->current)
        tap->current->end_ns = moe_now_ns();
    tap->current = NULL;
}

static int tap_notes_send(struct moe_transport *t, int d, uint64_t value)
{
    struct tap *tap = (struct tap *)t;
    tap_resume(tap);
    int rc = tap->inner->notes_send(t, d, value);
    tap_pause(tap);
    return rc;
}

static int tap_notes_wait(struct moe_transport *t, const uint64_t *need)
{
    struct tap *tap = (struct tap *)t;
    tap_resume(tap);
    int rc = tap->inner->notes_wait(t, need);
    tap_pause(tap);
    return rc;
}

static const struct moe_transport_ops TAP_OPS = {
    .allgather = tap_allgather,
    .alltoallv = tap_alltoallv,
    .allreduce_i64 = tap_allreduce_i64,
    .barrier = tap_barrier,
    .gatherv = tap_gatherv,
    .abort = tap_abort,
    .close = tap_close,
    .notes_begin = tap_notes_begin,
    .notes_send = tap_notes_send,
    .notes_wait = tap_notes_wait,
};

/* Rank entry point for moe_launch: moe_dist_rank_main() with the tap
 * between the forward and the shm transport. */
static int explain_rank_main(struct moe_comm *comm, void *arg)
{
    const struct rank_arg *a = arg;
    uint64_t log_bytes = (uint64_t)comm->ranks * sizeof(struct call_log);
    if (comm->app_bytes < a->run_area_bytes + log_bytes)
        return moe_fail(-EPROTO, "rank %d: the app area of %llu bytes has no room "
                        "for the call log", comm->rank,
                        (unsigned long long)comm->app_bytes);

    struct tap tap = {.comm = comm};
    int rc = moe_transport_shm_open(&tap.transport, comm);
    if (rc)
        return rc;
    tap.inner = tap.transport.ops;
    if (!tap.inner->notes_begin || !tap.inner->notes_send || !tap.inner->notes_wait) {
        moe_transport_close(&tap.transport);
        return moe_fail(-EPROTO, "rank %d: the shm transport has no notes", comm->rank);
    }
    tap.transport.ops = &TAP_OPS;
    tap.transport.on_wait = tap_wait;
    tap.transport.on_wait_arg = &tap;
    tap.log = (struct call_log *)((uint8_t *)comm->app + a->run_area_bytes) + comm->rank;

    struct moe_dist_env env = {
        .transport = &tap.transport,
        .area = comm->app,
        .area_capacity = a->run_area_bytes,
        .slot = moe_segment_slot(comm->segment, comm->rank),
    };
    rc = moe_dist_run(&env, &a->input);
    moe_transport_close(&tap.transport);
    return rc;
}

/* ---- the launcher ------------------------------------------------------ */

/* Builds the layer: seeded weights, the skew's gate bias and the
 * capacity. */
static int build_layer(struct moe_explain_run *run)
{
    struct moe_shape shape;
    moe_explain_shape(&shape);
    int rc = moe_weights_init_random(&run->weights, &shape, run->layer.seed);
    if (rc)
        return moe_fail(rc, "out of memory for the layer's weights");
    double skew = run->layer.skew;
    if (skew > 0.0) {
        /* The gate bias of `moe-ep run --skew S` (src/run.c): expert e's
         * logit gets -S * ln(e + 1), Zipf's law with exponent S. */
        run->weights.gate_bias = malloc((size_t)shape.experts * sizeof(float));
        if (!run->weights.gate_bias)
            return moe_fail(-ENOMEM, "out of memory for the gate bias");
        for (int64_t e = 0; e < shape.experts; e++)
            run->weights.gate_bias[e] = (float)(-skew * log((double)(e + 1)));
    }
    run->weights.capacity = run->layer.capacity;
    return 0;
}

static int alloc_arrays(struct moe_explain_run *run)
{
    const struct moe_shape *s = &run->weights.shape;
    size_t T = (size_t)s->tokens, H = (size_t)s->hidden, E = (size_t)s->experts,
           K = (size_t)s->top_k, R = MOE_EXPLAIN_RANKS;
    run->output = calloc(T * H, sizeof(float));
    run->golden = calloc(T * H, sizeof(float));
    run->logits = calloc(T * E, sizeof(float));
    run->scores = calloc(T * E, sizeof(float));
    run->ids = calloc(T * K, sizeof(int32_t));
    run->topk_weights = calloc(T * K, sizeof(float));
    run->expert_out = calloc(T * K * H, sizeof(float));
    run->recv_rows = calloc(T * K * H, sizeof(float));
    run->counts = calloc(R * E, sizeof(int64_t));
    run->kept_counts = calloc(R * E, sizeof(int64_t));
    run->kept = calloc(T * K, 1);
    run->stats = calloc((size_t)moe_router_stats_len(s->experts), sizeof(int64_t));
    run->dropped = calloc(E, sizeof(int64_t));
    if (!run->output || !run->golden || !run->logits || !run->scores || !run->ids ||
        !run->topk_weights || !run->expert_out || !run->recv_rows || !run->counts ||
        !run->kept_counts || !run->kept || !run->stats || !run->dropped)
        return moe_fail(-ENOMEM, "out of memory for the explain run");
    return 0;
}

/* Copies the run area's arrays. Each rank's received rows sit after the
 * rows routed to the lower ranks' experts. Drops leave gaps there, which
 * the copy closes, so the rows are rank after rank. */
static void copy_run_area(struct moe_explain_run *run, void *area)
{
    const struct moe_run_area *a = area;
    const struct moe_shape *s = &run->weights.shape;
    int64_t T = s->tokens, H = s->hidden, E = s->experts, K = s->top_k;
    int R = MOE_EXPLAIN_RANKS;

    memcpy(run->output, moe_run_area_output(area), (size_t)(T * H) * sizeof(float));
    memcpy(run->counts, moe_run_area_counts(area), (size_t)(R * E) * sizeof(int64_t));
    memcpy(run->kept_counts, moe_run_area_at(area, a->kept_counts_offset),
           (size_t)(R * E) * sizeof(int64_t));
    memcpy(run->kept, moe_run_area_at(area, a->kept_offset), (size_t)(T * K));
    int64_t last = a->steps - 1, stats_len = moe_router_stats_len(E);
    memcpy(run->stats, (int64_t *)moe_run_area_at(area, a->stats_offset) + last * stats_len,
           (size_t)stats_len * sizeof(int64_t));
    memcpy(run->dropped, (int64_t *)moe_run_area_at(area, a->dropped_offset) + last * E,
           (size_t)E * sizeof(int64_t));
    memcpy(run->logits, moe_run_area_at(area, a->logits_offset),
           (size_t)(T * E) * sizeof(float));
    memcpy(run->scores, moe_run_area_at(area, a->scores_offset),
           (size_t)(T * E) * sizeof(float));
    memcpy(run->ids, moe_run_area_at(area, a->ids_offset), (size_t)(T * K) * sizeof(int32_t));
    memcpy(run->topk_weights, moe_run_area_at(area, a->weights_offset),
           (size_t)(T * K) * sizeof(float));
    memcpy(run->expert_out, moe_run_area_at(area, a->expert_out_offset),
           (size_t)(T * K * H) * sizeof(float));

    const float *from = moe_run_area_at(area, a->recv_x_offset);
    int64_t routed_before = 0, at = 0;
    for (int r = 0; r < R; r++) {
        run->report[r] = *moe_run_area_report(area, r);
        int64_t n = run->report[r].received_rows;
        if (n < 0 || n > T * K - at) /* only a broken rank could write this */
            n = 0;
        run->received[r] = n;
        memcpy(run->recv_rows + at * H, from + routed_before * H,
               (size_t)(n * H) * sizeof(float));
        at += n;
        int64_t first, count;
        moe_block_range(E, R, r, &first, &count);
        for (int src = 0; src < R; src++)
            for (int64_t e = first; e < first + count; e++)
                routed_before += run->counts[src * E + e];
    }
}

/* Appends one record with a copy of its payload. */
static int add_record(struct moe_explain_run *run, int src, int dst,
                      const struct moe_ring_record *record)
{
    struct moe_explain_record *grown = realloc(
        run->records, (size_t)(run->record_count + 1) * sizeof *grown);
    if (!grown)
        return moe_fail(-ENOMEM, "out of memory for the ring records");
    run->records = grown;
    uint8_t *payload = malloc((size_t)record->length + 1);
    if (!payload)
        return moe_fail(-ENOMEM, "out of memory for the ring records");
    moe_ring_copy_payload(record, payload);
    grown[run->record_count++] = (struct moe_explain_record){
        .src = src, .dst = dst, .length = record->length, .tag = record->tag,
        .payload = payload,
    };
    return 0;
}

/* Reads every record of every ring, from index 0 up to the ring's head, as
 * a second consumer that never releases, so the rings stay as the ranks
 * left them. */
static int read_rings(struct moe_explain_run *run, struct moe_segment_header *segment,
                      uint64_t app_bytes)
{
    int R = MOE_EXPLAIN_RANKS;
    struct moe_segment_header layout; /* recomputed, not read from the segment */
    int rc = moe_segment_layout(&layout, R, RING_CAPACITY, app_bytes);
    if (rc)
        return rc;
    run->ring_capacity = RING_CAPACITY;
    for (int src = 0; src < R; src++) {
        for (int dst = 0; dst < R; dst++) {
            void *memory = (uint8_t *)segment + layout.rings_offset +
                           (uint64_t)(src * R + dst) * layout.ring_stride;
            struct moe_ring_consumer replay;
            if ((rc = moe_ring_consumer_attach(&replay, memory, RING_CAPACITY)))
                return moe_fail(rc, "ring %d -> %d: %s", src, dst, moe_error_message());
            uint64_t head = atomic_load_explicit(&replay.ring->head, memory_order_acquire);
            run->ring_bytes[src][dst] = head;
            if (head > RING_CAPACITY)
                return moe_fail(-EPROTO, "ring %d -> %d carried %llu bytes, more than "
                                "its %u, so its first records were overwritten", src,
                                dst, (unsigned long long)head, RING_CAPACITY);
            replay.tail = 0;
            replay.head_cache = 0;
            for (;;) {
                struct moe_ring_record record;
                rc = moe_ring_peek(&replay, &record);
                if (rc == -EAGAIN)
                    break;
                if (rc)
                    return moe_fail(rc, "ring %d -> %d: %s", src, dst, moe_error_message());
                if ((rc = add_record(run, src, dst, &record)))
                    return rc;
                replay.tail += moe_ring_record_bytes(record.length);
            }
        }
    }
    return 0;
}

static int compare_int64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Sets the medians over the forwards of each rank's step times and waits
 * from the trace in the run area. */
static int trace_medians(struct moe_explain_run *run, void *area)
{
    const struct moe_run_area *a = area;
    int64_t forwards = a->steps;
    int64_t *per_forward = malloc((size_t)forwards * sizeof(int64_t));
    if (!per_forward)
        return moe_fail(-ENOMEM, "out of memory for the trace medians");
    for (int r = 0; r < MOE_EXPLAIN_RANKS; r++) {
        const struct moe_trace_event *events =
            (const struct moe_trace_event *)moe_run_area_at(area, a->trace_offset) +
            (int64_t)r * a->trace_capacity;
        int64_t n = run->report[r].trace_events;
        if (n < 0 || n > a->trace_capacity)
            n = 0;
        for (int step = 0; step < MOE_STEP_COUNT; step++) {
            for (int kind = MOE_TRACE_STEP; kind <= MOE_TRACE_WAIT; kind++) {
                memset(per_forward, 0, (size_t)forwards * sizeof(int64_t));
                for (int64_t i = 0; i < n; i++)
                    if (events[i].kind == kind && events[i].step == step &&
                        events[i].forward >= 0 && events[i].forward < forwards)
                        per_forward[events[i].forward] += events[i].end_ns -
                                                          events[i].start_ns;
                qsort(per_forward, (size_t)forwards, sizeof(int64_t), compare_int64);
                int64_t median = per_forward[forwards / 2];
                if (kind == MOE_TRACE_STEP)
                    run->median_step_ns[r][step] = median;
                else
                    run->median_wait_ns[r][step] = median;
            }
        }
    }
    free(per_forward);
    return 0;
}

/* Copies each rank's step times and call log out of the segment. */
static void copy_slots_and_logs(struct moe_explain_run *run, struct moe_launch *launch,
                                uint64_t run_area_bytes)
{
    const struct call_log *logs =
        (const struct call_log *)((uint8_t *)moe_segment_app(launch->segment) +
                                  run_area_bytes);
    for (int r = 0; r < MOE_EXPLAIN_RANKS; r++) {
        struct moe_rank_slot *slot = moe_segment_slot(launch->segment, r);
        memcpy(run->step_ns[r], slot->step_ns, sizeof slot->step_ns);
        memcpy(run->wait_ns[r], slot->wait_ns, sizeof slot->wait_ns);
        int64_t n = logs[r].count;
        if (n < 0 || n > MOE_EXPLAIN_MAX_CALLS)
            n = 0;
        run->call_count[r] = n;
        memcpy(run->calls[r], logs[r].call, (size_t)n * sizeof(struct moe_explain_call));
    }
}

/* Runs the golden path and checks the ranks' output, drops and stages
 * against it bit for bit. The stages use the check of `run --dump`. */
static int check_golden(struct moe_explain_run *run)
{
    const struct moe_shape *s = &run->weights.shape;
    run->golden_info.want_stages = 1;
    int rc = moe_golden_forward(&run->weights, run->tokens, run->golden, &run->golden_info);
    if (rc)
        return rc;
    moe_compare_bits(run->output, run->golden, s->tokens * s->hidden, &run->check);
    run->kept_equal = memcmp(run->kept, run->golden_info.kept,
                             (size_t)(s->tokens * s->top_k)) == 0;

    struct moe_run_result *view = calloc(1, sizeof *view);
    if (!view)
        return moe_fail(-ENOMEM, "out of memory for the stage check");
    view->options.shape = *s;
    view->options.ranks = MOE_EXPLAIN_RANKS;
    view->stage[MOE_STAGE_LOGITS] = run->logits;
    view->stage[MOE_STAGE_SCORES] = run->scores;
    view->stage[MOE_STAGE_IDS] = run->ids;
    view->stage[MOE_STAGE_WEIGHTS] = run->topk_weights;
    view->stage[MOE_STAGE_RECV_X] = run->recv_rows;
    view->stage[MOE_STAGE_EXPERT_OUT] = run->expert_out;
    moe_dump_check(view, &run->golden_info, run->tokens);
    memcpy(run->stage_check, view->stage_check, sizeof run->stage_check);
    free(view); /* the stages belong to run */
    return 0;
}

int moe_explain_run_layer(const struct moe_explain_layer *layer, const float *tokens,
                          struct moe_explain_run *run, int *stop_signal)
{
    *run = (struct moe_explain_run){.layer = *layer, .tokens = tokens};
    *stop_signal = 0;
    if (layer->forwards < 1)
        return moe_fail(-EINVAL, "invalid forward count %lld: expected at least 1",
                        (long long)layer->forwards);
    int rc = build_layer(run);
    if (rc == 0)
        rc = alloc_arrays(run);
    if (rc)
        return rc;
    moe_blas_init(); /* one thread, in the ranks and the golden path */

    const struct moe_shape *s = &run->weights.shape;
    int64_t forwards = layer->forwards;
    struct moe_run_area_spec spec = {.dump = 1, .steps = forwards, .trace = forwards > 1,
                                     .windows = layer->direct};
    struct rank_arg arg = {
        /* draw_tokens stays 0, so every forward runs on the same batch */
        .input = {.weights = &run->weights, .tokens = tokens, .seed = layer->seed,
                  .blas_threads = 1},
        .run_area_bytes = moe_run_area_bytes(s, MOE_EXPLAIN_RANKS, &spec),
    };
    uint64_t app_bytes = arg.run_area_bytes + MOE_EXPLAIN_RANKS * sizeof(struct call_log);
    struct moe_launch_config config = {
        .ranks = MOE_EXPLAIN_RANKS,
        .ring_capacity = RING_CAPACITY,
        .app_bytes = app_bytes,
        .timeout_ns = TIMEOUT_NS,
        .rank_main = explain_rank_main,
        .arg = &arg,
    };
    struct moe_launch launch = {.fd = -1};
    if ((rc = moe_launch_create(&launch, &config)))
        return rc;
    void *area = moe_segment_app(launch.segment);
    moe_run_area_init(area, s, MOE_EXPLAIN_RANKS, &spec);
    memset((uint8_t *)area + arg.run_area_bytes, 0,
           MOE_EXPLAIN_RANKS * sizeof(struct call_log));

    rc = moe_launch_run(&launch);
    if (rc) {
        *stop_signal = launch.launcher_signal;
        char why[MOE_ERROR_TEXT_BYTES + 64] = "the ranks were stopped";
        if (launch.failed_rank >= 0)
            moe_launch_describe(&launch, launch.failed_rank, why, sizeof why);
        moe_launch_destroy(&launch);
        return moe_fail(rc, "the distributed forward failed: %s", why);
    }
    copy_run_area(run, area);
    copy_slots_and_logs(run, &launch, arg.run_area_bytes);
    if (forwards > 1)
        rc = trace_medians(run, area);
    else
        rc = read_rings(run, launch.segment, app_bytes);
    moe_launch_destroy(&launch);
    if (rc)
        return rc;
    return check_golden(run);
}

void moe_explain_run_free(struct moe_explain_run *run)
{
    moe_weights_free(&run->weights);
    free(run->output);
    free(run->golden);
    free(run->logits);
    free(run->scores);
    free(run->ids);
    free(run->topk_weights);
    free(run->expert_out);
    free(run->recv_rows);
    free(run->counts);
    free(run->kept_counts);
    free(run->kept);
    free(run->stats);
    free(run->dropped);
    for (int64_t i = 0; i < run->record_count; i++)
        free(run->records[i].payload);
    free(run->records);
    moe_golden_info_free(&run->golden_info);
    *run = (struct moe_explain_run){0};
}

const char *moe_explain_call_name(int kind)
{
    switch (kind) {
    case MOE_EXPLAIN_ALLGATHER:
        return "all-gather";
    case MOE_EXPLAIN_ALLTOALLV:
        return "all-to-all";
    case MOE_EXPLAIN_ALLREDUCE:
        return "all-reduce";
    case MOE_EXPLAIN_BARRIER:
        return "barrier";
    case MOE_EXPLAIN_GATHERV:
        return "gather";
    case MOE_EXPLAIN_NOTES:
        return "notes";
    }
    return "unknown call";
}

const struct moe_explain_call *moe_explain_call_of_tag(const struct moe_explain_run *run,
                                                       int rank, uint32_t tag)
{
    for (int64_t i = 0; i < run->call_count[rank]; i++) {
        const struct moe_explain_call *c = &run->calls[rank][i];
        if (c->first_tag <= tag && tag <= c->last_tag)
            return c;
    }
    return NULL;
}

int64_t moe_explain_find_token(const struct moe_explain_run *run, const float *row)
{
    const struct moe_shape *s = &run->weights.shape;
    for (int64_t t = 0; t < s->tokens; t++)
        if (memcmp(run->tokens + t * s->hidden, row, (size_t)s->hidden * sizeof(float)) == 0)
            return t;
    return -1;
}
