/*
 * store_sftp.c - snapshots in a directory on an SSH server, through libcurl's
 * SFTP (libssh2).
 *
 * The server's host key must be in snapshot.sftp_known_hosts: an unknown or
 * changed key is refused, never added. put uploads ".<name>.tmp-<random>"
 * and renames it to name in the same session, so a reader (which never lists
 * dot files) sees the whole file or nothing; a failed upload removes its
 * temporary file. SFTP has no portable fsync: durability is the server's.
 */
#include <ctype.h>
#include <errno.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <curl/curl.h>

#include "common/buf.h"
#include "snapshot/manifest.h"
#include "snapshot/store.h"

#define SFTP_CONNECT_TIMEOUT_S 15L
#define SFTP_STALL_S 60L
#define SFTP_MAX_LISTING (16u << 20) /* bytes of a directory listing kept at most */

typedef struct sftp_store {
    hl_store base;
    char *origin; /* "sftp://host:port" */
    char *dir;    /* "/path/to/dir/" */
    char *user, *password, *key_file, *passphrase, *known_hosts;
} sftp_store;

typedef struct sftp_req {
    CURL *curl;
    char errbuf[CURL_ERROR_SIZE];
    const hl_store_src *src;
    uint64_t sent;
    hl_buf listing;
    hl_store_sink sink;
    void *ctx;
    uint64_t max, got;
    hl_status sink_err;
    hl_progress *pr;
    struct curl_slist *quote;
} sftp_req;

/* Only keys already in known_hosts: a missing or different key is refused. */
static int on_hostkey(CURL *easy, const struct curl_khkey *known, const struct curl_khkey *found,
                      enum curl_khmatch match, void *arg)
{
    (void)easy;
    (void)known;
    (void)found;
    (void)arg;
    return match == CURLKHMATCH_OK ? CURLKHSTAT_FINE : CURLKHSTAT_REJECT;
}

static size_t on_read(char *buf, size_t size, size_t nitems, void *arg)
{
    sftp_req *r = arg;
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

static size_t on_write(char *data, size_t size, size_t nmemb, void *arg)
{
    sftp_req *r = arg;
    size_t n = size * nmemb;
    if (!r->sink)
        return hl_buf_add(&r->listing, data, n) ? 0 : n;
    if (n > r->max - r->got) {
        r->sink_err = HL_ERR_TOO_LARGE;
        return 0;
    }
    r->got += n;
    if ((r->sink_err = r->sink(r->ctx, data, n)))
        return 0;
    return n;
}

static int on_progress(void *arg, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
    sftp_req *r = arg;
    (void)dltotal;
    (void)ultotal;
    if (r->pr)
        hl_progress_update(r->pr, (uint64_t)(ulnow > dlnow ? ulnow : dlnow));
    return hl_store_cancelled() ? 1 : 0; /* a stopping node: abort the transfer */
}

static hl_status req_init(sftp_req *r, const sftp_store *s)
{
    memset(r, 0, sizeof *r);
    hl_buf_init(&r->listing, SFTP_MAX_LISTING);
    r->curl = curl_easy_init();
    if (!r->curl)
        return HL_ERR_NOMEM;
    CURL *c = r->curl;
    long auth = 0;
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "sftp");
    curl_easy_setopt(c, CURLOPT_USERNAME, s->user);
    if (s->password) {
        curl_easy_setopt(c, CURLOPT_PASSWORD, s->password);
        auth |= CURLSSH_AUTH_PASSWORD | CURLSSH_AUTH_KEYBOARD;
    }
    if (s->key_file) {
        curl_easy_setopt(c, CURLOPT_SSH_PRIVATE_KEYFILE, s->key_file);
        if (s->passphrase)
            curl_easy_setopt(c, CURLOPT_KEYPASSWD, s->passphrase);
        auth |= CURLSSH_AUTH_PUBLICKEY;
    }
    curl_easy_setopt(c, CURLOPT_SSH_AUTH_TYPES, auth);
    curl_easy_setopt(c, CURLOPT_SSH_KNOWNHOSTS, s->known_hosts);
    curl_easy_setopt(c, CURLOPT_SSH_KEYFUNCTION, on_hostkey);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, SFTP_CONNECT_TIMEOUT_S);
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, SFTP_STALL_S);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_progress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, r);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    return HL_OK;
}

static void req_free(sftp_req *r)
{
    if (r->curl)
        curl_easy_cleanup(r->curl);
    curl_slist_free_all(r->quote);
    hl_buf_free(&r->listing);
}

/* Runs r on the URL of path (NULL: the directory itself); maps curl's result to a status and a message. */
static hl_status req_run(sftp_req *r, const sftp_store *s, const char *path, const char *what, char *err, size_t errlen)
{
    hl_buf url;
    hl_buf_init(&url, 8192);
    hl_buf_adds(&url, s->origin);
    hl_buf_adds(&url, s->dir);
    if (path)
        hl_buf_adds(&url, path);
    if (hl_buf_status(&url)) {
        hl_buf_free(&url);
        snprintf(err, errlen, "sftp %s: out of memory", what);
        return HL_ERR_NOMEM;
    }
    curl_easy_setopt(r->curl, CURLOPT_URL, hl_buf_str(&url));
    CURLcode cc = curl_easy_perform(r->curl);
    hl_buf_free(&url);
    if (r->sink_err) {
        snprintf(err, errlen, "sftp %s: %s", what,
                 r->sink_err == HL_ERR_TOO_LARGE ? "larger than expected" : "stopped by the reader");
        return r->sink_err;
    }
    if (cc == CURLE_OK)
        return HL_OK;
    if (cc == CURLE_PEER_FAILED_VERIFICATION)
        snprintf(err, errlen, "sftp %s: the server's host key is not in snapshot.sftp_known_hosts (%s)", what,
                 s->known_hosts);
    else
        snprintf(err, errlen, "sftp %s: %s", what, r->errbuf[0] ? r->errbuf : curl_easy_strerror(cc));
    if (cc == CURLE_REMOTE_FILE_NOT_FOUND)
        return HL_ERR_NOT_FOUND;
    /* the server's key, the credentials or the path are wrong: trying again will not help */
    if (cc == CURLE_PEER_FAILED_VERIFICATION || cc == CURLE_LOGIN_DENIED || cc == CURLE_REMOTE_ACCESS_DENIED ||
        cc == CURLE_SSH)
        return cc == CURLE_SSH ? HL_ERR_IO : HL_ERR_INVALID;
    return HL_ERR_IO;
}

static hl_status quote_one(sftp_req *r, const char *cmd, const sftp_store *s, const char *a, const char *b)
{
    hl_buf q;
    hl_buf_init(&q, 8192);
    hl_buf_addf(&q, "%s \"%s%s\"", cmd, s->dir, a);
    if (b)
        hl_buf_addf(&q, " \"%s%s\"", s->dir, b);
    hl_status st = hl_buf_status(&q);
    if (!st) {
        struct curl_slist *l = curl_slist_append(r->quote, hl_buf_str(&q));
        if (l)
            r->quote = l;
        else
            st = HL_ERR_NOMEM;
    }
    hl_buf_free(&q);
    return st;
}

static hl_status sftp_del(hl_store *st, const char *name, char *err, size_t errlen);

static hl_status sftp_put(hl_store *st, const char *name, const hl_store_src *src, char *err, size_t errlen)
{
    sftp_store *s = (sftp_store *)st;
    sftp_req r;
    char tmp[HL_SNAPSHOT_NAME_MAX + 32];
    uint32_t rnd = 0;
    if (!hl_snapshot_name_ok(name)) {
        snprintf(err, errlen, "sftp: bad name \"%s\"", name);
        return HL_ERR_INVALID;
    }
    if (getrandom(&rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd)
        rnd = (uint32_t)getpid();
    snprintf(tmp, sizeof tmp, ".%s.tmp-%08x", name, rnd);
    hl_progress pr;
    hl_progress_start(&pr, "upload", name, src->size);
    hl_status rc = req_init(&r, s);
    if (!rc)
        rc = quote_one(&r, "rename", s, tmp, name);
    if (rc) {
        req_free(&r);
        snprintf(err, errlen, "sftp: out of memory");
        return rc;
    }
    r.src = src;
    r.pr = &pr;
    curl_easy_setopt(r.curl, CURLOPT_UPLOAD, 1L);
    curl_easy_setopt(r.curl, CURLOPT_READFUNCTION, on_read);
    curl_easy_setopt(r.curl, CURLOPT_READDATA, &r);
    curl_easy_setopt(r.curl, CURLOPT_INFILESIZE_LARGE, (curl_off_t)src->size);
    curl_easy_setopt(r.curl, CURLOPT_NEW_FILE_PERMS, 0644L);
    curl_easy_setopt(r.curl, CURLOPT_POSTQUOTE, r.quote); /* after the upload, in the same session */
    rc = req_run(&r, s, tmp, "upload", err, errlen);
    req_free(&r);
    if (rc) {
        /* best effort: the temporary file is a dot file no reader lists */
        char e2[256];
        sftp_del(st, tmp + 0, e2, sizeof e2);
    }
    return rc;
}

static hl_status sftp_get(hl_store *st, const char *name, uint64_t max, hl_store_sink sink, void *ctx, char *err,
                          size_t errlen)
{
    sftp_store *s = (sftp_store *)st;
    sftp_req r;
    hl_progress pr;
    if (!hl_snapshot_name_ok(name)) {
        snprintf(err, errlen, "sftp: bad name \"%s\"", name);
        return HL_ERR_INVALID;
    }
    hl_progress_start(&pr, "download", name, max);
    hl_status rc = req_init(&r, s);
    if (!rc) {
        r.sink = sink;
        r.ctx = ctx;
        r.max = max;
        r.pr = &pr;
        rc = req_run(&r, s, name, "download", err, errlen);
    } else {
        snprintf(err, errlen, "sftp: out of memory");
    }
    req_free(&r);
    return rc;
}

static hl_status sftp_list(hl_store *st, hl_store_names *out, char *err, size_t errlen)
{
    sftp_store *s = (sftp_store *)st;
    sftp_req r;
    size_t cap = 0;
    memset(out, 0, sizeof *out);
    hl_status rc = req_init(&r, s);
    if (rc) {
        req_free(&r);
        snprintf(err, errlen, "sftp: out of memory");
        return rc;
    }
    curl_easy_setopt(r.curl, CURLOPT_DIRLISTONLY, 1L);
    rc = req_run(&r, s, NULL, "list", err, errlen);
    const char *p = (const char *)r.listing.data, *end = p + r.listing.len;
    while (!rc && p && p < end && out->n < HL_STORE_LIST_MAX) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = (size_t)((nl ? nl : end) - p);
        char name[HL_SNAPSHOT_NAME_MAX + 2];
        if (n && p[n - 1] == '\r')
            n--;
        if (n > 0 && n <= HL_SNAPSHOT_NAME_MAX) {
            memcpy(name, p, n);
            name[n] = 0;
            if (hl_snapshot_name_ok(name)) {
                if (out->n == cap) {
                    cap = cap ? cap * 2 : 64;
                    char **nv = realloc(out->v, cap * sizeof *nv);
                    if (!nv) {
                        rc = HL_ERR_NOMEM;
                        break;
                    }
                    out->v = nv;
                }
                if (!(out->v[out->n] = strdup(name))) {
                    rc = HL_ERR_NOMEM;
                    break;
                }
                out->n++;
            }
        }
        p = nl ? nl + 1 : end;
    }
    req_free(&r);
    if (rc) {
        if (rc == HL_ERR_NOMEM)
            snprintf(err, errlen, "sftp list: out of memory");
        hl_store_names_free(out);
        return rc;
    }
    if (out->n)
        hl_store_names_sort(out);
    return HL_OK;
}

/* Removes name; names are checked by the callers (a temporary dot file from put is allowed here). */
static hl_status sftp_del(hl_store *st, const char *name, char *err, size_t errlen)
{
    sftp_store *s = (sftp_store *)st;
    sftp_req r;
    if (!hl_snapshot_name_ok(name + (name[0] == '.')) || strchr(name, '/')) {
        snprintf(err, errlen, "sftp: bad name \"%s\"", name);
        return HL_ERR_INVALID;
    }
    hl_status rc = req_init(&r, s);
    if (!rc)
        rc = quote_one(&r, "rm", s, name, NULL);
    if (!rc) {
        curl_easy_setopt(r.curl, CURLOPT_NOBODY, 1L);
        curl_easy_setopt(r.curl, CURLOPT_QUOTE, r.quote);
        rc = req_run(&r, s, NULL, "delete", err, errlen);
    }
    req_free(&r);
    if (rc && rc != HL_ERR_NOMEM) {
        /* "rm" fails for a file that is not there: that is not an error */
        sftp_req q;
        if (!req_init(&q, s)) {
            char e2[256];
            curl_easy_setopt(q.curl, CURLOPT_NOBODY, 1L);
            if (req_run(&q, s, name, "stat", e2, sizeof e2) == HL_ERR_NOT_FOUND)
                rc = HL_OK;
        }
        req_free(&q);
    }
    return rc;
}

static void sftp_destroy(hl_store *st)
{
    sftp_store *s = (sftp_store *)st;
    free(s->origin);
    free(s->dir);
    free(s->user);
    if (s->password) {
        explicit_bzero(s->password, strlen(s->password));
        free(s->password);
    }
    free(s->key_file);
    if (s->passphrase) {
        explicit_bzero(s->passphrase, strlen(s->passphrase));
        free(s->passphrase);
    }
    free(s->known_hosts);
    free(s);
}

static const hl_store_ops sftp_ops = {sftp_put, sftp_get, sftp_list, sftp_del, sftp_destroy};

/* A directory path as the server sees it: absolute, of [A-Za-z0-9._-/~], no "." or ".." segment. */
static int dir_ok(const char *p)
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

/* Parses snapshot.sftp_url into origin ("sftp://host[:port]") and dir (the
 * absolute directory, ending in '/'). */
static hl_status parse_url(const char *url, hl_buf *origin, hl_buf *dir, char *err, size_t errlen)
{
    hl_status st = HL_ERR_CONFIG;
    char *scheme = NULL, *host = NULL, *port = NULL, *path = NULL, *query = NULL, *user = NULL;
    CURLU *u = curl_url();
    if (!u || curl_url_set(u, CURLUPART_URL, url, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK || strcmp(scheme, "sftp") != 0 ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_PATH, &path, 0) != CURLUE_OK || !dir_ok(path) ||
        curl_url_get(u, CURLUPART_QUERY, &query, 0) == CURLUE_OK ||
        curl_url_get(u, CURLUPART_USER, &user, 0) == CURLUE_OK) {
        snprintf(err, errlen,
                 "snapshot.sftp_url: expected sftp://host[:port]/directory with an absolute path of A-Z, a-z, 0-9, "
                 "'.', '_', '-', '~' and '/', no user, query or '..', got \"%s\"",
                 url);
        goto out;
    }
    curl_url_get(u, CURLUPART_PORT, &port, 0);
    hl_buf_addf(origin, "sftp://%s%s%s", host, port ? ":" : "", port ? port : "");
    hl_buf_adds(dir, path);
    if (dir->len && dir->data[dir->len - 1] != '/')
        hl_buf_addc(dir, '/');
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

/* The login: snapshot.sftp_user, else USER, else the process's user; the
 * known_hosts file (snapshot.sftp_known_hosts, else ~/.ssh/known_hosts, put
 * in kh) must exist, and so must a password or a key file. */
static hl_status check_login(const hl_config *c, char *kh, size_t khlen, const char **known, const char **login,
                             char *err, size_t errlen)
{
    *known = c->snapshot.sftp_known_hosts;
    if (!*known || !(*known)[0]) {
        const char *home = getenv("HOME");
        snprintf(kh, khlen, "%s/.ssh/known_hosts", home && home[0] ? home : "");
        *known = kh;
    }
    struct stat sb;
    if (stat(*known, &sb) != 0) {
        snprintf(err, errlen,
                 "snapshot.sftp_known_hosts: expected a known_hosts file holding the server's key, \"%s\": %s", *known,
                 strerror(errno));
        return HL_ERR_CONFIG;
    }
    *login = c->snapshot.sftp_user && c->snapshot.sftp_user[0] ? c->snapshot.sftp_user : getenv("USER");
    if (!*login || !(*login)[0]) {
        struct passwd *pw = getpwuid(getuid());
        *login = pw ? pw->pw_name : NULL;
    }
    if (!*login || !(*login)[0]) {
        snprintf(err, errlen, "snapshot.sftp_user: expected a user name (or USER in the environment)");
        return HL_ERR_CONFIG;
    }
    int has_pw = c->snapshot.sftp_password && c->snapshot.sftp_password[0];
    int has_key = c->snapshot.sftp_key_file && c->snapshot.sftp_key_file[0];
    if (!has_pw && !has_key) {
        snprintf(err, errlen, "snapshot.sftp_key_file or snapshot.sftp_password: expected one of them to log in");
        return HL_ERR_CONFIG;
    }
    if (has_key && stat(c->snapshot.sftp_key_file, &sb) != 0) {
        snprintf(err, errlen, "snapshot.sftp_key_file: expected a private key file, \"%s\": %s",
                 c->snapshot.sftp_key_file, strerror(errno));
        return HL_ERR_CONFIG;
    }
    return HL_OK;
}

/* A store from the checked settings; origin and dir are taken over (also on
 * failure). NULL when out of memory. */
static sftp_store *sftp_new(const hl_config *c, char *origin, char *dir, const char *login, const char *known)
{
    sftp_store *s = calloc(1, sizeof *s);
    if (!s) {
        free(origin);
        free(dir);
        return NULL;
    }
    s->base.ops = &sftp_ops;
    s->origin = origin;
    s->dir = dir;
    int has_pw = c->snapshot.sftp_password && c->snapshot.sftp_password[0];
    int has_key = c->snapshot.sftp_key_file && c->snapshot.sftp_key_file[0];
    s->user = strdup(login);
    s->password = has_pw ? strdup(c->snapshot.sftp_password) : NULL;
    s->key_file = has_key ? strdup(c->snapshot.sftp_key_file) : NULL;
    int has_phrase = has_key && c->snapshot.sftp_key_passphrase && c->snapshot.sftp_key_passphrase[0];
    s->passphrase = has_phrase ? strdup(c->snapshot.sftp_key_passphrase) : NULL;
    s->known_hosts = strdup(known);
    if (!s->origin || !s->dir || !s->user || (has_pw && !s->password) || (has_key && !s->key_file) ||
        (has_phrase && !s->passphrase) || !s->known_hosts) {
        sftp_destroy(&s->base);
        return NULL;
    }
    snprintf(s->base.where, sizeof s->base.where, "%s%s", s->origin, s->dir);
    return s;
}

hl_status hl_store_sftp_open(hl_store **out, const hl_config *c, char *err, size_t errlen)
{
    char kh[4096];
    const char *known = NULL, *login = NULL;
    hl_buf o, d;
    *out = NULL;
    if (hl_store_curl_init(err, errlen))
        return HL_ERR_INTERNAL;
    const char *url = c->snapshot.sftp_url;
    if (!url || !url[0]) {
        snprintf(err, errlen, "snapshot.sftp_url: expected sftp://host[:port]/directory (snapshot.store is sftp)");
        return HL_ERR_CONFIG;
    }
    hl_buf_init(&o, 4096);
    hl_buf_init(&d, 4096);
    hl_status st = parse_url(url, &o, &d, err, errlen);
    if (!st)
        st = check_login(c, kh, sizeof kh, &known, &login, err, errlen);
    if (!st) {
        char *origin = hl_buf_status(&o) ? NULL : (char *)hl_buf_steal(&o, NULL);
        char *dir = hl_buf_status(&d) ? NULL : (char *)hl_buf_steal(&d, NULL);
        sftp_store *s = sftp_new(c, origin, dir, login, known);
        if (s) {
            *out = &s->base;
        } else {
            st = HL_ERR_NOMEM;
            snprintf(err, errlen, "sftp: out of memory");
        }
    }
    hl_buf_free(&o);
    hl_buf_free(&d);
    return st;
}
