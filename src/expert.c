/*
 * expert.c - the SwiGLU expert FFN, with OpenBLAS and with plain loops.
 *
 * moe_expert_forward() is the only place the layer calls sgemm. It issues
 * three calls whose shapes depend only on (M, H, F), so two callers that
 * pass the same rows get the same bits (given the same OpenBLAS thread
 * count). The loop version is the independent check of it.
 * moe_expert_run() picks the block of a layer's experts: SwiGLU, or the
 * dense act(x . wi^T) . wo^T of Switch Transformers.
 */
#include "moe_layer.h"

#include <cblas.h>
#include <math.h>

float moe_silu(float v)
{
    return v / (1.0f + expf(-v));
}

int64_t moe_expert_scratch_floats(int64_t rows, int64_t ffn)
{
    return 2 * rows * ffn;
}

void moe_expert_forward(const float *x, int64_t rows, int64_t hidden,
                        int64_t ffn, const float *w1, const float *w3,
                        const float *w2, float *scratch, float *y)
{
    if (rows == 0)
        return;
    float *gate_act = scratch;       /* (M, F): x . w1^T, then the product */
    float *up = scratch + rows * ffn; /* (M, F): x . w3^T */
    int m = (int)rows, h = (int)hidden, f = (int)ffn;

    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, f, h, 1.0f, x, h,
                w1, h, 0.0f, gate_act, f);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, f, h, 1.0f, x, h,
                w3, h, 0.0f, up, f);
    for (int64_t i = 0; i < rows * ffn; i++)
        gate_act[i] = moe_silu(gate_act[i]) * up[i];
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, h, f, 1.0f,
                gate_act, f, w2, f, 0.0f, y, h);
}

void moe_expert_forward_loop(const float *x, int64_t rows, int64_t hidden,
                             int64_t ffn, const float *w1, const float *w3,
                             const float *w2, float *y)
{
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * hidden;
        float *yr = y + r * hidden;
        for (int64_t c = 0; c < hidden; c++)
            yr[c] = 0.0f;
        for (int64_t j = 0; j < ffn; j++) {
            float g = 0.0f, u = 0.0f;
            for (int64_t c = 0; c < hidden; c++) {
                g += xr[c] * w1[j * hidden + c];
                u += xr[c] * w3[j * hidden + c];
            }
            float act = moe_silu(g) * u;
            for (int64_t c = 0; c < hidden; c++)
                yr[c] += act * w2[c * ffn + j];
        }
    }
}

float moe_activate(enum moe_activation act, float v)
{
    switch (act) {
    case MOE_ACT_RELU:
        return v > 0.0f || isnan(v) ? v : 0.0f;
    case MOE_ACT_GELU:
        return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case MOE_ACT_GELU_TANH: {
        float inner = 0.79788456080286536f * (v + 0.044715f * v * v * v);
        return 0.5f * v * (1.0f + tanhf(inner));
    }
    case MOE_ACT_SILU:
    default:
        return moe_silu(v);
    }
}

/* The dense block: y (M, H) = act(x . w1^T) . w2^T, two sgemm calls whose
 * shapes depend only on (M, H, F). */
static void dense_expert_forward(const float *x, int64_t rows, int64_t hidden,
                                 int64_t ffn, const float *w1, const float *w2,
                                 enum moe_activation act, float *scratch, float *y)
{
    if (rows == 0)
        return;
    int m = (int)rows, h = (int)hidden, f = (int)ffn;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, f, h, 1.0f, x, h,
                w1, h, 0.0f, scratch, f);
    for (int64_t i = 0; i < rows * ffn; i++)
        scratch[i] = moe_activate(act, scratch[i]);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, h, f, 1.0f,
                scratch, f, w2, f, 0.0f, y, h);
}

void moe_expert_run(const struct moe_weights *w, int64_t e, const float *x,
                    int64_t rows, float *scratch, float *y)
{
    int64_t H = w->shape.hidden, F = w->shape.ffn, at = e - w->expert_first;
    if (w->expert_kind == MOE_EXPERT_DENSE)
        dense_expert_forward(x, rows, H, F, w->w1 + at * F * H, w->w2 + at * H * F,
                             w->activation, scratch, y);
    else
        moe_expert_forward(x, rows, H, F, w->w1 + at * F * H, w->w3 + at * F * H,
                           w->w2 + at * H * F, scratch, y);
}
