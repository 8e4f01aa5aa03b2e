/*
 * moe_npy.h - reading and writing 2-D float32 arrays in NumPy's .npy format.
 *
 * This is how the program exchanges tokens and outputs with Python:
 * np.save() and np.load() read and write the same files. Only the subset the
 * layer needs is supported: little-endian float32 ('<f4'), C order, two
 * dimensions. Any other file is rejected with -EINVAL and a message that
 * names the file and states what was found.
 *
 * The .npy layout (format versions 1.0, 2.0 and 3.0):
 *   bytes 0-5   magic "\x93NUMPY"
 *   bytes 6-7   major and minor version
 *   then        header length, uint16 little-endian in 1.0, uint32 in 2.0/3.0
 *   then        the header: a Python dict literal such as
 *               {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
 *               padded with spaces and ending in '\n'
 *   then        the data, rows * cols * 4 bytes, and nothing after it.
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
