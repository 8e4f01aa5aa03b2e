/*
 * npy.c - NumPy .npy files of 2-D float32 arrays (see moe_npy.h).
 *
 * Any process may call these functions; they hold no state besides a
 * counter for temporary file names. The header parser accepts the subset of
 * Python literal syntax that np.save() writes: a dict whose keys and strings
 * are quoted without escape sequences, True/False, and a tuple of decimal
 * integers. Anything else is a malformed header. Some headers that
 * numpy.load() accepts are rejected here: strings with escape sequences,
 * duplicate keys and Python 2 "L" suffixes on integers. np.save() under
 * Python 3 writes none of these.
 *
 * Limits: the reader loads the whole array into memory (no mmap), and the
 * writer always writes format 1.0, which fits any 2-D float32 header.
 */
#include "moe_npy.h"
#include "moe_file.h"
#include "moe_error.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "npy.c copies '<f4' data unchanged and needs a little-endian host"
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

/* Formats the shape as Python prints a tuple: (), (6,), (2, 3). */
static void format_shape(const struct moe_npy_header *h, char *buf,
                         size_t size)
{
    size_t used = (size_t)snprintf(buf, size, "(");
    for (int i = 0; i < h->ndim && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, "%s%" PRId64,
                                 i > 0 ? ", " : "", h->shape[i]);
    if (used < size)
        snprintf(buf + used, size - used, h->ndim == 1 ? ",)" : ")");
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

/* Checks that the header describes a C-order 2-D float32 array and returns
 * its data size in bytes. */
static int check_f32_matrix(const struct moe_npy_header *h, const char *path,
                            uint64_t *data_bytes)
{
    char shape[256];
    format_shape(h, shape, sizeof shape);

    /* '=f4' (native order) is rejected too, because the file does not
     * record which byte order its writer had. np.save() writes '<f4' or
     * '>f4' for float32. */
    if (strcmp(h->descr, "<f4") != 0)
        return moe_fail(-EINVAL,
                        "%s: unsupported dtype '%s'; expected float32 ('<f4')",
                        path, h->descr);
    if (h->fortran_order)
        return moe_fail(-EINVAL,
                        "%s: array is in Fortran (column-major) order; expected "
                        "C order (fortran_order False)",
                        path);
    if (h->ndim != 2)
        return moe_fail(-EINVAL,
                        "%s: array has shape %s; expected a 2-D array", path,
                        shape);

    /* Both dimensions are below 2^63; the product and the file offset of
     * the last byte must stay below 2^63 too, and the size must fit size_t
     * for malloc. */
    uint64_t rows = (uint64_t)h->shape[0], cols = (uint64_t)h->shape[1];
    uint64_t limit = (uint64_t)INT64_MAX;
    if (SIZE_MAX < limit)
        limit = SIZE_MAX;
    bool overflows = cols != 0 && rows > limit / sizeof(float) / cols;
    if (!overflows) {
        uint64_t bytes = rows * cols * sizeof(float);
        overflows = bytes > (uint64_t)INT64_MAX - h->data_offset;
        *data_bytes = bytes;
    }
    if (overflows)
        return moe_fail(-EINVAL,
                        "%s: shape %s of float32 is too large: its size in "
                        "bytes overflows",
                        path, shape);
    return 0;
}

/* Reads exactly data_bytes into data and checks that nothing follows. */
static int read_data(int fd, const char *path, const struct stat *st,
                     const struct moe_npy_header *h, uint64_t data_bytes,
                     float *data)
{
    size_t got;
    int rc = read_full(fd, data, (size_t)data_bytes, &got);
    if (rc < 0)
        return moe_fail(rc, "%s: read failed: %s", path, strerror(-rc));
    if (got < data_bytes)
        return moe_fail(-EINVAL,
                        "%s: truncated .npy data: expected %" PRIu64
                        " bytes after the header, found %zu",
                        path, data_bytes, got);

    uint8_t extra[4096];
    rc = read_full(fd, extra, sizeof extra, &got);
    if (rc < 0)
        return moe_fail(rc, "%s: read failed: %s", path, strerror(-rc));
    if (got > 0) {
        /* For a regular file the size gives the exact count. Otherwise the
         * message gives the bytes read so far, a lower bound. */
        uint64_t trailing = got;
        uint64_t expected_end = h->data_offset + data_bytes;
        if (S_ISREG(st->st_mode) && (uint64_t)st->st_size > expected_end)
            trailing = (uint64_t)st->st_size - expected_end;
        return moe_fail(-EINVAL,
                        "%s: %" PRIu64 " trailing bytes after the %" PRIu64
                        " bytes of data",
                        path, trailing, data_bytes);
    }
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
    *data = NULL;
    *rows = 0;
    *cols = 0;

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        return moe_fail(-err, "%s: open failed: %s", path, strerror(err));
    }

    struct stat st;
    struct moe_npy_header h;
    uint64_t data_bytes = 0;
    float *array = NULL;
    int rc = 0;

    if (fstat(fd, &st) < 0) {
        int err = errno;
        rc = moe_fail(-err, "%s: fstat failed: %s", path, strerror(err));
        goto out;
    }
    rc = read_header(fd, path, &h);
    if (rc < 0)
        goto out;
    rc = check_f32_matrix(&h, path, &data_bytes);
    if (rc < 0)
        goto out;
    if (data_bytes > max_bytes) {
        rc = moe_fail(-EINVAL, "%s: the array's %" PRIu64 " bytes exceed the "
                      "limit of %" PRIu64 " bytes", path, data_bytes, max_bytes);
        goto out;
    }

    /* For a regular file, compare sizes before allocating, so that a header
     * claiming a huge shape costs nothing. */
    if (S_ISREG(st.st_mode) &&
        (uint64_t)st.st_size < h.data_offset + data_bytes) {
        uint64_t found = (uint64_t)st.st_size > h.data_offset
                             ? (uint64_t)st.st_size - h.data_offset
                             : 0;
        rc = moe_fail(-EINVAL,
                      "%s: truncated .npy data: expected %" PRIu64
                      " bytes after the header, found %" PRIu64,
                      path, data_bytes, found);
        goto out;
    }

    array = malloc(data_bytes > 0 ? (size_t)data_bytes : 1);
    if (array == NULL) {
        rc = moe_fail(-ENOMEM, "%s: out of memory for %" PRIu64
                      " bytes of data", path, data_bytes);
        goto out;
    }
    rc = read_data(fd, path, &st, &h, data_bytes, array);
    if (rc < 0)
        goto out;

    *data = array;
    array = NULL;
    *rows = h.shape[0];
    *cols = h.shape[1];

out:
    free(array);
    close(fd);
    return rc;
}

/* Formats the complete 1.0 prefix and header for (rows, cols) into buf,
 * byte for byte as np.save() in numpy 1.24 does, and returns its length, a
 * multiple of 64. */
static size_t format_header(char *buf, size_t size, int64_t rows,
                            int64_t cols)
{
    char dict[128];
    int dict_bytes = snprintf(dict, sizeof dict,
                              "{'descr': '<f4', 'fortran_order': False, "
                              "'shape': (%" PRId64 ", %" PRId64 "), }",
                              rows, cols);

    char digits[24];
    int row_digits = snprintf(digits, sizeof digits, "%" PRId64, rows);
    size_t growth_spaces = (size_t)(NPY_GROWTH_DIGITS - row_digits);

    /* numpy adds 1..64 spaces, never 0, before the final newline. */
    size_t text_bytes = (size_t)dict_bytes + growth_spaces + 1;
    size_t prefix_bytes = 10;
    size_t pad_spaces =
        NPY_ALIGN_BYTES - (prefix_bytes + text_bytes) % NPY_ALIGN_BYTES;
    size_t header_bytes = text_bytes + pad_spaces;
    size_t total = prefix_bytes + header_bytes;

    /* With two 19-digit dimensions, the prefix and header take 128 bytes. */
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

int moe_npy_write_f32(const char *path, const float *data, int64_t rows,
                      int64_t cols)
{
    if (rows < 0 || cols < 0)
        return moe_fail(-EINVAL,
                        "%s: invalid shape (%" PRId64 ", %" PRId64
                        "): dimensions must be >= 0",
                        path, rows, cols);
    if (cols != 0 && (uint64_t)rows > (uint64_t)INT64_MAX / sizeof(float) /
                                          (uint64_t)cols)
        return moe_fail(-EINVAL,
                        "%s: invalid shape (%" PRId64 ", %" PRId64
                        "): its size in bytes overflows",
                        path, rows, cols);
    uint64_t data_bytes = (uint64_t)rows * (uint64_t)cols * sizeof(float);
    if (data_bytes > SIZE_MAX)
        return moe_fail(-EINVAL,
                        "%s: invalid size %" PRIu64 " bytes: larger than "
                        "SIZE_MAX", path, data_bytes);
    if (data == NULL && data_bytes > 0)
        return moe_fail(-EINVAL, "%s: data is NULL", path);

    char header[256];
    size_t header_bytes = format_header(header, sizeof header, rows, cols);
    if (header_bytes == 0)
        return moe_fail(-EINVAL, "%s: .npy header does not fit in %zu bytes",
                        path, sizeof header);

    struct moe_file_part parts[2] = {
        {header, header_bytes},
        {data, (size_t)data_bytes},
    };
    return moe_write_file(path, parts, 2);
}
