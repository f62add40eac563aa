/*
 * test_http.c - rendering of /healthz /readyz /metrics /schema, and a real
 * libmicrohttpd listener on 127.0.0.1 spoken to over raw TCP sockets.
 */
#include <arpa/inet.h>
#include <check.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <netinet/in.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "common/buf.h"
#include "common/hlc.h"
#include "common/log.h"
#include "http/http.h"
#include "http/state.h"

/* ---- fixtures ---- */

/* A node that is healthy and ready: every readiness input set, nothing failing. */
static void healthy(hl_state_snapshot *s, uint64_t now)
{
    memset(s, 0, sizeof *s);
    s->node_id = 7;
    s->embedded = true;
    s->engine_beat_ms = now;
    s->db_open = true;
    s->triggers_installed = true;
    s->nats_connected = true;
    s->streams_ready = true;
    s->caught_up = true;
    s->nats_server_running = true;
    s->nstreams = 2;
    snprintf(s->streams[0].name, sizeof s->streams[0].name, "harmonylite-changes-0");
    snprintf(s->streams[1].name, sizeof s->streams[1].name, "harmonylite-changes-1");
    s->streams[0].applied_seq = s->streams[0].tail_seq = s->streams[0].start_tail = 250;
    s->streams[1].applied_seq = s->streams[1].tail_seq = s->streams[1].start_tail = 12;
    snprintf(s->schema_hash, sizeof s->schema_hash, "%064d", 1);
}

static cJSON *parse_ok(const char *txt)
{
    ck_assert_ptr_nonnull(txt);
    ck_assert(strlen(txt) > 0 && txt[strlen(txt) - 1] == '\n');
    cJSON *j = cJSON_Parse(txt);
    ck_assert_msg(j != NULL, "not JSON: %s", txt);
    return j;
}

static const char *jstr(const cJSON *o, const char *k)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    ck_assert_msg(cJSON_IsString(v), "%s is not a string", k);
    return v->valuestring;
}

/* ---- /healthz ---- */

START_TEST(healthz_ok)
{
    hl_state_snapshot s;
    int code = 0;
    healthy(&s, 100000);
    char *b = hl_http_render_healthz(&s, 100000 + 9999, &code);
    ck_assert_int_eq(code, 200);
    cJSON *j = parse_ok(b);
    ck_assert_str_eq(jstr(j, "status"), "ok");
    ck_assert_ptr_null(cJSON_GetObjectItem(j, "reason"));
    cJSON_Delete(j);
    free(b);

    /* external mode: the nats-server flag is not looked at */
    s.embedded = false;
    s.nats_server_running = false;
    b = hl_http_render_healthz(&s, 100000, &code);
    ck_assert_int_eq(code, 200);
    free(b);

    /* a beat "from the future" (cannot happen with one clock) counts as fresh */
    b = hl_http_render_healthz(&s, 50, &code);
    ck_assert_int_eq(code, 200);
    free(b);
}
END_TEST

START_TEST(healthz_stale)
{
    hl_state_snapshot s;
    int code = 0;
    healthy(&s, 100000);
    char *b = hl_http_render_healthz(&s, 100000 + 12345, &code);
    ck_assert_int_eq(code, 503);
    cJSON *j = parse_ok(b);
    ck_assert_str_eq(jstr(j, "status"), "unhealthy");
    ck_assert_str_eq(jstr(j, "reason"), "the engine loop has not run for 12.3 s");
    cJSON_Delete(j);
    free(b);

    b = hl_http_render_healthz(&s, 100000 + 10000, &code);
    ck_assert_int_eq(code, 503);
    free(b);

    s.engine_beat_ms = 0;
    b = hl_http_render_healthz(&s, 100000, &code);
    ck_assert_int_eq(code, 503);
    j = parse_ok(b);
    ck_assert_str_eq(jstr(j, "reason"), "the engine loop has not run yet");
    cJSON_Delete(j);
    free(b);
}
END_TEST

START_TEST(healthz_nats_server_down)
{
    hl_state_snapshot s;
    int code = 0;
    healthy(&s, 100000);
    s.nats_server_running = false;
    /* other nodes, NATS connectivity and readiness do not matter */
    s.nats_connected = false;
    s.caught_up = false;
    s.gap = true;
    char *b = hl_http_render_healthz(&s, 100000, &code);
    ck_assert_int_eq(code, 503);
    cJSON *j = parse_ok(b);
    ck_assert_str_eq(jstr(j, "reason"), "the embedded nats-server is not running");
    cJSON_Delete(j);
    free(b);

    s.nats_server_running = true;
    b = hl_http_render_healthz(&s, 100000, &code);
    ck_assert_int_eq(code, 200);
    free(b);
}
END_TEST

/* ---- /readyz ---- */

static const char *const check_names[] = {"database", "triggers", "nats",   "streams",   "caught_up",
                                          "gap",      "schema",   "engine", "consumers", "catching_up"};

/* Renders /readyz and checks its shape; returns the parsed body. With want_code 503, want_failing
 * names the one failing check and want_reason is part of its reason; with 200, want_failing names a
 * passing check whose reason must contain want_reason (a note, such as held changesets). */
static cJSON *readyz(const hl_state_snapshot *s, int want_code, const char *want_failing, const char *want_reason)
{
    int code = 0;
    char *b = hl_http_render_readyz(s, &code);
    ck_assert_int_eq(code, want_code);
    cJSON *j = parse_ok(b);
    free(b);
    const cJSON *ready = cJSON_GetObjectItem(j, "ready");
    ck_assert(cJSON_IsBool(ready));
    ck_assert_int_eq(cJSON_IsTrue(ready), want_code == 200);
    const cJSON *checks = cJSON_GetObjectItem(j, "checks");
    ck_assert(cJSON_IsArray(checks));
    ck_assert_int_eq(cJSON_GetArraySize(checks), 10);
    int i = 0;
    const cJSON *c;
    cJSON_ArrayForEach(c, checks)
    {
        ck_assert_str_eq(jstr(c, "name"), check_names[i]);
        const cJSON *ok = cJSON_GetObjectItem(c, "ok");
        ck_assert(cJSON_IsBool(ok));
        const char *reason = jstr(c, "reason");
        bool named = want_failing && strcmp(want_failing, check_names[i]) == 0;
        bool should_fail = named && want_code != 200;
        ck_assert_msg(cJSON_IsTrue(ok) == !should_fail, "check %s ok=%d", check_names[i], cJSON_IsTrue(ok));
        if (named) {
            ck_assert_msg(strstr(reason, want_reason) != NULL, "reason \"%s\" lacks \"%s\"", reason, want_reason);
        } else {
            ck_assert_str_eq(reason, "");
        }
        i++;
    }
    return j;
}

START_TEST(readyz_ready)
{
    hl_state_snapshot s;
    healthy(&s, 1);
    cJSON_Delete(readyz(&s, 200, NULL, NULL));
}
END_TEST

START_TEST(readyz_each_check)
{
    struct {
        const char *name;
        const char *reason;
    } cases[] = {
        {"database", "the database is not open"},
        {"triggers", "triggers are not installed"},
        {"nats", "not connected to the embedded nats-server"},
        {"streams", "streams are not ready"},
        {"caught_up", "applied 10 of 250 messages present at start on harmonylite-changes-0"},
        {"gap", "stream x starts at 500"},
        {"engine", "engine transactions failing for 31 s: sqlite error: commit: database or disk is full"},
        {"consumers", "no working consumer on stream harmonylite-changes-0 for 12 s; re-creating it after sequence "
                      "250 (and 1 more stream)"},
        {"catching_up", "catching-up from snapshot snap-1: 2000 of 9000 rows merged"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        hl_state_snapshot s;
        healthy(&s, 1);
        switch (k) {
        case 0:
            s.db_open = false;
            break;
        case 1:
            s.triggers_installed = false;
            break;
        case 2:
            s.nats_connected = false;
            break;
        case 3:
            s.streams_ready = false;
            break;
        case 4:
            s.caught_up = false;
            s.streams[0].applied_seq = 10;
            break;
        case 5:
            s.gap = true;
            snprintf(s.gap_reason, sizeof s.gap_reason, "stream x starts at 500");
            break;
        case 6:
            s.engine_stalled = true;
            snprintf(s.engine_reason, sizeof s.engine_reason, "%s", cases[k].reason);
            break;
        case 7:
            s.streams[0].stalled_ms = 12345;
            s.streams[1].stalled_ms = 1;
            break;
        case 8:
            s.catching_up = true;
            snprintf(s.catchup_reason, sizeof s.catchup_reason, "%s", cases[k].reason);
            break;
        }
        cJSON_Delete(readyz(&s, 503, cases[k].name, cases[k].reason));
    }
}
END_TEST

START_TEST(readyz_default_reasons)
{
    hl_state_snapshot s;

    healthy(&s, 1);
    s.embedded = false;
    s.nats_connected = false;
    cJSON_Delete(readyz(&s, 503, "nats", "not connected to NATS"));

    /* not caught up, but every stream's position looks fine: a generic sentence */
    healthy(&s, 1);
    s.caught_up = false;
    cJSON_Delete(readyz(&s, 503, "caught_up", "still reading"));

    /* several streams behind */
    healthy(&s, 1);
    s.caught_up = false;
    s.streams[0].applied_seq = 0;
    s.streams[1].applied_seq = 3;
    cJSON_Delete(readyz(&s, 503, "caught_up",
                        "applied 0 of 250 messages present at start on harmonylite-changes-0 (and 1 more stream "
                        "behind)"));

    healthy(&s, 1);
    s.gap = true;
    cJSON_Delete(readyz(&s, 503, "gap", "missing"));

    /* Held changesets are reported in the schema check's reason without failing it. */
    healthy(&s, 1);
    s.paused = true;
    cJSON_Delete(readyz(&s, 200, "schema", "held until the local schema"));
    healthy(&s, 1);
    s.paused = true;
    snprintf(s.paused_reason, sizeof s.paused_reason, "3 changesets wait for the local schema");
    cJSON_Delete(readyz(&s, 200, "schema", "3 changesets wait"));

    healthy(&s, 1);
    s.engine_stalled = true;
    cJSON_Delete(readyz(&s, 503, "engine", "transactions keep failing"));

    /* a reason without a NUL in its array is cut, not overrun */
    healthy(&s, 1);
    s.gap = true;
    memset(s.gap_reason, 'x', sizeof s.gap_reason);
    int code;
    char *b = hl_http_render_readyz(&s, &code);
    ck_assert_ptr_nonnull(b);
    ck_assert_ptr_nonnull(strstr(b, "xxxx"));
    free(b);

    /* a nonsense stream count is clamped */
    healthy(&s, 1);
    s.nstreams = 100000;
    s.caught_up = false;
    b = hl_http_render_readyz(&s, &code);
    ck_assert_ptr_nonnull(b);
    free(b);
}
END_TEST

/* ---- /metrics ---- */

typedef struct sample {
    char name[128];
    char labels[512];
    double value;
} sample;

typedef struct exposition {
    sample s[512];
    int n;
    char types[64][2][128]; /* family name, type */
    int ntypes;
} exposition;

/* Parses text line by line, failing on any line that is not a comment or `name{labels} value`.
 * Every sample must carry node_id="node" and follow its family's TYPE line. */
static void parse_exposition(const char *text, const char *node, exposition *e)
{
    regex_t re;
    regmatch_t m[4];
    ck_assert_int_eq(regcomp(&re,
                             "^([a-zA-Z_:][a-zA-Z0-9_:]*)"
                             "\\{([a-zA-Z_][a-zA-Z0-9_]*=\"([^\"\\\\]|\\\\.)*\""
                             "(,[a-zA-Z_][a-zA-Z0-9_]*=\"([^\"\\\\]|\\\\.)*\")*)\\}"
                             " ([^ ]+)$",
                             REG_EXTENDED),
                     0);
    char want_node[64];
    snprintf(want_node, sizeof want_node, "node_id=\"%s\"", node);
    memset(e, 0, sizeof *e);
    ck_assert(strlen(text) > 0 && text[strlen(text) - 1] == '\n');

    const char *p = text;
    while (*p) {
        const char *nl = strchr(p, '\n');
        ck_assert_ptr_nonnull(nl);
        char line[1024];
        size_t len = (size_t)(nl - p);
        ck_assert_uint_lt(len, sizeof line);
        memcpy(line, p, len);
        line[len] = 0;
        p = nl + 1;

        if (line[0] == '#') {
            char kw[8], name[128], rest[512];
            ck_assert_msg(sscanf(line, "# %7s %127s %511[^\n]", kw, name, rest) == 3, "bad comment: %s", line);
            ck_assert_msg(strncmp(name, "harmonylite_", 12) == 0, "unprefixed: %s", line);
            if (strcmp(kw, "TYPE") == 0) {
                ck_assert(strcmp(rest, "counter") == 0 || strcmp(rest, "gauge") == 0 || strcmp(rest, "histogram") == 0);
                ck_assert_int_lt(e->ntypes, 64);
                snprintf(e->types[e->ntypes][0], sizeof e->types[0][0], "%s", name);
                snprintf(e->types[e->ntypes][1], sizeof e->types[0][1], "%.15s", rest);
                e->ntypes++;
            } else {
                ck_assert_str_eq(kw, "HELP");
            }
            continue;
        }
        ck_assert_msg(regexec(&re, line, 4, m, 0) == 0, "bad sample line: %s", line);
        ck_assert_int_lt(e->n, 512);
        sample *s = &e->s[e->n++];
        snprintf(s->name, sizeof s->name, "%.*s", (int)(m[1].rm_eo - m[1].rm_so), line + m[1].rm_so);
        snprintf(s->labels, sizeof s->labels, "%.*s", (int)(m[2].rm_eo - m[2].rm_so), line + m[2].rm_so);
        const char *v = strrchr(line, ' ') + 1;
        char *end;
        if (strcmp(v, "+Inf") == 0)
            s->value = INFINITY;
        else {
            s->value = strtod(v, &end);
            ck_assert_msg(*end == 0 && end != v, "bad value: %s", line);
        }
        ck_assert_msg(strncmp(s->labels, want_node, strlen(want_node)) == 0, "no node_id label first: %s", line);
        ck_assert_msg(strncmp(s->name, "harmonylite_", 12) == 0, "unprefixed: %s", line);

        /* its family (name minus a histogram suffix) was TYPEd before it */
        bool typed = false;
        for (int i = 0; i < e->ntypes && !typed; i++) {
            size_t fl = strlen(e->types[i][0]);
            if (strcmp(s->name, e->types[i][0]) == 0)
                typed = true;
            else if (strncmp(s->name, e->types[i][0], fl) == 0 && strcmp(e->types[i][1], "histogram") == 0 &&
                     (strcmp(s->name + fl, "_bucket") == 0 || strcmp(s->name + fl, "_sum") == 0 ||
                      strcmp(s->name + fl, "_count") == 0))
                typed = true;
        }
        ck_assert_msg(typed, "sample before its TYPE line: %s", line);
    }
    regfree(&re);
}

/* Returns the sample with this name whose labels contain label (NULL: any), or NULL. */
static const sample *find(const exposition *e, const char *name, const char *label)
{
    for (int i = 0; i < e->n; i++)
        if (strcmp(e->s[i].name, name) == 0 && (!label || strstr(e->s[i].labels, label)))
            return &e->s[i];
    return NULL;
}

static double value_of(const exposition *e, const char *name, const char *label)
{
    const sample *s = find(e, name, label);
    ck_assert_msg(s != NULL, "missing sample %s %s", name, label ? label : "");
    return s->value;
}

static const char *type_of(const exposition *e, const char *name)
{
    for (int i = 0; i < e->ntypes; i++)
        if (strcmp(e->types[i][0], name) == 0)
            return e->types[i][1];
    ck_abort_msg("no TYPE for %s", name);
    return NULL;
}

START_TEST(metrics_all)
{
    static exposition e;
    hl_state_snapshot s;
    healthy(&s, 1);
    s.rows_captured = 11;
    s.changesets_captured = 12;
    s.changesets_published = 13;
    s.rows_published = 14;
    s.outbox_rows = 15;
    s.rows_applied = 16;
    s.rows_skipped_lww = 17;
    s.conflicts = 18;
    s.changesets_applied = 19;
    s.changesets_duplicate = 20;
    s.changesets_held = 21;
    s.held_now = 22;
    s.held_origins = 23;
    s.order_gaps = 24;
    s.changesets_late = 25;
    s.engine_failures = 26;
    s.messages_malformed = 3;
    s.changesets_malformed = 4;
    s.nats_server_restarts = 2;
    s.streams[1].tail_seq = 40;
    s.streams[0].changesets_expired = 2;
    s.streams[1].changesets_expired = 3;
    s.streams[1].consumer_restarts = 4;

    char *t = hl_http_render_metrics(&s);
    ck_assert_ptr_nonnull(t);
    parse_exposition(t, "7", &e);
    free(t);

    struct {
        const char *name, *type;
        double v;
    } want[] = {
        {"harmonylite_rows_captured_total", "counter", 11},
        {"harmonylite_changesets_captured_total", "counter", 12},
        {"harmonylite_changesets_published_total", "counter", 13},
        {"harmonylite_rows_published_total", "counter", 14},
        {"harmonylite_publish_backlog", "gauge", 15},
        {"harmonylite_rows_applied_total", "counter", 16},
        {"harmonylite_rows_skipped_lww_total", "counter", 17},
        {"harmonylite_conflicts_total", "counter", 18},
        {"harmonylite_changesets_applied_total", "counter", 19},
        {"harmonylite_changesets_duplicate_total", "counter", 20},
        {"harmonylite_changesets_held_total", "counter", 21},
        {"harmonylite_changesets_held", "gauge", 22},
        {"harmonylite_held_origins", "gauge", 23},
        {"harmonylite_order_gaps_total", "counter", 24},
        {"harmonylite_changesets_late_total", "counter", 25},
        {"harmonylite_engine_failures_total", "counter", 26},
        {"harmonylite_malformed_messages_total", "counter", 7},
        {"harmonylite_nats_connected", "gauge", 1},
        {"harmonylite_nats_server_running", "gauge", 1},
        {"harmonylite_nats_server_restarts_total", "counter", 2},
        {"harmonylite_ready", "gauge", 1},
        {"harmonylite_build_info", "gauge", 1},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        ck_assert_str_eq(type_of(&e, want[i].name), want[i].type);
        ck_assert_msg(value_of(&e, want[i].name, NULL) == want[i].v, "%s", want[i].name);
    }
    ck_assert_str_eq(type_of(&e, "harmonylite_replication_lag_seconds"), "histogram");
    ck_assert_str_eq(type_of(&e, "harmonylite_stream_applied_sequence"), "gauge");
    ck_assert_str_eq(type_of(&e, "harmonylite_stream_last_sequence"), "gauge");
    ck_assert_ptr_nonnull(find(&e, "harmonylite_build_info", "version=\"0.1.0\""));
    ck_assert(value_of(&e, "harmonylite_stream_applied_sequence", "stream=\"harmonylite-changes-0\"") == 250);
    ck_assert(value_of(&e, "harmonylite_stream_applied_sequence", "stream=\"harmonylite-changes-1\"") == 12);
    ck_assert(value_of(&e, "harmonylite_stream_last_sequence", "stream=\"harmonylite-changes-1\"") == 40);
    ck_assert_str_eq(type_of(&e, "harmonylite_changesets_expired_total"), "counter");
    ck_assert(value_of(&e, "harmonylite_changesets_expired_total", NULL) == 5);
    ck_assert_str_eq(type_of(&e, "harmonylite_stream_consumer_stalled"), "gauge");
    ck_assert(value_of(&e, "harmonylite_stream_consumer_stalled", "stream=\"harmonylite-changes-0\"") == 0);
    ck_assert_str_eq(type_of(&e, "harmonylite_stream_consumer_restarts_total"), "counter");
    ck_assert(value_of(&e, "harmonylite_stream_consumer_restarts_total", "stream=\"harmonylite-changes-1\"") == 4);
    for (size_t i = 0; i < sizeof check_names / sizeof check_names[0]; i++) {
        char l[64];
        snprintf(l, sizeof l, "check=\"%s\"", check_names[i]);
        ck_assert(value_of(&e, "harmonylite_readiness_check", l) == 1);
    }

    /* not ready, external mode: the nats-server gauge disappears */
    healthy(&s, 1);
    s.embedded = false;
    s.gap = true;
    s.nats_connected = false;
    t = hl_http_render_metrics(&s);
    parse_exposition(t, "7", &e);
    free(t);
    ck_assert(value_of(&e, "harmonylite_ready", NULL) == 0);
    ck_assert(value_of(&e, "harmonylite_nats_connected", NULL) == 0);
    ck_assert(value_of(&e, "harmonylite_readiness_check", "check=\"gap\"") == 0);
    ck_assert(value_of(&e, "harmonylite_readiness_check", "check=\"nats\"") == 0);
    ck_assert(value_of(&e, "harmonylite_readiness_check", "check=\"database\"") == 1);
    ck_assert_ptr_null(find(&e, "harmonylite_nats_server_running", NULL));
}
END_TEST

START_TEST(metrics_histogram)
{
    static exposition e;
    hl_state_snapshot s;
    const double obs[] = {0.0005, 0.001, 0.002, 0.03, 0.03, 0.7, 3, 59, 61, 1000, 0};
    double sum = 0;
    healthy(&s, 1);
    for (size_t i = 0; i < sizeof obs / sizeof obs[0]; i++) {
        hl_state_observe_lag(&s, obs[i]);
        sum += obs[i];
    }
    char *t = hl_http_render_metrics(&s);
    parse_exposition(t, "7", &e);
    free(t);

    double prev_le = -INFINITY, prev_v = 0;
    int nb = 0;
    bool inf = false;
    for (int i = 0; i < e.n; i++) {
        if (strcmp(e.s[i].name, "harmonylite_replication_lag_seconds_bucket") != 0)
            continue;
        const char *le = strstr(e.s[i].labels, "le=\"");
        ck_assert_ptr_nonnull(le);
        le += 4;
        double b = strncmp(le, "+Inf\"", 5) == 0 ? INFINITY : strtod(le, NULL);
        ck_assert_msg(b > prev_le, "le not increasing at %s", e.s[i].labels);
        ck_assert_msg(e.s[i].value >= prev_v, "buckets not cumulative at %s", e.s[i].labels);
        /* each bucket holds exactly the observations <= le */
        double want = 0;
        for (size_t k = 0; k < sizeof obs / sizeof obs[0]; k++)
            want += obs[k] <= b;
        ck_assert_msg(e.s[i].value == want, "bucket %s has %g, want %g", e.s[i].labels, e.s[i].value, want);
        if (nb < HL_LAG_BUCKETS)
            ck_assert(b == hl_lag_bounds[nb]);
        prev_le = b;
        prev_v = e.s[i].value;
        inf = isinf(b);
        nb++;
    }
    ck_assert_int_eq(nb, HL_LAG_BUCKETS + 1);
    ck_assert(inf);
    double count = value_of(&e, "harmonylite_replication_lag_seconds_count", NULL);
    ck_assert(count == prev_v);
    ck_assert(count == (double)(sizeof obs / sizeof obs[0]));
    ck_assert(fabs(value_of(&e, "harmonylite_replication_lag_seconds_sum", NULL) - sum) < 1e-9);
    ck_assert_ptr_nonnull(find(&e, "harmonylite_replication_lag_seconds_bucket", "le=\"0.0025\""));
    ck_assert_ptr_nonnull(find(&e, "harmonylite_replication_lag_seconds_bucket", "le=\"60\""));
}
END_TEST

START_TEST(metrics_escaping)
{
    static exposition e;
    hl_state_snapshot s;
    healthy(&s, 1);
    s.node_id = UINT64_C(9223372036854775807);
    s.nstreams = 1;
    snprintf(s.streams[0].name, sizeof s.streams[0].name, "a\"b\\c\nd");
    /* a name filling its array without a NUL is cut at the array's end */
    s.nstreams = 2;
    memset(s.streams[1].name, 'z', sizeof s.streams[1].name);
    char *t = hl_http_render_metrics(&s);
    ck_assert_ptr_nonnull(t);
    ck_assert_ptr_nonnull(strstr(t, "stream=\"a\\\"b\\\\c\\nd\""));
    parse_exposition(t, "9223372036854775807", &e);
    free(t);
    char l[160] = "stream=\"";
    size_t n = strlen(l);
    memset(l + n, 'z', sizeof s.streams[1].name - 1); /* the last byte is dropped for the NUL */
    n += sizeof s.streams[1].name - 1;
    l[n++] = '"';
    l[n] = 0;
    ck_assert_ptr_nonnull(find(&e, "harmonylite_stream_last_sequence", l));
}
END_TEST

/* Snapshot metrics only while the scheduler runs; the newest snapshot on /readyz and /schema. */
START_TEST(snapshot_render)
{
    hl_state_snapshot s;
    healthy(&s, 1);
    char *b = hl_http_render_metrics(&s);
    ck_assert_ptr_null(strstr(b, "harmonylite_snapshot"));
    /* restores are the database file's, shown whether or not the scheduler runs */
    ck_assert_ptr_nonnull(strstr(b, "\nharmonylite_restores_total{node_id=\"7\"} 0\n"));
    ck_assert_ptr_null(strstr(b, "restored_timestamp_seconds")); /* never restored */
    free(b);
    s.restores = 2;
    s.restored_ms = UINT64_C(1764497693800);
    b = hl_http_render_metrics(&s);
    ck_assert_ptr_nonnull(strstr(b, "\nharmonylite_restores_total{node_id=\"7\"} 2\n"));
    ck_assert_ptr_nonnull(strstr(b, "harmonylite_restored_timestamp_seconds{node_id=\"7\"} 1764497693.8"));
    free(b);
    int code = 0;
    b = hl_http_render_readyz(&s, &code);
    cJSON *j = parse_ok(b);
    free(b);
    ck_assert(cJSON_IsNull(cJSON_GetObjectItem(j, "snapshot")));
    cJSON_Delete(j);

    s.snap_sched = true;
    s.snap_taken = 4;
    s.snap_failures = 1;
    s.snap_last_bytes = 12345;
    s.snap_last_ms = 1500;
    b = hl_http_render_metrics(&s);
    ck_assert_ptr_nonnull(strstr(b, "\nharmonylite_snapshots_taken_total{node_id=\"7\"} 4\n"));
    ck_assert_ptr_nonnull(strstr(b, "\nharmonylite_snapshot_failures_total{node_id=\"7\"} 1\n"));
    ck_assert_ptr_nonnull(strstr(b, "\nharmonylite_snapshot_last_size_bytes{node_id=\"7\"} 12345\n"));
    ck_assert_ptr_nonnull(strstr(b, "\nharmonylite_snapshot_last_duration_seconds{node_id=\"7\"} 1.5\n"));
    ck_assert_ptr_null(strstr(b, "snapshot_age_seconds")); /* none known yet */
    free(b);

    s.snap_newest_ms = UINT64_C(1764497693800); /* 2025-11-30T10:14:53.800Z */
    s.snap_newest_node = 2;
    snprintf(s.snap_newest, sizeof s.snap_newest, "snap-20251130T101453800Z-n2-4d2eb6f5.manifest.json");
    b = hl_http_render_metrics(&s);
    ck_assert_ptr_nonnull(strstr(b, "# TYPE harmonylite_snapshot_age_seconds gauge\n"));
    free(b);
    for (int i = 0; i < 2; i++) {
        b = i ? hl_http_render_schema(&s) : hl_http_render_readyz(&s, &code);
        j = parse_ok(b);
        free(b);
        const cJSON *o = cJSON_GetObjectItem(j, "snapshot");
        ck_assert_str_eq(jstr(o, "manifest"), "snap-20251130T101453800Z-n2-4d2eb6f5.manifest.json");
        ck_assert_str_eq(jstr(o, "created"), "2025-11-30T10:14:53.800Z");
        ck_assert(cJSON_GetObjectItem(o, "node")->valuedouble == 2);
        cJSON_Delete(j);
    }
    free(s.schema_json);
    free(s.cluster_json);
}
END_TEST

/* ---- /schema ---- */

START_TEST(schema_json)
{
    hl_state_snapshot s;
    healthy(&s, 1);
    s.node_id = 3;
    snprintf(s.prev_schema_hash, sizeof s.prev_schema_hash, "%064d", 2);
    s.schema_json = strdup(
        "[{\"name\":\"books\",\"columns\":[{\"name\":\"id\",\"type\":\"INTEGER\",\"notnull\":false,\"pk\":1}]}]");

    char *b = hl_http_render_schema(&s);
    cJSON *j = parse_ok(b);
    free(b);
    const cJSON *node = cJSON_GetObjectItem(j, "node_id");
    ck_assert(cJSON_IsNumber(node) && node->valuedouble == 3);
    ck_assert_str_eq(jstr(j, "schema_hash"), s.schema_hash);
    ck_assert_str_eq(jstr(j, "previous_schema_hash"), s.prev_schema_hash);
    const cJSON *tables = cJSON_GetObjectItem(j, "tables");
    ck_assert(cJSON_IsArray(tables));
    ck_assert_int_eq(cJSON_GetArraySize(tables), 1);
    const cJSON *t0 = cJSON_GetArrayItem(tables, 0);
    ck_assert_str_eq(jstr(t0, "name"), "books");
    const cJSON *c0 = cJSON_GetArrayItem(cJSON_GetObjectItem(t0, "columns"), 0);
    ck_assert_str_eq(jstr(c0, "type"), "INTEGER");
    cJSON_Delete(j);

    /* no previous hash → null; no schema yet → [] and null hash; node ids stay exact */
    free(s.schema_json);
    s.schema_json = NULL;
    s.prev_schema_hash[0] = 0;
    s.schema_hash[0] = 0;
    s.node_id = UINT64_C(9007199254740993);
    b = hl_http_render_schema(&s);
    ck_assert_ptr_nonnull(strstr(b, "\"node_id\":9007199254740993"));
    j = parse_ok(b);
    free(b);
    ck_assert(cJSON_IsNull(cJSON_GetObjectItem(j, "previous_schema_hash")));
    ck_assert(cJSON_IsNull(cJSON_GetObjectItem(j, "schema_hash")));
    tables = cJSON_GetObjectItem(j, "tables");
    ck_assert(cJSON_IsArray(tables));
    ck_assert_int_eq(cJSON_GetArraySize(tables), 0);
    ck_assert_int_eq(cJSON_GetArraySize(cJSON_GetObjectItem(j, "held")), 0);
    cJSON_Delete(j);

    /* Held changesets per origin; numbers stay exact, the reason is escaped. */
    s.held_origins = 20;
    s.nheld = 2;
    s.held[0] = (hl_state_held){.node = 4,
                                .epoch = UINT64_C(0x1f2e3d4c5b6a7988),
                                .count = 3,
                                .for_schema = 3,
                                .first_seq = 12,
                                .applied = 11,
                                .since_ms = UINT64_C(1764489600000)};
    snprintf(s.held[0].reason, sizeof s.held[0].reason, "unknown table \"orders\"");
    s.held[1] = (hl_state_held){.node = UINT64_C(9007199254740993), .count = 1, .first_seq = 3};
    b = hl_http_render_schema(&s);
    ck_assert_ptr_nonnull(strstr(b, "\"origin\":9007199254740993"));
    j = parse_ok(b);
    free(b);
    ck_assert_int_eq(cJSON_GetObjectItem(j, "held_origins")->valueint, 20);
    const cJSON *held = cJSON_GetObjectItem(j, "held");
    ck_assert_int_eq(cJSON_GetArraySize(held), 2);
    const cJSON *h0 = cJSON_GetArrayItem(held, 0);
    ck_assert_int_eq(cJSON_GetObjectItem(h0, "origin")->valueint, 4);
    ck_assert_int_eq(cJSON_GetObjectItem(h0, "changesets")->valueint, 3);
    ck_assert_int_eq(cJSON_GetObjectItem(h0, "waiting_for_schema")->valueint, 3);
    ck_assert_int_eq(cJSON_GetObjectItem(h0, "first_seq")->valueint, 12);
    ck_assert_int_eq(cJSON_GetObjectItem(h0, "applied_seq")->valueint, 11);
    ck_assert_str_eq(jstr(h0, "epoch"), "1f2e3d4c5b6a7988");
    ck_assert_str_eq(jstr(h0, "reason"), "unknown table \"orders\"");
    cJSON_Delete(j);

    /* broken description: still JSON, with an error field */
    s.schema_json = strdup("[{");
    b = hl_http_render_schema(&s);
    j = parse_ok(b);
    free(b);
    ck_assert(cJSON_IsArray(cJSON_GetObjectItem(j, "tables")));
    jstr(j, "error");
    cJSON_Delete(j);
    free(s.schema_json);
}
END_TEST

/* ---- a real listener ---- */

typedef struct resp {
    int status;
    char head[4096];
    const char *body;
    size_t body_len;
    hl_buf raw;
} resp;

static int connect_to(int port)
{
    struct sockaddr_in a;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(fd, 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons((uint16_t)port);
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    return fd;
}

/* Sends n bytes; returns how many went out before an error. */
static size_t send_some(int fd, const void *p, size_t n)
{
    size_t off = 0;
    while (off < n) {
        ssize_t w = send(fd, (const char *)p + off, n - off, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        off += (size_t)w;
    }
    return off;
}

/* Reads until EOF (or error/timeout) and splits status, head and body. */
static void read_resp(int fd, resp *r)
{
    char chunk[4096];
    memset(r, 0, sizeof *r);
    hl_buf_init(&r->raw, 4u << 20);
    for (;;) {
        ssize_t n = recv(fd, chunk, sizeof chunk, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        ck_assert_int_eq(hl_buf_add(&r->raw, chunk, (size_t)n), HL_OK);
    }
    const char *t = hl_buf_str(&r->raw);
    const char *end = strstr(t, "\r\n\r\n");
    ck_assert_msg(end != NULL, "no response head in \"%s\"", t);
    ck_assert_int_eq(sscanf(t, "HTTP/1.%*d %d", &r->status), 1);
    size_t hl = (size_t)(end - t);
    ck_assert_uint_lt(hl, sizeof r->head);
    memcpy(r->head, t, hl);
    r->head[hl] = 0;
    r->body = end + 4;
    r->body_len = r->raw.len - hl - 4;
}

/* Returns the value of header name in r (case-insensitive name), or NULL. Static storage. */
static const char *header(const resp *r, const char *name)
{
    static char val[512];
    size_t nl = strlen(name);
    for (const char *p = strstr(r->head, "\r\n"); p; p = strstr(p + 2, "\r\n")) {
        const char *l = p + 2;
        if (strncasecmp(l, name, nl) == 0 && l[nl] == ':') {
            const char *v = l + nl + 1;
            while (*v == ' ')
                v++;
            const char *e = strstr(v, "\r\n");
            size_t n = e ? (size_t)(e - v) : strlen(v);
            snprintf(val, sizeof val, "%.*s", (int)n, v);
            return val;
        }
    }
    return NULL;
}

static void request(int port, const char *method, const char *path, resp *r)
{
    char req[512];
    int fd = connect_to(port);
    int n = snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", method, path);
    ck_assert_uint_eq(send_some(fd, req, (size_t)n), (size_t)n);
    read_resp(fd, r);
    close(fd);
}

static hl_state st;
static hl_http *srv;

static void server_up(void)
{
    hl_state_snapshot s;
    char empty[] = "[]";
    hl_state_init(&st);
    healthy(&s, hl_mono_ms());
    s.schema_json = empty;
    hl_state_publish(&st, &s);
    ck_assert_int_eq(hl_http_start(&srv, "127.0.0.1:0", &st), HL_OK);
    ck_assert_ptr_nonnull(srv);
    ck_assert_int_gt(hl_http_port(srv), 0);
}

static void server_down(void)
{
    hl_http_stop(srv);
    srv = NULL;
    hl_state_free(&st);
}

START_TEST(server_paths)
{
    resp r;
    int port = hl_http_port(srv);

    request(port, "GET", "/healthz", &r);
    ck_assert_int_eq(r.status, 200);
    ck_assert_str_eq(header(&r, "Content-Type"), "application/json");
    ck_assert_str_eq(r.body, "{\"status\":\"ok\"}\n");
    hl_buf_free(&r.raw);

    request(port, "GET", "/readyz", &r);
    ck_assert_int_eq(r.status, 200);
    ck_assert_ptr_nonnull(strstr(r.body, "\"ready\":true"));
    hl_buf_free(&r.raw);

    request(port, "GET", "/metrics", &r);
    ck_assert_int_eq(r.status, 200);
    ck_assert_str_eq(header(&r, "Content-Type"), "text/plain; version=0.0.4; charset=utf-8");
    ck_assert_ptr_nonnull(strstr(r.body, "harmonylite_ready{node_id=\"7\"} 1\n"));
    hl_buf_free(&r.raw);

    request(port, "GET", "/schema", &r);
    ck_assert_int_eq(r.status, 200);
    cJSON *j = parse_ok(r.body);
    ck_assert(cJSON_IsArray(cJSON_GetObjectItem(j, "tables")));
    cJSON_Delete(j);
    hl_buf_free(&r.raw);

    /* query strings are ignored */
    request(port, "GET", "/healthz?verbose=1", &r);
    ck_assert_int_eq(r.status, 200);
    hl_buf_free(&r.raw);

    /* the state changes what is served: not ready any more */
    hl_state_snapshot s;
    healthy(&s, hl_mono_ms());
    s.nats_connected = false;
    hl_state_publish(&st, &s);
    request(port, "GET", "/readyz", &r);
    ck_assert_int_eq(r.status, 503);
    ck_assert_ptr_nonnull(strstr(r.body, "not connected to the embedded nats-server"));
    hl_buf_free(&r.raw);

    /* stale heartbeat */
    s.engine_beat_ms = hl_mono_ms() > 20000 ? hl_mono_ms() - 20000 : 1;
    hl_state_publish(&st, &s);
    request(port, "GET", "/healthz", &r);
    ck_assert_int_eq(r.status, 503);
    hl_buf_free(&r.raw);
}
END_TEST

START_TEST(server_methods)
{
    resp r;
    int port = hl_http_port(srv);

    request(port, "HEAD", "/metrics", &r);
    ck_assert_int_eq(r.status, 200);
    ck_assert_uint_eq(r.body_len, 0);
    ck_assert_ptr_nonnull(header(&r, "Content-Length"));
    ck_assert_int_gt(strtol(header(&r, "Content-Length"), NULL, 10), 100);
    hl_buf_free(&r.raw);

    static const char *const bad[] = {"POST", "PUT", "DELETE", "OPTIONS", "PATCH"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        request(port, bad[i], "/healthz", &r);
        ck_assert_int_eq(r.status, 405);
        ck_assert_str_eq(header(&r, "Allow"), "GET, HEAD");
        hl_buf_free(&r.raw);
    }

    request(port, "GET", "/nope", &r);
    ck_assert_int_eq(r.status, 404);
    ck_assert_str_eq(r.body, "{\"error\":\"not found\"}\n");
    hl_buf_free(&r.raw);
    request(port, "GET", "/healthz/", &r);
    ck_assert_int_eq(r.status, 404);
    hl_buf_free(&r.raw);
    request(port, "POST", "/nope", &r);
    ck_assert_int_eq(r.status, 405);
    hl_buf_free(&r.raw);

    /* keep-alive: two requests on one connection */
    int fd = connect_to(port);
    const char two[] =
        "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    ck_assert_uint_eq(send_some(fd, two, sizeof two - 1), sizeof two - 1);
    read_resp(fd, &r);
    close(fd);
    ck_assert_int_eq(r.status, 200);
    ck_assert_ptr_nonnull(strstr(r.body, "\"ready\":true"));
    hl_buf_free(&r.raw);
}
END_TEST

static long rss_kib(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long kib = -1;
    ck_assert_ptr_nonnull(f);
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld kB", &kib) == 1)
            break;
    fclose(f);
    return kib;
}

START_TEST(server_bodies)
{
    resp r;
    int port = hl_http_port(srv);
    const size_t big = 10u << 20;
    char *junk = malloc(big);
    ck_assert_ptr_nonnull(junk);
    memset(junk, 'a', big);
    long before = rss_kib();

    /* a small body on GET is read and ignored */
    int fd = connect_to(port);
    const char small[] = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello";
    send_some(fd, small, sizeof small - 1);
    read_resp(fd, &r);
    close(fd);
    ck_assert_int_eq(r.status, 200);
    hl_buf_free(&r.raw);

    /* 10 MB announced: refused from the headers, before any of it is read */
    static const char *const heads[] = {
        "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10485760\r\n\r\n",
        "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10485760\r\n\r\n",
        "POST /healthz HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 10485760\r\n\r\n",
    };
    static const int codes[] = {413, 405, 405};
    for (size_t i = 0; i < 3; i++) {
        fd = connect_to(port);
        ck_assert_uint_eq(send_some(fd, heads[i], strlen(heads[i])), strlen(heads[i]));
        read_resp(fd, &r);
        ck_assert_int_eq(r.status, codes[i]);
        ck_assert_ptr_null(strstr(r.head, "100 Continue"));
        hl_buf_free(&r.raw);
        /* the server has closed: the body cannot all go out */
        ck_assert_uint_lt(send_some(fd, junk, big), big);
        close(fd);
    }

    /* 10 MB sent blindly with the headers (no waiting for an answer) */
    fd = connect_to(port);
    send_some(fd, heads[1], strlen(heads[1]));
    ck_assert_uint_lt(send_some(fd, junk, big), big);
    close(fd);

    /* chunked, no length announced: dropped once past the limit */
    fd = connect_to(port);
    const char ch[] = "GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    send_some(fd, ch, sizeof ch - 1);
    size_t sent = 0;
    for (int i = 0; i < 160; i++) {
        char hdr[16];
        int n = snprintf(hdr, sizeof hdr, "10000\r\n");
        if (send_some(fd, hdr, (size_t)n) != (size_t)n || send_some(fd, junk, 0x10000) != 0x10000 ||
            send_some(fd, "\r\n", 2) != 2)
            break;
        sent += 0x10000;
    }
    ck_assert_uint_lt(sent, big);
    close(fd);

    long after = rss_kib();
    ck_assert_msg(after - before < 4096, "RSS grew by %ld KiB", after - before);
    free(junk);

    /* still serving */
    request(port, "GET", "/healthz", &r);
    ck_assert_int_eq(r.status, 200);
    hl_buf_free(&r.raw);
}
END_TEST

START_TEST(server_bind_errors)
{
    hl_state s;
    hl_http *h = NULL, *h2 = NULL;
    char bind[64];
    hl_state_init(&s);

    ck_assert_int_eq(hl_http_start(&h, "127.0.0.1:0", &s), HL_OK);
    snprintf(bind, sizeof bind, "127.0.0.1:%d", hl_http_port(h));
    ck_assert_int_eq(hl_http_start(&h2, bind, &s), HL_ERR_IO);
    ck_assert_ptr_null(h2);
    hl_http_stop(h);

    static const char *const bad[] = {
        "",         "8080",  "127.0.0.1", "127.0.0.1:", "127.0.0.1:65536",        "127.0.0.1:-1", "127.0.0.1:80x",
        "::1:8080", "[::1]", "[::1]8080", "[]:80",      "no-such-host.invalid:80"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_msg(hl_http_start(&h2, bad[i], &s) == HL_ERR_INVALID, "accepted \"%s\"", bad[i]);
        ck_assert_ptr_null(h2);
    }
    hl_http_stop(NULL);
    ck_assert_int_eq(hl_http_port(NULL), 0);
    hl_state_free(&s);
}
END_TEST

START_TEST(server_bind_forms)
{
    hl_state s;
    hl_http *h = NULL;
    resp r;
    hl_state_init(&s);

    /* every interface: reachable on 127.0.0.1 (dual stack or IPv4) */
    ck_assert_int_eq(hl_http_start(&h, ":0", &s), HL_OK);
    request(hl_http_port(h), "GET", "/nope", &r);
    ck_assert_int_eq(r.status, 404);
    hl_buf_free(&r.raw);
    hl_http_stop(h);

    ck_assert_int_eq(hl_http_start(&h, "localhost:0", &s), HL_OK);
    request(hl_http_port(h), "GET", "/nope", &r);
    ck_assert_int_eq(r.status, 404);
    hl_buf_free(&r.raw);
    hl_http_stop(h);

    int fd6 = socket(AF_INET6, SOCK_STREAM, 0);
    if (fd6 >= 0) {
        struct sockaddr_in6 a;
        memset(&a, 0, sizeof a);
        a.sin6_family = AF_INET6;
        a.sin6_addr = in6addr_loopback;
        bool lo6 = bind(fd6, (struct sockaddr *)&a, sizeof a) == 0;
        close(fd6);
        if (lo6) {
            ck_assert_int_eq(hl_http_start(&h, "[::1]:0", &s), HL_OK);
            ck_assert_int_gt(hl_http_port(h), 0);
            hl_http_stop(h);
        }
    }
    hl_state_free(&s);
}
END_TEST

/* Writes text to a new temporary file (mode 0600) and returns its path (static storage). */
static const char *token_file(const char *text)
{
    static char path[64];
    snprintf(path, sizeof path, "/tmp/hl_http_token_XXXXXX");
    int fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    return path;
}

/* One request with an Authorization header (auth NULL: none). */
static void request_auth(int port, const char *method, const char *path, const char *auth, resp *r)
{
    char req[512];
    int fd = connect_to(port);
    int n = snprintf(req, sizeof req, "%s %s HTTP/1.1\r\nHost: localhost\r\n%s%s%sConnection: close\r\n\r\n", method,
                     path, auth ? "Authorization: " : "", auth ? auth : "", auth ? "\r\n" : "");
    ck_assert_uint_eq(send_some(fd, req, (size_t)n), (size_t)n);
    read_resp(fd, r);
    close(fd);
}

START_TEST(server_auth_token)
{
    hl_state s;
    hl_state_snapshot snap;
    char empty[] = "[]";
    hl_http *h = NULL;
    resp r;
    hl_state_init(&s);
    healthy(&snap, hl_mono_ms());
    snap.schema_json = empty;
    hl_state_publish(&s, &snap);

    const char *path = token_file("  s3cret-T0ken_value~\n");
    hl_http_opts o = {.bind = "127.0.0.1:0", .auth_token_file = path};
    ck_assert_int_eq(hl_http_start_opts(&h, &o, &s), HL_OK);
    unlink(path); /* read once, at start */
    int port = hl_http_port(h);

    /* the probes never need the token */
    request_auth(port, "GET", "/healthz", NULL, &r);
    ck_assert_int_eq(r.status, 200);
    hl_buf_free(&r.raw);
    request_auth(port, "GET", "/readyz", "Bearer wrong", &r);
    ck_assert_int_eq(r.status, 200);
    hl_buf_free(&r.raw);

    static const char *const paths[] = {"/metrics", "/schema"};
    static const char *const refused[] = {NULL,
                                          "Bearer wrong",
                                          "Bearer s3cret-T0ken_value",
                                          "Bearer s3cret-T0ken_value~x",
                                          "Bearer ",
                                          "Basic czNjcmV0LVQwa2VuX3ZhbHVlfg==",
                                          "s3cret-T0ken_value~"};
    for (size_t p = 0; p < 2; p++) {
        for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
            request_auth(port, "GET", paths[p], refused[i], &r);
            ck_assert_msg(r.status == 401, "%s with \"%s\": %d", paths[p], refused[i] ? refused[i] : "(none)",
                          r.status);
            ck_assert_str_eq(header(&r, "WWW-Authenticate"), "Bearer realm=\"harmonylite\"");
            ck_assert_ptr_null(strstr(r.body, "s3cret"));
            hl_buf_free(&r.raw);
        }
        request_auth(port, "HEAD", paths[p], NULL, &r);
        ck_assert_int_eq(r.status, 401);
        hl_buf_free(&r.raw);
        request_auth(port, "GET", paths[p], "Bearer s3cret-T0ken_value~", &r);
        ck_assert_int_eq(r.status, 200);
        hl_buf_free(&r.raw);
        request_auth(port, "GET", paths[p], "bearer   s3cret-T0ken_value~ ", &r);
        ck_assert_int_eq(r.status, 200);
        hl_buf_free(&r.raw);
    }
    request_auth(port, "GET", "/nope", NULL, &r);
    ck_assert_int_eq(r.status, 404);
    hl_buf_free(&r.raw);
    hl_http_stop(h);

    /* a token file that cannot be used stops the start */
    h = NULL;
    o.auth_token_file = "/nonexistent/token";
    ck_assert_int_eq(hl_http_start_opts(&h, &o, &s), HL_ERR_CONFIG);
    ck_assert_ptr_null(h);
    static const char *const bad[] = {"", " \n", "two words\n", "tab\tinside", "caf\xc3\xa9"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        o.auth_token_file = token_file(bad[i]);
        ck_assert_msg(hl_http_start_opts(&h, &o, &s) == HL_ERR_CONFIG, "accepted token file \"%s\"", bad[i]);
        ck_assert_ptr_null(h);
        unlink(o.auth_token_file);
    }
    char *longtok = malloc(5000);
    ck_assert_ptr_nonnull(longtok);
    memset(longtok, 'a', 4999);
    longtok[4999] = 0;
    o.auth_token_file = token_file(longtok);
    ck_assert_int_eq(hl_http_start_opts(&h, &o, &s), HL_ERR_CONFIG);
    unlink(o.auth_token_file);
    longtok[4096] = 0; /* the longest accepted */
    o.auth_token_file = token_file(longtok);
    ck_assert_int_eq(hl_http_start_opts(&h, &o, &s), HL_OK);
    unlink(o.auth_token_file);
    hl_http_stop(h);
    free(longtok);

    hl_http_opts neg = {.bind = "127.0.0.1:0", .request_timeout_s = -1};
    ck_assert_int_eq(hl_http_start_opts(&h, &neg, &s), HL_ERR_INVALID);
    ck_assert_int_eq(hl_http_start_opts(&h, NULL, &s), HL_ERR_INVALID);
    hl_state_free(&s);
}
END_TEST

/* A connection is closed at its deadline even while it keeps trickling bytes
 * (libmicrohttpd's own timeout restarts with every byte). */
START_TEST(server_deadline)
{
    hl_state s;
    hl_http *h = NULL;
    resp r;
    hl_state_init(&s);
    hl_http_opts o = {.bind = "127.0.0.1:0", .request_timeout_s = 1};
    ck_assert_int_eq(hl_http_start_opts(&h, &o, &s), HL_OK);
    int port = hl_http_port(h);

    int fd = connect_to(port);
    const char head[] = "GET /healthz HTTP/1.1\r\nHost: x\r\n";
    ck_assert_uint_eq(send_some(fd, head, sizeof head - 1), sizeof head - 1);
    struct timeval tv = {.tv_sec = 0, .tv_usec = 200000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    bool closed = false;
    uint64_t end = hl_mono_ms() + 60000;
    while (!closed && hl_mono_ms() < end) {
        if (send(fd, "X", 1, MSG_NOSIGNAL) != 1) {
            closed = true;
            break;
        }
        char c;
        ssize_t n = recv(fd, &c, 1, 0);
        closed = n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
    }
    close(fd);
    ck_assert_msg(closed, "a connection trickling bytes stayed open for 60 s");

    /* and the listener still answers */
    request(port, "GET", "/nope", &r);
    ck_assert_int_eq(r.status, 404);
    hl_buf_free(&r.raw);
    hl_http_stop(h);
    hl_state_free(&s);
}
END_TEST

static Suite *http_suite(void)
{
    Suite *s = suite_create("http");
    TCase *render = tcase_create("render");
    tcase_add_test(render, healthz_ok);
    tcase_add_test(render, healthz_stale);
    tcase_add_test(render, healthz_nats_server_down);
    tcase_add_test(render, readyz_ready);
    tcase_add_test(render, readyz_each_check);
    tcase_add_test(render, readyz_default_reasons);
    tcase_add_test(render, metrics_all);
    tcase_add_test(render, metrics_histogram);
    tcase_add_test(render, metrics_escaping);
    tcase_add_test(render, schema_json);
    tcase_add_test(render, snapshot_render);
    suite_add_tcase(s, render);

    TCase *server = tcase_create("server");
    tcase_add_checked_fixture(server, server_up, server_down);
    tcase_set_timeout(server, 60);
    tcase_add_test(server, server_paths);
    tcase_add_test(server, server_methods);
    tcase_add_test(server, server_bodies);
    suite_add_tcase(s, server);

    TCase *bind = tcase_create("bind");
    tcase_set_timeout(bind, 60);
    tcase_add_test(bind, server_bind_errors);
    tcase_add_test(bind, server_bind_forms);
    suite_add_tcase(s, bind);

    TCase *abuse = tcase_create("abuse");
    tcase_set_timeout(abuse, 120);
    tcase_add_test(abuse, server_auth_token);
    tcase_add_test(abuse, server_deadline);
    suite_add_tcase(s, abuse);
    return s;
}

int main(void)
{
    hl_log_setup(HL_LOG_DEBUG, false, 7);
    SRunner *sr = srunner_create(http_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
