/*
 * shared.c - the shared expert, which every token passes through.
 *
 * Each rank runs the shared expert on its own tokens, and the golden path
 * runs it on all of them, so the two calls see different row counts. An
 * OpenBLAS row's bits depend on the call's M, and on the row's place in the
 * call, so both paths cut the batch into the same fixed tiles of
 * MOE_SHARED_TILE global token positions and always call the expert with
 * M = MOE_SHARED_TILE. A rank whose tokens cover part of a tile fills the
 * other rows with zeros. The zeros cost time but never touch the bits of
 * the real rows, since a GEMM row depends only on its own input row.
 */
#include "moe_layer.h"

#include <math.h>
#include <string.h>

int64_t moe_shared_scratch_floats(int64_t hidden, int64_t shared_ffn)
{
    /* a tile of input rows, a tile of output rows, the expert's scratch */
    return 2 * MOE_SHARED_TILE * hidden +
           moe_expert_scratch_floats(MOE_SHARED_TILE, shared_ffn);
}

void moe_shared_expert_forward(const struct moe_weights *w, const float *x,
                               int64_t first, int64_t count, float *scratch,
                               float *y)
{
    int64_t H = w->shape.hidden, Fs = w->shape.shared_ffn;
    if (Fs == 0 || count == 0)
        return;
    float *tile_in = scratch;
    float *tile_out = scratch + MOE_SHARED_TILE * H;
    float *expert_scratch = scratch + 2 * MOE_SHARED_TILE * H;
    size_t row_bytes = (size_t)H * sizeof(float);

    int64_t end = first + count;
    for (int64_t tile = first / MOE_SHARED_TILE * MOE_SHARED_TILE; tile < end;
         tile += MOE_SHARED_TILE) {
        int64_t lo = tile > first ? tile : first;
        int64_t hi = tile + MOE_SHARED_TILE < end ? tile + MOE_SHARED_TILE : end;

        memset(tile_in, 0, MOE_SHARED_TILE * row_bytes);
        memcpy(tile_in + (lo - tile) * H, x + (lo - first) * H,
               (size_t)(hi - lo) * row_bytes);
        moe_expert_forward(tile_in, MOE_SHARED_TILE, H, Fs, w->shared_w1,
                           w->shared_w3, w->shared_w2, expert_scratch, tile_out);
        memcpy(y + (lo - first) * H, tile_out + (lo - tile) * H,
               (size_t)(hi - lo) * row_bytes);
    }

    if (!w->shared_gate)
        return;
    for (int64_t t = 0; t < count; t++) {
        float logit;
        moe_gate_logits(x + t * H, w->shared_gate, 1, H, 1, &logit);
        float gate = 1.0f / (1.0f + expf(-logit));
        for (int64_t c = 0; c < H; c++)
            y[t * H + c] *= gate;
    }
}

void moe_add_shared(float *out, const float *shared, int64_t count, int64_t hidden)
{
    for (int64_t i = 0; i < count * hidden; i++)
        out[i] += shared[i];
}
