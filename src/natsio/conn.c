/*
 * conn.c - the NATS connection, its JetStream context and the change-log streams.
 *
 * nats.c calls the connection callbacks below on its own threads; they only
 * store the new state in an atomic, log, and (closed) wake hl_nats_close.
 * Nothing logged here may contain a secret: URLs are logged with their userinfo
 * replaced, and error texts from nats.c are passed through the same filter.
 */
#include "natsio/conn.h"

#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/log.h"

enum { ST_CONNECTING = 0, ST_CONNECTED = 1, ST_RECONNECTING = 2, ST_CLOSED = 3 };

#define RECONNECT_BUF_BYTES (16 * 1024 * 1024)
#define ENSURE_RETRY_MS 500
#define INFO_WAIT_MS 1500
#define WRITE_WAIT_MS 5000

struct hl_nats {
    natsOptions *opts;
    natsConnection *nc;
    jsCtx *js;
    atomic_int state;
    atomic_bool closing; /* hl_nats_close has begun: disconnects are expected */
    pthread_mutex_t mu;
    pthread_cond_t cv; /* signalled by the closed callback */
    bool closed;
    char *secret;             /* the password, only to scrub it from any text we log */
    hl_nats *retired_next;    /* closed, kept for callbacks nats.c may still deliver */
    struct retired_sub *subs; /* hl_nats_retire_sub's, newest first; under mu */
};

/* A subscription given back, kept until no message for it can be in flight. */
typedef struct retired_sub {
    natsSubscription *sub;
    int64_t at_ms;
    struct retired_sub *next;
} retired_sub;

/* How long a retired subscription is kept: far longer than nats.c's reader
 * holds a subscription it looked up. */
#define RETIRE_GRACE_MS 10000
/* Retired subscriptions still subscribed (nothing was ever delivered to them,
 * so their one-message interest has not ended yet) are kept until close, up to
 * this many; beyond it the oldest go anyway. */
#define RETIRE_KEEP_MAX 256

/*
 * nats.c can still call our callbacks after natsConnection_Destroy: its
 * internal threads (an ordered consumer re-creating itself, the async error
 * queue) hold their own references to the connection. A closed hl_nats is
 * therefore kept, with every callback returning at once, until
 * hl_nats_shutdown() has waited for those threads.
 */
static pthread_mutex_t retired_mu = PTHREAD_MUTEX_INITIALIZER;
static hl_nats *retired;

/* ---- time ---- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static bool stop_requested(const volatile int *stop_flag)
{
    return stop_flag && *stop_flag;
}

/* Sleeps ms in slices of at most 100 ms so a shutdown is noticed promptly.
 * Returns false when stop_flag was set. */
static bool sleep_ms(int64_t ms, const volatile int *stop_flag)
{
    int64_t end = now_ms() + ms;
    for (;;) {
        if (stop_requested(stop_flag))
            return false;
        int64_t left = end - now_ms();
        if (left <= 0)
            return true;
        if (left > 100)
            left = 100;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)left * 1000000L};
        nanosleep(&ts, NULL);
    }
}

/* ---- redaction ---- */

/*
 * Copies in to out (truncating to len), replacing the userinfo of every URL
 * ("nats://user:pass@host" -> "nats://<redacted>@host") and every occurrence of
 * secret (when at least 4 characters long, so short passwords do not shred
 * ordinary words) with "<redacted>".
 */
static void redact(const char *in, const char *secret, char *out, size_t len)
{
    static const char mark[] = "<redacted>";
    size_t slen = secret ? strlen(secret) : 0;
    size_t o = 0;
    if (!len)
        return;
    for (const char *p = in ? in : ""; *p && o + 1 < len;) {
        if (slen >= 4 && strncmp(p, secret, slen) == 0) {
            for (const char *m = mark; *m && o + 1 < len; m++)
                out[o++] = *m;
            p += slen;
            continue;
        }
        if (p[0] == ':' && p[1] == '/' && p[2] == '/') {
            const char *h = p + 3;
            size_t n = strcspn(h, "/@ \t\r\n\"'");
            if (h[n] == '@') {
                for (const char *m = "://<redacted>@"; *m && o + 1 < len; m++)
                    out[o++] = *m;
                p = h + n + 1;
                continue;
            }
        }
        out[o++] = *p++;
    }
    out[o] = 0;
}

/* nats.c prefixes its error texts with the source location, "(jsm.c:1033): ". */
static const char *skip_location(const char *txt)
{
    if (txt && txt[0] == '(') {
        const char *e = strstr(txt, "): ");
        if (e && (size_t)(e - txt) < 64)
            return e + 3;
    }
    return txt;
}

/* Logs a failed nats.c call with its status text and nats.c's detailed last
 * error (redacted). */
static void log_nats_error(hl_nats *n, const char *what, natsStatus s, jsErrCode jerr)
{
    natsStatus ls;
    const char *txt = skip_location(nats_GetLastError(&ls));
    char clean[512];
    char code[16];
    redact(txt && *txt ? txt : natsStatus_GetText(s), n ? n->secret : NULL, clean, sizeof clean);
    snprintf(code, sizeof code, "%d", (int)jerr);
    if (jerr)
        hl_log(HL_LOG_ERROR, what, "component", "nats", "status", natsStatus_GetText(s), "js_error", code, "error",
               clean, NULL);
    else
        hl_log(HL_LOG_ERROR, what, "component", "nats", "status", natsStatus_GetText(s), "error", clean, NULL);
}

/* ---- callbacks (nats.c threads: no blocking, no SQLite) ---- */

static void on_disconnected(natsConnection *nc, void *closure)
{
    (void)nc;
    hl_nats *n = closure;
    /* A drain/close also reports a disconnect first; only a live connection
     * going away is news. */
    if (atomic_load(&n->state) == ST_CONNECTED && !atomic_load(&n->closing)) {
        atomic_store(&n->state, ST_RECONNECTING);
        hl_log(HL_LOG_WARN, "nats disconnected, reconnecting", "component", "nats", NULL);
    }
}

static void on_reconnected(natsConnection *nc, void *closure)
{
    hl_nats *n = closure;
    if (atomic_load(&n->closing))
        return;
    char url[256] = "", clean[256];
    (void)natsConnection_GetConnectedUrl(nc, url, sizeof url);
    redact(url, n->secret, clean, sizeof clean);
    atomic_store(&n->state, ST_CONNECTED);
    hl_log(HL_LOG_INFO, "nats reconnected", "component", "nats", "url", clean, NULL);
}

static void on_closed(natsConnection *nc, void *closure)
{
    (void)nc;
    hl_nats *n = closure;
    hl_log(HL_LOG_INFO, "nats connection closed", "component", "nats", NULL);
    atomic_store(&n->state, ST_CLOSED);
    /* Last touch of n: hl_nats_close frees it once it sees closed. */
    pthread_mutex_lock(&n->mu);
    n->closed = true;
    pthread_cond_broadcast(&n->cv);
    pthread_mutex_unlock(&n->mu);
}

static void on_error(natsConnection *nc, natsSubscription *sub, natsStatus err, void *closure)
{
    (void)sub;
    hl_nats *n = closure;
    const char *last = NULL;
    char clean[512];
    if (atomic_load(&n->closing))
        return; /* errors of a connection being closed are expected, and n->secret may be gone */
    if (nc)
        (void)natsConnection_GetLastError(nc, &last);
    redact(last && *last ? last : natsStatus_GetText(err), n->secret, clean, sizeof clean);
    hl_log(HL_LOG_WARN, "nats asynchronous error", "component", "nats", "status", natsStatus_GetText(err), "error",
           clean, NULL);
}

static void on_lame_duck(natsConnection *nc, void *closure)
{
    (void)nc;
    (void)closure;
    hl_log(HL_LOG_INFO, "nats server entered lame duck mode; will move to another server", "component", "nats", NULL);
}

/* ---- NKey seed -> public key ---- */

/* ---- connection ---- */

static bool permanent_connect_error(natsStatus s)
{
    /* Retrying cannot fix wrong credentials or a TLS mismatch; failing at once
     * makes the cause the last thing in the log. */
    return s == NATS_CONNECTION_AUTH_FAILED || s == NATS_NOT_PERMITTED || s == NATS_SSL_ERROR ||
           s == NATS_SECURE_CONNECTION_WANTED || s == NATS_SECURE_CONNECTION_REQUIRED || s == NATS_INVALID_ARG ||
           s == NATS_ADDRESS_MISSING;
}

/* Logs a natsOptions failure for what and maps it to a status. */
static hl_status options_failed(hl_nats *n, const char *what, natsStatus s)
{
    log_nats_error(n, what, s, 0);
    return s == NATS_NO_MEMORY ? HL_ERR_NOMEM : HL_ERR_CONFIG;
}

/* Servers, name, reconnect and ping behaviour, and our callbacks. */
static natsStatus set_behaviour(hl_nats *n, const hl_config *c, const char *const *urls, size_t nurls)
{
    natsOptions *o = n->opts;
    char name[64];
    int wait_s = c->nats.reconnect_wait_seconds > 0 ? c->nats.reconnect_wait_seconds : 2;

    snprintf(name, sizeof name, "harmonylite-%llu", (unsigned long long)c->node_id);
    natsStatus s = natsOptions_SetServers(o, (const char **)urls, (int)nurls);
    if (s == NATS_OK)
        s = natsOptions_SetName(o, name);
    if (s == NATS_OK)
        s = natsOptions_SetMaxReconnect(o, -1);
    if (s == NATS_OK)
        s = natsOptions_SetReconnectWait(o, (int64_t)wait_s * 1000);
    /* Publishes made while reconnecting are buffered here; the outbox in SQLite
     * is the durable copy, so this only needs to absorb a short blip. */
    if (s == NATS_OK)
        s = natsOptions_SetReconnectBufSize(o, RECONNECT_BUF_BYTES);
    /* Notice a dead server in ~30 s instead of the default 4 minutes. */
    if (s == NATS_OK)
        s = natsOptions_SetPingInterval(o, 10000);
    if (s == NATS_OK)
        s = natsOptions_SetMaxPingsOut(o, 3);
    if (s == NATS_OK)
        s = natsOptions_SetDisconnectedCB(o, on_disconnected, n);
    if (s == NATS_OK)
        s = natsOptions_SetReconnectedCB(o, on_reconnected, n);
    if (s == NATS_OK)
        s = natsOptions_SetClosedCB(o, on_closed, n);
    if (s == NATS_OK)
        s = natsOptions_SetErrorHandler(o, on_error, n);
    if (s == NATS_OK)
        s = natsOptions_SetLameDuckModeCB(o, on_lame_duck, n);
    return s;
}

/* The login: user and password, a credentials file or an NKey seed. */
static hl_status set_login(hl_nats *n, const hl_config *c)
{
    natsOptions *o = n->opts;
    natsStatus s;
    if (c->nats.user_name && *c->nats.user_name) {
        s = natsOptions_SetUserInfo(o, c->nats.user_name, c->nats.user_password ? c->nats.user_password : "");
        if (s != NATS_OK)
            return options_failed(n, "nats.user_name/user_password", s);
    }
    if (c->nats.creds_file && *c->nats.creds_file && c->nats.seed_file && *c->nats.seed_file) {
        hl_log(HL_LOG_ERROR, "nats.creds_file and nats.seed_file are mutually exclusive", "component", "nats", NULL);
        return HL_ERR_CONFIG;
    }
    if (c->nats.creds_file && *c->nats.creds_file) {
        s = natsOptions_SetUserCredentialsFromFiles(o, c->nats.creds_file, NULL);
        if (s != NATS_OK)
            return options_failed(n, "nats.creds_file", s);
    }
    if (c->nats.seed_file && *c->nats.seed_file) {
        char pub[64];
        hl_status st = hl_nats_nkey_public_from_file(c->nats.seed_file, pub, sizeof pub);
        if (st)
            return st;
        s = natsOptions_SetNKeyFromSeed(o, pub, c->nats.seed_file);
        if (s != NATS_OK)
            return options_failed(n, "nats.seed_file", s);
    }
    return HL_OK;
}

static bool is_set(const char *s)
{
    return s && *s;
}

/*
 * External servers (nats.urls): TLS when any of nats.ca_file, cert_file,
 * key_file is set. The embedded server: TLS only when its client port takes
 * nothing else (nats.client_tls), verified with nats.ca_file, else its CA
 * (nats.server_ca_file); with "verify" harmonylite presents nats.cert_file,
 * else the server's own certificate. Otherwise the client's files are the
 * leaf remotes' (nats.leaf_servers), never this plain loopback connection's.
 */
static hl_status set_tls(hl_nats *n, const hl_config *c)
{
    natsOptions *o = n->opts;
    bool embedded = c->nats.urls.n == 0;
    hl_client_tls mode = embedded ? hl_config_client_tls(c) : HL_CLIENT_TLS_OFF;
    bool embedded_tls = mode != HL_CLIENT_TLS_OFF;
    if (embedded && !embedded_tls)
        return HL_OK;
    const char *ca = c->nats.ca_file, *cert = c->nats.cert_file, *key = c->nats.key_file;
    const char *ca_key = "nats.ca_file", *cert_key = "nats.cert_file/key_file";
    if (embedded_tls && !is_set(ca)) {
        ca = c->nats.server_ca_file;
        ca_key = "nats.server_ca_file";
    }
    if (mode == HL_CLIENT_TLS_VERIFY && !is_set(cert) && !is_set(key)) {
        cert = c->nats.server_cert_file;
        key = c->nats.server_key_file;
        cert_key = "nats.server_cert_file/server_key_file";
    }
    if (!is_set(ca) && !is_set(cert) && !is_set(key))
        return HL_OK;
    const char *what = "nats TLS";
    natsStatus s = natsOptions_SetSecure(o, true);
    if (s == NATS_OK && is_set(ca)) {
        what = ca_key;
        s = natsOptions_LoadCATrustedCertificates(o, ca);
    }
    if (s == NATS_OK && (is_set(cert) || is_set(key))) {
        if (!is_set(cert) || !is_set(key)) {
            hl_log(HL_LOG_ERROR, "nats.cert_file and nats.key_file must be set together", "component", "nats", NULL);
            return HL_ERR_CONFIG;
        }
        what = cert_key;
        s = natsOptions_LoadCertificatesChain(o, cert, key);
    }
    return s == NATS_OK ? HL_OK : options_failed(n, what, s);
}

/* Every natsOptions of the connection, from the configuration. */
static hl_status set_options(hl_nats *n, const hl_config *c, const char *const *urls, size_t nurls)
{
    natsStatus s = set_behaviour(n, c, urls, nurls);
    if (s != NATS_OK)
        return options_failed(n, "natsOptions", s);
    hl_status st = set_login(n, c);
    return st ? st : set_tls(n, c);
}

/* Connects, retrying up to nats.connect_retries times (forever when negative)
 * unless the error is one a retry cannot fix or stop_flag is raised. */
static hl_status connect_retrying(hl_nats *n, const hl_config *c, const char *const *urls, size_t nurls,
                                  const volatile int *stop_flag)
{
    char list[1024] = "", clean[1024];
    for (size_t i = 0; i < nurls; i++) {
        size_t l = strlen(list);
        snprintf(list + l, sizeof list - l, "%s%s", i ? "," : "", urls[i]);
    }
    redact(list, n->secret, clean, sizeof clean);

    int tries = c->nats.connect_retries;
    for (int attempt = 1;; attempt++) {
        natsStatus s = natsConnection_Connect(&n->nc, n->opts);
        if (s == NATS_OK)
            return HL_OK;
        char an[16];
        snprintf(an, sizeof an, "%d", attempt);
        natsStatus ls;
        const char *txt = skip_location(nats_GetLastError(&ls));
        char why[512];
        redact(txt && *txt ? txt : natsStatus_GetText(s), n->secret, why, sizeof why);
        bool last = permanent_connect_error(s) || (tries >= 0 && attempt >= (tries > 0 ? tries : 1));
        hl_log(last ? HL_LOG_ERROR : HL_LOG_WARN, "cannot connect to nats", "component", "nats", "urls", clean,
               "attempt", an, "status", natsStatus_GetText(s), "error", why, NULL);
        if (last)
            return HL_ERR_NATS;
        if (!sleep_ms((int64_t)(c->nats.reconnect_wait_seconds > 0 ? c->nats.reconnect_wait_seconds : 2) * 1000,
                      stop_flag))
            return HL_ERR_STOPPED;
    }
}

/*
 * nats.c 3.4.1's library cleanup (an atexit handler, once TLS was used) runs
 * sk_SSL_COMP_free(SSL_COMP_get_compression_methods()), an OpenSSL 1.0
 * leftover: with OpenSSL 3 that list belongs to libssl, whose own exit
 * handler (OPENSSL_cleanup) frees it again, a SIGSEGV or heap corruption after
 * a clean stop. The list is taken out of both their reach before any
 * connection: the first call builds it (once), and it stays here, reachable.
 * TLS compression is off by default in OpenSSL 3 (and unsafe: CRIME); with no
 * list, libssl behaves as if built without it.
 */
static STACK_OF(SSL_COMP) * ssl_comp_methods_kept;

/* Set by the first hl_nats_connect: nats.c's library is open from then on. */
static atomic_bool lib_opened;

static void hide_ssl_comp_methods(void)
{
    (void)SSL_COMP_get_compression_methods();
    ssl_comp_methods_kept = SSL_COMP_set0_compression_methods(NULL);
}

hl_status hl_nats_connect(hl_nats **out, const hl_config *c, const char *const *urls, size_t nurls,
                          jsPubAckHandler ack_cb, void *ack_closure, int64_t max_pending, const volatile int *stop_flag)
{
    static pthread_once_t comp_once = PTHREAD_ONCE_INIT;
    hl_status st = HL_OK;
    natsStatus s;
    hl_nats *n = NULL;
    *out = NULL;
    pthread_once(&comp_once, hide_ssl_comp_methods);
    atomic_store(&lib_opened, true);

    if (!urls || nurls == 0 || nurls > 1024)
        return HL_ERR_INVALID;
    n = calloc(1, sizeof *n);
    if (!n)
        return HL_ERR_NOMEM;
    pthread_mutex_init(&n->mu, NULL);
    pthread_cond_init(&n->cv, NULL);
    atomic_init(&n->state, ST_CONNECTING);
    atomic_init(&n->closing, false);
    if (c->nats.user_password && *c->nats.user_password) {
        n->secret = strdup(c->nats.user_password);
        if (!n->secret) {
            st = HL_ERR_NOMEM;
            goto out;
        }
    }

    s = natsOptions_Create(&n->opts);
    if (s != NATS_OK) {
        log_nats_error(n, "natsOptions_Create", s, 0);
        st = HL_ERR_NATS;
        goto out;
    }
    st = set_options(n, c, urls, nurls);
    if (!st)
        st = connect_retrying(n, c, urls, nurls, stop_flag);
    if (st)
        goto out;
    atomic_store(&n->state, ST_CONNECTED);
    {
        char url[256] = "", cu[256];
        (void)natsConnection_GetConnectedUrl(n->nc, url, sizeof url);
        redact(url, n->secret, cu, sizeof cu);
        hl_log(HL_LOG_INFO, "nats connected", "component", "nats", "url", cu, NULL);
    }

    jsOptions jo;
    /* The *_Init calls only fail on NULL; a failed GetConnectedUrl leaves "". */
    (void)jsOptions_Init(&jo);
    jo.PublishAsync.AckHandler = ack_cb;
    jo.PublishAsync.AckHandlerClosure = ack_closure;
    jo.PublishAsync.MaxPending = max_pending;
    s = natsConnection_JetStream(&n->js, n->nc, &jo);
    if (s != NATS_OK) {
        log_nats_error(n, "natsConnection_JetStream", s, 0);
        st = HL_ERR_NATS;
        goto out;
    }
out:
    if (st) {
        hl_nats_close(n, 0);
        n = NULL;
    }
    *out = n;
    return st;
}

static void local_url(const hl_config *c, char *url, size_t len)
{
    const char *bind = c->nats.bind_address ? c->nats.bind_address : "127.0.0.1:4222";
    const char *colon = strrchr(bind, ':');
    size_t hl = colon ? (size_t)(colon - bind) : 0;
    const char *port = colon ? colon + 1 : "4222";
    if (hl == 0 || (hl == 7 && strncmp(bind, "0.0.0.0", 7) == 0) || (hl == 4 && strncmp(bind, "[::]", 4) == 0))
        snprintf(url, len, "nats://127.0.0.1:%s", port);
    else
        snprintf(url, len, "nats://%.*s:%s", (int)hl, bind, port);
}

hl_status hl_nats_connect_node(hl_nats **out, const hl_config *c, char *local, size_t locallen)
{
    char url[300] = "";
    const char *one[1] = {url};
    const char *const *urls = (const char *const *)c->nats.urls.v;
    size_t nurls = c->nats.urls.n;
    if (!nurls) {
        local_url(c, url, sizeof url);
        urls = one;
        nurls = 1;
    }
    if (local && locallen)
        snprintf(local, locallen, "%s", url);
    return hl_nats_connect(out, c, urls, nurls, NULL, NULL, 16, NULL);
}

natsConnection *hl_nats_conn(hl_nats *n)
{
    return n->nc;
}

jsCtx *hl_nats_js(hl_nats *n)
{
    return n->js;
}

bool hl_nats_connected(hl_nats *n)
{
    return n && n->nc && atomic_load(&n->state) == ST_CONNECTED &&
           natsConnection_Status(n->nc) == NATS_CONN_STATUS_CONNECTED;
}

void hl_nats_stream_name(const hl_config *c, int shard, char *buf, size_t len)
{
    snprintf(buf, len, "%s-%d", c->nats.stream_prefix ? c->nats.stream_prefix : "harmonylite-changes", shard);
}

void hl_nats_subject(const hl_config *c, int shard, char *buf, size_t len)
{
    snprintf(buf, len, "%s.%d", c->nats.subject_prefix ? c->nats.subject_prefix : "harmonylite-change-log", shard);
}

/* ---- streams ---- */

/* Errors that mean "JetStream is not there yet" (server starting, cluster
 * forming, meta leader being elected, peers not yet known) rather than "your
 * request is wrong". */
static bool js_transient(natsStatus s, jsErrCode jerr)
{
    switch (jerr) {
    case JSClusterNoPeersErr:
    case JSClusterNotActiveErr:
    case JSClusterNotAvailErr:
    case JSClusterNotLeaderErr:
    case JSClusterIncompleteErr:
    case JSClusterNotAssignedErr:
    case JSNotEnabledErr:
    case JSNotEnabledForAccountErr:
    case JSInsufficientResourcesErr:
    case JSStreamOfflineErr:
        return true;
    default:
        break;
    }
    return s == NATS_TIMEOUT || s == NATS_NO_RESPONDERS || s == NATS_CONNECTION_DISCONNECTED ||
           s == NATS_NOT_YET_CONNECTED || s == NATS_CONNECTION_CLOSED || s == NATS_IO_ERROR;
}

/* Appends a " field=want(got)" note to diff for every setting that differs. */
static bool stream_differs(const jsStreamConfig *want, const jsStreamConfig *got, char *diff, size_t len)
{
    size_t o = 0;
    diff[0] = 0;
#define DIFF(field, fmt, cast)                                                                                         \
    if (want->field != got->field && o < len)                                                                          \
        o += (size_t)snprintf(diff + o, len - o, "%s" #field "=" fmt " (configured " fmt ")", o ? ", " : "",           \
                              cast got->field, cast want->field);
    DIFF(MaxMsgs, "%lld", (long long))
    DIFF(MaxBytes, "%lld", (long long))
    DIFF(MaxAge, "%lld", (long long))
    DIFF(Duplicates, "%lld", (long long))
    DIFF(Replicas, "%lld", (long long))
    DIFF(Storage, "%d", (int))
    DIFF(Discard, "%d", (int))
    DIFF(Retention, "%d", (int))
#undef DIFF
    bool subj_ok = got->SubjectsLen == 1 && got->Subjects && strcmp(got->Subjects[0], want->Subjects[0]) == 0;
    if (!subj_ok && o < len)
        o += (size_t)snprintf(diff + o, len - o, "%sSubjects (configured %s)", o ? ", " : "", want->Subjects[0]);
    return o > 0;
}

/* The stream si exists: compares its settings with sc and, when they differ,
 * updates it (replication_log.update_existing) or warns. *s and *jerr are the
 * update's result (NATS_OK when none was needed); HL_ERR_NATS when the update
 * failed in a way a retry cannot fix. */
static hl_status update_if_differs(hl_nats *n, const hl_config *c, jsStreamConfig *sc, const jsStreamInfo *si,
                                   jsOptions *write_o, natsStatus *s, jsErrCode *jerr, const char **step)
{
    char diff[512];
    if (!stream_differs(sc, si->Config, diff, sizeof diff))
        return HL_OK;
    if (!c->replication_log.update_existing) {
        hl_log(HL_LOG_WARN,
               "stream settings differ from the configuration (set "
               "replication_log.update_existing to apply them)",
               "component", "nats", "stream", sc->Name, "differences", diff, NULL);
        return HL_OK;
    }
    jsStreamInfo *ui = NULL;
    *jerr = 0;
    *step = "update stream";
    *s = js_UpdateStream(&ui, n->js, sc, write_o, jerr);
    jsStreamInfo_Destroy(ui);
    if (*s == NATS_OK) {
        hl_log(HL_LOG_INFO, "stream updated", "component", "nats", "stream", sc->Name, "changed", diff, NULL);
    } else if (!js_transient(*s, *jerr)) {
        log_nats_error(n, "cannot update stream", *s, *jerr);
        return HL_ERR_NATS;
    }
    return HL_OK;
}

/* JetStream is not ready yet: says so every 5 s and waits a little before the
 * next try. HL_OK to try again, HL_ERR_TIMEOUT past the deadline,
 * HL_ERR_STOPPED when stop_flag was raised. */
static hl_status wait_for_jetstream(hl_nats *n, const jsStreamConfig *sc, natsStatus s, jsErrCode jerr,
                                    const char *step, int64_t deadline, int64_t *next_note,
                                    const volatile int *stop_flag)
{
    int64_t now = now_ms();
    if (now >= deadline) {
        log_nats_error(n, "JetStream not available in time", s, jerr);
        return HL_ERR_TIMEOUT;
    }
    if (now >= *next_note) {
        natsStatus ls;
        char why[256], code[16];
        redact(skip_location(nats_GetLastError(&ls)), n->secret, why, sizeof why);
        snprintf(code, sizeof code, "%d", (int)jerr);
        hl_log(HL_LOG_INFO, "waiting for JetStream", "component", "nats", "stream", sc->Name, "step", step, "status",
               natsStatus_GetText(s), "js_error", code, "error", why, NULL);
        *next_note = now + 5000;
    }
    int64_t wait = deadline - now < ENSURE_RETRY_MS ? deadline - now : ENSURE_RETRY_MS;
    return sleep_ms(wait, stop_flag) ? HL_OK : HL_ERR_STOPPED;
}

/* Creates or checks one stream; retries transient errors until deadline. */
static hl_status ensure_one(hl_nats *n, const hl_config *c, jsStreamConfig *sc, int64_t deadline,
                            const volatile int *stop_flag)
{
    natsStatus s = NATS_OK;
    jsErrCode jerr = 0;
    const char *step = "";
    int64_t next_note = 0;

    for (;;) {
        jsStreamInfo *si = NULL;
        /* A JetStream API request sent while the cluster has no meta leader
         * gets no answer at all (nats-server 2.9.10), so a short wait for the
         * cheap info request lets us retry soon after the leader appears. The
         * create/update waits longer: an R3 create needs a new Raft group. If
         * it times out but succeeded, the next info request finds the stream. */
        jsOptions info_o, write_o;
        int64_t left = deadline - now_ms();
        (void)jsOptions_Init(&info_o);
        (void)jsOptions_Init(&write_o);
        info_o.Wait = left < INFO_WAIT_MS ? (left > 200 ? left : 200) : INFO_WAIT_MS;
        write_o.Wait = left < WRITE_WAIT_MS ? (left > 1000 ? left : 1000) : WRITE_WAIT_MS;
        jerr = 0;
        step = "get stream info";
        s = js_GetStreamInfo(&si, n->js, sc->Name, &info_o, &jerr);
        if (s == NATS_OK) {
            hl_status st = update_if_differs(n, c, sc, si, &write_o, &s, &jerr, &step);
            jsStreamInfo_Destroy(si);
            if (s == NATS_OK || st)
                return st;
        } else if (s == NATS_NOT_FOUND || jerr == JSStreamNotFoundErr) {
            jerr = 0;
            step = "create stream";
            s = js_AddStream(&si, n->js, sc, &write_o, &jerr);
            jsStreamInfo_Destroy(si);
            if (s == NATS_OK) {
                hl_log(HL_LOG_INFO, "stream created", "component", "nats", "stream", sc->Name, "subject",
                       sc->Subjects[0], NULL);
                return HL_OK;
            }
            /* Another node created it between our lookup and our create (or
             * with other settings): look again and compare. */
            if (jerr == JSStreamNameExistErr)
                continue;
            if (!js_transient(s, jerr)) {
                log_nats_error(n, "cannot create stream", s, jerr);
                return HL_ERR_NATS;
            }
        } else if (!js_transient(s, jerr)) {
            log_nats_error(n, "cannot read stream info", s, jerr);
            return HL_ERR_NATS;
        }
        hl_status st = wait_for_jetstream(n, sc, s, jerr, step, deadline, &next_note, stop_flag);
        if (st)
            return st;
    }
}

hl_status hl_nats_ensure_streams(hl_nats *n, const hl_config *c, int timeout_ms, const volatile int *stop_flag)
{
    int64_t deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    int shards = c->replication_log.shards > 0 ? c->replication_log.shards : 1;
    int64_t max_age_ns = c->replication_log.max_age_s > 0 ? c->replication_log.max_age_s * 1000000000LL : 0;
    int64_t dup_ns =
        (int64_t)(c->replication_log.duplicate_window_s > 0 ? c->replication_log.duplicate_window_s : 120) *
        1000000000LL;
    /* The server refuses a duplicate window longer than max_age. */
    if (max_age_ns > 0 && dup_ns > max_age_ns) {
        hl_log(HL_LOG_WARN, "replication_log.duplicate_window is longer than max_age; using max_age", "component",
               "nats", NULL);
        dup_ns = max_age_ns;
    }

    for (int i = 0; i < shards; i++) {
        char name[256], subj[256];
        const char *subjects[1] = {subj};
        jsStreamConfig sc;
        hl_nats_stream_name(c, i, name, sizeof name);
        hl_nats_subject(c, i, subj, sizeof subj);
        (void)jsStreamConfig_Init(&sc);
        sc.Name = name;
        sc.Subjects = subjects;
        sc.SubjectsLen = 1;
        sc.Retention = js_LimitsPolicy;
        sc.Storage = js_FileStorage;
        sc.Replicas = c->replication_log.replicas > 0 ? c->replication_log.replicas : 1;
        sc.MaxMsgs = c->replication_log.max_entries > 0 ? c->replication_log.max_entries : -1;
        sc.MaxBytes = c->replication_log.max_bytes > 0 ? c->replication_log.max_bytes : -1;
        sc.MaxAge = max_age_ns;
        sc.Discard = js_DiscardOld;
        sc.Duplicates = dup_ns;
        hl_status st = ensure_one(n, c, &sc, deadline, stop_flag);
        if (st)
            return st;
    }
    return HL_OK;
}

hl_status hl_nats_stream_bounds(hl_nats *n, const char *stream, uint64_t *first, uint64_t *last)
{
    jsStreamInfo *si = NULL;
    jsErrCode jerr = 0;
    *first = *last = 0;
    natsStatus s = js_GetStreamInfo(&si, n->js, stream, NULL, &jerr);
    if (s != NATS_OK) {
        if (s == NATS_NOT_FOUND || jerr == JSStreamNotFoundErr)
            return HL_ERR_NOT_FOUND;
        log_nats_error(n, "cannot read stream info", s, jerr);
        return js_transient(s, jerr) ? HL_ERR_TIMEOUT : HL_ERR_NATS;
    }
    *first = si->State.FirstSeq;
    *last = si->State.LastSeq;
    jsStreamInfo_Destroy(si);
    return HL_OK;
}

/* Waits up to ms for the closed callback. */
static void wait_closed(hl_nats *n, int64_t ms)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t end_ns = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec + ms * 1000000LL;
    ts.tv_sec = (time_t)(end_ns / 1000000000LL);
    ts.tv_nsec = (long)(end_ns % 1000000000LL);
    pthread_mutex_lock(&n->mu);
    while (!n->closed)
        if (pthread_cond_timedwait(&n->cv, &n->mu, &ts) == ETIMEDOUT)
            break;
    pthread_mutex_unlock(&n->mu);
}

/* Unlinks from n->subs (under n->mu) the entries that may be freed: older
 * than the grace period and no longer subscribed, the oldest beyond the cap,
 * or all of them. */
static retired_sub *take_retired(hl_nats *n, bool all, int64_t now)
{
    retired_sub *out = NULL, **pp = &n->subs;
    size_t kept = 0;
    while (*pp) {
        retired_sub *r = *pp;
        bool go = all ||
                  (now - r->at_ms >= RETIRE_GRACE_MS && (!natsSubscription_IsValid(r->sub) || kept >= RETIRE_KEEP_MAX));
        if (!go) {
            kept++;
            pp = &r->next;
            continue;
        }
        *pp = r->next;
        r->next = out;
        out = r;
    }
    return out;
}

static void free_retired(retired_sub *r)
{
    while (r) {
        retired_sub *next = r->next;
        natsSubscription_Destroy(r->sub); /* no longer subscribed: only released */
        free(r);
        r = next;
    }
}

void hl_nats_retire_sub(hl_nats *n, natsSubscription *sub)
{
    if (!sub)
        return;
    /*
     * Ends the interest without natsSubscription_Unsubscribe, which would also
     * delete a consumer nats.c created (a request that waits for a server that
     * may be gone, and in 3.4.1 reads a name its ordered-consumer thread may
     * free). With one message or more delivered, an auto-unsubscribe after one
     * removes the subscription now; with none, the server ends it after the
     * next message.
     */
    (void)natsSubscription_AutoUnsubscribe(sub, 1);
    retired_sub *r = malloc(sizeof *r);
    if (!r || !n) {
        free(r);
        natsSubscription_Destroy(sub);
        return;
    }
    int64_t now = now_ms();
    r->sub = sub;
    r->at_ms = now;
    pthread_mutex_lock(&n->mu);
    r->next = n->subs;
    n->subs = r;
    retired_sub *done = take_retired(n, false, now);
    pthread_mutex_unlock(&n->mu);
    free_retired(done);
}

void hl_nats_close(hl_nats *n, int timeout_ms)
{
    if (!n)
        return;
    int64_t deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    atomic_store(&n->closing, true);
    if (n->js) {
        if (timeout_ms > 0 && hl_nats_connected(n)) {
            jsPubOptions po;
            (void)jsPubOptions_Init(&po);
            po.MaxWait = timeout_ms;
            natsStatus s = js_PublishAsyncComplete(n->js, &po);
            if (s == NATS_TIMEOUT)
                hl_log(HL_LOG_WARN, "closing with unacknowledged publishes", "component", "nats", NULL);
            else if (s != NATS_OK)
                log_nats_error(n, "js_PublishAsyncComplete", s, 0);
        }
    }
    if (n->nc) {
        int64_t left = deadline - now_ms();
        /* A flush (PING/PONG) makes sure the server has everything we
         * published. No drain: every subscription of ours is synchronous and
         * retired by now (hl_nats_retire_sub), and draining one that still
         * waits for its last message would only wait out the timeout. */
        if (left > 0 && hl_nats_connected(n))
            (void)natsConnection_FlushTimeout(n->nc, left);
        (void)natsConnection_Close(n->nc);
        /* nats.c delivers the closed callback on its own thread after Close
         * returns; n must stay valid until it has run. */
        wait_closed(n, 5000);
    }
    /* Closed: its reader has stopped, nothing can reach a subscription now. */
    pthread_mutex_lock(&n->mu);
    retired_sub *subs = take_retired(n, true, 0);
    pthread_mutex_unlock(&n->mu);
    free_retired(subs);
    jsCtx_Destroy(n->js);
    n->js = NULL;
    natsConnection_Destroy(n->nc);
    n->nc = NULL;
    pthread_mutex_lock(&retired_mu);
    n->retired_next = retired;
    retired = n;
    pthread_mutex_unlock(&retired_mu);
}

static void nats_free(hl_nats *n)
{
    natsOptions_Destroy(n->opts);
    if (n->secret) {
        OPENSSL_cleanse(n->secret, strlen(n->secret));
        free(n->secret);
    }
    pthread_cond_destroy(&n->cv);
    pthread_mutex_destroy(&n->mu);
    free(n);
}

void hl_nats_shutdown(int timeout_ms)
{
    if (!atomic_load(&lib_opened))
        return; /* never connected (a configuration error): nothing to wait for */
    /* Waits for every thread nats.c started; none of our callbacks runs after. */
    if (nats_CloseAndWait(timeout_ms > 0 ? timeout_ms : 0) != NATS_OK) {
        hl_log(HL_LOG_WARN, "nats library threads still running at exit", "component", "nats", NULL);
        return; /* keep the closed connections: a late callback must find them */
    }
    pthread_mutex_lock(&retired_mu);
    hl_nats *n = retired;
    retired = NULL;
    pthread_mutex_unlock(&retired_mu);
    while (n) {
        hl_nats *next = n->retired_next;
        nats_free(n);
        n = next;
    }
}
