/*
 * publisher.h - outbox -> JetStream, pipelined.
 *
 * Runs on the engine thread. Reads changesets from the durable outbox in
 * sequence order, cuts them into parts and publishes them with
 * js_PublishMsgAsync (a window of unacknowledged parts, never one round trip
 * per message). An outbox row is deleted only after every part is
 * acknowledged; any failure re-publishes from the oldest unacknowledged row,
 * and the stream's duplicate window (Nats-Msg-Id) drops what was stored before.
 */
#ifndef HL_PUBLISHER_H
#define HL_PUBLISHER_H

#include <stdbool.h>
#include <stdint.h>

#include "config/config.h"
#include "db/db.h"
#include "natsio/conn.h"
#include "repl/queue.h"

/* The window of unacknowledged publishes, in parts and in payload bytes. A
 * changeset is handed over whole while both are below their bound, so the
 * bytes may exceed theirs by one changeset (and one bigger than the bound is
 * published alone). nats.c keeps every unacknowledged message in memory, so
 * the byte bound is what publishing costs (a chain of big changesets would
 * otherwise hold HL_PUBLISH_WINDOW_PARTS * chunk_bytes). In the header for
 * the tests. */
#define HL_PUBLISH_WINDOW_PARTS 256
#define HL_PUBLISH_WINDOW_BYTES (8u << 20)

typedef struct hl_publisher hl_publisher;

/* Creates the publisher for this node's shard subject. */
hl_status hl_publisher_new(hl_publisher **out, const hl_config *c, hl_queue *q);
void hl_publisher_free(hl_publisher *p);
/* The ack handler to pass to hl_nats_connect, with the queue as closure. */
void hl_publisher_ack_handler(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure);
/* Sets (or clears, with NULL) the connection to publish on. */
void hl_publisher_attach(hl_publisher *p, hl_nats *n);
/* Publishes outbox rows while the window has room. */
hl_status hl_publisher_pump(hl_publisher *p, hl_db *d);
/* Handles acknowledgements: deletes fully acknowledged outbox rows (own
 * transaction), or with deferred deletes remembers them (see below). */
hl_status hl_publisher_handle_acks(hl_publisher *p, hl_db *d, hl_ack *acks, size_t n);
/*
 * Deferred deletes: a write transaction of its own per batch of acknowledgements
 * is one more transaction the application's writer runs into (docs/performance.md,
 * (a)). With on, fully acknowledged rows are remembered instead; the engine
 * deletes them in its next write transaction (hl_publisher_done, then
 * hl_publisher_done_recorded after the commit), or hl_publisher_flush_done_if_due
 * does in one of their own after 200 ms or 1024 rows. Remembered rows are never
 * published again meanwhile; after a crash they are (JetStream and the receivers
 * drop the copies).
 */
void hl_publisher_defer_deletes(hl_publisher *p, bool on);
/* The remembered outbox seqs (a view, valid until the next publisher call). */
size_t hl_publisher_done(const hl_publisher *p, const uint64_t **seqs);
/* The first n of hl_publisher_done's seqs were deleted by a committed transaction. */
void hl_publisher_done_recorded(hl_publisher *p, size_t n);
/* Deletes every remembered row in a transaction of its own; on failure they stay remembered. */
hl_status hl_publisher_flush_done(hl_publisher *p, hl_db *d);
/* hl_publisher_flush_done once due: deferral off, 200 ms since the oldest, or 1024 rows. */
hl_status hl_publisher_flush_done_if_due(hl_publisher *p, hl_db *d);
uint64_t hl_publisher_published(const hl_publisher *p);      /* changesets fully acknowledged */
uint64_t hl_publisher_rows_published(const hl_publisher *p); /* rows in those changesets */
/* Milliseconds until pump() should run again for stall detection, or -1. */
int hl_publisher_next_timeout(const hl_publisher *p);
/* Shard this node publishes to: a hash of its node id modulo shards. */
int hl_shard_for_node(uint64_t node_id, int shards);

#endif
