/*
 * test_imbalance.c - capacity, skew, bias balancing, the stats file and the
 * trace, end to end through the moe-ep program.
 */
#include "moe_layer.h"
#include "moe_npy.h"
#include "test_program.h"

#include <cJSON.h>
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* A small layer that runs in a few milliseconds per rank count. */
#define SMALL "--tokens", "100", "--hidden", "64", "--ffn", "96"

static void temp_path(char *buf, size_t size, const char *name)
{
    snprintf(buf, size, "/tmp/moe-ep-imbalance-%ld-%s", (long)getpid(), name);
}

/* Dropping keeps the output bitwise equal to the golden path on every
 * rank count, under both policies and with every exchange, and the output
 * file is the same bytes for every rank count and exchange. */
Test(imbalance, drops_are_bitwise_for_any_rank_count, .timeout = 180)
{
    const char *policies[] = {"position", "probs"};
    /* The rings, the direct exchange, and the direct exchange without the
     * overlap of compute with the arrival of rows. */
    const char *exchanges[][2] = {{"rings", "on"}, {"direct", "on"}, {"direct", "off"}};
    for (int p = 0; p < 2; p++) {
        char *first = NULL;
        for (int x = 0; x < 3; x++)
            for (int R = 1; R <= 8; R++) {
                char ranks[16], out[128];
                snprintf(ranks, sizeof ranks, "%d", R);
                temp_path(out, sizeof out, "drops.npy");
                struct outcome o;
                run_program(&o, NULL, 0, 0,
                            (const char *[]){"run", SMALL, "--ranks", ranks, "--skew", "1",
                                             "--capacity-factor", "0.8", "--drop-policy",
                                             policies[p], "--exchange", exchanges[x][0],
                                             "--overlap", exchanges[x][1], "--output", out,
                                             NULL});
                cr_assert_eq(o.status, 0, "%s %s R=%d: %s%s", policies[p], exchanges[x][0],
                             R, o.out, o.err);
                cr_assert_not_null(strstr(o.out, "golden check: bitwise equal"));
                cr_assert_not_null(strstr(o.out, "capacity: 20 assignments per expert"),
                                   "%s", o.out);
                char *bytes = slurp(out);
                if (!first)
                    first = bytes;
                else {
                    cr_assert(memcmp(first, bytes, 128 + 100 * 64 * 4) == 0,
                              "%s: %s, overlap %s, R=%d: the output differs from the "
                              "rings at R=1", policies[p], exchanges[x][0],
                              exchanges[x][1], R);
                    free(bytes);
                }
                unlink(out);
            }
        free(first);
    }
}

/* The ranks and the golden check run OpenBLAS on the same thread count:
 * cores / ranks by default, or --threads, even when that oversubscribes
 * the cores. Either way the output is bitwise equal to the golden path. */
Test(imbalance, blas_threads_follow_the_cores, .timeout = 60)
{
    const char *cases[][2] = {{"1", NULL}, {"2", NULL}, {"2", "2"}, {"1", "1"}};
    for (int i = 0; i < 4; i++) {
        int ranks = atoi(cases[i][0]);
        int expected = cases[i][1] ? atoi(cases[i][1]) : moe_blas_threads_auto(ranks);
        struct outcome o;
        run_program(&o, NULL, 0, 0,
                    cases[i][1] ? (const char *[]){"run", SMALL, "--ranks", cases[i][0],
                                                   "--threads", cases[i][1], NULL}
                                : (const char *[]){"run", SMALL, "--ranks", cases[i][0],
                                                   NULL});
        cr_assert_eq(o.status, 0, "%s", o.err);
        char line[64];
        snprintf(line, sizeof line, "OpenBLAS threads per rank: %d", expected);
        cr_assert_not_null(strstr(o.out, line), "ranks %d: expected '%s' in %s", ranks,
                           line, o.out);
        cr_assert_not_null(strstr(o.out, "golden check: bitwise equal"), "%s", o.out);
    }
}

/* --stats into /dev/stdout, a pipe here, writes the JSON into the pipe
 * after the report instead of failing on a temporary file beside it. */
Test(imbalance, stats_to_stdout_pipe, .timeout = 60)
{
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", SMALL, "--stats", "/dev/stdout", NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    cr_assert_not_null(strstr(o.out, "golden check: bitwise equal"), "%s", o.out);
    cr_assert_not_null(strstr(o.out, "\"transport\""), "no JSON in: %s", o.out);
}

/* A factor of 0 means dropless: the same bytes as no flag at all. */
Test(imbalance, factor_zero_is_dropless, .timeout = 60)
{
    char a[128], b[128];
    temp_path(a, sizeof a, "cf0.npy");
    temp_path(b, sizeof b, "none.npy");
    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"run", SMALL, "--skew", "2",
                                                 "--capacity-factor", "0", "--output",
                                                 a, NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    cr_assert_null(strstr(o.out, "capacity:"), "%s", o.out);
    run_program(&o, NULL, 0, 0, (const char *[]){"run", SMALL, "--skew", "2", "--output",
                                                 b, NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    char *x = slurp(a), *y = slurp(b);
    cr_assert(memcmp(x, y, 128 + 100 * 64 * 4) == 0);
    free(x);
    free(y);
    unlink(a);
    unlink(b);
}

/* A capacity of zero drops every assignment: the output is all zeros. */
Test(imbalance, zero_capacity_outputs_zeros, .timeout = 60)
{
    char out[128];
    temp_path(out, sizeof out, "zero.npy");
    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"run", SMALL, "--ranks", "3",
                                                 "--expert-capacity", "0", "--output",
                                                 out, NULL});
    cr_assert_eq(o.status, 0, "%s%s", o.out, o.err);
    cr_assert_not_null(strstr(o.out, "dropped 200 of 200 assignments"), "%s", o.out);
    struct moe_npy_array a;
    cr_assert_eq(moe_npy_read(out, 1 << 20, &a), 0);
    const float *v = a.data;
    for (int64_t i = 0; i < a.count; i++)
        cr_assert(v[i] == 0.0f && !signbit(v[i]), "value %ld is %g", (long)i, v[i]);
    moe_npy_array_free(&a);
    unlink(out);
}

/* Min-capacity above the token count drops nothing. */
Test(imbalance, min_capacity_above_tokens, .timeout = 60)
{
    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"run", SMALL, "--skew", "3",
                                                 "--capacity-factor", "0.1",
                                                 "--min-capacity", "1000", NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    cr_assert_not_null(strstr(o.out, "capacity: 1000 assignments"), "%s", o.out);
    cr_assert_not_null(strstr(o.out, "dropped 0 of 200 assignments"), "%s", o.out);
}

/* Every token to one expert (a huge skew, top-1), capacity below the
 * count, both policies: exactly `capacity` assignments survive, on the
 * expert that got them all. */
Test(imbalance, all_tokens_to_one_expert, .timeout = 60)
{
    const char *policies[] = {"position", "probs"};
    for (int p = 0; p < 2; p++) {
        char stats[128];
        temp_path(stats, sizeof stats, "one.json");
        struct outcome o;
        run_program(&o, NULL, 0, 0,
                    (const char *[]){"run", SMALL, "--ranks", "4", "--top-k", "1",
                                     "--skew", "100", "--expert-capacity", "7",
                                     "--drop-policy", policies[p], "--stats", stats, NULL});
        cr_assert_eq(o.status, 0, "%s%s", o.out, o.err);
        cJSON *root = read_json(stats);
        cJSON *experts = cJSON_GetObjectItem(root, "experts");
        cJSON *e0 = cJSON_GetArrayItem(experts, 0);
        cr_assert_eq(cJSON_GetObjectItem(e0, "routed")->valueint, 100);
        cr_assert_eq(cJSON_GetObjectItem(e0, "dropped")->valueint, 93);
        /* Rank 0 owns expert 0; ranks 1-3 each send it their rows, and
         * under the position policy only rank 0's first 7 survive, so the
         * other ranks save every row. */
        cJSON *ranks = cJSON_GetObjectItem(root, "ranks");
        double saved = 0;
        for (int r = 1; r < 4; r++)
            saved += cJSON_GetObjectItem(cJSON_GetArrayItem(ranks, r),
                                         "bytes_saved_by_dropping")->valuedouble;
        if (p == 0)
            cr_assert_eq(saved, 75.0 * 2 * 64 * 4, "saved %g", saved);
        else
            cr_assert_gt(saved, 0);
        cJSON_Delete(root);
        unlink(stats);
    }
}

/* The check of the drops is itself checked: one flipped flag fails. */
Test(imbalance, corrupted_drop_flag_is_reported, .timeout = 60)
{
    struct outcome o;
    run_program(&o, "MOE_EP_CORRUPT_KEPT=5", 0, 0,
                (const char *[]){"run", SMALL, "--capacity-factor", "0.5", NULL});
    cr_assert_eq(o.status, 1, "%s%s", o.out, o.err);
    cr_assert_not_null(strstr(o.out, "MISMATCH in which assignments were dropped"),
                       "%s", o.out);
}

static void aux_text(const char *stats, char *buf, size_t size)
{
    cJSON *root = read_json(stats);
    cJSON *aux = cJSON_GetObjectItem(root, "aux_losses");
    char *text = cJSON_PrintUnformatted(aux);
    snprintf(buf, size, "%s", text);
    cJSON_free(text);
    cJSON_Delete(root);
}

/* The aux losses are the same bits on every rank count: their sums are
 * exact. */
Test(imbalance, aux_losses_independent_of_ranks, .timeout = 60)
{
    char stats[128], first[512] = "", text[512];
    temp_path(stats, sizeof stats, "aux.json");
    for (int R = 1; R <= 5; R += 2) {
        char ranks[16];
        snprintf(ranks, sizeof ranks, "%d", R);
        struct outcome o;
        run_program(&o, NULL, 0, 0, (const char *[]){"run", SMALL, "--ranks", ranks,
                                                     "--skew", "0.5", "--stats", stats,
                                                     NULL});
        cr_assert_eq(o.status, 0, "%s", o.err);
        aux_text(stats, text, sizeof text);
        cr_assert_not_null(strstr(text, "\"load_balance\":"), "%s", text);
        if (!first[0])
            snprintf(first, sizeof first, "%s", text);
        cr_assert_str_eq(text, first, "R=%d", R);
    }
    unlink(stats);
}

/* Bias balancing lowers the imbalance of a skewed router over the steps. */
Test(imbalance, bias_update_lowers_imbalance, .timeout = 120)
{
    char stats[128];
    temp_path(stats, sizeof stats, "bias.json");
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", "--tokens", "256", "--hidden", "64", "--ffn", "96",
                                 "--ranks", "2", "--skew", "1.2", "--steps", "20",
                                 "--bias-update-rate", "0.01", "--stats", stats, NULL});
    cr_assert_eq(o.status, 0, "%s%s", o.out, o.err);
    cr_assert_not_null(strstr(o.out, "forward  19: imbalance"), "%s", o.out);
    cJSON *root = read_json(stats);
    cJSON *forwards = cJSON_GetObjectItem(root, "forwards");
    cr_assert_eq(cJSON_GetArraySize(forwards), 20);
    double first = 0, last = 0;
    for (int i = 0; i < 5; i++) {
        first += cJSON_GetObjectItem(cJSON_GetArrayItem(forwards, i), "imbalance")->valuedouble;
        last += cJSON_GetObjectItem(cJSON_GetArrayItem(forwards, 15 + i),
                                    "imbalance")->valuedouble;
    }
    /* The trend must be clearly downwards: the last five forwards average
     * at least 20% below the first five. */
    cr_assert_lt(last, 0.8 * first, "first five %g, last five %g", first / 5, last / 5);
    cJSON_Delete(root);

    /* Without the update the same batches stay imbalanced. */
    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", "--tokens", "256", "--hidden", "64", "--ffn", "96",
                                 "--ranks", "2", "--skew", "1.2", "--steps", "20",
                                 "--stats", stats, NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    root = read_json(stats);
    forwards = cJSON_GetObjectItem(root, "forwards");
    double still = 0;
    for (int i = 15; i < 20; i++)
        still += cJSON_GetObjectItem(cJSON_GetArrayItem(forwards, i), "imbalance")->valuedouble;
    cr_assert_gt(still, 0.9 * first, "without updates: %g vs %g", still / 5, first / 5);
    cJSON_Delete(root);
    unlink(stats);
}

/* The trace is JSON with one named track per rank, each with every step
 * of the forward, and waits. */
Test(imbalance, trace_has_a_track_per_rank, .timeout = 60)
{
    enum { R = 3 };
    char trace[128];
    temp_path(trace, sizeof trace, "trace.json");
    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"run", SMALL, "--ranks", "3", "--skew",
                                                 "1.2", "--trace", trace, NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    cJSON *root = read_json(trace);
    cJSON *events = cJSON_GetObjectItem(root, "traceEvents");
    cr_assert(cJSON_IsArray(events));
    const char *steps[] = {"route", "layout exchange", "dispatch", "compute", "combine"};
    int seen[R][5] = {{0}}, names = 0, waits = 0, expert_spans[R] = {0};
    cJSON *e;
    cJSON_ArrayForEach(e, events) {
        const char *ph = cJSON_GetObjectItem(e, "ph")->valuestring;
        const char *name = cJSON_GetObjectItem(e, "name")->valuestring;
        int tid = cJSON_GetObjectItem(e, "tid")->valueint;
        cr_assert(tid >= 0 && tid < R);
        if (!strcmp(ph, "M") && !strcmp(name, "thread_name"))
            names++;
        if (strcmp(ph, "X"))
            continue;
        cr_assert_geq(cJSON_GetObjectItem(e, "dur")->valuedouble, 0);
        cr_assert_geq(cJSON_GetObjectItem(e, "ts")->valuedouble, 0);
        if (!strcmp(name, "wait"))
            waits++;
        if (!strncmp(name, "expert ", 7))
            expert_spans[tid]++;
        for (int i = 0; i < 5; i++)
            if (!strcmp(name, steps[i]))
                seen[tid][i]++;
    }
    cr_assert_eq(names, R);
    cr_assert_gt(waits, 0);
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 5; i++)
            cr_assert_eq(seen[r][i], 1, "rank %d step %s", r, steps[i]);
    /* The direct exchange draws each expert's call: 8 experts on 3 ranks
     * are 3, 3 and 2. */
    const int owned[R] = {3, 3, 2};
    for (int r = 0; r < R; r++)
        cr_assert_eq(expert_spans[r], owned[r], "rank %d has %d expert spans", r,
                     expert_spans[r]);
    cJSON_Delete(root);
    unlink(trace);
}

Test(imbalance, bad_capacity_flags, .timeout = 30)
{
    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"run", "--min-capacity", "5", NULL});
    cr_assert_eq(o.status, 2);
    cr_assert_not_null(strstr(o.err, "--min-capacity"), "%s", o.err);
    run_program(&o, NULL, 0, 0, (const char *[]){"run", "--drop-policy", "random", NULL});
    cr_assert_eq(o.status, 2);
    cr_assert_not_null(strstr(o.err, "'random'"), "%s", o.err);
    run_program(&o, NULL, 0, 0, (const char *[]){"run", "--capacity-factor", "-1", NULL});
    cr_assert_eq(o.status, 2);
    cr_assert_not_null(strstr(o.err, "--capacity-factor"), "%s", o.err);
    run_program(&o, NULL, 0, 0, (const char *[]){"run", "--expert-capacity", "3",
                                                 "--capacity-factor", "1", NULL});
    cr_assert_eq(o.status, 2);
    run_program(&o, NULL, 0, 0, (const char *[]){"run", "--steps", "0", NULL});
    cr_assert_eq(o.status, 2);
    cr_assert_not_null(strstr(o.err, "--steps"), "%s", o.err);
}

/* With drops the ranks receive fewer than T * K rows. The dump of the
 * received rows must still match the golden path, also after several
 * forwards have reused the buffers. */
Test(imbalance, dump_under_drops_matches, .timeout = 60)
{
    const char *policies[] = {"position", "probs"};
    for (int p = 0; p < 2; p++) {
        char dir[128];
        temp_path(dir, sizeof dir, "dump");
        struct outcome o;
        run_program(&o, NULL, 0, 0,
                    (const char *[]){"run", "--ranks", "3", "--tokens", "50", "--hidden",
                                     "32", "--ffn", "48", "--skew", "2",
                                     "--capacity-factor", "0.6", "--drop-policy",
                                     policies[p], "--steps", "2", "--dump", dir, NULL});
        cr_assert_eq(o.status, 0, "%s: %s%s", policies[p], o.out, o.err);
        cr_assert_not_null(strstr(o.out, "recv_x         bitwise equal"), "%s", o.out);
        char command[256];
        snprintf(command, sizeof command, "rm -rf %s", dir);
        cr_assert_eq(system(command), 0);
    }
}

/* Two flags naming one file, or a file the dump writes, are rejected
 * before the run. */
Test(imbalance, output_paths_must_differ, .timeout = 30)
{
    char a[128], dir[128], inside[192];
    temp_path(a, sizeof a, "same.out");
    temp_path(dir, sizeof dir, "dumpdir");
    snprintf(inside, sizeof inside, "%s/output.npy", dir);
    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"run", SMALL, "--output", a, "--stats",
                                                 a, NULL});
    cr_assert_eq(o.status, 2, "%s", o.err);
    cr_assert_not_null(strstr(o.err, "it is also the --output file"), "%s", o.err);
    cr_assert_neq(access(a, F_OK), 0, "the run wrote %s", a);
    cr_assert_eq(mkdir(dir, 0700), 0);
    run_program(&o, NULL, 0, 0, (const char *[]){"run", SMALL, "--dump", dir, "--trace",
                                                 inside, NULL});
    cr_assert_eq(o.status, 2, "%s", o.err);
    cr_assert_not_null(strstr(o.err, "--dump"), "%s", o.err);
    cr_assert_neq(access(inside, F_OK), 0, "the run wrote %s", inside);
    cr_assert_eq(rmdir(dir), 0, "the run wrote into %s", dir);
}

/* A FIFO with no reader fails the stats write instead of blocking. */
Test(imbalance, stats_fifo_without_reader_fails, .timeout = 30)
{
    char fifo[128];
    temp_path(fifo, sizeof fifo, "stats.fifo");
    unlink(fifo);
    cr_assert_eq(mkfifo(fifo, 0600), 0);
    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"run", SMALL, "--stats", fifo, NULL});
    unlink(fifo);
    cr_assert_eq(o.status, 3, "%s", o.err);
    cr_assert_not_null(strstr(o.err, "FIFO"), "%s", o.err);
    cr_assert_lt(o.seconds, 20.0);
}

/* With --check off the stats file claims no result of the check. */
Test(imbalance, check_off_reports_nothing_compared, .timeout = 30)
{
    char stats[128];
    temp_path(stats, sizeof stats, "checkoff.json");
    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"run", SMALL, "--check", "off", "--stats",
                                                 stats, NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    cr_assert_not_null(strstr(o.out, "golden check: skipped (--check off)"), "%s", o.out);
    cJSON *root = read_json(stats);
    cJSON *check = cJSON_GetObjectItem(root, "golden_check");
    cr_assert(cJSON_IsFalse(cJSON_GetObjectItem(check, "ran")));
    cr_assert(cJSON_IsNull(cJSON_GetObjectItem(check, "output_bitwise_equal")));
    cJSON_Delete(root);
    unlink(stats);
}

/* A checkpoint that holds only a later layer names --layer in its error. */
Test(imbalance, later_layer_checkpoint_hints_layer, .timeout = 30)
{
    char dir[128];
    temp_path(dir, sizeof dir, "layer3");
    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"make-layer", "--family", "mixtral",
                                                 "--layer", "3", "--out", dir, NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    run_program(&o, NULL, 0, 0, (const char *[]){"run", "--model", dir, NULL});
    cr_assert_eq(o.status, 2, "%s", o.err);
    cr_assert_not_null(strstr(o.err, "give --layer"), "%s", o.err);
    run_program(&o, NULL, 0, 0, (const char *[]){"run", "--model", dir, "--layer", "3", NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    char command[256];
    snprintf(command, sizeof command, "rm -rf %s", dir);
    cr_assert_eq(system(command), 0);
}
