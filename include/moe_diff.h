/*
 * moe_diff.h - comparing .npy arrays and stage dumps: `moe-ep compare`.
 *
 * A porter dumps every stage of the layer from their port and from
 * `moe-ep run --dump DIR`, then compares the two directories to find the
 * first stage where the port diverges. B is always the reference.
 *
 * Float arrays (float16, float32, float64, in any combination) match
 * element by element when they pass NumPy's isclose rule,
 *   |a - b| <= atol + rtol * |b|,
 * evaluated in double precision. Non-finite values match only when equal:
 * NaN matches NaN in the same position, whatever its sign and payload,
 * +inf matches +inf and -inf matches -inf. A NaN against a number is a
 * mismatch. With rtol = atol = 0 the rule is equality as numbers, so +0
 * matches -0. To compare the bytes, use `cmp`.
 *
 * Integer and bool arrays (int32, int64, uint8, bool, in any combination)
 * must be equal element by element, and the tolerances do not apply.
 * A float array against an integer or bool array, or arrays of different
 * shapes, is a mismatch, not an error.
 */
#ifndef MOE_DIFF_H
#define MOE_DIFF_H

#include "moe_npy.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

/* Default tolerances of `moe-ep compare`, for a float32 port whose
 * kernels sum in another order than moe-ep's. float32 rounds at 2^-24
 * (6e-8) relative, so rtol 1e-5 allows about 170 roundings, and atol
 * covers values that cancel to near zero.
 * NOTE: an estimate, not measured against a real GPU port. */
#define MOE_DIFF_DEFAULT_RTOL 1e-5
#define MOE_DIFF_DEFAULT_ATOL 1e-6

/* The stage files of a dump, in pipeline order, NULL-terminated. In
 * src/diff.c a comment beside each entry gives the array's shape and
 * dtype, in the dimension letters of moe_layer.h. M_r is the number of
 * rows rank r receives in dispatch.
 *
 * Entries that contain "%d" are per-rank files, a printf format for the
 * rank number. Their consecutive group repeats for r = 0, 1, ... in
 * numeric order (rank10 after rank9): rank0's three files, then rank1's.
 * Files not in this table come after output.npy, sorted by name. */
extern const char *const moe_dump_stages[];

/* Returns true when `name` is a per-rank file of moe_dump_stages, such as
 * "rank3_recv_x.npy", and stores its rank number. */
bool moe_dump_rank_file(const char *name, int64_t *rank);

/* Sorts .npy file names in the dump order above. Names of the form
 * rank<r>_recv_*.npy count as per-rank stages only when r is a decimal
 * number without leading zeros of at most 9 digits. */
void moe_dump_sort_names(const char **names, size_t count);

/* Tolerances of the isclose rule, each >= 0. */
struct moe_diff_tolerance {
    double rtol;
    double atol;
};

enum moe_diff_status {
    MOE_DIFF_MATCH,     /* every element matches */
    MOE_DIFF_VALUES,    /* at least one element does not match */
    MOE_DIFF_SHAPE,     /* the shapes differ */
    MOE_DIFF_KIND,      /* a float array against an integer or bool array */
    MOE_DIFF_MISSING_A, /* in a directory comparison, the file is only in B */
    MOE_DIFF_MISSING_B, /* the file is only in A */
};

/* One element as read from its file. */
struct moe_diff_value {
    double real;     /* a float element, converted exactly to double */
    int64_t integer; /* an integer or bool element */
    uint64_t bits;   /* the element's bit pattern in its own dtype */
};

/* The comparison of two arrays. The shape and dtype fields are set for
 * every status but the two MISSING ones, the error fields only for MATCH
 * and VALUES. */
struct moe_diff_result {
    enum moe_diff_status status;
    enum moe_npy_dtype dtype_a, dtype_b;
    int ndim_a, ndim_b;
    int64_t shape_a[MOE_NPY_MAX_DIMS], shape_b[MOE_NPY_MAX_DIMS];

    int exact;          /* 1 for integer and bool arrays */
    int bitwise_equal;  /* 1 when both dtypes and all bytes are equal */
    int64_t count;      /* elements compared */
    int64_t mismatches; /* elements that do not match */
    int64_t nan_mismatches; /* NaN against a number, part of mismatches */
    int64_t nan_matches;    /* positions where both are NaN */

    /* Over the pairs where neither value is NaN. max_abs_error is inf
     * where an infinity meets another value. For integer arrays only
     * max_abs_error is set, to the max difference, exact up to 2^53. */
    double max_abs_error;
    double max_rel_error; /* |a - b| / |b|, inf where b is 0 or infinite
                             and a differs */
    int64_t max_rel_index; /* flat index of max_rel_error */
    double max_rel_b;      /* B's value there */
    uint64_t max_ulp;     /* distance in float32 units in the last place */

    /* The first element that does not match, in C order, or -1. */
    int64_t first_index;
    int64_t first_coords[MOE_NPY_MAX_DIMS];
    struct moe_diff_value first_a, first_b;
};

/* Compares two arrays into *out. The float32 ULP distance is measured
 * after float16 values are converted exactly and float64 values rounded
 * to the nearest float32. Their bit patterns are mapped to integers that
 * grow with the value, with +0 and -0 both at 0. Neighboring floats are
 * then 1 apart, and so are the largest finite float and infinity. Always
 * returns 0. */
int moe_diff_arrays(const struct moe_npy_array *a,
                    const struct moe_npy_array *b,
                    const struct moe_diff_tolerance *tolerance,
                    struct moe_diff_result *out);

/* Reads two .npy files and compares them. Returns 0 with *out set, or the
 * error of moe_npy_read() (-EINVAL for a malformed file, -errno for one
 * that cannot be opened or read, -ENOMEM). */
int moe_diff_files(const char *path_a, const char *path_b,
                   const struct moe_diff_tolerance *tolerance,
                   struct moe_diff_result *out);

/* Prints one line that starts with name and describes the result. */
void moe_diff_print(FILE *out, const char *name,
                    const struct moe_diff_result *result);

/* Runs `moe-ep compare A B [--rtol R] [--atol A]`, where argv[0] is
 * "compare". Prints the results to stdout and errors to stderr, and
 * returns the exit status:
 *   0  everything matches;
 *   1  a mismatch: values, shape, dtype kind or a missing stage;
 *   2  invalid usage or input: a bad flag value, a path that does not
 *      exist or cannot be read, a malformed .npy file, a file against a
 *      directory;
 *   3  memory ran out or the output could not be written. */
int moe_compare_main(int argc, char **argv);

#endif
