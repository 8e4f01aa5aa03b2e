/*
 * explain_steps.c - the ten steps of one forward of `moe-ep explain`,
 * printed from a finished run (struct moe_explain_run).
 *
 * Prints only; every figure comes from the run's arrays, its call log, the
 * records read back from its rings or its golden check. Lines stay under
 * 100 columns.
 */
#include "moe_explain.h"
#include "moe_aux.h"
#include "moe_dump.h"

#include <inttypes.h>
#include <string.h>

/* Shorthands for the dimensions of a run. */
#define T_OF(run) ((run)->weights.shape.tokens)
#define H_OF(run) ((run)->weights.shape.hidden)
#define E_OF(run) ((run)->weights.shape.experts)
#define K_OF(run) ((run)->weights.shape.top_k)
#define R MOE_EXPLAIN_RANKS

static void heading(FILE *out, int step, const char *title)
{
    fprintf(out, "\n== Step %d of %d: %s ==\n", step, MOE_EXPLAIN_STEPS, title);
}

static int token_rank(const struct moe_explain_run *run, int64_t t)
{
    for (int r = 0; r < R; r++) {
        int64_t first, count;
        moe_block_range(T_OF(run), R, r, &first, &count);
        if (t >= first && t < first + count)
            return r;
    }
    return -1;
}

/* Prints "first to last", "first" or "none" for a block. */
static void print_block(FILE *out, int64_t first, int64_t count)
{
    if (count == 0)
        fprintf(out, "none");
    else if (count == 1)
        fprintf(out, "%" PRId64, first);
    else
        fprintf(out, "%" PRId64 " to %" PRId64, first, first + count - 1);
}

/* ---- step 1: tokens --------------------------------------------------- */

static void step_tokens(FILE *out, const struct moe_explain_run *run)
{
    int64_t T = T_OF(run), H = H_OF(run), E = E_OF(run);
    heading(out, 1, "each rank's tokens");
    fprintf(out,
            "A batch of T = %" PRId64 " tokens, each a vector of H = %" PRId64 " floats, is "
            "split over the\nR = %d ranks in contiguous blocks. Each rank routes only its "
            "own tokens and owns a\nblock of the E = %" PRId64 " experts.\n",
            T, H, R, E);
    for (int r = 0; r < R; r++) {
        int64_t first, count;
        fprintf(out, "  rank %d: tokens ", r);
        moe_block_range(T, R, r, &first, &count);
        print_block(out, first, count);
        fprintf(out, ", experts ");
        moe_block_range(E, R, r, &first, &count);
        print_block(out, first, count);
        fprintf(out, "\n");
    }
    fprintf(out, "\n  token  rank");
    for (int64_t h = 0; h < H; h++)
        fprintf(out, "     x[%" PRId64 "]", h);
    fprintf(out, "\n");
    for (int64_t t = 0; t < T; t++) {
        fprintf(out, "  %5" PRId64 "  %4d", t, token_rank(run, t));
        for (int64_t h = 0; h < H; h++)
            fprintf(out, "  %7.4f", (double)run->tokens[t * H + h]);
        fprintf(out, "\n");
    }
}

/* ---- step 2: gate ----------------------------------------------------- */

static void step_gate(FILE *out, const struct moe_explain_run *run)
{
    int64_t T = T_OF(run), E = E_OF(run);
    heading(out, 2, "gate logits and probabilities");
    fprintf(out,
            "Each rank multiplies its tokens by the gate matrix (E x H), which gives one "
            "logit per\nexpert and token. A softmax over a token's E logits turns them "
            "into probabilities\nthat add up to 1.\n\n");
    fprintf(out, "  %-12s%-*s  %s\n", "", (int)(E * 8), "  logits", "  probabilities");
    fprintf(out, "  token  rank");
    for (int part = 0; part < 2; part++) {
        fprintf(out, "%s", part ? "  |" : "");
        for (int64_t e = 0; e < E; e++) {
            char label[24];
            snprintf(label, sizeof label, "e%" PRId64, e);
            fprintf(out, " %7s", label);
        }
    }
    fprintf(out, "\n");
    for (int64_t t = 0; t < T; t++) {
        fprintf(out, "  %5" PRId64 "  %4d", t, token_rank(run, t));
        for (int64_t e = 0; e < E; e++)
            fprintf(out, " %7.4f", (double)run->logits[t * E + e]);
        fprintf(out, "  |");
        for (int64_t e = 0; e < E; e++)
            fprintf(out, " %7.4f", (double)run->scores[t * E + e]);
        fprintf(out, "\n");
    }
}

/* ---- step 3: top-k ---------------------------------------------------- */

static void step_topk(FILE *out, const struct moe_explain_run *run)
{
    int64_t T = T_OF(run), K = K_OF(run);
    heading(out, 3, "the chosen experts and their weights");
    fprintf(out, "The router keeps the K = %" PRId64 " experts with the highest "
            "probabilities (a tie goes to the\nlower expert)", K);
    if (run->weights.router.renormalize)
        fprintf(out, " and divides their probabilities by their sum, so that\nthe "
                "weights of a token add up to 1.\n\n");
    else
        fprintf(out, ", and their probabilities are the weights.\n\n");
    fprintf(out, "  token  rank");
    for (int64_t k = 0; k < K; k++)
        fprintf(out, "   slot %" PRId64 ": expert  weight", k);
    fprintf(out, "\n");
    for (int64_t t = 0; t < T; t++) {
        fprintf(out, "  %5" PRId64 "  %4d", t, token_rank(run, t));
        for (int64_t k = 0; k < K; k++)
            fprintf(out, "   %14" PRId32 "  %6.4f", run->ids[t * K + k],
                    (double)run->topk_weights[t * K + k]);
        fprintf(out, "\n");
    }
}

/* ---- step 4: layout --------------------------------------------------- */

/* Rows rank src routes to rank dst: its rows for dst's experts. */
static int64_t rows_between(const struct moe_explain_run *run, int src, int dst)
{
    int64_t E = E_OF(run), first, count, rows = 0;
    moe_block_range(E, R, dst, &first, &count);
    for (int64_t e = first; e < first + count; e++)
        rows += run->counts[src * E + e];
    return rows;
}

static void step_layout(FILE *out, const struct moe_explain_run *run)
{
    int64_t E = E_OF(run);
    heading(out, 4, "the dispatch layout");
    fprintf(out,
            "Each rank counts the rows it routes to each expert, one row per (token, "
            "expert), and\nthe ranks all-gather these counts. So before any row moves, "
            "every rank knows how\nmany rows it will send to and receive from each rank.\n\n");
    fprintf(out, "  rows routed");
    for (int64_t e = 0; e < E; e++) {
        char label[24];
        snprintf(label, sizeof label, "e%" PRId64, e);
        fprintf(out, " %5s", label);
    }
    fprintf(out, "\n");
    for (int r = 0; r < R; r++) {
        fprintf(out, "  by rank %-3d", r);
        for (int64_t e = 0; e < E; e++)
            fprintf(out, " %5" PRId64, run->counts[r * E + e]);
        fprintf(out, "\n");
    }
    fprintf(out, "  tokens per expert (column sums):");
    for (int64_t e = 0; e < E; e++) {
        int64_t sum = 0;
        for (int r = 0; r < R; r++)
            sum += run->counts[r * E + e];
        fprintf(out, " e%" PRId64 " %" PRId64 "%s", e, sum, e + 1 < E ? "," : "\n");
    }

    fprintf(out, "\n  send counts, rows rank i sends to rank j (the rows for j's experts):\n");
    fprintf(out, "    i \\ j");
    for (int d = 0; d < R; d++)
        fprintf(out, "  %5d", d);
    fprintf(out, "\n");
    for (int s = 0; s < R; s++) {
        fprintf(out, "    %5d", s);
        for (int d = 0; d < R; d++)
            fprintf(out, "  %5" PRId64, rows_between(run, s, d));
        fprintf(out, "\n");
    }
    fprintf(out, "  The diagonal stays on its rank. The other rows cross between the "
            "processes,\n  in the dispatch and again, as expert outputs, in the combine.\n");
}

/* ---- step 5: ring records --------------------------------------------- */

/* Prints the counts or the router stats of a layout record. */
static void describe_layout_record(FILE *out, const struct moe_explain_run *run,
                                   const struct moe_explain_call *call,
                                   const struct moe_explain_record *rec)
{
    int64_t E = E_OF(run), words = rec->length / 8;
    if (rec->length % 8 != 0) {
        fprintf(out, "        %" PRIu32 " bytes\n", rec->length);
        return;
    }
    int64_t values[1 + MOE_EXPLAIN_EXPERTS];
    memcpy(values, rec->payload, (size_t)(words < 1 + E ? words : 1 + E) * 8);
    if (call->kind == MOE_EXPLAIN_ALLGATHER && words == E) {
        fprintf(out, "        rank %d's rows per expert:", rec->src);
        for (int64_t e = 0; e < E; e++)
            fprintf(out, " %" PRId64, values[e]);
        fprintf(out, "\n");
        return;
    }
    if (call->kind == MOE_EXPLAIN_ALLREDUCE && words == moe_router_stats_len(E)) {
        fprintf(out, "        rank %d's router stats: %" PRId64 " tokens, assignments "
                "per expert", rec->src, values[0]);
        for (int64_t e = 0; e < E; e++)
            fprintf(out, " %" PRId64, values[1 + e]);
        fprintf(out, ",\n        then %" PRId64 " words of exact sums of the probabilities "
                "for the aux loss\n", words - 1 - E);
        return;
    }
    fprintf(out, "        %" PRId64 " values of 8 bytes\n", words);
}

/* Returns the token whose row `values` is: a token row in a dispatch, or
 * expert e's output row for the token in a combine. -1 when none matches. */
static int64_t token_of_row(const struct moe_explain_run *run, int combine, int64_t e,
                            const float *values)
{
    int64_t H = H_OF(run), K = K_OF(run);
    if (!combine)
        return moe_explain_find_token(run, values);
    for (int64_t i = 0; i < T_OF(run) * K; i++)
        if (run->ids[i] == e &&
            !memcmp(run->expert_out + i * H, values, (size_t)H * sizeof(float)))
            return i / K;
    return -1;
}

/* Prints the rows of a dispatch or combine record, one line per expert:
 * the tokens a dispatch row belongs to, or whose output a combine row is.
 * `first_row` is the record's first row within its message. The rows of a
 * message are in (expert, token) order over the experts of the receiving
 * rank (dispatch) or of the sending rank (combine), kept_counts[home][e]
 * rows each, where home is the rank of the tokens. */
static void describe_row_record(FILE *out, const struct moe_explain_run *run,
                                const struct moe_explain_call *call,
                                const struct moe_explain_record *rec, int64_t first_row)
{
    int64_t E = E_OF(run), row_bytes = H_OF(run) * (int64_t)sizeof(float);
    int64_t rows = rec->length / row_bytes;
    int combine = call->step == MOE_STEP_COMBINE;
    int owner = combine ? rec->src : rec->dst, home = combine ? rec->dst : rec->src;
    int64_t expert_first, expert_count;
    moe_block_range(E, R, owner, &expert_first, &expert_count);

    int64_t row = 0, before = 0;
    for (int64_t e = expert_first; e < expert_first + expert_count && row < rows; e++) {
        int64_t n = run->kept_counts[home * E + e], shown = 0;
        /* This record's rows of expert e: those past first_row. */
        int64_t skip = first_row > before ? first_row - before : 0;
        int64_t take = n - skip < rows - row ? n - skip : rows - row;
        before += n;
        if (take <= 0)
            continue;
        const char *prefix = "";
        if (combine)
            prefix = take > 1 ? "outputs for " : "output for ";
        fprintf(out, "        expert %" PRId64 ": %stoken%s", e, prefix, take > 1 ? "s" : "");
        for (int64_t j = 0; j < take; j++, row++) {
            const float *values = (const float *)(rec->payload + row * row_bytes);
            int64_t token = token_of_row(run, combine, e, values);
            if (token >= 0)
                fprintf(out, "%s %" PRId64, shown++ ? "," : "", token);
            else
                fprintf(out, "%s (a row that matches no %s)", shown++ ? "," : "",
                        combine ? "output" : "token");
        }
        fprintf(out, "\n");
    }
}

/* Prints the calls of both ranks side by side, in tag order. */
static void print_calls(FILE *out, const struct moe_explain_run *run)
{
    fprintf(out, "The collective calls of the forward, in order. Each call takes the next "
            "tag, so the\nranks must make the same calls in the same order. Times in ms, "
            "with the time spent\nwaiting on the peer in brackets%s:\n",
            run->layer.direct ? "; a note exchange lasts until its last note" : "");
    fprintf(out, "  tag  step             call        rank 0            rank 1\n");
    for (int64_t i = 0; i < run->call_count[0]; i++) {
        const struct moe_explain_call *c = &run->calls[0][i];
        fprintf(out, "  %3" PRIu32 "  %-15s  %-10s", c->first_tag, moe_step_name(c->step),
                moe_explain_call_name(c->kind));
        for (int r = 0; r < R; r++) {
            const struct moe_explain_call *mine = moe_explain_call_of_tag(run, r, c->first_tag);
            if (mine)
                fprintf(out, "  %6.3f (%6.3f)", (double)(mine->end_ns - mine->start_ns) / 1e6,
                        (double)mine->wait_ns / 1e6);
            else
                fprintf(out, "  %-15s", "(not logged)");
        }
        fprintf(out, "\n");
    }
}

/* Prints note `index` of a note exchange on ring src -> dst: in the
 * dispatch, the rows src wrote for one of dst's experts; in the combine,
 * the rows src computed for dst. */
static void describe_note(FILE *out, const struct moe_explain_run *run,
                          const struct moe_explain_call *call,
                          const struct moe_explain_record *rec, int64_t index)
{
    uint64_t value;
    memcpy(&value, rec->payload, sizeof value);
    if (call->step == MOE_STEP_DISPATCH) {
        int64_t first, count;
        moe_block_range(E_OF(run), R, rec->dst, &first, &count);
        if (index < count) {
            fprintf(out, "        expert %" PRId64 ": %" PRIu64 " row%s written into rank "
                    "%d's input window\n", first + index, value, value == 1 ? "" : "s",
                    rec->dst);
            return;
        }
    } else if (call->step == MOE_STEP_COMBINE && index == 0) {
        fprintf(out, "        the outputs of %" PRIu64 " row%s of rank %d are in rank %d's "
                "output window\n", value, value == 1 ? "" : "s", rec->dst, rec->src);
        return;
    }
    fprintf(out, "        value %" PRIu64 "\n", value);
}

/* Prints one record of ring src -> dst and what its payload holds.
 * `message_bytes` is the payload of the same call before it, and
 * `in_message` the records of the same call before it. */
static void describe_record(FILE *out, const struct moe_explain_run *run,
                            const struct moe_explain_record *rec, int64_t number,
                            int64_t message_bytes, int64_t in_message)
{
    int64_t H = H_OF(run), row_bytes = H * (int64_t)sizeof(float);
    const struct moe_explain_call *call = moe_explain_call_of_tag(run, rec->src, rec->tag);
    fprintf(out, "  #%" PRId64 "  tag %" PRIu32 "  %s, %s, %" PRIu32 " bytes", number,
            rec->tag, call ? moe_step_name(call->step) : "unknown step",
            call ? moe_explain_call_name(call->kind) : "unknown call", rec->length);
    int rows_of_tokens = call && (call->step == MOE_STEP_DISPATCH ||
                                  call->step == MOE_STEP_COMBINE) &&
                         call->kind == MOE_EXPLAIN_ALLTOALLV &&
                         rec->length % row_bytes == 0 && message_bytes % row_bytes == 0;
    if (rows_of_tokens) {
        fprintf(out, " = %" PRId64 " rows of %" PRId64 " floats\n", rec->length / row_bytes,
                H);
        describe_row_record(out, run, call, rec, message_bytes / row_bytes);
    } else if (call && call->kind == MOE_EXPLAIN_NOTES && rec->length == sizeof(uint64_t)) {
        fprintf(out, "\n");
        describe_note(out, run, call, rec, in_message);
    } else if (call && call->step == MOE_STEP_LAYOUT) {
        fprintf(out, "\n");
        describe_layout_record(out, run, call, rec);
    } else {
        fprintf(out, "\n");
    }
}

static void step_rings(FILE *out, const struct moe_explain_run *run)
{
    heading(out, 5, "the records on the rings");
    fprintf(out,
            "Each ordered pair of ranks (i, j) has its own ring buffer in shared memory, "
            "which only\nrank i writes and only rank j reads, so it needs no lock. A "
            "record is an 8-byte header\n(payload length and tag) and the payload. A "
            "rank's rows for its own experts never\nenter a ring: it copies them "
            "locally.\n");
    if (run->layer.direct)
        fprintf(out,
                "This run uses the direct exchange, the default of moe-ep run: a sender "
                "writes each row\nstraight into the input window of the expert's owner "
                "in the shared segment, so each\nbyte is copied once. The rings carry "
                "notes: after each expert's rows, how many were\nwritten, so that the "
                "owner can start that expert.\n");
    else
        fprintf(out,
                "Here the rows travel in the ring records, as in a textbook all-to-all "
                "(--exchange rings).\nmoe-ep run by default writes them straight into "
                "the owner's window instead; see\nmoe-ep explain --exchange direct.\n");
    for (int r = 0; r < R; r++)
        fprintf(out, "  ring %d -> %d: %" PRIu64 " bytes written\n", r, r,
                run->ring_bytes[r][r]);
    fprintf(out, "\n");
    print_calls(out, run);

    for (int s = 0; s < R; s++) {
        for (int d = 0; d < R; d++) {
            if (s == d)
                continue;
            int64_t n = 0;
            for (int64_t i = 0; i < run->record_count; i++)
                n += run->records[i].src == s && run->records[i].dst == d;
            fprintf(out, "\nring %d -> %d: rank %d wrote %" PRId64 " records, %" PRIu64
                    " bytes with headers and padding.\nA ring is first in, first out: "
                    "rank %d read them in this order.\n", s, d, s, n,
                    run->ring_bytes[s][d], d);
            uint32_t tag = 0;
            int64_t message_bytes = 0, in_message = 0, number = 0;
            for (int64_t i = 0; i < run->record_count; i++) {
                const struct moe_explain_record *rec = &run->records[i];
                if (rec->src != s || rec->dst != d)
                    continue;
                if (rec->tag != tag) { /* the next call's records start */
                    message_bytes = 0;
                    in_message = 0;
                }
                tag = rec->tag;
                describe_record(out, run, rec, ++number, message_bytes, in_message);
                message_bytes += rec->length;
                in_message++;
            }
        }
    }
}

/* ---- step 6: received rows -------------------------------------------- */

/* Returns row j of the rows rank r received from rank src for expert e.
 * Rank r's rows follow the lower ranks' rows. Within them come one block
 * per source rank, in rank order, and within a block the rows of r's
 * experts in expert order, kept_counts[src][e] rows each. */
static const float *received_row(const struct moe_explain_run *run, int r, int src,
                                 int64_t e, int64_t j)
{
    int64_t E = E_OF(run), first, count, row = 0;
    moe_block_range(E, R, r, &first, &count);
    for (int lower = 0; lower < r; lower++)
        row += run->received[lower];
    for (int s = 0; s < src; s++)
        for (int64_t x = first; x < first + count; x++)
            row += run->kept_counts[s * E + x];
    for (int64_t x = first; x < e; x++)
        row += run->kept_counts[src * E + x];
    return run->recv_rows + (row + j) * H_OF(run);
}

static void step_received(FILE *out, const struct moe_explain_run *run)
{
    int64_t E = E_OF(run);
    heading(out, 6, "what each rank receives");
    if (run->layer.direct)
        fprintf(out,
                "Each rank receives the rows for its experts from every rank, itself "
                "included. Each\nsender wrote its rows at their final place in the "
                "owner's input window: expert by\nexpert, and within an expert the "
                "sources in rank order. Sources own increasing\nblocks of tokens, so "
                "each expert sees its rows in global token order, exactly as\nthe "
                "golden path builds them. Listed by source, the rows are:\n");
    else
        fprintf(out,
                "Each rank receives the rows for its experts from every rank, itself "
                "included, one\nblock per source rank, and each block in (expert, token) "
                "order. It then regroups\nthem expert by expert, so that each expert "
                "sees its rows in global token order,\nexactly as the golden path builds "
                "them.\n");
    for (int r = 0; r < R; r++) {
        int64_t first, count;
        moe_block_range(E, R, r, &first, &count);
        fprintf(out, "\n  rank %d received %" PRId64 " rows:\n", r, run->received[r]);
        for (int src = 0; src < R; src++) {
            if (src == r)
                fprintf(out, "    from rank %d (copied locally):", src);
            else if (run->layer.direct)
                fprintf(out, "    from rank %d (written into the window):", src);
            else
                fprintf(out, "    from rank %d (ring %d -> %d):", src, src, r);
            int any = 0;
            for (int64_t e = first; e < first + count; e++) {
                int64_t n = run->kept_counts[src * E + e];
                if (n == 0)
                    continue;
                fprintf(out, "%s expert %" PRId64 ": token%s", any ? ";" : "", e,
                        n > 1 ? "s" : "");
                for (int64_t j = 0; j < n; j++)
                    fprintf(out, "%s %" PRId64, j ? "," : "",
                            moe_explain_find_token(run, received_row(run, r, src, e, j)));
                any = 1;
            }
            fprintf(out, "%s\n", any ? "" : " nothing");
        }
        for (int64_t e = first; e < first + count; e++) {
            int64_t m = 0;
            for (int src = 0; src < R; src++)
                m += run->kept_counts[src * E + e];
            fprintf(out, "    expert %" PRId64 " input, M = %" PRId64 " rows:%s", e, m,
                    m ? " tokens" : " none");
            for (int src = 0, shown = 0; src < R; src++)
                for (int64_t j = 0; j < run->kept_counts[src * E + e]; j++)
                    fprintf(out, "%s %" PRId64, shown++ ? "," : "",
                            moe_explain_find_token(run, received_row(run, r, src, e, j)));
            fprintf(out, "\n");
        }
    }
}

/* ---- step 7: expert outputs ------------------------------------------- */

static void step_experts(FILE *out, const struct moe_explain_run *run)
{
    int64_t T = T_OF(run), H = H_OF(run), E = E_OF(run), K = K_OF(run);
    heading(out, 7, "the expert outputs");
    fprintf(out,
            "Each expert is a SwiGLU FFN, y = (silu(x W1^T) * (x W3^T)) W2^T with F = %"
            PRId64 ", run once over\nall M rows it received: one OpenBLAS sgemm per "
            "weight matrix. The rows below are the\noutputs as the combine brought them "
            "back to each token's rank.\n", run->weights.shape.ffn);
    if (run->layer.direct)
        fprintf(out, "With the direct exchange an expert starts as soon as the notes say "
                "that all its rows\nare in, while rows for the next expert may still be "
                "on their way.\n");
    for (int64_t e = 0; e < E; e++) {
        fprintf(out, "\n  expert %" PRId64 " on rank %d:\n", e, moe_expert_owner(E, R, e));
        int any = 0;
        for (int64_t t = 0; t < T; t++) {
            for (int64_t k = 0; k < K; k++) {
                if (run->ids[t * K + k] != e || !run->kept[t * K + k])
                    continue;
                fprintf(out, "    token %" PRId64 ":", t);
                for (int64_t h = 0; h < H; h++)
                    fprintf(out, "  %9.5f", (double)run->expert_out[(t * K + k) * H + h]);
                fprintf(out, "\n");
                any = 1;
            }
        }
        if (!any)
            fprintf(out, "    no rows\n");
    }
}

/* ---- step 8: combine -------------------------------------------------- */

/* The first token with an expert on another rank than its own, else 0. */
static int64_t token_to_show(const struct moe_explain_run *run)
{
    int64_t T = T_OF(run), E = E_OF(run), K = K_OF(run);
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < K; k++)
            if (moe_expert_owner(E, R, run->ids[t * K + k]) != token_rank(run, t))
                return t;
    return 0;
}

static void step_combine(FILE *out, const struct moe_explain_run *run)
{
    int64_t H = H_OF(run), E = E_OF(run), K = K_OF(run);
    int64_t t = token_to_show(run);
    heading(out, 8, "the weighted combine of one token");
    fprintf(out,
            "Back on its own rank, each token adds up its K expert outputs, each times "
            "its weight,\nin slot order and in float32. Token %" PRId64 " lives on rank %d and "
            "chose:\n", t, token_rank(run, t));
    for (int64_t k = 0; k < K; k++)
        fprintf(out, "  slot %" PRId64 ": expert %" PRId32 " on rank %d, weight w%" PRId64
                " = %.9g%s\n", k, run->ids[t * K + k],
                moe_expert_owner(E, R, run->ids[t * K + k]), k,
                (double)run->topk_weights[t * K + k],
                run->kept[t * K + k] ? "" : " (dropped: adds nothing)");
    fprintf(out, "So out[%" PRId64 "][h] = ", t);
    for (int64_t k = 0, shown = 0; k < K; k++)
        if (run->kept[t * K + k])
            fprintf(out, "%sw%" PRId64 " x y%" PRId64 "[h]", shown++ ? " + " : "", k, k);
    fprintf(out, ", where yk is slot k's expert output.\nWith 9 significant digits, which "
            "give back every float32 exactly:\n");
    for (int64_t h = 0; h < H; h++) {
        fprintf(out, "  h = %" PRId64 ":", h);
        for (int64_t k = 0, shown = 0; k < K; k++) {
            if (!run->kept[t * K + k])
                continue;
            fprintf(out, "%s%.9g x %.9g", shown++ ? " + " : " ",
                    (double)run->topk_weights[t * K + k],
                    (double)run->expert_out[(t * K + k) * H + h]);
        }
        fprintf(out, " = %.9g\n", (double)run->output[t * H + h]);
    }
}

/* ---- step 9: output --------------------------------------------------- */

static void step_output(FILE *out, const struct moe_explain_run *run)
{
    int64_t T = T_OF(run), H = H_OF(run);
    heading(out, 9, "the final output");
    fprintf(out, "Each rank writes the output rows of its own tokens; together they are "
            "the layer\noutput (T x H). 9 significant digits give back every float32 "
            "bit for bit.\n\n");
    fprintf(out, "  token  rank");
    for (int64_t h = 0; h < H; h++) {
        char label[32];
        snprintf(label, sizeof label, "out[%" PRId64 "]", h);
        fprintf(out, "  %16s", label);
    }
    fprintf(out, "\n");
    for (int64_t t = 0; t < T; t++) {
        fprintf(out, "  %5" PRId64 "  %4d", t, token_rank(run, t));
        for (int64_t h = 0; h < H; h++)
            fprintf(out, "  %16.9g", (double)run->output[t * H + h]);
        fprintf(out, "\n");
    }
}

/* ---- step 10: golden -------------------------------------------------- */

static void print_compare(FILE *out, const char *what, int64_t count,
                          const struct moe_compare *c)
{
    if (c->equal)
        fprintf(out, "  %-14s %4" PRId64 " values, bitwise equal\n", what, count);
    else
        fprintf(out, "  %-14s MISMATCH: %" PRId64 " of %" PRId64 " values differ, the "
                "first at index %" PRId64 ": %.9g, golden %.9g\n", what, c->mismatches,
                count, c->first, (double)c->actual, (double)c->expected);
}

static void step_golden(FILE *out, const struct moe_explain_run *run)
{
    const struct moe_shape *s = &run->weights.shape;
    heading(out, 10, "the golden comparison");
    fprintf(out,
            "This process now computes the same layer alone, with no ranks and no rings "
            "(the golden\npath), and compares the bits with memcmp, not within a "
            "tolerance. Exact equality\nholds because each expert gets the same rows in "
            "the same order on both paths, and\nevery sum runs in a fixed order.\n\n");
    print_compare(out, "output", s->tokens * s->hidden, &run->check);
    static const enum moe_stage stages[] = {
        MOE_STAGE_LOGITS, MOE_STAGE_SCORES, MOE_STAGE_IDS, MOE_STAGE_WEIGHTS,
        MOE_STAGE_RECV_X, MOE_STAGE_EXPERT_OUT,
    };
    for (size_t i = 0; i < sizeof stages / sizeof stages[0]; i++)
        print_compare(out, moe_stage_name(stages[i]), moe_stage_count(s, stages[i]),
                      &run->stage_check[stages[i]]);
    fprintf(out, "  %-14s %4" PRId64 " values, %s\n", "drop flags", s->tokens * s->top_k,
            run->kept_equal ? "equal" : "MISMATCH");
    fprintf(out, "Bitwise equality holds within one build and one OpenBLAS on one machine. "
            "On a GPU,\natomic adds and a different order of accumulation can change the last "
            "bits.\n");
}

void moe_explain_print_step(FILE *out, int step, const struct moe_explain_run *run)
{
    static void (*const steps[MOE_EXPLAIN_STEPS])(FILE *, const struct moe_explain_run *) = {
        step_tokens,   step_gate,    step_topk,    step_layout, step_rings,
        step_received, step_experts, step_combine, step_output, step_golden,
    };
    if (step >= 1 && step <= MOE_EXPLAIN_STEPS)
        steps[step - 1](out, run);
}
