/*
 * model.c - the model families and the loader of one MoE layer from a
 * Hugging Face checkpoint (config.json and safetensors).
 *
 * Field and tensor names are those of the published checkpoints; the docs
 * give each family's routing steps and fields in one table.
 */
#include "moe_model.h"
#include "moe_error.h"
#include "moe_file.h"
#include "moe_safetensors.h"
#include "moe_safetensors_internal.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DECODER_NAMES "model.layers", "gate", "", "hidden_size", "num_hidden_layers"

static const struct moe_family families[MOE_FAMILY_COUNT] = {
    {MOE_FAMILY_MIXTRAL, "mixtral", "block_sparse_moe", {"w1", "w3", "w2"},
     "num_local_experts", "intermediate_size", MOE_SHARED_NONE, DECODER_NAMES},
    {MOE_FAMILY_QWEN2_MOE, "qwen2_moe", "mlp", {"gate_proj", "up_proj", "down_proj"},
     "num_experts", "moe_intermediate_size", MOE_SHARED_GATED, DECODER_NAMES},
    {MOE_FAMILY_QWEN3_MOE, "qwen3_moe", "mlp", {"gate_proj", "up_proj", "down_proj"},
     "num_experts", "moe_intermediate_size", MOE_SHARED_NONE, DECODER_NAMES},
    {MOE_FAMILY_OLMOE, "olmoe", "mlp", {"gate_proj", "up_proj", "down_proj"},
     "num_experts", "intermediate_size", MOE_SHARED_NONE, DECODER_NAMES},
    {MOE_FAMILY_DEEPSEEK_V3, "deepseek_v3", "mlp", {"gate_proj", "up_proj", "down_proj"},
     "n_routed_experts", "moe_intermediate_size", MOE_SHARED_PLAIN, DECODER_NAMES},
    /* The T5 layout: layer 1 of an encoder block is its feed-forward part,
     * and each expert is a dense wi, activation, wo block. */
    {MOE_FAMILY_SWITCH_TRANSFORMERS, "switch_transformers", "layer.1.mlp",
     {"wi", NULL, "wo"}, "num_experts", "d_ff", MOE_SHARED_NONE, "encoder.block",
     "router.classifier", "expert_", "d_model", "num_layers"},
};

const struct moe_family *moe_family_find(const char *model_type)
{
    for (int i = 0; i < MOE_FAMILY_COUNT; i++)
        if (!strcmp(families[i].model_type, model_type))
            return &families[i];
    return NULL;
}

const struct moe_family *moe_family_get(enum moe_family_id id)
{
    return id >= 0 && id < MOE_FAMILY_COUNT ? &families[id] : NULL;
}

int moe_tensor_name(const struct moe_family *f, int64_t layer,
                    enum moe_tensor_kind kind, int64_t expert, char *buf, size_t size)
{
    const char *shared = f->shared == MOE_SHARED_GATED ? "shared_expert" : "shared_experts";
    const char *proj = NULL;
    int n = -1;
    switch (kind) {
    case MOE_TENSOR_ROUTER:
        n = snprintf(buf, size, "%s.%" PRId64 ".%s.%s.weight", f->layer_prefix, layer,
                     f->block, f->router);
        break;
    case MOE_TENSOR_SCORE_BIAS:
        if (f->id == MOE_FAMILY_DEEPSEEK_V3)
            n = snprintf(buf, size, "%s.%" PRId64 ".%s.%s.e_score_correction_bias",
                         f->layer_prefix, layer, f->block, f->router);
        break;
    case MOE_TENSOR_EXPERT_GATE:
    case MOE_TENSOR_EXPERT_UP:
    case MOE_TENSOR_EXPERT_DOWN:
        proj = f->proj[kind - MOE_TENSOR_EXPERT_GATE];
        if (proj)
            n = snprintf(buf, size, "%s.%" PRId64 ".%s.experts.%s%" PRId64 ".%s.weight",
                         f->layer_prefix, layer, f->block, f->expert_prefix, expert, proj);
        break;
    case MOE_TENSOR_SHARED_GATE:
    case MOE_TENSOR_SHARED_UP:
    case MOE_TENSOR_SHARED_DOWN:
        if (f->shared != MOE_SHARED_NONE)
            n = snprintf(buf, size, "%s.%" PRId64 ".%s.%s.%s.weight", f->layer_prefix,
                         layer, f->block, shared, f->proj[kind - MOE_TENSOR_SHARED_GATE]);
        break;
    case MOE_TENSOR_SHARED_EXPERT_GATE:
        if (f->shared == MOE_SHARED_GATED)
            n = snprintf(buf, size, "%s.%" PRId64 ".%s.shared_expert_gate.weight",
                         f->layer_prefix, layer, f->block);
        break;
    }
    if (n < 0 || (size_t)n >= size)
        return moe_fail(-EINVAL, "no tensor of kind %d in family %s", (int)kind,
                        f->model_type);
    return 0;
}

/* ---- config.json ------------------------------------------------------ */

/* Largest integer that a JSON number, a double in cJSON, represents exactly. */
#define JSON_INT_MAX 9007199254740992.0

static int compare_key_names(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Rejects a key that appears twice in `object`. cJSON returns the first of
 * two equal keys and Python's json module the last, so moe-ep and
 * transformers would read different values. */
static int reject_duplicate_keys(const char *path, const cJSON *object,
                                 const char *object_name)
{
    int count = cJSON_GetArraySize(object);
    if (count < 2)
        return 0;
    const char **keys = malloc((size_t)count * sizeof *keys);
    if (!keys)
        return moe_fail(-ENOMEM, "out of memory reading %s", path);
    int n = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, object)
        keys[n++] = item->string;
    qsort(keys, (size_t)n, sizeof *keys, compare_key_names);
    int rc = 0;
    for (int i = 1; i < n && rc == 0; i++)
        if (!strcmp(keys[i - 1], keys[i]))
            rc = moe_fail(-EINVAL, "%s: field '%s%s' appears twice; JSON readers "
                          "disagree on which value counts", path, object_name,
                          keys[i]);
    free(keys);
    return rc;
}

/* Parses config.json text[0..length) strictly: UTF-8 without NUL bytes,
 * one JSON object and nothing but whitespace after it, as Python's json
 * module requires. */
static int parse_config_text(const char *path, const char *text, size_t length,
                             cJSON **root)
{
    *root = NULL;
    const char *nul = memchr(text, '\0', length);
    if (nul)
        return moe_fail(-EINVAL, "%s: malformed JSON: NUL byte at offset %zu", path,
                        (size_t)(nul - text));
    if (!st_is_utf8(text))
        return moe_fail(-EINVAL, "%s: malformed JSON: the text is not valid UTF-8 "
                        "or contains a control character", path);
    const char *end = NULL;
    cJSON *parsed = cJSON_ParseWithLengthOpts(text, length, &end, 0);
    if (!parsed) {
        size_t at = end && end >= text ? (size_t)(end - text) : 0;
        return moe_fail(-EINVAL, "%s: malformed JSON near offset %zu", path, at);
    }
    for (size_t i = (size_t)(end - text); i < length; i++)
        if (!strchr(" \t\r\n", text[i])) {
            cJSON_Delete(parsed);
            return moe_fail(-EINVAL, "%s: malformed JSON: unexpected text at offset "
                            "%zu after the top-level value", path, i);
        }
    *root = parsed;
    return 0;
}

/* Reads integer field `name`. A missing field takes `fallback`, or is an
 * error when `required`. */
static int json_int(const struct moe_model_config *c, const cJSON *root,
                    const char *name, int required, int64_t fallback, int64_t min,
                    int64_t max, int64_t *out)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, name);
    if (!item || cJSON_IsNull(item)) {
        if (required)
            return moe_fail(-EINVAL, "%s: field '%s' is missing; %s configs need it",
                            c->path, name, c->family->model_type);
        *out = fallback;
        return 0;
    }
    double v = item->valuedouble;
    if (!cJSON_IsNumber(item) || v != floor(v) || fabs(v) > JSON_INT_MAX) {
        char *text = cJSON_PrintUnformatted(item);
        int rc = moe_fail(-EINVAL, "%s: field '%s' is %.60s, expected an integer",
                          c->path, name, text ? text : "not an integer");
        free(text);
        return rc;
    }
    if (v < (double)min || v > (double)max)
        return moe_fail(-EINVAL, "%s: field '%s' is %.0f, expected %" PRId64 " to %"
                        PRId64, c->path, name, v, min, max);
    *out = (int64_t)v;
    return 0;
}

/* Reads boolean field `name`, which must be present: the transformers
 * defaults of norm_topk_prob differ by family and version, so moe-ep does
 * not guess. */
static int json_bool(const struct moe_model_config *c, const cJSON *root,
                     const char *name, int *out)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, name);
    if (!item || cJSON_IsNull(item))
        return moe_fail(-EINVAL, "%s: field '%s' is missing; %s configs need it",
                        c->path, name, c->family->model_type);
    if (!cJSON_IsBool(item))
        return moe_fail(-EINVAL, "%s: field '%s' is not true or false", c->path, name);
    *out = cJSON_IsTrue(item);
    return 0;
}

/* Checks that string field `name`, if present, is one of the values this
 * project implements. */
static int json_expect_string(const struct moe_model_config *c, const cJSON *root,
                              const char *name, const char *expected)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, name);
    if (!item || cJSON_IsNull(item))
        return 0;
    if (!cJSON_IsString(item))
        return moe_fail(-EINVAL, "%s: field '%s' is not a string", c->path, name);
    if (strcmp(item->valuestring, expected))
        return moe_fail(-EINVAL, "%s: field '%s' is \"%s\"; moe-ep implements only "
                        "\"%s\" for %s", c->path, name, item->valuestring, expected,
                        c->family->model_type);
    return 0;
}

static int read_mlp_only_layers(struct moe_model_config *c, const cJSON *root)
{
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(root, "mlp_only_layers");
    if (!list || cJSON_IsNull(list))
        return 0;
    if (!cJSON_IsArray(list))
        return moe_fail(-EINVAL, "%s: field 'mlp_only_layers' is not a list", c->path);
    int count = cJSON_GetArraySize(list);
    c->mlp_only_layers = calloc((size_t)count + 1, sizeof(int64_t));
    if (!c->mlp_only_layers)
        return moe_fail(-ENOMEM, "out of memory reading %s", c->path);
    const cJSON *item;
    cJSON_ArrayForEach(item, list) {
        double v = item->valuedouble;
        if (!cJSON_IsNumber(item) || v != floor(v) || v < 0 || v > JSON_INT_MAX)
            return moe_fail(-EINVAL, "%s: field 'mlp_only_layers' holds an entry "
                            "that is not a layer index", c->path);
        c->mlp_only_layers[c->mlp_only_count++] = (int64_t)v;
    }
    return 0;
}

/* Reads the optional number field `name`, a loss coefficient, into *out:
 * NaN when it is missing or null. */
static int json_coefficient(const struct moe_model_config *c, const cJSON *root,
                            const char *name, double *out)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, name);
    *out = NAN;
    if (!item || cJSON_IsNull(item))
        return 0;
    if (!cJSON_IsNumber(item) || !isfinite(item->valuedouble) || item->valuedouble < 0) {
        char *text = cJSON_PrintUnformatted(item);
        int rc = moe_fail(-EINVAL, "%s: field '%s' is %.60s, expected a finite number "
                          "of 0 or more", c->path, name, text ? text : "not a number");
        free(text);
        return rc;
    }
    *out = item->valuedouble;
    return 0;
}

/* The dense_act_fn values moe-ep implements, with transformers' ACT2FN
 * names: "gelu" is the erf form and "gelu_new" the tanh approximation. */
static const struct {
    const char *name;
    enum moe_activation activation;
} dense_activations[] = {
    {"relu", MOE_ACT_RELU},
    {"gelu", MOE_ACT_GELU},
    {"gelu_new", MOE_ACT_GELU_TANH},
    {"silu", MOE_ACT_SILU},
};

int moe_activation_from_name(const char *name, enum moe_activation *activation)
{
    for (size_t i = 0; i < sizeof dense_activations / sizeof dense_activations[0]; i++)
        if (!strcmp(name, dense_activations[i].name)) {
            *activation = dense_activations[i].activation;
            return 0;
        }
    return -EINVAL;
}

const char *moe_activation_name(enum moe_activation activation)
{
    for (size_t i = 0; i < sizeof dense_activations / sizeof dense_activations[0]; i++)
        if (dense_activations[i].activation == activation)
            return dense_activations[i].name;
    return "unknown";
}

static int read_dense_act_fn(struct moe_model_config *c, const cJSON *root)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, "dense_act_fn");
    /* transformers' SwitchTransformersConfig defaults to "relu" */
    c->activation = MOE_ACT_RELU;
    if (!item || cJSON_IsNull(item))
        return 0;
    if (!cJSON_IsString(item))
        return moe_fail(-EINVAL, "%s: field 'dense_act_fn' is not a string", c->path);
    if (moe_activation_from_name(item->valuestring, &c->activation))
        return moe_fail(-EINVAL, "%s: field 'dense_act_fn' is \"%.60s\"; moe-ep "
                        "implements " MOE_DENSE_ACT_NAMES, c->path, item->valuestring);
    return 0;
}

/* Reads the step that marks the sparse encoder blocks. transformers'
 * SwitchTransformersConfig computes num_layers // num_sparse_encoder_layers,
 * with 3 sparse layers by default and a step of 0 for none. An
 * encoder_sparse_step in config.json replaces that value, because the base
 * PretrainedConfig sets every extra config.json key as an attribute after
 * the computation. */
static int read_sparse_step(struct moe_model_config *c, const cJSON *root)
{
    const int64_t big = INT64_C(1) << 24;
    const cJSON *step = cJSON_GetObjectItemCaseSensitive(root, "encoder_sparse_step");
    if (step && !cJSON_IsNull(step)) {
        c->sparse_step_field = "encoder_sparse_step";
        return json_int(c, root, "encoder_sparse_step", 1, 0, 0, big,
                        &c->encoder_sparse_step);
    }
    int64_t sparse_layers;
    int rc = json_int(c, root, "num_sparse_encoder_layers", 0, 3, 0, big, &sparse_layers);
    if (rc)
        return rc;
    c->sparse_step_field = "num_sparse_encoder_layers";
    c->encoder_sparse_step = sparse_layers > 0 ? c->layers / sparse_layers : 0;
    return 0;
}

/* Reads the Switch Transformers fields: top-1 routing by the highest
 * softmax probability, whose probability is the weight, a capacity of
 * expert_capacity tokens per expert kept in token order, and dense
 * experts. */
static int read_switch_fields(struct moe_model_config *c, const cJSON *root)
{
    int rc;
    const cJSON *bias = cJSON_GetObjectItemCaseSensitive(root, "router_bias");
    if (bias && !cJSON_IsNull(bias) && !cJSON_IsBool(bias))
        return moe_fail(-EINVAL, "%s: field 'router_bias' is not true or false", c->path);
    if (cJSON_IsTrue(bias))
        return moe_fail(-EINVAL, "%s: field 'router_bias' is true, but moe-ep does not "
                        "load the router bias (router.classifier.bias), so only layers "
                        "without one are supported", c->path);
    const cJSON *selected = cJSON_GetObjectItemCaseSensitive(root, "num_selected_experts");
    if (selected && !cJSON_IsNull(selected) &&
        (!cJSON_IsNumber(selected) || selected->valuedouble != 1.0))
        return moe_fail(-EINVAL, "%s: field 'num_selected_experts' is not 1, but the "
                        "Switch router of transformers always selects one expert per "
                        "token", c->path);
    if ((rc = json_int(c, root, "expert_capacity", 1, 0, 0, INT64_C(1) << 53,
                       &c->expert_capacity)) ||
        (rc = json_expect_string(c, root, "router_dtype", "float32")) ||
        (rc = read_dense_act_fn(c, root)) || (rc = read_sparse_step(c, root)))
        return rc;
    c->top_k = 1;
    c->expert_kind = MOE_EXPERT_DENSE;
    c->router.renormalize = 0;
    return 0;
}

/* Reads the fields of the routed experts, the router and the shared
 * expert, which differ by family. */
static int read_family_fields(struct moe_model_config *c, const cJSON *root)
{
    const struct moe_family *f = c->family;
    const int64_t big = INT64_C(1) << 24;
    int rc, flag;
    moe_router_default(&c->router);
    c->expert_kind = MOE_EXPERT_SWIGLU;
    c->activation = MOE_ACT_SILU;
    c->expert_capacity = -1;
    c->moe_layer_freq = 1;
    c->decoder_sparse_step = 1;

    if ((rc = json_int(c, root, f->layers_field, 1, 0, 1, big, &c->layers)) ||
        (rc = json_int(c, root, f->hidden_field, 1, 0, 1, big, &c->hidden)) ||
        (rc = json_int(c, root, f->ffn_field, 1, 0, 1, big, &c->ffn)) ||
        (rc = json_int(c, root, f->experts_field, 1, 0, 1, MOE_MAX_EXPERTS, &c->experts)) ||
        (rc = json_coefficient(c, root, "router_aux_loss_coef", &c->aux_loss_coef)) ||
        (rc = json_coefficient(c, root, "router_z_loss_coef", &c->z_loss_coef)))
        return rc;
    if (f->id != MOE_FAMILY_SWITCH_TRANSFORMERS) {
        if ((rc = json_int(c, root, "num_experts_per_tok", 1, 0, 1, MOE_MAX_EXPERTS,
                           &c->top_k)))
            return rc;
        if (c->top_k > c->experts)
            return moe_fail(-EINVAL, "%s: field 'num_experts_per_tok' is %" PRId64
                            ", more than the %" PRId64 " experts of '%s'", c->path,
                            c->top_k, c->experts, f->experts_field);
    }

    switch (f->id) {
    case MOE_FAMILY_MIXTRAL:
        break;
    case MOE_FAMILY_QWEN2_MOE:
        if ((rc = json_int(c, root, "shared_expert_intermediate_size", 1, 0, 1, big,
                           &c->shared_ffn)))
            return rc;
        /* The rest is shared with qwen3_moe. */
        __attribute__((fallthrough));
    case MOE_FAMILY_QWEN3_MOE:
        if ((rc = json_int(c, root, "decoder_sparse_step", 0, 1, 1, big,
                           &c->decoder_sparse_step)) ||
            (rc = read_mlp_only_layers(c, root)))
            return rc;
        /* norm_topk_prob as in olmoe. */
        __attribute__((fallthrough));
    case MOE_FAMILY_OLMOE:
        if ((rc = json_bool(c, root, "norm_topk_prob", &flag)))
            return rc;
        c->router.renormalize = flag;
        break;
    case MOE_FAMILY_DEEPSEEK_V3: {
        int64_t shared_experts;
        if ((rc = json_int(c, root, "n_group", 1, 0, 1, MOE_MAX_EXPERTS, &c->router.groups)) ||
            (rc = json_int(c, root, "topk_group", 1, 0, 1, MOE_MAX_EXPERTS,
                           &c->router.topk_groups)) ||
            (rc = json_int(c, root, "n_shared_experts", 1, 0, 0, 1024, &shared_experts)) ||
            (rc = json_int(c, root, "first_k_dense_replace", 1, 0, 0, big,
                           &c->first_k_dense_replace)) ||
            (rc = json_int(c, root, "moe_layer_freq", 0, 1, 1, big, &c->moe_layer_freq)) ||
            (rc = json_bool(c, root, "norm_topk_prob", &flag)) ||
            (rc = json_expect_string(c, root, "scoring_func", "sigmoid")) ||
            (rc = json_expect_string(c, root, "topk_method", "noaux_tc")))
            return rc;
        /* transformers' DeepseekV3 ignores moe_layer_freq, so its meaning
         * for values above 1 is unsettled; the published config has 1. */
        if (c->moe_layer_freq != 1)
            return moe_fail(-EINVAL, "%s: field 'moe_layer_freq' is %" PRId64 "; moe-ep "
                            "supports only 1, a MoE layer after every dense one",
                            c->path, c->moe_layer_freq);
        c->router.renormalize = flag;
        c->router.scoring = MOE_SCORING_SIGMOID;
        c->shared_ffn = shared_experts * c->ffn;
        const cJSON *scale = cJSON_GetObjectItemCaseSensitive(root, "routed_scaling_factor");
        if (!scale)
            return moe_fail(-EINVAL, "%s: field 'routed_scaling_factor' is missing; "
                            "deepseek_v3 configs need it", c->path);
        if (!cJSON_IsNumber(scale) || !isfinite((float)scale->valuedouble) ||
            scale->valuedouble <= 0)
            return moe_fail(-EINVAL, "%s: field 'routed_scaling_factor' is not a "
                            "finite number above 0", c->path);
        c->router.scaling_factor = (float)scale->valuedouble;
        break;
    }
    case MOE_FAMILY_SWITCH_TRANSFORMERS:
        if ((rc = read_switch_fields(c, root)))
            return rc;
        break;
    default:
        break;
    }

    struct moe_shape shape;
    moe_model_shape(c, 1, &shape);
    if ((rc = moe_router_check(&c->router, &shape)))
        return moe_fail(rc, "%s: %s", c->path, moe_error_message());
    return 0;
}

/* Reads quantization_config.weight_block_size, the FP8 scale blocks. */
static int read_fp8_block(struct moe_model_config *c, const cJSON *root)
{
    c->fp8_block_rows = c->fp8_block_cols = 128;
    const cJSON *q = cJSON_GetObjectItemCaseSensitive(root, "quantization_config");
    if (!q || cJSON_IsNull(q))
        return 0;
    if (!cJSON_IsObject(q))
        return moe_fail(-EINVAL, "%s: field 'quantization_config' is not a JSON object",
                        c->path);
    const cJSON *block = cJSON_GetObjectItemCaseSensitive(q, "weight_block_size");
    if (!block || cJSON_IsNull(block))
        return 0;
    if (!cJSON_IsArray(block) || cJSON_GetArraySize(block) != 2)
        return moe_fail(-EINVAL, "%s: field 'quantization_config.weight_block_size' "
                        "is not a list of two sizes", c->path);
    double rows = cJSON_GetArrayItem(block, 0)->valuedouble;
    double cols = cJSON_GetArrayItem(block, 1)->valuedouble;
    if (!cJSON_IsNumber(cJSON_GetArrayItem(block, 0)) ||
        !cJSON_IsNumber(cJSON_GetArrayItem(block, 1)) || rows != floor(rows) ||
        cols != floor(cols) || rows < 1 || cols < 1 || rows > 65536 || cols > 65536)
        return moe_fail(-EINVAL, "%s: field 'quantization_config.weight_block_size' "
                        "must hold two integers from 1 to 65536", c->path);
    c->fp8_block_rows = (int64_t)rows;
    c->fp8_block_cols = (int64_t)cols;
    return 0;
}

int moe_model_read_config(const char *dir, struct moe_model_config *c)
{
    memset(c, 0, sizeof *c);
    if (snprintf(c->path, sizeof c->path, "%s/config.json", dir) >= (int)sizeof c->path)
        return moe_fail(-EINVAL, "model directory name too long: '%s'", dir);

    /* Published configs take a few kB; 16 MiB bounds a hostile file. */
    char *text;
    size_t length = 0;
    int rc = moe_read_small_file(c->path, (size_t)16 << 20, &text, &length);
    if (rc)
        return rc;
    cJSON *root;
    rc = parse_config_text(c->path, text, length, &root);
    free(text);
    if (rc)
        return rc;
    if (!cJSON_IsObject(root)) {
        rc = moe_fail(-EINVAL, "%s: the top level is not a JSON object", c->path);
        goto out;
    }
    const cJSON *quantization = cJSON_GetObjectItemCaseSensitive(root, "quantization_config");
    if ((rc = reject_duplicate_keys(c->path, root, "")) ||
        (cJSON_IsObject(quantization) &&
         (rc = reject_duplicate_keys(c->path, quantization, "quantization_config."))))
        goto out;

    const cJSON *type = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    if (!cJSON_IsString(type)) {
        rc = moe_fail(-EINVAL, "%s: field 'model_type' is missing or not a string; "
                      "expected one of %s", c->path, MOE_FAMILY_NAMES);
        goto out;
    }
    c->family = moe_family_find(type->valuestring);
    if (!c->family) {
        rc = moe_fail(-EINVAL, "%s: model_type \"%s\" is not supported; expected "
                      "one of %s", c->path, type->valuestring, MOE_FAMILY_NAMES);
        goto out;
    }
    if ((rc = read_family_fields(c, root)) == 0)
        rc = read_fp8_block(c, root);
out:
    cJSON_Delete(root);
    if (rc)
        moe_model_config_free(c);
    return rc;
}

void moe_model_config_free(struct moe_model_config *c)
{
    free(c->mlp_only_layers);
    c->mlp_only_layers = NULL;
    c->mlp_only_count = 0;
}

int moe_model_is_moe_layer(const struct moe_model_config *c, int64_t layer)
{
    if (layer < 0 || layer >= c->layers)
        return 0;
    /* transformers' SwitchTransformersStack: a step of 1 makes every block
     * sparse, a larger one the blocks B with B mod step = 1. */
    if (c->family->id == MOE_FAMILY_SWITCH_TRANSFORMERS) {
        int64_t step = c->encoder_sparse_step;
        return step == 1 || (step > 1 && layer % step == 1);
    }
    for (int64_t i = 0; i < c->mlp_only_count; i++)
        if (c->mlp_only_layers[i] == layer)
            return 0;
    return layer >= c->first_k_dense_replace && layer % c->moe_layer_freq == 0 &&
           (layer + 1) % c->decoder_sparse_step == 0;
}

int64_t moe_model_first_moe_layer(const struct moe_model_config *c)
{
    for (int64_t l = 0; l < c->layers; l++)
        if (moe_model_is_moe_layer(c, l))
            return l;
    return -1;
}

void moe_model_shape(const struct moe_model_config *c, int64_t tokens,
                     struct moe_shape *shape)
{
    *shape = (struct moe_shape){
        .tokens = tokens,
        .hidden = c->hidden,
        .ffn = c->ffn,
        .experts = c->experts,
        .top_k = c->top_k,
        .shared_ffn = c->shared_ffn,
    };
}

/* ---- loading a layer -------------------------------------------------- */

/* Explains why encoder block `layer` of a Switch model is not sparse. */
static int reject_switch_block(const struct moe_model_config *c, int64_t layer)
{
    int64_t first = moe_model_first_moe_layer(c);
    char next[96] = "the model has no sparse encoder block";
    if (first >= 0)
        snprintf(next, sizeof next, "the first sparse encoder block is %" PRId64, first);
    if (layer < 0 || layer >= c->layers)
        return moe_fail(-EINVAL, "invalid --layer value %" PRId64 ": %s has %s %" PRId64
                        "; %s", layer, c->path, c->family->layers_field, c->layers, next);
    return moe_fail(-EINVAL, "invalid --layer value %" PRId64 ": encoder block %" PRId64
                    " of this switch_transformers model is dense (see '%s' in %s); %s",
                    layer, layer, c->sparse_step_field, c->path, next);
}

/* Explains why `layer` is not a MoE layer. */
static int reject_layer(const struct moe_model_config *c, int64_t layer)
{
    if (c->family->id == MOE_FAMILY_SWITCH_TRANSFORMERS)
        return reject_switch_block(c, layer);
    int64_t first = moe_model_first_moe_layer(c);
    char next[96] = "the model has no MoE layer";
    if (first >= 0)
        snprintf(next, sizeof next, "the first MoE layer is %" PRId64, first);
    if (layer < 0 || layer >= c->layers)
        return moe_fail(-EINVAL, "invalid --layer value %" PRId64 ": %s has "
                        "num_hidden_layers %" PRId64 "; %s", layer, c->path,
                        c->layers, next);
    const char *rule = "decoder_sparse_step";
    for (int64_t i = 0; i < c->mlp_only_count; i++)
        if (c->mlp_only_layers[i] == layer)
            rule = "mlp_only_layers";
    if (layer < c->first_k_dense_replace)
        rule = "first_k_dense_replace";
    else if (layer % c->moe_layer_freq != 0)
        rule = "moe_layer_freq";
    return moe_fail(-EINVAL, "invalid --layer value %" PRId64 ": layer %" PRId64
                    " of this %s model is dense (see '%s' in %s); %s", layer, layer,
                    c->family->model_type, rule, c->path, next);
}

static int read_tensor(struct moe_st_model *st, const struct moe_model_config *c,
                       int64_t layer, enum moe_tensor_kind kind, int64_t expert,
                       int ndim, int64_t rows, int64_t cols, float *dst)
{
    char name[512];
    int64_t shape[2] = {rows, cols};
    if (ndim == 1)
        shape[0] = cols;
    int rc = moe_tensor_name(c->family, layer, kind, expert, name, sizeof name);
    if (rc == 0)
        rc = moe_st_read_f32(st, name, ndim, shape, dst);
    if (rc == -ENOENT) /* a missing tensor is a bad checkpoint */
        return moe_fail(-EINVAL, "%s", moe_error_message());
    return rc;
}

static int read_layer(struct moe_st_model *st, const struct moe_model_config *c,
                      int64_t layer, struct moe_weights *w)
{
    int64_t H = c->hidden, F = c->ffn, E = c->experts, Fs = c->shared_ffn;
    int rc;
    if ((rc = read_tensor(st, c, layer, MOE_TENSOR_ROUTER, 0, 2, E, H, w->gate)))
        return rc;
    if (w->score_bias &&
        (rc = read_tensor(st, c, layer, MOE_TENSOR_SCORE_BIAS, 0, 1, 1, E, w->score_bias)))
        return rc;
    for (int64_t e = w->expert_first; e < w->expert_first + w->expert_count; e++) {
        int64_t at = e - w->expert_first;
        if ((rc = read_tensor(st, c, layer, MOE_TENSOR_EXPERT_GATE, e, 2, F, H,
                              w->w1 + at * F * H)) ||
            (w->w3 && (rc = read_tensor(st, c, layer, MOE_TENSOR_EXPERT_UP, e, 2, F, H,
                                        w->w3 + at * F * H))) ||
            (rc = read_tensor(st, c, layer, MOE_TENSOR_EXPERT_DOWN, e, 2, H, F,
                              w->w2 + at * H * F)))
            return rc;
    }
    if (Fs > 0) {
        if ((rc = read_tensor(st, c, layer, MOE_TENSOR_SHARED_GATE, 0, 2, Fs, H,
                              w->shared_w1)) ||
            (rc = read_tensor(st, c, layer, MOE_TENSOR_SHARED_UP, 0, 2, Fs, H,
                              w->shared_w3)) ||
            (rc = read_tensor(st, c, layer, MOE_TENSOR_SHARED_DOWN, 0, 2, H, Fs,
                              w->shared_w2)))
            return rc;
    }
    if (w->shared_gate &&
        (rc = read_tensor(st, c, layer, MOE_TENSOR_SHARED_EXPERT_GATE, 0, 2, 1, H,
                          w->shared_gate)))
        return rc;
    return 0;
}

int moe_model_load_layer(const char *dir, const struct moe_model_config *c,
                         int64_t layer, int64_t tokens, struct moe_weights *w)
{
    return moe_model_load_layer_experts(dir, c, layer, tokens, 0, c->experts, w);
}

int moe_model_load_layer_experts(const char *dir, const struct moe_model_config *c,
                                 int64_t layer, int64_t tokens, int64_t first,
                                 int64_t count, struct moe_weights *w)
{
    memset(w, 0, sizeof *w);
    if (!moe_model_is_moe_layer(c, layer))
        return reject_layer(c, layer);

    struct moe_shape shape;
    moe_model_shape(c, tokens, &shape);
    struct moe_st_model *st;
    int rc = moe_st_open_model(dir, &st);
    if (rc)
        return rc;
    moe_st_set_fp8_block(st, c->fp8_block_rows, c->fp8_block_cols);

    rc = moe_weights_alloc_experts(w, &shape, first, count,
                                   c->family->id == MOE_FAMILY_DEEPSEEK_V3,
                                   c->family->shared == MOE_SHARED_GATED);
    if (rc == 0) {
        w->router = c->router;
        w->expert_kind = c->expert_kind;
        w->activation = c->activation;
        w->capacity.limit = c->expert_capacity;
        w->capacity.policy = MOE_DROP_POSITION;
        w->aux_loss_coef = c->aux_loss_coef;
        w->z_loss_coef = c->z_loss_coef;
        if (w->expert_kind == MOE_EXPERT_DENSE) {
            free(w->w3);
            w->w3 = NULL;
        }
        rc = read_layer(st, c, layer, w);
        if (rc)
            moe_weights_free(w);
    }
    moe_st_close(st);
    return rc;
}
