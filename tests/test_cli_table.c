/*
 * test_cli_table.c - every value flag of run, bench, make-layer, compare and
 * explain rejects bad values with exit status 2 and a message that names the
 * flag and the value.
 *
 * The table lists each flag with its kind (integer, seed, number, byte
 * size, word, input or output path) and whether 0 is valid. Each kind has
 * a list of values that no flag of it accepts: non-numeric, empty,
 * negative, trailing garbage, absurdly large, plus 0 and one past the
 * maximum where those are invalid. A second table contains the
 * cross-checks between flags. A third test reads every command's --help and fails for a
 * flag that the table does not cover, so a new flag gets rows.
 */
#include "moe_npy.h"
#include "test_program.h"

#include <errno.h>

enum kind {
    INTEGER,    /* moe_parse_int64 */
    SEED,       /* moe_parse_uint64: any 64-bit unsigned integer */
    NUMBER,     /* moe_parse_double: a finite decimal number */
    TOLERANCE,  /* a number >= 0 up to the largest double: a huge tolerance
                   is a request to check only NaN, Inf and the shapes */
    BYTES,      /* moe_parse_bytes, and a power of two */
    WORD,       /* one of a fixed set of words */
    INPUT,      /* an existing file or directory */
    OUTPUT,     /* a file or directory to write */
};

struct flag_spec {
    const char *command;
    const char *flag;
    enum kind kind;
    int zero_valid;
    const char *past_max; /* the smallest invalid value above the range, or NULL */
};

static const struct flag_spec FLAGS[] = {
    {"run", "--ranks", INTEGER, 0, "65"},
    {"run", "--tokens", INTEGER, 0, "16777217"},
    {"run", "--hidden", INTEGER, 0, "65537"},
    {"run", "--ffn", INTEGER, 0, "262145"},
    {"run", "--experts", INTEGER, 0, "4097"},
    {"run", "--top-k", INTEGER, 0, "4097"},
    {"run", "--seed", SEED, 1, "18446744073709551616"},
    {"run", "--model", INPUT, 0, NULL},
    {"run", "--layer", INTEGER, 1, "16777217"},
    {"run", "--router", WORD, 0, NULL},
    {"run", "--renormalize", WORD, 0, NULL},
    {"run", "--scaling-factor", NUMBER, 0, "1000001"},
    {"run", "--capacity-factor", NUMBER, 1, "1000001"},
    {"run", "--min-capacity", INTEGER, 1, "1099511627777"},
    {"run", "--expert-capacity", INTEGER, 1, "1099511627777"},
    {"run", "--drop-policy", WORD, 0, NULL},
    {"run", "--skew", NUMBER, 1, "100.5"},
    {"run", "--steps", INTEGER, 0, "100001"},
    {"run", "--bias-update-rate", NUMBER, 1, "1000.5"},
    {"run", "--stats", OUTPUT, 0, NULL},
    {"run", "--trace", OUTPUT, 0, NULL},
    {"run", "--plot", OUTPUT, 0, NULL},
    {"run", "--transport", WORD, 0, NULL},
    {"run", "--check", WORD, 0, NULL},
    {"run", "--exchange", WORD, 0, NULL},
    {"run", "--overlap", WORD, 0, NULL},
    {"run", "--threads", INTEGER, 0, "65"},
    {"run", "--input", INPUT, 0, NULL},
    {"run", "--output", OUTPUT, 0, NULL},
    {"run", "--dump", OUTPUT, 0, NULL},
    {"run", "--timeout", NUMBER, 0, "86400.5"},
    {"run", "--ring-size", BYTES, 0, "2G"},

    {"bench", "--ranks", INTEGER, 0, "65"},
    {"bench", "--tokens", INTEGER, 0, "16777217"},
    {"bench", "--hidden", INTEGER, 0, "65537"},
    {"bench", "--ffn", INTEGER, 0, "262145"},
    {"bench", "--experts", INTEGER, 0, "4097"},
    {"bench", "--top-k", INTEGER, 0, "4097"},
    {"bench", "--repeats", INTEGER, 0, "51"},
    {"bench", "--ring-size", BYTES, 0, "2G"},
    {"bench", "--markdown", OUTPUT, 0, NULL},
    {"bench", "--transport", WORD, 0, NULL},
    {"bench", "--torch-script", INPUT, 0, NULL},

    {"make-layer", "--family", WORD, 0, NULL},
    {"make-layer", "--preset", WORD, 0, NULL},
    {"make-layer", "--scale", INTEGER, 0, "1048577"},
    {"make-layer", "--out", OUTPUT, 0, NULL},
    {"make-layer", "--hidden", INTEGER, 0, "1048577"},
    {"make-layer", "--ffn", INTEGER, 0, "1048577"},
    {"make-layer", "--experts", INTEGER, 0, "4097"},
    {"make-layer", "--top-k", INTEGER, 0, "4097"},
    {"make-layer", "--shared-ffn", INTEGER, 1, "1048577"},
    {"make-layer", "--shared-experts", INTEGER, 1, "1048577"},
    {"make-layer", "--groups", INTEGER, 0, "4097"},
    {"make-layer", "--topk-groups", INTEGER, 0, "4097"},
    {"make-layer", "--scaling-factor", NUMBER, 0, "1000001"},
    {"make-layer", "--renormalize", WORD, 0, NULL},
    {"make-layer", "--expert-capacity", INTEGER, 1, "1048577"},
    {"make-layer", "--dense-act-fn", WORD, 0, NULL},
    {"make-layer", "--layer", INTEGER, 1, "1048577"},
    {"make-layer", "--dtype", WORD, 0, NULL},
    {"make-layer", "--shards", INTEGER, 0, "1000"},
    {"make-layer", "--tokens", INTEGER, 0, "1048577"},
    {"make-layer", "--seed", SEED, 1, "18446744073709551616"},

    {"compare", "--rtol", TOLERANCE, 1, NULL},
    {"compare", "--atol", TOLERANCE, 1, NULL},

    {"explain", "--step", INTEGER, 0, "11"},
    {"explain", "--section", WORD, 0, NULL},
    {"explain", "--seed", SEED, 1, "18446744073709551616"},
    {"explain", "--skew", NUMBER, 1, "100.5"},
    {"explain", "--capacity-factor", NUMBER, 1, "1000001"},
    {"explain", "--exchange", WORD, 0, NULL},
};
#define FLAG_COUNT (sizeof FLAGS / sizeof FLAGS[0])

/* Values that every flag of a kind rejects. */
static const char *const BAD_INTEGERS[] = {
    "", "abc", "-1", "4x", "1.5", "1e30", "99999999999999999999", " 4", "4 ",
    "0x10", "--5", NULL,
};
static const char *const BAD_SEEDS[] = {
    "", "abc", "-1", "4x", "1.5", "1e30", "99999999999999999999", " 4", "+4", NULL,
};
static const char *const BAD_NUMBERS[] = {
    "", "abc", "-1", "4x", "1e30", "1e999", "nan", "inf", "0x1p3", " 1", "1 ",
    "1..5", NULL,
};
static const char *const BAD_TOLERANCES[] = {
    "", "abc", "-1", "4x", "1e999", "nan", "inf", "0x1p3", " 1", "1..5", NULL,
};
static const char *const BAD_BYTES[] = {
    "", "abc", "-1", "4x", "1e30", "99999999999999999999", "0", "32", "1000",
    "1KK", "17179869184G", NULL,
};
static const char *const BAD_WORDS[] = {"", "bogus", "-1", NULL};
static const char *const BAD_INPUTS[] = {"", "/nonexistent/moe-ep-input", NULL};
/* A path below /dev/null cannot be created even by root, whereas
 * /nonexistent/... could be, since --dump and --out create directories. */
static const char *const BAD_OUTPUTS[] = {"", "/dev/null/moe-ep-output", NULL};

static const char *const *bad_values(enum kind kind)
{
    switch (kind) {
    case INTEGER:
        return BAD_INTEGERS;
    case SEED:
        return BAD_SEEDS;
    case NUMBER:
        return BAD_NUMBERS;
    case TOLERANCE:
        return BAD_TOLERANCES;
    case BYTES:
        return BAD_BYTES;
    case WORD:
        return BAD_WORDS;
    case INPUT:
        return BAD_INPUTS;
    case OUTPUT:
        return BAD_OUTPUTS;
    }
    return NULL;
}

/* A directory with two small .npy files for compare, and room for
 * make-layer's --out. */
static char scratch_dir[64];

static void make_scratch(void)
{
    snprintf(scratch_dir, sizeof scratch_dir, "/tmp/moe-ep-table-XXXXXX");
    cr_assert_not_null(mkdtemp(scratch_dir), "mkdtemp: %s", strerror(errno));
    float values[4] = {1, 2, 3, 4};
    char path[128];
    snprintf(path, sizeof path, "%s/a.npy", scratch_dir);
    cr_assert_eq(moe_npy_write_f32(path, values, 2, 2), 0);
    snprintf(path, sizeof path, "%s/b.npy", scratch_dir);
    cr_assert_eq(moe_npy_write_f32(path, values, 2, 2), 0);
}

static void remove_scratch(void)
{
    char command[128];
    snprintf(command, sizeof command, "rm -rf '%s'", scratch_dir);
    cr_assert_eq(system(command), 0);
}

/* Returns a family that has a config field for make-layer's `flag`, so
 * that a valid value of it is accepted. */
static const char *family_with_flag(const char *flag)
{
    if (!strcmp(flag, "--shared-experts") || !strcmp(flag, "--groups") ||
        !strcmp(flag, "--topk-groups") || !strcmp(flag, "--scaling-factor"))
        return "deepseek_v3";
    if (!strcmp(flag, "--shared-ffn"))
        return "qwen2_moe";
    if (!strcmp(flag, "--expert-capacity") || !strcmp(flag, "--dense-act-fn"))
        return "switch_transformers";
    if (!strcmp(flag, "--renormalize"))
        return "qwen3_moe";
    return "mixtral";
}

/* Builds the argument list for `flag value` on `command`: the flag comes
 * first, so its value is parsed before anything else, then the arguments
 * that make the rest of the command line valid. The list points into
 * paths for the file names it needs. */
static void build_args(const char *command, const char *flag, const char *value,
                       const char **args, char paths[2][128])
{
    int n = 0;
    args[n++] = command;
    args[n++] = flag;
    args[n++] = value;
    if (!strcmp(command, "run")) {
        /* A tiny layer, so that a value accepted by mistake runs quickly.
         * --experts and --top-k keep their defaults (8 and 2), so that
         * neither cross-check fires for the other's bad value, and --model
         * takes no shape flags. */
        static const char *const tail[] = {"--tokens", "8", "--hidden", "8",
                                           "--ffn", "8", "--ranks", "2", NULL};
        for (int i = 0; tail[i]; i += 2) {
            if (!strcmp(tail[i], flag) ||
                (!strcmp(flag, "--model") && strcmp(tail[i], "--ranks")))
                continue;
            args[n++] = tail[i];
            args[n++] = tail[i + 1];
        }
    } else if (!strcmp(command, "bench")) {
        args[n++] = "--quick";
    } else if (!strcmp(command, "make-layer")) {
        snprintf(paths[0], 128, "%s/layer", scratch_dir);
        if (strcmp(flag, "--family") && strcmp(flag, "--preset")) {
            args[n++] = "--family";
            args[n++] = family_with_flag(flag);
        }
        if (strcmp(flag, "--out")) {
            args[n++] = "--out";
            args[n++] = paths[0];
        }
    } else if (!strcmp(command, "compare")) {
        snprintf(paths[0], 128, "%s/a.npy", scratch_dir);
        snprintf(paths[1], 128, "%s/b.npy", scratch_dir);
        args[n++] = paths[0];
        args[n++] = paths[1];
    }
    args[n] = NULL;
}

/* Runs one bad value and checks the status and the message. Returns 1 when
 * both are as expected. */
static int check_bad_value(const struct flag_spec *spec, const char *value)
{
    const char *args[32];
    char paths[2][128];
    build_args(spec->command, spec->flag, value, args, paths);
    struct outcome o;
    run_program(&o, NULL, 0, 0, args);

    char quoted[64];
    snprintf(quoted, sizeof quoted, "'%s'", value);
    int named = strstr(o.err, spec->flag) && strstr(o.err, quoted);
    cr_expect_eq(o.status, 2, "%s %s '%s': status %d, stderr: %s", spec->command,
                 spec->flag, value, o.status, o.err);
    cr_expect(named, "%s %s '%s': the message does not name the flag and the "
              "value: %s", spec->command, spec->flag, value, o.err);
    return o.status == 2 && named;
}

Test(cli_table, bad_values_exit_2, .timeout = 240, .init = make_scratch,
     .fini = remove_scratch)
{
    int cases = 0, failures = 0;
    for (size_t f = 0; f < FLAG_COUNT; f++) {
        const struct flag_spec *spec = &FLAGS[f];
        for (const char *const *value = bad_values(spec->kind); *value; value++) {
            failures += !check_bad_value(spec, *value);
            cases++;
        }
        if (!spec->zero_valid && spec->kind != BYTES && spec->kind != WORD &&
            spec->kind != INPUT && spec->kind != OUTPUT) {
            failures += !check_bad_value(spec, "0");
            cases++;
        }
        if (spec->past_max) {
            failures += !check_bad_value(spec, spec->past_max);
            cases++;
        }
    }
    cr_log_info("%d bad values, %d failed", cases, failures);
    cr_assert_eq(segment_count(), 0);
}

/* ---- cross-checks --------------------------------------------------------- */

struct cross_case {
    const char *args[16];
    const char *expected; /* text the message must contain */
};

Test(cli_table, cross_checks_exit_2, .timeout = 120, .init = make_scratch,
     .fini = remove_scratch)
{
    char program[PATH_MAX + 16], input[PATH_MAX + 64], layer[128], fresh[128],
        a[128], b[128];
    program_path(program, sizeof program);
    snprintf(input, sizeof input, "%s/../data/tokens-16x32.npy", dirname(program));
    snprintf(layer, sizeof layer, "%s/layer", scratch_dir);
    snprintf(fresh, sizeof fresh, "%s/fresh", scratch_dir);
    snprintf(a, sizeof a, "%s/a.npy", scratch_dir);
    snprintf(b, sizeof b, "%s/b.npy", scratch_dir);

    /* A layer for the --model cases. */
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"make-layer", "--family", "mixtral", "--hidden", "8",
                                 "--ffn", "8", "--experts", "4", "--out", layer, NULL});
    cr_assert_eq(o.status, 0, "make-layer: %s", o.err);

    const struct cross_case cases[] = {
        {{"run", "--experts", "6", "--top-k", "7", NULL},
         "invalid --top-k value 7: it exceeds --experts 6"},
        {{"run", "--top-k", "9", NULL}, "invalid --top-k value 9: it exceeds --experts 8"},
        {{"run", "--layer", "1", "--tokens", "8", NULL}, "--layer needs --model"},
        {{"run", "--exchange", "rings", "--overlap", "off", NULL},
         "invalid --overlap off with --exchange rings"},
        {{"run", "--transport", "mpi", "--exchange", "direct", NULL},
         "invalid --exchange or --overlap with --transport mpi"},
        {{"run", "--model", layer, "--hidden", "8", NULL},
         "cannot be used with --model"},
        {{"run", "--model", layer, "--layer", "5", NULL}, "5"},
        {{"run", "--model", "/nonexistent/moe-ep-model", NULL},
         "/nonexistent/moe-ep-model"},
        {{"run", "--input", input, "--hidden", "64", NULL}, "its shape is (16, 32)"},
        {{"run", "--input", input, "--tokens", "8", NULL}, "its shape is (16, 32)"},
        {{"run", "--min-capacity", "5", NULL}, "--min-capacity 5 needs --capacity-factor"},
        {{"run", "--expert-capacity", "4", "--capacity-factor", "1", NULL},
         "--expert-capacity and --capacity-factor cannot be used together"},
        {{"run", "--tokens", "16777216", NULL}, "use smaller --tokens"},
        {{"run", "--ranks", NULL}, "missing value for --ranks"},
        {{"run", "--ranks=2", NULL}, "unknown option '--ranks=2'"},
        {{"run", "4", NULL}, "unexpected argument '4'"},
        {{"run", "--output", "/tmp", NULL}, "invalid --output file '/tmp': it is a directory"},
        {{"bench", "--top-k", "17", NULL}, "invalid --top-k value 17: it exceeds --experts 16"},
        {{"bench", "--quick", "--experts", "2", "--top-k", "3", NULL},
         "invalid --top-k value 3: it exceeds --experts 2"},
        {{"bench", "--markdown", "/tmp", NULL}, "'/tmp'"},
        {{"bench", "--alltoall-json", NULL},
         "invalid --alltoall-json without --transport mpi"},
        {{"bench", "--peers", "--transport", "mpi", NULL},
         "invalid --peers with --transport mpi"},
        {{"bench", "--transport", "mpi", "--alltoall-json", "--markdown", fresh, NULL},
         "invalid --markdown with --alltoall-json"},
        {{"bench", "--torch-script", a, NULL}, "invalid --torch-script without --peers"},
        {{"make-layer", "--family", "mixtral", "--experts", "4", "--top-k", "5",
          "--out", layer, NULL}, "5"},
        {{"make-layer", "--family", "deepseek_v3", "--groups", "3", "--out", layer, NULL},
         "3"},
        {{"make-layer", "--family", "deepseek_v3", "--topk-groups", "5", "--out", layer,
          NULL}, "5"},
        {{"make-layer", "--family", "mixtral", "--groups", "2", "--out", layer, NULL},
         "--groups does not apply to family mixtral"},
        {{"make-layer", "--preset", "mixtral-8x7b", "--scale", "3", "--out", layer, NULL},
         "invalid --scale value 3"},
        {{"make-layer", "--family", "mixtral", NULL}, "missing --out"},
        {{"make-layer", "--out", layer, NULL}, "missing --family or --preset"},
        {{"make-layer", "--family", "mixtral", "--shards", "50", "--out", fresh, NULL},
         "invalid --shards value 50"},
        {{"compare", a, NULL}, "missing path B"},
        {{"compare", a, b, a, NULL}, "unexpected argument"},
        {{"compare", a, "--rtol", NULL}, "missing value for --rtol"},
        {{"compare", a, "/nonexistent/moe-ep-b.npy", NULL}, "/nonexistent/moe-ep-b.npy"},
        {{"clean", "--bogus", NULL}, "unknown option '--bogus'"},
        {{"clean", "extra", NULL}, "unexpected argument 'extra'"},
        {{"launch", NULL}, "unknown command 'launch'"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const struct cross_case *c = &cases[i];
        run_program(&o, NULL, 0, 0, c->args);
        char line[256] = "";
        for (int k = 0; c->args[k]; k++)
            snprintf(line + strlen(line), sizeof line - strlen(line), " %s", c->args[k]);
        cr_expect_eq(o.status, 2, "moe-ep%s: status %d, stderr: %s", line, o.status,
                     o.err);
        cr_expect_not_null(strstr(o.err, c->expected), "moe-ep%s: stderr lacks '%s': %s",
                           line, c->expected, o.err);
    }
    cr_assert_eq(segment_count(), 0);
}

/* ---- coverage --------------------------------------------------------------- */

/* Values at the edge of each range must be accepted, so that the rows
 * above are not passing for a parser that rejects everything. A --help
 * after the value ends the parse with status 0 once the value is accepted,
 * without running anything. */
Test(cli_table, edge_values_accepted, .timeout = 120)
{
    static const char *const accepted[][6] = {
        {"run", "--ranks", "64", "--help", NULL},
        {"run", "--ranks", "1", "--help", NULL},
        {"run", "--tokens", "16777216", "--help", NULL},
        {"run", "--hidden", "65536", "--help", NULL},
        {"run", "--experts", "4096", "--help", NULL},
        {"run", "--seed", "0", "--help", NULL},
        {"run", "--seed", "18446744073709551615", "--help", NULL},
        {"run", "--timeout", "0.001", "--help", NULL},
        {"run", "--timeout", "86400", "--help", NULL},
        {"run", "--ring-size", "64", "--help", NULL},
        {"run", "--ring-size", "1G", "--help", NULL},
        {"run", "--layer", "0", "--help", NULL},
        {"run", "--scaling-factor", "1e6", "--help", NULL},
        {"run", "--capacity-factor", "0", "--help", NULL},
        {"run", "--skew", "100", "--help", NULL},
        {"run", "--steps", "100000", "--help", NULL},
        {"run", "--bias-update-rate", "1000", "--help", NULL},
        {"bench", "--repeats", "50", "--help", NULL},
        {"bench", "--ring-size", "64K", "--help", NULL},
        {"make-layer", "--shards", "999", "--help", NULL},
        {"make-layer", "--scaling-factor", "1e-6", "--help", NULL},
        {"make-layer", "--seed", "0", "--help", NULL},
        {"compare", "--rtol", "1e300", "--help", NULL},
        {"compare", "--atol", "0", "--help", NULL},
        {"explain", "--step", "10", "--help", NULL},
        {"explain", "--skew", "100", "--help", NULL},
        {"explain", "--capacity-factor", "0", "--help", NULL},
        {"explain", "--seed", "18446744073709551615", "--help", NULL},
    };
    for (size_t i = 0; i < sizeof accepted / sizeof accepted[0]; i++) {
        struct outcome o;
        run_program(&o, NULL, 0, 0, accepted[i]);
        cr_expect_eq(o.status, 0, "%s %s %s: status %d, stderr: %s", accepted[i][0],
                     accepted[i][1], accepted[i][2], o.status, o.err);
        cr_expect_not_null(strstr(o.out, "usage: moe-ep"), "%s %s %s: no usage text",
                           accepted[i][0], accepted[i][1], accepted[i][2]);
    }

    /* top-k equal to experts passes the cross-check and runs. */
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", "--experts", "3", "--top-k", "3", "--tokens",
                                 "8", "--hidden", "8", "--ffn", "8", "--ranks", "2",
                                 NULL});
    cr_expect_eq(o.status, 0, "top-k 3 of 3 experts: status %d, stderr: %s", o.status,
                 o.err);
}

/* Reads `moe-ep COMMAND --help` and checks that every flag it lists that
 * takes a value has a row in FLAGS. */
static void check_help_covered(const char *command)
{
    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){command, "--help", NULL});
    cr_assert_eq(o.status, 0, "%s --help: %s", command, o.err);
    static const char *const no_value[] = {"--help", "--quick", "--peers",
                                           "--alltoall-json", "--pause", NULL};
    int flags = 0;
    for (const char *line = o.out; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        /* Option lines start with two spaces and "--" or "-h, --". */
        const char *start = line;
        while (*start == ' ')
            start++;
        if (start - line != 2 || start[0] != '-')
            continue;
        const char *flag = strstr(start, "--");
        if (!flag)
            continue;
        char name[64];
        size_t length = strcspn(flag, " \n,");
        snprintf(name, sizeof name, "%.*s", (int)length, flag);
        int skip = 0;
        for (int k = 0; no_value[k]; k++)
            skip |= !strcmp(name, no_value[k]);
        if (skip)
            continue;
        int covered = 0;
        for (size_t f = 0; f < FLAG_COUNT; f++)
            covered |= !strcmp(FLAGS[f].command, command) && !strcmp(FLAGS[f].flag, name);
        cr_expect(covered, "moe-ep %s %s has no row in the bad-value table", command, name);
        flags++;
    }
    cr_assert_gt(flags, 0, "found no options in moe-ep %s --help", command);
}

Test(cli_table, table_covers_every_flag, .timeout = 60)
{
    check_help_covered("run");
    check_help_covered("bench");
    check_help_covered("make-layer");
    check_help_covered("compare");
    check_help_covered("explain");
}
