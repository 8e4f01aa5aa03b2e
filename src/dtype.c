/*
 * dtype.c - dtype names and sizes, and exact conversions between float32
 * and the 16- and 8-bit float formats (see moe_dtype.h).
 *
 * Every conversion works on the integer bit patterns, so the results do
 * not depend on the FPU's rounding mode or on flush-to-zero settings.
 */
#include "moe_dtype.h"

#include <errno.h>
#include <string.h>

/* ---- names and sizes -------------------------------------------------- */

static const struct {
    const char *name;
    unsigned bits;
} dtype_table[MOE_DTYPE_COUNT] = {
    [MOE_DTYPE_F32] = {"F32", 32},
    [MOE_DTYPE_F16] = {"F16", 16},
    [MOE_DTYPE_BF16] = {"BF16", 16},
    [MOE_DTYPE_F8_E4M3] = {"F8_E4M3", 8},
    [MOE_DTYPE_F64] = {"F64", 64},
    [MOE_DTYPE_I32] = {"I32", 32},
    [MOE_DTYPE_I64] = {"I64", 64},
    [MOE_DTYPE_BOOL] = {"BOOL", 8},
    [MOE_DTYPE_U8] = {"U8", 8},
    [MOE_DTYPE_I8] = {"I8", 8},
    [MOE_DTYPE_I16] = {"I16", 16},
    [MOE_DTYPE_U16] = {"U16", 16},
    [MOE_DTYPE_U32] = {"U32", 32},
    [MOE_DTYPE_U64] = {"U64", 64},
    [MOE_DTYPE_F8_E5M2] = {"F8_E5M2", 8},
    [MOE_DTYPE_F8_E8M0] = {"F8_E8M0", 8},
    [MOE_DTYPE_F8_E4M3FNUZ] = {"F8_E4M3FNUZ", 8},
    [MOE_DTYPE_F8_E5M2FNUZ] = {"F8_E5M2FNUZ", 8},
    [MOE_DTYPE_F6_E2M3] = {"F6_E2M3", 6},
    [MOE_DTYPE_F6_E3M2] = {"F6_E3M2", 6},
    [MOE_DTYPE_F4] = {"F4", 4},
    [MOE_DTYPE_C64] = {"C64", 64},
};

static int dtype_valid(enum moe_dtype dtype)
{
    return (unsigned)dtype < MOE_DTYPE_COUNT;
}

const char *moe_dtype_name(enum moe_dtype dtype)
{
    return dtype_valid(dtype) ? dtype_table[dtype].name : "?";
}

unsigned moe_dtype_bits(enum moe_dtype dtype)
{
    return dtype_valid(dtype) ? dtype_table[dtype].bits : 0;
}

size_t moe_dtype_size(enum moe_dtype dtype)
{
    unsigned bits = moe_dtype_bits(dtype);
    return bits % 8 == 0 ? bits / 8 : 0;
}

int moe_dtype_from_name(const char *name, enum moe_dtype *dtype)
{
    for (int i = 0; i < MOE_DTYPE_COUNT; i++) {
        if (strcmp(name, dtype_table[i].name) == 0) {
            *dtype = (enum moe_dtype)i;
            return 0;
        }
    }
    return -EINVAL;
}

/* ---- decoding --------------------------------------------------------- */

static float float_from_bits(uint32_t bits)
{
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static uint32_t bits_from_float(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

float moe_bf16_to_f32(uint16_t bits)
{
    /* BF16 is the upper half of a float32. */
    return float_from_bits((uint32_t)bits << 16);
}

float moe_f16_to_f32(uint16_t bits)
{
    uint32_t sign = (uint32_t)(bits & 0x8000) << 16;
    uint32_t exponent = (bits >> 10) & 0x1f;
    uint32_t mantissa = bits & 0x3ff;

    if (exponent == 0x1f) /* infinity, or NaN with its payload */
        return float_from_bits(sign | 0x7f800000 | mantissa << 13);
    if (exponent == 0) {
        /* Zero or subnormal: mantissa * 2^-24. Both factors and the
         * product are exact in float32. */
        float magnitude = (float)mantissa * 0x1p-24f;
        return float_from_bits(sign | bits_from_float(magnitude));
    }
    /* Normal: rebias the exponent from 15 to 127. */
    return float_from_bits(sign | (exponent + 112) << 23 | mantissa << 13);
}

float moe_f8e4m3_to_f32(uint8_t bits)
{
    uint32_t sign = (uint32_t)(bits & 0x80) << 24;
    uint32_t exponent = (bits >> 3) & 0xf;
    uint32_t mantissa = bits & 0x7;

    /* e4m3fn has no infinities; S.1111.111 is its only NaN pattern. */
    if (exponent == 0xf && mantissa == 0x7)
        return float_from_bits(sign | 0x7fc00000);
    if (exponent == 0) {
        /* Zero or subnormal: mantissa * 2^-9. */
        float magnitude = (float)mantissa * 0x1p-9f;
        return float_from_bits(sign | bits_from_float(magnitude));
    }
    /* Normal: rebias the exponent from 7 to 127. */
    return float_from_bits(sign | (exponent + 120) << 23 | mantissa << 20);
}

/* ---- encoding --------------------------------------------------------- */

/* A binary float format narrower than float32, for rounding into it.
 * Codes are the format's bit patterns without the sign bit, so they are
 * ordered like the magnitudes they encode. */
struct narrow_format {
    int mantissa_bits;
    int min_exponent;   /* unbiased exponent of the smallest normal */
    uint32_t max_code;  /* code of the largest finite magnitude */
    uint32_t overflow_code; /* code for a rounded result above max_code */
};

static const struct narrow_format bf16_format = {7, -126, 0x7f7f, 0x7f80};
static const struct narrow_format f16_format = {10, -14, 0x7bff, 0x7c00};
static const struct narrow_format f8e4m3_format = {3, -6, 0x7e, 0x7e};

/* Rounds the finite float32 magnitude `magnitude_bits` (sign bit clear)
 * to the nearest code of `format`, ties to even.
 *
 * The float32 value is significand * 2^(exponent - 23). The result has the
 * exponent e = max(exponent, min_exponent), so its quantum is
 * 2^(e - mantissa_bits), and the rounded significand q is the float32
 * significand shifted right by the difference, rounded once. The code is
 * then ((e - min_exponent) << mantissa_bits) + q: for a normal result q
 * carries the implicit bit, which adds 1 to the exponent field, and a q
 * that rounded up to 2^(mantissa_bits + 1) moves to the next binade. */
static uint32_t round_magnitude(uint32_t magnitude_bits,
                                const struct narrow_format *format)
{
    if (magnitude_bits == 0)
        return 0;

    uint32_t exponent_field = magnitude_bits >> 23;
    uint32_t significand = magnitude_bits & 0x7fffff;
    int exponent = -126; /* float32 subnormals */
    if (exponent_field != 0) {
        significand |= 0x800000;
        exponent = (int)exponent_field - 127;
    }

    int result_exponent = exponent > format->min_exponent
                              ? exponent
                              : format->min_exponent;
    /* At least 23 - 10 = 13 for the formats above, so always positive. */
    int shift = 23 - format->mantissa_bits + (result_exponent - exponent);

    uint32_t q = 0;
    if (shift <= 24) {
        /* With shift >= 25 the significand (< 2^24) is below half the
         * quantum and rounds to zero. */
        uint32_t remainder = significand & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        q = significand >> shift;
        if (remainder > half || (remainder == half && (q & 1)))
            q++;
    }

    uint32_t code = ((uint32_t)(result_exponent - format->min_exponent)
                     << format->mantissa_bits) + q;
    return code > format->max_code ? format->overflow_code : code;
}

uint16_t moe_f32_to_bf16(float value)
{
    uint32_t bits = bits_from_float(value);
    uint32_t sign = (bits >> 16) & 0x8000;
    uint32_t magnitude = bits & 0x7fffffff;

    if (magnitude > 0x7f800000) /* NaN: keep the upper payload, set quiet */
        return (uint16_t)(sign | 0x7fc0 | ((magnitude >> 16) & 0x7f));
    if (magnitude == 0x7f800000)
        return (uint16_t)(sign | 0x7f80);
    return (uint16_t)(sign | round_magnitude(magnitude, &bf16_format));
}

uint16_t moe_f32_to_f16(float value)
{
    uint32_t bits = bits_from_float(value);
    uint32_t sign = (bits >> 16) & 0x8000;
    uint32_t magnitude = bits & 0x7fffffff;

    if (magnitude > 0x7f800000)
        return (uint16_t)(sign | 0x7e00 | ((magnitude >> 13) & 0x3ff));
    if (magnitude == 0x7f800000)
        return (uint16_t)(sign | 0x7c00);
    return (uint16_t)(sign | round_magnitude(magnitude, &f16_format));
}

uint8_t moe_f32_to_f8e4m3(float value)
{
    uint32_t bits = bits_from_float(value);
    uint32_t sign = (bits >> 24) & 0x80;
    uint32_t magnitude = bits & 0x7fffffff;

    /* NaN and +-inf both become NaN: the format has no infinity. */
    if (magnitude >= 0x7f800000)
        return (uint8_t)(sign | 0x7f);
    return (uint8_t)(sign | round_magnitude(magnitude, &f8e4m3_format));
}
