/*
 * test_safetensors.c - tests of the safetensors reader, writer and FP8
 * block quantisation.
 *
 * Broken files are built byte by byte with a writer local to this file, so
 * that each case in the header validation list is rejected with -EINVAL and
 * a message naming the file and the reason. Valid files go through
 * moe_st_write() and are read back bit for bit, as one file and as shards
 * with an index. The writer's output is also checked with cJSON directly,
 * independently of the reader. A fuzz loop flips and truncates bytes of a
 * valid file and requires every open and read to return 0 or an error.
 * Each test works in its own temporary directory, removed by the suite's
 * fini hook.
 */
#define _GNU_SOURCE /* nftw() */
#include "moe_error.h"
#include "moe_safetensors.h"
#include "test_util.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- temporary directory ---------------------------------------------- */

static char test_dir[256];

static void make_test_dir(void)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(test_dir, sizeof test_dir, "%s/moe-st-XXXXXX",
             tmp != NULL && tmp[0] != '\0' ? tmp : "/tmp");
    cr_assert_not_null(mkdtemp(test_dir), "mkdtemp(%s) failed: %s", test_dir,
                       strerror(errno));
}

static int remove_entry(const char *path, const struct stat *st, int type,
                        struct FTW *ftw)
{
    (void)st;
    (void)type;
    (void)ftw;
    remove(path);
    return 0;
}

static void remove_test_dir(void)
{
    nftw(test_dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

TestSuite(safetensors, .init = make_test_dir, .fini = remove_test_dir,
          .timeout = 120);

/* ---- helpers ---------------------------------------------------------- */

/* Sets out to test_dir/name. */
static void path_in_test_dir(char *out, size_t size, const char *name)
{
    int n = snprintf(out, size, "%s/%s", test_dir, name);
    cr_assert(n > 0 && (size_t)n < size, "path too long");
}

static void write_bytes(const char *path, const void *bytes, size_t count)
{
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f, "fopen(%s) failed: %s", path, strerror(errno));
    if (count > 0)
        cr_assert_eq(fwrite(bytes, 1, count, f), count, "short write to %s",
                     path);
    cr_assert_eq(fclose(f), 0, "fclose(%s) failed", path);
}

/* Replaces a file by unlinking and creating it. Truncating it in place
 * instead makes ext4 flush it on close (auto_da_alloc), which slows the
 * fuzz loops tenfold. */
static void replace_bytes(const char *path, const void *bytes, size_t count)
{
    cr_assert(unlink(path) == 0 || errno == ENOENT, "unlink(%s) failed: %s",
              path, strerror(errno));
    write_bytes(path, bytes, count);
}

static uint8_t *read_bytes(const char *path, size_t *count)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "fopen(%s) failed: %s", path, strerror(errno));
    cr_assert_eq(fseek(f, 0, SEEK_END), 0);
    long size = ftell(f);
    cr_assert_geq(size, 0);
    rewind(f);
    uint8_t *bytes = malloc((size_t)size + 1);
    cr_assert_not_null(bytes);
    cr_assert_eq(fread(bytes, 1, (size_t)size, f), (size_t)size);
    fclose(f);
    *count = (size_t)size;
    return bytes;
}

/* Writes a safetensors file by hand: the 8-byte length field holding
 * `length_field`, the header text, then data_bytes bytes of data (zeros
 * when data is NULL). */
static void write_raw_st(const char *path, uint64_t length_field,
                         const char *header, const void *data,
                         size_t data_bytes)
{
    size_t header_len = strlen(header);
    size_t total = 8 + header_len + data_bytes;
    uint8_t *buf = calloc(total, 1);
    cr_assert_not_null(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)(length_field >> (8 * i));
    memcpy(buf + 8, header, header_len);
    if (data != NULL)
        memcpy(buf + 8 + header_len, data, data_bytes);
    write_bytes(path, buf, total);
    free(buf);
}

/* Writes a file whose length field matches its header. */
static void write_st(const char *path, const char *header, const void *data,
                     size_t data_bytes)
{
    write_raw_st(path, strlen(header), header, data, data_bytes);
}

/* Asserts that the last error message contains `text`. */
#define expect_message_contains(text)                                          \
    do {                                                                       \
        const char *msg_ = moe_error_message();                                \
        cr_assert_not_null(strstr(msg_, (text)),                               \
                           "message \"%s\" does not contain \"%s\"", msg_,     \
                           (text));                                            \
    } while (0)

/* Writes test_dir/model.safetensors with `header` and data_bytes zero
 * bytes of data and asserts that opening the model fails with -EINVAL
 * and a message naming the file and `reason`. */
#define expect_header_rejected(header, data_bytes, reason)                     \
    do {                                                                       \
        char path_[512];                                                       \
        path_in_test_dir(path_, sizeof path_, "model.safetensors");            \
        write_st(path_, (header), NULL, (data_bytes));                         \
        expect_open_rejected(path_, reason);                                   \
    } while (0)

#define expect_open_rejected(path, reason)                                     \
    do {                                                                       \
        struct moe_st_model *model_ = (struct moe_st_model *)1;                \
        moe_error_clear();                                                     \
        int rc_ = moe_st_open_model(test_dir, &model_);                        \
        cr_assert_eq(rc_, -EINVAL, "rc %d, expected -EINVAL (%s)", rc_,        \
                     moe_error_message());                                     \
        cr_assert_null(model_, "model not NULL after a failure");              \
        expect_message_contains(path);                                         \
        expect_message_contains(reason);                                       \
    } while (0)

static struct moe_st_model *open_test_model(void)
{
    struct moe_st_model *model = NULL;
    int rc = moe_st_open_model(test_dir, &model);
    cr_assert_eq(rc, 0, "moe_st_open_model: rc %d: %s", rc,
                 moe_error_message());
    cr_assert_not_null(model);
    return model;
}

static uint32_t bits_of(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits;
}

static float float_of(uint32_t bits)
{
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* Decodes an e4m3fn code from its fields with ldexp(), independently of
 * moe_f8e4m3_to_f32(). */
static float reference_f8(uint8_t code)
{
    int exponent = (code >> 3) & 0xf, mantissa = code & 7;
    double value;
    if (exponent == 15 && mantissa == 7)
        value = NAN;
    else if (exponent == 0)
        value = ldexp(mantissa, -9);
    else
        value = ldexp(8 + mantissa, exponent - 10);
    return (float)((code & 0x80) ? -value : value);
}

/* ---- header validation ------------------------------------------------ */

Test(safetensors, rejects_short_file)
{
    char path[512];
    path_in_test_dir(path, sizeof path, "model.safetensors");
    write_bytes(path, "", 0);
    expect_open_rejected(path, "shorter than the 8-byte header length");
    write_bytes(path, "\x02\x00\x00\x00\x00", 5);
    expect_open_rejected(path, "file is 5 bytes");
}

Test(safetensors, rejects_header_length_past_end)
{
    char path[512];
    path_in_test_dir(path, sizeof path, "model.safetensors");
    write_raw_st(path, 1000, "{}", NULL, 16);
    expect_open_rejected(path, "header length 1000 runs past the end");
    write_raw_st(path, 3, "{}", NULL, 0);
    expect_open_rejected(path, "runs past the end of the file (10 bytes)");
}

Test(safetensors, rejects_absurd_header_length)
{
    char path[512];
    path_in_test_dir(path, sizeof path, "model.safetensors");
    write_raw_st(path, 200000000, "{}", NULL, 0);
    expect_open_rejected(path, "header length 200000000 exceeds the limit");
    write_raw_st(path, UINT64_MAX, "{}", NULL, 0);
    expect_open_rejected(path, "exceeds the limit");
}

Test(safetensors, rejects_header_not_json)
{
    expect_header_rejected("{\"a\": ", 0, "header is not valid JSON");
    expect_header_rejected("{\"a\": {\"dtype\": F32}}", 0,
                           "header is not valid JSON");
    expect_header_rejected("", 0, "does not start with '{'");
    expect_header_rejected("{\"a\":\xff}", 0, "not valid UTF-8");
    expect_header_rejected("{\"\xc0\xaf\": {}}", 0, "not valid UTF-8");
    expect_header_rejected("{\"a\x01\": {}}", 0, "byte 0x01");
}

Test(safetensors, rejects_header_not_object)
{
    expect_header_rejected("[1, 2]", 0, "header is not a JSON object");
    expect_header_rejected("\"text\"", 0, "header is not a JSON object");
    expect_header_rejected(" {}", 0, "does not start with '{'");
}

Test(safetensors, rejects_text_after_header_object)
{
    expect_header_rejected("{} x", 0, "only space padding may follow");
    expect_header_rejected("{}\n", 0, "byte 0x0a");
    expect_header_rejected("{}{}", 0, "after its JSON object");
}

Test(safetensors, rejects_bad_tensor_entries)
{
    expect_header_rejected("{\"w\": 5}", 0,
                           "tensor 'w': entry is not a JSON object");
    expect_header_rejected("{\"w\": [1]}", 0, "entry is not a JSON object");
    expect_header_rejected(
        "{\"w\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
        "tensor 'w': missing \"dtype\"");
    expect_header_rejected(
        "{\"w\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", 4,
        "tensor 'w': missing \"shape\"");
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4,
                           "tensor 'w': missing \"data_offsets\"");
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": [1], "
                           "\"data_offsets\": [0, 4], \"extra\": 1}}",
                           4, "unexpected key 'extra'");
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"dtype\": \"F32\", "
                           "\"shape\": [1], \"data_offsets\": [0, 4]}}",
                           4, "duplicate key \"dtype\"");
}

Test(safetensors, rejects_wrong_json_types)
{
    expect_header_rejected(
        "{\"w\": {\"dtype\": 4, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4,
        "\"dtype\" is not a string");
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": \"1\", "
                           "\"data_offsets\": [0, 4]}}",
                           4, "\"shape\" is not an array");
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": [\"1\"], "
                           "\"data_offsets\": [0, 4]}}",
                           4, "shape[0] is not a number");
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": [1], "
                           "\"data_offsets\": [0]}}",
                           4, "\"data_offsets\" is not an array of 2 integers");
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": [1], "
                           "\"data_offsets\": {\"a\": 0}}}",
                           4, "\"data_offsets\" is not an array of 2 integers");
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": [1], "
                           "\"data_offsets\": [0, null]}}",
                           4, "data_offsets[1] is not a number");
}

Test(safetensors, rejects_bad_shape_values)
{
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": [-1], "
                           "\"data_offsets\": [0, 4]}}",
                           4, "shape[0] is -1, a negative value");
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 1.5], "
                           "\"data_offsets\": [0, 12]}}",
                           12, "shape[1] is 1.5, not an integer");
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": [1e300], "
                           "\"data_offsets\": [0, 4]}}",
                           4, "too large (above 2^53)");
    expect_header_rejected(
        "{\"w\": {\"dtype\": \"F32\", \"shape\": [9007199254740993000], "
        "\"data_offsets\": [0, 4]}}",
        4, "too large (above 2^53)");
    expect_header_rejected(
        "{\"w\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1,1,1,1,1], "
        "\"data_offsets\": [0, 4]}}",
        4, "shape has 9 dimensions, more than the 8 supported");
    /* Each dimension is allowed, but the product overflows 64 bits. */
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": "
                           "[4294967296, 4294967296, 2], "
                           "\"data_offsets\": [0, 4]}}",
                           4, "overflows 64 bits");
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": "
                           "[4294967296, 1073741824], "
                           "\"data_offsets\": [0, 4]}}",
                           4, "overflows 64 bits");
}

Test(safetensors, rejects_bad_offsets)
{
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": [1], "
                           "\"data_offsets\": [8, 4]}}",
                           16, "data_offsets [8, 4] begin after end");
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": [16], "
                           "\"data_offsets\": [0, 64]}}",
                           16,
                           "data_offsets end 64 is beyond the data buffer of "
                           "16 bytes");
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": [1], "
                           "\"data_offsets\": [-4, 0]}}",
                           16, "data_offsets[0] is -4, a negative value");
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": [1], "
                           "\"data_offsets\": [0, 4.5]}}",
                           16, "data_offsets[1] is 4.5, not an integer");
    expect_header_rejected("{\"w\": {\"dtype\": \"F32\", \"shape\": [2, 3], "
                           "\"data_offsets\": [0, 20]}}",
                           24,
                           "data_offsets [0, 20] span 20 bytes, but shape "
                           "[2, 3] of F32 needs 24 bytes");
    expect_header_rejected("{\"w\": {\"dtype\": \"BF16\", \"shape\": [3], "
                           "\"data_offsets\": [0, 12]}}",
                           12, "shape [3] of BF16 needs 6 bytes");
    expect_header_rejected("{\"w\": {\"dtype\": \"F4\", \"shape\": [3], "
                           "\"data_offsets\": [0, 2]}}",
                           2, "shape [3] of F4 is not a whole number of bytes");
}

Test(safetensors, rejects_overlapping_tensors)
{
    expect_header_rejected(
        "{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]},"
        " \"b\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [8, 24]}}",
        24, "tensors 'a' (bytes [0, 16)) and 'b' (bytes [8, 24)) overlap");
    /* b lies inside a, which begins first and ends last. */
    expect_header_rejected(
        "{\"c\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [28, "
        "32]}, \"a\": {\"dtype\": \"F32\", \"shape\": [6], \"data_offsets\": "
        "[0, 24]}, \"b\": {\"dtype\": \"F32\", \"shape\": [1], "
        "\"data_offsets\": [8, 12]}}",
        32, "tensors 'a' (bytes [0, 24)) and 'b' (bytes [8, 12)) overlap");
    /* The same range twice. */
    expect_header_rejected(
        "{\"a\": {\"dtype\": \"U8\", \"shape\": [4], \"data_offsets\": [0, 4]},"
        " \"b\": {\"dtype\": \"I8\", \"shape\": [4], \"data_offsets\": [0, 4]}}",
        4, "tensors 'a' (bytes [0, 4)) and 'b' (bytes [0, 4)) overlap");
}

Test(safetensors, rejects_unknown_dtype)
{
    expect_header_rejected("{\"w\": {\"dtype\": \"Q4_K\", \"shape\": [1], "
                           "\"data_offsets\": [0, 1]}}",
                           1, "tensor 'w': unknown dtype 'Q4_K'");
    expect_header_rejected("{\"w\": {\"dtype\": \"f32\", \"shape\": [1], "
                           "\"data_offsets\": [0, 4]}}",
                           4, "safetensors dtypes are F32, F16, BF16, F8_E4M3");
}

Test(safetensors, rejects_duplicate_tensor_name)
{
    expect_header_rejected(
        "{\"w\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [0, 1]},"
        " \"w\": {\"dtype\": \"U8\", \"shape\": [1], \"data_offsets\": [1, 2]}}",
        2, "tensor 'w' appears twice in the header");
}

Test(safetensors, rejects_bad_metadata)
{
    expect_header_rejected("{\"__metadata__\": [\"pt\"]}", 0,
                           "\"__metadata__\" is not a JSON object");
    expect_header_rejected("{\"__metadata__\": {\"format\": 1}}", 0,
                           "value of key 'format' is not a string");
    expect_header_rejected("{\"__metadata__\": {}, \"__metadata__\": {}}", 0,
                           "\"__metadata__\" appears twice");
}

/* Headers that are valid although unusual: padding, metadata, every
 * safetensors dtype, empty tensors sharing an offset, holes in the
 * buffer, a scalar. */
Test(safetensors, accepts_valid_headers)
{
    char path[512];
    path_in_test_dir(path, sizeof path, "model.safetensors");
    write_st(path,
             "{\"__metadata__\": {\"format\": \"pt\"},"
             " \"i32\": {\"dtype\": \"I32\", \"shape\": [2], \"data_offsets\": "
             "[0, 8]},"
             " \"c64\": {\"dtype\": \"C64\", \"shape\": [1], \"data_offsets\": "
             "[8, 16]},"
             " \"f4\": {\"dtype\": \"F4\", \"shape\": [2, 3], \"data_offsets\": "
             "[16, 19]},"
             " \"f6\": {\"dtype\": \"F6_E2M3\", \"shape\": [4], "
             "\"data_offsets\": [19, 22]},"
             " \"empty1\": {\"dtype\": \"F32\", \"shape\": [0, 5], "
             "\"data_offsets\": [22, 22]},"
             " \"empty2\": {\"dtype\": \"BF16\", \"shape\": [3, 0], "
             "\"data_offsets\": [22, 22]},"
             " \"scalar\": {\"dtype\": \"F32\", \"shape\": [], "
             "\"data_offsets\": [24, 28]}}        ",
             NULL, 32);
    struct moe_st_model *model = open_test_model();

    struct moe_st_info info;
    cr_assert_eq(moe_st_find(model, "f4", &info), 0, "%s", moe_error_message());
    cr_assert_eq(info.dtype, MOE_DTYPE_F4);
    cr_assert_eq(info.ndim, 2);
    cr_assert_eq(info.shape[0], 2);
    cr_assert_eq(info.shape[1], 3);
    cr_assert_eq(info.shape[2], 0);
    cr_assert_str_eq(info.file, path);

    cr_assert_eq(moe_st_find(model, "scalar", &info), 0);
    cr_assert_eq(info.ndim, 0);

    float value = -1.0f;
    cr_assert_eq(moe_st_read_f32(model, "scalar", 0, NULL, &value), 0, "%s",
                 moe_error_message());
    cr_assert_eq(bits_of(value), 0, "scalar read as %a", (double)value);

    int64_t empty_shape[2] = {0, 5};
    cr_assert_eq(moe_st_read_f32(model, "empty1", 2, empty_shape, &value), 0,
                 "%s", moe_error_message());

    int64_t i32_shape[1] = {2};
    float i32_values[2];
    moe_error_clear();
    cr_assert_eq(moe_st_read_f32(model, "i32", 1, i32_shape, i32_values),
                 -EINVAL);
    expect_message_contains("tensor 'i32'");
    expect_message_contains(path);
    expect_message_contains("unsupported dtype I32");
    moe_st_close(model);
}

/* ---- models and lookups ----------------------------------------------- */

Test(safetensors, empty_directory_rejected)
{
    expect_open_rejected(test_dir,
                         "neither model.safetensors nor "
                         "model.safetensors.index.json");
}

Test(safetensors, missing_directory_rejected)
{
    char path[512];
    path_in_test_dir(path, sizeof path, "no-such-dir");
    struct moe_st_model *model = NULL;
    int rc = moe_st_open_model(path, &model);
    cr_assert_eq(rc, -EINVAL, "rc %d", rc);
    cr_assert_null(model);
    expect_message_contains(path);
    expect_message_contains("cannot open the model directory");
}

Test(safetensors, missing_tensor_is_enoent)
{
    char path[512];
    path_in_test_dir(path, sizeof path, "model.safetensors");
    write_st(path,
             "{\"w\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": "
             "[0, 4]}}",
             NULL, 4);
    struct moe_st_model *model = open_test_model();

    struct moe_st_info info;
    moe_error_clear();
    cr_assert_eq(moe_st_find(model, "model.layers.3.mlp.gate.weight", &info),
                 -ENOENT);
    expect_message_contains("tensor 'model.layers.3.mlp.gate.weight' not found");
    expect_message_contains(path);

    float value;
    int64_t shape[1] = {1};
    cr_assert_eq(moe_st_read_f32(model, "x", 1, shape, &value), -ENOENT);
    moe_st_close(model);
}

Test(safetensors, shape_mismatch_rejected)
{
    char path[512];
    path_in_test_dir(path, sizeof path, "model.safetensors");
    write_st(path,
             "{\"experts.0.w1\": {\"dtype\": \"F32\", \"shape\": [2, 3], "
             "\"data_offsets\": [0, 24]}}",
             NULL, 24);
    struct moe_st_model *model = open_test_model();

    float dst[6] = {1, 2, 3, 4, 5, 6};
    const float before[6] = {1, 2, 3, 4, 5, 6};
    int64_t transposed[2] = {3, 2};
    moe_error_clear();
    cr_assert_eq(moe_st_read_f32(model, "experts.0.w1", 2, transposed, dst),
                 -EINVAL);
    expect_message_contains("tensor 'experts.0.w1'");
    expect_message_contains(path);
    expect_message_contains("has shape [2, 3], expected [3, 2]");
    cr_assert_eq(memcmp(dst, before, sizeof dst), 0, "dst changed on failure");

    int64_t flat[1] = {6};
    cr_assert_eq(moe_st_read_f32(model, "experts.0.w1", 1, flat, dst), -EINVAL);
    expect_message_contains("expected [6]");

    int64_t rank3[3] = {2, 3, 1};
    cr_assert_eq(moe_st_read_f32(model, "experts.0.w1", 3, rank3, dst), -EINVAL);
    cr_assert_eq(moe_st_read_f32(model, "experts.0.w1", 9, rank3, dst), -EINVAL);
    moe_st_close(model);
}

/* ---- writer and round trips ------------------------------------------- */

/* Float32 values with special bit patterns: signed zeros, subnormals,
 * infinities, NaN payloads, extremes. */
static const uint32_t special_f32[] = {
    0x00000000, 0x80000000, 0x00000001, 0x807fffff, 0x3f800000, 0xc0490fdb,
    0x7f7fffff, 0xff800000, 0x7f800000, 0x7fc00001, 0xffbfffff, 0x3eaaaaab,
};

Test(safetensors, write_read_bitwise)
{
    enum { N = 65536 };
    uint16_t *codes = malloc(N * sizeof *codes);
    cr_assert_not_null(codes);
    for (uint32_t i = 0; i < N; i++)
        codes[i] = (uint16_t)i;
    float special[12];
    for (int i = 0; i < 12; i++)
        special[i] = float_of(special_f32[i]);

    struct moe_st_tensor_out tensors[3] = {
        {.name = "f32", .dtype = MOE_DTYPE_F32, .ndim = 2, .shape = {3, 4},
         .data = special},
        {.name = "bf16", .dtype = MOE_DTYPE_BF16, .ndim = 2,
         .shape = {256, 256}, .data = codes},
        {.name = "f16", .dtype = MOE_DTYPE_F16, .ndim = 3,
         .shape = {16, 64, 64}, .data = codes},
    };
    char path[512];
    path_in_test_dir(path, sizeof path, "model.safetensors");
    cr_assert_eq(moe_st_write(path, tensors, 3, "pt"), 0, "%s",
                 moe_error_message());

    struct moe_st_model *model = open_test_model();
    float f32[12];
    cr_assert_eq(moe_st_read_f32(model, "f32", 2, tensors[0].shape, f32), 0,
                 "%s", moe_error_message());
    cr_assert_eq(memcmp(f32, special, sizeof f32), 0, "F32 bits changed");

    /* BF16 is the upper half of a float32, so the expected bits need no
     * converter. */
    float *wide = malloc(N * sizeof *wide);
    uint32_t *expected = malloc(N * sizeof *expected);
    cr_assert_not_null(wide);
    cr_assert_not_null(expected);
    cr_assert_eq(moe_st_read_f32(model, "bf16", 2, tensors[1].shape, wide), 0,
                 "%s", moe_error_message());
    for (uint32_t i = 0; i < N; i++)
        expected[i] = i << 16;
    cr_assert_eq(memcmp(wide, expected, N * sizeof *wide), 0,
                 "BF16 read differs from code << 16");

    /* F16: moe_f16_to_f32 is checked against an ldexp reference for all
     * 65536 codes in test_dtype.c. */
    cr_assert_eq(moe_st_read_f32(model, "f16", 3, tensors[2].shape, wide), 0,
                 "%s", moe_error_message());
    for (uint32_t i = 0; i < N; i++)
        expected[i] = bits_of(moe_f16_to_f32((uint16_t)i));
    cr_assert_eq(memcmp(wide, expected, N * sizeof *wide), 0,
                 "F16 read differs");
    cr_assert_eq(wide[0x3c00], 1.0f);
    cr_assert_eq(wide[0x7bff], 65504.0f);
    cr_assert_eq(wide[0x0001], 0x1p-24f);

    moe_st_close(model);
    free(expected);
    free(wide);
    free(codes);
}

/* Reads the writer's file with cJSON and checks the layout directly. */
Test(safetensors, writer_layout)
{
    uint8_t f8[3] = {0x38, 0xb8, 0x7e};
    float f32[2] = {1.5f, -2.0f};
    uint16_t bf16[3] = {0x3f80, 0x4000, 0xc040};
    struct moe_st_tensor_out tensors[3] = {
        {.name = "q \"quoted\"", .dtype = MOE_DTYPE_F8_E4M3, .ndim = 1,
         .shape = {3}, .data = f8},
        {.name = "h", .dtype = MOE_DTYPE_BF16, .ndim = 1, .shape = {3},
         .data = bf16},
        {.name = "s", .dtype = MOE_DTYPE_F32, .ndim = 2, .shape = {1, 2},
         .data = f32},
    };
    char path[512];
    path_in_test_dir(path, sizeof path, "layout.safetensors");
    cr_assert_eq(moe_st_write(path, tensors, 3, "pt"), 0, "%s",
                 moe_error_message());

    size_t size;
    uint8_t *file = read_bytes(path, &size);
    uint64_t header_len = 0;
    for (int i = 0; i < 8; i++)
        header_len |= (uint64_t)file[i] << (8 * i);
    cr_assert_eq((8 + header_len) % 8, 0, "data starts at %" PRIu64,
                 8 + header_len);
    cr_assert_eq(size, 8 + header_len + 3 + 6 + 8, "file size %zu", size);

    const char *header = (const char *)file + 8;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(header, header_len, &end, 0);
    cr_assert_not_null(root, "header is not JSON");
    for (const char *p = end; p < header + header_len; p++)
        cr_assert_eq(*p, ' ', "padding byte 0x%02x", (uint8_t)*p);

    const cJSON *metadata = cJSON_GetObjectItemCaseSensitive(root, "__metadata__");
    cr_assert_str_eq(
        cJSON_GetObjectItemCaseSensitive(metadata, "format")->valuestring, "pt");

    /* Largest elements first: s (F32) at 0, h (BF16) at 8, q (F8) at 14. */
    static const struct {
        const char *name, *dtype;
        int begin, end;
    } expected[3] = {{"s", "F32", 0, 8},
                     {"h", "BF16", 8, 14},
                     {"q \"quoted\"", "F8_E4M3", 14, 17}};
    const void *data[3] = {f32, bf16, f8};
    const cJSON *entry = metadata->next;
    for (int i = 0; i < 3; i++, entry = entry->next) {
        cr_assert_not_null(entry);
        cr_assert_str_eq(entry->string, expected[i].name);
        cr_assert_str_eq(
            cJSON_GetObjectItemCaseSensitive(entry, "dtype")->valuestring,
            expected[i].dtype);
        const cJSON *offsets =
            cJSON_GetObjectItemCaseSensitive(entry, "data_offsets");
        int begin = cJSON_GetArrayItem(offsets, 0)->valueint;
        int stop = cJSON_GetArrayItem(offsets, 1)->valueint;
        cr_assert_eq(begin, expected[i].begin, "%s begins at %d",
                     expected[i].name, begin);
        cr_assert_eq(stop, expected[i].end, "%s ends at %d", expected[i].name,
                     stop);
        cr_assert_eq(memcmp(file + 8 + header_len + begin, data[i],
                            (size_t)(stop - begin)),
                     0, "%s data differs", expected[i].name);
    }
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(root, "s"), "shape");
    cr_assert_eq(cJSON_GetArraySize(shape), 2);
    cr_assert_eq(cJSON_GetArrayItem(shape, 0)->valueint, 1);
    cr_assert_eq(cJSON_GetArrayItem(shape, 1)->valueint, 2);
    cJSON_Delete(root);
    free(file);
}

Test(safetensors, writer_rejects_bad_tensors)
{
    char path[512];
    path_in_test_dir(path, sizeof path, "bad.safetensors");
    float data[4] = {0};
    struct moe_st_tensor_out good = {.name = "w", .dtype = MOE_DTYPE_F32,
                                     .ndim = 1, .shape = {4}, .data = data};
    struct moe_st_tensor_out t[2] = {good, good};

    cr_assert_eq(moe_st_write(path, t, 2, NULL), -EINVAL);
    expect_message_contains("tensor name 'w' appears twice");

    t[1].name = "__metadata__";
    cr_assert_eq(moe_st_write(path, t, 2, NULL), -EINVAL);
    expect_message_contains("invalid name '__metadata__'");

    t[1] = good;
    t[1].name = "v";
    t[1].data = NULL;
    cr_assert_eq(moe_st_write(path, t, 2, NULL), -EINVAL);
    expect_message_contains("tensor 'v': data is NULL");

    t[1] = good;
    t[1].name = "v";
    t[1].ndim = 9;
    cr_assert_eq(moe_st_write(path, t, 2, NULL), -EINVAL);
    expect_message_contains("9 dimensions");

    t[1].ndim = 2;
    t[1].shape[1] = -1;
    cr_assert_eq(moe_st_write(path, t, 2, NULL), -EINVAL);
    expect_message_contains("invalid shape [4, -1]");

    t[1] = good;
    t[1].name = "v";
    t[1].dtype = MOE_DTYPE_F4;
    t[1].shape[0] = 3;
    cr_assert_eq(moe_st_write(path, t, 2, NULL), -EINVAL);
    expect_message_contains("not a whole number of bytes");

    t[1] = good;
    t[1].name = NULL;
    cr_assert_eq(moe_st_write(path, t, 2, NULL), -EINVAL);
    expect_message_contains("has no name");

    cr_assert_eq(access(path, F_OK), -1, "a failed write left %s", path);

    /* An empty tensor may have NULL data, and zero tensors make "{}". */
    t[1] = good;
    t[1].name = "empty";
    t[1].shape[0] = 0;
    t[1].data = NULL;
    cr_assert_eq(moe_st_write(path, t, 2, NULL), 0, "%s", moe_error_message());
    cr_assert_eq(moe_st_write(path, NULL, 0, NULL), 0, "%s",
                 moe_error_message());
    size_t size;
    uint8_t *bytes = read_bytes(path, &size);
    cr_assert_eq(size, 16);
    cr_assert_eq(memcmp(bytes, "\x08\0\0\0\0\0\0\0{}      ", 16), 0);
    free(bytes);
}

Test(safetensors, write_to_missing_directory_fails)
{
    char path[512];
    path_in_test_dir(path, sizeof path, "no-such-dir/model.safetensors");
    float data[1] = {1};
    struct moe_st_tensor_out t = {.name = "w", .dtype = MOE_DTYPE_F32,
                                  .ndim = 1, .shape = {1}, .data = data};
    int rc = moe_st_write(path, &t, 1, "pt");
    cr_assert(rc < 0, "rc %d", rc);
    expect_message_contains(path);
}

/* ---- sharded models --------------------------------------------------- */

static void write_two_shards(void)
{
    static float a[6] = {1, 2, 3, 4, 5, 6};
    static uint16_t b[4] = {0x3f80, 0xbf80, 0x0001, 0x7f80};
    static float c[2] = {-0.5f, 0.25f};
    char path[512];

    struct moe_st_tensor_out first[2] = {
        {.name = "layers.0.a", .dtype = MOE_DTYPE_F32, .ndim = 2,
         .shape = {2, 3}, .data = a},
        {.name = "layers.0.b", .dtype = MOE_DTYPE_BF16, .ndim = 1,
         .shape = {4}, .data = b},
    };
    path_in_test_dir(path, sizeof path, "model-00001-of-00002.safetensors");
    cr_assert_eq(moe_st_write(path, first, 2, "pt"), 0, "%s",
                 moe_error_message());

    struct moe_st_tensor_out second[1] = {
        {.name = "layers.1.c", .dtype = MOE_DTYPE_F32, .ndim = 1,
         .shape = {2}, .data = c},
    };
    path_in_test_dir(path, sizeof path, "model-00002-of-00002.safetensors");
    cr_assert_eq(moe_st_write(path, second, 1, "pt"), 0, "%s",
                 moe_error_message());

    const char *names[3] = {"layers.0.a", "layers.0.b", "layers.1.c"};
    const char *files[3] = {"model-00001-of-00002.safetensors",
                            "model-00001-of-00002.safetensors",
                            "model-00002-of-00002.safetensors"};
    path_in_test_dir(path, sizeof path, "model.safetensors.index.json");
    cr_assert_eq(moe_st_write_index(path, names, files, 3, 24 + 8 + 8), 0,
                 "%s", moe_error_message());
}

Test(safetensors, sharded_round_trip)
{
    write_two_shards();
    struct moe_st_model *model = open_test_model();

    struct moe_st_info info;
    cr_assert_eq(moe_st_find(model, "layers.1.c", &info), 0, "%s",
                 moe_error_message());
    cr_assert_not_null(strstr(info.file, "/model-00002-of-00002.safetensors"),
                       "file %s", info.file);

    float a[6], b[4], c[2];
    int64_t a_shape[2] = {2, 3}, b_shape[1] = {4}, c_shape[1] = {2};
    cr_assert_eq(moe_st_read_f32(model, "layers.0.a", 2, a_shape, a), 0, "%s",
                 moe_error_message());
    cr_assert_eq(moe_st_read_f32(model, "layers.0.b", 1, b_shape, b), 0, "%s",
                 moe_error_message());
    cr_assert_eq(moe_st_read_f32(model, "layers.1.c", 1, c_shape, c), 0, "%s",
                 moe_error_message());

    const float a_want[6] = {1, 2, 3, 4, 5, 6};
    const uint32_t b_want[4] = {0x3f800000, 0xbf800000, 0x00010000, 0x7f800000};
    const float c_want[2] = {-0.5f, 0.25f};
    cr_assert_eq(memcmp(a, a_want, sizeof a), 0);
    cr_assert_eq(memcmp(b, b_want, sizeof b), 0);
    cr_assert_eq(memcmp(c, c_want, sizeof c), 0);

    char index[512];
    path_in_test_dir(index, sizeof index, "model.safetensors.index.json");
    moe_error_clear();
    cr_assert_eq(moe_st_find(model, "layers.2.a", &info), -ENOENT);
    expect_message_contains("tensor 'layers.2.a' not found");
    expect_message_contains(index);
    moe_st_close(model);

    /* The index records total_size. */
    size_t size;
    uint8_t *text = read_bytes(index, &size);
    text[size] = '\0';
    cJSON *root = cJSON_Parse((const char *)text);
    cr_assert_not_null(root);
    const cJSON *total = cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(root, "metadata"), "total_size");
    cr_assert(cJSON_IsNumber(total));
    cr_assert_eq(total->valuedouble, 40.0);
    cJSON_Delete(root);
    free(text);
}

/* A shard is parsed only when a tensor in it is requested, so a broken
 * shard fails only the lookups that need it. */
Test(safetensors, shards_open_lazily)
{
    write_two_shards();
    char shard[512];
    path_in_test_dir(shard, sizeof shard, "model-00002-of-00002.safetensors");
    write_bytes(shard, "garbage", 7);

    struct moe_st_model *model = open_test_model();
    float a[6];
    int64_t a_shape[2] = {2, 3};
    cr_assert_eq(moe_st_read_f32(model, "layers.0.a", 2, a_shape, a), 0, "%s",
                 moe_error_message());

    struct moe_st_info info;
    moe_error_clear();
    cr_assert_eq(moe_st_find(model, "layers.1.c", &info), -EINVAL);
    expect_message_contains(shard);
    expect_message_contains("file is 7 bytes");
    /* The failure is not cached as success. */
    cr_assert_eq(moe_st_find(model, "layers.1.c", &info), -EINVAL);
    moe_st_close(model);
}

Test(safetensors, index_entry_missing_from_shard)
{
    write_two_shards();
    char index[512], shard[512];
    path_in_test_dir(index, sizeof index, "model.safetensors.index.json");
    path_in_test_dir(shard, sizeof shard, "model-00002-of-00002.safetensors");
    const char *names[2] = {"layers.0.a", "layers.1.moved"};
    const char *files[2] = {"model-00001-of-00002.safetensors",
                            "model-00002-of-00002.safetensors"};
    cr_assert_eq(moe_st_write_index(index, names, files, 2, 0), 0);

    struct moe_st_model *model = open_test_model();
    struct moe_st_info info;
    moe_error_clear();
    cr_assert_eq(moe_st_find(model, "layers.1.moved", &info), -EINVAL);
    expect_message_contains("tensor 'layers.1.moved'");
    expect_message_contains(index);
    expect_message_contains(shard);
    expect_message_contains("does not contain it");
    moe_st_close(model);
}

/* Writes `text` as the index and expects opening to fail with a message
 * naming the index and `reason`. */
static void expect_index_rejected(const char *text, const char *reason)
{
    char index[512];
    path_in_test_dir(index, sizeof index, "model.safetensors.index.json");
    write_bytes(index, text, strlen(text));
    expect_open_rejected(index, reason);
}

Test(safetensors, rejects_bad_index)
{
    write_two_shards();
    expect_index_rejected("{\"weight_map\": {\"a\": ", "not valid JSON");
    expect_index_rejected("", "not valid JSON");
    expect_index_rejected("[]", "not a JSON object");
    expect_index_rejected("{\"metadata\": {}}", "missing \"weight_map\"");
    expect_index_rejected("{\"weight_map\": [\"a\"]}",
                          "\"weight_map\" is not a JSON object");
    expect_index_rejected("{\"weight_map\": {\"a\": 1}}",
                          "weight_map value of tensor 'a' is not a string");
    expect_index_rejected("{\"weight_map\": {\"a\": \"../model.safetensors\"}}",
                          "shard '../model.safetensors', which is not a plain "
                          "file name");
    expect_index_rejected("{\"weight_map\": {\"a\": \"\"}}",
                          "not a plain file name");
    expect_index_rejected(
        "{\"weight_map\": {\"a\": \"model-00001-of-00002.safetensors\", "
        "\"a\": \"model-00001-of-00002.safetensors\"}}",
        "tensor 'a' appears twice in weight_map");
    expect_index_rejected("{\"weight_map\": {}} x", "unexpected text");
    expect_index_rejected("{\"weight_map\": {\"\xfe\": \"x\"}}",
                          "not valid UTF-8");
}

Test(safetensors, index_names_missing_shard)
{
    write_two_shards();
    expect_index_rejected(
        "{\"weight_map\": {\"a\": \"model-00001-of-00002.safetensors\", "
        "\"b\": \"model-00003-of-00003.safetensors\"}}",
        "shard 'model-00003-of-00003.safetensors' listed in weight_map");
    expect_message_contains("No such file or directory");
}

Test(safetensors, write_index_rejects_bad_names)
{
    char index[512];
    path_in_test_dir(index, sizeof index, "model.safetensors.index.json");
    const char *names[2] = {"a", "b"};
    const char *files[2] = {"x.safetensors", "sub/y.safetensors"};
    cr_assert_eq(moe_st_write_index(index, names, files, 2, 0), -EINVAL);
    expect_message_contains("invalid shard file name 'sub/y.safetensors'");
    const char *same[2] = {"a", "a"};
    const char *plain[2] = {"x.safetensors", "y.safetensors"};
    cr_assert_eq(moe_st_write_index(index, same, plain, 2, 0), -EINVAL);
    expect_message_contains("tensor name 'a' appears twice");
    cr_assert_eq(access(index, F_OK), -1, "a failed write left the index");
}

/* ---- FP8 block quantisation ------------------------------------------- */

/* Deterministic test matrix: values over several binades, with a few
 * blocks of very different magnitude, zeros and tiny values. */
static void fill_matrix(float *w, int64_t rows, int64_t cols)
{
    uint32_t state = 0x9e3779b9;
    for (int64_t i = 0; i < rows; i++) {
        for (int64_t j = 0; j < cols; j++) {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            double u = (double)(state >> 8) / (double)(1 << 24) - 0.5;
            int binade = (int)(state & 7) - 4;
            double magnitude = (i / 128 == 1 && j < 128) ? 1e-3 : 3.0;
            w[i * cols + j] = (float)ldexp(u * magnitude, binade);
        }
    }
    w[0] = 0.0f;
    w[1] = -0.0f;
    w[2] = 1e-30f; /* far below the block's f8 resolution */
}

/* Returns the e4m3fn code nearest to y, ties to even, saturating at 448,
 * by searching all codes with reference_f8(). */
static uint8_t nearest_f8(float y)
{
    double magnitude = fabs((double)y);
    int best = 0;
    for (int c = 1; c <= 0x7e; c++) {
        double d = fabs(reference_f8((uint8_t)c) - magnitude);
        double best_d = fabs(reference_f8((uint8_t)best) - magnitude);
        if (d < best_d || (d == best_d && (c & 1) == 0))
            best = c;
    }
    return (uint8_t)(best | (signbit(y) ? 0x80 : 0));
}

/* Quantises a (rows, cols) matrix, writes the codes and scales (F32 or
 * BF16) and checks what moe_st_read_f32() returns, bit for bit against an
 * independent computation and within the documented error bound. */
static void check_fp8_round_trip(int64_t rows, int64_t cols,
                                 int64_t block_rows, int64_t block_cols,
                                 enum moe_dtype scale_dtype)
{
    int64_t scale_rows = (rows + block_rows - 1) / block_rows;
    int64_t scale_cols = (cols + block_cols - 1) / block_cols;
    size_t n = (size_t)(rows * cols), ns = (size_t)(scale_rows * scale_cols);
    float *w = malloc(n * sizeof *w);
    uint8_t *q = malloc(n);
    float *scale = malloc(ns * sizeof *scale);
    uint16_t *scale_bf16 = malloc(ns * sizeof *scale_bf16);
    float *got = malloc(n * sizeof *got);
    cr_assert(w && q && scale && scale_bf16 && got);

    fill_matrix(w, rows, cols);
    moe_fp8_quantize(w, rows, cols, block_rows, block_cols, q, scale);

    /* The scales and codes follow the definition. */
    for (int64_t bi = 0; bi < scale_rows; bi++) {
        for (int64_t bj = 0; bj < scale_cols; bj++) {
            float amax = 0.0f;
            for (int64_t i = bi * block_rows;
                 i < rows && i < (bi + 1) * block_rows; i++)
                for (int64_t j = bj * block_cols;
                     j < cols && j < (bj + 1) * block_cols; j++)
                    amax = fmaxf(amax, fabsf(w[i * cols + j]));
            float want = amax == 0.0f ? 1.0f : amax / 448.0f;
            cr_assert_eq(bits_of(scale[bi * scale_cols + bj]), bits_of(want),
                         "scale (%" PRId64 ", %" PRId64 ") is %a, expected %a",
                         bi, bj, (double)scale[bi * scale_cols + bj],
                         (double)want);
        }
    }
    for (int64_t i = 0; i < rows; i++) {
        for (int64_t j = 0; j < cols; j++) {
            float s = scale[(i / block_rows) * scale_cols + j / block_cols];
            uint8_t want = nearest_f8(w[i * cols + j] / s);
            cr_assert_eq(q[i * cols + j], want,
                         "code (%" PRId64 ", %" PRId64 ") is 0x%02x, expected "
                         "0x%02x for %a",
                         i, j, q[i * cols + j], want,
                         (double)(w[i * cols + j] / s));
        }
    }

    const void *scale_data = scale;
    if (scale_dtype == MOE_DTYPE_BF16) {
        for (size_t k = 0; k < ns; k++)
            scale_bf16[k] = moe_f32_to_bf16(scale[k]);
        scale_data = scale_bf16;
    }
    struct moe_st_tensor_out tensors[2] = {
        {.name = "mlp.experts.3.down_proj.weight", .dtype = MOE_DTYPE_F8_E4M3,
         .ndim = 2, .shape = {rows, cols}, .data = q},
        {.name = "mlp.experts.3.down_proj.weight_scale_inv",
         .dtype = scale_dtype, .ndim = 2, .shape = {scale_rows, scale_cols},
         .data = scale_data},
    };
    char path[512];
    path_in_test_dir(path, sizeof path, "model.safetensors");
    cr_assert_eq(moe_st_write(path, tensors, 2, "pt"), 0, "%s",
                 moe_error_message());

    struct moe_st_model *model = open_test_model();
    moe_st_set_fp8_block(model, block_rows, block_cols);
    int64_t shape[2] = {rows, cols};
    cr_assert_eq(moe_st_read_f32(model, tensors[0].name, 2, shape, got), 0,
                 "%s", moe_error_message());
    moe_st_close(model);

    for (int64_t i = 0; i < rows; i++) {
        for (int64_t j = 0; j < cols; j++) {
            int64_t b = (i / block_rows) * scale_cols + j / block_cols;
            float s = scale_dtype == MOE_DTYPE_BF16
                          ? float_of((uint32_t)scale_bf16[b] << 16)
                          : scale[b];
            float want = reference_f8(q[i * cols + j]) * s;
            float value = got[i * cols + j];
            cr_assert_eq(bits_of(value), bits_of(want),
                         "element (%" PRId64 ", %" PRId64 ") is %a, expected "
                         "%a",
                         i, j, (double)value, (double)want);

            /* The bound of moe_fp8_quantize(), for F32 scales. */
            if (scale_dtype != MOE_DTYPE_F32)
                continue;
            double amax = (double)s * 448.0; /* within 2^-24 relative */
            double x = w[i * cols + j];
            double bound = (0x1p-4 + 0x1p-20) * fabs(x) +
                           0x1p-10 * amax / 448.0 * (1 + 0x1p-20) * (1 + 0x1p-23);
            cr_assert_leq(fabs((double)value - x), bound,
                          "element (%" PRId64 ", %" PRId64 "): %a came back "
                          "as %a, error above the bound %a",
                          i, j, x, (double)value, bound);
        }
    }
    free(got);
    free(scale_bf16);
    free(scale);
    free(q);
    free(w);
}

/* 300 x 200 in 128 x 128 blocks leaves partial blocks on both axes. */
Test(safetensors, fp8_round_trip_f32_scale)
{
    check_fp8_round_trip(300, 200, 128, 128, MOE_DTYPE_F32);
}

Test(safetensors, fp8_round_trip_bf16_scale)
{
    check_fp8_round_trip(300, 200, 128, 128, MOE_DTYPE_BF16);
}

Test(safetensors, fp8_other_block_size)
{
    check_fp8_round_trip(70, 90, 32, 64, MOE_DTYPE_F32);
}

/* The error bound is reached closely, so a looser implementation would
 * fail it: the worst relative error over the test matrix is near 2^-4. */
Test(safetensors, fp8_bound_is_tight)
{
    enum { ROWS = 128, COLS = 128 };
    static float w[ROWS * COLS];
    static uint8_t q[ROWS * COLS];
    float scale;
    /* w in [1, 2) with amax 2 puts w / scale in [224, 448). Near 272,
     * halfway between the e4m3 values 256 and 288, the relative error is
     * 16 / 272, about 0.94 * 2^-4. */
    for (int k = 0; k < ROWS * COLS; k++)
        w[k] = 1.0f + (float)(k % 4096) / 4096.0f;
    w[0] = 2.0f; /* amax 2, so scale 2 / 448 */
    moe_fp8_quantize(w, ROWS, COLS, 128, 128, q, &scale);
    double worst = 0;
    for (int k = 1; k < ROWS * COLS; k++) {
        double back = (double)(reference_f8(q[k]) * scale);
        double relative = fabs(back - w[k]) / w[k];
        if (relative > worst)
            worst = relative;
    }
    cr_assert_leq(worst, 0x1p-4 + 0x1p-20, "worst relative error %a", worst);
    cr_assert_geq(worst, 0x1p-4 * 0.9, "worst relative error %a", worst);
}

Test(safetensors, fp8_zero_block_scale_is_one)
{
    float w[4] = {0.0f, -0.0f, 0.0f, 0.0f};
    uint8_t q[4];
    float scale = 0;
    moe_fp8_quantize(w, 2, 2, 128, 128, q, &scale);
    cr_assert_eq(scale, 1.0f);
    cr_assert_eq(q[0], 0x00);
    cr_assert_eq(q[1], 0x80);
}

/* Writes an F8_E4M3 (2, 3) tensor "w" with a scale tensor described by
 * the arguments (no scale when scale_dtype is MOE_DTYPE_COUNT). */
static void write_fp8_model(enum moe_dtype scale_dtype, int64_t scale_rows,
                            int64_t scale_cols)
{
    static uint8_t q[6] = {0x38, 0x40, 0x48, 0xb8, 0xc0, 0xc8};
    static float scale[4] = {0.5f, 0.5f, 0.5f, 0.5f};
    struct moe_st_tensor_out tensors[2] = {
        {.name = "w", .dtype = MOE_DTYPE_F8_E4M3, .ndim = 2, .shape = {2, 3},
         .data = q},
        {.name = "w_scale_inv", .dtype = scale_dtype, .ndim = 2,
         .shape = {scale_rows, scale_cols}, .data = scale},
    };
    char path[512];
    path_in_test_dir(path, sizeof path, "model.safetensors");
    int count = scale_dtype == MOE_DTYPE_COUNT ? 1 : 2;
    cr_assert_eq(moe_st_write(path, tensors, count, NULL), 0, "%s",
                 moe_error_message());
}

Test(safetensors, fp8_scale_problems_rejected)
{
    char path[512];
    path_in_test_dir(path, sizeof path, "model.safetensors");
    int64_t shape[2] = {2, 3};
    float dst[6];

    write_fp8_model(MOE_DTYPE_F32, 1, 1);
    struct moe_st_model *model = open_test_model();
    cr_assert_eq(moe_st_read_f32(model, "w", 2, shape, dst), 0, "%s",
                 moe_error_message());
    const float want[6] = {0.5f, 1.0f, 2.0f, -0.5f, -1.0f, -2.0f};
    cr_assert_eq(memcmp(dst, want, sizeof dst), 0);

    /* 2 x 2 blocks need a (1, 2) scale tensor. */
    moe_st_set_fp8_block(model, 2, 2);
    moe_error_clear();
    cr_assert_eq(moe_st_read_f32(model, "w", 2, shape, dst), -EINVAL);
    expect_message_contains("scale tensor 'w_scale_inv'");
    expect_message_contains(path);
    expect_message_contains("has shape [1, 1], expected [1, 2]");

    moe_st_set_fp8_block(model, 0, 128);
    cr_assert_eq(moe_st_read_f32(model, "w", 2, shape, dst), -EINVAL);
    expect_message_contains("invalid FP8 block size 0 x 128");
    moe_st_close(model);

    write_fp8_model(MOE_DTYPE_COUNT, 0, 0);
    model = open_test_model();
    moe_error_clear();
    cr_assert_eq(moe_st_read_f32(model, "w", 2, shape, dst), -EINVAL);
    expect_message_contains("tensor 'w'");
    expect_message_contains("scale tensor 'w_scale_inv' is missing");
    moe_st_close(model);

    write_fp8_model(MOE_DTYPE_F16, 1, 1);
    model = open_test_model();
    cr_assert_eq(moe_st_read_f32(model, "w", 2, shape, dst), -EINVAL);
    expect_message_contains("is F16; expected F32 or BF16");
    moe_st_close(model);
}

/* ---- large files ------------------------------------------------------ */

/* An 8 GiB BF16 tensor in a sparse file next to a small one: reading the
 * small tensor maps the file but touches only its own pages. */
Test(safetensors, reads_small_tensor_of_huge_file)
{
    char path[512];
    path_in_test_dir(path, sizeof path, "model.safetensors");
    const char *header =
        "{\"embed\": {\"dtype\": \"BF16\", \"shape\": [65536, 65536], "
        "\"data_offsets\": [0, 8589934592]}, "
        "\"layers.7.gate\": {\"dtype\": \"F32\", \"shape\": [4], "
        "\"data_offsets\": [8589934592, 8589934608]}}";
    size_t header_len = strlen(header);
    uint8_t prefix[8];
    for (int i = 0; i < 8; i++)
        prefix[i] = (uint8_t)((uint64_t)header_len >> (8 * i));

    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    cr_assert_geq(fd, 0);
    off_t data_start = (off_t)(8 + header_len);
    off_t size = data_start + (off_t)8589934608LL;
    if (ftruncate(fd, size) < 0) {
        close(fd);
        cr_skip_test("ftruncate to %lld bytes failed: %s", (long long)size,
                     strerror(errno));
    }
    const float gate[4] = {0.25f, -1.0f, 3.5f, 1e-3f};
    cr_assert_eq(pwrite(fd, prefix, 8, 0), 8);
    cr_assert_eq(pwrite(fd, header, header_len, 8), (ssize_t)header_len);
    cr_assert_eq(pwrite(fd, gate, sizeof gate, size - (off_t)sizeof gate),
                 (ssize_t)sizeof gate);
    cr_assert_eq(close(fd), 0);

    struct moe_st_model *model = open_test_model();
    struct moe_st_info info;
    cr_assert_eq(moe_st_find(model, "embed", &info), 0, "%s",
                 moe_error_message());
    cr_assert_eq(info.shape[0], 65536);
    float got[4];
    int64_t shape[1] = {4};
    cr_assert_eq(moe_st_read_f32(model, "layers.7.gate", 1, shape, got), 0,
                 "%s", moe_error_message());
    cr_assert_eq(memcmp(got, gate, sizeof got), 0);
    moe_st_close(model);

    struct stat st;
    cr_assert_eq(stat(path, &st), 0);
    cr_assert_lt((long long)st.st_blocks * 512, 1LL << 20,
                 "the test file is not sparse: %lld bytes allocated",
                 (long long)st.st_blocks * 512);
}

/* ---- fuzzing ---------------------------------------------------------- */

static const char *const fuzz_names[] = {"a", "b", "c", "q", "q_scale_inv",
                                         "i"};

/* Opens the model in test_dir and reads every tensor of fuzz_names with
 * the shape its header now gives and with its original shape. Every call
 * must return 0 or a negative error. */
static void open_and_read_all(const int64_t (*original_shapes)[2],
                              const int *original_ndims)
{
    struct moe_st_model *model = NULL;
    int rc = moe_st_open_model(test_dir, &model);
    cr_assert_leq(rc, 0);
    if (rc < 0) {
        cr_assert_null(model);
        return;
    }

    enum { MAX_ELEMENTS = 4096 };
    static float dst[MAX_ELEMENTS];
    for (size_t k = 0; k < sizeof fuzz_names / sizeof fuzz_names[0]; k++) {
        struct moe_st_info info;
        rc = moe_st_find(model, fuzz_names[k], &info);
        cr_assert_leq(rc, 0);
        if (rc == 0) {
            /* Saturates at MAX_ELEMENTS + 1, so it never overflows. */
            uint64_t elements = 1;
            for (int d = 0; d < info.ndim; d++) {
                elements *= (uint64_t)info.shape[d];
                if (info.shape[d] > MAX_ELEMENTS || elements > MAX_ELEMENTS)
                    elements = MAX_ELEMENTS + 1;
            }
            if (elements <= MAX_ELEMENTS)
                cr_assert_leq(moe_st_read_f32(model, fuzz_names[k], info.ndim,
                                              info.shape, dst),
                              0);
        }
        cr_assert_leq(moe_st_read_f32(model, fuzz_names[k], original_ndims[k],
                                      original_shapes[k], dst),
                      0);
    }
    moe_st_close(model);
}

Test(safetensors, fuzz_flipped_and_truncated_bytes, .timeout = 300)
{
    static const float a[6] = {1, -2, 3, -4, 5, 6};
    static const uint16_t b[4] = {0x3f80, 0x7fc1, 0x0001, 0xff80};
    static const uint16_t c[3] = {0x3c00, 0x7c00, 0x8001};
    static const uint8_t q[8] = {0x38, 0x7f, 0x7e, 0x01, 0x80, 0xfe, 0x40, 0};
    static const float q_scale[1] = {0.5f};
    static const int32_t ints[2] = {7, -7};
    const int64_t shapes[6][2] = {{2, 3}, {4, 0}, {3, 0}, {2, 4}, {1, 1}, {2, 0}};
    const int ndims[6] = {2, 1, 1, 2, 2, 1};
    struct moe_st_tensor_out tensors[6] = {
        {.name = "a", .dtype = MOE_DTYPE_F32, .ndim = 2, .shape = {2, 3},
         .data = a},
        {.name = "b", .dtype = MOE_DTYPE_BF16, .ndim = 1, .shape = {4},
         .data = b},
        {.name = "c", .dtype = MOE_DTYPE_F16, .ndim = 1, .shape = {3},
         .data = c},
        {.name = "q", .dtype = MOE_DTYPE_F8_E4M3, .ndim = 2, .shape = {2, 4},
         .data = q},
        {.name = "q_scale_inv", .dtype = MOE_DTYPE_F32, .ndim = 2,
         .shape = {1, 1}, .data = q_scale},
        {.name = "i", .dtype = MOE_DTYPE_I32, .ndim = 1, .shape = {2},
         .data = ints},
    };
    char path[512];
    path_in_test_dir(path, sizeof path, "model.safetensors");
    cr_assert_eq(moe_st_write(path, tensors, 6, "pt"), 0, "%s",
                 moe_error_message());
    size_t size;
    uint8_t *original = read_bytes(path, &size);
    uint8_t *mutated = malloc(size);
    cr_assert_not_null(mutated);

    /* The unmodified file reads back. */
    open_and_read_all(shapes, ndims);

    static const int replacements[] = {-0xff, -0x01, -0x80, '0', '9', '"',
                                       '{', '}', ',', ' ', 0, 0xff};
    int opened = 0;
    for (size_t pos = 0; pos < size; pos++) {
        for (size_t k = 0; k < sizeof replacements / sizeof replacements[0];
             k++) {
            memcpy(mutated, original, size);
            int r = replacements[k];
            /* Negative entries flip bits, the rest replace the byte. */
            mutated[pos] = r < 0 ? (uint8_t)(original[pos] ^ -r) : (uint8_t)r;
            if (mutated[pos] == original[pos])
                continue;
            replace_bytes(path, mutated, size);
            open_and_read_all(shapes, ndims);
            opened++;
        }
    }
    for (size_t len = 0; len < size; len++) {
        replace_bytes(path, original, len);
        open_and_read_all(shapes, ndims);
        opened++;
    }
    cr_assert_gt(opened, 1000, "only %d variants tried", opened);
    free(mutated);
    free(original);
}

/* The same for the index of a sharded model. */
Test(safetensors, fuzz_index_bytes, .timeout = 300)
{
    write_two_shards();
    char index[512];
    path_in_test_dir(index, sizeof index, "model.safetensors.index.json");
    size_t size;
    uint8_t *original = read_bytes(index, &size);
    uint8_t *mutated = malloc(size + 1);
    cr_assert_not_null(mutated);
    static const char *const names[3] = {"layers.0.a", "layers.0.b",
                                         "layers.1.c"};
    static const int64_t shapes[3][2] = {{2, 3}, {4, 0}, {2, 0}};
    static const int ndims[3] = {2, 1, 1};

    for (size_t pos = 0; pos < size; pos++) {
        static const int replacements[] = {-0x01, -0x20, '"', '}', '/', 0};
        for (size_t k = 0; k < sizeof replacements / sizeof replacements[0];
             k++) {
            memcpy(mutated, original, size);
            int r = replacements[k];
            mutated[pos] = r < 0 ? (uint8_t)(original[pos] ^ -r) : (uint8_t)r;
            if (mutated[pos] == original[pos])
                continue;
            replace_bytes(index, mutated, size);

            struct moe_st_model *model = NULL;
            int rc = moe_st_open_model(test_dir, &model);
            cr_assert_leq(rc, 0);
            if (rc < 0)
                continue;
            float dst[6];
            for (int t = 0; t < 3; t++)
                cr_assert_leq(moe_st_read_f32(model, names[t], ndims[t],
                                              shapes[t], dst),
                              0);
            moe_st_close(model);
        }
    }
    free(mutated);
    free(original);
}

/* A file truncated after its header was checked, as when a checkpoint is
 * replaced during a run, gives an error on read instead of SIGBUS. */
Test(safetensors, truncated_while_open_is_an_error)
{
    enum { COUNT = 1 << 18 }; /* 1 MiB of F32, many pages */
    float *values = calloc(COUNT, sizeof(float));
    cr_assert_not_null(values);
    struct moe_st_tensor_out tensor = {
        .name = "w", .dtype = MOE_DTYPE_F32, .ndim = 1, .shape = {COUNT}, .data = values};
    char path[512];
    path_in_test_dir(path, sizeof path, "model.safetensors");
    cr_assert_eq(moe_st_write(path, &tensor, 1, NULL), 0, "%s", moe_error_message());

    struct moe_st_model *model;
    cr_assert_eq(moe_st_open_model(test_dir, &model), 0, "%s", moe_error_message());
    cr_assert_eq(truncate(path, 8192), 0);
    struct sigaction before;
    cr_assert_eq(sigaction(SIGBUS, NULL, &before), 0);
    int64_t shape[1] = {COUNT};
    cr_assert_eq(moe_st_read_f32(model, "w", 1, shape, values), -EINVAL);
    cr_assert_not_null(strstr(moe_error_message(), "shorter"), "%s", moe_error_message());
    cr_assert_not_null(strstr(moe_error_message(), "model.safetensors"));

    /* The guard is gone after the read: SIGBUS has the action it had
     * before, the default one or a sanitizer's. */
    struct sigaction after;
    cr_assert_eq(sigaction(SIGBUS, NULL, &after), 0);
    cr_assert(after.sa_handler == before.sa_handler);
    moe_st_close(model);
    free(values);
}
