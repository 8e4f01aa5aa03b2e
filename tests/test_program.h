/*
 * test_program.h - runs the moe-ep program from a Criterion test and
 * captures its exit status, stdout and stderr.
 *
 * The program is found next to the test binary's directory
 * (BUILD/tests/test_x -> BUILD/moe-ep).
 */
#ifndef TEST_PROGRAM_H
#define TEST_PROGRAM_H

#include "test_util.h"

#include <cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct outcome {
    int status;     /* exit status, or 128 + signal */
    char out[65536]; /* stdout, truncated */
    char err[8192];  /* stderr, truncated */
    double seconds;
};

static inline void program_path(char *path, size_t size)
{
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    cr_assert_gt(n, 0);
    self[n] = '\0';
    snprintf(path, size, "%s/../moe-ep", dirname(self));
}

static inline void read_file(const char *path, char *buf, size_t size)
{
    FILE *f = fopen(path, "r");
    cr_assert_not_null(f, "open %s", path);
    size_t n = fread(buf, 1, size - 1, f);
    buf[n] = '\0';
    fclose(f);
}

/* Reads a whole file into a NUL-terminated string; the caller frees it. */
static inline char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "open %s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc((size_t)n + 1);
    cr_assert_not_null(text);
    cr_assert_eq(fread(text, 1, (size_t)n, f), (size_t)n);
    text[n] = '\0';
    fclose(f);
    return text;
}

/* Parses a JSON file; the caller deletes the result. */
static inline cJSON *read_json(const char *path)
{
    char *text = slurp(path);
    cJSON *root = cJSON_Parse(text);
    cr_assert_not_null(root, "%s is not valid JSON", path);
    free(text);
    return root;
}

/* Counts the /dev/shm/moe-ep-PID-* names of this process, for tests that
 * launch ranks in-process. */
static inline int own_segment_count(void)
{
    char prefix[32];
    snprintf(prefix, sizeof prefix, "moe-ep-%ld-", (long)getpid());
    DIR *dir = opendir("/dev/shm");
    if (!dir)
        return -1;
    int count = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL)
        if (strncmp(entry->d_name, prefix, strlen(prefix)) == 0)
            count++;
    closedir(dir);
    return count;
}

/* Counts leaked moe-ep segments in /dev/shm: those whose launcher, named
 * by the pid in the segment name, no longer runs. Live runs of tests that
 * run in parallel are not counted. */
static inline int segment_count(void)
{
    DIR *dir = opendir("/dev/shm");
    int count = 0;
    struct dirent *entry;
    while (dir && (entry = readdir(dir)) != NULL) {
        long pid;
        if (sscanf(entry->d_name, "moe-ep-%ld-", &pid) == 1 &&
            kill((pid_t)pid, 0) != 0)
            count++;
    }
    if (dir)
        closedir(dir);
    return count;
}

/* Runs moe-ep with argv (NULL-terminated, without the program name) and
 * an optional environment assignment; sends `signal_after` to it after
 * `delay_ms` when non-zero. Kills it after 60 s so a hang fails the test. */
static inline void run_program(struct outcome *o, const char *env, int signal_after,
                        int delay_ms, const char *const *args)
{
    char program[PATH_MAX + 16], out_path[] = "/tmp/moe-ep-cli-outXXXXXX",
         err_path[] = "/tmp/moe-ep-cli-errXXXXXX";
    program_path(program, sizeof program);
    int out_fd = mkstemp(out_path), err_fd = mkstemp(err_path);
    cr_assert(out_fd >= 0 && err_fd >= 0);

    const char *argv[64] = {program};
    int argc = 1;
    for (; args[argc - 1]; argc++)
        argv[argc] = args[argc - 1];
    argv[argc] = NULL;

    struct timespec start, end;
    clock_gettime(CLOCK_MONOTONIC, &start);
    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        dup2(out_fd, 1);
        dup2(err_fd, 2);
        if (env)
            putenv((char *)env);
        execv(program, (char *const *)argv);
        _exit(127);
    }

    int status = 0, waited_ms = 0, signalled = 0;
    while (waitpid(pid, &status, WNOHANG) == 0) {
        usleep(10000);
        waited_ms += 10;
        if (signal_after && !signalled && waited_ms >= delay_ms) {
            kill(pid, signal_after);
            signalled = 1;
        }
        if (waited_ms > 60000) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            cr_assert_fail("moe-ep did not finish within 60 s");
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    o->seconds = (double)(end.tv_sec - start.tv_sec) +
                 (double)(end.tv_nsec - start.tv_nsec) / 1e9;
    o->status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    read_file(out_path, o->out, sizeof o->out);
    read_file(err_path, o->err, sizeof o->err);
    close(out_fd);
    close(err_fd);
    unlink(out_path);
    unlink(err_path);
}

#endif
