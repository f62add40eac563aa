/*
 * store_webdav.c - snapshots in a WebDAV collection (RFC 4918), through
 * libcurl: nginx's dav modules, Apache mod_dav, Nextcloud, rclone serve ...
 *
 * put uploads ".<name>.tmp-<random>" and MOVEs it onto name (Overwrite: F),
 * so a reader (which never lists dot names) sees the whole file or nothing,
 * whatever the server does with a PUT in progress; a failed upload deletes
 * its temporary resource. list is a PROPFIND with Depth: 1 whose hrefs are
 * read with the bounded XML reader of s3xml.c.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include <curl/curl.h>

#include "common/buf.h"
#include "snapshot/manifest.h"
#include "snapshot/s3xml.h"
#include "snapshot/store.h"

#define DAV_CONNECT_TIMEOUT_S 15L
#define DAV_STALL_S 60L
#define DAV_MAX_RESPONSE (16u << 20) /* bytes of a PROPFIND answer kept at most */
#define DAV_MAX_HREFS 200000

typedef struct dav_store {
    hl_store base;
    char *url;  /* collection URL, ending in '/' */
    char *path; /* its path, ending in '/', to recognise the hrefs of its members */
    char *user, *password, *ca_file;
} dav_store;

typedef struct dav_req {
    CURL *curl;
    struct curl_slist *headers;
    char errbuf[CURL_ERROR_SIZE];
    long status;
    const hl_store_src *src;
    uint64_t sent;
    hl_buf resp;
    hl_store_sink sink;
    void *ctx;
    uint64_t max, got;
    hl_status sink_err;
    hl_progress *pr;
} dav_req;

static size_t on_read(char *buf, size_t size, size_t nitems, void *arg)
{
    dav_req *r = arg;
    uint64_t left = r->src->size - r->sent;
    size_t want = size * nitems < left ? size * nitems : (size_t)left;
    if (want == 0)
        return 0;
    if (r->src->fd < 0) {
        memcpy(buf, (const char *)r->src->mem + r->sent, want);
        r->sent += want;
        return want;
    }
    ssize_t n = pread(r->src->fd, buf, want, (off_t)r->sent);
    if (n <= 0)
        return CURL_READFUNC_ABORT;
    r->sent += (uint64_t)n;
    return (size_t)n;
}

static int on_seek(void *arg, curl_off_t offset, int origin)
{
    dav_req *r = arg;
    if (origin != SEEK_SET || offset < 0 || (uint64_t)offset > r->src->size)
        return CURL_SEEKFUNC_CANTSEEK;
    r->sent = (uint64_t)offset;
    return CURL_SEEKFUNC_OK;
}

static size_t on_write(char *data, size_t size, size_t nmemb, void *arg)
{
    dav_req *r = arg;
    size_t n = size * nmemb;
    long code = 0;
    curl_easy_getinfo(r->curl, CURLINFO_RESPONSE_CODE, &code);
    if (r->sink && code >= 200 && code < 300) {
        if (n > r->max - r->got) {
            r->sink_err = HL_ERR_TOO_LARGE;
            return 0;
        }
        r->got += n;
        if ((r->sink_err = r->sink(r->ctx, data, n)))
            return 0;
        return n;
    }
    return hl_buf_add(&r->resp, data, n) ? 0 : n;
}

static int on_progress(void *arg, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
    dav_req *r = arg;
    (void)dltotal;
    (void)ultotal;
    if (r->pr)
        hl_progress_update(r->pr, (uint64_t)(ulnow > dlnow ? ulnow : dlnow));
    return hl_store_cancelled() ? 1 : 0; /* a stopping node: abort the transfer */
}

static hl_status req_init(dav_req *r, const dav_store *s)
{
    memset(r, 0, sizeof *r);
    hl_buf_init(&r->resp, DAV_MAX_RESPONSE);
    r->curl = curl_easy_init();
    if (!r->curl)
        return HL_ERR_NOMEM;
    CURL *c = r->curl;
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    if (s->user) {
        curl_easy_setopt(c, CURLOPT_USERNAME, s->user);
        curl_easy_setopt(c, CURLOPT_PASSWORD, s->password ? s->password : "");
        curl_easy_setopt(c, CURLOPT_HTTPAUTH, (long)(CURLAUTH_BASIC | CURLAUTH_DIGEST));
    }
    if (s->ca_file)
        curl_easy_setopt(c, CURLOPT_CAINFO, s->ca_file);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, DAV_CONNECT_TIMEOUT_S);
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, DAV_STALL_S);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, r);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    return HL_OK;
}

static void req_free(dav_req *r)
{
    if (r->curl)
        curl_easy_cleanup(r->curl);
    curl_slist_free_all(r->headers);
    hl_buf_free(&r->resp);
}

static hl_status req_header(dav_req *r, const char *h)
{
    struct curl_slist *l = curl_slist_append(r->headers, h);
    if (!l)
        return HL_ERR_NOMEM;
    r->headers = l;
    return HL_OK;
}

/* Runs r with method on the collection URL + name (NULL: the collection). */
static hl_status req_run(dav_req *r, const dav_store *s, const char *method, const char *name, const char *what,
                         char *err, size_t errlen)
{
    hl_buf url;
    hl_buf_init(&url, 16384);
    hl_buf_adds(&url, s->url);
    if (name)
        hl_buf_adds(&url, name);
    if (hl_buf_status(&url)) {
        hl_buf_free(&url);
        snprintf(err, errlen, "webdav %s: out of memory", what);
        return HL_ERR_NOMEM;
    }
    curl_easy_setopt(r->curl, CURLOPT_URL, hl_buf_str(&url));
    if (strcmp(method, "GET") != 0 && strcmp(method, "PUT") != 0)
        curl_easy_setopt(r->curl, CURLOPT_CUSTOMREQUEST, method);
    if (r->headers)
        curl_easy_setopt(r->curl, CURLOPT_HTTPHEADER, r->headers);
    CURLcode cc = curl_easy_perform(r->curl);
    hl_buf_free(&url);
    curl_easy_getinfo(r->curl, CURLINFO_RESPONSE_CODE, &r->status);
    if (r->sink_err) {
        snprintf(err, errlen, "webdav %s: %s", what,
                 r->sink_err == HL_ERR_TOO_LARGE ? "larger than expected" : "stopped by the reader");
        return r->sink_err;
    }
    if (cc != CURLE_OK) {
        snprintf(err, errlen, "webdav %s: %s", what, r->errbuf[0] ? r->errbuf : curl_easy_strerror(cc));
        return HL_ERR_IO;
    }
    if (r->status < 200 || r->status > 299) {
        snprintf(err, errlen, "webdav %s: HTTP %ld", what, r->status);
        if (r->status == 404)
            return HL_ERR_NOT_FOUND;
        if (r->status >= 400 && r->status < 500 && r->status != 408 && r->status != 429)
            return HL_ERR_INVALID;
        return HL_ERR_IO;
    }
    return HL_OK;
}

static hl_status dav_del_any(dav_store *s, const char *name, char *err, size_t errlen)
{
    dav_req r;
    hl_status rc = req_init(&r, s);
    if (!rc) {
        curl_easy_setopt(r.curl, CURLOPT_NOBODY, 0L);
        rc = req_run(&r, s, "DELETE", name, "delete", err, errlen);
        if (rc == HL_ERR_NOT_FOUND)
            rc = HL_OK;
    }
    req_free(&r);
    return rc;
}

static hl_status dav_put(hl_store *st, const char *name, const hl_store_src *src, char *err, size_t errlen)
{
    dav_store *s = (dav_store *)st;
    dav_req r;
    char tmp[HL_SNAPSHOT_NAME_MAX + 32];
    uint32_t rnd = 0;
    if (!hl_snapshot_name_ok(name)) {
        snprintf(err, errlen, "webdav: bad name \"%s\"", name);
        return HL_ERR_INVALID;
    }
    if (getrandom(&rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd)
        rnd = (uint32_t)getpid();
    snprintf(tmp, sizeof tmp, ".%s.tmp-%08x", name, rnd);
    hl_progress pr;
    hl_progress_start(&pr, "upload", name, src->size);
    hl_status rc = req_init(&r, s);
    if (!rc)
        rc = req_header(&r, "Expect:");
    if (!rc) {
        r.src = src;
        r.pr = &pr;
        curl_easy_setopt(r.curl, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(r.curl, CURLOPT_READFUNCTION, on_read);
        curl_easy_setopt(r.curl, CURLOPT_READDATA, &r);
        curl_easy_setopt(r.curl, CURLOPT_SEEKFUNCTION, on_seek);
        curl_easy_setopt(r.curl, CURLOPT_SEEKDATA, &r);
        curl_easy_setopt(r.curl, CURLOPT_INFILESIZE_LARGE, (curl_off_t)src->size);
        rc = req_run(&r, s, "PUT", tmp, "upload", err, errlen);
    }
    req_free(&r);
    if (!rc) {
        hl_buf dest;
        hl_buf_init(&dest, 16384);
        hl_buf_addf(&dest, "Destination: %s%s", s->url, name);
        rc = req_init(&r, s);
        if (!rc)
            rc = hl_buf_status(&dest);
        if (!rc)
            rc = req_header(&r, hl_buf_str(&dest));
        if (!rc)
            rc = req_header(&r, "Overwrite: F");
        if (!rc)
            rc = req_run(&r, s, "MOVE", tmp, "move into place", err, errlen);
        else
            snprintf(err, errlen, "webdav: out of memory");
        req_free(&r);
        hl_buf_free(&dest);
    }
    if (rc) {
        char e2[256];
        dav_del_any(s, tmp, e2, sizeof e2); /* best effort: a dot name no reader lists */
    }
    return rc;
}

static hl_status dav_get(hl_store *st, const char *name, uint64_t max, hl_store_sink sink, void *ctx, char *err,
                         size_t errlen)
{
    dav_store *s = (dav_store *)st;
    dav_req r;
    hl_progress pr;
    if (!hl_snapshot_name_ok(name)) {
        snprintf(err, errlen, "webdav: bad name \"%s\"", name);
        return HL_ERR_INVALID;
    }
    hl_progress_start(&pr, "download", name, max);
    hl_status rc = req_init(&r, s);
    if (!rc) {
        r.sink = sink;
        r.ctx = ctx;
        r.max = max;
        r.pr = &pr;
        rc = req_run(&r, s, "GET", name, "download", err, errlen);
    } else {
        snprintf(err, errlen, "webdav: out of memory");
    }
    req_free(&r);
    return rc;
}

typedef struct href_ctx {
    const dav_store *s;
    hl_store_names *out;
    size_t cap;
} href_ctx;

static int hexval(char c)
{
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

/* One href of a PROPFIND answer: a member of the collection when its path is the collection's plus a name. */
static hl_status on_href(void *arg, const char *href)
{
    href_ctx *h = arg;
    char name[HL_SNAPSHOT_NAME_MAX + 1];
    /* an absolute URL or an absolute path; only the path counts */
    const char *p = href;
    const char *scheme = strstr(href, "://");
    if (scheme) {
        p = strchr(scheme + 3, '/');
        if (!p)
            return HL_OK;
    }
    size_t pl = strlen(h->s->path);
    if (strncmp(p, h->s->path, pl) != 0)
        return HL_OK;
    p += pl;
    size_t n = 0;
    for (; *p && n < sizeof name - 1; p++) {
        if (*p == '%') {
            int a = hexval(p[1]), b = a < 0 ? -1 : hexval(p[2]);
            if (a < 0 || b < 0)
                return HL_OK;
            name[n++] = (char)(a * 16 + b);
            p += 2;
        } else {
            name[n++] = *p;
        }
    }
    if (*p)
        return HL_OK;
    name[n] = 0;
    if (!hl_snapshot_name_ok(name) || h->out->n >= HL_STORE_LIST_MAX)
        return HL_OK; /* the collection itself, sub-collections, dot names, other things */
    if (h->out->n == h->cap) {
        h->cap = h->cap ? h->cap * 2 : 64;
        char **nv = realloc(h->out->v, h->cap * sizeof *nv);
        if (!nv)
            return HL_ERR_NOMEM;
        h->out->v = nv;
    }
    if (!(h->out->v[h->out->n] = strdup(name)))
        return HL_ERR_NOMEM;
    h->out->n++;
    return HL_OK;
}

static hl_status dav_list(hl_store *st, hl_store_names *out, char *err, size_t errlen)
{
    static const char body[] = "<?xml version=\"1.0\" encoding=\"utf-8\"?>"
                               "<D:propfind xmlns:D=\"DAV:\"><D:prop><D:resourcetype/></D:prop></D:propfind>";
    dav_store *s = (dav_store *)st;
    dav_req r;
    memset(out, 0, sizeof *out);
    hl_status rc = req_init(&r, s);
    if (!rc)
        rc = req_header(&r, "Depth: 1");
    if (!rc)
        rc = req_header(&r, "Content-Type: application/xml; charset=utf-8");
    if (rc) {
        req_free(&r);
        snprintf(err, errlen, "webdav: out of memory");
        return rc;
    }
    curl_easy_setopt(r.curl, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(r.curl, CURLOPT_POSTFIELDSIZE, (long)(sizeof body - 1));
    rc = req_run(&r, s, "PROPFIND", NULL, "list", err, errlen);
    if (!rc && r.status != 207) {
        snprintf(err, errlen, "webdav list: HTTP %ld, expected 207 Multi-Status (is it a WebDAV collection?)",
                 r.status);
        rc = HL_ERR_DECODE;
    }
    if (!rc) {
        href_ctx h = {s, out, 0};
        rc = hl_xml_each((const char *)r.resp.data, r.resp.len, "href", 4096, DAV_MAX_HREFS, on_href, &h);
        if (rc)
            snprintf(err, errlen, "webdav list: %s",
                     rc == HL_ERR_NOMEM ? "out of memory" : "malformed or oversized PROPFIND answer");
    }
    req_free(&r);
    if (rc) {
        hl_store_names_free(out);
        return rc;
    }
    if (out->n)
        hl_store_names_sort(out);
    return HL_OK;
}

static hl_status dav_del(hl_store *st, const char *name, char *err, size_t errlen)
{
    if (!hl_snapshot_name_ok(name)) {
        snprintf(err, errlen, "webdav: bad name \"%s\"", name);
        return HL_ERR_INVALID;
    }
    return dav_del_any((dav_store *)st, name, err, errlen);
}

static void dav_destroy(hl_store *st)
{
    dav_store *s = (dav_store *)st;
    free(s->url);
    free(s->path);
    free(s->user);
    if (s->password) {
        explicit_bzero(s->password, strlen(s->password));
        free(s->password);
    }
    free(s->ca_file);
    free(s);
}

static const hl_store_ops dav_ops = {dav_put, dav_get, dav_list, dav_del, dav_destroy};

/* A collection path: absolute, of unreserved characters and '/', no "." or ".." segment. */
static int path_ok(const char *p)
{
    if (!p || p[0] != '/' || strlen(p) > 1024)
        return 0;
    for (const char *c = p; *c; c++)
        if (!(isalnum((unsigned char)*c) || *c == '.' || *c == '_' || *c == '-' || *c == '/' || *c == '~'))
            return 0;
    for (const char *seg = p + 1; *seg;) {
        size_t l = strcspn(seg, "/");
        if ((l == 1 && seg[0] == '.') || (l == 2 && seg[0] == '.' && seg[1] == '.'))
            return 0;
        seg += l + (seg[l] == '/');
    }
    return 1;
}

hl_status hl_store_webdav_open(hl_store **out, const hl_config *c, char *err, size_t errlen)
{
    hl_status st = HL_ERR_CONFIG;
    CURLU *u = NULL;
    char *scheme = NULL, *host = NULL, *port = NULL, *path = NULL, *query = NULL, *user = NULL;
    *out = NULL;
    if (hl_store_curl_init(err, errlen))
        return HL_ERR_INTERNAL;
    const char *url = c->snapshot.webdav_url;
    if (!url || !url[0]) {
        snprintf(err, errlen,
                 "snapshot.webdav_url: expected https://host[:port]/collection/ (snapshot.store is "
                 "webdav)");
        return HL_ERR_CONFIG;
    }
    u = curl_url();
    if (!u || curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
        (strcmp(scheme, "http") != 0 && strcmp(scheme, "https") != 0) ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_PATH, &path, 0) != CURLUE_OK || !path_ok(path) ||
        curl_url_get(u, CURLUPART_QUERY, &query, 0) == CURLUE_OK ||
        curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK) {
        snprintf(err, errlen,
                 "snapshot.webdav_url: expected http(s)://host[:port]/path/ with a path of A-Z, a-z, 0-9, '.', '_', "
                 "'-', '~' and '/', no user, query or '..', got \"%s\"",
                 url);
        goto out;
    }
    curl_url_get(u, CURLUPART_PORT, &port, 0);
    dav_store *s = calloc(1, sizeof *s);
    if (!s) {
        st = HL_ERR_NOMEM;
        snprintf(err, errlen, "webdav: out of memory");
        goto out;
    }
    hl_buf b, p;
    hl_buf_init(&b, 8192);
    hl_buf_init(&p, 4096);
    hl_buf_adds(&p, path);
    if (p.len && p.data[p.len - 1] != '/')
        hl_buf_addc(&p, '/');
    hl_buf_addf(&b, "%s://%s%s%s%s", scheme, host, port ? ":" : "", port ? port : "", hl_buf_str(&p));
    s->base.ops = &dav_ops;
    s->url = hl_buf_status(&b) ? NULL : (char *)hl_buf_steal(&b, NULL);
    s->path = hl_buf_status(&p) ? NULL : (char *)hl_buf_steal(&p, NULL);
    hl_buf_free(&b);
    hl_buf_free(&p);
    int has_user = c->snapshot.webdav_user && c->snapshot.webdav_user[0];
    int has_pw = c->snapshot.webdav_password && c->snapshot.webdav_password[0];
    int has_ca = c->snapshot.webdav_ca_file && c->snapshot.webdav_ca_file[0];
    s->user = has_user ? strdup(c->snapshot.webdav_user) : NULL;
    s->password = has_pw ? strdup(c->snapshot.webdav_password) : NULL;
    s->ca_file = has_ca ? strdup(c->snapshot.webdav_ca_file) : NULL;
    if (!s->url || !s->path || (has_user && !s->user) || (has_pw && !s->password) || (has_ca && !s->ca_file)) {
        dav_destroy(&s->base);
        st = HL_ERR_NOMEM;
        snprintf(err, errlen, "webdav: out of memory");
        goto out;
    }
    snprintf(s->base.where, sizeof s->base.where, "%s", s->url);
    *out = &s->base;
    st = HL_OK;
out:
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_free(path);
    curl_free(query);
    curl_free(user);
    curl_url_cleanup(u);
    return st;
}
