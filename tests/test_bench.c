/*
 * test_bench.c - `moe-ep bench` option parsing, the helpers behind its
 * figures, and a --quick run end to end: the report has every section, the
 * Markdown file gets the same text, and no segment or temporary file is
 * left behind. It checks no figure's value, because those depend on the
 * machine.
 *
 * The --peers tests run the peers that this machine has, and stand-in
 * programs for a missing or a broken one: a shell script in place of the
 * Python or of mpirun.
 */
#include "test_util.h"

#include "moe_bench.h"
#include "moe_bench_internal.h"
#include "moe_bench_peers.h"
#include "moe_error.h"
#include "moe_transport.h"

#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Parses a NULL-terminated argument list into `o`, starting from the
 * defaults. */
static int parse(struct moe_bench_options *o, const char *first, ...)
{
    char *argv[32];
    int argc = 0;
    va_list args;
    va_start(args, first);
    for (const char *a = first; a && argc < 32; a = va_arg(args, const char *))
        argv[argc++] = (char *)a;
    va_end(args);
    moe_bench_options_default(o);
    return moe_bench_parse(o, argc, argv);
}

Test(bench_parse, defaults_match_prefill_shape)
{
    struct moe_bench_options o;
    cr_assert_eq(parse(&o, NULL), 0);
    cr_expect_eq(o.ranks, 2);
    cr_expect_eq(o.tokens, 4096);
    cr_expect_eq(o.hidden, 1024);
    cr_expect_eq(o.ffn, 1024);
    cr_expect_eq(o.experts, 16);
    cr_expect_eq(o.top_k, 2);
    cr_expect_eq(o.repeats, 5);
    cr_expect_eq(o.ring_bytes, 1 << 20);
    cr_expect_null(o.markdown_path);
    cr_expect_eq(o.quick, 0);
}

Test(bench_parse, every_flag)
{
    struct moe_bench_options o;
    cr_assert_eq(parse(&o, "--ranks", "3", "--tokens", "100", "--hidden", "64",
                       "--ffn", "96", "--experts", "5", "--top-k", "3",
                       "--repeats", "7", "--ring-size", "1M", "--markdown",
                       "out.md", NULL), 0, "%s", moe_error_message());
    cr_expect_eq(o.ranks, 3);
    cr_expect_eq(o.tokens, 100);
    cr_expect_eq(o.hidden, 64);
    cr_expect_eq(o.ffn, 96);
    cr_expect_eq(o.experts, 5);
    cr_expect_eq(o.top_k, 3);
    cr_expect_eq(o.repeats, 7);
    cr_expect_eq(o.ring_bytes, 1 << 20);
    cr_expect_str_eq(o.markdown_path, "out.md");
}

Test(bench_parse, quick_keeps_given_flags)
{
    struct moe_bench_options o;
    cr_assert_eq(parse(&o, "--hidden", "128", "--quick", NULL), 0);
    cr_expect_eq(o.quick, 1);
    cr_expect_eq(o.hidden, 128, "--hidden given before --quick must stay");
    cr_expect_lt(o.tokens, 4096, "--quick must shrink the tokens");
    cr_expect_lt(o.ffn, 1024, "--quick must shrink the ffn size");
    cr_expect_lt(o.repeats, 5, "--quick must run fewer repeats");
}

Test(bench_parse, help)
{
    struct moe_bench_options o;
    cr_expect_eq(parse(&o, "--help", NULL), 1);
    cr_expect_eq(parse(&o, "-h", NULL), 1);
}

/* Asserts that parsing fails with -EINVAL and a message containing each
 * of the `parts`. */
static void expect_rejected(const char *flag, const char *value,
                            const char *part1, const char *part2)
{
    struct moe_bench_options o;
    moe_error_clear();
    int rc = value ? parse(&o, flag, value, NULL) : parse(&o, flag, NULL);
    cr_assert_eq(rc, -EINVAL, "%s %s: expected -EINVAL, got %d", flag,
                 value ? value : "", rc);
    const char *message = moe_error_message();
    cr_expect(strstr(message, part1) != NULL, "message '%s' lacks '%s'",
              message, part1);
    if (part2)
        cr_expect(strstr(message, part2) != NULL, "message '%s' lacks '%s'",
                  message, part2);
}

Test(bench_parse, invalid_values_name_flag_and_value)
{
    expect_rejected("--ranks", "0", "--ranks", "'0'");
    expect_rejected("--ranks", "65", "--ranks", "'65'");
    expect_rejected("--tokens", "12x", "--tokens", "'12x'");
    expect_rejected("--hidden", "-1", "--hidden", "'-1'");
    expect_rejected("--ffn", "", "--ffn", "''");
    expect_rejected("--experts", "0", "--experts", "'0'");
    expect_rejected("--top-k", "0", "--top-k", "'0'");
    expect_rejected("--repeats", "0", "--repeats", "'0'");
    expect_rejected("--repeats", "51", "--repeats", "'51'");
    expect_rejected("--ring-size", "1000", "--ring-size", "power of two");
    expect_rejected("--ring-size", "32", "--ring-size", "'32'");
    expect_rejected("--markdown", "", "--markdown", "file name");
    expect_rejected("--top-k", "17", "--top-k", "--experts 16");
}

Test(bench_parse, invalid_usage)
{
    expect_rejected("--tokens", NULL, "missing value", "--tokens");
    expect_rejected("--bogus", "1", "unknown option", "--bogus");
    expect_rejected("tokens", NULL, "unexpected argument", "'tokens'");
}

Test(bench_helpers, median_of_odd_and_even_counts)
{
    double odd[] = {5, 1, 3};
    double even[] = {4, 1, 3, 2};
    cr_expect_eq(moe_bench_median(odd, 3), 3.0);
    cr_expect_eq(moe_bench_median(even, 4), 2.5);
    double values[] = {2, 0.5, 7};
    cr_expect_eq(moe_bench_min(values, 3), 0.5);
}

Test(bench_helpers, format_bytes)
{
    char buf[32];
    moe_bench_format_bytes(4096, buf, sizeof buf);
    cr_expect_str_eq(buf, "4 KiB");
    moe_bench_format_bytes(4 << 20, buf, sizeof buf);
    cr_expect_str_eq(buf, "4 MiB");
    moe_bench_format_bytes(1536, buf, sizeof buf);
    cr_expect_str_eq(buf, "1536 B");
    moe_bench_format_bytes(4, buf, sizeof buf);
    cr_expect_str_eq(buf, "4 B");
}

Test(bench_helpers, evict_keeps_contents)
{
    /* Eviction writes dirty lines back before it drops them, so the bytes
     * stay; the buffer starts and ends off a cache line boundary. */
    enum { BYTES = 10000 };
    uint8_t *buffer = malloc(BYTES);
    cr_assert_not_null(buffer);
    for (int i = 0; i < BYTES; i++)
        buffer[i] = (uint8_t)(i * 7 + 3);
    int evicted = moe_bench_evict(buffer + 5, BYTES - 13);
#if defined(__x86_64__) || defined(__i386__)
    cr_expect_eq(evicted, 1, "x86 has clflush, yet nothing was evicted");
#else
    cr_expect_eq(evicted, 0);
#endif
    for (int i = 0; i < BYTES; i++)
        cr_assert_eq(buffer[i], (uint8_t)(i * 7 + 3), "byte %d changed", i);
    free(buffer);
}

static char *read_all(FILE *f, size_t *bytes)
{
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    cr_assert_geq(size, 0);
    rewind(f);
    char *text = malloc((size_t)size + 1);
    cr_assert_not_null(text);
    *bytes = fread(text, 1, (size_t)size, f);
    text[*bytes] = '\0';
    return text;
}

/* ---- the figures of the report ------------------------------------------- */

/* Returns the row of the section under `heading` whose first cell is
 * `first`, or NULL. The section ends at the next heading of level 2. */
static const char *find_row(const char *text, const char *heading, const char *first)
{
    const char *section = strstr(text, heading);
    if (!section)
        return NULL;
    const char *end = strstr(section + strlen(heading), "\n## ");
    char prefix[96];
    snprintf(prefix, sizeof prefix, "\n| %s |", first);
    const char *row = strstr(section, prefix);
    if (!row || (end && row > end))
        return NULL;
    return row + 1;
}

/* Parses the cells of the table row `line` into cells[0..max): the number
 * that each cell starts with, or NAN. Returns the number of cells. */
static int row_cells(const char *line, double *cells, int max)
{
    int count = 0;
    const char *bar = line;
    const char *end = strchr(line, '\n');
    for (;;) {
        const char *next = strchr(bar + 1, '|');
        if (!next || (end && next > end) || count == max)
            return count;
        char *parsed;
        double value = strtod(bar + 1, &parsed);
        cells[count++] = parsed == bar + 1 ? NAN : value;
        bar = next;
    }
}

/* Returns the cells of the row that find_row() finds, asserting that it
 * exists and has `expected` cells. */
static void expect_row(const char *text, const char *heading, const char *first,
                       double *cells, int expected)
{
    const char *row = find_row(text, heading, first);
    cr_assert_not_null(row, "no row '%s' under '%s'", first, heading);
    int count = row_cells(row, cells, expected + 1);
    cr_assert_eq(count, expected, "row '%s' under '%s' has %d cells, expected %d",
                 first, heading, count, expected);
}

/* Asserts that `ratio` is value / floor, all three printed with 2
 * decimals: it lies between the ratios of the values that round to the
 * printed ones, widened by its own rounding. */
static void expect_ratio(double ratio, double value, double floor, const char *figure)
{
    const double half = 0.005;
    cr_expect_gt(value, 0, "%s: value %g is not positive", figure, value);
    cr_expect_gt(floor, 0, "%s: floor %g is not positive", figure, floor);
    double low = (value - half) / (floor + half) - half;
    double high = floor > half ? (value + half) / (floor - half) + half : INFINITY;
    cr_expect(ratio >= low && ratio <= high, "%s: ratio %.2f is not %.2f / %.2f "
              "(expected %.3f to %.3f)", figure, ratio, value, floor, low, high);
}

/* Returns the number printed after `label` in text, or NAN. */
static double number_after(const char *text, const char *label)
{
    const char *at = strstr(text, label);
    return at ? strtod(at + strlen(label), NULL) : NAN;
}

/* Checks the streaming-read floor and the decode table of a --quick report
 * with E experts and top-k K. */
static void check_decode(const char *report, int64_t experts, int64_t top_k)
{
    double cells[16];
    expect_row(report, "### Streaming read", "1 process", cells, 4);
    cr_expect_gt(cells[2], 0, "1-process read rate %g", cells[2]);
    double read_gbps = number_after(report, "The machine read rate is the highest "
                                            "best all-core rate, **");
    cr_assert(read_gbps > 0, "no machine read rate in the report");

    static const char *const per_rank[] = {"1", "4", "8"};
    for (int i = 0; i < 3; i++) {
        expect_row(report, "## Decode", per_rank[i], cells, 13);
        double tokens = 2 * cells[0];
        double touched = cells[1], mib = cells[2], floor_ms = cells[3];
        cr_expect(touched >= 1 && touched <= experts && touched <= tokens * top_k,
                  "decode %s: %g touched experts", per_rank[i], touched);
        /* The floor is the touched bytes at the machine rate. The MiB are
         * printed with 1 decimal and the floor with 2, hence the tolerance
         * of 5% + 0.01 ms. */
        double expected_ms = mib * 1048576.0 / (read_gbps * 1e9) * 1e3;
        cr_expect(fabs(floor_ms - expected_ms) <= 0.05 * expected_ms + 0.01,
                  "decode %s: floor %.2f ms, but %.1f MiB at %.1f GB/s take "
                  "%.3f ms", per_rank[i], floor_ms, mib, read_gbps, expected_ms);
        cr_expect_geq(cells[5], cells[4], "decode %s: median below best", per_rank[i]);
        expect_ratio(cells[6], cells[4], floor_ms, "decode best / floor");
        expect_ratio(cells[7], cells[5], floor_ms, "decode median / floor");
        cr_expect_gt(cells[8], 0, "decode %s: compute %g ms", per_rank[i], cells[8]);
        cr_expect_gt(cells[9], 0, "decode %s: cached %g ms", per_rank[i], cells[9]);
        cr_expect_leq(cells[10], mib, "decode %s: the busiest rank reads more "
                      "than all ranks", per_rank[i]);
        expect_ratio(cells[12], cells[11], floor_ms, "decode alone / floor");
    }

    /* The targets repeat the decode rows as "R x (best ms / floor ms)". */
    const char *target = strstr(report, "| decode: best forward, 2 ranks, 1 token per rank");
    cr_assert_not_null(target, "no decode target");
    const char *measured = strchr(target + 2, '|');
    double ratio, best, floor_ms;
    cr_assert_eq(sscanf(measured, "| %lf x (%lf ms / %lf ms)", &ratio, &best,
                        &floor_ms), 3, "decode target: '%.60s'", measured);
    expect_ratio(ratio, best, floor_ms, "decode target");
}

/* Checks the two scaling tables of a --quick report of `tokens` tokens:
 * each ratio divides by the larger floor, and the 16-token row is the
 * decode row of 8 tokens per rank, measured once. */
static void check_scaling(const char *report, int64_t tokens)
{
    double cells[16];
    static const int64_t batch[] = {1, 4, 16, 64, 256, 1024};
    for (size_t i = 0; i < sizeof batch / sizeof batch[0]; i++) {
        if (batch[i] > 2 * tokens)
            continue;
        char first[32];
        snprintf(first, sizeof first, "%" PRId64, batch[i]);
        expect_row(report, "## Scaling", first, cells, 9);
        double floor_ms = cells[2] > cells[3] ? cells[2] : cells[3];
        expect_ratio(cells[6], cells[4], floor_ms, "scaling best / floor");
        expect_ratio(cells[7], cells[5], floor_ms, "scaling median / floor");
        double per_token_us = 1e3 * cells[4] / (double)batch[i];
        cr_expect(fabs(cells[8] - per_token_us) <= 5.0 / (double)batch[i] + 0.005,
                  "%s tokens: %.2f us per token, but %.2f ms / %s tokens",
                  first, cells[8], cells[4], first);
    }

    double decode[16];
    expect_row(report, "## Decode", "8", decode, 13);
    expect_row(report, "## Scaling", "16", cells, 9);
    cr_expect_eq(decode[4], cells[4], "the 16-token forward: %.2f ms in the "
                 "decode table, %.2f in the scaling table", decode[4], cells[4]);

    cr_expect(strstr(report, "Above the decode regime, from ") ||
              strstr(report, "Fewer than two rows of the tokens table"),
              "the scaling section lacks the sentence on linear growth");

    const char *ranks_table = strstr(report, "| ranks | touched experts");
    cr_assert_not_null(ranks_table, "no scaling table over ranks");
    static const char *const ranks[] = {"1", "2", "4", "8"};
    for (int i = 0; i < 4; i++) {
        expect_row(ranks_table, "| ranks", ranks[i], cells, 9);
        double floor_ms = cells[2] > cells[3] ? cells[2] : cells[3];
        expect_ratio(cells[6], cells[4], floor_ms, "scaling over ranks");
    }
}

/* Checks the moe_alltoallv_direct rows: a positive rate, and a memcpy
 * ratio that divides it by the memcpy column. */
static void check_direct(const char *report)
{
    static const char *const sizes[] = {"4 KiB", "64 KiB", "1 MiB", "4 MiB"};
    for (int ranks = 2; ranks <= 4; ranks += 2) {
        for (int i = 0; i < 4; i++) {
            char first[64];
            snprintf(first, sizeof first, "%d | `moe_alltoallv_direct` | %s",
                     ranks, sizes[i]);
            double cells[16];
            expect_row(report, "## All-to-all", first, cells, 10);
            double gbps = cells[6], memcpy_gbps = cells[8], percent = cells[9];
            cr_expect_gt(gbps, 0, "%s: %g GB/s", first, gbps);
            /* Percent with no decimals, GB/s with 2 and memcpy with 1. */
            double expected = 100 * gbps / memcpy_gbps;
            cr_expect(fabs(percent - expected) <= 0.5 + 0.01 * expected,
                      "%s: %.0f%% of memcpy, but %.2f / %.1f GB/s is %.1f%%",
                      first, percent, gbps, memcpy_gbps, expected);
        }
    }
}

Test(bench_run, quick_report_and_markdown, .timeout = 60)
{
    char path[] = "/tmp/moe-ep-bench-test-XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    close(fd);

    struct moe_bench_options o;
    cr_assert_eq(parse(&o, "--quick", "--markdown", path, NULL), 0);
    FILE *out = tmpfile();
    cr_assert_not_null(out);
    int rc = moe_bench(&o, out);
    cr_assert_eq(rc, 0, "moe_bench failed: %s", moe_error_message());

    size_t out_bytes, file_bytes;
    char *printed = read_all(out, &out_bytes);
    FILE *file = fopen(path, "r");
    cr_assert_not_null(file, "the report was not written to %s", path);
    char *written = read_all(file, &file_bytes);
    fclose(file);
    fclose(out);

    static const char *const sections[] = {
        "# moe-ep benchmarks", "## Targets", "## Machine", "## Floors",
        "### memcpy", "### Streaming read", "## Forward", "## Decode",
        "## Scaling", "## All-to-all", "1 token", "`moe_alltoallv_direct`",
        "| direct (default) | ", "| direct, overlap off | ", "| rings | ",
    };
    for (size_t i = 0; i < sizeof sections / sizeof sections[0]; i++)
        cr_expect(strstr(printed, sections[i]) != NULL,
                  "the report lacks '%s'", sections[i]);
    check_decode(printed, o.experts, o.top_k);
    check_scaling(printed, o.tokens);
    check_direct(printed);
    /* Each exchange's best forward is positive, and the default's ratio to
     * itself is 1. */
    static const char *const exchanges[] = {"| direct (default) | ",
                                            "| direct, overlap off | ", "| rings | "};
    for (int i = 0; i < 3; i++) {
        const char *row = strstr(printed, exchanges[i]);
        double best = 0, median = 0, ratio = 0;
        cr_assert_not_null(row, "no row '%s'", exchanges[i]);
        cr_assert_eq(sscanf(row + strlen(exchanges[i]), "%lf | %lf | %lf", &best, &median,
                            &ratio), 3, "row '%s' does not parse", exchanges[i]);
        cr_expect(best > 0 && median >= best, "%s best %g, median %g", exchanges[i],
                  best, median);
        if (i == 0)
            cr_expect_float_eq(ratio, 1.0, 1e-9, "the default's ratio is %g", ratio);
    }
    cr_expect_eq(out_bytes, file_bytes, "stdout has %zu bytes, the file %zu",
                 out_bytes, file_bytes);
    cr_expect(memcmp(printed, written, out_bytes) == 0,
              "the file differs from the printed report");

    char tmp[sizeof path + 8];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    cr_expect_neq(access(tmp, F_OK), 0, "%s was left behind", tmp);
    free(printed);
    free(written);
    unlink(path);
}

Test(bench_parse, unwritable_markdown_rejected)
{
    /* A --markdown path in a missing directory is bad input, found before
     * any measurement runs. */
    struct moe_bench_options o;
    int rc = parse(&o, "--quick", "--markdown", "/nonexistent-dir/report.md", NULL);
    cr_expect_eq(rc, -EINVAL);
    cr_expect(strstr(moe_error_message(), "/nonexistent-dir/report.md") != NULL,
              "message '%s' lacks the path", moe_error_message());
    cr_expect(strstr(moe_error_message(), "--markdown") != NULL,
              "message '%s' lacks the flag", moe_error_message());
}

/* ---- --peers ------------------------------------------------------------ */

Test(bench_parse, peer_flags)
{
    char script[] = "/tmp/moe-ep-peer-flag-XXXXXX";
    int fd = mkstemp(script);
    cr_assert_geq(fd, 0);
    close(fd);

    struct moe_bench_options o;
    cr_assert_eq(parse(&o, "--peers", "--torch-script", script, NULL), 0, "%s",
                 moe_error_message());
    cr_expect_eq(o.peers, 1);
    cr_expect_str_eq(o.torch_script, script);
    cr_expect_eq(o.alltoall_json, 0);
    cr_assert_eq(parse(&o, "--transport", "mpi", "--alltoall-json", NULL), 0, "%s",
                 moe_error_message());
    cr_expect_eq(o.alltoall_json, 1);
    cr_expect_eq(o.peers, 0);
    unlink(script);
}

Test(bench_parse, peer_flags_rejected)
{
    static const struct {
        const char *args[8];
        const char *expected; /* text the message must contain */
    } cases[] = {
        {{"--alltoall-json"}, "invalid --alltoall-json without --transport mpi"},
        {{"--peers", "--transport", "mpi"}, "invalid --peers with --transport mpi"},
        {{"--transport", "mpi", "--alltoall-json", "--markdown", "/tmp/moe-ep.md"},
         "invalid --markdown with --alltoall-json"},
        {{"--peers", "--torch-script", "/nonexistent/torch_ep.py"},
         "invalid --torch-script file '/nonexistent/torch_ep.py'"},
        {{"--peers", "--torch-script", "/tmp"}, "not a regular file"},
        {{"--peers", "--torch-script", ""}, "invalid --torch-script value ''"},
        {{"--peers", "--torch-script"}, "missing value for --torch-script"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *const *a = cases[i].args;
        struct moe_bench_options o;
        moe_error_clear();
        int rc = parse(&o, a[0], a[1], a[2], a[3], a[4], NULL);
        cr_expect_eq(rc, -EINVAL, "case %zu (%s %s): expected -EINVAL, got %d", i,
                     a[0], a[1] ? a[1] : "", rc);
        cr_expect(strstr(moe_error_message(), cases[i].expected) != NULL,
                  "case %zu: message '%s' lacks '%s'", i, moe_error_message(),
                  cases[i].expected);
    }
}

/* Fills program and script, PATH_MAX bytes each, with this build's moe-ep
 * and the source tree's bench/torch_ep.py, found from this test's own path
 * (BUILD/tests/test_bench). */
static void build_paths(char *program, char *script)
{
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    cr_assert_gt(n, 0);
    self[n] = '\0';
    const char *dir = dirname(self);
    snprintf(program, PATH_MAX, "%s/../moe-ep", dir);
    snprintf(script, PATH_MAX, "%s/../../bench/torch_ep.py", dir);
    cr_assert_eq(access(script, R_OK), 0, "%s is missing", script);
}

/* Writes `body` as an executable shell script to a new file named from
 * `path`, a mkstemp template. */
static void write_shell_script(char *path, const char *body)
{
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0, "mkstemp %s: %s", path, strerror(errno));
    FILE *f = fdopen(fd, "w");
    cr_assert_not_null(f);
    fprintf(f, "#!/bin/sh\n%s", body);
    cr_assert_eq(fchmod(fd, 0700), 0);
    cr_assert_eq(fclose(f), 0);
}

/* Runs the peers alone on `res` and returns the printed section, which the
 * caller frees. */
static char *peers_section(const struct moe_bench_options *o,
                           struct moe_bench_results *res)
{
    cr_assert_eq(moe_bench_measure_peers(o, res), 0, "%s", moe_error_message());
    cr_assert_not_null(res->peers);
    char *text = NULL;
    size_t bytes = 0;
    FILE *out = open_memstream(&text, &bytes);
    cr_assert_not_null(out);
    moe_bench_print_peers(out, o, res);
    fclose(out);
    free(res->peers);
    res->peers = NULL;
    return text;
}

/* Returns the part of `section` that starts at `heading`, up to the next
 * heading of the same level, in a new string. */
static char *subsection(const char *section, const char *heading)
{
    const char *start = strstr(section, heading);
    cr_assert_not_null(start, "no '%s' in:\n%s", heading, section);
    const char *end = strstr(start + 1, "\n### ");
    size_t length = end ? (size_t)(end - start) : strlen(start);
    char *part = strndup(start, length);
    cr_assert_not_null(part);
    return part;
}

Test(bench_peers, missing_peers_are_skipped, .timeout = 60)
{
    char program[PATH_MAX], script[PATH_MAX];
    build_paths(program, script);
    cr_assert_eq(setenv("MOE_EP_PYTHON", "/nonexistent/python3", 1), 0);
    cr_assert_eq(setenv("MOE_EP_MPIRUN", "/nonexistent/mpirun", 1), 0);

    struct moe_bench_options o;
    cr_assert_eq(parse(&o, "--quick", "--peers", "--torch-script", script, NULL), 0);
    o.program_path = program;
    struct moe_bench_results res = {.cores = 2};
    char *section = peers_section(&o, &res);
    char *torch = subsection(section, "### PyTorch EP layer");
    char *mpi = subsection(section, "### Open MPI's MPI_Alltoallv");

    cr_expect(strstr(section, "## Peers") == section, "%s", section);
    cr_expect(strstr(torch, "\n- skipped: the Python /nonexistent/python3 "
                     "(MOE_EP_PYTHON) is not an executable file") != NULL, "%s", torch);
    const char *mpi_reason = moe_transport_mpi_built()
        ? "\n- skipped: MOE_EP_MPIRUN=/nonexistent/mpirun is not an executable file"
        : "\n- skipped: this moe-ep was built without the MPI transport";
    cr_expect(strstr(mpi, mpi_reason) != NULL, "%s", mpi);
    cr_expect_null(strstr(section, "| prefill |"), "a skipped peer has figures");
    free(torch);
    free(mpi);
    free(section);
}

Test(bench_peers, torch_without_gloo_is_skipped, .timeout = 60)
{
    char program[PATH_MAX], script[PATH_MAX], python[] = "/tmp/moe-ep-python-XXXXXX";
    build_paths(program, script);
    write_shell_script(python, "echo 1.13.0 0\n");
    cr_assert_eq(setenv("MOE_EP_PYTHON", python, 1), 0);
    cr_assert_eq(setenv("MOE_EP_MPIRUN", "/nonexistent/mpirun", 1), 0);

    struct moe_bench_options o;
    cr_assert_eq(parse(&o, "--quick", "--peers", "--torch-script", script, NULL), 0);
    struct moe_bench_results res = {.cores = 2};
    char *section = peers_section(&o, &res);
    char *torch = subsection(section, "### PyTorch EP layer");
    cr_expect(strstr(torch, "- skipped: torch under ") != NULL, "%s", torch);
    cr_expect(strstr(torch, "has no gloo backend") != NULL, "%s", torch);
    free(torch);
    free(section);
    unlink(python);
}

/* A peer that runs but prints the wrong figures, or fails, is reported as
 * failed with what went wrong, and the bench goes on. */
Test(bench_peers, broken_peers_are_failures, .timeout = 60)
{
    char program[PATH_MAX], script[PATH_MAX], python[] = "/tmp/moe-ep-python-XXXXXX",
         mpirun[] = "/tmp/moe-ep-mpirun-XXXXXX";
    build_paths(program, script);
    /* The import check gets a version with gloo, and the script run gets a
     * line for a batch of 999 tokens where 512 were requested. */
    write_shell_script(python,
        "case \"$1\" in\n"
        "-c) echo 1.13.0 1 ;;\n"
        "*) echo '{\"ranks\": 2, \"tokens\": 999, \"threads\": 1, "
        "\"forward_ms_best\": 1.5, \"forward_ms_median\": 2}' ;;\n"
        "esac\n");
    write_shell_script(mpirun, "echo 'mpirun: no slots' >&2\nexit 3\n");
    cr_assert_eq(setenv("MOE_EP_PYTHON", python, 1), 0);
    cr_assert_eq(setenv("MOE_EP_MPIRUN", mpirun, 1), 0);

    struct moe_bench_options o;
    cr_assert_eq(parse(&o, "--quick", "--peers", "--torch-script", script, NULL), 0);
    o.program_path = program;
    struct moe_bench_results res = {.cores = 2};
    char *section = peers_section(&o, &res);
    char *torch = subsection(section, "### PyTorch EP layer");
    char *mpi = subsection(section, "### Open MPI's MPI_Alltoallv");

    cr_expect(strstr(torch, "\n- failed: result line 1 is for 2 ranks, 999 tokens")
              != NULL, "%s", torch);
    if (moe_transport_mpi_built()) {
        cr_expect(strstr(mpi, "\n- failed: ") != NULL, "%s", mpi);
        cr_expect(strstr(mpi, "-np 2") != NULL, "the reason lacks the command: %s", mpi);
        cr_expect(strstr(mpi, "exit status 3: mpirun: no slots") != NULL, "%s", mpi);
    }
    cr_expect_null(strstr(section, "| prefill |"), "a failed peer has figures");
    free(torch);
    free(mpi);
    free(section);
    unlink(python);
    unlink(mpirun);
}

/* Counts the lines of `text` that start with `prefix`. */
static int count_lines(const char *text, const char *prefix)
{
    int count = 0;
    size_t n = strlen(prefix);
    for (const char *line = text; line; line = strchr(line, '\n')) {
        line += *line == '\n';
        count += strncmp(line, prefix, n) == 0;
    }
    return count;
}

/* The peers installed here run at the --quick shape, and the section has
 * their figures; a peer that is not installed has a "skipped" line. */
Test(bench_peers, quick_run_has_figures_or_reasons, .timeout = 300)
{
    char program[PATH_MAX], script[PATH_MAX];
    build_paths(program, script);
    /* Under LeakSanitizer, the mpirun job's ranks match Open MPI's own
     * allocations to tools/lsan.supp only with the slow unwinder, which
     * finds the frames of components that MPI_Finalize has unloaded. */
    const char *asan = getenv("ASAN_OPTIONS");
    char asan_options[1024];
    snprintf(asan_options, sizeof asan_options, "%s%sfast_unwind_on_malloc=0",
             asan ? asan : "", asan && *asan ? ":" : "");
    setenv("ASAN_OPTIONS", asan_options, 1);
    struct moe_bench_options o;
    cr_assert_eq(parse(&o, "--quick", "--peers", "--torch-script", script, NULL), 0);
    o.program_path = program;
    FILE *out = tmpfile();
    cr_assert_not_null(out);
    cr_assert_eq(moe_bench(&o, out), 0, "moe_bench failed: %s", moe_error_message());
    size_t bytes;
    char *report = read_all(out, &bytes);
    fclose(out);

    const char *section = strstr(report, "\n## Peers\n");
    cr_assert_not_null(section, "the report has no Peers section");
    char *torch = subsection(section, "### PyTorch EP layer");
    char *mpi = subsection(section, "### Open MPI's MPI_Alltoallv");
    cr_expect_null(strstr(section, "- failed: "), "a peer failed:\n%s", section);

    if (!strstr(torch, "\n- skipped: ")) {
        /* --quick: 512 tokens, then 1, 4 and 8 per rank at 2 ranks. */
        static const char *const rows[] = {
            "| prefill | 2 | 512 | ", "| decode, 1 token per rank | 2 | 2 | ",
            "| decode, 4 tokens per rank | 2 | 8 | ",
            "| decode, 8 tokens per rank | 2 | 16 | ",
        };
        for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
            cr_expect_eq(count_lines(torch, rows[i]), 1, "no row '%s' in:\n%s",
                         rows[i], torch);
        double cells[7];
        const char *prefill = strstr(torch, rows[0]);
        cr_assert_not_null(prefill);
        int parsed = sscanf(prefill + strlen(rows[0]),
                            "%lf | %lf | %lf | %lf | %lf | %lf", &cells[0], &cells[1],
                            &cells[2], &cells[3], &cells[4], &cells[5]);
        cr_assert_eq(parsed, 6, "the prefill row has %d numbers", parsed);
        for (int i = 0; i < 6; i++)
            cr_expect(cells[i] > 0 && isfinite(cells[i]), "prefill cell %d is %g", i,
                      cells[i]);
        cr_expect(strstr(torch, "--tokens-per-rank 1,4,8") != NULL,
                  "the decode command is missing:\n%s", torch);
    }
    if (!strstr(mpi, "\n- skipped: ")) {
        /* 4 sizes and the 1-token dispatch of H = 256 floats, at 2 and 4 ranks. */
        cr_expect_eq(count_lines(mpi, "| 2 | "), 5, "%s", mpi);
        cr_expect_eq(count_lines(mpi, "| 4 | "), 5, "%s", mpi);
        cr_expect_eq(count_lines(mpi, "| 2 | 1 token, 1 KiB | "), 1, "%s", mpi);
        cr_expect_eq(count_lines(mpi, "| 4 | 4 MiB | "), 1, "%s", mpi);
        cr_expect(strstr(mpi, "not judged (--quick)") != NULL, "%s", mpi);
    }
    free(torch);
    free(mpi);
    free(report);
}
