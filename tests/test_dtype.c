/*
 * test_dtype.c - tests of the dtype table and the float32 conversions.
 *
 * Every bf16, f16 and f8 (e4m3fn) bit pattern is decoded and compared, bit
 * for bit, with an independent decoder that builds the value from sign,
 * exponent and mantissa with ldexp() in double. Encoding is compared with
 * an independent nearest-value search over a table of those decoded
 * values: at every midpoint between adjacent codes (ties to even), just
 * beside each midpoint, at the overflow and subnormal boundaries, over
 * every combination of the upper 16 bits of a float32 with a set of lower
 * halves, and over a million random float32 values.
 */
#include "moe_dtype.h"
#include "test_util.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

TestSuite(dtype, .timeout = 120);

/* ---- independent reference -------------------------------------------- */

/* A narrow float format described by its field widths. `ieee` formats
 * reserve the all-ones exponent for infinity and NaN; e4m3fn uses it for
 * normal numbers except the all-ones mantissa, its only NaN. */
struct format {
    const char *name;
    int exponent_bits, mantissa_bits, bias;
    bool ieee;
};

static const struct format bf16 = {"bf16", 8, 7, 127, true};
static const struct format f16 = {"f16", 5, 10, 15, true};
static const struct format f8 = {"f8_e4m3fn", 4, 3, 7, false};

static unsigned format_bits(const struct format *f)
{
    return 1u + (unsigned)f->exponent_bits + (unsigned)f->mantissa_bits;
}

/* Decodes `code` from its fields with ldexp(). Returns NaN for NaN codes
 * and +-inf for the infinities of IEEE formats. */
static double reference_decode(const struct format *f, uint32_t code)
{
    uint32_t exponent_max = (1u << f->exponent_bits) - 1;
    uint32_t mantissa_max = (1u << f->mantissa_bits) - 1;
    bool negative = (code >> (f->exponent_bits + f->mantissa_bits)) & 1;
    uint32_t exponent = (code >> f->mantissa_bits) & exponent_max;
    uint32_t mantissa = code & mantissa_max;

    double value;
    if (f->ieee && exponent == exponent_max)
        value = mantissa == 0 ? INFINITY : NAN;
    else if (!f->ieee && exponent == exponent_max && mantissa == mantissa_max)
        value = NAN;
    else if (exponent == 0)
        value = ldexp((double)mantissa, 1 - f->bias - f->mantissa_bits);
    else
        value = ldexp((double)((1u << f->mantissa_bits) + mantissa),
                      (int)exponent - f->bias - f->mantissa_bits);
    return negative ? -value : value;
}

/* The decoded value of every positive code of a format, for the
 * reference encoder. */
struct value_table {
    const struct format *f;
    double *values;        /* values[code] for codes 0..max_code */
    uint32_t max_code;     /* largest finite positive code */
    double above_max;      /* the value the next code would have */
    uint32_t overflow_code; /* result for magnitudes rounding above max */
};

static struct value_table make_table(const struct format *f)
{
    struct value_table t = {.f = f};
    uint32_t codes = 1u << (format_bits(f) - 1);
    t.values = malloc(codes * sizeof *t.values);
    cr_assert_not_null(t.values);
    t.max_code = 0;
    for (uint32_t c = 0; c < codes; c++) {
        t.values[c] = reference_decode(f, c);
        if (isfinite(t.values[c]))
            t.max_code = c;
    }
    /* The next code's value with unbounded exponent: max + one ulp. */
    double ulp = t.values[t.max_code] - t.values[t.max_code - 1];
    t.above_max = t.values[t.max_code] + ulp;
    t.overflow_code = f->ieee ? t.max_code + 1 /* infinity */
                              : t.max_code;   /* e4m3fn saturates */
    return t;
}

/* Rounds finite x to the nearest code by searching the table, ties to the
 * even code. Below the overflow boundary both subtractions are exact in
 * double: the operands have at most 24 significant bits and lie within one
 * code spacing of each other. */
static uint32_t reference_encode(const struct value_table *t, float x)
{
    double magnitude = fabs((double)x);
    uint32_t sign = signbit(x) ? 1u << (format_bits(t->f) - 1) : 0;

    uint32_t lo = 0, hi = t->max_code; /* largest code with value <= x */
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo + 1) / 2;
        if (t->values[mid] <= magnitude)
            lo = mid;
        else
            hi = mid - 1;
    }

    uint32_t below = lo;
    double below_value = t->values[below];
    double above_value =
        below == t->max_code ? t->above_max : t->values[below + 1];
    uint32_t above = below == t->max_code ? t->overflow_code : below + 1;

    double to_below = magnitude - below_value;
    double to_above = above_value - magnitude;
    uint32_t code;
    if (to_below < to_above)
        code = below;
    else if (to_below > to_above)
        code = above;
    else
        code = (below & 1) == 0 ? below : above;
    return sign | code;
}

static uint32_t bits_of(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits;
}

static float float_of(uint32_t bits)
{
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* Calls the implementation's encoder for format f. */
static uint32_t encode(const struct format *f, float x)
{
    if (f == &bf16)
        return moe_f32_to_bf16(x);
    if (f == &f16)
        return moe_f32_to_f16(x);
    return moe_f32_to_f8e4m3(x);
}

static float decode(const struct format *f, uint32_t code)
{
    if (f == &bf16)
        return moe_bf16_to_f32((uint16_t)code);
    if (f == &f16)
        return moe_f16_to_f32((uint16_t)code);
    return moe_f8e4m3_to_f32((uint8_t)code);
}

/* ---- dtype table ------------------------------------------------------ */

Test(dtype, names_and_sizes)
{
    static const struct {
        enum moe_dtype dtype;
        const char *name;
        size_t size;
        unsigned bits;
    } cases[] = {
        {MOE_DTYPE_F32, "F32", 4, 32},
        {MOE_DTYPE_F16, "F16", 2, 16},
        {MOE_DTYPE_BF16, "BF16", 2, 16},
        {MOE_DTYPE_F8_E4M3, "F8_E4M3", 1, 8},
        {MOE_DTYPE_F64, "F64", 8, 64},
        {MOE_DTYPE_I32, "I32", 4, 32},
        {MOE_DTYPE_I64, "I64", 8, 64},
        {MOE_DTYPE_BOOL, "BOOL", 1, 8},
        {MOE_DTYPE_U8, "U8", 1, 8},
        {MOE_DTYPE_I8, "I8", 1, 8},
        {MOE_DTYPE_I16, "I16", 2, 16},
        {MOE_DTYPE_U16, "U16", 2, 16},
        {MOE_DTYPE_U32, "U32", 4, 32},
        {MOE_DTYPE_U64, "U64", 8, 64},
        {MOE_DTYPE_F8_E5M2, "F8_E5M2", 1, 8},
        {MOE_DTYPE_F8_E8M0, "F8_E8M0", 1, 8},
        {MOE_DTYPE_F8_E4M3FNUZ, "F8_E4M3FNUZ", 1, 8},
        {MOE_DTYPE_F8_E5M2FNUZ, "F8_E5M2FNUZ", 1, 8},
        {MOE_DTYPE_F6_E2M3, "F6_E2M3", 0, 6},
        {MOE_DTYPE_F6_E3M2, "F6_E3M2", 0, 6},
        {MOE_DTYPE_F4, "F4", 0, 4},
        {MOE_DTYPE_C64, "C64", 8, 64},
    };
    size_t count = sizeof cases / sizeof cases[0];
    cr_assert_eq(count, (size_t)MOE_DTYPE_COUNT, "a dtype has no test case");

    for (size_t i = 0; i < count; i++) {
        cr_assert_str_eq(moe_dtype_name(cases[i].dtype), cases[i].name);
        cr_assert_eq(moe_dtype_size(cases[i].dtype), cases[i].size, "%s size",
                     cases[i].name);
        cr_assert_eq(moe_dtype_bits(cases[i].dtype), cases[i].bits, "%s bits",
                     cases[i].name);
        enum moe_dtype parsed = MOE_DTYPE_COUNT;
        cr_assert_eq(moe_dtype_from_name(cases[i].name, &parsed), 0);
        cr_assert_eq(parsed, cases[i].dtype, "%s parsed to %d", cases[i].name,
                     (int)parsed);
    }
}

Test(dtype, unknown_names_rejected)
{
    static const char *const names[] = {"f32", "FP32", "F8_E4M3FN", "", "Q4_0",
                                        "BF16 "};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        enum moe_dtype parsed = MOE_DTYPE_F32;
        cr_assert_eq(moe_dtype_from_name(names[i], &parsed), -EINVAL,
                     "'%s' accepted", names[i]);
    }
    cr_assert_str_eq(moe_dtype_name(MOE_DTYPE_COUNT), "?");
    cr_assert_eq(moe_dtype_size(MOE_DTYPE_COUNT), 0);
    cr_assert_eq(moe_dtype_bits((enum moe_dtype)-1), 0);
}

/* ---- decoding: every bit pattern -------------------------------------- */

/* Compares decode() with the reference for every code of f. NaN results
 * must be NaN with the code's sign and, for f16 and bf16, the payload
 * moved to the top of the float32 mantissa. */
static void check_decode_all(const struct format *f)
{
    uint32_t codes = 1u << format_bits(f);
    uint32_t sign_bit = 1u << (format_bits(f) - 1);
    int nan_count = 0;

    for (uint32_t c = 0; c < codes; c++) {
        double expected = reference_decode(f, c);
        float got = decode(f, c);

        if (isnan(expected)) {
            nan_count++;
            cr_assert(isnan(got), "%s 0x%x: got %a, expected NaN", f->name, c,
                      (double)got);
            cr_assert_eq(signbit(got) != 0, (c & sign_bit) != 0,
                         "%s 0x%x: NaN sign lost", f->name, c);
            if (f->ieee) {
                uint32_t payload = c & ((1u << f->mantissa_bits) - 1);
                uint32_t payload_bits =
                    bits_of(got) & 0x7fffff;
                cr_assert_eq(payload_bits, payload << (23 - f->mantissa_bits),
                             "%s 0x%x: NaN payload 0x%x, expected 0x%x",
                             f->name, c, payload_bits,
                             payload << (23 - f->mantissa_bits));
            }
            continue;
        }

        float want = (float)expected; /* exact: every code fits float32 */
        cr_assert_eq((double)want, expected, "%s 0x%x: reference not exact",
                     f->name, c);
        cr_assert_eq(bits_of(got), bits_of(want),
                     "%s 0x%x: got %a (0x%08x), expected %a (0x%08x)", f->name,
                     c, (double)got, bits_of(got), (double)want, bits_of(want));
    }

    if (f->ieee)
        cr_assert_eq(nan_count, 2 * ((1 << f->mantissa_bits) - 1),
                     "%s: %d NaN codes", f->name, nan_count);
    else
        cr_assert_eq(nan_count, 2, "%s: %d NaN codes, expected 0x7f and 0xff",
                     f->name, nan_count);
}

Test(dtype, bf16_decode_all_65536)
{
    check_decode_all(&bf16);
}

Test(dtype, f16_decode_all_65536)
{
    check_decode_all(&f16);
}

Test(dtype, f8_decode_all_256)
{
    check_decode_all(&f8);
}

/* Values from the format definitions, independent of both decoders. */
Test(dtype, decode_known_values)
{
    cr_assert_eq(moe_bf16_to_f32(0x3f80), 1.0f);
    cr_assert_eq(moe_bf16_to_f32(0xc049), -3.140625f);
    cr_assert_eq(moe_bf16_to_f32(0x7f7f), 0x1.fep127f);
    cr_assert_eq(moe_bf16_to_f32(0x0001), 0x1p-133f);
    cr_assert_eq(moe_bf16_to_f32(0xff80), -INFINITY);

    cr_assert_eq(moe_f16_to_f32(0x3c00), 1.0f);
    cr_assert_eq(moe_f16_to_f32(0x7bff), 65504.0f);
    cr_assert_eq(moe_f16_to_f32(0x0001), 0x1p-24f);
    cr_assert_eq(moe_f16_to_f32(0x03ff), 0x1.ff8p-15f);
    cr_assert_eq(moe_f16_to_f32(0x0400), 0x1p-14f);
    cr_assert_eq(moe_f16_to_f32(0xfc00), -INFINITY);
    cr_assert_eq(bits_of(moe_f16_to_f32(0x8000)), 0x80000000u);

    cr_assert_eq(moe_f8e4m3_to_f32(0x7e), 448.0f);
    cr_assert_eq(moe_f8e4m3_to_f32(0xfe), -448.0f);
    cr_assert_eq(moe_f8e4m3_to_f32(0x78), 256.0f);
    cr_assert_eq(moe_f8e4m3_to_f32(0x38), 1.0f);
    cr_assert_eq(moe_f8e4m3_to_f32(0x08), 0x1p-6f);
    cr_assert_eq(moe_f8e4m3_to_f32(0x07), 0x1.cp-7f); /* largest subnormal */
    cr_assert_eq(moe_f8e4m3_to_f32(0x01), 0x1p-9f);
    cr_assert(isnan(moe_f8e4m3_to_f32(0x7f)));
    cr_assert_eq(bits_of(moe_f8e4m3_to_f32(0x80)), 0x80000000u);
}

/* ---- encoding --------------------------------------------------------- */

/* decode(encode(x)) == x for every non-NaN code, including -0 and the
 * infinities of f16 and bf16. */
static void check_round_trip(const struct format *f)
{
    uint32_t codes = 1u << format_bits(f);
    for (uint32_t c = 0; c < codes; c++) {
        float x = decode(f, c);
        if (isnan(x))
            continue;
        uint32_t back = encode(f, x);
        cr_assert_eq(back, c, "%s: 0x%x decodes to %a, which encodes to 0x%x",
                     f->name, c, (double)x, back);
    }
}

Test(dtype, round_trip_every_code)
{
    check_round_trip(&bf16);
    check_round_trip(&f16);
    check_round_trip(&f8);
}

/* For every pair of adjacent finite positive codes and their negatives:
 * the exact midpoint goes to the even code, the float32 just below it to
 * the lower code and the float32 just above it to the upper code. */
static void check_midpoints(const struct format *f)
{
    struct value_table t = make_table(f);
    uint32_t sign_bit = 1u << (format_bits(f) - 1);

    for (uint32_t c = 0; c < t.max_code; c++) {
        double lo = t.values[c], hi = t.values[c + 1];
        float mid = (float)((lo + hi) / 2);
        cr_assert_eq((double)mid, (lo + hi) / 2,
                     "%s: midpoint of 0x%x not exact", f->name, c);
        uint32_t even = (c & 1) == 0 ? c : c + 1;

        for (int negative = 0; negative < 2; negative++) {
            uint32_t sign = negative ? sign_bit : 0;
            float m = negative ? -mid : mid;
            float toward_zero = nextafterf(m, 0.0f);
            float away = nextafterf(m, negative ? -INFINITY : INFINITY);
            cr_assert_eq(encode(f, m), sign | even,
                         "%s: tie %a gave 0x%x, expected 0x%x", f->name,
                         (double)m, encode(f, m), sign | even);
            cr_assert_eq(encode(f, toward_zero), sign | c,
                         "%s: %a gave 0x%x, expected 0x%x", f->name,
                         (double)toward_zero, encode(f, toward_zero), sign | c);
            cr_assert_eq(encode(f, away), sign | (c + 1),
                         "%s: %a gave 0x%x, expected 0x%x", f->name,
                         (double)away, encode(f, away), sign | (c + 1));
        }
    }
    free(t.values);
}

Test(dtype, bf16_ties_to_even)
{
    check_midpoints(&bf16);
}

Test(dtype, f16_ties_to_even)
{
    check_midpoints(&f16);
}

Test(dtype, f8_ties_to_even)
{
    check_midpoints(&f8);
}

Test(dtype, f16_overflow)
{
    cr_assert_eq(moe_f32_to_f16(65504.0f), 0x7bff);
    cr_assert_eq(moe_f32_to_f16(nextafterf(65520.0f, 0.0f)), 0x7bff);
    /* 65520 is halfway to 65536, and 0x7bff is odd: the tie overflows. */
    cr_assert_eq(moe_f32_to_f16(65520.0f), 0x7c00);
    cr_assert_eq(moe_f32_to_f16(-65520.0f), 0xfc00);
    cr_assert_eq(moe_f32_to_f16(1e10f), 0x7c00);
    cr_assert_eq(moe_f32_to_f16(FLT_MAX), 0x7c00);
    cr_assert_eq(moe_f32_to_f16(INFINITY), 0x7c00);
    cr_assert_eq(moe_f32_to_f16(-INFINITY), 0xfc00);
}

Test(dtype, bf16_overflow)
{
    cr_assert_eq(moe_f32_to_bf16(0x1.fep127f), 0x7f7f);
    /* FLT_MAX is above the midpoint between 0x7f7f and 2^128. */
    cr_assert_eq(moe_f32_to_bf16(FLT_MAX), 0x7f80);
    cr_assert_eq(moe_f32_to_bf16(0x1.ff0p127f), 0x7f80); /* tie, odd 0x7f7f */
    cr_assert_eq(moe_f32_to_bf16(nextafterf(0x1.ffp127f, 0.0f)), 0x7f7f);
    cr_assert_eq(moe_f32_to_bf16(-INFINITY), 0xff80);
}

Test(dtype, f8_saturates)
{
    cr_assert_eq(moe_f32_to_f8e4m3(448.0f), 0x7e);
    /* 464 is halfway to the would-be 480, and 0x7e is even. */
    cr_assert_eq(moe_f32_to_f8e4m3(464.0f), 0x7e);
    cr_assert_eq(moe_f32_to_f8e4m3(nextafterf(464.0f, INFINITY)), 0x7e);
    cr_assert_eq(moe_f32_to_f8e4m3(480.0f), 0x7e);
    cr_assert_eq(moe_f32_to_f8e4m3(1e30f), 0x7e);
    cr_assert_eq(moe_f32_to_f8e4m3(FLT_MAX), 0x7e);
    cr_assert_eq(moe_f32_to_f8e4m3(-1e30f), 0xfe);
    /* No infinity in e4m3fn: +-inf becomes NaN, keeping the sign. */
    cr_assert_eq(moe_f32_to_f8e4m3(INFINITY), 0x7f);
    cr_assert_eq(moe_f32_to_f8e4m3(-INFINITY), 0xff);
}

Test(dtype, subnormal_results)
{
    /* f16: smallest subnormal 2^-24, largest 1023 * 2^-24. */
    cr_assert_eq(moe_f32_to_f16(0x1p-24f), 0x0001);
    cr_assert_eq(moe_f32_to_f16(0x1p-25f), 0x0000); /* tie to even 0 */
    cr_assert_eq(moe_f32_to_f16(-0x1p-25f), 0x8000);
    cr_assert_eq(moe_f32_to_f16(nextafterf(0x1p-25f, 1.0f)), 0x0001);
    cr_assert_eq(moe_f32_to_f16(0x1.8p-24f), 0x0002); /* 1.5 ulp, tie up */
    cr_assert_eq(moe_f32_to_f16(0x1p-26f), 0x0000);
    cr_assert_eq(moe_f32_to_f16(0x1.ff8p-15f), 0x03ff);
    cr_assert_eq(moe_f32_to_f16(0x1.ffcp-15f), 0x0400); /* into normals */
    cr_assert_eq(moe_f32_to_f16(0x1p-149f), 0x0000);    /* f32 subnormal */

    /* f8: smallest subnormal 2^-9, largest 7 * 2^-9. */
    cr_assert_eq(moe_f32_to_f8e4m3(0x1p-9f), 0x01);
    cr_assert_eq(moe_f32_to_f8e4m3(0x1p-10f), 0x00);
    cr_assert_eq(moe_f32_to_f8e4m3(nextafterf(0x1p-10f, 1.0f)), 0x01);
    cr_assert_eq(moe_f32_to_f8e4m3(0x1.8p-9f), 0x02);
    cr_assert_eq(moe_f32_to_f8e4m3(0x1.ep-7f), 0x08); /* 7.5 * 2^-9 */
    cr_assert_eq(moe_f32_to_f8e4m3(-0x1p-9f), 0x81);
    cr_assert_eq(moe_f32_to_f8e4m3(-0.0f), 0x80);

    /* bf16: subnormals 2^-133 apart, reached from float32 subnormals. */
    cr_assert_eq(moe_f32_to_bf16(0x1p-133f), 0x0001);
    cr_assert_eq(moe_f32_to_bf16(0x1p-134f), 0x0000);
    cr_assert_eq(moe_f32_to_bf16(0x1.8p-133f), 0x0002);
    cr_assert_eq(moe_f32_to_bf16(0x1p-149f), 0x0000);
    cr_assert_eq(moe_f32_to_bf16(0x1.fcp-127f), 0x007f);
}

Test(dtype, nan_stays_nan)
{
    static const uint32_t nans[] = {0x7fc00000, 0xffc00000, 0x7f800001,
                                    0xff800001, 0x7fffffff, 0x7fa00000};
    const struct format *formats[] = {&bf16, &f16, &f8};
    for (size_t i = 0; i < sizeof nans / sizeof nans[0]; i++) {
        float x = float_of(nans[i]);
        for (int k = 0; k < 3; k++) {
            uint32_t code = encode(formats[k], x);
            float back = decode(formats[k], code);
            cr_assert(isnan(back), "%s: NaN 0x%08x encoded to 0x%x, not NaN",
                      formats[k]->name, nans[i], code);
            cr_assert_eq(signbit(back) != 0, (nans[i] >> 31) != 0,
                         "%s: NaN 0x%08x lost its sign", formats[k]->name,
                         nans[i]);
        }
    }
    /* bf16 and f16 keep the upper payload bits. */
    cr_assert_eq(moe_f32_to_bf16(float_of(0x7fd50000)), 0x7fd5);
    cr_assert_eq(moe_f32_to_f16(float_of(0x7fd50000)), 0x7ea8);
}

/* Compares all three encoders with the reference for finite x. */
static void check_against_reference(const struct value_table *tables, float x)
{
    if (!isfinite(x))
        return;
    for (int k = 0; k < 3; k++) {
        uint32_t got = encode(tables[k].f, x);
        uint32_t want = reference_encode(&tables[k], x);
        if (got != want)
            cr_assert_fail("%s: %a (0x%08x) encoded to 0x%x, expected 0x%x",
                           tables[k].f->name, (double)x, bits_of(x), got, want);
    }
}

Test(dtype, encode_matches_reference_sweep)
{
    struct value_table tables[3] = {make_table(&bf16), make_table(&f16),
                                     make_table(&f8)};

    /* Every upper half of a float32 with lower halves that put the f16
     * rounding bit (bit 12) and sticky bits on each side of a tie, with
     * the f16 lsb (bit 13) 0 and 1. bf16 and f8 round above bit 15, so
     * their ties and near-ties come from the upper half. */
    static const uint16_t lows[] = {0x0000, 0x0001, 0x0fff, 0x1000, 0x1001,
                                    0x2000, 0x2fff, 0x3000, 0x3001, 0x7fff,
                                    0x8000, 0x8001, 0xd000, 0xffff};
    for (uint32_t hi = 0; hi < 0x10000; hi++)
        for (size_t k = 0; k < sizeof lows / sizeof lows[0]; k++)
            check_against_reference(tables, float_of(hi << 16 | lows[k]));

    /* A million random float32 bit patterns (xorshift32, fixed seed). */
    uint32_t state = 0x12345678;
    for (int i = 0; i < 1 << 20; i++) {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        check_against_reference(tables, float_of(state));
    }

    for (int k = 0; k < 3; k++)
        free(tables[k].values);
}
