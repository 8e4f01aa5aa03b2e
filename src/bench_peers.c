/*
 * bench_peers.c - `moe-ep bench --peers`: times two peers of moe-ep on this
 * machine in the bench's own run, and divides moe-ep's figures by theirs.
 *
 *   - The PyTorch EP layer, bench/torch_ep.py, under Debian's
 *     /usr/bin/python3 with python3-torch: the bench layer's shape and rank
 *     count, at --tokens (prefill) and at 1, 4 and 8 tokens per rank
 *     (decode). moe-ep's figures are steady forwards of the same shapes,
 *     measured here right before each script run.
 *   - Open MPI's MPI_Alltoallv alone, in `mpirun -np R moe-ep bench
 *     --transport mpi --alltoall-json` jobs of 2 and 4 ranks (bench_mpi.c),
 *     at the sizes of the bench's all-to-all table. moe-ep's figures are
 *     that table measured again here, right before the jobs.
 *
 * Runs in the launcher process after every other figure. Each peer is a
 * program run by moe_subprocess_run with a deadline. A peer that is not
 * installed is skipped, and one that fails is reported as failed. Either
 * way the section gives the reason, and the bench goes on because moe-ep's
 * own figures are still valid.
 *
 * The PyTorch layer draws its own weights and tokens, so the two layers
 * are compared for time only. The script checks its own output (shape,
 * finite values, rows conserved); `moe-ep run` checks moe-ep's.
 */
#include "moe_bench_peers.h"
#include "moe_error.h"
#include "moe_layer.h"
#include "moe_subprocess.h"
#include "moe_transport.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* The interpreter with Debian's python3-torch, because the default python3
 * of some machines is another build that cannot import it. */
static const char DEFAULT_PYTHON[] = "/usr/bin/python3";
static const char PYTHON_VARIABLE[] = "MOE_EP_PYTHON";
static const char MPIRUN_VARIABLE[] = "MOE_EP_MPIRUN";
static const char TORCH_SCRIPT[] = "bench/torch_ep.py";

static const int64_t DECODE_TOKENS_PER_RANK[MOE_BENCH_PEER_DECODE_COUNT] = {1, 4, 8};
/* Timed forwards of a decode case, on both sides: a decode forward takes
 * milliseconds, so more repeats cost little and steady the best figure. */
static const int DECODE_REPEATS = 20;
static const int MPI_JOB_RANKS[MOE_BENCH_PEER_MPI_JOBS] = {2, 4};

/* Targets of the all-to-all against MPI_Alltoallv. */
static const double MPI_THROUGHPUT_TARGET = 1.2;
static const double MPI_LATENCY_TARGET = 1.0;

/* Deadlines, in seconds. Importing torch takes seconds. The script's own
 * --timeout covers its ranks, and its parent gets SCRIPT_GRACE_S more to
 * stop them. */
static const int64_t NS_PER_S = 1000LL * 1000 * 1000;
static const int64_t IMPORT_TIMEOUT_S = 120;
static const int SCRIPT_TIMEOUT_S = 300, QUICK_SCRIPT_TIMEOUT_S = 120;
static const int64_t SCRIPT_GRACE_S = 30;
static const int64_t MPI_TIMEOUT_S = 300;
/* Largest stdout kept from a peer, which prints a few lines. */
static const size_t OUTPUT_LIMIT = 1 << 20;

/* ---- options ----------------------------------------------------------- */

int moe_bench_parse_peer_flag(struct moe_bench_options *o, int argc, char **argv,
                              int *i)
{
    const char *flag = argv[*i];
    if (!strcmp(flag, "--peers")) {
        o->peers = 1;
        return 1;
    }
    if (!strcmp(flag, "--alltoall-json")) {
        o->alltoall_json = 1;
        return 1;
    }
    if (strcmp(flag, "--torch-script") != 0)
        return 0;

    if (*i + 1 >= argc)
        return moe_fail(-EINVAL, "missing value for %s", flag);
    const char *path = argv[++*i];
    if (!*path)
        return moe_fail(-EINVAL, "invalid %s value '': expected a file name", flag);
    struct stat st;
    if (stat(path, &st) != 0)
        return moe_fail(-EINVAL, "invalid %s file '%s': %s", flag, path,
                        strerror(errno));
    if (!S_ISREG(st.st_mode))
        return moe_fail(-EINVAL, "invalid %s file '%s': not a regular file",
                        flag, path);
    o->torch_script = path;
    return 1;
}

int moe_bench_check_peer_flags(const struct moe_bench_options *o)
{
    if (o->peers && o->transport == MOE_TRANSPORT_MPI)
        return moe_fail(-EINVAL, "invalid --peers with --transport mpi: --peers "
                        "starts its own mpirun jobs, so run it without mpirun");
    if (o->alltoall_json && o->transport != MOE_TRANSPORT_MPI)
        return moe_fail(-EINVAL, "invalid --alltoall-json without --transport "
                        "mpi: it prints the MPI_Alltoallv figures of an mpirun "
                        "job");
    if (o->alltoall_json && o->markdown_path)
        return moe_fail(-EINVAL, "invalid --markdown with --alltoall-json: "
                        "--alltoall-json prints JSON lines, not a report");
    if (o->torch_script && !o->peers)
        return moe_fail(-EINVAL, "invalid --torch-script without --peers: only "
                        "--peers runs the script");
    return 0;
}

void moe_bench_peers_usage(FILE *out)
{
    fprintf(out,
        "  --peers           also time the peers at the same shape: a PyTorch\n"
        "                    EP layer (bench/torch_ep.py) at --ranks, and Open\n"
        "                    MPI's MPI_Alltoallv with mpirun -np 2 and 4, and\n"
        "                    divide moe-ep's figures by theirs; a missing peer\n"
        "                    is skipped with the reason. %s sets the\n"
        "                    Python [%s], %s the mpirun\n"
        "                    [mpirun on the PATH]\n"
        "  --torch-script FILE  the PyTorch layer that --peers runs\n"
        "                    [%s above the directory of moe-ep, or in\n"
        "                    the current directory]\n"
        "  --alltoall-json   with --transport mpi: time only MPI_Alltoallv at\n"
        "                    the sizes of the all-to-all table, and print one\n"
        "                    JSON line per size in place of the report\n",
        PYTHON_VARIABLE, DEFAULT_PYTHON, MPIRUN_VARIABLE, TORCH_SCRIPT);
}

/* ---- finding the programs ---------------------------------------------- */

/* Copies the path of the moe-ep program that mpirun should start into buf:
 * options->program_path, else this process's executable. Returns 0 or
 * -errno. */
static int moe_ep_path(const struct moe_bench_options *o, char *buf, size_t size)
{
    if (o->program_path) {
        snprintf(buf, size, "%s", o->program_path);
        return 0;
    }
    ssize_t n = readlink("/proc/self/exe", buf, size - 1);
    if (n < 0)
        return -errno;
    buf[n] = '\0';
    return 0;
}

static int is_executable_file(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, X_OK) == 0;
}

/* Finds bench/torch_ep.py: --torch-script, else above the directory of
 * this executable (build/moe-ep in a source tree), else in the current
 * directory. Returns 1 with the path in buf, of PATH_MAX bytes, or 0 with
 * the reason. */
static int find_torch_script(const struct moe_bench_options *o,
                             char buf[PATH_MAX], char *reason, size_t reason_size)
{
    if (o->torch_script) {
        snprintf(buf, PATH_MAX, "%s", o->torch_script);
        return 1;
    }
    char self[PATH_MAX], candidate[2 * PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    self[n > 0 ? n : 0] = '\0';
    snprintf(candidate, sizeof candidate, "%s/../%s", dirname(self), TORCH_SCRIPT);
    if (n > 0 && access(candidate, R_OK) == 0 && realpath(candidate, buf))
        return 1;
    if (access(TORCH_SCRIPT, R_OK) == 0 && realpath(TORCH_SCRIPT, buf))
        return 1;
    snprintf(reason, reason_size, "%s was found neither at %.400s nor in the "
             "current directory; give its path with --torch-script", TORCH_SCRIPT,
             candidate);
    return 0;
}

/* Finds mpirun: $MOE_EP_MPIRUN, else the first on the PATH. Returns 1 with
 * the path in buf, or 0 with the reason. */
static int find_mpirun(char *buf, size_t size, char *reason, size_t reason_size)
{
    const char *chosen = getenv(MPIRUN_VARIABLE);
    if (chosen && *chosen) {
        if (is_executable_file(chosen)) {
            snprintf(buf, size, "%s", chosen);
            return 1;
        }
        snprintf(reason, reason_size, "%s=%s is not an executable file", MPIRUN_VARIABLE,
                 chosen);
        return 0;
    }
    const char *path = getenv("PATH");
    for (const char *dir = path; dir && *dir;) {
        size_t length = strcspn(dir, ":");
        snprintf(buf, size, "%.*s/mpirun", (int)length, length ? dir : ".");
        if (is_executable_file(buf))
            return 1;
        dir += length + (dir[length] == ':');
    }
    snprintf(reason, reason_size, "mpirun was not found on the PATH; install "
             "Open MPI (openmpi-bin) or set %s", MPIRUN_VARIABLE);
    return 0;
}

/* ---- running a peer ---------------------------------------------------- */

/* Writes argv as a shell command into buf, quoting the words that need it,
 * after the environment assignments in env (NULL-terminated, or NULL). */
static void format_command(const char *const *env, const char *const *argv,
                           char *buf, size_t size)
{
    size_t used = 0;
    buf[0] = '\0';
    for (int list = 0; list < 2; list++) {
        const char *const *words = list ? argv : env;
        for (int i = 0; words && words[i] && used < size; i++) {
            const char *w = words[i];
            int plain = w[0] != '\0' && strspn(w, "abcdefghijklmnopqrstuvwxyz"
                "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./=,:+") == strlen(w);
            used += (size_t)snprintf(buf + used, size - used, plain ? "%s%s" : "%s'%s'",
                                     used ? " " : "", w);
        }
    }
}

/* Copies the last line of `text` that is not blank into buf, or "". */
static void last_line(const char *text, char *buf, size_t size)
{
    buf[0] = '\0';
    const char *end = text + strlen(text);
    while (end > text && (end[-1] == '\n' || end[-1] == ' ' || end[-1] == '\r'))
        end--;
    const char *start = end;
    while (start > text && start[-1] != '\n')
        start--;
    snprintf(buf, size, "%.*s", (int)(end - start), start);
}

/* Runs a peer program and returns 0 when it exited with status 0. Else
 * returns -1 and writes into reason what failed: its end and the last line
 * of its stderr. A failure to start the run at all returns its error. */
static int run_peer(const char *what, const char *const *env,
                    const char *const *argv, int64_t timeout_s,
                    struct moe_subprocess *result, char *reason, size_t reason_size)
{
    int rc = moe_subprocess_run(argv, env, timeout_s * NS_PER_S, OUTPUT_LIMIT, result);
    if (rc)
        return rc;
    if (result->exec_errno == 0 && result->exited && result->status == 0 &&
        !result->out_truncated)
        return 0;

    char how[128], line[512];
    moe_subprocess_describe(result, how, sizeof how);
    if (result->exited && result->status == 0)
        snprintf(how, sizeof how, "more than %zu bytes of output", OUTPUT_LIMIT);
    last_line(result->err, line, sizeof line);
    snprintf(reason, reason_size, "%s: %s%s%s", what, how, line[0] ? ": " : "", line);
    moe_subprocess_free(result);
    return -1;
}

/* Returns the number `key` of a JSON object, or NaN when missing. */
static double json_number(const cJSON *object, const char *key)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, key);
    return cJSON_IsNumber(item) ? item->valuedouble : NAN;
}

/* Calls parse_line(line, state) for each line of `text` that starts with
 * '{', parsed as JSON. Returns the number of lines taken, or -1 with the
 * reason when a line is not valid JSON or parse_line rejects it. */
static int for_each_json_line(const char *text, int (*parse_line)(const cJSON *, void *,
                                                                   char *, size_t),
                              void *state, char *reason, size_t reason_size)
{
    int lines = 0;
    for (const char *line = text; line && *line;) {
        const char *next = strchr(line, '\n');
        size_t length = next ? (size_t)(next - line) : strlen(line);
        if (line[0] == '{') {
            cJSON *object = cJSON_ParseWithLength(line, length);
            if (!object) {
                snprintf(reason, reason_size, "invalid JSON line: %.*s",
                         (int)(length < 200 ? length : 200), line);
                return -1;
            }
            int rc = parse_line(object, state, reason, reason_size);
            cJSON_Delete(object);
            if (rc)
                return -1;
            lines++;
        }
        line = next ? next + 1 : NULL;
    }
    return lines;
}

/* ---- the PyTorch layer ------------------------------------------------- */

/* Threads of each torch rank: the count `moe-ep run` picks for its ranks,
 * cores / ranks and at least 1. NOTE: the bench's own forwards run each
 * rank's OpenBLAS on one thread, which is the same count only when the
 * ranks are at least the cores (2 ranks on 2 cores, the default). */
static int torch_threads(int ranks)
{
    return moe_blas_threads_auto(ranks);
}

/* Checks that `python` can import torch with gloo. Returns 1 with the
 * version in peers->torch_version, 0 with the reason for skipping, or a
 * negative error when the check could not run. */
static int torch_available(const char *python, struct moe_bench_peers *peers)
{
    static const char check[] =
        "import torch, torch.distributed as d; "
        "print(torch.__version__, int(d.is_available() and d.is_gloo_available()))";
    const char *const argv[] = {python, "-c", check, NULL};
    struct moe_subprocess result;
    char reason[sizeof peers->torch_reason / 2];
    int rc = run_peer("the import check", NULL, argv, IMPORT_TIMEOUT_S, &result, reason,
                      sizeof reason);
    if (rc < -1)
        return rc;
    if (rc == -1) {
        snprintf(peers->torch_reason, sizeof peers->torch_reason,
                 "%s cannot import torch (%s); install Debian's python3-torch "
                 "with `sh tools/install-deps.sh python3-torch python3-numpy`",
                 python, reason);
        return 0;
    }
    int gloo = 0;
    if (sscanf(result.out ? result.out : "", "%63s %d", peers->torch_version,
               &gloo) != 2 || !gloo) {
        snprintf(peers->torch_reason, sizeof peers->torch_reason,
                 "torch under %s has no gloo backend for torch.distributed",
                 python);
        moe_subprocess_free(&result);
        return 0;
    }
    moe_subprocess_free(&result);
    return 1;
}

/* The cases of one script run: what each result line must contain, and
 * the rows it fills. */
struct torch_run {
    struct moe_bench_peers *peers;
    int ranks, threads;
    int64_t tokens[MOE_BENCH_PEER_DECODE_COUNT]; /* T of each expected case */
    int cases, seen;
    struct moe_bench_peer_forward *rows;         /* one per case */
};

static int parse_torch_line(const cJSON *line, void *state, char *reason,
                            size_t reason_size)
{
    struct torch_run *run = state;
    if (run->seen == run->cases) {
        snprintf(reason, reason_size, "the script printed more than %d result "
                 "lines", run->cases);
        return -1;
    }
    double ranks = json_number(line, "ranks"), tokens = json_number(line, "tokens");
    double threads = json_number(line, "threads");
    double best = json_number(line, "forward_ms_best");
    double median = json_number(line, "forward_ms_median");
    int64_t expected = run->tokens[run->seen];
    if (ranks != run->ranks || tokens != (double)expected || threads != run->threads) {
        snprintf(reason, reason_size, "result line %d is for %g ranks, %g tokens "
                 "and %g threads, expected %d, %" PRId64 " and %d", run->seen + 1,
                 ranks, tokens, threads, run->ranks, expected, run->threads);
        return -1;
    }
    if (!(best > 0) || !(median >= best) || !isfinite(median)) {
        snprintf(reason, reason_size, "result line %d has invalid times: best "
                 "%g ms, median %g ms", run->seen + 1, best, median);
        return -1;
    }
    struct moe_bench_peer_forward *row = &run->rows[run->seen++];
    row->tokens = expected;
    row->torch_best_ms = best;
    row->torch_median_ms = median;
    return 0;
}

/* Runs the script once with `extra` arguments (the batch) and `repeats`,
 * and fills rows[0..cases) from its lines. Returns 0, -1 with
 * peers->torch_reason set, or a negative error. */
static int run_torch_script(const struct moe_bench_options *o, const char *python,
                            const char *script, const char *const *extra,
                            int repeats, struct torch_run *run, char *command,
                            size_t command_size)
{
    char ranks[16], hidden[24], ffn[24], experts[24], top_k[24], threads[16],
         repeat_count[16], timeout[16];
    snprintf(ranks, sizeof ranks, "%d", run->ranks);
    snprintf(hidden, sizeof hidden, "%" PRId64, o->hidden);
    snprintf(ffn, sizeof ffn, "%" PRId64, o->ffn);
    snprintf(experts, sizeof experts, "%" PRId64, o->experts);
    snprintf(top_k, sizeof top_k, "%" PRId64, o->top_k);
    snprintf(threads, sizeof threads, "%d", run->threads);
    snprintf(repeat_count, sizeof repeat_count, "%d", repeats);
    int timeout_s = o->quick ? QUICK_SCRIPT_TIMEOUT_S : SCRIPT_TIMEOUT_S;
    snprintf(timeout, sizeof timeout, "%d", timeout_s);
    const char *argv[] = {python, script, "--ranks", ranks, extra[0], extra[1],
                          "--hidden", hidden, "--ffn", ffn, "--experts", experts,
                          "--top-k", top_k, "--threads", threads, "--repeats",
                          repeat_count, "--timeout", timeout, NULL};
    format_command(NULL, argv, command, command_size);

    struct moe_bench_peers *peers = run->peers;
    struct moe_subprocess result;
    int rc = run_peer(command, NULL, argv, timeout_s + SCRIPT_GRACE_S, &result,
                      peers->torch_reason, sizeof peers->torch_reason);
    if (rc)
        return rc;
    int lines = for_each_json_line(result.out ? result.out : "", parse_torch_line, run,
                                   peers->torch_reason, sizeof peers->torch_reason);
    moe_subprocess_free(&result);
    if (lines >= 0 && lines != run->cases) {
        snprintf(peers->torch_reason, sizeof peers->torch_reason, "%s printed %d "
                 "result lines, expected %d", command, lines, run->cases);
        return -1;
    }
    return lines < 0 ? -1 : 0;
}

/* Measures moe-ep's steady forward of `tokens` tokens into the moe-ep
 * columns of *row, with `repeats` timed forwards. */
static int measure_moe(const struct moe_bench_options *o, int ranks, int64_t tokens,
                       int repeats, struct moe_bench_peer_forward *row)
{
    struct moe_bench_options shape = *o;
    shape.tokens = tokens;
    shape.repeats = repeats;
    struct moe_bench_forward moe = {0};
    int rc = moe_bench_measure_forward_steady(&shape, ranks, &moe);
    row->moe_best_ms = moe.steps_best_ms;
    row->moe_median_ms = moe.steps_median_ms;
    return rc;
}

/* Measures moe-ep's steady forward at each decode case, then the script's. */
static int measure_torch_decode(const struct moe_bench_options *o, const char *python,
                                const char *script, struct torch_run *run)
{
    struct moe_bench_peers *peers = run->peers;
    char list[64] = "";
    for (int i = 0; i < MOE_BENCH_PEER_DECODE_COUNT; i++) {
        struct moe_bench_peer_forward *row = &run->rows[i];
        row->tokens_per_rank = DECODE_TOKENS_PER_RANK[i];
        run->tokens[i] = run->ranks * DECODE_TOKENS_PER_RANK[i];
        int rc = measure_moe(o, run->ranks, run->tokens[i], DECODE_REPEATS, row);
        if (rc)
            return rc;
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s%" PRId64,
                 i ? "," : "", DECODE_TOKENS_PER_RANK[i]);
    }
    run->cases = MOE_BENCH_PEER_DECODE_COUNT;
    run->seen = 0;
    const char *extra[] = {"--tokens-per-rank", list};
    return run_torch_script(o, python, script, extra, DECODE_REPEATS, run,
                            peers->torch_commands[1], sizeof peers->torch_commands[1]);
}

/* Runs the PyTorch peer: prefill, then decode, each right after moe-ep's
 * forwards of the same shape, so that both see the same load on a shared
 * machine. */
static int measure_torch(const struct moe_bench_options *o,
                         struct moe_bench_peers *peers)
{
    char script[PATH_MAX];
    if (!find_torch_script(o, script, peers->torch_reason, sizeof peers->torch_reason))
        return 0;
    const char *python = getenv(PYTHON_VARIABLE);
    const char *source = PYTHON_VARIABLE;
    if (!python || !*python) {
        python = DEFAULT_PYTHON;
        source = "the default";
    }
    if (!is_executable_file(python)) {
        snprintf(peers->torch_reason, sizeof peers->torch_reason, "the Python "
                 "%s (%s) is not an executable file: %s", python, source,
                 access(python, F_OK) ? strerror(errno) : "not executable");
        return 0;
    }
    int rc = torch_available(python, peers);
    if (rc <= 0)
        return rc;

    peers->torch_state = MOE_BENCH_PEER_FAILED; /* until every case is in */
    struct torch_run run = {.peers = peers, .ranks = o->ranks,
                            .threads = torch_threads(o->ranks),
                            .tokens = {o->tokens}, .cases = 1,
                            .rows = peers->forward};
    peers->torch_threads = run.threads;
    if ((rc = measure_moe(o, o->ranks, o->tokens, o->repeats, &peers->forward[0])))
        return rc;
    char tokens[24];
    snprintf(tokens, sizeof tokens, "%" PRId64, o->tokens);
    const char *extra[] = {"--tokens", tokens};
    rc = run_torch_script(o, python, script, extra, o->repeats, &run,
                          peers->torch_commands[0], sizeof peers->torch_commands[0]);
    if (rc == 0) {
        peers->forward_count = 1;
        run.rows = &peers->forward[1];
        rc = measure_torch_decode(o, python, script, &run);
    }
    if (rc == 0) {
        peers->forward_count += MOE_BENCH_PEER_DECODE_COUNT;
        peers->torch_state = MOE_BENCH_PEER_MEASURED;
    }
    return rc == -1 ? 0 : rc;
}

/* ---- Open MPI's MPI_Alltoallv ------------------------------------------ */

void moe_bench_print_mpi_json(FILE *out, const struct moe_bench_alltoall *row,
                              const char *library)
{
    cJSON *line = cJSON_CreateObject();
    cJSON_AddStringToObject(line, "call", "MPI_Alltoallv");
    cJSON_AddNumberToObject(line, "ranks", row->ranks);
    cJSON_AddNumberToObject(line, "bytes_per_pair", (double)row->bytes_per_pair);
    cJSON_AddBoolToObject(line, "one_token", row->one_token);
    cJSON_AddNumberToObject(line, "calls", (double)row->calls);
    cJSON_AddNumberToObject(line, "best_us", row->best_us);
    cJSON_AddNumberToObject(line, "median_us", row->median_us);
    cJSON_AddNumberToObject(line, "best_gbps", row->best_gbps);
    cJSON_AddNumberToObject(line, "median_gbps", row->median_gbps);
    cJSON_AddStringToObject(line, "library", library);
    /* Out of memory prints nothing, and the reader reports a missing line. */
    char *text = line ? cJSON_PrintUnformatted(line) : NULL;
    if (text)
        fprintf(out, "%s\n", text);
    fflush(out);
    free(text);
    cJSON_Delete(line);
}

/* The rows one mpirun job must print. */
struct mpi_run {
    struct moe_bench_peers *peers;
    int ranks;
};

static int parse_mpi_line(const cJSON *line, void *state, char *reason,
                          size_t reason_size)
{
    struct mpi_run *run = state;
    struct moe_bench_peers *peers = run->peers;
    const cJSON *call = cJSON_GetObjectItemCaseSensitive(line, "call");
    const cJSON *one_token = cJSON_GetObjectItemCaseSensitive(line, "one_token");
    const cJSON *library = cJSON_GetObjectItemCaseSensitive(line, "library");
    double ranks = json_number(line, "ranks");
    double bytes = json_number(line, "bytes_per_pair");
    struct moe_bench_alltoall row = {
        .ranks = run->ranks,
        .bytes_per_pair = (uint64_t)(bytes >= 0 && bytes < 1e15 ? bytes : 0),
        .one_token = cJSON_IsTrue(one_token),
        .calls = (int64_t)json_number(line, "calls"),
        .best_us = json_number(line, "best_us"),
        .median_us = json_number(line, "median_us"),
        .best_gbps = json_number(line, "best_gbps"),
        .median_gbps = json_number(line, "median_gbps"),
    };
    int valid = cJSON_IsString(call) && !strcmp(call->valuestring, "MPI_Alltoallv") &&
                cJSON_IsBool(one_token) && cJSON_IsString(library) &&
                ranks == run->ranks && row.bytes_per_pair > 0 && row.calls > 0 &&
                row.best_us > 0 && row.median_us >= row.best_us &&
                row.best_gbps > 0 && isfinite(row.median_gbps);
    if (!valid) {
        snprintf(reason, reason_size, "an MPI_Alltoallv line of the %d-rank job "
                 "lacks a field or has an invalid value", run->ranks);
        return -1;
    }
    if (peers->mpi_count == MOE_BENCH_PEER_MPI_JOBS * MOE_BENCH_PEER_MPI_SIZES) {
        snprintf(reason, reason_size, "the %d-rank job printed more than %d "
                 "lines", run->ranks, MOE_BENCH_PEER_MPI_SIZES);
        return -1;
    }
    snprintf(peers->mpi_library, sizeof peers->mpi_library, "%s",
             library->valuestring);
    peers->mpi[peers->mpi_count++] = row;
    return 0;
}

/* Runs the mpirun job of `ranks` ranks and appends its rows. Returns 0, -1
 * with peers->mpi_reason set, or a negative error. */
static int run_mpi_job(const struct moe_bench_options *o, const char *mpirun,
                       const char *program, int ranks, char *command,
                       size_t command_size, struct moe_bench_peers *peers)
{
    char np[16], hidden[24], repeats[16];
    snprintf(np, sizeof np, "%d", ranks);
    snprintf(hidden, sizeof hidden, "%" PRId64, o->hidden);
    snprintf(repeats, sizeof repeats, "%d", o->repeats);
    /* --quick shortens the timed loops, as in this run. */
    const char *argv[] = {mpirun, "--oversubscribe", "-np", np, program, "bench",
                          "--transport", "mpi", "--alltoall-json", "--hidden",
                          hidden, "--repeats", repeats,
                          o->quick ? "--quick" : NULL, NULL};
    /* Open MPI refuses to run as root unless both are set. */
    static const char *const root_env[] = {"OMPI_ALLOW_RUN_AS_ROOT=1",
                                           "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1", NULL};
    const char *const *env = geteuid() == 0 ? root_env : NULL;
    format_command(env, argv, command, command_size);

    struct moe_subprocess result;
    int rc = run_peer(command, env, argv, MPI_TIMEOUT_S, &result, peers->mpi_reason,
                      sizeof peers->mpi_reason);
    if (rc)
        return rc;
    struct mpi_run run = {.peers = peers, .ranks = ranks};
    int before = peers->mpi_count;
    int lines = for_each_json_line(result.out ? result.out : "", parse_mpi_line, &run,
                                   peers->mpi_reason, sizeof peers->mpi_reason);
    moe_subprocess_free(&result);
    if (lines >= 0 && lines != MOE_BENCH_PEER_MPI_SIZES) {
        snprintf(peers->mpi_reason, sizeof peers->mpi_reason, "%s printed %d "
                 "MPI_Alltoallv lines, expected %d", command, lines,
                 MOE_BENCH_PEER_MPI_SIZES);
        peers->mpi_count = before;
        return -1;
    }
    return lines < 0 ? -1 : 0;
}

/* Measures moe-ep's all-to-all again, with the code of the bench's
 * all-to-all table, so that its figures and MPI's see the same load. */
static int measure_moe_alltoall(const struct moe_bench_options *o, int cores,
                                struct moe_bench_peers *peers)
{
    struct moe_bench_results *fresh = calloc(1, sizeof *fresh);
    if (!fresh)
        return moe_fail(-ENOMEM, "out of memory for the all-to-all figures");
    fresh->cores = cores;
    int rc = moe_bench_measure_alltoall(o, fresh);
    if (rc == 0) {
        memcpy(peers->moe_rings, fresh->alltoall, sizeof peers->moe_rings);
        peers->moe_rings_count = fresh->alltoall_count;
        memcpy(peers->moe_direct, fresh->direct, sizeof peers->moe_direct);
        peers->moe_direct_count = fresh->direct_count;
    }
    free(fresh);
    return rc;
}

static int measure_mpi(const struct moe_bench_options *o, int cores,
                       struct moe_bench_peers *peers)
{
    if (!moe_transport_mpi_built()) {
        snprintf(peers->mpi_reason, sizeof peers->mpi_reason, "this moe-ep was "
                 "built without the MPI transport (make MPI=0, or no mpicc)");
        return 0;
    }
    char mpirun[PATH_MAX], program[PATH_MAX];
    if (!find_mpirun(mpirun, sizeof mpirun, peers->mpi_reason, sizeof peers->mpi_reason))
        return 0;
    int rc = moe_ep_path(o, program, sizeof program);
    if (rc)
        return moe_fail(rc, "cannot find this program's path for mpirun: %s",
                        strerror(-rc));
    if ((rc = measure_moe_alltoall(o, cores, peers)))
        return rc;

    peers->mpi_state = MOE_BENCH_PEER_FAILED; /* until every job is in */
    for (int j = 0; rc == 0 && j < MOE_BENCH_PEER_MPI_JOBS; j++)
        rc = run_mpi_job(o, mpirun, program, MPI_JOB_RANKS[j], peers->mpi_commands[j],
                         sizeof peers->mpi_commands[j], peers);
    if (rc == 0)
        peers->mpi_state = MOE_BENCH_PEER_MEASURED;
    return rc == -1 ? 0 : rc;
}

int moe_bench_measure_peers(const struct moe_bench_options *o,
                            struct moe_bench_results *res)
{
    struct moe_bench_peers *peers = calloc(1, sizeof *peers);
    if (!peers)
        return moe_fail(-ENOMEM, "out of memory for the peers' figures");
    peers->ranks = o->ranks;
    peers->decode_repeats = DECODE_REPEATS;
    int rc = measure_torch(o, peers);
    if (rc == 0)
        rc = measure_mpi(o, res->cores, peers);
    if (rc) {
        free(peers);
        return rc;
    }
    res->peers = peers;
    return 0;
}

/* ---- report ------------------------------------------------------------ */

/* The targets are set for the default shapes, so a --quick run is not
 * judged. */
static const char *verdict(const struct moe_bench_options *o, int met)
{
    if (o->quick)
        return "not judged (--quick)";
    return met ? "met" : "missed";
}

static void print_torch(FILE *out, const struct moe_bench_options *o,
                        const struct moe_bench_peers *peers)
{
    fprintf(out, "### PyTorch EP layer\n\n");
    if (peers->torch_state != MOE_BENCH_PEER_MEASURED) {
        fprintf(out, "- %s: %s\n\n", peers->torch_state == MOE_BENCH_PEER_SKIPPED ?
                "skipped" : "failed", peers->torch_reason);
        return;
    }
    fprintf(out,
        "`%s` runs the four steps of this layer in PyTorch %s on the CPU, with "
        "the gloo backend: the softmax top-k router with the K weights "
        "divided by their sum, a dispatch with `torch.distributed."
        "all_to_all_single` after an exchange of the split sizes, each "
        "expert's SwiGLU FFN on all of its rows, and a combine with a second "
        "`all_to_all_single` and the weighted sum. It draws its own weights "
        "and tokens at the same shape, so the two layers are compared for "
        "time, not for their outputs. Each of its %d ranks runs %d thread%s, "
        "the count that `moe-ep run` picks for that many ranks (cores / "
        "ranks, at least 1), set with `torch.set_num_threads` and "
        "OPENBLAS_NUM_THREADS, because this torch calls OpenBLAS for float32 "
        "matmuls. A forward's time is the max over the "
        "ranks, from a barrier to the end of the combine, after one warm-up "
        "forward. The moe-ep columns are its steady forwards at the same "
        "shape and ranks, measured again right before each script run so "
        "that both see the same load: %d repeats for prefill and %d for "
        "decode, on both sides. A ratio below 1 means that moe-ep is "
        "faster.\n\n"
        "Commands:\n\n    %s\n    %s\n\n",
        o->torch_script ? o->torch_script : TORCH_SCRIPT, peers->torch_version,
        peers->ranks, peers->torch_threads, peers->torch_threads == 1 ? "" : "s",
        o->repeats, peers->decode_repeats, peers->torch_commands[0],
        peers->torch_commands[1]);
    fprintf(out, "| case | ranks | tokens | torch best, ms | median, ms "
            "| moe-ep best, ms | median, ms | moe-ep / torch, best | median |\n"
            "|---|---|---|---|---|---|---|---|---|\n");
    for (int i = 0; i < peers->forward_count; i++) {
        const struct moe_bench_peer_forward *f = &peers->forward[i];
        char name[64];
        if (f->tokens_per_rank)
            snprintf(name, sizeof name, "decode, %" PRId64 " token%s per rank",
                     f->tokens_per_rank, f->tokens_per_rank == 1 ? "" : "s");
        else
            snprintf(name, sizeof name, "prefill");
        fprintf(out, "| %s | %d | %" PRId64 " | %.2f | %.2f | %.2f | %.2f | %.2f "
                "| %.2f |\n", name, peers->ranks, f->tokens, f->torch_best_ms,
                f->torch_median_ms, f->moe_best_ms, f->moe_median_ms,
                f->moe_best_ms / f->torch_best_ms,
                f->moe_median_ms / f->torch_median_ms);
    }
    fprintf(out, "\n");
}

/* Finds the row of `ranks`, `bytes` and `one_token` in rows[0..count). */
static const struct moe_bench_alltoall *
find_row(const struct moe_bench_alltoall *rows, int count, int ranks,
         uint64_t bytes, int one_token)
{
    for (int i = 0; i < count; i++)
        if (rows[i].ranks == ranks && rows[i].bytes_per_pair == bytes &&
            rows[i].one_token == one_token)
            return &rows[i];
    return NULL;
}

/* Prints the moe-ep cells of one call for an MPI row: its figure and the
 * ratio. Throughput for a size, the time per call for the 1-token row.
 * Sets *met when the ratio meets its target. */
static void print_moe_cells(FILE *out, const struct moe_bench_alltoall *mpi,
                            const struct moe_bench_alltoall *moe, int *met)
{
    if (!moe) {
        fprintf(out, " - | - |");
        return;
    }
    if (mpi->one_token) {
        double ratio = moe->best_us / mpi->best_us;
        fprintf(out, " %.2f us | %.2f |", moe->best_us, ratio);
        *met |= ratio <= MPI_LATENCY_TARGET;
    } else {
        double ratio = moe->best_gbps / mpi->best_gbps;
        fprintf(out, " %.2f GB/s | %.2f |", moe->best_gbps, ratio);
        *met |= ratio >= MPI_THROUGHPUT_TARGET;
    }
}

static void print_mpi(FILE *out, const struct moe_bench_options *o,
                      const struct moe_bench_peers *peers)
{
    fprintf(out, "### Open MPI's MPI_Alltoallv\n\n");
    if (peers->mpi_state != MOE_BENCH_PEER_MEASURED) {
        fprintf(out, "- %s: %s\n\n", peers->mpi_state == MOE_BENCH_PEER_SKIPPED ?
                "skipped" : "failed", peers->mpi_reason);
        return;
    }
    fprintf(out,
        "Each mpirun job times `MPI_Alltoallv` alone on `MPI_COMM_WORLD` (%s) "
        "with the sizes and the timing rule of the *All-to-all* section, in "
        "processes placed by mpirun. The moe-ep columns are `moe_alltoallv` "
        "on the rings and `moe_alltoallv_direct`, measured again by the code "
        "of that section right before the mpirun jobs, so that both see the "
        "same load on a shared machine. For each size the ratio is moe-ep's throughput "
        "over MPI's, with a target of >= %.1f; for the 1-token dispatch it is "
        "moe-ep's time per call over MPI's, its latency, with a target of <= "
        "%.0f. A target is met when either call meets it.\n\n"
        "Commands:\n\n    %s\n    %s\n\n",
        peers->mpi_library, MPI_THROUGHPUT_TARGET, MPI_LATENCY_TARGET,
        peers->mpi_commands[0], peers->mpi_commands[1]);
    fprintf(out, "| ranks | bytes per pair | MPI us per call, best | MPI GB/s, "
            "best | rings | ratio | direct | ratio | target |\n"
            "|---|---|---|---|---|---|---|---|---|\n");
    for (int i = 0; i < peers->mpi_count; i++) {
        const struct moe_bench_alltoall *m = &peers->mpi[i];
        char size[32];
        moe_bench_format_bytes(m->bytes_per_pair, size, sizeof size);
        fprintf(out, "| %d | %s%s | %.2f | %.2f |", m->ranks,
                m->one_token ? "1 token, " : "", size, m->best_us, m->best_gbps);
        int met = 0;
        print_moe_cells(out, m, find_row(peers->moe_rings, peers->moe_rings_count,
                                         m->ranks, m->bytes_per_pair, m->one_token),
                        &met);
        print_moe_cells(out, m, find_row(peers->moe_direct, peers->moe_direct_count,
                                         m->ranks, m->bytes_per_pair, m->one_token),
                        &met);
        if (m->one_token)
            fprintf(out, " latency <= %.0f x: %s |\n", MPI_LATENCY_TARGET,
                    verdict(o, met));
        else
            fprintf(out, " throughput >= %.1f x: %s |\n", MPI_THROUGHPUT_TARGET,
                    verdict(o, met));
    }
    fprintf(out, "\n");
}

void moe_bench_print_peers(FILE *out, const struct moe_bench_options *o,
                           const struct moe_bench_results *res)
{
    const struct moe_bench_peers *peers = res->peers;
    if (!peers)
        return;
    fprintf(out,
        "## Peers\n\n"
        "`moe-ep bench --peers` times two other implementations of what moe-ep "
        "does, on this machine and in this run, after every figure above, and "
        "divides moe-ep's figure by theirs. A peer that is not installed is "
        "skipped, and one that fails is reported; either line gives the "
        "reason.\n\n");
    print_torch(out, o, peers);
    print_mpi(out, o, peers);
}
