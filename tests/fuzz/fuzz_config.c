/*
 * fuzz_config.c - libFuzzer target for the config.json reader.
 *
 * Each input is a whole config.json, read with moe_model_read_config().
 * When it is accepted, the target also queries which layers are MoE layers
 * and builds the layer shape, which use the fields the reader accepted. Besides
 * crashes and sanitizer reports, the target aborts on a failure without a
 * message and on an accepted config without a family.
 */
#include "fuzz_input.h"
#include "moe_error.h"
#include "moe_model.h"

#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct fuzz_file file;
    if (file.path[0] == '\0')
        fuzz_file_open(&file, "config.json");
    fuzz_file_write(&file, data, size);

    struct moe_model_config config;
    moe_error_clear();
    int rc = moe_model_read_config(file.dir, &config);
    if (rc) {
        if (rc > 0)
            fuzz_contract_failed("moe_model_read_config", "returned a positive value");
        if (moe_error_message()[0] == '\0')
            fuzz_contract_failed("moe_model_read_config", "failed without a message");
        return 0;
    }
    if (!config.family)
        fuzz_contract_failed("moe_model_read_config", "accepted a config without a family");

    int64_t first = moe_model_first_moe_layer(&config);
    if (first >= config.layers)
        fuzz_contract_failed("moe_model_first_moe_layer", "returned a layer past the last");
    int64_t layers = config.layers < 256 ? config.layers : 256;
    for (int64_t layer = -1; layer <= layers; layer++)
        moe_model_is_moe_layer(&config, layer);

    struct moe_shape shape;
    moe_model_shape(&config, 16, &shape);
    moe_model_config_free(&config);
    return 0;
}
