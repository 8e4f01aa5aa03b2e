/*
 * safetensors.c - safetensors models: lazy, mmap-based reading with full
 * header validation and conversion to float32 (see moe_safetensors.h).
 * safetensors_write.c writes them.
 *
 * Headers and the index are parsed with cJSON, which stores numbers as
 * doubles. Integers in headers are therefore accepted only up to 2^53,
 * where doubles are still exact. That allows 8 PiB of data.
 */
#include "moe_safetensors_internal.h"
#include "moe_error.h"
#include "moe_file.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c copies little-endian tensor data unchanged and needs a little-endian host"
#endif

static const char single_file_name[] = "model.safetensors";
static const char index_file_name[] = "model.safetensors.index.json";
static const char scale_suffix[] = "_scale_inv";

/* The index is read into memory whole. At roughly 100 bytes per
 * weight_map entry (an estimate), the limit allows about a million. */
#define MAX_INDEX_BYTES MOE_ST_MAX_HEADER_BYTES

/* ---- model structures ------------------------------------------------- */

/* One tensor entry of a validated header. */
struct st_tensor {
    char *name;
    enum moe_dtype dtype;
    int ndim;
    int64_t shape[MOE_ST_MAX_DIMS];
    uint64_t begin, end; /* byte range in the data buffer */
};

/* One safetensors file of the model. Until `loaded`, only `path` is set. */
struct st_file {
    char *path;
    bool loaded;
    uint8_t *map; /* the whole file, mapped read-only */
    size_t map_bytes;
    const uint8_t *data; /* the data buffer, map + 8 + header length */
    uint64_t data_bytes;
    struct st_tensor *tensors; /* sorted by name */
    size_t tensor_count;
};

/* One weight_map entry of the index: tensor name -> files[file]. */
struct st_index_entry {
    char *name;
    int file;
};

struct moe_st_model {
    char *index_path; /* NULL for a single-file model */
    struct st_file *files;
    int file_count;
    struct st_index_entry *entries; /* sorted by name */
    size_t entry_count;
    int64_t block_rows, block_cols;
};

/* ---- small helpers ---------------------------------------------------- */

static char *join_path(const char *dir, const char *name)
{
    size_t dir_len = strlen(dir), name_len = strlen(name);
    char *path = malloc(dir_len + name_len + 2);
    if (path == NULL)
        return NULL;
    memcpy(path, dir, dir_len);
    path[dir_len] = '/';
    memcpy(path + dir_len + 1, name, name_len + 1);
    return path;
}

static char *concat(const char *a, const char *b)
{
    size_t a_len = strlen(a), b_len = strlen(b);
    char *s = malloc(a_len + b_len + 1);
    if (s == NULL)
        return NULL;
    memcpy(s, a, a_len);
    memcpy(s + a_len, b, b_len + 1);
    return s;
}

/* Formats a shape as "[2, 3]" into buf. */
const char *st_format_shape(const int64_t *shape, int ndim, char *buf, size_t size)
{
    size_t used = (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < ndim && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, "%s%" PRId64,
                                 i > 0 ? ", " : "", shape[i]);
    if (used < size)
        snprintf(buf + used, size - used, "]");
    return buf;
}

/* Returns the offset of the first byte in s[0..len) that breaks UTF-8 or
 * is a control character other than tab, newline and carriage return, or
 * len when there is none. Overlong forms, surrogates and code points above
 * U+10FFFF are invalid. */
static size_t find_invalid_utf8(const uint8_t *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        uint8_t c = s[i];
        if (c < 0x80) {
            if (c < 0x20 && c != '\t' && c != '\n' && c != '\r')
                return i;
            i++;
            continue;
        }

        size_t extra;
        uint8_t low = 0x80, high = 0xbf; /* allowed range of s[i + 1] */
        if (c >= 0xc2 && c <= 0xdf) {
            extra = 1;
        } else if (c >= 0xe0 && c <= 0xef) {
            extra = 2;
            if (c == 0xe0)
                low = 0xa0; /* overlong below U+0800 */
            if (c == 0xed)
                high = 0x9f; /* surrogates U+D800..U+DFFF */
        } else if (c >= 0xf0 && c <= 0xf4) {
            extra = 3;
            if (c == 0xf0)
                low = 0x90; /* overlong below U+10000 */
            if (c == 0xf4)
                high = 0x8f; /* above U+10FFFF */
        } else {
            return i;
        }

        if (len - i <= extra)
            return i;
        if (s[i + 1] < low || s[i + 1] > high)
            return i;
        for (size_t k = 2; k <= extra; k++)
            if (s[i + k] < 0x80 || s[i + k] > 0xbf)
                return i;
        i += extra + 1;
    }
    return len;
}

bool st_is_utf8(const char *s)
{
    size_t len = strlen(s);
    return find_invalid_utf8((const uint8_t *)s, len) == len;
}

/* Computes the byte size of a tensor of `dtype` and `shape` without
 * overflow. Returns 0, or -EOVERFLOW when the size does not fit 64 bits,
 * or -EINVAL when it is not a whole number of bytes (sub-byte dtypes). */
int st_tensor_bytes(enum moe_dtype dtype, const int64_t *shape, int ndim,
                    uint64_t *bytes)
{
    uint64_t elements = 1;
    bool empty = false;
    for (int i = 0; i < ndim; i++)
        if (shape[i] == 0)
            empty = true;
    if (empty) {
        *bytes = 0;
        return 0;
    }
    for (int i = 0; i < ndim; i++) {
        uint64_t dim = (uint64_t)shape[i];
        if (elements > UINT64_MAX / dim)
            return -EOVERFLOW;
        elements *= dim;
    }

    uint64_t bits = moe_dtype_bits(dtype);
    if (elements > UINT64_MAX / bits)
        return -EOVERFLOW;
    if (elements * bits % 8 != 0)
        return -EINVAL;
    *bytes = elements * bits / 8;
    return 0;
}

static int compare_tensor_names(const void *a, const void *b)
{
    return strcmp(((const struct st_tensor *)a)->name,
                  ((const struct st_tensor *)b)->name);
}

static int compare_entry_names(const void *a, const void *b)
{
    return strcmp(((const struct st_index_entry *)a)->name,
                  ((const struct st_index_entry *)b)->name);
}

/* ---- header validation ------------------------------------------------ */

/* Reads a JSON number that must be an integer in [0, 2^53]. `what` names
 * the field in messages, e.g. "shape[1]". */
static int json_to_u64(const cJSON *item, const char *path, const char *name,
                       const char *what, uint64_t *value)
{
    if (!cJSON_IsNumber(item))
        return moe_fail(-EINVAL, "%s: tensor '%s': %s is not a number", path,
                        name, what);
    double d = item->valuedouble;
    if (!isfinite(d) || d != floor(d))
        return moe_fail(-EINVAL, "%s: tensor '%s': %s is %.17g, not an integer",
                        path, name, what, d);
    if (d < 0)
        return moe_fail(-EINVAL, "%s: tensor '%s': %s is %.17g, a negative value",
                        path, name, what, d);
    if (d > MAX_JSON_INTEGER)
        return moe_fail(-EINVAL,
                        "%s: tensor '%s': %s is %.17g, too large (above 2^53)",
                        path, name, what, d);
    *value = (uint64_t)d;
    return 0;
}

static int parse_dtype(const cJSON *item, const char *path, const char *name,
                       enum moe_dtype *dtype)
{
    if (!cJSON_IsString(item))
        return moe_fail(-EINVAL, "%s: tensor '%s': \"dtype\" is not a string",
                        path, name);
    if (moe_dtype_from_name(item->valuestring, dtype) == 0)
        return 0;

    char names[256];
    size_t used = 0;
    names[0] = '\0';
    for (int i = 0; i < MOE_DTYPE_COUNT && used < sizeof names; i++)
        used += (size_t)snprintf(names + used, sizeof names - used, "%s%s",
                                 i > 0 ? ", " : "",
                                 moe_dtype_name((enum moe_dtype)i));
    return moe_fail(-EINVAL,
                    "%s: tensor '%s': unknown dtype '%.40s'; safetensors "
                    "dtypes are %s",
                    path, name, item->valuestring, names);
}

static int parse_shape(const cJSON *item, const char *path, const char *name,
                       struct st_tensor *t)
{
    if (!cJSON_IsArray(item))
        return moe_fail(-EINVAL, "%s: tensor '%s': \"shape\" is not an array",
                        path, name);
    int ndim = cJSON_GetArraySize(item);
    if (ndim > MOE_ST_MAX_DIMS)
        return moe_fail(-EINVAL,
                        "%s: tensor '%s': shape has %d dimensions, more than "
                        "the %d supported",
                        path, name, ndim, MOE_ST_MAX_DIMS);

    int i = 0;
    const cJSON *dim;
    cJSON_ArrayForEach(dim, item) {
        char what[32];
        snprintf(what, sizeof what, "shape[%d]", i);
        uint64_t value;
        int rc = json_to_u64(dim, path, name, what, &value);
        if (rc < 0)
            return rc;
        t->shape[i++] = (int64_t)value;
    }
    t->ndim = ndim;
    return 0;
}

static int parse_offsets(const cJSON *item, const char *path, const char *name,
                         uint64_t data_bytes, struct st_tensor *t)
{
    if (!cJSON_IsArray(item) || cJSON_GetArraySize(item) != 2)
        return moe_fail(-EINVAL,
                        "%s: tensor '%s': \"data_offsets\" is not an array of "
                        "2 integers",
                        path, name);
    int rc = json_to_u64(cJSON_GetArrayItem(item, 0), path, name,
                         "data_offsets[0]", &t->begin);
    if (rc == 0)
        rc = json_to_u64(cJSON_GetArrayItem(item, 1), path, name,
                         "data_offsets[1]", &t->end);
    if (rc < 0)
        return rc;

    if (t->begin > t->end)
        return moe_fail(-EINVAL,
                        "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64
                        "] begin after end",
                        path, name, t->begin, t->end);
    if (t->end > data_bytes)
        return moe_fail(-EINVAL,
                        "%s: tensor '%s': data_offsets end %" PRIu64
                        " is beyond the data buffer of %" PRIu64 " bytes",
                        path, name, t->end, data_bytes);
    return 0;
}

/* Checks that end - begin is the size that the shape and dtype give. */
static int check_tensor_size(const struct st_tensor *t, const char *path)
{
    char shape[256];
    st_format_shape(t->shape, t->ndim, shape, sizeof shape);
    const char *dtype = moe_dtype_name(t->dtype);

    uint64_t bytes;
    int rc = st_tensor_bytes(t->dtype, t->shape, t->ndim, &bytes);
    if (rc == -EOVERFLOW)
        return moe_fail(-EINVAL,
                        "%s: tensor '%s': the size of shape %s of %s overflows "
                        "64 bits",
                        path, t->name, shape, dtype);
    if (rc < 0)
        return moe_fail(-EINVAL,
                        "%s: tensor '%s': shape %s of %s is not a whole number "
                        "of bytes",
                        path, t->name, shape, dtype);
    if (bytes != t->end - t->begin)
        return moe_fail(-EINVAL,
                        "%s: tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64
                        "] span %" PRIu64 " bytes, but shape %s of %s needs %"
                        PRIu64 " bytes",
                        path, t->name, t->begin, t->end, t->end - t->begin,
                        shape, dtype, bytes);
    return 0;
}

/* Parses and checks one tensor entry of the header into *t, which owns a
 * copy of the name afterwards. */
static int parse_tensor_entry(const cJSON *entry, const char *path,
                              uint64_t data_bytes, struct st_tensor *t)
{
    const char *name = entry->string;
    if (!cJSON_IsObject(entry))
        return moe_fail(-EINVAL, "%s: tensor '%s': entry is not a JSON object",
                        path, name);

    const cJSON *dtype = NULL, *shape = NULL, *offsets = NULL;
    const cJSON *field;
    cJSON_ArrayForEach(field, entry) {
        const cJSON **slot;
        if (strcmp(field->string, "dtype") == 0)
            slot = &dtype;
        else if (strcmp(field->string, "shape") == 0)
            slot = &shape;
        else if (strcmp(field->string, "data_offsets") == 0)
            slot = &offsets;
        else
            return moe_fail(-EINVAL,
                            "%s: tensor '%s': unexpected key '%.40s'; expected "
                            "only \"dtype\", \"shape\" and \"data_offsets\"",
                            path, name, field->string);
        if (*slot != NULL)
            return moe_fail(-EINVAL, "%s: tensor '%s': duplicate key \"%s\"",
                            path, name, field->string);
        *slot = field;
    }

    static const char *const required[3] = {"dtype", "shape", "data_offsets"};
    const cJSON *found[3] = {dtype, shape, offsets};
    for (int i = 0; i < 3; i++)
        if (found[i] == NULL)
            return moe_fail(-EINVAL, "%s: tensor '%s': missing \"%s\"", path,
                            name, required[i]);

    int rc = parse_dtype(dtype, path, name, &t->dtype);
    if (rc == 0)
        rc = parse_shape(shape, path, name, t);
    if (rc == 0)
        rc = parse_offsets(offsets, path, name, data_bytes, t);
    if (rc < 0)
        return rc;

    t->name = strdup(name);
    if (t->name == NULL)
        return moe_fail(-ENOMEM, "%s: out of memory for tensor names", path);
    return check_tensor_size(t, path);
}

static int check_metadata(const cJSON *metadata, const char *path)
{
    if (!cJSON_IsObject(metadata))
        return moe_fail(-EINVAL, "%s: \"__metadata__\" is not a JSON object",
                        path);
    const cJSON *item;
    cJSON_ArrayForEach(item, metadata)
        if (!cJSON_IsString(item))
            return moe_fail(-EINVAL,
                            "%s: \"__metadata__\" value of key '%.40s' is not a "
                            "string",
                            path, item->string);
    return 0;
}

static int compare_by_range(const void *a, const void *b)
{
    const struct st_tensor *x = *(const struct st_tensor *const *)a;
    const struct st_tensor *y = *(const struct st_tensor *const *)b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return strcmp(x->name, y->name); /* names the pair in a fixed order */
}

/* Rejects two tensors whose non-empty byte ranges overlap. */
static int check_overlaps(struct st_tensor *tensors, size_t count,
                          const char *path)
{
    if (count < 2)
        return 0;
    const struct st_tensor **order = malloc(count * sizeof *order);
    if (order == NULL)
        return moe_fail(-ENOMEM, "%s: out of memory checking tensor ranges",
                        path);
    for (size_t i = 0; i < count; i++)
        order[i] = &tensors[i];
    qsort(order, count, sizeof *order, compare_by_range);

    /* In begin order, a range overlaps an earlier one exactly when it
     * begins before the furthest end seen so far. */
    const struct st_tensor *furthest = NULL;
    int rc = 0;
    for (size_t i = 0; i < count && rc == 0; i++) {
        const struct st_tensor *t = order[i];
        if (t->begin == t->end)
            continue;
        if (furthest != NULL && t->begin < furthest->end)
            rc = moe_fail(-EINVAL,
                          "%s: tensors '%s' (bytes [%" PRIu64 ", %" PRIu64
                          ")) and '%s' (bytes [%" PRIu64 ", %" PRIu64
                          ")) overlap",
                          path, furthest->name, furthest->begin, furthest->end,
                          t->name, t->begin, t->end);
        if (furthest == NULL || t->end > furthest->end)
            furthest = t;
    }
    free(order);
    return rc;
}

static void free_tensors(struct st_tensor *tensors, size_t count)
{
    for (size_t i = 0; i < count; i++)
        free(tensors[i].name);
    free(tensors);
}

/* Parses the header JSON text[0..len) of `path`, whose data buffer has
 * data_bytes bytes, into a name-sorted tensor table. */
static int parse_header_json(const char *text, size_t len, const char *path,
                             uint64_t data_bytes, struct st_tensor **out,
                             size_t *out_count)
{
    size_t bad = find_invalid_utf8((const uint8_t *)text, len);
    if (bad < len)
        return moe_fail(-EINVAL,
                        "%s: header is not valid UTF-8 JSON text: byte 0x%02x "
                        "at file offset %zu",
                        path, (uint8_t)text[bad], 8 + bad);
    if (len == 0 || text[0] != '{')
        return moe_fail(-EINVAL,
                        "%s: header is not a JSON object: it does not start "
                        "with '{'",
                        path);

    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, false);
    if (root == NULL) {
        size_t at = end != NULL && end >= text ? (size_t)(end - text) : 0;
        return moe_fail(-EINVAL,
                        "%s: header is not valid JSON: parse error near file "
                        "offset %zu",
                        path, 8 + at);
    }

    int rc = 0;
    for (size_t i = (size_t)(end - text); i < len && rc == 0; i++)
        if (text[i] != ' ')
            rc = moe_fail(-EINVAL,
                          "%s: header has byte 0x%02x at file offset %zu after "
                          "its JSON object; only space padding may follow",
                          path, (uint8_t)text[i], 8 + i);
    if (rc == 0 && !cJSON_IsObject(root))
        rc = moe_fail(-EINVAL, "%s: header is not a JSON object", path);

    size_t capacity = 0;
    const cJSON *item;
    if (rc == 0)
        cJSON_ArrayForEach(item, root)
            capacity++;

    struct st_tensor *tensors = NULL;
    size_t count = 0;
    if (rc == 0 && capacity > 0) {
        tensors = calloc(capacity, sizeof *tensors);
        if (tensors == NULL)
            rc = moe_fail(-ENOMEM, "%s: out of memory for %zu header entries",
                          path, capacity);
    }

    bool seen_metadata = false;
    if (rc == 0) {
        cJSON_ArrayForEach(item, root) {
            if (strcmp(item->string, ST_METADATA_KEY) == 0) {
                rc = seen_metadata
                         ? moe_fail(-EINVAL,
                                    "%s: \"__metadata__\" appears twice", path)
                         : check_metadata(item, path);
                seen_metadata = true;
            } else {
                rc = parse_tensor_entry(item, path, data_bytes,
                                        &tensors[count]);
                if (tensors[count].name != NULL)
                    count++;
            }
            if (rc < 0)
                break;
        }
    }
    cJSON_Delete(root);

    if (rc == 0 && count > 1) {
        qsort(tensors, count, sizeof *tensors, compare_tensor_names);
        for (size_t i = 1; i < count && rc == 0; i++)
            if (strcmp(tensors[i - 1].name, tensors[i].name) == 0)
                rc = moe_fail(-EINVAL,
                              "%s: tensor '%s' appears twice in the header",
                              path, tensors[i].name);
    }
    if (rc == 0)
        rc = check_overlaps(tensors, count, path);
    if (rc < 0) {
        free_tensors(tensors, count);
        return rc;
    }
    *out = tensors;
    *out_count = count;
    return 0;
}

/* Validates the mapped file map[0..size): header length, header, every
 * tensor entry. Fills the file's table and data pointers. */
static int parse_file(struct st_file *file, const uint8_t *map, size_t size)
{
    const char *path = file->path;
    if (size < 8)
        return moe_fail(-EINVAL,
                        "%s: file is %zu bytes, shorter than the 8-byte "
                        "header length field",
                        path, size);

    uint64_t header_bytes = 0;
    for (int i = 0; i < 8; i++)
        header_bytes |= (uint64_t)map[i] << (8 * i);
    if (header_bytes > MOE_ST_MAX_HEADER_BYTES)
        return moe_fail(-EINVAL,
                        "%s: header length %" PRIu64 " exceeds the limit of %u "
                        "bytes",
                        path, header_bytes, MOE_ST_MAX_HEADER_BYTES);
    if (header_bytes > size - 8)
        return moe_fail(-EINVAL,
                        "%s: header length %" PRIu64 " runs past the end of "
                        "the file (%zu bytes)",
                        path, header_bytes, size);

    uint64_t data_bytes = size - 8 - header_bytes;
    int rc = parse_header_json((const char *)map + 8, (size_t)header_bytes,
                               path, data_bytes, &file->tensors,
                               &file->tensor_count);
    if (rc < 0)
        return rc;
    file->data = map + 8 + header_bytes;
    file->data_bytes = data_bytes;
    return 0;
}

/* Opens, maps and validates a file, once. */
static int load_file(struct st_file *file)
{
    if (file->loaded)
        return 0;

    /* A file that vanished since the model was opened is -EINVAL, because
     * callers take -ENOENT to mean a missing tensor. */
    /* O_NONBLOCK keeps open() from waiting for a writer when the path is a
     * FIFO, which the regular-file check below then rejects. */
    int fd = open(file->path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        return moe_fail(moe_path_error_code(err), "%s: open failed: %s",
                        file->path, strerror(err));
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int err = errno;
        close(fd);
        return moe_fail(-err, "%s: fstat failed: %s", file->path,
                        strerror(err));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return moe_fail(-EINVAL, "%s: not a regular file", file->path);
    }
    if ((uint64_t)st.st_size > SIZE_MAX) {
        close(fd);
        return moe_fail(-EFBIG, "%s: file of %lld bytes is too large to map",
                        file->path, (long long)st.st_size);
    }

    size_t size = (size_t)st.st_size;
    uint8_t *map = NULL;
    if (size >= 8) {
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            int err = errno;
            close(fd);
            return moe_fail(-err, "%s: mmap of %zu bytes failed: %s",
                            file->path, size, strerror(err));
        }
    }
    close(fd);

    int rc = parse_file(file, map, size);
    if (rc < 0) {
        if (map != NULL)
            munmap(map, size);
        return rc;
    }
    file->map = map;
    file->map_bytes = size;
    file->loaded = true;
    return 0;
}

static void unload_file(struct st_file *file)
{
    if (file->map != NULL)
        munmap(file->map, file->map_bytes);
    free_tensors(file->tensors, file->tensor_count);
    free(file->path);
}

/* ---- opening a model -------------------------------------------------- */

static struct moe_st_model *new_model(void)
{
    struct moe_st_model *model = calloc(1, sizeof *model);
    if (model != NULL) {
        model->block_rows = 128;
        model->block_cols = 128;
    }
    return model;
}

static int open_single(struct moe_st_model *model, char *path)
{
    model->files = calloc(1, sizeof *model->files);
    if (model->files == NULL) {
        int rc = moe_fail(-ENOMEM, "%s: out of memory", path);
        free(path);
        return rc;
    }
    model->files[0].path = path;
    model->file_count = 1;
    return load_file(&model->files[0]);
}

/* Returns the index of shard `name` in model->files, adding it (and
 * checking that the file exists) if it is new. */
static int add_shard(struct moe_st_model *model, const char *dir,
                     const char *name, int *capacity)
{
    /* Consecutive entries usually name the same shard, so search from the
     * end. */
    for (int i = model->file_count - 1; i >= 0; i--) {
        const char *existing = strrchr(model->files[i].path, '/') + 1;
        if (strcmp(existing, name) == 0)
            return i;
    }

    const char *index = model->index_path;
    if (name[0] == '\0' || strchr(name, '/') != NULL ||
        strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
        return moe_fail(-EINVAL,
                        "%s: weight_map names shard '%.100s', which is not a "
                        "plain file name in the model directory",
                        index, name);

    if (model->file_count == *capacity) {
        int grown = *capacity > 0 ? 2 * *capacity : 8;
        struct st_file *files =
            realloc(model->files, (size_t)grown * sizeof *files);
        if (files == NULL)
            return moe_fail(-ENOMEM, "%s: out of memory for shards", index);
        model->files = files;
        *capacity = grown;
    }

    char *path = join_path(dir, name);
    if (path == NULL)
        return moe_fail(-ENOMEM, "%s: out of memory for shards", index);
    struct stat st;
    if (stat(path, &st) < 0) {
        int err = errno;
        int rc = moe_fail(moe_path_error_code(err),
                          "%s: shard '%s' listed in weight_map: %s: %s", index,
                          name, path, strerror(err));
        free(path);
        return rc;
    }
    if (!S_ISREG(st.st_mode)) {
        int rc = moe_fail(-EINVAL,
                          "%s: shard '%s' listed in weight_map: %s is not a "
                          "regular file",
                          index, name, path);
        free(path);
        return rc;
    }

    struct st_file *file = &model->files[model->file_count];
    memset(file, 0, sizeof *file);
    file->path = path;
    return model->file_count++;
}

static int parse_index(struct moe_st_model *model, const char *dir,
                       const char *text, size_t len)
{
    const char *index = model->index_path;
    size_t bad = find_invalid_utf8((const uint8_t *)text, len);
    if (bad < len)
        return moe_fail(-EINVAL,
                        "%s: not valid UTF-8 JSON text: byte 0x%02x at offset "
                        "%zu",
                        index, (uint8_t)text[bad], bad);

    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, false);
    if (root == NULL) {
        size_t at = end != NULL && end >= text ? (size_t)(end - text) : 0;
        return moe_fail(-EINVAL,
                        "%s: not valid JSON: parse error near offset %zu",
                        index, at);
    }

    int rc = 0;
    for (size_t i = (size_t)(end - text); i < len && rc == 0; i++)
        if (text[i] != ' ' && text[i] != '\t' && text[i] != '\n' &&
            text[i] != '\r')
            rc = moe_fail(-EINVAL,
                          "%s: not valid JSON: unexpected text at offset %zu "
                          "after the top-level value",
                          index, i);

    const cJSON *map = NULL;
    if (rc == 0 && !cJSON_IsObject(root))
        rc = moe_fail(-EINVAL, "%s: not a JSON object", index);
    if (rc == 0) {
        map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
        if (map == NULL)
            rc = moe_fail(-EINVAL, "%s: missing \"weight_map\"", index);
        else if (!cJSON_IsObject(map))
            rc = moe_fail(-EINVAL, "%s: \"weight_map\" is not a JSON object",
                          index);
    }

    size_t count = 0;
    const cJSON *item;
    if (rc == 0)
        cJSON_ArrayForEach(item, map)
            count++;
    if (rc == 0 && count > 0) {
        model->entries = calloc(count, sizeof *model->entries);
        if (model->entries == NULL)
            rc = moe_fail(-ENOMEM, "%s: out of memory for %zu entries", index,
                          count);
    }

    int capacity = 0;
    if (rc == 0) {
        cJSON_ArrayForEach(item, map) {
            if (!cJSON_IsString(item)) {
                rc = moe_fail(-EINVAL,
                              "%s: weight_map value of tensor '%s' is not a "
                              "string",
                              index, item->string);
                break;
            }
            int file = add_shard(model, dir, item->valuestring, &capacity);
            if (file < 0) {
                rc = file;
                break;
            }
            struct st_index_entry *entry = &model->entries[model->entry_count];
            entry->name = strdup(item->string);
            if (entry->name == NULL) {
                rc = moe_fail(-ENOMEM, "%s: out of memory for names", index);
                break;
            }
            entry->file = file;
            model->entry_count++;
        }
    }
    cJSON_Delete(root);
    if (rc < 0)
        return rc;

    if (model->entry_count > 1)
        qsort(model->entries, model->entry_count, sizeof *model->entries,
              compare_entry_names);
    for (size_t i = 1; i < model->entry_count; i++)
        if (strcmp(model->entries[i - 1].name, model->entries[i].name) == 0)
            return moe_fail(-EINVAL,
                            "%s: tensor '%s' appears twice in weight_map",
                            index, model->entries[i].name);
    return 0;
}

static int open_index(struct moe_st_model *model, const char *dir,
                      char *index_path)
{
    model->index_path = index_path;
    char *text = NULL;
    size_t len = 0;
    int rc = moe_read_small_file(index_path, MAX_INDEX_BYTES, &text, &len);
    if (rc < 0)
        return rc;
    rc = parse_index(model, dir, text, len);
    free(text);
    return rc;
}

int moe_st_open_model(const char *dir, struct moe_st_model **out)
{
    *out = NULL;
    struct stat st;
    if (stat(dir, &st) < 0) {
        int err = errno;
        return moe_fail(moe_path_error_code(err),
                        "%s: cannot open the model directory: %s", dir,
                        strerror(err));
    }
    if (!S_ISDIR(st.st_mode))
        return moe_fail(-EINVAL, "%s: not a directory; expected a model "
                        "directory with %s or %s",
                        dir, single_file_name, index_file_name);

    struct moe_st_model *model = new_model();
    char *single = join_path(dir, single_file_name);
    char *index = join_path(dir, index_file_name);
    if (model == NULL || single == NULL || index == NULL) {
        free(model);
        free(single);
        free(index);
        return moe_fail(-ENOMEM, "%s: out of memory opening the model", dir);
    }

    int rc;
    if (stat(single, &st) == 0) {
        free(index);
        rc = open_single(model, single);
    } else if (errno != ENOENT) {
        int err = errno;
        rc = moe_fail(moe_path_error_code(err), "%s: stat failed: %s", single,
                      strerror(err));
        free(single);
        free(index);
    } else if (stat(index, &st) == 0) {
        free(single);
        rc = open_index(model, dir, index);
    } else {
        int err = errno;
        rc = moe_fail(moe_path_error_code(err),
                      "%s: neither %s nor %s found in the model directory",
                      dir, single_file_name, index_file_name);
        free(single);
        free(index);
    }

    if (rc < 0) {
        moe_st_close(model);
        return rc;
    }
    *out = model;
    return 0;
}

void moe_st_close(struct moe_st_model *model)
{
    if (model == NULL)
        return;
    for (int i = 0; i < model->file_count; i++)
        unload_file(&model->files[i]);
    free(model->files);
    for (size_t i = 0; i < model->entry_count; i++)
        free(model->entries[i].name);
    free(model->entries);
    free(model->index_path);
    free(model);
}

/* ---- lookup ----------------------------------------------------------- */

static const struct st_tensor *search_file(const struct st_file *file,
                                           const char *name)
{
    struct st_tensor key = {.name = (char *)name};
    if (file->tensor_count == 0)
        return NULL;
    return bsearch(&key, file->tensors, file->tensor_count,
                   sizeof *file->tensors, compare_tensor_names);
}

/* Finds tensor `name`, loading its shard if needed. */
static int find_tensor(struct moe_st_model *model, const char *name,
                       struct st_file **file_out,
                       const struct st_tensor **tensor_out)
{
    if (model->index_path == NULL) {
        struct st_file *file = &model->files[0];
        const struct st_tensor *t = search_file(file, name);
        if (t == NULL)
            return moe_fail(-ENOENT, "tensor '%s' not found in %s", name,
                            file->path);
        *file_out = file;
        *tensor_out = t;
        return 0;
    }

    struct st_index_entry key = {.name = (char *)name};
    const struct st_index_entry *entry =
        model->entry_count == 0 ? NULL :
        bsearch(&key, model->entries, model->entry_count,
                sizeof *model->entries, compare_entry_names);
    if (entry == NULL)
        return moe_fail(-ENOENT,
                        "tensor '%s' not found: the weight_map of %s has no "
                        "entry for it",
                        name, model->index_path);

    struct st_file *file = &model->files[entry->file];
    int rc = load_file(file);
    if (rc < 0)
        return rc;
    const struct st_tensor *t = search_file(file, name);
    if (t == NULL)
        return moe_fail(-EINVAL,
                        "tensor '%s': %s places it in %s, but that file's "
                        "header does not contain it",
                        name, model->index_path, file->path);
    *file_out = file;
    *tensor_out = t;
    return 0;
}

int moe_st_find(struct moe_st_model *model, const char *name,
                struct moe_st_info *info)
{
    struct st_file *file;
    const struct st_tensor *t;
    int rc = find_tensor(model, name, &file, &t);
    if (rc < 0)
        return rc;
    memset(info, 0, sizeof *info);
    info->dtype = t->dtype;
    info->ndim = t->ndim;
    memcpy(info->shape, t->shape, (size_t)t->ndim * sizeof t->shape[0]);
    info->file = file->path;
    return 0;
}

void moe_st_set_fp8_block(struct moe_st_model *model, int64_t block_rows,
                          int64_t block_cols)
{
    model->block_rows = block_rows;
    model->block_cols = block_cols;
}

/* ---- reading and conversion ------------------------------------------- */

static uint64_t element_count(const struct st_tensor *t)
{
    uint64_t n = 1;
    for (int i = 0; i < t->ndim; i++)
        n *= (uint64_t)t->shape[i];
    return n;
}

static void convert_16bit(const uint8_t *src, uint64_t n, float *dst,
                          float (*decode)(uint16_t))
{
    for (uint64_t i = 0; i < n; i++) {
        uint16_t bits;
        memcpy(&bits, src + 2 * i, sizeof bits); /* may be unaligned */
        dst[i] = decode(bits);
    }
}

/* Ceil(n / block) for n >= 0 and block >= 1, without overflow. */
int64_t st_block_count(int64_t n, int64_t block)
{
    return n == 0 ? 0 : (n - 1) / block + 1;
}

static float scale_at(const struct st_file *file, const struct st_tensor *s,
                      uint64_t index)
{
    const uint8_t *p = file->data + s->begin;
    if (s->dtype == MOE_DTYPE_BF16) {
        uint16_t bits;
        memcpy(&bits, p + 2 * index, sizeof bits);
        return moe_bf16_to_f32(bits);
    }
    float value;
    memcpy(&value, p + 4 * index, sizeof value);
    return value;
}

/* Finds and checks the scale tensor of the F8_E4M3 tensor `t`. */
static int find_fp8_scale(struct moe_st_model *model,
                          const struct st_file *file,
                          const struct st_tensor *t,
                          struct st_file **scale_file,
                          const struct st_tensor **scale)
{
    if (model->block_rows < 1 || model->block_cols < 1)
        return moe_fail(-EINVAL,
                        "tensor '%s' in %s: invalid FP8 block size %" PRId64
                        " x %" PRId64 "; both must be at least 1",
                        t->name, file->path, model->block_rows,
                        model->block_cols);
    if (t->ndim != 2)
        return moe_fail(-EINVAL,
                        "tensor '%s' in %s: F8_E4M3 tensor has %d dimensions; "
                        "block scales need a 2-D (rows, cols) tensor",
                        t->name, file->path, t->ndim);

    char *scale_name = concat(t->name, scale_suffix);
    if (scale_name == NULL)
        return moe_fail(-ENOMEM, "out of memory");
    int rc = find_tensor(model, scale_name, scale_file, scale);
    if (rc == -ENOENT)
        rc = moe_fail(-EINVAL,
                      "tensor '%s' in %s is F8_E4M3, but its scale tensor "
                      "'%s' is missing (%s)",
                      t->name, file->path, scale_name, moe_error_message());
    free(scale_name);
    if (rc < 0)
        return rc;

    const struct st_tensor *s = *scale;
    if (s->dtype != MOE_DTYPE_F32 && s->dtype != MOE_DTYPE_BF16)
        return moe_fail(-EINVAL,
                        "scale tensor '%s' in %s is %s; expected F32 or BF16",
                        s->name, (*scale_file)->path, moe_dtype_name(s->dtype));

    int64_t expected[2] = {st_block_count(t->shape[0], model->block_rows),
                           st_block_count(t->shape[1], model->block_cols)};
    if (s->ndim != 2 || s->shape[0] != expected[0] ||
        s->shape[1] != expected[1]) {
        char found_text[256], expected_text[64];
        return moe_fail(-EINVAL,
                        "scale tensor '%s' in %s has shape %s, expected %s for "
                        "'%s' of shape [%" PRId64 ", %" PRId64 "] in blocks "
                        "of %" PRId64 " x %" PRId64,
                        s->name, (*scale_file)->path,
                        st_format_shape(s->shape, s->ndim, found_text,
                                     sizeof found_text),
                        st_format_shape(expected, 2, expected_text,
                                     sizeof expected_text),
                        t->name, t->shape[0], t->shape[1], model->block_rows,
                        model->block_cols);
    }
    return 0;
}

static int read_fp8(struct moe_st_model *model, const struct st_file *file,
                    const struct st_tensor *t, float *dst)
{
    struct st_file *scale_file;
    const struct st_tensor *scale;
    int rc = find_fp8_scale(model, file, t, &scale_file, &scale);
    if (rc < 0)
        return rc;

    const uint8_t *q = file->data + t->begin;
    int64_t rows = t->shape[0], cols = t->shape[1];
    int64_t scale_cols = scale->shape[1];
    for (int64_t i = 0; i < rows; i++) {
        uint64_t scale_row = (uint64_t)(i / model->block_rows);
        for (int64_t j0 = 0; j0 < cols; j0 += model->block_cols) {
            uint64_t b = (uint64_t)(j0 / model->block_cols);
            float s = scale_at(scale_file, scale,
                               scale_row * (uint64_t)scale_cols + b);
            int64_t j1 = cols - j0 > model->block_cols
                             ? j0 + model->block_cols
                             : cols;
            for (int64_t j = j0; j < j1; j++) {
                uint64_t at = (uint64_t)i * (uint64_t)cols + (uint64_t)j;
                dst[at] = moe_f8e4m3_to_f32(q[at]) * s;
            }
        }
    }
    return 0;
}

/* The jump target of the read in progress on this thread, for SIGBUS. A
 * mapped file that another process truncates raises SIGBUS on the first
 * access past its new end. The reader turns that into an error instead of
 * a crash. */
static __thread sigjmp_buf *bus_jump;

static void on_sigbus(int sig, siginfo_t *info, void *context)
{
    (void)info;
    (void)context;
    if (bus_jump)
        siglongjmp(*bus_jump, 1);
    /* A SIGBUS outside a read: restore the default action, which the
     * return re-raises by repeating the faulting access. */
    signal(sig, SIG_DFL);
}

/* Converts tensor t of `file` into dst by its dtype. */
static int convert_tensor(struct moe_st_model *model, const struct st_file *file,
                          const struct st_tensor *t, const char *name, float *dst)
{
    const uint8_t *src = file->data + t->begin;
    uint64_t n = element_count(t);
    switch (t->dtype) {
    case MOE_DTYPE_F32:
        if (n > 0)
            memcpy(dst, src, (size_t)n * sizeof(float));
        return 0;
    case MOE_DTYPE_F16:
        convert_16bit(src, n, dst, moe_f16_to_f32);
        return 0;
    case MOE_DTYPE_BF16:
        convert_16bit(src, n, dst, moe_bf16_to_f32);
        return 0;
    case MOE_DTYPE_F8_E4M3:
        return read_fp8(model, file, t, dst);
    default:
        return moe_fail(-EINVAL,
                        "tensor '%s' in %s has unsupported dtype %s; moe-ep "
                        "reads only F32, F16, BF16 and F8_E4M3",
                        name, file->path, moe_dtype_name(t->dtype));
    }
}

int moe_st_read_f32(struct moe_st_model *model, const char *name, int ndim,
                    const int64_t *expect_shape, float *dst)
{
    if (ndim < 0 || ndim > MOE_ST_MAX_DIMS || (ndim > 0 && expect_shape == NULL))
        return moe_fail(-EINVAL,
                        "tensor '%s': invalid expected rank %d; expected 0 to "
                        "%d dimensions",
                        name, ndim, MOE_ST_MAX_DIMS);

    struct st_file *file;
    const struct st_tensor *t;
    int rc = find_tensor(model, name, &file, &t);
    if (rc < 0)
        return rc;

    bool same = t->ndim == ndim;
    for (int i = 0; same && i < ndim; i++)
        same = t->shape[i] == expect_shape[i];
    if (!same) {
        char found_text[256], expected_text[256];
        return moe_fail(-EINVAL, "tensor '%s' in %s has shape %s, expected %s",
                        name, file->path,
                        st_format_shape(t->shape, t->ndim, found_text,
                                     sizeof found_text),
                        st_format_shape(expect_shape, ndim, expected_text,
                                     sizeof expected_text));
    }

    /* Catch SIGBUS for the time of the copy, in case the file shrank
     * after its header was checked. */
    struct sigaction guard = {.sa_sigaction = on_sigbus, .sa_flags = SA_SIGINFO};
    struct sigaction saved;
    sigemptyset(&guard.sa_mask);
    sigaction(SIGBUS, &guard, &saved);
    sigjmp_buf jump;
    if (sigsetjmp(jump, 1) != 0) {
        bus_jump = NULL;
        sigaction(SIGBUS, &saved, NULL);
        return moe_fail(-EINVAL, "tensor '%s' in %s: the file became shorter while "
                        "it was read; was it replaced during the run?", name,
                        file->path);
    }
    bus_jump = &jump;
    rc = convert_tensor(model, file, t, name, dst);
    bus_jump = NULL;
    sigaction(SIGBUS, &saved, NULL);
    return rc;
}
