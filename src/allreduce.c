/*
 * allreduce.c - the int64 sum over all ranks, on the rings.
 *
 * Every rank gathers every rank's vector and adds them in rank order. For
 * the few kilobytes of router statistics this is one round of messages,
 * where a ring reduce-scatter would take 2(R - 1) rounds.
 */
#include "moe_comm.h"
#include "moe_error.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

int moe_allreduce_i64(struct moe_comm *c, int64_t *values, int64_t count)
{
    int R = c->ranks;
    uint64_t bytes = (uint64_t)count * sizeof(int64_t);
    int64_t *all = malloc((size_t)R * bytes + 1);
    if (!all)
        return moe_fail(-ENOMEM, "rank %d: out of memory for an all-reduce of "
                        "%lld values", c->rank, (long long)count);
    uint64_t before = c->bytes_sent[c->step];
    int rc = moe_allgather(c, values, bytes, all);
    c->allreduce_bytes += c->bytes_sent[c->step] - before;
    if (rc == 0) {
        memcpy(values, all, (size_t)bytes);
        for (int r = 1; r < R; r++) {
            const int64_t *part = all + (int64_t)r * count;
            for (int64_t i = 0; i < count; i++)
                values[i] += part[i];
        }
    }
    free(all);
    return rc;
}
