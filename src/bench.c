/*
 * bench.c - placeholder until the benchmark lands; see moe_bench.h.
 */
#include "moe_bench.h"
#include "moe_error.h"

#include <errno.h>

void moe_bench_options_default(struct moe_bench_options *o)
{
    *o = (struct moe_bench_options){0};
}

int moe_bench_parse(struct moe_bench_options *o, int argc, char **argv)
{
    (void)o;
    (void)argc;
    (void)argv;
    return 0;
}

void moe_bench_usage(FILE *out)
{
    fprintf(out, "usage: moe-ep bench\n");
}

int moe_bench(const struct moe_bench_options *o, FILE *out)
{
    (void)o;
    (void)out;
    return moe_fail(-ENOSYS, "bench is not built yet");
}
