/*
 * catchup.c - catching up from a snapshot without replacing the database.
 *
 * A node that was away longer than the streams keep changesets finds its
 * stream position before a stream's first message. Skipping the messages in
 * between would lose them silently, and replacing the database (-restore
 * -force) would lose the node's own writes that were not published yet.
 * Instead: a thread finds the newest snapshot whose positions cover the gap,
 * downloads and verifies it beside db_path (as -restore does); the engine
 * thread merges it by last-writer-wins a bounded transaction at a time
 * (src/db/merge.c), while the application keeps writing and its writes keep
 * being captured and published, then moves its positions up to the
 * snapshot's and only then starts reading the streams.
 */
#include "snapshot/catchup.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/hlc.h"
#include "common/log.h"
#include "snapshot/snapshot.h"

#define RETRY_FIRST_S 5      /* a failed download: tried again after 5 s, doubling */
#define RETRY_MAX_S 300      /* ... up to 5 minutes */
#define NOT_FOUND_RETRY_S 60 /* no covering snapshot: the store is looked at again every minute */
#define PROGRESS_MS 5000     /* a long merge logs its progress this often */

struct hl_catchup {
    const hl_config *c;
    hl_db *d;
    int n;
    char *const *streams;
    uint64_t *need;
    void (*wake)(void *);
    void *wake_arg;

    pthread_t th;
    bool th_running;
    volatile int stop; /* read by the download between snapshots */
    int delay_s;       /* the next download waits this long first: a merge failed (doubling) */
    pthread_mutex_t mu;
    /* under mu: the download's outcome */
    bool ready;
    char path[4096];
    char info[600];
    char err[600];
    bool have_err;

    /* engine thread only */
    hl_catchup_state state;
    hl_merge *m;
    char merging[4096]; /* the file being merged, "" when none */
    char merging_info[600];
    uint64_t total, merged, rows_all, last_merged;
    uint64_t started_ms, progress_ms;
    char reason[600];
};

bool hl_catchup_configured(const hl_config *c)
{
    return hl_config_snapshot_store_set(c);
}

static void remove_file(const char *path)
{
    static const char *const side[] = {"", "-wal", "-shm", "-journal"};
    char p[4200];
    for (size_t i = 0; path[0] && i < 4; i++) {
        snprintf(p, sizeof p, "%s%s", path, side[i]);
        unlink(p);
    }
}

/* Sleeps s seconds or until told to stop. */
static void pause_s(hl_catchup *cu, int s)
{
    for (int i = 0; i < s * 10 && !cu->stop; i++)
        usleep(100000);
}

static void *download_thread(void *arg)
{
    hl_catchup *cu = arg;
    int backoff = RETRY_FIRST_S;
    pause_s(cu, cu->delay_s);
    while (!cu->stop) {
        char path[4096], info[600], err[600];
        err[0] = 0;
        hl_status st = hl_snapshot_fetch_covering(cu->c, cu->n, cu->streams, cu->need, &cu->stop, path, sizeof path,
                                                  info, sizeof info, err, sizeof err);
        if (cu->stop) {
            if (!st)
                remove_file(path);
            break;
        }
        pthread_mutex_lock(&cu->mu);
        if (!st) {
            cu->ready = true;
            snprintf(cu->path, sizeof cu->path, "%s", path);
            snprintf(cu->info, sizeof cu->info, "%s", info);
        } else {
            cu->have_err = true;
            snprintf(cu->err, sizeof cu->err, "%s%s", st == HL_ERR_NOT_FOUND ? "" : "download failed: ", err);
        }
        pthread_mutex_unlock(&cu->mu);
        if (cu->wake)
            cu->wake(cu->wake_arg);
        if (!st)
            break;
        int wait = st == HL_ERR_NOT_FOUND ? NOT_FOUND_RETRY_S : backoff;
        hl_logf(st == HL_ERR_NOT_FOUND ? HL_LOG_WARN : HL_LOG_ERROR, "catch-up: %s; trying again in %d s", err, wait);
        if (st != HL_ERR_NOT_FOUND && backoff < RETRY_MAX_S)
            backoff = backoff * 2 > RETRY_MAX_S ? RETRY_MAX_S : backoff * 2;
        pause_s(cu, wait);
    }
    return NULL;
}

static hl_status start_download(hl_catchup *cu)
{
    cu->ready = cu->have_err = false;
    cu->state = HL_CATCHUP_DOWNLOADING;
    if (pthread_create(&cu->th, NULL, download_thread, cu) != 0)
        return HL_ERR_IO;
    cu->th_running = true;
    return HL_OK;
}

static void join_download(hl_catchup *cu)
{
    if (cu->th_running) {
        cu->stop = 1;
        pthread_join(cu->th, NULL);
        cu->th_running = false;
        cu->stop = 0;
    }
}

hl_status hl_catchup_start(hl_catchup **out, const hl_config *c, hl_db *d, int n, char *const *streams,
                           const uint64_t *need, void (*wake)(void *), void *wake_arg)
{
    hl_catchup *cu = calloc(1, sizeof *cu);
    *out = NULL;
    if (!cu || !(cu->need = calloc((size_t)n, sizeof *cu->need))) {
        free(cu);
        return HL_ERR_NOMEM;
    }
    memcpy(cu->need, need, (size_t)n * sizeof *need);
    cu->c = c;
    cu->d = d;
    cu->n = n;
    cu->streams = streams;
    cu->wake = wake;
    cu->wake_arg = wake_arg;
    pthread_mutex_init(&cu->mu, NULL);
    snprintf(cu->reason, sizeof cu->reason, "catching-up: looking for a snapshot that covers the gap");
    if (start_download(cu)) {
        pthread_mutex_destroy(&cu->mu);
        free(cu->need);
        free(cu);
        return HL_ERR_IO;
    }
    *out = cu;
    return HL_OK;
}

/* The merge failed or cannot start: the file goes, and a download starts over. */
static void start_over(hl_catchup *cu, const char *why)
{
    hl_logf(HL_LOG_ERROR, "catch-up: merging %s failed: %s; downloading again",
            cu->merging_info[0] ? cu->merging_info : "a snapshot", why);
    hl_db_merge_close(cu->m);
    cu->m = NULL;
    remove_file(cu->merging);
    cu->merging[0] = 0;
    cu->delay_s = cu->delay_s ? (cu->delay_s * 2 > RETRY_MAX_S ? RETRY_MAX_S : cu->delay_s * 2) : RETRY_FIRST_S;
    snprintf(cu->reason, sizeof cu->reason, "catching-up: the last merge failed (%s); downloading again in %d s", why,
             cu->delay_s);
    join_download(cu);
    if (start_download(cu))
        cu->state = HL_CATCHUP_WAITING;
}

/* A downloaded file: opened for merging, its positions checked against the gap. */
static void begin_merge(hl_catchup *cu)
{
    char err[512];
    join_download(cu);
    snprintf(cu->merging, sizeof cu->merging, "%s", cu->path);
    snprintf(cu->merging_info, sizeof cu->merging_info, "%s", cu->info);
    cu->ready = false;
    if (hl_db_merge_open(cu->d, cu->merging, &cu->m, &cu->total, err, sizeof err)) {
        start_over(cu, err);
        return;
    }
    /* The manifest said it covers the gap; the file's own positions decide. */
    for (int i = 0; i < cu->n; i++) {
        uint64_t have = hl_db_merge_stream_seq(cu->m, cu->streams[i]);
        if (cu->need[i] && have < cu->need[i]) {
            snprintf(err, sizeof err, "its database reaches stream %s only up to %" PRIu64 ", not %" PRIu64,
                     cu->streams[i], have, cu->need[i]);
            start_over(cu, err);
            return;
        }
    }
    cu->state = HL_CATCHUP_MERGING;
    cu->merged = cu->last_merged = 0;
    cu->started_ms = cu->progress_ms = hl_mono_ms();
    hl_log(HL_LOG_INFO, "catch-up: merging snapshot", "snapshot", cu->merging_info, NULL);
}

static void merge_batch(hl_catchup *cu)
{
    bool done = false;
    uint64_t merged = cu->merged;
    hl_status st = hl_db_merge_step(cu->m, HL_CATCHUP_BATCH_ROWS, &merged, &done);
    if (st) {
        start_over(cu, hl_status_str(st));
        return;
    }
    cu->rows_all += merged - cu->merged;
    cu->merged = merged;
    uint64_t now = hl_mono_ms();
    if (now - cu->progress_ms >= PROGRESS_MS) {
        double s = (double)(now - cu->progress_ms) / 1000.0;
        hl_logf(HL_LOG_INFO, "catch-up: merged %" PRIu64 " of %" PRIu64 " rows (%.0f rows/s)", cu->merged, cu->total,
                (double)(cu->merged - cu->last_merged) / s);
        cu->progress_ms = now;
        cu->last_merged = cu->merged;
    }
    if (!done)
        return;
    if ((st = hl_db_merge_finish(cu->m))) {
        start_over(cu, hl_status_str(st));
        return;
    }
    hl_db_merge_close(cu->m);
    cu->m = NULL;
    remove_file(cu->merging);
    cu->merging[0] = 0;
    cu->state = HL_CATCHUP_DONE;
    hl_logf(HL_LOG_INFO, "catch-up: merged %" PRIu64 " rows of %s in %.1f s; reading the streams from its positions",
            cu->merged, cu->merging_info, (double)(hl_mono_ms() - cu->started_ms) / 1000.0);
}

hl_catchup_state hl_catchup_turn(hl_catchup *cu, char *reason, size_t len)
{
    if (cu->state == HL_CATCHUP_DOWNLOADING || cu->state == HL_CATCHUP_WAITING) {
        pthread_mutex_lock(&cu->mu);
        bool ready = cu->ready;
        if (cu->have_err) {
            cu->state = HL_CATCHUP_WAITING;
            snprintf(cu->reason, sizeof cu->reason, "%s", cu->err);
            cu->have_err = false;
        }
        pthread_mutex_unlock(&cu->mu);
        if (ready)
            begin_merge(cu);
    } else if (cu->state == HL_CATCHUP_MERGING) {
        merge_batch(cu);
    }
    if (cu->state == HL_CATCHUP_MERGING)
        snprintf(cu->reason, sizeof cu->reason, "catching-up from snapshot %s: %" PRIu64 " of %" PRIu64 " rows merged",
                 cu->merging_info, cu->merged, cu->total);
    snprintf(reason, len, "%s", cu->reason);
    return cu->state;
}

bool hl_catchup_busy(const hl_catchup *cu)
{
    return cu && cu->state == HL_CATCHUP_MERGING;
}

uint64_t hl_catchup_rows(const hl_catchup *cu)
{
    return cu ? cu->rows_all : 0;
}

void hl_catchup_free(hl_catchup *cu)
{
    if (!cu)
        return;
    join_download(cu);
    hl_db_merge_close(cu->m);
    remove_file(cu->merging);
    if (cu->ready)
        remove_file(cu->path);
    pthread_mutex_destroy(&cu->mu);
    free(cu->need);
    free(cu);
}
