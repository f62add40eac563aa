/*
 * test_fetcher.c - JetStream -> engine queue against a real nats-server.
 *
 * The test publishes raw parts with nats.c (as another node's publisher, or a
 * hostile client, would) and plays the engine: it pops what the fetcher queued
 * and checks each item's changeset and safe stream position.
 */
#include <check.h>
#include <inttypes.h>
#include <poll.h>

#include "common/log.h"
#include "js_fixture.h"
#include "repl/changeset.h"
#include "repl/fetcher.h"

#define NODE 21                 /* the fetching node */
#define EPOCH 0x1234abcd5678ull /* its database incarnation */
#define PEER 5
#define PEER_EPOCH 0xfeedull

typedef struct ffx {
    fx f;
    hl_fetcher *fe;
    hl_inbound *got, *got_tail; /* popped, not yet looked at */
} ffx;

static void ffx_start(ffx *t, uint64_t start_seq)
{
    ck_assert_int_eq(hl_fetcher_start(&t->fe, &t->f.c, t->f.n, &t->f.q, 0, start_seq, EPOCH), HL_OK);
}

static void ffx_stop(ffx *t)
{
    hl_queue_close(&t->f.q); /* a fetcher blocked on a full queue returns */
    hl_fetcher_stop(t->fe);
    hl_inbound_free(t->got);
    fx_stop(&t->f);
}

/* A changeset of rows upserts into t(id, v), encoded as a publisher sends it. */
static unsigned char *encode_cs(uint64_t origin, uint64_t epoch, uint64_t seq, size_t rows, bool compress, size_t *len)
{
    hl_changeset *cs = hl_changeset_new();
    ck_assert_ptr_nonnull(cs);
    cs->origin = origin;
    cs->epoch = epoch;
    cs->seq = seq;
    cs->wall_ms = 1700000000000ull;
    const char *cols[] = {"id", "v"}, *pk[] = {"id"};
    uint32_t tb;
    ck_assert_int_eq(hl_changeset_add_table(cs, "t", cols, 2, pk, 1, &tb), HL_OK);
    for (size_t i = 0; i < rows; i++) {
        char text[64];
        snprintf(text, sizeof text, "row %zu of changeset %" PRIu64 " ........................", i, seq);
        hl_value key = {.type = HL_VAL_INT, .u.i = (int64_t)i};
        hl_value vals[2] = {key, {.type = HL_VAL_TEXT, .u.b = {(unsigned char *)text, strlen(text)}}};
        ck_assert_int_eq(hl_changeset_add_row(cs, tb, HL_OP_UPSERT, (seq << 16) + i, &key, 1, vals, 2), HL_OK);
    }
    hl_buf b;
    hl_buf_init(&b, 64u << 20);
    ck_assert_int_eq(hl_changeset_encode(cs, compress, &b), HL_OK);
    hl_changeset_free(cs);
    return hl_buf_steal(&b, len);
}

/* Publishes raw bytes with an optional Msg-Id; returns the stream sequence. */
static uint64_t publish_raw(ffx *t, const void *data, size_t len, const char *msg_id)
{
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MsgId = msg_id;
    po.MaxWait = 30000;
    jsPubAck *pa = NULL;
    jsErrCode jerr = 0;
    natsStatus s = js_Publish(&pa, hl_nats_js(t->f.n), t->f.subject, data, (int)len, &po, &jerr);
    ck_assert_msg(s == NATS_OK, "js_Publish: %s (%d)", natsStatus_GetText(s), (int)jerr);
    ck_assert(!pa->Duplicate);
    uint64_t seq = pa->Sequence;
    jsPubAck_Destroy(pa);
    return seq;
}

/* Publishes part index of payload cut at chunk bytes; returns its stream sequence. */
static uint64_t publish_part(ffx *t, uint64_t origin, uint64_t epoch, uint64_t seq, uint8_t flags,
                             const unsigned char *payload, size_t len, size_t chunk, uint32_t index)
{
    hl_part hp;
    ck_assert_int_eq(hl_part_slice(&hp, payload, len, chunk, index), HL_OK);
    hp.origin = origin;
    hp.epoch = epoch;
    hp.seq = seq;
    hp.flags = flags;
    unsigned char *msg = malloc(HL_PART_HEADER_LEN + hp.len + 1);
    ck_assert_ptr_nonnull(msg);
    hl_part_header_write(&hp, msg);
    memcpy(msg + HL_PART_HEADER_LEN, hp.data, hp.len);
    char id[HL_PART_MSG_ID_LEN];
    hl_part_msg_id(&hp, id, sizeof id);
    uint64_t sseq = publish_raw(t, msg, HL_PART_HEADER_LEN + hp.len, id);
    free(msg);
    return sseq;
}

/* Publishes a whole changeset of rows rows (every part); returns the stream
 * sequence of its last part. */
static uint64_t publish_cs(ffx *t, uint64_t origin, uint64_t epoch, uint64_t seq, size_t rows, bool compress,
                           size_t chunk)
{
    size_t len = 0;
    unsigned char *p = encode_cs(origin, epoch, seq, rows, compress, &len);
    uint32_t count = hl_part_count(len, chunk);
    uint64_t last = 0;
    for (uint32_t i = 0; i < count; i++)
        last = publish_part(t, origin, epoch, seq, compress ? HL_PART_FLAG_ZSTD : 0, p, len, chunk, i);
    free(p);
    return last;
}

/* The next item the fetcher queued, waiting generously for it. */
static hl_inbound *next_item(ffx *t)
{
    int64_t end = fx_now_ms() + 60000;
    while (!t->got) {
        hl_inbound *l = hl_queue_pop(&t->f.q, SIZE_MAX);
        if (l) {
            t->got = l;
            continue;
        }
        ck_assert_msg(fx_now_ms() < end, "nothing queued by the fetcher");
        struct pollfd pf = {.fd = t->f.q.wake_fd, .events = POLLIN};
        if (poll(&pf, 1, 200) == 1)
            hl_queue_drain_wake(&t->f.q);
    }
    hl_inbound *it = t->got;
    t->got = it->next;
    it->next = NULL;
    return it;
}

/* Expects a position-only item (nothing to apply) with this safe position. */
static void expect_skip(ffx *t, uint64_t safe_seq)
{
    hl_inbound *it = next_item(t);
    ck_assert_ptr_null(it->cs);
    ck_assert_int_eq(it->shard, 0);
    ck_assert_uint_eq(it->safe_seq, safe_seq);
    hl_inbound_free(it);
}

/* Expects the changeset (origin, epoch, seq) of rows rows with this safe position. */
static void expect_cs(ffx *t, uint64_t origin, uint64_t epoch, uint64_t seq, size_t rows, bool compressed,
                      uint64_t safe_seq)
{
    hl_inbound *it = next_item(t);
    ck_assert_msg(it->cs != NULL, "no changeset where %" PRIu64 "/%" PRIu64 " was due (safe_seq %" PRIu64 ")", origin,
                  seq, it->safe_seq);
    ck_assert_uint_eq(it->cs->origin, origin);
    ck_assert_uint_eq(it->cs->epoch, epoch);
    ck_assert_uint_eq(it->cs->seq, seq);
    ck_assert_uint_eq(it->cs->nrows, rows);
    ck_assert_uint_eq(it->safe_seq, safe_seq);
    ck_assert_uint_eq(it->flags, compressed ? HL_PART_FLAG_ZSTD : 0);
    /* The raw payload is kept (to hold the changeset) and is what was sent. */
    size_t len = 0;
    unsigned char *p = encode_cs(origin, epoch, seq, rows, compressed, &len);
    ck_assert_uint_eq(it->rawlen, len);
    ck_assert_int_eq(memcmp(it->raw, p, len), 0);
    free(p);
    for (size_t i = 0; i < rows; i++) {
        ck_assert_int_eq(it->cs->rows[i].key[0].type, HL_VAL_INT);
        ck_assert_int_eq(it->cs->rows[i].key[0].u.i, (int64_t)i);
    }
    hl_inbound_free(it);
}

static void wait_received(ffx *t, uint64_t sseq)
{
    int64_t end = fx_now_ms() + 60000;
    while (hl_fetcher_received(t->fe) < sseq) {
        ck_assert_msg(fx_now_ms() < end, "stream sequence %" PRIu64 " not received", sseq);
        fx_sleep_ms(20);
    }
}

/* ---- tests ---- */

START_TEST(reads_from_start_and_reassembles)
{
    ffx t = {0};
    fx_init(&t.f, NODE);
    fx_start(&t.f, NULL);
    for (uint64_t s = 1; s <= 4; s++)
        ck_assert_uint_eq(publish_cs(&t, PEER, PEER_EPOCH, s, 3, s % 2 == 0, 1 << 20), s);
    /* Three parts of 200 bytes at most: sequences 5..7. */
    size_t len = 0;
    unsigned char *p = encode_cs(PEER, PEER_EPOCH, 5, 20, false, &len);
    uint32_t count = hl_part_count(len, 200);
    free(p);
    ck_assert_uint_ge(count, 3);
    uint64_t last = publish_cs(&t, PEER, PEER_EPOCH, 5, 20, false, 200);
    ck_assert_uint_eq(last, 4 + count);

    /* The database says 1 and 2 were applied: reading starts at 3. */
    ffx_start(&t, 3);
    expect_cs(&t, PEER, PEER_EPOCH, 3, 3, false, 3);
    expect_cs(&t, PEER, PEER_EPOCH, 4, 3, true, 4);
    /* The parts before the last: nothing to apply, and the position stays
     * before the changeset's first part. */
    for (uint32_t i = 0; i + 1 < count; i++)
        expect_skip(&t, 4);
    expect_cs(&t, PEER, PEER_EPOCH, 5, 20, false, last);
    wait_received(&t, last);
    ck_assert_uint_eq(hl_fetcher_received(t.fe), last);

    /* Live: what is published while the fetcher runs arrives too, compressed
     * and in several parts. */
    uint64_t l2 = publish_cs(&t, PEER, PEER_EPOCH, 6, 50, true, 100);
    ck_assert_uint_gt(l2, last + 1);
    for (uint64_t s = last + 1; s < l2; s++)
        expect_skip(&t, last);
    expect_cs(&t, PEER, PEER_EPOCH, 6, 50, true, l2);
    ck_assert_uint_eq(hl_fetcher_malformed(t.fe), 0);
    ck_assert_uint_eq(hl_fetcher_expired(t.fe), 0);
    ffx_stop(&t);
}
END_TEST

START_TEST(skips_own_changesets)
{
    ffx t = {0};
    fx_init(&t.f, NODE);
    fx_start(&t.f, NULL);
    ffx_start(&t, 0); /* 0: from the beginning */
    /* Ours (this node, this incarnation): only the position moves. */
    ck_assert_uint_eq(publish_cs(&t, NODE, EPOCH, 1, 2, true, 1 << 20), 1);
    expect_skip(&t, 1);
    /* Ours in several parts: every part skipped, none held as pending. */
    uint64_t l = publish_cs(&t, NODE, EPOCH, 2, 30, false, 100);
    for (uint64_t s = 2; s <= l; s++)
        expect_skip(&t, s);
    /* This node's id from an earlier incarnation (a restored or re-created
     * database) is another writer: applied. */
    uint64_t s3 = publish_cs(&t, NODE, EPOCH + 1, 1, 2, true, 1 << 20);
    expect_cs(&t, NODE, EPOCH + 1, 1, 2, true, s3);
    ck_assert_uint_eq(hl_fetcher_malformed(t.fe), 0);
    ffx_stop(&t);
}
END_TEST

START_TEST(refuses_malformed_parts)
{
    ffx t = {0};
    fx_init(&t.f, NODE);
    fx_start(&t.f, NULL);
    ffx_start(&t, 1);
    uint64_t malformed = 0;

    /* Not a part at all. */
    uint64_t s = publish_raw(&t, "hello", 5, NULL);
    expect_skip(&t, s);
    ck_assert_uint_eq(hl_fetcher_malformed(t.fe), ++malformed);

    /* A header with the wrong magic, or cut short. */
    size_t len = 0;
    unsigned char *p = encode_cs(PEER, PEER_EPOCH, 1, 2, false, &len);
    hl_part hp;
    ck_assert_int_eq(hl_part_slice(&hp, p, len, 1 << 20, 0), HL_OK);
    hp.origin = PEER;
    hp.epoch = PEER_EPOCH;
    hp.seq = 1;
    unsigned char *msg = malloc(HL_PART_HEADER_LEN + len);
    ck_assert_ptr_nonnull(msg);
    hl_part_header_write(&hp, msg);
    memcpy(msg + HL_PART_HEADER_LEN, p, len);
    msg[0] = 'X';
    s = publish_raw(&t, msg, HL_PART_HEADER_LEN + len, NULL);
    expect_skip(&t, s);
    ck_assert_uint_eq(hl_fetcher_malformed(t.fe), ++malformed);
    msg[0] = 'H';
    s = publish_raw(&t, msg, HL_PART_HEADER_LEN - 1, NULL);
    expect_skip(&t, s);
    ck_assert_uint_eq(hl_fetcher_malformed(t.fe), ++malformed);

    /* A whole message whose payload is not a changeset. */
    memset(msg + HL_PART_HEADER_LEN, 0xff, len);
    s = publish_raw(&t, msg, HL_PART_HEADER_LEN + len, NULL);
    expect_skip(&t, s);
    ck_assert_uint_eq(hl_fetcher_malformed(t.fe), ++malformed);

    /* Compressed according to its flags, but not zstd. */
    memcpy(msg + HL_PART_HEADER_LEN, p, len);
    hp.flags = HL_PART_FLAG_ZSTD;
    hl_part_header_write(&hp, msg);
    s = publish_raw(&t, msg, HL_PART_HEADER_LEN + len, NULL);
    expect_skip(&t, s);
    ck_assert_uint_eq(hl_fetcher_malformed(t.fe), ++malformed);

    /* A payload that disagrees with its header (another sequence). */
    hp.flags = 0;
    hp.seq = 9;
    hl_part_header_write(&hp, msg);
    s = publish_raw(&t, msg, HL_PART_HEADER_LEN + len, NULL);
    expect_skip(&t, s);
    ck_assert_uint_eq(hl_fetcher_malformed(t.fe), ++malformed);
    free(msg);
    free(p);

    /* A part that disagrees with the other parts of its changeset (another
     * total length) is refused; the changeset it claims to belong to is not
     * harmed and completes. */
    p = encode_cs(PEER, PEER_EPOCH, 2, 30, false, &len);
    uint32_t count = hl_part_count(len, 100);
    ck_assert_uint_ge(count, 3);
    uint64_t s0 = publish_part(&t, PEER, PEER_EPOCH, 2, 0, p, len, 100, 0);
    expect_skip(&t, s0 - 1);
    ck_assert_int_eq(hl_part_slice(&hp, p, len - 1, 100, 1), HL_OK);
    hp.origin = PEER;
    hp.epoch = PEER_EPOCH;
    hp.seq = 2;
    msg = malloc(HL_PART_HEADER_LEN + hp.len);
    ck_assert_ptr_nonnull(msg);
    hl_part_header_write(&hp, msg);
    memcpy(msg + HL_PART_HEADER_LEN, hp.data, hp.len);
    publish_raw(&t, msg, HL_PART_HEADER_LEN + hp.len, NULL);
    free(msg);
    expect_skip(&t, s0 - 1);
    ck_assert_uint_eq(hl_fetcher_malformed(t.fe), ++malformed);
    for (uint32_t i = 1; i < count; i++) {
        s = publish_part(&t, PEER, PEER_EPOCH, 2, 0, p, len, 100, i);
        if (i + 1 < count)
            expect_skip(&t, s0 - 1);
    }
    expect_cs(&t, PEER, PEER_EPOCH, 2, 30, false, s);
    free(p);

    /* None of it stops what is well-formed. */
    s = publish_cs(&t, PEER, PEER_EPOCH, 3, 4, true, 1 << 20);
    expect_cs(&t, PEER, PEER_EPOCH, 3, 4, true, s);
    ck_assert_uint_eq(hl_fetcher_malformed(t.fe), malformed);
    ffx_stop(&t);
}
END_TEST

START_TEST(safe_position_holds_before_incomplete)
{
    ffx t = {0};
    fx_init(&t.f, NODE);
    fx_start(&t.f, NULL);
    ffx_start(&t, 1);
    size_t alen = 0, blen = 0;
    unsigned char *a = encode_cs(PEER, PEER_EPOCH, 1, 30, false, &alen);
    unsigned char *b = encode_cs(PEER + 1, PEER_EPOCH, 1, 30, false, &blen);
    uint32_t acount = hl_part_count(alen, 200), bcount = hl_part_count(blen, 200);
    ck_assert_uint_ge(acount, 2);
    ck_assert_uint_ge(bcount, 2);

    /* PEER's part 0 at sequence 1: nothing up to it may be recorded. */
    ck_assert_uint_eq(publish_part(&t, PEER, PEER_EPOCH, 1, 0, a, alen, 200, 0), 1);
    expect_skip(&t, 0);
    /* Complete changesets of another origin arrive meanwhile: applied, but the
     * position stays before PEER's part 0. */
    uint64_t s = publish_cs(&t, PEER + 2, PEER_EPOCH, 1, 2, false, 1 << 20);
    expect_cs(&t, PEER + 2, PEER_EPOCH, 1, 2, false, 0);
    /* PEER+1 starts one too: still before PEER's part 0, the earlier one. */
    uint64_t b0 = publish_part(&t, PEER + 1, PEER_EPOCH, 1, 0, b, blen, 200, 0);
    expect_skip(&t, 0);
    /* PEER completes: the position now stops before PEER+1's part 0. */
    for (uint32_t i = 1; i < acount; i++) {
        s = publish_part(&t, PEER, PEER_EPOCH, 1, 0, a, alen, 200, i);
        if (i + 1 < acount)
            expect_skip(&t, 0);
    }
    hl_inbound *it = next_item(&t);
    ck_assert_ptr_nonnull(it->cs);
    ck_assert_uint_eq(it->cs->origin, PEER);
    ck_assert_uint_eq(it->safe_seq, b0 - 1);
    hl_inbound_free(it);
    /* PEER+1 completes: everything up to its last part may be recorded. */
    for (uint32_t i = 1; i < bcount; i++) {
        s = publish_part(&t, PEER + 1, PEER_EPOCH, 1, 0, b, blen, 200, i);
        if (i + 1 < bcount)
            expect_skip(&t, b0 - 1);
    }
    expect_cs(&t, PEER + 1, PEER_EPOCH, 1, 30, false, s);
    /* A re-published part 0 of a pending changeset (a publisher's restart)
     * does not move the first part's position forward. */
    free(a);
    a = encode_cs(PEER, PEER_EPOCH, 2, 30, false, &alen);
    acount = hl_part_count(alen, 200);
    uint64_t a0 = publish_part(&t, PEER, PEER_EPOCH, 2, 0, a, alen, 200, 0);
    expect_skip(&t, a0 - 1);
    /* Same part, another Msg-Id would be deduplicated; publish the copy as a
     * raw message the stream keeps. */
    hl_part hp;
    ck_assert_int_eq(hl_part_slice(&hp, a, alen, 200, 0), HL_OK);
    hp.origin = PEER;
    hp.epoch = PEER_EPOCH;
    hp.seq = 2;
    unsigned char *msg = malloc(HL_PART_HEADER_LEN + hp.len);
    ck_assert_ptr_nonnull(msg);
    hl_part_header_write(&hp, msg);
    memcpy(msg + HL_PART_HEADER_LEN, hp.data, hp.len);
    publish_raw(&t, msg, HL_PART_HEADER_LEN + hp.len, NULL);
    free(msg);
    expect_skip(&t, a0 - 1);
    for (uint32_t i = 1; i < acount; i++) {
        s = publish_part(&t, PEER, PEER_EPOCH, 2, 0, a, alen, 200, i);
        if (i + 1 < acount)
            expect_skip(&t, a0 - 1);
    }
    expect_cs(&t, PEER, PEER_EPOCH, 2, 30, false, s);
    ck_assert_uint_eq(hl_fetcher_malformed(t.fe), 0);
    free(a);
    free(b);
    ffx_stop(&t);
}
END_TEST

/* A writer whose server died mid-publish leaves its parts stored out of
 * order (the lost ones re-published after later ones buffered by its client
 * library), sometimes two changesets' parts mixed: each changeset is still
 * delivered whole, once, and the position never passes a first part held. */
START_TEST(parts_in_any_order)
{
    ffx t = {0};
    fx_init(&t.f, NODE);
    fx_start(&t.f, NULL);
    ffx_start(&t, 1);
    size_t alen = 0, blen = 0;
    unsigned char *a = encode_cs(PEER, PEER_EPOCH, 1, 30, false, &alen);
    unsigned char *b = encode_cs(PEER, PEER_EPOCH, 2, 30, true, &blen);
    uint32_t acount = hl_part_count(alen, 200), bcount = hl_part_count(blen, 100);
    ck_assert_uint_ge(acount, 3);
    ck_assert_uint_ge(bcount, 2);

    /* a's last part first, then b's parts in reverse, then the rest of a
     * from part 0 up. */
    uint64_t first = publish_part(&t, PEER, PEER_EPOCH, 1, 0, a, alen, 200, acount - 1);
    expect_skip(&t, first - 1);
    uint64_t s = 0;
    for (uint32_t i = bcount; i-- > 0;) {
        s = publish_part(&t, PEER, PEER_EPOCH, 2, HL_PART_FLAG_ZSTD, b, blen, 100, i);
        if (i)
            expect_skip(&t, first - 1);
    }
    /* b is whole: delivered, but the position stays before a's first part. */
    expect_cs(&t, PEER, PEER_EPOCH, 2, 30, true, first - 1);
    for (uint32_t i = 0; i + 1 < acount; i++) {
        s = publish_part(&t, PEER, PEER_EPOCH, 1, 0, a, alen, 200, i);
        if (i + 2 < acount)
            expect_skip(&t, first - 1);
    }
    expect_cs(&t, PEER, PEER_EPOCH, 1, 30, false, s);
    ck_assert_uint_eq(hl_fetcher_malformed(t.fe), 0);
    ck_assert_uint_eq(hl_fetcher_expired(t.fe), 0);
    free(a);
    free(b);
    ffx_stop(&t);
}
END_TEST

START_TEST(expiry_by_stream_time)
{
    ffx t = {0};
    fx_init(&t.f, NODE);
    t.f.c.replication_log.incomplete_expiry_s = 1;
    fx_start(&t.f, NULL);
    ffx_start(&t, 1);
    size_t alen = 0;
    unsigned char *a = encode_cs(PEER, PEER_EPOCH, 1, 30, false, &alen);
    ck_assert_uint_ge(hl_part_count(alen, 200), 2);
    uint64_t a0 = publish_part(&t, PEER, PEER_EPOCH, 1, 0, a, alen, 200, 0);
    int64_t t0 = fx_now_ms();
    expect_skip(&t, a0 - 1);
    /* Other messages keep arriving (the fetcher is never idle). Once one is
     * stored more than the expiry after PEER's part 0, the incomplete
     * changeset is dropped and the position moves past it. */
    uint64_t seq = 0;
    bool expired = false;
    while (!expired) {
        uint64_t s = publish_cs(&t, PEER + 1, PEER_EPOCH, ++seq, 1, false, 1 << 20);
        hl_inbound *it = next_item(&t);
        while (!it->cs) {
            /* Only if this thread stalled so long that the fetcher went idle
             * and expired it by local time: a position past part 0. */
            ck_assert_uint_eq(hl_fetcher_expired(t.fe), 1);
            ck_assert_uint_ge(it->safe_seq, a0);
            hl_inbound_free(it);
            it = next_item(&t);
        }
        ck_assert_uint_eq(it->cs->seq, seq);
        if (it->safe_seq == s) {
            expired = true;
        } else {
            ck_assert_msg(!expired, "the position went back before an expired changeset");
            ck_assert_uint_eq(it->safe_seq, a0 - 1);
        }
        hl_inbound_free(it);
        ck_assert_msg(fx_now_ms() - t0 < 120000, "the incomplete changeset did not expire");
        fx_sleep_ms(200);
    }
    ck_assert_uint_eq(hl_fetcher_expired(t.fe), 1);
    /* Its missing part arriving after all is held again, never applied
     * half-way; when its writer re-publishes the whole changeset (a restart
     * after the duplicate window), it completes and is applied. All stored
     * back to back: stored more than the 1 s expiry apart, the stream's own
     * timestamps would expire the held part again, rightly. */
    uint32_t acount = hl_part_count(alen, 200);
    uint64_t s = publish_part(&t, PEER, PEER_EPOCH, 1, 0, a, alen, 200, 1);
    hl_part hp;
    ck_assert_int_eq(hl_part_slice(&hp, a, alen, 200, 0), HL_OK);
    hp.origin = PEER;
    hp.epoch = PEER_EPOCH;
    hp.seq = 1;
    unsigned char *msg = malloc(HL_PART_HEADER_LEN + hp.len);
    ck_assert_ptr_nonnull(msg);
    hl_part_header_write(&hp, msg);
    memcpy(msg + HL_PART_HEADER_LEN, hp.data, hp.len);
    uint64_t last = publish_raw(&t, msg, HL_PART_HEADER_LEN + hp.len, NULL); /* ids of the first publish are spent */
    free(msg);
    for (uint32_t i = 2; i < acount; i++)
        last = publish_part(&t, PEER, PEER_EPOCH, 1, 0, a, alen, 200, i);
    for (uint32_t i = 1; i < acount; i++)
        expect_skip(&t, s - 1);
    expect_cs(&t, PEER, PEER_EPOCH, 1, 30, false, last);
    ck_assert_uint_eq(hl_fetcher_malformed(t.fe), 0);
    free(a);
    ffx_stop(&t);
}
END_TEST

START_TEST(expiry_by_local_time_at_end)
{
    ffx t = {0};
    fx_init(&t.f, NODE);
    t.f.c.replication_log.incomplete_expiry_s = 1;
    fx_start(&t.f, NULL);
    uint64_t s1 = publish_cs(&t, PEER + 1, PEER_EPOCH, 1, 1, false, 1 << 20);
    size_t alen = 0;
    unsigned char *a = encode_cs(PEER, PEER_EPOCH, 1, 30, false, &alen);
    uint64_t a0 = publish_part(&t, PEER, PEER_EPOCH, 1, 0, a, alen, 200, 0);
    ffx_start(&t, 1);
    expect_cs(&t, PEER + 1, PEER_EPOCH, 1, 1, false, s1);
    expect_skip(&t, a0 - 1);
    /* Nothing else comes: the fetcher, at the end of the stream, expires it
     * by local time and queues the position past it. */
    expect_skip(&t, a0);
    ck_assert_uint_eq(hl_fetcher_expired(t.fe), 1);
    free(a);
    ffx_stop(&t);
}
END_TEST

START_TEST(consumer_recreated_after_server_restart)
{
    ffx t = {0};
    fx_init(&t.f, NODE);
    fx_start(&t.f, NULL);
    ffx_start(&t, 1);
    uint64_t seq = 0, s = 0;
    for (int i = 0; i < 3; i++) {
        s = publish_cs(&t, PEER, PEER_EPOCH, ++seq, 2, true, 1 << 20);
        expect_cs(&t, PEER, PEER_EPOCH, seq, 2, true, s);
    }
    for (int round = 0; round < 2; round++) {
        fx_restart_server(&t.f, SIGTERM, NULL, NULL);
        /* What is published after the restart arrives, once each and in order. */
        for (int i = 0; i < 3; i++) {
            s = publish_cs(&t, PEER, PEER_EPOCH, ++seq, 2, true, 1 << 20);
            expect_cs(&t, PEER, PEER_EPOCH, seq, 2, true, s);
        }
    }
    int64_t end = fx_now_ms() + 60000;
    while (hl_fetcher_stalled_ms(t.fe) != 0) {
        ck_assert_msg(fx_now_ms() < end, "the fetcher stays stalled");
        fx_sleep_ms(50);
    }
    fprintf(stderr, "consumer re-created %" PRIu64 " times\n", hl_fetcher_restarts(t.fe));
    ck_assert_uint_eq(hl_fetcher_received(t.fe), s);
    ck_assert_uint_eq(hl_fetcher_malformed(t.fe), 0);
    ck_assert_ptr_null(t.got);
    ck_assert(!hl_queue_has_items(&t.f.q));
    ffx_stop(&t);
}
END_TEST

START_TEST(consumer_recreated_after_server_stall)
{
    ffx t = {0};
    fx_init(&t.f, NODE);
    fx_start(&t.f, NULL);
    ffx_start(&t, 1);
    uint64_t seq = 0, s = 0;
    for (int i = 0; i < 3; i++) {
        s = publish_cs(&t, PEER, PEER_EPOCH, ++seq, 2, false, 1 << 20);
        expect_cs(&t, PEER, PEER_EPOCH, seq, 2, false, s);
    }
    /* The server stops answering but keeps its connections: no heartbeats, no
     * replies. The fetcher notices and reports it. */
    int pid = hl_nats_server_pid(t.f.srv);
    ck_assert_int_gt(pid, 0);
    ck_assert_int_eq(kill(pid, SIGSTOP), 0);
    int64_t end = fx_now_ms() + 120000;
    while (hl_fetcher_stalled_ms(t.fe) == 0) {
        if (fx_now_ms() > end) {
            kill(pid, SIGCONT);
            ck_abort_msg("the fetcher did not notice the server stopped answering");
        }
        fx_sleep_ms(50);
    }
    ck_assert_int_eq(kill(pid, SIGCONT), 0);
    /* Once it answers again, a new consumer reads on from where the old one
     * stopped: nothing lost, nothing twice. */
    for (int i = 0; i < 3; i++) {
        s = publish_cs(&t, PEER, PEER_EPOCH, ++seq, 2, false, 1 << 20);
        expect_cs(&t, PEER, PEER_EPOCH, seq, 2, false, s);
    }
    end = fx_now_ms() + 60000;
    while (hl_fetcher_stalled_ms(t.fe) != 0) {
        ck_assert_msg(fx_now_ms() < end, "the fetcher stays stalled");
        fx_sleep_ms(50);
    }
    ck_assert_uint_ge(hl_fetcher_restarts(t.fe), 1);
    ck_assert_uint_eq(hl_fetcher_received(t.fe), s);
    ck_assert_ptr_null(t.got);
    ck_assert(!hl_queue_has_items(&t.f.q));
    ffx_stop(&t);
}
END_TEST

/*
 * Stopping a fetcher while its consumer is delivering. nats.c 3.4.1's reader
 * looks a subscription up and locks it without holding a reference, so a
 * subscription released while a message for it is in flight is used after it
 * was freed (seen as a SIGSEGV/abort at a node's stop right after a start,
 * while it caught up). Many starts and stops, each in the middle of a stream
 * of thousands of parts, under ASan in CI.
 */
START_TEST(stop_while_delivering)
{
    ffx t = {0};
    fx_init(&t.f, NODE);
    fx_start(&t.f, NULL);
    /* Our own changeset in a few thousand parts: each is only a position. */
    uint64_t last = publish_cs(&t, NODE, EPOCH, 1, 3000, false, 64);
    ck_assert_uint_ge(last, 2000);
    for (int round = 0; round < 40; round++) {
        ffx_start(&t, 1);
        int64_t end = fx_now_ms() + 60000;
        while (hl_fetcher_received(t.fe) < 1 + (uint64_t)round * 37 % 500) {
            ck_assert_msg(fx_now_ms() < end, "round %d: nothing received", round);
            hl_inbound_free(hl_queue_pop(&t.f.q, SIZE_MAX));
            hl_queue_drain_wake(&t.f.q);
        }
        hl_fetcher_stop(t.fe);
        t.fe = NULL;
        hl_inbound_free(hl_queue_pop(&t.f.q, SIZE_MAX));
    }
    ffx_start(&t, 1);
    ffx_stop(&t);
}
END_TEST

static Suite *fetcher_suite(void)
{
    Suite *s = suite_create("fetcher");
    struct {
        const char *name;
        const TTest *test;
        int timeout;
    } cases[] = {
        {"reads_from_start_and_reassembles", reads_from_start_and_reassembles, 120},
        {"skips_own_changesets", skips_own_changesets, 120},
        {"refuses_malformed_parts", refuses_malformed_parts, 120},
        {"safe_position_holds_before_incomplete", safe_position_holds_before_incomplete, 120},
        {"parts_in_any_order", parts_in_any_order, 120},
        {"expiry_by_stream_time", expiry_by_stream_time, 180},
        {"expiry_by_local_time_at_end", expiry_by_local_time_at_end, 180},
        {"consumer_recreated_after_server_restart", consumer_recreated_after_server_restart, 240},
        {"consumer_recreated_after_server_stall", consumer_recreated_after_server_stall, 240},
        {"stop_while_delivering", stop_while_delivering, 300},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        TCase *tc = tcase_create(cases[i].name);
        tcase_set_timeout(tc, cases[i].timeout);
        tcase_add_test(tc, cases[i].test);
        suite_add_tcase(s, tc);
    }
    return s;
}

int main(void)
{
    hl_log_setup(HL_LOG_INFO, false, 0);
    SRunner *sr = srunner_create(fetcher_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
