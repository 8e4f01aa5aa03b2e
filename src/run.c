/*
 * run.c - the `moe-ep run` job: parse options, build the layer, launch the
 * ranks, gather their output, and check it bit for bit against the golden
 * path.
 *
 * Runs in the launcher process. The weights and tokens are built here and
 * reach the ranks through fork; the output comes back through the run area
 * of the shared segment. Memory: the weights, the (T, H) tokens, output and
 * golden output, plus the golden path's (T*K, H) buffers.
 */
#include "moe_run.h"
#include "moe_args.h"
#include "moe_aux.h"
#include "moe_diff.h"
#include "moe_dist.h"
#include "moe_dump.h"
#include "moe_error.h"
#include "moe_file.h"
#include "moe_model.h"
#include "moe_npy.h"
#include "moe_plot.h"
#include "moe_transport.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* Largest accepted dimensions. They keep every product in 64 bits and every
 * GEMM dimension in an int; the memory check below is the tighter limit. */
#define MAX_TOKENS (1LL << 24)
#define MAX_HIDDEN (1LL << 16)
#define MAX_FFN (1LL << 18)
#define MAX_EXPERTS 4096
#define MAX_STEPS 100000

void moe_run_options_default(struct moe_run_options *o)
{
    *o = (struct moe_run_options){
        .shape = {.tokens = 512, .hidden = 512, .ffn = 1792, .experts = 8, .top_k = 2},
        .ranks = 4,
        .seed = 1,
        .timeout_seconds = 60.0,
        .ring_bytes = 0, /* moe_ring_default_capacity(ranks) */
        .layer = -1,
        .scoring = -1,
        .renormalize = -1,
        .scaling_factor = NAN,
        .expert_capacity = -1,
        .drop_policy = -1,
        .steps = 1,
        .transport = MOE_TRANSPORT_SHM,
        .check = 1,
        .overlap = 1,
    };
}

void moe_run_usage(FILE *out)
{
    fprintf(out,
        "usage: moe-ep run [options]\n"
        "\n"
        "Runs one MoE layer with expert parallelism on R rank processes that\n"
        "exchange tokens through shared-memory rings, then checks the output\n"
        "bit for bit against a single-process golden path.\n"
        "\n"
        "options (defaults in brackets):\n"
        "  --ranks R         rank processes, 1 to %d [4]\n"
        "  --tokens T        tokens in the whole batch, split over the ranks in\n"
        "                    contiguous blocks; the first T mod R ranks get one\n"
        "                    more [512]\n"
        "  --hidden H        hidden size, in elements [512]\n"
        "  --ffn F           expert FFN (intermediate) size, in elements [1792]\n"
        "  --experts E       experts, split over the ranks in contiguous blocks [8]\n"
        "  --top-k K         experts per token, 1 to E [2]\n"
        "  --seed S          seed that draws the weights and the tokens [1]\n"
        "  --model DIR       run a layer of the Hugging Face checkpoint in DIR\n"
        "                    (config.json and safetensors) instead of a random\n"
        "                    one; its config sets H, F, E, K and the router\n"
        "  --layer L         the MoE layer of --model to run [the first]\n"
        "  --router R        override the router: softmax-topk, topk-softmax or\n"
        "                    sigmoid [mixtral's softmax-topk, or the model's]\n"
        "  --renormalize on|off  divide the top-k weights by their sum [on, or\n"
        "                    the model's norm_topk_prob]\n"
        "  --scaling-factor X  multiply the top-k weights by X [1, or the\n"
        "                    model's routed_scaling_factor]\n"
        "  --capacity-factor CF  each expert keeps at most ceil(CF * T * K / E)\n"
        "                    assignments; 0 means dropless [0, or the model's]\n"
        "  --min-capacity N  lower bound of the capacity from --capacity-factor [0]\n"
        "  --expert-capacity N  each expert keeps at most N assignments; 0 drops\n"
        "                    them all [the model's expert_capacity, if any]\n"
        "  --drop-policy P   which assignments an expert over capacity keeps:\n"
        "                    position (the first in token order) or probs (the\n"
        "                    highest routing weights) [position]\n"
        "  --skew S          add -S * ln(e + 1) to the logits of expert e, so that\n"
        "                    the gate favours low experts with Zipf exponent S [0]\n"
        "  --steps N         run N forwards, each on a fresh batch drawn from the\n"
        "                    seed (or the --input batch again) [1]\n"
        "  --bias-update-rate G  after each forward, move each expert's selection\n"
        "                    bias by G * sign(mean load - its load), as DeepSeek-V3\n"
        "                    balances without an aux loss [0: off]\n"
        "  --stats FILE      write the report's figures as JSON\n"
        "  --trace FILE      write a Chrome trace (Perfetto, chrome://tracing) with a\n"
        "                    track per rank, its steps and its waits on peers\n"
        "  --plot DIR        write traffic.svg, experts.svg and timeline.svg of the\n"
        "                    last forward into DIR, created if missing\n"
        "  --transport T     shm (rank processes on this machine) or mpi (one\n"
        "                    rank per process of `mpirun -np R moe-ep run ...`,\n"
        "                    where --ranks, --exchange and --overlap are not used) [shm]\n"
        "  --check on|off    run the golden check; off for layers too big for\n"
        "                    one process [on]\n"
        "  --exchange X      direct: each sender writes its rows into the owner's\n"
        "                    window in shared memory and the rings carry notes;\n"
        "                    rings: the rows travel in the rings [direct; mpi\n"
        "                    always moves rows in MPI messages]\n"
        "  --overlap on|off  direct exchange: start each expert as soon as its\n"
        "                    rows are in (on), or wait for all rows (off) [on]\n"
        "  --threads N       OpenBLAS threads of each rank and of the golden\n"
        "                    check, 1 to 64 [cores / ranks, at least 1; 1 under\n"
        "                    mpi]\n"
        "  --input FILE      .npy array (T, H) of tokens, float32, float16 or\n"
        "                    float64, used instead of random ones; sets T and H\n"
        "  --output FILE     write the layer output (T, H) as a float32 .npy file\n"
        "  --dump DIR        write every stage of the forward as .npy files into\n"
        "                    DIR (see docs/DUMPS.md) and check each bit for bit\n"
        "  --timeout SECONDS fail a wait on a peer after this long without\n"
        "                    progress [60]\n"
        "  --ring-size BYTES data bytes of each of the R*R rings, a power of two\n"
        "                    from 64 to 1G; K, M, G suffixes allowed [1M, halved\n"
        "                    until the rings take at most 256M; 64K at R = 64]\n"
        "  -h, --help        show this text\n"
        "\n"
        "exit status: 0 bitwise equal, 1 golden mismatch, 2 invalid usage or\n"
        "input, 3 runtime failure (a rank died or a wait timed out), 128 + the\n"
        "signal number when SIGINT, SIGTERM or SIGHUP stopped the run\n",
        MOE_MAX_RANKS);
}

int moe_run_parse(struct moe_run_options *o, int argc, char **argv)
{
    int64_t v;
    int rc;
    for (int i = 0; i < argc; i++) {
        const char *flag = argv[i];
        if (!strcmp(flag, "-h") || !strcmp(flag, "--help"))
            return 1;
        static const char *const known[] = {
            "--ranks", "--tokens", "--hidden", "--ffn", "--experts", "--top-k",
            "--seed", "--input", "--output", "--timeout", "--ring-size", "--model",
            "--layer", "--dump", "--router", "--renormalize", "--scaling-factor",
            "--capacity-factor", "--min-capacity", "--expert-capacity", "--drop-policy",
            "--skew", "--steps", "--bias-update-rate", "--stats", "--trace",
            "--transport", "--check", "--plot", "--exchange", "--overlap",
            "--threads", NULL,
        };
        const char *text;
        if ((rc = moe_next_option("run", known, argc, argv, &i, &text)))
            return rc;

        if (!strcmp(flag, "--hidden") || !strcmp(flag, "--ffn") ||
            !strcmp(flag, "--experts") || !strcmp(flag, "--top-k"))
            o->shape_flag_given = 1;

        if (!strcmp(flag, "--ranks")) {
            if ((rc = moe_parse_int64(flag, text, 1, MOE_MAX_RANKS, &v)))
                return rc;
            o->ranks = (int)v;
            o->ranks_given = 1;
        } else if (!strcmp(flag, "--transport")) {
            enum moe_transport_kind kind;
            if ((rc = moe_transport_parse_kind(flag, text, &kind)))
                return rc;
            o->transport = kind;
        } else if (!strcmp(flag, "--check")) {
            if ((rc = moe_parse_on_off(flag, text, &o->check)))
                return rc;
        } else if (!strcmp(flag, "--threads")) {
            if ((rc = moe_parse_int64(flag, text, 1, 64, &v)))
                return rc;
            o->threads = (int)v;
        } else if (!strcmp(flag, "--overlap")) {
            if ((rc = moe_parse_on_off(flag, text, &o->overlap)))
                return rc;
            o->exchange_given = 1;
        } else if (!strcmp(flag, "--exchange")) {
            if (strcmp(text, "direct") && strcmp(text, "rings"))
                return moe_fail(-EINVAL, "invalid --exchange value '%s': expected direct "
                                "or rings", text);
            o->exchange_rings = !strcmp(text, "rings");
            o->exchange_given = 1;
        } else if (!strcmp(flag, "--tokens")) {
            if ((rc = moe_parse_int64(flag, text, 1, MAX_TOKENS, &o->shape.tokens)))
                return rc;
            o->tokens_given = 1;
        } else if (!strcmp(flag, "--hidden")) {
            if ((rc = moe_parse_int64(flag, text, 1, MAX_HIDDEN, &o->shape.hidden)))
                return rc;
            o->hidden_given = 1;
        } else if (!strcmp(flag, "--ffn")) {
            if ((rc = moe_parse_int64(flag, text, 1, MAX_FFN, &o->shape.ffn)))
                return rc;
        } else if (!strcmp(flag, "--experts")) {
            if ((rc = moe_parse_int64(flag, text, 1, MAX_EXPERTS, &o->shape.experts)))
                return rc;
        } else if (!strcmp(flag, "--top-k")) {
            if ((rc = moe_parse_int64(flag, text, 1, MAX_EXPERTS, &o->shape.top_k)))
                return rc;
        } else if (!strcmp(flag, "--seed")) {
            if ((rc = moe_parse_uint64(flag, text, &o->seed)))
                return rc;
        } else if (!strcmp(flag, "--input")) {
            o->input_path = text;
        } else if (!strcmp(flag, "--output")) {
            o->output_path = text;
        } else if (!strcmp(flag, "--timeout")) {
            if ((rc = moe_parse_double(flag, text, 0.001, 86400.0, &o->timeout_seconds)))
                return rc;
        } else if (!strcmp(flag, "--model")) {
            if (!text[0])
                return moe_fail(-EINVAL, "invalid --model value '': expected a "
                                "checkpoint directory");
            o->model_dir = text;
        } else if (!strcmp(flag, "--layer")) {
            if ((rc = moe_parse_int64(flag, text, 0, INT64_C(1) << 24, &o->layer)))
                return rc;
        } else if (!strcmp(flag, "--dump")) {
            if (!text[0])
                return moe_fail(-EINVAL, "invalid --dump value '': expected a "
                                "directory name");
            o->dump_dir = text;
        } else if (!strcmp(flag, "--router")) {
            if (!strcmp(text, "softmax-topk"))
                o->scoring = MOE_SCORING_SOFTMAX_TOPK;
            else if (!strcmp(text, "topk-softmax"))
                o->scoring = MOE_SCORING_TOPK_SOFTMAX;
            else if (!strcmp(text, "sigmoid"))
                o->scoring = MOE_SCORING_SIGMOID;
            else
                return moe_fail(-EINVAL, "invalid --router value '%s': expected "
                                "softmax-topk, topk-softmax or sigmoid", text);
        } else if (!strcmp(flag, "--renormalize")) {
            if ((rc = moe_parse_on_off(flag, text, &o->renormalize)))
                return rc;
        } else if (!strcmp(flag, "--scaling-factor")) {
            if ((rc = moe_parse_double(flag, text, 0.0, 1e6, &o->scaling_factor)))
                return rc;
            /* 0 would zero the output of every routed expert. */
            if (o->scaling_factor == 0.0)
                return moe_fail(-EINVAL, "invalid --scaling-factor value '%s': "
                                "expected a number above 0, up to 1e+06", text);
        } else if (!strcmp(flag, "--capacity-factor")) {
            if ((rc = moe_parse_double(flag, text, 0.0, 1e6, &o->capacity_factor)))
                return rc;
            o->capacity_factor_given = 1;
        } else if (!strcmp(flag, "--min-capacity")) {
            if ((rc = moe_parse_int64(flag, text, 0, INT64_C(1) << 40, &o->min_capacity)))
                return rc;
        } else if (!strcmp(flag, "--expert-capacity")) {
            if ((rc = moe_parse_int64(flag, text, 0, INT64_C(1) << 40, &o->expert_capacity)))
                return rc;
        } else if (!strcmp(flag, "--drop-policy")) {
            if (!strcmp(text, "position"))
                o->drop_policy = MOE_DROP_POSITION;
            else if (!strcmp(text, "probs"))
                o->drop_policy = MOE_DROP_PROBS;
            else
                return moe_fail(-EINVAL, "invalid --drop-policy value '%s': expected "
                                "position or probs", text);
        } else if (!strcmp(flag, "--skew")) {
            if ((rc = moe_parse_double(flag, text, 0.0, 100.0, &o->skew)))
                return rc;
        } else if (!strcmp(flag, "--steps")) {
            if ((rc = moe_parse_int64(flag, text, 1, MAX_STEPS, &o->steps)))
                return rc;
        } else if (!strcmp(flag, "--bias-update-rate")) {
            if ((rc = moe_parse_double(flag, text, 0.0, 1e3, &o->bias_update_rate)))
                return rc;
        } else if (!strcmp(flag, "--stats") || !strcmp(flag, "--trace")) {
            if (!text[0])
                return moe_fail(-EINVAL, "invalid %s value '': expected a file name",
                                flag);
            *(!strcmp(flag, "--stats") ? &o->stats_path : &o->trace_path) = text;
        } else if (!strcmp(flag, "--plot")) {
            o->plot_dir = text; /* checked in prepare_run() */
        } else if (!strcmp(flag, "--ring-size")) {
            if ((rc = moe_parse_bytes(flag, text, MOE_RING_MIN_CAPACITY, 1ULL << 30,
                                      &o->ring_bytes)))
                return rc;
            if (o->ring_bytes & (o->ring_bytes - 1))
                return moe_fail(-EINVAL, "invalid --ring-size value '%s': "
                                "expected a power of two", text);
        } else {
            return moe_fail(-EINVAL, "unknown option '%s'; see moe-ep run --help",
                            flag);
        }
    }
    if (o->transport == MOE_TRANSPORT_MPI && o->ring_bytes != 0)
        return moe_fail(-EINVAL, "invalid --ring-size with --transport mpi: MPI has "
                        "no rings");
    if (o->ring_bytes == 0)
        o->ring_bytes = moe_ring_default_capacity(o->ranks);
    if (o->model_dir && o->shape_flag_given)
        return moe_fail(-EINVAL, "--hidden, --ffn, --experts and --top-k cannot be "
                        "used with --model: the model's config.json sets them");
    if (o->layer >= 0 && !o->model_dir)
        return moe_fail(-EINVAL, "--layer needs --model");
    if (o->transport == MOE_TRANSPORT_MPI && o->ranks_given)
        return moe_fail(-EINVAL, "invalid --ranks with --transport mpi: mpirun -np "
                        "sets the rank count");
    if (o->transport == MOE_TRANSPORT_MPI && o->exchange_given)
        return moe_fail(-EINVAL, "invalid --exchange or --overlap with --transport mpi: "
                        "MPI moves the rows in its own messages");
    if (o->exchange_rings && !o->overlap)
        return moe_fail(-EINVAL, "invalid --overlap off with --exchange rings: only the "
                        "direct exchange starts experts before all rows are in");
    if (o->dump_dir && !o->check)
        return moe_fail(-EINVAL, "--dump cannot be used with --check off: the dump "
                        "checks every stage against the golden path");
    if (o->min_capacity > 0 && !o->capacity_factor_given)
        return moe_fail(-EINVAL, "--min-capacity %" PRId64 " needs --capacity-factor",
                        o->min_capacity);
    if (o->expert_capacity >= 0 && o->capacity_factor_given)
        return moe_fail(-EINVAL, "--expert-capacity and --capacity-factor cannot "
                        "be used together: each sets the capacity");
    if (!o->model_dir && o->shape.top_k > o->shape.experts)
        return moe_fail(-EINVAL, "invalid --top-k value %" PRId64 ": it exceeds "
                        "--experts %" PRId64, o->shape.top_k, o->shape.experts);
    return 0;
}

int moe_run_check_memory(const struct moe_shape *s, int dump)
{
    double floats = 3.0 * (double)s->experts * (double)s->ffn * (double)s->hidden +
                    3.0 * (double)s->shared_ffn * (double)s->hidden +
                    /* tokens, output, golden output */
                    3.0 * (double)s->tokens * (double)s->hidden +
                    /* golden and rank buffers, about (T*K, H) each */
                    6.0 * (double)s->tokens * (double)s->top_k * (double)s->hidden +
                    /* expert scratch, 2 x rows x F, at most T*K rows in all */
                    2.0 * (double)s->tokens * (double)s->top_k * (double)s->ffn;
    /* --dump: received rows and expert outputs, (T*K, H) each, in the run
     * area, in their copies, and in the golden path's stages */
    if (dump)
        floats += 5.0 * (double)s->tokens * (double)s->top_k * (double)s->hidden +
                  6.0 * (double)s->tokens * (double)s->experts;
    double need = floats * sizeof(float);
    double have = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    if (have > 0 && need > 0.8 * have)
        return moe_fail(-EINVAL, "the layer needs about %.1f GiB (tokens %" PRId64
                        ", hidden %" PRId64 ", ffn %" PRId64 ", experts %" PRId64
                        ", top-k %" PRId64 ") but this machine has %.1f GiB; "
                        "use smaller --tokens, --hidden, --ffn or --experts",
                        need / 1073741824.0, s->tokens, s->hidden, s->ffn,
                        s->experts, s->top_k, have / 1073741824.0);
    return 0;
}

static int load_tokens(struct moe_run_options *o, float **tokens)
{
    if (!o->input_path) {
        *tokens = moe_alloc_large((size_t)(o->shape.tokens * o->shape.hidden) * sizeof(float));
        if (!*tokens)
            return moe_fail(-ENOMEM, "out of memory for %" PRId64 " tokens",
                            o->shape.tokens);
        moe_tokens_random(*tokens, 0, o->shape.tokens, o->shape.hidden, o->seed);
        return 0;
    }

    int64_t rows, cols;
    /* Every token row needs at least 3 + 6K rows of its size in the run
     * (input, output, golden output and the (T*K, H) buffers), so a larger
     * file cannot run; reject it before reading it. */
    double memory = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    double rows_per_token = 3.0 + 6.0 * (double)o->shape.top_k;
    uint64_t limit = memory > 0 ? (uint64_t)(0.8 * memory / rows_per_token)
                                : UINT64_MAX;
    int rc = moe_npy_read_as_f32(o->input_path, limit, tokens, &rows, &cols);
    if (rc == -ENOMEM)
        return rc;
    if (rc) /* a missing or unreadable file is bad input too */
        return moe_fail(-EINVAL, "invalid --input file '%s': %s", o->input_path,
                        moe_error_message());
    const char *conflict = NULL;
    if (o->tokens_given && rows != o->shape.tokens)
        conflict = "--tokens";
    else if (o->hidden_given && cols != o->shape.hidden)
        conflict = "--hidden";
    else if (o->model_dir && cols != o->shape.hidden)
        conflict = "the model's hidden_size";
    if (conflict) {
        free(*tokens);
        *tokens = NULL;
        return moe_fail(-EINVAL, "invalid --input file '%s': its shape is (%"
                        PRId64 ", %" PRId64 "), but %s is %" PRId64, o->input_path,
                        rows, cols, conflict,
                        !strcmp(conflict, "--tokens") ? o->shape.tokens : o->shape.hidden);
    }
    if (rows < 1 || rows > MAX_TOKENS || cols < 1 || cols > MAX_HIDDEN) {
        free(*tokens);
        *tokens = NULL;
        return moe_fail(-EINVAL, "invalid --input file '%s': its shape is (%"
                        PRId64 ", %" PRId64 "), expected (T, H) with T from 1 "
                        "to %lld and H from 1 to %lld", o->input_path, rows,
                        cols, MAX_TOKENS, MAX_HIDDEN);
    }
    o->shape.tokens = rows;
    o->shape.hidden = cols;
    return 0;
}

void moe_compare_bits(const float *actual, const float *expected, int64_t count,
                      struct moe_compare *r)
{
    *r = (struct moe_compare){.equal = 1, .first = -1};
    if (memcmp(actual, expected, (size_t)count * sizeof(float)) == 0)
        return;
    for (int64_t i = 0; i < count; i++) {
        if (memcmp(&actual[i], &expected[i], sizeof(float)) == 0)
            continue;
        r->equal = 0;
        r->mismatches++;
        if (r->first < 0) {
            r->first = i;
            r->actual = actual[i];
            r->expected = expected[i];
        }
        /* A pair with a NaN has no finite difference: report NaN. */
        double d = fabs((double)actual[i] - (double)expected[i]);
        if (isnan(d) || isnan(r->max_abs_diff))
            r->max_abs_diff = NAN;
        else if (d > r->max_abs_diff)
            r->max_abs_diff = d;
    }
}

/* Flips the lowest mantissa bit of one output value when the debug variable
 * MOE_EP_CORRUPT_OUTPUT names its index, so that tests can see the golden
 * check report a mismatch end to end. */
static void corrupt_for_testing(float *output, int64_t count)
{
    const char *text = getenv("MOE_EP_CORRUPT_OUTPUT");
    if (!text || !*text)
        return;
    char *end;
    long long index = strtoll(text, &end, 10);
    if (*end == '\0' && index >= 0 && index < count) {
        uint32_t bits;
        memcpy(&bits, &output[index], sizeof bits);
        bits ^= 1;
        memcpy(&output[index], &bits, sizeof bits);
    }
}

/* Flips one drop flag of the last forward when the debug variable
 * MOE_EP_CORRUPT_KEPT names its index (token * K + slot), so that tests
 * can see the check of the drops report a mismatch. */
static void corrupt_kept_for_testing(uint8_t *kept, int64_t count)
{
    const char *text = getenv("MOE_EP_CORRUPT_KEPT");
    char *end;
    long long index = text && *text ? strtoll(text, &end, 10) : -1;
    if (text && *text && *end == '\0' && index >= 0 && index < count)
        kept[index] ^= 1;
}

/* Flips the lowest bit of one element of a dumped stage when the debug
 * variable MOE_EP_CORRUPT_STAGE is "STAGE:INDEX" (a stage name of
 * moe_stage_name()), so that tests can see the stage check report it. */
static void corrupt_stage_for_testing(struct moe_run_result *result)
{
    const char *text = getenv("MOE_EP_CORRUPT_STAGE");
    char name[32];
    long long index;
    if (!text || sscanf(text, "%31[a-z_]:%lld", name, &index) != 2)
        return;
    const struct moe_shape *s = &result->options.shape;
    for (int i = 0; i < MOE_STAGE_COUNT; i++) {
        if (strcmp(name, moe_stage_name(i)) || !result->stage[i] || index < 0)
            continue;
        if (index < moe_stage_count(s, i))
            ((uint32_t *)result->stage[i])[index] ^= 1;
    }
}

/* Fills `set` with the signals a run blocks: those that stop it (SIGINT,
 * SIGTERM, SIGHUP) and SIGXFSZ, so that a file size limit fails a write
 * with EFBIG instead of killing the launcher mid-write. */
static void run_signals(sigset_t *set)
{
    moe_stop_signals(set);
    sigaddset(set, SIGXFSZ);
}

/* Returns SIGINT, SIGTERM or SIGHUP if one is pending (they are blocked
 * during a run), consuming it, or 0. */
static int pending_stop_signal(void)
{
    sigset_t stop;
    moe_stop_signals(&stop);
    return moe_take_pending_signal(&stop);
}

static int run_blocked(struct moe_run_result *result);

/* Applies --router, --renormalize and --scaling-factor to the layer's
 * router and checks the result. */
static int apply_router_options(const struct moe_run_options *o, struct moe_weights *w)
{
    if (o->scoring >= 0)
        w->router.scoring = (enum moe_scoring)o->scoring;
    if (o->renormalize >= 0)
        w->router.renormalize = o->renormalize;
    if (!isnan(o->scaling_factor))
        w->router.scaling_factor = (float)o->scaling_factor;
    int rc = moe_router_check(&w->router, &w->shape);
    if (rc)
        return moe_fail(rc, "invalid router options: %s", moe_error_message());
    return 0;
}

/* Applies --skew and the capacity options to the layer. A checkpoint's
 * own capacity (Switch's expert_capacity) stays unless a flag sets one;
 * --capacity-factor 0 sets dropless. */
static int apply_layer_options(const struct moe_run_options *o, struct moe_weights *w)
{
    const struct moe_shape *s = &w->shape;
    if (o->skew > 0.0) {
        free(w->gate_bias);
        w->gate_bias = malloc((size_t)s->experts * sizeof(float));
        if (!w->gate_bias)
            return moe_fail(-ENOMEM, "out of memory for the gate bias");
        for (int64_t e = 0; e < s->experts; e++)
            w->gate_bias[e] = (float)(-o->skew * log((double)(e + 1)));
    }
    if (o->expert_capacity >= 0)
        w->capacity.limit = o->expert_capacity;
    else if (o->capacity_factor_given)
        w->capacity.limit = moe_capacity_from_factor(o->capacity_factor, o->min_capacity,
                                                     s->tokens, s->top_k, s->experts);
    if (o->drop_policy >= 0)
        w->capacity.policy = (enum moe_drop_policy)o->drop_policy;
    if (o->bias_update_rate > 0.0 && !w->score_bias) {
        w->score_bias = calloc((size_t)s->experts, sizeof(float));
        if (!w->score_bias)
            return moe_fail(-ENOMEM, "out of memory for the selection bias");
    }
    return 0;
}

/* Checks that the layer fits this machine. An MPI rank that loads only
 * its own experts is not checked; its share is what it allocates. */
static int check_memory(const struct moe_run_options *o)
{
    if (o->slice_ranks > 0)
        return 0;
    return moe_run_check_memory(&o->shape, o->dump_dir != NULL);
}

/* Builds a random layer and its tokens from the options. */
static int build_random_layer(struct moe_run_result *result, float **tokens,
                              struct moe_weights *weights)
{
    struct moe_run_options *o = &result->options;
    int rc;
    /* Check the memory first when the shape is known, so that a layer too
     * large for this machine is rejected before anything is allocated. */
    if (!o->input_path && (rc = check_memory(o)))
        return rc;
    if ((rc = load_tokens(o, tokens)) || (rc = check_memory(o)))
        return rc;
    int64_t first = 0, count = o->shape.experts;
    if (o->slice_ranks > 0)
        moe_block_range(o->shape.experts, o->slice_ranks, o->slice_rank, &first, &count);
    if ((rc = moe_weights_alloc_experts(weights, &o->shape, first, count, 0, 0)) == 0)
        moe_weights_fill_random(weights, o->seed);
    if (rc)
        return rc;
    result->family = "random";
    return 0;
}

/* Reads layer --layer of --model, and the tokens. */
static int build_model_layer(struct moe_run_result *result, float **tokens,
                             struct moe_weights *weights)
{
    struct moe_run_options *o = &result->options;
    struct moe_model_config config;
    int rc = moe_model_read_config(o->model_dir, &config);
    if (rc == -ENOMEM)
        return rc;
    if (rc) /* the message names config.json; add the flag it came from */
        return moe_fail(rc, "invalid --model '%s': %s", o->model_dir, moe_error_message());
    int64_t layer = o->layer >= 0 ? o->layer : moe_model_first_moe_layer(&config);
    if (layer < 0) {
        rc = moe_fail(-EINVAL, "invalid --model '%s': %s describes no MoE layer",
                      o->model_dir, config.path);
        goto out;
    }
    moe_model_shape(&config, o->shape.tokens, &o->shape);
    int64_t first = 0, count = o->shape.experts;
    if (o->slice_ranks > 0)
        moe_block_range(o->shape.experts, o->slice_ranks, o->slice_rank, &first, &count);
    if (!moe_model_is_moe_layer(&config, layer) || (!o->input_path &&
                                                    (rc = check_memory(o)))) {
        /* moe_model_load_layer() explains a dense layer */
        if (rc == 0)
            rc = moe_model_load_layer(o->model_dir, &config, layer, o->shape.tokens, weights);
        goto out;
    }
    if ((rc = load_tokens(o, tokens)) || (rc = check_memory(o)))
        goto out;
    rc = moe_model_load_layer_experts(o->model_dir, &config, layer, o->shape.tokens,
                                      first, count, weights);
    if (rc == -EINVAL && o->layer < 0 && strstr(moe_error_message(), "not found"))
        /* A checkpoint may hold only a later layer, as make-layer --layer
         * writes it. */
        rc = moe_fail(rc, "%s; without --layer the first MoE layer of %s, %" PRId64
                      ", runs, so give --layer to pick the one the files hold",
                      moe_error_message(), config.path, layer);
    if (rc)
        goto out;
    result->family = config.family->model_type;
    result->layer = layer;
out:
    moe_model_config_free(&config);
    return rc;
}

/* Copies the stage arrays out of the run area before the segment goes.
 * Each rank's received rows sit after the rows routed to the lower ranks'
 * experts; with drops that leaves gaps, which the copy closes. */
static int copy_stages(struct moe_run_result *result, void *area)
{
    const struct moe_run_area *a = area;
    const struct moe_shape *s = &a->shape;
    uint64_t offsets[MOE_STAGE_COUNT] = {
        [MOE_STAGE_LOGITS] = a->logits_offset,   [MOE_STAGE_SCORES] = a->scores_offset,
        [MOE_STAGE_IDS] = a->ids_offset,         [MOE_STAGE_WEIGHTS] = a->weights_offset,
        [MOE_STAGE_RECV_X] = a->recv_x_offset,   [MOE_STAGE_EXPERT_OUT] = a->expert_out_offset,
        [MOE_STAGE_SHARED_OUT] = a->shared_out_offset,
    };
    for (int i = 0; i < MOE_STAGE_COUNT; i++) {
        if (!offsets[i])
            continue;
        size_t bytes = (size_t)moe_stage_count(s, i) * 4; /* float and int32 alike */
        result->stage[i] = moe_alloc_large(bytes + 1);
        if (!result->stage[i])
            return moe_fail(-ENOMEM, "out of memory for the dumped stages");
        if (i != MOE_STAGE_RECV_X) {
            memcpy(result->stage[i], moe_run_area_at(area, offsets[i]), bytes);
            continue;
        }
        const float *from = moe_run_area_at(area, offsets[i]);
        float *to = result->stage[i];
        int R = (int)a->ranks;
        int64_t H = s->hidden, E = s->experts, routed_before = 0, at = 0;
        memset(to, 0, bytes);
        for (int r = 0; r < R; r++) {
            int64_t first, count, n = result->report[r].received_rows;
            memcpy(to + at * H, from + routed_before * H, (size_t)(n * H) * sizeof(float));
            at += n;
            moe_block_range(E, R, r, &first, &count);
            for (int src = 0; src < R; src++)
                for (int64_t e = first; e < first + count; e++)
                    routed_before += result->counts[src * E + e];
        }
    }
    return 0;
}

/* Copies everything the report needs out of the run area. */
static int copy_run_area(struct moe_run_result *result, void *area)
{
    const struct moe_run_area *a = area;
    const struct moe_shape *s = &a->shape;
    int64_t R = a->ranks, E = s->experts;
    memcpy(result->output, moe_run_area_output(area),
           (size_t)(s->tokens * s->hidden) * sizeof(float));
    memcpy(result->counts, moe_run_area_counts(area), (size_t)(R * E) * sizeof(int64_t));
    memcpy(result->kept_counts, moe_run_area_at(area, a->kept_counts_offset),
           (size_t)(R * E) * sizeof(int64_t));
    memcpy(result->kept, moe_run_area_at(area, a->kept_offset),
           (size_t)(s->tokens * s->top_k));
    memcpy(result->stats, moe_run_area_at(area, a->stats_offset),
           (size_t)(a->steps * result->stats_len) * sizeof(int64_t));
    memcpy(result->dropped, moe_run_area_at(area, a->dropped_offset),
           (size_t)(a->steps * E) * sizeof(int64_t));
    if (a->trace_capacity > 0) {
        size_t bytes = (size_t)(R * a->trace_capacity) * sizeof(struct moe_trace_event);
        result->trace = malloc(bytes);
        if (!result->trace)
            return moe_fail(-ENOMEM, "out of memory for the trace");
        memcpy(result->trace, moe_run_area_at(area, a->trace_offset), bytes);
        result->trace_capacity = a->trace_capacity;
    }
    return a->dump ? copy_stages(result, area) : 0;
}

/* Runs the golden path over every forward of the run. It moves its own
 * copy of the selection bias by the ranks' rule. Each forward's routing
 * stats and drops are checked bit for bit, and so are the last forward's
 * output, drop flags and stages. */
static int golden_steps(struct moe_run_result *result, const struct moe_weights *weights,
                        const float *tokens)
{
    const struct moe_run_options *o = &result->options;
    const struct moe_shape *s = &weights->shape;
    int64_t T = s->tokens, H = s->hidden, E = s->experts, K = s->top_k;
    int64_t len = result->stats_len;
    struct moe_weights w = *weights;
    float *bias = NULL, *batch = NULL;
    int rc = 0;

    result->routing_mismatch_step = -1;
    if (weights->score_bias) {
        bias = malloc((size_t)E * sizeof(float));
        if (!bias)
            return moe_fail(-ENOMEM, "golden path: out of memory for the bias");
        memcpy(bias, weights->score_bias, (size_t)E * sizeof(float));
    }
    w.score_bias = bias;
    if (o->steps > 1 && !o->input_path) {
        batch = moe_alloc_large((size_t)(T * H) * sizeof(float));
        if (!batch) {
            free(bias);
            return moe_fail(-ENOMEM, "golden path: out of memory for a batch");
        }
    }
    for (int64_t step = 0; step < o->steps && rc == 0; step++) {
        int last = step + 1 == o->steps;
        const float *x = tokens;
        if (step > 0 && batch) {
            moe_fill_uniform(batch, T * H, o->seed, MOE_STREAM_TOKENS, (uint32_t)step, 0,
                             1.0f);
            x = batch;
        }
        struct moe_golden_info g = {.want_stages = last && o->dump_dir != NULL};
        if ((rc = moe_golden_forward(&w, x, result->golden, &g)))
            break;
        if (result->routing_mismatch_step < 0 &&
            (memcmp(g.router_stats, result->stats + step * len,
                    (size_t)len * sizeof(int64_t)) != 0 ||
             memcmp(g.dropped_per_expert, result->dropped + step * E,
                    (size_t)E * sizeof(int64_t)) != 0))
            result->routing_mismatch_step = step;
        if (last) {
            moe_compare_bits(result->output, result->golden, T * H, &result->check);
            result->kept_equal = memcmp(g.kept, result->kept, (size_t)(T * K)) == 0;
            if (o->dump_dir)
                moe_dump_check(result, &g, x);
        }
        if (bias && o->bias_update_rate > 0.0)
            moe_selection_bias_update(bias, g.router_stats, E, K,
                                      (float)o->bias_update_rate);
        moe_golden_info_free(&g);
    }
    free(bias);
    if (batch && rc == 0 && o->steps > 1)
        result->last_tokens = batch;
    else
        free(batch);
    return rc;
}

int moe_run(const struct moe_run_options *options, struct moe_run_result *result)
{
    /* SIGINT, SIGTERM and SIGHUP stay blocked for the whole run. The launcher
     * collects them during the forward; between the later steps they are
     * checked, so that the run stops cleanly and never leaves a partial
     * output file. */
    sigset_t blocked, original;
    run_signals(&blocked);
    sigprocmask(SIG_BLOCK, &blocked, &original);

    *result = (struct moe_run_result){.options = *options};
    int rc = run_blocked(result);

    int sig = pending_stop_signal();
    if (sig && !result->launcher_signal)
        result->launcher_signal = sig;
    if (result->launcher_signal && rc == 0)
        rc = moe_fail(-ECANCELED, "the run was stopped by signal %d",
                      result->launcher_signal);
    moe_discard_size_limit_signal(); /* the output write reported EFBIG */
    sigprocmask(SIG_SETMASK, &original, NULL);
    return rc;
}

/* Returns 1 when paths a and b name the same file: the same path after
 * following symbolic links, or the same inode. */
static int same_file(const char *a, const char *b)
{
    char ra[4096], rb[4096];
    struct stat sa, sb;
    if (stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
        sa.st_ino == sb.st_ino)
        return 1;
    if (moe_resolve_output_path(a, ra, sizeof ra) || moe_resolve_output_path(b, rb, sizeof rb))
        return 0;
    size_t la = strlen(ra), lb = strlen(rb);
    while (la > 1 && ra[la - 1] == '/')
        ra[--la] = '\0';
    while (lb > 1 && rb[lb - 1] == '/')
        rb[--lb] = '\0';
    return !strcmp(ra, rb);
}

/* Returns 1 when `path` names one of the files a --dump into `dir` writes. */
static int is_dump_file(const char *path, const char *dir)
{
    char copy[4096];
    snprintf(copy, sizeof copy, "%s", path);
    char *slash = strrchr(copy, '/');
    const char *name = copy, *parent = ".";
    if (slash) {
        *slash = '\0';
        name = slash + 1;
        parent = copy[0] ? copy : "/";
    }
    if (!same_file(parent, dir))
        return 0;
    int64_t rank;
    if (moe_dump_rank_file(name, &rank))
        return 1;
    for (int i = 0; moe_dump_stages[i]; i++)
        if (!strcmp(moe_dump_stages[i], name))
            return 1;
    return 0;
}

/* Returns 1 when `path`, after following its symbolic links, names one of
 * the files a --plot into `dir` writes. */
static int is_plot_file(const char *path, const char *dir)
{
    char target[4096];
    if (moe_resolve_output_path(path, target, sizeof target))
        return 0;
    char *slash = strrchr(target, '/');
    if (!moe_plot_is_file_name(slash ? slash + 1 : target))
        return 0;
    if (!slash)
        return same_file(".", dir);
    *slash = '\0';
    return same_file(target[0] ? target : "/", dir);
}

/* Rejects two flags that name the same file, and an output that a --dump
 * or --plot would overwrite, before anything runs. */
static int check_distinct_paths(const struct moe_run_options *o)
{
    const char *flags[] = {"--input", "--output", "--stats", "--trace"};
    const char *paths[] = {o->input_path, o->output_path, o->stats_path, o->trace_path};
    for (int i = 0; i < 4; i++) {
        if (!paths[i])
            continue;
        for (int j = i + 1; j < 4; j++)
            if (paths[j] && same_file(paths[i], paths[j]))
                return moe_fail(-EINVAL, "invalid %s '%s': it is also the %s file",
                                flags[j], paths[j], flags[i]);
        if (i > 0 && o->dump_dir && (same_file(paths[i], o->dump_dir) ||
                                     is_dump_file(paths[i], o->dump_dir)))
            return moe_fail(-EINVAL, "invalid %s '%s': --dump '%s' writes it",
                            flags[i], paths[i], o->dump_dir);
        if (o->plot_dir && (same_file(paths[i], o->plot_dir) ||
                            is_plot_file(paths[i], o->plot_dir)))
            return moe_fail(-EINVAL, "invalid %s '%s': --plot '%s' writes it",
                            flags[i], paths[i], o->plot_dir);
    }
    return 0;
}

/* Checks the output paths, builds the layer and its tokens, applies the
 * options, and allocates the result's arrays. */
static int prepare_run(struct moe_run_result *result, struct moe_weights *weights,
                       float **tokens)
{
    struct moe_run_options *o = &result->options;
    int rc;

    result->layer = -1;
    result->stage_mismatch = -1;
    result->routing_mismatch_step = -1;
    result->kept_equal = 1;
    if (o->output_path && (rc = moe_check_output_path("--output", o->output_path)))
        return rc;
    if (o->stats_path && (rc = moe_check_output_path("--stats", o->stats_path)))
        return rc;
    if (o->trace_path && (rc = moe_check_output_path("--trace", o->trace_path)))
        return rc;
    if (o->dump_dir && (rc = moe_dump_check_dir(o->dump_dir, o->output_path)))
        return rc;
    if (o->plot_dir && (rc = moe_plot_check_dir(o->plot_dir)))
        return rc;
    if ((rc = check_distinct_paths(o)))
        return rc;
    const struct moe_shape *s = &o->shape;
    if (o->model_dir)
        rc = build_model_layer(result, tokens, weights);
    else
        rc = build_random_layer(result, tokens, weights);
    if (rc || (rc = apply_router_options(o, weights)) ||
        (rc = apply_layer_options(o, weights)))
        return rc;
    result->router = weights->router;
    result->capacity = weights->capacity;
    result->aux_loss_coef = weights->aux_loss_coef;
    result->z_loss_coef = weights->z_loss_coef;
    moe_blas_init();
    result->blas_threads = o->threads ? o->threads
                           : o->transport == MOE_TRANSPORT_MPI ? 1
                                                               : moe_blas_threads_auto(o->ranks);

    int64_t values = s->tokens * s->hidden, E = s->experts, R = o->ranks;
    result->stats_len = moe_router_stats_len(E);
    result->output = moe_alloc_large((size_t)values * sizeof(float));
    result->golden = moe_alloc_large((size_t)values * sizeof(float));
    result->counts = malloc((size_t)(R * E) * sizeof(int64_t));
    result->kept_counts = malloc((size_t)(R * E) * sizeof(int64_t));
    result->kept = malloc((size_t)(s->tokens * s->top_k) + 1);
    result->stats = malloc((size_t)(o->steps * result->stats_len) * sizeof(int64_t));
    result->dropped = malloc((size_t)(o->steps * E) * sizeof(int64_t));
    if (!result->output || !result->golden || !result->counts || !result->kept_counts ||
        !result->kept || !result->stats || !result->dropped)
        return moe_fail(-ENOMEM, "out of memory for the output of %" PRId64
                        " tokens", s->tokens);
    return 0;
}

/* Runs the golden check unless --check off, then writes the files. */
static int finish_run(struct moe_run_result *result, const struct moe_weights *weights,
                      const float *tokens)
{
    const struct moe_run_options *o = &result->options;
    const struct moe_shape *s = &o->shape;
    int rc = 0;
    if ((result->launcher_signal = pending_stop_signal()))
        return -ECANCELED;
    if (o->check) {
        moe_fault_inject("launcher", "golden");
        /* The same thread count as the ranks, for the same bits. */
        moe_blas_set_threads(result->blas_threads);
        int64_t start = moe_now_ns();
        if ((rc = golden_steps(result, weights, tokens)))
            return rc;
        result->golden_ns = moe_now_ns() - start;
    } else {
        result->check = (struct moe_compare){.equal = 1, .first = -1};
    }

    if ((result->launcher_signal = pending_stop_signal()))
        return -ECANCELED;
    if (o->output_path)
        rc = moe_npy_write_f32(o->output_path, result->output, s->tokens, s->hidden);
    if (rc == 0 && o->dump_dir)
        rc = moe_dump_write(o->dump_dir, result,
                            result->last_tokens ? result->last_tokens : tokens);
    if (rc == 0 && o->stats_path)
        rc = moe_run_write_stats(o->stats_path, result);
    if (rc == 0 && o->trace_path)
        rc = moe_run_write_trace(o->trace_path, result);
    if (rc == 0 && o->plot_dir)
        rc = moe_plot_write(o->plot_dir, result);
    return rc;
}

static int run_blocked(struct moe_run_result *result)
{
    struct moe_run_options *o = &result->options;
    struct moe_weights weights = {0};
    float *tokens = NULL;
    struct moe_launch launch = {.fd = -1};
    const struct moe_shape *s = &o->shape;
    int rc = prepare_run(result, &weights, &tokens);
    if (rc)
        goto out;

    /* Distributed forward. */
    struct moe_run_area_spec spec = {.dump = o->dump_dir != NULL, .steps = o->steps,
                                     .trace = o->trace_path || o->plot_dir,
                                     .windows = !o->exchange_rings};
    struct moe_dist_input input = {.weights = &weights, .tokens = tokens,
                                   .seed = o->seed, .draw_tokens = !o->input_path,
                                   .bias_update_rate = (float)o->bias_update_rate,
                                   .wait_all_rows = !o->overlap,
                                   .blas_threads = result->blas_threads};
    struct moe_launch_config config = {
        .ranks = o->ranks,
        .ring_capacity = o->ring_bytes,
        .app_bytes = moe_run_area_bytes(s, o->ranks, &spec),
        .timeout_ns = (int64_t)(o->timeout_seconds * 1e9),
        .rank_main = moe_dist_rank_main,
        .arg = &input,
    };
    if ((rc = moe_launch_create(&launch, &config)))
        goto out;
    void *area = moe_segment_app(launch.segment);
    moe_run_area_init(area, s, o->ranks, &spec);

    result->launch_start_ns = moe_now_ns();
    rc = moe_launch_run(&launch);
    result->forward_ns = launch.elapsed_ns;
    result->launcher_signal = launch.launcher_signal;
    for (int r = 0; r < o->ranks; r++) {
        struct moe_rank_slot *slot = moe_segment_slot(launch.segment, r);
        memcpy(result->step_ns[r], slot->step_ns, sizeof slot->step_ns);
        memcpy(result->wait_ns[r], slot->wait_ns, sizeof slot->wait_ns);
        result->report[r] = *moe_run_area_report(area, r);
    }
    /* The rank that failed first comes first, then the others that failed or
     * had to be killed. */
    if (launch.failed_rank >= 0)
        moe_launch_describe(&launch, launch.failed_rank,
                            result->failure[result->failures++],
                            sizeof result->failure[0]);
    for (int r = 0; r < o->ranks; r++) {
        const struct moe_rank_outcome *oc = &launch.outcome[r];
        int failed = oc->signal || (oc->exit_status != 0 &&
                                    oc->exit_status != MOE_RANK_EXIT_ABORTED);
        if (r != launch.failed_rank && oc->pid && failed)
            moe_launch_describe(&launch, r, result->failure[result->failures++],
                                sizeof result->failure[0]);
    }
    if (rc) {
        if (rc == -ECANCELED && launch.failed_rank >= 0)
            moe_fail(rc, "the distributed forward failed; the first message "
                     "above is the first rank that reported an error");
        else if (rc == -ECANCELED)
            moe_fail(rc, "the distributed forward was stopped");
        goto out;
    }
    if ((rc = copy_run_area(result, area)))
        goto out;
    corrupt_stage_for_testing(result);
    corrupt_kept_for_testing(result->kept, s->tokens * s->top_k);
    moe_launch_destroy(&launch);
    corrupt_for_testing(result->output, s->tokens * s->hidden);
    rc = finish_run(result, &weights, tokens);

out:
    moe_launch_destroy(&launch);
    moe_weights_free(&weights);
    free(tokens);
    return rc;
}

void moe_run_result_free(struct moe_run_result *result)
{
    free(result->output);
    free(result->golden);
    free(result->counts);
    free(result->kept_counts);
    free(result->kept);
    free(result->stats);
    free(result->dropped);
    free(result->trace);
    free(result->last_tokens);
    result->output = result->golden = result->last_tokens = NULL;
    result->counts = result->kept_counts = result->stats = result->dropped = NULL;
    result->kept = NULL;
    result->trace = NULL;
    for (int i = 0; i < MOE_STAGE_COUNT; i++) {
        free(result->stage[i]);
        result->stage[i] = NULL;
    }
}

/* ---- the MPI driver ---------------------------------------------------- */

/* Gathers one region of the run area to the same place in rank 0's area.
 * Rank r sends units [first[r], first[r] + count[r]) of unit_bytes each,
 * and rank 0's own units are already in place. */
static int gather_units(struct moe_transport *t, void *area, uint64_t offset,
                        uint64_t unit_bytes, const int64_t *first, const int64_t *count)
{
    int R = t->ranks, me = t->rank;
    uint64_t *table = calloc(2 * (size_t)R, sizeof *table);
    if (!table)
        return moe_fail(-ENOMEM, "rank %d: out of memory for a gather", me);
    for (int r = 1; r < R; r++) {
        table[r] = (uint64_t)count[r] * unit_bytes;
        table[R + r] = offset + (uint64_t)first[r] * unit_bytes;
    }
    const char *send = (const char *)area + offset + (uint64_t)first[me] * unit_bytes;
    uint64_t send_bytes = me == 0 ? 0 : (uint64_t)count[me] * unit_bytes;
    int rc = moe_transport_gatherv(t, send, send_bytes, area, table, table + R, 0);
    free(table);
    return rc;
}

/* Gathers a region of which each rank wrote its own token block. */
static int gather_token_blocks(struct moe_transport *t, void *area, uint64_t offset,
                               uint64_t bytes_per_token, int64_t tokens)
{
    int R = t->ranks;
    int64_t first[MOE_MAX_RANKS], count[MOE_MAX_RANKS];
    for (int r = 0; r < R; r++)
        moe_block_range(tokens, R, r, &first[r], &count[r]);
    return gather_units(t, area, offset, bytes_per_token, first, count);
}

/* Gathers a region of which rank r wrote entry r. */
static int gather_per_rank(struct moe_transport *t, void *area, uint64_t offset,
                           uint64_t entry_bytes)
{
    int64_t first[MOE_MAX_RANKS], count[MOE_MAX_RANKS];
    for (int r = 0; r < t->ranks; r++) {
        first[r] = r;
        count[r] = 1;
    }
    return gather_units(t, area, offset, entry_bytes, first, count);
}

/* Gathers an int64 array of `rows` rows of E, of which each rank wrote the
 * columns of the experts it owns, and merges the columns on rank 0. */
static int gather_expert_columns(struct moe_transport *t, void *area, uint64_t offset,
                                 int64_t rows, int64_t experts)
{
    int R = t->ranks, me = t->rank;
    uint64_t bytes = (uint64_t)(rows * experts) * sizeof(int64_t);
    int64_t *all = me == 0 ? malloc((size_t)R * bytes + 1) : NULL;
    uint64_t *table = calloc(2 * (size_t)R, sizeof *table);
    int rc = 0;
    if ((me == 0 && !all) || !table) {
        rc = moe_fail(-ENOMEM, "rank %d: out of memory for a gather", me);
        goto out;
    }
    for (int r = 0; r < R; r++) {
        table[r] = bytes;
        table[R + r] = (uint64_t)r * bytes;
    }
    int64_t *mine = (int64_t *)((char *)area + offset);
    rc = moe_transport_gatherv(t, mine, bytes, all, table, table + R, 0);
    if (rc == 0 && me == 0)
        for (int r = 1; r < R; r++) {
            int64_t first, count;
            moe_block_range(experts, R, r, &first, &count);
            const int64_t *theirs = all + (int64_t)r * rows * experts;
            for (int64_t row = 0; row < rows; row++)
                for (int64_t e = first; e < first + count; e++)
                    mine[row * experts + e] = theirs[row * experts + e];
        }
out:
    free(all);
    free(table);
    return rc;
}

/* Collects every rank's part of the run area and its step times on rank
 * 0, so that rank 0's area reads as the shared segment's would. */
static int gather_run_area(struct moe_transport *t, void *area,
                           struct moe_rank_slot *slot, struct moe_run_result *result)
{
    struct moe_run_area *a = area;
    const struct moe_shape *s = &a->shape;
    int64_t T = s->tokens, H = s->hidden, E = s->experts, K = s->top_k;
    int R = t->ranks, me = t->rank;
    int64_t *counts = moe_run_area_counts(area);
    int rc;

    /* Every rank needs the whole routed layout to find where its received
     * rows sit in the dump. */
    int64_t *row = malloc((size_t)E * sizeof(int64_t) + 1);
    if (!row)
        return moe_fail(-ENOMEM, "rank %d: out of memory", me);
    memcpy(row, counts + me * E, (size_t)E * sizeof(int64_t));
    rc = moe_transport_allgather(t, row, (uint64_t)E * sizeof(int64_t), counts);
    free(row);
    if (rc == 0)
        rc = gather_token_blocks(t, area, a->output_offset, (uint64_t)H * sizeof(float), T);
    if (rc == 0)
        rc = gather_token_blocks(t, area, a->kept_offset, (uint64_t)K, T);
    if (rc == 0)
        rc = gather_expert_columns(t, area, a->kept_counts_offset, R, E);
    if (rc == 0)
        rc = gather_expert_columns(t, area, a->dropped_offset, a->steps, E);
    if (rc == 0)
        rc = gather_per_rank(t, area, a->rank_report_offset, sizeof(struct moe_rank_report));
    if (rc == 0 && a->trace_offset)
        rc = gather_per_rank(t, area, a->trace_offset,
                             (uint64_t)a->trace_capacity * sizeof(struct moe_trace_event));
    if (rc == 0 && a->dump) {
        struct {
            uint64_t offset, bytes_per_token;
        } stages[] = {
            {a->logits_offset, (uint64_t)E * 4},     {a->scores_offset, (uint64_t)E * 4},
            {a->ids_offset, (uint64_t)K * 4},        {a->weights_offset, (uint64_t)K * 4},
            {a->expert_out_offset, (uint64_t)(K * H) * 4},
            {a->shared_out_offset, (uint64_t)H * 4},
        };
        for (size_t i = 0; rc == 0 && i < sizeof stages / sizeof stages[0]; i++)
            if (stages[i].offset)
                rc = gather_token_blocks(t, area, stages[i].offset,
                                         stages[i].bytes_per_token, T);
        /* Rank r's received rows start after those routed to lower ranks'
         * experts. */
        int64_t first[MOE_MAX_RANKS], count[MOE_MAX_RANKS], before = 0;
        for (int r = 0; r < R; r++) {
            int64_t efirst, ecount;
            moe_block_range(E, R, r, &efirst, &ecount);
            first[r] = before;
            count[r] = moe_run_area_report(area, r)->received_rows;
            for (int src = 0; src < R; src++)
                for (int64_t e = efirst; e < efirst + ecount; e++)
                    before += counts[src * E + e];
        }
        if (rc == 0)
            rc = gather_units(t, area, a->recv_x_offset, (uint64_t)H * sizeof(float),
                              first, count);
    }

    /* The step times, from each rank's private slot. */
    uint64_t times[2 * MOE_STEP_COUNT];
    memcpy(times, slot->step_ns, sizeof slot->step_ns);
    memcpy(times + MOE_STEP_COUNT, slot->wait_ns, sizeof slot->wait_ns);
    uint64_t *all_times = me == 0 ? malloc((size_t)R * sizeof times) : NULL;
    uint64_t table[2 * MOE_MAX_RANKS];
    for (int r = 0; r < R; r++) {
        table[r] = sizeof times;
        table[R + r] = (uint64_t)r * sizeof times;
    }
    if (rc == 0 && me == 0 && !all_times)
        rc = moe_fail(-ENOMEM, "rank 0: out of memory");
    if (rc == 0)
        rc = moe_transport_gatherv(t, times, sizeof times, all_times, table, table + R, 0);
    if (rc == 0 && me == 0)
        for (int r = 0; r < R; r++) {
            memcpy(result->step_ns[r], all_times + r * 2 * MOE_STEP_COUNT,
                   sizeof result->step_ns[r]);
            memcpy(result->wait_ns[r], all_times + (r * 2 + 1) * MOE_STEP_COUNT,
                   sizeof result->wait_ns[r]);
            result->report[r] = *moe_run_area_report(area, r);
        }
    free(all_times);
    return rc;
}

/* Agrees on the set-up's outcome: every rank learns whether any failed,
 * and the lowest failing rank's message is the one printed. Returns the
 * first failure's code on every rank, or 0. */
static int agree_on_setup(struct moe_transport *t, int rc, int *print_here)
{
    int64_t codes[MOE_MAX_RANKS] = {0};
    codes[t->rank] = rc;
    int agreed = moe_transport_allreduce_i64(t, codes, t->ranks);
    if (agreed)
        return agreed;
    *print_here = 0;
    for (int r = 0; r < t->ranks; r++)
        if (codes[r]) {
            *print_here = r == t->rank;
            return (int)codes[r];
        }
    return 0;
}

int moe_run_mpi(const struct moe_run_options *options, struct moe_run_result *result,
                int *is_root)
{
    struct moe_transport t;
    struct moe_weights weights = {0};
    float *tokens = NULL, *area = NULL;
    *result = (struct moe_run_result){.options = *options};
    *is_root = 1;
    int rc = moe_transport_mpi_open(&t, (int64_t)(options->timeout_seconds * 1e9));
    if (rc)
        return rc;
    struct moe_run_options *o = &result->options;
    int R = t.ranks, me = t.rank, print_here = 1;
    *is_root = me == 0;
    o->ranks = R;

    /* Rank 0 loads the whole layer for the golden check, and the others
     * load only their own experts. */
    if (me != 0 || !o->check) {
        o->slice_rank = me;
        o->slice_ranks = R;
    }
    char error[MOE_ERROR_TEXT_BYTES + 64] = "";
    if (R > MOE_MAX_RANKS)
        rc = moe_fail(-EINVAL, "mpirun started %d ranks; at most %d are supported",
                      R, MOE_MAX_RANKS);
    if (rc == 0)
        rc = prepare_run(result, &weights, &tokens);
    if (rc)
        snprintf(error, sizeof error, "%s", moe_error_message());
    int agreed = agree_on_setup(&t, rc, &print_here);
    if (agreed) {
        /* Only the lowest failing rank keeps its message for main to print. */
        if (rc && print_here)
            moe_fail(agreed, "%s", error);
        else
            moe_fail(agreed, "%s", "");
        *is_root = rc && print_here;
        rc = agreed;
        goto out;
    }

    const struct moe_shape *s = &o->shape;
    struct moe_run_area_spec spec = {.dump = o->dump_dir != NULL, .steps = o->steps,
                                     .trace = o->trace_path || o->plot_dir};
    uint64_t area_bytes = moe_run_area_bytes(s, R, &spec);
    area = moe_alloc_large((size_t)area_bytes + 1);
    if (!area) {
        fprintf(stderr, "moe-ep run: rank %d: out of memory for the run area\n", me);
        moe_transport_abort(&t, 3);
        rc = -ENOMEM;
        goto out;
    }
    memset(area, 0, (size_t)area_bytes);
    moe_run_area_init(area, s, R, &spec);
    struct moe_rank_slot slot;
    memset(&slot, 0, sizeof slot);
    struct moe_dist_input input = {.weights = &weights, .tokens = tokens,
                                   .seed = o->seed, .draw_tokens = !o->input_path,
                                   .bias_update_rate = (float)o->bias_update_rate,
                                   .blas_threads = result->blas_threads};
    struct moe_dist_env env = {.transport = &t, .area = area, .area_capacity = area_bytes,
                               .slot = &slot};

    if ((rc = moe_transport_barrier(&t)) == 0) {
        result->launch_start_ns = moe_now_ns();
        rc = moe_dist_run(&env, &input);
        result->forward_ns = moe_now_ns() - result->launch_start_ns;
    }
    if (rc == 0)
        rc = gather_run_area(&t, area, &slot, result);
    if (rc) {
        /* The peers may be inside a collective that will never complete. */
        fprintf(stderr, "moe-ep run: rank %d: %s\n", me, moe_error_message());
        fflush(stderr);
        moe_transport_abort(&t, 3);
        goto out;
    }
    if (me == 0) {
        if ((rc = copy_run_area(result, area)) == 0) {
            corrupt_stage_for_testing(result);
            corrupt_kept_for_testing(result->kept, s->tokens * s->top_k);
            corrupt_for_testing(result->output, s->tokens * s->hidden);
            rc = finish_run(result, &weights, tokens);
        }
    }

out:
    moe_transport_close(&t);
    free(area);
    moe_weights_free(&weights);
    free(tokens);
    return rc;
}
