/*
 * fuzz_input.h - hands a libFuzzer input to a reader that opens a path.
 *
 * The input is written into a memfd, so no disk file is rewritten on every
 * run. A reader that takes a file path opens it as /proc/self/fd/N. A
 * reader that takes a model directory gets a fresh directory under $TMPDIR
 * (or /tmp) in which its file name is a symlink to that path, next to any
 * fixed files the target adds (registered with fuzz_remove_at_exit()). The directory is removed when the fuzzer
 * exits normally, but a crash leaves it behind.
 *
 * A setup failure prints the reason and aborts, because the harness cannot
 * run without it.
 */
#ifndef FUZZ_INPUT_H
#define FUZZ_INPUT_H

/* Needed for memfd_create(), so this header must come before any system
 * header. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

struct fuzz_file {
    int fd;               /* the memfd */
    char path[64];        /* "/proc/self/fd/N" */
    char dir[PATH_MAX];   /* directory holding the symlink, or "" */
};

/* Paths removed at exit, files before their directories. */
enum { FUZZ_MAX_CLEANUP = 16 };
static char fuzz_cleanup_paths[FUZZ_MAX_CLEANUP][PATH_MAX];
static int fuzz_cleanup_count;

static void fuzz_cleanup(void)
{
    for (int i = fuzz_cleanup_count - 1; i >= 0; i--)
        remove(fuzz_cleanup_paths[i]);
}

static void fuzz_setup_failed(const char *what)
{
    fprintf(stderr, "fuzz harness setup: %s failed: %s\n", what, strerror(errno));
    abort();
}

static void fuzz_remove_at_exit(const char *path)
{
    if (fuzz_cleanup_count == FUZZ_MAX_CLEANUP) {
        errno = ENOSPC;
        fuzz_setup_failed("registering a path for removal");
    }
    if (fuzz_cleanup_count == 0)
        atexit(fuzz_cleanup);
    snprintf(fuzz_cleanup_paths[fuzz_cleanup_count++], PATH_MAX, "%s", path);
}

/* Creates the memfd and, when link_name is not NULL, a directory in which
 * link_name points to it. */
static void fuzz_file_open(struct fuzz_file *f, const char *link_name)
{
    memset(f, 0, sizeof *f);
    f->fd = memfd_create("moe-ep-fuzz-input", MFD_CLOEXEC);
    if (f->fd < 0)
        fuzz_setup_failed("memfd_create");
    snprintf(f->path, sizeof f->path, "/proc/self/fd/%d", f->fd);
    if (!link_name)
        return;

    const char *tmp = getenv("TMPDIR");
    snprintf(f->dir, sizeof f->dir, "%s/moe-ep-fuzz-XXXXXX",
             tmp && tmp[0] ? tmp : "/tmp");
    if (!mkdtemp(f->dir))
        fuzz_setup_failed("mkdtemp");
    fuzz_remove_at_exit(f->dir);
    char link[PATH_MAX];
    snprintf(link, sizeof link, "%s/%s", f->dir, link_name);
    if (symlink(f->path, link) != 0)
        fuzz_setup_failed("symlink");
    fuzz_remove_at_exit(link);
}

/* Replaces the file's contents with data[0..size). */
static void fuzz_file_write(struct fuzz_file *f, const uint8_t *data, size_t size)
{
    if (ftruncate(f->fd, 0) != 0)
        fuzz_setup_failed("ftruncate");
    size_t done = 0;
    while (done < size) {
        ssize_t n = pwrite(f->fd, data + done, size - done, (off_t)done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            fuzz_setup_failed("pwrite");
        done += (size_t)n;
    }
}

/* Aborts, so that libFuzzer reports the input, when a reader broke its
 * contract without crashing. */
static void fuzz_contract_failed(const char *reader, const char *what)
{
    fprintf(stderr, "%s: %s\n", reader, what);
    abort();
}

#endif
