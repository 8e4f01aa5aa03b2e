/*
 * clean.c - `moe-ep clean`: find the shared-memory segment names that
 * launchers left in /dev/shm and remove the stale ones.
 *
 * Runs in its own process and touches only names of the form
 * "moe-ep-<launcher pid>-<16 hex digits>". A launcher unlinks its segment's
 * name right after creating it, so a name is left behind only when the
 * launcher was killed in the moment between shm_open() and shm_unlink().
 * A name is stale when no process has the pid in it, or when the process
 * that has that pid now neither has the segment open nor maps it (the pid
 * was reused). A name whose process has the segment open belongs to a live run
 * and is kept, and so is a name whose process's open files cannot be read.
 *
 * Removing a name never frees memory that a process still maps: the kernel
 * frees it when the last mapping and descriptor go.
 */
#include "moe_launch.h"
#include "moe_error.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

/* Verdict on one segment name. */
enum verdict {
    STALE_NO_PROCESS,   /* no process has the launcher pid */
    STALE_NOT_OPEN,     /* the process with that pid neither opens nor maps it */
    LIVE,               /* the process with that pid has it open or mapped */
    UNKNOWN_KEPT,       /* that process's open files cannot be read */
};

int moe_segment_name_pid(const char *name, pid_t *pid)
{
    size_t prefix = strlen(MOE_SEGMENT_PREFIX);
    if (strncmp(name, MOE_SEGMENT_PREFIX, prefix) != 0)
        return -1;
    const char *first_digit = name + prefix, *p = first_digit;
    long long value = 0;
    for (; isdigit((unsigned char)*p); p++) {
        value = value * 10 + (*p - '0');
        if (value > INT_MAX)
            return -1;
    }
    /* The launcher prints its pid with %ld: no sign, no leading zero. */
    if (p == first_digit || *first_digit == '0' || *p != '-')
        return -1;
    p++;
    for (int i = 0; i < 16; i++, p++)
        if (!isdigit((unsigned char)*p) && !(*p >= 'a' && *p <= 'f'))
            return -1;
    if (*p != '\0')
        return -1;
    *pid = (pid_t)value;
    return 0;
}

/* Reads /proc/PID/comm into buf, or "?" when the process has gone. */
static void process_name(pid_t pid, char *buf, size_t size)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/comm", (long)pid);
    snprintf(buf, size, "?");
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    if (fgets(buf, (int)size, f))
        buf[strcspn(buf, "\n")] = '\0';
    fclose(f);
}

/* Returns 1 when one of pid's open descriptors is the file `st` describes,
 * 0 when none is, or -errno when the descriptors cannot be listed. */
static int has_file_open(pid_t pid, const struct stat *st)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/fd", (long)pid);
    DIR *dir = opendir(path);
    if (!dir)
        return -errno;
    int found = 0;
    struct dirent *entry;
    while (!found && (entry = readdir(dir)) != NULL) {
        if (entry->d_name[0] == '.')
            continue;
        char fd_path[sizeof path + sizeof entry->d_name];
        struct stat target;
        snprintf(fd_path, sizeof fd_path, "%s/%s", path, entry->d_name);
        /* stat() follows the link to the open file, even an unlinked one. */
        if (stat(fd_path, &target) == 0 && target.st_dev == st->st_dev &&
            target.st_ino == st->st_ino)
            found = 1;
    }
    closedir(dir);
    return found;
}

/* Returns 1 when pid maps the file `st` describes, 0 when it does not, or
 * -errno when its mappings cannot be read. Lines of /proc/PID/maps read
 * "start-end perms offset major:minor inode path", with the device in
 * hex. */
static int has_file_mapped(pid_t pid, const struct stat *st)
{
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%ld/maps", (long)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -errno;
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        unsigned int dev_major, dev_minor;
        unsigned long long inode;
        if (sscanf(line, "%*s %*s %*s %x:%x %llu", &dev_major, &dev_minor,
                   &inode) == 3 &&
            inode == (unsigned long long)st->st_ino &&
            dev_major == major(st->st_dev) && dev_minor == minor(st->st_dev))
            found = 1;
        /* A line longer than the buffer continues in the next read. */
        while (!strchr(line, '\n') && fgets(line, sizeof line, f))
            continue;
    }
    fclose(f);
    return found;
}

/* Decides whether the name at `path`, created by launcher `pid`, is stale.
 * On UNKNOWN_KEPT, *error is the errno that hid the process's files. */
static enum verdict judge(pid_t pid, const struct stat *st, int *error)
{
    /* NOTE: the pid is looked up in this process's pid namespace. A
     * launcher in another namespace that shares /dev/shm looks dead, but
     * removing its name does not harm it: its ranks use the descriptor. */
    if (kill(pid, 0) != 0 && errno == ESRCH)
        return STALE_NO_PROCESS;
    int open_rc = has_file_open(pid, st);
    if (open_rc == -ENOENT)
        return STALE_NO_PROCESS; /* it exited meanwhile */
    if (open_rc == 1)
        return LIVE;
    int mapped_rc = has_file_mapped(pid, st);
    if (mapped_rc == 1)
        return LIVE;
    if (open_rc < 0 || mapped_rc < 0) {
        *error = open_rc < 0 ? -open_rc : -mapped_rc;
        return UNKNOWN_KEPT;
    }
    return STALE_NOT_OPEN;
}

/* Prints one name with its size and the reason for the decision. */
static void report(FILE *out, const char *action, const char *path,
                   const struct stat *st, pid_t pid, enum verdict verdict,
                   int error)
{
    char name[64];
    process_name(pid, name, sizeof name);
    fprintf(out, "%s %s (%.1f MiB): ", action, path,
            (double)st->st_size / 1048576.0);
    switch (verdict) {
    case STALE_NO_PROCESS:
        fprintf(out, "no process has pid %ld\n", (long)pid);
        break;
    case STALE_NOT_OPEN:
        fprintf(out, "pid %ld (%s) neither has the segment open nor maps it, "
                "so it is not the launcher\n", (long)pid, name);
        break;
    case LIVE:
        fprintf(out, "pid %ld (%s) has the segment open or mapped, so its run "
                "is live\n", (long)pid, name);
        break;
    case UNKNOWN_KEPT:
        fprintf(out, "the open files of pid %ld (%s) cannot be read: %s\n",
                (long)pid, name, strerror(error));
        break;
    }
}

int moe_clean(const char *dir_path, int dry_run, FILE *out,
              struct moe_clean_summary *summary)
{
    *summary = (struct moe_clean_summary){0};
    DIR *dir = opendir(dir_path);
    if (!dir)
        return moe_fail(-errno, "cannot list %s: %s", dir_path, strerror(errno));

    int rc = 0;
    struct dirent *entry;
    while ((entry = readdir(dir)) != NULL) {
        pid_t pid;
        if (moe_segment_name_pid(entry->d_name, &pid) != 0)
            continue;
        char path[PATH_MAX];
        snprintf(path, sizeof path, "%s/%s", dir_path, entry->d_name);
        struct stat st;
        if (lstat(path, &st) != 0 || !S_ISREG(st.st_mode))
            continue; /* gone meanwhile, or not something shm_open made */
        summary->found++;

        int error = 0;
        enum verdict verdict = judge(pid, &st, &error);
        if (verdict == LIVE || verdict == UNKNOWN_KEPT) {
            report(out, "kept", path, &st, pid, verdict, error);
            summary->kept++;
            continue;
        }
        if (dry_run) {
            report(out, "would remove", path, &st, pid, verdict, 0);
            summary->stale++;
            continue;
        }
        if (unlink(path) != 0 && errno != ENOENT) {
            int error = errno;
            rc = moe_fail(-error, "removing %s failed: %s", path, strerror(error));
            fprintf(out, "failed to remove %s: %s\n", path, strerror(error));
            summary->failed++;
            continue;
        }
        report(out, "removed", path, &st, pid, verdict, 0);
        summary->stale++;
    }
    closedir(dir);
    if (summary->failed)
        return moe_fail(rc, "%d of %d stale segments could not be removed, the "
                        "last because %s", summary->failed,
                        summary->failed + summary->stale, moe_error_message());
    return 0;
}

static void clean_usage(FILE *out)
{
    fprintf(out,
        "usage: moe-ep clean [--dry-run]\n"
        "\n"
        "Lists the shared-memory segments in " MOE_SHM_DIR " whose names start with\n"
        MOE_SEGMENT_PREFIX " and removes the stale ones: those whose launcher pid is not\n"
        "running, or is now a process that neither has the segment open nor\n"
        "maps it. It never removes a segment that the process with its launcher\n"
        "pid has open or mapped, so a live run keeps its segment.\n"
        "\n"
        "options:\n"
        "  --dry-run   list what would be removed and remove nothing\n"
        "  -h, --help  show this text\n"
        "\n"
        "exit status: 0 done, 2 invalid usage, 3 a segment could not be removed\n"
        "or " MOE_SHM_DIR " could not be read\n");
}

int moe_clean_main(int argc, char **argv)
{
    int dry_run = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            clean_usage(stdout);
            return 0;
        }
        if (!strcmp(argv[i], "--dry-run")) {
            dry_run = 1;
            continue;
        }
        fprintf(stderr, "moe-ep clean: %s '%s'; see moe-ep clean --help\n",
                strncmp(argv[i], "--", 2) ? "unexpected argument" : "unknown option",
                argv[i]);
        return 2;
    }

    struct moe_clean_summary summary;
    int rc = moe_clean(MOE_SHM_DIR, dry_run, stdout, &summary);
    if (summary.found == 0 && rc == 0)
        printf("no %s* segments in %s\n", MOE_SEGMENT_PREFIX, MOE_SHM_DIR);
    else if (rc == 0 || summary.found > 0)
        printf("%d segment%s found: %d %s, %d kept%s\n", summary.found,
               summary.found == 1 ? "" : "s", summary.stale,
               dry_run ? "would be removed" : "removed", summary.kept,
               summary.failed ? ", some could not be removed" : "");
    if (rc) {
        fprintf(stderr, "moe-ep clean: %s\n", moe_error_message());
        return 3;
    }
    return 0;
}
