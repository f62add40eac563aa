/*
 * http.c - the operator HTTP surface: /healthz, /readyz, /metrics, /schema.
 *
 * libmicrohttpd runs one internal polling thread. Handlers copy the engine's
 * last published snapshot (hl_state_get, a short mutex hold) and render it;
 * they never touch the database or NATS, so a slow client cannot slow the
 * engine. Bodies are rendered into size-capped buffers and handed to MHD,
 * which frees them with free().
 *
 * Only GET and HEAD exist. Request bodies are never buffered: a declared body
 * larger than HL_HTTP_MAX_BODY is refused with 413 before it is read, and a
 * chunked body is counted and discarded, the connection dropped once it passes
 * the limit.
 *
 * Abuse: MHD polls with epoll, so open connections cost no time while idle;
 * their number is bounded for the listener and per client address, and each
 * has a hard deadline (request_timeout from its start or from the end of its
 * previous request) that a reaper thread enforces by shutting the socket down:
 * MHD's own timeout only counts idle time, so a client trickling a byte now
 * and then would keep its connection forever. /metrics and /schema can ask
 * for a bearer token; the probes never do.
 */
#include "http/http.h"

#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/buf.h"
#include "common/hlc.h"
#include "common/log.h"

#ifndef HL_VERSION
#define HL_VERSION "unknown"
#endif

#define HL_HTTP_DEFAULT_MAX_CONNECTIONS 1024
#define HL_HTTP_DEFAULT_PER_CLIENT 16
#define HL_HTTP_DEFAULT_TIMEOUT_S 10
#define HL_HTTP_REAP_TICK_MS 200u         /* how often deadlines are checked */
#define HL_HTTP_FD_RESERVE 256u           /* descriptors left to the database, NATS and the logs */
#define HL_HTTP_MAX_TOKEN 4096u           /* bytes of the bearer token file */
#define HL_HTTP_CONN_MEMORY (16u * 1024u) /* request line + headers per connection */
#define HL_HTTP_MAX_BODY 1024u            /* bytes of request body read and thrown away */
#define HL_HTTP_HEARTBEAT_MS 10000u       /* /healthz fails when the engine loop is older */
#define HL_HTTP_BODY_LIMIT (1u << 20)     /* cap of any rendered response */

#define CT_JSON "application/json"
#define CT_METRICS "text/plain; version=0.0.4; charset=utf-8"

/* One open connection, for its deadline. Linked while MHD has it open
 * (NOTIFY_CONNECTION STARTED to CLOSED); guarded by hl_http.mu. */
typedef struct hl_http_conn {
    struct hl_http_conn *prev, *next;
    int fd;
    uint64_t deadline_ms; /* monotonic */
    bool cut;             /* shut down by the reaper; MHD closes it */
} hl_http_conn;

struct hl_http {
    struct MHD_Daemon *d;
    hl_state *state;
    int port;
    char bind[256];
    uint64_t timeout_ms;
    bool have_token;
    unsigned char token_sha256[32]; /* the token itself is never kept */
    /* MHD's last message while starting, to explain a failure; guarded by mu
     * because MHD logs from its own thread once started. mu also guards the
     * connection list and the reaper's state. */
    pthread_mutex_t mu;
    int starting;
    char start_err[256];
    hl_http_conn *conns;
    pthread_cond_t reaper_cv;
    pthread_t reaper;
    bool reaper_started;
    bool stopping;
    uint64_t cut_total;
    hl_ratelimit cut_log;
};

/* Per request: bytes of body seen (and discarded). Freed in on_completed. */
typedef struct hl_http_req {
    uint64_t body;
} hl_http_req;

/* ---- small helpers ---- */

/* Copies a fixed-size char array that may lack its NUL into out (size outsz). */
static void fixed_str(char *out, size_t outsz, const char *in, size_t insz)
{
    size_t n = strnlen(in, insz);
    if (n >= outsz)
        n = outsz - 1;
    memcpy(out, in, n);
    out[n] = 0;
}

static int nstreams_of(const hl_state_snapshot *s)
{
    if (s->nstreams < 0)
        return 0;
    return s->nstreams > HL_STATE_MAX_SHARDS ? HL_STATE_MAX_SHARDS : s->nstreams;
}

/* Prints cJSON item followed by a newline into a new malloc'd string (NULL on failure). */
static char *json_finish(cJSON *root)
{
    char *out = NULL;
    char *txt = root ? cJSON_PrintUnformatted(root) : NULL;
    if (txt) {
        size_t n = strlen(txt);
        out = malloc(n + 2);
        if (out) {
            memcpy(out, txt, n);
            out[n] = '\n';
            out[n + 1] = 0;
        }
        cJSON_free(txt);
    }
    cJSON_Delete(root);
    return out;
}

/* ---- /healthz ---- */

char *hl_http_render_healthz(const hl_state_snapshot *s, uint64_t now_mono_ms, int *code)
{
    char reason[160] = "";

    if (s->engine_beat_ms == 0) {
        snprintf(reason, sizeof reason, "the engine loop has not run yet");
    } else {
        uint64_t age = now_mono_ms > s->engine_beat_ms ? now_mono_ms - s->engine_beat_ms : 0;
        if (age >= HL_HTTP_HEARTBEAT_MS)
            snprintf(reason, sizeof reason, "the engine loop has not run for %" PRIu64 ".%01" PRIu64 " s", age / 1000,
                     (age % 1000) / 100);
        else if (s->embedded && !s->nats_server_running)
            snprintf(reason, sizeof reason, "the embedded nats-server is not running");
    }

    cJSON *root = cJSON_CreateObject();
    if (!root)
        goto out;
    if (!cJSON_AddStringToObject(root, "status", reason[0] ? "unhealthy" : "ok"))
        goto out;
    if (reason[0] && !cJSON_AddStringToObject(root, "reason", reason))
        goto out;
out:
    *code = reason[0] ? MHD_HTTP_SERVICE_UNAVAILABLE : MHD_HTTP_OK;
    return json_finish(root);
}

/* ---- readiness checks, shared by /readyz and /metrics ---- */

enum {
    CHECK_DATABASE,
    CHECK_TRIGGERS,
    CHECK_NATS,
    CHECK_STREAMS,
    CHECK_CAUGHT_UP,
    CHECK_GAP,
    CHECK_SCHEMA,
    CHECK_ENGINE,
    CHECK_CONSUMERS,
    CHECK_CATCHING_UP,
    NCHECKS
};

typedef struct check {
    const char *name;
    bool ok;
    char reason[600];
} check;

/* Marks c failed, with a printf-style reason. */
__attribute__((format(printf, 2, 3))) static void check_fail(check *c, const char *fmt, ...)
{
    va_list ap;
    c->ok = false;
    va_start(ap, fmt);
    vsnprintf(c->reason, sizeof c->reason, fmt, ap);
    va_end(ap);
}

/* Sets c's reason to the snapshot's text in (insz bytes, maybe without its
 * NUL), or to dflt when that is empty; does not change whether c passes. */
static void check_reason(check *c, const char *in, size_t insz, const char *dflt)
{
    char r[sizeof c->reason];
    fixed_str(r, insz < sizeof r ? insz : sizeof r, in, insz);
    snprintf(c->reason, sizeof c->reason, "%s", r[0] ? r : dflt);
}

/* Appends " (and N more stream[s]<tail>)" after the n bytes written to c's reason. */
static void check_more_streams(check *c, int n, int nmore, const char *tail)
{
    if (nmore > 0 && n > 0 && (size_t)n < sizeof c->reason)
        snprintf(c->reason + n, sizeof c->reason - (size_t)n, " (and %d more stream%s%s)", nmore, nmore > 1 ? "s" : "",
                 tail);
}

static void check_database(const hl_state_snapshot *s, check *c)
{
    if (!s->db_open)
        check_fail(c, "the database is not open");
}

static void check_triggers(const hl_state_snapshot *s, check *c)
{
    if (!s->triggers_installed)
        check_fail(c, "change-capture triggers are not installed");
}

static void check_nats(const hl_state_snapshot *s, check *c)
{
    if (!s->nats_connected)
        check_fail(c, "%s", s->embedded ? "not connected to the embedded nats-server" : "not connected to NATS");
}

static void check_streams(const hl_state_snapshot *s, check *c)
{
    if (!s->streams_ready)
        check_fail(c, "the JetStream change-log streams are not ready");
}

/* Names the first stream still reading what it held at start, and how many more are. */
static void check_caught_up(const hl_state_snapshot *s, check *c)
{
    if (s->caught_up)
        return;
    int behind = -1, nbehind = 0;
    for (int i = 0; i < nstreams_of(s); i++)
        if (s->streams[i].applied_seq < s->streams[i].start_tail) {
            if (behind < 0)
                behind = i;
            nbehind++;
        }
    if (behind < 0) {
        check_fail(c, "still reading the messages present in the change-log streams at start");
        return;
    }
    const hl_state_stream *st = &s->streams[behind];
    char name[sizeof st->name];
    fixed_str(name, sizeof name, st->name, sizeof st->name);
    c->ok = false;
    int n = snprintf(c->reason, sizeof c->reason, "applied %" PRIu64 " of %" PRIu64 " messages present at start on %s",
                     st->applied_seq, st->start_tail, name);
    check_more_streams(c, n, nbehind - 1, " behind");
}

static void check_gap(const hl_state_snapshot *s, check *c)
{
    if (!s->gap)
        return;
    c->ok = false;
    check_reason(c, s->gap_reason, sizeof s->gap_reason,
                 "changesets this node has not applied are missing from the change-log streams");
}

/* Fails only for the odd one out; a stream held back by schema.max_held_bytes
 * and changesets held for the schema are reported without failing. */
static void check_schema(const hl_state_snapshot *s, check *c)
{
    if (s->schema_odd) {
        c->ok = false;
        check_reason(c, s->schema_odd_reason, sizeof s->schema_odd_reason,
                     "this node's schema is incompatible with the schema most live nodes run");
    } else if (s->held_bound_reason[0]) {
        /* Reported, not failing: a stray or forged origin must not take the node out of service. */
        check_reason(c, s->held_bound_reason, sizeof s->held_bound_reason, "");
    } else if (s->paused) {
        /* Reported, not failing: every other origin keeps applying, and a
         * hold may come from a node that is gone or a stray message. */
        check_reason(c, s->paused_reason, sizeof s->paused_reason,
                     "changesets are held until the local schema matches theirs");
    }
}

static void check_engine(const hl_state_snapshot *s, check *c)
{
    if (!s->engine_stalled)
        return;
    c->ok = false;
    check_reason(c, s->engine_reason, sizeof s->engine_reason,
                 "the engine cannot capture or apply: its transactions keep failing");
}

/* Names the first stream whose consumer is missing or stuck, and how many more are. */
static void check_consumers(const hl_state_snapshot *s, check *c)
{
    int stalled = -1, nstalled = 0;
    for (int i = 0; i < nstreams_of(s); i++)
        if (s->streams[i].stalled_ms) {
            if (stalled < 0)
                stalled = i;
            nstalled++;
        }
    if (stalled < 0)
        return;
    const hl_state_stream *st = &s->streams[stalled];
    char name[sizeof st->name];
    fixed_str(name, sizeof name, st->name, sizeof st->name);
    c->ok = false;
    int n = snprintf(c->reason, sizeof c->reason,
                     "no working consumer on stream %s for %" PRIu64 " s; re-creating it after sequence %" PRIu64, name,
                     st->stalled_ms / 1000, st->applied_seq);
    check_more_streams(c, n, nstalled - 1, "");
}

/* Merging a snapshot to close a gap: not ready until it is merged. */
static void check_catching_up(const hl_state_snapshot *s, check *c)
{
    if (!s->catching_up)
        return;
    c->ok = false;
    check_reason(c, s->catchup_reason, sizeof s->catchup_reason, "catching-up from a snapshot");
}

/* The readiness checks in the order /readyz and /metrics list them. */
static const struct {
    const char *name;
    void (*eval)(const hl_state_snapshot *s, check *c);
} checks[NCHECKS] = {
    [CHECK_DATABASE] = {"database", check_database},
    [CHECK_TRIGGERS] = {"triggers", check_triggers},
    [CHECK_NATS] = {"nats", check_nats},
    [CHECK_STREAMS] = {"streams", check_streams},
    [CHECK_CAUGHT_UP] = {"caught_up", check_caught_up},
    [CHECK_GAP] = {"gap", check_gap},
    [CHECK_SCHEMA] = {"schema", check_schema},
    [CHECK_ENGINE] = {"engine", check_engine},
    [CHECK_CONSUMERS] = {"consumers", check_consumers},
    [CHECK_CATCHING_UP] = {"catching_up", check_catching_up},
};

/* Fills c[NCHECKS]; returns true when every check passes. */
static bool eval_checks(const hl_state_snapshot *s, check c[NCHECKS])
{
    bool all = true;
    for (int i = 0; i < NCHECKS; i++) {
        c[i].name = checks[i].name;
        c[i].ok = true;
        c[i].reason[0] = 0;
        checks[i].eval(s, &c[i]);
        all = all && c[i].ok;
    }
    return all;
}

/* ---- /readyz ---- */

/* "snapshot": the newest snapshot this node knows of, null when none (or no scheduler). */
static bool add_snapshot(cJSON *root, const hl_state_snapshot *s)
{
    if (!s->snap_newest_ms)
        return cJSON_AddNullToObject(root, "snapshot") != NULL;
    char name[sizeof s->snap_newest], num[24], when[40];
    fixed_str(name, sizeof name, s->snap_newest, sizeof s->snap_newest);
    time_t secs = (time_t)(s->snap_newest_ms / 1000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    snprintf(when, sizeof when, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
             tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(s->snap_newest_ms % 1000));
    cJSON *o = cJSON_AddObjectToObject(root, "snapshot");
    snprintf(num, sizeof num, "%" PRIu64, s->snap_newest_node);
    return o && cJSON_AddStringToObject(o, "manifest", name) && cJSON_AddRawToObject(o, "node", num) &&
           cJSON_AddStringToObject(o, "created", when);
}

char *hl_http_render_readyz(const hl_state_snapshot *s, int *code)
{
    check c[NCHECKS];
    bool ready = eval_checks(s, c);
    *code = ready ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE;

    cJSON *root = cJSON_CreateObject();
    cJSON *arr = NULL;
    if (!root || !cJSON_AddBoolToObject(root, "ready", ready))
        goto fail;
    arr = cJSON_AddArrayToObject(root, "checks");
    if (!arr)
        goto fail;
    for (int i = 0; i < NCHECKS; i++) {
        cJSON *o = cJSON_CreateObject();
        if (!o)
            goto fail;
        cJSON_AddItemToArray(arr, o);
        if (!cJSON_AddStringToObject(o, "name", c[i].name) || !cJSON_AddBoolToObject(o, "ok", c[i].ok) ||
            !cJSON_AddStringToObject(o, "reason", c[i].reason))
            goto fail;
    }
    if (!add_snapshot(root, s))
        goto fail;
    return json_finish(root);
fail:
    cJSON_Delete(root);
    return NULL;
}

/* ---- /metrics ---- */

/* Appends a label value escaped per the exposition format: \ " and newline. */
static void add_label_value(hl_buf *b, const char *v)
{
    for (const char *p = v; !hl_buf_status(b) && *p; p++) {
        if (*p == '\\')
            hl_buf_adds(b, "\\\\");
        else if (*p == '"')
            hl_buf_adds(b, "\\\"");
        else if (*p == '\n')
            hl_buf_adds(b, "\\n");
        else
            hl_buf_addc(b, (unsigned char)*p);
    }
}

/* Appends a float in the shortest form that reads back exactly. */
static void add_float(hl_buf *b, double v)
{
    char tmp[40];
    if (isnan(v)) {
        hl_buf_adds(b, "NaN");
        return;
    }
    if (isinf(v)) {
        hl_buf_adds(b, v > 0 ? "+Inf" : "-Inf");
        return;
    }
    snprintf(tmp, sizeof tmp, "%.15g", v);
    if (strtod(tmp, NULL) != v)
        snprintf(tmp, sizeof tmp, "%.17g", v);
    hl_buf_adds(b, tmp);
}

/* Context for writing one exposition: the buffer and the node label. The
 * buffer's errors are sticky: the writers append without checking, and
 * hl_http_render_metrics checks hl_buf_status once at the end. */
typedef struct mw {
    hl_buf b;
    char node[24];
} mw;

/* "# HELP" and "# TYPE" lines. help must not contain '\' or newlines. */
static void m_head(mw *w, const char *name, const char *type, const char *help)
{
    hl_buf_addf(&w->b, "# HELP harmonylite_%s %s\n# TYPE harmonylite_%s %s\n", name, help, name, type);
}

/* Starts a sample line: name{node_id="N" (the caller may add labels, then calls m_end_*). */
static void m_begin(mw *w, const char *name)
{
    hl_buf_addf(&w->b, "harmonylite_%s{node_id=\"%s\"", name, w->node);
}

static void m_label(mw *w, const char *k, const char *v)
{
    hl_buf_addf(&w->b, ",%s=\"", k);
    add_label_value(&w->b, v);
    hl_buf_addc(&w->b, '"');
}

static void m_end_u64(mw *w, uint64_t v)
{
    hl_buf_addf(&w->b, "} %" PRIu64 "\n", v);
}

static void m_end_f(mw *w, double v)
{
    hl_buf_adds(&w->b, "} ");
    add_float(&w->b, v);
    hl_buf_addc(&w->b, '\n');
}

/* A metric with a single sample labelled node_id only. */
static void m_simple(mw *w, const char *name, const char *type, const char *help, uint64_t v)
{
    m_head(w, name, type, help);
    m_begin(w, name);
    m_end_u64(w, v);
}

static void m_build_info(mw *w)
{
    m_head(w, "build_info", "gauge", "Always 1; the version label is the running harmonylite version.");
    m_begin(w, "build_info");
    m_label(w, "version", HL_VERSION);
    m_end_u64(w, 1);
}

/* Local writes: captured, then acknowledged by JetStream. */
static void m_capture_publish(mw *w, const hl_state_snapshot *s)
{
    m_simple(w, "rows_captured_total", "counter", "Row changes captured from local writes.", s->rows_captured);
    m_simple(w, "changesets_captured_total", "counter", "Changesets built from local writes.", s->changesets_captured);
    m_simple(w, "changesets_published_total", "counter", "Changesets acknowledged by JetStream.",
             s->changesets_published);
    m_simple(w, "rows_published_total", "counter", "Row changes in changesets acknowledged by JetStream.",
             s->rows_published);
    m_simple(w, "publish_backlog", "gauge", "Changesets in the outbox waiting to be acknowledged by JetStream.",
             s->outbox_rows);
}

/* What became of remote changes: applied, skipped by last writer wins, conflicts, duplicates. */
static void m_apply(mw *w, const hl_state_snapshot *s)
{
    m_simple(w, "rows_applied_total", "counter", "Remote row changes written to the local database.", s->rows_applied);
    m_simple(w, "rows_skipped_lww_total", "counter",
             "Remote row changes skipped because the local version is newer (last writer wins).", s->rows_skipped_lww);
    m_simple(w, "conflicts_total", "counter",
             "Remote row changes that could not be applied and were recorded in __harmonylite__conflicts.",
             s->conflicts);
    m_simple(w, "changesets_applied_total", "counter", "Remote changesets applied.", s->changesets_applied);
    m_simple(w, "changesets_duplicate_total", "counter", "Remote changesets dropped as already applied.",
             s->changesets_duplicate);
}

/* Remote changesets held out of order or for the schema, and how their order was kept. */
static void m_held_order(mw *w, const hl_state_snapshot *s)
{
    m_simple(w, "changesets_held_total", "counter",
             "Remote changesets stored in __harmonylite__pending (out of order or waiting for the schema).",
             s->changesets_held);
    m_simple(w, "changesets_held", "gauge", "Changesets currently held in __harmonylite__pending.", s->held_now);
    m_simple(w, "held_origins", "gauge", "Origins with changesets held in __harmonylite__pending (listed in /schema).",
             s->held_origins);
    m_simple(w, "chains_applied_total", "counter",
             "Transactions too big for one changeset, received as a chain of changesets and applied as one.",
             s->chains_applied);
    m_simple(w, "order_gaps_total", "counter",
             "Times changesets missing for order_hold_timeout were given up on and the ones held after them applied.",
             s->order_gaps);
    m_simple(w, "changesets_late_total", "counter",
             "Changesets applied after their position had been given up on (they arrived after order_hold_timeout).",
             s->changesets_late);
}

/* The engine's retries and the work it redoes or postpones: failed
 * transactions, tables resent in full, changesets from a clock ahead. */
static void m_engine(mw *w, const hl_state_snapshot *s)
{
    m_simple(w, "engine_failures_total", "counter",
             "Engine transactions (capture, apply) that failed and were retried.", s->engine_failures);
    m_simple(w, "table_resyncs_total", "counter",
             "Tables without a primary key sent in full because VACUUM or a rebuild moved their rowids.",
             s->table_resyncs);
    m_simple(w, "missed_rows_total", "counter",
             "Rows found inserted or deleted while a table's triggers were missing (a rebuild), then sent.",
             s->missed_rows);
    m_simple(w, "clock_ahead_total", "counter",
             "Changesets held because a row version was more than max_clock_drift ahead of the local wall clock.",
             s->clock_ahead);
}

/* Catching up from a snapshot after a gap (docs/snapshots.md). */
static void m_catchup(mw *w, const hl_state_snapshot *s)
{
    m_simple(w, "catchup_merges_total", "counter",
             "Snapshots merged row by row to catch up after the streams discarded changesets this node had not read.",
             s->catchup_merges);
    m_simple(w, "catchup_rows_merged_total", "counter", "Snapshot rows merged while catching up (every attempt).",
             s->catchup_rows);
    m_simple(w, "restores_total", "counter",
             "Snapshots -restore wrote into this database file (recorded in the file; 0: never restored).",
             s->restores);
    if (s->restored_ms) {
        m_head(w, "restored_timestamp_seconds", "gauge",
               "When -restore last wrote this database file from a snapshot (Unix time).");
        m_begin(w, "restored_timestamp_seconds");
        m_end_f(w, (double)s->restored_ms / 1000.0);
    }
}

/* The bound on what is held for the schema (schema.max_held_bytes) and the odd one out. */
static void m_schema(mw *w, const hl_state_snapshot *s)
{
    m_simple(w, "changesets_deferred_total", "counter",
             "Changesets not stored because their origin waits for the schema and holding them would pass "
             "schema.max_held_bytes; read again from the stream once room frees.",
             s->changesets_deferred);
    m_simple(w, "held_bytes", "gauge",
             "Bytes held for origins waiting for the local schema (what schema.max_held_bytes bounds).", s->held_bytes);
    m_simple(w, "held_bound_streams", "gauge",
             "Streams not read past a deferred changeset until held changesets leave room (schema.max_held_bytes).",
             s->held_bound_streams);
    m_simple(w, "schema_odd_one_out", "gauge",
             "1 while this node's schema is incompatible with the schema most live nodes run (not ready).",
             s->schema_odd ? 1 : 0);
}

/* Periodic snapshots (src/snapshot/schedule.c): only while the scheduler runs. */
static void m_snapshot(mw *w, const hl_state_snapshot *s)
{
    if (!s->snap_sched)
        return;
    m_simple(w, "snapshots_taken_total", "counter", "Snapshots this node took and stored (periodic or sleep_timeout).",
             s->snap_taken);
    m_simple(w, "snapshot_failures_total", "counter",
             "Snapshots this node failed to take or store; retried at a later tick with backoff.", s->snap_failures);
    m_simple(w, "snapshot_last_size_bytes", "gauge", "Compressed size of the last snapshot this node took.",
             s->snap_last_bytes);
    m_head(w, "snapshot_last_duration_seconds", "gauge",
           "Time the last snapshot this node took needed, upload included.");
    m_begin(w, "snapshot_last_duration_seconds");
    m_end_f(w, (double)s->snap_last_ms / 1000.0);
    if (s->snap_newest_ms) {
        uint64_t now = hl_now_ms();
        m_head(w, "snapshot_age_seconds", "gauge",
               "Seconds since the newest snapshot this node knows of (the cluster's last, from the lease bucket).");
        m_begin(w, "snapshot_age_seconds");
        m_end_f(w, now > s->snap_newest_ms ? (double)(now - s->snap_newest_ms) / 1000.0 : 0.0);
    }
}

/* Messages refused as malformed, and partly received changesets given up on. */
static void m_refused(mw *w, const hl_state_snapshot *s)
{
    m_simple(w, "malformed_messages_total", "counter", "Messages and changesets refused as malformed and skipped.",
             s->messages_malformed + s->changesets_malformed);
    uint64_t expired = 0;
    for (int i = 0; i < nstreams_of(s); i++)
        expired += s->streams[i].changesets_expired;
    m_simple(w, "changesets_expired_total", "counter",
             "Partly received changesets dropped because their missing parts did not come within "
             "replication_log.incomplete_expiry.",
             expired);
}

/* The lag histogram: the snapshot keeps per-bucket counts; the format wants cumulative ones. */
static void m_lag(mw *w, const hl_state_snapshot *s)
{
    m_head(w, "replication_lag_seconds", "histogram",
           "Seconds from a change's capture on its origin node to its apply commit here.");
    uint64_t cum = 0;
    for (int i = 0; i <= HL_LAG_BUCKETS; i++) {
        char le[32];
        cum += s->lag_buckets[i];
        if (i < HL_LAG_BUCKETS)
            snprintf(le, sizeof le, "%g", hl_lag_bounds[i]);
        else
            snprintf(le, sizeof le, "+Inf");
        m_begin(w, "replication_lag_seconds_bucket");
        m_label(w, "le", le);
        m_end_u64(w, cum);
    }
    m_begin(w, "replication_lag_seconds_sum");
    m_end_f(w, s->lag_sum);
    /* _count is the +Inf bucket by definition; emitting the same number keeps the two equal. */
    m_begin(w, "replication_lag_seconds_count");
    m_end_u64(w, cum);
}

static uint64_t stream_applied(const hl_state_stream *st)
{
    return st->applied_seq;
}

static uint64_t stream_last(const hl_state_stream *st)
{
    return st->tail_seq;
}

static uint64_t stream_stalled(const hl_state_stream *st)
{
    return st->stalled_ms ? 1 : 0;
}

static uint64_t stream_restarts(const hl_state_stream *st)
{
    return st->consumer_restarts;
}

/* A metric with one sample per stream, labelled with the stream's name; value gives the sample. */
static void m_per_stream(mw *w, const hl_state_snapshot *s, const char *name, const char *type, const char *help,
                         uint64_t (*value)(const hl_state_stream *))
{
    m_head(w, name, type, help);
    for (int i = 0; i < nstreams_of(s); i++) {
        char sname[sizeof s->streams[0].name];
        fixed_str(sname, sizeof sname, s->streams[i].name, sizeof s->streams[i].name);
        m_begin(w, name);
        m_label(w, "stream", sname);
        m_end_u64(w, value(&s->streams[i]));
    }
}

static void m_streams(mw *w, const hl_state_snapshot *s)
{
    m_per_stream(w, s, "stream_applied_sequence", "gauge",
                 "Stream sequence up to which this node has dealt with every message.", stream_applied);
    m_per_stream(w, s, "stream_last_sequence", "gauge", "Last sequence of the stream as last seen by this node.",
                 stream_last);
    m_per_stream(w, s, "stream_consumer_stalled", "gauge",
                 "1 while the stream's consumer is missing or stuck and being re-created.", stream_stalled);
    m_per_stream(w, s, "stream_consumer_restarts_total", "counter",
                 "Consumers of the stream re-created after the first (server restart, stream moved or unavailable).",
                 stream_restarts);
}

static void m_nats(mw *w, const hl_state_snapshot *s)
{
    m_simple(w, "nats_connected", "gauge", "1 while connected to NATS.", s->nats_connected ? 1 : 0);
    if (s->embedded)
        m_simple(w, "nats_server_running", "gauge", "1 while the embedded nats-server child is running.",
                 s->nats_server_running ? 1 : 0);
    m_simple(w, "nats_server_restarts_total", "counter", "Restarts of the embedded nats-server child.",
             s->nats_server_restarts);
}

/* The /readyz verdict and each of its checks. */
static void m_readiness(mw *w, const hl_state_snapshot *s)
{
    check c[NCHECKS];
    bool ready = eval_checks(s, c);
    m_simple(w, "ready", "gauge", "1 when every readiness check passes (as /readyz).", ready ? 1 : 0);
    m_head(w, "readiness_check", "gauge", "1 when the named /readyz check passes.");
    for (int i = 0; i < NCHECKS; i++) {
        m_begin(w, "readiness_check");
        m_label(w, "check", c[i].name);
        m_end_u64(w, c[i].ok ? 1 : 0);
    }
}

char *hl_http_render_metrics(const hl_state_snapshot *s)
{
    mw w;
    hl_buf_init(&w.b, HL_HTTP_BODY_LIMIT);
    snprintf(w.node, sizeof w.node, "%" PRIu64, s->node_id);

    m_build_info(&w);
    m_capture_publish(&w, s);
    m_apply(&w, s);
    m_held_order(&w, s);
    m_engine(&w, s);
    m_catchup(&w, s);
    m_schema(&w, s);
    m_snapshot(&w, s);
    m_refused(&w, s);
    m_lag(&w, s);
    m_streams(&w, s);
    m_nats(&w, s);
    m_readiness(&w, s);

    if (hl_buf_status(&w.b)) {
        hl_buf_free(&w.b);
        return NULL;
    }
    return (char *)hl_buf_steal(&w.b, NULL);
}

/* ---- /schema ---- */

/* "held": changesets held per origin, and "held_origins", how many origins
 * hold any (the list stops at HL_STATE_MAX_HELD). */
static bool add_held(cJSON *root, const hl_state_snapshot *s)
{
    char num[24];
    snprintf(num, sizeof num, "%" PRIu64, s->held_origins);
    if (!cJSON_AddRawToObject(root, "held_origins", num))
        return false;
    cJSON *arr = cJSON_AddArrayToObject(root, "held");
    if (!arr)
        return false;
    for (int i = 0; i < s->nheld && i < HL_STATE_MAX_HELD; i++) {
        const hl_state_held *h = &s->held[i];
        char reason[sizeof h->reason], epoch[17];
        fixed_str(reason, sizeof reason, h->reason, sizeof h->reason);
        snprintf(epoch, sizeof epoch, "%016" PRIx64, h->epoch);
        cJSON *o = cJSON_CreateObject();
        if (!o)
            return false;
        cJSON_AddItemToArray(arr, o);
        const struct {
            const char *k;
            uint64_t v;
        } nums[] = {{"origin", h->node},         {"changesets", h->count},    {"waiting_for_schema", h->for_schema},
                    {"first_seq", h->first_seq}, {"applied_seq", h->applied}, {"held_since_ms", h->since_ms},
                    {"bytes", h->bytes}};
        for (size_t k = 0; k < sizeof nums / sizeof nums[0]; k++) {
            snprintf(num, sizeof num, "%" PRIu64, nums[k].v);
            if (!cJSON_AddRawToObject(o, nums[k].k, num))
                return false;
        }
        if (!cJSON_AddStringToObject(o, "epoch", epoch) || !cJSON_AddStringToObject(o, "reason", reason))
            return false;
    }
    return true;
}

/* Builds the /schema object. Kept separate so more fields can be added to it. */
static cJSON *schema_object(const hl_state_snapshot *s)
{
    char num[24], hash[sizeof s->schema_hash];
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return NULL;

    /* Raw keeps node ids above 2^53 exact (a cJSON number is a double). */
    snprintf(num, sizeof num, "%" PRIu64, s->node_id);
    if (!cJSON_AddRawToObject(root, "node_id", num))
        goto fail;

    fixed_str(hash, sizeof hash, s->schema_hash, sizeof s->schema_hash);
    if (!(hash[0] ? cJSON_AddStringToObject(root, "schema_hash", hash) : cJSON_AddNullToObject(root, "schema_hash")))
        goto fail;
    fixed_str(hash, sizeof hash, s->prev_schema_hash, sizeof s->prev_schema_hash);
    if (!(hash[0] ? cJSON_AddStringToObject(root, "previous_schema_hash", hash)
                  : cJSON_AddNullToObject(root, "previous_schema_hash")))
        goto fail;

    cJSON *tables = s->schema_json ? cJSON_Parse(s->schema_json) : NULL;
    if (s->schema_json && (!tables || !cJSON_IsArray(tables))) {
        /* cannot happen: the engine writes schema_json with cJSON */
        cJSON_Delete(tables);
        tables = NULL;
        if (!cJSON_AddStringToObject(root, "error", "the schema description is not valid JSON"))
            goto fail;
    }
    if (!tables)
        tables = cJSON_CreateArray();
    if (!tables)
        goto fail;
    cJSON_AddItemToObject(root, "tables", tables);
    if (!add_held(root, s) || !add_snapshot(root, s))
        goto fail;
    /* The registry's view (registry.h); null until the first heartbeat read it. */
    cJSON *cluster = s->cluster_json ? cJSON_Parse(s->cluster_json) : NULL;
    if (!(cluster ? cJSON_AddItemToObject(root, "cluster", cluster) : cJSON_AddNullToObject(root, "cluster") != NULL)) {
        cJSON_Delete(cluster);
        goto fail;
    }
    return root;
fail:
    cJSON_Delete(root);
    return NULL;
}

char *hl_http_render_schema(const hl_state_snapshot *s)
{
    cJSON *root = schema_object(s);
    return root ? json_finish(root) : NULL;
}

/* ---- server ---- */

/* Queues body (malloc'd, taken over; NULL means rendering failed → 500). close_after asks the
 * client to close, used when a request body is left unread. */
static enum MHD_Result reply(struct MHD_Connection *conn, unsigned int code, const char *ctype, char *body,
                             bool close_after)
{
    static const char oom[] = "{\"error\":\"internal error\"}\n";
    struct MHD_Response *r;

    if (body) {
        r = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
        if (!r)
            free(body);
    } else {
        code = MHD_HTTP_INTERNAL_SERVER_ERROR;
        ctype = CT_JSON;
        r = MHD_create_response_from_buffer(sizeof oom - 1, (void *)(uintptr_t)oom, MHD_RESPMEM_PERSISTENT);
    }
    if (!r)
        return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    if (code == MHD_HTTP_METHOD_NOT_ALLOWED)
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    if (close_after)
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONNECTION, "close");
    enum MHD_Result ret = MHD_queue_response(conn, code, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result reply_error(struct MHD_Connection *conn, unsigned int code, const char *msg, bool close_after)
{
    cJSON *o = cJSON_CreateObject();
    if (o && !cJSON_AddStringToObject(o, "error", msg)) {
        cJSON_Delete(o);
        o = NULL;
    }
    return reply(conn, code, CT_JSON, json_finish(o), close_after);
}

/* Whether the request announces a body (Content-Length > 0 or chunked); *len gets the length, UINT64_MAX if unknown. */
static bool has_body(struct MHD_Connection *conn, uint64_t *len)
{
    const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    const char *te = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_TRANSFER_ENCODING);
    *len = 0;
    if (te) {
        *len = UINT64_MAX;
        return true;
    }
    if (!cl)
        return false;
    uint64_t v = 0;
    for (const char *p = cl; *p; p++) {
        if (*p < '0' || *p > '9' || v > (UINT64_MAX - 9) / 10) {
            *len = UINT64_MAX; /* MHD rejects such requests itself; treat as too large */
            return true;
        }
        v = v * 10 + (uint64_t)(*p - '0');
    }
    *len = v;
    return v > 0;
}

static bool sha256(const void *p, size_t n, unsigned char out[32])
{
    unsigned int len = 0;
    return EVP_Digest(p, n, out, &len, EVP_sha256(), NULL) && len == 32;
}

/*
 * Whether the request carries "Authorization: Bearer <token>" with the
 * configured token. The hashes are compared in constant time, so neither the
 * token nor its length can be learnt from how long a refusal takes.
 */
static bool authorized(const hl_http *h, struct MHD_Connection *conn)
{
    const char *v = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!v || strncasecmp(v, "Bearer ", 7) != 0)
        return false;
    v += 7;
    while (*v == ' ')
        v++;
    size_t n = strlen(v);
    while (n && (v[n - 1] == ' ' || v[n - 1] == '\t'))
        n--;
    unsigned char got[32];
    return n > 0 && sha256(v, n, got) && CRYPTO_memcmp(got, h->token_sha256, sizeof got) == 0;
}

static enum MHD_Result reply_unauthorized(struct MHD_Connection *conn)
{
    static const char body[] = "{\"error\":\"this path needs the bearer token of http.auth_token_file\"}\n";
    struct MHD_Response *r =
        MHD_create_response_from_buffer(sizeof body - 1, (void *)(uintptr_t)body, MHD_RESPMEM_PERSISTENT);
    if (!r)
        return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, CT_JSON);
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer realm=\"harmonylite\"");
    enum MHD_Result ret = MHD_queue_response(conn, MHD_HTTP_UNAUTHORIZED, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result route(hl_http *h, struct MHD_Connection *conn, const char *url)
{
    hl_state_snapshot s;
    int code = MHD_HTTP_OK;
    char *body;
    const char *ctype = CT_JSON;

    if (strcmp(url, "/healthz") != 0 && strcmp(url, "/readyz") != 0 && strcmp(url, "/metrics") != 0 &&
        strcmp(url, "/schema") != 0)
        return reply_error(conn, MHD_HTTP_NOT_FOUND, "not found", false);

    if (h->have_token && (strcmp(url, "/metrics") == 0 || strcmp(url, "/schema") == 0) && !authorized(h, conn))
        return reply_unauthorized(conn);

    hl_state_get(h->state, &s);
    if (strcmp(url, "/healthz") == 0) {
        body = hl_http_render_healthz(&s, hl_mono_ms(), &code);
    } else if (strcmp(url, "/readyz") == 0) {
        body = hl_http_render_readyz(&s, &code);
    } else if (strcmp(url, "/metrics") == 0) {
        body = hl_http_render_metrics(&s);
        ctype = CT_METRICS;
    } else {
        body = hl_http_render_schema(&s);
    }
    free(s.schema_json);
    free(s.cluster_json);
    return reply(conn, (unsigned int)code, ctype, body, false);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_data_size,
                                  void **req_cls)
{
    hl_http *h = cls;
    hl_http_req *r = *req_cls;
    (void)version;
    (void)upload_data;

    if (!r) {
        /* First call: headers only. Refuse here so a body is never read. */
        uint64_t len;
        bool body = has_body(conn, &len);
        r = calloc(1, sizeof *r);
        if (!r)
            return MHD_NO;
        *req_cls = r;
        if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
            return reply_error(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed", body);
        if (body && len > HL_HTTP_MAX_BODY)
            return reply_error(conn, MHD_HTTP_CONTENT_TOO_LARGE, "request body too large", true);
        return MHD_YES;
    }
    if (*upload_data_size) {
        /* A small (or chunked) body on GET: count it and throw it away. */
        r->body += *upload_data_size;
        *upload_data_size = 0;
        return r->body > HL_HTTP_MAX_BODY ? MHD_NO : MHD_YES;
    }
    return route(h, conn, url);
}

/* A request ended: the connection's next request gets a full request_timeout. */
static void on_completed(void *cls, struct MHD_Connection *conn, void **req_cls, enum MHD_RequestTerminationCode toe)
{
    hl_http *h = cls;
    (void)toe;
    free(*req_cls);
    *req_cls = NULL;
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    hl_http_conn *c = ci ? ci->socket_context : NULL;
    if (c) {
        pthread_mutex_lock(&h->mu);
        c->deadline_ms = hl_mono_ms() + h->timeout_ms;
        pthread_mutex_unlock(&h->mu);
    }
}

/* Tracks each connection from its start to its close, for the reaper. */
static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode toe)
{
    hl_http *h = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
        hl_http_conn *c = calloc(1, sizeof *c);
        if (!c || !ci) {
            /* A connection without a deadline is not kept. */
            free(c);
            if (ci)
                shutdown(ci->connect_fd, SHUT_RDWR);
            *socket_context = NULL;
            return;
        }
        c->fd = ci->connect_fd;
        pthread_mutex_lock(&h->mu);
        c->deadline_ms = hl_mono_ms() + h->timeout_ms;
        c->next = h->conns;
        if (h->conns)
            h->conns->prev = c;
        h->conns = c;
        pthread_mutex_unlock(&h->mu);
        *socket_context = c;
    } else if (toe == MHD_CONNECTION_NOTIFY_CLOSED) {
        /* MHD calls this before it closes the socket, so the reaper never
         * shuts down a descriptor that was reused for something else. */
        hl_http_conn *c = *socket_context;
        if (!c)
            return;
        pthread_mutex_lock(&h->mu);
        if (c->prev)
            c->prev->next = c->next;
        else
            h->conns = c->next;
        if (c->next)
            c->next->prev = c->prev;
        pthread_mutex_unlock(&h->mu);
        free(c);
        *socket_context = NULL;
    }
}

/*
 * Shuts down every connection past its deadline, whatever it is doing: MHD
 * then sees the socket end and closes it. Runs until hl_http_stop.
 */
static void *reaper_main(void *arg)
{
    hl_http *h = arg;
    pthread_mutex_lock(&h->mu);
    while (!h->stopping) {
        uint64_t now = hl_mono_ms(), cut = 0;
        for (hl_http_conn *c = h->conns; c; c = c->next)
            if (!c->cut && now >= c->deadline_ms) {
                shutdown(c->fd, SHUT_RDWR);
                c->cut = true;
                cut++;
            }
        h->cut_total += cut;
        uint64_t total = h->cut_total, suppressed = 0;
        bool log = cut && hl_ratelimit_allow(&h->cut_log, &suppressed);
        pthread_mutex_unlock(&h->mu);
        if (log) {
            char n[24], t[24];
            snprintf(n, sizeof n, "%" PRIu64, cut);
            snprintf(t, sizeof t, "%" PRIu64, total);
            hl_log(HL_LOG_WARN, "http: connections closed at their deadline (http.request_timeout)", "component",
                   "http", "closed", n, "closed_total", t, NULL);
        }
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += (long)HL_HTTP_REAP_TICK_MS * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_mutex_lock(&h->mu);
        if (!h->stopping)
            pthread_cond_timedwait(&h->reaper_cv, &h->mu, &ts);
    }
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

__attribute__((format(printf, 2, 0))) static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    hl_http *h = cls;
    char msg[256];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r' || msg[n - 1] == ' '))
        msg[--n] = 0;

    pthread_mutex_lock(&h->mu);
    int starting = h->starting;
    if (starting)
        memcpy(h->start_err, msg, n + 1);
    pthread_mutex_unlock(&h->mu);
    /* A start-up failure is logged once by hl_http_start with this text. Once
     * running, MHD mostly reports clients that misbehave or vanish: debug level
     * keeps a noisy client out of the log. */
    hl_log(HL_LOG_DEBUG, "http: libmicrohttpd", "component", "libmicrohttpd", "detail", msg, NULL);
}

/* Parses a decimal port 0..65535. */
static bool parse_port(const char *p, uint16_t *out)
{
    uint32_t v = 0;
    if (!*p)
        return false;
    for (; *p; p++) {
        if (*p < '0' || *p > '9')
            return false;
        v = v * 10 + (uint32_t)(*p - '0');
        if (v > 65535)
            return false;
    }
    *out = (uint16_t)v;
    return true;
}

/* Whether this host can create IPv6 sockets (containers sometimes cannot). */
static bool have_ipv6(void)
{
    int fd = socket(AF_INET6, SOCK_STREAM, 0);
    if (fd < 0)
        return false;
    close(fd);
    return true;
}

/* The listen address split into its parts (parse_bind). */
typedef struct bind_parts {
    char host[256];      /* "" for ":port" */
    const char *portstr; /* points into the bind string */
    bool bracketed;      /* "[v6]:port" */
} bind_parts;

/* Splits "[v6]:port", "host:port" or ":port" into host and port text. */
static hl_status split_bind(const char *bind, bind_parts *p, char *err, size_t errsz)
{
    p->bracketed = false;
    if (bind[0] == '[') {
        const char *rb = strchr(bind, ']');
        size_t n = rb ? (size_t)(rb - bind - 1) : 0;
        if (!rb || rb[1] != ':' || n == 0 || n >= sizeof p->host) {
            snprintf(err, errsz, "expected [IPv6 address]:port");
            return HL_ERR_INVALID;
        }
        memcpy(p->host, bind + 1, n);
        p->host[n] = 0;
        p->portstr = rb + 2;
        p->bracketed = true;
        return HL_OK;
    }
    const char *colon = strrchr(bind, ':');
    if (!colon) {
        snprintf(err, errsz, "expected host:port, [IPv6 address]:port or :port");
        return HL_ERR_INVALID;
    }
    size_t n = (size_t)(colon - bind);
    if (n >= sizeof p->host) {
        snprintf(err, errsz, "host name too long");
        return HL_ERR_INVALID;
    }
    memcpy(p->host, bind, n);
    p->host[n] = 0;
    if (strchr(p->host, ':')) {
        snprintf(err, errsz, "write an IPv6 address in brackets: [addr]:port");
        return HL_ERR_INVALID;
    }
    p->portstr = colon + 1;
    return HL_OK;
}

/* The ":port" address: every interface, IPv6 dual stack when the host has
 * IPv6 (*dual set), else IPv4. */
static void any_address(uint16_t port, struct sockaddr_storage *ss, bool *dual)
{
    if (have_ipv6()) {
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
        a6->sin6_family = AF_INET6;
        a6->sin6_addr = in6addr_any;
        a6->sin6_port = htons(port);
        *dual = true;
    } else {
        struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
        a4->sin_family = AF_INET;
        a4->sin_addr.s_addr = htonl(INADDR_ANY);
        a4->sin_port = htons(port);
    }
}

/* Resolves a host name or literal into *ss, the first IPv4 answer preferred
 * (a bracketed host must be an IPv6 literal). */
static hl_status resolve_host(const bind_parts *p, struct sockaddr_storage *ss, char *err, size_t errsz)
{
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = p->bracketed ? AF_INET6 : AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV | (p->bracketed ? AI_NUMERICHOST : 0);
    int rc = getaddrinfo(p->host, p->portstr, &hints, &res);
    if (rc != 0) {
        snprintf(err, errsz, "cannot resolve \"%s\": %s", p->host, gai_strerror(rc));
        return HL_ERR_INVALID;
    }
    const struct addrinfo *pick = NULL;
    for (const struct addrinfo *ai = res; ai && !pick; ai = ai->ai_next)
        if (ai->ai_family == AF_INET)
            pick = ai;
    for (const struct addrinfo *ai = res; ai && !pick; ai = ai->ai_next)
        if (ai->ai_family == AF_INET6)
            pick = ai;
    if (!pick || pick->ai_addrlen > sizeof *ss) {
        freeaddrinfo(res);
        snprintf(err, errsz, "\"%s\" has no IPv4 or IPv6 address", p->host);
        return HL_ERR_INVALID;
    }
    memcpy(ss, pick->ai_addr, pick->ai_addrlen);
    freeaddrinfo(res);
    return HL_OK;
}

/*
 * Turns bind into a socket address. "host:port" (IPv4 literal or host name,
 * first IPv4 answer preferred), "[v6]:port", ":port" (every interface: IPv6
 * dual stack when available, else IPv4). *dual is set for the ":port" case.
 */
static hl_status parse_bind(const char *bind, struct sockaddr_storage *ss, uint16_t *portp, bool *dual, char *err,
                            size_t errsz)
{
    bind_parts p;
    uint16_t port;

    *dual = false;
    hl_status st = split_bind(bind, &p, err, errsz);
    if (st)
        return st;
    if (!parse_port(p.portstr, &port)) {
        snprintf(err, errsz, "expected a port from 0 to 65535, got \"%.32s\"", p.portstr);
        return HL_ERR_INVALID;
    }
    *portp = port;

    memset(ss, 0, sizeof *ss);
    if (!p.host[0]) {
        any_address(port, ss, dual);
        return HL_OK;
    }
    return resolve_host(&p, ss, err, errsz);
}

/*
 * Reads the bearer token from path into h->token_sha256. The file holds the
 * token alone (surrounding white space ignored): 1..HL_HTTP_MAX_TOKEN visible
 * ASCII characters. Errors name the file, never its contents.
 */
static hl_status load_token(hl_http *h, const char *path)
{
    char buf[HL_HTTP_MAX_TOKEN + 2];
    const char *why = NULL;
    size_t n = 0;
    FILE *f = fopen(path, "re");
    if (!f) {
        hl_log(HL_LOG_ERROR, "http: cannot read http.auth_token_file", "path", path, "error", strerror(errno), NULL);
        return HL_ERR_CONFIG;
    }
    struct stat sb;
    if (fstat(fileno(f), &sb) == 0 && (sb.st_mode & (S_IRWXG | S_IRWXO)))
        hl_log(HL_LOG_WARN, "http: http.auth_token_file can be read by other users (chmod 600 it)", "path", path, NULL);
    n = fread(buf, 1, sizeof buf, f);
    if (ferror(f))
        why = "read error";
    fclose(f);
    size_t start = 0;
    while (start < n && (buf[start] == ' ' || buf[start] == '\t' || buf[start] == '\r' || buf[start] == '\n'))
        start++;
    while (n > start && (buf[n - 1] == ' ' || buf[n - 1] == '\t' || buf[n - 1] == '\r' || buf[n - 1] == '\n'))
        n--;
    if (!why && n - start > HL_HTTP_MAX_TOKEN)
        why = "token longer than 4096 bytes";
    if (!why && n == start)
        why = "the file is empty";
    for (size_t i = start; !why && i < n; i++)
        if ((unsigned char)buf[i] < 0x21 || (unsigned char)buf[i] > 0x7e)
            why = "the token must be one word of visible ASCII characters";
    if (!why && !sha256(buf + start, n - start, h->token_sha256))
        why = "cannot hash the token (OpenSSL)";
    h->have_token = !why;
    OPENSSL_cleanse(buf, sizeof buf);
    if (why) {
        hl_log(HL_LOG_ERROR, "http: bad http.auth_token_file", "path", path, "error", why, NULL);
        return HL_ERR_CONFIG;
    }
    return HL_OK;
}

/*
 * The descriptors max_conn connections need, on top of the rest of the
 * process: raises the soft RLIMIT_NOFILE up to the hard one when it is lower,
 * and returns how many connections fit.
 */
static unsigned int fit_fd_limit(unsigned int max_conn)
{
    struct rlimit rl;
    rlim_t want = (rlim_t)max_conn + HL_HTTP_FD_RESERVE;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur >= want)
        return max_conn;
    struct rlimit nr = rl;
    nr.rlim_cur = (rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= want) ? want : rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &nr) == 0)
        rl.rlim_cur = nr.rlim_cur;
    if (rl.rlim_cur >= want)
        return max_conn;
    unsigned int fit = rl.rlim_cur > 2 * HL_HTTP_FD_RESERVE ? (unsigned int)(rl.rlim_cur - HL_HTTP_FD_RESERVE)
                                                            : (unsigned int)(rl.rlim_cur / 2);
    if (fit == 0)
        fit = 1;
    char have[24], used[24];
    snprintf(have, sizeof have, "%llu", (unsigned long long)rl.rlim_cur);
    snprintf(used, sizeof used, "%u", fit);
    hl_log(HL_LOG_WARN, "http: open-file limit too low for http.max_connections; fewer are accepted", "nofile", have,
           "max_connections", used, NULL);
    return fit;
}

hl_status hl_http_start(hl_http **out, const char *bind, hl_state *state)
{
    hl_http_opts o = {.bind = bind};
    return hl_http_start_opts(out, &o, state);
}

/* The connection limits in effect: the options, 0 meaning the default. */
typedef struct http_limits {
    unsigned int max_conn;   /* listener, after fit_fd_limit */
    unsigned int per_client; /* per client address */
    unsigned int timeout_s;  /* request_timeout */
} http_limits;

static void limits_of(const hl_http_opts *o, http_limits *lim)
{
    lim->max_conn = o->max_connections ? (unsigned int)o->max_connections : HL_HTTP_DEFAULT_MAX_CONNECTIONS;
    lim->per_client =
        o->max_connections_per_client ? (unsigned int)o->max_connections_per_client : HL_HTTP_DEFAULT_PER_CLIENT;
    lim->timeout_s = o->request_timeout_s ? (unsigned int)o->request_timeout_s : HL_HTTP_DEFAULT_TIMEOUT_S;
}

/* A server not listening yet: its lock, the reaper's clock and the log limiter. NULL when out of memory. */
static hl_http *http_new(hl_state *state, const char *bind, unsigned int timeout_s)
{
    hl_http *h = calloc(1, sizeof *h);
    if (!h)
        return NULL;
    pthread_mutex_init(&h->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&h->reaper_cv, &ca);
    pthread_condattr_destroy(&ca);
    h->state = state;
    h->timeout_ms = (uint64_t)timeout_s * 1000u;
    h->cut_log.burst = 5;
    h->cut_log.window_ms = 60000;
    snprintf(h->bind, sizeof h->bind, "%s", bind);
    return h;
}

/* Starts libmicrohttpd listening on ss with the limits; a failure is logged
 * with MHD's own message when it gave one. */
static hl_status start_daemon(hl_http *h, const char *bind, const struct sockaddr_storage *ss, uint16_t port, bool dual,
                              const http_limits *lim)
{
    char err[256];
    /* AUTO picks epoll on Linux: no FD_SETSIZE limit, and idle connections cost nothing. */
    unsigned int flags = MHD_USE_AUTO | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG;
    if (ss->ss_family == AF_INET6)
        flags |= dual ? MHD_USE_DUAL_STACK : MHD_USE_IPv6;

    h->starting = 1;
    /* The port argument only appears in MHD's messages; the address is SOCK_ADDR. */
    h->d = MHD_start_daemon(
        flags, port, NULL, NULL, on_request, h,
        /* must come first so start-up messages reach it */
        MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, h, MHD_OPTION_SOCK_ADDR, (const struct sockaddr *)ss,
        MHD_OPTION_CONNECTION_LIMIT, lim->max_conn, MHD_OPTION_PER_IP_CONNECTION_LIMIT, lim->per_client,
        MHD_OPTION_CONNECTION_TIMEOUT, lim->timeout_s, MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)HL_HTTP_CONN_MEMORY,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, h, MHD_OPTION_NOTIFY_CONNECTION, on_connection, h, MHD_OPTION_END);
    pthread_mutex_lock(&h->mu);
    h->starting = 0;
    snprintf(err, sizeof err, "%s", h->start_err);
    pthread_mutex_unlock(&h->mu);
    if (!h->d) {
        hl_log(HL_LOG_ERROR, "http: cannot listen", "bind", bind, "error",
               err[0] ? err : "libmicrohttpd failed to start", NULL);
        return HL_ERR_IO;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    h->port = info ? (int)info->port : 0;
    return HL_OK;
}

/* Starts the thread that enforces request_timeout (reaper_main). */
static hl_status start_reaper(hl_http *h, const char *bind)
{
    if (pthread_create(&h->reaper, NULL, reaper_main, h) != 0) {
        hl_log(HL_LOG_ERROR, "http: cannot start the deadline thread", "bind", bind, NULL);
        return HL_ERR_IO;
    }
    h->reaper_started = true;
    return HL_OK;
}

static void log_listening(const hl_http *h, const char *bind, const http_limits *lim)
{
    char portstr[8], conns[16], perc[16], tmo[16];
    snprintf(portstr, sizeof portstr, "%d", h->port);
    snprintf(conns, sizeof conns, "%u", lim->max_conn);
    snprintf(perc, sizeof perc, "%u", lim->per_client);
    snprintf(tmo, sizeof tmo, "%u", lim->timeout_s);
    hl_log(HL_LOG_INFO, "http: listening", "bind", bind, "port", portstr, "max_connections", conns,
           "max_connections_per_client", perc, "request_timeout_s", tmo, "metrics_auth",
           h->have_token ? "bearer token" : "none", NULL);
}

hl_status hl_http_start_opts(hl_http **out, const hl_http_opts *o, hl_state *state)
{
    struct sockaddr_storage ss;
    bool dual = false;
    uint16_t port = 0;
    char err[256] = "";
    hl_status st = HL_OK;
    hl_http *h = NULL;
    http_limits lim;
    const char *bind = o ? o->bind : NULL;

    *out = NULL;
    if (!bind || !state || o->max_connections < 0 || o->max_connections_per_client < 0 || o->request_timeout_s < 0)
        return HL_ERR_INVALID;
    limits_of(o, &lim);
    h = http_new(state, bind, lim.timeout_s);
    if (!h)
        return HL_ERR_NOMEM;

    st = parse_bind(bind, &ss, &port, &dual, err, sizeof err);
    if (st) {
        hl_log(HL_LOG_ERROR, "http: invalid listen address", "bind", bind, "error", err, NULL);
        goto out;
    }
    if (o->auth_token_file && o->auth_token_file[0] && (st = load_token(h, o->auth_token_file)) != HL_OK)
        goto out;
    lim.max_conn = fit_fd_limit(lim.max_conn);
    if ((st = start_daemon(h, bind, &ss, port, dual, &lim)) != HL_OK || (st = start_reaper(h, bind)) != HL_OK)
        goto out;
    log_listening(h, bind, &lim);
    *out = h;
    h = NULL;
out:
    hl_http_stop(h);
    return st;
}

int hl_http_port(const hl_http *h)
{
    return h ? h->port : 0;
}

void hl_http_stop(hl_http *h)
{
    if (!h)
        return;
    if (h->reaper_started) {
        pthread_mutex_lock(&h->mu);
        h->stopping = true;
        pthread_cond_signal(&h->reaper_cv);
        pthread_mutex_unlock(&h->mu);
        pthread_join(h->reaper, NULL);
    }
    if (h->d)
        MHD_stop_daemon(h->d); /* closes every connection: the list empties */
    pthread_mutex_destroy(&h->mu);
    pthread_cond_destroy(&h->reaper_cv);
    OPENSSL_cleanse(h->token_sha256, sizeof h->token_sha256);
    free(h);
}
