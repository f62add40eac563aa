/*
 * step.c - the engine's transaction.
 *
 * The order of one step is an invariant of this module, not of its callers:
 * read and encode the application's commits under a WAL snapshot without the
 * write lock; then in one write transaction the schema check, the recording
 * of that batch, the capture of whatever was logged since the snapshot
 * (unless the step does nothing else: see write_step), and only then
 * (capture before apply: every local write has its version before a remote
 * row is compared with it) the held and the remote changesets, and last the
 * stream positions that say those were dealt with. The write lock is held for
 * the short part only, which matters because an application that finds the
 * database locked sleeps for milliseconds in SQLite's default busy handler.
 */
#include <inttypes.h>
#include <time.h>

#include "common/hlc.h"
#include "common/buf.h"
#include "db/db_int.h"

static uint64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

/* Reads and encodes what the application logged, under a snapshot, outside
 * the write lock (hl_capture_collect). *schema_moved: the schema changed
 * since it was last read, so nothing was collected (the write transaction
 * re-reads it and captures everything there). */
static hl_status collect(hl_db *d, hl_capture_batch *pre, bool *schema_moved)
{
    hl_status st = hl_db_exec(d, "BEGIN");
    if (st)
        return st;
    *schema_moved = hl_db_schema_version(d) != d->schema_version;
    if (!*schema_moved)
        st = hl_capture_collect(d, pre);
    hl_db_exec(d, "ROLLBACK"); /* a read transaction: nothing to keep */
    return st;
}

/* Held and remote changesets, inside the write transaction after capture;
 * results (may be NULL) receives the result of each item in turn. */
static hl_status apply_all(hl_db *d, hl_inbound *items, hl_positions *pos, const hl_step *s, hl_apply_result *results)
{
    hl_status st = hl_apply_begin(d);
    if (st)
        return st;
    if (s->retry_held && (st = hl_apply_retry_held(d)))
        return st;
    if (s->expire_before_ms && (st = hl_apply_expire_held(d, s->expire_before_ms, NULL)))
        return st;
    for (hl_inbound *it = items; it; it = it->next) {
        hl_apply_result r = HL_DUPLICATE;
        if (it->cs) {
            if ((st = hl_apply(d, it->cs, it->raw, it->rawlen, it->flags, &r)))
                return st;
            it->applied = r == HL_APPLIED;
        }
        if (results)
            *results++ = r;
        if (!pos || it->shard < 0 || it->shard >= pos->n)
            continue;
        if (r == HL_DEFERRED && pos->cap && !pos->cap[it->shard])
            pos->cap[it->shard] = pos->seen[it->shard] + 1; /* its messages come after seen: read again from here */
        if (it->safe_seq > pos->seen[it->shard] && !(pos->cap && pos->cap[it->shard]))
            pos->seen[it->shard] = it->safe_seq;
    }
    return hl_apply_end(d);
}

/* The stream positions that moved, last in the transaction. */
static hl_status record_positions(hl_db *d, const hl_positions *pos)
{
    hl_status st = HL_OK;
    for (int i = 0; pos && i < pos->n && !st; i++)
        if (pos->seen[i] != pos->applied[i])
            st = hl_db_stream_seq_put(d, pos->streams[i], pos->seen[i]);
    return st;
}

/* The write transaction of a step, after BEGIN; rolled back (by a failed
 * COMMIT too) when it returns an error. */
static hl_status write_step(hl_db *d, hl_capture_batch *pre, int64_t pre_version, hl_inbound *items, hl_positions *pos,
                            hl_step *s, hl_apply_result *results)
{
    bool changed = false;
    uint64_t rows = 0;
    hl_status st;
    if ((st = hl_triggers_sync(d, false, &changed)))
        goto fail;
    if (changed) {
        char hex[65];
        hl_hex(d->schema.hash, 32, hex);
        hl_logf(HL_LOG_INFO, "schema changed: %zu replicated tables, schema hash %s", d->schema.n, hex);
        s->schema_changed = true;
        s->retry_held = true;
    }
    if (d->schema_version != pre_version)
        hl_capture_batch_free(pre); /* read under another schema: its rows are still logged, captured below */
    if (pre->rows && (st = hl_capture_record(d, pre)))
        goto fail;
    /* A step that only records a batch read under the snapshot leaves what
     * was logged since to the next step, which the watcher's re-checks after
     * each file event bring: the write lock is held for the recording alone,
     * not for reading and encoding what a busy writer added meanwhile. Remote
     * rows, held ones and positions need every local write versioned first,
     * so with those the rest is captured here. */
    bool rest_later = pre->rows && !items && !s->retry_held && !s->expire_before_ms && !s->flush_positions && !changed;
    if (!rest_later && (st = hl_capture(d, &rows)))
        goto fail;
    s->rows_captured = rows + pre->rows;
    if ((items || s->retry_held || s->expire_before_ms) && (st = apply_all(d, items, pos, s, results)))
        goto fail;
    for (size_t i = 0; i < s->n_outbox_done; i++)
        if ((st = hl_db_outbox_delete(d, s->outbox_done[i])))
            goto fail;
    if ((st = record_positions(d, pos)))
        goto fail;
    return hl_db_commit(d); /* a failed COMMIT rolls back */
fail:
    hl_db_rollback(d);
    return st;
}

/* hl_db_step; results as in apply_all. */
static hl_status step(hl_db *d, hl_inbound *items, hl_positions *pos, hl_step *s, hl_apply_result *results)
{
    hl_capture_batch pre = {0};
    hl_status st = HL_OK;
    bool schema_moved = false;
    int64_t pre_version = d->schema_version;
    s->committed = s->schema_changed = s->streamed = false;
    s->rows_captured = s->read_us = s->lock_us = 0;
    uint64_t t0 = mono_us();
    if (s->capture && (st = collect(d, &pre, &schema_moved)))
        goto out;
    uint64_t t1 = mono_us();
    s->read_us = t1 - t0;
    if (!items && !s->retry_held && !s->expire_before_ms && !s->flush_positions && !schema_moved && pre.rows == 0 &&
        !pre.too_big)
        goto out; /* nothing to write */
    if ((st = hl_db_begin(d)))
        goto out; /* nothing changed yet, positions noted but not recorded included */
    st = write_step(d, &pre, pre_version, items, pos, s, results);
    s->lock_us = mono_us() - t1;
    if (st) {
        for (int i = 0; pos && i < pos->n; i++)
            pos->seen[i] = pos->applied[i];
        goto out;
    }
    s->committed = true;
    s->streamed = pre.too_big;
    s->retry_held = false;
    for (int i = 0; pos && i < pos->n; i++)
        pos->applied[i] = pos->seen[i];
    if (s->rows_captured)
        hl_debugf("captured %" PRIu64 " rows", s->rows_captured);
out:
    hl_capture_batch_free(&pre);
    return st;
}

hl_status hl_db_step(hl_db *d, hl_inbound *items, hl_positions *pos, hl_step *s)
{
    return step(d, items, pos, s, NULL);
}

hl_status hl_db_apply_one(hl_db *d, const hl_changeset *cs, const void *raw, size_t rawlen, uint8_t flags,
                          hl_apply_result *res)
{
    hl_inbound it = {.cs = (hl_changeset *)cs, .raw = (unsigned char *)raw, .rawlen = rawlen, .flags = flags};
    hl_step s = {0};
    *res = HL_DUPLICATE;
    return step(d, &it, NULL, &s, res);
}
