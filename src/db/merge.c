/*
 * merge.c - catching up from a snapshot without replacing the database.
 *
 * A node whose stream positions fell behind the streams' first messages
 * cannot read the changesets it missed; a snapshot holds their result. Its
 * rows are read, table by table, through a read-only connection of its own,
 * each with its version from the snapshot's clock (tombstones included), and
 * turned into changesets whose origin is the version's node: apply.c then
 * treats them exactly as a remote changeset's rows (hl_apply_rows), so a
 * snapshot row wins only where its version is newer, and the application's
 * own newer or unpublished writes survive. Each step is one write transaction
 * that captures first (capture before apply), so a row the application wrote
 * a moment ago has its version before a snapshot row is compared with it.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "db/db_int.h"

/* Distinct version nodes gathered per batch before the batch is applied. */
#define MERGE_NODES 8
/* A batch also ends once its rows take this much memory (big rows). */
#define MERGE_BATCH_BYTES (16u << 20)

struct hl_merge {
    hl_db *d;
    sqlite3 *snap;
    size_t table;       /* index into d->schema.t of the table being read */
    sqlite3_stmt *rows; /* its clock joined to its rows; NULL: not started */
    uint64_t merged;    /* snapshot rows dealt with */
    hl_changeset *cs[MERGE_NODES];
    size_t ncs;
    bool done;
};

static hl_status snap_err(hl_merge *m, int rc, const char *what)
{
    hl_logf(HL_LOG_ERROR, "snapshot merge: %s: %s (%d)", what, sqlite3_errmsg(m->snap), rc);
    return HL_ERR_SQLITE;
}

static void no_table(void *arg, const char *table, const char *int_key)
{
    (void)arg;
    (void)table;
    (void)int_key;
}

/*
 * The rows of spanned table t (clock.c) that its spans give a version, in
 * the same columns as open_rows' query: "SELECT <what> FROM <span> AS s JOIN
 * t ... WHERE <no clock row>".
 */
static hl_status spanned_rows_sql(hl_buf *q, const hl_table *t, const char *what)
{
    hl_buf_addf(q, "SELECT %s FROM ", what);
    hl_buf_add_ident(q, t->span);
    hl_buf_adds(q, " AS s JOIN ");
    hl_buf_add_ident(q, t->name);
    hl_buf_adds(q, " AS t ON t.");
    hl_add_rowid(q, t);
    hl_buf_adds(q, " BETWEEN s.lo AND s.hi WHERE NOT EXISTS (SELECT 1 FROM ");
    hl_buf_add_ident(q, t->clock);
    hl_buf_adds(q, " AS c WHERE c.k0 = t.");
    hl_add_rowid(q, t);
    return hl_buf_adds(q, ")");
}

/* 1 when the snapshot has a table called name. */
static int snap_has(sqlite3 *snap, const char *name)
{
    sqlite3_stmt *st = NULL;
    int has = 0;
    if (sqlite3_prepare_v2(snap, "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?1", -1, &st, NULL) ==
        SQLITE_OK) {
        sqlite3_bind_text(st, 1, name, -1, SQLITE_STATIC);
        has = sqlite3_step(st) == SQLITE_ROW;
    }
    sqlite3_finalize(st);
    return has;
}

hl_status hl_db_merge_open(hl_db *d, const char *path, hl_merge **out, uint64_t *total, char *err, size_t errlen)
{
    unsigned char hash[32];
    hl_status st = HL_ERR_NOMEM;
    *out = NULL;
    *total = 0;
    hl_merge *m = calloc(1, sizeof *m);
    if (!m) {
        snprintf(err, errlen, "out of memory");
        return st;
    }
    m->d = d;
    if (sqlite3_open_v2(path, &m->snap, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
        snprintf(err, errlen, "cannot open the snapshot: %s", m->snap ? sqlite3_errmsg(m->snap) : "out of memory");
        st = HL_ERR_SQLITE;
        goto fail;
    }
    if ((st = hl_db_schema_describe(m->snap, hash, no_table, NULL))) {
        snprintf(err, errlen, "cannot read the snapshot's schema");
        goto fail;
    }
    if (memcmp(hash, d->schema.hash, 32) != 0) {
        char a[65], b[65];
        hl_hex(hash, 32, a);
        hl_hex(d->schema.hash, 32, b);
        snprintf(err, errlen, "the snapshot's schema hash %.16s... differs from this database's %.16s...", a, b);
        st = HL_ERR_INVALID;
        goto fail;
    }
    for (size_t i = 0; i < d->schema.n; i++) {
        const hl_table *t = &d->schema.t[i];
        if (!snap_has(m->snap, t->clock))
            continue;
        hl_buf q;
        hl_buf_init(&q, 1u << 20);
        hl_buf_adds(&q, "SELECT (SELECT count(*) FROM ");
        hl_buf_add_ident(&q, t->clock);
        hl_buf_adds(&q, ")");
        if (t->spanned && snap_has(m->snap, t->span)) {
            hl_buf_adds(&q, " + (");
            spanned_rows_sql(&q, t, "count(*)");
            hl_buf_adds(&q, ")");
        }
        sqlite3_stmt *s = NULL;
        int rc = hl_buf_status(&q) ? SQLITE_NOMEM : sqlite3_prepare_v2(m->snap, hl_buf_str(&q), -1, &s, NULL);
        if (rc == SQLITE_OK && (rc = sqlite3_step(s)) == SQLITE_ROW)
            *total += (uint64_t)sqlite3_column_int64(s, 0);
        sqlite3_finalize(s);
        hl_buf_free(&q);
        if (rc != SQLITE_ROW) {
            snprintf(err, errlen, "cannot count the snapshot's rows of %s: %s", t->name, sqlite3_errmsg(m->snap));
            st = HL_ERR_SQLITE;
            goto fail;
        }
    }
    *out = m;
    return HL_OK;
fail:
    hl_db_merge_close(m);
    return st;
}

uint64_t hl_db_merge_stream_seq(hl_merge *m, const char *stream)
{
    sqlite3_stmt *st = NULL;
    uint64_t seq = 0;
    if (sqlite3_prepare_v2(m->snap, "SELECT seq FROM " HL_PREFIX "seq WHERE stream = ?1", -1, &st, NULL) == SQLITE_OK) {
        sqlite3_bind_text(st, 1, stream, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_int64(st, 0) > 0)
            seq = (uint64_t)sqlite3_column_int64(st, 0);
    }
    sqlite3_finalize(st);
    return seq;
}

/* Appends "t.<rowid or key>, t.<col>, ...": the presence marker (NULL when
 * the row is gone) and every replicated column. */
static void add_presence_cols(hl_buf *q, const hl_table *t)
{
    hl_buf_adds(q, "t.");
    hl_add_rowid(q, t);
    for (size_t i = 0; i < t->ncols; i++) {
        hl_buf_adds(q, ", t.");
        hl_buf_add_ident(q, t->cols[i]);
    }
}

/*
 * The snapshot's rows of t: its clock (key, hlc, node, deleted) left-joined
 * to the table by key, then a presence marker and every replicated column;
 * for a spanned table, then the rows its spans version. Read in the clock's
 * order, never sorted: a sort would read the whole table at the first step.
 */
static hl_status open_rows(hl_merge *m, const hl_table *t)
{
    size_t nk = t->npk ? t->npk : 1;
    hl_buf q;
    hl_buf_init(&q, 16u << 20);
    hl_buf_adds(&q, "SELECT ");
    for (size_t k = 0; k < nk; k++)
        hl_buf_addf(&q, "c.k%zu, ", k);
    hl_buf_adds(&q, "c.hlc, c.node, c.deleted, ");
    add_presence_cols(&q, t);
    hl_buf_adds(&q, " FROM ");
    hl_buf_add_ident(&q, t->clock);
    hl_buf_adds(&q, " AS c LEFT JOIN ");
    hl_buf_add_ident(&q, t->name);
    hl_buf_adds(&q, " AS t ON ");
    for (size_t k = 0; k < nk; k++) {
        hl_buf_adds(&q, k ? " AND t." : "t.");
        if (t->npk)
            hl_buf_add_ident(&q, t->cols[t->pk[k]]);
        else
            hl_buf_adds(&q, t->rowid);
        hl_buf_addf(&q, " = c.k%zu", k);
    }
    if (t->spanned && snap_has(m->snap, t->span)) {
        hl_buf what;
        hl_buf_init(&what, 16u << 20);
        hl_buf_adds(&what, "t.");
        hl_add_rowid(&what, t);
        hl_buf_adds(&what, ", s.hlc, s.node, 0, ");
        add_presence_cols(&what, t);
        hl_buf_adds(&q, " UNION ALL ");
        if (hl_buf_status(&what))
            hl_buf_adds(&q, "!"); /* cut short: make the statement fail */
        else
            spanned_rows_sql(&q, t, hl_buf_str(&what));
        hl_buf_free(&what);
    }
    hl_status st = hl_buf_status(&q);
    int rc = SQLITE_OK;
    if (!st && (rc = sqlite3_prepare_v2(m->snap, hl_buf_str(&q), -1, &m->rows, NULL)) != SQLITE_OK)
        st = snap_err(m, rc, "reading its rows");
    hl_buf_free(&q);
    return st;
}

/* Applies the changesets gathered so far and frees them. */
static hl_status flush(hl_merge *m)
{
    hl_status st = HL_OK;
    char why[512];
    for (size_t i = 0; i < m->ncs; i++) {
        if (!st && m->cs[i]->nrows && (st = hl_apply_rows(m->d, m->cs[i], why, sizeof why)) == HL_ERR_INVALID)
            hl_logf(HL_LOG_ERROR, "snapshot merge: rows of node %" PRIu64 " cannot be applied: %s", m->cs[i]->origin,
                    why);
        hl_changeset_free(m->cs[i]);
        m->cs[i] = NULL;
    }
    m->ncs = 0;
    return st;
}

/* The changeset gathering rows whose version belongs to node (one per node:
 * a changeset's origin is its rows' version node). */
static hl_status batch_for(hl_merge *m, const hl_table *t, uint64_t node, hl_changeset **out)
{
    hl_status st;
    for (size_t i = 0; i < m->ncs; i++)
        if (m->cs[i]->origin == node) {
            *out = m->cs[i];
            return HL_OK;
        }
    if (m->ncs == MERGE_NODES && (st = flush(m)))
        return st;
    hl_changeset *cs = hl_changeset_new();
    if (!cs)
        return HL_ERR_NOMEM;
    cs->origin = node;
    memcpy(cs->schema_hash, m->d->schema.hash, HL_SCHEMA_HASH_LEN);
    const char *pkn[HL_CS_MAX_KEY];
    for (size_t k = 0; k < t->npk; k++)
        pkn[k] = t->cols[t->pk[k]];
    uint32_t idx;
    if ((st = hl_changeset_add_table(cs, t->name, (const char *const *)t->cols, t->ncols, pkn, t->npk, &idx))) {
        hl_changeset_free(cs);
        return st;
    }
    m->cs[m->ncs++] = cs;
    *out = cs;
    return HL_OK;
}

/* One row of the cursor into its node's changeset. */
static hl_status gather(hl_merge *m, const hl_table *t)
{
    sqlite3_stmt *r = m->rows;
    size_t nk = t->npk ? t->npk : 1;
    hl_value key[HL_CS_MAX_KEY];
    int64_t hlc = sqlite3_column_int64(r, (int)nk), node = sqlite3_column_int64(r, (int)nk + 1);
    bool deleted = sqlite3_column_int(r, (int)nk + 2) != 0;
    bool present = sqlite3_column_type(r, (int)nk + 3) != SQLITE_NULL;
    if (hlc <= 0 || node <= 0 || (!deleted && !present))
        return HL_OK; /* no version, or a version without its row: nothing to merge */
    for (size_t k = 0; k < nk; k++)
        hl_value_from_column(r, (int)k, &key[k]);
    hl_changeset *cs;
    hl_status st = batch_for(m, t, (uint64_t)node, &cs);
    if (st)
        return st;
    if (deleted)
        return hl_changeset_add_row(cs, 0, HL_OP_DELETE, (uint64_t)hlc, key, nk, NULL, 0);
    hl_value *vals = calloc(t->ncols ? t->ncols : 1, sizeof *vals);
    if (!vals)
        return HL_ERR_NOMEM;
    for (size_t i = 0; i < t->ncols; i++)
        hl_value_from_column(r, (int)nk + 4 + (int)i, &vals[i]);
    st = hl_changeset_add_row(cs, 0, HL_OP_UPSERT, (uint64_t)hlc, key, nk, vals, t->ncols);
    free(vals);
    return st;
}

/* Up to max_rows rows into the open apply transaction. */
static hl_status merge_rows(hl_merge *m, size_t max_rows)
{
    hl_db *d = m->d;
    hl_status st = HL_OK;
    size_t n = 0;
    while (!st && n < max_rows && m->table < d->schema.n) {
        const hl_table *t = &d->schema.t[m->table];
        if (!m->rows) {
            if (!snap_has(m->snap, t->clock)) {
                m->table++;
                continue;
            }
            if ((st = open_rows(m, t)))
                break;
        }
        int rc = sqlite3_step(m->rows);
        if (rc == SQLITE_ROW) {
            st = gather(m, t);
            n++;
            m->merged++;
            size_t bytes = 0;
            for (size_t i = 0; i < m->ncs; i++)
                bytes += m->cs[i]->mem_bytes;
            if (bytes >= MERGE_BATCH_BYTES)
                break; /* the rest of the table in the next step */
            continue;
        }
        if (rc != SQLITE_DONE)
            st = snap_err(m, rc, "reading its rows");
        /* Rows of one table per changeset: apply them before the next table. */
        if (!st)
            st = flush(m);
        sqlite3_finalize(m->rows);
        m->rows = NULL;
        m->table++;
    }
    if (!st)
        st = flush(m);
    m->done = m->table >= d->schema.n;
    return st;
}

hl_status hl_db_merge_step(hl_merge *m, size_t max_rows, uint64_t *merged, bool *done)
{
    hl_db *d = m->d;
    uint64_t rows = 0;
    bool changed = false;
    hl_status st;
    *done = false;
    if ((st = hl_db_begin(d)))
        return st;
    if ((st = hl_triggers_sync(d, false, &changed)))
        goto fail;
    if (changed) {
        /* The application changed the schema under the merge: the rows read
         * so far were for the old one. Start over (the caller opens again and
         * checks the hashes). */
        hl_logf(HL_LOG_WARN, "snapshot merge: the schema changed; the merge starts over");
        st = HL_ERR_INVALID;
        goto fail;
    }
    if ((st = hl_capture(d, &rows)) || (st = hl_apply_begin(d)) || (st = merge_rows(m, max_rows)) ||
        (st = hl_apply_end(d)))
        goto fail;
    if ((st = hl_db_commit(d)))
        return st;
    if (merged)
        *merged = m->merged;
    *done = m->done;
    return HL_OK;
fail:
    for (size_t i = 0; i < m->ncs; i++)
        hl_changeset_free(m->cs[i]);
    m->ncs = 0;
    hl_db_rollback(d);
    return st;
}

/* Every row of the snapshot query get (?1, ?2: this node's id and epoch,
 * for leaving out its own origin) written by put, column for column. */
static hl_status copy_rows(hl_merge *m, const char *get_sql, const char *put_sql, const char *what)
{
    hl_db *d = m->d;
    sqlite3_stmt *get = NULL, *put = NULL;
    hl_status st = HL_OK;
    int rc = sqlite3_prepare_v2(m->snap, get_sql, -1, &get, NULL);
    if (rc != SQLITE_OK)
        return snap_err(m, rc, what);
    if ((rc = sqlite3_prepare_v2(d->db, put_sql, -1, &put, NULL)) != SQLITE_OK) {
        sqlite3_finalize(get);
        return hl_db_err(d, rc, what);
    }
    sqlite3_bind_int64(get, 1, (int64_t)d->node_id);
    sqlite3_bind_int64(get, 2, (int64_t)d->epoch);
    int n = sqlite3_column_count(get);
    while (!st && (rc = sqlite3_step(get)) == SQLITE_ROW) {
        for (int i = 0; i < n; i++)
            sqlite3_bind_value(put, i + 1, sqlite3_column_value(get, i));
        if ((rc = sqlite3_step(put)) != SQLITE_DONE)
            st = hl_db_err(d, rc, what);
        sqlite3_reset(put);
    }
    if (!st && rc != SQLITE_DONE)
        st = snap_err(m, rc, what);
    sqlite3_finalize(get);
    sqlite3_finalize(put);
    return st;
}

hl_status hl_db_merge_finish(hl_merge *m)
{
    hl_db *d = m->d;
    hl_status st;
    if ((st = hl_db_begin(d)))
        return st;
    /* Stream positions, never moved back. */
    if (!(st = copy_rows(m,
                         "SELECT stream, seq FROM " HL_PREFIX "seq WHERE typeof(stream) = 'text' AND seq > 0 AND "
                         "?1 IS NOT NULL AND ?2 IS NOT NULL",
                         "INSERT INTO " HL_PREFIX "seq(stream, seq) VALUES (?1, ?2) ON CONFLICT(stream) DO "
                         "UPDATE SET seq = max(seq, excluded.seq)",
                         "merge positions")) &&
        /* Per-origin applied sequences: every changeset up to the snapshot's
         * is in its rows now. Our own origin is ours to number. */
        !(st = copy_rows(m,
                         "SELECT node, epoch, seq FROM " HL_PREFIX "origins WHERE node > 0 AND seq > 0 AND "
                         "NOT (node = ?1 AND epoch = ?2)",
                         "INSERT INTO " HL_PREFIX "origins(node, epoch, seq) VALUES (?1, ?2, ?3) ON "
                         "CONFLICT(node, epoch) DO UPDATE SET seq = max(seq, excluded.seq)",
                         "merge origins")) &&
        /* What the snapshot held back (out of order, waiting for a schema)
         * sits at stream positions this node now skips: hold it here too,
         * unless this node has applied it already. */
        !(st = copy_rows(m,
                         "SELECT node, epoch, seq, flags, data, schema, at_ms, reason FROM " HL_PREFIX
                         "pending WHERE NOT (node = ?1 AND epoch = ?2)",
                         "INSERT OR IGNORE INTO " HL_PREFIX
                         "pending(node, epoch, seq, flags, data, schema, at_ms, reason) SELECT ?1, ?2, ?3, ?4, ?5, "
                         "?6, ?7, ?8 WHERE ?3 > coalesce((SELECT seq FROM " HL_PREFIX
                         "origins WHERE node = ?1 AND epoch = ?2), 0)",
                         "merge held changesets")))
        /* Gaps it gave up on: a late changeset from one is still applied. */
        st = copy_rows(m,
                       "SELECT node, epoch, lo, hi, at_ms FROM " HL_PREFIX "missing WHERE NOT (node = ?1 AND "
                       "epoch = ?2)",
                       "INSERT OR IGNORE INTO " HL_PREFIX "missing(node, epoch, lo, hi, at_ms) VALUES (?1, ?2, ?3, "
                       "?4, ?5)",
                       "merge given-up gaps");
    if (st) {
        hl_db_rollback(d);
        return st;
    }
    return hl_db_commit(d);
}

void hl_db_merge_close(hl_merge *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->ncs; i++)
        hl_changeset_free(m->cs[i]);
    sqlite3_finalize(m->rows);
    sqlite3_close(m->snap);
    free(m);
}
