/*
 * test_nonfinite.c - NaN and Inf in the input tokens and in the weights
 * never crash or hang a run, and the golden check compares NaN bit
 * patterns bit for bit. The router follows its NaN policy (moe_layer.h,
 * docs/DESIGN.md). NaN ranks below every number in the selection. A NaN
 * or +Inf logit, or a row of only -Inf, makes every softmax score and
 * weight of its token NaN, and experts 0..K-1 are selected.
 *
 * Everything runs through the moe-ep program with --dump, so the checks
 * read the router's stages as a port would.
 */
#include "moe_error.h"
#include "moe_npy.h"
#include "moe_run.h"
#include "test_program.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <float.h>

static char scratch_dir[64];

static void make_scratch(void)
{
    snprintf(scratch_dir, sizeof scratch_dir, "/tmp/moe-ep-nonfinite-XXXXXX");
    cr_assert_not_null(mkdtemp(scratch_dir), "mkdtemp: %s", strerror(errno));
}

static void remove_scratch(void)
{
    char command[128];
    snprintf(command, sizeof command, "rm -rf '%s'", scratch_dir);
    cr_assert_eq(system(command), 0);
}

static float float_from_bits(uint32_t bits)
{
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static uint32_t bits_of(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return bits;
}

/* The stages of one --dump that the checks read. */
struct dump {
    int64_t tokens, experts, top_k, hidden;
    struct moe_npy_array logits, scores, ids, weights, output;
};

static void read_stage(const char *dir, const char *name, enum moe_npy_dtype dtype,
                       struct moe_npy_array *array)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s.npy", dir, name);
    cr_assert_eq(moe_npy_read(path, UINT64_MAX, array), 0, "%s: %s", path,
                 moe_error_message());
    cr_assert_eq(array->dtype, dtype, "%s has dtype %d", path, (int)array->dtype);
    cr_assert_eq(array->ndim, 2, "%s is not 2-D", path);
}

static void read_dump(const char *dir, struct dump *d)
{
    read_stage(dir, "router_logits", MOE_NPY_F32, &d->logits);
    read_stage(dir, "router_scores", MOE_NPY_F32, &d->scores);
    read_stage(dir, "topk_ids", MOE_NPY_I32, &d->ids);
    read_stage(dir, "topk_weights", MOE_NPY_F32, &d->weights);
    read_stage(dir, "output", MOE_NPY_F32, &d->output);
    d->tokens = d->logits.shape[0];
    d->experts = d->logits.shape[1];
    d->top_k = d->ids.shape[1];
    d->hidden = d->output.shape[1];
}

static void free_dump(struct dump *d)
{
    moe_npy_array_free(&d->logits);
    moe_npy_array_free(&d->scores);
    moe_npy_array_free(&d->ids);
    moe_npy_array_free(&d->weights);
    moe_npy_array_free(&d->output);
}

static float at(const struct moe_npy_array *a, int64_t row, int64_t col)
{
    return ((const float *)a->data)[row * a->shape[1] + col];
}

static int32_t id_at(const struct dump *d, int64_t token, int64_t slot)
{
    return ((const int32_t *)d->ids.data)[token * d->top_k + slot];
}

/* Counts the NaN values in one row of a float array. */
static int64_t nans_in_row(const struct moe_npy_array *a, int64_t row)
{
    int64_t count = 0;
    for (int64_t c = 0; c < a->shape[1]; c++)
        count += isnan(at(a, row, c));
    return count;
}

/* Counts the values of one row that are not finite. */
static int64_t nonfinite_in_row(const struct moe_npy_array *a, int64_t row)
{
    int64_t count = 0;
    for (int64_t c = 0; c < a->shape[1]; c++)
        count += !isfinite(at(a, row, c));
    return count;
}

/* Asserts that the K ids of every token are distinct and in [0, E). */
static void check_ids_valid(const struct dump *d, const char *label)
{
    for (int64_t t = 0; t < d->tokens; t++)
        for (int64_t k = 0; k < d->top_k; k++) {
            int32_t id = id_at(d, t, k);
            cr_assert(id >= 0 && id < d->experts, "%s: token %lld slot %lld has "
                      "expert %d", label, (long long)t, (long long)k, id);
            for (int64_t j = 0; j < k; j++)
                cr_assert_neq(id_at(d, t, j), id, "%s: token %lld selects expert "
                              "%d twice", label, (long long)t, id);
        }
}

/* Asserts the softmax policy for a token whose logits contain a NaN or
 * +Inf, or are all -Inf: every score and weight NaN, experts 0..K-1, and
 * an output row of NaN only. */
static void check_poisoned_token(const struct dump *d, int64_t t, const char *label)
{
    cr_assert_eq(nans_in_row(&d->scores, t), d->experts, "%s: token %lld has "
                 "scores that are not NaN", label, (long long)t);
    cr_assert_eq(nans_in_row(&d->weights, t), d->top_k, "%s: token %lld has "
                 "weights that are not NaN", label, (long long)t);
    for (int64_t k = 0; k < d->top_k; k++)
        cr_assert_eq(id_at(d, t, k), k, "%s: token %lld slot %lld selects expert "
                     "%d, expected %lld", label, (long long)t, (long long)k,
                     id_at(d, t, k), (long long)k);
    cr_assert_eq(nans_in_row(&d->output, t), d->hidden, "%s: token %lld has "
                 "output values that are not NaN", label, (long long)t);
}

/* Runs moe-ep with args and asserts exit status 0 and a bitwise equal
 * golden check. */
static void run_ok(const char *const *args, const char *label)
{
    struct outcome o;
    run_program(&o, NULL, 0, 0, args);
    cr_assert_eq(o.status, 0, "%s: status %d, stderr: %s, stdout tail: %s", label,
                 o.status, o.err, o.out + (strlen(o.out) > 400 ? strlen(o.out) - 400 : 0));
    cr_assert_not_null(strstr(o.out, "golden check: bitwise equal"), "%s: %s", label,
                       o.out);
}

static void read_file_bytes(const char *path, char **data, size_t *size)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "open %s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    *size = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    *data = malloc(*size + 1);
    cr_assert_not_null(*data);
    cr_assert_eq(fread(*data, 1, *size, f), *size);
    fclose(f);
}

/* ---- tokens ------------------------------------------------------------ */

enum { T = 12, H = 8 };

/* The special values put into token rows 1 to 8; rows 0 and 9 to 11 stay
 * finite. */
static const uint32_t TOKEN_SPECIALS[] = {
    0x7fc00000u, /* row 1: the default quiet NaN */
    0xffc00000u, /* row 2: a negative quiet NaN, as x86 makes from 0 * inf */
    0x7fc12345u, /* row 3: a quiet NaN with a payload */
    0x7f800001u, /* row 4: a signalling NaN */
    0x7f800000u, /* row 5: +Inf */
    0xff800000u, /* row 6: -Inf */
};

/* Writes (T, H) float32 tokens with NaN and Inf in some rows. Row 7 is all
 * NaN, and row 8 contains FLT_MAX, whose products overflow to Inf. */
static void write_tokens(const char *path, float *tokens)
{
    for (int64_t i = 0; i < T * H; i++)
        tokens[i] = (float)((i * 37) % 19) / 19.0f - 0.5f;
    for (int r = 0; r < 6; r++)
        tokens[(r + 1) * H + 3] = float_from_bits(TOKEN_SPECIALS[r]);
    for (int c = 0; c < H; c++)
        tokens[7 * H + c] = NAN;
    tokens[8 * H + 2] = FLT_MAX;
    cr_assert_eq(moe_npy_write_f32(path, tokens, T, H), 0, "%s", moe_error_message());
}

Test(nonfinite, tokens_follow_nan_policy, .timeout = 120, .init = make_scratch,
     .fini = remove_scratch)
{
    char input[128], dump_dir[128], output[128], first_output[128];
    float tokens[T * H];
    snprintf(input, sizeof input, "%s/tokens.npy", scratch_dir);
    write_tokens(input, tokens);

    for (int ranks = 1; ranks <= 3; ranks++) {
        char ranks_text[8], label[64];
        snprintf(ranks_text, sizeof ranks_text, "%d", ranks);
        snprintf(label, sizeof label, "NaN and Inf tokens on %d ranks", ranks);
        snprintf(dump_dir, sizeof dump_dir, "%s/dump%d", scratch_dir, ranks);
        snprintf(output, sizeof output, "%s/out%d.npy", scratch_dir, ranks);
        run_ok((const char *[]){"run", "--input", input, "--ranks", ranks_text,
                                "--experts", "4", "--ffn", "8", "--dump", dump_dir,
                                "--output", output, NULL},
               label);

        struct dump d;
        read_dump(dump_dir, &d);
        check_ids_valid(&d, label);
        /* Rows 1-4 and 7 have a NaN, so every logit is NaN. Rows 5 and 6
         * have an infinity, which makes each logit +Inf, -Inf or NaN. */
        for (int64_t t = 1; t <= 7; t++) {
            cr_assert_eq(nonfinite_in_row(&d.logits, t), d.experts, "%s: token "
                         "%lld has finite logits", label, (long long)t);
            check_poisoned_token(&d, t, label);
        }
        for (int64_t t = 1; t <= 4; t++)
            cr_assert_eq(nans_in_row(&d.logits, t), d.experts);
        /* Finite tokens route normally. */
        for (int64_t t = 9; t < T; t++) {
            cr_assert_eq(nonfinite_in_row(&d.scores, t), 0, "%s: token %lld", label,
                         (long long)t);
            cr_assert_eq(nonfinite_in_row(&d.weights, t), 0);
            cr_assert_eq(nonfinite_in_row(&d.output, t), 0);
        }
        free_dump(&d);

        /* The NaN bits of the output, like every other bit, are the same
         * for every rank count. */
        if (ranks == 1) {
            snprintf(first_output, sizeof first_output, "%s", output);
            continue;
        }
        char *a, *b;
        size_t a_size, b_size;
        read_file_bytes(first_output, &a, &a_size);
        read_file_bytes(output, &b, &b_size);
        cr_assert_eq(a_size, b_size);
        cr_assert(memcmp(a, b, a_size) == 0, "%s: output differs from 1 rank", label);
        free(a);
        free(b);
    }
}

Test(nonfinite, float64_and_float16_tokens, .timeout = 60, .init = make_scratch,
     .fini = remove_scratch)
{
    /* NaN and Inf arrive through the float64 and float16 readers too. */
    double wide[T * H];
    uint16_t narrow[T * H];
    for (int64_t i = 0; i < T * H; i++) {
        wide[i] = (double)((i * 7) % 11) / 11.0 - 0.5;
        narrow[i] = 0x3800; /* 0.5 */
    }
    wide[1 * H] = NAN;
    wide[2 * H] = INFINITY;
    wide[3 * H] = -INFINITY;
    narrow[1 * H] = 0x7e00; /* NaN */
    narrow[2 * H] = 0x7c00; /* +Inf */
    narrow[3 * H] = 0xfc00; /* -Inf */

    const int64_t shape[2] = {T, H};
    char path64[128], path16[128];
    snprintf(path64, sizeof path64, "%s/tokens64.npy", scratch_dir);
    snprintf(path16, sizeof path16, "%s/tokens16.npy", scratch_dir);
    cr_assert_eq(moe_npy_write(path64, MOE_NPY_F64, 2, shape, wide), 0);
    cr_assert_eq(moe_npy_write(path16, MOE_NPY_F16, 2, shape, narrow), 0);

    const char *paths[2] = {path64, path16};
    for (int i = 0; i < 2; i++) {
        char dump_dir[128];
        snprintf(dump_dir, sizeof dump_dir, "%s/dump%d", scratch_dir, i);
        run_ok((const char *[]){"run", "--input", paths[i], "--ranks", "3",
                                "--experts", "4", "--ffn", "8", "--dump", dump_dir,
                                NULL},
               paths[i]);
        struct dump d;
        read_dump(dump_dir, &d);
        check_ids_valid(&d, paths[i]);
        for (int64_t t = 1; t <= 3; t++)
            check_poisoned_token(&d, t, paths[i]);
        cr_assert_eq(nonfinite_in_row(&d.output, 0), 0);
        free_dump(&d);
    }
}

Test(nonfinite, nan_output_mismatch_detected, .timeout = 60, .init = make_scratch,
     .fini = remove_scratch)
{
    /* Flipping the lowest bit of a NaN output gives another NaN. The golden
     * check compares bits, so it must report the difference. */
    char input[128];
    float tokens[T * H];
    snprintf(input, sizeof input, "%s/tokens.npy", scratch_dir);
    write_tokens(input, tokens);
    struct outcome o;
    run_program(&o, "MOE_EP_CORRUPT_OUTPUT=8", 0, 0,
                (const char *[]){"run", "--input", input, "--ranks", "2", "--experts",
                                 "4", "--ffn", "8", NULL});
    cr_assert_eq(o.status, 1, "stderr: %s", o.err);
    cr_assert_not_null(strstr(o.out, "MISMATCH at token 1, column 0"), "%s", o.out);
}

Test(nonfinite, compare_bits_on_nan)
{
    /* Two NaNs with different bits differ; the same NaN bits are equal. */
    float actual[3] = {1.0f, float_from_bits(0x7fc00000u), float_from_bits(0x7fc12345u)};
    float expected[3] = {1.0f, float_from_bits(0xffc00000u), float_from_bits(0x7fc12345u)};
    struct moe_compare r;
    moe_compare_bits(actual, expected, 3, &r);
    cr_assert_eq(r.equal, 0);
    cr_assert_eq(r.mismatches, 1);
    cr_assert_eq(r.first, 1);
    cr_assert(isnan(r.max_abs_diff), "max_abs_diff %g, expected NaN", r.max_abs_diff);

    moe_compare_bits(actual + 2, expected + 2, 1, &r);
    cr_assert_eq(r.equal, 1, "identical NaN bits compared unequal");
    cr_assert_eq(bits_of(actual[2]), bits_of(expected[2]));
}

/* ---- weights ----------------------------------------------------------- */

/* Writes `value` over element `index` of float32 tensor `name` in the
 * safetensors file at path, found through the file's JSON header. */
static void patch_tensor(const char *path, const char *name, int64_t index, float value)
{
    char *data;
    size_t size;
    read_file_bytes(path, &data, &size);
    cr_assert_geq(size, 8);
    uint64_t header_bytes = 0;
    for (int i = 7; i >= 0; i--)
        header_bytes = header_bytes << 8 | (uint8_t)data[i];
    cr_assert_leq(header_bytes, size - 8);
    cJSON *header = cJSON_ParseWithLength(data + 8, (size_t)header_bytes);
    cr_assert_not_null(header, "%s: header is not JSON", path);
    cJSON *tensor = cJSON_GetObjectItemCaseSensitive(header, name);
    cr_assert_not_null(tensor, "%s has no tensor %s", path, name);
    cr_assert_str_eq(cJSON_GetObjectItemCaseSensitive(tensor, "dtype")->valuestring, "F32");
    cJSON *offsets = cJSON_GetObjectItemCaseSensitive(tensor, "data_offsets");
    uint64_t begin = (uint64_t)cJSON_GetArrayItem(offsets, 0)->valuedouble;
    uint64_t end = (uint64_t)cJSON_GetArrayItem(offsets, 1)->valuedouble;
    cJSON_Delete(header);
    uint64_t at_byte = 8 + header_bytes + begin + (uint64_t)index * sizeof(float);
    cr_assert_leq(at_byte + sizeof(float), 8 + header_bytes + end, "index %lld is "
                  "beyond %s", (long long)index, name);
    memcpy(data + at_byte, &value, sizeof value);

    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    cr_assert_eq(fwrite(data, 1, size, f), size);
    cr_assert_eq(fclose(f), 0);
    free(data);
}

#define MIXTRAL_TENSOR(suffix) "model.layers.0.block_sparse_moe." suffix

/* Writes a Mixtral layer with H 16, F 8, E 4, K 2 and 12 tokens into
 * scratch_dir/NAME and returns its directory in dir. */
static void make_layer(const char *name, char *dir, size_t size)
{
    snprintf(dir, size, "%s/%s", scratch_dir, name);
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"make-layer", "--family", "mixtral", "--hidden", "16",
                                 "--ffn", "8", "--experts", "4", "--top-k", "2",
                                 "--tokens", "12", "--out", dir, NULL});
    cr_assert_eq(o.status, 0, "make-layer: %s", o.err);
}

/* Runs the layer in dir on `ranks` ranks with its tokens, plus any extra
 * arguments, and reads its dump. */
static void run_layer(const char *dir, int ranks, const char *extra, struct dump *d)
{
    char tokens[160], dump_dir[160], ranks_text[8], label[200];
    snprintf(tokens, sizeof tokens, "%s/tokens.npy", dir);
    snprintf(dump_dir, sizeof dump_dir, "%s/dump%d", dir, ranks);
    snprintf(ranks_text, sizeof ranks_text, "%d", ranks);
    snprintf(label, sizeof label, "%s on %d ranks %s", dir, ranks, extra ? extra : "");
    const char *args[16] = {"run", "--model", dir, "--input", tokens, "--ranks",
                            ranks_text, "--dump", dump_dir, NULL};
    if (extra) {
        args[9] = "--router";
        args[10] = extra;
        args[11] = NULL;
    }
    run_ok(args, label);
    read_dump(dump_dir, d);
    check_ids_valid(d, label);
}

Test(nonfinite, nan_expert_weight_poisons_its_tokens, .timeout = 60,
     .init = make_scratch, .fini = remove_scratch)
{
    /* One NaN in expert 2's w1 makes one of its FFN activations NaN, and
     * w2 spreads it over the whole output row of every token routed to
     * expert 2. The other tokens stay finite. */
    char dir[128], path[160];
    make_layer("nan_w1", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    patch_tensor(path, MIXTRAL_TENSOR("experts.2.w1.weight"), 5, NAN);

    for (int ranks = 2; ranks <= 3; ranks++) {
        struct dump d;
        run_layer(dir, ranks, NULL, &d);
        int routed = 0;
        for (int64_t t = 0; t < d.tokens; t++) {
            int to_expert_2 = 0;
            for (int64_t k = 0; k < d.top_k; k++)
                to_expert_2 |= id_at(&d, t, k) == 2;
            routed += to_expert_2;
            cr_assert_eq(nonfinite_in_row(&d.scores, t), 0, "token %lld", (long long)t);
            cr_assert_eq(nans_in_row(&d.output, t), to_expert_2 ? d.hidden : 0,
                         "%d ranks: token %lld %s expert 2 but has %lld NaN outputs",
                         ranks, (long long)t, to_expert_2 ? "uses" : "does not use",
                         (long long)nans_in_row(&d.output, t));
        }
        cr_assert_gt(routed, 0, "no token was routed to expert 2, so the test "
                     "checks nothing");
        free_dump(&d);
    }
}

Test(nonfinite, inf_gate_weight_follows_softmax_policy, .timeout = 60,
     .init = make_scratch, .fini = remove_scratch)
{
    /* +Inf in gate row 1 makes logit 1 of each token +Inf, -Inf or NaN by
     * the sign of its x[0]. -Inf gives expert 1 a score of 0 and leaves the
     * token finite; +Inf and NaN poison the token. */
    char dir[128], path[160];
    make_layer("inf_gate", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    patch_tensor(path, MIXTRAL_TENSOR("gate.weight"), 1 * 16 + 0, INFINITY);

    struct dump d;
    run_layer(dir, 2, NULL, &d);
    int plus = 0, minus = 0;
    for (int64_t t = 0; t < d.tokens; t++) {
        float logit = at(&d.logits, t, 1);
        if (logit == -INFINITY) {
            minus++;
            cr_assert_eq(bits_of(at(&d.scores, t, 1)), 0u, "token %lld: exp(-inf) "
                         "is not +0", (long long)t);
            for (int64_t k = 0; k < d.top_k; k++)
                cr_assert_neq(id_at(&d, t, k), 1, "token %lld selects expert 1 "
                              "with score 0", (long long)t);
            cr_assert_eq(nonfinite_in_row(&d.weights, t), 0);
            cr_assert_eq(nonfinite_in_row(&d.output, t), 0);
        } else {
            cr_assert(logit == INFINITY || isnan(logit), "token %lld: logit 1 is %g",
                      (long long)t, logit);
            plus++;
            check_poisoned_token(&d, t, "+Inf gate weight");
        }
    }
    cr_assert(plus > 0 && minus > 0, "the tokens give %d infinite logits of each "
              "sign (+%d, -%d); both cases must occur", plus + minus, plus, minus);
    free_dump(&d);
}

Test(nonfinite, sigmoid_router_skips_nan_expert, .timeout = 60, .init = make_scratch,
     .fini = remove_scratch)
{
    /* With sigmoid scores, a NaN logit gives only that expert a NaN score,
     * and NaN ranks below every number: expert 3 is never selected and the
     * tokens stay finite. */
    char dir[128], path[160];
    make_layer("nan_gate", dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    patch_tensor(path, MIXTRAL_TENSOR("gate.weight"), 3 * 16 + 7, NAN);

    for (int ranks = 1; ranks <= 3; ranks += 2) {
        struct dump d;
        run_layer(dir, ranks, "sigmoid", &d);
        for (int64_t t = 0; t < d.tokens; t++) {
            cr_assert(isnan(at(&d.scores, t, 3)), "token %lld: score 3 is %g",
                      (long long)t, at(&d.scores, t, 3));
            for (int64_t k = 0; k < d.top_k; k++)
                cr_assert_neq(id_at(&d, t, k), 3, "token %lld selects the NaN "
                              "expert 3", (long long)t);
            cr_assert_eq(nonfinite_in_row(&d.weights, t), 0, "token %lld", (long long)t);
            cr_assert_eq(nonfinite_in_row(&d.output, t), 0, "token %lld", (long long)t);
        }
        free_dump(&d);
    }
}
