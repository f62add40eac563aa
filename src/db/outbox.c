/*
 * outbox.c - encoded changesets waiting for JetStream's acknowledgement.
 *
 * Capture writes a changeset here in the transaction that records its row
 * versions, so a captured change is either in the change logs or here; the
 * publisher reads the rows in sequence order and deletes each one once every
 * part of it was acknowledged. A row is (seq, flags, rows, data): the flags
 * travel in their own column and their own field of hl_outbox_entry, never
 * inside the payload.
 */
#include <stdint.h>
#include <stdio.h>

#include "db/db_int.h"

void hl_outbox_entry_init(hl_outbox_entry *e, size_t max_payload)
{
    e->seq = e->rows = 0;
    e->flags = 0;
    hl_buf_init(&e->payload, max_payload);
}

void hl_outbox_entry_free(hl_outbox_entry *e)
{
    if (e)
        hl_buf_free(&e->payload);
}

static hl_status prep(hl_db *d, sqlite3_stmt **st, const char *sql)
{
    int rc = sqlite3_prepare_v3(d->db, sql, -1, SQLITE_PREPARE_PERSISTENT, st, NULL);
    return rc == SQLITE_OK ? HL_OK : hl_db_err(d, rc, sql);
}

hl_status hl_outbox_prepare(hl_db *d)
{
    hl_outbox *o = &d->outbox;
    hl_status st;
    if ((st = prep(d, &o->put, "INSERT INTO " HL_PREFIX "outbox(seq, flags, rows, data) VALUES (?, ?, ?, ?)")) ||
        (st = prep(d, &o->next,
                   "SELECT seq, flags, data, rows FROM " HL_PREFIX "outbox WHERE seq > ? ORDER BY seq LIMIT 1")))
        return st;
    return prep(d, &o->del, "DELETE FROM " HL_PREFIX "outbox WHERE seq = ?");
}

void hl_outbox_finalize(hl_outbox *o)
{
    if (!o)
        return;
    sqlite3_finalize(o->put);
    sqlite3_finalize(o->next);
    sqlite3_finalize(o->del);
    o->put = o->next = o->del = NULL;
}

hl_status hl_db_outbox_put(hl_db *d, uint64_t seq, uint8_t flags, uint64_t rows, const void *payload, size_t len)
{
    sqlite3_stmt *ob = d->outbox.put;
    sqlite3_bind_int64(ob, 1, (int64_t)seq);
    sqlite3_bind_int(ob, 2, flags);
    sqlite3_bind_int64(ob, 3, (int64_t)rows);
    sqlite3_bind_blob64(ob, 4, len ? payload : "", len, SQLITE_STATIC);
    int rc = sqlite3_step(ob);
    sqlite3_reset(ob);
    sqlite3_clear_bindings(ob);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "outbox put");
}

hl_status hl_db_outbox_next(hl_db *d, uint64_t after, hl_outbox_entry *e)
{
    sqlite3_stmt *st = d->outbox.next;
    hl_status res = HL_ERR_NOT_FOUND;
    sqlite3_bind_int64(st, 1, (int64_t)after);
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        e->seq = (uint64_t)sqlite3_column_int64(st, 0);
        e->flags = (uint8_t)sqlite3_column_int(st, 1);
        e->rows = (uint64_t)sqlite3_column_int64(st, 3);
        hl_buf_reset(&e->payload);
        res = hl_buf_add(&e->payload, sqlite3_column_blob(st, 2), (size_t)sqlite3_column_bytes(st, 2));
    } else if (rc != SQLITE_DONE) {
        res = hl_db_err(d, rc, "outbox read");
    }
    sqlite3_reset(st);
    return res;
}

hl_status hl_db_outbox_delete(hl_db *d, uint64_t seq)
{
    sqlite3_stmt *st = d->outbox.del;
    sqlite3_bind_int64(st, 1, (int64_t)seq);
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "outbox delete");
}

hl_status hl_db_outbox_count(hl_db *d, uint64_t *count)
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(d->db, "SELECT count(*) FROM " HL_PREFIX "outbox", -1, &st, NULL);
    if (rc == SQLITE_OK && (rc = sqlite3_step(st)) == SQLITE_ROW)
        *count = (uint64_t)sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    return rc == SQLITE_ROW ? HL_OK : HL_ERR_SQLITE;
}

hl_status hl_outbox_chain_end(hl_db *d, uint64_t seq)
{
    sqlite3_stmt *u = NULL;
    int rc =
        sqlite3_prepare_v2(d->db, "UPDATE " HL_PREFIX "outbox SET flags = flags & ~?2 WHERE seq = ?1", -1, &u, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_int64(u, 1, (int64_t)seq);
        sqlite3_bind_int(u, 2, HL_PART_FLAG_MORE);
        rc = sqlite3_step(u);
    }
    sqlite3_finalize(u);
    return rc == SQLITE_DONE ? HL_OK : hl_db_err(d, rc, "outbox chain end");
}

int hl_sqlite_sync_wal(sqlite3 *db)
{
    sqlite3_file *f = NULL;
    int rc = sqlite3_file_control(db, "main", SQLITE_FCNTL_JOURNAL_POINTER, &f);
    if (rc == SQLITE_OK && f && f->pMethods) /* not open: no WAL yet, nothing to sync */
        rc = f->pMethods->xSync(f, SQLITE_SYNC_NORMAL);
    return rc;
}

/*
 * Under synchronous = NORMAL a commit reaches the WAL file but not the disk
 * (SQLite syncs the WAL only at checkpoints), and a power loss takes the last
 * commits back. An outbox row must be on disk before its changeset leaves the
 * node: otherwise the sequence it used is taken back with it, the next capture
 * reuses it for other rows, and every other node drops those as duplicates
 * (docs/architecture.md, "Exactly once"). One sync of the WAL makes every
 * transaction committed so far durable, the application's included; it holds
 * no lock, so nobody waits for it.
 */
hl_status hl_db_outbox_sync(hl_db *d)
{
    int rc = hl_sqlite_sync_wal(d->db);
    if (rc == SQLITE_OK)
        return HL_OK;
    hl_log(HL_LOG_ERROR, "cannot sync the WAL: nothing is published until it succeeds", "error", sqlite3_errstr(rc),
           NULL);
    snprintf(d->last_error, sizeof d->last_error, "WAL sync: %s", sqlite3_errstr(rc));
    return HL_ERR_SQLITE;
}
