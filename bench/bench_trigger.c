/*
 * bench_trigger.c - what harmonylite's triggers cost the application.
 *
 * Measures, in one run on the same machine and file system, application
 * insert throughput into the same table without triggers and with
 * harmonylite's capture triggers installed (through the product's own code),
 * for single-row transactions and for 1,000-row transactions (rowids picked
 * by SQLite, and given by the writer), and single-row updates of existing
 * rows (always logged; appends above a table's high-water mark are not).
 * Prints ratios.
 *
 * Then the real deployment: the same writer with harmonylite's engine running
 * beside it on the same database, in a thread of this process doing what the
 * engine thread does with the database (src/engine.c): it waits on the
 * database watcher (inotify and its re-checks), runs hl_db_step to capture
 * into the outbox, and deletes what it captured from the outbox as the
 * publisher does once JetStream acknowledges: in the next step's write
 * transaction, or in one of its own after 200 ms without a step
 * (src/repl/publisher.c, deferred deletes). With HL_BENCH_OWN_DELETES set,
 * in a write transaction of its own right away: the behaviour before.
 * Each case alternates bare and engine runs RUNS times and prints the median
 * ratio with its spread, and per run of the engine side: its write
 * transactions per second and the time they held the write lock. With
 * HL_BENCH_NO_HOLD set in the environment the engine looks at every wake-up
 * (no hold while the writer is busy, src/db/watch.c): the behaviour before it,
 * for a before/after in one build; with HL_BENCH_WAKE_ALL set it holds but
 * still wakes for every file event meanwhile, as before hl_watch_poll_fd.
 * Last, where the writer's time went: milliseconds per second in COMMIT, and
 * the sleeps of its busy handler (the same 1, 2, 5, 10 ... ms as SQLite's
 * default one), bare and with the engine. HL_BENCH_VERBOSE prints the
 * engine's wake-ups, steps and lock time per run.
 *
 * Usage: bench_trigger [seconds-per-case] [dir] [runs]
 */
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#define HL_STR_(x) #x
#define HL_STR(x) HL_STR_(x)
#include "common/hlc.h"
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

/* What the application's writer spent waiting: in its busy handler (the same
 * sleeps as SQLite's default one, sqlite3_busy_timeout) and in COMMIT. */
typedef struct app_stats {
    double busy_s, commit_s;
    long busy_calls;
} app_stats;

static int busy_sleep(void *arg, int count)
{
    static const int delays[] = {1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100};
    static const int totals[] = {0, 1, 3, 8, 18, 33, 53, 78, 103, 128, 178, 228};
    app_stats *a = arg;
    int n = (int)(sizeof delays / sizeof *delays);
    int delay = count < n ? delays[count] : delays[n - 1];
    int prior = count < n ? totals[count] : totals[n - 1] + delay * (count - (n - 1));
    if (prior + delay > 5000)
        return 0;
    double t0 = now();
    usleep((useconds_t)delay * 1000);
    a->busy_s += now() - t0;
    a->busy_calls++;
    return 1;
}

/* What the writer does: appends without a key (SQLite picks the rowid),
 * appends with their key given (the statement may then fail on the key's
 * uniqueness, which makes SQLite keep a statement journal for it once the
 * table has any trigger), or updates of existing rows. */
enum { W_INSERT, W_INSERT_KEYED, W_UPDATE };

/* Writes rows (what) in transactions of batch rows for `seconds`; returns rows/s. */
static double run(const char *path, int batch, int what, double seconds, app_stats *a)
{
    sqlite3 *db;
    sqlite3_stmt *ins;
    if (sqlite3_open(path, &db) != SQLITE_OK)
        die(db, "open");
    app_stats scratch = {0};
    if (!a)
        a = &scratch;
    sqlite3_busy_handler(db, busy_sleep, a);
    sqlite3_exec(db, "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL", NULL, NULL, NULL);
    static const char *const sqls[] = {"INSERT INTO t(a, b, c) VALUES (?1, ?2, ?3)",
                                       "INSERT INTO t(a, b, c, id) VALUES (?1, ?2, ?3, ?4)",
                                       "UPDATE t SET a = ?1, b = ?2, c = ?3 WHERE id = ?4"};
    const char *sql = sqls[what];
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
            if (what == W_UPDATE)
                sqlite3_bind_int64(ins, 4, 1 + (int64_t)((uint64_t)rows * 2654435761u % PREFILL));
            else if (what == W_INSERT_KEYED)
                sqlite3_bind_int64(ins, 4, PREFILL + 1 + rows);
            if (sqlite3_step(ins) != SQLITE_DONE)
                die(db, "insert");
            sqlite3_reset(ins);
            rows++;
        }
        double c0 = now();
        if (sqlite3_exec(db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK)
            die(db, "commit");
        t1 = now();
        a->commit_s += t1 - c0;
    } while (t1 - t0 < seconds);
    sqlite3_finalize(ins);
    sqlite3_close(db);
    return (double)rows / (t1 - t0);
}

/* The engine beside the writer: what src/engine.c does with the database. */
typedef struct engine_side {
    const char *path;
    pthread_t th;
    atomic_bool stop;
    bool no_hold;     /* HL_BENCH_NO_HOLD set: look at every wake-up, as before the busy hold */
    bool own_deletes; /* HL_BENCH_OWN_DELETES set: acknowledged rows deleted in a transaction of their own */
    bool wake_all;    /* HL_BENCH_WAKE_ALL set: wake for every file event during a hold too, as before */
    uint64_t steps, commits, rows, lock_us, read_us, acks, wakeups;
} engine_side;

static void *engine_run(void *arg)
{
    engine_side *e = arg;
    hl_db *d;
    hl_watch *w;
    if (hl_db_open(&d, e->path, 1, 32768) || hl_db_install(d, false, NULL) || hl_watch_open(&w, e->path, 1000)) {
        fprintf(stderr, "bench_trigger: cannot start the engine\n");
        exit(1);
    }
    hl_db_options o = *hl_db_get_options(d);
    o.publish = true;
    o.compress = true;
    hl_db_configure(d, &o);
    hl_outbox_entry ent;
    hl_outbox_entry_init(&ent, 256u << 20);
    uint64_t acked = 0, *done = NULL, done_since = 0;
    size_t ndone = 0, capdone = 0;
    bool want = false;
    while (!atomic_load(&e->stop)) {
        struct pollfd pfd = {.fd = e->no_hold || e->wake_all ? hl_watch_fd(w) : hl_watch_poll_fd(w, hl_mono_ms()),
                             .events = POLLIN};
        int pr = poll(&pfd, 1, hl_watch_timeout(w, hl_mono_ms()) < 50 ? hl_watch_timeout(w, hl_mono_ms()) : 50);
        e->wakeups += pr > 0;
        if (hl_watch_after_poll(w, pr > 0 && (pfd.revents & POLLIN), pr == 0, hl_mono_ms()))
            want = true;
        if (ndone && hl_mono_ms() - done_since >= 200) { /* no step took them: a transaction of their own */
            if (hl_db_begin(d) == HL_OK) {
                for (size_t i = 0; i < ndone; i++)
                    hl_db_outbox_delete(d, done[i]);
                if (hl_db_commit(d) == HL_OK) {
                    ndone = 0;
                    e->acks++;
                }
            }
        }
        if (!want || !hl_db_changed_externally(d))
            continue;
        want = false;
        hl_step s = {.capture = true, .outbox_done = done, .n_outbox_done = ndone};
        if (hl_db_step(d, NULL, NULL, &s)) {
            fprintf(stderr, "bench_trigger: engine step failed\n");
            exit(1);
        }
        e->steps++;
        if (!s.committed)
            continue;
        ndone = 0; /* deleted by that step */
        if (!e->no_hold)
            hl_watch_captured(w, s.rows_captured, hl_mono_ms()); /* as src/engine.c does */
        e->commits++;
        e->rows += s.rows_captured;
        e->lock_us += s.lock_us;
        e->read_us += s.read_us;
        /* JetStream's acknowledgements: remembered for the next step, or
         * (HL_BENCH_OWN_DELETES) deleted in a transaction of their own. */
        bool began = false;
        while (hl_db_outbox_next(d, acked, &ent) == HL_OK) {
            acked = ent.seq;
            if (!e->own_deletes) {
                if (ndone == capdone) {
                    capdone = capdone ? capdone * 2 : 256;
                    if (!(done = realloc(done, capdone * sizeof *done))) {
                        fprintf(stderr, "bench_trigger: out of memory\n");
                        exit(1);
                    }
                }
                if (!ndone)
                    done_since = hl_mono_ms();
                done[ndone++] = ent.seq;
                continue;
            }
            if (!began && hl_db_begin(d) == HL_OK)
                began = true;
            hl_db_outbox_delete(d, ent.seq);
        }
        if (began) {
            hl_db_commit(d);
            e->acks++;
        }
    }
    free(done);
    hl_outbox_entry_free(&ent);
    hl_watch_free(w);
    hl_db_close(d);
    return NULL;
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

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

#define MAX_RUNS 15

static void case_name(char *out, size_t cap, int batch, int what)
{
    snprintf(out, cap, "%s, %d row%s/txn%s", what == W_UPDATE ? "update" : "insert", batch, batch > 1 ? "s" : "",
             what == W_INSERT_KEYED ? ", key" : "");
}

int main(int argc, char **argv)
{
    double secs = argc > 1 ? atof(argv[1]) : 3.0;
    const char *dir = argc > 2 ? argv[2] : "/tmp";
    int runs = argc > 3 ? atoi(argv[3]) : 5;
    if (runs < 1 || runs > MAX_RUNS)
        runs = 5;
    char path[512];
    snprintf(path, sizeof path, "%s/bench_trigger_%d.db", dir, (int)getpid());
    hl_db_global_init(); /* as the product does: the application side below shares the process */
    hl_log_setup(HL_LOG_WARN, false, 0);

#define NCASES 4
    static const int batches[NCASES] = {1, 1000, 1000, 1};
    static const int whats[NCASES] = {W_INSERT, W_INSERT, W_INSERT_KEYED, W_UPDATE};
    char where[NCASES][160];
    printf("triggers only (no engine running):\n");
    printf("%-28s %14s %14s %8s\n", "case", "bare rows/s", "triggers rows/s", "ratio");
    for (size_t i = 0; i < NCASES; i++) {
        /* Alternate bare and trigger runs twice and keep each one's best, so a
         * noisy neighbour hurts both sides alike. */
        double bare = 0, trig = 0;
        for (int rep = 0; rep < 2; rep++) {
            fresh(path, false);
            double b = run(path, batches[i], whats[i], secs, NULL);
            fresh(path, true);
            double t = run(path, batches[i], whats[i], secs, NULL);
            bare = b > bare ? b : bare;
            trig = t > trig ? t : trig;
        }
        char name[64];
        case_name(name, sizeof name, batches[i], whats[i]);
        printf("%-28s %14.0f %14.0f %8.2f\n", name, bare, trig, trig / bare);
    }
    printf("\nwith the engine running beside the writer (median of %d alternating runs, min - max):\n", runs);
    printf("%-28s %14s %14s %18s %12s %12s\n", "case", "bare rows/s", "engine rows/s", "ratio", "engine txn/s",
           "lock ms/s");
    for (size_t i = 0; i < NCASES; i++) {
        double bare[MAX_RUNS], eng[MAX_RUNS], ratio[MAX_RUNS], txns = 0, lock = 0;
        app_stats sb = {0}, se = {0};
        for (int rep = 0; rep < runs; rep++) {
            fresh(path, false);
            bare[rep] = run(path, batches[i], whats[i], secs, &sb);
            fresh(path, true);
            engine_side e = {.path = path,
                             .no_hold = getenv("HL_BENCH_NO_HOLD") != NULL,
                             .own_deletes = getenv("HL_BENCH_OWN_DELETES") != NULL,
                             .wake_all = getenv("HL_BENCH_WAKE_ALL") != NULL};
            if (pthread_create(&e.th, NULL, engine_run, &e)) {
                fprintf(stderr, "bench_trigger: cannot start a thread\n");
                return 1;
            }
            usleep(200000); /* the engine is up and idle */
            uint64_t c0 = e.commits + e.acks, l0 = e.lock_us;
            eng[rep] = run(path, batches[i], whats[i], secs, &se);
            txns += (double)(e.commits + e.acks - c0) / secs; /* read racily: a figure, not a check */
            lock += (double)(e.lock_us - l0) / 1000.0 / secs;
            atomic_store(&e.stop, true);
            pthread_join(e.th, NULL);
            if (getenv("HL_BENCH_VERBOSE"))
                fprintf(
                    stderr,
                    "  engine: %llu wake-ups, %llu steps, %llu captures (%llu rows), %llu outbox deletes, read %llu "
                    "ms, lock %llu ms\n",
                    (unsigned long long)e.wakeups, (unsigned long long)e.steps, (unsigned long long)e.commits,
                    (unsigned long long)e.rows, (unsigned long long)e.acks, (unsigned long long)e.read_us / 1000,
                    (unsigned long long)e.lock_us / 1000);
            ratio[rep] = eng[rep] / bare[rep];
        }
        qsort(bare, (size_t)runs, sizeof *bare, cmp_double);
        qsort(eng, (size_t)runs, sizeof *eng, cmp_double);
        qsort(ratio, (size_t)runs, sizeof *ratio, cmp_double);
        char name[64], r[32];
        case_name(name, sizeof name, batches[i], whats[i]);
        snprintf(r, sizeof r, "%.2f (%.2f - %.2f)", ratio[runs / 2], ratio[0], ratio[runs - 1]);
        printf("%-28s %14.0f %14.0f %18s %12.0f %12.1f\n", name, bare[runs / 2], eng[runs / 2], r, txns / runs,
               lock / runs);
        snprintf(where[i], sizeof where[i], "%-28s %12.1f %12.1f %12.1f %12.1f %12.1f\n", name,
                 sb.commit_s * 1000 / (secs * runs), se.commit_s * 1000 / (secs * runs),
                 (double)sb.busy_calls / (secs * runs), (double)se.busy_calls / (secs * runs),
                 se.busy_s * 1000 / (secs * runs));
    }
    printf("\nwhere the writer's time went (per second of writing, mean of the runs above):\n");
    printf("%-28s %12s %12s %12s %12s %12s\n", "case", "commit ms", "commit ms", "busy waits", "busy waits", "busy ms");
    printf("%-28s %12s %12s %12s %12s %12s\n", "", "bare", "engine", "bare", "engine", "engine");
    for (size_t i = 0; i < NCASES; i++)
        fputs(where[i], stdout);
    fresh(path, false);
    unlink(path);
    return 0;
}
