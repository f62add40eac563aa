/*
 * test_db.c - capture and apply between two real SQLite databases.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/hlc.h"
#include "common/log.h"
/* The module's white-box test: besides db.h's API it checks internals
 * (trigger SQL, the two halves of a capture with writes in between). */
#include "db/db_int.h"
#include "db_fixture.h"

static void setup(void)
{
    db_fixture_setup("db");
}

static void teardown(void)
{
    db_fixture_teardown();
}

static const char *schema_sql =
    "CREATE TABLE books(id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL, year INTEGER);"
    "CREATE TABLE \"my table\"(\"select\" TEXT PRIMARY KEY, \"a\"\"b\" BLOB, \"prénom\" REAL);"
    "CREATE TABLE pairs(a INTEGER, b TEXT, v, PRIMARY KEY(a, b)) WITHOUT ROWID;"
    "CREATE TABLE plain(x, y);"
    "CREATE TABLE uniq(id INTEGER PRIMARY KEY, email TEXT UNIQUE);"
    "CREATE VIRTUAL TABLE docs USING fts5(body);";

static hl_db *engine_open(const char *path, uint64_t node)
{
    hl_db *d = NULL;
    ck_assert_int_eq(hl_db_open(&d, path, node, 2000), HL_OK);
    hl_db_options o = {.publish = true, .compress = node % 2 == 0, .max_changeset_bytes = 64u << 20};
    o.max_clock_drift_ms = hl_db_get_options(d)->max_clock_drift_ms;
    hl_db_configure(d, &o);
    ck_assert_int_eq(hl_db_install(d, false, NULL), HL_OK);
    return d;
}

static void set_max_changeset_bytes(hl_db *d, size_t n)
{
    hl_db_options o = *hl_db_get_options(d);
    o.max_changeset_bytes = n;
    hl_db_configure(d, &o);
}

static void set_chain_bytes(hl_db *d, size_t n)
{
    hl_db_options o = *hl_db_get_options(d);
    o.chain_bytes = n;
    hl_db_configure(d, &o);
}

static void set_max_clock_drift_ms(hl_db *d, uint64_t ms)
{
    hl_db_options o = *hl_db_get_options(d);
    o.max_clock_drift_ms = ms;
    hl_db_configure(d, &o);
}

/* An engine step that retries the held changesets (after capturing). */
static void retry_held(hl_db *d)
{
    hl_step s = {.retry_held = true};
    ck_assert_int_eq(hl_db_step(d, NULL, NULL, &s), HL_OK);
    ck_assert(s.committed);
}

/* True when src's outbox has a changeset. */
static bool outbox_has(hl_db *src)
{
    hl_outbox_entry e;
    hl_outbox_entry_init(&e, 256u << 20);
    bool has = hl_db_outbox_next(src, 0, &e) == HL_OK;
    hl_outbox_entry_free(&e);
    return has;
}

/* Takes the oldest outbox changeset of src (and deletes it). */
/* Takes the oldest outbox changeset of src (and deletes it): raw receives its payload, flags its flags. */
static hl_changeset *take(hl_db *src, hl_buf *raw, uint8_t *flags)
{
    hl_outbox_entry e;
    hl_outbox_entry_init(&e, 256u << 20);
    ck_assert_int_eq(hl_db_outbox_next(src, 0, &e), HL_OK);
    ck_assert_uint_gt(e.rows, 0);
    *flags = e.flags;
    hl_buf_reset(raw);
    ck_assert_int_eq(hl_buf_add(raw, e.payload.data, e.payload.len), HL_OK);
    hl_outbox_entry_free(&e);
    hl_changeset *cs = NULL;
    char err[256];
    ck_assert_int_eq(
        hl_changeset_decode(raw->data, raw->len, (*flags & HL_PART_FLAG_ZSTD) != 0, 64u << 20, &cs, err, sizeof err),
        HL_OK);
    ck_assert_uint_eq(cs->seq, e.seq);
    ck_assert_int_eq(hl_db_outbox_delete(src, e.seq), HL_OK);
    return cs;
}

/* An engine step that applies cs (after capturing); returns its result. */
static hl_apply_result apply(hl_db *dst, hl_changeset *cs, hl_buf *raw, uint8_t flags)
{
    hl_apply_result r;
    ck_assert_int_eq(hl_db_apply_one(dst, cs, raw->data, raw->len, flags, &r), HL_OK);
    return r;
}

/* Deterministic dump of the application tables (quote() shows type and bytes). */
static char *dump(const char *path)
{
    sqlite3 *db = app_open(path);
    hl_buf out;
    hl_buf_init(&out, 256u << 20);
    const char *q[] = {"SELECT id, quote(title), quote(year) FROM books ORDER BY id",
                       "SELECT quote(\"select\"), quote(\"a\"\"b\"), quote(\"prénom\") FROM \"my table\" ORDER BY 1",
                       "SELECT quote(a), quote(b), quote(v) FROM pairs ORDER BY a, b",
                       "SELECT rowid, quote(x), quote(y) FROM plain ORDER BY rowid",
                       "SELECT id, quote(email) FROM uniq ORDER BY id"};
    for (size_t i = 0; i < sizeof q / sizeof q[0]; i++) {
        sqlite3_stmt *st;
        ck_assert_int_eq(sqlite3_prepare_v2(db, q[i], -1, &st, NULL), SQLITE_OK);
        while (sqlite3_step(st) == SQLITE_ROW) {
            for (int c = 0; c < sqlite3_column_count(st); c++)
                hl_buf_addf(&out, "%s|", sqlite3_column_text(st, c) ? (const char *)sqlite3_column_text(st, c) : "");
            hl_buf_addc(&out, '\n');
        }
        sqlite3_finalize(st);
        hl_buf_adds(&out, "--\n");
    }
    sqlite3_close(db);
    return (char *)hl_buf_steal(&out, NULL);
}

/* Both databases hold the same application rows (dump()). */
static void assert_same_dump(const char *pa, const char *pb)
{
    char *da = dump(pa), *db = dump(pb);
    ck_assert_str_eq(da, db);
    free(da);
    free(db);
}

static void make_pair(char *pa, char *pb, size_t n, hl_db **a, hl_db **b)
{
    path_of(pa, n, "a.db");
    path_of(pb, n, "b.db");
    sqlite3 *x = app_open(pa), *y = app_open(pb);
    app_exec(x, schema_sql);
    app_exec(y, schema_sql);
    sqlite3_close(x);
    sqlite3_close(y);
    *a = engine_open(pa, 1);
    *b = engine_open(pb, 2);
}

/* Two engine databases a and b with the test schema, an application connection to each, and a buffer for raw
 * changesets. */
typedef struct pair {
    char pa[300], pb[300];
    hl_db *a, *b;
    sqlite3 *appa, *appb;
    hl_buf raw;
    uint8_t flags;
} pair;

static void pair_open(pair *p)
{
    hl_buf_init(&p->raw, 256u << 20);
    make_pair(p->pa, p->pb, sizeof p->pa, &p->a, &p->b);
    p->appa = app_open(p->pa);
    p->appb = app_open(p->pb);
}

/* Closes what is still open: a test that closed an engine database early sets its pointer to NULL. */
static void pair_close(pair *p)
{
    sqlite3_close(p->appa);
    sqlite3_close(p->appb);
    hl_db_close(p->a);
    hl_db_close(p->b);
    hl_buf_free(&p->raw);
}

START_TEST(trigger_sql_quotes_identifiers)
{
    hl_table t = {0};
    char c0[] = "se\"lect", c1[] = "v", name[] = "my \"odd\" table",
         log[] = "__harmonylite__my \"odd\" table_change_log";
    char *cols[] = {c0, c1};
    size_t pk[] = {0};
    int pkpos[] = {1, 0};
    t.name = name;
    t.cols = cols;
    t.ncols = 2;
    t.pk = pk;
    t.npk = 1;
    t.pkpos = pkpos;
    t.log = log;
    hl_buf ddl, trg;
    hl_buf_init(&ddl, 1 << 20);
    hl_buf_init(&trg, 1 << 20);
    ck_assert_int_eq(hl_trigger_sql(&t, &ddl, &trg), HL_OK);
    ck_assert_str_eq(hl_buf_str(&ddl), "CREATE TABLE IF NOT EXISTS \"__harmonylite__my \"\"odd\"\" table_change_log\""
                                       "(seq INTEGER PRIMARY KEY, jd REAL NOT NULL, k0)");
    ck_assert_ptr_nonnull(strstr(hl_buf_str(&trg), "AFTER INSERT ON \"my \"\"odd\"\" table\""));
    ck_assert_ptr_nonnull(strstr(hl_buf_str(&trg), "NEW.\"se\"\"lect\""));
    ck_assert_ptr_nonnull(strstr(hl_buf_str(&trg), "AFTER UPDATE OF \"se\"\"lect\" ON"));
    ck_assert_ptr_nonnull(strstr(hl_buf_str(&trg), "OLD.\"se\"\"lect\" IS NOT NEW.\"se\"\"lect\""));
    ck_assert_ptr_null(strstr(hl_buf_str(&trg), "pragma_function_list"));
    hl_buf_free(&ddl);
    hl_buf_free(&trg);
}
END_TEST

START_TEST(schema_skips_virtual_and_internal)
{
    pair p;
    pair_open(&p);
    ck_assert_uint_eq(hl_db_table_count(p.a), 5);
    ck_assert_ptr_null(hl_db_table(p.a, "docs"));
    ck_assert_ptr_null(hl_db_table(p.a, "docs_data"));
    ck_assert_ptr_nonnull(hl_db_table(p.a, "BOOKS"));
    hl_table *pl = hl_db_table(p.a, "plain");
    ck_assert_uint_eq(pl->npk, 0);
    ck_assert_str_eq(pl->rowid, "rowid");
    hl_table *pr = hl_db_table(p.a, "pairs");
    ck_assert(pr->without_rowid);
    ck_assert_uint_eq(pr->npk, 2);
    ck_assert_mem_eq(hl_db_schema_hash(p.a), hl_db_schema_hash(p.b), 32);
    pair_close(&p);
}
END_TEST

/* The schema hash's canonical description and its test vector (docs/protocol.md §7). */
#define VECTOR_SQL                                                                                                     \
    "CREATE TABLE users(id INTEGER PRIMARY KEY, name text  not null, email VARCHAR( 255 ), nick);"                     \
    "CREATE TABLE \"Orders\"(user_id INTEGER, n int, total REAL NOT NULL DEFAULT 0, PRIMARY KEY(n, user_id)) "         \
    "WITHOUT ROWID;"
#define VECTOR_CANONICAL                                                                                               \
    "harmonylite-schema-1;T6:OrdersC1:nD3:INTN1P1;C5:totalD4:REALN1P0;C7:user_idD7:INTEGERN1P2;"                       \
    "T5:usersC5:emailD14:VARCHAR( 255 )N0P0;C2:idD7:INTEGERN0P1;C4:nameD4:TEXTN1P0;C4:nickD0:N0P0;"
#define VECTOR_HASH "44e719ee2bb6c81f87102ad9515c737fedc547633853059a219280c169d15795"

START_TEST(schema_hash_is_sha256_of_the_canonical_form)
{
    char path[300];
    path_of(path, sizeof path, "v.db");
    sqlite3 *app = app_open(path);
    app_exec(app, VECTOR_SQL);
    hl_db *d = engine_open(path, 1);
    hl_buf b;
    hl_buf_init(&b, 1u << 20);
    ck_assert_int_eq(hl_schema_canonical(&d->schema, &b), HL_OK);
    ck_assert_str_eq(hl_buf_str(&b), VECTOR_CANONICAL);
    char hex[65];
    hl_hex(hl_db_schema_hash(d), 32, hex);
    ck_assert_str_eq(hex, VECTOR_HASH);
    ck_assert_ptr_null(hl_db_prev_schema_hash(d));
    /* The vector the protocol documents is this one. */
    FILE *f = fopen(HL_SOURCE_DIR "/docs/protocol.md", "r");
    ck_assert_ptr_nonnull(f);
    static char doc[1 << 18];
    size_t n = fread(doc, 1, sizeof doc - 1, f);
    doc[n] = 0;
    fclose(f);
    ck_assert_ptr_nonnull(strstr(doc, VECTOR_HASH));
    ck_assert_ptr_nonnull(strstr(doc, "T5:usersC5:emailD14:VARCHAR( 255 )N0P0;"));
    /* Declaration order, case of type names and white space do not matter; a column does. */
    unsigned char h1[32];
    memcpy(h1, hl_db_schema_hash(d), 32);
    hl_db_close(d);
    sqlite3_close(app);
    path_of(path, sizeof path, "w.db");
    app = app_open(path);
    app_exec(app, "CREATE TABLE \"Orders\"(total  real NOT NULL, n INT, user_id integer, PRIMARY KEY(n, user_id)) "
                  "WITHOUT ROWID; CREATE TABLE users(nick, email varchar(   255 ), name TEXT NOT NULL, id INTEGER "
                  "PRIMARY KEY)");
    d = engine_open(path, 1);
    ck_assert_mem_eq(hl_db_schema_hash(d), h1, 32);
    hl_db_close(d);
    sqlite3_close(app);
    hl_buf_free(&b);
}
END_TEST

/* The previous hash follows live changes and changes made while stopped, and survives a restart. */
START_TEST(previous_schema_hash_is_kept_and_persisted)
{
    char path[300];
    unsigned char h0[32], h1[32], h2[32];
    path_of(path, sizeof path, "p.db");
    sqlite3 *app = app_open(path);
    app_exec(app, "CREATE TABLE t(id INTEGER PRIMARY KEY, a)");
    hl_db *d = engine_open(path, 1);
    memcpy(h0, hl_db_schema_hash(d), 32);
    ck_assert_ptr_null(hl_db_prev_schema_hash(d));
    app_exec(app, "ALTER TABLE t ADD COLUMN b");
    hl_step s = {.capture = true};
    ck_assert_int_eq(hl_db_step(d, NULL, NULL, &s), HL_OK);
    ck_assert(s.schema_changed);
    memcpy(h1, hl_db_schema_hash(d), 32);
    ck_assert_mem_ne(h0, h1, 32);
    ck_assert_ptr_nonnull(hl_db_prev_schema_hash(d));
    ck_assert_mem_eq(hl_db_prev_schema_hash(d), h0, 32);
    hl_db_close(d);
    /* restart: the previous hash is still known */
    d = engine_open(path, 1);
    ck_assert_mem_eq(hl_db_schema_hash(d), h1, 32);
    ck_assert_ptr_nonnull(hl_db_prev_schema_hash(d));
    ck_assert_mem_eq(hl_db_prev_schema_hash(d), h0, 32);
    hl_db_close(d);
    /* changed while stopped: the hash last seen becomes the previous one */
    app_exec(app, "ALTER TABLE t ADD COLUMN c");
    d = engine_open(path, 1);
    memcpy(h2, hl_db_schema_hash(d), 32);
    ck_assert_mem_ne(h2, h1, 32);
    ck_assert_ptr_nonnull(hl_db_prev_schema_hash(d));
    ck_assert_mem_eq(hl_db_prev_schema_hash(d), h1, 32);
    hl_db_close(d);
    sqlite3_close(app);
}
END_TEST

START_TEST(capture_and_apply_round_trip)
{
    pair p;
    pair_open(&p);

    app_exec(p.appa, "BEGIN;"
                     "INSERT INTO books(title, year) VALUES ('Emma', 1815), ('Persuasion', NULL);"
                     "INSERT INTO \"my table\" VALUES ('k1', x'00ff10', 1.5), ('ключ', zeroblob(0), -0.25);"
                     "INSERT INTO pairs VALUES (1, 'a', 9223372036854775807), (-9223372036854775808, '', 'x');"
                     "INSERT INTO plain VALUES ('p', 1), (NULL, 2.5);"
                     "COMMIT;");
    /* An update and a delete coalesce with the inserts: one entry per row
     * (the deleted row travels as a delete, leaving a tombstone everywhere). */
    app_exec(p.appa, "UPDATE books SET title = 'Emma.' WHERE id = 1; DELETE FROM plain WHERE y = 1;");
    ck_assert_uint_eq(capture(p.a), 8);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    ck_assert_uint_eq(cs->nrows, 8);
    ck_assert_uint_eq(cs->origin, 1);
    ck_assert_uint_eq(cs->seq, 1);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    assert_same_dump(p.pa, p.pb);

    /* Replicated writes are not captured again. */
    ck_assert_uint_eq(capture(p.b), 0);
    uint64_t n;
    ck_assert_int_eq(hl_db_outbox_count(p.b, &n), HL_OK);
    ck_assert_uint_eq(n, 0);

    /* Applying the same changeset again is a duplicate. */
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_DUPLICATE);
    hl_changeset_free(cs);
    pair_close(&p);
}
END_TEST

/* A changeset whose payload fits the limit but whose decoded form does not
 * would be refused by every receiver: capture refuses it instead, keeping the
 * rows logged, and captures them once the limit allows. */
START_TEST(capture_never_sends_what_receivers_would_refuse)
{
    pair p;
    pair_open(&p);
    /* 2000 rows of NULLs: about 20 bytes each as sent, 128 decoded; 256 KB decoded in all. */
    app_exec(p.appa, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) "
                     "INSERT INTO plain SELECT NULL, NULL FROM n;");
    set_max_changeset_bytes(p.a, 64u << 10);
    set_max_changeset_bytes(p.b, 64u << 10);
    ck_assert_uint_eq(capture(p.a), 2000);
    /* A chain of changesets, each within the limit once decoded too; the receiver applies it as one. */
    size_t members = 0;
    uint64_t n = 0;
    while (hl_db_outbox_count(p.a, &n) == HL_OK && n > 0) {
        hl_changeset *cs = take(p.a, &p.raw, &p.flags);
        ck_assert_uint_le(hl_changeset_mem_cost(cs), 64u << 10);
        hl_apply_result r = apply(p.b, cs, &p.raw, p.flags);
        ck_assert_int_eq(r, n > 1 ? HL_HELD : HL_APPLIED); /* held until the chain's last one completes it */
        hl_changeset_free(cs);
        members++;
    }
    ck_assert_uint_gt(members, 4);
    ck_assert_uint_eq(hl_db_counters(p.b)->chains_applied, 1);
    assert_same_dump(p.pa, p.pb);
    pair_close(&p);
}
END_TEST

START_TEST(last_writer_wins_and_tombstones)
{
    pair p;
    pair_open(&p);

    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (1, 'from a')");
    capture(p.a);
    hl_changeset *older = take(p.a, &p.raw, &p.flags);
    hl_buf raw_older;
    hl_buf_init(&raw_older, 256u << 20);
    hl_buf_add(&raw_older, p.raw.data, p.raw.len);
    uint8_t flags_older = p.flags;

    usleep(5000);
    /* b writes the same row later: its version is newer. */
    app_exec(p.appb, "INSERT INTO books(id, title) VALUES (1, 'from b')");
    capture(p.b);
    ck_assert_int_eq(apply(p.b, older, &raw_older, flags_older), HL_APPLIED);
    ck_assert_uint_eq(hl_db_counters(p.b)->rows_skipped_lww, 1);
    char *db = dump(p.pb);
    ck_assert_ptr_nonnull(strstr(db, "'from b'"));
    free(db);

    /* b's version reaches a and wins there too. */
    hl_changeset *newer = take(p.b, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.a, newer, &p.raw, p.flags), HL_APPLIED);
    assert_same_dump(p.pa, p.pb);
    hl_changeset_free(newer);
    hl_changeset_free(older);

    /* A delete on a leaves a tombstone: an older insert of the row from elsewhere cannot resurrect it. */
    app_exec(p.appb, "INSERT INTO books(id, title) VALUES (7, 'old on b')");
    capture(p.b);
    hl_changeset *old_insert = take(p.b, &raw_older, &flags_older);
    usleep(5000);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (7, 'on a'); DELETE FROM books WHERE id = 7;");
    capture(p.a);
    ck_assert_int_eq(apply(p.a, old_insert, &raw_older, flags_older), HL_APPLIED);
    sqlite3_stmt *st;
    ck_assert_int_eq(sqlite3_prepare_v2(p.appa, "SELECT count(*) FROM books WHERE id = 7", -1, &st, NULL), SQLITE_OK);
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    ck_assert_int_eq(sqlite3_column_int(st, 0), 0);
    sqlite3_finalize(st);
    hl_changeset_free(old_insert);

    pair_close(&p);
    hl_buf_free(&raw_older);
}
END_TEST

START_TEST(out_of_order_changesets_are_held_then_applied)
{
    pair p;
    pair_open(&p);
    hl_buf r1, r2;
    uint8_t f1, f2;
    hl_buf_init(&r1, 256u << 20);
    hl_buf_init(&r2, 256u << 20);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (1, 'one')");
    capture(p.a);
    app_exec(p.appa, "UPDATE books SET title = 'two' WHERE id = 1");
    capture(p.a);
    hl_changeset *c1 = take(p.a, &r1, &f1);
    hl_changeset *c2 = take(p.a, &r2, &f2);
    ck_assert_uint_eq(c2->seq, 2);
    ck_assert_int_eq(apply(p.b, c2, &r2, f2), HL_HELD);
    uint64_t held;
    ck_assert_int_eq(hl_db_held_count(p.b, &held, NULL, NULL), HL_OK);
    ck_assert_uint_eq(held, 1);
    ck_assert_int_eq(apply(p.b, c1, &r1, f1), HL_APPLIED);
    ck_assert_int_eq(hl_db_held_count(p.b, &held, NULL, NULL), HL_OK);
    ck_assert_uint_eq(held, 0);
    assert_same_dump(p.pa, p.pb);
    hl_changeset_free(c1);
    hl_changeset_free(c2);
    pair_close(&p);
    hl_buf_free(&r1);
    hl_buf_free(&r2);
}
END_TEST

START_TEST(schema_mismatch_holds_until_schema_catches_up)
{
    pair p;
    pair_open(&p);
    app_exec(p.appa, "ALTER TABLE books ADD COLUMN isbn TEXT; INSERT INTO books(id, title, isbn) VALUES (3, 't', 'i')");
    ck_assert_uint_eq(capture(p.a), 1);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_HELD);
    /* The application on b runs the same DDL; the held changeset applies. */
    app_exec(p.appb, "ALTER TABLE books ADD COLUMN isbn TEXT");
    hl_step step = {.retry_held = true};
    ck_assert_int_eq(hl_db_step(p.b, NULL, NULL, &step), HL_OK);
    ck_assert(step.schema_changed);
    sqlite3_stmt *st;
    ck_assert_int_eq(sqlite3_prepare_v2(p.appb, "SELECT isbn FROM books WHERE id = 3", -1, &st, NULL), SQLITE_OK);
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    ck_assert_str_eq((const char *)sqlite3_column_text(st, 0), "i");
    sqlite3_finalize(st);
    hl_changeset_free(cs);

    /* Same hash claimed, unknown table: malformed and refused; later changesets still apply. */
    hl_changeset *bad = hl_changeset_new();
    const char *cols[] = {"id"};
    uint32_t ti;
    hl_changeset_add_table(bad, "nope", cols, 1, cols, 1, &ti);
    hl_value k = {.type = HL_VAL_INT, .u.i = 1};
    hl_changeset_add_row(bad, ti, HL_OP_UPSERT, 1u << 16, &k, 1, &k, 1);
    bad->origin = 9;
    bad->epoch = 9;
    bad->seq = 1;
    memcpy(bad->schema_hash, hl_db_schema_hash(p.b), 32);
    hl_buf_reset(&p.raw);
    hl_buf_addc(&p.raw, 0);
    ck_assert_int_eq(hl_changeset_encode(bad, false, &p.raw), HL_OK);
    ck_assert_int_eq(apply(p.b, bad, &p.raw, 0), HL_MALFORMED);
    ck_assert_uint_eq(hl_db_counters(p.b)->changesets_malformed, 1);
    hl_changeset_free(bad);

    pair_close(&p);
}
END_TEST

START_TEST(constraint_conflict_is_recorded_and_rest_applies)
{
    pair p;
    pair_open(&p);
    /* b's row is the newer one: a's clashing row loses there. */
    app_exec(p.appa, "INSERT INTO uniq VALUES (1, 'x@y'), (2, 'z@y')");
    capture(p.a);
    usleep(5000);
    app_exec(p.appb, "INSERT INTO uniq VALUES (50, 'x@y')");
    capture(p.b);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    ck_assert_uint_eq(hl_db_counters(p.b)->conflicts, 1);
    ck_assert_uint_eq(hl_db_counters(p.b)->rows_applied, 1);
    sqlite3_stmt *st;
    ck_assert_int_eq(sqlite3_prepare_v2(p.appb, "SELECT count(*) FROM __harmonylite__conflicts", -1, &st, NULL),
                     SQLITE_OK);
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    ck_assert_int_eq(sqlite3_column_int(st, 0), 1);
    sqlite3_finalize(st);
    hl_changeset_free(cs);
    pair_close(&p);
}
END_TEST

/* The text value of a one-row query ("" for NULL), malloc'd. */
static char *text_of(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *st;
    ck_assert_msg(sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK, "%s: %s", sql, sqlite3_errmsg(db));
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    const unsigned char *v = sqlite3_column_text(st, 0);
    char *out = strdup(v ? (const char *)v : "");
    sqlite3_finalize(st);
    ck_assert_ptr_nonnull(out);
    return out;
}

/* The version of row k of a table keyed by an INTEGER PRIMARY KEY: its clock
 * row, else its span (src/db/clock.c); 0 when none. *node (may be NULL)
 * receives the version's node. */
static int64_t version_of(sqlite3 *db, const char *table, int64_t k, int64_t *node)
{
    char sql[600];
    int64_t v[2];
    for (int i = 0; i < 2; i++) {
        const char *col = i ? "node" : "hlc";
        snprintf(sql, sizeof sql,
                 "SELECT coalesce((SELECT %s FROM __harmonylite__%s_clock WHERE k0 = %lld), (SELECT CASE WHEN hi >= "
                 "%lld THEN %s END FROM __harmonylite__%s_span WHERE lo <= %lld ORDER BY lo DESC LIMIT 1), 0)",
                 col, table, (long long)k, (long long)k, col, table, (long long)k);
        v[i] = scalar(db, sql);
    }
    if (node)
        *node = v[1];
    return v[0];
}

START_TEST(null_key_rows_are_refused_not_fatal)
{
    pair p;
    pair_open(&p);
    /* A rowid table lets a declared key column hold NULL. */
    app_exec(p.appa, "CREATE TABLE nk(a TEXT, b INTEGER, v, PRIMARY KEY(a, b))");
    app_exec(p.appb, "CREATE TABLE nk(a TEXT, b INTEGER, v, PRIMARY KEY(a, b))");
    capture(p.a);
    capture(p.b);
    app_exec(p.appa, "INSERT INTO nk VALUES (NULL, 1, 'x'), ('k', 2, 'y')");
    ck_assert_uint_eq(capture(p.a), 1);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    ck_assert_uint_eq(cs->nrows, 1);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM nk WHERE a = 'k'"), 1);
    /* The same row arriving with a NULL in its key is recorded as a conflict. */
    cs->rows[0].key[0].type = HL_VAL_NULL;
    cs->seq++;
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    ck_assert_uint_eq(hl_db_counters(p.b)->conflicts, 1);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM __harmonylite__conflicts WHERE reason LIKE '%NULL%'"), 1);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM nk"), 1);
    hl_changeset_free(cs);
    pair_close(&p);
}
END_TEST

/* Issue 10: appended rows of a table keyed by an INTEGER PRIMARY KEY get one
 * version per capture, recorded as spans of consecutive rowids, not a clock
 * row each; later writes get clock rows; the receiver's versions agree. */
START_TEST(appends_are_versioned_by_spans)
{
    pair p;
    pair_open(&p);
    ck_assert(hl_db_table(p.a, "books")->spanned);
    ck_assert(!hl_db_table(p.a, "plain")->spanned); /* VACUUM may renumber it: a version per row */
    ck_assert(!hl_db_table(p.a, "pairs")->spanned);
    app_exec(p.appa, "INSERT INTO books(title) VALUES ('a'), ('b'), ('c'); INSERT INTO books(id, title) VALUES (10, "
                     "'j'), (11, 'k')");
    ck_assert_uint_eq(capture(p.a), 5);
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM __harmonylite__books_clock"), 0);
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM __harmonylite__books_span"), 2); /* 1-3 and 10-11 */
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM __harmonylite__books_span WHERE (lo = 1 AND hi = 3) OR "
                                    "(lo = 10 AND hi = 11)"),
                     2);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    ck_assert_uint_eq(cs->nrows, 5);
    int64_t node = 0, v = version_of(p.appa, "books", 2, &node);
    ck_assert_int_gt(v, 0);
    ck_assert_int_eq(node, 1);
    for (size_t i = 0; i < cs->nrows; i++) /* one version for the whole append */
        ck_assert_uint_eq(cs->rows[i].hlc, (uint64_t)v);
    ck_assert_int_eq(version_of(p.appa, "books", 11, NULL), v);
    ck_assert_int_eq(version_of(p.appa, "books", 5, NULL), 0); /* the gap has no version */
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    hl_changeset_free(cs);
    for (int64_t k = 1; k <= 11; k++)
        ck_assert_int_eq(version_of(p.appb, "books", k, NULL), version_of(p.appa, "books", k, NULL));

    /* An update and a delete inside the span: clock rows, newer than it. */
    app_exec(p.appa, "UPDATE books SET title = 'B' WHERE id = 2; DELETE FROM books WHERE id = 3");
    ck_assert_uint_eq(capture(p.a), 2);
    ck_assert_int_gt(version_of(p.appa, "books", 2, NULL), v);
    ck_assert_int_eq(scalar(p.appa, "SELECT deleted FROM __harmonylite__books_clock WHERE k0 = 3"), 1);
    ck_assert_int_eq(version_of(p.appa, "books", 1, NULL), v);
    cs = take(p.a, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    hl_changeset_free(cs);

    /* Rows appended while the step streams (a change log too big for a
     * snapshot read) are spanned the same way. */
    set_max_changeset_bytes(p.a, 4096);
    app_exec(p.appa, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 60000) "
                     "INSERT INTO books(id, title) SELECT 100 + i, 'x' || i FROM n");
    app_exec(p.appa, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 60000) "
                     "INSERT INTO plain SELECT i, i FROM n");
    ck_assert_uint_eq(capture(p.a), 120000);
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM __harmonylite__books_clock WHERE k0 > 100"), 0);
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM __harmonylite__books_span WHERE lo = 101 AND hi = 60100"), 1);
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM __harmonylite__plain_clock"), 60000);
    while (outbox_has(p.a)) { /* a chain: its members wait for the last one */
        cs = take(p.a, &p.raw, &p.flags);
        hl_apply_result r = apply(p.b, cs, &p.raw, p.flags);
        ck_assert(r == HL_APPLIED || r == HL_HELD);
        hl_changeset_free(cs);
    }
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books"), 60004);
    ck_assert_int_eq(version_of(p.appb, "books", 60100, NULL), version_of(p.appa, "books", 60100, NULL));

    /* Appends with gaps (ids interleaved between nodes): a run of one row
     * gets a clock row, not a span. */
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (70000, 't'), (70002, 'v')");
    ck_assert_uint_eq(capture(p.a), 2);
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM __harmonylite__books_span WHERE lo >= 70000"), 0);
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM __harmonylite__books_clock WHERE k0 IN (70000, 70002) AND "
                                    "deleted = 0 AND node = 1"),
                     2);
    int64_t vgap = version_of(p.appa, "books", 70000, NULL);
    ck_assert_int_gt(vgap, v);
    ck_assert_int_eq(version_of(p.appa, "books", 70002, NULL), vgap);
    cs = take(p.a, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    hl_changeset_free(cs);
    ck_assert_int_eq(version_of(p.appb, "books", 70002, NULL), vgap);
    pair_close(&p);
}
END_TEST

/* Issue 10: a remote version is compared with the span of a row that has no
 * clock row: an older one loses, a newer one wins and gets a clock row. */
START_TEST(remote_versions_are_compared_with_spans)
{
    pair p;
    pair_open(&p);
    app_exec(p.appb, "INSERT INTO books(id, title) VALUES (1, 'b1'), (2, 'b2')");
    capture(p.b);
    hl_changeset *cs = take(p.b, &p.raw, &p.flags);
    usleep(3000);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (1, 'a1'), (2, 'a2')");
    capture(p.a);
    int64_t va = version_of(p.appa, "books", 1, NULL);
    ck_assert_int_gt(va, 0);
    ck_assert_uint_lt(cs->rows[0].hlc, (uint64_t)va);
    /* b's versions are older than a's span: nothing changes on a. */
    ck_assert_int_eq(apply(p.a, cs, &p.raw, p.flags), HL_APPLIED);
    ck_assert_uint_eq(hl_db_counters(p.a)->rows_skipped_lww, 2);
    char *before = dump(p.pa);
    ck_assert_ptr_nonnull(strstr(before, "'a1'"));
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM __harmonylite__books_clock"), 0);
    /* The same rows with a version newer than the span win. */
    for (size_t i = 0; i < cs->nrows; i++)
        if (cs->rows[i].key[0].u.i == 2)
            cs->rows[i].hlc = (uint64_t)va + 1;
    cs->seq++;
    hl_buf_reset(&p.raw);
    p.flags = 0;
    ck_assert_int_eq(hl_changeset_encode(cs, false, &p.raw), HL_OK);
    ck_assert_int_eq(apply(p.a, cs, &p.raw, p.flags), HL_APPLIED);
    int64_t node = 0;
    ck_assert_int_eq(version_of(p.appa, "books", 2, &node), va + 1);
    ck_assert_int_eq(node, 2);
    ck_assert_int_eq(version_of(p.appa, "books", 1, NULL), va);
    char *after = dump(p.pa);
    ck_assert_ptr_nonnull(strstr(after, "'a1'"));
    ck_assert_ptr_nonnull(strstr(after, "'b2'"));
    free(before);
    free(after);
    hl_changeset_free(cs);
    pair_close(&p);
}
END_TEST

/* Issue 10: a run of appended rows arrives as consecutive keys with one
 * version; where no row of its range has a version yet, the receiver records
 * it as one span too, and rows that do have one are still compared row by
 * row: the newer version wins on both nodes. */
START_TEST(applied_appends_are_versioned_by_spans)
{
    const char *titles = "SELECT group_concat(title, '') FROM (SELECT title FROM books WHERE id BETWEEN 10 AND 16 "
                         "ORDER BY id)";
    pair p;
    pair_open(&p);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (1, 'a1'), (2, 'a2'), (3, 'a3'), (4, 'a4'), (5, 'a5')");
    capture(p.a);
    hl_changeset *cs1 = take(p.a, &p.raw, &p.flags);
    int64_t va = version_of(p.appa, "books", 1, NULL);

    /* Nothing in 1-5 has a version on b: one span, no clock row. */
    ck_assert_int_eq(apply(p.b, cs1, &p.raw, p.flags), HL_APPLIED);
    ck_assert_uint_eq(hl_db_counters(p.b)->rows_applied, 5);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM __harmonylite__books_clock"), 0);
    ck_assert_int_eq(
        scalar(p.appb, "SELECT count(*) FROM __harmonylite__books_span WHERE lo = 1 AND hi = 5 AND node = 1"), 1);
    for (int64_t k = 1; k <= 5; k++)
        ck_assert_int_eq(version_of(p.appb, "books", k, NULL), va);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books WHERE title LIKE 'a%'"), 5);
    /* The high-water mark moved over them: b does not capture them as its own. */
    ck_assert_uint_eq(capture(p.b), 0);

    /* Newer writes on b inside a later run's range: a clock row (row 12) and
     * a span (rows 14-15); a's older run 10-16 loses there, wins elsewhere. */
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (10, 'a'), (11, 'a'), (12, 'a'), (13, 'a'), (14, 'a'), "
                     "(15, 'a'), (16, 'a')");
    capture(p.a);
    hl_changeset *cs2 = take(p.a, &p.raw, &p.flags);
    usleep(3000);
    app_exec(p.appb, "INSERT INTO books(id, title) VALUES (12, 'b')");
    capture(p.b);
    app_exec(p.appb, "INSERT INTO books(id, title) VALUES (14, 'b'), (15, 'b')");
    capture(p.b);
    int64_t vb12 = version_of(p.appb, "books", 12, NULL), vb14 = version_of(p.appb, "books", 14, NULL);
    ck_assert_int_gt(vb12, version_of(p.appa, "books", 10, NULL));
    ck_assert_int_eq(apply(p.b, cs2, &p.raw, p.flags), HL_APPLIED);
    hl_changeset_free(cs2);
    char *got = text_of(p.appb, titles);
    ck_assert_str_eq(got, "aababba");
    free(got);
    ck_assert_int_eq(version_of(p.appb, "books", 12, NULL), vb12);
    ck_assert_int_eq(version_of(p.appb, "books", 15, NULL), vb14);
    int64_t va2 = version_of(p.appa, "books", 16, NULL);
    ck_assert_int_eq(version_of(p.appb, "books", 13, NULL), va2);
    ck_assert_int_eq(version_of(p.appb, "books", 10, NULL), va2);
    /* b's writes reach a, where they are newer than a's span: both nodes agree. */
    while (outbox_has(p.b)) {
        hl_changeset *cs = take(p.b, &p.raw, &p.flags);
        ck_assert_int_eq(apply(p.a, cs, &p.raw, p.flags), HL_APPLIED);
        hl_changeset_free(cs);
    }
    got = text_of(p.appa, titles);
    ck_assert_str_eq(got, "aababba");
    free(got);
    for (int64_t k = 1; k <= 16; k++)
        ck_assert_int_eq(version_of(p.appa, "books", k, NULL), version_of(p.appb, "books", k, NULL));

    /* A table with another UNIQUE index: a row's write may touch another row,
     * so its rows keep a clock row each. */
    ck_assert(hl_db_table(p.b, "uniq")->spanned);
    app_exec(p.appa, "INSERT INTO uniq VALUES (1, 'x'), (2, 'y'), (3, 'z')");
    capture(p.a);
    hl_changeset *cs3 = take(p.a, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, cs3, &p.raw, p.flags), HL_APPLIED);
    uint64_t seq3 = cs3->seq;
    hl_changeset_free(cs3);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM __harmonylite__uniq_clock"), 3);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM __harmonylite__uniq_span"), 0);

    /* The first run again: nothing changes (its version does not beat itself). */
    uint64_t skipped = hl_db_counters(p.b)->rows_skipped_lww;
    cs1->seq = seq3 + 1;
    hl_buf_reset(&p.raw);
    ck_assert_int_eq(hl_changeset_encode(cs1, false, &p.raw), HL_OK);
    ck_assert_int_eq(apply(p.b, cs1, &p.raw, 0), HL_APPLIED);
    ck_assert_uint_eq(hl_db_counters(p.b)->rows_skipped_lww, skipped + 5);
    hl_changeset_free(cs1);

    pair_close(&p);
}
END_TEST

/* Issue 10: a run of appended rows is written many rows per statement. A row
 * the receiver cannot write (here a NULL in a NOT NULL column, in the middle
 * of a run and of one such statement) is recorded as a conflict; every other
 * row of the run, before and after it, is applied and versioned. */
START_TEST(a_run_of_appends_keeps_all_rows_but_the_one_that_fails)
{
    pair p;
    pair_open(&p);
    app_exec(p.appa, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000) "
                     "INSERT INTO books(id, title, year) SELECT i, 't' || i, i FROM n");
    capture(p.a);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    ck_assert_uint_eq(cs->nrows, 1000);
    size_t bad = 0;
    for (size_t i = 0; i < cs->nrows; i++)
        if (cs->rows[i].key[0].u.i == 500)
            bad = i;
    ck_assert_int_eq(cs->rows[bad].vals[1].type, HL_VAL_TEXT);
    cs->rows[bad].vals[1].type = HL_VAL_NULL; /* title */
    hl_buf_reset(&p.raw);
    ck_assert_int_eq(hl_changeset_encode(cs, false, &p.raw), HL_OK);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, 0), HL_APPLIED);
    ck_assert_uint_eq(hl_db_counters(p.b)->rows_applied, 999);
    ck_assert_uint_eq(hl_db_counters(p.b)->conflicts, 1);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM __harmonylite__conflicts WHERE reason LIKE '%NOT NULL%'"), 1);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books"), 999);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books WHERE id = 500"), 0);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books WHERE title = 't' || id AND year = id"), 999);
    int64_t va = version_of(p.appa, "books", 1, NULL);
    ck_assert_int_eq(version_of(p.appb, "books", 499, NULL), va);
    ck_assert_int_eq(version_of(p.appb, "books", 501, NULL), va);
    ck_assert_int_eq(version_of(p.appb, "books", 1000, NULL), va);
    hl_changeset_free(cs);
    pair_close(&p);
}
END_TEST

/* hl_span_put keeps spans apart: one recorded over others cuts them, and the
 * clock rows inside it (older versions) go. */
START_TEST(span_put_cuts_what_it_covers)
{
    pair p;
    pair_open(&p);
    hl_table *t = hl_db_table(p.a, "books");
    ck_assert_int_eq(hl_db_begin(p.a), HL_OK);
    ck_assert_int_eq(hl_span_put(p.a, t, 1, 10, 100, 1), HL_OK);
    ck_assert_int_eq(hl_span_put(p.a, t, 20, 30, 110, 1), HL_OK);
    hl_value k = {.type = HL_VAL_INT, .u.i = 6};
    ck_assert_int_eq(hl_clock_put(p.a, t, &k, 1, 90, 2, true), HL_OK);
    ck_assert_int_eq(hl_span_put(p.a, t, 5, 7, 200, 1), HL_OK);   /* inside the first */
    ck_assert_int_eq(hl_span_put(p.a, t, 9, 22, 300, 1), HL_OK);  /* over the end of one, the start of the next */
    ck_assert_int_eq(hl_span_put(p.a, t, 25, 25, 400, 1), HL_OK); /* one row */
    ck_assert_int_eq(hl_db_commit(p.a), HL_OK);
    char *v = text_of(p.appa, "SELECT group_concat(lo || '-' || hi || ':' || hlc, ' ') FROM (SELECT * FROM "
                              "__harmonylite__books_span ORDER BY lo)");
    ck_assert_str_eq(v, "1-4:100 5-7:200 8-8:100 9-22:300 23-24:110 25-25:400 26-30:110");
    free(v);
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM __harmonylite__books_clock"), 0);
    pair_close(&p);
}
END_TEST

/* The clock's shape follows the key (src/db/triggers.c, clock_reshape): a
 * rebuild that makes an INTEGER PRIMARY KEY an ordinary INT key, or back,
 * keeps every version, and text keys then replicate instead of failing
 * every capture with a datatype mismatch. */
START_TEST(a_key_that_changes_kind_keeps_its_versions)
{
    static const char *const to_int =
        "BEGIN; CREATE TABLE books2(id INT PRIMARY KEY, title TEXT NOT NULL, year INTEGER); INSERT INTO books2 "
        "SELECT * FROM books; DROP TABLE books; ALTER TABLE books2 RENAME TO books; COMMIT";
    static const char *const to_alias =
        "BEGIN; CREATE TABLE books2(id INTEGER PRIMARY KEY, title TEXT NOT NULL, year INTEGER); INSERT INTO books2 "
        "SELECT * FROM books; DROP TABLE books; ALTER TABLE books2 RENAME TO books; COMMIT";
    const char *shape =
        "SELECT sql LIKE '% WITHOUT ROWID' FROM sqlite_schema WHERE name = '__harmonylite__books_clock'";
    const char *v1 = "SELECT hlc FROM __harmonylite__books_clock WHERE k0 = 1";
    pair p;
    pair_open(&p);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (1, 'a'), (2, 'b'), (5, 'e')");
    ck_assert_uint_eq(capture(p.a), 3);
    int64_t v = version_of(p.appa, "books", 1, NULL);
    int64_t v5 = version_of(p.appa, "books", 5, NULL);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    hl_changeset_free(cs);
    ck_assert_int_eq(scalar(p.appa, shape), 0);

    app_exec(p.appa, to_int);
    app_exec(p.appb, to_int);
    capture(p.a); /* the engine sees the new schema */
    capture(p.b);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES ('abc', 'text key')");
    ck_assert_uint_eq(capture(p.a), 1); /* before: "clock put: datatype mismatch" */
    ck_assert(!hl_db_table(p.a, "books")->int_key);
    ck_assert_int_eq(scalar(p.appa, shape), 1);
    ck_assert_int_eq(scalar(p.appa, v1), v); /* the span's version, now a clock row */
    ck_assert_int_eq(scalar(p.appa, "SELECT hlc FROM __harmonylite__books_clock WHERE k0 = 5"), v5);
    cs = take(p.a, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    hl_changeset_free(cs);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books WHERE id = 'abc'"), 1);

    /* And back: the text key goes first (an INTEGER PRIMARY KEY cannot hold
     * it); its tombstone has no place in a rowid clock, the rest stays. */
    app_exec(p.appa, "DELETE FROM books WHERE id = 'abc'");
    ck_assert_uint_eq(capture(p.a), 1);
    app_exec(p.appa, to_alias);
    capture(p.a);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (6, 'f')");
    ck_assert_uint_eq(capture(p.a), 1);
    ck_assert(hl_db_table(p.a, "books")->int_key);
    ck_assert_int_eq(scalar(p.appa, shape), 0);
    ck_assert_int_eq(scalar(p.appa, v1), v);
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM __harmonylite__books_clock WHERE typeof(k0) <> 'integer'"),
                     0);
    pair_close(&p);
}
END_TEST

START_TEST(rowid_clocks_and_their_exceptions)
{
    pair p;
    pair_open(&p);
    /* DESC makes an INTEGER PRIMARY KEY an ordinary column that can hold text. */
    const char *ddl = "CREATE TABLE descd(x INTEGER PRIMARY KEY DESC, y)";
    app_exec(p.appa, ddl);
    app_exec(p.appb, ddl);
    capture(p.a);
    capture(p.b);
    ck_assert(hl_db_table(p.a, "books")->int_key);
    ck_assert(hl_db_table(p.a, "plain")->int_key);
    ck_assert(!hl_db_table(p.a, "descd")->int_key);
    ck_assert(!hl_db_table(p.a, "pairs")->int_key);
    app_exec(p.appa, "INSERT INTO descd VALUES ('abc', 1); INSERT INTO books(id, title) VALUES (5, 'five')");
    ck_assert_uint_eq(capture(p.a), 2);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM descd WHERE x = 'abc'"), 1);
    /* A text key for a rowid table is refused as a conflict; the rest applies. */
    for (size_t i = 0; i < cs->nrows; i++)
        if (cs->rows[i].key[0].type == HL_VAL_INT) {
            cs->rows[i].key[0] = (hl_value){.type = HL_VAL_TEXT, .u.b = {(unsigned char *)"six", 3}};
            cs->rows[i].hlc += 1000;
        } else {
            cs->rows[i].hlc += 1000;
        }
    cs->seq++;
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    ck_assert_uint_eq(hl_db_counters(p.b)->conflicts, 1);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books"), 1);
    hl_changeset_free(cs);
    pair_close(&p);
}
END_TEST

static int engine_triggers_enabled(hl_db *d)
{
    int on = -1;
    ck_assert_int_eq(sqlite3_db_config(hl_db_handle(d), SQLITE_DBCONFIG_ENABLE_TRIGGER, -1, &on), SQLITE_OK);
    return on;
}

/* Without application triggers the engine connection runs with triggers off
 * (ours would only skip its writes); the application's fire on applied rows. */
START_TEST(application_triggers_fire_on_apply)
{
    pair p;
    pair_open(&p);
    ck_assert_int_eq(engine_triggers_enabled(p.b), 0);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (1, 'one')");
    capture(p.a);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    hl_changeset_free(cs);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM __harmonylite__books_change_log"), 0);

    app_exec(p.appb,
             "CREATE TABLE audit(id INTEGER PRIMARY KEY, book INTEGER);"
             "CREATE TRIGGER app_audit AFTER INSERT ON books BEGIN INSERT INTO audit(book) VALUES (NEW.id); END");
    capture(p.b);
    ck_assert_int_eq(engine_triggers_enabled(p.b), 1);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (2, 'two')");
    capture(p.a);
    cs = take(p.a, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    hl_changeset_free(cs);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM audit WHERE book = 2"), 1);
    /* Our triggers still skip everything written inside the apply, the
     * application trigger's row included: each node derives it itself. */
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM __harmonylite__books_change_log"), 0);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM __harmonylite__audit_change_log"), 0);
    pair_close(&p);
}
END_TEST

/* Databases from builds with one global clock table keep their versions. */
START_TEST(legacy_clock_table_is_migrated)
{
    char pa[300];
    path_of(pa, sizeof pa, "legacy.db");
    sqlite3 *app = app_open(pa);
    app_exec(app, schema_sql);
    app_exec(app, "CREATE TABLE __harmonylite__clock(tbl TEXT NOT NULL, pk BLOB NOT NULL, hlc INTEGER NOT NULL,"
                  " node INTEGER NOT NULL, deleted INTEGER NOT NULL, PRIMARY KEY (tbl, pk)) WITHOUT ROWID");
    hl_buf k1, k2;
    hl_buf_init(&k1, 1024);
    hl_buf_init(&k2, 1024);
    hl_value v1 = {.type = HL_VAL_INT, .u.i = 1};
    hl_value v2[2] = {{.type = HL_VAL_INT, .u.i = 7}, {.type = HL_VAL_TEXT, .u.b = {(unsigned char *)"x", 1}}};
    ck_assert_int_eq(hl_key_encode(&v1, 1, &k1), HL_OK);
    ck_assert_int_eq(hl_key_encode(v2, 2, &k2), HL_OK);
    uint64_t future = (hl_now_ms() + 3600000u) << 16;
    sqlite3_stmt *st;
    ck_assert_int_eq(sqlite3_prepare_v2(app, "INSERT INTO __harmonylite__clock VALUES (?, ?, ?, 9, ?)", -1, &st, NULL),
                     SQLITE_OK);
    const char *tbl[3] = {"books", "pairs", "gone"};
    hl_buf *keys[3] = {&k1, &k2, &k1};
    for (int i = 0; i < 3; i++) {
        sqlite3_bind_text(st, 1, tbl[i], -1, SQLITE_STATIC);
        sqlite3_bind_blob(st, 2, keys[i]->data, (int)keys[i]->len, SQLITE_STATIC);
        sqlite3_bind_int64(st, 3, (int64_t)future + i);
        sqlite3_bind_int(st, 4, i == 1);
        ck_assert_int_eq(sqlite3_step(st), SQLITE_DONE);
        sqlite3_reset(st);
    }
    sqlite3_finalize(st);

    hl_db *d = engine_open(pa, 1);
    ck_assert_int_eq(scalar(app, "SELECT count(*) FROM sqlite_schema WHERE name = '__harmonylite__clock'"), 0);
    ck_assert_int_eq(scalar(app, "SELECT hlc FROM __harmonylite__books_clock WHERE k0 = 1"), (int64_t)future);
    ck_assert_int_eq(scalar(app, "SELECT deleted FROM __harmonylite__pairs_clock WHERE k0 = 7 AND k1 = 'x'"), 1);
    ck_assert_uint_ge(hl_db_last_hlc(d), future + 2); /* new local versions come after every migrated one */
    hl_db_close(d);
    sqlite3_close(app);
    hl_buf_free(&k1);
    hl_buf_free(&k2);
}
END_TEST

static long file_size(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 ? (long)sb.st_size : -1;
}

START_TEST(checkpointer_moves_wal_into_the_database)
{
    char p[300];
    path_of(p, sizeof p, "ckpt.db");
    sqlite3 *app = app_open(p);
    app_exec(app, "PRAGMA wal_autocheckpoint = 0; CREATE TABLE t(x);"
                  "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)"
                  " INSERT INTO t SELECT randomblob(100) FROM n;");
    ck_assert_int_lt(file_size(p), 100000); /* everything is still in the -wal file */
    hl_checkpointer *c = NULL;
    ck_assert_int_eq(hl_checkpointer_start(&c, p), HL_OK);
    hl_checkpointer_kick(c);
    for (int i = 0; i < 500 && hl_checkpointer_runs(c) == 0; i++)
        usleep(10000);
    ck_assert_uint_ge(hl_checkpointer_runs(c), 1);
    ck_assert_int_gt(file_size(p), 2000000);
    hl_checkpointer_stop(c);
    sqlite3_close(app);
}
END_TEST

/* Appends a byte to path: an inotify event for the watcher. */
static void touch_file(const char *path)
{
    FILE *f = fopen(path, "a");
    ck_assert_ptr_nonnull(f);
    fputc('x', f);
    fclose(f);
}

START_TEST(watch_holds_looks_while_the_writer_is_busy_and_loses_none)
{
    char p[300];
    path_of(p, sizeof p, "watched.db");
    touch_file(p);
    hl_watch *w = NULL;
    ck_assert_int_eq(hl_watch_open(&w, p, 1000), HL_OK);
    ck_assert_int_ge(hl_watch_fd(w), 0);
    uint64_t t = hl_mono_ms();
    /* A busy writer: 100 rows in 2 ms. The next look waits for the hold... */
    hl_watch_captured(w, 100, t);
    hl_watch_captured(w, 100, t + 2);
    touch_file(p);
    ck_assert_int_eq(hl_watch_poll_fd(w, t + 3), hl_watch_fd(w)); /* nothing due yet: the event is wanted */
    ck_assert(!hl_watch_after_poll(w, true, false, t + 3));
    ck_assert_int_eq(hl_watch_timeout(w, t + 3), 9);
    /* A look is due at the end of the hold: more events would change nothing
     * and are not polled for (one wake-up per application commit before). */
    ck_assert_int_eq(hl_watch_poll_fd(w, t + 3), -1);
    ck_assert(!hl_watch_after_poll(w, false, true, t + 8));
    ck_assert_int_eq(hl_watch_poll_fd(w, t + 12), hl_watch_fd(w));
    /* ...and is not lost: it comes when the hold ends, without another event. */
    ck_assert(hl_watch_after_poll(w, false, true, t + 12));
    /* A slow writer (1 row since the last capture a second ago) is never held. */
    hl_watch_captured(w, 1, t + 1012);
    touch_file(p);
    ck_assert(hl_watch_after_poll(w, true, false, t + 1013));
    hl_watch_free(w);
}
END_TEST

START_TEST(release_memory_empties_the_page_cache)
{
    char p[300];
    path_of(p, sizeof p, "rest.db");
    sqlite3 *app = app_open(p);
    app_exec(app, "CREATE TABLE t(id INTEGER PRIMARY KEY, v);");
    hl_db *d = engine_open(p, 1);
    app_exec(app, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)"
                  " INSERT INTO t SELECT i, randomblob(100) FROM n;");
    ck_assert_uint_eq(capture(d), 20000);
    int cur = 0, hi = 0;
    ck_assert_int_eq(sqlite3_db_status(hl_db_handle(d), SQLITE_DBSTATUS_CACHE_USED, &cur, &hi, 0), SQLITE_OK);
    ck_assert_int_gt(cur, 1000000); /* the capture filled the cache */
    hl_db_release_memory(d);
    int after = 0;
    ck_assert_int_eq(sqlite3_db_status(hl_db_handle(d), SQLITE_DBSTATUS_CACHE_USED, &after, &hi, 0), SQLITE_OK);
    ck_assert_int_lt(after, cur / 4);
    ck_assert_uint_eq(capture(d), 0); /* and works on: the cache refills */
    app_exec(app, "UPDATE t SET v = 1 WHERE id = 7");
    ck_assert_uint_eq(capture(d), 1);
    hl_db_close(d);
    sqlite3_close(app);
}
END_TEST

START_TEST(cleanup_leaves_application_data)
{
    pair p;
    pair_open(&p);
    app_exec(p.appa, "INSERT INTO books(title) VALUES ('keep me'); INSERT INTO plain VALUES (1, 2)");
    capture(p.a);
    app_exec(p.appa, "INSERT INTO books(title) VALUES ('uncaptured')");
    hl_db_close(p.a);
    hl_db_close(p.b);
    p.a = p.b = NULL; /* closed here, not again by pair_close */
    char *before = dump(p.pa);
    ck_assert_int_eq(hl_db_cleanup(p.pa), HL_OK);
    char *after = dump(p.pa);
    ck_assert_str_eq(before, after);
    sqlite3_stmt *st;
    ck_assert_int_eq(sqlite3_prepare_v2(p.appa, "SELECT count(*) FROM sqlite_schema WHERE name LIKE '__harmonylite__%'",
                                        -1, &st, NULL),
                     SQLITE_OK);
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    ck_assert_int_eq(sqlite3_column_int(st, 0), 0);
    sqlite3_finalize(st);
    /* The application keeps writing normally. */
    app_exec(p.appa, "INSERT INTO books(title) VALUES ('after cleanup')");
    free(before);
    free(after);
    pair_close(&p);
}
END_TEST

START_TEST(new_table_rows_written_before_triggers_are_captured)
{
    pair p;
    pair_open(&p);
    /* The application creates a table and fills it before harmonylite looks. */
    app_exec(p.appa, "CREATE TABLE later(id INTEGER PRIMARY KEY, v TEXT); INSERT INTO later VALUES (1, 'x'), (2, 'y')");
    app_exec(p.appb, "CREATE TABLE later(id INTEGER PRIMARY KEY, v TEXT)");
    ck_assert_uint_eq(capture(p.a), 2);
    ck_assert_uint_eq(capture(p.b), 0);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    sqlite3_stmt *st;
    ck_assert_int_eq(sqlite3_prepare_v2(p.appb, "SELECT group_concat(v) FROM later", -1, &st, NULL), SQLITE_OK);
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    ck_assert_str_eq((const char *)sqlite3_column_text(st, 0), "x,y");
    sqlite3_finalize(st);
    hl_changeset_free(cs);
    pair_close(&p);
}
END_TEST

START_TEST(split_capture_with_writes_in_between_converges)
{
    pair p;
    pair_open(&p);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (1, 'first'), (2, 'second')");

    /* collect under a snapshot, without the write lock ... */
    hl_capture_batch batch;
    ck_assert_int_eq(hl_db_exec(p.a, "BEGIN"), HL_OK);
    ck_assert_int_eq(hl_capture_collect(p.a, &batch), HL_OK);
    ck_assert_int_eq(hl_db_exec(p.a, "ROLLBACK"), HL_OK);
    ck_assert_uint_eq(batch.rows, 2);
    /* ... the application keeps writing, also to a row just collected ... */
    app_exec(p.appa,
             "UPDATE books SET title = 'first, changed' WHERE id = 1; INSERT INTO books(id, title) VALUES (3, 't')");
    /* ... then record what was read */
    ck_assert_int_eq(hl_db_begin(p.a), HL_OK);
    ck_assert_int_eq(hl_capture_record(p.a, &batch), HL_OK);
    ck_assert_int_eq(hl_db_commit(p.a), HL_OK);
    hl_capture_batch_free(&batch);
    /* the later writes were not consumed: the next capture has them, with later versions */
    ck_assert_uint_eq(capture(p.a), 2);

    hl_changeset *c1 = take(p.a, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, c1, &p.raw, p.flags), HL_APPLIED);
    hl_changeset *c2 = take(p.a, &p.raw, &p.flags);
    ck_assert_uint_eq(c2->seq, c1->seq + 1);
    ck_assert_int_eq(apply(p.b, c2, &p.raw, p.flags), HL_APPLIED);
    char *da = dump(p.pa), *db = dump(p.pb);
    ck_assert_str_eq(da, db);
    ck_assert_ptr_nonnull(strstr(db, "'first, changed'"));
    free(da);
    free(db);
    hl_changeset_free(c1);
    hl_changeset_free(c2);
    pair_close(&p);
}
END_TEST

/* Appends above a rowid table's high-water mark leave no log entry; capture
 * finds them by rowid, and applied rows do not come back as local inserts. */
START_TEST(inserts_above_the_high_water_mark_are_not_logged)
{
    pair p;
    pair_open(&p);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (1, 'one'), (2, 'two'), (3, 'three');"
                     "INSERT INTO plain(x, y) VALUES ('p', 1)");
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM __harmonylite__books_change_log"), 0);
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM __harmonylite__plain_change_log"), 0);
    ck_assert_uint_eq(capture(p.a), 4);
    ck_assert_int_eq(scalar(p.appa, "SELECT hwm FROM __harmonylite__hwm WHERE tbl = 'books'"), 3);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    hl_changeset_free(cs);
    ck_assert_int_eq(scalar(p.appb, "SELECT hwm FROM __harmonylite__hwm WHERE tbl = 'books'"), 3);
    ck_assert_uint_eq(capture(p.b), 0); /* no echo */

    /* At or below the mark, and every update and delete, is logged. */
    app_exec(p.appa,
             "DELETE FROM books WHERE id = 2; INSERT INTO books(id, title) VALUES (2, 'two again');"
             "UPDATE books SET title = 'three, changed' WHERE id = 3; INSERT INTO books(id, title) VALUES (9, 'n')");
    ck_assert_int_eq(scalar(p.appa, "SELECT count(DISTINCT k0) FROM __harmonylite__books_change_log"), 2);
    ck_assert_uint_eq(capture(p.a), 3);
    cs = take(p.a, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    hl_changeset_free(cs);
    assert_same_dump(p.pa, p.pb);
    pair_close(&p);
}
END_TEST

/* An explicit id filling a gap below what a snapshot read, committed between
 * the read and the recording, had no log entry: it must still be captured. */
START_TEST(gap_filled_between_read_and_record_is_captured)
{
    pair p;
    pair_open(&p);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (10, 'ten'), (20, 'twenty')");
    hl_capture_batch batch;
    ck_assert_int_eq(hl_db_exec(p.a, "BEGIN"), HL_OK);
    ck_assert_int_eq(hl_capture_collect(p.a, &batch), HL_OK);
    ck_assert_int_eq(hl_db_exec(p.a, "ROLLBACK"), HL_OK);
    ck_assert_uint_eq(batch.rows, 2);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (15, 'fifteen'), (30, 'thirty')");
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM __harmonylite__books_change_log"), 0);
    ck_assert_int_eq(hl_db_begin(p.a), HL_OK);
    ck_assert_int_eq(hl_capture_record(p.a, &batch), HL_OK);
    ck_assert_int_eq(hl_db_commit(p.a), HL_OK);
    hl_capture_batch_free(&batch);
    ck_assert_int_eq(scalar(p.appa, "SELECT k0 FROM __harmonylite__books_change_log"), 15);
    ck_assert_uint_eq(capture(p.a), 2); /* 15 from the log, 30 above the mark */
    for (int i = 0; i < 2; i++) {
        hl_changeset *cs = take(p.a, &p.raw, &p.flags);
        ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
        hl_changeset_free(cs);
    }
    char *da = dump(p.pa), *db = dump(p.pb);
    ck_assert_str_eq(da, db);
    ck_assert_ptr_nonnull(strstr(db, "'fifteen'"));
    free(da);
    free(db);
    pair_close(&p);
}
END_TEST

/* Sends every changeset in src's outbox to dst, in order. */
static void deliver_all(pair *p, hl_db *src, hl_db *dst)
{
    while (outbox_has(src)) {
        hl_changeset *cs = take(src, &p->raw, &p->flags);
        ck_assert_int_eq(apply(dst, cs, &p->raw, p->flags), HL_APPLIED);
        hl_changeset_free(cs);
    }
}

/* Waits (generously) until path's -wal file is at most limit bytes; its size then. */
static long wal_settles_under(const char *path, long limit)
{
    char wal[320];
    snprintf(wal, sizeof wal, "%s-wal", path);
    long sz = file_size(wal);
    for (int i = 0; i < 1500 && sz > limit; i++) {
        usleep(10000);
        sz = file_size(wal);
    }
    return sz;
}

START_TEST(wal_returns_under_its_bound_after_scattered_updates)
{
    /* 1,000-row UPDATE batches at random keys while an application reader
     * keeps a snapshot open for a while, on the sender and on the receiver:
     * PASSIVE checkpoints alone leave both -wal files at their peak size for
     * ever. Once the burst is over and the readers are gone, each must come
     * back under wal_size_limit. */
    const long limit = 1 << 20;
    pair p;
    pair_open(&p);
    hl_db_options o = *hl_db_get_options(p.a);
    o.wal_size_limit = (size_t)limit;
    hl_db_configure(p.a, &o);
    o = *hl_db_get_options(p.b);
    o.wal_size_limit = (size_t)limit;
    hl_db_configure(p.b, &o);
    app_exec(p.appa, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 50000)"
                     " INSERT INTO books(id, title, year) SELECT i, 'title ' || i, 1900 FROM n;");
    ck_assert_uint_eq(capture(p.a), 50000);
    while (outbox_has(p.a)) { /* a chain: members wait for the last */
        hl_changeset *cs = take(p.a, &p.raw, &p.flags);
        ck_assert_int_ne(apply(p.b, cs, &p.raw, p.flags), HL_MALFORMED);
        hl_changeset_free(cs);
    }
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books"), 50000);
    sqlite3 *ra = app_open(p.pa), *rb = app_open(p.pb);
    long peak_a = 0, peak_b = 0;
    char wa[320], wb[320];
    snprintf(wa, sizeof wa, "%s-wal", p.pa);
    snprintf(wb, sizeof wb, "%s-wal", p.pb);
    for (int txn = 0; txn < 30; txn++) {
        if (txn == 5) { /* readers pin both WALs for ten transactions */
            app_exec(ra, "BEGIN; SELECT count(*) FROM books;");
            app_exec(rb, "BEGIN; SELECT count(*) FROM books;");
        }
        if (txn == 15) {
            app_exec(ra, "COMMIT");
            app_exec(rb, "COMMIT");
        }
        app_exec(p.appa, "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)"
                         " UPDATE books SET year = year + 1 WHERE id IN (SELECT 1 + abs(random()) % 50000 FROM n)");
        capture(p.a);
        deliver_all(&p, p.a, p.b);
        long sa = file_size(wa), sb = file_size(wb);
        peak_a = sa > peak_a ? sa : peak_a;
        peak_b = sb > peak_b ? sb : peak_b;
    }
    ck_assert_int_gt(peak_a, limit); /* the burst did push both past the bound */
    ck_assert_int_gt(peak_b, limit);
    long ea = wal_settles_under(p.pa, limit), eb = wal_settles_under(p.pb, limit);
    ck_assert_msg(ea <= limit, "sender's WAL stays at %ld bytes (bound %ld, peak %ld)", ea, limit, peak_a);
    ck_assert_msg(eb <= limit, "receiver's WAL stays at %ld bytes (bound %ld, peak %ld)", eb, limit, peak_b);
    sqlite3_close(ra);
    sqlite3_close(rb);
    pair_close(&p);
}
END_TEST

static char *plain_rows(sqlite3 *db)
{
    return text_of(db, "SELECT group_concat(x || '=' || y, ',') FROM (SELECT x, y FROM plain ORDER BY x)");
}

/* Six rows in the rowid-keyed table "plain" on both nodes, then deletes that leave gaps. */
static void plain_with_gaps(pair *p)
{
    app_exec(p->appa,
             "INSERT INTO plain(x, y) VALUES ('r1', 1), ('r2', 2), ('r3', 3), ('r4', 4), ('r5', 5), ('r6', 6)");
    capture(p->a);
    deliver_all(p, p->a, p->b);
    app_exec(p->appa, "DELETE FROM plain WHERE x IN ('r2', 'r4')");
    capture(p->a);
    deliver_all(p, p->a, p->b);
    assert_same_dump(p->pa, p->pb);
}

/* VACUUM renumbers the rows of a table without a primary key and fires no
 * trigger: updates and deletes after it must still reach the same rows on
 * every node. */
START_TEST(vacuum_renumbering_rowids_converges)
{
    pair p;
    pair_open(&p);
    plain_with_gaps(&p);
    app_exec(p.appa, "VACUUM");
    ck_assert_int_eq(scalar(p.appa, "SELECT max(rowid) FROM plain"), 4); /* renumbered: 1, 3, 5, 6 -> 1..4 */
    app_exec(p.appa, "UPDATE plain SET y = 50 WHERE x = 'r5'; DELETE FROM plain WHERE x = 'r6'");
    capture(p.a);
    ck_assert_uint_eq(hl_db_counters(p.a)->table_resyncs, 1);
    deliver_all(&p, p.a, p.b);
    /* the other node writes after it, by its own rowids */
    app_exec(p.appb, "UPDATE plain SET y = 30 WHERE x = 'r3'; DELETE FROM plain WHERE x = 'r1';"
                     "INSERT INTO plain(x, y) VALUES ('r7', 7)");
    capture(p.b);
    deliver_all(&p, p.b, p.a);
    assert_same_dump(p.pa, p.pb);
    char *ra = plain_rows(p.appa), *rb = plain_rows(p.appb);
    ck_assert_str_eq(ra, "r3=30,r5=50,r7=7");
    ck_assert_str_eq(rb, ra);
    free(ra);
    free(rb);
    /* nothing moved since: no second resync at the next schema change */
    app_exec(p.appa, "CREATE TABLE unrelated(z)");
    capture(p.a);
    ck_assert_uint_eq(hl_db_counters(p.a)->table_resyncs, 1);
    pair_close(&p);
}
END_TEST

/* Rows that exist when harmonylite first starts are the common starting point
 * and never sent; VACUUM moving them must still reach the other nodes. */
START_TEST(vacuum_moving_rows_of_the_starting_point_converges)
{
    char pa[300], pb[300];
    path_of(pa, sizeof pa, "a.db");
    path_of(pb, sizeof pb, "b.db");
    sqlite3 *appa = app_open(pa), *appb = app_open(pb);
    const char *init =
        "INSERT INTO plain(x, y) VALUES ('r1', 1), ('r2', 2), ('r3', 3), ('r4', 4), ('r5', 5), ('r6', 6)";
    app_exec(appa, schema_sql);
    app_exec(appb, schema_sql);
    app_exec(appa, init);
    app_exec(appb, init);
    pair p = {.a = engine_open(pa, 1), .b = engine_open(pb, 2), .appa = appa, .appb = appb};
    snprintf(p.pa, sizeof p.pa, "%s", pa);
    snprintf(p.pb, sizeof p.pb, "%s", pb);
    hl_buf_init(&p.raw, 256u << 20);
    app_exec(appa, "DELETE FROM plain WHERE x = 'r3'");
    capture(p.a);
    deliver_all(&p, p.a, p.b);
    app_exec(appa, "VACUUM");
    capture(p.a);
    deliver_all(&p, p.a, p.b);
    app_exec(appb, "UPDATE plain SET y = 40 WHERE x = 'r4'");
    capture(p.b);
    deliver_all(&p, p.b, p.a);
    char *ra = plain_rows(appa), *rb = plain_rows(appb);
    ck_assert_str_eq(ra, "r1=1,r2=2,r4=40,r5=5,r6=6");
    ck_assert_str_eq(rb, ra);
    free(ra);
    free(rb);
    assert_same_dump(pa, pb);
    pair_close(&p);
}
END_TEST

/* The usual rebuild of a table (new table, copy, drop, rename) renumbers
 * rowids too, on one node first and later on the other. */
START_TEST(rebuilt_rowid_table_converges)
{
    static const char *rebuild = "BEGIN; CREATE TABLE new_plain(x, y); INSERT INTO new_plain SELECT x, y FROM plain;"
                                 "DROP TABLE plain; ALTER TABLE new_plain RENAME TO plain; COMMIT";
    pair p;
    pair_open(&p);
    plain_with_gaps(&p);
    app_exec(p.appa, rebuild);
    app_exec(p.appa, "UPDATE plain SET y = 60 WHERE x = 'r6'");
    capture(p.a);
    deliver_all(&p, p.a, p.b);
    app_exec(p.appb, "DELETE FROM plain WHERE x = 'r5'");
    capture(p.b);
    deliver_all(&p, p.b, p.a);
    char *ra = plain_rows(p.appa), *rb = plain_rows(p.appb);
    ck_assert_str_eq(ra, "r1=1,r3=3,r6=60");
    ck_assert_str_eq(rb, ra);
    free(ra);
    free(rb);
    /* the migration reaches the other node: its rows are numbered alike by now */
    app_exec(p.appb, rebuild);
    app_exec(p.appb, "UPDATE plain SET y = 10 WHERE x = 'r1'");
    capture(p.b);
    deliver_all(&p, p.b, p.a);
    capture(p.a);
    deliver_all(&p, p.a, p.b);
    char *da = dump(p.pa), *db = dump(p.pb);
    ck_assert_str_eq(da, db);
    ck_assert_ptr_nonnull(strstr(da, "'r1'|10|"));
    free(da);
    free(db);
    pair_close(&p);
}
END_TEST

/* A rebuild drops our triggers with the old table; the new ones come with the
 * engine's next step. Rows inserted or deleted in between, in the starting
 * content as in replicated rows, are found then and sent; the starting
 * content itself is not. */
START_TEST(writes_while_a_rebuild_dropped_the_triggers_are_captured)
{
    static const char *init = "INSERT INTO books(id, title) VALUES (1, 's1'), (2, 's2'), (3, 's3'), (4, 's4');"
                              "INSERT INTO pairs VALUES (1, 'a', 1), (2, 'b', 2)";
    static const char *rebuild =
        "BEGIN; CREATE TABLE books2(id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL, year INTEGER);"
        "INSERT INTO books2 SELECT * FROM books; DROP TABLE books; ALTER TABLE books2 RENAME TO books;"
        "CREATE TABLE pairs2(a INTEGER, b TEXT, v, PRIMARY KEY(a, b)) WITHOUT ROWID;"
        "INSERT INTO pairs2 SELECT * FROM pairs; DROP TABLE pairs; ALTER TABLE pairs2 RENAME TO pairs; COMMIT";
    pair p = {0};
    path_of(p.pa, sizeof p.pa, "a.db");
    path_of(p.pb, sizeof p.pb, "b.db");
    p.appa = app_open(p.pa);
    p.appb = app_open(p.pb);
    app_exec(p.appa, schema_sql);
    app_exec(p.appb, schema_sql);
    app_exec(p.appa, init);
    app_exec(p.appb, init);
    p.a = engine_open(p.pa, 1);
    p.b = engine_open(p.pb, 2);
    hl_buf_init(&p.raw, 256u << 20);
    /* the starting content got versions that lose to any write: one span, a clock row per pair */
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM __harmonylite__books_span WHERE lo = 1 AND hi = 4 AND "
                                    "hlc = 0"),
                     1);
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM __harmonylite__pairs_clock WHERE hlc = 0"), 2);

    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (5, 'r5'), (6, 'r6'), (7, 'r7'), (8, 'r8');"
                     "INSERT INTO pairs VALUES (3, 'c', 3)");
    ck_assert_uint_eq(capture(p.a), 5);
    deliver_all(&p, p.a, p.b);

    app_exec(p.appa, rebuild);
    /* before the engine's next step: nothing logs these */
    app_exec(p.appa, "DELETE FROM books WHERE id IN (2, 6); INSERT INTO books(id, title) VALUES (0, 'below');"
                     "INSERT INTO books(id, title) VALUES (9, 'above');"
                     "DELETE FROM pairs WHERE a IN (1, 3); INSERT INTO pairs VALUES (4, 'd', 4)");
    ck_assert_uint_eq(capture(p.a), 7); /* 9 through the high-water mark; the rest found */
    ck_assert_uint_eq(hl_db_counters(p.a)->missed_rows, 6);
    deliver_all(&p, p.a, p.b);
    char *da = dump(p.pa), *db = dump(p.pb);
    ck_assert_str_eq(da, db);
    ck_assert_ptr_null(strstr(da, "'s2'"));
    ck_assert_ptr_nonnull(strstr(da, "'below'"));
    free(da);
    free(db);

    /* triggers in place again: nothing more is found at the next schema change */
    app_exec(p.appa, "CREATE TABLE unrelated(z)");
    ck_assert_uint_eq(capture(p.a), 0);
    ck_assert_uint_eq(hl_db_counters(p.a)->missed_rows, 6);
    pair_close(&p);
}
END_TEST

/* OR REPLACE deletes the rows holding the new row's UNIQUE values without
 * firing a DELETE trigger (recursive_triggers is off by default). Those
 * deletes must reach the other nodes even when the row that replaced them
 * is gone again before the capture; INSERT OR IGNORE sends nothing. */
START_TEST(rows_deleted_by_or_replace_are_captured)
{
    pair p;
    pair_open(&p);
    const char *ddl = "CREATE TABLE acct(id TEXT PRIMARY KEY, email TEXT COLLATE NOCASE, org INTEGER, n INTEGER,"
                      " UNIQUE(org, n)); CREATE UNIQUE INDEX acct_email ON acct(email)";
    app_exec(p.appa, ddl);
    app_exec(p.appb, ddl);
    app_exec(p.appa, "INSERT INTO uniq VALUES (1, 'x@y'), (4, 'p'), (5, 'q');"
                     "INSERT INTO acct VALUES ('a', 'A@b', 1, 1), ('b', 'c@d', 1, 2)");
    ck_assert_uint_eq(capture(p.a), 5);
    deliver_all(&p, p.a, p.b);

    app_exec(p.appa, "INSERT OR IGNORE INTO uniq VALUES (3, 'x@y'); INSERT INTO acct VALUES ('z', 'A@B', 9, 9) "
                     "ON CONFLICT DO NOTHING");
    ck_assert_uint_eq(capture(p.a), 0); /* nothing was deleted, nothing written */
    app_exec(p.appa, "INSERT OR REPLACE INTO uniq VALUES (2, 'x@y'); DELETE FROM uniq WHERE id = 2;"
                     "UPDATE OR REPLACE uniq SET email = 'p' WHERE id = 5; DELETE FROM uniq WHERE id = 5;"
                     "REPLACE INTO acct VALUES ('e', 'a@B', 7, 7); DELETE FROM acct WHERE id = 'e';"
                     "UPDATE OR REPLACE acct SET n = 2 WHERE id = 'e'; REPLACE INTO acct VALUES ('f', 'f@g', 1, 2);"
                     "DELETE FROM acct WHERE id = 'f'");
    capture(p.a);
    deliver_all(&p, p.a, p.b);
    ck_assert_int_eq(scalar(p.appa, "SELECT count(*) FROM uniq"), 0);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM uniq"), 0); /* before: rows 1 and 4 stayed */
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM acct"), 0); /* 'a' by email (NOCASE), 'b' by (org, n) */
    assert_same_dump(p.pa, p.pb);
    /* the engine's own writes fire none of it */
    app_exec(p.appb, "INSERT INTO uniq VALUES (7, 'u')");
    capture(p.b);
    deliver_all(&p, p.b, p.a);
    ck_assert_uint_eq(capture(p.a), 0);
    pair_close(&p);
}
END_TEST

/* Counts the statement journals SQLite opens; with SQLITE_CONFIG_STMTJRNL_SPILL
 * 0 every one is a file, opened through the VFS. */
static sqlite3_vfs subj_vfs, *subj_real;
static int subj_opens;

static int subj_open(sqlite3_vfs *v, sqlite3_filename name, sqlite3_file *f, int flags, int *out)
{
    (void)v;
    if (flags & SQLITE_OPEN_SUBJOURNAL)
        subj_opens++;
    return subj_real->xOpen(subj_real, name, f, flags, out);
}

/* A statement in a transaction keeps a statement journal (a copy of every
 * page it changes, to undo it alone) when it may abort and writes more than
 * one thing, which any trigger that writes makes it do. A trigger may abort
 * when it checks a NOT NULL or calls a function (julianday('now')): then
 * every application INSERT into a replicated table paid for one, even an
 * append the trigger does not log. The INSERT triggers do neither. (An
 * INSERT that may abort by itself, a text key's uniqueness for one, keeps
 * its journal whatever the trigger does.) */
START_TEST(application_inserts_keep_no_statement_journal)
{
    ck_assert_int_eq(sqlite3_shutdown(), SQLITE_OK);
    ck_assert_int_eq(sqlite3_config(SQLITE_CONFIG_STMTJRNL_SPILL, 0), SQLITE_OK);
    ck_assert_int_eq(sqlite3_initialize(), SQLITE_OK);
    subj_real = sqlite3_vfs_find(NULL);
    subj_vfs = *subj_real;
    subj_vfs.zName = "hl_count_subjournals";
    subj_vfs.xOpen = subj_open;
    ck_assert_int_eq(sqlite3_vfs_register(&subj_vfs, 1), SQLITE_OK);

    char path[300];
    path_of(path, sizeof path, "subj.db");
    sqlite3 *app = app_open(path);
    /* ev: nothing can make an insert fail; evn: a NOT NULL can; kv: the key's uniqueness can. */
    app_exec(app, "CREATE TABLE ev(id INTEGER PRIMARY KEY, at INTEGER, what TEXT);"
                  "CREATE TABLE evn(id INTEGER PRIMARY KEY, at INTEGER NOT NULL);"
                  "CREATE TABLE kv(k TEXT PRIMARY KEY, v)");
    hl_db *d = engine_open(path, 1);
    app_exec(app, "INSERT INTO ev(at, what) VALUES (1, 'a'); INSERT INTO evn(at) VALUES (1);"
                  "INSERT INTO kv VALUES ('a', 1)");
    ck_assert_uint_eq(capture(d), 3);

    /* The control: an UPDATE keeps its journal (and its write time). */
    subj_opens = 0;
    app_exec(app, "BEGIN; UPDATE ev SET at = 2; UPDATE ev SET at = 3; COMMIT");
    ck_assert_int_gt(subj_opens, 0);

    subj_opens = 0;
    app_exec(app, "BEGIN; INSERT INTO ev(at, what) VALUES (4, 'b'); INSERT INTO ev(at, what) VALUES (5, 'c');"
                  "COMMIT");
    ck_assert_int_eq(subj_opens, 0);
    app_exec(app, "BEGIN; INSERT INTO evn(at) VALUES (4); INSERT INTO evn(at) VALUES (5); COMMIT");
    ck_assert_int_gt(subj_opens, 0); /* SQLite's doing: the NOT NULL */

    /* Logged inserts (under the high-water mark) are captured once each: into
     * ev with the version of the capture, as appends are; where the journal
     * is kept anyway, with the time of the write. */
    app_exec(app, "DELETE FROM ev WHERE id = 1; DELETE FROM evn WHERE id = 1");
    ck_assert_uint_eq(capture(d), 6);
    uint64_t before = hl_now_ms();
    app_exec(app, "BEGIN; INSERT INTO evn(id, at) VALUES (1, 6); INSERT INTO kv VALUES ('d', 4); COMMIT");
    uint64_t after = hl_now_ms();
    usleep(30000);
    ck_assert_uint_eq(capture(d), 2);
    sqlite3 *eng = hl_db_handle(d);
    int64_t v = scalar(eng, "SELECT hlc >> 16 FROM \"" HL_PREFIX "evn_clock\" WHERE k0 = 1");
    ck_assert_int_ge(v, (int64_t)before - 1);
    ck_assert_int_le(v, (int64_t)after + 1);
    v = scalar(eng, "SELECT hlc >> 16 FROM \"" HL_PREFIX "kv_clock\" WHERE k0 = 'd'");
    ck_assert_int_ge(v, (int64_t)before - 1);
    ck_assert_int_le(v, (int64_t)after + 1);
    app_exec(app, "INSERT INTO ev(id, at, what) VALUES (1, 6, 'd')");
    usleep(30000);
    uint64_t captured = hl_now_ms();
    ck_assert_uint_eq(capture(d), 1);
    ck_assert_int_ge(scalar(eng, "SELECT hlc >> 16 FROM \"" HL_PREFIX "ev_clock\" WHERE k0 = 1"), (int64_t)captured);
    hl_db_close(d);
    sqlite3_close(app);
}
END_TEST

/* The documented limit and its remedy (docs/architecture.md, known
 * limitations): a streamed BLOB write fires no trigger; an UPDATE of the row
 * after it is captured with the row as it is then. */
START_TEST(streamed_blob_write_needs_an_update_to_be_seen)
{
    pair p;
    pair_open(&p);
    app_exec(p.appa, "INSERT INTO \"my table\" VALUES ('k', zeroblob(4), 1.5)");
    ck_assert_uint_eq(capture(p.a), 1);
    deliver_all(&p, p.a, p.b);
    sqlite3_blob *bl = NULL;
    ck_assert_int_eq(sqlite3_blob_open(p.appa, "main", "my table", "a\"b", 1, 1, &bl), SQLITE_OK);
    ck_assert_int_eq(sqlite3_blob_write(bl, "abcd", 4, 0), SQLITE_OK);
    ck_assert_int_eq(sqlite3_blob_close(bl), SQLITE_OK);
    ck_assert_uint_eq(capture(p.a), 0); /* not seen */
    app_exec(p.appa, "UPDATE \"my table\" SET \"a\"\"b\" = \"a\"\"b\" WHERE \"select\" = 'k'");
    ck_assert_uint_eq(capture(p.a), 1);
    deliver_all(&p, p.a, p.b);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM \"my table\" WHERE \"a\"\"b\" = CAST('abcd' AS BLOB)"), 1);
    pair_close(&p);
}
END_TEST

/* Rewrites the row versions of cs (from raw) and re-encodes it into raw. */
static void set_versions(hl_changeset *cs, uint64_t hlc, hl_buf *raw, uint8_t *flags)
{
    for (size_t i = 0; i < cs->nrows; i++)
        cs->rows[i].hlc = hlc;
    cs->hlc = hlc;
    hl_buf_reset(raw);
    *flags = 0;
    ck_assert_int_eq(hl_changeset_encode(cs, false, raw), HL_OK);
}

/* Issue item 2: one row with hlc = 2^63 - 1 must not poison the receiver's clock. */
START_TEST(far_future_version_is_held_not_observed)
{
    pair p;
    pair_open(&p);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (1, 'forged')");
    capture(p.a);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    set_versions(cs, (uint64_t)INT64_MAX, &p.raw, &p.flags);
    uint64_t before = hl_db_last_hlc(p.b);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_HELD);
    ck_assert_uint_eq(hl_db_counters(p.b)->clock_ahead, 1);
    ck_assert_uint_eq(hl_db_last_hlc(p.b), before);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books"), 0);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM __harmonylite__pending"), 1);
    /* b's own writes keep versions from its wall clock and still win over a's older ones. */
    app_exec(p.appb, "INSERT INTO books(id, title) VALUES (2, 'local')");
    capture(p.b);
    int64_t v = version_of(p.appb, "books", 2, NULL);
    ck_assert_int_gt(v, 0);
    ck_assert(!hl_hlc_ahead((uint64_t)v, hl_now_ms(), 60000));
    /* Retrying does not apply it either. */
    retry_held(p.b);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books"), 1);
    ck_assert_uint_eq(hl_db_last_hlc(p.b), (uint64_t)v);
    hl_changeset_free(cs);
    pair_close(&p);
}
END_TEST

/* A version a little ahead (an honest node with a fast clock) waits and is then applied: nothing lost. */
START_TEST(version_ahead_is_applied_when_the_clock_catches_up)
{
    pair p;
    pair_open(&p);
    set_max_clock_drift_ms(p.b, 100);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (1, 'fast clock')");
    capture(p.a);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    set_versions(cs, (hl_now_ms() + 600) << 16, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_HELD);
    ck_assert_uint_gt(hl_db_ahead_due_ms(p.b), 0);
    /* a's next changeset waits behind it, in order. */
    app_exec(p.appa, "UPDATE books SET title = 'fast clock 2' WHERE id = 1");
    capture(p.a);
    hl_buf raw2;
    uint8_t f2;
    hl_buf_init(&raw2, 256u << 20);
    hl_changeset *cs2 = take(p.a, &raw2, &f2);
    set_versions(cs2, (hl_now_ms() + 700) << 16, &raw2, &f2);
    ck_assert_int_eq(apply(p.b, cs2, &raw2, f2), HL_HELD);
    for (int i = 0; i < 200 && scalar(p.appb, "SELECT count(*) FROM __harmonylite__pending") > 0; i++) {
        usleep(50000);
        if (hl_now_ms() < hl_db_ahead_due_ms(p.b))
            continue;
        retry_held(p.b);
    }
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM __harmonylite__pending"), 0);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books WHERE title = 'fast clock 2'"), 1);
    hl_changeset_free(cs);
    hl_changeset_free(cs2);
    hl_buf_free(&raw2);
    pair_close(&p);
}
END_TEST

/* Issue item 6: rows with different keys clashing on a UNIQUE column converge in either arrival order. */
START_TEST(unique_clash_newer_row_wins_everywhere)
{
    pair p;
    pair_open(&p);
    app_exec(p.appa, "CREATE TABLE origins(id TEXT PRIMARY KEY, user TEXT, provider TEXT, UNIQUE(user, provider));");
    app_exec(p.appb, "CREATE TABLE origins(id TEXT PRIMARY KEY, user TEXT, provider TEXT, UNIQUE(user, provider));");
    app_exec(p.appa, "INSERT INTO uniq VALUES (1, 'x@y'); INSERT INTO origins VALUES ('a1', 'u', 'google')");
    capture(p.a);
    usleep(5000);
    app_exec(p.appb, "INSERT INTO uniq VALUES (2, 'x@y'); INSERT INTO origins VALUES ('b1', 'u', 'google')");
    capture(p.b);
    hl_buf rawa;
    uint8_t fa;
    hl_buf_init(&rawa, 256u << 20);
    hl_changeset *ca = take(p.a, &rawa, &fa);
    hl_changeset *cb = take(p.b, &p.raw, &p.flags);
    /* b's rows are newer: on a they replace a's, on b a's lose. */
    ck_assert_int_eq(apply(p.a, cb, &p.raw, p.flags), HL_APPLIED);
    ck_assert_int_eq(apply(p.b, ca, &rawa, fa), HL_APPLIED);
    assert_same_dump(p.pa, p.pb);
    for (int i = 0; i < 2; i++) {
        sqlite3 *app = i ? p.appb : p.appa;
        ck_assert_int_eq(scalar(app, "SELECT count(*) FROM uniq WHERE id = 2"), 1);
        ck_assert_int_eq(scalar(app, "SELECT count(*) FROM uniq"), 1);
        ck_assert_int_eq(scalar(app, "SELECT count(*) FROM origins WHERE id = 'b1'"), 1);
        ck_assert_int_eq(scalar(app, "SELECT count(*) FROM origins"), 1);
        ck_assert_int_eq(scalar(app, "SELECT count(*) FROM __harmonylite__conflicts WHERE origin = 1"), 2);
        /* The losers are kept whole: the removed local row (on a) and the refused remote one (on b). */
        sqlite3_stmt *st;
        ck_assert_int_eq(sqlite3_prepare_v2(app,
                                            "SELECT row FROM __harmonylite__conflicts WHERE origin = 1 AND "
                                            "tbl = 'origins'",
                                            -1, &st, NULL),
                         SQLITE_OK);
        ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
        hl_changeset *lost = NULL;
        char err[256];
        ck_assert_int_eq(hl_changeset_decode(sqlite3_column_blob(st, 0), (size_t)sqlite3_column_bytes(st, 0), false,
                                             1u << 20, &lost, err, sizeof err),
                         HL_OK);
        sqlite3_finalize(st);
        ck_assert_uint_eq(lost->nrows, 1);
        ck_assert_str_eq(lost->tables[0].name, "origins");
        ck_assert_uint_eq(lost->tables[0].ncols, 3);
        ck_assert_int_eq(lost->rows[0].op, HL_OP_UPSERT);
        ck_assert_int_eq(lost->rows[0].vals[0].type, HL_VAL_TEXT);
        ck_assert_str_eq((const char *)lost->rows[0].vals[0].u.b.p, "a1");
        ck_assert_str_eq((const char *)lost->rows[0].vals[2].u.b.p, "google");
        hl_changeset_free(lost);
    }
    /* The removal on a was not captured as a local delete. */
    ck_assert_uint_eq(capture(p.a), 0);
    /* An update of the winner still replicates; the loser stays removed. */
    app_exec(p.appb, "UPDATE uniq SET email = 'new@y' WHERE id = 2");
    capture(p.b);
    hl_changeset *cu = take(p.b, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.a, cu, &p.raw, p.flags), HL_APPLIED);
    assert_same_dump(p.pa, p.pb);
    hl_changeset_free(ca);
    hl_changeset_free(cb);
    hl_changeset_free(cu);
    hl_buf_free(&rawa);
    pair_close(&p);
}
END_TEST

/* Takes every outbox changeset of src: their decoded forms, raw payloads and flags, in order. */
typedef struct taken {
    hl_changeset *cs[64];
    hl_buf raw[64];
    uint8_t flags[64];
    size_t n;
} taken;

static void take_all(hl_db *src, taken *t)
{
    t->n = 0;
    while (outbox_has(src)) {
        ck_assert_uint_lt(t->n, 64);
        hl_buf_init(&t->raw[t->n], 256u << 20);
        t->cs[t->n] = take(src, &t->raw[t->n], &t->flags[t->n]);
        t->n++;
    }
}

static void taken_free(taken *t)
{
    for (size_t i = 0; i < t->n; i++) {
        hl_changeset_free(t->cs[i]);
        hl_buf_free(&t->raw[i]);
    }
    t->n = 0;
}

/* Issue item 3: a transaction bigger than a changeset travels as a chain of
 * changesets, and a receiver applies it as one, in any arrival order, never
 * showing part of it. */
START_TEST(big_transaction_travels_as_a_chain_applied_as_one)
{
    static const int orders[][3] = {{0, 1, 2}, {2, 1, 0}, {1, 2, 0}};
    for (size_t o = 0; o < sizeof orders / sizeof orders[0]; o++) {
        pair p;
        pair_open(&p);
        set_chain_bytes(p.a, 2000); /* about 40 rows a changeset */
        app_exec(p.appa, "BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300) "
                         "INSERT INTO books(id, title, year) SELECT i, 'title ' || i, 1900 + i FROM n; "
                         "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100) "
                         "INSERT INTO pairs(a, b, v) SELECT i, 'k' || i, randomblob(8) FROM n; COMMIT");
        ck_assert_uint_eq(capture(p.a), 400);
        taken t;
        take_all(p.a, &t);
        ck_assert_uint_gt(t.n, 3);
        for (size_t i = 0; i < t.n; i++) {
            ck_assert_uint_eq(t.cs[i]->seq, t.cs[0]->seq + i);
            ck_assert_int_eq((t.flags[i] & HL_PART_FLAG_MORE) != 0, i + 1 < t.n); /* all but the last */
        }
        /* Deliver the first, middle and last thirds in the given order; nothing shows until all are in. */
        size_t cut[4] = {0, t.n / 3, 2 * t.n / 3, t.n};
        for (size_t k = 0; k < 3; k++) {
            int part = orders[o][k];
            for (size_t i = cut[part]; i < cut[part + 1]; i++) {
                /* Held, until the one that completes the chain: applied, with all the others. */
                hl_apply_result r = apply(p.b, t.cs[i], &t.raw[i], t.flags[i]);
                bool completes = k == 2 && i + 1 == cut[part + 1];
                ck_assert_int_eq(r, completes ? HL_APPLIED : HL_HELD);
            }
            if (k < 2)
                ck_assert_int_eq(
                    scalar(p.appb, "SELECT count(*) FROM books") + scalar(p.appb, "SELECT count(*) FROM pairs"), 0);
        }
        ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books"), 300);
        ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM pairs"), 100);
        ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM __harmonylite__pending"), 0);
        ck_assert_uint_eq(hl_db_counters(p.b)->chains_applied, 1);
        assert_same_dump(p.pa, p.pb);
        /* A replay of the chain is a duplicate; the next changeset applies at once. */
        ck_assert_int_eq(apply(p.b, t.cs[0], &t.raw[0], t.flags[0]), HL_DUPLICATE);
        taken_free(&t);
        app_exec(p.appa, "UPDATE books SET title = 'after' WHERE id = 7");
        capture(p.a);
        hl_changeset *c = take(p.a, &p.raw, &p.flags);
        ck_assert_int_eq(p.flags & HL_PART_FLAG_MORE, 0);
        ck_assert_int_eq(apply(p.b, c, &p.raw, p.flags), HL_APPLIED);
        hl_changeset_free(c);
        ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books WHERE title = 'after'"), 1);
        pair_close(&p);
        teardown(); /* a fresh pair of databases for the next order */
        setup();
    }
}
END_TEST

/* schema.max_held_bytes: behind a schema hold, changesets past the bound are
 * deferred (not stored), the position stops before the first of them, and
 * reading them again once the schema fits loses nothing. */
START_TEST(held_bytes_are_bounded_and_deferred_ones_are_read_again)
{
    pair p;
    pair_open(&p);
    hl_db_options o = *hl_db_get_options(p.b);
    o.max_held_bytes = 1u << 20;
    hl_db_configure(p.b, &o);
    app_exec(p.appa, "ALTER TABLE books ADD COLUMN cover BLOB");
    enum { N = 8 };
    hl_changeset *cs[N];
    hl_buf raw[N];
    uint8_t flags[N];
    for (int i = 0; i < N; i++) {
        char sql[200];
        snprintf(sql, sizeof sql, "INSERT INTO books(id, title, cover) VALUES (%d, 'c', randomblob(200000))", 100 + i);
        app_exec(p.appa, sql);
        ck_assert_uint_eq(capture(p.a), 1);
        hl_buf_init(&raw[i], 64u << 20);
        cs[i] = take(p.a, &raw[i], &flags[i]);
    }
    char s0[] = "s0";
    char *names[] = {s0};
    uint64_t applied[1] = {0}, seen[1] = {0}, cap[1] = {0};
    hl_positions pos = {.n = 1, .streams = names, .applied = applied, .seen = seen, .cap = cap};
    hl_inbound it[N];
    memset(it, 0, sizeof it);
    for (int i = 0; i < N; i++) {
        it[i] = (hl_inbound){.next = i + 1 < N ? &it[i + 1] : NULL,
                             .shard = 0,
                             .safe_seq = (uint64_t)(10 + i),
                             .cs = cs[i],
                             .raw = raw[i].data,
                             .rawlen = raw[i].len,
                             .flags = flags[i]};
    }
    hl_step s = {0};
    ck_assert_int_eq(hl_db_step(p.b, &it[0], &pos, &s), HL_OK);
    ck_assert(s.committed);
    uint64_t deferred = hl_db_counters(p.b)->changesets_deferred, bounded = 0;
    ck_assert_uint_gt(deferred, 0);
    ck_assert_uint_lt(deferred, N);
    int first = N - (int)deferred; /* the held ones come first, then every later one is deferred */
    ck_assert_uint_eq(cap[0], 10 + (uint64_t)first);
    ck_assert_uint_eq(seen[0], 9 + (uint64_t)first);
    ck_assert_uint_eq(applied[0], 9 + (uint64_t)first);
    ck_assert_int_eq(hl_db_held_bytes(p.b, &bounded), HL_OK);
    ck_assert_uint_le(bounded, 1u << 20);
    ck_assert_uint_gt(bounded, 0);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM __harmonylite__pending"), first);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books WHERE id >= 100"), 0);

    /* The schema fits: what was held applies; the rest, read again from the cap, too. */
    app_exec(p.appb, "ALTER TABLE books ADD COLUMN cover BLOB");
    retry_held(p.b);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM __harmonylite__pending"), 0);
    ck_assert_int_eq(hl_db_held_bytes(p.b, &bounded), HL_OK);
    ck_assert_uint_eq(bounded, 0);
    cap[0] = 0;
    s = (hl_step){0};
    ck_assert_int_eq(hl_db_step(p.b, &it[first], &pos, &s), HL_OK);
    ck_assert_uint_eq(hl_db_counters(p.b)->changesets_deferred, deferred);
    ck_assert_uint_eq(cap[0], 0);
    ck_assert_uint_eq(applied[0], 10 + N - 1);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books WHERE id >= 100 AND length(cover) = 200000"), N);
    for (int i = 0; i < N; i++) {
        hl_changeset_free(cs[i]);
        hl_buf_free(&raw[i]);
    }
    pair_close(&p);
}
END_TEST

/* A chain one of whose changesets needs a column this node lacks is held as a
 * whole, then applied as a whole once the schema matches. */
START_TEST(chain_waits_for_the_schema_as_a_whole)
{
    pair p;
    pair_open(&p);
    set_chain_bytes(p.a, 1500);
    app_exec(p.appa, "ALTER TABLE plain ADD COLUMN z");
    app_exec(p.appa, "BEGIN; WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200) "
                     "INSERT INTO books(id, title) SELECT i, 'b' || i FROM n; "
                     "INSERT INTO plain(x, y, z) VALUES ('late', 1, 'needs z'); COMMIT");
    ck_assert_uint_eq(capture(p.a), 201);
    taken t;
    take_all(p.a, &t);
    ck_assert_uint_gt(t.n, 2);
    for (size_t i = 0; i < t.n; i++)
        ck_assert_int_eq(apply(p.b, t.cs[i], &t.raw[i], t.flags[i]), HL_HELD);
    /* The books members were fine, but nothing of the transaction is applied. */
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books"), 0);
    uint64_t held, for_schema, oldest;
    ck_assert_int_eq(hl_db_held_count(p.b, &held, &for_schema, &oldest), HL_OK);
    ck_assert_uint_eq(held, t.n);
    ck_assert_uint_eq(for_schema, 1);
    app_exec(p.appb, "ALTER TABLE plain ADD COLUMN z");
    retry_held(p.b);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books"), 200);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM plain WHERE z = 'needs z'"), 1);
    ck_assert_uint_eq(hl_db_counters(p.b)->chains_applied, 1);
    taken_free(&t);
    pair_close(&p);
}
END_TEST

/* A single row bigger than max_changeset_bytes cannot travel: capture fails
 * loudly (the engine reports it) instead of publishing what receivers refuse. */
START_TEST(row_larger_than_any_changeset_fails_capture_loudly)
{
    pair p;
    pair_open(&p);
    set_max_changeset_bytes(p.a, 4096);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (1, 'small'), (2, printf('%.8000c', 'x'))");
    hl_step step = {.capture = true};
    ck_assert_int_eq(hl_db_step(p.a, NULL, NULL, &step), HL_ERR_TOO_LARGE);
    ck_assert_ptr_nonnull(strstr(hl_db_last_error(p.a), "max_changeset_bytes"));
    /* Nothing was consumed: with the limit raised, everything is captured. */
    set_max_changeset_bytes(p.a, 1u << 20);
    ck_assert_uint_eq(capture(p.a), 2);
    pair_close(&p);
}
END_TEST

START_TEST(hlc_rules)
{
    uint64_t last = 0;
    uint64_t a = hl_hlc_next(&last, 1000);
    ck_assert_uint_eq(a, 1000u << 16);
    uint64_t b = hl_hlc_next(&last, 1000);
    ck_assert_uint_eq(b, a + 1);
    uint64_t c = hl_hlc_next(&last, 900); /* clock went back: still after */
    ck_assert(c > b);
    hl_hlc_observe(&last, 5000u << 16);
    uint64_t d = hl_hlc_next(&last, 1001); /* a write after seeing a remote version orders after it */
    ck_assert(d > (5000u << 16));
    ck_assert_int_lt(hl_version_cmp(5, 1, 5, 2), 0);
    ck_assert_int_gt(hl_version_cmp(6, 1, 5, 2), 0);
    ck_assert_int_eq(hl_version_cmp(5, 2, 5, 2), 0);
    /* Versions never exceed 2^63 - 1 (an SQLite INTEGER) and never wrap. */
    last = HL_HLC_MAX;
    ck_assert_uint_eq(hl_hlc_next(&last, 1000), HL_HLC_MAX);
    last = 0;
    ck_assert_uint_le(hl_hlc_next(&last, UINT64_MAX), HL_HLC_MAX);
    last = 0;
    hl_hlc_observe(&last, UINT64_MAX);
    ck_assert_uint_eq(last, HL_HLC_MAX);
    ck_assert(hl_hlc_ahead(UINT64_MAX, 1000, 60000));
    ck_assert(hl_hlc_ahead(HL_HLC_MAX, UINT64_MAX, UINT64_MAX) == false);
    ck_assert(hl_hlc_ahead((uint64_t)200000 << 16, 100000, 60000));
    ck_assert(!hl_hlc_ahead((uint64_t)160000 << 16, 100000, 60000));
}
END_TEST

/* hl_db_step keeps the caller's stream positions with what committed: an
 * item's position is recorded in the transaction that applied it, and a
 * position-only item or one noted by the caller is recorded too. */
START_TEST(step_records_positions_with_what_it_applied)
{
    pair p;
    pair_open(&p);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (1, 'one')");
    ck_assert_uint_eq(capture(p.a), 1);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    char s0[] = "s0", s1[] = "s1";
    char *names[] = {s0, s1};
    uint64_t applied[2] = {0, 0}, seen[2] = {0, 0};
    hl_positions pos = {.n = 2, .streams = names, .applied = applied, .seen = seen};
    hl_inbound skip = {.shard = 1, .safe_seq = 7};
    hl_inbound it = {
        .next = &skip, .shard = 0, .safe_seq = 5, .cs = cs, .raw = p.raw.data, .rawlen = p.raw.len, .flags = p.flags};
    hl_step s = {0};
    ck_assert_int_eq(hl_db_step(p.b, &it, &pos, &s), HL_OK);
    ck_assert(s.committed);
    ck_assert(it.applied);
    ck_assert_uint_eq(applied[0], 5);
    ck_assert_uint_eq(applied[1], 7);
    ck_assert_uint_eq(seen[0], 5);
    ck_assert_uint_eq(seen[1], 7);
    uint64_t v = 0;
    ck_assert_int_eq(hl_db_stream_seq_get(p.b, "s0", &v), HL_OK);
    ck_assert_uint_eq(v, 5);
    ck_assert_int_eq(hl_db_stream_seq_get(p.b, "s1", &v), HL_OK);
    ck_assert_uint_eq(v, 7);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books"), 1);

    /* Nothing to do writes nothing, not even a position noted by the caller ... */
    seen[1] = 9;
    s = (hl_step){0};
    ck_assert_int_eq(hl_db_step(p.b, NULL, &pos, &s), HL_OK);
    ck_assert(!s.committed);
    ck_assert_uint_eq(applied[1], 7);
    ck_assert_uint_eq(seen[1], 9);
    /* ... until it is asked to record positions. */
    s = (hl_step){.flush_positions = true};
    ck_assert_int_eq(hl_db_step(p.b, NULL, &pos, &s), HL_OK);
    ck_assert(s.committed);
    ck_assert_uint_eq(applied[1], 9);
    ck_assert_int_eq(hl_db_stream_seq_get(p.b, "s1", &v), HL_OK);
    ck_assert_uint_eq(v, 9);
    hl_changeset_free(cs);
    pair_close(&p);
}
END_TEST

/* A step that fails after capture began loses nothing: the transaction rolls
 * back, the caller's positions return to what is recorded, the remote
 * changeset is not applied, and the local change stays logged for the next
 * step. */
START_TEST(failed_step_loses_nothing)
{
    pair p;
    pair_open(&p);
    app_exec(p.appa, "INSERT INTO books(id, title) VALUES (1, 'remote')");
    ck_assert_uint_eq(capture(p.a), 1);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    /* b's own row is too big for b's limit: capture inside the write transaction fails. */
    set_max_changeset_bytes(p.b, 4096);
    app_exec(p.appb, "INSERT INTO books(id, title) VALUES (2, printf('%.8000c', 'x'))");
    char s0[] = "s0";
    char *names[] = {s0};
    uint64_t applied[1] = {3}, seen[1] = {3};
    hl_positions pos = {.n = 1, .streams = names, .applied = applied, .seen = seen};
    hl_inbound it = {.shard = 0, .safe_seq = 4, .cs = cs, .raw = p.raw.data, .rawlen = p.raw.len, .flags = p.flags};
    hl_step s = {0};
    ck_assert_int_eq(hl_db_step(p.b, &it, &pos, &s), HL_ERR_TOO_LARGE);
    ck_assert(!s.committed);
    ck_assert(!it.applied);
    ck_assert_uint_eq(seen[0], 3);
    ck_assert_uint_eq(applied[0], 3);
    uint64_t v = 0;
    ck_assert_int_eq(hl_db_stream_seq_get(p.b, "s0", &v), HL_OK);
    ck_assert_uint_eq(v, 0);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books WHERE id = 1"), 0);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM __harmonylite__outbox"), 0);
    /* With the limit raised the same step goes through: both rows are there. */
    set_max_changeset_bytes(p.b, 1u << 20);
    s = (hl_step){0};
    ck_assert_int_eq(hl_db_step(p.b, &it, &pos, &s), HL_OK);
    ck_assert(s.committed);
    ck_assert(it.applied);
    ck_assert_uint_eq(s.rows_captured, 1);
    ck_assert_uint_eq(applied[0], 4);
    ck_assert_int_eq(hl_db_stream_seq_get(p.b, "s0", &v), HL_OK);
    ck_assert_uint_eq(v, 4);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM books"), 2);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM __harmonylite__outbox"), 1);
    hl_changeset_free(cs);
    pair_close(&p);
}
END_TEST

/* The keys of b's conflicts in table tbl, in the order they were recorded:
 * integers, at most max; returns how many. */
static size_t conflict_keys(sqlite3 *db, const char *tbl, int64_t *out, size_t max)
{
    sqlite3_stmt *st;
    size_t n = 0;
    ck_assert_int_eq(
        sqlite3_prepare_v2(db, "SELECT pk FROM __harmonylite__conflicts WHERE tbl = ? ORDER BY id", -1, &st, NULL),
        SQLITE_OK);
    sqlite3_bind_text(st, 1, tbl, -1, SQLITE_STATIC);
    while (sqlite3_step(st) == SQLITE_ROW) {
        hl_value key[HL_CS_MAX_KEY];
        unsigned char scratch[256];
        size_t nk = 0, len = (size_t)sqlite3_column_bytes(st, 0);
        ck_assert_uint_lt(len + HL_CS_MAX_KEY, sizeof scratch);
        ck_assert_int_eq(hl_key_decode(sqlite3_column_blob(st, 0), len, key, &nk, scratch), HL_OK);
        ck_assert_uint_eq(nk, 1);
        ck_assert_int_eq(key[0].type, HL_VAL_INT);
        ck_assert_uint_lt(n, max);
        out[n++] = key[0].u.i;
    }
    sqlite3_finalize(st);
    return n;
}

/* Issue 10: rows of one table are applied in key order where the order cannot
 * matter, and in the order captured where it can. On b every row fails a
 * CHECK (not part of the schema hash), so the conflicts table shows the order
 * rows were applied in. */
START_TEST(rows_apply_in_key_order_only_where_order_cannot_matter)
{
    pair p;
    pair_open(&p);
    const char *tables[] = {"kord", "kuniq", "ktrig"};
    for (int i = 0; i < 3; i++) {
        char ddl[300];
        snprintf(ddl, sizeof ddl, "CREATE TABLE %s(id INTEGER PRIMARY KEY, v INTEGER, w TEXT%s)", tables[i],
                 i == 1 ? " UNIQUE" : "");
        app_exec(p.appa, ddl);
        snprintf(ddl, sizeof ddl, "CREATE TABLE %s(id INTEGER PRIMARY KEY, v INTEGER CHECK (v >= 0), w TEXT%s)",
                 tables[i], i == 1 ? " UNIQUE" : "");
        app_exec(p.appb, ddl);
    }
    app_exec(p.appa, "CREATE TABLE seen(k INTEGER)");
    app_exec(p.appb, "CREATE TABLE seen(k INTEGER);"
                     "CREATE TRIGGER app_seen BEFORE UPDATE ON ktrig BEGIN INSERT INTO seen VALUES (NEW.id); END");
    capture(p.a);
    capture(p.b);
    char sql[400];
    for (int i = 0; i < 3; i++) {
        snprintf(sql, sizeof sql, "INSERT INTO %s(id, v, w) VALUES (1, 0, 'a'), (3, 0, 'c'), (5, 0, 'e'), (9, 0, 'i')",
                 tables[i]);
        app_exec(p.appa, sql);
    }
    capture(p.a);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    hl_changeset_free(cs);
    ck_assert_uint_eq(hl_db_counters(p.b)->conflicts, 0);
    /* Updated in the order 5, 3, 9, 1: captured (and sent) in that order. */
    for (int i = 0; i < 3; i++) {
        snprintf(sql, sizeof sql,
                 "UPDATE %1$s SET v = -1 WHERE id = 5; UPDATE %1$s SET v = -1 WHERE id = 3;"
                 "UPDATE %1$s SET v = -1 WHERE id = 9; UPDATE %1$s SET v = -1 WHERE id = 1",
                 tables[i]);
        app_exec(p.appa, sql);
    }
    ck_assert_uint_eq(capture(p.a), 12);
    cs = take(p.a, &p.raw, &p.flags);
    ck_assert_uint_eq(cs->nrows, 12);
    ck_assert_int_eq(cs->rows[0].key[0].u.i, 5);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    hl_changeset_free(cs);
    static const int64_t sorted[] = {1, 3, 5, 9}, captured[] = {5, 3, 9, 1};
    for (int i = 0; i < 3; i++) {
        int64_t got[8];
        ck_assert_uint_eq(conflict_keys(p.appb, tables[i], got, 8), 4);
        for (int k = 0; k < 4; k++)
            ck_assert_msg(got[k] == (i == 0 ? sorted : captured)[k], "%s: row %d applied as %lld", tables[i], k,
                          (long long)got[k]);
    }
    ck_assert_int_eq(hl_db_table(p.b, "kord")->key_order, 1);
    ck_assert_int_eq(hl_db_table(p.b, "kuniq")->key_order, -1);
    ck_assert_int_eq(hl_db_table(p.b, "ktrig")->key_order, -1);
    pair_close(&p);
}
END_TEST

/* Issue 10: rows handing on a UNIQUE value (row 2 gives 'b' up, then row 1
 * takes it) apply without a conflict although the later row has the lower
 * key: the table is not sorted. */
START_TEST(unique_value_handed_on_applies_without_conflict)
{
    pair p;
    pair_open(&p);
    app_exec(p.appa, "INSERT INTO uniq VALUES (1, 'a'), (2, 'b'), (3, 'x'), (4, 'y')");
    capture(p.a);
    hl_changeset *cs = take(p.a, &p.raw, &p.flags);
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    hl_changeset_free(cs);
    app_exec(p.appa, "BEGIN; UPDATE uniq SET email = 'c' WHERE id = 2; UPDATE uniq SET email = 'b' WHERE id = 1;"
                     "UPDATE uniq SET email = 'z' WHERE id = 4; UPDATE uniq SET email = 'y' WHERE id = 3; COMMIT");
    ck_assert_uint_eq(capture(p.a), 4);
    cs = take(p.a, &p.raw, &p.flags);
    ck_assert_uint_eq(cs->nrows, 4);
    ck_assert_int_eq(cs->rows[0].key[0].u.i, 2); /* as committed: the giver first */
    ck_assert_int_eq(apply(p.b, cs, &p.raw, p.flags), HL_APPLIED);
    hl_changeset_free(cs);
    ck_assert_uint_eq(hl_db_counters(p.b)->conflicts, 0);
    ck_assert_int_eq(scalar(p.appb, "SELECT count(*) FROM __harmonylite__conflicts"), 0);
    assert_same_dump(p.pa, p.pb);
    pair_close(&p);
}
END_TEST

/* Every row of the tables below and of their clocks, for comparing databases. */
static char *dump_order_tables(sqlite3 *db)
{
    static const char *const q[] = {
        "SELECT rowid, quote(x), quote(y) FROM plain ORDER BY rowid",
        "SELECT quote(a), quote(b), quote(v) FROM pairs ORDER BY a, b",
        "SELECT rowid, quote(\"select\"), quote(\"a\"\"b\") FROM \"my table\" ORDER BY rowid",
        "SELECT quote(k), quote(v) FROM rk ORDER BY k",
        "SELECT quote(k), quote(v) FROM nk ORDER BY k",
        "SELECT quote(k), quote(v) FROM ck ORDER BY k COLLATE BINARY",
        "SELECT k0, hlc, node, deleted FROM __harmonylite__plain_clock ORDER BY 1",
        "SELECT quote(k0), quote(k1), hlc, node, deleted FROM __harmonylite__pairs_clock ORDER BY k0, k1",
        "SELECT quote(k0), hlc, node, deleted FROM \"__harmonylite__my table_clock\" ORDER BY k0",
        "SELECT quote(k0), hlc, node, deleted FROM __harmonylite__rk_clock ORDER BY k0",
        "SELECT quote(k0), hlc, node, deleted FROM __harmonylite__nk_clock ORDER BY k0",
        "SELECT quote(k0), hlc, node, deleted FROM __harmonylite__ck_clock ORDER BY k0",
        "SELECT tbl, quote(pk), hlc, reason FROM __harmonylite__conflicts ORDER BY tbl, pk, hlc"};
    hl_buf out;
    hl_buf_init(&out, 256u << 20);
    for (size_t i = 0; i < sizeof q / sizeof q[0]; i++) {
        sqlite3_stmt *st;
        ck_assert_msg(sqlite3_prepare_v2(db, q[i], -1, &st, NULL) == SQLITE_OK, "%s: %s", q[i], sqlite3_errmsg(db));
        while (sqlite3_step(st) == SQLITE_ROW) {
            for (int c = 0; c < sqlite3_column_count(st); c++)
                hl_buf_addf(&out, "%s|", sqlite3_column_text(st, c) ? (const char *)sqlite3_column_text(st, c) : "");
            hl_buf_addc(&out, '\n');
        }
        sqlite3_finalize(st);
        hl_buf_adds(&out, "--\n");
    }
    return (char *)hl_buf_steal(&out, NULL);
}

/* Adds n rows of table ti to cs, keys made by key(i): scattered, repeated;
 * one row in 8 has the key and the version of the row before it and another
 * value (of two rows with one version, the first applied wins), one in 8 is
 * a delete. */
static void add_scattered(hl_changeset *cs, uint32_t ti, size_t ncols, int n, uint64_t *hlc,
                          void (*key)(int, hl_value *, size_t *), unsigned *seed)
{
    for (int i = 0; i < n; i++) {
        hl_value k[2], vals[3];
        size_t nk = 0;
        char text[32];
        *seed = *seed * 1103515245u + 12345u;
        unsigned r = (*seed >> 16) % 8;
        bool again = r == 0 && i > 0;
        key(again ? i - 1 : i, k, &nk);
        if (!again)
            (*hlc)++;
        snprintf(text, sizeof text, "value %d", i);
        vals[ncols - 1] = (hl_value){.type = HL_VAL_TEXT, .u.b = {(unsigned char *)text, strlen(text)}};
        for (size_t c = 0; c + 1 < ncols; c++)
            vals[c] = k[c];
        hl_op op = r == 1 ? HL_OP_DELETE : HL_OP_UPSERT;
        ck_assert_int_eq(hl_changeset_add_row(cs, ti, op, *hlc, k, nk, op == HL_OP_UPSERT ? vals : NULL,
                                              op == HL_OP_UPSERT ? ncols : 0),
                         HL_OK);
    }
}

static unsigned scatter(int i)
{
    return ((unsigned)i * 7919u) % 61u; /* 61 keys, visited out of order, repeated */
}

static void key_rowid(int i, hl_value *k, size_t *n)
{
    k[0] = (hl_value){.type = HL_VAL_INT, .u.i = (int64_t)scatter(i) * 1000};
    *n = 1;
}

static void key_pair(int i, hl_value *k, size_t *n)
{
    static const char *const b[] = {"x", "a", "xy", ""};
    k[0] = (hl_value){.type = HL_VAL_INT, .u.i = (int64_t)(scatter(i) % 7) - 3};
    k[1] = (hl_value){.type = HL_VAL_TEXT, .u.b = {(unsigned char *)b[i % 4], strlen(b[i % 4])}};
    *n = 2;
}

static void key_text(int i, hl_value *k, size_t *n)
{
    static char buf[64][8];
    snprintf(buf[i % 64], sizeof buf[0], "k%u", scatter(i));
    k[0] = (hl_value){.type = HL_VAL_TEXT, .u.b = {(unsigned char *)buf[i % 64], strlen(buf[i % 64])}};
    *n = 1;
}

/* Two integers that are one REAL: 2^53 + 1 rounds to 2^53. */
static void key_real(int i, hl_value *k, size_t *n)
{
    k[0] = (hl_value){.type = HL_VAL_INT, .u.i = (INT64_C(1) << 53) + 1 - (scatter(i) % 2)};
    *n = 1;
}

/* Texts that are one number under NUMERIC affinity: '10', '1e1', '10.0'. */
static void key_numeric(int i, hl_value *k, size_t *n)
{
    static const char *const t[] = {"1e1", "10", "10.0", "7"};
    const char *s = t[scatter(i) % 4];
    k[0] = (hl_value){.type = HL_VAL_TEXT, .u.b = {(unsigned char *)s, strlen(s)}};
    *n = 1;
}

/* Texts that are one row under NOCASE. */
static void key_nocase(int i, hl_value *k, size_t *n)
{
    static const char *const t[] = {"b", "B", "a", "A"};
    const char *s = t[scatter(i) % 4];
    k[0] = (hl_value){.type = HL_VAL_TEXT, .u.b = {(unsigned char *)s, strlen(s)}};
    *n = 1;
}

/* Issue 10: a scattered changeset applied by apply (sorted where it may be)
 * leaves exactly the database, rows (and hidden rowids) and clocks, that
 * applying its rows one by one in the order sent does. Repeated keys, some
 * with equal versions (the first applied wins), different key values that are
 * one row (by affinity or collation) and new rows of a rowid table with a
 * text key make any wrong move show. */
START_TEST(key_order_gives_the_database_of_the_order_sent)
{
    pair p;
    pair_open(&p);
    const char *ddl = "CREATE TABLE rk(k REAL PRIMARY KEY, v) WITHOUT ROWID;"
                      "CREATE TABLE nk(k NUMERIC PRIMARY KEY, v) WITHOUT ROWID;"
                      "CREATE TABLE ck(k TEXT COLLATE NOCASE PRIMARY KEY, v) WITHOUT ROWID;";
    app_exec(p.appa, ddl);
    app_exec(p.appb, ddl);
    capture(p.a);
    capture(p.b);
    ck_assert_mem_eq(hl_db_schema_hash(p.a), hl_db_schema_hash(p.b), 32);
    hl_changeset *cs = hl_changeset_new();
    ck_assert_ptr_nonnull(cs);
    cs->origin = 7;
    cs->epoch = 1;
    cs->seq = 1;
    cs->wall_ms = hl_now_ms();
    memcpy(cs->schema_hash, hl_db_schema_hash(p.b), 32);
    struct {
        const char *name;
        const char *cols[3];
        size_t ncols;
        const char *pk[2];
        size_t npk;
        void (*key)(int, hl_value *, size_t *);
    } t[] = {
        {"plain", {"x", "y"}, 2, {NULL}, 0, key_rowid},
        {"pairs", {"a", "b", "v"}, 3, {"a", "b"}, 2, key_pair},
        {"my table", {"select", "a\"b"}, 2, {"select"}, 1, key_text},
        {"rk", {"k", "v"}, 2, {"k"}, 1, key_real},
        {"nk", {"k", "v"}, 2, {"k"}, 1, key_numeric},
        {"ck", {"k", "v"}, 2, {"k"}, 1, key_nocase},
    };
    uint64_t hlc = hl_now_ms() << 16;
    unsigned seed = 42;
    for (uint32_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        uint32_t ti;
        ck_assert_int_eq(hl_changeset_add_table(cs, t[i].name, t[i].cols, t[i].ncols, t[i].pk, t[i].npk, &ti), HL_OK);
        add_scattered(cs, ti, t[i].ncols, 200, &hlc, t[i].key, &seed);
    }
    hl_buf raw;
    hl_buf_init(&raw, 256u << 20);
    ck_assert_int_eq(hl_changeset_encode(cs, false, &raw), HL_OK);
    /* b: the whole changeset. */
    ck_assert_int_eq(apply(p.b, cs, &raw, 0), HL_APPLIED);
    ck_assert_int_eq(hl_db_table(p.b, "plain")->key_order, 1);
    ck_assert_int_eq(hl_db_table(p.b, "pairs")->key_order, 1);
    ck_assert_int_eq(hl_db_table(p.b, "rk")->key_order, 1);
    /* A rowid table with a text key: new rows get rowids in the order applied. */
    ck_assert_int_eq(hl_db_table(p.b, "my table")->key_order, -1);
    /* a: one changeset per row, in the order sent. */
    for (size_t i = 0; i < cs->nrows; i++) {
        const hl_cs_row *r = &cs->rows[i];
        const hl_cs_table *ct = &cs->tables[r->table];
        hl_changeset *one = hl_changeset_new();
        uint32_t ti;
        ck_assert_ptr_nonnull(one);
        one->origin = cs->origin;
        one->epoch = cs->epoch;
        one->seq = i + 1;
        one->wall_ms = cs->wall_ms;
        memcpy(one->schema_hash, cs->schema_hash, 32);
        ck_assert_int_eq(hl_changeset_add_table(one, ct->name, (const char *const *)ct->cols, ct->ncols,
                                                (const char *const *)ct->pk, ct->npk, &ti),
                         HL_OK);
        ck_assert_int_eq(hl_changeset_add_row(one, ti, r->op, r->hlc, r->key, r->nkey, r->vals, r->nvals), HL_OK);
        hl_buf_reset(&raw);
        ck_assert_int_eq(hl_changeset_encode(one, false, &raw), HL_OK);
        ck_assert_int_eq(apply(p.a, one, &raw, 0), HL_APPLIED);
        hl_changeset_free(one);
    }
    char *da = dump_order_tables(p.appa), *db = dump_order_tables(p.appb);
    size_t at = 0;
    while (da[at] && da[at] == db[at])
        at++;
    bool same = da[at] == db[at];
    while (at > 0 && da[at - 1] != '\n')
        at--;
    ck_assert_msg(same, "from this line on: sent order %.80s, apply %.80s", da + at, db + at);
    /* Not vacuous: the rows that are one row by affinity or collation did clash. */
    ck_assert_int_le(scalar(p.appb, "SELECT count(*) FROM rk"), 1);
    ck_assert_int_le(scalar(p.appb, "SELECT count(*) FROM nk"), 2);
    ck_assert_int_le(scalar(p.appb, "SELECT count(*) FROM ck"), 2);
    free(da);
    free(db);
    hl_buf_free(&raw);
    hl_changeset_free(cs);
    pair_close(&p);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("db");
    TCase *tc = tcase_create("db");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, trigger_sql_quotes_identifiers);
    tcase_add_test(tc, schema_skips_virtual_and_internal);
    tcase_add_test(tc, schema_hash_is_sha256_of_the_canonical_form);
    tcase_add_test(tc, previous_schema_hash_is_kept_and_persisted);
    tcase_add_test(tc, held_bytes_are_bounded_and_deferred_ones_are_read_again);
    tcase_add_test(tc, capture_and_apply_round_trip);
    tcase_add_test(tc, last_writer_wins_and_tombstones);
    tcase_add_test(tc, out_of_order_changesets_are_held_then_applied);
    tcase_add_test(tc, far_future_version_is_held_not_observed);
    tcase_add_test(tc, version_ahead_is_applied_when_the_clock_catches_up);
    tcase_add_test(tc, unique_clash_newer_row_wins_everywhere);
    tcase_add_test(tc, schema_mismatch_holds_until_schema_catches_up);
    tcase_add_test(tc, constraint_conflict_is_recorded_and_rest_applies);
    tcase_add_test(tc, null_key_rows_are_refused_not_fatal);
    tcase_add_test(tc, legacy_clock_table_is_migrated);
    tcase_add_test(tc, application_triggers_fire_on_apply);
    tcase_add_test(tc, rowid_clocks_and_their_exceptions);
    tcase_add_test(tc, appends_are_versioned_by_spans);
    tcase_add_test(tc, remote_versions_are_compared_with_spans);
    tcase_add_test(tc, applied_appends_are_versioned_by_spans);
    tcase_add_test(tc, a_run_of_appends_keeps_all_rows_but_the_one_that_fails);
    tcase_add_test(tc, a_key_that_changes_kind_keeps_its_versions);
    tcase_add_test(tc, span_put_cuts_what_it_covers);
    tcase_add_test(tc, checkpointer_moves_wal_into_the_database);
    tcase_add_test(tc, wal_returns_under_its_bound_after_scattered_updates);
    tcase_add_test(tc, watch_holds_looks_while_the_writer_is_busy_and_loses_none);
    tcase_add_test(tc, release_memory_empties_the_page_cache);
    tcase_add_test(tc, cleanup_leaves_application_data);
    tcase_add_test(tc, new_table_rows_written_before_triggers_are_captured);
    tcase_add_test(tc, split_capture_with_writes_in_between_converges);
    tcase_add_test(tc, inserts_above_the_high_water_mark_are_not_logged);
    tcase_add_test(tc, gap_filled_between_read_and_record_is_captured);
    tcase_add_test(tc, vacuum_renumbering_rowids_converges);
    tcase_add_test(tc, rebuilt_rowid_table_converges);
    tcase_add_test(tc, writes_while_a_rebuild_dropped_the_triggers_are_captured);
    tcase_add_test(tc, rows_deleted_by_or_replace_are_captured);
    tcase_add_test(tc, application_inserts_keep_no_statement_journal);
    tcase_add_test(tc, streamed_blob_write_needs_an_update_to_be_seen);
    tcase_add_test(tc, vacuum_moving_rows_of_the_starting_point_converges);
    tcase_add_test(tc, big_transaction_travels_as_a_chain_applied_as_one);
    tcase_add_test(tc, chain_waits_for_the_schema_as_a_whole);
    tcase_add_test(tc, row_larger_than_any_changeset_fails_capture_loudly);
    tcase_add_test(tc, hlc_rules);
    tcase_add_test(tc, capture_never_sends_what_receivers_would_refuse);
    tcase_add_test(tc, step_records_positions_with_what_it_applied);
    tcase_add_test(tc, failed_step_loses_nothing);
    tcase_add_test(tc, rows_apply_in_key_order_only_where_order_cannot_matter);
    tcase_add_test(tc, unique_value_handed_on_applies_without_conflict);
    tcase_add_test(tc, key_order_gives_the_database_of_the_order_sent);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
