/*
 * moe_dtype.h - tensor element types and exact conversions to and from
 * float32.
 *
 * The names are those that safetensors writes in a header's "dtype" field.
 * moe-ep converts only F32, F16, BF16 and F8_E4M3. The size of every other
 * dtype is recorded too, so that a file's offsets can be checked even when
 * the file contains tensors that moe-ep never reads.
 *
 * Conversions:
 *   - to float32: exact for every bit pattern. NaN stays NaN with its sign,
 *     and F16 and BF16 NaNs keep their payload bits.
 *   - from float32: round to nearest, ties to even, on the exact value. NaN
 *     stays NaN with its sign. F16 and BF16 overflow to infinity as IEEE
 *     754 does. F8_E4M3 is the e4m3fn format (bias 7, no infinities, one
 *     NaN mantissa): finite values beyond +-448 saturate to +-448, and +-inf
 *     becomes NaN, because the format cannot represent it.
 *
 * Bit patterns are host integers, so a uint16_t read from a little-endian
 * file must be loaded on a little-endian host, as moe-ep assumes.
 */
#ifndef MOE_DTYPE_H
#define MOE_DTYPE_H

#include <stddef.h>
#include <stdint.h>

/* Element types of safetensors files. The first seven are the ones the
 * moe-ep code names; the rest complete the safetensors list. */
enum moe_dtype {
    MOE_DTYPE_F32,
    MOE_DTYPE_F16,
    MOE_DTYPE_BF16,
    MOE_DTYPE_F8_E4M3,
    MOE_DTYPE_F64,
    MOE_DTYPE_I32,
    MOE_DTYPE_I64,
    MOE_DTYPE_BOOL,
    MOE_DTYPE_U8,
    MOE_DTYPE_I8,
    MOE_DTYPE_I16,
    MOE_DTYPE_U16,
    MOE_DTYPE_U32,
    MOE_DTYPE_U64,
    MOE_DTYPE_F8_E5M2,
    MOE_DTYPE_F8_E8M0,
    MOE_DTYPE_F8_E4M3FNUZ,
    MOE_DTYPE_F8_E5M2FNUZ,
    MOE_DTYPE_F6_E2M3,
    MOE_DTYPE_F6_E3M2,
    MOE_DTYPE_F4,
    MOE_DTYPE_C64,
    MOE_DTYPE_COUNT /* number of dtypes, not a dtype */
};

/* Returns the dtype name as safetensors writes it ("F32", "BF16",
 * "F8_E4M3", ...), or "?" for a value outside the enum. */
const char *moe_dtype_name(enum moe_dtype dtype);

/* Returns the size of one element in bytes, or 0 for the sub-byte types
 * F4, F6_E2M3 and F6_E3M2 and for a value outside the enum. */
size_t moe_dtype_size(enum moe_dtype dtype);

/* Returns the size of one element in bits (4 for F4, 6 for F6_*, 8 times
 * moe_dtype_size() otherwise), or 0 for a value outside the enum. */
unsigned moe_dtype_bits(enum moe_dtype dtype);

/* Looks up a safetensors dtype name (case-sensitive). Returns 0 and sets
 * *dtype, or -EINVAL without a message for an unknown name. */
int moe_dtype_from_name(const char *name, enum moe_dtype *dtype);

/* Decodes one element to float32 exactly. */
float moe_bf16_to_f32(uint16_t bits);
float moe_f16_to_f32(uint16_t bits);
float moe_f8e4m3_to_f32(uint8_t bits);

/* Encodes a float32 with round to nearest, ties to even (see the file
 * comment for NaN, overflow and infinity). */
uint16_t moe_f32_to_bf16(float value);
uint16_t moe_f32_to_f16(float value);
uint8_t moe_f32_to_f8e4m3(float value);

#endif
