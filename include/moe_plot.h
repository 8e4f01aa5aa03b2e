/*
 * moe_plot.h - the SVG pictures of `moe-ep run --plot DIR`.
 *
 * Each of the three files is a standalone SVG 1.1 document that a browser
 * opens:
 *   traffic.svg   heat map of the (R, R) dispatch traffic matrix
 *   experts.svg   tokens per expert, with the dropped part and the mean
 *   timeline.svg  one row per rank with its five steps and its waits
 * All three show the last forward of a --steps run, except that the
 * timeline shows an earlier one when a rank's trace buffer filled up
 * before the last forward. The elements carry ids and data-* attributes
 * with the plotted values, so that tests and scripts can read them back
 * (see src/plot.c).
 */
#ifndef MOE_PLOT_H
#define MOE_PLOT_H

#include "moe_run.h"

/* Names of the files moe_plot_write() writes, NULL-terminated. */
extern const char *const moe_plot_files[];

/* Returns 1 when `name` (a file name without a directory) is one of
 * moe_plot_files. */
int moe_plot_is_file_name(const char *name);

/* Checks before a run that `dir` can become the --plot directory: each
 * part of the path that exists is a directory, the deepest existing one is
 * writable, and no plot file in it is a directory. Returns 0, or -EINVAL
 * with a message that names --plot, `dir` and the reason. */
int moe_plot_check_dir(const char *dir);

/* Writes the plot files of `result` into `dir`, creating it and its
 * parents if missing. Each file is replaced as moe_write_file() does, so a
 * failure leaves the old file. The timeline needs result->trace; without
 * it the timeline shows the text "no trace was recorded". Returns 0, -ENOMEM, or
 * -EINVAL or -errno with a message naming --plot and the file. */
int moe_plot_write(const char *dir, const struct moe_run_result *result);

#endif
