/*
 * test_plot.c - the SVG files of `moe-ep run --plot DIR`, end to end.
 *
 * Each picture is parsed with the small strict XML checker below, which is
 * itself tested on broken documents. Then its elements are counted and
 * their values compared with the --stats and --trace files of the same
 * run. A picture has R * R heat map cells, E bars plus one drop bar per
 * expert that dropped, or R timeline rows of five steps each. Bad --plot
 * values must exit with status 2. The MPI case runs when mpirun is on the
 * PATH.
 */
#include "test_program.h"

#include <cJSON.h>
#include <criterion/criterion.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* A small layer that runs in a few milliseconds. The skew makes rank 0's
 * experts busy, so that the other ranks wait. */
#define SMALL "--tokens", "120", "--hidden", "32", "--ffn", "48", "--skew", "1.2"

/* ---- a strict XML checker ------------------------------------------------ */

/* It accepts the XML that well-formed SVG files use: an optional XML
 * declaration, one root element, elements with quoted attributes, text,
 * comments, and the five predefined and the numeric character references.
 * A DOCTYPE, CDATA or processing instruction after the declaration is
 * rejected, because the plots never write one. */

#define XML_MAX_ATTRS 24
#define XML_MAX_DEPTH 64

struct xml_element {
    char name[32];
    int parent; /* index of the parent element, or -1 for the root */
    int attr_count;
    char attr_name[XML_MAX_ATTRS][32];
    char *attr_value[XML_MAX_ATTRS]; /* with references replaced */
    char *text;                      /* the element's own text, decoded */
};

struct xml_doc {
    struct xml_element *elements; /* in document order */
    int count, capacity;
    char error[256];
};

struct text_buffer {
    char *data;
    size_t length, capacity;
};

static void buffer_add(struct text_buffer *b, const char *s, size_t n)
{
    if (b->length + n + 1 > b->capacity) {
        b->capacity = (b->length + n + 1) * 2;
        b->data = realloc(b->data, b->capacity);
        cr_assert_not_null(b->data);
    }
    memcpy(b->data + b->length, s, n);
    b->length += n;
    b->data[b->length] = '\0';
}

static char *buffer_take(struct text_buffer *b)
{
    if (!b->data)
        buffer_add(b, "", 0);
    char *s = b->data;
    *b = (struct text_buffer){0};
    return s;
}

static int xml_error(struct xml_doc *d, const char *start, const char *at, const char *what)
{
    snprintf(d->error, sizeof d->error, "offset %ld: %s", (long)(at - start), what);
    return -1;
}

static int is_name_start(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_' || c == ':';
}

static int is_name_char(char c)
{
    return is_name_start(c) || (c >= '0' && c <= '9') || c == '-' || c == '.';
}

static int is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Reads a name at *p into out. Returns 0, or -1 when there is none or it
 * is longer than out. */
static int read_name(const char **p, char *out, size_t size)
{
    size_t n = 0;
    if (!is_name_start(**p))
        return -1;
    while (is_name_char((*p)[n]))
        n++;
    if (n >= size)
        return -1;
    memcpy(out, *p, n);
    out[n] = '\0';
    *p += n;
    return 0;
}

/* Decodes the reference at *p (which is at '&') into out. Returns 0 or -1
 * for an unknown or unterminated reference. */
static int read_reference(const char **p, struct text_buffer *out)
{
    static const struct {
        const char *name, *value;
    } named[] = {{"&amp;", "&"}, {"&lt;", "<"}, {"&gt;", ">"}, {"&quot;", "\""},
                 {"&apos;", "'"}};
    for (size_t i = 0; i < sizeof named / sizeof named[0]; i++)
        if (!strncmp(*p, named[i].name, strlen(named[i].name))) {
            buffer_add(out, named[i].value, 1);
            *p += strlen(named[i].name);
            return 0;
        }
    if ((*p)[1] != '#')
        return -1;
    int hex = (*p)[2] == 'x';
    const char *digits = *p + (hex ? 3 : 2);
    char *end;
    long code = strtol(digits, &end, hex ? 16 : 10);
    if (end == digits || *end != ';' || code <= 0 || code > 0x10ffff)
        return -1;
    /* The checks below only compare ASCII, so any other character is kept
     * as a '?'. */
    char c = code < 128 ? (char)code : '?';
    buffer_add(out, &c, 1);
    *p = end + 1;
    return 0;
}

static int xml_add_element(struct xml_doc *d, const char *name, int parent)
{
    if (d->count == d->capacity) {
        d->capacity = d->capacity ? 2 * d->capacity : 64;
        d->elements = realloc(d->elements, (size_t)d->capacity * sizeof *d->elements);
        cr_assert_not_null(d->elements);
    }
    struct xml_element *e = &d->elements[d->count];
    memset(e, 0, sizeof *e);
    snprintf(e->name, sizeof e->name, "%s", name);
    e->parent = parent;
    return d->count++;
}

/* Reads the attributes of an open tag up to '>' or '/>' into element
 * `index`, and sets *closed for '/>'. */
static int read_attributes(struct xml_doc *d, const char *start, const char **p, int index,
                           int *closed)
{
    for (;;) {
        int spaced = is_space(**p);
        while (is_space(**p))
            (*p)++;
        if (**p == '/' || **p == '>') {
            *closed = **p == '/';
            if (*closed && (*p)[1] != '>')
                return xml_error(d, start, *p, "expected '>' after '/'");
            *p += *closed ? 2 : 1;
            return 0;
        }
        if (!spaced)
            return xml_error(d, start, *p, "expected white space before an attribute");
        struct xml_element *e = &d->elements[index];
        if (e->attr_count == XML_MAX_ATTRS)
            return xml_error(d, start, *p, "too many attributes for this checker");
        char *name = e->attr_name[e->attr_count];
        if (read_name(p, name, sizeof e->attr_name[0]))
            return xml_error(d, start, *p, "expected an attribute name");
        for (int i = 0; i < e->attr_count; i++)
            if (!strcmp(e->attr_name[i], name))
                return xml_error(d, start, *p, "duplicate attribute");
        while (is_space(**p))
            (*p)++;
        if (**p != '=')
            return xml_error(d, start, *p, "expected '=' after an attribute name");
        (*p)++;
        while (is_space(**p))
            (*p)++;
        char quote = **p;
        if (quote != '"' && quote != '\'')
            return xml_error(d, start, *p, "expected a quoted attribute value");
        (*p)++;
        struct text_buffer value = {0};
        while (**p != quote) {
            if (**p == '\0' || **p == '<') {
                free(value.data);
                return xml_error(d, start, *p, "unterminated attribute value or '<' in it");
            }
            if (**p == '&') {
                if (read_reference(p, &value)) {
                    free(value.data);
                    return xml_error(d, start, *p, "invalid reference in an attribute");
                }
                continue;
            }
            buffer_add(&value, *p, 1);
            (*p)++;
        }
        (*p)++;
        e->attr_value[e->attr_count++] = buffer_take(&value);
    }
}

static void xml_free(struct xml_doc *d)
{
    for (int i = 0; i < d->count; i++) {
        for (int a = 0; a < d->elements[i].attr_count; a++)
            free(d->elements[i].attr_value[a]);
        free(d->elements[i].text);
    }
    free(d->elements);
    d->elements = NULL;
    d->count = d->capacity = 0;
}

/* Parses `text` into `d`. Returns 0, or -1 with d->error saying where and
 * why the text is not well-formed. */
static int xml_parse(const char *text, struct xml_doc *d)
{
    memset(d, 0, sizeof *d);
    const char *p = text;
    int stack[XML_MAX_DEPTH], depth = 0, roots = 0;
    struct text_buffer own_text[XML_MAX_DEPTH] = {{0}};

    if (!strncmp(p, "<?xml", 5) && is_space(p[5])) {
        const char *end = strstr(p, "?>");
        if (!end)
            return xml_error(d, text, p, "unterminated XML declaration");
        p = end + 2;
    }
    while (*p) {
        if (*p != '<') {
            struct text_buffer chars = {0};
            while (*p && *p != '<') {
                if (*p == '&') {
                    if (read_reference(&p, &chars)) {
                        free(chars.data);
                        return xml_error(d, text, p, "invalid reference in text");
                    }
                    continue;
                }
                buffer_add(&chars, p, 1);
                p++;
            }
            int blank = 1;
            for (size_t i = 0; i < chars.length; i++)
                blank &= is_space(chars.data[i]);
            if (depth == 0 && !blank) {
                free(chars.data);
                return xml_error(d, text, p, "text outside the root element");
            }
            if (depth > 0 && chars.length)
                buffer_add(&own_text[depth - 1], chars.data, chars.length);
            free(chars.data);
            continue;
        }
        if (!strncmp(p, "<!--", 4)) {
            const char *end = strstr(p + 4, "--");
            if (!end || end[2] != '>')
                return xml_error(d, text, p, "unterminated comment or '--' inside it");
            p = end + 3;
            continue;
        }
        if (p[1] == '?' || p[1] == '!')
            return xml_error(d, text, p, "unexpected declaration, CDATA or processing "
                             "instruction");
        if (p[1] == '/') {
            char name[32];
            p += 2;
            if (read_name(&p, name, sizeof name))
                return xml_error(d, text, p, "expected a name in a closing tag");
            while (is_space(*p))
                p++;
            if (*p != '>')
                return xml_error(d, text, p, "expected '>' to end a closing tag");
            p++;
            if (depth == 0 || strcmp(d->elements[stack[depth - 1]].name, name))
                return xml_error(d, text, p, "closing tag does not match the open element");
            depth--;
            d->elements[stack[depth]].text = buffer_take(&own_text[depth]);
            continue;
        }
        char name[32];
        p++;
        if (read_name(&p, name, sizeof name))
            return xml_error(d, text, p, "expected an element name");
        if (depth == 0 && roots++ > 0)
            return xml_error(d, text, p, "a second root element");
        if (depth == XML_MAX_DEPTH)
            return xml_error(d, text, p, "elements nested too deeply for this checker");
        int index = xml_add_element(d, name, depth ? stack[depth - 1] : -1);
        int closed = 0;
        if (read_attributes(d, text, &p, index, &closed))
            return -1;
        if (closed)
            d->elements[index].text = buffer_take(&(struct text_buffer){0});
        else
            stack[depth++] = index;
    }
    if (depth > 0)
        return xml_error(d, text, p, "an element is not closed");
    if (roots == 0)
        return xml_error(d, text, p, "no root element");
    return 0;
}

/* ---- queries on a parsed document --------------------------------------- */

static const char *xml_attr(const struct xml_element *e, const char *name)
{
    for (int i = 0; i < e->attr_count; i++)
        if (!strcmp(e->attr_name[i], name))
            return e->attr_value[i];
    return NULL;
}

static int xml_find_id(const struct xml_doc *d, const char *id)
{
    for (int i = 0; i < d->count; i++) {
        const char *v = xml_attr(&d->elements[i], "id");
        if (v && !strcmp(v, id))
            return i;
    }
    return -1;
}

static int xml_count_id_prefix(const struct xml_doc *d, const char *prefix)
{
    int n = 0;
    for (int i = 0; i < d->count; i++) {
        const char *v = xml_attr(&d->elements[i], "id");
        n += v && !strncmp(v, prefix, strlen(prefix));
    }
    return n;
}

static int xml_has_class(const struct xml_element *e, const char *name)
{
    const char *v = xml_attr(e, "class");
    size_t n = strlen(name);
    for (const char *p = v; p && *p;) {
        if (!strncmp(p, name, n) && (p[n] == ' ' || p[n] == '\0'))
            return 1;
        p = strchr(p, ' ');
        p = p ? p + 1 : NULL;
    }
    return 0;
}

/* Returns the text of the first <title> child of element `index`, or "". */
static const char *xml_title(const struct xml_doc *d, int index)
{
    for (int i = index + 1; i < d->count; i++)
        if (d->elements[i].parent == index && !strcmp(d->elements[i].name, "title"))
            return d->elements[i].text;
    return "";
}

/* Returns attribute `name` of the element with id `id` as a number;
 * fails the test when either is missing. */
static double number_of(const struct xml_doc *d, const char *id, const char *name)
{
    int i = xml_find_id(d, id);
    cr_assert_geq(i, 0, "no element with id %s", id);
    const char *v = xml_attr(&d->elements[i], name);
    cr_assert_not_null(v, "element %s has no %s", id, name);
    return strtod(v, NULL);
}

/* ---- the checker's own tests -------------------------------------------- */

Test(plot, xml_checker_rejects_malformed, .timeout = 10)
{
    static const char *const bad[] = {
        "",
        "<svg>",
        "<svg></g>",
        "<svg><g></svg></g>",
        "<svg/><svg/>",
        "text<svg/>",
        "<svg/>text",
        "<svg a=1/>",
        "<svg a=\"1\" a=\"2\"/>",
        "<svg a=\"1\"b=\"2\"/>",
        "<svg a=\"1/>",
        "<svg a=\"<\"/>",
        "<svg>a & b</svg>",
        "<svg>&nbsp;</svg>",
        "<svg a=\"&#;\"/>",
        "<svg><!-- a -- b --></svg>",
        "<svg><![CDATA[x]]></svg>",
        "<!DOCTYPE svg><svg/>",
        "<svg><1a/></svg>",
        "<svg / >",
        NULL,
    };
    for (int i = 0; bad[i]; i++) {
        struct xml_doc d;
        cr_expect_neq(xml_parse(bad[i], &d), 0, "accepted malformed XML: %s", bad[i]);
        xml_free(&d);
    }

    const char *good = "<?xml version=\"1.0\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\">"
                       "<!-- c --><rect id=\"r\" class=\"a b\" data-v='7'><title>x &amp; "
                       "y &#65;&#x42;</title></rect><g/></svg>\n";
    struct xml_doc d;
    cr_assert_eq(xml_parse(good, &d), 0, "rejected: %s", d.error);
    cr_assert_eq(d.count, 4);
    int r = xml_find_id(&d, "r");
    cr_assert_eq(r, 1);
    cr_assert(xml_has_class(&d.elements[r], "b"));
    cr_assert_not(xml_has_class(&d.elements[r], "c"));
    cr_assert_eq(number_of(&d, "r", "data-v"), 7);
    cr_assert_str_eq(xml_title(&d, r), "x & y AB");
    cr_assert_eq(d.elements[3].parent, 0, "<g/> is a child of the root");
    xml_free(&d);
}

/* ---- running moe-ep and reading its files -------------------------------- */

static void temp_path(char *buf, size_t size, const char *name)
{
    snprintf(buf, size, "/tmp/moe-ep-plot-%ld-%s", (long)getpid(), name);
}

static void remove_tree(const char *path)
{
    char command[512];
    snprintf(command, sizeof command, "rm -rf '%s'", path);
    cr_assert_eq(system(command), 0);
}

/* Parses dir/name and checks that it is an SVG document. */
static void load_svg(const char *dir, const char *name, struct xml_doc *d)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    char *text = slurp(path);
    int rc = xml_parse(text, d);
    free(text);
    cr_assert_eq(rc, 0, "%s is not well-formed XML: %s", path, d->error);
    cr_assert_str_eq(d->elements[0].name, "svg", "%s: the root is <%s>", path,
                     d->elements[0].name);
    const char *ns = xml_attr(&d->elements[0], "xmlns");
    cr_assert(ns && !strcmp(ns, "http://www.w3.org/2000/svg"), "%s: no SVG namespace", path);
}

static int64_t json_int(const cJSON *object, const char *name)
{
    const cJSON *v = cJSON_GetObjectItem(object, name);
    cr_assert(cJSON_IsNumber(v), "no number '%s' in the stats", name);
    return (int64_t)v->valuedouble;
}

/* Checks every heat map cell against the stats file's traffic matrix,
 * and that the cells add up to the assignments that were kept. */
static void check_traffic(const char *dir, const cJSON *stats)
{
    const cJSON *config = cJSON_GetObjectItem(stats, "config");
    int R = (int)json_int(config, "ranks");
    int64_t assignments = json_int(config, "tokens") * json_int(config, "top_k");
    const cJSON *experts = cJSON_GetObjectItem(stats, "experts");
    int64_t dropped = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, experts)
        dropped += json_int(e, "dropped");
    const cJSON *rows = cJSON_GetObjectItem(cJSON_GetObjectItem(stats, "traffic"), "rows");
    const cJSON *bytes = cJSON_GetObjectItem(cJSON_GetObjectItem(stats, "traffic"), "bytes");

    struct xml_doc d;
    load_svg(dir, "traffic.svg", &d);
    cr_assert_eq(xml_count_id_prefix(&d, "cell-"), R * R, "heat map cells");
    int64_t sum = 0;
    for (int i = 0; i < R; i++)
        for (int j = 0; j < R; j++) {
            char id[32], expected[64];
            snprintf(id, sizeof id, "cell-%d-%d", i, j);
            int64_t want_rows =
                (int64_t)cJSON_GetArrayItem(cJSON_GetArrayItem(rows, i), j)->valuedouble;
            int64_t want_bytes =
                (int64_t)cJSON_GetArrayItem(cJSON_GetArrayItem(bytes, i), j)->valuedouble;
            cr_expect_eq((int64_t)number_of(&d, id, "data-rows"), want_rows, "%s rows", id);
            cr_expect_eq((int64_t)number_of(&d, id, "data-bytes"), want_bytes, "%s bytes",
                         id);
            snprintf(expected, sizeof expected, ": %lld rows, %lld bytes",
                     (long long)want_rows, (long long)want_bytes);
            const char *title = xml_title(&d, xml_find_id(&d, id));
            cr_expect_not_null(strstr(title, expected), "%s title '%s' lacks '%s'", id,
                               title, expected);
            sum += want_rows;
        }
    cr_expect_eq(sum, assignments - dropped, "the cells hold %lld rows, but %lld of the "
                 "%lld assignments were kept", (long long)sum,
                 (long long)(assignments - dropped), (long long)assignments);
    xml_free(&d);
}

/* Checks every bar against the stats file's tokens per expert of forward
 * `forward`, and returns the number of drop bars. */
static int check_experts(const char *dir, const cJSON *stats, int forward)
{
    const cJSON *config = cJSON_GetObjectItem(stats, "config");
    int64_t T = json_int(config, "tokens"), K = json_int(config, "top_k");
    int64_t E = json_int(config, "experts");
    const cJSON *experts = cJSON_GetObjectItem(stats, "experts");
    const cJSON *per_forward = cJSON_GetObjectItem(
        cJSON_GetArrayItem(cJSON_GetObjectItem(stats, "forwards"), forward),
        "tokens_per_expert");

    struct xml_doc d;
    load_svg(dir, "experts.svg", &d);
    cr_assert_eq(xml_count_id_prefix(&d, "kept-"), E, "expert bars");
    int drop_bars = 0;
    int64_t routed_sum = 0;
    double px_per_row = -1;
    for (int64_t e = 0; e < E; e++) {
        const cJSON *x = cJSON_GetArrayItem(experts, (int)e);
        int64_t routed = json_int(x, "routed"), dropped = json_int(x, "dropped");
        char id[32];
        snprintf(id, sizeof id, "kept-%lld", (long long)e);
        cr_expect_eq((int64_t)number_of(&d, id, "data-routed"), routed, "%s routed", id);
        cr_expect_eq((int64_t)cJSON_GetArrayItem(per_forward, (int)e)->valuedouble, routed,
                     "the stats disagree with themselves on expert %lld", (long long)e);
        cr_expect_eq((int64_t)number_of(&d, id, "data-dropped"), dropped, "%s dropped", id);
        cr_expect_eq((int64_t)number_of(&d, id, "data-kept"), routed - dropped, "%s kept",
                     id);
        /* Heights are printed with 2 decimals, so each is within 0.005 px
         * of kept * (pixels per row); allow 0.02 px over the ratio. */
        double height = number_of(&d, id, "height");
        if (routed - dropped > 0) {
            double ratio = height / (double)(routed - dropped);
            if (px_per_row < 0)
                px_per_row = ratio;
            cr_expect(fabs(height - px_per_row * (double)(routed - dropped)) < 0.02,
                      "%s is %g px high for %lld rows; expected %g px/row", id, height,
                      (long long)(routed - dropped), px_per_row);
        }
        snprintf(id, sizeof id, "dropped-%lld", (long long)e);
        if (dropped > 0) {
            drop_bars++;
            cr_expect_eq((int64_t)number_of(&d, id, "data-dropped"), dropped, "%s", id);
        } else {
            cr_expect_lt(xml_find_id(&d, id), 0, "%s drawn for an expert with no drops", id);
        }
        routed_sum += routed;
    }
    cr_expect_eq(xml_count_id_prefix(&d, "dropped-"), drop_bars, "drop bars");
    cr_expect_eq(routed_sum, T * K, "the bars hold %lld assignments, expected T*K = %lld",
                 (long long)routed_sum, (long long)(T * K));
    /* data-mean is printed with %.6g: 6 significant digits. */
    double mean = (double)(T * K) / (double)E;
    cr_expect(fabs(number_of(&d, "mean", "data-mean") - mean) <= 1e-5 * mean,
              "mean line at %g, expected %g", number_of(&d, "mean", "data-mean"), mean);
    xml_free(&d);
    return drop_bars;
}

static const char *const STEP_NAMES[5] = {"route", "layout exchange", "dispatch", "compute",
                                          "combine"};

/* Checks that the timeline has R rows, each with the five steps in order,
 * and, with a trace of one forward, that each step's start and duration
 * are the trace's. */
static void check_timeline(const char *dir, int R, const cJSON *trace)
{
    struct xml_doc d;
    load_svg(dir, "timeline.svg", &d);
    cr_assert_eq(xml_count_id_prefix(&d, "rank-"), R, "timeline rows");

    /* The trace's step spans: start and duration in us per rank and step,
     * and the earliest start, which is the timeline's origin. */
    double trace_ts[64][5], trace_dur[64][5], origin_us = INFINITY;
    int trace_waits[64] = {0};
    const cJSON *events = trace ? cJSON_GetObjectItem(trace, "traceEvents") : NULL, *e;
    cJSON_ArrayForEach(e, events) {
        const char *ph = cJSON_GetObjectItem(e, "ph")->valuestring;
        const char *name = cJSON_GetObjectItem(e, "name")->valuestring;
        int tid = cJSON_GetObjectItem(e, "tid")->valueint;
        if (strcmp(ph, "X") || tid < 0 || tid >= 64)
            continue;
        if (!strcmp(name, "wait"))
            trace_waits[tid]++;
        for (int s = 0; s < 5; s++)
            if (!strcmp(name, STEP_NAMES[s])) {
                trace_ts[tid][s] = cJSON_GetObjectItem(e, "ts")->valuedouble;
                trace_dur[tid][s] = cJSON_GetObjectItem(e, "dur")->valuedouble;
                origin_us = fmin(origin_us, trace_ts[tid][s]);
            }
    }

    int waits_total = 0;
    for (int r = 0; r < R; r++) {
        char id[32];
        snprintf(id, sizeof id, "rank-%d", r);
        int row = xml_find_id(&d, id);
        cr_assert_geq(row, 0, "no %s", id);
        cr_assert_str_eq(d.elements[row].name, "g");
        int steps = 0, waits = 0;
        double last_start = -1;
        for (int i = row + 1; i < d.count; i++) {
            const struct xml_element *x = &d.elements[i];
            if (x->parent != row)
                continue;
            if (xml_has_class(x, "wait")) {
                waits++;
                continue;
            }
            if (!xml_has_class(x, "step"))
                continue;
            cr_assert_lt(steps, 5, "%s has more than 5 steps", id);
            const char *step = xml_attr(x, "data-step");
            cr_expect(step && !strcmp(step, STEP_NAMES[steps]), "%s step %d is '%s', "
                      "expected '%s'", id, steps, step ? step : "", STEP_NAMES[steps]);
            double start_ms = strtod(xml_attr(x, "data-start-ms"), NULL);
            double ms = strtod(xml_attr(x, "data-ms"), NULL);
            cr_expect_geq(start_ms, last_start, "%s steps out of order", id);
            cr_expect_geq(ms, 0, "%s %s has a negative duration", id, STEP_NAMES[steps]);
            /* The SVG prints ms with 6 decimals (0.5 ns of rounding) and the
             * trace prints us, so 10 ns covers both roundings. */
            if (trace) {
                double want_ms = trace_dur[r][steps] / 1e3;
                double want_start_ms = (trace_ts[r][steps] - origin_us) / 1e3;
                cr_expect(fabs(ms - want_ms) < 1e-5, "%s %s: %.6f ms, the trace has %.6f",
                          id, STEP_NAMES[steps], ms, want_ms);
                cr_expect(fabs(start_ms - want_start_ms) < 1e-5, "%s %s starts at %.6f "
                          "ms, the trace at %.6f", id, STEP_NAMES[steps], start_ms,
                          want_start_ms);
            }
            last_start = start_ms;
            steps++;
        }
        cr_expect_eq(steps, 5, "%s has %d steps", id, steps);
        if (trace)
            cr_expect_eq(waits, trace_waits[r], "%s: %d wait spans, the trace has %d", id,
                         waits, trace_waits[r]);
        waits_total += waits;
    }
    /* Rank 0 owns the busiest experts under the skew, so others wait. */
    cr_expect_gt(waits_total, 0, "no wait is shaded");
    xml_free(&d);
}

/* ---- the pictures of a run ------------------------------------------------ */

Test(plot, pictures_match_stats_and_trace, .timeout = 60)
{
    char dir[128], stats_path[128], trace_path[128];
    temp_path(dir, sizeof dir, "pictures");
    temp_path(stats_path, sizeof stats_path, "stats.json");
    temp_path(trace_path, sizeof trace_path, "trace.json");
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", SMALL, "--ranks", "3", "--experts", "6",
                                 "--capacity-factor", "0.8", "--plot", dir, "--stats",
                                 stats_path, "--trace", trace_path, NULL});
    cr_assert_eq(o.status, 0, "%s%s", o.out, o.err);

    cJSON *stats = read_json(stats_path), *trace = read_json(trace_path);
    check_traffic(dir, stats);
    int drop_bars = check_experts(dir, stats, 0);
    cr_expect_gt(drop_bars, 0, "capacity factor 0.8 under skew should drop assignments");
    check_timeline(dir, 3, trace);
    cJSON_Delete(stats);
    cJSON_Delete(trace);
    remove_tree(dir);
    unlink(stats_path);
    unlink(trace_path);
    cr_assert_eq(segment_count(), 0);
}

/* Without a capacity nothing is dropped, so there are only the E bars. */
Test(plot, dropless_has_no_drop_bars, .timeout = 60)
{
    char dir[128], stats_path[128];
    temp_path(dir, sizeof dir, "dropless");
    temp_path(stats_path, sizeof stats_path, "dropless.json");
    struct outcome o;
    run_program(&o, NULL, 0, 0, (const char *[]){"run", SMALL, "--ranks", "4", "--plot",
                                                 dir, "--stats", stats_path, NULL});
    cr_assert_eq(o.status, 0, "%s%s", o.out, o.err);
    cJSON *stats = read_json(stats_path);
    check_traffic(dir, stats);
    cr_expect_eq(check_experts(dir, stats, 0), 0);
    check_timeline(dir, 4, NULL);
    cJSON_Delete(stats);
    remove_tree(dir);
    unlink(stats_path);
}

/* With --steps the pictures show the last forward, and the timeline title
 * names it. */
Test(plot, steps_plot_the_last_forward, .timeout = 60)
{
    char dir[128], stats_path[128];
    temp_path(dir, sizeof dir, "steps");
    temp_path(stats_path, sizeof stats_path, "steps.json");
    struct outcome o;
    run_program(&o, NULL, 0, 0,
                (const char *[]){"run", SMALL, "--ranks", "2", "--steps", "3",
                                 "--bias-update-rate", "0.01", "--plot", dir, "--stats",
                                 stats_path, NULL});
    cr_assert_eq(o.status, 0, "%s%s", o.out, o.err);
    cJSON *stats = read_json(stats_path);
    check_traffic(dir, stats);
    check_experts(dir, stats, 2);
    check_timeline(dir, 2, NULL);

    struct xml_doc d;
    load_svg(dir, "timeline.svg", &d);
    const char *title = xml_title(&d, 0);
    cr_expect_not_null(strstr(title, "forward 2 of forwards 0-2"), "timeline title: %s",
                       title);
    xml_free(&d);
    cJSON_Delete(stats);
    remove_tree(dir);
    unlink(stats_path);
}

/* The directory is created with its parents. A second run replaces the
 * files and leaves no temporary file behind. */
Test(plot, directory_created_and_files_replaced, .timeout = 60)
{
    char base[128], dir[192];
    temp_path(base, sizeof base, "nested");
    snprintf(dir, sizeof dir, "%s/a/b", base);
    const char *seeds[] = {"1", "2"};
    char *first = NULL;
    for (int i = 0; i < 2; i++) {
        struct outcome o;
        run_program(&o, NULL, 0, 0, (const char *[]){"run", SMALL, "--ranks", "2", "--seed",
                                                     seeds[i], "--plot", dir, NULL});
        cr_assert_eq(o.status, 0, "%s%s", o.out, o.err);
        DIR *listing = opendir(dir);
        cr_assert_not_null(listing, "%s was not created", dir);
        int files = 0;
        struct dirent *entry;
        while ((entry = readdir(listing)) != NULL)
            if (entry->d_name[0] != '.' || strlen(entry->d_name) > 2) {
                cr_expect(!strcmp(entry->d_name, "traffic.svg") ||
                          !strcmp(entry->d_name, "experts.svg") ||
                          !strcmp(entry->d_name, "timeline.svg"),
                          "unexpected file %s in %s", entry->d_name, dir);
                files++;
            }
        closedir(listing);
        cr_expect_eq(files, 3, "%d files in %s", files, dir);

        char path[256];
        snprintf(path, sizeof path, "%s/experts.svg", dir);
        char *text = slurp(path);
        if (i == 0)
            first = text;
        else {
            cr_expect_str_neq(text, first, "the second run did not replace experts.svg");
            free(text);
        }
    }
    free(first);
    remove_tree(base);
}

/* ---- bad --plot values ---------------------------------------------------- */

/* Runs moe-ep and expects exit status 2 with all of `expected` (NULL
 * terminated) in stderr. */
static void expect_usage_error(const char *const *args, const char *const *expected)
{
    struct outcome o;
    run_program(&o, NULL, 0, 0, args);
    cr_expect_eq(o.status, 2, "status %d, stderr: %s", o.status, o.err);
    for (int i = 0; expected[i]; i++)
        cr_expect_not_null(strstr(o.err, expected[i]), "stderr lacks '%s': %s", expected[i],
                           o.err);
}

Test(plot, bad_directories_exit_2, .timeout = 60)
{
    char file[128], under_file[192], quoted[256], dir[128], inside[192], quoted2[256];
    temp_path(file, sizeof file, "a-file");
    snprintf(under_file, sizeof under_file, "%s/sub", file);
    FILE *f = fopen(file, "w");
    cr_assert_not_null(f);
    fputs("keep", f);
    fclose(f);

    snprintf(quoted, sizeof quoted, "'%s'", file);
    expect_usage_error((const char *[]){"run", SMALL, "--plot", file, NULL},
                       (const char *[]){"--plot", quoted, "not a directory", NULL});
    snprintf(quoted2, sizeof quoted2, "'%s'", under_file);
    expect_usage_error((const char *[]){"run", SMALL, "--plot", under_file, NULL},
                       (const char *[]){"--plot", quoted2, "not a directory", NULL});
    expect_usage_error((const char *[]){"run", SMALL, "--plot", "", NULL},
                       (const char *[]){"invalid --plot value ''", NULL});
    char *text = slurp(file);
    cr_expect_str_eq(text, "keep", "the file given as --plot was changed");
    free(text);

    /* A plot file that is a directory cannot be replaced. */
    temp_path(dir, sizeof dir, "blocked");
    snprintf(inside, sizeof inside, "%s/timeline.svg", dir);
    cr_assert_eq(mkdir(dir, 0700), 0);
    cr_assert_eq(mkdir(inside, 0700), 0);
    snprintf(quoted, sizeof quoted, "'%s'", dir);
    expect_usage_error((const char *[]){"run", SMALL, "--plot", dir, NULL},
                       (const char *[]){"--plot", quoted, "is a directory", NULL});
    cr_assert_eq(rmdir(inside), 0);

    /* Nor can a FIFO, which the run would block on or write into. */
    cr_assert_eq(mkfifo(inside, 0600), 0);
    expect_usage_error((const char *[]){"run", SMALL, "--plot", dir, NULL},
                       (const char *[]){"--plot", quoted, "not a regular file", NULL});
    cr_assert_eq(unlink(inside), 0);

    /* Another output flag must not name a plot file or the directory. */
    snprintf(inside, sizeof inside, "%s/traffic.svg", dir);
    expect_usage_error((const char *[]){"run", SMALL, "--plot", dir, "--stats", inside, NULL},
                       (const char *[]){"invalid --stats", "--plot", "writes it", NULL});
    cr_expect_neq(access(inside, F_OK), 0, "the run wrote %s", inside);
    expect_usage_error((const char *[]){"run", SMALL, "--plot", dir, "--output", dir, NULL},
                       (const char *[]){"--output", NULL});
    cr_assert_eq(rmdir(dir), 0, "the rejected runs wrote into %s", dir);
    unlink(file);
    cr_assert_eq(segment_count(), 0);
}

/* A directory the user cannot write to is rejected before the run. Root
 * may write anywhere, so as root the program runs as the unprivileged
 * user nobody (uid and gid 65534). */
Test(plot, unwritable_directory_exits_2, .timeout = 60)
{
    char dir[128], target[192], out_path[160], err_path[160], program[PATH_MAX + 16];
    temp_path(dir, sizeof dir, "readonly");
    snprintf(target, sizeof target, "%s/plots", dir);
    temp_path(out_path, sizeof out_path, "readonly.out");
    temp_path(err_path, sizeof err_path, "readonly.err");
    cr_assert_eq(mkdir(dir, 0755), 0);
    cr_assert_eq(chmod(dir, 0555), 0);
    program_path(program, sizeof program);

    pid_t pid = fork();
    cr_assert_geq(pid, 0);
    if (pid == 0) {
        int out = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0666);
        int err = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0666);
        dup2(out, 1);
        dup2(err, 2);
        if (geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0))
            _exit(126);
        execl(program, program, "run", SMALL, "--ranks", "2", "--plot", target,
              (char *)NULL);
        _exit(127);
    }
    int status = 0, waited_ms = 0;
    while (waitpid(pid, &status, WNOHANG) == 0 && waited_ms < 30000) {
        usleep(10000);
        waited_ms += 10;
    }
    if (waited_ms >= 30000) {
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
    }
    char err[4096];
    read_file(err_path, err, sizeof err);
    if (WIFEXITED(status) && (WEXITSTATUS(status) == 126 || WEXITSTATUS(status) == 127)) {
        chmod(dir, 0755);
        rmdir(dir);
        cr_skip_test("user nobody cannot be switched to or cannot run %s", program);
    }
    cr_expect(WIFEXITED(status) && WEXITSTATUS(status) == 2, "status %d, stderr: %s",
              status, err);
    char quoted[256];
    snprintf(quoted, sizeof quoted, "'%s'", target);
    cr_expect_not_null(strstr(err, "--plot"), "%s", err);
    cr_expect_not_null(strstr(err, quoted), "%s", err);
    cr_expect_not_null(strstr(err, "not writable"), "%s", err);
    cr_expect_neq(access(target, F_OK), 0, "%s was created", target);
    chmod(dir, 0755);
    rmdir(dir);
    unlink(out_path);
    unlink(err_path);
}

/* ---- MPI ------------------------------------------------------------------ */

/* Under mpirun, rank 0 gathers the ranks' traces and writes the same
 * pictures. Skipped when mpirun is not installed or the build has no MPI. */
Test(plot, mpi_rank_0_writes_pictures, .timeout = 120)
{
    if (system("command -v mpirun >/dev/null 2>&1") != 0)
        cr_skip_test("mpirun is not installed");
    char dir[128], stats_path[128], log_path[128], program[PATH_MAX + 16], command[PATH_MAX + 1024];
    temp_path(dir, sizeof dir, "mpi");
    temp_path(stats_path, sizeof stats_path, "mpi.json");
    temp_path(log_path, sizeof log_path, "mpi.log");
    program_path(program, sizeof program);
    /* mpirun rejects root unless two variables confirm it, and `timeout`
     * ends a hung job. Under LeakSanitizer, Open MPI's own allocations are
     * matched by tools/lsan.supp only with the slow unwinder, which finds
     * the frames of components that MPI_Finalize has unloaded. */
    const char *asan = getenv("ASAN_OPTIONS");
    snprintf(command, sizeof command,
             "ASAN_OPTIONS='%s%sfast_unwind_on_malloc=0' "
             "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout -k 5 90 "
             "mpirun --oversubscribe --mca oob_tcp_if_include lo -np 3 '%s' run "
             "--transport mpi --tokens 120 --hidden 32 --ffn 48 --skew 1.2 "
             "--capacity-factor 0.8 --plot '%s' --stats '%s' >'%s' 2>&1",
             asan ? asan : "", asan && *asan ? ":" : "", program, dir, stats_path, log_path);
    int status = system(command);
    char log[8192];
    read_file(log_path, log, sizeof log);
    unlink(log_path);
    if (strstr(log, "built without MPI"))
        cr_skip_test("this build has no MPI transport");
    cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "mpirun: status %d: %s",
              status, log);

    cJSON *stats = read_json(stats_path);
    check_traffic(dir, stats);
    check_experts(dir, stats, 0);
    check_timeline(dir, 3, NULL);
    cJSON_Delete(stats);
    remove_tree(dir);
    unlink(stats_path);
}
