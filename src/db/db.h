/*
 * db.h - everything harmonylite does to the SQLite database: the public API.
 *
 * One hl_db owns the engine's single writer connection. Only the engine thread
 * touches it. It is opaque: the files of src/db/ share its definition and
 * their internal functions through db_int.h (as SQLite's btree.c does with
 * btreeInt.h); everybody else uses what is declared here.
 *
 * The engine's work is one call, hl_db_step: it captures the application's
 * commits, applies remote changesets after them (capture before apply, so
 * every local write has its version before a remote row is compared with
 * it) and records the stream positions, in one write transaction, and keeps
 * the caller's positions in line with what committed.
 */
#ifndef HL_DB_H
#define HL_DB_H

#include <sqlite3.h>
#include <stdbool.h>
#include <stdint.h>

#include "common/buf.h"
#include "common/log.h"
#include "common/status.h"
#include "repl/changeset.h"
#include "repl/queue.h"

#define HL_PREFIX "__harmonylite__"

typedef struct hl_db hl_db;

/* Counters the engine exports as metrics. Only the engine thread writes them. */
typedef struct hl_db_stats {
    uint64_t rows_captured;
    uint64_t changesets_captured;
    uint64_t rows_applied;
    uint64_t rows_skipped_lww;
    uint64_t conflicts;
    uint64_t changesets_applied;
    uint64_t changesets_duplicate;
    uint64_t changesets_malformed;
    uint64_t changesets_held;
    uint64_t chains_applied;      /* transactions received as a chain of changesets and applied as one */
    uint64_t changesets_late;     /* applied after their position had been given up on */
    uint64_t order_gaps;          /* times missing predecessors were given up on */
    uint64_t table_resyncs;       /* tables sent in full because VACUUM or a rebuild moved their rowids */
    uint64_t missed_rows;         /* rows found written while a table's triggers were missing, then logged */
    uint64_t clock_ahead;         /* changesets held: a row version too far ahead of the wall clock */
    uint64_t changesets_deferred; /* not stored: their origin was over max_held_bytes (read again later) */
} hl_db_stats;

/* wal_size_limit's default: the -wal file is cut back to zero when a
 * checkpoint finds it larger (docs/configuration.md). */
#define HL_WAL_SIZE_LIMIT_DEFAULT (64 * 1024 * 1024)

/* Settings from the configuration (hl_db_configure); hl_db_open starts with
 * the defaults noted. */
typedef struct hl_db_options {
    bool publish;                /* write captured changesets to the outbox (false) */
    bool compress;               /* zstd-compress them (false) */
    size_t max_changeset_bytes;  /* largest changeset sent or accepted, uncompressed (256 MiB) */
    size_t chain_bytes;          /* member size of a chain; 0: hl_chain_bytes(max_changeset_bytes) (0) */
    uint64_t max_clock_drift_ms; /* remote versions further ahead of the wall clock are held (60 s) */
    uint64_t max_held_bytes;     /* bound on changesets held behind a schema hold, per origin and in total;
                                    0: unbounded (0) */
    size_t wal_size_limit;       /* -wal file size above which checkpoints truncate it; 0: the default (64 MiB) */
} hl_db_options;

/* ---- store.c: the connection ---- */

/* Process-wide SQLite settings; call once at start, before any connection is opened. */
void hl_db_global_init(void);

/*
 * Opens path as the engine connection: WAL journal mode, busy timeout,
 * cache_size (KiB), creates harmonylite's tables if missing, loads or creates
 * the epoch, sequences and clock. After a successful call the caller owns *out
 * and frees it with hl_db_close.
 */
hl_status hl_db_open(hl_db **out, const char *path, uint64_t node_id, int64_t cache_kib);
void hl_db_close(hl_db *d); /* NULL is a no-op */
/* Gives memory back at rest: the unused pages of the connection's page cache
 * (it refills on the next capture or apply) and, with glibc, the freed heap. */
void hl_db_release_memory(hl_db *d);
void hl_db_configure(hl_db *d, const hl_db_options *o);
const hl_db_options *hl_db_get_options(const hl_db *d);

/*
 * Installs the change logs and triggers for the current schema (re-read in
 * full) and, when capture is set, captures what the application committed
 * while no engine ran; *rows (may be NULL) receives the rows captured. One
 * write transaction.
 */
hl_status hl_db_install(hl_db *d, bool capture, uint64_t *rows);

/* What the engine and /metrics read. */
const hl_db_stats *hl_db_counters(const hl_db *d);
uint64_t hl_db_epoch(const hl_db *d);    /* random id of this database's harmonylite incarnation */
uint64_t hl_db_last_hlc(const hl_db *d); /* the last version this node gave or saw */
/* An integer of __harmonylite__meta (*found false when the key is absent). */
hl_status hl_db_meta_get(hl_db *d, const char *key, int64_t *v, bool *found);
/* Wall ms when a changeset held because its versions are ahead of the wall
 * clock is due (0: none); a step with retry_held applies it then. */
uint64_t hl_db_ahead_due_ms(const hl_db *d);
/* The last SQLite error (or capture refusal) logged, for /readyz; "" when none. */
const char *hl_db_last_error(const hl_db *d);
void hl_db_clear_error(hl_db *d);
/*
 * The replicated tables of a plain connection to a database harmonylite has
 * set up (a snapshot's copy, say), without opening it as an hl_db: fills
 * hash (32 bytes) and calls each(arg, table, int_key) per table, int_key
 * naming the column that holds an integer key (the rowid alias, or "rowid")
 * or NULL for other keys.
 */
hl_status hl_db_schema_describe(sqlite3 *db, unsigned char hash[32],
                                void (*each)(void *arg, const char *table, const char *int_key), void *arg);
/* The replicated tables: how many, the schema hash (32 bytes), the hash
 * before the last change (NULL when the schema has not changed since start),
 * and as JSON for /schema (docs/operations.md; malloc'd, NULL when out of memory). */
size_t hl_db_table_count(const hl_db *d);
const unsigned char *hl_db_schema_hash(const hl_db *d);
const unsigned char *hl_db_prev_schema_hash(const hl_db *d);
char *hl_db_schema_json(const hl_db *d);
/* For -schema-status beside a running node: reads the replicated tables and
 * their hashes (as a start would see them) without installing or writing anything. */
hl_status hl_db_schema_read(hl_db *d);
/* The engine connection itself, for tests that look at its settings. */
sqlite3 *hl_db_handle(hl_db *d);

/* BEGIN IMMEDIATE (retrying while busy), COMMIT, ROLLBACK: for a short write
 * transaction outside hl_db_step (the publisher deleting acknowledged
 * changesets from the outbox). */
hl_status hl_db_begin(hl_db *d);
hl_status hl_db_commit(hl_db *d);
void hl_db_rollback(hl_db *d);
/* Runs SQL text on the engine connection (no result rows). */
hl_status hl_db_exec(hl_db *d, const char *sql);

/* True when another connection committed since the last call (PRAGMA data_version). */
bool hl_db_changed_externally(hl_db *d);

/* Applied stream sequence for stream (0 if none). */
hl_status hl_db_stream_seq_get(hl_db *d, const char *stream, uint64_t *seq);

/* Removes every trigger and table harmonylite created. Application data untouched. */
hl_status hl_db_cleanup(const char *path);

/* In one write transaction: deletes tombstones whose hlc is older than
 * older_than_ms (*deleted receives how many) and forgets gaps given up on
 * before it (a changeset from one is then a duplicate). */
hl_status hl_db_gc(hl_db *d, uint64_t older_than_ms, uint64_t *deleted);

/* ---- merge.c: catching up from a snapshot without replacing the database ---- */

/*
 * A snapshot (docs/snapshots.md) merged into the live database row by row,
 * by the same last-writer-wins as apply: a snapshot row wins only where its
 * version is newer, its tombstones delete. The snapshot file is read through
 * a read-only connection of its own, a bounded batch at a time (never loaded
 * into memory); each hl_db_merge_step is one write transaction that captures
 * the application's commits first (capture before apply) and writes with the
 * triggers off, as apply does. hl_db_merge_finish moves the stream positions
 * and the per-origin applied sequences up to the snapshot's.
 */
typedef struct hl_merge hl_merge;

/* Opens the snapshot at path for merging into d: its schema hash must be
 * d's. *total receives the row versions it holds. err says why on failure. */
hl_status hl_db_merge_open(hl_db *d, const char *path, hl_merge **out, uint64_t *total, char *err, size_t errlen);
/* The snapshot's position for stream (0 when it has none). */
uint64_t hl_db_merge_stream_seq(hl_merge *m, const char *stream);
/* One write transaction: captures, then merges up to max_rows snapshot rows;
 * *done once every row was merged. *merged (may be NULL) receives the rows
 * merged so far. A failure rolls back; what the cursor read is then lost, so
 * start over with a new hl_merge (merging again changes nothing already merged). */
hl_status hl_db_merge_step(hl_merge *m, size_t max_rows, uint64_t *merged, bool *done);
/* After the last step, in one write transaction: every stream position and
 * origin's applied sequence becomes the greater of the local and the
 * snapshot's (this node's own origin excepted). */
hl_status hl_db_merge_finish(hl_merge *m);
void hl_db_merge_close(hl_merge *m); /* NULL is a no-op */

/* ---- step.c: the engine's transaction ---- */

typedef enum hl_apply_result {
    HL_APPLIED = 0, /* applied (some rows may have lost to LWW or been recorded as conflicts) */
    HL_DUPLICATE,   /* seq already applied for this origin */
    HL_HELD,        /* stored in __harmonylite__pending: out of order, or schema mismatch */
    HL_MALFORMED,   /* names things unknown although the schema hash matches: refused */
    HL_DEFERRED,    /* neither applied nor stored: holding it would pass max_held_bytes; the stream
                       position stops before it (hl_positions.cap) so it is read again later */
} hl_apply_result;

/* Stream positions the engine keeps, one per shard stream. */
typedef struct hl_positions {
    int n;
    char *const *streams; /* names, the keys of __harmonylite__seq */
    uint64_t *applied;    /* recorded in the database */
    uint64_t *seen;       /* every message up to here dealt with; maybe not recorded yet */
    uint64_t *cap;        /* may be NULL; per shard, nonzero: a changeset was deferred (HL_DEFERRED)
                             and the stream must be read again from this sequence; seen stays
                             below it until the caller clears it */
} hl_positions;

/* What one hl_db_step is asked to do, and what it did. */
typedef struct hl_step {
    bool capture;              /* in: the application may have committed: capture it */
    bool retry_held;           /* in/out: retry every held changeset; set when the schema changed, cleared once done */
    uint64_t expire_before_ms; /* in: nonzero: out-of-order holds waiting since before this give up on their
                                  missing predecessors (hl_apply_expire_held) */
    bool flush_positions;      /* in: record positions that only moved (seen != applied) */
    const uint64_t *outbox_done; /* in: acknowledged changesets deleted from the outbox in this step's write
                                    transaction, if there is one (alone they do not make one) */
    size_t n_outbox_done;
    bool committed;            /* out: a write transaction committed */
    bool schema_changed;       /* out: the schema was re-read */
    uint64_t rows_captured;    /* out */
    bool streamed;             /* out: too much for a snapshot batch: captured inside the write transaction */
    uint64_t read_us, lock_us; /* out: time reading under a snapshot (no lock), and holding the write lock */
} hl_step;

/*
 * One engine step. With s->capture, what the application logged is read and
 * encoded first under a WAL snapshot, without the write lock. Then one write
 * transaction: the schema check, the recording of that batch, the capture of
 * whatever was logged since the snapshot (left to the next step when this one
 * records a snapshot batch and nothing else: no items, held changesets or
 * positions; the watcher's re-checks bring that step), and only then (capture before
 * apply) held changesets when asked, the remote changesets in items (each
 * one's applied is set), the deletion of s->outbox_done from the outbox and
 * the stream positions: pos->seen moves to every
 * item's safe_seq, and what differs from pos->applied is recorded. After a
 * commit pos->applied equals pos->seen. On failure the transaction rolls
 * back, nothing is lost (the change logs still hold what was captured; the
 * caller puts items back) and pos->seen returns to pos->applied. Nothing to
 * do writes nothing (s->committed stays false). pos may be NULL: items then
 * move no position.
 */
hl_status hl_db_step(hl_db *d, hl_inbound *items, hl_positions *pos, hl_step *s);

/* hl_db_step for one remote changeset and nothing else (no positions), with
 * its result: for tests, benchmarks and tools. raw/rawlen/flags are its
 * encoded payload and part flags, stored if it must be held. */
hl_status hl_db_apply_one(hl_db *d, const hl_changeset *cs, const void *raw, size_t rawlen, uint8_t flags,
                          hl_apply_result *res);

/* ---- outbox.c: encoded changesets not yet acknowledged by JetStream ---- */

typedef struct hl_outbox_entry {
    uint64_t seq;   /* the changeset's sequence */
    uint64_t rows;  /* rows in it */
    uint8_t flags;  /* HL_PART_FLAG_ZSTD, HL_PART_FLAG_MORE (docs/protocol.md §1) */
    hl_buf payload; /* the encoded changeset */
} hl_outbox_entry;

/* An empty entry whose payload can hold up to max_payload bytes. */
void hl_outbox_entry_init(hl_outbox_entry *e, size_t max_payload);
void hl_outbox_entry_free(hl_outbox_entry *e); /* NULL is a no-op */
/* The entry with the lowest seq > after; HL_ERR_NOT_FOUND when none. */
hl_status hl_db_outbox_next(hl_db *d, uint64_t after, hl_outbox_entry *e);
hl_status hl_db_outbox_put(hl_db *d, uint64_t seq, uint8_t flags, uint64_t rows, const void *payload, size_t len);
hl_status hl_db_outbox_delete(hl_db *d, uint64_t seq);
hl_status hl_db_outbox_count(hl_db *d, uint64_t *count);
/* Makes every transaction committed so far durable (a sync of the WAL, no
 * lock): due before an outbox row's changeset is first published. */
hl_status hl_db_outbox_sync(hl_db *d);
/* The same for any connection to a database in WAL mode: syncs its WAL (an
 * SQLite result code; SQLITE_OK when it has none open). */
int hl_sqlite_sync_wal(sqlite3 *db);

/* ---- apply.c: held changesets ---- */

/* True when a step with expire_before_ms = older_than_ms has holds to give up on. */
bool hl_apply_held_due(hl_db *d, uint64_t older_than_ms);
/* Drops every changeset held for origin node (operator's -drop-held); its
 * applied sequence moves past them. One write transaction. */
hl_status hl_db_drop_held(hl_db *d, uint64_t node, uint64_t *dropped);

/* Held changesets of one origin (node, epoch), for /schema. */
typedef struct hl_held_origin {
    uint64_t node, epoch;
    uint64_t count;      /* changesets held */
    uint64_t for_schema; /* of which wait for the local schema */
    uint64_t first_seq;  /* lowest held sequence */
    uint64_t applied;    /* the origin's applied sequence */
    uint64_t since_ms;   /* wall ms when the oldest was held */
    char reason[256];    /* why the first in line waits */
    uint64_t bytes;      /* bytes held */
} hl_held_origin;
/* At most 64 origins, by node id; *out is freed with hl_held_list_free. */
hl_status hl_db_held_list(hl_db *d, hl_held_origin **out, size_t *n);
void hl_held_list_free(hl_held_origin *v); /* NULL is a no-op */
/* Bytes held for origins that have a changeset held for the schema: what
 * max_held_bytes bounds (docs/architecture.md, "Held changesets"). */
hl_status hl_db_held_bytes(hl_db *d, uint64_t *bounded);
/* Held changesets: all, those waiting for the local schema, and the oldest one's hold time. */
hl_status hl_db_held_count(hl_db *d, uint64_t *count, uint64_t *for_schema, uint64_t *oldest_ms);

/* ---- watch.c: when to look for the application's new commits ---- */

/*
 * Watches db_path and its -wal file with inotify, and says when the engine
 * should look (PRAGMA data_version, hl_db_changed_externally): at a write to
 * them, on a short schedule after it (a commit becomes visible after its WAL
 * write, which is the event), and every polling_interval_ms (0: every 5 s) as
 * a fallback. Without inotify only the fallback is left.
 */
typedef struct hl_watch hl_watch;
hl_status hl_watch_open(hl_watch **out, const char *db_path, int polling_interval_ms);
void hl_watch_free(hl_watch *w);    /* NULL is a no-op */
int hl_watch_fd(const hl_watch *w); /* to poll() for POLLIN; -1 without inotify */
/* The fd to poll() now: hl_watch_fd, or -1 while a look waits for a hold to end. */
int hl_watch_poll_fd(const hl_watch *w, uint64_t now);
/* Milliseconds until the watcher wants another look (0: now). */
int hl_watch_timeout(const hl_watch *w, uint64_t now);
/* After poll(): readable says the fd had POLLIN, timed_out that poll()
 * returned 0. True when the engine should look now. */
bool hl_watch_after_poll(hl_watch *w, bool readable, bool timed_out, uint64_t now);
/* After a capture of rows (NULL w is a no-op): when the application wrote
 * fast since the previous one, further looks wait a few milliseconds so the
 * engine captures in bigger, fewer write transactions (watch.c). */
void hl_watch_captured(hl_watch *w, uint64_t rows, uint64_t now);

#endif
