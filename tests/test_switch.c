/*
 * test_switch.c - the switch_transformers family. The committed layer
 * data/layers/switch_transformers runs against its PyTorch vectors on 1 to
 * 4 ranks, with the dropped assignments of its expert capacity. Further
 * tests cover the sparse-block rule and make-layer's Switch options. Bad
 * configs and checkpoints exit with status 2 and a message naming the
 * field or tensor.
 */
#define _XOPEN_SOURCE 700 /* nftw */
#define _DEFAULT_SOURCE
#include "moe_error.h"
#include "moe_model.h"
#include "moe_npy.h"
#include "test_checkpoint.h"

#define LAYER_DIR "data/layers/switch_transformers"

static void read_npy_file(const char *path, struct moe_npy_array *a)
{
    cr_assert_eq(moe_npy_read(path, 1 << 30, a), 0, "read %s: %s", path,
                 moe_error_message());
}

/* ---- the committed layer ------------------------------------------------ */

/* The reference's vectors of the committed layer. */
struct torch_vectors {
    struct moe_npy_array output; /* (T, H) float64 */
    struct moe_npy_array ids;    /* (T, 1) int32 */
    struct moe_npy_array kept;   /* (T, 1) bool */
};

static void read_torch_vectors(struct torch_vectors *v)
{
    read_npy_file(LAYER_DIR "/expected_output.npy", &v->output);
    read_npy_file(LAYER_DIR "/expected_topk_ids.npy", &v->ids);
    read_npy_file(LAYER_DIR "/expected_kept.npy", &v->kept);
    cr_assert_eq(v->output.dtype, MOE_NPY_F64);
    cr_assert_eq(v->ids.dtype, MOE_NPY_I32);
    cr_assert_eq(v->kept.dtype, MOE_NPY_BOOL);
    cr_assert_eq(v->ids.count, v->kept.count);
}

static void free_torch_vectors(struct torch_vectors *v)
{
    moe_npy_array_free(&v->output);
    moe_npy_array_free(&v->ids);
    moe_npy_array_free(&v->kept);
}

/* Loads the committed layer in this process, with T = the rows of its
 * tokens.npy. */
static void load_committed_layer(struct moe_weights *w, float **x, int64_t *tokens)
{
    struct moe_model_config config;
    int64_t hidden;
    cr_assert_eq(moe_npy_read_f32(LAYER_DIR "/tokens.npy", x, tokens, &hidden), 0, "%s",
                 moe_error_message());
    cr_assert_eq(moe_model_read_config(LAYER_DIR, &config), 0, "%s", moe_error_message());
    int64_t layer = moe_model_first_moe_layer(&config);
    cr_assert_eq(layer, 1, "the committed layer is encoder block 1");
    cr_assert_eq(moe_model_load_layer(LAYER_DIR, &config, layer, *tokens, w), 0, "%s",
                 moe_error_message());
    cr_assert_eq(hidden, w->shape.hidden);
    moe_model_config_free(&config);
}

Test(switch, committed_layer_loads_dense_experts)
{
    struct moe_weights w;
    float *x;
    int64_t T;
    load_committed_layer(&w, &x, &T);
    cr_assert_eq(w.expert_kind, MOE_EXPERT_DENSE);
    cr_assert_null(w.w3, "dense experts must not keep an up projection");
    cr_assert_eq(w.activation, MOE_ACT_RELU);
    cr_assert_eq(w.shape.top_k, 1);
    cr_assert_eq(w.router.scoring, MOE_SCORING_SOFTMAX_TOPK);
    cr_assert_eq(w.router.renormalize, 0, "the weight is the top probability itself");
    cr_assert_eq(w.capacity.limit, 4);
    cr_assert_eq(w.capacity.policy, MOE_DROP_POSITION);
    cr_assert_eq(w.aux_loss_coef, 0.001);
    cr_assert_eq(w.z_loss_coef, 0.001);
    moe_weights_free(&w);
    free(x);
}

/* The golden path drops exactly the assignments the reference dropped (a
 * capacity of 4 in token order over the whole batch), and its output
 * matches the reference's within the tolerance explained at
 * committed_layer_on_1_to_4_ranks. */
Test(switch, golden_drops_match_torch)
{
    struct moe_weights w;
    float *x;
    int64_t T;
    load_committed_layer(&w, &x, &T);
    struct torch_vectors v;
    read_torch_vectors(&v);
    cr_assert_eq(v.kept.count, T);

    moe_blas_init();
    float *out = malloc((size_t)(T * w.shape.hidden) * sizeof(float));
    struct moe_golden_info info = {0};
    cr_assert_eq(moe_golden_forward(&w, x, out, &info), 0, "%s", moe_error_message());
    cr_assert(memcmp(info.expert_ids, v.ids.data, (size_t)T * sizeof(int32_t)) == 0,
              "top-1 ids differ from the PyTorch reference");
    cr_assert(memcmp(info.kept, v.kept.data, (size_t)T) == 0,
              "the dropped assignments differ from the PyTorch reference");

    int64_t dropped = 0, reference_dropped = 0;
    for (int64_t e = 0; e < w.shape.experts; e++)
        dropped += info.dropped_per_expert[e];
    for (int64_t t = 0; t < T; t++)
        reference_dropped += ((const uint8_t *)v.kept.data)[t] == 0;
    cr_assert_gt(reference_dropped, 0, "the committed layer must drop some tokens");
    cr_assert_eq(dropped, reference_dropped);

    /* A token whose only assignment was dropped outputs zero. */
    for (int64_t t = 0; t < T; t++) {
        if (info.kept[t])
            continue;
        for (int64_t c = 0; c < w.shape.hidden; c++)
            cr_assert_eq(out[t * w.shape.hidden + c], 0.0f, "token %ld column %ld",
                         (long)t, (long)c);
    }

    const double *b = v.output.data;
    int64_t count = T * w.shape.hidden;
    cr_assert_eq(v.output.count, count);
    double scale = 0;
    for (int64_t i = 0; i < count; i++)
        scale = fabs(b[i]) > scale ? fabs(b[i]) : scale;
    double worst = 0;
    for (int64_t i = 0; i < count; i++) {
        double error = fabs((double)out[i] - b[i]);
        worst = error > worst ? error : worst;
        cr_assert(error <= 1e-5 * fabs(b[i]) + 1e-5 * scale,
                  "element %ld is %.9g, reference %.9g", (long)i, out[i], b[i]);
    }
    cr_log_info("golden path: max error %.3g of max|reference| %.3g", worst, scale);

    moe_golden_info_free(&info);
    free_torch_vectors(&v);
    free(out);
    moe_weights_free(&w);
    free(x);
}

/* Runs the committed layer on 1 to 4 ranks. Each run must pass its golden
 * check, give the same output bits, select the reference's experts, and
 * match the reference's output within
 *   |moe-ep - reference| <= 1e-5 * |reference| + 1e-5 * max|reference|,
 * the tolerance of the other families' vectors: moe-ep computes in float32
 * and the reference in float64 from the same float32 weights, so they
 * differ by float32 rounding only (the worst seen here is about 1e-7 of
 * max|reference|). The dropped tokens must output exactly zero. */
Test(switch, committed_layer_on_1_to_4_ranks, .timeout = 60)
{
    struct torch_vectors v;
    read_torch_vectors(&v);
    char dir[64], dump[96], path[160];
    make_temp_dir(dir, sizeof dir);
    snprintf(dump, sizeof dump, "%s/dump", dir);
    float *first = NULL;
    const double *b = v.output.data;
    int64_t count = v.output.count, hidden = v.output.shape[1];
    double scale = 0;
    for (int64_t i = 0; i < count; i++)
        scale = fabs(b[i]) > scale ? fabs(b[i]) : scale;
    cr_assert_gt(scale, 0);

    for (int ranks = 1; ranks <= 4; ranks++) {
        char ranks_text[16];
        snprintf(ranks_text, sizeof ranks_text, "%d", ranks);
        struct outcome o;
        run_program(&o, NULL, 0, 0,
                    (const char *[]){"run", "--model", LAYER_DIR, "--input",
                                     LAYER_DIR "/tokens.npy", "--ranks", ranks_text,
                                     "--dump", dump, NULL});
        cr_assert_eq(o.status, 0, "%d ranks: status %d\n%s\n%s", ranks, o.status, o.out,
                     o.err);
        cr_assert_not_null(strstr(o.out, "golden check: bitwise equal"), "%d ranks: %s",
                           ranks, o.out);

        struct moe_npy_array out, ids;
        snprintf(path, sizeof path, "%s/output.npy", dump);
        read_npy_file(path, &out);
        snprintf(path, sizeof path, "%s/topk_ids.npy", dump);
        read_npy_file(path, &ids);
        cr_assert_eq(out.count, count);
        cr_assert_eq(ids.count, v.ids.count);
        cr_assert(memcmp(ids.data, v.ids.data, (size_t)ids.count * sizeof(int32_t)) == 0,
                  "%d ranks: top-1 ids differ from the PyTorch reference", ranks);

        const float *a = out.data;
        double worst = 0;
        for (int64_t i = 0; i < count; i++) {
            double error = fabs((double)a[i] - b[i]);
            worst = error > worst ? error : worst;
            cr_assert(error <= 1e-5 * fabs(b[i]) + 1e-5 * scale,
                      "%d ranks: element %ld is %.9g, reference %.9g", ranks, (long)i, a[i],
                      b[i]);
        }
        for (int64_t t = 0; t < v.kept.count; t++)
            if (!((const uint8_t *)v.kept.data)[t])
                for (int64_t c = 0; c < hidden; c++)
                    cr_assert_eq(a[t * hidden + c], 0.0f,
                                 "%d ranks: dropped token %ld outputs %.9g in column %ld",
                                 ranks, (long)t, a[t * hidden + c], (long)c);
        cr_log_info("%d ranks: max error %.3g of max|reference| %.3g", ranks, worst, scale);

        if (!first) {
            first = malloc((size_t)count * sizeof(float));
            memcpy(first, a, (size_t)count * sizeof(float));
        } else {
            expect_bitwise_equal(a, first, count, "output against 1 rank");
        }
        moe_npy_array_free(&out);
        moe_npy_array_free(&ids);
    }
    free(first);
    free_torch_vectors(&v);
    remove_tree(dir);
}

/* ---- which encoder blocks are sparse ------------------------------------ */

/* Writes a Switch config.json with the given extra fields into dir and
 * reads it. */
static int read_switch_config(const char *dir, const char *fields,
                              struct moe_model_config *config)
{
    char path[96], text[1024];
    snprintf(path, sizeof path, "%s/config.json", dir);
    int n = snprintf(text, sizeof text,
                     "{\"model_type\": \"switch_transformers\", \"d_model\": 8, "
                     "\"d_ff\": 16, \"num_experts\": 4, \"expert_capacity\": 64%s%s}\n",
                     fields[0] ? ", " : "", fields);
    write_all(path, text, (size_t)n);
    return moe_model_read_config(dir, config);
}

/* transformers' SwitchTransformersStack: step 1 makes every block sparse,
 * a step S > 1 the blocks B with B mod S = 1, and step 0 none. The step is
 * encoder_sparse_step when present, else num_layers //
 * num_sparse_encoder_layers, whose default is 3. */
Test(switch, sparse_block_rule)
{
    static const struct {
        const char *fields;
        const char *sparse; /* '1' for each sparse block of 12 */
    } cases[] = {
        {"\"num_layers\": 12, \"encoder_sparse_step\": 2", "010101010101"},
        {"\"num_layers\": 12, \"encoder_sparse_step\": 1", "111111111111"},
        {"\"num_layers\": 12, \"encoder_sparse_step\": 0", "000000000000"},
        {"\"num_layers\": 12, \"encoder_sparse_step\": 3", "010010010010"},
        {"\"num_layers\": 12, \"num_sparse_encoder_layers\": 6", "010101010101"},
        {"\"num_layers\": 12", "010001000100"},
        {"\"num_layers\": 12, \"num_sparse_encoder_layers\": 0", "000000000000"},
        {"\"num_layers\": 12, \"num_sparse_encoder_layers\": 12", "111111111111"},
        /* encoder_sparse_step wins over the count, as in transformers */
        {"\"num_layers\": 12, \"num_sparse_encoder_layers\": 6, \"encoder_sparse_step\": 1",
         "111111111111"},
    };
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct moe_model_config config;
        cr_assert_eq(read_switch_config(dir, cases[i].fields, &config), 0, "%s: %s",
                     cases[i].fields, moe_error_message());
        for (int64_t b = 0; b < 12; b++)
            cr_assert_eq(moe_model_is_moe_layer(&config, b), cases[i].sparse[b] == '1',
                         "%s: block %ld", cases[i].fields, (long)b);
        cr_assert_eq(moe_model_is_moe_layer(&config, 12), 0, "%s: block 12 is beyond "
                     "num_layers", cases[i].fields);
        moe_model_config_free(&config);
    }
    remove_tree(dir);
}

Test(switch, config_defaults_follow_transformers)
{
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    struct moe_model_config config;
    cr_assert_eq(read_switch_config(dir, "\"num_layers\": 2", &config), 0, "%s",
                 moe_error_message());
    cr_assert_eq(config.activation, MOE_ACT_RELU, "dense_act_fn defaults to relu");
    cr_assert_eq(config.top_k, 1);
    cr_assert_eq(config.expert_capacity, 64);
    cr_assert(isnan(config.aux_loss_coef), "no router_aux_loss_coef gives NaN");
    cr_assert(isnan(config.z_loss_coef), "no router_z_loss_coef gives NaN");
    moe_model_config_free(&config);

    static const struct {
        const char *name;
        enum moe_activation activation;
    } activations[] = {{"relu", MOE_ACT_RELU},
                       {"gelu", MOE_ACT_GELU},
                       {"gelu_new", MOE_ACT_GELU_TANH},
                       {"silu", MOE_ACT_SILU}};
    for (size_t i = 0; i < 4; i++) {
        char fields[128];
        snprintf(fields, sizeof fields, "\"num_layers\": 2, \"dense_act_fn\": \"%s\"",
                 activations[i].name);
        cr_assert_eq(read_switch_config(dir, fields, &config), 0, "%s",
                     moe_error_message());
        cr_assert_eq(config.activation, activations[i].activation, "%s",
                     activations[i].name);
        moe_model_config_free(&config);
    }
    remove_tree(dir);
}

/* ---- bad input ------------------------------------------------------------ */

Test(switch, bad_configs_exit_2, .timeout = 60)
{
    static const struct {
        const char *from, *to, *needle1, *needle2;
    } cases[] = {
        {"\"dense_act_fn\":\t\"relu\"", "\"dense_act_fn\":\t\"gated-gelu\"",
         "'dense_act_fn'", "gated-gelu"},
        {"\"dense_act_fn\":\t\"relu\"", "\"dense_act_fn\":\t3", "'dense_act_fn'",
         "not a string"},
        {"\"router_bias\":\tfalse", "\"router_bias\":\ttrue", "'router_bias'",
         "router.classifier.bias"},
        {"\"router_dtype\":\t\"float32\"", "\"router_dtype\":\t\"bfloat16\"",
         "'router_dtype'", "bfloat16"},
        {"\"expert_capacity\":\t64", "\"expert_capacity\":\t-1", "'expert_capacity'",
         "-1"},
        {"\"expert_capacity\":\t64", "\"expert_capacities\":\t64", "'expert_capacity'",
         "missing"},
        {"\"encoder_sparse_step\":\t2", "\"encoder_sparse_step\":\t-2",
         "'encoder_sparse_step'", "-2"},
        {"\"router_aux_loss_coef\":\t0.001", "\"router_aux_loss_coef\":\t\"high\"",
         "'router_aux_loss_coef'", "finite number"},
        {"\"d_model\":\t64", "\"hidden_size\":\t64", "'d_model'", "missing"},
        {"\"router_dtype\"", "\"num_selected_experts\": 2, \"router_dtype\"",
         "'num_selected_experts'", "one expert"},
    };
    char dir[64], path[96];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "switch_transformers", "--layer", "1");
    snprintf(path, sizeof path, "%s/config.json", dir);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct outcome o;
        edit_file(path, cases[i].from, cases[i].to);
        run_model(&o, dir, NULL);
        EXPECT_BAD_INPUT(o, "config.json", cases[i].needle1, cases[i].needle2);
        edit_file(path, cases[i].to, cases[i].from);
    }
    /* The restored config runs. */
    struct outcome o;
    run_model(&o, dir, NULL);
    cr_assert_eq(o.status, 0, "%s", o.err);
    remove_tree(dir);
}

Test(switch, dense_block_exits_2, .timeout = 30)
{
    char dir[64], path[96];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "switch_transformers", "--layer", "1");
    struct outcome o;
    run_model(&o, dir, (const char *[]){"--layer", "0", NULL});
    EXPECT_BAD_INPUT(o, "encoder block 0", "dense", "'encoder_sparse_step'",
                     "first sparse encoder block is 1");
    run_model(&o, dir, (const char *[]){"--layer", "2", NULL});
    EXPECT_BAD_INPUT(o, "--layer", "num_layers 2", "first sparse encoder block is 1");

    /* Without --layer the first sparse block runs. */
    run_model(&o, dir, NULL);
    cr_assert_eq(o.status, 0, "%s", o.err);
    cr_assert_not_null(strstr(o.out, "switch_transformers encoder block 1"), "%s", o.out);

    /* No sparse block at all. */
    snprintf(path, sizeof path, "%s/config.json", dir);
    edit_file(path, "\"encoder_sparse_step\":\t2", "\"encoder_sparse_step\":\t0");
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "no MoE layer");
    run_model(&o, dir, (const char *[]){"--layer", "1", NULL});
    EXPECT_BAD_INPUT(o, "encoder block 1", "dense", "no sparse encoder block");
    remove_tree(dir);
}

Test(switch, missing_tensors_exit_2, .timeout = 30)
{
    static const struct {
        const char *from, *to, *needle;
    } cases[] = {
        {"expert_3.wo.weight\"", "expert_3.wo.weighT\"",
         "encoder.block.1.layer.1.mlp.experts.expert_3.wo.weight"},
        {"expert_0.wi.weight\"", "expert_0.wi.weighT\"",
         "encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight"},
        {"router.classifier.weight\"", "router.classifier.weighT\"",
         "encoder.block.1.layer.1.mlp.router.classifier.weight"},
    };
    char dir[64], path[96];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "switch_transformers", "--layer", "1", "--experts", "4");
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct outcome o;
        patch_bytes(path, cases[i].from, cases[i].to);
        run_model(&o, dir, NULL);
        EXPECT_BAD_INPUT(o, "model.safetensors", cases[i].needle);
        patch_bytes(path, cases[i].to, cases[i].from);
    }
    remove_tree(dir);
}

/* ---- make-layer ------------------------------------------------------------ */

Test(switch, make_layer_rejects_other_families_options, .timeout = 30)
{
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"make-layer", "--out", dir, "--family",
                                 "switch_transformers", "--top-k", "2", NULL});
    EXPECT_BAD_INPUT(o, "--top-k", "2", "one expert");
    run_program(&o, NULL, 0, 0,
                (const char *[]){"make-layer", "--out", dir, "--family",
                                 "switch_transformers", "--renormalize", "on", NULL});
    EXPECT_BAD_INPUT(o, "--renormalize", "switch_transformers");
    run_program(&o, NULL, 0, 0,
                (const char *[]){"make-layer", "--out", dir, "--family", "mixtral",
                                 "--expert-capacity", "4", NULL});
    EXPECT_BAD_INPUT(o, "--expert-capacity", "mixtral");
    run_program(&o, NULL, 0, 0,
                (const char *[]){"make-layer", "--out", dir, "--family", "olmoe",
                                 "--dense-act-fn", "relu", NULL});
    EXPECT_BAD_INPUT(o, "--dense-act-fn", "olmoe");
    run_program(&o, NULL, 0, 0,
                (const char *[]){"make-layer", "--out", dir, "--family",
                                 "switch_transformers", "--dense-act-fn", "tanh", NULL});
    EXPECT_BAD_INPUT(o, "--dense-act-fn", "tanh");
    remove_tree(dir);
}

/* Each dense_act_fn reaches the experts: the same weights give four
 * different outputs, each bitwise equal to the golden path. The default
 * capacity of 64 drops nothing from 37 tokens. */
Test(switch, activations_reach_the_experts, .timeout = 60)
{
    static const char *const names[] = {"relu", "gelu", "gelu_new", "silu"};
    static float outputs[4][37 * 64];
    char dir[64], out_path[96];
    make_temp_dir(dir, sizeof dir);
    snprintf(out_path, sizeof out_path, "%s/out.npy", dir);
    for (int i = 0; i < 4; i++) {
        MAKE_LAYER(dir, "--family", "switch_transformers", "--dense-act-fn", names[i]);
        struct outcome o;
        run_model(&o, dir, (const char *[]){"--output", out_path, NULL});
        cr_assert_eq(o.status, 0, "%s: %s", names[i], o.err);
        cr_assert_not_null(strstr(o.out, "golden check: bitwise equal"), "%s", o.out);
        float *data;
        int64_t rows, cols;
        cr_assert_eq(moe_npy_read_f32(out_path, &data, &rows, &cols), 0);
        cr_assert_eq(rows * cols, 37 * 64);
        memcpy(outputs[i], data, sizeof outputs[i]);
        free(data);
        for (int j = 0; j < i; j++)
            cr_assert(memcmp(outputs[i], outputs[j], sizeof outputs[i]) != 0,
                      "%s and %s give the same output", names[i], names[j]);
    }
    remove_tree(dir);
}

Test(switch, switch_base_8_preset, .timeout = 30)
{
    char dir[64], path[96];
    static char text[4096];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--preset", "switch-base-8", "--scale", "8");
    snprintf(path, sizeof path, "%s/config.json", dir);
    size_t n = read_all(path, text, sizeof text - 1);
    text[n] = '\0';
    static const char *const expected[] = {
        "\"model_type\":\t\"switch_transformers\"",
        "\"num_layers\":\t2",
        "\"d_model\":\t96",
        "\"d_ff\":\t384",
        "\"num_experts\":\t8",
        "\"expert_capacity\":\t64",
        "\"encoder_sparse_step\":\t2",
        "\"dense_act_fn\":\t\"relu\"",
        "\"router_bias\":\tfalse",
    };
    for (size_t i = 0; i < sizeof expected / sizeof expected[0]; i++)
        cr_assert_not_null(strstr(text, expected[i]), "config.json lacks %s:\n%s",
                           expected[i], text);

    struct outcome o;
    run_model(&o, dir, NULL);
    cr_assert_eq(o.status, 0, "%s", o.err);
    cr_assert_not_null(strstr(o.out, "switch_transformers encoder block 1"), "%s", o.out);
    remove_tree(dir);
}
