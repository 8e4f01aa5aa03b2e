/*
 * moe_error.h - error convention shared by every library function.
 *
 * Library calls return 0 on success or a negative errno value on failure and
 * never print or exit; only the program's main decides what to show and which
 * exit status to use. The failing call also records a one-line message in a
 * per-thread buffer, which main reads with moe_error_message().
 *
 * Error classes and the exit status main maps them to:
 *   -EINVAL     invalid usage or input (a flag, a file)          -> exit 2
 *   -ETIMEDOUT  a wait on a peer passed its deadline             -> exit 3
 *   -ECANCELED  the run was aborted because another rank failed  -> exit 3
 *   -EPROTO     a peer wrote a count or record that fails checks -> exit 3
 *   other       a failed system call (-errno) or -ENOMEM         -> exit 3
 * A run stopped by SIGINT, SIGTERM or SIGHUP exits with 128 + the signal.
 */
#ifndef MOE_ERROR_H
#define MOE_ERROR_H

#include <stddef.h>

/* Records the message for the current failure and returns `code` unchanged,
 * so that callers can write `return moe_fail(-EINVAL, "...", ...);`. */
int moe_fail(int code, const char *format, ...)
    __attribute__((format(printf, 2, 3)));

/* Returns the message recorded by the last failing call on this thread, or an
 * empty string. */
const char *moe_error_message(void);

/* Clears the recorded message. */
void moe_error_clear(void);

#endif
