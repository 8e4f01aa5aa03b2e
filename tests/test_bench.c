/*
 * test_bench.c - `moe-ep bench` option parsing, the helpers behind its
 * figures, and a --quick run end to end: the report has every section, the
 * Markdown file gets the same text, and no segment or temporary file is
 * left behind. It checks no figure's value, because those depend on the
 * machine.
 */
#include "test_util.h"

#include "moe_bench.h"
#include "moe_bench_internal.h"
#include "moe_error.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
        "### memcpy", "## Forward", "## All-to-all", "1 token",
    };
    for (size_t i = 0; i < sizeof sections / sizeof sections[0]; i++)
        cr_expect(strstr(printed, sections[i]) != NULL,
                  "the report lacks '%s'", sections[i]);
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
