/*
 * store_s3.c - snapshots in an S3-compatible bucket, through libcurl.
 *
 * Requests are signed by libcurl itself (CURLOPT_AWS_SIGV4); the payload is
 * declared UNSIGNED-PAYLOAD (integrity comes from the manifest's SHA-256 and
 * TLS), so a body is streamed once, never read twice to hash it. Objects up
 * to snapshot.s3_part_size go up in one PUT, larger ones as a multipart
 * upload whose parts are read from the file with pread, so memory does not
 * grow with the object. Nothing is visible under a key until its PUT or
 * CompleteMultipartUpload succeeded; a failed multipart upload is aborted.
 *
 * Query strings are written in SigV4's canonical form (sorted, every value
 * percent-encoded, "k=" for empty values) because older libcurl signs the
 * query exactly as given.
 */
#include <ctype.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <curl/curl.h>

#include "common/buf.h"
#include "common/log.h"
#include "snapshot/manifest.h"
#include "snapshot/s3xml.h"
#include "snapshot/store.h"

#define S3_MAX_PARTS 10000         /* S3's limit on parts per upload */
#define S3_MAX_RESPONSE (8u << 20) /* bytes of an XML answer kept at most */
#define S3_MAX_LIST_PAGES 1000     /* ListObjectsV2 pages followed at most */
#define S3_CONNECT_TIMEOUT_S 15L
#define S3_STALL_S 60L /* a transfer moving no byte for this long is abandoned */

typedef struct s3_store {
    hl_store base;
    char *scheme_host; /* "https://bucket.host:port" or "http://host:port" */
    char *bucket_path; /* "" (virtual host) or "/bucket" (path style) */
    char *prefix;      /* key prefix, "" or ending in '/' usually */
    char *sigv4;       /* "aws:amz:<region>:s3" */
    char *access, *secret, *token;
    char *ca_file;
    uint64_t part_size;
} s3_store;

/* ---- small helpers ---------------------------------------------------- */

/* Appends s percent-encoded as SigV4 wants (unreserved kept; '/' kept when keep_slash). */
static void add_encoded(hl_buf *b, const char *s, int keep_slash)
{
    static const char hex[] = "0123456789ABCDEF";
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (isalnum(*p) || *p == '-' || *p == '_' || *p == '.' || *p == '~' || (keep_slash && *p == '/')) {
            hl_buf_addc(b, *p);
        } else {
            hl_buf_addc(b, '%');
            hl_buf_addc(b, (unsigned char)hex[*p >> 4]);
            hl_buf_addc(b, (unsigned char)hex[*p & 15]);
        }
    }
}

/* URL of key (NULL: the bucket) with an already canonical query (NULL: none). */
static hl_status url_of(const s3_store *s, const char *key, const char *query, hl_buf *url)
{
    hl_buf_reset(url);
    hl_buf_adds(url, s->scheme_host);
    hl_buf_adds(url, s->bucket_path);
    hl_buf_addc(url, '/');
    if (key) {
        add_encoded(url, s->prefix, 1);
        add_encoded(url, key, 1);
    }
    if (query) {
        hl_buf_addc(url, '?');
        hl_buf_adds(url, query);
    }
    return hl_buf_status(url);
}

/* One request's state. */
typedef struct s3_req {
    const s3_store *s;
    CURL *curl;
    struct curl_slist *headers;
    char errbuf[CURL_ERROR_SIZE];
    long status;
    /* body to send */
    const hl_store_src *src;
    uint64_t src_off, src_len, sent;
    const char *mem; /* a body in memory (CompleteMultipartUpload) */
    /* body received */
    hl_buf resp;        /* XML answers, and error bodies */
    hl_store_sink sink; /* GET: the object goes here when the status is 2xx */
    void *sink_ctx;
    uint64_t max, got;
    hl_status sink_err;
    char etag[256];
    /* progress */
    hl_progress *pr;
    uint64_t pr_base;
} s3_req;

static size_t on_read(char *buf, size_t size, size_t nitems, void *arg)
{
    s3_req *r = arg;
    size_t want = size * nitems;
    if (r->mem) {
        size_t left = strlen(r->mem + r->sent);
        size_t n = left < want ? left : want;
        memcpy(buf, r->mem + r->sent, n);
        r->sent += n;
        return n;
    }
    uint64_t left = r->src_len - r->sent;
    if (left < want)
        want = (size_t)left;
    if (want == 0)
        return 0;
    if (r->src->fd < 0) {
        memcpy(buf, (const char *)r->src->mem + r->src_off + r->sent, want);
        r->sent += want;
        return want;
    }
    ssize_t n = pread(r->src->fd, buf, want, (off_t)(r->src_off + r->sent));
    if (n <= 0)
        return CURL_READFUNC_ABORT;
    r->sent += (uint64_t)n;
    return (size_t)n;
}

static int on_seek(void *arg, curl_off_t offset, int origin)
{
    s3_req *r = arg;
    if (origin != SEEK_SET || offset < 0 || (uint64_t)offset > (r->mem ? strlen(r->mem) : r->src_len))
        return CURL_SEEKFUNC_CANTSEEK;
    r->sent = (uint64_t)offset;
    return CURL_SEEKFUNC_OK;
}

static size_t on_write(char *data, size_t size, size_t nmemb, void *arg)
{
    s3_req *r = arg;
    size_t n = size * nmemb;
    long code = 0;
    curl_easy_getinfo(r->curl, CURLINFO_RESPONSE_CODE, &code);
    if (r->sink && code >= 200 && code < 300) {
        if (n > r->max - r->got) {
            r->sink_err = HL_ERR_TOO_LARGE;
            return 0;
        }
        r->got += n;
        if ((r->sink_err = r->sink(r->sink_ctx, data, n)))
            return 0;
        return n;
    }
    if (hl_buf_add(&r->resp, data, n))
        return 0;
    return n;
}

static size_t on_header(char *data, size_t size, size_t nitems, void *arg)
{
    s3_req *r = arg;
    size_t n = size * nitems;
    if (n > 5 && strncasecmp(data, "etag:", 5) == 0) {
        size_t a = 5, b = n;
        while (a < b && (data[a] == ' ' || data[a] == '\t'))
            a++;
        while (b > a && (data[b - 1] == '\r' || data[b - 1] == '\n' || data[b - 1] == ' '))
            b--;
        r->etag[0] = 0;
        if (b - a < sizeof r->etag) {
            bool ok = true;
            for (size_t i = a; i < b; i++)
                ok &= data[i] > ' ' && data[i] < 0x7f && data[i] != '<' && data[i] != '>' && data[i] != '&';
            if (ok) {
                memcpy(r->etag, data + a, b - a);
                r->etag[b - a] = 0;
            }
        }
    }
    return n;
}

static int on_progress(void *arg, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
    s3_req *r = arg;
    (void)dltotal;
    (void)ultotal;
    if (r->pr)
        hl_progress_update(r->pr, r->pr_base + (uint64_t)(ulnow > dlnow ? ulnow : dlnow));
    return hl_store_cancelled() ? 1 : 0; /* a stopping node: abort the transfer */
}

static hl_status req_init(s3_req *r, const s3_store *s, char *err, size_t errlen)
{
    memset(r, 0, sizeof *r);
    r->s = s;
    hl_buf_init(&r->resp, S3_MAX_RESPONSE);
    r->curl = curl_easy_init();
    if (!r->curl) {
        snprintf(err, errlen, "s3: curl_easy_init failed");
        return HL_ERR_NOMEM;
    }
    r->headers = curl_slist_append(NULL, "x-amz-content-sha256: UNSIGNED-PAYLOAD");
    r->headers = curl_slist_append(r->headers, "Expect:");
    if (s->token) {
        hl_buf h;
        hl_buf_init(&h, 8192);
        hl_buf_adds(&h, "x-amz-security-token: ");
        hl_buf_adds(&h, s->token);
        if (!hl_buf_status(&h))
            r->headers = curl_slist_append(r->headers, hl_buf_str(&h));
        hl_buf_free(&h);
    }
    CURL *c = r->curl;
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(c, CURLOPT_AWS_SIGV4, s->sigv4);
    curl_easy_setopt(c, CURLOPT_USERNAME, s->access);
    curl_easy_setopt(c, CURLOPT_PASSWORD, s->secret);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, r->headers);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, S3_CONNECT_TIMEOUT_S);
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, S3_STALL_S);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, r);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    if (s->ca_file)
        curl_easy_setopt(c, CURLOPT_CAINFO, s->ca_file);
    if (!r->headers) {
        snprintf(err, errlen, "s3: out of memory");
        return HL_ERR_NOMEM;
    }
    return HL_OK;
}

static void req_free(s3_req *r)
{
    if (r->curl)
        curl_easy_cleanup(r->curl);
    curl_slist_free_all(r->headers);
    hl_buf_free(&r->resp);
}

/* Error text of a failed request: S3's Code and Message, or curl's error; never a secret. */
static void req_error(s3_req *r, const char *what, char *err, size_t errlen)
{
    char code[128] = "", msg[256] = "";
    size_t pos = 0;
    if (r->resp.len) {
        hl_s3xml_text((const char *)r->resp.data, r->resp.len, &pos, "Code", code, sizeof code);
        pos = 0;
        hl_s3xml_text((const char *)r->resp.data, r->resp.len, &pos, "Message", msg, sizeof msg);
        for (char *p = msg; *p; p++)
            if ((unsigned char)*p < ' ')
                *p = ' ';
        for (char *p = code; *p; p++)
            if ((unsigned char)*p < ' ')
                *p = ' ';
    }
    if (r->status)
        snprintf(err, errlen, "s3 %s: HTTP %ld%s%s%s%s", what, r->status, code[0] ? " " : "", code, msg[0] ? ": " : "",
                 msg);
    else
        snprintf(err, errlen, "s3 %s: %s", what, r->errbuf[0] ? r->errbuf : "request failed");
}

/* Runs r against url with method; HL_OK for a 2xx answer. */
static hl_status req_run(s3_req *r, const char *method, const char *url, const char *what, char *err, size_t errlen)
{
    curl_easy_setopt(r->curl, CURLOPT_URL, url);
    if (strcmp(method, "GET") != 0 && strcmp(method, "PUT") != 0)
        curl_easy_setopt(r->curl, CURLOPT_CUSTOMREQUEST, method);
    CURLcode cc = curl_easy_perform(r->curl);
    curl_easy_getinfo(r->curl, CURLINFO_RESPONSE_CODE, &r->status);
    if (r->sink_err) {
        snprintf(err, errlen, "s3 %s: %s", what,
                 r->sink_err == HL_ERR_TOO_LARGE ? "larger than expected" : "stopped by the reader");
        return r->sink_err;
    }
    if (cc != CURLE_OK) {
        r->status = 0;
        req_error(r, what, err, errlen);
        /* a server whose certificate does not verify stays so: not retried */
        return cc == CURLE_PEER_FAILED_VERIFICATION ? HL_ERR_INVALID : HL_ERR_IO;
    }
    if (r->status < 200 || r->status > 299) {
        req_error(r, what, err, errlen);
        if (r->status == 404)
            return HL_ERR_NOT_FOUND;
        /* the server refused the request itself (credentials, a setting): retrying will not help */
        if (r->status >= 400 && r->status < 500 && r->status != 408 && r->status != 429)
            return HL_ERR_INVALID;
        return HL_ERR_IO;
    }
    return HL_OK;
}

/* ---- operations ------------------------------------------------------- */

static hl_status put_simple(s3_store *s, const char *name, const hl_store_src *src, hl_progress *pr, char *err,
                            size_t errlen)
{
    s3_req r;
    hl_buf url;
    hl_buf_init(&url, 16384);
    hl_status st = req_init(&r, s, err, errlen);
    if (!st && url_of(s, name, NULL, &url))
        st = HL_ERR_NOMEM;
    if (!st) {
        r.src = src;
        r.src_len = src->size;
        r.pr = pr;
        curl_easy_setopt(r.curl, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(r.curl, CURLOPT_READFUNCTION, on_read);
        curl_easy_setopt(r.curl, CURLOPT_READDATA, &r);
        curl_easy_setopt(r.curl, CURLOPT_SEEKFUNCTION, on_seek);
        curl_easy_setopt(r.curl, CURLOPT_SEEKDATA, &r);
        curl_easy_setopt(r.curl, CURLOPT_INFILESIZE_LARGE, (curl_off_t)src->size);
        st = req_run(&r, "PUT", hl_buf_str(&url), "upload", err, errlen);
    }
    req_free(&r);
    hl_buf_free(&url);
    return st;
}

static void abort_upload(s3_store *s, const char *name, const char *query)
{
    s3_req r;
    hl_buf url;
    char err[256];
    hl_buf_init(&url, 16384);
    if (!req_init(&r, s, err, sizeof err) && !url_of(s, name, query, &url) &&
        req_run(&r, "DELETE", hl_buf_str(&url), "abort upload", err, sizeof err))
        hl_logf(HL_LOG_WARN, "snapshot: aborting the multipart upload of %s failed: %s", name, err);
    req_free(&r);
    hl_buf_free(&url);
}

/* One multipart upload in progress (put_multipart). */
typedef struct multipart {
    s3_store *s;
    const char *name;
    char upload_id[1024]; /* "" until CreateMultipartUpload answered */
    hl_buf url, q;        /* scratch: the request's URL and query */
} multipart;

/* Sets mp->q to "uploadId=<id>" after prefix (a "partNumber=N&" or ""). */
static void mp_query(multipart *mp, const char *prefix)
{
    hl_buf_reset(&mp->q);
    hl_buf_adds(&mp->q, prefix);
    hl_buf_adds(&mp->q, "uploadId=");
    add_encoded(&mp->q, mp->upload_id, 0);
}

/* CreateMultipartUpload: fills mp->upload_id. */
static hl_status mp_create(multipart *mp, char *err, size_t errlen)
{
    s3_req r;
    hl_status st = req_init(&r, mp->s, err, errlen);
    if (st)
        goto out;
    if (url_of(mp->s, mp->name, "uploads=", &mp->url)) {
        st = HL_ERR_NOMEM;
        goto out;
    }
    curl_easy_setopt(r.curl, CURLOPT_POST, 1L);
    curl_easy_setopt(r.curl, CURLOPT_POSTFIELDSIZE, 0L);
    curl_easy_setopt(r.curl, CURLOPT_POSTFIELDS, "");
    if ((st = req_run(&r, "POST", hl_buf_str(&mp->url), "create multipart upload", err, errlen)))
        goto out;
    size_t pos = 0;
    if (hl_s3xml_text((const char *)r.resp.data, r.resp.len, &pos, "UploadId", mp->upload_id, sizeof mp->upload_id) !=
            1 ||
        !mp->upload_id[0]) {
        snprintf(err, errlen, "s3 create multipart upload: no UploadId in the answer");
        st = HL_ERR_DECODE;
    }
out:
    req_free(&r);
    return st;
}

/* UploadPart i (0-based) of nparts: len bytes of src from off; its ETag goes to etag. */
static hl_status mp_put_part(multipart *mp, const hl_store_src *src, hl_progress *pr, uint64_t i, uint64_t nparts,
                             uint64_t off, uint64_t len, char etag[256], char *err, size_t errlen)
{
    s3_req r;
    char prefix[48];
    snprintf(prefix, sizeof prefix, "partNumber=%" PRIu64 "&", i + 1);
    mp_query(mp, prefix);
    hl_status st = req_init(&r, mp->s, err, errlen);
    if (st)
        goto out;
    if (hl_buf_status(&mp->q) || url_of(mp->s, mp->name, hl_buf_str(&mp->q), &mp->url)) {
        st = HL_ERR_NOMEM;
        goto out;
    }
    r.src = src;
    r.src_off = off;
    r.src_len = len;
    r.pr = pr;
    r.pr_base = off;
    curl_easy_setopt(r.curl, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(r.curl, CURLOPT_READFUNCTION, on_read);
    curl_easy_setopt(r.curl, CURLOPT_READDATA, &r);
    curl_easy_setopt(r.curl, CURLOPT_SEEKFUNCTION, on_seek);
    curl_easy_setopt(r.curl, CURLOPT_SEEKDATA, &r);
    curl_easy_setopt(r.curl, CURLOPT_INFILESIZE_LARGE, (curl_off_t)len);
    char what[64];
    snprintf(what, sizeof what, "upload part %" PRIu64 " of %" PRIu64, i + 1, nparts);
    if ((st = req_run(&r, "PUT", hl_buf_str(&mp->url), what, err, errlen)))
        goto out;
    if (!r.etag[0]) {
        snprintf(err, errlen, "s3 %s: no usable ETag in the answer", what);
        st = HL_ERR_DECODE;
        goto out;
    }
    memcpy(etag, r.etag, sizeof r.etag);
out:
    req_free(&r);
    return st;
}

/* CompleteMultipartUpload: only now does the object appear under its key. */
static hl_status mp_complete(multipart *mp, char (*etags)[256], uint64_t nparts, char *err, size_t errlen)
{
    s3_req r;
    hl_buf body;
    hl_buf_init(&body, 64u << 20);
    hl_buf_adds(&body, "<CompleteMultipartUpload xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">");
    for (uint64_t i = 0; i < nparts; i++)
        hl_buf_addf(&body, "<Part><PartNumber>%" PRIu64 "</PartNumber><ETag>%s</ETag></Part>", i + 1, etags[i]);
    hl_buf_adds(&body, "</CompleteMultipartUpload>");
    mp_query(mp, "");
    hl_status st = req_init(&r, mp->s, err, errlen);
    if (st)
        goto out;
    if (hl_buf_status(&body) || hl_buf_status(&mp->q) || url_of(mp->s, mp->name, hl_buf_str(&mp->q), &mp->url)) {
        st = HL_ERR_NOMEM;
        goto out;
    }
    curl_easy_setopt(r.curl, CURLOPT_POST, 1L);
    curl_easy_setopt(r.curl, CURLOPT_POSTFIELDS, hl_buf_str(&body));
    curl_easy_setopt(r.curl, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body.len);
    if ((st = req_run(&r, "POST", hl_buf_str(&mp->url), "complete multipart upload", err, errlen)))
        goto out;
    /* S3 may answer 200 and still fail the completion: the error is in the body. */
    if (r.resp.len && memmem(r.resp.data, r.resp.len, "<Error>", 7)) {
        r.status = 500;
        req_error(&r, "complete multipart upload", err, errlen);
        st = HL_ERR_IO;
    }
out:
    req_free(&r);
    hl_buf_free(&body);
    return st;
}

/* Uploads src as a multipart upload of at most S3_MAX_PARTS parts; a failed
 * upload is aborted (a failed abort is logged) so its parts do not linger. */
static hl_status put_multipart(s3_store *s, const char *name, const hl_store_src *src, hl_progress *pr, char *err,
                               size_t errlen)
{
    hl_status st;
    multipart mp = {.s = s, .name = name, .upload_id = ""};
    uint64_t part = s->part_size;
    if ((src->size + part - 1) / part > S3_MAX_PARTS)
        part = (src->size + S3_MAX_PARTS - 1) / S3_MAX_PARTS;
    uint64_t nparts = (src->size + part - 1) / part;
    char(*etags)[256] = calloc(nparts, sizeof *etags);
    hl_buf_init(&mp.url, 16384);
    hl_buf_init(&mp.q, 4096);
    if (!etags) {
        snprintf(err, errlen, "s3: out of memory");
        st = HL_ERR_NOMEM;
        goto out;
    }
    st = mp_create(&mp, err, errlen);
    for (uint64_t i = 0; !st && i < nparts; i++) {
        uint64_t off = i * part, len = src->size - off < part ? src->size - off : part;
        st = mp_put_part(&mp, src, pr, i, nparts, off, len, etags[i], err, errlen);
    }
    if (!st)
        st = mp_complete(&mp, etags, nparts, err, errlen);
    if (st && mp.upload_id[0]) {
        mp_query(&mp, "");
        if (!hl_buf_status(&mp.q))
            abort_upload(s, name, hl_buf_str(&mp.q));
    }
out:
    free(etags);
    hl_buf_free(&mp.url);
    hl_buf_free(&mp.q);
    return st;
}

static hl_status s3_put(hl_store *st, const char *name, const hl_store_src *src, char *err, size_t errlen)
{
    s3_store *s = (s3_store *)st;
    if (!hl_snapshot_name_ok(name)) {
        snprintf(err, errlen, "s3: bad name \"%s\"", name);
        return HL_ERR_INVALID;
    }
    hl_progress pr;
    hl_progress_start(&pr, "upload", name, src->size);
    if (src->size > s->part_size)
        return put_multipart(s, name, src, &pr, err, errlen);
    return put_simple(s, name, src, &pr, err, errlen);
}

static hl_status s3_get(hl_store *st, const char *name, uint64_t max, hl_store_sink sink, void *ctx, char *err,
                        size_t errlen)
{
    s3_store *s = (s3_store *)st;
    s3_req r;
    hl_buf url;
    hl_progress pr;
    if (!hl_snapshot_name_ok(name)) {
        snprintf(err, errlen, "s3: bad name \"%s\"", name);
        return HL_ERR_INVALID;
    }
    hl_progress_start(&pr, "download", name, max);
    hl_buf_init(&url, 16384);
    hl_status rc = req_init(&r, s, err, errlen);
    if (!rc && url_of(s, name, NULL, &url))
        rc = HL_ERR_NOMEM;
    if (!rc) {
        r.sink = sink;
        r.sink_ctx = ctx;
        r.max = max;
        r.pr = &pr;
        rc = req_run(&r, "GET", hl_buf_str(&url), "download", err, errlen);
    }
    req_free(&r);
    hl_buf_free(&url);
    return rc;
}

static hl_status s3_list(hl_store *st, hl_store_names *out, char *err, size_t errlen)
{
    s3_store *s = (s3_store *)st;
    hl_status rc = HL_OK;
    hl_buf url, q;
    char token[2048] = "";
    bool more = true;
    memset(out, 0, sizeof *out);
    hl_buf_init(&url, 16384);
    hl_buf_init(&q, 8192);
    for (int page = 0; more && page < S3_MAX_LIST_PAGES && out->n < HL_STORE_LIST_MAX; page++) {
        s3_req r;
        /* canonical: parameters sorted by name */
        hl_buf_reset(&q);
        if (token[0]) {
            hl_buf_adds(&q, "continuation-token=");
            add_encoded(&q, token, 0);
            hl_buf_addc(&q, '&');
        }
        hl_buf_adds(&q, "list-type=2&prefix=");
        add_encoded(&q, s->prefix, 0);
        if ((rc = req_init(&r, s, err, errlen))) {
            req_free(&r);
            break;
        }
        if (hl_buf_status(&q) || url_of(s, NULL, hl_buf_str(&q), &url)) {
            req_free(&r);
            rc = HL_ERR_NOMEM;
            break;
        }
        rc = req_run(&r, "GET", hl_buf_str(&url), "list", err, errlen);
        if (!rc) {
            rc = hl_s3xml_list((const char *)r.resp.data, r.resp.len, s->prefix, out, &more, token, sizeof token);
            if (rc)
                snprintf(err, errlen, "s3 list: %s", rc == HL_ERR_NOMEM ? "out of memory" : "malformed answer");
        }
        req_free(&r);
        if (rc)
            break;
    }
    hl_buf_free(&url);
    hl_buf_free(&q);
    if (rc) {
        hl_store_names_free(out);
        return rc;
    }
    if (out->n)
        hl_store_names_sort(out);
    return HL_OK;
}

static hl_status s3_del(hl_store *st, const char *name, char *err, size_t errlen)
{
    s3_store *s = (s3_store *)st;
    s3_req r;
    hl_buf url;
    if (!hl_snapshot_name_ok(name)) {
        snprintf(err, errlen, "s3: bad name \"%s\"", name);
        return HL_ERR_INVALID;
    }
    hl_buf_init(&url, 16384);
    hl_status rc = req_init(&r, s, err, errlen);
    if (!rc && url_of(s, name, NULL, &url))
        rc = HL_ERR_NOMEM;
    if (!rc) {
        rc = req_run(&r, "DELETE", hl_buf_str(&url), "delete", err, errlen);
        if (rc == HL_ERR_NOT_FOUND)
            rc = HL_OK;
    }
    req_free(&r);
    hl_buf_free(&url);
    return rc;
}

static void s3_destroy(hl_store *st)
{
    s3_store *s = (s3_store *)st;
    free(s->scheme_host);
    free(s->bucket_path);
    free(s->prefix);
    free(s->sigv4);
    free(s->access);
    if (s->secret) {
        explicit_bzero(s->secret, strlen(s->secret));
        free(s->secret);
    }
    if (s->token) {
        explicit_bzero(s->token, strlen(s->token));
        free(s->token);
    }
    free(s->ca_file);
    free(s);
}

static const hl_store_ops s3_ops = {s3_put, s3_get, s3_list, s3_del, s3_destroy};

/* The configured value, else the environment variable, else NULL; "" counts as unset. */
static const char *pick(const char *cfg, const char *env)
{
    if (cfg && cfg[0])
        return cfg;
    const char *v = getenv(env);
    return v && v[0] ? v : NULL;
}

/* Bucket names as S3 allows them: 3 to 63 of [a-z0-9.-], starting and ending alphanumeric. */
static int bucket_ok(const char *b)
{
    size_t n = strlen(b);
    if (n < 3 || n > 63 || !isalnum((unsigned char)b[0]) || !isalnum((unsigned char)b[n - 1]))
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!(islower((unsigned char)b[i]) || isdigit((unsigned char)b[i]) || b[i] == '.' || b[i] == '-'))
            return 0;
    return 1;
}

/* A key prefix: up to 512 bytes of [A-Za-z0-9._-/], no leading '/', no "//", no "." or ".." segment. */
static int prefix_ok(const char *p)
{
    size_t n = strlen(p);
    if (n > 512 || p[0] == '/' || strstr(p, "//"))
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!(isalnum((unsigned char)p[i]) || p[i] == '.' || p[i] == '_' || p[i] == '-' || p[i] == '/'))
            return 0;
    for (const char *seg = p; *seg;) {
        size_t l = strcspn(seg, "/");
        if ((l == 1 && seg[0] == '.') || (l == 2 && seg[0] == '.' && seg[1] == '.'))
            return 0;
        seg += l + (seg[l] == '/');
    }
    return 1;
}

/* The settings hl_store_s3_open resolved from the config and the environment. */
typedef struct s3_settings {
    const char *bucket, *region, *access, *secret, *token, *prefix;
} s3_settings;

/* Refuses names that could not be used safely in a URL or a signature. */
static hl_status check_settings(const s3_settings *v, char *err, size_t errlen)
{
    if (!v->bucket || !v->bucket[0]) {
        snprintf(err, errlen, "snapshot.s3_bucket: expected the bucket's name (snapshot.store is s3)");
        return HL_ERR_CONFIG;
    }
    if (!bucket_ok(v->bucket)) {
        snprintf(err, errlen, "snapshot.s3_bucket: expected 3 to 63 of a-z, 0-9, '.' and '-', got \"%s\"", v->bucket);
        return HL_ERR_CONFIG;
    }
    if (!prefix_ok(v->prefix)) {
        snprintf(err, errlen,
                 "snapshot.s3_prefix: expected up to 512 of A-Z, a-z, 0-9, '.', '_', '-' and '/' with no empty, '.' "
                 "or '..' segment, got \"%s\"",
                 v->prefix);
        return HL_ERR_CONFIG;
    }
    for (const char *p = v->region; *p; p++)
        if (!(isalnum((unsigned char)*p) || *p == '-') || p - v->region > 64) {
            snprintf(err, errlen, "snapshot.s3_region: expected a region name such as eu-west-1");
            return HL_ERR_CONFIG;
        }
    if (!v->access || !v->secret) {
        snprintf(err, errlen,
                 "snapshot.s3_access_key and snapshot.s3_secret_key: expected credentials (or AWS_ACCESS_KEY_ID and "
                 "AWS_SECRET_ACCESS_KEY in the environment)");
        return HL_ERR_CONFIG;
    }
    if (strchr(v->access, ':')) {
        snprintf(err, errlen, "snapshot.s3_access_key: expected an access key id without ':'");
        return HL_ERR_CONFIG;
    }
    return HL_OK;
}

/* Sets *out to "scheme://host[:port]" of the service (the bucket in front of
 * the host unless path style), from snapshot.s3_endpoint or the region's AWS
 * endpoint; the caller frees it. */
static hl_status endpoint_of(const hl_config *c, const s3_settings *v, char **out, char *err, size_t errlen)
{
    hl_status st = HL_ERR_CONFIG;
    CURLU *u = NULL;
    char *scheme = NULL, *host = NULL, *port = NULL, *path = NULL;
    hl_buf b, sh;
    hl_buf_init(&b, 8192);
    hl_buf_init(&sh, 4096);
    if (c->snapshot.s3_endpoint && c->snapshot.s3_endpoint[0])
        hl_buf_adds(&b, c->snapshot.s3_endpoint);
    else
        hl_buf_addf(&b, "https://s3.%s.amazonaws.com", v->region);
    u = curl_url();
    if (!u || hl_buf_status(&b) || curl_url_set(u, CURLUPART_URL, hl_buf_str(&b), 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
        (strcmp(scheme, "http") != 0 && strcmp(scheme, "https") != 0)) {
        snprintf(err, errlen, "snapshot.s3_endpoint: expected an http:// or https:// URL, got \"%s\"", hl_buf_str(&b));
        goto out;
    }
    curl_url_get(u, CURLUPART_PORT, &port, 0);
    curl_url_get(u, CURLUPART_PATH, &path, 0);
    char *user = NULL;
    int has_user = curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK;
    curl_free(user);
    if ((path && strcmp(path, "/") != 0 && path[0]) || has_user) {
        snprintf(err, errlen, "snapshot.s3_endpoint: expected scheme://host[:port] without a path or user, got \"%s\"",
                 hl_buf_str(&b));
        goto out;
    }
    if (c->snapshot.s3_path_style)
        hl_buf_addf(&sh, "%s://%s%s%s", scheme, host, port ? ":" : "", port ? port : "");
    else
        hl_buf_addf(&sh, "%s://%s.%s%s%s", scheme, v->bucket, host, port ? ":" : "", port ? port : "");
    if (hl_buf_status(&sh)) {
        snprintf(err, errlen, "s3: out of memory");
        st = HL_ERR_NOMEM;
        goto out;
    }
    *out = (char *)hl_buf_steal(&sh, NULL);
    st = HL_OK;
out:
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_free(path);
    curl_url_cleanup(u);
    hl_buf_free(&b);
    hl_buf_free(&sh);
    return st;
}

/* A store for v at scheme_host (taken over, also on failure); NULL when out of memory. */
static s3_store *s3_new(const hl_config *c, const s3_settings *v, char *scheme_host)
{
    s3_store *s = calloc(1, sizeof *s);
    if (!s) {
        free(scheme_host);
        return NULL;
    }
    hl_buf sig;
    hl_buf_init(&sig, 256);
    hl_buf_addf(&sig, "aws:amz:%s:s3", v->region);
    s->base.ops = &s3_ops;
    s->scheme_host = scheme_host;
    s->sigv4 = hl_buf_status(&sig) ? NULL : (char *)hl_buf_steal(&sig, NULL);
    hl_buf_free(&sig);
    if (c->snapshot.s3_path_style) {
        size_t bl = strlen(v->bucket) + 2;
        s->bucket_path = malloc(bl);
        if (s->bucket_path)
            snprintf(s->bucket_path, bl, "/%s", v->bucket);
    } else {
        s->bucket_path = strdup("");
    }
    s->prefix = strdup(v->prefix);
    s->access = strdup(v->access);
    s->secret = strdup(v->secret);
    s->token = v->token ? strdup(v->token) : NULL;
    s->ca_file = c->snapshot.s3_ca_file && c->snapshot.s3_ca_file[0] ? strdup(c->snapshot.s3_ca_file) : NULL;
    s->part_size = c->snapshot.s3_part_size > 0 ? (uint64_t)c->snapshot.s3_part_size : 64u << 20;
    snprintf(s->base.where, sizeof s->base.where, "s3://%s/%s", v->bucket, v->prefix);
    if (!s->sigv4 || !s->bucket_path || !s->prefix || !s->access || !s->secret || (v->token && !s->token) ||
        (c->snapshot.s3_ca_file && c->snapshot.s3_ca_file[0] && !s->ca_file)) {
        s3_destroy(&s->base);
        return NULL;
    }
    return s;
}

hl_status hl_store_s3_open(hl_store **out, const hl_config *c, char *err, size_t errlen)
{
    *out = NULL;
    if (hl_store_curl_init(err, errlen))
        return HL_ERR_INTERNAL;
    s3_settings v = {
        .bucket = c->snapshot.s3_bucket,
        .region = pick(c->snapshot.s3_region, "AWS_REGION"),
        .access = pick(c->snapshot.s3_access_key, "AWS_ACCESS_KEY_ID"),
        .secret = pick(c->snapshot.s3_secret_key, "AWS_SECRET_ACCESS_KEY"),
        .token = pick(c->snapshot.s3_session_token, "AWS_SESSION_TOKEN"),
        .prefix = c->snapshot.s3_prefix ? c->snapshot.s3_prefix : "",
    };
    if (!v.region)
        v.region = "us-east-1";
    if (check_settings(&v, err, errlen))
        return HL_ERR_CONFIG;
    char *scheme_host = NULL;
    hl_status st = endpoint_of(c, &v, &scheme_host, err, errlen);
    if (st)
        return st;
    s3_store *s = s3_new(c, &v, scheme_host);
    if (!s) {
        snprintf(err, errlen, "s3: out of memory");
        return HL_ERR_NOMEM;
    }
    *out = &s->base;
    return HL_OK;
}
