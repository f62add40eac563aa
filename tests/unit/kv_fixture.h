/*
 * kv_fixture.h - a nats-server with JetStream of its own and a connection to
 * it, for the tests of the KV layer and what is built on it (test_kv.c,
 * test_schedule.c). Each test starts its server on a free port with a fresh
 * store directory and connects inside the (forked) test.
 */
#ifndef HL_TEST_KV_FIXTURE_H
#define HL_TEST_KV_FIXTURE_H

#include <arpa/inet.h>
#include <check.h>
#include <fcntl.h>
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
#include "natsio/kv.h"

#define WAIT_MS 30000 /* generous: the machine is shared */

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

/* A nats-server with JetStream on a free port, and a connection to it. */
typedef struct env {
    char dir[64];
    int port;
    pid_t srv;
    char *url;
    hl_config c;
    hl_nats *n;
} env;

/* Starts nats-server on e->port with its store in e->dir (again after a kill). */
static void env_spawn(env *e)
{
    /* max_payload above the 1 MiB default so a value over a reader's bound can be stored */
    char *conf =
        xprintf("listen: \"127.0.0.1:%d\"\nmax_payload: 4194304\njetstream { store_dir: \"%s\" }\n", e->port, e->dir);
    char *path = xprintf("%s/kv.conf", e->dir);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(conf, f);
    fclose(f);
    e->srv = fork();
    if (e->srv == 0) {
        int fd = open("/dev/null", O_WRONLY);
        dup2(fd, 1);
        dup2(fd, 2);
        execlp("nats-server", "nats-server", "-c", path, (char *)NULL);
        _exit(127);
    }
    ck_assert_int_gt(e->srv, 0);
    free(conf);
    free(path);
}

static void env_start(env *e)
{
    memset(e, 0, sizeof *e);
    snprintf(e->dir, sizeof e->dir, "/tmp/hl_kv_XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(e->dir));
    e->port = free_port();
    env_spawn(e);

    e->url = xprintf("nats://127.0.0.1:%d", e->port);
    e->c.node_id = 1;
    e->c.nats.connect_retries = 100; /* until the server listens */
    e->c.nats.reconnect_wait_seconds = 1;
    const char *urls[] = {e->url};
    ck_assert_int_eq(hl_nats_connect(&e->n, &e->c, urls, 1, NULL, NULL, 100, NULL), HL_OK);
}

static void env_kill_server(env *e)
{
    if (e->srv > 0) {
        int st;
        kill(e->srv, SIGKILL);
        waitpid(e->srv, &st, 0);
        e->srv = 0;
    }
}

static void env_stop(env *e)
{
    hl_nats_close(e->n, 5000);
    hl_nats_shutdown(5000);
    env_kill_server(e);
    rm_rf(e->dir);
    free(e->url);
}

static hl_kv *open_bucket(env *e, const char *name, int64_t max_value_bytes)
{
    hl_kv_opts o = {.history = 5, .max_value_bytes = max_value_bytes};
    hl_kv *kv = NULL;
    hl_status st = HL_ERR_INTERNAL;
    /* JetStream can take a moment after the server starts listening. */
    int64_t end = now_ms() + WAIT_MS;
    while ((st = hl_kv_open(&kv, e->n, name, &o)) != HL_OK && now_ms() < end)
        sleep_ms(100);
    ck_assert_msg(st == HL_OK, "hl_kv_open: %s", hl_status_str(st));
    return kv;
}

#endif
