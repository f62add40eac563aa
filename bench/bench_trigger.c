/*
 * bench_trigger.c - what harmonylite's triggers cost the application.
 *
 * Measures, in one run on the same machine and file system, application
 * insert throughput into the same table without triggers and with
 * harmonylite's capture triggers installed (through the product's own code),
 * for single-row transactions and for 1,000-row transactions, and single-row
 * updates of existing rows (always logged; appends above a table's high-water
 * mark are not). Prints ratios.
 *
 * Usage: bench_trigger [seconds-per-case] [dir]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#define HL_STR_(x) #x
#define HL_STR(x) HL_STR_(x)
#include "db/db.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(sqlite3 *db, const char *what)
{
    fprintf(stderr, "bench_trigger: %s: %s\n", what, db ? sqlite3_errmsg(db) : "");
    exit(1);
}

#define PREFILL 10000

/* Inserts rows (or, with update, updates random existing rows) in
 * transactions of batch rows for `seconds`; returns rows/s. */
static double run(const char *path, int batch, bool update, double seconds)
{
    sqlite3 *db;
    sqlite3_stmt *ins;
    if (sqlite3_open(path, &db) != SQLITE_OK)
        die(db, "open");
    sqlite3_busy_timeout(db, 5000);
    sqlite3_exec(db, "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL", NULL, NULL, NULL);
    const char *sql =
        update ? "UPDATE t SET a = ?1, b = ?2, c = ?3 WHERE id = ?4" : "INSERT INTO t(a, b, c) VALUES (?, ?, ?)";
    if (sqlite3_prepare_v2(db, sql, -1, &ins, NULL) != SQLITE_OK)
        die(db, "prepare");
    long rows = 0;
    double t0 = now(), t1;
    do {
        sqlite3_exec(db, "BEGIN", NULL, NULL, NULL);
        for (int i = 0; i < batch; i++) {
            sqlite3_bind_int64(ins, 1, rows);
            sqlite3_bind_text(ins, 2, "some text value of moderate size", -1, SQLITE_STATIC);
            sqlite3_bind_double(ins, 3, (double)rows * 0.5);
            if (update)
                sqlite3_bind_int64(ins, 4, 1 + (int64_t)((uint64_t)rows * 2654435761u % PREFILL));
            if (sqlite3_step(ins) != SQLITE_DONE)
                die(db, "insert");
            sqlite3_reset(ins);
            rows++;
        }
        if (sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK)
            die(db, "commit");
        t1 = now();
    } while (t1 - t0 < seconds);
    sqlite3_finalize(ins);
    sqlite3_close(db);
    return (double)rows / (t1 - t0);
}

static void fresh(const char *path, bool triggers)
{
    char p2[600];
    unlink(path);
    snprintf(p2, sizeof p2, "%s-wal", path);
    unlink(p2);
    snprintf(p2, sizeof p2, "%s-shm", path);
    unlink(p2);
    sqlite3 *db;
    if (sqlite3_open(path, &db) != SQLITE_OK)
        die(db, "open");
    if (sqlite3_exec(db,
                     "CREATE TABLE t(id INTEGER PRIMARY KEY, a INTEGER, b TEXT, c REAL);"
                     "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < " HL_STR(
                         PREFILL) ")"
                                  " INSERT INTO t SELECT i, i, 'some text value of moderate size', i * 0.5 FROM n",
                     NULL, NULL, NULL))
        die(db, "create");
    sqlite3_close(db);
    if (triggers) {
        hl_db *d;
        if (hl_db_open(&d, path, 1, 2000) || hl_db_install(d, false, NULL)) {
            fprintf(stderr, "bench_trigger: cannot install triggers\n");
            exit(1);
        }
        hl_db_close(d);
    }
}

int main(int argc, char **argv)
{
    double secs = argc > 1 ? atof(argv[1]) : 3.0;
    const char *dir = argc > 2 ? argv[2] : "/tmp";
    char path[512];
    snprintf(path, sizeof path, "%s/bench_trigger_%d.db", dir, (int)getpid());
    hl_db_global_init(); /* as the product does: the application side below shares the process */
    hl_log_setup(HL_LOG_WARN, false, 0);

    int batches[] = {1, 1000, 1};
    printf("%-28s %14s %14s %8s\n", "case", "bare rows/s", "triggers rows/s", "ratio");
    for (size_t i = 0; i < 3; i++) {
        bool update = i == 2;
        /* Alternate bare and trigger runs twice and keep each one's best, so a
         * noisy neighbour hurts both sides alike. */
        double bare = 0, trig = 0;
        for (int rep = 0; rep < 2; rep++) {
            fresh(path, false);
            double b = run(path, batches[i], update, secs);
            fresh(path, true);
            double t = run(path, batches[i], update, secs);
            bare = b > bare ? b : bare;
            trig = t > trig ? t : trig;
        }
        char name[64];
        snprintf(name, sizeof name, "%s, %d row%s/txn", update ? "update" : "insert", batches[i],
                 batches[i] > 1 ? "s" : "");
        printf("%-28s %14.0f %14.0f %8.2f\n", name, bare, trig, trig / bare);
    }
    fresh(path, false);
    unlink(path);
    return 0;
}
