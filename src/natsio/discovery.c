/*
 * discovery.c - peers of the embedded nats-server from DNS, with c-ares.
 *
 * One thread per node: every nats.discovery_interval it opens a c-ares
 * channel (so a changed resolv.conf is picked up), sends one query per DNS
 * entry (SRV, or A and AAAA), drives them with poll() until they are answered
 * or time out, and builds the peer set. Nothing here blocks the engine: the
 * engine's setup thread only waits in hl_discovery_start() for the first
 * nats.cluster_min_peers peers, which is what holds /readyz.
 *
 * Every name from DNS passes hl_discovery_valid_host() before it becomes part
 * of a route URL; the config renderer quotes it again (defence in depth).
 */
#include "natsio/discovery.h"

#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <ares.h>
#include <ctype.h>
#include <errno.h>
#include <ifaddrs.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"

#define LOOKUP_TIMEOUT_MS 5000 /* a whole round of lookups */
#define MAX_OWN_ADDRS 64

/* ---- pure parts: entries, names, answers ---- */

bool hl_discovery_is_dns(const char *v)
{
    return v && (strncasecmp(v, "dns://", 6) == 0 || strncasecmp(v, "dns+srv://", 10) == 0);
}

bool hl_discovery_valid_host(const char *name)
{
    size_t n = strlen(name);
    if (n > 0 && name[n - 1] == '.')
        n--;
    if (n == 0 || n > 253)
        return false;
    size_t label = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)name[i];
        if (ch == '.') {
            if (label == 0 || name[i - 1] == '-')
                return false;
            label = 0;
            continue;
        }
        if (!(isascii(ch) && (isalnum(ch) || ch == '-')))
            return false;
        if (ch == '-' && label == 0)
            return false;
        if (++label > 63)
            return false;
    }
    return name[n - 1] != '-';
}

/* An SRV owner name: "_<service>._tcp.<name>" (or _udp); the labels after the
 * two underscore ones follow the host name rules. */
static bool valid_srv_name(const char *name)
{
    const char *p = name;
    for (int i = 0; i < 2; i++) {
        if (*p != '_')
            return false;
        const char *dot = strchr(p, '.');
        if (!dot || dot - p < 2 || dot - p > 64)
            return false;
        for (const char *q = p + 1; q < dot; q++)
            if (!(isascii((unsigned char)*q) && (isalnum((unsigned char)*q) || *q == '-')))
                return false;
        p = dot + 1;
    }
    return hl_discovery_valid_host(p);
}

hl_status hl_discovery_parse_entry(const char *v, hl_dns_entry *out)
{
    memset(out, 0, sizeof *out);
    if (strncasecmp(v, "dns+srv://", 10) == 0) {
        const char *name = v + 10;
        size_t n = strlen(name);
        if (n > 0 && name[n - 1] == '.')
            n--;
        if (n == 0 || n >= sizeof out->name)
            return HL_ERR_CONFIG;
        memcpy(out->name, name, n);
        out->name[n] = 0;
        if (!valid_srv_name(out->name))
            return HL_ERR_CONFIG;
        out->kind = HL_DNS_SRV;
        return HL_OK;
    }
    if (strncasecmp(v, "dns://", 6) == 0) {
        const char *name = v + 6;
        const char *colon = strrchr(name, ':');
        if (!colon)
            return HL_ERR_CONFIG;
        size_t n = (size_t)(colon - name);
        if (n > 0 && name[n - 1] == '.')
            n--;
        if (n == 0 || n >= sizeof out->name)
            return HL_ERR_CONFIG;
        memcpy(out->name, name, n);
        out->name[n] = 0;
        if (!hl_discovery_valid_host(out->name))
            return HL_ERR_CONFIG;
        char *end = NULL;
        errno = 0;
        long port = strtol(colon + 1, &end, 10);
        if (errno || end == colon + 1 || *end || port < 1 || port > 65535 || !isdigit((unsigned char)colon[1]))
            return HL_ERR_CONFIG;
        out->kind = HL_DNS_ADDR;
        out->port = (int)port;
        return HL_OK;
    }
    return HL_ERR_CONFIG;
}

hl_status hl_discovery_srv_routes(const unsigned char *abuf, int alen, hl_peer_set *out, size_t *rejected)
{
    struct ares_srv_reply *srv = NULL;
    *rejected = 0;
    int r = ares_parse_srv_reply(abuf, alen, &srv);
    if (r == ARES_ENODATA)
        return HL_ERR_NOT_FOUND;
    if (r != ARES_SUCCESS)
        return HL_ERR_INVALID;
    hl_status st = HL_OK;
    size_t taken = 0, records = 0;
    for (struct ares_srv_reply *s = srv; s && !st; s = s->next) {
        records++;
        if (!s->host || !hl_discovery_valid_host(s->host) || s->port == 0 || taken >= HL_DISCOVERY_MAX_ANSWERS) {
            (*rejected)++;
            continue;
        }
        char host[256], url[300];
        size_t n = strlen(s->host);
        if (s->host[n - 1] == '.')
            n--;
        for (size_t i = 0; i < n; i++)
            host[i] = (char)tolower((unsigned char)s->host[i]);
        host[n] = 0;
        snprintf(url, sizeof url, "nats://%s:%u", host, (unsigned)s->port);
        st = hl_peer_set_add_route(out, url);
        taken++;
    }
    ares_free_data(srv);
    if (!st && records == 0)
        st = HL_ERR_NOT_FOUND;
    return st;
}

hl_status hl_discovery_addr_routes(const unsigned char *abuf, int alen, bool ipv6, int port, hl_peer_set *out)
{
    enum { CAP = HL_DISCOVERY_MAX_ANSWERS };
    if (port < 1 || port > 65535)
        return HL_ERR_INVALID;
    struct ares_addr6ttl *a6 = NULL;
    struct ares_addrttl *a4 = NULL;
    void *a = ipv6 ? (void *)(a6 = calloc(CAP, sizeof *a6)) : (void *)(a4 = calloc(CAP, sizeof *a4));
    if (!a)
        return HL_ERR_NOMEM;
    int n = CAP;
    int r = ipv6 ? ares_parse_aaaa_reply(abuf, alen, NULL, a6, &n) : ares_parse_a_reply(abuf, alen, NULL, a4, &n);
    hl_status st = r == ARES_ENODATA   ? HL_ERR_NOT_FOUND
                   : r != ARES_SUCCESS ? HL_ERR_INVALID
                   : n == 0            ? HL_ERR_NOT_FOUND
                                       : HL_OK;
    for (int i = 0; !st && i < n; i++) {
        char addr[INET6_ADDRSTRLEN], url[INET6_ADDRSTRLEN + 32];
        if (ipv6) {
            inet_ntop(AF_INET6, &a6[i].ip6addr, addr, sizeof addr);
            snprintf(url, sizeof url, "nats://[%s]:%d", addr, port);
        } else {
            inet_ntop(AF_INET, &a4[i].ipaddr, addr, sizeof addr);
            snprintf(url, sizeof url, "nats://%s:%d", addr, port);
        }
        st = hl_peer_set_add_route(out, url);
    }
    free(a);
    return st;
}

/* ---- the discovery thread ---- */

typedef struct own_addr {
    int family;
    unsigned char addr[16];
} own_addr;

typedef struct entry_state {
    hl_dns_entry e;
    hl_peer_set good; /* last good answer, self removed */
    bool have_good;
    bool failing; /* the failure was logged; log again only after a success */
    /* this round */
    hl_peer_set got;
    int pending;
    int answers; /* queries that answered with records */
    int errors;  /* queries that failed other than "no such records" */
    size_t rejected;
} entry_state;

struct hl_discovery {
    const hl_config *cfg;
    entry_state *entries;
    size_t nentries;
    own_addr own[MAX_OWN_ADDRS];
    size_t nown;
    int own_port;
    int interval_ms;
    int min_peers;

    pthread_mutex_t mu;
    pthread_cond_t cv; /* CLOCK_MONOTONIC */
    bool stopping;
    hl_peer_set current; /* guarded by mu */
    hl_nats_server *srv; /* guarded by mu */
    pthread_t thread;
    bool thread_started;
    uint64_t rounds; /* guarded by mu */
};

static pthread_once_t ares_once = PTHREAD_ONCE_INIT;
static int ares_init_status;

static void ares_init_once(void)
{
    ares_init_status = ares_library_init(ARES_LIB_INIT_ALL);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void add_own(hl_discovery *d, const struct sockaddr *sa)
{
    if (d->nown >= MAX_OWN_ADDRS || !sa)
        return;
    own_addr *o = &d->own[d->nown];
    if (sa->sa_family == AF_INET) {
        o->family = AF_INET;
        memcpy(o->addr, &((const struct sockaddr_in *)(const void *)sa)->sin_addr, 4);
    } else if (sa->sa_family == AF_INET6) {
        o->family = AF_INET6;
        memcpy(o->addr, &((const struct sockaddr_in6 *)(const void *)sa)->sin6_addr, 16);
    } else {
        return;
    }
    d->nown++;
}

/* This node's cluster listener: its address(es) and port. A wildcard address
 * stands for every local interface address. */
static void find_own(hl_discovery *d)
{
    const char *ca = d->cfg->nats.cluster_addr;
    char host[256] = "";
    if (!ca || !*ca)
        return;
    const char *colon = strrchr(ca, ':');
    if (!colon)
        return;
    d->own_port = atoi(colon + 1);
    const char *h = ca;
    size_t n = (size_t)(colon - ca);
    if (n >= 2 && h[0] == '[' && h[n - 1] == ']') {
        h++;
        n -= 2;
    }
    if (n >= sizeof host)
        return;
    memcpy(host, h, n);
    host[n] = 0;
    if (!*host || strcmp(host, "0.0.0.0") == 0 || strcmp(host, "::") == 0 || strcmp(host, "*") == 0) {
        struct ifaddrs *ifs = NULL;
        if (getifaddrs(&ifs) == 0) {
            for (struct ifaddrs *i = ifs; i; i = i->ifa_next)
                add_own(d, i->ifa_addr);
            freeifaddrs(ifs);
        }
        return;
    }
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    if (getaddrinfo(host, NULL, &hints, &res) == 0) {
        for (struct addrinfo *ai = res; ai; ai = ai->ai_next)
            add_own(d, ai->ai_addr);
        freeaddrinfo(res);
    }
}

static bool is_own(const hl_discovery *d, int family, const void *addr, int port)
{
    if (port != d->own_port)
        return false;
    for (size_t i = 0; i < d->nown; i++)
        if (d->own[i].family == family && memcmp(d->own[i].addr, addr, family == AF_INET ? 4 : 16) == 0)
            return true;
    return false;
}

/* Splits a route URL "nats://host:port" made above into host and port. */
static bool route_host_port(const char *url, char *host, size_t hostlen, int *port)
{
    const char *h = strstr(url, "://");
    if (!h)
        return false;
    h += 3;
    const char *colon = strrchr(h, ':');
    if (!colon)
        return false;
    size_t n = (size_t)(colon - h);
    if (n >= 2 && h[0] == '[') {
        h++;
        n -= 2;
    }
    if (n >= hostlen)
        return false;
    memcpy(host, h, n);
    host[n] = 0;
    *port = atoi(colon + 1);
    return true;
}

/* ---- one round of lookups ---- */

typedef struct query_arg {
    entry_state *es;
    int *inflight; /* the round's count of unanswered queries */
    bool ipv6;
} query_arg;

static void on_answer(void *arg, int status, int timeouts, unsigned char *abuf, int alen)
{
    (void)timeouts;
    query_arg *qa = arg;
    entry_state *es = qa->es;
    es->pending--;
    (*qa->inflight)--;
    if (status == ARES_SUCCESS) {
        hl_status st;
        size_t rejected = 0;
        if (es->e.kind == HL_DNS_SRV)
            st = hl_discovery_srv_routes(abuf, alen, &es->got, &rejected);
        else
            st = hl_discovery_addr_routes(abuf, alen, qa->ipv6, es->e.port, &es->got);
        es->rejected += rejected;
        if (st == HL_OK)
            es->answers++;
        else if (st != HL_ERR_NOT_FOUND)
            es->errors++;
    } else if (status != ARES_ENODATA && status != ARES_ENOTFOUND) {
        es->errors++;
    }
    free(qa);
}

static void query(ares_channel ch, entry_state *es, int *inflight, int type, bool ipv6)
{
    query_arg *qa = malloc(sizeof *qa);
    if (!qa) {
        es->errors++;
        return;
    }
    qa->es = es;
    qa->inflight = inflight;
    qa->ipv6 = ipv6;
    es->pending++;
    (*inflight)++;
    ares_search(ch, es->e.name, ns_c_in, type, on_answer, qa);
}

/* SRV targets by host name: resolved once per round (through the same
 * resolver) only to recognize this node's own route. */
typedef struct self_arg {
    hl_discovery *d;
    int port;
    bool *own;
    int *pending;
} self_arg;

static void on_addrinfo(void *arg, int status, int timeouts, struct ares_addrinfo *res)
{
    (void)timeouts;
    self_arg *sa = arg;
    (*sa->pending)--;
    if (status == ARES_SUCCESS && res) {
        for (struct ares_addrinfo_node *n = res->nodes; n; n = n->ai_next) {
            const void *a = n->ai_family == AF_INET
                                ? (const void *)&((const struct sockaddr_in *)(const void *)n->ai_addr)->sin_addr
                                : (const void *)&((const struct sockaddr_in6 *)(const void *)n->ai_addr)->sin6_addr;
            if ((n->ai_family == AF_INET || n->ai_family == AF_INET6) && is_own(sa->d, n->ai_family, a, sa->port))
                *sa->own = true;
        }
    }
    if (res)
        ares_freeaddrinfo(res);
    free(sa);
}

/* Drives the channel until nothing is pending (the callbacks count *pending
 * down), the deadline passes or we stop; what is left then is cancelled, so
 * no callback runs after this returns. */
static void drive(hl_discovery *d, ares_channel ch, const int *pending, int64_t deadline)
{
    while (*pending > 0) {
        pthread_mutex_lock(&d->mu);
        bool stopping = d->stopping;
        pthread_mutex_unlock(&d->mu);
        int64_t left = deadline - now_ms();
        if (stopping || left <= 0)
            break;
        ares_socket_t socks[ARES_GETSOCK_MAXNUM];
        int bits = ares_getsock(ch, socks, ARES_GETSOCK_MAXNUM);
        struct pollfd pfd[ARES_GETSOCK_MAXNUM];
        int n = 0;
        for (int i = 0; i < ARES_GETSOCK_MAXNUM; i++) {
            short ev = 0;
            /* c-ares' ARES_GETSOCK_WRITABLE shifts a signed 1 into bit 31. */
            if (((unsigned)bits >> i) & 1u)
                ev |= POLLIN;
            if (((unsigned)bits >> (i + ARES_GETSOCK_MAXNUM)) & 1u)
                ev |= POLLOUT;
            if (!ev)
                continue;
            pfd[n].fd = socks[i];
            pfd[n].events = ev;
            pfd[n].revents = 0;
            n++;
        }
        struct timeval maxtv = {0, 100000}, tv; /* wake at least every 100 ms to notice stop */
        struct timeval *tvp = ares_timeout(ch, &maxtv, &tv);
        int wait = (int)(tvp->tv_sec * 1000 + tvp->tv_usec / 1000);
        if (wait > left)
            wait = (int)left;
        int r = poll(pfd, (nfds_t)n, wait);
        if (r < 0 && errno != EINTR)
            break;
        if (r <= 0) {
            ares_process_fd(ch, ARES_SOCKET_BAD, ARES_SOCKET_BAD); /* timeouts */
            continue;
        }
        for (int i = 0; i < n; i++) {
            if (!pfd[i].revents)
                continue;
            ares_socket_t rd = pfd[i].revents & (POLLIN | POLLERR | POLLHUP) ? pfd[i].fd : ARES_SOCKET_BAD;
            ares_socket_t wr = pfd[i].revents & (POLLOUT | POLLERR | POLLHUP) ? pfd[i].fd : ARES_SOCKET_BAD;
            ares_process_fd(ch, rd, wr);
        }
    }
    if (*pending > 0)
        ares_cancel(ch); /* runs the callbacks with ARES_ECANCELLED */
}

static hl_status open_channel(hl_discovery *d, ares_channel *ch)
{
    struct ares_options opts;
    memset(&opts, 0, sizeof opts);
    opts.timeout = 2000; /* per try, ms */
    opts.tries = 2;
    int r = ares_init_options(ch, &opts, ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES);
    if (r != ARES_SUCCESS) {
        hl_log(HL_LOG_ERROR, "discovery: cannot set up the DNS resolver", "component", "discovery", "error",
               ares_strerror(r), NULL);
        return HL_ERR_IO;
    }
    const char *res = d->cfg->nats.discovery_resolver;
    if (res && *res && (r = ares_set_servers_ports_csv(*ch, res)) != ARES_SUCCESS) {
        hl_log(HL_LOG_ERROR, "discovery: nats.discovery_resolver not usable", "component", "discovery", "error",
               ares_strerror(r), NULL);
        ares_destroy(*ch);
        return HL_ERR_CONFIG;
    }
    return HL_OK;
}

/* Removes this node's own route(s) from es->got. */
static void drop_self(hl_discovery *d, ares_channel ch, entry_state *es, int64_t deadline)
{
    size_t n = es->got.routes.n;
    if (n == 0 || d->own_port == 0)
        return;
    bool *own = calloc(n, sizeof *own);
    if (!own)
        return;
    int pending = 0;
    for (size_t i = 0; i < n; i++) {
        char host[256];
        int port;
        unsigned char a[16];
        if (!route_host_port(es->got.routes.v[i], host, sizeof host, &port))
            continue;
        if (inet_pton(AF_INET, host, a) == 1)
            own[i] = is_own(d, AF_INET, a, port);
        else if (inet_pton(AF_INET6, host, a) == 1)
            own[i] = is_own(d, AF_INET6, a, port);
        else if (port == d->own_port) {
            self_arg *sa = malloc(sizeof *sa);
            if (!sa)
                continue;
            sa->d = d;
            sa->port = port;
            sa->own = &own[i];
            sa->pending = &pending;
            struct ares_addrinfo_hints hints;
            memset(&hints, 0, sizeof hints);
            hints.ai_family = AF_UNSPEC;
            pending++;
            ares_getaddrinfo(ch, host, NULL, &hints, on_addrinfo, sa);
        }
    }
    drive(d, ch, &pending, deadline);
    hl_peer_set kept;
    hl_peer_set_init(&kept);
    for (size_t i = 0; i < n; i++)
        if (!own[i])
            hl_peer_set_add_route(&kept, es->got.routes.v[i]);
    hl_peer_set_free(&es->got);
    es->got = kept;
    free(own);
}

/* One round: looks every entry up and folds the answers into each entry's
 * last good set. Returns false when the channel could not be opened. */
static bool lookup_round(hl_discovery *d)
{
    ares_channel ch;
    if (open_channel(d, &ch))
        return false;
    int64_t deadline = now_ms() + LOOKUP_TIMEOUT_MS;
    int inflight = 0;
    for (size_t i = 0; i < d->nentries; i++) {
        entry_state *es = &d->entries[i];
        hl_peer_set_free(&es->got);
        es->pending = es->answers = es->errors = 0;
        es->rejected = 0;
        if (es->e.kind == HL_DNS_SRV) {
            query(ch, es, &inflight, ns_t_srv, false);
        } else {
            query(ch, es, &inflight, ns_t_a, false);
            query(ch, es, &inflight, ns_t_aaaa, true);
        }
    }
    drive(d, ch, &inflight, deadline);

    for (size_t i = 0; i < d->nentries; i++) {
        entry_state *es = &d->entries[i];
        if (es->answers > 0)
            drop_self(d, ch, es, now_ms() + LOOKUP_TIMEOUT_MS);
        char nbuf[24];
        if (es->rejected) {
            snprintf(nbuf, sizeof nbuf, "%zu", es->rejected);
            hl_log(HL_LOG_WARN, "discovery: ignored SRV records with an unusable target (not a host name) or port",
                   "component", "discovery", "entry", es->e.name, "records", nbuf, NULL);
        }
        if (es->answers > 0 && es->got.routes.n > 0) {
            if (es->failing)
                hl_log(HL_LOG_INFO, "discovery: DNS answers again", "component", "discovery", "entry", es->e.name,
                       NULL);
            es->failing = false;
            hl_peer_set t = es->good;
            es->good = es->got;
            es->got = t;
            hl_peer_set_free(&es->got);
            es->have_good = true;
        } else if (!es->failing) {
            snprintf(nbuf, sizeof nbuf, "%zu", es->good.routes.n);
            hl_log(HL_LOG_WARN,
                   es->answers == 0 ? "discovery: DNS lookup failed; keeping the last known peers"
                                    : "discovery: DNS answer holds no other peer; keeping the last known peers",
                   "component", "discovery", "entry", es->e.name, "kept", nbuf, NULL);
            es->failing = true;
        }
    }
    ares_destroy(ch);
    return true;
}

/* The fixed peers plus every entry's last good answer. */
static hl_status merged(hl_discovery *d, hl_peer_set *out)
{
    hl_status st = hl_peer_set_from_config(d->cfg, out);
    for (size_t i = 0; !st && i < d->nentries; i++)
        for (size_t j = 0; !st && j < d->entries[i].good.routes.n; j++)
            st = hl_peer_set_add_route(out, d->entries[i].good.routes.v[j]);
    return st;
}

static void log_changes(const hl_peer_set *from, const hl_peer_set *to)
{
    hl_peer_set added, removed;
    hl_peer_set_init(&added);
    hl_peer_set_init(&removed);
    if (hl_peer_set_diff(from, to, &added, &removed) == HL_OK) {
        for (size_t i = 0; i < added.routes.n; i++)
            hl_log(HL_LOG_INFO, "discovery: route added", "component", "discovery", "route", added.routes.v[i], NULL);
        for (size_t i = 0; i < removed.routes.n; i++)
            hl_log(HL_LOG_INFO, "discovery: route removed", "component", "discovery", "route", removed.routes.v[i],
                   NULL);
    }
    hl_peer_set_free(&added);
    hl_peer_set_free(&removed);
}

/* After a round: publishes the merged set and applies it to the server. */
static void publish(hl_discovery *d)
{
    hl_peer_set next, applied;
    hl_peer_set_init(&next);
    hl_peer_set_init(&applied);
    if (merged(d, &next)) {
        hl_peer_set_free(&next);
        return;
    }
    pthread_mutex_lock(&d->mu);
    hl_peer_set_copy(&d->current, &next);
    hl_nats_server *srv = d->srv;
    d->rounds++;
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
    /* Compared with what the server runs, not with the last round: a reload
     * that failed is tried again next round. */
    if (srv && hl_nats_server_peers(srv, &applied) == HL_OK && !hl_peer_set_equal(&applied, &next) &&
        next.routes.n > 0) {
        log_changes(&applied, &next);
        hl_status st = hl_nats_server_apply_peers(srv, &next);
        if (st)
            hl_log(HL_LOG_ERROR, "discovery: cannot apply the new peers; will retry", "component", "discovery", "error",
                   hl_status_str(st), NULL);
    }
    hl_peer_set_free(&next);
    hl_peer_set_free(&applied);
}

static void *discovery_main(void *arg)
{
    hl_discovery *d = arg;
    for (;;) {
        int64_t started = now_ms();
        lookup_round(d);
        publish(d);
        pthread_mutex_lock(&d->mu);
        int64_t deadline = started + d->interval_ms;
        while (!d->stopping && now_ms() < deadline) {
            struct timespec ts = {(time_t)(deadline / 1000), (long)(deadline % 1000) * 1000000L};
            pthread_cond_timedwait(&d->cv, &d->mu, &ts);
        }
        bool stopping = d->stopping;
        pthread_mutex_unlock(&d->mu);
        if (stopping)
            break;
    }
    return NULL;
}

static void discovery_free(hl_discovery *d)
{
    for (size_t i = 0; i < d->nentries; i++) {
        hl_peer_set_free(&d->entries[i].good);
        hl_peer_set_free(&d->entries[i].got);
    }
    free(d->entries);
    hl_peer_set_free(&d->current);
    pthread_cond_destroy(&d->cv);
    pthread_mutex_destroy(&d->mu);
    free(d);
}

/* A discovery for the ndns DNS entries of nats.cluster_peers, its thread not
 * yet started. */
static hl_status discovery_new(hl_discovery **out, const hl_config *c, size_t ndns)
{
    hl_discovery *d = calloc(1, sizeof *d);
    if (!d)
        return HL_ERR_NOMEM;
    d->entries = calloc(ndns, sizeof *d->entries);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&d->cv, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&d->mu, NULL);
    hl_peer_set_init(&d->current);
    d->cfg = c;
    d->interval_ms = (c->nats.discovery_interval_s > 0 ? c->nats.discovery_interval_s : 30) * 1000;
    d->min_peers = c->nats.cluster_min_peers > 0 ? c->nats.cluster_min_peers : 0;
    if (!d->entries) {
        discovery_free(d);
        return HL_ERR_NOMEM;
    }
    for (size_t i = 0; i < c->nats.cluster_peers.n; i++) {
        const char *v = c->nats.cluster_peers.v[i];
        if (!hl_discovery_is_dns(v))
            continue;
        entry_state *es = &d->entries[d->nentries];
        hl_peer_set_init(&es->good);
        hl_peer_set_init(&es->got);
        if (hl_discovery_parse_entry(v, &es->e)) {
            hl_log(HL_LOG_ERROR, "nats.cluster_peers: malformed DNS entry", "component", "discovery", "value", v, NULL);
            discovery_free(d);
            return HL_ERR_CONFIG;
        }
        d->nentries++;
    }
    *out = d;
    return HL_OK;
}

/* Hold until enough peers are known: servers that start alone form clusters
 * of their own. Logged when the count changes, not per round. HL_ERR_STOPPED
 * when *stop is raised first. */
static hl_status wait_min_peers(hl_discovery *d, const volatile int *stop)
{
    hl_status st = HL_OK;
    size_t last_logged = SIZE_MAX;
    uint64_t seen_rounds = 0;
    pthread_mutex_lock(&d->mu);
    for (;;) {
        if (d->rounds > seen_rounds) {
            seen_rounds = d->rounds;
            if (d->current.routes.n >= (size_t)d->min_peers)
                break;
            if (d->current.routes.n != last_logged) {
                char have[24], want[24];
                snprintf(have, sizeof have, "%zu", d->current.routes.n);
                snprintf(want, sizeof want, "%d", d->min_peers);
                hl_log(HL_LOG_INFO, "discovery: waiting for peers (nats.cluster_min_peers) before starting nats-server",
                       "component", "discovery", "known", have, "needed", want, NULL);
                last_logged = d->current.routes.n;
            }
        }
        if (stop && *stop) {
            st = HL_ERR_STOPPED;
            break;
        }
        int64_t deadline = now_ms() + 200;
        struct timespec ts = {(time_t)(deadline / 1000), (long)(deadline % 1000) * 1000000L};
        pthread_cond_timedwait(&d->cv, &d->mu, &ts);
    }
    pthread_mutex_unlock(&d->mu);
    return st;
}

hl_status hl_discovery_start(hl_discovery **out, const hl_config *c, const volatile int *stop)
{
    *out = NULL;
    size_t ndns = 0;
    for (size_t i = 0; i < c->nats.cluster_peers.n; i++)
        ndns += hl_discovery_is_dns(c->nats.cluster_peers.v[i]);
    if (ndns == 0)
        return HL_OK;
    pthread_once(&ares_once, ares_init_once);
    if (ares_init_status != ARES_SUCCESS) {
        hl_log(HL_LOG_ERROR, "discovery: cannot initialize c-ares", "component", "discovery", "error",
               ares_strerror(ares_init_status), NULL);
        return HL_ERR_IO;
    }
    hl_discovery *d = NULL;
    hl_status st = discovery_new(&d, c, ndns);
    if (st)
        return st;
    find_own(d);
    if (pthread_create(&d->thread, NULL, discovery_main, d) != 0) {
        discovery_free(d);
        return HL_ERR_INTERNAL;
    }
    d->thread_started = true;
    st = wait_min_peers(d, stop);
    if (st) {
        hl_discovery_stop(d);
        return st;
    }
    *out = d;
    return HL_OK;
}

hl_status hl_discovery_peers(hl_discovery *d, const hl_config *c, hl_peer_set *out)
{
    if (!d) {
        hl_peer_set_free(out);
        return hl_peer_set_from_config(c, out);
    }
    pthread_mutex_lock(&d->mu);
    hl_status st = hl_peer_set_copy(out, &d->current);
    pthread_mutex_unlock(&d->mu);
    return st;
}

void hl_discovery_attach(hl_discovery *d, hl_nats_server *srv)
{
    if (!d)
        return;
    pthread_mutex_lock(&d->mu);
    d->srv = srv;
    pthread_mutex_unlock(&d->mu);
}

void hl_discovery_stop(hl_discovery *d)
{
    if (!d)
        return;
    if (d->thread_started) {
        pthread_mutex_lock(&d->mu);
        d->stopping = true;
        pthread_cond_broadcast(&d->cv);
        pthread_mutex_unlock(&d->mu);
        pthread_join(d->thread, NULL);
    }
    discovery_free(d);
}
