#include "repl/fetcher.h"

#include <inttypes.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/hlc.h"
#include "common/log.h"

#define MAX_ORIGINS 4096 /* reassembly slots; beyond this, hostile traffic is refused */
/* Incomplete changesets held at once, all origins together; beyond this the
 * oldest is expired early. Normal traffic has a handful at most (a writer's
 * publish window holds 8 MiB of parts); this bounds what forged parts cost. */
#define MAX_PENDING 1024
/* With nothing received for this long, ask the server where the stream ends:
 * a consumer that is gone or stuck while messages wait is re-created, and a
 * reader at the end of the stream may expire incomplete changesets. */
#define IDLE_CHECK_MS 5000

typedef struct origin_slot {
    uint64_t origin;
    hl_reasm r; /* each pending entry's stamps: stream time and local time of its first part here */
} origin_slot;

struct hl_fetcher {
    const hl_config *c;
    hl_nats *n;
    hl_queue *q;
    int shard;
    uint64_t epoch;
    char stream[256], subject[256];
    uint64_t next_seq; /* first stream sequence still wanted */
    pthread_t th;
    atomic_int stop;
    atomic_uint_fast64_t received, malformed, expired, restarts;
    atomic_uint_fast64_t stalled_since; /* monotonic ms the consumer was found missing or stuck; 0: healthy */
    atomic_uint_fast64_t contact_ms;    /* wall ms this reader last knew it had every message (0: not yet) */
    bool jumped;                        /* the stream dropped messages before we read them: reading stopped */
    uint64_t expiry_ms;                 /* hl_config_incomplete_expiry_s() in ms */
    uint64_t last_msg_ms, last_check_ms;
    origin_slot *slots;
    size_t nslots;
    uint64_t held_budget;     /* payload bytes of incomplete changesets held, all origins */
    hl_ratelimit refused_log; /* a hostile flood must not flood the log too */
    hl_ratelimit expired_log;
};

uint64_t hl_fetcher_received(const hl_fetcher *f)
{
    return atomic_load(&f->received);
}

uint64_t hl_fetcher_malformed(const hl_fetcher *f)
{
    return atomic_load(&f->malformed);
}

uint64_t hl_fetcher_expired(const hl_fetcher *f)
{
    return atomic_load(&f->expired);
}

uint64_t hl_fetcher_restarts(const hl_fetcher *f)
{
    return atomic_load(&f->restarts);
}

uint64_t hl_fetcher_stalled_ms(const hl_fetcher *f)
{
    uint64_t since = atomic_load(&f->stalled_since), now = hl_mono_ms();
    return since && now > since ? now - since : (since ? 1 : 0);
}

uint64_t hl_fetcher_contact_ms(const hl_fetcher *f)
{
    return atomic_load(&f->contact_ms);
}

static void set_stalled(hl_fetcher *f, bool stalled)
{
    if (!stalled)
        atomic_store(&f->stalled_since, 0);
    else if (!atomic_load(&f->stalled_since))
        atomic_store(&f->stalled_since, hl_mono_ms());
}

static origin_slot *slot_for(hl_fetcher *f, uint64_t origin)
{
    for (size_t i = 0; i < f->nslots; i++)
        if (f->slots[i].origin == origin)
            return &f->slots[i];
    if (f->nslots >= MAX_ORIGINS)
        return NULL;
    origin_slot *ns = realloc(f->slots, (f->nslots + 1) * sizeof *ns);
    if (!ns)
        return NULL;
    f->slots = ns;
    memset(&f->slots[f->nslots], 0, sizeof *ns);
    f->slots[f->nslots].origin = origin;
    hl_reasm_init(&f->slots[f->nslots].r, (size_t)f->c->replication_log.max_changeset_bytes);
    return &f->slots[f->nslots++];
}

/* Drops a partly received changeset whose missing parts can no longer come
 * (docs/architecture.md, "Incomplete changesets expire"): logged, counted, and
 * the position recorded by the engine moves past its first part. */
static void expire(hl_fetcher *f, origin_slot *sl, hl_reasm_entry *e, const char *measured)
{
    uint64_t dropped = 0;
    if (e->repeat) {
        /* Some parts of a changeset applied already, re-published after the
         * duplicate window had forgotten only them: nothing is missing. */
        hl_logf(HL_LOG_DEBUG,
                "stream %s origin %" PRIu64 " sequence %" PRIu64 ": %" PRIu32 " re-published parts of a changeset "
                "already received, dropped",
                f->stream, sl->origin, e->seq, e->have);
        hl_reasm_drop(&sl->r, e);
        return;
    }
    atomic_fetch_add(&f->expired, 1);
    if (hl_ratelimit_allow(&f->expired_log, &dropped))
        hl_logf(HL_LOG_WARN,
                "incomplete changeset expired: stream %s origin %" PRIu64 " epoch %016" PRIx64 " sequence %" PRIu64
                ": %" PRIu32 " of %" PRIu32 " parts received, the first at stream sequence %" PRIu64
                ", the rest not received %s; dropped%s",
                f->stream, sl->origin, e->epoch, e->seq, e->have, e->count, e->first_stream_seq, measured,
                dropped ? " (and earlier ones not logged; see harmonylite_changesets_expired_total)" : "");
    hl_reasm_drop(&sl->r, e);
}

/* Expires what a message stored at stream time ts_ns proves complete-able no
 * more: anything still missing would have been stored before it. */
static void expire_by_stream_time(hl_fetcher *f, int64_t ts_ns)
{
    char why[96];
    snprintf(why, sizeof why, "within %" PRIu64 " s (by the stream's timestamps)", f->expiry_ms / 1000);
    for (size_t i = 0; i < f->nslots; i++) {
        hl_reasm *r = &f->slots[i].r;
        for (size_t j = r->npending; j-- > 0;) {
            hl_reasm_entry *e = &r->pending[j];
            if (ts_ns > e->stamp_ns && (uint64_t)(ts_ns - e->stamp_ns) / 1000000u > f->expiry_ms)
                expire(f, &f->slots[i], e, why);
        }
    }
}

/* The engine may record sseq as done unless a partly received changeset began earlier. */
static uint64_t safe_seq(hl_fetcher *f, uint64_t sseq)
{
    uint64_t safe = sseq;
    for (size_t i = 0; i < f->nslots; i++) {
        const hl_reasm *r = &f->slots[i].r;
        for (size_t j = 0; j < r->npending; j++)
            if (r->pending[j].first_stream_seq - 1 < safe)
                safe = r->pending[j].first_stream_seq - 1;
    }
    return safe;
}

/* Keeps what incomplete changesets hold within bounds (bytes and count, all
 * origins together) by expiring the oldest: only forged parts or a writer
 * gone for good leave that many unfinished. */
static void enforce_bounds(hl_fetcher *f)
{
    for (;;) {
        uint64_t held = 0;
        size_t n = 0;
        origin_slot *oldest_sl = NULL;
        hl_reasm_entry *oldest = NULL;
        for (size_t i = 0; i < f->nslots; i++) {
            hl_reasm *r = &f->slots[i].r;
            held += r->held;
            n += r->npending;
            for (size_t j = 0; j < r->npending; j++)
                if (!oldest || r->pending[j].first_stream_seq < oldest->first_stream_seq) {
                    oldest = &r->pending[j];
                    oldest_sl = &f->slots[i];
                }
        }
        if (!oldest || (held <= f->held_budget && n <= MAX_PENDING))
            return;
        expire(f, oldest_sl, oldest, "before incomplete changesets outgrew their memory bound");
    }
}

static void push(hl_fetcher *f, uint64_t sseq, hl_changeset *cs, unsigned char *raw, size_t rawlen, uint8_t flags)
{
    hl_inbound *it = calloc(1, sizeof *it);
    if (!it) {
        /* Without memory we cannot go on safely; the engine never records this
         * sequence, so a restart re-reads it. */
        hl_errorf("out of memory queueing stream message %" PRIu64, sseq);
        hl_changeset_free(cs);
        free(raw);
        return;
    }
    it->shard = f->shard;
    it->safe_seq = safe_seq(f, sseq);
    it->cs = cs;
    it->raw = raw;
    it->rawlen = rawlen;
    it->flags = flags;
    it->bytes = sizeof *it + rawlen + (cs ? cs->approx_bytes : 0);
    hl_queue_push(f->q, it);
}

static void refuse(hl_fetcher *f, uint64_t sseq, const char *why)
{
    atomic_fetch_add(&f->malformed, 1);
    uint64_t dropped = 0;
    if (hl_ratelimit_allow(&f->refused_log, &dropped))
        hl_logf(HL_LOG_WARN, "malformed message refused: stream %s sequence %" PRIu64 ": %s%s", f->stream, sseq, why,
                dropped ? " (and earlier ones not logged; see harmonylite_malformed_messages_total)" : "");
    push(f, sseq, NULL, NULL, 0, 0);
}

static void handle(hl_fetcher *f, natsMsg *m, uint64_t sseq, int64_t ts_ns)
{
    hl_part part;
    const void *data = natsMsg_GetData(m);
    size_t len = (size_t)natsMsg_GetDataLength(m);
    hl_status st = hl_part_parse(data, len, &part);
    if (st) {
        refuse(f, sseq, "bad part header");
        return;
    }
    if (part.origin == f->c->node_id && part.epoch == f->epoch) {
        push(f, sseq, NULL, NULL, 0, 0); /* our own */
        return;
    }
    origin_slot *sl = slot_for(f, part.origin);
    if (!sl) {
        refuse(f, sseq, "too many origins");
        return;
    }
    hl_reasm *r = &sl->r;
    hl_reasm_entry *e = NULL;
    st = hl_reasm_feed(r, &part, sseq, &e);
    if (st == HL_ERR_BUSY) {
        expire(f, sl, &r->pending[0], "before too many later ones of the same origin were pending");
        st = hl_reasm_feed(r, &part, sseq, &e);
    }
    if (st) {
        refuse(f, sseq,
               st == HL_ERR_TOO_LARGE ? "changeset over replication_log.max_changeset_bytes"
               : st == HL_ERR_NOMEM   ? "out of memory reassembling a changeset"
                                      : "part inconsistent with its changeset's other parts");
        return;
    }
    if (!e || e->have < e->count) {
        if (e && e->have == 1) { /* the first part received of this changeset */
            e->stamp_ns = ts_ns;
            e->stamp_ms = hl_mono_ms();
        }
        enforce_bounds(f);
        push(f, sseq, NULL, NULL, 0, 0); /* safe_seq stays before its first part */
        return;
    }
    size_t rawlen = 0;
    uint8_t flags = 0;
    unsigned char *raw = hl_reasm_take(r, e, &rawlen, &flags);
    hl_changeset *cs = NULL;
    char err[256] = "";
    st = hl_changeset_decode(raw, rawlen, (flags & HL_PART_FLAG_ZSTD) != 0,
                             (size_t)f->c->replication_log.max_changeset_bytes, &cs, err, sizeof err);
    if (st) {
        free(raw);
        refuse(f, sseq, err[0] ? err : hl_status_str(st));
        return;
    }
    if (cs->origin != part.origin || cs->epoch != part.epoch || cs->seq != part.seq) {
        hl_changeset_free(cs);
        free(raw);
        refuse(f, sseq, "payload disagrees with its header");
        return;
    }
    hl_reasm_mark_done(r, part.epoch, part.seq);
    push(f, sseq, cs, raw, rawlen, flags);
}

/* Forgets a consumer (failed, or at stop). Retired, never destroyed here: a
 * message for it may still be in nats.c's reader (see hl_nats_retire_sub). The
 * consumer is ephemeral; the server removes it once nobody reads it. */
static void drop_sub(hl_fetcher *f, natsSubscription **sub)
{
    hl_nats_retire_sub(f->n, *sub);
    *sub = NULL;
}

/*
 * The stream no longer has messages next_seq..first-1: retention (or a
 * deletion) removed them before this node read them. Never skip them: stop
 * reading, and tell the engine, which catches up from a snapshot and starts
 * a new reader from the position the snapshot gives (docs/snapshots.md).
 * The stream carries only our subject, so any jump in its sequence is such
 * a loss.
 */
static void jumped(hl_fetcher *f, natsSubscription **sub, uint64_t first)
{
    hl_logf(HL_LOG_ERROR,
            "stream %s jumped to sequence %" PRIu64 " while this node waited for %" PRIu64 ": changesets %" PRIu64
            "..%" PRIu64 " were discarded by retention before it read them; "
            "reading stops here",
            f->stream, first, f->next_seq, f->next_seq, first - 1);
    f->jumped = true;
    drop_sub(f, sub);
    hl_inbound *it = calloc(1, sizeof *it);
    if (!it)
        return; /* the engine's stream check at the next start still finds the gap */
    it->shard = f->shard;
    it->safe_seq = safe_seq(f, f->next_seq - 1);
    it->gap_to = first - 1;
    it->bytes = sizeof *it;
    hl_queue_push(f->q, it);
}

static natsSubscription *subscribe(hl_fetcher *f)
{
    natsSubscription *sub = NULL;
    jsSubOptions so;
    jsErrCode jerr = 0;
    jsSubOptions_Init(&so);
    so.Stream = f->stream;
    so.Ordered = true;
    so.Config.DeliverPolicy = js_DeliverByStartSequence;
    so.Config.OptStartSeq = f->next_seq;
    /* An ordered consumer lives on one server. When that server goes away the
     * consumer is silently gone; the library notices only after missing
     * heartbeats (5 s apart by default, about 30 s in practice), so ask for
     * them every second and resubscribe on the first NATS_MISSED_HEARTBEAT. */
    so.Config.Heartbeat = (int64_t)1000 * 1000 * 1000;
    natsStatus s = js_SubscribeSync(&sub, hl_nats_js(f->n), f->subject, NULL, &so, &jerr);
    if (s != NATS_OK) {
        hl_logf(HL_LOG_WARN, "cannot subscribe to stream %s: %s (%d)", f->stream, natsStatus_GetText(s), (int)jerr);
        natsSubscription_Destroy(sub);
        return NULL;
    }
    hl_logf(HL_LOG_INFO, "reading stream %s from sequence %" PRIu64, f->stream, f->next_seq);
    return sub;
}

/*
 * Nothing received for IDLE_CHECK_MS: ask the server where the stream ends.
 * Messages we have not received mean the consumer is gone or stuck (its server
 * restarted, the stream moved or was unavailable, and the library did not
 * recover it): drop it, so it is re-created from next_seq. Having read
 * everything means the consumer is healthy, and local time now measures how
 * long a pending changeset has waited. An unanswered request proves nothing
 * either way: the consumer counts as stalled and is re-created.
 */
static void idle_check(hl_fetcher *f, natsSubscription **sub)
{
    uint64_t now = hl_mono_ms();
    if (now - f->last_msg_ms < IDLE_CHECK_MS || now - f->last_check_ms < IDLE_CHECK_MS)
        return;
    f->last_check_ms = now;
    uint64_t first = 0, last = 0;
    hl_status st = hl_nats_stream_bounds(f->n, f->stream, &first, &last);
    if (st) {
        if (*sub)
            hl_logf(HL_LOG_WARN, "stream %s: no answer about the stream (%s); re-creating its consumer", f->stream,
                    hl_status_str(st));
        set_stalled(f, true);
        drop_sub(f, sub);
        return;
    }
    if (first > f->next_seq) { /* also a stream retention emptied: first is then last + 1 */
        jumped(f, sub, first);
        return;
    }
    if (last >= f->next_seq) {
        hl_logf(HL_LOG_WARN,
                "stream %s: nothing received for %" PRIu64 " s while sequences %" PRIu64 "..%" PRIu64
                " wait; re-creating the consumer",
                f->stream, (now - f->last_msg_ms) / 1000, f->next_seq, last);
        set_stalled(f, true);
        drop_sub(f, sub);
        return;
    }
    set_stalled(f, false);
    atomic_store(&f->contact_ms, hl_now_ms()); /* at the end of the stream: up to date */
    bool moved = false;
    char why[96];
    snprintf(why, sizeof why, "within %" PRIu64 " s (by local time, at the end of the stream)", f->expiry_ms / 1000);
    for (size_t i = 0; i < f->nslots; i++) {
        hl_reasm *r = &f->slots[i].r;
        for (size_t j = r->npending; j-- > 0;)
            if (now - r->pending[j].stamp_ms > f->expiry_ms) {
                expire(f, &f->slots[i], &r->pending[j], why);
                moved = true;
            }
    }
    if (moved && f->next_seq > 1)
        push(f, f->next_seq - 1, NULL, NULL, 0, 0); /* let the engine record the position */
}

static void *run(void *arg)
{
    hl_fetcher *f = arg;
    natsSubscription *sub = NULL;
    bool subscribed_once = false;
    f->last_msg_ms = f->last_check_ms = hl_mono_ms();
    while (!atomic_load(&f->stop)) {
        if (f->jumped) { /* nothing more to read until the engine caught up and starts a new reader */
            usleep(100000);
            continue;
        }
        if (!sub) {
            if (!hl_nats_connected(f->n) || !(sub = subscribe(f))) {
                set_stalled(f, true);
                for (int i = 0; i < 10 && !atomic_load(&f->stop); i++)
                    usleep(100000);
                continue;
            }
            if (subscribed_once)
                atomic_fetch_add(&f->restarts, 1);
            subscribed_once = true;
            /* Give the new consumer a full idle period before judging it. */
            f->last_msg_ms = f->last_check_ms = hl_mono_ms();
        }
        natsMsg *m = NULL;
        natsStatus s = natsSubscription_NextMsg(&m, sub, 500);
        if (s == NATS_TIMEOUT) {
            idle_check(f, &sub);
            continue;
        }
        if (s != NATS_OK) {
            hl_logf(HL_LOG_WARN, "stream %s: %s; re-creating the consumer from sequence %" PRIu64, f->stream,
                    natsStatus_GetText(s), f->next_seq);
            set_stalled(f, true);
            drop_sub(f, &sub);
            continue;
        }
        jsMsgMetaData *meta = NULL;
        if (natsMsg_GetMetaData(&meta, m) == NATS_OK) {
            uint64_t sseq = meta->Sequence.Stream;
            f->last_msg_ms = hl_mono_ms();
            set_stalled(f, false);
            if (sseq > f->next_seq) {
                jumped(f, &sub, sseq);
            } else if (sseq == f->next_seq) {
                atomic_store(&f->contact_ms, hl_now_ms());
                atomic_store(&f->received, sseq);
                expire_by_stream_time(f, meta->Timestamp);
                handle(f, m, sseq, meta->Timestamp);
                f->next_seq = sseq + 1;
            }
            jsMsgMetaData_Destroy(meta);
        }
        natsMsg_Destroy(m);
    }
    drop_sub(f, &sub);
    return NULL;
}

hl_status hl_fetcher_start(hl_fetcher **out, const hl_config *c, hl_nats *n, hl_queue *q, int shard, uint64_t start_seq,
                           uint64_t epoch)
{
    hl_fetcher *f = calloc(1, sizeof *f);
    if (!f)
        return HL_ERR_NOMEM;
    f->c = c;
    f->n = n;
    f->q = q;
    f->shard = shard;
    f->epoch = epoch;
    f->next_seq = start_seq ? start_seq : 1;
    f->refused_log.burst = 10;
    f->refused_log.window_ms = 60000;
    f->expired_log.burst = 10;
    f->expired_log.window_ms = 60000;
    f->expiry_ms = (uint64_t)hl_config_incomplete_expiry_s(c) * 1000u;
    /* Room for one changeset of the largest size being completed while
     * others wait, and never less than a few publish windows. */
    f->held_budget = 2 * (uint64_t)c->replication_log.max_changeset_bytes;
    if (f->held_budget < ((uint64_t)32 << 20))
        f->held_budget = (uint64_t)32 << 20;
    hl_nats_stream_name(c, shard, f->stream, sizeof f->stream);
    hl_nats_subject(c, shard, f->subject, sizeof f->subject);
    if (pthread_create(&f->th, NULL, run, f) != 0) {
        free(f);
        return HL_ERR_IO;
    }
    *out = f;
    return HL_OK;
}

void hl_fetcher_stop(hl_fetcher *f)
{
    if (!f)
        return;
    atomic_store(&f->stop, 1);
    pthread_join(f->th, NULL);
    for (size_t i = 0; i < f->nslots; i++)
        hl_reasm_free(&f->slots[i].r);
    free(f->slots);
    free(f);
}
