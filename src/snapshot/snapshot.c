/*
 * snapshot.c - -save-snapshot and -restore (docs/snapshots.md).
 *
 * Memory stays bounded by constants whatever the database size: SQLite
 * writes the copy (VACUUM INTO) through a small page cache, it is compressed
 * and hashed in fixed chunks, and the store streams the compressed file from
 * disk. On
 * restore the download is hashed and decompressed chunk by chunk straight
 * into the file beside the database.
 */
#include "snapshot/snapshot.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <sqlite3.h>
#include <zstd.h>

#include "common/buf.h"
#include "common/hlc.h"
#include "common/log.h"
#include "db/db.h"
#include "snapshot/manifest.h"
#include "snapshot/store.h"

/*
 * harmonylite's own tables as src/db/store.c and triggers.c create them. Only
 * their names are repeated here, in this one place: the snapshot works on a
 * copy of the file with plain SQL and never through the engine's code.
 */
#define T_META HL_PREFIX "meta"           /* node-local identity: dropped but for last_hlc */
#define T_CTL HL_PREFIX "ctl"             /* applying flag: cleared */
#define T_OUTBOX HL_PREFIX "outbox"       /* this node's unacknowledged changesets: emptied */
#define T_CONFLICTS HL_PREFIX "conflicts" /* this node's conflict records: emptied */
#define T_HWM HL_PREFIX "hwm"             /* high-water marks: raised to the last rowid */
#define T_ORIGINS HL_PREFIX "origins"     /* per-origin applied sequence: kept, plus the taker's own */
#define T_SEQ HL_PREFIX "seq"             /* per-stream positions: kept, listed in the manifest */
#define LOG_SUFFIX "_change_log"          /* per-table change logs: dropped (with every trigger) */

#define ZSTD_LEVEL 3
#define ZSTD_WINDOW_LOG 21     /* 2 MiB: what level 3 uses for large inputs */
#define ZSTD_WINDOW_LOG_MAX 23 /* a restore refuses frames wanting more than 8 MiB of window */
#define COPY_CACHE_KIB 2048    /* page cache of the connections that copy and strip */
#define UPLOAD_ATTEMPTS 4      /* tries per upload or download, 1 s, 2 s, 4 s apart */

static hl_status fail(char *err, size_t errlen, hl_status st, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static hl_status fail(char *err, size_t errlen, hl_status st, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return st;
}

static int has_suffix(const char *s, const char *suf)
{
    size_t n = strlen(s), m = strlen(suf);
    return n > m && strcmp(s + n - m, suf) == 0;
}

/* A file name in the directory of path: "<dir>/.<base><tag>XXXXXX", for mkstemp. */
static int temp_beside(const char *path, const char *tag, char *out, size_t cap)
{
    char *a = strdup(path), *b = strdup(path);
    int ok = 0;
    if (a && b) {
        int n = snprintf(out, cap, "%s/.%s%sXXXXXX", dirname(a), basename(b), tag);
        ok = n > 0 && (size_t)n < cap;
    }
    free(a);
    free(b);
    return ok;
}

static hl_status fsync_dir_of(const char *path)
{
    char *a = strdup(path);
    if (!a)
        return HL_ERR_NOMEM;
    int fd = open(dirname(a), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(a);
    if (fd < 0)
        return HL_ERR_IO;
    int rc = fsync(fd);
    close(fd);
    return rc == 0 ? HL_OK : HL_ERR_IO;
}

static hl_status exec_sql(sqlite3 *db, const char *sql, char *err, size_t errlen)
{
    char *msg = NULL;
    int rc = sqlite3_exec(db, sql, NULL, NULL, &msg);
    if (rc == SQLITE_OK)
        return HL_OK;
    snprintf(err, errlen, "snapshot copy: %s", msg ? msg : sqlite3_errstr(rc));
    sqlite3_free(msg);
    return HL_ERR_SQLITE;
}

/* Raises each integer-keyed table's high-water mark up to its last rowid:
 * rows above the mark that the taker had not captured yet are its to send,
 * not the restorer's. */
static void hwm_sql(void *arg, const char *table, const char *int_key)
{
    hl_buf *sql = arg;
    if (!int_key)
        return;
    hl_buf_adds(sql, "UPDATE " T_HWM " SET hwm = max(hwm, coalesce((SELECT max(");
    hl_buf_add_ident(sql, int_key);
    hl_buf_adds(sql, ") FROM ");
    hl_buf_add_ident(sql, table);
    hl_buf_adds(sql, "), 0)) WHERE tbl = ");
    hl_buf_add_sqlstr(sql, table);
    hl_buf_adds(sql, ";\n");
}

/* The schema hash of the replicated tables in db, as hex (src/db/schema.c
 * computes it); with sql, the high-water-mark statements too. */
static hl_status schema_hash_hex(sqlite3 *db, char hex[65], hl_buf *sql)
{
    unsigned char hash[32];
    hl_status st = hl_db_schema_describe(db, hash, sql ? hwm_sql : NULL, sql);
    if (!st) {
        hl_hex(hash, 32, hex);
        hex[64] = 0;
    }
    return st;
}

/* ---- taking one ------------------------------------------------------ */

typedef struct snap_state {
    hl_manifest m;
    size_t cap_streams;
} snap_state;

/* A consistent copy of db_path at copy (an empty file): one read transaction, writers never wait. */
static hl_status copy_db(const char *db_path, const char *copy, char *err, size_t errlen)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    hl_status res = HL_OK;
    struct stat sb;
    if (stat(db_path, &sb) != 0)
        return fail(err, errlen, HL_ERR_IO, "db_path %s: %s", db_path, strerror(errno));
    int rc = sqlite3_open_v2(db_path, &db, SQLITE_OPEN_READONLY, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_busy_timeout(db, 10000);
        char pragma[64];
        snprintf(pragma, sizeof pragma, "PRAGMA cache_size = -%d", COPY_CACHE_KIB);
        rc = sqlite3_exec(db, pragma, NULL, NULL, NULL);
    }
    if (rc == SQLITE_OK)
        rc = sqlite3_prepare_v2(db, "SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = '" T_META "'", -1, &st,
                                NULL);
    if (rc == SQLITE_OK) {
        rc = sqlite3_step(st);
        sqlite3_finalize(st);
        st = NULL;
        if (rc == SQLITE_DONE) {
            res =
                fail(err, errlen, HL_ERR_INVALID,
                     "db_path %s has no harmonylite state: start harmonylite on it before taking a snapshot", db_path);
            goto out;
        }
        rc = rc == SQLITE_ROW ? SQLITE_OK : rc;
    }
    if (rc == SQLITE_OK)
        rc = sqlite3_prepare_v2(db, "VACUUM INTO ?1", -1, &st, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_text(st, 1, copy, -1, SQLITE_STATIC);
        rc = sqlite3_step(st);
        rc = rc == SQLITE_DONE ? SQLITE_OK : rc;
    }
    /* What the copy holds is committed here, not yet on disk under synchronous = NORMAL: had the
     * node lost its power after the upload, nodes restored from the copy would keep rows it never
     * sends. One sync of the WAL (no lock) makes it durable first. */
    if (rc == SQLITE_OK)
        rc = hl_sqlite_sync_wal(db);
    if (rc != SQLITE_OK)
        res = fail(err, errlen, HL_ERR_SQLITE, "copying %s: %s", db_path,
                   db && sqlite3_errcode(db) == rc ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
out:
    sqlite3_finalize(st);
    sqlite3_close(db);
    return res;
}

static int64_t meta_int(sqlite3 *db, const char *key, int64_t dflt)
{
    sqlite3_stmt *st = NULL;
    int64_t v = dflt;
    if (sqlite3_prepare_v2(db, "SELECT value FROM " T_META " WHERE key = ?", -1, &st, NULL) == SQLITE_OK) {
        sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
        if (sqlite3_step(st) == SQLITE_ROW && sqlite3_column_type(st, 0) == SQLITE_INTEGER)
            v = sqlite3_column_int64(st, 0);
    }
    sqlite3_finalize(st);
    return v;
}

/* Appends to sql a DROP for every harmonylite trigger and change log in db:
 * the restoring node creates its own. */
static hl_status add_drops(sqlite3 *db, hl_buf *sql, char *err, size_t errlen)
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(
        db,
        "SELECT type, name FROM sqlite_schema WHERE name LIKE '\\_\\_harmonylite\\_\\_%' ESCAPE '\\' "
        "AND (type = 'trigger' OR (type = 'table' AND name LIKE '%\\_change\\_log' ESCAPE '\\')) "
        "ORDER BY type = 'table'",
        -1, &st, NULL);
    while (rc == SQLITE_OK || rc == SQLITE_ROW ? (rc = sqlite3_step(st)) == SQLITE_ROW : 0) {
        const char *type = (const char *)sqlite3_column_text(st, 0);
        const char *name = (const char *)sqlite3_column_text(st, 1);
        if (strcmp(type, "table") == 0 && !has_suffix(name, LOG_SUFFIX))
            continue;
        hl_buf_adds(sql, strcmp(type, "trigger") == 0 ? "DROP TRIGGER " : "DROP TABLE ");
        hl_buf_add_ident(sql, name);
        hl_buf_adds(sql, ";\n");
    }
    sqlite3_finalize(st);
    if (rc != SQLITE_DONE)
        return fail(err, errlen, HL_ERR_SQLITE, "snapshot copy: %s", sqlite3_errmsg(db));
    return HL_OK;
}

/* Fills the manifest's streams from the copy's stream positions. */
static hl_status read_streams(sqlite3 *db, snap_state *s, char *err, size_t errlen)
{
    sqlite3_stmt *st = NULL;
    hl_status res = HL_OK;
    int rc = sqlite3_prepare_v2(db, "SELECT stream, seq FROM " T_SEQ " ORDER BY stream", -1, &st, NULL);
    while (rc == SQLITE_OK || rc == SQLITE_ROW ? (rc = sqlite3_step(st)) == SQLITE_ROW : 0) {
        const char *name = (const char *)sqlite3_column_text(st, 0);
        if (!name || strlen(name) >= sizeof s->m.streams[0].name || s->m.nstreams >= HL_MANIFEST_MAX_STREAMS)
            continue;
        if (s->m.nstreams == s->cap_streams) {
            size_t cap = s->cap_streams ? s->cap_streams * 2 : 8;
            hl_manifest_stream *nv = realloc(s->m.streams, cap * sizeof *nv);
            if (!nv) {
                res = fail(err, errlen, HL_ERR_NOMEM, "snapshot: out of memory");
                goto out;
            }
            s->m.streams = nv;
            s->cap_streams = cap;
        }
        hl_manifest_stream *ms = &s->m.streams[s->m.nstreams++];
        snprintf(ms->name, sizeof ms->name, "%s", name);
        ms->seq = (uint64_t)sqlite3_column_int64(st, 1);
    }
    if (rc != SQLITE_DONE)
        res = fail(err, errlen, HL_ERR_SQLITE, "snapshot copy: %s", sqlite3_errmsg(db));
out:
    sqlite3_finalize(st);
    return res;
}

/*
 * Turns the copy into a snapshot: removes what belongs to the node that took
 * it (triggers, change logs, outbox, conflicts, identity) and keeps the
 * replicated state (clocks and tombstones, stream positions, per-origin
 * sequences, held changesets). Fills the manifest's node, epoch, hlc, streams
 * and schema hash.
 */
static hl_status strip_copy(const char *copy, snap_state *s, char *err, size_t errlen)
{
    sqlite3 *db = NULL;
    hl_status res = HL_OK;
    hl_buf sql;
    hl_buf_init(&sql, 64u << 20);
    int rc = sqlite3_open_v2(copy, &db, SQLITE_OPEN_READWRITE, NULL);
    if (rc != SQLITE_OK) {
        res = fail(err, errlen, HL_ERR_SQLITE, "opening the copy: %s", db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
        goto out;
    }
    char pragma[64];
    snprintf(pragma, sizeof pragma, "PRAGMA cache_size = -%d", COPY_CACHE_KIB);
    if ((res = exec_sql(db, "PRAGMA journal_mode = DELETE", err, errlen)) || (res = exec_sql(db, pragma, err, errlen)))
        goto out;
    if ((res = schema_hash_hex(db, s->m.schema_hash, &sql))) {
        snprintf(err, errlen, "snapshot copy: reading the schema failed");
        goto out;
    }
    s->m.node = (uint64_t)meta_int(db, "node_id", 0);
    s->m.epoch = (uint64_t)meta_int(db, "epoch", 0);
    int64_t next_seq = meta_int(db, "next_seq", 1);
    s->m.hlc = (uint64_t)meta_int(db, "last_hlc", 0);

    if ((res = exec_sql(db, "BEGIN", err, errlen)))
        goto out;
    if ((res = add_drops(db, &sql, err, errlen)))
        goto rollback;
    hl_buf_adds(&sql, "DELETE FROM " T_OUTBOX ";\nDELETE FROM " T_CONFLICTS ";\nUPDATE " T_CTL " SET applying = 0;\n"
                      "DELETE FROM " T_META " WHERE key <> 'last_hlc';\n");
    /* Everything the taker captured is in the copy, published or not: its own
     * changesets up to next_seq - 1 are applied as far as a restorer goes. */
    if (s->m.node && s->m.epoch && next_seq > 1)
        hl_buf_addf(&sql,
                    "INSERT INTO " T_ORIGINS "(node, epoch, seq) VALUES (%" PRIu64 ", %" PRIu64 ", %" PRId64 ") "
                    "ON CONFLICT DO UPDATE SET seq = max(seq, excluded.seq);\n",
                    s->m.node, s->m.epoch, next_seq - 1);
    if ((res = hl_buf_status(&sql))) {
        snprintf(err, errlen, "snapshot copy: out of memory");
        goto rollback;
    }
    if ((res = exec_sql(db, hl_buf_str(&sql), err, errlen)) || (res = read_streams(db, s, err, errlen)) ||
        (res = exec_sql(db, "COMMIT", err, errlen)))
        goto rollback;
    goto out;
rollback:
    sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
out:
    if (db && sqlite3_close(db) != SQLITE_OK && !res)
        res = fail(err, errlen, HL_ERR_SQLITE, "closing the copy failed");
    hl_buf_free(&sql);
    return res;
}

/* Compresses the file at in into the open file out; fills size and sha256 of what was written. */
static hl_status compress_file(const char *in, int out, uint64_t *size, char sha_hex[65], char *err, size_t errlen)
{
    hl_status res = HL_OK;
    size_t ilen = ZSTD_CStreamInSize(), olen = ZSTD_CStreamOutSize();
    char *ibuf = malloc(ilen), *obuf = malloc(olen);
    ZSTD_CCtx *z = ZSTD_createCCtx();
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    int fd = open(in, O_RDONLY | O_CLOEXEC);
    *size = 0;
    if (!ibuf || !obuf || !z || !md) {
        res = fail(err, errlen, HL_ERR_NOMEM, "snapshot: out of memory");
        goto out;
    }
    if (fd < 0) {
        res = fail(err, errlen, HL_ERR_IO, "snapshot: opening the copy: %s", strerror(errno));
        goto out;
    }
    struct stat sb;
    uint64_t done = 0;
    hl_progress pr;
    hl_progress_start(&pr, "compression", "of the copy", fstat(fd, &sb) == 0 ? (uint64_t)sb.st_size : 0);
    if (ZSTD_isError(ZSTD_CCtx_setParameter(z, ZSTD_c_compressionLevel, ZSTD_LEVEL)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(z, ZSTD_c_windowLog, ZSTD_WINDOW_LOG)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(z, ZSTD_c_checksumFlag, 1)) ||
        EVP_DigestInit_ex(md, EVP_sha256(), NULL) != 1) {
        res = fail(err, errlen, HL_ERR_INTERNAL, "snapshot: compressor setup failed");
        goto out;
    }
    for (;;) {
        ssize_t r = read(fd, ibuf, ilen);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            res = fail(err, errlen, HL_ERR_IO, "snapshot: reading the copy: %s", strerror(errno));
            goto out;
        }
        done += (uint64_t)r;
        hl_progress_update(&pr, done);
        ZSTD_EndDirective mode = r == 0 ? ZSTD_e_end : ZSTD_e_continue;
        ZSTD_inBuffer zin = {ibuf, (size_t)r, 0};
        size_t left;
        do {
            ZSTD_outBuffer zout = {obuf, olen, 0};
            left = ZSTD_compressStream2(z, &zout, &zin, mode);
            if (ZSTD_isError(left)) {
                res = fail(err, errlen, HL_ERR_INTERNAL, "snapshot: compression: %s", ZSTD_getErrorName(left));
                goto out;
            }
            if (zout.pos) {
                if (hl_store_write_all(out, obuf, zout.pos)) {
                    res = fail(err, errlen, HL_ERR_IO, "snapshot: writing the compressed copy: %s", strerror(errno));
                    goto out;
                }
                EVP_DigestUpdate(md, obuf, zout.pos);
                *size += zout.pos;
            }
        } while (mode == ZSTD_e_end ? left != 0 : zin.pos < zin.size);
        if (r == 0)
            break;
    }
    unsigned char digest[32];
    unsigned int dl = 0;
    EVP_DigestFinal_ex(md, digest, &dl);
    hl_hex(digest, 32, sha_hex);
    sha_hex[64] = 0;
    if (fsync(out) != 0)
        res = fail(err, errlen, HL_ERR_IO, "snapshot: fsync of the compressed copy: %s", strerror(errno));
out:
    if (fd >= 0)
        close(fd);
    EVP_MD_CTX_free(md);
    ZSTD_freeCCtx(z);
    free(ibuf);
    free(obuf);
    return res;
}

static hl_status put_retrying(hl_store *store, const char *name, const hl_store_src *src, char *err, size_t errlen)
{
    hl_status st = HL_OK;
    for (int attempt = 1; attempt <= UPLOAD_ATTEMPTS; attempt++) {
        st = store->ops->put(store, name, src, err, errlen);
        if (!st || st == HL_ERR_INVALID || st == HL_ERR_CONFIG || hl_store_cancelled())
            return st;
        if (attempt < UPLOAD_ATTEMPTS) {
            hl_logf(HL_LOG_WARN, "snapshot upload of %s failed (attempt %d of %d), retrying in %d s: %s", name, attempt,
                    UPLOAD_ATTEMPTS, 1 << (attempt - 1), err);
            sleep(1u << (attempt - 1));
        }
    }
    return st;
}

/* Keeps the newest keep manifests with their objects; removes older ones and objects without a manifest older than
 * those. */
static void prune(hl_store *store, int keep)
{
    char err[512];
    hl_store_names l;
    if (store->ops->list(store, &l, err, sizeof err)) {
        hl_logf(HL_LOG_WARN, "snapshot: listing %s to remove old snapshots failed: %s", store->where, err);
        return;
    }
    size_t nman = 0;
    for (size_t i = 0; i < l.n; i++)
        nman += has_suffix(l.v[i], HL_SNAPSHOT_MANIFEST_SUFFIX);
    if (nman > 0) {
        size_t drop = nman > (size_t)keep ? nman - (size_t)keep : 0, seen = 0;
        const char *oldest_kept = NULL;
        for (size_t i = 0; i < l.n; i++) {
            if (!has_suffix(l.v[i], HL_SNAPSHOT_MANIFEST_SUFFIX))
                continue;
            if (seen++ == drop) {
                oldest_kept = l.v[i];
                break;
            }
        }
        /* Names sort by creation time: every snapshot older than the oldest kept goes, with objects
         * left without a manifest by failed uploads; manifests first, so that no reader finds a
         * manifest whose object is gone. */
        size_t keep_base = strlen(oldest_kept) - strlen(HL_SNAPSHOT_MANIFEST_SUFFIX);
        for (int pass = 0; pass < 2; pass++)
            for (size_t i = 0; i < l.n; i++) {
                int is_man = has_suffix(l.v[i], HL_SNAPSHOT_MANIFEST_SUFFIX);
                int is_obj = has_suffix(l.v[i], HL_SNAPSHOT_OBJECT_SUFFIX);
                if ((pass == 0 ? !is_man : !is_obj))
                    continue;
                size_t base = strlen(l.v[i]) - strlen(is_man ? HL_SNAPSHOT_MANIFEST_SUFFIX : HL_SNAPSHOT_OBJECT_SUFFIX);
                size_t cmpn = base < keep_base ? base : keep_base;
                int c = strncmp(l.v[i], oldest_kept, cmpn);
                if (c > 0 || (c == 0 && base >= keep_base))
                    continue; /* as new as the oldest kept, or newer */
                if (store->ops->del(store, l.v[i], err, sizeof err))
                    hl_logf(HL_LOG_WARN, "snapshot: removing %s failed: %s", l.v[i], err);
                else
                    hl_logf(HL_LOG_INFO, "snapshot: removed old %s", l.v[i]);
            }
    }
    hl_store_names_free(&l);
}

/* Creates the two temporary files beside db_path: copy (closed, for the
 * database copy) and zpath (open as *zfd, for the compressed object). A name
 * not created is left empty, so the caller removes only what exists. */
static hl_status make_temps(const char *db_path, char *copy, char *zpath, size_t cap, int *zfd, char *err,
                            size_t errlen)
{
    if (!temp_beside(db_path, ".snapshot-", copy, cap) || !temp_beside(db_path, ".snapshot-zst-", zpath, cap)) {
        copy[0] = zpath[0] = 0;
        return fail(err, errlen, HL_ERR_INVALID, "db_path: too long");
    }
    int cfd = mkostemp(copy, O_CLOEXEC);
    if (cfd < 0) {
        copy[0] = zpath[0] = 0;
        return fail(err, errlen, HL_ERR_IO, "snapshot: cannot create a file beside %s: %s", db_path, strerror(errno));
    }
    close(cfd);
    *zfd = mkostemp(zpath, O_CLOEXEC);
    if (*zfd < 0) {
        zpath[0] = 0;
        return fail(err, errlen, HL_ERR_IO, "snapshot: cannot create a file beside %s: %s", db_path, strerror(errno));
    }
    return HL_OK;
}

/* Copies the database to copy, strips it and compresses it into zfd, filling
 * the manifest's content fields. */
static hl_status make_object(const char *db_path, const char *copy, int zfd, snap_state *s, char *err, size_t errlen)
{
    hl_status res;
    s->m.created_ms = hl_now_ms();
    if ((res = copy_db(db_path, copy, err, errlen)) || (res = strip_copy(copy, s, err, errlen)))
        return res;
    struct stat sb;
    if (stat(copy, &sb) != 0)
        return fail(err, errlen, HL_ERR_IO, "snapshot: %s", strerror(errno));
    s->m.db_size = (uint64_t)sb.st_size;
    return compress_file(copy, zfd, &s->m.size, s->m.sha256, err, errlen);
}

/* A unique name that sorts by creation time: snap-<UTC time>-n<node>-<random>,
 * as the object's (name) and the manifest's (mname); fills the manifest's
 * naming fields. */
static void name_snapshot(const hl_config *c, snap_state *s, char name[HL_SNAPSHOT_NAME_MAX + 1],
                          char mname[HL_SNAPSHOT_NAME_MAX + 1])
{
    char base[128];
    uint32_t rnd = 0;
    if (getrandom(&rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd)
        rnd = (uint32_t)(hl_mono_ms() ^ (uint64_t)getpid());
    time_t secs = (time_t)(s->m.created_ms / 1000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    snprintf(base, sizeof base, "snap-%04d%02d%02dT%02d%02d%02d%03dZ-n%" PRIu64 "-%08x", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(s->m.created_ms % 1000),
             s->m.node ? s->m.node : c->node_id, rnd);
    snprintf(name, HL_SNAPSHOT_NAME_MAX + 1, "%s%s", base, HL_SNAPSHOT_OBJECT_SUFFIX);
    snprintf(mname, HL_SNAPSHOT_NAME_MAX + 1, "%s%s", base, HL_SNAPSHOT_MANIFEST_SUFFIX);
    snprintf(s->m.object, sizeof s->m.object, "%s", name);
    snprintf(s->m.version, sizeof s->m.version, "%s", HL_VERSION);
    if (!s->m.node)
        s->m.node = c->node_id;
    s->m.format = HL_MANIFEST_FORMAT;
}

/* The object first, the manifest last: a manifest names a complete object.
 * An object whose manifest could not be stored is removed again. */
static hl_status upload(hl_store *store, const char *name, const char *mname, int zfd, const hl_manifest *m, char *err,
                        size_t errlen)
{
    hl_status res;
    hl_store_src src = {.fd = zfd, .mem = NULL, .size = m->size};
    if ((res = put_retrying(store, name, &src, err, errlen)))
        return res;
    char *json = hl_manifest_to_json(m);
    if (!json)
        return fail(err, errlen, HL_ERR_NOMEM, "snapshot: out of memory");
    hl_store_src msrc = {.fd = -1, .mem = json, .size = strlen(json)};
    if ((res = put_retrying(store, mname, &msrc, err, errlen))) {
        char e2[256];
        store->ops->del(store, name, e2, sizeof e2);
    }
    free(json);
    return res;
}

static hl_status save(const hl_config *c, hl_manifest *out, char *mname_out, char *where, size_t wlen, char *err,
                      size_t errlen)
{
    hl_status res;
    hl_store *store = NULL;
    snap_state s;
    char copy[4096] = "", zpath[4096] = "", name[HL_SNAPSHOT_NAME_MAX + 1], mname[HL_SNAPSHOT_NAME_MAX + 1];
    int zfd = -1;
    memset(&s, 0, sizeof s);
    uint64_t t0 = hl_mono_ms();

    if ((res = hl_store_open(&store, c, err, errlen)) ||
        (res = make_temps(c->db_path, copy, zpath, sizeof copy, &zfd, err, errlen)) ||
        (res = make_object(c->db_path, copy, zfd, &s, err, errlen)))
        goto out;
    unlink(copy);
    copy[0] = 0;
    name_snapshot(c, &s, name, mname);
    if ((res = upload(store, name, mname, zfd, &s.m, err, errlen)))
        goto out;
    uint64_t ms = hl_mono_ms() - t0;
    hl_logf(HL_LOG_INFO,
            "snapshot saved: %s in %s (database %" PRIu64 " bytes, compressed %" PRIu64 " bytes, %" PRIu64 " ms)",
            mname, store->where, s.m.db_size, s.m.size, ms);
    snprintf(where, wlen, "%s%s", store->where, mname);
    prune(store, c->snapshot.keep > 0 ? c->snapshot.keep : 3);
    if (out) {
        *out = s.m;
        memset(&s.m, 0, sizeof s.m);
        snprintf(mname_out, HL_SNAPSHOT_NAME_MAX + 1, "%s", mname);
    }
out:
    if (zfd >= 0)
        close(zfd);
    if (copy[0])
        unlink(copy);
    if (zpath[0])
        unlink(zpath);
    hl_manifest_free(&s.m);
    hl_store_close(store);
    if (!out)
        hl_store_curl_cleanup(); /* a running node keeps libcurl's global state: other threads use OpenSSL */
    return res;
}

hl_status hl_snapshot_save(const hl_config *c, char *where, size_t wlen, char *err, size_t errlen)
{
    return save(c, NULL, NULL, where, wlen, err, errlen);
}

hl_status hl_snapshot_save_manifest(const hl_config *c, hl_manifest *m, char mname[HL_SNAPSHOT_NAME_MAX + 1],
                                    char *where, size_t wlen, char *err, size_t errlen)
{
    memset(m, 0, sizeof *m);
    return save(c, m, mname, where, wlen, err, errlen);
}

/* ---- restoring one --------------------------------------------------- */

/* 1: the database at path has data (or is not a database at all), 0: missing or empty. */
static int db_has_data(const char *path)
{
    struct stat sb, wb;
    char wal[4200];
    snprintf(wal, sizeof wal, "%s-wal", path);
    /* A -wal file with frames can hold the whole database even when the main file is missing or
     * empty (nothing checkpointed yet): that is data, not an empty database. */
    int wal_frames = stat(wal, &wb) == 0 && wb.st_size > 0;
    if (stat(path, &sb) != 0)
        return errno == ENOENT ? wal_frames : 1;
    if (sb.st_size == 0 && !wal_frames)
        return 0;
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    int has = 1;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
        sqlite3_prepare_v2(db, "SELECT count(*) FROM sqlite_schema", -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        has = sqlite3_column_int64(st, 0) > 0;
    sqlite3_finalize(st);
    sqlite3_close(db);
    return has;
}

/* Collects a manifest (bounded by HL_MANIFEST_MAX_BYTES). */
static hl_status sink_buf(void *ctx, const void *data, size_t n)
{
    return hl_buf_add(ctx, data, n);
}

typedef struct restore_sink {
    EVP_MD_CTX *md;
    ZSTD_DCtx *z;
    int fd;
    uint64_t in, out, max_out;
    size_t last; /* ZSTD_decompressStream's last return: 0 at the end of a frame */
    char *obuf;
    size_t olen;
    char msg[256];
} restore_sink;

static hl_status sink_restore(void *ctx, const void *data, size_t n)
{
    restore_sink *r = ctx;
    EVP_DigestUpdate(r->md, data, n);
    r->in += n;
    ZSTD_inBuffer zin = {data, n, 0};
    while (zin.pos < zin.size) {
        ZSTD_outBuffer zout = {r->obuf, r->olen, 0};
        r->last = ZSTD_decompressStream(r->z, &zout, &zin);
        if (ZSTD_isError(r->last)) {
            snprintf(r->msg, sizeof r->msg, "decompression failed: %s", ZSTD_getErrorName(r->last));
            return HL_ERR_DECODE;
        }
        if (zout.pos > r->max_out - r->out) {
            snprintf(r->msg, sizeof r->msg, "decompresses to more than the %" PRIu64 " bytes of its manifest",
                     r->max_out);
            return HL_ERR_TOO_LARGE;
        }
        if (zout.pos && hl_store_write_all(r->fd, r->obuf, zout.pos)) {
            snprintf(r->msg, sizeof r->msg, "writing beside the database: %s", strerror(errno));
            return HL_ERR_IO;
        }
        r->out += zout.pos;
    }
    return HL_OK;
}

/* Checks the file at path as SQLite sees it: integrity_check and the schema hash. */
static hl_status check_db(const char *path, const hl_manifest *m, char *why, size_t whylen)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    hl_status res = HL_ERR_DECODE;
    char hex[65];
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(db, "PRAGMA integrity_check(1)", -1, &st, NULL) != SQLITE_OK ||
        sqlite3_step(st) != SQLITE_ROW) {
        snprintf(why, whylen, "not a readable SQLite database: %s", db ? sqlite3_errmsg(db) : "cannot open");
        goto out;
    }
    const char *ok = (const char *)sqlite3_column_text(st, 0);
    if (!ok || strcmp(ok, "ok") != 0) {
        snprintf(why, whylen, "integrity_check failed: %.120s", ok ? ok : "(null)");
        goto out;
    }
    sqlite3_finalize(st);
    st = NULL;
    if (schema_hash_hex(db, hex, NULL)) {
        snprintf(why, whylen, "its schema cannot be read");
        goto out;
    }
    if (strcmp(hex, m->schema_hash) != 0) {
        snprintf(why, whylen, "its schema hash %.16s... differs from the manifest's %.16s...", hex, m->schema_hash);
        goto out;
    }
    res = HL_OK;
out:
    sqlite3_finalize(st);
    sqlite3_close(db);
    return res;
}

/*
 * Puts the verified file in WAL mode, as the database it replaces was (a snapshot is stored in
 * rollback-journal mode): the application may open it before harmonylite does, and switching
 * later needs the file to itself. A clean close leaves no -wal file behind.
 */
static hl_status wal_mode(const char *path, int fd, char *why, size_t whylen)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    hl_status res = HL_ERR_SQLITE;
    const char *mode = NULL;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL) == SQLITE_OK &&
        sqlite3_prepare_v2(db, "PRAGMA journal_mode = WAL", -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW)
        mode = (const char *)sqlite3_column_text(st, 0);
    if (mode && strcmp(mode, "wal") == 0)
        res = HL_OK;
    else
        snprintf(why, whylen, "cannot switch it to WAL mode: %s", db ? sqlite3_errmsg(db) : "cannot open");
    sqlite3_finalize(st);
    if (sqlite3_close(db) != SQLITE_OK && !res) {
        res = HL_ERR_SQLITE;
        snprintf(why, whylen, "closing it failed");
    }
    if (!res && fsync(fd) != 0) {
        res = HL_ERR_IO;
        snprintf(why, whylen, "fsync beside the database: %s", strerror(errno));
    }
    return res;
}

/* Downloads and verifies one snapshot into tmp (an open, empty file). */
/* Reads, parses and checks the manifest mname: it must name its own object
 * and its database must fit on the volume of fd. */
static hl_status read_manifest(hl_store *store, const char *mname, int fd, hl_manifest *m, char *why, size_t whylen)
{
    hl_buf mb;
    char err[512];
    hl_buf_init(&mb, HL_MANIFEST_MAX_BYTES);
    hl_status res = store->ops->get(store, mname, HL_MANIFEST_MAX_BYTES, sink_buf, &mb, err, sizeof err);
    if (res) {
        snprintf(why, whylen, "manifest unreadable: %s", res == HL_ERR_NOMEM ? "larger than 1 MiB" : err);
        goto out;
    }
    if ((res = hl_manifest_parse(m, (const char *)mb.data, mb.len, err, sizeof err))) {
        snprintf(why, whylen, "%s", err);
        goto out;
    }
    size_t bl = strlen(mname) - strlen(HL_SNAPSHOT_MANIFEST_SUFFIX);
    if (strncmp(m->object, mname, bl) != 0 || strcmp(m->object + bl, HL_SNAPSHOT_OBJECT_SUFFIX) != 0) {
        res = HL_ERR_DECODE;
        snprintf(why, whylen, "manifest names object \"%s\", not %.*s%s", m->object, (int)bl, mname,
                 HL_SNAPSHOT_OBJECT_SUFFIX);
        goto out;
    }
    /* The sizes are the manifest's word: never let them fill the volume the database lives on. */
    struct statvfs vfs;
    if (fstatvfs(fd, &vfs) == 0) {
        uint64_t avail = (uint64_t)vfs.f_bavail * (uint64_t)vfs.f_frsize;
        if (m->db_size > avail) {
            res = HL_ERR_TOO_LARGE;
            snprintf(why, whylen, "its database needs %" PRIu64 " bytes beside db_path, only %" PRIu64 " are free",
                     m->db_size, avail);
        }
    }
out:
    hl_buf_free(&mb);
    return res;
}

/* The object as received must be what its manifest says: size, SHA-256, whole
 * zstd frames, decompressed size. */
static hl_status check_object(restore_sink *r, const hl_manifest *m, char *why, size_t whylen)
{
    unsigned char digest[32];
    char hex[65];
    unsigned int dl = 0;
    EVP_DigestFinal_ex(r->md, digest, &dl);
    hl_hex(digest, 32, hex);
    hex[64] = 0;
    if (r->in != m->size)
        snprintf(why, whylen, "object %s has %" PRIu64 " bytes, its manifest says %" PRIu64, m->object, r->in, m->size);
    else if (strcmp(hex, m->sha256) != 0)
        snprintf(why, whylen, "object %s has SHA-256 %.16s..., its manifest says %.16s...", m->object, hex, m->sha256);
    else if (r->last != 0)
        snprintf(why, whylen, "object %s: compressed data ends in the middle of a frame", m->object);
    else if (r->out != m->db_size)
        snprintf(why, whylen, "object %s decompresses to %" PRIu64 " bytes, its manifest says %" PRIu64, m->object,
                 r->out, m->db_size);
    else
        return HL_OK;
    return HL_ERR_DECODE;
}

/* Downloads the snapshot of manifest mname into fd (the file tmp) and checks
 * it end to end: manifest, size, SHA-256, zstd frames, database. m receives
 * the manifest; why says what was wrong. HL_ERR_IO is a transfer worth retrying. */
static hl_status fetch_one(hl_store *store, const char *mname, const char *tmp, int fd, hl_manifest *m, char *why,
                           size_t whylen)
{
    char err[512];
    hl_status res;
    restore_sink r;
    memset(&r, 0, sizeof r);
    if ((res = read_manifest(store, mname, fd, m, why, whylen)))
        return res;
    r.md = EVP_MD_CTX_new();
    r.z = ZSTD_createDCtx();
    r.olen = ZSTD_DStreamOutSize();
    r.obuf = malloc(r.olen);
    r.fd = fd;
    r.max_out = m->db_size;
    if (!r.md || !r.z || !r.obuf || EVP_DigestInit_ex(r.md, EVP_sha256(), NULL) != 1 ||
        ZSTD_isError(ZSTD_DCtx_setParameter(r.z, ZSTD_d_windowLogMax, ZSTD_WINDOW_LOG_MAX))) {
        res = HL_ERR_NOMEM;
        snprintf(why, whylen, "out of memory");
        goto out;
    }
    r.last = 1;
    res = store->ops->get(store, m->object, m->size, sink_restore, &r, err, sizeof err);
    if (res) {
        snprintf(why, whylen, "object %s: %s", m->object, r.msg[0] ? r.msg : err);
        goto out;
    }
    if ((res = check_object(&r, m, why, whylen)))
        goto out;
    if (fsync(fd) != 0) {
        res = HL_ERR_IO;
        snprintf(why, whylen, "fsync beside the database: %s", strerror(errno));
        goto out;
    }
    if ((res = check_db(tmp, m, why, whylen)))
        goto out;
    res = wal_mode(tmp, fd, why, whylen);
out:
    EVP_MD_CTX_free(r.md);
    ZSTD_freeDCtx(r.z);
    free(r.obuf);
    return res;
}

static int cmp_desc(const void *a, const void *b)
{
    return strcmp(*(char *const *)b, *(char *const *)a);
}

/* Lists the store, trying again after a failed transfer. */
static hl_status list_retrying(hl_store *store, hl_store_names *l, char *err, size_t errlen)
{
    for (int attempt = 1;; attempt++) {
        hl_status res = store->ops->list(store, l, err, errlen);
        if (res != HL_ERR_IO || attempt == UPLOAD_ATTEMPTS)
            return res;
        hl_logf(HL_LOG_WARN, "restore: listing %s failed (attempt %d of %d), retrying in %d s: %s", store->where,
                attempt, UPLOAD_ATTEMPTS, 1 << (attempt - 1), err);
        sleep(1u << (attempt - 1));
    }
}

/* fetch_one into fd; a transfer that failed on the way (not a snapshot that
 * does not verify) is tried again from an emptied file. */
static hl_status fetch_retrying(hl_store *store, const char *mname, const char *tmp, int fd, hl_manifest *m, char *why,
                                size_t whylen)
{
    for (int attempt = 1;; attempt++) {
        hl_status res = fetch_one(store, mname, tmp, fd, m, why, whylen);
        if (res != HL_ERR_IO || attempt == UPLOAD_ATTEMPTS)
            return res;
        hl_logf(HL_LOG_WARN, "restore: reading %s failed (attempt %d of %d), retrying in %d s: %s", mname, attempt,
                UPLOAD_ATTEMPTS, 1 << (attempt - 1), why);
        sleep(1u << (attempt - 1));
        hl_manifest_free(m);
        if (ftruncate(fd, 0) != 0 || lseek(fd, 0, SEEK_SET) != 0) {
            snprintf(why, whylen, "cannot reuse the file beside the database: %s", strerror(errno));
            return res;
        }
    }
}

/* Restores this database file has had: meta "restores" of the file at path,
 * 0 when it has none (or is no harmonylite database). */
static int64_t restores_of(const char *path)
{
    sqlite3 *db = NULL;
    int64_t n = 0;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK)
        n = meta_int(db, "restores", 0);
    sqlite3_close(db);
    return n > 0 ? n : 0;
}

/*
 * Records in the verified file tmp that it comes from a restore (meta
 * "restores", "restored_at_ms" and "restored_from"): the engine shows them
 * (harmonylite_restores_total), so a restore an init container did
 * is visible where the node is watched. Closed cleanly (no -wal left), synced.
 */
static hl_status mark_restored(const char *tmp, int fd, const char *mname, int64_t count, char *err, size_t errlen)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_open_v2(tmp, &db, SQLITE_OPEN_READWRITE, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_prepare_v2(db,
                                "INSERT OR REPLACE INTO " T_META "(key, value) VALUES ('restores', ?1), "
                                "('restored_at_ms', ?2), ('restored_from', ?3)",
                                -1, &st, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_int64(st, 1, count);
        sqlite3_bind_int64(st, 2, (sqlite3_int64)hl_now_ms());
        sqlite3_bind_text(st, 3, mname, -1, SQLITE_STATIC);
        rc = sqlite3_step(st) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
    }
    hl_status res = rc == SQLITE_OK ? HL_OK
                                    : fail(err, errlen, HL_ERR_SQLITE, "cannot record the restore in %s: %s", tmp,
                                           db ? sqlite3_errmsg(db) : "cannot open");
    sqlite3_finalize(st);
    if (sqlite3_close(db) != SQLITE_OK && !res)
        res = fail(err, errlen, HL_ERR_SQLITE, "closing %s failed", tmp);
    if (!res && fsync(fd) != 0)
        res = fail(err, errlen, HL_ERR_IO, "fsync beside the database: %s", strerror(errno));
    return res;
}

/* Replaces db_path with the verified file tmp (emptied once it is renamed). */
static hl_status put_in_place(const char *db_path, char *tmp, char *err, size_t errlen)
{
    /* A -wal, -shm or -journal beside the database belongs to the file
     * being replaced: SQLite would apply it to the new one. */
    static const char *const sidecar[] = {"-wal", "-shm", "-journal"};
    for (size_t k = 0; k < 3; k++) {
        char p[4200];
        snprintf(p, sizeof p, "%s%s", db_path, sidecar[k]);
        if (unlink(p) != 0 && errno != ENOENT)
            return fail(err, errlen, HL_ERR_IO, "removing %s: %s", p, strerror(errno));
    }
    if (rename(tmp, db_path) != 0)
        return fail(err, errlen, HL_ERR_IO, "renaming the restored file to %s: %s", db_path, strerror(errno));
    tmp[0] = 0;
    if (fsync_dir_of(db_path))
        return fail(err, errlen, HL_ERR_IO, "fsync of the directory of %s: %s", db_path, strerror(errno));
    return HL_OK;
}

hl_status hl_snapshot_restore(const hl_config *c, bool force, hl_restore_result *result, char *info, size_t infolen,
                              char *err, size_t errlen)
{
    hl_status res;
    hl_store *store = NULL;
    hl_store_names l = {0};
    char tmp[4096] = "";
    size_t tried = 0;
    *result = HL_RESTORE_NO_SNAPSHOT;
    info[0] = 0;

    int has = db_has_data(c->db_path);
    if (has && !force) {
        *result = HL_RESTORE_HAS_DATA;
        snprintf(info, infolen, "%s has data: left as it is, no restore (-force replaces it)", c->db_path);
        return HL_OK;
    }
    int64_t prior = has ? restores_of(c->db_path) : 0;
    if ((res = hl_store_open(&store, c, err, errlen)) || (res = list_retrying(store, &l, err, errlen)))
        goto out;
    if (l.n)
        qsort(l.v, l.n, sizeof *l.v, cmp_desc);
    if (!temp_beside(c->db_path, ".restore-", tmp, sizeof tmp)) {
        res = fail(err, errlen, HL_ERR_INVALID, "db_path: too long");
        tmp[0] = 0;
        goto out;
    }
    char pattern[4096];
    snprintf(pattern, sizeof pattern, "%s", tmp);
    tmp[0] = 0;
    for (size_t i = 0; i < l.n; i++) {
        if (!has_suffix(l.v[i], HL_SNAPSHOT_MANIFEST_SUFFIX))
            continue;
        tried++;
        snprintf(tmp, sizeof tmp, "%s", pattern);
        int fd = mkostemp(tmp, O_CLOEXEC);
        if (fd >= 0)
            fchmod(fd, hl_store_created_mode());
        if (fd < 0) {
            tmp[0] = 0;
            res = fail(err, errlen, HL_ERR_IO, "cannot create a file beside %s: %s", c->db_path, strerror(errno));
            goto out;
        }
        hl_manifest m;
        char why[512] = "";
        memset(&m, 0, sizeof m);
        hl_log(HL_LOG_INFO, "restore: trying snapshot", "manifest", l.v[i], "store", store->where, NULL);
        res = fetch_retrying(store, l.v[i], tmp, fd, &m, why, sizeof why);
        if (!res && (res = mark_restored(tmp, fd, l.v[i], prior + 1, err, errlen))) {
            close(fd);
            hl_manifest_free(&m);
            goto out;
        }
        close(fd);
        if (res) {
            hl_log(HL_LOG_ERROR, "restore: snapshot refused; trying the next older one", "manifest", l.v[i], "reason",
                   why, NULL);
            hl_manifest_free(&m);
            unlink(tmp);
            tmp[0] = 0;
            continue;
        }
        res = put_in_place(c->db_path, tmp, err, errlen);
        if (!res) {
            *result = HL_RESTORE_DONE;
            snprintf(info, infolen, "restored %s from %s (taken by node %" PRIu64 ", %" PRIu64 " bytes) into %s",
                     l.v[i], store->where, m.node, m.db_size, c->db_path);
        }
        hl_manifest_free(&m);
        goto out;
    }
    if (tried) {
        res = fail(err, errlen, HL_ERR_DECODE,
                   "none of the %zu snapshots in %s verifies (each reason is logged above); nothing restored", tried,
                   store->where);
        goto out;
    }
    snprintf(info, infolen, "no snapshot in %s: nothing restored, starting empty", store->where);
    res = HL_OK;
out:
    if (tmp[0])
        unlink(tmp);
    hl_store_names_free(&l);
    hl_store_close(store);
    hl_store_curl_cleanup();
    return res;
}

/* True when every stream in need is in m at or past its needed position. */
static bool covers(const hl_manifest *m, int n, char *const *streams, const uint64_t *need, char *why, size_t whylen)
{
    for (int i = 0; i < n; i++) {
        if (!need[i])
            continue;
        uint64_t have = 0;
        for (size_t k = 0; k < m->nstreams; k++)
            if (strcmp(m->streams[k].name, streams[i]) == 0)
                have = m->streams[k].seq;
        if (have < need[i]) {
            snprintf(why, whylen, "reaches stream %s only up to %" PRIu64 ", not %" PRIu64, streams[i], have, need[i]);
            return false;
        }
    }
    return true;
}

hl_status hl_snapshot_fetch_covering(const hl_config *c, int n, char *const *streams, const uint64_t *need,
                                     const volatile int *stop, char *path, size_t pathlen, char *info, size_t infolen,
                                     char *err, size_t errlen)
{
    hl_status res;
    hl_store *store = NULL;
    hl_store_names l = {0};
    char tmp[4096] = "", pattern[4096];
    size_t tried = 0, uncovered = 0;
    char last_why[512] = "";
    path[0] = info[0] = 0;
    if ((res = hl_store_open(&store, c, err, errlen)) || (res = list_retrying(store, &l, err, errlen)))
        goto out;
    if (l.n)
        qsort(l.v, l.n, sizeof *l.v, cmp_desc);
    if (!temp_beside(c->db_path, ".merge-", pattern, sizeof pattern)) {
        res = fail(err, errlen, HL_ERR_INVALID, "db_path: too long");
        goto out;
    }
    for (size_t i = 0; i < l.n && !(stop && *stop); i++) {
        if (!has_suffix(l.v[i], HL_SNAPSHOT_MANIFEST_SUFFIX))
            continue;
        tried++;
        hl_manifest m;
        char why[512] = "";
        memset(&m, 0, sizeof m);
        snprintf(tmp, sizeof tmp, "%s", pattern);
        int fd = mkostemp(tmp, O_CLOEXEC);
        if (fd < 0) {
            tmp[0] = 0;
            res = fail(err, errlen, HL_ERR_IO, "cannot create a file beside %s: %s", c->db_path, strerror(errno));
            goto out;
        }
        fchmod(fd, hl_store_created_mode());
        /* The manifest's positions first: a snapshot that cannot close the gap is not downloaded. */
        res = read_manifest(store, l.v[i], fd, &m, why, sizeof why);
        if (!res && !covers(&m, n, streams, need, why, sizeof why)) {
            hl_log(HL_LOG_INFO, "catch-up: snapshot too old to close the gap", "manifest", l.v[i], "reason", why, NULL);
            uncovered++;
            snprintf(last_why, sizeof last_why, "%s", why);
            hl_manifest_free(&m);
            close(fd);
            unlink(tmp);
            tmp[0] = 0;
            continue;
        }
        hl_manifest_free(&m);
        if (!res) {
            hl_log(HL_LOG_INFO, "catch-up: downloading snapshot", "manifest", l.v[i], "store", store->where, NULL);
            res = fetch_retrying(store, l.v[i], tmp, fd, &m, why, sizeof why);
        }
        close(fd);
        if (!res && !covers(&m, n, streams, need, why, sizeof why))
            res = HL_ERR_DECODE;
        if (res) {
            hl_log(HL_LOG_ERROR, "catch-up: snapshot refused; trying the next older one", "manifest", l.v[i], "reason",
                   why, NULL);
            snprintf(last_why, sizeof last_why, "%s", why);
            hl_manifest_free(&m);
            unlink(tmp);
            tmp[0] = 0;
            continue;
        }
        snprintf(path, pathlen, "%s", tmp);
        tmp[0] = 0;
        snprintf(info, infolen, "%s from %s (taken by node %" PRIu64 ", %" PRIu64 " bytes)", l.v[i], store->where,
                 m.node, m.db_size);
        hl_manifest_free(&m);
        res = HL_OK;
        goto out;
    }
    if (!tried)
        res = fail(err, errlen, HL_ERR_NOT_FOUND, "no snapshot covers the gap: the store is empty");
    else if (uncovered == tried)
        res = fail(err, errlen, HL_ERR_NOT_FOUND, "no snapshot covers the gap (the newest %s)", last_why);
    else
        res = fail(err, errlen, HL_ERR_DECODE, "none of the %zu snapshots in %s both verifies and covers the gap (%s)",
                   tried, store->where, last_why);
out:
    if (tmp[0])
        unlink(tmp);
    hl_store_names_free(&l);
    hl_store_close(store);
    return res;
}
