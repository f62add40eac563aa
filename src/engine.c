/*
 * engine.c - wires the modules together and runs the engine loop.
 *
 * Threads: the engine (this file; the only one touching SQLite), one fetcher
 * per shard, nats.c's own threads (callbacks only enqueue), the nats-server
 * supervisor in embedded mode, and a signal thread. The engine sleeps in poll()
 * on inotify (the database and its -wal file) and the queue's eventfd, with the
 * polling interval as a fallback timeout.
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
#include <sys/inotify.h>
#include <unistd.h>

#include "common/hlc.h"
#include "common/log.h"
#include "common/sha256.h"
#include "db/db.h"
#include "natsio/conn.h"
#include "natsio/server.h"
#include "repl/changeset.h"
#include "repl/fetcher.h"
#include "repl/publisher.h"
#include "repl/queue.h"

#define TOMBSTONE_GC_MS (3600u * 1000u)
#define SEQ_FLUSH_MS 1000

typedef struct engine {
    hl_config *c;
    hl_db *d;
    hl_queue q;
    hl_nats_server *srv;
    hl_nats *n;
    hl_publisher *pub;
    hl_fetcher **fetchers;
    char **streams;
    uint64_t *applied_seq; /* per shard: recorded in the database */
    uint64_t *seen_seq;    /* per shard: safe sequence reached, maybe not recorded yet */
    int inotify_fd;
    char *db_base, *wal_base;
    uint64_t last_seq_flush, last_gc;
    bool retry_held;
} engine;

static atomic_int stop_signals;
static volatile int stop_flag; /* polled by blocking NATS setup loops */
static hl_queue *signal_queue;

static void *signal_thread(void *arg)
{
    sigset_t *set = arg;
    for (;;) {
        int sig = 0;
        if (sigwait(set, &sig) != 0)
            continue;
        if (sig == SIGHUP) {
            hl_infof("SIGHUP received: nothing to reload yet");
            continue;
        }
        if (atomic_fetch_add(&stop_signals, 1) > 0) {
            hl_warnf("second stop signal: exiting at once");
            _exit(1);
        }
        hl_logf(HL_LOG_INFO, "received %s: stopping gracefully", sig == SIGTERM ? "SIGTERM" : "SIGINT");
        stop_flag = 1;
        if (signal_queue)
            hl_queue_wake(signal_queue);
    }
    return NULL;
}

static bool stopping(void)
{
    return atomic_load(&stop_signals) > 0;
}

static hl_status watch_db(engine *e)
{
    char *p1 = strdup(e->c->db_path), *p2 = strdup(e->c->db_path);
    hl_status st = HL_OK;
    if (!p1 || !p2) {
        st = HL_ERR_NOMEM;
        goto out;
    }
    const char *dir = dirname(p1);
    const char *base = basename(p2);
    e->db_base = strdup(base);
    size_t wl = strlen(base) + 5;
    e->wal_base = malloc(wl);
    if (!e->db_base || !e->wal_base) {
        st = HL_ERR_NOMEM;
        goto out;
    }
    snprintf(e->wal_base, wl, "%s-wal", base);
    e->inotify_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (e->inotify_fd < 0 || inotify_add_watch(e->inotify_fd, dir, IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO |
                                                                        IN_CREATE) < 0) {
        hl_logf(HL_LOG_WARN, "inotify unavailable (%s): relying on polling_interval", strerror(errno));
        if (e->inotify_fd >= 0)
            close(e->inotify_fd);
        e->inotify_fd = -1;
    }
out:
    free(p1);
    free(p2);
    return st;
}

/* Drains inotify events; true when one concerns the database or its WAL. */
static bool db_touched(engine *e)
{
    char buf[8192] __attribute__((aligned(__alignof__(struct inotify_event))));
    bool hit = false;
    for (;;) {
        ssize_t n = read(e->inotify_fd, buf, sizeof buf);
        if (n <= 0)
            break;
        for (char *p = buf; p < buf + n;) {
            struct inotify_event *ev = (struct inotify_event *)p;
            if (ev->len && (strcmp(ev->name, e->db_base) == 0 || strcmp(ev->name, e->wal_base) == 0))
                hit = true;
            p += sizeof *ev + ev->len;
        }
    }
    return hit;
}

/*
 * One engine transaction: schema check, capture, then (capture before apply)
 * the remote changesets in items. On failure nothing is lost: the transaction
 * rolls back and the items go back to the queue.
 */
static hl_status cycle(engine *e, hl_inbound *items)
{
    hl_db *d = e->d;
    hl_status st;
    bool changed = false;
    uint64_t rows = 0;
    if ((st = hl_db_begin(d)))
        return st;
    if ((st = hl_triggers_sync(d, false, &changed)))
        goto fail;
    if (changed) {
        char hex[65];
        hl_hex(d->schema.hash, 32, hex);
        hl_logf(HL_LOG_INFO, "schema changed: %zu replicated tables, schema hash %s", d->schema.n, hex);
        e->retry_held = true;
    }
    if ((st = hl_capture(d, &rows)))
        goto fail;
    if (items || e->retry_held) {
        if ((st = hl_apply_begin(d)))
            goto fail;
        if (e->retry_held && (st = hl_apply_retry_held(d)))
            goto fail;
        for (hl_inbound *it = items; it; it = it->next) {
            if (it->cs) {
                hl_apply_result r;
                if ((st = hl_apply(d, it->cs, it->raw, it->rawlen, it->flags, &r)))
                    goto fail;
            }
            if (it->safe_seq > e->seen_seq[it->shard])
                e->seen_seq[it->shard] = it->safe_seq;
        }
        if ((st = hl_apply_end(d)))
            goto fail;
    }
    for (int s = 0; s < e->c->replication_log.shards; s++)
        if (e->seen_seq[s] != e->applied_seq[s] && (st = hl_db_stream_seq_put(d, e->streams[s], e->seen_seq[s])))
            goto fail;
    if ((st = hl_db_commit(d)))
        goto undo;
    e->retry_held = false;
    for (int s = 0; s < e->c->replication_log.shards; s++)
        e->applied_seq[s] = e->seen_seq[s];
    e->last_seq_flush = hl_mono_ms();
    if (rows)
        hl_debugf("captured %" PRIu64 " rows", rows);
    return HL_OK;
fail:
    hl_db_rollback(d);
undo:
    for (int s = 0; s < e->c->replication_log.shards; s++)
        e->seen_seq[s] = e->applied_seq[s];
    return st;
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
        if ((st = hl_nats_server_start(&e->srv, c, 30000)))
            return st;
        local[0] = hl_nats_server_client_url(e->srv);
        urls = local;
        nurls = 1;
    }
    if ((st = hl_nats_connect(&e->n, c, urls, nurls, hl_publisher_ack_handler, &e->q, 4096, &stop_flag)))
        return st;
    /* A JetStream cluster needs a quorum before streams can be created: keep
     * trying (and logging) until it forms or we are told to stop. */
    for (;;) {
        st = hl_nats_ensure_streams(e->n, c, 30000, &stop_flag);
        if (st == HL_OK || stopping())
            return st;
        hl_warnf("JetStream streams not ready yet (%s); still trying", hl_status_str(st));
    }
}

static void flush_outbox(engine *e)
{
    uint64_t deadline = hl_mono_ms() + (uint64_t)e->c->shutdown_grace_s * 1000u;
    uint64_t left = 0;
    while (e->pub && e->n && hl_mono_ms() < deadline) {
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
        hl_warnf("stopping with %" PRIu64 " changesets not yet published; they are kept and sent after restart",
                 left);
}

int hl_engine_run(hl_config *c)
{
    engine e = {.c = c, .inotify_fd = -1};
    int rc = 1;
    static sigset_t set; /* read by the signal thread for the life of the process */
    pthread_t sig_th;
    int shards = c->replication_log.shards;

    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &set, NULL); /* every thread created from here inherits it */
    sigdelset(&set, SIGPIPE);
    if (hl_queue_init(&e.q, 64u << 20)) {
        hl_errorf("cannot create the engine queue");
        return 1;
    }
    signal_queue = &e.q;
    pthread_create(&sig_th, NULL, signal_thread, &set);
    pthread_detach(sig_th);

    e.streams = calloc((size_t)shards, sizeof *e.streams);
    e.applied_seq = calloc((size_t)shards, sizeof *e.applied_seq);
    e.seen_seq = calloc((size_t)shards, sizeof *e.seen_seq);
    e.fetchers = calloc((size_t)shards, sizeof *e.fetchers);
    if (!e.streams || !e.applied_seq || !e.seen_seq || !e.fetchers)
        goto out;
    for (int s = 0; s < shards; s++) {
        e.streams[s] = malloc(256);
        if (!e.streams[s])
            goto out;
        hl_nats_stream_name(c, s, e.streams[s], 256);
    }

    if (hl_db_open(&e.d, c->db_path, c->node_id, c->cache_size_kib))
        goto out;
    e.d->publish = c->publish;
    e.d->compress = c->replication_log.compress;
    e.d->max_changeset_bytes = (size_t)c->replication_log.max_changeset_bytes;
    for (int s = 0; s < shards; s++) {
        if (hl_db_stream_seq_get(e.d, e.streams[s], &e.applied_seq[s]))
            goto out;
        e.seen_seq[s] = e.applied_seq[s];
    }
    /* Install triggers and capture what the application wrote while we were away. */
    {
        bool changed;
        uint64_t rows = 0;
        hl_status st = hl_db_begin(e.d);
        if (!st)
            st = hl_triggers_sync(e.d, true, &changed);
        if (!st)
            st = hl_capture(e.d, &rows);
        if (!st)
            st = hl_db_commit(e.d);
        else
            hl_db_rollback(e.d);
        if (st) {
            hl_errorf("cannot install triggers: %s", hl_status_str(st));
            goto out;
        }
        char hex[65];
        hl_hex(e.d->schema.hash, 32, hex);
        hl_logf(HL_LOG_INFO, "watching %zu tables in %s (schema hash %s); %" PRIu64 " pending changes captured",
                e.d->schema.n, c->db_path, hex, rows);
    }
    if (watch_db(&e))
        goto out;
    if (hl_publisher_new(&e.pub, c, &e.q))
        goto out;
    if (start_nats(&e)) {
        if (stopping())
            rc = 0;
        goto out;
    }
    if (c->publish)
        hl_publisher_attach(e.pub, e.n);
    if (c->replicate)
        for (int s = 0; s < shards; s++)
            if (hl_fetcher_start(&e.fetchers[s], c, e.n, &e.q, s, e.applied_seq[s] + 1, e.d->epoch))
                goto out;
    hl_log(HL_LOG_INFO, "started", "mode", c->nats.urls.n ? "external" : "embedded", "publish",
           c->publish ? "true" : "false", "replicate", c->replicate ? "true" : "false", NULL);

    e.last_gc = hl_mono_ms();
    bool want_capture = true;
    while (!stopping()) {
        hl_ack *acks = NULL;
        size_t na = hl_queue_take_acks(&e.q, &acks);
        if (na)
            hl_publisher_handle_acks(e.pub, e.d, acks, na);
        free(acks);

        hl_inbound *items = hl_queue_pop(&e.q, (size_t)c->apply_batch_rows);
        bool external = want_capture && hl_db_changed_externally(e.d);
        want_capture = false;
        bool positions_due = hl_mono_ms() - e.last_seq_flush >= SEQ_FLUSH_MS;
        bool pos_pending = false;
        for (int s = 0; s < shards; s++)
            pos_pending |= e.seen_seq[s] != e.applied_seq[s];
        bool work = external || e.retry_held || (items && !only_positions(items)) ||
                    ((items || pos_pending) && positions_due);
        if (items && !work) {
            /* Only positions: remember them, record later. */
            for (hl_inbound *it = items; it; it = it->next)
                if (it->safe_seq > e.seen_seq[it->shard])
                    e.seen_seq[it->shard] = it->safe_seq;
            hl_inbound_free(items);
            items = NULL;
        } else if (work) {
            hl_status st = cycle(&e, items);
            if (st) {
                hl_queue_unpop(&e.q, items);
                items = NULL;
                hl_warnf("engine transaction failed (%s); retrying", hl_status_str(st));
                usleep(200000);
                want_capture = true;
            }
            hl_inbound_free(items);
            if (!st && e.q.head)
                continue; /* more queued: go again without sleeping */
        }
        hl_publisher_pump(e.pub, e.d);

        if (hl_mono_ms() - e.last_gc > TOMBSTONE_GC_MS) {
            uint64_t n = 0;
            e.last_gc = hl_mono_ms();
            if (!hl_db_begin(e.d)) {
                if (!hl_db_gc_tombstones(e.d, hl_now_ms() - (uint64_t)c->tombstone_retention_s * 1000u, &n) &&
                    !hl_db_commit(e.d))
                    hl_debugf("collected %" PRIu64 " tombstones", n);
                else
                    hl_db_rollback(e.d);
            }
        }

        struct pollfd pfd[2] = {{.fd = e.q.wake_fd, .events = POLLIN}, {.fd = e.inotify_fd, .events = POLLIN}};
        int timeout = c->polling_interval_ms > 0 ? c->polling_interval_ms : 1000;
        int pt = hl_publisher_next_timeout(e.pub);
        if (pt >= 0 && pt < timeout)
            timeout = pt;
        if (e.seen_seq && shards > 0) {
            for (int s = 0; s < shards; s++)
                if (e.seen_seq[s] != e.applied_seq[s] && timeout > SEQ_FLUSH_MS)
                    timeout = SEQ_FLUSH_MS;
        }
        int nfd = e.inotify_fd >= 0 ? 2 : 1;
        int pr = poll(pfd, (nfds_t)nfd, timeout);
        if (pr > 0 && (pfd[0].revents & POLLIN))
            hl_queue_drain_wake(&e.q);
        if (pr > 0 && nfd == 2 && (pfd[1].revents & POLLIN) && db_touched(&e))
            want_capture = true;
        if (pr == 0 && c->polling_interval_ms > 0)
            want_capture = true;
    }

    /* Graceful stop: no new remote work, capture the last local writes, flush. */
    hl_queue_close(&e.q);
    for (int s = 0; s < shards; s++) {
        hl_fetcher_stop(e.fetchers[s]);
        e.fetchers[s] = NULL;
    }
    hl_inbound_free(hl_queue_pop(&e.q, SIZE_MAX));
    {
        if (cycle(&e, NULL))
            hl_warnf("final capture failed; pending changes stay in the change logs for the next start");
    }
    flush_outbox(&e);
    rc = 0;
out:
    if (e.fetchers)
        for (int s = 0; s < shards; s++)
            hl_fetcher_stop(e.fetchers[s]);
    hl_nats_close(e.n, 2000);
    hl_nats_server_stop(e.srv, 10000);
    hl_publisher_free(e.pub);
    hl_db_close(e.d);
    if (e.inotify_fd >= 0)
        close(e.inotify_fd);
    if (e.streams)
        for (int s = 0; s < shards; s++)
            free(e.streams[s]);
    free(e.streams);
    free(e.applied_seq);
    free(e.seen_seq);
    free(e.fetchers);
    free(e.db_base);
    free(e.wal_base);
    signal_queue = NULL;
    hl_queue_destroy(&e.q);
    if (rc == 0)
        hl_infof("stopped");
    return rc;
}
