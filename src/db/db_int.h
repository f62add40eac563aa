/*
 * db_int.h - what the files of src/db/ share and nobody else sees.
 *
 * The definition of hl_db and the module's internal functions, as SQLite
 * keeps btreeInt.h beside btree.h. The pieces, in the order a change flows
 * through them:
 *   schema.c   - which tables replicate, their columns and keys, the schema hash
 *   triggers.c - the per-table change logs and the AFTER triggers that fill them
 *   capture.c  - change logs -> coalesced changeset -> clock rows + outbox
 *   apply.c    - remote changeset -> last-writer-wins per row -> table rows
 *   clock.c    - row versions (the per-table clocks) and the SQL helpers capture and apply share
 *   outbox.c   - encoded changesets waiting for JetStream's acknowledgement
 *   step.c     - the engine's transaction: capture, then apply, then positions
 *   store.c    - the connection and harmonylite's own tables (meta, origins, ...)
 * Only the files of src/db/ and the module's white-box unit test include this file.
 */
#ifndef HL_DB_INT_H
#define HL_DB_INT_H

#include "db/db.h"

/* One replicated table as it is in the local schema now. */
typedef struct hl_table {
    char *name;
    char **cols; /* replicated (non-generated) columns in table order */
    size_t ncols;
    char **decl; /* normalised declared types, parallel to cols */
    bool *notnull;
    int *pkpos;  /* 1-based primary-key position per column, 0 if not in the key */
    size_t *pk;  /* indexes into cols, in key order */
    size_t npk;  /* 0: keyed by rowid */
    char *rowid; /* rowid alias usable in SQL (rowid, _rowid_ or oid) when npk == 0 */
    bool without_rowid;
    bool int_key;      /* keyed by the rowid or its INTEGER PRIMARY KEY alias: always an integer */
    char *log;         /* name of its change-log table */
    char *clock;       /* name of its clock table: the winning version of each row */
    char *span;        /* name of its span table (spanned tables): versions of runs of appended rows */
    bool spanned;      /* keyed by an INTEGER PRIMARY KEY alias: appends are versioned by span (clock.c) */
    bool plain_insert; /* rowid-keyed, no NOT NULL, CHECK, UNIQUE, foreign key or generated column: an
                          INSERT may need no statement journal, and its trigger logs no time (triggers.c) */
    char *keysig;      /* key layout signature stored in __harmonylite__tables */

    /* cached statements, prepared lazily, finalized when the schema changes */
    sqlite3_stmt *st_log_read;       /* change log joined to the rows, one entry per key */
    sqlite3_stmt *st_log_del;        /* DELETE FROM log WHERE seq <= ? */
    sqlite3_stmt *st_range;          /* capture: SELECT key, cols FROM t WHERE key > ? ORDER BY key */
    sqlite3_stmt *st_range_keys;     /* capture: SELECT key FROM t WHERE key > ? AND key <= ? ORDER BY key */
    sqlite3_stmt *st_range_unlogged; /* capture, streaming: st_range without the keys in the change log */
    sqlite3_stmt *st_log_span;       /* capture: an upper bound on the change log's entries */
    sqlite3_stmt *st_log_add;        /* capture: INSERT INTO log (jd, k0) VALUES (now, ?) */
    bool applied;                    /* apply wrote rows: raise the high-water mark at hl_apply_end */
    sqlite3_stmt *st_clock_win;      /* apply: UPSERT the clock row if the version wins */
    sqlite3_stmt *st_clock_put;      /* capture: UPSERT the clock row */
    sqlite3_stmt *st_span_clear;     /* capture: DELETE FROM clock WHERE k0 BETWEEN ?1 AND ?2 */
    sqlite3_stmt *st_span_clocked;   /* apply: whether a clock row has a key in [?1, ?2] */
    sqlite3_stmt *st_span_prev;      /* the span starting last before ?1 */
    sqlite3_stmt *st_span_within;    /* capture: the spans starting in [?1, ?2] */
    sqlite3_stmt *st_span_del;       /* capture: DELETE FROM span WHERE lo = ?1 */
    sqlite3_stmt *st_span_ins;       /* capture: INSERT INTO span VALUES (?1, ?2, ?3, ?4) */
    sqlite3_stmt *st_row_del;        /* DELETE FROM t WHERE key */
    sqlite3_stmt *st_write;          /* apply: UPSERT (or UPDATE for rowid tables) for cols_sig */
    sqlite3_stmt *st_insert;         /* apply: INSERT for rowid tables */
    sqlite3_stmt *st_write_many;     /* apply: st_write for write_many rows in one statement (runs of appends) */
    int write_many;                  /* rows per st_write_many (prepared on first use); 0: none */
    char *write_sig;                 /* remote column list st_write/st_insert/st_write_many were built for */
    /* apply.c, found out on the first apply after a schema scan: whether a
     * changeset's rows of this table may be applied in key order (1), not
     * (-1) or not known yet (0), and per key column the value types that
     * order may sort (KEY_INT, KEY_TEXT, KEY_BLOB bits). */
    signed char key_order;
    unsigned char key_types[HL_CS_MAX_KEY];
} hl_table;

typedef struct hl_schema {
    hl_table *t;
    size_t n;
    unsigned char hash[32];
} hl_schema;

/* ---- checkpoint.c: WAL checkpoints in a thread of their own ---- */

/* The engine asks for a checkpoint after a commit that left this many WAL
 * frames or more (1 MiB at 4 KiB pages): well before the application's own
 * automatic checkpoint (1000 frames) would run inside its COMMIT. */
#define HL_CHECKPOINT_FRAMES 256

typedef struct hl_checkpointer hl_checkpointer;
hl_status hl_checkpointer_start(hl_checkpointer **out, const char *path);
void hl_checkpointer_kick(hl_checkpointer *c); /* returns at once; the thread checkpoints */
/* The -wal file size above which the thread truncates it (wal_size_limit). */
void hl_checkpointer_set_limit(hl_checkpointer *c, int64_t bytes);
uint64_t hl_checkpointer_truncations(hl_checkpointer *c);
uint64_t hl_checkpointer_runs(hl_checkpointer *c);
void hl_checkpointer_stop(hl_checkpointer *c); /* joins the thread, closes its connection; NULL is a no-op */

/* The outbox's cached statements (outbox.c). */
typedef struct hl_outbox {
    sqlite3_stmt *put, *next, *del;
} hl_outbox;

struct hl_db {
    sqlite3 *db;
    char *path;
    uint64_t node_id;
    uint64_t epoch;    /* random id of this database's harmonylite incarnation */
    uint64_t next_seq; /* next outbox changeset sequence */
    uint64_t last_hlc;
    uint64_t apply_start_hlc; /* last_hlc when hl_apply_begin ran */
    hl_checkpointer *ckpt;    /* NULL: the engine connection checkpoints itself (SQLite's default) */
    int wal_frames;           /* WAL size after this connection's last commit */
    int64_t app_triggers;     /* triggers the application defined; 0: triggers off for this connection */
    uint64_t txn_next_seq;    /* next_seq when the transaction began, restored on rollback */
    uint64_t busy_since;      /* monotonic ms when the current wait for the write lock began */
    hl_db_options opt;
    int64_t cache_kib;     /* the connection's page cache (cache_size), KiB */
    uint64_t ahead_due_ms; /* wall ms when a changeset held for its clock is due; 0: none */
    int64_t data_version;
    int64_t schema_version;
    hl_schema schema;
    unsigned char prev_hash[32];
    bool have_prev_hash;
    hl_db_stats stats;
    hl_ratelimit null_key_log;    /* warnings about rows with NULL in their key */
    char last_error[200];         /* the last SQLite error logged by hl_db_err/hl_db_exec, for /readyz */
    hl_ratelimit clock_ahead_log; /* warnings about versions ahead of the wall clock */
    bool held_full;               /* hold() refused: max_held_bytes (hl_apply defers the changeset) */
    hl_outbox outbox;
    sqlite3_stmt *st_meta_put, *st_conflict_put;
    sqlite3_stmt *st_hwm_get, *st_hwm_put;
    sqlite3_stmt *st_origin_get, *st_origin_put, *st_seq_put, *st_pending_put;
    sqlite3_stmt *st_data_version, *st_schema_version;
};

/* ---- store.c ---- */

hl_status hl_db_meta_put(hl_db *d, const char *key, int64_t v);
/*
 * Runs one statement built in sql, after checking the buffer's sticky error,
 * with ?1 bound to name when name is not NULL. When row is not NULL the
 * statement must return a row and *row receives its first column; otherwise
 * it must run to completion. what names it in an error.
 */
hl_status hl_db_run(hl_db *d, const hl_buf *sql, const char *name, int64_t *row, const char *what);
/* Logs the SQLite error of d with context and returns HL_ERR_SQLITE (or HL_ERR_BUSY). */
hl_status hl_db_err(hl_db *d, int rc, const char *what);
/* PRAGMA schema_version of the database now (-1 on error). */
int64_t hl_db_schema_version(hl_db *d);
hl_status hl_db_stream_seq_put(hl_db *d, const char *stream, uint64_t seq);
/* Deletes tombstones whose hlc is older than older_than_ms. */
hl_status hl_db_gc_tombstones(hl_db *d, uint64_t older_than_ms, uint64_t *deleted);

/* ---- outbox.c ---- */

hl_status hl_outbox_prepare(hl_db *d);
void hl_outbox_finalize(hl_outbox *o); /* NULL is a no-op */
/* Clears HL_PART_FLAG_MORE on the changeset seq: a chain that ended exactly at a cut. */
hl_status hl_outbox_chain_end(hl_db *d, uint64_t seq);

/* ---- clock.c ---- */

void hl_value_from_column(sqlite3_stmt *st, int col, hl_value *v); /* points into SQLite memory */
int hl_bind_value(sqlite3_stmt *st, int idx, const hl_value *v);   /* binds without copying */
/* Prepares the statement in sql as a persistent one into *st, unless *st is
 * already prepared; checks the buffer's sticky error first. */
hl_status hl_stmt_prepare(hl_db *d, sqlite3_stmt **st, const hl_buf *sql);
/* Appends "k = ?n AND ..." for t's key (rowid or key columns). */
hl_status hl_add_key_where(hl_buf *b, const hl_table *t, int first_param);
/* The rowid of a rowid-keyed table (int_key): its INTEGER PRIMARY KEY column or rowid alias. */
hl_status hl_add_rowid(hl_buf *b, const hl_table *t);
/* Prepares t's clock statements (st_clock_win, st_clock_put) if needed. */
hl_status hl_clock_prepare(hl_db *d, hl_table *t);
/* Records (hlc, node, deleted) as the version of t's row with this key. */
hl_status hl_clock_put(hl_db *d, hl_table *t, const hl_value *key, size_t nkey, uint64_t hlc, uint64_t node,
                       bool deleted);
/* Records (hlc, node) as the version of every row of spanned table t with a
 * key in [lo, hi] (capture: a run of consecutive appended rows), replacing
 * the clock rows and spans there. */
hl_status hl_span_put(hl_db *d, hl_table *t, int64_t lo, int64_t hi, uint64_t hlc, uint64_t node);
/* *none: no row of spanned table t with a key in [lo, hi] has a version (no
 * clock row, no span), so any version wins over each of them. */
hl_status hl_span_unversioned(hl_db *d, hl_table *t, int64_t lo, int64_t hi, bool *none);
/* Appends the SQL of the version a span gives the row whose key is the SQL
 * expression key (NULL when none): col is "hlc" or "node". */
hl_status hl_span_version_sql(hl_buf *q, const hl_table *t, const char *key, const char *col);

/* ---- schema.c ---- */

/* Reads the local schema into out (replaces its content). Logs skipped virtual tables once. */
hl_status hl_schema_scan(hl_db *d, hl_schema *out);
void hl_schema_free(hl_schema *s); /* NULL is a no-op */
/* The canonical description the schema hash is the SHA-256 of (docs/protocol.md §7), appended to out. */
hl_status hl_schema_canonical(const hl_schema *s, hl_buf *out);
/* Persists d's schema hash in meta; when it differs from the one recorded,
 * that one becomes the previous hash (kept in meta across restarts). */
hl_status hl_schema_track(hl_db *d);
/* Finds a table by name, case-insensitively as SQLite does. */
hl_table *hl_schema_find(hl_schema *s, const char *name);
/* The replicated tables as JSON for /schema (docs/operations.md), malloc'd;
 * NULL when out of memory. */
char *hl_schema_json(const hl_schema *s);
/* Index of column name in t, or -1 (case-insensitive). */
int hl_table_col(const hl_table *t, const char *name);

/* ---- triggers.c ---- */

/* SQL text of the change-log table and the triggers for t (exposed for unit tests). */
hl_status hl_trigger_sql(const hl_table *t, hl_buf *log_ddl, hl_buf *triggers);

/*
 * Brings the database in line with the current schema: re-scans it when
 * schema_version moved (or force), creates change logs and triggers for new or
 * changed tables, drops those of dropped tables. Pending change-log rows of a
 * table whose key layout changed or that was dropped cannot be captured and
 * are discarded with a warning. Must run inside a write transaction.
 * *changed is set when the schema was re-read.
 */
hl_status hl_triggers_sync(hl_db *d, bool force, bool *changed);

/* ---- capture.c ---- */

/*
 * Captures every committed local change: coalesces the change logs (one entry
 * per row, the current row image or a delete), gives each a new hlc, records
 * the clocks, writes the encoded changeset to the outbox (when publishing) and
 * empties the logs. Must run inside a write transaction. *rows receives the
 * number of rows captured.
 */
hl_status hl_capture(hl_db *d, uint64_t *rows);

/* The member size of a chain for a given max_changeset_bytes: 1 MiB, or a
 * quarter of the limit when that is smaller, so any row up to three quarters
 * of the limit still fits a member. opt.chain_bytes 0 means this. */
size_t hl_chain_bytes(size_t max_changeset_bytes);

/*
 * hl_capture in two steps, so the expensive part need not hold the write lock.
 * hl_capture_collect only reads: inside any transaction it sees a snapshot of
 * committed application transactions, and builds (and encodes) the changeset
 * of every change logged up to then. hl_capture_record, in a write
 * transaction on the same schema, records the clocks, deletes exactly the log
 * rows that were read and writes the outbox. Changes logged in between have
 * later log positions and are captured by the next cycle with later versions.
 */
typedef struct hl_capture_tab {
    int64_t max_seq; /* last log position read */
    bool ranged;     /* rows above the high-water mark were read (rowid-keyed tables) */
    int64_t hwm;     /* the high-water mark then */
    int64_t top;     /* the highest rowid read above it (hwm when none) */
    int64_t *seen;   /* every rowid above it in the snapshot, ascending */
    size_t nseen, capseen;
    /* Spanned tables: the rows read above the mark share one version, and
     * runs of consecutive rowids among them become spans (clock.c). A batch
     * collected under a snapshot keeps the runs, (lo, hi) pairs, for
     * hl_capture_record; streaming records each as it ends. */
    uint64_t span_hlc;
    int64_t *runs;
    size_t nruns, capruns; /* int64 entries: twice the runs */
} hl_capture_tab;

/* One changeset of a capture: a transaction too big for one is a chain of
 * several (HL_PART_FLAG_MORE on all but the last). */
typedef struct hl_capture_member {
    hl_changeset *cs; /* NULL once encoded when every row is versioned by a span */
    uint64_t seq;
    size_t nrows;
    int64_t *spanned; /* [start, end) row index pairs of rows a span versions */
    size_t nspanned;  /* entries: twice the pairs */
    hl_buf payload;   /* encoded (when publishing) */
} hl_capture_member;

typedef struct hl_capture_batch {
    hl_capture_member *members;
    size_t nmembers;
    hl_capture_tab *tab; /* per schema table */
    size_t ntables;
    uint64_t rows;
    bool too_big; /* more than a snapshot batch holds: nothing collected, hl_capture streams it */
} hl_capture_batch;

hl_status hl_capture_collect(hl_db *d, hl_capture_batch *b);
hl_status hl_capture_record(hl_db *d, hl_capture_batch *b);
void hl_capture_batch_free(hl_capture_batch *b); /* NULL is a no-op */

/* ---- apply.c ---- */

/*
 * Applies one remote changeset (inside a write transaction with applying = 1,
 * which the caller sets with hl_apply_begin). Checks and advances the origin
 * sequence, so a changeset is applied exactly once. raw/rawlen/flags are the
 * encoded payload, stored when the changeset must be held. After an applied
 * changeset, held successors of the same origin are applied too.
 */
hl_status hl_apply(hl_db *d, const hl_changeset *cs, const void *raw, size_t rawlen, uint8_t flags,
                   hl_apply_result *res);
/* Applies the rows of cs by last-writer-wins (versions (row hlc, cs->origin))
 * inside the apply transaction, without checking or moving cs's origin
 * sequence: the snapshot merge (merge.c). A changeset that cannot be applied
 * as a whole (a version ahead of the clock, a table or column unknown):
 * HL_ERR_INVALID and why says why. */
hl_status hl_apply_rows(hl_db *d, const hl_changeset *cs, char *why, size_t whylen);
hl_status hl_apply_begin(hl_db *d); /* sets __harmonylite__ctl.applying = 1 */
hl_status hl_apply_end(hl_db *d);   /* clears it; call before commit */

/* Retries every held changeset (after a schema change). */
hl_status hl_apply_retry_held(hl_db *d);
/*
 * Out-of-order holds that waited since before older_than_ms give up on their
 * missing predecessors: the gap is recorded in __harmonylite__missing (a
 * changeset from it that arrives later is still applied), the held ones are
 * applied. *gaps (may be NULL) is incremented per origin. Inside the apply
 * transaction.
 */
hl_status hl_apply_expire_held(hl_db *d, uint64_t older_than_ms, uint64_t *gaps);
/* Forgets gaps given up on before older_than_ms (a changeset from one is then a duplicate). */
hl_status hl_db_missing_gc(hl_db *d, uint64_t older_than_ms);

/* ---- schema access for the module's tests ---- */

/* The replicated table called name (case-insensitive), or NULL. */
hl_table *hl_db_table(hl_db *d, const char *name);

#endif
