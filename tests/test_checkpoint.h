/*
 * test_checkpoint.h - helpers for tests that write checkpoints with
 * make-layer, edit their files and run them through the moe-ep program.
 *
 * The including file defines _XOPEN_SOURCE 700 (for nftw) before any
 * #include.
 */
#ifndef TEST_CHECKPOINT_H
#define TEST_CHECKPOINT_H

#include "test_program.h"

#include <ftw.h>

static inline int remove_entry(const char *path, const struct stat *st, int flag,
                               struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* Creates a fresh directory under /tmp, removed by remove_tree(). */
static inline void make_temp_dir(char *dir, size_t size)
{
    snprintf(dir, size, "/tmp/moe-ep-test-XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
}

static inline void remove_tree(const char *dir)
{
    nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* Runs make-layer with the given arguments after "--out DIR". */
#define MAKE_LAYER(dir, ...)                                                     \
    do {                                                                         \
        struct outcome made_;                                                    \
        run_program(&made_, NULL, 0, 0,                                          \
                    (const char *[]){"make-layer", "--out", dir, __VA_ARGS__, NULL}); \
        cr_assert_eq(made_.status, 0, "make-layer failed: %s", made_.err);      \
    } while (0)

/* Asserts a bad-input outcome: status 2 and each needle in stderr. */
#define EXPECT_BAD_INPUT(o, ...)                                                 \
    do {                                                                         \
        cr_assert_eq((o).status, 2, "status %d, stderr: %s", (o).status, (o).err); \
        const char *needles_[] = {__VA_ARGS__, NULL};                            \
        for (int n_ = 0; needles_[n_]; n_++)                                     \
            cr_assert_not_null(strstr((o).err, needles_[n_]),                    \
                               "stderr lacks '%s': %s", needles_[n_], (o).err);  \
    } while (0)

static inline size_t read_all(const char *path, char *buf, size_t size)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "open %s", path);
    size_t n = fread(buf, 1, size, f);
    fclose(f);
    return n;
}

static inline void write_all(const char *path, const void *buf, size_t size)
{
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f, "create %s", path);
    cr_assert_eq(fwrite(buf, 1, size, f), size);
    cr_assert_eq(fclose(f), 0);
}

/* Replaces the first `from` in the file `path` with `to`, which may differ
 * in length. */
static inline void edit_file(const char *path, const char *from, const char *to)
{
    static char text[1 << 22], edited[1 << 22];
    size_t n = read_all(path, text, sizeof text - 1);
    text[n] = '\0';
    char *at = strstr(text, from);
    cr_assert_not_null(at, "'%s' not in %s", from, path);
    size_t head = (size_t)(at - text);
    memcpy(edited, text, head);
    memcpy(edited + head, to, strlen(to));
    size_t tail = n - head - strlen(from);
    memcpy(edited + head + strlen(to), at + strlen(from), tail);
    write_all(path, edited, head + strlen(to) + tail);
}

/* Replaces the first `from` in the binary file with `to`, of the same
 * length, so that the safetensors offsets stay valid. */
static inline void patch_bytes(const char *path, const char *from, const char *to)
{
    static char buf[1 << 22];
    size_t n = read_all(path, buf, sizeof buf);
    size_t len = strlen(from);
    cr_assert_eq(strlen(to), len);
    for (size_t i = 0; i + len <= n; i++)
        if (memcmp(buf + i, from, len) == 0) {
            memcpy(buf + i, to, len);
            write_all(path, buf, n);
            return;
        }
    cr_assert_fail("'%s' not found in %s", from, path);
}

/* Runs `run --model dir --tokens 37 --ranks 2` plus the extra arguments. */
static inline void run_model(struct outcome *o, const char *dir,
                             const char *const *extra)
{
    const char *args[32] = {"run", "--model", dir, "--tokens", "37", "--ranks", "2"};
    int n = 7;
    for (int i = 0; extra && extra[i]; i++)
        args[n++] = extra[i];
    args[n] = NULL;
    run_program(o, NULL, 0, 0, args);
}

#endif
