/*
 * moe_safetensors.h - reading and writing Hugging Face safetensors files.
 *
 * A safetensors file is:
 *   bytes 0-7      N, the header length, uint64 little-endian
 *   bytes 8..8+N   the header: a UTF-8 JSON object, padded with spaces,
 *                  that maps each tensor name to
 *                  {"dtype": "BF16", "shape": [rows, cols],
 *                   "data_offsets": [begin, end]},
 *                  plus an optional "__metadata__" object of strings
 *   then           the data buffer; a tensor's bytes are buffer[begin, end),
 *                  row-major and little-endian.
 *
 * A model is either one DIR/model.safetensors or the shards that
 * DIR/model.safetensors.index.json lists in its "weight_map" (tensor name ->
 * shard file name). A model is opened for reading one MoE layer out of a
 * checkpoint that may be far larger than memory, so:
 *   - files are mapped read-only with mmap, and only the pages of the
 *     tensors that are read are ever loaded;
 *   - opening parses only the index or the single file's header. A shard is
 *     opened, mapped and its header parsed when a tensor in it is first
 *     requested.
 * Every header is validated against its file's size before any tensor data
 * is touched; see moe_st_find() for what is checked. Only F32, F16, BF16 and
 * F8_E4M3 tensors convert to float32.
 *
 * Data is copied from the file without byte swapping, so this code
 * compiles only for little-endian hosts, like moe_npy.h. A model object is
 * not thread-safe, because moe_st_find() loads shards into it. A file that
 * another process truncates while it is mapped makes a later read fail with
 * SIGBUS.
 *
 * Errors follow moe_error.h: -EINVAL for a malformed file or a request that
 * does not match it (message names the file, the tensor or field, the value
 * and the reason), -ENOENT for a tensor that the model does not contain,
 * -ENOMEM, or -errno of a failed system call.
 */
#ifndef MOE_SAFETENSORS_H
#define MOE_SAFETENSORS_H

#include "moe_dtype.h"

#include <stddef.h>
#include <stdint.h>

/* Maximum number of dimensions of a tensor. A header entry with more is
 * rejected. */
#define MOE_ST_MAX_DIMS 8

/* Maximum header length N. The safetensors library (0.4) rejects headers
 * above 100 MB as well. */
#define MOE_ST_MAX_HEADER_BYTES 100000000u

/* ---- reading ---------------------------------------------------------- */

/* An open model: one file or a set of shards. */
struct moe_st_model;

/* Opens the model in directory `dir`: DIR/model.safetensors if it exists,
 * otherwise DIR/model.safetensors.index.json and the shards it lists.
 *   - A single file's header is read and validated now.
 *   - An index is parsed now, and every shard it names must exist as a
 *     regular file; shards are opened later, on first use.
 * Returns 0 and sets *out, or -EINVAL when the directory contains neither
 * file, the index is malformed (not JSON, no "weight_map" object, a value
 * that is not a file name) or names a missing shard (the message names the
 * index and the shard), or when the single file's header is invalid.
 * Returns -ENOMEM or -errno otherwise. *out is NULL on failure. */
int moe_st_open_model(const char *dir, struct moe_st_model **out);

/* Unmaps every file and frees the model. Accepts NULL. */
void moe_st_close(struct moe_st_model *model);

/* Information about one tensor. `file` is the path of the file that
 * contains it, valid until moe_st_close(). */
struct moe_st_info {
    enum moe_dtype dtype;
    int ndim;
    int64_t shape[MOE_ST_MAX_DIMS]; /* (ndim) dimensions; the rest are 0 */
    const char *file;
};

/* Looks up tensor `name` and fills *info.
 *
 * For a sharded model this opens the tensor's shard if it is not open yet.
 * Opening a file validates its whole header with -EINVAL and a message
 * naming the file and the reason:
 *   - file shorter than 8 bytes; header length beyond the file or above
 *     MOE_ST_MAX_HEADER_BYTES;
 *   - header that is not UTF-8 text without control characters, does not
 *     start with '{', is not JSON or not an object, or is followed by
 *     anything but spaces;
 *   - "__metadata__" that is not an object of strings;
 *   - a tensor entry that is not an object, lacks "dtype", "shape" or
 *     "data_offsets", has another key, or has a value of the wrong JSON
 *     type; an unknown dtype; a shape with more than MOE_ST_MAX_DIMS
 *     dimensions or a dimension that is negative, not an integer or above
 *     2^53; offsets that are not integers, with begin > end, or end beyond
 *     the data buffer; end - begin that differs from the size the shape and
 *     dtype give (computed without overflow);
 *   - two tensors whose byte ranges overlap (both are named), and a tensor
 *     name that appears twice.
 * Gaps between tensors in the data buffer are accepted, although the
 * safetensors library rejects a buffer that the tensors do not cover.
 *
 * Returns 0 or one of these errors:
 *   - -ENOENT when the model has no such tensor. The message names the
 *     tensor and where it looked (the file, or the index).
 *   - -EINVAL for an invalid file, or for a tensor that the index places in
 *     a shard whose header lacks it. The message then names the tensor, the
 *     index and the shard.
 *   - -ENOMEM, or -errno of a failed system call. */
int moe_st_find(struct moe_st_model *model, const char *name,
                struct moe_st_info *info);

/* Reads tensor `name`, converted to float32, into dst, which has room for
 * the product of expect_shape[0..ndim) floats.
 *
 * The tensor's shape must equal expect_shape[0..ndim), or the call fails
 * with -EINVAL naming the tensor, the file, and the found and expected
 * shapes. Conversion by dtype:
 *   - F32, F16, BF16: exact, element by element.
 *   - F8_E4M3 (DeepSeek-V3's block-quantised weights): the tensor must be
 *     2-D, (rows, cols), and the model must contain `name` + "_scale_inv",
 *     F32 or BF16, of shape (ceil(rows / block_rows),
 *     ceil(cols / block_cols)) for the block size of
 *     moe_st_set_fp8_block(). Element (i, j) becomes
 *     f8(q[i][j]) * scale_inv[i / block_rows][j / block_cols], one float32
 *     multiply. A missing or mismatched scale tensor is -EINVAL.
 *   - any other dtype: -EINVAL "unsupported dtype".
 * A file that another process truncates during the read gives -EINVAL,
 * not SIGBUS: the read catches SIGBUS on this thread while it copies,
 * and restores the previous action afterwards.
 * Returns 0, -ENOENT for a missing tensor, -EINVAL, or -errno. dst is
 * unchanged on failure, except after such a truncation, which can leave
 * it partly written. */
int moe_st_read_f32(struct moe_st_model *model, const char *name, int ndim,
                    const int64_t *expect_shape, float *dst);

/* Sets the block size of F8_E4M3 scales for later moe_st_read_f32() calls.
 * The default is 128 x 128, as DeepSeek-V3 ships. A size below 1 makes
 * every later F8_E4M3 read fail with -EINVAL. */
void moe_st_set_fp8_block(struct moe_st_model *model, int64_t block_rows,
                          int64_t block_cols);

/* ---- writing ---------------------------------------------------------- */

/* One tensor for moe_st_write(). data points to the elements, already
 * encoded in dtype, row-major little-endian: product(shape) * dtype bits / 8
 * bytes. It may be NULL when that is 0. */
struct moe_st_tensor_out {
    const char *name;
    enum moe_dtype dtype;
    int ndim;
    int64_t shape[MOE_ST_MAX_DIMS];
    const void *data;
};

/* Writes `count` tensors as a safetensors file at `path`, through
 * moe_write_file(), so a failure leaves no partial file.
 *
 * The data is laid out without gaps, tensors with larger elements first and
 * otherwise in the given order, so every tensor is aligned to its element
 * size. The header is padded with spaces so that the data starts at a
 * multiple of 8 bytes. When metadata_format is not NULL the header gets
 * "__metadata__": {"format": metadata_format}. Checkpoints saved from
 * PyTorch usually carry "pt".
 *
 * Returns 0, -ENOMEM, the error of moe_write_file(), or -EINVAL for an
 * invalid tensor. A tensor is invalid with a NULL, duplicate or non-UTF-8
 * name, with the name "__metadata__", with ndim outside
 * 0..MOE_ST_MAX_DIMS, with a negative dimension, with a size that
 * overflows or is not a whole number of bytes, or with NULL data when it
 * is not empty. */
int moe_st_write(const char *path, const struct moe_st_tensor_out *tensors,
                 int count, const char *metadata_format);

/* Writes a shard index such as model.safetensors.index.json at `path`:
 * {"metadata": {"total_size": total_size}, "weight_map": {names[i]:
 * files[i], ...}}, in the given order. total_size is the sum of the
 * shards' tensor bytes, as Hugging Face writes it. Returns 0, -EINVAL for a
 * NULL, empty or duplicate name or a file name that is empty or contains
 * '/', -ENOMEM, or the error of moe_write_file(). */
int moe_st_write_index(const char *path, const char *const *names,
                       const char *const *files, int count,
                       uint64_t total_size);

/* ---- FP8 block quantisation ------------------------------------------- */

/* Quantises the row-major (rows, cols) float32 matrix w to F8_E4M3 codes
 * q (rows * cols bytes) with one float32 scale_inv per block of
 * block_rows x block_cols elements, stored row-major in
 * (ceil(rows / block_rows), ceil(cols / block_cols)).
 *
 * For each block, amax is the largest |w| in it (NaNs are skipped),
 * scale_inv = amax / 448 (1 for a block of zeros, and the smallest positive
 * float32 if amax / 448 underflows to 0), and each element is
 * q = moe_f32_to_f8e4m3(w / scale_inv). So moe_st_read_f32() gives back
 * f8(q) * scale_inv. For a block with amax of at least 2^-100, which
 * keeps the scale and the products normal float32 numbers, each element
 * then comes back within
 *   (2^-4 + 2^-20) * |w| + 2^-10 * amax / 448 * (1 + 2^-20)
 * of w: relative 2^-4 from e4m3's 3 mantissa bits, plus half of e4m3's
 * smallest subnormal step 2^-9, scaled, plus float32 rounding of the
 * scale, the division and the multiply. An infinite element makes its
 * block's scale infinite and its codes NaN or zero. The block sizes must be
 * at least 1 and rows and cols at least 0; other values write nothing. */
void moe_fp8_quantize(const float *w, int64_t rows, int64_t cols,
                      int64_t block_rows, int64_t block_cols, uint8_t *q,
                      float *scale_inv);

#endif
