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

#define KEY_PREFIX HL_REG_KEY_PREFIX

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
