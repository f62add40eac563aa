/*
 * test_changeset.c - the changeset codec, parts and reassembly.
 *
 * The test vectors live in docs/protocol.md (```vector blocks) and are parsed
 * from there, so the specification and the code cannot drift apart: each named
 * vector is rebuilt here in C, encoded, and compared byte for byte, then the
 * document's bytes are decoded and compared with the rebuilt changeset.
 *
 * With HL_FUZZ_CORPUS_OUT=<dir> set, the "corpus" test also writes the fuzz
 * seed corpus (fuzz/corpus/changeset/) into that directory.
 */
#include <check.h>
#include <errno.h>
#include <malloc.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

#include "repl/changeset.h"

#ifndef HL_SOURCE_DIR
#error "HL_SOURCE_DIR must name the source tree (the build defines it)"
#endif

#define MiB ((size_t)1 << 20)

/* ------------------------------------------------------------------ */
/* allocation meter                                                     */
/* ------------------------------------------------------------------ */

/*
 * This test is linked with --wrap for malloc, calloc, realloc and free
 * (CMakeLists.txt), so every allocation the code under test makes passes
 * through here. While metering, the live bytes (as malloc_usable_size() counts
 * them) and their peak are tracked, and a request that would take the live
 * total past meter_cap fails: a decoder that does not bound its memory gets
 * NULL instead of the machine's memory. Not thread-safe; the codec tests are
 * single-threaded.
 */
void *__real_malloc(size_t n);
void *__real_calloc(size_t n, size_t size);
void *__real_realloc(void *p, size_t n);
void __real_free(void *p);

static bool metering;
static size_t meter_live, meter_peak, meter_cap;

static void meter_add(void *p)
{
    if (!metering || !p)
        return;
    meter_live += malloc_usable_size(p);
    if (meter_live > meter_peak)
        meter_peak = meter_live;
}

static void meter_sub(void *p)
{
    if (!metering || !p)
        return;
    size_t n = malloc_usable_size(p);
    meter_live = n < meter_live ? meter_live - n : 0;
}

static bool meter_refuses(size_t n)
{
    return metering && (n > meter_cap || meter_live > meter_cap - n);
}

void *__wrap_malloc(size_t n)
{
    if (meter_refuses(n))
        return NULL;
    void *p = __real_malloc(n);
    meter_add(p);
    return p;
}

void *__wrap_calloc(size_t n, size_t size)
{
    if (size && n > SIZE_MAX / size)
        return NULL;
    if (meter_refuses(n * size))
        return NULL;
    void *p = __real_calloc(n, size);
    meter_add(p);
    return p;
}

void *__wrap_realloc(void *p, size_t n)
{
    size_t old = p ? malloc_usable_size(p) : 0;
    if (n > old && meter_refuses(n - old))
        return NULL;
    meter_sub(p);
    void *q = __real_realloc(p, n);
    if (!q && n) {
        meter_add(p); /* p is still there */
        return NULL;
    }
    meter_add(q);
    return q;
}

void __wrap_free(void *p)
{
    meter_sub(p);
    __real_free(p);
}

static void meter_start(size_t cap)
{
    meter_live = meter_peak = 0;
    meter_cap = cap;
    metering = true;
}

/* Stops metering and returns the peak. */
static size_t meter_stop(void)
{
    metering = false;
    return meter_peak;
}

/* ------------------------------------------------------------------ */
/* helpers                                                              */
/* ------------------------------------------------------------------ */

static uint64_t rng_state;

/* xorshift64*: deterministic, so every failure reproduces. */
static uint64_t rnd(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1DULL;
}

static size_t rndn(size_t n)
{
    return n ? (size_t)(rnd() % n) : 0;
}

static hl_value vnull(void)
{
    hl_value v = {.type = HL_VAL_NULL};
    return v;
}

static hl_value vint(int64_t i)
{
    hl_value v = {.type = HL_VAL_INT, .u.i = i};
    return v;
}

static hl_value vreal(double r)
{
    hl_value v = {.type = HL_VAL_REAL, .u.r = r};
    return v;
}

static hl_value vtext(const char *s)
{
    hl_value v = {.type = HL_VAL_TEXT};
    v.u.b.p = (unsigned char *)s;
    v.u.b.n = strlen(s);
    return v;
}

static hl_value vblob(const void *p, size_t n)
{
    hl_value v = {.type = HL_VAL_BLOB};
    v.u.b.p = (unsigned char *)p;
    v.u.b.n = n;
    return v;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Appends the bytes of a hex string to b; spaces are skipped. */
static void unhex(hl_buf *b, const char *hex)
{
    int hi = -1;
    for (const char *s = hex; *s; s++) {
        if (*s == ' ' || *s == '\n' || *s == '\t')
            continue;
        int v = hexval((unsigned char)*s);
        ck_assert_msg(v >= 0, "bad hex character '%c' in %s", *s, hex);
        if (hi < 0) {
            hi = v;
        } else {
            ck_assert_int_eq(hl_buf_addc(b, (unsigned char)(hi << 4 | v)), HL_OK);
            hi = -1;
        }
    }
    ck_assert_msg(hi < 0, "odd number of hex digits in %s", hex);
}

static void tohex(hl_buf *out, const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        ck_assert_int_eq(hl_buf_addf(out, "%02x", p[i]), HL_OK);
}

static void fill_hash(hl_changeset *cs)
{
    for (int i = 0; i < HL_SCHEMA_HASH_LEN; i++)
        cs->schema_hash[i] = (unsigned char)i;
}

static bool value_eq(const hl_value *a, const hl_value *b)
{
    if (a->type != b->type)
        return false;
    switch (a->type) {
    case HL_VAL_NULL:
        return true;
    case HL_VAL_INT:
        return a->u.i == b->u.i;
    case HL_VAL_REAL:
        /* Bit patterns, so -0.0 and 0.0 differ. */
        return memcmp(&a->u.r, &b->u.r, sizeof(double)) == 0;
    case HL_VAL_TEXT:
    case HL_VAL_BLOB:
        return a->u.b.n == b->u.b.n && (a->u.b.n == 0 || memcmp(a->u.b.p, b->u.b.p, a->u.b.n) == 0);
    }
    return false;
}

static bool names_eq(char **a, size_t na, char **b, size_t nb)
{
    if (na != nb)
        return false;
    for (size_t i = 0; i < na; i++)
        if (strcmp(a[i], b[i]) != 0)
            return false;
    return true;
}

/* Structural equality of everything that travels (not caps or approx_bytes). */
static bool cs_equal(const hl_changeset *a, const hl_changeset *b)
{
    if (a->origin != b->origin || a->epoch != b->epoch || a->seq != b->seq || a->hlc != b->hlc ||
        a->wall_ms != b->wall_ms || memcmp(a->schema_hash, b->schema_hash, HL_SCHEMA_HASH_LEN) != 0 ||
        a->ntables != b->ntables || a->nrows != b->nrows)
        return false;
    for (size_t i = 0; i < a->ntables; i++) {
        const hl_cs_table *x = &a->tables[i], *y = &b->tables[i];
        if (strcmp(x->name, y->name) != 0 || !names_eq(x->cols, x->ncols, y->cols, y->ncols) ||
            !names_eq(x->pk, x->npk, y->pk, y->npk))
            return false;
    }
    for (size_t i = 0; i < a->nrows; i++) {
        const hl_cs_row *x = &a->rows[i], *y = &b->rows[i];
        if (x->table != y->table || x->op != y->op || x->hlc != y->hlc || x->nkey != y->nkey || x->nvals != y->nvals ||
            (x->vals == NULL) != (y->vals == NULL))
            return false;
        for (size_t j = 0; j < x->nkey; j++)
            if (!value_eq(&x->key[j], &y->key[j]))
                return false;
        for (size_t j = 0; j < x->nvals; j++)
            if (!value_eq(&x->vals[j], &y->vals[j]))
                return false;
    }
    return true;
}

/* The invariants every decoded changeset must satisfy, whatever the input. */
static void check_consistent(const hl_changeset *cs)
{
    for (size_t i = 0; i < cs->ntables; i++) {
        const hl_cs_table *t = &cs->tables[i];
        ck_assert_ptr_nonnull(t->name);
        ck_assert(strlen(t->name) >= 1 && strlen(t->name) <= HL_CS_MAX_NAME);
        ck_assert(t->ncols >= 1 && t->ncols <= HL_CS_MAX_COLS && t->npk <= HL_CS_MAX_KEY);
        for (size_t j = 0; j < t->ncols; j++)
            ck_assert(t->cols[j] && t->cols[j][0]);
        for (size_t j = 0; j < t->npk; j++)
            ck_assert(t->pk[j] && t->pk[j][0]);
    }
    for (size_t i = 0; i < cs->nrows; i++) {
        const hl_cs_row *r = &cs->rows[i];
        ck_assert_uint_lt(r->table, cs->ntables);
        const hl_cs_table *t = &cs->tables[r->table];
        ck_assert_uint_eq(r->nkey, t->npk ? t->npk : 1);
        ck_assert_ptr_nonnull(r->key);
        if (t->npk == 0)
            ck_assert_int_eq(r->key[0].type, HL_VAL_INT);
        if (r->op == HL_OP_UPSERT) {
            ck_assert_uint_eq(r->nvals, t->ncols);
            ck_assert_ptr_nonnull(r->vals);
        } else {
            ck_assert_int_eq(r->op, HL_OP_DELETE);
            ck_assert_uint_eq(r->nvals, 0);
            ck_assert_ptr_null(r->vals);
        }
        for (size_t j = 0; j < r->nkey + r->nvals; j++) {
            const hl_value *v = j < r->nkey ? &r->key[j] : &r->vals[j - r->nkey];
            ck_assert(v->type >= HL_VAL_NULL && v->type <= HL_VAL_BLOB);
            if (v->type == HL_VAL_REAL)
                ck_assert(!isnan(v->u.r));
            if (v->type == HL_VAL_TEXT || v->type == HL_VAL_BLOB) {
                ck_assert_ptr_nonnull(v->u.b.p);
                ck_assert_int_eq(v->u.b.p[v->u.b.n], 0);
            }
        }
    }
}

static hl_status decode_buf(const hl_buf *b, bool compressed, size_t max, hl_changeset **out)
{
    char err[160];
    return hl_changeset_decode(b->data, b->len, compressed, max, out, err, sizeof(err));
}

/* Encodes cs, decodes the result and checks it is the same changeset. */
static void round_trip(const hl_changeset *cs, bool compress)
{
    hl_buf b, b2;
    hl_changeset *back = NULL;
    char err[160];

    hl_buf_init(&b, SIZE_MAX - 1);
    hl_buf_init(&b2, SIZE_MAX - 1);
    ck_assert_int_eq(hl_changeset_encode(cs, compress, &b), HL_OK);
    hl_status st = hl_changeset_decode(b.data, b.len, compress, 64 * MiB, &back, err, sizeof(err));
    ck_assert_msg(st == HL_OK, "decode: %s", err);
    check_consistent(back);
    ck_assert(cs_equal(cs, back));
    /* Encoding is deterministic: the decoded copy encodes to the same bytes. */
    ck_assert_int_eq(hl_changeset_encode(back, compress, &b2), HL_OK);
    ck_assert_uint_eq(b.len, b2.len);
    ck_assert(memcmp(b.data, b2.data, b.len) == 0);
    /* The decoder charges exactly the cost the builder's changeset reports. */
    size_t cost = hl_changeset_mem_cost(cs);
    ck_assert_uint_eq(hl_changeset_mem_cost(back), cost);
    ck_assert_uint_eq(back->approx_bytes, cost);
    hl_changeset_free(back);
    back = NULL;
    if (!compress) {
        /* What it charges covers what it allocates, and the limit is exact. */
        size_t max = cost > b.len ? cost : b.len;
        meter_start(SIZE_MAX);
        st = hl_changeset_decode(b.data, b.len, false, max, &back, err, sizeof(err));
        size_t peak = meter_stop();
        ck_assert_msg(st == HL_OK, "decode at the limit: %s", err);
        ck_assert_msg(peak <= cost, "decoding allocated %zu bytes, charged %zu", peak, cost);
        hl_changeset_free(back);
        back = NULL;
        if (cost > b.len) {
            ck_assert_int_eq(hl_changeset_decode(b.data, b.len, false, cost - 1, &back, err, sizeof(err)),
                             HL_ERR_TOO_LARGE);
            ck_assert_ptr_null(back);
            ck_assert_ptr_nonnull(strstr(err, "decoded changeset"));
        }
    }
    hl_buf_free(&b);
    hl_buf_free(&b2);
}

/* ------------------------------------------------------------------ */
/* the changesets the vectors in docs/protocol.md describe              */
/* ------------------------------------------------------------------ */

static hl_changeset *base_cs(uint64_t origin, uint64_t epoch, uint64_t seq)
{
    hl_changeset *cs = hl_changeset_new();
    ck_assert_ptr_nonnull(cs);
    cs->origin = origin;
    cs->epoch = epoch;
    cs->seq = seq;
    cs->wall_ms = 1700000000000ULL;
    fill_hash(cs);
    return cs;
}

static const unsigned char blob3[] = {0x00, 0xff, 0x10};

static hl_changeset *vec_all_types(void)
{
    static const char *const cols[] = {"id",      "i_min", "i_max",   "r", "r_negzero",
                                       "t_empty", "t_uni", "b_empty", "b", "n"};
    static const char *const pk[] = {"id"};
    hl_changeset *cs = base_cs(1, 0x0123456789abcdefULL, 1);
    uint32_t t;
    ck_assert_int_eq(hl_changeset_add_table(cs, "all_types", cols, 10, pk, 1, &t), HL_OK);
    hl_value key[] = {vint(1)};
    hl_value vals[] = {vint(1),
                       vint(INT64_MIN),
                       vint(INT64_MAX),
                       vreal(1.5),
                       vreal(-0.0),
                       vtext(""),
                       vtext("h\xc3\xa9llo \xe2\x9c\x93 \xf0\x9f\x98\x80"),
                       vblob(blob3, 0),
                       vblob(blob3, 3),
                       vnull()};
    ck_assert_int_eq(hl_changeset_add_row(cs, t, HL_OP_UPSERT, (1700000000000ULL << 16) | 1, key, 1, vals, 10), HL_OK);
    return cs;
}

static hl_changeset *vec_delete(void)
{
    static const char *const cols[] = {"id", "name"};
    static const char *const pk[] = {"id"};
    hl_changeset *cs = base_cs(2, 1, 7);
    uint32_t t;
    ck_assert_int_eq(hl_changeset_add_table(cs, "users", cols, 2, pk, 1, &t), HL_OK);
    hl_value key[] = {vint(42)};
    ck_assert_int_eq(hl_changeset_add_row(cs, t, HL_OP_DELETE, 1700000000000ULL << 16, key, 1, NULL, 0), HL_OK);
    return cs;
}

static hl_changeset *vec_rowid(void)
{
    static const char *const cols[] = {"msg", "level"};
    hl_changeset *cs = base_cs(3, 2, 1);
    uint32_t t;
    ck_assert_int_eq(hl_changeset_add_table(cs, "log", cols, 2, NULL, 0, &t), HL_OK);
    hl_value key[] = {vint(7)};
    hl_value vals[] = {vtext("boot"), vint(-1)};
    ck_assert_int_eq(hl_changeset_add_row(cs, t, HL_OP_UPSERT, 1700000000000ULL << 16, key, 1, vals, 2), HL_OK);
    return cs;
}

static hl_changeset *vec_composite(void)
{
    static const char *const cols[] = {"src", "dst", "w"};
    static const char *const pk[] = {"dst", "src"};
    static const char *const cols2[] = {"k", "v"};
    static const char *const pk2[] = {"k"};
    hl_changeset *cs = base_cs(4, 3, 2);
    uint32_t t, t2;
    ck_assert_int_eq(hl_changeset_add_table(cs, "edges", cols, 3, pk, 2, &t), HL_OK);
    ck_assert_int_eq(hl_changeset_add_table(cs, "kv", cols2, 2, pk2, 1, &t2), HL_OK);
    hl_value key[] = {vint(2), vtext("a")};
    hl_value vals[] = {vtext("a"), vint(2), vreal(0.25)};
    ck_assert_int_eq(hl_changeset_add_row(cs, t, HL_OP_UPSERT, 5, key, 2, vals, 3), HL_OK);
    hl_value key2[] = {vint(3), vtext("b")};
    ck_assert_int_eq(hl_changeset_add_row(cs, t, HL_OP_DELETE, 6, key2, 2, NULL, 0), HL_OK);
    hl_value key3[] = {vblob(blob3, 3)};
    hl_value vals3[] = {vblob(blob3, 3), vnull()};
    ck_assert_int_eq(hl_changeset_add_row(cs, t2, HL_OP_UPSERT, 7, key3, 1, vals3, 2), HL_OK);
    return cs;
}

static hl_changeset *vec_empty(void)
{
    return base_cs(5, 0, 1);
}

static hl_changeset *vec_two_part(void)
{
    static const char *const cols[] = {"id", "v"};
    static const char *const pk[] = {"id"};
    hl_changeset *cs = base_cs(7, 0xdeadbeefULL, 42);
    uint32_t t;
    ck_assert_int_eq(hl_changeset_add_table(cs, "t", cols, 2, pk, 1, &t), HL_OK);
    hl_value key[] = {vint(1)};
    hl_value vals[] = {vint(1), vtext("x")};
    ck_assert_int_eq(hl_changeset_add_row(cs, t, HL_OP_UPSERT, 9, key, 1, vals, 2), HL_OK);
    return cs;
}

typedef struct vec_builder {
    const char *name;
    hl_changeset *(*build)(void);
} vec_builder;

static const vec_builder builders[] = {
    {"upsert-all-types", vec_all_types}, {"delete", vec_delete}, {"rowid-table", vec_rowid},
    {"composite-key", vec_composite},    {"empty", vec_empty},   {"two-part-message", vec_two_part},
};

/* Key vectors: hl_key_encode() input per name. */
static size_t key_vector(const char *name, hl_value *key)
{
    if (strcmp(name, "key-int-text") == 0) {
        key[0] = vint(1);
        key[1] = vtext("a");
        return 2;
    }
    if (strcmp(name, "key-real-canonical") == 0) {
        key[0] = vreal(2.0);
        key[1] = vreal(-0.0);
        key[2] = vreal(0.5);
        return 3;
    }
    return 0;
}

static const char *const required_vectors[] = {"upsert-all-types",   "delete",          "rowid-table",
                                               "composite-key",      "empty",           "key-int-text",
                                               "key-real-canonical", "two-part-message"};

/* ------------------------------------------------------------------ */
/* reading the vectors out of docs/protocol.md                          */
/* ------------------------------------------------------------------ */

#define MAX_FIELDS 16

typedef struct vector {
    size_t nfields;
    char key[MAX_FIELDS][32];
    hl_buf val[MAX_FIELDS];
} vector;

static const char *vfield(const vector *v, const char *key)
{
    for (size_t i = 0; i < v->nfields; i++)
        if (strcmp(v->key[i], key) == 0)
            return hl_buf_str(&v->val[i]);
    return NULL;
}

static void vector_free(vector *v)
{
    for (size_t i = 0; i < v->nfields; i++)
        hl_buf_free(&v->val[i]);
    v->nfields = 0;
}

static char *read_file(const char *path, size_t *n)
{
    hl_buf b;
    char chunk[4096];
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "%s: %s", path, strerror(errno));
    hl_buf_init(&b, 16 * MiB);
    size_t got;
    while ((got = fread(chunk, 1, sizeof(chunk), f)) > 0)
        ck_assert_int_eq(hl_buf_add(&b, chunk, got), HL_OK);
    fclose(f);
    return (char *)hl_buf_steal(&b, n);
}

/*
 * Parses every ```vector block: "key: value" lines; a line starting with
 * whitespace continues the previous value (long hex and prose are wrapped);
 * msg-id values are compared verbatim, so they are never wrapped. Returns the
 * number of vectors stored in vs (at most max).
 */
static size_t parse_vectors(vector *vs, size_t max)
{
    size_t n = 0, len = 0;
    char *text = read_file(HL_SOURCE_DIR "/docs/protocol.md", &len);
    bool in = false;
    vector *cur = NULL;
    char *line = text, *end = text + len;

    while (line < end) {
        char *nl = memchr(line, '\n', (size_t)(end - line));
        size_t ll = nl ? (size_t)(nl - line) : (size_t)(end - line);
        if (!in) {
            if (ll == 9 && memcmp(line, "```vector", 9) == 0) {
                ck_assert_uint_lt(n, max);
                cur = &vs[n++];
                cur->nfields = 0;
                in = true;
            }
        } else if (ll >= 3 && memcmp(line, "```", 3) == 0) {
            in = false;
        } else if (ll > 0 && (line[0] == ' ' || line[0] == '\t')) {
            ck_assert_msg(cur->nfields > 0, "continuation line before any key in a vector");
            hl_buf *b = &cur->val[cur->nfields - 1];
            size_t i = 0;
            while (i < ll && (line[i] == ' ' || line[i] == '\t'))
                i++;
            /* Joined with one space: hex ignores it, prose needs it. */
            ck_assert_int_eq(hl_buf_addc(b, ' '), HL_OK);
            ck_assert_int_eq(hl_buf_add(b, line + i, ll - i), HL_OK);
        } else if (ll > 0) {
            char *colon = memchr(line, ':', ll);
            ck_assert_msg(colon != NULL, "vector line without ':': %.*s", (int)ll, line);
            size_t kl = (size_t)(colon - line);
            ck_assert_uint_lt(kl, sizeof(cur->key[0]));
            ck_assert_uint_lt(cur->nfields, MAX_FIELDS);
            memcpy(cur->key[cur->nfields], line, kl);
            cur->key[cur->nfields][kl] = 0;
            hl_buf *b = &cur->val[cur->nfields];
            hl_buf_init(b, 1 * MiB);
            size_t i = kl + 1;
            while (i < ll && line[i] == ' ')
                i++;
            ck_assert_int_eq(hl_buf_add(b, line + i, ll - i), HL_OK);
            cur->nfields++;
        }
        line += ll + 1;
    }
    ck_assert_msg(!in, "unterminated vector block");
    free(text);
    return n;
}

static void hex_of(const char *hex, hl_buf *out)
{
    hl_buf_init(out, 16 * MiB);
    unhex(out, hex);
}

static void assert_bytes(const char *what, const char *name, const hl_buf *got, const hl_buf *want)
{
    if (got->len == want->len && memcmp(got->data, want->data, got->len) == 0)
        return;
    hl_buf h;
    hl_buf_init(&h, 16 * MiB);
    tohex(&h, got->data, got->len);
    ck_abort_msg("vector %s: %s differs; encoder produced %s", name, what, hl_buf_str(&h));
}

static void check_part_vector(const vector *v, const char *name, const hl_changeset *cs, const hl_buf *payload)
{
    const char *chunk = vfield(v, "chunk-bytes");
    ck_assert_msg(chunk != NULL, "vector %s: no chunk-bytes", name);
    size_t chunk_bytes = strtoul(chunk, NULL, 10);
    uint32_t count = hl_part_count(payload->len, chunk_bytes);
    hl_reasm r;
    hl_reasm_init(&r, 1 * MiB);
    ck_assert_uint_eq(count, 2);
    for (uint32_t i = 0; i < count; i++) {
        char key[32], id[HL_PART_MSG_ID_LEN];
        hl_part p = {.origin = cs->origin, .epoch = cs->epoch, .seq = cs->seq, .flags = 0};
        unsigned char hdr[HL_PART_HEADER_LEN];
        hl_buf msg, want;

        ck_assert_int_eq(hl_part_slice(&p, payload->data, payload->len, chunk_bytes, i), HL_OK);
        hl_part_header_write(&p, hdr);
        hl_buf_init(&msg, 1 * MiB);
        ck_assert_int_eq(hl_buf_add(&msg, hdr, sizeof(hdr)), HL_OK);
        ck_assert_int_eq(hl_buf_add(&msg, p.data, p.len), HL_OK);
        snprintf(key, sizeof(key), "part-%u-hex", i);
        ck_assert_msg(vfield(v, key) != NULL, "vector %s: no %s", name, key);
        hex_of(vfield(v, key), &want);
        assert_bytes(key, name, &msg, &want);

        snprintf(key, sizeof(key), "msg-id-%u", i);
        hl_part_msg_id(&p, id, sizeof(id));
        ck_assert_msg(vfield(v, key) != NULL, "vector %s: no %s", name, key);
        ck_assert_str_eq(id, vfield(v, key));

        /* The document's message parses and reassembles. */
        hl_part q;
        hl_reasm_entry *e = NULL;
        ck_assert_int_eq(hl_part_parse(want.data, want.len, &q), HL_OK);
        ck_assert_int_eq(hl_reasm_feed(&r, &q, 100 + i, &e), HL_OK);
        ck_assert_ptr_nonnull(e);
        ck_assert((e->have == e->count) == (i + 1 == count));
        ck_assert_uint_eq(e->first_stream_seq, 100);
        if (i + 1 == count) {
            size_t len = 0;
            uint8_t flags = 0xff;
            unsigned char *got = hl_reasm_take(&r, e, &len, &flags);
            ck_assert_uint_eq(len, payload->len);
            ck_assert(memcmp(got, payload->data, payload->len) == 0);
            ck_assert_uint_eq(flags, 0);
            free(got);
        }
        hl_buf_free(&msg);
        hl_buf_free(&want);
    }
    ck_assert(!hl_reasm_pending(&r));
    hl_reasm_free(&r);
}

static void check_vector(const vector *v)
{
    const char *name = vfield(v, "name");
    ck_assert_msg(name != NULL, "vector without a name");
    ck_assert_msg(vfield(v, "description") != NULL, "vector %s: no description", name);

    if (vfield(v, "key-hex")) {
        hl_value key[8];
        size_t n = key_vector(name, key);
        ck_assert_msg(n > 0, "unknown key vector %s", name);
        hl_buf got, want;
        hl_buf_init(&got, 1 * MiB);
        hex_of(vfield(v, "key-hex"), &want);
        ck_assert_int_eq(hl_key_encode(key, n, &got), HL_OK);
        assert_bytes("key-hex", name, &got, &want);
        hl_buf_free(&got);
        hl_buf_free(&want);
        return;
    }

    hl_changeset *cs = NULL, *back = NULL;
    for (size_t i = 0; i < sizeof(builders) / sizeof(builders[0]); i++)
        if (strcmp(builders[i].name, name) == 0)
            cs = builders[i].build();
    ck_assert_msg(cs != NULL, "vector %s is not built by this test", name);
    ck_assert_msg(vfield(v, "changeset") != NULL, "vector %s: no changeset description", name);
    ck_assert_msg(vfield(v, "payload-hex") != NULL, "vector %s: no payload-hex", name);

    hl_buf got, want;
    hl_buf_init(&got, 16 * MiB);
    hex_of(vfield(v, "payload-hex"), &want);
    ck_assert_int_eq(hl_changeset_encode(cs, false, &got), HL_OK);
    assert_bytes("payload-hex", name, &got, &want);

    char err[160];
    hl_status st = hl_changeset_decode(want.data, want.len, false, 1 * MiB, &back, err, sizeof(err));
    ck_assert_msg(st == HL_OK, "vector %s: decode: %s", name, err);
    ck_assert_msg(cs_equal(cs, back), "vector %s: decoded changeset differs", name);
    hl_changeset_free(back);
    round_trip(cs, true);

    if (vfield(v, "chunk-bytes"))
        check_part_vector(v, name, cs, &want);

    hl_changeset_free(cs);
    hl_buf_free(&got);
    hl_buf_free(&want);
}

START_TEST(test_vectors)
{
    static vector vs[32];
    size_t n = parse_vectors(vs, 32);

    for (size_t i = 0; i < sizeof(required_vectors) / sizeof(required_vectors[0]); i++) {
        bool found = false;
        for (size_t j = 0; j < n; j++)
            found = found || (vfield(&vs[j], "name") && strcmp(vfield(&vs[j], "name"), required_vectors[i]) == 0);
        ck_assert_msg(found, "docs/protocol.md lacks vector %s", required_vectors[i]);
    }
    for (size_t i = 0; i < n; i++) {
        check_vector(&vs[i]);
        vector_free(&vs[i]);
    }
}
END_TEST

/* ------------------------------------------------------------------ */
/* random changesets                                                    */
/* ------------------------------------------------------------------ */

static const int64_t edge_ints[] = {0,           1,         -1,        23,           24,         -24,
                                    -25,         255,       256,       -256,         -257,       65535,
                                    65536,       -65536,    -65537,    4294967295,   4294967296, -4294967296,
                                    -4294967297, INT64_MAX, INT64_MIN, INT64_MIN + 1};

static hl_value rnd_value(unsigned char *scratch, size_t scratch_len, bool int_only)
{
    if (int_only)
        return vint(rnd() & 1 ? (int64_t)rnd() : edge_ints[rndn(sizeof(edge_ints) / sizeof(edge_ints[0]))]);
    switch (rndn(5)) {
    case 0:
        return vnull();
    case 1:
        return vint(rnd() & 1 ? (int64_t)rnd() : edge_ints[rndn(sizeof(edge_ints) / sizeof(edge_ints[0]))]);
    case 2: {
        static const double edge[] = {0.0, -0.0, 1.5, -2.25, 1e308, -1e-308, 5e-324, INFINITY, -INFINITY};
        if (rnd() & 1)
            return vreal(edge[rndn(sizeof(edge) / sizeof(edge[0]))]);
        uint64_t bits = rnd();
        double d;
        memcpy(&d, &bits, sizeof(d));
        return vreal(isnan(d) ? 3.0 : d);
    }
    default: {
        /* Any bytes, NUL and invalid UTF-8 included: SQLite TEXT holds them. */
        size_t n = rndn(rnd() % 8 == 0 ? scratch_len : 30);
        for (size_t i = 0; i < n; i++)
            scratch[i] = (unsigned char)rnd();
        hl_value v = vblob(scratch, n);
        if (rnd() & 1)
            v.type = HL_VAL_TEXT;
        return v;
    }
    }
}

static hl_changeset *rnd_changeset(void)
{
    static const char *const names[] = {"a", "b c", "\"q\"", "select", "\xc3\xa9t\xc3\xa9", "x_1", "Y", "z"};
    hl_changeset *cs = base_cs(rnd(), rnd(), rnd());
    size_t ntables = 1 + rndn(4);

    cs->wall_ms = rnd() >> rndn(64);
    for (size_t t = 0; t < ntables; t++) {
        char tname[32];
        const char *cols[8], *pk[3];
        size_t ncols = 1 + rndn(8), npk = rndn(4);
        if (npk > ncols)
            npk = ncols;
        for (size_t c = 0; c < ncols; c++)
            cols[c] = names[c];
        for (size_t k = 0; k < npk; k++)
            pk[k] = cols[(k + t) % ncols]; /* distinct since npk <= ncols */
        snprintf(tname, sizeof(tname), "t%zu", t);
        ck_assert_int_eq(hl_changeset_add_table(cs, tname, cols, ncols, pk, npk, NULL), HL_OK);
    }
    size_t nrows = rndn(40);
    for (size_t i = 0; i < nrows; i++) {
        unsigned char scratch[12][300];
        hl_value key[3], vals[8];
        uint32_t t = (uint32_t)rndn(ntables);
        const hl_cs_table *tb = &cs->tables[t];
        size_t nkey = tb->npk ? tb->npk : 1;
        for (size_t k = 0; k < nkey; k++)
            key[k] = rnd_value(scratch[k], sizeof(scratch[k]), tb->npk == 0);
        hl_op op = rnd() % 4 ? HL_OP_UPSERT : HL_OP_DELETE;
        if (op == HL_OP_UPSERT)
            for (size_t c = 0; c < tb->ncols; c++)
                vals[c] = rnd_value(scratch[3 + c], sizeof(scratch[3 + c]), false);
        ck_assert_int_eq(hl_changeset_add_row(cs, t, op, rnd(), key, nkey, op == HL_OP_UPSERT ? vals : NULL,
                                              op == HL_OP_UPSERT ? tb->ncols : 0),
                         HL_OK);
    }
    return cs;
}

START_TEST(test_random_round_trip)
{
    rng_state = 0x9E3779B97F4A7C15ULL;
    for (int i = 0; i < 500; i++) {
        hl_changeset *cs = rnd_changeset();
        round_trip(cs, false);
        round_trip(cs, true);
        hl_changeset_free(cs);
    }
}
END_TEST

START_TEST(test_big_blob)
{
    static const char *const cols[] = {"id", "data"};
    static const char *const pk[] = {"id"};
    size_t n = 16 * MiB;
    unsigned char *blob = malloc(n);
    hl_changeset *cs = base_cs(1, 1, 1);
    uint32_t t;

    ck_assert_ptr_nonnull(blob);
    rng_state = 42;
    for (size_t i = 0; i < n; i += 8) {
        uint64_t r = rnd();
        memcpy(blob + i, &r, 8);
    }
    ck_assert_int_eq(hl_changeset_add_table(cs, "files", cols, 2, pk, 1, &t), HL_OK);
    hl_value key[] = {vint(1)};
    hl_value vals[] = {vint(1), vblob(blob, n)};
    ck_assert_int_eq(hl_changeset_add_row(cs, t, HL_OP_UPSERT, 1, key, 1, vals, 2), HL_OK);
    ck_assert_uint_ge(cs->approx_bytes, n);
    round_trip(cs, false);
    round_trip(cs, true);

    /* One byte under the payload size is too large, both ways. */
    hl_buf b;
    hl_changeset *back = NULL;
    hl_buf_init(&b, SIZE_MAX - 1);
    ck_assert_int_eq(hl_changeset_encode(cs, false, &b), HL_OK);
    ck_assert_int_eq(decode_buf(&b, false, b.len - 1, &back), HL_ERR_TOO_LARGE);
    ck_assert_ptr_null(back);
    size_t plain = b.len;
    hl_buf_reset(&b);
    ck_assert_int_eq(hl_changeset_encode(cs, true, &b), HL_OK);
    ck_assert_int_eq(decode_buf(&b, true, plain - 1, &back), HL_ERR_TOO_LARGE);
    /* The decoded form (the blob, its NUL and the structures) costs a little
     * more than the payload: that is the limit that applies next. */
    size_t cost = hl_changeset_mem_cost(cs);
    ck_assert_uint_gt(cost, plain);
    ck_assert_uint_lt(cost, plain + 4096);
    ck_assert_int_eq(decode_buf(&b, true, cost - 1, &back), HL_ERR_TOO_LARGE);
    ck_assert_ptr_null(back);
    ck_assert_int_eq(decode_buf(&b, true, cost, &back), HL_OK);
    ck_assert_uint_eq(back->approx_bytes, cost);
    hl_changeset_free(back);
    hl_buf_free(&b);
    hl_changeset_free(cs);
    free(blob);
}
END_TEST

/* ------------------------------------------------------------------ */
/* hostile input                                                        */
/* ------------------------------------------------------------------ */

START_TEST(test_truncations)
{
    hl_changeset *cs = vec_all_types(), *cs2 = vec_composite(), *back = NULL;
    hl_changeset *sets[] = {cs, cs2};

    for (int s = 0; s < 2; s++) {
        for (int compress = 0; compress < 2; compress++) {
            hl_buf b;
            hl_buf_init(&b, 16 * MiB);
            ck_assert_int_eq(hl_changeset_encode(sets[s], compress, &b), HL_OK);
            for (size_t n = 0; n < b.len; n++) {
                char err[160];
                hl_status st = hl_changeset_decode(b.data, n, compress, 1 * MiB, &back, err, sizeof(err));
                ck_assert_msg(st == HL_ERR_DECODE, "prefix %zu of %zu: %d", n, b.len, st);
                ck_assert_ptr_null(back);
                ck_assert(err[0] != 0);
            }
            /* And one byte too many. */
            ck_assert_int_eq(hl_buf_addc(&b, 0), HL_OK);
            ck_assert_int_eq(decode_buf(&b, compress, 1 * MiB, &back), HL_ERR_DECODE);
            hl_buf_free(&b);
        }
    }
    hl_changeset_free(cs);
    hl_changeset_free(cs2);
}
END_TEST

/* Whatever a mutation does, decoding fails cleanly or yields a consistent
 * changeset whose re-encoding decodes to the same thing. */
static void mutate_and_check(const hl_buf *orig, bool compressed, int iterations)
{
    hl_buf m, e1, e2;
    hl_buf_init(&m, 16 * MiB);
    hl_buf_init(&e1, 64 * MiB);
    hl_buf_init(&e2, 64 * MiB);
    for (int it = 0; it < iterations; it++) {
        hl_changeset *cs = NULL, *cs2 = NULL;
        hl_buf_reset(&m);
        ck_assert_int_eq(hl_buf_add(&m, orig->data, orig->len), HL_OK);
        int kind = (int)rndn(4), muts = 1 + (int)rndn(3);
        for (int k = 0; k < muts && m.len > 0; k++) {
            size_t at = rndn(m.len);
            if (kind == 0)
                m.data[at] ^= (unsigned char)(1u << rndn(8));
            else if (kind == 1)
                m.data[at] = (unsigned char)rnd();
            else if (kind == 2)
                m.data[at] = (unsigned char[]){0x00, 0x17, 0x18, 0x1b, 0x3b, 0x5b, 0x7b, 0x9b, 0xf6, 0xff}[rndn(10)];
            else if (m.len > 1)
                m.len--; /* drop the last byte */
        }
        hl_status st = decode_buf(&m, compressed, 4 * MiB, &cs);
        if (st != HL_OK) {
            ck_assert_msg(st == HL_ERR_DECODE || st == HL_ERR_TOO_LARGE, "status %d", st);
            ck_assert_ptr_null(cs);
            continue;
        }
        check_consistent(cs);
        hl_buf_reset(&e1);
        hl_buf_reset(&e2);
        ck_assert_int_eq(hl_changeset_encode(cs, false, &e1), HL_OK);
        ck_assert_int_eq(decode_buf(&e1, false, 64 * MiB, &cs2), HL_OK);
        ck_assert(cs_equal(cs, cs2));
        ck_assert_int_eq(hl_changeset_encode(cs2, false, &e2), HL_OK);
        ck_assert(e1.len == e2.len && memcmp(e1.data, e2.data, e1.len) == 0);
        for (size_t i = 0; i < cs->nrows; i++) {
            hl_buf k;
            hl_buf_init(&k, 1 * MiB);
            ck_assert_int_eq(hl_key_encode(cs->rows[i].key, cs->rows[i].nkey, &k), HL_OK);
            hl_buf_free(&k);
        }
        hl_changeset_free(cs);
        hl_changeset_free(cs2);
    }
    hl_buf_free(&m);
    hl_buf_free(&e1);
    hl_buf_free(&e2);
}

START_TEST(test_mutations)
{
    rng_state = 7;
    for (int s = 0; s < 8; s++) {
        hl_changeset *cs = s < 2 ? (s ? vec_composite() : vec_all_types()) : rnd_changeset();
        hl_buf b;
        hl_buf_init(&b, 16 * MiB);
        ck_assert_int_eq(hl_changeset_encode(cs, false, &b), HL_OK);
        mutate_and_check(&b, false, 2500);
        hl_buf_reset(&b);
        ck_assert_int_eq(hl_changeset_encode(cs, true, &b), HL_OK);
        mutate_and_check(&b, true, 500);
        hl_buf_free(&b);
        hl_changeset_free(cs);
    }
}
END_TEST

/* The fixed start of a payload up to the tables: version 1, origin..wall_ms
 * all 1, a 32-byte hash of zeros. */
#define PFX                                                                                                            \
    "89 01 01 01 01 01 01 5820"                                                                                        \
    "0000000000000000000000000000000000000000000000000000000000000000"
/* One table "t" with columns "id", "v" and key "id". */
#define TBL "81 83 6174 82 626964 6176 81 626964"

static hl_status decode_hex(const char *hex, char *err, size_t errlen)
{
    hl_buf b;
    hl_changeset *cs = NULL;
    hl_buf_init(&b, 1 * MiB);
    unhex(&b, hex);
    hl_status st = hl_changeset_decode(b.data, b.len, false, 1 * MiB, &cs, err, errlen);
    if (st == HL_OK)
        check_consistent(cs);
    else
        ck_assert_ptr_null(cs);
    hl_changeset_free(cs);
    hl_buf_free(&b);
    return st;
}

static void expect(const char *hex, hl_status want)
{
    char err[160] = "";
    hl_status st = decode_hex(hex, err, sizeof(err));
    ck_assert_msg(st == want, "%s: got %d (%s), want %d", hex, st, err, want);
    if (want != HL_OK)
        ck_assert(err[0] != 0);
}

START_TEST(test_hostile)
{
    /* The grammar itself: the minimal valid forms decode. */
    expect(PFX "80 80", HL_OK);
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 f6", HL_OK);
    expect(PFX TBL "81 85 00 02 00 81 01 f6", HL_OK);

    /* Counts far beyond the input fail before allocating. */
    expect(PFX "9b 1000000000000000 80", HL_ERR_DECODE);
    expect(PFX "80 9b 1000000000000000", HL_ERR_DECODE);
    expect(PFX "80 9b ffffffffffffffff", HL_ERR_DECODE);
    expect(PFX "81 83 6174 9b 1000000000000000 80", HL_ERR_DECODE);
    expect(PFX "81 83 6174 82 626964 6176 9b 1000000000000000", HL_ERR_DECODE);
    expect(PFX "81 83 7b 7fffffffffffffff 61", HL_ERR_DECODE);
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 5b ffffffffffffffff", HL_ERR_DECODE);
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 7b 8000000000000000", HL_ERR_DECODE);
    expect(PFX "9a 00020000", HL_ERR_DECODE);              /* over HL_CS_MAX_TABLES */
    expect(PFX "81 83 6174 99 8000", HL_ERR_DECODE);       /* over HL_CS_MAX_COLS */
    expect(PFX "81 83 6174 81 6161 98 41", HL_ERR_DECODE); /* over HL_CS_MAX_KEY */

    /* Indefinite lengths, reserved values, breaks. */
    expect("9f ff", HL_ERR_DECODE);
    expect(PFX "9f ff 80", HL_ERR_DECODE);
    expect(PFX "81 83 7f 6174 ff 81 6161 80 80", HL_ERR_DECODE);
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 5f 41 00 ff", HL_ERR_DECODE);
    expect(PFX "80 1c", HL_ERR_DECODE);
    expect(PFX "80 ff", HL_ERR_DECODE);

    /* Shape and range errors. */
    expect("88 01 01 01 01 01 01 5820 0000000000000000000000000000000000000000000000000000000000000000 80",
           HL_ERR_DECODE);
    expect("89 02 01 01 01 01 01 5820 0000000000000000000000000000000000000000000000000000000000000000 80 80",
           HL_ERR_DECODE); /* unknown format version */
    expect("89 01 01 01 01 01 01 581f 00000000000000000000000000000000000000000000000000000000000000 80 80",
           HL_ERR_DECODE); /* 31-byte hash */
    expect("89 01 20 01 01 01 01 5820 0000000000000000000000000000000000000000000000000000000000000000 80 80",
           HL_ERR_DECODE);                                                           /* negative origin */
    expect(PFX "80 80 00", HL_ERR_DECODE);                                           /* trailing byte */
    expect(PFX "a0 80", HL_ERR_DECODE);                                              /* map for tables */
    expect(PFX "81 83 60 81 6161 80 80", HL_ERR_DECODE);                             /* empty table name */
    expect(PFX "81 83 6200 61 81 6161 80 80", HL_ERR_DECODE);                        /* NUL in a name */
    expect(PFX "81 83 6474747474 80 80 80", HL_ERR_DECODE);                          /* no columns */
    expect(PFX "81 83 6174 82 6161 6161 80 80", HL_ERR_DECODE);                      /* duplicate column */
    expect(PFX "81 83 6174 81 6161 81 6162 80", HL_ERR_DECODE);                      /* key column unknown */
    expect(PFX "81 83 6174 81 6161 82 6161 6161 80", HL_ERR_DECODE);                 /* duplicate key column */
    expect(PFX "82 83 6174 81 6161 80 83 6174 81 6162 80 80", HL_ERR_DECODE);        /* duplicate table */
    expect(PFX "81 83 4174 81 6161 80 80", HL_ERR_DECODE);                           /* table name as bstr */
    expect(PFX "81 84 6174 81 6161 80 80 80", HL_ERR_DECODE);                        /* 4-item table */
    expect(PFX TBL "81 85 01 01 00 81 01 82 01 f6", HL_ERR_DECODE);                  /* table index out of range */
    expect(PFX TBL "81 85 00 03 00 81 01 82 01 f6", HL_ERR_DECODE);                  /* op 3 */
    expect(PFX TBL "81 85 00 00 00 81 01 82 01 f6", HL_ERR_DECODE);                  /* op 0 */
    expect(PFX TBL "81 85 00 01 00 82 01 01 82 01 f6", HL_ERR_DECODE);               /* key too long */
    expect(PFX TBL "81 85 00 01 00 80 82 01 f6", HL_ERR_DECODE);                     /* key too short */
    expect(PFX TBL "81 85 00 01 00 81 01 81 01", HL_ERR_DECODE);                     /* vals too short */
    expect(PFX TBL "81 85 00 01 00 81 01 83 01 f6 f6", HL_ERR_DECODE);               /* vals too long */
    expect(PFX TBL "81 85 00 01 00 81 01 f6", HL_ERR_DECODE);                        /* upsert without vals */
    expect(PFX TBL "81 85 00 02 00 81 01 80", HL_ERR_DECODE);                        /* delete with vals */
    expect(PFX TBL "81 84 00 02 00 81 01 f6", HL_ERR_DECODE);                        /* 4-item row */
    expect(PFX TBL "81 85 20 01 00 81 01 82 01 f6", HL_ERR_DECODE);                  /* negative table index */
    expect(PFX TBL "81 85 00 01 00 81 81 01 82 01 f6", HL_ERR_DECODE);               /* nested array as value */
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 a0", HL_ERR_DECODE);                  /* map as value */
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 c1 01", HL_ERR_DECODE);               /* tag */
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 f5", HL_ERR_DECODE);                  /* true */
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 f7", HL_ERR_DECODE);                  /* undefined */
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 f8 ff", HL_ERR_DECODE);               /* simple(255) */
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 f9 7e00", HL_ERR_DECODE);             /* NaN (half) */
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 fa 7fc00000", HL_ERR_DECODE);         /* NaN (single) */
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 fb 7ff8000000000001", HL_ERR_DECODE); /* NaN (double) */
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 1b 8000000000000000", HL_ERR_DECODE); /* 2^63 */
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 3b 8000000000000000", HL_ERR_DECODE); /* -2^63-1 */
    expect(PFX "81 83 6174 82 6161 6162 80 81 85 00 01 00 81 6161 82 01 f6", HL_ERR_DECODE); /* text rowid */

    /* Accepted although our encoder never writes them. */
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 3b 7fffffffffffffff", HL_OK);    /* INT64_MIN */
    expect(PFX TBL "81 85 18 00 01 00 81 1b 0000000000000001 82 01 f6", HL_OK); /* long forms */
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 f9 3c00", HL_OK);                /* half 1.0 */
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 f9 7c00", HL_OK);                /* half +inf */
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 fa 3fc00000", HL_OK);            /* single 1.5 */
    expect(PFX TBL "81 85 00 01 00 81 f6 82 f6 f6", HL_OK);                     /* NULL key value */
    expect(PFX TBL "81 85 00 01 00 81 01 82 01 62 ff00", HL_OK);                /* non-UTF-8 TEXT */
}
END_TEST

START_TEST(test_half_and_single_floats)
{
    static const struct {
        const char *hex;
        double want;
    } cases[] = {
        {"f9 3c00", 1.0},
        {"f9 c000", -2.0},
        {"f9 0001", 0x1p-24},
        {"f9 03ff", 0x3ffp-24},
        {"f9 0400", 0x1p-14},
        {"f9 7bff", 65504.0},
        {"f9 8000", -0.0},
        {"f9 fc00", -INFINITY},
        {"fa 47c35000", 100000.0},
        {"fa 00000001", 0x1p-149},
        {"fb 3ff199999999999a", 1.1},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char hex[256];
        hl_buf b;
        hl_changeset *cs = NULL;
        snprintf(hex, sizeof(hex), "%s%s%s", PFX TBL "81 85 00 01 00 81 01 82 01 ", cases[i].hex, "");
        hl_buf_init(&b, 1 * MiB);
        unhex(&b, hex);
        ck_assert_int_eq(decode_buf(&b, false, 1 * MiB, &cs), HL_OK);
        ck_assert_int_eq(cs->rows[0].vals[1].type, HL_VAL_REAL);
        ck_assert(memcmp(&cs->rows[0].vals[1].u.r, &cases[i].want, sizeof(double)) == 0);
        hl_changeset_free(cs);
        hl_buf_free(&b);
    }
}
END_TEST

/* Compresses n zero bytes; with_size records the content size in the frame. */
static void zeros_frame(size_t n, bool with_size, hl_buf *out)
{
    unsigned char *z = calloc(1, n);
    size_t cap = ZSTD_compressBound(n);
    unsigned char *c = malloc(cap);
    ZSTD_CCtx *cc = ZSTD_createCCtx();
    ck_assert(z && c && cc);
    ck_assert(!ZSTD_isError(ZSTD_CCtx_setParameter(cc, ZSTD_c_contentSizeFlag, with_size)));
    ZSTD_inBuffer in = {z, n, 0};
    ZSTD_outBuffer o = {c, cap, 0};
    ck_assert_uint_eq(ZSTD_compressStream2(cc, &o, &in, ZSTD_e_end), 0);
    ck_assert_int_eq(hl_buf_add(out, c, o.pos), HL_OK);
    ZSTD_freeCCtx(cc);
    free(c);
    free(z);
}

START_TEST(test_zstd_bomb)
{
    hl_buf b;
    hl_changeset *cs = NULL;
    char err[160];

    /* 64 MiB of zeros squeeze into a few KiB; the decoder stops at 1 MiB. */
    hl_buf_init(&b, 16 * MiB);
    zeros_frame(64 * MiB, true, &b);
    ck_assert_uint_lt(b.len, 64 * 1024);
    ck_assert_int_eq(hl_changeset_decode(b.data, b.len, true, 1 * MiB, &cs, err, sizeof(err)), HL_ERR_TOO_LARGE);
    ck_assert_ptr_null(cs);

    /* Without a declared size the streaming cap catches it. */
    hl_buf_reset(&b);
    zeros_frame(64 * MiB, false, &b);
    ck_assert_int_eq(hl_changeset_decode(b.data, b.len, true, 1 * MiB, &cs, err, sizeof(err)), HL_ERR_TOO_LARGE);
    ck_assert_ptr_null(cs);

    /* A declared size that lies low: never more than max_bytes, never OK. */
    hl_buf_reset(&b);
    zeros_frame(4 * MiB, true, &b);
    unsigned fhd = b.data[4];
    unsigned fcs_flag = fhd >> 6, single = (fhd >> 5) & 1, dict = fhd & 3;
    static const size_t dict_len[] = {0, 1, 2, 4};
    static const size_t fcs_len[] = {0, 2, 4, 8};
    size_t at = 5 + (single ? 0 : 1) + dict_len[dict];
    size_t fl = fcs_flag == 0 ? (single ? 1 : 0) : fcs_len[fcs_flag];
    ck_assert_uint_ge(fl, 4);
    memset(b.data + at, 0, fl);
    b.data[at] = 0xe8; /* 1000, little-endian */
    b.data[at + 1] = 0x03;
    hl_status st = hl_changeset_decode(b.data, b.len, true, 1 * MiB, &cs, err, sizeof(err));
    ck_assert_msg(st == HL_ERR_TOO_LARGE || st == HL_ERR_DECODE, "lying frame: %d", st);
    ck_assert_ptr_null(cs);

    /* Not zstd at all, or a skippable frame. */
    hl_buf_reset(&b);
    unhex(&b, "00 01 02 03 04 05 06 07");
    ck_assert_int_eq(hl_changeset_decode(b.data, b.len, true, 1 * MiB, &cs, err, sizeof(err)), HL_ERR_DECODE);
    hl_buf_reset(&b);
    unhex(&b, "50 2a 4d 18 00 00 00 00");
    ck_assert_int_eq(hl_changeset_decode(b.data, b.len, true, 1 * MiB, &cs, err, sizeof(err)), HL_ERR_DECODE);
    hl_buf_free(&b);
}
END_TEST

/* Appends a CBOR head (major type, argument) in its shortest form. */
static void put_head(hl_buf *b, unsigned major, uint64_t arg)
{
    unsigned char h[9];
    size_t n = 1;
    if (arg < 24) {
        h[0] = (unsigned char)(major << 5 | arg);
    } else {
        int bytes = arg <= 0xff ? 1 : arg <= 0xffff ? 2 : arg <= 0xffffffffu ? 4 : 8;
        h[0] = (unsigned char)(major << 5 | (bytes == 1 ? 24 : bytes == 2 ? 25 : bytes == 4 ? 26 : 27));
        for (int i = bytes - 1; i >= 0; i--)
            h[n++] = (unsigned char)(arg >> (8 * i));
    }
    ck_assert_int_eq(hl_buf_add(b, h, n), HL_OK);
}

/* Appends the 32767 distinct two-byte column names of the bomb tables (built
 * once: the test appends them hundreds of times). */
static void put_wide_cols(hl_buf *b)
{
    static hl_buf cols;
    if (cols.len == 0) {
        hl_buf_init(&cols, 1 * MiB);
        put_head(&cols, 4, HL_CS_MAX_COLS);
        for (unsigned i = 0; i < HL_CS_MAX_COLS; i++) {
            unsigned char name[2] = {(unsigned char)(1 + i / 255), (unsigned char)(1 + i % 255)};
            put_head(&cols, 3, 2);
            ck_assert_int_eq(hl_buf_add(&cols, name, 2), HL_OK);
        }
    }
    ck_assert_int_eq(hl_buf_add(b, cols.data, cols.len), HL_OK);
}

static void put_prefix(hl_buf *b)
{
    unhex(b, PFX);
}

/* Compresses b into out as one zstd frame at level 1 (the sender's). */
static void compress_into(const hl_buf *b, hl_buf *out)
{
    size_t cap = ZSTD_compressBound(b->len);
    unsigned char *c = malloc(cap);
    ck_assert_ptr_nonnull(c);
    size_t n = ZSTD_compress(c, cap, b->data, b->len, 1);
    ck_assert(!ZSTD_isError(n));
    ck_assert_int_eq(hl_buf_add(out, c, n), HL_OK);
    free(c);
}

/*
 * Decodes a small compressed bomb under a meter and checks that it is refused
 * as too large while the decoder's allocations stay within what the limit
 * allows: the decompressed payload (at most max) plus the decoded form (at
 * most max). Metering starts with the compressed message already in memory.
 */
static void expect_bomb_refused(const char *what, const hl_buf *z, size_t max)
{
    hl_changeset *cs = NULL;
    char err[160] = "";
    meter_start(3 * max);
    hl_status st = hl_changeset_decode(z->data, z->len, true, max, &cs, err, sizeof(err));
    size_t peak = meter_stop();
    ck_assert_msg(st == HL_ERR_TOO_LARGE, "%s (%zu-byte message): got %d (%s), peak %zu bytes", what, z->len, st, err,
                  peak);
    ck_assert_ptr_null(cs);
    ck_assert_msg(peak <= 2 * max + 1 * MiB, "%s: decoding allocated %zu bytes at its peak, limit %zu", what, peak,
                  max);
}

START_TEST(test_decode_bomb)
{
    size_t max = 64 * MiB;
    hl_buf b, z;

    /* Rows of 32767 NULLs: one byte each on the wire, a 24-byte hl_value each
     * decoded. 64 MiB of them compress to tens of KiB and used to decode to
     * 1.6 GB. */
    hl_buf_init(&b, max);
    hl_buf_init(&z, max);
    put_prefix(&b);
    put_head(&b, 4, 1); /* one table: ["t", 32767 columns, []] (keyed by rowid) */
    put_head(&b, 4, 3);
    unhex(&b, "6174");
    put_wide_cols(&b);
    put_head(&b, 4, 0);
    size_t row_len = 5 + 3 + 3 + HL_CS_MAX_COLS;
    size_t nrows = (max - b.len - 9) / row_len;
    static unsigned char nulls[HL_CS_MAX_COLS];
    memset(nulls, 0xf6, sizeof(nulls));
    put_head(&b, 4, nrows);
    for (size_t i = 0; i < nrows; i++) {
        unhex(&b, "85 00 01 00 81");
        put_head(&b, 0, 0x100 + i); /* distinct rowids, all 3-byte heads */
        put_head(&b, 4, HL_CS_MAX_COLS);
        ck_assert_int_eq(hl_buf_add(&b, nulls, sizeof(nulls)), HL_OK);
    }
    ck_assert_uint_le(b.len, max);
    compress_into(&b, &z);
    ck_assert_uint_lt(z.len, 256 * 1024);
    expect_bomb_refused("rows of NULLs", &z, max);

    /* A header of as many 32767-column tables as fit: three bytes per column
     * name on the wire, a pointer and a small allocation each decoded. */
    hl_buf_reset(&b);
    hl_buf_reset(&z);
    put_prefix(&b);
    size_t table_len = 1 + 7 + 3 + 3 * HL_CS_MAX_COLS + 1;
    size_t ntables = (max - b.len - 8) / table_len;
    put_head(&b, 4, ntables);
    for (size_t i = 0; i < ntables; i++) {
        char name[8];
        snprintf(name, sizeof(name), "t%05zu", i);
        put_head(&b, 4, 3);
        put_head(&b, 3, 6);
        ck_assert_int_eq(hl_buf_add(&b, name, 6), HL_OK);
        put_wide_cols(&b);
        put_head(&b, 4, 0);
    }
    put_head(&b, 4, 0);
    ck_assert_uint_le(b.len, max);
    compress_into(&b, &z);
    ck_assert_uint_lt(z.len, 256 * 1024);
    expect_bomb_refused("wide tables", &z, max);

    hl_buf_free(&z);
    hl_buf_free(&b);
}
END_TEST

START_TEST(test_frame_without_size)
{
    /* Other encoders may omit the content size; such frames decode. */
    hl_changeset *cs = vec_all_types(), *back = NULL;
    hl_buf plain, z;
    hl_buf_init(&plain, 1 * MiB);
    hl_buf_init(&z, 1 * MiB);
    ck_assert_int_eq(hl_changeset_encode(cs, false, &plain), HL_OK);
    size_t cap = ZSTD_compressBound(plain.len);
    unsigned char *c = malloc(cap);
    ZSTD_CCtx *cc = ZSTD_createCCtx();
    ck_assert(c && cc);
    ck_assert(!ZSTD_isError(ZSTD_CCtx_setParameter(cc, ZSTD_c_contentSizeFlag, 0)));
    ZSTD_inBuffer in = {plain.data, plain.len, 0};
    ZSTD_outBuffer o = {c, cap, 0};
    ck_assert_uint_eq(ZSTD_compressStream2(cc, &o, &in, ZSTD_e_end), 0);
    ck_assert_int_eq(hl_buf_add(&z, c, o.pos), HL_OK);
    ck_assert_int_eq(decode_buf(&z, true, 1 * MiB, &back), HL_OK);
    ck_assert(cs_equal(cs, back));
    hl_changeset_free(back);
    /* Decompressing exactly to the limit is fine (the decoded form, which
     * costs more, is then what is too large); one byte more is not. */
    char err[160];
    ck_assert_int_eq(hl_changeset_decode(z.data, z.len, true, plain.len, &back, err, sizeof(err)), HL_ERR_TOO_LARGE);
    ck_assert_msg(strstr(err, "decoded changeset") != NULL, "%s", err);
    ck_assert_int_eq(hl_changeset_decode(z.data, z.len, true, plain.len - 1, &back, err, sizeof(err)),
                     HL_ERR_TOO_LARGE);
    ck_assert_msg(strstr(err, "zstd frame expands past") != NULL, "%s", err);
    ck_assert_int_eq(decode_buf(&z, true, hl_changeset_mem_cost(cs), &back), HL_OK);
    hl_changeset_free(back);
    /* Two frames back to back: trailing data. */
    ck_assert_int_eq(hl_buf_add(&z, c, o.pos), HL_OK);
    ck_assert_int_eq(decode_buf(&z, true, 1 * MiB, &back), HL_ERR_DECODE);
    ZSTD_freeCCtx(cc);
    free(c);
    hl_buf_free(&plain);
    hl_buf_free(&z);
    hl_changeset_free(cs);
}
END_TEST

/* ------------------------------------------------------------------ */
/* builder, key encoding                                                */
/* ------------------------------------------------------------------ */

START_TEST(test_builder_rejects)
{
    static const char *const cols[] = {"a", "b"};
    static const char *const dup[] = {"a", "a"};
    static const char *const empty[] = {""};
    static const char *const pk_a[] = {"a"};
    static const char *const pk_x[] = {"x"};
    hl_changeset *cs = hl_changeset_new();
    uint32_t t;

    ck_assert_int_eq(hl_changeset_add_table(cs, "", cols, 2, NULL, 0, &t), HL_ERR_INVALID);
    ck_assert_int_eq(hl_changeset_add_table(cs, "t", dup, 2, NULL, 0, &t), HL_ERR_INVALID);
    ck_assert_int_eq(hl_changeset_add_table(cs, "t", empty, 1, NULL, 0, &t), HL_ERR_INVALID);
    ck_assert_int_eq(hl_changeset_add_table(cs, "t", cols, 0, NULL, 0, &t), HL_ERR_INVALID);
    ck_assert_int_eq(hl_changeset_add_table(cs, "t", cols, 2, pk_x, 1, &t), HL_ERR_INVALID);
    ck_assert_int_eq(hl_changeset_add_table(cs, "t", cols, 2, pk_a, 1, &t), HL_OK);
    ck_assert_int_eq(hl_changeset_add_table(cs, "t", cols, 2, pk_a, 1, &t), HL_ERR_INVALID);
    ck_assert_uint_eq(cs->ntables, 1);

    size_t before = cs->approx_bytes;
    hl_value k = vint(1), v2[] = {vint(1), vtext("hello")};
    hl_value nan[] = {vint(1), vreal(NAN)};
    ck_assert_int_eq(hl_changeset_add_row(cs, 1, HL_OP_UPSERT, 1, &k, 1, v2, 2), HL_ERR_INVALID);
    ck_assert_int_eq(hl_changeset_add_row(cs, 0, (hl_op)3, 1, &k, 1, v2, 2), HL_ERR_INVALID);
    ck_assert_int_eq(hl_changeset_add_row(cs, 0, HL_OP_UPSERT, 1, &k, 1, v2, 1), HL_ERR_INVALID);
    ck_assert_int_eq(hl_changeset_add_row(cs, 0, HL_OP_UPSERT, 1, &k, 2, v2, 2), HL_ERR_INVALID);
    ck_assert_int_eq(hl_changeset_add_row(cs, 0, HL_OP_DELETE, 1, &k, 1, v2, 2), HL_ERR_INVALID);
    ck_assert_int_eq(hl_changeset_add_row(cs, 0, HL_OP_UPSERT, 1, &k, 1, nan, 2), HL_ERR_INVALID);
    ck_assert_uint_eq(cs->nrows, 0);
    ck_assert_int_eq(hl_changeset_add_row(cs, 0, HL_OP_UPSERT, 77, &k, 1, v2, 2), HL_OK);
    ck_assert_uint_gt(cs->approx_bytes, before + 5);
    ck_assert_uint_eq(cs->hlc, 77);
    ck_assert_int_eq(hl_changeset_add_row(cs, 0, HL_OP_DELETE, 5, &k, 1, NULL, 0), HL_OK);
    ck_assert_uint_eq(cs->hlc, 77);

    /* Rowid tables take integer keys only. */
    ck_assert_int_eq(hl_changeset_add_table(cs, "r", cols, 2, NULL, 0, &t), HL_OK);
    hl_value tk = vtext("1");
    ck_assert_int_eq(hl_changeset_add_row(cs, t, HL_OP_DELETE, 1, &tk, 1, NULL, 0), HL_ERR_INVALID);

    /* Empty blobs get a real pointer, so binding them does not bind NULL. */
    hl_value eb[] = {vint(2), vblob(NULL, 0)};
    ck_assert_int_eq(hl_changeset_add_row(cs, 0, HL_OP_UPSERT, 1, &k, 1, eb, 2), HL_OK);
    ck_assert_ptr_nonnull(cs->rows[cs->nrows - 1].vals[1].u.b.p);
    round_trip(cs, false);
    hl_changeset_free(cs);
    hl_changeset_free(NULL);
}
END_TEST

START_TEST(test_key_encode)
{
    hl_buf a, b;
    hl_buf_init(&a, 1 * MiB);
    hl_buf_init(&b, 1 * MiB);

    /* SQLite-equal numeric keys give equal bytes. */
    hl_value k1[] = {vreal(1.0), vreal(-0.0)}, k2[] = {vint(1), vint(0)};
    ck_assert_int_eq(hl_key_encode(k1, 2, &a), HL_OK);
    ck_assert_int_eq(hl_key_encode(k2, 2, &b), HL_OK);
    ck_assert(a.len == b.len && memcmp(a.data, b.data, a.len) == 0);

    /* Non-integral, huge and infinite REALs stay REAL. */
    static const double reals[] = {0.5, 9223372036854775808.0, -9223372036854775808.0 * 2, INFINITY, 1e300};
    for (size_t i = 0; i < sizeof(reals) / sizeof(reals[0]); i++) {
        hl_value v = vreal(reals[i]);
        hl_buf_reset(&a);
        ck_assert_int_eq(hl_key_encode(&v, 1, &a), HL_OK);
        ck_assert_uint_eq(a.len, 10);
        ck_assert_int_eq(a.data[1], 0xfb);
    }
    hl_value m = vreal(-9223372036854775808.0);
    hl_buf_reset(&a);
    ck_assert_int_eq(hl_key_encode(&m, 1, &a), HL_OK);
    ck_assert_int_eq(a.data[1], 0x3b); /* INT64_MIN as an integer */

    /* Text and blob with the same bytes differ; NaN and empty keys are refused. */
    hl_value t = vtext("a"), bl = vblob("a", 1), nan = vreal(NAN);
    hl_buf_reset(&a);
    hl_buf_reset(&b);
    ck_assert_int_eq(hl_key_encode(&t, 1, &a), HL_OK);
    ck_assert_int_eq(hl_key_encode(&bl, 1, &b), HL_OK);
    ck_assert(memcmp(a.data, b.data, a.len) != 0);
    size_t len = a.len;
    ck_assert_int_eq(hl_key_encode(&nan, 1, &a), HL_ERR_INVALID);
    ck_assert_uint_eq(a.len, len); /* out left as it was */
    ck_assert_int_eq(hl_key_encode(&t, 0, &a), HL_ERR_INVALID);

    /* A capped buffer reports the cap. */
    hl_buf small;
    hl_buf_init(&small, 2);
    ck_assert_int_eq(hl_key_encode(&t, 1, &small), HL_ERR_TOO_LARGE);
    ck_assert_uint_eq(small.len, 0);
    hl_buf_free(&small);
    hl_buf_free(&a);
    hl_buf_free(&b);
}
END_TEST

START_TEST(test_encode_cap)
{
    hl_changeset *cs = vec_all_types();
    hl_buf b;
    hl_buf_init(&b, 20);
    ck_assert_int_eq(hl_buf_add(&b, "xy", 2), HL_OK);
    ck_assert_int_eq(hl_changeset_encode(cs, false, &b), HL_ERR_TOO_LARGE);
    ck_assert_uint_eq(b.len, 2);
    ck_assert_str_eq(hl_buf_str(&b), "xy");
    ck_assert_int_eq(hl_changeset_encode(cs, true, &b), HL_ERR_TOO_LARGE);
    ck_assert_uint_eq(b.len, 2);
    hl_buf_free(&b);
    hl_changeset_free(cs);
}
END_TEST

/* ------------------------------------------------------------------ */
/* parts and reassembly                                                 */
/* ------------------------------------------------------------------ */

/* Cuts payload into parts and returns them as complete messages. */
static size_t make_parts(const unsigned char *payload, size_t n, size_t chunk, uint64_t seq, uint8_t flags,
                         hl_buf *msgs, size_t max)
{
    uint32_t count = hl_part_count(n, chunk);
    ck_assert_uint_le(count, max);
    for (uint32_t i = 0; i < count; i++) {
        hl_part p = {.origin = 9, .epoch = 0xabc, .seq = seq, .flags = flags};
        unsigned char hdr[HL_PART_HEADER_LEN];
        ck_assert_int_eq(hl_part_slice(&p, payload, n, chunk, i), HL_OK);
        hl_part_header_write(&p, hdr);
        hl_buf_init(&msgs[i], 1 * MiB);
        ck_assert_int_eq(hl_buf_add(&msgs[i], hdr, sizeof(hdr)), HL_OK);
        ck_assert_int_eq(hl_buf_add(&msgs[i], p.data, p.len), HL_OK);
    }
    return count;
}

static hl_status feed(hl_reasm *r, const hl_buf *msg, uint64_t sseq, hl_reasm_entry **e)
{
    hl_part p;
    hl_status st = hl_part_parse(msg->data, msg->len, &p);
    if (st)
        return st;
    return hl_reasm_feed(r, &p, sseq, e);
}

/* Feeds msg, which must be accepted; true when it completed its changeset,
 * whose payload must then equal want (len bytes) and whose first part was
 * received at stream sequence first. */
static bool feed_ok(hl_reasm *r, const hl_buf *msg, uint64_t sseq, const unsigned char *want, size_t len,
                    uint64_t first)
{
    hl_reasm_entry *e = NULL;
    ck_assert_int_eq(feed(r, msg, sseq, &e), HL_OK);
    if (!e || e->have < e->count)
        return false;
    ck_assert_uint_eq(e->first_stream_seq, first);
    size_t got_len = 0;
    uint8_t flags = 0;
    unsigned char *got = hl_reasm_take(r, e, &got_len, &flags);
    ck_assert_uint_eq(got_len, len);
    ck_assert(len == 0 || memcmp(got, want, len) == 0);
    free(got);
    return true;
}

static void free_msgs(hl_buf *msgs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        hl_buf_free(&msgs[i]);
}

START_TEST(test_part_count_and_slice)
{
    hl_part p;
    unsigned char data[10] = {0};
    ck_assert_uint_eq(hl_part_count(0, 4), 1);
    ck_assert_uint_eq(hl_part_count(1, 4), 1);
    ck_assert_uint_eq(hl_part_count(4, 4), 1);
    ck_assert_uint_eq(hl_part_count(5, 4), 2);
    ck_assert_uint_eq(hl_part_count(10, 0), 0);
    ck_assert_uint_eq(hl_part_count(SIZE_MAX, 1), 0);
    ck_assert_int_eq(hl_part_slice(&p, data, 10, 4, 2), HL_OK);
    ck_assert_uint_eq(p.len, 2);
    ck_assert_ptr_eq(p.data, data + 8);
    ck_assert_uint_eq(p.count, 3);
    ck_assert_int_eq(hl_part_slice(&p, data, 10, 4, 3), HL_ERR_INVALID);
    ck_assert_int_eq(hl_part_slice(&p, data, 10, 0, 0), HL_ERR_INVALID);
}
END_TEST

START_TEST(test_part_parse)
{
    unsigned char payload[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    hl_buf msgs[4];
    hl_part p;
    size_t n = make_parts(payload, 8, 3, 5, HL_PART_FLAG_ZSTD, msgs, 4);
    ck_assert_uint_eq(n, 3);
    ck_assert_int_eq(hl_part_parse(msgs[1].data, msgs[1].len, &p), HL_OK);
    ck_assert_uint_eq(p.origin, 9);
    ck_assert_uint_eq(p.epoch, 0xabc);
    ck_assert_uint_eq(p.seq, 5);
    ck_assert_uint_eq(p.index, 1);
    ck_assert_uint_eq(p.count, 3);
    ck_assert_uint_eq(p.total_len, 8);
    ck_assert_uint_eq(p.flags, HL_PART_FLAG_ZSTD);
    ck_assert_uint_eq(p.len, 3);
    ck_assert(memcmp(p.data, payload + 3, 3) == 0);

    char id[HL_PART_MSG_ID_LEN];
    hl_part_msg_id(&p, id, sizeof(id));
    ck_assert_str_eq(id, "9-0000000000000abc-5-1");
    hl_part big = {.origin = UINT64_MAX, .epoch = UINT64_MAX, .seq = UINT64_MAX, .index = UINT32_MAX};
    hl_part_msg_id(&big, id, sizeof(id));
    ck_assert_str_eq(id, "18446744073709551615-ffffffffffffffff-18446744073709551615-4294967295");
    /* The writer's format reads back exactly; anything else is refused. */
    hl_part back = {0};
    ck_assert_int_eq(hl_part_msg_id_parse(id, &back), HL_OK);
    ck_assert(back.origin == UINT64_MAX && back.epoch == UINT64_MAX && back.seq == UINT64_MAX &&
              back.index == UINT32_MAX);
    ck_assert_int_eq(hl_part_msg_id_parse("7-00000000deadbeef-42-1", &back), HL_OK);
    ck_assert(back.origin == 7 && back.epoch == 0xdeadbeef && back.seq == 42 && back.index == 1);
    static const char *const bad_ids[] = {"",
                                          "7-00000000deadbeef-42",
                                          "7-00000000deadbeef-42-1-",
                                          "7-00000000deadbeef-42-1-2",
                                          "7-deadbeef-42-1",
                                          "7-00000000DEADBEEF-42-1",
                                          "x-00000000deadbeef-42-1",
                                          "7-00000000deadbeef--1",
                                          "7-00000000deadbeef-42-4294967296",
                                          "18446744073709551616-00000000deadbeef-42-1",
                                          "7-00000000deadbeef-42-1 "};
    for (size_t i = 0; i < sizeof(bad_ids) / sizeof(bad_ids[0]); i++)
        ck_assert_msg(hl_part_msg_id_parse(bad_ids[i], &back) == HL_ERR_DECODE, "accepted \"%s\"", bad_ids[i]);

    /* Each header check: byte offset, new value. */
    static const struct {
        size_t at;
        unsigned char v;
    } bad[] = {{0, 'X'},
               {3, '2'},
               {4, 2},
               {4, 0},
               {5, 0x04} /* bit 2: undefined */,
               {5, 0x80},
               {6, 1},
               {7, 1},
               {35, 3} /* index 3 of 3 */,
               {39, 0} /* count 0 */,
               {47, 2} /* total 2 < len 3 */};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        unsigned char m[64];
        memcpy(m, msgs[1].data, msgs[1].len);
        m[bad[i].at] = bad[i].v;
        ck_assert_msg(hl_part_parse(m, msgs[1].len, &p) == HL_ERR_DECODE, "case %zu", i);
    }
    ck_assert_int_eq(hl_part_parse(msgs[1].data, HL_PART_HEADER_LEN - 1, &p), HL_ERR_DECODE);
    /* A part with no bytes of a non-empty payload. */
    ck_assert_int_eq(hl_part_parse(msgs[1].data, HL_PART_HEADER_LEN, &p), HL_ERR_DECODE);
    free_msgs(msgs, n);
}
END_TEST

START_TEST(test_reasm)
{
    unsigned char a[100], b[100];
    hl_buf ma[8], mb[8];
    hl_reasm r;
    hl_reasm_entry *e;

    for (int i = 0; i < 100; i++) {
        a[i] = (unsigned char)i;
        b[i] = (unsigned char)(200 - i);
    }
    size_t na = make_parts(a, 100, 30, 1, 0, ma, 8);
    size_t nb = make_parts(b, 90, 30, 2, HL_PART_FLAG_ZSTD, mb, 8);
    ck_assert_uint_eq(na, 4);
    ck_assert_uint_eq(nb, 3);
    hl_reasm_init(&r, 1000);

    /* In order. */
    ck_assert(!hl_reasm_pending(&r));
    for (size_t i = 0; i < na; i++) {
        ck_assert(feed_ok(&r, &ma[i], 10 + i, a, 100, 10) == (i + 1 == na));
        ck_assert(hl_reasm_pending(&r) == (i + 1 < na));
    }
    ck_assert_uint_eq(r.held, 0);
    hl_reasm_mark_done(&r, 0xabc, 1);

    /* Parts of a changeset delivered a moment ago start an entry marked
     * repeat: a whole copy completes (the apply step counts the duplicate),
     * a partial one can be dropped quietly. */
    ck_assert_int_eq(feed(&r, &ma[2], 15, &e), HL_OK);
    ck_assert_ptr_nonnull(e);
    ck_assert(e->repeat);
    ck_assert(!feed_ok(&r, &ma[0], 16, a, 100, 15));
    ck_assert(!feed_ok(&r, &ma[1], 17, a, 100, 15));
    ck_assert(feed_ok(&r, &ma[3], 18, a, 100, 15));
    ck_assert(!hl_reasm_pending(&r));
    ck_assert_int_eq(feed(&r, &mb[0], 19, &e), HL_OK);
    ck_assert(e && !e->repeat); /* another changeset: not a repeat */
    hl_reasm_drop(&r, e);

    /* Any order, and two changesets of the origin pending at once: what a
     * writer's client stores after its server died mid-publish, lost parts
     * re-published after later ones its library had buffered. */
    hl_reasm_free(&r);
    hl_reasm_init(&r, 1000);
    ck_assert(!feed_ok(&r, &ma[3], 20, a, 100, 20));
    ck_assert(!feed_ok(&r, &mb[1], 21, b, 90, 21));
    ck_assert(!feed_ok(&r, &ma[1], 22, a, 100, 20));
    ck_assert(!feed_ok(&r, &mb[0], 23, b, 90, 21));
    ck_assert_uint_eq(r.npending, 2);
    ck_assert_uint_eq(r.held, 10 + 30 + 30 + 30);
    ck_assert(!feed_ok(&r, &ma[0], 24, a, 100, 20));
    ck_assert(!feed_ok(&r, &ma[0], 25, a, 100, 20)); /* a copy: ignored */
    ck_assert(feed_ok(&r, &mb[2], 26, b, 90, 21));
    ck_assert(feed_ok(&r, &ma[2], 27, a, 100, 20));
    ck_assert(!hl_reasm_pending(&r));
    ck_assert_uint_eq(r.held, 0);

    /* Parts that disagree with the changeset's others are refused, and the
     * changeset survives them. */
    hl_reasm_free(&r);
    hl_reasm_init(&r, 1000);
    ck_assert(!feed_ok(&r, &ma[0], 40, a, 100, 40));
    hl_buf forged;
    hl_buf_init(&forged, 1 * MiB);
    ck_assert_int_eq(hl_buf_add(&forged, ma[1].data, ma[1].len), HL_OK);
    forged.data[47] = 99; /* total 99: also 4 parts of 30, but another total */
    ck_assert_int_eq(feed(&r, &forged, 41, &e), HL_ERR_DECODE);
    forged.data[47] = 100;
    forged.data[39] = 5; /* count 5: 30-byte parts cannot make 5 of 100 */
    ck_assert_int_eq(feed(&r, &forged, 42, &e), HL_ERR_DECODE);
    forged.data[39] = 4;
    forged.data[5] = HL_PART_FLAG_ZSTD; /* other flags */
    ck_assert_int_eq(feed(&r, &forged, 43, &e), HL_ERR_DECODE);
    /* A last part whose length leaves no whole chunks for the others. */
    hl_buf_reset(&forged);
    ck_assert_int_eq(hl_buf_add(&forged, ma[3].data, ma[3].len - 1), HL_OK); /* 9 of the last 10 bytes */
    ck_assert_int_eq(feed(&r, &forged, 44, &e), HL_ERR_DECODE);
    /* A last part whose length gives another chunk than the changeset's. */
    hl_buf_reset(&forged);
    ck_assert_int_eq(hl_buf_add(&forged, ma[3].data, ma[3].len), HL_OK);
    forged.data[47] = 94; /* 94 - 10 = 84 = 3 x 28: chunk 28 */
    ck_assert_int_eq(feed(&r, &forged, 45, &e), HL_ERR_DECODE);
    ck_assert_uint_eq(r.npending, 1);
    ck_assert(!feed_ok(&r, &ma[1], 46, a, 100, 40));
    ck_assert(!feed_ok(&r, &ma[2], 47, a, 100, 40));
    ck_assert(feed_ok(&r, &ma[3], 48, a, 100, 40));
    /* A non-last part whose count does not match its length's cut. */
    hl_buf_reset(&forged);
    ck_assert_int_eq(hl_buf_add(&forged, mb[0].data, mb[0].len), HL_OK);
    forged.data[39] = 2; /* 90 bytes in 30-byte parts are 3, not 2 */
    ck_assert_int_eq(feed(&r, &forged, 49, &e), HL_ERR_DECODE);
    ck_assert(!hl_reasm_pending(&r));
    hl_buf_free(&forged);

    /* Over the cap: refused before anything is buffered. */
    hl_reasm_free(&r);
    hl_reasm_init(&r, 99);
    ck_assert_int_eq(feed(&r, &ma[2], 50, &e), HL_ERR_TOO_LARGE);
    ck_assert(!hl_reasm_pending(&r));
    ck_assert(!feed_ok(&r, &mb[0], 51, b, 90, 51)); /* 90 bytes fit */
    ck_assert(!feed_ok(&r, &mb[1], 52, b, 90, 51));
    ck_assert(feed_ok(&r, &mb[2], 53, b, 90, 51));
    hl_reasm_free(&r);

    /* At most HL_REASM_MAX_PENDING incomplete changesets per origin: the
     * caller drops one (the fetcher expires the oldest) and feeds again. */
    hl_reasm_init(&r, 1000);
    static hl_buf many[HL_REASM_MAX_PENDING + 1][8];
    for (int i = 0; i <= HL_REASM_MAX_PENDING; i++)
        make_parts(a, 100, 30, 100 + (uint64_t)i, 0, many[i], 8);
    for (int i = 0; i < HL_REASM_MAX_PENDING; i++)
        ck_assert(!feed_ok(&r, &many[i][1], 60 + (uint64_t)i, a, 100, 60 + (uint64_t)i));
    ck_assert_int_eq(feed(&r, &many[HL_REASM_MAX_PENDING][0], 90, &e), HL_ERR_BUSY);
    ck_assert_uint_eq(r.pending[0].seq, 100);
    hl_reasm_drop(&r, &r.pending[0]);
    ck_assert_uint_eq(r.pending[0].seq, 101);
    ck_assert(!feed_ok(&r, &many[HL_REASM_MAX_PENDING][0], 91, a, 100, 91));
    ck_assert_uint_eq(r.npending, HL_REASM_MAX_PENDING);
    for (int i = 0; i <= HL_REASM_MAX_PENDING; i++)
        free_msgs(many[i], 4);
    hl_reasm_free(&r);
    ck_assert(!hl_reasm_pending(&r));

    /* A single-part changeset completes at once; so does an empty payload. */
    hl_buf one[1], empty[1];
    hl_reasm_init(&r, 1000);
    make_parts(a, 10, 30, 3, 0, one, 1);
    ck_assert(feed_ok(&r, &one[0], 60, a, 10, 60));
    make_parts(a, 0, 30, 4, 0, empty, 1);
    ck_assert(feed_ok(&r, &empty[0], 61, a, 0, 61));
    ck_assert(!hl_reasm_pending(&r));
    hl_reasm_free(&r);
    hl_reasm_free(NULL);
    free_msgs(one, 1);
    free_msgs(empty, 1);
    free_msgs(ma, na);
    free_msgs(mb, nb);
}
END_TEST

/* Several changesets cut into parts, every part stored twice, all shuffled:
 * each completes once, byte-exact, when its last missing part arrives; what
 * arrives after that is only ever a repeat. */
START_TEST(test_reasm_any_order)
{
    enum { NCS = 5, MAXP = 12, CHUNK = 17 };
    static unsigned char payload[NCS][MAXP * CHUNK];
    static hl_buf msgs[NCS][MAXP];
    static size_t order[2 * NCS * MAXP];

    rng_state = 7;
    for (int round = 0; round < 200; round++) {
        size_t len[NCS], nparts[NCS], n = 0;
        bool done[NCS] = {false};
        hl_reasm r;

        for (size_t c = 0; c < NCS; c++) {
            len[c] = rndn(MAXP * CHUNK);
            for (size_t i = 0; i < len[c]; i++)
                payload[c][i] = (unsigned char)rndn(256);
            nparts[c] = make_parts(payload[c], len[c], CHUNK, 500 + c, 0, msgs[c], MAXP);
            for (size_t i = 0; i < nparts[c]; i++) {
                order[n++] = c * MAXP + i;
                order[n++] = c * MAXP + i;
            }
        }
        for (size_t i = n; i > 1; i--) {
            size_t j = rndn(i), t = order[i - 1];
            order[i - 1] = order[j];
            order[j] = t;
        }
        hl_reasm_init(&r, 4096);
        for (size_t k = 0; k < n; k++) {
            size_t c = order[k] / MAXP, i = order[k] % MAXP;
            hl_reasm_entry *e = NULL;
            ck_assert_int_eq(feed(&r, &msgs[c][i], 1000 + k, &e), HL_OK);
            if (e && e->have == e->count && e->repeat) { /* a second copy, after the first was delivered */
                size_t got_len = 0;
                uint8_t flags = 0;
                ck_assert(done[c]);
                free(hl_reasm_take(&r, e, &got_len, &flags));
                continue;
            }
            if (e && e->have == e->count) {
                ck_assert_msg(!done[c], "changeset %zu completed twice", c);
                ck_assert_uint_eq(e->seq, 500 + c);
                hl_reasm_mark_done(&r, e->epoch, e->seq); /* as the fetcher does once it decoded */
                size_t got_len = 0;
                uint8_t flags = 0;
                unsigned char *got = hl_reasm_take(&r, e, &got_len, &flags);
                ck_assert_uint_eq(got_len, len[c]);
                ck_assert(got_len == 0 || memcmp(got, payload[c], got_len) == 0);
                free(got);
                done[c] = true;
            }
        }
        for (size_t c = 0; c < NCS; c++) {
            ck_assert_msg(done[c], "round %d: changeset %zu never completed", round, c);
            free_msgs(msgs[c], nparts[c]);
        }
        /* What is left is copies of delivered changesets, partly received. */
        for (size_t i = 0; i < r.npending; i++)
            ck_assert(r.pending[i].repeat && r.pending[i].have < r.pending[i].count);
        hl_reasm_free(&r);
    }
}
END_TEST

START_TEST(test_parts_end_to_end)
{
    /* Random changesets through encode -> parts -> reassembly -> decode. */
    rng_state = 99;
    for (int i = 0; i < 50; i++) {
        hl_changeset *cs = rnd_changeset(), *back = NULL;
        bool compress = i & 1;
        hl_buf payload, msgs[4096];
        hl_reasm r;
        hl_reasm_entry *e = NULL;

        hl_buf_init(&payload, 16 * MiB);
        ck_assert_int_eq(hl_changeset_encode(cs, compress, &payload), HL_OK);
        size_t chunk = 64 + rndn(2000);
        size_t n = make_parts(payload.data, payload.len, chunk, cs->seq, compress ? HL_PART_FLAG_ZSTD : 0, msgs, 4096);
        hl_reasm_init(&r, 16 * MiB);
        for (size_t j = 0; j < n; j++)
            ck_assert_int_eq(feed(&r, &msgs[j], 1000 + j, &e), HL_OK);
        ck_assert(e && e->have == e->count);
        hl_buf whole;
        uint8_t flags = 0;
        hl_buf_init(&whole, 16 * MiB);
        whole.data = hl_reasm_take(&r, e, &whole.len, &flags);
        whole.cap = whole.len;
        ck_assert_int_eq(decode_buf(&whole, (flags & HL_PART_FLAG_ZSTD) != 0, 16 * MiB, &back), HL_OK);
        free(whole.data);
        ck_assert(cs_equal(cs, back));
        hl_reasm_free(&r);
        free_msgs(msgs, n);
        hl_buf_free(&payload);
        hl_changeset_free(back);
        hl_changeset_free(cs);
    }
}
END_TEST

/* ------------------------------------------------------------------ */
/* fuzz seed corpus                                                     */
/* ------------------------------------------------------------------ */

static void write_seed(const char *dir, const char *name, const unsigned char *p, size_t n)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    ck_assert_msg(f != NULL, "%s: %s", path, strerror(errno));
    ck_assert_uint_eq(fwrite(p, 1, n, f), n);
    ck_assert_int_eq(fclose(f), 0);
}

START_TEST(test_corpus)
{
    const char *dir = getenv("HL_FUZZ_CORPUS_OUT");
    if (!dir)
        return;
    for (size_t i = 0; i < sizeof(builders) / sizeof(builders[0]); i++) {
        hl_changeset *cs = builders[i].build();
        for (int compress = 0; compress < 2; compress++) {
            char name[96];
            hl_buf b;
            hl_buf_init(&b, 1 * MiB);
            ck_assert_int_eq(hl_changeset_encode(cs, compress, &b), HL_OK);
            snprintf(name, sizeof(name), "%s%s", builders[i].name, compress ? ".zst" : ".cbor");
            write_seed(dir, name, b.data, b.len);
            /* The same payload as a whole one-part message. */
            hl_part p = {
                .origin = cs->origin, .epoch = cs->epoch, .seq = cs->seq, .flags = compress ? HL_PART_FLAG_ZSTD : 0};
            unsigned char hdr[HL_PART_HEADER_LEN];
            hl_buf m;
            ck_assert_int_eq(hl_part_slice(&p, b.data, b.len, b.len, 0), HL_OK);
            hl_part_header_write(&p, hdr);
            hl_buf_init(&m, 1 * MiB);
            ck_assert_int_eq(hl_buf_add(&m, hdr, sizeof(hdr)), HL_OK);
            ck_assert_int_eq(hl_buf_add(&m, b.data, b.len), HL_OK);
            snprintf(name, sizeof(name), "%s%s.msg", builders[i].name, compress ? ".zst" : "");
            write_seed(dir, name, m.data, m.len);
            hl_buf_free(&m);
            hl_buf_free(&b);
        }
        hl_changeset_free(cs);
    }
}
END_TEST

static Suite *changeset_suite(void)
{
    Suite *s = suite_create("changeset");
    TCase *tc = tcase_create("core");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_vectors);
    tcase_add_test(tc, test_random_round_trip);
    tcase_add_test(tc, test_big_blob);
    tcase_add_test(tc, test_truncations);
    tcase_add_test(tc, test_mutations);
    tcase_add_test(tc, test_hostile);
    tcase_add_test(tc, test_half_and_single_floats);
    tcase_add_test(tc, test_zstd_bomb);
    tcase_add_test(tc, test_decode_bomb);
    tcase_add_test(tc, test_frame_without_size);
    tcase_add_test(tc, test_builder_rejects);
    tcase_add_test(tc, test_key_encode);
    tcase_add_test(tc, test_encode_cap);
    tcase_add_test(tc, test_part_count_and_slice);
    tcase_add_test(tc, test_part_parse);
    tcase_add_test(tc, test_reasm);
    tcase_add_test(tc, test_reasm_any_order);
    tcase_add_test(tc, test_parts_end_to_end);
    tcase_add_test(tc, test_corpus);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(changeset_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
