/*
 * schedule.c - periodic snapshots under a cluster-wide lease, and
 * sleep_timeout (schedule.h, docs/snapshots.md#periodic-snapshots).
 *
 * One thread wakes every tick, reads the cluster's last snapshot from the KV
 * bucket and decides; the snapshot itself runs on this thread (VACUUM INTO on
 * a read connection of its own, then the upload), while a second, short-lived
 * thread renews the lease. Nothing here touches the engine's connection.
 */
#include "snapshot/schedule.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cjson/cJSON.h>

#include "common/hlc.h"
#include "common/log.h"
#include "natsio/conn.h"
#include "signals.h"
#include "snapshot/snapshot.h"
#include "snapshot/store.h"

#define LAST_MAX_BYTES (1024 * 1024) /* the last-snapshot value: up to 4096 streams of 256-byte names */
#define TICK_MIN_MS 500
#define TICK_MAX_MS 30000
#define FIRST_LOOK_MS 1000 /* between looks until the first one (a new cluster's first snapshot) */
#define BACKOFF_MIN_MS 10000
#define BACKOFF_MAX_MS (15 * 60 * 1000)
#define LEASE_SETTLE_MS 1000 /* between taking the lease and confirming it (see take()) */
#define SLEEP_TRIES 3        /* sleep_timeout: attempts at its snapshot before stopping without one */

/* ---- small JSON helpers: numbers are decimal strings, as in the manifest ---- */

/* Parses a decimal string without sign or leading zeros, at most INT64_MAX. */
static bool dec_u64(const cJSON *it, uint64_t *out)
{
    const char *s = cJSON_IsString(it) ? it->valuestring : NULL;
    if (!s || !*s || strlen(s) > 19 || (s[0] == '0' && s[1]))
        return false;
    uint64_t v = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9')
            return false;
        v = v * 10 + (uint64_t)(*p - '0');
    }
    if (v > (uint64_t)INT64_MAX)
        return false;
    *out = v;
    return true;
}

static bool add_dec(cJSON *o, const char *k, uint64_t v)
{
    char num[24];
    snprintf(num, sizeof num, "%" PRIu64, v);
    return cJSON_AddStringToObject(o, k, num) != NULL;
}

/* ---- the lease ---- */

static char *lease_json(uint64_t node, uint64_t expires_ms)
{
    cJSON *o = cJSON_CreateObject();
    char *s = NULL;
    if (o && add_dec(o, "node", node) && add_dec(o, "expires_ms", expires_ms))
        s = cJSON_PrintUnformatted(o);
    cJSON_Delete(o);
    return s;
}

/* Reads a lease value; false when it is not one (it then counts as expired). */
static bool lease_parse(const unsigned char *v, size_t len, uint64_t *node, uint64_t *expires_ms)
{
    cJSON *o = v ? cJSON_ParseWithLength((const char *)v, len) : NULL;
    bool ok = cJSON_IsObject(o) && dec_u64(cJSON_GetObjectItemCaseSensitive(o, "node"), node) &&
              dec_u64(cJSON_GetObjectItemCaseSensitive(o, "expires_ms"), expires_ms) && *node >= 1;
    cJSON_Delete(o);
    return ok;
}

static hl_status lease_write(hl_kv *kv, uint64_t node, uint64_t expires_ms, bool create, uint64_t expected,
                             uint64_t *rev)
{
    char *v = lease_json(node, expires_ms);
    if (!v)
        return HL_ERR_NOMEM;
    hl_status st = create ? hl_kv_create(kv, HL_LEASE_KEY, v, strlen(v), rev)
                          : hl_kv_update(kv, HL_LEASE_KEY, v, strlen(v), expected, rev);
    free(v);
    return st;
}

hl_status hl_lease_acquire(hl_kv *kv, uint64_t node, uint64_t now_ms, uint64_t ttl_ms, uint64_t *rev, uint64_t *holder)
{
    unsigned char *v = NULL;
    size_t len = 0;
    uint64_t cur = 0, who = 0, exp = 0;
    if (holder)
        *holder = 0;
    hl_status st = hl_kv_get(kv, HL_LEASE_KEY, &v, &len, &cur);
    if (st == HL_ERR_NOT_FOUND)
        return lease_write(kv, node, now_ms + ttl_ms, true, 0, rev);
    if (st)
        return st;
    bool valid = lease_parse(v, len, &who, &exp);
    free(v);
    if (!valid)
        hl_log(HL_LOG_WARN, "snapshot lease value unreadable; taking it over", NULL);
    else if (who != node && exp > now_ms) {
        if (holder)
            *holder = who;
        return HL_ERR_CONFLICT;
    }
    /* free (expired or unreadable), or ours already: compare-and-set on the revision read */
    return lease_write(kv, node, now_ms + ttl_ms, false, cur, rev);
}

hl_status hl_lease_renew(hl_kv *kv, uint64_t node, uint64_t now_ms, uint64_t ttl_ms, uint64_t *rev)
{
    uint64_t nrev = 0;
    hl_status st = lease_write(kv, node, now_ms + ttl_ms, false, *rev, &nrev);
    if (st == HL_OK)
        *rev = nrev;
    return st;
}

hl_status hl_lease_release(hl_kv *kv, uint64_t node, uint64_t rev)
{
    hl_status st = lease_write(kv, node, 0, false, rev, NULL);
    return st == HL_ERR_CONFLICT ? HL_OK : st;
}

/* ---- the last snapshot ---- */

char *hl_last_snapshot_json(const hl_manifest *m, const char *mname)
{
    cJSON *o = cJSON_CreateObject();
    cJSON *arr = NULL;
    char *s = NULL;
    if (!o || !add_dec(o, "node", m->node) || !add_dec(o, "created_ms", m->created_ms) ||
        !add_dec(o, "size", m->size) || !cJSON_AddStringToObject(o, "manifest", mname) ||
        !(arr = cJSON_AddArrayToObject(o, "streams")))
        goto out;
    for (size_t i = 0; i < m->nstreams; i++) {
        cJSON *e = cJSON_CreateObject();
        if (!e)
            goto out;
        cJSON_AddItemToArray(arr, e);
        if (!cJSON_AddStringToObject(e, "name", m->streams[i].name) || !add_dec(e, "seq", m->streams[i].seq))
            goto out;
    }
    s = cJSON_PrintUnformatted(o);
out:
    cJSON_Delete(o);
    return s;
}

void hl_last_snapshot_free(hl_last_snapshot *l)
{
    if (!l)
        return;
    free(l->streams);
    memset(l, 0, sizeof *l);
}

hl_status hl_last_snapshot_parse(hl_last_snapshot *out, const char *json, size_t len)
{
    memset(out, 0, sizeof *out);
    if (len > LAST_MAX_BYTES)
        return HL_ERR_DECODE;
    cJSON *o = cJSON_ParseWithLength(json, len);
    hl_status st = HL_ERR_DECODE;
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(o, "manifest");
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(o, "streams");
    if (!cJSON_IsObject(o) || !dec_u64(cJSON_GetObjectItemCaseSensitive(o, "node"), &out->node) || out->node < 1 ||
        !dec_u64(cJSON_GetObjectItemCaseSensitive(o, "created_ms"), &out->created_ms) ||
        !dec_u64(cJSON_GetObjectItemCaseSensitive(o, "size"), &out->size) || !cJSON_IsString(name) ||
        !hl_snapshot_name_ok(name->valuestring) || !cJSON_IsArray(arr))
        goto out;
    snprintf(out->manifest, sizeof out->manifest, "%s", name->valuestring);
    int n = cJSON_GetArraySize(arr);
    if (n > HL_MANIFEST_MAX_STREAMS)
        goto out;
    if (n > 0 && !(out->streams = calloc((size_t)n, sizeof *out->streams))) {
        st = HL_ERR_NOMEM;
        goto out;
    }
    const cJSON *e;
    cJSON_ArrayForEach(e, arr)
    {
        const cJSON *sn = cJSON_GetObjectItemCaseSensitive(e, "name");
        hl_manifest_stream *ms = &out->streams[out->nstreams];
        if (!cJSON_IsString(sn) || !sn->valuestring[0] || strlen(sn->valuestring) >= sizeof ms->name ||
            !dec_u64(cJSON_GetObjectItemCaseSensitive(e, "seq"), &ms->seq))
            goto out;
        snprintf(ms->name, sizeof ms->name, "%s", sn->valuestring);
        out->nstreams++;
    }
    st = HL_OK;
out:
    cJSON_Delete(o);
    if (st)
        hl_last_snapshot_free(out);
    return st;
}

/* ---- the scheduler ---- */

struct hl_sched {
    const hl_config *c;
    hl_nats *n;
    char *const *streams;
    int nstreams;
    int64_t interval_ms;
    hl_kv *kv;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool stop;
    /* fed by the engine (under mu) */
    uint64_t activity;
    uint64_t active_mono_ms, active_wall_ms; /* when activity last changed */
    bool ready;
    /* shown (under mu) */
    hl_sched_info info;
    /* the scheduler thread's own */
    uint64_t next_try_mono_ms; /* backoff after a failure */
    unsigned fails_in_row;
    hl_ratelimit kv_log;
};

bool hl_sched_wanted(const hl_config *c)
{
    return hl_config_snapshot_interval_ms(c) > 0 || c->sleep_timeout_ms > 0;
}

void hl_sched_feed(hl_sched *s, uint64_t activity, bool ready)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    if (activity != s->activity) {
        s->activity = activity;
        s->active_mono_ms = hl_mono_ms();
        s->active_wall_ms = hl_now_ms();
    }
    s->ready = ready;
    pthread_mutex_unlock(&s->mu);
}

void hl_sched_info_get(hl_sched *s, hl_sched_info *out)
{
    if (!s) {
        memset(out, 0, sizeof *out);
        return;
    }
    pthread_mutex_lock(&s->mu);
    *out = s->info;
    pthread_mutex_unlock(&s->mu);
}

/* Sleeps up to ms or until stopped; returns true when stopped. */
static bool nap(hl_sched *s, uint64_t ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += (time_t)(ms / 1000);
    ts.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&s->mu);
    while (!s->stop && pthread_cond_timedwait(&s->cv, &s->mu, &ts) != ETIMEDOUT)
        ;
    bool stop = s->stop;
    pthread_mutex_unlock(&s->mu);
    return stop;
}

static bool stopping(hl_sched *s)
{
    pthread_mutex_lock(&s->mu);
    bool stop = s->stop;
    pthread_mutex_unlock(&s->mu);
    return stop;
}

static hl_status open_kv(hl_sched *s)
{
    if (s->kv)
        return HL_OK;
    hl_kv_opts o = {.history = 1, .replicas = s->c->replication_log.replicas, .max_value_bytes = LAST_MAX_BYTES};
    uint64_t dropped = 0;
    hl_status st = hl_kv_open(&s->kv, s->n, s->c->snapshot.lease_bucket, &o);
    if (st && hl_ratelimit_allow(&s->kv_log, &dropped))
        hl_log(HL_LOG_WARN, "snapshot lease bucket unreachable; retrying at the next tick", "bucket",
               s->c->snapshot.lease_bucket, "error", hl_status_str(st), NULL);
    return st;
}

/* Reads the cluster's last snapshot into *l. HL_ERR_NOT_FOUND when none was recorded. */
static hl_status read_last(hl_sched *s, hl_last_snapshot *l)
{
    unsigned char *v = NULL;
    size_t len = 0;
    memset(l, 0, sizeof *l);
    uint64_t dropped = 0;
    hl_status st = open_kv(s);
    if (st)
        return st;
    st = hl_kv_get(s->kv, HL_LAST_KEY, &v, &len, NULL);
    if (st == HL_ERR_TOO_LARGE) {
        if (hl_ratelimit_allow(&s->kv_log, &dropped))
            hl_log(HL_LOG_WARN, "the cluster's last-snapshot record is too large; treating it as absent", "bucket",
                   s->c->snapshot.lease_bucket, NULL);
        st = HL_ERR_NOT_FOUND; /* a snapshot is taken and rewrites it */
    } else if (st == HL_OK) {
        st = hl_last_snapshot_parse(l, (const char *)v, len);
        if (st && hl_ratelimit_allow(&s->kv_log, &dropped))
            hl_log(HL_LOG_WARN, "the cluster's last-snapshot record is malformed; treating it as absent", "bucket",
                   s->c->snapshot.lease_bucket, NULL);
        if (st == HL_ERR_DECODE)
            st = HL_ERR_NOT_FOUND; /* a snapshot is taken and rewrites it */
    }
    free(v);
    if (st == HL_OK) { /* the cluster's record is the newest known, even if older than what we saw */
        pthread_mutex_lock(&s->mu);
        s->info.newest_ms = l->created_ms;
        s->info.newest_node = l->node;
        snprintf(s->info.newest, sizeof s->info.newest, "%s", l->manifest);
        pthread_mutex_unlock(&s->mu);
    }
    return st;
}

/* Whether a stream advanced retention_percent of max_entries past the last snapshot. */
static bool streams_advanced(hl_sched *s, const hl_last_snapshot *l)
{
    int pct = s->c->snapshot.retention_percent;
    if (pct <= 0)
        return false;
    uint64_t limit = (uint64_t)s->c->replication_log.max_entries / 100u * (uint64_t)pct +
                     (uint64_t)s->c->replication_log.max_entries % 100u * (uint64_t)pct / 100u;
    if (limit == 0)
        limit = 1;
    for (int i = 0; i < s->nstreams; i++) {
        uint64_t first = 0, last = 0, at = 0;
        for (size_t j = 0; j < l->nstreams; j++)
            if (strcmp(l->streams[j].name, s->streams[i]) == 0)
                at = l->streams[j].seq;
        if (hl_nats_stream_bounds(s->n, s->streams[i], &first, &last) != HL_OK)
            continue;
        if (last > at && last - at >= limit) {
            hl_log(HL_LOG_INFO, "stream advanced past the retention share since the last snapshot", "stream",
                   s->streams[i], NULL);
            return true;
        }
    }
    return false;
}

/* Whether snapshot.interval passed since l was taken. A record from further
 * in the future than one interval is not believed (a forged or broken clock):
 * a new snapshot replaces it; one slightly ahead is clock skew between nodes. */
static bool interval_passed(const hl_sched *s, const hl_last_snapshot *l)
{
    uint64_t now = hl_now_ms(), iv = (uint64_t)s->interval_ms;
    if (l->created_ms > now)
        return l->created_ms - now > iv;
    return now - l->created_ms >= iv;
}

/* Renews the lease every third of its lifetime while the snapshot runs. */
typedef struct keeper {
    hl_sched *s;
    uint64_t rev;
    bool done, lost;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} keeper;

static void *keeper_main(void *arg)
{
    keeper *k = arg;
    pthread_mutex_lock(&k->mu);
    while (!k->done) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_sec += HL_LEASE_TTL_MS / 3000;
        while (!k->done && pthread_cond_timedwait(&k->cv, &k->mu, &ts) != ETIMEDOUT)
            ;
        if (k->done || k->lost)
            continue;
        uint64_t rev = k->rev;
        pthread_mutex_unlock(&k->mu);
        hl_status st = hl_lease_renew(k->s->kv, k->s->c->node_id, hl_now_ms(), HL_LEASE_TTL_MS, &rev);
        pthread_mutex_lock(&k->mu);
        if (st == HL_OK)
            k->rev = rev;
        else if (st == HL_ERR_CONFLICT) {
            k->lost = true;
            hl_log(HL_LOG_WARN, "snapshot lease lost while taking a snapshot; another node may take one too", NULL);
        } else {
            hl_log(HL_LOG_WARN, "cannot renew the snapshot lease; trying again", "error", hl_status_str(st), NULL);
        }
    }
    pthread_mutex_unlock(&k->mu);
    return NULL;
}

/* Takes a snapshot under the lease. Returns true when one was taken, or when
 * another node holds the lease or took one meanwhile (nothing to retry);
 * false on a failure (backoff). must_be_older_than: take only when the
 * cluster's last snapshot is older (wall ms; 0: when due by the interval). */
static bool take(hl_sched *s, uint64_t must_be_older_than)
{
    const hl_config *c = s->c;
    uint64_t rev = 0, holder = 0;
    hl_status st = open_kv(s);
    if (!st)
        st = hl_lease_acquire(s->kv, c->node_id, hl_now_ms(), HL_LEASE_TTL_MS, &rev, &holder);
    if (st == HL_ERR_CONFLICT) {
        hl_debugf("snapshot lease held by node %" PRIu64 "; not taking one", holder);
        return true;
    }
    if (st) {
        hl_log(HL_LOG_WARN, "cannot take the snapshot lease; retrying later", "error", hl_status_str(st), NULL);
        return false;
    }
    /* Confirm before working: nats-server before 2.9.21 checks a compare-and-set's expected revision
     * before its replicas agree on the write (nats-server issue 4320), so two nodes racing for an
     * expired lease can both be told they got it; both writes are stored, the later one last. A
     * second compare-and-set once those writes have settled succeeds for the later writer only. */
    if (nap(s, LEASE_SETTLE_MS)) {
        hl_lease_release(s->kv, c->node_id, rev);
        return true;
    }
    st = hl_lease_renew(s->kv, c->node_id, hl_now_ms(), HL_LEASE_TTL_MS, &rev);
    if (st == HL_ERR_CONFLICT) {
        hl_debugf("snapshot lease lost to a concurrent taker; not taking one");
        return true;
    }
    if (st) {
        hl_log(HL_LOG_WARN, "cannot confirm the snapshot lease; retrying later", "error", hl_status_str(st), NULL);
        hl_lease_release(s->kv, c->node_id, rev);
        return false;
    }
    /* Under the lease: has another node finished one since we looked? */
    hl_last_snapshot l;
    st = read_last(s, &l);
    bool due = st == HL_ERR_NOT_FOUND ||
               (st == HL_OK && (must_be_older_than ? l.created_ms < must_be_older_than
                                                   : interval_passed(s, &l) || streams_advanced(s, &l)));
    if (!due && st == HL_OK)
        hl_logf(must_be_older_than ? HL_LOG_INFO : HL_LOG_DEBUG, "no snapshot needed: node %" PRIu64 " took %s since",
                l.node, l.manifest);
    hl_last_snapshot_free(&l);
    if (!due) {
        hl_lease_release(s->kv, c->node_id, rev);
        return st == HL_OK;
    }

    keeper k = {.s = s, .rev = rev};
    pthread_mutex_init(&k.mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&k.cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_t kt;
    bool kstarted = pthread_create(&kt, NULL, keeper_main, &k) == 0;
    if (!kstarted)
        hl_warnf("cannot start the lease renewal thread: a snapshot taking over %d s may overlap another node's",
                 HL_LEASE_TTL_MS / 1000);

    hl_logf(HL_LOG_INFO, "taking a snapshot under the lease (bucket %s)", c->snapshot.lease_bucket);
    hl_manifest m;
    char mname[HL_SNAPSHOT_NAME_MAX + 1] = "", where[1024] = "", err[1024] = "";
    uint64_t t0 = hl_mono_ms();
    st = hl_snapshot_save_manifest(c, &m, mname, where, sizeof where, err, sizeof err);
    uint64_t took = hl_mono_ms() - t0;

    pthread_mutex_lock(&k.mu);
    k.done = true;
    pthread_cond_signal(&k.cv);
    pthread_mutex_unlock(&k.mu);
    if (kstarted)
        pthread_join(kt, NULL);
    rev = k.rev;
    pthread_mutex_destroy(&k.mu);
    pthread_cond_destroy(&k.cv);

    if (st && hl_store_cancelled()) {
        hl_log(HL_LOG_INFO, "snapshot abandoned: this node is stopping", "error", err, NULL);
        hl_lease_release(s->kv, c->node_id, rev);
        return true;
    }
    if (st) {
        hl_log(HL_LOG_ERROR, "snapshot failed; the snapshots in the store stay usable", "error", err, NULL);
        pthread_mutex_lock(&s->mu);
        s->info.failures++;
        pthread_mutex_unlock(&s->mu);
        hl_lease_release(s->kv, c->node_id, rev);
        return false;
    }
    char *json = hl_last_snapshot_json(&m, mname);
    hl_status pst = json ? hl_kv_put(s->kv, HL_LAST_KEY, json, strlen(json), NULL) : HL_ERR_NOMEM;
    free(json);
    if (pst)
        hl_log(HL_LOG_WARN, "snapshot taken but not recorded in the lease bucket; another node may take one early",
               "error", hl_status_str(pst), NULL);
    pthread_mutex_lock(&s->mu);
    s->info.taken++;
    s->info.last_bytes = m.size;
    s->info.last_duration_ms = took;
    s->info.newest_ms = m.created_ms;
    s->info.newest_node = m.node;
    snprintf(s->info.newest, sizeof s->info.newest, "%s", mname);
    pthread_mutex_unlock(&s->mu);
    hl_manifest_free(&m);
    hl_lease_release(s->kv, c->node_id, rev);
    return true;
}

static void backoff(hl_sched *s)
{
    uint64_t ms = BACKOFF_MIN_MS;
    for (unsigned i = 0; i < s->fails_in_row && ms < BACKOFF_MAX_MS; i++)
        ms *= 2;
    if (ms > BACKOFF_MAX_MS)
        ms = BACKOFF_MAX_MS;
    s->fails_in_row++;
    s->next_try_mono_ms = hl_mono_ms() + ms;
    hl_logf(HL_LOG_INFO, "next snapshot attempt in %" PRIu64 " s at the earliest", ms / 1000);
}

/* tick +-25% (xorshift64: spreading the nodes out needs no better randomness) */
static uint64_t jitter(uint64_t *x, uint64_t tick)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return tick - tick / 4 + (tick / 2 ? *x % (tick / 2) : 0);
}

static void *sched_main(void *arg)
{
    hl_sched *s = arg;
    const hl_config *c = s->c;
    uint64_t tick = s->interval_ms > 0 ? (uint64_t)s->interval_ms / 4 : TICK_MAX_MS;
    if (c->sleep_timeout_ms > 0 && (uint64_t)c->sleep_timeout_ms / 4 < tick)
        tick = (uint64_t)c->sleep_timeout_ms / 4;
    if (tick < TICK_MIN_MS)
        tick = TICK_MIN_MS;
    if (tick > TICK_MAX_MS)
        tick = TICK_MAX_MS;
    bool store = hl_config_snapshot_store_set(c);
    int sleep_tries = 0;

    /* Each wait is the tick +-25%, at random: nodes started together would otherwise look at the
     * same instants, and the same node would win every race for the lease. */
    uint64_t rnd = hl_now_ms() ^ (c->node_id * UINT64_C(0x9e3779b97f4a7c15)) ^ (uint64_t)(uintptr_t)s;
    /* Until the node has looked at the bucket once (it must be caught up first), it looks every
     * second or so: the first snapshot of a new cluster, and /readyz's newest snapshot, need not
     * wait a whole tick after the start. */
    bool looked = s->interval_ms <= 0; /* sleep_timeout alone keeps the tick */
    for (uint64_t wait = jitter(&rnd, tick < FIRST_LOOK_MS ? tick : FIRST_LOOK_MS); !nap(s, wait);
         wait = jitter(&rnd, looked || tick < FIRST_LOOK_MS ? tick : FIRST_LOOK_MS)) {
        pthread_mutex_lock(&s->mu);
        bool ready = s->ready;
        uint64_t idle = hl_mono_ms() - s->active_mono_ms, active_wall = s->active_wall_ms;
        pthread_mutex_unlock(&s->mu);
        bool can_try = hl_mono_ms() >= s->next_try_mono_ms;

        if (idle < (uint64_t)c->sleep_timeout_ms)
            sleep_tries = 0; /* a change since: the timeout starts again */
        if (c->sleep_timeout_ms > 0 && idle >= (uint64_t)c->sleep_timeout_ms) {
            if (!sleep_tries)
                hl_logf(HL_LOG_INFO, "no change for %" PRId64 " ms (sleep_timeout)%s", c->sleep_timeout_ms,
                        store ? ": taking a snapshot if the cluster has none since, then stopping" : ": stopping");
            if (store && !ready && ++sleep_tries < SLEEP_TRIES)
                continue; /* not caught up, or a gap: its copy would not be the cluster's state */
            if (store && ready && !take(s, active_wall) && ++sleep_tries < SLEEP_TRIES)
                continue; /* the lease bucket or the store failed: again at the next tick */
            if (store && sleep_tries >= SLEEP_TRIES)
                hl_warnf("sleep_timeout: no snapshot taken after %d attempts (%s); stopping all the same", SLEEP_TRIES,
                         ready ? "lease bucket or store failing" : "not caught up, or a gap");
            hl_signals_stop_self();
            break;
        }
        if (s->interval_ms <= 0 || !ready || !can_try)
            continue;
        hl_last_snapshot l;
        uint64_t dropped = 0;
        hl_status st = read_last(s, &l);
        looked = true;
        if (st && st != HL_ERR_NOT_FOUND && s->kv && hl_ratelimit_allow(&s->kv_log, &dropped))
            hl_log(HL_LOG_WARN,
                   "cannot read the cluster's last snapshot from the lease bucket; retrying at the next tick", "error",
                   hl_status_str(st), NULL);
        bool due = st == HL_ERR_NOT_FOUND || (st == HL_OK && (interval_passed(s, &l) || streams_advanced(s, &l)));
        hl_last_snapshot_free(&l);
        if (!due || stopping(s))
            continue;
        if (take(s, 0))
            s->fails_in_row = 0;
        else
            backoff(s);
    }
    return NULL;
}

/*
 * -save-snapshot: the snapshot it took becomes the cluster's last one in the
 * lease bucket (unless a newer one is recorded), so the schedulers count their
 * interval and the retention share from it and /readyz shows it. Best effort:
 * one connection attempt; the snapshot is stored either way.
 */
hl_status hl_sched_record(const hl_config *c, const hl_manifest *m, const char *mname)
{
    hl_config one = *c;
    one.nats.connect_retries = 0;
    hl_nats *n = NULL;
    hl_kv *kv = NULL;
    hl_kv_opts o = {.history = 1, .replicas = c->replication_log.replicas, .max_value_bytes = LAST_MAX_BYTES};
    hl_status st = hl_nats_connect_node(&n, &one, NULL, 0);
    if (!st)
        st = hl_kv_open(&kv, n, c->snapshot.lease_bucket, &o);
    if (!st) {
        unsigned char *v = NULL;
        size_t len = 0;
        hl_last_snapshot cur;
        memset(&cur, 0, sizeof cur);
        hl_status gst = hl_kv_get(kv, HL_LAST_KEY, &v, &len, NULL);
        /* A record from further in the future than one interval is not believed (interval_passed). */
        uint64_t believable = hl_now_ms() + (uint64_t)hl_config_snapshot_interval_ms(c);
        bool newer = gst == HL_OK && hl_last_snapshot_parse(&cur, (const char *)v, len) == HL_OK &&
                     cur.created_ms > m->created_ms && cur.created_ms <= believable;
        free(v);
        hl_last_snapshot_free(&cur);
        if (!newer) {
            char *json = hl_last_snapshot_json(m, mname);
            st = json ? hl_kv_put(kv, HL_LAST_KEY, json, strlen(json), NULL) : HL_ERR_NOMEM;
            free(json);
        }
    }
    hl_kv_free(kv);
    hl_nats_close(n, 2000);
    return st;
}

hl_status hl_sched_start(hl_sched **out, const hl_config *c, hl_nats *n, char *const *streams, int nstreams)
{
    hl_sched *s = calloc(1, sizeof *s);
    if (!s)
        return HL_ERR_NOMEM;
    s->c = c;
    s->n = n;
    s->streams = streams;
    s->nstreams = nstreams;
    s->interval_ms = hl_config_snapshot_interval_ms(c);
    s->active_mono_ms = hl_mono_ms();
    s->active_wall_ms = hl_now_ms();
    s->kv_log = (hl_ratelimit){.burst = 3, .window_ms = 600000};
    pthread_mutex_init(&s->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (pthread_create(&s->th, NULL, sched_main, s) != 0) {
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
        free(s);
        return HL_ERR_IO;
    }
    if (s->interval_ms > 0)
        hl_logf(HL_LOG_INFO, "periodic snapshots every %" PRId64 " s, one node at a time (lease bucket %s)",
                s->interval_ms / 1000, c->snapshot.lease_bucket);
    *out = s;
    return HL_OK;
}

void hl_sched_stop(hl_sched *s)
{
    if (!s)
        return;
    pthread_mutex_lock(&s->mu);
    s->stop = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    hl_store_cancel(); /* a snapshot in progress: its transfer aborts within about a second */
    pthread_join(s->th, NULL);
    hl_kv_free(s->kv);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
}
