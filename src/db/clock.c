/*
 * clock.c - row versions, and the SQL helpers capture and apply share.
 *
 * Every replicated table has a clock table, __harmonylite__<table>_clock,
 * keyed by the row's key values: (hlc, node, deleted) of the version the row
 * holds now. Capture records the versions it gives local writes
 * (hl_clock_put); apply writes a remote version only when it beats the stored
 * one (st_clock_win, in one statement with the check). The helpers below bind
 * and read hl_values and build the key parts of the SQL both sides write.
 */
#include <stdio.h>

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
    hl_buf_adds(q, "hlc, node, deleted) VALUES (");
    for (size_t i = 0; i < nk + 3; i++)
        hl_buf_addf(q, "%s?%zu", i ? ", " : "", i + 1);
    hl_buf_adds(q, ") ON CONFLICT(");
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
