/*
 * moe_layer.h - the math of one MoE layer, shared by the golden path and the
 * distributed ranks.
 *
 * Dimension letters used in every shape below:
 *   T tokens, H hidden size, F expert FFN size, E experts, K top-k, R ranks,
 *   M rows given to one expert.
 * All matrices are row-major float32 unless a comment says otherwise.
 *
 * Bitwise contract: every function here is deterministic for a given input,
 * and the result for one token or one row never depends on how many other
 * tokens are in the call, except moe_expert_forward(), whose OpenBLAS GEMMs
 * depend on M. The distributed path therefore hands each expert exactly the
 * (M, H) matrix the golden path builds: the expert's rows in global token
 * order. OpenBLAS must run on one thread (moe_blas_init) in both paths,
 * because its bits also depend on the thread count.
 */
#ifndef MOE_LAYER_H
#define MOE_LAYER_H

#include <stddef.h>
#include <stdint.h>

struct moe_shape {
    int64_t tokens;  /* T, the whole batch across all ranks */
    int64_t hidden;  /* H */
    int64_t ffn;     /* F */
    int64_t experts; /* E */
    int64_t top_k;   /* K, 1 <= K <= E */
};

/* Weights of one layer in the Hugging Face (Mixtral) layout. Each expert
 * tensor stores all E experts back to back. */
struct moe_weights {
    struct moe_shape shape;
    float *gate; /* (E, H): router weight, logits = x . gate^T */
    float *w1;   /* (E, F, H): gate projection of each expert */
    float *w3;   /* (E, F, H): up projection of each expert */
    float *w2;   /* (E, H, F): down projection of each expert */
};

/* Sets OpenBLAS to one thread. Call once per process before any expert GEMM;
 * the golden path and every rank must run with the same thread count. */
void moe_blas_init(void);

/* Allocates `bytes` for a large buffer (activations, weights), 2 MiB
 * aligned and marked for transparent huge pages, which cuts the page faults
 * of first touch and the TLB misses of the GEMMs. Release with free().
 * Returns NULL when out of memory. */
void *moe_alloc_large(size_t bytes);

/* ---- seeded data ------------------------------------------------------ */

/* Random streams, so that each tensor is drawn independently of the others
 * and of the rank count. */
enum moe_stream {
    MOE_STREAM_TOKENS = 1,
    MOE_STREAM_GATE = 2,
    MOE_STREAM_W1 = 3,
    MOE_STREAM_W3 = 4,
    MOE_STREAM_W2 = 5,
};

/* Fills dst[0..count) with uniform values in [-scale, scale). Element i of
 * (seed, stream, substream) is a pure function of those four numbers, so any
 * process can regenerate any slice. */
void moe_fill_uniform(float *dst, int64_t count, uint64_t seed,
                      uint32_t stream, uint32_t substream, int64_t first,
                      float scale);

/* Allocates the weights for `shape` and draws them from `seed`. Returns 0 or
 * -ENOMEM. */
int moe_weights_init_random(struct moe_weights *weights,
                            const struct moe_shape *shape, uint64_t seed);
void moe_weights_free(struct moe_weights *weights);

/* Draws tokens [first, first + count) of the batch, each of width H, into
 * x (count, H). */
void moe_tokens_random(float *x, int64_t first, int64_t count,
                       int64_t hidden, uint64_t seed);

/* ---- partitioning ----------------------------------------------------- */

/* Contiguous, nearly equal blocks: the first (total mod parts) parts get one
 * item more. Used for tokens over ranks and for experts over ranks. */
void moe_block_range(int64_t total, int parts, int part, int64_t *first,
                     int64_t *count);

/* Rank that owns expert e when E experts are split over R ranks. */
int moe_expert_owner(int64_t experts, int ranks, int64_t expert);

/* ---- route ------------------------------------------------------------ */

/* Computes gate logits (T, E) = x (T, H) . gate (E, H)^T with a fixed
 * summation order per dot product, so a token's logits are the same bits
 * whatever T is. */
void moe_gate_logits(const float *x, const float *gate, int64_t tokens,
                     int64_t hidden, int64_t experts, float *logits);

/* Routes T tokens the Mixtral way: softmax over the E logits in fp32, top-k
 * by probability, then the k weights divided by their sum.
 *   logits (T, E) in; probs (T, E), expert_ids (T, K) and weights (T, K) out.
 * Ties go to the lower expert index. NaN ranks below every number, including
 * -inf, so the K ids of a token are always distinct and in [0, E), even when
 * its logits contain NaN or Inf. Probabilities and weights follow IEEE
 * arithmetic for a softmax that subtracts the row maximum: a NaN or +Inf
 * logit, or a row of only -Inf, makes all of that token's probabilities and
 * weights NaN. */
void moe_route_topk(const float *logits, int64_t tokens, int64_t experts,
                    int64_t top_k, float *probs, int32_t *expert_ids,
                    float *weights);

/* ---- compute ---------------------------------------------------------- */

/* Floats of scratch that moe_expert_forward() needs for M rows. */
int64_t moe_expert_scratch_floats(int64_t rows, int64_t ffn);

/* Runs one SwiGLU expert on M rows with OpenBLAS:
 *   y (M, H) = (silu(x . w1^T) * (x . w3^T)) . w2^T
 * x is (M, H), w1 and w3 are (F, H), w2 is (H, F), and scratch has room for
 * moe_expert_scratch_floats(M, F) floats. x, y and scratch must not
 * overlap. M may be 0; M, H and F must fit in an int, as cblas_sgemm takes
 * int dimensions (the program's option limits ensure it). */
void moe_expert_forward(const float *x, int64_t rows, int64_t hidden,
                        int64_t ffn, const float *w1, const float *w3,
                        const float *w2, float *scratch, float *y);

/* The same expert with plain loops and no BLAS, to test the fast path. It
 * sums in a different order, so the two agree within a tolerance only. */
void moe_expert_forward_loop(const float *x, int64_t rows, int64_t hidden,
                             int64_t ffn, const float *w1, const float *w3,
                             const float *w2, float *y);

/* silu(v) = v / (1 + exp(-v)), the SwiGLU activation. */
float moe_silu(float v);

/* ---- combine ---------------------------------------------------------- */

/* Sums each token's K weighted expert outputs in slot order k = 0..K-1:
 *   out[t] = sum_k weights[t][k] * rows[t * K + k]
 * weights is (T, K), rows contains T * K pointers to H floats, and out is
 * (T, H). A NULL pointer adds nothing. It marks an assignment dropped
 * by a capacity limit, which the layer does not apply yet. Both paths call
 * this one function, so the same inputs give the same bits. */
void moe_combine(int64_t tokens, int64_t hidden, int64_t top_k,
                 const float *weights, const float *const *rows, float *out);

/* ---- whole layer ------------------------------------------------------ */

/* Results of the golden path besides the output. Arrays are allocated by
 * the callee and released with moe_golden_info_free(). */
struct moe_golden_info {
    int64_t *tokens_per_expert; /* (E) */
    int32_t *expert_ids;        /* (T, K) */
    float *weights;             /* (T, K) */
};

/* Computes the layer in one process with no shared memory: route all T
 * tokens, give each expert its rows in token order, run the experts, and
 * combine. x is (T, H), out is (T, H). info may be NULL.
 * Returns 0 or -ENOMEM. */
int moe_golden_forward(const struct moe_weights *weights, const float *x,
                       float *out, struct moe_golden_info *info);
void moe_golden_info_free(struct moe_golden_info *info);

/* An independent plain-loop reference of the whole layer in double
 * precision, used to test the golden path. out is (T, H) doubles, ids
 * (T, K). topk_gap (T) receives, per token, the probability gap between the
 * K-th and the (K+1)-th expert, which measures how close the selection came
 * to a tie (1.0 when K == E). Returns 0, -EINVAL for an invalid shape, or
 * -ENOMEM. */
int moe_reference_forward(const struct moe_weights *weights, const float *x,
                          double *out, int32_t *ids, double *topk_gap);

#endif
