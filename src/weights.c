/*
 * weights.c - seeded random weights and tokens, and the block partitions.
 *
 * Every value is a pure function of (seed, stream, substream, index), so a
 * rank can regenerate exactly the slice it needs and the result never
 * depends on the rank count. Uniform values keep the layer well scaled:
 * the gate gives logits with a spread of about 1, and the expert weights
 * are scaled by 1/sqrt(fan-in).
 */
#define _GNU_SOURCE /* CPU_COUNT, sched_getaffinity */
#include "moe_layer.h"
#include "moe_error.h"

#include <cblas.h>
#include <errno.h>
#include <sched.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

void moe_blas_init(void)
{
    /* Set the count only when it differs. In a process forked from one that
     * already runs OpenBLAS, openblas_set_num_threads(1) starts a new thread
     * pool (seen with 0.3.21), and its idle thread keeps taking the core
     * from the rank with sched_yield. */
    if (openblas_get_num_threads() != 1)
        openblas_set_num_threads(1);
}

void moe_blas_set_threads(int threads)
{
    if (threads < 1)
        threads = 1;
    if (openblas_get_num_threads() != threads)
        openblas_set_num_threads(threads);
}

int moe_cores_available(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
        return CPU_COUNT(&set);
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    return online > 0 ? (int)online : 1;
}

int moe_blas_threads_auto(int ranks)
{
    int cores = moe_cores_available();
    int threads = ranks > 0 ? cores / ranks : 1;
    return threads < 1 ? 1 : threads;
}

void *moe_alloc_large(size_t bytes)
{
    const size_t huge_page = 2u << 20;
    void *p = NULL;
    if (bytes < huge_page)
        return malloc(bytes ? bytes : 1);
    if (posix_memalign(&p, huge_page, bytes) != 0)
        return NULL;
    /* Advice only: without transparent huge pages this changes nothing. */
    madvise(p, (bytes + huge_page - 1) & ~(huge_page - 1), MADV_HUGEPAGE);
    return p;
}

/* A 64-bit mixing function (the finaliser of splitmix64); a different key
 * for every element gives independent-looking values. */
static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void moe_fill_uniform(float *dst, int64_t count, uint64_t seed,
                      uint32_t stream, uint32_t substream, int64_t first,
                      float scale)
{
    uint64_t key = mix64(seed ^ mix64(((uint64_t)stream << 32) | substream));
    for (int64_t i = 0; i < count; i++) {
        uint64_t bits = mix64(key + 0x9e3779b97f4a7c15ULL * (uint64_t)(first + i));
        /* 24 random bits give a float in [0, 1) exactly. */
        float unit = (float)(bits >> 40) * (1.0f / 16777216.0f);
        dst[i] = (2.0f * unit - 1.0f) * scale;
    }
}

int moe_weights_alloc(struct moe_weights *w, const struct moe_shape *shape,
                      int with_score_bias, int with_shared_gate)
{
    return moe_weights_alloc_experts(w, shape, 0, shape->experts, with_score_bias,
                                     with_shared_gate);
}

int moe_weights_alloc_experts(struct moe_weights *w, const struct moe_shape *shape,
                              int64_t first, int64_t count, int with_score_bias,
                              int with_shared_gate)
{
    int64_t H = shape->hidden, F = shape->ffn, E = shape->experts,
            Fs = shape->shared_ffn;
    memset(w, 0, sizeof *w);
    w->shape = *shape;
    w->expert_first = first;
    w->expert_count = count;
    moe_router_default(&w->router);
    w->capacity.limit = -1; /* dropless */
    w->aux_loss_coef = NAN;
    w->z_loss_coef = NAN;
    w->gate = malloc((size_t)(E * H) * sizeof(float));
    w->w1 = moe_alloc_large((size_t)(count * F * H + 1) * sizeof(float));
    w->w3 = moe_alloc_large((size_t)(count * F * H + 1) * sizeof(float));
    w->w2 = moe_alloc_large((size_t)(count * H * F + 1) * sizeof(float));
    int failed = !w->gate || !w->w1 || !w->w3 || !w->w2;
    if (with_score_bias) {
        w->score_bias = malloc((size_t)E * sizeof(float));
        failed = failed || !w->score_bias;
    }
    if (Fs > 0) {
        w->shared_w1 = moe_alloc_large((size_t)(Fs * H) * sizeof(float));
        w->shared_w3 = moe_alloc_large((size_t)(Fs * H) * sizeof(float));
        w->shared_w2 = moe_alloc_large((size_t)(H * Fs) * sizeof(float));
        failed = failed || !w->shared_w1 || !w->shared_w3 || !w->shared_w2;
        if (with_shared_gate) {
            w->shared_gate = malloc((size_t)H * sizeof(float));
            failed = failed || !w->shared_gate;
        }
    }
    if (failed) {
        moe_weights_free(w);
        return moe_fail(-ENOMEM, "out of memory for the weights of %lld experts "
                        "of %lld x %lld", (long long)E, (long long)F, (long long)H);
    }
    return 0;
}

void moe_weights_fill_random(struct moe_weights *w, uint64_t seed)
{
    int64_t H = w->shape.hidden, F = w->shape.ffn, E = w->shape.experts,
            Fs = w->shape.shared_ffn;

    /* x is uniform in [-1, 1) with variance 1/3; a gate scale of 3/sqrt(H)
     * gives logits with a standard deviation of about 1. */
    moe_fill_uniform(w->gate, E * H, seed, MOE_STREAM_GATE, 0, 0,
                     3.0f / sqrtf((float)H));
    for (int64_t e = w->expert_first; e < w->expert_first + w->expert_count; e++) {
        int64_t at = e - w->expert_first;
        moe_fill_uniform(w->w1 + at * F * H, F * H, seed, MOE_STREAM_W1,
                         (uint32_t)e, 0, 1.0f / sqrtf((float)H));
        if (w->w3)
            moe_fill_uniform(w->w3 + at * F * H, F * H, seed, MOE_STREAM_W3,
                             (uint32_t)e, 0, 1.0f / sqrtf((float)H));
        moe_fill_uniform(w->w2 + at * H * F, H * F, seed, MOE_STREAM_W2,
                         (uint32_t)e, 0, 1.0f / sqrtf((float)F));
    }
    /* Sigmoid scores of such logits spread over about 0.2, so a bias of up
     * to 0.1 changes some selections without deciding all of them. */
    if (w->score_bias)
        moe_fill_uniform(w->score_bias, E, seed, MOE_STREAM_SCORE_BIAS, 0, 0, 0.1f);
    if (w->shared_w1) {
        moe_fill_uniform(w->shared_w1, Fs * H, seed, MOE_STREAM_SHARED_W1, 0, 0,
                         1.0f / sqrtf((float)H));
        moe_fill_uniform(w->shared_w3, Fs * H, seed, MOE_STREAM_SHARED_W3, 0, 0,
                         1.0f / sqrtf((float)H));
        moe_fill_uniform(w->shared_w2, H * Fs, seed, MOE_STREAM_SHARED_W2, 0, 0,
                         1.0f / sqrtf((float)Fs));
    }
    if (w->shared_gate)
        moe_fill_uniform(w->shared_gate, H, seed, MOE_STREAM_SHARED_GATE, 0, 0,
                         3.0f / sqrtf((float)H));
}

int moe_weights_init_random(struct moe_weights *weights,
                            const struct moe_shape *shape, uint64_t seed)
{
    int rc = moe_weights_alloc(weights, shape, 0, 0);
    if (rc == 0)
        moe_weights_fill_random(weights, seed);
    return rc;
}

void moe_weights_free(struct moe_weights *w)
{
    free(w->gate);
    free(w->w1);
    free(w->w3);
    free(w->w2);
    free(w->score_bias);
    free(w->gate_bias);
    free(w->shared_w1);
    free(w->shared_w3);
    free(w->shared_w2);
    free(w->shared_gate);
    struct moe_shape shape = w->shape;
    memset(w, 0, sizeof *w);
    w->shape = shape;
}

void moe_tokens_random(float *x, int64_t first, int64_t count, int64_t hidden,
                       uint64_t seed)
{
    moe_fill_uniform(x, count * hidden, seed, MOE_STREAM_TOKENS, 0,
                     first * hidden, 1.0f);
}

void moe_block_range(int64_t total, int parts, int part, int64_t *first,
                     int64_t *count)
{
    int64_t base = total / parts, extra = total % parts;
    *count = base + (part < extra ? 1 : 0);
    *first = part * base + (part < extra ? part : extra);
}

int moe_expert_owner(int64_t experts, int ranks, int64_t expert)
{
    int64_t base = experts / ranks, extra = experts % ranks;
    /* The first `extra` ranks own base + 1 experts each. */
    if (expert < extra * (base + 1))
        return (int)(expert / (base + 1));
    return (int)(extra + (expert - extra * (base + 1)) / base);
}
