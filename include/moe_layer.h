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
 * order. OpenBLAS must run on the same number of threads in both paths
 * (moe_blas_set_threads), because its bits also depend on the thread
 * count.
 */
#ifndef MOE_LAYER_H
#define MOE_LAYER_H

#include <stddef.h>
#include <stdint.h>

/* Largest E the router supports; its per-token work arrays are sized by
 * it. */
#define MOE_MAX_EXPERTS 4096

struct moe_shape {
    int64_t tokens;  /* T, the whole batch across all ranks */
    int64_t hidden;  /* H */
    int64_t ffn;     /* F */
    int64_t experts; /* E */
    int64_t top_k;   /* K, 1 <= K <= E */
    int64_t shared_ffn; /* Fs, width of the shared expert; 0 when the layer
                           has none */
};

/* The rules by which the router turns a token's E gate logits into K
 * expert ids and K combine weights. The model families map onto these fields:
 *   mixtral                  softmax-topk, renormalize
 *   qwen2_moe, qwen3_moe,    softmax-topk, renormalize = norm_topk_prob
 *   olmoe
 *   deepseek_v3              sigmoid, score bias, groups, renormalize =
 *                            norm_topk_prob, scaling = routed_scaling_factor
 */
enum moe_scoring {
    /* scores = softmax over all E logits, select the K best scores */
    MOE_SCORING_SOFTMAX_TOPK = 0,
    /* scores = the logits, select the K best, weights = softmax over the
     * K selected logits */
    MOE_SCORING_TOPK_SOFTMAX = 1,
    /* scores = sigmoid of each logit, select the K best scores */
    MOE_SCORING_SIGMOID = 2,
};

struct moe_router {
    enum moe_scoring scoring;
    int renormalize;      /* divide the K weights by their sum */
    float scaling_factor; /* multiplies the K weights last; 1 when unused */
    int64_t groups;       /* experts split into this many equal groups; 1
                             means no group limit */
    int64_t topk_groups;  /* groups a token may select from */
};

/* The block each expert computes. */
enum moe_expert_kind {
    /* y = (act(x . w1^T) * (x . w3^T)) . w2^T, with act = silu (Mixtral) */
    MOE_EXPERT_SWIGLU = 0,
    /* y = act(x . w1^T) . w2^T, no w3 (Switch Transformers' wi and wo) */
    MOE_EXPERT_DENSE = 1,
};

enum moe_activation {
    MOE_ACT_SILU = 0,      /* v / (1 + exp(-v)) */
    MOE_ACT_RELU = 1,      /* max(v, 0); NaN stays NaN */
    MOE_ACT_GELU = 2,      /* 0.5 v (1 + erf(v / sqrt 2)), transformers' "gelu" */
    MOE_ACT_GELU_TANH = 3, /* the tanh approximation, "gelu_new" */
};

/* The rule that picks the assignments an expert keeps when more than its
 * capacity arrive. */
enum moe_drop_policy {
    /* the first `limit` assignments in global token order */
    MOE_DROP_POSITION = 0,
    /* the `limit` assignments with the highest routing weight; ties go to
     * the lower token index, and NaN weights rank lowest */
    MOE_DROP_PROBS = 1,
};

/* Expert capacity. A dropped assignment adds nothing to its token's
 * output. The rule depends only on the whole batch's routing, never on the
 * rank count. */
struct moe_capacity {
    int64_t limit; /* assignments each expert keeps, or -1 for dropless */
    enum moe_drop_policy policy;
};

/* Weights of one layer in the Hugging Face (Mixtral) layout. Each expert
 * tensor stores all E experts back to back. */
struct moe_weights {
    struct moe_shape shape;
    float *gate; /* (E, H): router weight, logits = x . gate^T */
    float *w1;   /* (E, F, H): gate projection of each expert (Switch: wi) */
    float *w3;   /* (E, F, H): up projection of each expert; NULL for
                    MOE_EXPERT_DENSE */
    float *w2;   /* (E, H, F): down projection of each expert (Switch: wo) */
    /* The experts that w1, w3 and w2 hold: expert e sits at index
     * e - expert_first. All E (0, E) unless a rank under MPI loaded only
     * its own; the golden path needs all of them. */
    int64_t expert_first, expert_count;
    enum moe_expert_kind expert_kind;
    enum moe_activation activation;
    struct moe_capacity capacity;
    float *gate_bias; /* (E) added to every token's logits, or NULL. Real
                         checkpoints have none; --skew sets it to make a
                         synthetic gate favour low expert indices. */
    struct moe_router router;
    /* The config's router_aux_loss_coef and router_z_loss_coef, or NaN when
     * it has none; they only scale the reported losses. */
    double aux_loss_coef, z_loss_coef;
    float *score_bias; /* (E) added to the scores for selection only, or
                          NULL (DeepSeek-V3's e_score_correction_bias) */
    /* The shared expert, which every token passes through, or NULL when
     * shape.shared_ffn is 0. */
    float *shared_w1;   /* (Fs, H) */
    float *shared_w3;   /* (Fs, H) */
    float *shared_w2;   /* (H, Fs) */
    float *shared_gate; /* (H): output scaled by sigmoid(x . shared_gate),
                           or NULL for no gate */
};

/* Sets the Mixtral router: softmax-topk, renormalize, no groups, scaling 1. */
void moe_router_default(struct moe_router *router);

/* Checks the router against the shape: 1 <= K <= E, groups divides E,
 * 1 <= topk_groups <= groups, and the kept groups hold at least K experts.
 * Returns 0, or -EINVAL with a message naming the field and the value. */
int moe_router_check(const struct moe_router *router, const struct moe_shape *shape);

/* Sets OpenBLAS to one thread. Call once per process before any expert GEMM;
 * the golden path and every rank must run with the same thread count. */
void moe_blas_init(void);

/* Sets OpenBLAS to `threads` threads (at least 1), only when the count
 * differs: setting it starts a new thread pool. */
void moe_blas_set_threads(int threads);

/* Returns the cores this process may run on (sched_getaffinity), or the
 * online cores when that fails. */
int moe_cores_available(void);

/* Returns the OpenBLAS threads per rank for `ranks` ranks on this
 * machine: cores / ranks, at least 1, so that ranks x threads never
 * exceeds the cores unless there are more ranks than cores. */
int moe_blas_threads_auto(int ranks);

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
    MOE_STREAM_SCORE_BIAS = 6,
    MOE_STREAM_SHARED_W1 = 7,
    MOE_STREAM_SHARED_W3 = 8,
    MOE_STREAM_SHARED_W2 = 9,
    MOE_STREAM_SHARED_GATE = 10,
};

/* Fills dst[0..count) with uniform values in [-scale, scale). Element i of
 * (seed, stream, substream) is a pure function of those four numbers, so any
 * process can regenerate any slice. */
void moe_fill_uniform(float *dst, int64_t count, uint64_t seed,
                      uint32_t stream, uint32_t substream, int64_t first,
                      float scale);

/* Allocates the weights for `shape`, unfilled: the experts, and the shared
 * expert when shape->shared_ffn > 0, plus a score bias and a shared gate
 * when asked for. Sets the Mixtral router. Returns 0 or -ENOMEM, and on
 * failure leaves nothing allocated. */
int moe_weights_alloc(struct moe_weights *weights, const struct moe_shape *shape,
                      int with_score_bias, int with_shared_gate);

/* Like moe_weights_alloc(), but the expert arrays hold only experts
 * [first, first + count), so a rank that owns those experts needs no
 * memory for the others. */
int moe_weights_alloc_experts(struct moe_weights *weights, const struct moe_shape *shape,
                              int64_t first, int64_t count, int with_score_bias,
                              int with_shared_gate);

/* Draws every allocated array of `weights` from `seed`. An expert gets the
 * same values in every slice that contains it. */
void moe_weights_fill_random(struct moe_weights *weights, uint64_t seed);

/* Allocates the weights for `shape`, without score bias or shared gate, and
 * draws them from `seed`. Returns 0 or -ENOMEM. */
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

/* Adds the (E) gate bias to every row of logits (T, E); does nothing when
 * bias is NULL. */
void moe_add_gate_bias(float *logits, const float *bias, int64_t tokens,
                       int64_t experts);

/* Softmax of one row of E logits in fp32, subtracting the row maximum and
 * summing in index order: the router's own softmax. */
void moe_softmax_row(const float *logits, int64_t experts, float *probs);

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

/* Routes T tokens with `router`, in fp32:
 *   1. scores (T, E) from the logits (softmax, the logits themselves, or
 *      sigmoid, by router->scoring);
 *   2. selection keys = scores + score_bias when score_bias is not NULL;
 *   3. with groups > 1, each group's key is the sum of its two best
 *      selection keys (its one key for groups of one expert), the
 *      topk_groups best groups are kept, and the experts of the other
 *      groups cannot be selected;
 *   4. the K best selection keys give expert_ids;
 *   5. the weights are the unbiased scores of those experts (for
 *      topk-softmax, the softmax over the K selected logits), divided by
 *      their sum in slot order when router->renormalize, then multiplied
 *      by router->scaling_factor unless it is 1.
 * Ties go to the lower expert and the lower group index. NaN ranks below
 * every number and an excluded expert below NaN, so the K ids are always
 * distinct and in [0, E). The router must pass moe_router_check(). */
void moe_route(const struct moe_router *router, const float *score_bias,
               const float *logits, int64_t tokens, int64_t experts,
               int64_t top_k, float *scores, int32_t *expert_ids,
               float *weights);

/* ---- compute ---------------------------------------------------------- */

/* Floats of scratch that moe_expert_forward() needs for M rows. */
int64_t moe_expert_scratch_floats(int64_t rows, int64_t ffn);

/* Runs one SwiGLU expert on M rows with OpenBLAS, or with the row kernel
 * for M <= moe_expert_row_kernel_rows():
 *   y (M, H) = (silu(x . w1^T) * (x . w3^T)) . w2^T
 * x is (M, H), w1 and w3 are (F, H), w2 is (H, F), and scratch has room for
 * moe_expert_scratch_floats(M, F) floats. x, y and scratch must not
 * overlap. M may be 0; M, H and F must fit in an int, as cblas_sgemm takes
 * int dimensions (the program's option limits ensure it). */
void moe_expert_forward(const float *x, int64_t rows, int64_t hidden,
                        int64_t ffn, const float *w1, const float *w3,
                        const float *w2, float *scratch, float *y);

/* Returns the largest M that moe_expert_forward() and moe_expert_run()
 * compute with the AVX2 row kernel of src/expert.c instead of sgemm, or 0
 * when this CPU or build has no row kernel. */
int64_t moe_expert_row_kernel_rows(void);

/* The same expert with plain loops and no BLAS, to test the fast path. It
 * sums in a different order, so the two agree within a tolerance only. */
void moe_expert_forward_loop(const float *x, int64_t rows, int64_t hidden,
                             int64_t ffn, const float *w1, const float *w3,
                             const float *w2, float *y);

/* silu(v) = v / (1 + exp(-v)), the SwiGLU activation. */
float moe_silu(float v);

/* Applies `act` to one value. */
float moe_activate(enum moe_activation act, float v);

/* Runs expert e of the layer on M rows: moe_expert_forward() for SwiGLU
 * experts, or the dense block with its activation. Same contract: the bits
 * depend on the rows and on M, and scratch has room for
 * moe_expert_scratch_floats(M, F) floats. */
void moe_expert_run(const struct moe_weights *weights, int64_t expert,
                    const float *x, int64_t rows, float *scratch, float *y);

/* ---- capacity ---------------------------------------------------------- */

/* The capacity of --capacity-factor CF and --min-capacity N:
 * max(ceil(CF * T * K / E), N) assignments, or -1 (dropless) when CF is 0.
 * Returns -1 as well when the result would not fit in int64. */
int64_t moe_capacity_from_factor(double factor, int64_t min_capacity,
                                 int64_t tokens, int64_t top_k, int64_t experts);

/* Decides which of one expert's n assignments survive. `weights` are
 * their routing weights in global token order (only read by the probs
 * policy); keep[i] is set to 1 or 0. Returns the number kept, or -1 when
 * out of memory (the probs policy sorts a copy of the indices). Both the
 * golden path and the ranks call this, so they drop the same rows. */
int64_t moe_capacity_keep(const struct moe_capacity *capacity, int64_t n,
                          const float *weights, uint8_t *keep);

/* ---- shared expert ---------------------------------------------------- */

/* Rows per GEMM call of the shared expert. Every call has exactly this many
 * rows, and token t always sits in row t mod MOE_SHARED_TILE of the call
 * for tile t / MOE_SHARED_TILE. OpenBLAS gives a row the same bits when M,
 * N, K, the row's position and the thread count are the same, whatever the
 * other rows contain (tests/test_families.c checks this). So a rank that
 * computes its own tokens gets the bits of the golden path, which computes
 * all of them. */
#define MOE_SHARED_TILE 64

/* Floats of scratch that moe_shared_expert_forward() needs. */
int64_t moe_shared_scratch_floats(int64_t hidden, int64_t shared_ffn);

/* Runs the shared expert on tokens [first, first + count) of the batch:
 *   y (count, H) = gate(x) * (silu(x . shared_w1^T) * (x . shared_w3^T)) . shared_w2^T
 * where gate(x) = sigmoid(x . shared_gate) when the layer has a shared gate
 * and 1 otherwise. x points at token `first` and holds count rows of H.
 * The tile rule above makes the bits of a token independent of first and
 * count. Does nothing when the layer has no shared expert. */
void moe_shared_expert_forward(const struct moe_weights *weights, const float *x,
                               int64_t first, int64_t count, float *scratch,
                               float *y);

/* Adds the shared expert's rows to the combined output: out[i] += shared[i]
 * over count * H floats. */
void moe_add_shared(float *out, const float *shared, int64_t count, int64_t hidden);

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
    int64_t *tokens_per_expert; /* (E): assignments routed, before drops */
    int64_t *dropped_per_expert; /* (E): of which dropped by the capacity */
    int32_t *expert_ids;        /* (T, K) */
    float *weights;             /* (T, K) */
    uint8_t *kept;              /* (T, K): 1 when the assignment survived */
    int64_t *router_stats;      /* moe_router_stats_len(E) sums; see moe_aux.h */
    /* Filled only when want_stages is set before the call: */
    int want_stages;
    float *logits;     /* (T, E) */
    float *scores;     /* (T, E) */
    float *expert_out; /* (T, K, H): expert ids[t][k]'s output for token t,
                          before weighting */
    float *shared_out; /* (T, H), or NULL without a shared expert */
};

/* Computes the layer in one process with no shared memory: route all T
 * tokens, give each expert its rows in token order, run the experts and the
 * shared expert, and combine. x is (T, H), out is (T, H). info may be NULL;
 * otherwise the caller zeroes it, sets want_stages if it wants the stage
 * arrays, and releases it with moe_golden_info_free().
 * Returns 0 or -ENOMEM. */
int moe_golden_forward(const struct moe_weights *weights, const float *x,
                       float *out, struct moe_golden_info *info);
void moe_golden_info_free(struct moe_golden_info *info);

/* An independent plain-loop reference of the whole layer in double
 * precision, used to test the golden path. out is (T, H) doubles, ids
 * (T, K). topk_gap (T) receives, per token, the probability gap between the
 * K-th and the (K+1)-th expert, which measures how close the selection came
 * to a tie (1.0 when K == E). It covers SwiGLU and dense experts, the
 * gate bias and every router, but not a capacity, which ranks assignments
 * across tokens. Returns 0, -EINVAL for an invalid shape or a layer with
 * a capacity, or -ENOMEM. */
int moe_reference_forward(const struct moe_weights *weights, const float *x,
                          double *out, int32_t *ids, double *topk_gap);

#endif
