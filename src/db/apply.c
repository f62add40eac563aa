/*
 * apply.c - where a remote changeset lands.
 *
 * Runs inside the engine's write transaction after capture (capture before
 * apply: local writes get their clocks before any remote row is compared with
 * them) and with __harmonylite__ctl.applying = 1 so the triggers ignore our
 * writes. Per row, the version (hlc, origin node) must beat the stored clock;
 * deletes leave tombstones. The origin sequence advances in the same
 * transaction, so each changeset is applied exactly once.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/hlc.h"
#include "common/log.h"
#include "db/db_int.h"

typedef enum { ONE_OK, ONE_SCHEMA, ONE_MALFORMED, ONE_AHEAD } one_result;

hl_status hl_apply_begin(hl_db *d)
{
    d->apply_start_hlc = d->last_hlc;
    return hl_db_exec(d, "UPDATE " HL_PREFIX "ctl SET applying = 1");
}

/*
 * Rows applied above a table's high-water mark must not look like local
 * inserts to the next capture. Capture ran first in this transaction (capture
 * before apply), so every local insert is already captured: the mark can move
 * to the table's last rowid.
 */
static hl_status raise_hwm(hl_db *d, hl_table *t)
{
    hl_buf q;
    hl_buf_init(&q, 1u << 20);
    hl_buf_adds(&q, "UPDATE " HL_PREFIX "hwm SET hwm = m FROM (SELECT max(");
    hl_add_rowid(&q, t);
    hl_buf_adds(&q, ") AS m FROM ");
    hl_buf_add_ident(&q, t->name);
    hl_buf_adds(&q, ") WHERE tbl = ?1 AND m > hwm");
    hl_status res = hl_db_run(d, &q, t->name, NULL, "hwm raise");
    hl_buf_free(&q);
    return res;
}

hl_status hl_apply_end(hl_db *d)
{
    /* The clock only moves forward, also across restarts: remember the
     * highest version seen in the transaction that stored it. */
    hl_status st = HL_OK;
    if (d->last_hlc != d->apply_start_hlc)
        st = hl_db_meta_put(d, "last_hlc", (int64_t)d->last_hlc);
    for (size_t i = 0; i < d->schema.n && !st; i++) {
        hl_table *t = &d->schema.t[i];
        if (t->applied && t->int_key)
            st = raise_hwm(d, t);
        t->applied = false;
    }
    return st ? st : hl_db_exec(d, "UPDATE " HL_PREFIX "ctl SET applying = 0");
}

static hl_status origin_get(hl_db *d, uint64_t node, uint64_t epoch, uint64_t *seq)
{
    sqlite3_stmt *st = d->st_origin_get;
    sqlite3_bind_int64(st, 1, (int64_t)node);
    sqlite3_bind_int64(st, 2, (int64_t)epoch);
    int rc = sqlite3_step(st);
    *seq = rc == SQLITE_ROW ? (uint64_t)sqlite3_column_int64(st, 0) : 0;
    sqlite3_reset(st);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "origin get");
}

static hl_status origin_put(hl_db *d, uint64_t node, uint64_t epoch, uint64_t seq)
{
    sqlite3_stmt *st = d->st_origin_put;
    sqlite3_bind_int64(st, 1, (int64_t)node);
    sqlite3_bind_int64(st, 2, (int64_t)epoch);
    sqlite3_bind_int64(st, 3, (int64_t)seq);
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "origin put");
}

/* Runs one statement with up to five integer parameters; SQLITE_DONE expected. */
static hl_status exec_ints(hl_db *d, const char *sql, const char *what, int n, const int64_t *v)
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(d->db, sql, -1, &st, NULL);
    for (int i = 0; rc == SQLITE_OK && i < n; i++)
        rc = sqlite3_bind_int64(st, i + 1, v[i]);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(st);
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, what);
}

/*
 * max_held_bytes: while an origin has a changeset held for the schema, what is
 * held for it (for any reason), and for all such origins together, stays
 * within the bound. Origins without a schema hold (chains, reordering) are not
 * bounded: their holds resolve by themselves. Sets d->held_full and returns
 * HL_ERR_TOO_LARGE when cs may not be stored.
 */
static hl_status held_room(hl_db *d, const hl_changeset *cs, size_t rawlen, bool for_schema)
{
    sqlite3_stmt *q = NULL;
    uint64_t mine = 0, total = 0;
    bool bounded = for_schema;
    if (!d->opt.max_held_bytes)
        return HL_OK;
    int rc =
        sqlite3_prepare_v2(d->db,
                           "SELECT coalesce(sum(length(data)), 0), coalesce(sum(iif(node = ?1, length(data), 0)), 0),"
                           " coalesce(max(node = ?1), 0) FROM " HL_PREFIX "pending WHERE node IN "
                           "(SELECT node FROM " HL_PREFIX "pending WHERE schema = 1)",
                           -1, &q, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_int64(q, 1, (int64_t)cs->origin);
        if ((rc = sqlite3_step(q)) == SQLITE_ROW) {
            total = (uint64_t)sqlite3_column_int64(q, 0);
            mine = (uint64_t)sqlite3_column_int64(q, 1);
            bounded |= sqlite3_column_int(q, 2) != 0;
            rc = SQLITE_DONE;
        }
    }
    sqlite3_finalize(q);
    if (rc != SQLITE_DONE)
        return hl_db_err(d, rc, "held bytes");
    if (!bounded || (mine + rawlen <= d->opt.max_held_bytes && total + rawlen <= d->opt.max_held_bytes))
        return HL_OK;
    d->held_full = true;
    return HL_ERR_TOO_LARGE;
}

/* Stores cs in pending, unbounded. */
static hl_status store_held(hl_db *d, const hl_changeset *cs, const void *raw, size_t rawlen, uint8_t flags,
                            bool for_schema, const char *reason)
{
    sqlite3_stmt *st = d->st_pending_put;
    sqlite3_bind_int64(st, 1, (int64_t)cs->origin);
    sqlite3_bind_int64(st, 2, (int64_t)cs->epoch);
    sqlite3_bind_int64(st, 3, (int64_t)cs->seq);
    sqlite3_bind_int(st, 4, flags);
    sqlite3_bind_blob64(st, 5, raw, rawlen, SQLITE_STATIC);
    sqlite3_bind_int(st, 6, for_schema ? 1 : 0);
    sqlite3_bind_int64(st, 7, (int64_t)hl_now_ms());
    sqlite3_bind_text(st, 8, reason, -1, SQLITE_TRANSIENT);
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    if (rc != SQLITE_DONE)
        return hl_db_err(d, rc, "hold changeset");
    if (sqlite3_changes(d->db) > 0)
        d->stats.changesets_held++;
    return HL_OK;
}

/* Stores cs in pending within max_held_bytes (held_room). */
static hl_status hold(hl_db *d, const hl_changeset *cs, const void *raw, size_t rawlen, uint8_t flags, bool for_schema,
                      const char *reason)
{
    hl_status room = held_room(d, cs, rawlen, for_schema);
    return room ? room : store_held(d, cs, raw, rawlen, flags, for_schema, reason);
}

/* Stores a row (its encoded key pk and version) in the conflicts table. */
static hl_status conflict_put(hl_db *d, uint64_t origin, const char *tbl, const hl_buf *pk, uint64_t hlc,
                              const char *reason, const hl_buf *row)
{
    sqlite3_stmt *st = d->st_conflict_put;
    if (row && row->len)
        sqlite3_bind_blob64(st, 7, row->data, row->len, SQLITE_STATIC);
    else
        sqlite3_bind_null(st, 7);
    sqlite3_bind_int64(st, 1, (int64_t)hl_now_ms());
    sqlite3_bind_int64(st, 2, (int64_t)origin);
    sqlite3_bind_text(st, 3, tbl, -1, SQLITE_STATIC);
    sqlite3_bind_blob64(st, 4, pk->data, pk->len, SQLITE_STATIC);
    sqlite3_bind_int64(st, 5, (int64_t)hlc);
    sqlite3_bind_text(st, 6, reason, -1, SQLITE_TRANSIENT);
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    d->stats.conflicts++;
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "conflict put");
}

/*
 * The row itself, for __harmonylite__conflicts.row, so nothing of a row that
 * was not applied, or was removed, is lost: a changeset payload
 * (docs/protocol.md §2, uncompressed) with one table and that one row.
 */
static hl_status row_image(const char *tbl, const char *const *cols, size_t ncols, const char *const *pk, size_t npk,
                           const hl_value *key, size_t nkey, const hl_value *vals, uint64_t origin, uint64_t hlc,
                           hl_buf *out)
{
    hl_changeset *cs = hl_changeset_new();
    uint32_t ti = 0;
    hl_status st;
    hl_buf_reset(out);
    if (!cs)
        return HL_ERR_NOMEM;
    cs->origin = origin;
    cs->seq = 1;
    cs->wall_ms = hl_now_ms();
    if (!(st = hl_changeset_add_table(cs, tbl, cols, ncols, pk, npk, &ti)) &&
        !(st =
              hl_changeset_add_row(cs, ti, vals ? HL_OP_UPSERT : HL_OP_DELETE, hlc, key, nkey, vals, vals ? ncols : 0)))
        st = hl_changeset_encode(cs, false, out);
    hl_changeset_free(cs);
    return st;
}

/* Stores row r of origin's changeset cs in the conflicts table with the
 * reason; pk is scratch space for the encoded key. */
static hl_status record_conflict(hl_db *d, const hl_changeset *cs, const char *tbl, const hl_cs_row *r, hl_buf *pk,
                                 const char *reason)
{
    hl_buf_reset(pk);
    hl_status res = hl_key_encode(r->key, r->nkey, pk);
    if (res)
        return res;
    hl_logf(HL_LOG_WARN, "conflict: row from node %llu for table \"%s\" not applied: %s",
            (unsigned long long)cs->origin, tbl, reason);
    const hl_cs_table *ct = &cs->tables[r->table];
    hl_buf row;
    hl_buf_init(&row, 1u << 30);
    if (row_image(ct->name, (const char *const *)ct->cols, ct->ncols, (const char *const *)ct->pk, ct->npk, r->key,
                  r->nkey, r->op == HL_OP_UPSERT ? r->vals : NULL, cs->origin, r->hlc, &row))
        hl_buf_reset(&row); /* the key and the reason are still recorded */
    res = conflict_put(d, cs->origin, tbl, pk, r->hlc, reason, &row);
    hl_buf_free(&row);
    return res;
}

/* How the columns of one changeset table map onto the local table. */
typedef struct tmap {
    hl_table *t;
    int *col; /* remote column i -> local column index */
} tmap;

/* A run of appended rows is written WRITE_MANY_ROWS rows per statement
 * (apply_run): SQLite's cost of starting and ending a statement, paid once per
 * row otherwise, is a large part of an applied append. At most
 * WRITE_MANY_PARAMS parameters, which keeps the prepared statement, kept for
 * as long as the schema, near 30 KB (about 110 bytes per parameter); fewer
 * rows per statement for wider tables, and a table wider than half of that
 * is written row by row. */
#define WRITE_MANY_ROWS 32
#define WRITE_MANY_PARAMS 256

/* Appends the UPSERT of rows rows of a keyed table from the remote columns m,
 * the values of row j in parameters j * nrc + 1 to (j + 1) * nrc. UPSERT,
 * not REPLACE: REPLACE deletes the old row first, which fires ON DELETE
 * actions on child rows and removes rows that clash on other unique
 * constraints behind the application's back. */
static hl_status upsert_sql(hl_buf *q, const tmap *m, size_t nrc, size_t rows)
{
    const hl_table *t = m->t;
    hl_buf_adds(q, "INSERT INTO ");
    hl_buf_add_ident(q, t->name);
    hl_buf_adds(q, "(");
    for (size_t i = 0; i < nrc; i++) {
        if (i)
            hl_buf_adds(q, ", ");
        hl_buf_add_ident(q, t->cols[m->col[i]]);
    }
    hl_buf_adds(q, ") VALUES ");
    for (size_t j = 0; j < rows; j++) {
        hl_buf_adds(q, j ? ", (" : "(");
        for (size_t i = 0; i < nrc; i++)
            hl_buf_addf(q, "%s?%zu", i ? ", " : "", j * nrc + i + 1);
        hl_buf_adds(q, ")");
    }
    hl_buf_adds(q, " ON CONFLICT (");
    for (size_t i = 0; i < t->npk; i++) {
        if (i)
            hl_buf_adds(q, ", ");
        hl_buf_add_ident(q, t->cols[t->pk[i]]);
    }
    hl_buf_adds(q, ") DO ");
    bool any = false;
    for (size_t i = 0; i < nrc; i++) {
        if (t->pkpos[m->col[i]] > 0)
            continue;
        hl_buf_adds(q, any ? ", " : "UPDATE SET ");
        hl_buf_add_ident(q, t->cols[m->col[i]]);
        hl_buf_adds(q, " = excluded.");
        hl_buf_add_ident(q, t->cols[m->col[i]]);
        any = true;
    }
    if (!any)
        hl_buf_adds(q, "NOTHING");
    return hl_buf_status(q);
}

/* Rowid tables have no conflict target: an UPDATE by rowid (?nrc+1) ... */
static hl_status rowid_update_sql(hl_buf *q, const tmap *m, size_t nrc)
{
    const hl_table *t = m->t;
    hl_buf_adds(q, "UPDATE ");
    hl_buf_add_ident(q, t->name);
    hl_buf_adds(q, " SET ");
    for (size_t i = 0; i < nrc; i++) {
        if (i)
            hl_buf_adds(q, ", ");
        hl_buf_add_ident(q, t->cols[m->col[i]]);
        hl_buf_addf(q, " = ?%zu", i + 1);
    }
    if (nrc == 0)
        hl_buf_addf(q, "%s = %s", t->rowid, t->rowid);
    return hl_buf_addf(q, " WHERE %s = ?%zu", t->rowid, nrc + 1);
}

/* ... and the INSERT for when no row changed. */
static hl_status rowid_insert_sql(hl_buf *q, const tmap *m, size_t nrc)
{
    const hl_table *t = m->t;
    hl_buf_adds(q, "INSERT INTO ");
    hl_buf_add_ident(q, t->name);
    hl_buf_addf(q, "(%s", t->rowid);
    for (size_t i = 0; i < nrc; i++) {
        hl_buf_adds(q, ", ");
        hl_buf_add_ident(q, t->cols[m->col[i]]);
    }
    hl_buf_addf(q, ") VALUES (?%zu", nrc + 1);
    for (size_t i = 0; i < nrc; i++)
        hl_buf_addf(q, ", ?%zu", i + 1);
    return hl_buf_adds(q, ")");
}

/* Prepares the statement built in q into *st and empties q. */
static hl_status prepare_built(hl_db *d, hl_buf *q, sqlite3_stmt **st)
{
    hl_status res = hl_stmt_prepare(d, st, q);
    hl_buf_reset(q);
    return res;
}

/* Builds (or reuses) t->st_write / t->st_insert for the remote column mapping m. */
static hl_status prepare_write(hl_db *d, tmap *m, size_t nrc)
{
    hl_table *t = m->t;
    hl_buf sig, q;
    hl_status st;
    hl_buf_init(&sig, 1u << 20);
    hl_buf_init(&q, 64u << 20);
    for (size_t i = 0; i < nrc; i++)
        hl_buf_addf(&sig, "%d,", m->col[i]);
    if ((st = hl_buf_status(&sig)))
        goto out;
    if (t->write_sig && strcmp(t->write_sig, hl_buf_str(&sig)) == 0 && t->st_write && t->st_row_del)
        goto out;
    sqlite3_finalize(t->st_write);
    sqlite3_finalize(t->st_insert);
    sqlite3_finalize(t->st_write_many);
    t->st_write = t->st_insert = t->st_write_many = NULL;
    t->write_many = 0;
    free(t->write_sig);
    t->write_sig = NULL;
    if (t->npk) {
        upsert_sql(&q, m, nrc, 1);
        st = prepare_built(d, &q, &t->st_write);
        size_t many = nrc ? WRITE_MANY_PARAMS / nrc : 0;
        if (t->spanned && many >= 2) /* st_write_many: when a run first needs it (write_many) */
            t->write_many = (int)(many > WRITE_MANY_ROWS ? WRITE_MANY_ROWS : many);
    } else {
        rowid_update_sql(&q, m, nrc);
        if (!(st = prepare_built(d, &q, &t->st_write))) {
            rowid_insert_sql(&q, m, nrc);
            st = prepare_built(d, &q, &t->st_insert);
        }
    }
    if (!st && !t->st_row_del) {
        hl_buf_adds(&q, "DELETE FROM ");
        hl_buf_add_ident(&q, t->name);
        hl_buf_adds(&q, " WHERE ");
        hl_add_key_where(&q, t, 1);
        st = prepare_built(d, &q, &t->st_row_del);
    }
    if (!st)
        t->write_sig = (char *)hl_buf_steal(&sig, NULL);
out:
    hl_buf_free(&sig);
    hl_buf_free(&q);
    return st;
}

/* Runs a write statement; a constraint failure is reported through why (empty
 * when none) and its extended result code through *xrc. */
static hl_status step_write(hl_db *d, sqlite3_stmt *st, char *why, size_t whylen, int *xrc)
{
    int rc = sqlite3_step(st);
    why[0] = 0;
    *xrc = rc;
    if (rc == SQLITE_DONE || rc == SQLITE_ROW) {
        sqlite3_reset(st);
        return HL_OK;
    }
    int prc = rc & 0xff;
    if (prc == SQLITE_CONSTRAINT || prc == SQLITE_MISMATCH || prc == SQLITE_TOOBIG) {
        snprintf(why, whylen, "%s", sqlite3_errmsg(d->db));
        sqlite3_reset(st);
        return HL_OK;
    }
    hl_status res = hl_db_err(d, rc, "apply row");
    sqlite3_reset(st);
    return res;
}

/* Writes remote row r (upsert or delete); a constraint failure is reported through why and *xrc. */
static hl_status write_row(hl_db *d, const hl_cs_row *r, tmap *m, size_t nrc, char *why, size_t whylen, int *xrc)
{
    hl_table *t = m->t;
    hl_status st;
    if (r->op == HL_OP_DELETE) {
        for (size_t i = 0; i < r->nkey; i++)
            hl_bind_value(t->st_row_del, (int)i + 1, &r->key[i]);
        st = step_write(d, t->st_row_del, why, whylen, xrc);
        sqlite3_clear_bindings(t->st_row_del);
    } else if (t->npk) {
        for (size_t i = 0; i < nrc; i++)
            hl_bind_value(t->st_write, (int)i + 1, &r->vals[i]);
        st = step_write(d, t->st_write, why, whylen, xrc);
        sqlite3_clear_bindings(t->st_write);
    } else {
        for (size_t i = 0; i < nrc; i++) {
            hl_bind_value(t->st_write, (int)i + 1, &r->vals[i]);
            hl_bind_value(t->st_insert, (int)i + 1, &r->vals[i]);
        }
        hl_bind_value(t->st_write, (int)nrc + 1, &r->key[0]);
        hl_bind_value(t->st_insert, (int)nrc + 1, &r->key[0]);
        st = step_write(d, t->st_write, why, whylen, xrc);
        if (!st && !why[0] && sqlite3_changes(d->db) == 0)
            st = step_write(d, t->st_insert, why, whylen, xrc);
        sqlite3_clear_bindings(t->st_write);
        sqlite3_clear_bindings(t->st_insert);
    }
    return st;
}

/* Appends "x.<key column i>" (the rowid for a table keyed by it). */
static hl_status add_key_col(hl_buf *q, const hl_table *t, size_t i)
{
    hl_buf_adds(q, "x.");
    return t->npk ? hl_buf_add_ident(q, t->cols[t->pk[i]]) : hl_buf_adds(q, t->rowid);
}

/* "SELECT <key>, <version>, <columns> FROM t AS x LEFT JOIN <clock> AS c ON
 * <key> WHERE ": the start of a clash query. */
static hl_status clash_select_sql(hl_buf *q, const hl_table *t)
{
    size_t nk = t->npk ? t->npk : 1;
    hl_buf_adds(q, "SELECT ");
    for (size_t i = 0; i < nk; i++) {
        add_key_col(q, t, i);
        hl_buf_adds(q, ", ");
    }
    if (t->spanned) {
        /* No clock row: the row's span (clock.c). */
        hl_buf key;
        hl_buf_init(&key, 1u << 20);
        add_key_col(&key, t, 0);
        hl_status st = hl_buf_status(&key);
        hl_buf_adds(q, "coalesce(c.hlc, ");
        hl_span_version_sql(q, t, st ? "NULL" : hl_buf_str(&key), "hlc");
        hl_buf_adds(q, ", 0), coalesce(c.node, ");
        hl_span_version_sql(q, t, st ? "NULL" : hl_buf_str(&key), "node");
        hl_buf_adds(q, ", 0)");
        hl_buf_free(&key);
        if (st)
            return st;
    } else {
        hl_buf_adds(q, "coalesce(c.hlc, 0), coalesce(c.node, 0)");
    }
    for (size_t i = 0; i < t->ncols; i++) {
        hl_buf_adds(q, ", x.");
        hl_buf_add_ident(q, t->cols[i]);
    }
    hl_buf_adds(q, " FROM ");
    hl_buf_add_ident(q, t->name);
    hl_buf_adds(q, " AS x LEFT JOIN ");
    hl_buf_add_ident(q, t->clock);
    hl_buf_adds(q, " AS c ON ");
    for (size_t i = 0; i < nk; i++) {
        hl_buf_addf(q, "%sc.k%zu = ", i ? " AND " : "", i);
        add_key_col(q, t, i);
    }
    return hl_buf_adds(q, " WHERE ");
}

#define CLASH_MAX_COLS 64 /* index columns a clash query matches; a wider index is not matched */

/*
 * Appends "x.<col> = ?n COLLATE <coll> AND ..." for the columns of UNIQUE
 * index idx, with r's value of each in vals. *nv stays 0 when no row can clash
 * there (a NULL value) or the index cannot be matched column by column (an
 * expression, or a column r does not carry).
 */
static hl_status clash_index_sql(hl_db *d, hl_buf *q, const tmap *m, size_t nrc, const hl_cs_row *r, const char *idx,
                                 const hl_value **vals, size_t *nv)
{
    sqlite3_stmt *xi = NULL;
    size_t n = 0;
    bool usable = true;
    *nv = 0;
    int rc = sqlite3_prepare_v2(d->db, "SELECT cid, name, coll FROM pragma_index_xinfo(?1) WHERE key ORDER BY seqno",
                                -1, &xi, NULL);
    if (rc != SQLITE_OK)
        return hl_db_err(d, rc, "index columns");
    sqlite3_bind_text(xi, 1, idx, -1, SQLITE_STATIC);
    while (usable && (rc = sqlite3_step(xi)) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(xi, 1);
        const char *coll = (const char *)sqlite3_column_text(xi, 2);
        int lc = sqlite3_column_int(xi, 0) >= 0 && name ? hl_table_col(m->t, name) : -1;
        const hl_value *v = NULL;
        for (size_t i = 0; lc >= 0 && i < nrc && !v; i++)
            if (m->col[i] == lc)
                v = &r->vals[i];
        /* Not matchable, or NULL, which never clashes. */
        if (!v || n == CLASH_MAX_COLS || v->type == HL_VAL_NULL) {
            usable = false;
            break;
        }
        vals[n++] = v;
        hl_buf_adds(q, n > 1 ? " AND x." : "x.");
        hl_buf_add_ident(q, name);
        hl_buf_addf(q, " = ?%zu COLLATE ", n);
        hl_buf_add_ident(q, coll ? coll : "BINARY");
    }
    sqlite3_finalize(xi);
    if (usable && rc != SQLITE_DONE)
        return hl_db_err(d, rc, "index columns");
    if (usable)
        *nv = n;
    return hl_buf_status(q);
}

/*
 * Prepares the query for the local row, other than r's own, that holds r's
 * values in UNIQUE index idx: its key, version and columns. *out stays NULL when no
 * row can clash there (a NULL value) or the index cannot be matched column by
 * column (an expression, or a column r does not carry).
 */
static hl_status clash_query(hl_db *d, const tmap *m, size_t nrc, const hl_cs_row *r, const char *idx,
                             sqlite3_stmt **out)
{
    const hl_table *t = m->t;
    size_t nk = t->npk ? t->npk : 1;
    const hl_value *vals[CLASH_MAX_COLS];
    size_t nv = 0;
    sqlite3_stmt *q = NULL;
    hl_buf sql;
    *out = NULL;
    hl_buf_init(&sql, 1u << 20);
    clash_select_sql(&sql, t);
    hl_status st = clash_index_sql(d, &sql, m, nrc, r, idx, vals, &nv);
    if (st || !nv)
        goto out;
    hl_buf_adds(&sql, " AND NOT (");
    for (size_t i = 0; i < nk; i++) {
        if (i)
            hl_buf_adds(&sql, " AND ");
        add_key_col(&sql, t, i);
        hl_buf_addf(&sql, " = ?%zu", nv + i + 1);
    }
    if ((st = hl_buf_adds(&sql, ")")))
        goto out;
    int rc = sqlite3_prepare_v2(d->db, hl_buf_str(&sql), -1, &q, NULL);
    if (rc != SQLITE_OK) {
        st = hl_db_err(d, rc, hl_buf_str(&sql));
        goto out;
    }
    for (size_t i = 0; i < nv; i++)
        hl_bind_value(q, (int)i + 1, vals[i]);
    for (size_t i = 0; i < r->nkey; i++)
        hl_bind_value(q, (int)(nv + i + 1), &r->key[i]);
    *out = q;
out:
    hl_buf_free(&sql);
    return st;
}

/* The names of t's UNIQUE indexes other than the key and not partial (at most
 * max of them), sqlite3_malloc'd; *n receives how many. */
static hl_status unique_indexes(hl_db *d, const hl_table *t, char **idx, size_t max, size_t *n)
{
    sqlite3_stmt *li = NULL;
    hl_status st = HL_OK;
    *n = 0;
    int rc = sqlite3_prepare_v2(d->db,
                                "SELECT name FROM pragma_index_list(?1) WHERE \"unique\" AND origin <> 'pk' AND "
                                "NOT partial ORDER BY name",
                                -1, &li, NULL);
    if (rc != SQLITE_OK)
        return hl_db_err(d, rc, "index list");
    sqlite3_bind_text(li, 1, t->name, -1, SQLITE_STATIC);
    while (*n < max && (rc = sqlite3_step(li)) == SQLITE_ROW) {
        if (!(idx[*n] = sqlite3_mprintf("%s", (const char *)sqlite3_column_text(li, 0)))) {
            st = HL_ERR_NOMEM;
            break;
        }
        (*n)++;
    }
    sqlite3_finalize(li);
    return st;
}

/*
 * Removes the local row q points at (a row of t that lost a clash on UNIQUE
 * index idx to origin's row) and records it, with its version (hlc, node), in
 * the conflicts table. Finalizes q. pk is scratch space for the encoded key.
 */
static hl_status remove_clashing(hl_db *d, hl_table *t, sqlite3_stmt *q, const char *idx, uint64_t origin, uint64_t hlc,
                                 uint64_t node, hl_buf *pk)
{
    size_t nk = t->npk ? t->npk : 1;
    sqlite3_value *kv[HL_CS_MAX_KEY];
    size_t nkv = 0;
    hl_value key[HL_CS_MAX_KEY];
    /* Copy the key out before the row goes away ... */
    hl_buf_reset(pk);
    for (size_t i = 0; i < nk; i++)
        hl_value_from_column(q, (int)i, &key[i]);
    hl_status st = hl_key_encode(key, nk, pk);
    /* ... and the row: it is removed here, and kept in the conflicts table. */
    hl_buf image;
    hl_buf_init(&image, 1u << 30);
    hl_value *vals = calloc(t->ncols ? t->ncols : 1, sizeof *vals);
    const char *pkn[HL_CS_MAX_KEY];
    for (size_t i = 0; i < t->npk; i++)
        pkn[i] = t->cols[t->pk[i]];
    if (!st && !vals)
        st = HL_ERR_NOMEM;
    for (size_t i = 0; !st && i < t->ncols; i++)
        hl_value_from_column(q, (int)(nk + 2 + i), &vals[i]);
    if (!st &&
        row_image(t->name, (const char *const *)t->cols, t->ncols, pkn, t->npk, key, nk, vals, node, hlc, &image))
        hl_buf_reset(&image);
    free(vals);
    for (size_t i = 0; i < nk && !st; i++, nkv++)
        if (!(kv[i] = sqlite3_value_dup(sqlite3_column_value(q, (int)i))))
            st = HL_ERR_NOMEM;
    sqlite3_finalize(q);
    for (size_t i = 0; i < nkv && !st; i++)
        sqlite3_bind_value(t->st_row_del, (int)i + 1, kv[i]);
    int rc;
    if (!st && (rc = sqlite3_step(t->st_row_del)) != SQLITE_DONE)
        st = hl_db_err(d, rc, "remove clashing row");
    sqlite3_reset(t->st_row_del);
    sqlite3_clear_bindings(t->st_row_del);
    for (size_t i = 0; i < nkv; i++)
        sqlite3_value_free(kv[i]);
    if (!st) {
        char why[512];
        snprintf(why, sizeof why,
                 "removed: lost a clash on UNIQUE index \"%s\" to the row from node %llu with a later version", idx,
                 (unsigned long long)origin);
        hl_logf(HL_LOG_WARN, "conflict: row from node %llu in table \"%s\" %s", (unsigned long long)node, t->name, why);
        st = conflict_put(d, node, t->name, pk, hlc, why, &image);
    }
    hl_buf_free(&image);
    return st;
}

/*
 * Remote row r clashed with other local rows on a UNIQUE index other than the
 * key. Decided the same way on every node: the row with the greater version
 * (hlc, node) wins. When r beats every clashing row, they are removed (apply
 * runs with applying = 1, so the triggers do not capture the removal), each is
 * recorded in the conflicts table, and *retry asks for r to be written again.
 * A removed row's clock keeps its version, so an older write of it arriving
 * later cannot bring it back; a newer one can (and then wins or loses again).
 */
static hl_status resolve_unique(hl_db *d, const hl_changeset *cs, const hl_cs_row *r, tmap *m, size_t nrc, hl_buf *pk,
                                bool *retry)
{
    hl_table *t = m->t;
    size_t nk = t->npk ? t->npk : 1;
    char *idx[64];
    size_t nidx = 0, found = 0;
    bool lost = false;
    *retry = false;
    hl_status st = unique_indexes(d, t, idx, sizeof idx / sizeof idx[0], &nidx);
    /* Pass 0 decides, pass 1 removes the losers. */
    for (int pass = 0; pass < 2 && !st; pass++) {
        for (size_t x = 0; x < nidx && !st && !lost; x++) {
            sqlite3_stmt *q = NULL;
            if ((st = clash_query(d, m, nrc, r, idx[x], &q)) || !q)
                continue;
            int rc = sqlite3_step(q);
            if (rc == SQLITE_ROW) {
                uint64_t hlc = (uint64_t)sqlite3_column_int64(q, (int)nk);
                uint64_t node = (uint64_t)sqlite3_column_int64(q, (int)nk + 1);
                if (pass == 0) {
                    found++;
                    lost = hl_version_cmp(r->hlc, cs->origin, hlc, node) <= 0;
                } else {
                    st = remove_clashing(d, t, q, idx[x], cs->origin, hlc, node, pk);
                    q = NULL; /* finalized */
                }
            } else if (rc != SQLITE_DONE) {
                st = hl_db_err(d, rc, "clashing row");
            }
            sqlite3_finalize(q);
        }
        if (lost || !found)
            break;
    }
    for (size_t x = 0; x < nidx; x++)
        sqlite3_free(idx[x]);
    *retry = !st && !lost && found > 0;
    return st;
}

/* Writes r, whose version won and is recorded; a row that cannot be written
 * goes to the conflicts table. */
static hl_status write_won(hl_db *d, const hl_changeset *cs, const hl_cs_row *r, tmap *m, size_t nrc, hl_buf *pk)
{
    hl_table *t = m->t;
    hl_status st;
    char why[512];
    int xrc = 0;
    for (int attempt = 0;; attempt++) {
        if ((st = write_row(d, r, m, nrc, why, sizeof why, &xrc)))
            return st;
        if (!why[0] || xrc != SQLITE_CONSTRAINT_UNIQUE || attempt > 0)
            break;
        /* Different rows, same values in a UNIQUE index: the greater version
         * wins everywhere, whatever the arrival order. */
        bool retry = false;
        if ((st = resolve_unique(d, cs, r, m, nrc, pk, &retry)))
            return st;
        if (!retry)
            break;
    }
    /* A row that cannot be written keeps its winning version in the clock:
     * every node agrees on the version, and an older one arriving later
     * cannot be applied here either. The row itself is in the conflicts table. */
    if (why[0])
        return record_conflict(d, cs, t->name, r, pk, why);
    t->applied = true;
    d->stats.rows_applied++;
    return HL_OK;
}

static hl_status apply_row(hl_db *d, const hl_changeset *cs, const hl_cs_row *r, tmap *m, size_t nrc, hl_buf *pk)
{
    hl_table *t = m->t;

    hl_hlc_observe(&d->last_hlc, r->hlc);
    for (size_t i = 0; i < r->nkey; i++)
        if (r->key[i].type == HL_VAL_NULL)
            return record_conflict(d, cs, t->name, r, pk, "NULL in the primary key");

    /* Check and record the version in one statement: the clock row is
     * written only when (hlc, origin) beats the stored version. */
    sqlite3_stmt *cw = t->st_clock_win;
    for (size_t i = 0; i < r->nkey; i++)
        hl_bind_value(cw, (int)i + 1, &r->key[i]);
    sqlite3_bind_int64(cw, (int)r->nkey + 1, (int64_t)r->hlc);
    sqlite3_bind_int64(cw, (int)r->nkey + 2, (int64_t)cs->origin);
    sqlite3_bind_int(cw, (int)r->nkey + 3, r->op == HL_OP_DELETE ? 1 : 0);
    int rc = sqlite3_step(cw);
    bool newer = rc == SQLITE_DONE && sqlite3_changes(d->db) > 0;
    sqlite3_reset(cw);
    if ((rc & 0xff) == SQLITE_MISMATCH) /* not an integer, for a table keyed by its rowid */
        return record_conflict(d, cs, t->name, r, pk, "key is not an integer (the table's rowid)");
    if (rc != SQLITE_DONE)
        return hl_db_err(d, rc, "clock check");
    if (!newer) {
        d->stats.rows_skipped_lww++;
        return HL_OK;
    }
    return write_won(d, cs, r, m, nrc, pk);
}

/* Maps every table and column of cs onto the local schema. */
static one_result map_tables(hl_db *d, const hl_changeset *cs, tmap *maps, char *why, size_t whylen)
{
    for (size_t i = 0; i < cs->ntables; i++) {
        const hl_cs_table *ct = &cs->tables[i];
        hl_table *t = hl_schema_find(&d->schema, ct->name);
        if (!t) {
            snprintf(why, whylen, "unknown table \"%s\"", ct->name);
            return ONE_SCHEMA;
        }
        maps[i].t = t;
        maps[i].col = calloc(ct->ncols ? ct->ncols : 1, sizeof(int));
        if (!maps[i].col) {
            snprintf(why, whylen, "out of memory");
            return ONE_SCHEMA;
        }
        for (size_t c = 0; c < ct->ncols; c++) {
            int lc = hl_table_col(t, ct->cols[c]);
            if (lc < 0) {
                snprintf(why, whylen, "unknown column \"%s\" in table \"%s\"", ct->cols[c], ct->name);
                return ONE_SCHEMA;
            }
            maps[i].col[c] = lc;
        }
        bool keys_match = ct->npk == t->npk;
        for (size_t k = 0; keys_match && k < ct->npk; k++)
            keys_match = sqlite3_stricmp(ct->pk[k], t->cols[t->pk[k]]) == 0;
        if (!keys_match) {
            snprintf(why, whylen, "primary key of table \"%s\" differs", ct->name);
            return ONE_SCHEMA;
        }
        /* An upsert must carry every key column. */
        for (size_t k = 0; k < t->npk; k++) {
            bool found = false;
            for (size_t c = 0; c < ct->ncols && !found; c++)
                found = (size_t)maps[i].col[c] == t->pk[k];
            if (!found && ct->ncols) {
                snprintf(why, whylen, "table \"%s\": key column missing from row images", ct->name);
                return ONE_SCHEMA;
            }
        }
    }
    return ONE_OK;
}

/* ---- apply order ---- */

/*
 * Rows applied in key order touch the B-tree pages of their table and of its
 * clock in ascending order instead of one random page each (DESIGN.md §3).
 * Sorting must never change what a changeset does, so it is done only where
 * the order of rows cannot matter:
 *  - within a run of consecutive rows of one table: rows never move across
 *    tables, as a trigger on one table may read or write another;
 *  - for a table whose row order is its key: keyed by its rowid, or WITHOUT
 *    ROWID. A rowid table with another key gives each new row the next
 *    rowid, so the order of inserts shows (SELECT rowid, and a scan without
 *    ORDER BY);
 *  - for a table on which a row write touches its own row and nothing else:
 *    no UNIQUE index besides the key (rows of one changeset may hand a value
 *    on: one row gives it up, a later one takes it; taken first, it would
 *    clash and land in the conflicts table), no application trigger on it
 *    (a trigger may read or write other rows), and foreign keys not enforced
 *    on the engine's connection (store.c turns them off; checked anyway: a
 *    child applied before its parent would fail);
 *  - rows with the same key keep their order (ties are broken by position),
 *    and "the same key" must mean "the same row": a key column is sorted only
 *    when every row of the run has the same value type there and neither the
 *    column's affinity nor its collation can make two different values one
 *    row (KEY_* in hl_table.key_types).
 * Everything else is applied in the order captured.
 */
enum { KEY_INT = 1, KEY_TEXT = 2, KEY_BLOB = 4 };

/* The affinity of a normalised (upper-case) declared type, by SQLite's rules
 * (https://sqlite.org/datatype3.html, 3.1): 'i'nteger, 't'ext, 'b'lob,
 * 'r'eal or 'n'umeric. */
static char decl_affinity(const char *decl)
{
    if (strstr(decl, "INT"))
        return 'i';
    if (strstr(decl, "CHAR") || strstr(decl, "CLOB") || strstr(decl, "TEXT"))
        return 't';
    if (!decl[0] || strstr(decl, "BLOB"))
        return 'b';
    if (strstr(decl, "REAL") || strstr(decl, "FLOA") || strstr(decl, "DOUB"))
        return 'r';
    return 'n';
}

/* Runs a one-value query (?1 bound to name when not NULL) into *v. */
static hl_status query_int(hl_db *d, const char *sql, const char *name, int64_t *v)
{
    hl_buf q;
    hl_buf_init(&q, 1u << 10);
    hl_buf_adds(&q, sql);
    hl_status st = hl_db_run(d, &q, name, v, "apply order");
    hl_buf_free(&q);
    return st;
}

/* Finds out t->key_order and t->key_types (see above). */
static hl_status key_order_prepare(hl_db *d, hl_table *t)
{
    int64_t unique = 0, triggers = 0, fks = 0, utf8 = 0;
    hl_status st;
    if ((st = query_int(d, "SELECT count(*) FROM pragma_index_list(?1) WHERE \"unique\" AND origin <> 'pk'", t->name,
                        &unique)) ||
        (st = query_int(d,
                        "SELECT count(*) FROM sqlite_schema WHERE type = 'trigger' AND tbl_name = ?1 COLLATE NOCASE "
                        "AND name NOT LIKE '\\_\\_harmonylite\\_\\_%' ESCAPE '\\'",
                        t->name, &triggers)) ||
        (st = query_int(d, "PRAGMA foreign_keys", NULL, &fks)) ||
        (st = query_int(d, "SELECT \"encoding\" = 'UTF-8' FROM pragma_encoding", NULL, &utf8)))
        return st;
    t->key_order = (t->int_key || t->without_rowid) && !unique && !triggers && !fks ? 1 : -1;
    if (!t->npk)
        t->key_types[0] = KEY_INT; /* the rowid */
    for (size_t k = 0; k < t->npk && t->key_order > 0; k++) {
        const char *col = t->cols[t->pk[k]], *coll = NULL;
        char aff = decl_affinity(t->decl[t->pk[k]]);
        int rc = sqlite3_table_column_metadata(d->db, "main", t->name, col, NULL, &coll, NULL, NULL, NULL);
        if (rc != SQLITE_OK)
            return hl_db_err(d, rc, "apply order: key column");
        /* Blobs are never converted; integers only by REAL affinity (two
         * large ones can become one double); text by any numeric affinity
         * ('1' and '01' can become one number), or made equal by a collation. */
        t->key_types[k] = KEY_BLOB;
        if (aff != 'r')
            t->key_types[k] |= KEY_INT;
        if ((aff == 't' || aff == 'b') && coll && sqlite3_stricmp(coll, "BINARY") == 0 && utf8)
            t->key_types[k] |= KEY_TEXT;
    }
    return HL_OK;
}

/* A row to apply and its position in the changeset. */
typedef struct keyed {
    const hl_cs_row *r;
    size_t at;
} keyed;

/* Key order, then position (rows of one run: the same key types). */
static int keyed_cmp(const void *a, const void *b)
{
    const keyed *x = a, *y = b;
    for (size_t k = 0; k < x->r->nkey; k++) {
        const hl_value *u = &x->r->key[k], *v = &y->r->key[k];
        int c;
        if (u->type == HL_VAL_INT) {
            c = (u->u.i > v->u.i) - (u->u.i < v->u.i);
        } else {
            size_t n = u->u.b.n < v->u.b.n ? u->u.b.n : v->u.b.n;
            c = n ? memcmp(u->u.b.p, v->u.b.p, n) : 0;
            if (!c)
                c = (u->u.b.n > v->u.b.n) - (u->u.b.n < v->u.b.n);
        }
        if (c)
            return c;
    }
    return (x->at > y->at) - (x->at < y->at);
}

/* Whether rows[from, to), all of table t, may be sorted: every row has t's
 * key, with the same value type in each column, one the column may sort. */
static bool run_sortable(const hl_table *t, const hl_cs_row *rows, size_t from, size_t to)
{
    size_t nk = t->npk ? t->npk : 1;
    for (size_t i = from; i < to; i++) {
        if (rows[i].nkey != nk)
            return false;
        for (size_t k = 0; k < nk; k++) {
            hl_vtype ty = rows[i].key[k].type;
            int bit = ty == HL_VAL_INT ? KEY_INT : ty == HL_VAL_TEXT ? KEY_TEXT : ty == HL_VAL_BLOB ? KEY_BLOB : 0;
            if (!(t->key_types[k] & bit) || ty != rows[from].key[k].type)
                return false;
        }
    }
    return true;
}

/* Whether rows[from, to) are in key order already (ascending keys: the usual case). */
static bool run_sorted(const hl_cs_row *rows, size_t from, size_t to)
{
    for (size_t i = from + 1; i < to; i++)
        if (keyed_cmp(&(keyed){&rows[i - 1], i - 1}, &(keyed){&rows[i], i}) > 0)
            return false;
    return true;
}

/*
 * The order to apply cs's rows in (tables mapped in maps): *order receives,
 * malloc'd, the position of the row to apply at each step, or NULL when the
 * captured order stays (nothing to sort, or nothing may be).
 */
static hl_status apply_order(hl_db *d, const hl_changeset *cs, const tmap *maps, size_t **order)
{
    const hl_cs_row *rows = cs->rows;
    hl_status st = HL_OK;
    size_t *ord = NULL;
    keyed *run = NULL;
    *order = NULL;
    for (size_t from = 0, to; from < cs->nrows; from = to) {
        for (to = from + 1; to < cs->nrows && rows[to].table == rows[from].table;)
            to++;
        hl_table *t = maps[rows[from].table].t;
        if (to - from < 2)
            continue;
        if (!t->key_order && (st = key_order_prepare(d, t)))
            goto out;
        if (t->key_order < 0 || !run_sortable(t, rows, from, to) || run_sorted(rows, from, to))
            continue;
        if (!ord) {
            ord = malloc(cs->nrows * sizeof *ord);
            run = malloc(cs->nrows * sizeof *run);
            if (!ord || !run) {
                st = HL_ERR_NOMEM;
                goto out;
            }
            for (size_t i = 0; i < cs->nrows; i++)
                ord[i] = i;
        }
        for (size_t i = from; i < to; i++)
            run[i - from] = (keyed){&rows[i], i};
        qsort(run, to - from, sizeof *run, keyed_cmp);
        for (size_t i = from; i < to; i++)
            ord[i] = run[i - from].at;
    }
    *order = ord;
    ord = NULL;
out:
    free(run);
    free(ord);
    return st;
}

/* ---- runs of appended rows ---- */

#define ROW_AT(cs, order, i) (&(cs)->rows[(order) ? (order)[i] : (i)])

/* The length of the run of appended rows starting at step i: upserts of one
 * table, consecutive integer keys, one version (1 when there is none). */
static size_t append_run(const hl_changeset *cs, const size_t *order, size_t i)
{
    const hl_cs_row *first = ROW_AT(cs, order, i), *prev = first;
    if (first->op != HL_OP_UPSERT || first->nkey != 1 || first->key[0].type != HL_VAL_INT)
        return 1;
    size_t j = i + 1;
    for (; j < cs->nrows; j++) {
        const hl_cs_row *r = ROW_AT(cs, order, j);
        if (r->table != first->table || r->op != HL_OP_UPSERT || r->nkey != 1 || r->key[0].type != HL_VAL_INT ||
            r->hlc != first->hlc || prev->key[0].u.i == INT64_MAX || r->key[0].u.i != prev->key[0].u.i + 1)
            break;
        prev = r;
    }
    return j - i;
}

/* Writes the t->write_many rows of a run from step i with one statement.
 * Where one of them cannot be written, SQLite takes the whole statement back
 * and they are written one by one, so that each such row is recorded as a
 * conflict (write_won) and the others are applied. */
static hl_status write_many(hl_db *d, const hl_changeset *cs, const size_t *order, size_t i, tmap *m, size_t nrc,
                            hl_buf *pk)
{
    hl_table *t = m->t;
    size_t many = (size_t)t->write_many;
    char why[512];
    int xrc = 0;
    if (!t->st_write_many) {
        /* Prepared on first use, not with st_write: a table that never
         * receives a run of that many appends does not keep it. */
        hl_buf q;
        hl_buf_init(&q, 64u << 20);
        upsert_sql(&q, m, nrc, many);
        hl_status pst = prepare_built(d, &q, &t->st_write_many);
        hl_buf_free(&q);
        if (pst)
            return pst;
    }
    for (size_t k = 0; k < many; k++) {
        const hl_cs_row *r = ROW_AT(cs, order, i + k);
        for (size_t c = 0; c < nrc; c++)
            hl_bind_value(t->st_write_many, (int)(k * nrc + c) + 1, &r->vals[c]);
    }
    hl_status st = step_write(d, t->st_write_many, why, sizeof why, &xrc);
    sqlite3_clear_bindings(t->st_write_many);
    if (st)
        return st;
    if (!why[0]) {
        t->applied = true;
        d->stats.rows_applied += many;
        return HL_OK;
    }
    for (size_t k = 0; k < many && !st; k++)
        st = write_won(d, cs, ROW_AT(cs, order, i + k), m, nrc, pk);
    return st;
}

/*
 * Appended rows arrive in runs: consecutive keys, one version (the sender's
 * spans, clock.c). When no row in a run's range has a version here, the run's
 * version beats each of theirs, so it is recorded as one span, as on the
 * sender, and the rows are written without a clock check each: an applied
 * append costs its row's B-tree insert and little else. Only for a table on
 * which a row write touches its own row alone (t->key_order > 0: no UNIQUE
 * index, no trigger), so that recording the run's version before its rows
 * are written cannot change what another row's write sees. *done false: the
 * run was not applied, apply it row by row.
 */
static hl_status apply_run(hl_db *d, const hl_changeset *cs, const size_t *order, size_t i, size_t n, tmap *m,
                           size_t nrc, hl_buf *pk, bool *done)
{
    hl_table *t = m->t;
    const hl_cs_row *first = ROW_AT(cs, order, i);
    int64_t lo = first->key[0].u.i, hi = ROW_AT(cs, order, i + n - 1)->key[0].u.i;
    bool none = false;
    hl_status st = HL_OK; /* returned as is when the run cannot be a span */
    *done = false;
    if (!t->key_order && (st = key_order_prepare(d, t)))
        return st;
    if (t->key_order < 0 || (st = hl_span_unversioned(d, t, lo, hi, &none)) || !none)
        return st;
    hl_hlc_observe(&d->last_hlc, first->hlc);
    if ((st = hl_span_put(d, t, lo, hi, first->hlc, cs->origin)))
        return st;
    size_t k = 0, many = (size_t)t->write_many;
    for (; many && k + many <= n && !st; k += many)
        st = write_many(d, cs, order, i + k, m, nrc, pk);
    for (; k < n && !st; k++)
        st = write_won(d, cs, ROW_AT(cs, order, i + k), m, nrc, pk);
    *done = !st;
    return st;
}

static hl_status apply_one(hl_db *d, const hl_changeset *cs, one_result *res, char *why, size_t whylen)
{
    hl_status st = HL_OK;
    hl_buf pk;
    size_t *order = NULL;
    tmap *maps = calloc(cs->ntables ? cs->ntables : 1, sizeof *maps);
    hl_buf_init(&pk, 64u << 20);
    if (!maps)
        return HL_ERR_NOMEM;
    /* A version too far ahead of our wall clock is neither observed nor
     * applied: the whole changeset waits (in order) until the clock catches up. */
    uint64_t now = hl_now_ms(), ahead = 0;
    for (size_t i = 0; i < cs->nrows; i++)
        if (hl_hlc_ahead(cs->rows[i].hlc, now, d->opt.max_clock_drift_ms) && cs->rows[i].hlc > ahead)
            ahead = cs->rows[i].hlc;
    if (ahead) {
        uint64_t ms = HL_HLC_MS(ahead > HL_HLC_MAX ? HL_HLC_MAX : ahead);
        uint64_t due = ms - (d->opt.max_clock_drift_ms < ms ? d->opt.max_clock_drift_ms : ms) + 1;
        if (!d->ahead_due_ms || due < d->ahead_due_ms)
            d->ahead_due_ms = due;
        snprintf(why, whylen, "row version %llu is %llu ms ahead of the local clock (max_clock_drift %llu ms)",
                 (unsigned long long)ahead, (unsigned long long)(ms - now),
                 (unsigned long long)d->opt.max_clock_drift_ms);
        *res = ONE_AHEAD;
        goto out;
    }
    *res = map_tables(d, cs, maps, why, whylen);
    if (*res != ONE_OK) {
        /* Names unknown although the sender claims our exact schema: the
         * message is lying, refuse it. Otherwise the schemas differ; hold it
         * until ours catches up. */
        if (memcmp(cs->schema_hash, d->schema.hash, HL_SCHEMA_HASH_LEN) == 0)
            *res = ONE_MALFORMED;
        goto out;
    }
    if ((st = apply_order(d, cs, maps, &order)))
        goto out;
    /* Rows of one table are usually adjacent: build its statements when the
     * table changes, not per row. */
    uint32_t prepared = UINT32_MAX;
    for (size_t i = 0; i < cs->nrows && !st; i++) {
        const hl_cs_row *r = &cs->rows[order ? order[i] : i];
        if (r->table != prepared && ((st = prepare_write(d, &maps[r->table], cs->tables[r->table].ncols)) ||
                                     (st = hl_clock_prepare(d, maps[r->table].t))))
            break;
        prepared = r->table;
        tmap *m = &maps[r->table];
        size_t nrc = cs->tables[r->table].ncols, n = m->t->spanned ? append_run(cs, order, i) : 1;
        bool done = false;
        if (n > 1 && ((st = apply_run(d, cs, order, i, n, m, nrc, &pk, &done)) || done)) {
            i += n - 1;
            continue;
        }
        st = apply_row(d, cs, r, m, nrc, &pk);
    }
out:
    for (size_t i = 0; i < cs->ntables; i++)
        free(maps[i].col);
    free(maps);
    free(order);
    hl_buf_free(&pk);
    return st;
}

/* The rows of cs by last-writer-wins, as one changeset's, without its origin's
 * sequence: a snapshot merge's batch (merge.c). */
hl_status hl_apply_rows(hl_db *d, const hl_changeset *cs, char *why, size_t whylen)
{
    one_result r = ONE_OK;
    why[0] = 0;
    hl_status st = apply_one(d, cs, &r, why, whylen);
    if (!st && r != ONE_OK)
        st = HL_ERR_INVALID;
    return st;
}

static void log_refused(const hl_changeset *cs, const char *why)
{
    hl_logf(HL_LOG_ERROR, "malformed changeset refused: origin %llu seq %llu: %s (claims our schema hash)",
            (unsigned long long)cs->origin, (unsigned long long)cs->seq, why);
}

/* Reads held changeset seq of (node, epoch): its flags and decoded form
 * (*cs NULL when it does not decode, why says why, or when its flags have a
 * bit of skip: not decoded); *found false when absent. */
static hl_status pending_get(hl_db *d, uint64_t node, uint64_t epoch, uint64_t seq, int skip, bool *found, int *flags,
                             hl_changeset **cs, char *why, size_t whylen)
{
    sqlite3_stmt *q = NULL;
    *found = false;
    *cs = NULL;
    int rc = sqlite3_prepare_v2(
        d->db, "SELECT flags, data FROM " HL_PREFIX "pending WHERE node = ? AND epoch = ? AND seq = ?", -1, &q, NULL);
    if (rc != SQLITE_OK)
        return hl_db_err(d, rc, "pending read");
    sqlite3_bind_int64(q, 1, (int64_t)node);
    sqlite3_bind_int64(q, 2, (int64_t)epoch);
    sqlite3_bind_int64(q, 3, (int64_t)seq);
    rc = sqlite3_step(q);
    if (rc == SQLITE_ROW) {
        *found = true;
        *flags = sqlite3_column_int(q, 0);
        if (!(*flags & skip) && hl_changeset_decode(sqlite3_column_blob(q, 1), (size_t)sqlite3_column_bytes(q, 1),
                                                    (*flags & HL_PART_FLAG_ZSTD) != 0, d->opt.max_changeset_bytes, cs,
                                                    why, whylen) != HL_OK)
            *cs = NULL;
    }
    sqlite3_finalize(q);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "pending read");
}

typedef enum { CHAIN_INCOMPLETE, CHAIN_HELD, CHAIN_DONE } chain_result;

/*
 * A transaction too big for one changeset arrives as a chain: consecutive
 * sequences, HL_PART_FLAG_MORE on all but the last (protocol.md §1.5). Each
 * member is held in __harmonylite__pending as it arrives (so memory holds one
 * at a time, and the stream position moves on); when the held changesets
 * from first on form a whole chain, they are applied here as one, inside a
 * savepoint: if one of them needs a schema or a clock this node does not
 * have yet, none is applied and the chain stays held.
 */
/* Records why held changeset seq of (node, epoch) waits; for_schema is 1 or 0
 * for whether it waits for the local schema, -1 to leave that as it is. */
static hl_status pending_reason(hl_db *d, uint64_t node, uint64_t epoch, uint64_t seq, int for_schema,
                                const char *reason)
{
    sqlite3_stmt *u = NULL;
    int rc = sqlite3_prepare_v2(d->db,
                                "UPDATE " HL_PREFIX "pending SET schema = iif(?1 < 0, schema, ?1), reason = ?2 "
                                "WHERE node = ?3 AND epoch = ?4 AND seq = ?5",
                                -1, &u, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_int(u, 1, for_schema);
        sqlite3_bind_text(u, 2, reason, -1, SQLITE_STATIC);
        sqlite3_bind_int64(u, 3, (int64_t)node);
        sqlite3_bind_int64(u, 4, (int64_t)epoch);
        sqlite3_bind_int64(u, 5, (int64_t)seq);
        rc = sqlite3_step(u);
    }
    sqlite3_finalize(u);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "pending update");
}

/* The last member of the chain held from first on for (node, epoch): *end
 * receives its sequence, or 0 when the chain is not complete yet. */
static hl_status chain_end(hl_db *d, uint64_t node, uint64_t epoch, uint64_t first, uint64_t *end)
{
    sqlite3_stmt *q = NULL;
    uint64_t expect = first;
    *end = 0;
    int rc = sqlite3_prepare_v2(
        d->db, "SELECT seq, flags FROM " HL_PREFIX "pending WHERE node = ? AND epoch = ? AND seq >= ? ORDER BY seq", -1,
        &q, NULL);
    if (rc != SQLITE_OK)
        return hl_db_err(d, rc, "pending chain");
    sqlite3_bind_int64(q, 1, (int64_t)node);
    sqlite3_bind_int64(q, 2, (int64_t)epoch);
    sqlite3_bind_int64(q, 3, (int64_t)first);
    while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
        if ((uint64_t)sqlite3_column_int64(q, 0) != expect)
            break;
        if (!(sqlite3_column_int(q, 1) & HL_PART_FLAG_MORE)) {
            *end = expect;
            break;
        }
        expect++;
    }
    sqlite3_finalize(q);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "pending chain");
}

/* Applies the held members first..end of a chain inside a savepoint: all of
 * them, or (*r not ONE_OK, *at the member that stopped it, why says why)
 * none, with the counters as they were. */
static hl_status chain_apply(hl_db *d, uint64_t node, uint64_t epoch, uint64_t first, uint64_t end, one_result *r,
                             uint64_t *at, char *why, size_t whylen)
{
    hl_db_stats saved = d->stats;
    hl_status st = hl_db_exec(d, "SAVEPOINT hl_chain");
    *r = ONE_OK;
    for (*at = first; !st && *r == ONE_OK && *at <= end; (*at)++) {
        bool found;
        int flags = 0;
        hl_changeset *cs = NULL;
        if ((st = pending_get(d, node, epoch, *at, 0, &found, &flags, &cs, why, whylen)))
            break;
        if (!cs)
            *r = ONE_MALFORMED;
        else
            st = apply_one(d, cs, r, why, whylen);
        hl_changeset_free(cs);
    }
    (*at)--; /* the member that stopped the chain */
    if (!st && *r == ONE_OK)
        return hl_db_exec(d, "RELEASE hl_chain");
    hl_status rst = hl_db_exec(d, "ROLLBACK TO hl_chain");
    if (!rst)
        rst = hl_db_exec(d, "RELEASE hl_chain");
    d->stats = saved;
    return st ? st : rst;
}

/*
 * A transaction too big for one changeset arrives as a chain: consecutive
 * sequences, HL_PART_FLAG_MORE on all but the last (protocol.md §1.5). Each
 * member is held in __harmonylite__pending as it arrives (so memory holds one
 * at a time, and the stream position moves on); when the held changesets
 * from first on form a whole chain, they are applied here as one, inside a
 * savepoint: if one of them needs a schema or a clock this node does not
 * have yet, none is applied and the chain stays held.
 */
static hl_status apply_chain(hl_db *d, uint64_t node, uint64_t epoch, uint64_t first, uint64_t *last, chain_result *res)
{
    uint64_t end = 0, at = first;
    one_result r = ONE_OK;
    char why[512] = "";
    *res = CHAIN_INCOMPLETE;
    hl_status st = chain_end(d, node, epoch, first, &end);
    if (st || !end)
        return st; /* or its last changeset has not arrived yet */
    if ((st = chain_apply(d, node, epoch, first, end, &r, &at, why, sizeof why)))
        return st;
    if (r == ONE_SCHEMA || r == ONE_AHEAD) {
        char reason[700];
        snprintf(reason, sizeof reason, "changeset %llu of the chain %llu..%llu: %s", (unsigned long long)at,
                 (unsigned long long)first, (unsigned long long)end, why);
        if (r == ONE_AHEAD)
            d->stats.clock_ahead++;
        *res = CHAIN_HELD;
        return pending_reason(d, node, epoch, first, r == ONE_SCHEMA, reason);
    }
    if (r == ONE_MALFORMED) {
        d->stats.changesets_malformed++;
        hl_logf(HL_LOG_ERROR, "malformed chain of changesets %llu..%llu from node %llu refused: changeset %llu: %s",
                (unsigned long long)first, (unsigned long long)end, (unsigned long long)node, (unsigned long long)at,
                why);
    } else {
        d->stats.changesets_applied += end - first + 1;
        d->stats.chains_applied++;
        hl_logf(HL_LOG_INFO, "applied a transaction sent as %llu changesets (%llu..%llu) from node %llu",
                (unsigned long long)(end - first + 1), (unsigned long long)first, (unsigned long long)end,
                (unsigned long long)node);
    }
    if ((st = exec_ints(d, "DELETE FROM " HL_PREFIX "pending WHERE node = ? AND epoch = ? AND seq BETWEEN ? AND ?",
                        "pending delete", 4,
                        (int64_t[]){(int64_t)node, (int64_t)epoch, (int64_t)first, (int64_t)end})) ||
        (st = origin_put(d, node, epoch, end)))
        return st;
    *last = end;
    *res = CHAIN_DONE;
    return HL_OK;
}

/* Applies held changeset cs, seq applied + 1 of (node, epoch), now next in
 * line (NULL: it does not decode). *waits: it needs the local schema or
 * clock, and stays held; otherwise it is applied (or refused as malformed),
 * taken out of pending and the origin's sequence moves on. */
static hl_status drain_one(hl_db *d, uint64_t node, uint64_t epoch, uint64_t applied, const hl_changeset *cs,
                           bool *waits)
{
    one_result r = ONE_MALFORMED;
    char why[512] = "";
    hl_status st;
    *waits = false;
    if (cs && (st = apply_one(d, cs, &r, why, sizeof why)))
        return st;
    if (r == ONE_SCHEMA || r == ONE_AHEAD) {
        /* Now first in line, it waits for our schema (or our clock) rather than for a predecessor. */
        *waits = true;
        return pending_reason(d, node, epoch, applied + 1, r == ONE_SCHEMA ? 1 : -1, why);
    }
    if (r == ONE_MALFORMED) {
        d->stats.changesets_malformed++;
        if (cs)
            log_refused(cs, why);
    } else {
        d->stats.changesets_applied++;
    }
    applied++;
    /* Exactly this one: held late arrivals below it (see apply_late) stay. */
    if ((st = origin_put(d, node, epoch, applied)) ||
        (st = exec_ints(d, "DELETE FROM " HL_PREFIX "pending WHERE node = ? AND epoch = ? AND seq = ?",
                        "pending delete", 3, (int64_t[]){(int64_t)node, (int64_t)epoch, (int64_t)applied})))
        return st;
    hl_logf(HL_LOG_INFO, "held changeset %llu from node %llu applied", (unsigned long long)applied,
            (unsigned long long)node);
    return HL_OK;
}

/* Applies held changesets of (node, epoch) that are next in line. */
static hl_status drain_held(hl_db *d, uint64_t node, uint64_t epoch, uint64_t applied)
{
    for (;;) {
        hl_changeset *cs = NULL;
        bool found = false, waits = false;
        int pflags = 0;
        char err[256] = "";
        hl_status st;
        /* The first of a chain is decoded by apply_chain, with the others. */
        if ((st = pending_get(d, node, epoch, applied + 1, HL_PART_FLAG_MORE, &found, &pflags, &cs, err, sizeof err)))
            return st;
        if (!found)
            return HL_OK;
        if (pflags & HL_PART_FLAG_MORE) {
            chain_result cr;
            if ((st = apply_chain(d, node, epoch, applied + 1, &applied, &cr)))
                return st;
            if (cr != CHAIN_DONE)
                return HL_OK;
            continue;
        }
        st = drain_one(d, node, epoch, applied, cs, &waits);
        hl_changeset_free(cs);
        if (st || waits)
            return st;
        applied++;
    }
}

/* ---- missing predecessors given up on (see hl_apply_expire_held) ---- */

/*
 * When seq of (node, epoch) lies in a range of changesets given up on, takes
 * it out of the range (splitting it) and sets *found: the changeset is late,
 * not a duplicate.
 */
static hl_status missing_take(hl_db *d, uint64_t node, uint64_t epoch, uint64_t seq, bool *found)
{
    sqlite3_stmt *st = NULL;
    int64_t lo = 0, hi = 0, at = 0;
    *found = false;
    int rc = sqlite3_prepare_v2(d->db,
                                "SELECT lo, hi, at_ms FROM " HL_PREFIX "missing WHERE node = ?1 AND epoch = ?2 "
                                "AND lo <= ?3 ORDER BY lo DESC LIMIT 1",
                                -1, &st, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_int64(st, 1, (int64_t)node);
        sqlite3_bind_int64(st, 2, (int64_t)epoch);
        sqlite3_bind_int64(st, 3, (int64_t)seq);
        rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
            lo = sqlite3_column_int64(st, 0);
            hi = sqlite3_column_int64(st, 1);
            at = sqlite3_column_int64(st, 2);
            *found = hi >= (int64_t)seq;
            rc = SQLITE_DONE;
        }
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
        return hl_db_err(d, rc, "missing read");
    if (!*found)
        return HL_OK;
    int64_t s = (int64_t)seq;
    hl_status res = exec_ints(d, "DELETE FROM " HL_PREFIX "missing WHERE node = ? AND epoch = ? AND lo = ?",
                              "missing update", 3, (int64_t[]){(int64_t)node, (int64_t)epoch, lo});
    if (!res && lo < s)
        res = exec_ints(d, "INSERT INTO " HL_PREFIX "missing(node, epoch, lo, hi, at_ms) VALUES (?, ?, ?, ?, ?)",
                        "missing update", 5, (int64_t[]){(int64_t)node, (int64_t)epoch, lo, s - 1, at});
    if (!res && s < hi)
        res = exec_ints(d, "INSERT INTO " HL_PREFIX "missing(node, epoch, lo, hi, at_ms) VALUES (?, ?, ?, ?, ?)",
                        "missing update", 5, (int64_t[]){(int64_t)node, (int64_t)epoch, s + 1, hi, at});
    return res;
}

/*
 * A changeset whose position was given up on arrives after all. Versions make
 * the order of changesets irrelevant to the result (every row keeps the
 * greatest version), so it is applied now; one that needs a schema we do not
 * have yet is held, below its origin's applied sequence, and retried with the
 * other held changesets.
 */
static hl_status apply_late(hl_db *d, const hl_changeset *cs, const void *raw, size_t rawlen, uint8_t flags,
                            hl_apply_result *res)
{
    one_result r;
    char why[512] = "";
    hl_status st = apply_one(d, cs, &r, why, sizeof why);
    if (st)
        return st;
    switch (r) {
    case ONE_SCHEMA:
    case ONE_AHEAD:
        if (r == ONE_AHEAD)
            d->stats.clock_ahead++;
        *res = HL_HELD;
        /* Not bounded: its gap record is gone already, it could not be read again. */
        return store_held(d, cs, raw, rawlen, flags, r == ONE_SCHEMA, why);
    case ONE_MALFORMED:
        d->stats.changesets_malformed++;
        log_refused(cs, why);
        *res = HL_MALFORMED;
        return HL_OK;
    case ONE_OK:
        break;
    }
    d->stats.changesets_applied++;
    d->stats.changesets_late++;
    hl_logf(HL_LOG_INFO, "late changeset %llu from node %llu applied (its position had been given up on)",
            (unsigned long long)cs->seq, (unsigned long long)cs->origin);
    *res = HL_APPLIED;
    return HL_OK;
}

/* After holding cs: applies what is now next in line; cs counts as applied
 * when that included it (it completed a chain). */
static hl_status drain_then_check(hl_db *d, const hl_changeset *cs, uint64_t applied, hl_apply_result *res)
{
    hl_status st = drain_held(d, cs->origin, cs->epoch, applied);
    uint64_t now = 0;
    if (!st && !(st = origin_get(d, cs->origin, cs->epoch, &now)) && now >= cs->seq)
        *res = HL_APPLIED;
    return st;
}

/* hl_apply for the changeset next in line of its origin. */
static hl_status apply_next(hl_db *d, const hl_changeset *cs, const void *raw, size_t rawlen, uint8_t flags,
                            hl_apply_result *res)
{
    one_result r;
    char why[512] = "";
    hl_status st = apply_one(d, cs, &r, why, sizeof why);
    if (st)
        return st;
    switch (r) {
    case ONE_SCHEMA:
        *res = HL_HELD;
        if ((st = hold(d, cs, raw, rawlen, flags, true, why)))
            return st; /* HL_ERR_TOO_LARGE: deferred, logged by the engine */
        hl_logf(HL_LOG_WARN, "changeset %llu from node %llu held until the local schema matches: %s",
                (unsigned long long)cs->seq, (unsigned long long)cs->origin, why);
        return HL_OK;
    case ONE_AHEAD: {
        uint64_t dropped = 0;
        d->stats.clock_ahead++;
        if (hl_ratelimit_allow(&d->clock_ahead_log, &dropped))
            hl_logf(HL_LOG_WARN, "changeset %llu from node %llu held until the local clock catches up: %s%s",
                    (unsigned long long)cs->seq, (unsigned long long)cs->origin, why,
                    dropped ? " (repeats not logged)" : "");
        *res = HL_HELD;
        return hold(d, cs, raw, rawlen, flags, false, why);
    }
    case ONE_MALFORMED:
        d->stats.changesets_malformed++;
        log_refused(cs, why);
        *res = HL_MALFORMED;
        break;
    case ONE_OK:
        d->stats.changesets_applied++;
        *res = HL_APPLIED;
        break;
    }
    if ((st = origin_put(d, cs->origin, cs->epoch, cs->seq)))
        return st;
    return drain_held(d, cs->origin, cs->epoch, cs->seq);
}

static hl_status apply_inner(hl_db *d, const hl_changeset *cs, const void *raw, size_t rawlen, uint8_t flags,
                             hl_apply_result *res)
{
    hl_status st;
    uint64_t applied;
    char why[512] = "";
    *res = HL_DUPLICATE;
    if (cs->origin == d->node_id && cs->epoch == d->epoch)
        return HL_OK;
    if (cs->origin > INT64_MAX || cs->epoch > INT64_MAX || cs->seq == 0 || cs->seq > INT64_MAX) {
        /* Stored as SQLite integers: a value above INT64_MAX would wrap. */
        d->stats.changesets_malformed++;
        log_refused(cs, "origin, epoch or sequence out of range");
        *res = HL_MALFORMED;
        return HL_OK;
    }
    if ((st = origin_get(d, cs->origin, cs->epoch, &applied)))
        return st;
    if (cs->seq <= applied) {
        bool late = false;
        if ((st = missing_take(d, cs->origin, cs->epoch, cs->seq, &late)))
            return st;
        if (late)
            return apply_late(d, cs, raw, rawlen, flags, res);
        d->stats.changesets_duplicate++;
        return HL_OK;
    }
    if (cs->seq > applied + 1) {
        /* An earlier changeset of this origin has not arrived (reordered
         * publish after a failure) or is itself held: keep order per origin. */
        snprintf(why, sizeof why, "waiting for changeset %llu of this origin", (unsigned long long)(applied + 1));
        *res = HL_HELD;
        if ((st = hold(d, cs, raw, rawlen, flags, false, why)))
            return st;
        hl_logf(HL_LOG_INFO, "changeset %llu from node %llu held: %s", (unsigned long long)cs->seq,
                (unsigned long long)cs->origin, why);
        /* The end of a chain whose first changeset is held completes it. */
        return drain_then_check(d, cs, applied, res);
    }
    if (flags & HL_PART_FLAG_MORE) {
        /* The first of a chain: held until the chain's last changeset arrives. */
        snprintf(why, sizeof why, "first of a transaction sent as a chain of changesets: waits for the chain's end");
        *res = HL_HELD;
        if ((st = hold(d, cs, raw, rawlen, flags, false, why)))
            return st;
        return drain_then_check(d, cs, applied, res);
    }
    return apply_next(d, cs, raw, rawlen, flags, res);
}

hl_status hl_apply(hl_db *d, const hl_changeset *cs, const void *raw, size_t rawlen, uint8_t flags,
                   hl_apply_result *res)
{
    d->held_full = false;
    hl_status st = apply_inner(d, cs, raw, rawlen, flags, res);
    if (st == HL_ERR_TOO_LARGE && d->held_full) {
        /* Nothing was written for it: every path stores before anything else. */
        d->held_full = false;
        d->stats.changesets_deferred++;
        *res = HL_DEFERRED;
        return HL_OK;
    }
    return st;
}

/* Retries held late arrivals (below their origin's applied sequence). */
static hl_status retry_late(hl_db *d)
{
    sqlite3_stmt *q = NULL;
    hl_status st = HL_OK;
    int rc = sqlite3_prepare_v2(d->db,
                                "SELECT p.id, p.flags, p.data FROM " HL_PREFIX "pending p JOIN " HL_PREFIX
                                "origins o ON o.node = p.node AND o.epoch = p.epoch WHERE p.seq <= o.seq",
                                -1, &q, NULL);
    if (rc != SQLITE_OK)
        return hl_db_err(d, rc, "pending scan");
    int64_t *done = NULL;
    size_t ndone = 0;
    while (!st && (rc = sqlite3_step(q)) == SQLITE_ROW) {
        hl_changeset *cs = NULL;
        char err[256] = "", why[512] = "";
        one_result r = ONE_MALFORMED;
        if (hl_changeset_decode(sqlite3_column_blob(q, 2), (size_t)sqlite3_column_bytes(q, 2),
                                (sqlite3_column_int(q, 1) & HL_PART_FLAG_ZSTD) != 0, d->opt.max_changeset_bytes, &cs,
                                err, sizeof err) == HL_OK)
            st = apply_one(d, cs, &r, why, sizeof why);
        if (!st && r != ONE_SCHEMA && r != ONE_AHEAD) {
            int64_t *nd = realloc(done, (ndone + 1) * sizeof *nd);
            if (!nd) {
                st = HL_ERR_NOMEM;
            } else {
                done = nd;
                done[ndone++] = sqlite3_column_int64(q, 0);
                if (r == ONE_OK) {
                    d->stats.changesets_applied++;
                    d->stats.changesets_late++;
                } else {
                    d->stats.changesets_malformed++;
                }
            }
        }
        hl_changeset_free(cs);
    }
    sqlite3_finalize(q);
    if (!st && rc != SQLITE_DONE && rc != SQLITE_ROW)
        st = hl_db_err(d, rc, "pending scan");
    for (size_t i = 0; i < ndone && !st; i++)
        st = exec_ints(d, "DELETE FROM " HL_PREFIX "pending WHERE id = ?", "pending delete", 1, &done[i]);
    free(done);
    return st;
}

hl_status hl_apply_retry_held(hl_db *d)
{
    sqlite3_stmt *q = NULL;
    hl_status st = HL_OK;
    d->ahead_due_ms = 0; /* set again by any changeset still ahead */
    /* The lowest held changeset of each origin; drain_held applies it when it
     * is next in line. */
    int rc =
        sqlite3_prepare_v2(d->db,
                           "SELECT p.node, p.epoch, coalesce(o.seq, 0) FROM " HL_PREFIX "pending p LEFT JOIN " HL_PREFIX
                           "origins o ON o.node = p.node AND o.epoch = p.epoch GROUP BY p.node, p.epoch",
                           -1, &q, NULL);
    if (rc != SQLITE_OK)
        return hl_db_err(d, rc, "pending scan");
    typedef struct {
        uint64_t node, epoch, applied;
    } ent;
    ent *v = NULL;
    size_t n = 0, cap = 0;
    while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
        if (n == cap) {
            cap = cap ? cap * 2 : 8;
            ent *nv = realloc(v, cap * sizeof *nv);
            if (!nv) {
                st = HL_ERR_NOMEM;
                break;
            }
            v = nv;
        }
        v[n].node = (uint64_t)sqlite3_column_int64(q, 0);
        v[n].epoch = (uint64_t)sqlite3_column_int64(q, 1);
        v[n].applied = (uint64_t)sqlite3_column_int64(q, 2);
        n++;
    }
    sqlite3_finalize(q);
    for (size_t i = 0; i < n && !st; i++)
        st = drain_held(d, v[i].node, v[i].epoch, v[i].applied);
    free(v);
    return st ? st : retry_late(d);
}

/*
 * Gives up waiting for missing predecessors. For every origin whose first held
 * changeset is an out-of-order hold (its predecessor is neither applied nor
 * held) that has waited since before older_than_ms, the missing sequences are
 * recorded in __harmonylite__missing, the origin's applied sequence moves to
 * just before the held one, and the held changesets are applied in order (up
 * to a schema hold, which stays). A missing changeset that arrives later is
 * still applied (apply_late). Runs inside the apply transaction.
 */
/* Origins whose first held changeset waits for a predecessor that is neither
 * applied nor held, since before ?1: (node, epoch, applied, first held). */
static const char expire_sql[] = "SELECT p.node, p.epoch, coalesce(o.seq, 0) AS a, min(p.seq) AS l FROM " HL_PREFIX
                                 "pending p LEFT JOIN " HL_PREFIX "origins o ON o.node = p.node AND o.epoch = p.epoch "
                                 "WHERE p.seq > coalesce(o.seq, 0) GROUP BY p.node, p.epoch "
                                 "HAVING l > a + 1 AND min(p.at_ms) <= ?1";

bool hl_apply_held_due(hl_db *d, uint64_t older_than_ms)
{
    sqlite3_stmt *q = NULL;
    bool due = false;
    if (sqlite3_prepare_v2(d->db, expire_sql, -1, &q, NULL) == SQLITE_OK) {
        sqlite3_bind_int64(q, 1, (int64_t)older_than_ms);
        due = sqlite3_step(q) == SQLITE_ROW;
    }
    sqlite3_finalize(q);
    return due;
}

hl_status hl_apply_expire_held(hl_db *d, uint64_t older_than_ms, uint64_t *gaps)
{
    sqlite3_stmt *q = NULL;
    hl_status st = HL_OK;
    int rc = sqlite3_prepare_v2(d->db, expire_sql, -1, &q, NULL);
    if (rc != SQLITE_OK)
        return hl_db_err(d, rc, "pending scan");
    sqlite3_bind_int64(q, 1, (int64_t)older_than_ms);
    typedef struct {
        int64_t node, epoch, a, l;
    } ent;
    ent *v = NULL;
    size_t n = 0;
    while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
        ent *nv = realloc(v, (n + 1) * sizeof *nv);
        if (!nv) {
            st = HL_ERR_NOMEM;
            break;
        }
        v = nv;
        v[n++] = (ent){sqlite3_column_int64(q, 0), sqlite3_column_int64(q, 1), sqlite3_column_int64(q, 2),
                       sqlite3_column_int64(q, 3)};
    }
    sqlite3_finalize(q);
    if (!st && rc != SQLITE_DONE)
        st = hl_db_err(d, rc, "pending scan");
    for (size_t i = 0; i < n && !st; i++) {
        ent *e = &v[i];
        hl_logf(HL_LOG_WARN,
                "node %lld: changesets %lld to %lld never arrived; gave up waiting and applied the ones held after "
                "them (any of them that arrives later is still applied)",
                (long long)e->node, (long long)e->a + 1, (long long)e->l - 1);
        if ((st = exec_ints(
                 d, "INSERT OR REPLACE INTO " HL_PREFIX "missing(node, epoch, lo, hi, at_ms) VALUES (?, ?, ?, ?, ?)",
                 "missing put", 5, (int64_t[]){e->node, e->epoch, e->a + 1, e->l - 1, (int64_t)hl_now_ms()})) ||
            (st = origin_put(d, (uint64_t)e->node, (uint64_t)e->epoch, (uint64_t)e->l - 1)) ||
            (st = drain_held(d, (uint64_t)e->node, (uint64_t)e->epoch, (uint64_t)e->l - 1)))
            break;
        d->stats.order_gaps++;
        if (gaps)
            (*gaps)++;
    }
    free(v);
    return st;
}

/* Forgets ranges of missing changesets given up on before older_than_ms. */
hl_status hl_db_missing_gc(hl_db *d, uint64_t older_than_ms)
{
    return exec_ints(d, "DELETE FROM " HL_PREFIX "missing WHERE at_ms < ?", "missing gc", 1,
                     (int64_t[]){(int64_t)older_than_ms});
}

hl_status hl_db_drop_held(hl_db *d, uint64_t node, uint64_t *dropped)
{
    *dropped = 0;
    if (node > INT64_MAX)
        return HL_ERR_INVALID;
    int64_t n = (int64_t)node;
    hl_status st = hl_db_begin(d);
    if (st)
        return st;
    /* Each epoch's applied sequence moves past everything dropped, so the
     * origin's next changesets apply instead of waiting for these. */
    if ((st =
             exec_ints(d,
                       "INSERT INTO " HL_PREFIX "origins(node, epoch, seq) SELECT node, epoch, max(seq) FROM " HL_PREFIX
                       "pending WHERE node = ?1 GROUP BY epoch ON CONFLICT(node, epoch) DO UPDATE SET "
                       "seq = max(seq, excluded.seq)",
                       "drop held", 1, &n)) ||
        (st = exec_ints(d, "DELETE FROM " HL_PREFIX "pending WHERE node = ?", "drop held", 1, &n))) {
        hl_db_rollback(d);
        return st;
    }
    uint64_t changes = (uint64_t)sqlite3_changes(d->db);
    if ((st = hl_db_commit(d)))
        return st;
    *dropped = changes;
    return HL_OK;
}

void hl_held_list_free(hl_held_origin *v)
{
    free(v);
}

hl_status hl_db_held_bytes(hl_db *d, uint64_t *bounded)
{
    sqlite3_stmt *q = NULL;
    *bounded = 0;
    int rc = sqlite3_prepare_v2(d->db,
                                "SELECT coalesce(sum(length(data)), 0) FROM " HL_PREFIX "pending WHERE node IN "
                                "(SELECT node FROM " HL_PREFIX "pending WHERE schema = 1)",
                                -1, &q, NULL);
    if (rc == SQLITE_OK && (rc = sqlite3_step(q)) == SQLITE_ROW) {
        *bounded = (uint64_t)sqlite3_column_int64(q, 0);
        rc = SQLITE_DONE;
    }
    sqlite3_finalize(q);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "held bytes");
}

hl_status hl_db_held_list(hl_db *d, hl_held_origin **out, size_t *n)
{
    sqlite3_stmt *q = NULL;
    hl_status st = HL_OK;
    *out = NULL;
    *n = 0;
    /* Per origin: what is held, and why the first one in line waits. */
    int rc = sqlite3_prepare_v2(
        d->db,
        "SELECT p.node, p.epoch, count(*), sum(p.schema), min(p.seq), min(p.at_ms), coalesce(o.seq, 0), "
        "(SELECT reason FROM " HL_PREFIX
        "pending r WHERE r.node = p.node AND r.epoch = p.epoch ORDER BY r.seq LIMIT 1), sum(length(p.data)) "
        "FROM " HL_PREFIX "pending p LEFT JOIN " HL_PREFIX "origins o ON o.node = p.node AND o.epoch = p.epoch "
        "GROUP BY p.node, p.epoch ORDER BY p.node, p.epoch LIMIT 64",
        -1, &q, NULL);
    if (rc != SQLITE_OK)
        return hl_db_err(d, rc, "pending list");
    while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
        hl_held_origin *nv = realloc(*out, (*n + 1) * sizeof *nv);
        if (!nv) {
            st = HL_ERR_NOMEM;
            break;
        }
        *out = nv;
        hl_held_origin *h = &nv[(*n)++];
        memset(h, 0, sizeof *h);
        h->node = (uint64_t)sqlite3_column_int64(q, 0);
        h->epoch = (uint64_t)sqlite3_column_int64(q, 1);
        h->count = (uint64_t)sqlite3_column_int64(q, 2);
        h->for_schema = (uint64_t)sqlite3_column_int64(q, 3);
        h->first_seq = (uint64_t)sqlite3_column_int64(q, 4);
        h->since_ms = (uint64_t)sqlite3_column_int64(q, 5);
        h->applied = (uint64_t)sqlite3_column_int64(q, 6);
        const unsigned char *r = sqlite3_column_text(q, 7);
        snprintf(h->reason, sizeof h->reason, "%s", r ? (const char *)r : "");
        h->bytes = (uint64_t)sqlite3_column_int64(q, 8);
    }
    sqlite3_finalize(q);
    if (!st && rc != SQLITE_DONE)
        st = hl_db_err(d, rc, "pending list");
    if (st) {
        free(*out);
        *out = NULL;
        *n = 0;
    }
    return st;
}
