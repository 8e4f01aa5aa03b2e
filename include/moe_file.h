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

/* Resolves `path` through any chain of symbolic links into `target`
 * (`size` bytes), ending at an existing file that is not a link or at the
 * name of a file to create. Returns 0, or -ELOOP, -ENAMETOOLONG or -errno
 * with a message. */
int moe_resolve_output_path(const char *path, char *target, size_t size);

/* Writes the parts, in order, as the contents of `path`.
 *   - A regular file, new or existing, is written to a temporary file in
 *     the same directory, synced and renamed over `path`, so a failure
 *     leaves the old contents and no partial file behind.
 *   - A symbolic link is followed to the end of its chain, and the file
 *     there is replaced the same way. A replaced file keeps its mode.
 *   - A device or FIFO (/dev/null, a pipe) is opened and written directly.
 *   - A directory is rejected with -EINVAL.
 * Returns 0, -EINVAL, or -errno with a message that names `path` and the
 * failed step. */
int moe_write_file(const char *path, const struct moe_file_part *parts,
                   int count);

/* Creates directory `dir` and any missing parents, as mkdir -p does, with
 * mode 0777 less the umask. An existing directory is fine. Returns 0, or
 * -EINVAL with a message naming `flag`, the directory and the part that
 * could not be created or is not a directory. */
int moe_make_directories(const char *flag, const char *dir);

/* Maps an open() or stat() error to a return code: -EINVAL when a wrong
 * path causes it (ENOENT, ENOTDIR, ELOOP, EACCES, EPERM, ENAMETOOLONG,
 * EISDIR, ENXIO), because that is bad input, else -err. */
int moe_path_error_code(int err);

/* Reads the whole regular file `path`, of at most `limit` bytes, into a
 * new NUL-terminated buffer *text of *length bytes, which the caller
 * frees. A FIFO or device is rejected without blocking. Returns 0, -EINVAL
 * for a wrong path, a file that is not regular, larger than `limit` or
 * shrinking during the read, -ENOMEM, or -errno, with a message naming the
 * file. */
int moe_read_small_file(const char *path, size_t limit, char **text, size_t *length);

#endif
