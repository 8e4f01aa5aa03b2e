/*
 * args.c - numeric option parsing with range checks; see moe_args.h.
 */
#include "moe_args.h"
#include "moe_file.h"
#include "moe_error.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int moe_parse_int64(const char *flag, const char *text, int64_t min,
                    int64_t max, int64_t *value)
{
    char *end;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (end == text || *end != '\0' || isspace((unsigned char)text[0]) ||
        errno == ERANGE || v < min || v > max)
        return moe_fail(-EINVAL, "invalid %s value '%s': expected an integer "
                        "from %" PRId64 " to %" PRId64, flag, text, min, max);
    *value = v;
    return 0;
}

int moe_parse_uint64(const char *flag, const char *text, uint64_t *value)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    if (end == text || *end != '\0' || !isdigit((unsigned char)text[0]) ||
        errno == ERANGE)
        return moe_fail(-EINVAL, "invalid %s value '%s': expected an integer "
                        "from 0 to %" PRIu64, flag, text, UINT64_MAX);
    *value = v;
    return 0;
}

int moe_parse_bytes(const char *flag, const char *text, uint64_t min,
                    uint64_t max, uint64_t *value)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(text, &end, 10);
    int shift = 0;
    if (*end == 'K' || *end == 'k')
        shift = 10;
    else if (*end == 'M' || *end == 'm')
        shift = 20;
    else if (*end == 'G' || *end == 'g')
        shift = 30;
    const char *rest = shift ? end + 1 : end;
    if (end == text || !isdigit((unsigned char)text[0]) || *rest != '\0' ||
        errno == ERANGE || v > (UINT64_MAX >> shift) ||
        (v << shift) < min || (v << shift) > max)
        return moe_fail(-EINVAL, "invalid %s value '%s': expected a size from "
                        "%" PRIu64 " to %" PRIu64 " bytes, optionally with a "
                        "K, M or G suffix", flag, text, min, max);
    *value = (uint64_t)v << shift;
    return 0;
}

int moe_next_option(const char *command, const char *const *known, int argc,
                    char **argv, int *i, const char **value)
{
    const char *flag = argv[*i];
    if (strncmp(flag, "--", 2) != 0)
        return moe_fail(-EINVAL, "unexpected argument '%s': options start with "
                        "--; see moe-ep %s --help", flag, command);
    int is_known = 0;
    for (int k = 0; known[k]; k++)
        is_known |= !strcmp(flag, known[k]);
    if (!is_known)
        return moe_fail(-EINVAL, "unknown option '%s'; see moe-ep %s --help",
                        flag, command);
    if (*i + 1 >= argc)
        return moe_fail(-EINVAL, "missing value for %s", flag);
    *value = argv[++*i];
    return 0;
}

int moe_check_output_path(const char *flag, const char *path)
{
    if (path[0] == '\0')
        return moe_fail(-EINVAL, "invalid %s value '': expected a file name", flag);
    size_t length = strlen(path);
    if (path[length - 1] == '/')
        return moe_fail(-EINVAL, "invalid %s file '%s': expected a file name, "
                        "not a directory", flag, path);

    /* Check the file that will be written: the end of any link chain. */
    char target[PATH_MAX];
    if (moe_resolve_output_path(path, target, sizeof target) != 0)
        return moe_fail(-EINVAL, "invalid %s file: %s", flag, moe_error_message());

    struct stat st;
    if (stat(target, &st) == 0) {
        if (S_ISDIR(st.st_mode))
            return moe_fail(-EINVAL, "invalid %s file '%s': it is a directory",
                            flag, path);
        if (access(target, W_OK) != 0)
            return moe_fail(-EINVAL, "invalid %s file '%s': not writable: %s",
                            flag, path, strerror(errno));
        if (!S_ISREG(st.st_mode)) /* a device or FIFO is written in place */
            return 0;
    }

    char dir[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", target);
    char *slash = strrchr(dir, '/');
    const char *name = slash ? slash + 1 : dir;
    if (strlen(name) > NAME_MAX)
        return moe_fail(-EINVAL, "invalid %s file '%s': the file name is longer "
                        "than %d bytes", flag, path, NAME_MAX);
    if (!slash)
        snprintf(dir, sizeof dir, ".");
    else if (slash == dir)
        dir[1] = '\0';
    else
        *slash = '\0';

    if (stat(dir, &st) != 0)
        return moe_fail(-EINVAL, "invalid %s file '%s': directory '%s' does not "
                        "exist: %s", flag, path, dir, strerror(errno));
    if (!S_ISDIR(st.st_mode))
        return moe_fail(-EINVAL, "invalid %s file '%s': '%s' is not a directory",
                        flag, path, dir);
    if (access(dir, W_OK) != 0)
        return moe_fail(-EINVAL, "invalid %s file '%s': directory '%s' is not "
                        "writable: %s", flag, path, dir, strerror(errno));
    return 0;
}

int moe_parse_double(const char *flag, const char *text, double min,
                     double max, double *value)
{
    /* Plain decimal notation only: strtod would also take hex floats,
     * "inf" and "nan". */
    if (text[strspn(text, "0123456789.eE+-")] != '\0')
        return moe_fail(-EINVAL, "invalid %s value '%s': expected a number "
                        "from %g to %g", flag, text, min, max);
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    /* ERANGE with a result below 1 in size is an underflow to 0 or a
     * subnormal, which still is the number written. Only an overflow is
     * out of range. */
    int overflow = errno == ERANGE && fabs(v) >= 1.0;
    if (end == text || *end != '\0' || isspace((unsigned char)text[0]) ||
        overflow || !isfinite(v) || v < min || v > max)
        return moe_fail(-EINVAL, "invalid %s value '%s': expected a number "
                        "from %g to %g", flag, text, min, max);
    *value = v;
    return 0;
}

int moe_parse_on_off(const char *flag, const char *text, int *value)
{
    if (!strcmp(text, "on"))
        *value = 1;
    else if (!strcmp(text, "off"))
        *value = 0;
    else
        return moe_fail(-EINVAL, "invalid %s value '%s': expected on or off", flag, text);
    return 0;
}
