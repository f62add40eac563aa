/*
 * store.c - the engine connection and harmonylite's own tables.
 *
 * Every table harmonylite creates starts with __harmonylite__ so -cleanup can
 * find them all and the schema scan can skip them.
 */
#include <errno.h>
#include <fcntl.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "common/hlc.h"
#include "common/log.h"
#include "db/db_int.h"

static const char *const internal_ddl =
    "CREATE TABLE IF NOT EXISTS " HL_PREFIX "ctl(id INTEGER PRIMARY KEY CHECK (id = 1), applying INTEGER NOT NULL);"
    "INSERT OR IGNORE INTO " HL_PREFIX "ctl VALUES (1, 0);"
    "CREATE TABLE IF NOT EXISTS " HL_PREFIX "meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS " HL_PREFIX "outbox(seq INTEGER PRIMARY KEY, flags INTEGER NOT NULL,"
    " rows INTEGER NOT NULL, data BLOB NOT NULL);"
    "CREATE TABLE IF NOT EXISTS " HL_PREFIX "origins(node INTEGER NOT NULL, epoch INTEGER NOT NULL,"
    " seq INTEGER NOT NULL, PRIMARY KEY (node, epoch)) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS " HL_PREFIX "seq(stream TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS " HL_PREFIX "conflicts(id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL,"
    " origin INTEGER NOT NULL, tbl TEXT NOT NULL, pk BLOB, hlc INTEGER, reason TEXT NOT NULL, row BLOB);"
    "CREATE TABLE IF NOT EXISTS " HL_PREFIX "pending(id INTEGER PRIMARY KEY, node INTEGER NOT NULL,"
    " epoch INTEGER NOT NULL, seq INTEGER NOT NULL, flags INTEGER NOT NULL, data BLOB NOT NULL,"
    " schema INTEGER NOT NULL, at_ms INTEGER NOT NULL, reason TEXT NOT NULL, UNIQUE (node, epoch, seq));"
    "CREATE TABLE IF NOT EXISTS " HL_PREFIX "missing(node INTEGER NOT NULL, epoch INTEGER NOT NULL,"
    " lo INTEGER NOT NULL, hi INTEGER NOT NULL, at_ms INTEGER NOT NULL, PRIMARY KEY (node, epoch, lo)) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS " HL_PREFIX "tables(name TEXT PRIMARY KEY, keysig TEXT NOT NULL) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS " HL_PREFIX "hwm(tbl TEXT PRIMARY KEY, hwm INTEGER NOT NULL) WITHOUT ROWID;";

void hl_db_global_init(void)
{
    /* SQLite's memory statistics take a global mutex on every allocation;
     * we never read them. Must precede sqlite3_initialize(). */
    sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0);
}

hl_status hl_db_err(hl_db *d, int rc, const char *what)
{
    int prc = rc & 0xff;
    const char *msg = d && d->db ? sqlite3_errmsg(d->db) : sqlite3_errstr(rc);
    hl_log(prc == SQLITE_BUSY || prc == SQLITE_LOCKED ? HL_LOG_WARN : HL_LOG_ERROR, "sqlite error", "op", what, "error",
           msg, NULL);
    if (d)
        snprintf(d->last_error, sizeof d->last_error, "%s: %s", what, msg);
    if (prc == SQLITE_BUSY || prc == SQLITE_LOCKED)
        return HL_ERR_BUSY;
    if (prc == SQLITE_CONSTRAINT)
        return HL_ERR_CONSTRAINT;
    return HL_ERR_SQLITE;
}

hl_status hl_db_run(hl_db *d, const hl_buf *sql, const char *name, int64_t *row, const char *what)
{
    hl_status st = hl_buf_status(sql);
    if (st)
        return st; /* never run a statement that was cut short */
    sqlite3_stmt *s = NULL;
    int rc = sqlite3_prepare_v2(d->db, hl_buf_str(sql), -1, &s, NULL);
    if (rc == SQLITE_OK && name)
        rc = sqlite3_bind_text(s, 1, name, -1, SQLITE_STATIC);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(s);
    if (row && rc == SQLITE_ROW)
        *row = sqlite3_column_int64(s, 0);
    else if (rc != SQLITE_DONE || row)
        st = hl_db_err(d, rc == SQLITE_DONE ? SQLITE_ERROR : rc, what);
    sqlite3_finalize(s);
    return st;
}

hl_status hl_db_exec(hl_db *d, const char *sql)
{
    char *msg = NULL;
    int rc = sqlite3_exec(d->db, sql, NULL, NULL, &msg);
    if (rc != SQLITE_OK) {
        hl_log(HL_LOG_ERROR, "sqlite exec failed", "error", msg ? msg : sqlite3_errstr(rc), NULL);
        snprintf(d->last_error, sizeof d->last_error, "%s", msg ? msg : sqlite3_errstr(rc));
        sqlite3_free(msg);
        int prc = rc & 0xff;
        return prc == SQLITE_BUSY || prc == SQLITE_LOCKED ? HL_ERR_BUSY : HL_ERR_SQLITE;
    }
    return HL_OK;
}

hl_status hl_db_begin(hl_db *d)
{
    /* The busy handler waits for the application's writer; a few extra tries
     * cover the rare case where the handler gives up (deadlock avoidance). */
    for (int i = 0;; i++) {
        int rc = sqlite3_exec(d->db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
        if (rc == SQLITE_OK) {
            d->txn_next_seq = d->next_seq;
            return HL_OK;
        }
        if ((rc & 0xff) != SQLITE_BUSY || i >= 5)
            return hl_db_err(d, rc, "begin");
        usleep(10000);
    }
}

/* Replaces the connection's automatic checkpoint: only notes the WAL size. */
static int wal_hook(void *arg, sqlite3 *db, const char *name, int frames)
{
    (void)db;
    (void)name;
    ((hl_db *)arg)->wal_frames = frames;
    return SQLITE_OK;
}

hl_status hl_db_commit(hl_db *d)
{
    for (int i = 0;; i++) {
        int rc = sqlite3_exec(d->db, "COMMIT", NULL, NULL, NULL);
        if (rc == SQLITE_OK) {
            if (d->ckpt && d->wal_frames >= HL_CHECKPOINT_FRAMES) {
                hl_checkpointer_kick(d->ckpt);
                d->wal_frames = 0;
            }
            return HL_OK;
        }
        if ((rc & 0xff) != SQLITE_BUSY || i >= 50) {
            hl_status st = hl_db_err(d, rc, "commit");
            hl_db_rollback(d);
            return st;
        }
        usleep(10000);
    }
}

void hl_db_rollback(hl_db *d)
{
    if (!sqlite3_get_autocommit(d->db))
        sqlite3_exec(d->db, "ROLLBACK", NULL, NULL, NULL);
    /* A sequence handed out in a rolled-back transaction was never stored;
     * reusing it keeps the origin's sequence free of gaps. */
    d->next_seq = d->txn_next_seq;
}

static hl_status prep(hl_db *d, sqlite3_stmt **st, const char *sql)
{
    int rc = sqlite3_prepare_v3(d->db, sql, -1, SQLITE_PREPARE_PERSISTENT, st, NULL);
    return rc == SQLITE_OK ? HL_OK : hl_db_err(d, rc, sql);
}

/* Steps a cached single-value statement, returns column 0 (dflt when no row or NULL), resets it. */
static int64_t step_int(sqlite3_stmt *st, int64_t dflt)
{
    int64_t v = dflt;
    if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL)
        v = sqlite3_column_int64(st, 0);
    sqlite3_reset(st);
    return v;
}

static int64_t query_int(hl_db *d, const char *sql, int64_t dflt)
{
    sqlite3_stmt *st = NULL;
    int64_t v = dflt;
    if (sqlite3_prepare_v2(d->db, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW &&
        sqlite3_column_type(st, 0) != SQLITE_NULL)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

hl_status hl_db_meta_get(hl_db *d, const char *key, int64_t *v, bool *found)
{
    sqlite3_stmt *st = NULL;
    *found = false;
    int rc = sqlite3_prepare_v2(d->db, "SELECT value FROM " HL_PREFIX "meta WHERE key = ?", -1, &st, NULL);
    if (rc != SQLITE_OK)
        return hl_db_err(d, rc, "meta get");
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        *v = sqlite3_column_int64(st, 0);
        *found = true;
    }
    sqlite3_finalize(st);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "meta get");
}

hl_status hl_db_meta_put(hl_db *d, const char *key, int64_t v)
{
    sqlite3_stmt *st = d->st_meta_put;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, v);
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "meta put");
}

static uint64_t random_epoch(void)
{
    uint64_t v = 0;
    while (v == 0) {
        if (getrandom(&v, sizeof v, 0) != (ssize_t)sizeof v)
            v = hl_now_ms() ^ ((uint64_t)getpid() << 32);
        v &= 0x7FFFFFFFFFFFFFFFull; /* SQLite integers are signed */
    }
    return v;
}

/*
 * Waiting for the application's write lock. SQLite's default handler sleeps
 * 1, 2, 5, 10, 15... ms between tries, so a capture that collides with a short
 * application transaction loses far more time than the transaction took.
 * Applications commit in well under a millisecond, so poll finely at first,
 * then back off; give up after the same 5 s as sqlite3_busy_timeout(5000).
 */
static int busy_wait(void *arg, int tries)
{
    hl_db *d = arg;
    uint64_t now = hl_mono_ms();
    if (tries == 0)
        d->busy_since = now;
    if (now - d->busy_since >= 5000)
        return 0;
    usleep(tries < 50 ? 100 : tries < 200 ? 500 : 2000);
    return 1;
}

/* The connection and its settings: WAL, cache, synchronous, no foreign keys
 * or recursive triggers (apply writes rows as they were written elsewhere). */
static hl_status open_connection(hl_db *d, const char *path, int64_t cache_kib)
{
    char sql[128];
    hl_status st;
    int rc = sqlite3_open_v2(path, &d->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        hl_log(HL_LOG_ERROR, "cannot open database", "path", path, "error",
               d->db ? sqlite3_errmsg(d->db) : sqlite3_errstr(rc), NULL);
        return HL_ERR_SQLITE;
    }
    sqlite3_busy_handler(d->db, busy_wait, d);
    sqlite3_extended_result_codes(d->db, 1);
    /* WAL lets the application read while we write and vice versa. It is a
     * property of the file, so it persists for the application too. */
    if ((st = hl_db_exec(d, "PRAGMA journal_mode = WAL")))
        return st;
    d->cache_kib = cache_kib > 0 ? cache_kib : 2000;
    snprintf(sql, sizeof sql, "PRAGMA cache_size = -%lld", (long long)d->cache_kib);
    if ((st = hl_db_exec(d, sql)) || (st = hl_db_exec(d, "PRAGMA synchronous = NORMAL")) ||
        (st = hl_db_exec(d, "PRAGMA foreign_keys = OFF")))
        return st;
    return hl_db_exec(d, "PRAGMA recursive_triggers = OFF");
}

/* The epoch (a new one for a new database or one copied from another node),
 * the next changeset sequence and the last version, from meta. */
static hl_status load_meta(hl_db *d, uint64_t node_id)
{
    int64_t v;
    bool found;
    uint64_t stored_node = 0;
    hl_status st;
    if ((st = hl_db_meta_get(d, "node_id", &v, &found)))
        return st;
    if (found)
        stored_node = (uint64_t)v;
    if ((st = hl_db_meta_get(d, "epoch", &v, &found)))
        return st;
    if (found && stored_node == node_id) {
        d->epoch = (uint64_t)v;
    } else {
        /* New database, or one copied from another node: start a new origin
         * incarnation so its changesets can never be mistaken for old ones. */
        if (found)
            hl_logf(HL_LOG_WARN, "database was last used by node %llu; starting a new origin epoch as node %llu",
                    (unsigned long long)stored_node, (unsigned long long)node_id);
        d->epoch = random_epoch();
        if ((st = hl_db_meta_put(d, "epoch", (int64_t)d->epoch)) ||
            (st = hl_db_meta_put(d, "node_id", (int64_t)node_id)) || (st = hl_db_meta_put(d, "next_seq", 1)))
            return st;
    }
    if ((st = hl_db_meta_get(d, "next_seq", &v, &found)))
        return st;
    d->next_seq = found && v > 0 ? (uint64_t)v : 1;
    /* Outbox rows may be ahead of next_seq only if meta was lost; never reuse a sequence. */
    int64_t maxo = query_int(d, "SELECT max(seq) FROM " HL_PREFIX "outbox", 0);
    if (maxo >= (int64_t)d->next_seq)
        d->next_seq = (uint64_t)maxo + 1;
    if ((st = hl_db_meta_get(d, "last_hlc", &v, &found)))
        return st;
    /* A negative value is a version that overflowed before versions were
     * bounded: start again from the wall clock (stored clocks that are
     * negative compare lower than every version, so later writes win). */
    if (found && v < 0)
        hl_logf(HL_LOG_WARN, "meta.last_hlc %lld is not a valid version; restarting the clock from the wall clock",
                (long long)v);
    d->last_hlc = found && v > 0 ? (uint64_t)v : 0;
    return HL_OK;
}

/* harmonylite's tables, created or brought up to date, and meta read: one
 * write transaction. */
static hl_status init_tables(hl_db *d, uint64_t node_id)
{
    hl_status st = hl_db_begin(d);
    if (st)
        return st;
    if ((st = hl_db_exec(d, internal_ddl)))
        goto rollback;
    /* Databases from before conflicts kept the row itself get the column. */
    if (query_int(d, "SELECT count(*) FROM pragma_table_info('" HL_PREFIX "conflicts') WHERE name = 'row'", 1) == 0 &&
        (st = hl_db_exec(d, "ALTER TABLE " HL_PREFIX "conflicts ADD COLUMN row BLOB")))
        goto rollback;
    /* A crash between "applying = 1" and commit never commits the flag, but a
     * file copied mid-transaction by a tool could; make sure it is clear. */
    if ((st = hl_db_exec(d, "UPDATE " HL_PREFIX "ctl SET applying = 0 WHERE applying <> 0")))
        goto rollback;
    if ((st = prep(d, &d->st_meta_put,
                   "INSERT INTO " HL_PREFIX "meta(key, value) VALUES (?, ?) "
                   "ON CONFLICT(key) DO UPDATE SET value = excluded.value")) ||
        (st = load_meta(d, node_id)))
        goto rollback;
    return hl_db_commit(d);
rollback:
    hl_db_rollback(d);
    return st;
}

/* The statements kept prepared for the life of the connection. */
static hl_status prepare_statements(hl_db *d)
{
    hl_status st;
    if ((st = hl_outbox_prepare(d)) ||
        (st = prep(d, &d->st_hwm_get, "SELECT hwm FROM " HL_PREFIX "hwm WHERE tbl = ?")) ||
        (st = prep(d, &d->st_hwm_put, "UPDATE " HL_PREFIX "hwm SET hwm = ?2 WHERE tbl = ?1 AND hwm < ?2")) ||
        (st = prep(d, &d->st_data_version, "PRAGMA data_version")) ||
        (st = prep(d, &d->st_schema_version, "PRAGMA schema_version")) ||
        (st = prep(d, &d->st_conflict_put,
                   "INSERT INTO " HL_PREFIX
                   "conflicts(at_ms, origin, tbl, pk, hlc, reason, row) VALUES (?, ?, ?, ?, ?, ?, ?)")) ||
        (st = prep(d, &d->st_origin_get, "SELECT seq FROM " HL_PREFIX "origins WHERE node = ? AND epoch = ?")) ||
        (st = prep(d, &d->st_origin_put,
                   "INSERT INTO " HL_PREFIX "origins(node, epoch, seq) VALUES (?, ?, ?) "
                   "ON CONFLICT(node, epoch) DO UPDATE SET seq = excluded.seq")) ||
        (st = prep(d, &d->st_seq_put,
                   "INSERT INTO " HL_PREFIX "seq(stream, seq) VALUES (?, ?) "
                   "ON CONFLICT(stream) DO UPDATE SET seq = excluded.seq")))
        return st;
    return prep(d, &d->st_pending_put,
                "INSERT OR IGNORE INTO " HL_PREFIX "pending(node, epoch, seq, flags, data, schema, at_ms, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)");
}

hl_status hl_db_open(hl_db **out, const char *path, uint64_t node_id, int64_t cache_kib)
{
    hl_status st;
    hl_db *d = calloc(1, sizeof *d);
    *out = NULL;
    if (!d)
        return HL_ERR_NOMEM;
    d->node_id = node_id;
    d->opt.max_changeset_bytes = 256u << 20; /* replication_log.max_changeset_bytes' default */
    d->opt.max_clock_drift_ms = 60000;
    d->opt.wal_size_limit = HL_WAL_SIZE_LIMIT_DEFAULT;
    d->null_key_log = (hl_ratelimit){.burst = 5, .window_ms = 60000};
    d->clock_ahead_log = (hl_ratelimit){.burst = 5, .window_ms = 60000};
    if (!(d->path = strdup(path))) {
        st = HL_ERR_NOMEM;
        goto fail;
    }
    if ((st = open_connection(d, path, cache_kib)) || (st = init_tables(d, node_id)) || (st = prepare_statements(d)))
        goto fail;
    /* WAL mode is set: checkpoints can move to their own thread. Without it
     * the connection keeps SQLite's automatic checkpoint. */
    if (hl_checkpointer_start(&d->ckpt, path) == HL_OK)
        sqlite3_wal_hook(d->db, wal_hook, d);
    d->data_version = -1;
    d->schema_version = -1;
    hl_db_changed_externally(d);
    *out = d;
    return HL_OK;
fail:
    hl_db_close(d);
    return st;
}

void hl_db_close(hl_db *d)
{
    if (!d)
        return;
    hl_checkpointer_stop(d->ckpt);
    hl_schema_free(&d->schema);
    hl_outbox_finalize(&d->outbox);
    sqlite3_finalize(d->st_hwm_get);
    sqlite3_finalize(d->st_hwm_put);
    sqlite3_finalize(d->st_meta_put);
    sqlite3_finalize(d->st_conflict_put);
    sqlite3_finalize(d->st_origin_get);
    sqlite3_finalize(d->st_origin_put);
    sqlite3_finalize(d->st_seq_put);
    sqlite3_finalize(d->st_pending_put);
    sqlite3_finalize(d->st_data_version);
    sqlite3_finalize(d->st_schema_version);
    if (d->db)
        sqlite3_close_v2(d->db);
    free(d->path);
    free(d);
}

void hl_db_release_memory(hl_db *d)
{
    sqlite3_db_release_memory(d->db);
#ifdef __GLIBC__
    malloc_trim(0); /* glibc keeps freed heap (every thread's arena) for reuse */
#endif
}

void hl_db_configure(hl_db *d, const hl_db_options *o)
{
    d->opt = *o;
    if (!d->opt.wal_size_limit)
        d->opt.wal_size_limit = HL_WAL_SIZE_LIMIT_DEFAULT;
    if (d->ckpt)
        hl_checkpointer_set_limit(d->ckpt, (int64_t)d->opt.wal_size_limit);
}

const hl_db_options *hl_db_get_options(const hl_db *d)
{
    return &d->opt;
}

hl_status hl_db_install(hl_db *d, bool capture, uint64_t *rows)
{
    bool changed;
    uint64_t n = 0;
    hl_status st = hl_db_begin(d);
    if (st)
        return st;
    if (!(st = hl_triggers_sync(d, true, &changed)) && capture)
        st = hl_capture(d, &n);
    if (st) {
        hl_db_rollback(d);
        return st;
    }
    if (rows)
        *rows = n;
    return hl_db_commit(d);
}

const hl_db_stats *hl_db_counters(const hl_db *d)
{
    return &d->stats;
}

uint64_t hl_db_epoch(const hl_db *d)
{
    return d->epoch;
}

uint64_t hl_db_last_hlc(const hl_db *d)
{
    return d->last_hlc;
}

uint64_t hl_db_ahead_due_ms(const hl_db *d)
{
    return d->ahead_due_ms;
}

const char *hl_db_last_error(const hl_db *d)
{
    return d->last_error;
}

void hl_db_clear_error(hl_db *d)
{
    d->last_error[0] = 0;
}

size_t hl_db_table_count(const hl_db *d)
{
    return d->schema.n;
}

const unsigned char *hl_db_schema_hash(const hl_db *d)
{
    return d->schema.hash;
}

const unsigned char *hl_db_prev_schema_hash(const hl_db *d)
{
    return d->have_prev_hash ? d->prev_hash : NULL;
}

char *hl_db_schema_json(const hl_db *d)
{
    return hl_schema_json(&d->schema);
}

sqlite3 *hl_db_handle(hl_db *d)
{
    return d->db;
}

hl_table *hl_db_table(hl_db *d, const char *name)
{
    return hl_schema_find(&d->schema, name);
}

bool hl_db_changed_externally(hl_db *d)
{
    int64_t v = step_int(d->st_data_version, -1);
    bool changed = v != d->data_version;
    d->data_version = v;
    return changed;
}

int64_t hl_db_schema_version(hl_db *d)
{
    return step_int(d->st_schema_version, -1);
}

hl_status hl_db_stream_seq_get(hl_db *d, const char *stream, uint64_t *seq)
{
    sqlite3_stmt *st = NULL;
    *seq = 0;
    int rc = sqlite3_prepare_v2(d->db, "SELECT seq FROM " HL_PREFIX "seq WHERE stream = ?", -1, &st, NULL);
    if (rc != SQLITE_OK)
        return hl_db_err(d, rc, "stream seq get");
    sqlite3_bind_text(st, 1, stream, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        *seq = (uint64_t)sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "stream seq get");
}

hl_status hl_db_stream_seq_put(hl_db *d, const char *stream, uint64_t seq)
{
    sqlite3_stmt *st = d->st_seq_put;
    sqlite3_bind_text(st, 1, stream, -1, SQLITE_TRANSIENT);
    sqlite3_bind_int64(st, 2, (int64_t)seq);
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "stream seq put");
}

hl_status hl_db_held_count(hl_db *d, uint64_t *count, uint64_t *for_schema, uint64_t *oldest_ms)
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(
        d->db, "SELECT count(*), coalesce(sum(schema), 0), coalesce(min(at_ms), 0) FROM " HL_PREFIX "pending", -1, &st,
        NULL);
    if (rc != SQLITE_OK)
        return hl_db_err(d, rc, "pending count");
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        *count = (uint64_t)sqlite3_column_int64(st, 0);
        if (for_schema)
            *for_schema = (uint64_t)sqlite3_column_int64(st, 1);
        if (oldest_ms)
            *oldest_ms = (uint64_t)sqlite3_column_int64(st, 2);
    }
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? HL_OK : hl_db_err(d, rc, "pending count");
}

hl_status hl_db_gc_tombstones(hl_db *d, uint64_t older_than_ms, uint64_t *deleted)
{
    hl_status res = HL_OK;
    hl_buf q;
    hl_buf_init(&q, 1u << 20);
    *deleted = 0;
    for (size_t i = 0; i < d->schema.n && !res; i++) {
        sqlite3_stmt *st = NULL;
        hl_buf_reset(&q);
        hl_buf_adds(&q, "DELETE FROM ");
        hl_buf_add_ident(&q, d->schema.t[i].clock);
        if ((res = hl_buf_adds(&q, " WHERE deleted = 1 AND hlc < ?")))
            break;
        int rc = sqlite3_prepare_v2(d->db, hl_buf_str(&q), -1, &st, NULL);
        if (rc == SQLITE_OK) {
            sqlite3_bind_int64(st, 1, (int64_t)(older_than_ms << 16));
            rc = sqlite3_step(st);
        }
        sqlite3_finalize(st);
        if (rc != SQLITE_DONE)
            res = hl_db_err(d, rc, "tombstone gc");
        else
            *deleted += (uint64_t)sqlite3_changes(d->db);
    }
    hl_buf_free(&q);
    return res;
}

hl_status hl_db_gc(hl_db *d, uint64_t older_than_ms, uint64_t *deleted)
{
    hl_status st = hl_db_begin(d);
    if (st)
        return st;
    if ((st = hl_db_gc_tombstones(d, older_than_ms, deleted)) || (st = hl_db_missing_gc(d, older_than_ms))) {
        hl_db_rollback(d);
        return st;
    }
    return hl_db_commit(d);
}

hl_status hl_db_cleanup(const char *path)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    hl_buf sql;
    hl_status res = HL_OK;
    int ntrig = 0, ntab = 0;

    hl_buf_init(&sql, 16u << 20);
    int rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL);
    if (rc != SQLITE_OK) {
        hl_log(HL_LOG_ERROR, "cannot open database", "path", path, "error",
               db ? sqlite3_errmsg(db) : sqlite3_errstr(rc), NULL);
        res = HL_ERR_SQLITE;
        goto out;
    }
    sqlite3_busy_timeout(db, 10000);
    /* Triggers first: dropping a change log a trigger writes to would make the
     * application's writes fail until the trigger is gone. */
    rc = sqlite3_prepare_v2(db,
                            "SELECT type, name FROM sqlite_schema WHERE name LIKE '\\_\\_harmonylite\\_\\_%' "
                            "ESCAPE '\\' AND type IN ('trigger', 'table') ORDER BY type = 'table'",
                            -1, &st, NULL);
    if (rc != SQLITE_OK)
        goto sqlerr;
    res = hl_buf_adds(&sql, "BEGIN IMMEDIATE;");
    while (!res && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *type = (const char *)sqlite3_column_text(st, 0);
        const char *name = (const char *)sqlite3_column_text(st, 1);
        bool trig = strcmp(type, "trigger") == 0;
        hl_buf_adds(&sql, trig ? "DROP TRIGGER IF EXISTS " : "DROP TABLE IF EXISTS ");
        hl_buf_add_ident(&sql, name);
        res = hl_buf_addc(&sql, ';');
        trig ? ntrig++ : ntab++;
    }
    if (res)
        goto out;
    if (rc != SQLITE_DONE)
        goto sqlerr;
    sqlite3_finalize(st);
    st = NULL;
    if ((res = hl_buf_adds(&sql, "COMMIT;")))
        goto out;
    char *msg = NULL;
    rc = sqlite3_exec(db, hl_buf_str(&sql), NULL, NULL, &msg);
    if (rc != SQLITE_OK) {
        hl_log(HL_LOG_ERROR, "cleanup failed", "error", msg ? msg : sqlite3_errstr(rc), NULL);
        sqlite3_free(msg);
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
        res = HL_ERR_SQLITE;
        goto out;
    }
    hl_logf(HL_LOG_INFO, "cleanup: removed %d triggers and %d tables from %s", ntrig, ntab, path);
    goto out;
sqlerr:
    hl_log(HL_LOG_ERROR, "cleanup failed", "error", sqlite3_errmsg(db), NULL);
    res = HL_ERR_SQLITE;
out:
    sqlite3_finalize(st);
    sqlite3_close(db);
    hl_buf_free(&sql);
    return res;
}
