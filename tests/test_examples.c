/*
 * test_examples.c - runs every numbered example of examples/ and checks
 * the values it prints against the library.
 *
 * Each example runs as its own process under a 30 s deadline and must
 * exit with 0. The test then parses the key values of its output and
 * recomputes them through the public API, from the shape and seed that the
 * example prints. These are the routing of 01, the layout and send counts
 * of 03, the expert row of 04, the combined value of 05, the tokens per
 * expert of 07 and the drops of 08. 02 must deliver every record with
 * matching checksums and wrap its indices. 06 must report the index that
 * the test requests it to corrupt. 09 must match the PyTorch reference of
 * every layer in data/layers, and must fail once one reference value is
 * changed. No example may leave a segment in /dev/shm.
 *
 * The examples are found in BUILD/examples, next to this binary's
 * directory BUILD/tests, and `make check` builds them first.
 */
#define _XOPEN_SOURCE 700 /* nftw, for remove_tree() */
#define _DEFAULT_SOURCE   /* usleep, with _XOPEN_SOURCE set */

#include "moe_aux.h"
#include "moe_layer.h"
#include "moe_npy.h"
#include "test_checkpoint.h"
#include "test_program.h"

#include <errno.h>
#include <inttypes.h>

/* Criterion timeout of every test here. One value serves all of them, as
 * the note in test_alltoall.c about Criterion's runner explains. */
#define TEST_TIMEOUT_S 60
/* Deadline of one example run, after which it is killed. */
#define EXAMPLE_DEADLINE_MS 30000

/* Runs examples/NAME with the NULL-terminated arguments `args` (or none)
 * from the current directory, and captures its status and output. */
static void run_example(struct outcome *o, const char *name, const char *const *args)
{
    char self[PATH_MAX], program[PATH_MAX + 64];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    cr_assert_gt(n, 0);
    self[n] = '\0';
    snprintf(program, sizeof program, "%s/../examples/%s", dirname(self), name);
    cr_assert_eq(access(program, X_OK), 0,
                 "example %s not found; `make examples` builds it", program);

    char out_path[] = "/tmp/moe-ep-example-outXXXXXX";
    char err_path[] = "/tmp/moe-ep-example-errXXXXXX";
    int out_fd = mkstemp(out_path), err_fd = mkstemp(err_path);
    cr_assert(out_fd >= 0 && err_fd >= 0);
    const char *argv[16] = {program};
    for (int i = 0; args && args[i]; i++) {
        cr_assert_lt(i, 14);
        argv[i + 1] = args[i];
    }

    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        dup2(out_fd, 1);
        dup2(err_fd, 2);
        execv(program, (char *const *)argv);
        _exit(127);
    }
    int status = 0, waited_ms = 0;
    while (waitpid(pid, &status, WNOHANG) == 0) {
        if (waited_ms >= EXAMPLE_DEADLINE_MS) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            cr_assert_fail("%s did not finish within %d ms", name, EXAMPLE_DEADLINE_MS);
        }
        usleep(5000);
        waited_ms += 5;
    }
    o->status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    read_file(out_path, o->out, sizeof o->out);
    read_file(err_path, o->err, sizeof o->err);
    close(out_fd);
    close(err_fd);
    unlink(out_path);
    unlink(err_path);
}

/* Runs an example that must succeed, and checks that it leaves no segment
 * name in /dev/shm. */
static void run_example_ok(struct outcome *o, const char *name, const char *const *args)
{
    int segments_before = segment_count();
    run_example(o, name, args);
    cr_assert_eq(o->status, 0, "%s exited with %d\nstdout:\n%s\nstderr:\n%s", name,
                 o->status, o->out, o->err);
    cr_assert_eq(segment_count(), segments_before, "%s left a segment in /dev/shm", name);
}

/* Returns the start of the first line of `text` that begins with `prefix`
 * after optional spaces, and fails the test when there is none. */
static const char *find_line(const char *text, const char *prefix)
{
    for (const char *line = text; line && *line; line = strchr(line, '\n')) {
        if (*line == '\n')
            line++;
        const char *start = line + strspn(line, " ");
        if (strncmp(start, prefix, strlen(prefix)) == 0)
            return start;
    }
    cr_assert_fail("no line starting with '%s' in:\n%s", prefix, text);
    return NULL;
}

/* Reads `count` integers that follow `prefix` on its line. */
static void parse_ints(const char *text, const char *prefix, int64_t *values, int count)
{
    const char *p = find_line(text, prefix) + strlen(prefix);
    for (int i = 0; i < count; i++) {
        char *end;
        values[i] = strtoll(p, &end, 10);
        cr_assert_neq(end, p, "value %d after '%s' is missing", i, prefix);
        p = end;
    }
}

/* Reads `count` floats that follow `prefix` on its line. A value printed
 * with %.9g reads back as the same float32 bits. */
static void parse_floats(const char *text, const char *prefix, float *values, int count)
{
    const char *p = find_line(text, prefix) + strlen(prefix);
    for (int i = 0; i < count; i++) {
        char *end;
        values[i] = strtof(p, &end);
        cr_assert_neq(end, p, "value %d after '%s' is missing", i, prefix);
        p = end;
    }
}

/* The shape and seed that an example prints on its first line. */
struct header {
    int64_t ranks, rows, tokens, hidden, ffn, experts, top_k, seed;
};

/* Parses the fields of "NAME: ranks R, tokens T, ...". An absent field
 * stays -1. */
static struct header parse_header(const char *out)
{
    struct header h = {-1, -1, -1, -1, -1, -1, -1, -1};
    struct { const char *key; int64_t *value; } fields[] = {
        {" ranks ", &h.ranks},     {" rows ", &h.rows},
        {" tokens ", &h.tokens},   {" hidden ", &h.hidden},
        {" ffn ", &h.ffn},         {" experts ", &h.experts}, {" top-k ", &h.top_k},
        {" seed ", &h.seed},
    };
    const char *end = strchr(out, '\n');
    cr_assert_not_null(end);
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        const char *at = strstr(out, fields[i].key);
        if (at && at < end)
            *fields[i].value = strtoll(at + strlen(fields[i].key), NULL, 10);
    }
    return h;
}

/* A random layer and its tokens as moe-ep builds them from a seed. */
struct layer {
    struct moe_shape shape;
    struct moe_weights weights;
    float *x; /* (T, H) */
};

static void make_layer(struct layer *l, const struct header *h)
{
    cr_assert(h->tokens > 0 && h->hidden > 0 && h->ffn > 0 && h->experts > 0 &&
              h->top_k > 0 && h->seed >= 0, "the example printed no complete shape");
    l->shape = (struct moe_shape){.tokens = h->tokens, .hidden = h->hidden, .ffn = h->ffn,
                                  .experts = h->experts, .top_k = h->top_k};
    cr_assert_eq(moe_weights_init_random(&l->weights, &l->shape, (uint64_t)h->seed), 0);
    l->x = malloc((size_t)(h->tokens * h->hidden) * sizeof(float));
    cr_assert_not_null(l->x);
    moe_tokens_random(l->x, 0, h->tokens, h->hidden, (uint64_t)h->seed);
}

static void free_layer(struct layer *l)
{
    moe_weights_free(&l->weights);
    free(l->x);
}

/* Routes every token of the layer: ids (T, K). */
static int32_t *route_all(const struct layer *l)
{
    int64_t T = l->shape.tokens, E = l->shape.experts, K = l->shape.top_k;
    float *logits = malloc((size_t)(T * E) * sizeof(float));
    float *probs = malloc((size_t)(T * E) * sizeof(float));
    float *weights = malloc((size_t)(T * K) * sizeof(float));
    int32_t *ids = malloc((size_t)(T * K) * sizeof(int32_t));
    cr_assert(logits && probs && weights && ids);
    moe_gate_logits(l->x, l->weights.gate, T, l->shape.hidden, E, logits);
    moe_route(&l->weights.router, NULL, logits, T, E, K, probs, ids, weights);
    free(logits);
    free(probs);
    free(weights);
    return ids;
}

Test(examples, routing_ids_match_library, .timeout = TEST_TIMEOUT_S)
{
    struct outcome o;
    run_example_ok(&o, "01_routing", NULL);
    struct header h = parse_header(o.out);
    struct layer l;
    make_layer(&l, &h);
    int32_t *ids = route_all(&l);

    int64_t per_expert[MOE_MAX_EXPERTS] = {0}, printed[MOE_MAX_EXPERTS];
    for (int64_t t = 0; t < h.tokens; t++) {
        char prefix[64];
        int64_t got[16];
        snprintf(prefix, sizeof prefix, "token %" PRId64 ": experts", t);
        parse_ints(o.out, prefix, got, (int)h.top_k);
        for (int64_t k = 0; k < h.top_k; k++) {
            cr_assert_eq(got[k], ids[t * h.top_k + k], "token %" PRId64 " slot %" PRId64
                         ": printed expert %" PRId64 ", the library routes to %d", t, k,
                         got[k], ids[t * h.top_k + k]);
            per_expert[ids[t * h.top_k + k]]++;
        }
    }
    parse_ints(o.out, "tokens per expert:", printed, (int)h.experts);
    for (int64_t e = 0; e < h.experts; e++)
        cr_assert_eq(printed[e], per_expert[e], "expert %" PRId64, e);
    free(ids);
    free_layer(&l);
}

Test(examples, ring_delivers_every_record, .timeout = TEST_TIMEOUT_S)
{
    struct outcome o;
    run_example_ok(&o, "02_ring_two_processes", NULL);
    int64_t records[1], sent_received[2], head_tail[2];
    parse_ints(o.out, "02_ring_two_processes:", records, 1);
    cr_assert_gt(records[0], 0);

    const char *line = find_line(o.out, "records sent");
    cr_assert_eq(sscanf(line, "records sent %" SCNd64 ", received %" SCNd64,
                        &sent_received[0], &sent_received[1]), 2, "%s", line);
    cr_assert_eq(sent_received[0], records[0]);
    cr_assert_eq(sent_received[1], records[0]);

    unsigned long long sent_sum, received_sum;
    line = find_line(o.out, "checksum sent");
    cr_assert_eq(sscanf(line, "checksum sent %llx, received %llx", &sent_sum, &received_sum),
                 2, "%s", line);
    cr_assert_eq(sent_sum, received_sum);

    /* The indices start 64 bytes below 2^64, so after more than 64 bytes
     * they have wrapped to a small value; head and tail end equal. */
    line = find_line(o.out, "indices started");
    const char *at = strstr(line, "head ");
    cr_assert_not_null(at);
    cr_assert_eq(sscanf(at, "head %" SCNd64 ", tail %" SCNd64, &head_tail[0], &head_tail[1]),
                 2, "%s", line);
    cr_assert_eq(head_tail[0], head_tail[1]);
    cr_assert(head_tail[0] > 0 && head_tail[0] < (1 << 20), "%s", line);
    cr_assert_not_null(strstr(o.out, "every record arrived once"));
}

Test(examples, layout_and_send_counts_match_library, .timeout = TEST_TIMEOUT_S)
{
    struct outcome o;
    run_example_ok(&o, "03_layout_alltoall", NULL);
    struct header h = parse_header(o.out);
    cr_assert(h.ranks > 0 && h.ranks <= 8 && h.experts <= 64, "header: %s", o.out);
    struct layer l;
    make_layer(&l, &h);
    int32_t *ids = route_all(&l);
    int R = (int)h.ranks;

    /* layout[s][e] counts the rows rank s routes to expert e, and send[s][d]
     * the rows rank s sends to rank d. */
    int64_t layout[8][64] = {{0}}, send[8][8] = {{0}}, received[8] = {0};
    for (int64_t i = 0; i < h.tokens * h.top_k; i++) {
        int source = 0;
        for (int s = 0; s < R; s++) {
            int64_t first, count;
            moe_block_range(h.tokens, R, s, &first, &count);
            if (i / h.top_k >= first && i / h.top_k < first + count)
                source = s;
        }
        int owner = moe_expert_owner(h.experts, R, ids[i]);
        layout[source][ids[i]]++;
        send[source][owner]++;
        received[owner]++;
    }

    for (int s = 0; s < R; s++) {
        char prefix[32];
        int64_t row[64 + 1 + 8];
        snprintf(prefix, sizeof prefix, "rank %d:", s);
        parse_ints(o.out, prefix, row, (int)h.experts);
        for (int64_t e = 0; e < h.experts; e++)
            cr_assert_eq(row[e], layout[s][e], "layout[%d][%" PRId64 "]", s, e);

        const char *line = find_line(o.out, prefix);
        const char *p = strstr(line, "| send");
        cr_assert(p && p < strchr(line, '\n'), "%s", line);
        p += strlen("| send");
        for (int d = 0; d < R; d++) {
            char *end;
            int64_t value = strtoll(p, &end, 10);
            cr_assert_neq(end, p);
            cr_assert_eq(value, send[s][d], "send[%d][%d]: printed %" PRId64
                         ", the library's layout gives %" PRId64, s, d, value, send[s][d]);
            p = end;
        }

        int64_t got[1];
        snprintf(prefix, sizeof prefix, "rank %d received", s);
        parse_ints(o.out, prefix, got, 1);
        cr_assert_eq(got[0], received[s], "rows received by rank %d", s);
    }
    int64_t total[1];
    parse_ints(o.out, "rows arrived:", total, 1);
    cr_assert_eq(total[0], h.tokens * h.top_k);
    cr_assert_not_null(strstr(o.out, "at the owner of its expert"));
    free(ids);
    free_layer(&l);
}

Test(examples, expert_ffn_row_matches_library, .timeout = TEST_TIMEOUT_S)
{
    struct outcome o;
    run_example_ok(&o, "04_expert_ffn", NULL);
    struct header h = parse_header(o.out);
    h.tokens = h.rows;
    h.experts = h.top_k = 1;
    struct layer l;
    make_layer(&l, &h);
    int64_t M = h.rows, H = h.hidden, F = h.ffn;
    float *scratch = malloc((size_t)moe_expert_scratch_floats(M, F) * sizeof(float));
    float *y_blas = malloc((size_t)(M * H) * sizeof(float));
    float *y_loop = malloc((size_t)(M * H) * sizeof(float));
    cr_assert(scratch && y_blas && y_loop);
    moe_blas_init();
    moe_expert_forward(l.x, M, H, F, l.weights.w1, l.weights.w3, l.weights.w2, scratch,
                       y_blas);
    moe_expert_forward_loop(l.x, M, H, F, l.weights.w1, l.weights.w3, l.weights.w2, y_loop);

    /* The OpenBLAS values come from the same call. The example's loop adds
     * the same products in the same order as moe_expert_forward_loop(), and
     * no fast-math flag lets the compiler reorder them. So both rows match
     * bit for bit. */
    float printed_blas[4], printed_loop[4];
    parse_floats(o.out, "OpenBLAS", printed_blas, 4);
    parse_floats(o.out, "loops", printed_loop, 4);
    expect_bitwise_equal(printed_blas, y_blas, 4, "OpenBLAS row 0");
    expect_bitwise_equal(printed_loop, y_loop, 4, "loop row 0");

    const char *line = find_line(o.out, "relative to max|y|:");
    double ratio, tolerance;
    cr_assert_eq(sscanf(line, "relative to max|y|: %lf, tolerance %lf", &ratio, &tolerance),
                 2, "%s", line);
    cr_assert_leq(ratio, tolerance, "%s", line);
    cr_assert_not_null(strstr(line, "within tolerance"), "%s", line);
    free(scratch);
    free(y_blas);
    free(y_loop);
    free_layer(&l);
}

Test(examples, combine_matches_golden_output, .timeout = TEST_TIMEOUT_S)
{
    struct outcome o;
    run_example_ok(&o, "05_combine", NULL);
    struct header h = parse_header(o.out);
    struct layer l;
    make_layer(&l, &h);
    float *golden = malloc((size_t)(h.tokens * h.hidden) * sizeof(float));
    cr_assert_not_null(golden);
    struct moe_golden_info info = {0};
    moe_blas_init();
    cr_assert_eq(moe_golden_forward(&l.weights, l.x, golden, &info), 0);

    /* The written-out sum is out[0][0], and each term names its expert. */
    float sum[1];
    parse_floats(o.out, "= ", sum, 1);
    expect_bitwise_equal(sum, golden, 1, "printed out[0][0]");
    const char *p = strstr(o.out, "out[0][0] =");
    cr_assert_not_null(p);
    for (int64_t k = 0; k < h.top_k; k++) {
        p = strstr(p, "(expert ");
        cr_assert_not_null(p, "term %" PRId64 " is missing", k);
        int expert = atoi(p + strlen("(expert "));
        cr_assert_eq(expert, info.expert_ids[k], "slot %" PRId64, k);
        p++;
    }
    cr_assert_not_null(strstr(o.out, "bitwise equal to the golden output"));
    moe_golden_info_free(&info);
    free(golden);
    free_layer(&l);
}

Test(examples, golden_check_reports_corrupted_index, .timeout = TEST_TIMEOUT_S)
{
    struct outcome o;
    run_example_ok(&o, "06_golden_check", NULL);
    struct header h = parse_header(o.out);
    cr_assert(h.tokens > 0 && h.hidden > 0, "%s", o.out);
    cr_assert_not_null(strstr(o.out, "ranks against the golden path: bitwise equal"));

    /* An index the example cannot know in advance. */
    int64_t values = h.tokens * h.hidden;
    int64_t index = ((int64_t)getpid() * 7919 + time(NULL)) % values;
    char text[32];
    snprintf(text, sizeof text, "%" PRId64, index);
    run_example_ok(&o, "06_golden_check", (const char *[]){text, NULL});
    const char *line = find_line(o.out, "check after the corruption:");
    int64_t mismatches = -1, first = -1;
    cr_assert_eq(sscanf(line, "check after the corruption: %" SCNd64
                        " value(s) differ; first at index %" SCNd64,
                        &mismatches, &first), 2, "%s", line);
    cr_assert_eq(mismatches, 1, "%s", line);
    cr_assert_eq(first, index, "corrupted %" PRId64 ", reported %" PRId64, index, first);

    snprintf(text, sizeof text, "%" PRId64, values);
    const char *bad[] = {text, "-1", "12x", ""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        run_example(&o, "06_golden_check", (const char *[]){bad[i], NULL});
        cr_assert_eq(o.status, 2, "INDEX '%s': status %d", bad[i], o.status);
        cr_assert_not_null(strstr(o.err, "invalid INDEX"), "%s", o.err);
    }
}

Test(examples, imbalance_counts_match_library, .timeout = TEST_TIMEOUT_S)
{
    struct outcome o;
    run_example_ok(&o, "07_imbalance_stall", NULL);
    struct header h = parse_header(o.out);
    cr_assert(h.ranks > 0 && h.experts <= 64, "%s", o.out);
    int runs = 0;
    for (const char *block = strstr(o.out, "\nskew "); block;
         block = strstr(block + 1, "\nskew ")) {
        double skew;
        cr_assert_eq(sscanf(block, "\nskew %lf (seed %" SCNd64 "):", &skew, &h.seed), 2);
        struct layer l;
        make_layer(&l, &h);
        if (skew > 0.0) {
            /* moe-ep run --skew S adds -S * ln(e + 1) to expert e's logits. */
            l.weights.gate_bias = malloc((size_t)h.experts * sizeof(float));
            cr_assert_not_null(l.weights.gate_bias);
            for (int64_t e = 0; e < h.experts; e++)
                l.weights.gate_bias[e] = (float)(-skew * log((double)(e + 1)));
        }
        float *out = malloc((size_t)(h.tokens * h.hidden) * sizeof(float));
        struct moe_golden_info info = {0};
        cr_assert_not_null(out);
        moe_blas_init();
        cr_assert_eq(moe_golden_forward(&l.weights, l.x, out, &info), 0);

        int64_t printed[64];
        parse_ints(block, "tokens per expert:", printed, (int)h.experts);
        for (int64_t e = 0; e < h.experts; e++)
            cr_assert_eq(printed[e], info.tokens_per_expert[e], "skew %g, expert %" PRId64
                         ": printed %" PRId64 " tokens, the library routes %" PRId64, skew,
                         e, printed[e], info.tokens_per_expert[e]);
        for (int r = 0; r < h.ranks; r++) {
            char prefix[32];
            int64_t first, count, rows = 0;
            moe_block_range(h.experts, (int)h.ranks, r, &first, &count);
            for (int64_t e = first; e < first + count; e++)
                rows += info.tokens_per_expert[e];
            snprintf(prefix, sizeof prefix, "rank %d:", r);
            const char *line = find_line(block, prefix);
            const char *at = strstr(line, "rows computed");
            cr_assert(at && at < strchr(line, '\n'), "%s", line);
            cr_assert_eq(strtoll(at + strlen("rows computed"), NULL, 10), rows,
                         "skew %g, rank %d", skew, r);
        }
        cr_assert_not_null(strstr(find_line(block, "golden check:"), "bitwise equal"));
        moe_golden_info_free(&info);
        free(out);
        free_layer(&l);
        runs++;
    }
    cr_assert_eq(runs, 2, "expected a balanced and a skewed run:\n%s", o.out);
}

/* Checks one drop policy's block of 08 against the golden path. */
static void check_drops(const char *block, const struct header *h, int64_t capacity,
                        enum moe_drop_policy policy)
{
    struct layer l;
    make_layer(&l, h);
    l.weights.capacity = (struct moe_capacity){.limit = capacity, .policy = policy};
    float *out = malloc((size_t)(h->tokens * h->hidden) * sizeof(float));
    struct moe_golden_info info = {0};
    cr_assert_not_null(out);
    moe_blas_init();
    cr_assert_eq(moe_golden_forward(&l.weights, l.x, out, &info), 0);
    int64_t K = h->top_k;

    for (int64_t e = 0; e < h->experts; e++) {
        char prefix[64];
        int64_t counts[3];
        snprintf(prefix, sizeof prefix, "expert %" PRId64 ": routed", e);
        const char *line = find_line(block, prefix);
        cr_assert_eq(sscanf(line + strlen(prefix), " %" SCNd64 ", kept %" SCNd64
                            ", dropped %" SCNd64, &counts[0], &counts[1], &counts[2]), 3);
        cr_assert_eq(counts[0], info.tokens_per_expert[e], "expert %" PRId64 ": printed %"
                     PRId64 " routed, the library %" PRId64, e, counts[0],
                     info.tokens_per_expert[e]);
        cr_assert_eq(counts[2], info.dropped_per_expert[e], "expert %" PRId64 ": printed %"
                     PRId64 " dropped, the library %" PRId64, e, counts[2],
                     info.dropped_per_expert[e]);
        cr_assert_eq(counts[0] - counts[2], counts[1], "expert %" PRId64, e);
        cr_assert_leq(counts[1], capacity, "expert %" PRId64 " kept more than capacity", e);
    }

    /* The printed drops, "token:weight->expert", in the library's order. */
    const char *p = find_line(block, "dropped (") + strlen("dropped (token:weight->expert):");
    for (int64_t i = 0; i < h->tokens * K; i++) {
        if (info.kept[i])
            continue;
        int token = -1, expert = -1;
        float weight;
        int used = 0;
        cr_assert_eq(sscanf(p, " %d:%f->%d%n", &token, &weight, &expert, &used), 3,
                     "drop of assignment %" PRId64 " not printed: %s", i, p);
        cr_assert_eq(token, i / K, "drop printed for token %d, the library drops token %"
                     PRId64, token, i / K);
        cr_assert_eq(expert, info.expert_ids[i], "token %d: dropped expert %d, the library "
                     "drops expert %d", token, expert, info.expert_ids[i]);
        p += used;
    }
    cr_assert_eq(*p, '\n', "more drops printed than the library makes: %s", p);

    /* The policy's rule, on the library's decision: position drops only
     * assignments after the expert's first `capacity` in token order, and
     * probs never keeps a lower weight while dropping a higher one. */
    for (int64_t i = 0; i < h->tokens * K; i++) {
        if (info.kept[i])
            continue;
        int64_t earlier = 0;
        for (int64_t j = 0; j < h->tokens * K; j++) {
            if (info.expert_ids[j] != info.expert_ids[i])
                continue;
            earlier += j < i;
            if (policy == MOE_DROP_PROBS && info.kept[j])
                cr_assert_geq(info.weights[j], info.weights[i]);
        }
        if (policy == MOE_DROP_POSITION)
            cr_assert_geq(earlier, capacity, "assignment %" PRId64, i);
    }
    cr_assert_not_null(strstr(find_line(block, "on "), "the same assignments dropped"));
    moe_golden_info_free(&info);
    free(out);
    free_layer(&l);
}

Test(examples, capacity_drops_match_library, .timeout = TEST_TIMEOUT_S)
{
    struct outcome o;
    run_example_ok(&o, "08_capacity_dropping", NULL);
    struct header h = parse_header(o.out);
    const char *line = find_line(o.out, "capacity = ceil(");
    double factor;
    int64_t capacity;
    cr_assert_eq(sscanf(line, "capacity = ceil(%lf", &factor), 1, "%s", line);
    const char *at = strstr(line, ") = ");
    cr_assert_not_null(at);
    capacity = strtoll(at + strlen(") = "), NULL, 10);
    cr_assert_eq(capacity, moe_capacity_from_factor(factor, 0, h.tokens, h.top_k, h.experts));

    const char *position = strstr(o.out, "drop policy position:");
    const char *probs = strstr(o.out, "drop policy probs:");
    cr_assert(position && probs && position < probs, "%s", o.out);
    check_drops(position, &h, capacity, MOE_DROP_POSITION);
    check_drops(probs, &h, capacity, MOE_DROP_PROBS);
}

Test(examples, load_layer_matches_reference, .timeout = TEST_TIMEOUT_S)
{
    const char *layers[] = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3",
                            "switch_transformers"};
    for (size_t i = 0; i < sizeof layers / sizeof layers[0]; i++) {
        char dir[64];
        snprintf(dir, sizeof dir, "data/layers/%s", layers[i]);
        struct outcome o;
        run_example_ok(&o, "09_load_layer", (const char *[]){dir, NULL});
        cr_assert_not_null(strstr(o.out, "top-k ids: equal to"), "%s: %s", dir, o.out);
        cr_assert_not_null(strstr(o.out, "every value within"), "%s: %s", dir, o.out);
        const char *line = find_line(o.out, "output: max");
        const char *at = strstr(line, "ratio ");
        cr_assert_not_null(at);
        /* The per-value bound is 1e-5 |ref| + 1e-5 max|ref|, at most 2e-5
         * of max|ref|. */
        cr_assert_lt(strtod(at + strlen("ratio "), NULL), 2e-5, "%s: %s", dir, line);
    }
}

/* A copy of the mixtral layer whose reference output has one value moved
 * by 1e-3 of max|ref|, 50 times the tolerance, must fail. */
Test(examples, load_layer_catches_changed_reference, .timeout = TEST_TIMEOUT_S)
{
    const char *files[] = {"config.json", "model.safetensors", "tokens.npy",
                           "expected_topk_ids.npy"};
    char dir[64], source[PATH_MAX + 64], target[PATH_MAX + 64], cwd[PATH_MAX];
    cr_assert_not_null(getcwd(cwd, sizeof cwd));
    make_temp_dir(dir, sizeof dir);
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        snprintf(source, sizeof source, "%s/data/layers/mixtral/%s", cwd, files[i]);
        snprintf(target, sizeof target, "%s/%s", dir, files[i]);
        cr_assert_eq(symlink(source, target), 0, "%s: %s", target, strerror(errno));
    }
    struct moe_npy_array expected;
    snprintf(source, sizeof source, "data/layers/mixtral/expected_output.npy");
    cr_assert_eq(moe_npy_read(source, 1 << 30, &expected), 0);
    cr_assert_eq(expected.dtype, MOE_NPY_F64);
    double *values = expected.data, scale = 0.0;
    for (int64_t i = 0; i < expected.count; i++)
        scale = fmax(scale, fabs(values[i]));
    int64_t changed = expected.count / 3;
    values[changed] += 1e-3 * scale;
    snprintf(target, sizeof target, "%s/expected_output.npy", dir);
    cr_assert_eq(moe_npy_write(target, MOE_NPY_F64, expected.ndim, expected.shape, values), 0);
    moe_npy_array_free(&expected);

    struct outcome o;
    run_example(&o, "09_load_layer", (const char *[]){dir, NULL});
    char needle[64];
    snprintf(needle, sizeof needle, "FAILED: output value %" PRId64 " ", changed);
    cr_assert_eq(o.status, 1, "status %d: %s %s", o.status, o.out, o.err);
    cr_assert_not_null(strstr(o.out, needle), "%s", o.out);

    run_example(&o, "09_load_layer", (const char *[]){"/nonexistent/layer", NULL});
    cr_assert_eq(o.status, 2, "status %d", o.status);
    cr_assert_not_null(strstr(o.err, "invalid DIR '/nonexistent/layer'"), "%s", o.err);
    remove_tree(dir);
}

/* The examples that take no argument reject one with status 2. */
Test(examples, extra_argument_exits_2, .timeout = TEST_TIMEOUT_S)
{
    static const char *const names[] = {
        "01_routing", "02_ring_two_processes", "03_layout_alltoall", "04_expert_ffn",
        "05_combine", "07_imbalance_stall", "08_capacity_dropping",
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        struct outcome o;
        run_example(&o, names[i], (const char *const[]){"--bogus", NULL});
        cr_expect_eq(o.status, 2, "%s --bogus: status %d", names[i], o.status);
        cr_expect_not_null(strstr(o.err, "invalid argument '--bogus'"), "%s: %s", names[i],
                           o.err);
    }
}
