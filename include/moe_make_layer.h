/*
 * moe_make_layer.h - `moe-ep make-layer`: writes one MoE layer with seeded
 * random weights as a Hugging Face checkpoint (config.json and
 * safetensors) in a model family's real format.
 */
#ifndef MOE_MAKE_LAYER_H
#define MOE_MAKE_LAYER_H

#include "moe_model.h"

#include <stdint.h>
#include <stdio.h>

/* A published model's MoE shape, before --scale. */
struct moe_preset {
    const char *name;        /* --preset value */
    const char *model;       /* Hugging Face model id it comes from */
    enum moe_family_id family;
    int64_t layers, hidden, ffn, shared_ffn, experts, top_k;
    int64_t groups, topk_groups; /* deepseek_v3 only */
    /* The layer written: deepseek-v3's first MoE layer, switch-base-8's
     * first sparse encoder block, else 0. */
    int64_t layer;
    float scaling_factor;
    int renormalize;         /* norm_topk_prob */
    int64_t expert_capacity; /* switch_transformers only */
    enum moe_activation activation; /* dense_act_fn, switch_transformers only */
};

/* Returns the preset named `name`, or NULL. */
const struct moe_preset *moe_preset_find(const char *name);

enum moe_layer_dtype { MOE_LAYER_F32, MOE_LAYER_BF16, MOE_LAYER_F16, MOE_LAYER_FP8 };

struct moe_make_layer_options {
    const struct moe_family *family;
    int64_t layer;     /* index of the MoE layer written */
    int64_t hidden, ffn, shared_ffn, experts, top_k;
    int64_t groups, topk_groups;
    float scaling_factor;
    int renormalize;
    int64_t expert_capacity;        /* switch_transformers only */
    enum moe_activation activation; /* switch_transformers only */
    enum moe_layer_dtype dtype;
    int shards;        /* safetensors files; 1 writes model.safetensors */
    int64_t tokens;    /* rows of tokens.npy, or 0 for none */
    uint64_t seed;
    const char *out_dir;
};

/* Parses the make-layer options in argv[0..argc). Returns 0, 1 for --help,
 * or -EINVAL with a message naming the flag, the value and the reason. */
int moe_make_layer_parse(struct moe_make_layer_options *options, int argc,
                         char **argv);

/* Writes the layer: OUT/config.json, OUT/model.safetensors (or shards and
 * their index) and, when tokens > 0, OUT/tokens.npy. Creates OUT if it does
 * not exist. Returns 0, -EINVAL, -ENOMEM or -errno with a message. */
int moe_make_layer(const struct moe_make_layer_options *options);

void moe_make_layer_usage(FILE *out);

#endif
