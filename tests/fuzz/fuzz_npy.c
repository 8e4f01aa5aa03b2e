/*
 * fuzz_npy.c - libFuzzer target for the .npy reader.
 *
 * Each input is a whole .npy file. It goes to moe_npy_parse_header() as a
 * buffer, and as a file to moe_npy_read(), moe_npy_read_as_f32() and
 * moe_npy_read_f32_limited(). Besides crashes and sanitizer reports, the
 * target aborts when a reader breaks its contract: a failure without a
 * message or with the output not cleared, or a success whose shape does
 * not match its element count. Every element of a successful read is
 * loaded, so AddressSanitizer reports a buffer shorter than the shape.
 */
#include "fuzz_input.h"
#include "moe_error.h"
#include "moe_npy.h"

#include <stdint.h>
#include <stdlib.h>

/* Maximum array size a read may allocate. Inputs are a few KiB, so any larger
 * request must have been rejected against the file size already. */
#define MAX_READ_BYTES (64u << 20)

static void check_failure(const char *reader, int rc)
{
    if (rc >= 0)
        fuzz_contract_failed(reader, "returned a positive value");
    if (moe_error_message()[0] == '\0')
        fuzz_contract_failed(reader, "failed without a message");
}

static void check_header(const uint8_t *data, size_t size)
{
    struct moe_npy_header header;
    moe_error_clear();
    int rc = moe_npy_parse_header(data, size, "fuzz input", &header);
    if (rc) {
        check_failure("moe_npy_parse_header", rc);
        return;
    }
    if (header.ndim < 0 || header.ndim > MOE_NPY_MAX_DIMS)
        fuzz_contract_failed("moe_npy_parse_header", "ndim out of range");
    for (int i = 0; i < header.ndim; i++)
        if (header.shape[i] < 0)
            fuzz_contract_failed("moe_npy_parse_header", "negative dimension");
    if (header.data_offset > size)
        fuzz_contract_failed("moe_npy_parse_header", "data offset past the input");
    if (memchr(header.descr, '\0', sizeof header.descr) == NULL)
        fuzz_contract_failed("moe_npy_parse_header", "descr not terminated");
}

/* Sums the bytes so that every byte is loaded. */
static uint64_t touch(const void *data, uint64_t bytes)
{
    const uint8_t *p = data;
    uint64_t sum = 0;
    for (uint64_t i = 0; i < bytes; i++)
        sum += p[i];
    return sum;
}

static void check_read(const char *path)
{
    struct moe_npy_array array;
    moe_error_clear();
    int rc = moe_npy_read(path, MAX_READ_BYTES, &array);
    if (rc) {
        check_failure("moe_npy_read", rc);
        if (array.data || array.count || array.ndim)
            fuzz_contract_failed("moe_npy_read", "failed without clearing *out");
        return;
    }
    int64_t count = 1;
    for (int i = 0; i < array.ndim; i++)
        count *= array.shape[i];
    if (array.ndim < 0 || array.ndim > MOE_NPY_MAX_DIMS || count != array.count)
        fuzz_contract_failed("moe_npy_read", "shape and count disagree");
    if (!array.data)
        fuzz_contract_failed("moe_npy_read", "succeeded with NULL data");
    touch(array.data, (uint64_t)array.count * moe_npy_dtype_size(array.dtype));
    moe_npy_array_free(&array);
}

/* Runs one of the two float32 readers, which share a signature. */
static void check_read_f32(const char *reader,
                           int (*read)(const char *, uint64_t, float **,
                                       int64_t *, int64_t *),
                           const char *path)
{
    float *values = NULL;
    int64_t rows = -1, cols = -1;
    moe_error_clear();
    int rc = read(path, MAX_READ_BYTES, &values, &rows, &cols);
    if (rc) {
        check_failure(reader, rc);
        if (values || rows || cols)
            fuzz_contract_failed(reader, "failed without clearing its outputs");
        return;
    }
    if (!values || rows < 0 || cols < 0)
        fuzz_contract_failed(reader, "succeeded with NULL data or a negative shape");
    touch(values, (uint64_t)rows * (uint64_t)cols * sizeof(float));
    free(values);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct fuzz_file file;
    if (file.path[0] == '\0')
        fuzz_file_open(&file, NULL);

    check_header(data, size);
    fuzz_file_write(&file, data, size);
    check_read(file.path);
    check_read_f32("moe_npy_read_as_f32", moe_npy_read_as_f32, file.path);
    check_read_f32("moe_npy_read_f32_limited", moe_npy_read_f32_limited,
                   file.path);
    return 0;
}
