/*
 * explain.c - the `moe-ep explain` command: its options, the runs each part
 * needs, and the order in which the parts print.
 *
 * Runs in the launcher process. Every run happens before anything prints,
 * so --pause waits for Enter while no rank process and no shared segment
 * exists, and a signal then leaves nothing behind.
 */
#include "moe_explain.h"
#include "moe_args.h"
#include "moe_error.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

enum {
    EXIT_MISMATCH = 1,
    EXIT_USAGE = 2,
    EXIT_RUNTIME = 3,
};

static const char *const SECTION_NAMES[] = {
    [MOE_EXPLAIN_ALL] = "all",
    [MOE_EXPLAIN_SECTION_STEPS] = "steps",
    [MOE_EXPLAIN_SECTION_SKEW] = "skew",
    [MOE_EXPLAIN_SECTION_CAPACITY] = "capacity",
    [MOE_EXPLAIN_SECTION_TRAFFIC] = "traffic",
    [MOE_EXPLAIN_SECTION_AUX] = "aux",
};
#define SECTION_COUNT (int)(sizeof SECTION_NAMES / sizeof SECTION_NAMES[0])

static void usage(FILE *out)
{
    fprintf(out,
        "usage: moe-ep explain [options]\n"
        "\n"
        "Runs a tiny MoE layer (6 tokens, hidden 4, FFN 8, 4 experts, top-2) on 2 rank\n"
        "processes and narrates its forward pass step by step with the numbers of that\n"
        "run. Further sections show a skewed router and the wait it causes, token\n"
        "dropping under a capacity, the bytes of the all-to-all against a tensor-parallel\n"
        "all-reduce, and the load-balancing loss.\n"
        "\n"
        "options (defaults in brackets):\n"
        "  --step N          print only step N of the forward, 1 to %d\n"
        "  --section NAME    print only one part: steps, skew, capacity, traffic, aux or\n"
        "                    all [all]\n"
        "  --pause           wait for Enter after each step and section; the end of the\n"
        "                    input ends every wait\n"
        "  --seed S          seed that draws the weights and the tokens [1]\n"
        "  --skew S          Zipf exponent of the skewed router, 0 to 100 [2]\n"
        "  --capacity-factor CF  the capacity section keeps at most ceil(CF * T * K / E)\n"
        "                    assignments per expert, CF from 0 to 1e6; 0 means dropless [1]\n"
        "  --exchange X      rings: the rows travel in ring records, as in a textbook\n"
        "                    all-to-all; direct: each sender writes its rows into the\n"
        "                    owner's window and the rings carry notes, the default of\n"
        "                    moe-ep run [rings]\n"
        "  -h, --help        show this text\n"
        "\n"
        "exit status: 0 every run is bitwise equal to the golden path, 1 a run differs,\n"
        "2 invalid usage, 3 runtime failure, 128 + the signal number when SIGINT, SIGTERM\n"
        "or SIGHUP stopped a run\n",
        MOE_EXPLAIN_STEPS);
}

/* Parses the options. Returns 0, 1 for --help, or -EINVAL with a message
 * that names the flag, the value and the reason. */
static int parse_options(struct moe_explain_options *o, int argc, char **argv)
{
    *o = (struct moe_explain_options){.seed = 1, .skew = 2.0, .capacity_factor = 1.0};
    const char *section_text = NULL;
    int64_t v;
    int rc;
    for (int i = 0; i < argc; i++) {
        const char *flag = argv[i];
        if (!strcmp(flag, "-h") || !strcmp(flag, "--help"))
            return 1;
        if (!strcmp(flag, "--pause")) {
            o->pause = 1;
            continue;
        }
        static const char *const known[] = {
            "--step", "--section", "--seed", "--skew", "--capacity-factor", "--exchange",
            NULL,
        };
        const char *text;
        if ((rc = moe_next_option("explain", known, argc, argv, &i, &text)))
            return rc;
        if (!strcmp(flag, "--step")) {
            if ((rc = moe_parse_int64(flag, text, 1, MOE_EXPLAIN_STEPS, &v)))
                return rc;
            o->step = (int)v;
        } else if (!strcmp(flag, "--section")) {
            int found = -1;
            for (int s = 0; s < SECTION_COUNT; s++)
                if (!strcmp(text, SECTION_NAMES[s]))
                    found = s;
            if (found < 0)
                return moe_fail(-EINVAL, "invalid --section value '%s': expected steps, "
                                "skew, capacity, traffic, aux or all", text);
            o->section = found;
            section_text = text;
        } else if (!strcmp(flag, "--seed")) {
            if ((rc = moe_parse_uint64(flag, text, &o->seed)))
                return rc;
        } else if (!strcmp(flag, "--skew")) {
            if ((rc = moe_parse_double(flag, text, 0.0, 100.0, &o->skew)))
                return rc;
        } else if (!strcmp(flag, "--capacity-factor")) {
            if ((rc = moe_parse_double(flag, text, 0.0, 1e6, &o->capacity_factor)))
                return rc;
        } else if (!strcmp(flag, "--exchange")) {
            if (strcmp(text, "rings") && strcmp(text, "direct"))
                return moe_fail(-EINVAL, "invalid --exchange value '%s': expected rings "
                                "or direct", text);
            o->direct = !strcmp(text, "direct");
        }
    }
    if (o->step && o->section != MOE_EXPLAIN_ALL && o->section != MOE_EXPLAIN_SECTION_STEPS)
        return moe_fail(-EINVAL, "--step %d prints one step of the forward, so it cannot "
                        "be used with --section %s", o->step, section_text);
    return 0;
}

/* Forwards of the timed runs of the skew section, all on the same batch;
 * the section prints the median of each wait over them. */
#define TIMED_FORWARDS 100

/* The runs the chosen parts print from. */
struct needs {
    int plain, timed, capacity;
};

static int wants(const struct moe_explain_options *o, int section)
{
    return o->section == MOE_EXPLAIN_ALL || o->section == section;
}

static struct needs needed_runs(const struct moe_explain_options *o)
{
    struct needs n = {0};
    if (o->step) {
        n.plain = 1;
        return n;
    }
    n.plain = wants(o, MOE_EXPLAIN_SECTION_STEPS) || wants(o, MOE_EXPLAIN_SECTION_TRAFFIC) ||
              wants(o, MOE_EXPLAIN_SECTION_AUX);
    n.timed = wants(o, MOE_EXPLAIN_SECTION_SKEW) || wants(o, MOE_EXPLAIN_SECTION_AUX);
    n.capacity = wants(o, MOE_EXPLAIN_SECTION_CAPACITY);
    return n;
}

/* The runs, in the order they are made: the narrated forward, the timed
 * runs of both routers, and the skewed router under each drop policy. */
enum { RUN_PLAIN, RUN_PLAIN_TIMED, RUN_SKEWED, RUN_POSITION, RUN_PROBS, RUN_COUNT };

struct runs {
    struct moe_explain_run run[RUN_COUNT];
    int done[RUN_COUNT];
};

/* Makes the runs the chosen parts need. Returns 0 or the exit status of a
 * failure, after printing its message. */
static int make_runs(const struct moe_explain_options *o, const float *tokens,
                     struct runs *runs)
{
    struct needs need = needed_runs(o);
    struct moe_shape shape;
    moe_explain_shape(&shape);
    struct moe_capacity dropless = {.limit = -1, .policy = MOE_DROP_POSITION};
    struct moe_capacity position = {
        .limit = moe_capacity_from_factor(o->capacity_factor, 0, shape.tokens, shape.top_k,
                                          shape.experts),
        .policy = MOE_DROP_POSITION,
    };
    struct moe_capacity probs = position;
    probs.policy = MOE_DROP_PROBS;
    const struct {
        int needed;
        struct moe_explain_layer layer;
    } plan[RUN_COUNT] = {
        [RUN_PLAIN] = {need.plain, {o->seed, 0.0, dropless, 1, o->direct}},
        [RUN_PLAIN_TIMED] = {need.timed, {o->seed, 0.0, dropless, TIMED_FORWARDS, o->direct}},
        [RUN_SKEWED] = {need.timed, {o->seed, o->skew, dropless, TIMED_FORWARDS, o->direct}},
        [RUN_POSITION] = {need.capacity, {o->seed, o->skew, position, 1, o->direct}},
        [RUN_PROBS] = {need.capacity, {o->seed, o->skew, probs, 1, o->direct}},
    };
    for (int i = 0; i < RUN_COUNT; i++) {
        if (!plan[i].needed)
            continue;
        int stop_signal = 0;
        int rc = moe_explain_run_layer(&plan[i].layer, tokens, &runs->run[i], &stop_signal);
        runs->done[i] = 1;
        if (stop_signal) {
            fprintf(stderr, "moe-ep explain: stopped by signal %d (%s); all ranks were "
                    "stopped and the shared segment removed\n", stop_signal,
                    strsignal(stop_signal));
            return 128 + stop_signal;
        }
        if (rc) {
            fprintf(stderr, "moe-ep explain: %s\n", moe_error_message());
            return rc == -EINVAL ? EXIT_USAGE : EXIT_RUNTIME;
        }
    }
    return 0;
}

/* Returns 1 when a run that was made differs from its golden path. */
static int any_mismatch(const struct runs *runs)
{
    for (int i = 0; i < RUN_COUNT; i++) {
        const struct moe_explain_run *run = &runs->run[i];
        if (!runs->done[i])
            continue;
        if (!run->check.equal || !run->kept_equal)
            return 1;
        for (int s = 0; s < MOE_STAGE_COUNT; s++)
            if (!run->stage_check[s].equal)
                return 1;
    }
    return 0;
}

/* Between two parts under --pause: waits for a line on stdin. The end of
 * the input, or a read error, ends this wait and every later one. */
static void pause_between(int *pause)
{
    if (!*pause)
        return;
    fflush(stdout);
    fprintf(stderr, "[press Enter to continue]");
    int c;
    while ((c = getchar()) != EOF && c != '\n')
        ;
    fprintf(stderr, "\n");
    if (c == EOF)
        *pause = 0;
}

static void print_intro(FILE *out, const struct moe_explain_options *o)
{
    struct moe_shape s;
    moe_explain_shape(&s);
    fprintf(out,
            "moe-ep explain: one MoE layer with expert parallelism, step by step\n"
            "  layer: T = %" PRId64 " tokens, hidden H = %" PRId64 ", FFN F = %" PRId64
            ", E = %" PRId64 " experts, top-k K = %" PRId64 "\n"
            "  seeded random weights and tokens, seed %" PRIu64 "\n"
            "  R = %d rank processes, which exchange rows through shared memory\n"
            "Every number below comes from a real run of this layer: the stages the ranks\n"
            "dumped, the bytes left in the rings, the step timers, and the golden path.\n",
            s.tokens, s.hidden, s.ffn, s.experts, s.top_k, o->seed, MOE_EXPLAIN_RANKS);
}

/* Prints the chosen parts in order, pausing between them. */
static void print_parts(FILE *out, const struct moe_explain_options *o,
                        const struct runs *runs)
{
    const struct moe_explain_run *plain = &runs->run[RUN_PLAIN];
    int pause = o->pause, printed = 0;
    if (o->step) {
        moe_explain_print_step(out, o->step, plain);
        return;
    }
    print_intro(out, o);
    if (wants(o, MOE_EXPLAIN_SECTION_STEPS)) {
        for (int step = 1; step <= MOE_EXPLAIN_STEPS; step++) {
            if (printed++)
                pause_between(&pause);
            moe_explain_print_step(out, step, plain);
        }
    }
    if (wants(o, MOE_EXPLAIN_SECTION_SKEW)) {
        if (printed++)
            pause_between(&pause);
        moe_explain_print_skew(out, &runs->run[RUN_PLAIN_TIMED], &runs->run[RUN_SKEWED]);
    }
    if (wants(o, MOE_EXPLAIN_SECTION_CAPACITY)) {
        if (printed++)
            pause_between(&pause);
        moe_explain_print_capacity(out, o->capacity_factor, &runs->run[RUN_POSITION],
                                   &runs->run[RUN_PROBS]);
    }
    if (wants(o, MOE_EXPLAIN_SECTION_TRAFFIC)) {
        if (printed++)
            pause_between(&pause);
        moe_explain_print_traffic(out, plain);
    }
    if (wants(o, MOE_EXPLAIN_SECTION_AUX)) {
        if (printed++)
            pause_between(&pause);
        moe_explain_print_aux(out, plain, &runs->run[RUN_SKEWED]);
    }
}

int moe_explain_main(int argc, char **argv)
{
    struct moe_explain_options o;
    int rc = parse_options(&o, argc, argv);
    if (rc == 1) {
        usage(stdout);
        return 0;
    }
    if (rc) {
        fprintf(stderr, "moe-ep explain: %s\n", moe_error_message());
        return EXIT_USAGE;
    }

    struct moe_shape shape;
    moe_explain_shape(&shape);
    float *tokens = malloc((size_t)(shape.tokens * shape.hidden) * sizeof(float));
    struct runs *runs = calloc(1, sizeof *runs);
    if (!tokens || !runs) {
        fprintf(stderr, "moe-ep explain: out of memory\n");
        free(tokens);
        free(runs);
        return EXIT_RUNTIME;
    }
    moe_tokens_random(tokens, 0, shape.tokens, shape.hidden, o.seed);

    int status = make_runs(&o, tokens, runs);
    if (status == 0) {
        print_parts(stdout, &o, runs);
        status = any_mismatch(runs) ? EXIT_MISMATCH : 0;
    }
    for (int i = 0; i < RUN_COUNT; i++)
        if (runs->done[i])
            moe_explain_run_free(&runs->run[i]);
    free(runs);
    free(tokens);
    return status;
}
