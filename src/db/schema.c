/*
 * schema.c - which tables replicate and what they look like.
 *
 * Every table in "main" replicates except sqlite_* tables, harmonylite's own
 * (__harmonylite__*), virtual tables and their shadow tables. Generated
 * columns are not replicated (each node computes them).
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cjson/cJSON.h>
#include <openssl/evp.h>

#include "common/log.h"
#include "db/db_int.h"

/* Finalizes t's cached statements. */
static void table_finalize(hl_table *t)
{
    sqlite3_finalize(t->st_log_read);
    sqlite3_finalize(t->st_log_del);
    sqlite3_finalize(t->st_row_del);
    sqlite3_finalize(t->st_write);
    sqlite3_finalize(t->st_insert);
    sqlite3_finalize(t->st_write_many);
    sqlite3_finalize(t->st_clock_win);
    sqlite3_finalize(t->st_clock_put);
    sqlite3_finalize(t->st_range);
    sqlite3_finalize(t->st_range_keys);
    sqlite3_finalize(t->st_range_unlogged);
    sqlite3_finalize(t->st_log_span);
    sqlite3_finalize(t->st_log_add);
    sqlite3_finalize(t->st_span_clear);
    sqlite3_finalize(t->st_span_clocked);
    sqlite3_finalize(t->st_span_prev);
    sqlite3_finalize(t->st_span_within);
    sqlite3_finalize(t->st_span_del);
    sqlite3_finalize(t->st_span_ins);
    t->st_span_clear = t->st_span_clocked = t->st_span_prev = t->st_span_within = t->st_span_del = t->st_span_ins =
        NULL;
    t->st_range = t->st_range_keys = t->st_range_unlogged = t->st_log_add = t->st_log_span = NULL;
    t->st_log_read = t->st_log_del = t->st_row_del = t->st_write = t->st_insert = t->st_write_many = NULL;
    t->write_many = 0;
    t->st_clock_win = t->st_clock_put = NULL;
    free(t->write_sig);
    t->write_sig = NULL;
}

static void table_free(hl_table *t)
{
    table_finalize(t);
    for (size_t i = 0; i < t->ncols; i++) {
        free(t->cols[i]);
        free(t->decl[i]);
    }
    free(t->cols);
    free(t->decl);
    free(t->notnull);
    free(t->pkpos);
    free(t->pk);
    free(t->name);
    free(t->rowid);
    free(t->log);
    free(t->clock);
    free(t->span);
    free(t->keysig);
    memset(t, 0, sizeof *t);
}

void hl_schema_free(hl_schema *s)
{
    if (!s)
        return;
    for (size_t i = 0; i < s->n; i++)
        table_free(&s->t[i]);
    free(s->t);
    s->t = NULL;
    s->n = 0;
}

hl_table *hl_schema_find(hl_schema *s, const char *name)
{
    for (size_t i = 0; i < s->n; i++)
        if (sqlite3_stricmp(s->t[i].name, name) == 0)
            return &s->t[i];
    return NULL;
}

int hl_table_col(const hl_table *t, const char *name)
{
    for (size_t i = 0; i < t->ncols; i++)
        if (sqlite3_stricmp(t->cols[i], name) == 0)
            return (int)i;
    return -1;
}

/* Declared type, upper-cased with runs of white space folded to one space. */
static char *normalise_type(const char *s)
{
    size_t n = strlen(s);
    char *o = malloc(n + 1), *w = o;
    if (!o)
        return NULL;
    bool space = false;
    for (const char *p = s; *p; p++) {
        if (isspace((unsigned char)*p)) {
            space = w != o;
            continue;
        }
        if (space)
            *w++ = ' ';
        space = false;
        *w++ = (char)toupper((unsigned char)*p);
    }
    *w = 0;
    return o;
}

static int cmp_table(const void *a, const void *b)
{
    return strcmp((*(const hl_table *const *)a)->name, (*(const hl_table *const *)b)->name);
}

/* Room for one more column in t's parallel column arrays. */
static hl_status columns_grow(hl_table *t, size_t *cap)
{
    if (t->ncols < *cap)
        return HL_OK;
    size_t nc = *cap ? *cap * 2 : 8;
    char **c = realloc(t->cols, nc * sizeof *c);
    if (c)
        t->cols = c;
    char **dl = realloc(t->decl, nc * sizeof *dl);
    if (dl)
        t->decl = dl;
    bool *nn = realloc(t->notnull, nc * sizeof *nn);
    if (nn)
        t->notnull = nn;
    int *pp = realloc(t->pkpos, nc * sizeof *pp);
    if (pp)
        t->pkpos = pp;
    if (!c || !dl || !nn || !pp)
        return HL_ERR_NOMEM;
    *cap = nc;
    return HL_OK;
}

/* t's key from the columns' key positions: the key columns in key order, or
 * for a table keyed by its rowid an alias of it no column shadows
 * (HL_ERR_SCHEMA when every alias is shadowed: not replicated). */
static hl_status set_key(hl_table *t)
{
    for (size_t i = 0; i < t->ncols; i++)
        if (t->pkpos[i] > 0)
            t->npk++;
    if (t->npk) {
        if (!(t->pk = calloc(t->npk, sizeof *t->pk)))
            return HL_ERR_NOMEM;
        for (size_t i = 0; i < t->ncols; i++)
            if (t->pkpos[i] > 0 && (size_t)t->pkpos[i] <= t->npk)
                t->pk[t->pkpos[i] - 1] = i;
        return HL_OK;
    }
    static const char *const aliases[] = {"rowid", "_rowid_", "oid"};
    for (int a = 0; a < 3 && !t->rowid; a++)
        if (hl_table_col(t, aliases[a]) < 0)
            t->rowid = strdup(aliases[a]);
    if (t->rowid)
        return HL_OK;
    hl_log(HL_LOG_WARN, "table has no primary key and columns shadow rowid, _rowid_ and oid; not replicated", "table",
           t->name, NULL);
    return HL_ERR_SCHEMA;
}

static hl_status load_columns(hl_db *d, hl_table *t)
{
    sqlite3_stmt *st = NULL;
    hl_status res = HL_OK;
    size_t cap = 0;
    int rc = sqlite3_prepare_v2(d->db,
                                "SELECT name, type, \"notnull\", pk FROM pragma_table_xinfo(?) "
                                "WHERE hidden = 0 ORDER BY cid",
                                -1, &st, NULL);
    if (rc != SQLITE_OK)
        return hl_db_err(d, rc, "table_xinfo");
    sqlite3_bind_text(st, 1, t->name, -1, SQLITE_STATIC);
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if ((res = columns_grow(t, &cap)))
            break;
        size_t i = t->ncols;
        t->cols[i] = strdup((const char *)sqlite3_column_text(st, 0));
        t->decl[i] =
            normalise_type(sqlite3_column_type(st, 1) == SQLITE_NULL ? "" : (const char *)sqlite3_column_text(st, 1));
        t->notnull[i] = sqlite3_column_int(st, 2) != 0;
        t->pkpos[i] = sqlite3_column_int(st, 3);
        t->ncols++;
        if (!t->cols[i] || !t->decl[i]) {
            res = HL_ERR_NOMEM;
            break;
        }
    }
    if (!res && rc != SQLITE_DONE)
        res = hl_db_err(d, rc, "table_xinfo");
    sqlite3_finalize(st);
    return res ? res : set_key(t);
}

/* Key layout signature: the key column names joined by \x1f, or "\x1erowid". */
static char *key_signature(const hl_table *t)
{
    hl_buf b;
    hl_buf_init(&b, 1u << 20);
    if (t->npk == 0)
        hl_buf_adds(&b, "\x1erowid");
    for (size_t i = 0; i < t->npk; i++) {
        if (i)
            hl_buf_addc(&b, 0x1f);
        hl_buf_adds(&b, t->cols[t->pk[i]]);
    }
    return (char *)hl_buf_steal(&b, NULL);
}

/* Appends t's part of the canonical description (docs/protocol.md §7). */
static hl_status canonical_table(hl_buf *b, const hl_table *t)
{
    size_t *ord = calloc(t->ncols ? t->ncols : 1, sizeof *ord);
    if (!ord)
        return HL_ERR_NOMEM;
    for (size_t c = 0; c < t->ncols; c++)
        ord[c] = c;
    /* insertion sort by column name: column counts are small */
    for (size_t a = 1; a < t->ncols; a++)
        for (size_t k = a; k > 0 && strcmp(t->cols[ord[k - 1]], t->cols[ord[k]]) > 0; k--) {
            size_t tmp = ord[k];
            ord[k] = ord[k - 1];
            ord[k - 1] = tmp;
        }
    hl_status st = hl_buf_addf(b, "T%zu:%s", strlen(t->name), t->name);
    for (size_t c = 0; !st && c < t->ncols; c++) {
        size_t k = ord[c];
        st = hl_buf_addf(b, "C%zu:%sD%zu:%sN%dP%d;", strlen(t->cols[k]), t->cols[k], strlen(t->decl[k]), t->decl[k],
                         t->notnull[k] ? 1 : 0, t->pkpos[k]);
    }
    free(ord);
    return st;
}

hl_status hl_schema_canonical(const hl_schema *s, hl_buf *out)
{
    /* Tables sorted by name; per table its columns sorted by name with
     * normalised type, not-null and key position. Lengths prefix every name
     * so no two schemas serialise alike. */
    const hl_table **ord = calloc(s->n ? s->n : 1, sizeof *ord);
    hl_status st = ord ? hl_buf_adds(out, "harmonylite-schema-1;") : HL_ERR_NOMEM;
    for (size_t i = 0; ord && i < s->n; i++)
        ord[i] = &s->t[i];
    if (ord)
        qsort(ord, s->n, sizeof *ord, cmp_table);
    for (size_t i = 0; !st && i < s->n; i++)
        st = canonical_table(out, ord[i]);
    free(ord);
    return st;
}

/* SHA-256 of the canonical description into s->hash; all zero when out of memory. */
static hl_status schema_hash(hl_schema *s)
{
    hl_buf b;
    hl_buf_init(&b, 256u << 20);
    hl_status st = hl_schema_canonical(s, &b);
    unsigned int n = 0;
    memset(s->hash, 0, sizeof s->hash);
    if (!st && !EVP_Digest(b.data ? b.data : (const unsigned char *)"", b.len, s->hash, &n, EVP_sha256(), NULL))
        st = HL_ERR_NOMEM;
    hl_buf_free(&b);
    return st;
}

/* The 32-byte blob meta value key into out; *found false when absent or not 32 bytes. */
static hl_status meta_hash_get(hl_db *d, const char *key, unsigned char out[32], bool *found)
{
    sqlite3_stmt *st = NULL;
    *found = false;
    int rc = sqlite3_prepare_v2(d->db, "SELECT value FROM " HL_PREFIX "meta WHERE key = ?", -1, &st, NULL);
    if (rc != SQLITE_OK)
        return hl_db_err(d, rc, "meta get");
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW && sqlite3_column_type(st, 0) == SQLITE_BLOB && sqlite3_column_bytes(st, 0) == 32) {
        memcpy(out, sqlite3_column_blob(st, 0), 32);
        *found = true;
    }
    sqlite3_finalize(st);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "meta get");
}

static hl_status meta_hash_put(hl_db *d, const char *key, const unsigned char v[32])
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(d->db,
                                "INSERT INTO " HL_PREFIX "meta(key, value) VALUES (?, ?) "
                                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                                -1, &st, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
        sqlite3_bind_blob(st, 2, v, 32, SQLITE_STATIC);
        rc = sqlite3_step(st);
    }
    sqlite3_finalize(st);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "meta put");
}

hl_status hl_db_schema_read(hl_db *d)
{
    unsigned char cur[32], prev[32];
    bool have_cur, have_prev;
    hl_status st;
    if ((st = hl_schema_scan(d, &d->schema)) || (st = meta_hash_get(d, "schema_hash", cur, &have_cur)) ||
        (st = meta_hash_get(d, "prev_schema_hash", prev, &have_prev)))
        return st;
    if (have_cur && memcmp(cur, d->schema.hash, 32) != 0) {
        memcpy(prev, cur, 32);
        have_prev = true;
    }
    d->have_prev_hash = have_prev;
    if (have_prev)
        memcpy(d->prev_hash, prev, 32);
    return HL_OK;
}

hl_status hl_schema_track(hl_db *d)
{
    unsigned char cur[32], prev[32];
    bool have_cur, have_prev;
    hl_status st;
    if ((st = meta_hash_get(d, "schema_hash", cur, &have_cur)) ||
        (st = meta_hash_get(d, "prev_schema_hash", prev, &have_prev)))
        return st;
    if (have_cur && memcmp(cur, d->schema.hash, 32) != 0) {
        /* changed, live or while we were stopped: the hash we last saw is now the previous one */
        memcpy(prev, cur, 32);
        have_prev = true;
        if ((st = meta_hash_put(d, "prev_schema_hash", prev)))
            return st;
    }
    if ((!have_cur || memcmp(cur, d->schema.hash, 32) != 0) && (st = meta_hash_put(d, "schema_hash", d->schema.hash)))
        return st;
    d->have_prev_hash = have_prev;
    if (have_prev)
        memcpy(d->prev_hash, prev, 32);
    return HL_OK;
}

/* Whether name is a shadow table of one of the virtual tables in virt (NUL
 * separated names): shadow tables of a module this process did not load show
 * as plain tables, named "<virtual table>_...". */
static bool is_shadow(const hl_buf *virt, const char *name)
{
    for (size_t off = 0; off < virt->len;) {
        const char *v = (const char *)virt->data + off;
        size_t vl = strlen(v);
        if (sqlite3_strnicmp(name, v, (int)vl) == 0 && name[vl] == '_')
            return true;
        off += vl + 1;
    }
    return false;
}

/* Appends table name to s with its columns and key; a table that cannot be
 * replicated (load_columns says why) is left out. */
static hl_status table_add(hl_db *d, hl_schema *s, size_t *cap, const char *name)
{
    if (s->n == *cap) {
        size_t nc = *cap ? *cap * 2 : 16;
        hl_table *nt = realloc(s->t, nc * sizeof *nt);
        if (!nt)
            return HL_ERR_NOMEM;
        s->t = nt;
        *cap = nc;
    }
    hl_table *t = &s->t[s->n];
    memset(t, 0, sizeof *t);
    if (!(t->name = strdup(name)))
        return HL_ERR_NOMEM;
    s->n++;
    hl_buf lb;
    hl_buf_init(&lb, 1u << 20);
    hl_buf_addf(&lb, HL_PREFIX "%s_change_log", name);
    t->log = (char *)hl_buf_steal(&lb, NULL);
    hl_buf_init(&lb, 1u << 20);
    hl_buf_addf(&lb, HL_PREFIX "%s_clock", name);
    t->clock = (char *)hl_buf_steal(&lb, NULL);
    hl_buf_init(&lb, 1u << 20);
    hl_buf_addf(&lb, HL_PREFIX "%s_span", name);
    t->span = (char *)hl_buf_steal(&lb, NULL);
    hl_status res = load_columns(d, t);
    if (res == HL_ERR_SCHEMA) {
        table_free(t);
        s->n--;
        return HL_OK;
    }
    if (res)
        return res;
    t->keysig = key_signature(t);
    return t->log && t->clock && t->span && t->keysig ? HL_OK : HL_ERR_NOMEM;
}

/* Whether t is WITHOUT ROWID, and whether it is keyed by an integer: its rowid
 * or an INTEGER PRIMARY KEY that is the rowid's alias (not in WITHOUT ROWID
 * tables, not when declared DESC: then SQLite gives it an index of its own). */
static void key_kind(hl_db *d, hl_table *t)
{
    sqlite3_stmt *w = NULL;
    /* pragma table_list has no without-rowid column in 3.40; ask sqlite_schema. */
    if (sqlite3_prepare_v2(d->db, "SELECT wr FROM pragma_table_list WHERE schema = 'main' AND name = ?", -1, &w,
                           NULL) == SQLITE_OK) {
        sqlite3_bind_text(w, 1, t->name, -1, SQLITE_STATIC);
        if (sqlite3_step(w) == SQLITE_ROW)
            t->without_rowid = sqlite3_column_int(w, 0) != 0;
    }
    sqlite3_finalize(w);
    w = NULL;
    t->int_key = t->npk == 0;
    if (t->npk == 1 && !t->without_rowid && strcmp(t->decl[t->pk[0]], "INTEGER") == 0 &&
        sqlite3_prepare_v2(d->db, "SELECT count(*) FROM pragma_index_list(?) WHERE origin = 'pk'", -1, &w, NULL) ==
            SQLITE_OK) {
        sqlite3_bind_text(w, 1, t->name, -1, SQLITE_STATIC);
        t->int_key = sqlite3_step(w) == SQLITE_ROW && sqlite3_column_int(w, 0) == 0;
        sqlite3_finalize(w);
    }
    /* Not tables keyed by the plain rowid: VACUUM renumbers those, and the
     * check for that (triggers.c) reads per-row versions. */
    t->spanned = t->int_key && t->npk == 1;
    /* Nothing in the table that makes the application's own INSERT able to
     * fail (triggers.c, NO_JD). Conservative: the word CHECK anywhere in the
     * definition counts as a constraint. The key column's NOT NULL is not
     * checked by SQLite (a NULL rowid is assigned one). */
    t->plain_insert = false;
    bool notnull = false;
    for (size_t i = 0; i < t->ncols; i++)
        notnull |= t->notnull[i] && !(t->npk == 1 && t->pk[0] == i);
    if (t->int_key && !notnull &&
        sqlite3_prepare_v2(d->db,
                           "SELECT (SELECT count(*) FROM pragma_table_xinfo(?1) WHERE hidden <> 0)"
                           " + (SELECT count(*) FROM pragma_index_list(?1) WHERE \"unique\")"
                           " + (SELECT count(*) FROM pragma_foreign_key_list(?1))"
                           " + (SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?1"
                           " AND sql LIKE '%check%')",
                           -1, &w, NULL) == SQLITE_OK) {
        sqlite3_bind_text(w, 1, t->name, -1, SQLITE_STATIC);
        t->plain_insert = sqlite3_step(w) == SQLITE_ROW && sqlite3_column_int(w, 0) == 0;
        sqlite3_finalize(w);
    }
}

hl_status hl_schema_scan(hl_db *d, hl_schema *out)
{
    sqlite3_stmt *st = NULL;
    hl_schema s = {0};
    hl_status res = HL_OK;
    size_t cap = 0;
    hl_buf virt; /* names of virtual tables, NUL separated: their shadow tables start with "<name>_" */
    hl_buf_init(&virt, 64u << 20);

    int rc = sqlite3_prepare_v2(d->db,
                                "SELECT name, type FROM pragma_table_list WHERE schema = 'main' "
                                "AND type IN ('table', 'virtual', 'shadow') ORDER BY type = 'table', name",
                                -1, &st, NULL);
    if (rc != SQLITE_OK) {
        res = hl_db_err(d, rc, "table_list");
        goto out;
    }
    while (!res && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        const char *name = (const char *)sqlite3_column_text(st, 0);
        const char *type = (const char *)sqlite3_column_text(st, 1);
        if (strncmp(name, "sqlite_", 7) == 0 || strncmp(name, HL_PREFIX, strlen(HL_PREFIX)) == 0 ||
            strcmp(type, "shadow") == 0)
            continue;
        if (strcmp(type, "virtual") == 0) {
            hl_log(HL_LOG_INFO, "virtual table skipped: virtual tables and their shadow tables are not replicated",
                   "table", name, NULL);
            hl_buf_add(&virt, name, strlen(name) + 1);
            continue;
        }
        if (!is_shadow(&virt, name))
            res = table_add(d, &s, &cap, name);
    }
    if (res)
        goto out;
    if (rc != SQLITE_DONE) {
        res = hl_db_err(d, rc, "table_list");
        goto out;
    }
    for (size_t i = 0; i < s.n; i++)
        key_kind(d, &s.t[i]);
    if ((res = schema_hash(&s)))
        goto out;
    hl_schema_free(out);
    *out = s;
    memset(&s, 0, sizeof s);
out:
    sqlite3_finalize(st);
    hl_schema_free(&s);
    hl_buf_free(&virt);
    return res;
}

char *hl_schema_json(const hl_schema *s)
{
    cJSON *arr = cJSON_CreateArray();
    for (size_t i = 0; arr && i < s->n; i++) {
        const hl_table *t = &s->t[i];
        cJSON *o = cJSON_CreateObject(), *cols = cJSON_CreateArray();
        cJSON_AddStringToObject(o, "name", t->name);
        cJSON_AddStringToObject(o, "key", t->npk ? "primary_key" : "rowid");
        cJSON_AddBoolToObject(o, "without_rowid", t->without_rowid);
        for (size_t c = 0; c < t->ncols; c++) {
            cJSON *col = cJSON_CreateObject();
            cJSON_AddStringToObject(col, "name", t->cols[c]);
            cJSON_AddStringToObject(col, "type", t->decl[c]);
            cJSON_AddBoolToObject(col, "notnull", t->notnull[c]);
            cJSON_AddNumberToObject(col, "pk", t->pkpos[c]);
            cJSON_AddItemToArray(cols, col);
        }
        cJSON_AddItemToObject(o, "columns", cols);
        cJSON_AddItemToArray(arr, o);
    }
    char *json = arr ? cJSON_PrintUnformatted(arr) : NULL;
    cJSON_Delete(arr);
    return json;
}

hl_status hl_db_schema_describe(sqlite3 *db, unsigned char hash[32],
                                void (*each)(void *arg, const char *table, const char *int_key), void *arg)
{
    hl_db tmp;
    hl_schema s = {0};
    memset(&tmp, 0, sizeof tmp);
    tmp.db = db;
    hl_status st = hl_schema_scan(&tmp, &s);
    if (!st) {
        memcpy(hash, s.hash, 32);
        for (size_t i = 0; each && i < s.n; i++) {
            const hl_table *t = &s.t[i];
            each(arg, t->name, t->int_key ? (t->npk ? t->cols[t->pk[0]] : t->rowid) : NULL);
        }
    }
    hl_schema_free(&s);
    return st;
}
