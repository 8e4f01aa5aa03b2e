/*
 * 04_expert_ffn.c - one SwiGLU expert, with OpenBLAS and with plain loops.
 *
 * An expert is a feed-forward network applied to each row routed to it:
 *   y (M, H) = (silu(x . w1^T) * (x . w3^T)) . w2^T
 * with x (M, H), w1 and w3 (F, H), w2 (H, F) and silu(v) = v / (1 + e^-v).
 * moe_expert_forward() computes it with three matrix products, which at
 * this many rows are OpenBLAS sgemm calls on one thread. This example
 * computes it again with a plain triple loop, summing each dot product in
 * index order, and compares the two.
 *
 * They agree within a tolerance, not bit for bit: OpenBLAS adds the
 * products of each dot product in another order (blocked and vectorised),
 * and float32 addition is not associative. A sum of n float32 products
 * reordered can move by about n * 2^-24 of the sum of their magnitudes;
 * with H + F = 96 products on the path to each output that is about 6e-6
 * of the values' scale. The check allows 1e-5 of max|y|.
 */
#include "moe_layer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { ROWS = 32, HIDDEN = 32, FFN = 64 };
#define SEED 3
#define TOLERANCE 1e-5 /* of max|y|, see above */

/* The expert in the formula's order, with float32 sums in index order. */
static void expert_by_loops(const float *x, const float *w1, const float *w3,
                            const float *w2, float *y)
{
    float a[FFN];
    for (int m = 0; m < ROWS; m++) {
        for (int f = 0; f < FFN; f++) {
            float gate = 0.0f, up = 0.0f;
            for (int h = 0; h < HIDDEN; h++) {
                gate += x[m * HIDDEN + h] * w1[f * HIDDEN + h];
                up += x[m * HIDDEN + h] * w3[f * HIDDEN + h];
            }
            a[f] = moe_silu(gate) * up;
        }
        for (int h = 0; h < HIDDEN; h++) {
            float sum = 0.0f;
            for (int f = 0; f < FFN; f++)
                sum += a[f] * w2[h * FFN + f];
            y[m * HIDDEN + h] = sum;
        }
    }
}

int main(int argc, char **argv)
{
    if (argc > 1) {
        fprintf(stderr, "%s: invalid argument '%s': this example takes none\n", argv[0],
                argv[1]);
        return 2;
    }
    moe_blas_init(); /* one OpenBLAS thread, as every moe-ep process uses */
    struct moe_shape shape = {.tokens = ROWS, .hidden = HIDDEN, .ffn = FFN,
                              .experts = 1, .top_k = 1};
    struct moe_weights layer;
    float *scratch = malloc((size_t)moe_expert_scratch_floats(ROWS, FFN) * sizeof(float));
    if (!scratch || moe_weights_init_random(&layer, &shape, SEED) != 0) {
        fprintf(stderr, "04_expert_ffn: out of memory for the expert\n");
        free(scratch);
        return 3;
    }
    float x[ROWS * HIDDEN], y_blas[ROWS * HIDDEN], y_loop[ROWS * HIDDEN];
    moe_tokens_random(x, 0, ROWS, HIDDEN, SEED);

    moe_expert_forward(x, ROWS, HIDDEN, FFN, layer.w1, layer.w3, layer.w2, scratch, y_blas);
    expert_by_loops(x, layer.w1, layer.w3, layer.w2, y_loop);

    printf("04_expert_ffn: rows %d, hidden %d, ffn %d, seed %d\n", ROWS, HIDDEN, FFN, SEED);
    printf("row 0, first values:\n  %-9s", "OpenBLAS");
    for (int h = 0; h < 4; h++)
        printf(" %15.9g", y_blas[h]);
    printf("\n  %-9s", "loops");
    for (int h = 0; h < 4; h++)
        printf(" %15.9g", y_loop[h]);
    printf("\n");

    double max_y = 0.0, max_diff = 0.0;
    int bitwise_equal = 0, worst = 0;
    for (int i = 0; i < ROWS * HIDDEN; i++) {
        double diff = fabs((double)y_blas[i] - (double)y_loop[i]);
        max_y = fmax(max_y, fabs((double)y_loop[i]));
        if (diff > max_diff) {
            max_diff = diff;
            worst = i;
        }
        bitwise_equal += memcmp(&y_blas[i], &y_loop[i], sizeof(float)) == 0;
    }
    int ok = max_y > 0.0 && max_diff <= TOLERANCE * max_y;
    printf("bitwise equal values: %d of %d\n", bitwise_equal, ROWS * HIDDEN);
    printf("max |OpenBLAS - loops| = %.3g at row %d, column %d; max|y| = %.3g\n", max_diff,
           worst / HIDDEN, worst % HIDDEN, max_y);
    printf("relative to max|y|: %.3g, tolerance %.0e: %s\n", max_diff / max_y, TOLERANCE,
           ok ? "within tolerance" : "FAILED: outside the tolerance");

    moe_weights_free(&layer);
    free(scratch);
    return ok ? 0 : 1;
}
