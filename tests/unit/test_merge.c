/*
 * test_merge.c - catching up from a snapshot by merging it row by row
 * (src/db/merge.c): last-writer-wins both ways, tombstones, the node's own
 * newer and uncaptured writes, positions and origins, nothing captured as
 * this node's own change.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"
#include "db/db.h"
#include "db_fixture.h"

static void setup(void)
{
    db_fixture_setup("merge");
}

static void teardown(void)
{
    db_fixture_teardown();
}

/* The text of the first column of sql's first row ("" when none or NULL). */
static void text(sqlite3 *db, const char *sql, char *out, size_t n)
{
    sqlite3_stmt *st = NULL;
    out[0] = 0;
    ck_assert_int_eq(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_text(st, 0))
        snprintf(out, n, "%s", (const char *)sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
}

static const char *schema_sql = "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);"
                                "CREATE TABLE k(a TEXT PRIMARY KEY, b) WITHOUT ROWID;";

static hl_db *engine_open(const char *path, uint64_t node)
{
    hl_db *d = NULL;
    ck_assert_int_eq(hl_db_open(&d, path, node, 2000), HL_OK);
    hl_db_options o = *hl_db_get_options(d);
    o.publish = true;
    hl_db_configure(d, &o);
    ck_assert_int_eq(hl_db_install(d, false, NULL), HL_OK);
    return d;
}

/* Rows in src's outbox after changeset seq after (0: all); *last receives the last seq. */
static uint64_t outbox_rows(hl_db *src, uint64_t after, uint64_t *last)
{
    hl_outbox_entry e;
    uint64_t rows = 0;
    hl_outbox_entry_init(&e, 64u << 20);
    while (hl_db_outbox_next(src, after, &e) == HL_OK) {
        rows += e.rows;
        after = e.seq;
    }
    hl_outbox_entry_free(&e);
    if (last)
        *last = after;
    return rows;
}

/* Every changeset in src's outbox after seq after, applied to dst. */
static void ship(hl_db *src, hl_db *dst, uint64_t after)
{
    hl_outbox_entry e;
    hl_outbox_entry_init(&e, 64u << 20);
    while (hl_db_outbox_next(src, after, &e) == HL_OK) {
        hl_changeset *cs = NULL;
        char err[200];
        ck_assert_int_eq(hl_changeset_decode(e.payload.data, e.payload.len, e.flags & HL_PART_FLAG_ZSTD, 64u << 20, &cs,
                                             err, sizeof err),
                         HL_OK);
        hl_apply_result r;
        ck_assert_int_eq(hl_db_apply_one(dst, cs, e.payload.data, e.payload.len, e.flags, &r), HL_OK);
        ck_assert_int_eq(r, HL_APPLIED);
        hl_changeset_free(cs);
        after = e.seq;
    }
    hl_outbox_entry_free(&e);
}

/* Merges the snapshot at path into d, max_rows a transaction; returns the rows merged. */
static uint64_t merge(hl_db *d, const char *path, size_t max_rows)
{
    hl_merge *m = NULL;
    uint64_t total = 0, merged = 0;
    char err[300] = "";
    ck_assert_msg(hl_db_merge_open(d, path, &m, &total, err, sizeof err) == HL_OK, "%s", err);
    bool done = false;
    int steps = 0;
    while (!done) {
        ck_assert_int_eq(hl_db_merge_step(m, max_rows, &merged, &done), HL_OK);
        ck_assert_int_lt(++steps, 1000);
    }
    ck_assert_int_eq(hl_db_merge_finish(m), HL_OK);
    hl_db_merge_close(m);
    ck_assert_uint_eq(merged, total);
    return merged;
}

START_TEST(merge_by_last_writer_wins_keeps_local_writes_and_moves_positions)
{
    char pa[300], pb[300], ps[300], sql[600], v[100];
    snprintf(pa, sizeof pa, "%s/a.db", dir);
    snprintf(pb, sizeof pb, "%s/b.db", dir);
    snprintf(ps, sizeof ps, "%s/snap.db", dir);
    sqlite3 *aa = app_open(pa), *ab = app_open(pb);
    app_exec(aa, schema_sql);
    app_exec(ab, schema_sql);
    hl_db *a = engine_open(pa, 1), *b = engine_open(pb, 3);

    /* Shared history: A's rows reach B. */
    app_exec(aa, "INSERT INTO t VALUES (1,'one'),(2,'two'),(3,'three'),(4,'four'),(5,'five');"
                 "INSERT INTO k VALUES ('x', 1), ('y', 2)");
    ck_assert_uint_eq(capture(a), 7);
    uint64_t a_last = 0;
    outbox_rows(a, 0, &a_last);
    ship(a, b, 0);

    /* B is away; A goes on: newer versions, a delete, new rows. */
    usleep(2000);
    app_exec(aa, "UPDATE t SET v = 'one from a' WHERE id = 1; DELETE FROM t WHERE id = 2;"
                 "UPDATE t SET v = 'five from a' WHERE id = 5; INSERT INTO t VALUES (6, 'six'); DELETE FROM k WHERE a "
                 "= 'y'; INSERT INTO k VALUES ('z', 3)");
    ck_assert_uint_eq(capture(a), 6);

    /* The snapshot: A's file as a snapshot holds it, with positions and origins. */
    snprintf(sql, sizeof sql, "VACUUM INTO '%s'", ps);
    app_exec(aa, sql);
    sqlite3 *as = app_open(ps);
    snprintf(sql, sizeof sql,
             "INSERT INTO __harmonylite__seq VALUES ('S0', 100), ('S1', 5);"
             "INSERT INTO __harmonylite__origins VALUES (2, 77, 40), (3, %lld, 9);"
             "INSERT INTO __harmonylite__pending(node, epoch, seq, flags, data, schema, at_ms, reason) VALUES "
             "(2, 77, 42, 0, x'00', 0, 1, 'waiting for changeset 41'), (2, 77, 40, 0, x'00', 0, 1, 'applied')",
             (long long)hl_db_epoch(b));
    app_exec(as, sql);
    sqlite3_close(as);

    /* B's own writes, newer than the snapshot's: one captured, one not yet. */
    usleep(2000);
    app_exec(ab, "UPDATE t SET v = 'four from b' WHERE id = 4");
    ck_assert_uint_eq(capture(b), 1);
    uint64_t b_seq = 0;
    ck_assert_uint_eq(outbox_rows(b, 0, &b_seq), 1);
    app_exec(ab, "UPDATE t SET v = 'five from b' WHERE id = 5; INSERT INTO k VALUES ('w', 9)");
    /* B's position on S1 is ahead of the snapshot's: it stays. */
    app_exec(ab, "INSERT INTO __harmonylite__seq VALUES ('S1', 9)");

    ck_assert_uint_eq(merge(b, ps, 2), 9); /* t: 1..6 with 2 a tombstone; k: x, y (tombstone), z */

    text(ab, "SELECT v FROM t WHERE id = 1", v, sizeof v);
    ck_assert_str_eq(v, "one from a");                                      /* the snapshot's newer version wins */
    ck_assert_int_eq(scalar(ab, "SELECT count(*) FROM t WHERE id = 2"), 0); /* its tombstone deletes */
    text(ab, "SELECT v FROM t WHERE id = 3", v, sizeof v);
    ck_assert_str_eq(v, "three");
    text(ab, "SELECT v FROM t WHERE id = 4", v, sizeof v);
    ck_assert_str_eq(v, "four from b"); /* the local newer version survives */
    text(ab, "SELECT v FROM t WHERE id = 5", v, sizeof v);
    ck_assert_str_eq(v, "five from b"); /* so does one not captured when the merge began (capture first) */
    text(ab, "SELECT v FROM t WHERE id = 6", v, sizeof v);
    ck_assert_str_eq(v, "six");
    ck_assert_int_eq(scalar(ab, "SELECT count(*) FROM k WHERE a = 'y'"), 0);
    ck_assert_int_eq(scalar(ab, "SELECT b FROM k WHERE a = 'z'"), 3);
    ck_assert_int_eq(scalar(ab, "SELECT b FROM k WHERE a = 'w'"), 9);

    /* Positions and origins moved up, never down; our own origin is not the snapshot's to set. */
    uint64_t seq = 0;
    ck_assert_int_eq(hl_db_stream_seq_get(b, "S0", &seq), HL_OK);
    ck_assert_uint_eq(seq, 100);
    ck_assert_int_eq(hl_db_stream_seq_get(b, "S1", &seq), HL_OK);
    ck_assert_uint_eq(seq, 9);
    ck_assert_int_eq(scalar(ab, "SELECT seq FROM __harmonylite__origins WHERE node = 2 AND epoch = 77"), 40);
    ck_assert_int_eq(scalar(ab, "SELECT count(*) FROM __harmonylite__origins WHERE node = 3"), 0);
    /* What the snapshot held beyond its origins is held here too; what was applied is not. */
    ck_assert_int_eq(scalar(ab, "SELECT group_concat(seq) FROM __harmonylite__pending WHERE node = 2"), 42);
    snprintf(sql, sizeof sql, "SELECT seq FROM __harmonylite__origins WHERE node = 1 AND epoch = %lld",
             (long long)hl_db_epoch(a));
    ck_assert_int_eq(scalar(ab, sql), (int64_t)a_last);

    /* Nothing merged was captured as B's own change: only B's two writes are in its outbox. */
    ck_assert_uint_eq(outbox_rows(b, b_seq, NULL), 2);
    ck_assert_uint_eq(capture(b), 0);

    /* B's versions then reach A and win there too: both converge. */
    ship(b, a, 0);
    text(aa, "SELECT v FROM t WHERE id = 5", v, sizeof v);
    ck_assert_str_eq(v, "five from b");
    ck_assert_int_eq(scalar(aa, "SELECT b FROM k WHERE a = 'w'"), 9);

    /* Merging the same snapshot again changes nothing. */
    merge(b, ps, 1000);
    text(ab, "SELECT v FROM t WHERE id = 4", v, sizeof v);
    ck_assert_str_eq(v, "four from b");
    ck_assert_uint_eq(capture(b), 0);

    sqlite3_close(aa);
    sqlite3_close(ab);
    hl_db_close(a);
    hl_db_close(b);
}
END_TEST

START_TEST(snapshot_of_another_schema_is_refused)
{
    char pb[300], ps[300], err[300] = "";
    snprintf(pb, sizeof pb, "%s/b.db", dir);
    snprintf(ps, sizeof ps, "%s/snap.db", dir);
    sqlite3 *ab = app_open(pb), *as = app_open(ps);
    app_exec(ab, schema_sql);
    app_exec(as, "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, extra);");
    hl_db *b = engine_open(pb, 3), *s = engine_open(ps, 1);
    hl_db_close(s);
    hl_merge *m = NULL;
    uint64_t total = 0;
    ck_assert_int_eq(hl_db_merge_open(b, ps, &m, &total, err, sizeof err), HL_ERR_INVALID);
    ck_assert_ptr_null(m);
    ck_assert_ptr_nonnull(strstr(err, "schema hash"));
    sqlite3_close(ab);
    sqlite3_close(as);
    hl_db_close(b);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("merge");
    TCase *tc = tcase_create("merge");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, merge_by_last_writer_wins_keeps_local_writes_and_moves_positions);
    tcase_add_test(tc, snapshot_of_another_schema_is_refused);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? 1 : 0;
}
