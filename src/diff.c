/*
 * diff.c - comparing .npy arrays and files, and the order of dump stages
 * (see moe_diff.h). src/compare.c builds the command on these.
 */
#include "moe_diff.h"
#include "moe_dtype.h"

#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- dump order ------------------------------------------------------- */

/* The dump stages in pipeline order. src/dump.c writes these files for
 * `moe-ep run --dump`, so a stage added there belongs here too, at its
 * place in the pipeline. */
const char *const moe_dump_stages[] = {
    "tokens.npy",                /* (T, H) float32, the layer input */
    "router_logits.npy",         /* (T, E) float32 */
    "router_scores.npy",         /* (T, E) float32 */
    "topk_ids.npy",              /* (T, K) int32 */
    "topk_weights.npy",          /* (T, K) float32 */
    "topk_kept.npy",             /* (T, K) bool, 0 where the capacity
                                    dropped the assignment */
    "num_tokens_per_rank.npy",   /* (R,) int32 */
    "num_tokens_per_expert.npy", /* (E,) int32 */
    "is_token_in_rank.npy",      /* (T, R) bool */
    "rank%d_recv_src_idx.npy",   /* (M_r,) int32, per rank r */
    "rank%d_recv_expert.npy",    /* (M_r,) int32, per rank r */
    "rank%d_recv_x.npy",         /* (M_r, H) float32, per rank r */
    "expert_out.npy",            /* (T, K, H) float32 */
    "shared_out.npy",            /* (T, H) float32, only for families with
                                    a shared expert */
    "output.npy",                /* (T, H) float32, the layer output */
    NULL,
};

/* Max digits of the rank number in a per-rank file name. */
enum { DUMP_MAX_RANK_DIGITS = 9 };

/* Sort key of a file in the dump order. A file of the table sorts by its
 * table index. Every per-rank file has the index of the first per-rank
 * entry, then sorts by rank and by its entry within the group. Other files
 * get the table length and sort by name. */
struct dump_key {
    int stage;
    int64_t rank;
    int entry;
};

/* Matches name against a per-rank pattern such as "rank%d_recv_x.npy" and
 * stores the rank number. */
static bool match_rank_pattern(const char *pattern, const char *name,
                               int64_t *rank)
{
    const char *marker = strstr(pattern, "%d");
    size_t before = (size_t)(marker - pattern);
    const char *after = marker + 2;
    if (strncmp(name, pattern, before) != 0)
        return false;

    const char *digits = name + before;
    size_t length = strspn(digits, "0123456789");
    if (length == 0 || length > DUMP_MAX_RANK_DIGITS ||
        (digits[0] == '0' && length > 1))
        return false;
    if (strcmp(digits + length, after) != 0)
        return false;

    int64_t value = 0;
    for (size_t i = 0; i < length; i++)
        value = value * 10 + (digits[i] - '0');
    *rank = value;
    return true;
}

static struct dump_key dump_key_of(const char *name)
{
    int first_rank_entry = -1;
    int i;
    for (i = 0; moe_dump_stages[i] != NULL; i++) {
        const char *pattern = moe_dump_stages[i];
        if (strstr(pattern, "%d") == NULL) {
            if (strcmp(pattern, name) == 0)
                return (struct dump_key){i, 0, 0};
            continue;
        }
        if (first_rank_entry < 0)
            first_rank_entry = i;
        int64_t rank;
        if (match_rank_pattern(pattern, name, &rank))
            return (struct dump_key){first_rank_entry, rank,
                                     i - first_rank_entry};
    }
    return (struct dump_key){i, 0, 0};
}

bool moe_dump_rank_file(const char *name, int64_t *rank)
{
    for (int i = 0; moe_dump_stages[i] != NULL; i++)
        if (strstr(moe_dump_stages[i], "%d") != NULL &&
            match_rank_pattern(moe_dump_stages[i], name, rank))
            return true;
    return false;
}

static int compare_dump_names(const void *left, const void *right)
{
    const char *a = *(const char *const *)left;
    const char *b = *(const char *const *)right;
    struct dump_key ka = dump_key_of(a), kb = dump_key_of(b);
    if (ka.stage != kb.stage)
        return ka.stage < kb.stage ? -1 : 1;
    if (ka.rank != kb.rank)
        return ka.rank < kb.rank ? -1 : 1;
    if (ka.entry != kb.entry)
        return ka.entry < kb.entry ? -1 : 1;
    return strcmp(a, b);
}

void moe_dump_sort_names(const char **names, size_t count)
{
    qsort(names, count, sizeof names[0], compare_dump_names);
}

/* ---- comparing arrays ------------------------------------------------- */

static bool is_float(enum moe_npy_dtype dtype)
{
    return moe_npy_dtype_kind(dtype) == 'f';
}

/* Loads element i of a float array, exactly, and its bit pattern. */
static double load_real(const struct moe_npy_array *array, int64_t i,
                        uint64_t *bits)
{
    const uint8_t *bytes = array->data;
    switch (array->dtype) {
    case MOE_NPY_F16: {
        uint16_t raw;
        memcpy(&raw, bytes + 2 * i, sizeof raw);
        *bits = raw;
        return moe_f16_to_f32(raw);
    }
    case MOE_NPY_F32: {
        uint32_t raw;
        float value;
        memcpy(&raw, bytes + 4 * i, sizeof raw);
        memcpy(&value, &raw, sizeof value);
        *bits = raw;
        return value;
    }
    default: {
        uint64_t raw;
        double value;
        memcpy(&raw, bytes + 8 * i, sizeof raw);
        memcpy(&value, &raw, sizeof value);
        *bits = raw;
        return value;
    }
    }
}

/* Loads element i of an integer or bool array. */
static int64_t load_integer(const struct moe_npy_array *array, int64_t i)
{
    const uint8_t *bytes = array->data;
    switch (array->dtype) {
    case MOE_NPY_I32: {
        int32_t value;
        memcpy(&value, bytes + 4 * i, sizeof value);
        return value;
    }
    case MOE_NPY_I64: {
        int64_t value;
        memcpy(&value, bytes + 8 * i, sizeof value);
        return value;
    }
    default: /* bool and uint8 */
        return bytes[i];
    }
}

/* Maps a float32 bit pattern onto a line of integers that is monotonic in
 * the value: +0 and -0 both map to 0, and neighboring floats to
 * neighboring integers. */
static int64_t f32_ulp_position(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    int64_t magnitude = bits & 0x7fffffffu;
    return (bits & 0x80000000u) ? -magnitude : magnitude;
}

static void unravel_index(int64_t index, int ndim, const int64_t *shape,
                          int64_t *coords)
{
    for (int d = ndim - 1; d >= 0; d--) {
        coords[d] = shape[d] > 0 ? index % shape[d] : 0;
        index = shape[d] > 0 ? index / shape[d] : 0;
    }
}

/* Applies the isclose rule to one pair and updates the error maxima. */
static bool compare_reals(double a, double b, int64_t index,
                          const struct moe_diff_tolerance *tolerance,
                          struct moe_diff_result *out)
{
    if (isnan(a) || isnan(b)) {
        if (isnan(a) && isnan(b)) {
            out->nan_matches++;
            return true;
        }
        out->nan_mismatches++;
        return false;
    }

    /* a == b covers equal infinities, whose difference would be NaN. */
    double abs_error = a == b ? 0.0 : fabs(a - b);
    double rel_error = abs_error == 0.0 ? 0.0 : abs_error / fabs(b);
    if (isnan(rel_error)) /* inf / inf, where b is infinite */
        rel_error = INFINITY;
    int64_t ulp_a = f32_ulp_position((float)a);
    int64_t ulp_b = f32_ulp_position((float)b);
    uint64_t ulp = (uint64_t)(ulp_a > ulp_b ? ulp_a - ulp_b : ulp_b - ulp_a);

    if (abs_error > out->max_abs_error)
        out->max_abs_error = abs_error;
    if (rel_error > out->max_rel_error) {
        out->max_rel_error = rel_error;
        out->max_rel_index = index;
        out->max_rel_b = b;
    }
    if (ulp > out->max_ulp)
        out->max_ulp = ulp;

    /* numpy.isclose lets a non-finite value match only an equal one,
     * although inf <= atol + rtol * inf would hold. */
    if (!isfinite(a) || !isfinite(b))
        return a == b;
    return abs_error <= tolerance->atol + tolerance->rtol * fabs(b);
}

static void compare_float_elements(const struct moe_npy_array *a,
                                   const struct moe_npy_array *b,
                                   const struct moe_diff_tolerance *tolerance,
                                   struct moe_diff_result *out)
{
    for (int64_t i = 0; i < a->count; i++) {
        uint64_t bits_a, bits_b;
        double value_a = load_real(a, i, &bits_a);
        double value_b = load_real(b, i, &bits_b);
        if (compare_reals(value_a, value_b, i, tolerance, out))
            continue;

        if (out->mismatches++ == 0) {
            out->first_index = i;
            out->first_a = (struct moe_diff_value){.real = value_a,
                                                   .bits = bits_a};
            out->first_b = (struct moe_diff_value){.real = value_b,
                                                   .bits = bits_b};
        }
    }
}

static void compare_integer_elements(const struct moe_npy_array *a,
                                     const struct moe_npy_array *b,
                                     struct moe_diff_result *out)
{
    uint64_t max_difference = 0;
    for (int64_t i = 0; i < a->count; i++) {
        int64_t value_a = load_integer(a, i);
        int64_t value_b = load_integer(b, i);
        if (value_a == value_b)
            continue;

        /* The difference of two int64 values fits in uint64. */
        uint64_t difference = value_a > value_b
                                  ? (uint64_t)value_a - (uint64_t)value_b
                                  : (uint64_t)value_b - (uint64_t)value_a;
        if (difference > max_difference)
            max_difference = difference;
        if (out->mismatches++ == 0) {
            out->first_index = i;
            out->first_a = (struct moe_diff_value){
                .integer = value_a, .bits = (uint64_t)value_a};
            out->first_b = (struct moe_diff_value){
                .integer = value_b, .bits = (uint64_t)value_b};
        }
    }
    out->max_abs_error = (double)max_difference;
}

int moe_diff_arrays(const struct moe_npy_array *a,
                    const struct moe_npy_array *b,
                    const struct moe_diff_tolerance *tolerance,
                    struct moe_diff_result *out)
{
    memset(out, 0, sizeof *out);
    out->first_index = -1;
    out->dtype_a = a->dtype;
    out->dtype_b = b->dtype;
    out->ndim_a = a->ndim;
    out->ndim_b = b->ndim;
    memcpy(out->shape_a, a->shape, sizeof out->shape_a);
    memcpy(out->shape_b, b->shape, sizeof out->shape_b);

    if (is_float(a->dtype) != is_float(b->dtype)) {
        out->status = MOE_DIFF_KIND;
        return 0;
    }
    bool same_shape = a->ndim == b->ndim;
    for (int d = 0; d < a->ndim && same_shape; d++)
        same_shape = a->shape[d] == b->shape[d];
    if (!same_shape) {
        out->status = MOE_DIFF_SHAPE;
        return 0;
    }

    out->count = a->count;
    out->exact = !is_float(a->dtype);
    out->bitwise_equal =
        a->dtype == b->dtype &&
        memcmp(a->data, b->data,
               (size_t)a->count * moe_npy_dtype_size(a->dtype)) == 0;
    if (out->exact)
        compare_integer_elements(a, b, out);
    else
        compare_float_elements(a, b, tolerance, out);

    if (out->first_index >= 0)
        unravel_index(out->first_index, a->ndim, a->shape, out->first_coords);
    out->status = out->mismatches > 0 ? MOE_DIFF_VALUES : MOE_DIFF_MATCH;
    return 0;
}

int moe_diff_files(const char *path_a, const char *path_b,
                   const struct moe_diff_tolerance *tolerance,
                   struct moe_diff_result *out)
{
    /* Both arrays are in memory at once, so each may take 40% of it. A
     * header that declares more is bad input rather than out of memory. */
    double memory = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    uint64_t limit = memory > 0 ? (uint64_t)(0.4 * memory) : UINT64_MAX;
    struct moe_npy_array a, b;
    int rc = moe_npy_read(path_a, limit, &a);
    if (rc < 0)
        return rc;
    rc = moe_npy_read(path_b, limit, &b);
    if (rc < 0) {
        moe_npy_array_free(&a);
        return rc;
    }
    rc = moe_diff_arrays(&a, &b, tolerance, out);
    moe_npy_array_free(&a);
    moe_npy_array_free(&b);
    return rc;
}

/* ---- printing --------------------------------------------------------- */

static void print_value(FILE *out, enum moe_npy_dtype dtype,
                        const struct moe_diff_value *value)
{
    switch (dtype) {
    case MOE_NPY_F16:
        fprintf(out, "%.9g (0x%04" PRIx64 ")", value->real, value->bits);
        break;
    case MOE_NPY_F32:
        fprintf(out, "%.9g (0x%08" PRIx64 ")", value->real, value->bits);
        break;
    case MOE_NPY_F64:
        fprintf(out, "%.17g (0x%016" PRIx64 ")", value->real, value->bits);
        break;
    case MOE_NPY_BOOL:
        fprintf(out, "%s", value->integer ? "True" : "False");
        break;
    default:
        fprintf(out, "%" PRId64, value->integer);
        break;
    }
}

static void print_dtypes_and_shape(FILE *out, const struct moe_diff_result *r)
{
    char shape[256];
    moe_npy_format_shape(r->ndim_b, r->shape_b, shape, sizeof shape);
    if (r->dtype_a == r->dtype_b)
        fprintf(out, "%s %s", moe_npy_dtype_name(r->dtype_b), shape);
    else
        fprintf(out, "%s in A, %s in B, shape %s",
                moe_npy_dtype_name(r->dtype_a), moe_npy_dtype_name(r->dtype_b),
                shape);
}

static void print_first_mismatch(FILE *out, const struct moe_diff_result *r)
{
    char coords[256];
    moe_npy_format_shape(r->ndim_b, r->first_coords, coords, sizeof coords);
    fprintf(out, ", first at %s (flat index %" PRId64 "): A ", coords,
            r->first_index);
    print_value(out, r->dtype_a, &r->first_a);
    fprintf(out, ", B ");
    print_value(out, r->dtype_b, &r->first_b);
}

static void print_values_result(FILE *out, const struct moe_diff_result *r)
{
    fprintf(out, "%s, ", r->status == MOE_DIFF_MATCH ? "match" : "MISMATCH");
    print_dtypes_and_shape(out, r);
    if (r->bitwise_equal) {
        fprintf(out, ", bitwise equal");
        if (r->nan_matches > 0)
            fprintf(out, ", %" PRId64 " NaN in both", r->nan_matches);
        return;
    }

    if (r->exact && r->mismatches == 0) {
        fprintf(out, ", equal values");
        return;
    }
    if (r->exact) {
        fprintf(out, ", %" PRId64 " of %" PRId64 " elements differ, max abs "
                "difference %.0f", r->mismatches, r->count, r->max_abs_error);
        print_first_mismatch(out, r);
        return;
    }

    if (r->mismatches > 0)
        fprintf(out, ", %" PRId64 " of %" PRId64 " elements beyond tolerance",
                r->mismatches, r->count);
    if (r->nan_mismatches > 0)
        fprintf(out, " (%" PRId64 " NaN against a number)", r->nan_mismatches);
    fprintf(out, ", max abs error %.3g, max rel error %.3g", r->max_abs_error,
            r->max_rel_error);
    /* A large relative error where B is near zero is normal for sums that
     * cancel, so print where it is. */
    if (r->max_rel_error > 0) {
        char coords[256];
        int64_t at[MOE_NPY_MAX_DIMS];
        unravel_index(r->max_rel_index, r->ndim_b, r->shape_b, at);
        moe_npy_format_shape(r->ndim_b, at, coords, sizeof coords);
        fprintf(out, " at %s where B is %.3g", coords, r->max_rel_b);
    }
    fprintf(out, ", max ulp %" PRIu64, r->max_ulp);
    if (r->nan_matches > 0)
        fprintf(out, ", %" PRId64 " NaN in both", r->nan_matches);
    if (r->mismatches > 0)
        print_first_mismatch(out, r);
}

void moe_diff_print(FILE *out, const char *name,
                    const struct moe_diff_result *r)
{
    char shape_a[256], shape_b[256];
    fprintf(out, "%s: ", name);
    switch (r->status) {
    case MOE_DIFF_MATCH:
    case MOE_DIFF_VALUES:
        print_values_result(out, r);
        break;
    case MOE_DIFF_SHAPE:
        moe_npy_format_shape(r->ndim_a, r->shape_a, shape_a, sizeof shape_a);
        moe_npy_format_shape(r->ndim_b, r->shape_b, shape_b, sizeof shape_b);
        fprintf(out, "MISMATCH, shape %s in A, %s in B", shape_a, shape_b);
        break;
    case MOE_DIFF_KIND:
        fprintf(out, "MISMATCH, dtype %s in A, %s in B: a float array cannot "
                "be compared with an integer or bool array",
                moe_npy_dtype_name(r->dtype_a), moe_npy_dtype_name(r->dtype_b));
        break;
    case MOE_DIFF_MISSING_A:
        fprintf(out, "MISMATCH, missing in A");
        break;
    case MOE_DIFF_MISSING_B:
        fprintf(out, "MISMATCH, missing in B");
        break;
    }
    fprintf(out, "\n");
}
