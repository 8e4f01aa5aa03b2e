/*
 * dump.c - writes the stages of one forward as .npy files and checks the
 * distributed stages against the golden path.
 *
 * The dispatch layout files use the terms of DeepEP's get_dispatch_layout:
 * num_tokens_per_rank, num_tokens_per_expert and is_token_in_rank. One
 * difference: moe-ep sends one row per (token, expert) pair, so a token
 * with two experts on one rank reaches it twice, where DeepEP sends it
 * once. The receive files of each rank list those rows in the order the
 * rank receives them: by source rank, then by expert, then by token.
 */
#include "moe_dump.h"
#include "moe_diff.h"
#include "moe_error.h"
#include "moe_file.h"
#include "moe_npy.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *const stage_names[MOE_STAGE_COUNT] = {
    [MOE_STAGE_LOGITS] = "router_logits",   [MOE_STAGE_SCORES] = "router_scores",
    [MOE_STAGE_IDS] = "topk_ids",           [MOE_STAGE_WEIGHTS] = "topk_weights",
    [MOE_STAGE_RECV_X] = "recv_x",          [MOE_STAGE_EXPERT_OUT] = "expert_out",
    [MOE_STAGE_SHARED_OUT] = "shared_out",
};

const char *moe_stage_name(enum moe_stage stage)
{
    return stage_names[stage];
}

int64_t moe_stage_count(const struct moe_shape *s, enum moe_stage stage)
{
    switch (stage) {
    case MOE_STAGE_LOGITS:
    case MOE_STAGE_SCORES:
        return s->tokens * s->experts;
    case MOE_STAGE_IDS:
    case MOE_STAGE_WEIGHTS:
        return s->tokens * s->top_k;
    case MOE_STAGE_RECV_X:
    case MOE_STAGE_EXPERT_OUT:
        return s->tokens * s->top_k * s->hidden;
    case MOE_STAGE_SHARED_OUT:
        return s->tokens * s->hidden;
    default:
        return 0;
    }
}

/* The rows rank `rank` receives, in receive order: for each source rank,
 * for each expert the rank owns, the source's tokens routed to it in token
 * order. Fills src_idx and expert (each with room for T * K entries) and
 * returns the row count. */
static int64_t received_rows(const struct moe_shape *s, int ranks, int rank,
                             const int32_t *ids, const uint8_t *kept,
                             int32_t *src_idx, int32_t *expert)
{
    int64_t expert_first, experts, rows = 0;
    moe_block_range(s->experts, ranks, rank, &expert_first, &experts);
    for (int src = 0; src < ranks; src++) {
        int64_t token_first, tokens;
        moe_block_range(s->tokens, ranks, src, &token_first, &tokens);
        for (int64_t e = expert_first; e < expert_first + experts; e++)
            for (int64_t t = token_first; t < token_first + tokens; t++)
                for (int64_t k = 0; k < s->top_k; k++)
                    if (ids[t * s->top_k + k] == e && (!kept || kept[t * s->top_k + k])) {
                        src_idx[rows] = (int32_t)t;
                        expert[rows] = (int32_t)e;
                        rows++;
                    }
    }
    return rows;
}

void moe_dump_check(struct moe_run_result *r, const struct moe_golden_info *g,
                    const float *tokens)
{
    const struct moe_shape *s = &r->options.shape;
    const void *golden[MOE_STAGE_COUNT] = {
        [MOE_STAGE_LOGITS] = g->logits,   [MOE_STAGE_SCORES] = g->scores,
        [MOE_STAGE_IDS] = g->expert_ids,  [MOE_STAGE_WEIGHTS] = g->weights,
        [MOE_STAGE_EXPERT_OUT] = g->expert_out, [MOE_STAGE_SHARED_OUT] = g->shared_out,
    };
    r->stage_mismatch = -1;

    /* The expected received rows: the token rows in the layout's order,
     * from the golden routing. */
    int64_t H = s->hidden, rows_all = s->tokens * s->top_k, at = 0;
    /* calloc: with drops fewer than T * K rows arrive, and the rest of the
     * stage is zero on both sides. */
    float *expected = calloc((size_t)(rows_all * H + 1), sizeof(float));
    int32_t *src_idx = malloc((size_t)(rows_all + 1) * sizeof(int32_t));
    int32_t *expert = malloc((size_t)(rows_all + 1) * sizeof(int32_t));
    if (expected && src_idx && expert && g->expert_ids) {
        for (int rank = 0; rank < r->options.ranks; rank++) {
            int64_t n = received_rows(s, r->options.ranks, rank, g->expert_ids, g->kept,
                                      src_idx, expert);
            for (int64_t i = 0; i < n; i++)
                memcpy(expected + (at + i) * H, tokens + (int64_t)src_idx[i] * H,
                       (size_t)H * sizeof(float));
            at += n;
        }
        golden[MOE_STAGE_RECV_X] = expected;
    }

    for (int stage = 0; stage < MOE_STAGE_COUNT; stage++) {
        struct moe_compare *c = &r->stage_check[stage];
        *c = (struct moe_compare){.equal = 1, .first = -1};
        if (!r->stage[stage])
            continue;
        if (!golden[stage]) { /* only when out of memory above */
            c->equal = 0;
        } else {
            /* int32 ids compare as 4-byte patterns just like floats */
            moe_compare_bits(r->stage[stage], golden[stage], moe_stage_count(s, stage), c);
        }
        if (!c->equal && r->stage_mismatch < 0)
            r->stage_mismatch = stage;
    }
    free(expected);
    free(src_idx);
    free(expert);
}

/* Copies `path` into buf without its trailing slashes, keeping "/". */
static int strip_trailing_slashes(const char *path, char *buf, size_t size)
{
    if (snprintf(buf, size, "%s", path) >= (int)size)
        return -1;
    size_t length = strlen(buf);
    while (length > 1 && buf[length - 1] == '/')
        buf[--length] = '\0';
    return 0;
}

int moe_dump_check_dir(const char *dir, const char *output_path)
{
    char path[4096];
    if (strip_trailing_slashes(dir, path, sizeof path) != 0)
        return moe_fail(-EINVAL, "invalid --dump directory: name too long");

    if (output_path) {
        char output[4096];
        struct stat dir_st, output_st;
        int same = strip_trailing_slashes(output_path, output, sizeof output) == 0 &&
                   !strcmp(output, path);
        if (stat(path, &dir_st) == 0 && stat(output_path, &output_st) == 0 &&
            dir_st.st_dev == output_st.st_dev && dir_st.st_ino == output_st.st_ino)
            same = 1;
        if (same)
            return moe_fail(-EINVAL, "invalid --dump directory '%s': it is the "
                            "--output file '%s'", dir, output_path);
    }

    /* Walk the path from the root. The deepest part that exists must be a
     * writable directory, because the run creates the rest in it. */
    char deepest[4096] = ".";
    for (char *p = path[0] == '/' ? path + 1 : path;; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        char saved = *p;
        *p = '\0';
        struct stat st;
        if (path[0] != '\0' && stat(path, &st) != 0) {
            if (errno != ENOENT)
                return moe_fail(-EINVAL, "invalid --dump directory '%s': '%s': %s",
                                dir, path, strerror(errno));
            *p = saved;
            break;
        }
        if (path[0] != '\0') {
            if (!S_ISDIR(st.st_mode))
                return moe_fail(-EINVAL, "invalid --dump directory '%s': '%s' is not "
                                "a directory", dir, path);
            snprintf(deepest, sizeof deepest, "%s", path);
        }
        *p = saved;
        if (saved == '\0')
            break;
    }
    if (access(deepest, W_OK) != 0)
        return moe_fail(-EINVAL, "invalid --dump directory '%s': directory '%s' is "
                        "not writable: %s", dir, deepest, strerror(errno));
    return 0;
}

/* Removes the stage files of an earlier dump that this one does not
 * replace, so that `compare` never reads a stage of another run: rank
 * files beyond this run's ranks, and shared_out.npy when this layer has
 * no shared expert. */
static int remove_stale_files(const char *dir, int ranks, int has_shared)
{
    DIR *stream = opendir(dir);
    if (!stream)
        return moe_fail(-EINVAL, "invalid --dump directory '%s': cannot list it: %s",
                        dir, strerror(errno));
    int rc = 0;
    struct dirent *entry;
    while (rc == 0 && (entry = readdir(stream)) != NULL) {
        const char *name = entry->d_name;
        int64_t rank;
        int stale_rank_file = moe_dump_rank_file(name, &rank) && rank >= ranks;
        if (!stale_rank_file && (has_shared || strcmp(name, "shared_out.npy") != 0))
            continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, name);
        if (unlink(path) != 0 && errno != ENOENT)
            rc = moe_fail(-EINVAL, "invalid --dump directory '%s': cannot remove "
                          "'%s' of an earlier dump: %s", dir, path, strerror(errno));
    }
    closedir(stream);
    return rc;
}

static int write_array(const char *dir, const char *name, enum moe_npy_dtype dtype,
                       int ndim, const int64_t *shape, const void *data)
{
    char path[4096];
    if (snprintf(path, sizeof path, "%s/%s.npy", dir, name) >= (int)sizeof path)
        return moe_fail(-EINVAL, "invalid --dump directory: name too long");
    return moe_npy_write(path, dtype, ndim, shape, data);
}

/* Writes the dispatch layout: tokens per rank and per expert, and which
 * ranks each token goes to. */
static int write_layout(const char *dir, const struct moe_run_result *r)
{
    const struct moe_shape *s = &r->options.shape;
    const int32_t *ids = r->stage[MOE_STAGE_IDS];
    int R = r->options.ranks;
    int32_t *per_rank = calloc((size_t)R, sizeof(int32_t));
    int32_t *per_expert = calloc((size_t)s->experts, sizeof(int32_t));
    uint8_t *in_rank = calloc((size_t)(s->tokens * R) + 1, 1);
    int rc;
    if (!per_rank || !per_expert || !in_rank) {
        rc = moe_fail(-ENOMEM, "out of memory for the dispatch layout");
        goto out;
    }
    for (int64_t t = 0; t < s->tokens; t++)
        for (int64_t k = 0; k < s->top_k; k++) {
            int32_t e = ids[t * s->top_k + k];
            per_expert[e]++;
            in_rank[t * R + moe_expert_owner(s->experts, R, e)] = 1;
        }
    for (int64_t t = 0; t < s->tokens; t++)
        for (int rank = 0; rank < R; rank++)
            per_rank[rank] += in_rank[t * R + rank];

    int64_t rank_shape[1] = {R}, expert_shape[1] = {s->experts},
            token_rank_shape[2] = {s->tokens, R};
    if ((rc = write_array(dir, "num_tokens_per_rank", MOE_NPY_I32, 1, rank_shape,
                          per_rank)) ||
        (rc = write_array(dir, "num_tokens_per_expert", MOE_NPY_I32, 1, expert_shape,
                          per_expert)))
        goto out;
    rc = write_array(dir, "is_token_in_rank", MOE_NPY_BOOL, 2, token_rank_shape, in_rank);
out:
    free(per_rank);
    free(per_expert);
    free(in_rank);
    return rc;
}

/* Writes rank{r}_recv_src_idx, rank{r}_recv_expert and rank{r}_recv_x for
 * every rank. */
static int write_received(const char *dir, const struct moe_run_result *r)
{
    const struct moe_shape *s = &r->options.shape;
    int64_t rows_all = s->tokens * s->top_k, at = 0;
    int32_t *src_idx = malloc((size_t)(rows_all + 1) * sizeof(int32_t));
    int32_t *expert = malloc((size_t)(rows_all + 1) * sizeof(int32_t));
    const float *recv_x = r->stage[MOE_STAGE_RECV_X];
    int rc = 0;
    if (!src_idx || !expert) {
        rc = moe_fail(-ENOMEM, "out of memory for the received rows");
        goto out;
    }
    for (int rank = 0; rank < r->options.ranks && rc == 0; rank++) {
        int64_t n = received_rows(s, r->options.ranks, rank, r->stage[MOE_STAGE_IDS],
                                  r->kept, src_idx, expert);
        int64_t shape[2] = {n, s->hidden};
        char name[64];
        snprintf(name, sizeof name, "rank%d_recv_src_idx", rank);
        if ((rc = write_array(dir, name, MOE_NPY_I32, 1, shape, src_idx)))
            break;
        snprintf(name, sizeof name, "rank%d_recv_expert", rank);
        if ((rc = write_array(dir, name, MOE_NPY_I32, 1, shape, expert)))
            break;
        snprintf(name, sizeof name, "rank%d_recv_x", rank);
        rc = write_array(dir, name, MOE_NPY_F32, 2, shape, recv_x + at * s->hidden);
        at += n;
    }
out:
    free(src_idx);
    free(expert);
    return rc;
}

int moe_dump_write(const char *dir, const struct moe_run_result *r, const float *tokens)
{
    const struct moe_shape *s = &r->options.shape;
    int64_t T = s->tokens, H = s->hidden, E = s->experts, K = s->top_k;
    int64_t th[2] = {T, H}, te[2] = {T, E}, tk[2] = {T, K}, tkh[3] = {T, K, H};
    int rc;
    if ((rc = moe_make_directories("--dump", dir)) ||
        (rc = remove_stale_files(dir, r->options.ranks,
                                 r->stage[MOE_STAGE_SHARED_OUT] != NULL)) ||
        (rc = write_array(dir, "tokens", MOE_NPY_F32, 2, th, tokens)) ||
        (rc = write_array(dir, "router_logits", MOE_NPY_F32, 2, te,
                          r->stage[MOE_STAGE_LOGITS])) ||
        (rc = write_array(dir, "router_scores", MOE_NPY_F32, 2, te,
                          r->stage[MOE_STAGE_SCORES])) ||
        (rc = write_array(dir, "topk_ids", MOE_NPY_I32, 2, tk, r->stage[MOE_STAGE_IDS])) ||
        (rc = write_array(dir, "topk_weights", MOE_NPY_F32, 2, tk,
                          r->stage[MOE_STAGE_WEIGHTS])) ||
        (rc = write_array(dir, "topk_kept", MOE_NPY_BOOL, 2, tk, r->kept)) ||
        (rc = write_layout(dir, r)) || (rc = write_received(dir, r)) ||
        (rc = write_array(dir, "expert_out", MOE_NPY_F32, 3, tkh,
                          r->stage[MOE_STAGE_EXPERT_OUT])))
        return rc;
    if (r->stage[MOE_STAGE_SHARED_OUT] &&
        (rc = write_array(dir, "shared_out", MOE_NPY_F32, 2, th,
                          r->stage[MOE_STAGE_SHARED_OUT])))
        return rc;
    return write_array(dir, "output", MOE_NPY_F32, 2, th, r->output);
}
