/*
 * test_large.c - buffers and offsets beyond 2^31 and 2^32 bytes, run by
 * `make test-large` and not by the normal suite or CI.
 *
 * A layer with more than 2^31 elements in the dispatched (T*K, H) buffer,
 * checked against the golden path, does not fit on a machine with 24 GiB:
 * `moe-ep run` needs about 20 bytes of memory per dispatched element (10.6 GiB measured at 5.5e8 elements, 2.5 GiB at
 * 1.3e8, with --ranks 2 --hidden 1024 --ffn 64 --top-k 2), so 2^31
 * elements take about 42 GiB. The two tests here are the largest honest
 * variants:
 *
 *   layer_beyond_2gib     `moe-ep run` with T*K*H = 552,960,000 float32
 *                         (2.2e9 bytes, more than 2^31) and a skewed
 *                         router, so rank 0 receives every dispatched row:
 *                         its receive, expert-input and expert-output
 *                         buffers exceed 2^31 bytes. The golden check must
 *                         be bitwise equal. 10.6 GiB at peak and 29 s
 *                         on a 2-core Zen 3 machine.
 *   alltoallv_beyond_4gib moe_alltoallv() moves one message of 2^32 +
 *                         12345 bytes from rank 0 to rank 1, at a send
 *                         offset above 2^32 and a receive offset above
 *                         2^33, next to small blocks with offsets above
 *                         2^32. A 32-bit truncation of any size or offset
 *                         would misplace or lose bytes. The buffers are
 *                         sparse mappings, so only the blocks cost memory:
 *                         about 8.6 GiB and 28 s on the same machine.
 *
 * Each test first checks MemAvailable and fails with the figures when the
 * machine has too little memory.
 */
#include "moe_error.h"
#include "moe_launch.h"
#include "test_util.h"

#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define GIB (1024.0 * 1024.0 * 1024.0)
#define TEST_TIMEOUT_S 900

/* ---- helpers ---------------------------------------------------------- */

/* MemAvailable from /proc/meminfo, in bytes, or 0 when unknown. */
static double available_bytes(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f)
        return 0;
    char line[256];
    double kib = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lf kB", &kib) == 1)
            break;
    fclose(f);
    return kib * 1024.0;
}

static void require_memory(double needed_bytes, const char *test)
{
    double have = available_bytes();
    cr_assert_geq(have, needed_bytes, "%s needs about %.1f GiB of free memory, "
                  "but MemAvailable is %.1f GiB", test, needed_bytes / GIB,
                  have / GIB);
}

/* ---- the layer through moe-ep run -------------------------------------- */

/* Runs BUILD/moe-ep with args (NULL-terminated), stdout to out_path,
 * stderr to err_path. Kills it after limit_s seconds. Returns the exit
 * status, or 128 + the signal. */
static int run_moe_ep(const char *const *args, const char *out_path,
                      const char *err_path, int limit_s, double *seconds)
{
    char self[PATH_MAX], program[PATH_MAX + 16];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    cr_assert_gt(n, 0);
    self[n] = '\0';
    snprintf(program, sizeof program, "%s/../moe-ep", dirname(self));

    const char *argv[32] = {program};
    int argc = 1;
    for (; args[argc - 1]; argc++)
        argv[argc] = args[argc - 1];
    argv[argc] = NULL;

    int64_t start = moe_now_ns();
    pid_t pid = fork();
    cr_assert_geq(pid, 0, "fork failed: %s", strerror(errno));
    if (pid == 0) {
        if (!freopen(out_path, "w", stdout) || !freopen(err_path, "w", stderr))
            _exit(127);
        execv(program, (char *const *)argv);
        _exit(127);
    }
    int status = 0;
    while (waitpid(pid, &status, WNOHANG) == 0) {
        if (moe_now_ns() - start > (int64_t)limit_s * 1000000000) {
            kill(pid, SIGTERM);
            waitpid(pid, &status, 0);
            cr_assert_fail("moe-ep did not finish within %d s", limit_s);
        }
        usleep(100 * 1000);
    }
    *seconds = (double)(moe_now_ns() - start) / 1e9;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

/* Reads the rows rank 0 receives in the dispatch from the traffic table
 * that moe-ep run prints: the column j = 0 of the rows after "i \ j". */
static int64_t rows_received_by_rank0(FILE *out, int ranks)
{
    char line[4096];
    while (fgets(line, sizeof line, out))
        if (strstr(line, "i \\ j"))
            break;
    int64_t rows = 0;
    for (int i = 0; i < ranks; i++) {
        int src;
        long long to_rank0;
        if (!fgets(line, sizeof line, out) ||
            sscanf(line, " %d %lld", &src, &to_rank0) != 2 || src != i)
            return -1;
        rows += to_rank0;
    }
    return rows;
}

Test(large, layer_beyond_2gib, .timeout = TEST_TIMEOUT_S)
{
    const int64_t tokens = 270000, hidden = 1024, top_k = 2;
    const int64_t values = tokens * top_k * hidden;
    cr_assert_gt(values * 4, INT64_C(1) << 31);
    require_memory(12 * GIB, "layer_beyond_2gib");

    char out_path[] = "/tmp/moe-ep-large-outXXXXXX";
    char err_path[] = "/tmp/moe-ep-large-errXXXXXX";
    int out_fd = mkstemp(out_path), err_fd = mkstemp(err_path);
    cr_assert(out_fd >= 0 && err_fd >= 0);
    const char *args[] = {"run", "--ranks", "2", "--tokens", "270000",
                          "--hidden", "1024", "--ffn", "64", "--experts", "8",
                          "--top-k", "2", "--skew", "10", "--timeout", "300",
                          NULL};
    double seconds = 0;
    int status = run_moe_ep(args, out_path, err_path, 800, &seconds);

    FILE *out = fopen(out_path, "r");
    FILE *err = fopen(err_path, "r");
    cr_assert(out && err);
    char err_text[4096] = "";
    size_t err_bytes = fread(err_text, 1, sizeof err_text - 1, err);
    err_text[err_bytes] = '\0';
    fclose(err);
    unlink(err_path);
    close(err_fd);

    char expected[96];
    snprintf(expected, sizeof expected, "golden check: bitwise equal (%" PRId64
             " values)", tokens * hidden);
    char text[1 << 16];
    size_t text_bytes = fread(text, 1, sizeof text - 1, out);
    text[text_bytes] = '\0';
    rewind(out);
    int64_t rows = rows_received_by_rank0(out, 2);
    fclose(out);
    unlink(out_path);
    close(out_fd);

    cr_log_info("moe-ep run with %" PRId64 " dispatched values took %.1f s",
                values, seconds);
    cr_assert_eq(status, 0, "moe-ep exited with %d: %s", status, err_text);
    cr_expect(strstr(text, expected) != NULL, "the output lacks \"%s\":\n%s",
              expected, text);
    cr_assert_geq(rows, 0, "no traffic table in the output:\n%s", text);
    cr_expect_gt(rows * hidden * 4, INT64_C(1) << 31, "rank 0 received %"
                 PRId64 " rows, %" PRId64 " bytes, not more than 2^31", rows,
                 rows * hidden * 4);
}

/* ---- moe_alltoallv beyond 2^32 bytes ------------------------------------ */

#define BIG_BYTES ((UINT64_C(1) << 32) + 12345)
#define SMALL_BYTES (UINT64_C(1) << 20)
#define TINY_BYTES UINT64_C(1000)
/* The two ranks' send and receive layouts, identical on both sides. */
#define SEND0_TO0 UINT64_C(0)
#define SEND0_TO1 ((UINT64_C(1) << 32) + 3)
#define SEND1_TO0 UINT64_C(0)
#define RECV0_FROM0 ((UINT64_C(1) << 32) + 7)
#define RECV0_FROM1 ((UINT64_C(1) << 33) + 1)
#define RECV1_FROM0 ((UINT64_C(1) << 33) + 5)
/* Bytes checked to be still zero on each side of a received block. */
#define GUARD_BYTES UINT64_C(4096)

struct big_verdict {
    int32_t rc;
    int32_t ok;
    uint64_t bytes_checked;
    char failure[240];
};

struct big_area {
    struct big_verdict verdict[2];
};

/* Fills dst[0..bytes) with the little-endian bytes of mix(seed, 0),
 * mix(seed, 1), ... */
static uint64_t word_of(uint64_t seed, uint64_t index)
{
    uint64_t x = seed * 0x9e3779b97f4a7c15ULL + index;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static void fill_block(uint8_t *dst, uint64_t bytes, uint64_t seed)
{
    for (uint64_t w = 0; w * 8 < bytes; w++) {
        uint64_t word = word_of(seed, w);
        uint64_t n = bytes - w * 8 < 8 ? bytes - w * 8 : 8;
        memcpy(dst + w * 8, &word, n);
    }
}

/* Returns the first byte of block that differs from fill_block(), or
 * `bytes` when none does. */
static uint64_t first_difference(const uint8_t *block, uint64_t bytes,
                                 uint64_t seed)
{
    for (uint64_t w = 0; w * 8 < bytes; w++) {
        uint64_t word = word_of(seed, w);
        uint64_t n = bytes - w * 8 < 8 ? bytes - w * 8 : 8;
        if (memcmp(block + w * 8, &word, n) != 0)
            for (uint64_t k = 0; k < n; k++)
                if (block[w * 8 + k] != ((const uint8_t *)&word)[k])
                    return w * 8 + k;
    }
    return bytes;
}

static void verdict_fail(struct big_verdict *v, const char *format, ...)
    __attribute__((format(printf, 2, 3)));
static void verdict_fail(struct big_verdict *v, const char *format, ...)
{
    if (!v->ok)
        return;
    v->ok = 0;
    va_list args;
    va_start(args, format);
    vsnprintf(v->failure, sizeof v->failure, format, args);
    va_end(args);
}

/* Checks a received block and the zero bytes around it. */
static void check_received(struct big_verdict *v, const uint8_t *recv,
                           uint64_t offset, uint64_t bytes, uint64_t seed,
                           int me, int src)
{
    uint64_t bad = first_difference(recv + offset, bytes, seed);
    if (bad < bytes)
        verdict_fail(v, "rank %d: byte %" PRIu64 " of %" PRIu64 " from rank %d "
                     "differs", me, bad, bytes, src);
    for (uint64_t k = 1; k <= GUARD_BYTES; k++)
        if (recv[offset - k] != 0 || recv[offset + bytes + k - 1] != 0) {
            verdict_fail(v, "rank %d: a byte within %" PRIu64 " of the block "
                         "from rank %d was written", me, k, src);
            break;
        }
    v->bytes_checked += bytes;
}

/* A zero-filled private mapping that costs memory only where it is
 * written. */
static uint8_t *sparse_buffer(uint64_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static int big_rank_main(struct moe_comm *comm, void *arg)
{
    (void)arg;
    int me = comm->rank;
    struct big_area *area = moe_segment_app(comm->segment);
    struct big_verdict *v = &area->verdict[me];
    v->ok = 1;

    uint64_t send_bytes[2], send_offsets[2], recv_bytes[2], recv_offsets[2];
    uint64_t send_size, recv_size;
    if (me == 0) {
        send_bytes[0] = SMALL_BYTES, send_offsets[0] = SEND0_TO0;
        send_bytes[1] = BIG_BYTES, send_offsets[1] = SEND0_TO1;
        recv_bytes[0] = SMALL_BYTES, recv_offsets[0] = RECV0_FROM0;
        recv_bytes[1] = TINY_BYTES, recv_offsets[1] = RECV0_FROM1;
        send_size = SEND0_TO1 + BIG_BYTES;
        recv_size = RECV0_FROM1 + TINY_BYTES + GUARD_BYTES;
    } else {
        send_bytes[0] = TINY_BYTES, send_offsets[0] = SEND1_TO0;
        send_bytes[1] = 0, send_offsets[1] = 0;
        recv_bytes[0] = BIG_BYTES, recv_offsets[0] = RECV1_FROM0;
        recv_bytes[1] = 0, recv_offsets[1] = 0;
        send_size = TINY_BYTES;
        recv_size = RECV1_FROM0 + BIG_BYTES + GUARD_BYTES;
    }
    uint8_t *send = sparse_buffer(send_size), *recv = sparse_buffer(recv_size);
    if (!send || !recv)
        return moe_fail(-ENOMEM, "rank %d: mapping the buffers failed", me);
    for (int d = 0; d < 2; d++)
        fill_block(send + send_offsets[d], send_bytes[d], (uint64_t)(me * 2 + d));

    moe_comm_set_step(comm, MOE_STEP_DISPATCH);
    v->rc = moe_alltoallv(comm, send, send_bytes, send_offsets, recv,
                          recv_bytes, recv_offsets);
    if (v->rc == 0)
        for (int s = 0; s < 2; s++)
            if (recv_bytes[s])
                check_received(v, recv, recv_offsets[s], recv_bytes[s],
                               (uint64_t)(s * 2 + me), me, s);
    munmap(send, send_size);
    munmap(recv, recv_size);
    return v->rc;
}

Test(large, alltoallv_beyond_4gib, .timeout = TEST_TIMEOUT_S)
{
    require_memory(2.0 * (double)BIG_BYTES + GIB, "alltoallv_beyond_4gib");
    struct moe_launch_config config = {
        .ranks = 2,
        .ring_capacity = 0,
        .app_bytes = sizeof(struct big_area),
        .timeout_ns = 120LL * 1000 * 1000 * 1000,
        .rank_main = big_rank_main,
    };
    struct moe_launch launch;
    cr_assert_eq(moe_launch_create(&launch, &config), 0, "%s",
                 moe_error_message());
    int64_t start = moe_now_ns();
    int rc = moe_launch_run(&launch);
    double seconds = (double)(moe_now_ns() - start) / 1e9;
    struct big_area area;
    memcpy(&area, moe_segment_app(launch.segment), sizeof area);
    char description[2][MOE_ERROR_TEXT_BYTES + 64];
    for (int r = 0; r < 2; r++)
        moe_launch_describe(&launch, r, description[r], sizeof description[r]);
    moe_launch_destroy(&launch);

    cr_log_info("moe_alltoallv of %" PRIu64 " bytes took %.1f s", BIG_BYTES,
                seconds);
    cr_assert_eq(rc, 0, "the launch failed: rank 0: %s; rank 1: %s",
                 description[0], description[1]);
    for (int r = 0; r < 2; r++) {
        cr_expect_eq(area.verdict[r].rc, 0, "rank %d returned %d", r,
                     area.verdict[r].rc);
        cr_expect(area.verdict[r].ok, "%s", area.verdict[r].failure);
    }
    cr_expect_eq(area.verdict[0].bytes_checked, SMALL_BYTES + TINY_BYTES);
    cr_expect_eq(area.verdict[1].bytes_checked, BIG_BYTES);
}
