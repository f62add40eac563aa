/*
 * capture.c - where a changeset is born.
 *
 * hl_capture_collect reads inside a transaction, a WAL snapshot: every
 * change-log row it sees belongs to an application transaction that has
 * committed in full, so a changeset never splits an application transaction.
 * One query per table coalesces the log by key and joins each key to the row
 * as it is now. hl_capture_record then writes, in a write transaction.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/hlc.h"
#include "common/log.h"
#include "db/db.h"

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

static hl_status prepare(hl_db *d, sqlite3_stmt **st, const hl_buf *sql)
{
    if (*st)
        return HL_OK;
    int rc = sqlite3_prepare_v3(d->db, hl_buf_str(sql), -1, SQLITE_PREPARE_PERSISTENT, st, NULL);
    return rc == SQLITE_OK ? HL_OK : hl_db_err(d, rc, hl_buf_str(sql));
}

/* Appends "k = ? AND ..." for t's key (rowid or key columns). */
hl_status hl_add_key_where(hl_buf *b, const hl_table *t, int first_param)
{
    hl_status st = HL_OK;
    if (t->npk == 0)
        return hl_buf_addf(b, "%s = ?%d", t->rowid, first_param);
    for (size_t i = 0; i < t->npk && !st; i++) {
        if (i)
            st = hl_buf_adds(b, " AND ");
        if (!st)
            st = hl_buf_add_ident(b, t->cols[t->pk[i]]);
        if (!st)
            st = hl_buf_addf(b, " = ?%d", first_param + (int)i);
    }
    return st;
}

hl_status hl_add_rowid(hl_buf *b, const hl_table *t)
{
    return t->npk ? hl_buf_add_ident(b, t->cols[t->pk[0]]) : hl_buf_adds(b, t->rowid);
}

/* Rows above a rowid: "SELECT rowid, cols ... WHERE rowid > ?1", or for
 * keys_only the rowids up to a bound: "SELECT rowid ... AND rowid <= ?2". */
static hl_status range_sql(hl_buf *q, const hl_table *t, bool keys_only)
{
    hl_status st = hl_buf_adds(q, "SELECT ");
    if (!st)
        st = hl_add_rowid(q, t);
    for (size_t i = 0; !keys_only && i < t->ncols && !st; i++) {
        st = hl_buf_adds(q, ", ");
        if (!st)
            st = hl_buf_add_ident(q, t->cols[i]);
    }
    if (!st)
        st = hl_buf_adds(q, " FROM ");
    if (!st)
        st = hl_buf_add_ident(q, t->name);
    if (!st)
        st = hl_buf_adds(q, " WHERE ");
    if (!st)
        st = hl_add_rowid(q, t);
    if (!st)
        st = hl_buf_adds(q, " > ?1");
    if (!st && keys_only) {
        st = hl_buf_adds(q, " AND ");
        if (!st)
            st = hl_add_rowid(q, t);
        if (!st)
            st = hl_buf_adds(q, " <= ?2");
    }
    return st ? st : hl_buf_adds(q, " ORDER BY 1");
}

static hl_status prepare_table(hl_db *d, hl_table *t)
{
    hl_buf q;
    hl_status st = HL_OK;
    size_t nk = t->npk ? t->npk : 1;
    hl_buf_init(&q, 64u << 20);
    if (!t->st_log_read) {
        /* One entry per logged row: the last write time and log position,
         * joined to the row as it is now (no row: it was deleted). */
        st = hl_buf_adds(&q, "SELECT g.jd, g.seq");
        for (size_t i = 0; i < nk && !st; i++)
            st = hl_buf_addf(&q, ", g.k%zu", i);
        if (!st)
            st = hl_buf_adds(&q, ", r.");
        if (!st)
            st = t->npk ? hl_buf_add_ident(&q, t->cols[t->pk[0]]) : hl_buf_adds(&q, t->rowid);
        if (!st)
            st = hl_buf_adds(&q, " IS NOT NULL");
        for (size_t i = 0; i < t->ncols && !st; i++) {
            st = hl_buf_adds(&q, ", r.");
            if (!st)
                st = hl_buf_add_ident(&q, t->cols[i]);
        }
        if (!st)
            st = hl_buf_adds(&q, " FROM (SELECT max(jd) AS jd, max(seq) AS seq");
        for (size_t i = 0; i < nk && !st; i++)
            st = hl_buf_addf(&q, ", k%zu", i);
        if (!st)
            st = hl_buf_adds(&q, " FROM ");
        if (!st)
            st = hl_buf_add_ident(&q, t->log);
        if (!st)
            st = hl_buf_adds(&q, " GROUP BY ");
        for (size_t i = 0; i < nk && !st; i++)
            st = hl_buf_addf(&q, "%sk%zu", i ? ", " : "", i);
        if (!st)
            st = hl_buf_adds(&q, ") AS g LEFT JOIN ");
        if (!st)
            st = hl_buf_add_ident(&q, t->name);
        if (!st)
            st = hl_buf_adds(&q, " AS r ON ");
        for (size_t i = 0; i < nk && !st; i++) {
            st = hl_buf_adds(&q, i ? " AND r." : "r.");
            if (!st)
                st = t->npk ? hl_buf_add_ident(&q, t->cols[t->pk[i]]) : hl_buf_adds(&q, t->rowid);
            if (!st)
                st = hl_buf_addf(&q, " = g.k%zu", i);
        }
        if (!st)
            st = hl_buf_adds(&q, " ORDER BY g.seq");
        if (!st)
            st = prepare(d, &t->st_log_read, &q);
    }
    if (!st && t->int_key && !t->st_range) {
        hl_buf_reset(&q);
        if (!(st = range_sql(&q, t, false)))
            st = prepare(d, &t->st_range, &q);
        hl_buf_reset(&q);
        if (!st && !(st = range_sql(&q, t, true)))
            st = prepare(d, &t->st_range_keys, &q);
        hl_buf_reset(&q);
        if (!st)
            st = hl_buf_adds(&q, "INSERT INTO ");
        if (!st)
            st = hl_buf_add_ident(&q, t->log);
        if (!st)
            st = hl_buf_adds(&q, "(jd, k0) VALUES (julianday('now'), ?1)");
        if (!st)
            st = prepare(d, &t->st_log_add, &q);
    }
    if (!st && !t->st_log_del) {
        hl_buf_reset(&q);
        st = hl_buf_adds(&q, "DELETE FROM ");
        if (!st)
            st = hl_buf_add_ident(&q, t->log);
        if (!st)
            st = hl_buf_adds(&q, " WHERE seq <= ?1");
        if (!st)
            st = prepare(d, &t->st_log_del, &q);
    }
    hl_buf_free(&q);
    return st;
}

/* Appends the clock UPSERT for t; win adds the last-writer-wins condition. */
static hl_status clock_sql(const hl_table *t, bool win, hl_buf *q)
{
    size_t nk = t->npk ? t->npk : 1;
    hl_status st = hl_buf_adds(q, "INSERT INTO ");
    if (!st)
        st = hl_buf_add_ident(q, t->clock);
    if (!st)
        st = hl_buf_adds(q, "(");
    for (size_t i = 0; i < nk && !st; i++)
        st = hl_buf_addf(q, "k%zu, ", i);
    if (!st)
        st = hl_buf_adds(q, "hlc, node, deleted) VALUES (");
    for (size_t i = 0; i < nk + 3 && !st; i++)
        st = hl_buf_addf(q, "%s?%zu", i ? ", " : "", i + 1);
    if (!st)
        st = hl_buf_adds(q, ") ON CONFLICT(");
    for (size_t i = 0; i < nk && !st; i++)
        st = hl_buf_addf(q, "%sk%zu", i ? ", " : "", i);
    if (!st)
        st = hl_buf_adds(q, ") DO UPDATE SET hlc = excluded.hlc, node = excluded.node, deleted = excluded.deleted");
    if (!st && win)
        st = hl_buf_adds(q, " WHERE excluded.hlc > hlc OR (excluded.hlc = hlc AND excluded.node > node)");
    return st;
}

hl_status hl_clock_prepare(hl_db *d, hl_table *t)
{
    hl_buf q;
    hl_status st = HL_OK;
    hl_buf_init(&q, 64u << 20);
    if (!t->st_clock_win && !(st = clock_sql(t, true, &q)))
        st = prepare(d, &t->st_clock_win, &q);
    hl_buf_reset(&q);
    if (!st && !t->st_clock_put && !(st = clock_sql(t, false, &q)))
        st = prepare(d, &t->st_clock_put, &q);
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

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static hl_status push_i64(int64_t **v, size_t *n, size_t *cap, int64_t x)
{
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 256;
        int64_t *nv = realloc(*v, nc * sizeof *nv);
        if (!nv)
            return HL_ERR_NOMEM;
        *v = nv;
        *cap = nc;
    }
    (*v)[(*n)++] = x;
    return HL_OK;
}

/* Reads the high-water mark of a rowid-keyed table; false when it has none
 * (then every insert is logged). */
static bool hwm_get(hl_db *d, const hl_table *t, int64_t *hwm)
{
    sqlite3_stmt *st = d->st_hwm_get;
    sqlite3_bind_text(st, 1, t->name, -1, SQLITE_STATIC);
    bool found = sqlite3_step(st) == SQLITE_ROW;
    if (found)
        *hwm = sqlite3_column_int64(st, 0);
    sqlite3_reset(st);
    return found;
}

/* Adds t's table entry to cs once. */
static hl_status cs_table(hl_changeset *cs, const hl_table *t, uint32_t *tidx)
{
    if (*tidx != UINT32_MAX)
        return HL_OK;
    const char *pkn[HL_CS_MAX_KEY];
    for (size_t i = 0; i < t->npk; i++)
        pkn[i] = t->cols[t->pk[i]];
    return hl_changeset_add_table(cs, t->name, (const char *const *)t->cols, t->ncols, pkn, t->npk, tidx);
}

/*
 * Reads t's changes into cs: one entry per row with its current image and a
 * new version. First the change log, in log order; then, for a rowid-keyed
 * table, the rows above its high-water mark that were inserted without a log
 * entry (and not changed since, or they would be in the log), in rowid order
 * after the logged ones: such a row still holds the values it was inserted
 * with, so no logged change can depend on coming after it. Writes nothing; tab
 * receives what hl_capture_record needs.
 */
static hl_status capture_table(hl_db *d, hl_table *t, hl_changeset *cs, uint64_t *rows, hl_capture_tab *tab)
{
    hl_status st;
    size_t nk = t->npk ? t->npk : 1;
    hl_value key[HL_CS_MAX_KEY];
    hl_value *vals = NULL;
    uint32_t tidx = UINT32_MAX;
    int64_t *logged = NULL;
    size_t nlogged = 0, caplogged = 0;
    int rc;

    tab->max_seq = 0;
    if (nk > HL_CS_MAX_KEY) {
        hl_logf(HL_LOG_ERROR, "table \"%s\": primary key has more than %d columns; not replicated", t->name,
                HL_CS_MAX_KEY);
        return HL_OK;
    }
    if ((st = prepare_table(d, t)))
        return st;
    vals = calloc(t->ncols ? t->ncols : 1, sizeof *vals);
    if (!vals)
        return HL_ERR_NOMEM;

    sqlite3_stmt *lr = t->st_log_read;
    while ((rc = sqlite3_step(lr)) == SQLITE_ROW) {
        /* Julian day -> Unix milliseconds */
        double jd = sqlite3_column_double(lr, 0);
        uint64_t ms = jd > 2440587.5 ? (uint64_t)llround((jd - 2440587.5) * 86400000.0) : 0;
        int64_t seq = sqlite3_column_int64(lr, 1);
        if (seq > tab->max_seq)
            tab->max_seq = seq;
        bool null_key = false;
        for (size_t i = 0; i < nk; i++) {
            hl_value_from_column(lr, 2 + (int)i, &key[i]);
            null_key |= key[i].type == HL_VAL_NULL;
        }
        if (null_key) {
            /* SQLite lets rowid tables store NULL in a declared key column; such a
             * row has no identity another node could find it by. */
            uint64_t dropped = 0;
            if (hl_ratelimit_allow(&d->null_key_log, &dropped))
                hl_logf(HL_LOG_WARN, "table \"%s\": a row with NULL in its primary key cannot be replicated%s", t->name,
                        dropped ? " (repeats not logged)" : "");
            continue;
        }
        if ((st = cs_table(cs, t, &tidx)))
            goto out;
        if (t->int_key && key[0].type == HL_VAL_INT && (st = push_i64(&logged, &nlogged, &caplogged, key[0].u.i)))
            goto out;
        /* The row as it is now is the last image of every write logged for it. */
        bool exists = sqlite3_column_int(lr, 2 + (int)nk) != 0;
        if (exists)
            for (size_t i = 0; i < t->ncols; i++)
                hl_value_from_column(lr, 3 + (int)nk + (int)i, &vals[i]);
        uint64_t hlc = hl_hlc_next(&d->last_hlc, ms);
        st = hl_changeset_add_row(cs, tidx, exists ? HL_OP_UPSERT : HL_OP_DELETE, hlc, key, nk, exists ? vals : NULL,
                                  exists ? t->ncols : 0);
        if (st)
            goto out;
        (*rows)++;
    }
    if (rc != SQLITE_DONE) {
        st = hl_db_err(d, rc, "capture log read");
        goto out;
    }
    if (!t->int_key || !hwm_get(d, t, &tab->hwm))
        goto out;
    tab->ranged = true;
    tab->top = tab->hwm;
    if (nlogged)
        qsort(logged, nlogged, sizeof *logged, cmp_i64);
    sqlite3_stmt *rg = t->st_range;
    sqlite3_bind_int64(rg, 1, tab->hwm);
    uint64_t now = hl_now_ms();
    while ((rc = sqlite3_step(rg)) == SQLITE_ROW) {
        int64_t rowid = sqlite3_column_int64(rg, 0);
        tab->top = rowid;
        if ((st = push_i64(&tab->seen, &tab->nseen, &tab->capseen, rowid)))
            break;
        if (nlogged && bsearch(&rowid, logged, nlogged, sizeof *logged, cmp_i64))
            continue; /* changed since: captured above, from the log */
        if ((st = cs_table(cs, t, &tidx)))
            break;
        key[0] = (hl_value){.type = HL_VAL_INT, .u.i = rowid};
        for (size_t i = 0; i < t->ncols; i++)
            hl_value_from_column(rg, 1 + (int)i, &vals[i]);
        if ((st = hl_changeset_add_row(cs, tidx, HL_OP_UPSERT, hl_hlc_next(&d->last_hlc, now), key, 1, vals, t->ncols)))
            break;
        (*rows)++;
    }
    if (!st && rc != SQLITE_DONE)
        st = hl_db_err(d, rc, "capture range read");
    sqlite3_reset(rg);
out:
    sqlite3_reset(lr);
    free(vals);
    free(logged);
    return st;
}

/*
 * Rows inserted above the high-water mark after the snapshot a batch was read
 * under, with rowids at or below what the batch read (an explicit id filling
 * a gap), had no log entry and are not in the batch: raising the mark would
 * lose them. They get a log entry now, inside the write transaction, and are
 * captured by the next capture (the engine runs one in the same transaction).
 */
static hl_status range_settle(hl_db *d, hl_table *t, const hl_capture_tab *tab)
{
    sqlite3_stmt *rk = t->st_range_keys;
    size_t j = 0;
    int rc;
    hl_status st = HL_OK;
    sqlite3_bind_int64(rk, 1, tab->hwm);
    sqlite3_bind_int64(rk, 2, tab->top);
    while (!st && (rc = sqlite3_step(rk)) == SQLITE_ROW) {
        int64_t rowid = sqlite3_column_int64(rk, 0);
        while (j < tab->nseen && tab->seen[j] < rowid)
            j++;
        if (j < tab->nseen && tab->seen[j] == rowid)
            continue;
        sqlite3_bind_int64(t->st_log_add, 1, rowid);
        int arc = sqlite3_step(t->st_log_add);
        sqlite3_reset(t->st_log_add);
        if (arc != SQLITE_DONE)
            st = hl_db_err(d, arc, "capture log add");
    }
    if (!st && rc != SQLITE_DONE)
        st = hl_db_err(d, rc, "capture range check");
    sqlite3_reset(rk);
    if (st)
        return st;
    sqlite3_stmt *hp = d->st_hwm_put;
    sqlite3_bind_text(hp, 1, t->name, -1, SQLITE_STATIC);
    sqlite3_bind_int64(hp, 2, tab->top);
    rc = sqlite3_step(hp);
    sqlite3_reset(hp);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "hwm put");
}

void hl_capture_batch_free(hl_capture_batch *b)
{
    hl_changeset_free(b->cs);
    hl_buf_free(&b->payload);
    for (size_t i = 0; b->tab && i < b->ntables; i++)
        free(b->tab[i].seen);
    free(b->tab);
    memset(b, 0, sizeof *b);
}

hl_status hl_capture_collect(hl_db *d, hl_capture_batch *b)
{
    hl_status st = HL_OK;
    memset(b, 0, sizeof *b);
    hl_buf_init(&b->payload, (size_t)d->max_changeset_bytes + 1024);
    b->cs = hl_changeset_new();
    b->ntables = d->schema.n;
    b->tab = calloc(b->ntables ? b->ntables : 1, sizeof *b->tab);
    if (!b->cs || !b->tab)
        return HL_ERR_NOMEM;
    for (size_t i = 0; i < d->schema.n; i++)
        if ((st = capture_table(d, &d->schema.t[i], b->cs, &b->rows, &b->tab[i])))
            return st;
    if (b->cs->nrows == 0)
        return HL_OK;
    hl_changeset *cs = b->cs;
    cs->origin = d->node_id;
    cs->epoch = d->epoch;
    cs->seq = d->next_seq;
    cs->wall_ms = hl_now_ms();
    memcpy(cs->schema_hash, d->schema.hash, HL_SCHEMA_HASH_LEN);
    if (d->publish) {
        /* Receivers refuse a changeset whose decoded form costs more than
         * the limit (docs/protocol.md §4): it is too large here already, as
         * an over-size payload is, rather than published and refused. */
        if (hl_changeset_mem_cost(cs) > d->max_changeset_bytes)
            return HL_ERR_TOO_LARGE;
        st = hl_changeset_encode(cs, d->compress, &b->payload);
    }
    return st;
}

hl_status hl_capture_record(hl_db *d, hl_capture_batch *b)
{
    hl_status st = HL_OK;
    hl_changeset *cs = b->cs;
    if (b->ntables != d->schema.n) /* the caller re-checks schema_version; cannot happen */
        return HL_ERR_INTERNAL;
    /* Versions, then the log positions read, then the outbox. */
    hl_table *tab = NULL;
    uint32_t tidx = UINT32_MAX;
    for (size_t i = 0; cs && i < cs->nrows && !st; i++) {
        const hl_cs_row *r = &cs->rows[i];
        if (r->table != tidx) {
            tidx = r->table;
            if (!(tab = hl_schema_find(&d->schema, cs->tables[tidx].name)))
                return HL_ERR_INTERNAL; /* same schema as when collected */
        }
        st = hl_clock_put(d, tab, r->key, r->nkey, r->hlc, d->node_id, r->op == HL_OP_DELETE);
    }
    for (size_t i = 0; i < b->ntables && !st; i++) {
        hl_table *t = &d->schema.t[i];
        if (b->tab[i].max_seq > 0) {
            sqlite3_bind_int64(t->st_log_del, 1, b->tab[i].max_seq);
            int rc = sqlite3_step(t->st_log_del);
            sqlite3_reset(t->st_log_del);
            if (rc != SQLITE_DONE)
                st = hl_db_err(d, rc, "capture log delete");
        }
        /* After the deletion: entries range_settle adds are for the next capture. */
        if (!st && b->tab[i].ranged && b->tab[i].top > b->tab[i].hwm)
            st = range_settle(d, t, &b->tab[i]);
    }
    if (st || !cs || cs->nrows == 0)
        return st;
    if (d->publish) {
        sqlite3_stmt *ob = d->st_outbox_put;
        sqlite3_bind_int64(ob, 1, (int64_t)cs->seq);
        sqlite3_bind_int(ob, 2, d->compress ? HL_PART_FLAG_ZSTD : 0);
        sqlite3_bind_int64(ob, 3, (int64_t)cs->nrows);
        sqlite3_bind_blob64(ob, 4, b->payload.data, b->payload.len, SQLITE_STATIC);
        int rc = sqlite3_step(ob);
        sqlite3_reset(ob);
        sqlite3_clear_bindings(ob);
        if (rc != SQLITE_DONE)
            return hl_db_err(d, rc, "outbox put");
        d->next_seq = cs->seq + 1;
        if ((st = hl_db_meta_put(d, "next_seq", (int64_t)d->next_seq)))
            return st;
    }
    if ((st = hl_db_meta_put(d, "last_hlc", (int64_t)d->last_hlc)))
        return st;
    d->stats.rows_captured += b->rows;
    d->stats.changesets_captured++;
    hl_debugf("captured %llu rows as changeset %llu (%zu bytes)", (unsigned long long)b->rows,
              (unsigned long long)cs->seq, b->payload.len);
    return HL_OK;
}

hl_status hl_capture(hl_db *d, uint64_t *rows)
{
    hl_capture_batch b;
    hl_status st = hl_capture_collect(d, &b);
    if (!st)
        st = hl_capture_record(d, &b);
    *rows = st ? 0 : b.rows;
    hl_capture_batch_free(&b);
    return st;
}
