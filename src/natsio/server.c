/*
 * server.c - embedded mode: render a nats-server config, run nats-server as a
 * supervised child, re-emit its output through hl_log, restart it when it dies.
 *
 * Threads: one supervisor thread per server does every fork (PR_SET_PDEATHSIG
 * is tied to the *thread* that forked, so forking from a long-lived thread keeps
 * the child alive while we supervise it and kills it if we vanish), waits for
 * the child and restarts it with backoff. One reader thread per child lifetime
 * turns its stdout/stderr into log lines. Shared state is guarded by mu; the
 * two counters the rest of the program polls are atomics.
 */
#include "natsio/server.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "common/log.h"
#include "natsio/nkey.h"

#define CONF_NAME "nats-server.conf"
#define BACKOFF_MIN_MS 250
#define BACKOFF_MAX_MS 30000
#define BACKOFF_RESET_UPTIME_MS 60000
#define TAIL_LINES 16
#define TAIL_LINE_LEN 400
#define LINE_MAX_LEN 4096
#define CERT_CHECK_MS 5000 /* how often the route TLS files are looked at */

struct hl_nats_server {
    const hl_config *cfg;
    char *conf_path; /* absolute path of the generated config */
    char *bin_path;  /* nats.server_bin resolved against PATH */
    char *probe_host;
    char probe_port[8];
    char expect_name[64]; /* server_name the INFO of our child must carry */
    char client_url[300];

    pthread_mutex_t mu;
    hl_peer_set peers; /* what the config file was last rendered from; guarded by mu */
    pthread_cond_t cv; /* CLOCK_MONOTONIC; signalled on every state change */
    pid_t pid;         /* child pid while it is alive (not yet waited for); 0 otherwise */
    bool stopping;
    uint64_t exits;                       /* number of times a child exited (start() fails fast on one) */
    char tail[TAIL_LINES][TAIL_LINE_LEN]; /* last lines the child printed, ring buffer */
    unsigned tail_next;
    unsigned tail_count;

    pthread_t supervisor;
    bool supervisor_started;
    pthread_t certwatch; /* re-reads route TLS files when they change (cert_watch_main) */
    bool certwatch_started;

    atomic_bool running;
    atomic_uint_fast64_t restarts;
};

/* ---- small helpers ---- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits on s->cv until the absolute monotonic deadline (ms). Caller holds s->mu. */
static void cv_wait_until(hl_nats_server *s, int64_t deadline_ms)
{
    struct timespec ts;
    ts.tv_sec = (time_t)(deadline_ms / 1000);
    ts.tv_nsec = (long)(deadline_ms % 1000) * 1000000L;
    pthread_cond_timedwait(&s->cv, &s->mu, &ts);
}

static char *dup_str(const char *p)
{
    size_t n = strlen(p) + 1;
    char *d = malloc(n);
    if (d)
        memcpy(d, p, n);
    return d;
}

/* Appends s as a nats-server conf double-quoted string. The conf lexer knows the
 * escapes \" \\ \t \n \r and does not expand $VARIABLES inside quotes (verified
 * with nats-server 2.9.10); other control characters cannot be expressed. */
static hl_status add_conf_str(hl_buf *b, const char *s)
{
    hl_buf_addc(b, '"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        switch (*p) {
        case '"':
            hl_buf_adds(b, "\\\"");
            break;
        case '\\':
            hl_buf_adds(b, "\\\\");
            break;
        case '\t':
            hl_buf_adds(b, "\\t");
            break;
        case '\n':
            hl_buf_adds(b, "\\n");
            break;
        case '\r':
            hl_buf_adds(b, "\\r");
            break;
        default:
            /* Sticky, so hl_nats_server_render() sees it once at the end. */
            if (*p < 0x20 || *p == 0x7f)
                return hl_buf_fail(b, HL_ERR_INVALID);
            hl_buf_addc(b, *p);
        }
    }
    return hl_buf_addc(b, '"');
}

/* Makes p absolute (lexically, against the current directory) and removes "."
 * components, duplicate and trailing slashes. ".." is kept as written. */
static hl_status abs_path(const char *p, hl_buf *out)
{
    hl_buf_reset(out);
    if (p[0] != '/') {
        char cwd[PATH_MAX];
        if (!getcwd(cwd, sizeof cwd))
            return HL_ERR_IO;
        hl_buf_adds(out, cwd);
    }
    const char *q = p;
    while (*q) {
        while (*q == '/')
            q++;
        const char *e = strchr(q, '/');
        size_t n = e ? (size_t)(e - q) : strlen(q);
        if (n == 0)
            break;
        if (!(n == 1 && q[0] == '.')) {
            hl_buf_addc(out, '/');
            hl_buf_add(out, q, n);
        }
        q += n;
    }
    if (out->len == 0)
        hl_buf_addc(out, '/');
    return hl_buf_status(out);
}

/* The directory holding the generated config and the JetStream store. */
static hl_status nats_dir(const hl_config *c, hl_buf *out)
{
    if (!c->data_dir || !*c->data_dir) {
        hl_log(HL_LOG_ERROR, "embedded nats-server needs data_dir", "component", "nats-server", NULL);
        return HL_ERR_CONFIG;
    }
    hl_status st = abs_path(c->data_dir, out);
    if (st)
        return st;
    return hl_buf_adds(out, out->len == 1 && out->data[0] == '/' ? "nats" : "/nats");
}

/*
 * Splits "host:port" / "[v6]:port" into host (brackets removed) and port.
 * host may be empty (":4222"). Returns HL_ERR_CONFIG when the port is missing
 * or not 1..65535.
 */
static hl_status split_hostport(const char *hp, char *host, size_t hostlen, char *port, size_t portlen)
{
    const char *colon;
    const char *h = hp;
    size_t hl;
    if (hp[0] == '[') {
        const char *rb = strchr(hp, ']');
        if (!rb || rb[1] != ':')
            return HL_ERR_CONFIG;
        h = hp + 1;
        hl = (size_t)(rb - h);
        colon = rb + 1;
    } else {
        colon = strrchr(hp, ':');
        if (!colon)
            return HL_ERR_CONFIG;
        hl = (size_t)(colon - hp);
    }
    const char *ps = colon + 1;
    char *end = NULL;
    errno = 0;
    long pn = strtol(ps, &end, 10);
    if (errno || end == ps || *end || pn < 1 || pn > 65535)
        return HL_ERR_CONFIG;
    if (hl >= hostlen || strlen(ps) >= portlen)
        return HL_ERR_CONFIG;
    memcpy(host, h, hl);
    host[hl] = 0;
    snprintf(port, portlen, "%ld", pn);
    return HL_OK;
}

static bool is_wildcard_host(const char *h)
{
    return !*h || strcmp(h, "0.0.0.0") == 0 || strcmp(h, "::") == 0 || strcmp(h, "*") == 0;
}

/* Appends the include path for target so that nats-server finds it from a
 * config file in conf_dir. nats-server 2.9.10 joins every include path to the
 * including file's directory, even an absolute one ("/etc/x.conf" from
 * /data/nats becomes /data/nats/etc/x.conf), so an absolute target is written
 * as "../" once per component of conf_dir (Go's path cleaning stops ".." at "/")
 * followed by the target without its leading slash. Its parser has no escapes
 * in include paths, so '"' and control characters are refused. */
static hl_status add_include(hl_buf *b, const char *conf_dir, const char *target)
{
    if (hl_buf_status(b))
        return hl_buf_status(b);
    hl_buf abs;
    hl_buf_init(&abs, PATH_MAX * 4);
    hl_status st = abs_path(target, &abs);
    if (st)
        goto out;
    for (const unsigned char *p = abs.data; *p; p++) {
        if (*p == '"' || *p < 0x20 || *p == 0x7f) {
            hl_log(HL_LOG_ERROR, "nats.server_config: path must not contain '\"' or control characters", "component",
                   "nats-server", NULL);
            st = HL_ERR_CONFIG;
            goto out;
        }
    }
    hl_buf_adds(b, "include \"");
    for (const char *p = conf_dir; *p; p++)
        if (*p == '/' && p[1] && p[1] != '/')
            hl_buf_adds(b, "../");
    hl_buf_adds(b, hl_buf_str(&abs) + 1);
    hl_buf_adds(b, "\"\n");
out:
    hl_buf_free(&abs);
    return hl_buf_fail(b, st);
}

/* Appends "<key>\"<absolute path>\"\n" when path is set (nats-server resolves
 * relative paths against its own working directory, not ours at load time). */
static hl_status add_conf_path(hl_buf *b, const char *key, const char *path)
{
    if (!path || !*path)
        return hl_buf_status(b);
    hl_buf abs;
    hl_buf_init(&abs, PATH_MAX * 4);
    hl_status st = abs_path(path, &abs);
    if (!st) {
        hl_buf_adds(b, key);
        add_conf_str(b, hl_buf_str(&abs));
        hl_buf_addc(b, '\n');
    }
    hl_buf_free(&abs);
    return hl_buf_fail(b, st);
}
/* ---- peer set ---- */

void hl_peer_set_init(hl_peer_set *p)
{
    memset(p, 0, sizeof *p);
}

static void strlist_clear(hl_strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

void hl_peer_set_free(hl_peer_set *p)
{
    if (!p)
        return;
    strlist_clear(&p->routes);
    strlist_clear(&p->leafs);
}

/* Index of the first element >= key (binary search); *found when equal. */
static size_t strlist_lower(const hl_strlist *l, const char *key, bool *found)
{
    size_t lo = 0, hi = l->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (strcmp(l->v[mid], key) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = lo < l->n && strcmp(l->v[lo], key) == 0;
    return lo;
}

static hl_status strlist_insert(hl_strlist *l, const char *s)
{
    bool found;
    size_t at = strlist_lower(l, s, &found);
    if (found)
        return HL_OK;
    char **v = realloc(l->v, (l->n + 1) * sizeof *v);
    if (!v)
        return HL_ERR_NOMEM;
    l->v = v;
    char *d = dup_str(s);
    if (!d)
        return HL_ERR_NOMEM;
    memmove(v + at + 1, v + at, (l->n - at) * sizeof *v);
    v[at] = d;
    l->n++;
    return HL_OK;
}

hl_status hl_peer_set_add_route(hl_peer_set *p, const char *url)
{
    if (!url || !*url)
        return HL_ERR_INVALID;
    if (strstr(url, "://"))
        return strlist_insert(&p->routes, url);
    /* Bare host:port; nats-server needs a URL. */
    hl_buf b;
    hl_buf_init(&b, 4096);
    hl_status st = hl_buf_addf(&b, "nats://%s", url);
    if (!st)
        st = strlist_insert(&p->routes, hl_buf_str(&b));
    hl_buf_free(&b);
    return st;
}

hl_status hl_peer_set_add_leaf(hl_peer_set *p, const char *url)
{
    if (!url || !*url)
        return HL_ERR_INVALID;
    return strlist_insert(&p->leafs, url);
}

hl_status hl_peer_set_copy(hl_peer_set *dst, const hl_peer_set *src)
{
    hl_peer_set t;
    hl_status st = HL_OK;
    hl_peer_set_init(&t);
    for (size_t i = 0; !st && i < src->routes.n; i++)
        st = strlist_insert(&t.routes, src->routes.v[i]);
    for (size_t i = 0; !st && i < src->leafs.n; i++)
        st = strlist_insert(&t.leafs, src->leafs.v[i]);
    if (st) {
        hl_peer_set_free(&t);
        return st;
    }
    hl_peer_set_free(dst);
    *dst = t;
    return HL_OK;
}

static bool strlist_equal(const hl_strlist *a, const hl_strlist *b)
{
    if (a->n != b->n)
        return false;
    for (size_t i = 0; i < a->n; i++)
        if (strcmp(a->v[i], b->v[i]) != 0)
            return false;
    return true;
}

bool hl_peer_set_equal(const hl_peer_set *a, const hl_peer_set *b)
{
    return strlist_equal(&a->routes, &b->routes) && strlist_equal(&a->leafs, &b->leafs);
}

/* Elements of a missing from b go into out (a merge of two sorted lists). */
static hl_status strlist_minus(const hl_strlist *a, const hl_strlist *b, hl_strlist *out)
{
    hl_status st = HL_OK;
    size_t j = 0;
    for (size_t i = 0; !st && i < a->n; i++) {
        while (j < b->n && strcmp(b->v[j], a->v[i]) < 0)
            j++;
        if (j == b->n || strcmp(b->v[j], a->v[i]) != 0)
            st = strlist_insert(out, a->v[i]);
    }
    return st;
}

hl_status hl_peer_set_diff(const hl_peer_set *from, const hl_peer_set *to, hl_peer_set *added, hl_peer_set *removed)
{
    hl_status st = strlist_minus(&to->routes, &from->routes, &added->routes);
    if (!st)
        st = strlist_minus(&to->leafs, &from->leafs, &added->leafs);
    if (!st)
        st = strlist_minus(&from->routes, &to->routes, &removed->routes);
    if (!st)
        st = strlist_minus(&from->leafs, &to->leafs, &removed->leafs);
    return st;
}

static bool is_dns_entry(const char *v)
{
    return strncasecmp(v, "dns://", 6) == 0 || strncasecmp(v, "dns+srv://", 10) == 0;
}

hl_status hl_peer_set_from_config(const hl_config *c, hl_peer_set *out)
{
    hl_status st = HL_OK;
    for (size_t i = 0; !st && i < c->nats.cluster_peers.n; i++) {
        const char *v = c->nats.cluster_peers.v[i];
        if (v && *v && !is_dns_entry(v))
            st = hl_peer_set_add_route(out, v);
    }
    for (size_t i = 0; !st && i < c->nats.leaf_servers.n; i++) {
        const char *v = c->nats.leaf_servers.v[i];
        if (v && *v)
            st = hl_peer_set_add_leaf(out, v);
    }
    return st;
}

static bool set(const char *v)
{
    return v && *v;
}

/*
 * What a read-only user may do: read stream and consumer state, make its own
 * consumers and take their messages, and nothing that writes a stream. It
 * may never publish on the change subjects (no allow entry matches them).
 */
static const char *const reader_publish[] = {
    "$JS.API.INFO",
    "$JS.API.STREAM.NAMES",
    "$JS.API.STREAM.LIST",
    "$JS.API.STREAM.INFO.*",
    "$JS.API.STREAM.MSG.GET.*",
    "$JS.API.DIRECT.GET.>",
    "$JS.API.CONSUMER.CREATE.>",
    "$JS.API.CONSUMER.DURABLE.CREATE.>",
    "$JS.API.CONSUMER.INFO.>",
    "$JS.API.CONSUMER.NAMES.>",
    "$JS.API.CONSUMER.LIST.>",
    "$JS.API.CONSUMER.DELETE.>",
    "$JS.API.CONSUMER.MSG.NEXT.>",
    "$JS.ACK.>",
    "$JS.FC.>",
};

static void add_user(hl_buf *b, const char *kind, const char *name, const char *password)
{
    hl_buf_addf(b, "    { %s: ", kind);
    add_conf_str(b, name);
    if (password) {
        hl_buf_adds(b, ", password: ");
        add_conf_str(b, password);
    }
}

/*
 * authorization { users: [...] } from harmonylite's own login, the server's
 * only full user (every node's harmonylite talks only to its own server;
 * the servers talk to each other over routes), and the optional read-only
 * user. Without a login nothing is rendered: the server then takes anonymous
 * clients, which is why its client port listens on loopback by default.
 */
static void add_authorization(hl_buf *out, const hl_config *c)
{
    bool user = set(c->nats.user_name) && set(c->nats.user_password), nkey = set(c->nats.seed_file);
    char pub[128];

    if ((!user && !nkey) || hl_buf_status(out))
        return;
    if (nkey && hl_nats_nkey_public_from_file(c->nats.seed_file, pub, sizeof pub)) {
        hl_buf_fail(out, HL_ERR_CONFIG);
        return;
    }
    hl_buf_adds(out, "authorization {\n  users: [\n");
    if (user) {
        add_user(out, "user", c->nats.user_name, c->nats.user_password);
        hl_buf_adds(out, " }\n");
    }
    if (nkey) {
        add_user(out, "nkey", pub, NULL);
        hl_buf_adds(out, " }\n");
    }
    if (set(c->nats.reader_user)) {
        char sub[300];
        snprintf(sub, sizeof sub, "%s.*", c->nats.subject_prefix ? c->nats.subject_prefix : "harmonylite-change-log");
        add_user(out, "user", c->nats.reader_user, c->nats.reader_password);
        hl_buf_adds(out, ",\n      permissions: {\n        publish: { allow: [");
        for (size_t i = 0; i < sizeof reader_publish / sizeof reader_publish[0]; i++) {
            if (i)
                hl_buf_adds(out, ", ");
            add_conf_str(out, reader_publish[i]);
        }
        hl_buf_adds(out, "] }\n        subscribe: { allow: [\"_INBOX.>\", ");
        add_conf_str(out, sub);
        hl_buf_adds(out, "] }\n      }\n    }\n");
    }
    hl_buf_adds(out, "  ]\n}\n");
    OPENSSL_cleanse(pub, sizeof pub);
}

/* Appends a percent-encoded URL userinfo component (RFC 3986 unreserved kept). */
static void add_userinfo(hl_buf *b, const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (isalnum(*p) || *p == '-' || *p == '.' || *p == '_' || *p == '~')
            hl_buf_addc(b, (char)*p);
        else
            hl_buf_addf(b, "%%%02X", *p);
    }
}

/* A route URL; with nats.cluster_password, "scheme://user:password@rest"
 * (a URL that names its own user is left as written). */
static void add_route(hl_buf *out, const hl_config *c, const char *url)
{
    const char *rest = strstr(url, "://");
    if (!set(c->nats.cluster_password) || !rest || strchr(rest + 3, '@')) {
        add_conf_str(out, url);
        return;
    }
    hl_buf u;
    hl_buf_init(&u, 8192);
    hl_buf_add(&u, url, (size_t)(rest + 3 - url));
    add_userinfo(&u, set(c->nats.cluster_user) ? c->nats.cluster_user : "harmonylite");
    hl_buf_addc(&u, ':');
    add_userinfo(&u, c->nats.cluster_password);
    hl_buf_addc(&u, '@');
    hl_buf_adds(&u, rest + 3);
    if (hl_buf_fail(out, hl_buf_status(&u)) == HL_OK)
        add_conf_str(out, hl_buf_str(&u));
    OPENSSL_cleanse(u.data, u.cap);
    hl_buf_free(&u);
}

/* The cluster block's authorization and TLS (docs/security.md). */
static void add_route_security(hl_buf *out, const hl_config *c)
{
    if (set(c->nats.cluster_password)) {
        hl_buf_adds(out, "  authorization {\n    user: ");
        add_conf_str(out, set(c->nats.cluster_user) ? c->nats.cluster_user : "harmonylite");
        hl_buf_adds(out, "\n    password: ");
        add_conf_str(out, c->nats.cluster_password);
        hl_buf_adds(out, "\n    timeout: 2\n  }\n");
    }
    if (set(c->nats.server_cert_file)) {
        hl_buf_adds(out, "  tls {\n");
        add_conf_path(out, "    cert_file: ", c->nats.server_cert_file);
        add_conf_path(out, "    key_file: ", c->nats.server_key_file);
        if (set(c->nats.server_ca_file)) {
            add_conf_path(out, "    ca_file: ", c->nats.server_ca_file);
            /* Both ends of a route present a certificate the CA signed. */
            hl_buf_adds(out, "    verify: true\n");
        }
        hl_buf_adds(out, "    timeout: 5\n  }\n");
    }
}

/* nats.client_tls: TLS on the client port, with the same certificate as the
 * routes (docs/security.md); verify: clients present a certificate the CA
 * signed. The file watcher's reload covers this block too. */
static void add_client_tls(hl_buf *out, const hl_config *c)
{
    hl_client_tls mode = hl_config_client_tls(c);
    if (mode == HL_CLIENT_TLS_OFF || !set(c->nats.server_cert_file))
        return;
    hl_buf_adds(out, "tls {\n");
    add_conf_path(out, "  cert_file: ", c->nats.server_cert_file);
    add_conf_path(out, "  key_file: ", c->nats.server_key_file);
    if (set(c->nats.server_ca_file))
        add_conf_path(out, "  ca_file: ", c->nats.server_ca_file);
    if (mode == HL_CLIENT_TLS_VERIFY)
        hl_buf_adds(out, "  verify: true\n");
    hl_buf_adds(out, "  timeout: 5\n}\n");
}

hl_status hl_nats_server_render_config(const hl_config *c, hl_buf *out)
{
    hl_peer_set p;
    hl_peer_set_init(&p);
    hl_status st = hl_peer_set_from_config(c, &p);
    if (!st)
        st = hl_nats_server_render(c, &p, out);
    hl_peer_set_free(&p);
    return st;
}

/* Refuses listen addresses nats-server would refuse (or misread), before
 * anything is written. */
static hl_status check_addresses(const hl_config *c, const hl_peer_set *peers, const char *bind)
{
    char host[256], port[8];

    if (split_hostport(bind, host, sizeof host, port, sizeof port)) {
        hl_log(HL_LOG_ERROR, "nats.bind_address: expected host:port", "component", "nats-server", "value", bind, NULL);
        return HL_ERR_CONFIG;
    }
    if (c->nats.cluster_addr && *c->nats.cluster_addr &&
        split_hostport(c->nats.cluster_addr, host, sizeof host, port, sizeof port)) {
        hl_log(HL_LOG_ERROR, "nats.cluster_addr: expected host:port", "component", "nats-server", "value",
               c->nats.cluster_addr, NULL);
        return HL_ERR_CONFIG;
    }
    /* nats-server 2.9.10 exits with "JetStream cluster requires configured
     * routes or solicited leafnode for the system account" otherwise. */
    if (c->nats.cluster_addr && *c->nats.cluster_addr && peers->routes.n == 0) {
        hl_log(HL_LOG_ERROR,
               "nats.cluster_addr needs nats.cluster_peers (JetStream clustering requires routes); "
               "leave cluster_addr unset for a single node",
               "component", "nats-server", NULL);
        return HL_ERR_CONFIG;
    }
    return HL_OK;
}

/* The server's name, client listener, limits and JetStream store. */
static void add_server(hl_buf *out, const hl_config *c, const char *bind, const char *dir)
{
    hl_buf_adds(out, "# Generated by harmonylite on every start; do not edit. Put your own settings\n"
                     "# in the file named by nats.server_config (included last, so it wins).\n");
    hl_buf_addf(out, "server_name: \"harmonylite-%llu\"\n", (unsigned long long)c->node_id);
    hl_buf_adds(out, "listen: ");
    add_conf_str(out, bind);
    hl_buf_addf(out, "\nmax_payload: %d\n", c->nats.max_payload > 0 ? c->nats.max_payload : 1048576);
    /* Our own log lines carry the time already. */
    hl_buf_adds(out, "logtime: false\n");
    /* 30s is the smallest lame_duck_duration 2.9.10 accepts ("5s" is refused:
     * "minimum is 30 seconds"); it is only an upper bound: clients are closed at
     * most one per second after the grace period, and the server exits as soon
     * as they are gone. */
    hl_buf_adds(out, "lame_duck_duration: \"30s\"\nlame_duck_grace_period: \"1s\"\n");
    /* nats-server always appends "/jetstream" to store_dir, so this puts the
     * streams in <data_dir>/nats/jetstream. */
    hl_buf_adds(out, "jetstream {\n  store_dir: ");
    add_conf_str(out, dir);
    /* "always" fsyncs every write before it is acknowledged (nats-server
     * 2.10+; 2.9 refuses the key, which start reports with its output). */
    if (c->nats.sync_interval && *c->nats.sync_interval) {
        hl_buf_adds(out, "\n  sync_interval: ");
        add_conf_str(out, c->nats.sync_interval);
    }
    hl_buf_adds(out, "\n}\n");
}

/* cluster { ... } with the routes to the other nodes, when clustered. */
static void add_cluster(hl_buf *out, const hl_config *c, const hl_peer_set *peers)
{
    if (!c->nats.cluster_addr || !*c->nats.cluster_addr)
        return;
    hl_buf_adds(out, "cluster {\n  name: ");
    add_conf_str(out, c->nats.cluster_name && *c->nats.cluster_name ? c->nats.cluster_name : "harmonylite");
    hl_buf_adds(out, "\n  listen: ");
    add_conf_str(out, c->nats.cluster_addr);
    hl_buf_adds(out, "\n  routes: [\n");
    for (size_t i = 0; i < peers->routes.n; i++) {
        hl_buf_adds(out, "    ");
        add_route(out, c, peers->routes.v[i]);
        hl_buf_addc(out, '\n');
    }
    hl_buf_adds(out, "  ]\n");
    add_route_security(out, c);
    hl_buf_adds(out, "}\n");
}

/* Leaf remotes connect with the credentials and TLS files the client uses. */
static void add_leafnodes(hl_buf *out, const hl_config *c, const hl_peer_set *peers)
{
    if (peers->leafs.n == 0)
        return;
    hl_buf_adds(out, "leafnodes {\n  remotes: [\n    {\n      urls: [\n");
    for (size_t i = 0; i < peers->leafs.n; i++) {
        hl_buf_adds(out, "        ");
        add_conf_str(out, peers->leafs.v[i]);
        hl_buf_addc(out, '\n');
    }
    hl_buf_adds(out, "      ]\n");
    add_conf_path(out, "      credentials: ", c->nats.creds_file);
    if ((c->nats.ca_file && *c->nats.ca_file) || (c->nats.cert_file && *c->nats.cert_file)) {
        hl_buf_adds(out, "      tls {\n");
        add_conf_path(out, "        ca_file: ", c->nats.ca_file);
        add_conf_path(out, "        cert_file: ", c->nats.cert_file);
        add_conf_path(out, "        key_file: ", c->nats.key_file);
        hl_buf_adds(out, "      }\n");
    }
    hl_buf_adds(out, "    }\n  ]\n}\n");
}

/* Every section appends to out, whose error is sticky (a value with a control
 * character records HL_ERR_INVALID there), so the result is checked once. */
hl_status hl_nats_server_render(const hl_config *c, const hl_peer_set *peers, hl_buf *out)
{
    hl_buf dir;
    hl_buf_init(&dir, PATH_MAX * 4);
    const char *bind = c->nats.bind_address ? c->nats.bind_address : "127.0.0.1:4222";

    hl_status st = check_addresses(c, peers, bind);
    if (!st)
        st = nats_dir(c, &dir);
    if (!st) {
        add_server(out, c, bind, hl_buf_str(&dir));
        add_client_tls(out, c);
        add_cluster(out, c, peers);
        add_leafnodes(out, c, peers);
        add_authorization(out, c);
        if (c->nats.server_config && *c->nats.server_config)
            add_include(out, hl_buf_str(&dir), c->nats.server_config);
        st = hl_buf_status(out);
    }
    if (st == HL_ERR_INVALID) {
        hl_log(HL_LOG_ERROR, "nats config value contains a control character", "component", "nats-server", NULL);
        st = HL_ERR_CONFIG;
    }
    hl_buf_free(&dir);
    return st;
}
/* ---- files and processes ---- */

static hl_status mkdir_p(const char *path, mode_t mode)
{
    char tmp[PATH_MAX];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof tmp)
        return HL_ERR_INVALID;
    memcpy(tmp, path, n + 1);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/')
            continue;
        *p = 0;
        if (mkdir(tmp, mode) != 0 && errno != EEXIST)
            return HL_ERR_IO;
        *p = '/';
    }
    if (mkdir(tmp, mode) != 0 && errno != EEXIST)
        return HL_ERR_IO;
    return HL_OK;
}

/* Writes data to path via path.tmp + fsync + rename, so a crash never leaves a
 * half-written config for the next start. */
static hl_status write_atomic(const char *path, const char *data, size_t len)
{
    char tmp[PATH_MAX];
    hl_status st = HL_OK;
    int fd = -1;
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp)
        return HL_ERR_INVALID;
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        st = HL_ERR_IO;
        goto out;
    }
    for (size_t off = 0; off < len;) {
        ssize_t w = write(fd, data + off, len - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            st = HL_ERR_IO;
            goto out;
        }
        off += (size_t)w;
    }
    if (fsync(fd) != 0) {
        st = HL_ERR_IO;
        goto out;
    }
    if (close(fd) != 0) {
        fd = -1;
        st = HL_ERR_IO;
        goto out;
    }
    fd = -1;
    if (rename(tmp, path) != 0)
        st = HL_ERR_IO;
out:
    if (st)
        hl_logf(HL_LOG_ERROR, "writing %s: %s", path, strerror(errno));
    if (fd >= 0)
        close(fd);
    if (st)
        unlink(tmp);
    return st;
}

/* Resolves bin like execvp would, but in the parent: after fork only
 * async-signal-safe calls are allowed and execvp may allocate. */
static char *resolve_bin(const char *bin)
{
    if (strchr(bin, '/'))
        return access(bin, X_OK) == 0 ? dup_str(bin) : NULL;
    const char *path = getenv("PATH");
    if (!path || !*path)
        path = "/usr/local/bin:/usr/bin:/bin";
    while (*path) {
        const char *e = strchr(path, ':');
        size_t n = e ? (size_t)(e - path) : strlen(path);
        char cand[PATH_MAX];
        int w =
            n ? snprintf(cand, sizeof cand, "%.*s/%s", (int)n, path, bin) : snprintf(cand, sizeof cand, "./%s", bin);
        if (w > 0 && (size_t)w < sizeof cand && access(cand, X_OK) == 0)
            return dup_str(cand);
        path += n;
        if (*path == ':')
            path++;
    }
    return NULL;
}

/*
 * Forks and execs path with argv, stdout+stderr to out_fd, stdin from
 * /dev/null. The child dies with SIGTERM when the forking thread ends, runs in
 * its own process group (a terminal's ^C reaches harmonylite only, which then
 * lame-ducks the server) and keeps no other inherited descriptor. Returns the
 * pid, or -1 with *err set to the errno of fork/exec.
 */
static pid_t spawn(const char *path, char *const argv[], int out_fd, int *err)
{
    int ep[2];
    int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    pid_t parent = getpid();
    *err = 0;
    if (devnull < 0) {
        *err = errno;
        return -1;
    }
    /* Reports an exec failure to the parent; closes itself on success. */
    if (pipe2(ep, O_CLOEXEC) != 0) {
        *err = errno;
        close(devnull);
        return -1;
    }
    pid_t pid = fork();
    if (pid == 0) {
        int e;
        sigset_t none;
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(127);
        setpgid(0, 0);
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        /* Ignored signals stay ignored across exec; give the child defaults. */
        int sigs[] = {SIGPIPE, SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2, SIGCHLD, SIGQUIT};
        for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
            signal(sigs[i], SIG_DFL);
        if (dup2(devnull, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(out_fd, 2) < 0 || dup2(ep[1], 3) < 0)
            goto fail;
        fcntl(3, F_SETFD, FD_CLOEXEC);
        close_range(4, ~0U, 0);
        execv(path, argv);
    fail:
        e = errno;
        while (write(3, &e, sizeof e) < 0 && errno == EINTR)
            ;
        _exit(127);
    }
    int fork_err = errno;
    close(devnull);
    close(ep[1]);
    if (pid < 0) {
        *err = fork_err;
        close(ep[0]);
        return -1;
    }
    int child_err = 0;
    ssize_t r;
    do
        r = read(ep[0], &child_err, sizeof child_err);
    while (r < 0 && errno == EINTR);
    close(ep[0]);
    if (r == (ssize_t)sizeof child_err)
        *err = child_err; /* exec failed; the child exits 127 and is reaped as usual */
    return pid;
}

/* Waits for pid, retrying on EINTR. Returns the wait status, or -1 (ECHILD:
 * someone else reaped it, e.g. SIGCHLD set to SIG_IGN). */
static int reap(pid_t pid)
{
    int status;
    for (;;) {
        pid_t r = waitpid(pid, &status, 0);
        if (r == pid)
            return status;
        if (r < 0 && errno == EINTR)
            continue;
        return -1;
    }
}

static void describe_status(int status, char *buf, size_t len)
{
    if (status < 0)
        snprintf(buf, len, "unknown (already reaped)");
    else if (WIFEXITED(status))
        snprintf(buf, len, "exit %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, len, "signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
    else
        snprintf(buf, len, "status 0x%x", (unsigned)status);
}

/* Runs `nats-server -t -c conf`: the server's own parser checks the file, so a
 * bad nats.server_config is reported once, clearly, instead of as a crash loop. */
static hl_status validate_config(const char *bin, const char *conf)
{
    hl_status st = HL_OK;
    int p[2];
    char out[4096];
    size_t outlen = 0;
    char *argv[] = {(char *)"nats-server", (char *)"-t", (char *)"-c", (char *)conf, NULL};

    if (pipe2(p, O_CLOEXEC) != 0)
        return HL_ERR_IO;
    int err = 0;
    pid_t pid = spawn(bin, argv, p[1], &err);
    close(p[1]);
    if (pid < 0 || err) {
        hl_log(HL_LOG_ERROR, "cannot run nats-server", "component", "nats-server", "path", bin, "error", strerror(err),
               NULL);
        st = HL_ERR_CONFIG;
    }
    for (;;) {
        ssize_t r = read(p[0], out + outlen, sizeof out - 1 - outlen);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        outlen += (size_t)r;
        if (outlen == sizeof out - 1) {
            char sink[512]; /* keep draining so the child never blocks on a full pipe */
            while (read(p[0], sink, sizeof sink) > 0)
                ;
            break;
        }
    }
    out[outlen] = 0;
    close(p[0]);
    if (pid < 0)
        return st;
    int status = reap(pid);
    while (outlen && (out[outlen - 1] == '\n' || out[outlen - 1] == '\r'))
        out[--outlen] = 0;
    if (!st && !(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
        hl_log(HL_LOG_ERROR, "nats-server rejected the generated config", "component", "nats-server", "config", conf,
               "output", out, NULL);
        st = HL_ERR_CONFIG;
    }
    return st;
}

/* ---- child output ---- */

static void tail_add(hl_nats_server *s, const char *line)
{
    pthread_mutex_lock(&s->mu);
    snprintf(s->tail[s->tail_next], TAIL_LINE_LEN, "%s", line);
    s->tail_next = (s->tail_next + 1) % TAIL_LINES;
    if (s->tail_count < TAIL_LINES)
        s->tail_count++;
    pthread_mutex_unlock(&s->mu);
}

/* Joins the last n lines with " | " into buf. */
static void tail_join(hl_nats_server *s, unsigned n, char *buf, size_t len)
{
    size_t off = 0;
    buf[0] = 0;
    pthread_mutex_lock(&s->mu);
    if (n > s->tail_count)
        n = s->tail_count;
    for (unsigned i = 0; i < n && off < len; i++) {
        unsigned idx = (s->tail_next + TAIL_LINES - n + i) % TAIL_LINES;
        int w = snprintf(buf + off, len - off, "%s%s", i ? " | " : "", s->tail[idx]);
        if (w < 0)
            break;
        off += (size_t)w;
    }
    pthread_mutex_unlock(&s->mu);
}

/* Strips nats-server's "[pid] " and "YYYY/MM/DD HH:MM:SS.uuuuuu " prefixes and
 * maps its "[INF]" style tag to a level. Lines without a tag (Go panics,
 * "nats-server: ..." fatal errors) are warnings. */
static const char *parse_line(const char *line, hl_log_level *level)
{
    const char *p = line;
    *level = HL_LOG_WARN;
    if (*p == '[') {
        const char *q = p + 1;
        while (*q >= '0' && *q <= '9')
            q++;
        if (q > p + 1 && *q == ']' && q[1] == ' ')
            p = q + 2;
    }
    /* "2026/11/22 15:40:01.408778 " */
    if (strlen(p) > 20 && p[4] == '/' && p[7] == '/' && p[10] == ' ' && p[13] == ':') {
        const char *sp = strchr(p + 11, ' ');
        if (sp)
            p = sp + 1;
    }
    static const struct {
        const char *tag;
        hl_log_level level;
    } tags[] = {{"[INF] ", HL_LOG_INFO},  {"[WRN] ", HL_LOG_WARN},  {"[ERR] ", HL_LOG_ERROR},
                {"[FTL] ", HL_LOG_ERROR}, {"[DBG] ", HL_LOG_DEBUG}, {"[TRC] ", HL_LOG_DEBUG}};
    for (size_t i = 0; i < sizeof tags / sizeof tags[0]; i++) {
        if (strncmp(p, tags[i].tag, 6) == 0) {
            *level = tags[i].level;
            p += 6;
            break;
        }
    }
    while (*p == ' ')
        p++;
    return p;
}

static void emit_line(hl_nats_server *s, char *line)
{
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\r' || line[n - 1] == '\n'))
        line[--n] = 0;
    if (!n)
        return;
    hl_log_level level;
    const char *msg = parse_line(line, &level);
    if (!*msg)
        return;
    tail_add(s, msg);
    hl_log(level, msg, "component", "nats-server", NULL);
}

typedef struct reader_arg {
    hl_nats_server *s;
    int fd;
} reader_arg;

/* Re-emits the child's output line by line until EOF (the child exited). */
static void *reader_main(void *arg)
{
    reader_arg *ra = arg;
    char line[LINE_MAX_LEN + 1];
    size_t len = 0;
    char chunk[4096];
    for (;;) {
        ssize_t r = read(ra->fd, chunk, sizeof chunk);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        for (ssize_t i = 0; i < r; i++) {
            if (chunk[i] == '\n' || len == LINE_MAX_LEN) {
                line[len] = 0;
                emit_line(ra->s, line);
                len = 0;
                if (chunk[i] == '\n')
                    continue;
            }
            line[len++] = chunk[i];
        }
    }
    if (len) {
        line[len] = 0;
        emit_line(ra->s, line);
    }
    close(ra->fd);
    free(ra);
    return NULL;
}

/* ---- supervisor ---- */

/*
 * Starts one child under s->mu (so stop() either sees its pid or prevents the
 * fork) plus its reader thread. Returns the pid, or -1 when stopping or when
 * fork/pipe failed (logged).
 */
static pid_t start_child(hl_nats_server *s, pthread_t *reader, bool *have_reader)
{
    int p[2];
    *have_reader = false;
    if (pipe2(p, O_CLOEXEC) != 0) {
        hl_logf(HL_LOG_ERROR, "nats-server: pipe: %s", strerror(errno));
        return -1;
    }
    char *argv[] = {(char *)"nats-server", (char *)"-c", s->conf_path, NULL};
    int err = 0;
    pthread_mutex_lock(&s->mu);
    if (s->stopping) {
        pthread_mutex_unlock(&s->mu);
        close(p[0]);
        close(p[1]);
        return -1;
    }
    pid_t pid = spawn(s->bin_path, argv, p[1], &err);
    if (pid > 0) {
        s->pid = pid;
        atomic_store(&s->running, true);
        pthread_cond_broadcast(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    close(p[1]);
    if (pid < 0) {
        hl_log(HL_LOG_ERROR, "cannot start nats-server", "component", "nats-server", "error", strerror(err), NULL);
        close(p[0]);
        return -1;
    }
    if (err)
        hl_log(HL_LOG_ERROR, "cannot exec nats-server", "component", "nats-server", "path", s->bin_path, "error",
               strerror(err), NULL);
    reader_arg *ra = malloc(sizeof *ra);
    if (ra) {
        ra->s = s;
        ra->fd = p[0];
        if (pthread_create(reader, NULL, reader_main, ra) == 0) {
            *have_reader = true;
            return pid;
        }
        free(ra);
    }
    /* Without a reader nobody drains the pipe; the child would block on a full
     * one, so let it write to nowhere instead. */
    hl_log(HL_LOG_ERROR, "cannot start nats-server output reader", "component", "nats-server", NULL);
    close(p[0]);
    return pid;
}

static void *supervisor_main(void *arg)
{
    hl_nats_server *s = arg;
    int backoff = BACKOFF_MIN_MS;
    bool first = true;

    for (;;) {
        pthread_t reader;
        bool have_reader = false;
        if (!first)
            atomic_fetch_add(&s->restarts, 1);
        pid_t pid = start_child(s, &reader, &have_reader);
        int64_t started = now_ms();
        int status = -1;
        first = false;
        if (pid > 0) {
            char pidbuf[24];
            snprintf(pidbuf, sizeof pidbuf, "%d", (int)pid);
            hl_log(HL_LOG_INFO, "nats-server started", "component", "nats-server", "pid", pidbuf, NULL);
            /* Wait without reaping: while the zombie exists its pid cannot be
             * reused, so stop() may still signal s->pid safely. */
            siginfo_t si;
            int r;
            do
                r = waitid(P_PID, (id_t)pid, &si, WEXITED | WNOWAIT);
            while (r < 0 && errno == EINTR);
            pthread_mutex_lock(&s->mu);
            s->pid = 0;
            atomic_store(&s->running, false);
            pthread_mutex_unlock(&s->mu);
            status = reap(pid);
            if (have_reader)
                pthread_join(reader, NULL);
        }

        pthread_mutex_lock(&s->mu);
        s->exits++;
        bool stopping = s->stopping;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);

        char how[96];
        describe_status(status, how, sizeof how);
        if (stopping) {
            if (pid > 0)
                hl_log(HL_LOG_INFO, "nats-server stopped", "component", "nats-server", "status", how, NULL);
            break;
        }
        if (now_ms() - started >= BACKOFF_RESET_UPTIME_MS)
            backoff = BACKOFF_MIN_MS;
        char last[1200], delay[24];
        tail_join(s, 3, last, sizeof last);
        snprintf(delay, sizeof delay, "%d", backoff);
        hl_log(HL_LOG_ERROR, "nats-server died, restarting", "component", "nats-server", "status", how, "restart_in_ms",
               delay, "last_output", last, NULL);

        pthread_mutex_lock(&s->mu);
        int64_t deadline = now_ms() + backoff;
        while (!s->stopping && now_ms() < deadline)
            cv_wait_until(s, deadline);
        stopping = s->stopping;
        pthread_mutex_unlock(&s->mu);
        if (stopping)
            break;
        backoff = backoff >= BACKOFF_MAX_MS / 2 ? BACKOFF_MAX_MS : backoff * 2;
    }

    return NULL;
}

/* ---- TLS files ---- */

/* What identifies a file's content cheaply: a renewal by cert-manager (a new
 * file swapped in through a symlink) changes inode and mtime. */
static void file_stamp(const char *path, char *out, size_t len)
{
    struct stat st;
    if (!path || !*path || stat(path, &st) != 0)
        snprintf(out, len, "-");
    else
        snprintf(out, len, "%llu:%lld.%09ld:%lld", (unsigned long long)st.st_ino, (long long)st.st_mtim.tv_sec,
                 st.st_mtim.tv_nsec, (long long)st.st_size);
}

static void tls_stamp(const hl_config *c, char *out, size_t len)
{
    char a[96], b[96], d[96], e[96], f[96], g[96];
    file_stamp(c->nats.server_cert_file, a, sizeof a);
    file_stamp(c->nats.server_key_file, b, sizeof b);
    file_stamp(c->nats.server_ca_file, d, sizeof d);
    /* The leaf remotes' (the client's) files. */
    file_stamp(c->nats.ca_file, e, sizeof e);
    file_stamp(c->nats.cert_file, f, sizeof f);
    file_stamp(c->nats.key_file, g, sizeof g);
    snprintf(out, len, "%s|%s|%s|%s|%s|%s", a, b, d, e, f, g);
}

/* Renewed certificates take effect without a restart: when the files change
 * the child re-reads its configuration (SIGHUP), which loads them again. */
static void *cert_watch_main(void *arg)
{
    hl_nats_server *s = arg;
    char seen[640], now_stamp[640];
    tls_stamp(s->cfg, seen, sizeof seen);
    pthread_mutex_lock(&s->mu);
    while (!s->stopping) {
        cv_wait_until(s, now_ms() + CERT_CHECK_MS);
        if (s->stopping)
            break;
        pthread_mutex_unlock(&s->mu);
        tls_stamp(s->cfg, now_stamp, sizeof now_stamp);
        bool changed = strcmp(seen, now_stamp) != 0;
        pthread_mutex_lock(&s->mu);
        if (changed) {
            memcpy(seen, now_stamp, sizeof seen);
            if (s->pid > 0)
                kill(s->pid, SIGHUP);
            hl_log(HL_LOG_INFO, "TLS files changed, nats-server reloads them", "component", "nats-server", NULL);
        }
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* ---- readiness ---- */

typedef enum probe_result { PROBE_NO, PROBE_OURS, PROBE_FOREIGN } probe_result;

/* Connects to the client port and reads the server's INFO line: the port is
 * ready when it answers with our server_name. Another process on the port
 * answers with a different name (or none). */
static probe_result probe(hl_nats_server *s, int wait_ms)
{
    struct addrinfo hints, *res = NULL;
    probe_result pr = PROBE_NO;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    if (getaddrinfo(s->probe_host, s->probe_port, &hints, &res) != 0)
        return PROBE_NO;
    for (struct addrinfo *ai = res; ai && pr == PROBE_NO; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
        if (fd < 0)
            continue;
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
            int soerr = 0;
            socklen_t sl = sizeof soerr;
            if (errno != EINPROGRESS || poll(&pfd, 1, wait_ms) != 1 ||
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0 || soerr != 0) {
                close(fd);
                continue;
            }
        }
        char buf[4096];
        size_t len = 0;
        int64_t deadline = now_ms() + wait_ms;
        pfd.events = POLLIN;
        while (len < sizeof buf - 1 && !memchr(buf, '\n', len)) {
            int left = (int)(deadline - now_ms());
            if (left <= 0 || poll(&pfd, 1, left) != 1)
                break;
            ssize_t r = read(fd, buf + len, sizeof buf - 1 - len);
            if (r <= 0)
                break;
            len += (size_t)r;
        }
        buf[len] = 0;
        close(fd);
        if (len == 0)
            continue;
        char want[128];
        snprintf(want, sizeof want, "\"server_name\":\"%s\"", s->expect_name);
        pr = strncmp(buf, "INFO ", 5) == 0 && strstr(buf, want) ? PROBE_OURS : PROBE_FOREIGN;
    }
    freeaddrinfo(res);
    return pr;
}

/* ---- public API ---- */

static void halt(hl_nats_server *s, int timeout_ms);

static void server_free(hl_nats_server *s)
{
    if (!s)
        return;
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s->conf_path);
    free(s->bin_path);
    free(s->probe_host);
    hl_peer_set_free(&s->peers);
    free(s);
}

hl_status hl_nats_server_start(hl_nats_server **out, const hl_config *c, int timeout_ms)
{
    hl_peer_set p;
    hl_peer_set_init(&p);
    hl_status st = hl_peer_set_from_config(c, &p);
    if (!st)
        st = hl_nats_server_start_peers(out, c, &p, timeout_ms);
    else
        *out = NULL;
    hl_peer_set_free(&p);
    return st;
}

static bool is_loopback_host(const char *h)
{
    return strcmp(h, "localhost") == 0 || strncmp(h, "127.", 4) == 0 || strcmp(h, "::1") == 0;
}

/* Says once, at start, what anyone who reaches this server can do. */
static void warn_open_ports(const hl_config *c, const char *client_host)
{
    bool login = (set(c->nats.user_name) && set(c->nats.user_password)) || set(c->nats.seed_file);
    if (!login && !is_loopback_host(client_host))
        hl_log(HL_LOG_WARN,
               "the embedded nats-server's client port is not on loopback and takes anonymous clients: anyone who "
               "reaches it can publish changesets; set nats.user_name and nats.user_password (docs/security.md)",
               "component", "nats-server", "bind_address", c->nats.bind_address, NULL);
    if (set(c->nats.cluster_addr) && !set(c->nats.cluster_password) && !set(c->nats.server_ca_file))
        hl_log(HL_LOG_WARN,
               "the embedded nats-server's cluster port is open: any server that reaches it can join the cluster "
               "and inject changesets; set nats.cluster_password or route TLS with nats.server_ca_file "
               "(docs/security.md)",
               "component", "nats-server", "cluster_addr", c->nats.cluster_addr, NULL);
}

/* Where clients and the readiness probe reach the server: the bind address
 * with a wildcard host replaced by loopback. host receives the bind host. */
static hl_status set_client_url(hl_nats_server *s, const hl_config *c, char *host, size_t hostlen)
{
    const char *bind = c->nats.bind_address ? c->nats.bind_address : "127.0.0.1:4222";
    split_hostport(bind, host, hostlen, s->probe_port, sizeof s->probe_port); /* checked by render */
    s->probe_host = dup_str(is_wildcard_host(host) ? "127.0.0.1" : host);
    if (!s->probe_host)
        return HL_ERR_NOMEM;
    snprintf(s->client_url, sizeof s->client_url, strchr(s->probe_host, ':') ? "nats://[%s]:%s" : "nats://%s:%s",
             s->probe_host, s->probe_port);
    snprintf(s->expect_name, sizeof s->expect_name, "harmonylite-%llu", (unsigned long long)c->node_id);
    return HL_OK;
}

/* Writes the rendered config to <data_dir>/nats/CONF_NAME, remembered in
 * s->conf_path, creating the directory. */
static hl_status write_conf(hl_nats_server *s, const hl_config *c, const hl_buf *conf)
{
    hl_buf dir;
    hl_buf_init(&dir, PATH_MAX * 4);
    hl_status st = nats_dir(c, &dir);
    if (st)
        goto out;
    if (mkdir_p(hl_buf_str(&dir), 0750)) {
        hl_log(HL_LOG_ERROR, "cannot create nats directory", "component", "nats-server", "path", hl_buf_str(&dir),
               "error", strerror(errno), NULL);
        st = HL_ERR_IO;
        goto out;
    }
    st = hl_buf_adds(&dir, "/" CONF_NAME);
    if (st)
        goto out;
    s->conf_path = dup_str(hl_buf_str(&dir));
    if (!s->conf_path) {
        st = HL_ERR_NOMEM;
        goto out;
    }
    st = write_atomic(s->conf_path, hl_buf_str(conf), conf->len);
out:
    hl_buf_free(&dir);
    return st;
}

/* Ready = our child answers on the client port. A child that exits while
 * starting fails the start at once: its output says why (port in use, bad
 * store dir) and a restart loop would only hide it. On failure the child is
 * halted and its last lines logged. */
static hl_status wait_ready(hl_nats_server *s, int64_t deadline, int timeout_ms)
{
    const char *why = "timed out";
    hl_status st = HL_ERR_TIMEOUT;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        bool died = s->exits > 0;
        pthread_mutex_unlock(&s->mu);
        if (died) {
            why = "exited while starting";
            st = HL_ERR_IO;
            break;
        }
        if (atomic_load(&s->running)) {
            probe_result pr = probe(s, 200);
            if (pr == PROBE_OURS)
                return HL_OK;
            if (pr == PROBE_FOREIGN)
                why = "another process answers on the client port (or server_name was overridden)";
        }
        if (now_ms() >= deadline)
            break;
        pthread_mutex_lock(&s->mu);
        int64_t next = now_ms() + 50;
        cv_wait_until(s, next < deadline ? next : deadline);
        pthread_mutex_unlock(&s->mu);
    }
    char last[2400], tmo[24];
    /* Halting joins the reader, so every line a dying child printed is in
     * the tail before we quote it. */
    halt(s, 0);
    tail_join(s, 6, last, sizeof last);
    snprintf(tmo, sizeof tmo, "%d", timeout_ms);
    hl_log(HL_LOG_ERROR, "nats-server did not start", "component", "nats-server", "reason", why, "timeout_ms", tmo,
           "url", s->client_url, "last_output", last, NULL);
    return st;
}

hl_status hl_nats_server_start_peers(hl_nats_server **out, const hl_config *c, const hl_peer_set *peers, int timeout_ms)
{
    hl_status st = HL_OK;
    hl_buf conf;
    hl_nats_server *s = NULL;
    char host[256];
    int64_t deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    hl_buf_init(&conf, 1 << 20);
    *out = NULL;

    s = calloc(1, sizeof *s);
    if (!s) {
        st = HL_ERR_NOMEM;
        goto out;
    }
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&s->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&s->mu, NULL);
    atomic_init(&s->running, false);
    atomic_init(&s->restarts, 0);
    s->cfg = c;
    hl_peer_set_init(&s->peers);
    st = hl_peer_set_copy(&s->peers, peers);
    if (!st)
        st = hl_nats_server_render(c, &s->peers, &conf);
    if (!st)
        st = set_client_url(s, c, host, sizeof host);
    if (!st)
        st = write_conf(s, c, &conf);
    if (st)
        goto out;

    const char *bin = c->nats.server_bin && *c->nats.server_bin ? c->nats.server_bin : "nats-server";
    s->bin_path = resolve_bin(bin);
    if (!s->bin_path) {
        hl_log(HL_LOG_ERROR, "nats-server executable not found (set nats.server_bin)", "component", "nats-server",
               "server_bin", bin, NULL);
        st = HL_ERR_CONFIG;
        goto out;
    }
    st = validate_config(s->bin_path, s->conf_path);
    if (st)
        goto out;
    warn_open_ports(c, host);

    if (pthread_create(&s->supervisor, NULL, supervisor_main, s) != 0) {
        st = HL_ERR_INTERNAL;
        goto out;
    }
    s->supervisor_started = true;
    bool leaf_tls = s->peers.leafs.n > 0 && (set(c->nats.ca_file) || set(c->nats.cert_file));
    if ((set(c->nats.server_cert_file) || leaf_tls) && pthread_create(&s->certwatch, NULL, cert_watch_main, s) == 0)
        s->certwatch_started = true;

    st = wait_ready(s, deadline, timeout_ms);
    if (!st)
        hl_log(HL_LOG_INFO, "nats-server ready", "component", "nats-server", "url", s->client_url, NULL);
out:
    if (st && s) {
        hl_nats_server_stop(s, 0);
        s = NULL;
    }
    hl_buf_free(&conf);
    *out = s;
    return st;
}

const char *hl_nats_server_client_url(const hl_nats_server *s)
{
    return s->client_url;
}

bool hl_nats_server_running(const hl_nats_server *s)
{
    return atomic_load(&s->running);
}

uint64_t hl_nats_server_restarts(const hl_nats_server *s)
{
    return atomic_load(&s->restarts);
}

/* Reads at most limit bytes of path into out; HL_ERR_IO when it cannot be read. */
static hl_status read_small_file(const char *path, hl_buf *out, size_t limit)
{
    char chunk[4096];
    size_t n;
    hl_status st = HL_OK;
    FILE *f = fopen(path, "re");
    if (!f)
        return HL_ERR_IO;
    while (!st && (n = fread(chunk, 1, sizeof chunk, f)) > 0)
        st = out->len + n > limit ? HL_ERR_TOO_LARGE : hl_buf_add(out, chunk, n);
    if (!st && ferror(f))
        st = HL_ERR_IO;
    fclose(f);
    return st;
}

hl_status hl_nats_server_reload(hl_nats_server *s)
{
    hl_peer_set p;
    hl_peer_set_init(&p);
    hl_status st = hl_peer_set_from_config(s->cfg, &p);
    if (!st)
        st = hl_nats_server_apply_peers(s, &p);
    hl_peer_set_free(&p);
    return st;
}

hl_status hl_nats_server_peers(hl_nats_server *s, hl_peer_set *out)
{
    pthread_mutex_lock(&s->mu);
    hl_status st = hl_peer_set_copy(out, &s->peers);
    pthread_mutex_unlock(&s->mu);
    return st;
}

hl_status hl_nats_server_apply_peers(hl_nats_server *s, const hl_peer_set *peers)
{
    hl_buf conf, cur, next_path;
    hl_status st;
    hl_peer_set copy;
    hl_peer_set_init(&copy);
    hl_buf_init(&conf, 1 << 20);
    hl_buf_init(&cur, 1 << 20);
    hl_buf_init(&next_path, PATH_MAX * 4);

    st = hl_peer_set_copy(&copy, peers);
    if (!st)
        st = hl_nats_server_render(s->cfg, &copy, &conf);
    if (st)
        goto out;
    if (read_small_file(s->conf_path, &cur, 1 << 20) == HL_OK && cur.len == conf.len &&
        memcmp(hl_buf_str(&cur), hl_buf_str(&conf), conf.len) == 0)
        goto out; /* unchanged: periodic re-resolution must not cause reloads */
    /* Checked next to the real file so relative includes resolve the same. */
    st = hl_buf_addf(&next_path, "%s.next", s->conf_path);
    if (!st)
        st = write_atomic(hl_buf_str(&next_path), hl_buf_str(&conf), conf.len);
    if (!st)
        st = validate_config(s->bin_path, hl_buf_str(&next_path));
    if (st) {
        unlink(hl_buf_str(&next_path));
        goto out;
    }
    if (rename(hl_buf_str(&next_path), s->conf_path) != 0) {
        hl_logf(HL_LOG_ERROR, "renaming %s: %s", hl_buf_str(&next_path), strerror(errno));
        st = HL_ERR_IO;
        goto out;
    }
    pthread_mutex_lock(&s->mu);
    /* A child restarted in between reads the new file itself. */
    if (s->pid > 0)
        kill(s->pid, SIGHUP);
    hl_peer_set t = s->peers;
    s->peers = copy;
    copy = t;
    pthread_mutex_unlock(&s->mu);
    hl_log(HL_LOG_INFO, "nats-server config changed, reloading", "component", "nats-server", NULL);
out:
    hl_peer_set_free(&copy);
    hl_buf_free(&conf);
    hl_buf_free(&cur);
    hl_buf_free(&next_path);
    return st;
}

int hl_nats_server_pid(const hl_nats_server *s)
{
    hl_nats_server *m = (hl_nats_server *)s;
    pthread_mutex_lock(&m->mu);
    int pid = (int)m->pid;
    pthread_mutex_unlock(&m->mu);
    return pid;
}

/* Stops supervising and ends the child (lame duck, then SIGKILL at the
 * deadline); joins the threads. Idempotent. */
static void halt(hl_nats_server *s, int timeout_ms)
{
    if (!s->supervisor_started)
        return;
    int64_t deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    pthread_mutex_lock(&s->mu);
    s->stopping = true;
    pthread_cond_broadcast(&s->cv);
    if (s->pid > 0) {
        /* SIGUSR2 = lame duck: stop accepting, let clients move to the other
         * servers, hand over JetStream leaderships, then exit. */
        kill(s->pid, timeout_ms > 0 ? SIGUSR2 : SIGKILL);
        while (s->pid > 0 && now_ms() < deadline)
            cv_wait_until(s, deadline);
        if (s->pid > 0) {
            if (timeout_ms > 0)
                hl_log(HL_LOG_WARN, "nats-server did not stop in time, killing it", "component", "nats-server", NULL);
            kill(s->pid, SIGKILL);
        }
    }
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->supervisor, NULL);
    s->supervisor_started = false;
    if (s->certwatch_started)
        pthread_join(s->certwatch, NULL);
    s->certwatch_started = false;
}

void hl_nats_server_stop(hl_nats_server *s, int timeout_ms)
{
    if (!s)
        return;
    halt(s, timeout_ms);
    server_free(s);
}
