/*
 * clock.c - row versions, and the SQL helpers capture and apply share.
 *
 * Every replicated table has a clock table, __harmonylite__<table>_clock,
 * keyed by the row's key values: (hlc, node, deleted) of the version the row
 * holds now. Capture records the versions it gives local writes
 * (hl_clock_put); apply writes a remote version only when it beats the stored
 * one (st_clock_win, in one statement with the check). The helpers below bind
 * and read hl_values and build the key parts of the SQL both sides write.
 *
 * Spans. A table keyed by an INTEGER PRIMARY KEY alias (t->spanned) also has
 * __harmonylite__<table>_span(lo, hi, hlc, node): every row with a key in
 * [lo, hi] that has no clock row has version (hlc, node), live. Capture gives
 * a run of consecutive appended rows (inserted above the high-water mark,
 * not changed since) one version and records it as one span instead of a
 * clock row per row (a run of one row keeps its clock row, capture.c): under the application's write lock an append
 * then costs its share of one row, not a B-tree insert per row (docs/performance.md, (a)). Invariants: spans do not
 * overlap; a clock row inside a span is newer than the span (hl_span_put clears the clock rows of its range, and every
 * later version of a row in it is a clock row: capture's from the log, apply's
 * only when it beats the span). The version of a row is therefore its clock
 * row, else its span, else none.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "db/db_int.h"

/* Reads a column as an hl_value pointing into SQLite's memory (valid until the next step). */
void hl_value_from_column(sqlite3_stmt *st, int col, hl_value *v)
{
    switch (sqlite3_column_type(st, col)) {
    case SQLITE_INTEGER:
        v->type = HL_VAL_INT;
        v->u.i = sqlite3_column_int64(st, col);
        break;
    case SQLITE_FLOAT:
        v->type = HL_VAL_REAL;
        v->u.r = sqlite3_column_double(st, col);
        break;
    case SQLITE_TEXT:
        v->type = HL_VAL_TEXT;
        v->u.b.p = (unsigned char *)sqlite3_column_text(st, col);
        v->u.b.n = (size_t)sqlite3_column_bytes(st, col);
        break;
    case SQLITE_BLOB:
        v->type = HL_VAL_BLOB;
        v->u.b.p = (unsigned char *)sqlite3_column_blob(st, col);
        v->u.b.n = (size_t)sqlite3_column_bytes(st, col);
        break;
    default:
        v->type = HL_VAL_NULL;
        break;
    }
}

/* Binds v as parameter idx. Text and blobs are bound without a copy. */
int hl_bind_value(sqlite3_stmt *st, int idx, const hl_value *v)
{
    switch (v->type) {
    case HL_VAL_INT:
        return sqlite3_bind_int64(st, idx, v->u.i);
    case HL_VAL_REAL:
        return sqlite3_bind_double(st, idx, v->u.r);
    case HL_VAL_TEXT:
        return sqlite3_bind_text64(st, idx, (const char *)v->u.b.p, v->u.b.n, SQLITE_STATIC, SQLITE_UTF8);
    case HL_VAL_BLOB:
        return sqlite3_bind_blob64(st, idx, v->u.b.p, v->u.b.n, SQLITE_STATIC);
    default:
        return sqlite3_bind_null(st, idx);
    }
}

hl_status hl_stmt_prepare(hl_db *d, sqlite3_stmt **st, const hl_buf *sql)
{
    if (*st)
        return HL_OK;
    hl_status res = hl_buf_status(sql);
    if (res)
        return res; /* never prepare a statement that was cut short */
    int rc = sqlite3_prepare_v3(d->db, hl_buf_str(sql), -1, SQLITE_PREPARE_PERSISTENT, st, NULL);
    return rc == SQLITE_OK ? HL_OK : hl_db_err(d, rc, hl_buf_str(sql));
}

/* Appends "k = ? AND ..." for t's key (rowid or key columns). */
hl_status hl_add_key_where(hl_buf *b, const hl_table *t, int first_param)
{
    if (t->npk == 0)
        return hl_buf_addf(b, "%s = ?%d", t->rowid, first_param);
    for (size_t i = 0; i < t->npk; i++) {
        if (i)
            hl_buf_adds(b, " AND ");
        hl_buf_add_ident(b, t->cols[t->pk[i]]);
        hl_buf_addf(b, " = ?%d", first_param + (int)i);
    }
    return hl_buf_status(b);
}

hl_status hl_add_rowid(hl_buf *b, const hl_table *t)
{
    return t->npk ? hl_buf_add_ident(b, t->cols[t->pk[0]]) : hl_buf_adds(b, t->rowid);
}

/* Appends the clock UPSERT for t; win adds the last-writer-wins condition. */
static hl_status clock_sql(const hl_table *t, bool win, hl_buf *q)
{
    size_t nk = t->npk ? t->npk : 1;
    hl_buf_adds(q, "INSERT INTO ");
    hl_buf_add_ident(q, t->clock);
    hl_buf_adds(q, "(");
    for (size_t i = 0; i < nk; i++)
        hl_buf_addf(q, "k%zu, ", i);
    if (win && t->spanned) {
        /* No clock row: the row's span, if any, must lose too. */
        hl_buf_adds(q, "hlc, node, deleted) SELECT ?1, ?2, ?3, ?4 WHERE NOT EXISTS (SELECT 1 FROM (SELECT hi, hlc, "
                       "node FROM ");
        hl_buf_add_ident(q, t->span);
        hl_buf_adds(q, " WHERE lo <= ?1 ORDER BY lo DESC LIMIT 1) AS s WHERE s.hi >= ?1 AND (s.hlc > ?2 OR "
                       "(s.hlc = ?2 AND s.node >= ?3)))");
    } else {
        hl_buf_adds(q, "hlc, node, deleted) VALUES (");
        for (size_t i = 0; i < nk + 3; i++)
            hl_buf_addf(q, "%s?%zu", i ? ", " : "", i + 1);
        hl_buf_adds(q, ")");
    }
    hl_buf_adds(q, " ON CONFLICT(");
    for (size_t i = 0; i < nk; i++)
        hl_buf_addf(q, "%sk%zu", i ? ", " : "", i);
    hl_buf_adds(q, ") DO UPDATE SET hlc = excluded.hlc, node = excluded.node, deleted = excluded.deleted");
    if (win)
        hl_buf_adds(q, " WHERE excluded.hlc > hlc OR (excluded.hlc = hlc AND excluded.node > node)");
    return hl_buf_status(q);
}

hl_status hl_clock_prepare(hl_db *d, hl_table *t)
{
    hl_buf q;
    hl_status st = HL_OK;
    hl_buf_init(&q, 64u << 20);
    if (!t->st_clock_win) {
        clock_sql(t, true, &q);
        st = hl_stmt_prepare(d, &t->st_clock_win, &q);
    }
    if (!st && !t->st_clock_put) {
        hl_buf_reset(&q);
        clock_sql(t, false, &q);
        st = hl_stmt_prepare(d, &t->st_clock_put, &q);
    }
    hl_buf_free(&q);
    return st;
}

hl_status hl_clock_put(hl_db *d, hl_table *t, const hl_value *key, size_t nkey, uint64_t hlc, uint64_t node,
                       bool deleted)
{
    hl_status res = hl_clock_prepare(d, t);
    if (res)
        return res;
    sqlite3_stmt *st = t->st_clock_put;
    for (size_t i = 0; i < nkey; i++)
        hl_bind_value(st, (int)i + 1, &key[i]);
    sqlite3_bind_int64(st, (int)nkey + 1, (int64_t)hlc);
    sqlite3_bind_int64(st, (int)nkey + 2, (int64_t)node);
    sqlite3_bind_int(st, (int)nkey + 3, deleted ? 1 : 0);
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "clock put");
}

hl_status hl_span_version_sql(hl_buf *q, const hl_table *t, const char *key, const char *col)
{
    hl_buf_addf(q, "(SELECT CASE WHEN s.hi >= %s THEN s.%s END FROM ", key, col);
    hl_buf_add_ident(q, t->span);
    return hl_buf_addf(q, " AS s WHERE s.lo <= %s ORDER BY s.lo DESC LIMIT 1)", key);
}

/* Prepares "<head><span><tail>" into *st if needed. */
static hl_status span_stmt(hl_db *d, const hl_table *t, sqlite3_stmt **st, const char *head, const char *name,
                           const char *tail)
{
    if (*st)
        return HL_OK;
    hl_buf q;
    hl_buf_init(&q, 1u << 20);
    hl_buf_adds(&q, head);
    hl_buf_add_ident(&q, name ? name : t->span);
    hl_buf_adds(&q, tail);
    hl_status res = hl_stmt_prepare(d, st, &q);
    hl_buf_free(&q);
    return res;
}

static hl_status span_insert(hl_db *d, hl_table *t, int64_t lo, int64_t hi, int64_t hlc, int64_t node)
{
    sqlite3_stmt *st = t->st_span_ins;
    sqlite3_bind_int64(st, 1, lo);
    sqlite3_bind_int64(st, 2, hi);
    sqlite3_bind_int64(st, 3, hlc);
    sqlite3_bind_int64(st, 4, node);
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "span put");
}

static hl_status span_run(hl_db *d, sqlite3_stmt *st, const char *what)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, what);
}

typedef struct span_row {
    int64_t lo, hi, hlc, node;
} span_row;

/* Appends the spans st reads (lo, hi, hlc, node) that reach lo to *cut, and resets st. */
static hl_status span_overlaps(hl_db *d, sqlite3_stmt *st, int64_t lo, span_row **cut, size_t *ncut)
{
    int rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (sqlite3_column_int64(st, 1) < lo)
            continue;
        span_row *n = realloc(*cut, (*ncut + 1) * sizeof *n);
        if (!n) {
            rc = SQLITE_NOMEM;
            break;
        }
        *cut = n;
        n[(*ncut)++] = (span_row){sqlite3_column_int64(st, 0), sqlite3_column_int64(st, 1), sqlite3_column_int64(st, 2),
                                  sqlite3_column_int64(st, 3)};
    }
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "span read");
}

static hl_status span_prepare(hl_db *d, hl_table *t)
{
    hl_status res;
    if (!t->spanned)
        return HL_ERR_INTERNAL;
    if ((res = span_stmt(d, t, &t->st_span_clear, "DELETE FROM ", t->clock, " WHERE k0 BETWEEN ?1 AND ?2")) ||
        (res =
             span_stmt(d, t, &t->st_span_clocked, "SELECT 1 FROM ", t->clock, " WHERE k0 BETWEEN ?1 AND ?2 LIMIT 1")) ||
        (res = span_stmt(d, t, &t->st_span_prev, "SELECT lo, hi, hlc, node FROM ", NULL,
                         " WHERE lo < ?1 ORDER BY lo DESC LIMIT 1")) ||
        (res = span_stmt(d, t, &t->st_span_within, "SELECT lo, hi, hlc, node FROM ", NULL,
                         " WHERE lo BETWEEN ?1 AND ?2 ORDER BY lo")) ||
        (res = span_stmt(d, t, &t->st_span_del, "DELETE FROM ", NULL, " WHERE lo = ?1")) ||
        (res = span_stmt(d, t, &t->st_span_ins, "INSERT INTO ", NULL, "(lo, hi, hlc, node) VALUES (?1, ?2, ?3, ?4)")))
        return res;
    return HL_OK;
}

hl_status hl_span_unversioned(hl_db *d, hl_table *t, int64_t lo, int64_t hi, bool *none)
{
    hl_status res;
    *none = false;
    if (lo > hi || hi == INT64_MAX)
        return HL_OK; /* no "hi + 1" to read the spans below */
    if ((res = span_prepare(d, t)))
        return res;
    sqlite3_bind_int64(t->st_span_clocked, 1, lo);
    sqlite3_bind_int64(t->st_span_clocked, 2, hi);
    int rc = sqlite3_step(t->st_span_clocked);
    sqlite3_reset(t->st_span_clocked);
    if (rc != SQLITE_DONE)
        return rc == SQLITE_ROW ? HL_OK : hl_db_err(d, rc, "clock read");
    /* Spans do not overlap, so if any reaches into [lo, hi], the one
     * starting last at or before hi does. */
    sqlite3_bind_int64(t->st_span_prev, 1, hi + 1);
    rc = sqlite3_step(t->st_span_prev);
    bool spanned = rc == SQLITE_ROW && sqlite3_column_int64(t->st_span_prev, 1) >= lo;
    sqlite3_reset(t->st_span_prev);
    if (rc != SQLITE_ROW && rc != SQLITE_DONE)
        return hl_db_err(d, rc, "span read");
    *none = !spanned;
    return HL_OK;
}

hl_status hl_span_put(hl_db *d, hl_table *t, int64_t lo, int64_t hi, uint64_t hlc, uint64_t node)
{
    hl_status res;
    if (!t->spanned || lo > hi)
        return HL_ERR_INTERNAL;
    if ((res = span_prepare(d, t)))
        return res;
    /* Versions older than this one (a tombstone of a rowid used again). */
    sqlite3_bind_int64(t->st_span_clear, 1, lo);
    sqlite3_bind_int64(t->st_span_clear, 2, hi);
    if ((res = span_run(d, t->st_span_clear, "span clear")))
        return res;
    /* Spans that overlap [lo, hi] (only after the high-water mark came down
     * over rows deleted since): cut to what lies outside it. Rare and few:
     * the one starting before lo, if it reaches lo, and those starting in it. */
    span_row *cut = NULL;
    size_t ncut = 0;
    sqlite3_bind_int64(t->st_span_prev, 1, lo);
    sqlite3_bind_int64(t->st_span_within, 1, lo);
    sqlite3_bind_int64(t->st_span_within, 2, hi);
    if (!(res = span_overlaps(d, t->st_span_prev, lo, &cut, &ncut)))
        res = span_overlaps(d, t->st_span_within, lo, &cut, &ncut);
    for (size_t i = 0; i < ncut && !res; i++) {
        span_row c = cut[i];
        sqlite3_bind_int64(t->st_span_del, 1, c.lo);
        if ((res = span_run(d, t->st_span_del, "span cut")))
            break;
        if (c.lo < lo)
            res = span_insert(d, t, c.lo, lo - 1, c.hlc, c.node);
        if (!res && c.hi > hi)
            res = span_insert(d, t, hi + 1, c.hi, c.hlc, c.node);
    }
    free(cut);
    return res ? res : span_insert(d, t, lo, hi, (int64_t)hlc, (int64_t)node);
}
