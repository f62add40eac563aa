/*
 * kv.c - JetStream key-value buckets on nats.c's KV API.
 *
 * nats.c does the protocol of get, put, create, update and delete (subjects,
 * headers, direct get); this file bounds what comes back and maps the outcomes
 * onto hl_status. The watch is ours: an ordered consumer on the bucket's
 * stream KV_<bucket> (nats.c's kvWatcher trips a use-after-free in nats.c
 * 3.4.1 when stopped after a server restart), read by a thread into a bounded
 * queue behind an eventfd so the engine can poll() it with its other descriptors.
 */
#include "natsio/kv.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "common/hlc.h"
#include "common/log.h"

#define KV_MAX_HISTORY 64 /* nats.c's kvMaxHistory */
#define KV_MAX_REPLICAS 5
#define WATCH_MAX_ITEMS 1024
#define WATCH_MAX_BYTES (8 * 1024 * 1024) /* plus one value over it, so any value fits */
#define WATCH_POLL_MS 250                 /* a read's wait: how soon hl_kv_watch_free is noticed */
#define WATCH_RETRY_MS 1000               /* between attempts to re-create the consumer */
#define WATCH_HEARTBEAT_MS 1000
#define WATCH_IDLE_CHECK_MS 5000 /* nothing received this long: is the consumer still there? */

struct hl_kv {
    hl_nats *n;
    kvStore *store;
    char bucket[HL_KV_MAX_BUCKET + 1];
    size_t max_value; /* largest value accepted, either way */
};

/* ---- helpers ---- */

/* nats.c prefixes its error texts with the source location, "(kv.c:123): ". */
static const char *nats_error_text(natsStatus s)
{
    natsStatus ls;
    const char *txt = nats_GetLastError(&ls);
    if (txt && txt[0] == '(') {
        const char *e = strstr(txt, "): ");
        if (e && (size_t)(e - txt) < 64)
            txt = e + 3;
    }
    return txt && *txt ? txt : natsStatus_GetText(s);
}

static hl_status map_status(natsStatus s)
{
    switch (s) {
    case NATS_OK:
        return HL_OK;
    case NATS_TIMEOUT:
        return HL_ERR_TIMEOUT;
    case NATS_NO_MEMORY:
        return HL_ERR_NOMEM;
    case NATS_NOT_FOUND:
        return HL_ERR_NOT_FOUND;
    case NATS_INVALID_ARG:
        return HL_ERR_INVALID;
    case NATS_MAX_PAYLOAD: /* over the server's max_payload */
        return HL_ERR_TOO_LARGE;
    case NATS_ERR: /* the stream's max message size (a bucket made with a smaller limit) */
        return strstr(nats_error_text(s), "exceeds maximum") ? HL_ERR_TOO_LARGE : HL_ERR_NATS;
    default:
        return HL_ERR_NATS;
    }
}

/* Logs a failed call (key may be NULL; keys are validated before any call). */
static hl_status kv_fail(const hl_kv *kv, const char *what, const char *key, natsStatus s)
{
    hl_log(HL_LOG_WARN, what, "component", "kv", "bucket", kv ? kv->bucket : "", "key", key ? key : "", "status",
           natsStatus_GetText(s), "error", nats_error_text(s), NULL);
    return map_status(s);
}

static bool valid_bucket(const char *b)
{
    size_t n = b ? strlen(b) : 0;
    if (n == 0 || n > HL_KV_MAX_BUCKET)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = b[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-'))
            return false;
    }
    return true;
}

static bool key_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
           c == '=' || c == '/' || c == '\\';
}

/* A key, or with wildcards a pattern: dot-separated non-empty tokens; with
 * wildcards a token may be "*", and the last one ">". */
static bool valid_key_or_pattern(const char *k, bool wildcards)
{
    size_t n = k ? strlen(k) : 0;
    if (n == 0 || n > HL_KV_MAX_KEY)
        return false;
    const char *tok = k;
    for (;;) {
        const char *dot = strchr(tok, '.');
        size_t tl = dot ? (size_t)(dot - tok) : strlen(tok);
        if (tl == 0)
            return false;
        if (wildcards && tl == 1 && (tok[0] == '*' || tok[0] == '>')) {
            if (tok[0] == '>' && dot)
                return false;
        } else {
            for (size_t i = 0; i < tl; i++)
                if (!key_char(tok[i]))
                    return false;
        }
        if (!dot)
            return true;
        tok = dot + 1;
    }
}

bool hl_kv_valid_key(const char *key)
{
    return valid_key_or_pattern(key, false);
}

/* True when key (valid) matches pattern (valid, with wildcards). */
static bool key_matches(const char *pattern, const char *key)
{
    const char *p = pattern, *k = key;
    for (;;) {
        const char *pd = strchr(p, '.'), *kd = strchr(k, '.');
        size_t pl = pd ? (size_t)(pd - p) : strlen(p);
        size_t kl = kd ? (size_t)(kd - k) : strlen(k);
        if (pl == 1 && p[0] == '>')
            return true;
        if (!(pl == 1 && p[0] == '*') && (pl != kl || memcmp(p, k, pl) != 0))
            return false;
        if (!pd || !kd)
            return !pd && !kd;
        p = pd + 1;
        k = kd + 1;
    }
}

/* ---- buckets ---- */

hl_status hl_kv_open(hl_kv **out, hl_nats *n, const char *bucket, const hl_kv_opts *opts)
{
    *out = NULL;
    if (!n || !valid_bucket(bucket))
        return HL_ERR_INVALID;
    hl_kv *kv = calloc(1, sizeof *kv);
    if (!kv)
        return HL_ERR_NOMEM;
    kv->n = n;
    snprintf(kv->bucket, sizeof kv->bucket, "%s", bucket);
    kv->max_value = HL_KV_DEFAULT_VALUE_BYTES;

    natsStatus s;
    if (opts && (opts->max_value_bytes < 0 || opts->max_value_bytes > HL_KV_MAX_VALUE_BYTES)) {
        free(kv);
        return HL_ERR_INVALID;
    }
    if (!opts || opts->bind_only) {
        if (opts && opts->max_value_bytes)
            kv->max_value = (size_t)opts->max_value_bytes;
        s = js_KeyValue(&kv->store, hl_nats_js(n), bucket);
        if (s == NATS_NOT_FOUND) {
            free(kv);
            return HL_ERR_NOT_FOUND;
        }
    } else {
        if (opts->history < 0 || opts->history > KV_MAX_HISTORY || opts->replicas < 0 ||
            opts->replicas > KV_MAX_REPLICAS || opts->ttl_ms < 0 || opts->ttl_ms > INT64_MAX / 1000000 ||
            opts->max_bytes < 0) {
            free(kv);
            return HL_ERR_INVALID;
        }
        if (opts->max_value_bytes)
            kv->max_value = (size_t)opts->max_value_bytes;
        kvConfig kc;
        kvConfig_Init(&kc);
        kc.Bucket = bucket;
        kc.History = (uint8_t)(opts->history ? opts->history : 1);
        kc.TTL = opts->ttl_ms * 1000000; /* nanoseconds */
        kc.Replicas = opts->replicas ? opts->replicas : 1;
        kc.MaxValueSize = (int32_t)kv->max_value;
        kc.MaxBytes = opts->max_bytes;
        kc.StorageType = opts->memory ? js_MemoryStorage : js_FileStorage;
        s = js_CreateKeyValue(&kv->store, hl_nats_js(n), &kc);
        if (s != NATS_OK && strstr(nats_error_text(s), "configuration is different")) {
            kv_fail(kv, "kv bucket exists with other settings", NULL, s);
            free(kv);
            return HL_ERR_CONFIG;
        }
    }
    if (s != NATS_OK) {
        hl_status st =
            kv_fail(kv, opts && !opts->bind_only ? "cannot create kv bucket" : "cannot bind kv bucket", NULL, s);
        free(kv);
        return st;
    }
    *out = kv;
    return HL_OK;
}

void hl_kv_free(hl_kv *kv)
{
    if (!kv)
        return;
    kvStore_Destroy(kv->store);
    free(kv);
}

hl_status hl_kv_destroy_bucket(hl_nats *n, const char *bucket)
{
    if (!n || !valid_bucket(bucket))
        return HL_ERR_INVALID;
    natsStatus s = js_DeleteKeyValue(hl_nats_js(n), bucket);
    if (s == NATS_NOT_FOUND)
        return HL_ERR_NOT_FOUND;
    if (s != NATS_OK) {
        hl_log(HL_LOG_WARN, "cannot delete kv bucket", "component", "kv", "bucket", bucket, "status",
               natsStatus_GetText(s), "error", nats_error_text(s), NULL);
        return map_status(s);
    }
    return HL_OK;
}

/* ---- keys ---- */

/* Copies a value into a NUL-terminated allocation. */
static hl_status copy_value(const void *p, size_t len, unsigned char **out)
{
    unsigned char *v = malloc(len + 1);
    if (!v)
        return HL_ERR_NOMEM;
    if (len)
        memcpy(v, p, len);
    v[len] = 0;
    *out = v;
    return HL_OK;
}

hl_status hl_kv_get(hl_kv *kv, const char *key, unsigned char **value, size_t *len, uint64_t *revision)
{
    if (value)
        *value = NULL;
    if (len)
        *len = 0;
    if (revision)
        *revision = 0;
    if (!kv || !hl_kv_valid_key(key))
        return HL_ERR_INVALID;
    kvEntry *e = NULL;
    natsStatus s = kvStore_Get(&e, kv->store, key);
    if (s == NATS_NOT_FOUND)
        return HL_ERR_NOT_FOUND;
    if (s != NATS_OK)
        return kv_fail(kv, "kv get failed", key, s);

    hl_status st = HL_OK;
    int vlen = kvEntry_ValueLen(e);
    const char *ekey = kvEntry_Key(e);
    uint64_t rev = kvEntry_Revision(e);
    if (vlen < 0 || rev == 0 || !ekey || strcmp(ekey, key) != 0) {
        hl_log(HL_LOG_WARN, "kv get: server answered with another key or no revision", "component", "kv", "bucket",
               kv->bucket, "key", key, NULL);
        st = HL_ERR_DECODE;
    } else if ((size_t)vlen > kv->max_value) {
        char sz[32];
        snprintf(sz, sizeof sz, "%d", vlen);
        hl_log(HL_LOG_WARN, "kv get: value over max_value_bytes refused", "component", "kv", "bucket", kv->bucket,
               "key", key, "bytes", sz, NULL);
        st = HL_ERR_TOO_LARGE;
    } else if (value) {
        st = copy_value(kvEntry_Value(e), (size_t)vlen, value);
    }
    if (st == HL_OK) {
        if (len)
            *len = (size_t)vlen;
        if (revision)
            *revision = rev;
    }
    kvEntry_Destroy(e);
    return st;
}

static hl_status check_write(hl_kv *kv, const char *key, const void *value, size_t len)
{
    if (!kv || !hl_kv_valid_key(key) || (len && !value))
        return HL_ERR_INVALID;
    if (len > kv->max_value)
        return HL_ERR_TOO_LARGE;
    return HL_OK;
}

/* The server's answer to a failed expected-revision check ("wrong last sequence: 7"). */
static bool is_conflict(natsStatus s)
{
    return s == NATS_ERR && strstr(nats_error_text(s), "wrong last sequence") != NULL;
}

hl_status hl_kv_put(hl_kv *kv, const char *key, const void *value, size_t len, uint64_t *revision)
{
    uint64_t rev = 0;
    if (revision)
        *revision = 0;
    hl_status st = check_write(kv, key, value, len);
    if (st != HL_OK)
        return st;
    natsStatus s = kvStore_Put(&rev, kv->store, key, value, (int)len);
    if (s != NATS_OK)
        return kv_fail(kv, "kv put failed", key, s);
    if (revision)
        *revision = rev;
    return HL_OK;
}

hl_status hl_kv_create(hl_kv *kv, const char *key, const void *value, size_t len, uint64_t *revision)
{
    uint64_t rev = 0;
    if (revision)
        *revision = 0;
    hl_status st = check_write(kv, key, value, len);
    if (st != HL_OK)
        return st;
    natsStatus s = kvStore_Create(&rev, kv->store, key, value, (int)len);
    if (is_conflict(s))
        return HL_ERR_CONFLICT;
    if (s != NATS_OK)
        return kv_fail(kv, "kv create failed", key, s);
    if (revision)
        *revision = rev;
    return HL_OK;
}

hl_status hl_kv_update(hl_kv *kv, const char *key, const void *value, size_t len, uint64_t expected, uint64_t *revision)
{
    uint64_t rev = 0;
    if (revision)
        *revision = 0;
    hl_status st = check_write(kv, key, value, len);
    if (st != HL_OK)
        return st;
    if (expected == 0) /* nats.c would read 0 as "must not exist": that is hl_kv_create */
        return HL_ERR_INVALID;
    natsStatus s = kvStore_Update(&rev, kv->store, key, value, (int)len, expected);
    if (is_conflict(s))
        return HL_ERR_CONFLICT;
    if (s != NATS_OK)
        return kv_fail(kv, "kv update failed", key, s);
    if (revision)
        *revision = rev;
    return HL_OK;
}

hl_status hl_kv_delete(hl_kv *kv, const char *key)
{
    if (!kv || !hl_kv_valid_key(key))
        return HL_ERR_INVALID;
    natsStatus s = kvStore_Delete(kv->store, key);
    if (s != NATS_OK)
        return kv_fail(kv, "kv delete failed", key, s);
    return HL_OK;
}

void hl_kv_entry_free(hl_kv_entry *e)
{
    if (!e)
        return;
    free(e->key);
    free(e->value);
    free(e);
}

/* ---- watch ---- */

typedef struct witem {
    struct witem *next;
    hl_status status; /* HL_OK: entry is set */
    hl_kv_entry *entry;
    size_t bytes;
} witem;

struct hl_kv_watcher {
    hl_nats *n;
    char bucket[HL_KV_MAX_BUCKET + 1];
    char pattern[HL_KV_MAX_KEY + 1];
    char stream[HL_KV_MAX_BUCKET + 4];                  /* KV_<bucket> */
    char prefix[HL_KV_MAX_BUCKET + 6];                  /* $KV.<bucket>. */
    char subject[HL_KV_MAX_BUCKET + HL_KV_MAX_KEY + 6]; /* prefix + pattern */
    size_t max_value;

    /* reader thread only (and hl_kv_watch before the thread starts) */
    natsSubscription *sub;
    uint64_t next_seq; /* stream sequence to resume from; 0: nothing seen, start with the current values */
    uint64_t last_rev;
    bool caught_up;
    uint64_t last_msg_ms, last_check_ms;
    hl_ratelimit refused_log;

    pthread_t thread;
    bool thread_started;
    pthread_mutex_t mu;
    pthread_cond_t ready; /* an item was queued or the watch ended */
    pthread_cond_t space; /* an item was taken or the watch is being freed */
    witem *head, *tail;
    size_t nitems, bytes;
    bool stop;
    bool ended; /* the reader thread is done: after the queue, HL_ERR_NATS */
    int fd;
};

static void wake_set(hl_kv_watcher *w)
{
    uint64_t one = 1;
    ssize_t r = write(w->fd, &one, sizeof one);
    (void)r; /* EAGAIN: already readable */
}

static void wake_clear(hl_kv_watcher *w)
{
    uint64_t v;
    ssize_t r = read(w->fd, &v, sizeof v);
    (void)r;
}

static bool watch_stopping(hl_kv_watcher *w)
{
    pthread_mutex_lock(&w->mu);
    bool stop = w->stop;
    pthread_mutex_unlock(&w->mu);
    return stop;
}

/* Queues an item, waiting while the queue is full. Takes ownership of it. */
static void watch_push(hl_kv_watcher *w, witem *it)
{
    pthread_mutex_lock(&w->mu);
    while (!w->stop && w->head && (w->nitems >= WATCH_MAX_ITEMS || w->bytes + it->bytes > WATCH_MAX_BYTES))
        pthread_cond_wait(&w->space, &w->mu);
    if (w->stop) {
        pthread_mutex_unlock(&w->mu);
        hl_kv_entry_free(it->entry);
        free(it);
        return;
    }
    if (w->tail)
        w->tail->next = it;
    else
        w->head = it;
    w->tail = it;
    w->nitems++;
    w->bytes += it->bytes;
    wake_set(w);
    pthread_cond_broadcast(&w->ready);
    pthread_mutex_unlock(&w->mu);
}

static void watch_push_status(hl_kv_watcher *w, hl_status st)
{
    witem *it = calloc(1, sizeof *it);
    if (!it) {
        hl_log(HL_LOG_ERROR, "kv watch: out of memory reporting a refused entry", "component", "kv", NULL);
        return;
    }
    it->status = st;
    watch_push(w, it);
}

static void log_refused(hl_kv_watcher *w, const char *why, const char *key, uint64_t rev)
{
    uint64_t suppressed = 0;
    if (!hl_ratelimit_allow(&w->refused_log, &suppressed))
        return;
    char revs[32], sup[32];
    snprintf(revs, sizeof revs, "%llu", (unsigned long long)rev);
    snprintf(sup, sizeof sup, "%llu", (unsigned long long)suppressed);
    hl_log(HL_LOG_WARN, "kv watch: entry refused", "component", "kv", "bucket", w->bucket, "reason", why, "key",
           key ? key : "<invalid>", "revision", revs, "suppressed", sup, NULL);
}

/* Queues the one HL_KV_CAUGHT_UP entry. */
static void watch_caught_up(hl_kv_watcher *w)
{
    witem *it = calloc(1, sizeof *it);
    hl_kv_entry *he = calloc(1, sizeof *he);
    w->caught_up = true;
    if (!it || !he) {
        free(it);
        free(he);
        watch_push_status(w, HL_ERR_NOMEM);
        return;
    }
    he->op = HL_KV_CAUGHT_UP;
    it->entry = he;
    it->bytes = sizeof *it + sizeof *he;
    watch_push(w, it);
}

/*
 * Checks one message of the bucket's stream (stream sequence rev) and turns it
 * into an item. The key comes from the subject "$KV.<bucket>.<key>", the
 * operation from the KV-Operation header (none: a put; DEL or PURGE: a delete).
 */
static witem *watch_item(hl_kv_watcher *w, natsMsg *m, uint64_t rev)
{
    witem *it = calloc(1, sizeof *it);
    hl_kv_entry *he = calloc(1, sizeof *he);
    if (!it || !he) {
        free(it);
        free(he);
        return NULL;
    }
    it->entry = he;
    it->bytes = sizeof *it + sizeof *he;
    const char *subj = natsMsg_GetSubject(m);
    size_t plen = strlen(w->prefix);
    const char *key = subj && strncmp(subj, w->prefix, plen) == 0 ? subj + plen : NULL;
    const char *opname = NULL;
    natsStatus hs = natsMsgHeader_Get(m, "KV-Operation", &opname);
    hl_kv_op op = 0;
    if (hs == NATS_NOT_FOUND)
        op = HL_KV_PUT;
    else if (hs == NATS_OK && opname && (strcmp(opname, "DEL") == 0 || strcmp(opname, "PURGE") == 0))
        op = HL_KV_DELETE;
    int vlen = natsMsg_GetDataLength(m);
    hl_status st = HL_OK;
    if (!key || !hl_kv_valid_key(key) || !key_matches(w->pattern, key)) {
        log_refused(w, "key invalid or not watched", NULL, rev);
        st = HL_ERR_DECODE;
    } else if (rev == 0 || rev <= w->last_rev) {
        log_refused(w, "revision not above the previous one", key, rev);
        st = HL_ERR_DECODE;
    } else if (op == 0) {
        log_refused(w, "unknown operation", key, rev);
        st = HL_ERR_DECODE;
    } else if (op == HL_KV_PUT && (vlen < 0 || (size_t)vlen > w->max_value)) {
        log_refused(w, "value over max_value_bytes", key, rev);
        st = HL_ERR_TOO_LARGE;
    }
    if (st == HL_OK || st == HL_ERR_TOO_LARGE) {
        /* Revisions only grow: an entry after a refused one must still be above
         * the last good one, never above a hostile one. A value over the bound
         * has a good key and revision: the caller is told which key it was. */
        w->last_rev = rev;
        he->op = op;
        he->revision = rev;
        he->key = strdup(key);
        if (!he->key)
            st = HL_ERR_NOMEM;
        else if (st == HL_OK && op == HL_KV_PUT)
            st = copy_value(natsMsg_GetData(m), (size_t)vlen, &he->value);
        if (he->key)
            it->bytes += strlen(key);
        if (st == HL_OK) {
            he->len = he->value ? (size_t)vlen : 0;
            it->bytes += he->len;
        }
    }
    if (st != HL_OK && st != HL_ERR_TOO_LARGE) {
        hl_kv_entry_free(he);
        it->entry = NULL;
    }
    it->status = st;
    return it;
}

/*
 * Forgets the consumer: retired (hl_nats_retire_sub), never deleted on the
 * server nor freed while a message for it may be in nats.c's reader. The
 * consumer is ephemeral; the server removes it once nobody listens.
 */
static void watch_drop(hl_kv_watcher *w)
{
    hl_nats_retire_sub(w->n, w->sub);
    w->sub = NULL;
}

/*
 * Creates the watch's ordered consumer on KV_<bucket>: the last message of each
 * matching key first (or, after a reset, every message from next_seq on), then
 * new ones. Asks for the consumer's state once to learn whether there is
 * anything to catch up on (nothing delivered, nothing pending: caught up now).
 */
static natsStatus watch_subscribe(hl_kv_watcher *w)
{
    jsSubOptions so;
    jsErrCode jerr = 0;
    jsSubOptions_Init(&so);
    so.Stream = w->stream;
    /* A plain ephemeral push consumer, not nats.c's ordered consumer: nats.c
     * 3.4.1 re-creates an ordered consumer on its own threads, and destroying
     * the subscription while it does frees memory its reader still uses
     * (seen as heap corruption at a stop right after a start). Gaps and lost
     * consumers are ours to handle: watch_idle_check re-creates the consumer
     * from next_seq, and sequences already seen are skipped. */
    so.Ordered = false;
    so.Config.AckPolicy = js_AckNone;
    so.Config.FlowControl = true; /* answered by nats.c as messages are taken */
    so.Config.MaxDeliver = 1;
    /* Removed by the server once nobody reads it (a stopped or killed node). */
    so.Config.InactiveThreshold = (int64_t)30 * 1000 * 1000 * 1000;
    if (w->next_seq) {
        so.Config.DeliverPolicy = js_DeliverByStartSequence;
        so.Config.OptStartSeq = w->next_seq;
    } else {
        so.Config.DeliverPolicy = js_DeliverLastPerSubject;
    }
    /* Heartbeats every second: a consumer whose server went away shows as
     * missed heartbeats, and the reader re-creates it. */
    so.Config.Heartbeat = (int64_t)WATCH_HEARTBEAT_MS * 1000 * 1000;
    natsStatus s = js_SubscribeSync(&w->sub, hl_nats_js(w->n), w->subject, NULL, &so, &jerr);
    if (s != NATS_OK) {
        watch_drop(w);
        return s;
    }
    if (!w->caught_up) {
        jsConsumerInfo *ci = NULL;
        s = natsSubscription_GetConsumerInfo(&ci, w->sub, NULL, &jerr);
        if (s != NATS_OK) {
            watch_drop(w);
            return s;
        }
        bool nothing = ci->Delivered.Consumer == 0 && ci->NumPending == 0;
        jsConsumerInfo_Destroy(ci);
        if (nothing)
            watch_caught_up(w);
    }
    w->last_msg_ms = w->last_check_ms = hl_mono_ms();
    return NATS_OK;
}

/*
 * Nothing received for WATCH_IDLE_CHECK_MS: ask the server about the consumer.
 * Gone (the server restarted, nats.c did not re-create it) or holding messages
 * we never received: drop it, so it is re-created from next_seq. No question is
 * asked while disconnected: the answer would only time out.
 */
static void watch_idle_check(hl_kv_watcher *w)
{
    uint64_t now = hl_mono_ms();
    if (now - w->last_msg_ms < WATCH_IDLE_CHECK_MS || now - w->last_check_ms < WATCH_IDLE_CHECK_MS ||
        !hl_nats_connected(w->n))
        return;
    w->last_check_ms = now;
    jsConsumerInfo *ci = NULL;
    jsErrCode jerr = 0;
    natsStatus s = natsSubscription_GetConsumerInfo(&ci, w->sub, NULL, &jerr);
    bool stuck = s != NATS_OK || ci->NumPending > 0 || ci->Delivered.Stream >= (w->next_seq ? w->next_seq : 1);
    jsConsumerInfo_Destroy(ci);
    if (stuck) {
        uint64_t suppressed;
        if (hl_ratelimit_allow(&w->refused_log, &suppressed))
            hl_log(HL_LOG_WARN, "kv watch: consumer gone or stuck, re-creating it", "component", "kv", "bucket",
                   w->bucket, "status", natsStatus_GetText(s), NULL);
        watch_drop(w);
    }
}

static bool watch_conn_closed(hl_kv_watcher *w)
{
    return natsConnection_IsClosed(hl_nats_conn(w->n));
}

static void *watch_main(void *arg)
{
    hl_kv_watcher *w = arg;
    while (!watch_stopping(w)) {
        if (!w->sub) {
            if (watch_conn_closed(w))
                break;
            natsStatus s = hl_nats_connected(w->n) ? watch_subscribe(w) : NATS_NOT_YET_CONNECTED;
            if (s != NATS_OK) {
                for (int i = 0; i < WATCH_RETRY_MS / WATCH_POLL_MS && !watch_stopping(w); i++) {
                    struct timespec ts = {.tv_sec = 0, .tv_nsec = WATCH_POLL_MS * 1000000L};
                    nanosleep(&ts, NULL);
                }
            }
            continue;
        }
        natsMsg *m = NULL;
        natsStatus s = natsSubscription_NextMsg(&m, w->sub, WATCH_POLL_MS);
        if (s == NATS_TIMEOUT) {
            watch_idle_check(w);
            continue;
        }
        if (s != NATS_OK) {
            if (s == NATS_CONNECTION_CLOSED || watch_conn_closed(w)) {
                if (!watch_stopping(w))
                    hl_log(HL_LOG_WARN, "kv watch ended: connection closed", "component", "kv", "bucket", w->bucket,
                           NULL);
                break;
            }
            /* A slow consumer or a closed subscription: start again after the last message seen. */
            uint64_t suppressed;
            if (hl_ratelimit_allow(&w->refused_log, &suppressed))
                hl_log(HL_LOG_WARN, "kv watch: read failed, re-creating the consumer", "component", "kv", "bucket",
                       w->bucket, "status", natsStatus_GetText(s), NULL);
            watch_drop(w);
            continue;
        }
        w->last_msg_ms = hl_mono_ms();
        jsMsgMetaData *meta = NULL;
        if (natsMsg_GetMetaData(&meta, m) != NATS_OK) {
            log_refused(w, "no JetStream metadata", NULL, 0);
            watch_push_status(w, HL_ERR_DECODE);
            natsMsg_Destroy(m);
            continue;
        }
        uint64_t seq = meta->Sequence.Stream;
        bool last_pending = meta->NumPending == 0;
        jsMsgMetaData_Destroy(meta);
        if (seq < w->next_seq) { /* seen before a re-created consumer started again */
            natsMsg_Destroy(m);
            continue;
        }
        w->next_seq = seq + 1;
        witem *it = watch_item(w, m, seq);
        natsMsg_Destroy(m);
        if (it)
            watch_push(w, it);
        else
            watch_push_status(w, HL_ERR_NOMEM);
        if (!w->caught_up && last_pending)
            watch_caught_up(w);
    }
    if (w->sub)
        watch_drop(w);
    pthread_mutex_lock(&w->mu);
    w->ended = true;
    wake_set(w); /* a poller must see the end */
    pthread_cond_broadcast(&w->ready);
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

hl_status hl_kv_watch(hl_kv *kv, const char *pattern, hl_kv_watcher **out)
{
    *out = NULL;
    if (!kv || !valid_key_or_pattern(pattern, true))
        return HL_ERR_INVALID;
    hl_kv_watcher *w = calloc(1, sizeof *w);
    if (!w)
        return HL_ERR_NOMEM;
    w->n = kv->n;
    snprintf(w->bucket, sizeof w->bucket, "%s", kv->bucket);
    snprintf(w->pattern, sizeof w->pattern, "%s", pattern);
    snprintf(w->stream, sizeof w->stream, "KV_%s", kv->bucket);
    snprintf(w->prefix, sizeof w->prefix, "$KV.%s.", kv->bucket);
    snprintf(w->subject, sizeof w->subject, "%s%s", w->prefix, pattern);
    w->max_value = kv->max_value;
    w->refused_log.burst = 10;
    w->refused_log.window_ms = 10000;
    w->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->fd < 0) {
        free(w);
        return HL_ERR_IO;
    }
    pthread_mutex_init(&w->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&w->ready, &ca);
    pthread_condattr_destroy(&ca);
    pthread_cond_init(&w->space, NULL);

    natsStatus s = watch_subscribe(w);
    if (s != NATS_OK) {
        hl_status st = kv_fail(kv, "cannot watch kv keys", pattern, s);
        hl_kv_watch_free(w);
        return st;
    }
    if (pthread_create(&w->thread, NULL, watch_main, w) != 0) {
        hl_kv_watch_free(w);
        return HL_ERR_IO;
    }
    w->thread_started = true;
    *out = w;
    return HL_OK;
}

int hl_kv_watch_fd(const hl_kv_watcher *w)
{
    return w ? w->fd : -1;
}

hl_status hl_kv_watch_next(hl_kv_watcher *w, int timeout_ms, hl_kv_entry **out)
{
    *out = NULL;
    if (!w || timeout_ms < 0)
        return HL_ERR_INVALID;
    struct timespec end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    end.tv_sec += timeout_ms / 1000;
    end.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (end.tv_nsec >= 1000000000L) {
        end.tv_sec++;
        end.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&w->mu);
    while (!w->head && !w->ended && timeout_ms > 0) {
        int r = pthread_cond_timedwait(&w->ready, &w->mu, &end);
        if (r == ETIMEDOUT)
            break;
    }
    hl_status st;
    witem *it = w->head;
    if (it) {
        w->head = it->next;
        if (!w->head)
            w->tail = NULL;
        w->nitems--;
        w->bytes -= it->bytes;
        if (!w->head && !w->ended)
            wake_clear(w); /* readable again only when the reader queues more */
        pthread_cond_broadcast(&w->space);
        st = it->status;
        *out = it->entry;
        free(it);
    } else {
        st = w->ended ? HL_ERR_NATS : HL_ERR_TIMEOUT;
    }
    pthread_mutex_unlock(&w->mu);
    return st;
}

void hl_kv_watch_free(hl_kv_watcher *w)
{
    if (!w)
        return;
    pthread_mutex_lock(&w->mu);
    w->stop = true;
    pthread_cond_broadcast(&w->space);
    pthread_mutex_unlock(&w->mu);
    if (w->thread_started)
        pthread_join(w->thread, NULL); /* within WATCH_POLL_MS, or one JetStream request */
    if (w->sub)
        watch_drop(w);
    for (witem *it = w->head, *next; it; it = next) {
        next = it->next;
        hl_kv_entry_free(it->entry);
        free(it);
    }
    close(w->fd);
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->ready);
    pthread_cond_destroy(&w->space);
    free(w);
}
