#include "repl/publisher.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/hlc.h"
#include "common/log.h"

#define WINDOW_PARTS HL_PUBLISH_WINDOW_PARTS
#define WINDOW_BYTES HL_PUBLISH_WINDOW_BYTES
#define STALL_MS 10000 /* no ack for this long: take the pending list back and re-publish */
#define RETRY_MS 500   /* after a failure, wait this long before re-publishing */
/* Acknowledged changesets whose outbox rows wait for the engine's next write
 * transaction (hl_publisher_defer_deletes) are deleted in one of their own
 * once the oldest waited this long, or once this many wait. */
#define DONE_WAIT_MS 200
#define DONE_MAX 1024

typedef struct inflight {
    uint64_t seq;
    uint64_t rows;
    uint32_t count, parts_left;
    size_t bytes; /* its payload */
    /* Parts acknowledged, one bit each: in acked1 up to 64 parts, else in
     * acked. An ack counts once per part: after a restart() an ack of an
     * abandoned copy can still reach the queue, and the re-published copy of
     * the same part is acknowledged too. */
    uint64_t acked1;
    uint64_t *acked;
} inflight;

struct hl_publisher {
    const hl_config *c;
    hl_queue *q;
    hl_nats *n;
    char subject[512];
    inflight *win;
    size_t nwin, capwin;
    size_t parts_inflight;
    size_t bytes_inflight;  /* payload of the changesets in win */
    uint64_t last_sent;     /* highest outbox seq handed to nats.c */
    uint64_t last_progress; /* mono ms of the last ack or send */
    uint64_t retry_at;      /* mono ms before which nothing is re-published */
    bool resend;
    bool defer;     /* fully acknowledged rows wait in done for the engine's next write transaction */
    uint64_t *done; /* outbox seqs fully acknowledged, not yet deleted */
    size_t ndone, capdone;
    uint64_t done_since; /* mono ms the oldest in done was acknowledged */
    uint64_t published, rows_published;
    hl_outbox_entry row;
    hl_buf msg;
};

int hl_shard_for_node(uint64_t node_id, int shards)
{
    /* splitmix64 finaliser: consecutive node ids spread over the shards */
    uint64_t z = node_id + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return shards > 0 ? (int)(z % (uint64_t)shards) : 0;
}

hl_status hl_publisher_new(hl_publisher **out, const hl_config *c, hl_queue *q)
{
    hl_publisher *p = calloc(1, sizeof *p);
    if (!p)
        return HL_ERR_NOMEM;
    p->c = c;
    p->q = q;
    hl_nats_subject(c, hl_shard_for_node(c->node_id, c->replication_log.shards), p->subject, sizeof p->subject);
    hl_outbox_entry_init(&p->row, (size_t)c->replication_log.max_changeset_bytes + 16);
    hl_buf_init(&p->msg, (size_t)c->replication_log.chunk_bytes + HL_PART_HEADER_LEN);
    p->last_progress = hl_mono_ms();
    *out = p;
    return HL_OK;
}

void hl_publisher_free(hl_publisher *p)
{
    if (!p)
        return;
    for (size_t i = 0; i < p->nwin; i++)
        free(p->win[i].acked);
    free(p->win);
    free(p->done);
    hl_outbox_entry_free(&p->row);
    hl_buf_free(&p->msg);
    free(p);
}

void hl_publisher_attach(hl_publisher *p, hl_nats *n)
{
    p->n = n;
}

uint64_t hl_publisher_published(const hl_publisher *p)
{
    return p->published;
}

uint64_t hl_publisher_rows_published(const hl_publisher *p)
{
    return p->rows_published;
}

void hl_publisher_ack_handler(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure)
{
    (void)js;
    hl_queue *q = closure;
    const char *id = NULL;
    hl_ack a = {0};
    /* Runs on a nats.c thread: only parse and enqueue. */
    hl_part part;
    if (natsMsgHeader_Get(msg, "Nats-Msg-Id", &id) == NATS_OK && id && hl_part_msg_id_parse(id, &part) == HL_OK) {
        a.seq = part.seq;
        a.part = part.index;
        a.ok = pa != NULL && pae == NULL;
        hl_queue_push_ack(q, a);
    }
    natsMsg_Destroy(msg);
}

/* Records part as acknowledged; false when it already was or f has no such part. */
static bool ack_part(inflight *f, uint32_t part)
{
    if (part >= f->count)
        return false;
    uint64_t *w = f->acked ? &f->acked[part / 64] : &f->acked1, bit = UINT64_C(1) << (part % 64);
    if (*w & bit)
        return false;
    *w |= bit;
    return true;
}

static bool is_done(const hl_publisher *p, uint64_t seq)
{
    for (size_t i = 0; i < p->ndone; i++)
        if (p->done[i] == seq)
            return true;
    return false;
}

static bool add_done(hl_publisher *p, uint64_t seq)
{
    if (p->ndone == p->capdone) {
        size_t ncap = p->capdone ? p->capdone * 2 : 64;
        uint64_t *nd = realloc(p->done, ncap * sizeof *nd);
        if (!nd)
            return false;
        p->done = nd;
        p->capdone = ncap;
    }
    if (!p->ndone)
        p->done_since = hl_mono_ms();
    p->done[p->ndone++] = seq;
    return true;
}

void hl_publisher_defer_deletes(hl_publisher *p, bool on)
{
    p->defer = on;
}

size_t hl_publisher_done(const hl_publisher *p, const uint64_t **seqs)
{
    *seqs = p->done;
    return p->ndone;
}

void hl_publisher_done_recorded(hl_publisher *p, size_t n)
{
    if (n > p->ndone)
        n = p->ndone;
    if (!n)
        return;
    memmove(p->done, p->done + n, (p->ndone - n) * sizeof *p->done);
    p->ndone -= n;
    if (p->ndone)
        p->done_since = hl_mono_ms();
}

hl_status hl_publisher_flush_done(hl_publisher *p, hl_db *d)
{
    if (!p->ndone)
        return HL_OK;
    hl_status st = hl_db_begin(d);
    for (size_t i = 0; !st && i < p->ndone; i++)
        st = hl_db_outbox_delete(d, p->done[i]);
    if (st) {
        hl_db_rollback(d); /* kept in done: deleted by a later transaction, never re-published meanwhile */
        return st;
    }
    if ((st = hl_db_commit(d)))
        return st;
    p->ndone = 0;
    return HL_OK;
}

hl_status hl_publisher_flush_done_if_due(hl_publisher *p, hl_db *d)
{
    if (p->ndone && (!p->defer || p->ndone >= DONE_MAX || hl_mono_ms() - p->done_since >= DONE_WAIT_MS))
        return hl_publisher_flush_done(p, d);
    return HL_OK;
}

static inflight *find(hl_publisher *p, uint64_t seq)
{
    for (size_t i = 0; i < p->nwin; i++)
        if (p->win[i].seq == seq)
            return &p->win[i];
    return NULL;
}

/* Forgets everything in flight; the next pump re-publishes from the oldest outbox row. */
static void restart(hl_publisher *p, const char *why)
{
    if (p->n) {
        natsMsgList pending = {0};
        if (js_PublishAsyncGetPendingList(&pending, hl_nats_js(p->n)) == NATS_OK)
            natsMsgList_Destroy(&pending);
    }
    /* Acks already queued belong to the copies just abandoned. */
    hl_ack *stale = NULL;
    hl_queue_take_acks(p->q, &stale);
    free(stale);
    if (p->nwin)
        hl_logf(HL_LOG_WARN, "re-publishing %zu unacknowledged changesets: %s", p->nwin, why);
    for (size_t i = 0; i < p->nwin; i++)
        free(p->win[i].acked);
    p->nwin = 0;
    p->parts_inflight = 0;
    p->bytes_inflight = 0;
    p->last_sent = 0;
    p->resend = false;
    p->retry_at = hl_mono_ms() + RETRY_MS;
    p->last_progress = hl_mono_ms();
}

static hl_status send_one(hl_publisher *p, uint64_t epoch, uint64_t seq)
{
    uint8_t flags = p->row.flags;
    const unsigned char *payload = p->row.payload.data;
    size_t total = p->row.payload.len;
    size_t chunk = (size_t)p->c->replication_log.chunk_bytes;
    uint32_t count = hl_part_count(total, chunk);
    for (uint32_t i = 0; i < count; i++) {
        char id[128];
        natsMsg *m = NULL;
        /* The slicing the protocol tests check (docs/protocol.md §1.2). */
        hl_part hp;
        hl_status st = hl_part_slice(&hp, payload, total, chunk, i);
        if (st)
            return st;
        hp.flags = flags;
        hp.origin = p->c->node_id;
        hp.epoch = epoch;
        hp.seq = seq;
        unsigned char hdr[HL_PART_HEADER_LEN];
        hl_part_header_write(&hp, hdr);
        hl_buf_reset(&p->msg);
        hl_buf_add(&p->msg, hdr, sizeof hdr);
        hl_buf_add(&p->msg, hp.data, hp.len);
        if ((st = hl_buf_status(&p->msg)))
            return st;
        hl_part_msg_id(&hp, id, sizeof id);
        natsStatus ns = natsMsg_Create(&m, p->subject, NULL, (const char *)p->msg.data, (int)p->msg.len);
        if (ns == NATS_OK)
            ns = natsMsgHeader_Set(m, "Nats-Msg-Id", id);
        if (ns == NATS_OK)
            ns = js_PublishMsgAsync(hl_nats_js(p->n), &m, NULL);
        natsMsg_Destroy(m);
        if (ns != NATS_OK) {
            /* Parts already handed over will be acked or time out; start over. */
            hl_logf(HL_LOG_WARN, "publish of changeset %" PRIu64 " failed: %s", seq, natsStatus_GetText(ns));
            p->resend = true;
            return HL_ERR_NATS;
        }
        p->parts_inflight++;
    }
    return HL_OK;
}

hl_status hl_publisher_pump(hl_publisher *p, hl_db *d)
{
    uint64_t now = hl_mono_ms();
    if (!p->n || !hl_nats_connected(p->n))
        return HL_OK;
    if (p->nwin && now - p->last_progress > STALL_MS)
        restart(p, "no acknowledgement from JetStream");
    if (p->resend && p->nwin == 0)
        restart(p, "publish failed");
    if (p->resend || now < p->retry_at)
        return HL_OK;
    bool synced = false;
    while (p->parts_inflight < WINDOW_PARTS && (p->bytes_inflight < WINDOW_BYTES || p->nwin == 0)) {
        hl_status st = hl_db_outbox_next(d, p->last_sent, &p->row);
        if (st == HL_ERR_NOT_FOUND)
            return HL_OK;
        if (st)
            return st;
        if (is_done(p, p->row.seq)) { /* acknowledged, its delete pending (after a restart()) */
            p->last_sent = p->row.seq;
            continue;
        }
        /* On disk before it leaves the node; one sync covers every row this call reads. */
        if (!synced && (st = hl_db_outbox_sync(d))) {
            p->retry_at = now + RETRY_MS;
            return st;
        }
        synced = true;
        if (p->nwin == p->capwin) {
            size_t ncap = p->capwin ? p->capwin * 2 : 64;
            inflight *nw = realloc(p->win, ncap * sizeof *nw);
            if (!nw)
                return HL_ERR_NOMEM;
            p->win = nw;
            p->capwin = ncap;
        }
        uint64_t seq = p->row.seq;
        size_t len = p->row.payload.len;
        uint32_t count = hl_part_count(len, (size_t)p->c->replication_log.chunk_bytes);
        uint64_t *acked = NULL;
        if (count > 64 && !(acked = calloc(((size_t)count + 63) / 64, sizeof *acked)))
            return HL_ERR_NOMEM;
        p->win[p->nwin++] = (inflight){
            .seq = seq, .rows = p->row.rows, .count = count, .parts_left = count, .bytes = len, .acked = acked};
        p->bytes_inflight += len;
        p->last_sent = seq;
        p->last_progress = now;
        if (send_one(p, hl_db_epoch(d), seq))
            return HL_OK;
    }
    return HL_OK;
}

/* Counts one acknowledgement; returns the changeset it completed (every part
 * acknowledged once), else NULL. A failure report asks for a re-publish. */
static inflight *count_ack(hl_publisher *p, const hl_ack *a)
{
    inflight *f = find(p, a->seq);
    if (!f)
        return NULL; /* from before a restart(): the re-published copy will be acked */
    p->last_progress = hl_mono_ms();
    if (p->parts_inflight)
        p->parts_inflight--;
    if (!a->ok) {
        p->resend = true;
        return NULL;
    }
    if (!ack_part(f, a->part) || !f->parts_left || --f->parts_left)
        return NULL; /* a part counted already, or parts still missing */
    return f;
}

hl_status hl_publisher_handle_acks(hl_publisher *p, hl_db *d, hl_ack *acks, size_t n)
{
    hl_status st = HL_OK;
    bool began = false;
    uint64_t done = 0, done_rows = 0;
    for (size_t i = 0; i < n; i++) {
        inflight *f = count_ack(p, &acks[i]);
        if (!f)
            continue;
        if (p->defer) {
            if (!add_done(p, f->seq)) {
                p->resend = true; /* no memory to remember it: published again, dropped as a duplicate */
                continue;
            }
        } else {
            if (!began) {
                if ((st = hl_db_begin(d)))
                    break;
                began = true;
            }
            if ((st = hl_db_outbox_delete(d, f->seq)))
                break;
        }
        done++;
        done_rows += f->rows;
        p->bytes_inflight -= f->bytes < p->bytes_inflight ? f->bytes : p->bytes_inflight;
        free(f->acked);
        *f = p->win[--p->nwin];
    }
    if (began) {
        if (st)
            hl_db_rollback(d);
        else
            st = hl_db_commit(d);
    }
    if (st) {
        /* The rows whose delete was rolled back are no longer in flight and
         * would stay in the outbox for good: publish again from the oldest
         * row (the stream drops the copies). */
        p->resend = true;
        return st;
    }
    p->published += done;
    p->rows_published += done_rows;
    return p->defer ? hl_publisher_flush_done_if_due(p, d) : HL_OK;
}

int hl_publisher_next_timeout(const hl_publisher *p)
{
    uint64_t now = hl_mono_ms();
    if (p->ndone) /* the deferred deletes are due (again 10 ms after one that failed) */
        return p->done_since + DONE_WAIT_MS > now + 10 ? (int)(p->done_since + DONE_WAIT_MS - now) : 10;
    if (p->retry_at > now)
        return (int)(p->retry_at - now);
    if (p->nwin)
        return 1000;
    return -1;
}
