/*
 * combine.c - the weighted sum of each token's K expert outputs.
 *
 * One function for the golden path and the ranks: the sum runs in slot
 * order k = 0..K-1 in fp32, so equal inputs give equal bits.
 */
#include "moe_layer.h"

#include <stddef.h>

void moe_combine(int64_t tokens, int64_t hidden, int64_t top_k,
                 const float *weights, const float *const *rows, float *out)
{
    for (int64_t t = 0; t < tokens; t++) {
        float *o = out + t * hidden;
        for (int64_t c = 0; c < hidden; c++)
            o[c] = 0.0f;
        for (int64_t k = 0; k < top_k; k++) {
            const float *row = rows[t * top_k + k];
            if (row == NULL)
                continue; /* a dropped assignment adds nothing */
            float w = weights[t * top_k + k];
            for (int64_t c = 0; c < hidden; c++)
                o[c] += w * row[c];
        }
    }
}
