/*
 * moe_file.h - writing an output file so that a failure loses nothing.
 */
#ifndef MOE_FILE_H
#define MOE_FILE_H

#include <stddef.h>

/* One piece of the bytes to write. */
struct moe_file_part {
    const void *data;
    size_t bytes;
};

/* Writes the parts, in order, as the contents of `path`.
 *   - A regular file, new or existing, is written to a temporary file in
 *     the same directory, synced and renamed over `path`, so a failure
 *     leaves the old contents and no partial file behind.
 *   - A symbolic link is followed, and its target is replaced the same way.
 *   - A device or FIFO (/dev/null, a pipe) is opened and written directly.
 *   - A directory is rejected with -EINVAL.
 * Returns 0, -EINVAL, or -errno with a message that names `path` and the
 * failed step. */
int moe_write_file(const char *path, const struct moe_file_part *parts,
                   int count);

#endif
