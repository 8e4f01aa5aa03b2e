/*
 * test_model.c - checkpoint layers end to end. make-layer writes each
 * family, and `run --model` reads it on 1 to 8 ranks bit for bit. --dump
 * writes consistent stages. Every kind of bad file exits with status 2 and
 * a message naming the file and the tensor or field.
 */
#define _XOPEN_SOURCE 700 /* nftw */
#define _DEFAULT_SOURCE
#include "moe_npy.h"
#include "test_checkpoint.h"

#include <sys/resource.h>

/* ---- every family, 1 to 8 ranks ---------------------------------------- */

static void check_family_on_all_rank_counts(const char *const *make_args)
{
    char dir[64], out_path[96];
    make_temp_dir(dir, sizeof dir);
    const char *args[32] = {"make-layer", "--out", dir};
    int n = 3;
    for (int i = 0; make_args[i]; i++)
        args[n++] = make_args[i];
    args[n] = NULL;
    struct outcome o;
    run_program(&o, NULL, 0, 0, args);
    cr_assert_eq(o.status, 0, "make-layer: %s", o.err);

    static char first[1 << 16], data[1 << 16];
    size_t first_size = 0;
    snprintf(out_path, sizeof out_path, "%s/out.npy", dir);
    for (int ranks = 1; ranks <= 8; ranks++) {
        char ranks_text[8];
        snprintf(ranks_text, sizeof ranks_text, "%d", ranks);
        run_program(&o, NULL, 0, 0,
                    (const char *[]){"run", "--model", dir, "--tokens", "70", "--ranks",
                                     ranks_text, "--output", out_path, NULL});
        cr_assert_eq(o.status, 0, "%s on %d ranks: %s", make_args[1], ranks, o.err);
        cr_assert_not_null(strstr(o.out, "golden check: bitwise equal"), "%s", o.out);
        size_t size = read_all(out_path, data, sizeof data);
        if (ranks == 1) {
            memcpy(first, data, size);
            first_size = size;
        } else {
            cr_assert_eq(size, first_size);
            cr_assert(memcmp(first, data, size) == 0,
                      "%s: output on %d ranks differs from 1 rank", make_args[1], ranks);
        }
    }
    remove_tree(dir);
}

Test(model, mixtral_on_1_to_8_ranks, .timeout = 120)
{
    check_family_on_all_rank_counts((const char *[]){"--family", "mixtral", NULL});
}

Test(model, qwen2_moe_on_1_to_8_ranks, .timeout = 120)
{
    check_family_on_all_rank_counts(
        (const char *[]){"--family", "qwen2_moe", "--dtype", "bf16", NULL});
}

Test(model, qwen3_moe_on_1_to_8_ranks, .timeout = 120)
{
    check_family_on_all_rank_counts(
        (const char *[]){"--family", "qwen3_moe", "--dtype", "f16", "--shards", "2", NULL});
}

Test(model, olmoe_on_1_to_8_ranks, .timeout = 120)
{
    check_family_on_all_rank_counts((const char *[]){"--family", "olmoe", NULL});
}

Test(model, deepseek_v3_on_1_to_8_ranks, .timeout = 120)
{
    check_family_on_all_rank_counts((const char *[]){"--family", "deepseek_v3", NULL});
}

/* The default expert_capacity of 64 drops nothing from 70 tokens, so this
 * runs Switch's routing and dense experts without drops. The committed
 * layer of test_switch.c drops tokens. */
Test(model, switch_transformers_on_1_to_8_ranks, .timeout = 120)
{
    check_family_on_all_rank_counts(
        (const char *[]){"--family", "switch_transformers", "--layer", "1", NULL});
}

Test(model, deepseek_v3_fp8_sharded, .timeout = 120)
{
    check_family_on_all_rank_counts(
        (const char *[]){"--family", "deepseek_v3", "--dtype", "fp8", "--hidden", "160",
                         "--ffn", "136", "--shards", "3", NULL});
}

/* ---- dumps ------------------------------------------------------------- */

static void read_npy(const char *dir, const char *name, struct moe_npy_array *a)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s.npy", dir, name);
    cr_assert_eq(moe_npy_read(path, 1 << 30, a), 0, "read %s", path);
}

Test(model, dump_stages_are_consistent, .timeout = 60)
{
    char dir[64], dump[96];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "qwen2_moe", "--experts", "6", "--top-k", "3");
    snprintf(dump, sizeof dump, "%s/dump", dir);
    struct outcome o;
    run_model(&o, dir, (const char *[]){"--ranks", "4", "--dump", dump, NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    cr_assert_not_null(strstr(o.out, "shared_out     bitwise equal"), "%s", o.out);
    cr_assert_null(strstr(o.out, "MISMATCH"));

    const int64_t T = 37, H = 64, E = 6, K = 3, R = 4;
    struct moe_npy_array tokens, ids, per_rank, per_expert, in_rank, out;
    read_npy(dump, "tokens", &tokens);
    read_npy(dump, "topk_ids", &ids);
    read_npy(dump, "num_tokens_per_rank", &per_rank);
    read_npy(dump, "num_tokens_per_expert", &per_expert);
    read_npy(dump, "is_token_in_rank", &in_rank);
    read_npy(dump, "expert_out", &out);
    cr_assert_eq(ids.dtype, MOE_NPY_I32);
    cr_assert(ids.ndim == 2 && ids.shape[0] == T && ids.shape[1] == K);
    cr_assert(out.ndim == 3 && out.shape[0] == T && out.shape[1] == K && out.shape[2] == H);
    cr_assert_eq(in_rank.dtype, MOE_NPY_BOOL);
    cr_assert(in_rank.shape[0] == T && in_rank.shape[1] == R);

    /* The layout agrees with the ids. */
    const int32_t *id = ids.data;
    const uint8_t *in = in_rank.data;
    int64_t expert_rows[6] = {0}, rank_tokens[4] = {0};
    for (int64_t t = 0; t < T; t++) {
        for (int64_t k = 0; k < K; k++)
            expert_rows[id[t * K + k]]++;
        for (int64_t r = 0; r < R; r++)
            rank_tokens[r] += in[t * R + r];
    }
    for (int64_t e = 0; e < E; e++)
        cr_assert_eq(((int32_t *)per_expert.data)[e], expert_rows[e], "expert %ld", (long)e);
    for (int64_t r = 0; r < R; r++)
        cr_assert_eq(((int32_t *)per_rank.data)[r], rank_tokens[r], "rank %ld", (long)r);

    /* Each rank received exactly the token rows its index file names. */
    int64_t rows = 0;
    for (int r = 0; r < R; r++) {
        char name[64];
        struct moe_npy_array src, x;
        snprintf(name, sizeof name, "rank%d_recv_src_idx", r);
        read_npy(dump, name, &src);
        snprintf(name, sizeof name, "rank%d_recv_x", r);
        read_npy(dump, name, &x);
        cr_assert_eq(x.shape[0], src.shape[0]);
        for (int64_t i = 0; i < src.count; i++) {
            int32_t t = ((int32_t *)src.data)[i];
            cr_assert(t >= 0 && t < T);
            cr_assert(memcmp((float *)x.data + i * H, (float *)tokens.data + t * H,
                             (size_t)H * sizeof(float)) == 0,
                      "rank %d row %ld is not token %d", r, (long)i, t);
        }
        rows += src.count;
        moe_npy_array_free(&src);
        moe_npy_array_free(&x);
    }
    cr_assert_eq(rows, T * K);

    moe_npy_array_free(&tokens);
    moe_npy_array_free(&ids);
    moe_npy_array_free(&per_rank);
    moe_npy_array_free(&per_expert);
    moe_npy_array_free(&in_rank);
    moe_npy_array_free(&out);
    remove_tree(dir);
}

/* ---- bad config.json --------------------------------------------------- */

Test(model, malformed_config_exits_2, .timeout = 30)
{
    char dir[64], path[96];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "mixtral");
    snprintf(path, sizeof path, "%s/config.json", dir);
    write_all(path, "{\"model_type\": \"mixtral\", ", 26);
    struct outcome o;
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "config.json", "malformed JSON");
    remove_tree(dir);
}

Test(model, config_field_errors_exit_2, .timeout = 60)
{
    char dir[64], path[96];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "mixtral");
    snprintf(path, sizeof path, "%s/config.json", dir);
    struct outcome o;

    edit_file(path, "\"mixtral\"", "\"gpt2\"");
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "config.json", "gpt2", "not supported", "deepseek_v3");
    edit_file(path, "\"gpt2\"", "\"mixtral\"");

    edit_file(path, "\"hidden_size\"", "\"hidden_sizes\"");
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "config.json", "'hidden_size'", "missing");
    edit_file(path, "\"hidden_sizes\"", "\"hidden_size\"");

    edit_file(path, "\"num_experts_per_tok\":\t2", "\"num_experts_per_tok\":\t9");
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "config.json", "'num_experts_per_tok'", "9");
    edit_file(path, "\"num_experts_per_tok\":\t9", "\"num_experts_per_tok\":\t2.5");
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "config.json", "'num_experts_per_tok' is 2.5", "expected an integer");
    remove_tree(dir);
}

Test(model, shape_flags_conflict_with_model, .timeout = 30)
{
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "olmoe");
    struct outcome o;
    run_model(&o, dir, (const char *[]){"--hidden", "32", NULL});
    EXPECT_BAD_INPUT(o, "--hidden", "--model");
    run_program(&o, NULL, 0, 0, (const char *[]){"run", "--layer", "1", NULL});
    EXPECT_BAD_INPUT(o, "--layer", "--model");
    remove_tree(dir);
}

/* ---- dense layers ------------------------------------------------------ */

Test(model, deepseek_dense_layer_names_first_moe, .timeout = 30)
{
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "deepseek_v3", "--layer", "3");
    struct outcome o;
    run_model(&o, dir, (const char *[]){"--layer", "1", NULL});
    EXPECT_BAD_INPUT(o, "layer 1", "dense", "first_k_dense_replace", "first MoE layer is 3");
    /* Without --layer the first MoE layer runs. */
    run_model(&o, dir, NULL);
    cr_assert_eq(o.status, 0, "%s", o.err);
    cr_assert_not_null(strstr(o.out, "deepseek_v3 layer 3"), "%s", o.out);
    run_model(&o, dir, (const char *[]){"--layer", "4", NULL});
    EXPECT_BAD_INPUT(o, "--layer", "num_hidden_layers 4");
    remove_tree(dir);
}

Test(model, qwen_dense_layers_exit_2, .timeout = 30)
{
    char dir[64], path[96];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "qwen2_moe", "--layer", "2");
    struct outcome o;
    run_model(&o, dir, (const char *[]){"--layer", "0", NULL});
    EXPECT_BAD_INPUT(o, "dense", "mlp_only_layers", "first MoE layer is 2");

    /* With decoder_sparse_step 2, only odd layers are sparse. */
    snprintf(path, sizeof path, "%s/config.json", dir);
    edit_file(path, "\"decoder_sparse_step\":\t1", "\"decoder_sparse_step\":\t2");
    edit_file(path, "\"mlp_only_layers\":\t[0, 1]", "\"mlp_only_layers\":\t[]");
    run_model(&o, dir, (const char *[]){"--layer", "2", NULL});
    EXPECT_BAD_INPUT(o, "dense", "decoder_sparse_step", "first MoE layer is 1");
    remove_tree(dir);
}

/* ---- bad weights -------------------------------------------------------- */


Test(model, missing_tensor_exits_2, .timeout = 30)
{
    char dir[64], path[96];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "mixtral", "--experts", "4");
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    /* Rename one tensor, keeping the header's length. */
    patch_bytes(path, "experts.3.w1.weight\"", "experts.3.w1.weighT\"");
    struct outcome o;
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "model.layers.0.block_sparse_moe.experts.3.w1.weight");
    remove_tree(dir);
}

Test(model, shape_mismatch_exits_2, .timeout = 30)
{
    char dir[64], path[96];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "olmoe");
    snprintf(path, sizeof path, "%s/config.json", dir);
    edit_file(path, "\"intermediate_size\":\t32", "\"intermediate_size\":\t16");
    struct outcome o;
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "model.safetensors", "experts.0.gate_proj.weight", "shape");
    remove_tree(dir);
}

Test(model, unsupported_dtype_exits_2, .timeout = 30)
{
    char dir[64], path[96];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "mixtral");
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    /* F32 and I32 have the same size, so only the dtype is wrong. */
    patch_bytes(path, "\"dtype\":\"F32\"", "\"dtype\":\"I32\"");
    struct outcome o;
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "model.safetensors", "I32", "unsupported");
    remove_tree(dir);
}

Test(model, header_beyond_file_exits_2, .timeout = 30)
{
    char dir[64], path[96];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "mixtral");
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    static char buf[1 << 22];
    size_t n = read_all(path, buf, sizeof buf);
    uint64_t length = (uint64_t)n; /* the header would end past the file */
    memcpy(buf, &length, 8);
    write_all(path, buf, n);
    struct outcome o;
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "model.safetensors", "header");
    remove_tree(dir);
}

/* Writes a safetensors file whose header is `header` followed by `data`
 * bytes of zeros. */
static void write_raw_safetensors(const char *path, const char *header, size_t data)
{
    static char buf[1 << 16];
    uint64_t length = strlen(header);
    memcpy(buf, &length, 8);
    memcpy(buf + 8, header, length);
    memset(buf + 8 + length, 0, data);
    write_all(path, buf, 8 + length + data);
}

/* A mixtral layer with H 2, F 2, E 2, K 1: every tensor is 16 bytes of F32. */
static void write_tiny_config(const char *dir)
{
    char path[96];
    snprintf(path, sizeof path, "%s/config.json", dir);
    const char *config = "{\"model_type\": \"mixtral\", \"num_hidden_layers\": 1, "
                         "\"hidden_size\": 2, \"intermediate_size\": 2, "
                         "\"num_local_experts\": 2, \"num_experts_per_tok\": 1}";
    write_all(path, config, strlen(config));
}

static void check_raw_layer(const char *offsets_of_w2, size_t data, const char *needle)
{
    char dir[64], path[96], header[2048];
    make_temp_dir(dir, sizeof dir);
    write_tiny_config(dir);
    int n = snprintf(header, sizeof header,
                     "{\"model.layers.0.block_sparse_moe.gate.weight\":{\"dtype\":\"F32\","
                     "\"shape\":[2,2],\"data_offsets\":[0,16]}");
    size_t at = 16;
    for (int e = 0; e < 2; e++) {
        static const char *const proj[] = {"w1", "w3", "w2"};
        for (int p = 0; p < 3; p++) {
            char offsets[64];
            if (e == 1 && p == 2)
                snprintf(offsets, sizeof offsets, "%s", offsets_of_w2);
            else
                snprintf(offsets, sizeof offsets, "[%zu,%zu]", at, at + 16);
            n += snprintf(header + n, sizeof header - (size_t)n,
                          ",\"model.layers.0.block_sparse_moe.experts.%d.%s.weight\":"
                          "{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":%s}",
                          e, proj[p], offsets);
            at += 16;
        }
    }
    snprintf(header + n, sizeof header - (size_t)n, "}");
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    write_raw_safetensors(path, header, data);

    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", "--model", dir, "--tokens", "4", "--ranks", "2",
                                 NULL});
    EXPECT_BAD_INPUT(o, "model.safetensors", needle);
    remove_tree(dir);
}

Test(model, raw_layer_is_valid, .timeout = 30)
{
    char dir[64], path[96];
    make_temp_dir(dir, sizeof dir);
    write_tiny_config(dir);
    /* The same writer with correct offsets gives a layer that runs, so the
     * failures below come from the one broken tensor. */
    char header[2048];
    int n = snprintf(header, sizeof header,
                     "{\"model.layers.0.block_sparse_moe.gate.weight\":{\"dtype\":\"F32\","
                     "\"shape\":[2,2],\"data_offsets\":[0,16]}");
    size_t at = 16;
    for (int e = 0; e < 2; e++)
        for (int p = 0; p < 3; p++) {
            static const char *const proj[] = {"w1", "w3", "w2"};
            n += snprintf(header + n, sizeof header - (size_t)n,
                          ",\"model.layers.0.block_sparse_moe.experts.%d.%s.weight\":"
                          "{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[%zu,%zu]}",
                          e, proj[p], at, at + 16);
            at += 16;
        }
    snprintf(header + n, sizeof header - (size_t)n, "}");
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    write_raw_safetensors(path, header, at);
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", "--model", dir, "--tokens", "4", "--ranks", "2",
                                 NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    remove_tree(dir);
}

Test(model, overlapping_offsets_exit_2, .timeout = 30)
{
    check_raw_layer("[80,96]", 112, "overlap");
}

Test(model, offsets_beyond_data_exit_2, .timeout = 30)
{
    check_raw_layer("[112,128]", 112, "model.layers.0.block_sparse_moe.experts.1.w2.weight");
}

Test(model, offsets_size_mismatch_exit_2, .timeout = 30)
{
    check_raw_layer("[112,120]", 120, "model.layers.0.block_sparse_moe.experts.1.w2.weight");
}

Test(model, missing_shard_exits_2, .timeout = 30)
{
    char dir[64], path[128];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "olmoe", "--shards", "2");
    snprintf(path, sizeof path, "%s/model-00002-of-00002.safetensors", dir);
    cr_assert_eq(unlink(path), 0);
    struct outcome o;
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "model.safetensors.index.json", "model-00002-of-00002.safetensors");
    remove_tree(dir);
}

/* ---- bad token input ---------------------------------------------------- */

Test(model, bad_npy_input_exits_2, .timeout = 60)
{
    char dir[64], path[128];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "mixtral", "--tokens", "5");
    snprintf(path, sizeof path, "%s/tokens.npy", dir);
    struct outcome o;

    /* A valid input runs. */
    run_model(&o, dir, (const char *[]){"--input", path, "--tokens", "5", NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);

    /* Wrong width for the model. */
    char wide[128];
    snprintf(wide, sizeof wide, "%s/wide.npy", dir);
    float zeros[5 * 65] = {0};
    cr_assert_eq(moe_npy_write_f32(wide, zeros, 5, 65), 0);
    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", "--model", dir, "--input", wide, NULL});
    EXPECT_BAD_INPUT(o, "wide.npy", "(5, 65)", "hidden_size");

    /* Wrong dtype. */
    char ints[128];
    snprintf(ints, sizeof ints, "%s/ints.npy", dir);
    int32_t values[5 * 64] = {0};
    int64_t shape[2] = {5, 64};
    cr_assert_eq(moe_npy_write(ints, MOE_NPY_I32, 2, shape, values), 0);
    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", "--model", dir, "--input", ints, NULL});
    EXPECT_BAD_INPUT(o, "ints.npy", "<i4");

    /* Fortran order, then a truncated body. */
    patch_bytes(path, "'fortran_order': False", "'fortran_order': True ");
    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", "--model", dir, "--input", path, NULL});
    EXPECT_BAD_INPUT(o, "tokens.npy", "ortran");
    patch_bytes(path, "'fortran_order': True ", "'fortran_order': False");
    static char buf[1 << 16];
    size_t n = read_all(path, buf, sizeof buf);
    write_all(path, buf, n - 3);
    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", "--model", dir, "--input", path, NULL});
    EXPECT_BAD_INPUT(o, "tokens.npy");
    remove_tree(dir);
}

Test(model, float16_and_float64_input, .timeout = 30)
{
    char dir[64], path[128];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "qwen3_moe");
    int64_t shape[2] = {6, 64};
    double values[6 * 64];
    for (int i = 0; i < 6 * 64; i++)
        values[i] = (i % 17) / 8.0 - 1.0;
    snprintf(path, sizeof path, "%s/x64.npy", dir);
    cr_assert_eq(moe_npy_write(path, MOE_NPY_F64, 2, shape, values), 0);
    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"run", "--model", dir, "--input", path, NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    cr_assert_not_null(strstr(o.out, "tokens 6"), "%s", o.out);

    uint16_t halves[6 * 64];
    for (int i = 0; i < 6 * 64; i++)
        halves[i] = 0x3c00; /* 1.0 */
    snprintf(path, sizeof path, "%s/x16.npy", dir);
    cr_assert_eq(moe_npy_write(path, MOE_NPY_F16, 2, shape, halves), 0);
    run_program(&o, NULL, 0, 0, (const char *[]){"run", "--model", dir, "--input", path, NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    remove_tree(dir);
}

/* ---- the stage check catches one flipped bit ----------------------------- */

Test(model, stage_check_reports_corrupted_stage, .timeout = 60)
{
    char dir[64], dump[96];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "qwen2_moe");
    snprintf(dump, sizeof dump, "%s/dump", dir);
    static const char *const stages[] = {"router_logits", "router_scores", "topk_ids",
                                         "topk_weights", "recv_x", "expert_out",
                                         "shared_out"};
    for (size_t i = 0; i < sizeof stages / sizeof stages[0]; i++) {
        char env[64], expected[96];
        snprintf(env, sizeof env, "MOE_EP_CORRUPT_STAGE=%s:7", stages[i]);
        struct outcome o;
        run_program(&o, env, 0, 0,
                    (const char *[]){"run", "--model", dir, "--tokens", "20", "--ranks", "3",
                                     "--dump", dump, NULL});
        cr_assert_eq(o.status, 1, "%s: status %d, %s", stages[i], o.status, o.err);
        snprintf(expected, sizeof expected, "first stage that differs: %s", stages[i]);
        cr_assert_not_null(strstr(o.out, expected), "%s", o.out);
    }
    remove_tree(dir);
}

/* ---- the committed PyTorch vectors ----------------------------------------- */

/* Runs the tiny layer data/layers/NAME on 3 ranks and compares it with the
 * float64 output and the top-k ids that tools/torch_reference.py computed
 * from the published math of the family.
 *
 * Tolerance: |moe-ep - reference| <= 1e-5 * |reference| + 1e-5 * max|reference|.
 * moe-ep computes in float32 and the reference in float64 from the same
 * float32 weights, so they differ by float32 rounding only: the worst seen
 * is 4.7e-7 of max|reference| (deepseek_v3), a margin of 20. The absolute
 * term scales with the output because single outputs near zero come from
 * sums that cancel, where an element's relative error is unbounded. The ids
 * must match exactly: every layer was generated with a selection gap of at
 * least 8e-5 between the K-th and (K+1)-th expert, far above the float32
 * rounding of the scores (about 1e-7). */
static void check_torch_vectors(const char *name)
{
    char layer[128], tokens[160], dump[96], path[256];
    snprintf(layer, sizeof layer, "data/layers/%s", name);
    snprintf(tokens, sizeof tokens, "%s/tokens.npy", layer);
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    snprintf(dump, sizeof dump, "%s/dump", dir);
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", "--model", layer, "--input", tokens, "--ranks", "3",
                                 "--dump", dump, NULL});
    cr_assert_eq(o.status, 0, "%s: %s", name, o.err);

    struct moe_npy_array out, expected, ids, expected_ids;
    read_npy(dump, "output", &out);
    read_npy(dump, "topk_ids", &ids);
    snprintf(path, sizeof path, "%s/expected_output.npy", layer);
    cr_assert_eq(moe_npy_read(path, 1 << 30, &expected), 0, "%s", path);
    snprintf(path, sizeof path, "%s/expected_topk_ids.npy", layer);
    cr_assert_eq(moe_npy_read(path, 1 << 30, &expected_ids), 0, "%s", path);
    cr_assert_eq(expected.dtype, MOE_NPY_F64);
    cr_assert_eq(out.count, expected.count);
    cr_assert_eq(ids.count, expected_ids.count);
    cr_assert(memcmp(ids.data, expected_ids.data, (size_t)ids.count * 4) == 0,
              "%s: top-k ids differ from the PyTorch reference", name);

    const float *a = out.data;
    const double *b = expected.data;
    double scale = 0, worst = 0;
    for (int64_t i = 0; i < out.count; i++)
        scale = fabs(b[i]) > scale ? fabs(b[i]) : scale;
    cr_assert_gt(scale, 0);
    for (int64_t i = 0; i < out.count; i++) {
        double error = fabs((double)a[i] - b[i]);
        worst = error > worst ? error : worst;
        cr_assert(error <= 1e-5 * fabs(b[i]) + 1e-5 * scale,
                  "%s: element %ld is %.9g, reference %.9g", name, (long)i, a[i], b[i]);
    }
    cr_log_info("%s: max error %.3g of max|reference| %.3g", name, worst, scale);

    moe_npy_array_free(&out);
    moe_npy_array_free(&expected);
    moe_npy_array_free(&ids);
    moe_npy_array_free(&expected_ids);
    remove_tree(dir);
}

Test(model, mixtral_matches_torch, .timeout = 30)
{
    check_torch_vectors("mixtral");
}

Test(model, qwen2_moe_matches_torch, .timeout = 30)
{
    check_torch_vectors("qwen2_moe");
}

Test(model, qwen3_moe_matches_torch, .timeout = 30)
{
    check_torch_vectors("qwen3_moe");
}

Test(model, olmoe_matches_torch, .timeout = 30)
{
    check_torch_vectors("olmoe");
}

Test(model, deepseek_v3_matches_torch, .timeout = 30)
{
    check_torch_vectors("deepseek_v3");
}

/* The Switch layer drops 6 of its 32 tokens, and test_switch.c also
 * checks which ones, on 1 to 4 ranks. */
Test(model, switch_transformers_matches_torch, .timeout = 30)
{
    check_torch_vectors("switch_transformers");
}

/* ---- compare on real dumps -------------------------------------------------- */

/* Adds `delta` to float element `index` of an .npy file. */
static void perturb_npy(const char *path, int64_t index, float delta)
{
    struct moe_npy_array a;
    cr_assert_eq(moe_npy_read(path, 1 << 30, &a), 0, "%s", path);
    cr_assert_eq(a.dtype, MOE_NPY_F32);
    cr_assert_lt(index, a.count);
    ((float *)a.data)[index] += delta;
    cr_assert_eq(moe_npy_write(path, a.dtype, a.ndim, a.shape, a.data), 0);
    moe_npy_array_free(&a);
}

Test(model, compare_names_perturbed_stage, .timeout = 60)
{
    char dir[64], ref[96], copy[96], path[160], command[256];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "deepseek_v3");
    snprintf(ref, sizeof ref, "%s/ref", dir);
    snprintf(copy, sizeof copy, "%s/copy", dir);
    struct outcome o;
    run_model(&o, dir, (const char *[]){"--ranks", "3", "--dump", ref, NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);

    /* Every file the dump writes is a stage in compare's table, so none is
     * sorted to the end as unknown: the last line before the verdict is
     * output.npy. */
    run_program(&o, NULL, 0, 0, (const char *[]){"compare", ref, ref, NULL});
    cr_assert_eq(o.status, 0, "%s%s", o.out, o.err);
    cr_assert_not_null(strstr(o.out, "stages match"), "%s", o.out);
    const char *output_line = strstr(o.out, "output.npy");
    cr_assert_not_null(output_line);
    cr_assert_not_null(strstr(strchr(output_line, '\n'), "stages match"));
    cr_assert_null(strstr(strchr(output_line, '\n') + 1, ".npy"), "%s", o.out);

    /* A copy with one expert output perturbed diverges there, and the
     * stages before it still match. */
    snprintf(command, sizeof command, "cp -r %s %s", ref, copy);
    cr_assert_eq(system(command), 0);
    snprintf(path, sizeof path, "%s/expert_out.npy", copy);
    perturb_npy(path, 100, 1e-3f);
    run_program(&o, NULL, 0, 0, (const char *[]){"compare", copy, ref, NULL});
    cr_assert_eq(o.status, 1, "%s%s", o.out, o.err);
    cr_assert_not_null(strstr(o.out, "first mismatch: expert_out.npy"), "%s", o.out);
    cr_assert_not_null(strstr(o.out, "topk_weights.npy: match"), "%s", o.out);

    /* Within a loose tolerance the same copy matches. */
    run_program(&o, NULL, 0, 0,
                (const char *[]){"compare", copy, ref, "--atol", "1e-2", NULL});
    cr_assert_eq(o.status, 0, "%s%s", o.out, o.err);

    /* An earlier perturbation is named first even though later stages
     * also differ. */
    snprintf(path, sizeof path, "%s/router_scores.npy", copy);
    perturb_npy(path, 3, 1e-3f);
    run_program(&o, NULL, 0, 0, (const char *[]){"compare", copy, ref, NULL});
    cr_assert_eq(o.status, 1);
    cr_assert_not_null(strstr(o.out, "first mismatch: router_scores.npy"), "%s", o.out);
    remove_tree(dir);
}

/* ---- inputs found by the attack round ---------------------------------- */

/* Appends `text` inside the closing brace of the JSON object in `path`. */
static void append_to_config(const char *path, const char *text)
{
    static char config[1 << 16], edited[1 << 16];
    size_t n = read_all(path, config, sizeof config - 1);
    config[n] = '\0';
    char *brace = strrchr(config, '}');
    cr_assert_not_null(brace);
    *brace = '\0';
    int length = snprintf(edited, sizeof edited, "%s%s}\n", config, text);
    cr_assert(length > 0 && (size_t)length < sizeof edited);
    write_all(path, edited, (size_t)length);
}

Test(model, duplicate_config_key_exits_2, .timeout = 30)
{
    char dir[64], path[96];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "mixtral");
    snprintf(path, sizeof path, "%s/config.json", dir);
    /* Python's json module keeps the last value (128), cJSON the first. */
    append_to_config(path, ", \"hidden_size\": 128");
    struct outcome o;
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "config.json", "'hidden_size'", "appears twice");
    remove_tree(dir);
}

Test(model, text_after_config_object_exits_2, .timeout = 30)
{
    char dir[64], path[96];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "olmoe");
    snprintf(path, sizeof path, "%s/config.json", dir);
    static char config[1 << 16];
    size_t n = read_all(path, config, sizeof config - 1);
    memcpy(config + n, "{}", 2);
    write_all(path, config, n + 2);
    struct outcome o;
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "config.json", "malformed JSON", "after the top-level value");

    /* A NUL byte would end cJSON's text early. */
    config[n] = '\0';
    write_all(path, config, n + 1);
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "config.json", "NUL byte");
    remove_tree(dir);
}

Test(model, quantization_config_not_object_exits_2, .timeout = 30)
{
    char dir[64], path[96];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "deepseek_v3");
    snprintf(path, sizeof path, "%s/config.json", dir);
    append_to_config(path, ", \"quantization_config\": \"fp8\"");
    struct outcome o;
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "config.json", "'quantization_config'", "not a JSON object");
    remove_tree(dir);
}

/* A FIFO in place of a checkpoint file must be rejected, not waited on
 * for a writer that never comes (run_program fails the test after 60 s). */
Test(model, fifo_checkpoint_files_exit_2, .timeout = 90)
{
    static const char *const names[] = {"config.json", "model.safetensors",
                                        "model.safetensors.index.json"};
    for (int i = 0; i < 3; i++) {
        char dir[64], path[128];
        make_temp_dir(dir, sizeof dir);
        if (i == 2)
            MAKE_LAYER(dir, "--family", "mixtral", "--shards", "2");
        else
            MAKE_LAYER(dir, "--family", "mixtral");
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        cr_assert_eq(unlink(path), 0);
        cr_assert_eq(mkfifo(path, 0600), 0);
        struct outcome o;
        run_model(&o, dir, NULL);
        EXPECT_BAD_INPUT(o, names[i], "not a regular file");
        cr_assert_lt(o.seconds, 10.0, "%s took %.1f s", names[i], o.seconds);
        remove_tree(dir);
    }
}

Test(model, bad_model_paths_exit_2, .timeout = 30)
{
    char dir[64], path[128];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "mixtral");
    struct outcome o;

    /* A symbolic link loop, and a file in place of the directory. */
    snprintf(path, sizeof path, "%s/config.json", dir);
    cr_assert_eq(unlink(path), 0);
    cr_assert_eq(symlink("config.json", path), 0);
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "config.json", "symbolic links");
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    run_model(&o, path, NULL);
    EXPECT_BAD_INPUT(o, "model.safetensors", "Not a directory");
    run_model(&o, "", NULL);
    EXPECT_BAD_INPUT(o, "--model", "''");
    remove_tree(dir);
}

Test(model, make_layer_rejects_shadowed_shards, .timeout = 30)
{
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "mixtral", "--seed", "1");
    /* The new shards would sit beside the old model.safetensors, which
     * readers load first, so the run would use the seed-1 weights. */
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"make-layer", "--out", dir, "--family", "mixtral",
                                 "--seed", "2", "--shards", "2", NULL});
    EXPECT_BAD_INPUT(o, "--out", "model.safetensors", "--shards 1");
    char path[128];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    cr_assert_neq(access(path, F_OK), 0, "make-layer wrote the index anyway");
    remove_tree(dir);
}

Test(model, make_layer_rejects_huge_tokens_first, .timeout = 30)
{
    char dir[64], out[96];
    make_temp_dir(dir, sizeof dir);
    snprintf(out, sizeof out, "%s/layer", dir);
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"make-layer", "--out", out, "--family", "mixtral",
                                 "--hidden", "1048576", "--ffn", "1", "--experts", "1",
                                 "--top-k", "1", "--tokens", "1048576", NULL});
    EXPECT_BAD_INPUT(o, "--tokens", "1048576", "GiB");
    cr_assert_neq(access(out, F_OK), 0, "make-layer created %s before rejecting", out);
    remove_tree(dir);
}

/* Returns the number of entries of `dir` whose name contains `part`. */
static int count_entries(const char *dir, const char *part)
{
    DIR *stream = opendir(dir);
    cr_assert_not_null(stream, "open %s", dir);
    int count = 0;
    struct dirent *entry;
    while ((entry = readdir(stream)) != NULL)
        count += strstr(entry->d_name, part) != NULL;
    closedir(stream);
    return count;
}

Test(model, make_layer_file_size_limit_leaves_nothing, .timeout = 30)
{
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    /* make-layer inherits the limit, which its 25 MB of weights exceed.
     * Killed by SIGXFSZ, it would leave a partial temporary file. SIGXFSZ
     * keeps its default action here, because make-layer would inherit
     * SIG_IGN across exec and the test would prove nothing. */
    struct rlimit limit = {64 << 10, 64 << 10};
    cr_assert_eq(setrlimit(RLIMIT_FSIZE, &limit), 0);
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"make-layer", "--out", dir, "--family", "mixtral",
                                 "--hidden", "512", "--ffn", "512", NULL});
    cr_assert_eq(o.status, 3, "status %d: %s", o.status, o.err);
    cr_assert_not_null(strstr(o.err, "model.safetensors"), "%s", o.err);
    cr_assert_not_null(strstr(o.err, "File too large"), "%s", o.err);
    cr_assert_eq(count_entries(dir, ".moe-ep-"), 0, "a temporary file is left in %s", dir);
    remove_tree(dir);
}

Test(model, dump_path_checked_before_run, .timeout = 30)
{
    char dir[64], path[128];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "mixtral");
    struct outcome o;

    /* The same path for --dump and --output: no output file appears. */
    snprintf(path, sizeof path, "%s/same", dir);
    run_model(&o, dir, (const char *[]){"--dump", path, "--output", path, NULL});
    EXPECT_BAD_INPUT(o, "--dump", "--output");
    cr_assert_neq(access(path, F_OK), 0, "the run wrote %s", path);

    /* A file in the middle of the dump path is found before the run. */
    snprintf(path, sizeof path, "%s/config.json/dump", dir);
    run_model(&o, dir, (const char *[]){"--dump", path, NULL});
    EXPECT_BAD_INPUT(o, "--dump", "config.json", "not a directory");
    cr_assert_null(strstr(o.out, "golden check"), "the run went ahead: %s", o.out);
    remove_tree(dir);
}

Test(model, dump_removes_stale_stage_files, .timeout = 60)
{
    char qwen[64], mixtral[64], dump[96], fresh[96];
    make_temp_dir(qwen, sizeof qwen);
    make_temp_dir(mixtral, sizeof mixtral);
    MAKE_LAYER(qwen, "--family", "qwen2_moe");
    MAKE_LAYER(mixtral, "--family", "mixtral");
    snprintf(dump, sizeof dump, "%s/dump", qwen);
    snprintf(fresh, sizeof fresh, "%s/dump", mixtral);
    struct outcome o;

    /* A 4-rank dump with a shared expert, then a 2-rank one without. */
    run_model(&o, qwen, (const char *[]){"--ranks", "4", "--dump", dump, NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    cr_assert_eq(count_entries(dump, "rank3_recv_"), 3);
    run_model(&o, mixtral, (const char *[]){"--ranks", "2", "--dump", dump, NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    cr_assert_eq(count_entries(dump, "rank2_"), 0);
    cr_assert_eq(count_entries(dump, "rank3_"), 0);
    cr_assert_eq(count_entries(dump, "shared_out"), 0);
    cr_assert_eq(count_entries(dump, "rank1_recv_"), 3);

    /* The reused directory compares equal to a fresh dump of the same run. */
    run_model(&o, mixtral, (const char *[]){"--ranks", "2", "--dump", fresh, NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    run_program(&o, NULL, 0, 0, (const char *[]){"compare", dump, fresh, NULL});
    cr_assert_eq(o.status, 0, "%s%s", o.out, o.err);
    remove_tree(qwen);
    remove_tree(mixtral);
}

Test(model, compare_rejects_fifo_and_huge_shape, .timeout = 30)
{
    char dir[64], a[96], b[96], path[160];
    make_temp_dir(dir, sizeof dir);
    snprintf(a, sizeof a, "%s/a", dir);
    snprintf(b, sizeof b, "%s/b", dir);
    cr_assert_eq(mkdir(a, 0700), 0);
    cr_assert_eq(mkdir(b, 0700), 0);
    float one = 1.0f;
    int64_t shape[1] = {1};
    snprintf(path, sizeof path, "%s/output.npy", a);
    cr_assert_eq(moe_npy_write(path, MOE_NPY_F32, 1, shape, &one), 0);
    snprintf(path, sizeof path, "%s/output.npy", b);
    cr_assert_eq(moe_npy_write(path, MOE_NPY_F32, 1, shape, &one), 0);

    /* A FIFO among the stages would block the read forever. */
    snprintf(path, sizeof path, "%s/topk_ids.npy", b);
    cr_assert_eq(mkfifo(path, 0600), 0);
    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"compare", a, b, NULL});
    EXPECT_BAD_INPUT(o, "topk_ids.npy", "not a regular file");
    unlink(path);

    /* A header that declares far more data than memory is bad input. */
    snprintf(path, sizeof path, "%s/output.npy", a);
    const char header[] = "\x93NUMPY\x01\x00\x76\x00{'descr': '<f4', 'fortran_order': False, "
                          "'shape': (1000000000000,), }";
    char file[128];
    memset(file, ' ', sizeof file);
    memcpy(file, header, sizeof header - 1);
    file[127] = '\n';
    write_all(path, file, sizeof file);
    run_program(&o, NULL, 0, 0, (const char *[]){"compare", a, b, NULL});
    EXPECT_BAD_INPUT(o, "output.npy");
    remove_tree(dir);
}

Test(model, config_values_match_reference_rules, .timeout = 30)
{
    char dir[64], path[96];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "deepseek_v3");
    snprintf(path, sizeof path, "%s/config.json", dir);
    struct outcome o;
    edit_file(path, "\"routed_scaling_factor\":\t2.5", "\"routed_scaling_factor\":\t-1");
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "'routed_scaling_factor'", "above 0");
    edit_file(path, "\"routed_scaling_factor\":\t-1", "\"routed_scaling_factor\":\t2.5");
    edit_file(path, "\"first_k_dense_replace\"", "\"first_k_dense_replaced\"");
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "'first_k_dense_replace'", "missing");
    remove_tree(dir);

    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "qwen2_moe");
    snprintf(path, sizeof path, "%s/config.json", dir);
    edit_file(path, "\"shared_expert_intermediate_size\":\t64",
              "\"shared_expert_intermediate_size\":\t0");
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "'shared_expert_intermediate_size' is 0");
    edit_file(path, "\"shared_expert_intermediate_size\":\t0",
              "\"shared_expert_intermediate_size\":\t64");
    edit_file(path, "\"norm_topk_prob\"", "\"norm_topk_probs\"");
    run_model(&o, dir, NULL);
    EXPECT_BAD_INPUT(o, "'norm_topk_prob'", "missing");
    remove_tree(dir);
}

Test(model, float64_input_beyond_float32_exits_2, .timeout = 30)
{
    char dir[64], path[128];
    make_temp_dir(dir, sizeof dir);
    MAKE_LAYER(dir, "--family", "olmoe");
    int64_t shape[2] = {2, 64};
    double values[2 * 64] = {0};
    values[70] = 1e39; /* finite in float64, infinite in float32 */
    snprintf(path, sizeof path, "%s/x.npy", dir);
    cr_assert_eq(moe_npy_write(path, MOE_NPY_F64, 2, shape, values), 0);
    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"run", "--model", dir, "--input", path, NULL});
    EXPECT_BAD_INPUT(o, "x.npy", "element 70", "range of float32");

    /* An infinity in the file stays an infinity: it is a value, not an
     * overflow of the conversion. */
    values[70] = INFINITY;
    cr_assert_eq(moe_npy_write(path, MOE_NPY_F64, 2, shape, values), 0);
    run_program(&o, NULL, 0, 0, (const char *[]){"run", "--model", dir, "--input", path, NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);
    remove_tree(dir);
}

Test(model, make_layer_rejects_more_shards_than_tensors, .timeout = 30)
{
    char dir[64];
    make_temp_dir(dir, sizeof dir);
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"make-layer", "--family", "mixtral", "--out", dir,
                                 "--shards", "999", NULL});
    EXPECT_BAD_INPUT(o, "--shards", "999", "25 tensors");
    remove_tree(dir);
}
