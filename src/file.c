/*
 * file.c - moe_write_file(): replace a file's contents without leaving a
 * partial file behind.
 *
 * Used by the launcher process for --output and --markdown. The temporary
 * file is created with mkstemp (O_EXCL), so an existing file or symbolic
 * link of the same name is never opened by mistake.
 */
#include "moe_file.h"
#include "moe_error.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static int write_all(int fd, const struct moe_file_part *parts, int count)
{
    for (int i = 0; i < count; i++) {
        const char *p = parts[i].data;
        size_t left = parts[i].bytes;
        while (left > 0) {
            ssize_t n = write(fd, p, left);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                return -errno;
            p += n;
            left -= (size_t)n;
        }
    }
    return 0;
}

/* Writes straight into an existing device or FIFO. The open does not
 * block: a FIFO that no process reads fails at once with ENXIO instead of
 * waiting for a reader forever. Writes then block as usual. */
static int write_direct(const char *path, const struct moe_file_part *parts,
                        int count)
{
    int fd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0 && errno == ENXIO)
        return moe_fail(-ENXIO, "%s: no process has the FIFO open for reading",
                        path);
    if (fd < 0)
        return moe_fail(-errno, "%s: open failed: %s", path, strerror(errno));
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0)
        fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    int rc = write_all(fd, parts, count);
    if (close(fd) < 0 && rc == 0)
        rc = -errno;
    if (rc)
        return moe_fail(rc, "%s: write failed: %s", path, strerror(-rc));
    return 0;
}

/* Writes a temporary file beside `target` and renames it over `target`.
 * The new file gets `mode`, the mode of the file it replaces, or the usual
 * 0666 less the umask when mode is -1. */
static int write_replace(const char *target, const char *shown, int mode,
                         const struct moe_file_part *parts, int count)
{
    char temp[PATH_MAX + 32];
    const char *slash = strrchr(target, '/');
    int dir_len = slash ? (int)(slash - target) : 0;
    snprintf(temp, sizeof temp, "%.*s%s.moe-ep-XXXXXX", dir_len, target,
             slash ? "/" : "");

    int fd = mkstemp(temp);
    if (fd < 0)
        return moe_fail(-errno, "%s: creating a temporary file beside it "
                        "failed: %s", shown, strerror(errno));
    /* mkstemp creates mode 0600. */
    if (mode < 0) {
        mode_t mask = umask(0);
        umask(mask);
        mode = (int)(0666 & ~mask);
    }
    const char *step = "write";
    int rc = fchmod(fd, (mode_t)mode) < 0 ? -errno : 0;
    if (rc == 0)
        rc = write_all(fd, parts, count);
    if (rc == 0) {
        step = "fsync";
        rc = fsync(fd) < 0 ? -errno : 0;
    }
    if (close(fd) < 0 && rc == 0) {
        step = "close"; /* close can report a deferred write error */
        rc = -errno;
    }
    if (rc == 0) {
        step = "rename";
        rc = rename(temp, target) < 0 ? -errno : 0;
    }
    if (rc) {
        unlink(temp);
        return moe_fail(rc, "%s: %s failed: %s", shown, step, strerror(-rc));
    }
    return 0;
}

int moe_resolve_output_path(const char *path, char *target, size_t size)
{
    if (snprintf(target, size, "%s", path) >= (int)size)
        return moe_fail(-ENAMETOOLONG, "%s: the path is too long", path);
    /* Follow the chain one link at a time, as the kernel would, so that a
     * link to a file that does not exist yet resolves to that file. */
    for (int depth = 0; depth < 40; depth++) {
        struct stat st;
        if (lstat(target, &st) != 0) {
            if (errno == ENOENT || errno == ENOTDIR)
                return 0; /* the file to create; the caller checks its directory */
            return moe_fail(-errno, "%s: %s", path, strerror(errno));
        }
        if (!S_ISLNK(st.st_mode))
            return 0;

        char linked[PATH_MAX];
        ssize_t n = readlink(target, linked, sizeof linked - 1);
        if (n < 0)
            return moe_fail(-errno, "%s: reading the symbolic link %s failed: %s",
                            path, target, strerror(errno));
        linked[n] = '\0';
        char next[PATH_MAX];
        const char *slash = strrchr(target, '/');
        int written;
        if (linked[0] == '/' || !slash)
            written = snprintf(next, sizeof next, "%s", linked);
        else
            written = snprintf(next, sizeof next, "%.*s/%s",
                               (int)(slash - target), target, linked);
        if (written < 0 || written >= (int)sizeof next || written >= (int)size)
            return moe_fail(-ENAMETOOLONG, "%s: the target of the symbolic link "
                            "is too long", path);
        memcpy(target, next, (size_t)written + 1);
    }
    return moe_fail(-ELOOP, "%s: too many levels of symbolic links", path);
}

int moe_write_file(const char *path, const struct moe_file_part *parts,
                   int count)
{
    if (path[0] == '\0')
        return moe_fail(-EINVAL, "invalid file name '': expected a path");
    /* A descriptor of this process, such as /dev/stdout: write through the
     * descriptor itself, after what stdio holds for it, so that nothing
     * written to it before or after is replaced or overwritten. */
    int own_fd = -1;
    if (!strcmp(path, "/dev/stdout"))
        own_fd = 1;
    else if (!strcmp(path, "/dev/stderr"))
        own_fd = 2;
    else if (!strncmp(path, "/dev/fd/", 8) || !strncmp(path, "/proc/self/fd/", 14)) {
        const char *digits = path + (path[1] == 'd' ? 8 : 14);
        char *end = NULL;
        long n = strtol(digits, &end, 10);
        if (end != digits && *end == '\0' && n >= 0 && n < 1024 && fcntl((int)n, F_GETFD) >= 0)
            own_fd = (int)n;
    }
    if (own_fd >= 0) {
        fflush(stdout);
        fflush(stderr);
        int rc = write_all(own_fd, parts, count);
        if (rc)
            return moe_fail(rc, "%s: write failed: %s", path, strerror(-rc));
        return 0;
    }

    /* A pipe, FIFO or device reached through a link: write into it. */
    struct stat st;
    if (stat(path, &st) == 0 && !S_ISDIR(st.st_mode) && !S_ISREG(st.st_mode))
        return write_direct(path, parts, count);

    char target[PATH_MAX];
    int rc = moe_resolve_output_path(path, target, sizeof target);
    if (rc)
        return rc;
    if (stat(target, &st) == 0) {
        if (S_ISDIR(st.st_mode))
            return moe_fail(-EINVAL, "%s: is a directory", path);
        if (!S_ISREG(st.st_mode))
            return write_direct(target, parts, count);
        return write_replace(target, path, (int)(st.st_mode & 07777), parts, count);
    }
    return write_replace(target, path, -1, parts, count);
}

int moe_make_directories(const char *flag, const char *dir)
{
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s", dir) >= (int)sizeof path)
        return moe_fail(-EINVAL, "invalid %s directory: name too long", flag);

    /* Create each prefix that ends at a '/', then the whole path. */
    for (char *p = path + 1;; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        char saved = *p;
        *p = '\0';
        struct stat st;
        if (mkdir(path, 0777) != 0 && errno != EEXIST)
            return moe_fail(-EINVAL, "invalid %s directory '%s': cannot create '%s': %s",
                            flag, dir, path, strerror(errno));
        if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
            return moe_fail(-EINVAL, "invalid %s directory '%s': '%s' is not a directory",
                            flag, dir, path);
        *p = saved;
        if (saved == '\0')
            return 0;
    }
}

int moe_path_error_code(int err)
{
    return err == ENOENT || err == ENOTDIR || err == ELOOP || err == EACCES ||
                   err == EPERM || err == ENAMETOOLONG || err == EISDIR || err == ENXIO
               ? -EINVAL
               : -err;
}

int moe_read_small_file(const char *path, size_t limit, char **text, size_t *length)
{
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC); /* O_NONBLOCK: a FIFO must not block open() */
    if (fd < 0) {
        int err = errno;
        return moe_fail(moe_path_error_code(err), "%s: open failed: %s", path,
                        strerror(err));
    }
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int err = errno;
        close(fd);
        return moe_fail(-err, "%s: fstat failed: %s", path, strerror(err));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return moe_fail(-EINVAL, "%s: not a regular file", path);
    }
    if ((uint64_t)st.st_size > limit) {
        close(fd);
        return moe_fail(-EINVAL, "%s: %lld bytes, more than the %zu-byte limit",
                        path, (long long)st.st_size, limit);
    }

    size_t len = (size_t)st.st_size;
    char *buf = malloc(len + 1);
    if (buf == NULL) {
        close(fd);
        return moe_fail(-ENOMEM, "%s: out of memory for %zu bytes", path, len);
    }
    size_t done = 0;
    while (done < len) {
        ssize_t n = read(fd, buf + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            int err = n < 0 ? errno : 0;
            close(fd);
            free(buf);
            if (err == 0)
                return moe_fail(-EINVAL, "%s: file shrank while being read",
                                path);
            return moe_fail(-err, "%s: read failed: %s", path, strerror(err));
        }
        done += (size_t)n;
    }
    close(fd);
    buf[len] = '\0';
    *text = buf;
    *length = len;
    return 0;
}
