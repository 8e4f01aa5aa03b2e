/*
 * moe_model.h - one MoE layer of a Hugging Face checkpoint: the model
 * families, their config.json fields and tensor names, and the loader.
 *
 * A checkpoint directory contains config.json and the weights as safetensors
 * (model.safetensors, or shards listed in model.safetensors.index.json).
 * The family is chosen by config.json's "model_type". Every weight is
 * converted exactly to float32 (F8_E4M3 weights are dequantised with their
 * block scales), and the layer then runs like a random one.
 *
 * The decoder families name a layer "model.layers.L"; Switch Transformers
 * is an encoder-decoder model, and moe-ep reads the MoE layer of encoder
 * block B, "encoder.block.B". Both are called the layer here.
 */
#ifndef MOE_MODEL_H
#define MOE_MODEL_H

#include "moe_layer.h"

#include <limits.h>
#include <stddef.h>
#include <stdint.h>

enum moe_family_id {
    MOE_FAMILY_MIXTRAL,
    MOE_FAMILY_QWEN2_MOE,
    MOE_FAMILY_QWEN3_MOE,
    MOE_FAMILY_OLMOE,
    MOE_FAMILY_DEEPSEEK_V3,
    MOE_FAMILY_SWITCH_TRANSFORMERS,
    MOE_FAMILY_COUNT
};

/* Kind of shared expert a family has. */
enum moe_shared_kind {
    MOE_SHARED_NONE,
    MOE_SHARED_GATED, /* Qwen2-MoE: one expert, output scaled by a sigmoid gate */
    MOE_SHARED_PLAIN, /* DeepSeek-V3: n_shared_experts fused into one, no gate */
};

/* The config.json fields and tensor names of one family. A router tensor
 * is named "<layer_prefix>.L.<block>.<router>.weight", and an expert
 * tensor "<layer_prefix>.L.<block>.experts.<expert_prefix>e.<proj>.weight". */
struct moe_family {
    enum moe_family_id id;
    const char *model_type;    /* config.json "model_type" */
    const char *block;         /* tensor name part after "<layer_prefix>.L." */
    const char *proj[3];       /* expert projections: gate, up, down; up is
                                  NULL for dense (wi, wo) experts */
    const char *experts_field; /* config field giving E */
    const char *ffn_field;     /* config field giving the expert width F */
    enum moe_shared_kind shared;
    const char *layer_prefix;  /* "model.layers" or "encoder.block" */
    const char *router;        /* "gate" or "router.classifier" */
    const char *expert_prefix; /* "" or "expert_" before the expert index */
    const char *hidden_field;  /* config field giving H */
    const char *layers_field;  /* config field giving the layer count */
};

/* Returns the family whose model_type is `model_type`, or NULL. */
const struct moe_family *moe_family_find(const char *model_type);
const struct moe_family *moe_family_get(enum moe_family_id id);

/* Comma-separated model_type list, for messages and help text. */
#define MOE_FAMILY_NAMES \
    "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, switch_transformers"

/* The dense_act_fn values of switch_transformers that moe-ep implements,
 * for messages and help text. */
#define MOE_DENSE_ACT_NAMES "relu, gelu, gelu_new and silu"

/* Sets *activation from a transformers ACT2FN name: "relu", "gelu" (the
 * erf form), "gelu_new" (the tanh approximation) or "silu". Returns 0, or
 * -EINVAL for any other name, without a message. */
int moe_activation_from_name(const char *name, enum moe_activation *activation);

/* Returns the ACT2FN name of `activation`. */
const char *moe_activation_name(enum moe_activation activation);

/* The layer tensors a family can have. */
enum moe_tensor_kind {
    MOE_TENSOR_ROUTER,          /* (E, H) */
    MOE_TENSOR_SCORE_BIAS,      /* (E), DeepSeek-V3 only */
    MOE_TENSOR_EXPERT_GATE,     /* (F, H) of expert e */
    MOE_TENSOR_EXPERT_UP,       /* (F, H) of expert e */
    MOE_TENSOR_EXPERT_DOWN,     /* (H, F) of expert e */
    MOE_TENSOR_SHARED_GATE,     /* (Fs, H) */
    MOE_TENSOR_SHARED_UP,       /* (Fs, H) */
    MOE_TENSOR_SHARED_DOWN,     /* (H, Fs) */
    MOE_TENSOR_SHARED_EXPERT_GATE, /* (1, H), Qwen2-MoE only */
};

/* Writes the checkpoint name of a tensor of layer `layer` into buf, e.g.
 * "model.layers.3.mlp.experts.7.gate_proj.weight" or
 * "encoder.block.1.layer.1.mlp.experts.expert_7.wi.weight". `expert` is
 * used only by the expert kinds. Returns 0, or -EINVAL if it does not fit
 * or the family has no such tensor (switch_transformers has no
 * MOE_TENSOR_EXPERT_UP). */
int moe_tensor_name(const struct moe_family *family, int64_t layer,
                    enum moe_tensor_kind kind, int64_t expert, char *buf,
                    size_t size);

/* The parts of config.json the layer needs. */
struct moe_model_config {
    const struct moe_family *family;
    char path[PATH_MAX];      /* config.json, for messages */
    int64_t layers;           /* num_hidden_layers, or num_layers (encoder
                                 blocks) for switch_transformers */
    int64_t hidden, ffn, experts, top_k, shared_ffn;
    struct moe_router router;
    enum moe_expert_kind expert_kind; /* dense for switch_transformers */
    enum moe_activation activation;   /* dense_act_fn, else silu */
    int64_t expert_capacity;  /* switch_transformers' expert_capacity, kept
                                 by position; -1 (dropless) otherwise */
    /* router_aux_loss_coef and router_z_loss_coef, or NaN when absent */
    double aux_loss_coef, z_loss_coef;
    /* The rules that mark a layer dense or MoE: */
    int64_t first_k_dense_replace; /* deepseek_v3, else 0 */
    int64_t moe_layer_freq;        /* always 1: the only value accepted */
    int64_t decoder_sparse_step;   /* qwen2_moe and qwen3_moe, else 1 */
    int64_t *mlp_only_layers;      /* qwen2_moe and qwen3_moe, or NULL */
    int64_t mlp_only_count;
    /* switch_transformers: encoder block B is sparse when the step is 1,
     * or when it is above 1 and B mod step = 1. A step of 0 makes no block
     * sparse. sparse_step_field names the field the step came from. */
    int64_t encoder_sparse_step;
    const char *sparse_step_field;
    int64_t fp8_block_rows, fp8_block_cols; /* quantization_config
                                               weight_block_size [128, 128] */
};

/* Reads DIR/config.json with cJSON. Returns 0, or -EINVAL with a message
 * naming the file, the field, the value and the reason (malformed JSON, an
 * unknown model_type, a missing or mistyped field, an invalid size), or
 * -ENOMEM or -errno. Release with moe_model_config_free(). */
int moe_model_read_config(const char *dir, struct moe_model_config *config);
void moe_model_config_free(struct moe_model_config *config);

/* Returns 1 when layer `layer` is a MoE layer of the model, 0 when it is a
 * dense one or out of range. */
int moe_model_is_moe_layer(const struct moe_model_config *config, int64_t layer);

/* Returns the first MoE layer, or -1 when the model has none. */
int64_t moe_model_first_moe_layer(const struct moe_model_config *config);

/* Fills `shape` from the config, with T = tokens. */
void moe_model_shape(const struct moe_model_config *config, int64_t tokens,
                     struct moe_shape *shape);

/* Reads layer `layer` of the checkpoint in `dir` into `weights`, which gets
 * the config's shape with T = tokens, its router, expert kind, activation,
 * capacity and loss coefficients. Dense experts get w3 = NULL. Only the
 * tensors of that layer are read. Returns 0, or -EINVAL with a message naming the file
 * and the tensor or field for a dense or out-of-range layer (the message
 * names the first MoE layer), a missing tensor, a shape that does not
 * match the config, an unsupported dtype or an invalid file; -ENOMEM or
 * -errno otherwise. On failure nothing stays allocated. */
int moe_model_load_layer(const char *dir, const struct moe_model_config *config,
                         int64_t layer, int64_t tokens, struct moe_weights *weights);

/* Like moe_model_load_layer(), but reads only experts [first, first +
 * count) of the layer (the router and the shared expert always), so that
 * an MPI rank holds only the experts it owns. */
int moe_model_load_layer_experts(const char *dir, const struct moe_model_config *config,
                                 int64_t layer, int64_t tokens, int64_t first,
                                 int64_t count, struct moe_weights *weights);

#endif
