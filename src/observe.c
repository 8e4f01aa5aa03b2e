/*
 * observe.c - the --stats and --trace files of `moe-ep run`, built with
 * cJSON.
 *
 * Both are written after the golden check from the copies the launcher
 * took of the run area, so nothing here touches shared memory. The trace
 * follows the Chrome trace-event format: "X" events are spans with a
 * start ("ts") and a duration ("dur") in microseconds, "C" events are
 * counters, and "M" events name the process and the tracks. Each rank is
 * one track (a "tid") of one process, so Perfetto and chrome://tracing
 * draw the ranks one under another on one time axis.
 */
#include "moe_aux.h"
#include "moe_error.h"
#include "moe_file.h"
#include "moe_run.h"

#include <cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const int report_steps[] = {MOE_STEP_ROUTE, MOE_STEP_LAYOUT, MOE_STEP_DISPATCH,
                                   MOE_STEP_COMPUTE, MOE_STEP_COMBINE};
#define REPORT_STEPS ((int)(sizeof report_steps / sizeof report_steps[0]))

/* cJSON writes NaN and infinities as null; losses can be NaN with NaN
 * inputs, and null keeps the file valid JSON. */
static cJSON *number(double v)
{
    return isfinite(v) ? cJSON_CreateNumber(v) : cJSON_CreateNull();
}

static cJSON *int_array(const int64_t *values, int64_t count)
{
    cJSON *a = cJSON_CreateArray();
    for (int64_t i = 0; a && i < count; i++)
        cJSON_AddItemToArray(a, cJSON_CreateNumber((double)values[i]));
    return a;
}

/* Writes `text` and a newline to `path` with moe_write_file(), so that a
 * failure leaves the old file, and a FIFO without a reader fails instead
 * of blocking. */
static int write_text(const char *flag, const char *path, const char *text)
{
    if (!text)
        return moe_fail(-ENOMEM, "out of memory for the %s file", flag);
    struct moe_file_part parts[2] = {{text, strlen(text)}, {"\n", 1}};
    int rc = moe_write_file(path, parts, 2);
    if (rc)
        return moe_fail(rc, "writing the %s file failed: %s", flag, moe_error_message());
    return 0;
}

/* The whole batch's tokens per expert of forward `step`, before drops. */
static const int64_t *routed_of_step(const struct moe_run_result *r, int64_t step)
{
    return r->stats + step * r->stats_len + 1;
}

double moe_run_imbalance(const int64_t *values, int64_t count)
{
    int64_t max = 0, sum = 0;
    for (int64_t i = 0; i < count; i++) {
        sum += values[i];
        if (values[i] > max)
            max = values[i];
    }
    return sum == 0 ? 0.0 : (double)max * (double)count / (double)sum;
}

void moe_run_aux_losses(const struct moe_run_result *r, int64_t step,
                        struct moe_aux_losses *losses)
{
    const struct moe_shape *s = &r->options.shape;
    moe_aux_losses_compute(r->stats + step * r->stats_len, s->experts, s->top_k,
                           r->aux_loss_coef, r->z_loss_coef, losses);
}

static cJSON *losses_json(const struct moe_aux_losses *l)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddItemToObject(o, "load_balance", number(l->load_balance));
    cJSON_AddItemToObject(o, "z_loss", number(l->z_loss));
    cJSON_AddItemToObject(o, "router_aux_loss_coef", number(l->aux_loss_coef));
    cJSON_AddItemToObject(o, "router_z_loss_coef", number(l->z_loss_coef));
    cJSON_AddItemToObject(o, "load_balance_scaled", number(l->load_balance_scaled));
    cJSON_AddItemToObject(o, "z_loss_scaled", number(l->z_loss_scaled));
    return o;
}

int moe_run_write_stats(const char *path, const struct moe_run_result *r)
{
    const struct moe_run_options *o = &r->options;
    const struct moe_shape *s = &o->shape;
    int R = o->ranks;
    int64_t E = s->experts, last = o->steps - 1;
    uint64_t row_bytes = (uint64_t)s->hidden * sizeof(float);
    cJSON *root = cJSON_CreateObject();

    cJSON *config = cJSON_AddObjectToObject(root, "config");
    cJSON_AddNumberToObject(config, "ranks", R);
    cJSON_AddNumberToObject(config, "tokens", (double)s->tokens);
    cJSON_AddNumberToObject(config, "hidden", (double)s->hidden);
    cJSON_AddNumberToObject(config, "ffn", (double)s->ffn);
    cJSON_AddNumberToObject(config, "experts", (double)E);
    cJSON_AddNumberToObject(config, "top_k", (double)s->top_k);
    cJSON_AddNumberToObject(config, "shared_ffn", (double)s->shared_ffn);
    cJSON_AddStringToObject(config, "family", r->family ? r->family : "random");
    cJSON_AddNumberToObject(config, "seed", (double)o->seed);
    cJSON_AddNumberToObject(config, "steps", (double)o->steps);
    cJSON_AddNumberToObject(config, "skew", o->skew);
    cJSON_AddNumberToObject(config, "bias_update_rate", o->bias_update_rate);
    cJSON_AddStringToObject(config, "transport",
                            o->transport == MOE_TRANSPORT_MPI ? "mpi" : "shm");
    if (r->capacity.limit >= 0) {
        cJSON_AddNumberToObject(config, "capacity", (double)r->capacity.limit);
        cJSON_AddStringToObject(config, "drop_policy",
                                r->capacity.policy == MOE_DROP_PROBS ? "probs" : "position");
    } else {
        cJSON_AddNullToObject(config, "capacity");
    }

    /* Tokens per expert in the last forward, routed and dropped. */
    cJSON *experts = cJSON_AddArrayToObject(root, "experts");
    for (int64_t e = 0; e < E; e++) {
        cJSON *x = cJSON_CreateObject();
        cJSON_AddNumberToObject(x, "expert", (double)e);
        cJSON_AddNumberToObject(x, "rank", moe_expert_owner(E, R, e));
        cJSON_AddNumberToObject(x, "routed", (double)routed_of_step(r, last)[e]);
        cJSON_AddNumberToObject(x, "dropped", (double)r->dropped[last * E + e]);
        cJSON_AddItemToArray(experts, x);
    }
    cJSON_AddNumberToObject(root, "imbalance",
                            moe_run_imbalance(routed_of_step(r, last), E));

    /* The traffic matrix of the last forward, in rows and in bytes. */
    cJSON *traffic = cJSON_AddObjectToObject(root, "traffic");
    cJSON *rows = cJSON_AddArrayToObject(traffic, "rows");
    cJSON *bytes = cJSON_AddArrayToObject(traffic, "bytes");
    for (int i = 0; i < R; i++) {
        int64_t row[MOE_MAX_RANKS] = {0}, row_b[MOE_MAX_RANKS] = {0};
        for (int j = 0; j < R; j++) {
            int64_t first, count;
            moe_block_range(E, R, j, &first, &count);
            for (int64_t e = first; e < first + count; e++)
                row[j] += r->kept_counts[i * E + e];
            row_b[j] = row[j] * (int64_t)row_bytes;
        }
        cJSON_AddItemToArray(rows, int_array(row, R));
        cJSON_AddItemToArray(bytes, int_array(row_b, R));
    }

    /* Per rank: each step's time and the part spent waiting on peers. */
    cJSON *ranks = cJSON_AddArrayToObject(root, "ranks");
    for (int rank = 0; rank < R; rank++) {
        const struct moe_rank_report *rep = &r->report[rank];
        cJSON *x = cJSON_CreateObject();
        cJSON_AddNumberToObject(x, "rank", rank);
        cJSON *steps = cJSON_AddObjectToObject(x, "steps");
        uint64_t wait_total = 0;
        for (int i = 0; i < REPORT_STEPS; i++) {
            int st = report_steps[i];
            cJSON *step = cJSON_AddObjectToObject(steps, moe_step_name(st));
            cJSON_AddNumberToObject(step, "time_ms", (double)r->step_ns[rank][st] / 1e6);
            cJSON_AddNumberToObject(step, "wait_ms", (double)r->wait_ns[rank][st] / 1e6);
            cJSON_AddNumberToObject(step, "bytes_sent", (double)rep->bytes_sent[st]);
            wait_total += r->wait_ns[rank][st];
        }
        cJSON_AddNumberToObject(x, "wait_ms", (double)wait_total / 1e6);
        cJSON_AddNumberToObject(x, "received_rows", (double)rep->received_rows);
        cJSON_AddNumberToObject(x, "allreduce_bytes", (double)rep->allreduce_bytes);
        cJSON_AddNumberToObject(x, "capacity_exchange_bytes", (double)rep->capacity_bytes);
        cJSON_AddNumberToObject(x, "bytes_saved_by_dropping", (double)rep->saved_bytes);
        cJSON_AddNumberToObject(x, "trace_spans_dropped", (double)rep->trace_dropped);
        cJSON_AddItemToArray(ranks, x);
    }

    /* Per forward: imbalance, drops and the aux losses. */
    cJSON *forwards = cJSON_AddArrayToObject(root, "forwards");
    for (int64_t step = 0; step < o->steps; step++) {
        cJSON *x = cJSON_CreateObject();
        struct moe_aux_losses l;
        int64_t dropped = 0;
        for (int64_t e = 0; e < E; e++)
            dropped += r->dropped[step * E + e];
        moe_run_aux_losses(r, step, &l);
        cJSON_AddNumberToObject(x, "step", (double)step);
        cJSON_AddNumberToObject(x, "imbalance", moe_run_imbalance(routed_of_step(r, step), E));
        cJSON_AddNumberToObject(x, "dropped", (double)dropped);
        cJSON_AddItemToObject(x, "tokens_per_expert", int_array(routed_of_step(r, step), E));
        cJSON_AddItemToObject(x, "aux_losses", losses_json(&l));
        cJSON_AddItemToArray(forwards, x);
    }
    struct moe_aux_losses l;
    moe_run_aux_losses(r, last, &l);
    cJSON_AddItemToObject(root, "aux_losses", losses_json(&l));

    cJSON *check = cJSON_AddObjectToObject(root, "golden_check");
    cJSON_AddBoolToObject(check, "ran", o->check);
    if (o->check) {
        cJSON_AddBoolToObject(check, "output_bitwise_equal", r->check.equal);
        cJSON_AddNumberToObject(check, "mismatches", (double)r->check.mismatches);
        cJSON_AddBoolToObject(check, "drops_equal", r->kept_equal);
        cJSON_AddBoolToObject(check, "routing_stats_equal", r->routing_mismatch_step < 0);
    } else { /* nothing was compared */
        cJSON_AddNullToObject(check, "output_bitwise_equal");
        cJSON_AddNullToObject(check, "mismatches");
        cJSON_AddNullToObject(check, "drops_equal");
        cJSON_AddNullToObject(check, "routing_stats_equal");
    }
    cJSON_AddNumberToObject(root, "forward_ms", (double)r->forward_ns / 1e6);
    cJSON_AddNumberToObject(root, "golden_ms", (double)r->golden_ns / 1e6);

    char *text = cJSON_Print(root);
    int rc = write_text("--stats", path, text);
    cJSON_free(text);
    cJSON_Delete(root);
    return rc;
}

/* Adds one trace event to the array. */
static void add_event(cJSON *events, const char *name, const char *cat, const char *ph,
                      int tid, double ts_us, double dur_us, cJSON *args)
{
    cJSON *e = cJSON_CreateObject();
    cJSON_AddStringToObject(e, "name", name);
    if (cat)
        cJSON_AddStringToObject(e, "cat", cat);
    cJSON_AddStringToObject(e, "ph", ph);
    cJSON_AddNumberToObject(e, "pid", 1);
    cJSON_AddNumberToObject(e, "tid", tid);
    cJSON_AddNumberToObject(e, "ts", ts_us);
    if (dur_us >= 0)
        cJSON_AddNumberToObject(e, "dur", dur_us);
    if (args)
        cJSON_AddItemToObject(e, "args", args);
    cJSON_AddItemToArray(events, e);
}

int moe_run_write_trace(const char *path, const struct moe_run_result *r)
{
    int R = r->options.ranks;
    cJSON *root = cJSON_CreateObject();
    cJSON *events = cJSON_AddArrayToObject(root, "traceEvents");
    cJSON_AddStringToObject(root, "displayTimeUnit", "ms");

    cJSON *args = cJSON_CreateObject();
    cJSON_AddStringToObject(args, "name", "moe-ep run");
    add_event(events, "process_name", NULL, "M", 0, 0, -1, args);
    for (int rank = 0; rank < R; rank++) {
        char name[32];
        snprintf(name, sizeof name, "rank %d", rank);
        args = cJSON_CreateObject();
        cJSON_AddStringToObject(args, "name", name);
        add_event(events, "thread_name", NULL, "M", rank, 0, -1, args);
        args = cJSON_CreateObject();
        cJSON_AddNumberToObject(args, "sort_index", rank);
        add_event(events, "thread_sort_index", NULL, "M", rank, 0, -1, args);
    }

    /* Times are relative to the earliest event or the launch, whichever
     * comes first, since MPI ranks can leave the starting barrier before
     * rank 0. The ranks of one machine read the same monotonic clock; NOTE:
     * MPI ranks on different machines do not, so their tracks are not
     * aligned (untested here). */
    int64_t first_ns = r->launch_start_ns;
    for (int rank = 0; rank < R && r->trace; rank++) {
        const struct moe_trace_event *t = r->trace + (int64_t)rank * r->trace_capacity;
        int64_t n = r->report[rank].trace_events;
        for (int64_t i = 0; i < n && i < r->trace_capacity; i++)
            if (t[i].start_ns < first_ns)
                first_ns = t[i].start_ns;
    }
    double origin = (double)first_ns;
    for (int rank = 0; rank < R && r->trace; rank++) {
        const struct moe_trace_event *t = r->trace + (int64_t)rank * r->trace_capacity;
        int64_t n = r->report[rank].trace_events;
        uint64_t sent = 0;
        if (n > r->trace_capacity)
            n = r->trace_capacity;
        for (int64_t i = 0; i < n; i++) {
            double ts = ((double)t[i].start_ns - origin) / 1e3;
            double dur = (double)(t[i].end_ns - t[i].start_ns) / 1e3;
            args = cJSON_CreateObject();
            cJSON_AddNumberToObject(args, "forward", (double)t[i].forward);
            if (t[i].kind == MOE_TRACE_WAIT) {
                cJSON_AddStringToObject(args, "step", moe_step_name(t[i].step));
                add_event(events, "wait", "wait", "X", rank, ts, dur, args);
                continue;
            }
            if (t[i].kind == MOE_TRACE_EXPERT) {
                char name[40];
                snprintf(name, sizeof name, "expert %lld", (long long)t[i].expert);
                cJSON_AddNumberToObject(args, "rows", (double)t[i].bytes);
                add_event(events, name, "expert", "X", rank, ts, dur, args);
                continue;
            }
            cJSON_AddNumberToObject(args, "bytes_sent", (double)t[i].bytes);
            add_event(events, moe_step_name(t[i].step), "step", "X", rank, ts, dur, args);
            if (t[i].bytes) {
                char counter[32];
                snprintf(counter, sizeof counter, "rank %d bytes sent", rank);
                sent += t[i].bytes;
                args = cJSON_CreateObject();
                cJSON_AddNumberToObject(args, "bytes", (double)sent);
                add_event(events, counter, "bytes", "C", rank,
                          ((double)t[i].end_ns - origin) / 1e3, -1, args);
            }
        }
    }
    char *text = cJSON_PrintUnformatted(root);
    int rc = write_text("--trace", path, text);
    cJSON_free(text);
    cJSON_Delete(root);
    return rc;
}
