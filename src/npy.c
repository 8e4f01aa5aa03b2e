/*
 * npy.c - NumPy .npy files (see moe_npy.h).
 *
 * Any process may call these functions, and they keep no state. The header
 * parser accepts the subset of Python literal syntax that np.save() writes:
 * a dict whose keys and strings are quoted without escape sequences,
 * True/False, and a tuple of decimal integers. Anything else is a
 * malformed header. Some headers that numpy.load() accepts are rejected
 * here: strings with escape sequences, duplicate keys and Python 2 "L"
 * suffixes on integers. np.save() under Python 3 writes none of these.
 *
 * Limits: the readers load the whole array into memory (no mmap), and the
 * writer always writes format 1.0, whose 65535-byte header limit no
 * array of 8 or fewer dimensions can reach.
 */
#include "moe_npy.h"
#include "moe_dtype.h"
#include "moe_file.h"
#include "moe_error.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "npy.c copies little-endian data unchanged and needs a little-endian host"
#endif

static const uint8_t npy_magic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
enum { NPY_MAGIC_BYTES = 6, NPY_VERSION_BYTES = 2 };

/* numpy.load() rejects longer headers unless max_header_size is raised
 * (numpy 1.24, numpy/lib/format.py _MAX_HEADER_SIZE). A 2-D float32 header
 * is about 128 bytes, so this only bounds what a corrupt length field can
 * make the reader allocate. */
enum { NPY_MAX_HEADER_BYTES = 10000 };

/* np.save() aligns the data to this many bytes (ARRAY_ALIGN). */
enum { NPY_ALIGN_BYTES = 64 };

/* np.save() leaves room after the dict for this many digits of shape[0],
 * so that an array can grow along axis 0 without moving its data
 * (GROWTH_AXIS_MAX_DIGITS in numpy 1.24). */
enum { NPY_GROWTH_DIGITS = 21 };

static const char *display_name(const char *name)
{
    return name != NULL ? name : "<buffer>";
}

/* ---- header parser ---------------------------------------------------- */

/* Position in the header dict text. Offsets in messages count from the
 * start of the file, so that they match a hex dump. */
struct npy_cursor {
    const uint8_t *text; /* the dict text, text[0..len) */
    size_t len;
    size_t pos;
    size_t file_offset; /* offset of text[0] in the file */
    const char *name;
};

static int malformed(const struct npy_cursor *c, const char *what)
{
    return moe_fail(-EINVAL,
                    "%s: malformed .npy header: %s at byte %zu",
                    c->name, what, c->file_offset + c->pos);
}

static bool at_end(const struct npy_cursor *c)
{
    return c->pos >= c->len;
}

static int peek(const struct npy_cursor *c)
{
    return at_end(c) ? -1 : c->text[c->pos];
}

/* Python allows any whitespace, including newlines, inside brackets. */
static void skip_space(struct npy_cursor *c)
{
    while (!at_end(c)) {
        uint8_t ch = c->text[c->pos];
        if (ch != ' ' && ch != '\t' && ch != '\n' && ch != '\r')
            break;
        c->pos++;
    }
}

static bool is_identifier_char(int ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
           (ch >= '0' && ch <= '9') || ch == '_';
}

/* Parses a '...' or "..." string and returns its contents as
 * text[*start .. *start + *count). Escapes and control bytes are rejected,
 * so the contents can be printed in messages. */
static int parse_string(struct npy_cursor *c, size_t *start, size_t *count)
{
    int quote = peek(c);
    if (quote != '\'' && quote != '"')
        return malformed(c, "expected a quoted string");
    c->pos++;
    *start = c->pos;

    for (;;) {
        int ch = peek(c);
        if (ch < 0)
            return malformed(c, "unterminated string");
        if (ch == quote)
            break;
        if (ch == '\\')
            return malformed(c, "escape sequences in strings are not supported");
        if (ch < 0x20 || ch == 0x7f)
            return malformed(c, "control character in a string");
        c->pos++;
    }
    *count = c->pos - *start;
    c->pos++;
    return 0;
}

static bool string_equals(const struct npy_cursor *c, size_t start,
                          size_t count, const char *expected)
{
    return count == strlen(expected) &&
           memcmp(c->text + start, expected, count) == 0;
}

static int parse_descr(struct npy_cursor *c, struct moe_npy_header *out)
{
    if (peek(c) == '[')
        return moe_fail(-EINVAL,
                        "%s: unsupported dtype: descr is a list (a structured "
                        "dtype); expected a plain dtype such as '<f4' (float32)",
                        c->name);

    size_t start, count;
    int rc = parse_string(c, &start, &count);
    if (rc < 0)
        return rc;

    if (count >= sizeof out->descr)
        return moe_fail(-EINVAL,
                        "%s: unsupported dtype '%.*s': descr is longer than "
                        "%zu characters; expected a plain dtype such as '<f4' "
                        "(float32)",
                        c->name, (int)(count > 40 ? 40 : count),
                        (const char *)c->text + start, sizeof out->descr - 1);
    memcpy(out->descr, c->text + start, count);
    out->descr[count] = '\0';
    return 0;
}

static int parse_bool(struct npy_cursor *c, int *value)
{
    static const char *const words[2] = {"False", "True"};

    for (int v = 0; v < 2; v++) {
        size_t n = strlen(words[v]);
        if (c->len - c->pos >= n &&
            memcmp(c->text + c->pos, words[v], n) == 0 &&
            (c->pos + n == c->len || !is_identifier_char(c->text[c->pos + n]))) {
            c->pos += n;
            *value = v;
            return 0;
        }
    }
    return malformed(c, "fortran_order must be True or False");
}

/* Parses one dimension: a non-negative decimal integer without leading
 * zeros, as Python writes it. */
static int parse_dimension(struct npy_cursor *c, int64_t *value)
{
    int ch = peek(c);
    if (ch < '0' || ch > '9')
        return malformed(c, "expected a non-negative integer in shape");
    if (ch == '0' && c->pos + 1 < c->len && c->text[c->pos + 1] >= '0' &&
        c->text[c->pos + 1] <= '9')
        return malformed(c, "leading zero in a shape dimension");

    int64_t v = 0;
    while ((ch = peek(c)) >= '0' && ch <= '9') {
        int digit = ch - '0';
        if (v > (INT64_MAX - digit) / 10)
            return malformed(c, "shape dimension does not fit in 64 bits");
        v = v * 10 + digit;
        c->pos++;
    }
    *value = v;
    return 0;
}

/* Parses a tuple such as (), (6,) or (2, 3). A single entry needs its
 * trailing comma, because (6) is an int in Python, not a tuple. */
static int parse_shape(struct npy_cursor *c, struct moe_npy_header *out)
{
    if (peek(c) != '(')
        return malformed(c, "shape must be a tuple");
    c->pos++;

    int ndim = 0;
    bool trailing_comma = false;
    for (;;) {
        skip_space(c);
        if (peek(c) == ')') {
            c->pos++;
            break;
        }
        if (ndim == MOE_NPY_MAX_DIMS)
            return malformed(c, "shape has more than 8 dimensions");

        int rc = parse_dimension(c, &out->shape[ndim]);
        if (rc < 0)
            return rc;
        ndim++;

        skip_space(c);
        if (peek(c) == ',') {
            c->pos++;
            trailing_comma = true;
        } else if (peek(c) == ')') {
            c->pos++;
            trailing_comma = false;
            break;
        } else {
            return malformed(c, "expected ',' or ')' in shape");
        }
    }

    if (ndim == 1 && !trailing_comma)
        return malformed(c, "shape (n) is an int, not a tuple; a 1-D shape "
                            "is written (n,)");
    out->ndim = ndim;
    return 0;
}

enum { KEY_DESCR = 1, KEY_FORTRAN_ORDER = 2, KEY_SHAPE = 4 };

/* Parses one 'key': value entry and records the key in *seen. */
static int parse_entry(struct npy_cursor *c, struct moe_npy_header *out,
                       unsigned *seen)
{
    size_t key_start, key_count;
    int rc = parse_string(c, &key_start, &key_count);
    if (rc < 0)
        return rc;

    unsigned key;
    if (string_equals(c, key_start, key_count, "descr"))
        key = KEY_DESCR;
    else if (string_equals(c, key_start, key_count, "fortran_order"))
        key = KEY_FORTRAN_ORDER;
    else if (string_equals(c, key_start, key_count, "shape"))
        key = KEY_SHAPE;
    else
        return moe_fail(-EINVAL,
                        "%s: malformed .npy header: unexpected key '%.*s'; "
                        "expected only 'descr', 'fortran_order' and 'shape'",
                        c->name, (int)(key_count > 40 ? 40 : key_count),
                        (const char *)c->text + key_start);
    if (*seen & key)
        return malformed(c, "duplicate key");
    *seen |= key;

    skip_space(c);
    if (peek(c) != ':')
        return malformed(c, "expected ':' after a key");
    c->pos++;
    skip_space(c);

    if (key == KEY_DESCR)
        return parse_descr(c, out);
    if (key == KEY_FORTRAN_ORDER)
        return parse_bool(c, &out->fortran_order);
    return parse_shape(c, out);
}

static int parse_dict(struct npy_cursor *c, struct moe_npy_header *out)
{
    if (peek(c) != '{')
        return malformed(c, "the header does not start with '{'");
    c->pos++;

    unsigned seen = 0;
    for (;;) {
        skip_space(c);
        if (peek(c) == '}') {
            c->pos++;
            break;
        }

        int rc = parse_entry(c, out, &seen);
        if (rc < 0)
            return rc;

        skip_space(c);
        if (peek(c) == ',') {
            c->pos++;
        } else if (peek(c) == '}') {
            c->pos++;
            break;
        } else {
            return malformed(c, "expected ',' or '}' after a value");
        }
    }

    skip_space(c);
    if (!at_end(c))
        return malformed(c, "unexpected text after the header dict");

    static const struct { unsigned key; const char *name; } required[] = {
        {KEY_DESCR, "descr"},
        {KEY_FORTRAN_ORDER, "fortran_order"},
        {KEY_SHAPE, "shape"},
    };
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++)
        if (!(seen & required[i].key))
            return moe_fail(-EINVAL,
                            "%s: malformed .npy header: missing key '%s'",
                            c->name, required[i].name);
    return 0;
}

/* Checks the magic, version and header length at the start of buf[0..len)
 * and returns in *data_offset where the header ends and the data begins. */
static int parse_prefix(const uint8_t *buf, size_t len, const char *name,
                        uint64_t *data_offset)
{
    size_t magic_bytes = len < NPY_MAGIC_BYTES ? len : NPY_MAGIC_BYTES;
    if (magic_bytes > 0 && memcmp(buf, npy_magic, magic_bytes) != 0)
        return moe_fail(-EINVAL,
                        "%s: not a .npy file: bad magic, the file does not "
                        "start with \\x93NUMPY",
                        name);
    if (len < NPY_MAGIC_BYTES + NPY_VERSION_BYTES)
        return moe_fail(-EINVAL,
                        "%s: truncated .npy file: %zu bytes, too short for the "
                        "magic and version",
                        name, len);

    unsigned major = buf[6], minor = buf[7];
    if ((major < 1 || major > 3) || minor != 0)
        return moe_fail(-EINVAL,
                        "%s: unsupported .npy format version %u.%u; expected "
                        "1.0, 2.0 or 3.0",
                        name, major, minor);

    /* Version 1.0 stores the header length in 2 bytes, 2.0 and 3.0 in 4. */
    size_t field_bytes = major == 1 ? 2 : 4;
    size_t prefix_bytes = NPY_MAGIC_BYTES + NPY_VERSION_BYTES + field_bytes;
    if (len < prefix_bytes)
        return moe_fail(-EINVAL,
                        "%s: truncated .npy file: %zu bytes, too short for the "
                        "header length field",
                        name, len);

    uint64_t header_bytes = 0;
    for (size_t i = 0; i < field_bytes; i++)
        header_bytes |= (uint64_t)buf[8 + i] << (8 * i);
    if (header_bytes > NPY_MAX_HEADER_BYTES)
        return moe_fail(-EINVAL,
                        "%s: malformed .npy header: header length %" PRIu64
                        " bytes exceeds the %d bytes numpy.load accepts by "
                        "default",
                        name, header_bytes, NPY_MAX_HEADER_BYTES);

    *data_offset = prefix_bytes + header_bytes;
    return 0;
}

int moe_npy_parse_header(const uint8_t *buf, size_t len,
                         const char *name_for_errors,
                         struct moe_npy_header *out)
{
    const char *name = display_name(name_for_errors);
    memset(out, 0, sizeof *out);

    uint64_t data_offset;
    int rc = parse_prefix(buf, len, name, &data_offset);
    if (rc < 0)
        return rc;
    if (len < data_offset)
        return moe_fail(-EINVAL,
                        "%s: truncated .npy header: expected %" PRIu64
                        " header bytes, found %zu",
                        name, data_offset, len);

    size_t prefix_bytes = buf[6] == 1 ? 10 : 12;
    struct npy_cursor cursor = {
        .text = buf + prefix_bytes,
        .len = (size_t)data_offset - prefix_bytes,
        .pos = 0,
        .file_offset = prefix_bytes,
        .name = name,
    };
    rc = parse_dict(&cursor, out);
    if (rc < 0) {
        memset(out, 0, sizeof *out);
        return rc;
    }
    out->data_offset = data_offset;
    return 0;
}

/* ---- dtypes ----------------------------------------------------------- */

struct npy_dtype_info {
    const char *descr; /* as np.save() writes it */
    const char *name;  /* NumPy's name */
    size_t size;       /* bytes per element */
    char kind;         /* NumPy's kind character */
};

static const struct npy_dtype_info dtype_info[] = {
    [MOE_NPY_F16] = {"<f2", "float16", 2, 'f'},
    [MOE_NPY_F32] = {"<f4", "float32", 4, 'f'},
    [MOE_NPY_F64] = {"<f8", "float64", 8, 'f'},
    [MOE_NPY_I32] = {"<i4", "int32", 4, 'i'},
    [MOE_NPY_I64] = {"<i8", "int64", 8, 'i'},
    [MOE_NPY_BOOL] = {"|b1", "bool", 1, 'b'},
    [MOE_NPY_U8] = {"|u1", "uint8", 1, 'u'},
};
enum { NPY_DTYPE_COUNT = sizeof dtype_info / sizeof dtype_info[0] };

static bool dtype_valid(enum moe_npy_dtype dtype)
{
    return (unsigned)dtype < NPY_DTYPE_COUNT;
}

const char *moe_npy_dtype_descr(enum moe_npy_dtype dtype)
{
    return dtype_valid(dtype) ? dtype_info[dtype].descr : "?";
}

const char *moe_npy_dtype_name(enum moe_npy_dtype dtype)
{
    return dtype_valid(dtype) ? dtype_info[dtype].name : "unknown dtype";
}

size_t moe_npy_dtype_size(enum moe_npy_dtype dtype)
{
    return dtype_valid(dtype) ? dtype_info[dtype].size : 0;
}

char moe_npy_dtype_kind(enum moe_npy_dtype dtype)
{
    return dtype_valid(dtype) ? dtype_info[dtype].kind : '?';
}

/* Finds the dtype of a descr. A one-byte dtype matches with any
 * byte-order character, because byte order does not apply to it. */
static bool dtype_from_descr(const char *descr, enum moe_npy_dtype *dtype)
{
    for (int d = 0; d < NPY_DTYPE_COUNT; d++) {
        const struct npy_dtype_info *info = &dtype_info[d];
        bool match = strcmp(descr, info->descr) == 0;
        if (!match && info->size == 1 && descr[0] != '\0' &&
            strchr("<>=|", descr[0]) != NULL)
            match = strcmp(descr + 1, info->descr + 1) == 0;
        if (match) {
            *dtype = (enum moe_npy_dtype)d;
            return true;
        }
    }
    return false;
}

/* Lists the accepted dtypes as "float32 ('<f4')" or "one of float16
 * ('<f2'), float32 ('<f4')". */
static void format_accepted(const enum moe_npy_dtype *accepted, int count,
                            char *buf, size_t size)
{
    size_t used = (size_t)snprintf(buf, size, "%s", count > 1 ? "one of " : "");
    for (int i = 0; i < count && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, "%s%s ('%s')",
                                 i > 0 ? ", " : "",
                                 dtype_info[accepted[i]].name,
                                 dtype_info[accepted[i]].descr);
}

/* Checks that descr names one of the accepted dtypes and stores it. */
static int check_dtype(const char *path, const char *descr,
                       const enum moe_npy_dtype *accepted, int count,
                       enum moe_npy_dtype *dtype)
{
    char expected[256];
    format_accepted(accepted, count, expected, sizeof expected);

    enum moe_npy_dtype found;
    if (dtype_from_descr(descr, &found)) {
        for (int i = 0; i < count; i++) {
            if (accepted[i] == found) {
                *dtype = found;
                return 0;
            }
        }
        return moe_fail(-EINVAL, "%s: unsupported dtype '%s'; expected %s, "
                        "but the file contains %s",
                        path, descr, expected, dtype_info[found].name);
    }

    /* '>f4' is a known dtype in big-endian byte order. '=f4' (native
     * order) is rejected too, because the file does not record which byte
     * order its writer had. np.save() writes '<' or '>' for these dtypes. */
    char little[32];
    snprintf(little, sizeof little, "<%s", descr[0] != '\0' ? descr + 1 : "");
    if (descr[0] == '>' && dtype_from_descr(little, &found))
        return moe_fail(-EINVAL,
                        "%s: unsupported dtype '%s' (big-endian %s); expected "
                        "%s; save the array with .astype('%s') first",
                        path, descr, dtype_info[found].name, expected, little);
    return moe_fail(-EINVAL, "%s: unsupported dtype '%s'; expected %s", path,
                    descr, expected);
}

/* ---- file I/O --------------------------------------------------------- */

/* Reads until `count` bytes or end of file, and stores in *got how many
 * arrived. Returns 0 or -errno. */
static int read_full(int fd, void *buf, size_t count, size_t *got)
{
    size_t done = 0;
    while (done < count) {
        ssize_t n = read(fd, (uint8_t *)buf + done, count - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            *got = done;
            return -errno;
        }
        if (n == 0)
            break;
        done += (size_t)n;
    }
    *got = done;
    return 0;
}

void moe_npy_format_shape(int ndim, const int64_t *shape, char *buf,
                          size_t size)
{
    if (size == 0)
        return;
    size_t used = (size_t)snprintf(buf, size, "(");
    for (int i = 0; i < ndim && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, "%s%" PRId64,
                                 i > 0 ? ", " : "", shape[i]);
    if (used < size)
        snprintf(buf + used, size - used, ndim == 1 ? ",)" : ")");
}

/* Reads the magic, version, length field and header dict from fd, which is
 * at offset 0, and leaves fd at the first data byte. */
static int read_header(int fd, const char *path, struct moe_npy_header *h)
{
    /* The 12-byte prefix of versions 2.0 and 3.0 is enough to learn the
     * header length. In a 1.0 file the last 2 of these bytes already belong
     * to the header. */
    uint8_t prefix[12];
    size_t got;
    int rc = read_full(fd, prefix, sizeof prefix, &got);
    if (rc < 0)
        return moe_fail(rc, "%s: read failed: %s", path, strerror(-rc));

    uint64_t data_offset;
    rc = parse_prefix(prefix, got, path, &data_offset);
    if (rc < 0)
        return rc;

    /* A 1.0 header shorter than 2 bytes cannot contain the three keys, but
     * its file must still be rejected without reading past the header. */
    if (data_offset < got)
        return moe_fail(-EINVAL,
                        "%s: malformed .npy header: header length %" PRIu64
                        " bytes is too short for the dict",
                        path, data_offset - 10);

    uint8_t *buf = malloc((size_t)data_offset);
    if (buf == NULL)
        return moe_fail(-ENOMEM, "%s: out of memory for a %" PRIu64
                        "-byte .npy header", path, data_offset);
    memcpy(buf, prefix, got);

    size_t rest;
    rc = read_full(fd, buf + got, (size_t)data_offset - got, &rest);
    if (rc < 0) {
        free(buf);
        return moe_fail(rc, "%s: read failed: %s", path, strerror(-rc));
    }

    rc = moe_npy_parse_header(buf, got + rest, path, h);
    free(buf);
    return rc;
}

/* The dtypes a reader accepts and the number of dimensions it requires,
 * where ndim -1 accepts any. */
struct npy_request {
    const enum moe_npy_dtype *dtypes;
    int dtype_count;
    int ndim;
};

/* An open .npy file whose header has been read and checked. */
struct npy_reader {
    const char *path;
    int fd;
    struct stat st;
    struct moe_npy_header header;
    enum moe_npy_dtype dtype;
    int64_t count;       /* elements */
    uint64_t data_bytes; /* count times the element size */
};

/* Computes the element count and data size of the header's shape. Both
 * must stay below 2^63, the file offset of the last byte too, and the size
 * must fit size_t for malloc. */
static int compute_size(struct npy_reader *r, const char *shape_text)
{
    const struct moe_npy_header *h = &r->header;
    uint64_t element_bytes = dtype_info[r->dtype].size;
    uint64_t limit = (uint64_t)INT64_MAX;
    if (SIZE_MAX < limit)
        limit = SIZE_MAX;
    uint64_t max_count = limit / element_bytes;

    uint64_t count = 1;
    bool has_zero = false;
    for (int i = 0; i < h->ndim; i++)
        has_zero |= h->shape[i] == 0;
    if (has_zero)
        count = 0;

    bool overflows = false;
    for (int i = 0; i < h->ndim && count != 0 && !overflows; i++) {
        uint64_t dim = (uint64_t)h->shape[i];
        if (count > max_count / dim)
            overflows = true;
        else
            count *= dim;
    }
    uint64_t bytes = count * element_bytes;
    if (!overflows)
        overflows = bytes > (uint64_t)INT64_MAX - h->data_offset;
    if (overflows)
        return moe_fail(-EINVAL,
                        "%s: shape %s of %s is too large: its size in bytes "
                        "overflows",
                        r->path, shape_text, dtype_info[r->dtype].name);

    r->count = (int64_t)count;
    r->data_bytes = bytes;
    return 0;
}

/* Checks the dtype, order, number of dimensions and size in the header
 * against the request. */
static int check_header(struct npy_reader *r, const struct npy_request *req)
{
    const struct moe_npy_header *h = &r->header;
    char shape[256];
    moe_npy_format_shape(h->ndim, h->shape, shape, sizeof shape);

    int rc = check_dtype(r->path, h->descr, req->dtypes, req->dtype_count,
                         &r->dtype);
    if (rc < 0)
        return rc;

    /* 0-D and 1-D arrays have the same layout in both orders. */
    if (h->fortran_order && (h->ndim >= 2 || req->ndim >= 2))
        return moe_fail(-EINVAL,
                        "%s: array is in Fortran (column-major) order; expected "
                        "C order (fortran_order False); save it with "
                        "np.ascontiguousarray() first",
                        r->path);
    if (req->ndim >= 0 && h->ndim != req->ndim)
        return moe_fail(-EINVAL, "%s: array has shape %s; expected a %d-D array",
                        r->path, shape, req->ndim);
    return compute_size(r, shape);
}

/* Opens path, reads its header and checks it against the request. On
 * success r->fd is open and at the first data byte. */
static int open_reader(const char *path, const struct npy_request *req,
                       struct npy_reader *r)
{
    memset(r, 0, sizeof *r);
    r->path = path;
    r->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (r->fd < 0) {
        int err = errno;
        return moe_fail(-err, "%s: open failed: %s", path, strerror(err));
    }

    int rc = 0;
    if (fstat(r->fd, &r->st) < 0) {
        int err = errno;
        rc = moe_fail(-err, "%s: fstat failed: %s", path, strerror(err));
    }
    if (rc == 0)
        rc = read_header(r->fd, path, &r->header);
    if (rc == 0)
        rc = check_header(r, req);
    if (rc < 0) {
        close(r->fd);
        r->fd = -1;
    }
    return rc;
}

static void close_reader(struct npy_reader *r)
{
    if (r->fd >= 0)
        close(r->fd);
    r->fd = -1;
}

/* Rejects an array whose memory, result_bytes, exceeds max_bytes, and a
 * regular file shorter than its header requires. Both checks come before
 * any allocation, so that a header claiming a huge shape costs nothing. */
static int check_before_allocating(const struct npy_reader *r,
                                   uint64_t result_bytes, uint64_t max_bytes)
{
    if (result_bytes > max_bytes)
        return moe_fail(-EINVAL, "%s: the array's %" PRIu64 " bytes exceed the "
                        "limit of %" PRIu64 " bytes", r->path, result_bytes,
                        max_bytes);

    uint64_t end = r->header.data_offset + r->data_bytes;
    if (S_ISREG(r->st.st_mode) && (uint64_t)r->st.st_size < end) {
        uint64_t found = (uint64_t)r->st.st_size > r->header.data_offset
                             ? (uint64_t)r->st.st_size - r->header.data_offset
                             : 0;
        return moe_fail(-EINVAL,
                        "%s: truncated .npy data: expected %" PRIu64
                        " bytes after the header, found %" PRIu64,
                        r->path, r->data_bytes, found);
    }
    return 0;
}

static int fail_truncated(const struct npy_reader *r, uint64_t found)
{
    return moe_fail(-EINVAL,
                    "%s: truncated .npy data: expected %" PRIu64
                    " bytes after the header, found %" PRIu64,
                    r->path, r->data_bytes, found);
}

/* Checks that the file ends right after the data. */
static int check_no_trailing_bytes(const struct npy_reader *r)
{
    uint8_t extra[4096];
    size_t got;
    int rc = read_full(r->fd, extra, sizeof extra, &got);
    if (rc < 0)
        return moe_fail(rc, "%s: read failed: %s", r->path, strerror(-rc));
    if (got == 0)
        return 0;

    /* For a regular file the size gives the exact count. Otherwise the
     * message gives the bytes read so far, a lower bound. */
    uint64_t trailing = got;
    uint64_t expected_end = r->header.data_offset + r->data_bytes;
    if (S_ISREG(r->st.st_mode) && (uint64_t)r->st.st_size > expected_end)
        trailing = (uint64_t)r->st.st_size - expected_end;
    return moe_fail(-EINVAL,
                    "%s: %" PRIu64 " trailing bytes after the %" PRIu64
                    " bytes of data",
                    r->path, trailing, r->data_bytes);
}

/* Reads exactly r->data_bytes into data and checks that nothing follows. */
static int read_data(const struct npy_reader *r, void *data)
{
    size_t got;
    int rc = read_full(r->fd, data, (size_t)r->data_bytes, &got);
    if (rc < 0)
        return moe_fail(rc, "%s: read failed: %s", r->path, strerror(-rc));
    if (got < r->data_bytes)
        return fail_truncated(r, got);
    return check_no_trailing_bytes(r);
}

/* Converts count float16 or float64 elements at src to float32. Returns
 * the index of the first finite float64 value that float32 cannot hold
 * (it would become an infinity), or count when there is none. */
static size_t convert_to_f32(enum moe_npy_dtype dtype, const uint8_t *src,
                             size_t count, float *dst)
{
    for (size_t i = 0; i < count; i++) {
        if (dtype == MOE_NPY_F16) {
            uint16_t bits;
            memcpy(&bits, src + 2 * i, sizeof bits);
            dst[i] = moe_f16_to_f32(bits);
        } else {
            double value;
            memcpy(&value, src + 8 * i, sizeof value);
            dst[i] = (float)value; /* rounds to nearest in the default mode */
            if (isfinite(value) && !isfinite(dst[i]))
                return i;
        }
    }
    return count;
}

/* Reads r->data_bytes of float16 or float64 data in pieces, converts them
 * into data (r->count floats) and checks that nothing follows. */
static int read_data_as_f32(const struct npy_reader *r, float *data)
{
    uint64_t piece[2048]; /* 16 KiB, aligned for any element size */
    size_t element_bytes = dtype_info[r->dtype].size;
    size_t piece_elements = sizeof piece / element_bytes;
    uint64_t done = 0;

    while (done < (uint64_t)r->count) {
        uint64_t left = (uint64_t)r->count - done;
        size_t elements = left < piece_elements ? (size_t)left : piece_elements;
        size_t got;
        int rc = read_full(r->fd, piece, elements * element_bytes, &got);
        if (rc < 0)
            return moe_fail(rc, "%s: read failed: %s", r->path, strerror(-rc));
        if (got < elements * element_bytes)
            return fail_truncated(r, done * element_bytes + got);
        size_t bad = convert_to_f32(r->dtype, (const uint8_t *)piece, elements,
                                    data + done);
        if (bad < elements) {
            double value;
            memcpy(&value, (const uint8_t *)piece + 8 * bad, sizeof value);
            return moe_fail(-EINVAL, "%s: element %" PRIu64 " is %g, outside the "
                            "range of float32", r->path, done + bad, value);
        }
        done += elements;
    }
    return check_no_trailing_bytes(r);
}

/* Rejects a '|b1' array with a byte other than 0 or 1, which np.save()
 * never writes and which would make two true values compare unequal. */
static int check_bool_values(const char *path, const uint8_t *data,
                             int64_t count)
{
    for (int64_t i = 0; i < count; i++)
        if (data[i] > 1)
            return moe_fail(-EINVAL, "%s: invalid bool value 0x%02x at "
                            "element %" PRId64 "; a bool array contains only "
                            "the bytes 0 and 1", path, data[i], i);
    return 0;
}

int moe_npy_read(const char *path, uint64_t max_bytes,
                 struct moe_npy_array *out)
{
    static const enum moe_npy_dtype every_dtype[] = {
        MOE_NPY_F16, MOE_NPY_F32, MOE_NPY_F64, MOE_NPY_I32,
        MOE_NPY_I64, MOE_NPY_BOOL, MOE_NPY_U8,
    };
    const struct npy_request req = {every_dtype, NPY_DTYPE_COUNT, -1};
    memset(out, 0, sizeof *out);

    struct npy_reader r;
    int rc = open_reader(path, &req, &r);
    if (rc < 0)
        return rc;

    void *data = NULL;
    rc = check_before_allocating(&r, r.data_bytes, max_bytes);
    if (rc == 0) {
        data = malloc(r.data_bytes > 0 ? (size_t)r.data_bytes : 1);
        if (data == NULL)
            rc = moe_fail(-ENOMEM, "%s: out of memory for %" PRIu64
                          " bytes of data", path, r.data_bytes);
    }
    if (rc == 0)
        rc = read_data(&r, data);
    if (rc == 0 && r.dtype == MOE_NPY_BOOL)
        rc = check_bool_values(path, data, r.count);
    close_reader(&r);
    if (rc < 0) {
        free(data);
        return rc;
    }

    out->dtype = r.dtype;
    out->ndim = r.header.ndim;
    memcpy(out->shape, r.header.shape, sizeof out->shape);
    out->count = r.count;
    out->data = data;
    return 0;
}

void moe_npy_array_free(struct moe_npy_array *array)
{
    free(array->data);
    memset(array, 0, sizeof *array);
}

/* Reads a 2-D array of one of the accepted float dtypes into a new float32
 * array. moe_npy_read_f32_limited() and moe_npy_read_as_f32() share it. */
static int read_matrix_as_f32(const char *path, uint64_t max_bytes,
                              const struct npy_request *req, float **data,
                              int64_t *rows, int64_t *cols)
{
    *data = NULL;
    *rows = 0;
    *cols = 0;

    struct npy_reader r;
    int rc = open_reader(path, req, &r);
    if (rc < 0)
        return rc;

    /* compute_size() bounded the file's data size, but a float16 file
     * doubles in size as float32. */
    float *matrix = NULL;
    uint64_t result_bytes = 0;
    if ((uint64_t)r.count > (uint64_t)INT64_MAX / sizeof(float) ||
        (uint64_t)r.count > SIZE_MAX / sizeof(float))
        rc = moe_fail(-EINVAL, "%s: %" PRId64 " elements are too many to "
                      "convert to float32: the size in bytes overflows",
                      path, r.count);
    else
        result_bytes = (uint64_t)r.count * sizeof(float);
    if (rc == 0)
        rc = check_before_allocating(&r, result_bytes, max_bytes);
    if (rc == 0) {
        matrix = malloc(result_bytes > 0 ? (size_t)result_bytes : 1);
        if (matrix == NULL)
            rc = moe_fail(-ENOMEM, "%s: out of memory for %" PRIu64
                          " bytes of data", path, result_bytes);
    }
    if (rc == 0 && r.dtype == MOE_NPY_F32)
        rc = read_data(&r, matrix);
    else if (rc == 0)
        rc = read_data_as_f32(&r, matrix);
    close_reader(&r);
    if (rc < 0) {
        free(matrix);
        return rc;
    }

    *data = matrix;
    *rows = r.header.shape[0];
    *cols = r.header.shape[1];
    return 0;
}

int moe_npy_read_f32(const char *path, float **data, int64_t *rows,
                     int64_t *cols)
{
    return moe_npy_read_f32_limited(path, UINT64_MAX, data, rows, cols);
}

int moe_npy_read_f32_limited(const char *path, uint64_t max_bytes, float **data,
                             int64_t *rows, int64_t *cols)
{
    static const enum moe_npy_dtype f32_only[] = {MOE_NPY_F32};
    const struct npy_request req = {f32_only, 1, 2};
    return read_matrix_as_f32(path, max_bytes, &req, data, rows, cols);
}

int moe_npy_read_as_f32(const char *path, uint64_t max_bytes, float **data,
                        int64_t *rows, int64_t *cols)
{
    static const enum moe_npy_dtype float_dtypes[] = {
        MOE_NPY_F32, MOE_NPY_F16, MOE_NPY_F64,
    };
    const struct npy_request req = {float_dtypes, 3, 2};
    return read_matrix_as_f32(path, max_bytes, &req, data, rows, cols);
}

/* ---- writing ---------------------------------------------------------- */

/* Formats the complete 1.0 prefix and header for the array into buf, byte
 * for byte as np.save() in numpy 1.24 does, and returns its length, a
 * multiple of 64, or 0 when buf is too small. */
static size_t format_header(char *buf, size_t size, enum moe_npy_dtype dtype,
                            int ndim, const int64_t *shape)
{
    char shape_text[256];
    moe_npy_format_shape(ndim, shape, shape_text, sizeof shape_text);
    char dict[384];
    int dict_bytes = snprintf(dict, sizeof dict,
                              "{'descr': '%s', 'fortran_order': False, "
                              "'shape': %s, }",
                              dtype_info[dtype].descr, shape_text);
    if (dict_bytes < 0 || (size_t)dict_bytes >= sizeof dict)
        return 0;

    /* np.save() leaves room for shape[0] to grow to 21 digits, and none
     * in the header of a 0-D array. */
    size_t growth_spaces = 0;
    if (ndim > 0) {
        char digits[24];
        int first_digits = snprintf(digits, sizeof digits, "%" PRId64, shape[0]);
        growth_spaces = (size_t)(NPY_GROWTH_DIGITS - first_digits);
    }

    /* numpy adds 1..64 spaces, never 0, before the final newline. */
    size_t text_bytes = (size_t)dict_bytes + growth_spaces + 1;
    size_t prefix_bytes = 10;
    size_t pad_spaces =
        NPY_ALIGN_BYTES - (prefix_bytes + text_bytes) % NPY_ALIGN_BYTES;
    size_t header_bytes = text_bytes + pad_spaces;
    size_t total = prefix_bytes + header_bytes;

    /* With 8 dimensions of 19 digits, the prefix and header take 256
     * bytes. */
    if (total > size)
        return 0;

    memcpy(buf, npy_magic, NPY_MAGIC_BYTES);
    buf[6] = 1;
    buf[7] = 0;
    buf[8] = (char)(header_bytes & 0xff);
    buf[9] = (char)(header_bytes >> 8);
    memcpy(buf + prefix_bytes, dict, (size_t)dict_bytes);
    memset(buf + prefix_bytes + dict_bytes, ' ', growth_spaces + pad_spaces);
    buf[total - 1] = '\n';
    return total;
}

/* Checks ndim and shape and computes the data size in bytes. */
static int check_write_shape(const char *path, enum moe_npy_dtype dtype,
                             int ndim, const int64_t *shape,
                             uint64_t *data_bytes)
{
    if (ndim < 0 || ndim > MOE_NPY_MAX_DIMS)
        return moe_fail(-EINVAL, "%s: invalid ndim %d: expected 0 to %d", path,
                        ndim, MOE_NPY_MAX_DIMS);
    if (ndim > 0 && shape == NULL)
        return moe_fail(-EINVAL, "%s: shape is NULL for ndim %d", path, ndim);

    char shape_text[256];
    moe_npy_format_shape(ndim, shape, shape_text, sizeof shape_text);
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 0)
            return moe_fail(-EINVAL,
                            "%s: invalid shape %s: dimensions must be >= 0",
                            path, shape_text);

    uint64_t element_bytes = dtype_info[dtype].size;
    uint64_t count = 1;
    for (int i = 0; i < ndim; i++)
        if (shape[i] == 0)
            count = 0;
    for (int i = 0; i < ndim && count != 0; i++) {
        uint64_t dim = (uint64_t)shape[i];
        if (count > (uint64_t)INT64_MAX / element_bytes / dim)
            return moe_fail(-EINVAL,
                            "%s: invalid shape %s: its size in bytes overflows",
                            path, shape_text);
        count *= dim;
    }

    uint64_t bytes = count * element_bytes;
    if (bytes > SIZE_MAX)
        return moe_fail(-EINVAL,
                        "%s: invalid size %" PRIu64 " bytes: larger than "
                        "SIZE_MAX", path, bytes);
    *data_bytes = bytes;
    return 0;
}

int moe_npy_write(const char *path, enum moe_npy_dtype dtype, int ndim,
                  const int64_t *shape, const void *data)
{
    if (!dtype_valid(dtype))
        return moe_fail(-EINVAL, "%s: invalid dtype %d", path, (int)dtype);

    uint64_t data_bytes = 0;
    int rc = check_write_shape(path, dtype, ndim, shape, &data_bytes);
    if (rc < 0)
        return rc;
    if (data == NULL && data_bytes > 0)
        return moe_fail(-EINVAL, "%s: data is NULL", path);
    if (dtype == MOE_NPY_BOOL) {
        rc = check_bool_values(path, data, (int64_t)data_bytes);
        if (rc < 0)
            return rc;
    }

    char header[512];
    size_t header_bytes = format_header(header, sizeof header, dtype, ndim,
                                        shape);
    if (header_bytes == 0)
        return moe_fail(-EINVAL, "%s: .npy header does not fit in %zu bytes",
                        path, sizeof header);

    struct moe_file_part parts[2] = {
        {header, header_bytes},
        {data, (size_t)data_bytes},
    };
    return moe_write_file(path, parts, 2);
}

int moe_npy_write_f32(const char *path, const float *data, int64_t rows,
                      int64_t cols)
{
    const int64_t shape[2] = {rows, cols};
    return moe_npy_write(path, MOE_NPY_F32, 2, shape, data);
}
