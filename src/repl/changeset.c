/*
 * changeset.c - changeset builder, CBOR codec, zstd framing, parts and
 * reassembly (docs/protocol.md is the specification).
 *
 * Encoding goes through libcbor's low-level encoders, which always emit the
 * shortest integer and length forms. Decoding does not use libcbor: the
 * grammar is small and fixed, so a hand-written reader that knows at every
 * step which item it expects can reject anything else at once, has no
 * recursion at all, and never allocates for a count before checking that the
 * remaining input could hold that many items. A payload is hostile input of
 * up to hundreds of MiB; cbor_load() would build a tree many times its size.
 * Every allocation it makes is charged against max_bytes before it is made
 * (dec_charge()), so what a changeset costs decoded is bounded too.
 */
#include "repl/changeset.h"

#include <cbor.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>
#include <zstd_errors.h>

#define ZSTD_LEVEL 1
/* Decoder window bounds. Frames written without a known content size use
 * their level's default window (2 MiB at level 3, 8 MiB up to about level 12)
 * whatever the content, so windows up to 8 MiB are always allowed; beyond
 * that only as far as the output limit needs, and never past zstd's default
 * decoder maximum of 128 MiB. */
#define WINDOWLOG_FLOOR 23
#define WINDOWLOG_MAX 27

/* The smallest encodings of a table entry (["t", ["c"], []] = 7 bytes), a
 * row ([0, 2, 0, [0], null] = 7 bytes), a name and a value; used to bound
 * counts by the remaining input before anything is allocated for them. */
#define MIN_TABLE_BYTES 7
#define MIN_ROW_BYTES 7
#define MIN_NAME_BYTES 2
#define MIN_VALUE_BYTES 1

/* What the allocator takes for a request: glibc's malloc adds an 8-byte
 * header and rounds up to 16 bytes, 32 at least (other allocators are alike).
 * The decoder charges this, not the bytes asked for, so that a payload of
 * tiny allocations (thousands of two-byte names) costs what it is charged. */
#define ALLOC_HEADER 8
#define ALLOC_ALIGN 16
#define ALLOC_MIN 32

/* ------------------------------------------------------------------ */
/* ownership helpers                                                    */
/* ------------------------------------------------------------------ */

/* Returns a malloc'ed copy of n bytes followed by a NUL, or NULL on OOM. */
static unsigned char *dup_bytes(const void *p, size_t n)
{
    if (n == SIZE_MAX)
        return NULL;
    unsigned char *c = malloc(n + 1);
    if (!c)
        return NULL;
    if (n)
        memcpy(c, p, n);
    c[n] = 0;
    return c;
}

/* ------------------------------------------------------------------ */
/* memory cost of the decoded form                                      */
/* ------------------------------------------------------------------ */

/* Cost of one allocation of n bytes (see ALLOC_HEADER); SIZE_MAX when it
 * could not be made at all. */
static size_t alloc_cost(size_t n)
{
    if (n > SIZE_MAX - ALLOC_HEADER - ALLOC_ALIGN)
        return SIZE_MAX;
    size_t c = (n + ALLOC_HEADER + ALLOC_ALIGN - 1) & ~(size_t)(ALLOC_ALIGN - 1);
    return c < ALLOC_MIN ? ALLOC_MIN : c;
}

/* Cost of an array of n items of size bytes (nothing is allocated for n == 0). */
static size_t array_cost(size_t n, size_t size)
{
    if (n == 0)
        return 0;
    return n > SIZE_MAX / size ? SIZE_MAX : alloc_cost(n * size);
}

static size_t cost_add(size_t a, size_t b)
{
    return a > SIZE_MAX - b ? SIZE_MAX : a + b;
}

/* A row's block: nkey + nvals values and strbytes bytes of TEXT/BLOB (see
 * row_block()). */
static size_t row_cost(size_t nkey, size_t nvals, size_t strbytes)
{
    size_t nv = nkey + nvals;
    if (nv < nkey || nv > (SIZE_MAX - strbytes) / sizeof(hl_value))
        return SIZE_MAX;
    return alloc_cost(nv * sizeof(hl_value) + strbytes);
}

/* A table's names: the name, the column and key arrays with each name, and
 * the scratch array table_check() sorts the columns in. */
static size_t names_cost(char *const *names, size_t n)
{
    size_t c = array_cost(n, sizeof(char *));
    for (size_t i = 0; i < n; i++)
        c = cost_add(c, alloc_cost(strlen(names[i]) + 1));
    return c;
}

static size_t table_cost(const hl_cs_table *t)
{
    size_t c = alloc_cost(strlen(t->name) + 1);
    c = cost_add(c, names_cost(t->cols, t->ncols));
    c = cost_add(c, array_cost(t->ncols, sizeof(char *))); /* table_check() scratch */
    return cost_add(c, names_cost(t->pk, t->npk));
}

static void names_free(char **v, size_t n)
{
    if (!v)
        return;
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

static void table_free(hl_cs_table *t)
{
    free(t->name);
    names_free(t->cols, t->ncols);
    names_free(t->pk, t->npk);
}

/* A row's key values, its vals and all their TEXT/BLOB bytes live in one
 * allocation starting at r->key (see row_block()), so one free releases it. */
static void row_free(hl_cs_row *r)
{
    free(r->key);
}

/*
 * Allocates the single block a row owns: nkey + nvals values followed by
 * strbytes bytes for TEXT/BLOB contents (each with its NUL). One block per row
 * instead of one allocation per string keeps the memory of a decoded payload
 * within about 24 times its size even when it is nothing but empty strings.
 * *strings receives the start of the byte area.
 */
static hl_status row_block(hl_cs_row *r, size_t nkey, size_t nvals, size_t strbytes, unsigned char **strings)
{
    size_t nv = nkey + nvals;
    if (nv < nkey || nv > (SIZE_MAX - strbytes) / sizeof(hl_value))
        return HL_ERR_NOMEM;
    hl_value *v = calloc(1, nv * sizeof(hl_value) + strbytes);
    if (!v)
        return HL_ERR_NOMEM;
    r->key = v;
    r->nkey = nkey;
    r->vals = nvals ? v + nkey : NULL;
    r->nvals = nvals;
    *strings = (unsigned char *)(v + nv);
    return HL_OK;
}

hl_changeset *hl_changeset_new(void)
{
    return calloc(1, sizeof(hl_changeset));
}

void hl_changeset_free(hl_changeset *cs)
{
    if (!cs)
        return;
    for (size_t i = 0; i < cs->ntables; i++)
        table_free(&cs->tables[i]);
    free(cs->tables);
    for (size_t i = 0; i < cs->nrows; i++)
        row_free(&cs->rows[i]);
    free(cs->rows);
    free(cs);
}

/* ------------------------------------------------------------------ */
/* validation shared by the builder and the decoder                     */
/* ------------------------------------------------------------------ */

static bool name_ok(const char *s, size_t n)
{
    return n >= 1 && n <= HL_CS_MAX_NAME && memchr(s, 0, n) == NULL;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/*
 * Checks a table's column and key lists: column names unique, key names unique
 * and each one a column. Sorting keeps this O(n log n): a hostile table may
 * have 32767 columns. Returns HL_OK, HL_ERR_INVALID with *why set, or
 * HL_ERR_NOMEM.
 */
static hl_status table_check(const char *const *cols, size_t ncols, const char *const *pk, size_t npk, const char **why)
{
    hl_status st = HL_OK;
    const char **sorted = NULL;

    if (ncols == 0) {
        *why = "table has no columns";
        return HL_ERR_INVALID;
    }
    sorted = malloc(ncols * sizeof(*sorted));
    if (!sorted)
        return HL_ERR_NOMEM;
    memcpy(sorted, cols, ncols * sizeof(*sorted));
    qsort(sorted, ncols, sizeof(*sorted), cmp_str);
    for (size_t i = 1; i < ncols; i++) {
        if (strcmp(sorted[i - 1], sorted[i]) == 0) {
            *why = "duplicate column name";
            st = HL_ERR_INVALID;
            goto out;
        }
    }
    for (size_t i = 0; i < npk; i++) {
        if (!bsearch(&pk[i], sorted, ncols, sizeof(*sorted), cmp_str)) {
            *why = "primary-key column is not a column";
            st = HL_ERR_INVALID;
            goto out;
        }
        /* npk <= HL_CS_MAX_KEY, so the quadratic scan is at most 2016 compares. */
        for (size_t j = 0; j < i; j++) {
            if (strcmp(pk[i], pk[j]) == 0) {
                *why = "duplicate primary-key column";
                st = HL_ERR_INVALID;
                goto out;
            }
        }
    }
out:
    free(sorted);
    return st;
}

/* Checks one value a caller hands to the builder or the key encoder. */
static bool value_ok(const hl_value *v)
{
    switch (v->type) {
    case HL_VAL_NULL:
    case HL_VAL_INT:
        return true;
    case HL_VAL_REAL:
        return !isnan(v->u.r);
    case HL_VAL_TEXT:
    case HL_VAL_BLOB:
        return v->u.b.p != NULL || v->u.b.n == 0;
    }
    return false;
}

/* Rough encoded size of a value: head plus content. */
static size_t value_approx(const hl_value *v)
{
    if (v->type == HL_VAL_TEXT || v->type == HL_VAL_BLOB)
        return v->u.b.n + 5;
    return v->type == HL_VAL_NULL ? 1 : 9;
}

/* ------------------------------------------------------------------ */
/* builder                                                              */
/* ------------------------------------------------------------------ */

/* Copies n names into a new array; *out is NULL when n is 0. */
static hl_status names_copy(const char *const *src, size_t n, char ***out, size_t *bytes)
{
    *out = NULL;
    if (n == 0)
        return HL_OK;
    char **v = calloc(n, sizeof(*v));
    if (!v)
        return HL_ERR_NOMEM;
    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(src[i]);
        v[i] = (char *)dup_bytes(src[i], len);
        if (!v[i]) {
            names_free(v, n);
            return HL_ERR_NOMEM;
        }
        *bytes += len + 3;
    }
    *out = v;
    return HL_OK;
}

hl_status hl_changeset_add_table(hl_changeset *cs, const char *name, const char *const *cols, size_t ncols,
                                 const char *const *pk, size_t npk, uint32_t *idx)
{
    hl_status st = HL_OK;
    const char *why = NULL;
    hl_cs_table t;
    size_t bytes = 8;

    memset(&t, 0, sizeof(t));
    if (!cs || !name || (ncols && !cols) || (npk && !pk))
        return HL_ERR_INVALID;
    if (ncols > HL_CS_MAX_COLS || npk > HL_CS_MAX_KEY || cs->ntables >= HL_CS_MAX_TABLES)
        return HL_ERR_TOO_LARGE;
    if (!name_ok(name, strlen(name)))
        return HL_ERR_INVALID;
    for (size_t i = 0; i < ncols; i++)
        if (!cols[i] || !name_ok(cols[i], strlen(cols[i])))
            return HL_ERR_INVALID;
    for (size_t i = 0; i < npk; i++)
        if (!pk[i] || !name_ok(pk[i], strlen(pk[i])))
            return HL_ERR_INVALID;
    st = table_check(cols, ncols, pk, npk, &why);
    if (st)
        return st;
    /* A changeset describes the few tables one capture cycle touched, so a
     * linear scan for a duplicate name is cheap here; the decoder sorts. */
    for (size_t i = 0; i < cs->ntables; i++)
        if (strcmp(cs->tables[i].name, name) == 0)
            return HL_ERR_INVALID;

    if (cs->ntables == cs->tables_cap) {
        size_t ncap = cs->tables_cap ? cs->tables_cap * 2 : 8;
        hl_cs_table *nt = realloc(cs->tables, ncap * sizeof(*nt));
        if (!nt)
            return HL_ERR_NOMEM;
        cs->tables = nt;
        cs->tables_cap = ncap;
    }
    t.name = (char *)dup_bytes(name, strlen(name));
    if (!t.name) {
        st = HL_ERR_NOMEM;
        goto out;
    }
    bytes += strlen(name);
    st = names_copy(cols, ncols, &t.cols, &bytes);
    if (st)
        goto out;
    t.ncols = ncols;
    st = names_copy(pk, npk, &t.pk, &bytes);
    if (st)
        goto out;
    t.npk = npk;
    cs->tables[cs->ntables] = t;
    if (idx)
        *idx = (uint32_t)cs->ntables;
    cs->ntables++;
    cs->approx_bytes += bytes;
    cs->mem_bytes = cost_add(cs->mem_bytes, table_cost(&cs->tables[cs->ntables - 1]));
out:
    if (st)
        table_free(&t);
    return st;
}

/* Copies n values into dst; TEXT and BLOB bytes go to *sp with a NUL after
 * them, so even an empty one gets a real pointer. */
static void values_copy(hl_value *dst, const hl_value *src, size_t n, unsigned char **sp)
{
    for (size_t i = 0; i < n; i++) {
        dst[i] = src[i];
        if (src[i].type == HL_VAL_TEXT || src[i].type == HL_VAL_BLOB) {
            if (src[i].u.b.n)
                memcpy(*sp, src[i].u.b.p, src[i].u.b.n);
            (*sp)[src[i].u.b.n] = 0;
            dst[i].u.b.p = *sp;
            *sp += src[i].u.b.n + 1;
        }
    }
}

/* Bytes a value needs in a row block's string area. */
static size_t value_strbytes(const hl_value *v)
{
    return v->type == HL_VAL_TEXT || v->type == HL_VAL_BLOB ? v->u.b.n + 1 : 0;
}

hl_status hl_changeset_add_row(hl_changeset *cs, uint32_t table, hl_op op, uint64_t hlc, const hl_value *key,
                               size_t nkey, const hl_value *vals, size_t nvals)
{
    hl_status st = HL_OK;
    hl_cs_row r;
    size_t bytes = 24, strbytes = 0;
    unsigned char *sp;

    memset(&r, 0, sizeof(r));
    if (!cs || table >= cs->ntables || !key)
        return HL_ERR_INVALID;
    const hl_cs_table *t = &cs->tables[table];
    if (nkey != (t->npk ? t->npk : 1))
        return HL_ERR_INVALID;
    if (op == HL_OP_UPSERT) {
        if (nvals != t->ncols || !vals)
            return HL_ERR_INVALID;
    } else if (op != HL_OP_DELETE || vals || nvals) {
        return HL_ERR_INVALID;
    }
    if (t->npk == 0 && key[0].type != HL_VAL_INT)
        return HL_ERR_INVALID;
    for (size_t i = 0; i < nkey; i++) {
        if (!value_ok(&key[i]) || value_strbytes(&key[i]) > SIZE_MAX / 2 - strbytes)
            return HL_ERR_INVALID;
        bytes += value_approx(&key[i]);
        strbytes += value_strbytes(&key[i]);
    }
    for (size_t i = 0; i < nvals; i++) {
        if (!value_ok(&vals[i]) || value_strbytes(&vals[i]) > SIZE_MAX / 2 - strbytes)
            return HL_ERR_INVALID;
        bytes += value_approx(&vals[i]);
        strbytes += value_strbytes(&vals[i]);
    }

    if (cs->nrows == cs->rows_cap) {
        size_t ncap = cs->rows_cap ? cs->rows_cap * 2 : 64;
        hl_cs_row *nr = realloc(cs->rows, ncap * sizeof(*nr));
        if (!nr)
            return HL_ERR_NOMEM;
        cs->rows = nr;
        cs->rows_cap = ncap;
    }
    r.table = table;
    r.op = op;
    r.hlc = hlc;
    st = row_block(&r, nkey, op == HL_OP_UPSERT ? nvals : 0, strbytes, &sp);
    if (st)
        return st;
    values_copy(r.key, key, nkey, &sp);
    if (op == HL_OP_UPSERT)
        values_copy(r.vals, vals, nvals, &sp);
    cs->rows[cs->nrows++] = r;
    cs->approx_bytes += bytes;
    cs->mem_bytes = cost_add(cs->mem_bytes, row_cost(nkey, op == HL_OP_UPSERT ? nvals : 0, strbytes));
    if (hlc > cs->hlc)
        cs->hlc = hlc;
    return HL_OK;
}

size_t hl_changeset_mem_cost(const hl_changeset *cs)
{
    size_t c = alloc_cost(sizeof(hl_changeset));
    c = cost_add(c, array_cost(cs->ntables, sizeof(hl_cs_table)));
    if (cs->ntables > 1) /* the decoder sorts the table names to find duplicates */
        c = cost_add(c, array_cost(cs->ntables, sizeof(char *)));
    for (size_t i = 0; i < cs->ntables; i++)
        c = cost_add(c, table_cost(&cs->tables[i]));
    c = cost_add(c, array_cost(cs->nrows, sizeof(hl_cs_row)));
    for (size_t i = 0; i < cs->nrows; i++) {
        const hl_cs_row *r = &cs->rows[i];
        size_t strbytes = 0;
        for (size_t k = 0; k < r->nkey; k++)
            strbytes = cost_add(strbytes, value_strbytes(&r->key[k]));
        for (size_t k = 0; k < r->nvals; k++)
            strbytes = cost_add(strbytes, value_strbytes(&r->vals[k]));
        c = cost_add(c, row_cost(r->nkey, r->nvals, strbytes));
    }
    return c;
}

/* ------------------------------------------------------------------ */
/* encoder                                                              */
/* ------------------------------------------------------------------ */

/* libcbor's encoders write into a caller buffer and return 0 when it is too
 * small; 9 bytes hold any head, so 0 here means a bug. */
static hl_status put(hl_buf *b, const unsigned char *tmp, size_t n)
{
    if (n == 0)
        return HL_ERR_INTERNAL;
    return hl_buf_add(b, tmp, n);
}

static hl_status enc_uint(hl_buf *b, uint64_t v)
{
    unsigned char tmp[9];
    return put(b, tmp, cbor_encode_uint(v, tmp, sizeof(tmp)));
}

static hl_status enc_int(hl_buf *b, int64_t v)
{
    unsigned char tmp[9];
    if (v >= 0)
        return put(b, tmp, cbor_encode_uint((uint64_t)v, tmp, sizeof(tmp)));
    /* CBOR major type 1 carries -1 - v; ~v computes it without overflow at INT64_MIN. */
    return put(b, tmp, cbor_encode_negint(~(uint64_t)v, tmp, sizeof(tmp)));
}

static hl_status enc_array(hl_buf *b, size_t n)
{
    unsigned char tmp[9];
    return put(b, tmp, cbor_encode_array_start(n, tmp, sizeof(tmp)));
}

static hl_status enc_bytes(hl_buf *b, bool text, const void *p, size_t n)
{
    unsigned char tmp[9];
    size_t h = text ? cbor_encode_string_start(n, tmp, sizeof(tmp)) : cbor_encode_bytestring_start(n, tmp, sizeof(tmp));
    hl_status st = put(b, tmp, h);
    if (st)
        return st;
    return hl_buf_add(b, p, n);
}

static hl_status enc_text(hl_buf *b, const char *s)
{
    return enc_bytes(b, true, s, strlen(s));
}

static hl_status enc_null(hl_buf *b)
{
    unsigned char tmp[9];
    return put(b, tmp, cbor_encode_null(tmp, sizeof(tmp)));
}

/*
 * Encodes one value. With canon (the key encoding) a REAL holding an exact
 * int64 is written as that INTEGER: SQLite compares 1 = 1.0 and 0.0 = -0.0,
 * so such keys name the same row and must give the same bytes.
 */
static hl_status enc_value(hl_buf *b, const hl_value *v, bool canon)
{
    unsigned char tmp[9];

    switch (v->type) {
    case HL_VAL_NULL:
        return enc_null(b);
    case HL_VAL_INT:
        return enc_int(b, v->u.i);
    case HL_VAL_REAL:
        if (isnan(v->u.r))
            return HL_ERR_INVALID;
        /* The range test comes first: converting an out-of-range double to
         * int64_t is undefined. 2^63 itself is out of range. */
        if (canon && v->u.r >= -9223372036854775808.0 && v->u.r < 9223372036854775808.0 &&
            (double)(int64_t)v->u.r == v->u.r)
            return enc_int(b, (int64_t)v->u.r);
        return put(b, tmp, cbor_encode_double(v->u.r, tmp, sizeof(tmp)));
    case HL_VAL_TEXT:
    case HL_VAL_BLOB:
        if (!v->u.b.p && v->u.b.n)
            return HL_ERR_INVALID;
        return enc_bytes(b, v->type == HL_VAL_TEXT, v->u.b.p, v->u.b.n);
    }
    return HL_ERR_INVALID;
}

static hl_status enc_values(hl_buf *b, const hl_value *v, size_t n, bool canon)
{
    hl_status st = enc_array(b, n);
    for (size_t i = 0; !st && i < n; i++)
        st = enc_value(b, &v[i], canon);
    return st;
}

static hl_status enc_names(hl_buf *b, char *const *names, size_t n)
{
    hl_status st = enc_array(b, n);
    for (size_t i = 0; !st && i < n; i++)
        st = enc_text(b, names[i]);
    return st;
}

/* Writes the CBOR payload. Row shapes are re-checked so that whatever is
 * encoded also decodes, even if a caller edited the struct by hand. */
static hl_status encode_cbor(const hl_changeset *cs, hl_buf *b)
{
    hl_status st = enc_array(b, 9);
    if (!st)
        st = enc_uint(b, HL_CS_FORMAT_VERSION);
    if (!st)
        st = enc_uint(b, cs->origin);
    if (!st)
        st = enc_uint(b, cs->epoch);
    if (!st)
        st = enc_uint(b, cs->seq);
    if (!st)
        st = enc_uint(b, cs->hlc);
    if (!st)
        st = enc_uint(b, cs->wall_ms);
    if (!st)
        st = enc_bytes(b, false, cs->schema_hash, HL_SCHEMA_HASH_LEN);
    if (!st)
        st = enc_array(b, cs->ntables);
    for (size_t i = 0; !st && i < cs->ntables; i++) {
        const hl_cs_table *t = &cs->tables[i];
        st = enc_array(b, 3);
        if (!st)
            st = enc_text(b, t->name);
        if (!st)
            st = enc_names(b, t->cols, t->ncols);
        if (!st)
            st = enc_names(b, t->pk, t->npk);
    }
    if (!st)
        st = enc_array(b, cs->nrows);
    for (size_t i = 0; !st && i < cs->nrows; i++) {
        const hl_cs_row *r = &cs->rows[i];
        if (r->table >= cs->ntables)
            return HL_ERR_INVALID;
        const hl_cs_table *t = &cs->tables[r->table];
        if (r->nkey != (t->npk ? t->npk : 1))
            return HL_ERR_INVALID;
        if (r->op == HL_OP_UPSERT ? r->nvals != t->ncols : (r->op != HL_OP_DELETE || r->nvals != 0))
            return HL_ERR_INVALID;
        st = enc_array(b, 5);
        if (!st)
            st = enc_uint(b, r->table);
        if (!st)
            st = enc_uint(b, (uint64_t)r->op);
        if (!st)
            st = enc_uint(b, r->hlc);
        if (!st)
            st = enc_values(b, r->key, r->nkey, false);
        if (!st)
            st = r->op == HL_OP_UPSERT ? enc_values(b, r->vals, r->nvals, false) : enc_null(b);
    }
    return st;
}

/* Compresses p into one zstd frame (content size and checksum recorded)
 * appended to out, streaming so no compressBound()-sized buffer is needed next
 * to a large payload. Level 1: on our 2-core machines level 3 cost ~5 % of
 * end-to-end throughput for a few percent of size (docs/performance.md). */
static hl_status zstd_compress(const unsigned char *p, size_t n, hl_buf *out)
{
    hl_status st = HL_OK;
    ZSTD_CCtx *cc = ZSTD_createCCtx();
    size_t chunk_len = ZSTD_CStreamOutSize();
    unsigned char *chunk = malloc(chunk_len);
    ZSTD_inBuffer in = {p, n, 0};

    if (!cc || !chunk) {
        st = HL_ERR_NOMEM;
        goto out;
    }
    if (ZSTD_isError(ZSTD_CCtx_setParameter(cc, ZSTD_c_compressionLevel, ZSTD_LEVEL)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(cc, ZSTD_c_checksumFlag, 1)) ||
        ZSTD_isError(ZSTD_CCtx_setPledgedSrcSize(cc, n))) {
        st = HL_ERR_INTERNAL;
        goto out;
    }
    for (;;) {
        ZSTD_outBuffer o = {chunk, chunk_len, 0};
        size_t left = ZSTD_compressStream2(cc, &o, &in, ZSTD_e_end);
        if (ZSTD_isError(left)) {
            st = ZSTD_getErrorCode(left) == ZSTD_error_memory_allocation ? HL_ERR_NOMEM : HL_ERR_INTERNAL;
            goto out;
        }
        st = hl_buf_add(out, chunk, o.pos);
        if (st || left == 0)
            goto out;
    }
out:
    free(chunk);
    ZSTD_freeCCtx(cc);
    return st;
}

static void buf_truncate(hl_buf *b, size_t len)
{
    b->len = len;
    if (b->data)
        b->data[len] = 0;
}

hl_status hl_changeset_encode(const hl_changeset *cs, bool compress, hl_buf *out)
{
    hl_status st;
    hl_buf tmp;
    size_t old;

    if (!cs || !out)
        return HL_ERR_INVALID;
    old = out->len;
    if (!compress) {
        st = encode_cbor(cs, out);
    } else {
        /* The uncompressed form is our own data from the local database; the
         * cap that matters is out's, checked as the frame is appended. */
        hl_buf_init(&tmp, SIZE_MAX - 1);
        st = encode_cbor(cs, &tmp);
        if (!st)
            st = zstd_compress(tmp.data, tmp.len, out);
        hl_buf_free(&tmp);
    }
    if (st)
        buf_truncate(out, old);
    return st;
}

hl_status hl_key_encode(const hl_value *key, size_t n, hl_buf *out)
{
    hl_status st;
    size_t old;

    if (!out || !key || n == 0 || n > HL_CS_MAX_KEY)
        return HL_ERR_INVALID;
    old = out->len;
    st = enc_values(out, key, n, true);
    if (st)
        buf_truncate(out, old);
    return st;
}

/* ------------------------------------------------------------------ */
/* decoder                                                              */
/* ------------------------------------------------------------------ */

typedef struct dec {
    const unsigned char *start, *p, *end;
    char *err;
    size_t errlen;
    size_t budget;  /* what the decoded form may cost (hl_changeset_mem_cost()) */
    size_t charged; /* what its allocations so far cost */
} dec;

/* Records why decoding failed (with the byte offset) and returns HL_ERR_DECODE. */
static hl_status dec_fail(dec *d, const char *why)
{
    if (d->err && d->errlen)
        snprintf(d->err, d->errlen, "%s at byte %zu", why, (size_t)(d->p - d->start));
    return HL_ERR_DECODE;
}

/*
 * Charges an allocation of the given cost (alloc_cost() etc.) against the
 * budget, before it is made. Every allocation that becomes part of the decoded
 * changeset, and every scratch array, is charged, so the decoded form never
 * costs more than the budget however well the payload compressed.
 */
static hl_status dec_charge(dec *d, size_t cost)
{
    if (cost > d->budget - d->charged) {
        if (d->err && d->errlen)
            snprintf(d->err, d->errlen, "decoded changeset would need more than the limit of %zu bytes at byte %zu",
                     d->budget, (size_t)(d->p - d->start));
        return HL_ERR_TOO_LARGE;
    }
    d->charged += cost;
    return HL_OK;
}

static size_t dec_left(const dec *d)
{
    return (size_t)(d->end - d->p);
}

/*
 * Reads one item's initial byte and argument (RFC 8949 §3). Indefinite lengths
 * and the break code (additional information 31) and the reserved values 28-30
 * are rejected. Non-shortest argument forms are accepted.
 */
static hl_status dec_head(dec *d, unsigned *major, unsigned *ai, uint64_t *arg)
{
    size_t extra;
    uint64_t v;

    *major = *ai = 0; /* defined even on failure */
    *arg = 0;
    if (dec_left(d) < 1)
        return dec_fail(d, "truncated");
    *major = d->p[0] >> 5;
    *ai = d->p[0] & 31;
    if (*ai < 24)
        extra = 0;
    else if (*ai <= 27)
        extra = (size_t)1 << (*ai - 24);
    else
        return dec_fail(d, *ai == 31 ? "indefinite length or break" : "reserved additional information");
    if (dec_left(d) - 1 < extra)
        return dec_fail(d, "truncated");
    v = extra ? 0 : *ai;
    for (size_t i = 0; i < extra; i++)
        v = v << 8 | d->p[1 + i];
    d->p += 1 + extra;
    *arg = v;
    return HL_OK;
}

static hl_status dec_uint(dec *d, uint64_t *v, const char *what)
{
    unsigned major, ai;
    hl_status st = dec_head(d, &major, &ai, v);
    if (st)
        return st;
    if (major != 0)
        return dec_fail(d, what);
    return HL_OK;
}

/* Reads an array head whose count must be at most max and must fit in the
 * remaining input at min_item bytes per item - before anything is allocated. */
static hl_status dec_array(dec *d, uint64_t *n, uint64_t max, size_t min_item, const char *what)
{
    unsigned major, ai;
    hl_status st = dec_head(d, &major, &ai, n);
    if (st)
        return st;
    if (major != 4)
        return dec_fail(d, what);
    if (*n > max)
        return dec_fail(d, "count over limit");
    if (*n > dec_left(d) / min_item)
        return dec_fail(d, "count larger than the remaining input");
    return HL_OK;
}

static hl_status dec_array_exact(dec *d, uint64_t want, size_t min_item, const char *what)
{
    uint64_t n;
    hl_status st = dec_array(d, &n, want, min_item, what);
    if (st)
        return st;
    if (n != want)
        return dec_fail(d, what);
    return HL_OK;
}

/* Reads a definite-length string of the given major type (2 bytes, 3 text);
 * *s points into the input. */
static hl_status dec_string(dec *d, unsigned want, const unsigned char **s, size_t *n, const char *what)
{
    unsigned major, ai;
    uint64_t len;
    hl_status st;

    *s = NULL; /* defined even on failure */
    *n = 0;
    st = dec_head(d, &major, &ai, &len);
    if (st)
        return st;
    if (major != want)
        return dec_fail(d, what);
    if (len > dec_left(d))
        return dec_fail(d, "string longer than the remaining input");
    *s = d->p;
    *n = (size_t)len;
    d->p += len;
    return HL_OK;
}

static hl_status dec_name(dec *d, char **out, const char *what)
{
    const unsigned char *s;
    size_t n;
    hl_status st = dec_string(d, 3, &s, &n, what);
    if (st)
        return st;
    if (!name_ok((const char *)s, n))
        return dec_fail(d, "empty, overlong or NUL-containing name");
    st = dec_charge(d, alloc_cost(n + 1));
    if (st)
        return st;
    *out = (char *)dup_bytes(s, n);
    return *out ? HL_OK : HL_ERR_NOMEM;
}

/* IEEE 754 half precision to double (RFC 8949 Appendix D). */
static double half_to_double(uint16_t h)
{
    int e = (h >> 10) & 0x1f;
    int m = h & 0x3ff;
    double v;

    if (e == 0)
        v = ldexp(m, -24);
    else if (e != 31)
        v = ldexp(m + 1024, e - 25);
    else
        v = m == 0 ? INFINITY : NAN;
    return (h & 0x8000) ? -v : v;
}

/*
 * Decodes one value into v. TEXT/BLOB bytes are copied to *sp (with a NUL);
 * with sp NULL nothing is copied and only *strbytes grows by what the copy
 * would need - the first of the two passes over a row (see dec_row()).
 */
static hl_status dec_value(dec *d, hl_value *v, unsigned char **sp, size_t *strbytes)
{
    unsigned major, ai;
    uint64_t arg;
    hl_status st = dec_head(d, &major, &ai, &arg);
    if (st)
        return st;

    switch (major) {
    case 0:
        if (arg > INT64_MAX)
            return dec_fail(d, "integer above INT64_MAX");
        v->type = HL_VAL_INT;
        v->u.i = (int64_t)arg;
        return HL_OK;
    case 1:
        if (arg > INT64_MAX)
            return dec_fail(d, "integer below INT64_MIN");
        v->type = HL_VAL_INT;
        v->u.i = -1 - (int64_t)arg;
        return HL_OK;
    case 2:
    case 3:
        if (arg > dec_left(d))
            return dec_fail(d, "string longer than the remaining input");
        v->type = major == 2 ? HL_VAL_BLOB : HL_VAL_TEXT;
        v->u.b.n = (size_t)arg;
        v->u.b.p = NULL;
        if (sp) {
            if (arg)
                memcpy(*sp, d->p, (size_t)arg);
            (*sp)[arg] = 0;
            v->u.b.p = *sp;
            *sp += arg + 1;
        } else {
            /* At most the input size plus one per value: cannot overflow. */
            *strbytes += (size_t)arg + 1;
        }
        d->p += arg;
        return HL_OK;
    case 7:
        if (ai == 22) {
            v->type = HL_VAL_NULL;
            return HL_OK;
        }
        if (ai == 25) {
            v->u.r = half_to_double((uint16_t)arg);
        } else if (ai == 26) {
            uint32_t bits = (uint32_t)arg;
            float f;
            memcpy(&f, &bits, sizeof(f));
            v->u.r = f;
        } else if (ai == 27) {
            memcpy(&v->u.r, &arg, sizeof(v->u.r));
        } else {
            return dec_fail(d, "simple value other than null");
        }
        if (isnan(v->u.r))
            return dec_fail(d, "NaN");
        v->type = HL_VAL_REAL;
        return HL_OK;
    default:
        return dec_fail(d, "not a value (array, map or tag)");
    }
}

/* Decodes an array of exactly n values into out (see dec_value() for sp). */
static hl_status dec_values(dec *d, size_t n, hl_value *out, unsigned char **sp, size_t *strbytes, const char *what)
{
    hl_value scratch;
    hl_status st = dec_array_exact(d, n, MIN_VALUE_BYTES, what);
    for (size_t i = 0; !st && i < n; i++)
        st = dec_value(d, out ? &out[i] : &scratch, sp, strbytes);
    return st;
}

hl_status hl_key_decode(const void *p, size_t len, hl_value *out, size_t *n, unsigned char *scratch)
{
    dec d = {.start = p, .p = p, .end = (const unsigned char *)p + len};
    uint64_t cnt;
    hl_status st = dec_array(&d, &cnt, HL_CS_MAX_KEY, MIN_VALUE_BYTES, "key");
    for (size_t i = 0; !st && i < cnt; i++)
        st = dec_value(&d, &out[i], &scratch, NULL);
    if (!st && d.p != d.end)
        st = HL_ERR_DECODE;
    *n = st ? 0 : (size_t)cnt;
    return st;
}

static hl_status dec_names(dec *d, uint64_t max, char ***out, size_t *nout, const char *what)
{
    uint64_t n;
    hl_status st = dec_array(d, &n, max, MIN_NAME_BYTES, what);
    if (st || n == 0)
        return st;
    st = dec_charge(d, array_cost((size_t)n, sizeof(char *)));
    if (st)
        return st;
    *out = calloc((size_t)n, sizeof(char *));
    if (!*out)
        return HL_ERR_NOMEM;
    *nout = (size_t)n;
    for (size_t i = 0; i < n; i++) {
        st = dec_name(d, &(*out)[i], what);
        if (st)
            return st;
    }
    return HL_OK;
}

/* Decodes one table entry into t (zeroed); partial results are freed by the
 * caller through the changeset. */
static hl_status dec_table(dec *d, hl_cs_table *t)
{
    const char *why = NULL;
    hl_status st = dec_array_exact(d, 3, 1, "table entry is not a 3-item array");
    if (!st)
        st = dec_name(d, &t->name, "table name is not a text string");
    if (!st)
        st = dec_names(d, HL_CS_MAX_COLS, &t->cols, &t->ncols, "columns are not an array of text strings");
    if (!st)
        st = dec_names(d, HL_CS_MAX_KEY, &t->pk, &t->npk, "primary key is not an array of text strings");
    if (!st)
        st = dec_charge(d, array_cost(t->ncols, sizeof(char *))); /* table_check()'s scratch */
    if (st)
        return st;
    st = table_check((const char *const *)t->cols, t->ncols, (const char *const *)t->pk, t->npk, &why);
    if (st == HL_ERR_INVALID)
        return dec_fail(d, why);
    return st;
}

static hl_status dec_row(dec *d, const hl_changeset *cs, hl_cs_row *r)
{
    uint64_t table, op;
    hl_status st = dec_array_exact(d, 5, 1, "row is not a 5-item array");
    if (!st)
        st = dec_uint(d, &table, "table index is not an unsigned integer");
    if (st)
        return st;
    if (table >= cs->ntables)
        return dec_fail(d, "table index out of range");
    st = dec_uint(d, &op, "op is not an unsigned integer");
    if (st)
        return st;
    if (op != HL_OP_UPSERT && op != HL_OP_DELETE)
        return dec_fail(d, "unknown op");
    r->table = (uint32_t)table;
    r->op = (hl_op)op;
    st = dec_uint(d, &r->hlc, "row hlc is not an unsigned integer");
    if (st)
        return st;

    /* Two passes over key and vals: the first validates them and sizes the
     * row's single block, the second fills it. */
    const hl_cs_table *t = &cs->tables[table];
    size_t nkey = t->npk ? t->npk : 1, nvals = op == HL_OP_UPSERT ? t->ncols : 0, strbytes = 0;
    unsigned char *sp;
    hl_value v = {.type = HL_VAL_NULL};
    dec scan = *d;
    st = dec_array_exact(&scan, nkey, MIN_VALUE_BYTES, "key length does not match the table");
    for (size_t i = 0; !st && i < nkey; i++)
        st = dec_value(&scan, &v, NULL, &strbytes);
    if (st)
        return st;
    if (t->npk == 0 && v.type != HL_VAL_INT) /* nkey is 1: v is the rowid */
        return dec_fail(&scan, "rowid key is not an integer");
    if (op == HL_OP_UPSERT) {
        st = dec_values(&scan, nvals, NULL, NULL, &strbytes, "values length does not match the table");
        if (st)
            return st;
    } else {
        unsigned major, ai;
        uint64_t arg;
        st = dec_head(&scan, &major, &ai, &arg);
        if (st)
            return st;
        if (major != 7 || ai != 22)
            return dec_fail(&scan, "delete values are not null");
    }

    st = dec_charge(d, row_cost(nkey, nvals, strbytes));
    if (!st)
        st = row_block(r, nkey, nvals, strbytes, &sp);
    if (!st)
        st = dec_values(d, nkey, r->key, &sp, NULL, "key");
    if (!st && nvals)
        st = dec_values(d, nvals, r->vals, &sp, NULL, "values");
    if (st)
        return st == HL_ERR_DECODE ? HL_ERR_INTERNAL : st; /* the first pass accepted these bytes */
    d->p = scan.p;
    return HL_OK;
}

/* The header fields: format version, origin, epoch, seq, hlc, wall_ms, schema hash. */
static hl_status dec_header(dec *d, hl_changeset *cs)
{
    uint64_t version;
    const unsigned char *hash;
    size_t hash_len;
    hl_status st = dec_uint(d, &version, "format version is not an unsigned integer");
    if (st)
        return st;
    if (version != HL_CS_FORMAT_VERSION)
        return dec_fail(d, "unsupported format version");
    st = dec_uint(d, &cs->origin, "origin is not an unsigned integer");
    if (!st)
        st = dec_uint(d, &cs->epoch, "epoch is not an unsigned integer");
    if (!st)
        st = dec_uint(d, &cs->seq, "seq is not an unsigned integer");
    if (!st)
        st = dec_uint(d, &cs->hlc, "hlc is not an unsigned integer");
    if (!st)
        st = dec_uint(d, &cs->wall_ms, "wall_ms is not an unsigned integer");
    if (!st)
        st = dec_string(d, 2, &hash, &hash_len, "schema hash is not a byte string");
    if (st)
        return st;
    if (hash_len != HL_SCHEMA_HASH_LEN)
        return dec_fail(d, "schema hash is not 32 bytes");
    memcpy(cs->schema_hash, hash, HL_SCHEMA_HASH_LEN);
    return HL_OK;
}

/* Refuses a table named twice among cs's n tables (n > 1). */
static hl_status dec_unique_tables(dec *d, const hl_changeset *cs, size_t n)
{
    hl_status st = dec_charge(d, array_cost(n, sizeof(const char *)));
    if (st)
        return st;
    const char **names = malloc(n * sizeof(*names));
    if (!names)
        return HL_ERR_NOMEM;
    for (size_t i = 0; i < n; i++)
        names[i] = cs->tables[i].name;
    qsort(names, n, sizeof(*names), cmp_str);
    for (size_t i = 1; !st && i < n; i++)
        if (strcmp(names[i - 1], names[i]) == 0)
            st = dec_fail(d, "duplicate table name");
    free(names);
    return st;
}

/* The tables array; each name appears once. */
static hl_status dec_tables(dec *d, hl_changeset *cs)
{
    uint64_t n;
    hl_status st = dec_array(d, &n, HL_CS_MAX_TABLES, MIN_TABLE_BYTES, "tables is not an array");
    if (st)
        return st;
    if (n) {
        st = dec_charge(d, array_cost((size_t)n, sizeof(hl_cs_table)));
        if (st)
            return st;
        cs->tables = calloc((size_t)n, sizeof(hl_cs_table));
        if (!cs->tables)
            return HL_ERR_NOMEM;
        cs->tables_cap = (size_t)n;
    }
    for (size_t i = 0; i < n; i++) {
        cs->ntables = i + 1; /* counted first so a partial entry is freed */
        st = dec_table(d, &cs->tables[i]);
        if (st)
            return st;
    }
    return n > 1 ? dec_unique_tables(d, cs, (size_t)n) : HL_OK;
}

/* The rows array. */
static hl_status dec_rows(dec *d, hl_changeset *cs)
{
    uint64_t n;
    hl_status st = dec_array(d, &n, SIZE_MAX, MIN_ROW_BYTES, "rows is not an array");
    if (st)
        return st;
    if (n) {
        st = dec_charge(d, array_cost((size_t)n, sizeof(hl_cs_row)));
        if (st)
            return st;
        cs->rows = calloc((size_t)n, sizeof(hl_cs_row));
        if (!cs->rows)
            return HL_ERR_NOMEM;
        cs->rows_cap = (size_t)n;
    }
    for (size_t i = 0; i < n; i++) {
        cs->nrows = i + 1;
        st = dec_row(d, cs, &cs->rows[i]);
        if (st)
            return st;
    }
    return HL_OK;
}

/* Decodes a whole uncompressed payload into cs (empty). */
static hl_status decode_cbor(dec *d, hl_changeset *cs)
{
    hl_status st = dec_array_exact(d, 9, 1, "payload is not a 9-item array");
    if (!st)
        st = dec_header(d, cs);
    if (!st)
        st = dec_tables(d, cs);
    if (!st)
        st = dec_rows(d, cs);
    if (!st && d->p != d->end)
        st = dec_fail(d, "trailing bytes after the payload");
    return st;
}

/* Smallest window log that covers max_bytes, within the bounds above: the
 * window is allocated before any output is checked, and a window larger than
 * the output limit buys nothing. */
static int window_log_for(size_t max_bytes)
{
    int w = WINDOWLOG_FLOOR;
    while (w < WINDOWLOG_MAX && ((size_t)1 << w) < max_bytes)
        w++;
    return w;
}

/* Maps a zstd decompression error: a window beyond our bound is a size limit,
 * anything else malformed input. */
static hl_status zstd_error(dec *d, size_t r)
{
    ZSTD_ErrorCode code = ZSTD_getErrorCode(r);
    if (code == ZSTD_error_memory_allocation)
        return HL_ERR_NOMEM;
    if (code == ZSTD_error_frameParameter_windowTooLarge) {
        if (d->err && d->errlen)
            snprintf(d->err, d->errlen, "zstd frame needs a window larger than allowed");
        return HL_ERR_TOO_LARGE;
    }
    return dec_fail(d, ZSTD_getErrorName(r));
}

/* Checks the frame header and picks the first output size: the size the frame
 * declares, else a guess from the input; never over max_bytes. */
static hl_status zstd_first_cap(dec *d, const unsigned char *p, size_t n, size_t max_bytes, size_t *cap)
{
    if (n < 4 || (p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24) != ZSTD_MAGICNUMBER)
        return dec_fail(d, "not a zstd frame");
    unsigned long long fcs = ZSTD_getFrameContentSize(p, n);
    if (fcs == ZSTD_CONTENTSIZE_ERROR)
        return dec_fail(d, "bad zstd frame header");
    if (fcs != ZSTD_CONTENTSIZE_UNKNOWN && fcs > max_bytes) {
        if (d->err && d->errlen)
            snprintf(d->err, d->errlen, "zstd frame declares %llu bytes, limit is %zu", fcs, max_bytes);
        return HL_ERR_TOO_LARGE;
    }
    if (fcs != ZSTD_CONTENTSIZE_UNKNOWN)
        *cap = (size_t)fcs;
    else
        *cap = n < max_bytes / 4 ? (n * 4 > 65536 ? n * 4 : 65536) : max_bytes;
    if (*cap > max_bytes)
        *cap = max_bytes;
    return HL_OK;
}

/* Output full at the limit: one more byte of output means too large, so the
 * rest is decompressed into a one-byte probe. *done when the frame ended. */
static hl_status zstd_probe_limit(dec *d, ZSTD_DCtx *dc, ZSTD_inBuffer *in, size_t max_bytes, bool *done)
{
    unsigned char probe;
    ZSTD_outBuffer o = {&probe, 1, 0};
    size_t in_before = in->pos;
    size_t r = ZSTD_decompressStream(dc, &o, in);
    if (ZSTD_isError(r))
        return zstd_error(d, r);
    if (o.pos) {
        if (d->err && d->errlen)
            snprintf(d->err, d->errlen, "zstd frame expands past the limit of %zu bytes", max_bytes);
        return HL_ERR_TOO_LARGE;
    }
    *done = r == 0;
    if (!*done && in->pos == in->size && in->pos == in_before)
        return dec_fail(d, "truncated zstd frame");
    return HL_OK;
}

/* Doubles the output buffer, up to max_bytes. */
static hl_status zstd_grow(unsigned char **buf, size_t *cap, size_t max_bytes)
{
    size_t ncap = *cap > max_bytes / 2 ? max_bytes : (*cap ? *cap * 2 : 65536);
    if (ncap > max_bytes)
        ncap = max_bytes;
    unsigned char *nb = realloc(*buf, ncap ? ncap : 1);
    if (!nb)
        return HL_ERR_NOMEM;
    *buf = nb;
    *cap = ncap;
    return HL_OK;
}

/*
 * Decompresses exactly one zstd frame of at most max_bytes output into a new
 * malloc'ed buffer (*outp, caller frees). The declared content size is only a
 * hint: it may be absent or wrong, so streaming stops as soon as the output
 * would pass max_bytes.
 */
static hl_status zstd_decompress(dec *d, const unsigned char *p, size_t n, size_t max_bytes, unsigned char **outp,
                                 size_t *outn)
{
    ZSTD_DCtx *dc = NULL;
    unsigned char *buf = NULL;
    size_t cap, pos = 0;
    ZSTD_inBuffer in = {p, n, 0};

    *outp = NULL;
    hl_status st = zstd_first_cap(d, p, n, max_bytes, &cap);
    if (st)
        return st;
    dc = ZSTD_createDCtx();
    buf = malloc(cap ? cap : 1);
    if (!dc || !buf) {
        st = HL_ERR_NOMEM;
        goto out;
    }
    if (ZSTD_isError(ZSTD_DCtx_setParameter(dc, ZSTD_d_windowLogMax, window_log_for(max_bytes)))) {
        st = HL_ERR_INTERNAL;
        goto out;
    }
    for (;;) {
        if (pos == cap && cap == max_bytes) {
            bool done = false;
            if ((st = zstd_probe_limit(d, dc, &in, max_bytes, &done)))
                goto out;
            if (done)
                break;
            continue;
        }
        if (pos == cap && (st = zstd_grow(&buf, &cap, max_bytes)))
            goto out;
        ZSTD_outBuffer o = {buf, cap, pos};
        size_t r = ZSTD_decompressStream(dc, &o, &in);
        pos = o.pos;
        if (ZSTD_isError(r)) {
            st = zstd_error(d, r);
            goto out;
        }
        if (r == 0)
            break;
        /* Room left and no input left but the frame is not finished. */
        if (in.pos == in.size && o.pos < o.size) {
            st = dec_fail(d, "truncated zstd frame");
            goto out;
        }
    }
    if (in.pos != in.size) {
        st = dec_fail(d, "trailing bytes after the zstd frame");
        goto out;
    }
    *outp = buf;
    *outn = pos;
    buf = NULL;
out:
    free(buf);
    ZSTD_freeDCtx(dc);
    return st;
}

hl_status hl_changeset_decode(const void *p, size_t n, bool compressed, size_t max_bytes, hl_changeset **out, char *err,
                              size_t errlen)
{
    hl_status st = HL_OK;
    unsigned char *raw = NULL;
    hl_changeset *cs = NULL;
    dec d;

    if (err && errlen)
        err[0] = 0;
    if (!out)
        return HL_ERR_INVALID;
    *out = NULL;
    if (!p && n)
        return HL_ERR_INVALID;
    memset(&d, 0, sizeof(d));
    d.start = d.p = p;
    d.end = d.p + n;
    d.err = err;
    d.errlen = errlen;
    d.budget = max_bytes;

    if (compressed) {
        size_t rawn = 0;
        st = zstd_decompress(&d, p, n, max_bytes, &raw, &rawn);
        if (st)
            goto out;
        d.start = d.p = raw;
        d.end = raw + rawn;
    } else if (n > max_bytes) {
        if (err && errlen)
            snprintf(err, errlen, "payload of %zu bytes, limit is %zu", n, max_bytes);
        st = HL_ERR_TOO_LARGE;
        goto out;
    }
    st = dec_charge(&d, alloc_cost(sizeof(hl_changeset)));
    if (st)
        goto out;
    cs = hl_changeset_new();
    if (!cs) {
        st = HL_ERR_NOMEM;
        goto out;
    }
    st = decode_cbor(&d, cs);
    if (st)
        goto out;
    cs->approx_bytes = d.charged;
    *out = cs;
    cs = NULL;
out:
    if (st == HL_ERR_NOMEM && err && errlen && !err[0])
        snprintf(err, errlen, "out of memory");
    hl_changeset_free(cs);
    free(raw);
    return st;
}

/* ------------------------------------------------------------------ */
/* parts                                                                */
/* ------------------------------------------------------------------ */

static void put_be(unsigned char *p, uint64_t v, int bytes)
{
    for (int i = bytes - 1; i >= 0; i--) {
        p[i] = (unsigned char)v;
        v >>= 8;
    }
}

static uint64_t get_be(const unsigned char *p, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v = v << 8 | p[i];
    return v;
}

void hl_part_header_write(const hl_part *p, unsigned char hdr[HL_PART_HEADER_LEN])
{
    memcpy(hdr, HL_PART_MAGIC, 4);
    hdr[4] = p->version;
    hdr[5] = p->flags;
    hdr[6] = hdr[7] = 0;
    put_be(hdr + 8, p->origin, 8);
    put_be(hdr + 16, p->epoch, 8);
    put_be(hdr + 24, p->seq, 8);
    put_be(hdr + 32, p->index, 4);
    put_be(hdr + 36, p->count, 4);
    put_be(hdr + 40, p->total_len, 8);
}

hl_status hl_part_parse(const void *msg, size_t n, hl_part *p)
{
    const unsigned char *m = msg;

    if (!m || !p || n < HL_PART_HEADER_LEN || memcmp(m, HL_PART_MAGIC, 4) != 0)
        return HL_ERR_DECODE;
    if (m[4] != HL_CS_FORMAT_VERSION || (m[5] & ~HL_PART_FLAGS) != 0 || m[6] != 0 || m[7] != 0)
        return HL_ERR_DECODE;
    p->version = m[4];
    p->flags = m[5];
    p->origin = get_be(m + 8, 8);
    p->epoch = get_be(m + 16, 8);
    p->seq = get_be(m + 24, 8);
    p->index = (uint32_t)get_be(m + 32, 4);
    p->count = (uint32_t)get_be(m + 36, 4);
    p->total_len = get_be(m + 40, 8);
    p->data = m + HL_PART_HEADER_LEN;
    p->len = n - HL_PART_HEADER_LEN;
    if (p->count == 0 || p->index >= p->count || p->len > p->total_len)
        return HL_ERR_DECODE;
    /* Every part carries at least one byte, except the only part of an
     * empty payload. */
    if (p->total_len == 0 ? p->count != 1 : (p->len == 0 || p->count > p->total_len))
        return HL_ERR_DECODE;
    return HL_OK;
}

uint32_t hl_part_count(size_t total_len, size_t chunk_bytes)
{
    if (chunk_bytes == 0)
        return 0;
    if (total_len == 0)
        return 1;
    size_t c = (total_len - 1) / chunk_bytes + 1;
    return c > UINT32_MAX ? 0 : (uint32_t)c;
}

hl_status hl_part_slice(hl_part *p, const void *payload, size_t total_len, size_t chunk_bytes, uint32_t index)
{
    uint32_t count = hl_part_count(total_len, chunk_bytes);

    if (!p || (!payload && total_len) || count == 0 || index >= count)
        return HL_ERR_INVALID;
    size_t off = (size_t)index * chunk_bytes;
    p->version = HL_CS_FORMAT_VERSION;
    p->index = index;
    p->count = count;
    p->total_len = total_len;
    p->data = (const unsigned char *)payload + off;
    p->len = total_len - off < chunk_bytes ? total_len - off : chunk_bytes;
    return HL_OK;
}

void hl_part_msg_id(const hl_part *p, char *buf, size_t len)
{
    if (!buf || len == 0)
        return;
    snprintf(buf, len, "%" PRIu64 "-%016" PRIx64 "-%" PRIu64 "-%" PRIu32, p->origin, p->epoch, p->seq, p->index);
}

/* Reads one unsigned number in base (10 or 16) up to the next '-' or the end;
 * exactly 16 digits for the epoch. */
static bool id_field(const char **s, int base, uint64_t max, uint64_t *out)
{
    const char *p = *s;
    uint64_t v = 0;
    size_t n = 0;
    for (; *p && *p != '-'; p++, n++) {
        int d = *p >= '0' && *p <= '9' ? *p - '0' : base == 16 && *p >= 'a' && *p <= 'f' ? *p - 'a' + 10 : -1;
        if (d < 0 || v > (max - (uint64_t)d) / (uint64_t)base)
            return false;
        v = v * (uint64_t)base + (uint64_t)d;
    }
    if (n == 0 || (base == 16 && n != 16))
        return false;
    *out = v;
    *s = *p ? p + 1 : p;
    return true;
}

hl_status hl_part_msg_id_parse(const char *id, hl_part *p)
{
    uint64_t origin, epoch, seq, index;
    const char *s = id;
    if (!id || !p || !id_field(&s, 10, UINT64_MAX, &origin) || s[-1] != '-' || !id_field(&s, 16, UINT64_MAX, &epoch) ||
        s[-1] != '-' || !id_field(&s, 10, UINT64_MAX, &seq) || s[-1] != '-' || !id_field(&s, 10, UINT32_MAX, &index) ||
        *s || s[-1] == '-')
        return HL_ERR_DECODE;
    p->origin = origin;
    p->epoch = epoch;
    p->seq = seq;
    p->index = (uint32_t)index;
    return HL_OK;
}

/* ------------------------------------------------------------------ */
/* reassembly                                                           */
/* ------------------------------------------------------------------ */

void hl_reasm_init(hl_reasm *r, size_t max_bytes)
{
    memset(r, 0, sizeof(*r));
    r->max_bytes = max_bytes;
}

static void entry_free(hl_reasm_entry *e)
{
    free(e->data);
    free(e->have_bits);
}

void hl_reasm_free(hl_reasm *r)
{
    if (!r)
        return;
    for (size_t i = 0; i < r->npending; i++)
        entry_free(&r->pending[i]);
    free(r->pending);
    hl_reasm_init(r, r->max_bytes);
}

bool hl_reasm_pending(const hl_reasm *r)
{
    return r->npending != 0;
}

/*
 * Where part p's bytes go, from its own header: every part but the last is
 * exactly chunk bytes long (protocol §1.2). A last part of count >= 2 tells
 * the chunk by what is left: (total - len) / (count - 1), which must divide
 * exactly and leave it between 1 and chunk bytes. False when no cut of
 * total_len into count parts gives this part.
 */
static bool part_geometry(const hl_part *p, uint64_t *chunk, uint64_t *off)
{
    if (p->count == 1) {
        *chunk = p->total_len ? p->total_len : 1;
        *off = 0;
        return p->len == p->total_len;
    }
    if (p->len == 0)
        return false;
    if (p->index + 1 < p->count) {
        *chunk = p->len;
        *off = (uint64_t)p->index * p->len;
        return hl_part_count((size_t)p->total_len, (size_t)p->len) == p->count;
    }
    uint64_t rest = p->total_len - p->len; /* len <= total_len: hl_part_parse checked */
    if (rest % (p->count - 1) != 0)
        return false;
    *chunk = rest / (p->count - 1);
    *off = rest;
    return p->len <= *chunk;
}

static bool recently_done(const hl_reasm *r, const hl_part *p)
{
    for (size_t i = 0; i < r->ndone; i++)
        if (r->done[i].epoch == p->epoch && r->done[i].seq == p->seq)
            return true;
    return false;
}

static hl_reasm_entry *find_entry(hl_reasm *r, const hl_part *p)
{
    for (size_t i = 0; i < r->npending; i++)
        if (r->pending[i].epoch == p->epoch && r->pending[i].seq == p->seq)
            return &r->pending[i];
    return NULL;
}

static hl_status new_entry(hl_reasm *r, const hl_part *p, uint64_t chunk, uint64_t sseq, hl_reasm_entry **out)
{
    if (r->npending >= HL_REASM_MAX_PENDING)
        return HL_ERR_BUSY;
    if (r->npending == 0 || (r->npending & (r->npending - 1)) == 0) {
        /* grow at powers of two: 1, 2, 4, ... HL_REASM_MAX_PENDING */
        size_t cap = r->npending ? r->npending * 2 : 1;
        hl_reasm_entry *np = realloc(r->pending, cap * sizeof *np);
        if (!np)
            return HL_ERR_NOMEM;
        r->pending = np;
    }
    hl_reasm_entry *e = &r->pending[r->npending];
    memset(e, 0, sizeof *e);
    /* Large buffers come from mmap and cost memory only as parts fill them. */
    e->data = malloc(p->total_len ? (size_t)p->total_len : 1);
    e->have_bits = calloc(((size_t)p->count + 7) / 8, 1);
    if (!e->data || !e->have_bits) {
        entry_free(e);
        return HL_ERR_NOMEM;
    }
    e->epoch = p->epoch;
    e->seq = p->seq;
    e->count = p->count;
    e->flags = p->flags;
    e->total_len = p->total_len;
    e->chunk = chunk;
    e->first_stream_seq = sseq;
    r->npending++;
    *out = e;
    return HL_OK;
}

hl_status hl_reasm_feed(hl_reasm *r, const hl_part *p, uint64_t sseq, hl_reasm_entry **out)
{
    uint64_t chunk, off;
    hl_status st;

    *out = NULL;
    if (p->count == 0 || p->index >= p->count || p->len > p->total_len || (!p->data && p->len))
        return HL_ERR_DECODE;
    if (p->total_len > r->max_bytes)
        return HL_ERR_TOO_LARGE;
    if (!part_geometry(p, &chunk, &off))
        return HL_ERR_DECODE;
    hl_reasm_entry *e = find_entry(r, p);
    if (e) {
        if (e->count != p->count || e->total_len != p->total_len || e->flags != p->flags || e->chunk != chunk)
            return HL_ERR_DECODE;
    } else if ((st = new_entry(r, p, chunk, sseq, &e)) != HL_OK) {
        return st;
    } else {
        e->repeat = recently_done(r, p);
    }
    if (e->have_bits[p->index / 8] & (1u << (p->index % 8)))
        return HL_OK; /* received before */
    e->have_bits[p->index / 8] |= (unsigned char)(1u << (p->index % 8));
    if (p->len)
        memcpy(e->data + off, p->data, p->len);
    e->have++;
    e->bytes += p->len;
    r->held += p->len;
    if (sseq < e->first_stream_seq)
        e->first_stream_seq = sseq;
    *out = e;
    return HL_OK;
}

static void remove_entry(hl_reasm *r, hl_reasm_entry *e)
{
    size_t i = (size_t)(e - r->pending);
    r->held -= e->bytes;
    memmove(&r->pending[i], &r->pending[i + 1], (r->npending - i - 1) * sizeof *e);
    r->npending--;
}

unsigned char *hl_reasm_take(hl_reasm *r, hl_reasm_entry *e, size_t *len, uint8_t *flags)
{
    unsigned char *data = e->data;
    *len = (size_t)e->total_len;
    *flags = e->flags;
    free(e->have_bits);
    remove_entry(r, e);
    return data;
}

void hl_reasm_mark_done(hl_reasm *r, uint64_t epoch, uint64_t seq)
{
    r->done[r->done_next].epoch = epoch;
    r->done[r->done_next].seq = seq;
    r->done_next = (r->done_next + 1) % HL_REASM_DONE_RING;
    if (r->ndone < HL_REASM_DONE_RING)
        r->ndone++;
}

void hl_reasm_drop(hl_reasm *r, hl_reasm_entry *e)
{
    entry_free(e);
    remove_entry(r, e);
}
