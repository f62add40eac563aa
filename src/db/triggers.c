/*
 * triggers.c - change logs and the triggers that fill them.
 *
 * The trigger is the only harmonylite code inside every application write, so
 * it does as little as possible: one INSERT of (write time, key) into the
 * table's own change log. Capture later reads the current row image by key,
 * which is the coalesced "last image wins" value anyway, and which carries
 * columns added by ALTER TABLE even before the triggers are re-created.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "db/db_int.h"

#define GUARD "(SELECT applying FROM \"" HL_PREFIX "ctl\") = 0"
/* The raw Julian day: the cheapest clock SQLite offers inside a trigger;
 * capture converts it to Unix milliseconds. */
#define NOW_JD "julianday('now')"
/*
 * What the INSERT trigger of a plain_insert table logs instead: no time, so
 * capture versions the row when it reads it, as it does every append it finds
 * above the high-water mark. A function call or a NOT NULL to check in a
 * trigger makes every INSERT statement into the table, inside a transaction,
 * keep a statement journal (a copy of each page it changes), even an append
 * the trigger does not log: SQLite decides that when it prepares the
 * statement. That trigger calls no function and logs with OR IGNORE (the NOT
 * NULL of jd is not checked; 0 is never NULL). It only pays where the
 * application's INSERT cannot fail by itself (plain_insert, and no explicit
 * key given); every other trigger keeps the time of the write.
 */
#define NO_JD "0"

/* _ai, _au, _ak, _ad log writes; _ar and _ur, only on tables with a UNIQUE
 * index, log the rows an INSERT or UPDATE OR REPLACE may delete (replace_sql). */
static const char *const trig_suffix[6] = {"_ai", "_au", "_ak", "_ad", "_ar", "_ur"};

/* Appends "NEW.k0, NEW.k1" style key references (which = "NEW" or "OLD"). */
static hl_status add_keys(hl_buf *b, const hl_table *t, const char *which)
{
    if (t->npk == 0)
        return hl_buf_addf(b, "%s.%s", which, t->rowid);
    for (size_t i = 0; i < t->npk; i++) {
        hl_buf_addf(b, "%s%s.", i ? ", " : "", which);
        hl_buf_add_ident(b, t->cols[t->pk[i]]);
    }
    return hl_buf_status(b);
}

/* Appends "INSERT INTO <t's change log>(jd, k0, k1 ...)": what follows gives
 * the write time and the key. */
static hl_status add_log_insert(hl_buf *b, const hl_table *t, bool or_ignore)
{
    size_t n = t->npk ? t->npk : 1;
    hl_buf_adds(b, or_ignore ? "INSERT OR IGNORE INTO " : "INSERT INTO ");
    hl_buf_add_ident(b, t->log);
    hl_buf_adds(b, "(jd");
    for (size_t i = 0; i < n; i++)
        hl_buf_addf(b, ", k%zu", i);
    return hl_buf_adds(b, ")");
}

/* The name of t's trigger which, unquoted, in b (reset first). */
static hl_status trigger_name(hl_buf *b, const hl_table *t, int which)
{
    hl_buf_reset(b);
    return hl_buf_addf(b, HL_PREFIX "%s%s", t->name, trig_suffix[which]);
}

static hl_status add_trigger_name(hl_buf *b, const hl_table *t, int which)
{
    hl_buf name;
    hl_buf_init(&name, 1u << 20);
    hl_status st = trigger_name(&name, t, which);
    if (!st)
        st = hl_buf_add_ident(b, hl_buf_str(&name));
    hl_buf_free(&name);
    return st;
}

/* Appends s as an SQL string literal. */
static hl_status add_literal(hl_buf *b, const char *s)
{
    hl_buf_addc(b, '\'');
    for (; *s; s++)
        if (*s == '\'')
            hl_buf_adds(b, "''");
        else
            hl_buf_addc(b, (unsigned char)*s);
    return hl_buf_addc(b, '\'');
}

/* The WHEN condition of a trigger: the guard (no log while the engine applies) and what the event needs. */
static void trigger_when(hl_buf *b, const hl_table *t, int which)
{
    if (which == 0 && t->int_key) {
        /* Rows inserted above the table's high-water mark are found by
         * capture through the rowid, without a log entry: an append then
         * writes one B-tree page, not two. Tested before the guard, so an
         * append evaluates one subquery, not two. */
        add_keys(b, t, "NEW");
        hl_buf_adds(b, " <= coalesce((SELECT hwm FROM \"" HL_PREFIX "hwm\" WHERE tbl = ");
        add_literal(b, t->name);
        hl_buf_adds(b, "), 9223372036854775807) AND ");
    }
    hl_buf_adds(b, GUARD);
    if (which == 2) {
        /* The key changed: the row under the old key is gone. */
        hl_buf_adds(b, " AND (");
        size_t n = t->npk ? t->npk : 1;
        for (size_t i = 0; i < n; i++) {
            const char *col = t->npk ? t->cols[t->pk[i]] : t->rowid;
            hl_buf_adds(b, i ? " OR OLD." : "OLD.");
            t->npk ? hl_buf_add_ident(b, col) : hl_buf_adds(b, col);
            hl_buf_adds(b, " IS NOT NEW.");
            t->npk ? hl_buf_add_ident(b, col) : hl_buf_adds(b, col);
        }
        hl_buf_adds(b, ")");
    }
}

/* One trigger's CREATE text (without a trailing ';'). */
static hl_status trigger_sql(const hl_table *t, int which, hl_buf *b)
{
    static const char *const event[4] = {"INSERT", "UPDATE", "UPDATE", "DELETE"};
    hl_buf_adds(b, "CREATE TRIGGER ");
    hl_status st = add_trigger_name(b, t, which);
    if (st)
        return st; /* the name alone was too long */
    hl_buf_addf(b, " AFTER %s", event[which]);
    if (which == 2 && t->npk) {
        hl_buf_adds(b, " OF ");
        for (size_t i = 0; i < t->npk; i++) {
            if (i)
                hl_buf_adds(b, ", ");
            hl_buf_add_ident(b, t->cols[t->pk[i]]);
        }
    }
    hl_buf_adds(b, " ON ");
    hl_buf_add_ident(b, t->name);
    hl_buf_adds(b, " WHEN ");
    trigger_when(b, t, which);
    hl_buf_adds(b, " BEGIN ");
    bool no_time = which == 0 && t->plain_insert;
    add_log_insert(b, t, no_time);
    hl_buf_adds(b, no_time ? " VALUES (" NO_JD ", " : " VALUES (" NOW_JD ", ");
    add_keys(b, t, which >= 2 ? "OLD" : "NEW");
    return hl_buf_adds(b, "); END");
}

/*
 * The OR REPLACE conflict resolution (INSERT OR REPLACE, UPDATE OR REPLACE,
 * REPLACE, ON CONFLICT REPLACE in the table's definition) deletes the rows
 * that hold the new row's value of a UNIQUE index, and SQLite fires no DELETE
 * trigger for them unless the writer turned recursive_triggers on: such a row
 * vanished without a log entry. These BEFORE triggers log, for each row
 * written, the rows that share one of its UNIQUE values (an index lookup per
 * index), marked as suspects: the Julian day negated. Capture sends a delete
 * for a suspect whose row is gone and nothing for one that is still there (an
 * INSERT OR IGNORE, or a statement that failed: then the entry was rolled
 * back with it). cond is the OR of one condition per UNIQUE index on the row
 * x (unique_cond), cols the indexed columns, for UPDATE OF.
 */
static hl_status replace_sql(const hl_table *t, int which, const char *cond, const char *cols, hl_buf *b)
{
    hl_buf_adds(b, "CREATE TRIGGER ");
    hl_status st = add_trigger_name(b, t, which);
    if (st)
        return st;
    hl_buf_addf(b, " BEFORE %s", which == 4 ? "INSERT" : "UPDATE OF ");
    if (which == 5)
        hl_buf_adds(b, cols);
    hl_buf_adds(b, " ON ");
    hl_buf_add_ident(b, t->name);
    hl_buf_adds(b, " WHEN " GUARD " BEGIN ");
    add_log_insert(b, t, false);
    hl_buf_adds(b, " SELECT -" NOW_JD ", ");
    add_keys(b, t, "x");
    hl_buf_adds(b, " FROM ");
    hl_buf_add_ident(b, t->name);
    hl_buf_adds(b, " AS x WHERE ");
    hl_buf_adds(b, cond);
    return hl_buf_adds(b, "; END");
}

/*
 * The UNIQUE indexes of t (not its primary key) as a condition on a row x
 * and NEW: "(x.a = NEW.a COLLATE NOCASE AND x.b = NEW.b COLLATE BINARY) OR
 * ...", each column compared under the index's collation; their columns in
 * cols. An index on an expression is left out: its values cannot be named
 * in a trigger (docs/architecture.md). Both stay empty without such indexes.
 */
static hl_status unique_cond(hl_db *d, const hl_table *t, hl_buf *cond, hl_buf *cols)
{
    sqlite3_stmt *il = NULL, *ix = NULL;
    hl_status st = HL_OK;
    hl_buf one, cids; /* one index's condition; the columns in cols so far (ints) */
    hl_buf_init(&one, 1u << 20);
    hl_buf_init(&cids, 1u << 20);
    hl_buf_reset(cond);
    hl_buf_reset(cols);
    int rc = sqlite3_prepare_v2(d->db,
                                "SELECT name FROM pragma_index_list(?1) WHERE \"unique\" AND origin <> 'pk' "
                                "ORDER BY name",
                                -1, &il, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_prepare_v2(d->db, "SELECT cid, name, coll FROM pragma_index_xinfo(?1) WHERE key ORDER BY seqno",
                                -1, &ix, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_text(il, 1, t->name, -1, SQLITE_STATIC);
    while (rc == SQLITE_OK && (rc = sqlite3_step(il)) == SQLITE_ROW) {
        bool plain = true;
        rc = sqlite3_bind_text(ix, 1, (const char *)sqlite3_column_text(il, 0), -1, SQLITE_TRANSIENT);
        hl_buf_reset(&one);
        for (;;) {
            if (rc != SQLITE_OK || (rc = sqlite3_step(ix)) != SQLITE_ROW)
                break;
            rc = SQLITE_OK;
            const char *col = (const char *)sqlite3_column_text(ix, 1);
            const char *coll = (const char *)sqlite3_column_text(ix, 2);
            if (sqlite3_column_int(ix, 0) < 0 || !col || !coll) {
                plain = false;
                continue;
            }
            hl_buf_adds(&one, one.len ? " AND x." : "(x.");
            hl_buf_add_ident(&one, col);
            hl_buf_adds(&one, " = NEW.");
            hl_buf_add_ident(&one, col);
            hl_buf_adds(&one, " COLLATE ");
            hl_buf_add_ident(&one, coll);
            int cid = sqlite3_column_int(ix, 0);
            bool seen = false;
            for (size_t i = 0; i + sizeof cid <= cids.len && !seen; i += sizeof cid)
                seen = memcmp(cids.data + i, &cid, sizeof cid) == 0;
            if (!seen) {
                hl_buf_add(&cids, &cid, sizeof cid);
                if (cols->len)
                    hl_buf_adds(cols, ", ");
                hl_buf_add_ident(cols, col);
            }
        }
        sqlite3_reset(ix);
        if (rc == SQLITE_DONE)
            rc = SQLITE_OK;
        if (rc == SQLITE_OK && plain && one.len) {
            hl_buf_adds(cond, cond->len ? " OR " : "");
            hl_buf_add(cond, one.data, one.len);
            hl_buf_adds(cond, ")");
        }
    }
    if (rc != SQLITE_DONE && rc != SQLITE_OK)
        st = hl_db_err(d, rc, "unique indexes");
    else if (!(st = hl_buf_status(&one)) && !(st = hl_buf_status(&cids)) && !(st = hl_buf_status(cond)))
        st = hl_buf_status(cols);
    sqlite3_finalize(il);
    sqlite3_finalize(ix);
    hl_buf_free(&one);
    hl_buf_free(&cids);
    return st;
}

static hl_status log_ddl(const hl_table *t, hl_buf *b)
{
    /* Key columns have no declared type, so no affinity converts the values. */
    size_t n = t->npk ? t->npk : 1;
    hl_buf_adds(b, "CREATE TABLE IF NOT EXISTS ");
    hl_buf_add_ident(b, t->log);
    hl_buf_adds(b, "(seq INTEGER PRIMARY KEY, jd REAL NOT NULL");
    for (size_t i = 0; i < n; i++)
        hl_buf_addf(b, ", k%zu", i);
    return hl_buf_adds(b, ")");
}

/* The clock: the winning version of every row of t, keyed like the change log.
 * Tables keyed by an integer rowid get a rowid clock (the fastest B-tree
 * SQLite has); otherwise the key columns have no declared type, so 1 and 1.0
 * are one key and 'a' and x'61' are two, exactly as in SQLite. */
static hl_status clock_ddl(const hl_table *t, hl_buf *b)
{
    size_t n = t->npk ? t->npk : 1;
    hl_buf_adds(b, "CREATE TABLE IF NOT EXISTS ");
    hl_buf_add_ident(b, t->clock);
    if (t->int_key)
        return hl_buf_adds(b, "(k0 INTEGER PRIMARY KEY, hlc INTEGER NOT NULL, node INTEGER NOT NULL,"
                              " deleted INTEGER NOT NULL)");
    hl_buf_adds(b, "(");
    for (size_t i = 0; i < n; i++)
        hl_buf_addf(b, "k%zu, ", i);
    hl_buf_adds(b, "hlc INTEGER NOT NULL, node INTEGER NOT NULL, deleted INTEGER NOT NULL, PRIMARY KEY (");
    for (size_t i = 0; i < n; i++)
        hl_buf_addf(b, "%sk%zu", i ? ", " : "", i);
    return hl_buf_adds(b, ")) WITHOUT ROWID");
}

/* The spans of a spanned table (clock.c): runs of appended rows, one version each. */
static hl_status span_ddl(const hl_table *t, hl_buf *b)
{
    hl_buf_adds(b, "CREATE TABLE IF NOT EXISTS ");
    hl_buf_add_ident(b, t->span);
    return hl_buf_adds(b, "(lo INTEGER PRIMARY KEY, hi INTEGER NOT NULL, hlc INTEGER NOT NULL, node INTEGER NOT NULL)");
}

hl_status hl_trigger_sql(const hl_table *t, hl_buf *log_ddl_out, hl_buf *triggers)
{
    hl_status st = log_ddl(t, log_ddl_out);
    for (int w = 0; w < 4 && !st; w++) {
        trigger_sql(t, w, triggers);
        st = hl_buf_adds(triggers, ";\n");
    }
    return st;
}

/* Executes sql; on error logs it with the statement. */
static hl_status exec_logged(hl_db *d, const char *sql)
{
    char *msg = NULL;
    int rc = sqlite3_exec(d->db, sql, NULL, NULL, &msg);
    if (rc == SQLITE_OK)
        return HL_OK;
    hl_log(HL_LOG_ERROR, "schema change failed", "sql", sql, "error", msg ? msg : sqlite3_errstr(rc), NULL);
    sqlite3_free(msg);
    return (rc & 0xff) == SQLITE_BUSY ? HL_ERR_BUSY : HL_ERR_SQLITE;
}

/* Executes the statement built in q, unless building it failed. */
static hl_status exec_built(hl_db *d, const hl_buf *q)
{
    hl_status st = hl_buf_status(q);
    return st ? st : exec_logged(d, hl_buf_str(q));
}

/* Logs every existing row of t as changed, so capture sends it. */
static hl_status backfill_table(hl_db *d, const hl_table *t)
{
    hl_buf q;
    hl_buf_init(&q, 64u << 20);
    add_log_insert(&q, t, false);
    hl_buf_adds(&q, " SELECT " NOW_JD);
    for (size_t i = 0; i < t->npk; i++) {
        hl_buf_adds(&q, ", ");
        hl_buf_add_ident(&q, t->cols[t->pk[i]]);
    }
    if (t->npk == 0)
        hl_buf_addf(&q, ", %s", t->rowid);
    hl_buf_adds(&q, " FROM ");
    hl_buf_add_ident(&q, t->name);
    hl_status st = exec_built(d, &q);
    if (!st && sqlite3_changes(d->db) > 0)
        hl_logf(HL_LOG_INFO, "new table \"%s\": %d existing rows will be replicated", t->name, sqlite3_changes(d->db));
    hl_buf_free(&q);
    return st;
}

static int64_t count_rows(hl_db *d, const char *table)
{
    hl_buf q;
    sqlite3_stmt *st = NULL;
    int64_t n = 0;
    hl_buf_init(&q, 1u << 20);
    if (!hl_buf_adds(&q, "SELECT count(*) FROM ") && !hl_buf_add_ident(&q, table) &&
        sqlite3_prepare_v2(d->db, hl_buf_str(&q), -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
        n = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    hl_buf_free(&q);
    return n;
}

/* Starts t's high-water mark at its last rowid, unless it has one. */
static hl_status hwm_init(hl_db *d, const hl_table *t)
{
    hl_buf q;
    hl_buf_init(&q, 1u << 20);
    hl_buf_adds(&q, "INSERT OR IGNORE INTO " HL_PREFIX "hwm(tbl, hwm) SELECT ");
    add_literal(&q, t->name);
    hl_buf_adds(&q, ", coalesce(max(");
    hl_add_rowid(&q, t);
    hl_buf_adds(&q, "), 0) FROM ");
    hl_buf_add_ident(&q, t->name);
    hl_status st = exec_built(d, &q);
    hl_buf_free(&q);
    return st;
}

static hl_status hwm_drop(hl_db *d, const char *table)
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(d->db, "DELETE FROM " HL_PREFIX "hwm WHERE tbl = ?", -1, &st, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_text(st, 1, table, -1, SQLITE_STATIC);
        rc = sqlite3_step(st);
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "hwm drop");
}

/*
 * VACUUM gives the rows of a table without an INTEGER PRIMARY KEY new rowids
 * (1, 2, 3 ... in rowid order) and fires no trigger; so does the usual table
 * rebuild (CREATE new_t, INSERT INTO new_t SELECT ..., DROP t, ALTER TABLE
 * new_t RENAME TO t). For a table keyed by that rowid, the other nodes then
 * hold the rows under their old numbers and every later update or delete
 * lands on the wrong row. Both change the schema cookie, so this check runs
 * whenever schema_version moved. It looks for evidence that rowids moved: the
 * clock says a row was deleted and a row is there, or says a row exists and
 * none is, or the high-water mark names a rowid that neither exists nor has a
 * version (it is the highest rowid this node ever saw; removing it leaves a
 * tombstone). Rowids with changes not captured yet are no evidence either way.
 */
static hl_status rowids_moved(hl_db *d, const hl_table *t, bool *moved)
{
    hl_buf q;
    int64_t v = 0;
    hl_buf_init(&q, 1u << 20);
    hl_buf_adds(&q, "SELECT EXISTS (SELECT 1 FROM ");
    hl_buf_add_ident(&q, t->clock);
    hl_buf_adds(&q, " AS c WHERE c.k0 NOT IN (SELECT k0 FROM ");
    hl_buf_add_ident(&q, t->log);
    hl_buf_adds(&q, ") AND c.deleted = EXISTS (SELECT 1 FROM ");
    hl_buf_add_ident(&q, t->name);
    hl_buf_addf(&q,
                " WHERE %s = c.k0)) OR EXISTS (SELECT 1 FROM " HL_PREFIX "hwm AS h WHERE h.tbl = ?1 AND "
                "h.hwm > coalesce((SELECT max(%s) FROM ",
                t->rowid, t->rowid);
    hl_buf_add_ident(&q, t->name);
    hl_buf_adds(&q, "), 0) AND h.hwm NOT IN (SELECT k0 FROM ");
    hl_buf_add_ident(&q, t->clock);
    hl_buf_adds(&q, ") AND h.hwm NOT IN (SELECT k0 FROM ");
    hl_buf_add_ident(&q, t->log);
    hl_buf_adds(&q, "))");
    hl_status res = hl_db_run(d, &q, t->name, &v, "rowid check");
    *moved = !res && v != 0;
    hl_buf_free(&q);
    return res;
}

/*
 * Publishes t as it is now as this node's truth: every row is logged (capture
 * sends it as an upsert with a new version), and so is every rowid the clock
 * holds a live version for that has no row any more (sent as a delete). The
 * high-water mark drops to the last rowid, as every row up to it is logged.
 */
static hl_status rowid_resync(hl_db *d, const hl_table *t)
{
    hl_buf q;
    hl_buf_init(&q, 1u << 20);
    add_log_insert(&q, t, false);
    hl_buf_addf(&q, " SELECT " NOW_JD ", %s FROM ", t->rowid);
    hl_buf_add_ident(&q, t->name);
    hl_status res = exec_built(d, &q);
    int64_t rows = sqlite3_changes64(d->db);
    hl_buf_reset(&q);
    add_log_insert(&q, t, false);
    hl_buf_adds(&q, " SELECT " NOW_JD ", c.k0 FROM ");
    hl_buf_add_ident(&q, t->clock);
    hl_buf_adds(&q, " AS c WHERE c.deleted = 0 AND NOT EXISTS (SELECT 1 FROM ");
    hl_buf_add_ident(&q, t->name);
    hl_buf_addf(&q, " WHERE %s = c.k0)", t->rowid);
    if (!res)
        res = exec_built(d, &q);
    int64_t gone = sqlite3_changes64(d->db);
    hl_buf_reset(&q);
    hl_buf_addf(&q, "UPDATE " HL_PREFIX "hwm SET hwm = (SELECT coalesce(max(%s), 0) FROM ", t->rowid);
    hl_buf_add_ident(&q, t->name);
    hl_buf_adds(&q, ") WHERE tbl = ?1");
    if (!res)
        res = hl_db_run(d, &q, t->name, NULL, "hwm resync");
    if (!res) {
        d->stats.table_resyncs++;
        hl_logf(HL_LOG_WARN,
                "table \"%s\" has no primary key and its rowids moved without triggers (VACUUM or a rebuild): "
                "sending all %lld rows and %lld deletes as this node's state",
                t->name, (long long)rows, (long long)gone);
    }
    hl_buf_free(&q);
    return res;
}

/* Appends "c.k0 IS x.a AND c.k1 IS x.b": clock row c holds the key of t's row x. */
static hl_status add_key_match(hl_buf *b, const hl_table *t)
{
    size_t n = t->npk ? t->npk : 1;
    for (size_t i = 0; i < n; i++) {
        hl_buf_addf(b, "%sc.k%zu IS x.", i ? " AND " : "", i);
        t->npk ? hl_buf_add_ident(b, t->cols[t->pk[i]]) : hl_buf_adds(b, t->rowid);
    }
    return hl_buf_status(b);
}

/* Appends the condition "row x of t has no live version": no clock row, or a
 * tombstone, and (spanned tables) no span covering it unless a clock row
 * overrides that span. */
static hl_status add_unversioned(hl_buf *b, const hl_table *t)
{
    hl_buf_adds(b, "coalesce((SELECT c.deleted FROM ");
    hl_buf_add_ident(b, t->clock);
    hl_buf_adds(b, " AS c WHERE ");
    add_key_match(b, t);
    if (!t->spanned)
        return hl_buf_adds(b, "), 1)");
    hl_buf_adds(b, "), coalesce((SELECT s.hi FROM ");
    hl_buf_add_ident(b, t->span);
    hl_buf_adds(b, " AS s WHERE s.lo <= x.");
    hl_add_rowid(b, t);
    hl_buf_adds(b, " ORDER BY s.lo DESC LIMIT 1), x.");
    hl_add_rowid(b, t);
    hl_buf_adds(b, " - 1) < x.");
    hl_add_rowid(b, t);
    return hl_buf_adds(b, ")");
}

/* Appends " AND x.rowid <= its high-water mark" for a rowid-keyed table:
 * capture finds the rows above it through the rowid. No mark: every row. */
static hl_status add_below_hwm(hl_buf *b, const hl_table *t)
{
    if (!t->int_key)
        return hl_buf_status(b);
    hl_buf_adds(b, " AND x.");
    hl_add_rowid(b, t);
    return hl_buf_adds(b, " <= coalesce((SELECT hwm FROM " HL_PREFIX "hwm WHERE tbl = ?1), 9223372036854775807)");
}

/*
 * Gives every row of t that has no version (at or below the high-water mark,
 * of a rowid-keyed table) a version that loses to any write (hlc 0, node 0):
 * in a spanned table one span per run of consecutive keys, otherwise a clock
 * row each. Such rows are the content harmonylite found when it first
 * started, or when the table's key changed (the common starting point, never
 * sent). Once they have versions, every row this node holds has one or is
 * logged, so a row without either was written while the triggers were gone
 * (missed_writes), and a VACUUM that moves the rowids of a table without a
 * primary key leaves evidence (a live version with no row), whereupon the
 * resync sends a delete for each rowid they vacated. Finds nothing to do
 * after the first time.
 */
static hl_status clock_seed(hl_db *d, const hl_table *t)
{
    hl_buf q;
    hl_status res = HL_OK;
    hl_buf_init(&q, 1u << 20);
    if (!t->spanned) {
        hl_buf_adds(&q, "INSERT OR IGNORE INTO ");
        hl_buf_add_ident(&q, t->clock);
        hl_buf_adds(&q, "(");
        for (size_t i = 0; i < (t->npk ? t->npk : 1); i++)
            hl_buf_addf(&q, "k%zu, ", i);
        hl_buf_adds(&q, "hlc, node, deleted) SELECT ");
        add_keys(&q, t, "x");
        hl_buf_adds(&q, ", 0, 0, 0 FROM ");
        hl_buf_add_ident(&q, t->name);
        hl_buf_adds(&q, " AS x WHERE 1");
        add_below_hwm(&q, t);
        res = hl_db_run(d, &q, t->int_key ? t->name : NULL, NULL, "clock seed");
        if (!res && sqlite3_changes64(d->db) > 0)
            hl_logf(HL_LOG_INFO, "table \"%s\": %lld existing rows taken as the common starting point", t->name,
                    (long long)sqlite3_changes64(d->db));
        hl_buf_free(&q);
        return res;
    }
    /* Runs of consecutive keys: a key minus its rank is the same along a run.
     * The first pass records the runs of two rows or more as spans; what is
     * left then is runs of one, which get a clock row each. */
    int64_t made[2] = {0, 0};
    for (int pass = 0; pass < 2 && !res; pass++) {
        hl_buf_reset(&q);
        hl_buf_adds(&q, "WITH k(k) AS (SELECT x.");
        hl_add_rowid(&q, t);
        hl_buf_adds(&q, " FROM ");
        hl_buf_add_ident(&q, t->name);
        hl_buf_adds(&q, " AS x WHERE ");
        add_unversioned(&q, t);
        add_below_hwm(&q, t);
        hl_buf_adds(&q,
                    "), run(lo, hi) AS (SELECT min(k), max(k) FROM (SELECT k, k - row_number() OVER (ORDER BY k) AS g"
                    " FROM k) GROUP BY g) INSERT INTO ");
        if (pass == 0) {
            hl_buf_add_ident(&q, t->span);
            hl_buf_adds(&q, "(lo, hi, hlc, node) SELECT lo, hi, 0, 0 FROM run WHERE hi > lo");
        } else {
            hl_buf_add_ident(&q, t->clock);
            hl_buf_adds(&q, "(k0, hlc, node, deleted) SELECT lo, 0, 0, 0 FROM run");
        }
        res = hl_db_run(d, &q, t->int_key ? t->name : NULL, NULL, "clock seed");
        made[pass] = res ? 0 : sqlite3_changes64(d->db);
    }
    if (made[0] + made[1] > 0)
        hl_logf(HL_LOG_INFO,
                "table \"%s\": existing rows taken as the common starting point (%lld runs of consecutive keys, "
                "%lld single rows)",
                t->name, (long long)made[0], (long long)made[1]);
    hl_buf_free(&q);
    return res;
}

/*
 * A table rebuilt the usual SQLite way (CREATE new, INSERT ... SELECT, DROP,
 * ALTER TABLE RENAME) loses our triggers with the old table; the new ones
 * come with the engine's next sync, and the application may write in
 * between (or for longer, when harmonylite was stopped). Every row here has a
 * version or a log entry (clock_seed), so the rows written meanwhile show:
 * a row without a live version was inserted (a row above the high-water mark
 * of a rowid-keyed table is found by capture anyway), and a live version
 * without a row was deleted. Both are logged, and capture sends them. A row
 * changed in place in that window cannot be told from one that was not.
 */
static hl_status missed_writes(hl_db *d, const hl_table *t)
{
    hl_buf q;
    int64_t ins, del = 0, spandel = 0;
    hl_buf_init(&q, 1u << 20);
    add_log_insert(&q, t, false);
    hl_buf_adds(&q, " SELECT " NOW_JD ", ");
    add_keys(&q, t, "x");
    hl_buf_adds(&q, " FROM ");
    hl_buf_add_ident(&q, t->name);
    hl_buf_adds(&q, " AS x WHERE ");
    add_unversioned(&q, t);
    add_below_hwm(&q, t);
    hl_status res = hl_db_run(d, &q, t->int_key ? t->name : NULL, NULL, "missed inserts");
    ins = sqlite3_changes64(d->db);
    /* Live versions without a row: clock rows, then the keys of spans. */
    hl_buf_reset(&q);
    add_log_insert(&q, t, false);
    hl_buf_adds(&q, " SELECT " NOW_JD);
    for (size_t i = 0; i < (t->npk ? t->npk : 1); i++)
        hl_buf_addf(&q, ", c.k%zu", i);
    hl_buf_adds(&q, " FROM ");
    hl_buf_add_ident(&q, t->clock);
    hl_buf_adds(&q, " AS c WHERE c.deleted = 0 AND NOT EXISTS (SELECT 1 FROM ");
    hl_buf_add_ident(&q, t->name);
    hl_buf_adds(&q, " AS x WHERE ");
    add_key_match(&q, t);
    hl_buf_adds(&q, ")");
    if (!res && !(res = hl_db_run(d, &q, NULL, NULL, "missed deletes")))
        del = sqlite3_changes64(d->db);
    if (!res && t->spanned) {
        /* Only spans with fewer rows than keys: the keys of those, one by one. */
        hl_buf_reset(&q);
        hl_buf_adds(&q, "WITH RECURSIVE k(k, hi) AS (SELECT s.lo, s.hi FROM ");
        hl_buf_add_ident(&q, t->span);
        hl_buf_adds(&q, " AS s WHERE (SELECT count(*) FROM ");
        hl_buf_add_ident(&q, t->name);
        hl_buf_adds(&q, " AS x WHERE x.");
        hl_add_rowid(&q, t);
        hl_buf_adds(&q, " BETWEEN s.lo AND s.hi) <= s.hi - s.lo UNION ALL SELECT k + 1, hi FROM k WHERE k < hi) ");
        add_log_insert(&q, t, false);
        hl_buf_adds(&q, " SELECT " NOW_JD ", k FROM k WHERE NOT EXISTS (SELECT 1 FROM ");
        hl_buf_add_ident(&q, t->name);
        hl_buf_adds(&q, " AS x WHERE x.");
        hl_add_rowid(&q, t);
        hl_buf_adds(&q, " = k) AND NOT EXISTS (SELECT 1 FROM ");
        hl_buf_add_ident(&q, t->clock);
        hl_buf_adds(&q, " AS c WHERE c.k0 = k)");
        if (!(res = hl_db_run(d, &q, NULL, NULL, "missed deletes")))
            spandel = sqlite3_changes64(d->db);
    }
    if (!res && ins + del + spandel > 0) {
        d->stats.missed_rows += (uint64_t)(ins + del + spandel);
        hl_logf(HL_LOG_WARN,
                "table \"%s\" was written while its triggers were missing (a rebuild): %lld inserted and %lld "
                "deleted rows found and logged; rows changed in place meanwhile cannot be found",
                t->name, (long long)ins, (long long)(del + spandel));
    }
    hl_buf_free(&q);
    return res;
}

/* Whether meta key is set to a non-zero value. */
static bool meta_flag(hl_db *d, const char *key)
{
    int64_t v = 0;
    bool found = false;
    return hl_db_meta_get(d, key, &v, &found) == HL_OK && found && v != 0;
}

/* schema_version when the rowids of tables without a primary key were last checked (-1: never). */
static int64_t rowids_checked_at(hl_db *d)
{
    int64_t v = -1;
    bool found = false;
    return hl_db_meta_get(d, "rowids_checked", &v, &found) == HL_OK && found ? v : -1;
}

/* Triggers the application defined (on any table), -1 when unknown. */
static int64_t count_app_triggers(hl_db *d)
{
    sqlite3_stmt *st = NULL;
    int64_t n = -1;
    if (sqlite3_prepare_v2(d->db,
                           "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger' AND "
                           "name NOT LIKE '\\_\\_harmonylite\\_\\_%' ESCAPE '\\'",
                           -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        n = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return n;
}

static hl_status drop_object(hl_db *d, const char *kind, const char *name)
{
    hl_buf q;
    hl_buf_init(&q, 1u << 20);
    hl_buf_addf(&q, "DROP %s IF EXISTS ", kind);
    hl_buf_add_ident(&q, name);
    hl_status st = exec_built(d, &q);
    hl_buf_free(&q);
    return st;
}

/* Names of our existing objects of one type, with their SQL, NUL separated pairs. */
static hl_status existing(hl_db *d, const char *type, hl_buf *out)
{
    sqlite3_stmt *st = NULL;
    hl_status res = HL_OK;
    int rc = sqlite3_prepare_v2(d->db,
                                "SELECT name, coalesce(sql, '') FROM sqlite_schema WHERE type = ? AND "
                                "name LIKE '\\_\\_harmonylite\\_\\_%' ESCAPE '\\'",
                                -1, &st, NULL);
    if (rc != SQLITE_OK)
        return hl_db_err(d, rc, "sqlite_schema");
    sqlite3_bind_text(st, 1, type, -1, SQLITE_STATIC);
    while (!res && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *n = (const char *)sqlite3_column_text(st, 0);
        const char *s = (const char *)sqlite3_column_text(st, 1);
        hl_buf_add(out, n, strlen(n) + 1);
        res = hl_buf_add(out, s, strlen(s) + 1);
    }
    if (!res && rc != SQLITE_DONE)
        res = hl_db_err(d, rc, "sqlite_schema");
    sqlite3_finalize(st);
    return res;
}

/* Looks name up in a pair list from existing(); returns its SQL or NULL. */
static const char *pair_find(const hl_buf *pairs, const char *name)
{
    for (size_t off = 0; off < pairs->len;) {
        const char *n = (const char *)pairs->data + off;
        const char *s = n + strlen(n) + 1;
        if (strcmp(n, name) == 0)
            return s;
        off = (size_t)(s + strlen(s) + 1 - (const char *)pairs->data);
    }
    return NULL;
}

static char *stored_keysig(hl_db *d, const char *table)
{
    sqlite3_stmt *st = NULL;
    char *v = NULL;
    if (sqlite3_prepare_v2(d->db, "SELECT keysig FROM " HL_PREFIX "tables WHERE name = ?", -1, &st, NULL) ==
        SQLITE_OK) {
        sqlite3_bind_text(st, 1, table, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW)
            v = strdup((const char *)sqlite3_column_text(st, 0));
    }
    sqlite3_finalize(st);
    return v;
}

static hl_status put_keysig(hl_db *d, const char *table, const char *sig)
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(d->db,
                                "INSERT INTO " HL_PREFIX "tables(name, keysig) VALUES (?, ?) "
                                "ON CONFLICT(name) DO UPDATE SET keysig = excluded.keysig",
                                -1, &st, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_text(st, 1, table, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, sig, -1, SQLITE_STATIC);
        rc = sqlite3_step(st);
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "tables put");
}

/*
 * Databases from development builds before per-table clocks kept every
 * version in one table, __harmonylite__clock(tbl, pk, hlc, node, deleted),
 * keyed by the encoded key. Moves those versions into the tables' clocks
 * (the caller then drops the old table) so no row loses its version.
 */
static hl_status migrate_legacy_clock(hl_db *d)
{
    sqlite3_stmt *q = NULL;
    hl_status st = HL_OK;
    uint64_t moved = 0, maxh = 0;
    unsigned char *scratch = NULL;
    int rc = sqlite3_prepare_v2(d->db, "SELECT tbl, pk, hlc, node, deleted FROM " HL_PREFIX "clock", -1, &q, NULL);
    if (rc != SQLITE_OK)
        return hl_db_err(d, rc, "legacy clock");
    while (!st && (rc = sqlite3_step(q)) == SQLITE_ROW) {
        hl_table *t = hl_schema_find(&d->schema, (const char *)sqlite3_column_text(q, 0));
        const void *pk = sqlite3_column_blob(q, 1);
        size_t len = (size_t)sqlite3_column_bytes(q, 1), nk = 0;
        uint64_t hlc = (uint64_t)sqlite3_column_int64(q, 2);
        hl_value key[HL_CS_MAX_KEY];
        if (hlc > maxh)
            maxh = hlc;
        if (!t)
            continue; /* the table is gone: so is the version's meaning */
        unsigned char *ns = realloc(scratch, len + HL_CS_MAX_KEY);
        if (!ns) {
            st = HL_ERR_NOMEM;
            break;
        }
        scratch = ns;
        if (hl_key_decode(pk, len, key, &nk, scratch) != HL_OK || nk != (t->npk ? t->npk : 1))
            continue; /* from before a change of the table's key */
        st = hl_clock_put(d, t, key, nk, hlc, (uint64_t)sqlite3_column_int64(q, 3), sqlite3_column_int(q, 4) != 0);
        moved++;
    }
    if (!st && rc != SQLITE_DONE)
        st = hl_db_err(d, rc, "legacy clock");
    sqlite3_finalize(q);
    free(scratch);
    if (!st && maxh > d->last_hlc) {
        d->last_hlc = maxh;
        st = hl_db_meta_put(d, "last_hlc", (int64_t)maxh);
    }
    if (!st)
        hl_logf(HL_LOG_INFO, "moved %" PRIu64 " row versions from " HL_PREFIX "clock into per-table clocks", moved);
    return st;
}

/* What one hl_triggers_sync works with. */
typedef struct sync_ctx {
    hl_buf trig, tabs;   /* our triggers and tables now: (name, sql) pairs */
    hl_buf ddl, tsql;    /* scratch */
    hl_buf want;         /* the names of the objects the schema needs, NUL separated */
    bool backfill;       /* new tables' existing rows are captured */
    bool check_rowids;   /* the schema changed: rowids may have moved without a trigger */
    bool seeded;         /* every row had a version or a log entry at the last sync (clock_seed) */
    hl_buf ucond, ucols; /* the table's UNIQUE indexes (unique_cond); empty: none */
} sync_ctx;

/* Whether t gets trigger w: the OR REPLACE ones (4, 5) only with a UNIQUE index besides the key. */
static bool trigger_wanted(int w, const sync_ctx *c)
{
    return w < 4 || c->ucond.len > 0;
}

/*
 * A table that has spans but is no longer spanned (its INTEGER PRIMARY KEY
 * became another kind of key under the same name): the rows its spans give a
 * version get a clock row each, then the spans go.
 */
static hl_status span_retire(hl_db *d, const hl_table *t)
{
    hl_buf q;
    hl_buf_init(&q, 1u << 20);
    hl_buf_adds(&q, "INSERT OR IGNORE INTO ");
    hl_buf_add_ident(&q, t->clock);
    hl_buf_adds(&q, "(k0, hlc, node, deleted) SELECT x.");
    hl_add_rowid(&q, t);
    hl_buf_adds(&q, ", s.hlc, s.node, 0 FROM ");
    hl_buf_add_ident(&q, t->span);
    hl_buf_adds(&q, " AS s JOIN ");
    hl_buf_add_ident(&q, t->name);
    hl_buf_adds(&q, " AS x ON x.");
    hl_add_rowid(&q, t);
    hl_buf_adds(&q, " BETWEEN s.lo AND s.hi");
    hl_status st = exec_built(d, &q);
    hl_buf_free(&q);
    return st ? st : drop_object(d, "TABLE", t->span);
}

/*
 * The clock's shape follows the key (clock_ddl): a rowid table for a table
 * keyed by its rowid or an INTEGER PRIMARY KEY alias, WITHOUT ROWID otherwise.
 * A rebuild can turn one kind of key into the other under the same column
 * (id INTEGER PRIMARY KEY <-> id INT PRIMARY KEY), which keeps the key
 * signature, and CREATE TABLE IF NOT EXISTS would keep the old clock: a text
 * key then failed every capture ("datatype mismatch"). The versions move into
 * a clock of the new shape; into a rowid clock only those of integer keys,
 * the only keys such a table can hold.
 */
static hl_status clock_reshape(hl_db *d, const hl_table *t)
{
    /* Read now: key_changed() may have dropped it since the sync began. */
    sqlite3_stmt *sh = NULL;
    int rc = sqlite3_prepare_v2(
        d->db, "SELECT sql LIKE '% WITHOUT ROWID' FROM sqlite_schema WHERE type = 'table' AND name = ?1", -1, &sh,
        NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_bind_text(sh, 1, t->clock, -1, SQLITE_STATIC);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(sh);
    bool without_rowid = rc == SQLITE_ROW && sqlite3_column_int(sh, 0);
    sqlite3_finalize(sh);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return hl_db_err(d, rc, "clock shape");
    if (rc == SQLITE_DONE || without_rowid != t->int_key)
        return HL_OK; /* no clock yet, or the right shape */
    /* Through a temporary copy: ALTER TABLE RENAME would re-check every
     * view and trigger of the application's schema and could fail on theirs. */
    size_t nk = t->npk ? t->npk : 1;
    hl_buf q;
    hl_buf_init(&q, 1u << 20);
    hl_buf_adds(&q,
                "DROP TABLE IF EXISTS temp." HL_PREFIX "reshape; CREATE TEMP TABLE " HL_PREFIX "reshape AS SELECT ");
    for (size_t i = 0; i < nk; i++)
        hl_buf_addf(&q, "k%zu, ", i);
    hl_buf_adds(&q, "hlc, node, deleted FROM ");
    hl_buf_add_ident(&q, t->clock);
    if (t->int_key) /* a rowid: the only keys the table can hold now */
        hl_buf_adds(&q, " WHERE typeof(k0) IN ('integer', 'real') AND k0 = CAST(k0 AS INTEGER)");
    hl_status st = exec_built(d, &q);
    if (!st && !(st = drop_object(d, "TABLE", t->clock))) {
        hl_buf_reset(&q);
        if (!(st = clock_ddl(t, &q)) && !(st = exec_built(d, &q))) {
            hl_buf_reset(&q);
            hl_buf_adds(&q, "INSERT INTO ");
            hl_buf_add_ident(&q, t->clock);
            hl_buf_adds(&q, " SELECT * FROM temp." HL_PREFIX "reshape; DROP TABLE temp." HL_PREFIX "reshape");
            st = exec_built(d, &q);
        }
    }
    if (!st)
        hl_logf(HL_LOG_INFO, "table \"%s\": its key is %s a rowid alias: versions moved to a clock of that shape",
                t->name, t->int_key ? "now" : "no longer");
    hl_buf_free(&q);
    return st;
}

/* A table whose key changed since its change log was made: the log's rows
 * cannot be captured, its versions are of keys that no longer exist
 * (*rekeyed). */
static hl_status key_changed(hl_db *d, hl_table *t, sync_ctx *c, bool *rekeyed)
{
    char *sig = stored_keysig(d, t->name);
    hl_status st = HL_OK;
    *rekeyed = sig && strcmp(sig, t->keysig) != 0;
    if (*rekeyed && pair_find(&c->tabs, t->log)) {
        int64_t n = count_rows(d, t->log);
        if (n > 0)
            hl_logf(HL_LOG_WARN,
                    "primary key of table \"%s\" changed: %lld uncaptured changes recorded under the old key "
                    "cannot be replicated",
                    t->name, (long long)n);
        if (!(st = drop_object(d, "TABLE", t->log)) && !(st = drop_object(d, "TABLE", t->clock)) &&
            !(st = drop_object(d, "TABLE", t->span)))
            st = hwm_drop(d, t->name);
    }
    free(sig);
    return st;
}

/* t's four triggers, re-created when their SQL differs from what is installed. */
static hl_status table_triggers(hl_db *d, hl_table *t, sync_ctx *c)
{
    hl_status st = HL_OK;
    for (int w = 0; w < 6 && !st; w++) {
        if (!trigger_wanted(w, c))
            continue; /* no UNIQUE index: nothing OR REPLACE could delete */
        hl_buf name;
        hl_buf_init(&name, 1u << 20);
        hl_buf_reset(&c->tsql);
        if (!(st = trigger_name(&name, t, w)) &&
            !(st = w < 4 ? trigger_sql(t, w, &c->tsql)
                         : replace_sql(t, w, hl_buf_str(&c->ucond), hl_buf_str(&c->ucols), &c->tsql))) {
            const char *have = pair_find(&c->trig, hl_buf_str(&name));
            if (have && strcmp(have, hl_buf_str(&c->tsql)) != 0)
                st = drop_object(d, "TRIGGER", hl_buf_str(&name));
            if (!st && (!have || strcmp(have, hl_buf_str(&c->tsql)) != 0))
                st = exec_logged(d, hl_buf_str(&c->tsql));
            if (!st)
                st = hl_buf_add(&c->want, name.data, name.len + 1);
        }
        hl_buf_free(&name);
    }
    return st;
}

/* Whether any of t's triggers is missing (dropped with the table by a rebuild). */
static bool triggers_missing(const hl_table *t, sync_ctx *c)
{
    bool missing = false;
    for (int w = 0; w < 6 && !missing; w++)
        if (trigger_wanted(w, c))
            missing = !trigger_name(&c->ddl, t, w) && !pair_find(&c->trig, hl_buf_str(&c->ddl));
    return missing;
}

/* Brings one replicated table's change log, clock, high-water mark and triggers in line. */
static hl_status table_sync(hl_db *d, hl_table *t, sync_ctx *c)
{
    bool rekeyed = false;
    hl_status st = key_changed(d, t, c, &rekeyed);
    if (st)
        return st;
    char *known = stored_keysig(d, t->name);
    bool is_new = known == NULL;
    free(known);
    if ((st = unique_cond(d, t, &c->ucond, &c->ucols)))
        return st;
    /* Writes since the triggers went can be found only where every row had a
     * version or a log entry before (clock_seed) and still has its clock. */
    bool untriggered = !is_new && !rekeyed && c->seeded && pair_find(&c->tabs, t->log) && triggers_missing(t, c);
    hl_buf_reset(&c->ddl);
    if ((st = log_ddl(t, &c->ddl)) || (st = exec_logged(d, hl_buf_str(&c->ddl))))
        return st;
    hl_buf_reset(&c->ddl);
    if ((st = clock_reshape(d, t)) || (st = clock_ddl(t, &c->ddl)) || (st = exec_logged(d, hl_buf_str(&c->ddl))) ||
        (st = put_keysig(d, t->name, t->keysig)))
        return st;
    hl_buf_reset(&c->ddl);
    if (t->spanned && ((st = span_ddl(t, &c->ddl)) || (st = exec_logged(d, hl_buf_str(&c->ddl)))))
        return st;
    if (!t->spanned && pair_find(&c->tabs, t->span) && (st = span_retire(d, t)))
        return st;
    if (is_new && c->backfill && (st = backfill_table(d, t)))
        return st;
    /* Before anything else is logged: a log entry hides evidence of moved rowids. */
    bool moved = false;
    if (t->npk == 0 && c->check_rowids && !is_new && (st = rowids_moved(d, t, &moved)))
        return st;
    if (moved)
        st = rowid_resync(d, t);
    else if (untriggered)
        st = missed_writes(d, t);
    if (st)
        return st;
    /* Everything up to here is logged (or, on the first run, the common
     * starting point): inserts above the current last rowid need no log. */
    if (t->int_key && (st = hwm_init(d, t)))
        return st;
    if (!moved && (!c->seeded || rekeyed || (t->npk == 0 && c->check_rowids)) && (st = clock_seed(d, t)))
        return st;
    hl_buf_add(&c->want, t->log, strlen(t->log) + 1);
    if (t->spanned)
        hl_buf_add(&c->want, t->span, strlen(t->span) + 1);
    if ((st = hl_buf_add(&c->want, t->clock, strlen(t->clock) + 1)))
        return st;
    return table_triggers(d, t, c);
}

/* Drops our triggers, change logs and clocks whose table is gone or renamed. */
static hl_status drop_stale(hl_db *d, sync_ctx *c)
{
    for (int pass = 0; pass < 2; pass++) {
        hl_buf *have = pass == 0 ? &c->trig : &c->tabs;
        for (size_t off = 0; off < have->len;) {
            const char *n = (const char *)have->data + off;
            const char *s = n + strlen(n) + 1;
            off = (size_t)(s + strlen(s) + 1 - (const char *)have->data);
            size_t nl = strlen(n);
            bool is_log = nl >= 11 && strcmp(n + nl - 11, "_change_log") == 0;
            bool is_clock = nl >= 6 && strcmp(n + nl - 6, "_clock") == 0;
            bool is_span = nl >= 5 && strcmp(n + nl - 5, "_span") == 0;
            if (pass == 1 && !is_log && !is_clock && !is_span)
                continue; /* only change logs, clocks and spans; not our internal tables */
            bool found = false;
            for (size_t off2 = 0; off2 < c->want.len && !found;) {
                const char *w = (const char *)c->want.data + off2;
                found = strcmp(w, n) == 0;
                off2 += strlen(w) + 1;
            }
            if (found)
                continue;
            if (pass == 1 && is_log) {
                int64_t cnt = count_rows(d, n);
                if (cnt > 0)
                    hl_logf(HL_LOG_WARN,
                            "table of change log \"%s\" was dropped or renamed; %lld uncaptured changes "
                            "discarded",
                            n, (long long)cnt);
            }
            hl_status st = drop_object(d, pass == 0 ? "TRIGGER" : "TABLE", n);
            if (st)
                return st;
        }
    }
    return exec_logged(d, "DELETE FROM " HL_PREFIX "tables WHERE name NOT IN "
                          "(SELECT name FROM pragma_table_list WHERE schema = 'main');"
                          "DELETE FROM " HL_PREFIX "hwm WHERE tbl NOT IN "
                          "(SELECT name FROM pragma_table_list WHERE schema = 'main')");
}

hl_status hl_triggers_sync(hl_db *d, bool force, bool *changed)
{
    hl_status st = HL_OK;
    sync_ctx c;
    *changed = false;
    int64_t sv = hl_db_schema_version(d);
    if (!force && sv == d->schema_version)
        return HL_OK;

    hl_buf_init(&c.trig, 256u << 20);
    hl_buf_init(&c.tabs, 256u << 20);
    hl_buf_init(&c.ddl, 16u << 20);
    hl_buf_init(&c.tsql, 16u << 20);
    hl_buf_init(&c.want, 256u << 20);
    hl_buf_init(&c.ucond, 16u << 20);
    hl_buf_init(&c.ucols, 16u << 20);

    bool had_schema = d->schema.t != NULL || d->schema_version >= 0;
    if ((st = hl_schema_scan(d, &d->schema)) || (st = existing(d, "trigger", &c.trig)) ||
        (st = existing(d, "table", &c.tabs)))
        goto out;
    /* Tables that appear while we run (or while we were stopped, on a database
     * we already manage) may already hold rows the application wrote before
     * the triggers existed: those are captured too. On the very first run the
     * existing content is taken as the common starting point, as HarmonyLite
     * does, and not sent. */
    c.backfill = had_schema || count_rows(d, HL_PREFIX "tables") > 0;
    /* Only a schema change (VACUUM included) can move rowids without a trigger. */
    c.check_rowids = rowids_checked_at(d) != sv;
    c.seeded = meta_flag(d, "versions_seeded");
    for (size_t i = 0; i < d->schema.n && !st; i++)
        st = table_sync(d, &d->schema.t[i], &c);
    if (st || (pair_find(&c.tabs, HL_PREFIX "clock") && (st = migrate_legacy_clock(d))) || (st = drop_stale(d, &c)))
        goto out;
    /* Our own triggers skip the engine's writes through the applying flag,
     * but SQLite still runs each one's program per applied row. With no
     * application triggers there is nothing else to fire: switch triggers
     * off for the engine connection (statements are re-prepared). */
    d->app_triggers = count_app_triggers(d);
    sqlite3_db_config(d->db, SQLITE_DBCONFIG_ENABLE_TRIGGER, d->app_triggers ? 1 : 0, NULL);
    d->schema_version = hl_db_schema_version(d);
    if ((st = hl_db_meta_put(d, "rowids_checked", d->schema_version)) ||
        (!c.seeded && (st = hl_db_meta_put(d, "versions_seeded", 1))))
        goto out;
    if ((st = hl_schema_track(d)))
        goto out;
    *changed = true;
out:
    hl_buf_free(&c.trig);
    hl_buf_free(&c.tabs);
    hl_buf_free(&c.ddl);
    hl_buf_free(&c.tsql);
    hl_buf_free(&c.want);
    hl_buf_free(&c.ucond);
    hl_buf_free(&c.ucols);
    return st;
}
