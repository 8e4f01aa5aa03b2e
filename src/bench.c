/*
 * bench.c - `moe-ep bench`: options, the report, and the order of the
 * measurements. The measurements themselves are in bench_floor.c (sgemm,
 * memcpy) and bench_layer.c (forward, all-to-all).
 *
 * Runs in the launcher process. Every figure is measured first and the
 * report printed after, so that `out` and --markdown get the same text and
 * a failed run writes no file.
 *
 * Limits: the figures come from one run on one machine. On a shared machine
 * they vary by tens of percent between runs, which is why every floor is
 * measured again in the same run and the load average is printed beside
 * them. The bench checks no layer output; `moe-ep run` and the tests do.
 */
#include "moe_bench_internal.h"
#include "moe_bench_peers.h"
#include "moe_file.h"
#include "moe_args.h"
#include "moe_error.h"
#include "moe_launch.h"
#include "moe_run.h"
#include "moe_transport.h"

#include <cblas.h>
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

/* Largest accepted dimensions, the same as `moe-ep run` accepts. */
#define MAX_TOKENS (1LL << 24)
#define MAX_HIDDEN (1LL << 16)
#define MAX_FFN (1LL << 18)
#define MAX_EXPERTS 4096

/* Targets the report checks; see the header it prints for their meaning. */
static const double FORWARD_TARGET_RATIO = 1.1;
static const double DECODE_TARGET_RATIO = 1.2;
static const double ALLTOALL_TARGET_FRACTION = 0.7;
static const uint64_t ALLTOALL_TARGET_BYTES = 1 << 20;

void moe_bench_options_default(struct moe_bench_options *o)
{
    *o = (struct moe_bench_options){
        .ranks = 2,
        .tokens = 4096,
        .hidden = 1024,
        .ffn = 1024,
        .experts = 16,
        .top_k = 2,
        .repeats = 5,
        .ring_bytes = 1 << 20, /* moe_ring_default_capacity() up to 16 ranks */
    };
}

void moe_bench_usage(FILE *out)
{
    fprintf(out,
        "usage: moe-ep bench [options]\n"
        "\n"
        "Measures this machine's sgemm, memcpy and memory read rates, then the\n"
        "forward time of one expert-parallel layer (prefill, decode, and its\n"
        "scaling over tokens and ranks) and the all-to-all bandwidth, and\n"
        "prints each next to its floor as a Markdown report. It checks no\n"
        "output: use moe-ep run for that. The defaults take about a minute\n"
        "on 2 cores.\n"
        "\n"
        "options (defaults in brackets):\n"
        "  --ranks R         ranks of the main forward figure, 1 to %d; the\n"
        "                    report adds 1, 2, 4 and 8 ranks [2]\n"
        "  --tokens T        tokens in the whole batch [4096]\n"
        "  --hidden H        hidden size, in elements [1024]\n"
        "  --ffn F           expert FFN (intermediate) size, in elements [1024]\n"
        "  --experts E       experts [16]\n"
        "  --top-k K         experts per token, 1 to E [2]\n"
        "  --repeats N       timed repetitions of every figure, 1 to %d; the\n"
        "                    report gives the best and the median [5]\n"
        "  --ring-size BYTES data bytes of each ring, a power of two from 64 to\n"
        "                    1G; K, M, G suffixes allowed [1M]\n"
        "  --markdown FILE   also write the report to FILE; the side-by-side\n"
        "                    sections that make bench-mpi appended to FILE\n"
        "                    are kept at its end\n"
        "  --quick           small shapes and short loops, for a smoke test of\n"
        "                    a few seconds; shape flags still apply\n"
        "  --transport T     shm, or mpi to measure the forward and the\n"
        "                    all-to-all over MPI at the rank count of\n"
        "                    `mpirun -np R`, next to the same figures on\n"
        "                    the rings and the expert-GEMM floor [shm]\n",
        MOE_MAX_RANKS, MOE_BENCH_MAX_REPEATS);
    moe_bench_peers_usage(out);
    fprintf(out, "  -h, --help        show this text\n");
}

/* Sets the --quick shape on every dimension the command line left alone. */
static void apply_quick_defaults(struct moe_bench_options *o, const int *flag_given)
{
    if (!flag_given[0])
        o->tokens = 512;
    if (!flag_given[1])
        o->hidden = 256;
    if (!flag_given[2])
        o->ffn = 256;
    if (!flag_given[3])
        o->experts = 8;
    if (!flag_given[4])
        o->repeats = 3;
}

/* Sets o->transport from a --transport value. mpirun sets the rank count
 * and MPI has no rings, so --transport mpi rejects --ranks and
 * --ring-size. */
static int parse_transport(struct moe_bench_options *o, int argc, char **argv,
                           const char *text)
{
    enum moe_transport_kind kind;
    int rc = moe_transport_parse_kind("--transport", text, &kind);
    if (rc)
        return rc;
    o->transport = kind;
    for (int i = 0; kind == MOE_TRANSPORT_MPI && i < argc; i++)
        if (!strcmp(argv[i], "--ranks") || !strcmp(argv[i], "--ring-size"))
            return moe_fail(-EINVAL, "invalid %s with --transport mpi: mpirun "
                            "-np sets the rank count, and MPI has no rings",
                            argv[i]);
    return 0;
}

int moe_bench_parse(struct moe_bench_options *o, int argc, char **argv)
{
    /* Whether --tokens, --hidden, --ffn, --experts and --repeats were given,
     * so that --quick changes only the others. */
    int flag_given[5] = {0};
    int64_t v;
    int rc;

    for (int i = 0; i < argc; i++) {
        const char *flag = argv[i];
        if (!strcmp(flag, "-h") || !strcmp(flag, "--help"))
            return 1;
        if (!strcmp(flag, "--quick")) {
            o->quick = 1;
            continue;
        }
        if ((rc = moe_bench_parse_peer_flag(o, argc, argv, &i)) != 0) {
            if (rc < 0)
                return rc;
            continue;
        }
        static const char *const known[] = {
            "--ranks", "--tokens", "--hidden", "--ffn", "--experts", "--top-k",
            "--repeats", "--ring-size", "--markdown", "--transport", NULL,
        };
        const char *text;
        if ((rc = moe_next_option("bench", known, argc, argv, &i, &text)))
            return rc;

        if (!strcmp(flag, "--ranks")) {
            if ((rc = moe_parse_int64(flag, text, 1, MOE_MAX_RANKS, &v)))
                return rc;
            o->ranks = (int)v;
        } else if (!strcmp(flag, "--tokens")) {
            if ((rc = moe_parse_int64(flag, text, 1, MAX_TOKENS, &o->tokens)))
                return rc;
            flag_given[0] = 1;
        } else if (!strcmp(flag, "--hidden")) {
            if ((rc = moe_parse_int64(flag, text, 1, MAX_HIDDEN, &o->hidden)))
                return rc;
            flag_given[1] = 1;
        } else if (!strcmp(flag, "--ffn")) {
            if ((rc = moe_parse_int64(flag, text, 1, MAX_FFN, &o->ffn)))
                return rc;
            flag_given[2] = 1;
        } else if (!strcmp(flag, "--experts")) {
            if ((rc = moe_parse_int64(flag, text, 1, MAX_EXPERTS, &o->experts)))
                return rc;
            flag_given[3] = 1;
        } else if (!strcmp(flag, "--top-k")) {
            if ((rc = moe_parse_int64(flag, text, 1, MAX_EXPERTS, &o->top_k)))
                return rc;
        } else if (!strcmp(flag, "--repeats")) {
            if ((rc = moe_parse_int64(flag, text, 1, MOE_BENCH_MAX_REPEATS, &v)))
                return rc;
            o->repeats = (int)v;
            flag_given[4] = 1;
        } else if (!strcmp(flag, "--ring-size")) {
            if ((rc = moe_parse_bytes(flag, text, MOE_RING_MIN_CAPACITY, 1ULL << 30,
                                      &o->ring_bytes)))
                return rc;
            if (o->ring_bytes & (o->ring_bytes - 1))
                return moe_fail(-EINVAL, "invalid --ring-size value '%s': "
                                "expected a power of two", text);
        } else if (!strcmp(flag, "--markdown")) {
            if (!*text)
                return moe_fail(-EINVAL, "invalid --markdown value '': "
                                "expected a file name");
            if ((rc = moe_check_output_path(flag, text)))
                return rc;
            o->markdown_path = text;
        } else if (!strcmp(flag, "--transport")) {
            if ((rc = parse_transport(o, argc, argv, text)))
                return rc;
        } else {
            return moe_fail(-EINVAL, "unknown option '%s'; see moe-ep bench "
                            "--help", flag);
        }
    }
    if (o->quick)
        apply_quick_defaults(o, flag_given);
    if ((rc = moe_bench_check_peer_flags(o)))
        return rc;
    if (o->top_k > o->experts)
        return moe_fail(-EINVAL, "invalid --top-k value %" PRId64 ": it exceeds "
                        "--experts %" PRId64, o->top_k, o->experts);
    /* A shape too large for this machine is bad input, found before the
     * floors take their time. */
    struct moe_shape shape = {.tokens = o->tokens, .hidden = o->hidden,
                              .ffn = o->ffn, .experts = o->experts,
                              .top_k = o->top_k};
    return moe_run_check_memory(&shape, 0);
}

/* ---- report ------------------------------------------------------------ */

static void print_header(FILE *out, const struct moe_bench_options *o)
{
    fprintf(out,
        "# moe-ep benchmarks\n"
        "\n"
        "Generated by `moe-ep bench%s`. Every figure below is measured in the "
        "same run and says how. Each is compared with a floor measured on "
        "this machine in this run:\n"
        "\n"
        "- **Forward** time of one layer against the *expert-GEMM floor*: the "
        "layer's expert FLOPs, 2 x 3 x (T x K) x H x F, divided by the sgemm "
        "rate of all cores on the layer's own GEMM shapes. It ignores routing, "
        "the exchanges and the combine, so no implementation reaches it. "
        "Target: the best steady forward <= %.2f x floor at %d ranks.\n"
        "- **Decode** forward, %d ranks with %" PRId64 ", %" PRId64 " and "
        "%" PRId64 " tokens each, against the *weight-stream floor*: the bytes "
        "of the expert weights the forward touches, plus the gate, divided "
        "by the read bandwidth of all cores from memory. Target: the best "
        "forward <= %.2f x floor.\n"
        "- **Scaling** of the forward over tokens and ranks, each row beside "
        "the larger of its two floors.\n"
        "- **All-to-all** throughput against *memcpy* bandwidth at the same "
        "message size in one process. Target: >= %.0f%% of memcpy at 1 MiB "
        "per pair with 2 ranks.\n"
        "\n"
        "Figures are the best of %d repetitions, with the median beside it. "
        "GB/s means 10^9 bytes per second and GFLOP/s 10^9 floating-point "
        "operations per second.\n\n",
        o->quick ? " --quick" : "", FORWARD_TARGET_RATIO, o->ranks,
        MOE_BENCH_DECODE_RANKS, MOE_BENCH_DECODE_TOKENS[0],
        MOE_BENCH_DECODE_TOKENS[1], MOE_BENCH_DECODE_TOKENS[2],
        DECODE_TARGET_RATIO, 100 * ALLTOALL_TARGET_FRACTION, o->repeats);
}

/* The machine as seen when the bench started. */
struct machine {
    char date[64];
    char model[256];
    int avx2, fma, avx512;
    double memory_gib;
    struct utsname uname;
    char load[64]; /* load average at the start */
};

void moe_bench_cpuinfo_value(const char *key, char *buf, size_t size)
{
    snprintf(buf, size, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f)
        return;
    char line[8192];
    size_t key_length = strlen(key);
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, key, key_length) != 0)
            continue;
        char *colon = strchr(line, ':');
        if (!colon)
            continue;
        char *value = colon + 1 + (colon[1] == ' ');
        value[strcspn(value, "\n")] = '\0';
        snprintf(buf, size, "%s", value);
        break;
    }
    fclose(f);
}

/* Returns whether the space-separated list `flags` contains `flag`. */
static int has_flag(const char *flags, const char *flag)
{
    size_t n = strlen(flag);
    for (const char *p = flags; (p = strstr(p, flag)) != NULL; p += n)
        if ((p == flags || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\0'))
            return 1;
    return 0;
}

/* Copies the 1, 5 and 15 minute load averages into buf. */
static void load_average(char *buf, size_t size)
{
    snprintf(buf, size, "unknown");
    FILE *f = fopen("/proc/loadavg", "r");
    if (!f)
        return;
    double one, five, fifteen;
    if (fscanf(f, "%lf %lf %lf", &one, &five, &fifteen) == 3)
        snprintf(buf, size, "%.2f, %.2f, %.2f", one, five, fifteen);
    fclose(f);
}

static void read_machine(struct machine *m)
{
    char flags[8192];
    time_t now = time(NULL);
    struct tm utc;
    gmtime_r(&now, &utc);
    strftime(m->date, sizeof m->date, "%Y-%m-%d %H:%M UTC", &utc);
    moe_bench_cpuinfo_value("model name", m->model, sizeof m->model);
    moe_bench_cpuinfo_value("flags", flags, sizeof flags);
    m->avx2 = has_flag(flags, "avx2");
    m->fma = has_flag(flags, "fma");
    m->avx512 = has_flag(flags, "avx512f");
    m->memory_gib = (double)sysconf(_SC_PHYS_PAGES) *
                    (double)sysconf(_SC_PAGESIZE) / 1073741824.0;
    if (uname(&m->uname) != 0)
        m->uname = (struct utsname){.sysname = "unknown"};
    load_average(m->load, sizeof m->load);
}

static void print_machine(FILE *out, const struct machine *m, int cores)
{
    fprintf(out, "## Machine\n\n| item | value |\n|---|---|\n");
    fprintf(out, "| date | %s |\n", m->date);
    fprintf(out, "| CPU (/proc/cpuinfo) | %s; AVX2 %s, FMA %s, AVX-512 %s |\n",
            m->model, m->avx2 ? "yes" : "no", m->fma ? "yes" : "no",
            m->avx512 ? "yes" : "no");
    fprintf(out, "| cores online (sysconf) | %d |\n", cores);
    fprintf(out, "| memory | %.1f GiB |\n", m->memory_gib);
    fprintf(out, "| kernel | %s %s %s |\n", m->uname.sysname, m->uname.release,
            m->uname.machine);
    fprintf(out, "| OpenBLAS | %s; core %s |\n", openblas_get_config(),
            openblas_get_corename());
    fprintf(out, "| compiler | %s |\n", __VERSION__);
    fprintf(out, "| load average before the run (1, 5, 15 min) | %s |\n\n",
            m->load);
}

/* The targets are set for the default shapes; a --quick run only shows
 * that the figures can be produced. */
static const char *verdict(const struct moe_bench_options *o, int met)
{
    if (o->quick)
        return "not judged (--quick shapes)";
    return met ? "met" : "missed";
}

/* Prints the prefill rows: the target at --ranks, and the rank counts
 * above the cores, which show what sharing the cores costs. */
static void print_prefill_targets(FILE *out, const struct moe_bench_options *o,
                                  const struct moe_bench_results *res)
{
    for (int i = 0; i < res->forward_count; i++) {
        const struct moe_bench_forward *f = &res->forward[i];
        double ratio = f->steps_best_ms / res->floor_ms;
        if (f->ranks == o->ranks)
            fprintf(out, "| prefill: best steady forward, %d ranks, <= %.2f x "
                    "expert-GEMM floor | %.2f x (%.1f ms / %.1f ms) | %s |\n",
                    o->ranks, FORWARD_TARGET_RATIO, ratio, f->steps_best_ms,
                    res->floor_ms, verdict(o, ratio <= FORWARD_TARGET_RATIO));
        else if (f->ranks > res->cores)
            fprintf(out, "| prefill at %d ranks, sharing %d cores: the same "
                    "ratio, shown without a target | %.2f x (%.1f ms / %.1f "
                    "ms) | - |\n", f->ranks, res->cores, ratio,
                    f->steps_best_ms, res->floor_ms);
    }
}

static void print_decode_targets(FILE *out, const struct moe_bench_options *o,
                                 const struct moe_bench_results *res)
{
    for (int i = 0; i < MOE_BENCH_DECODE_COUNTS; i++) {
        int64_t per_rank = MOE_BENCH_DECODE_TOKENS[i];
        const struct moe_bench_scaling *r = moe_bench_find_scaling(
            res, MOE_BENCH_DECODE_RANKS, MOE_BENCH_DECODE_RANKS * per_rank);
        if (!r)
            continue;
        double floor_ms = moe_bench_stream_floor_ms(res, r);
        double ratio = r->best_ms / floor_ms;
        fprintf(out, "| decode: best forward, %d ranks, %" PRId64 " token%s "
                "per rank, <= %.2f x weight-stream floor | %.2f x (%.2f ms / "
                "%.2f ms); median %.2f x | %s |\n", MOE_BENCH_DECODE_RANKS,
                per_rank, per_rank == 1 ? "" : "s", DECODE_TARGET_RATIO, ratio,
                r->best_ms, floor_ms, r->median_ms / floor_ms,
                verdict(o, ratio <= DECODE_TARGET_RATIO));
    }
}

/* Prints the all-to-all row of `a`, a call named `call`. */
static void print_alltoall_target(FILE *out, const struct moe_bench_options *o,
                                  const struct moe_bench_results *res,
                                  const struct moe_bench_alltoall *a,
                                  const char *call)
{
    double memcpy_gbps = moe_bench_memcpy_gbps(res, ALLTOALL_TARGET_BYTES);
    if (!a || memcpy_gbps <= 0)
        return;
    double fraction = a->best_gbps / memcpy_gbps;
    fprintf(out, "| all-to-all, 2 ranks, 1 MiB per pair, %s, >= %.0f%% of "
            "memcpy | %.0f%% (%.2f GB/s / %.2f GB/s) | %s |\n", call,
            100 * ALLTOALL_TARGET_FRACTION, 100 * fraction, a->best_gbps,
            memcpy_gbps, verdict(o, fraction >= ALLTOALL_TARGET_FRACTION));
}

static void print_targets(FILE *out, const struct moe_bench_options *o,
                          const struct moe_bench_results *res)
{
    fprintf(out, "## Targets\n\n| target | measured | verdict |\n|---|---|---|\n");
    print_prefill_targets(out, o, res);
    print_decode_targets(out, o, res);

    char rings[96];
    snprintf(rings, sizeof rings, "`moe_alltoallv` on rings of %" PRIu64
             " bytes", o->ring_bytes);
    print_alltoall_target(out, o, res,
                          moe_bench_find_alltoall(res, 2, ALLTOALL_TARGET_BYTES),
                          rings);
    for (int i = 0; i < res->direct_count; i++)
        if (res->direct[i].ranks == 2 && !res->direct[i].one_token &&
            res->direct[i].bytes_per_pair == ALLTOALL_TARGET_BYTES)
            print_alltoall_target(out, o, res, &res->direct[i],
                                  "`moe_alltoallv_direct`");
    fprintf(out, "| all-to-all against Open MPI's `MPI_Alltoallv`: throughput "
            ">= 1.2 x at 4 KiB to 4 MiB per pair and 1-token latency <= "
            "MPI's, at 2 and 4 ranks | in the Peers section, which `moe-ep "
            "bench --peers` adds | see there |\n");
    fprintf(out, "\n");
}

/* ---- driver ------------------------------------------------------------ */

/* Writes the report to path, followed by `kept`, the side-by-side
 * sections of the old file (NULL for none). moe_write_file describes how a
 * failure leaves the old file in place. */
static int write_markdown(const char *path, const char *text, size_t bytes,
                          const char *kept, size_t kept_bytes)
{
    struct moe_file_part parts[2] = {{text, bytes}, {kept, kept_bytes}};
    return moe_write_file(path, parts, kept ? 2 : 1);
}

/* Runs every measurement in the order that keeps them apart: the floors,
 * the layer figures, and the all-core sgemm and read rates again at the
 * end. */
static int measure_all(const struct moe_bench_options *o,
                       struct moe_bench_results *res)
{
    int rc = moe_bench_measure_floors(o, res);
    if (rc == 0)
        rc = moe_bench_measure_read(o, res);
    if (rc == 0)
        rc = moe_bench_measure_forward(o, res);
    if (rc == 0)
        rc = moe_bench_measure_scaling(o, res);
    if (rc == 0)
        rc = moe_bench_measure_alltoall(o, res);
    if (rc == 0)
        rc = moe_bench_measure_sgemm_again(o, res);
    if (rc == 0)
        rc = moe_bench_measure_read_again(o, res, MOE_BENCH_READ_AFTER);
    if (rc == 0 && o->peers)
        rc = moe_bench_measure_peers(o, res);
    return rc;
}

static void print_report(FILE *out, const struct moe_bench_options *o,
                         const struct machine *machine,
                         const struct moe_bench_results *res)
{
    print_header(out, o);
    print_targets(out, o, res);
    print_machine(out, machine, res->cores);
    moe_bench_print_floors(out, o, res);
    moe_bench_print_forward(out, o, res);
    moe_bench_print_decode(out, o, res);
    moe_bench_print_scaling(out, o, res);
    moe_bench_print_alltoall(out, o, res);
    moe_bench_print_peers(out, o, res);
}

int moe_bench(const struct moe_bench_options *o, FILE *out)
{
    if (o->transport == MOE_TRANSPORT_MPI)
        return moe_bench_mpi(o, out);
    /* The sections that `make bench-mpi` added to the report survive its
     * rewrite. They are read first, so that a file that cannot be read
     * fails the bench before the measurements. */
    char *kept = NULL;
    size_t kept_bytes = 0;
    int rc = 0;
    if (o->markdown_path &&
        (rc = moe_bench_read_kept_sections(o->markdown_path, &kept, &kept_bytes)))
        return rc;
    struct machine machine;
    read_machine(&machine);
    struct moe_bench_results *res = calloc(1, sizeof *res);
    if (!res) {
        free(kept);
        return moe_fail(-ENOMEM, "out of memory for the bench results");
    }
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (cores < 1)
        cores = 1;
    if (cores > MOE_MAX_RANKS)
        cores = MOE_MAX_RANKS;
    res->cores = (int)cores;

    rc = measure_all(o, res);
    if (rc) {
        free(kept);
        free(res);
        return rc;
    }

    /* The report goes to memory first, so that `out` and the file get the
     * same text; the file adds the kept sections after it. */
    char *text = NULL;
    size_t bytes = 0;
    FILE *report = open_memstream(&text, &bytes);
    if (!report) {
        free(kept);
        free(res);
        return moe_fail(-errno, "cannot keep the report in memory: %s",
                        strerror(errno));
    }
    print_report(report, o, &machine, res);
    fclose(report);
    free(res->peers);
    free(res);

    fwrite(text, 1, bytes, out);
    fflush(out);
    if (o->markdown_path)
        rc = write_markdown(o->markdown_path, text, bytes, kept, kept_bytes);
    free(kept);
    free(text);
    return rc;
}
