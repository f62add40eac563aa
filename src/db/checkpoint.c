/*
 * checkpoint.c - WAL checkpoints off everybody's commit path.
 *
 * By default SQLite checkpoints inside the COMMIT of whichever connection
 * pushes the WAL past 1000 pages: under a write burst that is often the
 * application, whose commit then copies pages into the database file and
 * waits for an fsync, while harmonylite's own writes (clocks, outbox) have
 * helped fill the WAL. This thread does that work instead, on its own
 * connection: the engine kicks it after a commit that left the WAL at
 * HL_CHECKPOINT_FRAMES or more, and it runs a PASSIVE checkpoint, which
 * never blocks readers or writers and takes no write lock. The engine
 * connection's own automatic checkpoints are off (its WAL hook replaces
 * them); the application keeps SQLite's default as a backstop.
 *
 * PASSIVE alone does not bound the -wal file. Under a steady stream of
 * commits with readers on the WAL (the engine's own snapshot reads, the
 * application's readers) the WAL is never fully checkpointed at the moment a
 * writer could restart it, so it only grows, and once grown the file never
 * shrinks (3.3 GB for 30 s of scattered updates, docs/performance.md). So
 * after a PASSIVE checkpoint that left the -wal file larger than the limit
 * (wal_size_limit), this thread runs a TRUNCATE checkpoint: it takes the
 * write lock, copies the rest, waits for the readers still on the WAL to end
 * their read transactions and cuts the file to zero. Readers that begin
 * meanwhile read the database file (the WAL is fully copied) and do not hold
 * it up, so an engine snapshot in progress delays it by one capture's read at
 * most. Its busy handler gives up after HL_CHECKPOINT_BUSY_MS, so the
 * application's writers wait at most that long (plus the copying) behind it;
 * while the file stays above the limit it tries again, every
 * HL_CHECKPOINT_RETRY_MS at first, backing off to twice a second while
 * something (a long application read) keeps refusing it.
 */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "db/db_int.h"

#define HL_CHECKPOINT_BUSY_MS 100 /* a TRUNCATE checkpoint waits this long for locks, then gives up */
#define HL_CHECKPOINT_RETRY_MS 20 /* first retry while the -wal file stays above the limit */
#define HL_CHECKPOINT_RETRY_MAX_MS 500

struct hl_checkpointer {
    sqlite3 *db;
    char *wal_path;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool want, stop;
    int64_t limit;        /* -wal file bytes; above it, truncate (under mu) */
    uint64_t runs;        /* checkpoints run, for tests */
    uint64_t truncations; /* TRUNCATE checkpoints that succeeded */
    uint64_t busy_until;  /* monotonic ms when the busy handler gives up (this thread only) */
    uint64_t busy_calls;  /* the busy handler's calls in this checkpoint (this thread only) */
};

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Polls every 100 µs until busy_until. Most of the wait is for the write
 * lock, between two of the application's write transactions: the gap after a
 * commit may be well under a millisecond, and nobody waits for us meanwhile.
 * Once we hold the write lock and wait for readers to leave the WAL, the
 * application's writers wait for us; that is what the budget bounds. */
static int busy_wait(void *arg, int tries)
{
    hl_checkpointer *c = arg;
    c->busy_calls++;
    if (mono_ms() >= c->busy_until)
        return 0;
    (void)tries;
    usleep(100);
    return 1;
}

static int64_t wal_size(const hl_checkpointer *c)
{
    struct stat sb;
    return stat(c->wal_path, &sb) == 0 ? (int64_t)sb.st_size : 0;
}

/* The -wal file is above the limit: cuts it to zero unless a reader or a
 * writer keeps it for longer than HL_CHECKPOINT_BUSY_MS. True when done. */
static bool truncate_wal(hl_checkpointer *c)
{
    uint64_t until = mono_ms() + HL_CHECKPOINT_BUSY_MS;
    for (;;) {
        c->busy_until = until;
        c->busy_calls = 0;
        int rc = sqlite3_wal_checkpoint_v2(c->db, NULL, SQLITE_CHECKPOINT_TRUNCATE, NULL, NULL);
        if (rc == SQLITE_OK)
            return true;
        if ((rc & 0xff) != SQLITE_BUSY) {
            hl_warnf("WAL checkpoint (truncate) failed: %s", sqlite3_errmsg(c->db));
            return false;
        }
        /* BUSY without a wait: another checkpoint runs (the application's
         * automatic one, in its commit), which SQLite does not wait for. */
        if (c->busy_calls || mono_ms() >= until)
            return false;
        usleep(100);
    }
}

static void *run(void *arg)
{
    hl_checkpointer *c = arg;
    uint64_t retry_ms = 0; /* nonzero: the -wal file is above the limit, look again after this */
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->want && !c->stop) {
            if (!retry_ms) {
                pthread_cond_wait(&c->cv, &c->mu);
                continue;
            }
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += (time_t)(retry_ms / 1000u);
            ts.tv_nsec += (long)(retry_ms % 1000u) * 1000000L;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            if (pthread_cond_timedwait(&c->cv, &c->mu, &ts) == ETIMEDOUT)
                break;
        }
        if (c->stop)
            break;
        c->want = false;
        int64_t limit = c->limit;
        pthread_mutex_unlock(&c->mu);
        int nlog = 0, nckpt = 0;
        int rc = sqlite3_wal_checkpoint_v2(c->db, NULL, SQLITE_CHECKPOINT_PASSIVE, &nlog, &nckpt);
        /* BUSY: another connection is checkpointing right now; it does the work. */
        if (rc != SQLITE_OK && (rc & 0xff) != SQLITE_BUSY)
            hl_warnf("WAL checkpoint failed: %s", sqlite3_errmsg(c->db));
        bool truncated = false;
        if (wal_size(c) <= limit)
            retry_ms = 0;
        else if ((truncated = truncate_wal(c)) && wal_size(c) <= limit)
            retry_ms = 0;
        else /* refused (or refilled at once): again soon, less often while it keeps failing */
            retry_ms = !retry_ms                                   ? HL_CHECKPOINT_RETRY_MS
                       : retry_ms * 2 > HL_CHECKPOINT_RETRY_MAX_MS ? HL_CHECKPOINT_RETRY_MAX_MS
                                                                   : retry_ms * 2;
        pthread_mutex_lock(&c->mu);
        c->runs++;
        c->truncations += truncated;
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

hl_status hl_checkpointer_start(hl_checkpointer **out, const char *path)
{
    hl_checkpointer *c = calloc(1, sizeof *c);
    *out = NULL;
    size_t n = strlen(path) + 5;
    if (!c || !(c->wal_path = malloc(n))) {
        free(c);
        return HL_ERR_NOMEM;
    }
    snprintf(c->wal_path, n, "%s-wal", path);
    c->limit = HL_WAL_SIZE_LIMIT_DEFAULT;
    int rc = sqlite3_open_v2(path, &c->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        hl_warnf("checkpoint connection: %s", c->db ? sqlite3_errmsg(c->db) : sqlite3_errstr(rc));
        sqlite3_close(c->db);
        free(c->wal_path);
        free(c);
        return HL_ERR_SQLITE;
    }
    sqlite3_busy_handler(c->db, busy_wait, c);
    /* A connection opens the WAL when it first reads; until then a
     * checkpoint on it does nothing. */
    sqlite3_exec(c->db, "SELECT count(*) FROM sqlite_schema", NULL, NULL, NULL);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    if (pthread_create(&c->th, NULL, run, c) != 0) {
        pthread_mutex_destroy(&c->mu);
        pthread_cond_destroy(&c->cv);
        sqlite3_close(c->db);
        free(c->wal_path);
        free(c);
        return HL_ERR_IO;
    }
    *out = c;
    return HL_OK;
}

void hl_checkpointer_kick(hl_checkpointer *c)
{
    pthread_mutex_lock(&c->mu);
    c->want = true;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

void hl_checkpointer_set_limit(hl_checkpointer *c, int64_t bytes)
{
    pthread_mutex_lock(&c->mu);
    c->limit = bytes;
    c->want = true; /* a lower limit may already be passed */
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
}

uint64_t hl_checkpointer_truncations(hl_checkpointer *c)
{
    pthread_mutex_lock(&c->mu);
    uint64_t n = c->truncations;
    pthread_mutex_unlock(&c->mu);
    return n;
}

uint64_t hl_checkpointer_runs(hl_checkpointer *c)
{
    pthread_mutex_lock(&c->mu);
    uint64_t n = c->runs;
    pthread_mutex_unlock(&c->mu);
    return n;
}

void hl_checkpointer_stop(hl_checkpointer *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&c->mu);
    c->stop = true;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
    pthread_join(c->th, NULL);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->cv);
    sqlite3_close(c->db);
    free(c->wal_path);
    free(c);
}
