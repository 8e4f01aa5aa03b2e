/*
 * test_explain.c - `moe-ep explain` prints the numbers the library computes.
 *
 * Each test runs the program, parses a part of its output, and checks it
 * against the library run in this process on the same layer. The send
 * counts and the ring records must match the layout of the golden routing.
 * The combine sum and the final output must equal the golden path bit for
 * bit, which works because the program prints 9 significant digits, enough
 * to give back every float32. The drops must match the golden drops, and
 * the skewed router `moe-ep run --skew`. Other tests check --step, --pause,
 * the exit status of bad flags, the width of the lines, and that no
 * segment or rank process is left behind.
 */
#include "moe_aux.h"
#include "moe_explain.h"
#include "test_program.h"

#include <errno.h>
#include <math.h>
#include <sys/prctl.h>

#define RANKS MOE_EXPLAIN_RANKS

/* The layer explain runs, computed by the golden path in this process. */
struct layer {
    struct moe_shape shape;
    struct moe_weights weights;
    float *tokens; /* (T, H) */
    float *output; /* (T, H) */
    struct moe_golden_info info;
};

/* Builds the explain layer for `seed`, with the gate bias of --skew S when
 * skew > 0 and the capacity `limit` (-1 for dropless) under `policy`, and
 * runs the golden path on it. */
static void golden_layer(struct layer *l, uint64_t seed, double skew, int64_t limit,
                         enum moe_drop_policy policy)
{
    memset(l, 0, sizeof *l);
    moe_explain_shape(&l->shape);
    int64_t T = l->shape.tokens, H = l->shape.hidden, E = l->shape.experts;
    cr_assert_eq(moe_weights_init_random(&l->weights, &l->shape, seed), 0);
    if (skew > 0) {
        l->weights.gate_bias = malloc((size_t)E * sizeof(float));
        cr_assert_not_null(l->weights.gate_bias);
        for (int64_t e = 0; e < E; e++)
            l->weights.gate_bias[e] = (float)(-skew * log((double)(e + 1)));
    }
    l->weights.capacity = (struct moe_capacity){.limit = limit, .policy = policy};
    l->tokens = malloc((size_t)(T * H) * sizeof(float));
    l->output = malloc((size_t)(T * H) * sizeof(float));
    cr_assert(l->tokens && l->output);
    moe_tokens_random(l->tokens, 0, T, H, seed);
    moe_blas_init();
    l->info.want_stages = 1;
    cr_assert_eq(moe_golden_forward(&l->weights, l->tokens, l->output, &l->info), 0);
}

static void free_layer(struct layer *l)
{
    moe_golden_info_free(&l->info);
    moe_weights_free(&l->weights);
    free(l->tokens);
    free(l->output);
}

/* Rows rank `rank` routes to expert e under the golden routing. */
static int64_t routed(const struct layer *l, int rank, int64_t e)
{
    int64_t first, count, K = l->shape.top_k, n = 0;
    moe_block_range(l->shape.tokens, RANKS, rank, &first, &count);
    for (int64_t i = first * K; i < (first + count) * K; i++)
        n += l->info.expert_ids[i] == e;
    return n;
}

/* Runs `moe-ep explain ARGS...` and asserts exit status 0. */
#define RUN_EXPLAIN(o, ...)                                                      \
    do {                                                                         \
        run_program((o), NULL, 0, 0, (const char *[]){"explain", ##__VA_ARGS__, NULL}); \
        cr_assert_eq((o)->status, 0, "explain: status %d, stderr: %s", (o)->status, \
                     (o)->err);                                                  \
    } while (0)

/* Returns how many times `needle` occurs in `text`. */
static int count(const char *text, const char *needle)
{
    int n = 0;
    for (const char *p = text; (p = strstr(p, needle)); p += strlen(needle))
        n++;
    return n;
}

/* Checks that no line of `out` has 100 columns or more. */
static void expect_narrow(const char *out)
{
    int number = 1;
    for (const char *line = out; *line; number++) {
        size_t length = strcspn(line, "\n");
        cr_expect_lt(length, 100, "line %d has %zu columns: %.*s", number, length,
                     (int)length, line);
        line += length + (line[length] == '\n');
    }
}

/* Returns the line after the first line that contains `text`, searching
 * from `from`, or NULL. */
static const char *line_after(const char *from, const char *text)
{
    const char *at = strstr(from, text);
    if (!at)
        return NULL;
    const char *end = strchr(at, '\n');
    return end ? end + 1 : NULL;
}

/* Parses up to `max` numbers from a line, after its first `skip` words.
 * Words that are not numbers ("x", "+", "=") are skipped. Returns how many
 * it read. */
static int parse_floats(const char *line, int skip, float *values, int max)
{
    char copy[512];
    size_t length = strcspn(line, "\n");
    cr_assert_lt(length, sizeof copy);
    memcpy(copy, line, length);
    copy[length] = '\0';
    int n = 0, index = 0;
    char *save = NULL;
    for (char *word = strtok_r(copy, " :", &save); word && n < max;
         word = strtok_r(NULL, " :", &save), index++) {
        if (index < skip)
            continue;
        char *end;
        errno = 0;
        float v = strtof(word, &end);
        if (end != word && *end == '\0' && errno == 0)
            values[n++] = v;
    }
    return n;
}

Test(explain, send_counts_match_layout, .timeout = 60)
{
    struct outcome o;
    RUN_EXPLAIN(&o, "--step", "4", "--seed", "7");
    struct layer l;
    golden_layer(&l, 7, 0.0, -1, MOE_DROP_POSITION);
    int64_t E = l.shape.experts;

    /* The (R, E) counts. */
    const char *line = line_after(o.out, "rows routed");
    cr_assert_not_null(line, "no rows routed table: %s", o.out);
    for (int r = 0; r < RANKS; r++, line = strchr(line, '\n') + 1) {
        long long values[MOE_EXPLAIN_EXPERTS];
        int rank, n;
        cr_assert_eq(sscanf(line, " by rank %d%n", &rank, &n), 1, "line: %.80s", line);
        cr_assert_eq(rank, r);
        const char *p = line + n;
        for (int64_t e = 0; e < E; e++) {
            int used;
            cr_assert_eq(sscanf(p, "%lld%n", &values[e], &used), 1);
            p += used;
            cr_expect_eq(values[e], routed(&l, r, e), "rank %d expert %lld: printed %lld, "
                         "layout %lld", r, (long long)e, values[e],
                         (long long)routed(&l, r, e));
        }
    }

    /* The (R, R) send counts: rank i's rows for rank j's experts. */
    line = line_after(o.out, "send counts");
    cr_assert_not_null(line, "no send counts: %s", o.out);
    line = strchr(line, '\n') + 1; /* the "i \ j" header */
    for (int i = 0; i < RANKS; i++, line = strchr(line, '\n') + 1) {
        int rank;
        long long to[RANKS];
        cr_assert_eq(sscanf(line, "%d %lld %lld", &rank, &to[0], &to[1]), 1 + RANKS,
                     "line: %.80s", line);
        cr_assert_eq(rank, i);
        for (int j = 0; j < RANKS; j++) {
            int64_t first, count, expected = 0;
            moe_block_range(E, RANKS, j, &first, &count);
            for (int64_t e = first; e < first + count; e++)
                expected += routed(&l, i, e);
            cr_expect_eq(to[j], expected, "send count %d -> %d: printed %lld, layout %lld",
                         i, j, to[j], (long long)expected);
        }
    }

    /* Tokens per expert. */
    line = strstr(o.out, "tokens per expert (column sums):");
    cr_assert_not_null(line);
    for (int64_t e = 0; e < E; e++) {
        char needle[32];
        snprintf(needle, sizeof needle, " e%lld %lld", (long long)e,
                 (long long)l.info.tokens_per_expert[e]);
        cr_expect_not_null(strstr(line, needle), "expert %lld: expected '%s' in: %.120s",
                           (long long)e, needle, line);
    }
    free_layer(&l);
}

Test(explain, output_equals_golden_bits, .timeout = 60)
{
    struct outcome o;
    RUN_EXPLAIN(&o, "--step", "9");
    struct layer l;
    golden_layer(&l, 1, 0.0, -1, MOE_DROP_POSITION);
    int64_t T = l.shape.tokens, H = l.shape.hidden;
    float printed[64];
    const char *line = line_after(o.out, "out[0]");
    cr_assert_not_null(line, "no output table: %s", o.out);
    for (int64_t t = 0; t < T; t++, line = strchr(line, '\n') + 1) {
        cr_assert_not_null(line);
        /* token, rank, then H values */
        cr_assert_eq(parse_floats(line, 2, printed + t * H, (int)H), H, "line: %.100s", line);
    }
    expect_bitwise_equal(printed, l.output, T * H, "printed output against golden");
    free_layer(&l);
}

Test(explain, combine_sum_equals_output_row, .timeout = 60)
{
    struct outcome o;
    RUN_EXPLAIN(&o, "--step", "8");
    struct layer l;
    golden_layer(&l, 1, 0.0, -1, MOE_DROP_POSITION);
    int64_t H = l.shape.hidden, K = l.shape.top_k;

    long long t;
    const char *so = strstr(o.out, "So out[");
    cr_assert_not_null(so, "no combine formula: %s", o.out);
    cr_assert_eq(sscanf(so, "So out[%lld]", &t), 1);
    cr_assert(t >= 0 && t < l.shape.tokens);

    const char *line = strstr(o.out, "  h = 0:");
    cr_assert_not_null(line, "no sums: %s", o.out);
    for (int64_t h = 0; h < H; h++, line = strchr(line, '\n') + 1) {
        float v[16];
        /* "h", "=", the index, then w0 y0 w1 y1 ... out */
        int n = parse_floats(line, 3, v, 16);
        cr_assert_eq(n, 2 * K + 1, "h = %lld: %d numbers in: %.100s", (long long)h, n, line);
        float sum = 0.0f; /* slot order, float32, as moe_combine sums */
        for (int64_t k = 0; k < K; k++) {
            sum += v[2 * k] * v[2 * k + 1];
            cr_expect_eq(memcmp(&v[2 * k], &l.info.weights[t * K + k], 4), 0,
                         "weight %lld printed %.9g, golden %.9g", (long long)k, v[2 * k],
                         l.info.weights[t * K + k]);
            cr_expect_eq(memcmp(&v[2 * k + 1], &l.info.expert_out[(t * K + k) * H + h], 4),
                         0, "y%lld[%lld] printed %.9g, golden %.9g", (long long)k,
                         (long long)h, v[2 * k + 1], l.info.expert_out[(t * K + k) * H + h]);
        }
        cr_expect_eq(memcmp(&sum, &v[2 * K], 4), 0, "h = %lld: the printed terms sum to "
                     "%.9g, the line says %.9g", (long long)h, sum, v[2 * K]);
        cr_expect_eq(memcmp(&v[2 * K], &l.output[t * H + h], 4), 0,
                     "h = %lld: printed %.9g, golden output %.9g", (long long)h, v[2 * K],
                     l.output[t * H + h]);
    }
    free_layer(&l);
}

Test(explain, step_prints_only_that_step, .timeout = 120)
{
    for (int step = 1; step <= MOE_EXPLAIN_STEPS; step++) {
        char text[16], heading[48];
        snprintf(text, sizeof text, "%d", step);
        snprintf(heading, sizeof heading, "== Step %d of %d:", step, MOE_EXPLAIN_STEPS);
        struct outcome o;
        RUN_EXPLAIN(&o, "--step", text);
        int headings = 0;
        for (const char *p = o.out; (p = strstr(p, "\n== ")); p++)
            headings++;
        cr_expect_eq(headings, 1, "--step %d printed %d headings: %s", step, headings, o.out);
        cr_expect_not_null(strstr(o.out, heading), "--step %d lacks '%s'", step, heading);
        cr_expect_null(strstr(o.out, "moe-ep explain:"), "--step %d printed the intro", step);
    }
}

/* Parses the lines "expert E: ...token(s) a, b" that follow the record
 * line containing `record` in the listing of ring src -> dst. The tokens go
 * to tokens[E][...] and their count to n[E]. */
static void parse_ring_rows(const char *out, int src, int dst, const char *record,
                            int64_t tokens[][16], int64_t *n)
{
    char ring[64];
    snprintf(ring, sizeof ring, "ring %d -> %d: rank %d wrote", src, dst, src);
    const char *at = strstr(out, ring);
    cr_assert_not_null(at, "no '%s' in: %s", ring, out);
    const char *line = line_after(at, record);
    cr_assert_not_null(line, "ring %d -> %d has no '%s' record", src, dst, record);
    for (int e = 0; e < MOE_EXPLAIN_EXPERTS; e++)
        n[e] = 0;
    int expert;
    while (sscanf(line, " expert %d:", &expert) == 1) {
        cr_assert(expert >= 0 && expert < MOE_EXPLAIN_EXPERTS);
        const char *p = strstr(line, "token");
        p = strchr(p, ' ');
        char *end;
        for (;;) {
            long long t = strtoll(p, &end, 10);
            if (end == p)
                break;
            tokens[expert][n[expert]++] = t;
            p = *end == ',' ? end + 1 : end;
        }
        line = strchr(line, '\n') + 1;
    }
}

Test(explain, ring_records_match_layout, .timeout = 60)
{
    struct outcome o;
    RUN_EXPLAIN(&o, "--step", "5", "--seed", "3");
    struct layer l;
    golden_layer(&l, 3, 0.0, -1, MOE_DROP_POSITION);
    int64_t E = l.shape.experts, K = l.shape.top_k;

    for (int r = 0; r < RANKS; r++) {
        char local[64];
        snprintf(local, sizeof local, "ring %d -> %d: 0 bytes written", r, r);
        cr_expect_not_null(strstr(o.out, local), "missing '%s'", local);
    }
    for (int src = 0; src < RANKS; src++) {
        int dst = 1 - src;
        int64_t tokens[MOE_EXPLAIN_EXPERTS][16], n[MOE_EXPLAIN_EXPERTS];
        int64_t first, count, expert_first, expert_count;
        moe_block_range(l.shape.tokens, RANKS, src, &first, &count);
        moe_block_range(E, RANKS, dst, &expert_first, &expert_count);

        /* Dispatch: src's tokens for dst's experts, each expert's in token
         * order. Combine: the same rows come back on ring dst -> src. */
        const char *records[2] = {"dispatch, all-to-all", "combine, all-to-all"};
        for (int which = 0; which < 2; which++) {
            int ring_src = which ? dst : src, ring_dst = which ? src : dst;
            parse_ring_rows(o.out, ring_src, ring_dst, records[which], tokens, n);
            for (int64_t e = expert_first; e < expert_first + expert_count; e++) {
                int64_t j = 0;
                for (int64_t t = first; t < first + count; t++) {
                    int chose = 0;
                    for (int64_t k = 0; k < K; k++)
                        chose |= l.info.expert_ids[t * K + k] == e;
                    if (!chose)
                        continue;
                    cr_expect(j < n[e] && tokens[e][j] == t, "%s on ring %d -> %d, expert "
                              "%lld: row %lld should be token %lld", records[which],
                              ring_src, ring_dst, (long long)e, (long long)j, (long long)t);
                    j++;
                }
                cr_expect_eq(n[e], j, "%s on ring %d -> %d, expert %lld: %lld rows printed, "
                             "%lld routed", records[which], ring_src, ring_dst,
                             (long long)e, (long long)n[e], (long long)j);
            }
        }
    }
    free_layer(&l);
}

Test(explain, direct_notes_match_layout, .timeout = 60)
{
    struct outcome o;
    RUN_EXPLAIN(&o, "--step", "5", "--exchange", "direct", "--seed", "3");
    struct layer l;
    golden_layer(&l, 3, 0.0, -1, MOE_DROP_POSITION);
    int64_t E = l.shape.experts;
    for (int src = 0; src < RANKS; src++) {
        int dst = 1 - src;
        char ring[64];
        snprintf(ring, sizeof ring, "ring %d -> %d: rank %d wrote", src, dst, src);
        const char *at = strstr(o.out, ring);
        cr_assert_not_null(at, "no '%s' in: %s", ring, o.out);

        /* One dispatch note per expert of dst: the rows src wrote for it. */
        int64_t first, count, rows_for_dst = 0;
        moe_block_range(E, RANKS, dst, &first, &count);
        for (int64_t e = first; e < first + count; e++) {
            char note[96];
            snprintf(note, sizeof note, "expert %lld: %lld row%s written into rank %d's "
                     "input window", (long long)e, (long long)routed(&l, src, e),
                     routed(&l, src, e) == 1 ? "" : "s", dst);
            cr_expect_not_null(strstr(at, note), "ring %d -> %d lacks '%s'", src, dst, note);
        }

        /* One combine note: the rows of dst that src computed. */
        moe_block_range(E, RANKS, src, &first, &count);
        for (int64_t e = first; e < first + count; e++)
            rows_for_dst += routed(&l, dst, e);
        char note[96];
        snprintf(note, sizeof note, "the outputs of %lld row%s of rank %d are in rank %d's "
                 "output window", (long long)rows_for_dst, rows_for_dst == 1 ? "" : "s",
                 dst, src);
        cr_expect_not_null(strstr(at, note), "ring %d -> %d lacks '%s'", src, dst, note);
    }
    free_layer(&l);
}

/* Returns the value printed after `label` on the first line containing it. */
static double value_after(const char *out, const char *label)
{
    const char *at = strstr(out, label);
    cr_assert_not_null(at, "no '%s' in: %s", label, out);
    return strtod(at + strlen(label), NULL);
}

/* Returns the value after the last "= " of the first line containing
 * `label`. */
static double value_at_end(const char *out, const char *label)
{
    const char *at = strstr(out, label);
    cr_assert_not_null(at, "no '%s' in: %s", label, out);
    const char *end = strchr(at, '\n'), *value = NULL;
    for (const char *p = at; (p = strstr(p, "= ")) && (!end || p < end); p++)
        value = p + 2;
    cr_assert_not_null(value, "no '= ' after '%s'", label);
    return strtod(value, NULL);
}

Test(explain, skew_matches_run_skew, .timeout = 60)
{
    struct outcome o, run;
    RUN_EXPLAIN(&o, "--section", "skew", "--skew", "1.5");
    run_program(&run, NULL, 0, 0,
                (const char *[]){"run", "--ranks", "2", "--tokens", "6", "--hidden", "4",
                                 "--ffn", "8", "--experts", "4", "--top-k", "2", "--skew",
                                 "1.5", NULL});
    cr_assert_eq(run.status, 0, "run --skew: %s", run.err);

    /* explain: "tokens per expert  p0 p1 p2 p3  s0 s1 s2 s3" */
    const char *line = strstr(o.out, "tokens per expert");
    cr_assert_not_null(line, "no tokens per expert: %s", o.out);
    long long values[2 * MOE_EXPLAIN_EXPERTS];
    cr_assert_eq(sscanf(line, "tokens per expert %lld %lld %lld %lld %lld %lld %lld %lld",
                        &values[0], &values[1], &values[2], &values[3], &values[4],
                        &values[5], &values[6], &values[7]), 8, "line: %.100s", line);

    /* run: "  expert  rank   routed  dropped" then one line per expert */
    const char *row = line_after(run.out, "expert  rank   routed");
    cr_assert_not_null(row, "no routing table: %s", run.out);
    for (int e = 0; e < MOE_EXPLAIN_EXPERTS; e++, row = strchr(row, '\n') + 1) {
        int expert, rank;
        long long routed_rows;
        cr_assert_eq(sscanf(row, "%d %d %lld", &expert, &rank, &routed_rows), 3);
        cr_assert_eq(expert, e);
        cr_expect_eq(values[MOE_EXPLAIN_EXPERTS + e], routed_rows, "expert %d: explain %lld, "
                     "run --skew %lld", e, values[MOE_EXPLAIN_EXPERTS + e], routed_rows);
    }

    /* The measured medians: one row per rank with 8 numbers. */
    const char *timing = line_after(o.out, "rank  compute");
    cr_assert_not_null(timing, "no timing table: %s", o.out);
    for (int r = 0; r < RANKS; r++, timing = strchr(timing, '\n') + 1) {
        float numbers[9];
        cr_expect_eq(parse_floats(timing, 0, numbers, 9), 9, "line: %.100s", timing);
        for (int i = 1; i < 9; i++)
            cr_expect(numbers[i] >= 0.0f, "rank %d: negative time %g", r, numbers[i]);
    }
}

/* Parses each "token t loses expert e" between `label` and `until` and
 * checks the list against the golden drops of `l`, both ways. */
static void check_drops(const char *out, const char *label, const char *until,
                        const struct layer *l)
{
    int64_t T = l->shape.tokens, K = l->shape.top_k;
    const char *at = strstr(out, label);
    cr_assert_not_null(at, "no '%s' in: %s", label, out);
    const char *end = strstr(at, until);
    cr_assert_not_null(end, "no '%s' after '%s': %s", until, label, at);
    int64_t printed = 0;
    for (const char *p = at; (p = strstr(p, "token ")) && p < end; p++) {
        long long t, e;
        if (sscanf(p, "token %lld loses expert %lld", &t, &e) != 2)
            continue;
        int found = 0;
        for (int64_t k = 0; k < K; k++)
            found |= l->info.expert_ids[t * K + k] == e && !l->info.kept[t * K + k];
        cr_expect(found, "%s token %lld loses expert %lld, but the golden path kept it",
                  label, t, e);
        printed++;
    }
    int64_t dropped = 0;
    for (int64_t i = 0; i < T * K; i++)
        dropped += !l->info.kept[i];
    cr_expect_eq(printed, dropped, "%s %lld drops printed, golden path %lld", label,
                 (long long)printed, (long long)dropped);
}

Test(explain, capacity_drops_match_golden, .timeout = 60)
{
    struct outcome o;
    RUN_EXPLAIN(&o, "--section", "capacity", "--capacity-factor", "1");
    struct layer position, probs;
    moe_explain_shape(&position.shape);
    int64_t limit = moe_capacity_from_factor(1.0, 0, position.shape.tokens,
                                             position.shape.top_k, position.shape.experts);
    golden_layer(&position, 1, 2.0, limit, MOE_DROP_POSITION);
    golden_layer(&probs, 1, 2.0, limit, MOE_DROP_PROBS);
    char formula[64];
    snprintf(formula, sizeof formula, "= %lld\n", (long long)limit);
    cr_expect_not_null(strstr(o.out, formula), "no capacity '%s' in: %s", formula, o.out);
    check_drops(o.out, "position:", "\n  probs:", &position);
    check_drops(o.out, "probs:", "\nA dropped row", &probs);
    cr_expect_not_null(strstr(o.out, "Golden check: position bitwise equal, probs bitwise "
                                     "equal"), "%s", o.out);
    free_layer(&position);
    free_layer(&probs);
}

Test(explain, capacity_factor_zero_drops_nothing, .timeout = 60)
{
    struct outcome o;
    RUN_EXPLAIN(&o, "--section", "capacity", "--capacity-factor", "0");
    cr_expect_not_null(strstr(o.out, "CF = 0 means no capacity"), "%s", o.out);
    cr_expect_eq(count(o.out, "nothing dropped"), 2, "%s", o.out);
    cr_expect_eq(count(o.out, "DROPPED"), 0, "%s", o.out);
    expect_narrow(o.out);
}

Test(explain, aux_loss_matches_library, .timeout = 60)
{
    struct outcome o;
    RUN_EXPLAIN(&o, "--section", "aux");
    const char *labels[2] = {"plain router:", "skewed router:"};
    double skews[2] = {0.0, 2.0};
    for (int i = 0; i < 2; i++) {
        struct layer l;
        golden_layer(&l, 1, skews[i], -1, MOE_DROP_POSITION);
        struct moe_aux_losses losses;
        moe_aux_losses_compute(l.info.router_stats, l.shape.experts, l.shape.top_k, NAN,
                               NAN, &losses);
        const char *at = strstr(o.out, labels[i]);
        cr_assert_not_null(at, "no '%s' in: %s", labels[i], o.out);
        /* 4 decimals are printed, so they agree within half a unit of the last. */
        double printed = value_after(at, ") = ");
        cr_expect(fabs(printed - losses.load_balance) <= 0.5e-4, "%s printed %.4f, library "
                  "%.6f", labels[i], printed, losses.load_balance);
        printed = value_after(at, "logsumexp(logits)^2: ");
        cr_expect(fabs(printed - losses.z_loss) <= 0.5e-4, "%s z-loss printed %.4f, library "
                  "%.6f", labels[i], printed, losses.z_loss);
        free_layer(&l);
    }
}

Test(explain, traffic_bytes_match_layout, .timeout = 60)
{
    struct outcome o;
    RUN_EXPLAIN(&o, "--section", "traffic", "--seed", "5");
    struct layer l;
    golden_layer(&l, 5, 0.0, -1, MOE_DROP_POSITION);
    int64_t T = l.shape.tokens, H = l.shape.hidden, E = l.shape.experts;
    const char *line = line_after(o.out, "rank  dispatch  combine");
    cr_assert_not_null(line, "no byte table: %s", o.out);
    int64_t total = 0;
    for (int r = 0; r < RANKS; r++, line = strchr(line, '\n') + 1) {
        int rank;
        long long dispatch, combine, rows, layout, stats;
        cr_assert_eq(sscanf(line, "%d %lld %lld %lld %lld %lld", &rank, &dispatch, &combine,
                            &rows, &layout, &stats), 6, "line: %.100s", line);
        int64_t first, count, off_rank = 0;
        moe_block_range(E, RANKS, 1 - r, &first, &count);
        for (int64_t e = first; e < first + count; e++)
            off_rank += routed(&l, r, e);
        int64_t bytes = off_rank * H * (int64_t)sizeof(float);
        cr_expect_eq(dispatch, bytes, "rank %d dispatch: printed %lld, layout %lld", r,
                     dispatch, (long long)bytes);
        cr_expect_eq(combine, bytes, "rank %d combine: printed %lld, layout %lld", r,
                     combine, (long long)bytes);
        cr_expect_eq(layout, E * 8, "rank %d layout bytes %lld", r, layout);
        cr_expect_eq(stats, moe_router_stats_len(E) * 8, "rank %d stats bytes %lld", r,
                     stats);
        total += 2 * bytes;
    }
    double tp = 2.0 * (RANKS - 1.0) / RANKS * (double)T * (double)H * 4.0;
    cr_expect_eq(value_at_end(o.out, "TP, ring all-reduce:"), tp);
    cr_expect_eq(value_at_end(o.out, "EP, this run:"), (double)total / RANKS);
    free_layer(&l);
}

/* Checks the whole narration of one exchange: every part present, every
 * run bitwise equal to the golden path, and no line of 100 columns or more. */
static void check_full_run(const char *exchange)
{
    struct outcome o;
    RUN_EXPLAIN(&o, "--exchange", exchange);
    const char *headings[] = {
        "== Step 1 of 10:", "== Step 10 of 10:", "== A skewed router",
        "== Token dropping under a capacity ==", "== All-to-all against all-reduce ==",
        "== The load-balancing loss ==",
    };
    for (size_t i = 0; i < sizeof headings / sizeof headings[0]; i++)
        cr_expect_not_null(strstr(o.out, headings[i]), "missing '%s'", headings[i]);
    cr_expect_not_null(strstr(o.out, "  output           24 values, bitwise equal"));
    cr_expect_null(strstr(o.out, "MISMATCH"), "%s", o.out);
    expect_narrow(o.out);
}

Test(explain, full_run_rings, .timeout = 120)
{
    check_full_run("rings");
}

Test(explain, full_run_direct, .timeout = 120)
{
    check_full_run("direct");
}

Test(explain, bad_flags_exit_2, .timeout = 60)
{
    static const struct {
        const char *args[6];
        const char *expected;
    } cases[] = {
        {{"--step", "0"}, "invalid --step value '0'"},
        {{"--step", "11"}, "invalid --step value '11'"},
        {{"--step", "x"}, "invalid --step value 'x'"},
        {{"--section", "bogus"}, "invalid --section value 'bogus'"},
        {{"--section", ""}, "invalid --section value ''"},
        {{"--seed", "-1"}, "invalid --seed value '-1'"},
        {{"--skew", "100.5"}, "invalid --skew value '100.5'"},
        {{"--capacity-factor", "nan"}, "invalid --capacity-factor value 'nan'"},
        {{"--exchange", "mpi"}, "invalid --exchange value 'mpi'"},
        {{"--step", "3", "--section", "aux"}, "--step 3 prints one step"},
        {{"--step"}, "missing value for --step"},
        {{"--bogus"}, "unknown option '--bogus'"},
        {{"4"}, "unexpected argument '4'"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *args[8] = {"explain"};
        int n = 1;
        for (int k = 0; cases[i].args[k]; k++)
            args[n++] = cases[i].args[k];
        args[n] = NULL;
        struct outcome o;
        run_program(&o, NULL, 0, 0, args);
        cr_expect_eq(o.status, 2, "case %zu: status %d, stderr: %s", i, o.status, o.err);
        cr_expect_not_null(strstr(o.err, cases[i].expected), "case %zu: stderr lacks '%s': %s",
                           i, cases[i].expected, o.err);
        cr_expect_eq(o.out[0], '\0', "case %zu printed to stdout: %s", i, o.out);
    }
}

/* Runs explain --pause with `input` on its stdin and returns the outcome. */
static void run_with_input(struct outcome *o, const char *input)
{
    char in_path[] = "/tmp/moe-ep-explain-inXXXXXX";
    int fd = mkstemp(in_path);
    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, input, strlen(input)), (ssize_t)strlen(input));
    lseek(fd, 0, SEEK_SET);
    int saved = dup(0);
    dup2(fd, 0); /* the program inherits this stdin */
    run_program(o, NULL, 0, 0, (const char *[]){"explain", "--pause", NULL});
    dup2(saved, 0);
    close(saved);
    close(fd);
    unlink(in_path);
}

Test(explain, pause_waits_and_ends_at_eof, .timeout = 60)
{
    /* Two Enters, then the end of the input: the third wait ends at EOF,
     * and no later one waits. */
    struct outcome o;
    run_with_input(&o, "\n\n");
    cr_assert_eq(o.status, 0, "status %d: %s", o.status, o.err);
    cr_expect_eq(count(o.err, "[press Enter to continue]"), 3, "stderr: %s", o.err);
    cr_expect_not_null(strstr(o.out, "== The load-balancing loss =="), "%s", o.out);

    /* With no input at all the first wait ends it. */
    run_with_input(&o, "");
    cr_assert_eq(o.status, 0, "status %d: %s", o.status, o.err);
    cr_expect_eq(count(o.err, "[press Enter to continue]"), 1, "stderr: %s", o.err);
    cr_expect_not_null(strstr(o.out, "== The load-balancing loss =="));
}

Test(explain, dead_rank_exits_3, .timeout = 60)
{
    struct outcome o;
    run_program(&o, "MOE_EP_FAULT=1:dispatch:kill", 0, 0,
                (const char *[]){"explain", "--step", "1", NULL});
    cr_expect_eq(o.status, 3, "status %d, stderr: %s", o.status, o.err);
    cr_expect_not_null(strstr(o.err, "rank 1"), "stderr: %s", o.err);
    cr_expect_not_null(strstr(o.err, "killed by signal 9"), "stderr: %s", o.err);
    cr_expect_eq(o.out[0], '\0', "printed before the runs ended: %s", o.out);
    cr_expect_eq(segment_count(), 0);
}

Test(explain, leaves_no_segment_or_process, .timeout = 60)
{
    /* Orphans of the program would be reparented to this process. */
    cr_assert_eq(prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
    struct outcome o;
    RUN_EXPLAIN(&o);
    int status;
    pid_t left = waitpid(-1, &status, WNOHANG);
    cr_expect(left == -1 && errno == ECHILD, "a process of the run is left: waitpid "
              "returned %ld", (long)left);
    cr_expect_eq(segment_count(), 0);
}
