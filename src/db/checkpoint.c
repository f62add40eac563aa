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
 */
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>

#include "common/log.h"
#include "db/db_int.h"

struct hl_checkpointer {
    sqlite3 *db;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool want, stop;
    uint64_t runs; /* checkpoints run, for tests */
};

static void *run(void *arg)
{
    hl_checkpointer *c = arg;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->want && !c->stop)
            pthread_cond_wait(&c->cv, &c->mu);
        if (c->stop)
            break;
        c->want = false;
        pthread_mutex_unlock(&c->mu);
        int nlog = 0, nckpt = 0;
        int rc = sqlite3_wal_checkpoint_v2(c->db, NULL, SQLITE_CHECKPOINT_PASSIVE, &nlog, &nckpt);
        /* BUSY: another connection is checkpointing right now; it does the work. */
        if (rc != SQLITE_OK && (rc & 0xff) != SQLITE_BUSY)
            hl_warnf("WAL checkpoint failed: %s", sqlite3_errmsg(c->db));
        pthread_mutex_lock(&c->mu);
        c->runs++;
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

hl_status hl_checkpointer_start(hl_checkpointer **out, const char *path)
{
    hl_checkpointer *c = calloc(1, sizeof *c);
    *out = NULL;
    if (!c)
        return HL_ERR_NOMEM;
    int rc = sqlite3_open_v2(path, &c->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        hl_warnf("checkpoint connection: %s", c->db ? sqlite3_errmsg(c->db) : sqlite3_errstr(rc));
        sqlite3_close(c->db);
        free(c);
        return HL_ERR_SQLITE;
    }
    /* A connection opens the WAL when it first reads; until then a
     * checkpoint on it does nothing. */
    sqlite3_exec(c->db, "SELECT count(*) FROM sqlite_schema", NULL, NULL, NULL);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    if (pthread_create(&c->th, NULL, run, c) != 0) {
        pthread_mutex_destroy(&c->mu);
        pthread_cond_destroy(&c->cv);
        sqlite3_close(c->db);
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
    free(c);
}
