/*
 * test_natsio.c - natsio against real nats-server processes.
 *
 * Every test that talks to a server starts its own on free ports in a fresh
 * temporary directory; connections are made inside the (forked) test.
 */
#include <arpa/inet.h>
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "common/buf.h"
#include "common/log.h"
#include "config/config.h"
#include "natsio/conn.h"
#include "natsio/server.h"

/* A user NKey pair from the NATS documentation (nkey authentication example). */
#define DOC_SEED "SUACSSL3UAHUDXKFSNVUZRF5UHPMWZ6BFDTJ7M6USDXIEDNPPQYYYCU3VY"
#define DOC_PUB "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4"

/* ---- helpers ---- */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static int free_port(void)
{
    struct sockaddr_in a;
    socklen_t l = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_ge(fd, 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&a, &l), 0);
    close(fd);
    return ntohs(a.sin_port);
}

static char *xstrdup(const char *s)
{
    char *d = strdup(s);
    ck_assert_ptr_nonnull(d);
    return d;
}

static char *xprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xprintf(const char *fmt, ...)
{
    va_list ap;
    char *out = NULL;
    va_start(ap, fmt);
    int n = vasprintf(&out, fmt, ap);
    va_end(ap);
    ck_assert_int_ge(n, 0);
    return out;
}

static void list_add(hl_strlist *l, const char *s)
{
    char **v = realloc(l->v, (l->n + 1) * sizeof *v);
    ck_assert_ptr_nonnull(v);
    l->v = v;
    l->v[l->n++] = xstrdup(s);
}

/* The defaults documented in config.h (config.c is not linked here). */
static void cfg_init(hl_config *c, const char *data_dir, uint64_t node_id, int client_port)
{
    memset(c, 0, sizeof *c);
    c->node_id = node_id;
    c->data_dir = xstrdup(data_dir);
    c->publish = c->replicate = true;
    c->scan_max_changes = 10000;
    c->polling_interval_ms = 1000;
    c->cleanup_interval_ms = 5000;
    c->tombstone_retention_s = 7 * 24 * 3600;
    c->shutdown_grace_s = 10;
    c->apply_batch_rows = 10000;
    c->cache_size_kib = 65536;
    c->replication_log.shards = 1;
    c->replication_log.max_entries = 1048576;
    c->replication_log.replicas = 1;
    c->replication_log.compress = true;
    c->replication_log.max_bytes = -1;
    c->replication_log.max_age_s = 0;
    c->replication_log.chunk_bytes = 524288;
    c->replication_log.max_changeset_bytes = 268435456;
    c->replication_log.duplicate_window_s = 120;
    c->nats.bind_address = xprintf("127.0.0.1:%d", client_port);
    c->nats.subject_prefix = xstrdup("harmonylite-change-log");
    c->nats.stream_prefix = xstrdup("harmonylite-changes");
    c->nats.server_bin = xstrdup("nats-server");
    c->nats.cluster_name = xstrdup("harmonylite");
    c->nats.connect_retries = 5;
    c->nats.reconnect_wait_seconds = 1; /* default 2; shorter keeps the tests quick */
    c->nats.max_payload = 1048576;
    c->logging.level = xstrdup("info");
    c->http.bind = xstrdup("0.0.0.0:8080");
}

static void list_free(hl_strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

static void cfg_free(hl_config *c)
{
    free(c->config_path);
    free(c->db_path);
    free(c->data_dir);
    list_free(&c->nats.urls);
    list_free(&c->nats.cluster_peers);
    list_free(&c->nats.leaf_servers);
    char **strs[] = {&c->nats.bind_address,    &c->nats.subject_prefix, &c->nats.stream_prefix,
                     &c->nats.server_config,   &c->nats.server_bin,     &c->nats.cluster_name,
                     &c->nats.cluster_addr,    &c->nats.user_name,      &c->nats.user_password,
                     &c->nats.seed_file,       &c->nats.creds_file,     &c->nats.ca_file,
                     &c->nats.cert_file,       &c->nats.key_file,       &c->logging.format,
                     &c->logging.level,        &c->http.bind,           &c->nats.reader_user,
                     &c->nats.reader_password, &c->nats.cluster_user,   &c->nats.cluster_password};
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++) {
        free(*strs[i]);
        *strs[i] = NULL;
    }
}

static char *make_tmpdir(void)
{
    char tmpl[] = "/tmp/hl_natsio_XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(tmpl));
    return xstrdup(tmpl);
}

static void rm_rf(const char *dir)
{
    pid_t pid = fork();
    if (pid == 0) {
        execlp("rm", "rm", "-rf", dir, (char *)NULL);
        _exit(127);
    }
    int st;
    waitpid(pid, &st, 0);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    hl_buf b;
    hl_buf_init(&b, 64 << 20);
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        ck_assert_int_eq(hl_buf_add(&b, chunk, n), HL_OK);
    fclose(f);
    hl_buf_addc(&b, 0);
    return (char *)hl_buf_steal(&b, NULL);
}

/* Runs `nats-server -t -c path` and returns its exit status. */
static int nats_server_check(const char *path)
{
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open("/dev/null", O_WRONLY);
        dup2(fd, 1);
        dup2(fd, 2);
        execlp("nats-server", "nats-server", "-t", "-c", path, (char *)NULL);
        _exit(127);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* Redirects fd 2 into a file so a test can read what was logged. */
typedef struct capture {
    int saved;
    char path[256];
} capture;

static void capture_start(capture *cp, const char *dir)
{
    snprintf(cp->path, sizeof cp->path, "%s/stderr.log", dir);
    fflush(stderr);
    cp->saved = dup(2);
    int fd = open(cp->path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ck_assert_int_ge(fd, 0);
    dup2(fd, 2);
    close(fd);
}

static char *capture_end(capture *cp)
{
    fflush(stderr);
    dup2(cp->saved, 2);
    close(cp->saved);
    return read_file(cp->path);
}

static bool wait_until(bool (*pred)(void *), void *arg, int timeout_ms)
{
    int64_t end = now_ms() + timeout_ms;
    while (!pred(arg)) {
        if (now_ms() > end)
            return false;
        sleep_ms(10);
    }
    return true;
}

static bool srv_running(void *a)
{
    return hl_nats_server_running(a);
}

static bool srv_not_running(void *a)
{
    return !hl_nats_server_running(a);
}

static bool conn_up(void *a)
{
    return hl_nats_connected(a);
}

/* Ack bookkeeping for js_PublishAsync. */
typedef struct acks {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int ok, dup, err;
} acks;

static void ack_cb(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure)
{
    (void)js;
    acks *a = closure;
    pthread_mutex_lock(&a->mu);
    if (pa && pa->Duplicate)
        a->dup++;
    else if (pa)
        a->ok++;
    if (pae)
        a->err++;
    pthread_cond_broadcast(&a->cv);
    pthread_mutex_unlock(&a->mu);
    natsMsg_Destroy(msg); /* the ack handler owns the message */
}

static void acks_init(acks *a)
{
    memset(a, 0, sizeof *a);
    pthread_mutex_init(&a->mu, NULL);
    pthread_cond_init(&a->cv, NULL);
}

static void publish_n(hl_nats *n, const char *subj, const char *idprefix, int from, int count)
{
    for (int i = from; i < from + count; i++) {
        char id[64], body[64];
        jsPubOptions po;
        jsPubOptions_Init(&po);
        snprintf(id, sizeof id, "%s:%d", idprefix, i);
        snprintf(body, sizeof body, "changeset %d", i);
        po.MsgId = id;
        natsStatus s = js_PublishAsync(hl_nats_js(n), subj, body, (int)strlen(body), &po);
        ck_assert_msg(s == NATS_OK, "js_PublishAsync: %s", natsStatus_GetText(s));
    }
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MaxWait = 10000;
    ck_assert_int_eq(js_PublishAsyncComplete(hl_nats_js(n), &po), NATS_OK);
}

static hl_nats *connect_to(hl_config *c, const char *url, acks *a)
{
    hl_nats *n = NULL;
    const char *urls[] = {url};
    ck_assert_int_eq(hl_nats_connect(&n, c, urls, 1, a ? ack_cb : NULL, a, 1000, NULL), HL_OK);
    ck_assert(hl_nats_connected(n));
    return n;
}

/* ---- render_config ---- */

START_TEST(render_standalone)
{
    char *dir = make_tmpdir();
    char *data = xprintf("%s/data dir \"q\"", dir);
    hl_config c;
    cfg_init(&c, data, 3, 4222);
    hl_buf b;
    hl_buf_init(&b, 1 << 20);
    ck_assert_int_eq(hl_nats_server_render_config(&c, &b), HL_OK);
    const char *t = hl_buf_str(&b);
    ck_assert_ptr_nonnull(strstr(t, "server_name: \"harmonylite-3\"\n"));
    ck_assert_ptr_nonnull(strstr(t, "listen: \"127.0.0.1:4222\"\n"));
    ck_assert_ptr_nonnull(strstr(t, "max_payload: 1048576\n"));
    ck_assert_ptr_nonnull(strstr(t, "lame_duck_duration: \"30s\"\n"));
    ck_assert_ptr_nonnull(strstr(t, "lame_duck_grace_period: \"1s\"\n"));
    char *want = xprintf("store_dir: \"%s/data dir \\\"q\\\"/nats\"\n", dir);
    ck_assert_msg(strstr(t, want), "no %s in:\n%s", want, t);
    ck_assert_ptr_null(strstr(t, "cluster {"));
    ck_assert_ptr_null(strstr(t, "include \""));

    /* nats-server itself accepts the text. */
    char *path = xprintf("%s/standalone.conf", dir);
    write_file(path, t);
    ck_assert_int_eq(nats_server_check(path), 0);

    /* A cluster listener without any route is refused up front. */
    c.nats.cluster_addr = xstrdup("127.0.0.1:6222");
    hl_buf_reset(&b);
    ck_assert_int_eq(hl_nats_server_render_config(&c, &b), HL_ERR_CONFIG);
    free(c.nats.cluster_addr);
    c.nats.cluster_addr = NULL;

    /* A bind address without a port is a config error. */
    free(c.nats.bind_address);
    c.nats.bind_address = xstrdup("0.0.0.0");
    hl_buf_reset(&b);
    ck_assert_int_eq(hl_nats_server_render_config(&c, &b), HL_ERR_CONFIG);

    free(path);
    free(want);
    hl_buf_free(&b);
    cfg_free(&c);
    rm_rf(dir);
    free(data);
    free(dir);
}
END_TEST

/* harmonylite's login becomes the server's full user, the reader gets
 * read-only permissions, the routes authenticate; nats-server accepts it. */
START_TEST(render_authorization)
{
    char *dir = make_tmpdir();
    char *data = xprintf("%s/node1", dir);
    hl_config c;
    cfg_init(&c, data, 1, 4222);
    c.nats.cluster_addr = xstrdup("127.0.0.1:6222");
    list_add(&c.nats.cluster_peers, "nats://127.0.0.1:6223");
    list_add(&c.nats.cluster_peers, "nats://other:pw@127.0.0.1:6224"); /* names its own user: kept */
    hl_buf b;
    hl_buf_init(&b, 1 << 20);

    /* No login: no authorization block (anonymous clients, loopback port). */
    ck_assert_int_eq(hl_nats_server_render_config(&c, &b), HL_OK);
    ck_assert_ptr_null(strstr(hl_buf_str(&b), "authorization"));

    c.nats.user_name = xstrdup("no\"de");
    c.nats.user_password = xstrdup("p@ss w\"rd");
    c.nats.reader_user = xstrdup("reader");
    c.nats.reader_password = xstrdup("$2a$11$PWIFAL8RsWyGI3jVZtO9Nu8.6jOxzxfZo7c/W0eLk017hjgUKWGhy");
    c.nats.cluster_user = xstrdup("route");
    c.nats.cluster_password = xstrdup("s3cr:et/+");
    hl_buf_reset(&b);
    ck_assert_int_eq(hl_nats_server_render_config(&c, &b), HL_OK);
    const char *t = hl_buf_str(&b);
    ck_assert_msg(strstr(t, "authorization {\n  users: [\n    { user: \"no\\\"de\", password: \"p@ss w\\\"rd\" }\n"),
                  "%s", t);
    const char *reader = strstr(t, "    { user: \"reader\", password: \"$2a$11$");
    ck_assert_msg(reader, "%s", t);
    /* The reader may subscribe to the change subjects and never publish on them. */
    ck_assert_ptr_nonnull(strstr(reader, "subscribe: { allow: [\"_INBOX.>\", \"harmonylite-change-log.*\"] }"));
    const char *pub = strstr(reader, "publish: { allow: [");
    ck_assert_ptr_nonnull(pub);
    const char *pub_end = strchr(pub, ']');
    ck_assert(memmem(pub, (size_t)(pub_end - pub), "harmonylite-change-log", 22) == NULL);
    ck_assert(memmem(pub, (size_t)(pub_end - pub), "\">\"", 3) == NULL);
    /* Routes carry the shared secret, percent-encoded; the listener asks for it. */
    ck_assert_msg(strstr(t, "    \"nats://route:s3cr%3Aet%2F%2B@127.0.0.1:6223\"\n"), "%s", t);
    ck_assert_ptr_nonnull(strstr(t, "    \"nats://other:pw@127.0.0.1:6224\"\n"));
    ck_assert_msg(
        strstr(t, "  authorization {\n    user: \"route\"\n    password: \"s3cr:et/+\"\n    timeout: 2\n  }\n"), "%s",
        t);

    char *natsdir = xprintf("%s/nats", data);
    ck_assert_int_eq(mkdir(data, 0700), 0);
    ck_assert_int_eq(mkdir(natsdir, 0700), 0);
    char *path = xprintf("%s/nats-server.conf", natsdir);
    write_file(path, t);
    ck_assert_int_eq(nats_server_check(path), 0);

    free(path);
    free(natsdir);
    hl_buf_free(&b);
    cfg_free(&c);
    rm_rf(dir);
    free(data);
    free(dir);
}
END_TEST

START_TEST(render_cluster_include)
{
    char *dir = make_tmpdir();
    char *data = xprintf("%s/node1", dir);
    char *incdir = xprintf("%s/etc dir", dir);
    char *inc = xprintf("%s/extra.conf", incdir);
    ck_assert_int_eq(mkdir(incdir, 0700), 0);
    write_file(inc, "max_payload: 2097152\n");
    hl_config c;
    cfg_init(&c, data, 1, 4222);
    c.nats.cluster_addr = xstrdup("127.0.0.1:6222");
    list_add(&c.nats.cluster_peers, "nats://127.0.0.1:6222"); /* our own address: tolerated */
    list_add(&c.nats.cluster_peers, "nats://127.0.0.1:6223");
    list_add(&c.nats.cluster_peers, "127.0.0.1:6224"); /* bare host:port gets a scheme */
    c.nats.server_config = xstrdup(inc);

    hl_buf b;
    hl_buf_init(&b, 1 << 20);
    ck_assert_int_eq(hl_nats_server_render_config(&c, &b), HL_OK);
    const char *t = hl_buf_str(&b);
    ck_assert_ptr_nonnull(strstr(t, "cluster {\n  name: \"harmonylite\"\n  listen: \"127.0.0.1:6222\"\n"));
    ck_assert_ptr_nonnull(strstr(t, "    \"nats://127.0.0.1:6222\"\n    \"nats://127.0.0.1:6223\"\n"
                                    "    \"nats://127.0.0.1:6224\"\n  ]\n}\n"));
    /* The include is relative (nats-server joins even absolute include paths
     * to the config's directory) and ends with the absolute path's tail. */
    const char *incl = strstr(t, "include \"../");
    ck_assert_ptr_nonnull(incl);
    char *tail = xprintf("%s\"\n", inc + 1);
    ck_assert_ptr_nonnull(strstr(incl, tail));

    /* Written where start() writes it, nats-server accepts it and the include
     * resolves (the included max_payload must be readable). */
    char *natsdir = xprintf("%s/nats", data);
    ck_assert_int_eq(mkdir(data, 0700), 0);
    ck_assert_int_eq(mkdir(natsdir, 0700), 0);
    char *path = xprintf("%s/nats-server.conf", natsdir);
    write_file(path, t);
    ck_assert_int_eq(nats_server_check(path), 0);
    /* and fails when the included file is missing */
    unlink(inc);
    ck_assert_int_ne(nats_server_check(path), 0);

    /* A relative server_config is taken relative to the working directory. */
    char oldcwd[4096];
    ck_assert_ptr_nonnull(getcwd(oldcwd, sizeof oldcwd));
    ck_assert_int_eq(chdir(dir), 0);
    write_file(inc, "max_payload: 2097152\n");
    free(c.nats.server_config);
    c.nats.server_config = xstrdup("etc dir/extra.conf");
    hl_buf_reset(&b);
    ck_assert_int_eq(hl_nats_server_render_config(&c, &b), HL_OK);
    write_file(path, hl_buf_str(&b));
    ck_assert_int_eq(nats_server_check(path), 0);
    ck_assert_int_eq(chdir(oldcwd), 0);

    /* '"' cannot be expressed in a nats-server include path. */
    free(c.nats.server_config);
    c.nats.server_config = xstrdup("/etc/a\"b.conf");
    hl_buf_reset(&b);
    ck_assert_int_eq(hl_nats_server_render_config(&c, &b), HL_ERR_CONFIG);

    free(path);
    free(natsdir);
    free(tail);
    hl_buf_free(&b);
    cfg_free(&c);
    rm_rf(dir);
    free(inc);
    free(incdir);
    free(data);
    free(dir);
}
END_TEST

/* ---- embedded server ---- */

START_TEST(embedded_publish)
{
    char *dir = make_tmpdir();
    hl_config c;
    cfg_init(&c, dir, 1, free_port());
    c.replication_log.shards = 2;
    hl_nats_server *s = NULL;
    int64_t t0 = now_ms();
    ck_assert_int_eq(hl_nats_server_start(&s, &c, 10000), HL_OK);
    fprintf(stderr, "embedded server ready in %lld ms\n", (long long)(now_ms() - t0));
    ck_assert(hl_nats_server_running(s));
    ck_assert_int_eq(hl_nats_server_restarts(s), 0);
    char *want_url = xprintf("nats://%s", c.nats.bind_address);
    ck_assert_str_eq(hl_nats_server_client_url(s), want_url);
    struct stat sb;
    char *conf = xprintf("%s/nats/nats-server.conf", dir);
    ck_assert_int_eq(stat(conf, &sb), 0);

    acks a;
    acks_init(&a);
    hl_nats *n = connect_to(&c, hl_nats_server_client_url(s), &a);
    ck_assert_int_eq(hl_nats_ensure_streams(n, &c, 10000, NULL), HL_OK);
    /* idempotent: the second call finds both streams */
    ck_assert_int_eq(hl_nats_ensure_streams(n, &c, 10000, NULL), HL_OK);
    char *jsdir = xprintf("%s/nats/jetstream", dir);
    ck_assert_int_eq(stat(jsdir, &sb), 0);

    char name[128], subj[128];
    hl_nats_stream_name(&c, 1, name, sizeof name);
    hl_nats_subject(&c, 1, subj, sizeof subj);
    ck_assert_str_eq(name, "harmonylite-changes-1");
    ck_assert_str_eq(subj, "harmonylite-change-log.1");
    uint64_t first = 9, last = 9;
    ck_assert_int_eq(hl_nats_stream_bounds(n, name, &first, &last), HL_OK);
    ck_assert_uint_eq(first, 0);
    ck_assert_uint_eq(last, 0);
    ck_assert_int_eq(hl_nats_stream_bounds(n, "no-such-stream", &first, &last), HL_ERR_NOT_FOUND);

    t0 = now_ms();
    publish_n(n, subj, "1", 1, 1000);
    fprintf(stderr, "1000 async publishes acked in %lld ms\n", (long long)(now_ms() - t0));
    pthread_mutex_lock(&a.mu);
    ck_assert_int_eq(a.ok, 1000);
    ck_assert_int_eq(a.err, 0);
    pthread_mutex_unlock(&a.mu);
    ck_assert_int_eq(hl_nats_stream_bounds(n, name, &first, &last), HL_OK);
    ck_assert_uint_eq(first, 1);
    ck_assert_uint_eq(last, 1000);

    /* Re-publishing an acked Msg-Id (crash between ack and outbox delete) is
     * acked as a duplicate and not stored again. */
    publish_n(n, subj, "1", 500, 1);
    pthread_mutex_lock(&a.mu);
    ck_assert_int_eq(a.dup, 1);
    pthread_mutex_unlock(&a.mu);
    ck_assert_int_eq(hl_nats_stream_bounds(n, name, &first, &last), HL_OK);
    ck_assert_uint_eq(last, 1000);

    /* A differing stream setting is reported, or applied with update_existing. */
    c.replication_log.max_entries = 5000;
    ck_assert_int_eq(hl_nats_ensure_streams(n, &c, 10000, NULL), HL_OK);
    c.replication_log.update_existing = true;
    ck_assert_int_eq(hl_nats_ensure_streams(n, &c, 10000, NULL), HL_OK);
    jsStreamInfo *si = NULL;
    ck_assert_int_eq(js_GetStreamInfo(&si, hl_nats_js(n), name, NULL, NULL), NATS_OK);
    ck_assert_int_eq(si->Config->MaxMsgs, 5000);
    ck_assert_int_eq(si->Config->Duplicates, 120LL * 1000000000LL);
    ck_assert_int_eq(si->Config->Storage, js_FileStorage);
    ck_assert_int_eq(si->Config->Discard, js_DiscardOld);
    jsStreamInfo_Destroy(si);

    /* A duplicate window longer than max_age is clamped (the server refuses it). */
    free(c.nats.stream_prefix);
    c.nats.stream_prefix = xstrdup("aged");
    free(c.nats.subject_prefix);
    c.nats.subject_prefix = xstrdup("aged-log");
    c.replication_log.shards = 1;
    c.replication_log.max_age_s = 60;
    ck_assert_int_eq(hl_nats_ensure_streams(n, &c, 10000, NULL), HL_OK);
    si = NULL;
    ck_assert_int_eq(js_GetStreamInfo(&si, hl_nats_js(n), "aged-0", NULL, NULL), NATS_OK);
    ck_assert_int_eq(si->Config->MaxAge, 60LL * 1000000000LL);
    ck_assert_int_eq(si->Config->Duplicates, 60LL * 1000000000LL);
    jsStreamInfo_Destroy(si);

    /* Replicas beyond what a single server offers. */
    free(c.nats.stream_prefix);
    c.nats.stream_prefix = xstrdup("r3");
    free(c.nats.subject_prefix);
    c.nats.subject_prefix = xstrdup("r3-log");
    c.replication_log.replicas = 3;
    /* nats-server says "replicas > 1 not supported in non-clustered mode" at
     * once; that is not a transient error, so no waiting for the timeout. */
    int64_t t1 = now_ms();
    ck_assert_int_eq(hl_nats_ensure_streams(n, &c, 3000, NULL), HL_ERR_NATS);
    ck_assert_int_lt(now_ms() - t1, 1000);

    hl_nats_close(n, 5000);
    hl_nats_server_stop(s, 10000);
    free(jsdir);
    free(conf);
    free(want_url);
    cfg_free(&c);
    rm_rf(dir);
    free(dir);
}
END_TEST

START_TEST(embedded_restart)
{
    char *dir = make_tmpdir();
    hl_config c;
    cfg_init(&c, dir, 2, free_port());
    hl_nats_server *s = NULL;
    ck_assert_int_eq(hl_nats_server_start(&s, &c, 10000), HL_OK);
    acks a;
    acks_init(&a);
    hl_nats *n = connect_to(&c, hl_nats_server_client_url(s), &a);
    ck_assert_int_eq(hl_nats_ensure_streams(n, &c, 10000, NULL), HL_OK);
    char subj[128], name[128];
    hl_nats_subject(&c, 0, subj, sizeof subj);
    hl_nats_stream_name(&c, 0, name, sizeof name);
    publish_n(n, subj, "2", 1, 10);

    int pid = hl_nats_server_pid(s);
    ck_assert_int_gt(pid, 0);
    int64_t t0 = now_ms();
    ck_assert_int_eq(kill(pid, SIGKILL), 0);
    ck_assert(wait_until(srv_not_running, s, 5000));
    ck_assert(wait_until(srv_running, s, 5000));
    fprintf(stderr, "restarted after kill -9 in %lld ms\n", (long long)(now_ms() - t0));
    ck_assert_int_eq(hl_nats_server_restarts(s), 1);
    ck_assert_int_ne(hl_nats_server_pid(s), pid);
    ck_assert(wait_until(conn_up, n, 15000));
    fprintf(stderr, "client reconnected after %lld ms\n", (long long)(now_ms() - t0));

    /* JetStream may need a moment after the restart; the stream survived. */
    ck_assert_int_eq(hl_nats_ensure_streams(n, &c, 10000, NULL), HL_OK);
    publish_n(n, subj, "2", 11, 10);
    pthread_mutex_lock(&a.mu);
    ck_assert_int_eq(a.ok, 20);
    pthread_mutex_unlock(&a.mu);
    uint64_t first, last;
    ck_assert_int_eq(hl_nats_stream_bounds(n, name, &first, &last), HL_OK);
    ck_assert_uint_eq(first, 1);
    ck_assert_uint_eq(last, 20);

    hl_nats_close(n, 5000);
    hl_nats_server_stop(s, 10000);
    cfg_free(&c);
    rm_rf(dir);
    free(dir);
}
END_TEST

START_TEST(embedded_cluster)
{
    enum { N = 3 };
    char *dir = make_tmpdir();
    hl_config c[N];
    hl_nats_server *s[N] = {NULL};
    int cport[N];
    for (int i = 0; i < N; i++)
        cport[i] = free_port();
    for (int i = 0; i < N; i++) {
        char *d = xprintf("%s/node%d", dir, i + 1);
        cfg_init(&c[i], d, (uint64_t)i + 1, free_port());
        free(d);
        c[i].nats.cluster_addr = xprintf("127.0.0.1:%d", cport[i]);
        for (int j = 0; j < N; j++) { /* every node lists all three, itself included */
            char *u = xprintf("nats://127.0.0.1:%d", cport[j]);
            list_add(&c[i].nats.cluster_peers, u);
            free(u);
        }
        c[i].replication_log.replicas = 3;
    }
    int64_t t0 = now_ms();
    for (int i = 0; i < N; i++)
        ck_assert_int_eq(hl_nats_server_start(&s[i], &c[i], 10000), HL_OK);

    hl_nats *a = connect_to(&c[0], hl_nats_server_client_url(s[0]), NULL);
    ck_assert_int_eq(hl_nats_ensure_streams(a, &c[0], 30000, NULL), HL_OK);
    fprintf(stderr, "3-node cluster formed and R3 stream created in %lld ms\n", (long long)(now_ms() - t0));
    char subj[128], name[128];
    hl_nats_subject(&c[0], 0, subj, sizeof subj);
    hl_nats_stream_name(&c[0], 0, name, sizeof name);

    jsStreamInfo *si = NULL;
    ck_assert_int_eq(js_GetStreamInfo(&si, hl_nats_js(a), name, NULL, NULL), NATS_OK);
    ck_assert_int_eq(si->Config->Replicas, 3);
    jsStreamInfo_Destroy(si);

    for (int i = 1; i <= 10; i++) {
        char id[32], body[32];
        jsPubOptions po;
        jsPubOptions_Init(&po);
        snprintf(id, sizeof id, "1:%d", i);
        snprintf(body, sizeof body, "m%d", i);
        po.MsgId = id;
        ck_assert_int_eq(js_Publish(NULL, hl_nats_js(a), subj, body, (int)strlen(body), &po, NULL), NATS_OK);
    }

    /* Another node's connection sees the stream and reads the messages. */
    hl_nats *b = connect_to(&c[2], hl_nats_server_client_url(s[2]), NULL);
    ck_assert_int_eq(hl_nats_ensure_streams(b, &c[2], 30000, NULL), HL_OK); /* exists: checked, not created */
    uint64_t first, last;
    ck_assert_int_eq(hl_nats_stream_bounds(b, name, &first, &last), HL_OK);
    ck_assert_uint_eq(first, 1);
    ck_assert_uint_eq(last, 10);
    natsMsg *m = NULL;
    ck_assert_int_eq(js_GetMsg(&m, hl_nats_js(b), name, 7, NULL, NULL), NATS_OK);
    ck_assert_int_eq(natsMsg_GetDataLength(m), 2);
    ck_assert_mem_eq(natsMsg_GetData(m), "m7", 2);
    natsMsg_Destroy(m);

    hl_nats_close(b, 5000);
    hl_nats_close(a, 5000);
    t0 = now_ms();
    for (int i = N - 1; i >= 0; i--)
        hl_nats_server_stop(s[i], 10000);
    fprintf(stderr, "cluster stopped in %lld ms\n", (long long)(now_ms() - t0));
    for (int i = 0; i < N; i++)
        cfg_free(&c[i]);
    rm_rf(dir);
    free(dir);
}
END_TEST

/* True once a core NATS message published through a reaches a subscriber on b,
 * i.e. the two servers are routed. */
static bool routed(hl_nats *a, hl_nats *b, int timeout_ms)
{
    natsSubscription *sub = NULL;
    bool ok = false;
    ck_assert_int_eq(natsConnection_SubscribeSync(&sub, hl_nats_conn(b), "route.check"), NATS_OK);
    ck_assert_int_eq(natsConnection_Flush(hl_nats_conn(b)), NATS_OK);
    int64_t end = now_ms() + timeout_ms;
    while (!ok && now_ms() < end) {
        natsMsg *m = NULL;
        ck_assert_int_eq(natsConnection_PublishString(hl_nats_conn(a), "route.check", "x"), NATS_OK);
        if (natsSubscription_NextMsg(&m, sub, 200) == NATS_OK) {
            ok = true;
            natsMsg_Destroy(m);
        }
    }
    natsSubscription_Destroy(sub);
    return ok;
}

START_TEST(embedded_reload_routes)
{
    char *dir = make_tmpdir();
    hl_config c[2];
    hl_nats_server *s[2] = {NULL};
    hl_nats *n[2] = {NULL};
    for (int i = 0; i < 2; i++) {
        char *d = xprintf("%s/node%d", dir, i + 1);
        cfg_init(&c[i], d, (uint64_t)i + 1, free_port());
        free(d);
        c[i].nats.cluster_addr = xprintf("127.0.0.1:%d", free_port());
        /* Like a first DNS answer that holds only the pod itself. */
        char *self = xprintf("nats://%s", c[i].nats.cluster_addr);
        list_add(&c[i].nats.cluster_peers, self);
        free(self);
        ck_assert_int_eq(hl_nats_server_start(&s[i], &c[i], 10000), HL_OK);
        n[i] = connect_to(&c[i], hl_nats_server_client_url(s[i]), NULL);
    }
    ck_assert(!routed(n[0], n[1], 600));
    ck_assert_int_eq(hl_nats_server_reload(s[0]), HL_OK); /* unchanged: no-op */

    /* Discovery found the peer: reload adds the route without a restart. */
    char *peer = xprintf("nats://%s", c[1].nats.cluster_addr);
    list_add(&c[0].nats.cluster_peers, peer);
    free(peer);
    int pid = hl_nats_server_pid(s[0]);
    int64_t t0 = now_ms();
    ck_assert_int_eq(hl_nats_server_reload(s[0]), HL_OK);
    ck_assert(routed(n[0], n[1], 5000));
    fprintf(stderr, "route added by reload in %lld ms\n", (long long)(now_ms() - t0));
    ck_assert_int_eq(hl_nats_server_pid(s[0]), pid);
    ck_assert_int_eq(hl_nats_server_restarts(s[0]), 0);
    hl_peer_set now;
    hl_peer_set_init(&now);
    ck_assert_int_eq(hl_nats_server_peers(s[0], &now), HL_OK);
    ck_assert_uint_eq(now.routes.n, 2);
    hl_peer_set_free(&now);
    /* The rendered file stays private: it may carry credentials paths. */
    struct stat sb;
    char *conf = xprintf("%s/node1/nats/nats-server.conf", dir);
    ck_assert_int_eq(stat(conf, &sb), 0);
    ck_assert_int_eq(sb.st_mode & 0777, 0600);
    free(conf);

    /* A peer nats-server cannot parse is refused before the running config is touched. */
    list_add(&c[0].nats.cluster_peers, "nats://[bad");
    ck_assert_int_ne(hl_nats_server_reload(s[0]), HL_OK);
    ck_assert(hl_nats_server_running(s[0]));

    for (int i = 0; i < 2; i++) {
        hl_nats_close(n[i], 1000);
        hl_nats_server_stop(s[i], 10000);
        cfg_free(&c[i]);
    }
    rm_rf(dir);
    free(dir);
}
END_TEST

START_TEST(embedded_stop_lame_duck)
{
    char *dir = make_tmpdir();
    hl_config c;
    cfg_init(&c, dir, 4, free_port());
    hl_nats_server *s = NULL;
    ck_assert_int_eq(hl_nats_server_start(&s, &c, 10000), HL_OK);
    hl_nats *n = connect_to(&c, hl_nats_server_client_url(s), NULL);
    int pid = hl_nats_server_pid(s);

    capture cp;
    capture_start(&cp, dir);
    int64_t t0 = now_ms();
    hl_nats_server_stop(s, 8000);
    int64_t took = now_ms() - t0;
    char *log = capture_end(&cp);
    fprintf(stderr, "lame-duck stop with one client took %lld ms\n", (long long)took);
    ck_assert_int_lt(took, 8000);
    ck_assert_msg(strstr(log, "lame duck"), "no lame duck line in:\n%s", log);
    ck_assert_msg(strstr(log, "nats-server stopped") && !strstr(log, "killing it"), "unclean stop:\n%s", log);
    ck_assert_int_eq(kill(pid, 0), -1);
    ck_assert_int_eq(errno, ESRCH);

    hl_nats_close(n, 1000);
    free(log);
    cfg_free(&c);
    rm_rf(dir);
    free(dir);
}
END_TEST

START_TEST(embedded_start_failures)
{
    char *dir = make_tmpdir();
    hl_config c;
    hl_nats_server *s = NULL;

    /* Port already taken by someone else: fails fast, says why. */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    ck_assert_int_eq(listen(fd, 4), 0);
    socklen_t sl = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    cfg_init(&c, dir, 5, ntohs(sa.sin_port));
    capture cp;
    capture_start(&cp, dir);
    int64_t t0 = now_ms();
    ck_assert_int_ne(hl_nats_server_start(&s, &c, 10000), HL_OK);
    int64_t took = now_ms() - t0;
    char *log = capture_end(&cp);
    ck_assert_ptr_null(s);
    ck_assert_int_lt(took, 5000);
    ck_assert_msg(strstr(log, "nats-server did not start") && strstr(log, "address already in use"),
                  "unclear error:\n%s", log);
    free(log);
    close(fd);

    /* A missing nats.server_config is caught by `nats-server -t`. */
    free(c.nats.bind_address);
    c.nats.bind_address = xprintf("127.0.0.1:%d", free_port());
    c.nats.server_config = xprintf("%s/missing.conf", dir);
    ck_assert_int_eq(hl_nats_server_start(&s, &c, 10000), HL_ERR_CONFIG);
    ck_assert_ptr_null(s);

    /* A nats.server_bin that does not exist. */
    free(c.nats.server_config);
    c.nats.server_config = NULL;
    free(c.nats.server_bin);
    c.nats.server_bin = xstrdup("no-such-nats-server-binary");
    ck_assert_int_eq(hl_nats_server_start(&s, &c, 10000), HL_ERR_CONFIG);

    hl_nats_server_stop(NULL, 0);
    hl_nats_close(NULL, 0);
    cfg_free(&c);
    rm_rf(dir);
    free(dir);
}
END_TEST

/* ---- external mode ---- */

/* Starts a plain nats-server with conf_text; returns its pid once the port answers. */
static pid_t start_plain_server(const char *dir, const char *conf_text, int port)
{
    char *path = xprintf("%s/plain.conf", dir);
    write_file(path, conf_text);
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open("/dev/null", O_WRONLY);
        dup2(fd, 1);
        dup2(fd, 2);
        execlp("nats-server", "nats-server", "-c", path, (char *)NULL);
        _exit(127);
    }
    free(path);
    ck_assert_int_gt(pid, 0);
    int64_t end = now_ms() + 10000;
    for (;;) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in sa;
        memset(&sa, 0, sizeof sa);
        sa.sin_family = AF_INET;
        sa.sin_port = htons((uint16_t)port);
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        int r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
        close(fd);
        if (r == 0)
            break;
        ck_assert_msg(now_ms() < end, "plain nats-server did not come up");
        sleep_ms(20);
    }
    return pid;
}

static void stop_plain_server(pid_t pid)
{
    int st;
    kill(pid, SIGTERM);
    waitpid(pid, &st, 0);
}

/* nats.leaf_servers: the embedded server connects to a hub as a leaf node;
 * messages published on the hub reach a subscriber on the leaf. */
START_TEST(embedded_leaf)
{
    char *dir = make_tmpdir();
    int hub_port = free_port(), leaf_port = free_port();
    char *conf = xprintf("listen: \"127.0.0.1:%d\"\nleafnodes { listen: \"127.0.0.1:%d\" }\n", hub_port, leaf_port);
    pid_t hub = start_plain_server(dir, conf, hub_port);
    char *data = xprintf("%s/leaf", dir);
    hl_config c;
    cfg_init(&c, data, 1, free_port());
    char *remote = xprintf("nats-leaf://127.0.0.1:%d", leaf_port);
    list_add(&c.nats.leaf_servers, remote);
    hl_nats_server *s = NULL;
    ck_assert_int_eq(hl_nats_server_start(&s, &c, 10000), HL_OK);
    hl_nats *n = connect_to(&c, hl_nats_server_client_url(s), NULL);

    natsConnection *hc = NULL;
    char *hub_url = xprintf("nats://127.0.0.1:%d", hub_port);
    ck_assert_int_eq(natsConnection_ConnectTo(&hc, hub_url), NATS_OK);
    natsSubscription *sub = NULL;
    ck_assert_int_eq(natsConnection_SubscribeSync(&sub, hl_nats_conn(n), "leaf.check"), NATS_OK);
    ck_assert_int_eq(natsConnection_Flush(hl_nats_conn(n)), NATS_OK);
    bool ok = false;
    int64_t end = now_ms() + 20000; /* the leaf connection and its interest take a moment */
    while (!ok && now_ms() < end) {
        natsMsg *m = NULL;
        ck_assert_int_eq(natsConnection_PublishString(hc, "leaf.check", "x"), NATS_OK);
        if (natsSubscription_NextMsg(&m, sub, 200) == NATS_OK) {
            ok = true;
            natsMsg_Destroy(m);
        }
    }
    ck_assert_msg(ok, "no message crossed the leaf connection");
    natsSubscription_Destroy(sub);
    natsConnection_Destroy(hc);

    hl_nats_close(n, 1000);
    hl_nats_server_stop(s, 10000);
    stop_plain_server(hub);
    cfg_free(&c);
    free(hub_url);
    free(remote);
    free(data);
    free(conf);
    rm_rf(dir);
    free(dir);
}
END_TEST

START_TEST(external_user_password)
{
    static const char pw[] = "s3cr3t-Pa55word";
    char *dir = make_tmpdir();
    int port = free_port();
    char *conf = xprintf("listen: \"127.0.0.1:%d\"\njetstream { store_dir: \"%s\" }\n"
                         "authorization { user: \"alice\", password: \"%s\" }\n",
                         port, dir, pw);
    pid_t srv = start_plain_server(dir, conf, port);
    char *url = xprintf("nats://127.0.0.1:%d", port);
    hl_config c;
    cfg_init(&c, dir, 7, 4222);
    list_add(&c.nats.urls, url);
    c.nats.connect_retries = 1;

    capture cp;
    capture_start(&cp, dir);

    /* right credentials */
    c.nats.user_name = xstrdup("alice");
    c.nats.user_password = xstrdup(pw);
    hl_nats *n = NULL;
    const char *urls[] = {url};
    hl_status ok_st = hl_nats_connect(&n, &c, urls, 1, NULL, NULL, 100, NULL);
    bool ok_conn = n && hl_nats_connected(n);
    hl_status ens = n ? hl_nats_ensure_streams(n, &c, 10000, NULL) : HL_ERR_INTERNAL;
    hl_nats_close(n, 2000);

    /* credentials inside the URL work too and are not logged */
    char *url_creds = xprintf("nats://alice:%s@127.0.0.1:%d", pw, port);
    const char *urls2[] = {url_creds};
    free(c.nats.user_name);
    free(c.nats.user_password);
    c.nats.user_name = c.nats.user_password = NULL;
    n = NULL;
    hl_status url_st = hl_nats_connect(&n, &c, urls2, 1, NULL, NULL, 100, NULL);
    hl_nats_close(n, 2000);

    /* wrong password: fails at once with a clear error, password not logged */
    c.nats.user_name = xstrdup("alice");
    c.nats.user_password = xstrdup("wrong-Pa55word-xyz");
    c.nats.connect_retries = 5;
    n = NULL;
    int64_t t0 = now_ms();
    hl_status bad_st = hl_nats_connect(&n, &c, urls, 1, NULL, NULL, 100, NULL);
    int64_t bad_ms = now_ms() - t0;

    char *log = capture_end(&cp);
    fputs(log, stderr);
    ck_assert_int_eq(ok_st, HL_OK);
    ck_assert(ok_conn);
    ck_assert_int_eq(ens, HL_OK);
    ck_assert_int_eq(url_st, HL_OK);
    ck_assert_int_eq(bad_st, HL_ERR_NATS);
    ck_assert_ptr_null(n);
    ck_assert_int_lt(bad_ms, 3000); /* auth failures are not retried */
    ck_assert_msg(strstr(log, "cannot connect to nats") && strstr(log, "uthorization"), "unclear error:\n%s", log);
    ck_assert_msg(!strstr(log, pw), "password leaked into the log:\n%s", log);
    ck_assert_msg(!strstr(log, "wrong-Pa55word-xyz"), "password leaked into the log:\n%s", log);
    ck_assert_msg(strstr(log, "<redacted>@127.0.0.1"), "URL not shown redacted:\n%s", log);

    free(log);
    free(url_creds);
    cfg_free(&c);
    stop_plain_server(srv);
    free(url);
    free(conf);
    rm_rf(dir);
    free(dir);
}
END_TEST

START_TEST(nkey_public_key)
{
    char pub[64];
    ck_assert_int_eq(hl_nats_nkey_public_from_seed(DOC_SEED, pub, sizeof pub), HL_OK);
    ck_assert_str_eq(pub, DOC_PUB);
    /* corrupted checksum, wrong key type, too small output */
    char bad[] = DOC_SEED;
    bad[10] = bad[10] == 'A' ? 'B' : 'A';
    ck_assert_int_eq(hl_nats_nkey_public_from_seed(bad, pub, sizeof pub), HL_ERR_INVALID);
    ck_assert_int_eq(hl_nats_nkey_public_from_seed(DOC_PUB, pub, sizeof pub), HL_ERR_INVALID);
    ck_assert_int_eq(hl_nats_nkey_public_from_seed(DOC_SEED, pub, 10), HL_ERR_INVALID);
}
END_TEST

START_TEST(external_nkey_seed_file)
{
    char *dir = make_tmpdir();
    int port = free_port();
    char *conf = xprintf("listen: \"127.0.0.1:%d\"\nauthorization { users: [ { nkey: \"%s\" } ] }\n", port, DOC_PUB);
    pid_t srv = start_plain_server(dir, conf, port);
    char *url = xprintf("nats://127.0.0.1:%d", port);
    char *seed = xprintf("%s/user.nk", dir);
    write_file(seed, DOC_SEED "\n");
    hl_config c;
    cfg_init(&c, dir, 8, 4222);
    c.nats.connect_retries = 1;
    c.nats.seed_file = xstrdup(seed);
    capture cp;
    capture_start(&cp, dir);
    hl_nats *n = NULL;
    const char *urls[] = {url};
    hl_status st = hl_nats_connect(&n, &c, urls, 1, NULL, NULL, 100, NULL);
    hl_nats_close(n, 1000);
    /* without the seed the server refuses us */
    free(c.nats.seed_file);
    c.nats.seed_file = NULL;
    n = NULL;
    hl_status st2 = hl_nats_connect(&n, &c, urls, 1, NULL, NULL, 100, NULL);
    char *log = capture_end(&cp);
    ck_assert_msg(st == HL_OK, "connect with the seed failed (%d):\n%s", (int)st, log);
    ck_assert_int_eq(st2, HL_ERR_NATS);
    ck_assert_msg(!strstr(log, DOC_SEED), "seed leaked:\n%s", log);

    free(log);
    cfg_free(&c);
    stop_plain_server(srv);
    free(seed);
    free(url);
    free(conf);
    rm_rf(dir);
    free(dir);
}
END_TEST

static int sh(const char *dir, const char *cmd)
{
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open("/dev/null", O_WRONLY);
        dup2(fd, 1);
        dup2(fd, 2);
        if (chdir(dir) != 0)
            _exit(126);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

START_TEST(external_tls)
{
    char *dir = make_tmpdir();
    /* A throwaway CA, a server certificate for 127.0.0.1 and a client certificate. */
    static const char gen[] =
        "set -e\n"
        "K='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'\n"
        "openssl req -x509 $K -days 1 -subj /CN=hl-test-ca -keyout ca.key -out ca.pem\n"
        "printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > san.ext\n"
        "openssl req $K -subj /CN=localhost -keyout srv.key -out srv.csr\n"
        "openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile san.ext -out srv.pem\n"
        "openssl req $K -subj /CN=hl-client -keyout cli.key -out cli.csr\n"
        "openssl x509 -req -in cli.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -out cli.pem\n";
    /* scripts/install-deps.sh installs the openssl CLI: without it this test
     * fails instead of passing without having tested anything. */
    ck_assert_msg(sh(dir, gen) == 0, "external_tls: the openssl CLI could not make the test certificates "
                                     "(is the 'openssl' package installed?)");
    int port = free_port();
    char *conf = xprintf("listen: \"127.0.0.1:%d\"\n"
                         "tls { cert_file: \"%s/srv.pem\", key_file: \"%s/srv.key\", ca_file: \"%s/ca.pem\", "
                         "verify: true }\n",
                         port, dir, dir, dir);
    pid_t srv = start_plain_server(dir, conf, port);
    char *url = xprintf("nats://127.0.0.1:%d", port);
    const char *urls[] = {url};
    hl_config c;
    cfg_init(&c, dir, 9, 4222);
    /* External mode: the client's TLS files are for these servers (in embedded
     * mode they are the leaf remotes'). */
    list_add(&c.nats.urls, url);
    c.nats.connect_retries = 1;
    c.nats.ca_file = xprintf("%s/ca.pem", dir);
    c.nats.cert_file = xprintf("%s/cli.pem", dir);
    c.nats.key_file = xprintf("%s/cli.key", dir);

    hl_nats *n = NULL;
    ck_assert_int_eq(hl_nats_connect(&n, &c, urls, 1, NULL, NULL, 100, NULL), HL_OK);
    ck_assert(hl_nats_connected(n));
    hl_nats_close(n, 1000);

    /* Without our CA the server's certificate is not trusted: fails at once. */
    free(c.nats.ca_file);
    c.nats.ca_file = NULL;
    c.nats.connect_retries = 5;
    n = NULL;
    int64_t t0 = now_ms();
    ck_assert_int_eq(hl_nats_connect(&n, &c, urls, 1, NULL, NULL, 100, NULL), HL_ERR_NATS);
    ck_assert_int_lt(now_ms() - t0, 3000);

    /* A key file without its certificate is a config error. */
    free(c.nats.cert_file);
    c.nats.cert_file = NULL;
    c.nats.ca_file = xprintf("%s/ca.pem", dir);
    ck_assert_int_eq(hl_nats_connect(&n, &c, urls, 1, NULL, NULL, 100, NULL), HL_ERR_CONFIG);

    cfg_free(&c);
    stop_plain_server(srv);
    free(url);
    free(conf);
    rm_rf(dir);
    free(dir);
}
END_TEST

/* ---- peer set ---- */

static bool rendered_routes(const char *t, const char *want)
{
    const char *r = strstr(t, "  routes: [\n");
    return r && strncmp(r + 12, want, strlen(want)) == 0 && strncmp(r + 12 + strlen(want), "  ]\n", 4) == 0;
}

START_TEST(render_peer_set)
{
    char *dir = make_tmpdir();
    char *data = xprintf("%s/node1", dir);
    hl_config c;
    cfg_init(&c, data, 1, 4222);
    c.nats.cluster_addr = xstrdup("127.0.0.1:6222");
    /* Discovery answers in any order, with repeats; the set is sorted and unique. */
    hl_peer_set p, q;
    hl_peer_set_init(&p);
    hl_peer_set_init(&q);
    ck_assert_int_eq(hl_peer_set_add_route(&p, "nats://n3.hl.test:6222"), HL_OK);
    ck_assert_int_eq(hl_peer_set_add_route(&p, "nats://n1.hl.test:6222"), HL_OK);
    ck_assert_int_eq(hl_peer_set_add_route(&p, "n2.hl.test:6222"), HL_OK); /* gets a scheme */
    ck_assert_int_eq(hl_peer_set_add_route(&p, "nats://n1.hl.test:6222"), HL_OK);
    ck_assert_int_eq(hl_peer_set_add_route(&p, ""), HL_ERR_INVALID);
    ck_assert_uint_eq(p.routes.n, 3);
    ck_assert_int_eq(hl_peer_set_add_route(&q, "nats://n2.hl.test:6222"), HL_OK);
    ck_assert_int_eq(hl_peer_set_add_route(&q, "nats://n1.hl.test:6222"), HL_OK);
    ck_assert_int_eq(hl_peer_set_add_route(&q, "nats://n3.hl.test:6222"), HL_OK);
    ck_assert(hl_peer_set_equal(&p, &q));

    hl_buf b, b2;
    hl_buf_init(&b, 1 << 20);
    hl_buf_init(&b2, 1 << 20);
    ck_assert_int_eq(hl_nats_server_render(&c, &p, &b), HL_OK);
    ck_assert_int_eq(hl_nats_server_render(&c, &q, &b2), HL_OK);
    ck_assert_str_eq(hl_buf_str(&b), hl_buf_str(&b2));
    ck_assert_msg(rendered_routes(hl_buf_str(&b), "    \"nats://n1.hl.test:6222\"\n    \"nats://n2.hl.test:6222\"\n"
                                                  "    \"nats://n3.hl.test:6222\"\n"),
                  "%s", hl_buf_str(&b));
    /* The config's own cluster_peers are not used: the set is what renders. */
    ck_assert_ptr_null(strstr(hl_buf_str(&b), "leafnodes"));

    /* Leaf remotes render with the client's credentials and TLS files. */
    ck_assert_int_eq(hl_peer_set_add_leaf(&p, "nats-leaf://hub.example:7422"), HL_OK);
    c.nats.creds_file = xstrdup("/etc/hl/user.creds");
    c.nats.ca_file = xstrdup("/etc/hl/ca.pem");
    hl_buf_reset(&b);
    ck_assert_int_eq(hl_nats_server_render(&c, &p, &b), HL_OK);
    ck_assert_msg(strstr(hl_buf_str(&b), "leafnodes {\n  remotes: [\n    {\n      urls: [\n"
                                         "        \"nats-leaf://hub.example:7422\"\n      ]\n"
                                         "      credentials: \"/etc/hl/user.creds\"\n"
                                         "      tls {\n        ca_file: \"/etc/hl/ca.pem\"\n      }\n    }\n  ]\n}\n"),
                  "%s", hl_buf_str(&b));

    /* A control character cannot be expressed in the conf: a config error,
     * wherever the value lands in the text (here the route authorization,
     * after the routes). */
    c.nats.cluster_password = xstrdup("pa\x01ss");
    hl_buf_reset(&b);
    ck_assert_int_eq(hl_nats_server_render(&c, &p, &b), HL_ERR_CONFIG);
    free(c.nats.cluster_password);
    c.nats.cluster_password = NULL;
    c.nats.sync_interval = xstrdup("al\nways\x7f");
    hl_buf_reset(&b);
    ck_assert_int_eq(hl_nats_server_render(&c, &p, &b), HL_ERR_CONFIG);
    free(c.nats.sync_interval);
    c.nats.sync_interval = NULL;

    /* A cluster listener with an empty set is refused (nats-server 2.9 would exit). */
    hl_peer_set e;
    hl_peer_set_init(&e);
    hl_buf_reset(&b);
    ck_assert_int_eq(hl_nats_server_render(&c, &e, &b), HL_ERR_CONFIG);

    /* dns:// entries of nats.cluster_peers are discovery's, not routes. */
    list_add(&c.nats.cluster_peers, "dns+srv://_cluster._tcp.hl.test");
    list_add(&c.nats.cluster_peers, "dns://nodes.hl.test:6222");
    list_add(&c.nats.cluster_peers, "nats://10.0.0.9:6222");
    ck_assert_int_eq(hl_peer_set_from_config(&c, &e), HL_OK);
    ck_assert_uint_eq(e.routes.n, 1);
    ck_assert_str_eq(e.routes.v[0], "nats://10.0.0.9:6222");

    hl_peer_set_free(&e);
    hl_peer_set_free(&p);
    hl_peer_set_free(&q);
    hl_buf_free(&b);
    hl_buf_free(&b2);
    cfg_free(&c);
    rm_rf(dir);
    free(data);
    free(dir);
}
END_TEST

START_TEST(peer_set_diff)
{
    hl_peer_set from, to, added, removed, copy;
    hl_peer_set_init(&from);
    hl_peer_set_init(&to);
    hl_peer_set_init(&added);
    hl_peer_set_init(&removed);
    hl_peer_set_init(&copy);
    const char *a[] = {"nats://a:1", "nats://b:1", "nats://c:1"};
    const char *b[] = {"nats://d:1", "nats://b:1", "nats://a:1"};
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(hl_peer_set_add_route(&from, a[i]), HL_OK);
        ck_assert_int_eq(hl_peer_set_add_route(&to, b[i]), HL_OK);
    }
    ck_assert_int_eq(hl_peer_set_add_leaf(&from, "nats-leaf://hub:7422"), HL_OK);
    ck_assert(!hl_peer_set_equal(&from, &to));
    ck_assert_int_eq(hl_peer_set_diff(&from, &to, &added, &removed), HL_OK);
    ck_assert_uint_eq(added.routes.n, 1);
    ck_assert_str_eq(added.routes.v[0], "nats://d:1");
    ck_assert_uint_eq(removed.routes.n, 1);
    ck_assert_str_eq(removed.routes.v[0], "nats://c:1");
    ck_assert_uint_eq(added.leafs.n, 0);
    ck_assert_uint_eq(removed.leafs.n, 1);

    /* A copy compares equal and diffs to nothing. */
    ck_assert_int_eq(hl_peer_set_copy(&copy, &to), HL_OK);
    ck_assert(hl_peer_set_equal(&copy, &to));
    hl_peer_set_free(&added);
    hl_peer_set_free(&removed);
    ck_assert_int_eq(hl_peer_set_diff(&copy, &to, &added, &removed), HL_OK);
    ck_assert_uint_eq(added.routes.n + removed.routes.n + added.leafs.n + removed.leafs.n, 0);

    hl_peer_set_free(&from);
    hl_peer_set_free(&to);
    hl_peer_set_free(&added);
    hl_peer_set_free(&removed);
    hl_peer_set_free(&copy);
}
END_TEST

static Suite *natsio_suite(void)
{
    Suite *s = suite_create("natsio");
    struct {
        const char *name;
        const TTest *test;
        int timeout;
    } cases[] = {
        {"render_standalone", render_standalone, 10},
        {"render_authorization", render_authorization, 10},
        {"render_cluster_include", render_cluster_include, 10},
        {"render_peer_set", render_peer_set, 10},
        {"peer_set_diff", peer_set_diff, 5},
        {"nkey_public_key", nkey_public_key, 5},
        {"embedded_publish", embedded_publish, 30},
        {"embedded_restart", embedded_restart, 40},
        {"embedded_cluster", embedded_cluster, 60},
        {"embedded_reload_routes", embedded_reload_routes, 30},
        {"embedded_leaf", embedded_leaf, 40},
        {"embedded_stop_lame_duck", embedded_stop_lame_duck, 30},
        {"embedded_start_failures", embedded_start_failures, 30},
        {"external_user_password", external_user_password, 30},
        {"external_nkey_seed_file", external_nkey_seed_file, 30},
        {"external_tls", external_tls, 30},
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
    SRunner *sr = srunner_create(natsio_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
