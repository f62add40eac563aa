/*
 * test_publisher.c - outbox -> JetStream against a real nats-server and a real
 * SQLite outbox.
 *
 * The test plays the engine thread: it fills the outbox, calls pump, takes
 * the acks the publisher's ack handler queued and hands them back. What was
 * published is read back from the stream message by message.
 */
#include <check.h>
#include <inttypes.h>
#include <poll.h>
#include <sqlite3.h>
#include <sys/stat.h>

#include "common/log.h"
#include "db/db.h"
#include "js_fixture.h"
#include "powerloss_vfs.h"
#include "repl/changeset.h"
#include "repl/publisher.h"

#define NODE 11

typedef struct pfx {
    fx f;
    hl_db *d;
    hl_publisher *p;
} pfx;

static void pfx_start(pfx *t)
{
    fx_start(&t->f, hl_publisher_ack_handler);
    char *path = fx_printf("%s/app.db", t->f.dir);
    ck_assert_int_eq(hl_db_open(&t->d, path, NODE, 2000), HL_OK);
    free(path);
    ck_assert_int_eq(hl_publisher_new(&t->p, &t->f.c, &t->f.q), HL_OK);
    hl_publisher_attach(t->p, t->f.n);
}

static void pfx_stop(pfx *t)
{
    hl_publisher_attach(t->p, NULL);
    hl_publisher_free(t->p);
    hl_db_close(t->d);
    fx_stop(&t->f);
}

static unsigned char byte_of(uint64_t seq, size_t i)
{
    return (unsigned char)(seq * 131u + i * 7u + (i >> 8));
}

/* Writes outbox row seq with len payload bytes, as capture would. */
static void outbox_put(hl_db *d, uint64_t seq, int flags, uint64_t rows, size_t len)
{
    unsigned char *data = malloc(len ? len : 1);
    ck_assert_ptr_nonnull(data);
    for (size_t i = 0; i < len; i++)
        data[i] = byte_of(seq, i);
    ck_assert_int_eq(hl_db_outbox_put(d, seq, (uint8_t)flags, rows, data, len), HL_OK);
    free(data);
}

static uint64_t outbox_count(hl_db *d)
{
    uint64_t n = 0;
    ck_assert_int_eq(hl_db_outbox_count(d, &n), HL_OK);
    return n;
}

/* What one outbox changeset should look like on the stream. */
typedef struct want_cs {
    uint64_t seq;
    int flags;
    size_t len;
    uint32_t parts;
} want_cs;

/* One engine iteration: pump, then hand the queued acks back. */
static void step(pfx *t)
{
    ck_assert_int_eq(hl_publisher_pump(t->p, t->d), HL_OK);
    hl_ack *acks = NULL;
    size_t n = hl_queue_take_acks(&t->f.q, &acks);
    if (n)
        ck_assert_int_eq(hl_publisher_handle_acks(t->p, t->d, acks, n), HL_OK);
    free(acks);
}

/* Runs the engine's publishing loop until the outbox is empty. */
static void publish_all(pfx *t, int timeout_ms)
{
    int64_t end = fx_now_ms() + timeout_ms;
    for (;;) {
        step(t);
        if (outbox_count(t->d) == 0)
            return;
        ck_assert_msg(fx_now_ms() < end, "outbox not published: %" PRIu64 " rows left", outbox_count(t->d));
        struct pollfd pf = {.fd = t->f.q.wake_fd, .events = POLLIN};
        if (poll(&pf, 1, 100) == 1)
            hl_queue_drain_wake(&t->f.q);
    }
}

/* Waits until every async publish handed to nats.c was acknowledged (the acks
 * are then in the queue). */
static void wait_acked(pfx *t)
{
    jsPubOptions po;
    jsPubOptions_Init(&po);
    po.MaxWait = 60000;
    ck_assert_int_eq(js_PublishAsyncComplete(hl_nats_js(t->f.n), &po), NATS_OK);
}

enum order {
    ORDER_ANY,   /* every part exactly once, in any order */
    ORDER_PARTS, /* and the parts of each changeset in index order */
    ORDER_ALL,   /* and the changesets in outbox order */
};

/*
 * Reads the whole stream and checks it holds exactly one copy of every part
 * of want[0..n) (Nats-Msg-Id, header and payload slice), in the order asked
 * for. Returns how many parts were stored before a lower part of their
 * changeset.
 */
static size_t check_stream(pfx *t, const want_cs *want, size_t n, size_t chunk, enum order order)
{
    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += want[i].parts;
    uint64_t last = fx_stream_last(&t->f);
    ck_assert_uint_eq(last, total);
    uint32_t *next = calloc(n, sizeof *next); /* parts stored so far per changeset */
    unsigned char **seen = calloc(n, sizeof *seen);
    ck_assert_ptr_nonnull(next);
    ck_assert_ptr_nonnull(seen);
    for (size_t k = 0; k < n; k++)
        ck_assert_ptr_nonnull(seen[k] = calloc(want[k].parts, 1));
    size_t cur = 0, reordered = 0;
    /* What a receiver makes of the stream: every changeset completes once. */
    hl_reasm r;
    size_t completed = 0;
    hl_reasm_init(&r, (size_t)1 << 30);
    for (uint64_t sseq = 1; sseq <= last; sseq++) {
        natsMsg *m = NULL;
        jsErrCode jerr = 0;
        ck_assert_int_eq(js_GetMsg(&m, hl_nats_js(t->f.n), t->f.stream, sseq, NULL, &jerr), NATS_OK);
        ck_assert_str_eq(natsMsg_GetSubject(m), t->f.subject);
        hl_part hp;
        ck_assert_int_eq(hl_part_parse(natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m), &hp), HL_OK);
        size_t k = 0;
        while (k < n && want[k].seq != hp.seq)
            k++;
        ck_assert_msg(k < n, "stream sequence %" PRIu64 ": unexpected changeset %" PRIu64, sseq, hp.seq);
        if (order == ORDER_ALL) {
            if (next[cur] == want[cur].parts)
                cur++;
            ck_assert_uint_eq(k, cur);
        }
        ck_assert_uint_lt(hp.index, want[k].parts);
        ck_assert_msg(!seen[k][hp.index], "changeset %" PRIu64 ": part %u stored twice", hp.seq, hp.index);
        seen[k][hp.index] = 1;
        if (hp.index != next[k]) {
            ck_assert_msg(order == ORDER_ANY, "changeset %" PRIu64 ": part %u stored where part %u was due", hp.seq,
                          hp.index, next[k]);
            reordered++;
        }
        next[k]++;
        ck_assert_uint_eq(hp.version, HL_CS_FORMAT_VERSION);
        ck_assert_uint_eq(hp.origin, NODE);
        ck_assert_uint_eq(hp.epoch, hl_db_epoch(t->d));
        ck_assert_uint_eq(hp.flags, (unsigned)want[k].flags);
        ck_assert_uint_eq(hp.count, want[k].parts);
        ck_assert_uint_eq(hp.total_len, want[k].len);
        size_t off = (size_t)hp.index * chunk;
        ck_assert_uint_eq(hp.len, want[k].len - off < chunk ? want[k].len - off : chunk);
        unsigned char *slice = malloc(hp.len + 1);
        ck_assert_ptr_nonnull(slice);
        for (size_t i = 0; i < hp.len; i++)
            slice[i] = byte_of(hp.seq, off + i);
        ck_assert_msg(memcmp(hp.data, slice, hp.len) == 0, "changeset %" PRIu64 " part %u: wrong payload", hp.seq,
                      hp.index);
        free(slice);
        hl_reasm_entry *e = NULL;
        ck_assert_int_eq(hl_reasm_feed(&r, &hp, sseq, &e), HL_OK);
        if (e && e->have == e->count) {
            size_t len = 0;
            uint8_t flags = 0;
            hl_reasm_mark_done(&r, e->epoch, e->seq);
            unsigned char *whole = hl_reasm_take(&r, e, &len, &flags);
            ck_assert_uint_eq(len, want[k].len);
            for (size_t i = 0; i < len; i++)
                ck_assert_msg(whole[i] == byte_of(hp.seq, i), "changeset %" PRIu64 ": reassembled wrong", hp.seq);
            free(whole);
            completed++;
        }
        const char *id = NULL;
        ck_assert_int_eq(natsMsgHeader_Get(m, "Nats-Msg-Id", &id), NATS_OK);
        char want_id[HL_PART_MSG_ID_LEN];
        snprintf(want_id, sizeof want_id, "%d-%016" PRIx64 "-%" PRIu64 "-%u", NODE, hl_db_epoch(t->d), hp.seq,
                 hp.index);
        ck_assert_str_eq(id, want_id);
        natsMsg_Destroy(m);
    }
    for (size_t k = 0; k < n; k++) {
        ck_assert_msg(next[k] == want[k].parts, "changeset %" PRIu64 ": %u of %u parts stored", want[k].seq, next[k],
                      want[k].parts);
        free(seen[k]);
    }
    ck_assert_msg(completed == n && !hl_reasm_pending(&r), "%zu of %zu changesets reassembled, %zu incomplete",
                  completed, n, r.npending);
    hl_reasm_free(&r);
    free(seen);
    free(next);
    return reordered;
}

/* ---- tests ---- */

START_TEST(parts_ids_and_acks)
{
    pfx t;
    fx_init(&t.f, NODE);
    t.f.c.replication_log.chunk_bytes = 1000;
    pfx_start(&t);
    want_cs want[] = {
        {.seq = 1, .flags = 0, .len = 10, .parts = 1},
        {.seq = 2, .flags = HL_PART_FLAG_ZSTD, .len = 1000, .parts = 1}, /* exactly one chunk */
        {.seq = 3, .flags = HL_PART_FLAG_ZSTD | HL_PART_FLAG_MORE, .len = 2500, .parts = 3},
        {.seq = 4, .flags = 0, .len = 1001, .parts = 2},
        {.seq = 7, .flags = 0, .len = 0, .parts = 1}, /* an empty payload is one part; gaps in seq are fine */
    };
    size_t n = sizeof want / sizeof want[0];
    uint64_t rows = 0;
    for (size_t i = 0; i < n; i++) {
        outbox_put(t.d, want[i].seq, want[i].flags, 10 + i, want[i].len);
        rows += 10 + i;
        ck_assert_uint_eq(hl_part_count(want[i].len, 1000), want[i].parts);
    }
    /* Nothing is published without a connection. */
    hl_publisher_attach(t.p, NULL);
    ck_assert_int_eq(hl_publisher_pump(t.p, t.d), HL_OK);
    ck_assert_uint_eq(fx_stream_last(&t.f), 0);
    hl_publisher_attach(t.p, t.f.n);
    ck_assert_int_eq(hl_publisher_next_timeout(t.p), -1);

    /* One pump hands every part over; the outbox rows stay until acked. */
    ck_assert_int_eq(hl_publisher_pump(t.p, t.d), HL_OK);
    ck_assert_int_ge(hl_publisher_next_timeout(t.p), 0); /* waiting for acks */
    wait_acked(&t);
    ck_assert_uint_eq(outbox_count(t.d), n);
    ck_assert_uint_eq(hl_publisher_published(t.p), 0);
    check_stream(&t, want, n, 1000, ORDER_ALL);

    /* Acks of every part delete the rows. */
    publish_all(&t, 60000);
    ck_assert_uint_eq(hl_publisher_published(t.p), n);
    ck_assert_uint_eq(hl_publisher_rows_published(t.p), rows);
    ck_assert_int_eq(hl_publisher_next_timeout(t.p), -1);
    check_stream(&t, want, n, 1000, ORDER_ALL);

    /* A later changeset continues after them. */
    outbox_put(t.d, 8, 0, 1, 5);
    publish_all(&t, 60000);
    want_cs more[] = {want[0], want[1], want[2], want[3], want[4], {.seq = 8, .flags = 0, .len = 5, .parts = 1}};
    check_stream(&t, more, n + 1, 1000, ORDER_ALL);
    ck_assert_uint_eq(hl_publisher_published(t.p), n + 1);
    pfx_stop(&t);
}
END_TEST

START_TEST(partial_acks_keep_the_row)
{
    pfx t;
    fx_init(&t.f, NODE);
    t.f.c.replication_log.chunk_bytes = 100;
    pfx_start(&t);
    outbox_put(t.d, 1, 0, 3, 350); /* 4 parts */
    ck_assert_int_eq(hl_publisher_pump(t.p, t.d), HL_OK);
    wait_acked(&t);
    hl_ack *acks = NULL;
    size_t na = hl_queue_take_acks(&t.f.q, &acks);
    ck_assert_uint_eq(na, 4);
    for (size_t i = 0; i < na; i++) {
        ck_assert_uint_eq(acks[i].seq, 1);
        ck_assert(acks[i].ok);
    }
    /* Three of four parts acknowledged: the row must stay. */
    ck_assert_int_eq(hl_publisher_handle_acks(t.p, t.d, acks, 3), HL_OK);
    ck_assert_uint_eq(outbox_count(t.d), 1);
    ck_assert_uint_eq(hl_publisher_published(t.p), 0);
    /* An ack for a changeset not in flight (from before a restart) is ignored. */
    hl_ack stray = {.seq = 99, .part = 0, .ok = true};
    ck_assert_int_eq(hl_publisher_handle_acks(t.p, t.d, &stray, 1), HL_OK);
    ck_assert_uint_eq(outbox_count(t.d), 1);
    ck_assert_int_eq(hl_publisher_handle_acks(t.p, t.d, acks + 3, 1), HL_OK);
    ck_assert_uint_eq(outbox_count(t.d), 0);
    ck_assert_uint_eq(hl_publisher_published(t.p), 1);
    ck_assert_uint_eq(hl_publisher_rows_published(t.p), 3);
    free(acks);
    want_cs want[] = {{.seq = 1, .flags = 0, .len = 350, .parts = 4}};
    check_stream(&t, want, 1, 100, ORDER_ALL);
    pfx_stop(&t);
}
END_TEST

START_TEST(repeated_ack_counts_once)
{
    pfx t;
    fx_init(&t.f, NODE);
    t.f.c.replication_log.chunk_bytes = 100;
    pfx_start(&t);
    outbox_put(t.d, 1, 0, 1, 250); /* 3 parts */
    ck_assert_int_eq(hl_publisher_pump(t.p, t.d), HL_OK);
    wait_acked(&t);
    hl_ack *acks = NULL;
    ck_assert_uint_eq(hl_queue_take_acks(&t.f.q, &acks), 3);
    /* Part 0 acknowledged three times (an ack of a copy abandoned by a
     * restart can reach the queue after the restart dropped the queued ones,
     * and the re-published copy is acknowledged too): parts 1 and 2 are still
     * unconfirmed, so the row must stay. */
    hl_ack rep[3] = {acks[0], acks[0], acks[0]};
    ck_assert_uint_eq(rep[0].part, 0);
    ck_assert_int_eq(hl_publisher_handle_acks(t.p, t.d, rep, 3), HL_OK);
    ck_assert_uint_eq(outbox_count(t.d), 1);
    ck_assert_uint_eq(hl_publisher_published(t.p), 0);
    /* An ack naming a part the changeset does not have counts for nothing. */
    hl_ack bogus = {.seq = 1, .part = 3, .ok = true};
    ck_assert_int_eq(hl_publisher_handle_acks(t.p, t.d, &bogus, 1), HL_OK);
    ck_assert_uint_eq(outbox_count(t.d), 1);
    ck_assert_int_eq(hl_publisher_handle_acks(t.p, t.d, acks + 1, 2), HL_OK);
    ck_assert_uint_eq(outbox_count(t.d), 0);
    ck_assert_uint_eq(hl_publisher_published(t.p), 1);
    free(acks);

    /* The same with more parts than fit one 64-bit word: every ack but the
     * last part's, each twice, leaves the row; the last one deletes it. */
    outbox_put(t.d, 2, 0, 1, 9950); /* 100 parts */
    ck_assert_int_eq(hl_publisher_pump(t.p, t.d), HL_OK);
    wait_acked(&t);
    size_t na = hl_queue_take_acks(&t.f.q, &acks);
    ck_assert_uint_eq(na, 100);
    size_t last = 0;
    for (size_t i = 0; i < na; i++)
        if (acks[i].part == 99)
            last = i;
    for (int round = 0; round < 2; round++)
        for (size_t i = 0; i < na; i++)
            if (i != last)
                ck_assert_int_eq(hl_publisher_handle_acks(t.p, t.d, &acks[i], 1), HL_OK);
    ck_assert_uint_eq(outbox_count(t.d), 1);
    ck_assert_int_eq(hl_publisher_handle_acks(t.p, t.d, &acks[last], 1), HL_OK);
    ck_assert_uint_eq(outbox_count(t.d), 0);
    ck_assert_uint_eq(hl_publisher_published(t.p), 2);
    free(acks);
    pfx_stop(&t);
}
END_TEST

START_TEST(failed_delete_is_published_again)
{
    pfx t;
    fx_init(&t.f, NODE);
    pfx_start(&t);
    outbox_put(t.d, 1, 0, 1, 10);
    outbox_put(t.d, 2, 0, 1, 10);
    /* The transaction deleting acknowledged rows fails at its commit (here a
     * deferred foreign-key violation; in life a full disk or an I/O error). */
    ck_assert_int_eq(hl_db_exec(t.d,
                                "PRAGMA foreign_keys = ON;"
                                "CREATE TABLE parent(id INTEGER PRIMARY KEY);"
                                "CREATE TABLE blocker(x INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);"
                                "CREATE TRIGGER block AFTER DELETE ON __harmonylite__outbox WHEN old.seq = 2 "
                                "BEGIN INSERT INTO blocker VALUES (42); END;"),
                     HL_OK);
    ck_assert_int_eq(hl_publisher_pump(t.p, t.d), HL_OK);
    wait_acked(&t);
    hl_ack *acks = NULL;
    size_t na = hl_queue_take_acks(&t.f.q, &acks);
    ck_assert_uint_eq(na, 2);
    ck_assert_int_ne(hl_publisher_handle_acks(t.p, t.d, acks, na), HL_OK);
    free(acks);
    ck_assert_uint_eq(outbox_count(t.d), 2);
    ck_assert_uint_eq(hl_publisher_published(t.p), 0);
    /* Once the database accepts it again, the rows still in the outbox are
     * published again (the stream drops the copies) and deleted: none is
     * left behind. */
    ck_assert_int_eq(hl_db_exec(t.d, "DROP TRIGGER block"), HL_OK);
    publish_all(&t, 60000);
    ck_assert_uint_eq(hl_publisher_published(t.p), 2);
    want_cs want[] = {{.seq = 1, .flags = 0, .len = 10, .parts = 1}, {.seq = 2, .flags = 0, .len = 10, .parts = 1}};
    check_stream(&t, want, 2, (size_t)t.f.c.replication_log.chunk_bytes, ORDER_ALL);
    pfx_stop(&t);
}
END_TEST

/* Takes the queued acks; returns how many are for a seq in [lo, hi]. */
static size_t take_acks(pfx *t, uint64_t lo, uint64_t hi, hl_ack **out, size_t *n)
{
    *n = hl_queue_take_acks(&t->f.q, out);
    size_t in = 0;
    for (size_t i = 0; i < *n; i++)
        in += (*out)[i].seq >= lo && (*out)[i].seq <= hi;
    return in;
}

/*
 * Deferred deletes (what the engine runs with): acknowledged rows stay in the
 * outbox, remembered, until the next write step deletes them with its own
 * work, or, without one, a transaction of their own after 200 ms. Meanwhile
 * a re-publish from the oldest row (after a failed publish) skips them.
 */
START_TEST(deferred_deletes_wait_for_a_step_and_are_not_published_again)
{
    pfx t;
    fx_init(&t.f, NODE);
    pfx_start(&t);
    hl_publisher_defer_deletes(t.p, true);
    for (uint64_t seq = 1; seq <= 3; seq++)
        outbox_put(t.d, seq, 0, 1, 10);
    ck_assert_int_eq(hl_publisher_pump(t.p, t.d), HL_OK);
    wait_acked(&t);
    hl_ack *acks = NULL;
    size_t na = 0;
    ck_assert_uint_eq(take_acks(&t, 1, 3, &acks, &na), 3);
    ck_assert_int_eq(hl_publisher_handle_acks(t.p, t.d, acks, na), HL_OK);
    free(acks);
    ck_assert_uint_eq(hl_publisher_published(t.p), 3);
    ck_assert_uint_eq(outbox_count(t.d), 3); /* not deleted yet */
    const uint64_t *done = NULL;
    ck_assert_uint_eq(hl_publisher_done(t.p, &done), 3);

    /* The engine's next write step deletes what is remembered, in its transaction. */
    hl_step s = {.flush_positions = true, .outbox_done = done, .n_outbox_done = 3};
    ck_assert_int_eq(hl_db_step(t.d, NULL, NULL, &s), HL_OK);
    ck_assert(s.committed);
    hl_publisher_done_recorded(t.p, 3);
    ck_assert_uint_eq(outbox_count(t.d), 0);
    ck_assert_uint_eq(hl_publisher_done(t.p, &done), 0);

    /* A publish fails (row 4's failure report, then its real ack): once
     * nothing is in flight, publishing starts again from the oldest outbox
     * row, and must skip row 4, acknowledged and waiting for its delete. */
    outbox_put(t.d, 4, 0, 1, 10);
    ck_assert_int_eq(hl_publisher_pump(t.p, t.d), HL_OK);
    hl_ack fail = {.seq = 4, .part = 0, .ok = false};
    ck_assert_int_eq(hl_publisher_handle_acks(t.p, t.d, &fail, 1), HL_OK);
    wait_acked(&t);
    ck_assert_uint_eq(take_acks(&t, 4, 4, &acks, &na), 1);
    ck_assert_int_eq(hl_publisher_handle_acks(t.p, t.d, acks, na), HL_OK);
    free(acks);
    ck_assert_uint_eq(hl_publisher_published(t.p), 4);
    outbox_put(t.d, 5, 0, 1, 10);
    int64_t end = fx_now_ms() + 30000;
    while (hl_publisher_published(t.p) < 5) {
        ck_assert_msg(fx_now_ms() < end, "row 5 not published");
        ck_assert_int_eq(hl_publisher_pump(t.p, t.d), HL_OK);
        wait_acked(&t);
        ck_assert_uint_eq(take_acks(&t, 1, 4, &acks, &na), 0); /* row 4 was not sent again */
        if (na)
            ck_assert_int_eq(hl_publisher_handle_acks(t.p, t.d, acks, na), HL_OK);
        free(acks);
        usleep(50000);
    }
    /* Row 4 waited past 200 ms (the re-publish waits 500 ms): row 5's ack
     * found the deletes due and made a transaction of their own. */
    ck_assert_uint_eq(outbox_count(t.d), 0);
    ck_assert_uint_eq(hl_publisher_done(t.p, &done), 0);

    /* Without a step, a transaction of their own only once due. */
    outbox_put(t.d, 6, 0, 1, 10);
    ck_assert_int_eq(hl_publisher_pump(t.p, t.d), HL_OK);
    wait_acked(&t);
    take_acks(&t, 6, 6, &acks, &na);
    ck_assert_int_eq(hl_publisher_handle_acks(t.p, t.d, acks, na), HL_OK);
    free(acks);
    ck_assert_uint_eq(outbox_count(t.d), 1); /* not yet due */
    usleep(250000);
    ck_assert_int_eq(hl_publisher_flush_done_if_due(t.p, t.d), HL_OK);
    ck_assert_uint_eq(outbox_count(t.d), 0);
    ck_assert_uint_eq(hl_publisher_done(t.p, &done), 0);
    pfx_stop(&t);
}
END_TEST

/* How many of want[] one pump hands over with no ack handled: whole
 * changesets while both window bounds are below their limit. */
static size_t window_fill(const want_cs *want, size_t n, size_t *parts)
{
    size_t k = 0, bytes = 0;
    *parts = 0;
    while (k < n && *parts < HL_PUBLISH_WINDOW_PARTS && (bytes < HL_PUBLISH_WINDOW_BYTES || k == 0)) {
        *parts += want[k].parts;
        bytes += want[k].len;
        k++;
    }
    return k;
}

START_TEST(window_holds_at_parts_bound)
{
    pfx t;
    fx_init(&t.f, NODE);
    t.f.c.replication_log.chunk_bytes = 64;
    pfx_start(&t);
    /* Small changesets of 1 and 2 parts: the parts bound is what stops the pump. */
    enum { N = 300 };
    want_cs *want = calloc(N, sizeof *want);
    ck_assert_ptr_nonnull(want);
    ck_assert_int_eq(hl_db_begin(t.d), HL_OK);
    for (size_t i = 0; i < N; i++) {
        size_t len = i % 3 == 0 ? 100 : 20;
        want[i] = (want_cs){.seq = i + 1, .flags = 0, .len = len, .parts = hl_part_count(len, 64)};
        outbox_put(t.d, i + 1, 0, 1, len);
    }
    ck_assert_int_eq(hl_db_commit(t.d), HL_OK);
    size_t parts = 0, k = window_fill(want, N, &parts);
    ck_assert_uint_lt(k, N);
    ck_assert_uint_ge(parts, HL_PUBLISH_WINDOW_PARTS);
    ck_assert_uint_le(parts, HL_PUBLISH_WINDOW_PARTS + 1);

    ck_assert_int_eq(hl_publisher_pump(t.p, t.d), HL_OK);
    wait_acked(&t);
    ck_assert_uint_eq(fx_stream_last(&t.f), parts);
    /* Without acks handled the window stays full: pumping again sends nothing. */
    ck_assert_int_eq(hl_publisher_pump(t.p, t.d), HL_OK);
    wait_acked(&t);
    ck_assert_uint_eq(fx_stream_last(&t.f), parts);
    check_stream(&t, want, k, 64, ORDER_ALL);
    ck_assert_uint_eq(outbox_count(t.d), N);

    /* Acks open the window; the rest follows. */
    publish_all(&t, 120000);
    ck_assert_uint_eq(hl_publisher_published(t.p), N);
    check_stream(&t, want, N, 64, ORDER_ALL);
    free(want);
    pfx_stop(&t);
}
END_TEST

START_TEST(window_holds_at_bytes_bound)
{
    pfx t;
    fx_init(&t.f, NODE);
    pfx_start(&t); /* default chunk_bytes: 512 KiB */
    size_t chunk = (size_t)t.f.c.replication_log.chunk_bytes;
    /* Changesets of 3 MiB: a few parts each, so the bytes bound stops the pump. */
    enum { N = 5 };
    want_cs want[N];
    for (size_t i = 0; i < N; i++) {
        size_t len = (3u << 20) + i;
        want[i] = (want_cs){.seq = i + 1, .flags = HL_PART_FLAG_MORE, .len = len, .parts = hl_part_count(len, chunk)};
        outbox_put(t.d, i + 1, HL_PART_FLAG_MORE, 1000, len);
    }
    size_t parts = 0, k = window_fill(want, N, &parts);
    ck_assert_uint_lt(k, N);
    ck_assert_uint_lt(parts, HL_PUBLISH_WINDOW_PARTS);

    ck_assert_int_eq(hl_publisher_pump(t.p, t.d), HL_OK);
    wait_acked(&t);
    ck_assert_uint_eq(fx_stream_last(&t.f), parts);
    ck_assert_int_eq(hl_publisher_pump(t.p, t.d), HL_OK);
    wait_acked(&t);
    ck_assert_uint_eq(fx_stream_last(&t.f), parts);
    check_stream(&t, want, k, chunk, ORDER_ALL);

    publish_all(&t, 120000);
    ck_assert_uint_eq(hl_publisher_published(t.p), N);
    ck_assert_uint_eq(hl_publisher_rows_published(t.p), N * 1000);
    check_stream(&t, want, N, chunk, ORDER_ALL);
    pfx_stop(&t);
}
END_TEST

START_TEST(lost_acks_republish_deduplicated)
{
    pfx t;
    fx_init(&t.f, NODE);
    t.f.c.replication_log.chunk_bytes = 100;
    pfx_start(&t);
    enum { N = 50 };
    want_cs want[N];
    for (size_t i = 0; i < N; i++) {
        want[i] = (want_cs){.seq = i + 1, .flags = 0, .len = 250, .parts = 3};
        outbox_put(t.d, i + 1, 0, 1, 250);
    }
    /* Everything is stored, but the acks never reach the publisher (a
     * connection lost right after the server stored the messages). */
    ck_assert_int_eq(hl_publisher_pump(t.p, t.d), HL_OK);
    wait_acked(&t);
    hl_ack *acks = NULL;
    ck_assert_uint_eq(hl_queue_take_acks(&t.f.q, &acks), N * 3);
    free(acks);
    check_stream(&t, want, N, 100, ORDER_ALL);
    /* The publisher gives up waiting, publishes every row again, and the
     * stream's duplicate window acknowledges the copies without storing them. */
    publish_all(&t, 120000);
    ck_assert_uint_eq(hl_publisher_published(t.p), N);
    check_stream(&t, want, N, 100, ORDER_ALL);
    pfx_stop(&t);
}
END_TEST

static void fill_window(void *arg)
{
    pfx *t = arg;
    for (int i = 0; i < 3; i++)
        step(t);
}

START_TEST(server_restart_mid_publish)
{
    pfx t;
    fx_init(&t.f, NODE);
    t.f.c.replication_log.chunk_bytes = 100;
    pfx_start(&t);
    enum { N = 3000 };
    want_cs *want = calloc(N, sizeof *want);
    ck_assert_ptr_nonnull(want);
    ck_assert_int_eq(hl_db_begin(t.d), HL_OK);
    for (size_t i = 0; i < N; i++) {
        size_t len = 150 + i % 200;
        want[i] = (want_cs){.seq = i + 1, .flags = 0, .len = len, .parts = hl_part_count(len, 100)};
        outbox_put(t.d, i + 1, 0, 1, len);
    }
    ck_assert_int_eq(hl_db_commit(t.d), HL_OK);
    /* Publish part of it, then stop the server while the window is full. */
    int64_t end = fx_now_ms() + 120000;
    while (hl_publisher_published(t.p) < N / 10) {
        ck_assert_msg(fx_now_ms() < end, "publishing did not start");
        step(&t);
        fx_sleep_ms(1);
    }
    /* The server stops reading while the publisher fills its window, then
     * shuts down: what it had not stored is lost with the connection, what it
     * stored may never be acknowledged. SIGTERM: the server writes out what it
     * acknowledged (a SIGKILL may lose acknowledged writes it had not written
     * yet, which no publisher can repair). */
    fx_restart_server(&t.f, SIGTERM, fill_window, &t);
    publish_all(&t, 240000);
    ck_assert_uint_eq(hl_publisher_published(t.p), N);
    /* A part can be stored before a lower part of its changeset (the lower
     * one died in the socket, the higher one waited in nats.c's reconnect
     * buffer and went out after the reconnection; the re-published copy of
     * the higher one is then dropped as a duplicate). check_stream() feeds
     * the stream to the receivers' reassembly, which must complete every
     * changeset anyway. */
    size_t reordered = check_stream(&t, want, N, 100, ORDER_ANY);
    if (reordered)
        fprintf(stderr, "note: %zu parts stored before a lower part of their changeset\n", reordered);
    free(want);
    pfx_stop(&t);
}
END_TEST

START_TEST(server_killed_while_publishing)
{
    pfx t;
    fx_init(&t.f, NODE);
    t.f.c.replication_log.chunk_bytes = 100;
    pfx_start(&t);
    /* Changesets of 15..22 parts, so that kills land between parts of one. */
    enum { N = 1000, KILLS = 2 };
    want_cs *want = calloc(N, sizeof *want);
    ck_assert_ptr_nonnull(want);
    ck_assert_int_eq(hl_db_begin(t.d), HL_OK);
    for (size_t i = 0; i < N; i++) {
        size_t len = 1500 + i % 700;
        want[i] = (want_cs){.seq = i + 1, .flags = 0, .len = len, .parts = hl_part_count(len, 100)};
        outbox_put(t.d, i + 1, 0, 1, len);
    }
    ck_assert_int_eq(hl_db_commit(t.d), HL_OK);
    /* kill -9 while the publisher keeps pumping: parts die in the socket, in
     * nats.c's buffers and between the server's store and its ack. The
     * engine loop goes on through the disconnection and the restart. */
    int kills = 0;
    int64_t end = fx_now_ms() + 240000;
    while (outbox_count(t.d)) {
        ck_assert_msg(fx_now_ms() < end, "outbox not published: %" PRIu64 " rows left", outbox_count(t.d));
        step(&t);
        int pid = hl_nats_server_pid(t.f.srv);
        if (kills < KILLS && hl_publisher_published(t.p) >= (uint64_t)(kills + 1) * N / (KILLS + 2) && pid > 0 &&
            hl_nats_connected(t.f.n)) {
            ck_assert_int_eq(kill(pid, SIGKILL), 0);
            kills++;
        }
        fx_sleep_ms(1);
    }
    ck_assert_int_eq(kills, KILLS);
    ck_assert_uint_eq(hl_publisher_published(t.p), N);
    /* A part can be stored before a lower part of its changeset (the lower
     * one died in the socket, the higher one waited in nats.c's reconnect
     * buffer and went out after the reconnection; the re-published copy of
     * the higher one is then dropped as a duplicate). check_stream() feeds
     * the stream to the receivers' reassembly, which must complete every
     * changeset anyway. */
    size_t reordered = check_stream(&t, want, N, 100, ORDER_ANY);
    if (reordered)
        fprintf(stderr, "note: %zu parts stored before a lower part of their changeset\n", reordered);
    free(want);
    pfx_stop(&t);
}
END_TEST

/*
 * A changeset leaves the node only once its outbox row is on disk. Under
 * synchronous = NORMAL a commit is not: a power loss right after the publish
 * would take the row and the sequence it used back, the next capture would
 * reuse the sequence for other rows, and JetStream's duplicate window (or the
 * receivers' applied sequence) would drop those everywhere else.
 */
START_TEST(a_published_changeset_survives_a_power_loss)
{
    plv_install();
    pfx t;
    fx_init(&t.f, NODE);
    pfx_start(&t);
    plv_sync_all(); /* the database as opened counts as on disk */
    outbox_put(t.d, 1, 0, 1, 10);
    ck_assert_int_eq(hl_publisher_pump(t.p, t.d), HL_OK);
    wait_acked(&t);
    ck_assert_uint_eq(fx_stream_last(&t.f), 1); /* it left the node */

    char *db = fx_printf("%s/app.db", t.f.dir), *after = fx_printf("%s/after", t.f.dir);
    ck_assert_int_eq(mkdir(after, 0700), 0);
    char path[1024];
    plv_power_loss(db, after, path, sizeof path);
    hl_db *d = NULL;
    ck_assert_int_eq(hl_db_open(&d, path, NODE, 2000), HL_OK);
    ck_assert_uint_eq(hl_db_epoch(d), hl_db_epoch(t.d));
    hl_outbox_entry e;
    hl_outbox_entry_init(&e, 1u << 20);
    ck_assert_msg(hl_db_outbox_next(d, 0, &e) == HL_OK, "the published changeset was lost with the power");
    ck_assert_uint_eq(e.seq, 1);
    ck_assert_uint_eq(e.payload.len, 10);
    hl_outbox_entry_free(&e);
    hl_db_close(d);
    free(db);
    free(after);
    pfx_stop(&t);
}
END_TEST

START_TEST(shard_for_node_spreads)
{
    int count[4] = {0};
    for (uint64_t node = 1; node <= 400; node++) {
        int s = hl_shard_for_node(node, 4);
        ck_assert_int_ge(s, 0);
        ck_assert_int_lt(s, 4);
        ck_assert_int_eq(hl_shard_for_node(node, 4), s); /* stable */
        count[s]++;
    }
    for (int s = 0; s < 4; s++)
        ck_assert_int_gt(count[s], 50);
    ck_assert_int_eq(hl_shard_for_node(7, 1), 0);
    ck_assert_int_eq(hl_shard_for_node(7, 0), 0);
}
END_TEST

static Suite *publisher_suite(void)
{
    Suite *s = suite_create("publisher");
    struct {
        const char *name;
        const TTest *test;
        int timeout;
    } cases[] = {
        {"shard_for_node_spreads", shard_for_node_spreads, 10},
        {"parts_ids_and_acks", parts_ids_and_acks, 120},
        {"partial_acks_keep_the_row", partial_acks_keep_the_row, 120},
        {"repeated_ack_counts_once", repeated_ack_counts_once, 120},
        {"failed_delete_is_published_again", failed_delete_is_published_again, 120},
        {"deferred_deletes_wait_for_a_step_and_are_not_published_again",
         deferred_deletes_wait_for_a_step_and_are_not_published_again, 120},
        {"window_holds_at_parts_bound", window_holds_at_parts_bound, 180},
        {"window_holds_at_bytes_bound", window_holds_at_bytes_bound, 180},
        {"lost_acks_republish_deduplicated", lost_acks_republish_deduplicated, 180},
        {"server_restart_mid_publish", server_restart_mid_publish, 300},
        {"server_killed_while_publishing", server_killed_while_publishing, 300},
        {"a_published_changeset_survives_a_power_loss", a_published_changeset_survives_a_power_loss, 120},
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
    hl_db_global_init();
    SRunner *sr = srunner_create(publisher_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
