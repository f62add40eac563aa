/*
 * schedule.h - periodic snapshots from a running node, one node of the
 * cluster at a time, and sleep_timeout (docs/snapshots.md#periodic-snapshots).
 *
 * A thread of its own (never the engine's) decides when the cluster needs a
 * snapshot: snapshot.interval after the cluster's last one, or earlier once a
 * stream advanced snapshot.retention_percent of replication_log.max_entries
 * past it. It then takes the lease in the NATS KV bucket snapshot.lease_bucket,
 * takes the snapshot (hl_snapshot_save_manifest: its own read connection),
 * records it under "last" in the same bucket and releases the lease.
 *
 * The lease is a value {"node": "N", "expires_ms": "T"} under the key "lease",
 * written only by compare-and-set on its revision: created when absent, taken
 * over when its expiry (wall clock) has passed, renewed by its holder every
 * HL_LEASE_TTL_MS / 3 while it works. A holder that dies stops renewing, and
 * another node takes the lease once it expired.
 */
#ifndef HL_SNAPSHOT_SCHEDULE_H
#define HL_SNAPSHOT_SCHEDULE_H

#include <stdbool.h>
#include <stdint.h>

#include "common/status.h"
#include "config/config.h"
#include "natsio/kv.h"
#include "snapshot/manifest.h"

#define HL_LEASE_TTL_MS 15000 /* a lease not renewed for this long is free */
#define HL_LEASE_KEY "lease"
#define HL_LAST_KEY "last"

/* ---- the lease (exposed for tests) ---- */

/*
 * Takes the lease for node at wall time now_ms, for ttl_ms: creates it when
 * absent, takes it over when expired (or unreadable), renews it when node
 * holds it already. *rev gets the revision to renew or release from.
 * HL_ERR_CONFLICT when another node holds it (*holder, may be NULL, gets its
 * id) or won the race for it; other errors when the bucket is unreachable.
 */
hl_status hl_lease_acquire(hl_kv *kv, uint64_t node, uint64_t now_ms, uint64_t ttl_ms, uint64_t *rev, uint64_t *holder);
/* Extends the lease node holds at revision *rev (updated); HL_ERR_CONFLICT when it was lost. */
hl_status hl_lease_renew(hl_kv *kv, uint64_t node, uint64_t now_ms, uint64_t ttl_ms, uint64_t *rev);
/* Gives the lease up (it expires at once) if still held at rev; losing it meanwhile is not an error. */
hl_status hl_lease_release(hl_kv *kv, uint64_t node, uint64_t rev);

/* The cluster's last snapshot as recorded under HL_LAST_KEY. */
typedef struct hl_last_snapshot {
    uint64_t node;
    uint64_t created_ms;
    uint64_t size;
    char manifest[HL_SNAPSHOT_NAME_MAX + 1];
    size_t nstreams;
    hl_manifest_stream *streams; /* owned; free with hl_last_snapshot_free */
} hl_last_snapshot;

/* Serialises m (named mname) as the HL_LAST_KEY value; malloc'd, NULL when out of memory. */
char *hl_last_snapshot_json(const hl_manifest *m, const char *mname);
/* Parses a HL_LAST_KEY value, trusting nothing in it; HL_ERR_DECODE when malformed. */
hl_status hl_last_snapshot_parse(hl_last_snapshot *out, const char *json, size_t len);
void hl_last_snapshot_free(hl_last_snapshot *l);

/* ---- the scheduler thread ---- */

typedef struct hl_sched hl_sched;

/* What /metrics, /readyz and /schema show. */
typedef struct hl_sched_info {
    uint64_t taken;            /* snapshots this node took */
    uint64_t failures;         /* snapshots this node failed to take */
    uint64_t last_bytes;       /* compressed size of the last one this node took */
    uint64_t last_duration_ms; /* how long it took */
    uint64_t newest_ms;        /* wall ms of the newest snapshot this node knows of, 0: none */
    uint64_t newest_node;
    char newest[HL_SNAPSHOT_NAME_MAX + 1]; /* its manifest's name */
} hl_sched_info;

/* Records m (named mname) as the cluster's last snapshot in snapshot.lease_bucket
 * unless a newer one is recorded (-save-snapshot). One connection attempt. */
hl_status hl_sched_record(const hl_config *c, const hl_manifest *m, const char *mname);
/* Whether c asks for the scheduler: snapshot.interval (effective) or sleep_timeout. */
bool hl_sched_wanted(const hl_config *c);

/*
 * Starts the thread. streams[0..nstreams) are the change-log streams (for the
 * retention share). sleep_timeout stops the process with hl_signals_stop_self().
 * c, n and streams must outlive hl_sched_stop.
 */
hl_status hl_sched_start(hl_sched **out, const hl_config *c, hl_nats *n, char *const *streams, int nstreams);
/* Engine thread: activity is any counter that grows with local or remote
 * changes; ready is whether the node is caught up without a gap. */
void hl_sched_feed(hl_sched *s, uint64_t activity, bool ready);
void hl_sched_info_get(hl_sched *s, hl_sched_info *out);
/* Stops the thread (waits for a snapshot in progress) and frees it. NULL is a no-op. */
void hl_sched_stop(hl_sched *s);

#endif
