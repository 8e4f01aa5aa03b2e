/*
 * fuzz_safetensors.c - libFuzzer target for the safetensors header reader
 * and the shard index reader.
 *
 * Each input is tried twice: as a whole model.safetensors file, and as a
 * model.safetensors.index.json next to two fixed shards, a.safetensors
 * with tensor "a" (F32, 2 x 3) and b.safetensors with tensor "b" (BF16,
 * 4). Both are opened with moe_st_open_model(), which validates the
 * header or the index. When the file opens,
 * the target looks up the tensor names the seeds use and reads each one
 * that exists with moe_st_read_f32(). It reads them first with the default
 * FP8 block size and then with a small one taken from the input. So the
 * offsets and shapes the header declares meet the real data. Besides
 * crashes and sanitizer reports, the target aborts on a failure without a
 * message and on a lookup that returns a shape outside the documented
 * limits.
 */
#include "fuzz_input.h"
#include "moe_error.h"
#include "moe_safetensors.h"

#include <stdint.h>
#include <stdlib.h>

/* Maximum tensor size the target reads, in elements. Inputs are a few
 * KiB. */
#define MAX_READ_ELEMENTS (1 << 20)

/* The names in the seed corpus; the fuzzer keeps them when it mutates. */
static const char *const tensor_names[] = {"a", "b", "w", "w_scale_inv", "x.y"};

static void check_failure(const char *reader, int rc)
{
    if (rc >= 0)
        fuzz_contract_failed(reader, "returned a positive value");
    if (moe_error_message()[0] == '\0')
        fuzz_contract_failed(reader, "failed without a message");
}

static void read_tensor(struct moe_st_model *model, const char *name)
{
    struct moe_st_info info;
    moe_error_clear();
    int rc = moe_st_find(model, name, &info);
    if (rc) {
        check_failure("moe_st_find", rc);
        return;
    }
    if (info.ndim < 0 || info.ndim > MOE_ST_MAX_DIMS)
        fuzz_contract_failed("moe_st_find", "ndim out of range");
    int64_t count = 1;
    for (int i = 0; i < info.ndim; i++) {
        if (info.shape[i] < 0)
            fuzz_contract_failed("moe_st_find", "negative dimension");
        if (info.shape[i] > MAX_READ_ELEMENTS)
            return;
        count *= info.shape[i];
        if (count > MAX_READ_ELEMENTS)
            return;
    }

    /* Exactly the size the shape gives, so AddressSanitizer reports a write
     * past it. */
    float *dst = malloc((size_t)count * sizeof(float) + (count == 0));
    if (!dst)
        fuzz_contract_failed("harness", "out of memory");
    moe_error_clear();
    rc = moe_st_read_f32(model, name, info.ndim, info.shape, dst);
    if (rc)
        check_failure("moe_st_read_f32", rc);
    free(dst);
}

/* Opens the model in `dir` and reads every tensor the seeds name, with two
 * FP8 block sizes. */
static void fuzz_model(const char *dir, const uint8_t *data, size_t size)
{
    struct moe_st_model *model = NULL;
    moe_error_clear();
    int rc = moe_st_open_model(dir, &model);
    if (rc) {
        check_failure("moe_st_open_model", rc);
        if (model)
            fuzz_contract_failed("moe_st_open_model", "failed but set *out");
        return;
    }

    size_t names = sizeof tensor_names / sizeof tensor_names[0];
    for (size_t i = 0; i < names; i++)
        read_tensor(model, tensor_names[i]);

    /* Block sizes of 1 to 4 make several scale blocks even in tiny
     * tensors. The last input bytes pick them. */
    int64_t rows = 1 + (size > 0 ? data[size - 1] % 4 : 0);
    int64_t cols = 1 + (size > 1 ? data[size - 2] % 4 : 0);
    moe_st_set_fp8_block(model, rows, cols);
    for (size_t i = 0; i < names; i++)
        read_tensor(model, tensor_names[i]);

    moe_st_close(model);
}

/* Writes the two shards that the index seeds name. */
static void add_shards(struct fuzz_file *index)
{
    static const float a[6] = {1, 2, 3, -4, 0.5f, 1e-3f};
    static const uint16_t b[4] = {0x3f80, 0xc000, 0x4049, 0};
    const struct moe_st_tensor_out tensors[2] = {
        {.name = "a", .dtype = MOE_DTYPE_F32, .ndim = 2, .shape = {2, 3}, .data = a},
        {.name = "b", .dtype = MOE_DTYPE_BF16, .ndim = 1, .shape = {4}, .data = b},
    };
    const char *files[2] = {"a.safetensors", "b.safetensors"};
    for (int i = 0; i < 2; i++) {
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", index->dir, files[i]);
        if (moe_st_write(path, &tensors[i], 1, "pt") != 0) {
            fprintf(stderr, "fuzz harness setup: %s\n", moe_error_message());
            abort();
        }
        fuzz_remove_at_exit(path);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct fuzz_file single, index;
    if (single.path[0] == '\0') {
        fuzz_file_open(&single, "model.safetensors");
        fuzz_file_open(&index, "model.safetensors.index.json");
        add_shards(&index);
    }

    fuzz_file_write(&single, data, size);
    fuzz_model(single.dir, data, size);
    fuzz_file_write(&index, data, size);
    fuzz_model(index.dir, data, size);
    return 0;
}
