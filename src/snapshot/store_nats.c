/*
 * store_nats.c - snapshots in a NATS object store.
 *
 * nats.c 3.4.1 has no object-store API, so this is the layout nats.go and the
 * nats CLI use, built on JetStream (docs/snapshots.md, "The nats store"):
 *
 *   stream    OBJ_<bucket>, subjects $O.<bucket>.C.> and $O.<bucket>.M.>,
 *             discard new, rollup and direct get allowed
 *   chunks    $O.<bucket>.C.<nuid>: the object in messages of 128 KiB
 *   meta      $O.<bucket>.M.<base64url(name)>: one JSON message per name,
 *             {"name","bucket","nuid","size","mtime","chunks","digest"} with
 *             digest "SHA-256=<base64url>", published with Nats-Rollup: sub
 *             so only the newest is kept; a delete publishes it "deleted"
 *
 * A put writes the chunks under a new nuid and the meta last, then purges the
 * chunks of the version it replaced: a reader sees the old object or the new
 * one, never a part. Everything read back is checked (sizes, chunk count,
 * digest): the stream is shared with whoever may publish on it.
 */
#include "snapshot/store.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <nats/nats.h>
#include <openssl/evp.h>

#include "common/log.h"
#include "natsio/conn.h"
#include "snapshot/manifest.h"

#define CHUNK_SIZE (128u * 1024u) /* nats.go's default chunk size */
#define REQUEST_MS 10000          /* one JetStream request or publish */
#define META_MAX (64u * 1024u)    /* a meta message larger than this is not ours */
#define CHUNK_MAX (64u << 20)     /* a chunk larger than this is refused */
#define SIZE_MAX_OBJ (UINT64_C(1) << 50)

typedef struct nats_store {
    hl_store base;
    const hl_config *c;
    hl_nats *n;
    char bucket[80];
    char stream[96];
} nats_store;

/* What a meta message says, checked. */
typedef struct obj_meta {
    char nuid[72];
    uint64_t size;
    uint32_t chunks;
    char digest[96];
    bool deleted;
} obj_meta;

static void fail(char *err, size_t errlen, const char *what, natsStatus s, jsErrCode jerr)
{
    if (jerr)
        snprintf(err, errlen, "nats store: %s: %s (JetStream error %d)", what, natsStatus_GetText(s), (int)jerr);
    else
        snprintf(err, errlen, "nats store: %s: %s", what, natsStatus_GetText(s));
}

/* base64url with padding, as nats.go's base64.URLEncoding. */
static void b64url(const unsigned char *in, size_t n, char *out, size_t outlen)
{
    if (outlen < 4 * ((n + 2) / 3) + 1) {
        out[0] = 0;
        return;
    }
    int len = EVP_EncodeBlock((unsigned char *)out, in, (int)n);
    for (int i = 0; i < len; i++)
        out[i] = out[i] == '+' ? '-' : out[i] == '/' ? '_' : out[i];
    out[len] = 0;
}

static void meta_subject(const nats_store *s, const char *name, char *out, size_t len)
{
    char enc[1400];
    b64url((const unsigned char *)name, strlen(name), enc, sizeof enc);
    snprintf(out, len, "$O.%s.M.%s", s->bucket, enc);
}

static bool nuid_ok(const char *v)
{
    size_t n = strlen(v);
    return n > 0 && n < 72 && strspn(v, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") == n;
}

/* Parses and checks a meta message; its name must be want (when given). */
static hl_status parse_meta(const char *data, int len, const char *want, obj_meta *m, char *name_out, size_t name_len)
{
    memset(m, 0, sizeof *m);
    if (len <= 0 || (unsigned)len > META_MAX)
        return HL_ERR_INVALID;
    cJSON *j = cJSON_ParseWithLength(data, (size_t)len);
    if (!j)
        return HL_ERR_INVALID;
    hl_status st = HL_ERR_INVALID;
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(j, "name");
    const cJSON *nuid = cJSON_GetObjectItemCaseSensitive(j, "nuid");
    const cJSON *size = cJSON_GetObjectItemCaseSensitive(j, "size");
    const cJSON *chunks = cJSON_GetObjectItemCaseSensitive(j, "chunks");
    const cJSON *digest = cJSON_GetObjectItemCaseSensitive(j, "digest");
    const cJSON *deleted = cJSON_GetObjectItemCaseSensitive(j, "deleted");
    if (!cJSON_IsString(name) || (want && strcmp(name->valuestring, want) != 0))
        goto out;
    if (name_out && snprintf(name_out, name_len, "%s", name->valuestring) >= (int)name_len)
        goto out;
    m->deleted = cJSON_IsTrue(deleted);
    if (m->deleted) {
        st = HL_OK;
        goto out;
    }
    if (!cJSON_IsString(nuid) || !nuid_ok(nuid->valuestring) || !cJSON_IsNumber(size) || !cJSON_IsNumber(chunks))
        goto out;
    if (size->valuedouble < 0 || size->valuedouble > (double)SIZE_MAX_OBJ || chunks->valuedouble < 0 ||
        chunks->valuedouble > (double)UINT32_MAX)
        goto out;
    m->size = (uint64_t)size->valuedouble;
    m->chunks = (uint32_t)chunks->valuedouble;
    if ((double)m->size != size->valuedouble || (double)m->chunks != chunks->valuedouble)
        goto out;
    /* Every chunk holds at least a byte. */
    if ((m->size == 0) != (m->chunks == 0) || m->chunks > m->size)
        goto out;
    if (!cJSON_IsString(digest) || strncmp(digest->valuestring, "SHA-256=", 8) != 0 ||
        snprintf(m->digest, sizeof m->digest, "%s", digest->valuestring) >= (int)sizeof m->digest)
        goto out;
    snprintf(m->nuid, sizeof m->nuid, "%s", nuid->valuestring);
    st = HL_OK;
out:
    cJSON_Delete(j);
    return st;
}

/* The newest meta of name: HL_ERR_NOT_FOUND when there is none (or it says deleted and !show_deleted). */
static hl_status get_meta(nats_store *s, const char *name, bool show_deleted, obj_meta *m, char *err, size_t errlen)
{
    char subj[1500];
    meta_subject(s, name, subj, sizeof subj);
    natsMsg *msg = NULL;
    jsErrCode jerr = 0;
    jsOptions o;
    jsOptions_Init(&o);
    o.Wait = REQUEST_MS;
    natsStatus ns = js_GetLastMsg(&msg, hl_nats_js(s->n), s->stream, subj, &o, &jerr);
    if (ns == NATS_NOT_FOUND)
        return HL_ERR_NOT_FOUND;
    if (ns != NATS_OK) {
        fail(err, errlen, "reading an object's meta", ns, jerr);
        return HL_ERR_NATS;
    }
    hl_status st = parse_meta(natsMsg_GetData(msg), natsMsg_GetDataLength(msg), name, m, NULL, 0);
    natsMsg_Destroy(msg);
    if (st) {
        snprintf(err, errlen, "nats store: the meta of %s is not a valid object description", name);
        return HL_ERR_INVALID;
    }
    if (m->deleted && !show_deleted)
        return HL_ERR_NOT_FOUND;
    return HL_OK;
}

static hl_status purge_chunks(nats_store *s, const char *nuid, char *err, size_t errlen)
{
    char subj[200];
    snprintf(subj, sizeof subj, "$O.%s.C.%s", s->bucket, nuid);
    jsOptions o;
    jsOptions_Init(&o);
    o.Wait = REQUEST_MS;
    o.Stream.Purge.Subject = subj;
    jsErrCode jerr = 0;
    natsStatus ns = js_PurgeStream(hl_nats_js(s->n), s->stream, &o, &jerr);
    if (ns != NATS_OK) {
        fail(err, errlen, "purging an object's chunks", ns, jerr);
        return HL_ERR_NATS;
    }
    return HL_OK;
}

static hl_status publish(nats_store *s, natsMsg *m, const char *what, char *err, size_t errlen)
{
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MaxWait = REQUEST_MS;
    jsPubAck *pa = NULL;
    jsErrCode jerr = 0;
    natsStatus ns = js_PublishMsg(&pa, hl_nats_js(s->n), m, &po, &jerr);
    jsPubAck_Destroy(pa);
    if (ns != NATS_OK) {
        fail(err, errlen, what, ns, jerr);
        return HL_ERR_NATS;
    }
    return HL_OK;
}

/* The meta message for name: a new object, or (info NULL) a deletion. */
static hl_status publish_meta(nats_store *s, const char *name, const obj_meta *info, char *err, size_t errlen)
{
    char subj[1500], mtime[40];
    meta_subject(s, name, subj, sizeof subj);
    struct timespec ts;
    struct tm tm;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t k = strftime(mtime, sizeof mtime, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(mtime + k, sizeof mtime - k, ".%09ldZ", ts.tv_nsec);

    cJSON *j = cJSON_CreateObject();
    hl_status st = HL_ERR_NOMEM;
    char *text = NULL;
    natsMsg *m = NULL;
    if (!j || !cJSON_AddStringToObject(j, "name", name) || !cJSON_AddStringToObject(j, "bucket", s->bucket) ||
        !cJSON_AddStringToObject(j, "nuid", info ? info->nuid : "") ||
        !cJSON_AddNumberToObject(j, "size", info ? (double)info->size : 0) ||
        !cJSON_AddStringToObject(j, "mtime", mtime) ||
        !cJSON_AddNumberToObject(j, "chunks", info ? (double)info->chunks : 0))
        goto out;
    if (info) {
        cJSON *opts = cJSON_AddObjectToObject(j, "options");
        if (!opts || !cJSON_AddNumberToObject(opts, "max_chunk_size", CHUNK_SIZE) ||
            !cJSON_AddStringToObject(j, "digest", info->digest))
            goto out;
    } else if (!cJSON_AddBoolToObject(j, "deleted", true)) {
        goto out;
    }
    text = cJSON_PrintUnformatted(j);
    if (!text)
        goto out;
    if (natsMsg_Create(&m, subj, NULL, text, (int)strlen(text)) != NATS_OK ||
        natsMsgHeader_Set(m, "Nats-Rollup", "sub") != NATS_OK)
        goto out;
    st = publish(s, m, "publishing an object's meta", err, errlen);
out:
    if (st == HL_ERR_NOMEM)
        snprintf(err, errlen, "nats store: out of memory");
    natsMsg_Destroy(m);
    free(text);
    cJSON_Delete(j);
    return st;
}

/* A new nuid: nats.c's inbox names end in one. */
static hl_status new_nuid(char *out, size_t len)
{
    natsInbox *inbox = NULL;
    if (natsInbox_Create(&inbox) != NATS_OK)
        return HL_ERR_NOMEM;
    const char *dot = strrchr(inbox, '.');
    snprintf(out, len, "%s", dot ? dot + 1 : inbox);
    natsInbox_Destroy(inbox);
    return nuid_ok(out) ? HL_OK : HL_ERR_INTERNAL;
}

/* Reads up to n bytes of src at off into buf. */
static hl_status read_src(const hl_store_src *src, uint64_t off, void *buf, size_t n)
{
    if (src->fd < 0) {
        memcpy(buf, (const char *)src->mem + off, n);
        return HL_OK;
    }
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(src->fd, (char *)buf + got, n - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return HL_ERR_IO;
        got += (size_t)r;
    }
    return HL_OK;
}

static hl_status put_chunks(nats_store *s, const hl_store_src *src, const char *name, obj_meta *info, char *err,
                            size_t errlen)
{
    char subj[200];
    snprintf(subj, sizeof subj, "$O.%s.C.%s", s->bucket, info->nuid);
    unsigned char *buf = malloc(CHUNK_SIZE);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    hl_status st = HL_OK;
    if (!buf || !md || EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) {
        snprintf(err, errlen, "nats store: out of memory");
        st = HL_ERR_NOMEM;
        goto out;
    }
    hl_progress pr;
    hl_progress_start(&pr, "upload", name, src->size);
    for (uint64_t off = 0; off < src->size && !st; off += CHUNK_SIZE) {
        size_t n = src->size - off < CHUNK_SIZE ? (size_t)(src->size - off) : CHUNK_SIZE;
        natsMsg *m = NULL;
        if ((st = read_src(src, off, buf, n))) {
            snprintf(err, errlen, "nats store: reading the snapshot to upload: %s", strerror(errno));
            break;
        }
        EVP_DigestUpdate(md, buf, n);
        if (natsMsg_Create(&m, subj, NULL, (const char *)buf, (int)n) != NATS_OK) {
            snprintf(err, errlen, "nats store: out of memory");
            st = HL_ERR_NOMEM;
            break;
        }
        st = publish(s, m, "publishing a chunk", err, errlen);
        natsMsg_Destroy(m);
        info->chunks++;
        hl_progress_update(&pr, off + n);
    }
    if (!st) {
        unsigned char d[EVP_MAX_MD_SIZE];
        unsigned int dl = 0;
        EVP_DigestFinal_ex(md, d, &dl);
        memcpy(info->digest, "SHA-256=", 8);
        b64url(d, dl, info->digest + 8, sizeof info->digest - 8);
        info->size = src->size;
    }
out:
    EVP_MD_CTX_free(md);
    free(buf);
    return st;
}

static hl_status nats_put(hl_store *base, const char *name, const hl_store_src *src, char *err, size_t errlen)
{
    nats_store *s = (nats_store *)base;
    obj_meta old, info;
    memset(&info, 0, sizeof info);
    hl_status st = get_meta(s, name, true, &old, err, errlen);
    bool had_old = st == HL_OK && !old.deleted;
    if (st && st != HL_ERR_NOT_FOUND && st != HL_ERR_INVALID)
        return st;
    if (new_nuid(info.nuid, sizeof info.nuid)) {
        snprintf(err, errlen, "nats store: cannot make a nuid");
        return HL_ERR_INTERNAL;
    }
    st = put_chunks(s, src, name, &info, err, errlen);
    if (!st)
        st = publish_meta(s, name, &info, err, errlen);
    if (st) {
        char e2[256];
        (void)purge_chunks(s, info.nuid, e2, sizeof e2); /* what was stored of this try */
        return st;
    }
    if (had_old && strcmp(old.nuid, info.nuid) != 0 && purge_chunks(s, old.nuid, err, errlen))
        hl_logf(HL_LOG_WARN, "%s; the chunks of the replaced %s stay in the bucket", err, name);
    return HL_OK;
}

static hl_status read_chunks(nats_store *s, const char *name, const obj_meta *m, hl_store_sink sink, void *ctx,
                             char *err, size_t errlen)
{
    char subj[200];
    snprintf(subj, sizeof subj, "$O.%s.C.%s", s->bucket, m->nuid);
    jsSubOptions so;
    jsSubOptions_Init(&so);
    so.Stream = s->stream;
    so.Ordered = true;
    so.Config.DeliverPolicy = js_DeliverAll;
    natsSubscription *sub = NULL;
    jsErrCode jerr = 0;
    natsStatus ns = js_SubscribeSync(&sub, hl_nats_js(s->n), subj, NULL, &so, &jerr);
    if (ns != NATS_OK) {
        fail(err, errlen, "reading an object's chunks", ns, jerr);
        return HL_ERR_NATS;
    }
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    hl_status st = md && EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1 ? HL_OK : HL_ERR_NOMEM;
    uint64_t got = 0;
    hl_progress pr;
    hl_progress_start(&pr, "download", name, m->size);
    for (uint32_t i = 0; i < m->chunks && !st; i++) {
        natsMsg *msg = NULL;
        ns = natsSubscription_NextMsg(&msg, sub, REQUEST_MS);
        if (ns != NATS_OK) {
            fail(err, errlen, "reading an object's chunks", ns, 0);
            st = ns == NATS_TIMEOUT ? HL_ERR_TIMEOUT : HL_ERR_NATS;
            break;
        }
        int n = natsMsg_GetDataLength(msg);
        if (n <= 0 || (unsigned)n > CHUNK_MAX || got + (uint64_t)n > m->size) {
            snprintf(err, errlen, "nats store: %s: chunk %" PRIu32 " of %" PRIu32 " does not fit the size %" PRIu64,
                     name, i + 1, m->chunks, m->size);
            st = HL_ERR_INVALID;
        } else {
            EVP_DigestUpdate(md, natsMsg_GetData(msg), (size_t)n);
            got += (uint64_t)n;
            st = sink(ctx, natsMsg_GetData(msg), (size_t)n);
            hl_progress_update(&pr, got);
        }
        natsMsg_Destroy(msg);
    }
    hl_nats_retire_sub(s->n, sub);
    if (!st && got != m->size) {
        snprintf(err, errlen, "nats store: %s: %" PRIu64 " bytes in its chunks, %" PRIu64 " in its meta", name, got,
                 m->size);
        st = HL_ERR_INVALID;
    }
    if (!st) {
        unsigned char d[EVP_MAX_MD_SIZE];
        unsigned int dl = 0;
        char digest[96] = "SHA-256=";
        EVP_DigestFinal_ex(md, d, &dl);
        b64url(d, dl, digest + 8, sizeof digest - 8);
        if (strcmp(digest, m->digest) != 0) {
            snprintf(err, errlen, "nats store: %s: its chunks do not match the digest in its meta", name);
            st = HL_ERR_INVALID;
        }
    }
    EVP_MD_CTX_free(md);
    return st;
}

static hl_status nats_get(hl_store *base, const char *name, uint64_t max, hl_store_sink sink, void *ctx, char *err,
                          size_t errlen)
{
    nats_store *s = (nats_store *)base;
    obj_meta m;
    hl_status st = get_meta(s, name, false, &m, err, errlen);
    if (st)
        return st;
    if (m.size > max) {
        snprintf(err, errlen, "nats store: %s: %" PRIu64 " bytes, more than the %" PRIu64 " expected", name, m.size,
                 max);
        return HL_ERR_TOO_LARGE;
    }
    return m.chunks ? read_chunks(s, name, &m, sink, ctx, err, errlen) : HL_OK;
}

static hl_status nats_list(hl_store *base, hl_store_names *out, char *err, size_t errlen)
{
    nats_store *s = (nats_store *)base;
    out->v = NULL;
    out->n = 0;
    char filter[120];
    snprintf(filter, sizeof filter, "$O.%s.M.>", s->bucket);
    jsOptions o;
    jsOptions_Init(&o);
    o.Wait = REQUEST_MS;
    o.Stream.Info.SubjectsFilter = filter;
    jsStreamInfo *si = NULL;
    jsErrCode jerr = 0;
    natsStatus ns = js_GetStreamInfo(&si, hl_nats_js(s->n), s->stream, &o, &jerr);
    if (ns != NATS_OK) {
        fail(err, errlen, "listing the bucket", ns, jerr);
        return HL_ERR_NATS;
    }
    hl_status st = HL_OK;
    int count = si->State.Subjects ? si->State.Subjects->Count : 0;
    for (int i = 0; i < count && !st && out->n < HL_STORE_LIST_MAX; i++) {
        natsMsg *msg = NULL;
        ns = js_GetLastMsg(&msg, hl_nats_js(s->n), s->stream, si->State.Subjects->List[i].Subject, &o, &jerr);
        if (ns == NATS_NOT_FOUND)
            continue;
        if (ns != NATS_OK) {
            fail(err, errlen, "listing the bucket", ns, jerr);
            st = HL_ERR_NATS;
            break;
        }
        obj_meta m;
        char name[1024];
        if (parse_meta(natsMsg_GetData(msg), natsMsg_GetDataLength(msg), NULL, &m, name, sizeof name) == HL_OK &&
            !m.deleted && hl_snapshot_name_ok(name)) {
            char **v = realloc(out->v, (out->n + 1) * sizeof *v);
            char *d = v ? strdup(name) : NULL;
            if (v)
                out->v = v;
            if (!d) {
                snprintf(err, errlen, "nats store: out of memory");
                st = HL_ERR_NOMEM;
            } else {
                out->v[out->n++] = d;
            }
        }
        natsMsg_Destroy(msg);
    }
    jsStreamInfo_Destroy(si);
    if (st)
        hl_store_names_free(out);
    else
        hl_store_names_sort(out);
    return st;
}

static hl_status nats_del(hl_store *base, const char *name, char *err, size_t errlen)
{
    nats_store *s = (nats_store *)base;
    obj_meta m;
    hl_status st = get_meta(s, name, false, &m, err, errlen);
    if (st == HL_ERR_NOT_FOUND)
        return HL_OK;
    if (st)
        return st;
    if ((st = publish_meta(s, name, NULL, err, errlen)))
        return st;
    return m.chunks ? purge_chunks(s, m.nuid, err, errlen) : HL_OK;
}

static void nats_destroy(hl_store *base)
{
    nats_store *s = (nats_store *)base;
    hl_nats_close(s->n, 2000);
    free(s);
}

static const hl_store_ops nats_ops = {nats_put, nats_get, nats_list, nats_del, nats_destroy};

/* OBJ_<bucket> as nats.go creates it, unless it exists. */
static hl_status ensure_stream(nats_store *s, char *err, size_t errlen)
{
    jsStreamInfo *si = NULL;
    jsErrCode jerr = 0;
    jsOptions o;
    jsOptions_Init(&o);
    o.Wait = REQUEST_MS;
    natsStatus ns = js_GetStreamInfo(&si, hl_nats_js(s->n), s->stream, &o, &jerr);
    jsStreamInfo_Destroy(si);
    if (ns == NATS_OK)
        return HL_OK;
    if (ns != NATS_NOT_FOUND) {
        fail(err, errlen, "looking up the bucket's stream", ns, jerr);
        return HL_ERR_NATS;
    }
    char chunks[100], meta[100];
    snprintf(chunks, sizeof chunks, "$O.%s.C.>", s->bucket);
    snprintf(meta, sizeof meta, "$O.%s.M.>", s->bucket);
    const char *subjects[2] = {chunks, meta};
    jsStreamConfig cfg;
    jsStreamConfig_Init(&cfg);
    cfg.Name = s->stream;
    cfg.Subjects = subjects;
    cfg.SubjectsLen = 2;
    cfg.Storage = js_FileStorage;
    cfg.Replicas = s->c->snapshot.nats_replicas > 0 ? s->c->snapshot.nats_replicas : s->c->replication_log.replicas;
    cfg.Discard = js_DiscardNew;
    cfg.AllowRollup = true;
    cfg.AllowDirect = true;
    jerr = 0;
    ns = js_AddStream(&si, hl_nats_js(s->n), &cfg, &o, &jerr);
    jsStreamInfo_Destroy(si);
    if (ns != NATS_OK && jerr != JSStreamNameExistErr) {
        fail(err, errlen, "creating the bucket's stream", ns, jerr);
        return HL_ERR_NATS;
    }
    hl_logf(HL_LOG_INFO, "created the object store bucket %s (stream %s, %d replicas)", s->bucket, s->stream,
            (int)cfg.Replicas);
    return HL_OK;
}

hl_status hl_store_nats_open(hl_store **out, const hl_config *c, char *err, size_t errlen)
{
    *out = NULL;
    const char *bucket =
        c->snapshot.nats_bucket && *c->snapshot.nats_bucket ? c->snapshot.nats_bucket : "harmonylite-snapshots";
    nats_store *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "nats store: out of memory");
        return HL_ERR_NOMEM;
    }
    s->base.ops = &nats_ops;
    s->c = c;
    snprintf(s->bucket, sizeof s->bucket, "%s", bucket);
    snprintf(s->stream, sizeof s->stream, "OBJ_%s", bucket);
    snprintf(s->base.where, sizeof s->base.where, "nats://object-store/%s/", bucket);
    char url[300];
    hl_status st = hl_nats_connect_node(&s->n, c, url, sizeof url);
    if (st) {
        snprintf(err, errlen, "nats store: cannot reach NATS (%s): %s", url[0] ? url : "nats.urls",
                 url[0] ? "the embedded server of a running node, or set nats.urls" : hl_status_str(st));
        free(s);
        return st == HL_ERR_CONFIG ? HL_ERR_CONFIG : HL_ERR_NATS;
    }
    st = ensure_stream(s, err, errlen);
    if (st) {
        nats_destroy(&s->base);
        return st;
    }
    *out = &s->base;
    return HL_OK;
}
