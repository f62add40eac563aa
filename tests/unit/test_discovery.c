/*
 * test_discovery.c - peers from DNS: entry and host name checks, SRV and A/AAAA
 * answer handling on hand-built DNS messages, and the discovery thread against
 * a real DNS server (dnsmasq on a loopback port).
 */
#include <arpa/inet.h>
#include <check.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "config/config.h"
#include "natsio/discovery.h"
#include "natsio/server.h"

/* ---- a DNS message builder ---- */

typedef struct msg {
    unsigned char b[4096];
    size_t n;
    int ancount;
} msg;

static void put16(msg *m, unsigned v)
{
    m->b[m->n++] = (unsigned char)(v >> 8);
    m->b[m->n++] = (unsigned char)v;
}

/* Labels given as an array of raw byte strings (may hold any byte but NUL). */
static void put_labels(msg *m, const char *const *labels)
{
    for (; *labels; labels++) {
        size_t l = strlen(*labels);
        m->b[m->n++] = (unsigned char)l;
        memcpy(m->b + m->n, *labels, l);
        m->n += l;
    }
    m->b[m->n++] = 0;
}

/* A dotted name (no dot inside labels). */
static void put_name(msg *m, const char *name)
{
    char buf[256];
    const char *labels[64];
    int k = 0;
    snprintf(buf, sizeof buf, "%s", name);
    for (char *p = strtok(buf, "."); p; p = strtok(NULL, "."))
        labels[k++] = p;
    labels[k] = NULL;
    put_labels(m, labels);
}

static void msg_begin(msg *m, const char *qname, unsigned qtype)
{
    memset(m, 0, sizeof *m);
    put16(m, 0x1234);
    put16(m, 0x8180); /* response, RD, RA */
    put16(m, 1);      /* qdcount */
    put16(m, 0);      /* ancount, patched */
    put16(m, 0);
    put16(m, 0);
    put_name(m, qname);
    put16(m, qtype);
    put16(m, 1);
}

static void rr_head(msg *m, unsigned type, unsigned rdlen)
{
    put16(m, 0xc00c); /* the question's name */
    put16(m, type);
    put16(m, 1);
    put16(m, 0);
    put16(m, 30); /* ttl */
    put16(m, rdlen);
    m->ancount++;
    m->b[6] = (unsigned char)(m->ancount >> 8);
    m->b[7] = (unsigned char)m->ancount;
}

static void add_srv_labels(msg *m, unsigned port, const char *const *labels)
{
    msg t;
    t.n = 0;
    put_labels(&t, labels);
    rr_head(m, 33, (unsigned)(6 + t.n));
    put16(m, 10);
    put16(m, 50);
    put16(m, port);
    memcpy(m->b + m->n, t.b, t.n);
    m->n += t.n;
}

static void add_srv(msg *m, unsigned port, const char *target)
{
    char buf[256];
    const char *labels[64];
    int k = 0;
    snprintf(buf, sizeof buf, "%s", target);
    for (char *p = strtok(buf, "."); p; p = strtok(NULL, "."))
        labels[k++] = p;
    labels[k] = NULL;
    add_srv_labels(m, port, labels);
}

static void add_a(msg *m, const char *ip)
{
    unsigned char a[16];
    bool v6 = strchr(ip, ':') != NULL;
    ck_assert_int_eq(inet_pton(v6 ? AF_INET6 : AF_INET, ip, a), 1);
    rr_head(m, v6 ? 28 : 1, v6 ? 16 : 4);
    memcpy(m->b + m->n, a, v6 ? 16 : 4);
    m->n += v6 ? 16 : 4;
}

/* ---- pure parts ---- */

START_TEST(valid_host)
{
    const char *good[] = {
        "a", "hl-0.hl.default.svc.cluster.local", "hl-0.hl.default.svc.cluster.local.", "127.0.0.11", "A1-b2", "x.y"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
        ck_assert_msg(hl_discovery_valid_host(good[i]), "%s refused", good[i]);
    char long_label[80], long_name[300];
    memset(long_label, 'a', 64);
    long_label[64] = 0;
    for (int i = 0; i < 255; i++)
        long_name[i] = i % 2 ? '.' : 'a';
    long_name[255] = 0; /* 255 characters ending in 'a' */
    const char *bad[] = {"",    ".",     "a..b",     "-a",       "a-",      "a.-b",   "a\"b",
                         "a b", "a\nb",  "a\\b",     "a_b",      "a:1",     "a/b",    "a@b",
                         "a}b", "a\x7f", "\xc3\xa9", long_label, long_name, "a.b-.c", ".a"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_msg(!hl_discovery_valid_host(bad[i]), "%s accepted", bad[i]);
}
END_TEST

START_TEST(parse_entry)
{
    hl_dns_entry e;
    ck_assert_int_eq(hl_discovery_parse_entry("dns+srv://_cluster._tcp.hl.ns.svc.cluster.local.", &e), HL_OK);
    ck_assert_int_eq(e.kind, HL_DNS_SRV);
    ck_assert_str_eq(e.name, "_cluster._tcp.hl.ns.svc.cluster.local");
    ck_assert_int_eq(hl_discovery_parse_entry("DNS://hl:6222", &e), HL_OK);
    ck_assert_int_eq(e.kind, HL_DNS_ADDR);
    ck_assert_str_eq(e.name, "hl");
    ck_assert_int_eq(e.port, 6222);
    const char *bad[] = {"dns://hl",
                         "dns://hl:0",
                         "dns://:1",
                         "dns://hl:1x",
                         "dns://h\"l:1",
                         "dns+srv://hl",
                         "dns+srv://_c.hl",
                         "dns+srv://_c._tcp",
                         "dns+srv://_c._tcp.a b",
                         "nats://hl:6222",
                         "dns+srv://_c$._tcp.hl",
                         "dns://hl:-1"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        ck_assert_msg(hl_discovery_parse_entry(bad[i], &e) == HL_ERR_CONFIG, "%s accepted", bad[i]);
    ck_assert(hl_discovery_is_dns("dns+srv://x"));
    ck_assert(!hl_discovery_is_dns("nats://x:1"));
}
END_TEST

START_TEST(srv_answer)
{
    msg m;
    hl_peer_set p;
    size_t rejected = 0;
    hl_peer_set_init(&p);
    msg_begin(&m, "_cluster._tcp.hl.test", 33);
    add_srv(&m, 7222, "HL-1.hl.test");
    add_srv(&m, 7222, "hl-0.hl.test");
    add_srv(&m, 7222, "hl-1.hl.test"); /* the same target again: one route */
    add_srv(&m, 7223, "127.0.0.11");
    /* Names that would write config text if they got through. */
    const char *quote[] = {"evil\"\n}\ninclude \"/etc/passwd", "hl", NULL};
    add_srv_labels(&m, 7222, quote);
    const char *dot[] = {"a.b", "hl", NULL}; /* a '.' inside a label */
    add_srv_labels(&m, 7222, dot);
    const char *root[] = {NULL}; /* "." : service decidedly not available */
    add_srv_labels(&m, 7222, root);
    add_srv(&m, 0, "hl-2.hl.test"); /* port 0 */
    ck_assert_int_eq(hl_discovery_srv_routes(m.b, (int)m.n, &p, &rejected), HL_OK);
    ck_assert_uint_eq(rejected, 4);
    ck_assert_uint_eq(p.routes.n, 3);
    ck_assert_str_eq(p.routes.v[0], "nats://127.0.0.11:7223");
    ck_assert_str_eq(p.routes.v[1], "nats://hl-0.hl.test:7222");
    ck_assert_str_eq(p.routes.v[2], "nats://hl-1.hl.test:7222");
    hl_peer_set_free(&p);

    /* No records: NOT_FOUND, so the caller keeps what it had. */
    msg_begin(&m, "_cluster._tcp.hl.test", 33);
    ck_assert_int_eq(hl_discovery_srv_routes(m.b, (int)m.n, &p, &rejected), HL_ERR_NOT_FOUND);
    ck_assert_uint_eq(p.routes.n, 0);
    /* Only unusable records: nothing added. */
    add_srv_labels(&m, 7222, quote);
    ck_assert_int_eq(hl_discovery_srv_routes(m.b, (int)m.n, &p, &rejected), HL_OK);
    ck_assert_uint_eq(rejected, 1);
    ck_assert_uint_eq(p.routes.n, 0);
    /* Truncated and garbage messages. */
    add_srv(&m, 7222, "hl-0.hl.test");
    ck_assert_int_eq(hl_discovery_srv_routes(m.b, (int)m.n - 3, &p, &rejected), HL_ERR_INVALID);
    ck_assert_int_eq(hl_discovery_srv_routes((const unsigned char *)"\x00\x01", 2, &p, &rejected), HL_ERR_INVALID);

    /* More records than HL_DISCOVERY_MAX_ANSWERS: the rest is ignored, counted. */
    msg_begin(&m, "_c._tcp.x", 33);
    for (int i = 0; i < HL_DISCOVERY_MAX_ANSWERS + 5; i++) {
        char t[32];
        snprintf(t, sizeof t, "n%d", i);
        add_srv(&m, 1, t);
        ck_assert_uint_lt(m.n, sizeof m.b - 32);
        if (m.n > sizeof m.b - 64)
            break;
    }
    hl_peer_set_free(&p);
    ck_assert_int_eq(hl_discovery_srv_routes(m.b, (int)m.n, &p, &rejected), HL_OK);
    ck_assert_uint_le(p.routes.n, HL_DISCOVERY_MAX_ANSWERS);
    hl_peer_set_free(&p);
}
END_TEST

START_TEST(addr_answer)
{
    msg m;
    hl_peer_set p;
    hl_peer_set_init(&p);
    msg_begin(&m, "nodes.hl.test", 1);
    add_a(&m, "127.0.0.12");
    add_a(&m, "10.1.2.3");
    add_a(&m, "127.0.0.12");
    ck_assert_int_eq(hl_discovery_addr_routes(m.b, (int)m.n, false, 6222, &p), HL_OK);
    ck_assert_uint_eq(p.routes.n, 2);
    ck_assert_str_eq(p.routes.v[0], "nats://10.1.2.3:6222");
    ck_assert_str_eq(p.routes.v[1], "nats://127.0.0.12:6222");
    msg_begin(&m, "nodes.hl.test", 28);
    add_a(&m, "fd00::1");
    ck_assert_int_eq(hl_discovery_addr_routes(m.b, (int)m.n, true, 6222, &p), HL_OK);
    ck_assert_uint_eq(p.routes.n, 3);
    ck_assert_str_eq(p.routes.v[2], "nats://[fd00::1]:6222");
    msg_begin(&m, "nodes.hl.test", 1);
    ck_assert_int_eq(hl_discovery_addr_routes(m.b, (int)m.n, false, 6222, &p), HL_ERR_NOT_FOUND);
    ck_assert_int_eq(hl_discovery_addr_routes(m.b, 5, false, 6222, &p), HL_ERR_INVALID);
    ck_assert_int_eq(hl_discovery_addr_routes(m.b, (int)m.n, false, 0, &p), HL_ERR_INVALID);
    ck_assert_uint_eq(p.routes.n, 3);
    hl_peer_set_free(&p);
}
END_TEST

/* ---- against a real DNS server ---- */

static int free_udp_tcp_port(void)
{
    for (;;) {
        struct sockaddr_in a;
        socklen_t l = sizeof a;
        int fd = socket(AF_INET, SOCK_DGRAM, 0), fd2 = socket(AF_INET, SOCK_STREAM, 0);
        ck_assert_int_ge(fd, 0);
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        ck_assert_int_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
        ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&a, &l), 0);
        int ok = bind(fd2, (struct sockaddr *)&a, sizeof a) == 0;
        close(fd);
        close(fd2);
        if (ok)
            return ntohs(a.sin_port);
    }
}

/* Starts dnsmasq on 127.0.0.1:port answering only from the given lines. */
static pid_t dnsmasq_start(const char *dir, int port, const char *records)
{
    char conf[512], text[4096], arg[600];
    snprintf(conf, sizeof conf, "%s/dnsmasq.conf", dir);
    snprintf(text, sizeof text,
             "port=%d\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\nno-negcache\n"
             "local-ttl=0\n%s",
             port, records);
    FILE *f = fopen(conf, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
    snprintf(arg, sizeof arg, "--conf-file=%s", conf);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        execlp("dnsmasq", "dnsmasq", "-k", "--user=root", "--pid-file=", arg, (char *)NULL);
        execl("/usr/sbin/dnsmasq", "dnsmasq", "-k", "--user=root", "--pid-file=", arg, (char *)NULL);
        _exit(127);
    }
    /* Ready when it answers on TCP (it binds UDP and TCP together). */
    for (int i = 0; i < 200; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_port = htons((uint16_t)port);
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int ok = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
        close(fd);
        if (ok)
            return pid;
        int status;
        ck_assert_msg(waitpid(pid, &status, WNOHANG) == 0, "dnsmasq exited (is it installed? install-deps.sh)");
        usleep(50000);
    }
    ck_abort_msg("dnsmasq did not start");
    return -1;
}

static void dnsmasq_stop(pid_t pid)
{
    kill(pid, SIGTERM);
    waitpid(pid, NULL, 0);
}

static void set(hl_config *c, const char *key, const char *v)
{
    char err[512];
    ck_assert_msg(hl_config_set(c, key, v, "test", err, sizeof err) == HL_OK, "%s", err);
}

static bool has_route(const hl_peer_set *p, const char *url)
{
    for (size_t i = 0; i < p->routes.n; i++)
        if (strcmp(p->routes.v[i], url) == 0)
            return true;
    return false;
}

/* Polls the discovery's set until it equals want (NULL-terminated) or ~30 s pass. */
static bool wait_routes(hl_discovery *d, const hl_config *c, const char *const *want)
{
    for (int i = 0; i < 300; i++) {
        hl_peer_set p;
        hl_peer_set_init(&p);
        ck_assert_int_eq(hl_discovery_peers(d, c, &p), HL_OK);
        size_t n = 0;
        bool all = true;
        for (; want[n]; n++)
            all = all && has_route(&p, want[n]);
        bool ok = all && p.routes.n == n;
        hl_peer_set_free(&p);
        if (ok)
            return true;
        usleep(100000);
    }
    return false;
}

START_TEST(live_srv)
{
    char dir[] = "/tmp/hl_discovery_XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    int port = free_udp_tcp_port();
    char rec[2048], resolver[64];
    /* This node is 127.0.0.11:7222 (left out); one target by address-like
     * name, one by host name. */
    snprintf(rec, sizeof rec,
             "srv-host=_cluster._tcp.hl.test,127.0.0.11,7222\n"
             "srv-host=_cluster._tcp.hl.test,127.0.0.12,7222\n"
             "srv-host=_cluster._tcp.hl.test,n3.hl.test,7222\n"
             "host-record=n3.hl.test,127.0.0.13\n");
    pid_t dns = dnsmasq_start(dir, port, rec);
    snprintf(resolver, sizeof resolver, "127.0.0.1:%d", port);

    hl_config c;
    hl_config_defaults(&c);
    set(&c, "nats.cluster_addr", "127.0.0.11:7222");
    set(&c, "nats.cluster_peers", "dns+srv://_cluster._tcp.hl.test,nats://10.9.9.9:7222");
    set(&c, "nats.discovery_resolver", resolver);
    set(&c, "nats.discovery_interval", "1");
    set(&c, "nats.cluster_min_peers", "3");
    hl_discovery *d = NULL;
    volatile int stop = 0;
    ck_assert_int_eq(hl_discovery_start(&d, &c, &stop), HL_OK);
    ck_assert_ptr_nonnull(d);
    const char *want1[] = {"nats://10.9.9.9:7222", "nats://127.0.0.12:7222", "nats://n3.hl.test:7222", NULL};
    ck_assert(wait_routes(d, &c, want1));

    /* A node added, another removed: the set follows. */
    dnsmasq_stop(dns);
    snprintf(rec, sizeof rec,
             "srv-host=_cluster._tcp.hl.test,127.0.0.11,7222\n"
             "srv-host=_cluster._tcp.hl.test,n3.hl.test,7222\n"
             "srv-host=_cluster._tcp.hl.test,n4.hl.test,7222\n"
             "host-record=n3.hl.test,127.0.0.13\n"
             "host-record=n4.hl.test,127.0.0.14\n");
    dns = dnsmasq_start(dir, port, rec);
    const char *want2[] = {"nats://10.9.9.9:7222", "nats://n3.hl.test:7222", "nats://n4.hl.test:7222", NULL};
    ck_assert(wait_routes(d, &c, want2));

    /* The DNS server gone: the last good set stays, round after round. */
    dnsmasq_stop(dns);
    sleep(3);
    ck_assert(wait_routes(d, &c, want2));
    /* An answer with only this node: also kept. */
    snprintf(rec, sizeof rec, "srv-host=_cluster._tcp.hl.test,127.0.0.11,7222\n");
    dns = dnsmasq_start(dir, port, rec);
    sleep(3);
    ck_assert(wait_routes(d, &c, want2));
    dnsmasq_stop(dns);

    hl_discovery_stop(d);
    hl_config_free(&c);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}
END_TEST

static void *raise_stop(void *arg)
{
    usleep(1500000);
    *(volatile int *)arg = 1;
    return NULL;
}

START_TEST(live_min_peers_and_a)
{
    char dir[] = "/tmp/hl_discovery_XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(dir));
    int port = free_udp_tcp_port();
    char resolver[64];
    pid_t dns = dnsmasq_start(dir, port,
                              "host-record=nodes.hl.test,127.0.0.21\nhost-record=nodes.hl.test,127.0.0.22\n"
                              "host-record=nodes.hl.test,127.0.0.23\n");
    snprintf(resolver, sizeof resolver, "127.0.0.1:%d", port);
    hl_config c;
    hl_config_defaults(&c);
    set(&c, "nats.cluster_addr", "127.0.0.21:7333");
    set(&c, "nats.cluster_peers", "dns://nodes.hl.test:7333");
    set(&c, "nats.discovery_resolver", resolver);
    set(&c, "nats.discovery_interval", "1");

    /* Two other peers known, three wanted: held until told to stop. */
    set(&c, "nats.cluster_min_peers", "3");
    hl_discovery *d = NULL;
    volatile int stop = 0;
    pthread_t t;
    ck_assert_int_eq(pthread_create(&t, NULL, raise_stop, (void *)&stop), 0);
    ck_assert_int_eq(hl_discovery_start(&d, &c, &stop), HL_ERR_STOPPED);
    ck_assert_ptr_null(d);
    pthread_join(t, NULL);

    set(&c, "nats.cluster_min_peers", "2");
    stop = 0;
    ck_assert_int_eq(hl_discovery_start(&d, &c, &stop), HL_OK);
    const char *want[] = {"nats://127.0.0.22:7333", "nats://127.0.0.23:7333", NULL};
    ck_assert(wait_routes(d, &c, want));
    hl_discovery_stop(d);
    dnsmasq_stop(dns);

    /* Without DNS entries there is nothing to run. */
    set(&c, "nats.cluster_peers", "nats://127.0.0.22:7333");
    ck_assert_int_eq(hl_discovery_start(&d, &c, &stop), HL_OK);
    ck_assert_ptr_null(d);
    hl_config_free(&c);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    ck_assert_int_eq(system(cmd), 0);
}
END_TEST

static Suite *discovery_suite(void)
{
    Suite *s = suite_create("discovery");
    struct {
        const char *name;
        const TTest *test;
        int timeout;
    } cases[] = {
        {"valid_host", valid_host, 5}, {"parse_entry", parse_entry, 5},
        {"srv_answer", srv_answer, 5}, {"addr_answer", addr_answer, 5},
        {"live_srv", live_srv, 120},   {"live_min_peers_and_a", live_min_peers_and_a, 60},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        TCase *tc = tcase_create(cases[i].name);
        tcase_set_timeout(tc, cases[i].timeout);
        tcase_add_test(tc, cases[i].test);
        suite_add_tcase(s, tc);
    }
    return s;
}

int main(void)
{
    hl_log_setup(HL_LOG_INFO, false, 0);
    SRunner *sr = srunner_create(discovery_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
