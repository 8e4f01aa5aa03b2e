/*
 * expert.c - the SwiGLU expert FFN, with OpenBLAS and with plain loops.
 *
 * moe_expert_forward() is the only place the layer multiplies by expert
 * weights. It issues three GEMMs whose shapes depend only on (M, H, F), so
 * two callers that pass the same rows get the same bits (given the same
 * OpenBLAS thread count). The loop version is the independent check of it.
 * moe_expert_run() picks the block of a layer's experts: SwiGLU, or the
 * dense act(x . wi^T) . wo^T of Switch Transformers.
 *
 * A GEMM of at most ROW_KERNEL_MAX_ROWS rows, the decode case, runs on the
 * row kernel below instead of sgemm when the CPU has AVX2 and FMA. At a few
 * rows the time goes into reading the weights, and sgemm reads them
 * slowly. OpenBLAS 0.3.21 first packs the whole weight matrix into a
 * buffer (84% of its time at M = 2 in a perf profile), and its micro-kernel
 * is sized for many rows. So an expert call of 1 to 8 rows read its
 * weights at 6 to 7 GB/s, where one core streams 15 to 17 GB/s. Both were
 * measured with the weights evicted from the caches, on a 2-core Intel
 * Xeon VM where OpenBLAS picks its SkylakeX kernels. The row kernel reads
 * each weight row once, straight from memory, and takes the dot products
 * of all the call's rows with it. Which path runs depends only on M and
 * the CPU, so the golden path and the ranks, which pass the same rows,
 * still get the same bits.
 */
#include "moe_layer.h"

#include <cblas.h>
#include <math.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_ROW_KERNEL 1
#else
#define HAVE_ROW_KERNEL 0
#endif

/* Largest M that the row kernel takes. Its time grows with M while
 * sgemm's barely does below 32 rows; they cost about the same at 16 to 24
 * rows with H = F = 1024 on the machine above.
 * NOTE: the row kernel runs on the calling thread alone, whatever the
 * OpenBLAS thread count, so a single rank with several threads streams its
 * weights at the rate of one core. Splitting the weight rows over threads
 * would keep the bits, since each output is computed on its own. */
#define ROW_KERNEL_MAX_ROWS 16

#if HAVE_ROW_KERNEL
/* The row kernel: y (M, N) = x (M, K) . w (N, K)^T, all row-major, with
 * AVX2 and FMA. Each output is one dot product of length K: eight lane
 * sums over k = lane (mod 8) in ascending k, added in the fixed order of
 * finish_dot(), then the K mod 8 last terms. That order is the same for
 * every output and every M, whichever block computes it. A block takes 4
 * weight rows and 1 or 2 rows of x. It prefetches the weight rows of the
 * next block, because a weight row of 4 KiB is one page and the hardware
 * prefetcher stops at page boundaries. */
#define ROW_KERNEL __attribute__((target("avx2,fma")))

ROW_KERNEL static inline float finish_dot(__m256 lanes, const float *x,
                                          const float *w, int64_t k, int64_t K)
{
    __m128 four = _mm_add_ps(_mm256_castps256_ps128(lanes),
                             _mm256_extractf128_ps(lanes, 1));
    __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    float sum = _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
    for (; k < K; k++) {
        float term = x[k] * w[k];
        sum += term;
    }
    return sum;
}

/* Starts loading the cache line at w + k of each of the 4 rows of a block
 * (rows K floats apart), once per 64-byte line. */
ROW_KERNEL static inline void prefetch_block(const float *w, int64_t k, int64_t K)
{
    if (k % 16 != 0)
        return;
    for (int c = 0; c < 4; c++)
        _mm_prefetch((const char *)(w + c * K + k), _MM_HINT_T0);
}

/* y[0] = x . w[0]. */
ROW_KERNEL static void dot_1x1(const float *x, const float *w, int64_t K, float *y)
{
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), acc);
    y[0] = finish_dot(acc, x, w, k, K);
}

/* y[c] = x . w[c] for the 4 weight rows c. `next` is the block to
 * prefetch. */
ROW_KERNEL static void dot_1x4(const float *x, const float *w, const float *next,
                               int64_t K, float *y)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        prefetch_block(next, k, K);
        __m256 xk = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(xk, _mm256_loadu_ps(w + k), a0);
        a1 = _mm256_fmadd_ps(xk, _mm256_loadu_ps(w + K + k), a1);
        a2 = _mm256_fmadd_ps(xk, _mm256_loadu_ps(w + 2 * K + k), a2);
        a3 = _mm256_fmadd_ps(xk, _mm256_loadu_ps(w + 3 * K + k), a3);
    }
    y[0] = finish_dot(a0, x, w, k, K);
    y[1] = finish_dot(a1, x, w + K, k, K);
    y[2] = finish_dot(a2, x, w + 2 * K, k, K);
    y[3] = finish_dot(a3, x, w + 3 * K, k, K);
}

/* y[r * ldy + c] = x[r] . w[c] for the 2 rows r of x (ldx floats apart)
 * and the 4 weight rows c. */
ROW_KERNEL static void dot_2x4(const float *x, int64_t ldx, const float *w,
                               const float *next, int64_t K, float *y, int64_t ldy)
{
    const float *x1 = x + ldx;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        prefetch_block(next, k, K);
        __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + K + k);
        __m256 w2 = _mm256_loadu_ps(w + 2 * K + k), w3 = _mm256_loadu_ps(w + 3 * K + k);
        __m256 xk = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(xk, w0, a0);
        a1 = _mm256_fmadd_ps(xk, w1, a1);
        a2 = _mm256_fmadd_ps(xk, w2, a2);
        a3 = _mm256_fmadd_ps(xk, w3, a3);
        xk = _mm256_loadu_ps(x1 + k);
        b0 = _mm256_fmadd_ps(xk, w0, b0);
        b1 = _mm256_fmadd_ps(xk, w1, b1);
        b2 = _mm256_fmadd_ps(xk, w2, b2);
        b3 = _mm256_fmadd_ps(xk, w3, b3);
    }
    y[0] = finish_dot(a0, x, w, k, K);
    y[1] = finish_dot(a1, x, w + K, k, K);
    y[2] = finish_dot(a2, x, w + 2 * K, k, K);
    y[3] = finish_dot(a3, x, w + 3 * K, k, K);
    y[ldy] = finish_dot(b0, x1, w, k, K);
    y[ldy + 1] = finish_dot(b1, x1, w + K, k, K);
    y[ldy + 2] = finish_dot(b2, x1, w + 2 * K, k, K);
    y[ldy + 3] = finish_dot(b3, x1, w + 3 * K, k, K);
}

/* Computes y = x . w^T block by block, reading the weights from memory
 * once: a block's 4 weight rows (16 KiB at K = 1024) are still in the L1 or
 * L2 cache for every pass over the rows of x after the first. */
ROW_KERNEL static void row_kernel_gemm(const float *x, int64_t M, int64_t K,
                                       int64_t N, const float *w, float *y)
{
    int64_t j = 0;
    for (; j + 4 <= N; j += 4) {
        const float *block = w + j * K;
        const float *next = j + 8 <= N ? block + 4 * K : block;
        int64_t r = 0;
        for (; r + 2 <= M; r += 2)
            dot_2x4(x + r * K, K, block, next, K, y + r * N + j, N);
        for (; r < M; r++)
            dot_1x4(x + r * K, block, next, K, y + r * N + j);
    }
    for (; j < N; j++)
        for (int64_t r = 0; r < M; r++)
            dot_1x1(x + r * K, w + j * K, K, y + r * N + j);
}

static int row_kernel_available(void)
{
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

int64_t moe_expert_row_kernel_rows(void)
{
#if HAVE_ROW_KERNEL
    if (row_kernel_available())
        return ROW_KERNEL_MAX_ROWS;
#endif
    return 0;
}

/* y (M, N) = x (M, K) . w (N, K)^T, all row-major: the row kernel for at
 * most moe_expert_row_kernel_rows() rows, sgemm above. */
static void gemm_rows(const float *x, int64_t rows, int64_t k, int64_t n,
                      const float *w, float *y)
{
#if HAVE_ROW_KERNEL
    if (rows <= ROW_KERNEL_MAX_ROWS && row_kernel_available()) {
        row_kernel_gemm(x, rows, k, n, w, y);
        return;
    }
#endif
    int m = (int)rows, ki = (int)k, ni = (int)n;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, ni, ki, 1.0f, x, ki,
                w, ki, 0.0f, y, ni);
}

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

    gemm_rows(x, rows, hidden, ffn, w1, gate_act);
    gemm_rows(x, rows, hidden, ffn, w3, up);
    for (int64_t i = 0; i < rows * ffn; i++)
        gate_act[i] = moe_silu(gate_act[i]) * up[i];
    gemm_rows(gate_act, rows, ffn, hidden, w2, y);
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

/* The dense block: y (M, H) = act(x . w1^T) . w2^T, two GEMMs whose
 * shapes depend only on (M, H, F). */
static void dense_expert_forward(const float *x, int64_t rows, int64_t hidden,
                                 int64_t ffn, const float *w1, const float *w2,
                                 enum moe_activation act, float *scratch, float *y)
{
    if (rows == 0)
        return;
    gemm_rows(x, rows, hidden, ffn, w1, scratch);
    for (int64_t i = 0; i < rows * ffn; i++)
        scratch[i] = moe_activate(act, scratch[i]);
    gemm_rows(scratch, rows, ffn, hidden, w2, y);
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
