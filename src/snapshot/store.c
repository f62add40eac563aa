/*
 * store.c - opening the configured store; what every store shares.
 */
#include "snapshot/store.h"

#include <errno.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <unistd.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>

#include "common/hlc.h"
#include "common/log.h"

void hl_store_names_free(hl_store_names *l)
{
    if (!l)
        return;
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

void hl_store_names_sort(hl_store_names *l)
{
    if (l->n > 1)
        qsort(l->v, l->n, sizeof *l->v, cmp_name);
}

hl_status hl_store_open(hl_store **out, const hl_config *c, char *err, size_t errlen)
{
    *out = NULL;
    const char *kind = c->snapshot.store ? c->snapshot.store : "s3";
    if (strcmp(kind, "dir") == 0) {
        if (!c->snapshot.dir || !c->snapshot.dir[0]) {
            snprintf(err, errlen, "snapshot.dir: expected the directory of the dir store (snapshot.store is dir)");
            return HL_ERR_CONFIG;
        }
        return hl_store_dir_open(out, c->snapshot.dir, err, errlen);
    }
    if (strcmp(kind, "s3") == 0)
        return hl_store_s3_open(out, c, err, errlen);
    if (strcmp(kind, "sftp") == 0)
        return hl_store_sftp_open(out, c, err, errlen);
    if (strcmp(kind, "webdav") == 0)
        return hl_store_webdav_open(out, c, err, errlen);
    if (strcmp(kind, "nats") == 0)
        return hl_store_nats_open(out, c, err, errlen);
    snprintf(err, errlen, "snapshot.store: expected s3, dir, sftp, webdav or nats");
    return HL_ERR_CONFIG;
}

static int curl_ready;
static atomic_bool store_cancelled;

void hl_store_cancel(void)
{
    atomic_store(&store_cancelled, true);
}

bool hl_store_cancelled(void)
{
    return atomic_load(&store_cancelled);
}

hl_status hl_store_curl_init(char *err, size_t errlen)
{
    if (!curl_ready) {
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
            snprintf(err, errlen, "curl_global_init failed");
            return HL_ERR_INTERNAL;
        }
        curl_ready = 1;
    }
    return HL_OK;
}

void hl_store_curl_cleanup(void)
{
    if (curl_ready) {
        curl_global_cleanup();
        curl_ready = 0;
    }
}

void hl_store_close(hl_store *s)
{
    if (s)
        s->ops->destroy(s);
}

/* A transfer that took longer than this gets progress lines, one per interval. */
#define PROGRESS_AFTER_MS 3000
#define PROGRESS_EVERY_MS 5000

void hl_progress_start(hl_progress *p, const char *what, const char *name, uint64_t total)
{
    p->what = what;
    p->name = name;
    p->total = total;
    p->start_ms = p->last_ms = hl_mono_ms();
}

void hl_progress_update(hl_progress *p, uint64_t done)
{
    uint64_t now = hl_mono_ms();
    if (now - p->start_ms < PROGRESS_AFTER_MS || (p->last_ms != p->start_ms && now - p->last_ms < PROGRESS_EVERY_MS))
        return;
    p->last_ms = now;
    double secs = (double)(now - p->start_ms) / 1000.0;
    double rate = (double)done / secs; /* bytes/s */
    char eta[32] = "unknown";
    if (p->total && rate > 0 && done <= p->total)
        snprintf(eta, sizeof eta, "%.0fs", (double)(p->total - done) / rate);
    hl_logf(HL_LOG_INFO, "snapshot %s %s: %" PRIu64 " of %" PRIu64 " bytes, %.1f MB/s, ETA %s", p->what, p->name, done,
            p->total, rate / 1e6, eta);
}

/* The mode a file created with open(2) would get (0666 less the umask); mkstemp gives 0600,
 * which would lock out an application or reader running as another user of the group. */
mode_t hl_store_created_mode(void)
{
    mode_t m = umask(0);
    umask(m);
    return 0666 & ~m;
}

hl_status hl_store_write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return HL_ERR_IO;
        c += w;
        n -= (size_t)w;
    }
    return HL_OK;
}
