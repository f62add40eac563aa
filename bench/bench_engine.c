/*
 * bench_engine.c - per-row cost of capture and apply on one core, without NATS.
 *
 * An "application" connection inserts N rows into node A's database in
 * transactions of B rows; harmonylite's capture (the product's own code) turns
 * them into changesets; the changesets are applied to node B's database.
 * Reports rows/s for the bare inserts, the capture and the apply, measured in
 * the same run. This is the per-node capacity that bench_cluster.py's
 * end-to-end figure shares among three nodes on one machine. Then the
 * application updates rows/2 rows at random keys in transactions of B rows,
 * captured after each transaction as the engine does, and the changesets are
 * applied to B: capture and apply of scattered updates (docs/performance.md,
 * (h)).
 *
 * Usage: bench_engine [rows] [rows-per-txn] [dir]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "db/db.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "bench_engine: %s failed\n", what);
        exit(1);
    }
}

static void rm_db(const char *path)
{
    char p[600];
    unlink(path);
    snprintf(p, sizeof p, "%s-wal", path);
    unlink(p);
    snprintf(p, sizeof p, "%s-shm", path);
    unlink(p);
}

static const char *schema = "CREATE TABLE t(id INTEGER PRIMARY KEY, a INTEGER, b TEXT, c REAL)";

/* Inserts rows [from, from+n) in transactions of batch rows; returns seconds. */
static double insert(const char *path, long from, long n, int batch)
{
    sqlite3 *db;
    sqlite3_stmt *st;
    check(sqlite3_open(path, &db) == SQLITE_OK, "open");
    sqlite3_busy_timeout(db, 5000);
    sqlite3_exec(db, "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL", NULL, NULL, NULL);
    check(sqlite3_prepare_v2(db, "INSERT INTO t(id, a, b, c) VALUES (?, ?, ?, ?)", -1, &st, NULL) == SQLITE_OK,
          "prepare");
    double t0 = now();
    for (long i = 0; i < n;) {
        sqlite3_exec(db, "BEGIN", NULL, NULL, NULL);
        for (int k = 0; k < batch && i < n; k++, i++) {
            sqlite3_bind_int64(st, 1, from + i);
            sqlite3_bind_int64(st, 2, from + i);
            sqlite3_bind_text(st, 3, "some text value of moderate size", -1, SQLITE_STATIC);
            sqlite3_bind_double(st, 4, (double)(from + i) * 0.5);
            check(sqlite3_step(st) == SQLITE_DONE, "insert");
            sqlite3_reset(st);
        }
        check(sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) == SQLITE_OK, "commit");
    }
    double el = now() - t0;
    sqlite3_finalize(st);
    sqlite3_close(db);
    return el;
}

/* Updates n rows at random keys of [1, rows] in transactions of batch rows,
 * capturing after each; returns the seconds spent capturing. */
static double scattered_updates(const char *path, hl_db *a, long rows, long n, int batch)
{
    sqlite3 *db;
    sqlite3_stmt *st;
    uint64_t x = 88172645463325252u; /* xorshift64: the same keys every run */
    double t_cap = 0;
    check(sqlite3_open(path, &db) == SQLITE_OK, "open");
    sqlite3_busy_timeout(db, 5000);
    sqlite3_exec(db, "PRAGMA synchronous = NORMAL", NULL, NULL, NULL);
    check(sqlite3_prepare_v2(db, "UPDATE t SET a = a + 1, c = ? WHERE id = ?", -1, &st, NULL) == SQLITE_OK, "prepare");
    for (long i = 0; i < n;) {
        sqlite3_exec(db, "BEGIN", NULL, NULL, NULL);
        for (int k = 0; k < batch && i < n; k++, i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            sqlite3_bind_double(st, 1, (double)(x % 1000) / 1000.0);
            sqlite3_bind_int64(st, 2, (int64_t)(1 + x % (uint64_t)rows));
            check(sqlite3_step(st) == SQLITE_DONE, "update");
            sqlite3_reset(st);
        }
        check(sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) == SQLITE_OK, "commit");
        hl_step cap = {.capture = true};
        double t0 = now();
        check(hl_db_step(a, NULL, NULL, &cap) == HL_OK, "capture");
        t_cap += now() - t0;
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
    return t_cap;
}

/* Applies every outbox changeset of a after e->seq to b, one engine step
 * each; e is left holding the last one. Returns seconds (decode excluded);
 * *t_dec grows by the seconds decoding took. */
static double apply_outbox(hl_db *a, hl_db *b, hl_outbox_entry *e, double *t_dec)
{
    double t = 0;
    while (hl_db_outbox_next(a, e->seq, e) == HL_OK) {
        hl_changeset *cs = NULL;
        char err[256];
        double t0 = now();
        check(hl_changeset_decode(e->payload.data, e->payload.len, (e->flags & HL_PART_FLAG_ZSTD) != 0, 512u << 20, &cs,
                                  err, sizeof err) == HL_OK,
              "decode");
        *t_dec += now() - t0;
        hl_apply_result r;
        t0 = now();
        check(hl_db_apply_one(b, cs, e->payload.data, e->payload.len, e->flags, &r) == HL_OK, "apply");
        t += now() - t0;
        hl_changeset_free(cs);
    }
    return t;
}

static hl_db *open_node(const char *path, uint64_t node)
{
    hl_db *d;
    check(hl_db_open(&d, path, node, 65536) == HL_OK, "hl_db_open");
    hl_db_options o = *hl_db_get_options(d);
    o.publish = true;
    o.compress = true;
    o.max_changeset_bytes = 256u << 20;
    hl_db_configure(d, &o);
    check(hl_db_install(d, false, NULL) == HL_OK, "triggers");
    return d;
}

int main(int argc, char **argv)
{
    long rows = argc > 1 ? atol(argv[1]) : 200000;
    int batch = argc > 2 ? atoi(argv[2]) : 1000;
    const char *dir = argc > 3 ? argv[3] : "/tmp";
    char pa[512], pb[512], pc[512];
    snprintf(pa, sizeof pa, "%s/bench_engine_a_%d.db", dir, (int)getpid());
    snprintf(pb, sizeof pb, "%s/bench_engine_b_%d.db", dir, (int)getpid());
    snprintf(pc, sizeof pc, "%s/bench_engine_c_%d.db", dir, (int)getpid());
    hl_db_global_init(); /* as the product does: the application side below shares the process */
    hl_log_setup(HL_LOG_WARN, false, 0);
    for (int i = 0; i < 3; i++) {
        const char *p = i == 0 ? pa : i == 1 ? pb : pc;
        sqlite3 *db;
        rm_db(p);
        check(sqlite3_open(p, &db) == SQLITE_OK && sqlite3_exec(db, schema, NULL, NULL, NULL) == SQLITE_OK, "create");
        sqlite3_close(db);
    }

    /* bare: the same inserts into a database without harmonylite */
    double bare = insert(pc, 1, rows, batch);

    hl_db *a = open_node(pa, 1), *b = open_node(pb, 2);
    double t_ins = insert(pa, 1, rows, batch);

    /* capture as the engine does (one hl_db_step): read and encode under a
     * snapshot, then record clocks, outbox and log deletion in a write
     * transaction (the part that holds the application's write lock); more
     * than a snapshot batch holds is captured as a chain, streaming inside
     * the write transaction (all of it holds the lock) */
    double t_read = 0, t_rec = 0, t_apply = 0, t_dec = 0, t_upd_dec = 0;
    hl_step cap = {.capture = true};
    check(hl_db_step(a, NULL, NULL, &cap) == HL_OK, "capture");
    t_read = (double)cap.read_us / 1e6;
    t_rec = (double)cap.lock_us / 1e6;
    long captured = (long)cap.rows_captured;
    bool streamed = cap.streamed;

    /* apply every outbox changeset to b, one engine step each */
    hl_outbox_entry e;
    hl_outbox_entry_init(&e, 512u << 20);
    t_apply = apply_outbox(a, b, &e, &t_dec);
    check(hl_db_counters(b)->rows_applied == (uint64_t)rows, "all rows applied");

    uint64_t cap0 = hl_db_counters(a)->rows_captured;
    double t_upd_cap = scattered_updates(pa, a, rows, rows / 2, batch);
    uint64_t upd = hl_db_counters(a)->rows_captured - cap0;
    double t_upd_apply = apply_outbox(a, b, &e, &t_upd_dec);
    check(hl_db_counters(b)->rows_applied == (uint64_t)rows + upd, "all updates applied");
    printf("%-34s %12s\n", "step (one core, no NATS)", "rows/s");
    printf("%-34s %12.0f\n", "bare SQLite insert", rows / bare);
    printf("%-34s %12.0f\n", "insert with triggers", rows / t_ins);
    printf("%-34s %12.0f   (%ld rows, one capture%s)\n", "capture -> outbox (zstd)", captured / (t_read + t_rec),
           captured, streamed ? ", streamed as a chain" : "");
    if (!streamed) {
        printf("%-34s %12.0f\n", "  read and encode (no lock)", captured / t_read);
        printf("%-34s %12.0f\n", "  record (holds the write lock)", captured / t_rec);
    }
    printf("%-34s %12.0f\n", "decode (zstd and CBOR)", rows / t_dec);
    printf("%-34s %12.0f\n", "apply (decode excluded)", rows / t_apply);
    printf("%-34s %12.0f   (%llu rows at random keys, %d-row transactions)\n", "scattered updates: capture",
           (double)upd / t_upd_cap, (unsigned long long)upd, batch);
    printf("%-34s %12.0f\n", "scattered updates: decode", (double)upd / t_upd_dec);
    printf("%-34s %12.0f\n", "scattered updates: apply", (double)upd / t_upd_apply);
    hl_outbox_entry_free(&e);
    hl_db_close(a);
    hl_db_close(b);
    rm_db(pa);
    rm_db(pb);
    rm_db(pc);
    return 0;
}
