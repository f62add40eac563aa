/*
 * state.h - what the engine publishes for the HTTP endpoints.
 *
 * The engine thread is the only writer: it fills an hl_state_snapshot and
 * calls hl_state_publish() once per loop iteration. HTTP threads call
 * hl_state_get() for a consistent copy. Neither side ever touches the
 * database handle of the other.
 */
#ifndef HL_STATE_H
#define HL_STATE_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#define HL_STATE_MAX_SHARDS 64
#define HL_LAG_BUCKETS 14

/* Upper bounds (seconds) of the replication lag histogram buckets; +Inf is implicit. */
extern const double hl_lag_bounds[HL_LAG_BUCKETS];

typedef struct hl_state_stream {
    char name[128];
    uint64_t applied_seq; /* stream sequence recorded as dealt with */
    uint64_t tail_seq;    /* last sequence the stream had when last asked */
    uint64_t start_tail;  /* last sequence when this node started (for "caught up") */
    /* how long the stream's consumer has been missing or stuck; 0: healthy */
    uint64_t stalled_ms;
    /* consumers re-created after the first */
    uint64_t consumer_restarts;
    /* incomplete changesets dropped (replication_log.incomplete_expiry) */
    uint64_t changesets_expired;
} hl_state_stream;

/* Changesets held for one origin (node, epoch), for /schema. */
#define HL_STATE_MAX_HELD 16
typedef struct hl_state_held {
    uint64_t node, epoch;
    uint64_t count;      /* held changesets */
    uint64_t for_schema; /* of which wait for the local schema */
    uint64_t first_seq;  /* lowest held sequence */
    uint64_t applied;    /* the origin's applied sequence */
    uint64_t since_ms;   /* wall ms when the oldest was held */
    char reason[200];    /* why the first in line waits */
    uint64_t bytes;      /* bytes held */
} hl_state_held;

typedef struct hl_state_snapshot {
    uint64_t node_id;
    bool embedded;           /* embedded nats-server mode */
    uint64_t engine_beat_ms; /* monotonic ms of the engine's last loop iteration */

    /* readiness inputs */
    bool db_open;
    bool triggers_installed;
    bool nats_connected;
    bool streams_ready;
    bool caught_up;
    bool gap;
    char gap_reason[600];
    bool catching_up; /* merging a snapshot to close a gap (snapshot/catchup.h): not ready */
    char catchup_reason[600];
    bool paused; /* changesets held waiting for the local schema (reported, not failing) */
    char paused_reason[256];
    bool schema_odd; /* this node's schema is the odd one out in the registry (registry.h): not ready */
    char schema_odd_reason[400];
    uint64_t held_bound_streams; /* streams not read past a deferred changeset (schema.max_held_bytes) */
    uint64_t held_bytes;         /* bytes held for origins waiting for the schema: what the bound counts */
    char held_bound_reason[400]; /* reported on /readyz (not failing), "" when no stream is held back */
    bool engine_stalled;         /* the engine's transactions kept failing for stall_timeout */
    char engine_reason[256];
    bool nats_server_running; /* embedded mode only */
    uint64_t nats_server_restarts;

    /* counters */
    uint64_t rows_captured, changesets_captured;
    uint64_t changesets_published, rows_published;
    uint64_t outbox_rows; /* publish backlog */
    uint64_t rows_applied, rows_skipped_lww, conflicts;
    uint64_t changesets_applied, changesets_duplicate, changesets_malformed, changesets_held;
    uint64_t clock_ahead;
    uint64_t changesets_deferred; /* not stored: their origin was over schema.max_held_bytes; read again later */
    uint64_t messages_malformed;  /* refused before decoding (bad header, bad payload) */
    uint64_t held_now;            /* rows in __harmonylite__pending */
    uint64_t chains_applied;      /* transactions received as a chain of changesets, applied as one */
    uint64_t changesets_late;     /* applied after their position had been given up on */
    uint64_t order_gaps;          /* times missing predecessors were given up on */
    uint64_t engine_failures;     /* engine transactions that failed (and were retried) */
    uint64_t catchup_merges;      /* snapshots merged to close a gap */
    uint64_t catchup_rows;        /* snapshot rows merged (every attempt) */
    uint64_t restores;            /* -restore runs that wrote this database file (meta "restores") */
    uint64_t restored_ms;         /* wall ms of the last of them; 0: never restored */

    /* held changesets per origin (the first HL_STATE_MAX_HELD by node id) */
    int nheld;
    uint64_t held_origins; /* origins with held changesets, also beyond HL_STATE_MAX_HELD */
    hl_state_held held[HL_STATE_MAX_HELD];
    uint64_t table_resyncs; /* tables sent in full after VACUUM or a rebuild moved their rowids */
    uint64_t missed_rows;   /* rows found written while a table's triggers were missing */

    /* replication lag: origin capture wall time -> local apply commit */
    uint64_t lag_buckets[HL_LAG_BUCKETS + 1]; /* cumulative counts are computed when rendering */
    double lag_sum;
    uint64_t lag_count;

    int nstreams;
    hl_state_stream streams[HL_STATE_MAX_SHARDS];

    /* /schema: JSON text describing the replicated tables, rebuilt on schema change */
    char schema_hash[65];
    char prev_schema_hash[65];
    char *schema_json;  /* owned by the state: '[{"name":..,"columns":[{"name":..,"type":..,"notnull":..,"pk":..}]}]' */
    char *cluster_json; /* owned by the state: the registry's view (hl_cluster_json), NULL before the first */

    /* snapshots (src/snapshot/schedule.c): counters of this node, the newest the cluster recorded */
    bool snap_sched;           /* the scheduler runs (snapshot.interval or sleep_timeout) */
    uint64_t snap_taken;       /* snapshots this node took */
    uint64_t snap_failures;    /* snapshots this node failed to take */
    uint64_t snap_last_bytes;  /* compressed size of the last one it took */
    uint64_t snap_last_ms;     /* how long that took */
    uint64_t snap_newest_ms;   /* wall ms of the newest snapshot known; 0: none */
    uint64_t snap_newest_node; /* the node that took it */
    char snap_newest[201];     /* its manifest's name */
} hl_state_snapshot;

typedef struct hl_state {
    pthread_mutex_t mu;
    hl_state_snapshot cur;
} hl_state;

void hl_state_init(hl_state *s);
/* Frees what the state holds (it may be initialised again); NULL is a no-op. */
void hl_state_free(hl_state *s);
/* Copies snap in (schema_json and cluster_json are duplicated when they changed). Engine thread only. */
void hl_state_publish(hl_state *s, const hl_state_snapshot *snap);
/* Copies the current snapshot out; out->schema_json and out->cluster_json are new strings the caller frees. */
void hl_state_get(hl_state *s, hl_state_snapshot *out);
/* Adds one lag observation (seconds) to a snapshot's histogram. */
void hl_state_observe_lag(hl_state_snapshot *snap, double seconds);

#endif
