#include "repl/fetcher.h"

#include <inttypes.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"

#define MAX_ORIGINS 4096 /* reassembly slots; beyond this, hostile traffic is refused */

typedef struct origin_slot {
    uint64_t origin;
    hl_reasm r;
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
    atomic_uint_fast64_t received, malformed;
    origin_slot *slots;
    size_t nslots;
    hl_ratelimit refused_log; /* a hostile flood must not flood the log too */
};

uint64_t hl_fetcher_received(const hl_fetcher *f)
{
    return atomic_load(&f->received);
}

uint64_t hl_fetcher_malformed(const hl_fetcher *f)
{
    return atomic_load(&f->malformed);
}

static hl_reasm *slot_for(hl_fetcher *f, uint64_t origin)
{
    for (size_t i = 0; i < f->nslots; i++)
        if (f->slots[i].origin == origin)
            return &f->slots[i].r;
    if (f->nslots >= MAX_ORIGINS)
        return NULL;
    origin_slot *ns = realloc(f->slots, (f->nslots + 1) * sizeof *ns);
    if (!ns)
        return NULL;
    f->slots = ns;
    f->slots[f->nslots].origin = origin;
    hl_reasm_init(&f->slots[f->nslots].r, (size_t)f->c->replication_log.max_changeset_bytes);
    return &f->slots[f->nslots++].r;
}

/* The engine may record sseq as done unless a partly received changeset began earlier. */
static uint64_t safe_seq(hl_fetcher *f, uint64_t sseq)
{
    uint64_t safe = sseq;
    for (size_t i = 0; i < f->nslots; i++)
        if (hl_reasm_pending(&f->slots[i].r) && f->slots[i].r.first_stream_seq - 1 < safe)
            safe = f->slots[i].r.first_stream_seq - 1;
    return safe;
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

static void handle(hl_fetcher *f, natsMsg *m, uint64_t sseq)
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
    hl_reasm *r = slot_for(f, part.origin);
    if (!r) {
        refuse(f, sseq, "too many origins");
        return;
    }
    bool complete = false;
    if (hl_reasm_feed(r, &part, sseq, &complete)) {
        refuse(f, sseq, "part out of order");
        return;
    }
    if (!complete) {
        push(f, sseq, NULL, NULL, 0, 0); /* safe_seq stays before part 0 */
        return;
    }
    size_t rawlen = 0;
    uint8_t flags = r->flags;
    unsigned char *raw = hl_buf_steal(&r->buf, &rawlen);
    hl_reasm_reset(r);
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
    push(f, sseq, cs, raw, rawlen, flags);
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

static void *run(void *arg)
{
    hl_fetcher *f = arg;
    natsSubscription *sub = NULL;
    while (!atomic_load(&f->stop)) {
        if (!sub) {
            if (!hl_nats_connected(f->n) || !(sub = subscribe(f))) {
                for (int i = 0; i < 10 && !atomic_load(&f->stop); i++)
                    usleep(100000);
                continue;
            }
        }
        natsMsg *m = NULL;
        natsStatus s = natsSubscription_NextMsg(&m, sub, 500);
        if (s == NATS_TIMEOUT)
            continue;
        if (s != NATS_OK) {
            hl_logf(HL_LOG_WARN, "stream %s: %s; resubscribing", f->stream, natsStatus_GetText(s));
            natsSubscription_Destroy(sub);
            sub = NULL;
            continue;
        }
        jsMsgMetaData *meta = NULL;
        if (natsMsg_GetMetaData(&meta, m) == NATS_OK) {
            uint64_t sseq = meta->Sequence.Stream;
            if (sseq >= f->next_seq) {
                atomic_store(&f->received, sseq);
                handle(f, m, sseq);
                f->next_seq = sseq + 1;
            }
            jsMsgMetaData_Destroy(meta);
        }
        natsMsg_Destroy(m);
    }
    if (sub) {
        natsSubscription_Unsubscribe(sub);
        natsSubscription_Destroy(sub);
    }
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
