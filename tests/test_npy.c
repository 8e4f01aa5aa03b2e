/*
 * test_npy.c - tests of the .npy reader, writer and header parser.
 *
 * Checks that arrays round-trip bit for bit and that the writer aligns the
 * data to 64 bytes and matches np.save() byte for byte, for every dtype and
 * 0 to 8 dimensions. Files written by numpy in versions 1.0, 2.0 and 3.0
 * must be read, and the token input must convert float16 exactly and
 * float64 to the nearest float32. Every kind of bad file
 * must be rejected with -EINVAL and a message naming the file and the
 * reason. Each test works in its own temporary directory, removed by the
 * suite's fini hook.
 */
#include "moe_error.h"
#include "moe_npy.h"
#include "test_util.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- fixtures ---------------------------------------------------------- */

/* np.save() output of numpy 1.24.2 (Python 3.11) for the (2, 3) float32
 * array [[1.5, -2.0, 0.1], [3.25, NaN with payload 0x7fc00001, -0.0]]. */
static const uint8_t numpy_v1_file[152] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x01, 0x00, 0x76, 0x00, 0x7b, 0x27,
    0x64, 0x65, 0x73, 0x63, 0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c, 0x66, 0x34,
    0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74, 0x72, 0x61, 0x6e, 0x5f,
    0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61, 0x6c, 0x73,
    0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27, 0x3a, 0x20,
    0x28, 0x32, 0x2c, 0x20, 0x33, 0x29, 0x2c, 0x20, 0x7d, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a, 0x00, 0x00, 0xc0, 0x3f,
    0x00, 0x00, 0x00, 0xc0, 0xcd, 0xcc, 0xcc, 0x3d, 0x00, 0x00, 0x50, 0x40,
    0x01, 0x00, 0xc0, 0x7f, 0x00, 0x00, 0x00, 0x80,
};

/* The same array written by numpy.lib.format.write_array(..., version=(3,
 * 0)). numpy writes version 2.0 with the same bytes except byte 6. */
static const uint8_t numpy_v3_file[152] = {
    0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 0x03, 0x00, 0x74, 0x00, 0x00, 0x00,
    0x7b, 0x27, 0x64, 0x65, 0x73, 0x63, 0x72, 0x27, 0x3a, 0x20, 0x27, 0x3c,
    0x66, 0x34, 0x27, 0x2c, 0x20, 0x27, 0x66, 0x6f, 0x72, 0x74, 0x72, 0x61,
    0x6e, 0x5f, 0x6f, 0x72, 0x64, 0x65, 0x72, 0x27, 0x3a, 0x20, 0x46, 0x61,
    0x6c, 0x73, 0x65, 0x2c, 0x20, 0x27, 0x73, 0x68, 0x61, 0x70, 0x65, 0x27,
    0x3a, 0x20, 0x28, 0x32, 0x2c, 0x20, 0x33, 0x29, 0x2c, 0x20, 0x7d, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20, 0x0a, 0x00, 0x00, 0xc0, 0x3f,
    0x00, 0x00, 0x00, 0xc0, 0xcd, 0xcc, 0xcc, 0x3d, 0x00, 0x00, 0x50, 0x40,
    0x01, 0x00, 0xc0, 0x7f, 0x00, 0x00, 0x00, 0x80,
};

/* Bit patterns of the six values in the numpy fixtures, row-major. */
static const uint32_t numpy_fixture_bits[6] = {
    0x3fc00000, 0xc0000000, 0x3dcccccd, 0x40500000, 0x7fc00001, 0x80000000,
};

static float float_from_bits(uint32_t bits)
{
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* ---- temporary directory ---------------------------------------------- */

static char test_dir[256];

static void make_test_dir(void)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(test_dir, sizeof test_dir, "%s/moe-npy-XXXXXX",
             tmp != NULL && tmp[0] != '\0' ? tmp : "/tmp");
    cr_assert_not_null(mkdtemp(test_dir), "mkdtemp(%s) failed: %s", test_dir,
                       strerror(errno));
}

/* Removes the test directory and what the tests put in it: plain files
 * and, one level down, empty directories. */
static void remove_test_dir(void)
{
    DIR *dir = opendir(test_dir);
    if (dir == NULL)
        return;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0)
            continue;
        char path[512];
        snprintf(path, sizeof path, "%s/%s", test_dir, entry->d_name);
        if (unlink(path) < 0)
            rmdir(path);
    }
    closedir(dir);
    rmdir(test_dir);
}

TestSuite(npy, .init = make_test_dir, .fini = remove_test_dir, .timeout = 30);

/* Returns test_dir/name in a static buffer; each call overwrites it. */
static const char *test_path(const char *name)
{
    static char path[512];
    snprintf(path, sizeof path, "%s/%s", test_dir, name);
    return path;
}

static void write_bytes(const char *path, const void *bytes, size_t count)
{
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f, "fopen(%s) failed: %s", path, strerror(errno));
    cr_assert_eq(fwrite(bytes, 1, count, f), count, "short write to %s", path);
    cr_assert_eq(fclose(f), 0, "fclose(%s) failed", path);
}

/* Reads a whole file into a malloc'd buffer and stores its size. */
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

/* Builds a .npy file image from a header dict: the prefix for the version,
 * the dict padded with spaces and a newline to a multiple of 64 bytes, and
 * data_bytes bytes of data. Returns the image size. */
static size_t build_npy(uint8_t *out, size_t capacity, unsigned major,
                        unsigned minor, const char *dict, size_t data_bytes)
{
    size_t prefix_bytes = major == 1 ? 10 : 12;
    size_t dict_bytes = strlen(dict);
    size_t header_bytes = dict_bytes + 1;
    header_bytes += (64 - (prefix_bytes + header_bytes) % 64) % 64;
    size_t total = prefix_bytes + header_bytes + data_bytes;
    cr_assert_leq(total, capacity, "test image of %zu bytes too large", total);

    memcpy(out, "\x93NUMPY", 6);
    out[6] = (uint8_t)major;
    out[7] = (uint8_t)minor;
    for (size_t i = 0; i < prefix_bytes - 8; i++)
        out[8 + i] = (uint8_t)(header_bytes >> (8 * i));
    memcpy(out + prefix_bytes, dict, dict_bytes);
    memset(out + prefix_bytes + dict_bytes, ' ', header_bytes - dict_bytes - 1);
    out[prefix_bytes + header_bytes - 1] = '\n';
    for (size_t i = 0; i < data_bytes; i++)
        out[prefix_bytes + header_bytes + i] = (uint8_t)i;
    return total;
}

/* Asserts that the last error message contains `text`. */
#define expect_message_contains(text)                                          \
    do {                                                                       \
        const char *msg_ = moe_error_message();                                \
        cr_assert_not_null(strstr(msg_, (text)),                               \
                           "message \"%s\" does not contain \"%s\"", msg_,     \
                           (text));                                            \
    } while (0)

/* Writes `count` bytes to a file named `name`, reads it back, and asserts
 * -EINVAL, cleared outputs and a message naming the file and `reason`. */
#define expect_rejected(name, bytes, count, reason)                            \
    do {                                                                       \
        const char *path_ = test_path(name);                                   \
        write_bytes(path_, (bytes), (count));                                  \
        static float sentinel_;                                                \
        float *data_ = &sentinel_;                                             \
        int64_t rows_ = -1, cols_ = -1;                                        \
        moe_error_clear();                                                     \
        int rc_ = moe_npy_read_f32(path_, &data_, &rows_, &cols_);             \
        cr_assert_eq(rc_, -EINVAL, "%s: rc %d, expected -EINVAL (%s)", name,   \
                     rc_, moe_error_message());                                \
        cr_assert_null(data_, "%s: data not NULL after a failure", name);      \
        cr_assert_eq(rows_, 0, "%s: rows not 0 after a failure", name);        \
        cr_assert_eq(cols_, 0, "%s: cols not 0 after a failure", name);        \
        expect_message_contains(path_);                                        \
        expect_message_contains(reason);                                       \
    } while (0)

/* Builds a version 1.0 file from `dict` and expects it to be rejected. */
#define expect_dict_rejected(name, dict, data_bytes, reason)                   \
    do {                                                                       \
        uint8_t image_[512];                                                   \
        size_t count_ = build_npy(image_, sizeof image_, 1, 0, (dict),         \
                                  (data_bytes));                               \
        expect_rejected(name, image_, count_, reason);                         \
    } while (0)

/* ---- writing and reading ---------------------------------------------- */

Test(npy, round_trip_is_bitwise)
{
    /* Values whose bits a conversion could change: NaN payloads, -0,
     * infinities, subnormals. */
    enum { ROWS = 7, COLS = 5 };
    float data[ROWS * COLS];
    for (int i = 0; i < ROWS * COLS; i++)
        data[i] = (float)i * 0.37f - 3.0f;
    data[0] = float_from_bits(0x7fc12345);
    data[1] = float_from_bits(0xffbfffff);
    data[2] = -0.0f;
    data[3] = INFINITY;
    data[4] = -INFINITY;
    data[5] = float_from_bits(0x00000001);

    const char *path = test_path("round_trip.npy");
    cr_assert_eq(moe_npy_write_f32(path, data, ROWS, COLS), 0, "%s",
                 moe_error_message());

    float *read = NULL;
    int64_t rows = 0, cols = 0;
    cr_assert_eq(moe_npy_read_f32(path, &read, &rows, &cols), 0, "%s",
                 moe_error_message());
    cr_assert_eq(rows, ROWS);
    cr_assert_eq(cols, COLS);
    expect_bitwise_equal(read, data, ROWS * COLS, "round trip");
    free(read);
}

Test(npy, empty_arrays_round_trip)
{
    const int64_t shapes[][2] = {{0, 0}, {0, 7}, {7, 0}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        const char *path = test_path("empty.npy");
        cr_assert_eq(moe_npy_write_f32(path, NULL, shapes[i][0], shapes[i][1]),
                     0, "%s", moe_error_message());

        float *read = NULL;
        int64_t rows = -1, cols = -1;
        cr_assert_eq(moe_npy_read_f32(path, &read, &rows, &cols), 0, "%s",
                     moe_error_message());
        cr_assert_not_null(read, "an empty array must still be non-NULL");
        cr_assert_eq(rows, shapes[i][0]);
        cr_assert_eq(cols, shapes[i][1]);
        free(read);
    }
}

Test(npy, header_aligned_to_64)
{
    /* Zero-sized shapes keep the files small while the digit counts vary. */
    const int64_t shapes[][2] = {
        {0, 0},        {1, 1},         {3, 5},
        {0, 12345678}, {12345678, 0},  {0, INT64_MAX},
        {INT64_MAX, 0}, {10, 100},     {99999, 0},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        int64_t rows = shapes[i][0], cols = shapes[i][1];
        size_t count = (size_t)(rows * cols);
        float *data = calloc(count > 0 ? count : 1, sizeof(float));
        cr_assert_not_null(data);

        const char *path = test_path("aligned.npy");
        cr_assert_eq(moe_npy_write_f32(path, data, rows, cols), 0, "%s",
                     moe_error_message());
        free(data);

        size_t size;
        uint8_t *bytes = read_bytes(path, &size);
        cr_assert_geq(size, 10);
        size_t header_len = (size_t)bytes[8] | (size_t)bytes[9] << 8;
        size_t data_offset = 10 + header_len;
        cr_assert_eq(data_offset % 64, 0,
                     "shape (%" PRId64 ", %" PRId64 "): data starts at %zu",
                     rows, cols, data_offset);
        cr_assert_eq(size, data_offset + count * sizeof(float));
        cr_assert_eq(bytes[6], 1, "writer must use version 1.0");
        cr_assert_eq(bytes[7], 0);
        cr_assert_eq(bytes[data_offset - 1], '\n',
                     "header must end with a newline");

        struct moe_npy_header h;
        cr_assert_eq(moe_npy_parse_header(bytes, size, path, &h), 0, "%s",
                     moe_error_message());
        cr_assert_str_eq(h.descr, "<f4");
        cr_assert_eq(h.fortran_order, 0);
        cr_assert_eq(h.ndim, 2);
        cr_assert_eq(h.shape[0], rows);
        cr_assert_eq(h.shape[1], cols);
        cr_assert_eq(h.data_offset, data_offset);
        free(bytes);
    }
}

Test(npy, writer_matches_np_save)
{
    float data[6];
    for (int i = 0; i < 6; i++)
        data[i] = float_from_bits(numpy_fixture_bits[i]);

    const char *path = test_path("like_numpy.npy");
    cr_assert_eq(moe_npy_write_f32(path, data, 2, 3), 0, "%s",
                 moe_error_message());

    size_t size;
    uint8_t *bytes = read_bytes(path, &size);
    cr_assert_eq(size, sizeof numpy_v1_file);
    for (size_t i = 0; i < size; i++)
        cr_assert_eq(bytes[i], numpy_v1_file[i],
                     "byte %zu is 0x%02x, np.save wrote 0x%02x", i, bytes[i],
                     numpy_v1_file[i]);
    free(bytes);
}

/* Reads `bytes` as a file and checks it against the numpy fixture values. */
static void expect_reads_numpy_fixture(const char *name, const uint8_t *bytes,
                                       size_t count)
{
    const char *path = test_path(name);
    write_bytes(path, bytes, count);

    float *read = NULL;
    int64_t rows = 0, cols = 0;
    cr_assert_eq(moe_npy_read_f32(path, &read, &rows, &cols), 0, "%s",
                 moe_error_message());
    cr_assert_eq(rows, 2);
    cr_assert_eq(cols, 3);

    float expected[6];
    for (int i = 0; i < 6; i++)
        expected[i] = float_from_bits(numpy_fixture_bits[i]);
    expect_bitwise_equal(read, expected, 6, name);
    free(read);
}

Test(npy, reads_numpy_version_1)
{
    expect_reads_numpy_fixture("v1.npy", numpy_v1_file, sizeof numpy_v1_file);
}

Test(npy, reads_numpy_version_2)
{
    uint8_t v2[sizeof numpy_v3_file];
    memcpy(v2, numpy_v3_file, sizeof v2);
    v2[6] = 2;
    expect_reads_numpy_fixture("v2.npy", v2, sizeof v2);
}

Test(npy, reads_numpy_version_3)
{
    expect_reads_numpy_fixture("v3.npy", numpy_v3_file, sizeof numpy_v3_file);
}

Test(npy, reads_other_header_layouts)
{
    /* Other writers may use double quotes, other key orders, no spaces or
     * no trailing comma. */
    const char *dicts[] = {
        "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
        "{\"descr\":\"<f4\",\"fortran_order\":False,\"shape\":(2,3)}",
        "{'shape': (2, 3), 'fortran_order': False, 'descr': '<f4'}",
        "{ 'descr' : '<f4' ,\n 'fortran_order' : False ,\n"
        " 'shape' : ( 2 , 3 , ) , }",
    };
    for (size_t i = 0; i < sizeof dicts / sizeof dicts[0]; i++) {
        uint8_t image[256];
        size_t count = build_npy(image, sizeof image, 1, 0, dicts[i], 24);
        const char *path = test_path("layout.npy");
        write_bytes(path, image, count);

        float *read = NULL;
        int64_t rows = 0, cols = 0;
        cr_assert_eq(moe_npy_read_f32(path, &read, &rows, &cols), 0,
                     "dict %zu: %s", i, moe_error_message());
        cr_assert_eq(rows, 2);
        cr_assert_eq(cols, 3);
        free(read);
    }

    /* The format does not require 64-byte alignment. Here the data starts
     * at byte 80, a multiple of 16 but not of 64. */
    const char *dict16 = "{'descr':'<f4','fortran_order':False,'shape':(2,3)}";
    uint8_t image[128];
    size_t dict_bytes = strlen(dict16);
    size_t header_bytes = 70;
    cr_assert_lt(dict_bytes + 1, header_bytes);
    memcpy(image, "\x93NUMPY\x01\x00", 8);
    image[8] = (uint8_t)header_bytes;
    image[9] = 0;
    memcpy(image + 10, dict16, dict_bytes);
    memset(image + 10 + dict_bytes, ' ', header_bytes - dict_bytes - 1);
    image[10 + header_bytes - 1] = '\n';
    memset(image + 10 + header_bytes, 0, 24);
    const char *path = test_path("align16.npy");
    write_bytes(path, image, 10 + header_bytes + 24);

    float *read = NULL;
    int64_t rows = 0, cols = 0;
    cr_assert_eq(moe_npy_read_f32(path, &read, &rows, &cols), 0, "%s",
                 moe_error_message());
    cr_assert_eq(rows, 2);
    cr_assert_eq(cols, 3);
    free(read);
}

/* ---- rejected files --------------------------------------------------- */

Test(npy, rejects_bad_magic)
{
    uint8_t image[sizeof numpy_v1_file];
    memcpy(image, numpy_v1_file, sizeof image);
    image[5] = 'Z';
    expect_rejected("magic.npy", image, sizeof image, "not a .npy file");
    expect_message_contains("bad magic");

    expect_rejected("text.npy", "hello, world\n", 13, "bad magic");
    expect_rejected("short.npy", "\x93NU", 3, "truncated");
    expect_rejected("empty.npy", "", 0, "truncated");
}

Test(npy, rejects_unsupported_version)
{
    uint8_t image[sizeof numpy_v1_file];
    memcpy(image, numpy_v1_file, sizeof image);
    image[6] = 4;
    expect_rejected("v4.npy", image, sizeof image,
                    "unsupported .npy format version 4.0");

    image[6] = 1;
    image[7] = 1;
    expect_rejected("v1_1.npy", image, sizeof image, "version 1.1");

    image[6] = 0;
    image[7] = 0;
    expect_rejected("v0.npy", image, sizeof image, "version 0.0");
}

Test(npy, rejects_malformed_header)
{
    static const struct {
        const char *dict;
        const char *reason;
    } cases[] = {
        {"", "does not start with '{'"},
        {"'descr': '<f4'", "does not start with '{'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), ",
         "expected a quoted string"},
        {"{'descr': '<f4', 'fortran_order': False}", "missing key 'shape'"},
        {"{'fortran_order': False, 'shape': (2, 3)}", "missing key 'descr'"},
        {"{'descr': '<f4', 'shape': (2, 3)}", "missing key 'fortran_order'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), "
         "'extra': 1}",
         "unexpected key 'extra'"},
        {"{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, "
         "'shape': (2, 3)}",
         "duplicate key"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (6)}",
         "is an int, not a tuple"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': [2, 3]}",
         "shape must be a tuple"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3)}",
         "expected a non-negative integer"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 03)}",
         "leading zero"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2 3)}",
         "expected ',' or ')'"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3L)}",
         "expected ',' or ')'"},
        {"{'descr': '<f4', 'fortran_order': False, "
         "'shape': (1, 1, 1, 1, 1, 1, 1, 1, 1)}",
         "more than 8 dimensions"},
        {"{'descr': '<f4', 'fortran_order': False, "
         "'shape': (99999999999999999999, 1)}",
         "does not fit in 64 bits"},
        {"{'descr': '<f4', 'fortran_order': 0, 'shape': (2, 3)}",
         "True or False"},
        {"{'descr': '<f4', 'fortran_order': Falsey, 'shape': (2, 3)}",
         "True or False"},
        {"{'descr' '<f4', 'fortran_order': False, 'shape': (2, 3)}",
         "expected ':' after a key"},
        {"{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)} x",
         "unexpected text after the header dict"},
        {"{'descr': '<f4' 'fortran_order': False, 'shape': (2, 3)}",
         "expected ',' or '}'"},
        {"{'descr': '<\\x66\\x34', 'fortran_order': False, 'shape': (2, 3)}",
         "escape sequences"},
        {"{'descr\t': '<f4', 'fortran_order': False, 'shape': (2, 3)}",
         "control character"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char name[32];
        snprintf(name, sizeof name, "malformed%zu.npy", i);
        expect_dict_rejected(name, cases[i].dict, 24, "malformed .npy header");
        expect_message_contains(cases[i].reason);
    }
}

Test(npy, rejects_unterminated_string)
{
    /* The header region ends inside the string, so the parser must stop at
     * its end rather than scan into the data. */
    const char *dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, "
                       "3), 'x";
    uint8_t image[128];
    size_t dict_bytes = strlen(dict);
    memcpy(image, "\x93NUMPY\x01\x00", 8);
    image[8] = (uint8_t)dict_bytes;
    image[9] = 0;
    memcpy(image + 10, dict, dict_bytes);
    memset(image + 10 + dict_bytes, '\'', 24);
    expect_rejected("unterminated.npy", image, 10 + dict_bytes + 24,
                    "unterminated string");
}

Test(npy, rejects_truncated_header)
{
    /* The length field promises 118 header bytes; only 50 follow. */
    expect_rejected("cut_header.npy", numpy_v1_file, 60,
                    "truncated .npy header");
    expect_message_contains("expected 128 header bytes, found 60");

    expect_rejected("cut_length.npy", numpy_v3_file, 10, "truncated");
    expect_message_contains("header length field");
}

Test(npy, rejects_oversized_header_length)
{
    uint8_t image[sizeof numpy_v3_file];
    memcpy(image, numpy_v3_file, sizeof image);
    image[8] = 0xff;
    image[9] = 0xff;
    image[10] = 0xff;
    image[11] = 0xff;
    expect_rejected("huge_header.npy", image, sizeof image,
                    "header length 4294967295 bytes exceeds");
}

Test(npy, rejects_wrong_dtype)
{
    static const struct {
        const char *dict;
        const char *reason;
    } cases[] = {
        {"{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }",
         "unsupported dtype '<f8'; expected float32 ('<f4')"},
        {"{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }",
         "unsupported dtype '>f4'"},
        {"{'descr': '=f4', 'fortran_order': False, 'shape': (2, 3), }",
         "unsupported dtype '=f4'"},
        {"{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }",
         "unsupported dtype '<i4'"},
        {"{'descr': '<f4                ', 'fortran_order': False, "
         "'shape': (2, 3), }",
         "descr is longer than 15 characters"},
        {"{'descr': [('a', '<f4')], 'fortran_order': False, "
         "'shape': (2, 3), }",
         "structured dtype"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char name[32];
        snprintf(name, sizeof name, "dtype%zu.npy", i);
        expect_dict_rejected(name, cases[i].dict, 24, cases[i].reason);
        expect_message_contains("float32");
    }
}

Test(npy, rejects_fortran_order)
{
    expect_dict_rejected(
        "fortran.npy",
        "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", 24,
        "Fortran (column-major) order");
}

Test(npy, rejects_other_ranks)
{
    expect_dict_rejected(
        "rank1.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }",
        24, "shape (6,); expected a 2-D array");
    expect_dict_rejected(
        "rank3.npy",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3), }", 24,
        "shape (1, 2, 3); expected a 2-D array");
    expect_dict_rejected(
        "rank0.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (), }",
        4, "shape (); expected a 2-D array");
}

Test(npy, rejects_truncated_data)
{
    expect_rejected("cut_data.npy", numpy_v1_file, sizeof numpy_v1_file - 4,
                    "truncated .npy data: expected 24 bytes after the header, "
                    "found 20");
    expect_rejected("no_data.npy", numpy_v1_file, 128,
                    "expected 24 bytes after the header, found 0");
}

Test(npy, rejects_size_overflow)
{
    /* 2^62 rows of 4 floats is 2^66 bytes; INT64_MAX squared overflows the
     * element count itself. */
    expect_dict_rejected("overflow1.npy",
                         "{'descr': '<f4', 'fortran_order': False, "
                         "'shape': (4611686018427387904, 4), }",
                         0, "its size in bytes overflows");
    expect_dict_rejected("overflow2.npy",
                         "{'descr': '<f4', 'fortran_order': False, "
                         "'shape': (9223372036854775807, "
                         "9223372036854775807), }",
                         0, "too large");
    /* 2^61 floats is 2^63 bytes, one more than INT64_MAX. */
    expect_dict_rejected("overflow3.npy",
                         "{'descr': '<f4', 'fortran_order': False, "
                         "'shape': (2305843009213693952, 1), }",
                         0, "overflows");
}

Test(npy, rejects_huge_shape_in_small_file)
{
    /* The size fits in 64 bits but the file is tiny: the reader must report
     * truncation from the file size, not try to allocate 4 TiB. */
    expect_dict_rejected("huge.npy",
                         "{'descr': '<f4', 'fortran_order': False, "
                         "'shape': (1048576, 1048576), }",
                         24,
                         "expected 4398046511104 bytes after the header, "
                         "found 24");
}

Test(npy, rejects_trailing_bytes)
{
    uint8_t image[sizeof numpy_v1_file + 3];
    memcpy(image, numpy_v1_file, sizeof numpy_v1_file);
    memset(image + sizeof numpy_v1_file, 0xab, 3);
    expect_rejected("trailing.npy", image, sizeof image,
                    "3 trailing bytes after the 24 bytes of data");
}

Test(npy, read_missing_file_fails)
{
    const char *path = test_path("missing.npy");
    float *data = NULL;
    int64_t rows, cols;
    int rc = moe_npy_read_f32(path, &data, &rows, &cols);
    cr_assert_eq(rc, -ENOENT, "rc %d: %s", rc, moe_error_message());
    cr_assert_null(data);
    expect_message_contains(path);
    expect_message_contains("open failed");
}

/* ---- header parser on memory ------------------------------------------ */

Test(npy, parse_header_reads_only_len_bytes)
{
    /* Each prefix of the header lives in a heap block of exactly its size,
     * so that an ASan build reports any read past len. */
    for (size_t len = 0; len <= 128; len++) {
        uint8_t *buf = malloc(len > 0 ? len : 1);
        cr_assert_not_null(buf);
        memcpy(buf, numpy_v1_file, len);

        struct moe_npy_header h;
        int rc = moe_npy_parse_header(buf, len, "prefix", &h);
        if (len < 128) {
            cr_assert_eq(rc, -EINVAL, "prefix of %zu bytes accepted", len);
            expect_message_contains("prefix");
        } else {
            cr_assert_eq(rc, 0, "%s", moe_error_message());
            cr_assert_str_eq(h.descr, "<f4");
            cr_assert_eq(h.fortran_order, 0);
            cr_assert_eq(h.ndim, 2);
            cr_assert_eq(h.shape[0], 2);
            cr_assert_eq(h.shape[1], 3);
            cr_assert_eq(h.data_offset, 128);
        }
        free(buf);
    }
}

Test(npy, parse_header_ignores_data_after_header)
{
    struct moe_npy_header h;
    cr_assert_eq(moe_npy_parse_header(numpy_v3_file, sizeof numpy_v3_file,
                                      "v3", &h),
                 0, "%s", moe_error_message());
    cr_assert_eq(h.data_offset, 128);
    cr_assert_eq(h.ndim, 2);
}

Test(npy, parse_header_reports_offset_and_default_name)
{
    uint8_t image[256];
    size_t count = build_npy(image, sizeof image, 1, 0,
                             "{'descr': '<f4', 'fortran_order': Nope}", 0);
    struct moe_npy_header h;
    cr_assert_eq(moe_npy_parse_header(image, count, NULL, &h), -EINVAL);
    expect_message_contains("<buffer>");
    /* 'N' of Nope is byte 44 of the file: 10 bytes of prefix + 34. */
    expect_message_contains("at byte 44");
}

Test(npy, parse_header_keeps_other_ranks_and_dtypes)
{
    /* The parser leaves dtype, order and rank checks to its caller. */
    uint8_t image[256];
    size_t count = build_npy(
        image, sizeof image, 3, 0,
        "{'descr': '<f8', 'fortran_order': True, 'shape': (4, 0, 5), }", 0);
    struct moe_npy_header h;
    cr_assert_eq(moe_npy_parse_header(image, count, "any", &h), 0, "%s",
                 moe_error_message());
    cr_assert_str_eq(h.descr, "<f8");
    cr_assert_eq(h.fortran_order, 1);
    cr_assert_eq(h.ndim, 3);
    cr_assert_eq(h.shape[0], 4);
    cr_assert_eq(h.shape[1], 0);
    cr_assert_eq(h.shape[2], 5);
    cr_assert_eq(h.data_offset, 128);
}

/* ---- write failures --------------------------------------------------- */

Test(npy, write_to_missing_directory_fails)
{
    const char *path = test_path("no_such_dir/out.npy");
    float value = 1.0f;
    int rc = moe_npy_write_f32(path, &value, 1, 1);
    cr_assert_eq(rc, -ENOENT, "rc %d: %s", rc, moe_error_message());
    expect_message_contains(path);
    expect_message_contains("No such file or directory");
}

/* Counts the entries of test_dir other than `keep`, which are leftovers. */
static int leftover_files(const char *keep)
{
    DIR *dir = opendir(test_dir);
    cr_assert_not_null(dir);
    int leftovers = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0 ||
            (keep && strcmp(entry->d_name, keep) == 0))
            continue;
        leftovers++;
    }
    closedir(dir);
    return leftovers;
}

Test(npy, directory_target_rejected)
{
    char target[512];
    snprintf(target, sizeof target, "%s", test_path("a_directory"));
    cr_assert_eq(mkdir(target, 0755), 0, "mkdir failed: %s", strerror(errno));

    float data[4] = {1, 2, 3, 4};
    int rc = moe_npy_write_f32(target, data, 2, 2);
    cr_assert_eq(rc, -EINVAL, "rc %d: %s", rc, moe_error_message());
    expect_message_contains(target);
    expect_message_contains("is a directory");
    cr_assert_eq(leftover_files("a_directory"), 0);
}

Test(npy, failed_write_leaves_no_file)
{
    /* A file size limit makes the write fail after the temporary file was
     * created: the last point where a partial file could be left. */
    signal(SIGXFSZ, SIG_IGN);
    struct rlimit limit = {.rlim_cur = 100, .rlim_max = RLIM_INFINITY};
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &limit), 0);

    static float data[64 * 64];
    const char *path = test_path("too_big.npy");
    int rc = moe_npy_write_f32(path, data, 64, 64);
    cr_assert_eq(rc, -EFBIG, "rc %d: %s", rc, moe_error_message());
    expect_message_contains("too_big.npy");
    expect_message_contains("write failed");
    cr_assert_eq(leftover_files(NULL), 0, "a temporary file was left behind");
}

Test(npy, device_target_written_in_place)
{
    /* /dev/null stays a device: the data is written to it, not renamed over
     * it. */
    float data[4] = {1, 2, 3, 4};
    cr_assert_eq(moe_npy_write_f32("/dev/null", data, 2, 2), 0, "%s",
                 moe_error_message());
    struct stat st;
    cr_assert_eq(stat("/dev/null", &st), 0);
    cr_assert(S_ISCHR(st.st_mode), "/dev/null is no longer a device");

    int rc = moe_npy_write_f32("/dev/full", data, 2, 2);
    cr_assert_eq(rc, -ENOSPC, "rc %d: %s", rc, moe_error_message());
    expect_message_contains("/dev/full");
}

Test(npy, symlink_chain_and_loop)
{
    /* A chain a -> b -> c ends at c, which is created; a loop is an error. */
    cr_assert_eq(symlink("chain_b", test_path("chain_a")), 0);
    cr_assert_eq(symlink("chain_c", test_path("chain_b")), 0);
    float data[4] = {1, 2, 3, 4};
    cr_assert_eq(moe_npy_write_f32(test_path("chain_a"), data, 2, 2), 0, "%s",
                 moe_error_message());
    struct stat st;
    cr_assert_eq(lstat(test_path("chain_b"), &st), 0);
    cr_assert(S_ISLNK(st.st_mode), "the middle link was replaced");
    cr_assert_eq(lstat(test_path("chain_c"), &st), 0);
    cr_assert(S_ISREG(st.st_mode), "the end of the chain was not created");

    cr_assert_eq(symlink("loop_b", test_path("loop_a")), 0);
    cr_assert_eq(symlink("loop_a", test_path("loop_b")), 0);
    int rc = moe_npy_write_f32(test_path("loop_a"), data, 2, 2);
    cr_assert_eq(rc, -ELOOP, "rc %d: %s", rc, moe_error_message());
    cr_assert_eq(lstat(test_path("loop_b"), &st), 0);
    cr_assert(S_ISLNK(st.st_mode), "a link of the loop was replaced");
}

Test(npy, replaced_file_keeps_mode)
{
    const char *path = test_path("mode.npy");
    float data[4] = {1, 2, 3, 4};
    cr_assert_eq(moe_npy_write_f32(path, data, 2, 2), 0);
    cr_assert_eq(chmod(path, 0640), 0);
    cr_assert_eq(moe_npy_write_f32(path, data, 1, 4), 0);
    struct stat st;
    cr_assert_eq(stat(path, &st), 0);
    cr_assert_eq(st.st_mode & 07777, 0640, "mode is %o", st.st_mode & 07777);
}

Test(npy, fifo_without_reader_fails_at_once)
{
    /* Opening a FIFO that no process reads must not wait for a reader. */
    const char *path = test_path("pipe");
    cr_assert_eq(mkfifo(path, 0600), 0, "mkfifo failed: %s", strerror(errno));
    float data[4] = {1, 2, 3, 4};
    int rc = moe_npy_write_f32(path, data, 2, 2);
    cr_assert_eq(rc, -ENXIO, "rc %d: %s", rc, moe_error_message());
    expect_message_contains("no process has the FIFO open for reading");
}

Test(npy, symlink_target_written_through)
{
    char target[512], link_path[512];
    snprintf(target, sizeof target, "%s", test_path("real.npy"));
    snprintf(link_path, sizeof link_path, "%s", test_path("link.npy"));
    cr_assert_eq(symlink("real.npy", link_path), 0);

    float data[4] = {1, 2, 3, 4};
    cr_assert_eq(moe_npy_write_f32(link_path, data, 2, 2), 0, "%s",
                 moe_error_message());
    struct stat st;
    cr_assert_eq(lstat(link_path, &st), 0);
    cr_assert(S_ISLNK(st.st_mode), "the link was replaced by a file");

    float *read = NULL;
    int64_t rows, cols;
    cr_assert_eq(moe_npy_read_f32(target, &read, &rows, &cols), 0, "%s",
                 moe_error_message());
    cr_assert_eq(rows, 2);
    cr_assert_eq(cols, 2);
    cr_assert(memcmp(read, data, sizeof data) == 0);
    free(read);
}

Test(npy, write_replaces_existing_file)
{
    const char *path = test_path("replace.npy");
    float first[6] = {1, 2, 3, 4, 5, 6};
    float second[2] = {7, 8};
    cr_assert_eq(moe_npy_write_f32(path, first, 2, 3), 0);
    cr_assert_eq(moe_npy_write_f32(path, second, 1, 2), 0);

    float *read = NULL;
    int64_t rows, cols;
    cr_assert_eq(moe_npy_read_f32(path, &read, &rows, &cols), 0, "%s",
                 moe_error_message());
    cr_assert_eq(rows, 1);
    cr_assert_eq(cols, 2);
    expect_bitwise_equal(read, second, 2, "replaced file");
    free(read);
}

Test(npy, write_rejects_invalid_shape)
{
    const char *path = test_path("bad_shape.npy");
    float value = 0;
    cr_assert_eq(moe_npy_write_f32(path, &value, -1, 1), -EINVAL);
    expect_message_contains(path);
    expect_message_contains("dimensions must be >= 0");

    cr_assert_eq(moe_npy_write_f32(path, &value, INT64_MAX, 2), -EINVAL);
    expect_message_contains("overflows");

    cr_assert_eq(moe_npy_write_f32(path, NULL, 1, 1), -EINVAL);
    expect_message_contains("data is NULL");
    cr_assert_eq(access(path, F_OK), -1, "a rejected write created a file");
}

/* ---- arrays of every dtype and 0 to 8 dimensions ----------------------- */

/* One np.save() output of numpy 1.24.2 (Python 3.11), kept as its parts:
 * every header below is 118 bytes long (version 1.0, data at byte 128). */
struct numpy_fixture {
    const char *name;
    enum moe_npy_dtype dtype;
    int ndim;
    int64_t shape[MOE_NPY_MAX_DIMS];
    const char *dict;  /* the header dict as np.save() wrote it */
    size_t spaces;     /* spaces np.save() put between the dict and '\n' */
    const char *data;  /* the data bytes */
    size_t data_bytes;
};

#define FIXTURE_DATA(literal) literal, sizeof literal - 1

static const struct numpy_fixture numpy_fixtures[] = {
    /* np.array([1, -2, 0.5, 65504, np.nan], np.float16) */
    {"f16_1d", MOE_NPY_F16, 1, {5},
     "{'descr': '<f2', 'fortran_order': False, 'shape': (5,), }", 60,
     FIXTURE_DATA("\x00\x3c\x00\xc0\x00\x38\xff\x7b\x00\x7e")},
    /* np.array([[1.5, -0.0], [1e300, np.inf]]) */
    {"f64_2d", MOE_NPY_F64, 2, {2, 2},
     "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 2), }", 58,
     FIXTURE_DATA("\x00\x00\x00\x00\x00\x00\xf8\x3f"
                  "\x00\x00\x00\x00\x00\x00\x00\x80"
                  "\x9c\x75\x00\x88\x3c\xe4\x37\x7e"
                  "\x00\x00\x00\x00\x00\x00\xf0\x7f")},
    /* np.array([[[1], [-2], [3]], [[2**31 - 1], [-2**31], [0]]], np.int32) */
    {"i32_3d", MOE_NPY_I32, 3, {2, 3, 1},
     "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3, 1), }", 55,
     FIXTURE_DATA("\x01\x00\x00\x00\xfe\xff\xff\xff\x03\x00\x00\x00"
                  "\xff\xff\xff\x7f\x00\x00\x00\x80\x00\x00\x00\x00")},
    /* np.array(-7, np.int64), a 0-D array: no room is left for growth */
    {"i64_0d", MOE_NPY_I64, 0, {0},
     "{'descr': '<i8', 'fortran_order': False, 'shape': (), }", 62,
     FIXTURE_DATA("\xf9\xff\xff\xff\xff\xff\xff\xff")},
    /* np.array([[True, False, True], [False, False, True]]) */
    {"bool_2d", MOE_NPY_BOOL, 2, {2, 3},
     "{'descr': '|b1', 'fortran_order': False, 'shape': (2, 3), }", 58,
     FIXTURE_DATA("\x01\x00\x01\x00\x00\x01")},
    /* np.array([7, 0, 255], np.uint8).reshape(1, 1, 1, 1, 1, 1, 1, 3) */
    {"u8_8d", MOE_NPY_U8, 8, {1, 1, 1, 1, 1, 1, 1, 3},
     "{'descr': '|u1', 'fortran_order': False, "
     "'shape': (1, 1, 1, 1, 1, 1, 1, 3), }", 40,
     FIXTURE_DATA("\x07\x00\xff")},
    /* np.zeros((0, 4), np.float32) */
    {"f32_empty", MOE_NPY_F32, 2, {0, 4},
     "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 4), }", 58,
     FIXTURE_DATA("")},
};

/* Assembles the file np.save() wrote for a fixture into a malloc'd buffer
 * and stores its size. */
static uint8_t *numpy_fixture_file(const struct numpy_fixture *f,
                                   size_t *size)
{
    size_t dict_bytes = strlen(f->dict);
    size_t header_bytes = dict_bytes + f->spaces + 1;
    cr_assert_eq(header_bytes, 118, "%s: fixture header is %zu bytes",
                 f->name, header_bytes);
    *size = 10 + header_bytes + f->data_bytes;
    uint8_t *bytes = malloc(*size);
    cr_assert_not_null(bytes);
    memcpy(bytes, "\x93NUMPY\x01\x00\x76\x00", 10);
    memcpy(bytes + 10, f->dict, dict_bytes);
    memset(bytes + 10 + dict_bytes, ' ', f->spaces);
    bytes[10 + dict_bytes + f->spaces] = '\n';
    memcpy(bytes + 128, f->data, f->data_bytes);
    return bytes;
}

Test(npy, writer_matches_numpy_every_dtype)
{
    for (size_t i = 0; i < sizeof numpy_fixtures / sizeof numpy_fixtures[0];
         i++) {
        const struct numpy_fixture *f = &numpy_fixtures[i];
        size_t expected_size;
        uint8_t *expected = numpy_fixture_file(f, &expected_size);

        const char *path = test_path("every_dtype.npy");
        cr_assert_eq(moe_npy_write(path, f->dtype, f->ndim, f->shape, f->data),
                     0, "%s: %s", f->name, moe_error_message());
        size_t size;
        uint8_t *bytes = read_bytes(path, &size);
        cr_assert_eq(size, expected_size, "%s: %zu bytes, np.save wrote %zu",
                     f->name, size, expected_size);
        for (size_t b = 0; b < size; b++)
            cr_assert_eq(bytes[b], expected[b],
                         "%s: byte %zu is 0x%02x, np.save wrote 0x%02x",
                         f->name, b, bytes[b], expected[b]);
        free(bytes);
        free(expected);
    }
}

Test(npy, read_numpy_file_of_every_dtype)
{
    for (size_t i = 0; i < sizeof numpy_fixtures / sizeof numpy_fixtures[0];
         i++) {
        const struct numpy_fixture *f = &numpy_fixtures[i];
        size_t size;
        uint8_t *bytes = numpy_fixture_file(f, &size);
        const char *path = test_path("numpy_dtype.npy");
        write_bytes(path, bytes, size);
        free(bytes);

        struct moe_npy_array array;
        cr_assert_eq(moe_npy_read(path, UINT64_MAX, &array), 0, "%s: %s",
                     f->name, moe_error_message());
        cr_assert_eq(array.dtype, f->dtype, "%s: dtype %d", f->name,
                     (int)array.dtype);
        cr_assert_eq(array.ndim, f->ndim, "%s: ndim %d", f->name, array.ndim);
        int64_t count = 1;
        for (int d = 0; d < f->ndim; d++) {
            cr_assert_eq(array.shape[d], f->shape[d], "%s: dimension %d",
                         f->name, d);
            count *= f->shape[d];
        }
        cr_assert_eq(array.count, count, "%s: count %" PRId64, f->name,
                     array.count);
        cr_assert_not_null(array.data, "%s: data is NULL", f->name);
        cr_assert_eq(memcmp(array.data, f->data, f->data_bytes), 0,
                     "%s: data differs", f->name);
        moe_npy_array_free(&array);
        cr_assert_null(array.data, "moe_npy_array_free left data set");
    }
}

Test(npy, round_trip_every_dtype_and_ndim)
{
    static const enum moe_npy_dtype dtypes[] = {
        MOE_NPY_F16, MOE_NPY_F32, MOE_NPY_F64, MOE_NPY_I32,
        MOE_NPY_I64, MOE_NPY_BOOL, MOE_NPY_U8,
    };
    static const size_t sizes[] = {2, 4, 8, 4, 8, 1, 1};
    static uint8_t data[2 * 3 * 2 * 1 * 2 * 1 * 2 * 2 * 8];

    for (size_t t = 0; t < sizeof dtypes / sizeof dtypes[0]; t++) {
        cr_assert_eq(moe_npy_dtype_size(dtypes[t]), sizes[t], "dtype %zu", t);
        for (int ndim = 0; ndim <= MOE_NPY_MAX_DIMS; ndim++) {
            /* Dimensions 2, 3, 2, 1, 2, 1, 2, 2 cover sizes of 1 too. */
            static const int64_t dims[MOE_NPY_MAX_DIMS] = {2, 3, 2, 1,
                                                           2, 1, 2, 2};
            int64_t count = 1;
            for (int d = 0; d < ndim; d++)
                count *= dims[d];
            size_t bytes = (size_t)count * sizes[t];
            for (size_t b = 0; b < bytes; b++)
                data[b] = dtypes[t] == MOE_NPY_BOOL ? (uint8_t)(b % 3 == 1)
                                                    : (uint8_t)(b * 37 + t);

            const char *path = test_path("round_trip_nd.npy");
            cr_assert_eq(moe_npy_write(path, dtypes[t], ndim, dims, data), 0,
                         "%s ndim %d: %s", moe_npy_dtype_name(dtypes[t]), ndim,
                         moe_error_message());
            struct moe_npy_array array;
            cr_assert_eq(moe_npy_read(path, UINT64_MAX, &array), 0,
                         "%s ndim %d: %s", moe_npy_dtype_name(dtypes[t]), ndim,
                         moe_error_message());
            cr_assert_eq(array.dtype, dtypes[t]);
            cr_assert_eq(array.ndim, ndim);
            cr_assert_eq(array.count, count);
            for (int d = 0; d < ndim; d++)
                cr_assert_eq(array.shape[d], dims[d]);
            cr_assert_eq(memcmp(array.data, data, bytes), 0,
                         "%s ndim %d: data differs",
                         moe_npy_dtype_name(dtypes[t]), ndim);
            moe_npy_array_free(&array);
        }
    }
}

Test(npy, dtype_names_and_kinds)
{
    static const struct {
        enum moe_npy_dtype dtype;
        const char *descr, *name;
        char kind;
    } cases[] = {
        {MOE_NPY_F16, "<f2", "float16", 'f'},
        {MOE_NPY_F32, "<f4", "float32", 'f'},
        {MOE_NPY_F64, "<f8", "float64", 'f'},
        {MOE_NPY_I32, "<i4", "int32", 'i'},
        {MOE_NPY_I64, "<i8", "int64", 'i'},
        {MOE_NPY_BOOL, "|b1", "bool", 'b'},
        {MOE_NPY_U8, "|u1", "uint8", 'u'},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        cr_assert_str_eq(moe_npy_dtype_descr(cases[i].dtype), cases[i].descr);
        cr_assert_str_eq(moe_npy_dtype_name(cases[i].dtype), cases[i].name);
        cr_assert_eq(moe_npy_dtype_kind(cases[i].dtype), cases[i].kind);
    }
}

Test(npy, one_byte_dtypes_any_byte_order)
{
    /* Byte order does not apply to one-byte elements, but some writers,
     * such as cnpy, put '<' there. */
    static const struct {
        const char *descr;
        enum moe_npy_dtype dtype;
    } cases[] = {
        {"<b1", MOE_NPY_BOOL}, {">b1", MOE_NPY_BOOL}, {"=b1", MOE_NPY_BOOL},
        {"<u1", MOE_NPY_U8},   {">u1", MOE_NPY_U8},   {"=u1", MOE_NPY_U8},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char dict[128];
        snprintf(dict, sizeof dict,
                 "{'descr': '%s', 'fortran_order': False, 'shape': (2,), }",
                 cases[i].descr);
        uint8_t image[256];
        size_t count = build_npy(image, sizeof image, 1, 0, dict, 2);
        const char *path = test_path("one_byte.npy");
        write_bytes(path, image, count);

        struct moe_npy_array array;
        cr_assert_eq(moe_npy_read(path, UINT64_MAX, &array), 0, "%s: %s",
                     cases[i].descr, moe_error_message());
        cr_assert_eq(array.dtype, cases[i].dtype, "%s", cases[i].descr);
        cr_assert_eq(array.count, 2);
        moe_npy_array_free(&array);
    }
}

Test(npy, read_fortran_order_only_below_2d)
{
    uint8_t image[256];
    size_t count = build_npy(image, sizeof image, 1, 0,
                             "{'descr': '<i4', 'fortran_order': True, "
                             "'shape': (3,), }",
                             12);
    const char *path = test_path("fortran_1d.npy");
    write_bytes(path, image, count);
    struct moe_npy_array array;
    cr_assert_eq(moe_npy_read(path, UINT64_MAX, &array), 0, "%s",
                 moe_error_message());
    cr_assert_eq(array.count, 3);
    moe_npy_array_free(&array);

    count = build_npy(image, sizeof image, 1, 0,
                      "{'descr': '<i4', 'fortran_order': True, "
                      "'shape': (2, 3), }",
                      24);
    path = test_path("fortran_2d.npy");
    write_bytes(path, image, count);
    array.data = &array; /* must be cleared on failure */
    cr_assert_eq(moe_npy_read(path, UINT64_MAX, &array), -EINVAL);
    cr_assert_null(array.data);
    expect_message_contains(path);
    expect_message_contains("Fortran (column-major) order");
}

/* Reads a file built from `dict` with moe_npy_read() and expects -EINVAL,
 * a zeroed array and a message naming the file and `reason`. */
static void expect_array_rejected(const char *name, const char *dict,
                                  size_t data_bytes, uint64_t max_bytes,
                                  const char *reason)
{
    uint8_t image[512];
    size_t count = build_npy(image, sizeof image, 1, 0, dict, data_bytes);
    const char *path = test_path(name);
    write_bytes(path, image, count);

    struct moe_npy_array array;
    array.data = &array;
    array.count = -1;
    moe_error_clear();
    int rc = moe_npy_read(path, max_bytes, &array);
    cr_assert_eq(rc, -EINVAL, "%s: rc %d, expected -EINVAL (%s)", name, rc,
                 moe_error_message());
    cr_assert_null(array.data, "%s: data not NULL after a failure", name);
    cr_assert_eq(array.count, 0, "%s: count not 0 after a failure", name);
    expect_message_contains(path);
    expect_message_contains(reason);
}

Test(npy, read_rejects_other_dtypes)
{
    static const struct {
        const char *descr;
        const char *reason;
    } cases[] = {
        {"<c8", "unsupported dtype '<c8'; expected one of float16 ('<f2'), "
                "float32 ('<f4'), float64 ('<f8'), int32 ('<i4'), int64 "
                "('<i8'), bool ('|b1'), uint8 ('|u1')"},
        {"<u4", "unsupported dtype '<u4'"},
        {"|i1", "unsupported dtype '|i1'"},
        {"|S3", "unsupported dtype '|S3'"},
        {"=f4", "unsupported dtype '=f4'"},
        {"f4", "unsupported dtype 'f4'"},
        {">f4", "unsupported dtype '>f4' (big-endian float32)"},
        {">i8", "unsupported dtype '>i8' (big-endian int64)"},
        {">f2", ".astype('<f2')"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char dict[128], name[32];
        snprintf(dict, sizeof dict,
                 "{'descr': '%s', 'fortran_order': False, 'shape': (2,), }",
                 cases[i].descr);
        snprintf(name, sizeof name, "other_dtype%zu.npy", i);
        expect_array_rejected(name, dict, 16, UINT64_MAX, cases[i].reason);
    }
}

Test(npy, read_rejects_invalid_bool_bytes)
{
    uint8_t image[256];
    size_t count = build_npy(image, sizeof image, 1, 0,
                             "{'descr': '|b1', 'fortran_order': False, "
                             "'shape': (4,), }",
                             4);
    /* build_npy fills the data with 0, 1, 2, 3. */
    const char *path = test_path("bool2.npy");
    write_bytes(path, image, count);
    struct moe_npy_array array;
    cr_assert_eq(moe_npy_read(path, UINT64_MAX, &array), -EINVAL);
    cr_assert_null(array.data);
    expect_message_contains(path);
    expect_message_contains("invalid bool value 0x02 at element 2");
}

Test(npy, read_checks_limit_before_allocating)
{
    /* 3 * 5 int64 values are 120 bytes. */
    const char *dict = "{'descr': '<i8', 'fortran_order': False, "
                       "'shape': (3, 5), }";
    expect_array_rejected("limit.npy", dict, 120, 119,
                          "the array's 120 bytes exceed the limit of 119 "
                          "bytes");

    uint8_t image[512];
    size_t count = build_npy(image, sizeof image, 1, 0, dict, 120);
    write_bytes(test_path("limit_ok.npy"), image, count);
    struct moe_npy_array array;
    cr_assert_eq(moe_npy_read(test_path("limit_ok.npy"), 120, &array), 0, "%s",
                 moe_error_message());
    moe_npy_array_free(&array);

    /* A limit of 2^41 lets a shape of 2^40 bytes past the limit check.
     * The file size then rejects it, before any allocation. */
    expect_array_rejected("huge_nd.npy",
                          "{'descr': '|u1', 'fortran_order': False, "
                          "'shape': (1024, 1024, 1024, 1024), }",
                          16, (uint64_t)1 << 41,
                          "expected 1099511627776 bytes after the header, "
                          "found 16");
}

Test(npy, read_rejects_bad_sizes_any_ndim)
{
    expect_array_rejected("nd_overflow.npy",
                          "{'descr': '<i8', 'fortran_order': False, "
                          "'shape': (1048576, 1048576, 1048576, 8), }",
                          0, UINT64_MAX,
                          "shape (1048576, 1048576, 1048576, 8) of int64 is "
                          "too large: its size in bytes overflows");
    expect_array_rejected("nd_truncated.npy",
                          "{'descr': '<f2', 'fortran_order': False, "
                          "'shape': (2, 2, 2), }",
                          15, UINT64_MAX,
                          "truncated .npy data: expected 16 bytes after the "
                          "header, found 15");
    expect_array_rejected("nd_trailing.npy",
                          "{'descr': '<f2', 'fortran_order': False, "
                          "'shape': (2, 2, 2), }",
                          17, UINT64_MAX,
                          "1 trailing bytes after the 16 bytes of data");
    expect_array_rejected("0d_truncated.npy",
                          "{'descr': '<f8', 'fortran_order': False, "
                          "'shape': (), }",
                          4, UINT64_MAX,
                          "expected 8 bytes after the header, found 4");
}

Test(npy, read_zero_sized_array_has_data)
{
    /* A zero dimension makes the count 0 even when the others are huge. */
    uint8_t image[256];
    size_t count = build_npy(image, sizeof image, 1, 0,
                             "{'descr': '<f8', 'fortran_order': False, "
                             "'shape': (4611686018427387904, 0, 7), }",
                             0);
    const char *path = test_path("zero_sized.npy");
    write_bytes(path, image, count);
    struct moe_npy_array array;
    cr_assert_eq(moe_npy_read(path, UINT64_MAX, &array), 0, "%s",
                 moe_error_message());
    cr_assert_eq(array.count, 0);
    cr_assert_eq(array.ndim, 3);
    cr_assert_not_null(array.data, "an empty array must still be non-NULL");
    moe_npy_array_free(&array);
}

Test(npy, write_rejects_invalid_arrays)
{
    const char *path = test_path("invalid_array.npy");
    const int64_t shape[2] = {2, 3};
    static const uint8_t values[6] = {0, 1, 1, 0, 2, 1};

    cr_assert_eq(moe_npy_write(path, MOE_NPY_I32, -1, shape, values), -EINVAL);
    expect_message_contains("invalid ndim -1: expected 0 to 8");
    cr_assert_eq(moe_npy_write(path, MOE_NPY_I32, 9, shape, values), -EINVAL);
    expect_message_contains("invalid ndim 9");
    cr_assert_eq(moe_npy_write(path, MOE_NPY_I32, 2, NULL, values), -EINVAL);
    expect_message_contains("shape is NULL");
    cr_assert_eq(moe_npy_write(path, (enum moe_npy_dtype)99, 2, shape, values),
                 -EINVAL);
    expect_message_contains("invalid dtype 99");

    const int64_t negative[3] = {2, -1, 3};
    cr_assert_eq(moe_npy_write(path, MOE_NPY_U8, 3, negative, values), -EINVAL);
    expect_message_contains("invalid shape (2, -1, 3): dimensions must be >= 0");

    const int64_t huge[3] = {INT64_MAX / 2, 2, 2};
    cr_assert_eq(moe_npy_write(path, MOE_NPY_U8, 3, huge, values), -EINVAL);
    expect_message_contains("its size in bytes overflows");

    cr_assert_eq(moe_npy_write(path, MOE_NPY_F64, 2, shape, NULL), -EINVAL);
    expect_message_contains("data is NULL");

    cr_assert_eq(moe_npy_write(path, MOE_NPY_BOOL, 2, shape, values), -EINVAL);
    expect_message_contains(path);
    expect_message_contains("invalid bool value 0x02 at element 4");

    cr_assert_eq(access(path, F_OK), -1, "a rejected write created a file");
}

Test(npy, write_zero_dim_without_shape)
{
    const char *path = test_path("scalar.npy");
    const double value = -2.5;
    cr_assert_eq(moe_npy_write(path, MOE_NPY_F64, 0, NULL, &value), 0, "%s",
                 moe_error_message());
    struct moe_npy_array array;
    cr_assert_eq(moe_npy_read(path, UINT64_MAX, &array), 0, "%s",
                 moe_error_message());
    cr_assert_eq(array.ndim, 0);
    cr_assert_eq(array.count, 1);
    cr_assert_eq(memcmp(array.data, &value, sizeof value), 0);
    moe_npy_array_free(&array);
}

Test(npy, format_shape_like_python)
{
    char text[64];
    const int64_t shape[3] = {2, 0, 30};
    moe_npy_format_shape(0, shape, text, sizeof text);
    cr_assert_str_eq(text, "()");
    moe_npy_format_shape(1, shape, text, sizeof text);
    cr_assert_str_eq(text, "(2,)");
    moe_npy_format_shape(3, shape, text, sizeof text);
    cr_assert_str_eq(text, "(2, 0, 30)");
    moe_npy_format_shape(3, shape, text, 6);
    cr_assert_str_eq(text, "(2, 0", "a short buffer must end in a NUL");
}

/* ---- token input: moe_npy_read_as_f32 --------------------------------- */

/* Writes a file of `dict` followed by the given data bytes. */
static void write_npy_with_data(const char *path, const char *dict,
                                const void *data, size_t data_bytes)
{
    uint8_t image[512];
    size_t count = build_npy(image, sizeof image, 1, 0, dict, data_bytes);
    memcpy(image + count - data_bytes, data, data_bytes);
    write_bytes(path, image, count);
}

Test(npy, token_input_float32)
{
    const char *path = test_path("tokens_f32.npy");
    write_bytes(path, numpy_v1_file, sizeof numpy_v1_file);

    float *data = NULL;
    int64_t rows = 0, cols = 0;
    cr_assert_eq(moe_npy_read_as_f32(path, UINT64_MAX, &data, &rows, &cols), 0,
                 "%s", moe_error_message());
    cr_assert_eq(rows, 2);
    cr_assert_eq(cols, 3);
    float expected[6];
    for (int i = 0; i < 6; i++)
        expected[i] = float_from_bits(numpy_fixture_bits[i]);
    expect_bitwise_equal(data, expected, 6, "float32 tokens");
    free(data);
}

Test(npy, token_input_float16_converts_exactly)
{
    /* float16 bit patterns and the float32 bits of their exact values:
     * 1, -2, max 65504, the smallest subnormal 2^-24, the largest
     * subnormal, -0, +inf and a quiet NaN. */
    static const uint16_t half[8] = {0x3c00, 0xc000, 0x7bff, 0x0001,
                                     0x03ff, 0x8000, 0x7c00, 0x7e00};
    static const uint32_t expected_bits[8] = {
        0x3f800000, 0xc0000000, 0x477fe000, 0x33800000,
        0x387fc000, 0x80000000, 0x7f800000, 0x7fc00000,
    };
    const char *path = test_path("tokens_f16.npy");
    write_npy_with_data(path,
                        "{'descr': '<f2', 'fortran_order': False, "
                        "'shape': (2, 4), }",
                        half, sizeof half);

    float *data = NULL;
    int64_t rows = 0, cols = 0;
    cr_assert_eq(moe_npy_read_as_f32(path, UINT64_MAX, &data, &rows, &cols), 0,
                 "%s", moe_error_message());
    cr_assert_eq(rows, 2);
    cr_assert_eq(cols, 4);
    for (int i = 0; i < 8; i++) {
        uint32_t bits;
        memcpy(&bits, &data[i], sizeof bits);
        cr_assert_eq(bits, expected_bits[i],
                     "float16 0x%04x became 0x%08x, expected 0x%08x", half[i],
                     bits, expected_bits[i]);
    }
    free(data);
}

static double double_from_bits(uint64_t bits)
{
    double v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

Test(npy, token_input_float64_rounds_to_nearest)
{
    /* 1 + 2^-24 lies halfway between 1 and the next float32 and rounds to
     * the even one, 1; 1 + 3 * 2^-24 rounds up to 1 + 2^-22, also even.
     * 0.1 rounds to 0x3dcccccd, +inf stays +inf and -1e-50 underflows to
     * -0. A finite value beyond float32's range is rejected below. */
    static const uint64_t double_bits[6] = {
        0x3ff0000010000000, /* 1 + 2^-24 */
        0x3ff0000030000000, /* 1 + 3 * 2^-24 */
        0x3fb999999999999a, /* 0.1 */
        0x7ff0000000000000, /* +inf */
        0xb58dee7a4ad4b81f, /* -1e-50 */
        0x7ff8000000000000, /* NaN */
    };
    static const uint32_t expected_bits[6] = {
        0x3f800000, 0x3f800002, 0x3dcccccd, 0x7f800000, 0x80000000, 0x7fc00000,
    };
    double values[6];
    for (int i = 0; i < 6; i++)
        values[i] = double_from_bits(double_bits[i]);
    const char *path = test_path("tokens_f64.npy");
    write_npy_with_data(path,
                        "{'descr': '<f8', 'fortran_order': False, "
                        "'shape': (3, 2), }",
                        values, sizeof values);

    float *data = NULL;
    int64_t rows = 0, cols = 0;
    cr_assert_eq(moe_npy_read_as_f32(path, UINT64_MAX, &data, &rows, &cols), 0,
                 "%s", moe_error_message());
    cr_assert_eq(rows, 3);
    cr_assert_eq(cols, 2);
    for (int i = 0; i < 6; i++) {
        uint32_t bits;
        memcpy(&bits, &data[i], sizeof bits);
        cr_assert_eq(bits, expected_bits[i],
                     "float64 0x%016" PRIx64 " became 0x%08x, expected 0x%08x",
                     double_bits[i], bits, expected_bits[i]);
    }
    free(data);

    values[3] = 1e300; /* finite, but infinite as float32 */
    write_npy_with_data(path,
                        "{'descr': '<f8', 'fortran_order': False, "
                        "'shape': (3, 2), }",
                        values, sizeof values);
    cr_assert_eq(moe_npy_read_as_f32(path, UINT64_MAX, &data, &rows, &cols), -EINVAL);
    cr_assert_not_null(strstr(moe_error_message(), "element 3"), "%s", moe_error_message());
    cr_assert_null(data);
}

Test(npy, token_input_spans_several_pieces)
{
    /* 3000 float64 values are 24000 bytes, more than the reader's 16 KiB
     * piece, so the conversion crosses a piece boundary. Integers up to
     * 3000 are exact in both types. */
    enum { ROWS = 1000, COLS = 3 };
    static double values[ROWS * COLS];
    for (int i = 0; i < ROWS * COLS; i++)
        values[i] = (double)(i - 1500);
    const int64_t shape[2] = {ROWS, COLS};
    const char *path = test_path("tokens_big_f64.npy");
    cr_assert_eq(moe_npy_write(path, MOE_NPY_F64, 2, shape, values), 0, "%s",
                 moe_error_message());

    float *data = NULL;
    int64_t rows = 0, cols = 0;
    cr_assert_eq(moe_npy_read_as_f32(path, UINT64_MAX, &data, &rows, &cols), 0,
                 "%s", moe_error_message());
    cr_assert_eq(rows, ROWS);
    cr_assert_eq(cols, COLS);
    for (int i = 0; i < ROWS * COLS; i++)
        cr_assert_eq(data[i], (float)(i - 1500), "element %d is %g", i,
                     (double)data[i]);
    free(data);
}

Test(npy, token_input_limit_is_float32_size)
{
    /* A (2, 3) float16 file has 12 data bytes but 24 as float32; the limit
     * applies to the float32 array. */
    static const uint16_t half[6] = {0x3c00, 0x3c00, 0x3c00,
                                     0x3c00, 0x3c00, 0x3c00};
    const char *path = test_path("tokens_limit.npy");
    write_npy_with_data(path,
                        "{'descr': '<f2', 'fortran_order': False, "
                        "'shape': (2, 3), }",
                        half, sizeof half);

    float *data = NULL;
    int64_t rows = -1, cols = -1;
    cr_assert_eq(moe_npy_read_as_f32(path, 23, &data, &rows, &cols), -EINVAL);
    cr_assert_null(data);
    cr_assert_eq(rows, 0);
    cr_assert_eq(cols, 0);
    expect_message_contains(path);
    expect_message_contains("the array's 24 bytes exceed the limit of 23 bytes");

    cr_assert_eq(moe_npy_read_as_f32(path, 24, &data, &rows, &cols), 0, "%s",
                 moe_error_message());
    free(data);
}

/* Expects moe_npy_read_as_f32() to reject the file at path with -EINVAL,
 * cleared outputs and a message naming the file and `reason`. */
static void expect_token_input_rejected(const char *path, const char *reason)
{
    float sentinel;
    float *data = &sentinel;
    int64_t rows = -1, cols = -1;
    moe_error_clear();
    int rc = moe_npy_read_as_f32(path, UINT64_MAX, &data, &rows, &cols);
    cr_assert_eq(rc, -EINVAL, "%s: rc %d, expected -EINVAL (%s)", path, rc,
                 moe_error_message());
    cr_assert_null(data, "%s: data not NULL after a failure", path);
    cr_assert_eq(rows, 0);
    cr_assert_eq(cols, 0);
    expect_message_contains(path);
    expect_message_contains(reason);
}

Test(npy, token_input_rejections)
{
    static const struct {
        const char *name;
        const char *dict;
        size_t data_bytes;
        const char *reason;
    } cases[] = {
        {"int32.npy",
         "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 3), }", 24,
         "unsupported dtype '<i4'; expected one of float32 ('<f4'), float16 "
         "('<f2'), float64 ('<f8'), but the file contains int32"},
        {"bool.npy",
         "{'descr': '|b1', 'fortran_order': False, 'shape': (2, 3), }", 6,
         "but the file contains bool"},
        {"bf16.npy",
         "{'descr': '<V2', 'fortran_order': False, 'shape': (2, 3), }", 12,
         "unsupported dtype '<V2'; expected one of float32"},
        {"big_endian.npy",
         "{'descr': '>f8', 'fortran_order': False, 'shape': (2, 3), }", 48,
         "unsupported dtype '>f8' (big-endian float64)"},
        {"fortran.npy",
         "{'descr': '<f2', 'fortran_order': True, 'shape': (2, 3), }", 12,
         "Fortran (column-major) order"},
        {"fortran_1d.npy",
         "{'descr': '<f2', 'fortran_order': True, 'shape': (6,), }", 12,
         "Fortran (column-major) order"},
        {"one_dim.npy",
         "{'descr': '<f2', 'fortran_order': False, 'shape': (6,), }", 12,
         "array has shape (6,); expected a 2-D array"},
        {"three_dim.npy",
         "{'descr': '<f8', 'fortran_order': False, 'shape': (1, 2, 3), }", 48,
         "array has shape (1, 2, 3); expected a 2-D array"},
        {"scalar.npy",
         "{'descr': '<f4', 'fortran_order': False, 'shape': (), }", 4,
         "array has shape (); expected a 2-D array"},
        {"truncated_f16.npy",
         "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3), }", 11,
         "truncated .npy data: expected 12 bytes after the header, found 11"},
        {"truncated_f64.npy",
         "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }", 0,
         "truncated .npy data: expected 48 bytes after the header, found 0"},
        {"overlong_f16.npy",
         "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3), }", 14,
         "2 trailing bytes after the 12 bytes of data"},
        {"overlong_f64.npy",
         "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }", 49,
         "1 trailing bytes after the 48 bytes of data"},
        {"malformed.npy",
         "{'descr': '<f2', 'fortran_order': False, 'shape': (2, 3)", 12,
         "malformed .npy header"},
        {"overflow_f16.npy",
         "{'descr': '<f2', 'fortran_order': False, "
         "'shape': (3074457345618258602, 1), }",
         0, "are too many to convert to float32"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint8_t image[512];
        size_t count = build_npy(image, sizeof image, 1, 0, cases[i].dict,
                                 cases[i].data_bytes);
        const char *path = test_path(cases[i].name);
        write_bytes(path, image, count);
        expect_token_input_rejected(path, cases[i].reason);
    }

    const char *path = test_path("bad_magic.npy");
    write_bytes(path, "not a numpy file", 16);
    expect_token_input_rejected(path, "bad magic");
}

Test(npy, token_input_truncated_pipe)
{
    /* A pipe has no size to check up front, so the converting reader must
     * notice the missing bytes itself, in the middle of the data. */
    uint8_t image[512];
    size_t count = build_npy(image, sizeof image, 1, 0,
                             "{'descr': '<f8', 'fortran_order': False, "
                             "'shape': (2, 3), }",
                             44);
    int fds[2];
    cr_assert_eq(pipe(fds), 0, "pipe failed: %s", strerror(errno));
    cr_assert_eq(write(fds[1], image, count), (ssize_t)count);
    close(fds[1]);

    char path[64];
    snprintf(path, sizeof path, "/dev/fd/%d", fds[0]);
    expect_token_input_rejected(path, "truncated .npy data: expected 48 bytes "
                                      "after the header, found 44");
    close(fds[0]);
}

Test(npy, token_input_missing_file)
{
    const char *path = test_path("no_tokens.npy");
    float *data = NULL;
    int64_t rows, cols;
    int rc = moe_npy_read_as_f32(path, UINT64_MAX, &data, &rows, &cols);
    cr_assert_eq(rc, -ENOENT, "rc %d: %s", rc, moe_error_message());
    cr_assert_null(data);
    expect_message_contains(path);
    expect_message_contains("open failed");
}
