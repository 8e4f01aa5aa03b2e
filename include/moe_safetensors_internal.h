/*
 * moe_safetensors_internal.h - helpers and limits shared by the reader
 * (safetensors.c) and the writer (safetensors_write.c).
 */
#ifndef MOE_SAFETENSORS_INTERNAL_H
#define MOE_SAFETENSORS_INTERNAL_H

#include "moe_safetensors.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The header key whose value is string metadata instead of a tensor. */
#define ST_METADATA_KEY "__metadata__"

/* Largest integer accepted in a header or index: 2^53, up to which cJSON's
 * doubles are exact. */
#define MAX_JSON_INTEGER 9007199254740992.0

/* The largest finite F8_E4M3 (e4m3fn) value, 1.75 * 2^8. */
#define F8E4M3_MAX 448.0f

/* Returns true when s is valid UTF-8. */
bool st_is_utf8(const char *s);

/* Formats a shape as "[2, 3]" into buf and returns buf. */
const char *st_format_shape(const int64_t *shape, int ndim, char *buf, size_t size);

/* Computes the byte size of a tensor of `dtype` and `shape` without
 * overflow. Returns 0, or -EOVERFLOW when the size does not fit 64 bits,
 * or -EINVAL when it is not a whole number of bytes (sub-byte dtypes). */
int st_tensor_bytes(enum moe_dtype dtype, const int64_t *shape, int ndim,
                    uint64_t *bytes);

/* Ceil(n / block) for n >= 0 and block >= 1, without overflow. */
int64_t st_block_count(int64_t n, int64_t block);

#endif
