/*
 * db_fixture.h - what the database tests share: a temporary directory per
 * test, an application's connection to a database in it, and one-line
 * queries that fail the test on any error.
 *
 * Usage: call db_fixture_setup("name") and db_fixture_teardown() from the
 * test case's checked fixture; dir holds the directory meanwhile. Header-only,
 * for one test binary; a binary need not use every helper (they are inline).
 */
#ifndef HL_TEST_DB_FIXTURE_H
#define HL_TEST_DB_FIXTURE_H

#include <check.h>
#include <sqlite3.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "common/log.h"
#include "db/db.h"

static char dir[256];

static void db_fixture_setup(const char *name)
{
    ck_assert_int_lt(snprintf(dir, sizeof dir, "/tmp/hl_test_%s_XXXXXX", name), (int)sizeof dir);
    ck_assert_ptr_nonnull(mkdtemp(dir));
    hl_log_setup(HL_LOG_WARN, false, 0);
}

static void db_fixture_teardown(void)
{
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    ck_assert_int_eq(system(cmd), 0);
}

/* dir/name into buf. */
static inline void path_of(char *buf, size_t n, const char *name)
{
    ck_assert_int_lt(snprintf(buf, n, "%s/%s", dir, name), (int)n);
}

/* An application connection: its own handle, trusted_schema OFF like a careful app. */
static inline sqlite3 *app_open(const char *path)
{
    sqlite3 *db = NULL;
    ck_assert_int_eq(sqlite3_open(path, &db), SQLITE_OK);
    sqlite3_busy_timeout(db, 5000);
    ck_assert_int_eq(sqlite3_exec(db, "PRAGMA trusted_schema = OFF; PRAGMA journal_mode = WAL", NULL, NULL, NULL),
                     SQLITE_OK);
    return db;
}

static inline void app_exec(sqlite3 *db, const char *sql)
{
    char *msg = NULL;
    int rc = sqlite3_exec(db, sql, NULL, NULL, &msg);
    ck_assert_msg(rc == SQLITE_OK, "%s: %s", sql, msg ? msg : "");
    sqlite3_free(msg);
}

/* The first column of sql's first row as an integer; the test fails when there is no row. */
static inline int64_t scalar(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *st = NULL;
    ck_assert_msg(sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK, "%s: %s", sql, sqlite3_errmsg(db));
    int rc = sqlite3_step(st);
    ck_assert_msg(rc == SQLITE_ROW, "%s: no row (%s)", sql, sqlite3_errmsg(db));
    int64_t v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return v;
}

/* An engine step that only captures; returns the rows captured. */
static inline uint64_t capture(hl_db *d)
{
    hl_step s = {.capture = true};
    ck_assert_int_eq(hl_db_step(d, NULL, NULL, &s), HL_OK);
    return s.rows_captured;
}

#endif
