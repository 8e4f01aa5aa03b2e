/*
 * moe_npy.h - reading and writing arrays in NumPy's .npy format.
 *
 * This is how the program exchanges tokens, outputs and stage dumps with
 * Python: np.save() and np.load() read and write the same files. Only the
 * subset the layer and its dumps need is supported: the little-endian
 * dtypes of enum moe_npy_dtype, C order, 0 to 8 dimensions. Any other file
 * is rejected with -EINVAL and a message that names the file and states
 * what was found.
 *
 * The .npy layout (format versions 1.0, 2.0 and 3.0):
 *   bytes 0-5   magic "\x93NUMPY"
 *   bytes 6-7   major and minor version
 *   then        header length, uint16 little-endian in 1.0, uint32 in 2.0/3.0
 *   then        the header: a Python dict literal such as
 *               {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
 *               padded with spaces and ending in '\n'
 *   then        the data, element count * element size bytes, and nothing
 *               after it.
 *
 * The data is copied to and from memory unchanged, so these functions
 * compile only for little-endian hosts.
 */
#ifndef MOE_NPY_H
#define MOE_NPY_H

#include <stddef.h>
#include <stdint.h>

/* Maximum number of dimensions in struct moe_npy_header. The parser
 * rejects a header with more. */
#define MOE_NPY_MAX_DIMS 8

/* The fields of a .npy header, as moe_npy_parse_header() found them. */
struct moe_npy_header {
    char descr[16];    /* dtype string, NUL-terminated, e.g. "<f4" */
    int fortran_order; /* 1 for column-major data, 0 for C order */
    int ndim;          /* number of entries in shape, 0..MOE_NPY_MAX_DIMS */
    int64_t shape[MOE_NPY_MAX_DIMS]; /* (ndim) dimensions, each >= 0 */
    uint64_t data_offset; /* bytes from the start of the file to the data */
};

/* The element types the reader and writer support. Each is written with
 * the descr that np.save() uses for it. */
enum moe_npy_dtype {
    MOE_NPY_F16,  /* '<f2', IEEE 754 binary16 */
    MOE_NPY_F32,  /* '<f4' */
    MOE_NPY_F64,  /* '<f8' */
    MOE_NPY_I32,  /* '<i4' */
    MOE_NPY_I64,  /* '<i8' */
    MOE_NPY_BOOL, /* '|b1', one byte of value 0 or 1 */
    MOE_NPY_U8,   /* '|u1' */
};

/* The descr that np.save() writes for dtype, such as "<f4". */
const char *moe_npy_dtype_descr(enum moe_npy_dtype dtype);

/* The NumPy name of dtype, such as "float32". */
const char *moe_npy_dtype_name(enum moe_npy_dtype dtype);

/* The size of one element in bytes. */
size_t moe_npy_dtype_size(enum moe_npy_dtype dtype);

/* The NumPy kind character of dtype: 'f' floating point, 'i' signed
 * integer, 'u' unsigned integer, 'b' bool. */
char moe_npy_dtype_kind(enum moe_npy_dtype dtype);

/* An array read from a .npy file, in C (row-major) order. */
struct moe_npy_array {
    enum moe_npy_dtype dtype;
    int ndim;                        /* 0..MOE_NPY_MAX_DIMS */
    int64_t shape[MOE_NPY_MAX_DIMS]; /* (ndim) dimensions, each >= 0 */
    int64_t count;                   /* product of the dimensions, 1 when
                                        ndim is 0 */
    void *data;                      /* count elements of dtype */
};

/* Reads a .npy file of any supported dtype and 0 to 8 dimensions into
 * *out. On success out->data is a new array that moe_npy_array_free()
 * releases, and it is non-NULL even when count is 0. On failure *out is
 * zeroed.
 *
 * Accepts format versions 1.0, 2.0 and 3.0 and the descrs of enum
 * moe_npy_dtype. For the one-byte dtypes the byte-order character may also
 * be '<', '>' or '=', because some writers, such as the C++ library cnpy,
 * put the host's byte order there ('<u1').
 * Fortran order is accepted only for 0-D and 1-D arrays, whose layout does
 * not depend on it. A '|b1' array with a byte other than 0 or 1 is
 * rejected.
 *
 * Returns -EINVAL for any other file (bad magic, unsupported version,
 * malformed header, another or big-endian dtype, Fortran order, a size that
 * overflows or exceeds max_bytes, missing or trailing data bytes), -ENOMEM,
 * or -errno of the failing system call. The max_bytes check comes before
 * any allocation. */
int moe_npy_read(const char *path, uint64_t max_bytes,
                 struct moe_npy_array *out);

/* Frees the data of an array from moe_npy_read() and zeroes *array. Safe
 * on a zeroed array. */
void moe_npy_array_free(struct moe_npy_array *array);

/* Writes an array of ndim (0..8) dimensions, row-major, as a version 1.0
 * .npy file with the descr of dtype. The bytes match what np.save() in
 * numpy 1.24 writes for the same array, including the header padding that
 * aligns the data to 64 bytes. shape may be NULL when ndim is 0, and data
 * may be NULL when the array has no elements. A MOE_NPY_BOOL array must
 * contain only the bytes 0 and 1.
 *
 * The file is written through moe_write_file(), so a failure leaves either
 * the old file or no file, never a partial one.
 *
 * Returns 0, -EINVAL for an invalid ndim, a negative dimension, a size
 * that overflows, NULL data or a bool byte other than 0 or 1, or -errno of
 * the failing system call. */
int moe_npy_write(const char *path, enum moe_npy_dtype dtype, int ndim,
                  const int64_t *shape, const void *data);

/* Reads a 2-D float array, the token input (T, H) of `moe-ep run --input`,
 * and converts it to float32. Accepts '<f4', '<f2' and '<f8' in C order.
 * float16 values convert exactly (moe_f16_to_f32), and float64 values are
 * rounded to the nearest float32, ties to even. A finite float64 beyond
 * the float32 range is rejected with -EINVAL rather than turned into an
 * infinity; NaN and infinities pass through. max_bytes bounds the float32 result,
 * rows * cols * 4 bytes, and is checked before allocating. The file is
 * converted in 16 KiB pieces, so no buffer of the file's data size is
 * allocated.
 *
 * On success *data is a new (rows, cols) row-major array that the caller
 * releases with free(), and it is non-NULL even when rows * cols == 0. On
 * failure *data is NULL and *rows and *cols are 0. Returns -EINVAL for
 * another dtype, big-endian data, Fortran order, a shape that is not 2-D,
 * truncated or trailing data, a malformed header or a result larger than
 * max_bytes. Returns -ENOMEM, or -errno of the failing system call. */
int moe_npy_read_as_f32(const char *path, uint64_t max_bytes, float **data,
                        int64_t *rows, int64_t *cols);

/* Formats a shape as Python prints a tuple: (), (6,), (2, 3). The text is
 * cut short when it does not fit in size bytes, and 200 bytes fit any
 * shape of MOE_NPY_MAX_DIMS dimensions. */
void moe_npy_format_shape(int ndim, const int64_t *shape, char *buf,
                          size_t size);

/* Writes data (rows, cols) row-major as a version 1.0 .npy file with descr
 * '<f4'. The header is padded so that the data starts at a multiple of 64
 * bytes, as np.save() does, and the bytes match what np.save() writes for
 * the same array.
 *
 * The file is written to a temporary name in the same directory, flushed
 * with fsync() and then renamed over `path`, so a failure leaves either the
 * old file or no file, never a partial one. The rename itself is not made
 * durable (the directory is not synced).
 *
 * Returns 0, -EINVAL for a negative or too large shape, or -errno of the
 * failing system call. */
int moe_npy_write_f32(const char *path, const float *data, int64_t rows,
                      int64_t cols);

/* Reads a 2-D float32 .npy file. On success *data is a new (rows, cols)
 * row-major array that the caller releases with free(); it is non-NULL even
 * when rows * cols == 0. On failure *data is NULL and *rows and *cols are 0.
 *
 * Accepts format versions 1.0, 2.0 and 3.0 with descr '<f4' and
 * fortran_order False. Returns -EINVAL for any other file (bad magic,
 * unsupported version, malformed header, another dtype, Fortran order, not
 * 2-D, a size that overflows, missing or trailing data bytes), -ENOMEM, or
 * -errno of the failing system call. */
int moe_npy_read_f32(const char *path, float **data, int64_t *rows,
                     int64_t *cols);

/* Like moe_npy_read_f32(), but rejects with -EINVAL, before allocating, an
 * array whose data exceeds max_bytes. */
int moe_npy_read_f32_limited(const char *path, uint64_t max_bytes, float **data,
                             int64_t *rows, int64_t *cols);

/* Parses the magic, version, header length and header dict at the start of
 * buf[0..len) into *out. Reads no byte outside that range, so it can be run
 * on untrusted or truncated input. It checks the syntax and the three keys.
 * The dtype, order and rank are left for the caller to check, but descr
 * must be a string of at most 15 characters. name_for_errors is put in
 * messages and may be NULL.
 *
 * Returns 0, or -EINVAL when buf does not contain a complete, well-formed
 * header. */
int moe_npy_parse_header(const uint8_t *buf, size_t len,
                         const char *name_for_errors,
                         struct moe_npy_header *out);

#endif
