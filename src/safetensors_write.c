/*
 * safetensors_write.c - writing safetensors files and shard indexes, and
 * FP8 block quantisation (see moe_safetensors.h).
 */
#include "moe_safetensors_internal.h"
#include "moe_error.h"
#include "moe_file.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- writing ---------------------------------------------------------- */

static int check_tensor_out(const struct moe_st_tensor_out *t, const char *path,
                            int i, uint64_t *bytes)
{
    if (t->name == NULL)
        return moe_fail(-EINVAL, "%s: tensor %d has no name", path, i);
    if (strcmp(t->name, ST_METADATA_KEY) == 0 || !st_is_utf8(t->name))
        return moe_fail(-EINVAL,
                        "%s: tensor %d: invalid name '%.100s'; names must be "
                        "UTF-8 text without control characters, other than "
                        "\"__metadata__\"",
                        path, i, t->name);
    if ((unsigned)t->dtype >= MOE_DTYPE_COUNT)
        return moe_fail(-EINVAL, "%s: tensor '%s': invalid dtype %d", path,
                        t->name, (int)t->dtype);
    if (t->ndim < 0 || t->ndim > MOE_ST_MAX_DIMS)
        return moe_fail(-EINVAL,
                        "%s: tensor '%s': %d dimensions; expected 0 to %d",
                        path, t->name, t->ndim, MOE_ST_MAX_DIMS);

    char shape[256];
    st_format_shape(t->shape, t->ndim, shape, sizeof shape);
    for (int d = 0; d < t->ndim; d++)
        if (t->shape[d] < 0 || (double)t->shape[d] > MAX_JSON_INTEGER)
            return moe_fail(-EINVAL,
                            "%s: tensor '%s': invalid shape %s; dimensions "
                            "must be in 0..2^53",
                            path, t->name, shape);

    int rc = st_tensor_bytes(t->dtype, t->shape, t->ndim, bytes);
    if (rc == -EOVERFLOW || (rc == 0 && (double)*bytes > MAX_JSON_INTEGER))
        return moe_fail(-EINVAL, "%s: tensor '%s': shape %s of %s is too large",
                        path, t->name, shape, moe_dtype_name(t->dtype));
    if (rc < 0)
        return moe_fail(-EINVAL,
                        "%s: tensor '%s': shape %s of %s is not a whole number "
                        "of bytes",
                        path, t->name, shape, moe_dtype_name(t->dtype));
    if (*bytes > 0 && t->data == NULL)
        return moe_fail(-EINVAL, "%s: tensor '%s': data is NULL", path,
                        t->name);
    return 0;
}

static int compare_strings(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Rejects a name that appears twice in names[0..count). */
static int check_unique(const char *const *names, int count, const char *path,
                        const char *what)
{
    if (count < 2)
        return 0;
    const char **sorted = malloc((size_t)count * sizeof *sorted);
    if (sorted == NULL)
        return moe_fail(-ENOMEM, "%s: out of memory", path);
    memcpy(sorted, names, (size_t)count * sizeof *sorted);
    qsort(sorted, (size_t)count, sizeof *sorted, compare_strings);
    int rc = 0;
    for (int i = 1; i < count && rc == 0; i++)
        if (strcmp(sorted[i - 1], sorted[i]) == 0)
            rc = moe_fail(-EINVAL, "%s: %s '%s' appears twice", path, what,
                          sorted[i]);
    free(sorted);
    return rc;
}

/* Adds a JSON number printed from an exact integer. cJSON would print
 * large values in exponent notation, which strict readers reject. */
static bool add_integer(cJSON *array, uint64_t value)
{
    char text[24];
    snprintf(text, sizeof text, "%" PRIu64, value);
    cJSON *item = cJSON_CreateRaw(text);
    return item != NULL && cJSON_AddItemToArray(array, item);
}

static bool add_tensor_json(cJSON *root, const struct moe_st_tensor_out *t,
                            uint64_t begin, uint64_t end)
{
    cJSON *entry = cJSON_CreateObject();
    if (entry == NULL)
        return false;
    if (!cJSON_AddItemToObject(root, t->name, entry)) {
        cJSON_Delete(entry);
        return false;
    }
    if (cJSON_AddStringToObject(entry, "dtype", moe_dtype_name(t->dtype)) ==
        NULL)
        return false;
    cJSON *shape = cJSON_AddArrayToObject(entry, "shape");
    if (shape == NULL)
        return false;
    for (int d = 0; d < t->ndim; d++)
        if (!add_integer(shape, (uint64_t)t->shape[d]))
            return false;
    cJSON *offsets = cJSON_AddArrayToObject(entry, "data_offsets");
    return offsets != NULL && add_integer(offsets, begin) &&
           add_integer(offsets, end);
}

/* Sorts tensor indices by element size, largest first, keeping the given
 * order among equal sizes (insertion sort: writers pass few tensors). */
static void order_by_element_size(const struct moe_st_tensor_out *tensors,
                                  int count, int *order)
{
    for (int i = 0; i < count; i++) {
        int k = i;
        unsigned bits = moe_dtype_bits(tensors[i].dtype);
        while (k > 0 && moe_dtype_bits(tensors[order[k - 1]].dtype) < bits) {
            order[k] = order[k - 1];
            k--;
        }
        order[k] = i;
    }
}

/* Builds the padded header text for the tensors in `order`. */
static int build_header(const char *path, const struct moe_st_tensor_out *tensors,
                        const int *order, const uint64_t *bytes, int count,
                        const char *metadata_format, char **out,
                        size_t *out_len)
{
    cJSON *root = cJSON_CreateObject();
    bool ok = root != NULL;
    if (ok && metadata_format != NULL) {
        cJSON *metadata = cJSON_AddObjectToObject(root, ST_METADATA_KEY);
        ok = metadata != NULL &&
             cJSON_AddStringToObject(metadata, "format", metadata_format) != NULL;
    }
    uint64_t offset = 0;
    for (int k = 0; ok && k < count; k++) {
        int i = order[k];
        ok = add_tensor_json(root, &tensors[i], offset, offset + bytes[i]);
        offset += bytes[i];
    }
    char *json = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    if (json == NULL)
        return moe_fail(-ENOMEM, "%s: out of memory building the header", path);

    /* Pad with spaces so that the data buffer starts at a multiple of 8. */
    size_t len = strlen(json);
    size_t padded = len + (8 - (8 + len) % 8) % 8;
    char *header = malloc(padded);
    if (header == NULL) {
        free(json);
        return moe_fail(-ENOMEM, "%s: out of memory building the header", path);
    }
    memcpy(header, json, len);
    memset(header + len, ' ', padded - len);
    free(json);
    *out = header;
    *out_len = padded;
    return 0;
}

int moe_st_write(const char *path, const struct moe_st_tensor_out *tensors,
                 int count, const char *metadata_format)
{
    if (count < 0 || count > INT_MAX - 2 || (count > 0 && tensors == NULL))
        return moe_fail(-EINVAL, "%s: invalid tensor count %d", path, count);
    if (metadata_format != NULL && !st_is_utf8(metadata_format))
        return moe_fail(-EINVAL, "%s: metadata format is not UTF-8 text",
                        path);

    size_t n = count > 0 ? (size_t)count : 1;
    uint64_t *bytes = calloc(n, sizeof *bytes);
    int *order = calloc(n, sizeof *order);
    const char **names = calloc(n, sizeof *names);
    struct moe_file_part *parts = calloc(n + 2, sizeof *parts);
    char *header = NULL;
    int rc = 0;
    if (bytes == NULL || order == NULL || names == NULL || parts == NULL)
        rc = moe_fail(-ENOMEM, "%s: out of memory", path);

    for (int i = 0; rc == 0 && i < count; i++) {
        rc = check_tensor_out(&tensors[i], path, i, &bytes[i]);
        names[i] = tensors[i].name;
    }
    if (rc == 0)
        rc = check_unique(names, count, path, "tensor name");

    uint64_t total = 0;
    for (int i = 0; rc == 0 && i < count; i++) {
        if (bytes[i] > (uint64_t)MAX_JSON_INTEGER - total)
            rc = moe_fail(-EINVAL, "%s: tensors total more than 2^53 bytes",
                          path);
        else
            total += bytes[i];
    }

    size_t header_len = 0;
    if (rc == 0) {
        order_by_element_size(tensors, count, order);
        rc = build_header(path, tensors, order, bytes, count, metadata_format,
                          &header, &header_len);
    }

    if (rc == 0) {
        uint8_t length_field[8];
        for (int i = 0; i < 8; i++)
            length_field[i] = (uint8_t)((uint64_t)header_len >> (8 * i));
        parts[0] = (struct moe_file_part){length_field, sizeof length_field};
        parts[1] = (struct moe_file_part){header, header_len};
        for (int k = 0; k < count; k++)
            parts[2 + k] = (struct moe_file_part){tensors[order[k]].data,
                                                  (size_t)bytes[order[k]]};
        rc = moe_write_file(path, parts, count + 2);
    }

    free(header);
    free(parts);
    free(names);
    free(order);
    free(bytes);
    return rc;
}

static bool valid_shard_name(const char *name)
{
    return name != NULL && name[0] != '\0' && strchr(name, '/') == NULL &&
           strcmp(name, ".") != 0 && strcmp(name, "..") != 0 && st_is_utf8(name);
}

int moe_st_write_index(const char *path, const char *const *names,
                       const char *const *files, int count,
                       uint64_t total_size)
{
    if (count < 0 || (count > 0 && (names == NULL || files == NULL)))
        return moe_fail(-EINVAL, "%s: invalid entry count %d", path, count);
    for (int i = 0; i < count; i++) {
        if (names[i] == NULL || names[i][0] == '\0' || !st_is_utf8(names[i]))
            return moe_fail(-EINVAL,
                            "%s: entry %d: invalid tensor name; expected "
                            "non-empty UTF-8 text",
                            path, i);
        if (!valid_shard_name(files[i]))
            return moe_fail(-EINVAL,
                            "%s: tensor '%s': invalid shard file name '%.100s'; "
                            "expected a plain file name without '/'",
                            path, names[i],
                            files[i] != NULL ? files[i] : "(null)");
    }
    int rc = check_unique(names, count, path, "tensor name");
    if (rc < 0)
        return rc;

    cJSON *root = cJSON_CreateObject();
    cJSON *metadata = cJSON_AddObjectToObject(root, "metadata");
    bool ok = metadata != NULL;
    if (ok) {
        char text[24];
        snprintf(text, sizeof text, "%" PRIu64, total_size);
        ok = cJSON_AddRawToObject(metadata, "total_size", text) != NULL;
    }
    cJSON *map = ok ? cJSON_AddObjectToObject(root, "weight_map") : NULL;
    ok = map != NULL;
    for (int i = 0; ok && i < count; i++)
        ok = cJSON_AddStringToObject(map, names[i], files[i]) != NULL;
    char *json = ok ? cJSON_Print(root) : NULL;
    cJSON_Delete(root);
    if (json == NULL)
        return moe_fail(-ENOMEM, "%s: out of memory building the index", path);

    struct moe_file_part parts[2] = {{json, strlen(json)}, {"\n", 1}};
    rc = moe_write_file(path, parts, 2);
    free(json);
    return rc;
}

/* ---- FP8 block quantisation ------------------------------------------- */

void moe_fp8_quantize(const float *w, int64_t rows, int64_t cols,
                      int64_t block_rows, int64_t block_cols, uint8_t *q,
                      float *scale_inv)
{
    if (rows < 0 || cols < 0 || block_rows < 1 || block_cols < 1)
        return;
    int64_t scale_cols = st_block_count(cols, block_cols);

    for (int64_t i0 = 0; i0 < rows; i0 += block_rows) {
        int64_t i1 = rows - i0 > block_rows ? i0 + block_rows : rows;
        for (int64_t j0 = 0; j0 < cols; j0 += block_cols) {
            int64_t j1 = cols - j0 > block_cols ? j0 + block_cols : cols;

            /* A NaN compares false and so never becomes amax. */
            float amax = 0.0f;
            for (int64_t i = i0; i < i1; i++)
                for (int64_t j = j0; j < j1; j++)
                    if (fabsf(w[i * cols + j]) > amax)
                        amax = fabsf(w[i * cols + j]);

            float scale = amax == 0.0f ? 1.0f : amax / F8E4M3_MAX;
            /* A tiny amax can make amax / 448 underflow to 0; the smallest
             * positive float keeps w / scale finite (at most 448). */
            if (scale == 0.0f)
                scale = 0x1p-149f;
            scale_inv[(i0 / block_rows) * scale_cols + j0 / block_cols] = scale;

            for (int64_t i = i0; i < i1; i++)
                for (int64_t j = j0; j < j1; j++)
                    q[i * cols + j] = moe_f32_to_f8e4m3(w[i * cols + j] / scale);
        }
    }
}
