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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/hlc.h"
#include "common/log.h"
#include "db/db_int.h"

/* Rows above a rowid: "SELECT rowid, cols ... WHERE rowid > ?1", or for
 * keys_only the rowids up to a bound: "SELECT rowid ... AND rowid <= ?2";
 * unlogged leaves out the rowids that are in the change log. */
static hl_status range_sql(hl_buf *q, const hl_table *t, bool keys_only, bool unlogged)
{
    hl_buf_adds(q, "SELECT ");
    hl_add_rowid(q, t);
    for (size_t i = 0; !keys_only && i < t->ncols; i++) {
        hl_buf_adds(q, ", ");
        hl_buf_add_ident(q, t->cols[i]);
    }
    hl_buf_adds(q, " FROM ");
    hl_buf_add_ident(q, t->name);
    hl_buf_adds(q, " WHERE ");
    hl_add_rowid(q, t);
    hl_buf_adds(q, " > ?1");
    if (keys_only) {
        hl_buf_adds(q, " AND ");
        hl_add_rowid(q, t);
        hl_buf_adds(q, " <= ?2");
    }
    if (unlogged) {
        /* SQLite builds the IN list once, as a temporary index. */
        hl_buf_adds(q, " AND ");
        hl_add_rowid(q, t);
        hl_buf_adds(q, " NOT IN (SELECT k0 FROM ");
        hl_buf_add_ident(q, t->log);
        hl_buf_adds(q, " WHERE k0 IS NOT NULL AND jd >= 0)"); /* not suspects (triggers.c, replace_sql) */
    }
    return hl_buf_adds(q, " ORDER BY 1");
}

/* Appends the key of t's row in the table aliased r: its rowid or key column i. */
static void add_row_key(hl_buf *q, const hl_table *t, size_t i)
{
    if (t->npk)
        hl_buf_add_ident(q, t->cols[t->pk[i]]);
    else
        hl_buf_adds(q, t->rowid);
}

/* The change log read: one entry per logged row, its last write time and log
 * position, joined to the row as it is now (no row: it was deleted). */
static hl_status log_read_sql(hl_buf *q, const hl_table *t)
{
    size_t nk = t->npk ? t->npk : 1;
    hl_buf_adds(q, "SELECT g.jd, g.seq");
    for (size_t i = 0; i < nk; i++)
        hl_buf_addf(q, ", g.k%zu", i);
    hl_buf_adds(q, ", r.");
    add_row_key(q, t, 0);
    hl_buf_adds(q, " IS NOT NULL");
    for (size_t i = 0; i < t->ncols; i++) {
        hl_buf_adds(q, ", r.");
        hl_buf_add_ident(q, t->cols[i]);
    }
    hl_buf_adds(q, " FROM (SELECT max(jd) AS jd, max(seq) AS seq");
    for (size_t i = 0; i < nk; i++)
        hl_buf_addf(q, ", k%zu", i);
    hl_buf_adds(q, " FROM ");
    hl_buf_add_ident(q, t->log);
    hl_buf_adds(q, " GROUP BY ");
    for (size_t i = 0; i < nk; i++)
        hl_buf_addf(q, "%sk%zu", i ? ", " : "", i);
    hl_buf_adds(q, ") AS g LEFT JOIN ");
    hl_buf_add_ident(q, t->name);
    hl_buf_adds(q, " AS r ON ");
    for (size_t i = 0; i < nk; i++) {
        hl_buf_adds(q, i ? " AND r." : "r.");
        add_row_key(q, t, i);
        hl_buf_addf(q, " = g.k%zu", i);
    }
    return hl_buf_adds(q, " ORDER BY g.seq");
}

/* Prepares the statement built in q into *st (the buffer's sticky error
 * says whether building it failed) and empties q for the next one. */
static hl_status prepare_built(hl_db *d, hl_buf *q, sqlite3_stmt **st)
{
    hl_status res = hl_stmt_prepare(d, st, q);
    hl_buf_reset(q);
    return res;
}

/* Prepares the statements capture uses on t that are not prepared yet. */
static hl_status prepare_table(hl_db *d, hl_table *t)
{
    hl_buf q;
    hl_status st = HL_OK;
    hl_buf_init(&q, 64u << 20);
    if (!t->st_log_read) {
        log_read_sql(&q, t);
        st = prepare_built(d, &q, &t->st_log_read);
    }
    if (!st && t->int_key && !t->st_range) {
        range_sql(&q, t, false, false);
        if (!(st = prepare_built(d, &q, &t->st_range)))
            range_sql(&q, t, true, false);
        if (!st && !(st = prepare_built(d, &q, &t->st_range_keys)))
            range_sql(&q, t, false, true);
        if (!st && !(st = prepare_built(d, &q, &t->st_range_unlogged))) {
            hl_buf_adds(&q, "INSERT INTO ");
            hl_buf_add_ident(&q, t->log);
            hl_buf_adds(&q, "(jd, k0) VALUES (julianday('now'), ?1)");
            st = prepare_built(d, &q, &t->st_log_add);
        }
    }
    if (!st && !t->st_log_del) {
        hl_buf_adds(&q, "DELETE FROM ");
        hl_buf_add_ident(&q, t->log);
        hl_buf_adds(&q, " WHERE seq <= ?1");
        st = prepare_built(d, &q, &t->st_log_del);
    }
    hl_buf_free(&q);
    return st;
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

/*
 * Where capture_table puts rows: a chain of changesets, each cut when its
 * encoded size reaches d->opt.chain_bytes. A transaction of any size becomes a
 * chain of changesets with consecutive sequences, every one but the last
 * flagged HL_PART_FLAG_MORE; receivers apply a chain in one transaction when
 * its last member arrives (docs/protocol.md §1.5). Memory holds one member at
 * a time when streaming (hl_capture, inside the write transaction: a cut
 * member is recorded and freed at once), or the members of a batch of at most
 * HL_SNAPSHOT_BYTES (hl_capture_collect, under a snapshot: it gives up, and
 * leaves the work to hl_capture, when there is more).
 */
#define HL_SNAPSHOT_BYTES (4u << 20)    /* members kept decoded (their rows need clock rows) */
#define HL_SNAPSHOT_PAYLOAD (16u << 20) /* members kept encoded only (every row versioned by a span) */
#define HL_SNAPSHOT_ROWS 50000          /* change-log entries beyond which a snapshot read is not even tried */
#define HL_STREAM_CACHE_KIB 4096        /* page cache (and sorter) while streaming a big change log */

static hl_status cache_set(hl_db *d, int64_t kib)
{
    char sql[64];
    snprintf(sql, sizeof sql, "PRAGMA cache_size = -%lld", (long long)kib);
    return hl_db_exec(d, sql);
}

/* An upper bound on the entries in t's change log: one seek at each end. */
static hl_status log_span(hl_db *d, hl_table *t, int64_t *n)
{
    *n = 0;
    if ((t->npk ? t->npk : 1) > HL_CS_MAX_KEY)
        return HL_OK; /* not captured at all (capture_table says why) */
    if (!t->st_log_span) {
        hl_buf q;
        hl_buf_init(&q, 1u << 20);
        hl_buf_adds(&q, "SELECT coalesce(max(seq) - min(seq) + 1, 0) FROM ");
        hl_buf_add_ident(&q, t->log);
        hl_status st = hl_stmt_prepare(d, &t->st_log_span, &q);
        hl_buf_free(&q);
        if (st)
            return st;
    }
    int rc = sqlite3_step(t->st_log_span);
    *n = rc == SQLITE_ROW ? sqlite3_column_int64(t->st_log_span, 0) : 0;
    sqlite3_reset(t->st_log_span);
    return rc == SQLITE_ROW ? HL_OK : hl_db_err(d, rc, "change log span");
}

typedef struct sink {
    bool stream;       /* record and free members as they are cut */
    hl_changeset *cs;  /* member being filled */
    const hl_table *t; /* table of the last row added, and its index in cs */
    uint32_t tidx;
    size_t done_bytes;   /* collect: approximate size of the members kept decoded */
    size_t done_payload; /* collect: encoded size of the members kept */
    bool over;           /* collect: more than a snapshot batch holds */
    hl_capture_batch *b; /* collect: where cut members go */
    uint64_t emitted;    /* stream: members recorded */
    int64_t *spanned;    /* rows of cs a span versions: [start, end) index pairs */
    size_t nspanned, capspanned;
} sink;

static hl_status member_new(hl_db *d, sink *k)
{
    hl_changeset *cs = hl_changeset_new();
    if (!cs)
        return HL_ERR_NOMEM;
    cs->origin = d->node_id;
    cs->epoch = d->epoch;
    cs->wall_ms = hl_now_ms();
    memcpy(cs->schema_hash, d->schema.hash, HL_SCHEMA_HASH_LEN);
    k->cs = cs;
    k->t = NULL;
    return HL_OK;
}

/* A member must stay under the receivers' limit: only a single row bigger
 * than max_changeset_bytes can break it, and nothing can carry such a row. */
static hl_status member_check(hl_db *d, const hl_changeset *cs)
{
    /* Receivers refuse a changeset whose payload or decoded form costs more
     * than the limit (docs/protocol.md §4): refuse it here rather than
     * publish what every receiver drops. */
    size_t cost = hl_changeset_mem_cost(cs);
    if (cs->approx_bytes + 256 <= d->opt.max_changeset_bytes && cost <= d->opt.max_changeset_bytes)
        return HL_OK;
    snprintf(d->last_error, sizeof d->last_error,
             "a row of about %zu bytes (%zu once decoded) is larger than replication_log.max_changeset_bytes (%zu): "
             "raise it on every node",
             cs->approx_bytes, cost, d->opt.max_changeset_bytes);
    hl_logf(HL_LOG_ERROR, "cannot capture: %s", d->last_error);
    return HL_ERR_TOO_LARGE;
}

/* Records the versions of a member's rows (inside the write transaction),
 * but for the rows a span versions: [start, end) index pairs in spanned. */
static hl_status member_clocks(hl_db *d, const hl_changeset *cs, const int64_t *spanned, size_t nspanned)
{
    hl_status st = HL_OK;
    hl_table *tab = NULL;
    uint32_t tidx = UINT32_MAX;
    size_t sp = 0;
    for (size_t i = 0; cs && i < cs->nrows && !st; i++) {
        while (sp < nspanned && (size_t)spanned[sp + 1] <= i)
            sp += 2;
        if (sp < nspanned && (size_t)spanned[sp] <= i) {
            i = (size_t)spanned[sp + 1] - 1;
            continue;
        }
        const hl_cs_row *r = &cs->rows[i];
        if (r->table != tidx) {
            tidx = r->table;
            if (!(tab = hl_schema_find(&d->schema, cs->tables[tidx].name)))
                return HL_ERR_INTERNAL; /* same schema as when collected */
        }
        st = hl_clock_put(d, tab, r->key, r->nkey, r->hlc, d->node_id, r->op == HL_OP_DELETE);
    }
    return st;
}

/* The flags of a chain member's outbox row. */
static uint8_t member_flags(const hl_db *d, bool more)
{
    return (uint8_t)((d->opt.compress ? HL_PART_FLAG_ZSTD : 0) | (more ? HL_PART_FLAG_MORE : 0));
}

size_t hl_chain_bytes(size_t max_changeset_bytes)
{
    size_t q = max_changeset_bytes / 4;
    return q < (1u << 20) ? (q ? q : 1) : (1u << 20);
}

/* Stream: records the current member (versions, outbox) as a member that
 * more follow, and starts the next. */
static hl_status member_flush(hl_db *d, sink *k, bool more)
{
    hl_changeset *cs = k->cs;
    hl_status st;
    if ((st = member_check(d, cs)) || (st = member_clocks(d, cs, k->spanned, k->nspanned)))
        return st;
    k->nspanned = 0;
    if (d->opt.publish) {
        hl_buf payload;
        hl_buf_init(&payload, SIZE_MAX - 1);
        cs->seq = d->next_seq;
        if (!(st = hl_changeset_encode(cs, d->opt.compress, &payload)))
            st = hl_db_outbox_put(d, cs->seq, member_flags(d, more), cs->nrows, payload.data, payload.len);
        hl_buf_free(&payload);
        if (st)
            return st;
        d->next_seq++;
    }
    d->stats.rows_captured += cs->nrows;
    d->stats.changesets_captured++;
    k->emitted++;
    hl_changeset_free(cs);
    k->cs = NULL;
    return member_new(d, k);
}

/* Collect: keeps the current member, encoded, in the batch. */
static hl_status member_keep(hl_db *d, sink *k)
{
    hl_capture_batch *b = k->b;
    hl_status st = member_check(d, k->cs);
    if (st)
        return st;
    hl_capture_member *nm = realloc(b->members, (b->nmembers + 1) * sizeof *nm);
    if (!nm)
        return HL_ERR_NOMEM;
    b->members = nm;
    hl_capture_member *m = &b->members[b->nmembers];
    memset(m, 0, sizeof *m);
    hl_buf_init(&m->payload, SIZE_MAX - 1);
    m->cs = k->cs;
    m->seq = m->cs->seq = d->next_seq + b->nmembers;
    m->nrows = m->cs->nrows;
    b->nmembers++;
    k->cs = NULL;
    if (k->nspanned) {
        if (!(m->spanned = malloc(k->nspanned * sizeof *m->spanned)))
            return HL_ERR_NOMEM;
        memcpy(m->spanned, k->spanned, k->nspanned * sizeof *m->spanned);
        m->nspanned = k->nspanned;
        k->nspanned = 0;
    }
    if (d->opt.publish && (st = hl_changeset_encode(m->cs, d->opt.compress, &m->payload)))
        return st;
    k->done_payload += m->payload.len;
    if (m->nspanned == 2 && m->spanned[0] == 0 && m->spanned[1] == (int64_t)m->nrows) {
        /* Nothing left to do with the rows themselves: keep the bytes only. */
        hl_changeset_free(m->cs);
        m->cs = NULL;
    } else {
        k->done_bytes += m->cs->approx_bytes;
    }
    return member_new(d, k);
}

/* Adds a row to the chain, cutting the member first when it is full. */
static hl_status sink_row(hl_db *d, sink *k, const hl_table *t, hl_op op, uint64_t hlc, const hl_value *key, size_t nk,
                          const hl_value *vals, size_t nvals)
{
    hl_status st;
    size_t target = d->opt.chain_bytes ? d->opt.chain_bytes : hl_chain_bytes(d->opt.max_changeset_bytes);
    /* Cut on the encoded size, or on what the member costs once decoded
     * (rows of NULLs encode to a byte a value and decode to 24). */
    if (k->cs->nrows && (k->cs->approx_bytes >= target || k->cs->mem_bytes >= 2 * target)) {
        if (k->stream) {
            st = member_flush(d, k, true);
        } else if (k->done_bytes >= HL_SNAPSHOT_BYTES || k->done_payload >= HL_SNAPSHOT_PAYLOAD) {
            k->over = true;
            return HL_ERR_TOO_LARGE; /* the caller leaves it to hl_capture */
        } else {
            st = member_keep(d, k);
        }
        if (st)
            return st;
    }
    if (k->t != t) {
        uint32_t idx = UINT32_MAX;
        for (size_t i = 0; i < k->cs->ntables; i++)
            if (strcmp(k->cs->tables[i].name, t->name) == 0)
                idx = (uint32_t)i;
        if (idx == UINT32_MAX) {
            const char *pkn[HL_CS_MAX_KEY];
            for (size_t i = 0; i < t->npk; i++)
                pkn[i] = t->cols[t->pk[i]];
            if ((st =
                     hl_changeset_add_table(k->cs, t->name, (const char *const *)t->cols, t->ncols, pkn, t->npk, &idx)))
                return st;
        }
        k->t = t;
        k->tidx = idx;
    }
    return hl_changeset_add_row(k->cs, k->tidx, op, hlc, key, nk, vals, nvals);
}

/* The rowids of a rowid-keyed table's logged rows, under a snapshot: the
 * range read skips them (they were captured from the log). */
typedef struct rowids {
    int64_t *v;
    size_t n, cap;
} rowids;

/* Reads t's change log: one entry per row, in log order, with its current
 * image (none: deleted) and a version from its last write time. */
static hl_status capture_log(hl_db *d, hl_table *t, sink *k, uint64_t *rows, hl_capture_tab *tab, hl_value *vals,
                             rowids *logged)
{
    size_t nk = t->npk ? t->npk : 1;
    hl_value key[HL_CS_MAX_KEY];
    hl_status st = HL_OK;
    sqlite3_stmt *lr = t->st_log_read;
    uint64_t now = hl_now_ms();
    int rc;
    while ((rc = sqlite3_step(lr)) == SQLITE_ROW) {
        /* Julian day -> Unix milliseconds; none (0: an INSERT, triggers.c,
         * NO_JD): now, as for an append. Negated: every entry of the row is
         * a suspect (triggers.c, replace_sql), sent only if it is gone. */
        double jd = sqlite3_column_double(lr, 0);
        bool suspect = jd < 0;
        if (suspect)
            jd = -jd;
        uint64_t ms = jd > 2440587.5 ? (uint64_t)llround((jd - 2440587.5) * 86400000.0) : now;
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
        /* The row as it is now is the last image of every write logged for it. */
        bool exists = sqlite3_column_int(lr, 2 + (int)nk) != 0;
        if (suspect && exists)
            continue; /* not deleted; above the high-water mark, the range read still sees it */
        if (!k->stream && t->int_key && key[0].type == HL_VAL_INT &&
            (st = push_i64(&logged->v, &logged->n, &logged->cap, key[0].u.i)))
            break;
        if (exists)
            for (size_t i = 0; i < t->ncols; i++)
                hl_value_from_column(lr, 3 + (int)nk + (int)i, &vals[i]);
        uint64_t hlc = hl_hlc_next(&d->last_hlc, ms);
        if ((st = sink_row(d, k, t, exists ? HL_OP_UPSERT : HL_OP_DELETE, hlc, key, nk, exists ? vals : NULL,
                           exists ? t->ncols : 0)))
            break;
        (*rows)++;
    }
    if (!st && rc != SQLITE_DONE)
        st = hl_db_err(d, rc, "capture log read");
    sqlite3_reset(lr);
    return st;
}

/* Notes that the row just added to the current member is versioned by a span. */
static hl_status sink_spanned(sink *k)
{
    int64_t i = (int64_t)k->cs->nrows - 1;
    hl_status st;
    if (k->nspanned && k->spanned[k->nspanned - 1] == i) {
        k->spanned[k->nspanned - 1] = i + 1;
        return HL_OK;
    }
    if ((st = push_i64(&k->spanned, &k->nspanned, &k->capspanned, i)))
        return st;
    return push_i64(&k->spanned, &k->nspanned, &k->capspanned, i + 1);
}

/* Records the version of a run of appended rows: a span, or for a single row
 * (appends with gaps, such as ids interleaved between nodes) its clock row,
 * one statement where a span costs four and a bigger row. Either way a later
 * version of the row is a clock row that replaces it. */
static hl_status run_put(hl_db *d, hl_table *t, int64_t lo, int64_t hi, uint64_t hlc)
{
    if (lo < hi)
        return hl_span_put(d, t, lo, hi, hlc, d->node_id);
    hl_value key = {.type = HL_VAL_INT, .u.i = lo};
    return hl_clock_put(d, t, &key, 1, hlc, d->node_id, false);
}

/* Ends tab's current run of appended rows: streaming records it,
 * a collected batch keeps it for hl_capture_record. */
static hl_status run_end(hl_db *d, hl_table *t, sink *k, hl_capture_tab *tab)
{
    if (!k->stream || !tab->nruns)
        return HL_OK;
    tab->nruns = 0;
    return run_put(d, t, tab->runs[0], tab->runs[1], tab->span_hlc);
}

/* Adds rowid to tab's runs: it extends the last one or starts the next. */
static hl_status run_add(hl_db *d, hl_table *t, sink *k, hl_capture_tab *tab, int64_t rowid)
{
    hl_status st;
    if (tab->nruns && tab->runs[tab->nruns - 1] == rowid - 1) {
        tab->runs[tab->nruns - 1] = rowid;
        return HL_OK;
    }
    if ((st = run_end(d, t, k, tab)) || (st = push_i64(&tab->runs, &tab->nruns, &tab->capruns, rowid)))
        return st;
    return push_i64(&tab->runs, &tab->nruns, &tab->capruns, rowid);
}

/* Reads the rows of a rowid-keyed table above its high-water mark that are
 * not in logged, in rowid order; tab records the mark and the rowids read.
 * In a spanned table they share one version, recorded as spans: one per run
 * of consecutive rowids (a gap, or a row read from the log, ends a run). */
static hl_status capture_range(hl_db *d, hl_table *t, sink *k, uint64_t *rows, hl_capture_tab *tab, hl_value *vals,
                               rowids *logged)
{
    hl_status st = HL_OK;
    int rc;
    tab->ranged = true;
    tab->top = tab->hwm;
    if (logged->n)
        qsort(logged->v, logged->n, sizeof *logged->v, cmp_i64);
    /* Streaming (any size), the query itself skips the logged rows, so no
     * list of them is kept in memory; nor of the rows seen, which only a
     * capture under a snapshot needs (range_settle). */
    sqlite3_stmt *rg = k->stream ? t->st_range_unlogged : t->st_range;
    sqlite3_bind_int64(rg, 1, tab->hwm);
    uint64_t now = hl_now_ms();
    tab->span_hlc = 0;
    tab->nruns = 0;
    while ((rc = sqlite3_step(rg)) == SQLITE_ROW) {
        int64_t rowid = sqlite3_column_int64(rg, 0);
        tab->top = rowid;
        if (!k->stream && (st = push_i64(&tab->seen, &tab->nseen, &tab->capseen, rowid)))
            break;
        if (logged->n && bsearch(&rowid, logged->v, logged->n, sizeof *logged->v, cmp_i64))
            continue; /* changed since: captured above, from the log */
        hl_value key = {.type = HL_VAL_INT, .u.i = rowid};
        for (size_t i = 0; i < t->ncols; i++)
            hl_value_from_column(rg, 1 + (int)i, &vals[i]);
        uint64_t hlc;
        if (!t->spanned)
            hlc = hl_hlc_next(&d->last_hlc, now);
        else if (!(hlc = tab->span_hlc))
            hlc = tab->span_hlc = hl_hlc_next(&d->last_hlc, now);
        if ((st = sink_row(d, k, t, HL_OP_UPSERT, hlc, &key, 1, vals, t->ncols)))
            break;
        if (t->spanned && ((st = sink_spanned(k)) || (st = run_add(d, t, k, tab, rowid))))
            break;
        (*rows)++;
    }
    if (!st && rc != SQLITE_DONE)
        st = hl_db_err(d, rc, "capture range read");
    sqlite3_reset(rg);
    if (!st && t->spanned)
        st = run_end(d, t, k, tab);
    return st;
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
static hl_status capture_table(hl_db *d, hl_table *t, sink *k, uint64_t *rows, hl_capture_tab *tab)
{
    hl_status st;
    size_t nk = t->npk ? t->npk : 1;
    rowids logged = {0};
    tab->max_seq = 0;
    if (nk > HL_CS_MAX_KEY) {
        hl_logf(HL_LOG_ERROR, "table \"%s\": primary key has more than %d columns; not replicated", t->name,
                HL_CS_MAX_KEY);
        return HL_OK;
    }
    if ((st = prepare_table(d, t)))
        return st;
    hl_value *vals = calloc(t->ncols ? t->ncols : 1, sizeof *vals);
    if (!vals)
        return HL_ERR_NOMEM;
    st = capture_log(d, t, k, rows, tab, vals, &logged);
    if (!st && t->int_key && hwm_get(d, t, &tab->hwm))
        st = capture_range(d, t, k, rows, tab, vals, &logged);
    free(vals);
    free(logged.v);
    return st;
}

/* Raises t's high-water mark to top. */
static hl_status hwm_put(hl_db *d, const hl_table *t, int64_t top)
{
    sqlite3_stmt *hp = d->st_hwm_put;
    sqlite3_bind_text(hp, 1, t->name, -1, SQLITE_STATIC);
    sqlite3_bind_int64(hp, 2, top);
    int rc = sqlite3_step(hp);
    sqlite3_reset(hp);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "hwm put");
}

/* Deletes t's change-log entries up to max_seq, the last one a capture read. */
static hl_status log_delete(hl_db *d, hl_table *t, int64_t max_seq)
{
    if (max_seq <= 0)
        return HL_OK;
    sqlite3_bind_int64(t->st_log_del, 1, max_seq);
    int rc = sqlite3_step(t->st_log_del);
    sqlite3_reset(t->st_log_del);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "capture log delete");
}

/* Whether the change logs hold more than HL_SNAPSHOT_ROWS entries (a bound
 * from each log's ends; stops counting once past it). */
static hl_status logs_big(hl_db *d, bool *big)
{
    hl_status st = HL_OK;
    int64_t logged = 0;
    for (size_t i = 0; i < d->schema.n && !st && logged <= HL_SNAPSHOT_ROWS; i++) {
        int64_t n = 0;
        st = log_span(d, &d->schema.t[i], &n);
        logged += n;
    }
    *big = !st && logged > HL_SNAPSHOT_ROWS;
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
    return hwm_put(d, t, tab->top);
}

void hl_capture_batch_free(hl_capture_batch *b)
{
    if (!b)
        return;
    for (size_t i = 0; i < b->nmembers; i++) {
        hl_changeset_free(b->members[i].cs);
        free(b->members[i].spanned);
        hl_buf_free(&b->members[i].payload);
    }
    free(b->members);
    for (size_t i = 0; b->tab && i < b->ntables; i++) {
        free(b->tab[i].seen);
        free(b->tab[i].runs);
    }
    free(b->tab);
    memset(b, 0, sizeof *b);
}

hl_status hl_capture_collect(hl_db *d, hl_capture_batch *b)
{
    hl_status st = HL_OK;
    sink k = {.b = b};
    memset(b, 0, sizeof *b);
    b->ntables = d->schema.n;
    b->tab = calloc(b->ntables ? b->ntables : 1, sizeof *b->tab);
    if (!b->tab || (st = member_new(d, &k)))
        return st ? st : HL_ERR_NOMEM;
    /* A big backlog in the change logs goes straight to the streaming
     * capture: reading (and sorting) it here only to give up would do the
     * work twice, and hold a second sorter's memory. */
    bool big = false;
    st = logs_big(d, &big);
    if (big) {
        hl_changeset_free(k.cs);
        hl_capture_batch_free(b);
        b->too_big = true;
        return HL_OK;
    }
    for (size_t i = 0; i < d->schema.n && !st; i++)
        st = capture_table(d, &d->schema.t[i], &k, &b->rows, &b->tab[i]);
    if (!st && k.cs->nrows)
        st = member_keep(d, &k);
    hl_changeset_free(k.cs);
    free(k.spanned);
    if (st == HL_ERR_TOO_LARGE && k.over) {
        /* More than a snapshot batch holds: hl_capture streams it. */
        hl_capture_batch_free(b);
        b->too_big = true;
        return HL_OK;
    }
    return st;
}

hl_status hl_capture_record(hl_db *d, hl_capture_batch *b)
{
    hl_status st = HL_OK;
    if (b->ntables != d->schema.n) /* the caller re-checks schema_version; cannot happen */
        return HL_ERR_INTERNAL;
    /* Versions, then the log positions read, then the outbox. */
    for (size_t i = 0; i < b->nmembers && !st; i++)
        st = member_clocks(d, b->members[i].cs, b->members[i].spanned, b->members[i].nspanned);
    for (size_t i = 0; i < b->ntables && !st; i++) {
        hl_table *t = &d->schema.t[i];
        const hl_capture_tab *ct = &b->tab[i];
        for (size_t r = 0; r + 1 < ct->nruns && !st; r += 2)
            st = run_put(d, t, ct->runs[r], ct->runs[r + 1], ct->span_hlc);
        if (!st)
            st = log_delete(d, t, ct->max_seq);
        /* After the deletion: entries range_settle adds are for the next capture. */
        if (!st && ct->ranged && ct->top > ct->hwm)
            st = range_settle(d, t, ct);
    }
    if (st || b->nmembers == 0)
        return st;
    if (d->opt.publish) {
        for (size_t i = 0; i < b->nmembers && !st; i++) {
            hl_capture_member *m = &b->members[i];
            bool more = i + 1 < b->nmembers;
            st = hl_db_outbox_put(d, m->seq, member_flags(d, more), m->nrows, m->payload.data, m->payload.len);
        }
        if (st)
            return st;
        d->next_seq += b->nmembers;
        if ((st = hl_db_meta_put(d, "next_seq", (int64_t)d->next_seq)))
            return st;
    }
    if ((st = hl_db_meta_put(d, "last_hlc", (int64_t)d->last_hlc)))
        return st;
    d->stats.rows_captured += b->rows;
    d->stats.changesets_captured += b->nmembers;
    hl_debugf("captured %llu rows as %zu changesets from %llu", (unsigned long long)b->rows, b->nmembers,
              (unsigned long long)b->members[0].seq);
    return HL_OK;
}

/*
 * Inside the write transaction, streaming: each member of the chain is
 * recorded (versions, outbox) as soon as it is cut and then freed, so memory
 * stays at one member whatever the size of what the application committed.
 * No other writer can run meanwhile, so the high-water mark moves to the last
 * rowid read without range_settle.
 */
hl_status hl_capture(hl_db *d, uint64_t *rows)
{
    hl_status st;
    sink k = {.stream = true};
    uint64_t n = 0, seq0 = d->next_seq;
    *rows = 0;
    if ((st = member_new(d, &k)))
        return st;
    /* Sorting a big change log by key takes as much memory as the page cache
     * may (SQLite sizes its sorter by cache_size), on top of the cache itself:
     * for a big backlog both shrink to HL_STREAM_CACHE_KIB meanwhile; the sort
     * spills to temporary files instead. */
    bool big = false;
    st = logs_big(d, &big);
    bool small_cache = big && d->cache_kib > HL_STREAM_CACHE_KIB;
    if (small_cache)
        st = cache_set(d, HL_STREAM_CACHE_KIB);
    for (size_t i = 0; i < d->schema.n && !st; i++) {
        hl_table *t = &d->schema.t[i];
        hl_capture_tab tab = {0};
        if (!(st = capture_table(d, t, &k, &n, &tab)) && !(st = log_delete(d, t, tab.max_seq)) && tab.ranged &&
            tab.top > tab.hwm)
            st = hwm_put(d, t, tab.top);
        free(tab.seen);
        free(tab.runs);
    }
    if (!st && k.cs->nrows)
        st = member_flush(d, &k, false);
    else if (!st && k.emitted && d->opt.publish) {
        /* The chain ended exactly at a cut: its last member has no successor. */
        st = hl_outbox_chain_end(d, d->next_seq - 1);
    }
    hl_changeset_free(k.cs);
    free(k.spanned);
    if (small_cache) {
        hl_status cst = cache_set(d, d->cache_kib);
        if (!st)
            st = cst;
    }
    if (st)
        return st;
    if (d->next_seq != seq0 && (st = hl_db_meta_put(d, "next_seq", (int64_t)d->next_seq)))
        return st;
    if (n && (st = hl_db_meta_put(d, "last_hlc", (int64_t)d->last_hlc)))
        return st;
    if (k.emitted > 1)
        hl_logf(HL_LOG_INFO, "captured a transaction of %llu rows as a chain of %llu changesets", (unsigned long long)n,
                (unsigned long long)k.emitted);
    *rows = n;
    return HL_OK;
}
