/*
 * 09_load_layer.c - load one MoE layer of a Hugging Face checkpoint, run
 * it, and compare the output with PyTorch's.
 *
 * Each directory under data/layers holds a tiny layer in its family's real
 * format (config.json and safetensors), 32 input tokens, and the output and
 * top-k expert ids that tools/torch_reference.py computed in float64 from
 * the family's published math. This example reads the config, loads the
 * first MoE layer (converting every weight to float32), runs the golden
 * path on the tokens, and compares:
 *   - the top-k ids, which must be equal, because `make golden` rejects a
 *     layer whose K-th and (K+1)-th selection scores are closer than 1e-5,
 *     far above the float32 rounding of a score (about 1e-7);
 *   - the output, within |ours - ref| <= 1e-5 |ref| + 1e-5 max|ref|. moe-ep
 *     computes in float32 and the reference in float64 from the same
 *     weights, so they differ by float32 rounding. The absolute term scales
 *     with the output, because a value near zero comes from a sum that
 *     cancels, where the relative error has no bound.
 *
 * Usage: 09_load_layer [DIR]   (default data/layers/mixtral)
 */
#include "moe_error.h"
#include "moe_layer.h"
#include "moe_model.h"
#include "moe_npy.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOLERANCE 1e-5
#define MAX_FILE_BYTES (1ULL << 30)

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "data/layers/mixtral";
    if (argc > 2) {
        fprintf(stderr, "usage: 09_load_layer [DIR]\n");
        return 2;
    }
    moe_blas_init();
    char path[4096];
    struct moe_model_config config;
    struct moe_weights layer = {0};
    struct moe_npy_array ids = {0}, expected = {0};
    struct moe_golden_info info = {0};
    float *tokens = NULL, *out = NULL;
    int64_t T = 0, H = 0, layer_index = -1;
    int rc = moe_model_read_config(dir, &config), status = 2;
    if (rc) {
        fprintf(stderr, "09_load_layer: invalid DIR '%s': %s\n", dir, moe_error_message());
        return rc == -EINVAL ? 2 : 3;
    }

    layer_index = moe_model_first_moe_layer(&config);
    snprintf(path, sizeof path, "%s/tokens.npy", dir);
    if ((rc = moe_npy_read_as_f32(path, MAX_FILE_BYTES, &tokens, &T, &H)) == 0)
        rc = moe_model_load_layer(dir, &config, layer_index, T, &layer);
    if (rc == 0 && (out = malloc((size_t)(T * H) * sizeof(float))) == NULL)
        rc = moe_fail(-ENOMEM, "out of memory for the output");
    if (rc == 0)
        rc = moe_golden_forward(&layer, tokens, out, &info);
    if (rc == 0) {
        snprintf(path, sizeof path, "%s/expected_topk_ids.npy", dir);
        rc = moe_npy_read(path, MAX_FILE_BYTES, &ids);
    }
    if (rc == 0) {
        snprintf(path, sizeof path, "%s/expected_output.npy", dir);
        rc = moe_npy_read(path, MAX_FILE_BYTES, &expected);
    }
    const struct moe_shape *s = &layer.shape;
    if (rc == 0 && (ids.dtype != MOE_NPY_I32 || ids.count != T * s->top_k ||
                    expected.dtype != MOE_NPY_F64 || expected.count != T * H))
        rc = moe_fail(-EINVAL, "the expected files of '%s' do not match the layer: "
                      "expected (%lld, %lld) int32 ids and (%lld, %lld) float64 outputs",
                      dir, (long long)T, (long long)s->top_k, (long long)T, (long long)H);
    if (rc) {
        /* Every file here comes from DIR, so only memory is a runtime failure. */
        fprintf(stderr, "09_load_layer: %s\n", moe_error_message());
        status = rc == -ENOMEM ? 3 : 2;
        goto out;
    }

    printf("09_load_layer: %s, family %s, layer %lld\n", dir, config.family->model_type,
           (long long)layer_index);
    printf("tokens %lld, hidden %lld, ffn %lld, shared ffn %lld, experts %lld, top-k %lld\n",
           (long long)T, (long long)H, (long long)s->ffn, (long long)s->shared_ffn,
           (long long)s->experts, (long long)s->top_k);
    int ids_equal = memcmp(ids.data, info.expert_ids, (size_t)ids.count * 4) == 0;
    printf("top-k ids: %s the reference's (%lld ids)\n",
           ids_equal ? "equal to" : "DIFFERENT from", (long long)ids.count);

    const double *ref = expected.data;
    double scale = 0.0, worst = 0.0;
    int64_t bad = -1;
    for (int64_t i = 0; i < T * H; i++)
        scale = fmax(scale, fabs(ref[i]));
    for (int64_t i = 0; i < T * H; i++) {
        double error = fabs((double)out[i] - ref[i]);
        worst = fmax(worst, error);
        if (bad < 0 && !(error <= TOLERANCE * fabs(ref[i]) + TOLERANCE * scale))
            bad = i;
    }
    printf("output: max |ours - reference| = %.3g, max|reference| = %.3g, ratio %.3g\n",
           worst, scale, worst / scale);
    if (bad >= 0)
        printf("FAILED: output value %lld is %.9g, the reference %.9g\n", (long long)bad,
               (double)out[bad], ref[bad]);
    else
        printf("output: every value within 1e-5 relative + 1e-5 of max|reference|\n");
    status = ids_equal && bad < 0 && scale > 0.0 ? 0 : 1;

out:
    moe_golden_info_free(&info);
    moe_npy_array_free(&ids);
    moe_npy_array_free(&expected);
    moe_weights_free(&layer);
    moe_model_config_free(&config);
    free(tokens);
    free(out);
    return status;
}
