/*
 * test_aux.c - the router's auxiliary losses of every committed layer in
 * data/layers against the values tools/torch_reference.py wrote into each
 * expected_aux_losses.json, and the reading of the config's loss
 * coefficients.
 */
#define _XOPEN_SOURCE 700 /* nftw */
#define _DEFAULT_SOURCE
#include "moe_aux.h"
#include "moe_error.h"
#include "moe_model.h"
#include "moe_npy.h"
#include "test_program.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <ftw.h>

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void remove_tree(const char *dir)
{
    nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f, "create %s", path);
    cr_assert_eq(fputs(text, f) >= 0, 1);
    cr_assert_eq(fclose(f), 0);
}

/* Returns number field `name` of object, or NaN when it is null. */
static double json_number_or_nan(const cJSON *object, const char *name, const char *path)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(object, name);
    cr_assert_not_null(item, "%s has no field '%s'", path, name);
    if (cJSON_IsNull(item))
        return NAN;
    cr_assert(cJSON_IsNumber(item), "%s: field '%s' is not a number", path, name);
    return item->valuedouble;
}

/* Asserts that a coefficient is the same double as the reference's, or
 * NaN where the reference has null. Both read the same decimal text from
 * config.json and round it once to double. */
static void expect_same_coefficient(double value, double expected, const char *field)
{
    if (isnan(expected))
        cr_assert(isnan(value), "%s is %.17g, expected NaN (absent)", field, value);
    else
        cr_assert_eq(value, expected, "%s is %.17g, expected %.17g", field, value, expected);
}

/* Asserts |value - expected| <= rtol * |expected|, or both NaN. */
static void expect_loss_close(double value, double expected, double rtol, const char *layer,
                              const char *loss)
{
    if (isnan(expected)) {
        cr_assert(isnan(value), "%s: %s is %.17g, expected NaN", layer, loss, value);
        return;
    }
    double error = fabs(value - expected);
    cr_assert(error <= rtol * fabs(expected), "%s: %s is %.17g, reference %.17g, "
              "relative error %.3g above %g", layer, loss, value, expected,
              error / fabs(expected), rtol);
    cr_log_info("%s: %s relative error %.3g", layer, loss, error / fabs(expected));
}

/* Loads data/layers/NAME in this process, runs the golden path on its
 * tokens.npy, computes the losses from the whole-batch router stats, and
 * compares them with expected_aux_losses.json.
 *
 * Tolerance: 1e-6 relative. moe-ep computes the logits, the softmax and
 * logsumexp in float32 and sums the per-token terms exactly. The reference
 * computes everything in float64 from the same float32 weights and
 * tokens. The assignment counts f_e agree exactly, because the selected
 * experts must match (a selection gap of at least 8e-5 in every layer).
 * What is left is the float32 rounding of each token's terms, about 1e-7
 * relative each, which mostly cancels in the means over 32 tokens: the
 * largest error measured over the six layers is 1.9e-8, a margin of 50. */
static void check_layer_losses(const char *name)
{
    char dir[128], path[192];
    snprintf(dir, sizeof dir, "data/layers/%s", name);

    struct moe_model_config config;
    cr_assert_eq(moe_model_read_config(dir, &config), 0, "%s", moe_error_message());
    float *x;
    int64_t tokens, hidden;
    snprintf(path, sizeof path, "%s/tokens.npy", dir);
    cr_assert_eq(moe_npy_read_f32(path, &x, &tokens, &hidden), 0, "%s", moe_error_message());
    struct moe_weights w;
    int64_t layer = moe_model_first_moe_layer(&config);
    cr_assert_eq(moe_model_load_layer(dir, &config, layer, tokens, &w), 0, "%s",
                 moe_error_message());
    moe_model_config_free(&config);

    moe_blas_init();
    float *out = malloc((size_t)(tokens * hidden) * sizeof(float));
    struct moe_golden_info info = {0};
    cr_assert_eq(moe_golden_forward(&w, x, out, &info), 0, "%s", moe_error_message());
    struct moe_aux_losses losses;
    moe_aux_losses_compute(info.router_stats, w.shape.experts, w.shape.top_k,
                           w.aux_loss_coef, w.z_loss_coef, &losses);

    snprintf(path, sizeof path, "%s/expected_aux_losses.json", dir);
    static char text[4096];
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "open %s", path);
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = '\0';
    cJSON *json = cJSON_Parse(text);
    cr_assert_not_null(json, "%s is not JSON", path);

    expect_same_coefficient(losses.aux_loss_coef,
                            json_number_or_nan(json, "router_aux_loss_coef", path),
                            "router_aux_loss_coef");
    expect_same_coefficient(losses.z_loss_coef,
                            json_number_or_nan(json, "router_z_loss_coef", path),
                            "router_z_loss_coef");
    expect_loss_close(losses.load_balance, json_number_or_nan(json, "load_balance", path),
                      1e-6, name, "load-balancing loss");
    expect_loss_close(losses.z_loss, json_number_or_nan(json, "z_loss", path), 1e-6, name,
                      "z-loss");
    expect_loss_close(losses.load_balance_scaled,
                      json_number_or_nan(json, "load_balance_scaled", path), 1e-6, name,
                      "scaled load-balancing loss");
    expect_loss_close(losses.z_loss_scaled, json_number_or_nan(json, "z_loss_scaled", path),
                      1e-6, name, "scaled z-loss");

    cJSON_Delete(json);
    moe_golden_info_free(&info);
    moe_weights_free(&w);
    free(out);
    free(x);
}

Test(aux, mixtral_matches_torch)
{
    check_layer_losses("mixtral");
}

Test(aux, qwen2_moe_matches_torch)
{
    check_layer_losses("qwen2_moe");
}

Test(aux, qwen3_moe_matches_torch)
{
    check_layer_losses("qwen3_moe");
}

Test(aux, olmoe_matches_torch)
{
    check_layer_losses("olmoe");
}

Test(aux, deepseek_v3_matches_torch)
{
    check_layer_losses("deepseek_v3");
}

Test(aux, switch_transformers_matches_torch)
{
    check_layer_losses("switch_transformers");
}

/* ---- coefficients ---------------------------------------------------------- */

static const char mixtral_config[] =
    "{\"model_type\": \"mixtral\", \"num_hidden_layers\": 1, \"hidden_size\": 8, "
    "\"intermediate_size\": 16, \"num_local_experts\": 4, \"num_experts_per_tok\": 2%s}\n";

/* Writes a mixtral config.json with the given extra fields into dir and
 * reads it. */
static int read_mixtral_config(const char *dir, const char *fields,
                               struct moe_model_config *config)
{
    char path[96], text[1024];
    snprintf(path, sizeof path, "%s/config.json", dir);
    snprintf(text, sizeof text, mixtral_config, fields);
    write_text(path, text);
    return moe_model_read_config(dir, config);
}

Test(aux, coefficients_read_for_every_family)
{
    char dir[] = "/tmp/moe-ep-aux-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    struct moe_model_config config;

    cr_assert_eq(read_mixtral_config(dir, "", &config), 0, "%s", moe_error_message());
    cr_assert(isnan(config.aux_loss_coef));
    cr_assert(isnan(config.z_loss_coef));
    moe_model_config_free(&config);

    /* Mixtral-8x7B's published router_aux_loss_coef */
    cr_assert_eq(read_mixtral_config(dir, ", \"router_aux_loss_coef\": 0.02", &config), 0,
                 "%s", moe_error_message());
    cr_assert_eq(config.aux_loss_coef, 0.02);
    cr_assert(isnan(config.z_loss_coef));
    moe_model_config_free(&config);

    cr_assert_eq(read_mixtral_config(dir, ", \"router_aux_loss_coef\": 0, "
                                          "\"router_z_loss_coef\": 0.001", &config),
                 0, "%s", moe_error_message());
    cr_assert_eq(config.aux_loss_coef, 0.0);
    cr_assert_eq(config.z_loss_coef, 0.001);
    moe_model_config_free(&config);

    /* null counts as absent */
    cr_assert_eq(read_mixtral_config(dir, ", \"router_z_loss_coef\": null", &config), 0,
                 "%s", moe_error_message());
    cr_assert(isnan(config.z_loss_coef));
    moe_model_config_free(&config);

    static const char *const bad[] = {
        ", \"router_aux_loss_coef\": \"0.02\"",
        ", \"router_aux_loss_coef\": -0.5",
        ", \"router_z_loss_coef\": true",
        ", \"router_z_loss_coef\": [0.001]",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cr_assert_eq(read_mixtral_config(dir, bad[i], &config), -EINVAL, "%s accepted",
                     bad[i]);
        const char *field = strstr(bad[i], "router_aux") ? "'router_aux_loss_coef'"
                                                         : "'router_z_loss_coef'";
        cr_assert_not_null(strstr(moe_error_message(), field), "%s: %s", bad[i],
                           moe_error_message());
        cr_assert_not_null(strstr(moe_error_message(), "config.json"), "%s",
                           moe_error_message());
    }
    remove_tree(dir);
}

/* The loaded weights carry the coefficients to the loss report. */
Test(aux, coefficients_reach_the_weights, .timeout = 30)
{
    char dir[] = "/tmp/moe-ep-aux-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"make-layer", "--out", dir, "--family", "olmoe",
                                 "--experts", "4", NULL});
    cr_assert_eq(o.status, 0, "%s", o.err);

    char path[96];
    snprintf(path, sizeof path, "%s/config.json", dir);
    static char original[4096], text[8192];
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f);
    size_t n = fread(original, 1, sizeof original - 1, f);
    fclose(f);
    original[n] = '\0';
    char *brace = strrchr(original, '}');
    cr_assert_not_null(brace);
    *brace = '\0'; /* the object without its closing brace */

    snprintf(text, sizeof text, "%s, \"router_aux_loss_coef\": 0.01, "
             "\"router_z_loss_coef\": 0.002}\n", original);
    write_text(path, text);
    struct moe_model_config config;
    struct moe_weights w;
    cr_assert_eq(moe_model_read_config(dir, &config), 0, "%s", moe_error_message());
    cr_assert_eq(moe_model_load_layer(dir, &config, 0, 5, &w), 0, "%s",
                 moe_error_message());
    cr_assert_eq(w.aux_loss_coef, 0.01);
    cr_assert_eq(w.z_loss_coef, 0.002);
    cr_assert_eq(w.capacity.limit, -1, "olmoe layers are dropless");
    cr_assert_not_null(w.w3, "SwiGLU experts keep their up projection");
    moe_weights_free(&w);
    moe_model_config_free(&config);

    /* A bad coefficient stops `run` with status 2. */
    snprintf(text, sizeof text, "%s, \"router_z_loss_coef\": -1}\n", original);
    write_text(path, text);
    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", "--model", dir, "--tokens", "8", "--ranks", "1",
                                 NULL});
    cr_assert_eq(o.status, 2, "status %d: %s", o.status, o.err);
    cr_assert_not_null(strstr(o.err, "'router_z_loss_coef'"), "%s", o.err);
    remove_tree(dir);
}
