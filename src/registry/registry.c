/*
 * registry.c - the schema registry (registry.h; docs/protocol.md §8).
 */
#include "registry/registry.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cjson/cJSON.h>

#include "common/hlc.h"
#include "common/log.h"

#define KEY_PREFIX "node."

void hl_reg_entry_free(hl_reg_entry *e)
{
    if (!e)
        return;
    for (size_t i = 0; i < e->ntables; i++)
        free(e->tables[i]);
    free(e->tables);
    e->tables = NULL;
    e->ntables = 0;
}

void hl_reg_entries_free(hl_reg_entry *v, size_t n)
{
    for (size_t i = 0; v && i < n; i++)
        hl_reg_entry_free(&v[i]);
    free(v);
}

static bool is_hash(const char *s)
{
    return strlen(s) == 64 && strspn(s, "0123456789abcdef") == 64;
}

char *hl_reg_entry_encode(const hl_reg_entry *e)
{
    char num[24];
    cJSON *o = cJSON_CreateObject(), *t = NULL;
    bool ok = o != NULL;
    snprintf(num, sizeof num, "%" PRIu64, e->node_id);
    ok = ok && cJSON_AddStringToObject(o, "node_id", num);
    ok = ok && cJSON_AddStringToObject(o, "schema_hash", e->hash);
    ok = ok && (e->prev[0] ? cJSON_AddStringToObject(o, "previous_schema_hash", e->prev)
                           : cJSON_AddNullToObject(o, "previous_schema_hash"));
    ok = ok && (t = cJSON_AddArrayToObject(o, "tables"));
    for (size_t i = 0; ok && i < e->ntables; i++) {
        cJSON *s = cJSON_CreateString(e->tables[i]);
        ok = s && cJSON_AddItemToArray(t, s);
    }
    ok = ok && cJSON_AddStringToObject(o, "version", e->version);
    ok = ok && cJSON_AddNumberToObject(o, "started_ms", (double)e->started_ms);
    ok = ok && cJSON_AddNumberToObject(o, "heartbeat_ms", (double)e->heartbeat_ms);
    char *json = ok ? cJSON_PrintUnformatted(o) : NULL;
    cJSON_Delete(o);
    return json;
}

/* A JSON number that is a whole number of milliseconds from 0 to 2^53. */
static bool get_ms(const cJSON *o, const char *name, uint64_t *out)
{
    const cJSON *n = cJSON_GetObjectItemCaseSensitive(o, name);
    if (!cJSON_IsNumber(n) || !(n->valuedouble >= 0 && n->valuedouble <= 9007199254740992.0) ||
        n->valuedouble != (double)(uint64_t)n->valuedouble)
        return false;
    *out = (uint64_t)n->valuedouble;
    return true;
}

hl_status hl_reg_entry_decode(const char *key, const unsigned char *v, size_t len, hl_reg_entry *out, char *why,
                              size_t whylen)
{
    memset(out, 0, sizeof *out);
    const char *bad = NULL;
    cJSON *o = NULL;
    char *end = NULL;
    if (strncmp(key, KEY_PREFIX, strlen(KEY_PREFIX)) != 0) {
        snprintf(why, whylen, "key is not node.<id>");
        return HL_ERR_DECODE;
    }
    const char *idtxt = key + strlen(KEY_PREFIX);
    errno = 0;
    unsigned long long id = strtoull(idtxt, &end, 10);
    if (!idtxt[0] || idtxt[0] == '0' || *end || errno || id > INT64_MAX) {
        snprintf(why, whylen, "key is not node.<id> with an id from 1 to 2^63-1");
        return HL_ERR_DECODE;
    }
    if (!v || len == 0 || len > HL_REG_MAX_ENTRY_BYTES || !(o = cJSON_ParseWithLength((const char *)v, len))) {
        snprintf(why, whylen, "value is not JSON of at most %d bytes", HL_REG_MAX_ENTRY_BYTES);
        return HL_ERR_DECODE;
    }
    out->node_id = (uint64_t)id;
    const cJSON *nid = cJSON_GetObjectItemCaseSensitive(o, "node_id");
    const cJSON *h = cJSON_GetObjectItemCaseSensitive(o, "schema_hash");
    const cJSON *p = cJSON_GetObjectItemCaseSensitive(o, "previous_schema_hash");
    const cJSON *ver = cJSON_GetObjectItemCaseSensitive(o, "version");
    const cJSON *tabs = cJSON_GetObjectItemCaseSensitive(o, "tables");
    if (!cJSON_IsObject(o))
        bad = "value is not a JSON object";
    else if (!cJSON_IsString(nid) || strcmp(nid->valuestring, idtxt) != 0)
        bad = "node_id does not match the key";
    else if (!cJSON_IsString(h) || !is_hash(h->valuestring))
        bad = "schema_hash is not 64 lowercase hex digits";
    else if (!cJSON_IsNull(p) && !(cJSON_IsString(p) && is_hash(p->valuestring)))
        bad = "previous_schema_hash is neither null nor 64 lowercase hex digits";
    else if (!cJSON_IsString(ver) || strlen(ver->valuestring) >= sizeof out->version)
        bad = "version is not a string of at most 63 bytes";
    else if (!get_ms(o, "started_ms", &out->started_ms) || !get_ms(o, "heartbeat_ms", &out->heartbeat_ms))
        bad = "started_ms or heartbeat_ms is not a time in milliseconds";
    else if (!cJSON_IsArray(tabs) || cJSON_GetArraySize(tabs) > HL_REG_MAX_TABLES)
        bad = "tables is not an array of at most 10000 names";
    if (!bad) {
        snprintf(out->hash, sizeof out->hash, "%s", h->valuestring);
        if (cJSON_IsString(p))
            snprintf(out->prev, sizeof out->prev, "%s", p->valuestring);
        snprintf(out->version, sizeof out->version, "%s", ver->valuestring);
        size_t n = (size_t)cJSON_GetArraySize(tabs);
        out->tables = calloc(n ? n : 1, sizeof *out->tables);
        const cJSON *t;
        if (!out->tables)
            bad = "out of memory";
        cJSON_ArrayForEach(t, tabs)
        {
            if (bad)
                break;
            if (!cJSON_IsString(t) || !t->valuestring[0])
                bad = "tables holds something other than a name";
            else if (!(out->tables[out->ntables++] = strdup(t->valuestring)))
                bad = "out of memory";
        }
    }
    cJSON_Delete(o);
    if (bad) {
        hl_reg_entry_free(out);
        snprintf(why, whylen, "%s", bad);
        return strcmp(bad, "out of memory") == 0 ? HL_ERR_NOMEM : HL_ERR_DECODE;
    }
    return HL_OK;
}

/* ---- the cluster view ---- */

const char *hl_cluster_status_name(hl_cluster_status s)
{
    switch (s) {
    case HL_CLUSTER_CONSISTENT:
        return "consistent";
    case HL_CLUSTER_UPGRADING:
        return "upgrading";
    default:
        return "incompatible";
    }
}

bool hl_reg_compatible(const hl_reg_entry *a, const hl_reg_entry *b)
{
    return strcmp(a->hash, b->hash) == 0 || (a->prev[0] && strcmp(a->prev, b->hash) == 0) ||
           (b->prev[0] && strcmp(b->prev, a->hash) == 0);
}

hl_cluster_status hl_cluster_status_of(const hl_reg_entry *v, size_t n)
{
    hl_cluster_status s = HL_CLUSTER_CONSISTENT;
    for (size_t i = 0; i < n; i++)
        for (size_t j = i + 1; j < n; j++) {
            if (strcmp(v[i].hash, v[j].hash) == 0)
                continue;
            if (!hl_reg_compatible(&v[i], &v[j]))
                return HL_CLUSTER_INCOMPATIBLE;
            s = HL_CLUSTER_UPGRADING;
        }
    return s;
}

/* Live nodes running hash. */
static size_t count_hash(const hl_reg_entry *v, size_t n, const char *hash)
{
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
        k += strcmp(v[i].hash, hash) == 0;
    return k;
}

bool hl_cluster_odd_one_out(const hl_reg_entry *v, size_t n, uint64_t self, char *reason, size_t reasonlen)
{
    const hl_reg_entry *me = NULL;
    size_t most = 0;
    for (size_t i = 0; i < n; i++) {
        if (v[i].node_id == self)
            me = &v[i];
        size_t k = count_hash(v, n, v[i].hash);
        if (k > most)
            most = k;
    }
    if (!me)
        return false;
    /* Compatible with a node of one of the most-run schemas: not at fault
     * (this covers running one of them, ties, and a node alone). */
    for (size_t i = 0; i < n; i++)
        if (count_hash(v, n, v[i].hash) == most && hl_reg_compatible(me, &v[i]))
            return false;
    if (reason) {
        const char *major = NULL;
        for (size_t i = 0; i < n && !major; i++)
            if (count_hash(v, n, v[i].hash) == most)
                major = v[i].hash;
        snprintf(reason, reasonlen,
                 "this node's schema %.12s is incompatible with schema %.12s that %zu of %zu live nodes run "
                 "(neither is the other's previous schema): migrate this node's schema to match theirs "
                 "(harmonylite -schema-status-cluster)",
                 me->hash, major ? major : "?", most, n);
    }
    return true;
}

static int cmp_group(const void *a, const void *b)
{
    const hl_reg_entry *x = a, *y = b;
    int c = strcmp(x->hash, y->hash);
    return c ? c : (x->node_id > y->node_id) - (x->node_id < y->node_id);
}

char *hl_cluster_json(const hl_reg_entry *v, size_t n)
{
    hl_reg_entry *s = calloc(n ? n : 1, sizeof *s);
    cJSON *root = cJSON_CreateObject(), *groups = NULL;
    char num[24];
    bool ok = s && root;
    if (s) {
        memcpy(s, v, n * sizeof *s); /* shallow: sorted by hash, then node */
        qsort(s, n, sizeof *s, cmp_group);
    }
    ok = ok && cJSON_AddStringToObject(root, "status", hl_cluster_status_name(hl_cluster_status_of(v, n)));
    snprintf(num, sizeof num, "%zu", n);
    ok = ok && cJSON_AddRawToObject(root, "live_nodes", num);
    ok = ok && (groups = cJSON_AddArrayToObject(root, "groups"));
    cJSON *nodes = NULL;
    for (size_t i = 0; ok && i < n; i++) {
        if (i == 0 || strcmp(s[i].hash, s[i - 1].hash) != 0) {
            cJSON *g = cJSON_CreateObject();
            ok = g && cJSON_AddItemToArray(groups, g) && cJSON_AddStringToObject(g, "schema_hash", s[i].hash) &&
                 (nodes = cJSON_AddArrayToObject(g, "nodes"));
            if (!ok)
                break;
        }
        cJSON *o = cJSON_CreateObject(), *t = NULL;
        ok = o && cJSON_AddItemToArray(nodes, o);
        snprintf(num, sizeof num, "%" PRIu64, s[i].node_id);
        ok = ok && cJSON_AddRawToObject(o, "node_id", num);
        ok = ok && (s[i].prev[0] ? cJSON_AddStringToObject(o, "previous_schema_hash", s[i].prev)
                                 : cJSON_AddNullToObject(o, "previous_schema_hash"));
        ok = ok && cJSON_AddStringToObject(o, "version", s[i].version);
        ok = ok && cJSON_AddNumberToObject(o, "started_ms", (double)s[i].started_ms);
        ok = ok && cJSON_AddNumberToObject(o, "heartbeat_ms", (double)s[i].heartbeat_ms);
        ok = ok && (t = cJSON_AddArrayToObject(o, "tables"));
        for (size_t k = 0; ok && k < s[i].ntables; k++) {
            cJSON *str = cJSON_CreateString(s[i].tables[k]);
            ok = str && cJSON_AddItemToArray(t, str);
        }
    }
    char *json = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    free(s);
    return json;
}

void hl_cluster_print(FILE *f, const hl_reg_entry *v, size_t n)
{
    hl_reg_entry *s = calloc(n ? n : 1, sizeof *s);
    if (!s)
        return;
    memcpy(s, v, n * sizeof *s);
    qsort(s, n, sizeof *s, cmp_group);
    fprintf(f, "cluster schema: %s (%zu live node%s)\n", hl_cluster_status_name(hl_cluster_status_of(v, n)), n,
            n == 1 ? "" : "s");
    for (size_t i = 0; i < n; i++) {
        if (i == 0 || strcmp(s[i].hash, s[i - 1].hash) != 0) {
            size_t k = count_hash(s, n, s[i].hash);
            fprintf(f, "schema %s: %zu node%s\n", s[i].hash, k, k == 1 ? "" : "s");
        }
        fprintf(f, "  node %" PRIu64 ": harmonylite %s, previous schema %s, %zu table%s", s[i].node_id, s[i].version,
                s[i].prev[0] ? s[i].prev : "none", s[i].ntables, s[i].ntables == 1 ? "" : "s");
        for (size_t k = 0; k < s[i].ntables; k++)
            fprintf(f, "%s%s", k ? ", " : ": ", s[i].tables[k]);
        fputc('\n', f);
    }
    free(s);
}

/* ---- the bucket ---- */

hl_status hl_registry_open_bucket(hl_kv **out, hl_nats *n, const hl_config *c, bool create)
{
    hl_kv_opts o = {
        .history = 1,
        .ttl_ms = (int64_t)c->schema.heartbeat_s * 3000,
        .replicas = c->replication_log.replicas,
        .max_value_bytes = HL_REG_MAX_ENTRY_BYTES,
        .bind_only = !create,
    };
    return hl_kv_open(out, n, c->schema.registry_bucket, &o);
}

static int cmp_node(const void *a, const void *b)
{
    const hl_reg_entry *x = a, *y = b;
    return (x->node_id > y->node_id) - (x->node_id < y->node_id);
}

hl_status hl_registry_read(hl_kv *kv, hl_reg_entry **out, size_t *n)
{
    hl_kv_watcher *w = NULL;
    hl_reg_entry *v = NULL;
    size_t nv = 0;
    hl_status st = hl_kv_watch(kv, KEY_PREFIX ">", &w);
    *out = NULL;
    *n = 0;
    if (st)
        return st;
    if (!(v = calloc(HL_REG_MAX_NODES, sizeof *v))) {
        hl_kv_watch_free(w);
        return HL_ERR_NOMEM;
    }
    for (;;) {
        hl_kv_entry *e = NULL;
        st = hl_kv_watch_next(w, 10000, &e);
        if (st == HL_ERR_DECODE || st == HL_ERR_TOO_LARGE) {
            hl_kv_entry_free(e); /* logged by the watch; left out */
            continue;
        }
        if (st)
            break;
        if (e->op == HL_KV_CAUGHT_UP) {
            hl_kv_entry_free(e);
            break;
        }
        /* a key seen twice (a write while we read): the later one counts */
        size_t i = 0;
        char key[40];
        while (i < nv && (snprintf(key, sizeof key, KEY_PREFIX "%" PRIu64, v[i].node_id), strcmp(key, e->key) != 0))
            i++;
        if (i < nv) {
            hl_reg_entry_free(&v[i]);
            v[i] = v[--nv];
        }
        if (e->op == HL_KV_PUT) {
            char why[160];
            hl_reg_entry r;
            hl_status ds = hl_reg_entry_decode(e->key, e->value, e->len, &r, why, sizeof why);
            if (ds == HL_ERR_NOMEM) {
                hl_kv_entry_free(e);
                st = ds;
                break;
            }
            if (ds)
                hl_log(HL_LOG_WARN, "schema registry entry ignored", "key", e->key, "reason", why, NULL);
            else if (nv == HL_REG_MAX_NODES) {
                hl_log(HL_LOG_WARN, "schema registry entry ignored: too many nodes", "key", e->key, NULL);
                hl_reg_entry_free(&r);
            } else
                v[nv++] = r;
        }
        hl_kv_entry_free(e);
    }
    hl_kv_watch_free(w);
    if (st) {
        hl_reg_entries_free(v, nv);
        return st;
    }
    qsort(v, nv, sizeof *v, cmp_node);
    *out = v;
    *n = nv;
    return HL_OK;
}

/* ---- the running node ---- */

struct hl_registry {
    const hl_config *c;
    hl_nats *n;
    uint64_t node_id, started_ms;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop, beat_now, have_local, remove;
    /* local schema (under mu) */
    hl_reg_entry local;
    /* latest view (under mu) */
    uint64_t gen;
    bool odd;
    int status; /* hl_cluster_status, -1 before the first view */
    char reason[400];
    char *cluster_json;
    hl_ratelimit fail_log;
};

/* Table names out of /schema's JSON ([{"name":..},..]) into e. */
static void tables_from_json(hl_reg_entry *e, const char *json)
{
    hl_reg_entry_free(e);
    cJSON *a = json ? cJSON_Parse(json) : NULL;
    size_t n = cJSON_IsArray(a) ? (size_t)cJSON_GetArraySize(a) : 0;
    if (n && (e->tables = calloc(n, sizeof *e->tables))) {
        const cJSON *t;
        cJSON_ArrayForEach(t, a)
        {
            const cJSON *name = cJSON_GetObjectItemCaseSensitive(t, "name");
            if (cJSON_IsString(name) && (e->tables[e->ntables] = strdup(name->valuestring)))
                e->ntables++;
        }
    }
    cJSON_Delete(a);
}

void hl_registry_set_local(hl_registry *r, const char *hash, const char *prev, const char *tables_json)
{
    if (!r)
        return;
    pthread_mutex_lock(&r->mu);
    snprintf(r->local.hash, sizeof r->local.hash, "%s", hash);
    snprintf(r->local.prev, sizeof r->local.prev, "%s", prev ? prev : "");
    tables_from_json(&r->local, tables_json);
    r->have_local = true;
    r->beat_now = true;
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

/* Copies the local entry (under mu) with the times filled in. */
static bool local_copy(hl_registry *r, hl_reg_entry *out)
{
    memset(out, 0, sizeof *out);
    pthread_mutex_lock(&r->mu);
    bool ok = r->have_local;
    if (ok) {
        *out = r->local;
        out->tables = calloc(r->local.ntables ? r->local.ntables : 1, sizeof *out->tables);
        out->ntables = 0;
        for (size_t i = 0; out->tables && i < r->local.ntables; i++)
            if ((out->tables[out->ntables] = strdup(r->local.tables[i])))
                out->ntables++;
    }
    pthread_mutex_unlock(&r->mu);
    out->node_id = r->node_id;
    snprintf(out->version, sizeof out->version, "%s", HL_VERSION);
    out->started_ms = r->started_ms;
    out->heartbeat_ms = hl_now_ms();
    return ok;
}

/* One heartbeat: write our entry, read everyone's, update the view. */
static hl_status beat(hl_registry *r, hl_kv *kv)
{
    hl_reg_entry me;
    if (!local_copy(r, &me))
        return HL_OK;
    char key[40];
    snprintf(key, sizeof key, KEY_PREFIX "%" PRIu64, r->node_id);
    char *json = hl_reg_entry_encode(&me);
    hl_status st = json ? hl_kv_put(kv, key, json, strlen(json), NULL) : HL_ERR_NOMEM;
    free(json);
    hl_reg_entry *v = NULL;
    size_t n = 0;
    if (!st)
        st = hl_registry_read(kv, &v, &n);
    if (st) {
        hl_reg_entry_free(&me);
        return st;
    }
    /* Our own entry as we know it now (the read may predate a change). */
    size_t i = 0;
    while (i < n && v[i].node_id != r->node_id)
        i++;
    if (i < n) {
        hl_reg_entry_free(&v[i]);
        v[i] = me;
    } else {
        hl_reg_entry *nv = realloc(v, (n + 1) * sizeof *v);
        if (!nv) {
            hl_reg_entry_free(&me);
            hl_reg_entries_free(v, n);
            return HL_ERR_NOMEM;
        }
        v = nv;
        v[n++] = me;
        qsort(v, n, sizeof *v, cmp_node);
    }
    char reason[sizeof r->reason] = "";
    bool odd = hl_cluster_odd_one_out(v, n, r->node_id, reason, sizeof reason);
    char *cj = hl_cluster_json(v, n);
    hl_cluster_status cs = hl_cluster_status_of(v, n);
    hl_reg_entries_free(v, n);
    pthread_mutex_lock(&r->mu);
    bool changed = odd != r->odd || !cj || !r->cluster_json || strcmp(cj, r->cluster_json) != 0;
    if (odd && !r->odd)
        hl_log(HL_LOG_ERROR, "schema is the odd one out: not ready", "reason", reason, NULL);
    else if (!odd && r->odd)
        hl_log(HL_LOG_INFO, "schema compatible with the cluster again: ready", NULL);
    if (changed) {
        if ((int)cs != r->status)
            hl_log(cs == HL_CLUSTER_INCOMPATIBLE ? HL_LOG_WARN : HL_LOG_INFO, "cluster schema status", "status",
                   hl_cluster_status_name(cs), NULL);
        r->status = (int)cs;
        r->odd = odd;
        snprintf(r->reason, sizeof r->reason, "%s", reason);
        free(r->cluster_json);
        r->cluster_json = cj;
        cj = NULL;
        r->gen++;
    }
    pthread_mutex_unlock(&r->mu);
    free(cj);
    return HL_OK;
}

/* Waits until the next beat is due, a change asks for one or we stop. */
static void wait_beat(hl_registry *r, uint64_t ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += (time_t)(ms / 1000);
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&r->mu);
    while (!r->stop && !r->beat_now)
        if (pthread_cond_timedwait(&r->cv, &r->mu, &ts) == ETIMEDOUT)
            break;
    r->beat_now = false;
    pthread_mutex_unlock(&r->mu);
}

static bool stopping(hl_registry *r)
{
    pthread_mutex_lock(&r->mu);
    bool s = r->stop;
    pthread_mutex_unlock(&r->mu);
    return s;
}

static void *registry_thread(void *arg)
{
    hl_registry *r = arg;
    hl_kv *kv = NULL;
    uint64_t every = (uint64_t)r->c->schema.heartbeat_s * 1000u;
    while (!stopping(r)) {
        hl_status st = kv ? HL_OK : hl_registry_open_bucket(&kv, r->n, r->c, true);
        if (!st)
            st = beat(r, kv);
        uint64_t dropped = 0;
        if (st && !stopping(r) && hl_ratelimit_allow(&r->fail_log, &dropped))
            hl_log(HL_LOG_WARN, "schema registry unreachable; retrying at the next heartbeat", "bucket",
                   r->c->schema.registry_bucket, "error", hl_status_str(st), NULL);
        if (st) { /* no view: the schema check must not fail on a stale one (docs/operations.md) */
            pthread_mutex_lock(&r->mu);
            if (r->odd) {
                r->odd = false;
                r->reason[0] = 0;
                r->gen++;
            }
            pthread_mutex_unlock(&r->mu);
        }
        if (st == HL_ERR_CONFIG) { /* the bucket exists with other settings: never changed by us */
            hl_kv_free(kv);
            kv = NULL;
        }
        wait_beat(r, every);
    }
    pthread_mutex_lock(&r->mu);
    bool remove = r->have_local && r->remove; /* hl_registry_stop's request */
    pthread_mutex_unlock(&r->mu);
    if (remove && kv) {
        char key[40];
        snprintf(key, sizeof key, KEY_PREFIX "%" PRIu64, r->node_id);
        if (hl_kv_delete(kv, key))
            hl_warnf("could not remove this node's schema registry entry; it expires in %d s",
                     r->c->schema.heartbeat_s * 3);
    }
    hl_kv_free(kv);
    return NULL;
}

hl_status hl_registry_start(hl_registry **out, const hl_config *c, hl_nats *n, uint64_t node_id)
{
    hl_registry *r = calloc(1, sizeof *r);
    if (!r)
        return HL_ERR_NOMEM;
    r->c = c;
    r->n = n;
    r->node_id = node_id;
    r->started_ms = hl_now_ms();
    r->status = -1;
    r->fail_log = (hl_ratelimit){.burst = 1, .window_ms = 60000};
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&r->th, NULL, registry_thread, r) != 0) {
        pthread_cond_destroy(&r->cv);
        pthread_mutex_destroy(&r->mu);
        free(r);
        return HL_ERR_IO;
    }
    *out = r;
    return HL_OK;
}

bool hl_registry_view(hl_registry *r, uint64_t *gen, bool *odd, char *reason, size_t reasonlen, char **cluster_json)
{
    if (!r)
        return false;
    pthread_mutex_lock(&r->mu);
    bool changed = r->gen != *gen;
    if (changed) {
        *gen = r->gen;
        *odd = r->odd;
        snprintf(reason, reasonlen, "%s", r->reason);
        *cluster_json = r->cluster_json ? strdup(r->cluster_json) : NULL;
    }
    pthread_mutex_unlock(&r->mu);
    return changed;
}

void hl_registry_stop(hl_registry *r, bool remove_entry)
{
    if (!r)
        return;
    pthread_mutex_lock(&r->mu);
    r->stop = true;
    r->remove = remove_entry;
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
    pthread_join(r->th, NULL);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
    hl_reg_entry_free(&r->local);
    free(r->cluster_json);
    free(r);
}
