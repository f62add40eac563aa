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
/* Handles acknowledgements: deletes fully acknowledged outbox rows (own transaction). */
hl_status hl_publisher_handle_acks(hl_publisher *p, hl_db *d, hl_ack *acks, size_t n);
uint64_t hl_publisher_published(const hl_publisher *p);      /* changesets fully acknowledged */
uint64_t hl_publisher_rows_published(const hl_publisher *p); /* rows in those changesets */
/* Milliseconds until pump() should run again for stall detection, or -1. */
int hl_publisher_next_timeout(const hl_publisher *p);
/* Shard this node publishes to: a hash of its node id modulo shards. */
int hl_shard_for_node(uint64_t node_id, int shards);

#endif
