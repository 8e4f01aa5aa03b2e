/*
 * test_compare.c - tests of moe_diff and the `moe-ep compare` command.
 *
 * The fixtures are .npy files written with moe_npy_write() into a fresh
 * temporary directory per test, removed by the suite's fini hook. The
 * command runs through moe_compare_main() with its standard output and
 * standard error captured in temporary files.
 */
#define _GNU_SOURCE /* nftw() */
#include "moe_diff.h"
#include "moe_error.h"
#include "moe_npy.h"
#include "test_util.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- temporary directory ---------------------------------------------- */

static char test_dir[256];

static void make_test_dir(void)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(test_dir, sizeof test_dir, "%s/moe-compare-XXXXXX",
             tmp != NULL && tmp[0] != '\0' ? tmp : "/tmp");
    cr_assert_not_null(mkdtemp(test_dir), "mkdtemp(%s) failed: %s", test_dir,
                       strerror(errno));
}

static int remove_entry(const char *path, const struct stat *st, int flag,
                        struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void remove_test_dir(void)
{
    nftw(test_dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

TestSuite(compare, .init = make_test_dir, .fini = remove_test_dir,
          .timeout = 30);

/* Returns test_dir/name in one of four static buffers, so that a call
 * may use up to four paths at once. */
static const char *test_path(const char *name)
{
    static char paths[4][512];
    static int next;
    char *path = paths[next++ % 4];
    snprintf(path, sizeof paths[0], "%s/%s", test_dir, name);
    return path;
}

static void make_subdir(const char *name)
{
    const char *path = test_path(name);
    cr_assert_eq(mkdir(path, 0755), 0, "mkdir(%s) failed: %s", path,
                 strerror(errno));
}

static float float_from_bits(uint32_t bits)
{
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static void write_array(const char *name, enum moe_npy_dtype dtype, int ndim,
                        const int64_t *shape, const void *data)
{
    cr_assert_eq(moe_npy_write(test_path(name), dtype, ndim, shape, data), 0,
                 "writing %s failed: %s", name, moe_error_message());
}

static void write_f32(const char *name, int64_t rows, int64_t cols,
                      const float *data)
{
    const int64_t shape[2] = {rows, cols};
    write_array(name, MOE_NPY_F32, 2, shape, data);
}

/* ---- running the command ---------------------------------------------- */

/* The exit status and output of one moe_compare_main() call. */
struct compare_run {
    int status;
    char out[32768];
    char err[4096];
};

static void read_capture(FILE *file, char *text, size_t size)
{
    rewind(file);
    size_t got = fread(text, 1, size - 1, file);
    text[got] = '\0';
    fclose(file);
}

/* Runs moe_compare_main() on a NULL-terminated argument list that starts
 * after "compare", with stdout and stderr captured. */
static void run_compare_args(struct compare_run *run, const char **args)
{
    const char *argv[16] = {"compare"};
    int argc = 1;
    while (args[argc - 1] != NULL) {
        cr_assert_lt(argc, 15, "too many arguments");
        argv[argc] = args[argc - 1];
        argc++;
    }
    argv[argc] = NULL;

    FILE *out = tmpfile(), *err = tmpfile();
    cr_assert_not_null(out);
    cr_assert_not_null(err);
    fflush(stdout);
    fflush(stderr);
    int saved_out = dup(STDOUT_FILENO), saved_err = dup(STDERR_FILENO);
    dup2(fileno(out), STDOUT_FILENO);
    dup2(fileno(err), STDERR_FILENO);

    run->status = moe_compare_main(argc, (char **)argv);

    fflush(stdout);
    fflush(stderr);
    dup2(saved_out, STDOUT_FILENO);
    dup2(saved_err, STDERR_FILENO);
    close(saved_out);
    close(saved_err);
    read_capture(out, run->out, sizeof run->out);
    read_capture(err, run->err, sizeof run->err);
}

#define run_compare(run, ...)                                                  \
    run_compare_args((run), (const char *[]){__VA_ARGS__, NULL})

#define expect_status(run, expected)                                           \
    cr_assert_eq((run)->status, (expected),                                    \
                 "exit status %d, expected %d\nstdout:\n%s\nstderr:\n%s",      \
                 (run)->status, (expected), (run)->out, (run)->err)

#define expect_contains(text, part)                                            \
    cr_assert_not_null(strstr((text), (part)),                                 \
                       "expected \"%s\" in:\n%s", (part), (text))

#define expect_not_contains(text, part)                                        \
    cr_assert_null(strstr((text), (part)), "unexpected \"%s\" in:\n%s",        \
                   (part), (text))

/* ---- single files ----------------------------------------------------- */

static const float base_values[6] = {1.0f, -2.5f, 0.125f, 3.0f, 1e-3f, -7.0f};

Test(compare, identical_files_match)
{
    write_f32("a.npy", 2, 3, base_values);
    write_f32("b.npy", 2, 3, base_values);

    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"));
    expect_status(&run, 0);
    expect_contains(run.out, "match, float32 (2, 3), bitwise equal");
    cr_assert_str_eq(run.err, "");
}

Test(compare, one_ulp_with_zero_tolerance_mismatches)
{
    /* Element 5, at (1, 2), moves one float32 step toward zero, from -7
     * (0xc0e00000) to 0xc0dfffff. */
    float perturbed[6];
    memcpy(perturbed, base_values, sizeof perturbed);
    perturbed[5] = float_from_bits(0xc0dfffff);
    write_f32("a.npy", 2, 3, perturbed);
    write_f32("b.npy", 2, 3, base_values);

    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"), "--rtol", "0",
                "--atol", "0");
    expect_status(&run, 1);
    expect_contains(run.out, "MISMATCH, float32 (2, 3), 1 of 6 elements "
                             "beyond tolerance");
    expect_contains(run.out, "max ulp 1,");
    expect_contains(run.out, "first at (1, 2) (flat index 5): "
                             "A -6.99999952 (0xc0dfffff), B -7 (0xc0e00000)");

    /* The library result carries the same facts. */
    struct moe_diff_result result;
    const struct moe_diff_tolerance exact = {0, 0};
    cr_assert_eq(moe_diff_files(test_path("a.npy"), test_path("b.npy"), &exact,
                                &result),
                 0, "%s", moe_error_message());
    cr_assert_eq(result.status, MOE_DIFF_VALUES);
    cr_assert_eq(result.mismatches, 1);
    cr_assert_eq(result.first_index, 5);
    cr_assert_eq(result.first_coords[0], 1);
    cr_assert_eq(result.first_coords[1], 2);
    cr_assert_eq(result.first_a.bits, 0xc0dfffff);
    cr_assert_eq(result.first_b.bits, 0xc0e00000);
    cr_assert_eq(result.max_ulp, 1);
    /* Between 4 and 8, one float32 step is 2^-21. */
    cr_assert_eq(result.max_abs_error, 0x1p-21);
}

Test(compare, within_tolerance_matches)
{
    float perturbed[6];
    memcpy(perturbed, base_values, sizeof perturbed);
    perturbed[0] = float_from_bits(0x3f800001); /* 1 + 2^-23 */

    write_f32("a.npy", 2, 3, perturbed);
    write_f32("b.npy", 2, 3, base_values);
    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"));
    expect_status(&run, 0);
    expect_contains(run.out, "match, float32 (2, 3), max abs error 1.19e-07");
    expect_contains(run.out, "max ulp 1");
    expect_not_contains(run.out, "first at");

    /* 1.001 against 1 is beyond the default rtol 1e-5 but within 1e-2. */
    perturbed[0] = 1.001f;
    write_f32("a.npy", 2, 3, perturbed);
    run_compare(&run, test_path("a.npy"), test_path("b.npy"));
    expect_status(&run, 1);
    run_compare(&run, test_path("a.npy"), test_path("b.npy"), "--rtol", "1e-2");
    expect_status(&run, 0);
}

Test(compare, tolerance_bound_is_inclusive)
{
    /* |a - b| = 0.5 = atol + rtol * |b| exactly: isclose uses <=. */
    const float b_values[2] = {0.0f, 0.0f};
    const float a_values[2] = {0.5f, -0.5f};
    write_f32("a.npy", 1, 2, a_values);
    write_f32("b.npy", 1, 2, b_values);
    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"), "--atol", "0.5",
                "--rtol", "0");
    expect_status(&run, 0);

    const float beyond[2] = {0.5f, float_from_bits(0xbf000001)};
    write_f32("a.npy", 1, 2, beyond);
    run_compare(&run, test_path("a.npy"), test_path("b.npy"), "--atol", "0.5",
                "--rtol", "0");
    expect_status(&run, 1);
    expect_contains(run.out, "first at (0, 1) (flat index 1)");
}

Test(compare, rtol_scales_with_reference_b)
{
    /* B is the reference: |100 - 99| = 1 <= 0.01 * 100, but with A and B
     * swapped 1 > 0.01 * 99. */
    const float hundred = 100.0f, ninety_nine = 99.0f;
    write_f32("a.npy", 1, 1, &ninety_nine);
    write_f32("b.npy", 1, 1, &hundred);
    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"), "--rtol", "0.01",
                "--atol", "0");
    expect_status(&run, 0);
    run_compare(&run, test_path("b.npy"), test_path("a.npy"), "--rtol", "0.01",
                "--atol", "0");
    expect_status(&run, 1);
}

Test(compare, nan_matches_nan_in_same_position)
{
    /* Two NaNs with different payloads and signs still match. */
    const float a_values[3] = {1.0f, float_from_bits(0x7fc00001), 2.0f};
    const float b_values[3] = {1.0f, float_from_bits(0xffc00000), 2.0f};
    write_f32("a.npy", 1, 3, a_values);
    write_f32("b.npy", 1, 3, b_values);
    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"), "--rtol", "0",
                "--atol", "0");
    expect_status(&run, 0);
    expect_contains(run.out, "match, float32 (1, 3), max abs error 0");
    expect_contains(run.out, "1 NaN in both");
}

Test(compare, nan_against_number_mismatches)
{
    const float a_values[3] = {1.0f, 5.0f, NAN};
    const float b_values[3] = {1.0f, NAN, 2.0f};
    write_f32("a.npy", 1, 3, a_values);
    write_f32("b.npy", 1, 3, b_values);
    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"), "--rtol", "1e9",
                "--atol", "1e9");
    expect_status(&run, 1);
    expect_contains(run.out, "2 of 3 elements beyond tolerance (2 NaN against "
                             "a number)");
    expect_contains(run.out, "first at (0, 1) (flat index 1): A 5 "
                             "(0x40a00000), B nan (0x7fc00000)");
}

Test(compare, infinities_match_only_when_equal)
{
    const float a_values[3] = {INFINITY, -INFINITY, 3.0e38f};
    const float b_values[3] = {INFINITY, -INFINITY, 3.0e38f};
    write_f32("a.npy", 1, 3, a_values);
    write_f32("b.npy", 1, 3, b_values);
    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"), "--rtol", "0",
                "--atol", "0");
    expect_status(&run, 0);

    /* inf <= atol + rtol * inf would hold, but isclose does not let an
     * infinity match a finite value or the other infinity. */
    const float other[3] = {INFINITY, INFINITY, INFINITY};
    write_f32("a.npy", 1, 3, other);
    run_compare(&run, test_path("a.npy"), test_path("b.npy"), "--rtol", "1",
                "--atol", "1");
    expect_status(&run, 1);
    expect_contains(run.out, "2 of 3 elements beyond tolerance");
    expect_contains(run.out, "max abs error inf, max rel error inf");
    expect_contains(run.out, "first at (0, 1) (flat index 1): A inf "
                             "(0x7f800000), B -inf (0xff800000)");
}

Test(compare, zero_tolerance_is_numeric_equality)
{
    /* +0 and -0 are equal as numbers, so they match even with zero
     * tolerances. The line does not claim bitwise equality. */
    const float a_values[2] = {0.0f, 1.0f};
    const float b_values[2] = {-0.0f, 1.0f};
    write_f32("a.npy", 1, 2, a_values);
    write_f32("b.npy", 1, 2, b_values);
    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"), "--rtol", "0",
                "--atol", "0");
    expect_status(&run, 0);
    expect_not_contains(run.out, "bitwise equal");
    expect_contains(run.out, "max ulp 0");
}

Test(compare, integer_arrays_compare_exactly)
{
    const int64_t shape[2] = {2, 2};
    const int32_t b_values[4] = {3, 0, 7, 1};
    const int32_t a_values[4] = {3, 0, 7, 2};
    write_array("a.npy", MOE_NPY_I32, 2, shape, a_values);
    write_array("b.npy", MOE_NPY_I32, 2, shape, b_values);

    /* The tolerances do not apply to integers. */
    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"), "--atol", "100",
                "--rtol", "100");
    expect_status(&run, 1);
    expect_contains(run.out, "MISMATCH, int32 (2, 2), 1 of 4 elements differ, "
                             "max abs difference 1, first at (1, 1) (flat "
                             "index 3): A 2, B 1");

    write_array("a.npy", MOE_NPY_I32, 2, shape, b_values);
    run_compare(&run, test_path("a.npy"), test_path("b.npy"));
    expect_status(&run, 0);
    expect_contains(run.out, "match, int32 (2, 2), bitwise equal");
}

Test(compare, int32_against_int64_compares_values)
{
    /* A port may dump ids as int64 where moe-ep dumps int32. */
    const int64_t shape[1] = {3};
    const int32_t narrow[3] = {-1, 5, 2147483647};
    const int64_t wide[3] = {-1, 5, 2147483647};
    write_array("a.npy", MOE_NPY_I64, 1, shape, wide);
    write_array("b.npy", MOE_NPY_I32, 1, shape, narrow);
    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"));
    expect_status(&run, 0);
    expect_contains(run.out, "match, int64 in A, int32 in B, shape (3,), "
                             "equal values");

    const int64_t far[3] = {-1, 5, INT64_MIN};
    write_array("a.npy", MOE_NPY_I64, 1, shape, far);
    run_compare(&run, test_path("a.npy"), test_path("b.npy"));
    expect_status(&run, 1);
    expect_contains(run.out, "first at (2,) (flat index 2): "
                             "A -9223372036854775808, B 2147483647");
}

Test(compare, bool_arrays_compare_exactly)
{
    const int64_t shape[2] = {2, 3};
    const uint8_t a_values[6] = {1, 0, 1, 0, 0, 1};
    const uint8_t b_values[6] = {1, 0, 1, 0, 1, 1};
    write_array("a.npy", MOE_NPY_BOOL, 2, shape, a_values);
    write_array("b.npy", MOE_NPY_BOOL, 2, shape, b_values);
    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"));
    expect_status(&run, 1);
    expect_contains(run.out, "MISMATCH, bool (2, 3), 1 of 6 elements differ");
    expect_contains(run.out, "first at (1, 1) (flat index 4): A False, B True");
}

Test(compare, shape_mismatch_is_divergence)
{
    write_f32("a.npy", 2, 3, base_values);
    write_f32("b.npy", 3, 2, base_values);
    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"));
    expect_status(&run, 1);
    expect_contains(run.out, "MISMATCH, shape (2, 3) in A, (3, 2) in B");
    cr_assert_str_eq(run.err, "");

    const int64_t flat[1] = {6};
    write_array("a.npy", MOE_NPY_F32, 1, flat, base_values);
    run_compare(&run, test_path("a.npy"), test_path("b.npy"));
    expect_status(&run, 1);
    expect_contains(run.out, "MISMATCH, shape (6,) in A, (3, 2) in B");
}

Test(compare, float_against_int_is_divergence)
{
    const int64_t shape[2] = {2, 3};
    const int32_t ints[6] = {1, -2, 0, 3, 0, -7};
    write_f32("a.npy", 2, 3, base_values);
    write_array("b.npy", MOE_NPY_I32, 2, shape, ints);
    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"));
    expect_status(&run, 1);
    expect_contains(run.out, "MISMATCH, dtype float32 in A, int32 in B: a float "
                             "array cannot be compared with an integer or "
                             "bool array");
    cr_assert_str_eq(run.err, "");
}

Test(compare, float16_ulp_in_float32_steps)
{
    /* float16 1 + 2^-10 (0x3c01) against float32 1: one float16 step is
     * 2^13 float32 steps. */
    const int64_t shape[1] = {2};
    const uint16_t half[2] = {0x3c00, 0x3c01};
    const float single[2] = {1.0f, 1.0f};
    write_array("a.npy", MOE_NPY_F16, 1, shape, half);
    write_array("b.npy", MOE_NPY_F32, 1, shape, single);

    struct moe_diff_result result;
    const struct moe_diff_tolerance exact = {0, 0};
    cr_assert_eq(moe_diff_files(test_path("a.npy"), test_path("b.npy"), &exact,
                                &result),
                 0, "%s", moe_error_message());
    cr_assert_eq(result.status, MOE_DIFF_VALUES);
    cr_assert_eq(result.max_ulp, 8192);
    cr_assert_eq(result.max_abs_error, 0x1p-10);
    cr_assert_eq(result.first_index, 1);

    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"), "--rtol", "0",
                "--atol", "0");
    expect_status(&run, 1);
    expect_contains(run.out, "float16 in A, float32 in B, shape (2,)");
    expect_contains(run.out, "A 1.00097656 (0x3c01), B 1 (0x3f800000)");
}

Test(compare, float64_rounds_to_float32_for_ulp)
{
    /* 1 + 2^-30 rounds to float32 1, so the ULP distance is 0 while the
     * absolute error, measured in double, is 2^-30. */
    const int64_t shape[1] = {1};
    const double a_value = 1.0 + 0x1p-30;
    const float b_value = 1.0f;
    write_array("a.npy", MOE_NPY_F64, 1, shape, &a_value);
    write_array("b.npy", MOE_NPY_F32, 1, shape, &b_value);

    struct moe_diff_result result;
    const struct moe_diff_tolerance exact = {0, 0};
    cr_assert_eq(moe_diff_files(test_path("a.npy"), test_path("b.npy"), &exact,
                                &result),
                 0, "%s", moe_error_message());
    cr_assert_eq(result.status, MOE_DIFF_VALUES);
    cr_assert_eq(result.max_ulp, 0);
    cr_assert_eq(result.max_abs_error, 0x1p-30);
    cr_assert_eq(result.first_a.bits, 0x3ff0000000400000);

    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"), "--rtol", "0",
                "--atol", "0");
    expect_status(&run, 1);
    expect_contains(run.out, "A 1.0000000009313226 (0x3ff0000000400000)");
}

Test(compare, ulp_distance_crosses_zero)
{
    /* The smallest positive and negative subnormals are 2 steps apart,
     * through +-0. */
    const float a_value = float_from_bits(0x00000001);
    const float b_value = float_from_bits(0x80000001);
    write_f32("a.npy", 1, 1, &a_value);
    write_f32("b.npy", 1, 1, &b_value);
    struct moe_diff_result result;
    const struct moe_diff_tolerance exact = {0, 0};
    cr_assert_eq(moe_diff_files(test_path("a.npy"), test_path("b.npy"), &exact,
                                &result),
                 0, "%s", moe_error_message());
    cr_assert_eq(result.max_ulp, 2);
}

Test(compare, empty_arrays_match)
{
    write_f32("a.npy", 0, 4, NULL);
    write_f32("b.npy", 0, 4, NULL);
    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"));
    expect_status(&run, 0);
    expect_contains(run.out, "match, float32 (0, 4), bitwise equal");
}

/* ---- bad input -------------------------------------------------------- */

/* Writes a version 1.0 .npy file from a header dict, unpadded, and data
 * bytes, without the writer's checks. */
static void write_raw_npy(const char *name, const char *dict,
                          const void *data, size_t data_bytes)
{
    size_t header_bytes = strlen(dict) + 1;
    uint8_t prefix[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0,
                          (uint8_t)header_bytes, (uint8_t)(header_bytes >> 8)};
    FILE *f = fopen(test_path(name), "wb");
    cr_assert_not_null(f, "fopen(%s) failed: %s", name, strerror(errno));
    fwrite(prefix, 1, sizeof prefix, f);
    fputs(dict, f);
    fputc('\n', f);
    fwrite(data, 1, data_bytes, f);
    cr_assert_eq(fclose(f), 0);
}

Test(compare, malformed_file_is_bad_input)
{
    write_f32("b.npy", 2, 3, base_values);
    write_raw_npy("a.npy", "{'descr': '<f4', 'fortran_order': False, "
                           "'shape': (2, 3) garbage}",
                  base_values, sizeof base_values);

    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"));
    expect_status(&run, 2);
    expect_contains(run.err, "moe-ep compare: ");
    expect_contains(run.err, test_path("a.npy"));
    expect_contains(run.err, "malformed .npy header");
    cr_assert_str_eq(run.out, "");

    /* B is read too, and checked the same way. */
    run_compare(&run, test_path("b.npy"), test_path("a.npy"));
    expect_status(&run, 2);
    expect_contains(run.err, "malformed .npy header");
}

Test(compare, bad_dtype_or_short_file_rejected)
{
    write_f32("a.npy", 2, 3, base_values);
    write_raw_npy("b.npy", "{'descr': '<c8', 'fortran_order': False, "
                           "'shape': (), }",
                  "12345678", 8);
    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("b.npy"));
    expect_status(&run, 2);
    expect_contains(run.err, "unsupported dtype '<c8'");

    write_raw_npy("b.npy", "{'descr': '<f4', 'fortran_order': False, "
                           "'shape': (2, 3), }",
                  base_values, sizeof base_values - 1);
    run_compare(&run, test_path("a.npy"), test_path("b.npy"));
    expect_status(&run, 2);
    expect_contains(run.err, "truncated .npy data: expected 24 bytes after "
                             "the header, found 23");
}

Test(compare, nonexistent_path_is_bad_input)
{
    write_f32("a.npy", 2, 3, base_values);
    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("missing.npy"));
    expect_status(&run, 2);
    expect_contains(run.err, test_path("missing.npy"));
    expect_contains(run.err, "No such file or directory");

    run_compare(&run, test_path("missing_dir"), test_path("a.npy"));
    expect_status(&run, 2);
    expect_contains(run.err, test_path("missing_dir"));
}

Test(compare, file_against_directory_is_bad_input)
{
    write_f32("a.npy", 2, 3, base_values);
    make_subdir("dir");
    struct compare_run run;
    run_compare(&run, test_path("a.npy"), test_path("dir"));
    expect_status(&run, 2);
    expect_contains(run.err, "is a file but");
    expect_contains(run.err, "is a directory; expected two .npy files or two "
                             "directories");

    run_compare(&run, test_path("dir"), test_path("a.npy"));
    expect_status(&run, 2);
    expect_contains(run.err, "is a directory but");
}

Test(compare, bad_flag_values_are_bad_input)
{
    write_f32("a.npy", 2, 3, base_values);
    write_f32("b.npy", 2, 3, base_values);
    const char *a = test_path("a.npy"), *b = test_path("b.npy");

    static const struct {
        const char *flag, *value, *message;
    } cases[] = {
        {"--rtol", "-1", "invalid --rtol value '-1': expected a number from 0"},
        {"--rtol", "abc", "invalid --rtol value 'abc'"},
        {"--rtol", "", "invalid --rtol value ''"},
        {"--rtol", "nan", "invalid --rtol value 'nan'"},
        {"--rtol", "1e999", "invalid --rtol value '1e999'"},
        {"--atol", "-0.5", "invalid --atol value '-0.5'"},
        {"--atol", "0x10", "invalid --atol value '0x10'"},
        {"--atol", "1 ", "invalid --atol value '1 '"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct compare_run run;
        run_compare(&run, a, b, cases[i].flag, cases[i].value);
        expect_status(&run, 2);
        expect_contains(run.err, cases[i].message);
        cr_assert_str_eq(run.out, "");
    }
}

Test(compare, bad_arguments_are_bad_input)
{
    write_f32("a.npy", 2, 3, base_values);
    const char *a = test_path("a.npy");
    struct compare_run run;

    run_compare(&run, a, a, "--rtol");
    expect_status(&run, 2);
    expect_contains(run.err, "missing value for --rtol");

    run_compare(&run, a, a, "--tolerance", "1");
    expect_status(&run, 2);
    expect_contains(run.err, "unknown option '--tolerance'");

    run_compare(&run, a);
    expect_status(&run, 2);
    expect_contains(run.err, "missing path B");

    run_compare(&run, "--atol", "1");
    expect_status(&run, 2);
    expect_contains(run.err, "missing paths A and B");

    run_compare(&run, a, a, a);
    expect_status(&run, 2);
    expect_contains(run.err, "unexpected argument");
}

Test(compare, options_anywhere_and_double_dash)
{
    write_f32("-a.npy", 2, 3, base_values);
    write_f32("b.npy", 2, 3, base_values);
    struct compare_run run;
    run_compare(&run, "--atol", "0", test_path("b.npy"), "--rtol", "0",
                test_path("b.npy"));
    expect_status(&run, 0);

    /* After "--", an argument that starts with '-' is a path. */
    cr_assert_eq(chdir(test_dir), 0);
    run_compare(&run, "--", "-a.npy", "b.npy");
    expect_status(&run, 0);

    run_compare(&run, "-a.npy", "b.npy");
    expect_status(&run, 2);
    expect_contains(run.err, "unexpected argument '-a.npy'");
}

Test(compare, help_goes_to_stdout)
{
    struct compare_run run;
    run_compare(&run, "--help");
    expect_status(&run, 0);
    expect_contains(run.out, "usage: moe-ep compare A B [--rtol R] [--atol A]");
    expect_contains(run.out, "--rtol R    relative tolerance, a number >= 0 "
                             "[1e-05]");
    expect_contains(run.out, "--atol A    absolute tolerance, a number >= 0 "
                             "[1e-06]");
    cr_assert_str_eq(run.err, "");
}

Test(compare, failed_output_is_runtime_failure)
{
    /* A report that cannot be written must not look like a match. */
    write_f32("a.npy", 2, 3, base_values);
    fflush(stdout);
    fflush(stderr);
    int saved_out = dup(STDOUT_FILENO), saved_err = dup(STDERR_FILENO);
    int full = open("/dev/full", O_WRONLY);
    cr_assert_geq(full, 0, "open(/dev/full) failed: %s", strerror(errno));
    FILE *err = tmpfile();
    cr_assert_not_null(err);
    dup2(full, STDOUT_FILENO);
    dup2(fileno(err), STDERR_FILENO);
    close(full);

    const char *argv[] = {"compare", test_path("a.npy"), test_path("a.npy"),
                          NULL};
    int status = moe_compare_main(3, (char **)argv);

    clearerr(stdout);
    fflush(stderr);
    dup2(saved_out, STDOUT_FILENO);
    dup2(saved_err, STDERR_FILENO);
    close(saved_out);
    close(saved_err);
    char message[512];
    read_capture(err, message, sizeof message);
    cr_assert_eq(status, 3, "exit status %d with a full standard output",
                 status);
    expect_contains(message, "moe-ep compare: writing to standard output "
                             "failed: No space left on device");
}

/* ---- dump directories ------------------------------------------------- */

enum { T = 3, H = 4, E = 4, K = 2, R = 2 };

/* Writes a complete small dump into directory `dir` of the test directory.
 * Every value is a function of the stage and position, so two calls write
 * identical dumps. */
static void write_dump(const char *dir, bool with_shared)
{
    make_subdir(dir);
    char name[128];
    float values[T * K * H];
    for (int i = 0; i < T * K * H; i++)
        values[i] = 0.25f * (float)(i % 17) - 1.0f;

    static const struct {
        const char *stage;
        int64_t rows, cols;
    } float_stages[] = {
        {"tokens.npy", T, H},       {"router_logits.npy", T, E},
        {"router_scores.npy", T, E}, {"topk_weights.npy", T, K},
        {"output.npy", T, H},       {"shared_out.npy", T, H},
    };
    for (size_t s = 0; s < sizeof float_stages / sizeof float_stages[0]; s++) {
        if (!with_shared && !strcmp(float_stages[s].stage, "shared_out.npy"))
            continue;
        snprintf(name, sizeof name, "%s/%s", dir, float_stages[s].stage);
        write_f32(name, float_stages[s].rows, float_stages[s].cols, values);
    }

    const int64_t expert_shape[3] = {T, K, H};
    snprintf(name, sizeof name, "%s/expert_out.npy", dir);
    write_array(name, MOE_NPY_F32, 3, expert_shape, values);

    const int32_t ids[T * K] = {0, 1, 2, 3, 1, 2};
    const int64_t ids_shape[2] = {T, K};
    snprintf(name, sizeof name, "%s/topk_ids.npy", dir);
    write_array(name, MOE_NPY_I32, 2, ids_shape, ids);

    const int32_t per_rank[R] = {3, 3};
    const int64_t rank_shape[1] = {R};
    snprintf(name, sizeof name, "%s/num_tokens_per_rank.npy", dir);
    write_array(name, MOE_NPY_I32, 1, rank_shape, per_rank);

    const int32_t per_expert[E] = {1, 2, 2, 1};
    const int64_t expert_count_shape[1] = {E};
    snprintf(name, sizeof name, "%s/num_tokens_per_expert.npy", dir);
    write_array(name, MOE_NPY_I32, 1, expert_count_shape, per_expert);

    const uint8_t in_rank[T * R] = {1, 0, 1, 1, 0, 1};
    const int64_t in_rank_shape[2] = {T, R};
    snprintf(name, sizeof name, "%s/is_token_in_rank.npy", dir);
    write_array(name, MOE_NPY_BOOL, 2, in_rank_shape, in_rank);

    for (int r = 0; r < R; r++) {
        const int32_t src[3] = {0, 1, 2};
        const int64_t rows_shape[1] = {3};
        const int64_t x_shape[2] = {3, H};
        snprintf(name, sizeof name, "%s/rank%d_recv_src_idx.npy", dir, r);
        write_array(name, MOE_NPY_I32, 1, rows_shape, src);
        snprintf(name, sizeof name, "%s/rank%d_recv_expert.npy", dir, r);
        write_array(name, MOE_NPY_I32, 1, rows_shape, src);
        snprintf(name, sizeof name, "%s/rank%d_recv_x.npy", dir, r);
        write_array(name, MOE_NPY_F32, 2, x_shape, values);
    }
}

/* Overwrites stage `name` of dump `dir` with its values shifted by one
 * float32 step at element `index`, a float32 stage of the given shape. */
static void perturb_stage(const char *dir, const char *stage, int64_t rows,
                          int64_t cols, int64_t index)
{
    char name[128];
    snprintf(name, sizeof name, "%s/%s", dir, stage);
    float *data = NULL;
    int64_t got_rows, got_cols;
    cr_assert_eq(moe_npy_read_f32(test_path(name), &data, &got_rows, &got_cols),
                 0, "%s", moe_error_message());
    cr_assert_eq(got_rows, rows);
    cr_assert_eq(got_cols, cols);
    data[index] = nextafterf(data[index], INFINITY);
    write_f32(name, rows, cols, data);
    free(data);
}

/* Returns the line of `text` that starts with `prefix`, copied into a
 * static buffer, or fails the test. */
static const char *line_starting_with(const char *text, const char *prefix)
{
    static char line[1024];
    size_t length = strlen(prefix);
    for (const char *p = text; *p != '\0';) {
        const char *end = strchr(p, '\n');
        size_t line_length = end ? (size_t)(end - p) : strlen(p);
        if (line_length >= length && strncmp(p, prefix, length) == 0) {
            snprintf(line, sizeof line, "%.*s", (int)line_length, p);
            return line;
        }
        p += line_length + (end ? 1 : 0);
    }
    cr_assert_fail("no line starts with \"%s\" in:\n%s", prefix, text);
    return NULL;
}

/* Returns the number of lines in text. */
static int count_lines(const char *text)
{
    int lines = 0;
    for (const char *p = text; *p != '\0'; p++)
        lines += *p == '\n';
    return lines;
}

Test(compare, identical_dumps_match)
{
    write_dump("a", true);
    write_dump("b", true);
    struct compare_run run;
    run_compare(&run, test_path("a"), test_path("b"));
    expect_status(&run, 0);

    /* 8 fixed stages, 3 per rank for 2 ranks, expert_out, shared_out and
     * output, then the summary. */
    cr_assert_eq(count_lines(run.out), 8 + 3 * R + 3 + 1, "output:\n%s",
                 run.out);
    expect_contains(run.out, "all 17 stages match (rtol 1e-05, atol 1e-06)\n");
    expect_contains(line_starting_with(run.out, "is_token_in_rank.npy: "),
                    "match, bool (3, 2), bitwise equal");
    cr_assert_str_eq(run.err, "");
}

Test(compare, dump_lines_in_pipeline_order)
{
    write_dump("a", false);
    write_dump("b", false);
    struct compare_run run;
    run_compare(&run, test_path("a"), test_path("b"));
    expect_status(&run, 0);

    static const char *const order[] = {
        "tokens.npy:", "router_logits.npy:", "router_scores.npy:",
        "topk_ids.npy:", "topk_weights.npy:", "num_tokens_per_rank.npy:",
        "num_tokens_per_expert.npy:", "is_token_in_rank.npy:",
        "rank0_recv_src_idx.npy:", "rank0_recv_expert.npy:",
        "rank0_recv_x.npy:", "rank1_recv_src_idx.npy:",
        "rank1_recv_expert.npy:", "rank1_recv_x.npy:", "expert_out.npy:",
        "output.npy:", "all 16 stages match",
    };
    const char *line = run.out;
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++) {
        cr_assert_eq(strncmp(line, order[i], strlen(order[i])), 0,
                     "line %zu should start with \"%s\":\n%s", i, order[i],
                     run.out);
        line = strchr(line, '\n');
        cr_assert_not_null(line);
        line++;
    }
    cr_assert_str_eq(line, "");
}

Test(compare, first_divergent_stage_named)
{
    /* router_scores differs by one float32 step, and so do the later
     * rank1_recv_x and output. The first stage in pipeline order is named,
     * not the first in name order (output.npy). */
    write_dump("a", true);
    write_dump("b", true);
    perturb_stage("a", "router_scores.npy", T, E, 5);
    perturb_stage("a", "output.npy", T, H, 0);
    perturb_stage("a", "rank1_recv_x.npy", 3, H, 2);

    struct compare_run run;
    run_compare(&run, test_path("a"), test_path("b"), "--rtol", "0", "--atol",
                "0");
    expect_status(&run, 1);
    expect_contains(line_starting_with(run.out, "router_scores.npy: "),
                    "MISMATCH, float32 (3, 4), 1 of 12 elements beyond "
                    "tolerance");
    expect_contains(line_starting_with(run.out, "router_scores.npy: "),
                    "first at (1, 1) (flat index 5)");
    expect_contains(line_starting_with(run.out, "rank1_recv_x.npy: "),
                    "MISMATCH");
    expect_contains(line_starting_with(run.out, "output.npy: "), "MISMATCH");
    expect_contains(line_starting_with(run.out, "tokens.npy: "), "match");
    cr_assert_eq(line_starting_with(run.out, "first mismatch: ") != NULL, 1);
    expect_contains(run.out, "first mismatch: router_scores.npy\n");

    /* Within the default tolerances the same dumps match. */
    run_compare(&run, test_path("a"), test_path("b"));
    expect_status(&run, 0);
}

Test(compare, missing_stage_is_divergence)
{
    write_dump("a", true);
    write_dump("b", false);
    struct compare_run run;
    run_compare(&run, test_path("a"), test_path("b"));
    expect_status(&run, 1);
    expect_contains(run.out, "shared_out.npy: MISMATCH, missing in B\n");
    expect_contains(run.out, "first mismatch: shared_out.npy\n");

    run_compare(&run, test_path("b"), test_path("a"));
    expect_status(&run, 1);
    expect_contains(run.out, "shared_out.npy: MISMATCH, missing in A\n");
    /* The stages after the missing one are still compared. */
    expect_contains(run.out, "output.npy: match");
}

Test(compare, extra_files_last_others_ignored)
{
    write_dump("a", false);
    write_dump("b", false);
    const float value = 1.0f;
    write_f32("a/zz_debug.npy", 1, 1, &value);
    write_f32("b/zz_debug.npy", 1, 1, &value);
    write_f32("a/aa_debug.npy", 1, 1, &value);
    write_f32("b/aa_debug.npy", 1, 1, &value);
    FILE *f = fopen(test_path("a/notes.txt"), "w");
    cr_assert_not_null(f);
    fputs("not an array\n", f);
    fclose(f);
    make_subdir("b/subdir");

    struct compare_run run;
    run_compare(&run, test_path("a"), test_path("b"));
    expect_status(&run, 0);
    expect_not_contains(run.out, "notes.txt");
    expect_not_contains(run.out, "subdir");
    const char *output = strstr(run.out, "output.npy:");
    const char *aa = strstr(run.out, "aa_debug.npy:");
    const char *zz = strstr(run.out, "zz_debug.npy:");
    cr_assert(output != NULL && aa != NULL && zz != NULL, "%s", run.out);
    cr_assert(output < aa && aa < zz, "extra files out of order:\n%s",
              run.out);
    expect_contains(run.out, "all 18 stages match");
}

Test(compare, malformed_stage_file_is_bad_input)
{
    write_dump("a", false);
    write_dump("b", false);
    FILE *f = fopen(test_path("b/topk_ids.npy"), "w");
    cr_assert_not_null(f);
    fputs("truncated", f);
    fclose(f);

    struct compare_run run;
    run_compare(&run, test_path("a"), test_path("b"));
    expect_status(&run, 2);
    expect_contains(run.err, "topk_ids.npy");
    expect_contains(run.err, "not a .npy file");
    /* The stages before it were reported, nothing after it. */
    expect_contains(run.out, "router_scores.npy: match");
    expect_not_contains(run.out, "topk_weights.npy");
    expect_not_contains(run.out, "first mismatch");
}

Test(compare, directory_named_npy_is_bad_input)
{
    write_dump("a", false);
    write_dump("b", false);
    make_subdir("a/odd.npy");
    make_subdir("b/odd.npy");
    struct compare_run run;
    run_compare(&run, test_path("a"), test_path("b"));
    expect_status(&run, 2);
    expect_contains(run.err, "odd.npy: not a regular file");
}

Test(compare, empty_directories_are_bad_input)
{
    make_subdir("a");
    make_subdir("b");
    struct compare_run run;
    run_compare(&run, test_path("a"), test_path("b"));
    expect_status(&run, 2);
    expect_contains(run.err, "contains a .npy file");
}

Test(compare, dump_sort_orders_ranks_numerically)
{
    const char *names[] = {
        "zz.npy",
        "output.npy",
        "rank10_recv_x.npy",
        "rank2_recv_src_idx.npy",
        "rank9_recv_x.npy",
        "rank10_recv_src_idx.npy",
        "rank01_recv_x.npy", /* a leading zero: not a rank file */
        "rank2_recv_x.npy",
        "rank9_recv_src_idx.npy",
        "rank2_recv_expert.npy",
        "tokens.npy",
        "expert_out.npy",
        "a.npy",
        "is_token_in_rank.npy",
        "rank1234567890_recv_x.npy", /* 10 digits: not a rank file */
    };
    static const char *const expected[] = {
        "tokens.npy",
        "is_token_in_rank.npy",
        "rank2_recv_src_idx.npy",
        "rank2_recv_expert.npy",
        "rank2_recv_x.npy",
        "rank9_recv_src_idx.npy",
        "rank9_recv_x.npy",
        "rank10_recv_src_idx.npy",
        "rank10_recv_x.npy",
        "expert_out.npy",
        "output.npy",
        "a.npy",
        "rank01_recv_x.npy",
        "rank1234567890_recv_x.npy",
        "zz.npy",
    };
    size_t count = sizeof names / sizeof names[0];
    moe_dump_sort_names(names, count);
    for (size_t i = 0; i < count; i++)
        cr_assert_str_eq(names[i], expected[i], "position %zu", i);
}

Test(compare, stage_table_lists_pipeline)
{
    static const char *const expected[] = {
        "tokens.npy", "router_logits.npy", "router_scores.npy",
        "topk_ids.npy", "topk_weights.npy", "topk_kept.npy", "num_tokens_per_rank.npy",
        "num_tokens_per_expert.npy", "is_token_in_rank.npy",
        "rank%d_recv_src_idx.npy", "rank%d_recv_expert.npy",
        "rank%d_recv_x.npy", "expert_out.npy", "shared_out.npy", "output.npy",
    };
    size_t count = sizeof expected / sizeof expected[0];
    for (size_t i = 0; i < count; i++) {
        cr_assert_not_null(moe_dump_stages[i], "table ends at %zu", i);
        cr_assert_str_eq(moe_dump_stages[i], expected[i]);
    }
    cr_assert_null(moe_dump_stages[count], "table is longer than expected");
}
