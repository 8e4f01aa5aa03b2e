/*
 * capacity.c - expert capacity: how many assignments an expert keeps, and
 * which ones.
 *
 * The rule reads one expert's assignments in global token order, which the
 * golden path builds directly and the ranks build by taking the sources in
 * rank order. So both paths decide the same drops on any rank count.
 */
#include "moe_layer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int64_t moe_capacity_from_factor(double factor, int64_t min_capacity,
                                 int64_t tokens, int64_t top_k, int64_t experts)
{
    if (!(factor > 0.0) || experts < 1)
        return -1;
    double capacity = ceil(factor * (double)tokens * (double)top_k / (double)experts);
    if (!(capacity < 9.0e18))
        return -1;
    int64_t limit = (int64_t)capacity;
    return limit > min_capacity ? limit : min_capacity;
}

/* True when assignment a (weight wa) ranks above b (weight wb) for the probs
 * policy: a higher weight first, NaN last, then the lower token. a < b in
 * token order, so equal weights keep a first. */
static int weight_above(float wa, float wb)
{
    if (isnan(wa))
        return 0;
    if (isnan(wb))
        return 1;
    return wa > wb;
}

int64_t moe_capacity_keep(const struct moe_capacity *c, int64_t n,
                          const float *weights, uint8_t *keep)
{
    if (c->limit < 0 || c->limit >= n) {
        memset(keep, 1, (size_t)n);
        return n;
    }
    memset(keep, 0, (size_t)n);
    if (c->policy == MOE_DROP_POSITION) {
        memset(keep, 1, (size_t)c->limit);
        return c->limit;
    }
    /* Probs: sort the indices with a stable merge sort by the ranking rule
     * and keep the first `limit`. */
    int64_t *index = malloc((size_t)(2 * n) * sizeof *index);
    if (!index)
        return -1;
    int64_t *merged = index + n;
    for (int64_t i = 0; i < n; i++)
        index[i] = i;
    for (int64_t width = 1; width < n; width *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * width) {
            int64_t mid = lo + width < n ? lo + width : n;
            int64_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            int64_t a = lo, b = mid, out = lo;
            while (a < mid && b < hi)
                /* take from the right run only when it ranks strictly above:
                 * stability keeps the lower token first on ties */
                merged[out++] = weight_above(weights[index[b]], weights[index[a]])
                                 ? index[b++] : index[a++];
            while (a < mid)
                merged[out++] = index[a++];
            while (b < hi)
                merged[out++] = index[b++];
        }
        memcpy(index, merged, (size_t)n * sizeof *index);
    }
    for (int64_t i = 0; i < c->limit; i++)
        keep[index[i]] = 1;
    free(index);
    return c->limit;
}
