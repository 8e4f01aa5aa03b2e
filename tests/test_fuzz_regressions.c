/*
 * test_fuzz_regressions.c - inputs on which a fuzz target of tests/fuzz
 * found a defect, replayed through the same calls in the normal suite,
 * with the same defect where a review found it elsewhere.
 *
 * Each test names the target and the defect. Some defects are undefined
 * behaviour that only UndefinedBehaviorSanitizer reports, so their test
 * fails only in `make sanitize`. The normal build checks the results.
 */
#include "moe_error.h"
#include "moe_safetensors.h"
#include "test_util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define TEST_TIMEOUT_S 30

/* Writes bytes to DIR/name in a new temporary directory; returns DIR. */
static char *write_in_temp_dir(const char *name, const void *bytes, size_t size)
{
    char *dir = strdup("/tmp/moe-ep-fuzz-regression-XXXXXX");
    cr_assert_not_null(dir);
    cr_assert_not_null(mkdtemp(dir), "mkdtemp failed");
    char path[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f, "cannot create %s", path);
    cr_assert_eq(fwrite(bytes, 1, size, f), size);
    cr_assert_eq(fclose(f), 0);
    return dir;
}

static void remove_temp_dir(char *dir, const char *name)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    unlink(path);
    rmdir(dir);
    free(dir);
}

/* fuzz_safetensors: a header with no tensors ("{}" padded with spaces).
 * Looking up a name passed the NULL tensor table to bsearch(), which
 * UBSan reports as a null pointer passed to a nonnull argument. */
Test(fuzz_regressions, safetensors_empty_header_lookup, .timeout = TEST_TIMEOUT_S)
{
    static const unsigned char input[] = {
        0x08, 0, 0, 0, 0, 0, 0, 0, '{', '}', ' ', ' ', ' ', ' ', ' ', ' ',
    };
    char *dir = write_in_temp_dir("model.safetensors", input, sizeof input);
    struct moe_st_model *model = NULL;
    int rc = moe_st_open_model(dir, &model);
    /* The file is mapped now; removing it first leaves nothing behind if
     * the sanitizer ends the test below. */
    remove_temp_dir(dir, "model.safetensors");
    cr_assert_eq(rc, 0, "an empty header was rejected: %s", moe_error_message());

    struct moe_st_info info;
    moe_error_clear();
    rc = moe_st_find(model, "a", &info);
    cr_expect_eq(rc, -ENOENT, "looking up a tensor returned %d", rc);
    cr_expect(strstr(moe_error_message(), "'a'") != NULL,
              "the message does not name the tensor: \"%s\"", moe_error_message());
    float value;
    const int64_t shape[1] = {1};
    cr_expect_eq(moe_st_read_f32(model, "a", 1, shape, &value), -ENOENT);

    moe_st_close(model);
}

/* fuzz_safetensors, index variant: an index whose weight_map is empty.
 * Opening it passed the NULL entry table to qsort(), and a lookup passed
 * it to bsearch(). Both are null pointers to nonnull arguments. */
Test(fuzz_regressions, safetensors_empty_weight_map, .timeout = TEST_TIMEOUT_S)
{
    static const char input[] = "{\"weight_map\": {}}\n";
    const char *name = "model.safetensors.index.json";
    char *dir = write_in_temp_dir(name, input, sizeof input - 1);
    struct moe_st_model *model = NULL;
    int rc = moe_st_open_model(dir, &model);
    remove_temp_dir(dir, name); /* the index is parsed at open */
    cr_assert_eq(rc, 0, "an empty weight_map was rejected: %s",
                 moe_error_message());

    struct moe_st_info info;
    moe_error_clear();
    rc = moe_st_find(model, "a", &info);
    cr_expect_eq(rc, -ENOENT, "looking up a tensor returned %d", rc);
    cr_expect(strstr(moe_error_message(), "weight_map") != NULL,
              "the message does not name the weight_map: \"%s\"",
              moe_error_message());

    moe_st_close(model);
}

