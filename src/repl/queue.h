/*
 * queue.h - work handed to the engine thread by other threads.
 *
 * Fetcher threads push received changesets, nats.c's threads push publish
 * acknowledgements; the engine pops them. Pushing never touches SQLite. The
 * inbound side is bounded in bytes: a fetcher blocks when the engine is behind
 * (backpressure to JetStream, which keeps the messages), so memory stays flat.
 */
#ifndef HL_QUEUE_H
#define HL_QUEUE_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "repl/changeset.h"

typedef struct hl_inbound {
    struct hl_inbound *next;
    int shard;
    uint64_t safe_seq;  /* every message of the stream up to here is dealt with once this item is */
    hl_changeset *cs;   /* NULL: nothing to apply (own, duplicate or malformed message) */
    unsigned char *raw; /* the encoded payload, kept in case the changeset must be held */
    size_t rawlen;
    uint8_t flags;
    uint64_t gap_to; /* nonzero: no message; the stream lost safe_seq + 1 .. gap_to before they were read */
    bool applied;    /* set by the engine when the changeset's rows were applied */
    size_t bytes;    /* accounted size */
} hl_inbound;

typedef struct hl_ack {
    uint64_t seq;  /* changeset sequence */
    uint32_t part; /* part index */
    bool ok;       /* false: the server refused or timed out */
} hl_ack;

typedef struct hl_queue {
    pthread_mutex_t mu;
    pthread_cond_t space; /* signalled when inbound bytes drop */
    hl_inbound *head, *tail;
    size_t bytes, max_bytes;
    hl_ack *acks;
    size_t nacks, acks_cap;
    int wake_fd;       /* eventfd the engine polls */
    int discard_shard; /* -1, or a shard whose items are freed instead of queued (hl_queue_discard_shard) */
    volatile int closed;
} hl_queue;

hl_status hl_queue_init(hl_queue *q, size_t max_bytes);
/* Frees what is still queued and the queue's resources; NULL is a no-op. */
void hl_queue_free(hl_queue *q);
/* Wakes the engine (async-signal-safe: only write()s the eventfd). */
void hl_queue_wake(hl_queue *q);
/* Clears the wake-up counter; call after poll() reports the fd readable. */
void hl_queue_drain_wake(hl_queue *q);
/* Takes ownership of it; blocks while the queue is over its byte limit unless closed. */
void hl_queue_push(hl_queue *q, hl_inbound *it);
/* Pops items whose total size stays near max_rows rows (at least one). Returns the list, or NULL. */
hl_inbound *hl_queue_pop(hl_queue *q, size_t max_rows);
/* True when inbound items are waiting. */
bool hl_queue_has_items(hl_queue *q);
/* Puts a popped list back at the front (after a failed transaction). */
void hl_queue_unpop(hl_queue *q, hl_inbound *list);
void hl_inbound_free(hl_inbound *it);
void hl_queue_push_ack(hl_queue *q, hl_ack a);
/* Moves all pending acks into *out (caller frees); returns the count. */
size_t hl_queue_take_acks(hl_queue *q, hl_ack **out);
/* on: frees the queued items of shard and every one pushed for it until
 * called with on false (a pusher for it never blocks meanwhile), so that
 * shard's fetcher can be stopped and restarted from an earlier position. */
void hl_queue_discard_shard(hl_queue *q, int shard, bool on);
/* Unblocks pushers for shutdown; NULL is a no-op. */
void hl_queue_close(hl_queue *q);

#endif
