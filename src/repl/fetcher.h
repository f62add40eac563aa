/*
 * fetcher.h - JetStream -> engine queue, one thread per shard stream.
 *
 * Each fetcher reads its stream with an ordered consumer starting after the
 * sequence the database says was applied, reassembles parts per origin,
 * decodes (and decompresses) changesets off the engine thread, and pushes them
 * to the engine queue with the stream sequence the engine may record once the
 * item is applied. A malformed message is logged, counted and skipped.
 * When the stream's sequence jumps past the one wanted (retention discarded
 * messages before they were read), the fetcher pushes an item with gap_to
 * set and reads nothing more: the engine catches up and starts a new one.
 */
#ifndef HL_FETCHER_H
#define HL_FETCHER_H

#include <stdint.h>

#include "config/config.h"
#include "natsio/conn.h"
#include "repl/queue.h"

typedef struct hl_fetcher hl_fetcher;

/* Starts the thread for shard, delivering messages after start_seq. Own
 * changesets (node_id, epoch) are skipped. */
hl_status hl_fetcher_start(hl_fetcher **out, const hl_config *c, hl_nats *n, hl_queue *q, int shard, uint64_t start_seq,
                           uint64_t epoch);
/* Stops and joins the thread, frees f. NULL is a no-op. */
void hl_fetcher_stop(hl_fetcher *f);
/* Highest stream sequence received, malformed messages seen (thread-safe). */
uint64_t hl_fetcher_received(const hl_fetcher *f);
uint64_t hl_fetcher_malformed(const hl_fetcher *f);
/* Incomplete changesets dropped after replication_log.incomplete_expiry, and
 * consumers re-created after their first (thread-safe). */
uint64_t hl_fetcher_expired(const hl_fetcher *f);
uint64_t hl_fetcher_restarts(const hl_fetcher *f);
/* Wall-clock ms this reader last knew it had read everything the stream
 * held (a message in sequence, or the stream's end); 0: not yet (thread-safe). */
uint64_t hl_fetcher_contact_ms(const hl_fetcher *f);
/* Milliseconds the consumer has been missing or stuck (at least 1 when it
 * is); 0 while it is healthy (thread-safe). */
uint64_t hl_fetcher_stalled_ms(const hl_fetcher *f);

#endif
