/*
 * engine.c - wires the modules together and runs the engine loop.
 *
 * Threads: the engine (this file; the only one touching SQLite), one fetcher
 * per shard, nats.c's own threads (callbacks only enqueue), the nats-server
 * supervisor in embedded mode, and a signal thread. The engine sleeps in poll()
 * on the database watcher (src/db/watch.c: inotify, short re-checks after
 * each file event, the polling interval as a fallback) and the queue's eventfd.
 */
#include "engine.h"

#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/hlc.h"
#include "common/log.h"
#include "common/timers.h"
#include "common/buf.h"
#include "db/db.h"
#include "http/http.h"
#include "http/state.h"
#include "natsio/conn.h"
#include "natsio/discovery.h"
#include "natsio/server.h"
#include "registry/registry.h"
#include "repl/changeset.h"
#include "repl/fetcher.h"
#include "repl/publisher.h"
#include "repl/queue.h"
#include "signals.h"
#include "snapshot/catchup.h"
#include "snapshot/schedule.h"
#include "snapshot/store.h"

#define TOMBSTONE_GC_MS (3600u * 1000u)
#define IDLE_RELEASE_MS 5000u /* a whole period without an engine transaction: give memory back */
#define SEQ_FLUSH_MS 1000
/* Between two merge batches of a catch-up the write lock is left free at
 * least this long: back to back, the batches starved the application's
 * writers for the whole merge (SQLite's busy handler retries after growing
 * sleeps and kept missing the instant between two batches). */
#define CATCHUP_PAUSE_MS 20

typedef struct engine {
    hl_config *c;
    hl_db *d;
    hl_queue q;
    hl_nats_server *srv;
    hl_discovery *disc; /* NULL without DNS entries in nats.cluster_peers */
    hl_nats *n;
    hl_publisher *pub;
    hl_fetcher **fetchers;
    char **streams;
    uint64_t *applied_seq; /* per shard: recorded in the database */
    uint64_t *seen_seq;    /* per shard: safe sequence reached, maybe not recorded yet */
    uint64_t *cap;         /* per shard: read again from here once held changesets leave room (0: none) */
    hl_positions pos;      /* the three above and the stream names, for hl_db_step */
    hl_watch *watch;
    hl_timers timers; /* periodic jobs: held changesets, position flush, tombstone GC, idle memory release */
    int t_held;       /* its held-changesets timer */
    bool flush_due;   /* the position-flush timer fired: record positions with the next write */
    bool retry_held;
    bool expire_held;    /* an out-of-order hold waited order_hold_timeout: give up on its predecessors */
    bool recapture;      /* the last cycle that captured failed: capture again without a new wake-up */
    bool worked;         /* an engine transaction committed since the last idle tick */
    bool released;       /* memory given back since the last work (idle_tick) */
    uint64_t fail_since; /* monotonic ms of the first failure of the current run of failed cycles, 0: none */
    uint64_t failures;   /* failed engine transactions */
    char fail_reason[200];
    hl_state state;
    hl_state_snapshot snap; /* engine-owned; published to state each iteration */
    hl_http *http;
    hl_registry *reg; /* the schema registry's thread, once online */
    uint64_t reg_gen; /* its view last copied into snap */
    /* NATS comes up in its own thread so the engine keeps capturing (and its
     * heartbeat keeps beating) while a cluster forms or a server is away. */
    pthread_t setup_th;
    bool setup_started;
    atomic_int setup_done;              /* 0 running, 1 ready, -1 failed */
    bool online;                        /* setup finished and publisher/fetchers started */
    bool stream_gap;                    /* a stream lost messages this node had not applied */
    uint64_t *setup_first, *setup_last; /* stream bounds read by the setup thread */
    hl_catchup *catchup;                /* catching up from a snapshot (snapshot/catchup.h); NULL: not */
    uint64_t last_seen_ms;              /* wall ms of this node's last version before this start (0: none) */
    uint64_t catchup_rows_done;         /* rows merged by finished catch-ups */
    uint64_t catchup_next_ms;           /* monotonic ms the next merge batch may start */
    char gap_base[300];                 /* which stream starts past this node's position */
    hl_ratelimit fail_log;
    hl_ratelimit defer_log; /* changesets deferred at schema.max_held_bytes */
    hl_sched *sched;        /* periodic snapshots and sleep_timeout (snapshot/schedule.h), once online */
    bool sched_tried;
} engine;

/* Describes the replicated tables for /schema. */
static void schema_to_state(engine *e)
{
    hl_db *d = e->d;
    const unsigned char *prev = hl_db_prev_schema_hash(d);
    free(e->snap.schema_json);
    e->snap.schema_json = hl_db_schema_json(d);
    hl_hex(hl_db_schema_hash(d), 32, e->snap.schema_hash);
    if (prev)
        hl_hex(prev, 32, e->snap.prev_schema_hash);
    e->snap.triggers_installed = true;
    hl_registry_set_local(e->reg, e->snap.schema_hash, e->snap.prev_schema_hash, e->snap.schema_json);
}

/*
 * Held changesets into the snapshot (/schema, the schema check's reason), and
 * whether an out-of-order hold has waited long enough to give up on its
 * missing predecessors (done in the next cycle).
 */
static void held_to_state(engine *e)
{
    hl_state_snapshot *s = &e->snap;
    uint64_t for_schema = 0, oldest = 0;
    hl_db_held_count(e->d, &s->held_now, &for_schema, &oldest);
    const uint64_t *done = NULL;
    size_t ndone = e->pub ? hl_publisher_done(e->pub, &done) : 0; /* acknowledged, their delete pending */
    if (hl_db_outbox_count(e->d, &s->outbox_rows) == HL_OK)
        s->outbox_rows = s->outbox_rows > ndone ? s->outbox_rows - ndone : 0;
    hl_held_origin *v = NULL;
    size_t n = 0;
    s->nheld = 0;
    s->held_origins = 0;
    s->paused_reason[0] = 0;
    if (s->held_now && hl_db_held_list(e->d, &v, &n) == HL_OK) {
        uint64_t first_schema_origin = 0;
        s->held_origins = n;
        for (size_t i = 0; i < n; i++) {
            if (i < HL_STATE_MAX_HELD) {
                hl_state_held *h = &s->held[s->nheld++];
                h->node = v[i].node;
                h->epoch = v[i].epoch;
                h->count = v[i].count;
                h->for_schema = v[i].for_schema;
                h->first_seq = v[i].first_seq;
                h->applied = v[i].applied;
                h->since_ms = v[i].since_ms;
                h->bytes = v[i].bytes;
                snprintf(h->reason, sizeof h->reason, "%s", v[i].reason);
            }
            if (v[i].for_schema && !first_schema_origin)
                first_schema_origin = v[i].node;
        }
        hl_held_list_free(v);
        if (for_schema)
            snprintf(s->paused_reason, sizeof s->paused_reason,
                     "%llu changesets wait for the local schema to match their origin's (see /schema; "
                     "harmonylite -drop-held %llu drops those of node %llu)",
                     (unsigned long long)for_schema, (unsigned long long)first_schema_origin,
                     (unsigned long long)first_schema_origin);
    }
    s->paused = for_schema > 0;
    /* Held only for order: normal for a moment after a publish retry; after
     * order_hold_timeout the predecessors are given up on (hl_apply_expire_held
     * checks each origin's own wait). */
    uint64_t older = hl_now_ms() - (uint64_t)e->c->order_hold_timeout_s * 1000u;
    if (s->held_now > for_schema && oldest && oldest <= older && hl_apply_held_due(e->d, older))
        e->expire_held = true;
}

/* ---- timers (hl_timers) ---- */

/* Stops shard s's reader; what it pushes meanwhile, and what it queued, is dropped. */
static void stop_fetcher(engine *e, int s)
{
    hl_queue_discard_shard(&e->q, s, true);
    hl_fetcher_stop(e->fetchers[s]);
    e->fetchers[s] = NULL;
    hl_queue_discard_shard(&e->q, s, false);
}

/*
 * schema.max_held_bytes (docs/architecture.md, "Held changesets"): a shard
 * where a changeset was deferred (HL_DEFERRED) is read again from before it
 * once what counts against the bound fell to half of it: its fetcher is
 * stopped and started again at that position (JetStream kept the messages;
 * those of other origins read twice are duplicates).
 */
static void held_bound_check(engine *e)
{
    hl_state_snapshot *s = &e->snap;
    uint64_t bounded = 0, max = (uint64_t)e->c->schema.max_held_bytes;
    int capped = 0;
    for (int i = 0; e->cap && i < e->c->replication_log.shards; i++)
        capped += e->cap[i] != 0;
    s->held_bytes = hl_db_held_bytes(e->d, &bounded) == HL_OK ? bounded : s->held_bytes;
    s->held_bound_streams = (uint64_t)capped;
    s->held_bound_reason[0] = 0;
    if (!capped)
        return;
    if (bounded > max / 2 || !e->online || e->catchup || e->stream_gap) {
        snprintf(s->held_bound_reason, sizeof s->held_bound_reason,
                 "%" PRIu64 " bytes are held for origins waiting for the local schema (schema.max_held_bytes %" PRIu64
                 "): their further changesets are not read on %d stream%s until room frees (JetStream keeps them; "
                 "see /schema, or harmonylite -drop-held ORIGIN)",
                 bounded, max, capped, capped == 1 ? "" : "s");
        return;
    }
    for (int i = 0; i < e->c->replication_log.shards; i++) {
        if (!e->cap[i])
            continue;
        uint64_t from = e->cap[i];
        stop_fetcher(e, i);
        if (e->seen_seq[i] >= from)
            e->seen_seq[i] = from - 1; /* cannot happen: seen stays below the cap */
        if (hl_fetcher_start(&e->fetchers[i], e->c, e->n, &e->q, i, from, hl_db_epoch(e->d))) {
            hl_errorf("cannot restart the consumer of stream %s; retrying", e->streams[i]);
            continue; /* cap kept: retried at the next tick */
        }
        e->cap[i] = 0;
        hl_infof("held changesets left room (%" PRIu64 " bytes held): reading stream %s again from sequence %" PRIu64,
                 bounded, e->streams[i], from);
    }
}

static void held_tick(void *arg)
{
    engine *e = arg;
    if (e->d) {
        held_to_state(e);
        held_bound_check(e);
    }
}

/* Stream positions that only moved are recorded with the next write, at the
 * latest a second later (a lost position only re-reads skipped messages). */
static void flush_tick(void *arg)
{
    ((engine *)arg)->flush_due = true;
}

static void gc_tick(void *arg)
{
    engine *e = arg;
    uint64_t n = 0, older = hl_now_ms() - (uint64_t)e->c->tombstone_retention_s * 1000u;
    if (hl_db_gc(e->d, older, &n) == HL_OK)
        hl_debugf("collected %" PRIu64 " tombstones", n);
}

/* At rest, memory goes back: a node that did nothing for a whole period
 * releases its page cache and free heap once (docs/performance.md, memory). */
static void idle_tick(void *arg)
{
    engine *e = arg;
    if (e->worked)
        e->released = false;
    else if (!e->released && e->d) {
        hl_db_release_memory(e->d);
        e->released = true;
    }
    e->worked = false;
}

/* Copies counters and readiness inputs into the snapshot and publishes it. */
static void publish_state(engine *e)
{
    hl_state_snapshot *s = &e->snap;
    hl_db *d = e->d;
    s->engine_beat_ms = hl_mono_ms();
    if (d) {
        const hl_db_stats *st = hl_db_counters(d);
        s->rows_captured = st->rows_captured;
        s->changesets_captured = st->changesets_captured;
        s->rows_applied = st->rows_applied;
        s->rows_skipped_lww = st->rows_skipped_lww;
        s->conflicts = st->conflicts;
        s->changesets_applied = st->changesets_applied;
        s->changesets_duplicate = st->changesets_duplicate;
        s->changesets_malformed = st->changesets_malformed;
        s->changesets_held = st->changesets_held;
        s->changesets_late = st->changesets_late;
        s->chains_applied = st->chains_applied;
        s->order_gaps = st->order_gaps;
        s->table_resyncs = st->table_resyncs;
        s->missed_rows = st->missed_rows;
        s->clock_ahead = st->clock_ahead;
        s->changesets_deferred = st->changesets_deferred;
    }
    char *cluster = NULL;
    if (hl_registry_view(e->reg, &e->reg_gen, &s->schema_odd, s->schema_odd_reason, sizeof s->schema_odd_reason,
                         &cluster)) {
        free(s->cluster_json);
        s->cluster_json = cluster;
    }
    s->engine_failures = e->failures;
    s->engine_stalled = e->fail_since && hl_mono_ms() - e->fail_since >= (uint64_t)e->c->stall_timeout_s * 1000u;
    if (s->engine_stalled)
        snprintf(s->engine_reason, sizeof s->engine_reason, "engine transactions failing for %llu s: %s",
                 (unsigned long long)((hl_mono_ms() - e->fail_since) / 1000u), e->fail_reason);
    else
        s->engine_reason[0] = 0;
    if (e->pub) {
        s->changesets_published = hl_publisher_published(e->pub);
        s->rows_published = hl_publisher_rows_published(e->pub);
    }
    s->nats_connected = e->online && hl_nats_connected(e->n);
    if (e->online && e->srv) {
        s->nats_server_running = hl_nats_server_running(e->srv);
        s->nats_server_restarts = hl_nats_server_restarts(e->srv);
    }
    uint64_t malformed = 0;
    bool caught = true;
    for (int i = 0; e->seen_seq && i < s->nstreams; i++) {
        s->streams[i].applied_seq = e->seen_seq[i];
        if (e->fetchers && e->fetchers[i]) {
            malformed += hl_fetcher_malformed(e->fetchers[i]);
            s->streams[i].stalled_ms = hl_fetcher_stalled_ms(e->fetchers[i]);
            s->streams[i].consumer_restarts = hl_fetcher_restarts(e->fetchers[i]);
            s->streams[i].changesets_expired = hl_fetcher_expired(e->fetchers[i]);
            uint64_t rcv = hl_fetcher_received(e->fetchers[i]);
            if (rcv > s->streams[i].tail_seq)
                s->streams[i].tail_seq = rcv;
        }
        if (e->c->replicate && e->seen_seq[i] < s->streams[i].start_tail &&
            !(e->cap[i] && s->streams[i].tail_seq >= s->streams[i].start_tail))
            caught = false; /* a capped stream was read to its start tail: caught up, the rest is deferred */
    }
    s->messages_malformed = malformed;
    if (e->sched) {
        hl_sched_feed(e->sched, s->rows_captured + s->rows_applied + s->changesets_applied,
                      s->streams_ready && caught && !e->stream_gap && !e->catchup);
        hl_sched_info si;
        hl_sched_info_get(e->sched, &si);
        s->snap_sched = true;
        s->snap_taken = si.taken;
        s->snap_failures = si.failures;
        s->snap_last_bytes = si.last_bytes;
        s->snap_last_ms = si.last_duration_ms;
        s->snap_newest_ms = si.newest_ms;
        s->snap_newest_node = si.newest_node;
        snprintf(s->snap_newest, sizeof s->snap_newest, "%s", si.newest);
    }
    if (s->streams_ready)
        s->caught_up = caught;
    else if (e->snap.embedded && atomic_load(&e->setup_done) == 0)
        s->nats_server_running = true; /* still starting: liveness must not fail */
    hl_state_publish(&e->state, s);
}

/*
 * One engine cycle: hl_db_step captures (when local is set), applies items
 * after it and records the positions, in the order db/step.c keeps; this
 * keeps the engine's own bookkeeping (held-changeset flags, the timer that
 * shows their result, /readyz's lag and schema). On failure nothing is lost:
 * the transaction rolled back and the caller puts the items back.
 */
static hl_status cycle(engine *e, hl_inbound *items, bool local, bool flush_positions)
{
    hl_step s = {
        .capture = local,
        .retry_held = e->retry_held,
        .expire_before_ms = e->expire_held ? hl_now_ms() - (uint64_t)e->c->order_hold_timeout_s * 1000u : 0,
        .flush_positions = flush_positions,
    };
    /* Acknowledged outbox rows go with this transaction instead of one of their own. */
    s.n_outbox_done = hl_publisher_done(e->pub, &s.outbox_done);
    uint64_t deferred = hl_db_counters(e->d)->changesets_deferred;
    hl_status st = hl_db_step(e->d, items, &e->pos, &s);
    if (!st && s.committed)
        hl_publisher_done_recorded(e->pub, s.n_outbox_done);
    e->retry_held = s.retry_held;
    if (!st && s.committed && hl_db_counters(e->d)->changesets_deferred > deferred) {
        uint64_t dropped = 0;
        if (hl_ratelimit_allow(&e->defer_log, &dropped))
            hl_warnf("%" PRIu64 " changesets not stored: their origin waits for the local schema and holding them "
                     "would pass schema.max_held_bytes (%lld); that origin's changesets are read again once room "
                     "frees (JetStream keeps them)",
                     hl_db_counters(e->d)->changesets_deferred - deferred, (long long)e->c->schema.max_held_bytes);
        hl_timers_due_now(&e->timers, e->t_held); /* show it at once */
    }
    if (st || !s.committed)
        return st;
    hl_watch_captured(e->watch, s.rows_captured, hl_mono_ms());
    e->worked = true;
    if (e->expire_held) {
        e->expire_held = false;
        hl_timers_due_now(&e->timers, e->t_held); /* show the result at once */
    }
    uint64_t now = hl_now_ms();
    for (hl_inbound *it = items; it; it = it->next)
        if (it->applied)
            hl_state_observe_lag(&e->snap, now > it->cs->wall_ms ? (double)(now - it->cs->wall_ms) / 1000.0 : 0.0);
    if (s.schema_changed)
        schema_to_state(e);
    e->flush_due = false;
    return HL_OK;
}

/*
 * A failed engine transaction rolled back: nothing is lost and it is retried.
 * Failures are logged (rate-limited) and counted; after stall_timeout without
 * a success /readyz reports the node not ready with the last error.
 */
static void cycle_failed(engine *e, hl_status st, bool captured)
{
    uint64_t dropped = 0;
    e->failures++;
    if (!e->fail_since)
        e->fail_since = hl_mono_ms();
    const char *why = hl_db_last_error(e->d);
    snprintf(e->fail_reason, sizeof e->fail_reason, "%s%s%s", hl_status_str(st), why[0] ? ": " : "", why);
    if (captured)
        e->recapture = true; /* the change logs still hold it; no new wake-up may come */
    if (hl_ratelimit_allow(&e->fail_log, &dropped))
        hl_warnf("engine transaction failed (%s); nothing is lost, retrying%s", e->fail_reason,
                 dropped ? " (repeated failures not logged)" : "");
    usleep(200000);
}

static void cycle_succeeded(engine *e)
{
    if (e->fail_since) {
        hl_infof("engine transactions succeed again after %llu failures", (unsigned long long)e->failures);
        e->fail_since = 0;
    }
    e->recapture = false;
    hl_db_clear_error(e->d);
}

/* Items that carry nothing to apply only move the stream position; it is
 * recorded lazily (a lost position only re-reads messages that are skipped). */
static bool only_positions(hl_inbound *items)
{
    for (hl_inbound *it = items; it; it = it->next)
        if (it->cs)
            return false;
    return true;
}

static hl_status start_nats(engine *e)
{
    hl_config *c = e->c;
    const char *const *urls = (const char *const *)c->nats.urls.v;
    size_t nurls = c->nats.urls.n;
    const char *local[1];
    hl_status st;
    if (nurls == 0) {
        /* Peers from DNS (discovery.h): waits for nats.cluster_min_peers. */
        hl_peer_set peers;
        hl_peer_set_init(&peers);
        if ((st = hl_discovery_start(&e->disc, c, hl_signals_stop_flag())) ||
            (st = hl_discovery_peers(e->disc, c, &peers)) ||
            (st = hl_nats_server_start_peers(&e->srv, c, &peers, 30000))) {
            hl_peer_set_free(&peers);
            return st;
        }
        hl_peer_set_free(&peers);
        hl_discovery_attach(e->disc, e->srv);
        local[0] = hl_nats_server_client_url(e->srv);
        urls = local;
        nurls = 1;
    }
    if ((st = hl_nats_connect(&e->n, c, urls, nurls, hl_publisher_ack_handler, &e->q, 4096, hl_signals_stop_flag())))
        return st;
    /* A JetStream cluster needs a quorum before streams can be created: keep
     * trying (and logging) until it forms or we are told to stop. An attempt
     * the server refuses at once (a standalone server asked for 3 replicas)
     * still takes its 5 s, so its error is logged once per attempt instead of
     * thousands of times a second. */
    for (int tries = 0;; tries++) {
        uint64_t t0 = hl_mono_ms();
        st = hl_nats_ensure_streams(e->n, c, 5000, hl_signals_stop_flag());
        if (st == HL_OK || hl_signals_stopping())
            break;
        if (tries % 6 == 5)
            hl_warnf("JetStream streams not ready yet (%s); still trying", hl_status_str(st));
        while (!hl_signals_stopping() && hl_mono_ms() - t0 < 5000)
            usleep(100000);
        if (hl_signals_stopping())
            break;
    }
    for (int i = 0; st == HL_OK && i < c->replication_log.shards; i++)
        if (hl_nats_stream_bounds(e->n, e->streams[i], &e->setup_first[i], &e->setup_last[i]) != HL_OK)
            e->setup_first[i] = e->setup_last[i] = 0;
    return st;
}

static void *setup_thread(void *arg)
{
    engine *e = arg;
    hl_status st = start_nats(e);
    if (st && !hl_signals_stopping())
        hl_errorf("cannot reach NATS: %s", hl_status_str(st));
    atomic_store(&e->setup_done, st == HL_OK ? 1 : -1);
    hl_queue_wake(&e->q);
    return NULL;
}

static hl_status start_fetchers(engine *e)
{
    for (int s = 0; s < e->c->replication_log.shards; s++)
        if (hl_fetcher_start(&e->fetchers[s], e->c, e->n, &e->q, s, e->applied_seq[s] + 1, hl_db_epoch(e->d)))
            return HL_ERR_IO;
    return HL_OK;
}

static void wake_engine(void *arg)
{
    hl_queue_wake(arg);
}

/*
 * A stream starts after this node's position (need: per stream, the position
 * a snapshot must reach). Catches up from a snapshot when one can be had
 * (docs/snapshots.md, "Catching up"); otherwise the gap stays on /readyz with
 * what to do, and nothing is read past it.
 */
static void start_catchup(engine *e, const uint64_t *need)
{
    hl_config *c = e->c;
    size_t n = strlen(e->snap.gap_reason);
    char *r = e->snap.gap_reason + n;
    size_t left = sizeof e->snap.gap_reason - n;
    uint64_t now = hl_now_ms(), keep_ms = (uint64_t)c->tombstone_retention_s * 1000u;
    e->stream_gap = true;
    snprintf(e->gap_base, sizeof e->gap_base, "%s", e->snap.gap_reason);
    if (!hl_catchup_configured(c))
        snprintf(r, left,
                 "; no snapshot store is configured to catch up from: restore a snapshot with -restore "
                 "-force at the next start");
    else if (e->last_seen_ms && now > e->last_seen_ms && now - e->last_seen_ms > keep_ms)
        snprintf(r, left,
                 "; this node was away %" PRIu64 " s, longer than tombstone_retention (%" PRId64
                 " s): a merge could bring back rows deleted meanwhile; restore with -restore -force at the next "
                 "start",
                 (now - e->last_seen_ms) / 1000u, c->tombstone_retention_s);
    else if (hl_catchup_start(&e->catchup, c, e->d, c->replication_log.shards, e->streams, need, wake_engine, &e->q))
        snprintf(r, left, "; cannot start catching up from a snapshot: restore with -restore -force at the next start");
    else {
        r[0] = 0;
        e->stream_gap = false;
        e->snap.catching_up = true;
        snprintf(e->snap.catchup_reason, sizeof e->snap.catchup_reason,
                 "catching-up: looking for a snapshot that covers the gap");
        hl_infof("catching up from the newest snapshot that covers the gap");
    }
    e->snap.gap = e->stream_gap;
    if (e->stream_gap)
        hl_errorf("not catching up: %s", e->snap.gap_reason);
}

/* One turn of a catch-up: a merge batch, or a look at the download; when
 * done, the fetchers start from the positions the merge recorded. */
static hl_status catchup_turn(engine *e)
{
    char reason[600];
    hl_catchup_state cs = hl_catchup_turn(e->catchup, reason, sizeof reason);
    e->snap.catchup_rows = e->catchup_rows_done + hl_catchup_rows(e->catchup);
    if (cs == HL_CATCHUP_WAITING) {
        /* No snapshot covers the gap (yet), or none can be read: the gap stands, saying why. */
        e->snap.catching_up = false;
        e->snap.gap = true;
        snprintf(e->snap.gap_reason, sizeof e->snap.gap_reason,
                 "%s; %s; take a snapshot on an up-to-date node (-save-snapshot) or restore this one with -restore "
                 "-force at the next start",
                 e->gap_base, reason);
        return HL_OK;
    }
    e->snap.gap = false;
    if (cs != HL_CATCHUP_DONE) {
        e->snap.catching_up = true;
        snprintf(e->snap.catchup_reason, sizeof e->snap.catchup_reason, "%s", reason);
        return HL_OK;
    }
    e->catchup_rows_done = e->snap.catchup_rows;
    e->snap.catchup_merges++;
    hl_catchup_free(e->catchup);
    e->catchup = NULL;
    e->snap.catching_up = false;
    e->snap.gap_reason[0] = 0;
    for (int s = 0; s < e->c->replication_log.shards; s++) {
        hl_status st = hl_db_stream_seq_get(e->d, e->streams[s], &e->applied_seq[s]);
        if (st)
            return st;
        e->seen_seq[s] = e->applied_seq[s];
    }
    e->retry_held = true; /* changesets held for origins the snapshot moved past */
    return start_fetchers(e);
}

/*
 * A reader found its stream past the sequence it wanted (src/repl/fetcher.c,
 * jumped): the messages in between were discarded before this node read
 * them. Every reader stops (what they queued before still applies) and the
 * node catches up from a snapshot as it does at start; the readers start
 * again from the positions the merge records. contact_ms: when the reader
 * last knew it had everything, the start of this node's absence.
 */
static void stream_jumped(engine *e, int shard, uint64_t applied, uint64_t gap_to, uint64_t contact_ms)
{
    int shards = e->c->replication_log.shards;
    if (e->catchup || e->stream_gap)
        return; /* a second reader's report of the same absence */
    uint64_t *need = calloc((size_t)shards, sizeof *need);
    for (int s = 0; s < shards; s++)
        stop_fetcher(e, s);
    snprintf(e->snap.gap_reason, sizeof e->snap.gap_reason,
             "stream %s jumped to sequence %" PRIu64 " but this node applied only up to %" PRIu64
             "; changesets in between were discarded by retention before it read them",
             e->streams[shard], gap_to + 1, applied);
    hl_errorf("gap in replication log: %s", e->snap.gap_reason);
    if (contact_ms)
        e->last_seen_ms = contact_ms;
    if (!need) {
        e->stream_gap = e->snap.gap = true; /* the next start checks the streams again */
        return;
    }
    need[shard] = gap_to;
    start_catchup(e, need);
    free(need);
}

/* Takes the readers' jump reports out of items (they are not messages) and
 * acts on them once what was queued before them is applied. */
static hl_inbound *take_jumps(hl_inbound *items, hl_inbound **jumps)
{
    hl_inbound **pp = &items;
    while (*pp) {
        hl_inbound *it = *pp;
        if (it->gap_to) {
            *pp = it->next;
            it->next = *jumps;
            *jumps = it;
        } else {
            pp = &it->next;
        }
    }
    return items;
}

/* Runs on the engine thread once NATS is ready: checks for gaps, starts publishing and fetching. */
static hl_status go_online(engine *e)
{
    hl_config *c = e->c;
    uint64_t *need = calloc((size_t)c->replication_log.shards, sizeof *need);
    bool behind = false;
    if (!need)
        return HL_ERR_NOMEM;
    e->snap.streams_ready = true;
    for (int s = 0; s < c->replication_log.shards; s++) {
        uint64_t first = e->setup_first[s], last = e->setup_last[s];
        if (s < HL_STATE_MAX_SHARDS) {
            e->snap.streams[s].start_tail = last;
            e->snap.streams[s].tail_seq = last;
        }
        /* Messages after what we applied are gone: never skip them silently. */
        /* An empty stream says first = last + 1: retention emptied it, a gap too when past us. */
        if (c->replicate && first > e->applied_seq[s] + 1) {
            need[s] = first - 1;
            if (behind)
                continue;
            behind = true;
            snprintf(e->snap.gap_reason, sizeof e->snap.gap_reason,
                     "stream %s starts at sequence %" PRIu64 " but this node applied only up to %" PRIu64
                     "; changesets in between were discarded by retention",
                     e->streams[s], first, e->applied_seq[s]);
            hl_errorf("gap in replication log: %s", e->snap.gap_reason);
        }
    }
    if (behind)
        start_catchup(e, need);
    free(need);
    if (c->publish)
        hl_publisher_attach(e->pub, e->n);
    if (c->replicate && !e->catchup && !e->stream_gap && start_fetchers(e))
        return HL_ERR_IO;
    if (hl_registry_start(&e->reg, c, e->n, c->node_id) == HL_OK)
        schema_to_state(e);
    else
        hl_errorf("cannot start the schema registry thread; /schema has no cluster view");
    e->online = true;
    hl_log(HL_LOG_INFO, "started", "mode", c->nats.urls.n ? "external" : "embedded", "publish",
           c->publish ? "true" : "false", "replicate", c->replicate ? "true" : "false", NULL);
    return HL_OK;
}

static void flush_outbox(engine *e)
{
    uint64_t deadline = hl_mono_ms() + (uint64_t)e->c->shutdown_grace_s * 1000u;
    uint64_t left = 0;
    hl_publisher_defer_deletes(e->pub, false); /* the count below must fall with each acknowledgement */
    hl_publisher_flush_done(e->pub, e->d);
    while (e->online && e->c->publish && hl_mono_ms() < deadline) {
        if (hl_db_outbox_count(e->d, &left) || left == 0)
            break;
        hl_publisher_pump(e->pub, e->d);
        struct pollfd pfd = {.fd = e->q.wake_fd, .events = POLLIN};
        poll(&pfd, 1, 100);
        hl_queue_drain_wake(&e->q);
        hl_ack *acks = NULL;
        size_t na = hl_queue_take_acks(&e->q, &acks);
        hl_publisher_handle_acks(e->pub, e->d, acks, na);
        free(acks);
    }
    if (left)
        hl_warnf("stopping with %" PRIu64 " changesets not yet published; they are kept and sent after restart", left);
}

/* Shard names and positions, the HTTP listener. */
static hl_status open_streams(engine *e)
{
    hl_config *c = e->c;
    int shards = c->replication_log.shards;
    e->streams = calloc((size_t)shards, sizeof *e->streams);
    e->applied_seq = calloc((size_t)shards, sizeof *e->applied_seq);
    e->seen_seq = calloc((size_t)shards, sizeof *e->seen_seq);
    e->cap = calloc((size_t)shards, sizeof *e->cap);
    e->fetchers = calloc((size_t)shards, sizeof *e->fetchers);
    e->setup_first = calloc((size_t)shards, sizeof *e->setup_first);
    e->setup_last = calloc((size_t)shards, sizeof *e->setup_last);
    if (!e->streams || !e->applied_seq || !e->seen_seq || !e->cap || !e->fetchers || !e->setup_first || !e->setup_last)
        return HL_ERR_NOMEM;
    e->pos = (hl_positions){
        .n = shards, .streams = e->streams, .applied = e->applied_seq, .seen = e->seen_seq, .cap = e->cap};
    for (int s = 0; s < shards; s++) {
        e->streams[s] = malloc(256);
        if (!e->streams[s])
            return HL_ERR_NOMEM;
        hl_nats_stream_name(c, s, e->streams[s], 256);
        if (s < HL_STATE_MAX_SHARDS)
            snprintf(e->snap.streams[s].name, sizeof e->snap.streams[s].name, "%s", e->streams[s]);
    }
    hl_http_opts ho = {.bind = c->http.bind,
                       .max_connections = c->http.max_connections,
                       .max_connections_per_client = c->http.max_connections_per_client,
                       .request_timeout_s = c->http.request_timeout_s,
                       .auth_token_file = c->http.auth_token_file};
    if (c->http.bind && c->http.bind[0] && hl_http_start_opts(&e->http, &ho, &e->state))
        return HL_ERR_IO;
    return HL_OK;
}

/* The database: open it, read the recorded positions, install the triggers
 * and capture what the application wrote while we were away. */
static hl_status open_database(engine *e)
{
    hl_config *c = e->c;
    hl_status st;
    if ((st = hl_db_open(&e->d, c->db_path, c->node_id, c->cache_size_kib)))
        return st;
    e->snap.db_open = true;
    hl_db_options o = {
        .publish = c->publish,
        .compress = c->replication_log.compress,
        .max_changeset_bytes = (size_t)c->replication_log.max_changeset_bytes,
        .max_clock_drift_ms = (uint64_t)c->max_clock_drift_s * 1000u,
        .max_held_bytes = (uint64_t)c->schema.max_held_bytes,
        .wal_size_limit = (size_t)c->wal_size_limit,
    };
    hl_db_configure(e->d, &o);
    uint64_t last_hlc = hl_db_last_hlc(e->d);
    e->last_seen_ms = HL_HLC_MS(last_hlc); /* before the capture below gives new versions */
    if (hl_hlc_ahead(last_hlc, hl_now_ms(), o.max_clock_drift_ms))
        hl_warnf("this node's clock was ahead: its last version is %llu ms ahead of the wall clock, so its writes "
                 "are held by the other nodes until the wall clock catches up",
                 (unsigned long long)(HL_HLC_MS(last_hlc) - hl_now_ms()));
    e->retry_held = true; /* changesets held for their clock become due while we were away */
    int64_t restores = 0, restored_ms = 0;
    bool found;
    if (hl_db_meta_get(e->d, "restores", &restores, &found) == HL_OK && found && restores > 0 &&
        hl_db_meta_get(e->d, "restored_at_ms", &restored_ms, &found) == HL_OK && found) {
        e->snap.restores = (uint64_t)restores;
        e->snap.restored_ms = restored_ms > 0 ? (uint64_t)restored_ms : 0;
        uint64_t now = hl_now_ms();
        hl_infof("this database comes from a snapshot -restore wrote %" PRIu64 " s ago (restores of this file: %" PRId64
                 ")",
                 now > e->snap.restored_ms ? (now - e->snap.restored_ms) / 1000u : 0, restores);
    }
    for (int s = 0; s < c->replication_log.shards; s++) {
        if ((st = hl_db_stream_seq_get(e->d, e->streams[s], &e->applied_seq[s])))
            return st;
        e->seen_seq[s] = e->applied_seq[s];
    }
    uint64_t rows = 0;
    if ((st = hl_db_install(e->d, true, &rows))) {
        hl_errorf("cannot install triggers: %s", hl_status_str(st));
        return st;
    }
    char hex[65];
    hl_hex(hl_db_schema_hash(e->d), 32, hex);
    hl_logf(HL_LOG_INFO, "watching %zu tables in %s (schema hash %s); %" PRIu64 " pending changes captured",
            hl_db_table_count(e->d), c->db_path, hex, rows);
    schema_to_state(e);
    publish_state(e);
    return hl_watch_open(&e->watch, c->db_path, c->polling_interval_ms);
}

/* One turn's work: acknowledgements, then one engine cycle when anything
 * asks for it (a local commit, remote changesets, held ones due, positions). */
static void turn(engine *e, bool *want_capture)
{
    hl_ack *acks = NULL;
    size_t na = hl_queue_take_acks(&e->q, &acks);
    if (na)
        hl_publisher_handle_acks(e->pub, e->d, acks, na);
    free(acks);

    hl_inbound *jumps = NULL;
    hl_inbound *items = take_jumps(hl_queue_pop(&e->q, (size_t)e->c->apply_batch_rows), &jumps);
    bool external = (*want_capture && hl_db_changed_externally(e->d)) || e->recapture;
    *want_capture = false;
    if (items && only_positions(items)) {
        /* Only positions: remember them, record them with the next write. */
        for (hl_inbound *it = items; it; it = it->next)
            if (it->safe_seq > e->seen_seq[it->shard] && !e->cap[it->shard])
                e->seen_seq[it->shard] = it->safe_seq;
        hl_inbound_free(items);
        items = NULL;
    }
    bool pos_pending = false;
    for (int s = 0; s < e->c->replication_log.shards; s++)
        pos_pending |= e->seen_seq[s] != e->applied_seq[s];
    bool flush_positions = pos_pending && e->flush_due;
    uint64_t ahead_due = hl_db_ahead_due_ms(e->d);
    if (ahead_due && hl_now_ms() >= ahead_due)
        e->retry_held = true; /* a changeset held for its clock is no longer ahead */
    if (external || e->retry_held || e->expire_held || items || flush_positions) {
        hl_status st = cycle(e, items, external, flush_positions);
        if (st) {
            hl_queue_unpop(&e->q, items);
            items = NULL;
            cycle_failed(e, st, external);
            *want_capture = true;
        } else {
            cycle_succeeded(e);
        }
        hl_inbound_free(items);
    }
    for (hl_inbound *j = jumps; j; j = j->next)
        stream_jumped(e, j->shard, j->safe_seq, j->gap_to,
                      e->fetchers[j->shard] ? hl_fetcher_contact_ms(e->fetchers[j->shard]) : 0);
    hl_inbound_free(jumps);
}

/* Sleeps in poll() until the queue, the database watcher or a timer wants
 * the engine, at most 5 s so the /healthz heartbeat stays fresh. */
static void wait_events(engine *e, bool *want_capture)
{
    uint64_t now = hl_mono_ms();
    int wfd = hl_watch_poll_fd(e->watch, now);
    struct pollfd pfd[2] = {{.fd = e->q.wake_fd, .events = POLLIN}, {.fd = wfd, .events = POLLIN}};
    int timeout = 5000;
    int wt = hl_watch_timeout(e->watch, now), pt = hl_publisher_next_timeout(e->pub);
    int tt = hl_timers_timeout(&e->timers, now);
    if (wt < timeout)
        timeout = wt;
    if (pt >= 0 && pt < timeout)
        timeout = pt;
    if (tt < timeout)
        timeout = tt;
    if (hl_catchup_busy(e->catchup)) { /* more to merge, after a pause that lets the application write */
        int left = e->catchup_next_ms > now ? (int)(e->catchup_next_ms - now) : 0;
        if (left < timeout)
            timeout = left;
    }
    if (hl_queue_has_items(&e->q))
        timeout = 0; /* more queued: only look at the other events */
    int nfd = wfd >= 0 ? 2 : 1;
    int pr = poll(pfd, (nfds_t)nfd, timeout);
    if (pr > 0 && (pfd[0].revents & POLLIN))
        hl_queue_drain_wake(&e->q);
    if (hl_watch_after_poll(e->watch, pr > 0 && nfd == 2 && (pfd[1].revents & POLLIN), pr == 0, hl_mono_ms()))
        *want_capture = true;
}

/* Graceful stop: no new remote work, capture the last local writes, flush. */
static void graceful_stop(engine *e)
{
    hl_signals_request_stop();
    if (e->setup_started) {
        pthread_join(e->setup_th, NULL);
        e->setup_started = false;
    }
    hl_queue_close(&e->q);
    for (int s = 0; s < e->c->replication_log.shards; s++) {
        hl_fetcher_stop(e->fetchers[s]);
        e->fetchers[s] = NULL;
    }
    hl_inbound_free(hl_queue_pop(&e->q, SIZE_MAX));
    if (cycle(e, NULL, true, true))
        hl_warnf("final capture failed; pending changes stay in the change logs for the next start");
    flush_outbox(e);
    hl_registry_stop(e->reg, true); /* leaves the registry at once */
    e->reg = NULL;
}

/* Releases everything, in the order the threads that use it stop. */
static void teardown(engine *e)
{
    int shards = e->c->replication_log.shards;
    hl_signals_request_stop();
    hl_catchup_free(e->catchup);
    e->catchup = NULL;
    if (e->setup_started)
        pthread_join(e->setup_th, NULL);
    if (e->fetchers)
        for (int s = 0; s < shards; s++)
            hl_fetcher_stop(e->fetchers[s]);
    hl_sched_stop(e->sched); /* waits for a snapshot in progress; before the connection it uses */
    e->sched = NULL;
    hl_registry_stop(e->reg, false);
    hl_nats_close(e->n, 2000);
    hl_nats_shutdown(5000); /* before anything a late nats.c callback could touch (the queue) is freed */
    /* Before the server: discovery reloads it. */
    hl_discovery_stop(e->disc);
    hl_nats_server_stop(e->srv, 10000);
    hl_http_stop(e->http);
    hl_state_free(&e->state);
    free(e->snap.schema_json);
    free(e->snap.cluster_json);
    hl_publisher_free(e->pub);
    hl_db_close(e->d);
    hl_watch_free(e->watch);
    if (e->streams)
        for (int s = 0; s < shards; s++)
            free(e->streams[s]);
    free(e->streams);
    free(e->applied_seq);
    free(e->seen_seq);
    free(e->cap);
    free(e->fetchers);
    free(e->setup_first);
    free(e->setup_last);
    hl_signals_forget_queue();
    hl_queue_free(&e->q);
    hl_store_curl_cleanup();
}

int hl_engine_run(hl_config *c, hl_config_loader reload)
{
    engine e = {.c = c, .fail_log = {.burst = 5, .window_ms = 60000}, .defer_log = {.burst = 5, .window_ms = 60000}};
    int rc = 1;
    int shards = c->replication_log.shards;

    hl_signals_block();
    char cerr[128];
    if (hl_sched_wanted(c) && hl_store_curl_init(cerr, sizeof cerr)) { /* before any other thread */
        hl_errorf("%s", cerr);
        return 1;
    }
    /* Decoded changesets waiting for the engine, by what they cost in memory:
     * enough to keep the engine busy, small enough to bound a node's memory. */
    if (hl_queue_init(&e.q, 24u << 20)) {
        hl_errorf("cannot create the engine queue");
        return 1;
    }
    hl_state_init(&e.state);
    e.snap.node_id = c->node_id;
    e.snap.embedded = c->nats.urls.n == 0;
    e.snap.nstreams = shards < HL_STATE_MAX_SHARDS ? shards : HL_STATE_MAX_SHARDS;
    publish_state(&e);
    hl_signals_start(&e.q, reload, c);
    if (open_streams(&e) || open_database(&e) || hl_publisher_new(&e.pub, c, &e.q))
        goto out;
    hl_publisher_defer_deletes(e.pub, true);
    /* NATS comes up in its own thread; the engine captures meanwhile. */
    if (pthread_create(&e.setup_th, NULL, setup_thread, &e) != 0)
        goto out;
    e.setup_started = true;

    uint64_t now0 = hl_mono_ms();
    e.t_held = hl_timers_add(&e.timers, "held changesets", 1000, held_tick, &e, now0);
    hl_timers_add(&e.timers, "position flush", SEQ_FLUSH_MS, flush_tick, &e, now0);
    hl_timers_add(&e.timers, "tombstone gc", TOMBSTONE_GC_MS, gc_tick, &e, now0);
    hl_timers_add(&e.timers, "idle memory release", IDLE_RELEASE_MS, idle_tick, &e, now0);
    bool want_capture = true;
    while (!hl_signals_stopping()) {
        if (!e.online) {
            int sd = atomic_load(&e.setup_done);
            if (sd < 0 || (sd > 0 && go_online(&e)))
                goto out;
        }
        if (e.catchup && hl_mono_ms() >= e.catchup_next_ms) {
            if (catchup_turn(&e))
                goto out;
            e.catchup_next_ms = hl_mono_ms() + CATCHUP_PAUSE_MS;
        }
        if (e.online && !e.sched_tried) {
            e.sched_tried = true;
            if (hl_sched_wanted(c) && hl_sched_start(&e.sched, c, e.n, e.streams, shards))
                hl_errorf("cannot start the snapshot scheduler thread: no periodic snapshots");
        }
        turn(&e, &want_capture);
        /* Publishing and the heartbeat run every turn, also under a
         * sustained inbound load. */
        hl_publisher_pump(e.pub, e.d);
        hl_publisher_flush_done_if_due(e.pub, e.d);
        publish_state(&e);
        hl_timers_run(&e.timers, hl_mono_ms());
        wait_events(&e, &want_capture);
    }
    graceful_stop(&e);
    rc = 0;
out:
    teardown(&e);
    if (rc == 0)
        hl_infof("stopped");
    return rc;
}
