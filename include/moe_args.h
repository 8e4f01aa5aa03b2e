/*
 * moe_args.h - strict parsing of numeric command-line values.
 *
 * Each parser rejects empty text, trailing characters, and values outside
 * [min, max] with -EINVAL and a message of the form
 *   invalid --flag value 'text': expected an integer from MIN to MAX
 */
#ifndef MOE_ARGS_H
#define MOE_ARGS_H

#include <stdint.h>

int moe_parse_int64(const char *flag, const char *text, int64_t min,
                    int64_t max, int64_t *value);

int moe_parse_uint64(const char *flag, const char *text, uint64_t *value);

/* A byte size: digits with an optional K, M or G suffix (powers of 1024). */
int moe_parse_bytes(const char *flag, const char *text, uint64_t min,
                    uint64_t max, uint64_t *value);

/* A finite decimal number in [min, max]. */
int moe_parse_double(const char *flag, const char *text, double min,
                     double max, double *value);

/* Takes the option at argv[*i] and its value from the next argument,
 * advancing *i. `known` is the NULL-terminated list of the command's
 * options that take a value. Returns 0, or -EINVAL for an argument that is
 * not an option, an unknown option, or a missing value; the message names
 * the argument and points to `moe-ep COMMAND --help`. */
int moe_next_option(const char *command, const char *const *known, int argc,
                    char **argv, int *i, const char **value);

/* Parses "on" as 1 and "off" as 0 into *value, or returns -EINVAL with a
 * message naming `flag` and `text`. */
int moe_parse_on_off(const char *flag, const char *text, int *value);

/* Rejects, with -EINVAL, an output file path whose directory does not
 * exist or cannot be written, so that a run fails before its work rather
 * than after it. */
int moe_check_output_path(const char *flag, const char *path);

#endif
