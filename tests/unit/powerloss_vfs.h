/*
 * powerloss_vfs.h - a SQLite VFS for tests that models a power loss.
 *
 * It passes everything to the default VFS and remembers, for every main
 * database and WAL file, what the disk holds for sure: the file as it was at
 * its last xSync (an fsync reaches every write to the file before it, from
 * any connection). plv_power_loss() writes those images to another
 * directory: the files as a machine would find them after losing its power,
 * when none of the writes since the last sync reached the disk (the worst
 * case SQLite's synchronous = NORMAL allows).
 *
 * Usage: plv_install() before opening connections (it becomes the default
 * VFS), plv_sync_all() once the starting state counts as on disk, then
 * plv_power_loss(db path, new directory) gives the database to reopen.
 * Single-threaded use of SQLite only; header-only, for one test binary.
 */
#ifndef HL_TEST_POWERLOSS_VFS_H
#define HL_TEST_POWERLOSS_VFS_H

#include <check.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PLV_MAX_FILES 32

typedef struct plv_file {
    sqlite3_file base;
    sqlite3_file *real; /* follows this struct, szOsFile of the real VFS */
    int tracked;        /* a main database or a WAL: its syncs are recorded */
    char path[512];
} plv_file;

static sqlite3_vfs plv_vfs, *plv_real;
static char plv_paths[PLV_MAX_FILES][512];
static int plv_npaths;
static unsigned plv_syncs; /* xSync calls on tracked files */

/* Copies the file at from to to (to empty when from does not exist). */
static void plv_copy(const char *from, const char *to)
{
    FILE *in = fopen(from, "rb"), *out = fopen(to, "wb");
    ck_assert_ptr_nonnull(out);
    if (in) {
        char buf[65536];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, in)) > 0)
            ck_assert_uint_eq(fwrite(buf, 1, n, out), n);
        fclose(in);
    }
    ck_assert_int_eq(fclose(out), 0);
}

/* What the disk surely holds of path: path + ".durable". */
static void plv_durable_name(char *out, size_t cap, const char *path)
{
    ck_assert_int_lt(snprintf(out, cap, "%s.durable", path), (int)cap);
}

static void plv_make_durable(const char *path)
{
    char d[600];
    plv_durable_name(d, sizeof d, path);
    plv_copy(path, d);
}

static int plv_close(sqlite3_file *f)
{
    plv_file *p = (plv_file *)f;
    int rc = p->real->pMethods ? p->real->pMethods->xClose(p->real) : SQLITE_OK;
    return rc;
}
static int plv_read(sqlite3_file *f, void *b, int n, sqlite3_int64 o)
{
    return ((plv_file *)f)->real->pMethods->xRead(((plv_file *)f)->real, b, n, o);
}
static int plv_write(sqlite3_file *f, const void *b, int n, sqlite3_int64 o)
{
    return ((plv_file *)f)->real->pMethods->xWrite(((plv_file *)f)->real, b, n, o);
}
static int plv_truncate(sqlite3_file *f, sqlite3_int64 size)
{
    return ((plv_file *)f)->real->pMethods->xTruncate(((plv_file *)f)->real, size);
}
static int plv_sync(sqlite3_file *f, int flags)
{
    plv_file *p = (plv_file *)f;
    int rc = p->real->pMethods->xSync(p->real, flags);
    if (rc == SQLITE_OK && p->tracked) {
        plv_make_durable(p->path);
        plv_syncs++;
    }
    return rc;
}
static int plv_size(sqlite3_file *f, sqlite3_int64 *s)
{
    return ((plv_file *)f)->real->pMethods->xFileSize(((plv_file *)f)->real, s);
}
static int plv_lock(sqlite3_file *f, int l)
{
    return ((plv_file *)f)->real->pMethods->xLock(((plv_file *)f)->real, l);
}
static int plv_unlock(sqlite3_file *f, int l)
{
    return ((plv_file *)f)->real->pMethods->xUnlock(((plv_file *)f)->real, l);
}
static int plv_reserved(sqlite3_file *f, int *r)
{
    return ((plv_file *)f)->real->pMethods->xCheckReservedLock(((plv_file *)f)->real, r);
}
static int plv_fcntl(sqlite3_file *f, int op, void *a)
{
    return ((plv_file *)f)->real->pMethods->xFileControl(((plv_file *)f)->real, op, a);
}
static int plv_sector(sqlite3_file *f)
{
    return ((plv_file *)f)->real->pMethods->xSectorSize(((plv_file *)f)->real);
}
static int plv_devchar(sqlite3_file *f)
{
    return ((plv_file *)f)->real->pMethods->xDeviceCharacteristics(((plv_file *)f)->real);
}
static int plv_shm_map(sqlite3_file *f, int pg, int sz, int ext, void volatile **pp)
{
    return ((plv_file *)f)->real->pMethods->xShmMap(((plv_file *)f)->real, pg, sz, ext, pp);
}
static int plv_shm_lock(sqlite3_file *f, int o, int n, int fl)
{
    return ((plv_file *)f)->real->pMethods->xShmLock(((plv_file *)f)->real, o, n, fl);
}
static void plv_shm_barrier(sqlite3_file *f)
{
    ((plv_file *)f)->real->pMethods->xShmBarrier(((plv_file *)f)->real);
}
static int plv_shm_unmap(sqlite3_file *f, int del)
{
    return ((plv_file *)f)->real->pMethods->xShmUnmap(((plv_file *)f)->real, del);
}

/* No memory mapping (version 2 methods): every read goes through xRead. */
static const sqlite3_io_methods plv_io = {
    2,           plv_close,   plv_read,     plv_write,       plv_truncate,  plv_sync,
    plv_size,    plv_lock,    plv_unlock,   plv_reserved,    plv_fcntl,     plv_sector,
    plv_devchar, plv_shm_map, plv_shm_lock, plv_shm_barrier, plv_shm_unmap, NULL,
    NULL};

static int plv_open(sqlite3_vfs *vfs, const char *name, sqlite3_file *f, int flags, int *out_flags)
{
    (void)vfs;
    plv_file *p = (plv_file *)f;
    memset(p, 0, sizeof *p);
    p->real = (sqlite3_file *)(p + 1);
    int rc = plv_real->xOpen(plv_real, name, p->real, flags, out_flags);
    if (rc != SQLITE_OK) {
        p->real->pMethods = NULL;
        return rc;
    }
    p->base.pMethods = &plv_io;
    if (name && (flags & (SQLITE_OPEN_MAIN_DB | SQLITE_OPEN_WAL))) {
        p->tracked = 1;
        ck_assert_int_lt(snprintf(p->path, sizeof p->path, "%s", name), (int)sizeof p->path);
        int known = 0;
        for (int i = 0; i < plv_npaths; i++)
            known |= strcmp(plv_paths[i], name) == 0;
        if (!known) {
            ck_assert_int_lt(plv_npaths, PLV_MAX_FILES);
            snprintf(plv_paths[plv_npaths++], sizeof plv_paths[0], "%s", name);
        }
    }
    return SQLITE_OK;
}

/* Makes the power-loss VFS the default one. */
static void plv_install(void)
{
    if (plv_real)
        return;
    plv_real = sqlite3_vfs_find(NULL);
    ck_assert_ptr_nonnull(plv_real);
    plv_vfs = *plv_real;
    plv_vfs.zName = "powerloss";
    plv_vfs.szOsFile = (int)sizeof(plv_file) + plv_real->szOsFile;
    plv_vfs.xOpen = plv_open;
    plv_vfs.pNext = NULL;
    ck_assert_int_eq(sqlite3_vfs_register(&plv_vfs, 1), SQLITE_OK);
}

/* Everything written so far counts as on disk. */
static void plv_sync_all(void)
{
    for (int i = 0; i < plv_npaths; i++)
        plv_make_durable(plv_paths[i]);
}

/* The database db after a power loss, as dir/<its file name>, its WAL beside it. */
static void plv_power_loss(const char *db, const char *dir, char *out, size_t cap)
{
    const char *base = strrchr(db, '/') ? strrchr(db, '/') + 1 : db;
    ck_assert_int_lt(snprintf(out, cap, "%s/%s", dir, base), (int)cap);
    char from[600], wal[600], to[600];
    plv_durable_name(from, sizeof from, db);
    plv_copy(from, out);
    ck_assert_int_lt(snprintf(wal, sizeof wal, "%s-wal", db), (int)sizeof wal);
    plv_durable_name(from, sizeof from, wal);
    ck_assert_int_lt(snprintf(to, sizeof to, "%s-wal", out), (int)sizeof to);
    plv_copy(from, to);
}

#endif
