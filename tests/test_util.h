/*
 * test_util.h - comparison helpers shared by the Criterion tests.
 *
 * expect_bitwise_equal() is for results the design promises to be exact; it
 * compares with memcmp and, on failure, names the first differing element.
 * expect_close() is for results that may differ in rounding; the caller
 * states the tolerance and why.
 */
#ifndef TEST_UTIL_H
#define TEST_UTIL_H

#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Asserts that a and b (count floats each) have identical bits. */
#define expect_bitwise_equal(a, b, count, what)                                \
    do {                                                                       \
        const float *ea_ = (a), *eb_ = (b);                                    \
        int64_t n_ = (count);                                                  \
        if (memcmp(ea_, eb_, (size_t)n_ * sizeof(float)) != 0) {               \
            int64_t i_ = 0;                                                    \
            while (i_ < n_ && memcmp(&ea_[i_], &eb_[i_], sizeof(float)) == 0)  \
                i_++;                                                          \
            double maxd_ = 0;                                                  \
            for (int64_t j_ = 0; j_ < n_; j_++) {                              \
                double d_ = fabs((double)ea_[j_] - (double)eb_[j_]);           \
                if (d_ > maxd_) maxd_ = d_;                                    \
            }                                                                  \
            cr_assert_fail("%s: first difference at element %lld: %.9g vs %.9g, "     \
                    "max abs difference %.3g",                                 \
                    what, (long long)i_, ea_[i_], eb_[i_], maxd_);             \
        }                                                                      \
    } while (0)

/* Asserts |a[i] - b[i]| <= atol + rtol * |b[i]| for every i, reporting the
 * first violation and the max difference. b is the expected value. */
#define expect_close(a, b, count, rtol, atol, what)                            \
    do {                                                                       \
        int64_t n_ = (count), bad_ = -1;                                       \
        double maxd_ = 0;                                                      \
        for (int64_t i_ = 0; i_ < n_; i_++) {                                  \
            double x_ = (double)(a)[i_], y_ = (double)(b)[i_];                 \
            double d_ = fabs(x_ - y_);                                         \
            if (d_ > maxd_ || isnan(d_)) maxd_ = d_;                           \
            if (bad_ < 0 && !(d_ <= (atol) + (rtol) * fabs(y_))) bad_ = i_;    \
        }                                                                      \
        if (bad_ >= 0)                                                         \
            cr_assert_fail("%s: element %lld is %.9g, expected %.9g within "          \
                    "atol %g + rtol %g; max abs difference %.3g",              \
                    what, (long long)bad_, (double)(a)[bad_],                  \
                    (double)(b)[bad_], (double)(atol), (double)(rtol), maxd_); \
    } while (0)

#endif
