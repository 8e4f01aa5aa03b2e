/*
 * compare.c - the `moe-ep compare` command: two .npy files, or two dump
 * directories walked stage by stage (see moe_diff.h).
 */
#include "moe_diff.h"
#include "moe_args.h"
#include "moe_error.h"

#include <dirent.h>
#include <errno.h>
#include <float.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* ---- directories ------------------------------------------------------ */

/* A sorted, growable list of file names. */
struct name_list {
    char **names;
    size_t count;
    size_t capacity;
};

static void free_names(struct name_list *list)
{
    for (size_t i = 0; i < list->count; i++)
        free(list->names[i]);
    free(list->names);
    memset(list, 0, sizeof *list);
}

static int add_name(struct name_list *list, const char *name)
{
    if (list->count == list->capacity) {
        size_t capacity = list->capacity ? 2 * list->capacity : 32;
        char **names = realloc(list->names, capacity * sizeof names[0]);
        if (names == NULL)
            return moe_fail(-ENOMEM, "out of memory for a list of %zu file "
                            "names", capacity);
        list->names = names;
        list->capacity = capacity;
    }
    list->names[list->count] = strdup(name);
    if (list->names[list->count] == NULL)
        return moe_fail(-ENOMEM, "out of memory for the file name '%s'", name);
    list->count++;
    return 0;
}

static bool has_npy_suffix(const char *name)
{
    size_t length = strlen(name);
    return length > 4 && strcmp(name + length - 4, ".npy") == 0;
}

static int compare_strings(const void *left, const void *right)
{
    return strcmp(*(const char *const *)left, *(const char *const *)right);
}

/* Lists the names ending in .npy in dir, sorted by strcmp. */
static int list_npy_files(const char *dir, struct name_list *list)
{
    memset(list, 0, sizeof *list);
    DIR *stream = opendir(dir);
    if (stream == NULL) {
        int err = errno;
        return moe_fail(-err, "%s: opening the directory failed: %s", dir,
                        strerror(err));
    }

    int rc = 0;
    for (;;) {
        errno = 0;
        struct dirent *entry = readdir(stream);
        if (entry == NULL) {
            if (errno != 0) {
                int err = errno;
                rc = moe_fail(-err, "%s: reading the directory failed: %s",
                              dir, strerror(err));
            }
            break;
        }
        if (has_npy_suffix(entry->d_name)) {
            /* Reading a FIFO or a device would block or never end. */
            struct stat st;
            if (fstatat(dirfd(stream), entry->d_name, &st, 0) != 0 ||
                !S_ISREG(st.st_mode)) {
                rc = moe_fail(-EINVAL, "%s/%s: not a regular file", dir,
                              entry->d_name);
                break;
            }
            rc = add_name(list, entry->d_name);
            if (rc < 0)
                break;
        }
    }
    closedir(stream);
    if (rc < 0) {
        free_names(list);
        return rc;
    }
    if (list->count > 0)
        qsort(list->names, list->count, sizeof list->names[0],
              compare_strings);
    return 0;
}

static bool contains_name(const struct name_list *list, const char *name)
{
    if (list->count == 0) /* names may be NULL, which bsearch rejects */
        return false;
    return bsearch(&name, list->names, list->count, sizeof list->names[0],
                   compare_strings) != NULL;
}

/* Joins dir and name into a new string. */
static char *join_path(const char *dir, const char *name)
{
    size_t size = strlen(dir) + strlen(name) + 2;
    char *path = malloc(size);
    if (path != NULL)
        snprintf(path, size, "%s/%s", dir, name);
    return path;
}

/* Compares the file `name` of both directories, or records that it is
 * missing in one of them. */
static int compare_stage(const char *dir_a, const char *dir_b,
                         const char *name, bool in_a, bool in_b,
                         const struct moe_diff_tolerance *tolerance,
                         struct moe_diff_result *result)
{
    if (!in_a || !in_b) {
        memset(result, 0, sizeof *result);
        result->first_index = -1;
        result->status = in_a ? MOE_DIFF_MISSING_B : MOE_DIFF_MISSING_A;
        return 0;
    }

    char *path_a = join_path(dir_a, name);
    char *path_b = join_path(dir_b, name);
    int rc = path_a != NULL && path_b != NULL
                 ? moe_diff_files(path_a, path_b, tolerance, result)
                 : moe_fail(-ENOMEM, "out of memory for the path of '%s'", name);
    free(path_a);
    free(path_b);
    return rc;
}

/* Compares two dump directories stage by stage, printing one line per
 * stage and a last line naming the first stage that differs. Stores in
 * *mismatch whether any stage differs. Stops at the first file that
 * cannot be read. */
static int compare_dirs(FILE *out, const char *dir_a, const char *dir_b,
                        const struct moe_diff_tolerance *tolerance,
                        bool *mismatch)
{
    struct name_list list_a, list_b;
    int rc = list_npy_files(dir_a, &list_a);
    if (rc < 0)
        return rc;
    rc = list_npy_files(dir_b, &list_b);
    if (rc < 0) {
        free_names(&list_a);
        return rc;
    }

    /* The union of both lists, in dump order. */
    size_t total = list_a.count + list_b.count;
    const char **names = malloc((total > 0 ? total : 1) * sizeof names[0]);
    size_t count = 0;
    if (names == NULL) {
        rc = moe_fail(-ENOMEM, "out of memory for a list of %zu file names",
                      total);
        goto out;
    }
    for (size_t i = 0; i < list_a.count; i++)
        names[count++] = list_a.names[i];
    for (size_t i = 0; i < list_b.count; i++)
        if (!contains_name(&list_a, list_b.names[i]))
            names[count++] = list_b.names[i];
    if (count == 0) {
        rc = moe_fail(-EINVAL, "neither %s nor %s contains a .npy file; "
                      "expected two dump directories", dir_a, dir_b);
        goto out;
    }
    moe_dump_sort_names(names, count);

    const char *first_mismatch = NULL;
    for (size_t i = 0; i < count; i++) {
        struct moe_diff_result result;
        rc = compare_stage(dir_a, dir_b, names[i],
                           contains_name(&list_a, names[i]),
                           contains_name(&list_b, names[i]), tolerance,
                           &result);
        if (rc < 0)
            goto out;
        moe_diff_print(out, names[i], &result);
        if (result.status != MOE_DIFF_MATCH && first_mismatch == NULL)
            first_mismatch = names[i];
    }

    if (first_mismatch != NULL)
        fprintf(out, "first mismatch: %s\n", first_mismatch);
    else
        fprintf(out, "all %zu stages match (rtol %g, atol %g)\n", count,
                tolerance->rtol, tolerance->atol);
    *mismatch = first_mismatch != NULL;

out:
    free(names);
    free_names(&list_a);
    free_names(&list_b);
    return rc;
}

/* ---- the command ------------------------------------------------------ */

enum {
    COMPARE_MATCH = 0,
    COMPARE_MISMATCH = 1,
    COMPARE_USAGE = 2,
    COMPARE_RUNTIME = 3,
};

static void compare_usage(FILE *out)
{
    fprintf(out,
        "usage: moe-ep compare A B [--rtol R] [--atol A]\n"
        "\n"
        "Compares two .npy files, or two dump directories (moe-ep run --dump)\n"
        "stage by stage in pipeline order, and names the first stage that\n"
        "differs. B is the reference.\n"
        "\n"
        "Float elements match when |a - b| <= atol + rtol * |b| (numpy.isclose).\n"
        "NaN matches NaN in the same position, +inf matches +inf, and a NaN\n"
        "against a number is a mismatch. With --rtol 0 --atol 0 values must be\n"
        "equal as numbers (+0 matches -0, NaN payloads are ignored). Integer\n"
        "and bool arrays must be equal; the tolerances do not apply to them.\n"
        "The ULP distance counts float32 steps, after float64 values are\n"
        "rounded to float32.\n"
        "\n"
        "options (defaults in brackets):\n"
        "  --rtol R    relative tolerance, a number >= 0 [%g]\n"
        "  --atol A    absolute tolerance, a number >= 0 [%g]\n"
        "  -h, --help  show this text\n"
        "\n"
        "The defaults are meant for float32 kernels that sum in another order.\n"
        "float16 and bfloat16 round at about 5e-4 and 4e-3 relative, so for a\n"
        "port in those types start from --rtol 1e-2 --atol 1e-3.\n"
        "\n"
        "exit status: 0 everything matches, 1 a mismatch (values, shape,\n"
        "float against integer dtype, or a stage missing in A or B), 2 invalid\n"
        "usage or input (a bad flag, a missing or malformed file, a file\n"
        "against a directory), 3 out of memory or output failed\n",
        MOE_DIFF_DEFAULT_RTOL, MOE_DIFF_DEFAULT_ATOL);
}

/* Parses the arguments after "compare" into two paths and the
 * tolerances. Returns 1 for --help, 0, or -EINVAL. */
static int parse_compare_args(int argc, char **argv, const char **paths,
                              struct moe_diff_tolerance *tolerance)
{
    static const char *const known[] = {"--rtol", "--atol", NULL};
    int path_count = 0;
    bool options_done = false;

    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        bool is_option = !options_done && arg[0] == '-' && arg[1] != '\0';
        if (is_option && (!strcmp(arg, "-h") || !strcmp(arg, "--help")))
            return 1;
        if (is_option && !strcmp(arg, "--")) {
            options_done = true;
            continue;
        }

        if (!is_option) {
            if (path_count == 2)
                return moe_fail(-EINVAL, "unexpected argument '%s': expected "
                                "two paths, A and B; see moe-ep compare --help",
                                arg);
            paths[path_count++] = arg;
            continue;
        }

        const char *text;
        int rc = moe_next_option("compare", known, argc, argv, &i, &text);
        if (rc < 0)
            return rc;
        double *target = !strcmp(arg, "--rtol") ? &tolerance->rtol
                                                : &tolerance->atol;
        rc = moe_parse_double(arg, text, 0.0, DBL_MAX, target);
        if (rc < 0)
            return rc;
    }

    if (path_count < 2)
        return moe_fail(-EINVAL, "missing %s: expected two paths, A and B; "
                        "see moe-ep compare --help",
                        path_count == 0 ? "paths A and B" : "path B");
    return 0;
}

static int exit_status_for(int rc)
{
    return rc == -ENOMEM ? COMPARE_RUNTIME : COMPARE_USAGE;
}

/* Compares the two paths, which must both be directories or both files.
 * Stores in *mismatch whether anything differs. */
static int compare_paths(const char *path_a, const char *path_b,
                         const struct moe_diff_tolerance *tolerance,
                         bool *mismatch)
{
    const char *paths[2] = {path_a, path_b};
    bool is_dir[2];
    for (int i = 0; i < 2; i++) {
        struct stat st;
        if (stat(paths[i], &st) < 0) {
            int err = errno;
            return moe_fail(-EINVAL, "%s: stat failed: %s", paths[i],
                            strerror(err));
        }
        is_dir[i] = S_ISDIR(st.st_mode);
    }
    if (is_dir[0] != is_dir[1])
        return moe_fail(-EINVAL, "%s is a %s but %s is a %s; expected two .npy "
                        "files or two directories",
                        path_a, is_dir[0] ? "directory" : "file", path_b,
                        is_dir[1] ? "directory" : "file");

    if (is_dir[0])
        return compare_dirs(stdout, path_a, path_b, tolerance, mismatch);

    struct moe_diff_result result;
    int rc = moe_diff_files(path_a, path_b, tolerance, &result);
    if (rc < 0)
        return rc;
    char name[2 * 4096];
    snprintf(name, sizeof name, "%s vs %s", path_a, path_b);
    moe_diff_print(stdout, name, &result);
    *mismatch = result.status != MOE_DIFF_MATCH;
    return 0;
}

int moe_compare_main(int argc, char **argv)
{
    const char *paths[2] = {NULL, NULL};
    struct moe_diff_tolerance tolerance = {MOE_DIFF_DEFAULT_RTOL,
                                           MOE_DIFF_DEFAULT_ATOL};
    int rc = parse_compare_args(argc, argv, paths, &tolerance);
    if (rc == 1) {
        compare_usage(stdout);
        return fflush(stdout) == 0 ? COMPARE_MATCH : COMPARE_RUNTIME;
    }
    if (rc < 0) {
        fprintf(stderr, "moe-ep compare: %s\n", moe_error_message());
        return COMPARE_USAGE;
    }

    bool mismatch = false;
    rc = compare_paths(paths[0], paths[1], &tolerance, &mismatch);
    int status = mismatch ? COMPARE_MISMATCH : COMPARE_MATCH;
    if (rc < 0) {
        fprintf(stderr, "moe-ep compare: %s\n", moe_error_message());
        status = exit_status_for(rc);
    }

    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "moe-ep compare: writing to standard output failed: "
                "%s\n", strerror(errno));
        return COMPARE_RUNTIME;
    }
    return status;
}
