/*
 * js_fixture.h - a real nats-server with JetStream for the publisher and
 * fetcher tests (test_publisher.c, test_fetcher.c).
 *
 * Each test starts its own embedded (supervised) server on a free port in a
 * fresh temporary directory, connects inside the forked test and creates the
 * shard streams. The supervisor restarts the server when a test kills it.
 */
#ifndef HL_TEST_JS_FIXTURE_H
#define HL_TEST_JS_FIXTURE_H

#include <arpa/inet.h>
#include <check.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "config/config.h"
#include "natsio/conn.h"
#include "natsio/server.h"
#include "repl/queue.h"

static inline int64_t fx_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline void fx_sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static inline int fx_free_port(void)
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

static inline char *fx_strdup(const char *s)
{
    char *d = strdup(s);
    ck_assert_ptr_nonnull(d);
    return d;
}

static inline char *fx_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline char *fx_printf(const char *fmt, ...)
{
    va_list ap;
    char *out = NULL;
    va_start(ap, fmt);
    int n = vasprintf(&out, fmt, ap);
    va_end(ap);
    ck_assert_int_ge(n, 0);
    return out;
}

typedef struct fx {
    char *dir;
    hl_config c;
    hl_nats_server *srv;
    hl_queue q;
    hl_nats *n;
    char stream[128], subject[128]; /* shard 0 */
} fx;

/* The documented defaults (config.h) for node_id; adjust f->c before fx_start. */
static inline void fx_init(fx *f, uint64_t node_id)
{
    memset(f, 0, sizeof *f);
    char tmpl[] = "/tmp/hl_js_XXXXXX";
    ck_assert_ptr_nonnull(mkdtemp(tmpl));
    f->dir = fx_strdup(tmpl);
    hl_config *c = &f->c;
    c->node_id = node_id;
    c->data_dir = fx_strdup(f->dir);
    c->publish = c->replicate = true;
    c->apply_batch_rows = 10000;
    c->replication_log.shards = 1;
    c->replication_log.max_entries = 1048576;
    c->replication_log.replicas = 1;
    c->replication_log.compress = true;
    c->replication_log.max_bytes = -1;
    c->replication_log.chunk_bytes = 524288;
    c->replication_log.max_changeset_bytes = 268435456;
    c->replication_log.duplicate_window_s = 120;
    c->nats.bind_address = fx_printf("127.0.0.1:%d", fx_free_port());
    c->nats.subject_prefix = fx_strdup("harmonylite-change-log");
    c->nats.stream_prefix = fx_strdup("harmonylite-changes");
    c->nats.server_bin = fx_strdup("nats-server");
    c->nats.cluster_name = fx_strdup("harmonylite");
    c->nats.connect_retries = 5;
    c->nats.reconnect_wait_seconds = 1;
    c->nats.max_payload = 1048576;
    c->logging.level = fx_strdup("info");
    c->http.bind = fx_strdup("127.0.0.1:0");
    hl_nats_stream_name(c, 0, f->stream, sizeof f->stream);
    hl_nats_subject(c, 0, f->subject, sizeof f->subject);
}

/* Starts the server, the queue and a connection whose async-publish acks go
 * to ack_cb with the queue as closure; creates the streams. */
static inline void fx_start(fx *f, jsPubAckHandler ack_cb)
{
    ck_assert_int_eq(hl_nats_server_start(&f->srv, &f->c, 30000), HL_OK);
    ck_assert_int_eq(hl_queue_init(&f->q, 24u << 20), HL_OK);
    const char *urls[] = {hl_nats_server_client_url(f->srv)};
    ck_assert_int_eq(hl_nats_connect(&f->n, &f->c, urls, 1, ack_cb, ack_cb ? &f->q : NULL, 4096, NULL), HL_OK);
    ck_assert_int_eq(hl_nats_ensure_streams(f->n, &f->c, 30000, NULL), HL_OK);
}

static inline void fx_rm_rf(const char *dir)
{
    pid_t pid = fork();
    if (pid == 0) {
        execlp("rm", "rm", "-rf", dir, (char *)NULL);
        _exit(127);
    }
    int st;
    waitpid(pid, &st, 0);
}

static inline void fx_stop(fx *f)
{
    hl_queue_close(&f->q);
    hl_nats_close(f->n, 5000);
    hl_nats_server_stop(f->srv, 10000);
    hl_queue_free(&f->q);
    hl_config *c = &f->c;
    char **strs[] = {&c->data_dir,        &c->nats.bind_address, &c->nats.subject_prefix, &c->nats.stream_prefix,
                     &c->nats.server_bin, &c->nats.cluster_name, &c->logging.level,       &c->http.bind};
    for (size_t i = 0; i < sizeof strs / sizeof strs[0]; i++) {
        free(*strs[i]);
        *strs[i] = NULL;
    }
    fx_rm_rf(f->dir);
    free(f->dir);
}

/* Kills the server (sig) and waits, generously, until its supervisor has
 * restarted it, the connection is back and JetStream answers again. With
 * while_stopped, the server is first stopped (SIGSTOP) and while_stopped(arg)
 * runs while it reads nothing; sig then arrives as it resumes. */
static inline void fx_restart_server(fx *f, int sig, void (*while_stopped)(void *), void *arg)
{
    int pid = hl_nats_server_pid(f->srv);
    uint64_t restarts = hl_nats_server_restarts(f->srv);
    ck_assert_int_gt(pid, 0);
    if (while_stopped) {
        ck_assert_int_eq(kill(pid, SIGSTOP), 0);
        while_stopped(arg);
    }
    ck_assert_int_eq(kill(pid, sig), 0);
    if (while_stopped)
        ck_assert_int_eq(kill(pid, SIGCONT), 0);
    int64_t end = fx_now_ms() + 60000;
    while (hl_nats_server_restarts(f->srv) == restarts || !hl_nats_server_running(f->srv)) {
        ck_assert_msg(fx_now_ms() < end, "nats-server was not restarted");
        fx_sleep_ms(20);
    }
    while (!hl_nats_connected(f->n)) {
        ck_assert_msg(fx_now_ms() < end, "no reconnection after the server restart");
        fx_sleep_ms(20);
    }
    ck_assert_int_eq(hl_nats_ensure_streams(f->n, &f->c, 30000, NULL), HL_OK);
}

/* Last sequence of the shard-0 stream. */
static inline uint64_t fx_stream_last(fx *f)
{
    uint64_t first = 0, last = 0;
    ck_assert_int_eq(hl_nats_stream_bounds(f->n, f->stream, &first, &last), HL_OK);
    return last;
}

#endif
