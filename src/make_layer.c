/*
 * make_layer.c - `moe-ep make-layer`: one MoE layer with seeded random
 * weights, written as a Hugging Face checkpoint that `moe-ep run --model`
 * and tools/torch_reference.py read back.
 *
 * The weights come from moe_weights_fill_random(), so a layer is a pure
 * function of its options and seed. They are stored in the chosen dtype:
 * F32, BF16 or F16 (rounded to nearest even), or for deepseek_v3 F8_E4M3
 * with one float32 scale_inv per 128 x 128 block, as DeepSeek-V3 ships.
 * The router stays BF16 and the score bias F32 in an FP8 layer, as there.
 */
#include "moe_make_layer.h"
#include "moe_args.h"
#include "moe_dtype.h"
#include "moe_error.h"
#include "moe_file.h"
#include "moe_npy.h"
#include "moe_safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

/* Published shapes, from each model's config.json on the Hugging Face Hub;
 * docs/FAMILIES.md names the copy each one was read from. */
static const struct moe_preset presets[] = {
    {"mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", MOE_FAMILY_MIXTRAL,
     32, 4096, 14336, 0, 8, 2, 1, 1, 0, 1.0f, 1, -1, MOE_ACT_SILU},
    {"qwen1.5-moe-a2.7b", "Qwen/Qwen1.5-MoE-A2.7B", MOE_FAMILY_QWEN2_MOE,
     24, 2048, 1408, 5632, 60, 4, 1, 1, 0, 1.0f, 0, -1, MOE_ACT_SILU},
    {"qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", MOE_FAMILY_QWEN3_MOE,
     48, 2048, 768, 0, 128, 8, 1, 1, 0, 1.0f, 1, -1, MOE_ACT_SILU},
    {"olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924", MOE_FAMILY_OLMOE,
     16, 2048, 1024, 0, 64, 8, 1, 1, 0, 1.0f, 0, -1, MOE_ACT_SILU},
    {"deepseek-v3", "deepseek-ai/DeepSeek-V3", MOE_FAMILY_DEEPSEEK_V3,
     61, 7168, 2048, 2048, 256, 8, 8, 4, 3, 2.5f, 1, -1, MOE_ACT_SILU},
    /* 12 encoder blocks, of which 1, 3, ..., 11 are sparse (encoder_sparse_step 2) */
    {"switch-base-8", "google/switch-base-8", MOE_FAMILY_SWITCH_TRANSFORMERS,
     12, 768, 3072, 0, 8, 1, 1, 1, 1, 1.0f, 0, 64, MOE_ACT_RELU},
};

#define PRESET_NAMES \
    "mixtral-8x7b, qwen1.5-moe-a2.7b, qwen3-30b-a3b, olmoe-1b-7b, deepseek-v3, switch-base-8"

const struct moe_preset *moe_preset_find(const char *name)
{
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++)
        if (!strcmp(presets[i].name, name))
            return &presets[i];
    return NULL;
}

void moe_make_layer_usage(FILE *out)
{
    fprintf(out,
        "usage: moe-ep make-layer (--family F | --preset NAME) --out DIR [options]\n"
        "\n"
        "Writes one MoE layer with seeded random weights as a Hugging Face\n"
        "checkpoint: DIR/config.json and DIR/model.safetensors, in the real\n"
        "format of the model family, for `moe-ep run --model DIR`.\n"
        "\n"
        "options (defaults in brackets):\n"
        "  --family F          model_type: " MOE_FAMILY_NAMES "\n"
        "  --preset NAME       the published shape of a model: " PRESET_NAMES "\n"
        "  --scale N           divide the preset's hidden and FFN sizes by N [1]\n"
        "  --out DIR           directory to write, created if missing\n"
        "  --hidden H          hidden size [64]\n"
        "  --ffn F             expert FFN size [32]\n"
        "  --experts E         routed experts [8; 16 for deepseek_v3]\n"
        "  --top-k K           experts per token [2; 4 for deepseek_v3; always 1\n"
        "                      for switch_transformers]\n"
        "  --shared-ffn N      qwen2_moe: shared expert width [2 x F]\n"
        "  --shared-experts N  deepseek_v3: shared experts of width F [1]\n"
        "  --groups G          deepseek_v3: n_group [4]\n"
        "  --topk-groups G     deepseek_v3: topk_group [2]\n"
        "  --scaling-factor X  deepseek_v3: routed_scaling_factor [2.5]\n"
        "  --renormalize on|off  norm_topk_prob, for every family but mixtral,\n"
        "                      which always renormalises, and switch_transformers,\n"
        "                      which never does [on for qwen3_moe and\n"
        "                      deepseek_v3, off otherwise]\n"
        "  --expert-capacity N switch_transformers: tokens each expert keeps, in\n"
        "                      token order; the rest are dropped [64]\n"
        "  --dense-act-fn A    switch_transformers: expert activation, one of\n"
        "                      " MOE_DENSE_ACT_NAMES " [relu]\n"
        "  --layer L           index of the MoE layer (for switch_transformers,\n"
        "                      of the encoder block); the layers before it are\n"
        "                      marked dense where the family allows [0; 3 for\n"
        "                      the deepseek-v3 preset, 1 for switch-base-8]\n"
        "  --dtype D           f32, bf16, f16, or fp8 (deepseek_v3 only) [f32]\n"
        "  --shards N          split the weights over N files with an index [1]\n"
        "  --tokens T          also write DIR/tokens.npy, T random float32 tokens\n"
        "  --seed S            seed of the weights and tokens [1]\n"
        "  -h, --help          show this text\n");
}

static void set_family_defaults(struct moe_make_layer_options *o)
{
    int deepseek = o->family->id == MOE_FAMILY_DEEPSEEK_V3;
    int switch_family = o->family->id == MOE_FAMILY_SWITCH_TRANSFORMERS;
    o->hidden = 64;
    o->ffn = 32;
    o->experts = deepseek ? 16 : 8;
    o->top_k = 2;
    if (deepseek)
        o->top_k = 4;
    if (switch_family)
        o->top_k = 1;
    /* transformers' SwitchTransformersConfig defaults */
    o->expert_capacity = switch_family ? 64 : -1;
    o->activation = switch_family ? MOE_ACT_RELU : MOE_ACT_SILU;
    o->shared_ffn = o->family->id == MOE_FAMILY_QWEN2_MOE ? 2 * o->ffn
                    : deepseek                          ? o->ffn
                                                        : 0;
    o->groups = deepseek ? 4 : 1;
    o->topk_groups = deepseek ? 2 : 1;
    o->scaling_factor = deepseek ? 2.5f : 1.0f;
    o->renormalize = o->family->id == MOE_FAMILY_MIXTRAL ||
                     o->family->id == MOE_FAMILY_QWEN3_MOE || deepseek;
}

static void set_preset(struct moe_make_layer_options *o, const struct moe_preset *p)
{
    o->family = moe_family_get(p->family);
    o->layer = p->layer;
    o->hidden = p->hidden;
    o->ffn = p->ffn;
    o->shared_ffn = p->shared_ffn;
    o->experts = p->experts;
    o->top_k = p->top_k;
    o->groups = p->groups;
    o->topk_groups = p->topk_groups;
    o->scaling_factor = p->scaling_factor;
    o->renormalize = p->renormalize;
    o->expert_capacity = p->expert_capacity;
    o->activation = p->activation;
}

/* Flags that change the shape; they are applied after the family's or the
 * preset's defaults, whatever their order on the command line. */
struct shape_flags {
    int64_t hidden, ffn, shared_ffn, shared_experts, experts, top_k, groups,
        topk_groups, scale, layer, expert_capacity;
    double scaling_factor;
    int renormalize; /* -1 when not given */
    int activation;  /* an enum moe_activation, or -1 when not given */
};

static int parse_dtype(const char *text, enum moe_layer_dtype *dtype)
{
    static const char *const names[] = {"f32", "bf16", "f16", "fp8"};
    for (int i = 0; i < 4; i++)
        if (!strcmp(text, names[i])) {
            *dtype = (enum moe_layer_dtype)i;
            return 0;
        }
    return moe_fail(-EINVAL, "invalid --dtype value '%s': expected f32, bf16, f16 "
                    "or fp8", text);
}

/* Rejects a flag that the chosen family has no config field for. */
static int check_family_flag(const struct moe_make_layer_options *o, const char *flag,
                             int given, int allowed)
{
    if (given && !allowed)
        return moe_fail(-EINVAL, "%s does not apply to family %s", flag,
                        o->family->model_type);
    return 0;
}

static int apply_shape_flags(struct moe_make_layer_options *o, const struct shape_flags *g,
                             const struct moe_preset *preset)
{
    int deepseek = o->family->id == MOE_FAMILY_DEEPSEEK_V3;
    int switch_family = o->family->id == MOE_FAMILY_SWITCH_TRANSFORMERS;
    int rc;
    if ((rc = check_family_flag(o, "--shared-ffn", g->shared_ffn >= 0,
                                o->family->id == MOE_FAMILY_QWEN2_MOE)) ||
        (rc = check_family_flag(o, "--shared-experts", g->shared_experts >= 0, deepseek)) ||
        (rc = check_family_flag(o, "--groups", g->groups > 0, deepseek)) ||
        (rc = check_family_flag(o, "--topk-groups", g->topk_groups > 0, deepseek)) ||
        (rc = check_family_flag(o, "--scaling-factor", g->scaling_factor >= 0, deepseek)) ||
        (rc = check_family_flag(o, "--renormalize", g->renormalize >= 0,
                                o->family->id != MOE_FAMILY_MIXTRAL && !switch_family)) ||
        (rc = check_family_flag(o, "--expert-capacity", g->expert_capacity >= 0,
                                switch_family)) ||
        (rc = check_family_flag(o, "--dense-act-fn", g->activation >= 0, switch_family)) ||
        (rc = check_family_flag(o, "--dtype fp8", o->dtype == MOE_LAYER_FP8, deepseek)) ||
        (rc = check_family_flag(o, "--scale", g->scale > 0 && !preset, 0)))
        return rc;
    if (switch_family && g->top_k > 1)
        return moe_fail(-EINVAL, "invalid --top-k value %" PRId64 ": switch_transformers "
                        "routes each token to exactly one expert", g->top_k);

    int64_t shared_experts = deepseek && o->ffn ? o->shared_ffn / o->ffn : 0;
    if (g->scale > 0) {
        if (o->hidden % g->scale || o->ffn % g->scale || o->shared_ffn % g->scale)
            return moe_fail(-EINVAL, "invalid --scale value %" PRId64 ": it must divide "
                            "the hidden size %" PRId64 ", the FFN size %" PRId64
                            " and the shared expert size %" PRId64 " of preset %s",
                            g->scale, o->hidden, o->ffn, o->shared_ffn, preset->name);
        o->hidden /= g->scale;
        o->ffn /= g->scale;
        o->shared_ffn /= g->scale;
    }
    if (g->hidden > 0)
        o->hidden = g->hidden;
    if (g->ffn > 0)
        o->ffn = g->ffn;
    if (g->experts > 0)
        o->experts = g->experts;
    if (g->top_k > 0)
        o->top_k = g->top_k;
    if (g->groups > 0)
        o->groups = g->groups;
    if (g->topk_groups > 0)
        o->topk_groups = g->topk_groups;
    if (g->scaling_factor >= 0)
        o->scaling_factor = (float)g->scaling_factor;
    if (g->renormalize >= 0)
        o->renormalize = g->renormalize;
    if (g->layer >= 0)
        o->layer = g->layer;
    if (g->expert_capacity >= 0)
        o->expert_capacity = g->expert_capacity;
    if (g->activation >= 0)
        o->activation = (enum moe_activation)g->activation;
    if (g->shared_ffn >= 0)
        o->shared_ffn = g->shared_ffn;
    else if (o->family->id == MOE_FAMILY_QWEN2_MOE && !preset && g->ffn > 0)
        o->shared_ffn = 2 * o->ffn;
    if (deepseek)
        o->shared_ffn = (g->shared_experts >= 0 ? g->shared_experts
                         : preset              ? shared_experts
                                               : 1) * o->ffn;

    if (o->family->id == MOE_FAMILY_QWEN2_MOE && o->shared_ffn < 1)
        return moe_fail(-EINVAL, "invalid --shared-ffn value %" PRId64 ": qwen2_moe "
                        "layers have a shared expert of width 1 or more", o->shared_ffn);
    struct moe_router router = {
        .scoring = deepseek ? MOE_SCORING_SIGMOID : MOE_SCORING_SOFTMAX_TOPK,
        .renormalize = o->renormalize,
        .scaling_factor = o->scaling_factor,
        .groups = o->groups,
        .topk_groups = o->topk_groups,
    };
    struct moe_shape shape = {1, o->hidden, o->ffn, o->experts, o->top_k, o->shared_ffn};
    if ((rc = moe_router_check(&router, &shape)))
        return moe_fail(rc, "invalid layer options: %s", moe_error_message());
    return 0;
}

int moe_make_layer_parse(struct moe_make_layer_options *o, int argc, char **argv)
{
    static const char *const known[] = {
        "--family", "--preset", "--scale", "--out", "--hidden", "--ffn", "--experts",
        "--top-k", "--shared-ffn", "--shared-experts", "--groups", "--topk-groups",
        "--scaling-factor", "--renormalize", "--layer", "--dtype", "--shards",
        "--tokens", "--seed", "--expert-capacity", "--dense-act-fn", NULL,
    };
    struct shape_flags g = {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1.0, -1, -1};
    const struct moe_preset *preset = NULL;
    int rc;

    memset(o, 0, sizeof *o);
    o->shards = 1;
    o->seed = 1;
    o->dtype = MOE_LAYER_F32;
    for (int i = 0; i < argc; i++) {
        const char *flag = argv[i], *text;
        if (!strcmp(flag, "-h") || !strcmp(flag, "--help"))
            return 1;
        if ((rc = moe_next_option("make-layer", known, argc, argv, &i, &text)))
            return rc;
        int64_t *target = !strcmp(flag, "--hidden")           ? &g.hidden
                          : !strcmp(flag, "--ffn")            ? &g.ffn
                          : !strcmp(flag, "--shared-ffn")     ? &g.shared_ffn
                          : !strcmp(flag, "--shared-experts") ? &g.shared_experts
                          : !strcmp(flag, "--experts")        ? &g.experts
                          : !strcmp(flag, "--top-k")          ? &g.top_k
                          : !strcmp(flag, "--groups")         ? &g.groups
                          : !strcmp(flag, "--topk-groups")    ? &g.topk_groups
                          : !strcmp(flag, "--scale")          ? &g.scale
                          : !strcmp(flag, "--layer")          ? &g.layer
                          : !strcmp(flag, "--expert-capacity") ? &g.expert_capacity
                          : !strcmp(flag, "--tokens")         ? &o->tokens
                                                              : NULL;
        int64_t min = !strcmp(flag, "--shared-ffn") || !strcmp(flag, "--shared-experts") ||
                              !strcmp(flag, "--layer") || !strcmp(flag, "--expert-capacity")
                          ? 0
                          : 1;
        int64_t max = !strcmp(flag, "--experts") || !strcmp(flag, "--top-k") ||
                              !strcmp(flag, "--groups") || !strcmp(flag, "--topk-groups")
                          ? MOE_MAX_EXPERTS
                          : INT64_C(1) << 20;
        if (target) {
            if ((rc = moe_parse_int64(flag, text, min, max, target)))
                return rc;
        } else if (!strcmp(flag, "--family")) {
            if (!(o->family = moe_family_find(text)))
                return moe_fail(-EINVAL, "invalid --family value '%s': expected one "
                                "of " MOE_FAMILY_NAMES, text);
        } else if (!strcmp(flag, "--preset")) {
            if (!(preset = moe_preset_find(text)))
                return moe_fail(-EINVAL, "invalid --preset value '%s': expected one "
                                "of " PRESET_NAMES, text);
        } else if (!strcmp(flag, "--out")) {
            if (!text[0])
                return moe_fail(-EINVAL, "invalid --out value '': expected a "
                                "directory name");
            o->out_dir = text;
        } else if (!strcmp(flag, "--scaling-factor")) {
            if ((rc = moe_parse_double(flag, text, 0.0, 1e6, &g.scaling_factor)))
                return rc;
            /* 0 would zero the output of every routed expert. */
            if (g.scaling_factor == 0.0)
                return moe_fail(-EINVAL, "invalid --scaling-factor value '%s': "
                                "expected a number above 0, up to 1e+06", text);
        } else if (!strcmp(flag, "--renormalize")) {
            if ((rc = moe_parse_on_off(flag, text, &g.renormalize)))
                return rc;
        } else if (!strcmp(flag, "--dtype")) {
            if ((rc = parse_dtype(text, &o->dtype)))
                return rc;
        } else if (!strcmp(flag, "--dense-act-fn")) {
            enum moe_activation activation;
            if (moe_activation_from_name(text, &activation))
                return moe_fail(-EINVAL, "invalid --dense-act-fn value '%s': expected "
                                "relu, gelu, gelu_new or silu", text);
            g.activation = (int)activation;
        } else if (!strcmp(flag, "--shards")) {
            int64_t v;
            if ((rc = moe_parse_int64(flag, text, 1, 999, &v)))
                return rc;
            o->shards = (int)v;
        } else if (!strcmp(flag, "--seed")) {
            if ((rc = moe_parse_uint64(flag, text, &o->seed)))
                return rc;
        }
    }

    if (preset && o->family && o->family->id != preset->family)
        return moe_fail(-EINVAL, "--family %s contradicts --preset %s, which is %s",
                        o->family->model_type, preset->name,
                        moe_family_get(preset->family)->model_type);
    if (!preset && !o->family)
        return moe_fail(-EINVAL, "missing --family or --preset; families: "
                        MOE_FAMILY_NAMES "; presets: " PRESET_NAMES);
    if (!o->out_dir || !o->out_dir[0])
        return moe_fail(-EINVAL, "missing --out DIR, the directory to write");
    if (preset)
        set_preset(o, preset);
    else
        set_family_defaults(o);
    return apply_shape_flags(o, &g, preset);
}

/* ---- config.json ------------------------------------------------------ */

static const char *architecture(enum moe_family_id id)
{
    static const char *const names[MOE_FAMILY_COUNT] = {
        [MOE_FAMILY_MIXTRAL] = "MixtralForCausalLM",
        [MOE_FAMILY_QWEN2_MOE] = "Qwen2MoeForCausalLM",
        [MOE_FAMILY_QWEN3_MOE] = "Qwen3MoeForCausalLM",
        [MOE_FAMILY_OLMOE] = "OlmoeForCausalLM",
        [MOE_FAMILY_DEEPSEEK_V3] = "DeepseekV3ForCausalLM",
        [MOE_FAMILY_SWITCH_TRANSFORMERS] = "SwitchTransformersForConditionalGeneration",
    };
    return names[id];
}

/* Returns the encoder_sparse_step that makes encoder block `layer` sparse:
 * 1 for block 0, 2 for block 1 and L - 1 for a later block L. Every step
 * above 1 makes block 1 sparse too, so only blocks 0 and 1 follow dense
 * blocks alone. */
static int64_t switch_sparse_step(int64_t layer)
{
    if (layer == 1)
        return 2;
    return layer > 2 ? layer - 1 : 1;
}

/* Adds the Switch Transformers fields, with the router loss coefficients
 * of the published switch-base configs. */
static void add_switch_fields(cJSON *c, const struct moe_make_layer_options *o)
{
    int64_t step = switch_sparse_step(o->layer), sparse = 0;
    for (int64_t b = 0; b <= o->layer; b++)
        sparse += step == 1 || b % step == 1;
    cJSON_AddNumberToObject(c, "expert_capacity", (double)o->expert_capacity);
    cJSON_AddNumberToObject(c, "encoder_sparse_step", (double)step);
    cJSON_AddNumberToObject(c, "num_sparse_encoder_layers", (double)sparse);
    cJSON_AddStringToObject(c, "dense_act_fn", moe_activation_name(o->activation));
    cJSON_AddBoolToObject(c, "router_bias", 0);
    cJSON_AddStringToObject(c, "router_dtype", "float32");
    cJSON_AddNumberToObject(c, "router_aux_loss_coef", 0.001);
    cJSON_AddNumberToObject(c, "router_z_loss_coef", 0.001);
}

static cJSON *build_config(const struct moe_make_layer_options *o)
{
    static const char *const torch_dtypes[] = {"float32", "bfloat16", "float16", "bfloat16"};
    const struct moe_family *f = o->family;
    cJSON *c = cJSON_CreateObject();
    cJSON *arch = cJSON_AddArrayToObject(c, "architectures");
    cJSON_AddItemToArray(arch, cJSON_CreateString(architecture(f->id)));
    cJSON_AddStringToObject(c, "model_type", f->model_type);
    cJSON_AddStringToObject(c, "torch_dtype", torch_dtypes[o->dtype]);
    cJSON_AddNumberToObject(c, f->layers_field, (double)(o->layer + 1));
    cJSON_AddNumberToObject(c, f->hidden_field, (double)o->hidden);
    cJSON_AddNumberToObject(c, f->ffn_field, (double)o->ffn);
    cJSON_AddNumberToObject(c, f->experts_field, (double)o->experts);
    if (f->id == MOE_FAMILY_SWITCH_TRANSFORMERS)
        add_switch_fields(c, o);
    else
        cJSON_AddNumberToObject(c, "num_experts_per_tok", (double)o->top_k);

    if (f->id == MOE_FAMILY_QWEN2_MOE)
        cJSON_AddNumberToObject(c, "shared_expert_intermediate_size", (double)o->shared_ffn);
    if (f->id == MOE_FAMILY_QWEN2_MOE || f->id == MOE_FAMILY_QWEN3_MOE) {
        /* Layers before the MoE layer are dense. */
        cJSON_AddNumberToObject(c, "decoder_sparse_step", 1);
        cJSON *dense = cJSON_AddArrayToObject(c, "mlp_only_layers");
        for (int64_t l = 0; l < o->layer; l++)
            cJSON_AddItemToArray(dense, cJSON_CreateNumber((double)l));
    }
    if (f->id != MOE_FAMILY_MIXTRAL && f->id != MOE_FAMILY_SWITCH_TRANSFORMERS)
        cJSON_AddBoolToObject(c, "norm_topk_prob", o->renormalize);
    if (f->id == MOE_FAMILY_DEEPSEEK_V3) {
        cJSON_AddNumberToObject(c, "n_shared_experts", (double)(o->shared_ffn / o->ffn));
        cJSON_AddNumberToObject(c, "n_group", (double)o->groups);
        cJSON_AddNumberToObject(c, "topk_group", (double)o->topk_groups);
        cJSON_AddNumberToObject(c, "routed_scaling_factor", (double)o->scaling_factor);
        cJSON_AddNumberToObject(c, "first_k_dense_replace", (double)o->layer);
        cJSON_AddNumberToObject(c, "moe_layer_freq", 1);
        cJSON_AddStringToObject(c, "scoring_func", "sigmoid");
        cJSON_AddStringToObject(c, "topk_method", "noaux_tc");
        if (o->dtype == MOE_LAYER_FP8) {
            cJSON *q = cJSON_AddObjectToObject(c, "quantization_config");
            cJSON_AddStringToObject(q, "quant_method", "fp8");
            cJSON_AddStringToObject(q, "fmt", "e4m3");
            cJSON_AddStringToObject(q, "activation_scheme", "dynamic");
            cJSON *block = cJSON_AddArrayToObject(q, "weight_block_size");
            cJSON_AddItemToArray(block, cJSON_CreateNumber(128));
            cJSON_AddItemToArray(block, cJSON_CreateNumber(128));
        }
    }
    return c;
}

static int write_config(const struct moe_make_layer_options *o, const char *path)
{
    cJSON *config = build_config(o);
    char *text = config ? cJSON_Print(config) : NULL;
    cJSON_Delete(config);
    if (!text)
        return moe_fail(-ENOMEM, "out of memory writing %s", path);
    struct moe_file_part parts[2] = {{text, strlen(text)}, {"\n", 1}};
    int rc = moe_write_file(path, parts, 2);
    free(text);
    return rc;
}

/* ---- tensors ---------------------------------------------------------- */

/* The tensors to write, each owning its name and encoded bytes. */
struct tensor_list {
    struct moe_st_tensor_out *items;
    uint64_t *bytes;
    int count, capacity;
};

static void tensor_list_free(struct tensor_list *l)
{
    for (int i = 0; i < l->count; i++) {
        free((char *)l->items[i].name);
        free((void *)l->items[i].data);
    }
    free(l->items);
    free(l->bytes);
}

static int tensor_list_add(struct tensor_list *l, const char *name, enum moe_dtype dtype,
                           int ndim, int64_t rows, int64_t cols, void *data, uint64_t bytes)
{
    if (l->count == l->capacity) {
        int capacity = l->capacity ? 2 * l->capacity : 64;
        void *items = realloc(l->items, (size_t)capacity * sizeof *l->items);
        if (items)
            l->items = items;
        void *sizes = realloc(l->bytes, (size_t)capacity * sizeof *l->bytes);
        if (sizes)
            l->bytes = sizes;
        if (!items || !sizes) {
            free(data);
            return moe_fail(-ENOMEM, "out of memory for the tensor list");
        }
        l->capacity = capacity;
    }
    char *copy = strdup(name);
    if (!copy) {
        free(data);
        return moe_fail(-ENOMEM, "out of memory for the tensor list");
    }
    struct moe_st_tensor_out *t = &l->items[l->count];
    memset(t, 0, sizeof *t);
    t->name = copy;
    t->dtype = dtype;
    t->ndim = ndim;
    t->shape[0] = ndim == 1 ? cols : rows;
    t->shape[1] = cols;
    t->data = data;
    l->bytes[l->count++] = bytes;
    return 0;
}

/* Encodes count floats as `dtype` into a new buffer. */
static void *encode(const float *src, int64_t count, enum moe_dtype dtype)
{
    size_t size = moe_dtype_size(dtype);
    void *dst = malloc((size_t)count * size + 1);
    if (!dst)
        return NULL;
    for (int64_t i = 0; i < count; i++) {
        if (dtype == MOE_DTYPE_F32) {
            memcpy((float *)dst + i, &src[i], sizeof(float));
        } else {
            uint16_t v = dtype == MOE_DTYPE_BF16 ? moe_f32_to_bf16(src[i])
                                                 : moe_f32_to_f16(src[i]);
            memcpy((uint16_t *)dst + i, &v, sizeof v);
        }
    }
    return dst;
}

/* Adds one (rows, cols) weight, as F8_E4M3 with its block scales when
 * fp8, otherwise in `dtype`. */
static int add_weight(struct tensor_list *l, const char *name, const float *w,
                      int ndim, int64_t rows, int64_t cols, enum moe_dtype dtype, int fp8)
{
    if (!fp8) {
        void *data = encode(w, rows * cols, dtype);
        if (!data)
            return moe_fail(-ENOMEM, "out of memory encoding %s", name);
        return tensor_list_add(l, name, dtype, ndim, rows, cols, data,
                               (uint64_t)(rows * cols) * moe_dtype_size(dtype));
    }
    int64_t block_rows = (rows + 127) / 128, block_cols = (cols + 127) / 128;
    uint8_t *q = malloc((size_t)(rows * cols) + 1);
    float *scale = malloc((size_t)(block_rows * block_cols) * sizeof(float) + 1);
    if (!q || !scale) {
        free(q);
        free(scale);
        return moe_fail(-ENOMEM, "out of memory quantising %s", name);
    }
    moe_fp8_quantize(w, rows, cols, 128, 128, q, scale);
    char scale_name[600];
    snprintf(scale_name, sizeof scale_name, "%s_scale_inv", name);
    int rc = tensor_list_add(l, name, MOE_DTYPE_F8_E4M3, 2, rows, cols, q,
                             (uint64_t)(rows * cols));
    if (rc) {
        free(scale);
        return rc;
    }
    return tensor_list_add(l, scale_name, MOE_DTYPE_F32, 2, block_rows, block_cols, scale,
                           (uint64_t)(block_rows * block_cols) * sizeof(float));
}

static int collect_tensors(const struct moe_make_layer_options *o,
                           const struct moe_weights *w, struct tensor_list *l)
{
    static const enum moe_dtype dtypes[] = {MOE_DTYPE_F32, MOE_DTYPE_BF16, MOE_DTYPE_F16,
                                            MOE_DTYPE_BF16};
    const struct moe_family *f = o->family;
    enum moe_dtype dtype = dtypes[o->dtype];
    int fp8 = o->dtype == MOE_LAYER_FP8;
    int64_t H = o->hidden, F = o->ffn, Fs = o->shared_ffn, L = o->layer;
    char name[512];
    int rc;

#define NAME(kind, expert) moe_tensor_name(f, L, kind, expert, name, sizeof name)
    if ((rc = NAME(MOE_TENSOR_ROUTER, 0)) ||
        (rc = add_weight(l, name, w->gate, 2, o->experts, H, dtype, 0)))
        return rc;
    if (w->score_bias && ((rc = NAME(MOE_TENSOR_SCORE_BIAS, 0)) ||
                          (rc = add_weight(l, name, w->score_bias, 1, 1, o->experts,
                                           MOE_DTYPE_F32, 0))))
        return rc;
    for (int64_t e = 0; e < o->experts; e++) {
        /* Dense (switch_transformers) experts have no up projection. */
        int has_up = f->proj[1] != NULL;
        if ((rc = NAME(MOE_TENSOR_EXPERT_GATE, e)) ||
            (rc = add_weight(l, name, w->w1 + e * F * H, 2, F, H, dtype, fp8)) ||
            (has_up && (rc = NAME(MOE_TENSOR_EXPERT_UP, e))) ||
            (has_up && (rc = add_weight(l, name, w->w3 + e * F * H, 2, F, H, dtype, fp8))) ||
            (rc = NAME(MOE_TENSOR_EXPERT_DOWN, e)) ||
            (rc = add_weight(l, name, w->w2 + e * H * F, 2, H, F, dtype, fp8)))
            return rc;
    }
    if (Fs > 0) {
        if ((rc = NAME(MOE_TENSOR_SHARED_GATE, 0)) ||
            (rc = add_weight(l, name, w->shared_w1, 2, Fs, H, dtype, fp8)) ||
            (rc = NAME(MOE_TENSOR_SHARED_UP, 0)) ||
            (rc = add_weight(l, name, w->shared_w3, 2, Fs, H, dtype, fp8)) ||
            (rc = NAME(MOE_TENSOR_SHARED_DOWN, 0)) ||
            (rc = add_weight(l, name, w->shared_w2, 2, H, Fs, dtype, fp8)))
            return rc;
    }
    if (w->shared_gate && ((rc = NAME(MOE_TENSOR_SHARED_EXPERT_GATE, 0)) ||
                           (rc = add_weight(l, name, w->shared_gate, 2, 1, H, dtype, 0))))
        return rc;
#undef NAME
    return 0;
}

/* The stop signal that arrived while make-layer was writing, or 0. */
static volatile sig_atomic_t stop_signal;

static void record_stop_signal(int sig)
{
    stop_signal = sig;
}

/* Returns -ECANCELED with a message when a stop signal arrived, else 0. */
static int check_stop_signal(void)
{
    if (stop_signal)
        return moe_fail(-ECANCELED, "stopped by signal %d", (int)stop_signal);
    return 0;
}

/* Writes the tensors as one file, or as `shards` files of about equal size
 * plus the index that maps each tensor to its file. Checks
 * for a stop signal before each shard. */
static int write_weights(const struct moe_make_layer_options *o, struct tensor_list *l)
{
    char path[4096];
    if (o->shards == 1) {
        snprintf(path, sizeof path, "%s/model.safetensors", o->out_dir);
        return moe_st_write(path, l->items, l->count, "pt");
    }
    if (o->shards > l->count)
        return moe_fail(-EINVAL, "invalid --shards value %d: this layer has only %d "
                        "tensors, and every shard needs one", o->shards, l->count);

    uint64_t total = 0;
    for (int i = 0; i < l->count; i++)
        total += l->bytes[i];
    const char **files = calloc((size_t)l->count + 1, sizeof *files);
    const char **names = calloc((size_t)l->count + 1, sizeof *names);
    char (*file_names)[64] = calloc((size_t)o->shards, sizeof *file_names);
    int rc = 0;
    if (!files || !names || !file_names) {
        rc = moe_fail(-ENOMEM, "out of memory for the shard index");
        goto out;
    }
    int first = 0;
    uint64_t written = 0;
    for (int s = 0; s < o->shards; s++) {
        snprintf(file_names[s], sizeof file_names[s], "model-%05d-of-%05d.safetensors",
                 s + 1, o->shards);
        /* Shard s ends where the running total passes (s + 1) / shards of
         * the bytes; the last takes the rest. */
        int end = first;
        while (end < l->count &&
               (s == o->shards - 1 ||
                (written + l->bytes[end]) * (uint64_t)o->shards <= total * (uint64_t)(s + 1) ||
                end == first))
            written += l->bytes[end++];
        for (int i = first; i < end; i++) {
            names[i] = l->items[i].name;
            files[i] = file_names[s];
        }
        snprintf(path, sizeof path, "%s/%s", o->out_dir, file_names[s]);
        if ((rc = check_stop_signal()) ||
            (rc = moe_st_write(path, l->items + first, end - first, "pt")))
            goto out;
        first = end;
    }
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", o->out_dir);
    rc = moe_st_write_index(path, names, files, l->count, total);
out:
    free(files);
    free(names);
    free(file_names);
    return rc;
}

/* Returns the number of expert and shared-expert weights of the layer;
 * the router and bias are too small to count. */
static double weight_count(const struct moe_make_layer_options *o)
{
    return 3.0 * (double)o->experts * (double)o->ffn * (double)o->hidden +
           3.0 * (double)o->shared_ffn * (double)o->hidden;
}

static int check_memory(const struct moe_make_layer_options *o)
{
    double params = weight_count(o);
    /* float32 weights plus their encoded copy */
    double need = params * 8.0;
    double have = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE);
    if (have > 0 && need > 0.8 * have)
        return moe_fail(-EINVAL, "the layer needs about %.1f GiB to write but this "
                        "machine has %.1f GiB; use a larger --scale or smaller sizes",
                        need / 1073741824.0, have / 1073741824.0);
    /* The tokens are drawn after the weights are freed, so they count alone. */
    double tokens_need = (double)o->tokens * (double)o->hidden * sizeof(float);
    if (have > 0 && tokens_need > 0.8 * have)
        return moe_fail(-EINVAL, "invalid --tokens value %" PRId64 ": %" PRId64
                        " tokens of hidden size %" PRId64 " need about %.1f GiB but "
                        "this machine has %.1f GiB", o->tokens, o->tokens, o->hidden,
                        tokens_need / 1073741824.0, have / 1073741824.0);
    return 0;
}

/* Rejects a layer whose files would not fit in the free space of the
 * filesystem that contains `dir` (an existing directory), so that a large
 * preset fails at once instead of after minutes of writing. */
static int check_disk_space(const struct moe_make_layer_options *o, const char *dir)
{
    static const double bytes_per_weight[] = {4.0, 2.0, 2.0, 1.0};
    double params = weight_count(o);
    double need = params * bytes_per_weight[o->dtype] +
                  (double)o->tokens * (double)o->hidden * sizeof(float);
    struct statvfs fs;
    if (statvfs(dir, &fs) != 0)
        return 0; /* the write itself reports what is wrong */
    double free_bytes = (double)fs.f_bavail * (double)fs.f_frsize;
    if (need > free_bytes)
        return moe_fail(-EINVAL, "invalid --out directory '%s': the layer needs about "
                        "%.1f MiB but its filesystem has %.1f MiB free; use a larger "
                        "--scale or another directory", o->out_dir,
                        need / 1048576.0, free_bytes / 1048576.0);
    return 0;
}

/* Rejects an --out directory whose model.safetensors would shadow the new
 * shards: readers load model.safetensors when it exists and never look at
 * the index, so they would read the old weights with the new config. */
static int check_no_shadowing_file(const struct moe_make_layer_options *o)
{
    if (o->shards == 1)
        return 0;
    char path[4096];
    if (snprintf(path, sizeof path, "%s/model.safetensors", o->out_dir) >= (int)sizeof path)
        return moe_fail(-EINVAL, "invalid --out directory: name too long");
    struct stat st;
    if (lstat(path, &st) == 0)
        return moe_fail(-EINVAL, "invalid --out directory '%s': it contains "
                        "model.safetensors, which readers would load instead of "
                        "the %d new shards; remove it or use --shards 1",
                        o->out_dir, o->shards);
    return 0;
}


static int make_layer_files(const struct moe_make_layer_options *o);

int moe_make_layer(const struct moe_make_layer_options *o)
{
    /* SIGINT, SIGTERM and SIGHUP only set a flag while files are written,
     * and the flag is checked between files, so that a stop never leaves a
     * temporary file behind. Handlers, unlike a blocked mask, also cover
     * the threads that OpenBLAS starts when the program loads. SIGXFSZ is
     * ignored, so that a file size limit fails the write with EFBIG, which
     * removes the temporary file. */
    static const int stop_signals[] = {SIGINT, SIGTERM, SIGHUP};
    struct sigaction record = {.sa_handler = record_stop_signal, .sa_flags = SA_RESTART};
    struct sigaction ignore = {.sa_handler = SIG_IGN};
    struct sigaction saved[3], saved_size_limit;
    sigemptyset(&record.sa_mask);
    sigemptyset(&ignore.sa_mask);
    stop_signal = 0;
    for (int i = 0; i < 3; i++)
        sigaction(stop_signals[i], &record, &saved[i]);
    sigaction(SIGXFSZ, &ignore, &saved_size_limit);

    int rc = make_layer_files(o);
    if (rc == 0)
        rc = check_stop_signal();

    sigaction(SIGXFSZ, &saved_size_limit, NULL);
    for (int i = 0; i < 3; i++)
        sigaction(stop_signals[i], &saved[i], NULL);
    /* End the process by the signal that stopped it, as if never caught. */
    if (stop_signal)
        raise(stop_signal);
    return rc;
}

static int make_layer_files(const struct moe_make_layer_options *o)
{
    int rc = check_memory(o);
    if (rc || (rc = check_no_shadowing_file(o)) ||
        (rc = moe_make_directories("--out", o->out_dir)) ||
        (rc = check_disk_space(o, o->out_dir)))
        return rc;

    struct moe_shape shape = {o->tokens, o->hidden, o->ffn, o->experts, o->top_k,
                              o->shared_ffn};
    struct moe_weights w;
    if ((rc = moe_weights_alloc(&w, &shape, o->family->id == MOE_FAMILY_DEEPSEEK_V3,
                                o->family->shared == MOE_SHARED_GATED)))
        return rc;
    moe_weights_fill_random(&w, o->seed);

    struct tensor_list list = {0};
    char path[4096];
    rc = collect_tensors(o, &w, &list);
    moe_weights_free(&w);
    if (rc == 0 && (rc = check_stop_signal()) == 0)
        rc = write_weights(o, &list);
    tensor_list_free(&list);
    if (rc == 0 && (rc = check_stop_signal()) == 0) {
        snprintf(path, sizeof path, "%s/config.json", o->out_dir);
        rc = write_config(o, path);
    }
    if (rc == 0 && o->tokens > 0 && (rc = check_stop_signal()) == 0) {
        float *x = moe_alloc_large((size_t)(o->tokens * o->hidden) * sizeof(float));
        if (!x)
            return moe_fail(-ENOMEM, "out of memory for %" PRId64 " tokens", o->tokens);
        moe_tokens_random(x, 0, o->tokens, o->hidden, o->seed);
        snprintf(path, sizeof path, "%s/tokens.npy", o->out_dir);
        rc = moe_npy_write_f32(path, x, o->tokens, o->hidden);
        free(x);
    }
    return rc;
}
