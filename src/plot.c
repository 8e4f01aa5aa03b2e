/*
 * plot.c - the SVG pictures of `moe-ep run --plot DIR`.
 *
 * Runs in the launcher (or MPI rank 0) after the golden check, from the
 * copies it took of the run area, like the --stats and --trace files.
 * Each picture is printed into a memory stream and then written with
 * moe_write_file(), so a failed write leaves the old file.
 *
 * The SVG is plain SVG 1.1 with no script and no external reference.
 * Every plotted element has an id and data-* attributes that repeat its
 * value, which is what tests/test_plot.c reads back:
 *   traffic.svg   rect id="cell-I-J": data-rows, data-bytes, for I, J < R
 *   experts.svg   rect id="kept-E": data-routed, data-kept, data-dropped,
 *                 for every expert; rect id="dropped-E" only for an expert
 *                 that dropped assignments; line id="mean"
 *   timeline.svg  g id="rank-R", each with five rect class="step" and a
 *                 rect class="wait" per wait span of the plotted forward
 * Coordinates are in CSS pixels.
 */
#include "moe_plot.h"
#include "moe_error.h"
#include "moe_file.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

const char *const moe_plot_files[] = {"traffic.svg", "experts.svg", "timeline.svg", NULL};

int moe_plot_is_file_name(const char *name)
{
    for (int i = 0; moe_plot_files[i]; i++)
        if (!strcmp(name, moe_plot_files[i]))
            return 1;
    return 0;
}

/* The steps of one forward, in order, as the report and the trace name
 * them. */
static const int plot_steps[] = {MOE_STEP_ROUTE, MOE_STEP_LAYOUT, MOE_STEP_DISPATCH,
                                 MOE_STEP_COMPUTE, MOE_STEP_COMBINE};
#define PLOT_STEPS ((int)(sizeof plot_steps / sizeof plot_steps[0]))
static const char *const step_colors[PLOT_STEPS] = {"#8ecae6", "#b39ddb", "#f4a261",
                                                    "#90be6d", "#e9c46a"};

#define FONT "DejaVu Sans, Helvetica, Arial, sans-serif"
#define KEPT_COLOR "#4a7fb5"
#define DROPPED_COLOR "#d1495b"
#define LOCAL_COLOR "#e76f51"

/* ---- SVG text helpers ----------------------------------------------------- */

/* Writes `text` with the five XML special characters escaped, so that it
 * is safe both as element text and inside a quoted attribute. */
static void put_escaped(FILE *out, const char *text)
{
    for (const char *p = text; *p; p++) {
        switch (*p) {
        case '&': fputs("&amp;", out); break;
        case '<': fputs("&lt;", out); break;
        case '>': fputs("&gt;", out); break;
        case '"': fputs("&quot;", out); break;
        case '\'': fputs("&apos;", out); break;
        default: fputc(*p, out);
        }
    }
}

/* Opens the document: the SVG root, a white background, the title as the
 * document's <title> and as the first line of text, and the subtitle
 * under it. Both texts are escaped here. */
static void begin_svg(FILE *out, double width, double height, const char *title,
                      const char *subtitle)
{
    /* Widen the picture for a long subtitle, such as a checkpoint's path.
     * 6.6 px is a little above the mean width of a 12 px character. */
    width = fmax(width, 32 + 6.6 * (double)strlen(subtitle));
    fprintf(out, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
            "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" "
            "width=\"%.0f\" height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
            "font-family=\"" FONT "\" font-size=\"12\">\n<title>", width, height,
            width, height);
    put_escaped(out, title);
    fprintf(out, "</title>\n<rect width=\"100%%\" height=\"100%%\" fill=\"#ffffff\"/>\n"
            "<text x=\"16\" y=\"24\" font-size=\"16\" font-weight=\"bold\">");
    put_escaped(out, title);
    fprintf(out, "</text>\n<text x=\"16\" y=\"44\" fill=\"#555555\">");
    put_escaped(out, subtitle);
    fprintf(out, "</text>\n");
}

/* Writes one line of text at (x, y). `anchor` is start, middle or end. */
static void put_text(FILE *out, double x, double y, const char *anchor, const char *attrs,
                     const char *text)
{
    fprintf(out, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"%s\"%s%s>", x, y, anchor,
            attrs[0] ? " " : "", attrs);
    put_escaped(out, text);
    fprintf(out, "</text>\n");
}

/* Returns a round tick spacing (1, 2 or 5 times a power of ten) that cuts
 * `span` into about `ticks` intervals. */
static double tick_step(double span, int ticks)
{
    if (!(span > 0))
        return 1;
    double raw = span / ticks, magnitude = pow(10, floor(log10(raw)));
    double f = raw / magnitude;
    if (f <= 1)
        return magnitude;
    if (f <= 2)
        return 2 * magnitude;
    if (f <= 5)
        return 5 * magnitude;
    return 10 * magnitude;
}

/* Prints a tick label with as many decimals as the tick spacing needs. */
static void format_tick(char *buf, size_t size, double value, double step)
{
    int decimals = step >= 1 ? 0 : (int)ceil(-log10(step) - 1e-9);
    snprintf(buf, size, "%.*f", decimals, value);
}

/* Fills `text` with the run's shape and layer, the second line of every
 * picture, and with `forwards` set, which forward of a --steps run the
 * picture shows. */
static void describe_run(char *text, size_t size, const struct moe_run_result *r,
                         int forwards)
{
    const struct moe_run_options *o = &r->options;
    const struct moe_shape *s = &o->shape;
    int n = snprintf(text, size, "%d rank%s%s, %" PRId64 " tokens, hidden %" PRId64
                     ", %" PRId64 " experts, top-%" PRId64, o->ranks,
                     o->ranks == 1 ? "" : "s",
                     o->transport == MOE_TRANSPORT_MPI ? " over MPI" : "", s->tokens,
                     s->hidden, s->experts, s->top_k);
    if (n < 0 || (size_t)n >= size)
        return;
    if (o->model_dir)
        n += snprintf(text + n, size - (size_t)n, "; %s layer %" PRId64,
                      r->family ? r->family : "?", r->layer);
    else
        n += snprintf(text + n, size - (size_t)n, "; random layer, seed %" PRIu64,
                      o->seed);
    if (n >= 0 && (size_t)n < size && o->skew > 0)
        n += snprintf(text + n, size - (size_t)n, ", skew %g", o->skew);
    if (n >= 0 && (size_t)n < size && r->capacity.limit >= 0)
        n += snprintf(text + n, size - (size_t)n, ", capacity %" PRId64,
                      r->capacity.limit);
    if (n >= 0 && (size_t)n < size && forwards && o->steps > 1)
        snprintf(text + n, size - (size_t)n, "; last of %" PRId64 " forwards",
                 o->steps);
}

/* ---- traffic.svg ------------------------------------------------------------ */

/* Maps t in [0, 1] to a colour from pale to dark blue, by linear
 * interpolation between five stops. */
static void heat_color(double t, char out[8])
{
    static const unsigned char stops[5][3] = {
        {240, 245, 250}, {190, 215, 238}, {120, 170, 220}, {50, 110, 180}, {12, 50, 110},
    };
    if (!(t > 0))
        t = 0;
    if (t > 1)
        t = 1;
    double at = t * 4;
    int i = at >= 4 ? 3 : (int)at;
    double f = at - i;
    unsigned rgb[3];
    for (int c = 0; c < 3; c++)
        rgb[c] = (unsigned)lround(stops[i][c] + f * (stops[i + 1][c] - stops[i][c]));
    snprintf(out, 8, "#%02x%02x%02x", rgb[0], rgb[1], rgb[2]);
}

/* rows[i * R + j]: the rows rank i sent to rank j in the last dispatch,
 * which are the assignments that rank j's experts kept. */
static void traffic_rows(const struct moe_run_result *r, int64_t *rows)
{
    int R = r->options.ranks;
    int64_t E = r->options.shape.experts;
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            int64_t first, count, sum = 0;
            moe_block_range(E, R, j, &first, &count);
            for (int64_t e = first; e < first + count; e++)
                sum += r->kept_counts[i * E + e];
            rows[i * R + j] = sum;
        }
}

static void write_traffic(FILE *out, const struct moe_run_result *r)
{
    int R = r->options.ranks;
    uint64_t row_bytes = (uint64_t)r->options.shape.hidden * sizeof(float);
    int64_t rows[MOE_MAX_RANKS * MOE_MAX_RANKS];
    traffic_rows(r, rows);
    int64_t max = 0, sent[MOE_MAX_RANKS] = {0}, received[MOE_MAX_RANKS] = {0};
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            int64_t v = rows[i * R + j];
            max = v > max ? v : max;
            sent[i] += v;
            received[j] += v;
        }

    /* Cells shrink with R so that the grid stays about 360 px wide, within
     * 10 to 72 px each, but the grid is at least 240 px, the length of the
     * rotated axis title. */
    double cell = fmax(240.0 / R, fmin(72, fmax(10, 360.0 / R)));
    double gx = 96, gy = 112, grid = cell * R;
    double legend_x = gx + grid + 86, legend_h = fmax(grid, 140);
    double width = fmax(legend_x + 90, 600), height = gy + legend_h + 100;
    char subtitle[512], text[256];
    describe_run(subtitle, sizeof subtitle, r, 1);
    begin_svg(out, width, height, "moe-ep run: all-to-all traffic matrix", subtitle);
    put_text(out, 16, 64, "start", "fill=\"#555555\"",
             "Rows rank i sends to rank j in dispatch; combine returns the same rows.");

    /* Axis titles and rank labels, every `every`-th rank when cells are
     * too small for all of them. */
    int every = (int)ceil(16.0 / cell);
    put_text(out, gx + grid / 2, gy - 26, "middle", "font-weight=\"bold\"",
             "destination rank j (owns the experts)");
    fprintf(out, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-weight=\"bold\" "
            "transform=\"rotate(-90 %.1f %.1f)\">source rank i (owns the tokens)</text>\n",
            gx - 40, gy + grid / 2, gx - 40, gy + grid / 2);
    for (int k = 0; k < R; k += every) {
        snprintf(text, sizeof text, "%d", k);
        put_text(out, gx + (k + 0.5) * cell, gy - 8, "middle", "", text);
        put_text(out, gx - 8, gy + (k + 0.5) * cell + 4, "end", "", text);
    }

    /* The cells, then a dashed outline on the diagonal, which a rank
     * copies to itself without a ring. The outlines come last so that no
     * cell border covers them. */
    double font = cell >= 40 ? 12 : 9;
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            int64_t v = rows[i * R + j];
            double t = max > 0 ? (double)v / (double)max : 0;
            char color[8];
            heat_color(t, color);
            fprintf(out, "<rect id=\"cell-%d-%d\" class=\"cell\" x=\"%.1f\" y=\"%.1f\" "
                    "width=\"%.1f\" height=\"%.1f\" fill=\"%s\" stroke=\"#ffffff\" "
                    "data-rows=\"%" PRId64 "\" data-bytes=\"%" PRIu64 "\"><title>rank %d "
                    "to rank %d: %" PRId64 " rows, %" PRIu64 " bytes%s</title></rect>\n",
                    i, j, gx + j * cell, gy + i * cell, cell, cell, color, v,
                    (uint64_t)v * row_bytes, i, j, v, (uint64_t)v * row_bytes,
                    i == j ? ", copied locally" : "");
            snprintf(text, sizeof text, "%" PRId64, v);
            double text_width = 0.62 * font * (double)strlen(text);
            if (cell >= 16 && text_width + 4 <= cell)
                put_text(out, gx + (j + 0.5) * cell, gy + (i + 0.5) * cell + font * 0.35,
                         "middle", t > 0.55 ? "fill=\"#ffffff\"" : "fill=\"#111111\"", text);
        }

    for (int k = 0; k < R; k++)
        fprintf(out, "<rect class=\"local\" x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" "
                "height=\"%.1f\" fill=\"none\" stroke=\"" LOCAL_COLOR "\" stroke-width=\"%d\" "
                "stroke-dasharray=\"%s\"/>\n", gx + k * cell + 1, gy + k * cell + 1,
                cell - 2, cell - 2, cell >= 24 ? 2 : 1, cell >= 24 ? "4 3" : "2 2");

    /* Row and column sums: what each rank sends and what it computes. */
    put_text(out, gx + grid + 8, gy - 8, "start", "fill=\"#555555\"", "sent");
    put_text(out, gx - 8, gy + grid + 18, "end", "fill=\"#555555\"", "received");
    int64_t widest = 0;
    for (int k = 0; k < R; k++)
        widest = received[k] > widest ? received[k] : widest;
    snprintf(text, sizeof text, "%" PRId64, widest);
    int sum_every = (int)ceil((7.0 * (double)strlen(text) + 6) / cell);
    for (int k = 0; k < R; k++) {
        snprintf(text, sizeof text, "%" PRId64, sent[k]);
        if (k % every == 0)
            put_text(out, gx + grid + 8, gy + (k + 0.5) * cell + 4, "start",
                     "fill=\"#555555\"", text);
        snprintf(text, sizeof text, "%" PRId64, received[k]);
        if (k % sum_every == 0)
            put_text(out, gx + (k + 0.5) * cell, gy + grid + 18, "middle",
                     "fill=\"#555555\"", text);
    }

    /* The colour scale: a vertical gradient from 0 at the bottom to the
     * largest cell at the top. */
    fprintf(out, "<defs><linearGradient id=\"heat\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">");
    for (int k = 0; k <= 8; k++) {
        char color[8];
        heat_color(k / 8.0, color);
        fprintf(out, "<stop offset=\"%.3f\" stop-color=\"%s\"/>", k / 8.0, color);
    }
    fprintf(out, "</linearGradient></defs>\n");
    fprintf(out, "<rect id=\"scale\" x=\"%.1f\" y=\"%.1f\" width=\"16\" height=\"%.1f\" "
            "fill=\"url(#heat)\" stroke=\"#888888\"/>\n", legend_x, gy, legend_h);
    double step = fmax(1, tick_step((double)max, 4)); /* rows are whole */
    for (double v = 0; v <= (double)max + 1e-9; v += step) {
        double y = gy + legend_h - (max > 0 ? v / (double)max : 0) * legend_h;
        fprintf(out, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" "
                "stroke=\"#888888\"/>\n", legend_x + 16, y, legend_x + 20, y);
        format_tick(text, sizeof text, v, step);
        put_text(out, legend_x + 23, y + 4, "start", "", text);
        if (max == 0)
            break;
    }
    put_text(out, legend_x + 8, gy - 8, "middle", "fill=\"#555555\"", "rows");
    put_text(out, 16, gy + legend_h + 48, "start", "fill=\"#555555\"",
             "Dashed cells: rows a rank routes to its own experts, copied in place "
             "instead of sent.");
    put_text(out, 16, gy + legend_h + 66, "start", "fill=\"#555555\"",
             "Column sums are the rows each rank computes; dropped assignments are "
             "not sent.");
    snprintf(text, sizeof text, "One row is hidden %" PRId64 " x 4 bytes = %" PRIu64
             " bytes; a cell's tooltip gives its bytes.", r->options.shape.hidden,
             row_bytes);
    put_text(out, 16, gy + legend_h + 84, "start", "fill=\"#555555\"", text);
    fprintf(out, "</svg>\n");
}

/* ---- experts.svg ------------------------------------------------------------ */

static void write_experts(FILE *out, const struct moe_run_result *r)
{
    const struct moe_shape *s = &r->options.shape;
    int R = r->options.ranks;
    int64_t E = s->experts, last = r->options.steps - 1;
    const int64_t *routed = r->stats + last * r->stats_len + 1;
    const int64_t *dropped = r->dropped + last * E;
    int64_t max = 0, total_dropped = 0, capacity = r->capacity.limit;
    for (int64_t e = 0; e < E; e++) {
        max = routed[e] > max ? routed[e] : max;
        total_dropped += dropped[e];
    }
    double mean = (double)(s->tokens * s->top_k) / (double)E;

    /* The capacity line is drawn when it is within the scale of the bars;
     * a far larger capacity would flatten them. */
    int capacity_drawn = capacity >= 0 && (double)capacity <= 1.5 * (double)(max > 0 ? max : 1);
    double top = fmax((double)max, capacity_drawn ? (double)capacity : 0);
    double step = fmax(1, tick_step(top, 5)); /* assignments are whole */
    double y_max = ceil((top > 0 ? top : 1) / step) * step;

    /* Bars shrink with E so that the chart stays about 640 px wide, within
     * 2 to 56 px per expert. */
    double pitch = fmin(56, fmax(2, 640.0 / (double)E));
    double bar = pitch >= 4 ? pitch * 0.75 : pitch;
    double px = 72, py = 100, pw = pitch * (double)E, ph = 260;
    double width = fmax(px + pw + 120, 560), height = py + ph + 84;
    char subtitle[512], text[256];
    describe_run(subtitle, sizeof subtitle, r, 1);
    begin_svg(out, width, height, "moe-ep run: tokens per expert", subtitle);

    /* Legend. */
    fprintf(out, "<rect x=\"16\" y=\"58\" width=\"12\" height=\"12\" fill=\"" KEPT_COLOR
            "\"/>\n");
    put_text(out, 32, 68, "start", "", "computed");
    if (capacity >= 0) {
        fprintf(out, "<rect x=\"110\" y=\"58\" width=\"12\" height=\"12\" fill=\""
                DROPPED_COLOR "\"/>\n");
        snprintf(text, sizeof text, "dropped by the capacity (%" PRId64 " of %" PRId64
                 ")", total_dropped, s->tokens * s->top_k);
        put_text(out, 126, 68, "start", "", text);
    } else {
        put_text(out, 110, 68, "start", "fill=\"#555555\"",
                 "no capacity, so nothing is dropped");
    }
    if (capacity >= 0 && !capacity_drawn) {
        snprintf(text, sizeof text, "capacity %" PRId64 " is above the chart", capacity);
        put_text(out, 400, 68, "start", "fill=\"#555555\"", text);
    }

    /* Each rank's experts on a shaded band, labelled under the axis. */
    for (int k = 0; k < R; k++) {
        int64_t first, count;
        moe_block_range(E, R, k, &first, &count);
        if (count == 0)
            continue;
        double x = px + (double)first * pitch, w = (double)count * pitch;
        fprintf(out, "<rect class=\"band\" x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" "
                "height=\"%.1f\" fill=\"%s\"/>\n", x, py, w, ph,
                k % 2 ? "#ffffff" : "#f1f3f5");
        if (w >= 40) {
            snprintf(text, sizeof text, "rank %d", k);
            put_text(out, x + w / 2, py + ph + 36, "middle", "fill=\"#555555\"", text);
        }
    }

    /* The y axis with its grid. */
    for (double v = 0; v <= y_max + 1e-9; v += step) {
        double y = py + ph - v / y_max * ph;
        fprintf(out, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" "
                "stroke=\"#dddddd\"/>\n", px, y, px + pw, y);
        format_tick(text, sizeof text, v, step);
        put_text(out, px - 6, y + 4, "end", "", text);
    }
    fprintf(out, "<text x=\"20\" y=\"%.1f\" text-anchor=\"middle\" transform=\"rotate(-90 "
            "20 %.1f)\">assignments (token, expert)</text>\n", py + ph / 2, py + ph / 2);

    /* One bar per expert: the kept part from the axis up, the dropped part
     * stacked on it. The x labels skip experts when bars are narrow. */
    snprintf(text, sizeof text, "%" PRId64, E - 1);
    int every = (int)ceil((7.0 * (double)strlen(text) + 8) / pitch);
    for (int64_t e = 0; e < E; e++) {
        int64_t kept = routed[e] - dropped[e];
        double x = px + (double)e * pitch + (pitch - bar) / 2;
        double kept_h = (double)kept / y_max * ph, dropped_h = (double)dropped[e] / y_max * ph;
        fprintf(out, "<rect id=\"kept-%" PRId64 "\" class=\"kept\" x=\"%.2f\" y=\"%.2f\" "
                "width=\"%.2f\" height=\"%.2f\" fill=\"" KEPT_COLOR "\" data-routed=\"%"
                PRId64 "\" data-kept=\"%" PRId64 "\" data-dropped=\"%" PRId64 "\">"
                "<title>expert %" PRId64 " on rank %d: %" PRId64 " routed, %" PRId64
                " computed, %" PRId64 " dropped</title></rect>\n", e, x,
                py + ph - kept_h, bar, kept_h, routed[e], kept, dropped[e], e,
                moe_expert_owner(E, R, e), routed[e], kept, dropped[e]);
        if (dropped[e] > 0)
            fprintf(out, "<rect id=\"dropped-%" PRId64 "\" class=\"dropped\" x=\"%.2f\" "
                    "y=\"%.2f\" width=\"%.2f\" height=\"%.2f\" fill=\"" DROPPED_COLOR
                    "\" data-dropped=\"%" PRId64 "\"><title>expert %" PRId64 ": %" PRId64
                    " dropped</title></rect>\n", e, x, py + ph - kept_h - dropped_h, bar,
                    dropped_h, dropped[e], e, dropped[e]);
        if (e % every == 0) {
            snprintf(text, sizeof text, "%" PRId64, e);
            put_text(out, px + ((double)e + 0.5) * pitch, py + ph + 16, "middle", "", text);
        }
    }
    fprintf(out, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333333\"/>\n",
            px, py + ph, px + pw, py + ph);
    put_text(out, px + pw / 2, py + ph + 56, "middle", "", "expert");

    /* The mean, T * K / E, and the capacity. */
    double y = py + ph - mean / y_max * ph;
    fprintf(out, "<line id=\"mean\" x1=\"%.1f\" y1=\"%.2f\" x2=\"%.1f\" y2=\"%.2f\" "
            "stroke=\"#222222\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\" "
            "data-mean=\"%.6g\"/>\n", px, y, px + pw, y, mean);
    snprintf(text, sizeof text, "mean %.1f", mean);
    put_text(out, px + pw + 6, y + 4, "start", "", text);
    if (capacity_drawn) {
        y = py + ph - (double)capacity / y_max * ph;
        fprintf(out, "<line id=\"capacity\" x1=\"%.1f\" y1=\"%.2f\" x2=\"%.1f\" y2=\"%.2f\" "
                "stroke=\"" DROPPED_COLOR "\" stroke-width=\"1.5\" stroke-dasharray=\"2 3\" "
                "data-capacity=\"%" PRId64 "\"/>\n", px, y, px + pw, y, capacity);
        snprintf(text, sizeof text, "capacity %" PRId64, capacity);
        /* Keep the two labels apart when the lines are close. */
        double mean_y = py + ph - mean / y_max * ph;
        put_text(out, px + pw + 6, fabs(y - mean_y) < 14 ? y - 8 : y + 4, "start",
                 "fill=\"" DROPPED_COLOR "\"", text);
    }
    snprintf(text, sizeof text, "imbalance (max/mean): %.3f",
             moe_run_imbalance(routed, E));
    put_text(out, 16, height - 12, "start", "fill=\"#555555\"", text);
    fprintf(out, "</svg>\n");
}

/* ---- timeline.svg ----------------------------------------------------------- */

/* Returns the forward to draw: the last one, or, when a rank's trace
 * buffer filled up, the last one before that, whose spans are all there.
 * Sets *complete to 0 when even the first forward lost spans. */
static int64_t timeline_forward(const struct moe_run_result *r, int *complete)
{
    int64_t forward = r->options.steps - 1;
    for (int k = 0; k < r->options.ranks; k++)
        if (r->report[k].trace_dropped > 0 && r->report[k].trace_full_forward - 1 < forward)
            forward = r->report[k].trace_full_forward - 1;
    *complete = forward >= 0;
    return forward >= 0 ? forward : 0;
}

/* Returns the spans of `rank` in its trace buffer, and their count. */
static const struct moe_trace_event *rank_trace(const struct moe_run_result *r, int rank,
                                                int64_t *count)
{
    int64_t n = r->report[rank].trace_events;
    *count = n < r->trace_capacity ? n : r->trace_capacity;
    return r->trace + (int64_t)rank * r->trace_capacity;
}

static void write_timeline(FILE *out, const struct moe_run_result *r)
{
    int R = r->options.ranks;
    int complete = 1;
    int64_t forward = timeline_forward(r, &complete);

    /* The time origin is the first span of the forward on any rank. The
     * ranks read one monotonic clock when they share a machine. NOTE: MPI
     * ranks on different machines do not, so their rows are shifted by
     * the clocks' offsets (untested). */
    int64_t start = INT64_MAX, end = INT64_MIN;
    for (int k = 0; k < R && r->trace; k++) {
        int64_t n;
        const struct moe_trace_event *t = rank_trace(r, k, &n);
        for (int64_t i = 0; i < n; i++)
            if (t[i].forward == forward) {
                start = t[i].start_ns < start ? t[i].start_ns : start;
                end = t[i].end_ns > end ? t[i].end_ns : end;
            }
    }
    double span_ms = start < end ? (double)(end - start) / 1e6 : 1;
    double step = tick_step(span_ms, 8);
    double axis_ms = ceil(span_ms / step - 1e-9) * step;

    /* Rows shrink with R so that the chart stays under about 700 px
     * tall, down to 8 px each. */
    double px = 72, py = 96, pw = 860, row = fmin(26, fmax(8, 600.0 / R));
    double gap = row >= 20 ? 8 : 2, ph = R * (row + gap);
    int label_every = (int)ceil(14.0 / (row + gap));
    double width = px + pw + 130, height = py + ph + 74;
    char subtitle[512], title[192], text[256];
    describe_run(subtitle, sizeof subtitle, r, 0);
    /* Forwards are numbered from 0, as in the report. */
    const char *which = "";
    if (!complete)
        which = ", with spans missing";
    else if (forward < r->options.steps - 1)
        which = ", the last that the trace holds in full";
    if (r->options.steps > 1)
        snprintf(title, sizeof title, "moe-ep run: step timeline of forward %" PRId64
                 " of forwards 0-%" PRId64 "%s", forward, r->options.steps - 1,
                 which);
    else
        snprintf(title, sizeof title, "moe-ep run: step timeline per rank%s", which);
    begin_svg(out, width, height, title, subtitle);
    fprintf(out, "<defs><pattern id=\"hatch\" width=\"6\" height=\"6\" "
            "patternUnits=\"userSpaceOnUse\" patternTransform=\"rotate(45)\">"
            "<rect width=\"6\" height=\"6\" fill=\"#000000\" fill-opacity=\"0.08\"/>"
            "<line x1=\"0\" y1=\"0\" x2=\"0\" y2=\"6\" stroke=\"#000000\" "
            "stroke-opacity=\"0.45\" stroke-width=\"1.5\"/></pattern></defs>\n");

    /* Legend: the five steps, then the wait shading. */
    double lx = 16;
    for (int i = 0; i < PLOT_STEPS; i++) {
        const char *name = moe_step_name(plot_steps[i]);
        fprintf(out, "<rect x=\"%.1f\" y=\"58\" width=\"12\" height=\"12\" fill=\"%s\"/>\n",
                lx, step_colors[i]);
        put_text(out, lx + 16, 68, "start", "", name);
        lx += 16 + 7.2 * (double)strlen(name) + 18;
    }
    fprintf(out, "<rect x=\"%.1f\" y=\"58\" width=\"12\" height=\"12\" fill=\"#cccccc\"/>"
            "<rect x=\"%.1f\" y=\"58\" width=\"12\" height=\"12\" fill=\"url(#hatch)\"/>\n",
            lx, lx);
    put_text(out, lx + 16, 68, "start", "", "waiting on peers (inside the step)");

    /* Vertical grid and the time axis. */
    double scale = pw / axis_ms; /* px per ms */
    for (double v = 0; v <= axis_ms + 1e-9; v += step) {
        double x = px + v * scale;
        fprintf(out, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" "
                "stroke=\"#e2e2e2\"/>\n", x, py - 4, x, py + ph);
        format_tick(text, sizeof text, v, step);
        put_text(out, x, py + ph + 16, "middle", "", text);
    }
    fprintf(out, "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" stroke=\"#333333\"/>\n",
            px, py + ph, px + pw, py + ph);
    put_text(out, px + pw / 2, py + ph + 36, "middle", "",
             "time since the forward's first step began (ms)");
    if (!r->trace)
        put_text(out, px + pw / 2, py + ph / 2, "middle", "", "no trace was recorded");
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    if (r->options.transport != MOE_TRANSPORT_MPI && cores > 0 && R > cores) {
        snprintf(text, sizeof text, "%d ranks share %ld cores, so a span also counts "
                 "time slices given to other ranks.", R, cores);
        put_text(out, 16, py + ph + 58, "start", "fill=\"#555555\"", text);
    }

    /* One row per rank: its step spans, with its wait spans drawn over
     * them. A span shorter than one pixel is widened to one, so that every
     * step is visible; its <title> has the exact time. */
    for (int k = 0; k < R; k++) {
        double y = py + k * (row + gap) + gap / 2;
        uint64_t waited_ns = 0;
        snprintf(text, sizeof text, "rank %d", k);
        if (k % label_every == 0)
            put_text(out, px - 8, y + row / 2 + 4, "end", "", text);
        fprintf(out, "<g id=\"rank-%d\" class=\"rank\">\n", k);
        int64_t n = 0;
        const struct moe_trace_event *t = r->trace ? rank_trace(r, k, &n) : NULL;
        for (int pass = 0; pass < 2; pass++)
            for (int64_t i = 0; i < n; i++) {
                const struct moe_trace_event *e = &t[i];
                /* Pass 0 draws the steps and pass 1 the waits over them.
                 * Other kinds of span are not drawn. */
                int is_wait = e->kind == MOE_TRACE_WAIT;
                int kind = pass == 0 ? MOE_TRACE_STEP : MOE_TRACE_WAIT;
                if (e->forward != forward || e->kind != kind)
                    continue;
                double x0 = px + (double)(e->start_ns - start) / 1e6 * scale;
                double ms = (double)(e->end_ns - e->start_ns) / 1e6;
                double w = fmax(1, ms * scale);
                const char *name = moe_step_name(e->step);
                if (is_wait) {
                    if (e->end_ns > e->start_ns)
                        waited_ns += (uint64_t)(e->end_ns - e->start_ns);
                    fprintf(out, "<rect class=\"wait\" x=\"%.2f\" y=\"%.1f\" width=\"%.2f\" "
                            "height=\"%.1f\" fill=\"url(#hatch)\" data-step=\"%s\" "
                            "data-ms=\"%.6f\"><title>rank %d waits on peers in %s: %.3f "
                            "ms</title></rect>\n", x0, y, w, row, name, ms, k, name, ms);
                    continue;
                }
                int color = 0;
                for (int s = 0; s < PLOT_STEPS; s++)
                    if (plot_steps[s] == e->step)
                        color = s;
                fprintf(out, "<rect class=\"step\" x=\"%.2f\" y=\"%.1f\" width=\"%.2f\" "
                        "height=\"%.1f\" fill=\"%s\" stroke=\"#ffffff\" stroke-width=\"0.5\" "
                        "data-step=\"%s\" data-start-ms=\"%.6f\" data-ms=\"%.6f\" "
                        "data-bytes-sent=\"%" PRIu64 "\"><title>rank %d %s: %.3f ms, "
                        "%" PRIu64 " bytes sent</title></rect>\n", x0, y, w, row,
                        step_colors[color], name, (double)(e->start_ns - start) / 1e6, ms,
                        e->bytes, k, name, ms, e->bytes);
            }
        fprintf(out, "</g>\n");
        snprintf(text, sizeof text, "waited %.3f ms", (double)waited_ns / 1e6);
        if (k % label_every == 0)
            put_text(out, px + pw + 8, y + row / 2 + 4, "start", "fill=\"#555555\"", text);
    }
    fprintf(out, "</svg>\n");
}

/* ---- files ------------------------------------------------------------------ */

int moe_plot_check_dir(const char *dir)
{
    char path[PATH_MAX];
    if (!dir[0])
        return moe_fail(-EINVAL, "invalid --plot value '': expected a directory name");
    if (snprintf(path, sizeof path, "%s", dir) >= (int)sizeof path)
        return moe_fail(-EINVAL, "invalid --plot directory '%s': the name is too long", dir);
    size_t length = strlen(path);
    while (length > 1 && path[length - 1] == '/')
        path[--length] = '\0';

    /* Walk the path from the root. The deepest part that exists must be a
     * writable directory, because the run creates the rest in it. */
    char deepest[PATH_MAX] = ".";
    int whole_exists = 0;
    for (char *p = path[0] == '/' ? path + 1 : path;; p++) {
        if (*p != '/' && *p != '\0')
            continue;
        char saved = *p;
        *p = '\0';
        struct stat st;
        if (path[0] != '\0' && stat(path, &st) != 0) {
            if (errno != ENOENT)
                return moe_fail(-EINVAL, "invalid --plot directory '%s': '%s': %s", dir,
                                path, strerror(errno));
            *p = saved;
            break;
        }
        if (path[0] != '\0') {
            if (!S_ISDIR(st.st_mode))
                return moe_fail(-EINVAL, "invalid --plot directory '%s': '%s' is not a "
                                "directory", dir, path);
            snprintf(deepest, sizeof deepest, "%s", path);
        }
        *p = saved;
        if (saved == '\0') {
            whole_exists = 1;
            break;
        }
    }
    if (access(deepest, W_OK) != 0)
        return moe_fail(-EINVAL, "invalid --plot directory '%s': directory '%s' is not "
                        "writable: %s", dir, deepest, strerror(errno));

    for (int i = 0; whole_exists && moe_plot_files[i]; i++) {
        char file[PATH_MAX + 32];
        struct stat st;
        snprintf(file, sizeof file, "%s/%s", path, moe_plot_files[i]);
        if (stat(file, &st) == 0 && S_ISDIR(st.st_mode))
            return moe_fail(-EINVAL, "invalid --plot directory '%s': '%s' is a "
                            "directory, so the picture cannot be written there", dir, file);
        if (stat(file, &st) == 0 && !S_ISREG(st.st_mode))
            return moe_fail(-EINVAL, "invalid --plot directory '%s': '%s' is not a "
                            "regular file, such as a FIFO, so the picture would be "
                            "written into it; remove it first", dir, file);
    }
    return 0;
}

/* Prints one picture into memory and writes it to dir/name. */
static int write_svg(const char *dir, const char *name, const struct moe_run_result *r,
                     void (*draw)(FILE *, const struct moe_run_result *))
{
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    if (!out)
        return moe_fail(-ENOMEM, "out of memory for the --plot file %s", name);
    draw(out, r);
    int failed = ferror(out);
    if (fclose(out) != 0 || failed || !text) {
        free(text);
        return moe_fail(-ENOMEM, "out of memory for the --plot file %s", name);
    }

    char path[PATH_MAX + 32];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    struct moe_file_part part = {text, size};
    int rc = moe_write_file(path, &part, 1);
    free(text);
    if (rc)
        return moe_fail(rc, "writing the --plot file failed: %s", moe_error_message());
    return 0;
}

int moe_plot_write(const char *dir, const struct moe_run_result *r)
{
    int rc = moe_make_directories("--plot", dir);
    if (rc == 0)
        rc = write_svg(dir, "traffic.svg", r, write_traffic);
    if (rc == 0)
        rc = write_svg(dir, "experts.svg", r, write_experts);
    if (rc == 0)
        rc = write_svg(dir, "timeline.svg", r, write_timeline);
    return rc;
}
