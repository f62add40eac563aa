/*
 * registry.c - the schema registry (registry.h; docs/protocol.md §8).
 */
#include "registry/registry.h"

#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
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

/* Entries by key as a watch delivers them, each with the monotonic ms it
 * counts as written (for expiry in the running node's view). */
typedef struct reg_map {
    hl_reg_entry *v;
    uint64_t *seen;
    size_t n;
} reg_map;

static hl_status map_init(reg_map *m)
{
    m->n = 0;
    m->v = calloc(HL_REG_MAX_NODES, sizeof *m->v);
    m->seen = calloc(HL_REG_MAX_NODES, sizeof *m->seen);
    return m->v && m->seen ? HL_OK : HL_ERR_NOMEM;
}

static void map_remove(reg_map *m, size_t i)
{
    hl_reg_entry_free(&m->v[i]);
    m->v[i] = m->v[m->n - 1];
    m->seen[i] = m->seen[m->n - 1];
    m->n--;
}

static void map_free(reg_map *m)
{
    while (m->n)
        map_remove(m, m->n - 1);
    free(m->v);
    free(m->seen);
}

/*
 * Applies one watched entry: a put replaces the key's entry (a bad one is
 * logged and removes it), a delete removes it. seen: when it counts as
 * written; 0 derives it from the entry's own heartbeat time (for the values
 * current when a watch starts, which may be up to ttl_ms old), kept within ttl_ms.
 */
static hl_status map_apply(reg_map *m, const hl_kv_entry *e, uint64_t seen, uint64_t ttl_ms, hl_ratelimit *rl)
{
    char key[40];
    for (size_t i = 0; i < m->n; i++) {
        snprintf(key, sizeof key, KEY_PREFIX "%" PRIu64, m->v[i].node_id);
        if (strcmp(key, e->key) == 0) {
            map_remove(m, i);
            break;
        }
    }
    if (e->op != HL_KV_PUT)
        return HL_OK;
    char why[160];
    uint64_t dropped = 0;
    hl_reg_entry r;
    hl_status st = hl_reg_entry_decode(e->key, e->value, e->len, &r, why, sizeof why);
    if (st == HL_ERR_NOMEM)
        return st;
    if (!st && m->n == HL_REG_MAX_NODES) {
        hl_reg_entry_free(&r);
        snprintf(why, sizeof why, "more than %d live nodes", HL_REG_MAX_NODES);
        st = HL_ERR_TOO_LARGE;
    }
    if (st) {
        if (!rl || hl_ratelimit_allow(rl, &dropped))
            hl_log(HL_LOG_WARN, "schema registry entry ignored", "key", e->key, "reason", why, NULL);
        return HL_OK;
    }
    if (!seen) {
        uint64_t now = hl_mono_ms(), wall = hl_now_ms();
        uint64_t age = wall > r.heartbeat_ms ? wall - r.heartbeat_ms : 0;
        seen = now - (age < ttl_ms ? age : ttl_ms);
    }
    m->v[m->n] = r;
    m->seen[m->n++] = seen;
    return HL_OK;
}

hl_status hl_registry_read(hl_kv *kv, hl_reg_entry **out, size_t *n)
{
    hl_kv_watcher *w = NULL;
    reg_map m;
    *out = NULL;
    *n = 0;
    hl_status st = map_init(&m);
    if (!st)
        st = hl_kv_watch(kv, KEY_PREFIX ">", &w);
    while (!st) {
        hl_kv_entry *e = NULL;
        st = hl_kv_watch_next(w, 10000, &e);
        if (st == HL_ERR_DECODE || st == HL_ERR_TOO_LARGE) {
            hl_kv_entry_free(e); /* logged by the watch; left out */
            st = HL_OK;
            continue;
        }
        if (st)
            break;
        bool done = e->op == HL_KV_CAUGHT_UP;
        if (!done)
            st = map_apply(&m, e, 1, 0, NULL); /* the bucket's max age already dropped dead nodes */
        hl_kv_entry_free(e);
        if (done)
            break;
    }
    hl_kv_watch_free(w);
    if (st) {
        map_free(&m);
        return st;
    }
    qsort(m.v, m.n, sizeof *m.v, cmp_node);
    *out = m.v;
    *n = m.n;
    free(m.seen);
    return HL_OK;
}

/* ---- the running node ---- */

struct hl_registry {
    const hl_config *c;
    hl_nats *n;
    uint64_t node_id, started_ms;
    pthread_t th;
    int efd; /* eventfd: a schema change or a stop wakes the thread */
    pthread_mutex_t mu;
    /* under mu */
    bool stop, beat_now, have_local, remove;
    hl_reg_entry local; /* the local schema */
    uint64_t gen;       /* the view below, and how often it changed */
    bool odd;
    int status; /* hl_cluster_status, -1 before the first view */
    char reason[400];
    char *cluster_json;
    /* registry thread only */
    hl_ratelimit fail_log, entry_log;
};

static void wake(hl_registry *r)
{
    uint64_t one = 1;
    ssize_t w = write(r->efd, &one, sizeof one);
    (void)w; /* the counter is only full after 2^64-2 wakes */
}

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
    pthread_mutex_unlock(&r->mu);
    wake(r);
}

/* Copies the local entry (under mu) with the times filled in; false before the engine set it. */
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

/* Writes this node's entry. */
static hl_status put_own(hl_registry *r, hl_kv *kv)
{
    hl_reg_entry me;
    if (!local_copy(r, &me))
        return HL_OK;
    char key[40];
    snprintf(key, sizeof key, KEY_PREFIX "%" PRIu64, r->node_id);
    char *json = hl_reg_entry_encode(&me);
    hl_status st = json ? hl_kv_put(kv, key, json, strlen(json), NULL) : HL_ERR_NOMEM;
    free(json);
    hl_reg_entry_free(&me);
    return st;
}

/* Takes what the watch has now; HL_ERR_NATS when it ended. */
static hl_status drain(hl_registry *r, hl_kv_watcher *w, reg_map *m, bool *caught, uint64_t ttl_ms)
{
    for (;;) {
        hl_kv_entry *e = NULL;
        hl_status st = hl_kv_watch_next(w, 0, &e);
        if (st == HL_ERR_TIMEOUT)
            return HL_OK;
        if (st == HL_ERR_DECODE || st == HL_ERR_TOO_LARGE) {
            hl_kv_entry_free(e); /* logged by the watch; left out */
            continue;
        }
        if (st)
            return st;
        if (e->op == HL_KV_CAUGHT_UP)
            *caught = true;
        else
            st = map_apply(m, e, *caught ? hl_mono_ms() : 0, ttl_ms, &r->entry_log);
        hl_kv_entry_free(e);
        if (st)
            return st;
    }
}

/* The view from the live entries (written within ttl_ms) and our own as we know it now. */
static hl_status update_view(hl_registry *r, reg_map *m, uint64_t ttl_ms)
{
    uint64_t now = hl_mono_ms();
    for (size_t i = m->n; i-- > 0;)
        if (now - m->seen[i] >= ttl_ms || m->v[i].node_id == r->node_id)
            map_remove(m, i); /* expired (the bucket dropped it too), or ours: replaced below */
    hl_reg_entry *v = calloc(m->n + 1, sizeof *v);
    if (!v)
        return HL_ERR_NOMEM;
    size_t n = 0;
    if (local_copy(r, &v[n]))
        n++;
    else
        hl_reg_entry_free(&v[n]);
    memcpy(v + n, m->v, m->n * sizeof *v); /* shallow: the map keeps ownership */
    n += m->n;
    qsort(v, n, sizeof *v, cmp_node);
    char reason[sizeof r->reason] = "";
    bool odd = hl_cluster_odd_one_out(v, n, r->node_id, reason, sizeof reason);
    char *cj = hl_cluster_json(v, n);
    hl_cluster_status cs = hl_cluster_status_of(v, n);
    for (size_t i = 0; i < n; i++)
        if (v[i].node_id == r->node_id)
            hl_reg_entry_free(&v[i]); /* the copy of ours */
    free(v);
    pthread_mutex_lock(&r->mu);
    if (odd && !r->odd)
        hl_log(HL_LOG_ERROR, "schema is the odd one out: not ready", "reason", reason, NULL);
    else if (!odd && r->odd)
        hl_log(HL_LOG_INFO, "schema compatible with the cluster again: ready", NULL);
    if ((int)cs != r->status)
        hl_log(cs == HL_CLUSTER_INCOMPATIBLE ? HL_LOG_WARN : HL_LOG_INFO, "cluster schema status", "status",
               hl_cluster_status_name(cs), NULL);
    if (odd != r->odd || (int)cs != r->status || (cj && (!r->cluster_json || strcmp(cj, r->cluster_json) != 0))) {
        r->odd = odd;
        r->status = (int)cs;
        snprintf(r->reason, sizeof r->reason, "%s", reason);
        if (cj) {
            free(r->cluster_json);
            r->cluster_json = cj;
            cj = NULL;
        }
        r->gen++;
    }
    pthread_mutex_unlock(&r->mu);
    free(cj);
    return HL_OK;
}

/* No view: the schema check must not fail on a stale one (docs/operations.md). */
static void forget_verdict(hl_registry *r)
{
    pthread_mutex_lock(&r->mu);
    if (r->odd) {
        r->odd = false;
        r->reason[0] = 0;
        r->gen++;
    }
    pthread_mutex_unlock(&r->mu);
}

/* Sleeps until the watch has entries, we are woken, or timeout_ms passed. */
static void wait_events(hl_registry *r, hl_kv_watcher *w, int timeout_ms)
{
    struct pollfd p[2] = {{.fd = r->efd, .events = POLLIN}, {.fd = w ? hl_kv_watch_fd(w) : -1, .events = POLLIN}};
    if (poll(p, w ? 2 : 1, timeout_ms) > 0 && (p[0].revents & POLLIN)) {
        uint64_t v;
        ssize_t rd = read(r->efd, &v, sizeof v);
        (void)rd; /* nonblocking: nothing to read is fine */
    }
}

/*
 * Keeps one watch of every entry (created again when it ends) and writes our
 * entry every heartbeat, or at once when the engine reports a schema change.
 * The view changes as soon as the watch delivers; an entry not rewritten
 * within three heartbeats counts as gone, like the bucket's max age.
 */
static void *registry_thread(void *arg)
{
    hl_registry *r = arg;
    hl_kv *kv = NULL;
    hl_kv_watcher *w = NULL;
    reg_map m;
    bool caught = false;
    uint64_t every = (uint64_t)r->c->schema.heartbeat_s * 1000u, ttl = 3 * every, next_beat = 0;
    hl_status mst = map_init(&m);
    for (;;) {
        pthread_mutex_lock(&r->mu);
        bool stop = r->stop, now_beat = r->beat_now;
        r->beat_now = false;
        pthread_mutex_unlock(&r->mu);
        if (stop)
            break;
        uint64_t now = hl_mono_ms();
        hl_status st = mst;
        if (!st && !kv)
            st = hl_registry_open_bucket(&kv, r->n, r->c, true);
        if (!st && (now_beat || now >= next_beat)) {
            next_beat = now + every;
            st = put_own(r, kv);
        }
        if (!st && !w) {
            caught = false;
            st = hl_kv_watch(kv, KEY_PREFIX ">", &w);
        }
        if (!st && (st = drain(r, w, &m, &caught, ttl)) == HL_ERR_NATS) {
            hl_kv_watch_free(w); /* ended: a new one next time */
            w = NULL;
        }
        if (!st && caught)
            st = update_view(r, &m, ttl);
        uint64_t dropped = 0;
        if (st) {
            if (next_beat < now + every)
                next_beat = now + every; /* retried at the next heartbeat, not in a loop */
            if (hl_ratelimit_allow(&r->fail_log, &dropped))
                hl_log(HL_LOG_WARN, "schema registry unreachable; retrying at the next heartbeat", "bucket",
                       r->c->schema.registry_bucket, "error", hl_status_str(st), NULL);
            forget_verdict(r);
            if (st == HL_ERR_CONFIG) { /* the bucket exists with other settings: never changed by us */
                hl_kv_free(kv);
                kv = NULL;
            }
        }
        now = hl_mono_ms();
        /* after a failure, nothing before the next heartbeat; else at least once a second (expiry) */
        uint64_t until = next_beat > now ? next_beat - now : 0;
        wait_events(r, st ? NULL : w, (int)(st || until < 1000 ? until : 1000));
    }
    hl_kv_watch_free(w);
    map_free(&m);
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
    r->entry_log = (hl_ratelimit){.burst = 5, .window_ms = 60000};
    r->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    pthread_mutex_init(&r->mu, NULL);
    if (r->efd < 0 || pthread_create(&r->th, NULL, registry_thread, r) != 0) {
        if (r->efd >= 0)
            close(r->efd);
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
    pthread_mutex_unlock(&r->mu);
    wake(r);
    pthread_join(r->th, NULL);
    close(r->efd);
    pthread_mutex_destroy(&r->mu);
    hl_reg_entry_free(&r->local);
    free(r->cluster_json);
    free(r);
}
