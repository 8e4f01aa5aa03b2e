/*
 * moe_dump.h - the stage dumps of `moe-ep run --dump DIR` and their bitwise
 * check against the golden path.
 *
 * Every file is a .npy array that NumPy and `moe-ep compare` read. The
 * files, in pipeline order, are listed in docs/DUMPS.md with their shapes,
 * dtypes and meaning; moe_diff.h keeps the same order for compare.
 */
#ifndef MOE_DUMP_H
#define MOE_DUMP_H

#include "moe_layer.h"
#include "moe_run.h"

/* Name of each stage, as its file is named without ".npy". */
const char *moe_stage_name(enum moe_stage stage);

/* Returns the number of 4-byte elements (float32 or int32) of a stage
 * for `shape`. */
int64_t moe_stage_count(const struct moe_shape *shape, enum moe_stage stage);

/* Compares every stage the distributed run dumped with the golden path's,
 * bit for bit, into result->stage_check, and sets result->stage_mismatch
 * to the first stage that differs or -1. The received rows are checked
 * against the token rows the layout gives each rank. */
void moe_dump_check(struct moe_run_result *result, const struct moe_golden_info *golden,
                    const float *tokens);

/* Checks before a run that `dir` can become the dump directory: each part
 * of the path that exists is a directory, the deepest existing one is
 * writable, and `output_path` (the --output file, or NULL) is not the same
 * path. Returns 0, or -EINVAL with a message naming --dump. */
int moe_dump_check_dir(const char *dir, const char *output_path);

/* Writes the dump files of `result` into `dir`, creating it and its
 * parents if missing, and removes the stage files that an earlier dump with
 * more ranks or a shared expert left there. Returns 0, or -EINVAL or -errno
 * with a message naming the file. */
int moe_dump_write(const char *dir, const struct moe_run_result *result,
                   const float *tokens);

#endif
